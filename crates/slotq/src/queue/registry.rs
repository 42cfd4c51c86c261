//! The queue's registry in Redis: reading it, creating it atomically, compare-and-set
//! updates (with a `WAIT` for the registry master's replicas), and noticing new versions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;

use super::QueueInner;
use crate::error::{Error, Result};
use crate::placement::{self, ShardSet};
use crate::script::Script;

/// The field that marks a registry deleting (its `version` removed in the same script).
pub(crate) const DELETING: &str = "deleting";

/// How long a registry change waits for the registry master's replicas.
const REGISTRY_WAIT: Duration = Duration::from_secs(1);

/// Redis's default `proto-max-bulk-len`: the largest string a command may carry.
pub const DEFAULT_BULK_LIMIT: u64 = 512 * 1024 * 1024;

impl QueueInner {
    /// Reads `proto-max-bulk-len` from the registry's node (the default stays when the
    /// server does not say: CONFIG renamed or refused by an ACL), and warns when keys may
    /// be evicted (`maxmemory-policy` other than `noeviction`): an evicted shard key loses
    /// messages, an evicted lease key loses leases.
    pub(super) async fn read_bulk_limit(&self) {
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
        self.parse_registry(fields).map(Some)
    }

    /// A registry's fields as a shard set. A registry marked `deleting` (a delete in
    /// progress, or one cut short) has no version: the queue does not exist for anyone
    /// but a delete that finishes it.
    fn parse_registry(&self, mut fields: BTreeMap<String, String>) -> Result<ShardSet> {
        if fields.contains_key(DELETING) {
            if !self.finish_delete {
                return Err(Error::QueueNotFound(self.name.clone()));
            }
            fields.insert("version".into(), "0".into());
        }
        ShardSet::from_fields(&self.name, &fields)
    }

    pub(super) async fn create_registry(
        &self,
        k: u32,
        mode: placement::DeliveryMode,
        drop_expired: bool,
        priorities: bool,
    ) -> Result<ShardSet> {
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
            cleanup: Vec::new(),
            paused: false,
            drop_expired,
            priorities,
        };
        let v = self
            .registry_script(&self.scripts.create, None, &proposal)
            .await?;
        // A registry that exists is returned as it is: a tombstone of a delete in progress
        // is not replaced (the delete would remove what this queue stores).
        self.parse_registry(hash_fields(v)?)
    }

    pub(crate) async fn write_registry(&self, expected: u64, next: &ShardSet) -> Result<bool> {
        let v = self
            .registry_script(&self.scripts.update, Some(expected), next)
            .await?;
        Ok(matches!(v, Value::Int(1)))
    }

    /// Runs a registry script on the registry key: ARGV = [`lead`], then the set's fields.
    pub(super) async fn registry_script(
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

    pub(super) async fn reload(&self) -> Result<Arc<ShardSet>> {
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

    pub(super) fn maybe_check_version(self: &Arc<Self>) {
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

    pub(super) fn idempotent(&self) -> crate::cluster::RequestOpts {
        crate::cluster::RequestOpts {
            idempotent: true,
            ..self.cluster.default_opts()
        }
    }
}

/// The fields of a hash reply (`HGETALL`: pairs in RESP2, a map in RESP3).
fn hash_fields(v: Value) -> Result<BTreeMap<String, String>> {
    redis::from_redis_value(v).map_err(|e| Error::Protocol(format!("registry: {e}")))
}
