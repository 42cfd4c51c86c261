//! A message handed out by a consumer, and settling it.

use std::sync::Arc;

use bytes::Bytes;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::lease::{self, DeadReason, LeaseId, LeaseRef, MessageId, Settle, Settled};
use crate::meta::Meta;

/// One message popped from a queue.
///
/// From an at-least-once queue a message also carries its id, its delivery number and a
/// lease: settle it with [`Message::ack`] or [`Message::nack`] (or in bulk with
/// [`Consumer::ack_all`](super::Consumer::ack_all)) before the lease expires, or it is
/// delivered again.
#[derive(Debug, Clone)]
pub struct Message {
    /// The payload as sent: a slice of the buffer it was read into (no copy). Keeping a
    /// few messages of a large batch keeps that buffer; `payload.to_vec()` (or
    /// `Bytes::copy_from_slice`) detaches one.
    pub payload: Bytes,
    /// The shard it came from.
    pub shard: Arc<str>,
    /// At-least-once queues: the message id, the same on every delivery.
    pub id: Option<MessageId>,
    /// Which delivery this is (1 for the first; always 1 for at-most-once queues).
    pub attempt: u32,
    /// At-least-once queues: when it was first enqueued (ms since the Unix epoch).
    pub enqueued_ms: Option<u64>,
    pub(super) lease: Option<LeaseRef>,
    /// Ordered groups: the epoch of the grant of its shard it was taken under. Handed out
    /// only while the member still holds that very grant (see `Consumer::sync_group`).
    pub(super) epoch: Option<u64>,
    /// Headers and deadline, when it was sent with them.
    pub(super) meta: Option<Arc<Meta>>,
    /// At-most-once messages with an extension (or escaped): the element as popped, which
    /// is what goes back to the list when the message is given back.
    pub(super) raw: Option<Bytes>,
    /// Queues with priorities: the level it was taken from (it goes back there).
    pub(super) level: crate::priority::Priority,
}

/// The name the at-least-once documentation uses for a leased message.
pub type Delivery = Message;

impl Message {
    /// An at-most-once message as popped: a payload, or an extension and a payload (see
    /// `meta.rs`; one byte looked at for messages without).
    pub(super) fn plain(payload: Bytes, shard: Arc<str>) -> Message {
        let (payload, meta, raw) = match crate::meta::split_plain(&payload) {
            Some((meta, at)) => (payload.slice(at..), Some(meta), Some(payload)),
            None => (payload, None, None),
        };
        Message {
            payload,
            shard,
            id: None,
            attempt: 1,
            enqueued_ms: None,
            lease: None,
            epoch: None,
            meta: meta.filter(|m| *m != Meta::default()).map(Arc::new),
            raw,
            level: crate::priority::Priority::Normal,
        }
    }

    /// An at-most-once message taken from a level's list.
    pub(super) fn plain_at(
        payload: Bytes,
        shard: Arc<str>,
        level: crate::priority::Priority,
    ) -> Message {
        let mut m = Message::plain(payload, shard);
        m.level = level;
        m
    }

    /// What goes back to the list when an at-most-once message is given back: the element
    /// as it was popped (extension and escape included).
    pub(super) fn element(&self) -> Bytes {
        self.raw.clone().unwrap_or_else(|| self.payload.clone())
    }

    /// The priority level it was taken from (normal on queues without priorities).
    pub fn priority(&self) -> crate::priority::Priority {
        self.level
    }

    /// Its headers, in the order sent (empty when it was sent without).
    pub fn headers(&self) -> &[(String, String)] {
        self.meta.as_deref().map_or(&[], |m| &m.headers)
    }

    /// The value of header `key` (the first, if sent twice).
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers()
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// When it expires (ms since the Unix epoch), if it was sent with a time to live. A
    /// consumer never hands out a message past this (see [`SendOptions::ttl`](crate::SendOptions::ttl)).
    pub fn expires_ms(&self) -> Option<u64> {
        self.meta.as_deref().and_then(|m| m.expires_ms)
    }

    pub(super) fn expired(&self) -> bool {
        self.meta.as_deref().is_some_and(Meta::expired)
    }

    pub(super) fn lease(&self) -> Result<&LeaseRef> {
        self.lease.as_ref().ok_or_else(|| {
            Error::NotReliable(
                "this message came from an at-most-once queue: there is nothing to settle".into(),
            )
        })
    }

    /// Acknowledges the message: it is done and will not be delivered again.
    pub async fn ack(&self) -> Result<Settled> {
        lease::settle_one(self.lease()?, Settle::Ack).await
    }

    /// Negatively acknowledges the message: it is delivered again (after `delay`, if
    /// given), or goes to the dead letters once it used up its attempts.
    pub async fn nack(&self, delay: Option<Duration>) -> Result<Settled> {
        self.nack_because(delay, "").await
    }

    /// [`Message::nack`] saying why: if this was its last attempt, the dead letter records
    /// reason [`DeadReason::Failed`] with `why` (cut to
    /// [`MAX_DEAD_DETAIL`](crate::lease::MAX_DEAD_DETAIL) bytes) for `slotq dead Q list`.
    pub async fn nack_because(&self, delay: Option<Duration>, why: &str) -> Result<Settled> {
        let how = Settle::Nack(delay.unwrap_or_default(), why.into());
        lease::settle_one(self.lease()?, how).await
    }

    /// Moves the message to the dead letters now, whatever attempts it has left (a
    /// worker that knows it can never succeed): reason [`DeadReason::Rejected`].
    pub async fn dead_letter(&self) -> Result<Settled> {
        self.dead_letter_as(DeadReason::Rejected, "").await
    }

    /// Moves the message to the dead letters now, recording `reason` and `why` (a worker
    /// that retried it in place until its attempts were used up records
    /// [`DeadReason::Failed`] and the last failure).
    pub async fn dead_letter_as(&self, reason: DeadReason, why: &str) -> Result<Settled> {
        lease::settle_one(self.lease()?, Settle::Dead(reason, why.into())).await
    }

    /// Extends the lease of this message (and of the messages popped with it) to `by` from
    /// now. Returns the new deadline, or `None` when the lease had already expired.
    pub async fn extend(&self, by: Duration) -> Result<Option<std::time::SystemTime>> {
        lease::extend(self.lease()?, by).await
    }

    /// At-least-once queues: which lease holds the message (shard, lease number). Messages
    /// popped together share a lease; settling a lease's messages is one script call.
    pub fn lease_id(&self) -> Option<(Arc<str>, LeaseId)> {
        self.lease
            .as_ref()
            .map(|l| (l.lease.keys.tag.clone(), l.lease.id))
    }

    /// The lease deadline (server clock, ms since the Unix epoch) as of the pop.
    pub fn lease_deadline_ms(&self) -> Option<i64> {
        self.lease.as_ref().map(|l| l.lease.deadline_ms)
    }
}
