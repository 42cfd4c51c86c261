//! A reusable load driver for failure tests: producers and consumers with id tracking.
//!
//! Producers send batches of numbered messages; consumers receive (and, on at-least-once
//! queues, acknowledge) them. The report says what was attempted, acknowledged by Redis,
//! failed, delivered, lost (acknowledged but never delivered) and duplicated, the longest
//! single call, and the longest time without a delivery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slotq::{Producer, Queue};

/// How much load to make.
#[derive(Debug, Clone, Copy)]
pub struct LoadConfig {
    /// Producer tasks.
    pub producers: usize,
    /// Consumer tasks.
    pub consumers: usize,
    /// Messages per `send_batch` call.
    pub batch: usize,
    /// Pause between a producer's batches.
    pub pause: Duration,
    /// Each message is sent on its own (`send`): a failed send's error is that message's,
    /// so one that says "not stored" can be checked against what was delivered.
    pub one_by_one: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            producers: 2,
            consumers: 2,
            batch: 20,
            pause: Duration::from_millis(5),
            one_by_one: false,
        }
    }
}

#[derive(Default)]
struct Shared {
    attempted: AtomicU64,
    acked_count: AtomicU64,
    failed: AtomicU64,
    next_id: AtomicU64,
    acked: Mutex<Vec<u64>>,
    /// Messages whose send failed with an error that says it was not stored.
    refused: Mutex<Vec<u64>>,
    delivered: Mutex<HashMap<u64, u32>>,
    /// Per shard: instants of deliveries (for stall and resume measurements).
    deliveries_by_shard: Mutex<HashMap<String, Vec<Instant>>>,
    longest_send: Mutex<Duration>,
    longest_recv: Mutex<Duration>,
    last_delivery: Mutex<Option<Instant>>,
    longest_gap: Mutex<Duration>,
    errors: Mutex<Vec<String>>,
    stop_producers: AtomicBool,
    stop_consumers: AtomicBool,
}

/// Running load.
pub struct Load {
    shared: Arc<Shared>,
    producers: Vec<tokio::task::JoinHandle<()>>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

/// What a load run saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// Messages handed to `send_batch`.
    pub attempted: u64,
    /// Messages whose send resolved Ok.
    pub acked: u64,
    /// Messages whose send failed.
    pub failed: u64,
    /// Distinct messages received.
    pub delivered: u64,
    /// Acknowledged messages never received.
    pub lost: u64,
    /// Receptions beyond the first.
    pub duplicated: u64,
    /// Messages whose send failed saying they were not stored (`may_have_run() ==
    /// false`), and that were delivered all the same.
    pub refused_but_stored: u64,
    /// Longest time one shard delivered nothing while producers ran (between two of its
    /// deliveries).
    pub longest_shard_gap: Duration,
    /// Longest single `send_batch` call.
    pub longest_send: Duration,
    /// Longest single receive call.
    pub longest_recv: Duration,
    /// Longest time without any delivery while producers ran (the stall).
    pub longest_gap: Duration,
    /// Distinct error messages seen (first 10).
    pub errors: Vec<String>,
    /// How long the run took.
    pub elapsed: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "attempted {} acked {} failed {} delivered {} lost {} duplicated {} refused but stored {} longest send {:?} longest receive {:?} longest stall {:?} longest shard gap {:?} in {:?}",
            self.attempted,
            self.acked,
            self.failed,
            self.delivered,
            self.lost,
            self.duplicated,
            self.refused_but_stored,
            self.longest_send,
            self.longest_recv,
            self.longest_gap,
            self.longest_shard_gap,
            self.elapsed
        )?;
        if !self.errors.is_empty() {
            write!(f, "; errors: {:?}", self.errors)?;
        }
        Ok(())
    }
}

fn note_max(m: &Mutex<Duration>, d: Duration) {
    let mut g = m.lock().unwrap();
    if d > *g {
        *g = d;
    }
}

fn note_error(shared: &Shared, e: &slotq::Error) {
    let mut errors = shared.errors.lock().unwrap();
    let text = e.to_string();
    if errors.len() < 10 && !errors.contains(&text) {
        errors.push(text);
    }
}

impl Load {
    /// Starts producers (sharing one producer) and consumers on `queue`.
    pub fn start(queue: &Queue, producer: Producer, cfg: LoadConfig) -> Load {
        let shared = Arc::new(Shared::default());
        let producers = (0..cfg.producers)
            .map(|_| {
                let (shared, producer) = (shared.clone(), producer.clone());
                tokio::spawn(async move {
                    while !shared.stop_producers.load(Ordering::Relaxed) {
                        let first = shared
                            .next_id
                            .fetch_add(cfg.batch as u64, Ordering::Relaxed);
                        let ids: Vec<u64> = (first..first + cfg.batch as u64).collect();
                        shared
                            .attempted
                            .fetch_add(ids.len() as u64, Ordering::Relaxed);
                        let t0 = Instant::now();
                        let results = if cfg.one_by_one {
                            let sends = ids.iter().map(|i| producer.send(i.to_string()));
                            futures::future::join_all(sends).await
                        } else {
                            let r = producer.send_batch(ids.iter().map(|i| i.to_string())).await;
                            vec![r; ids.len()]
                        };
                        note_max(&shared.longest_send, t0.elapsed());
                        for (id, r) in ids.iter().zip(results) {
                            match r {
                                Ok(()) => {
                                    shared.acked_count.fetch_add(1, Ordering::Relaxed);
                                    shared.acked.lock().unwrap().push(*id);
                                }
                                Err(e) => {
                                    shared.failed.fetch_add(1, Ordering::Relaxed);
                                    // One message's own error only when sent on its own.
                                    if cfg.one_by_one && !e.may_have_run() {
                                        shared.refused.lock().unwrap().push(*id);
                                    }
                                    note_error(&shared, &e);
                                }
                            }
                        }
                        tokio::time::sleep(cfg.pause).await;
                    }
                })
            })
            .collect();
        let consumers = (0..cfg.consumers)
            .map(|_| {
                let shared = shared.clone();
                let mut consumer = queue
                    .consumer()
                    .block_timeout(Duration::from_millis(500))
                    .lease(Duration::from_secs(3))
                    .build()
                    .expect("consumer");
                let reliable = queue.mode() != slotq::DeliveryMode::AtMostOnce;
                tokio::spawn(async move {
                    while !shared.stop_consumers.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        let r = consumer
                            .recv_batch_timeout(500, Duration::from_millis(200))
                            .await;
                        note_max(&shared.longest_recv, t0.elapsed());
                        let batch = match r {
                            Ok(b) => b,
                            Err(e) => {
                                note_error(&shared, &e);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        if batch.is_empty() {
                            continue;
                        }
                        let now = Instant::now();
                        if !shared.stop_producers.load(Ordering::Relaxed) {
                            let mut last = shared.last_delivery.lock().unwrap();
                            if let Some(prev) = *last {
                                note_max(&shared.longest_gap, now - prev);
                            }
                            *last = Some(now);
                        }
                        {
                            let mut d = shared.delivered.lock().unwrap();
                            let mut by_shard = shared.deliveries_by_shard.lock().unwrap();
                            for m in &batch {
                                let id: u64 = String::from_utf8_lossy(&m.payload)
                                    .parse()
                                    .unwrap_or(u64::MAX);
                                *d.entry(id).or_default() += 1;
                                by_shard.entry(m.shard.to_string()).or_default().push(now);
                            }
                        }
                        if reliable && let Err(e) = consumer.ack_all(&batch).await {
                            // Unacknowledged messages come back after their lease.
                            note_error(&shared, &e);
                        }
                    }
                    consumer.close().await;
                })
            })
            .collect();
        Load {
            shared,
            producers,
            consumers,
            started: Instant::now(),
        }
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked_count.load(Ordering::Relaxed)
    }

    /// The first delivery from `shard` at or after `since`.
    pub fn first_delivery_after(&self, shard: &str, since: Instant) -> Option<Instant> {
        self.shared
            .deliveries_by_shard
            .lock()
            .unwrap()
            .get(shard)
            .and_then(|v| v.iter().copied().find(|t| *t >= since))
    }

    /// Stops the producers, lets the consumers drain until every acknowledged message was
    /// delivered (or `drain` passes), stops them, and reports.
    pub async fn finish(self, drain: Duration) -> Report {
        self.shared.stop_producers.store(true, Ordering::Relaxed);
        for p in self.producers {
            let _ = p.await;
        }
        let deadline = Instant::now() + drain;
        loop {
            let missing = {
                let acked = self.shared.acked.lock().unwrap();
                let d = self.shared.delivered.lock().unwrap();
                acked.iter().filter(|id| !d.contains_key(id)).count()
            };
            if missing == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.shared.stop_consumers.store(true, Ordering::Relaxed);
        for c in self.consumers {
            let _ = c.await;
        }
        let acked = self.shared.acked.lock().unwrap();
        let d = self.shared.delivered.lock().unwrap();
        let refused = self.shared.refused.lock().unwrap();
        let longest_shard_gap = self
            .shared
            .deliveries_by_shard
            .lock()
            .unwrap()
            .values()
            .flat_map(|v| v.windows(2).map(|w| w[1] - w[0]))
            .max()
            .unwrap_or_default();
        Report {
            refused_but_stored: refused.iter().filter(|id| d.contains_key(id)).count() as u64,
            longest_shard_gap,
            attempted: self.shared.attempted.load(Ordering::Relaxed),
            acked: acked.len() as u64,
            failed: self.shared.failed.load(Ordering::Relaxed),
            delivered: d.len() as u64,
            lost: acked.iter().filter(|id| !d.contains_key(id)).count() as u64,
            duplicated: d.values().map(|&n| n as u64 - 1).sum(),
            longest_send: *self.shared.longest_send.lock().unwrap(),
            longest_recv: *self.shared.longest_recv.lock().unwrap(),
            longest_gap: *self.shared.longest_gap.lock().unwrap(),
            errors: self.shared.errors.lock().unwrap().clone(),
            elapsed: self.started.elapsed(),
        }
    }
}
