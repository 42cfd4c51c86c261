//! `slotq exporter`: the gauges a Prometheus scrape gets, read from a real cluster.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{slotq, text};

use slotq_testkit::ClusterBuilder;

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(args)
        .env_remove("SLOTQ_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The sum of a family's samples whose labels contain `with`.
fn sum(body: &str, family: &str, with: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(with))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_exporter_serves_queue_and_group_gauges() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    let o = slotq(&["--url", u, "exporter", "--queue", "bad name"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));

    let pushed = slotq(&["--url", u, "push", "ex", "a", "b", "c", "d", "e"]);
    assert!(pushed.status.success());
    let pushed = slotq(&["--url", u, "push", "exr", "--reliable", "x", "y"]);
    assert!(pushed.status.success());
    let o = slotq(&["--url", u, "push", "exr", "--delay", "1h", "later"]);
    assert!(o.status.success());
    // A live group member (it takes what arrives; the queue stays empty).
    let o = slotq(&["--url", u, "push", "exg", "first"]);
    assert!(o.status.success());
    let _member = Kill(spawn(&["--url", u, "consume", "exg"]));

    let mut exporter = Kill(spawn(&["--url", u, "exporter", "--listen", "127.0.0.1:0"]));
    let mut line = String::new();
    BufReader::new(exporter.0.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("slotq exporter: http://")
        .and_then(|r| r.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();

    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        let body = get(&addr, "/metrics");
        if sum(&body, "slotq_group_members", "queue=\"exg\"") >= 1.0 {
            break body;
        }
        assert!(Instant::now() < deadline, "no group member seen: {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("# TYPE slotq_queue_depth gauge"));
    assert_eq!(
        sum(&body, "slotq_queue_depth", "queue=\"ex\""),
        5.0,
        "{body}"
    );
    assert_eq!(
        body.lines()
            .filter(|l| l.starts_with("slotq_queue_depth{queue=\"ex\""))
            .count(),
        3,
        "one sample per shard"
    );
    assert!(body.contains("node=\"127.0.0.1:"), "{body}");
    assert_eq!(sum(&body, "slotq_queue_depth", "queue=\"exr\""), 2.0);
    assert_eq!(sum(&body, "slotq_queue_dead", "queue=\"exr\""), 0.0);
    assert_eq!(sum(&body, "slotq_queue_scheduled", "queue=\"exr\""), 1.0);
    assert_eq!(sum(&body, "slotq_queue_paused", "queue=\"ex\""), 0.0);
    assert_eq!(sum(&body, "slotq_group_lag", "queue=\"exg\""), 0.0);
    assert!(body.contains("slotq_exporter_errors 0"), "{body}");
    assert!(get(&addr, "/other").starts_with("HTTP/1.1 404"));
}
