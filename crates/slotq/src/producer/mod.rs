//! The batching producer.
//!
//! Each shard has a lane. A send appends its payload to the lane's open batch and waits
//! for that batch's result; one flush task per lane sends batches one at a time as a
//! single multi-value `RPUSH`, so messages accumulate while the previous write is in
//! flight (bounded by `max_batch_messages` / `max_batch_bytes`, after an optional
//! `linger`). A send resolves only after Redis acknowledged its batch.
//!
//! Unkeyed sends stick to one lane for `CHOICE_SPAN` (100) messages, then take the healthy
//! lane whose shard is shallowest as far as this producer knows: a snapshot of every
//! shard's depth (read at the first send and every second after), plus every message this
//! producer has put there since, in flight or queued (see `lanes::least_loaded`). Chunks
//! of one lane merge into batches of up to `max_batch_messages`, so the span is only the
//! grain of the balance, not the size of a push. Keyed sends use a jump consistent hash of
//! the key over the active shards, so each key's messages stay in one shard, in order.
//!
//! Backpressure: at most `max_buffered` messages wait or fly at once (sends wait for room);
//! with `max_depth`, a push that would grow a shard past it fails with
//! [`Error::QueueFull`]. Nothing is dropped silently.

mod batch;
mod builder;
mod dedup;
mod keyed;
mod lanes;
mod push;
mod schedule;
mod snapshot;
mod with_meta;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::Semaphore;

use batch::Signal;
pub use builder::{
    DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_MESSAGES, DEFAULT_MAX_BUFFERED, DEFAULT_MAX_PAYLOAD,
    EmptyPayloads, ProducerBuilder, check_payload,
};
pub use dedup::{DEFAULT_DEDUP_WINDOW, MAX_DEDUP_ID, check_dedup_id};
pub use keyed::KEYED_HOLD;
use lanes::{CHOICE_SPAN, Lane, LaneState, Lanes};

use crate::error::{Error, Result};
use crate::placement::{Shard, ShardSet, ready_key};
use crate::queue::Queue;

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
    /// When the shards' depths were last read (see [`ProducerInner::snapshot`]).
    snapshot_at: Mutex<Option<Instant>>,
    /// Messages placed since the last snapshot began.
    sent_since_snapshot: AtomicUsize,
    /// Messages `send_batch` placed, ever.
    placed: AtomicUsize,
    /// A snapshot is being taken.
    snapshotting: AtomicBool,
    /// What the last snapshot saw, to tell this producer's share of the growth.
    snapshot_history: Mutex<lanes::SnapshotHistory>,
    /// Shards with scheduled messages this producer sent, due within a poll: it promotes
    /// them itself on time (see `schedule.rs`).
    nudges: Arc<schedule::Nudges>,
}

impl Producer {
    fn new(cfg: ProducerBuilder, reliable: bool) -> Producer {
        Producer {
            inner: Arc::new(ProducerInner {
                resend_ambiguous: cfg.resend_ambiguous.unwrap_or(reliable),
                reliable,
                id_prefix: seed().to_be_bytes(),
                id_counter: AtomicU64::new(0),
                permits: Semaphore::new(cfg.max_buffered),
                lanes: RwLock::new(Lanes::default()),
                sticky: AtomicUsize::new(usize::MAX),
                sticky_count: AtomicUsize::new(0),
                snapshot_at: Mutex::new(None),
                sent_since_snapshot: AtomicUsize::new(0),
                placed: AtomicUsize::new(0),
                snapshotting: AtomicBool::new(false),
                snapshot_history: Mutex::new(lanes::SnapshotHistory::default()),
                nudges: Arc::new(schedule::Nudges::default()),
                cfg,
            }),
        }
    }

    /// Sends one message to some healthy shard; resolves when Redis stored it.
    pub async fn send(&self, payload: impl AsRef<[u8]>) -> Result<()> {
        let called = std::time::Instant::now();
        self.inner.cfg.queue.check_live().await?;
        let payload = payload.as_ref();
        self.inner.check(payload)?;
        let now = crate::lease::now_ms();
        self.inner.snapshot_if_due(1).await;
        if self.inner.cfg.idempotent {
            let lane = self.inner.pick()?;
            return self.inner.send_idempotent(&lane, payload, called).await;
        }
        self.inner.acquire(1).await;
        let lane = self.inner.pick()?;
        let signal = self.inner.enqueue(&lane, &[payload], false, (now, called));
        signal.wait().await
    }

    /// Sends many messages (unkeyed) in batches; resolves when all are stored, or with the
    /// first error (then some of the messages may have been stored). Each payload is
    /// copied once, into the push that carries it, as room for it is found
    /// (`max_buffered`): borrowed slices of one buffer send as fast as owned vectors.
    pub async fn send_batch<P: AsRef<[u8]>>(
        &self,
        payloads: impl IntoIterator<Item = P>,
    ) -> Result<()> {
        self.inner.cfg.queue.check_live().await?;
        let payloads: Vec<P> = payloads.into_iter().collect();
        for p in &payloads {
            self.inner.check(p.as_ref())?;
        }
        if self.inner.cfg.idempotent {
            let sends = payloads.iter().map(|p| self.send(p.as_ref()));
            return futures::future::join_all(sends)
                .await
                .into_iter()
                .find(Result::is_err)
                .unwrap_or(Ok(()));
        }
        self.inner.snapshot_if_due(payloads.len()).await;
        let grain = self.inner.batch_grain(payloads.len()).max(1);
        let mut signals = Vec::new();
        let now = crate::lease::now_ms();
        for chunk in payloads.chunks(grain) {
            self.inner.acquire(chunk.len()).await;
            let lane = self.inner.pick_fresh()?;
            signals.push(
                self.inner
                    .enqueue(&lane, chunk, false, (now, std::time::Instant::now())),
            );
        }
        drop(payloads);
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
    /// Messages of a `send_batch` of `len` placed per choice of a lane.
    ///
    /// A batch larger than one push is placed in chunks of the choice span, which merge per
    /// lane into pushes of up to `max_batch_messages` again. A batch that fits one push goes
    /// to one lane whole (one choice, one `RPUSH`; cut into chunks of 100 it cost half the
    /// push rate on 30 masters) once this producer has placed [`WHOLE_AFTER`] such batches
    /// per shard: from then on, a batch more or less on a shard is within 1/16 of its
    /// share. Before that it is placed in [`BATCH_PIECES`] pieces: four producers sending
    /// 200,000 in batches of 1,000 on 30 masters (under seven batches a shard) left shards
    /// 1.2 apart when whole, 1.05 in pieces of 250.
    fn batch_grain(&self, len: usize) -> usize {
        let placed = self.placed.fetch_add(len, Ordering::Relaxed);
        if len > self.cfg.max_batch_messages {
            return self.span();
        }
        let shards = self.lanes.read().unwrap().active.len().max(1);
        if placed >= WHOLE_AFTER * shards * len {
            len.max(1)
        } else {
            len.div_ceil(BATCH_PIECES).max(self.span())
        }
    }

    /// Unkeyed messages placed per choice of a lane.
    fn span(&self) -> usize {
        CHOICE_SPAN.min(self.cfg.max_batch_messages)
    }

    fn check(&self, payload: &[u8]) -> Result<()> {
        check_payload(payload.len(), self.cfg.max_payload, self.cfg.empty)
    }

    /// At-least-once queues: the envelope header of the next message, with a fresh id,
    /// enqueued at `now_ms` (read once per call of the API).
    fn envelope_header(&self, now_ms: u64) -> [u8; crate::lease::ENVELOPE_HEADER] {
        crate::lease::envelope_header(self.next_id(), now_ms)
    }

    async fn acquire(&self, n: usize) {
        // Never fails: the semaphore is not closed. Permits come back when batches end.
        if let Ok(p) = self.permits.acquire_many(n as u32).await {
            p.forget();
        }
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
            let active = set.active().map(|s| self.lane_in(&mut l, s)).collect();
            l.active = active;
            l.version = set.version;
        }
        l.active.clone()
    }

    /// The lane of `shard`, made on first use.
    fn lane_in(&self, lanes: &mut Lanes, shard: &Shard) -> Arc<Lane> {
        let prefix = self.cfg.queue.prefix();
        lanes
            .by_tag
            .entry(shard.tag.clone())
            .or_insert_with(|| {
                Arc::new(Lane {
                    tag: shard.tag.clone(),
                    slot: shard.slot,
                    key: ready_key(prefix, &shard.tag),
                    base: AtomicI64::new(0),
                    landed: AtomicI64::new(0),
                    pending: AtomicI64::new(0),
                    state: Mutex::new(LaneState::default()),
                })
            })
            .clone()
    }

    /// The lane of `shard`: looked up under the read lock, created under the write lock.
    fn lane_of(&self, shard: &Shard) -> Arc<Lane> {
        if let Some(lane) = self.lanes.read().unwrap().by_tag.get(&shard.tag) {
            return lane.clone();
        }
        self.lane_in(&mut self.lanes.write().unwrap(), shard)
    }

    fn healthy(&self, lane: &Lane) -> bool {
        let cluster = self.cfg.queue.cluster();
        match cluster.topology().owner(lane.slot) {
            Some(owner) => !cluster.is_node_down(owner),
            None => false,
        }
    }

    fn pick(&self) -> Result<Arc<Lane>> {
        let lanes = self.lanes();
        if lanes.is_empty() {
            return Err(Error::QueueNotFound(self.cfg.queue.name().to_string()));
        }
        let cur = self.sticky.load(Ordering::Relaxed);
        let count = self.sticky_count.fetch_add(1, Ordering::Relaxed);
        if cur < lanes.len() && count < self.span() && self.healthy(&lanes[cur]) {
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

    /// The least-loaded healthy lane not in `skip` ([`lanes::least_loaded`]); becomes the
    /// sticky lane.
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
        let pick = lanes::least_loaded(&pool, |i| lanes[i].estimate(), &mut rand::rng());
        self.sticky.store(pick, Ordering::Relaxed);
        self.sticky_count.store(1, Ordering::Relaxed);
        lanes[pick].clone()
    }

    /// Adds payloads to the lane's open batch (sealing it when full; each payload is copied
    /// into it) and starts the lane's flush task if it is idle. Returns the signal of the
    /// batch holding the last payload. On at-least-once queues each message gets its id
    /// here, enqueued at `now_ms`; `called` is when the caller's send began (a batch's retry
    /// budget counts from its first message's).
    fn enqueue<P: AsRef<[u8]>>(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        payloads: &[P],
        keyed: bool,
        (now_ms, called): (u64, std::time::Instant),
    ) -> Arc<Signal> {
        lane.pending
            .fetch_add(payloads.len() as i64, Ordering::Relaxed);
        // On at-least-once queues each payload goes in an envelope, behind a msgpack
        // header in its frame.
        let overhead = if self.reliable {
            crate::lease::ENVELOPE_HEADER + 5
        } else {
            0
        };
        let (signal, start) = {
            let mut st = lane.state.lock().unwrap();
            for (i, p) in payloads.iter().enumerate() {
                let p = p.as_ref();
                let cost = p.len() + overhead;
                if !st.open.is_empty()
                    && (st.open.len() >= self.cfg.max_batch_messages
                        || st.open.bytes + cost > self.cfg.max_batch_bytes)
                {
                    let full = std::mem::take(&mut st.open);
                    st.sealed.push_back(full);
                }
                if st.open.is_empty() {
                    st.open.born = Some(called);
                    // Room for the rest of these payloads, as far as one batch takes them,
                    // guessed from this one's size.
                    let n = (payloads.len() - i).min(self.cfg.max_batch_messages);
                    let bytes = (n * p.len()).min(self.cfg.max_batch_bytes);
                    st.open.reserve(n, bytes, self.reliable);
                }
                st.open.bytes += cost;
                st.open.keyed |= keyed;
                if self.reliable {
                    let header = self.envelope_header(now_ms);
                    st.open.push_envelope(&header, p);
                } else {
                    st.open.push_payload(p);
                }
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
            let mut batch = {
                let mut st = lane.state.lock().unwrap();
                match st.sealed.pop_front() {
                    Some(b) => b,
                    None if !st.open.is_empty() => std::mem::take(&mut st.open),
                    None => {
                        st.flushing = false;
                        return;
                    }
                }
            };
            let n = batch.len();
            let started = std::time::Instant::now();
            let body = batch.take_body();
            let result = self.push_routed(&lane, &batch, &body).await;
            lane.pending.fetch_sub(n as i64, Ordering::Relaxed);
            let queue = self.cfg.queue.name().to_string();
            metrics::histogram!(crate::telemetry::PUSH_SECONDS, "queue" => queue.clone())
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!(crate::telemetry::PUSH_BATCH, "queue" => queue.clone())
                .record(n as f64);
            let counter = if result.is_ok() {
                self.cfg.queue.count_pushed(n);
                crate::telemetry::PUSHED
            } else {
                crate::telemetry::PUSH_FAILURES
            };
            metrics::counter!(counter, "queue" => queue).increment(n as u64);
            self.permits.add_permits(n);
            batch.signal.complete(result);
        }
    }
}

/// Pieces a `send_batch` that fits one push is placed in while the producer is young (each
/// at least a choice span; see [`ProducerInner::batch_grain`]).
const BATCH_PIECES: usize = 4;
/// Batches per shard a producer places in pieces before it sends them whole.
const WHOLE_AFTER: usize = 16;
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (t ^ ((std::process::id() as u64) << 32)) | 1
}
