//! `slotq slots`: masters, replicas, slot ranges, slot counts and keys per node.

use serde_json::json;
use slotq::topology::Health;
use slotq::{Cluster, Result, redis};

use crate::output::{bar, ranges, table};

/// One master's row.
struct MasterRow {
    addr: String,
    id: String,
    slots: usize,
    ranges: String,
    keys: Option<i64>,
    replicas: Vec<(String, &'static str)>,
}

/// Renders the slot map of `cluster`.
pub async fn run(cluster: &Cluster, as_json: bool) -> Result<String> {
    let t = cluster.topology();
    let mut rows = Vec::new();
    for m in t.masters() {
        let keys = cluster
            .node_query::<i64>(&m.addr, &redis::cmd("DBSIZE"))
            .await
            .ok();
        rows.push(MasterRow {
            addr: m.addr.to_string(),
            id: m.id.clone().unwrap_or_default(),
            slots: t.slot_count(&m.addr),
            ranges: ranges(&t.slot_ranges(&m.addr)),
            keys,
            replicas: t
                .replicas_of(&m.addr)
                .iter()
                .map(|r| (r.addr.to_string(), health(r.health)))
                .collect(),
        });
    }
    let gaps = ranges(&t.gaps());
    if as_json {
        let masters: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "addr": r.addr, "id": r.id, "slots": r.slots, "ranges": r.ranges,
                    "keys": r.keys,
                    "replicas": r.replicas.iter().map(|(a, h)| json!({"addr": a, "health": h})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let v = json!({
            "mode": if t.is_standalone() { "standalone" } else { "cluster" },
            "masters": masters,
            "uncovered": gaps,
        });
        return Ok(format!("{v}\n"));
    }
    let mut out = String::new();
    let mode = if t.is_standalone() {
        "standalone server (one node owns every slot)".to_string()
    } else {
        format!("cluster, {} masters", rows.len())
    };
    out.push_str(&format!("{} — {mode}\n\n", cluster.config().url()));
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.addr.clone(),
                r.slots.to_string(),
                bar(r.slots, 16384, 20),
                r.ranges.clone(),
                r.keys.map_or("?".into(), |k| k.to_string()),
                if r.replicas.is_empty() {
                    "-".into()
                } else {
                    r.replicas
                        .iter()
                        .map(|(a, h)| {
                            if *h == "online" {
                                a.clone()
                            } else {
                                format!("{a} ({h})")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &["MASTER", "SLOTS", "SHARE", "RANGES", "KEYS", "REPLICAS"],
        &body,
    ));
    if gaps.is_empty() {
        out.push_str("\nall 16384 slots covered\n");
    } else {
        out.push_str(&format!("\nUNCOVERED slots: {gaps}\n"));
    }
    Ok(out)
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Online => "online",
        Health::Failed => "failed",
        Health::Loading => "loading",
    }
}
