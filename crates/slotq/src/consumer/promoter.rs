//! Scheduled messages (and delayed redeliveries) become ready on time: every consumer runs
//! a promoter beside its waiters, which moves what is due into the ready lists, where the
//! waiters' blocking pops see it at once (`queue/schedule.rs` has the script).
//!
//! Per shard it knows the earliest due time (each promote call answers it) and calls again
//! then; without one it asks every [`SCHEDULE_POLL`] (so a message scheduled further ahead
//! than that is always known before it is due; one due sooner is promoted by its producer,
//! see `producer/schedule.rs`, or by the next poll). A million scheduled messages cost what
//! one does: each call reads the first due entry, nothing scans.
//!
//! Many consumers need not all race for every due message: a consumer whose call on time
//! found that someone else had moved it waits longer the next time (its lag doubles, from
//! 10 ms up to the poll), one that finds something to move waits less (halves). So one or
//! a few consumers promote on time and the others fall back to about a poll; if those
//! stop, the others find work waiting and close in within a few calls.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::queue::{PROMOTE_LIMIT, Queue, SCHEDULE_POLL, ScheduleKeys};

/// Shortest lag after a call on time found nothing to move.
const MIN_LAG: Duration = Duration::from_millis(10);
/// A due time this close after the server's clock counts as "ours, not due yet" (the
/// caller's clock ran ahead), not as moved by someone else.
const EARLY: Duration = Duration::from_millis(20);

/// The promoter task of a consumer; stopped when dropped.
pub(super) struct Promoter(JoinHandle<()>);

impl Drop for Promoter {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Promoter {
    pub(super) fn start(queue: Queue) -> Promoter {
        Promoter(tokio::spawn(run(queue)))
    }
}

struct ShardTimer {
    keys: ScheduleKeys,
    /// The earliest due time known (this process's clock).
    next_due: Option<Instant>,
    /// How long after a due time this consumer calls (see the module notes).
    lag: Duration,
    /// When it was last called.
    called: Option<Instant>,
}

impl ShardTimer {
    /// Whether its known due time (plus its lag) has come, as opposed to only its poll.
    fn due_by(&self, now: Instant) -> bool {
        self.next_due.is_some_and(|d| d + self.lag <= now)
    }

    /// When to call next (`now` for a shard never called).
    fn wake(&self, now: Instant) -> Instant {
        let Some(called) = self.called else {
            return now;
        };
        let poll = called + SCHEDULE_POLL;
        match self.next_due {
            Some(d) => (d + self.lag).min(poll),
            None => poll,
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn run(queue: Queue) {
    let mut shards: HashMap<String, ShardTimer> = HashMap::new();
    let mut version = None;
    loop {
        let set = queue.shards();
        if version != Some(set.version) {
            let mut next = HashMap::new();
            for s in &set.shards {
                let t = shards.remove(&s.tag).unwrap_or_else(|| ShardTimer {
                    keys: ScheduleKeys::new(queue.prefix(), s, set.mode),
                    next_due: None,
                    lag: Duration::ZERO,
                    called: None,
                });
                next.insert(s.tag.clone(), t);
            }
            shards = next;
            version = Some(set.version);
        }
        let now = Instant::now();
        // Shards whose known due time came: the promote script. Shards only due for a
        // poll: a plain read of their earliest due time first, the script only if
        // something is due by now.
        let (mut due, mut polls) = (Vec::new(), Vec::new());
        for (tag, t) in &shards {
            if t.due_by(now) {
                due.push(tag.clone());
            } else if t.wake(now) <= now {
                polls.push(tag.clone());
            }
        }
        if !polls.is_empty() {
            let keys: Vec<ScheduleKeys> = polls.iter().map(|t| shards[t].keys.clone()).collect();
            let found = crate::queue::earliest(&queue, &keys).await;
            let (after, epoch_now) = (Instant::now(), now_ms());
            for (tag, r) in polls.iter().zip(found) {
                let Some(t) = shards.get_mut(tag) else {
                    continue;
                };
                t.called = Some(after);
                match r {
                    Ok(Some(at)) if at <= epoch_now => {
                        t.next_due = Some(after);
                        due.push(tag.clone());
                    }
                    Ok(at) => {
                        t.next_due = at.map(|at| after + Duration::from_millis(at - epoch_now));
                    }
                    Err(e) => {
                        tracing::debug!(shard = %tag, cause = %e, "reading due times failed");
                        t.next_due = None;
                    }
                }
            }
        }
        if !due.is_empty() {
            let keys: Vec<ScheduleKeys> = due.iter().map(|t| shards[t].keys.clone()).collect();
            let results = crate::queue::promote(&queue, &keys).await;
            let after = Instant::now();
            for (tag, r) in due.iter().zip(results) {
                let Some(t) = shards.get_mut(tag) else {
                    continue;
                };
                let on_time = t.next_due.is_some_and(|d| d + t.lag <= now);
                t.called = Some(after);
                match r {
                    Ok(p) if p.moved >= PROMOTE_LIMIT => t.next_due = Some(after),
                    Ok(p) => {
                        if p.moved > 0 {
                            t.lag /= 2;
                            if t.lag < Duration::from_millis(1) {
                                t.lag = Duration::ZERO;
                            }
                        } else if on_time && p.next_in.is_none_or(|d| d > EARLY) {
                            t.lag = (t.lag * 2).clamp(MIN_LAG, SCHEDULE_POLL);
                        }
                        t.next_due = p.next_in.map(|d| after + d);
                    }
                    Err(e) => {
                        // A node down or a slot moving: the next poll tries again.
                        tracing::debug!(shard = %tag, cause = %e, "promote failed");
                        t.next_due = None;
                    }
                }
            }
        }
        let now = Instant::now();
        let wake = shards
            .values()
            .map(|t| t.wake(now))
            .min()
            .unwrap_or_else(|| Instant::now() + SCHEDULE_POLL);
        // Look at the registry at least once a poll (new shards).
        let wake = wake.min(now + SCHEDULE_POLL);
        tokio::time::sleep_until(wake.into()).await;
    }
}
