//! Settings of a producer, checked once when it is built.

use std::sync::atomic::Ordering;

use tokio::sync::Semaphore;

use std::time::Duration;

use super::Producer;
use crate::error::{Error, Result};
use crate::queue::Queue;

/// Most messages in one push.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 1000;
/// Most payload bytes in one push.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1 << 20;
/// Most messages buffered or in flight per producer before sends wait.
pub const DEFAULT_MAX_BUFFERED: usize = 100_000;
/// Largest payload: Redis's own limit for one string (`proto-max-bulk-len`, 512 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 512 * 1024 * 1024;
/// Bytes a frame adds around its envelopes, at most (magic, count, msgpack array header).
const FRAME_HEADER: usize = 16;
/// Bytes an at-least-once message takes beyond its payload in a one-message frame
/// (envelope header, msgpack string header, frame header).
const FRAME_OVERHEAD: usize = crate::lease::ENVELOPE_HEADER + 5 + FRAME_HEADER;
/// Most payloads one bounded push may carry (Lua's `unpack` stack limit).
const MAX_SCRIPT_BATCH: usize = 7_000;

/// What to do with empty payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmptyPayloads {
    /// Refuse them with [`Error::InvalidPayload`] (default: an empty message is usually a bug).
    #[default]
    Reject,
    /// Queue them like any other payload.
    Allow,
}

/// Settings of a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    pub(super) queue: Queue,
    pub(super) max_batch_messages: usize,
    pub(super) max_batch_bytes: usize,
    pub(super) linger: Duration,
    pub(super) max_buffered: usize,
    pub(super) max_depth: Option<u64>,
    pub(super) max_payload: usize,
    pub(super) empty: EmptyPayloads,
    pub(super) durability: Option<(u32, Duration)>,
    /// `no_durability()`: no `WAIT` by default on at-least-once queues either.
    pub(super) durability_off: bool,
    pub(super) resend_ambiguous: Option<bool>,
    /// How long a dedup id keeps a second send of it out (see `dedup.rs`).
    pub(super) dedup_window: Duration,
    /// Every `send` / `send_keyed` gets a dedup id of its own and is resent on ambiguous
    /// failures (see `dedup.rs`).
    pub(super) idempotent: bool,
}

/// How long a push waits for a replica by default (at-least-once queues whose master has
/// a replica): a replica on a healthy network confirms within a millisecond.
pub(super) const DEFAULT_DURABILITY_TIMEOUT: Duration = Duration::from_millis(500);

impl ProducerBuilder {
    pub(crate) fn new(queue: Queue) -> Self {
        ProducerBuilder {
            queue,
            max_batch_messages: DEFAULT_MAX_BATCH_MESSAGES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            linger: Duration::ZERO,
            max_buffered: DEFAULT_MAX_BUFFERED,
            max_depth: None,
            max_payload: DEFAULT_MAX_PAYLOAD,
            empty: EmptyPayloads::Reject,
            durability: None,
            durability_off: false,
            resend_ambiguous: None,
            dedup_window: super::dedup::DEFAULT_DEDUP_WINDOW,
            idempotent: false,
        }
    }

    /// How long a dedup id keeps a second send with the same id out of the queue (default
    /// 10 minutes; see [`Producer::send_dedup`]). The window is the sender's: producers of
    /// one queue that share ids should agree on it.
    pub fn dedup_window(mut self, d: Duration) -> Self {
        self.dedup_window = d;
        self
    }

    /// An idempotent producer: every [`Producer::send`] and [`Producer::send_keyed`] gets
    /// a dedup id of its own, and a send whose outcome is unknown (a timeout, a broken
    /// connection, a failover, too few replicas: [`Error::may_have_run`]) is sent again to
    /// the same shard with the same id until the retry budget is spent. The message is then
    /// enqueued exactly once: a resend that finds the id answers that the first send
    /// stored it. Each message is one push (no batching), so this costs throughput;
    /// `send_batch` and `send_keyed_batch` send their messages that way, concurrently.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Whether an unkeyed batch whose push may or may not have been stored (the node timed
    /// out, the connection broke, or too few replicas confirmed) is sent again to another
    /// shard. That keeps sends succeeding through a node failure at the price of possible
    /// duplicates. Default: on for at-least-once queues (they allow duplicates anyway), off
    /// for at-most-once queues (the error is returned instead).
    pub fn resend_ambiguous(mut self, yes: bool) -> Self {
        self.resend_ambiguous = Some(yes);
        self
    }

    /// After each push, `WAIT` until `replicas` replicas acknowledged it (at most
    /// `timeout`); sends resolve only then, or fail with [`Error::NotReplicated`] (the write
    /// is on the master but may not survive a failover).
    ///
    /// Default: on at-least-once queues, one replica and 500 ms for every push to a master
    /// that has a replica (masters without any acknowledge alone; a master whose replica
    /// is down fails its sends with [`Error::NotReplicated`] until one is back); off on
    /// at-most-once queues. Without it, a master cut off from the rest of the cluster keeps
    /// acknowledging sends until it notices (the node timeout), and a replica promoted
    /// meanwhile never had them: see `docs/operations.md`, "What can be lost".
    pub fn durability(mut self, replicas: u32, timeout: Duration) -> Self {
        self.durability = Some((replicas, timeout));
        self.durability_off = false;
        self
    }

    /// Acknowledges a send as soon as its master has it, without waiting for a replica,
    /// also on at-least-once queues: faster, and what a master acknowledged within a node
    /// timeout before a failover can be lost.
    pub fn no_durability(mut self) -> Self {
        self.durability = None;
        self.durability_off = true;
        self
    }

    /// Most messages per push.
    pub fn max_batch_messages(mut self, n: usize) -> Self {
        self.max_batch_messages = n;
        self
    }

    /// Most payload bytes per push.
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.max_batch_bytes = n;
        self
    }

    /// Wait this long before each push so that more messages join it (default none).
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// Most messages buffered or in flight before sends wait.
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n;
        self
    }

    /// Refuse pushes that would grow a shard past `n` messages ([`Error::QueueFull`]).
    pub fn max_depth(mut self, n: u64) -> Self {
        self.max_depth = Some(n);
        self
    }

    /// Largest accepted payload in bytes (at most 512 MiB). The producer lowers it to what
    /// the server takes in one string (`proto-max-bulk-len`, read when the queue was
    /// opened), less the envelope and frame on at-least-once queues, so that an oversize
    /// payload is refused with [`Error::InvalidPayload`] before anything is sent.
    pub fn max_payload(mut self, n: usize) -> Self {
        self.max_payload = n;
        self
    }

    /// What to do with empty payloads.
    pub fn empty_payloads(mut self, p: EmptyPayloads) -> Self {
        self.empty = p;
        self
    }

    /// Validates the settings and makes the producer.
    pub fn build(mut self) -> Result<Producer> {
        let cfg = |m: String| Err(Error::Config(m));
        if self.max_batch_messages == 0 || self.max_batch_bytes == 0 {
            return cfg("batch limits must be at least 1".into());
        }
        if self.max_depth.is_some() && self.max_batch_messages > MAX_SCRIPT_BATCH {
            return cfg(format!(
                "with max_depth, max_batch_messages must be at most {MAX_SCRIPT_BATCH}"
            ));
        }
        if self.max_buffered < self.max_batch_messages {
            return cfg("max_buffered must be at least max_batch_messages".into());
        }
        if self.max_payload == 0 || self.max_payload > DEFAULT_MAX_PAYLOAD {
            return cfg(format!("max_payload must be in 1..={DEFAULT_MAX_PAYLOAD}"));
        }
        if self.max_buffered > Semaphore::MAX_PERMITS {
            return cfg("max_buffered is too large".into());
        }
        if self.dedup_window < Duration::from_millis(1) {
            return cfg("dedup_window must be at least 1 ms".into());
        }
        if let Some((n, t)) = self.durability
            && (n == 0 || t.is_zero())
        {
            return cfg("durability needs at least 1 replica and a timeout above zero".into());
        }
        let reliable = self.queue.mode() != crate::placement::DeliveryMode::AtMostOnce;
        if reliable && self.max_depth.is_some() {
            return cfg("max_depth is not supported for at-least-once queues".into());
        }
        // One string of a command must fit the server's proto-max-bulk-len: a payload, or on
        // at-least-once queues a whole frame (envelopes and their headers).
        let limit = self
            .queue
            .inner
            .bulk_limit
            .load(Ordering::Relaxed)
            .min(usize::MAX as u64) as usize;
        let overhead = if reliable { FRAME_OVERHEAD } else { 0 };
        self.max_payload = self.max_payload.min(limit.saturating_sub(overhead).max(1));
        if reliable {
            self.max_batch_bytes = self
                .max_batch_bytes
                .min(limit.saturating_sub(FRAME_HEADER).max(1));
        }
        if reliable && self.max_batch_messages > crate::lease::MAX_FRAME {
            return cfg(format!(
                "at-least-once queues take at most {} messages per batch",
                crate::lease::MAX_FRAME
            ));
        }
        Ok(Producer::new(self, reliable))
    }
}

/// Checks a payload's size against the limits.
pub fn check_payload(len: usize, max: usize, empty: EmptyPayloads) -> Result<()> {
    if len == 0 && empty == EmptyPayloads::Reject {
        return Err(Error::InvalidPayload(
            "empty payload (allow with EmptyPayloads::Allow)".into(),
        ));
    }
    if len > max {
        return Err(Error::InvalidPayload(format!(
            "payload of {len} bytes exceeds the maximum of {max} bytes"
        )));
    }
    Ok(())
}

impl Queue {
    /// A producer builder for this queue.
    pub fn producer(&self) -> ProducerBuilder {
        ProducerBuilder::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_limits() {
        assert!(matches!(
            check_payload(0, 10, EmptyPayloads::Reject),
            Err(Error::InvalidPayload(_))
        ));
        assert!(check_payload(0, 10, EmptyPayloads::Allow).is_ok());
        assert!(check_payload(10, 10, EmptyPayloads::Reject).is_ok());
        let err = check_payload(
            DEFAULT_MAX_PAYLOAD + 1,
            DEFAULT_MAX_PAYLOAD,
            EmptyPayloads::Reject,
        )
        .unwrap_err();
        assert!(err.to_string().contains("exceeds the maximum"), "{err}");
    }
}
