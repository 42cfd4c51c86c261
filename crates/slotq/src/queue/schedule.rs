//! Scheduled messages of a shard: where they wait, how they become ready, how they are
//! cancelled. Producers write them (`producer/schedule.rs`), consumers promote them on
//! time (`consumer/promoter.rs`); both go through this module.
//!
//! Keys (in the shard's slot): `sched`, a ZSET of message id -> due time (ms since the
//! Unix epoch, compared with the shard's master's clock), and `sched:msgs`, a HASH of
//! message id -> the element to push (a payload; an envelope on at-least-once queues).
//! Both are written and emptied together by one script, so they exist together or not at
//! all (a slot being migrated serves a script only when all its keys are on one node).

use std::time::Duration;

use redis::Value;

use super::Queue;
use crate::error::{Error, Result};
use crate::lease::MessageId;
use crate::placement::{DeliveryMode, Shard, shard_key};
use crate::script::Call;
use crate::slot::Slot;

/// Furthest ahead a message may be scheduled (ten years).
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far in the past a due time may be and still be taken (as "now"): clocks of
/// callers and servers differ a little. Further back is a mistake, refused.
pub const PAST_TOLERANCE: Duration = Duration::from_secs(1);
/// How often a consumer asks each shard for its earliest scheduled message when it knows
/// of none (the block timeout's length: a third more commands for an idle consumer). A
/// message scheduled further ahead than this is always known to the consumers before it
/// is due; one due sooner is promoted by the producer that sent it.
pub const SCHEDULE_POLL: Duration = Duration::from_secs(2);
/// Most messages one promote call moves (it is called again at once when it moved as many).
pub(crate) const PROMOTE_LIMIT: usize = 1000;

/// The keys a scheduled message of one shard touches.
#[derive(Debug, Clone)]
pub(crate) struct ScheduleKeys {
    pub(crate) slot: Slot,
    pub(crate) tag: String,
    pub(crate) sched: String,
    pub(crate) msgs: String,
    pub(crate) ready: String,
    /// At-least-once queues: the ready count and the delayed redeliveries.
    pub(crate) reliable: Option<(String, String)>,
}

impl ScheduleKeys {
    pub(crate) fn new(prefix: &str, shard: &Shard, mode: DeliveryMode) -> ScheduleKeys {
        let k = |kind: &str| shard_key(prefix, &shard.tag, kind);
        ScheduleKeys {
            slot: shard.slot,
            tag: shard.tag.clone(),
            sched: k("sched"),
            msgs: k("sched:msgs"),
            ready: k("ready"),
            reliable: (mode != DeliveryMode::AtMostOnce).then(|| (k("count"), k("delayed"))),
        }
    }

    /// KEYS of `schedule.lua`.
    pub(crate) fn schedule_keys(&self) -> Vec<&str> {
        let mut keys = vec![self.sched.as_str(), self.msgs.as_str(), self.ready.as_str()];
        if let Some((count, _)) = &self.reliable {
            keys.push(count);
        }
        keys
    }

    /// KEYS of `promote.lua`.
    fn promote_keys(&self) -> Vec<String> {
        let mut keys = vec![self.sched.clone(), self.msgs.clone(), self.ready.clone()];
        if let Some((count, delayed)) = &self.reliable {
            keys.push(count.clone());
            keys.push(delayed.clone());
        }
        keys
    }
}

/// What one promote call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Promoted {
    /// Messages moved to the ready list.
    pub(crate) moved: usize,
    /// How long until the earliest message left is due (by the server's clock), if any.
    pub(crate) next_in: Option<Duration>,
}

/// Promotes what is due in each shard: one script call per shard, pipelined per node.
pub(crate) async fn promote(queue: &Queue, shards: &[ScheduleKeys]) -> Vec<Result<Promoted>> {
    let script = &queue.scripts().promote;
    let calls: Vec<Call<'_>> = shards
        .iter()
        .map(|k| Call {
            slot: k.slot,
            script,
            keys: k.promote_keys(),
            args: vec![PROMOTE_LIMIT.to_string().into_bytes()],
        })
        .collect();
    let cluster = queue.cluster();
    crate::script::run_batch(cluster, &calls, cluster.default_opts())
        .await
        .into_iter()
        .map(|r| {
            let v: Vec<i64> = redis::from_redis_value(r?)
                .map_err(|e| Error::Protocol(format!("promote: {e}")))?;
            match v.as_slice() {
                [moved, next, now] => Ok(Promoted {
                    moved: (*moved).max(0) as usize,
                    next_in: (*next >= 0)
                        .then(|| Duration::from_millis((*next - *now).max(0) as u64)),
                }),
                other => Err(Error::Protocol(format!(
                    "promote: unexpected reply {other:?}"
                ))),
            }
        })
        .collect()
}

/// The earliest due time waiting in each shard (ms since the Unix epoch; scheduled
/// messages, and on at-least-once queues delayed redeliveries): plain reads, one or two
/// per shard pipelined per node, what a consumer's poll costs while nothing is due.
pub(crate) async fn earliest(queue: &Queue, shards: &[ScheduleKeys]) -> Vec<Result<Option<u64>>> {
    let mut cmds = Vec::new();
    for k in shards {
        let first = |key: &str| {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .clone()
        };
        cmds.push((k.slot, first(&k.sched)));
        if let Some((_, delayed)) = &k.reliable {
            cmds.push((k.slot, first(delayed)));
        }
    }
    let cluster = queue.cluster();
    let opts = crate::cluster::RequestOpts {
        idempotent: true,
        ..cluster.default_opts()
    };
    let mut replies = cluster.batch(cmds, opts).await.into_iter();
    let score = |r: Result<Value>| -> Result<Option<u64>> {
        let v: Vec<(Vec<u8>, f64)> =
            redis::from_redis_value(r?).map_err(|e| Error::Protocol(format!("ZRANGE: {e}")))?;
        // The delayed set's KEEP member sits at +inf.
        Ok(v.first()
            .filter(|(_, s)| s.is_finite())
            .map(|(_, s)| s.max(0.0) as u64))
    };
    shards
        .iter()
        .map(|k| {
            let a = score(replies.next().expect("a reply per command"))?;
            let b = match k.reliable {
                Some(_) => score(replies.next().expect("a reply per command"))?,
                None => None,
            };
            Ok(match (a, b) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            })
        })
        .collect()
}

/// Checks a due time and turns it into ms since the Unix epoch.
pub(crate) fn due_ms(at: std::time::SystemTime) -> Result<u64> {
    let now = std::time::SystemTime::now();
    if let Ok(late) = now.duration_since(at)
        && late > PAST_TOLERANCE
    {
        return Err(Error::InvalidSchedule(format!(
            "the due time is {:.1} s in the past",
            late.as_secs_f64()
        )));
    }
    if let Ok(ahead) = at.duration_since(now)
        && ahead > MAX_SCHEDULE_AHEAD
    {
        return Err(Error::InvalidSchedule(format!(
            "the due time is {} days ahead; the most is {} days",
            ahead.as_secs() / 86_400,
            MAX_SCHEDULE_AHEAD.as_secs() / 86_400
        )));
    }
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64))
}

impl Queue {
    /// Cancels scheduled messages that are not due yet, by the ids their sends returned
    /// ([`Producer::send_at`](crate::Producer::send_at)). Returns the ids cancelled; an id
    /// that is not waiting (already due and moved to the queue, cancelled before, or never
    /// scheduled) is left out. Asks every shard (one script call each, pipelined).
    pub async fn cancel(&self, ids: &[MessageId]) -> Result<Vec<MessageId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let set = self.reload().await?;
        let keys: Vec<ScheduleKeys> = set
            .shards
            .iter()
            .map(|s| ScheduleKeys::new(self.prefix(), s, set.mode))
            .collect();
        let script = &self.scripts().cancel;
        let calls: Vec<Call<'_>> = keys
            .iter()
            .map(|k| Call {
                slot: k.slot,
                script,
                keys: vec![k.sched.clone(), k.msgs.clone()],
                args: ids.iter().map(|id| id.0.to_vec()).collect(),
            })
            .collect();
        let cluster = self.cluster();
        let mut cancelled = vec![false; ids.len()];
        for r in crate::script::run_batch(cluster, &calls, cluster.default_opts()).await {
            let flags: Vec<i64> =
                redis::from_redis_value(r?).map_err(|e| Error::Protocol(format!("cancel: {e}")))?;
            for (c, f) in cancelled.iter_mut().zip(flags) {
                *c |= f == 1;
            }
        }
        Ok(ids
            .iter()
            .zip(cancelled)
            .filter(|(_, c)| *c)
            .map(|(id, _)| *id)
            .collect())
    }
}
