//! Sending: one pipeline per node per round, redirects and retries per command.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

use futures::future::join_all;
use redis::{Cmd, RedisResult, Value};

use super::command::Command;
use super::node::Node;
use super::reply::{Outcome, classify};
use super::resp::Reply;
use super::wire::Wire;
use super::{Inner, RequestOpts};
use crate::config::{FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE};
use crate::error::{Error, Result};
use crate::server_error::RetryMethod;
use crate::slot::Slot;
use crate::topology::NodeAddr;

/// Why a whole per-node pipeline failed.
enum SendError {
    /// Nothing reached the server: safe to resend.
    NotSent(Error),
    /// The commands may have run.
    MaybeSent(Error),
}

/// Sends one command to one node (no routing); the outer result is the transport's.
pub(crate) async fn send_raw(
    node: &Node,
    cmd: &Cmd,
    timeout: Duration,
) -> Result<RedisResult<Value>> {
    let conn = node.connection(false).await?;
    match tokio::time::timeout(timeout, conn.cmd(cmd)).await {
        Err(_) => {
            node.reset();
            Err(Error::Timeout {
                node: node.addr.clone(),
                timeout,
            })
        }
        Ok(Err(b)) => {
            node.reset();
            Err(Error::ConnectionLost {
                node: node.addr.clone(),
                reason: b.0,
                cause: b.1,
            })
        }
        Ok(Ok(Value::ServerError(e))) => Ok(Err(e.into())),
        Ok(Ok(v)) => Ok(Ok(v)),
    }
}

/// Runs one command on one node, mapping server errors to typed errors.
pub(crate) async fn run_on_node(
    inner: &Arc<Inner>,
    addr: &NodeAddr,
    cmd: &Cmd,
    timeout: Duration,
) -> Result<Value> {
    let node = inner.pool.get(addr);
    match send_raw(&node, cmd, timeout).await {
        Ok(reply) => match classify(addr, reply) {
            Outcome::Done(v) => Ok(v),
            Outcome::Failed(e) => Err(e),
            Outcome::Busy {
                kind,
                code,
                message,
            } => Err(Error::ClusterUnavailable {
                node: addr.clone(),
                kind,
                code,
                message,
            }),
            other => Err(Error::Protocol(format!(
                "{addr}: unexpected redirect {other:?}"
            ))),
        },
        Err(e) => {
            if matches!(e, Error::Timeout { .. }) {
                inner.mark_down(addr);
            }
            Err(e)
        }
    }
}

#[derive(Default)]
struct Item {
    ask: Option<NodeAddr>,
    redirects: u32,
}

/// Routes `cmds` by slot and runs them; see [`super::Cluster::batch`]. With `items`,
/// arrays of bulk strings come back as [`Reply::Items`] (slices of the read buffer).
pub(crate) async fn run_batch(
    inner: &Arc<Inner>,
    cmds: Vec<(Slot, Command)>,
    opts: RequestOpts,
    items_wanted: bool,
) -> Vec<Result<Reply>> {
    run_batch_confirmed(inner, cmds, opts, items_wanted, None)
        .await
        .into_iter()
        .map(|(r, _)| r)
        .collect()
}

/// Where a command of a confirmed batch ran, and whether a replica confirmed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Served {
    /// The node whose reply is the command's result.
    pub(crate) node: NodeAddr,
    /// The node's pipeline ended with a `WAIT` that enough replicas answered, or the slot
    /// map shows the node without a live replica (nothing to wait for).
    pub(crate) confirmed: bool,
}

/// [`run_batch`] where, with `confirm = Some((replicas, timeout))`, each node's pipeline
/// ends with `WAIT replicas timeout` when the slot map shows that node with a live
/// replica. `WAIT` counts the replicas that have every write of its connection so far,
/// so it covers every command of the pipeline before it: a command's [`Served`] says
/// whether its effect would survive that node's failover. Each command that got an
/// answer comes back with where it ran.
pub(crate) async fn run_batch_confirmed(
    inner: &Arc<Inner>,
    cmds: Vec<(Slot, Command)>,
    opts: RequestOpts,
    items_wanted: bool,
    confirm: Option<(u32, Duration)>,
) -> Vec<(Result<Reply>, Option<Served>)> {
    let n = cmds.len();
    let mut served: Vec<Option<Served>> = vec![None; n];
    let mut results: Vec<Option<Result<Reply>>> = (0..n).map(|_| None).collect();
    let mut items: Vec<Item> = (0..n).map(|_| Item::default()).collect();
    let mut pending: Vec<usize> = (0..n).collect();
    let deadline = Instant::now() + opts.retry_budget;
    let mut pause = FIRST_RETRY_PAUSE;
    let max_redirects = inner.config.max_redirects;

    while !pending.is_empty() {
        let topology = inner.topology();
        let mut groups: HashMap<NodeAddr, Vec<(usize, bool)>> = HashMap::new();
        let mut later: Vec<(usize, Error)> = Vec::new();
        for i in pending.drain(..) {
            let slot = cmds[i].0;
            if let Some(to) = items[i].ask.take() {
                groups.entry(to).or_default().push((i, true));
            } else if let Some(owner) = topology.owner(slot) {
                groups.entry(owner.clone()).or_default().push((i, false));
            } else {
                inner.request_refresh();
                later.push((i, Error::SlotUncovered { slot }));
            }
        }

        // Each node's share goes out as one write; commands are encoded straight from
        // `cmds` (kept for resending after a redirect).
        let sends = groups.into_iter().map(|(addr, group)| {
            let cmds = &cmds;
            let wait = confirm.filter(|_| topology.has_live_replica(&addr));
            async move {
                let r = send_group(inner, &addr, &group, cmds, opts, items_wanted, wait).await;
                (addr, group, wait, r)
            }
        });
        for (addr, group, wait, sent) in join_all(sends).await {
            let (replies, confirmed) = match sent {
                Ok((replies, waited)) => {
                    let confirmed = match (wait, waited) {
                        (None, _) => true,
                        (Some((want, _)), Some(Reply::Value(Value::Int(acked)))) => {
                            acked >= i64::from(want)
                        }
                        _ => false,
                    };
                    (replies, confirmed)
                }
                Err(SendError::NotSent(e)) => {
                    for (i, _) in group {
                        if e.is_retryable() {
                            later.push((i, e.clone()));
                        } else {
                            results[i] = Some(Err(e.clone()));
                        }
                    }
                    continue;
                }
                Err(SendError::MaybeSent(e)) => {
                    for (i, _) in group {
                        if opts.idempotent {
                            later.push((i, e.clone()));
                        } else {
                            results[i] = Some(Err(e.clone()));
                        }
                    }
                    continue;
                }
            };
            let unit: Vec<usize> = group.iter().map(|(i, _)| *i).collect();
            for ((i, _), reply) in group.into_iter().zip(replies) {
                let value = match reply {
                    // An array of bulk strings: never an error or a redirect.
                    Reply::Items(b) => {
                        results[i] = Some(Ok(Reply::Items(b)));
                        continue;
                    }
                    Reply::Value(v) => v,
                };
                match classify(&addr, Ok(value)) {
                    Outcome::Done(v) => results[i] = Some(Ok(Reply::Value(v))),
                    Outcome::Failed(e) => results[i] = Some(Err(e)),
                    Outcome::Moved { slot, to } => {
                        inner.apply_moved(slot, &to);
                        redirect(
                            &mut items[i],
                            &mut results[i],
                            &mut pending,
                            i,
                            slot,
                            max_redirects,
                        );
                    }
                    Outcome::Ask { to } => {
                        inner.counters.asked.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(crate::telemetry::REDIRECTS, "kind" => "ask")
                            .increment(1);
                        items[i].ask = Some(to);
                        redirect(
                            &mut items[i],
                            &mut results[i],
                            &mut pending,
                            i,
                            cmds[i].0,
                            max_redirects,
                        );
                    }
                    Outcome::Busy {
                        kind,
                        code,
                        message,
                    } => {
                        inner.counters.busy.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(crate::telemetry::BUSY_RETRIES).increment(1);
                        if kind.retry_method() == RetryMethod::RefreshAndRetry {
                            inner.request_refresh();
                        }
                        later.push((
                            i,
                            Error::ClusterUnavailable {
                                node: addr.clone(),
                                kind,
                                code,
                                message,
                            },
                        ));
                    }
                }
            }
            if opts.together {
                regroup(&unit, &mut results, &mut items, &mut pending, &mut later);
            }
            if confirm.is_some() {
                for &i in &unit {
                    if results[i].is_some() {
                        served[i] = Some(Served {
                            node: addr.clone(),
                            confirmed,
                        });
                    }
                }
            }
        }

        if !later.is_empty() {
            if Instant::now() + pause > deadline {
                for (i, e) in later {
                    results[i] = Some(Err(e));
                }
            } else {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
                pending.extend(later.into_iter().map(|(i, _)| i));
            }
        }
    }
    results
        .into_iter()
        .zip(served)
        .map(|(r, s)| (r.expect("every command ends with a result"), s))
        .collect()
}

/// A unit ([`RequestOpts::together`]) is sent again as a whole when any of its commands is:
/// the commands that completed are sent again with it, to the same place (an ASK target
/// for all of them, or the owner in the updated map), after the same pause.
fn regroup(
    unit: &[usize],
    results: &mut [Option<Result<Reply>>],
    items: &mut [Item],
    pending: &mut Vec<usize>,
    later: &mut Vec<(usize, Error)>,
) {
    let retried_later = unit.iter().find_map(|i| later.iter().find(|(j, _)| j == i));
    let redirected = unit.iter().find(|i| pending.contains(i));
    if retried_later.is_none() && redirected.is_none() {
        return;
    }
    // A command that failed for good fails the unit: nothing is resent. Unless another
    // command of the unit was redirected: the unit went to a node that does not serve its
    // slot, and what failed there failed for that reason (a `WAIT` on a master just
    // demoted answers "WAIT cannot be used with replica instances" while the push before
    // it answers MOVED): the whole unit follows the redirect.
    if redirected.is_none() && unit.iter().any(|&i| matches!(results[i], Some(Err(_)))) {
        let e = unit
            .iter()
            .find_map(|&i| results[i].as_ref().and_then(|r| r.as_ref().err().cloned()))
            .expect("a failed command");
        pending.retain(|i| !unit.contains(i));
        later.retain(|(i, _)| !unit.contains(i));
        for &i in unit {
            results[i] = Some(Err(e.clone()));
        }
        return;
    }
    let ask = redirected.and_then(|&i| items[i].ask.clone());
    let cause = retried_later.map(|(_, e)| e.clone());
    pending.retain(|i| !unit.contains(i));
    later.retain(|(i, _)| !unit.contains(i));
    for &i in unit {
        results[i] = None;
        items[i].ask = ask.clone();
        match &cause {
            Some(e) => later.push((i, e.clone())),
            None => pending.push(i),
        }
    }
}

fn redirect(
    item: &mut Item,
    result: &mut Option<Result<Reply>>,
    pending: &mut Vec<usize>,
    i: usize,
    slot: Slot,
    max: u32,
) {
    item.redirects += 1;
    if item.redirects > max {
        *result = Some(Err(Error::TooManyRedirects {
            slot,
            count: item.redirects,
        }));
    } else {
        pending.push(i);
    }
}

/// Sends one node's share of a batch as one write (`ASKING` before asked commands, and
/// `WAIT` behind the whole share when `wait` is set: its reply comes back apart).
async fn send_group(
    inner: &Arc<Inner>,
    addr: &NodeAddr,
    group: &[(usize, bool)],
    cmds: &[(Slot, Command)],
    opts: RequestOpts,
    items: bool,
    wait: Option<(u32, Duration)>,
) -> std::result::Result<(Vec<Reply>, Option<Reply>), SendError> {
    let timeout = opts.timeout + wait.map_or(Duration::ZERO, |(_, t)| t);
    // ASKING targets are importing nodes: the map may still call them down or unknown.
    let asking = group.iter().any(|(_, a)| *a);
    if !asking && inner.is_down(addr) {
        // Keep the map fresh while a node is out: that is how a promotion is noticed.
        inner.request_refresh();
        return Err(SendError::NotSent(Error::NodeDown { node: addr.clone() }));
    }
    let node = inner.pool.get(addr);
    let conn = match node.connection(opts.isolated).await {
        Ok(c) => c,
        Err(e) => {
            if e.is_retryable() {
                inner.mark_down(addr);
            }
            return Err(SendError::NotSent(e));
        }
    };
    // The short pieces are gathered in one buffer, with room for all of them up front (a
    // body's long parts are shared, not copied: see `wire.rs`).
    let size: usize = group.iter().map(|(i, _)| cmds[*i].1.short_len()).sum();
    let mut bytes = Wire::with_capacity(size + 32 * group.len());
    let mut replies = group.len();
    for (i, ask) in group {
        if *ask {
            bytes.short().extend_from_slice(b"*1\r\n$6\r\nASKING\r\n");
            replies += 1;
        }
        cmds[*i].1.encode(&mut bytes);
    }
    if let Some((replicas, t)) = wait {
        let cmd = redis::cmd("WAIT")
            .arg(replicas)
            .arg(t.as_millis() as u64)
            .get_packed_command();
        bytes.short().extend_from_slice(&cmd);
        replies += 1;
    }
    match tokio::time::timeout(timeout, conn.exec_replies(bytes, replies, items)).await {
        Err(_) => {
            // Given up on: the connection is reset (see `conn.rs`), so what it still
            // holds unsent never runs later.
            node.reset();
            if !opts.isolated {
                inner.mark_down(addr);
            }
            Err(SendError::MaybeSent(Error::Timeout {
                node: addr.clone(),
                timeout,
            }))
        }
        Ok(Err(b)) => {
            node.reset();
            inner.mark_down(addr);
            Err(SendError::MaybeSent(Error::ConnectionLost {
                node: addr.clone(),
                reason: b.0,
                cause: b.1,
            }))
        }
        Ok(Ok(values)) => {
            // Drop the replies to ASKING (each precedes the command it applies to).
            let mut out = Vec::with_capacity(group.len());
            let mut values = values.into_iter();
            for (_, ask) in group {
                if *ask {
                    values.next();
                }
                out.push(values.next().unwrap_or(Reply::Value(Value::Nil)));
            }
            let waited = wait.and_then(|_| values.next());
            Ok((out, waited))
        }
    }
}
