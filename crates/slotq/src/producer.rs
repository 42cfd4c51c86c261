//! The batching producer.
//!
//! Each shard has a lane. A send appends its payload to the lane's open batch and waits
//! for that batch's result; one flush task per lane sends batches one at a time as a
//! single multi-value `RPUSH`, so messages accumulate while the previous write is in
//! flight (bounded by `max_batch_messages` / `max_batch_bytes`, after an optional
//! `linger`). A send resolves only after Redis acknowledged its batch.
//!
//! Unkeyed sends stick to one lane for a batch's worth of messages, then pick the shallower
//! of two random healthy lanes (power of two choices on depth estimates, which every
//! `RPUSH` reply refreshes for free). Keyed sends use a jump consistent hash of the key
//! over the active shards, so each key's messages stay in one shard, in order.
//!
//! Backpressure: at most `max_buffered` messages wait or fly at once (sends wait for room);
//! with `max_depth`, a push that would grow a shard past it fails with
//! [`Error::QueueFull`]. Nothing is dropped silently.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use redis::Value;
use tokio::sync::{Notify, Semaphore};

use crate::error::{Error, Result};
use crate::placement::{ShardSet, ready_key};
use crate::queue::Queue;
use crate::slot::Slot;

/// Most messages in one push.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 1000;
/// Most payload bytes in one push.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1 << 20;
/// Most messages buffered or in flight per producer before sends wait.
pub const DEFAULT_MAX_BUFFERED: usize = 100_000;
/// Largest payload: Redis's own limit for one string (`proto-max-bulk-len`, 512 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 512 * 1024 * 1024;
/// Bytes a frame adds around its envelopes, at most (magic, count, msgpack array header).
const FRAME_HEADER: usize = 16;
/// Bytes an at-least-once message takes beyond its payload in a one-message frame
/// (envelope header, msgpack string header, frame header).
const FRAME_OVERHEAD: usize = crate::lease::ENVELOPE_HEADER + 5 + FRAME_HEADER;
/// Most payloads one bounded push may carry (Lua's `unpack` stack limit).
const MAX_SCRIPT_BATCH: usize = 7_000;

/// What to do with empty payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmptyPayloads {
    /// Refuse them with [`Error::InvalidPayload`] (default: an empty message is usually a bug).
    #[default]
    Reject,
    /// Queue them like any other payload.
    Allow,
}

/// Settings of a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    queue: Queue,
    max_batch_messages: usize,
    max_batch_bytes: usize,
    linger: Duration,
    max_buffered: usize,
    max_depth: Option<u64>,
    max_payload: usize,
    empty: EmptyPayloads,
    durability: Option<(u32, Duration)>,
    resend_ambiguous: Option<bool>,
}

impl ProducerBuilder {
    pub(crate) fn new(queue: Queue) -> Self {
        ProducerBuilder {
            queue,
            max_batch_messages: DEFAULT_MAX_BATCH_MESSAGES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            linger: Duration::ZERO,
            max_buffered: DEFAULT_MAX_BUFFERED,
            max_depth: None,
            max_payload: DEFAULT_MAX_PAYLOAD,
            empty: EmptyPayloads::Reject,
            durability: None,
            resend_ambiguous: None,
        }
    }

    /// Whether an unkeyed batch whose push may or may not have been stored (the node timed
    /// out, the connection broke, or too few replicas confirmed) is sent again to another
    /// shard. That keeps sends succeeding through a node failure at the price of possible
    /// duplicates. Default: on for at-least-once queues (they allow duplicates anyway), off
    /// for at-most-once queues (the error is returned instead).
    pub fn resend_ambiguous(mut self, yes: bool) -> Self {
        self.resend_ambiguous = Some(yes);
        self
    }

    /// After each push, `WAIT` until `replicas` replicas acknowledged it (at most
    /// `timeout`); sends resolve only then, or fail with [`Error::NotReplicated`] (the write
    /// is on the master but may not survive a failover).
    pub fn durability(mut self, replicas: u32, timeout: Duration) -> Self {
        self.durability = Some((replicas, timeout));
        self
    }

    /// Most messages per push.
    pub fn max_batch_messages(mut self, n: usize) -> Self {
        self.max_batch_messages = n;
        self
    }

    /// Most payload bytes per push.
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.max_batch_bytes = n;
        self
    }

    /// Wait this long before each push so that more messages join it (default none).
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// Most messages buffered or in flight before sends wait.
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n;
        self
    }

    /// Refuse pushes that would grow a shard past `n` messages ([`Error::QueueFull`]).
    pub fn max_depth(mut self, n: u64) -> Self {
        self.max_depth = Some(n);
        self
    }

    /// Largest accepted payload in bytes (at most 512 MiB). The producer lowers it to what
    /// the server takes in one string (`proto-max-bulk-len`, read when the queue was
    /// opened), less the envelope and frame on at-least-once queues, so that an oversize
    /// payload is refused with [`Error::InvalidPayload`] before anything is sent.
    pub fn max_payload(mut self, n: usize) -> Self {
        self.max_payload = n;
        self
    }

    /// What to do with empty payloads.
    pub fn empty_payloads(mut self, p: EmptyPayloads) -> Self {
        self.empty = p;
        self
    }

    /// Validates the settings and makes the producer.
    pub fn build(mut self) -> Result<Producer> {
        let cfg = |m: String| Err(Error::Config(m));
        if self.max_batch_messages == 0 || self.max_batch_bytes == 0 {
            return cfg("batch limits must be at least 1".into());
        }
        if self.max_depth.is_some() && self.max_batch_messages > MAX_SCRIPT_BATCH {
            return cfg(format!(
                "with max_depth, max_batch_messages must be at most {MAX_SCRIPT_BATCH}"
            ));
        }
        if self.max_buffered < self.max_batch_messages {
            return cfg("max_buffered must be at least max_batch_messages".into());
        }
        if self.max_payload == 0 || self.max_payload > DEFAULT_MAX_PAYLOAD {
            return cfg(format!("max_payload must be in 1..={DEFAULT_MAX_PAYLOAD}"));
        }
        if self.max_buffered > Semaphore::MAX_PERMITS {
            return cfg("max_buffered is too large".into());
        }
        if let Some((n, t)) = self.durability
            && (n == 0 || t.is_zero())
        {
            return cfg("durability needs at least 1 replica and a timeout above zero".into());
        }
        let reliable = self.queue.mode() != crate::placement::DeliveryMode::AtMostOnce;
        if reliable && self.max_depth.is_some() {
            return cfg("max_depth is not supported for at-least-once queues".into());
        }
        // One string of a command must fit the server's proto-max-bulk-len: a payload, or on
        // at-least-once queues a whole frame (envelopes and their headers).
        let limit = self
            .queue
            .inner
            .bulk_limit
            .load(Ordering::Relaxed)
            .min(usize::MAX as u64) as usize;
        let overhead = if reliable { FRAME_OVERHEAD } else { 0 };
        self.max_payload = self.max_payload.min(limit.saturating_sub(overhead).max(1));
        if reliable {
            self.max_batch_bytes = self
                .max_batch_bytes
                .min(limit.saturating_sub(FRAME_HEADER).max(1));
        }
        if reliable && self.max_batch_messages > crate::lease::MAX_FRAME {
            return cfg(format!(
                "at-least-once queues take at most {} messages per batch",
                crate::lease::MAX_FRAME
            ));
        }
        Ok(Producer {
            inner: Arc::new(ProducerInner {
                resend_ambiguous: self.resend_ambiguous.unwrap_or(reliable),
                reliable,
                id_prefix: seed().to_be_bytes(),
                id_counter: AtomicU64::new(0),
                permits: Semaphore::new(self.max_buffered),
                lanes: RwLock::new(Lanes::default()),
                sticky: AtomicUsize::new(usize::MAX),
                sticky_count: AtomicUsize::new(0),
                seeded: std::sync::atomic::AtomicBool::new(false),
                rng: AtomicU64::new(seed()),
                cfg: self,
            }),
        })
    }
}

/// Sends messages to a queue. Clone-able, `Send + Sync`; clones share batches.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<ProducerInner>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("queue", &self.inner.cfg.queue.name())
            .finish()
    }
}

struct ProducerInner {
    cfg: ProducerBuilder,
    /// Wrap payloads in envelopes (at-least-once queues).
    reliable: bool,
    resend_ambiguous: bool,
    id_prefix: [u8; 8],
    id_counter: AtomicU64,
    permits: Semaphore,
    lanes: RwLock<Lanes>,
    sticky: AtomicUsize,
    sticky_count: AtomicUsize,
    /// The lanes' depths were read once from the shards (so that a producer starting on
    /// shards of unequal depth fills the shallow ones first).
    seeded: std::sync::atomic::AtomicBool,
    rng: AtomicU64,
}

#[derive(Default)]
struct Lanes {
    version: u64,
    by_tag: HashMap<String, Arc<Lane>>,
    active: Vec<Arc<Lane>>,
}

struct Lane {
    tag: String,
    slot: Slot,
    key: String,
    /// Messages in the shard as of the last push reply (or the first look).
    depth: AtomicI64,
    /// Messages this producer queued for the shard and not yet heard back about: what
    /// the depth will grow by. Choices count them, so the chunks of one big batch spread
    /// although no reply has come back yet.
    pending: AtomicI64,
    state: Mutex<LaneState>,
}

impl Lane {
    /// The depth the shard will have once what is queued lands.
    fn estimate(&self) -> i64 {
        self.depth.load(Ordering::Relaxed) + self.pending.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct LaneState {
    open: Batch,
    sealed: VecDeque<Batch>,
    flushing: bool,
}

#[derive(Default)]
struct Batch {
    payloads: Vec<Vec<u8>>,
    bytes: usize,
    keyed: bool,
    signal: Arc<Signal>,
}

/// Completion of one batch, awaited by every send in it.
#[derive(Default)]
struct Signal {
    done: OnceLock<Result<()>>,
    notify: Notify,
}

impl Signal {
    fn complete(&self, r: Result<()>) {
        let _ = self.done.set(r);
        self.notify.notify_waiters();
    }

    async fn wait(&self) -> Result<()> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.done.get() {
                return r.clone();
            }
            notified.await;
        }
    }
}

impl Producer {
    /// Sends one message to some healthy shard; resolves when Redis stored it.
    pub async fn send(&self, payload: impl Into<Vec<u8>>) -> Result<()> {
        let payload = payload.into();
        self.inner.check(&payload)?;
        let payload = self.inner.wrap(payload);
        self.inner.seed_depths().await;
        self.inner.acquire(1).await;
        let lane = self.inner.pick(None)?;
        let signal = self.inner.enqueue(&lane, vec![payload], false);
        signal.wait().await
    }

    /// Sends one message to the shard `key` maps to; messages with the same key are
    /// delivered in the order they were sent (while the shard set does not change).
    pub async fn send_keyed(
        &self,
        key: impl AsRef<[u8]>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<()> {
        let payload = payload.into();
        self.inner.check(&payload)?;
        let payload = self.inner.wrap(payload);
        self.inner.acquire(1).await;
        let lane = self.inner.pick(Some(key.as_ref()))?;
        let signal = self.inner.enqueue(&lane, vec![payload], true);
        signal.wait().await
    }

    /// Sends many messages (unkeyed) in batches; resolves when all are stored, or with the
    /// first error (then some of the messages may have been stored).
    pub async fn send_batch<P: Into<Vec<u8>>>(
        &self,
        payloads: impl IntoIterator<Item = P>,
    ) -> Result<()> {
        let payloads: Vec<Vec<u8>> = payloads.into_iter().map(Into::into).collect();
        for p in &payloads {
            self.inner.check(p)?;
        }
        self.inner.seed_depths().await;
        let mut signals = Vec::new();
        let mut iter = payloads.into_iter().map(|p| self.inner.wrap(p)).peekable();
        while iter.peek().is_some() {
            let chunk: Vec<Vec<u8>> = iter
                .by_ref()
                .take(self.inner.cfg.max_batch_messages)
                .collect();
            self.inner.acquire(chunk.len()).await;
            let lane = self.inner.pick_fresh()?;
            signals.push(self.inner.enqueue(&lane, chunk, false));
        }
        let mut first_err = None;
        for s in signals {
            if let Err(e) = s.wait().await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The queue this producer sends to.
    pub fn queue(&self) -> &Queue {
        &self.inner.cfg.queue
    }
}

impl ProducerInner {
    /// Reads every active shard's depth once (one pipeline per node), before the first
    /// unkeyed choice; later replies keep the estimates current. Best effort.
    async fn seed_depths(&self) {
        if self.seeded.swap(true, Ordering::Relaxed) {
            return;
        }
        let lanes = self.lanes();
        let prefix = &self.cfg.queue.inner.prefix;
        let cmds = lanes
            .iter()
            .map(|l| {
                let cmd = if self.reliable {
                    redis::cmd("GET")
                        .arg(crate::placement::shard_key(prefix, &l.tag, "count"))
                        .clone()
                } else {
                    redis::cmd("LLEN").arg(&l.key).clone()
                };
                (l.slot, cmd)
            })
            .collect();
        let cluster = self.cfg.queue.cluster();
        let opts = crate::cluster::RequestOpts {
            idempotent: true,
            retry_budget: Duration::ZERO,
            ..cluster.default_opts()
        };
        for (l, r) in lanes.iter().zip(cluster.batch(cmds, opts).await) {
            if let Some(d) = r
                .ok()
                .and_then(|v| redis::from_redis_value::<Option<i64>>(v).ok().flatten())
            {
                l.depth.store(d.max(0), Ordering::Relaxed);
            }
        }
    }

    fn check(&self, payload: &[u8]) -> Result<()> {
        check_payload(payload.len(), self.cfg.max_payload, self.cfg.empty)
    }

    /// For at-least-once queues: the payload in an envelope with a fresh id.
    fn wrap(&self, payload: Vec<u8>) -> Vec<u8> {
        if !self.reliable {
            return payload;
        }
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.id_prefix);
        id[8..].copy_from_slice(
            &self
                .id_counter
                .fetch_add(1, Ordering::Relaxed)
                .to_be_bytes(),
        );
        crate::lease::encode_envelope(crate::lease::MessageId(id), &payload)
    }

    async fn acquire(&self, n: usize) {
        // Never fails: the semaphore is not closed. Permits come back when batches end.
        if let Ok(p) = self.permits.acquire_many(n as u32).await {
            p.forget();
        }
    }

    fn random(&self) -> u64 {
        // xorshift64*, shared; races only reuse a value.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn lanes(&self) -> Vec<Arc<Lane>> {
        let set: Arc<ShardSet> = self.cfg.queue.shards();
        {
            let l = self.lanes.read().unwrap();
            if l.version == set.version && !l.active.is_empty() {
                return l.active.clone();
            }
        }
        let mut l = self.lanes.write().unwrap();
        if l.version != set.version || l.active.is_empty() {
            let prefix = &self.cfg.queue.inner.prefix;
            let mut active = Vec::new();
            for s in set.active() {
                let lane = l
                    .by_tag
                    .entry(s.tag.clone())
                    .or_insert_with(|| {
                        Arc::new(Lane {
                            tag: s.tag.clone(),
                            slot: s.slot,
                            key: ready_key(prefix, &s.tag),
                            depth: AtomicI64::new(0),
                            pending: AtomicI64::new(0),
                            state: Mutex::new(LaneState::default()),
                        })
                    })
                    .clone();
                active.push(lane);
            }
            l.active = active;
            l.version = set.version;
        }
        l.active.clone()
    }

    fn healthy(&self, lane: &Lane) -> bool {
        let cluster = self.cfg.queue.cluster();
        match cluster.topology().owner(lane.slot) {
            Some(owner) => !cluster.is_node_down(owner),
            None => false,
        }
    }

    fn pick(&self, key: Option<&[u8]>) -> Result<Arc<Lane>> {
        let lanes = self.lanes();
        if lanes.is_empty() {
            return Err(Error::QueueNotFound(self.cfg.queue.name().to_string()));
        }
        if let Some(key) = key {
            let i = jump_hash(fnv1a(key), lanes.len());
            return Ok(lanes[i].clone());
        }
        let cur = self.sticky.load(Ordering::Relaxed);
        let count = self.sticky_count.fetch_add(1, Ordering::Relaxed);
        if cur < lanes.len() && count < self.cfg.max_batch_messages && self.healthy(&lanes[cur]) {
            return Ok(lanes[cur].clone());
        }
        Ok(self.choose(&lanes, &HashSet::new()))
    }

    fn pick_fresh(&self) -> Result<Arc<Lane>> {
        let lanes = self.lanes();
        if lanes.is_empty() {
            return Err(Error::QueueNotFound(self.cfg.queue.name().to_string()));
        }
        Ok(self.choose(&lanes, &HashSet::new()))
    }

    /// Power of two choices among healthy lanes not in `skip`; becomes the sticky lane.
    fn choose(&self, lanes: &[Arc<Lane>], skip: &HashSet<String>) -> Arc<Lane> {
        let healthy: Vec<usize> = (0..lanes.len())
            .filter(|&i| !skip.contains(&lanes[i].tag) && self.healthy(&lanes[i]))
            .collect();
        let pool: Vec<usize> = if healthy.is_empty() {
            (0..lanes.len())
                .filter(|&i| !skip.contains(&lanes[i].tag))
                .collect()
        } else {
            healthy
        };
        let pool = if pool.is_empty() {
            (0..lanes.len()).collect()
        } else {
            pool
        };
        // A few distinct lanes at random (two on small queues, up to four on larger ones:
        // more choices even out a big batch's chunks over many shards, still without every
        // producer piling onto the one shallowest shard), the shallowest by estimate.
        let n = pool.len();
        let k = (2 + n / 16).min(4).min(n);
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        while chosen.len() < k {
            let i = pool[(self.random() % n as u64) as usize];
            if !chosen.contains(&i) {
                chosen.push(i);
            }
        }
        let pick = chosen
            .into_iter()
            .min_by_key(|&i| lanes[i].estimate())
            .expect("at least one lane");
        self.sticky.store(pick, Ordering::Relaxed);
        self.sticky_count.store(1, Ordering::Relaxed);
        lanes[pick].clone()
    }

    /// Adds payloads to the lane's open batch (sealing it when full) and starts the lane's
    /// flush task if it is idle. Returns the signal of the batch holding the last payload.
    fn enqueue(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        payloads: Vec<Vec<u8>>,
        keyed: bool,
    ) -> Arc<Signal> {
        lane.pending
            .fetch_add(payloads.len() as i64, Ordering::Relaxed);
        let (signal, start) = {
            let mut st = lane.state.lock().unwrap();
            for p in payloads {
                // On at-least-once queues each envelope takes a msgpack header in its frame.
                let cost = p.len() + if self.reliable { 5 } else { 0 };
                if !st.open.payloads.is_empty()
                    && (st.open.payloads.len() >= self.cfg.max_batch_messages
                        || st.open.bytes + cost > self.cfg.max_batch_bytes)
                {
                    let full = std::mem::take(&mut st.open);
                    st.sealed.push_back(full);
                }
                st.open.bytes += cost;
                st.open.keyed |= keyed;
                st.open.payloads.push(p);
            }
            let start = !st.flushing;
            st.flushing = true;
            (st.open.signal.clone(), start)
        };
        if start {
            let me = self.clone();
            let lane = lane.clone();
            tokio::spawn(async move { me.flush(lane).await });
        }
        signal
    }

    async fn flush(self: Arc<Self>, lane: Arc<Lane>) {
        loop {
            if !self.cfg.linger.is_zero() {
                tokio::time::sleep(self.cfg.linger).await;
            }
            let batch = {
                let mut st = lane.state.lock().unwrap();
                match st.sealed.pop_front() {
                    Some(b) => b,
                    None if !st.open.payloads.is_empty() => std::mem::take(&mut st.open),
                    None => {
                        st.flushing = false;
                        return;
                    }
                }
            };
            let n = batch.payloads.len();
            let started = std::time::Instant::now();
            let result = self.push_routed(&lane, &batch).await;
            lane.pending.fetch_sub(n as i64, Ordering::Relaxed);
            let queue = self.cfg.queue.name().to_string();
            metrics::histogram!(crate::telemetry::PUSH_SECONDS, "queue" => queue.clone())
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!(crate::telemetry::PUSH_BATCH, "queue" => queue.clone())
                .record(n as f64);
            let counter = if result.is_ok() {
                crate::telemetry::PUSHED
            } else {
                crate::telemetry::PUSH_FAILURES
            };
            metrics::counter!(counter, "queue" => queue).increment(n as u64);
            self.permits.add_permits(n);
            batch.signal.complete(result);
        }
    }

    /// Pushes a batch to its lane; an unkeyed batch that could not be sent (node down,
    /// shard full) goes to another healthy lane instead.
    async fn push_routed(&self, lane: &Arc<Lane>, batch: &Batch) -> Result<()> {
        if batch.keyed {
            return self.push(lane, batch, false).await;
        }
        let mut tried: HashSet<String> = HashSet::new();
        let mut target = lane.clone();
        loop {
            tried.insert(target.tag.clone());
            let lanes = self.lanes();
            let last = lanes.iter().all(|l| tried.contains(&l.tag));
            match self.push(&target, batch, !last).await {
                Err(e) if !last && rerouteable(&e, self.resend_ambiguous) => {
                    tracing::debug!(shard = %target.tag, cause = %e, "rerouting batch");
                    target = self.choose(&lanes, &tried);
                }
                other => return other,
            }
        }
    }

    async fn push(&self, lane: &Lane, batch: &Batch, fail_fast: bool) -> Result<()> {
        let cluster = self.cfg.queue.cluster();
        let mut opts = cluster.default_opts();
        if fail_fast {
            opts.retry_budget = Duration::ZERO;
        }
        let cmd = match self.cfg.max_depth {
            // At-least-once queues: the whole batch is one frame, one list element.
            None if self.reliable => redis::cmd("RPUSH")
                .arg(&lane.key)
                .arg(crate::lease::encode_frame(&batch.payloads))
                .clone(),
            None => {
                let mut cmd = redis::cmd("RPUSH");
                cmd.arg(&lane.key);
                for p in &batch.payloads {
                    cmd.arg(p.as_slice());
                }
                cmd
            }
            Some(max) => {
                let max_s = max.to_string();
                let mut args: Vec<&[u8]> = Vec::with_capacity(batch.payloads.len() + 1);
                args.push(max_s.as_bytes());
                args.extend(batch.payloads.iter().map(Vec::as_slice));
                let scripts = &self.cfg.queue.inner.scripts;
                scripts.push_bounded.cmd(&[&lane.key], &args, true)
            }
        };
        // At-least-once shards keep a count of ready messages (a frame holds many): it
        // goes in the same write, right behind the push.
        let count = self.reliable.then(|| {
            redis::cmd("INCRBY")
                .arg(crate::placement::shard_key(
                    &self.cfg.queue.inner.prefix,
                    &lane.tag,
                    "count",
                ))
                .arg(batch.payloads.len())
                .clone()
        });
        // At-least-once: the count's reply is the shard's depth in messages (the push's is
        // in frames).
        let mut messages: Option<i64> = None;
        let reply = match (self.cfg.durability, count) {
            (None, None) => cluster.query_with::<Value>(lane.slot, &cmd, opts).await?,
            (None, Some(count)) => {
                let mut out = cluster
                    .batch(vec![(lane.slot, cmd), (lane.slot, count)], opts)
                    .await;
                let counted = out.pop().expect("two replies");
                let pushed = out.pop().expect("two replies")?;
                match counted {
                    Ok(Value::Int(c)) => messages = Some(c),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(shard = %lane.tag, cause = %e, "ready count not updated")
                    }
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
                    .clone();
                let mut cmds = vec![(lane.slot, cmd)];
                cmds.extend(count.map(|c| (lane.slot, c)));
                cmds.push((lane.slot, wait));
                let mut out = cluster.batch(cmds, opts).await;
                let waited = out.pop().expect("a reply per command");
                let pushed = out.remove(0)?;
                if let Some(Ok(Value::Int(c))) = out.pop() {
                    messages = Some(c);
                }
                if !matches!(pushed, Value::Int(n) if n < 0) {
                    let acked = match waited? {
                        Value::Int(n) => n.max(0) as u32,
                        other => return Err(Error::Protocol(format!("WAIT: {other:?}"))),
                    };
                    if acked < replicas {
                        return Err(Error::NotReplicated {
                            node: cluster
                                .topology()
                                .owner(lane.slot)
                                .cloned()
                                .unwrap_or_else(|| crate::topology::NodeAddr::new("?", 0)),
                            wanted: replicas,
                            acked,
                        });
                    }
                }
                pushed
            }
        };
        match reply {
            Value::Int(n) if n >= 0 => {
                lane.depth.store(messages.unwrap_or(n), Ordering::Relaxed);
                Ok(())
            }
            Value::Int(n) => {
                let depth = (-n - 1) as u64;
                lane.depth.store(depth as i64, Ordering::Relaxed);
                Err(Error::QueueFull {
                    shard: lane.tag.clone(),
                    depth,
                    max: self.cfg.max_depth.unwrap_or_default(),
                })
            }
            other => Err(Error::Protocol(format!("push: unexpected reply {other:?}"))),
        }
    }
}

/// Whether an unkeyed batch that failed with `e` may go to another shard. Batches that may
/// already be stored (timeout, lost connection, unreplicated) only when `ambiguous` allows
/// duplicates.
fn rerouteable(e: &Error, ambiguous: bool) -> bool {
    match e {
        Error::QueueFull { .. } => true,
        Error::NotReplicated { .. } => ambiguous,
        e if e.may_have_run() => ambiguous && e.is_retryable(),
        e => e.is_retryable(),
    }
}

/// Checks a payload's size against the limits.
pub fn check_payload(len: usize, max: usize, empty: EmptyPayloads) -> Result<()> {
    if len == 0 && empty == EmptyPayloads::Reject {
        return Err(Error::InvalidPayload(
            "empty payload (allow with EmptyPayloads::Allow)".into(),
        ));
    }
    if len > max {
        return Err(Error::InvalidPayload(format!(
            "payload of {len} bytes exceeds the maximum of {max} bytes"
        )));
    }
    Ok(())
}

/// FNV-1a, 64 bit: a stable hash of keys (the same in every process and version).
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Jump consistent hash (Lamping & Veach): a bucket in `0..buckets`; growing the bucket
/// count moves only the keys that must move.
pub fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (t ^ ((std::process::id() as u64) << 32)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_limits() {
        assert!(matches!(
            check_payload(0, 10, EmptyPayloads::Reject),
            Err(Error::InvalidPayload(_))
        ));
        assert!(check_payload(0, 10, EmptyPayloads::Allow).is_ok());
        assert!(check_payload(10, 10, EmptyPayloads::Reject).is_ok());
        let err = check_payload(
            DEFAULT_MAX_PAYLOAD + 1,
            DEFAULT_MAX_PAYLOAD,
            EmptyPayloads::Reject,
        )
        .unwrap_err();
        assert!(err.to_string().contains("exceeds the maximum"), "{err}");
    }

    #[test]
    fn jump_hash_is_stable_and_spreads() {
        assert_eq!(
            jump_hash(fnv1a(b"user-1"), 3),
            jump_hash(fnv1a(b"user-1"), 3)
        );
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            counts[jump_hash(fnv1a(format!("k{i}").as_bytes()), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 9_000), "{counts:?}");
        // Growing 4 -> 5 buckets moves about a fifth of the keys, all to the new bucket.
        let moved = (0..10_000)
            .filter(|i| {
                let h = fnv1a(format!("k{i}").as_bytes());
                let (a, b) = (jump_hash(h, 4), jump_hash(h, 5));
                assert!(a == b || b == 4);
                a != b
            })
            .count();
        assert!((1_500..2_500).contains(&moved), "{moved}");
    }
}
