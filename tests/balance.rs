//! Pushes spread evenly whatever the producer's shape: one big batch, one producer with
//! concurrent sends, shards of unequal depth to start with. Real clusters.

use slotq::Client;
use slotq_testkit::TestCluster;
use slotq_tests::skew;

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_big_batch_spreads_evenly() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    for (name, reliable) in [("batch", false), ("batch-reliable", true)] {
        let mut b = client.queue(name);
        if reliable {
            b = b.reliable();
        }
        let q = b.open().await.unwrap();
        let producer = q.producer().build().unwrap();
        producer
            .send_batch((0..200_000).map(|i| format!("m{i}")))
            .await
            .unwrap();
        let (d, skew) = skew(&q).await;
        eprintln!("{name}: one send_batch of 200,000: {d:?}, skew {skew:.3}");
        assert!(skew <= 1.10, "{name}: {d:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_of_one_producer_spread_evenly() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("tens").open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let tasks: Vec<_> = (0..10)
        .map(|t| {
            let p = producer.clone();
            tokio::spawn(async move {
                for i in 0..20_000 {
                    p.send(format!("{t}-{i}")).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (d, skew) = skew(&q).await;
    eprintln!("10 concurrent sends, 200,000 messages: {d:?}, skew {skew:.3}");
    assert!(skew <= 1.10, "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_send_at_a_time_spreads_evenly() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("ones").open().await.unwrap();
    let producer = q.producer().build().unwrap();
    for i in 0..50_000 {
        producer.send(format!("m{i}")).await.unwrap();
    }
    let (d, skew) = skew(&q).await;
    eprintln!("one send at a time, 50,000 messages: {d:?}, skew {skew:.3}");
    assert!(skew <= 1.10, "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_shard_gets_fewer_new_messages_until_it_caught_up() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("uneven").open().await.unwrap();
    // 100,000 on one shard, then 200,000 unkeyed from a new producer.
    let keyed = q.producer().build().unwrap();
    for _ in 0..100 {
        thousand_keyed(&keyed).await.unwrap();
    }
    let producer = q.producer().build().unwrap();
    producer
        .send_batch((0..200_000).map(|i| format!("m{i}")))
        .await
        .unwrap();
    let (d, skew) = skew(&q).await;
    eprintln!("100,000 on one shard, then 200,000 unkeyed: {d:?}, skew {skew:.3}");
    assert_eq!(d.iter().sum::<u64>(), 300_000);
    assert!(skew <= 1.10, "{d:?}");
}

/// 1000 sends of one key, concurrently (they coalesce).
async fn thousand_keyed(p: &slotq::Producer) -> slotq::Result<()> {
    let sends = (0..1000).map(|i| p.send_keyed("deep", format!("k{i}")));
    for r in futures::future::join_all(sends).await {
        r?;
    }
    Ok(())
}
