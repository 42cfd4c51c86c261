//! `slotq push --dedup-id` as a user runs it.

mod common;

use common::{slotq, text};

use slotq_testkit::ClusterBuilder;

#[test]
fn a_dedup_id_is_pushed_once_and_a_second_push_exits_6() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    let o = slotq(&[
        "--url",
        u,
        "push",
        "jobs",
        "--dedup-id",
        "invoice-7",
        "charge",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = slotq(&[
        "--url",
        u,
        "push",
        "jobs",
        "--dedup-id",
        "invoice-7",
        "charge again",
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("duplicate"), "{}", text(&o.stderr));
    // Bad use: no message, two messages, an empty id; nothing pushed.
    let o = slotq(&["--url", u, "push", "jobs", "--dedup-id", "x", "a", "b"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let o = slotq(&["--url", u, "push", "jobs", "--dedup-id", "", "a"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("invalid dedup id"),
        "{}",
        text(&o.stderr)
    );
    let o = slotq(&["--url", u, "pop", "jobs", "-n", "10"]);
    assert_eq!(text(&o.stdout), "charge\n");
}
