//! The consumer groups a queue has: their keys live in the registry's slot
//! (`<prefix>:{<queue>}:group:<name>`), so one `CLUSTER GETKEYSINSLOT` on its master finds
//! them all.

use super::Queue;
use crate::error::{Error, Result};

impl Queue {
    /// The names of the queue's consumer groups (those with a key now: a group whose last
    /// member left is gone), sorted.
    pub async fn groups(&self) -> Result<Vec<String>> {
        let slot = crate::slot::key_slot(self.meta_key());
        let cluster = self.cluster();
        let owner = cluster
            .topology()
            .owner(slot)
            .cloned()
            .ok_or(Error::SlotUncovered { slot })?;
        let keys: Vec<String> = cluster
            .node_query(
                &owner,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(10_000),
            )
            .await?;
        let start = format!("{}:{{{}}}:group:", self.prefix(), self.name());
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&start))
            .map(str::to_string)
            .collect();
        names.sort();
        Ok(names)
    }
}
