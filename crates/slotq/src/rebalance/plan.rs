//! What a rebalance would change, computed from the registry and the slot map alone (no
//! server is asked, so the same code plans a real queue and a simulated 1000-master one).

use std::collections::{BTreeMap, HashSet};

use crate::placement::{self, Shard, ShardSet, ShardState};
use crate::topology::{NodeAddr, Topology};

/// The changes that bring a queue to exactly `shards_per_master` active shards on every
/// master that owns slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// New shards (active), each in a slot of a master that has too few.
    pub add: Vec<Shard>,
    /// Draining or retiring shards on masters that have too few: active again (cheaper
    /// than a new shard, and their keys stay where they are).
    pub reactivate: Vec<u32>,
    /// Active shards beyond the target on their master: they stop taking unkeyed messages
    /// now and are retired once empty.
    pub drain: Vec<u32>,
}

impl Plan {
    /// Nothing to change.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.reactivate.is_empty() && self.drain.is_empty()
    }

    /// The shard set after the plan (version bumped when anything changed).
    pub fn apply(&self, set: &ShardSet) -> ShardSet {
        let mut next = set.clone();
        if self.is_empty() {
            return next;
        }
        next.version += 1;
        for s in &mut next.shards {
            if self.reactivate.contains(&s.number) {
                s.state = ShardState::Active;
            } else if self.drain.contains(&s.number) {
                s.state = ShardState::Draining;
            }
        }
        next.shards.extend(self.add.iter().cloned());
        next
    }
}

/// Plans the rebalance of `set` under `topology`. Deterministic: every process that plans
/// the same registry and slot map gets the same plan.
///
/// Per master that owns slots, with `k` the target: surplus active shards drain (shards
/// that serve keyed buckets are kept before those that do not, older before newer); a
/// shortfall is made up by reactivating the master's draining or retiring shards first,
/// then by new shards. Shards whose slot no master owns are left alone.
pub fn plan(queue: &str, topology: &Topology, set: &ShardSet) -> Plan {
    let k = set.shards_per_master.max(1) as usize;
    let keyed: HashSet<u32> = set.keyed.iter().copied().collect();
    let mut by_master: BTreeMap<NodeAddr, Vec<&Shard>> = topology
        .masters()
        .into_iter()
        .map(|m| (m.addr.clone(), Vec::new()))
        .collect();
    for s in &set.shards {
        if let Some(list) = topology.owner(s.slot).and_then(|o| by_master.get_mut(o)) {
            list.push(s);
        }
    }
    // Keep keyed shards first, then the oldest (lowest number).
    let rank = |s: &&Shard| (!keyed.contains(&s.number), s.number);
    let mut out = Plan::default();
    for shards in by_master.values() {
        let mut active: Vec<&Shard> = shards
            .iter()
            .copied()
            .filter(|s| s.state == ShardState::Active)
            .collect();
        active.sort_by_key(rank);
        if active.len() > k {
            out.drain.extend(active[k..].iter().map(|s| s.number));
            continue;
        }
        let mut idle: Vec<&Shard> = shards
            .iter()
            .copied()
            .filter(|s| s.state != ShardState::Active)
            .collect();
        idle.sort_by_key(rank);
        out.reactivate
            .extend(idle.iter().take(k - active.len()).map(|s| s.number));
    }
    // New shards for what is still missing; extend_plan counts active shards per master.
    let after = Plan {
        add: Vec::new(),
        ..out.clone()
    }
    .apply(set);
    out.add = placement::extend_plan(queue, topology, set.shards_per_master, &after.shards);
    out
}

/// Where the keyed buckets of retired shards go: each to the active shard that serves the
/// fewest buckets (ties: the lowest number), so buckets spread over what is left.
pub fn reassign_buckets(set: &ShardSet, retired: &[u32]) -> Vec<u32> {
    let active: Vec<u32> = set
        .active()
        .map(|s| s.number)
        .filter(|n| !retired.contains(n))
        .collect();
    let mut keyed = set.keyed.clone();
    if active.is_empty() {
        return keyed;
    }
    let mut load: BTreeMap<u32, usize> = active.iter().map(|&n| (n, 0)).collect();
    for n in &keyed {
        if let Some(c) = load.get_mut(n) {
            *c += 1;
        }
    }
    for b in keyed.iter_mut() {
        if retired.contains(b) {
            let (&to, _) = load
                .iter()
                .min_by_key(|(n, c)| (**c, **n))
                .expect("at least one active shard");
            *b = to;
            *load.get_mut(&to).expect("an active shard") += 1;
        }
    }
    keyed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{DeliveryMode, shards_per_node};

    /// `n` masters with an even slot map.
    fn even(n: usize) -> Topology {
        crate::rebalance::simulate::even_topology(n, 0.0)
    }

    fn created(n: usize, k: u32) -> ShardSet {
        let shards = placement::plan("q", &even(n), k);
        ShardSet {
            version: 1,
            keyed: shards.iter().map(|s| s.number).collect(),
            shards,
            shards_per_master: k,
            mode: DeliveryMode::AtMostOnce,
            cleanup: Vec::new(),
            paused: false,
            drop_expired: false,
            priorities: false,
        }
    }

    fn active_per_master(set: &ShardSet, t: &Topology) -> Vec<usize> {
        let active: Vec<Shard> = set.active().cloned().collect();
        shards_per_node(&active, t).into_values().collect()
    }

    #[test]
    fn a_balanced_queue_needs_nothing() {
        let set = created(3, 2);
        assert!(plan("q", &even(3), &set).is_empty());
    }

    #[test]
    fn growing_adds_and_shrinking_drains_to_exactly_k_per_master() {
        let set = created(3, 1);
        let grown = plan("q", &even(30), &set).apply(&set);
        assert_eq!(active_per_master(&grown, &even(30)), vec![1; 30]);
        let shrunk_plan = plan("q", &even(3), &grown);
        assert_eq!(shrunk_plan.drain.len(), 27, "{shrunk_plan:?}");
        let shrunk = shrunk_plan.apply(&grown);
        assert_eq!(active_per_master(&shrunk, &even(3)), vec![1; 3]);
        // The shards that serve keyed buckets are the ones kept.
        for n in &set.keyed {
            assert_eq!(shrunk.shard(*n).unwrap().state, ShardState::Active);
        }
        // Growing again reactivates the drained shards instead of making new ones.
        let again = plan("q", &even(30), &shrunk);
        assert!(again.add.is_empty(), "{again:?}");
        assert_eq!(again.reactivate.len(), 27);
    }

    #[test]
    fn buckets_of_retired_shards_spread_over_the_least_loaded() {
        let set = created(3, 1);
        let grown = plan("q", &even(6), &set).apply(&set);
        let keyed = reassign_buckets(&grown, &[set.keyed[0], set.keyed[1]]);
        assert_eq!(keyed.len(), 3);
        assert_eq!(keyed[2], set.keyed[2], "untouched bucket stays");
        assert!(keyed[..2].iter().all(|n| !set.keyed[..2].contains(n)));
        assert_ne!(keyed[0], keyed[1], "spread, not piled on one shard");
    }
}
