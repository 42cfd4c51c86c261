//! Queue commands: `push`, `pop`, `stats`, `plan`, `expand`.

use std::io::BufRead;
use std::time::Duration;

use serde_json::json;
use slotq::placement::{self, ShardState};
use slotq::{Client, Cluster};

use crate::CliError;
use crate::output::table;

/// `slotq push QUEUE [MSG...] [--key K]`.
pub async fn push(
    cluster: &Cluster,
    queue: &str,
    messages: &[String],
    key: Option<&str>,
    as_json: bool,
) -> Result<String, CliError> {
    let q = Client::from_cluster(cluster.clone())
        .queue(queue)
        .open()
        .await?;
    let producer = q.producer().build()?;
    let mut payloads: Vec<Vec<u8>> = messages.iter().map(|m| m.clone().into_bytes()).collect();
    if messages.is_empty() {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let line = line.map_err(|e| CliError::Other(format!("reading stdin: {e}")))?;
            payloads.push(line.into_bytes());
        }
    }
    let n = payloads.len();
    // Refuse the whole input before sending any of it.
    for p in &payloads {
        slotq::producer::check_payload(
            p.len(),
            slotq::producer::DEFAULT_MAX_PAYLOAD,
            slotq::EmptyPayloads::Reject,
        )?;
    }
    match key {
        Some(k) => {
            for p in payloads {
                producer.send_keyed(k, p).await?;
            }
        }
        None => producer.send_batch(payloads).await?,
    }
    Ok(if as_json {
        format!("{}\n", json!({"queue": queue, "pushed": n}))
    } else {
        eprintln!("pushed {n} message(s) to {queue}");
        String::new()
    })
}

/// `slotq pop QUEUE [-n N] [--wait SECS]`.
pub async fn pop(
    cluster: &Cluster,
    queue: &str,
    count: usize,
    wait: f64,
    as_json: bool,
) -> Result<String, CliError> {
    if count == 0 {
        return Err(CliError::Usage("-n must be at least 1".into()));
    }
    if !(0.0..=86_400.0).contains(&wait) {
        return Err(CliError::Usage(
            "--wait must be between 0 and 86400 seconds".into(),
        ));
    }
    let q = Client::from_cluster(cluster.clone())
        .queue(queue)
        .must_exist()
        .open()
        .await?;
    let per_shard = count.div_ceil(q.shards().shards.len().max(1)).max(1);
    let mut consumer = q.consumer().pop_batch(per_shard).build()?;
    let wait = Duration::from_secs_f64(wait).max(Duration::from_millis(1));
    let mut out = Vec::new();
    while out.len() < count {
        let got = consumer
            .recv_batch_timeout(
                count - out.len(),
                if out.is_empty() {
                    wait
                } else {
                    Duration::from_millis(1)
                },
            )
            .await?;
        if got.is_empty() {
            break;
        }
        out.extend(got);
    }
    consumer.close().await;
    Ok(if as_json {
        let items: Vec<_> = out
            .iter()
            .map(|m| json!({"shard": &*m.shard, "payload": String::from_utf8_lossy(&m.payload)}))
            .collect();
        format!("{}\n", serde_json::Value::Array(items))
    } else {
        out.iter()
            .map(|m| format!("{}\n", String::from_utf8_lossy(&m.payload)))
            .collect()
    })
}

/// `slotq stats QUEUE`.
pub async fn stats(cluster: &Cluster, queue: &str, as_json: bool) -> Result<String, CliError> {
    let q = Client::from_cluster(cluster.clone())
        .queue(queue)
        .must_exist()
        .open()
        .await?;
    let stats = q.stats().await?;
    let total: u64 = stats.iter().map(|s| s.depth).sum();
    let set = q.shards();
    if as_json {
        let shards: Vec<_> = stats
            .iter()
            .map(|s| {
                json!({"tag": s.tag, "slot": s.slot, "node": s.node.as_ref().map(|n| n.to_string()),
                       "state": state(s.state), "depth": s.depth})
            })
            .collect();
        return Ok(format!(
            "{}\n",
            json!({"queue": queue, "version": set.version, "shards": shards, "total_depth": total})
        ));
    }
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.tag.clone(),
                s.slot.to_string(),
                s.node.as_ref().map_or("-".into(), |n| n.to_string()),
                state(s.state).into(),
                s.depth.to_string(),
            ]
        })
        .collect();
    Ok(format!(
        "queue {queue}: {} shards, registry version {}\n\n{}\ntotal depth {total}\n",
        stats.len(),
        set.version,
        table(&["SHARD", "SLOT", "NODE", "STATE", "DEPTH"], &rows)
    ))
}

/// `slotq plan QUEUE`: the placement a new queue would get (and, for an existing queue,
/// what `expand` would add).
pub async fn plan(
    cluster: &Cluster,
    queue: &str,
    shards_per_master: u32,
    as_json: bool,
) -> Result<String, CliError> {
    placement::validate_queue_name(queue)?;
    if shards_per_master == 0 {
        return Err(CliError::Usage(
            "--shards-per-master must be at least 1".into(),
        ));
    }
    let topology = cluster.topology();
    let existing = Client::from_cluster(cluster.clone())
        .queue(queue)
        .must_exist()
        .open()
        .await;
    let (kind, shards) = match existing {
        Ok(q) => {
            let set = q.shards();
            let add = placement::extend_plan(queue, &topology, set.shards_per_master, &set.shards);
            ("expand", add)
        }
        Err(slotq::Error::QueueNotFound(_)) => (
            "create",
            placement::plan(queue, &topology, shards_per_master),
        ),
        Err(e) => return Err(e.into()),
    };
    let rows: Vec<(String, u16, String)> = shards
        .iter()
        .map(|s| {
            let node = topology.owner(s.slot).map_or("-".into(), |n| n.to_string());
            (s.tag.clone(), s.slot, node)
        })
        .collect();
    if as_json {
        let items: Vec<_> = rows
            .iter()
            .map(|(t, s, n)| json!({"tag": t, "slot": s, "node": n}))
            .collect();
        return Ok(format!(
            "{}\n",
            json!({"queue": queue, "action": kind, "shards": items})
        ));
    }
    if rows.is_empty() {
        return Ok(format!(
            "queue {queue} exists and every master has its shards: nothing to add\n"
        ));
    }
    let verb = if kind == "create" {
        "would be created with"
    } else {
        "would gain"
    };
    let body: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(t, s, n)| vec![t, s.to_string(), n])
        .collect();
    Ok(format!(
        "queue {queue} {verb} {} shard(s) (dry run, nothing written):\n\n{}",
        body.len(),
        table(&["SHARD", "SLOT", "MASTER"], &body)
    ))
}

/// `slotq expand QUEUE`.
pub async fn expand(cluster: &Cluster, queue: &str, as_json: bool) -> Result<String, CliError> {
    let q = Client::from_cluster(cluster.clone())
        .queue(queue)
        .must_exist()
        .open()
        .await?;
    let report = q.expand().await?;
    Ok(if as_json {
        format!(
            "{}\n",
            json!({"queue": queue, "added": report.added, "version": report.version})
        )
    } else if report.added.is_empty() {
        format!(
            "queue {queue}: every master already has its shards (version {})\n",
            report.version
        )
    } else {
        format!(
            "queue {queue}: added {} (version {})\n",
            report.added.join(", "),
            report.version
        )
    })
}

fn state(s: ShardState) -> &'static str {
    match s {
        ShardState::Active => "active",
        ShardState::Draining => "draining",
    }
}
