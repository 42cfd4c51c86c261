//! The cluster's slot map: which master serves which slot, its replicas, node health.
//!
//! Built from `CLUSTER SHARDS` (Redis 7+), or `CLUSTER SLOTS` on older servers; a
//! standalone server is a topology of one node owning every slot. Gaps in coverage are
//! kept visible ([`Topology::gaps`]), never papered over. A `Topology` is immutable; the
//! router swaps in a new one (or a copy with one slot changed after a MOVED).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;

use crate::slot::{SLOT_COUNT, Slot};

pub use crate::node_addr::NodeAddr;

mod reply;

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves slots (or could).
    Master,
    /// Replicates a master.
    Replica,
}

/// A node's health as the cluster reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Serving.
    Online,
    /// Marked failed (or failing) by the cluster.
    Failed,
    /// Loading its dataset.
    Loading,
}

/// One node of the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Where to reach it.
    pub addr: NodeAddr,
    /// The cluster node id (absent for a standalone server).
    pub id: Option<String>,
    /// Master or replica.
    pub role: Role,
    /// Health as reported by the cluster.
    pub health: Health,
    /// For a replica: the address of its master.
    pub master: Option<NodeAddr>,
}

const NO_OWNER: u16 = u16::MAX;

/// An immutable slot map.
#[derive(Clone, PartialEq, Eq)]
pub struct Topology {
    nodes: Vec<NodeInfo>,
    /// `owner[slot]` is an index into `nodes`, or `NO_OWNER`.
    owner: Box<[u16]>,
    standalone: bool,
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Topology");
        d.field("standalone", &self.standalone);
        for m in self.masters() {
            d.field(&m.addr.to_string(), &self.slot_ranges(&m.addr));
        }
        d.finish()
    }
}

impl Topology {
    /// A standalone server: one master owning every slot.
    pub fn standalone(addr: NodeAddr) -> Self {
        Topology {
            nodes: vec![NodeInfo {
                addr,
                id: None,
                role: Role::Master,
                health: Health::Online,
                master: None,
            }],
            owner: vec![0; SLOT_COUNT as usize].into_boxed_slice(),
            standalone: true,
        }
    }

    /// Builds a topology from nodes and the slot ranges each master owns.
    pub fn from_parts(nodes: Vec<NodeInfo>, ranges: &[(NodeAddr, RangeInclusive<Slot>)]) -> Self {
        let mut owner = vec![NO_OWNER; SLOT_COUNT as usize].into_boxed_slice();
        for (addr, range) in ranges {
            if let Some(i) = nodes.iter().position(|n| &n.addr == addr) {
                for s in range.clone() {
                    if s < SLOT_COUNT {
                        owner[s as usize] = i as u16;
                    }
                }
            }
        }
        Topology {
            nodes,
            owner,
            standalone: false,
        }
    }

    /// Whether this is a standalone (non-cluster) server.
    pub fn is_standalone(&self) -> bool {
        self.standalone
    }

    /// All nodes, masters and replicas.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// The node with this address.
    pub fn node(&self, addr: &NodeAddr) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| &n.addr == addr)
    }

    /// Masters that own at least one slot, in address order.
    pub fn masters(&self) -> Vec<&NodeInfo> {
        let mut owns = vec![false; self.nodes.len()];
        for &o in self.owner.iter() {
            if o != NO_OWNER {
                owns[o as usize] = true;
            }
        }
        let mut m: Vec<&NodeInfo> = self
            .nodes
            .iter()
            .zip(owns)
            .filter(|(_, owns)| *owns)
            .map(|(n, _)| n)
            .collect();
        m.sort_by(|a, b| a.addr.cmp(&b.addr));
        m
    }

    /// Replicas of the given master.
    pub fn replicas_of(&self, master: &NodeAddr) -> Vec<&NodeInfo> {
        self.nodes
            .iter()
            .filter(|n| n.role == Role::Replica && n.master.as_ref() == Some(master))
            .collect()
    }

    /// Whether `master` has a replica the cluster does not call failed.
    pub fn has_live_replica(&self, master: &NodeAddr) -> bool {
        self.replicas_of(master)
            .iter()
            .any(|r| r.health != Health::Failed)
    }

    /// The master serving `slot`, if any.
    pub fn owner(&self, slot: Slot) -> Option<&NodeAddr> {
        match self.owner.get(slot as usize) {
            Some(&i) if i != NO_OWNER => Some(&self.nodes[i as usize].addr),
            _ => None,
        }
    }

    /// The contiguous slot ranges `addr` serves.
    pub fn slot_ranges(&self, addr: &NodeAddr) -> Vec<RangeInclusive<Slot>> {
        let Some(i) = self.nodes.iter().position(|n| &n.addr == addr) else {
            return Vec::new();
        };
        runs(&self.owner, |o| o == i as u16)
    }

    /// Number of slots `addr` serves.
    pub fn slot_count(&self, addr: &NodeAddr) -> usize {
        self.slot_ranges(addr)
            .iter()
            .map(|r| (*r.end() - *r.start()) as usize + 1)
            .sum()
    }

    /// Slot ranges no master serves.
    pub fn gaps(&self) -> Vec<RangeInclusive<Slot>> {
        runs(&self.owner, |o| o == NO_OWNER)
    }

    /// A copy of this map in which `slot` is served by `addr` (after a MOVED). An unknown
    /// node is added as an online master.
    pub fn with_slot_owner(&self, slot: Slot, addr: &NodeAddr) -> Topology {
        let mut t = self.clone();
        let i = match t.nodes.iter().position(|n| &n.addr == addr) {
            Some(i) => i,
            None => {
                t.nodes.push(NodeInfo {
                    addr: addr.clone(),
                    id: None,
                    role: Role::Master,
                    health: Health::Online,
                    master: None,
                });
                t.nodes.len() - 1
            }
        };
        let node = &mut t.nodes[i];
        node.role = Role::Master;
        node.master = None;
        if let Some(o) = t.owner.get_mut(slot as usize) {
            *o = i as u16;
        }
        t
    }

    /// Slots grouped by owning master (address order), for display.
    pub fn ranges_by_master(&self) -> BTreeMap<NodeAddr, Vec<RangeInclusive<Slot>>> {
        self.masters()
            .into_iter()
            .map(|m| (m.addr.clone(), self.slot_ranges(&m.addr)))
            .collect()
    }
}

fn runs(owner: &[u16], pred: impl Fn(u16) -> bool) -> Vec<RangeInclusive<Slot>> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    for (s, &o) in owner.iter().enumerate() {
        match (pred(o), start) {
            (true, None) => start = Some(s),
            (false, Some(a)) => {
                out.push(a as Slot..=(s - 1) as Slot);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(a) = start {
        out.push(a as Slot..=(owner.len() - 1) as Slot);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_update_copies() {
        let t = Topology::standalone(NodeAddr::new("h", 1));
        assert!(t.is_standalone());
        let moved = t.with_slot_owner(42, &NodeAddr::new("h", 2));
        assert_eq!(moved.owner(42).unwrap().port, 2);
        assert_eq!(moved.owner(43).unwrap().port, 1);
        assert_eq!(t.owner(42).unwrap().port, 1);
    }

    #[test]
    fn node_addr_parse_and_display() {
        assert_eq!(
            NodeAddr::parse("10.0.0.1:7000"),
            Some(NodeAddr::new("10.0.0.1", 7000))
        );
        let v6 = NodeAddr::parse("[::1]:7000").unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "[::1]:7000");
        assert_eq!(NodeAddr::parse("nope"), None);
    }
}
