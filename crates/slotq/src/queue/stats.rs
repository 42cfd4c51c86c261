//! Looking into a queue: per-shard statistics and the dead letters of an at-least-once
//! queue (list, replay, purge).

use std::time::Duration;

use redis::Value;

use super::Queue;
use crate::error::{Error, Result};
use crate::placement::{self, ShardState};
use crate::slot::Slot;
use crate::topology::NodeAddr;

/// One shard's numbers, from [`Queue::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStats {
    /// `<queue>#<n>`.
    pub tag: String,
    /// Its slot.
    pub slot: Slot,
    /// The master serving the slot now.
    pub node: Option<NodeAddr>,
    /// Active or draining.
    pub state: ShardState,
    /// Messages ready.
    pub depth: u64,
    /// Reliable queues: messages leased and not yet settled.
    pub in_flight: Option<u64>,
    /// Reliable queues: dead letters.
    pub dead: Option<u64>,
    /// Reliable queues: messages waiting for a delayed redelivery.
    pub delayed: Option<u64>,
    /// Reliable queues: age of the message at the head of the ready list (producer clock).
    pub oldest_age: Option<Duration>,
}

/// A message in the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its shard.
    pub shard: String,
    /// Its id.
    pub id: crate::lease::MessageId,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// When it was first enqueued (ms since the Unix epoch, producer clock).
    pub enqueued_ms: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Queue {
    /// Depth of every shard (one LLEN per shard, pipelined per node) and where it sits; for
    /// reliable queues also in-flight, delayed and dead counts and the oldest message's age.
    pub async fn stats(&self) -> Result<Vec<ShardStats>> {
        let set = self.reload().await?;
        let cluster = &self.inner.cluster;
        let reliable = set.mode != placement::DeliveryMode::AtMostOnce;
        let mut cmds = Vec::new();
        let mut inflight_calls = Vec::new();
        for s in &set.shards {
            let k = crate::lease::ShardKeys::new(&self.inner.prefix, &s.tag);
            if !reliable {
                cmds.push((s.slot, redis::cmd("LLEN").arg(&k.ready).clone()));
            } else {
                cmds.push((s.slot, redis::cmd("GET").arg(&k.count).clone()));
                cmds.push((s.slot, redis::cmd("LLEN").arg(&k.dead).clone()));
                cmds.push((s.slot, redis::cmd("ZCARD").arg(&k.delayed).clone()));
                cmds.push((s.slot, redis::cmd("LINDEX").arg(&k.ready).arg(0).clone()));
                inflight_calls.push(crate::script::Call {
                    slot: s.slot,
                    script: &self.inner.lease_scripts.inflight,
                    keys: vec![k.acks.clone()],
                    args: Vec::new(),
                });
            }
        }
        let opts = crate::cluster::RequestOpts {
            idempotent: true,
            ..cluster.default_opts()
        };
        let mut replies = cluster.batch(cmds, opts).await.into_iter();
        let mut inflight = crate::script::run_batch(cluster, &inflight_calls, opts)
            .await
            .into_iter();
        let topology = cluster.topology();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut out = Vec::with_capacity(set.shards.len());
        for s in &set.shards {
            let mut next = || replies.next().expect("one reply per command");
            let (mut dead, mut delayed, mut oldest_age, mut in_flight) = (None, None, None, None);
            let depth;
            if reliable {
                // The ready count (a string key; absent before the first push).
                depth = int(next()?)?;
                // Both hold a KEEP entry once the shard was popped (see `lease::KEEP`).
                dead = Some(int(next()?)?.saturating_sub(1));
                delayed = Some(int(next()?)?.saturating_sub(1));
                // The first element: a frame's head (or a frame an older version wrote).
                let first_ms = match next()? {
                    Value::BulkString(f) => match crate::lease::decode_frame_head(&f) {
                        Some(h) => Some(h.first_enqueued_ms).filter(|&ms| ms > 0),
                        None => crate::lease::decode_frame(&f)
                            .ok()
                            .and_then(|envs| envs.into_iter().next())
                            .and_then(|e| crate::lease::decode_envelope(e).ok())
                            .map(|e| e.enqueued_ms),
                    },
                    _ => None,
                };
                oldest_age = first_ms.map(|ms| Duration::from_millis(now_ms.saturating_sub(ms)));
                in_flight = Some(int(inflight.next().expect("one reply per shard")?)?);
            } else {
                depth = int(next()?)?;
            }
            out.push(ShardStats {
                tag: s.tag.clone(),
                slot: s.slot,
                node: topology.owner(s.slot).cloned(),
                state: s.state,
                depth,
                in_flight,
                dead,
                delayed,
                oldest_age,
            });
        }
        Ok(out)
    }

    fn require_reliable(&self) -> Result<()> {
        match self.mode() {
            placement::DeliveryMode::AtMostOnce => Err(Error::NotReliable(format!(
                "queue {:?} is at-most-once: it has no leases or dead letters",
                self.name()
            ))),
            _ => Ok(()),
        }
    }

    /// Up to `max` dead letters per shard, oldest first, without removing them.
    pub async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>> {
        self.require_reliable()?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let set = self.reload().await?;
        let cluster = &self.inner.cluster;
        let keys: Vec<crate::lease::ShardKeys> = set
            .shards
            .iter()
            .map(|s| crate::lease::ShardKeys::new(&self.inner.prefix, &s.tag))
            .collect();
        let cmds = keys
            .iter()
            .map(|k| {
                (
                    k.slot,
                    // One more than wanted: the list starts with its KEEP entry.
                    redis::cmd("LRANGE")
                        .arg(&k.dead)
                        .arg(0)
                        .arg(max.min(i64::MAX as usize - 1) as i64)
                        .clone(),
                )
            })
            .collect();
        let mut out = Vec::new();
        for (k, r) in keys
            .iter()
            .zip(cluster.batch(cmds, cluster.default_opts()).await)
        {
            if let Value::Array(items) = r? {
                let letters = items
                    .into_iter()
                    .filter(|i| !matches!(i, Value::BulkString(b) if b == crate::lease::KEEP))
                    .take(max);
                for item in letters {
                    if let Value::BulkString(e) = item {
                        // Something that is not an envelope (pushed by hand) is shown raw.
                        let letter = match crate::lease::decode_envelope(e.clone()) {
                            Ok(env) => DeadLetter {
                                shard: k.tag.to_string(),
                                id: env.id,
                                deliveries: env.deliveries as u32,
                                enqueued_ms: env.enqueued_ms,
                                payload: env.payload,
                            },
                            Err(_) => DeadLetter {
                                shard: k.tag.to_string(),
                                id: crate::lease::MessageId([0; 16]),
                                deliveries: 0,
                                enqueued_ms: 0,
                                payload: e,
                            },
                        };
                        out.push(letter);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Moves up to `max` dead letters per shard back to the ready lists (delivery counts
    /// reset); returns how many moved.
    pub async fn replay_dead(&self, max: usize) -> Result<u64> {
        self.require_reliable()?;
        let set = self.reload().await?;
        let scripts = self.inner.lease_scripts.clone();
        let calls: Vec<crate::script::Call<'_>> = set
            .shards
            .iter()
            .map(|s| {
                let k = crate::lease::ShardKeys::new(&self.inner.prefix, &s.tag);
                crate::script::Call {
                    slot: k.slot,
                    script: &scripts.replay,
                    keys: vec![k.dead.clone(), k.ready.clone(), k.count.clone()],
                    args: vec![max.to_string().into_bytes()],
                }
            })
            .collect();
        let cluster = &self.inner.cluster;
        let mut moved = 0;
        for r in crate::script::run_batch(cluster, &calls, cluster.default_opts()).await {
            moved += int(r?)?;
        }
        Ok(moved)
    }

    /// Deletes every dead letter; returns how many there were.
    pub async fn purge_dead(&self) -> Result<u64> {
        self.require_reliable()?;
        let set = self.reload().await?;
        let cluster = &self.inner.cluster;
        let mut cmds = Vec::new();
        for s in &set.shards {
            let k = crate::lease::ShardKeys::new(&self.inner.prefix, &s.tag);
            // The list's KEEP entry goes too; the next reliable pop puts it back.
            cmds.push((k.slot, redis::cmd("LLEN").arg(&k.dead).clone()));
            cmds.push((k.slot, redis::cmd("DEL").arg(&k.dead).clone()));
        }
        let mut purged = 0;
        for (i, r) in cluster
            .batch(cmds, cluster.default_opts())
            .await
            .into_iter()
            .enumerate()
        {
            let v = r?;
            if i % 2 == 0 {
                purged += int(v)?.saturating_sub(1);
            }
        }
        Ok(purged)
    }
}

/// A count: an integer reply, or nothing (a key that does not exist) as 0; negative counts
/// are clamped to 0.
fn int(v: Value) -> Result<u64> {
    let n: Option<i64> = redis::from_redis_value(v)
        .map_err(|e| Error::Protocol(format!("expected an integer: {e}")))?;
    Ok(n.unwrap_or(0).max(0) as u64)
}
