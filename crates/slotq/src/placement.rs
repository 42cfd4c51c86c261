//! Where a queue's shards live: names, keys, the deterministic placement plan, and the
//! shard registry as stored in Redis.
//!
//! A shard is a tag `<queue>#<n>`; all its keys carry `{<queue>#<n>}`, so they share one
//! slot. `n` is chosen so that the slot is owned by the master the shard is meant for. The
//! registry `<prefix>:{<queue>}:meta` (a hash) lists the shards in creation order with a
//! version that bumps on every change; every client reads the same list.

use std::collections::{BTreeMap, HashSet};

use crate::error::{Error, Result};
use crate::slot::{Slot, shard_tag, tag_slot};
use crate::topology::{NodeAddr, Topology};

/// Key prefix of every key slotq writes.
pub const DEFAULT_PREFIX: &str = "slotq";
/// Shards per master when a queue is created. One shard per master already spreads a queue
/// over every master; more shards per master add no server parallelism (a master runs
/// commands one at a time) but multiply blocking connections per consumer.
pub const DEFAULT_SHARDS_PER_MASTER: u32 = 1;
/// Longest queue name.
pub const MAX_QUEUE_NAME_LEN: usize = 128;
/// Registry format written by this version.
pub const REGISTRY_FORMAT: u32 = 1;

/// Checks a queue name: 1..=128 characters from `[A-Za-z0-9_.:-]`.
pub fn validate_queue_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::InvalidQueueName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_QUEUE_NAME_LEN {
        return bad(&format!("longer than {MAX_QUEUE_NAME_LEN} bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return bad(&format!(
            "character {c:?} is not allowed (use A-Z a-z 0-9 _ . : -; slotq adds hash tags itself)"
        ));
    }
    Ok(())
}

/// The registry key of a queue.
pub fn meta_key(prefix: &str, queue: &str) -> String {
    format!("{prefix}:{{{queue}}}:meta")
}

/// The ready list of a shard.
pub fn ready_key(prefix: &str, tag: &str) -> String {
    shard_key(prefix, tag, "ready")
}

/// A key of a shard: `<prefix>:{<tag>}:<kind>` (ready, leases, inflight, acks, delayed,
/// dead, leaseseq).
pub fn shard_key(prefix: &str, tag: &str, kind: &str) -> String {
    format!("{prefix}:{{{tag}}}:{kind}")
}

/// Whether a shard takes new messages (see `rebalance` for the life of a shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardState {
    /// Receives pushes and is popped.
    Active,
    /// Receives no unkeyed pushes (keyed ones still, for the keys it holds); popped until
    /// empty.
    Draining,
    /// Being retired: receives no pushes at all (keyed sends for its keys wait until its
    /// keys have moved); popped until empty, then removed from the registry.
    Retiring,
}

/// One shard of a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// `<queue>#<n>`.
    pub tag: String,
    /// The `n` of the tag.
    pub number: u32,
    /// The slot of the tag (of every key of the shard).
    pub slot: Slot,
    /// Active or draining.
    pub state: ShardState,
}

impl Shard {
    /// The shard numbered `number` of `queue`.
    pub fn new(queue: &str, number: u32, state: ShardState) -> Shard {
        let tag = shard_tag(queue, number);
        Shard {
            slot: tag_slot(&tag),
            tag,
            number,
            state,
        }
    }
}

/// How a queue hands out messages; fixed when the queue is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Plain list pops: fastest; a consumer that dies loses what it popped.
    AtMostOnce,
    /// Pops take leases; unacknowledged messages come back after the lease expires, and go
    /// to the shard's dead letters after `max_attempts` deliveries.
    AtLeastOnce {
        /// Deliveries before a message is dead-lettered.
        max_attempts: u32,
    },
}

/// Deliveries before a message is dead-lettered, by default.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// A queue's shards as recorded in its registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSet {
    /// Bumped on every change.
    pub version: u64,
    /// Shards in creation order.
    pub shards: Vec<Shard>,
    /// Target number of active shards per master.
    pub shards_per_master: u32,
    /// At-most-once or at-least-once.
    pub mode: DeliveryMode,
    /// Where keyed messages go: key bucket `b` (`jump_hash(fnv1a(key), keyed.len())`) is
    /// served by the shard numbered `keyed[b]`. Fixed in length when the queue is created;
    /// a bucket moves to another shard only when its shard is retired (empty), so the
    /// messages of one key never wait on two shards at once.
    pub keyed: Vec<u32>,
    /// Shards removed from the set whose leftovers (late pushes, leases, delayed and dead
    /// messages) are not moved to a live shard yet, nor their keys deleted: recorded in the
    /// same registry version that removes them, so that a rebalance cut short between the
    /// two steps is finished by the next one instead of forgetting them.
    pub cleanup: Vec<u32>,
    /// Paused (`Queue::pause`): consumers take nothing new until it is resumed; producers
    /// go on sending.
    pub paused: bool,
    /// At-least-once queues: an expired message is acknowledged (dropped and counted)
    /// instead of dead-lettered with reason `expired` (`QueueBuilder::drop_expired`; fixed
    /// at creation). At-most-once queues always drop them.
    pub drop_expired: bool,
    /// Every shard has a ready list per priority level (see [`crate::priority`]); fixed
    /// when the queue is created.
    pub priorities: bool,
}

impl ShardSet {
    /// Shards that take pushes, in creation order.
    pub fn active(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter().filter(|s| s.state == ShardState::Active)
    }

    /// Hash fields of the registry.
    pub fn to_fields(&self) -> Vec<(String, String)> {
        let list = |state| {
            self.shards
                .iter()
                .filter(|s| s.state == state)
                .map(|s| s.number.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        vec![
            ("format".into(), REGISTRY_FORMAT.to_string()),
            ("version".into(), self.version.to_string()),
            (
                "shards_per_master".into(),
                self.shards_per_master.to_string(),
            ),
            ("active".into(), list(ShardState::Active)),
            ("draining".into(), list(ShardState::Draining)),
            ("retiring".into(), list(ShardState::Retiring)),
            (
                "cleanup".into(),
                self.cleanup
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            (
                "keyed".into(),
                self.keyed
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            (
                "mode".into(),
                match self.mode {
                    DeliveryMode::AtMostOnce => "at-most-once".into(),
                    DeliveryMode::AtLeastOnce { .. } => "at-least-once".into(),
                },
            ),
            (
                "max_attempts".into(),
                match self.mode {
                    DeliveryMode::AtMostOnce => "0".into(),
                    DeliveryMode::AtLeastOnce { max_attempts } => max_attempts.to_string(),
                },
            ),
            ("paused".into(), if self.paused { "1" } else { "0" }.into()),
            (
                "expired".into(),
                if self.drop_expired { "drop" } else { "dead" }.into(),
            ),
            (
                "priorities".into(),
                if self.priorities { "1" } else { "0" }.into(),
            ),
        ]
    }

    /// Reads the registry hash of `queue`.
    pub fn from_fields(queue: &str, fields: &BTreeMap<String, String>) -> Result<ShardSet> {
        let bad = |what: &str| Error::Protocol(format!("registry of {queue:?}: {what}"));
        let num = |k: &str| -> Result<u64> {
            fields
                .get(k)
                .ok_or_else(|| bad(&format!("missing {k}")))?
                .parse()
                .map_err(|_| bad(&format!("bad {k}")))
        };
        let numbers = |k: &str| -> Result<Vec<u32>> {
            fields
                .get(k)
                .map(|v| {
                    v.split_whitespace()
                        .map(|n| n.parse().map_err(|_| bad(k)))
                        .collect()
                })
                .unwrap_or(Ok(Vec::new()))
        };
        let mut shards: Vec<Shard> = numbers("active")?
            .into_iter()
            .map(|n| Shard::new(queue, n, ShardState::Active))
            .collect();
        for (field, state) in [
            ("draining", ShardState::Draining),
            ("retiring", ShardState::Retiring),
        ] {
            shards.extend(
                numbers(field)?
                    .into_iter()
                    .map(|n| Shard::new(queue, n, state)),
            );
        }
        if shards.is_empty() {
            return Err(bad("no shards"));
        }
        // Registries written before the keyed layout: keys follow the active shards.
        let mut keyed = numbers("keyed")?;
        if keyed.is_empty() {
            keyed = shards
                .iter()
                .filter(|s| s.state == ShardState::Active)
                .map(|s| s.number)
                .collect();
        }
        if keyed.iter().any(|n| !shards.iter().any(|s| s.number == *n)) {
            return Err(bad(
                "keyed layout names a shard that is not in the registry",
            ));
        }
        let mode = match fields.get("mode").map(String::as_str) {
            None | Some("at-most-once") => DeliveryMode::AtMostOnce,
            Some("at-least-once") => DeliveryMode::AtLeastOnce {
                max_attempts: num("max_attempts")?.max(1) as u32,
            },
            Some(other) => return Err(bad(&format!("unknown mode {other:?}"))),
        };
        Ok(ShardSet {
            version: num("version")?,
            shards,
            shards_per_master: num("shards_per_master")? as u32,
            mode,
            keyed,
            cleanup: numbers("cleanup")?,
            paused: fields.get("paused").is_some_and(|v| v == "1"),
            drop_expired: fields.get("expired").is_some_and(|v| v == "drop"),
            priorities: fields.get("priorities").is_some_and(|v| v == "1"),
        })
    }

    /// The shard that serves keyed messages with this key hash.
    pub fn keyed_shard(&self, key_hash: u64) -> Option<&Shard> {
        let n = *self.keyed.get(jump_hash(key_hash, self.keyed.len()))?;
        self.shards.iter().find(|s| s.number == n)
    }

    /// A shard by number.
    pub fn shard(&self, number: u32) -> Option<&Shard> {
        self.shards.iter().find(|s| s.number == number)
    }
}

/// Plans a new queue: `k` shards on every master that owns slots, each in a distinct slot.
/// Deterministic: the same topology gives the same plan in every process.
pub fn plan(queue: &str, topology: &Topology, k: u32) -> Vec<Shard> {
    extend_plan(queue, topology, k, &[])
}

/// Shards to add so that every master serves at least `k` active shards, given the
/// existing ones (whose numbers and slots are not reused).
pub fn extend_plan(queue: &str, topology: &Topology, k: u32, existing: &[Shard]) -> Vec<Shard> {
    let mut need: BTreeMap<NodeAddr, u32> = topology
        .masters()
        .into_iter()
        .map(|m| (m.addr.clone(), k))
        .collect();
    for s in existing.iter().filter(|s| s.state == ShardState::Active) {
        if let Some(n) = topology.owner(s.slot).and_then(|o| need.get_mut(o)) {
            *n = n.saturating_sub(1);
        }
    }
    let mut used_numbers: HashSet<u32> = existing.iter().map(|s| s.number).collect();
    let mut used_slots: HashSet<Slot> = existing.iter().map(|s| s.slot).collect();
    let mut out = Vec::new();
    let mut remaining: u32 = need.values().sum();
    let mut n = 0u32;
    // Each master owns at least one slot, so a tag for it turns up within a bounded search.
    while remaining > 0 && n < 1 << 24 {
        if used_numbers.insert(n) {
            let shard = Shard::new(queue, n, ShardState::Active);
            if let Some(owner) = topology.owner(shard.slot) {
                let want = need.get_mut(owner).expect("owners are masters");
                if *want > 0 && used_slots.insert(shard.slot) {
                    *want -= 1;
                    remaining -= 1;
                    out.push(shard);
                }
            }
        }
        n += 1;
    }
    out
}

/// Per-master shard counts of `shards` under `topology` (masters without shards included).
pub fn shards_per_node(shards: &[Shard], topology: &Topology) -> BTreeMap<NodeAddr, usize> {
    let mut m: BTreeMap<NodeAddr, usize> = topology
        .masters()
        .into_iter()
        .map(|n| (n.addr.clone(), 0))
        .collect();
    for s in shards {
        if let Some(o) = topology.owner(s.slot) {
            *m.entry(o.clone()).or_default() += 1;
        }
    }
    m
}

/// How keyed messages find their shard: FNV-1a of the key, then a jump consistent hash
/// over the active shards.
/// FNV-1a, 64 bit: a stable hash of keys (the same in every process and version).
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Jump consistent hash (Lamping & Veach): a bucket in `0..buckets`; growing the bucket
/// count moves only the keys that must move.
pub fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(n: usize) -> Topology {
        crate::rebalance::simulate::even_topology(n, 0.0)
    }

    #[test]
    fn names() {
        for ok in ["orders", "a", "jobs.high:v2-x_y"] {
            validate_queue_name(ok).unwrap();
        }
        for bad in [
            "",
            "with space",
            "br{ace}",
            "hash#tag",
            "ü",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(
                    validate_queue_name(bad),
                    Err(Error::InvalidQueueName { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(meta_key("slotq", "orders"), "slotq:{orders}:meta");
        assert_eq!(ready_key("slotq", "orders#3"), "slotq:{orders#3}:ready");
    }

    #[test]
    fn plan_puts_k_shards_on_every_master() {
        let t = topo(3);
        let p = plan("orders", &t, 2);
        assert_eq!(p.len(), 6);
        let per = shards_per_node(&p, &t);
        assert!(per.values().all(|&c| c == 2), "{per:?}");
        let slots: HashSet<_> = p.iter().map(|s| s.slot).collect();
        assert_eq!(slots.len(), 6);
        assert_eq!(plan("orders", &t, 2), p, "deterministic");
    }

    #[test]
    fn extension_fills_only_new_masters() {
        let t3 = topo(3);
        let old = plan("q", &t3, 1);
        // A fourth master took the top quarter of the slots.
        let t4 = topo(4);
        let added = extend_plan("q", &t4, 1, &old);
        let all: Vec<Shard> = old.iter().cloned().chain(added.iter().cloned()).collect();
        let per = shards_per_node(&all, &t4);
        assert!(per.values().all(|&c| c >= 1), "{per:?}");
        assert!(
            added
                .iter()
                .all(|s| !old.iter().any(|o| o.number == s.number))
        );
    }

    #[test]
    fn registry_round_trip() {
        let set = ShardSet {
            version: 3,
            shards: vec![
                Shard::new("q", 0, ShardState::Active),
                Shard::new("q", 7, ShardState::Active),
                Shard::new("q", 2, ShardState::Draining),
            ],
            shards_per_master: 1,
            mode: DeliveryMode::AtLeastOnce { max_attempts: 3 },
            keyed: vec![7, 0, 2],
            cleanup: vec![9],
            paused: true,
            drop_expired: false,
            priorities: false,
        };
        let fields: BTreeMap<String, String> = set.to_fields().into_iter().collect();
        assert_eq!(ShardSet::from_fields("q", &fields).unwrap(), set);
        assert_eq!(set.active().count(), 2);
    }

    #[test]
    fn jump_hash_is_stable_and_spreads() {
        assert_eq!(
            jump_hash(fnv1a(b"user-1"), 3),
            jump_hash(fnv1a(b"user-1"), 3)
        );
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            counts[jump_hash(fnv1a(format!("k{i}").as_bytes()), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 9_000), "{counts:?}");
        // Growing 4 -> 5 buckets moves about a fifth of the keys, all to the new bucket.
        let moved = (0..10_000)
            .filter(|i| {
                let h = fnv1a(format!("k{i}").as_bytes());
                let (a, b) = (jump_hash(h, 4), jump_hash(h, 5));
                assert!(a == b || b == 4);
                a != b
            })
            .count();
        assert!((1_500..2_500).contains(&moved), "{moved}");
    }
}
