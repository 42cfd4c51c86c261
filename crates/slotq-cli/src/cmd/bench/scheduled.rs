//! `slotq bench --scheduled N`: how late scheduled messages become ready and reach idle
//! consumers, and what a large number of them waiting costs idle consumers.
//!
//! Two parts, against the same queue:
//! 1. **Idle cost**: `--consumers` idle consumers (a group) for 4 s with nothing scheduled,
//!    then again with N messages scheduled an hour ahead: commands the masters processed
//!    in each window (`INFO stats`), which should not differ.
//! 2. **Lateness**: those N are cancelled, and min(N, 20,000) messages are scheduled over
//!    `--duration` seconds starting 1 s ahead (due times spread evenly, batches of 10 per due time)
//!    while the consumers wait; each payload carries its due time, each consumer records
//!    arrival minus due. Reported: p50, p99, p99.9 and the worst, and how many came early
//!    (none should). The producer stays alive, as a service would.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;
use slotq::{Cluster, Queue};

use crate::CliError;
use crate::args::BenchArgs;

/// Scheduled messages per due time.
const PER_DUE: usize = 10;
/// Most messages of the lateness part (sent within the first second of the span).
const LATENESS_MESSAGES: usize = 20_000;
/// The idle windows.
const IDLE_WINDOW: Duration = Duration::from_secs(4);

/// What the scheduled bench measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Masters of the cluster.
    pub masters: usize,
    /// Consumers.
    pub consumers: usize,
    /// Messages waiting an hour ahead in the idle-cost part.
    pub scheduled: usize,
    /// Messages of the lateness part.
    pub lateness_messages: usize,
    /// Commands the masters processed in 4 s of idle consumers, nothing scheduled.
    pub idle_commands_empty: u64,
    /// The same with `scheduled` messages waiting an hour ahead.
    pub idle_commands_waiting: u64,
    /// Lateness from due time to arrival at a consumer, ms: p50, p99, p99.9, max.
    pub late_ms: (f64, f64, f64, f64),
    /// Messages that arrived before their due time.
    pub early: u64,
    /// Messages received.
    pub received: usize,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Commands processed so far by every master.
async fn commands(cluster: &Cluster) -> Result<u64, CliError> {
    let mut total = 0;
    for m in cluster.topology().masters() {
        let info: String = cluster
            .node_query(&m.addr, slotq::redis::cmd("INFO").arg("stats"))
            .await?;
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

async fn idle_commands(cluster: &Cluster) -> Result<u64, CliError> {
    let before = commands(cluster).await?;
    tokio::time::sleep(IDLE_WINDOW).await;
    Ok(commands(cluster).await?.saturating_sub(before))
}

/// Runs both parts.
pub async fn run(
    cluster: &Cluster,
    q: &Queue,
    args: &BenchArgs,
    n: usize,
    as_json: bool,
) -> Result<String, CliError> {
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds"),
    ));
    let early = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..args.consumers {
        let mut c = q.consumer().build()?;
        let (hist, early, received) = (hist.clone(), early.clone(), received.clone());
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    b = c.recv_batch_timeout(1000, Duration::from_millis(500)) => b,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let Ok(batch) = batch else { continue };
                let at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                {
                    let mut h = hist.lock().unwrap_or_else(|p| p.into_inner());
                    for m in &batch {
                        let due = m.payload.get(..8).and_then(|b| b.try_into().ok());
                        let due_us = u64::from_be_bytes(due.unwrap_or([0; 8])) * 1000;
                        if at < due_us {
                            early.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        } else {
                            let _ = h.record((at - due_us).max(1));
                        }
                    }
                }
                received.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
                if batch.iter().any(|m| m.id.is_some()) {
                    let _ = c.ack_all(&batch).await;
                }
            }
            c.close().await;
        }));
    }
    let producer = q.producer().build()?;
    let show = !as_json;
    // Idle consumers first (let them join their group and settle into their waits).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let empty = idle_commands(cluster).await?;
    let hour = SystemTime::now() + Duration::from_secs(3600);
    let payload = |due: u64| {
        let mut p = due.to_be_bytes().to_vec();
        p.resize(args.size.max(8), b'x');
        p
    };
    let mut far = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let ps: Vec<Vec<u8>> = chunk.iter().map(|_| payload(u64::MAX / 2000)).collect();
        far.extend(producer.send_batch_at(ps, hour).await?);
    }
    if show {
        eprintln!("{n} message(s) scheduled an hour ahead; measuring idle consumers");
    }
    let waiting = idle_commands(cluster).await?;
    for ids in far.chunks(1000) {
        q.cancel(ids).await?;
    }
    // Lateness: due times spread over --duration, from 1 s ahead.
    let n = n.min(LATENESS_MESSAGES);
    let start = now_ms() + 1000;
    let span = (args.duration * 1000.0) as u64;
    let dues = n.div_ceil(PER_DUE).max(1) as u64;
    let sending = Instant::now();
    for k in 0..dues {
        let due = start + span * k / dues;
        let count = PER_DUE.min(n - (k as usize) * PER_DUE);
        let ps: Vec<Vec<u8>> = (0..count).map(|_| payload(due)).collect();
        producer
            .send_batch_at(ps, UNIX_EPOCH + Duration::from_millis(due))
            .await?;
    }
    if show {
        eprintln!(
            "{n} message(s) scheduled over {:.1} s (sent in {:.2} s); waiting for them",
            args.duration,
            sending.elapsed().as_secs_f64()
        );
    }
    let deadline = Instant::now() + Duration::from_millis(span + 1000) + Duration::from_secs(10);
    while received.load(std::sync::atomic::Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let h = hist.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let report = Report {
        masters: cluster.topology().masters().len(),
        consumers: args.consumers,
        scheduled: far.len(),
        lateness_messages: n,
        idle_commands_empty: empty,
        idle_commands_waiting: waiting,
        late_ms: (ms(0.5), ms(0.99), ms(0.999), h.max() as f64 / 1000.0),
        early: early.load(std::sync::atomic::Ordering::Relaxed),
        received: received.load(std::sync::atomic::Ordering::Relaxed),
    };
    if as_json {
        return Ok(crate::json::line(&report));
    }
    Ok(format!(
        "scheduled sends, {} masters, {} consumer(s)\n\
         idle consumers, commands in 4 s: {} with nothing scheduled, {} with {} waiting an hour ahead\n\
         lateness (due -> received): p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms; {} early; {} of {} received\n",
        report.masters,
        report.consumers,
        report.idle_commands_empty,
        report.idle_commands_waiting,
        report.scheduled,
        report.late_ms.0,
        report.late_ms.1,
        report.late_ms.2,
        report.late_ms.3,
        report.early,
        report.received,
        n
    ))
}
