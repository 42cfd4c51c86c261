//! Scheduled sends: a message that becomes ready at a given time.
//!
//! A scheduled message is written at once (durably, like any push) to the `sched` keys of
//! the shard it is placed on (unkeyed: the producer's usual choice; keyed: the key's
//! shard), and moved to that shard's ready list when due by whichever client promotes
//! first (`queue/schedule.rs`): every consumer of the queue promotes on time and polls
//! once a second; the producer that sent a message due within a poll also promotes it
//! itself at its due time, so short delays do not wait for a consumer's poll. A message
//! due already (within [`PAST_TOLERANCE`](crate::queue::PAST_TOLERANCE)) is pushed at
//! once by the same script.
//!
//! Each send returns the message's id ([`MessageId`]; on at-least-once queues also the id
//! its deliveries carry), by which [`Queue::cancel`](crate::Queue::cancel) cancels it
//! before it is due. A resend of the same batch (an ambiguous failure retried) stores each
//! id once while it waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

use super::batch::Batch;
use super::lanes::Lane;
use super::{Producer, ProducerInner};
use crate::cluster::Command;
use crate::error::Result;
use crate::lease::MessageId;
use crate::queue::{ScheduleKeys, due_ms};

impl Producer {
    /// Sends one message that becomes ready at `at` (compared with the Redis servers'
    /// clocks). Resolves when Redis stored it; returns its id, for
    /// [`Queue::cancel`](crate::Queue::cancel). A time more than a second in the past, or
    /// more than ten years ahead, is refused with [`Error::InvalidSchedule`](crate::Error::InvalidSchedule).
    pub async fn send_at(&self, payload: impl AsRef<[u8]>, at: SystemTime) -> Result<MessageId> {
        let ids = self.send_batch_at([payload], at).await?;
        Ok(ids[0])
    }

    /// [`Producer::send_at`] `delay` from now.
    pub async fn send_after(
        &self,
        payload: impl AsRef<[u8]>,
        delay: Duration,
    ) -> Result<MessageId> {
        self.send_at(payload, SystemTime::now() + delay).await
    }

    /// Sends many messages that become ready at `at`, spread over the shards like
    /// [`Producer::send_batch`]; returns their ids in order.
    pub async fn send_batch_at<P: AsRef<[u8]>>(
        &self,
        payloads: impl IntoIterator<Item = P>,
        at: SystemTime,
    ) -> Result<Vec<MessageId>> {
        let called = Instant::now();
        let due = due_ms(at)?;
        let payloads: Vec<P> = payloads.into_iter().collect();
        for p in &payloads {
            self.inner.check(p.as_ref())?;
        }
        self.inner.cfg.queue.check_live().await?;
        let mut ids = Vec::with_capacity(payloads.len());
        for chunk in payloads.chunks(self.inner.cfg.max_batch_messages.max(1)) {
            let lane = self.inner.pick_fresh()?;
            let chunk: Vec<&[u8]> = chunk.iter().map(AsRef::as_ref).collect();
            ids.extend(
                self.inner
                    .send_scheduled(&lane, false, &chunk, due, called, None)
                    .await?,
            );
        }
        Ok(ids)
    }

    /// A keyed [`Producer::send_at`]: the message goes to its key's shard, and becomes
    /// ready there at `at` (behind whatever of its key is ready by then).
    pub async fn send_keyed_at(
        &self,
        key: impl AsRef<[u8]>,
        payload: impl AsRef<[u8]>,
        at: SystemTime,
    ) -> Result<MessageId> {
        let called = Instant::now();
        let due = due_ms(at)?;
        let payload = payload.as_ref();
        self.inner.check(payload)?;
        self.inner.cfg.queue.check_live().await?;
        let lane = self.inner.keyed_lane(key.as_ref()).await?;
        let ids = self
            .inner
            .send_scheduled(&lane, true, &[payload], due, called, None)
            .await?;
        Ok(ids[0])
    }
}

impl ProducerInner {
    /// The next message id: this producer's 8 random bytes and its counter.
    pub(super) fn next_id(&self) -> MessageId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.id_prefix);
        id[8..].copy_from_slice(
            &self
                .id_counter
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_be_bytes(),
        );
        MessageId(id)
    }

    /// One push of scheduled messages to `lane` (rerouted like any unkeyed batch unless
    /// `keyed`); then, if they are due within a poll, this producer promotes them on time.
    pub(super) async fn send_scheduled(
        &self,
        lane: &Arc<Lane>,
        keyed: bool,
        payloads: &[&[u8]],
        due: u64,
        called: Instant,
        ext: Option<&[u8]>,
    ) -> Result<Vec<MessageId>> {
        let mut batch = Batch::default();
        batch.keyed = keyed;
        batch.born = Some(called);
        batch.schedule = true;
        let now = crate::lease::now_ms();
        let mut ids = Vec::with_capacity(payloads.len());
        let plain_ext = crate::meta::PLAIN_EXT_MAGIC;
        for p in payloads {
            let id = self.next_id();
            if self.reliable {
                let mut head = crate::lease::envelope_header(id, now);
                match ext {
                    Some(ext) => {
                        head[0..2].copy_from_slice(&crate::lease::EXT_ENVELOPE_MAGIC);
                        batch.push_scheduled(&id.0, due, &[&head, ext, p]);
                    }
                    None => batch.push_scheduled(&id.0, due, &[&head, p]),
                }
            } else {
                match ext {
                    Some(ext) => batch.push_scheduled(&id.0, due, &[&plain_ext, ext, p]),
                    None if crate::meta::needs_plain_ext(p) => {
                        batch.push_scheduled(&id.0, due, &[&plain_ext, &super::batch::EMPTY_EXT, p])
                    }
                    None => batch.push_scheduled(&id.0, due, &[p]),
                }
            }
            ids.push(id);
        }
        let body = batch.take_body();
        self.push_routed(lane, &batch, &body).await?;
        self.cfg.queue.count_pushed(payloads.len());
        let wait = Duration::from_millis(due.saturating_sub(crate::lease::now_ms()));
        if !wait.is_zero() && wait <= crate::queue::SCHEDULE_POLL {
            // After a reroute it may be on another lane: consumers find it there within a
            // poll.
            self.nudge_at(lane, Instant::now() + wait);
        }
        Ok(ids)
    }

    /// The command of a scheduled batch (see `lua/schedule.lua`).
    pub(super) fn schedule_command(
        &self,
        lane: &Lane,
        batch: &Batch,
        body: &bytes::Bytes,
    ) -> Command {
        let keys = self.schedule_keys(lane);
        let script = &self.cfg.queue.scripts().schedule;
        script.with_body(
            &keys.schedule_keys(),
            &[],
            3 * batch.len(),
            vec![body.clone()],
        )
    }

    fn schedule_keys(&self, lane: &Lane) -> ScheduleKeys {
        let shard = crate::placement::Shard {
            tag: lane.tag.clone(),
            number: 0,
            slot: lane.slot,
            state: crate::placement::ShardState::Active,
        };
        let mode = self.cfg.queue.mode();
        ScheduleKeys::new(self.cfg.queue.prefix(), &shard, mode)
    }

    /// Promotes `lane`'s shard at `at` (and again at its next due time while that is
    /// within a poll): one task per producer serves every lane, and outlives the producer
    /// until what it promised is done (at most a poll).
    fn nudge_at(&self, lane: &Lane, at: Instant) {
        let keys = self.schedule_keys(lane);
        let shared = self.nudges.clone();
        let mut n = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let e = n.due.entry(keys.tag.clone()).or_insert((at, keys));
        if at < e.0 {
            e.0 = at;
        }
        if !n.running {
            n.running = true;
            tokio::spawn(nudge_loop(shared.clone(), self.cfg.queue.clone()));
        }
        drop(n);
        shared.wake.notify_one();
    }
}

/// Shards a producer promotes itself, by when.
#[derive(Default)]
pub(super) struct Nudges {
    state: Mutex<NudgeState>,
    wake: Notify,
}

#[derive(Default)]
struct NudgeState {
    due: HashMap<String, (Instant, ScheduleKeys)>,
    /// The task runs (it ends when nothing is left to promote).
    running: bool,
}

/// The producer's promoter: sleeps until the earliest shard is due, promotes the shards
/// due, keeps those whose next message is due within a poll; ends when none is left.
async fn nudge_loop(shared: Arc<Nudges>, queue: crate::queue::Queue) {
    let poll = crate::queue::SCHEDULE_POLL;
    loop {
        let first = {
            let mut n = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let first = n.due.values().map(|(at, _)| *at).min();
            if first.is_none() {
                n.running = false;
                return;
            }
            first
        };
        if let Some(at) = first {
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = shared.wake.notified() => continue,
            }
        }
        let now = Instant::now();
        let due: Vec<ScheduleKeys> = {
            let mut n = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let tags: Vec<String> = n
                .due
                .iter()
                .filter(|(_, (at, _))| *at <= now)
                .map(|(t, _)| t.clone())
                .collect();
            tags.iter()
                .filter_map(|t| n.due.remove(t))
                .map(|(_, k)| k)
                .collect()
        };
        let results = crate::queue::promote(&queue, &due).await;
        let mut n = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        for (keys, r) in due.into_iter().zip(results) {
            let next = match r {
                Ok(done) if done.moved >= crate::queue::PROMOTE_LIMIT => Some(Duration::ZERO),
                Ok(done) => done.next_in.filter(|d| *d <= poll),
                // Consumers poll anyway; one more try shortly.
                Err(e) => {
                    tracing::debug!(shard = %keys.tag, cause = %e, "promote failed");
                    Some(Duration::from_millis(50))
                }
            };
            if let Some(d) = next {
                let at = Instant::now() + d;
                let e = n.due.entry(keys.tag.clone()).or_insert((at, keys));
                if at < e.0 {
                    e.0 = at;
                }
            }
        }
    }
}
