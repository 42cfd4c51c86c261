//! Getting messages into the buffer: sweeping the shards in rounds, or waiting on the
//! shards' blocking waiters when the last round left them empty.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::round::{self, Ask, Round};
use super::wait_lease::WaitLease;
use super::waiter::{Attention, Waiter};
use super::{Consumer, Flow, MAX_WEIGHT, Message};
use crate::error::Result;
use crate::lease::{LeaseId, ShardKeys};
use crate::placement::{Shard, ready_key};

/// How many times more an ordered member of an at-most-once queue asks of a shard per pop.
const FENCED_ASK_FACTOR: usize = 4;

impl Consumer {
    /// Gets at least one message into the buffer, or returns at the deadline.
    pub(super) async fn fill(&mut self, deadline: Option<Instant>) -> Result<()> {
        if self.promoter.is_none() {
            self.promoter = Some(super::promoter::Promoter::start(self.queue.clone()));
        }
        loop {
            self.queue.check_live().await?;
            if self.queue.is_paused() {
                // The caller's loop sets everything aside (see `paused.rs`).
                return Ok(());
            }
            while let Ok(batch) = self.inbox_rx.try_recv() {
                self.take_in(batch);
            }
            if !self.buffer.is_empty() {
                self.set_busy();
                return Ok(());
            }
            if self.must_sweep() && self.sweep().await? > 0 {
                self.set_busy();
                return Ok(());
            }
            self.ensure_waiters();
            self.waits += 1;
            self.attention.send_replace(Attention::Waiting(self.waits));
            if let Some(g) = &self.group {
                g.idle(true);
            }
            let wake = Instant::now() + self.block_timeout;
            let until = deadline.map_or(wake, |d| d.min(wake));
            let regroup = async {
                match self.group.as_mut() {
                    Some(g) => g.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                got = self.inbox_rx.recv() => {
                    if let Some(batch) = got {
                        self.take_in(batch);
                    }
                }
                _ = regroup => {
                    // The assignment changed: take it in and sweep what is now ours.
                    self.sweep_due = true;
                    self.attention.send_replace(Attention::Busy);
                    return Ok(());
                }
                _ = tokio::time::sleep_until(until.into()) => {
                    // Sweep again after each block timeout: it picks up new shards and, for
                    // at-least-once queues, returns expired leases and due delayed
                    // messages to the ready lists.
                    let now = Instant::now();
                    if now >= wake {
                        self.sweep_due = true;
                    }
                    if deadline.is_some_and(|d| now >= d) {
                        self.attention.send_replace(Attention::Away);
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Starts the next round now, if the buffer just ran dry while messages flow (see
    /// [`ConsumerBuilder::prefetch`](super::ConsumerBuilder::prefetch)): it runs while the
    /// caller works on the batch it was handed, and the next `fill` awaits it. It asks
    /// only the shards the last fill got messages from (a message a waiter brought from
    /// one of thirty shards is followed by one ask, not thirty); a round that finds nothing
    /// stops the flow, and the consumer then sweeps or waits on its waiters as usual.
    ///
    /// A round of some shards is followed by one of all (when it brought messages), so a
    /// flowing shard never keeps the others from being asked: every shard is asked at
    /// least every other round.
    pub(super) fn prefetch_if_dry(&mut self) {
        if !self.prefetch
            || self.round.is_some()
            || !self.buffer.is_empty()
            || self.queue.is_paused()
        {
            return;
        }
        let (asks, partial) = match std::mem::replace(&mut self.flowing, Flow::Stopped) {
            Flow::Stopped => return,
            Flow::Shards(giving) => (self.plan_round(Some(&giving)), true),
            Flow::All => (self.plan_round(None), false),
        };
        if !asks.is_empty() {
            self.round = Some(Round::start_ahead(&self.ctx, asks, partial));
        }
    }

    /// A batch from the inbox: messages a waiter popped or leased, or (empty) a waiter's
    /// word that its shard has something.
    fn take_in(&mut self, batch: Vec<Message>) {
        if batch.is_empty() {
            self.sweep_due = true;
        } else {
            // Counted here as a round's messages are counted in `sweep`.
            metrics::counter!(crate::telemetry::POPPED, "queue" => self.queue.name().to_string())
                .increment(batch.len() as u64);
            self.queue.count_popped(batch.len());
            // A waiter's batch is one shard's. A waiter that re-arms watches its shard
            // while the consumer works (see `Waiter::run`): no round is started ahead.
            self.flowing = if self.waiters_rearm() {
                Flow::Stopped
            } else {
                Flow::Shards(vec![batch[0].shard.to_string()])
            };
            self.buffer_up(batch);
        }
    }

    /// Whether the waiters lease behind their waits: at-least-once, unless in an ordered
    /// group (see `wait_lease`).
    fn leases_behind_waits(&self) -> bool {
        self.ctx.max_attempts.is_some() && !self.group.as_ref().is_some_and(|g| g.cfg.ordered)
    }

    /// Whether a waiter that handed messages to its waiting consumer blocks again while
    /// the consumer works (see `Waiter::run`): with prefetch, when it leases behind its wait.
    fn waiters_rearm(&self) -> bool {
        self.prefetch && self.leases_behind_waits()
    }

    /// Whether an idle consumer sweeps before it waits: when a shard may hold messages
    /// that no waiter reports, when it owns nothing (it lives on stealing), and when other
    /// members' shards are deep (its own being empty, it steals at once).
    fn must_sweep(&mut self) -> bool {
        if self.sweep_due || self.round.is_some() {
            return true;
        }
        match &self.group {
            None => false,
            Some(g) if g.owned().is_empty() => true,
            Some(g) if g.may_steal() => {
                self.found_nothing = true;
                true
            }
            Some(_) => false,
        }
    }

    /// One round: a pop on every shard, one pipeline per node. Cancel-safe: a round cut
    /// short by a cancelled caller is resumed by the next call (see [`round`]).
    pub(super) async fn sweep(&mut self) -> Result<usize> {
        if self.round.is_none() {
            let asks = self.plan_round(None);
            if asks.is_empty() {
                // Nothing owned and nothing to steal from (yet).
                if let Some(g) = &self.group {
                    g.hungry(true);
                }
                return Ok(0);
            }
            self.round = Some(Round::start(&self.ctx, asks));
        }
        let replies = self
            .round
            .as_mut()
            .expect("a round in flight")
            .replies()
            .await;
        let round = self.round.take().expect("a round in flight");
        let out = round::absorb(&self.ctx, &round.asks, round.started, replies);
        self.sweep_due = !(out.drained && self.covers_watched(&round.asks));
        for ((ask, full), (n, bytes)) in round.asks.iter().zip(&out.full).zip(&out.sizes) {
            let w = self.weights.entry(ask.keys.tag.to_string()).or_insert(1);
            if *full
                && *w == 1
                && let Some(g) = &self.group
            {
                g.deep_now();
            }
            *w = if *full { (*w * 2).min(MAX_WEIGHT) } else { 1 };
            if *n > 0 {
                self.payload_sizes
                    .insert(ask.keys.tag.to_string(), (bytes / n).max(1));
            }
        }
        let mut out = out;
        if let Some(g) = self.group.as_mut() {
            for (tag, fence) in std::mem::take(&mut out.fenced) {
                g.fenced(&tag, fence);
                self.waiters.remove(&*tag);
            }
            if g.cfg.ordered {
                for (tag, task) in std::mem::take(&mut out.lost) {
                    g.returning(tag.to_string(), task);
                }
            }
        }
        if let Some(g) = self.group.as_ref()
            && g.cfg.ordered
        {
            // Only what was taken under the grant this member holds now is handed out. A
            // round that brings messages of a shard released meanwhile, or of a grant
            // lost (fenced, membership lapsed, granted anew), gives them back together
            // with what is buffered of the shard (see `ordered_giveback`); a fenced shard
            // gives back its buffered messages at once.
            let mut gone: HashSet<Arc<str>> = out
                .messages
                .iter()
                .filter(|m| !g.holds(m))
                .map(|m| m.shard.clone())
                .collect();
            gone.extend(
                self.buffer
                    .iter()
                    .filter(|m| !g.holds(m) && !g.released().contains(&*m.shard))
                    .map(|m| m.shard.clone()),
            );
            let (give, mine): (Vec<Message>, Vec<Message>) = out
                .messages
                .into_iter()
                .partition(|m| gone.contains(&m.shard));
            out.messages = mine;
            self.give_back_ordered(&gone, give);
        }
        let got = out.messages.len();
        self.flowing = if got == 0 {
            Flow::Stopped
        } else if round.partial {
            Flow::All
        } else {
            Flow::Shards(
                round
                    .asks
                    .iter()
                    .zip(&out.sizes)
                    .filter(|(_, (n, _))| *n > 0)
                    .map(|(a, _)| a.keys.tag.to_string())
                    .collect(),
            )
        };
        if let Some(g) = &self.group {
            g.swept(round.asks.iter().map(|a| &*a.keys.tag));
            // Counted per shard asked, not per message (a lookup a message showed in the
            // profile of one consumer on 30 shards). Ordered members keep nothing of
            // shards they do not own (given back above).
            let stolen: usize = if g.cfg.ordered {
                0
            } else {
                round
                    .asks
                    .iter()
                    .zip(&out.sizes)
                    .filter(|(a, _)| !g.owned().contains(&*a.keys.tag))
                    .map(|(_, (n, _))| n)
                    .sum()
            };
            if stolen > 0 {
                metrics::counter!(crate::telemetry::GROUP_STEALS, "group" => g.cfg.name.clone())
                    .increment(stolen as u64);
            }
            self.found_nothing = got == stolen;
            g.hungry(got == 0);
        }
        // Queues with priorities: a level some shard may hold more of is finished first.
        self.upto = out.full_level.unwrap_or(crate::priority::Priority::Low);
        let mut messages = out.messages;
        if self.queue.shards().priorities {
            // A round takes each shard's highest level: what it brought goes out highest
            // first, whichever shard it came from (stable: a level keeps its order).
            messages.sort_by_key(|m| m.level);
        }
        self.buffer_up(messages);
        let queue = self.queue.name().to_string();
        metrics::histogram!(crate::telemetry::POP_ROUND_SECONDS, "queue" => queue.clone())
            .record(round.started.elapsed().as_secs_f64());
        metrics::counter!(crate::telemetry::POPPED, "queue" => queue).increment(got as u64);
        if got > 0 {
            self.queue.count_popped(got);
        }
        match out.error {
            // What other shards gave is handed out; the error comes back when the queue
            // had nothing else to give.
            Some(e) if got == 0 => Err(e),
            _ => Ok(got),
        }
    }

    /// Whether a round's asks include every shard this consumer's waiters watch.
    fn covers_watched(&self, asks: &[Ask]) -> bool {
        match &self.group {
            None => asks.len() >= self.queue.shards().shards.len(),
            Some(g) => g
                .owned()
                .iter()
                .all(|t| asks.iter().any(|a| *a.keys.tag == **t)),
        }
    }

    /// What to ask of each shard this round: deepest first, starting from a rotating
    /// shard, every shard every round (or, with `only`, those of them: a round started
    /// ahead asks the shards that were just giving).
    fn plan_round(&mut self, only: Option<&[String]>) -> Vec<Ask> {
        let set = self.queue.shards();
        let mine: Vec<Shard>;
        let wanted = |tag: &String| only.is_none_or(|o| o.contains(tag));
        let shards = match &self.group {
            None if only.is_none() => &set.shards,
            None => {
                mine = set
                    .shards
                    .iter()
                    .filter(|s| wanted(&s.tag))
                    .cloned()
                    .collect();
                &mine
            }
            Some(g) => {
                let sweep = g.sweep_set(self.found_nothing);
                // Queues with priorities: a member's rounds ask every shard (its waiters
                // stay on its own), so that it takes a lower level only when no shard
                // holds a higher one, whichever member owns it.
                let every = set.priorities;
                mine = set
                    .shards
                    .iter()
                    .filter(|s| {
                        (every || sweep.contains(&s.tag))
                            && !g.is_returning(&s.tag)
                            && wanted(&s.tag)
                    })
                    .cloned()
                    .collect();
                &mine
            }
        };
        if shards.is_empty() {
            return Vec::new();
        }
        self.rotate = (self.rotate + 1) % shards.len();
        let mut order: Vec<&Shard> = shards[self.rotate..]
            .iter()
            .chain(&shards[..self.rotate])
            .collect();
        order.sort_by_key(|s| std::cmp::Reverse(self.weights.get(&s.tag).copied().unwrap_or(1)));
        let reliable = self.ctx.max_attempts.is_some();
        let fenced_plain = !reliable && self.ctx.fence_group.is_some();
        order
            .into_iter()
            .map(|s| {
                let mut wanted = self.pop_batch * self.weights.get(&s.tag).copied().unwrap_or(1);
                if fenced_plain {
                    // A fenced pop is a script: its call costs what popping a few hundred
                    // messages does, so it asks for more at a time.
                    wanted *= FENCED_ASK_FACTOR;
                }
                // Bounded by bytes too: few messages at a time while their size is unknown.
                let count = match self.payload_sizes.get(&s.tag) {
                    Some(size) => wanted.min((round::MAX_POP_BYTES / size).max(1)),
                    None => wanted.min(round::FIRST_POP_COUNT),
                };
                Ask {
                    keys: self.keys_of(&s.tag),
                    count,
                    lease: reliable.then(LeaseId::random),
                    fence: self.group.as_ref().and_then(|g| g.epoch_of(&s.tag)),
                    upto: self.upto,
                }
            })
            .collect()
    }

    fn keys_of(&mut self, tag: &str) -> Arc<ShardKeys> {
        let prefix = self.queue.prefix();
        let levels = self.queue.shards().priorities;
        self.keys
            .entry(tag.to_string())
            .or_insert_with(|| {
                let keys = ShardKeys::new(prefix, tag);
                Arc::new(if levels {
                    keys.with_levels(prefix)
                } else {
                    keys
                })
            })
            .clone()
    }

    /// Starts a waiter for every shard that has none running.
    fn ensure_waiters(&mut self) {
        let set = self.queue.shards();
        self.waiters.retain(|_, (h, _)| !h.is_finished());
        // Ordered members take a shard's messages by rounds only (see `wait_lease`).
        let lease_behind_wait = self.leases_behind_waits();
        for s in &set.shards {
            if self.waiters.contains_key(&s.tag) {
                continue;
            }
            if let Some(g) = &self.group
                && !g.owned().contains(&s.tag)
            {
                continue;
            }
            let (stop, alive) = watch::channel(());
            let keys = self.keys_of(&s.tag);
            let w = Waiter {
                cluster: self.queue.cluster().clone(),
                slot: s.slot,
                tag: Arc::from(s.tag.as_str()),
                key: ready_key(self.queue.prefix(), &s.tag),
                count: self.pop_batch,
                block: self.block_timeout,
                attention: self.attention.subscribe(),
                alive,
                tx: self.inbox_tx.clone(),
                wake_only: self.ctx.max_attempts.is_some() || self.ctx.fence_group.is_some(),
                lease: lease_behind_wait
                    .then(|| WaitLease::new(self.ctx.clone(), keys, self.pop_batch)),
                rearm: self.waiters_rearm(),
                confirm: self.ctx.confirm,
                levels: set.priorities.then(|| {
                    let prefix = self.queue.prefix();
                    Box::new([
                        crate::priority::Priority::High.ready_key(prefix, &s.tag),
                        crate::priority::Priority::Low.ready_key(prefix, &s.tag),
                    ])
                }),
            };
            self.waiters
                .insert(s.tag.clone(), (tokio::spawn(w.run()), stop));
        }
    }
}
