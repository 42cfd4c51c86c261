//! Reading the slot map from a node's reply: `CLUSTER SHARDS` (Redis 7+, RESP2 flat
//! arrays or RESP3 maps) and `CLUSTER SLOTS`. A field Redis leaves empty or `?` (a node
//! that never heard its own address) is the node asked, as Redis documents it.

use std::collections::BTreeMap;

use redis::Value;

use super::{Health, NodeAddr, NodeInfo, Role, Topology};
use crate::error::{Error, Result};
use crate::slot::Slot;

impl Topology {
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
}
