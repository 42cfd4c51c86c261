//! Looking into a queue: per-shard statistics (the dead letters are in `dead.rs`).

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
    /// Messages scheduled for later and not due yet (see [`Producer::send_at`](crate::Producer::send_at)).
    pub scheduled: u64,
}

impl Queue {
    /// Depth of every shard (one LLEN per shard, pipelined per node) and where it sits; for
    /// reliable queues also in-flight, delayed and dead counts and the oldest message's age.
    pub async fn stats(&self) -> Result<Vec<ShardStats>> {
        stats_many(std::slice::from_ref(self))
            .await
            .pop()
            .expect("one result per queue")
    }

    pub(super) fn require_reliable(&self) -> Result<()> {
        match self.mode() {
            placement::DeliveryMode::AtMostOnce => Err(Error::NotReliable(format!(
                "queue {:?} is at-most-once: it has no leases or dead letters",
                self.name()
            ))),
            _ => Ok(()),
        }
    }
}

/// [`Queue::stats`] of many queues at once, in order: their registries are read
/// concurrently, then every shard of every queue is read in one pipelined round per
/// master (and the in-flight counts of at-least-once shards in one more, at the same
/// time). What a dashboard or an exporter needs per refresh, whatever the number of
/// queues. Queues opened through another router (another [`Client`](crate::Client)) are
/// read with their own.
pub async fn stats_many(queues: &[Queue]) -> Vec<Result<Vec<ShardStats>>> {
    let mut out: Vec<Option<Result<Vec<ShardStats>>>> = queues.iter().map(|_| None).collect();
    // Queues grouped by router: one round per group.
    let mut left: Vec<usize> = (0..queues.len()).collect();
    while let Some(&first) = left.first() {
        let (same, other): (Vec<usize>, Vec<usize>) = left.iter().partition(|&&i| {
            queues[i]
                .inner
                .cluster
                .same_router(&queues[first].inner.cluster)
        });
        let group: Vec<&Queue> = same.iter().map(|&i| &queues[i]).collect();
        for (i, r) in same.iter().zip(stats_one_router(&group).await) {
            out[*i] = Some(r);
        }
        left = other;
    }
    out.into_iter()
        .map(|r| r.expect("every queue read"))
        .collect()
}

async fn stats_one_router(queues: &[&Queue]) -> Vec<Result<Vec<ShardStats>>> {
    let sets = futures::future::join_all(queues.iter().map(|q| q.reload())).await;
    let cluster = &queues[0].inner.cluster;
    let mut cmds = Vec::new();
    let mut inflight_calls = Vec::new();
    for (q, set) in queues.iter().zip(&sets) {
        let Ok(set) = set else { continue };
        let reliable = set.mode != placement::DeliveryMode::AtMostOnce;
        for s in &set.shards {
            let k = crate::lease::ShardKeys::new(&q.inner.prefix, &s.tag);
            // Scheduled messages, in the same round.
            let sched = crate::placement::shard_key(&q.inner.prefix, &s.tag, "sched");
            cmds.push((s.slot, redis::cmd("ZCARD").arg(sched).clone()));
            if !reliable {
                cmds.push((s.slot, redis::cmd("LLEN").arg(&k.ready).clone()));
                if set.priorities {
                    for level in [
                        crate::priority::Priority::High,
                        crate::priority::Priority::Low,
                    ] {
                        let key = level.ready_key(&q.inner.prefix, &s.tag);
                        cmds.push((s.slot, redis::cmd("LLEN").arg(key).clone()));
                    }
                }
            } else {
                cmds.push((s.slot, redis::cmd("GET").arg(&k.count).clone()));
                cmds.push((s.slot, redis::cmd("LLEN").arg(&k.dead).clone()));
                cmds.push((s.slot, redis::cmd("ZCARD").arg(&k.delayed).clone()));
                cmds.push((s.slot, redis::cmd("LINDEX").arg(&k.ready).arg(0).clone()));
                inflight_calls.push(crate::script::Call {
                    slot: s.slot,
                    script: &q.inner.lease_scripts.inflight,
                    keys: vec![k.acks.clone()],
                    args: Vec::new(),
                });
            }
        }
    }
    let opts = crate::cluster::RequestOpts {
        idempotent: true,
        ..cluster.default_opts()
    };
    let (replies, inflight) = futures::future::join(
        cluster.batch(cmds, opts),
        crate::script::run_batch(cluster, &inflight_calls, opts),
    )
    .await;
    let mut replies = replies.into_iter();
    let mut inflight = inflight.into_iter();
    let topology = cluster.topology();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut results = Vec::with_capacity(queues.len());
    for set in sets {
        let set = match set {
            Ok(set) => set,
            Err(e) => {
                results.push(Err(e));
                continue;
            }
        };
        let reliable = set.mode != placement::DeliveryMode::AtMostOnce;
        // Every reply of the queue's shards is taken, even after an error, so that the
        // next queue reads its own.
        let mut shards = Vec::with_capacity(set.shards.len());
        let mut failed = None;
        for s in &set.shards {
            let per_shard = match (reliable, set.priorities) {
                (true, _) => 5,
                (false, true) => 4,
                (false, false) => 2,
            };
            let mine: Vec<Result<Value>> = replies.by_ref().take(per_shard).collect();
            let flight = reliable.then(|| inflight.next().expect("one reply per shard"));
            match shard_stats(s, mine, flight, now_ms) {
                Ok(mut st) => {
                    st.node = topology.owner(s.slot).cloned();
                    shards.push(st);
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        results.push(match failed {
            Some(e) => Err(e),
            None => Ok(shards),
        });
    }
    results
}

/// One shard's numbers from its replies (scheduled, then depth, or for at-least-once
/// shards the ready count, dead, delayed and the head of the ready list) and in-flight
/// count.
fn shard_stats(
    s: &placement::Shard,
    replies: Vec<Result<Value>>,
    inflight: Option<Result<Value>>,
    now_ms: u64,
) -> Result<ShardStats> {
    let mut replies = replies.into_iter();
    let mut next = || replies.next().expect("one reply per command");
    let scheduled = int(next()?)?;
    let (mut dead, mut delayed, mut oldest_age, mut in_flight) = (None, None, None, None);
    let depth;
    if let Some(flight) = inflight {
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
        in_flight = Some(int(flight?)?);
    } else {
        // The ready list, then (queues with priorities) the high and low ones.
        let mut sum = 0;
        for r in replies {
            sum += int(r?)?;
        }
        depth = sum;
    }
    Ok(ShardStats {
        tag: s.tag.clone(),
        slot: s.slot,
        node: None,
        state: s.state,
        depth,
        in_flight,
        dead,
        delayed,
        oldest_age,
        scheduled,
    })
}

/// A count: an integer reply, or nothing (a key that does not exist) as 0; negative counts
/// are clamped to 0.
pub(super) fn int(v: Value) -> Result<u64> {
    let n: Option<i64> = redis::from_redis_value(v)
        .map_err(|e| Error::Protocol(format!("expected an integer: {e}")))?;
    Ok(n.unwrap_or(0).max(0) as u64)
}
