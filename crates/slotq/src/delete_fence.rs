//! The fences a delete leaves in each shard, so that a writer that has not noticed the
//! delete is refused by the server, not by a timer.
//!
//! A producer looks at the registry at most once a registry poll; one stalled (SIGSTOP, a
//! long GC pause, a slow network) between its look and its push used to write into keys a
//! delete had just removed: its send succeeded, and the messages sat in a queue that no
//! longer existed (or were taken by a queue created again under the same name). Now, before
//! a shard's keys go, the delete replaces the keys every write creates — the ready list,
//! the ready count, the scheduled set, the lists of priority levels — with a *fence*: a string `~deleted:<ms>` that
//! expires after [`DELETE_FENCE_TTL`]. Every write to them (`RPUSH`, `INCRBY`, `ZADD`, in
//! a script or not) then fails with `WRONGTYPE` inside Redis, so nothing is stored, at no
//! cost to the writes of a live queue (no check is added to the push path).
//!
//! A writer that meets a fence asks the registry: gone or being deleted, and the send
//! fails with [`Error::QueueNotFound`]; created again meanwhile (a new incarnation), and
//! the writer lifts the shard's fences and sends again — into the new queue, never into
//! keys being deleted. A queue that is created lifts the fences of its shards at once, so
//! its consumers do not meet them.

use std::time::Duration;

use redis::Value;

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::placement::{Shard, ready_key, shard_key};
use crate::priority::Priority;

/// How long a deleted shard's fences stay: longer than any writer should stall.
pub const DELETE_FENCE_TTL: Duration = Duration::from_secs(3600);

/// What a fence holds (then the delete's time in ms).
pub const FENCE_MARK: &str = "~deleted:";

const SET_FENCES: &str = "for _, k in ipairs(KEYS) do \
                            redis.call('SET', k, ARGV[1], 'PX', ARGV[2]) \
                          end; return #KEYS";

const LIFT_FENCES: &str = "local n = 0; \
     for _, k in ipairs(KEYS) do \
       if redis.call('TYPE', k).ok == 'string' then \
         local v = redis.call('GET', k); \
         if string.sub(v, 1, #ARGV[1]) == ARGV[1] then redis.call('DEL', k); n = n + 1 end \
       end \
     end; return n";

/// The keys of a shard that a write can create, fenced by a delete.
pub(crate) fn fenced_keys(prefix: &str, tag: &str) -> Vec<String> {
    vec![
        ready_key(prefix, tag),
        shard_key(prefix, tag, "count"),
        shard_key(prefix, tag, "sched"),
        Priority::High.ready_key(prefix, tag),
        Priority::Low.ready_key(prefix, tag),
    ]
}

/// Fences one shard (its ready list, count and schedule are replaced: a delete removes
/// them anyway); returns the keys fenced.
pub(crate) async fn set(cluster: &Cluster, prefix: &str, shard: &Shard) -> Result<Vec<String>> {
    let keys = fenced_keys(prefix, &shard.tag);
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(SET_FENCES).arg(keys.len());
    for k in &keys {
        cmd.arg(k);
    }
    cmd.arg(format!("{FENCE_MARK}{}", crate::lease::now_ms()))
        .arg(DELETE_FENCE_TTL.as_millis() as u64);
    let _: Value = cluster.query(shard.slot, &cmd).await?;
    Ok(keys)
}

/// Lifts the fences of these shards (a queue created again), one script per shard, all at
/// once; how many fences were lifted.
pub(crate) async fn lift(cluster: &Cluster, prefix: &str, shards: &[Shard]) -> Result<usize> {
    let cmds = shards
        .iter()
        .map(|s| {
            let keys = fenced_keys(prefix, &s.tag);
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(LIFT_FENCES).arg(keys.len());
            for k in &keys {
                cmd.arg(k);
            }
            cmd.arg(FENCE_MARK);
            (s.slot, cmd)
        })
        .collect();
    let opts = crate::cluster::RequestOpts {
        idempotent: true,
        ..cluster.default_opts()
    };
    let mut lifted = 0;
    for r in cluster.batch(cmds, opts).await {
        match r? {
            Value::Int(n) => lifted += n.max(0) as usize,
            other => {
                return Err(Error::Protocol(format!(
                    "lifting fences: unexpected reply {other:?}"
                )));
            }
        }
    }
    Ok(lifted)
}

/// Whether an error is a write refused by a fence (or any `WRONGTYPE` on a shard key,
/// which only a fence can cause: slotq never makes those keys of another type).
pub(crate) fn is_fence(e: &Error) -> bool {
    matches!(
        e,
        Error::Server {
            kind: crate::server_error::ServerErrorKind::WrongType,
            ..
        }
    ) || matches!(e, Error::Server { message, .. } if message.contains("WRONGTYPE"))
}

impl crate::queue::Queue {
    /// After a write to shard `tag` met a delete's fence: whether the queue exists again
    /// with that shard (then the fences of its shards are lifted, and the write may be sent
    /// again); `false` when it is gone, still being deleted, or no longer has that shard
    /// (this client's users then get [`Error::QueueNotFound`]).
    pub(crate) async fn recreated_after_fence(&self, tag: &str) -> Result<bool> {
        match self.registry_now().await? {
            Some(set) if set.shards.iter().any(|s| s.tag == tag) => {
                lift(self.cluster(), self.prefix(), &set.shards).await?;
                Ok(true)
            }
            _ => {
                self.inner_deleted();
                Ok(false)
            }
        }
    }
}
