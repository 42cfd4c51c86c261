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
use crate::cluster::{Cluster, Reply, RequestOpts, Served};
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

/// Sends a pass: confirmed by replicas when `confirm` is set (see `confirm.rs`).
async fn send_pass(
    cluster: &Cluster,
    cmds: Vec<(Slot, redis::Cmd)>,
    opts: RequestOpts,
    confirm: Option<(u32, std::time::Duration)>,
) -> Vec<(Result<Reply>, Option<Served>)> {
    match confirm {
        Some(c) => cluster.batch_items_confirmed(cmds, opts, c).await,
        None => cluster
            .batch_items(cmds, opts)
            .await
            .into_iter()
            .map(|r| (r, None))
            .collect(),
    }
}

/// One reply per ask: what `LPOP` would have answered, or the error (`FENCED` included),
/// with where the pop ran and whether a replica confirmed it (with `confirm`).
pub(super) async fn pop_many(
    cluster: &Cluster,
    scripts: &LeaseScripts,
    group: Option<&str>,
    asks: &[Ask],
    opts: RequestOpts,
    confirm: Option<(u32, std::time::Duration)>,
) -> Vec<(Result<Reply>, Option<Served>)> {
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
                None => vec![(a.keys.slot, a.keys.pop_cmd(a.count, a.upto))],
            };
            spans.push(c.len());
            cmds.extend(c);
        }
        (cmds, spans)
    };
    type Answer = (Result<Reply>, Option<Served>);
    let mut out: Vec<Option<Answer>> = (0..asks.len()).map(|_| None).collect();
    let mut todo: Vec<(usize, Way)> = (0..asks.len()).map(|i| (i, Way::Take)).collect();
    // At most three passes: as asked, with the script's source, in place.
    for _ in 0..3 {
        if todo.is_empty() {
            break;
        }
        let (cmds, spans) = send(&todo);
        let mut replies = send_pass(cluster, cmds, opts, confirm).await.into_iter();
        let mut again = Vec::new();
        let mut reread = Vec::new();
        for (&(i, way), n) in todo.iter().zip(spans) {
            let first = replies.next().expect("a reply per command");
            let second = if n == 2 { replies.next() } else { None };
            if fenced(&asks[i]).is_none() || way == Way::InPlace {
                out[i] = Some(first);
                continue;
            }
            let (first, first_served) = first;
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
                Err(e) => out[i] = Some((Err(e), first_served)),
                Ok(Reply::Value(Value::Int(0))) => {
                    out[i] = Some((Ok(Reply::Value(Value::Nil)), first_served))
                }
                Ok(Reply::Value(Value::Int(taken))) => match second {
                    Some((Ok(Reply::Items(items)), served)) if items.len() == taken as usize => {
                        out[i] = Some((Ok(Reply::Items(items)), served));
                    }
                    _ => reread.push((i, taken)),
                },
                Ok(other) => {
                    out[i] = Some((
                        Err(Error::Protocol(format!(
                            "fenced pop: unexpected reply {other:?}"
                        ))),
                        first_served,
                    ))
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
            for (&(i, _), r) in reread
                .iter()
                .zip(send_pass(cluster, cmds, opts, confirm).await)
            {
                out[i] = Some(r);
            }
        }
        todo = again;
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                (
                    Err(Error::Protocol(
                        "fenced pop: no reply after three passes".into(),
                    )),
                    None,
                )
            })
        })
        .collect()
}
