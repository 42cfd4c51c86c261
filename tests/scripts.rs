//! The lease scripts called by hand, as a test sees a shard from the server's side: a pop
//! of a given lease id (optionally presenting an ordered group's grant) and the release of
//! a lease by name.

use slotq::redis;
use slotq_testkit::TestCluster;

/// `lease_pop.lua` as the library sends it.
pub const LEASE_POP: &str = concat!(
    include_str!("../crates/slotq/src/lua/frames.lua"),
    include_str!("../crates/slotq/src/lua/lease_pop.lua")
);

/// `settle.lua` as the library sends it.
pub const SETTLE: &str = concat!(
    include_str!("../crates/slotq/src/lua/frames.lua"),
    include_str!("../crates/slotq/src/lua/settle.lua")
);

fn key(tag: &str, kind: &str) -> String {
    format!("slotq:{{{tag}}}:{kind}")
}

fn conn(c: &TestCluster, tag: &str) -> redis::Connection {
    let node = c
        .owner_of(slotq::slot::key_slot(key(tag, "ready")))
        .unwrap();
    c.node(node).client().unwrap().get_connection().unwrap()
}

/// A lease of up to `count` messages of shard `tag` named `id` (32 hex digits), into the
/// lease's own list, 30 s long; `grant`: an ordered member's (group, epoch).
pub fn lease_pop(
    c: &TestCluster,
    tag: &str,
    id: &str,
    count: usize,
    grant: Option<(&str, u64)>,
) -> redis::RedisResult<Vec<redis::Value>> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(LEASE_POP).arg(8);
    for kind in [
        "ready", "leases", "inflight", "acks", "delayed", "dead", "count",
    ] {
        cmd.arg(key(tag, kind));
    }
    cmd.arg(key(tag, &format!("lease:{id}")));
    cmd.arg(count)
        .arg(30_000)
        .arg(10)
        .arg(100)
        .arg(id)
        .arg(8 << 20);
    if let Some((group, epoch)) = grant {
        cmd.arg(group).arg(epoch);
    }
    cmd.query(&mut conn(c, tag))
}

/// Releases lease `id` of shard `tag` whole, as a consumer does when the pop's reply was
/// lost; true when the lease was there.
pub fn release_lost(c: &TestCluster, tag: &str, id: &str) -> bool {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(SETTLE).arg(8);
    for kind in [
        "leases", "inflight", "acks", "ready", "delayed", "dead", "count",
    ] {
        cmd.arg(key(tag, kind));
    }
    cmd.arg(key(tag, &format!("lease:{id}")));
    cmd.arg(id).arg("releaseall").arg(0).arg(0).arg(-1);
    let reply: Vec<i64> = cmd.query(&mut conn(c, tag)).unwrap();
    reply[0] >= 0
}

/// The messages of lease `id`'s list, in order, as UTF-8 (envelopes are read loosely: the
/// payloads are found in the frames' bytes, so give them distinct, long enough names).
pub fn payloads_in_lease(c: &TestCluster, tag: &str, id: &str, names: &[String]) -> Vec<String> {
    let items: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(key(tag, &format!("lease:{id}")))
        .arg(0)
        .arg(-1)
        .query(&mut conn(c, tag))
        .unwrap();
    let bytes: Vec<u8> = items.concat();
    let mut found: Vec<(usize, String)> = names
        .iter()
        .filter_map(|n| {
            bytes
                .windows(n.len())
                .position(|w| w == n.as_bytes())
                .map(|at| (at, n.clone()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, n)| n).collect()
}
