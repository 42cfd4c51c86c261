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
//! One rebalancer per queue at a time: a step holds a lock key in the registry's slot
//! (`lock`), renewed while held and released when the step ends or is dropped. A step cut
//! short is finished by the next: shards taken off the registry stay on its `cleanup`
//! list until their leftovers are moved (`retire`).

mod lock;
pub mod plan;
mod retire;
pub use retire::{RETIRE_DEPTH, RETIRE_WINDOW_POLLS};
pub mod simulate;

use std::time::Duration;

use crate::error::{Error, Result};
use crate::queue::Queue;
use lock::HeldLock;

pub use plan::Plan;

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
        let held = HeldLock::take(self, Duration::ZERO).await?;
        let result = self.rebalance_locked().await;
        held.release().await;
        result
    }

    /// After a rebalance step was cancelled (its future dropped: Ctrl-C, a timeout): shards
    /// it left retiring go back to draining, so that keyed sends held for them go on at
    /// once instead of waiting out their hold; the next step picks them up again. Takes the
    /// rebalance lock (waiting up to two seconds for the cancelled step's release); returns
    /// the shards reverted. Retired shards whose leftovers were not moved stay recorded in
    /// the registry (`ShardSet::cleanup`) and are finished by the next step.
    pub async fn rebalance_cancelled(&self) -> Result<Vec<String>> {
        let held = HeldLock::take(self, Duration::from_secs(2)).await?;
        let before = self.reload().await;
        let result = retire::update(self, |s| {
            let mut next = s.clone();
            for sh in &mut next.shards {
                if sh.state == crate::placement::ShardState::Retiring {
                    sh.state = crate::placement::ShardState::Draining;
                }
            }
            next
        })
        .await;
        held.release().await;
        result?;
        Ok(before?
            .shards
            .iter()
            .filter(|s| s.state == crate::placement::ShardState::Retiring)
            .map(|s| s.tag.clone())
            .collect())
    }

    async fn rebalance_locked(&self) -> Result<RebalanceReport> {
        let mut report = RebalanceReport::default();
        retire::finish_cleanups(self, &mut report).await?;
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

    pub(crate) fn rebalance_lock_key(&self) -> String {
        format!("{}:{{{}}}:rebalance", self.prefix(), self.name())
    }
}
