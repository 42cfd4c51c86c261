//! Writing a batch to its shard: one `RPUSH` (plus the ready count on at-least-once
//! queues, plus `WAIT` with durability), and rerouting unkeyed batches a shard refused.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use super::ProducerInner;
use super::batch::Batch;
use super::lanes::Lane;
use crate::cluster::Command;
use crate::error::{Error, Result};

impl ProducerInner {
    /// Pushes a batch to its lane; an unkeyed batch that could not be sent (node down,
    /// shard full) goes to another healthy lane instead.
    ///
    /// The retry budget counts from when the batch's first message was enqueued, and
    /// covers every lane tried: a send answers within the budget plus the attempt under
    /// way when it ran out, also when it waited behind a push that used up its own.
    pub(super) async fn push_routed(
        &self,
        lane: &Arc<Lane>,
        batch: &Batch,
        body: &Bytes,
    ) -> Result<()> {
        match self.push_routed_once(lane, batch, body).await {
            // A delete's fence refused it (nothing was stored): the queue is gone, or it
            // was created again and this writer lifts the fences and sends once more.
            Err(e) if crate::delete_fence::is_fence(&e) => {
                if !self.cfg.queue.recreated_after_fence(&lane.tag).await? {
                    return Err(Error::QueueNotFound(self.cfg.queue.name().to_string()));
                }
                self.push_routed_once(lane, batch, body).await
            }
            other => other,
        }
    }

    async fn push_routed_once(&self, lane: &Arc<Lane>, batch: &Batch, body: &Bytes) -> Result<()> {
        let budget = self.cfg.queue.cluster().config().retry_budget_value();
        let deadline = batch.born.unwrap_or_else(std::time::Instant::now) + budget;
        let left = || deadline.saturating_duration_since(std::time::Instant::now());
        if batch.keyed {
            return self.push(lane, batch, body, left()).await;
        }
        let mut tried: HashSet<String> = HashSet::new();
        let mut target = lane.clone();
        // The first error of an attempt that may have stored the batch: a later lane's
        // error that says "not stored" must not hide it (the caller would send again what
        // is already there).
        let mut maybe_stored: Option<Error> = None;
        loop {
            tried.insert(target.tag.clone());
            let lanes = self.lanes();
            let last = lanes.iter().all(|l| tried.contains(&l.tag));
            let budget = if last { left() } else { Duration::ZERO };
            match self.push(&target, batch, body, budget).await {
                // Another lane while the budget lasts (each try is one attempt).
                Err(e) if !last && rerouteable(&e, self.resend_ambiguous) && !left().is_zero() => {
                    tracing::debug!(shard = %target.tag, cause = %e, "rerouting batch");
                    if e.may_have_run() && maybe_stored.is_none() {
                        maybe_stored = Some(e);
                    }
                    target = self.choose(&lanes, &tried);
                }
                Err(e) if !e.may_have_run() && maybe_stored.is_some() => {
                    tracing::debug!(shard = %target.tag, cause = %e, "rerouted batch failed");
                    return Err(maybe_stored.expect("checked above"));
                }
                other => return other,
            }
        }
    }

    /// One push of `batch` to `lane`, retrying what is safe to retry for `retry_budget`.
    async fn push(
        &self,
        lane: &Lane,
        batch: &Batch,
        body: &Bytes,
        retry_budget: Duration,
    ) -> Result<()> {
        let cluster = self.cfg.queue.cluster();
        let mut opts = cluster.default_opts();
        opts.retry_budget = retry_budget;
        // The batch holds its messages as the push carries them: the command is a head
        // before them (see `batch.rs`).
        let count = batch.len();
        // The level's own list on queues with priorities (normal: the shard's ready list).
        let level_key;
        let key = if batch.level == crate::priority::Priority::Normal {
            &lane.key
        } else {
            level_key = batch.level.ready_key(self.cfg.queue.prefix(), &lane.tag);
            &level_key
        };
        let cmd = match (&batch.dedup, self.cfg.max_depth) {
            // Scheduled: kept aside until due (max_depth does not apply).
            _ if batch.schedule => self.schedule_command(lane, batch, body),
            // A dedup id: the marker and the push in one script (max_depth does not apply).
            (Some(id), _) => self.dedup_command(lane, id, batch, body),
            // At-least-once queues: the whole batch is one frame, behind its head (one
            // command, so the two are never apart).
            (None, None) if self.reliable => {
                let (open, head) = batch.frame_open(body.len());
                Command::with_body(
                    &[b"RPUSH", lane.key.as_bytes(), &head],
                    1,
                    vec![open.into(), body.clone(), Bytes::from_static(b"\r\n")],
                )
            }
            (None, None) => {
                Command::with_body(&[b"RPUSH", key.as_bytes()], count, vec![body.clone()])
            }
            // At-most-once queues only: the builder refuses `max_depth` on at-least-once
            // queues.
            (None, Some(max)) => {
                let scripts = self.cfg.queue.scripts();
                let max = max.to_string();
                scripts
                    .push_bounded
                    .with_body(&[key], &[max.as_bytes()], count, vec![body.clone()])
            }
        };
        // At-least-once shards keep a count of ready messages (a frame holds many): it
        // goes in the same write, right behind the push.
        let ready_count = (self.reliable && batch.dedup.is_none() && !batch.schedule).then(|| {
            redis::cmd("INCRBY")
                .arg(crate::placement::shard_key(
                    self.cfg.queue.prefix(),
                    &lane.tag,
                    "count",
                ))
                .arg(count)
                .clone()
                .into()
        });
        let durability = self.durability_for(lane);
        let reply = match (durability, ready_count) {
            (None, None) => cluster
                .batch_commands(vec![(lane.slot, cmd)], opts)
                .await
                .pop()
                .expect("one reply")?,
            (None, Some(count)) => {
                let mut out = cluster
                    .batch_commands(vec![(lane.slot, cmd), (lane.slot, count)], opts)
                    .await;
                let counted = out.pop().expect("two replies");
                let pushed = out.pop().expect("two replies")?;
                if let Err(e) = counted {
                    tracing::warn!(shard = %lane.tag, cause = %e, "ready count not updated")
                }
                pushed
            }
            (Some((replicas, timeout)), count) => {
                // WAIT on the same connection, right behind the push: it counts the
                // replicas that acknowledged every write of that connection so far. The
                // three go as one unit: redirected or retried together, never split
                // between an old owner and a new one.
                opts.timeout += timeout;
                opts.isolated = true;
                opts.together = true;
                let wait = redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(timeout.as_millis() as u64)
                    .clone()
                    .into();
                let mut cmds = vec![(lane.slot, cmd)];
                cmds.extend(count.map(|c| (lane.slot, c)));
                cmds.push((lane.slot, wait));
                let mut out = cluster.batch_commands(cmds, opts).await;
                let waited = out.pop().expect("a reply per command");
                let pushed = out.remove(0)?;
                if !matches!(pushed, Value::Int(n) if n < 0) {
                    let acked = match waited? {
                        Value::Int(n) => n.max(0) as u32,
                        other => return Err(Error::Protocol(format!("WAIT: {other:?}"))),
                    };
                    if acked < replicas {
                        let node = cluster
                            .topology()
                            .owner(lane.slot)
                            .cloned()
                            .unwrap_or_else(|| crate::topology::NodeAddr::new("?", 0));
                        if !(self.cfg.durability.is_none()
                            && self.alone_by_majority(lane, &node).await)
                        {
                            return Err(Error::NotReplicated {
                                node,
                                wanted: replicas,
                                acked,
                            });
                        }
                    }
                }
                pushed
            }
        };
        match reply {
            Value::Int(n) if n >= 0 => {
                if !batch.schedule {
                    lane.landed.fetch_add(count as i64, Ordering::Relaxed);
                }
                Ok(())
            }
            Value::Int(n) => {
                // A full shard: take its depth as news, so choices avoid it until the next
                // snapshot.
                let depth = (-n - 1) as u64;
                lane.base.store(
                    depth as i64 - lane.landed.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                Err(Error::QueueFull {
                    shard: lane.tag.clone(),
                    depth,
                    max: self.cfg.max_depth.unwrap_or_default(),
                })
            }
            Value::SimpleString(s) if s == "DUPLICATE" => Err(Error::Duplicate {
                queue: self.cfg.queue.name().to_string(),
                id: batch.dedup.clone().unwrap_or_default(),
            }),
            other => Err(Error::Protocol(format!("push: unexpected reply {other:?}"))),
        }
    }
}

impl ProducerInner {
    /// The `WAIT` behind a push to `lane`: as configured, or by default on at-least-once
    /// queues one replica unless the slot map (the majority's, see `cluster/refresh.rs`)
    /// shows the lane's master without a live replica. A slot whose owner is not known
    /// right now (a failover in progress) waits too: the push may go to a master cut off
    /// from its replica, whose acknowledgements a failover would lose.
    fn durability_for(&self, lane: &Lane) -> Option<(u32, Duration)> {
        if self.cfg.durability.is_some() || self.cfg.durability_off || !self.reliable {
            return self.cfg.durability;
        }
        let wait = Some((1, super::builder::DEFAULT_DURABILITY_TIMEOUT));
        let topology = self.cfg.queue.cluster().topology();
        let Some(master) = topology.owner(lane.slot) else {
            return wait;
        };
        topology
            .replicas_of(master)
            .iter()
            .any(|r| r.health != crate::topology::Health::Failed)
            .then_some(wait)
            .flatten()
    }
}

impl ProducerInner {
    /// Default durability only: whether a push that no replica confirmed went to the
    /// master the majority's slot map names for the lane, now, and that master has no live
    /// replica (its replica died in the failover that made it master): then the write is
    /// on the only copy there is, and counts as acknowledged. A master cut off from the
    /// others is either still named with its live replica, or no longer the owner.
    async fn alone_by_majority(&self, lane: &Lane, answered: &crate::topology::NodeAddr) -> bool {
        let Ok(map) = self.cfg.queue.cluster().refresh().await else {
            return false;
        };
        map.owner(lane.slot) == Some(answered)
            && map
                .replicas_of(answered)
                .iter()
                .all(|r| r.health == crate::topology::Health::Failed)
    }
}

/// Whether an unkeyed batch that failed with `e` may go to another shard. Batches that may
/// already be stored (timeout, lost connection, unreplicated) only when `ambiguous` allows
/// duplicates.
fn rerouteable(e: &Error, ambiguous: bool) -> bool {
    match e {
        // The shard's master refused it; another master may take it.
        Error::QueueFull { .. }
        | Error::Server {
            kind: crate::server_error::ServerErrorKind::OutOfMemory,
            ..
        } => true,
        Error::NotReplicated { .. } => ambiguous,
        e if e.may_have_run() => ambiguous && e.is_retryable(),
        e => e.is_retryable(),
    }
}
