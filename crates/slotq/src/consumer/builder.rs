//! Settings of a consumer, validated when it is built.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::grouped::Grouped;
use super::{
    Consumer, DEFAULT_BLOCK_TIMEOUT, DEFAULT_LEASE_BATCH, DEFAULT_POP_BATCH, MAX_LEASE_BATCH,
    MAX_WEIGHT, round,
};
use crate::error::{Error, Result};
use crate::group::{DEFAULT_GROUP, DEFAULT_MEMBER_TIMEOUT, GroupConfig};
use crate::lease;
use crate::placement::DeliveryMode;
use crate::queue::Queue;

/// Settings of a [`Consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    queue: Queue,
    /// `None`: the default of the queue's mode.
    pop_batch: Option<usize>,
    block_timeout: Duration,
    lease: Duration,
    group: Option<String>,
    ordered: bool,
    member_timeout: Duration,
    prefetch: bool,
    unconfirmed_pops: bool,
}

impl ConsumerBuilder {
    pub(crate) fn new(queue: Queue) -> Self {
        ConsumerBuilder {
            queue,
            pop_batch: None,
            block_timeout: DEFAULT_BLOCK_TIMEOUT,
            lease: lease::DEFAULT_LEASE,
            group: Some(DEFAULT_GROUP.to_string()),
            ordered: false,
            member_timeout: DEFAULT_MEMBER_TIMEOUT,
            prefetch: true,
            unconfirmed_pops: false,
        }
    }

    /// Joins the consumer group `name` (every consumer joins the group
    /// [`DEFAULT_GROUP`] unless told otherwise): the group's members share the shards,
    /// each sweeping and blocking only on its own, so an idle group costs about one blocked
    /// pop per shard however many members it has.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.group = Some(name.into());
        self
    }

    /// Reads every shard itself, in no group (for one-off reads and tools: it neither
    /// takes shards from a running group nor is counted in it).
    pub fn without_group(mut self) -> Self {
        self.group = None;
        self
    }

    /// Ordered mode: exclusive ownership, no stealing, and a shard changes owner only once
    /// the old owner's work on it is settled (or its leases expired), so per-key FIFO holds
    /// in processing, not just in pops. See `docs/architecture.md` for the exact guarantee.
    pub fn ordered(mut self) -> Self {
        self.ordered = true;
        self
    }

    /// How long a member that stopped renewing its membership stays one (default 3 s;
    /// it renews every third of that).
    pub fn member_timeout(mut self, d: Duration) -> Self {
        self.member_timeout = d;
        self
    }

    /// Whether the consumer starts its next round as soon as a call hands out the last
    /// message it held, while messages are flowing (default: on). The round's pops (or
    /// leases) then run while the caller works on what it got, and the next call finds
    /// them done or under way: one round trip less between batches. Off, a consumer pops
    /// only inside a call. On at-least-once queues a consumer that got messages from its
    /// blocking wait keeps that wait going instead (what arrives is leased as it
    /// arrives, one lease per shard at most). Either way a consumer closed or dropped
    /// gives back what it holds; on at-least-once queues a lease taken ahead is counted
    /// from when it was taken, and what nears its deadline unhanded is released (see
    /// `docs/architecture.md`, *Consumer*).
    pub fn prefetch(mut self, on: bool) -> Self {
        self.prefetch = on;
        self
    }

    /// At-most-once queues: hand out what a pop brings without waiting for a replica to
    /// confirm the pop. By default a pop from a master that has a live replica is
    /// confirmed first (`WAIT 1`, up to 500 ms), and the messages of a pop no replica
    /// confirmed go back to the head of their list on that master: a failover then never
    /// hands a message out twice (see `docs/operations.md`, *What can be lost*). Unconfirmed
    /// pops are faster, and a master lost before its replica had a pop delivers that pop's
    /// messages again from the promoted replica. No effect on at-least-once queues, whose
    /// leases already deliver again what a failover loses.
    pub fn unconfirmed_pops(mut self) -> Self {
        self.unconfirmed_pops = true;
        self
    }

    /// At-least-once queues: how long a popped message may stay unsettled before it is
    /// delivered again (the visibility timeout).
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }

    /// Messages asked from each shard per sweep: [`DEFAULT_POP_BATCH`](super::DEFAULT_POP_BATCH)
    /// unless set on at-most-once queues, [`DEFAULT_LEASE_BATCH`](super::DEFAULT_LEASE_BATCH)
    /// (also the most) on at-least-once queues.
    pub fn pop_batch(mut self, n: usize) -> Self {
        self.pop_batch = Some(n);
        self
    }

    /// Server-side timeout of blocking pops (the client waits [`BLOCK_GRACE`](super::BLOCK_GRACE) longer).
    pub fn block_timeout(mut self, d: Duration) -> Self {
        self.block_timeout = d;
        self
    }

    /// Validates the settings and makes the consumer.
    pub fn build(self) -> Result<Consumer> {
        if self.pop_batch == Some(0) {
            return Err(Error::Config("pop_batch must be at least 1".into()));
        }
        if self.block_timeout < Duration::from_millis(10) {
            return Err(Error::Config("block_timeout must be at least 10 ms".into()));
        }
        if self.lease < Duration::from_millis(10) {
            return Err(Error::Config("lease must be at least 10 ms".into()));
        }
        if let Some(g) = &self.group {
            crate::group::validate_group_name(g)?;
        }
        if self.member_timeout < Duration::from_millis(300) {
            return Err(Error::Config(
                "member_timeout must be at least 300 ms".into(),
            ));
        }
        if self.ordered && self.queue.shards().priorities {
            return Err(Error::Priorities(format!(
                "queue {:?} has priorities, which reorder a key's messages by design: ordered \
                 groups need a queue without them",
                self.queue.name()
            )));
        }
        if self.ordered && self.group.is_none() {
            return Err(Error::Config("ordered mode needs a group".into()));
        }
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let max_attempts = match self.queue.mode() {
            DeliveryMode::AtMostOnce => None,
            DeliveryMode::AtLeastOnce { max_attempts } => Some(max_attempts),
        };
        let pop_batch = match max_attempts {
            None => self.pop_batch.unwrap_or(DEFAULT_POP_BATCH),
            // A lease is one script reply; keep it well inside Lua's limits.
            Some(_) => self
                .pop_batch
                .unwrap_or(DEFAULT_LEASE_BATCH)
                .min(MAX_LEASE_BATCH / MAX_WEIGHT),
        };
        Ok(Consumer {
            pop_batch,
            ctx: round::Ctx {
                cluster: self.queue.cluster().clone(),
                scripts: self.queue.lease_scripts(),
                max_attempts,
                lease: self.lease,
                fence_group: if self.ordered {
                    self.group.as_deref().map(std::sync::Arc::from)
                } else {
                    None
                },
                releases: Default::default(),
                confirm: (max_attempts.is_none() && !self.unconfirmed_pops)
                    .then_some(super::confirm::DEFAULT_CONFIRM),
            },
            round: None,
            prefetch: self.prefetch,
            flowing: super::Flow::Stopped,
            queue: self.queue,
            block_timeout: self.block_timeout,
            keys: HashMap::new(),
            buffer: VecDeque::new(),
            inbox_tx,
            inbox_rx,
            attention: watch::Sender::new(super::waiter::Attention::Busy),
            waits: 0,
            waiters: HashMap::new(),
            group: self.group.map(|name| {
                Grouped::new(GroupConfig {
                    name,
                    ordered: self.ordered,
                    timeout: self.member_timeout,
                })
            }),
            promoter: None,
            last_report: None,
            found_nothing: true,
            upto: crate::priority::Priority::Low,
            sweep_due: true,
            weights: HashMap::new(),
            payload_sizes: HashMap::new(),
            rotate: 0,
        })
    }
}

impl Queue {
    /// A consumer builder for this queue.
    pub fn consumer(&self) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone())
    }
}
