//! Pops of an at-most-once queue confirmed by a replica before their messages are handed
//! out, so that a failover never hands them out a second time.
//!
//! A pop removes messages on one master. If that master loses its slots (a failover, a
//! partition that leaves it in the minority) before its replica has the pop, the promoted
//! replica still holds the messages and hands them out again. So each round's pipeline to
//! a master that the slot map shows with a live replica ends with `WAIT 1 t` (see
//! `route::run_batch_confirmed`; blocking waits send it behind `BLMPOP`). The messages of
//! a pop no replica confirmed are not handed out: they are pushed back to the head of
//! their list on the node that popped them, never on another one (a redirect is not
//! followed), and then:
//! - that node stays master: the replica gets the pop and the push-back, in that order;
//!   the messages are there once and are delivered later;
//! - its replica takes over without the pop: it holds the messages; the push-back dies with
//!   the old master's unreplicated writes;
//! - the replica got the pop but not the push-back, and takes over: the messages are lost
//!   (at most once: never twice);
//! - the push-back fails (the node is gone, or answers MOVED: the new master may hold the
//!   messages): lost, counted in [`UNCONFIRMED_LOST`](crate::telemetry::UNCONFIRMED_LOST).

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use redis::Value;

use super::round::Ask;
use crate::cluster::{Cluster, Reply, Served};
use crate::error::{Error, Result};
use crate::topology::NodeAddr;

/// How many replicas must confirm a pop, and how long the pop waits for them, unless the
/// consumer hands out unconfirmed pops (see
/// [`ConsumerBuilder::unconfirmed_pops`](super::ConsumerBuilder::unconfirmed_pops)).
pub(super) const DEFAULT_CONFIRM: (u32, Duration) = (1, Duration::from_millis(500));

/// The replies of a confirmed round, with the messages of unconfirmed pops pushed back
/// where they were popped (each such reply becomes an empty one).
pub(super) async fn withhold_unconfirmed(
    cluster: &Cluster,
    asks: &[Ask],
    replies: Vec<(Result<Reply>, Option<Served>)>,
) -> Vec<Result<Reply>> {
    let mut out = Vec::with_capacity(replies.len());
    let mut backs = Vec::new();
    for (ask, (reply, served)) in asks.iter().zip(replies) {
        match (reply, served) {
            (Ok(reply), Some(s)) if !s.confirmed => {
                // Back to the level it came from (queues with priorities).
                let popped = match reply {
                    Reply::Value(v) if ask.keys.levels.is_some() => crate::priority::split_mpop(v),
                    reply => {
                        payloads(reply).map(|items| (crate::priority::Priority::Normal, items))
                    }
                };
                match popped {
                    Ok((_, items)) if items.is_empty() => out.push(Ok(Reply::Value(Value::Nil))),
                    Ok((level, items)) => {
                        let key = ask.keys.level_key(level).to_string();
                        backs.push(push_back(cluster, s.node, key, items));
                        out.push(Ok(Reply::Value(Value::Nil)));
                    }
                    Err(e) => out.push(Err(e)),
                }
            }
            (reply, _) => out.push(reply),
        }
    }
    // Awaited before the round ends: a member's next pop of the shard comes after.
    join_all(backs).await;
    out
}

/// Pushes the messages of an unconfirmed pop back to the head of `key` on `node`, in
/// their order; counts them lost when that fails.
pub(super) async fn push_back(
    cluster: &Cluster,
    node: NodeAddr,
    key: impl AsRef<str>,
    items: Vec<Bytes>,
) {
    let key = key.as_ref();
    let n = items.len() as u64;
    metrics::counter!(crate::telemetry::POPS_UNCONFIRMED).increment(n);
    let mut cmd = redis::cmd("LPUSH");
    cmd.arg(key);
    for p in items.iter().rev() {
        cmd.arg(p.as_ref());
    }
    match cluster.node_query::<Value>(&node, &cmd).await {
        Ok(_) => {
            tracing::info!(node = %node, key, count = n, "pop not confirmed by a replica: messages pushed back");
        }
        Err(e) => {
            metrics::counter!(crate::telemetry::UNCONFIRMED_LOST).increment(n);
            tracing::warn!(
                node = %node, key, count = n, cause = %e,
                "pop not confirmed by a replica and not pushed back: its messages are lost (at-most-once)"
            );
        }
    }
}

/// Whether a `WAIT` reply says `want` replicas confirmed.
pub(super) fn confirmed(reply: &Value, want: u32) -> bool {
    matches!(reply, Value::Int(n) if *n >= i64::from(want))
}

/// The payloads of an `LPOP key count` reply.
fn payloads(reply: Reply) -> Result<Vec<Bytes>> {
    match reply {
        Reply::Items(items) => Ok(items.into_vec()),
        Reply::Value(Value::Nil) => Ok(Vec::new()),
        Reply::Value(Value::Array(items)) => items
            .into_iter()
            .map(|i| match i {
                Value::BulkString(b) => Ok(Bytes::from(b)),
                other => Err(Error::Protocol(format!("pop: unexpected item {other:?}"))),
            })
            .collect(),
        Reply::Value(other) => Err(Error::Protocol(format!("pop: unexpected reply {other:?}"))),
    }
}
