//! The cluster's slot map: which master serves which slot, its replicas, node health.
//!
//! Built from `CLUSTER SHARDS` (Redis 7+), or `CLUSTER SLOTS` on older servers; a
//! standalone server is a topology of one node owning every slot. Gaps in coverage are
//! kept visible ([`Topology::gaps`]), never papered over. A `Topology` is immutable; the
//! router swaps in a new one (or a copy with one slot changed after a MOVED).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;

use redis::Value;

use crate::error::{Error, Result};
use crate::slot::{SLOT_COUNT, Slot};

pub use crate::node_addr::NodeAddr;

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

    /// Parses a `CLUSTER SHARDS` reply from the node at `asked`. `tls` picks each node's
    /// `tls-port`. A node listed without an address (a node that never heard its own
    /// address from a peer: the only node of a one-master cluster) is the node asked, at
    /// the host it was reached on.
    pub fn from_cluster_shards(reply: &Value, tls: bool, asked: &NodeAddr) -> Result<Self> {
        let shards = as_array(reply).ok_or_else(|| bad("CLUSTER SHARDS: not an array"))?;
        let mut nodes: Vec<NodeInfo> = Vec::new();
        let mut ranges = Vec::new();
        for shard in shards {
            let fields = as_map(shard).ok_or_else(|| bad("CLUSTER SHARDS: shard not a map"))?;
            let slots = fields
                .get("slots")
                .and_then(|v| as_array(v))
                .ok_or_else(|| bad("CLUSTER SHARDS: no slots"))?;
            let slot_nums: Vec<i64> = slots.iter().filter_map(as_int).collect();
            let shard_nodes = fields
                .get("nodes")
                .and_then(|v| as_array(v))
                .ok_or_else(|| bad("CLUSTER SHARDS: no nodes"))?;
            let mut members = Vec::new();
            for n in shard_nodes {
                let f = as_map(n).ok_or_else(|| bad("CLUSTER SHARDS: node not a map"))?;
                let port = if tls {
                    f.get("tls-port").copied().and_then(as_int)
                } else {
                    f.get("port").copied().and_then(as_int)
                }
                .or_else(|| f.get("port").copied().and_then(as_int))
                .ok_or_else(|| bad("CLUSTER SHARDS: node without port"))?;
                let host = ["endpoint", "ip", "hostname"]
                    .iter()
                    .filter_map(|k| f.get(*k).copied().and_then(as_string))
                    .find(|h| known_host(h))
                    .unwrap_or_else(|| asked.host.clone());
                let role = match f.get("role").copied().and_then(as_string).as_deref() {
                    Some("master") => Role::Master,
                    _ => Role::Replica,
                };
                let health = match f.get("health").copied().and_then(as_string).as_deref() {
                    Some("online") => Health::Online,
                    Some("loading") => Health::Loading,
                    _ => Health::Failed,
                };
                members.push(NodeInfo {
                    addr: NodeAddr::new(host, port as u16),
                    id: f.get("id").copied().and_then(as_string),
                    role,
                    health,
                    master: None,
                });
            }
            // A shard whose master failed and was not yet replaced may list no master;
            // keep its nodes but it owns its slots only through a master.
            let master = members
                .iter()
                .find(|m| m.role == Role::Master)
                .map(|m| m.addr.clone());
            for m in &mut members {
                if m.role == Role::Replica {
                    m.master = master.clone();
                }
            }
            if let Some(master) = &master {
                for pair in slot_nums.chunks(2) {
                    if let [a, b] = pair {
                        ranges.push((master.clone(), (*a as Slot)..=(*b as Slot)));
                    }
                }
            }
            for m in members {
                if !nodes.iter().any(|n| n.addr == m.addr) {
                    nodes.push(m);
                }
            }
        }
        Ok(Topology::from_parts(nodes, &ranges))
    }

    /// Parses a `CLUSTER SLOTS` reply from the node at `asked` (health is not reported
    /// there: all online). An empty host is the host `asked` was reached on, as Redis
    /// documents it.
    pub fn from_cluster_slots(reply: &Value, asked: &NodeAddr) -> Result<Self> {
        let entries = as_array(reply).ok_or_else(|| bad("CLUSTER SLOTS: not an array"))?;
        let mut nodes: Vec<NodeInfo> = Vec::new();
        let mut ranges = Vec::new();
        for e in entries {
            let parts = as_array(e).ok_or_else(|| bad("CLUSTER SLOTS: entry not an array"))?;
            if parts.len() < 3 {
                return Err(bad("CLUSTER SLOTS: short entry"));
            }
            let start = as_int(&parts[0]).ok_or_else(|| bad("CLUSTER SLOTS: start"))?;
            let end = as_int(&parts[1]).ok_or_else(|| bad("CLUSTER SLOTS: end"))?;
            let mut master = None;
            for (i, n) in parts[2..].iter().enumerate() {
                let f = as_array(n).ok_or_else(|| bad("CLUSTER SLOTS: node"))?;
                let host = f
                    .first()
                    .and_then(as_string)
                    .filter(|h| known_host(h))
                    .unwrap_or_else(|| asked.host.clone());
                let port = f.get(1).and_then(as_int).unwrap_or(0) as u16;
                let addr = NodeAddr::new(host, port);
                if i == 0 {
                    master = Some(addr.clone());
                }
                if !nodes.iter().any(|x| x.addr == addr) {
                    nodes.push(NodeInfo {
                        addr: addr.clone(),
                        id: f.get(2).and_then(as_string),
                        role: if i == 0 { Role::Master } else { Role::Replica },
                        health: Health::Online,
                        master: if i == 0 { None } else { master.clone() },
                    });
                }
            }
            if let Some(m) = master {
                ranges.push((m, (start as Slot)..=(end as Slot)));
            }
        }
        Ok(Topology::from_parts(nodes, &ranges))
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

/// Whether a node's address field names a host (Redis writes "" or "?" when it does not
/// know it).
fn known_host(h: &str) -> bool {
    !h.is_empty() && h != "?"
}

fn bad(msg: &str) -> Error {
    Error::Protocol(msg.to_string())
}

fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

pub(crate) fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A RESP2 flat key/value array or a RESP3 map, as a lookup table.
fn as_map(v: &Value) -> Option<BTreeMap<String, &Value>> {
    match v {
        Value::Map(pairs) => Some(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((as_string(k)?, v)))
                .collect(),
        ),
        Value::Array(items) => Some(
            items
                .chunks(2)
                .filter_map(|c| match c {
                    [k, v] => Some((as_string(k)?, v)),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn node(id: &str, port: i64, role: &str, health: &str) -> Value {
        Value::Array(vec![
            bulk("id"),
            bulk(id),
            bulk("port"),
            Value::Int(port),
            bulk("ip"),
            bulk("127.0.0.1"),
            bulk("endpoint"),
            bulk("127.0.0.1"),
            bulk("role"),
            bulk(role),
            bulk("replication-offset"),
            Value::Int(0),
            bulk("health"),
            bulk(health),
        ])
    }

    fn shard(slots: &[i64], nodes: Vec<Value>) -> Value {
        Value::Array(vec![
            bulk("slots"),
            Value::Array(slots.iter().map(|s| Value::Int(*s)).collect()),
            bulk("nodes"),
            Value::Array(nodes),
        ])
    }

    #[test]
    fn parses_cluster_shards_with_gap() {
        let reply = Value::Array(vec![
            shard(
                &[0, 5000, 5002, 8000],
                vec![
                    node("a", 7000, "master", "online"),
                    node("b", 7003, "replica", "online"),
                ],
            ),
            shard(&[8001, 16383], vec![node("c", 7001, "master", "failed")]),
        ]);
        let t = Topology::from_cluster_shards(&reply, false, &NodeAddr::new("127.0.0.1", 7000))
            .unwrap();
        let a = NodeAddr::new("127.0.0.1", 7000);
        let c = NodeAddr::new("127.0.0.1", 7001);
        assert_eq!(t.owner(0), Some(&a));
        assert_eq!(t.owner(5001), None);
        assert_eq!(t.owner(16383), Some(&c));
        assert_eq!(t.gaps(), vec![5001..=5001]);
        assert_eq!(t.slot_ranges(&a), vec![0..=5000, 5002..=8000]);
        assert_eq!(t.slot_count(&a), 8000);
        assert_eq!(t.masters().len(), 2);
        assert_eq!(t.replicas_of(&a)[0].addr.port, 7003);
        assert_eq!(t.node(&c).unwrap().health, Health::Failed);
    }

    #[test]
    fn a_node_without_an_address_is_the_node_asked() {
        // The only node of a one-master cluster never heard its address from a peer.
        let reply = Value::Array(vec![shard(
            &[0, 16383],
            vec![Value::Array(vec![
                bulk("id"),
                bulk("n1"),
                bulk("port"),
                Value::Int(7200),
                bulk("ip"),
                bulk(""),
                bulk("endpoint"),
                bulk(""),
                bulk("role"),
                bulk("master"),
                bulk("health"),
                bulk("online"),
            ])],
        )]);
        let asked = NodeAddr::new("localhost", 7200);
        let t = Topology::from_cluster_shards(&reply, false, &asked).unwrap();
        assert_eq!(t.owner(0), Some(&asked));
        assert_eq!(t.owner(16383), Some(&asked));

        let slots = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![bulk(""), Value::Int(7200), bulk("n1")]),
        ])]);
        let t = Topology::from_cluster_slots(&slots, &asked).unwrap();
        assert_eq!(t.owner(8000), Some(&asked));
    }

    #[test]
    fn parses_cluster_slots() {
        let entry = |a: i64, b: i64, port: i64, rport: i64| {
            Value::Array(vec![
                Value::Int(a),
                Value::Int(b),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(port), bulk("id")]),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(rport), bulk("rid")]),
            ])
        };
        let reply = Value::Array(vec![
            entry(0, 8191, 7000, 7002),
            entry(8192, 16383, 7001, 7003),
        ]);
        let t = Topology::from_cluster_slots(&reply, &NodeAddr::new("127.0.0.1", 7000)).unwrap();
        assert!(t.gaps().is_empty());
        assert_eq!(t.owner(8192).unwrap().port, 7001);
        assert_eq!(t.nodes().len(), 4);
    }

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
