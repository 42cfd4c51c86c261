//! What an idle consumer sends while it waits, against real clusters: a consumer whose
//! last round left every shard empty goes straight to its blocking waiters (no round just
//! to find the shards empty), and still wakes for what arrives.

use std::time::Duration;

use slotq::Client;
use slotq_testkit::TestCluster;
use slotq_tests::command_calls;

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_at_least_once_consumer_waits_without_asking_again() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("drained").reliable().open().await.unwrap();
    assert_eq!(q.shards().shards.len(), 3);
    let producer = q.producer().build().unwrap();
    producer
        .send_batch((0..1000).map(|i| format!("m{i}")))
        .await
        .unwrap();
    let mut consumer = q.consumer().without_group().build().unwrap();
    let mut got = 0;
    while got < 1000 {
        let batch = consumer
            .recv_batch_timeout(1000, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!batch.is_empty(), "the backlog arrives");
        consumer.ack_all(&batch).await.unwrap();
        got += batch.len();
    }
    assert_eq!(got, 1000);

    // Every lease sends an LRANGE of the lease's list behind its script.
    let leases = command_calls(&c, "lrange");
    for _ in 0..3 {
        let batch = consumer
            .recv_batch_timeout(10, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(batch.is_empty());
    }
    assert_eq!(
        command_calls(&c, "lrange"),
        leases,
        "three waits on drained shards asked no shard for a lease"
    );

    // The waiters still see what arrives.
    producer.send("late").await.unwrap();
    let batch = consumer
        .recv_batch_timeout(10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(&batch[0].payload[..], b"late");
    consumer.ack_all(&batch).await.unwrap();
    consumer.close().await;
}
