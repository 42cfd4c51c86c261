//! At-least-once delivery: the message envelope, leases, settling (ack / nack), lease
//! extension, and dead letters.
//!
//! Reliable queues store **frames** in their ready lists: one list element per producer
//! batch, holding many envelopes. Redis then does per-batch work (one `RPUSH` element, one
//! `LPOP`, one lease) instead of per-message work in Lua, which is what makes leasing
//! nearly as cheap as a plain pop. A frame is `0xA5 0x02`, a u16 big-endian message count,
//! and a msgpack array of envelopes.
//!
//! A reliable pop (`lua/lease_pop.lua`) moves whole frames (at least N messages' worth)
//! from a shard's ready list into one lease with a deadline taken from the server's clock; the same script first
//! returns the messages of expired leases to the ready list (or to the dead letters after
//! `max_attempts` deliveries) and releases delayed messages that are due, so every consumer
//! that pops also reaps — no separate reaper process, and no lock, since each script runs
//! atomically. Settling (`lua/settle.lua`) marks positions of a lease in a bitmap; when every
//! position is settled the lease is deleted. Every step is O(1) or O(log n) per message
//! (hash and sorted-set operations); nothing scans a list.
//!
//! Envelope (the bytes stored in the lists, so that other languages can interoperate):
//!
//! | bytes | field |
//! |---|---|
//! | 0..2 | magic `0xA5 0x01` (format 1) |
//! | 2..18 | message id, 16 bytes, stable across redeliveries |
//! | 18..20 | deliveries before the current one, u16 big-endian |
//! | 20..28 | enqueue time, ms since the Unix epoch (producer clock), u64 big-endian |
//! | 28.. | payload |

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;

mod codec;
mod dead;
mod ext;
mod pop;

pub use codec::{
    ENVELOPE_HEADER, ENVELOPE_MAGIC, Envelope, FRAME_HEAD_LEN, FRAME_HEAD_MAGIC, FRAME_MAGIC,
    FrameHead, MAX_FRAME, MessageId, decode_envelope, decode_frame, decode_frame_head,
    encode_envelope, encode_envelope_at, encode_frame, frame_head, now_ms,
};
pub(crate) use codec::{
    envelope_header, for_each_envelope, frame_head_of, frame_start, frames_of_lease, push_envelope,
};
pub use dead::{DEAD_MAGIC, DeadReason, DeadRecord, MAX_DEAD_DETAIL, decode_dead};
pub(crate) use dead::{clip_detail, dead_id};
pub use ext::EXT_ENVELOPE_MAGIC;
pub(crate) use ext::push_envelope_ext;
pub(crate) use pop::{
    AfterWait, LeaseAsk, LeaseTerms, Leasing, lease_many, lease_packed, read_packed,
};

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::placement::shard_key;
use crate::script::{Call, Script};
use crate::slot::{Slot, tag_slot};

/// Lease length of a reliable pop, by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Most expired leases (and most due delayed messages) one pop returns to the ready list.
pub const REAP_LIMIT: usize = 100;

/// The member, field or list head that keeps a reliable shard's keys in existence (see
/// `lua/lease_pop.lua`): in a slot being migrated, Redis runs a multi-key script only when
/// all of its keys exist on the node or none do.
pub const KEEP: &[u8] = b"~";

/// The name of a lease: 128 random bits chosen by the consumer that takes it, so that no two
/// leases share a name, not even across a failover that lost the last writes of a master
/// (a counter kept in Redis would be rolled back and hand out the same names again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub u128);

impl LeaseId {
    /// A new random lease id.
    pub fn random() -> LeaseId {
        LeaseId(rand::random::<u128>())
    }
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The Lua scripts of reliable delivery.
pub(crate) struct LeaseScripts {
    pub(crate) pop: Script,
    pub(crate) settle: Script,
    pub(crate) extend: Script,
    pub(crate) replay: Script,
    pub(crate) inflight: Script,
    pub(crate) keep: Script,
    /// Ordered groups on at-most-once queues: a pop behind the shard's fence.
    pub(crate) fenced_pop: Script,
}

impl LeaseScripts {
    pub(crate) fn new() -> Self {
        LeaseScripts {
            pop: Script::new(concat!(
                include_str!("../lua/frames.lua"),
                include_str!("../lua/lease_pop.lua")
            )),
            settle: Script::new(concat!(
                include_str!("../lua/frames.lua"),
                include_str!("../lua/settle.lua")
            )),
            extend: Script::new(include_str!("../lua/extend.lua")),
            replay: Script::new(concat!(
                include_str!("../lua/frames.lua"),
                include_str!("../lua/replay_dead.lua")
            )),
            inflight: Script::new(include_str!("../lua/inflight_count.lua")),
            keep: Script::new(concat!(
                include_str!("../lua/frames.lua"),
                include_str!("../lua/keep.lua")
            )),
            fenced_pop: Script::new(include_str!("../lua/fenced_pop.lua")),
        }
    }
}

/// The keys of one shard.
#[derive(Debug, Clone)]
pub(crate) struct ShardKeys {
    pub(crate) tag: Arc<str>,
    pub(crate) slot: Slot,
    pub(crate) ready: String,
    pub(crate) leases: String,
    pub(crate) inflight: String,
    pub(crate) acks: String,
    pub(crate) delayed: String,
    pub(crate) dead: String,
    /// Messages in the ready list (frames hold many; producers and scripts keep it).
    pub(crate) count: String,
    /// What every lease's list is named by, the lease id after it.
    pub(crate) lease_prefix: String,
    /// At-most-once shards: ordered groups' fences (`lua/fenced_pop.lua`). At-least-once
    /// shards keep theirs in `acks`, a key that always exists.
    pub(crate) fence: String,
    /// At-most-once shards: what a fenced pop's own list is named by, a random id after it.
    pub(crate) take_prefix: String,
    /// Queues with priorities: the high and low ready lists (`ready` is normal); see
    /// `crate::priority`.
    pub(crate) levels: Option<Box<[String; 2]>>,
}

impl ShardKeys {
    pub(crate) fn new(prefix: &str, tag: &str) -> Self {
        let k = |kind| shard_key(prefix, tag, kind);
        ShardKeys {
            tag: Arc::from(tag),
            slot: tag_slot(tag),
            ready: k("ready"),
            leases: k("leases"),
            inflight: k("inflight"),
            acks: k("acks"),
            delayed: k("delayed"),
            dead: k("dead"),
            count: k("count"),
            lease_prefix: k("lease:"),
            fence: k("fence"),
            take_prefix: k("take:"),
            levels: None,
        }
    }

    /// The keys of a shard of a queue with priorities.
    pub(crate) fn with_levels(mut self, prefix: &str) -> Self {
        use crate::priority::Priority;
        self.levels = Some(Box::new([
            Priority::High.ready_key(prefix, &self.tag),
            Priority::Low.ready_key(prefix, &self.tag),
        ]));
        self
    }

    /// The ready list of a level (normal when the queue has no priorities).
    pub(crate) fn level_key(&self, level: crate::priority::Priority) -> &str {
        use crate::priority::Priority;
        match (&self.levels, level) {
            (Some(l), Priority::High) => &l[0],
            (Some(l), Priority::Low) => &l[1],
            _ => &self.ready,
        }
    }

    /// The pop of up to `count` messages: `LPOP`, or with priorities `LMPOP` over the
    /// levels from high down to `upto`, highest first.
    pub(crate) fn pop_cmd(&self, count: usize, upto: crate::priority::Priority) -> redis::Cmd {
        use crate::priority::Priority;
        match &self.levels {
            None => redis::cmd("LPOP").arg(&self.ready).arg(count).clone(),
            Some(l) => {
                let keys: &[&str] = match upto {
                    Priority::High => &[&l[0]],
                    Priority::Normal => &[&l[0], &self.ready],
                    Priority::Low => &[&l[0], &self.ready, &l[1]],
                };
                let mut cmd = redis::cmd("LMPOP");
                cmd.arg(keys.len());
                for k in keys {
                    cmd.arg(*k);
                }
                cmd.arg("LEFT").arg("COUNT").arg(count);
                cmd
            }
        }
    }

    /// The keys `settle.lua` declares: the lease's three, and for messages that go back
    /// (nack, release) also the ready list, delayed set, dead letters and count; last, the
    /// lease's list when it has one (`None`: stored in place). Acks declare only the
    /// lease's keys, which exist while the lease does (see `KEEP`).
    fn settle_keys(&self, list: Option<LeaseId>, returns_messages: bool) -> Vec<String> {
        let mut keys = vec![
            self.leases.clone(),
            self.inflight.clone(),
            self.acks.clone(),
        ];
        if returns_messages {
            keys.extend([
                self.ready.clone(),
                self.delayed.clone(),
                self.dead.clone(),
                self.count.clone(),
            ]);
        }
        keys.extend(list.map(|id| self.lease_list(id)));
        keys
    }

    fn settle_call<'a>(
        &self,
        scripts: &'a LeaseScripts,
        lease: &Lease,
        how: &Settle,
        positions: &[u32],
    ) -> Call<'a> {
        let (mode, delay) = match how {
            // The whole lease at once (the usual batch ack) needs no positions.
            Settle::Ack if distinct(positions) == lease.count => ("ackall", 0),
            Settle::Ack => ("ack", 0),
            Settle::Nack(d, _) => ("nack", d.as_millis() as u64),
            // A nack that every message's attempt count exceeds.
            Settle::Dead(..) => ("nack", 0),
            Settle::Release => ("release", 0),
        };
        let max_attempts = match how {
            Settle::Dead(..) => 0,
            _ => lease.max_attempts,
        };
        let (reason, detail) = match how {
            Settle::Dead(r, d) => (*r, &**d),
            Settle::Nack(_, d) => (DeadReason::Failed, &**d),
            _ => (DeadReason::Failed, ""),
        };
        let mut args = vec![
            lease.id.to_string().into_bytes(),
            mode.as_bytes().to_vec(),
            delay.to_string().into_bytes(),
            max_attempts.to_string().into_bytes(),
            lease.count.to_string().into_bytes(),
            reason.code().to_string().into_bytes(),
            clip_detail(detail).as_bytes().to_vec(),
        ];
        if mode != "ackall" {
            for (first, last) in ranges(positions) {
                args.push(first.to_string().into_bytes());
                args.push(last.to_string().into_bytes());
            }
        }
        let list = lease.in_list.then_some(lease.id);
        let keys = self.settle_keys(
            list,
            matches!(how, Settle::Nack(..) | Settle::Dead(..) | Settle::Release),
        );
        Call {
            slot: self.slot,
            script: &scripts.settle,
            keys,
            args,
        }
    }
}

/// One lease: a batch of messages popped together, settled one by one.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) cluster: Cluster,
    pub(crate) scripts: Arc<LeaseScripts>,
    pub(crate) keys: Arc<ShardKeys>,
    pub(crate) id: LeaseId,
    pub(crate) deadline_ms: i64,
    /// The deadline on this process's clock (estimated from the pop's send time), moved
    /// by every extension: an ordered member lets a shard go only once its handed-out
    /// leases are settled or past this (`group.rs`), so it must follow `extend`.
    pub(crate) local_deadline: LocalDeadline,
    pub(crate) max_attempts: u32,
    /// Messages in the lease.
    pub(crate) count: usize,
    /// Its frames are in a list of its own (else in the shard's inflight hash: a lease taken
    /// while its slot was being migrated, see `pop`).
    pub(crate) in_list: bool,
    /// Every message of it settled (or the lease was gone): nothing of it is open.
    pub(crate) closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for LeaseScripts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseScripts")
    }
}

/// A lease's deadline on this process's clock; only ever moved later.
#[derive(Debug)]
pub(crate) struct LocalDeadline(std::sync::Mutex<std::time::Instant>);

impl LocalDeadline {
    pub(crate) fn new(at: std::time::Instant) -> LocalDeadline {
        LocalDeadline(std::sync::Mutex::new(at))
    }

    /// The deadline now.
    pub(crate) fn get(&self) -> std::time::Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the deadline to `at` if that is later.
    pub(crate) fn extend_to(&self, at: std::time::Instant) {
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if at > *d {
            *d = at;
        }
    }
}

/// A message's place in its lease.
#[derive(Debug, Clone)]
pub(crate) struct LeaseRef {
    pub(crate) lease: Arc<Lease>,
    /// 1-based position in the lease.
    pub(crate) position: u32,
}

/// How to settle a message.
#[derive(Debug, Clone)]
pub(crate) enum Settle {
    Ack,
    /// Requeued after the delay, or dead-lettered (reason `failed`, with the detail) once
    /// its attempts are used up.
    Nack(Duration, Arc<str>),
    /// Straight to the dead letters, whatever attempts are left, with this reason and detail.
    Dead(DeadReason, Arc<str>),
    /// Back to the head of the ready list, not counted as a delivery (never handed out).
    Release,
}

/// What settling a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Done: acknowledged (removed), or negatively acknowledged (requeued or dead-lettered).
    Done,
    /// Settled before (by an earlier ack or nack of the same delivery): nothing changed.
    AlreadySettled,
    /// The lease no longer exists: it expired (the message was or will be delivered again)
    /// or every message of it was settled already. This settle changed nothing.
    LeaseGone,
}

/// Totals of a batched settle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettleReport {
    /// Messages settled now.
    pub settled: usize,
    /// Messages whose lease had expired (they will be delivered again).
    pub expired: usize,
    /// Messages sent to the dead letters by this nack.
    pub dead_lettered: usize,
}

/// Settles many messages: one script call per lease, pipelined per node.
pub(crate) async fn settle_many(refs: &[&LeaseRef], how: Settle) -> Result<SettleReport> {
    let Some(first) = refs.first() else {
        return Ok(SettleReport::default());
    };
    // Group positions by lease, keeping the first-seen order.
    let mut groups: Vec<(Arc<Lease>, Vec<u32>)> = Vec::new();
    for r in refs {
        match groups.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &r.lease)) {
            Some((_, ps)) => ps.push(r.position),
            None => groups.push((r.lease.clone(), vec![r.position])),
        }
    }
    let scripts = first.lease.scripts.clone();
    let calls: Vec<Call<'_>> = groups
        .iter()
        .map(|(l, ps)| l.keys.settle_call(&scripts, l, &how, ps))
        .collect();
    let cluster = &first.lease.cluster;
    let results = crate::script::run_batch(cluster, &calls, cluster.default_opts()).await;
    let mut report = SettleReport::default();
    let kind = match how {
        Settle::Ack => "ack",
        Settle::Nack(..) => "nack",
        Settle::Dead(..) => "dead",
        Settle::Release => "release",
    };
    for ((l, ps), r) in groups.iter().zip(results) {
        let v = ints(r?)?;
        if matches!(v.as_slice(), [-1, ..] | [_, 1, _]) {
            l.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        match v.as_slice() {
            [-1, ..] => report.expired += ps.len(),
            [-2, n, _] => {
                return Err(Error::Protocol(format!(
                    "settle: lease {} holds {n} messages, not the {} this consumer took",
                    l.id, l.count
                )));
            }
            [n, _, dead] => {
                report.settled += *n as usize;
                report.dead_lettered += *dead as usize;
            }
            other => {
                return Err(Error::Protocol(format!(
                    "settle: unexpected reply {other:?}"
                )));
            }
        }
    }
    metrics::counter!(crate::telemetry::SETTLED, "kind" => kind).increment(report.settled as u64);
    Ok(report)
}

/// Gives back a whole lease whose pop reply never arrived (a timeout or a lost connection):
/// none of its messages was handed out, so none counts as a delivery. Returns whether the
/// lease was found; `false` when the pop has not run (it may still be queued: a tombstone
/// makes it lease nothing when it does) or its lease expired already.
pub(crate) async fn release_lost(
    cluster: &Cluster,
    scripts: &LeaseScripts,
    keys: &ShardKeys,
    id: LeaseId,
) -> Result<bool> {
    let call = Call {
        slot: keys.slot,
        script: &scripts.settle,
        // Whether the lease got a list is not known: the script looks in both places.
        keys: keys.settle_keys(Some(id), true),
        args: vec![
            id.to_string().into_bytes(),
            b"releaseall".to_vec(),
            b"0".to_vec(),
            b"0".to_vec(),
            b"-1".to_vec(),
            b"0".to_vec(),
            Vec::new(),
        ],
    };
    let mut out = crate::script::run_batch(cluster, &[call], cluster.default_opts()).await;
    let v = ints(out.pop().expect("one reply")?)?;
    Ok(v.first().is_some_and(|&n| n >= 0))
}

/// Gives every key of these reliable shards but the ready lists their KEEP entry (see
/// `lua/keep.lua`), one script call per shard, pipelined per node. Failures are logged:
/// the next reliable pop on the shard does the same.
pub(crate) async fn keep_shards(cluster: &Cluster, scripts: &LeaseScripts, keys: &[ShardKeys]) {
    let calls: Vec<Call<'_>> = keys
        .iter()
        .map(|k| Call {
            slot: k.slot,
            script: &scripts.keep,
            keys: vec![
                k.leases.clone(),
                k.inflight.clone(),
                k.acks.clone(),
                k.delayed.clone(),
                k.dead.clone(),
                k.count.clone(),
            ],
            args: Vec::new(),
        })
        .collect();
    for (k, r) in keys
        .iter()
        .zip(crate::script::run_batch(cluster, &calls, cluster.default_opts()).await)
    {
        if let Err(e) = r {
            tracing::warn!(shard = %k.tag, cause = %e, "could not prepare the shard's keys");
        }
    }
}

/// Settles one message.
pub(crate) async fn settle_one(r: &LeaseRef, how: Settle) -> Result<Settled> {
    let report = settle_many(&[r], how).await?;
    Ok(if report.expired > 0 {
        Settled::LeaseGone
    } else if report.settled > 0 {
        Settled::Done
    } else {
        Settled::AlreadySettled
    })
}

/// Extends a lease by `by` from now; `None` when it already expired.
pub(crate) async fn extend(r: &LeaseRef, by: Duration) -> Result<Option<SystemTime>> {
    let l = &r.lease;
    let call = Call {
        slot: l.keys.slot,
        script: &l.scripts.extend,
        keys: vec![l.keys.leases.clone()],
        args: vec![
            l.id.to_string().into_bytes(),
            (by.as_millis().max(1) as u64).to_string().into_bytes(),
        ],
    };
    // The new deadline on this clock, conservatively from before the call.
    let sent = std::time::Instant::now();
    let mut out = crate::script::run_batch(&l.cluster, &[call], l.cluster.default_opts()).await;
    match out.pop().expect("one reply")? {
        Value::Int(-1) => Ok(None),
        Value::Int(ms) => {
            l.local_deadline.extend_to(sent + by);
            Ok(Some(UNIX_EPOCH + Duration::from_millis(ms as u64)))
        }
        other => Err(Error::Protocol(format!(
            "extend: unexpected reply {other:?}"
        ))),
    }
}

/// Positions as sorted, merged inclusive ranges (what the settle script takes).
fn ranges(ps: &[u32]) -> Vec<(u32, u32)> {
    let mut v = ps.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for p in v {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == p => *last = p,
            _ => out.push((p, p)),
        }
    }
    out
}

fn distinct(ps: &[u32]) -> usize {
    let mut v = ps.to_vec();
    v.sort_unstable();
    v.dedup();
    v.len()
}

fn ints(v: Value) -> Result<Vec<i64>> {
    redis::from_redis_value(v).map_err(|e| Error::Protocol(format!("expected integers: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_become_ranges() {
        assert_eq!(
            ranges(&[5, 1, 2, 3, 9, 10, 3]),
            vec![(1, 3), (5, 5), (9, 10)]
        );
        assert!(ranges(&[]).is_empty());
    }
}
