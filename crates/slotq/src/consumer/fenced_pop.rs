//! Pops of an ordered member on an at-most-once queue: behind the shard's fence
//! (`lua/fenced_pop.lua`), without the payloads passing through Lua.
//!
//! Each fenced shard is asked with two commands in one write: the script, which checks the
//! member's grant and moves what it takes into a list of the pop's own (named by the
//! client, in the shard's slot), and `LPOP take count`, which reads that list and leaves
//! nothing behind. Other shards of the round are plain `LPOP`s.
//!
//! Invariants:
//! - A refused script moves nothing: the `LPOP` behind it finds no list.
//! - The two commands are routed one by one; when the read went ahead of a script that
//!   was redirected or retried (it comes back short), the list is read once more.
//! - In a slot being migrated the script is refused (`TRYAGAIN`: its list does not exist
//!   there yet); it is sent again without a list and pops by reading (slower, still fenced).

use redis::Value;

use super::round::Ask;
use crate::cluster::{Cluster, Reply, RequestOpts};
use crate::error::{Error, Result};
use crate::lease::LeaseScripts;
use crate::server_error::{RetryMethod, ServerErrorKind};
use crate::slot::Slot;

/// How one fenced shard is asked.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// Script (its hash) and the read of its list.
    Take,
    /// The same with the script's source (the node did not have it).
    TakeLoading,
    /// The script pops by reading (a slot being migrated), with its source.
    InPlace,
}

fn commands(
    a: &Ask,
    scripts: &LeaseScripts,
    group: &str,
    take: &str,
    way: Way,
) -> Vec<(Slot, redis::Cmd)> {
    let k = &a.keys;
    let epoch = a.fence.unwrap_or(0).to_string();
    let count = a.count.to_string();
    let args: [&[u8]; 3] = [count.as_bytes(), group.as_bytes(), epoch.as_bytes()];
    match way {
        Way::InPlace => vec![(
            k.slot,
            scripts.fenced_pop.cmd(&[&k.ready, &k.fence], &args, true),
        )],
        Way::Take | Way::TakeLoading => vec![
            (
                k.slot,
                scripts
                    .fenced_pop
                    .cmd(&[&k.ready, &k.fence, take], &args, way == Way::TakeLoading),
            ),
            (k.slot, redis::cmd("LPOP").arg(take).arg(a.count).clone()),
        ],
    }
}

/// One reply per ask: what `LPOP` would have answered, or the error (`FENCED` included).
pub(super) async fn pop_many(
    cluster: &Cluster,
    scripts: &LeaseScripts,
    group: Option<&str>,
    asks: &[Ask],
    opts: RequestOpts,
) -> Vec<Result<Reply>> {
    let fenced = |a: &Ask| group.filter(|_| a.fence.is_some());
    let takes: Vec<String> = asks
        .iter()
        .map(|a| format!("{}{:032x}", a.keys.take_prefix, rand::random::<u128>()))
        .collect();
    let send = |which: &[(usize, Way)]| {
        let mut cmds = Vec::with_capacity(which.len() * 2);
        let mut spans = Vec::with_capacity(which.len());
        for &(i, way) in which {
            let a = &asks[i];
            let c = match fenced(a) {
                Some(g) => commands(a, scripts, g, &takes[i], way),
                None => vec![(
                    a.keys.slot,
                    redis::cmd("LPOP").arg(&a.keys.ready).arg(a.count).clone(),
                )],
            };
            spans.push(c.len());
            cmds.extend(c);
        }
        (cmds, spans)
    };
    let mut out: Vec<Option<Result<Reply>>> = (0..asks.len()).map(|_| None).collect();
    let mut todo: Vec<(usize, Way)> = (0..asks.len()).map(|i| (i, Way::Take)).collect();
    // At most three passes: as asked, with the script's source, in place.
    for _ in 0..3 {
        if todo.is_empty() {
            break;
        }
        let (cmds, spans) = send(&todo);
        let mut replies = cluster.batch_items(cmds, opts).await.into_iter();
        let mut again = Vec::new();
        let mut reread = Vec::new();
        for (&(i, way), n) in todo.iter().zip(spans) {
            let first = replies.next().expect("a reply per command");
            let second = if n == 2 { replies.next() } else { None };
            if fenced(&asks[i]).is_none() || way == Way::InPlace {
                out[i] = Some(first);
                continue;
            }
            match first {
                Err(Error::Server { kind, .. })
                    if kind.retry_method() == RetryMethod::ReloadScript =>
                {
                    again.push((i, Way::TakeLoading));
                }
                Err(Error::ClusterUnavailable {
                    kind: ServerErrorKind::TryAgain,
                    ..
                }) => again.push((i, Way::InPlace)),
                Err(e) => out[i] = Some(Err(e)),
                Ok(Reply::Value(Value::Int(0))) => out[i] = Some(Ok(Reply::Value(Value::Nil))),
                Ok(Reply::Value(Value::Int(taken))) => match second {
                    Some(Ok(Reply::Items(items))) if items.len() == taken as usize => {
                        out[i] = Some(Ok(Reply::Items(items)));
                    }
                    _ => reread.push((i, taken)),
                },
                Ok(other) => {
                    out[i] = Some(Err(Error::Protocol(format!(
                        "fenced pop: unexpected reply {other:?}"
                    ))))
                }
            }
        }
        if !reread.is_empty() {
            let cmds = reread
                .iter()
                .map(|&(i, n)| {
                    (
                        asks[i].keys.slot,
                        redis::cmd("LPOP").arg(&takes[i]).arg(n).clone(),
                    )
                })
                .collect();
            for (&(i, _), r) in reread.iter().zip(cluster.batch_items(cmds, opts).await) {
                out[i] = Some(r);
            }
        }
        todo = again;
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(Error::Protocol(
                    "fenced pop: no reply after three passes".into(),
                ))
            })
        })
        .collect()
}

/// The fenced pop a waiter of an ordered member sends right behind its wait (`BLMOVE` of
/// the list onto itself, which moves nothing), on the same connection: the pop runs the
/// moment messages arrive, and a stale member's waiter is refused by the fence like its
/// rounds. One round trip from arrival to messages, as a plain `BLMPOP` has.
pub(super) struct FencedWait {
    pub(super) scripts: std::sync::Arc<LeaseScripts>,
    pub(super) group: std::sync::Arc<str>,
    pub(super) keys: std::sync::Arc<crate::lease::ShardKeys>,
    pub(super) count: usize,
    /// The epoch of the member's grant of the shard, kept current by the consumer.
    pub(super) epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Send the script's source: the node did not have it last time.
    load: bool,
}

/// What a fenced pop behind a wait brought.
pub(super) enum AfterFencedWait {
    /// Messages (possibly none: then nothing arrived, or the shard was empty again).
    Popped(Vec<bytes::Bytes>),
    /// The pop did not run or could not be read: the consumer sweeps (its round meets the
    /// fence, a migrating slot, or the messages the list still holds).
    Wake,
}

impl FencedWait {
    pub(super) fn new(
        scripts: std::sync::Arc<LeaseScripts>,
        group: std::sync::Arc<str>,
        keys: std::sync::Arc<crate::lease::ShardKeys>,
        count: usize,
        epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> FencedWait {
        FencedWait {
            scripts,
            group,
            keys,
            count,
            epoch,
            load: false,
        }
    }

    /// A fresh name for the pop's own list.
    pub(super) fn take_key(&self) -> String {
        format!("{}{:032x}", self.keys.take_prefix, rand::random::<u128>())
    }

    /// The script and the read of its list, packed.
    pub(super) fn packed(&self, take: &str) -> Vec<u8> {
        let ask = Ask {
            keys: self.keys.clone(),
            count: self.count,
            lease: None,
            fence: Some(self.epoch.load(std::sync::atomic::Ordering::Relaxed)),
        };
        let way = if self.load {
            Way::TakeLoading
        } else {
            Way::Take
        };
        let mut bytes = Vec::new();
        for (_, cmd) in commands(&ask, &self.scripts, &self.group, take, way) {
            bytes.extend(cmd.get_packed_command());
        }
        bytes
    }

    /// Reads the two replies; a list left unread is read again on the shared connection.
    pub(super) async fn read(
        &mut self,
        cluster: &Cluster,
        take: &str,
        script: Reply,
        list: Reply,
    ) -> AfterFencedWait {
        match script.into_value() {
            Value::Int(0) => {
                self.load = false;
                AfterFencedWait::Popped(Vec::new())
            }
            Value::Int(n) => {
                self.load = false;
                if let Reply::Items(items) = list
                    && items.len() == n as usize
                {
                    return AfterFencedWait::Popped(items.into_vec());
                }
                let again = redis::cmd("LPOP").arg(take).arg(n).clone();
                match cluster
                    .batch_items(vec![(self.keys.slot, again)], cluster.default_opts())
                    .await
                    .pop()
                {
                    Some(Ok(Reply::Items(items))) => AfterFencedWait::Popped(items.into_vec()),
                    other => {
                        metrics::counter!(crate::telemetry::POP_REPLIES_LOST).increment(1);
                        tracing::warn!(shard = %self.keys.tag, reply = ?other.map(|r| r.map(Reply::into_value)), "a fenced pop behind a wait could not be read: up to {n} messages lost (at-most-once)");
                        AfterFencedWait::Wake
                    }
                }
            }
            Value::ServerError(e) => {
                if ServerErrorKind::parse(e.code()) == ServerErrorKind::NoScript {
                    self.load = true;
                }
                AfterFencedWait::Wake
            }
            _ => AfterFencedWait::Wake,
        }
    }
}
