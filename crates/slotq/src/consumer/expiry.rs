//! Messages past their time to live are never handed out. The check is made where a call
//! hands messages over (one look at a field that is empty for messages sent without
//! options); expired ones are taken out and settled: at-most-once messages are dropped, at
//! -least-once ones dead-lettered with reason `expired` (or acknowledged, on queues
//! created with `QueueBuilder::drop_expired`). Either way they are counted in
//! `slotq_expired_total`. Deadlines are read on the consumer's clock.

use super::{Consumer, Message};
use crate::lease::{self, DeadReason, LeaseRef, Settle};

impl Consumer {
    /// Takes the expired messages out of `out` and settles them.
    pub(super) async fn drop_expired(&mut self, out: &mut Vec<Message>) {
        if !out.iter().any(Message::expired) {
            return;
        }
        let (expired, keep): (Vec<Message>, Vec<Message>) =
            std::mem::take(out).into_iter().partition(Message::expired);
        *out = keep;
        self.settle_expired(expired).await;
    }

    /// Settles messages found expired (see the module notes).
    pub(super) async fn settle_expired(&mut self, expired: Vec<Message>) {
        let drop = self.queue.shards().drop_expired;
        let leased: Vec<&LeaseRef> = expired.iter().filter_map(|m| m.lease.as_ref()).collect();
        let action = if leased.is_empty() || drop {
            "dropped"
        } else {
            "dead-lettered"
        };
        metrics::counter!(crate::telemetry::EXPIRED, "queue" => self.queue.name().to_string(), "action" => action)
            .increment(expired.len() as u64);
        if leased.is_empty() {
            return;
        }
        let how = if drop {
            Settle::Ack
        } else {
            Settle::Dead(
                DeadReason::Expired,
                "its time to live ran out before it was delivered".into(),
            )
        };
        // A failure leaves the lease to expire: the message comes back, and is found
        // expired again.
        if let Err(e) = lease::settle_many(&leased, how).await {
            tracing::warn!(cause = %e, "could not settle expired messages");
        }
    }
}
