//! The blocking waiter: one task per shard that blocks server-side while its consumer is
//! idle, so that an idle consumer sends nothing between block timeouts.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::{mpsc, watch};

use super::confirm;
use super::giveback::give_back;
use super::wait_lease::{Brought, WaitLease};
use super::{BLOCK_GRACE, Message};
use crate::cluster::{Cluster, Reply};
use crate::error::{Error, Result};
use crate::lease::LeaseId;
use crate::priority::Priority;
use crate::server_error::{RetryMethod, ServerErrorKind};
use crate::slot::Slot;
use crate::topology::NodeAddr;

/// Pause before a waiter retries after an error.
const WAITER_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Blocks on one shard while its consumer is idle.
pub(super) struct Waiter {
    pub(super) cluster: Cluster,
    pub(super) slot: Slot,
    pub(super) tag: Arc<str>,
    pub(super) key: String,
    pub(super) count: usize,
    pub(super) block: Duration,
    pub(super) attention: watch::Receiver<Attention>,
    pub(super) alive: watch::Receiver<()>,
    pub(super) tx: mpsc::UnboundedSender<Vec<Message>>,
    /// At-least-once, and ordered groups: wait without popping (`BLMOVE key key LEFT LEFT`
    /// leaves the list as it was, and its reply is the list's first element: on
    /// at-least-once queues a 16-byte frame head, not a frame) and let the consumer lease
    /// or pop what arrived (ordered members pop behind the shard's fence, which a blocked
    /// pop could not check when it finally runs).
    pub(super) wake_only: bool,
    /// At-least-once, unless the consumer is in an ordered group: a lease sent behind the
    /// wait (see `wait_lease`).
    pub(super) lease: Option<WaitLease>,
    /// Block again at once after handing messages to a waiting consumer, while it works on
    /// them (its prefetch, with a lease behind the wait): see [`Waiter::run`].
    pub(super) rearm: bool,
    /// At-most-once pops (`BLMPOP`): replicas that must confirm a pop before its messages
    /// are handed out (see `confirm.rs`).
    pub(super) confirm: Option<(u32, Duration)>,
    /// Queues with priorities: the high and low lists, which the wait covers with `key`
    /// (`BLMPOP` over the three, highest first).
    pub(super) levels: Option<Box<[String; 2]>>,
}

/// Where a consumer is, for its waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attention {
    /// Working on what it has, or between calls: waiters do not block, and what their
    /// pending waits bring waits in the inbox for the next call.
    Busy,
    /// In its n-th wait for messages: waiters block, each at most once a wait (a waiter
    /// that woke its consumer for data it then swept does not block again, and find that
    /// data still there, before the next wait).
    Waiting(u64),
    /// Back from a call at the caller's deadline with nothing: nobody receives, so a lease
    /// that a pending wait brings now is released, not kept.
    Away,
}

struct Blocking {
    node: NodeAddr,
    conn: crate::cluster::Conn,
    id: i64,
}

impl Waiter {
    /// Blocks while the consumer waits, once a wait. With `rearm`, a waiter that handed
    /// messages to its waiting consumer blocks once more right away, while the consumer
    /// works on them: what arrives meanwhile is leased as it arrives and waits in the inbox
    /// for the next call (a prefetch that lasts as long as the consumer's work, where a
    /// round started ahead looks once), and when nothing arrives the consumer's next wait
    /// finds its waiter blocked already (no round sent to find the shard empty, no wait
    /// sent again). Bounded: what a re-armed wait brings to a consumer that is not waiting
    /// does not re-arm it, so at most one lease a shard waits in the inbox.
    pub(super) async fn run(mut self) {
        let mut conn: Option<Blocking> = None;
        // The consumer's wait this waiter last woke it in.
        let mut woke_in: Option<u64> = None;
        let mut again = false;
        loop {
            let rearmed =
                std::mem::take(&mut again) && !matches!(*self.attention.borrow(), Attention::Away);
            // Block only while the consumer waits, and once a wait (or re-armed).
            let wait = if rearmed {
                woke_in.unwrap_or_default()
            } else {
                loop {
                    if let Attention::Waiting(n) = *self.attention.borrow_and_update()
                        && woke_in != Some(n)
                    {
                        break n;
                    }
                    tokio::select! {
                        r = self.attention.changed() => if r.is_err() { return },
                        _ = self.alive.changed() => return,
                    }
                }
            };
            let Some(owner) = self.cluster.topology().owner(self.slot).cloned() else {
                self.cluster.request_refresh();
                if self.pause().await {
                    return;
                }
                continue;
            };
            if self.cluster.is_node_down(&owner) {
                self.cluster.request_refresh();
                if self.pause().await {
                    return;
                }
                continue;
            }
            if conn.as_ref().map(|c| &c.node) != Some(&owner) {
                conn = match self.connect(&owner).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::debug!(node = %owner, cause = %e, "waiter cannot connect");
                        if self.pause().await {
                            return;
                        }
                        continue;
                    }
                };
            }
            let b = conn.as_mut().expect("connected above");
            let mut bytes = self.wait_cmd().get_packed_command();
            let lease = self.lease.as_ref().map(|l| {
                let id = LeaseId::random();
                bytes.extend(l.packed(id));
                id
            });
            let behind = lease.is_some();
            // A pop confirmed by a replica before its messages are handed out: `WAIT`
            // behind `BLMPOP`, on the same connection (it answers at once after a wait
            // that popped nothing).
            let confirm = self
                .confirm
                .filter(|_| !self.wake_only && self.cluster.topology().has_live_replica(&owner));
            if let Some((n, t)) = confirm {
                bytes.extend(
                    redis::cmd("WAIT")
                        .arg(n)
                        .arg(t.as_millis() as u64)
                        .get_packed_command(),
                );
            }
            let replies = if behind { 3 } else { 1 } + usize::from(confirm.is_some());
            let waiting_for_replicas = confirm.map_or(Duration::ZERO, |(_, t)| t);
            let reply = {
                let pop = tokio::time::timeout(
                    self.block + BLOCK_GRACE + waiting_for_replicas,
                    b.conn.exec_replies(bytes, replies, behind),
                );
                tokio::pin!(pop);
                tokio::select! {
                    r = &mut pop => r,
                    _ = self.alive.changed() => {
                        // The consumer is gone: end the blocked pop and return what it took.
                        let unblock = redis::cmd("CLIENT").arg("UNBLOCK").arg(b.id).clone();
                        let _ = self.cluster.node_query::<Value>(&b.node, &unblock).await;
                        let last = pop.await;
                        match (&mut self.lease, lease, last) {
                            (Some(l), Some(id), Ok(Ok(mut r))) if r.len() == 3 => {
                                let (list, script) = (r.pop().expect("3"), r.pop().expect("3"));
                                if let Brought::Messages { .. } = l.read(id, script, list) {
                                    l.release_messages(id);
                                }
                            }
                            (Some(l), Some(id), _) => l.release(id, &Error::Protocol(
                                "consumer gone while its wait's lease was in flight".into(),
                            )),
                            (None, _, Ok(Ok(mut r))) if !self.wake_only => {
                                let popped = blmpop_items(r.remove(0).into_value());
                                let confirmed = confirm.is_none_or(|(n, _)| {
                                    r.pop().is_some_and(|w| confirm::confirmed(&w.into_value(), n))
                                });
                                match popped {
                                    Ok((_, items)) if items.is_empty() => {}
                                    Ok((level, items)) if confirmed => {
                                        give_back(&self.cluster, self.slot, self.level_key(level), items).await
                                    }
                                    Ok((level, items)) => {
                                        confirm::push_back(&self.cluster, b.node.clone(), self.level_key(level), items)
                                            .await
                                    }
                                    Err(_) => {}
                                }
                            }
                            _ => {}
                        }
                        return;
                    }
                }
            };
            let mut replies = match reply {
                Err(_) => {
                    // No reply by the client deadline: the node is hung or gone.
                    tracing::debug!(node = %b.node, "blocking pop missed its deadline");
                    conn = None;
                    self.cluster.request_refresh();
                    if let (Some(l), Some(id)) = (&self.lease, lease) {
                        l.release(id, &Error::Protocol("wait's reply lost".into()));
                    }
                    continue;
                }
                Ok(Err(broken)) => {
                    tracing::debug!(shard = %self.tag, cause = %broken.0, "blocking connection broke");
                    if let (Some(l), Some(id)) = (&self.lease, lease) {
                        l.release(id, &Error::Protocol(broken.0.clone()));
                    }
                    if self.on_error(None, &mut conn).await {
                        return;
                    }
                    continue;
                }
                Ok(Ok(r)) => r,
            };
            let waited = replies.remove(0).into_value();
            let confirmed = confirm.is_none_or(|(n, _)| {
                replies
                    .pop()
                    .is_some_and(|w| confirm::confirmed(&w.into_value(), n))
            });
            let after: Option<(Reply, Reply)> = match (replies.pop(), replies.pop()) {
                (Some(list), Some(script)) => Some((script, list)),
                _ => None,
            };
            if let (Some(l), Some(id), Some((script, list))) = (&mut self.lease, lease, after) {
                // The lease ran (or was refused) whatever the wait answered.
                match l.read(id, script, list) {
                    Brought::Messages { messages, more } => {
                        let now = *self.attention.borrow();
                        let waiting = match now {
                            Attention::Waiting(n) => Some(n),
                            _ => None,
                        };
                        // A wait that timed out saw nothing arrive: its lease took what
                        // came due or back from an expired lease, which a consumer at
                        // work must not sit on (it would use up a delivery of each).
                        let timed_out = matches!(waited, Value::Nil) && waiting.is_none();
                        if now == Attention::Away || timed_out {
                            // Nobody receives: given back, not kept until it expires.
                            l.release_messages(id);
                        } else if self.tx.send(messages).is_err() {
                            l.release_messages(id);
                            return;
                        } else {
                            // Re-armed only for a consumer that waits: one that works
                            // already has a lease of this shard to come back to.
                            woke_in = Some(waiting.unwrap_or(wait));
                            again = self.rearm && waiting.is_some();
                            // A re-armed wait returns at once when more is there.
                            if more && !again && self.tx.send(Vec::new()).is_err() {
                                return;
                            }
                        }
                    }
                    Brought::Wake => {
                        if self.tx.send(Vec::new()).is_err() {
                            return;
                        }
                        woke_in = Some(wait);
                    }
                    Brought::Nothing => {}
                }
            }
            match waited {
                Value::Nil => {}
                Value::BulkString(_) if self.wake_only => {
                    if self.lease.is_none() {
                        // Data arrived (and is still in the list): wake the consumer.
                        if self.tx.send(Vec::new()).is_err() {
                            return;
                        }
                        woke_in = Some(wait);
                    }
                }
                Value::ServerError(e) => {
                    let kind = ServerErrorKind::parse(e.code());
                    if self.on_error(Some(kind), &mut conn).await {
                        return;
                    }
                }
                v => match blmpop_items(v) {
                    Ok((_, items)) if items.is_empty() => {}
                    Ok((level, items)) if !confirmed => {
                        let node = b.node.clone();
                        confirm::push_back(&self.cluster, node, self.level_key(level), items).await;
                    }
                    Ok((level, items)) => {
                        if !self.hand_over(level, items).await {
                            return;
                        }
                        woke_in = Some(wait);
                    }
                    Err(e) => {
                        tracing::warn!(shard = %self.tag, cause = %e, "bad blocking pop reply");
                        if self.pause().await {
                            return;
                        }
                    }
                },
            }
        }
    }

    /// The blocking wait: `BLMOVE key key LEFT LEFT` when waking only (nothing moves),
    /// else `BLMPOP`, which pops.
    fn wait_cmd(&self) -> redis::Cmd {
        if self.wake_only {
            redis::cmd("BLMOVE")
                .arg(&self.key)
                .arg(&self.key)
                .arg("LEFT")
                .arg("LEFT")
                .arg(self.block.as_secs_f64())
                .clone()
        } else if let Some(l) = &self.levels {
            redis::cmd("BLMPOP")
                .arg(self.block.as_secs_f64())
                .arg(3)
                .arg(&l[0])
                .arg(&self.key)
                .arg(&l[1])
                .arg("LEFT")
                .arg("COUNT")
                .arg(self.count)
                .clone()
        } else {
            redis::cmd("BLMPOP")
                .arg(self.block.as_secs_f64())
                .arg(1)
                .arg(&self.key)
                .arg("LEFT")
                .arg("COUNT")
                .arg(self.count)
                .clone()
        }
    }

    /// Hands popped payloads to the consumer; a consumer that is gone gets them back at
    /// the head of the shard, and false is returned.
    async fn hand_over(&self, level: Priority, items: Vec<bytes::Bytes>) -> bool {
        let msgs: Vec<Message> = items
            .into_iter()
            .map(|payload| Message::plain_at(payload, self.tag.clone(), level))
            .collect();
        if let Err(back) = self.tx.send(msgs) {
            let items = back.0.iter().map(Message::element).collect();
            give_back(&self.cluster, self.slot, self.level_key(level), items).await;
            return false;
        }
        true
    }

    /// The list of a level (normal: the shard's ready list).
    fn level_key(&self, level: Priority) -> &str {
        match (&self.levels, level) {
            (Some(l), Priority::High) => &l[0],
            (Some(l), Priority::Low) => &l[1],
            _ => &self.key,
        }
    }

    /// Reacts to an error reply (`None`: the connection broke); returns true when the
    /// consumer is gone. A blocking pop waits on one node, so a redirect is not followed
    /// in place: the waiter learns the new map and blocks again where the shard is now.
    async fn on_error(
        &mut self,
        kind: Option<ServerErrorKind>,
        conn: &mut Option<Blocking>,
    ) -> bool {
        match kind.map(ServerErrorKind::retry_method) {
            // The slot moved or the node changed role: learn the new map, reconnect.
            Some(RetryMethod::Redirect | RetryMethod::RefreshAndRetry) => {
                *conn = None;
                self.cluster.request_refresh();
            }
            // Momentary: same node, same connection, after the pause.
            Some(RetryMethod::WaitAndRetry) => {}
            _ => {
                tracing::debug!(shard = %self.tag, ?kind, "blocking pop failed");
                *conn = None;
            }
        }
        self.pause().await
    }

    /// Sleeps before a retry; returns true when the consumer went away meanwhile.
    async fn pause(&mut self) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(WAITER_RETRY_PAUSE) => false,
            _ = self.alive.changed() => true,
        }
    }

    async fn connect(&self, node: &NodeAddr) -> Result<Blocking> {
        let conn = self.cluster.dedicated_connection(node).await?;
        let id = tokio::time::timeout(
            self.cluster.config().request_timeout_value(),
            conn.cmd(redis::cmd("CLIENT").arg("ID")),
        )
        .await
        .map_err(|_| Error::Timeout {
            node: node.clone(),
            timeout: self.cluster.config().request_timeout_value(),
        })?
        .map_err(|b| Error::Connect {
            node: node.clone(),
            reason: b.0,
            cause: b.1,
        })?;
        match id {
            Value::Int(id) => Ok(Blocking {
                node: node.clone(),
                conn,
                id,
            }),
            other => Err(Error::Protocol(format!("CLIENT ID: {other:?}"))),
        }
    }
}

/// Parses a `BLMPOP` reply: nil, or `[key, [payloads...]]`; the level popped from.
fn blmpop_items(v: Value) -> Result<(Priority, Vec<bytes::Bytes>)> {
    crate::priority::split_mpop(v)
}
