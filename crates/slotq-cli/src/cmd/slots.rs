//! `slotq slots`: masters, replicas, slot ranges, slot counts and keys per node.

use serde::Serialize;
use slotq::topology::Health;
use slotq::{Cluster, redis};

use crate::CliError;

use crate::output::{bar, ranges, table};

/// One master's row (also its `--json` shape).
#[derive(Serialize)]
struct MasterRow {
    addr: String,
    id: String,
    slots: usize,
    ranges: String,
    keys: Option<i64>,
    replicas: Vec<Replica>,
}

/// A replica of a master.
#[derive(Serialize)]
struct Replica {
    addr: String,
    health: &'static str,
}

/// `slots --json`.
#[derive(Serialize)]
struct SlotMap<'a> {
    /// `cluster` or `standalone`.
    mode: &'static str,
    masters: &'a [MasterRow],
    /// Slot ranges no master serves.
    uncovered: String,
    /// With `--queue`.
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<PlacementJson<'a>>,
}

/// A queue's placement in `slots --queue --json`.
#[derive(Serialize)]
struct PlacementJson<'a> {
    name: &'a str,
    version: u64,
    shards: Vec<PlacedShard<'a>>,
    per_master: Vec<MasterLoad<'a>>,
    shard_skew: f64,
    depth_skew: f64,
}

#[derive(Serialize)]
struct PlacedShard<'a> {
    tag: &'a str,
    slot: u16,
    master: &'a str,
    depth: u64,
    state: &'static str,
}

#[derive(Serialize)]
struct MasterLoad<'a> {
    master: &'a str,
    shards: usize,
    depth: u64,
}

/// Renders the slot map of `cluster`.
pub async fn run(
    cluster: &Cluster,
    queue: Option<&str>,
    as_json: bool,
) -> Result<String, CliError> {
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
                .map(|r| Replica {
                    addr: r.addr.to_string(),
                    health: health(r.health),
                })
                .collect(),
        });
    }
    let gaps = ranges(&t.gaps());
    if as_json {
        let placement = match queue {
            Some(q) => Some(queue_placement(cluster, q).await?),
            None => None,
        };
        let map = SlotMap {
            mode: if t.is_standalone() {
                "standalone"
            } else {
                "cluster"
            },
            masters: &rows,
            uncovered: gaps,
            queue: placement.as_ref().map(Placement::to_json),
        };
        return Ok(crate::json::line(&map));
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
                        .map(|r| {
                            if r.health == "online" {
                                r.addr.clone()
                            } else {
                                format!("{} ({})", r.addr, r.health)
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
    if let Some(q) = queue {
        out.push_str(&queue_placement(cluster, q).await?.render());
    }
    Ok(out)
}

/// Where a queue's shards sit, per master.
struct Placement {
    queue: String,
    version: u64,
    /// (shard, slot, master, depth, state)
    shards: Vec<(String, u16, String, u64, &'static str)>,
    /// master -> (shards, depth)
    per_master: std::collections::BTreeMap<String, (usize, u64)>,
}

impl Placement {
    fn shard_skew(&self) -> f64 {
        skew(self.per_master.values().map(|v| v.0 as f64))
    }

    fn depth_skew(&self) -> f64 {
        skew(self.shards.iter().map(|s| s.3 as f64))
    }

    fn to_json(&self) -> PlacementJson<'_> {
        PlacementJson {
            name: &self.queue,
            version: self.version,
            shards: self
                .shards
                .iter()
                .map(|(tag, slot, master, depth, state)| PlacedShard {
                    tag,
                    slot: *slot,
                    master,
                    depth: *depth,
                    state,
                })
                .collect(),
            per_master: self
                .per_master
                .iter()
                .map(|(master, (shards, depth))| MasterLoad {
                    master,
                    shards: *shards,
                    depth: *depth,
                })
                .collect(),
            shard_skew: self.shard_skew(),
            depth_skew: self.depth_skew(),
        }
    }

    fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .per_master
            .iter()
            .map(|(m, (n, d))| vec![m.clone(), n.to_string(), d.to_string()])
            .collect();
        let shards: Vec<Vec<String>> = self
            .shards
            .iter()
            .map(|(t, s, m, d, st)| {
                vec![
                    t.clone(),
                    s.to_string(),
                    m.clone(),
                    st.to_string(),
                    d.to_string(),
                ]
            })
            .collect();
        format!(
            "\nqueue {} (registry version {}): shards per master skew {:.2}, depth skew {:.2} (max/min)\n\n{}\n{}",
            self.queue,
            self.version,
            self.shard_skew(),
            self.depth_skew(),
            table(&["MASTER", "SHARDS", "DEPTH"], &rows),
            table(&["SHARD", "SLOT", "MASTER", "STATE", "DEPTH"], &shards)
        )
    }
}

/// max/min of the values (1.0 when all equal; infinite when some are zero and others not).
fn skew(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    let max = v.iter().cloned().fold(0.0, f64::max);
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    if max == 0.0 { 1.0 } else { max / min }
}

/// The queue section of `slots --queue`, on its own.
pub async fn queue_section(cluster: &Cluster, queue: &str) -> Result<String, CliError> {
    Ok(queue_placement(cluster, queue).await?.render())
}

async fn queue_placement(cluster: &Cluster, queue: &str) -> Result<Placement, CliError> {
    let q = super::queue::open_existing(cluster, queue).await?;
    let stats = q.stats().await?;
    let t = cluster.topology();
    let mut per_master: std::collections::BTreeMap<String, (usize, u64)> = t
        .masters()
        .iter()
        .map(|m| (m.addr.to_string(), (0, 0)))
        .collect();
    let mut shards = Vec::new();
    for s in &stats {
        let master = s.node.as_ref().map_or("-".to_string(), |n| n.to_string());
        let e = per_master.entry(master.clone()).or_default();
        e.0 += 1;
        e.1 += s.depth;
        shards.push((
            s.tag.clone(),
            s.slot,
            master,
            s.depth,
            super::queue::state(s.state),
        ));
    }
    Ok(Placement {
        queue: queue.to_string(),
        version: q.shards().version,
        shards,
        per_master,
    })
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Online => "online",
        Health::Failed => "failed",
        // CLUSTER SHARDS says "loading" for a replica that has not reported any
        // replication offset yet (a new replica of an empty master, too).
        Health::Loading => "syncing",
    }
}
