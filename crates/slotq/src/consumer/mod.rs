//! The balanced consumer.
//!
//! A consumer sweeps the shards it reads in one round trip: one `LPOP key count` per shard
//! (the lease script on at-least-once queues), pipelined per node, all nodes at once. In a
//! consumer group (the default) those are the shards it owns, plus other members' deep
//! shards when its own came back empty; without a group, every shard. Shards that returned
//! a full batch get a larger count next round (deepest first, up to 8x), and every shard is
//! asked every round, so none starves. Nodes that are down are skipped for the round.
//!
//! When a sweep finds nothing, the consumer blocks server-side instead of polling: one
//! waiter per shard it owns holds a dedicated connection to the shard's master and runs
//! `BLMPOP` with a finite server timeout and a client deadline a bit longer. A waiter that
//! pops messages hands them to the consumer; new data wakes it within a round trip. On
//! at-least-once queues the wait moves nothing (`BLMOVE` of a list onto itself) and a
//! lease follows it on the same connection, so what arrives is leased as it arrives; with
//! prefetch, a waiter that brought messages blocks again while its consumer works. An
//! at-least-once consumer whose last round left every shard empty (the lease script says
//! so) goes straight to its waiters instead of sending a round to find the shards empty.
//! Waiters recover from MOVED / UNBLOCKED / CLUSTERDOWN replies and silent nodes, then
//! block again. When the consumer is dropped, blocked waiters are unblocked (`CLIENT
//! UNBLOCK`) and anything popped but not handed out is given back.
//!
//! Files: `builder` (settings), `message` (a message and settling it), `fill` (getting
//! messages: rounds or waits), `round` (one poll round, cancel-safe), `waiter` (blocking
//! while idle), `wait_lease` (the lease behind an at-least-once wait), `fenced_pop` (an
//! ordered member's pops on at-most-once queues, behind the shard's fence), `grouped` (the
//! consumer's side of its group: views, epochs, validity), `giveback` (returning what was
//! not handed out, and dropping what a lost grant makes stale).

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

mod builder;
mod confirm;
mod expiry;
mod fenced_pop;
mod fill;
mod giveback;
mod grouped;
mod message;
mod ordered_giveback;
mod paused;
mod promoter;
mod round;
mod wait_lease;
mod waiter;

pub use builder::ConsumerBuilder;
pub use message::{Delivery, Message};

use crate::error::Result;
use crate::lease::{self, LeaseRef, Settle, SettleReport, ShardKeys};
use crate::queue::Queue;
use giveback::return_messages;
use grouped::Grouped;
use round::Round;
use waiter::Attention;

/// Messages asked from each shard per sweep (before depth weighting), at-most-once queues.
pub const DEFAULT_POP_BATCH: usize = 128;
/// Messages a lease asks of each shard per sweep (before depth weighting), at-least-once
/// queues: half of a producer's largest frame (1,000 messages), so that leases take
/// producers' frames whole. A lease cuts a frame of more than twice its ask, reading it
/// into Lua; with asks of 128, at 2,500,000 msgs/s on 3 masters, that made p50 4-74 ms
/// against 0.9-3.4 ms with 512 (docs/benchmarks.md).
pub const DEFAULT_LEASE_BATCH: usize = MAX_LEASE_BATCH / MAX_WEIGHT;
/// Server-side timeout of a blocking pop.
pub const DEFAULT_BLOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than the server timeout the client waits for a blocking pop's reply.
pub const BLOCK_GRACE: Duration = Duration::from_secs(1);
/// How often a group member refreshes what it tells the group (held and deep shards).
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// Largest depth weight of a shard that keeps returning full batches.
const MAX_WEIGHT: usize = 8;
/// Most messages in one lease.
const MAX_LEASE_BATCH: usize = 4096;

/// Receives messages from a queue. One consumer serves one task; make as many as needed.
pub struct Consumer {
    queue: Queue,
    pop_batch: usize,
    block_timeout: Duration,
    ctx: round::Ctx,
    /// The poll round in flight, kept across a cancelled call (or started ahead).
    round: Option<Round>,
    /// Start the next round when a call hands out the last buffered message (see
    /// [`ConsumerBuilder::prefetch`]).
    prefetch: bool,
    /// Whether messages are flowing, and which round to start ahead (see
    /// [`Consumer::prefetch_if_dry`]).
    flowing: Flow,
    keys: HashMap<String, Arc<ShardKeys>>,
    buffer: VecDeque<Message>,
    inbox_tx: mpsc::UnboundedSender<Vec<Message>>,
    inbox_rx: mpsc::UnboundedReceiver<Vec<Message>>,
    /// Where the consumer is, for its waiters (see [`Attention`]).
    attention: watch::Sender<Attention>,
    /// Waits so far.
    waits: u64,
    /// A waiter per shard blocked on; dropping its sender tells it to stop.
    waiters: HashMap<String, (JoinHandle<()>, watch::Sender<()>)>,
    /// The consumer's group, unless it reads every shard itself.
    group: Option<Grouped>,
    /// Moves scheduled messages to the ready lists on time (started by the first receive).
    promoter: Option<promoter::Promoter>,
    last_report: Option<Instant>,
    /// The last round found nothing in the consumer's own shards (so the next may steal).
    found_nothing: bool,
    /// Queues with priorities: the lowest level the next round takes (see
    /// `round::Outcome::full_level`).
    upto: crate::priority::Priority,
    /// The shards may hold messages that no waiter will report: the next `fill` sweeps.
    /// Cleared by a round that left every shard it watches empty (at-least-once leases say
    /// so); set by a waiter's wake, a block timeout, a new assignment. While it is clear an
    /// idle consumer goes straight to its waiters, whose blocking wait returns at once if
    /// something arrived meanwhile: no round is sent just to find the shards empty.
    sweep_due: bool,
    weights: HashMap<String, usize>,
    /// Average payload size per shard, from the last pop that brought messages.
    payload_sizes: HashMap<String, usize>,
    rotate: usize,
}

/// What the last fill brought, for the round started ahead.
#[derive(Debug)]
enum Flow {
    /// Nothing: the next call sweeps or waits as usual.
    Stopped,
    /// Messages from these shards (a full round's givers, or a waiter's shard): the next
    /// round asks them.
    Shards(Vec<String>),
    /// Messages from a round of some shards: the next round asks all of them.
    All,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue.name())
            .field("buffered", &self.buffer.len())
            .finish()
    }
}

impl Consumer {
    /// The next message; waits (blocking server-side) until there is one.
    pub async fn recv(&mut self) -> Result<Message> {
        loop {
            self.queue.check_live().await?;
            self.wait_while_paused(None).await?;
            self.sync_group().await?;
            self.release_stale().await;
            if let Some(m) = self.buffer.pop_front() {
                if let Some(g) = self.group.as_mut() {
                    g.handed(std::slice::from_ref(&m));
                }
                if m.expired() {
                    self.settle_expired(vec![m]).await;
                    continue;
                }
                self.prefetch_if_dry();
                return Ok(m);
            }
            self.fill(None).await?;
        }
    }

    /// Up to `max` messages; waits until there is at least one.
    pub async fn recv_batch(&mut self, max: usize) -> Result<Vec<Message>> {
        loop {
            self.queue.check_live().await?;
            self.wait_while_paused(None).await?;
            self.sync_group().await?;
            self.release_stale().await;
            if !self.buffer.is_empty() {
                let mut out = self.take(max);
                self.drop_expired(&mut out).await;
                if out.is_empty() {
                    continue;
                }
                self.prefetch_if_dry();
                return Ok(out);
            }
            self.fill(None).await?;
        }
    }

    /// Up to `max` messages, waiting at most `timeout` for the first (empty on timeout).
    pub async fn recv_batch_timeout(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Message>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.queue.check_live().await?;
            if !self.wait_while_paused(Some(deadline)).await? {
                return Ok(Vec::new());
            }
            self.sync_group().await?;
            self.release_stale().await;
            if !self.buffer.is_empty() || Instant::now() >= deadline {
                let mut out = self.take(max);
                self.drop_expired(&mut out).await;
                if out.is_empty() && Instant::now() < deadline {
                    continue;
                }
                if !out.is_empty() {
                    self.prefetch_if_dry();
                }
                return Ok(out);
            }
            self.fill(Some(deadline)).await?;
        }
    }

    /// The consumer as a stream of messages.
    pub fn into_stream(self) -> Pin<Box<dyn Stream<Item = Result<Message>> + Send>> {
        Box::pin(futures::stream::unfold(self, |mut c| async move {
            let m = c.recv().await;
            Some((m, c))
        }))
    }

    /// Stops the consumer: ends its blocked pops and pushes every message it popped but
    /// did not hand out back to the head of its shard, and waits until that is done (a
    /// process may exit right after: nothing is left to a task of its own).
    pub async fn close(mut self) {
        // Waiters first: told to stop, each ends its blocked pop and gives back what a
        // late reply brought, or hands it to the inbox, which is still open and read below.
        let waiters: Vec<(JoinHandle<()>, watch::Sender<()>)> =
            self.waiters.drain().map(|(_, w)| w).collect();
        let (handles, stops): (Vec<_>, Vec<_>) = waiters.into_iter().unzip();
        drop(stops);
        for w in handles {
            let _ = w.await;
        }
        if let Some(round) = self.round.as_mut() {
            let replies = round.replies().await;
            let round = self.round.take().expect("a round in flight");
            let out = round::absorb(&self.ctx, &round.asks, round.started, replies);
            self.buffer_up(out.messages);
        }
        let left = self.take_unhanded();
        let (cluster, prefix) = (
            self.queue.cluster().clone(),
            self.queue.prefix().to_string(),
        );
        let group = self.group.take();
        let releases = self.ctx.releases.clone();
        // A release that does not land in this long is left to its task (or, if the
        // process exits, to the lease's expiry): the node is slow or gone.
        let release_limit = (2 * cluster.config().request_timeout_value()).min(self.ctx.lease);
        drop(self);
        return_messages(&cluster, &prefix, left).await;
        releases.settled(release_limit).await;
        if let Some(mut g) = group {
            g.leave().await;
        }
    }

    fn take_unhanded(&mut self) -> Vec<Message> {
        let mut left: Vec<Message> = self.buffer.drain(..).collect();
        while let Ok(batch) = self.inbox_rx.try_recv() {
            left.extend(batch);
        }
        left
    }

    /// Acknowledges many messages at once: one script call per lease, pipelined per node.
    pub async fn ack_all(&self, msgs: &[Message]) -> Result<SettleReport> {
        let refs: Vec<&LeaseRef> = msgs.iter().map(Message::lease).collect::<Result<_>>()?;
        lease::settle_many(&refs, Settle::Ack).await
    }

    /// Gives messages back without counting a delivery: they go to the head of their shard
    /// at once, in their order (for messages taken but not worked on, or not written
    /// where they were meant to go). At-least-once messages are released from their
    /// leases; at-most-once messages, which left Redis when they were popped, are pushed
    /// back to the head of their shard (counted in the report as settled).
    pub async fn release_all(&self, msgs: &[Message]) -> Result<SettleReport> {
        let (leased, plain): (Vec<&Message>, Vec<&Message>) =
            msgs.iter().partition(|m| m.lease.is_some());
        let refs: Vec<&LeaseRef> = leased
            .into_iter()
            .map(Message::lease)
            .collect::<Result<_>>()?;
        let mut report = if refs.is_empty() {
            SettleReport::default()
        } else {
            lease::settle_many(&refs, Settle::Release).await?
        };
        // Plain messages: per shard, in their order, to the head.
        let plain: Vec<Message> = plain.into_iter().cloned().collect();
        for (_, r) in
            giveback::plain_to_head(self.queue.cluster(), self.queue.prefix(), &plain).await
        {
            report.settled += r?;
        }
        Ok(report)
    }

    /// Negatively acknowledges many messages at once (see [`Message::nack`]).
    pub async fn nack_all(
        &self,
        msgs: &[Message],
        delay: Option<Duration>,
    ) -> Result<SettleReport> {
        let refs: Vec<&LeaseRef> = msgs.iter().map(Message::lease).collect::<Result<_>>()?;
        lease::settle_many(&refs, Settle::Nack(delay.unwrap_or_default(), "".into())).await
    }

    /// The queue this consumer reads.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Appends popped messages to the buffer; into an empty buffer they move as a whole
    /// (messages are large, and a round brings thousands).
    fn buffer_up(&mut self, messages: Vec<Message>) {
        if self.buffer.is_empty() {
            self.buffer = messages.into();
        } else {
            self.buffer.extend(messages);
        }
    }

    fn take(&mut self, max: usize) -> Vec<Message> {
        let n = max.min(self.buffer.len());
        let out: Vec<Message> = if n == self.buffer.len() {
            // All of it: the buffer's storage becomes the batch, nothing is moved.
            std::mem::take(&mut self.buffer).into()
        } else if n >= self.buffer.len() - n {
            // Most of it: the rest moves out instead, and the storage becomes the batch
            // (a round can bring more than one call takes; moving the smaller part of
            // thousands of messages is what this saves).
            let mut all: Vec<Message> = std::mem::take(&mut self.buffer).into();
            self.buffer = all.split_off(n).into();
            all
        } else {
            self.buffer.drain(..n).collect()
        };
        if let Some(g) = self.group.as_mut() {
            g.handed(&out);
        }
        out
    }

    fn set_busy(&self) {
        self.attention.send_replace(Attention::Busy);
        if let Some(g) = &self.group {
            g.idle(false);
        }
    }

    /// Group members: joins on first use, follows assignment changes (stops the waiters of
    /// shards it no longer owns; in ordered groups, gives back what it buffered from shards
    /// it must release), and tells the group what it holds.
    async fn sync_group(&mut self) -> Result<()> {
        let Some(g) = self.group.as_mut() else {
            return Ok(());
        };
        g.ensure_joined(&self.queue, self.ctx.lease).await?;
        // Ordered: nothing is handed out while this member cannot be sure it is still one
        // (paused, or cut off from the registry's master): it waits for a heartbeat, whose
        // view then says which of its shards are still its own.
        if g.cfg.ordered && !g.valid() {
            let bound = g.cfg.timeout;
            let _ = tokio::time::timeout(bound, g.renewed()).await;
            if !g.valid() {
                return Err(crate::error::Error::MembershipLapsed {
                    group: g.cfg.name.clone(),
                    timeout: bound,
                });
            }
        }
        // Ordered: a round in flight is absorbed before a new view is taken, so that what
        // it brings of a shard the view takes away goes back in the same call as what is
        // buffered of it (see `ordered_giveback`).
        if g.cfg.ordered && g.view_pending() && self.round.is_some() {
            self.settle_round_in_flight().await;
        }
        let g = self.group.as_mut().expect("a group");
        let changed = g.refresh();
        if let Some(view) = &changed {
            // Dropping a waiter's sender ends its blocked pop; it gives back what it took.
            self.waiters.retain(|tag, _| view.owned.contains(tag));
            if g.cfg.ordered {
                // Shards released to another member, lost without a handover (membership
                // lapsed, fenced) or granted anew: what is buffered of them goes back.
                while let Ok(batch) = self.inbox_rx.try_recv() {
                    self.buffer.extend(batch);
                }
                let mut gone: HashSet<Arc<str>> = self
                    .buffer
                    .iter()
                    .filter(|m| !g.holds(m))
                    .map(|m| m.shard.clone())
                    .collect();
                gone.extend(view.released.iter().map(|t| Arc::from(t.as_str())));
                self.give_back_ordered(&gone, Vec::new());
            }
        }
        let g = self.group.as_mut().expect("a group");
        let due = self.last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        if changed.is_some() || due {
            // A round in flight may bring messages of the shards it asked: they stay held.
            let asked = self
                .round
                .iter()
                .flat_map(|r| r.asks.iter().map(|a| a.keys.tag.to_string()));
            g.report(asked);
            self.last_report = Some(Instant::now());
        }
        Ok(())
    }

    /// At-least-once: messages at the front of the buffer whose lease has less than a
    /// quarter of its length left are released (no delivery counted) instead of handed out,
    /// so that a slow application never gets a message it cannot settle in time, and the
    /// reaper never counts an attempt for a message nobody saw.
    async fn release_stale(&mut self) {
        let Some(lease_len) = self.ctx.max_attempts.map(|_| self.ctx.lease) else {
            return;
        };
        let cutoff = Instant::now() + lease_len / 4;
        let near_over = |m: &Message| {
            m.lease
                .as_ref()
                .is_some_and(|l| l.lease.local_deadline.get() < cutoff)
        };
        if self.group.as_ref().is_some_and(|g| g.cfg.ordered) {
            // Ordered: nothing newer of those shards may be handed out before the stale
            // messages come back, so everything held of them goes back with them.
            let shards: HashSet<Arc<str>> = self
                .buffer
                .iter()
                .take_while(|m| near_over(m))
                .map(|m| m.shard.clone())
                .collect();
            if !shards.is_empty() {
                tracing::debug!(
                    shards = shards.len(),
                    "releasing buffered messages whose lease is nearly over"
                );
                self.settle_round_in_flight().await;
                self.give_back_ordered(&shards, Vec::new());
            }
            return;
        }
        let mut stale = Vec::new();
        while self.buffer.front().is_some_and(near_over) {
            stale.push(self.buffer.pop_front().expect("a front message"));
        }
        if stale.is_empty() {
            return;
        }
        tracing::debug!(
            count = stale.len(),
            "releasing buffered messages whose lease is nearly over"
        );
        let (cluster, prefix) = (
            self.queue.cluster().clone(),
            self.queue.prefix().to_string(),
        );
        tokio::spawn(async move { return_messages(&cluster, &prefix, stale).await });
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Messages popped but never handed out go back to the head of their shards, and so
        // do those of a round still in flight, once it ends.
        let left = self.take_unhanded();
        let round = self.round.take();
        if left.is_empty() && round.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                count = left.len(),
                "consumer dropped outside a runtime: messages not returned"
            );
            return;
        };
        let cluster = self.queue.cluster().clone();
        let prefix = self.queue.prefix().to_string();
        let ctx = self.ctx.clone();
        rt.spawn(async move {
            let mut left = left;
            if let Some(mut round) = round {
                let replies = round.replies().await;
                left.extend(round::absorb(&ctx, &round.asks, round.started, replies).messages);
            }
            return_messages(&cluster, &prefix, left).await
        });
    }
}
