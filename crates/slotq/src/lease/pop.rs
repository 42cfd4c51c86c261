//! Taking leases: the lease script on each shard asked, and the lease's list read right
//! behind it.
//!
//! The script (`lua/lease_pop.lua`) moves whole frames from the ready list into a list of
//! the lease's own (`SORT ... STORE`, chosen from the frames' heads) and answers with counts
//! only; the frames reach the client through an `LRANGE` of that list sent in the same
//! write. The frame bytes never enter Lua, where every string is hashed byte by byte on
//! arrival: that hashing, for frames read and written back by the script, was most of what
//! a lease cost (`perf`: a quarter of the machine in one Lua loop).
//!
//! A slot being migrated serves a script only when every key it names exists on the node,
//! and a lease's list never exists before its lease: there the script answers TRYAGAIN, and
//! the lease is taken again *in place*: frames read by the script, stored in the shard's
//! inflight hash and returned in its reply (slower, but served while the slot moves).

use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use super::{LeaseId, LeaseScripts, REAP_LIMIT, ShardKeys};
use crate::cluster::{Cluster, Reply, RequestOpts};
use crate::error::{Error, Result};
use crate::script::Call;
use crate::server_error::{RetryMethod, ServerErrorKind};

/// What one shard's lease call brought.
#[derive(Debug)]
pub(crate) enum Leasing {
    /// The shard had nothing to lease.
    Nothing {
        /// The shard's ready list is known to be empty now (else: not known).
        drained: bool,
    },
    /// A lease and its frames (with the heads they had in the list, for the caller to skip).
    Leased {
        deadline_ms: i64,
        /// Messages in the lease.
        count: usize,
        /// Heads and frames, each a slice of the buffer it was read into.
        items: Vec<Bytes>,
        /// Stored in a list of its own (else in place, in the inflight hash).
        in_list: bool,
        /// The lease took all the shard held.
        drained: bool,
    },
    /// The lease was made, but its list could not be read: nothing of it reaches the
    /// consumer, so it is to be released by name.
    Unread(Error),
}

/// One shard asked for a lease.
pub(crate) struct LeaseAsk<'a> {
    pub(crate) keys: &'a ShardKeys,
    pub(crate) count: usize,
    pub(crate) id: LeaseId,
    /// Members of ordered groups: the group and the epoch of the member's grant of the
    /// shard, checked against the shard's fence by the script.
    pub(crate) fence: Option<(&'a str, u64)>,
}

/// How leases are taken.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseTerms {
    pub(crate) lease: Duration,
    pub(crate) max_attempts: u32,
    /// Most payload bytes one lease takes (at least one frame is taken).
    pub(crate) max_bytes: usize,
}

impl ShardKeys {
    /// The name of a lease's list: `prefix:{tag}:lease:<id>`.
    pub(crate) fn lease_list(&self, id: LeaseId) -> String {
        format!("{}{id}", self.lease_prefix)
    }

    fn pop_call<'a>(
        &self,
        scripts: &'a LeaseScripts,
        ask: &LeaseAsk<'_>,
        t: LeaseTerms,
        in_list: bool,
    ) -> Call<'a> {
        let mut keys = vec![
            self.ready.clone(),
            self.leases.clone(),
            self.inflight.clone(),
            self.acks.clone(),
            self.delayed.clone(),
            self.dead.clone(),
            self.count.clone(),
        ];
        if in_list {
            keys.push(self.lease_list(ask.id));
        }
        let mut args = vec![
            ask.count.to_string().into_bytes(),
            (t.lease.as_millis().max(1) as u64).to_string().into_bytes(),
            t.max_attempts.to_string().into_bytes(),
            REAP_LIMIT.to_string().into_bytes(),
            ask.id.to_string().into_bytes(),
            t.max_bytes.to_string().into_bytes(),
        ];
        if let Some((group, epoch)) = ask.fence {
            args.push(group.as_bytes().to_vec());
            args.push(epoch.to_string().into_bytes());
        }
        Call {
            slot: self.slot,
            script: &scripts.pop,
            keys,
            args,
        }
    }
}

fn read_list(call: &Call<'_>) -> (crate::slot::Slot, redis::Cmd) {
    let list = call.keys.last().expect("the lease's list is the last key");
    (
        call.slot,
        redis::cmd("LRANGE").arg(list).arg(0).arg(-1).clone(),
    )
}

/// Asks every shard of `asks` for a lease: the script and the read of its list, one pipeline
/// per node, all nodes at once. One result per ask, in order.
pub(crate) async fn lease_many(
    cluster: &Cluster,
    scripts: &LeaseScripts,
    asks: &[LeaseAsk<'_>],
    terms: LeaseTerms,
    opts: RequestOpts,
) -> Vec<Result<Leasing>> {
    let calls: Vec<Call<'_>> = asks
        .iter()
        .map(|a| a.keys.pop_call(scripts, a, terms, true))
        .collect();
    let send = |load: bool, which: &[usize]| {
        let mut cmds = Vec::with_capacity(which.len() * 2);
        for &i in which {
            cmds.push((calls[i].slot, calls[i].cmd(load)));
            cmds.push(read_list(&calls[i]));
        }
        cmds
    };
    let all: Vec<usize> = (0..calls.len()).collect();
    let mut replies = pairs(cluster.batch_items(send(false, &all), opts).await);
    // A node that lost its scripts (a restart, SCRIPT FLUSH) gets them with the calls again.
    let missing: Vec<usize> = (0..replies.len())
        .filter(|&i| {
            matches!(&replies[i].0, Err(Error::Server { kind, .. }) if kind.retry_method() == RetryMethod::ReloadScript)
        })
        .collect();
    if !missing.is_empty() {
        let again = pairs(cluster.batch_items(send(true, &missing), opts).await);
        for (i, r) in missing.into_iter().zip(again) {
            replies[i] = r;
        }
    }
    let mut out: Vec<Result<Leasing>> = Vec::with_capacity(replies.len());
    // Leases whose list came back short: the read went ahead of a script that was
    // redirected or retried. Read once more, on their own.
    let mut reread: Vec<(usize, Counts)> = Vec::new();
    // Shards whose slot is being migrated: leased in place.
    let mut in_place: Vec<usize> = Vec::new();
    for (i, (script, list)) in replies.into_iter().enumerate() {
        out.push(match script.and_then(parse_counts) {
            Err(Error::ClusterUnavailable {
                kind: ServerErrorKind::TryAgain,
                ..
            }) => {
                in_place.push(i);
                Ok(Leasing::Nothing { drained: false })
            }
            Err(e) => Err(e),
            Ok(c) if c.count == 0 => Ok(Leasing::Nothing {
                drained: c.rest == 0,
            }),
            Ok(c) => match list {
                Ok(Reply::Items(items)) if items.len() == c.elements => {
                    Ok(c.leased(items.into_vec(), true))
                }
                _ => {
                    reread.push((i, c));
                    Ok(Leasing::Nothing { drained: false })
                }
            },
        });
    }
    if !reread.is_empty() {
        let cmds = reread.iter().map(|&(i, ..)| read_list(&calls[i])).collect();
        for (&(i, c), r) in reread.iter().zip(cluster.batch_items(cmds, opts).await) {
            out[i] = Ok(match r {
                Ok(Reply::Items(items)) if items.len() == c.elements => {
                    c.leased(items.into_vec(), true)
                }
                Ok(other) => Leasing::Unread(Error::Protocol(format!(
                    "reliable pop: the lease's list holds {other:?}, not {} elements",
                    c.elements
                ))),
                Err(e) => Leasing::Unread(e),
            });
        }
    }
    if !in_place.is_empty() {
        let calls: Vec<Call<'_>> = in_place
            .iter()
            .map(|&i| asks[i].keys.pop_call(scripts, &asks[i], terms, false))
            .collect();
        let replies = crate::script::run_batch(cluster, &calls, opts).await;
        for (&i, r) in in_place.iter().zip(replies) {
            out[i] = r.and_then(parse_in_place);
        }
    }
    out
}

/// A lease to send behind a blocking wait on the same connection (see `consumer::waiter`):
/// the script and the read of its list, packed, to follow the wait's command; `load` sends
/// the script's source (`EVAL`), for a node that does not have it.
pub(crate) fn lease_packed(
    scripts: &LeaseScripts,
    ask: &LeaseAsk<'_>,
    terms: LeaseTerms,
    load: bool,
) -> Vec<u8> {
    let call = ask.keys.pop_call(scripts, ask, terms, true);
    let mut bytes = call.cmd(load).get_packed_command();
    bytes.extend(read_list(&call).1.get_packed_command());
    bytes
}

/// What a lease sent by [`lease_packed`] brought.
#[derive(Debug)]
pub(crate) enum AfterWait {
    /// The script ran: a lease, or none.
    Ran(Leasing),
    /// The node did not run the script (no lease was made): NOSCRIPT, TRYAGAIN in a slot
    /// being migrated, a redirect.
    Refused(ServerErrorKind),
    /// A reply that is not the script's: whether a lease was made is not known.
    Unknown(Error),
}

/// Reads the two replies of [`lease_packed`].
pub(crate) fn read_packed(script: Reply, list: Reply) -> AfterWait {
    let c = match script.into_value() {
        Value::ServerError(e) => return AfterWait::Refused(ServerErrorKind::parse(e.code())),
        v => match parse_counts(v) {
            Ok(c) => c,
            Err(e) => return AfterWait::Unknown(e),
        },
    };
    AfterWait::Ran(if c.count == 0 {
        Leasing::Nothing {
            drained: c.rest == 0,
        }
    } else {
        match list {
            Reply::Items(items) if items.len() == c.elements => c.leased(items.into_vec(), true),
            other => Leasing::Unread(Error::Protocol(format!(
                "reliable pop: the lease's list holds {other:?}, not {} elements",
                c.elements
            ))),
        }
    })
}

/// Splits a batch's replies into (script, list read) pairs.
fn pairs(replies: Vec<Result<Reply>>) -> Vec<(Result<Value>, Result<Reply>)> {
    let mut it = replies.into_iter();
    let mut out = Vec::with_capacity(it.len() / 2);
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        out.push((a.map(Reply::into_value), b));
    }
    out
}

/// What the lease script counted.
#[derive(Debug, Clone, Copy)]
struct Counts {
    deadline_ms: i64,
    /// Messages leased (0: no lease).
    count: usize,
    /// Elements in the lease's list.
    elements: usize,
    /// Elements left in the ready list.
    rest: usize,
}

impl Counts {
    fn leased(self, items: Vec<Bytes>, in_list: bool) -> Leasing {
        Leasing::Leased {
            deadline_ms: self.deadline_ms,
            count: self.count,
            items,
            in_list,
            drained: self.rest == 0,
        }
    }
}

/// `[leased, deadline, reaped, messages, elements, left]`.
fn parse_counts(v: Value) -> Result<Counts> {
    let v: Vec<i64> = redis::from_redis_value(v)
        .map_err(|e| Error::Protocol(format!("reliable pop: unexpected reply: {e}")))?;
    match v.as_slice() {
        [0, _, _, _, _, rest] if *rest >= 0 => Ok(Counts {
            deadline_ms: 0,
            count: 0,
            elements: 0,
            rest: *rest as usize,
        }),
        [1, deadline, _reaped, count, elements, rest]
            if *count > 0 && *elements >= 0 && *rest >= 0 =>
        {
            Ok(Counts {
                deadline_ms: *deadline,
                count: *count as usize,
                elements: *elements as usize,
                rest: *rest as usize,
            })
        }
        other => Err(Error::Protocol(format!(
            "reliable pop: unexpected reply {other:?}"
        ))),
    }
}

/// `[leased, deadline, reaped, messages, 0, left, frame...]` of a lease stored in place.
fn parse_in_place(v: Value) -> Result<Leasing> {
    let Value::Array(mut items) = v else {
        return Err(Error::Protocol(format!(
            "reliable pop: unexpected reply {v:?}"
        )));
    };
    if items.len() < 6 {
        return Err(Error::Protocol("reliable pop: short reply".into()));
    }
    let frames = items
        .split_off(6)
        .into_iter()
        .map(|f| match f {
            Value::BulkString(b) => Ok(Bytes::from(b)),
            other => Err(Error::Protocol(format!(
                "reliable pop: a frame is {other:?}, not a string"
            ))),
        })
        .collect::<Result<Vec<Bytes>>>()?;
    let c = parse_counts(Value::Array(items))?;
    Ok(if c.count == 0 {
        Leasing::Nothing {
            drained: c.rest == 0,
        }
    } else {
        c.leased(frames, false)
    })
}
