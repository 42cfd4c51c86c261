//! Placement without servers: lays out a queue on `N` masters with an even slot map and
//! measures what a client pays there (`slotq plan --simulate N`).

use std::time::{Duration, Instant};

use crate::placement::{self, DeliveryMode, ShardSet, shards_per_node};
use crate::topology::{Health, NodeAddr, NodeInfo, Role, Topology};

/// What a simulated placement found.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// Masters laid out.
    pub masters: usize,
    /// Shards per master asked for.
    pub shards_per_master: u32,
    /// Shards placed.
    pub shards: usize,
    /// Fewest and most shards on one master.
    pub per_master: (usize, usize),
    /// Shard numbers tried to find a slot on every master (tags hashed).
    pub search_steps: u64,
    /// Size of the registry hash (field names and values), in bytes: what every client
    /// reads when it opens the queue or sees a new version.
    pub registry_bytes: usize,
    /// Time to plan the placement.
    pub plan_time: Duration,
    /// With a reshard: what a rebalance would do after it.
    pub reshard: Option<ReshardSimulation>,
}

/// What a rebalance would do after part of the slots changed hands.
#[derive(Debug, Clone, PartialEq)]
pub struct ReshardSimulation {
    /// Share of the slots moved, in percent.
    pub percent: f64,
    /// Slots that changed owner.
    pub slots_moved: usize,
    /// Shards whose slot changed owner (they move with their slot, served all along).
    pub shards_moved: usize,
    /// New shards the rebalance would create.
    pub add: usize,
    /// Shards that would drain (a master now has more than its share).
    pub drain: usize,
    /// Draining shards that would become active again.
    pub reactivate: usize,
    /// Time to plan the rebalance.
    pub plan_time: Duration,
}

/// `n` masters on 127.0.0.1 from port 7000, each owning an even range of slots; with
/// `moved_percent`, the first part of every master's range belongs to the next master.
pub fn even_topology(n: usize, moved_percent: f64) -> Topology {
    let nodes: Vec<NodeInfo> = (0..n)
        .map(|i| NodeInfo {
            addr: NodeAddr::new("127.0.0.1", 7000u16.wrapping_add(i as u16)),
            id: None,
            role: Role::Master,
            health: Health::Online,
            master: None,
        })
        .collect();
    let mut ranges = Vec::new();
    for i in 0..n {
        let a = i * 16384 / n;
        let b = (i + 1) * 16384 / n - 1;
        let moved = ((b + 1 - a) as f64 * moved_percent / 100.0).round() as usize;
        if moved > 0 {
            let next = nodes[(i + 1) % n].addr.clone();
            ranges.push((next, a as u16..=(a + moved - 1) as u16));
        }
        if a + moved <= b {
            ranges.push((nodes[i].addr.clone(), (a + moved) as u16..=b as u16));
        }
    }
    Topology::from_parts(nodes, &ranges)
}

/// Places a queue on `masters` masters (`k` shards each) and, with `reshard_percent`,
/// plans the rebalance after that share of every master's slots moved to the next master.
pub fn run(masters: usize, k: u32, reshard_percent: Option<f64>) -> Simulation {
    let topology = even_topology(masters, 0.0);
    let started = Instant::now();
    let shards = placement::plan("queue", &topology, k);
    let plan_time = started.elapsed();
    let counts = shards_per_node(&shards, &topology);
    let set = ShardSet {
        version: 1,
        keyed: shards.iter().map(|s| s.number).collect(),
        shards: shards.clone(),
        shards_per_master: k,
        mode: DeliveryMode::AtMostOnce,
        cleanup: Vec::new(),
        paused: false,
        drop_expired: false,
        priorities: false,
    };
    let registry_bytes = set.to_fields().iter().map(|(f, v)| f.len() + v.len()).sum();
    let reshard = reshard_percent.map(|percent| {
        let after = even_topology(masters, percent);
        let slots_moved = (0..16384u16)
            .filter(|&s| topology.owner(s) != after.owner(s))
            .count();
        let shards_moved = shards
            .iter()
            .filter(|s| topology.owner(s.slot) != after.owner(s.slot))
            .count();
        let started = Instant::now();
        let plan = super::plan::plan("queue", &after, &set);
        ReshardSimulation {
            percent,
            slots_moved,
            shards_moved,
            add: plan.add.len(),
            drain: plan.drain.len(),
            reactivate: plan.reactivate.len(),
            plan_time: started.elapsed(),
        }
    });
    Simulation {
        masters,
        shards_per_master: k,
        shards: shards.len(),
        per_master: (
            counts.values().copied().min().unwrap_or(0),
            counts.values().copied().max().unwrap_or(0),
        ),
        search_steps: shards
            .iter()
            .map(|s| u64::from(s.number) + 1)
            .max()
            .unwrap_or(0),
        registry_bytes,
        plan_time,
        reshard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_masters_get_exactly_k_shards_each() {
        let sim = run(1000, 1, Some(10.0));
        assert_eq!(sim.shards, 1000);
        assert_eq!(sim.per_master, (1, 1));
        let r = sim.reshard.unwrap();
        assert!(r.slots_moved >= 1600 && r.slots_moved <= 2000, "{r:?}");
        // Every master still owns slots: where a moved shard left its old master with none
        // and its new one with two, one drains and one is added; a chain of moves (each
        // master got its neighbour's shard) needs nothing.
        assert!(r.shards_moved > 0, "{r:?}");
        assert_eq!(r.drain, r.add, "{r:?}");
        assert!(r.drain <= r.shards_moved, "{r:?}");
    }

    #[test]
    fn resharding_nothing_changes_nothing() {
        let r = run(30, 2, Some(0.0)).reshard.unwrap();
        assert_eq!((r.slots_moved, r.add, r.drain), (0, 0, 0));
    }
}
