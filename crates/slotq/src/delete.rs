//! Deleting a queue: every key of it, on every node.
//!
//! 1. The registry becomes a *tombstone* (one script: its `version` removed, `deleting`
//!    set, the shard list kept): no client opens the queue any more, clients that use it
//!    find it gone at their next registry look (at most every registry poll while they
//!    send or receive) and fail with [`Error::QueueNotFound`] from then on, and — what a
//!    registry simply deleted allowed — nobody can create the queue again while its keys
//!    are being deleted: an open that would create it finds the tombstone and gets
//!    `QueueNotFound` (before, a push racing the delete recreated the registry, was
//!    confirmed, and the delete's shard phase then deleted its messages).
//! 2. The queue's groups (the registry's slot).
//! 3. After two registry polls, every key of every shard: ready lists, leases, counts,
//!    delayed and dead messages, fences (a push that slipped in between is deleted with
//!    them). First the keys a write creates become fences that expire after an hour
//!    (`delete_fence.rs`): a writer stalled past every registry look is refused by the
//!    server (`WRONGTYPE`) instead of storing into a deleted queue. Keys are found by their slot (`CLUSTER GETKEYSINSLOT`), so nothing of the queue
//!    is left behind however many kinds of keys a shard has.
//! 4. The tombstone, last. A delete cut short leaves the tombstone: the queue stays gone
//!    until a delete finishes it (`QueueBuilder::to_finish_a_delete`, `slotq delete`).

use redis::Value;

use crate::error::{Error, Result};
use crate::queue::Queue;
use crate::slot::{Slot, key_slot};

/// What [`Queue::delete`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteReport {
    /// Keys deleted, registry and group keys included.
    pub keys: usize,
    /// Messages that were ready in the shards (at-least-once: leased, delayed and dead ones
    /// not included).
    pub messages: u64,
    /// Shards whose keys were deleted.
    pub shards: usize,
}

impl Queue {
    /// Deletes the queue: its registry, consumer groups, and every key of every shard.
    /// Producers and consumers still using it fail with [`Error::QueueNotFound`] once they
    /// notice (within a registry poll of their next call).
    pub async fn delete(&self) -> Result<DeleteReport> {
        let stats = self.stats().await?;
        let messages = stats.iter().map(|s| s.depth).sum();
        let set = self.reload().await?;
        let prefix = self.prefix().to_string();
        let name = self.name().to_string();
        // The registry and the groups share the queue's own slot.
        let meta = self.meta_key().to_string();
        let meta_slot = crate::slot::key_slot(&meta);
        let tombstone = redis::cmd("EVAL")
            .arg(
                "if redis.call('EXISTS', KEYS[1]) == 1 then \
                   redis.call('HDEL', KEYS[1], 'version'); \
                   redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]); return 1 end; return 0",
            )
            .arg(1)
            .arg(&meta)
            .arg(crate::queue::DELETING)
            .arg(crate::lease::now_ms())
            .clone();
        let marked: Value = self.cluster().query(meta_slot, &tombstone).await?;
        if marked != Value::Int(1) {
            return Err(Error::QueueNotFound(name));
        }
        self.inner_deleted();
        let mut keys = self
            .delete_in_slot_but(
                meta_slot,
                &format!("{prefix}:{{{name}}}:"),
                std::slice::from_ref(&meta),
            )
            .await?;
        tokio::time::sleep(self.registry_poll() * 2).await;
        for s in &set.shards {
            // Fenced first: a writer that missed the delete is refused from here on.
            let fenced = crate::delete_fence::set(self.cluster(), &prefix, s).await?;
            keys += self
                .delete_in_slot_but(s.slot, &format!("{prefix}:{{{}}}:", s.tag), &fenced)
                .await?;
        }
        keys += self.delete_in_slot(meta_slot, &meta).await?;
        Ok(DeleteReport {
            keys,
            messages,
            shards: set.shards.len(),
        })
    }

    /// Deletes the keys of `slot` that start with `start`; how many.
    pub(crate) async fn delete_in_slot(&self, slot: Slot, start: &str) -> Result<usize> {
        self.delete_in_slot_but(slot, start, &[]).await
    }

    /// The keys of `slot` on its master (`CLUSTER GETKEYSINSLOT`): a shard or a registry
    /// has a handful; other keys may share the slot, so it asks for many.
    pub(crate) async fn keys_in_slot(&self, slot: Slot) -> Result<Vec<String>> {
        let cluster = self.cluster();
        let topology = cluster.topology();
        let owner = topology
            .owner(slot)
            .cloned()
            .ok_or(Error::SlotUncovered { slot })?;
        if topology.is_standalone() {
            // No slots there (`CLUSTER` is refused): every key is looked at.
            let mut cursor = "0".to_string();
            let mut keys = Vec::new();
            loop {
                let (next, batch): (String, Vec<String>) = cluster
                    .node_query(
                        &owner,
                        redis::cmd("SCAN").arg(&cursor).arg("COUNT").arg(1000),
                    )
                    .await?;
                keys.extend(batch.into_iter().filter(|k| key_slot(k) == slot));
                if next == "0" {
                    return Ok(keys);
                }
                cursor = next;
            }
        }
        cluster
            .node_query(
                &owner,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100_000),
            )
            .await
    }

    /// Deletes the keys of `slot` that start with `start`, but those in `keep`; how many.
    async fn delete_in_slot_but(&self, slot: Slot, start: &str, keep: &[String]) -> Result<usize> {
        let cluster = self.cluster();
        let found = self.keys_in_slot(slot).await?;
        let ours: Vec<&String> = found
            .iter()
            .filter(|k| k.starts_with(start) && !keep.contains(k))
            .collect();
        if ours.is_empty() {
            return Ok(0);
        }
        let mut del = redis::cmd("DEL");
        for k in &ours {
            del.arg(k.as_str());
        }
        match cluster.query::<Value>(slot, &del).await? {
            Value::Int(n) => Ok(n.max(0) as usize),
            other => Err(Error::Protocol(format!("DEL: unexpected reply {other:?}"))),
        }
    }
}
