//! The CLI in pipelines: input streamed as bytes as it arrives, output that fails (a full
//! disk, a reader that went away) or a worker stopped with SIGTERM loses nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use slotq_testkit::ClusterBuilder;

fn slotq() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_slotq"));
    c.env_remove("SLOTQ_URL");
    c
}

fn run(args: &[&str]) -> Output {
    slotq().args(args).output().expect("slotq runs")
}

fn run_with_input(args: &[&str], input: &[u8]) -> Output {
    let mut child = slotq()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("slotq runs");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn depth(url: &str, queue: &str) -> u64 {
    let o = run(&["--url", url, "--json", "stats", queue]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["total_depth"].as_u64().unwrap()
}

fn numbers(n: usize) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

#[test]
fn push_streams_bytes_as_they_arrive_and_stops_at_a_bad_line() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();

    // A line is sent while stdin stays open (no waiting for the end of the input).
    let mut push = slotq()
        .args(["--url", &url, "push", "live"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = push.stdin.take().unwrap();
    input.write_all(b"first\n").unwrap();
    input.flush().unwrap();
    let started = Instant::now();
    let got = loop {
        let o = run(&["--url", &url, "pop", "live", "--wait", "0.2"]);
        if !o.stdout.is_empty() || started.elapsed() > Duration::from_secs(5) {
            break o.stdout;
        }
    };
    assert_eq!(got, b"first\n", "sent while the input was still open");
    input.write_all(b"second\n").unwrap();
    drop(input);
    assert!(push.wait().unwrap().success());
    assert_eq!(run(&["--url", &url, "pop", "live"]).stdout, b"second\n");

    // Bytes that are not UTF-8 travel as they are; JSON shows them in base64.
    let o = run_with_input(&["--url", &url, "push", "bytes"], b"caf\xe9\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["--url", &url, "--json", "pop", "bytes"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["payload_base64"], "Y2Fm6Q==", "{v}");
    let o = run_with_input(&["--url", &url, "push", "bytes"], b"caf\xe9\n");
    assert!(o.status.success());
    assert_eq!(run(&["--url", &url, "pop", "bytes"]).stdout, b"caf\xe9\n");

    // -0: messages may hold newlines.
    let o = run_with_input(&["--url", &url, "push", "-0", "nul"], b"x\0y\ny\0");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["--url", &url, "pop", "-0", "-n", "2", "nul"]);
    let mut got: Vec<&[u8]> = o
        .stdout
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .collect();
    got.sort();
    assert_eq!(got, [&b"x"[..], &b"y\ny"[..]]);

    // A bad line stops the push with its line number; the lines before it are sent.
    let o = run_with_input(&["--url", &url, "push", "bad"], b"a\nb\n\nc\n");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("message 3"), "{}", stderr(&o));
    assert!(stderr(&o).contains("pushed 2 message(s)"), "{}", stderr(&o));
    assert_eq!(depth(&url, "bad"), 2);
}

#[test]
fn output_that_fails_gives_back_what_was_not_written() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();

    // A full disk: nothing written, nothing lost, exit code 5.
    let o = run_with_input(&["--url", &url, "push", "full"], &numbers(1000));
    assert!(o.status.success());
    let o = slotq()
        .args(["--url", &url, "pop", "full", "-n", "500"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("No space left"), "{}", stderr(&o));
    assert_eq!(depth(&url, "full"), 1000);

    // At-least-once with --ack: what could not be written is released, not acknowledged.
    let o = run_with_input(&["--url", &url, "push", "--reliable", "rel"], &numbers(20));
    assert!(o.status.success());
    let o = slotq()
        .args(["--url", &url, "pop", "rel", "-n", "5", "--ack"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let o = run(&["--url", &url, "pop", "rel", "-n", "20", "--ack"]);
    assert_eq!(o.stdout.lines().count(), 20, "{}", stderr(&o));

    // A reader that goes away (`| head -1`): no panic, exit 0; what was not written (all
    // but what the pipe took in) goes back.
    let o = run_with_input(&["--url", &url, "push", "pipe"], &numbers(100_000));
    assert!(o.status.success());
    let mut pop = slotq()
        .args(["--url", &url, "pop", "pipe", "-n", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(pop.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // The reader is dropped here: its end of the pipe closes.
    let status = pop.wait().unwrap();
    let mut err = String::new();
    pop.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let left = depth(&url, "pipe");
    assert!(left >= 70_000, "only {left} of 100,000 came back");
}

#[test]
fn a_consumer_stopped_with_sigterm_gives_back_what_it_did_not_write() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let o = run_with_input(&["--url", &url, "push", "work"], &numbers(300_000));
    assert!(o.status.success());
    let mut consume = slotq()
        .args(["--url", &url, "consume", "work"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A slow reader: a pause every 1,000 lines.
    let out = consume.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut n = 0usize;
        for line in BufReader::new(out).lines() {
            line.unwrap();
            n += 1;
            if n.is_multiple_of(1000) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        n
    });
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Command::new("kill")
        .args(["-TERM", &consume.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = consume.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let read = reader.join().unwrap();
    let left = depth(&url, "work");
    eprintln!("read {read}, left in the queue {left}");
    assert!(
        read > 0 && left > 0,
        "stopped mid-way: read {read}, left {left}"
    );
    assert_eq!(read as u64 + left, 300_000);
}

#[test]
fn queues_and_peek_look_without_taking() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let o = run(&["--url", &url, "queues"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, b"no slotq queues on this cluster\n");
    assert!(
        run_with_input(&["--url", &url, "push", "plain"], b"1\n2\n3\n")
            .status
            .success()
    );
    assert!(
        run_with_input(
            &["--url", &url, "push", "--reliable", "sure"],
            b"a\ncaf\xe9\n"
        )
        .status
        .success()
    );

    let o = run(&["--url", &url, "--json", "queues"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["plain", "sure"], "{v}");
    assert_eq!(v[0]["mode"], "at-most-once");
    assert_eq!(v[0]["depth"], 3);
    assert_eq!(v[0]["shards"], 3);
    assert_eq!(v[1]["mode"], "at-least-once");
    assert_eq!(v[1]["depth"], 2);
    assert_eq!(v[1]["in_flight"], 0);

    // The head of each shard, in order; nothing removed.
    let o = run(&["--url", &url, "peek", "plain", "-n", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, b"1\n2\n");
    let o = run(&["--url", &url, "--json", "peek", "sure"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["payload"], "a", "{v}");
    assert_eq!(v[1]["payload_base64"], "Y2Fm6Q==", "{v}");
    assert!(v[0]["id"].is_string());
    assert_eq!(depth(&url, "plain"), 3);
    assert_eq!(depth(&url, "sure"), 2);

    let o = run(&["--url", &url, "peek", "missing"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let o = run(&["--url", &url, "peek", "plain", "-n", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // Delete: refused without --yes (nothing removed), then every key of the queue.
    let o = run(&["--url", &url, "delete", "plain"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
    assert_eq!(depth(&url, "plain"), 3);
    let o = run(&["--url", &url, "--json", "delete", "plain", "--yes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["messages"], 3, "{v}");
    assert_eq!(v["shards"], 3, "{v}");
    let o = run(&["--url", &url, "--json", "queues"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        1,
        "only the other queue is left: {v}"
    );
    assert_eq!(
        run(&["--url", &url, "peek", "plain"]).status.code(),
        Some(4)
    );
}
