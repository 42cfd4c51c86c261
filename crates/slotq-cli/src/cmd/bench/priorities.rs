//! `slotq bench --priorities N`: what priorities keep under load, and what they cost.
//!
//! 1. A queue created with priorities: `--producers` send N messages (10% high, 60%
//!    normal, 30% low, mixed in every batch) as fast as they can while `--consumers` (a
//!    group) take them. Each payload carries its level and send time; each consumer
//!    records when it got each message. Reported: msgs/s, latency per level, and
//!    **inversions**: messages taken while a message of a higher level, sent at least R
//!    earlier, was still waiting (R = 5 ms and 50 ms, longer than a round), which the
//!    design says never happens.
//! 2. The same N, all normal, on a queue without priorities: msgs/s, so the first part's
//!    throughput is a ratio against one level measured in the same run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use slotq::{Client, Priority, Queue, SendOptions};

use crate::CliError;
use crate::args::BenchArgs;

/// Waiting bounds the inversions are counted against.
const BOUNDS_MS: [u64; 2] = [5, 50];

/// What the priorities bench measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub masters: usize,
    pub producers: usize,
    pub consumers: usize,
    pub messages: usize,
    /// msgs/s with priorities, and all normal on a queue without them: pushing and taking
    /// at once, and taking a backlog of N.
    pub rate_priorities: f64,
    pub rate_one_level: f64,
    pub drain_priorities: f64,
    pub drain_one_level: f64,
    /// Inversions while taking the backlog (R in ms, count).
    pub backlog_inversions: Vec<(u64, u64)>,
    /// Latency from send to receipt, ms, per level (high, normal, low): p50, p99.
    pub latency_ms: Vec<(String, f64, f64)>,
    /// (R in ms, messages taken while a higher-level message sent at least R earlier was
    /// still waiting).
    pub inversions: Vec<(u64, u64)>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn level_at(i: usize) -> Priority {
    match i % 10 {
        0 => Priority::High,
        1..=6 => Priority::Normal,
        _ => Priority::Low,
    }
}

/// (level, sent µs, received µs) of every message.
type Seen = Arc<Mutex<Vec<(Priority, u64, u64)>>>;

/// Sends N messages (levels mixed, or all normal) in sends of 100 (one level each) while
/// the consumers take them, or (`backlog`) all of them first; msgs/s of the consumers (from
/// the first send, or from when they start on the backlog).
async fn phase(
    q: &Queue,
    args: &BenchArgs,
    n: usize,
    mixed: bool,
    backlog: bool,
    seen: &Seen,
) -> Result<f64, CliError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start_consumers = |seen: Seen, received: Arc<std::sync::atomic::AtomicUsize>| {
        let mut consumers = Vec::new();
        for _ in 0..args.consumers {
            let mut c = if args.without_group {
                q.consumer().without_group().build()?
            } else {
                q.consumer().build()?
            };
            let (seen, received) = (seen.clone(), received.clone());
            let mut stop = stop_rx.clone();
            consumers.push(tokio::spawn(async move {
                loop {
                    let batch = tokio::select! {
                        b = c.recv_batch_timeout(1000, Duration::from_millis(200)) => b,
                        _ = stop.wait_for(|s| *s) => break,
                    };
                    let Ok(batch) = batch else { continue };
                    let at = now_us();
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    for m in &batch {
                        let level = match m.payload.first() {
                            Some(b'h') => Priority::High,
                            Some(b'l') => Priority::Low,
                            _ => Priority::Normal,
                        };
                        let sent = m
                            .payload
                            .get(1..9)
                            .and_then(|b| b.try_into().ok())
                            .map_or(0, u64::from_be_bytes);
                        s.push((level, sent, at));
                    }
                    received.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
                }
                c.close().await;
            }));
        }
        Ok::<_, CliError>(consumers)
    };
    let mut consumers = Vec::new();
    if !backlog {
        consumers = start_consumers(seen.clone(), received.clone())?;
        // Let the group settle before the clock starts.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let mut started = Instant::now();
    let per = n.div_ceil(args.producers);
    let mut producers = Vec::new();
    for p in 0..args.producers {
        let producer = q.producer().build()?;
        let size = args.size.max(9);
        let range = (p * per)..((p + 1) * per).min(n);
        producers.push(tokio::spawn(async move {
            let ids: Vec<usize> = range.collect();
            for chunk in ids.chunks(100) {
                // One level per send, levels mixed over the sends.
                let level = if mixed {
                    level_at(chunk[0] / 100)
                } else {
                    Priority::Normal
                };
                let ps: Vec<Vec<u8>> = chunk
                    .iter()
                    .map(|_| {
                        let mut b = vec![level.as_str().as_bytes()[0]];
                        b.extend_from_slice(&now_us().to_be_bytes());
                        b.resize(size, b'x');
                        b
                    })
                    .collect();
                producer
                    .send_batch_with(ps, &SendOptions::new().priority(level))
                    .await?;
            }
            Ok::<(), slotq::Error>(())
        }));
    }
    for p in producers {
        p.await
            .map_err(|e| CliError::Other(format!("producer task: {e}")))??;
    }
    if backlog {
        started = Instant::now();
        consumers = start_consumers(seen.clone(), received.clone())?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.load(std::sync::atomic::Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for c in consumers {
        let _ = c.await;
    }
    Ok(received.load(std::sync::atomic::Ordering::Relaxed) as f64 / secs)
}

/// Messages taken while a message of a higher level, sent at least `bound` µs earlier, was
/// still waiting.
fn inversions(seen: &[(Priority, u64, u64)], bound: u64) -> u64 {
    let mut count = 0;
    for higher in [Priority::High, Priority::Normal] {
        // Messages of `higher` and above, by send time, with the latest receipt so far.
        let mut tops: Vec<(u64, u64)> = seen
            .iter()
            .filter(|(l, _, _)| *l <= higher)
            .map(|(_, s, r)| (*s, *r))
            .collect();
        tops.sort_unstable();
        let mut latest = Vec::with_capacity(tops.len());
        let mut max = 0;
        for (_, r) in &tops {
            max = max.max(*r);
            latest.push(max);
        }
        for (l, _, taken) in seen.iter().filter(|(l, _, _)| *l > higher) {
            // Counted once: against the level just above it.
            if (higher == Priority::High) != (*l == Priority::Normal) {
                continue;
            }
            let Some(cut) = taken.checked_sub(bound) else {
                continue;
            };
            let k = tops.partition_point(|(s, _)| *s <= cut);
            if k > 0 && latest[k - 1] > *taken {
                count += 1;
            }
        }
    }
    count
}

fn quantile(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i] as f64 / 1000.0
}

/// Runs both parts.
pub async fn run(q: &Queue, args: &BenchArgs, n: usize, as_json: bool) -> Result<String, CliError> {
    let client = Client::from_cluster(q.cluster().clone());
    let name = format!("{}-prio", q.name());
    let prio = client.queue(&name).priorities().open().await?;
    let seen: Seen = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let rate_priorities = phase(&prio, args, n, true, false, &seen).await;
    let drained: Seen = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let drain_priorities = match rate_priorities {
        Ok(_) => phase(&prio, args, n, true, true, &drained).await,
        Err(_) => Ok(0.0),
    };
    super::cleanup(&prio).await;
    let (rate_priorities, drain_priorities) = (rate_priorities?, drain_priorities?);
    let one: Seen = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let rate_one_level = phase(q, args, n, false, false, &one).await?;
    let drain_one_level = phase(q, args, n, false, true, &one).await?;
    let backlog_inversions = {
        let d = drained.lock().unwrap_or_else(|p| p.into_inner());
        BOUNDS_MS
            .iter()
            .map(|b| (*b, inversions(&d, b * 1000)))
            .collect()
    };
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let latency_ms = slotq::priority::LEVELS
        .iter()
        .map(|level| {
            let mut v: Vec<u64> = seen
                .iter()
                .filter(|(l, _, _)| l == level)
                .map(|(_, s, r)| r.saturating_sub(*s))
                .collect();
            (
                level.to_string(),
                quantile(&mut v, 0.5),
                quantile(&mut v, 0.99),
            )
        })
        .collect();
    let report = Report {
        masters: q.cluster().topology().masters().len(),
        producers: args.producers,
        consumers: args.consumers,
        messages: n,
        rate_priorities,
        rate_one_level,
        drain_priorities,
        drain_one_level,
        backlog_inversions,
        latency_ms,
        inversions: BOUNDS_MS
            .iter()
            .map(|b| (*b, inversions(&seen, b * 1000)))
            .collect(),
    };
    if as_json {
        return Ok(crate::json::line(&report));
    }
    let mut out = format!(
        "priorities, {} masters, {} producer(s), {} consumer(s), {} messages (10% high, 60% normal, 30% low, sends of 100)\n\
         pushing and taking at once: with priorities {:.0} msgs/s, one level {:.0} msgs/s ({:.2}x)\n\
         taking a backlog of {n}: with priorities {:.0} msgs/s, one level {:.0} msgs/s ({:.2}x)\n",
        report.masters,
        report.producers,
        report.consumers,
        n,
        report.rate_priorities,
        report.rate_one_level,
        report.rate_priorities / report.rate_one_level.max(1.0),
        report.drain_priorities,
        report.drain_one_level,
        report.drain_priorities / report.drain_one_level.max(1.0),
    );
    for (level, p50, p99) in &report.latency_ms {
        out.push_str(&format!(
            "{level:>6}: send -> received p50 {p50:.1} ms, p99 {p99:.1} ms (at once)\n"
        ));
    }
    for ((b, n), (_, m)) in report.inversions.iter().zip(&report.backlog_inversions) {
        out.push_str(&format!(
            "taken while a higher level sent {b} ms or more earlier still waited: {n} (at once), {m} (backlog)\n"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inversion_is_a_lower_message_taken_while_an_older_higher_one_waits() {
        use Priority::*;
        // (level, sent, received) in µs.
        let seen = [
            (High, 0, 20_000),       // waits 20 ms
            (Low, 10_000, 12_000),   // taken at 12 ms while the high one (sent 12 ms earlier) waits
            (Normal, 1_000, 25_000), // taken after it: fine
            (Low, 30_000, 31_000),   // nothing higher waits then
        ];
        assert_eq!(inversions(&seen, 5_000), 1);
        assert_eq!(inversions(&seen, 15_000), 0);
    }
}
