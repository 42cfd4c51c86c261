//! Dead letters that say why: each way a message dies records its reason, when, and what
//! the consumer said; replay by id moves one letter once. One 3-master cluster.

use std::time::Duration;

use slotq::{Client, DeadReason, Error, MessageId, Settled, redis};
use slotq_testkit::TestCluster;

async fn recv(c: &mut slotq::Consumer) -> slotq::Message {
    let mut b = c
        .recv_batch_timeout(1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    b.pop().unwrap()
}

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dead_letter_says_why_and_replay_by_id_moves_one_once() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("why").max_attempts(2).open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let mut consumer = q
        .consumer()
        .lease(Duration::from_millis(300))
        .build()
        .unwrap();

    // Its last lease ran out: attempts.
    producer.send("expired-lease").await.unwrap();
    let first = recv(&mut consumer).await;
    let second = recv(&mut consumer).await;
    assert_eq!((second.attempt, second.id), (2, first.id));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The next pop reaps it.
    assert!(
        consumer
            .recv_batch_timeout(1, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
    );
    let lease_id = first.id.unwrap();

    // Nacked on its last attempt, saying why (a long why is cut, not refused): failed.
    producer.send("nacked").await.unwrap();
    let m = recv(&mut consumer).await;
    m.nack_because(None, "first try").await.unwrap();
    let m = recv(&mut consumer).await;
    let long = format!("downstream refused: {}", "x".repeat(5000));
    assert_eq!(m.nack_because(None, &long).await.unwrap(), Settled::Done);
    let nacked_id = m.id.unwrap();

    // Dead-lettered on purpose: rejected.
    producer.send("rejected").await.unwrap();
    let m = recv(&mut consumer).await;
    m.dead_letter().await.unwrap();
    let rejected_id = m.id.unwrap();

    let dead = q.dead_letters(100).await.unwrap();
    let by = |id: MessageId| dead.iter().find(|d| d.id == id).expect("listed");
    let started = slotq::lease::now_ms() - 60_000;
    let d = by(lease_id);
    assert_eq!(
        (d.reason, d.payload.as_slice(), d.deliveries),
        (DeadReason::Attempts, b"expired-lease".as_slice(), 2)
    );
    assert!(d.detail.contains("lease"), "{d:?}");
    let d = by(nacked_id);
    assert_eq!(d.reason, DeadReason::Failed);
    assert!(d.detail.starts_with("downstream refused: xxx"), "{d:?}");
    assert_eq!(d.detail.len(), slotq::lease::MAX_DEAD_DETAIL);
    let d = by(rejected_id);
    assert_eq!((d.reason, d.detail.as_str()), (DeadReason::Rejected, ""));
    assert!(
        dead.iter().all(|d| d.died_ms.unwrap() > started),
        "{dead:?}"
    );

    // A letter an older version left (a bare envelope) still lists and replays.
    let shard = q.stats().await.unwrap().remove(0);
    let old = slotq::lease::encode_envelope(MessageId([9; 16]), b"old");
    let key = q.ready_key(&shard.tag).replace(":ready", ":dead");
    let owner = c.owner_of(shard.slot).unwrap();
    let _: redis::Value = c
        .node(owner)
        .cmd(redis::cmd("RPUSH").arg(&key).arg(&old))
        .unwrap();
    let d = q.dead_letters(100).await.unwrap();
    let old_letter = d.iter().find(|d| d.id == MessageId([9; 16])).unwrap();
    assert_eq!(
        (old_letter.reason, old_letter.died_ms),
        (DeadReason::Unknown, None)
    );

    // Replay by id: exactly those, once; an id not there is left out.
    let missing = MessageId([1; 16]);
    let moved = q
        .replay_dead_ids(&[nacked_id, MessageId([9; 16]), missing])
        .await
        .unwrap();
    assert_eq!(moved.len(), 2, "{moved:?}");
    assert!(moved.contains(&nacked_id) && moved.contains(&MessageId([9; 16])));
    assert!(q.replay_dead_ids(&[nacked_id]).await.unwrap().is_empty());
    let left: Vec<MessageId> = q
        .dead_letters(100)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left.len(), 2);
    assert!(left.contains(&lease_id) && left.contains(&rejected_id));
    let mut back = Vec::new();
    while back.len() < 2 {
        let b = consumer
            .recv_batch_timeout(10, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!b.is_empty(), "replayed letters arrive");
        back.extend(b);
    }
    let mut payloads: Vec<&[u8]> = back.iter().map(|m| &m.payload[..]).collect();
    payloads.sort();
    assert_eq!(payloads, [b"nacked".as_slice(), b"old".as_slice()]);
    assert!(back.iter().all(|m| m.attempt == 1), "delivery counts reset");
    consumer.ack_all(&back).await.unwrap();

    // Ids that do not parse are refused.
    assert!(matches!(
        "not-an-id".parse::<MessageId>(),
        Err(Error::InvalidMessageId(_))
    ));
}
