//! Retiring draining shards.
//!
//! 1. A draining shard with at most [`RETIRE_DEPTH`] ready messages is set to retiring:
//!    within a registry poll, no producer writes to it any more (keyed sends for its keys
//!    wait, see `Producer::send_keyed`).
//! 2. After two registry polls (every producer has seen it), the step watches it until it
//!    is empty: nothing ready, nothing leased. Empty shards are retired in one registry
//!    version: removed, their keyed buckets handed to active shards (held keyed sends go
//!    there now, after every older message of their keys was taken). Shards that did not
//!    empty within [`RETIRE_WINDOW_POLLS`] registry polls go back to draining, so held sends never wait long.
//! 3. Two registry polls later (no client uses the shard any more), whatever is still in
//!    it is moved to an active shard — a late push, a lease taken at the last moment, the
//!    delayed and dead messages — copied first and removed after, so a crash in between
//!    duplicates and never loses; then its keys are deleted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::Value;

use super::RebalanceReport;
use super::plan::reassign_buckets;
use crate::error::{Error, Result};
use crate::lease::{KEEP, ShardKeys};
use crate::placement::{DeliveryMode, Shard, ShardSet, ShardState};
use crate::producer::KEYED_HOLD;
use crate::queue::Queue;

/// Draining shards with at most this many ready messages are set to retiring.
pub const RETIRE_DEPTH: u64 = 1000;
/// Longest a shard stays retiring in one step before it goes back to draining, in
/// registry polls (10 s with the default poll).
pub const RETIRE_WINDOW_POLLS: u32 = 10;
/// How often a retiring shard is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(100);
/// Messages moved per command.
const MOVE_CHUNK: usize = 1000;

/// Ready and leased messages per shard tag.
async fn depths(q: &Queue) -> Result<HashMap<String, (u64, u64)>> {
    Ok(q.stats()
        .await?
        .into_iter()
        .map(|s| (s.tag, (s.depth, s.in_flight.unwrap_or(0))))
        .collect())
}

/// One retire step (see the module documentation).
pub(super) async fn step(q: &Queue, report: &mut RebalanceReport) -> Result<()> {
    let set = q.reload().await?;
    let idle: Vec<Shard> = set
        .shards
        .iter()
        .filter(|s| s.state != ShardState::Active)
        .cloned()
        .collect();
    if idle.is_empty() {
        return Ok(());
    }
    let depth = depths(q).await?;
    let near: Vec<u32> = idle
        .iter()
        .filter(|s| depth.get(&s.tag).is_some_and(|d| d.0 <= RETIRE_DEPTH))
        .map(|s| s.number)
        .collect();
    report.waiting = idle
        .iter()
        .filter(|s| !near.contains(&s.number))
        .map(|s| s.tag.clone())
        .collect();
    if near.is_empty() || set.active().next().is_none() {
        report.waiting = idle.iter().map(|s| s.tag.clone()).collect();
        return Ok(());
    }

    // 1. Retiring: no more pushes.
    let marked = update(q, |s| {
        let mut next = s.clone();
        for sh in &mut next.shards {
            if near.contains(&sh.number) && sh.state == ShardState::Draining {
                sh.state = ShardState::Retiring;
            }
        }
        next
    })
    .await?;
    let t0 = Instant::now();
    let poll = q.registry_poll();
    let seen_by_all = poll * 2;
    let window = (poll * RETIRE_WINDOW_POLLS).min(KEYED_HOLD.saturating_sub(poll * 3));
    // 2. Watch until empty.
    let tag = |n: u32| crate::slot::shard_tag(q.name(), n);
    let mut empty: Vec<u32>;
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        if t0.elapsed() < seen_by_all {
            continue;
        }
        let d = depths(q).await?;
        empty = near
            .iter()
            .copied()
            .filter(|&n| d.get(&tag(n)) == Some(&(0, 0)))
            .collect();
        if empty.len() == near.len() || t0.elapsed() >= window {
            break;
        }
    }
    // Held keyed sends give up after KEYED_HOLD: past that, retire nothing.
    if t0.elapsed() + poll * 2 >= KEYED_HOLD {
        empty.clear();
    }
    let before = marked.version;
    let retired_set = update(q, |s| {
        let mut next = s.clone();
        // Only shards that are still retiring (nobody reactivated them meanwhile).
        let gone: Vec<u32> = empty
            .iter()
            .copied()
            .filter(|n| {
                s.shard(*n)
                    .is_some_and(|sh| sh.state == ShardState::Retiring)
            })
            .collect();
        next.keyed = reassign_buckets(s, &gone);
        next.shards.retain(|sh| !gone.contains(&sh.number));
        // Recorded in the same version: a step cut short before their leftovers moved
        // leaves them to the next step, not to nobody.
        next.cleanup
            .extend(gone.iter().filter(|n| !s.cleanup.contains(n)));
        for sh in &mut next.shards {
            if near.contains(&sh.number) && sh.state == ShardState::Retiring {
                sh.state = ShardState::Draining;
            }
        }
        next
    })
    .await?;
    let retired: Vec<Shard> = marked
        .shards
        .iter()
        .filter(|s| near.contains(&s.number) && retired_set.shard(s.number).is_none())
        .cloned()
        .collect();
    for s in &idle {
        if near.contains(&s.number) && retired_set.shard(s.number).is_some() {
            report.waiting.push(s.tag.clone());
        }
    }
    report.version = retired_set.version.max(before);
    if retired.is_empty() {
        return Ok(());
    }

    // 3. Leftovers, then the keys.
    tokio::time::sleep(seen_by_all).await;
    let topology = q.cluster().topology();
    for s in &retired {
        let to = successor(&marked, &retired_set, s, &topology);
        clean_up(q, s, &to, retired_set.mode, report).await?;
        report.retired.push(s.tag.clone());
    }
    Ok(())
}

/// Moves what is left in a retired shard to `to`, deletes its keys, and only then takes it
/// off the registry's cleanup list (idempotent: a step cut short anywhere in here is
/// taken again whole by the next; a copy made twice duplicates, never loses).
async fn clean_up(
    q: &Queue,
    s: &Shard,
    to: &Shard,
    mode: DeliveryMode,
    report: &mut RebalanceReport,
) -> Result<()> {
    report.moved += move_leftovers(q, s, to, mode).await?;
    q.delete_in_slot(s.slot, &format!("{}:{{{}}}:", q.prefix(), s.tag))
        .await?;
    update(q, |set| {
        let mut next = set.clone();
        next.cleanup.retain(|n| *n != s.number);
        next
    })
    .await?;
    Ok(())
}

/// Finishes the retirements an earlier step left half done (recorded in the registry's
/// cleanup list): after two registry polls (a client may have seen the shard until the
/// version that removed it), each one's leftovers go to an active shard on its master (or
/// the lowest-numbered one) and its keys are deleted.
pub(super) async fn finish_cleanups(q: &Queue, report: &mut RebalanceReport) -> Result<()> {
    let set = q.reload().await?;
    if set.cleanup.is_empty() || set.active().next().is_none() {
        return Ok(());
    }
    tokio::time::sleep(q.registry_poll() * 2).await;
    let topology = q.cluster().topology();
    for &n in &set.cleanup {
        let gone = Shard::new(q.name(), n, ShardState::Retiring);
        let to = successor(&set, &set, &gone, &topology);
        clean_up(q, &gone, &to, set.mode, report).await?;
        report.retired.push(gone.tag.clone());
    }
    Ok(())
}

/// Applies `change` to the registry with compare-and-set (re-reading and retrying when
/// another client wrote first); returns the set written (or the current one when the
/// change changes nothing).
pub(super) async fn update(q: &Queue, change: impl Fn(&ShardSet) -> ShardSet) -> Result<ShardSet> {
    for _ in 0..16 {
        let set = q.reload().await?;
        let mut next = change(&set);
        if next == *set {
            return Ok(next);
        }
        next.version = set.version + 1;
        if q.write_registry(set.version, &next).await? {
            q.reload().await?;
            return Ok(next);
        }
    }
    Err(Error::RegistryContention(q.name().to_string()))
}

/// The active shard that takes what is left of `gone`: the shard its first keyed bucket
/// went to; else an active shard on the same master; else the lowest-numbered one.
fn successor(
    before: &ShardSet,
    after: &ShardSet,
    gone: &Shard,
    topology: &crate::topology::Topology,
) -> Shard {
    if let Some(b) = before.keyed.iter().position(|n| *n == gone.number)
        && let Some(s) = after.shard(after.keyed[b])
    {
        return s.clone();
    }
    let owner = topology.owner(gone.slot);
    after
        .active()
        .find(|s| owner.is_some() && topology.owner(s.slot) == owner)
        .or_else(|| after.active().min_by_key(|s| s.number))
        .cloned()
        .expect("retiring needs an active shard")
}

/// Moves everything left in `from` to `to`; returns how many messages.
async fn move_leftovers(q: &Queue, from: &Shard, to: &Shard, mode: DeliveryMode) -> Result<u64> {
    let cluster = q.cluster();
    let prefix = q.prefix();
    let mut moved = move_scheduled(q, from, to, mode).await?;
    if mode == DeliveryMode::AtMostOnce {
        // Every level's list (queues with priorities keep one per level): each to the
        // same level of `to`.
        for level in crate::priority::LEVELS {
            let (src, dst) = (
                level.ready_key(prefix, &from.tag),
                level.ready_key(prefix, &to.tag),
            );
            loop {
                let items = list_range(q, from, &src, MOVE_CHUNK).await?;
                if items.is_empty() {
                    break;
                }
                push(q, to, &dst, &items).await?;
                let n = items.len();
                let _: Value = cluster
                    .query(from.slot, redis::cmd("LTRIM").arg(&src).arg(n).arg(-1))
                    .await?;
                moved += n as u64;
            }
        }
        return Ok(moved);
    }
    let (src, dst) = (
        ShardKeys::new(prefix, &from.tag),
        ShardKeys::new(prefix, &to.tag),
    );
    // Ready frames, and the frames of leases still held (their holders' acks will find
    // the lease gone: the messages are delivered again from `to`). Heads are left behind
    // and written again beside each frame.
    let mut frames = Vec::new();
    let is_frame = |f: &Vec<u8>| f.len() >= 5 && f[0..2] == crate::lease::FRAME_MAGIC;
    loop {
        let items = list_range(q, from, &src.ready, MOVE_CHUNK).await?;
        if items.is_empty() {
            break;
        }
        let n = items.len();
        frames.extend(items.into_iter().filter(is_frame));
        let _: Value = cluster
            .query(
                from.slot,
                redis::cmd("LTRIM").arg(&src.ready).arg(n).arg(-1),
            )
            .await?;
    }
    let leases: Vec<String> = cluster
        .query(
            from.slot,
            redis::cmd("ZRANGE").arg(&src.leases).arg(0).arg(-1),
        )
        .await?;
    for id in leases.iter().filter(|id| id.as_bytes() != KEEP) {
        let list = format!("{}{id}", src.lease_prefix);
        let items = list_range(q, from, &list, 0).await?;
        frames.extend(items.into_iter().filter(is_frame));
    }
    // Leases stored by older versions.
    let stored: Vec<(Vec<u8>, Vec<u8>)> = cluster
        .query(from.slot, redis::cmd("HGETALL").arg(&src.inflight))
        .await?;
    for (_, frames_of_lease) in stored.iter().filter(|(field, _)| field != KEEP) {
        frames.extend(crate::lease::frames_of_lease(frames_of_lease)?);
    }
    let mut count = 0u64;
    for f in &frames {
        count += crate::lease::decode_frame(f)?.len() as u64;
    }
    for chunk in frames.chunks(MOVE_CHUNK / 2) {
        let headed: Vec<Vec<u8>> = chunk
            .iter()
            .flat_map(|f| [crate::lease::frame_head(f), f.clone()])
            .collect();
        push(q, to, &dst.ready, &headed).await?;
    }
    if count > 0 {
        let _: Value = cluster
            .query(to.slot, redis::cmd("INCRBY").arg(&dst.count).arg(count))
            .await?;
    }
    moved += count;
    // Dead letters, in order.
    let dead: Vec<Vec<u8>> = cluster
        .query(
            from.slot,
            redis::cmd("LRANGE").arg(&src.dead).arg(0).arg(-1),
        )
        .await?;
    let dead: Vec<Vec<u8>> = dead.into_iter().filter(|d| d != KEEP).collect();
    for chunk in dead.chunks(MOVE_CHUNK) {
        push(q, to, &dst.dead, chunk).await?;
    }
    moved += dead.len() as u64;
    // Delayed messages keep their due time.
    let delayed: Vec<(Vec<u8>, f64)> = cluster
        .query(
            from.slot,
            redis::cmd("ZRANGE")
                .arg(&src.delayed)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
        )
        .await?;
    let delayed: Vec<(Vec<u8>, f64)> = delayed.into_iter().filter(|(m, _)| m != KEEP).collect();
    for chunk in delayed.chunks(MOVE_CHUNK) {
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(&dst.delayed);
        for (m, due) in chunk {
            cmd.arg(*due).arg(m.as_slice());
        }
        let _: Value = cluster.query(to.slot, &cmd).await?;
    }
    moved += delayed.len() as u64;
    Ok(moved)
}

/// Moves the scheduled messages of `from` to `to`, each keeping its id and due time:
/// written to `to` first (by the scheduling script, which stores an id once), then removed
/// from `from`, so a step cut in between leaves a copy, never a loss.
async fn move_scheduled(q: &Queue, from: &Shard, to: &Shard, mode: DeliveryMode) -> Result<u64> {
    let (src, dst) = (
        crate::queue::ScheduleKeys::new(q.prefix(), from, mode),
        crate::queue::ScheduleKeys::new(q.prefix(), to, mode),
    );
    let cluster = q.cluster();
    let mut moved = 0u64;
    loop {
        let due: Vec<(Vec<u8>, f64)> = cluster
            .query(
                from.slot,
                redis::cmd("ZRANGE")
                    .arg(&src.sched)
                    .arg(0)
                    .arg(MOVE_CHUNK as i64 - 1)
                    .arg("WITHSCORES"),
            )
            .await?;
        if due.is_empty() {
            return Ok(moved);
        }
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(&src.msgs);
        for (id, _) in &due {
            hmget.arg(id.as_slice());
        }
        let elements: Vec<Option<Vec<u8>>> = cluster.query(from.slot, &hmget).await?;
        let mut args: Vec<Vec<u8>> = Vec::new();
        for ((id, at), el) in due.iter().zip(elements) {
            if let Some(el) = el {
                args.extend([id.clone(), (*at as u64).to_string().into_bytes(), el]);
            }
        }
        let scripts = q.scripts();
        let arg_refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        scripts
            .schedule
            .run(
                cluster,
                to.slot,
                &dst.schedule_keys(),
                &arg_refs,
                cluster.default_opts(),
            )
            .await?;
        let ids: Vec<&[u8]> = due.iter().map(|(id, _)| id.as_slice()).collect();
        scripts
            .cancel
            .run(
                cluster,
                from.slot,
                &[&src.sched, &src.msgs],
                &ids,
                cluster.default_opts(),
            )
            .await?;
        moved += due.len() as u64;
    }
}

/// The first `n` elements of a list (all of them when `n` is 0).
async fn list_range(q: &Queue, shard: &Shard, key: &str, n: usize) -> Result<Vec<Vec<u8>>> {
    q.cluster()
        .query(
            shard.slot,
            redis::cmd("LRANGE").arg(key).arg(0).arg(n as i64 - 1),
        )
        .await
}

async fn push(q: &Queue, shard: &Shard, key: &str, items: &[Vec<u8>]) -> Result<()> {
    let mut cmd = redis::cmd("RPUSH");
    cmd.arg(key);
    for i in items {
        cmd.arg(i.as_slice());
    }
    let _: Value = q.cluster().query(shard.slot, &cmd).await?;
    Ok(())
}
