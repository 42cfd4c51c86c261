//! `slotq consume --exec H --ordered`: handlers run in the order of their shard.
//!
//! An ordered group hands a member whole shards, and a key's messages all live on one
//! shard, in order. The runner keeps that order in processing with any `--concurrency`: at
//! most one handler per shard at a time (shards run side by side), a shard's next message
//! starts only once the one before is settled, and a failed message is retried in place
//! (after its backoff, its lease extended meanwhile) instead of being nacked behind the
//! shard's later messages. The messages waiting for their shard's turn are counted against
//! `--concurrency` (so at most that many are held) and their leases are extended while
//! they wait.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use slotq::Message;

/// Messages waiting for their shard's handler, per shard, in the order received.
#[derive(Default)]
pub struct InOrder {
    waiting: HashMap<Arc<str>, VecDeque<Message>>,
    busy: HashSet<Arc<str>>,
}

impl InOrder {
    /// Takes received messages in; returns those to start now (one per idle shard).
    pub fn push(&mut self, msgs: Vec<Message>) -> Vec<Message> {
        let mut start = Vec::new();
        for m in msgs {
            if self.busy.contains(&m.shard) {
                self.waiting
                    .entry(m.shard.clone())
                    .or_default()
                    .push_back(m);
            } else {
                self.busy.insert(m.shard.clone());
                start.push(m);
            }
        }
        start
    }

    /// A shard's handler finished and its message is settled: its next message, if any.
    pub fn done(&mut self, shard: &Arc<str>) -> Option<Message> {
        let next = self.waiting.get_mut(shard).and_then(VecDeque::pop_front);
        if self.waiting.get(shard).is_some_and(VecDeque::is_empty) {
            self.waiting.remove(shard);
        }
        if next.is_none() {
            self.busy.remove(shard);
        }
        next
    }

    /// Messages waiting (not running).
    pub fn len(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Every waiting message, to give back (each shard's in order).
    pub fn drain(&mut self) -> Vec<Message> {
        self.busy.clear();
        self.waiting.drain().flat_map(|(_, q)| q).collect()
    }

    /// Extends the lease of every waiting message (once per lease).
    pub async fn extend(&self, by: Duration) {
        let mut seen = HashSet::new();
        let firsts: Vec<&Message> = self
            .waiting
            .values()
            .flatten()
            .filter(|m| m.lease_id().is_some_and(|id| seen.insert(id)))
            .collect();
        let extended = futures::future::join_all(firsts.iter().map(|m| m.extend(by))).await;
        for (m, r) in firsts.iter().zip(extended) {
            if !matches!(r, Ok(Some(_))) {
                eprintln!(
                    "slotq: the lease of a waiting message of shard {} could not be extended: it may be delivered again",
                    m.shard
                );
            }
        }
    }
}
