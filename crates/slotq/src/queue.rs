//! A logical queue: its registry (read or created atomically), its shard set (re-read when
//! the version changes), expansion onto new masters, and per-shard statistics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::Value;

use crate::cluster::Cluster;
use crate::consumer::ConsumerBuilder;
use crate::error::{Error, Result};
use crate::placement::{
    self, DEFAULT_PREFIX, DEFAULT_SHARDS_PER_MASTER, ShardSet, ShardState, meta_key, ready_key,
};
use crate::producer::ProducerBuilder;
use crate::script::Script;
use crate::slot::{Slot, key_slot};
use crate::topology::NodeAddr;

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

    /// Fail with [`Error::QueueNotFound`] instead of creating a missing queue.
    pub fn must_exist(mut self) -> Self {
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
        let meta = meta_key(&self.prefix, &self.name);
        let inner = QueueInner {
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
            })),
            checked: Mutex::new(Instant::now()),
            checking: AtomicBool::new(false),
            registry_poll: self.registry_poll,
            bulk_limit: std::sync::atomic::AtomicU64::new(DEFAULT_BULK_LIMIT),
            deleted: AtomicBool::new(false),
            live_check: tokio::sync::Mutex::new(()),
            scripts: Scripts::new(),
            lease_scripts: Arc::new(crate::lease::LeaseScripts::new()),
            group_script: Arc::new(Script::new(include_str!("lua/group_beat.lua"))),
        };
        let set = match inner.read_registry().await? {
            Some(set) => set,
            None if !self.create => return Err(Error::QueueNotFound(inner.name.clone())),
            None => {
                inner
                    .create_registry(self.shards_per_master, self.mode)
                    .await?
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
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            create: Script::new(include_str!("lua/create_registry.lua")),
            update: Script::new(include_str!("lua/update_registry.lua")),
            push_bounded: Script::new(include_str!("lua/push_bounded.lua")),
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
    /// One registry look at a time in [`Queue::check_live`].
    live_check: tokio::sync::Mutex<()>,
}

/// One shard's numbers, from [`Queue::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStats {
    /// `<queue>#<n>`.
    pub tag: String,
    /// Its slot.
    pub slot: Slot,
    /// The master serving the slot now.
    pub node: Option<NodeAddr>,
    /// Active or draining.
    pub state: ShardState,
    /// Messages ready.
    pub depth: u64,
    /// Reliable queues: messages leased and not yet settled.
    pub in_flight: Option<u64>,
    /// Reliable queues: dead letters.
    pub dead: Option<u64>,
    /// Reliable queues: messages waiting for a delayed redelivery.
    pub delayed: Option<u64>,
    /// Reliable queues: age of the message at the head of the ready list (producer clock).
    pub oldest_age: Option<Duration>,
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

    /// A consumer group's members, their shards, and each shard's lag.
    pub async fn group_status(&self, group: &str) -> Result<crate::group::GroupStatus> {
        crate::group::status(self, group).await
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

    /// Depth of every shard (one LLEN per shard, pipelined per node) and where it sits; for
    /// reliable queues also in-flight, delayed and dead counts and the oldest message's age.
    pub async fn stats(&self) -> Result<Vec<ShardStats>> {
        let set = self.reload().await?;
        let cluster = &self.inner.cluster;
        let reliable = set.mode != placement::DeliveryMode::AtMostOnce;
        let mut cmds = Vec::new();
        let mut inflight_calls = Vec::new();
        for s in &set.shards {
            let k = crate::lease::ShardKeys::new(&self.inner.prefix, &s.tag);
            if !reliable {
                cmds.push((s.slot, redis::cmd("LLEN").arg(&k.ready).clone()));
            } else {
                cmds.push((s.slot, redis::cmd("GET").arg(&k.count).clone()));
                cmds.push((s.slot, redis::cmd("LLEN").arg(&k.dead).clone()));
                cmds.push((s.slot, redis::cmd("ZCARD").arg(&k.delayed).clone()));
                cmds.push((s.slot, redis::cmd("LINDEX").arg(&k.ready).arg(0).clone()));
                inflight_calls.push(crate::script::Call {
                    slot: s.slot,
                    script: &self.inner.lease_scripts.inflight,
                    keys: vec![k.acks.clone()],
                    args: Vec::new(),
                });
            }
        }
        let opts = crate::cluster::RequestOpts {
            idempotent: true,
            ..cluster.default_opts()
        };
        let mut replies = cluster.batch(cmds, opts).await.into_iter();
        let mut inflight = crate::script::run_batch(cluster, &inflight_calls, opts)
            .await
            .into_iter();
        let topology = cluster.topology();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut out = Vec::with_capacity(set.shards.len());
        for s in &set.shards {
            let mut next = || replies.next().expect("one reply per command");
            let (mut dead, mut delayed, mut oldest_age, mut in_flight) = (None, None, None, None);
            let depth;
            if reliable {
                depth = match next()? {
                    Value::BulkString(b) => String::from_utf8_lossy(&b)
                        .parse::<i64>()
                        .unwrap_or(0)
                        .max(0) as u64,
                    other => int(other)?,
                };
                // Both hold a KEEP entry once the shard was popped (see `lease::KEEP`).
                dead = Some(int(next()?)?.saturating_sub(1));
                delayed = Some(int(next()?)?.saturating_sub(1));
                oldest_age = match next()? {
                    Value::BulkString(f) => crate::lease::decode_frame(&f)
                        .ok()
                        .and_then(|envs| envs.into_iter().next())
                        .and_then(|e| crate::lease::decode_envelope(e).ok())
                        .map(|e| Duration::from_millis(now_ms.saturating_sub(e.enqueued_ms))),
                    _ => None,
                };
                in_flight = Some(int(inflight.next().expect("one reply per shard")?)?);
            } else {
                depth = int(next()?)?;
            }
            out.push(ShardStats {
                tag: s.tag.clone(),
                slot: s.slot,
                node: topology.owner(s.slot).cloned(),
                state: s.state,
                depth,
                in_flight,
                dead,
                delayed,
                oldest_age,
            });
        }
        Ok(out)
    }

    /// At-most-once or at-least-once (fixed at creation).
    pub fn mode(&self) -> placement::DeliveryMode {
        self.inner.shards.read().unwrap().mode
    }

    fn require_reliable(&self) -> Result<()> {
        match self.mode() {
            placement::DeliveryMode::AtMostOnce => Err(Error::NotReliable(format!(
                "queue {:?} is at-most-once: it has no leases or dead letters",
                self.name()
            ))),
            _ => Ok(()),
        }
    }

    /// Up to `max` dead letters per shard, oldest first, without removing them.
    pub async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>> {
        self.require_reliable()?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let set = self.reload().await?;
        let cluster = &self.inner.cluster;
        let keys: Vec<crate::lease::ShardKeys> = set
            .shards
            .iter()
            .map(|s| crate::lease::ShardKeys::new(&self.inner.prefix, &s.tag))
            .collect();
        let cmds = keys
            .iter()
            .map(|k| {
                (
                    k.slot,
                    // One more than wanted: the list starts with its KEEP entry.
                    redis::cmd("LRANGE")
                        .arg(&k.dead)
                        .arg(0)
                        .arg(max.min(i64::MAX as usize - 1) as i64)
                        .clone(),
                )
            })
            .collect();
        let mut out = Vec::new();
        for (k, r) in keys
            .iter()
            .zip(cluster.batch(cmds, cluster.default_opts()).await)
        {
            if let Value::Array(items) = r? {
                let letters = items
                    .into_iter()
                    .filter(|i| !matches!(i, Value::BulkString(b) if b == crate::lease::KEEP))
                    .take(max);
                for item in letters {
                    if let Value::BulkString(e) = item {
                        // Something that is not an envelope (pushed by hand) is shown raw.
                        let letter = match crate::lease::decode_envelope(e.clone()) {
                            Ok(env) => DeadLetter {
                                shard: k.tag.to_string(),
                                id: env.id,
                                deliveries: env.deliveries as u32,
                                enqueued_ms: env.enqueued_ms,
                                payload: env.payload,
                            },
                            Err(_) => DeadLetter {
                                shard: k.tag.to_string(),
                                id: crate::lease::MessageId([0; 16]),
                                deliveries: 0,
                                enqueued_ms: 0,
                                payload: e,
                            },
                        };
                        out.push(letter);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Moves up to `max` dead letters per shard back to the ready lists (delivery counts
    /// reset); returns how many moved.
    pub async fn replay_dead(&self, max: usize) -> Result<u64> {
        self.require_reliable()?;
        let set = self.reload().await?;
        let scripts = self.inner.lease_scripts.clone();
        let calls: Vec<crate::script::Call<'_>> = set
            .shards
            .iter()
            .map(|s| {
                let k = crate::lease::ShardKeys::new(&self.inner.prefix, &s.tag);
                crate::script::Call {
                    slot: k.slot,
                    script: &scripts.replay,
                    keys: vec![k.dead.clone(), k.ready.clone(), k.count.clone()],
                    args: vec![max.to_string().into_bytes()],
                }
            })
            .collect();
        let cluster = &self.inner.cluster;
        let mut moved = 0;
        for r in crate::script::run_batch(cluster, &calls, cluster.default_opts()).await {
            moved += int(r?)?;
        }
        Ok(moved)
    }

    /// Deletes every dead letter; returns how many there were.
    pub async fn purge_dead(&self) -> Result<u64> {
        self.require_reliable()?;
        let set = self.reload().await?;
        let cluster = &self.inner.cluster;
        let mut cmds = Vec::new();
        for s in &set.shards {
            let k = crate::lease::ShardKeys::new(&self.inner.prefix, &s.tag);
            // The list's KEEP entry goes too; the next reliable pop puts it back.
            cmds.push((k.slot, redis::cmd("LLEN").arg(&k.dead).clone()));
            cmds.push((k.slot, redis::cmd("DEL").arg(&k.dead).clone()));
        }
        let mut purged = 0;
        for (i, r) in cluster
            .batch(cmds, cluster.default_opts())
            .await
            .into_iter()
            .enumerate()
        {
            let v = r?;
            if i % 2 == 0 {
                purged += int(v)?.saturating_sub(1);
            }
        }
        Ok(purged)
    }

    /// A producer builder for this queue.
    pub fn producer(&self) -> ProducerBuilder {
        ProducerBuilder::new(self.clone())
    }

    /// A consumer builder for this queue.
    pub fn consumer(&self) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone())
    }
}

/// How long a registry change waits for the registry master's replicas.
const REGISTRY_WAIT: Duration = Duration::from_secs(1);

/// Redis's default `proto-max-bulk-len`: the largest string a command may carry.
pub const DEFAULT_BULK_LIMIT: u64 = 512 * 1024 * 1024;

impl QueueInner {
    /// Reads `proto-max-bulk-len` from the registry's node (the default stays when the
    /// server does not say: CONFIG renamed or refused by an ACL), and warns when keys may
    /// be evicted (`maxmemory-policy` other than `noeviction`): an evicted shard key loses
    /// messages, an evicted lease key loses leases.
    async fn read_bulk_limit(&self) {
        let cmd = redis::cmd("CONFIG")
            .arg("GET")
            .arg("proto-max-bulk-len")
            .arg("maxmemory-policy")
            .clone();
        let Ok(Value::Array(v)) = self.cluster.query::<Value>(self.meta_slot, &cmd).await else {
            return;
        };
        let text = |v: &Value| match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        for pair in v.chunks(2) {
            let (Some(name), Some(value)) =
                (pair.first().and_then(text), pair.get(1).and_then(text))
            else {
                continue;
            };
            match name.as_str() {
                "proto-max-bulk-len" => {
                    if let Ok(limit) = value.parse() {
                        self.bulk_limit
                            .store(limit, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                "maxmemory-policy" if value != "noeviction" => tracing::warn!(
                    queue = %self.name, policy = %value,
                    "maxmemory-policy is not noeviction: under memory pressure Redis may evict queue keys"
                ),
                _ => {}
            }
        }
    }

    /// Reliable queues: makes the shards' keys exist for good (see `lease::keep_shards`).
    pub(crate) async fn keep_shards(&self, shards: &[placement::Shard]) {
        let keys: Vec<crate::lease::ShardKeys> = shards
            .iter()
            .map(|s| crate::lease::ShardKeys::new(&self.prefix, &s.tag))
            .collect();
        crate::lease::keep_shards(&self.cluster, &self.lease_scripts, &keys).await;
    }

    pub(crate) async fn read_registry(&self) -> Result<Option<ShardSet>> {
        let v: Value = self
            .cluster
            .query_with(
                self.meta_slot,
                redis::cmd("HGETALL").arg(&self.meta),
                self.idempotent(),
            )
            .await?;
        let fields = hash_fields(v)?;
        if fields.is_empty() {
            return Ok(None);
        }
        ShardSet::from_fields(&self.name, &fields).map(Some)
    }

    async fn create_registry(&self, k: u32, mode: placement::DeliveryMode) -> Result<ShardSet> {
        let topology = self.cluster.topology();
        let shards = placement::plan(&self.name, &topology, k);
        if shards.is_empty() {
            return Err(Error::NoMasters);
        }
        let proposal = ShardSet {
            version: 1,
            keyed: shards.iter().map(|s| s.number).collect(),
            shards,
            shards_per_master: k,
            mode,
        };
        let v = self
            .registry_script(&self.scripts.create, None, &proposal)
            .await?;
        ShardSet::from_fields(&self.name, &hash_fields(v)?)
    }

    pub(crate) async fn write_registry(&self, expected: u64, next: &ShardSet) -> Result<bool> {
        let v = self
            .registry_script(&self.scripts.update, Some(expected), next)
            .await?;
        Ok(matches!(v, Value::Int(1)))
    }

    /// Runs a registry script on the registry key: ARGV = [`lead`], then the set's fields.
    async fn registry_script(
        &self,
        script: &Script,
        lead: Option<u64>,
        set: &ShardSet,
    ) -> Result<Value> {
        let mut args: Vec<Vec<u8>> = lead
            .map(|v| v.to_string().into_bytes())
            .into_iter()
            .collect();
        args.extend(
            set.to_fields()
                .into_iter()
                .flat_map(|(k, v)| [k.into_bytes(), v.into_bytes()]),
        );
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        // The write and a WAIT for the registry master's replicas go as one unit on one
        // connection: a failover right after a change must not roll the registry back
        // while clients already use the new shard set. Registry writes are rare, so the
        // script goes by source (no NOSCRIPT round).
        let topology = self.cluster.topology();
        let replicas = topology
            .owner(self.meta_slot)
            .map_or(0, |m| topology.replicas_of(m).len());
        if replicas == 0 {
            return script
                .run(
                    &self.cluster,
                    self.meta_slot,
                    &[&self.meta],
                    &args,
                    self.idempotent(),
                )
                .await;
        }
        let wait = redis::cmd("WAIT")
            .arg(replicas)
            .arg(REGISTRY_WAIT.as_millis() as u64)
            .clone();
        let mut opts = self.idempotent();
        opts.timeout += REGISTRY_WAIT;
        opts.isolated = true;
        opts.together = true;
        let cmds = vec![
            (self.meta_slot, script.cmd(&[&self.meta], &args, true)),
            (self.meta_slot, wait),
        ];
        let mut out = self.cluster.batch(cmds, opts).await;
        match out.pop().expect("two replies") {
            Ok(Value::Int(n)) if (n as usize) < replicas => {
                tracing::warn!(queue = %self.name, acked = n, replicas, "registry change not on every replica yet");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(queue = %self.name, cause = %e, "registry change: WAIT failed")
            }
        }
        out.pop().expect("two replies")
    }

    async fn reload(&self) -> Result<Arc<ShardSet>> {
        let set = self
            .read_registry()
            .await?
            .ok_or_else(|| Error::QueueNotFound(self.name.clone()))?;
        *self.checked.lock().unwrap() = Instant::now();
        let mut guard = self.shards.write().unwrap();
        if set.version >= guard.version {
            *guard = Arc::new(set);
        }
        Ok(guard.clone())
    }

    fn maybe_check_version(self: &Arc<Self>) {
        if self.checked.lock().unwrap().elapsed() < self.registry_poll
            || self.checking.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.checking.store(false, Ordering::Release);
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            let known = me.shards.read().unwrap().version;
            let seen: Result<Option<u64>> = me
                .cluster
                .query_with(
                    me.meta_slot,
                    redis::cmd("HGET").arg(&me.meta).arg("version"),
                    me.idempotent(),
                )
                .await;
            match seen {
                Ok(None) if known > 0 => {
                    tracing::warn!(queue = %me.name, "the queue's registry is gone: the queue was deleted");
                    me.deleted.store(true, Ordering::Release);
                }
                Ok(Some(v)) if v != known => {
                    if let Err(e) = me.reload().await {
                        tracing::warn!(queue = %me.name, cause = %e, "registry reload failed");
                    }
                }
                _ => *me.checked.lock().unwrap() = Instant::now(),
            }
            me.checking.store(false, Ordering::Release);
        });
    }

    fn idempotent(&self) -> crate::cluster::RequestOpts {
        crate::cluster::RequestOpts {
            idempotent: true,
            ..self.cluster.default_opts()
        }
    }
}

/// A message in the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its shard.
    pub shard: String,
    /// Its id.
    pub id: crate::lease::MessageId,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// When it was first enqueued (ms since the Unix epoch, producer clock).
    pub enqueued_ms: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

fn int(v: Value) -> Result<u64> {
    match v {
        Value::Int(n) => Ok(n.max(0) as u64),
        Value::Nil => Ok(0),
        other => Err(Error::Protocol(format!(
            "expected an integer, got {other:?}"
        ))),
    }
}

fn hash_fields(v: Value) -> Result<BTreeMap<String, String>> {
    let text = |v: &Value| crate::topology::as_string(v).unwrap_or_default();
    match v {
        Value::Nil => Ok(BTreeMap::new()),
        Value::Map(pairs) => Ok(pairs.iter().map(|(k, v)| (text(k), text(v))).collect()),
        Value::Array(items) => Ok(items
            .chunks(2)
            .filter_map(|c| match c {
                [k, v] => Some((text(k), text(v))),
                _ => None,
            })
            .collect()),
        other => Err(Error::Protocol(format!("registry: unexpected {other:?}"))),
    }
}
