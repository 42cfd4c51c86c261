//! `slotq bench --rate R`: open-loop push and pop. Messages are due on a fixed schedule
//! (R a second in all, message k of the run at `k / R` seconds) that does not slow down
//! when the system does; each carries its intended send time, and a consumer records the
//! time from then to its receipt. A late send therefore counts as latency instead of
//! hiding it (no coordinated omission).
//!
//! The schedule is kept by one OS thread (`std::thread::sleep` wakes within tens of
//! microseconds, where the runtime's timer has a millisecond grain): each time it wakes (at
//! most every [`STEP`]) it hands every message now due to the next producer, round-robin,
//! as one batch, and goes on without waiting for the batch to be stored.
//!
//! The schedule starts with a warm-up (`--warm-up`, at the same rate, measured apart):
//! consumers that have only waited so far, producers that have not sent yet and a machine
//! that was idle take tens of milliseconds to reach their pace (at 2,000,000 msgs/s
//! at-least-once on 3 masters, messages of the first 30 ms waited up to 12 ms, then
//! 1-2 ms), and a phase of a few seconds would otherwise report that start as its p99.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use slotq::Queue;

use super::traffic::Clock;
use super::{Phase, WarmUp, bar, consume, write_payload};
use crate::CliError;
use crate::args::BenchArgs;

/// Shortest sleep of the pacing thread: the schedule is served in steps of this length,
/// so a message waits up to one step for its hand-over (counted in its latency). Waking
/// more often costs a wake-up per handful of messages, and on two cores shared with the
/// servers those wake-ups delayed everything else (p99 at 50,000 msgs/s on 3 masters:
/// 9-28 ms waking at every message's time, 0.8-5.5 ms in steps of 200 us).
const STEP: Duration = Duration::from_micros(200);
/// Longest the pacing thread sleeps at once, so a stop is noticed.
const MAX_NAP: Duration = Duration::from_millis(5);
/// Time the consumers get to join their group before the schedule starts.
const JOIN_TIME: Duration = Duration::from_secs(1);

/// Runs the open-loop phase: `rate` messages a second for `args.warm_up`, then for
/// `duration` (measured).
pub(super) async fn rate_phase(
    q: &Queue,
    args: &BenchArgs,
    rate: f64,
    duration: Duration,
    show: bool,
) -> Result<Phase, CliError> {
    let measured = (rate * duration.as_secs_f64()).round() as usize;
    if measured == 0 {
        return Err(CliError::Usage(
            "--rate x --duration must come to at least one message".into(),
        ));
    }
    let warm = (rate * args.warm_up.as_secs_f64()).round() as usize;
    let total = warm + measured;
    let period_ns = 1e9 / rate;
    // The first measured message is due here (ns since the origin).
    let measure_from_ns = (warm as f64 * period_ns) as u64;
    let producers: Vec<slotq::Producer> = (0..args.producers)
        .map(|_| {
            let p = q.producer();
            if args.no_durability {
                p.no_durability().build()
            } else {
                p.build()
            }
        })
        .collect::<Result<_, _>>()?;
    let pb = bar(total, &format!("{rate:.0}/s"), show);
    // Consumers first: the clock of the schedule starts once they had time to join.
    let origin = Instant::now() + JOIN_TIME;
    let consumers = {
        let (q, args, pb) = (q.clone(), args.clone(), pb.clone());
        let clock = Clock {
            origin,
            measure_from_ns,
        };
        tokio::spawn(async move { consume(&q, &args, total, Some(clock), &pb).await })
    };
    tokio::time::sleep_until(origin.into()).await;

    // The pacing thread hands each batch to its producer as a task of its own (without
    // waiting for the one before, and without a hop through another thread).
    let pacing = Pacing::default();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    {
        let stop = pacing.stop.clone();
        let plan = Plan {
            origin,
            total,
            warm,
            period_ns,
            size: args.size,
            producers: producers.len(),
        };
        let runtime = tokio::runtime::Handle::current();
        let size = args.size;
        std::thread::spawn(move || {
            let mut sends = Vec::new();
            let lateness = pace(
                &plan,
                &mut |p, batch| {
                    let producer = producers[p].clone();
                    sends.push(
                        runtime.spawn(async move { producer.send_batch(batch.chunks(size)).await }),
                    );
                },
                &stop,
            );
            let _ = done_tx.send((lateness, origin.elapsed(), sends));
        });
    }
    let (lateness, handed_by, sends) = done_rx
        .await
        .map_err(|_| CliError::Other("the pacing thread ended early".into()))?;
    let sent_span = handed_by.saturating_sub(Duration::from_nanos(measure_from_ns));
    let mut first_err = None;
    for r in futures::future::join_all(sends).await {
        if let Err(e) = r
            .map_err(|e| CliError::Other(e.to_string()))
            .and_then(|r| Ok(r?))
        {
            first_err.get_or_insert(e);
        }
    }
    if let Some(e) = first_err {
        consumers.abort();
        return Err(e);
    }
    let got = consumers
        .await
        .map_err(|e| CliError::Other(e.to_string()))??;
    pb.finish();
    let measure_from = origin + Duration::from_nanos(measure_from_ns);
    Ok(Phase {
        name: "rate",
        messages: measured,
        secs: got.last.duration_since(measure_from).as_secs_f64(),
        latency_us: Some(super::percentiles(&got.latency)),
        shares: super::spread(&got.counts),
        offered: Some((rate, measured as f64 / sent_span.as_secs_f64())),
        load: None,
        schedule: Some(lateness),
        warm_up: (warm > 0).then(|| WarmUp {
            secs: args.warm_up.as_secs_f64(),
            messages: warm,
            latency_us: super::percentiles(&got.warm_up),
        }),
    })
}

/// How late the pacing thread handed the measured messages over: from the intended send
/// time of the first message of a hand-over to the hand-over, and how many messages were
/// handed over more than 1 ms late. It is part of every latency measured
/// (as it must be, open loop), and tells a stall of the machine, or of the load generator,
/// from one of the queue: on this machine, idle, a thread that sleeps 200 us at a time
/// wakes over 1 ms late about once a second.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Lateness {
    /// Hand-overs in the phase.
    pub(super) handovers: usize,
    /// Hand-overs more than 1 ms late.
    pub(super) over_1ms: usize,
    /// Measured messages handed over more than 1 ms after their intended send time: their
    /// latency is over 1 ms before any queue touched them. When they are more than 1% of
    /// the messages, no queue could show a p99 under 1 ms on this run.
    pub(super) messages_over_1ms: usize,
    /// The latest hand-over, in microseconds.
    pub(super) max_us: u64,
}

/// The schedule the pacing thread keeps.
struct Plan {
    origin: Instant,
    /// Messages in all, the warm-up's first.
    total: usize,
    /// Messages of the warm-up.
    warm: usize,
    /// Nanoseconds between two messages.
    period_ns: f64,
    size: usize,
    producers: usize,
}

/// How many messages are due before `t_ns` (message k is due at `k * period_ns`).
fn due_before(t_ns: f64, period_ns: f64) -> usize {
    if t_ns <= 0.0 {
        0
    } else {
        (t_ns / period_ns).ceil() as usize
    }
}

/// Stops the pacing thread when the phase ends early (an error, or a cancelled call).
#[derive(Default)]
struct Pacing {
    stop: Arc<AtomicBool>,
}

impl Drop for Pacing {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The pacing thread: hands `(producer, payloads)` over for every message due, until all
/// were handed over (or `stop`); returns how late it was after the warm-up.
fn pace(plan: &Plan, hand: &mut dyn FnMut(usize, Vec<u8>), stop: &AtomicBool) -> Lateness {
    let Plan {
        origin,
        total,
        warm,
        period_ns,
        size,
        producers,
    } = *plan;
    let mut late = Lateness::default();
    let mut next = 0usize;
    let mut turn = 0usize;
    while next < total && !stop.load(Ordering::Relaxed) {
        let now = origin.elapsed().as_nanos() as f64;
        // Every message whose intended time has come, stamped with that time.
        let due = ((now / period_ns).floor() as usize + 1).min(total);
        if due > next {
            if next >= warm {
                let behind_us = ((now - next as f64 * period_ns) / 1e3).max(0.0) as u64;
                late.handovers += 1;
                late.over_1ms += usize::from(behind_us > 1000);
                late.max_us = late.max_us.max(behind_us);
                late.messages_over_1ms += due_before(now - 1e6, period_ns).clamp(next, due) - next;
            }
            // The due payloads back to back, sent as slices of one buffer.
            let mut batch = Vec::with_capacity((due - next) * size);
            for k in next..due {
                write_payload(&mut batch, k as u64, (k as f64 * period_ns) as u64, size);
            }
            hand(turn % producers, batch);
            turn += 1;
            next = due;
        }
        if next < total {
            let wake = Duration::from_nanos((next as f64 * period_ns) as u64);
            let nap = wake.saturating_sub(origin.elapsed()).max(STEP).min(MAX_NAP);
            if !nap.is_zero() {
                std::thread::sleep(nap);
            }
        }
    }
    late
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_due_before_a_time_count_from_the_first() {
        // One message every 250 us: 0, 250, 500, ...
        assert_eq!(due_before(-5.0, 250_000.0), 0);
        assert_eq!(due_before(0.0, 250_000.0), 0);
        assert_eq!(due_before(1.0, 250_000.0), 1);
        assert_eq!(due_before(250_000.0, 250_000.0), 1);
        assert_eq!(due_before(250_001.0, 250_000.0), 2);
        assert_eq!(due_before(1_000_000.0, 250_000.0), 4);
    }
}
