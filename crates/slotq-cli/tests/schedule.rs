//! `slotq push --delay / --at` and `slotq cancel` as a user runs them: ids printed for
//! cancelling, messages held until due (also when the pushing process is long gone), bad
//! times and ids refused before anything changes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{slotq, text};

use slotq_testkit::ClusterBuilder;

fn scheduled(u: &str, q: &str) -> u64 {
    let o = slotq(&["--url", u, "--json", "stats", q]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["scheduled"].as_u64().unwrap())
        .sum()
}

#[test]
fn scheduled_pushes_wait_for_their_time_and_cancel_by_id() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();

    // Bad input first: nothing is created or stored.
    for args in [
        &["push", "jobs", "--delay", "soon", "x"][..],
        &["push", "jobs", "--at", "tomorrow", "x"],
        &[
            "push",
            "jobs",
            "--delay",
            "1s",
            "--at",
            "2030-01-01T00:00:00Z",
            "x",
        ],
        &["push", "jobs", "--delay", "1s", "--dedup-id", "d", "x"],
    ] {
        let mut all = vec!["--url", u];
        all.extend_from_slice(args);
        let o = slotq(&all);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
    }
    let o = slotq(&[
        "--url",
        u,
        "push",
        "jobs",
        "--at",
        "2001-01-01T00:00:00Z",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("in the past"),
        "{}",
        text(&o.stderr)
    );
    let o = slotq(&["--url", u, "push", "jobs", "--delay", "300y", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert_eq!(scheduled(u, "jobs"), 0);

    // Two messages due in 1.5 s: their ids on stdout, the count on stderr.
    let sent = Instant::now();
    let o = slotq(&["--url", u, "push", "jobs", "--delay", "1.5s", "a", "b"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let ids: Vec<String> = text(&o.stdout).lines().map(str::to_owned).collect();
    assert_eq!(ids.len(), 2, "{}", text(&o.stdout));
    assert!(ids.iter().all(|id| id.len() == 32), "{ids:?}");
    assert!(text(&o.stderr).contains("scheduled 2 message(s)"));
    // One at a fixed time, then cancelled by its id.
    let at = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(60));
    let at = at.to_string();
    let o = slotq(&["--url", u, "--json", "push", "jobs", "--at", &at, "c"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let doomed = v["ids"][0].as_str().unwrap().to_owned();
    assert_eq!(scheduled(u, "jobs"), 3);
    let o = slotq(&["--url", u, "cancel", "jobs", "nothex"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let o = slotq(&["--url", u, "cancel", "jobs", &doomed]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout),
        "cancelled 1 scheduled message(s) of jobs\n"
    );
    let o = slotq(&["--url", u, "cancel", "jobs", &doomed]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains(&doomed));
    assert_eq!(scheduled(u, "jobs"), 2);

    // Not before their time: a pop now finds nothing; a wait gets both once due (the
    // pushing process exited long ago: the consumer promotes them).
    let o = slotq(&["--url", u, "pop", "jobs", "-n", "2"]);
    assert_eq!(text(&o.stdout), "");
    let o = slotq(&["--url", u, "pop", "jobs", "-n", "2", "--wait", "10"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut got: Vec<String> = text(&o.stdout).lines().map(str::to_owned).collect();
    got.sort();
    assert_eq!(got, ["a", "b"]);
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "arrived after {took:?}"
    );
    assert_eq!(scheduled(u, "jobs"), 0);

    // A consumer already idle gets a message whose producer exited before it was due
    // (found by the consumer's own poll, at most a poll late).
    let mut consume = Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(["--url", u, "consume", "jobs", "--count", "1"])
        .env_remove("SLOTQ_URL")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    let o = slotq(&["--url", u, "push", "jobs", "--delay", "1s", "z"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while consume.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "never delivered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = consume.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "z\n");
    let took = sent.elapsed();
    eprintln!("producer gone: delivered {took:?} after a 1 s delay");
    assert!(took >= Duration::from_millis(950), "{took:?}");
}
