//! Size limits against real servers: large payloads come back in bounded rounds, and a
//! payload the server could not store is refused, typed, before anything is sent.

use std::time::Duration;

use slotq::{Client, Error, redis};
use slotq_testkit::TestCluster;

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_are_popped_in_bounded_rounds() {
    const N: usize = 60;
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await; // 500 ms per request
    for (name, reliable) in [("big", false), ("big-reliable", true)] {
        let mut q = client.queue(name);
        if reliable {
            q = q.reliable();
        }
        let q = q.open().await.unwrap();
        let producer = q.producer().build().unwrap();
        // 120 MiB in all, most of it on one shard.
        let sends = (0..N).map(|i| producer.send_keyed("k", vec![i as u8; 2 << 20]));
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
        let mut consumer = q.consumer().build().unwrap();
        let mut got = 0;
        while got < N {
            let batch = consumer
                .recv_batch_timeout(1000, Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!batch.is_empty(), "{name}: {got} of {N} came back");
            for m in &batch {
                assert_eq!(m.payload.len(), 2 << 20);
            }
            if reliable {
                consumer.ack_all(&batch).await.unwrap();
            }
            got += batch.len();
        }
        assert_eq!(got, N);
        let down = client.cluster().stats().nodes_marked_down;
        assert_eq!(down, 0, "{name}: a node was marked down while replying");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_above_the_servers_string_limit_are_refused_before_sending() {
    const LIMIT: usize = 1 << 20; // the smallest proto-max-bulk-len Redis accepts
    let c = TestCluster::start(3, 0).unwrap();
    for m in c.masters() {
        c.node(m)
            .cmd::<()>(
                redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("proto-max-bulk-len")
                    .arg(LIMIT),
            )
            .unwrap();
    }
    let client = client(&c.url()).await;
    for (name, reliable) in [("limit", false), ("limit-reliable", true)] {
        let mut q = client.queue(name);
        if reliable {
            q = q.reliable();
        }
        let q = q.open().await.unwrap();
        let producer = q.producer().build().unwrap();
        // Just under the limit: fits a plain list element, not an envelope in a frame.
        let err = producer.send(vec![b'x'; LIMIT - 8]).await;
        if reliable {
            assert!(
                matches!(err, Err(Error::InvalidPayload(_))),
                "{name}: {err:?}"
            );
        } else {
            err.unwrap();
        }
        // What the producer takes, the server stores and hands back whole.
        producer.send(vec![b'y'; LIMIT - 64]).await.unwrap();
        let mut consumer = q.consumer().build().unwrap();
        let mut sizes = Vec::new();
        while sizes.len() < 1 + usize::from(!reliable) {
            for m in consumer.recv_batch(10).await.unwrap() {
                sizes.push(m.payload.len());
                if reliable {
                    m.ack().await.unwrap();
                }
            }
        }
        sizes.sort_unstable();
        let want: Vec<usize> = if reliable {
            vec![LIMIT - 64]
        } else {
            vec![LIMIT - 64, LIMIT - 8]
        };
        assert_eq!(sizes, want, "{name}");
        // A batch of many small messages is split into frames the server takes.
        producer
            .send_batch((0..20_000).map(|i| format!("{i:0100}")))
            .await
            .unwrap();
    }
}
