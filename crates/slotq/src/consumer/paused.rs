//! A paused queue (`Queue::pause`): its consumers take nothing new until it is resumed.
//!
//! A consumer looks at the registry once per registry poll (`Queue::check_live`). When it
//! finds the queue paused it stops its waiters (their blocked pops end, and what a late
//! reply brought comes back), waits for its round in flight, and gives back everything it
//! holds and has not handed out — to the head of each shard, in order (ordered members
//! through their ordered give-back, one call per shard). Then it only polls the registry,
//! and heartbeats its group, until the queue is resumed or the caller's deadline passes:
//! one `HGET` per registry poll, less than an idle consumer's blocked pops. Messages
//! already handed out are the caller's, settled as usual.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::giveback::return_messages;
use super::waiter::Attention;
use super::{Consumer, Flow, round};
use crate::error::Result;

impl Consumer {
    /// Returns true at once when the queue is not paused; else sets everything it holds
    /// aside and waits until the queue is resumed (true) or `deadline` passes (false).
    pub(super) async fn wait_while_paused(&mut self, deadline: Option<Instant>) -> Result<bool> {
        if !self.queue.is_paused() {
            return Ok(true);
        }
        let queue = self.queue.name().to_string();
        metrics::gauge!(crate::telemetry::QUEUE_PAUSED, "queue" => queue.clone()).set(1.0);
        tracing::info!(queue = %queue, "queue paused: taking nothing until it is resumed");
        self.set_aside().await;
        loop {
            let wake = Instant::now() + self.queue.registry_poll();
            let until = deadline.map_or(wake, |d| d.min(wake));
            tokio::time::sleep_until(until.into()).await;
            self.queue.check_live().await?;
            self.sync_group().await?;
            if !self.queue.is_paused() {
                metrics::gauge!(crate::telemetry::QUEUE_PAUSED, "queue" => queue).set(0.0);
                tracing::info!(queue = %self.queue.name(), "queue resumed");
                self.sweep_due = true;
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    /// Stops the waiters and gives back everything taken and not handed out.
    async fn set_aside(&mut self) {
        let waiters: Vec<_> = self.waiters.drain().map(|(_, w)| w).collect();
        let (handles, stops): (Vec<_>, Vec<_>) = waiters.into_iter().unzip();
        drop(stops);
        for w in handles {
            let _ = w.await;
        }
        self.attention.send_replace(Attention::Away);
        if let Some(g) = &self.group {
            g.idle(true);
        }
        self.flowing = Flow::Stopped;
        if self.group.as_ref().is_some_and(|g| g.cfg.ordered) {
            self.settle_round_in_flight().await;
            while let Ok(batch) = self.inbox_rx.try_recv() {
                self.buffer.extend(batch);
            }
            let shards: HashSet<Arc<str>> = self.buffer.iter().map(|m| m.shard.clone()).collect();
            self.give_back_ordered(&shards, Vec::new());
            return;
        }
        if let Some(r) = self.round.as_mut() {
            let replies = r.replies().await;
            let r = self.round.take().expect("a round in flight");
            let out = round::absorb(&self.ctx, &r.asks, r.started, replies);
            self.buffer_up(out.messages);
        }
        let left = self.take_unhanded();
        return_messages(self.queue.cluster(), self.queue.prefix(), left).await;
    }
}
