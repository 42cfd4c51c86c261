//! A logical queue: its registry (read or created atomically), its shard set (re-read when
//! the version changes), expansion onto new masters, and per-shard statistics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::placement::{
    self, DEFAULT_PREFIX, DEFAULT_SHARDS_PER_MASTER, ShardSet, meta_key, ready_key,
};
use crate::script::Script;
use crate::slot::{Slot, key_slot};

mod dead;
mod flow;
mod groups;
mod registry;
mod schedule;
mod stats;

pub use dead::DeadLetter;
pub use flow::{FLOW_FLUSH, FlowTotals, flow_key};
pub use registry::DEFAULT_BULK_LIMIT;
pub(crate) use registry::DELETING;
pub use schedule::{MAX_SCHEDULE_AHEAD, PAST_TOLERANCE, SCHEDULE_POLL};
pub(crate) use schedule::{PROMOTE_LIMIT, ScheduleKeys, due_ms, earliest, promote};
pub use stats::{ShardStats, stats_many};

/// How often clients look for a new registry version (new shards).
pub const DEFAULT_REGISTRY_POLL: Duration = Duration::from_millis(1000);
/// How many times a registry update is retried when another client changed it first.
const REGISTRY_CAS_ATTEMPTS: usize = 16;

/// Opens a queue.
#[derive(Debug)]
pub struct QueueBuilder {
    cluster: Cluster,
    name: String,
    prefix: String,
    shards_per_master: u32,
    create: bool,
    registry_poll: Duration,
    mode: placement::DeliveryMode,
    finish_delete: bool,
    drop_expired: bool,
    priorities: bool,
}

impl QueueBuilder {
    pub(crate) fn new(cluster: Cluster, name: &str) -> Self {
        QueueBuilder {
            cluster,
            name: name.to_string(),
            prefix: DEFAULT_PREFIX.to_string(),
            shards_per_master: DEFAULT_SHARDS_PER_MASTER,
            create: true,
            registry_poll: DEFAULT_REGISTRY_POLL,
            mode: placement::DeliveryMode::AtMostOnce,
            finish_delete: false,
            drop_expired: false,
            priorities: false,
        }
    }

    /// Key prefix (default `slotq`).
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// Shards per master when the queue is created (ignored for existing queues).
    pub fn shards_per_master(mut self, k: u32) -> Self {
        self.shards_per_master = k;
        self
    }

    /// Create the queue in at-least-once mode (leases, acks, redelivery, dead letters) with
    /// [`placement::DEFAULT_MAX_ATTEMPTS`] deliveries per message. Ignored for existing
    /// queues: the mode is fixed at creation and read from the registry.
    pub fn reliable(self) -> Self {
        self.max_attempts(placement::DEFAULT_MAX_ATTEMPTS)
    }

    /// Create the queue in at-least-once mode with this many deliveries before a message
    /// is dead-lettered.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.mode = placement::DeliveryMode::AtLeastOnce { max_attempts: n };
        self
    }

    /// At-least-once queues: acknowledge expired messages (dropped, counted in
    /// `slotq_expired_total`) instead of dead-lettering them with reason `expired`. Fixed
    /// when the queue is created (ignored for existing queues).
    pub fn drop_expired(mut self) -> Self {
        self.drop_expired = true;
        self
    }

    /// Create the queue with priorities (high, normal, low: see [`crate::priority`]).
    /// At-most-once queues only; fixed at creation (ignored for existing queues: a send with
    /// a priority to a queue created without them is refused with [`Error::Priorities`]).
    pub fn priorities(mut self) -> Self {
        self.priorities = true;
        self
    }

    /// Fail with [`Error::QueueNotFound`] instead of creating a missing queue.
    pub fn must_exist(mut self) -> Self {
        self.create = false;
        self
    }

    /// Also opens a queue whose delete was cut short (its registry marked deleting), so
    /// that [`Queue::delete`] can finish it; implies [`QueueBuilder::must_exist`]. Such a
    /// queue is good for nothing else: it has no version, and every other client finds it
    /// gone.
    pub fn to_finish_a_delete(mut self) -> Self {
        self.finish_delete = true;
        self.create = false;
        self
    }

    /// How often to look for a new registry version.
    pub fn registry_poll(mut self, d: Duration) -> Self {
        self.registry_poll = d;
        self
    }

    /// Reads the queue's registry, creating it atomically if it does not exist: every
    /// client that opens the queue ends up with the same shard set.
    pub async fn open(self) -> Result<Queue> {
        placement::validate_queue_name(&self.name)?;
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(Error::Config(format!(
                "key prefix {:?} must be non-empty and brace-free",
                self.prefix
            )));
        }
        if matches!(self.mode, placement::DeliveryMode::AtLeastOnce { max_attempts } if max_attempts == 0 || max_attempts > 65_535)
        {
            return Err(Error::Config("max_attempts must be in 1..=65535".into()));
        }
        if self.shards_per_master == 0 {
            return Err(Error::Config("shards_per_master must be at least 1".into()));
        }
        if self.priorities && self.mode != placement::DeliveryMode::AtMostOnce {
            return Err(Error::Priorities(
                "priorities are for at-most-once queues; an at-least-once queue has none".into(),
            ));
        }
        let meta = meta_key(&self.prefix, &self.name);
        let inner = QueueInner {
            flow: Arc::new(flow::FlowCounts::new(&self.prefix, &self.name)),
            meta_slot: key_slot(&meta),
            meta,
            cluster: self.cluster,
            name: self.name,
            prefix: self.prefix,
            shards: RwLock::new(Arc::new(ShardSet {
                version: 0,
                shards: Vec::new(),
                shards_per_master: self.shards_per_master,
                mode: self.mode,
                keyed: Vec::new(),
                cleanup: Vec::new(),
                paused: false,
                drop_expired: self.drop_expired,
                priorities: self.priorities,
            })),
            checked: Mutex::new(Instant::now()),
            checking: AtomicBool::new(false),
            registry_poll: self.registry_poll,
            bulk_limit: std::sync::atomic::AtomicU64::new(DEFAULT_BULK_LIMIT),
            deleted: AtomicBool::new(false),
            finish_delete: self.finish_delete,
            live_check: tokio::sync::Mutex::new(()),
            scripts: Scripts::new(),
            lease_scripts: Arc::new(crate::lease::LeaseScripts::new()),
            group_script: Arc::new(Script::new(include_str!("../lua/group_beat.lua"))),
        };
        let set = match inner.read_registry().await? {
            Some(set) => set,
            None if !self.create => return Err(Error::QueueNotFound(inner.name.clone())),
            None => {
                let set = inner
                    .create_registry(
                        self.shards_per_master,
                        self.mode,
                        self.drop_expired,
                        self.priorities,
                    )
                    .await?;
                // A queue of this name deleted within the fences' life left them in these
                // shards: this incarnation is the queue now (see `delete_fence.rs`).
                if let Err(e) =
                    crate::delete_fence::lift(&inner.cluster, &inner.prefix, &set.shards).await
                {
                    tracing::warn!(queue = %inner.name, cause = %e, "lifting delete fences failed; writers lift them as they meet them");
                }
                set
            }
        };
        if set.mode != placement::DeliveryMode::AtMostOnce {
            inner.keep_shards(&set.shards).await;
        }
        inner.read_bulk_limit().await;
        *inner.shards.write().unwrap() = Arc::new(set);
        Ok(Queue {
            inner: Arc::new(inner),
        })
    }
}

pub(crate) struct Scripts {
    pub(crate) create: Script,
    pub(crate) update: Script,
    pub(crate) push_bounded: Script,
    pub(crate) push_dedup: Script,
    pub(crate) schedule: Script,
    pub(crate) promote: Script,
    pub(crate) cancel: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            create: Script::new(include_str!("../lua/create_registry.lua")),
            update: Script::new(include_str!("../lua/update_registry.lua")),
            push_bounded: Script::new(include_str!("../lua/push_bounded.lua")),
            push_dedup: Script::new(include_str!("../lua/push_dedup.lua")),
            schedule: Script::new(concat!(
                include_str!("../lua/frames.lua"),
                include_str!("../lua/schedule.lua")
            )),
            promote: Script::new(concat!(
                include_str!("../lua/frames.lua"),
                include_str!("../lua/promote.lua")
            )),
            cancel: Script::new(include_str!("../lua/cancel.lua")),
        }
    }
}

/// A handle to an open queue; clone-able and cheap to share.
#[derive(Clone)]
pub struct Queue {
    pub(crate) inner: Arc<QueueInner>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.inner.name)
            .field("shards", &self.inner.shards.read().unwrap())
            .finish()
    }
}

pub(crate) struct QueueInner {
    pub(crate) cluster: Cluster,
    pub(crate) name: String,
    pub(crate) prefix: String,
    meta: String,
    meta_slot: Slot,
    shards: RwLock<Arc<ShardSet>>,
    checked: Mutex<Instant>,
    checking: AtomicBool,
    pub(crate) registry_poll: Duration,
    pub(crate) scripts: Scripts,
    pub(crate) lease_scripts: Arc<crate::lease::LeaseScripts>,
    /// The consumer-group heartbeat.
    pub(crate) group_script: Arc<Script>,
    /// The server's largest string (`proto-max-bulk-len`), read when the queue is opened.
    pub(crate) bulk_limit: std::sync::atomic::AtomicU64,
    /// The registry was found gone (the queue was deleted): sends and receives fail with
    /// [`Error::QueueNotFound`].
    pub(crate) deleted: AtomicBool,
    /// Opened to finish a delete (see [`QueueBuilder::to_finish_a_delete`]).
    pub(crate) finish_delete: bool,
    /// One registry look at a time in [`Queue::check_live`].
    live_check: tokio::sync::Mutex<()>,
    /// Messages in and out, counted here and written once a second (`flow.rs`).
    flow: Arc<flow::FlowCounts>,
}

/// What [`Queue::expand`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandReport {
    /// Tags added (empty when every master already had its shards).
    pub added: Vec<String>,
    /// Registry version after the call.
    pub version: u64,
}

impl Queue {
    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The router underneath.
    /// The key prefix of the queue's keys.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// How often clients look for a new registry version.
    pub(crate) fn registry_poll(&self) -> Duration {
        self.inner.registry_poll
    }

    /// The scripts of at-least-once delivery.
    pub(crate) fn lease_scripts(&self) -> Arc<crate::lease::LeaseScripts> {
        self.inner.lease_scripts.clone()
    }

    /// The consumer-group heartbeat script.
    pub(crate) fn group_script(&self) -> Arc<Script> {
        self.inner.group_script.clone()
    }

    /// The queue's own scripts (registry, bounded push).
    pub(crate) fn scripts(&self) -> &Scripts {
        &self.inner.scripts
    }

    /// Compare-and-set of the registry on its version: true when written.
    pub(crate) async fn write_registry(&self, expected: u64, next: &ShardSet) -> Result<bool> {
        self.inner.write_registry(expected, next).await
    }

    /// Reliable queues: makes the shards' keys exist for good.
    pub(crate) async fn keep_shards(&self, shards: &[placement::Shard]) {
        self.inner.keep_shards(shards).await
    }

    /// The router this queue uses.
    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    /// Fails with [`Error::QueueNotFound`] once the queue was found deleted (its registry
    /// gone). When the last look at the registry is older than the registry poll (1 s by
    /// default), this looks again before answering, and every caller waits for that one
    /// look: a producer that was idle while the queue was deleted must not write to it.
    pub(crate) async fn check_live(&self) -> Result<()> {
        let due =
            |inner: &QueueInner| inner.checked.lock().unwrap().elapsed() >= inner.registry_poll;
        if due(&self.inner) && !self.inner.deleted.load(Ordering::Acquire) {
            let _one = self.inner.live_check.lock().await;
            if due(&self.inner) {
                let seen: Result<Option<u64>> = self
                    .inner
                    .cluster
                    .query_with(
                        self.inner.meta_slot,
                        redis::cmd("HGET").arg(&self.inner.meta).arg("version"),
                        // One try, briefly: a registry master that is down must not hold
                        // up sends to the other masters (the look is retried a poll later).
                        crate::cluster::RequestOpts {
                            retry_budget: Duration::ZERO,
                            timeout: self
                                .inner
                                .cluster
                                .default_opts()
                                .timeout
                                .min(Duration::from_millis(500)),
                            ..self.inner.idempotent()
                        },
                    )
                    .await;
                match seen {
                    Ok(None) => self.inner.deleted.store(true, Ordering::Release),
                    Ok(Some(v)) if v != self.inner.shards.read().unwrap().version => {
                        if let Err(e) = self.inner.reload().await {
                            tracing::warn!(queue = %self.inner.name, cause = %e, "registry reload failed");
                        }
                    }
                    // Unreachable registry: the send or receive finds out on its own.
                    _ => {}
                }
                *self.inner.checked.lock().unwrap() = Instant::now();
            }
        }
        if self.inner.deleted.load(Ordering::Acquire) {
            return Err(Error::QueueNotFound(self.inner.name.clone()));
        }
        Ok(())
    }

    /// The registry as stored now (`None`: gone or being deleted), without touching the
    /// set this handle uses.
    pub(crate) async fn registry_now(&self) -> Result<Option<ShardSet>> {
        self.inner.read_registry().await
    }

    /// Marks the queue deleted for this client's own producers and consumers at once.
    pub(crate) fn inner_deleted(&self) {
        self.inner.deleted.store(true, Ordering::Release);
        self.flow_deleted();
    }

    /// The current shard set; looks for a newer registry version in the background at
    /// most once per poll interval.
    pub fn shards(&self) -> Arc<ShardSet> {
        self.inner.maybe_check_version();
        self.inner.shards.read().unwrap().clone()
    }

    /// Re-reads the registry now.
    pub async fn reload(&self) -> Result<Arc<ShardSet>> {
        self.inner.reload().await
    }

    /// The ready list key of a shard.
    pub fn ready_key(&self, tag: &str) -> String {
        ready_key(&self.inner.prefix, tag)
    }

    /// The registry key.
    pub fn meta_key(&self) -> &str {
        &self.inner.meta
    }

    /// Adds shards on masters that serve fewer than `shards_per_master` active shards
    /// (after masters were added or slots moved), bumping the registry version. Existing
    /// shards are never removed.
    pub async fn expand(&self) -> Result<ExpandReport> {
        let inner = &self.inner;
        for _ in 0..REGISTRY_CAS_ATTEMPTS {
            let current = inner
                .read_registry()
                .await?
                .ok_or_else(|| Error::QueueNotFound(inner.name.clone()))?;
            let topology = inner.cluster.refresh().await?;
            let added = placement::extend_plan(
                &inner.name,
                &topology,
                current.shards_per_master,
                &current.shards,
            );
            if added.is_empty() {
                *inner.shards.write().unwrap() = Arc::new(current.clone());
                return Ok(ExpandReport {
                    added: Vec::new(),
                    version: current.version,
                });
            }
            let mut next = current.clone();
            next.version += 1;
            next.shards.extend(added.iter().cloned());
            if inner.write_registry(current.version, &next).await? {
                if next.mode != placement::DeliveryMode::AtMostOnce {
                    inner.keep_shards(&added).await;
                }
                let version = next.version;
                *inner.shards.write().unwrap() = Arc::new(next);
                return Ok(ExpandReport {
                    added: added.into_iter().map(|s| s.tag).collect(),
                    version,
                });
            }
        }
        Err(Error::RegistryContention(inner.name.clone()))
    }

    /// At-most-once or at-least-once (fixed at creation).
    pub fn mode(&self) -> placement::DeliveryMode {
        self.inner.shards.read().unwrap().mode
    }

    /// Whether the queue was paused, as of this client's last look at the registry (at
    /// most one registry poll old while it is used).
    pub fn is_paused(&self) -> bool {
        self.inner.shards.read().unwrap().paused
    }

    /// Pauses the queue: every consumer, in every process, stops taking new messages
    /// within one registry poll (1 s by default) and gives back what it took and had not
    /// handed out; messages already handed out are settled as usual. Producers go on
    /// sending. The pause is a registry field, written with a `WAIT` for the registry
    /// master's replicas, so it survives a failover. Returns false when the queue was
    /// paused already.
    pub async fn pause(&self) -> Result<bool> {
        self.set_paused(true).await
    }

    /// Resumes a paused queue: consumers take messages again within one registry poll.
    /// Returns false when the queue was not paused.
    pub async fn resume(&self) -> Result<bool> {
        self.set_paused(false).await
    }

    async fn set_paused(&self, paused: bool) -> Result<bool> {
        let inner = &self.inner;
        for _ in 0..REGISTRY_CAS_ATTEMPTS {
            let current = inner
                .read_registry()
                .await?
                .ok_or_else(|| Error::QueueNotFound(inner.name.clone()))?;
            if current.paused == paused {
                *inner.shards.write().unwrap() = Arc::new(current);
                return Ok(false);
            }
            let mut next = current.clone();
            next.version += 1;
            next.paused = paused;
            if inner.write_registry(current.version, &next).await? {
                *inner.shards.write().unwrap() = Arc::new(next);
                return Ok(true);
            }
        }
        Err(Error::RegistryContention(inner.name.clone()))
    }
}
