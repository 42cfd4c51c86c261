//! Sending: one pipeline per node per round, redirects and retries per command.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::join_all;
use redis::{Cmd, RedisResult, Value};

use super::node::Node;
use super::reply::{Outcome, classify};
use super::{Inner, RequestOpts};
use crate::config::{FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE};
use crate::error::{Error, Result};
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
    let mut conn = node.connection().await?;
    match tokio::time::timeout(timeout, conn.send_packed_command(cmd)).await {
        Err(_) => {
            node.reset();
            Err(Error::Timeout {
                node: node.addr.clone(),
                timeout,
            })
        }
        Ok(Err(e)) if e.code().is_none() => {
            node.reset();
            Err(Error::ConnectionLost {
                node: node.addr.clone(),
                reason: e.to_string(),
            })
        }
        Ok(Ok(Value::ServerError(e))) => Ok(Err(e.into())),
        Ok(r) => Ok(r),
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
            Outcome::Busy { code, message } => Err(Error::ClusterUnavailable {
                node: addr.clone(),
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

/// One node's share of a round: its address, `(command index, asked)` pairs, the pipeline.
type NodeWork = (NodeAddr, Vec<(usize, bool)>, redis::Pipeline);

#[derive(Default)]
struct Item {
    ask: Option<NodeAddr>,
    redirects: u32,
}

/// Routes `cmds` by slot and runs them; see [`super::Cluster::batch`].
pub(crate) async fn run_batch(
    inner: &Arc<Inner>,
    mut cmds: Vec<(Slot, Cmd)>,
    opts: RequestOpts,
) -> Vec<Result<Value>> {
    let n = cmds.len();
    let mut results: Vec<Option<Result<Value>>> = (0..n).map(|_| None).collect();
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

        // Move each group's commands into its pipeline.
        let work: Vec<NodeWork> = groups
            .into_iter()
            .map(|(addr, group)| {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for (i, ask) in &group {
                    if *ask {
                        pipe.cmd("ASKING").ignore();
                    }
                    pipe.add_command(std::mem::take(&mut cmds[*i].1));
                }
                (addr, group, pipe)
            })
            .collect();
        let sends = work.into_iter().map(|(addr, group, pipe)| async move {
            let r = send_group(inner, &addr, &group, &pipe, opts.timeout).await;
            (addr, group, pipe, r)
        });
        for (addr, group, pipe, sent) in join_all(sends).await {
            // The group's commands in pipeline order (ASKING skipped), to resend from.
            let restore = |cmds: &mut Vec<(Slot, Cmd)>, i: usize, pos: usize| {
                if let Some(c) = pipe.cmd_iter().filter(|c| !is_asking(c)).nth(pos) {
                    cmds[i].1 = c.clone();
                }
            };
            let replies = match sent {
                Ok(replies) => replies,
                Err(SendError::NotSent(e)) => {
                    for (pos, (i, _)) in group.into_iter().enumerate() {
                        if e.is_retryable() {
                            restore(&mut cmds, i, pos);
                            later.push((i, e.clone()));
                        } else {
                            results[i] = Some(Err(e.clone()));
                        }
                    }
                    continue;
                }
                Err(SendError::MaybeSent(e)) => {
                    for (pos, (i, _)) in group.into_iter().enumerate() {
                        if opts.idempotent {
                            restore(&mut cmds, i, pos);
                            later.push((i, e.clone()));
                        } else {
                            results[i] = Some(Err(e.clone()));
                        }
                    }
                    continue;
                }
            };
            for (pos, ((i, _), reply)) in group.into_iter().zip(replies).enumerate() {
                match classify(&addr, reply) {
                    Outcome::Done(v) => results[i] = Some(Ok(v)),
                    Outcome::Failed(e) => results[i] = Some(Err(e)),
                    Outcome::Moved { slot, to } => {
                        inner.apply_moved(slot, &to);
                        restore(&mut cmds, i, pos);
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
                        items[i].ask = Some(to);
                        restore(&mut cmds, i, pos);
                        redirect(
                            &mut items[i],
                            &mut results[i],
                            &mut pending,
                            i,
                            cmds[i].0,
                            max_redirects,
                        );
                    }
                    Outcome::Busy { code, message } => {
                        inner.counters.busy.fetch_add(1, Ordering::Relaxed);
                        if code == "CLUSTERDOWN" || code == "MASTERDOWN" {
                            inner.request_refresh();
                        }
                        restore(&mut cmds, i, pos);
                        later.push((
                            i,
                            Error::ClusterUnavailable {
                                node: addr.clone(),
                                code,
                                message,
                            },
                        ));
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
        .map(|r| r.expect("every command ends with a result"))
        .collect()
}

fn is_asking(c: &Cmd) -> bool {
    c.args_iter()
        .next()
        .is_some_and(|a| matches!(a, redis::Arg::Simple(b) if b.eq_ignore_ascii_case(b"ASKING")))
}

fn redirect(
    item: &mut Item,
    result: &mut Option<Result<Value>>,
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

/// Sends one node's share of a batch as one pipeline (`ASKING` before asked commands).
async fn send_group(
    inner: &Arc<Inner>,
    addr: &NodeAddr,
    group: &[(usize, bool)],
    pipe: &redis::Pipeline,
    timeout: Duration,
) -> std::result::Result<Vec<RedisResult<Value>>, SendError> {
    // ASKING targets are importing nodes: the map may still call them down or unknown.
    let asking = group.iter().any(|(_, a)| *a);
    if !asking && inner.is_down(addr) {
        // Keep the map fresh while a node is out: that is how a promotion is noticed.
        inner.request_refresh();
        return Err(SendError::NotSent(Error::NodeDown { node: addr.clone() }));
    }
    let node = inner.pool.get(addr);
    let mut conn = match node.connection().await {
        Ok(c) => c,
        Err(e) => {
            if e.is_retryable() {
                inner.mark_down(addr);
            }
            return Err(SendError::NotSent(e));
        }
    };
    match tokio::time::timeout(
        timeout,
        pipe.query_async::<Vec<RedisResult<Value>>>(&mut conn),
    )
    .await
    {
        Err(_) => {
            inner.mark_down(addr);
            Err(SendError::MaybeSent(Error::Timeout {
                node: addr.clone(),
                timeout,
            }))
        }
        Ok(Err(e)) => {
            node.reset();
            inner.mark_down(addr);
            Err(SendError::MaybeSent(Error::ConnectionLost {
                node: addr.clone(),
                reason: e.to_string(),
            }))
        }
        Ok(Ok(replies)) if replies.len() == group.len() => Ok(replies),
        Ok(Ok(replies)) => Err(SendError::MaybeSent(Error::Protocol(format!(
            "{addr}: {} replies for {} commands",
            replies.len(),
            group.len()
        )))),
    }
}
