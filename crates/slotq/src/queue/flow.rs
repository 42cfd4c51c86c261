//! Messages in and out of a queue, counted by every client and added up on the server:
//! what a dashboard turns into rates.
//!
//! Producers count the messages they stored and consumers the messages they took, in
//! memory (one relaxed add per batch); a task per queue handle adds what was counted to the
//! queue's flow hash once a second (`HINCRBY slotq:{orders}:flow in N`, `... out M`, one
//! pipeline, in the registry's slot). Nothing is written while nothing moves, so an idle
//! client costs nothing, and a busy one one write a second whatever its rate.
//!
//! Invariants:
//! - The totals only grow: a reader takes rates from differences between two reads.
//! - What a failed write counted is added back and sent with the next one; what a process
//!   counted in its last second before it exited is lost unless it called
//!   [`Queue::flush_flow`] (the CLI does at the end of `push` and `pop`).
//! - The flusher ends with the last handle of its queue (it holds the counts, not the
//!   queue) and stops writing once the queue was found deleted; the write itself is
//!   refused by the server while the registry has no version (deleted, or being deleted),
//!   so a client that has not noticed a delete cannot bring the queue's flow key back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::Value;

use super::Queue;
use crate::cluster::{Cluster, RequestOpts};
use crate::error::{Error, Result};
use crate::slot::{Slot, key_slot};

/// How often counted messages are added to the server's totals.
pub const FLOW_FLUSH: Duration = Duration::from_secs(1);

/// The totals of a queue's flow hash, from [`Queue::flow`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowTotals {
    /// Messages stored by producers since the queue was created.
    pub pushed: u64,
    /// Messages taken by consumers since the queue was created (what a closing consumer
    /// gave back included).
    pub popped: u64,
}

/// What this process counted and has not written yet.
pub(crate) struct FlowCounts {
    key: String,
    /// The registry: written to only while it has a version (not deleted, not being
    /// deleted), so that a client still counting cannot bring a deleted queue's key back.
    meta: String,
    slot: Slot,
    pushed: AtomicU64,
    popped: AtomicU64,
    flusher: AtomicBool,
    deleted: AtomicBool,
}

impl FlowCounts {
    pub(crate) fn new(prefix: &str, queue: &str) -> FlowCounts {
        let key = flow_key(prefix, queue);
        FlowCounts {
            slot: key_slot(&key),
            key,
            meta: crate::placement::meta_key(prefix, queue),
            pushed: AtomicU64::new(0),
            popped: AtomicU64::new(0),
            flusher: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
        }
    }

    /// Writes what was counted; on failure it is counted again for the next write.
    async fn flush(&self, cluster: &Cluster) -> Result<()> {
        if self.deleted.load(Ordering::Acquire) {
            return Ok(());
        }
        let pushed = self.pushed.swap(0, Ordering::AcqRel);
        let popped = self.popped.swap(0, Ordering::AcqRel);
        if pushed == 0 && popped == 0 {
            return Ok(());
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(INCR_BOTH)
            .arg(2)
            .arg(&self.key)
            .arg(&self.meta)
            .arg(pushed)
            .arg(popped);
        let opts = RequestOpts {
            retry_budget: Duration::from_millis(500),
            ..cluster.default_opts()
        };
        match cluster.query_with::<Value>(self.slot, &cmd, opts).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // Not known to be written: counted again (a reply lost after the write
                // counts twice, which a rate shows as one brief bump).
                self.pushed.fetch_add(pushed, Ordering::AcqRel);
                self.popped.fetch_add(popped, Ordering::AcqRel);
                Err(e)
            }
        }
    }
}

/// Both increments in one call (a reader never sees one without the other), only while
/// the registry (KEYS[2], same slot) has a version.
const INCR_BOTH: &str = "if redis.call('HEXISTS', KEYS[2], 'version') == 0 then return 0 end; \
                         redis.call('HINCRBY', KEYS[1], 'in', ARGV[1]); \
                         redis.call('HINCRBY', KEYS[1], 'out', ARGV[2]); return 1";

/// The flow hash of a queue: `<prefix>:{<queue>}:flow`, in the registry's slot.
pub fn flow_key(prefix: &str, queue: &str) -> String {
    format!("{prefix}:{{{queue}}}:flow")
}

impl Queue {
    /// Counts messages a producer stored.
    pub(crate) fn count_pushed(&self, n: usize) {
        self.inner
            .flow
            .pushed
            .fetch_add(n as u64, Ordering::Relaxed);
        self.start_flusher();
    }

    /// Counts messages a consumer handed out.
    pub(crate) fn count_popped(&self, n: usize) {
        self.inner
            .flow
            .popped
            .fetch_add(n as u64, Ordering::Relaxed);
        self.start_flusher();
    }

    fn start_flusher(&self) {
        let flow = &self.inner.flow;
        if flow.flusher.load(Ordering::Relaxed) || flow.flusher.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            flow.flusher.store(false, Ordering::Release);
            return;
        };
        let counts = flow.clone();
        let cluster = self.inner.cluster.clone();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(FLOW_FLUSH).await;
                // The queue's handles hold the other references: when they are all gone,
                // one last write and the task ends.
                let last = Arc::strong_count(&counts) == 1;
                if let Err(e) = counts.flush(&cluster).await {
                    tracing::debug!(key = %counts.key, cause = %e, "writing the flow counts failed");
                }
                if last {
                    break;
                }
            }
        });
    }

    /// Writes what this process counted and has not written yet (otherwise written once a
    /// second): for short-lived processes before they exit.
    pub async fn flush_flow(&self) -> Result<()> {
        self.inner.flow.flush(&self.inner.cluster).await
    }

    /// Stops flow writes once the queue is deleted.
    pub(crate) fn flow_deleted(&self) {
        self.inner.flow.deleted.store(true, Ordering::Release);
    }

    /// The queue's totals of messages in and out, as every client wrote them (up to a
    /// second behind).
    pub async fn flow(&self) -> Result<FlowTotals> {
        let flow = &self.inner.flow;
        let got: Vec<Option<u64>> = self
            .inner
            .cluster
            .query(
                flow.slot,
                redis::cmd("HMGET").arg(&flow.key).arg("in").arg("out"),
            )
            .await?;
        match got.as_slice() {
            [i, o] => Ok(FlowTotals {
                pushed: i.unwrap_or(0),
                popped: o.unwrap_or(0),
            }),
            other => Err(Error::Protocol(format!(
                "HMGET flow: unexpected reply {other:?}"
            ))),
        }
    }
}
