//! `slotq stats` shows what an operator must act on.

mod common;

use common::{slotq, text};

use slotq_testkit::ClusterBuilder;

/// A registry that names removed shards whose leftovers were not moved (a retirement cut
/// short between its two steps): `stats` says so, and which rebalance finishes it.
#[test]
fn stats_shows_the_leftovers_a_cut_retirement_left() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    assert!(slotq(&["--url", u, "push", "left", "a"]).status.success());
    let o = slotq(&["--url", u, "stats", "left"]);
    assert!(
        !text(&o.stdout).contains("leftovers"),
        "{}",
        text(&o.stdout)
    );
    // The state a cut retirement leaves: shard 9 removed, its leftovers recorded.
    let meta = "slotq:{left}:meta";
    let owner = c.owner_of(slotq::slot::key_slot(meta)).unwrap();
    let version: u64 = c
        .node(owner)
        .cmd(redis::cmd("HGET").arg(meta).arg("version"))
        .unwrap();
    let _: i64 = c
        .node(owner)
        .cmd(
            redis::cmd("HSET")
                .arg(meta)
                .arg("cleanup")
                .arg("9")
                .arg("version")
                .arg(version + 1),
        )
        .unwrap();
    let o = slotq(&["--url", u, "stats", "left"]);
    assert!(
        text(&o.stdout).contains("leftovers of removed shard(s) left#9 not moved yet"),
        "{}",
        text(&o.stdout)
    );
    assert!(
        text(&o.stdout).contains("slotq rebalance left"),
        "{}",
        text(&o.stdout)
    );
    let o = slotq(&["--url", u, "--json", "stats", "left"]);
    assert!(
        text(&o.stdout).contains(r#""cleanup":["left#9"]"#),
        "{}",
        text(&o.stdout)
    );
}
