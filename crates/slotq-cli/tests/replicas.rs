//! What waits for a replica, as a user meets it through the CLI: a master whose replica
//! is paused (SIGSTOP) confirms nothing, so a durable push fails and a confirmed pop hands
//! nothing out, unless told not to wait.

mod common;

use common::{slotq, text};
use std::process::{Command, Stdio};
use std::time::Duration;

use slotq_testkit::ClusterBuilder;

#[test]
fn with_its_replica_paused_a_master_keeps_nothing_for_good_unless_told_not_to_wait() {
    let c = ClusterBuilder::new()
        .masters(1)
        .replicas(1)
        .start()
        .unwrap();
    let url = c.url();
    let u = url.as_str();
    let o = slotq(&["--url", u, "push", "--reliable", "jobs", "first"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = slotq(&["--url", u, "push", "events", "e1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    let replica = c.replicas_of(c.masters()[0])[0];
    c.node(replica).pause().unwrap();

    // A push to an at-least-once queue waits for the replica, and says it was not confirmed.
    let o = slotq(&["--url", u, "push", "jobs", "second"]);
    assert!(!o.status.success(), "no replica confirmed it");
    assert!(
        text(&o.stderr).contains("replicas acknowledged"),
        "{}",
        text(&o.stderr)
    );
    // Told not to wait, it is acknowledged by the master alone.
    let o = slotq(&["--url", u, "push", "--no-durability", "jobs", "third"]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    // An at-most-once consumer hands out nothing that no replica confirmed popping...
    let consume = Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(["--url", u, "consume", "events", "--count", "1"])
        .env_remove("SLOTQ_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let killed = Command::new("kill")
        .args(["-TERM", &consume.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = consume.wait_with_output().unwrap();
    assert_eq!(
        text(&o.stdout),
        "",
        "nothing handed out: {}",
        text(&o.stderr)
    );
    // ... and pushed back what it popped: told not to wait, a consumer finds it there.
    let o = slotq(&[
        "--url",
        u,
        "consume",
        "events",
        "--count",
        "1",
        "--unconfirmed-pops",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "e1\n");
    c.node(replica).resume().unwrap();
}
