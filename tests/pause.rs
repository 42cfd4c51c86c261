//! Pausing a queue: every consumer stops taking new messages within a registry poll and
//! gives back what it held, producers go on sending, nothing is lost, and the pause
//! survives a failover of the registry's master.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slotq::{Client, Queue};
use slotq_testkit::{ClusterBuilder, TestCluster};

/// Sends numbered messages until told to stop; returns the numbers acknowledged.
fn produce(q: &Queue, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u64>> {
    let producer = q.producer().build().unwrap();
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<String> = (n..n + 10).map(|i| i.to_string()).collect();
            if producer.send_batch(&batch).await.is_ok() {
                acked.extend(n..n + 10);
            }
            n += 10;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acked
    })
}

/// Two consumers of the default group, recording (when, number) of every delivery.
type Seen = Arc<Mutex<Vec<(Instant, u64)>>>;

fn consume(q: &Queue, seen: &Seen, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..2)
        .map(|_| {
            let mut consumer = q.consumer().build().unwrap();
            let (seen, stop) = (seen.clone(), stop.clone());
            let reliable = q.mode() != slotq::DeliveryMode::AtMostOnce;
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let batch = consumer
                        .recv_batch_timeout(100, Duration::from_millis(200))
                        .await
                        .unwrap();
                    let now = Instant::now();
                    seen.lock().unwrap().extend(
                        batch
                            .iter()
                            .map(|m| (now, String::from_utf8_lossy(&m.payload).parse().unwrap())),
                    );
                    if reliable {
                        consumer.ack_all(&batch).await.unwrap();
                    }
                }
                consumer.close().await;
            })
        })
        .collect()
}

async fn paused_while_sending(c: &TestCluster, reliable: bool) {
    let client = Client::from_cluster(slotq_tests::router(&c.url()).await);
    let name = if reliable { "pause-alo" } else { "pause-amo" };
    let mut b = client.queue(name);
    if reliable {
        b = b.reliable();
    }
    let q = b.open().await.unwrap();
    let (stop_sending, stop_consuming) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let seen: Seen = Arc::default();
    let sending = produce(&q, stop_sending.clone());
    let consumers = consume(&q, &seen, &stop_consuming);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!seen.lock().unwrap().is_empty(), "consumers take messages");

    // Paused from another client, as an operator would.
    let other = Client::from_cluster(slotq_tests::router(&c.url()).await);
    let admin = other.queue(name).must_exist().open().await.unwrap();
    assert!(admin.pause().await.unwrap());
    assert!(!admin.pause().await.unwrap(), "paused already");
    let paused_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let last = seen.lock().unwrap().iter().map(|(t, _)| *t).max().unwrap();
    // One registry poll (1 s), and the round or batch under way.
    assert!(
        last <= paused_at + Duration::from_millis(1500),
        "a delivery {:?} after the pause",
        last - paused_at
    );
    // Nothing is held: everything not handed out went back.
    let stats = admin.stats().await.unwrap();
    let depth: u64 = stats.iter().map(|s| s.depth).sum();
    let in_flight: u64 = stats.iter().filter_map(|s| s.in_flight).sum();
    assert!(depth > 0, "producers go on sending");
    assert_eq!(in_flight, 0, "a paused queue's consumers hold no lease");

    assert!(admin.resume().await.unwrap());
    let resumed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_sending.store(true, Ordering::Relaxed);
    let acked = sending.await.unwrap();
    let first_after = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| *t > resumed_at)
        .min()
        .expect("deliveries resume");
    assert!(first_after <= resumed_at + Duration::from_millis(1500));
    // Everything sent is delivered, once.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got: std::collections::HashSet<u64> =
            seen.lock().unwrap().iter().map(|(_, n)| *n).collect();
        if acked.iter().all(|n| got.contains(n)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_consuming.store(true, Ordering::Relaxed);
    for t in consumers {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    let got: std::collections::HashSet<u64> = seen.iter().map(|(_, n)| *n).collect();
    let lost = acked.iter().filter(|n| !got.contains(n)).count();
    eprintln!(
        "{name}: {} sent, {} deliveries, {lost} lost",
        acked.len(),
        seen.len()
    );
    assert_eq!(lost, 0);
    if !reliable {
        assert_eq!(seen.len(), got.len(), "at most once: nothing twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_is_not_consumed_and_loses_nothing() {
    let c = TestCluster::start(3, 0).unwrap();
    paused_while_sending(&c, true).await;
    paused_while_sending(&c, false).await;
}

/// An idle consumer of a paused queue costs the servers no more than one of an empty queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_costs_its_idle_consumers_no_more_than_an_empty_one() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = Client::from_cluster(slotq_tests::router(&c.url()).await);
    let q = client.queue("idle").reliable().open().await.unwrap();
    let mut cost = Vec::new();
    for paused in [false, true] {
        if paused {
            q.pause().await.unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let consumers = consume(&q, &Arc::default(), &stop);
        // Past the start (joining, first sweeps), then counted for 4 s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = slotq_tests::total_commands(&c);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let after = slotq_tests::total_commands(&c);
        stop.store(true, Ordering::Relaxed);
        for t in consumers {
            t.await.unwrap();
        }
        // `INFO` itself counts once per node per call.
        cost.push(after - before - c.len() as u64);
    }
    eprintln!(
        "commands in 4 s, two idle consumers: empty {}, paused {}",
        cost[0], cost[1]
    );
    assert!(cost[1] <= cost[0], "paused {} > empty {}", cost[1], cost[0]);
}

/// The pause is in the registry, written with a `WAIT` for its master's replicas: a kill
/// -9 of that master right after does not undo it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_survives_a_failover_of_the_registry_master() {
    let mut c = ClusterBuilder::new()
        .masters(3)
        .replicas(1)
        .node_timeout_ms(1000)
        .start()
        .unwrap();
    let client = Client::from_cluster(slotq_tests::router(&c.url()).await);
    let q = client.queue("paused-over").open().await.unwrap();
    assert!(q.pause().await.unwrap());
    let registry = c.owner_of(slotq::slot::key_slot(q.meta_key())).unwrap();
    let replica = c.replicas_of(registry)[0];
    c.node_mut(registry).kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.owner_of(slotq::slot::key_slot(q.meta_key())) != Some(replica) {
        assert!(Instant::now() < deadline, "no promotion");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = c.node(replica).url();
    let fresh = Client::from_cluster(slotq_tests::router(&url).await);
    let again = fresh
        .queue("paused-over")
        .must_exist()
        .open()
        .await
        .unwrap();
    assert!(again.is_paused(), "the promoted replica has the pause");
    assert!(again.resume().await.unwrap());
}
