//! The balanced consumer.
//!
//! A consumer sweeps every shard of the queue in one round trip: one `LPOP key count` per
//! shard, pipelined per node, all nodes at once. Shards that returned a full batch get a
//! larger count next round (deepest first, up to 8x), and every shard is asked every round,
//! so none starves. Nodes that are down are skipped for the round.
//!
//! When a sweep finds every shard empty, the consumer blocks server-side instead of
//! polling: one waiter per shard holds a dedicated connection to the shard's master and
//! runs `BLMPOP` with a finite server timeout and a client deadline a bit longer. A waiter
//! that pops messages hands them to the consumer; new data wakes it within a round trip.
//! Waiters recover from MOVED / UNBLOCKED / CLUSTERDOWN replies and silent nodes, then
//! block again. When the consumer is dropped, blocked waiters are unblocked (`CLIENT
//! UNBLOCK`) and anything popped but not handed out is pushed back to the head of its
//! shard.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use redis::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

mod grouped;
mod round;
mod waiter;

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::group::{DEFAULT_GROUP, DEFAULT_MEMBER_TIMEOUT, GroupConfig};
use crate::lease::{self, LeaseId, LeaseRef, MessageId, Settle, SettleReport, Settled, ShardKeys};
use crate::placement::DeliveryMode;
use crate::placement::{Shard, ready_key};
use crate::queue::Queue;
use crate::slot::Slot;
use grouped::Grouped;
use round::{Ask, Round};
use waiter::Waiter;

/// Messages asked from each shard per sweep (before depth weighting).
pub const DEFAULT_POP_BATCH: usize = 128;
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

/// One message popped from a queue.
///
/// From an at-least-once queue a message also carries its id, its delivery number and a
/// lease: settle it with [`Message::ack`] or [`Message::nack`] (or in bulk with
/// [`Consumer::ack_all`]) before the lease expires, or it is delivered again.
#[derive(Debug, Clone)]
pub struct Message {
    /// The payload as sent.
    pub payload: Vec<u8>,
    /// The shard it came from.
    pub shard: Arc<str>,
    /// At-least-once queues: the message id, the same on every delivery.
    pub id: Option<MessageId>,
    /// Which delivery this is (1 for the first; always 1 for at-most-once queues).
    pub attempt: u32,
    /// At-least-once queues: when it was first enqueued (ms since the Unix epoch).
    pub enqueued_ms: Option<u64>,
    lease: Option<LeaseRef>,
}

/// The name the at-least-once documentation uses for a leased message.
pub type Delivery = Message;

impl Message {
    fn plain(payload: Vec<u8>, shard: Arc<str>) -> Message {
        Message {
            payload,
            shard,
            id: None,
            attempt: 1,
            enqueued_ms: None,
            lease: None,
        }
    }

    fn lease(&self) -> Result<&LeaseRef> {
        self.lease.as_ref().ok_or_else(|| {
            Error::NotReliable(
                "this message came from an at-most-once queue: there is nothing to settle".into(),
            )
        })
    }

    /// Acknowledges the message: it is done and will not be delivered again.
    pub async fn ack(&self) -> Result<Settled> {
        lease::settle_one(self.lease()?, Settle::Ack).await
    }

    /// Negatively acknowledges the message: it is delivered again (after `delay`, if
    /// given), or goes to the dead letters once it used up its attempts.
    pub async fn nack(&self, delay: Option<Duration>) -> Result<Settled> {
        lease::settle_one(self.lease()?, Settle::Nack(delay.unwrap_or_default())).await
    }

    /// Extends the lease of this message (and of the messages popped with it) to `by` from
    /// now. Returns the new deadline, or `None` when the lease had already expired.
    pub async fn extend(&self, by: Duration) -> Result<Option<std::time::SystemTime>> {
        lease::extend(self.lease()?, by).await
    }

    /// At-least-once queues: which lease holds the message (shard, lease number). Messages
    /// popped together share a lease; settling a lease's messages is one script call.
    pub fn lease_id(&self) -> Option<(Arc<str>, LeaseId)> {
        self.lease
            .as_ref()
            .map(|l| (l.lease.keys.tag.clone(), l.lease.id))
    }

    /// The lease deadline (server clock, ms since the Unix epoch) as of the pop.
    pub fn lease_deadline_ms(&self) -> Option<i64> {
        self.lease.as_ref().map(|l| l.lease.deadline_ms)
    }
}

/// Settings of a [`Consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    queue: Queue,
    pop_batch: usize,
    block_timeout: Duration,
    lease: Duration,
    group: Option<String>,
    ordered: bool,
    member_timeout: Duration,
}

impl ConsumerBuilder {
    pub(crate) fn new(queue: Queue) -> Self {
        ConsumerBuilder {
            queue,
            pop_batch: DEFAULT_POP_BATCH,
            block_timeout: DEFAULT_BLOCK_TIMEOUT,
            lease: lease::DEFAULT_LEASE,
            group: Some(DEFAULT_GROUP.to_string()),
            ordered: false,
            member_timeout: DEFAULT_MEMBER_TIMEOUT,
        }
    }

    /// Joins the consumer group `name` (every consumer joins the group
    /// [`DEFAULT_GROUP`] unless told otherwise): the group's members share the shards,
    /// each sweeping and blocking only on its own, so an idle group costs about one blocked
    /// pop per shard however many members it has.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.group = Some(name.into());
        self
    }

    /// Reads every shard itself, in no group (for one-off reads and tools: it neither
    /// takes shards from a running group nor is counted in it).
    pub fn without_group(mut self) -> Self {
        self.group = None;
        self
    }

    /// Ordered mode: exclusive ownership, no stealing, and a shard changes owner only once
    /// the old owner's work on it is settled (or its leases expired), so per-key FIFO holds
    /// in processing, not just in pops. See `docs/architecture.md` for the exact guarantee.
    pub fn ordered(mut self) -> Self {
        self.ordered = true;
        self
    }

    /// How long a member that stopped renewing its membership stays one (default 3 s;
    /// it renews every third of that).
    pub fn member_timeout(mut self, d: Duration) -> Self {
        self.member_timeout = d;
        self
    }

    /// At-least-once queues: how long a popped message may stay unsettled before it is
    /// delivered again (the visibility timeout).
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }

    /// Messages asked from each shard per sweep.
    pub fn pop_batch(mut self, n: usize) -> Self {
        self.pop_batch = n;
        self
    }

    /// Server-side timeout of blocking pops (the client waits [`BLOCK_GRACE`] longer).
    pub fn block_timeout(mut self, d: Duration) -> Self {
        self.block_timeout = d;
        self
    }

    /// Validates the settings and makes the consumer.
    pub fn build(self) -> Result<Consumer> {
        if self.pop_batch == 0 {
            return Err(Error::Config("pop_batch must be at least 1".into()));
        }
        if self.block_timeout < Duration::from_millis(10) {
            return Err(Error::Config("block_timeout must be at least 10 ms".into()));
        }
        if self.lease < Duration::from_millis(10) {
            return Err(Error::Config("lease must be at least 10 ms".into()));
        }
        if let Some(g) = &self.group {
            crate::group::validate_group_name(g)?;
        }
        if self.member_timeout < Duration::from_millis(300) {
            return Err(Error::Config(
                "member_timeout must be at least 300 ms".into(),
            ));
        }
        if self.ordered && self.group.is_none() {
            return Err(Error::Config("ordered mode needs a group".into()));
        }
        // A lease is one script reply; keep it well inside Lua's limits.
        let pop_batch = self.pop_batch.min(MAX_LEASE_BATCH / MAX_WEIGHT);
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let max_attempts = match self.queue.mode() {
            DeliveryMode::AtMostOnce => None,
            DeliveryMode::AtLeastOnce { max_attempts } => Some(max_attempts),
        };
        Ok(Consumer {
            pop_batch: if max_attempts.is_some() {
                pop_batch
            } else {
                self.pop_batch
            },
            ctx: round::Ctx {
                cluster: self.queue.cluster().clone(),
                scripts: self.queue.inner.lease_scripts.clone(),
                max_attempts,
                lease: self.lease,
            },
            round: None,
            queue: self.queue,
            block_timeout: self.block_timeout,
            keys: HashMap::new(),
            buffer: VecDeque::new(),
            inbox_tx,
            inbox_rx,
            idle: watch::Sender::new(false),
            waiters: HashMap::new(),
            group: self.group.map(|name| {
                Grouped::new(GroupConfig {
                    name,
                    ordered: self.ordered,
                    timeout: self.member_timeout,
                })
            }),
            last_report: None,
            found_nothing: true,
            weights: HashMap::new(),
            payload_sizes: HashMap::new(),
            rotate: 0,
        })
    }
}

/// Receives messages from a queue. One consumer serves one task; make as many as needed.
pub struct Consumer {
    queue: Queue,
    pop_batch: usize,
    block_timeout: Duration,
    ctx: round::Ctx,
    /// The poll round in flight, kept across a cancelled call.
    round: Option<Round>,
    keys: HashMap<String, Arc<ShardKeys>>,
    buffer: VecDeque<Message>,
    inbox_tx: mpsc::UnboundedSender<Vec<Message>>,
    inbox_rx: mpsc::UnboundedReceiver<Vec<Message>>,
    idle: watch::Sender<bool>,
    /// A waiter per shard blocked on; dropping its sender tells it to stop.
    waiters: HashMap<String, (JoinHandle<()>, watch::Sender<()>)>,
    /// The consumer's group, unless it reads every shard itself.
    group: Option<Grouped>,
    last_report: Option<Instant>,
    /// The last round found nothing in the consumer's own shards (so the next may steal).
    found_nothing: bool,
    weights: HashMap<String, usize>,
    /// Average payload size per shard, from the last pop that brought messages.
    payload_sizes: HashMap<String, usize>,
    rotate: usize,
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
            self.sync_group().await?;
            self.release_stale();
            if let Some(m) = self.buffer.pop_front() {
                if let Some(g) = self.group.as_mut() {
                    g.handed(std::slice::from_ref(&m));
                }
                return Ok(m);
            }
            self.fill(None).await?;
        }
    }

    /// Up to `max` messages; waits until there is at least one.
    pub async fn recv_batch(&mut self, max: usize) -> Result<Vec<Message>> {
        loop {
            self.sync_group().await?;
            self.release_stale();
            if !self.buffer.is_empty() {
                return Ok(self.take(max));
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
            self.sync_group().await?;
            self.release_stale();
            if !self.buffer.is_empty() || Instant::now() >= deadline {
                return Ok(self.take(max));
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
    /// did not hand out back to the head of its shard, and waits until that is done.
    pub async fn close(mut self) {
        if let Some(round) = self.round.as_mut() {
            let replies = round.replies().await;
            let round = self.round.take().expect("a round in flight");
            let out = round::absorb(&self.ctx, &round.asks, round.started, replies);
            self.buffer.extend(out.messages);
        }
        let left = self.take_unhanded();
        let waiters: Vec<JoinHandle<()>> = self.waiters.drain().map(|(_, (h, _))| h).collect();
        let (cluster, prefix) = (
            self.queue.cluster().clone(),
            self.queue.inner.prefix.clone(),
        );
        let group = self.group.take();
        drop(self);
        return_messages(&cluster, &prefix, left).await;
        for w in waiters {
            let _ = w.await;
        }
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
    /// at once (for messages taken but not worked on).
    pub async fn release_all(&self, msgs: &[Message]) -> Result<SettleReport> {
        let refs: Vec<&LeaseRef> = msgs.iter().map(Message::lease).collect::<Result<_>>()?;
        lease::settle_many(&refs, Settle::Release).await
    }

    /// Negatively acknowledges many messages at once (see [`Message::nack`]).
    pub async fn nack_all(
        &self,
        msgs: &[Message],
        delay: Option<Duration>,
    ) -> Result<SettleReport> {
        let refs: Vec<&LeaseRef> = msgs.iter().map(Message::lease).collect::<Result<_>>()?;
        lease::settle_many(&refs, Settle::Nack(delay.unwrap_or_default())).await
    }

    /// The queue this consumer reads.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    fn take(&mut self, max: usize) -> Vec<Message> {
        let n = max.min(self.buffer.len());
        let out: Vec<Message> = self.buffer.drain(..n).collect();
        if let Some(g) = self.group.as_mut() {
            g.handed(&out);
        }
        out
    }

    fn set_busy(&self) {
        self.idle.send_replace(false);
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
        let changed = g.refresh();
        if let Some(view) = &changed {
            // Dropping a waiter's sender ends its blocked pop; it gives back what it took.
            self.waiters.retain(|tag, _| view.owned.contains(tag));
            if g.cfg.ordered && !view.released.is_empty() {
                while let Ok(batch) = self.inbox_rx.try_recv() {
                    self.buffer.extend(batch);
                }
                for tag in g.released().clone() {
                    let (give, keep): (Vec<Message>, Vec<Message>) =
                        self.buffer.drain(..).partition(|m| *m.shard == *tag);
                    self.buffer.extend(keep);
                    let (cluster, prefix) = (
                        self.queue.cluster().clone(),
                        self.queue.inner.prefix.clone(),
                    );
                    let task =
                        tokio::spawn(async move { return_messages(&cluster, &prefix, give).await });
                    g.returning(tag, task);
                }
            }
        }
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

    /// Gets at least one message into the buffer, or returns at the deadline.
    async fn fill(&mut self, deadline: Option<Instant>) -> Result<()> {
        loop {
            while let Ok(batch) = self.inbox_rx.try_recv() {
                self.buffer.extend(batch);
            }
            if !self.buffer.is_empty() {
                self.set_busy();
                return Ok(());
            }
            if self.sweep().await? > 0 {
                self.set_busy();
                return Ok(());
            }
            self.ensure_waiters();
            self.idle.send_replace(true);
            if let Some(g) = &self.group {
                g.idle(true);
            }
            let wake = Instant::now() + self.block_timeout;
            let until = deadline.map_or(wake, |d| d.min(wake));
            let regroup = async {
                match self.group.as_mut() {
                    Some(g) => g.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                got = self.inbox_rx.recv() => {
                    if let Some(batch) = got {
                        self.buffer.extend(batch);
                    }
                }
                _ = regroup => {
                    // The assignment changed: take it in and sweep what is now ours.
                    return Ok(());
                }
                _ = tokio::time::sleep_until(until.into()) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(());
                    }
                    // Sweep again after each block timeout: it picks up new shards and, for
                    // at-least-once queues, returns expired leases to the ready lists.
                }
            }
        }
    }

    /// One round: a pop on every shard, one pipeline per node. Cancel-safe: a round cut
    /// short by a cancelled caller is resumed by the next call (see [`round`]).
    async fn sweep(&mut self) -> Result<usize> {
        if self.round.is_none() {
            let asks = self.plan_round();
            if asks.is_empty() {
                return Ok(0);
            }
            self.round = Some(Round::start(&self.ctx, asks));
        }
        let replies = self
            .round
            .as_mut()
            .expect("a round in flight")
            .replies()
            .await;
        let round = self.round.take().expect("a round in flight");
        let out = round::absorb(&self.ctx, &round.asks, round.started, replies);
        for ((ask, full), (n, bytes)) in round.asks.iter().zip(&out.full).zip(&out.sizes) {
            let w = self.weights.entry(ask.keys.tag.to_string()).or_insert(1);
            if *full
                && *w == 1
                && let Some(g) = &self.group
            {
                g.deep_now();
            }
            *w = if *full { (*w * 2).min(MAX_WEIGHT) } else { 1 };
            if *n > 0 {
                self.payload_sizes
                    .insert(ask.keys.tag.to_string(), (bytes / n).max(1));
            }
        }
        let mut out = out;
        if let Some(g) = self.group.as_mut()
            && g.cfg.ordered
        {
            // A round sent before a shard was released may bring its messages: they go
            // back, and the shard stays held until they are.
            let (mine, gone): (Vec<Message>, Vec<Message>) = out
                .messages
                .into_iter()
                .partition(|m| g.owned().contains(&*m.shard));
            out.messages = mine;
            let mut by_shard: HashMap<Arc<str>, Vec<Message>> = HashMap::new();
            for m in gone {
                by_shard.entry(m.shard.clone()).or_default().push(m);
            }
            for (tag, give) in by_shard {
                let (cluster, prefix) = (
                    self.queue.cluster().clone(),
                    self.queue.inner.prefix.clone(),
                );
                let task =
                    tokio::spawn(async move { return_messages(&cluster, &prefix, give).await });
                g.returning(tag.to_string(), task);
            }
        }
        let got = out.messages.len();
        if let Some(g) = &self.group {
            g.swept(round.asks.iter().map(|a| &*a.keys.tag));
            let stolen = out
                .messages
                .iter()
                .filter(|m| !g.owned().contains(&*m.shard))
                .count();
            if stolen > 0 {
                metrics::counter!(crate::telemetry::GROUP_STEALS, "group" => g.cfg.name.clone())
                    .increment(stolen as u64);
            }
            self.found_nothing = got == stolen;
        }
        self.buffer.extend(out.messages);
        let queue = self.queue.name().to_string();
        metrics::histogram!(crate::telemetry::POP_ROUND_SECONDS, "queue" => queue.clone())
            .record(round.started.elapsed().as_secs_f64());
        metrics::counter!(crate::telemetry::POPPED, "queue" => queue).increment(got as u64);
        match out.error {
            // What other shards gave is handed out; the error comes back when the queue
            // had nothing else to give.
            Some(e) if got == 0 => Err(e),
            _ => Ok(got),
        }
    }

    /// What to ask of each shard this round: deepest first, starting from a rotating
    /// shard, every shard every round.
    fn plan_round(&mut self) -> Vec<Ask> {
        let set = self.queue.shards();
        let mine: Vec<Shard>;
        let shards = match &self.group {
            None => &set.shards,
            Some(g) => {
                let sweep = g.sweep_set(self.found_nothing);
                mine = set
                    .shards
                    .iter()
                    .filter(|s| sweep.contains(&s.tag) && !g.is_returning(&s.tag))
                    .cloned()
                    .collect();
                &mine
            }
        };
        if shards.is_empty() {
            return Vec::new();
        }
        self.rotate = (self.rotate + 1) % shards.len();
        let mut order: Vec<&Shard> = shards[self.rotate..]
            .iter()
            .chain(&shards[..self.rotate])
            .collect();
        order.sort_by_key(|s| std::cmp::Reverse(self.weights.get(&s.tag).copied().unwrap_or(1)));
        let reliable = self.ctx.max_attempts.is_some();
        order
            .into_iter()
            .map(|s| {
                let wanted = self.pop_batch * self.weights.get(&s.tag).copied().unwrap_or(1);
                // Bounded by bytes too: few messages at a time while their size is unknown.
                let count = match self.payload_sizes.get(&s.tag) {
                    Some(size) => wanted.min((round::MAX_POP_BYTES / size).max(1)),
                    None => wanted.min(round::FIRST_POP_COUNT),
                };
                Ask {
                    keys: self.keys_of(&s.tag),
                    count,
                    lease: reliable.then(LeaseId::random),
                }
            })
            .collect()
    }

    fn keys_of(&mut self, tag: &str) -> Arc<ShardKeys> {
        let prefix = &self.queue.inner.prefix;
        self.keys
            .entry(tag.to_string())
            .or_insert_with(|| Arc::new(ShardKeys::new(prefix, tag)))
            .clone()
    }

    /// At-least-once: messages at the front of the buffer whose lease has less than a
    /// quarter of its length left are released (no delivery counted) instead of handed out,
    /// so that a slow application never gets a message it cannot settle in time, and the
    /// reaper never counts an attempt for a message nobody saw.
    fn release_stale(&mut self) {
        let Some(lease_len) = self.ctx.max_attempts.map(|_| self.ctx.lease) else {
            return;
        };
        let cutoff = Instant::now() + lease_len / 4;
        let mut stale = Vec::new();
        while let Some(m) = self.buffer.front() {
            match &m.lease {
                Some(l) if l.lease.local_deadline < cutoff => {
                    stale.push(self.buffer.pop_front().expect("a front message"));
                }
                _ => break,
            }
        }
        if stale.is_empty() {
            return;
        }
        if self.group.as_ref().is_some_and(|g| g.cfg.ordered) {
            // Ordered: nothing newer of those shards may be handed out before the stale
            // messages come back, so everything buffered of them goes back too.
            let shards: std::collections::HashSet<Arc<str>> =
                stale.iter().map(|m| m.shard.clone()).collect();
            let (more, keep): (Vec<Message>, Vec<Message>) = self
                .buffer
                .drain(..)
                .partition(|m| shards.contains(&m.shard));
            self.buffer.extend(keep);
            stale.extend(more);
        }
        tracing::debug!(
            count = stale.len(),
            "releasing buffered messages whose lease is nearly over"
        );
        let (cluster, prefix) = (
            self.queue.cluster().clone(),
            self.queue.inner.prefix.clone(),
        );
        match self.group.as_mut() {
            Some(g) if g.cfg.ordered => {
                // Tracked per shard: an ordered consumer pops none of them until the
                // released messages are back at the head.
                let mut by_shard: HashMap<Arc<str>, Vec<Message>> = HashMap::new();
                for m in stale {
                    by_shard.entry(m.shard.clone()).or_default().push(m);
                }
                for (tag, give) in by_shard {
                    let (cluster, prefix) = (cluster.clone(), prefix.clone());
                    let task =
                        tokio::spawn(async move { return_messages(&cluster, &prefix, give).await });
                    g.returning(tag.to_string(), task);
                }
            }
            _ => {
                tokio::spawn(async move { return_messages(&cluster, &prefix, stale).await });
            }
        }
    }

    /// Starts a waiter for every shard that has none running.
    fn ensure_waiters(&mut self) {
        let set = self.queue.shards();
        self.waiters.retain(|_, (h, _)| !h.is_finished());
        for s in &set.shards {
            if self.waiters.contains_key(&s.tag) {
                continue;
            }
            if let Some(g) = &self.group
                && !g.owned().contains(&s.tag)
            {
                continue;
            }
            let (stop, alive) = watch::channel(());
            let w = Waiter {
                cluster: self.queue.cluster().clone(),
                slot: s.slot,
                tag: Arc::from(s.tag.as_str()),
                key: ready_key(&self.queue.inner.prefix, &s.tag),
                count: self.pop_batch,
                block: self.block_timeout,
                idle: self.idle.subscribe(),
                alive,
                tx: self.inbox_tx.clone(),
                reliable: self.ctx.max_attempts.is_some(),
            };
            self.waiters
                .insert(s.tag.clone(), (tokio::spawn(w.run()), stop));
        }
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
        let prefix = self.queue.inner.prefix.clone();
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

async fn return_messages(cluster: &Cluster, prefix: &str, left: Vec<Message>) {
    // Leased messages go back through their lease (so the lease ends with them).
    let (leased, plain): (Vec<Message>, Vec<Message>) =
        left.into_iter().partition(|m| m.lease.is_some());
    if !leased.is_empty() {
        // Newest lease first: each goes back to the head of its shard, so the oldest must
        // go last to end up first, where it was.
        let refs: Vec<&LeaseRef> = leased
            .iter()
            .rev()
            .filter_map(|m| m.lease.as_ref())
            .collect();
        if let Err(e) = lease::settle_many(&refs, Settle::Release).await {
            tracing::warn!(cause = %e, "could not return leased messages; they return when their lease expires");
        }
    }
    let left = plain;
    let mut by_shard: HashMap<Arc<str>, Vec<Vec<u8>>> = HashMap::new();
    for m in left {
        by_shard.entry(m.shard).or_default().push(m.payload);
    }
    for (tag, payloads) in by_shard {
        let key = ready_key(prefix, &tag);
        give_back(cluster, crate::slot::tag_slot(&tag), &key, payloads).await;
    }
}

/// Pushes popped payloads back to the head of their list, first one first.
pub(super) async fn give_back(cluster: &Cluster, slot: Slot, key: &str, payloads: Vec<Vec<u8>>) {
    if payloads.is_empty() {
        return;
    }
    let n = payloads.len();
    let mut cmd = redis::cmd("LPUSH");
    cmd.arg(key);
    for p in payloads.iter().rev() {
        cmd.arg(p.as_slice());
    }
    if let Err(e) = cluster.query::<Value>(slot, &cmd).await {
        tracing::error!(key, count = n, cause = %e, "could not return popped messages");
    }
}

/// Parses an `LPOP key count` reply (nil or an array of payloads).
pub(super) fn list_items(v: Value) -> Result<Vec<Vec<u8>>> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::BulkString(b) => Ok(b),
                other => Err(Error::Protocol(format!("pop: unexpected item {other:?}"))),
            })
            .collect(),
        other => Err(Error::Protocol(format!("pop: unexpected reply {other:?}"))),
    }
}
