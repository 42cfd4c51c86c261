//! The consumer groups a queue has: their keys live in the registry's slot
//! (`<prefix>:{<queue>}:group:<name>`), so one `CLUSTER GETKEYSINSLOT` on its master finds
//! them all.

use super::Queue;
use crate::error::Result;

impl Queue {
    /// The names of the queue's consumer groups (those with a key now: a group whose last
    /// member left is gone), sorted.
    pub async fn groups(&self) -> Result<Vec<String>> {
        let slot = crate::slot::key_slot(self.meta_key());
        let keys = self.keys_in_slot(slot).await?;
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
