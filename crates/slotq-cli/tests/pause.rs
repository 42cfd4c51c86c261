//! `slotq pause` / `slotq resume` as a user runs them.

mod common;

use common::{slotq, text};

use slotq_testkit::ClusterBuilder;

#[test]
fn a_paused_queue_takes_pushes_pops_nothing_and_says_so() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    assert!(
        slotq(&["--url", u, "push", "jobs", "a", "b", "c"])
            .status
            .success()
    );

    let o = slotq(&["--url", u, "pause", "jobs"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).starts_with("paused jobs"),
        "{}",
        text(&o.stdout)
    );
    let o = slotq(&["--url", u, "--json", "pause", "jobs"]);
    assert_eq!(
        text(&o.stdout).trim(),
        r#"{"queue":"jobs","paused":true,"changed":false}"#
    );

    // Producers go on; consumers (a one-off pop too) take nothing, and say why.
    assert!(slotq(&["--url", u, "push", "jobs", "d"]).status.success());
    let o = slotq(&["--url", u, "pop", "jobs", "-n", "4"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "");
    assert!(
        text(&o.stderr).contains("jobs is paused"),
        "{}",
        text(&o.stderr)
    );
    let o = slotq(&["--url", u, "stats", "jobs"]);
    assert!(text(&o.stdout).contains("PAUSED"), "{}", text(&o.stdout));
    assert!(
        text(&o.stdout).contains("total depth 4"),
        "{}",
        text(&o.stdout)
    );
    let o = slotq(&["--url", u, "--json", "queues"]);
    assert!(
        text(&o.stdout).contains(r#""paused":true"#),
        "{}",
        text(&o.stdout)
    );
    let o = slotq(&["--url", u, "queues"]);
    assert!(
        text(&o.stdout).contains("at-most-once, paused"),
        "{}",
        text(&o.stdout)
    );

    let o = slotq(&["--url", u, "resume", "jobs"]);
    assert_eq!(text(&o.stdout), "resumed jobs\n");
    let o = slotq(&["--url", u, "resume", "jobs"]);
    assert_eq!(text(&o.stdout), "jobs was not paused\n");
    let o = slotq(&["--url", u, "pop", "jobs", "-n", "4"]);
    let mut got: Vec<String> = text(&o.stdout).lines().map(str::to_string).collect();
    got.sort();
    assert_eq!(got, ["a", "b", "c", "d"]);

    // A queue that does not exist is not created by a pause.
    let o = slotq(&["--url", u, "pause", "nosuch"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("does not exist"),
        "{}",
        text(&o.stderr)
    );
}
