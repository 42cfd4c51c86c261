//! What an idle consumer sends while it waits, against real clusters: a consumer whose
//! last round left every shard empty goes straight to its blocking waiters (no round just
//! to find the shards empty), and still wakes for what arrives; at-least-once waiters
//! lease behind their wait, and give back what such a lease brings to a consumer that
//! stopped receiving.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slotq::Client;
use slotq_testkit::TestCluster;
use slotq_tests::{blocked_clients, command_calls};

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
    // Waits that time out run their lease (to reap): a long block timeout keeps those out
    // of the count below, whenever a wait began.
    let mut consumer = q
        .consumer()
        .without_group()
        .block_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
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

    // A round the last call started ahead may still be in flight: one wait settles it.
    assert!(
        consumer
            .recv_batch_timeout(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_s_lease_brings_the_message_with_one_lease_on_one_shard() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    for prefetch in [false, true] {
        let q = client
            .queue(&format!("behind-{prefetch}"))
            .reliable()
            .open()
            .await
            .unwrap();
        one_wake_one_lease(&c, &q, prefetch).await;
    }
}

async fn one_wake_one_lease(c: &TestCluster, q: &slotq::Queue, prefetch: bool) {
    let producer = q.producer().build().unwrap();
    let consumer = q
        .consumer()
        .without_group()
        .prefetch(prefetch)
        .build()
        .unwrap();
    // The waiters of the three shards block; the lease counted before the send.
    let (batch, consumer, leases) = delivered_by_a_wait(c, consumer, &producer, "one", 3, || {
        command_calls(c, "lrange")
    })
    .await;
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].attempt, 1);
    // The waiter of the shard that got the message leased it; no round asked the three
    // shards (a wake-up followed by a sweep would have sent three leases), and none asks
    // ahead of the next call. With prefetch, that waiter blocks again at once (its lease
    // behind it, unsent), so all three shards are watched while the consumer works;
    // without, it waits for the consumer's next call.
    let watching = 2 + u64::from(prefetch);
    assert!(
        slotq_tests::wait_until(Duration::from_secs(5), || blocked_clients(c) == watching).await,
        "prefetch {prefetch}: {} waits blocked, not {watching}",
        blocked_clients(c)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        command_calls(c, "lrange"),
        leases + 1,
        "prefetch {prefetch}"
    );
    assert_eq!(blocked_clients(c), watching, "prefetch {prefetch}");
    consumer.ack_all(&batch).await.unwrap();
    consumer.close().await;
}

/// Has `consumer` wait for messages (a first call finds nothing, so its waiters block),
/// sends `payload` once `blocked` waits are blocked (after `before_send`, whose value is
/// returned), and returns what the waiting call got and the consumer.
async fn delivered_by_a_wait<T>(
    c: &TestCluster,
    mut consumer: slotq::Consumer,
    producer: &slotq::Producer,
    payload: &str,
    blocked: u64,
    before_send: impl FnOnce() -> T,
) -> (Vec<slotq::Message>, slotq::Consumer, T) {
    assert!(
        consumer
            .recv_batch_timeout(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    let waiting = tokio::spawn(async move {
        let got = consumer
            .recv_batch_timeout(10, Duration::from_secs(5))
            .await;
        (got, consumer)
    });
    assert!(
        slotq_tests::wait_until(Duration::from_secs(5), || blocked_clients(c) == blocked).await,
        "{} waits blocked, not {blocked}",
        blocked_clients(c)
    );
    let before = before_send();
    producer.send(payload).await.unwrap();
    let (got, consumer) = waiting.await.unwrap();
    (got.unwrap(), consumer, before)
}

/// With prefetch, the waiter that handed messages to its consumer blocks again while the
/// consumer works on them: what arrives meanwhile is leased as it arrives and handed out
/// by the next call without asking the shard; what arrives after that waits in the shard
/// (one lease a shard held for a consumer at work, not one per arrival). Without
/// prefetch nothing is leased while the consumer works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_rearmed_while_its_consumer_works_leases_one_arrival() {
    let c = TestCluster::start(1, 0).unwrap();
    let client = client(&c.url()).await;
    for prefetch in [true, false] {
        let q = client
            .queue(&format!("rearm-{prefetch}"))
            .shards_per_master(1)
            .reliable()
            .open()
            .await
            .unwrap();
        assert_eq!(q.shards().shards.len(), 1);
        let tag = q.shards().shards[0].tag.clone();
        let producer = q.producer().build().unwrap();
        let consumer = q
            .consumer()
            .without_group()
            .prefetch(prefetch)
            .build()
            .unwrap();
        let (first, mut consumer, ()) =
            delivered_by_a_wait(&c, consumer, &producer, "one", 1, || ()).await;
        assert_eq!(first.len(), 1);
        assert_eq!(&first[0].payload[..], b"one");

        // The consumer works on "one" (no call) while "two" arrives.
        let before = command_calls(&c, "lrange");
        let rearmed = u64::from(prefetch);
        assert!(
            slotq_tests::wait_until(Duration::from_secs(5), || blocked_clients(&c) == rearmed)
                .await,
            "prefetch {prefetch}"
        );
        producer.send("two").await.unwrap();
        assert!(
            slotq_tests::wait_until(Duration::from_secs(5), || {
                command_calls(&c, "lrange") == before + rearmed
            })
            .await,
            "prefetch {prefetch}: \"two\" leased while the consumer works"
        );
        producer.send("three").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            command_calls(&c, "lrange"),
            before + rearmed,
            "prefetch {prefetch}: nothing more leased while the consumer works"
        );
        assert_eq!(blocked_clients(&c), 0, "prefetch {prefetch}");
        let ready: u64 = c
            .node(0)
            .cmd(slotq::redis::cmd("LLEN").arg(q.ready_key(&tag)))
            .unwrap();
        // A frame behind its head: two elements a message here.
        assert_eq!(ready, 2 * (2 - rearmed), "prefetch {prefetch}");
        consumer.ack_all(&first).await.unwrap();

        // The next calls hand out "two", then "three", each on its first delivery.
        let rounds = command_calls(&c, "evalsha");
        let mut got = Vec::new();
        while got.len() < 2 {
            let batch = consumer
                .recv_batch_timeout(10, Duration::from_secs(5))
                .await
                .unwrap();
            assert!(!batch.is_empty(), "prefetch {prefetch}: {got:?}");
            for m in &batch {
                assert_eq!(m.attempt, 1);
                got.push(String::from_utf8(m.payload.to_vec()).unwrap());
            }
            consumer.ack_all(&batch).await.unwrap();
        }
        assert_eq!(got, ["two", "three"], "prefetch {prefetch}");
        if prefetch {
            // "two" came from the inbox: the call that handed it out asked no shard (one
            // lease for "three" and three settles at most since).
            assert!(command_calls(&c, "evalsha") <= rounds + 4);
        }
        consumer.close().await;
    }
}

/// A re-armed wait that times out while its consumer works saw nothing arrive: what its
/// lease took came back from an expired lease (or came due), and it is given back for
/// whoever asks, not kept by the consumer at work until it expires again (which would use
/// up a delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_wait_gives_back_what_its_lease_reaped_for_a_consumer_at_work() {
    let c = TestCluster::start(1, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("reaped")
        .shards_per_master(1)
        .max_attempts(2)
        .open()
        .await
        .unwrap();
    let tag = q.shards().shards[0].tag.clone();
    let producer = q.producer().build().unwrap();
    let busy = q
        .consumer()
        .without_group()
        .lease(Duration::from_millis(300))
        .block_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let (got, busy, ()) = delivered_by_a_wait(&c, busy, &producer, "x", 1, || ()).await;
    assert_eq!((got.len(), got[0].attempt), (1, 1));
    // At work, never settling "x": its lease expires after 0.3 s, the re-armed wait times
    // out after 1 s and its lease reaps "x", then gives it back.
    let ready = || -> u64 {
        c.node(0)
            .cmd(slotq::redis::cmd("LLEN").arg(q.ready_key(&tag)))
            .unwrap()
    };
    assert!(
        slotq_tests::wait_until(Duration::from_secs(5), || ready() == 2).await,
        "\"x\" back in its shard, a frame behind its head"
    );
    let stats = q.stats().await.unwrap();
    assert_eq!(stats[0].in_flight, Some(0), "{stats:?}");
    let mut other = q.consumer().without_group().build().unwrap();
    let again = other
        .recv_batch_timeout(10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((&again[0].payload[..], again[0].attempt), (&b"x"[..], 2));
    other.ack_all(&again).await.unwrap();
    assert!(q.dead_letters(10).await.unwrap().is_empty());
    other.close().await;
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_arrives_after_its_consumer_stopped_receiving_is_given_back() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("away").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    // A long lease: a message kept by the consumer that stopped would not come back in time.
    let mut away = q
        .consumer()
        .without_group()
        .lease(Duration::from_secs(60))
        .build()
        .unwrap();
    assert!(
        away.recv_batch_timeout(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    // Back from its call: its waiters' waits are still blocked, each with a lease behind.
    let settles = command_calls(&c, "hdel");
    producer.send("for whoever receives").await.unwrap();
    // The lease behind the wait runs, and is released (its fields are deleted).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while command_calls(&c, "hdel") == settles {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut other = q.consumer().without_group().build().unwrap();
    let batch = other
        .recv_batch_timeout(10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(batch.len(), 1, "the message is back in its shard at once");
    assert_eq!(&batch[0].payload[..], b"for whoever receives");
    assert_eq!(batch[0].attempt, 1, "no delivery counted for it");
    other.ack_all(&batch).await.unwrap();
    other.close().await;
    away.close().await;
}

/// A consumer closed while its waits' leases are on their way back gives them back before
/// `close` returns: a process that exits right after (its runtime dropped with every task
/// it spawned) leaves nothing leased. Each round cancels a receive mid-wait (its waiters
/// stay blocked, each with a lease behind), sends, and closes at once.
#[test]
fn a_consumer_closed_as_its_waits_bring_leases_leaves_nothing_leased() {
    let c = TestCluster::start(3, 0).unwrap();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    for round in 1..=8 {
        let name = format!("exit{round}");
        let rt = runtime();
        rt.block_on(async {
            let client = client(&c.url()).await;
            let q = client.queue(&name).reliable().open().await.unwrap();
            let producer = q.producer().build().unwrap();
            let mut consumer = q
                .consumer()
                .without_group()
                .lease(Duration::from_secs(60))
                .build()
                .unwrap();
            tokio::select! {
                got = consumer.recv_batch(10) => panic!("nothing was sent: {got:?}"),
                _ = tokio::time::sleep(Duration::from_millis(150)) => {}
            }
            producer
                .send_batch((0..6).map(|i| format!("r{round}-{i}")))
                .await
                .unwrap();
            consumer.close().await;
        });
        // As a process exits: what was spawned and is not done never runs.
        drop(rt);
        let (depth, in_flight) = runtime().block_on(async {
            let client = client(&c.url()).await;
            let q = client.queue(&name).open().await.unwrap();
            let stats = q.stats().await.unwrap();
            (
                stats.iter().map(|s| s.depth).sum::<u64>(),
                stats.iter().map(|s| s.in_flight.unwrap_or(0)).sum::<u64>(),
            )
        });
        assert_eq!(
            (depth, in_flight),
            (6, 0),
            "round {round}: everything back in the queue, nothing leased"
        );
    }
}

/// Members that give up after 10 ms and do something else for 5 ms before they call again
/// (while batches come every 20 ms: often away when one arrives, their waits' leases
/// released), and eight more joining mid-stream (waiters of the shards that move
/// dropped with their leases in flight): every message is handed out once, on its first
/// delivery, and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_at_least_once_group_growing_under_load_hands_out_each_message_once() {
    const TOTAL: usize = 30_000;
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("join-reliable")
        .reliable()
        .shards_per_master(2)
        .open()
        .await
        .unwrap();
    let got: slotq_tests::Received = Arc::new(Mutex::new(Vec::with_capacity(TOTAL)));
    let stop = Arc::new(AtomicBool::new(false));
    let how = slotq_tests::Members {
        wait: Duration::from_millis(10),
        away: Duration::from_millis(5),
        ack: true,
    };
    let start = |n: usize| slotq_tests::start_members(&q, n, how, &got, &stop);
    let mut consumers = start(2);
    let producer = q.producer().build().unwrap();
    let sending = slotq_tests::send_paced(producer, TOTAL, 500, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumers.extend(start(8));
    sending.await.unwrap();
    slotq_tests::wait_until(Duration::from_secs(20), || {
        got.lock().unwrap().len() >= TOTAL
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for h in consumers {
        h.await.unwrap();
    }
    let got = got.lock().unwrap();
    let set: HashSet<&Vec<u8>> = got.iter().map(|(p, _)| p).collect();
    assert_eq!(set.len(), got.len(), "no message handed out twice");
    assert_eq!(got.len(), TOTAL, "nothing lost");
    assert!(
        got.iter().all(|(_, attempt)| *attempt == 1),
        "no delivery counted for leases given back unseen"
    );
}

/// Rounds started ahead: once a call has handed out what the consumer held while messages
/// flow, the next round runs without another call (the queue's depth drops by itself), and
/// closing the consumer gives all of it back (plain queues: to the head of the shards;
/// at-least-once: released, not counted as a delivery). Off, nothing runs between calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_started_ahead_is_given_back_on_close() {
    const TOTAL: u64 = 10_000;
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    for (reliable, prefetch) in [(false, true), (true, true), (false, false)] {
        let name = format!("ahead-{reliable}-{prefetch}");
        let mut builder = client.queue(&name);
        if reliable {
            builder = builder.reliable();
        }
        let q = builder.open().await.unwrap();
        let producer = q.producer().build().unwrap();
        producer
            .send_batch((0..TOTAL).map(|i| format!("m{i}")))
            .await
            .unwrap();
        let ready = |q: &slotq::Queue| {
            let q = q.clone();
            async move {
                q.stats()
                    .await
                    .unwrap()
                    .iter()
                    .map(|s| s.depth)
                    .sum::<u64>()
            }
        };
        let mut consumer = q
            .consumer()
            .without_group()
            .pop_batch(100)
            .prefetch(prefetch)
            .build()
            .unwrap();
        // The first round asks few of each shard (their payload size is unknown yet): hand
        // out all of it, so the consumer holds nothing.
        let mut handed = Vec::new();
        while handed.is_empty() {
            handed = consumer.recv_batch(1000).await.unwrap();
        }
        // What a call alone takes leaves TOTAL - handed in the shards; a round ahead takes
        // more, without a call.
        let untouched = TOTAL - handed.len() as u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut now = ready(&q).await;
        while prefetch && now == untouched && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            now = ready(&q).await;
        }
        if prefetch {
            assert!(now < untouched, "{name}: no round ran ahead ({now})");
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                ready(&q).await,
                untouched,
                "{name}: a round ran between calls"
            );
        }
        if reliable {
            consumer.ack_all(&handed).await.unwrap();
        }
        consumer.close().await;
        let left = ready(&q).await;
        assert_eq!(
            left,
            TOTAL - handed.len() as u64,
            "{name}: close gave back what it held"
        );
        // What was given back comes again, once, as a first delivery.
        let mut rest = q.consumer().without_group().build().unwrap();
        let mut seen: HashSet<Vec<u8>> = handed.iter().map(|m| m.payload.to_vec()).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (seen.len() as u64) < TOTAL && std::time::Instant::now() < deadline {
            let batch = rest
                .recv_batch_timeout(1000, Duration::from_millis(200))
                .await
                .unwrap();
            assert!(
                batch.iter().all(|m| m.attempt == 1),
                "{name}: a delivery counted"
            );
            if reliable {
                rest.ack_all(&batch).await.unwrap();
            }
            for m in batch {
                assert!(seen.insert(m.payload.to_vec()), "{name}: a duplicate");
            }
        }
        assert_eq!(seen.len() as u64, TOTAL, "{name}");
        rest.close().await;
    }
}
