//! `slotq consume --exec`: slotq as the worker for a handler in any language. Handlers are
//! shell scripts that leave a trace of each run in a directory of their own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
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

fn ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A directory for one test's handler traces, removed on drop.
struct Runs(PathBuf);

impl Runs {
    fn new(name: &str) -> Runs {
        let dir = std::env::temp_dir().join(format!("slotq-worker-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Runs(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Lines of a trace file (empty when it does not exist yet).
    fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.0.join(file))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `slotq consume --exec` in the background, its stderr captured.
fn worker(url: &str, queue: &str, runs: &Runs, handler: &str, extra: &[&str]) -> Child {
    slotq()
        .args(["--url", url, "consume", queue, "--exec", handler])
        .args(extra)
        .env("RUNS", runs.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn sigterm(child: &Child) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

/// Waits (bounded) for the worker to exit; returns its status and stderr.
fn finish(mut child: Child, within: Duration) -> (ExitStatus, String) {
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (depth, in flight, delayed, dead) summed over the queue's shards.
fn totals(url: &str, queue: &str) -> (u64, u64, u64, u64) {
    let o = ok(&["--url", url, "--json", "stats", queue]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let sum = |field: &str| {
        v["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[field].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    (sum("depth"), sum("in_flight"), sum("delayed"), sum("dead"))
}

#[test]
fn exec_settles_by_exit_status_with_backoff_timeouts_and_dead_letters() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let runs = Runs::new("settle");
    // 20 that succeed, one that always fails, one that hangs on its first attempt, and
    // one whose payload is not UTF-8.
    let mut input: Vec<u8> = (0..20)
        .flat_map(|i| format!("ok-{i}\n").into_bytes())
        .collect();
    input.extend_from_slice(b"fail\nslow\ncaf\xe9\n");
    let mut push = slotq()
        .args([
            "--url",
            &url,
            "push",
            "jobs",
            "--reliable",
            "--max-attempts",
            "3",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut push.stdin.take().unwrap(), &input).unwrap();
    assert!(push.wait().unwrap().success());

    let handler = r#"d="$RUNS/$SLOTQ_MESSAGE_ID.$SLOTQ_ATTEMPT"
cat > "$d.payload"
echo "$SLOTQ_QUEUE $SLOTQ_SHARD $(date +%s%N)" > "$d.env"
case "$(cat "$d.payload")" in
  fail) echo "card declined for $SLOTQ_ATTEMPT time(s)" >&2; exit 3 ;;
  slow) [ "$SLOTQ_ATTEMPT" = 1 ] && exec sleep 30 ;;
esac
exit 0"#;
    let w = worker(
        &url,
        "jobs",
        &runs,
        handler,
        &["--concurrency", "4", "--timeout", "1", "--backoff", "0.4"],
    );
    // 20 + 3 (fail) + 2 (slow) + 1 runs, then nothing left anywhere but one dead letter.
    wait_until("every run settled", Duration::from_secs(30), || {
        totals(&url, "jobs") == (0, 0, 0, 1)
            && std::fs::read_dir(runs.path()).unwrap().count() == 2 * 26
    });
    sigterm(&w);
    let (status, err) = finish(w, Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {err}");
    assert!(
        err.contains("ran 26 handler(s): 22 succeeded, 4 failed (1 dead-lettered)"),
        "{err}"
    );
    assert!(err.contains("exited with status 3"), "{err}");
    assert!(err.contains("ran past --timeout 1.0 s"), "{err}");

    // What each run saw: (payload, attempt) -> start time; queue and shard in its env.
    let mut seen: BTreeMap<(Vec<u8>, u32), u128> = BTreeMap::new();
    for entry in std::fs::read_dir(runs.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().unwrap() != "payload" {
            continue;
        }
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let (id, attempt) = stem.split_once('.').unwrap();
        assert_eq!(id.len(), 32, "a message id in hex: {id}");
        let env = std::fs::read_to_string(path.with_extension("env")).unwrap();
        let fields: Vec<&str> = env.split_whitespace().collect();
        assert_eq!(fields[0], "jobs");
        assert!(fields[1].starts_with("jobs#"), "a shard of jobs: {env}");
        let payload = std::fs::read(&path).unwrap();
        let key = (payload, attempt.parse().unwrap());
        assert!(seen.insert(key, fields[2].parse().unwrap()).is_none());
    }
    for i in 0..20 {
        assert!(seen.contains_key(&(format!("ok-{i}").into_bytes(), 1)));
    }
    assert!(
        seen.contains_key(&(b"caf\xe9".to_vec(), 1)),
        "bytes arrive as sent"
    );
    assert!(
        seen.contains_key(&(b"slow".to_vec(), 2)),
        "retried after its timeout"
    );
    let fail = |a: u32| seen[&(b"fail".to_vec(), a)];
    let ms = |ns: u128| ns / 1_000_000;
    assert!(ms(fail(2) - fail(1)) >= 400, "first backoff 0.4 s");
    assert!(ms(fail(3) - fail(2)) >= 800, "second backoff doubled");
    assert_eq!(seen.len(), 26, "no run twice");
    let dead = ok(&["--url", &url, "--json", "dead", "jobs", "list"]);
    let dead: serde_json::Value = serde_json::from_slice(&dead.stdout).unwrap();
    assert_eq!(dead[0]["payload"], "fail");
    assert_eq!(dead[0]["deliveries"], 3);
    // It says why: the handler's exit status and the tail of its stderr (which also
    // reached slotq's own stderr as it was written).
    assert_eq!(dead[0]["reason"], "failed", "{dead}");
    let detail = dead[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("exited with status 3") && detail.contains("card declined for 3 time(s)"),
        "{detail}"
    );
    assert!(dead[0]["died_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(err.contains("card declined for 1 time(s)"), "{err}");
    let table = text(&ok(&["--url", &url, "dead", "jobs", "list"]).stdout);
    assert!(
        table.contains("REASON") && table.contains("failed"),
        "{table}"
    );

    // Replay by id: that letter only, once; a bad id changes nothing.
    let id = dead[0]["id"].as_str().unwrap().to_owned();
    let bad = run(&["--url", &url, "dead", "jobs", "replay", "--id", "xyz"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    assert!(
        text(&bad.stderr).contains("32 hexadecimal digits"),
        "{}",
        text(&bad.stderr)
    );
    let with_list = run(&["--url", &url, "dead", "jobs", "list", "--id", &id]);
    assert_eq!(with_list.status.code(), Some(2));
    assert_eq!(
        totals(&url, "jobs"),
        (0, 0, 0, 1),
        "nothing moved by bad input"
    );
    let moved = ok(&["--url", &url, "dead", "jobs", "replay", "--id", &id]);
    assert_eq!(
        text(&moved.stdout),
        "1 dead letter(s) moved back into jobs\n"
    );
    assert_eq!(totals(&url, "jobs"), (1, 0, 0, 0));
    let again = run(&["--url", &url, "dead", "jobs", "replay", "--id", &id]);
    assert_eq!(again.status.code(), Some(4), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains(&id), "{}", text(&again.stderr));
    assert_eq!(totals(&url, "jobs"), (1, 0, 0, 0), "replayed once");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exec_keeps_leases_while_handlers_run_and_drains_on_sigterm() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let runs = Runs::new("drain");
    ok(&[
        "--url",
        &url,
        "push",
        "long",
        "--reliable",
        "p1",
        "p2",
        "p3",
        "p4",
    ]);
    // Handlers run 2.5 s on a 1 s lease: only the extensions keep their messages.
    // One write per line (handlers run at once and append to the same file).
    let handler = r#"p=$(cat); echo "$SLOTQ_ATTEMPT" >> "$RUNS/started"; sleep 2.5; echo "$p" >> "$RUNS/done""#;
    let w = worker(
        &url,
        "long",
        &runs,
        handler,
        &["--concurrency", "8", "--lease", "1"],
    );
    wait_until("4 handlers running", Duration::from_secs(10), || {
        runs.lines("started").len() == 4
    });
    std::thread::sleep(Duration::from_millis(1500));
    // Past the lease: another consumer's pop would reap an expired lease and get its
    // message.
    let other = ok(&["--url", &url, "pop", "long", "-n", "10", "--wait", "0.2"]);
    assert!(
        other.stdout.is_empty(),
        "leases were kept: {:?}",
        other.stdout
    );
    sigterm(&w);
    let (status, err) = finish(w, Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {err}");
    assert!(
        err.contains("waiting up to 30.0 s for 4 running handler(s)"),
        "{err}"
    );
    assert!(
        err.contains("4 succeeded, 0 failed (0 dead-lettered), 0 lease(s) lost"),
        "{err}"
    );
    let mut done = runs.lines("done");
    done.sort();
    assert_eq!(done, ["p1", "p2", "p3", "p4"], "every handler finished");
    assert_eq!(runs.lines("started"), ["1", "1", "1", "1"]);
    assert_eq!(totals(&url, "long"), (0, 0, 0, 0), "all acknowledged");

    // Handlers that outlast the grace are stopped; their messages are released, not
    // counted as an attempt.
    ok(&["--url", &url, "push", "long", "q1", "q2"]);
    let handler = r#"echo "$SLOTQ_ATTEMPT" >> "$RUNS/started2"; exec sleep 30"#;
    let w = worker(
        &url,
        "long",
        &runs,
        handler,
        &["--concurrency", "4", "--grace", "0.3"],
    );
    wait_until("2 handlers running", Duration::from_secs(10), || {
        runs.lines("started2").len() == 2
    });
    sigterm(&w);
    let (status, err) = finish(w, Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains("0 succeeded, 0 failed"), "{err}");
    assert!(err.contains("2 given back"), "{err}");
    assert_eq!(totals(&url, "long"), (2, 0, 0, 0), "back in the queue");
    let o = ok(&["--url", &url, "--json", "pop", "long", "-n", "2", "--ack"]);
    let popped: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(popped.as_array().unwrap().len(), 2);
    for v in popped.as_array().unwrap() {
        assert_eq!(v["attempt"], 1, "a stopped run is not an attempt: {v}");
    }
}

#[test]
fn exec_on_an_at_most_once_queue_reports_failures_and_gives_back_on_stop() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let runs = Runs::new("plain");
    ok(&["--url", &url, "push", "plain", "good", "bad"]);
    let o = run(&["--url", &url, "consume", "plain", "--exec", "true", "--ack"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--ack needs an at-least-once queue"
    );

    let handler =
        r#"p=$(cat); echo "[$SLOTQ_MESSAGE_ID] $SLOTQ_ATTEMPT $p" >> "$RUNS/ran"; [ "$p" != bad ]"#;
    let w = worker(&url, "plain", &runs, handler, &["--count", "2"]);
    let (status, err) = finish(w, Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {err}");
    let mut ran = runs.lines("ran");
    ran.sort();
    assert_eq!(ran, ["[] 1 bad", "[] 1 good"]);
    assert!(err.contains("exited with status 1"), "{err}");
    assert!(err.contains("is not retried (at-most-once queue)"), "{err}");
    assert!(
        err.contains("ran 2 handler(s): 1 succeeded, 1 failed"),
        "{err}"
    );

    // Stopped mid-run: what was popped goes back to the head of its shard.
    ok(&["--url", &url, "push", "plain", "x1", "x2", "x3"]);
    let handler = r#"echo >> "$RUNS/started"; exec sleep 30"#;
    let w = worker(
        &url,
        "plain",
        &runs,
        handler,
        &["--concurrency", "2", "--grace", "0.2"],
    );
    wait_until("2 handlers running", Duration::from_secs(10), || {
        runs.lines("started").len() == 2
    });
    sigterm(&w);
    let (status, err) = finish(w, Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains("2 given back"), "{err}");
    let o = ok(&["--url", &url, "pop", "plain", "-n", "10"]);
    let mut left: Vec<&str> = std::str::from_utf8(&o.stdout).unwrap().lines().collect();
    left.sort_unstable();
    assert_eq!(left, ["x1", "x2", "x3"], "nothing lost");
}

#[test]
fn exec_options_are_checked_before_anything_runs() {
    let cases: &[&[&str]] = &[
        &["consume", "q", "--concurrency", "2"],
        &["consume", "q", "--timeout", "5"],
        &["consume", "q", "--exec", "true", "-0"],
        &["consume", "q", "--exec", "true", "--timeout", "0"],
        &["consume", "q", "--exec", "true", "--concurrency", "0"],
        &["consume", "q", "--exec", "true", "--backoff", "soon"],
        &["consume", "q", "--lease", "-1"],
    ];
    for args in cases {
        let o = run(&[&["--url", "redis://127.0.0.1:1"], *args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(!o.stderr.is_empty(), "{args:?} says why");
    }
}

#[test]
fn ordered_exec_runs_one_handler_per_shard_in_order_and_retries_in_place() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let runs = Runs::new("ordered");
    for k in 0..3 {
        let mut push = slotq()
            .args([
                "--url",
                &url,
                "push",
                "seq",
                "--reliable",
                "--key",
                &format!("k{k}"),
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let lines: String = (0..8).map(|i| format!("k{k}:{i}\n")).collect();
        std::io::Write::write_all(&mut push.stdin.take().unwrap(), lines.as_bytes()).unwrap();
        assert!(push.wait().unwrap().success());
    }
    // Each run leaves a start and an end line; k1:3 fails its first attempt.
    let handler = r#"p=$(cat)
echo "start $p $SLOTQ_SHARD $SLOTQ_ATTEMPT $(date +%s%N)" >> "$RUNS/log"
sleep 0.1
echo "end $p $SLOTQ_SHARD $SLOTQ_ATTEMPT $(date +%s%N)" >> "$RUNS/log"
[ "$p" = k1:3 ] && [ "$SLOTQ_ATTEMPT" = 1 ] && exit 1
exit 0"#;
    let w = worker(
        &url,
        "seq",
        &runs,
        handler,
        &["--ordered", "--concurrency", "3", "--backoff", "0.3"],
    );
    wait_until("every run ended", Duration::from_secs(30), || {
        runs.lines("log")
            .iter()
            .filter(|l| l.starts_with("end "))
            .count()
            == 25
    });
    sigterm(&w);
    let (status, err) = finish(w, Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains("retrying"), "{err}");
    // (payload, shard, attempt, start, end) per run.
    let mut started: BTreeMap<(String, String), (String, u128)> = BTreeMap::new();
    let mut runs_of: Vec<(String, String, String, u128, u128)> = Vec::new();
    for l in runs.lines("log") {
        let f: Vec<&str> = l.split_whitespace().collect();
        let key = (f[1].to_string(), f[3].to_string());
        let at: u128 = f[4].parse().unwrap();
        if f[0] == "start" {
            started.insert(key, (f[2].to_string(), at));
        } else {
            let (shard, start) = started[&key].clone();
            runs_of.push((f[1].to_string(), shard, f[3].to_string(), start, at));
        }
    }
    assert_eq!(runs_of.len(), 25);
    runs_of.sort_by_key(|r| r.3);
    // One handler per shard at a time.
    let mut last_end: BTreeMap<&str, u128> = BTreeMap::new();
    for (p, shard, _, start, end) in &runs_of {
        if let Some(prev) = last_end.get(shard.as_str()) {
            assert!(
                start >= prev,
                "{p} started on {shard} before the run before it ended"
            );
        }
        last_end.insert(shard, *end);
    }
    // Per key, in order; k1:3's retry before k1:4.
    let order: Vec<String> = runs_of
        .iter()
        .filter(|r| r.0.starts_with("k1:"))
        .map(|r| format!("{}/{}", r.0, r.2))
        .collect();
    let want: Vec<String> = (0..8)
        .flat_map(|i| {
            if i == 3 {
                vec!["k1:3/1".to_string(), "k1:3/2".to_string()]
            } else {
                vec![format!("k1:{i}/1")]
            }
        })
        .collect();
    assert_eq!(order, want);
    for k in [0, 2] {
        let seqs: Vec<String> = runs_of
            .iter()
            .filter(|r| r.0.starts_with(&format!("k{k}:")))
            .map(|r| r.0.clone())
            .collect();
        let want: Vec<String> = (0..8).map(|i| format!("k{k}:{i}")).collect();
        assert_eq!(seqs, want);
    }
}
