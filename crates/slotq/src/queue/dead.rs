//! The dead letters of an at-least-once queue: list them with why they died, replay them
//! (in bulk or by message id), purge them. The record each one is kept in is described in
//! `lease/dead.rs`.

use std::collections::HashSet;

use redis::Value;

use super::Queue;
use super::stats::int;
use crate::error::{Error, Result};
use crate::lease::{self, DeadReason, KEEP, MessageId, ShardKeys};

/// A message in the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its shard.
    pub shard: String,
    /// Its id (all zeros for bytes that were never a slotq message).
    pub id: MessageId,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// When it was first enqueued (ms since the Unix epoch, producer clock).
    pub enqueued_ms: u64,
    /// Why it died.
    pub reason: DeadReason,
    /// What was recorded with the reason: the consumer's explanation, the handler's exit
    /// status and stderr tail under `slotq consume --exec` (may be empty).
    pub detail: String,
    /// When it died (ms since the Unix epoch, server clock); `None` for dead letters
    /// written by a version that did not record it.
    pub died_ms: Option<u64>,
    /// The payload (for an unreadable element: the bytes found).
    pub payload: Vec<u8>,
    /// The headers it was sent with (empty when none).
    pub headers: Vec<(String, String)>,
}

impl DeadLetter {
    fn read(shard: &str, element: &[u8]) -> DeadLetter {
        let record = lease::decode_dead(element);
        let (id, deliveries, enqueued_ms, payload, headers) =
            match lease::decode_envelope(record.body.to_vec()) {
                Ok(env) => (
                    env.id,
                    env.deliveries as u32,
                    env.enqueued_ms,
                    env.payload,
                    env.meta.map(|m| m.headers).unwrap_or_default(),
                ),
                Err(_) => (MessageId([0; 16]), 0, 0, record.body.to_vec(), Vec::new()),
            };
        DeadLetter {
            shard: shard.to_string(),
            id,
            deliveries,
            enqueued_ms,
            reason: record.reason,
            detail: record.detail,
            died_ms: record.died_ms,
            payload,
            headers,
        }
    }
}

impl Queue {
    fn shard_keys(&self, set: &crate::placement::ShardSet) -> Vec<ShardKeys> {
        set.shards
            .iter()
            .map(|s| ShardKeys::new(&self.inner.prefix, &s.tag))
            .collect()
    }

    /// Up to `max` elements of every shard's dead list (`None`: all), the KEEP head left
    /// out, one `LRANGE` per shard pipelined per node.
    async fn dead_elements(
        &self,
        keys: &[ShardKeys],
        max: Option<usize>,
    ) -> Result<Vec<Vec<Vec<u8>>>> {
        let cluster = &self.inner.cluster;
        // One more than wanted: the list starts with its KEEP entry.
        let last = max.map_or(-1, |m| m.min(i64::MAX as usize - 1) as i64);
        let cmds = keys
            .iter()
            .map(|k| {
                (
                    k.slot,
                    redis::cmd("LRANGE").arg(&k.dead).arg(0).arg(last).clone(),
                )
            })
            .collect();
        let mut out = Vec::new();
        for r in cluster.batch(cmds, cluster.default_opts()).await {
            let mut elements = Vec::new();
            if let Value::Array(items) = r? {
                for item in items {
                    if let Value::BulkString(e) = item
                        && e != KEEP
                    {
                        elements.push(e);
                    }
                }
            }
            if let Some(m) = max {
                elements.truncate(m);
            }
            out.push(elements);
        }
        Ok(out)
    }

    /// Up to `max` dead letters per shard, oldest first, without removing them; each says
    /// why and when it died.
    pub async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>> {
        self.require_reliable()?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let set = self.reload().await?;
        let keys = self.shard_keys(&set);
        let lists = self.dead_elements(&keys, Some(max)).await?;
        Ok(keys
            .iter()
            .zip(lists)
            .flat_map(|(k, list)| {
                list.into_iter()
                    .map(|e| DeadLetter::read(&k.tag, &e))
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    /// Moves up to `max` dead letters per shard back to the ready lists (delivery counts
    /// reset); returns how many moved. Unreadable elements stay dead.
    pub async fn replay_dead(&self, max: usize) -> Result<u64> {
        self.require_reliable()?;
        let set = self.reload().await?;
        let keys = self.shard_keys(&set);
        let args: Vec<Vec<Vec<u8>>> = keys
            .iter()
            .map(|_| vec![max.to_string().into_bytes()])
            .collect();
        self.run_replay(&keys, args).await
    }

    /// Moves the dead letters with these ids back to the ready lists (delivery counts
    /// reset). Returns the ids moved; an id not among the dead letters (never there,
    /// replayed or purged meanwhile) is left out, so replays racing each other move a
    /// letter once. Reads every shard's whole dead list to find them.
    pub async fn replay_dead_ids(&self, ids: &[MessageId]) -> Result<Vec<MessageId>> {
        self.require_reliable()?;
        let wanted: HashSet<MessageId> = ids.iter().copied().collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let set = self.reload().await?;
        let keys = self.shard_keys(&set);
        let lists = self.dead_elements(&keys, None).await?;
        let mut named: Vec<Vec<MessageId>> = Vec::new();
        let mut args = Vec::new();
        let mut shards = Vec::new();
        for (k, list) in keys.iter().zip(lists) {
            let mut exact = vec![b"exact".to_vec()];
            let mut ids = Vec::new();
            for e in list {
                if let Some(id) = lease::dead_id(&e).filter(|id| wanted.contains(id)) {
                    ids.push(id);
                    exact.push(e);
                }
            }
            if !ids.is_empty() {
                shards.push(k.clone());
                args.push(exact);
                named.push(ids);
            }
        }
        let mut moved = Vec::new();
        for (ids, r) in named
            .into_iter()
            .zip(self.replay_calls(&shards, args).await)
        {
            let flags: Vec<i64> =
                redis::from_redis_value(r?).map_err(|e| Error::Protocol(format!("replay: {e}")))?;
            // A 0: replayed or purged by someone else since it was read.
            moved.extend(
                ids.into_iter()
                    .zip(flags)
                    .filter(|(_, f)| *f == 1)
                    .map(|(id, _)| id),
            );
        }
        Ok(moved)
    }

    async fn run_replay(&self, keys: &[ShardKeys], args: Vec<Vec<Vec<u8>>>) -> Result<u64> {
        let mut moved = 0;
        for r in self.replay_calls(keys, args).await {
            moved += int(r?)?;
        }
        Ok(moved)
    }

    async fn replay_calls(
        &self,
        keys: &[ShardKeys],
        args: Vec<Vec<Vec<u8>>>,
    ) -> Vec<Result<Value>> {
        let scripts = self.inner.lease_scripts.clone();
        let calls: Vec<crate::script::Call<'_>> = keys
            .iter()
            .zip(args)
            .map(|(k, args)| crate::script::Call {
                slot: k.slot,
                script: &scripts.replay,
                keys: vec![k.dead.clone(), k.ready.clone(), k.count.clone()],
                args,
            })
            .collect();
        let cluster = &self.inner.cluster;
        crate::script::run_batch(cluster, &calls, cluster.default_opts()).await
    }
    /// Deletes every dead letter; returns how many there were.
    pub async fn purge_dead(&self) -> Result<u64> {
        self.require_reliable()?;
        let set = self.reload().await?;
        let cluster = &self.inner.cluster;
        let mut cmds = Vec::new();
        for k in self.shard_keys(&set) {
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
}
