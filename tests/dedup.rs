//! Dedup ids and the idempotent producer, against real clusters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slotq::{Client, Error};
use slotq_testkit::{ClusterBuilder, TestCluster};

/// Every message left in the queue, with how many times each payload is there.
async fn contents(q: &slotq::Queue) -> HashMap<String, usize> {
    let mut consumer = q.consumer().without_group().build().unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    loop {
        let batch = consumer
            .recv_batch_timeout(1000, Duration::from_secs(2))
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        if q.mode() != slotq::DeliveryMode::AtMostOnce {
            consumer.ack_all(&batch).await.unwrap();
        }
        for m in &batch {
            *seen
                .entry(String::from_utf8_lossy(&m.payload).into_owned())
                .or_default() += 1;
        }
    }
    consumer.close().await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_id_is_enqueued_once_within_its_window_by_any_producer() {
    let c = TestCluster::start(3, 0).unwrap();
    for reliable in [false, true] {
        let name = if reliable { "dedup-alo" } else { "dedup-amo" };
        let one = Client::from_cluster(slotq_tests::router(&c.url()).await);
        let other = Client::from_cluster(slotq_tests::router(&c.url()).await);
        let mut b = one.queue(name);
        if reliable {
            b = b.reliable();
        }
        let q = b.open().await.unwrap();
        let q2 = other.queue(name).must_exist().open().await.unwrap();
        let p1 = q.producer().build().unwrap();
        let p2 = q2
            .producer()
            .dedup_window(Duration::from_millis(300))
            .build()
            .unwrap();
        p1.send_dedup("order-1", "first").await.unwrap();
        match p2.send_dedup("order-1", "second").await {
            Err(Error::Duplicate { id, .. }) => assert_eq!(id, "order-1"),
            other => panic!("a second send of the id: {other:?}"),
        }
        // Another id goes in; an id past its window goes in again.
        p2.send_dedup("order-2", "other").await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        p2.send_dedup("order-2", "again").await.unwrap();
        // Bad ids: typed errors, nothing sent.
        assert!(matches!(
            p1.send_dedup("", "x").await,
            Err(Error::InvalidDedupId(_))
        ));
        let long = "i".repeat(slotq::producer::MAX_DEDUP_ID + 1);
        assert!(matches!(
            p1.send_dedup(&long, "x").await,
            Err(Error::InvalidDedupId(_))
        ));
        let got = contents(&q).await;
        let mut names: Vec<&str> = got.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["again", "first", "other"], "{name}");
        assert!(got.values().all(|&n| n == 1), "{got:?}");
    }
}

/// An idempotent producer across a kill -9 of a master under load: every acknowledged
/// message is in the queue, and no message is in it twice (its resends after the kill
/// find the id of what the first attempt stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_producer_enqueues_each_message_once_across_a_master_kill() {
    let mut c = ClusterBuilder::new()
        .masters(3)
        .replicas(1)
        .node_timeout_ms(1000)
        .start()
        .unwrap();
    let client = Client::from_cluster(slotq_tests::router(&c.url()).await);
    let q = client.queue("idem").reliable().open().await.unwrap();
    let producer = q.producer().idempotent().build().unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (producer, acked, failed, stop) = (
                producer.clone(),
                acked.clone(),
                failed.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = format!("t{t}-{n}");
                    n += 1;
                    match producer.send(&body).await {
                        Ok(()) => acked.lock().unwrap().push(body),
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = c.masters()[0];
    c.node_mut(m).kill().unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let got = contents(&q).await;
    let acked = acked.lock().unwrap();
    let lost = acked.iter().filter(|a| !got.contains_key(*a)).count();
    let twice: usize = got.values().map(|&n| n - 1).sum();
    eprintln!(
        "idempotent producer, kill -9 of a master 1 s in, 6 s more: {} acknowledged, {} failed, {lost} lost, {twice} enqueued twice",
        acked.len(),
        failed.load(Ordering::Relaxed)
    );
    assert!(acked.len() > 1000);
    assert_eq!(lost, 0);
    assert_eq!(twice, 0);
}
