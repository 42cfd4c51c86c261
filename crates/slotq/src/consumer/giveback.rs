//! Giving back what a consumer took but did not hand out: plain messages to the head of
//! their shard (`LPUSH`, order kept), leased ones released through their lease (no
//! delivery counted), newest lease first so that the oldest ends up first.

use std::sync::Arc;

use bytes::Bytes;
use redis::Value;

use super::Message;
use crate::cluster::Cluster;
use crate::error::Result;
use crate::lease::{self, LeaseRef, Settle};
use crate::priority::Priority;
use crate::slot::Slot;

pub(super) async fn return_messages(cluster: &Cluster, prefix: &str, left: Vec<Message>) {
    // Leased messages go back through their lease (so the lease ends with them).
    let (leased, plain): (Vec<Message>, Vec<Message>) =
        left.into_iter().partition(|m| m.lease.is_some());
    if !leased.is_empty() {
        // Newest lease first: each goes back to the head of its shard, so the oldest must
        // go last to end up first, where it was.
        let refs: Vec<&LeaseRef> = leased
            .iter()
            .rev()
            .filter_map(|m| m.lease.as_ref())
            .collect();
        if let Err(e) = lease::settle_many(&refs, Settle::Release).await {
            tracing::warn!(cause = %e, "could not return leased messages; they return when their lease expires");
        }
    }
    for (shard, result) in plain_to_head(cluster, prefix, &plain).await {
        if let Err(e) = result {
            tracing::error!(%shard, cause = %e, "could not return popped messages");
        }
    }
}

/// Pushes plain (at-most-once) messages back to the head of their shards, in their order,
/// one `LPUSH` per shard; the outcome per shard.
pub(super) async fn plain_to_head(
    cluster: &Cluster,
    prefix: &str,
    msgs: &[Message],
) -> Vec<(Arc<str>, Result<usize>)> {
    // By shard and level (queues with priorities: each goes back to its level's list);
    // the element as popped, extension included.
    let mut by_list: Vec<(Arc<str>, Priority, Vec<Bytes>)> = Vec::new();
    for m in msgs {
        match by_list
            .iter_mut()
            .find(|(t, l, _)| *t == m.shard && *l == m.level)
        {
            Some((_, _, v)) => v.push(m.element()),
            None => by_list.push((m.shard.clone(), m.level, vec![m.element()])),
        }
    }
    let mut out: Vec<(Arc<str>, Result<usize>)> = Vec::with_capacity(by_list.len());
    for (tag, level, payloads) in by_list {
        let n = payloads.len();
        let key = level.ready_key(prefix, &tag);
        let r = push_to_head(cluster, crate::slot::tag_slot(&tag), &key, payloads).await;
        match (out.iter_mut().find(|(t, _)| *t == tag), r) {
            (Some((_, Ok(total))), Ok(())) => *total += n,
            (Some((_, outcome)), Err(e)) => *outcome = Err(e),
            (Some(_), Ok(())) => {}
            (None, r) => out.push((tag, r.map(|()| n))),
        }
    }
    out
}

/// Pushes popped payloads back to the head of their list, first one first.
pub(super) async fn give_back(cluster: &Cluster, slot: Slot, key: &str, payloads: Vec<Bytes>) {
    let n = payloads.len();
    if let Err(e) = push_to_head(cluster, slot, key, payloads).await {
        tracing::error!(key, count = n, cause = %e, "could not return popped messages");
    }
}

/// Pushes payloads to the head of their list, first one first (`LPUSH`, reversed).
pub(super) async fn push_to_head(
    cluster: &Cluster,
    slot: Slot,
    key: &str,
    payloads: Vec<Bytes>,
) -> Result<()> {
    if payloads.is_empty() {
        return Ok(());
    }
    let mut cmd = redis::cmd("LPUSH");
    cmd.arg(key);
    for p in payloads.iter().rev() {
        cmd.arg(p.as_ref());
    }
    cluster.query::<Value>(slot, &cmd).await.map(|_| ())
}
