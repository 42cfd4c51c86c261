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
