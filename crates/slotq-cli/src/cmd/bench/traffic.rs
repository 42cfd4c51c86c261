//! The bench's traffic: payloads that carry their id and send time, producer tasks that
//! send them, consumer tasks that receive them and measure their latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use slotq::Queue;

use super::{HEADER, KEYS, PRODUCER_CHUNK};
use crate::CliError;
use crate::args::BenchArgs;

/// A payload: id, send time (nanoseconds since the bench started), padding.
pub(super) fn payload(id: u64, sent_ns: u64, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size);
    write_payload(&mut p, id, sent_ns, size);
    p
}

/// Appends [`payload`] to `out`: a chunk's payloads go in one buffer, sent as slices of
/// it, as a fast producer would hand them over.
pub(super) fn write_payload(out: &mut Vec<u8>, id: u64, sent_ns: u64, size: usize) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&sent_ns.to_be_bytes());
    out.resize(out.len() + size - HEADER, b'x');
}

/// The payloads `first..end` sent at `sent_ns`, back to back (see [`write_payload`]).
fn payloads(first: u64, end: u64, sent_ns: u64, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity((end - first) as usize * size);
    for id in first..end {
        write_payload(&mut out, id, sent_ns, size);
    }
    out
}

pub(super) fn nanos_since(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// Splits `total` messages over `tasks` tasks: `(first id, count)` each.
fn shares(total: usize, tasks: usize) -> Vec<(u64, usize)> {
    let base = total / tasks;
    let extra = total % tasks;
    let mut first = 0u64;
    (0..tasks)
        .map(|t| {
            let n = base + usize::from(t < extra);
            let s = (first, n);
            first += n as u64;
            s
        })
        .collect()
}

pub(super) async fn produce(
    q: &Queue,
    args: &BenchArgs,
    start: Instant,
    pb: &ProgressBar,
) -> Result<(), CliError> {
    let mut producer = q.producer();
    if args.no_durability {
        producer = producer.no_durability();
    }
    let producer = producer.build()?;
    let mut tasks = Vec::new();
    for (first, n) in shares(args.messages, args.producers) {
        let producer = producer.clone();
        let pb = pb.clone();
        let (keyed, one_by_one, size) = (args.keyed, args.one_by_one, args.size);
        tasks.push(tokio::spawn(async move {
            let mut id = first;
            let end = first + n as u64;
            while id < end {
                let chunk_end = (id + PRODUCER_CHUNK as u64).min(end);
                // One clock read per chunk: the chunk is handed over at once.
                let sent = nanos_since(start);
                match (keyed, one_by_one) {
                    (true, false) => {
                        let buf = payloads(id, chunk_end, sent, size);
                        producer
                            .send_keyed_batch(
                                (id..chunk_end)
                                    .map(|i| (i % KEYS).to_be_bytes())
                                    .zip(buf.chunks(size)),
                            )
                            .await?
                    }
                    (false, false) => {
                        let buf = payloads(id, chunk_end, sent, size);
                        producer.send_batch(buf.chunks(size)).await?
                    }
                    (keyed, true) => {
                        let sends = (id..chunk_end).map(|i| {
                            let producer = producer.clone();
                            async move {
                                let p = payload(i, sent, size);
                                if keyed {
                                    producer.send_keyed((i % KEYS).to_be_bytes(), p).await
                                } else {
                                    producer.send(p).await
                                }
                            }
                        });
                        for r in futures::future::join_all(sends).await {
                            r?;
                        }
                    }
                }
                pb.inc(chunk_end - id);
                id = chunk_end;
            }
            Ok::<_, slotq::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| CliError::Other(e.to_string()))??;
    }
    Ok(())
}

/// Where a consumer measures latency from: the bench's start (send times are nanoseconds
/// since then), and the send time before which messages belong to the warm-up.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    pub(super) origin: Instant,
    /// Messages due before this (ns since `origin`) are the warm-up's: measured apart.
    pub(super) measure_from_ns: u64,
}

/// What the consumers of a phase received.
pub(super) struct Received {
    /// Latency (send time to receipt, microseconds) of the measured messages.
    pub(super) latency: Histogram<u64>,
    /// Latency of the warm-up's messages.
    pub(super) warm_up: Histogram<u64>,
    /// How many messages each consumer took.
    pub(super) counts: Vec<usize>,
    /// When the last message arrived (a phase ends there, not when the consumers have
    /// shut down).
    pub(super) last: Instant,
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Consumer tasks receive until `target` messages arrived in total; with a clock, they
/// measure each message's latency from its send time to its receipt.
pub(super) async fn consume(
    q: &Queue,
    args: &BenchArgs,
    target: usize,
    clock: Option<Clock>,
    pb: &ProgressBar,
) -> Result<Received, CliError> {
    let got = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut tasks = Vec::new();
    let reliable = args.reliable;
    for _ in 0..args.consumers {
        let mut builder = q.consumer().prefetch(!args.no_prefetch);
        if args.no_durability {
            builder = builder.unconfirmed_pops();
        }
        let mut consumer = if args.without_group {
            builder.without_group().build()?
        } else if args.ordered {
            builder.ordered().build()?
        } else {
            builder.build()?
        };
        let got = got.clone();
        let last = last.clone();
        let pb = pb.clone();
        tasks.push(tokio::spawn(async move {
            let (mut hist, mut warm) = (histogram(), histogram());
            let mut mine = 0usize;
            while got.load(Ordering::Relaxed) < target {
                let batch = consumer
                    .recv_batch_timeout(1000, Duration::from_millis(200))
                    .await?;
                // Latency ends at receipt: before the batch is acknowledged.
                let received = clock.map(|c| (nanos_since(c.origin), c.measure_from_ns));
                if reliable && !batch.is_empty() {
                    consumer.ack_all(&batch).await?;
                }
                if let Some((now, from)) = received {
                    let sent = batch.iter().map(sent_at);
                    if from == 0 {
                        record(&mut hist, now, sent);
                    } else {
                        record(&mut warm, now, sent.clone().filter(|&t| t < from));
                        record(&mut hist, now, sent.filter(|&t| t >= from));
                    }
                }
                let before = got.fetch_add(batch.len(), Ordering::Relaxed);
                if before < target && before + batch.len() >= target {
                    *last.lock().unwrap() = Instant::now();
                }
                mine += batch.len();
                pb.inc(batch.len() as u64);
            }
            consumer.close().await;
            Ok::<_, slotq::Error>((hist, warm, mine))
        }));
    }
    let (mut latency, mut warm_up) = (histogram(), histogram());
    let mut counts = Vec::new();
    for t in tasks {
        let (h, w, n) = t.await.map_err(|e| CliError::Other(e.to_string()))??;
        latency
            .add(&h)
            .map_err(|e| CliError::Other(e.to_string()))?;
        warm_up
            .add(&w)
            .map_err(|e| CliError::Other(e.to_string()))?;
        counts.push(n);
    }
    let last = *last.lock().unwrap();
    Ok(Received {
        latency,
        warm_up,
        counts,
        last,
    })
}

/// When a bench message was sent (ns since the start), from its payload.
fn sent_at(m: &slotq::Message) -> u64 {
    u64::from_be_bytes(m.payload[8..16].try_into().unwrap_or_default())
}

/// Records the latency of messages received at `now` and sent at `sent` (ns since the
/// start): runs of messages sent at the same time (a producer chunk's, stamped once) are
/// one entry with their count, which measures the same and costs one histogram update a
/// run.
fn record(hist: &mut Histogram<u64>, now: u64, sent: impl Iterator<Item = u64>) {
    let mut run: Option<(u64, u64)> = None;
    for t in sent {
        match &mut run {
            Some((at, n)) if *at == t => *n += 1,
            _ => {
                if let Some((at, n)) = run {
                    let _ = hist.record_n((now.saturating_sub(at) / 1000).max(1), n);
                }
                run = Some((t, 1));
            }
        }
    }
    if let Some((at, n)) = run {
        let _ = hist.record_n((now.saturating_sub(at) / 1000).max(1), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_one_send_time_record_as_each_message_would() {
        let sent = [
            5_000u64, 5_000, 5_000, 90_000, 7_000, 7_000, 5_000, 2_000_000,
        ];
        let now = 3_000_000;
        let mut runs = histogram();
        record(&mut runs, now, sent.iter().copied());
        let mut each = histogram();
        for t in sent {
            each.record(((now - t) / 1000).max(1)).unwrap();
        }
        assert_eq!(runs.len(), sent.len() as u64);
        assert_eq!(runs, each);
        record(&mut runs, now, std::iter::empty());
        assert_eq!(runs.len(), sent.len() as u64);
    }
}
