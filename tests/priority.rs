//! Priorities on a real cluster (3 masters with replicas, so pops are confirmed): higher
//! levels taken first within a shard and across shards in a round, a blocking wait woken
//! by any level, messages given back to their own level, retirement moving every level,
//! and bad input refused with typed errors, nothing stored.

use std::time::{Duration, Instant};

use slotq::{Client, Error, Priority, SendOptions, redis};
use slotq_testkit::TestCluster;

async fn client(url: &str) -> Client {
    Client::open(url).await.unwrap()
}

fn level_of(payload: &[u8]) -> Priority {
    match payload[0] {
        b'h' => Priority::High,
        b'n' => Priority::Normal,
        _ => Priority::Low,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_levels_go_first_and_a_wait_covers_every_level() {
    let c = TestCluster::start(3, 1).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("prio").priorities().open().await.unwrap();
    assert!(q.shards().priorities);
    let p = q.producer().build().unwrap();
    let with = |l| SendOptions::new().priority(l);

    // One shard (one key): low, normal, high sent in that order come out high, normal,
    // low, each level in its order.
    for (prefix, level) in [
        ("l", Priority::Low),
        ("n", Priority::Normal),
        ("h", Priority::High),
    ] {
        for i in 0..200 {
            p.send_keyed_with("k", format!("{prefix}{i}"), &with(level))
                .await
                .unwrap();
        }
    }
    let stats = q.stats().await.unwrap();
    assert_eq!(
        stats.iter().map(|s| s.depth).sum::<u64>(),
        600,
        "stats count every level"
    );
    let mut consumer = q.consumer().without_group().build().unwrap();
    let mut got = Vec::new();
    while got.len() < 600 {
        let batch = consumer
            .recv_batch_timeout(600 - got.len(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!batch.is_empty(), "{} of 600", got.len());
        got.extend(
            batch
                .iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned()),
        );
    }
    let expected: Vec<String> = ["h", "n", "l"]
        .iter()
        .flat_map(|p| (0..200).map(move |i| format!("{p}{i}")))
        .collect();
    assert_eq!(got, expected);

    // Across shards: a round takes each shard's highest level and hands out what it
    // brought highest first. Every shard holds every level (100 of each, sent low first):
    // no shard hands out a lower level while it holds a higher one, and no round takes a
    // lower level while a shard filled its ask with a higher one. A consumer that starts
    // on the full queue (one running while the lows arrive takes them, rightly).
    consumer.close().await;
    let set = q.shards();
    let keys: Vec<String> = set
        .shards
        .iter()
        .map(|s| slotq_tests::key_for_shard(&set, s.number))
        .collect();
    for (prefix, level) in [
        ("l", Priority::Low),
        ("n", Priority::Normal),
        ("h", Priority::High),
    ] {
        for key in &keys {
            for i in 0..100 {
                p.send_keyed_with(key, format!("{prefix}{i}"), &with(level))
                    .await
                    .unwrap();
            }
        }
    }
    let total = 300 * keys.len();
    let mut consumer = q.consumer().without_group().build().unwrap();
    let mut levels = Vec::new();
    while levels.len() < total {
        let batch = consumer
            .recv_batch_timeout(total - levels.len(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!batch.is_empty(), "{} of {total}", levels.len());
        levels.extend(batch.iter().map(|m| level_of(&m.payload)));
    }
    // No low message before the last high one: every shard held high messages, and a
    // shard's low ones come only after its high and normal ones.
    let last_high = levels.iter().rposition(|l| *l == Priority::High).unwrap();
    let first_low = levels.iter().position(|l| *l == Priority::Low).unwrap();
    assert!(
        last_high < first_low,
        "high at {last_high}, low at {first_low}"
    );

    // An idle consumer's blocking wait is woken by a push to any level (the block timeout
    // is far longer than the wait measured).
    let mut idle = q
        .consumer()
        .without_group()
        .block_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let m = idle
            .recv_batch_timeout(1, Duration::from_secs(15))
            .await
            .unwrap();
        (m.into_iter().next().map(|m| m.payload), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.send_with("h-wake", &with(Priority::High)).await.unwrap();
    let (payload, waited) = waiting.await.unwrap();
    assert_eq!(payload.as_deref(), Some(&b"h-wake"[..]));
    assert!(waited < Duration::from_secs(10), "woken after {waited:?}");
    consumer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_back_messages_return_to_their_level() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("prio-back").priorities().open().await.unwrap();
    let p = q.producer().build().unwrap();
    for (prefix, level) in [("l", Priority::Low), ("h", Priority::High)] {
        for i in 0..10 {
            p.send_keyed_with(
                "k",
                format!("{prefix}{i}"),
                &SendOptions::new()
                    .priority(level)
                    .header("n", i.to_string()),
            )
            .await
            .unwrap();
        }
    }
    // Taken (a round brings the ten high ones), one handed out, the rest given back.
    let mut consumer = q.consumer().without_group().build().unwrap();
    let first = consumer.recv().await.unwrap();
    assert_eq!(&first.payload[..], b"h0");
    consumer.close().await;
    let tag = &first.shard;
    let llen = |level: Priority| {
        let key = level.ready_key(q.prefix(), tag);
        let q = q.clone();
        async move {
            q.cluster()
                .query::<i64>(slotq::slot::key_slot(&key), redis::cmd("LLEN").arg(&key))
                .await
                .unwrap()
        }
    };
    assert_eq!(
        llen(Priority::High).await,
        9,
        "the high ones went back to the high list"
    );
    assert_eq!(llen(Priority::Low).await, 10);
    assert_eq!(llen(Priority::Normal).await, 0);
    // In order, headers kept.
    let mut again = q.consumer().without_group().build().unwrap();
    let batch = again
        .recv_batch_timeout(19, Duration::from_secs(5))
        .await
        .unwrap();
    let mut all = batch;
    while all.len() < 19 {
        all.extend(
            again
                .recv_batch_timeout(19 - all.len(), Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    let names: Vec<String> = all
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    let want: Vec<String> = (1..10)
        .map(|i| format!("h{i}"))
        .chain((0..10).map(|i| format!("l{i}")))
        .collect();
    assert_eq!(names, want);
    assert_eq!(
        all[0].header("n"),
        Some("1"),
        "headers survive the give-back"
    );
    again.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_where_they_do_not_apply_are_refused_and_store_nothing() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    assert!(matches!(
        "urgent".parse::<Priority>(),
        Err(Error::InvalidPriority(_))
    ));
    // A queue created without priorities.
    let plain = client.queue("no-prio").open().await.unwrap();
    let p = plain.producer().build().unwrap();
    let high = SendOptions::new().priority(Priority::High);
    let err = p.send_with("x", &high).await.unwrap_err();
    assert!(matches!(err, Error::Priorities(_)), "{err}");
    let err = p.send_keyed_with("k", "x", &high).await.unwrap_err();
    assert!(matches!(err, Error::Priorities(_)), "{err}");
    // Normal is what every queue has.
    p.send_with("y", &SendOptions::new().priority(Priority::Normal))
        .await
        .unwrap();
    assert_eq!(
        plain
            .stats()
            .await
            .unwrap()
            .iter()
            .map(|s| s.depth)
            .sum::<u64>(),
        1
    );
    // At-least-once queues have none.
    let err = client
        .queue("no-prio-r")
        .reliable()
        .priorities()
        .open()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Priorities(_)), "{err}");
    // Ordered groups would reorder a key's messages.
    let q = client.queue("prio-o").priorities().open().await.unwrap();
    let err = q.consumer().group("g").ordered().build().unwrap_err();
    assert!(matches!(err, Error::Priorities(_)), "{err}");
    // A scheduled message becomes ready at normal priority.
    let err = q
        .producer()
        .build()
        .unwrap()
        .send_at_with(
            "later",
            std::time::SystemTime::now() + Duration::from_secs(60),
            &high,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Priorities(_)), "{err}");
    assert_eq!(
        q.stats()
            .await
            .unwrap()
            .iter()
            .map(|s| s.depth + s.scheduled)
            .sum::<u64>(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_a_shard_moves_every_level() {
    let c = slotq_testkit::ClusterBuilder::new()
        .masters(3)
        .start()
        .unwrap();
    let client = Client::from_cluster(slotq_tests::router(&c.url()).await);
    let q = client
        .queue("prio-retire")
        .priorities()
        .registry_poll(Duration::from_millis(100))
        .open()
        .await
        .unwrap();
    let p = q.producer().build().unwrap();
    for (prefix, level) in [
        ("l", Priority::Low),
        ("n", Priority::Normal),
        ("h", Priority::High),
    ] {
        p.send_batch_with(
            (0..60).map(|i| format!("{prefix}{i}")),
            &SendOptions::new().priority(level),
        )
        .await
        .unwrap();
    }
    drop(p);
    // Master 2 emptied onto master 0: master 0 holds two shards, and a rebalance drains
    // and retires one of them, moving its leftovers of every level.
    let slots = c.slots_of(2);
    c.migrate_slots(&slots, 0).unwrap();
    client.cluster().refresh().await.unwrap();
    // A consumer reads while the rebalance drains (a retiring shard is retired once it
    // is empty: every level of it).
    let mut consumer = q.consumer().without_group().build().unwrap();
    let reader = tokio::spawn(async move {
        let mut levels = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while levels.len() < 180 && Instant::now() < deadline {
            let batch = consumer
                .recv_batch_timeout(180, Duration::from_millis(200))
                .await
                .unwrap();
            levels.extend(batch.iter().map(|m| level_of(&m.payload)));
        }
        consumer.close().await;
        levels
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut retired = 0;
    loop {
        let r = q.rebalance().await.unwrap();
        retired += r.retired.len();
        if r.settled() {
            break;
        }
        assert!(Instant::now() < deadline, "still draining: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(retired, 1);
    let levels = reader.await.unwrap();
    assert_eq!(levels.len(), 180);
    for l in [Priority::High, Priority::Normal, Priority::Low] {
        assert_eq!(levels.iter().filter(|x| **x == l).count(), 60, "{l}");
    }
}
