//! Shard lifecycle: a queue follows its cluster as masters come and go.
//!
//! A shard is **active** (takes pushes, is popped), **draining** (takes no unkeyed
//! pushes; keyed ones still go to it for the keys it serves; popped until empty), or
//! **retiring** (takes no pushes at all: keyed sends for its keys wait; popped until
//! empty), and is then **retired**: removed from the registry, its keyed buckets handed
//! to active shards, whatever is left in it (late pushes, delayed and dead messages,
//! leases) moved to an active shard, and its keys deleted.
//!
//! [`Queue::rebalance`] runs one step: it plans from the registry and the slot map
//! ([`plan::plan`]: exactly `shards_per_master` active shards on every master that owns
//! slots), writes the changes as one registry version, then retires what it can. Keyed
//! order: a key's bucket moves only off a retiring shard once that shard is empty, and
//! keyed sends for it wait meanwhile, so a key's messages never wait on two shards at once
//! (see `docs/architecture.md`, "Shard lifecycle").
//!
//! One rebalancer per queue at a time: a step holds a lock key in the registry's slot.

pub mod plan;
mod retire;
pub use retire::{RETIRE_DEPTH, RETIRE_WINDOW_POLLS};
pub mod simulate;

use std::time::Duration;

use crate::error::{Error, Result};
use crate::queue::Queue;

pub use plan::Plan;

/// How long one rebalance step holds the queue's rebalance lock at most.
const LOCK_TTL: Duration = Duration::from_secs(60);

/// What one [`Queue::rebalance`] step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebalanceReport {
    /// Registry version after the step.
    pub version: u64,
    /// New shards.
    pub added: Vec<String>,
    /// Draining or retiring shards made active again.
    pub reactivated: Vec<String>,
    /// Active shards that began to drain.
    pub drained: Vec<String>,
    /// Shards retired (removed, keys deleted).
    pub retired: Vec<String>,
    /// Shards still draining or retiring after the step (not empty yet).
    pub waiting: Vec<String>,
    /// Messages moved from retired shards to active ones: late pushes, leased, delayed
    /// and dead messages.
    pub moved: u64,
}

impl RebalanceReport {
    /// Whether the queue has exactly its active shards (nothing left draining).
    pub fn settled(&self) -> bool {
        self.waiting.is_empty()
    }
}

impl Queue {
    /// What [`Queue::rebalance`] would change now (nothing is written).
    pub async fn rebalance_plan(&self) -> Result<Plan> {
        let set = self.reload().await?;
        let topology = self.cluster().refresh().await?;
        Ok(plan::plan(self.name(), &topology, &set))
    }

    /// One rebalance step: brings the queue to exactly `shards_per_master` active shards
    /// on every master that owns slots (new shards, reactivated ones, surplus ones set to
    /// drain: producers stop writing to them within a registry poll), then retires the
    /// draining shards that are (nearly) empty. Takes a few registry polls when there is
    /// something to retire. Call it again (or `slotq rebalance --watch`) until
    /// [`RebalanceReport::settled`].
    pub async fn rebalance(&self) -> Result<RebalanceReport> {
        let lock = self.rebalance_lock_key();
        let token = crate::lease::LeaseId::random().to_string();
        let slot = crate::slot::key_slot(&lock);
        let got: Option<String> = self
            .cluster()
            .query(
                slot,
                redis::cmd("SET")
                    .arg(&lock)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_TTL.as_millis() as u64),
            )
            .await?;
        if got.is_none() {
            return Err(Error::Busy(format!(
                "another rebalance of {:?} is running",
                self.name()
            )));
        }
        let result = self.rebalance_locked().await;
        // Only our own lock goes (it may have expired and been taken since).
        let release = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
            .arg(1)
            .arg(&lock)
            .arg(&token)
            .clone();
        let _: Result<redis::Value> = self.cluster().query(slot, &release).await;
        result
    }

    async fn rebalance_locked(&self) -> Result<RebalanceReport> {
        let mut report = RebalanceReport::default();
        let set = self.apply_plan(&mut report).await?;
        report.version = set.version;
        retire::step(self, &mut report).await?;
        Ok(report)
    }

    /// Writes the plan as one registry version (compare-and-set, retried when another
    /// client changed the registry first).
    async fn apply_plan(
        &self,
        report: &mut RebalanceReport,
    ) -> Result<std::sync::Arc<crate::placement::ShardSet>> {
        for _ in 0..16 {
            let set = self.reload().await?;
            let topology = self.cluster().refresh().await?;
            let plan = plan::plan(self.name(), &topology, &set);
            if plan.is_empty() {
                return Ok(set);
            }
            let next = plan.apply(&set);
            if self.write_registry(set.version, &next).await? {
                if next.mode != crate::placement::DeliveryMode::AtMostOnce {
                    self.keep_shards(&plan.add).await;
                }
                let tag = |n: &u32| crate::slot::shard_tag(self.name(), *n);
                report.added = plan.add.iter().map(|s| s.tag.clone()).collect();
                report.reactivated = plan.reactivate.iter().map(tag).collect();
                report.drained = plan.drain.iter().map(tag).collect();
                return self.reload().await;
            }
        }
        Err(Error::RegistryContention(self.name().to_string()))
    }

    fn rebalance_lock_key(&self) -> String {
        format!("{}:{{{}}}:rebalance", self.prefix(), self.name())
    }
}
