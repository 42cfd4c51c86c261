//! `slotq push --header/--ttl` as a user runs them: headers shown by `peek --json`, `pop
//! --json` and `dead list --json`, given to `--exec` handlers in `SLOTQ_HEADERS`; an
//! expired message never printed; bad headers refused before anything is sent.

mod common;

use common::{slotq, text};

use slotq_testkit::ClusterBuilder;

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn headers_and_ttl_through_the_cli() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();

    for bad in ["nokey", "=v", "a b=c"] {
        let o = slotq(&["--url", u, "push", "h", "--header", bad, "m"]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o.stderr));
    }
    let o = slotq(&["--url", u, "push", "h", "--ttl", "0s", "m"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    // Nothing was created by the refused pushes.
    let o = slotq(&["--url", u, "stats", "h"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o.stderr));

    let o = slotq(&[
        "--url",
        u,
        "push",
        "h",
        "--header",
        "content-type=application/json",
        "--header",
        "trace=a=b",
        "--ttl",
        "1h",
        "{\"n\":1}",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let peeked = json(&slotq(&["--url", u, "--json", "peek", "h"]));
    assert_eq!(peeked[0]["headers"]["content-type"], "application/json");
    assert_eq!(peeked[0]["headers"]["trace"], "a=b");
    assert!(peeked[0]["expires_ms"].as_u64().is_some());
    assert_eq!(peeked[0]["payload"], "{\"n\":1}");
    let popped = json(&slotq(&["--url", u, "--json", "pop", "h"]));
    assert_eq!(popped[0]["headers"]["trace"], "a=b");

    // Expired before anyone popped it: never printed.
    let o = slotq(&["--url", u, "push", "h", "--ttl", "200ms", "stale"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    std::thread::sleep(std::time::Duration::from_millis(400));
    let o = slotq(&["--url", u, "pop", "h", "-n", "5"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "");

    // At-least-once: an expired message is a dead letter that says so, headers kept.
    let o = slotq(&[
        "--url",
        u,
        "push",
        "r",
        "--reliable",
        "--header",
        "k=v",
        "--ttl",
        "100ms",
        "late",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let o = slotq(&["--url", u, "pop", "r", "--ack"]);
    assert_eq!(text(&o.stdout), "");
    let dead = json(&slotq(&["--url", u, "--json", "dead", "r", "list"]));
    assert_eq!(dead[0]["reason"], "expired", "{dead}");
    assert_eq!(dead[0]["headers"]["k"], "v");

    // Handlers get the headers as JSON.
    let o = slotq(&["--url", u, "push", "w", "--header", "who=handler", "job"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = slotq(&[
        "--url",
        u,
        "consume",
        "w",
        "--count",
        "1",
        "--exec",
        "printf '%s' \"$SLOTQ_HEADERS\"",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(seen, serde_json::json!({"who": "handler"}));
}

/// `push --priority`: a missing queue is created with priorities, `pop` takes the higher
/// levels first; an unknown level, a queue created without priorities and an
/// at-least-once queue are refused with exit 2 and nothing pushed.
#[test]
fn priorities_through_the_cli() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();

    let o = slotq(&["--url", u, "push", "p", "--priority", "urgent", "m"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("high, normal or low"),
        "{}",
        text(&o.stderr)
    );
    let o = slotq(&["--url", u, "stats", "p"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "nothing created: {}",
        text(&o.stderr)
    );

    for (level, msgs) in [
        ("low", ["l1", "l2"]),
        ("normal", ["n1", "n2"]),
        ("high", ["h1", "h2"]),
    ] {
        let mut args = vec!["--url", u, "push", "p", "--key", "k", "--priority", level];
        args.extend(msgs);
        let o = slotq(&args);
        assert!(o.status.success(), "{level}: {}", text(&o.stderr));
    }
    // peek shows every level, highest first, and says which.
    let v = json(&slotq(&["--url", u, "--json", "peek", "p", "-n", "10"]));
    let seen: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["payload"].as_str().unwrap().to_string(),
                m["priority"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [("h", "high"), ("n", "normal"), ("l", "low")]
        .iter()
        .flat_map(|(p, l)| (1..=2).map(move |i| (format!("{p}{i}"), l.to_string())))
        .collect();
    assert_eq!(seen, want);
    let o = slotq(&["--url", u, "pop", "p", "-n", "6"]);
    assert_eq!(
        text(&o.stdout),
        "h1\nh2\nn1\nn2\nl1\nl2\n",
        "{}",
        text(&o.stderr)
    );

    // A queue created without priorities takes none but normal.
    assert!(slotq(&["--url", u, "push", "flat", "a"]).status.success());
    let o = slotq(&["--url", u, "push", "flat", "--priority", "high", "b"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("without priorities"),
        "{}",
        text(&o.stderr)
    );
    let o = slotq(&["--url", u, "pop", "flat", "-n", "5"]);
    assert_eq!(text(&o.stdout), "a\n");
    let o = slotq(&[
        "--url",
        u,
        "push",
        "rel",
        "--reliable",
        "--priority",
        "low",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let o = slotq(&["--url", u, "stats", "rel"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "nothing created: {}",
        text(&o.stderr)
    );
}
