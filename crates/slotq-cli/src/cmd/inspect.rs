//! Queues as a whole: `slotq queues` (every queue on the cluster), `slotq peek` (the head
//! of each shard, nothing removed) and `slotq delete`.

use slotq::Cluster;
use slotq::redis::{self, Value};

use crate::CliError;
use crate::output::{RawOut, table};

/// Registry keys on every master: `<prefix>:{<queue>}:meta`.
pub(super) async fn queue_names(cluster: &Cluster) -> Result<Vec<String>, CliError> {
    let prefix = slotq::placement::DEFAULT_PREFIX;
    let pattern = format!("{prefix}:{{*}}:meta");
    let mut names = std::collections::BTreeSet::new();
    let masters: Vec<slotq::NodeAddr> = cluster
        .topology()
        .masters()
        .iter()
        .map(|m| m.addr.clone())
        .collect();
    for addr in masters {
        let mut cursor = "0".to_string();
        loop {
            let cmd = redis::cmd("SCAN")
                .arg(&cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .clone();
            let (next, keys): (String, Vec<String>) = cluster.node_query(&addr, &cmd).await?;
            for k in keys {
                if let Some(name) = k
                    .strip_prefix(&format!("{prefix}:{{"))
                    .and_then(|r| r.strip_suffix("}:meta"))
                {
                    names.insert(name.to_string());
                }
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
    }
    Ok(names.into_iter().collect())
}

/// `slotq queues`: every slotq queue on the cluster with its mode, shards and totals.
pub async fn queues(cluster: &Cluster, as_json: bool) -> Result<String, CliError> {
    let mut rows = Vec::new();
    let mut items = Vec::new();
    for name in queue_names(cluster).await? {
        let q = super::queue::open_existing(cluster, &name).await?;
        let stats = q.stats().await?;
        let sum = |f: fn(&slotq::ShardStats) -> Option<u64>| -> Option<u64> {
            stats.iter().map(f).sum::<Option<u64>>()
        };
        let depth: u64 = stats.iter().map(|s| s.depth).sum();
        let (in_flight, dead) = (sum(|s| s.in_flight), sum(|s| s.dead));
        let mode = match q.mode() {
            slotq::DeliveryMode::AtMostOnce => "at-most-once",
            _ => "at-least-once",
        };
        let shards = q.shards().shards.len();
        items.push(crate::json::QueueSummary {
            queue: name.clone(),
            mode,
            shards,
            depth,
            in_flight,
            dead,
            paused: q.is_paused(),
        });
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        rows.push(vec![
            name,
            if q.is_paused() {
                format!("{mode}, paused")
            } else {
                mode.to_string()
            },
            shards.to_string(),
            depth.to_string(),
            opt(in_flight),
            opt(dead),
        ]);
    }
    if as_json {
        return Ok(crate::json::line(&items));
    }
    if rows.is_empty() {
        return Ok("no slotq queues on this cluster\n".into());
    }
    Ok(table(
        &["QUEUE", "MODE", "SHARDS", "DEPTH", "IN FLIGHT", "DEAD"],
        &rows,
    ))
}

/// One message `peek` found: shard, payload, id (at-least-once), headers and deadline, level
/// (queues with priorities).
type Peeked = (
    String,
    Vec<u8>,
    Option<String>,
    Option<slotq::Meta>,
    Option<slotq::Priority>,
);

/// `slotq peek QUEUE [-n N]`: up to N messages from the head of each shard, in order,
/// nothing removed (`LRANGE`; at-least-once frames are opened to their messages).
pub async fn peek(
    cluster: &Cluster,
    queue: &str,
    count: usize,
    null: bool,
    as_json: bool,
) -> Result<String, CliError> {
    if count == 0 {
        return Err(CliError::Usage("-n must be at least 1".into()));
    }
    let q = super::queue::open_existing(cluster, queue).await?;
    let reliable = q.mode() != slotq::DeliveryMode::AtMostOnce;
    let set = q.shards();
    // Queues with priorities: each level's list, highest first (the order pops take them).
    let levels: &[slotq::Priority] = if set.priorities {
        &slotq::priority::LEVELS
    } else {
        &[slotq::Priority::Normal]
    };
    let cmds = set
        .shards
        .iter()
        .flat_map(|s| {
            levels.iter().map(|l| {
                // A frame holds many messages: the first `count` elements hold at least
                // `count` messages.
                let cmd = redis::cmd("LRANGE")
                    .arg(l.ready_key(q.prefix(), &s.tag))
                    .arg(0)
                    .arg(count as i64 - 1)
                    .clone();
                (s.slot, cmd)
            })
        })
        .collect();
    let mut replies = cluster
        .batch(cmds, cluster.default_opts())
        .await
        .into_iter();
    let mut peeked: Vec<Peeked> = Vec::new();
    for s in &set.shards {
        let mut taken = 0;
        for level in levels {
            let r = replies.next().expect("a reply per command");
            let items: Vec<Vec<u8>> = match r? {
                Value::Array(items) => items
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::BulkString(b) => Some(b),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let level = set.priorities.then_some(*level);
            for item in items {
                if reliable {
                    // KEEP entries hold the keys of a shard in place; they are no messages.
                    let Ok(envelopes) = slotq::lease::decode_frame(&item) else {
                        continue;
                    };
                    for e in envelopes {
                        if taken == count {
                            break;
                        }
                        let env = slotq::lease::decode_envelope(e)?;
                        peeked.push((
                            s.tag.clone(),
                            env.payload,
                            Some(env.id.to_string()),
                            env.meta,
                            level,
                        ));
                        taken += 1;
                    }
                } else if taken < count {
                    let (meta, payload) = slotq::meta::read_plain(&item);
                    peeked.push((s.tag.clone(), payload.to_vec(), None, meta, level));
                    taken += 1;
                }
            }
        }
    }
    if as_json {
        let items: Vec<crate::json::Message<'_>> = peeked
            .iter()
            .map(|(shard, payload, id, meta, level)| crate::json::Message {
                shard,
                id: id.clone(),
                attempt: None,
                headers: meta
                    .as_ref()
                    .and_then(|m| crate::json::Headers::of(&m.headers)),
                expires_ms: meta.as_ref().and_then(|m| m.expires_ms),
                priority: level.map(slotq::Priority::as_str),
                payload: crate::json::Payload::of(payload),
            })
            .collect();
        return Ok(crate::json::line(&items));
    }
    let mut out = RawOut::stdout().map_err(|error| CliError::Output {
        error,
        given_back: 0,
    })?;
    let sep = if null { 0 } else { b'\n' };
    if let (_, Some(error)) =
        out.write_items(peeked.iter().map(|(_, p, _, _, _)| p.as_slice()), sep)
    {
        return Err(CliError::Output {
            error,
            given_back: 0,
        });
    }
    Ok(String::new())
}

/// `slotq delete QUEUE --yes`.
pub async fn delete(
    cluster: &Cluster,
    queue: &str,
    yes: bool,
    as_json: bool,
) -> Result<String, CliError> {
    // A delete that was cut short left its tombstone: this one finishes it.
    let q = slotq::Client::from_cluster(cluster.clone())
        .queue(queue)
        .to_finish_a_delete()
        .open()
        .await?;
    if !yes {
        return Err(CliError::Usage(format!(
            "this deletes every message of {queue}; add --yes to do it"
        )));
    }
    let r = q.delete().await?;
    Ok(if as_json {
        crate::json::line(&crate::json::Deleted {
            queue,
            keys: r.keys,
            messages: r.messages,
            shards: r.shards,
        })
    } else {
        format!(
            "deleted {queue}: {} shard(s), {} key(s), {} ready message(s)\n",
            r.shards, r.keys, r.messages
        )
    })
}
