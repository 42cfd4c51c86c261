//! Scheduled sends against a real 3-master + 3-replica cluster: messages become ready at
//! their due time (not a block timeout later, never before), in both queue modes, keyed
//! and unkeyed; a scheduled message is cancelled by id; bad due times change nothing; a
//! producer that is gone before the due time does not matter; a master failover between
//! sending and the due time loses nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use slotq::{Client, Error, MessageId, Queue};
use slotq_testkit::TestCluster;

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Receives until `n` messages arrived or `within` passed: payload -> arrival (ms since
/// the epoch). At-least-once messages are acknowledged.
async fn arrivals(q: &Queue, n: usize, within: Duration) -> HashMap<String, i64> {
    let mut consumer = q.consumer().build().unwrap();
    let mut got = HashMap::new();
    let end = Instant::now() + within;
    while got.len() < n && Instant::now() < end {
        let batch = consumer
            .recv_batch_timeout(100, end.saturating_duration_since(Instant::now()))
            .await
            .unwrap();
        let at = now_ms();
        if batch.iter().any(|m| m.id.is_some()) {
            consumer.ack_all(&batch).await.unwrap();
        }
        for m in batch {
            let p = String::from_utf8(m.payload.to_vec()).unwrap();
            assert!(got.insert(p.clone(), at).is_none(), "{p} twice");
        }
    }
    consumer.close().await;
    got
}

/// Due times are honoured: each arrival at or after its due time and well before a block
/// timeout after it. Returns the worst lateness (ms).
fn check_on_time(got: &HashMap<String, i64>, due: &HashMap<String, i64>) -> i64 {
    let mut worst = 0;
    for (p, d) in due {
        let at = got.get(p).unwrap_or_else(|| panic!("{p} never arrived"));
        // Clocks: one machine, so only the server's millisecond rounding.
        assert!(*at >= d - 2, "{p} arrived {} ms early", d - at);
        worst = worst.max(at - d);
    }
    assert!(worst < 1000, "a message came {worst} ms after its due time");
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_arrive_on_time_can_be_cancelled_and_survive_a_failover() {
    let c = TestCluster::start(3, 1).unwrap();
    let client = client(&c.url()).await;
    for reliable in [false, true] {
        let name = if reliable { "sched-alo" } else { "sched-amo" };
        let mut b = client.queue(name);
        if reliable {
            b = b.reliable();
        }
        let q = b.open().await.unwrap();
        let producer = q.producer().build().unwrap();
        let receiving = tokio::spawn({
            let q = q.clone();
            async move { arrivals(&q, 61, Duration::from_secs(15)).await }
        });
        // Let the consumer go idle (blocked), so delivery is the promoter's doing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut due = HashMap::new();
        let base = now_ms();
        // Unkeyed, one by one, due 0.3-2.8 s ahead (some within a poll, some beyond).
        for i in 0..20 {
            let d = 300 + i * 125;
            producer
                .send_after(format!("one-{i}"), Duration::from_millis(d as u64))
                .await
                .unwrap();
            due.insert(format!("one-{i}"), base + d);
        }
        // A batch due together, and keyed messages of one key.
        let at = SystemTime::now() + Duration::from_millis(1500);
        let ids = producer
            .send_batch_at((0..30).map(|i| format!("batch-{i}")), at)
            .await
            .unwrap();
        assert_eq!(ids.len(), 30);
        let at_ms = at.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        for i in 0..30 {
            due.insert(format!("batch-{i}"), at_ms);
        }
        for i in 0..10 {
            let at = SystemTime::now() + Duration::from_millis(800);
            producer
                .send_keyed_at("k", format!("key-{i}"), at)
                .await
                .unwrap();
            due.insert(
                format!("key-{i}"),
                at.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64,
            );
        }
        // Due already: ready at once.
        producer.send_at("now", SystemTime::now()).await.unwrap();
        due.insert("now".into(), now_ms() - 5);
        // Cancelled before it is due: never delivered.
        let doomed = producer
            .send_after("cancelled", Duration::from_secs(2))
            .await
            .unwrap();
        let scheduled: u64 = q.stats().await.unwrap().iter().map(|s| s.scheduled).sum();
        assert!(scheduled >= 50, "{scheduled} waiting");
        assert_eq!(q.cancel(&[doomed]).await.unwrap(), vec![doomed]);
        assert!(
            q.cancel(&[doomed]).await.unwrap().is_empty(),
            "cancelled once"
        );
        assert!(
            q.cancel(&[MessageId([3; 16])]).await.unwrap().is_empty(),
            "never scheduled"
        );
        drop(producer);

        let got = receiving.await.unwrap();
        assert_eq!(got.len(), 61, "every message once: {:?}", got.keys());
        assert!(!got.contains_key("cancelled"));
        let worst = check_on_time(&got, &due);
        eprintln!("{name}: 61 scheduled messages, worst lateness {worst} ms");
        let keyed: Vec<i64> = (0..10).map(|i| got[&format!("key-{i}")]).collect();
        assert!(keyed.windows(2).all(|w| w[0] <= w[1]), "a key's in order");
        // Nothing left waiting; the cancelled one is gone too.
        let left: u64 = q.stats().await.unwrap().iter().map(|s| s.scheduled).sum();
        assert_eq!(left, 0);
    }

    // Bad due times: refused, typed, nothing stored.
    let q = client.queue("sched-bad").open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let past = SystemTime::now() - Duration::from_secs(3600);
    let far = SystemTime::now() + Duration::from_secs(200 * 365 * 24 * 3600);
    for at in [past, far] {
        assert!(matches!(
            producer.send_at("x", at).await,
            Err(Error::InvalidSchedule(_))
        ));
        assert!(matches!(
            producer.send_batch_at(["x", "y"], at).await,
            Err(Error::InvalidSchedule(_))
        ));
    }
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.scheduled + s.depth).sum::<u64>(), 0);

    // A failover of every master between sending and the due time loses nothing: the
    // scheduled messages were written durably (at-least-once: WAIT for a replica).
    let q = client
        .queue("sched-failover")
        .reliable()
        .open()
        .await
        .unwrap();
    let producer = q.producer().build().unwrap();
    let payloads: Vec<String> = (0..300).map(|i| format!("f-{i}")).collect();
    let at = SystemTime::now() + Duration::from_secs(4);
    producer.send_batch_at(&payloads, at).await.unwrap();
    drop(producer);
    for m in c.masters() {
        let r = c.replicas_of(m)[0];
        c.failover(r).unwrap();
    }
    let got = arrivals(&q, 300, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 300, "all after the failovers");
    let at_ms = at.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!(got.values().all(|&t| t >= at_ms - 2), "none early");
}
