//! How an ordered member gives back what it took of a shard without breaking the shard's
//! order.
//!
//! Invariant: a give-back of a shard covers everything the member holds of it and has not
//! handed out (the buffer, the inbox, and the round in flight, which is awaited first), in
//! one call that releases the newest lease first, and the member takes nothing more of the
//! shard until that call has ended. Releases put messages back at the head of the shard:
//! two give-backs of one shard in separate calls could land oldest first and leave a
//! newer message ahead of an older one (the group nemesis found exactly that).
//!
//! What happens to the messages depends on why they go back:
//! - the shard was released to another member, or their leases are nearly over: back to
//!   the head (at-least-once: their leases released, no delivery counted; at-most-once:
//!   pushed back, nobody else has taken the shard yet);
//! - the member lost the grant they were taken under (fenced, its membership lapsed, the
//!   shard granted anew): at-least-once, released the same way (the new holder's claim may
//!   have put them back already: then the release finds nothing); at-most-once, they left
//!   Redis when popped and the new holder may have handed out newer ones of the same keys
//!   since: dropped and counted (`slotq_fenced_dropped_total`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::giveback::return_messages;
use super::{Consumer, Message};

impl Consumer {
    /// Ordered members: absorbs the round in flight (if it asked any shard), so that a
    /// give-back that follows covers what it brings. Errors come back with the next round.
    pub(super) async fn settle_round_in_flight(&mut self) {
        if self.round.is_some() {
            let _ = self.sweep().await;
        }
    }

    /// Gives back everything held and not handed out of `shards` (older first: the buffer,
    /// the inbox), then `newer` (a round's messages of those shards), one call per shard.
    /// Call [`Consumer::settle_round_in_flight`] before deciding what to give back, unless
    /// `newer` is that round's.
    pub(super) fn give_back_ordered(&mut self, shards: &HashSet<Arc<str>>, newer: Vec<Message>) {
        if shards.is_empty() {
            return;
        }
        while let Ok(batch) = self.inbox_rx.try_recv() {
            self.buffer.extend(batch);
        }
        let (give, keep): (Vec<Message>, Vec<Message>) = self
            .buffer
            .drain(..)
            .partition(|m| shards.contains(&m.shard));
        self.buffer.extend(keep);
        let mut by_shard: HashMap<Arc<str>, Vec<Message>> = HashMap::new();
        for m in give.into_iter().chain(newer) {
            by_shard.entry(m.shard.clone()).or_default().push(m);
        }
        let Some(g) = self.group.as_mut() else {
            return;
        };
        for (tag, msgs) in by_shard {
            // Still this member's to give back in order: released to another member (it
            // waits for this give-back), or held under the same grant (leases nearly over).
            let own = g.released().contains(&*tag)
                || msgs.iter().all(|m| g.holds(m))
                || msgs.iter().all(|m| m.lease.is_some());
            if !own {
                // At-most-once messages of a grant this member lost.
                metrics::counter!(crate::telemetry::FENCED_DROPPED).increment(msgs.len() as u64);
                tracing::warn!(
                    count = msgs.len(),
                    shard = %tag,
                    "ordered member lost a shard while holding popped messages (at-most-once): dropped"
                );
                continue;
            }
            let (cluster, prefix) = (
                self.queue.cluster().clone(),
                self.queue.prefix().to_string(),
            );
            let task = tokio::spawn(async move { return_messages(&cluster, &prefix, msgs).await });
            g.returning(tag.to_string(), task);
        }
    }
}
