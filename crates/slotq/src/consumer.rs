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

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::lease::{self, Lease, LeaseRef, MessageId, Settle, SettleReport, Settled, ShardKeys};
use crate::placement::DeliveryMode;
use crate::placement::{Shard, ready_key};
use crate::queue::Queue;
use crate::slot::Slot;
use crate::topology::NodeAddr;

/// Messages asked from each shard per sweep (before depth weighting).
pub const DEFAULT_POP_BATCH: usize = 128;
/// Server-side timeout of a blocking pop.
pub const DEFAULT_BLOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than the server timeout the client waits for a blocking pop's reply.
pub const BLOCK_GRACE: Duration = Duration::from_secs(1);
/// Pause before a waiter retries after an error.
const WAITER_RETRY_PAUSE: Duration = Duration::from_millis(100);
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
    pub fn lease_id(&self) -> Option<(Arc<str>, i64)> {
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
}

impl ConsumerBuilder {
    pub(crate) fn new(queue: Queue) -> Self {
        ConsumerBuilder {
            queue,
            pop_batch: DEFAULT_POP_BATCH,
            block_timeout: DEFAULT_BLOCK_TIMEOUT,
            lease: lease::DEFAULT_LEASE,
        }
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
            queue: self.queue,
            block_timeout: self.block_timeout,
            lease: self.lease,
            max_attempts,
            keys: HashMap::new(),
            buffer: VecDeque::new(),
            inbox_tx,
            inbox_rx,
            idle: watch::Sender::new(false),
            alive: watch::Sender::new(()),
            waiters: HashMap::new(),
            weights: HashMap::new(),
            rotate: 0,
        })
    }
}

/// Receives messages from a queue. One consumer serves one task; make as many as needed.
pub struct Consumer {
    queue: Queue,
    pop_batch: usize,
    block_timeout: Duration,
    lease: Duration,
    /// `Some` for at-least-once queues.
    max_attempts: Option<u32>,
    keys: HashMap<String, Arc<ShardKeys>>,
    buffer: VecDeque<Message>,
    inbox_tx: mpsc::UnboundedSender<Vec<Message>>,
    inbox_rx: mpsc::UnboundedReceiver<Vec<Message>>,
    idle: watch::Sender<bool>,
    /// Never changes; its drop tells the waiters that the consumer is gone.
    alive: watch::Sender<()>,
    waiters: HashMap<String, JoinHandle<()>>,
    weights: HashMap<String, usize>,
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
            if let Some(m) = self.buffer.pop_front() {
                return Ok(m);
            }
            self.fill(None).await?;
        }
    }

    /// Up to `max` messages; waits until there is at least one.
    pub async fn recv_batch(&mut self, max: usize) -> Result<Vec<Message>> {
        while self.buffer.is_empty() {
            self.fill(None).await?;
        }
        Ok(self.take(max))
    }

    /// Up to `max` messages, waiting at most `timeout` for the first (empty on timeout).
    pub async fn recv_batch_timeout(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Message>> {
        let deadline = Instant::now() + timeout;
        while self.buffer.is_empty() && Instant::now() < deadline {
            self.fill(Some(deadline)).await?;
        }
        Ok(self.take(max))
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
        let left = self.take_unhanded();
        let waiters: Vec<JoinHandle<()>> = self.waiters.drain().map(|(_, h)| h).collect();
        let (cluster, prefix) = (
            self.queue.cluster().clone(),
            self.queue.inner.prefix.clone(),
        );
        drop(self);
        return_messages(&cluster, &prefix, left).await;
        for w in waiters {
            let _ = w.await;
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
        self.buffer.drain(..n).collect()
    }

    /// Gets at least one message into the buffer, or returns at the deadline.
    async fn fill(&mut self, deadline: Option<Instant>) -> Result<()> {
        loop {
            while let Ok(batch) = self.inbox_rx.try_recv() {
                self.buffer.extend(batch);
            }
            if !self.buffer.is_empty() {
                self.idle.send_replace(false);
                return Ok(());
            }
            if self.sweep().await? > 0 {
                self.idle.send_replace(false);
                return Ok(());
            }
            self.ensure_waiters();
            self.idle.send_replace(true);
            let wake = Instant::now() + self.block_timeout;
            let until = deadline.map_or(wake, |d| d.min(wake));
            tokio::select! {
                got = self.inbox_rx.recv() => {
                    if let Some(batch) = got {
                        self.buffer.extend(batch);
                    }
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

    /// One round: `LPOP key count` on every shard, one pipeline per node.
    async fn sweep(&mut self) -> Result<usize> {
        let set = self.queue.shards();
        let shards = &set.shards;
        if shards.is_empty() {
            return Ok(0);
        }
        self.rotate = (self.rotate + 1) % shards.len();
        let mut order: Vec<&Shard> = shards[self.rotate..]
            .iter()
            .chain(&shards[..self.rotate])
            .collect();
        order.sort_by_key(|s| std::cmp::Reverse(self.weights.get(&s.tag).copied().unwrap_or(1)));
        let counts: Vec<usize> = order
            .iter()
            .map(|s| self.pop_batch * self.weights.get(&s.tag).copied().unwrap_or(1))
            .collect();
        let cluster = self.queue.cluster().clone();
        let mut opts = cluster.default_opts();
        // A node that is down is skipped for this round, not waited for.
        opts.retry_budget = Duration::ZERO;
        let keys: Vec<Arc<ShardKeys>> = order.iter().map(|s| self.keys_of(&s.tag)).collect();
        let started = Instant::now();
        let replies = match self.max_attempts {
            None => {
                let cmds = keys
                    .iter()
                    .zip(&counts)
                    .map(|(k, n)| (k.slot, redis::cmd("LPOP").arg(&k.ready).arg(*n).clone()))
                    .collect();
                cluster.batch(cmds, opts).await
            }
            Some(max_attempts) => {
                let scripts = self.queue.inner.lease_scripts.clone();
                let calls: Vec<crate::script::Call<'_>> = keys
                    .iter()
                    .zip(&counts)
                    .map(|(k, n)| k.pop_call(&scripts, *n, self.lease, max_attempts))
                    .collect();
                crate::script::run_batch(&cluster, &calls, opts).await
            }
        };
        let mut got = 0;
        for ((k, n), reply) in keys.iter().zip(counts).zip(replies) {
            match reply {
                Ok(v) => {
                    let popped = match self.max_attempts {
                        None => {
                            let buffer = &mut self.buffer;
                            each_item(v, |payload| {
                                buffer.push_back(Message::plain(payload, k.tag.clone()))
                            })?
                        }
                        Some(max_attempts) => self.take_lease(&cluster, k, v, max_attempts)?,
                    };
                    let full = popped >= n;
                    got += popped;
                    let w = self.weights.entry(k.tag.to_string()).or_insert(1);
                    *w = if full { (*w * 2).min(MAX_WEIGHT) } else { 1 };
                }
                Err(e) if e.is_retryable() => {
                    tracing::debug!(shard = %k.tag, cause = %e, "shard skipped this round");
                }
                Err(e) => return Err(e),
            }
        }
        let queue = self.queue.name().to_string();
        metrics::histogram!(crate::telemetry::POP_ROUND_SECONDS, "queue" => queue.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(crate::telemetry::POPPED, "queue" => queue).increment(got as u64);
        Ok(got)
    }

    fn keys_of(&mut self, tag: &str) -> Arc<ShardKeys> {
        let prefix = &self.queue.inner.prefix;
        self.keys
            .entry(tag.to_string())
            .or_insert_with(|| Arc::new(ShardKeys::new(prefix, tag)))
            .clone()
    }

    /// Buffers the messages of a reliable pop reply `[lease, deadline, reaped, envelope...]`.
    fn take_lease(
        &mut self,
        cluster: &Cluster,
        keys: &Arc<ShardKeys>,
        v: Value,
        max_attempts: u32,
    ) -> Result<usize> {
        let Value::Array(items) = v else {
            return Err(Error::Protocol(format!(
                "reliable pop: unexpected reply {v:?}"
            )));
        };
        let mut items = items.into_iter();
        let (Some(Value::Int(id)), Some(Value::Int(deadline_ms)), Some(_reaped)) =
            (items.next(), items.next(), items.next())
        else {
            return Err(Error::Protocol("reliable pop: short reply".into()));
        };
        if id == 0 {
            return Ok(0);
        }
        let lease = Lease {
            cluster: cluster.clone(),
            scripts: self.queue.inner.lease_scripts.clone(),
            keys: keys.clone(),
            id,
            deadline_ms,
            max_attempts,
            count: 0,
        };
        let mut envelopes = Vec::new();
        for item in items {
            let Value::BulkString(f) = item else {
                return Err(Error::Protocol(
                    "reliable pop: a frame is not a string".into(),
                ));
            };
            envelopes.extend(lease::decode_frame(&f)?);
        }
        let lease = Arc::new(Lease {
            count: envelopes.len(),
            ..lease
        });
        let n = envelopes.len();
        for (i, e) in envelopes.into_iter().enumerate() {
            let env = lease::decode_envelope(e)?;
            self.buffer.push_back(Message {
                payload: env.payload,
                shard: keys.tag.clone(),
                id: Some(env.id),
                attempt: env.deliveries as u32 + 1,
                enqueued_ms: Some(env.enqueued_ms),
                lease: Some(LeaseRef {
                    lease: lease.clone(),
                    position: i as u32 + 1,
                }),
            });
        }
        Ok(n)
    }

    /// Starts a waiter for every shard that has none running.
    fn ensure_waiters(&mut self) {
        let set = self.queue.shards();
        self.waiters.retain(|_, h| !h.is_finished());
        for s in &set.shards {
            if self.waiters.contains_key(&s.tag) {
                continue;
            }
            let w = Waiter {
                cluster: self.queue.cluster().clone(),
                slot: s.slot,
                tag: Arc::from(s.tag.as_str()),
                key: ready_key(&self.queue.inner.prefix, &s.tag),
                count: self.pop_batch,
                block: self.block_timeout,
                idle: self.idle.subscribe(),
                alive: self.alive.subscribe(),
                tx: self.inbox_tx.clone(),
                reliable: self.max_attempts.is_some(),
            };
            self.waiters.insert(s.tag.clone(), tokio::spawn(w.run()));
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Messages popped but never handed out go back to the head of their shards.
        let left = self.take_unhanded();
        if left.is_empty() {
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
        rt.spawn(async move { return_messages(&cluster, &prefix, left).await });
    }
}

async fn return_messages(cluster: &Cluster, prefix: &str, left: Vec<Message>) {
    // Leased messages go back through their lease (so the lease ends with them).
    let (leased, plain): (Vec<Message>, Vec<Message>) =
        left.into_iter().partition(|m| m.lease.is_some());
    if !leased.is_empty() {
        let refs: Vec<&LeaseRef> = leased.iter().filter_map(|m| m.lease.as_ref()).collect();
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
async fn give_back(cluster: &Cluster, slot: Slot, key: &str, payloads: Vec<Vec<u8>>) {
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

/// Hands each payload of an `LPOP key count` reply to `f`; returns how many there were.
fn each_item(v: Value, mut f: impl FnMut(Vec<u8>)) -> Result<usize> {
    match v {
        Value::Nil => Ok(0),
        Value::Array(items) => {
            let n = items.len();
            for i in items {
                match i {
                    Value::BulkString(b) => f(b),
                    other => {
                        return Err(Error::Protocol(format!("pop: unexpected item {other:?}")));
                    }
                }
            }
            Ok(n)
        }
        other => Err(Error::Protocol(format!("pop: unexpected reply {other:?}"))),
    }
}

/// Parses an `LPOP key count` reply (nil or an array of payloads).
fn list_items(v: Value) -> Result<Vec<Vec<u8>>> {
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

/// Blocks on one shard while its consumer is idle.
struct Waiter {
    cluster: Cluster,
    slot: Slot,
    tag: Arc<str>,
    key: String,
    count: usize,
    block: Duration,
    idle: watch::Receiver<bool>,
    alive: watch::Receiver<()>,
    tx: mpsc::UnboundedSender<Vec<Message>>,
    /// At-least-once: wait without popping (`BLMOVE key key RIGHT RIGHT` leaves the list
    /// as it was) and let the consumer lease what arrived.
    reliable: bool,
}

struct Blocking {
    node: NodeAddr,
    conn: crate::cluster::Conn,
    id: i64,
}

impl Waiter {
    async fn run(mut self) {
        let mut conn: Option<Blocking> = None;
        loop {
            // Block only while the consumer is idle.
            loop {
                if *self.idle.borrow_and_update() {
                    break;
                }
                tokio::select! {
                    r = self.idle.changed() => if r.is_err() { return },
                    _ = self.alive.changed() => return,
                }
            }
            let Some(owner) = self.cluster.topology().owner(self.slot).cloned() else {
                self.cluster.request_refresh();
                if self.pause().await {
                    return;
                }
                continue;
            };
            if self.cluster.is_node_down(&owner) {
                self.cluster.request_refresh();
                if self.pause().await {
                    return;
                }
                continue;
            }
            if conn.as_ref().map(|c| &c.node) != Some(&owner) {
                conn = match self.connect(&owner).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::debug!(node = %owner, cause = %e, "waiter cannot connect");
                        if self.pause().await {
                            return;
                        }
                        continue;
                    }
                };
            }
            let b = conn.as_mut().expect("connected above");
            let cmd = if self.reliable {
                redis::cmd("BLMOVE")
                    .arg(&self.key)
                    .arg(&self.key)
                    .arg("RIGHT")
                    .arg("RIGHT")
                    .arg(self.block.as_secs_f64())
                    .clone()
            } else {
                redis::cmd("BLMPOP")
                    .arg(self.block.as_secs_f64())
                    .arg(1)
                    .arg(&self.key)
                    .arg("LEFT")
                    .arg("COUNT")
                    .arg(self.count)
                    .clone()
            };
            let reply = {
                let pop = tokio::time::timeout(self.block + BLOCK_GRACE, b.conn.cmd(&cmd));
                tokio::pin!(pop);
                tokio::select! {
                    r = &mut pop => r,
                    _ = self.alive.changed() => {
                        // The consumer is gone: end the blocked pop and return what it took.
                        let unblock = redis::cmd("CLIENT").arg("UNBLOCK").arg(b.id).clone();
                        let _ = self.cluster.node_query::<Value>(&b.node, &unblock).await;
                        if let Ok(Ok(v)) = pop.await
                            && !self.reliable
                            && let Ok(items) = blmpop_items(v) {
                                give_back(&self.cluster, self.slot, &self.key, items).await;
                            }
                        return;
                    }
                }
            };
            match reply {
                Err(_) => {
                    // No reply by the client deadline: the node is hung or gone.
                    tracing::debug!(node = %b.node, "blocking pop missed its deadline");
                    conn = None;
                    self.cluster.request_refresh();
                }
                Ok(Ok(Value::Nil)) => {}
                Ok(Ok(Value::BulkString(_))) if self.reliable => {
                    // Data arrived (and is still in the list): wake the consumer.
                    if self.tx.send(Vec::new()).is_err() {
                        return;
                    }
                }
                Ok(Ok(Value::ServerError(e))) => {
                    let code = e.code().to_string();
                    if self.on_error(&code, &mut conn).await {
                        return;
                    }
                }
                Ok(Ok(v)) => match blmpop_items(v) {
                    Ok(items) if items.is_empty() => {}
                    Ok(items) => {
                        let msgs: Vec<Message> = items
                            .into_iter()
                            .map(|payload| Message::plain(payload, self.tag.clone()))
                            .collect();
                        if let Err(back) = self.tx.send(msgs) {
                            let items = back.0.into_iter().map(|m| m.payload).collect();
                            give_back(&self.cluster, self.slot, &self.key, items).await;
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(shard = %self.tag, cause = %e, "bad blocking pop reply");
                        if self.pause().await {
                            return;
                        }
                    }
                },
                Ok(Err(broken)) => {
                    tracing::debug!(shard = %self.tag, cause = %broken.0, "blocking connection broke");
                    if self.on_error("IO", &mut conn).await {
                        return;
                    }
                }
            }
        }
    }

    /// Reacts to an error reply; returns true when the consumer is gone.
    async fn on_error(&mut self, code: &str, conn: &mut Option<Blocking>) -> bool {
        match code {
            // The slot moved or the node changed role: learn the new map, reconnect.
            "MOVED" | "ASK" | "UNBLOCKED" | "READONLY" => {
                *conn = None;
                self.cluster.request_refresh();
            }
            "CLUSTERDOWN" | "TRYAGAIN" | "LOADING" | "MASTERDOWN" => {
                self.cluster.request_refresh();
            }
            _ => {
                tracing::debug!(shard = %self.tag, code, "blocking pop failed");
                *conn = None;
            }
        }
        self.pause().await
    }

    /// Sleeps before a retry; returns true when the consumer went away meanwhile.
    async fn pause(&mut self) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(WAITER_RETRY_PAUSE) => false,
            _ = self.alive.changed() => true,
        }
    }

    async fn connect(&self, node: &NodeAddr) -> Result<Blocking> {
        let conn = self.cluster.dedicated_connection(node).await?;
        let id = tokio::time::timeout(
            self.cluster.config().request_timeout_value(),
            conn.cmd(redis::cmd("CLIENT").arg("ID")),
        )
        .await
        .map_err(|_| Error::Timeout {
            node: node.clone(),
            timeout: self.cluster.config().request_timeout_value(),
        })?
        .map_err(|b| Error::Connect {
            node: node.clone(),
            reason: b.0,
        })?;
        match id {
            Value::Int(id) => Ok(Blocking {
                node: node.clone(),
                conn,
                id,
            }),
            other => Err(Error::Protocol(format!("CLIENT ID: {other:?}"))),
        }
    }
}

/// Parses a `BLMPOP` reply: nil, or `[key, [payloads...]]`.
fn blmpop_items(v: Value) -> Result<Vec<Vec<u8>>> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(mut parts) if parts.len() == 2 => list_items(parts.pop().expect("two parts")),
        other => Err(Error::Protocol(format!(
            "BLMPOP: unexpected reply {other:?}"
        ))),
    }
}
