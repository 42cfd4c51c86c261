//! One poll round: a pop on every shard (`LPOP key count`, or a lease on at-least-once
//! queues, see `lease::pop`), one pipeline per node, all nodes at once.
//!
//! Invariants (what makes a round lose nothing):
//! - A round is a future the consumer owns. When `recv` is cancelled mid-round (a
//!   `select!`, a timeout, Ctrl-C) the round stays with the consumer and the next call
//!   resumes it; a consumer dropped mid-round hands it to a task that gives back what it
//!   took.
//! - Every reply that arrived is used, whatever the other shards answered: one shard's
//!   error never discards another shard's messages.
//! - A reply that was lost (timeout, broken connection) may hide a pop that ran. On an
//!   at-least-once queue the lease was named by the consumer before it was sent, so it is
//!   released by name (no delivery counted). On an at-most-once queue the messages of such a
//!   pop are lost; this is counted (`slotq_pop_replies_lost_total`) and logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::Value;
use tokio::task::JoinHandle;

use super::Message;
use crate::cluster::Cluster;
use crate::cluster::Reply::{Items, Value as Plain};
use crate::error::{Error, Result};
use crate::lease::{self, Lease, LeaseAsk, LeaseId, LeaseRef, LeaseScripts, Leasing, ShardKeys};

/// What one shard is asked in a round.
pub(super) struct Ask {
    pub(super) keys: Arc<ShardKeys>,
    pub(super) count: usize,
    /// At-least-once: the name of the lease this pop creates.
    pub(super) lease: Option<LeaseId>,
    /// Ordered groups: the epoch of this member's grant of the shard, which the pop
    /// presents to the shard's fence (see `group.rs`).
    pub(super) fence: Option<u64>,
    /// Queues with priorities: the lowest level the pop takes (see `Outcome::full_level`).
    pub(super) upto: crate::priority::Priority,
}

/// What a round needs besides its asks.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) cluster: Cluster,
    pub(super) scripts: Arc<LeaseScripts>,
    /// `Some` on at-least-once queues.
    pub(super) max_attempts: Option<u32>,
    pub(super) lease: Duration,
    /// Ordered groups: the group's name, which fenced pops present with their epoch.
    pub(super) fence_group: Option<Arc<str>>,
    /// At-most-once queues: replicas that must confirm a pop before its messages are
    /// handed out, and how long to wait for them (see `confirm.rs`); `None`: unconfirmed.
    pub(super) confirm: Option<(u32, Duration)>,
    /// Releases of lost or unwanted leases still running: `close` waits for them, so a
    /// process that exits right after closing its consumer leaves no lease behind.
    pub(super) releases: Arc<Releases>,
}

/// Counts the release tasks a consumer started and wakes whoever waits for none.
#[derive(Default)]
pub(super) struct Releases {
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Releases {
    fn start(self: &Arc<Self>) -> ReleaseGuard {
        self.running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ReleaseGuard(self.clone())
    }

    /// Waits until every release started so far has ended, or `limit` passed.
    pub(super) async fn settled(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let idle = self.idle.notified();
                if self.running.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }
}

/// One running release; dropping it (done, or its task cancelled) counts it out.
struct ReleaseGuard(Arc<Releases>);

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        if self
            .0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// Most payload bytes asked of one shard in one round: a reply stays a few MiB whatever
/// the payload size, so it arrives well inside a request timeout.
pub(super) const MAX_POP_BYTES: usize = 8 << 20;
/// Most messages asked of a shard before its payload size is known.
pub(super) const FIRST_POP_COUNT: usize = 8;

/// One shard's answer in a round.
pub(super) enum Reply {
    /// An `LPOP` reply (at-most-once queues).
    Items(crate::cluster::Reply),
    /// A lease, or none (at-least-once queues).
    Lease(Leasing),
}

type Replies = Pin<Box<dyn Future<Output = Vec<Result<Reply>>> + Send>>;

/// A round in flight.
pub(super) struct Round {
    pub(super) asks: Arc<Vec<Ask>>,
    pub(super) started: Instant,
    /// Started ahead for some of the shards only (those that were giving).
    pub(super) partial: bool,
    cluster: Cluster,
    replies: Running,
}

/// How a round runs: polled by the call that awaits it (one task hop less on the way to
/// the caller), or, started ahead of the next call, as a task of its own that goes on
/// while nobody polls the consumer.
enum Running {
    /// In a mutex only so that the consumer stays `Sync`; reached by `get_mut`, never
    /// locked.
    Inline(std::sync::Mutex<Replies>),
    Task(JoinHandle<Vec<Result<Reply>>>),
}

impl Round {
    /// Waits for the replies. Cancel-safe: awaiting again resumes the same round.
    pub(super) async fn replies(&mut self) -> Vec<Result<Reply>> {
        let joined = match &mut self.replies {
            Running::Inline(fut) => return fut.get_mut().unwrap_or_else(|p| p.into_inner()).await,
            Running::Task(handle) => handle.await,
        };
        match joined {
            Ok(replies) => replies,
            Err(e) => {
                // The task ended without its replies (a panic, or the runtime shutting
                // down): each pop may have run, as when a connection is lost.
                let topology = self.cluster.topology();
                self.asks
                    .iter()
                    .map(|a| {
                        Err(match topology.owner(a.keys.slot) {
                            Some(node) => Error::ConnectionLost {
                                node: node.clone(),
                                reason: format!("the round's task ended: {e}"),
                                cause: None,
                            },
                            None => Error::SlotUncovered { slot: a.keys.slot },
                        })
                    })
                    .collect()
            }
        }
    }
}

/// What a finished round brought.
pub(super) struct Outcome {
    pub(super) messages: Vec<Message>,
    /// Per ask: whether the shard filled it (so it gets a larger count next round).
    pub(super) full: Vec<bool>,
    /// Per ask: messages and payload bytes it brought (to size the next asks by bytes).
    pub(super) sizes: Vec<(usize, usize)>,
    /// The first error that was not a shard skipped for the round.
    pub(super) error: Option<Error>,
    /// Every shard asked said it was left empty (at-least-once leases report it; `LPOP`
    /// does not, so a plain round never sets it).
    pub(super) drained: bool,
    /// Shards whose fence refused this member's grant, with the fence found.
    pub(super) fenced: Vec<(Arc<str>, u64)>,
    /// Queues with priorities: the highest level some shard filled its ask with (it may
    /// hold more of that level): the next round takes only that level and higher, so no
    /// lower message is taken while one of them waits more than a round.
    pub(super) full_level: Option<crate::priority::Priority>,
    /// Shards whose lease reply was lost, with the task releasing the lease by name:
    /// an ordered member takes nothing more of such a shard until it has ended (the pop
    /// may run late, and its messages come back ahead of what a newer pop would take).
    pub(super) lost: Vec<(Arc<str>, tokio::task::JoinHandle<()>)>,
}

impl Round {
    /// Sends the round now, in a task of its own: it runs while the consumer is not
    /// polled (a round started ahead of the next call).
    pub(super) fn start_ahead(ctx: &Ctx, asks: Vec<Ask>, partial: bool) -> Round {
        let mut round = Round::start(ctx, asks);
        if let Running::Inline(fut) = round.replies {
            let fut = fut.into_inner().unwrap_or_else(|p| p.into_inner());
            round.replies = Running::Task(tokio::spawn(fut));
        }
        round.partial = partial;
        round
    }

    /// Sends the round when it is first awaited.
    pub(super) fn start(ctx: &Ctx, asks: Vec<Ask>) -> Round {
        let asks = Arc::new(asks);
        let (cluster, scripts, lease) = (ctx.cluster.clone(), ctx.scripts.clone(), ctx.lease);
        let max_attempts = ctx.max_attempts;
        let fence_group = ctx.fence_group.clone();
        // Confirmed only where some master asked has a live replica: elsewhere there is
        // nothing to wait for, and the round stays on the shared connections.
        let confirm = ctx.confirm.filter(|_| {
            let topology = ctx.cluster.topology();
            asks.iter().any(|a| {
                topology
                    .owner(a.keys.slot)
                    .is_none_or(|m| topology.has_live_replica(m))
            })
        });
        let sent = asks.clone();
        let replies: Replies = Box::pin(async move {
            let mut opts = cluster.default_opts();
            // A node that is down is skipped for this round, not waited for.
            opts.retry_budget = Duration::ZERO;
            match max_attempts {
                None => {
                    let group = fence_group.as_deref();
                    // A confirmed round's `WAIT` holds its connection: the second one.
                    opts.isolated |= confirm.is_some();
                    let replies = super::fenced_pop::pop_many(
                        &cluster, &scripts, group, &sent, opts, confirm,
                    )
                    .await;
                    let replies = match confirm {
                        Some(_) => {
                            super::confirm::withhold_unconfirmed(&cluster, &sent, replies).await
                        }
                        None => replies.into_iter().map(|(r, _)| r).collect(),
                    };
                    replies.into_iter().map(|r| r.map(Reply::Items)).collect()
                }
                Some(max_attempts) => {
                    let asks: Vec<LeaseAsk<'_>> = sent
                        .iter()
                        .map(|a| LeaseAsk {
                            keys: &a.keys,
                            count: a.count,
                            id: a.lease.expect("at-least-once asks name their lease"),
                            fence: fence_group.as_deref().zip(a.fence),
                        })
                        .collect();
                    let terms = lease::LeaseTerms {
                        lease,
                        max_attempts,
                        max_bytes: MAX_POP_BYTES,
                    };
                    let replies = lease::lease_many(&cluster, &scripts, &asks, terms, opts).await;
                    replies.into_iter().map(|r| r.map(Reply::Lease)).collect()
                }
            }
        });
        Round {
            asks,
            started: Instant::now(),
            partial: false,
            cluster: ctx.cluster.clone(),
            replies: Running::Inline(std::sync::Mutex::new(replies)),
        }
    }
}

/// The fence a refused pop found (`FENCED <fence> <epoch>`).
pub(super) fn fenced(e: &Error) -> Option<u64> {
    match e {
        Error::Server {
            kind: crate::server_error::ServerErrorKind::Fenced,
            message,
            ..
        } => message.split_whitespace().next()?.parse().ok(),
        _ => None,
    }
}

/// Turns every reply of a finished round into messages; releases the leases of lost replies.
pub(super) fn absorb(
    ctx: &Ctx,
    asks: &[Ask],
    started: Instant,
    replies: Vec<Result<Reply>>,
) -> Outcome {
    let mut out = Outcome {
        messages: Vec::new(),
        full: Vec::with_capacity(asks.len()),
        sizes: Vec::with_capacity(asks.len()),
        error: None,
        drained: true,
        fenced: Vec::new(),
        full_level: None,
        lost: Vec::new(),
    };
    // Room for every message up front: a `Message` is large, and growing the vector while
    // a thousand arrive would move each of them several times.
    let arriving: usize = replies
        .iter()
        .map(|r| match r {
            Ok(Reply::Items(Items(items))) => items.len(),
            Ok(Reply::Items(Plain(Value::Array(items)))) => items.len(),
            Ok(Reply::Lease(Leasing::Leased { count, .. })) => *count,
            _ => 0,
        })
        .sum();
    out.messages.reserve(arriving);
    for (ask, reply) in asks.iter().zip(replies) {
        let before = out.messages.len();
        out.drained &= matches!(
            reply,
            Ok(Reply::Lease(
                Leasing::Nothing { drained: true } | Leasing::Leased { drained: true, .. }
            ))
        );
        // The shard's name, fresh for this reply: every message clones it, and a name
        // shared with other consumers' threads would make each clone a contended atomic.
        let shard: Arc<str> = Arc::from(&*ask.keys.tag);
        let taken = match reply {
            // A shard with priority levels: `LMPOP` names the level it took from.
            Ok(Reply::Items(Plain(v))) if ask.keys.levels.is_some() => {
                crate::priority::split_mpop(v).map(|(level, items)| {
                    let n = items.len();
                    for payload in items {
                        out.messages
                            .push(Message::plain_at(payload, shard.clone(), level));
                    }
                    n
                })
            }
            Ok(Reply::Items(v)) => each_item(v, |payload| {
                let mut m = Message::plain(payload, shard.clone());
                m.epoch = ask.fence;
                out.messages.push(m)
            }),
            Ok(Reply::Lease(Leasing::Nothing { .. })) => Ok(0),
            Ok(Reply::Lease(Leasing::Leased {
                deadline_ms,
                count,
                items,
                in_list,
                ..
            })) => {
                let max_attempts = ctx.max_attempts.unwrap_or(u32::MAX);
                let leased = (deadline_ms, count, items, in_list);
                take_lease(
                    ctx,
                    ask,
                    &shard,
                    leased,
                    max_attempts,
                    started,
                    &mut out.messages,
                )
            }
            Ok(Reply::Lease(Leasing::Unread(e))) => {
                // The lease exists but none of it arrived: give it back by name (below
                // for errors that may hide a pop, which every lost reply does).
                if !e.may_have_run()
                    && let Some(task) = lost_reply(ctx, ask, &e)
                {
                    out.lost.push((ask.keys.tag.clone(), task));
                }
                Err(e)
            }
            Err(e) => Err(e),
        };
        let new = &out.messages[before..];
        out.sizes
            .push((new.len(), new.iter().map(|m| m.payload.len()).sum()));
        match taken {
            Ok(n) => {
                let full = n >= ask.count;
                if full && ask.keys.levels.is_some() {
                    let level = out.messages[before].level;
                    out.full_level = Some(out.full_level.map_or(level, |l| l.min(level)));
                }
                out.full.push(full)
            }
            Err(e) if fenced(&e).is_some() => {
                out.full.push(false);
                tracing::info!(shard = %ask.keys.tag, cause = %e, "shard fenced: another member owns it now");
                out.fenced
                    .push((ask.keys.tag.clone(), fenced(&e).unwrap_or(0)));
            }
            Err(e) => {
                out.full.push(false);
                if e.may_have_run() {
                    if let Some(task) = lost_reply(ctx, ask, &e) {
                        out.lost.push((ask.keys.tag.clone(), task));
                    }
                } else if e.is_retryable() {
                    tracing::debug!(shard = %ask.keys.tag, cause = %e, "shard skipped this round");
                } else {
                    tracing::warn!(shard = %ask.keys.tag, cause = %e, "pop failed on a shard");
                    out.error.get_or_insert(e);
                }
            }
        }
    }
    out
}

/// A pop whose reply was lost may have run. At-least-once: its lease is released by
/// name, or (not there yet) tombstoned so that the pop leases nothing if it runs later;
/// the task doing so is returned.
pub(super) fn lost_reply(ctx: &Ctx, ask: &Ask, e: &Error) -> Option<tokio::task::JoinHandle<()>> {
    match ask.lease {
        None => {
            metrics::counter!(crate::telemetry::POP_REPLIES_LOST).increment(1);
            tracing::warn!(
                shard = %ask.keys.tag, cause = %e, count = ask.count,
                "pop reply lost: if the pop ran, up to this many messages are gone (at-most-once)"
            );
            None
        }
        Some(id) => {
            // The pop may still be queued behind a stalled node: keep trying, a request
            // timeout apart, until the lease is released or tombstoned, or until it would
            // have expired anyway (then the reaper returns its messages).
            let (cluster, scripts, keys) =
                (ctx.cluster.clone(), ctx.scripts.clone(), ask.keys.clone());
            let until = Instant::now() + ctx.lease;
            tracing::debug!(shard = %keys.tag, lease = %id, cause = %e, "releasing a lease whose pop reply was lost");
            let guard = ctx.releases.start();
            Some(tokio::spawn(async move {
                let _guard = guard;
                let pause = cluster.config().request_timeout_value();
                while Instant::now() < until {
                    if lease::release_lost(&cluster, &scripts, &keys, id)
                        .await
                        .is_ok()
                    {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            }))
        }
    }
}

/// Buffers the messages of a lease: its frames (heads skipped) hold `count` messages.
pub(super) fn take_lease(
    ctx: &Ctx,
    ask: &Ask,
    shard: &Arc<str>,
    (deadline_ms, count, items, in_list): (i64, usize, Vec<Bytes>, bool),
    max_attempts: u32,
    started: Instant,
    into: &mut Vec<Message>,
) -> Result<usize> {
    let lease = Arc::new(Lease {
        cluster: ctx.cluster.clone(),
        scripts: ctx.scripts.clone(),
        keys: ask.keys.clone(),
        id: ask.lease.expect("at-least-once asks name their lease"),
        deadline_ms,
        // The server's deadline, on this process's clock (conservative: from the send).
        local_deadline: lease::LocalDeadline::new(started + ctx.lease),
        max_attempts,
        count,
        in_list,
        closed: std::sync::atomic::AtomicBool::new(false),
    });
    let before = into.len();
    let mut decode = || -> Result<()> {
        for f in &items {
            if lease::decode_frame_head(f).is_some() {
                continue;
            }
            lease::for_each_envelope(f, |env| {
                let position = (into.len() - before) as u32 + 1;
                into.push(Message {
                    payload: env.payload,
                    shard: shard.clone(),
                    id: Some(env.id),
                    attempt: env.deliveries as u32 + 1,
                    enqueued_ms: Some(env.enqueued_ms),
                    lease: Some(LeaseRef {
                        lease: lease.clone(),
                        position,
                    }),
                    epoch: ask.fence,
                    meta: env.meta.map(Arc::new),
                    raw: None,
                    level: crate::priority::Priority::Normal,
                });
            })?;
        }
        Ok(())
    };
    let decoded = decode();
    let n = into.len() - before;
    if let Err(e) = decoded {
        into.truncate(before);
        return Err(e);
    }
    if n != count {
        into.truncate(before);
        return Err(Error::Protocol(format!(
            "reliable pop: the lease holds {n} messages, its script counted {count}"
        )));
    }
    Ok(n)
}

/// Hands each payload of an `LPOP key count` reply to `f`; returns how many there were.
fn each_item(reply: crate::cluster::Reply, mut f: impl FnMut(Bytes)) -> Result<usize> {
    match reply {
        Items(items) => {
            let n = items.len();
            items.iter().for_each(f);
            Ok(n)
        }
        Plain(Value::Nil) => Ok(0),
        Plain(Value::Array(items)) => {
            let n = items.len();
            for i in items {
                match i {
                    Value::BulkString(b) => f(Bytes::from(b)),
                    other => {
                        return Err(Error::Protocol(format!("pop: unexpected item {other:?}")));
                    }
                }
            }
            Ok(n)
        }
        Plain(other) => Err(Error::Protocol(format!("pop: unexpected reply {other:?}"))),
    }
}
