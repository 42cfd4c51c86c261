//! Deleting a queue: every key of it, on every node.
//!
//! The registry goes first, so that no client opens the queue any more and clients that
//! use it find it gone at their next registry look (at most every registry poll while
//! they send or receive) and fail with [`Error::QueueNotFound`] from then on. Then, after
//! two registry polls, every key of every shard: ready lists, leases, counts, delayed and
//! dead messages (a push that slipped in between is deleted with them). Keys are found by
//! their slot (`CLUSTER GETKEYSINSLOT`), so nothing of the queue is left behind however
//! many kinds of keys a shard has.

use redis::Value;

use crate::error::{Error, Result};
use crate::queue::Queue;
use crate::slot::Slot;

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
        let mut keys = self
            .delete_in_slot(meta_slot, &format!("{prefix}:{{{name}}}:"))
            .await?;
        tokio::time::sleep(self.registry_poll() * 2).await;
        for s in &set.shards {
            keys += self
                .delete_in_slot(s.slot, &format!("{prefix}:{{{}}}:", s.tag))
                .await?;
        }
        Ok(DeleteReport {
            keys,
            messages,
            shards: set.shards.len(),
        })
    }

    /// Deletes the keys of `slot` that start with `start`; how many.
    pub(crate) async fn delete_in_slot(&self, slot: Slot, start: &str) -> Result<usize> {
        let cluster = self.cluster();
        let owner = cluster
            .topology()
            .owner(slot)
            .cloned()
            .ok_or(Error::SlotUncovered { slot })?;
        // A shard has a handful of keys; other keys may share its slot, so ask for many.
        let found: Vec<String> = cluster
            .node_query(
                &owner,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100_000),
            )
            .await?;
        let ours: Vec<&String> = found.iter().filter(|k| k.starts_with(start)).collect();
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
