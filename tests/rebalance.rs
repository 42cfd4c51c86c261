//! Shard lifecycle on real clusters: a queue follows its cluster when a master is emptied
//! or added — shards drain, retire and appear — with nothing lost, nothing duplicated,
//! per-key order kept, and leases and dead letters carried through.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use slotq::placement::ShardState;
use slotq::{Client, Queue};
use slotq_testkit::ClusterBuilder;

const POLL: Duration = Duration::from_millis(100);

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

/// Rebalance steps until nothing drains (bounded).
async fn rebalance_until_settled(q: &Queue) -> slotq::rebalance::RebalanceReport {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut all = slotq::rebalance::RebalanceReport::default();
    loop {
        let r = q.rebalance().await.unwrap();
        eprintln!("rebalance step: {r:?}");
        all.added.extend(r.added.iter().cloned());
        all.drained.extend(r.drained.iter().cloned());
        all.retired.extend(r.retired.iter().cloned());
        all.moved += r.moved;
        all.version = r.version;
        if r.settled() {
            return all;
        }
        assert!(Instant::now() < deadline, "still draining: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A 3-master cluster, a queue on it (registry poll 100 ms), then every slot of master 2
/// moved to master `to`: `to` now holds two of the queue's shards.
async fn queue_on_an_emptied_master(
    name: &str,
    to: usize,
    configure: impl FnOnce(slotq::queue::QueueBuilder) -> slotq::queue::QueueBuilder,
) -> (slotq_testkit::TestCluster, Client, Queue) {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let client = client(&c.url()).await;
    let q = configure(client.queue(name).registry_poll(POLL))
        .open()
        .await
        .unwrap();
    let slots = c.slots_of(2);
    c.migrate_slots(&slots, to).unwrap();
    client.cluster().refresh().await.unwrap();
    (c, client, q)
}

/// Keys of a shard still in Redis.
fn keys_of(c: &slotq_testkit::TestCluster, tag: &str) -> usize {
    let slot = slotq::slot::tag_slot(tag);
    let owner = c.owner_of(slot).expect("slot owned");
    let keys: Vec<String> = c
        .node(owner)
        .cmd(
            slotq::redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1000),
        )
        .unwrap();
    keys.iter()
        .filter(|k| k.contains(&format!("{{{tag}}}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptying_a_master_retires_its_extra_shard_and_loses_nothing() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("empty-master")
        .registry_poll(POLL)
        .open()
        .await
        .unwrap();
    let p = q.producer().build().unwrap();
    p.send_batch((0..60_000).map(|i| format!("m{i}")))
        .await
        .unwrap();
    // Every slot of master 2 moves to master 0 (redis-cli --cluster reshard, as an
    // operator does): master 0 now holds two shards, master 2 none.
    let slots = c.slots_of(2);
    c.redis_cli_reshard(2, 0, slots.len()).unwrap();
    client.cluster().refresh().await.unwrap();
    let plan = q.rebalance_plan().await.unwrap();
    assert_eq!(plan.drain.len(), 1, "{plan:?}");
    assert!(plan.add.is_empty(), "{plan:?}");
    let draining = slotq::slot::shard_tag("empty-master", plan.drain[0]);

    // Consumers take everything while the rebalance drains and retires the extra shard.
    let consumer_q = q.clone();
    let consume = tokio::spawn(async move {
        let mut c = consumer_q.consumer().build().unwrap();
        let mut got = Vec::new();
        while got.len() < 60_000 {
            got.extend(
                c.recv_batch(1000)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|m| m.payload.to_vec()),
            );
        }
        c.close().await;
        got
    });
    let report = rebalance_until_settled(&q).await;
    assert_eq!(report.retired, vec![draining.clone()], "{report:?}");
    let got = tokio::time::timeout(Duration::from_secs(60), consume)
        .await
        .unwrap()
        .unwrap();
    let unique: HashSet<&Vec<u8>> = got.iter().collect();
    assert_eq!(got.len(), 60_000);
    assert_eq!(unique.len(), 60_000, "no duplicates");
    let set = q.reload().await.unwrap();
    assert_eq!(set.shards.len(), 2, "{set:?}");
    assert!(set.shards.iter().all(|s| s.state == ShardState::Active));
    assert!(set.keyed.iter().all(|n| set.shard(*n).is_some()));
    assert_eq!(
        keys_of(&c, &draining),
        0,
        "the retired shard's keys are gone"
    );
    assert!(q.rebalance_plan().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_master_gets_a_shard_that_running_producers_use() {
    let mut c = ClusterBuilder::new().masters(3).start().unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("new-master")
        .registry_poll(POLL)
        .open()
        .await
        .unwrap();
    let p = q.producer().build().unwrap();
    p.send_batch((0..3000).map(|i| format!("a{i}")))
        .await
        .unwrap();
    let new = c.add_master().unwrap();
    c.reshard(2000, 0, new).unwrap();
    client.cluster().refresh().await.unwrap();
    let report = rebalance_until_settled(&q).await;
    assert_eq!(report.added.len(), 1, "{report:?}");
    let added = report.added[0].clone();
    // Every master, the new one included, serves exactly one active shard now (the new
    // shard lands where one is missing: the moved slots may have carried an old shard
    // to the new master).
    let set = q.reload().await.unwrap();
    let mut per_master: HashMap<usize, usize> = HashMap::new();
    for s in set.active() {
        *per_master.entry(c.owner_of(s.slot).unwrap()).or_default() += 1;
    }
    assert_eq!(per_master.len(), 4, "{per_master:?}");
    assert!(per_master.values().all(|&n| n == 1), "{per_master:?}");
    assert!(per_master.contains_key(&new));
    // The running producer sees the new registry within a poll and sends to it.
    tokio::time::sleep(POLL * 3).await;
    for i in 0..40 {
        p.send_batch((0..100).map(|j| format!("b{i}-{j}")))
            .await
            .unwrap();
    }
    let stats = q.stats().await.unwrap();
    let on_new = stats.iter().find(|s| s.tag == added).unwrap().depth;
    assert!(on_new > 0, "{stats:?}");
    assert_eq!(stats.iter().map(|s| s.depth).sum::<u64>(), 7000);
}

/// Keyed and unkeyed producers and a consumer run all through a rebalance that retires a
/// shard holding keys: nothing lost, nothing twice, every key's messages in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_under_load_keeps_every_message_and_per_key_order() {
    let (_c, _client, q) = queue_on_an_emptied_master("under-load", 1, |b| b).await;

    let stop = Arc::new(AtomicBool::new(false));
    let keyed = {
        let (q, stop) = (q.clone(), stop.clone());
        tokio::spawn(async move {
            let p = q.producer().build().unwrap();
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let sends =
                    (0..50).map(|k| p.send_keyed(format!("key{k}"), format!("key{k}:{sent}")));
                for r in futures::future::join_all(sends).await {
                    r.unwrap();
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent as usize * 50
        })
    };
    let unkeyed = {
        let (q, stop) = (q.clone(), stop.clone());
        tokio::spawn(async move {
            let p = q.producer().build().unwrap();
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) {
                p.send_batch((0..100).map(|i| format!("u{sent}-{i}")))
                    .await
                    .unwrap();
                sent += 100;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };
    let done = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (q, done) = (q.clone(), done.clone());
        tokio::spawn(async move {
            // An ordered group (of one): per-key order is what it promises.
            let mut c = q.consumer().ordered().build().unwrap();
            let mut got: Vec<Vec<u8>> = Vec::new();
            loop {
                let b = c
                    .recv_batch_timeout(1000, Duration::from_millis(300))
                    .await
                    .unwrap();
                if b.is_empty() && done.load(Ordering::Relaxed) {
                    break;
                }
                got.extend(b.into_iter().map(|m| m.payload.to_vec()));
            }
            c.close().await;
            got
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = rebalance_until_settled(&q).await;
    assert_eq!(report.retired.len(), 1, "{report:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let keyed_sent = keyed.await.unwrap();
    let unkeyed_sent = unkeyed.await.unwrap();
    // Let the consumer take the rest, then stop it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while q
        .stats()
        .await
        .unwrap()
        .iter()
        .map(|s| s.depth)
        .sum::<u64>()
        > 0
    {
        assert!(Instant::now() < deadline, "the consumer keeps up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.store(true, Ordering::Relaxed);
    let got = consumer.await.unwrap();
    eprintln!(
        "keyed {keyed_sent}, unkeyed {unkeyed_sent}, received {}",
        got.len()
    );
    assert_eq!(
        got.len(),
        keyed_sent + unkeyed_sent,
        "nothing lost or twice"
    );
    let unique: HashSet<&Vec<u8>> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "no duplicates");
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in &got {
        let text = std::str::from_utf8(m).unwrap();
        if let Some((key, seq)) = text.split_once(':') {
            let seq: i64 = seq.parse().unwrap();
            let prev = last.insert(key.to_string(), seq).unwrap_or(-1);
            assert!(seq > prev, "{key}: {seq} after {prev}");
        }
    }
    assert_eq!(last.len(), 50);
}

/// An at-least-once queue: a lease held on a draining shard keeps the shard until it is
/// settled (the holder's ack lands), and dead letters move to a live shard on retirement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_dead_letters_live_through_retirement() {
    let (c, _client, q) =
        queue_on_an_emptied_master("reliable-retire", 0, |b| b.max_attempts(1)).await;
    let plan = q.rebalance_plan().await.unwrap();
    assert_eq!(plan.drain.len(), 1, "{plan:?}");
    let victim = slotq::slot::shard_tag("reliable-retire", plan.drain[0]);
    // A key whose messages go to the shard that will drain.
    let set = q.shards();
    let key = slotq_tests::key_for_shard(&set, plan.drain[0]);
    let p = q.producer().build().unwrap();
    for i in 0..10 {
        p.send_keyed(&key, format!("r{i}")).await.unwrap();
    }
    let mut consumer = q.consumer().without_group().build().unwrap();
    let mut got = Vec::new();
    while got.len() < 10 {
        got.extend(consumer.recv_batch(10).await.unwrap());
    }
    assert!(got.iter().all(|m| *m.shard == victim));
    // Two go to the dead letters (one attempt allowed); eight stay leased.
    for m in &got[..2] {
        m.nack(None).await.unwrap();
    }
    let held = &got[2..];

    // The shard drains but is not retired while its leases are held.
    let r = q.rebalance().await.unwrap();
    assert_eq!(r.drained, vec![victim.clone()], "{r:?}");
    assert!(r.retired.is_empty(), "{r:?}");
    assert_eq!(r.waiting, vec![victim.clone()]);
    assert_eq!(
        consumer.ack_all(held).await.unwrap().settled,
        8,
        "the leases were kept"
    );
    let r = rebalance_until_settled(&q).await;
    assert_eq!(r.retired, vec![victim.clone()], "{r:?}");
    assert_eq!(r.moved, 2, "the two dead letters moved");
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead.iter().all(|d| d.shard != victim));
    assert_eq!(keys_of(&c, &victim), 0);
    consumer.close().await;
}

/// A key's backlog on a shard that retires is delivered before the key's newer messages,
/// which wait for the shard to empty and then go to the shard its keys moved to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_backlog_on_a_retiring_shard_comes_before_its_newer_messages() {
    let (_c, _client, q) = queue_on_an_emptied_master("handover", 0, |b| b).await;
    let plan = q.rebalance_plan().await.unwrap();
    assert_eq!(plan.drain.len(), 1, "{plan:?}");
    let set = q.shards();
    let key = slotq_tests::key_for_shard(&set, plan.drain[0]);
    let p = q.producer().build().unwrap();
    for i in 0..500 {
        p.send_keyed(&key, format!("{i}")).await.unwrap();
    }
    // The rebalance drains and retires the shard; newer messages of the key are sent
    // meanwhile; the consumer starts late, so the backlog is still there when they are.
    let rebalance = {
        let q = q.clone();
        tokio::spawn(async move { rebalance_until_settled(&q).await })
    };
    let newer = {
        let (p, key) = (p.clone(), key.clone());
        tokio::spawn(async move {
            for i in 500..600 {
                p.send_keyed(&key, format!("{i}")).await.unwrap();
            }
        })
    };
    tokio::time::sleep(POLL * 4).await;
    // An ordered group (of one): per-key order is what it promises.
    let mut consumer = q.consumer().ordered().build().unwrap();
    let mut got: Vec<u32> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 600 {
        assert!(Instant::now() < deadline, "got {}", got.len());
        for m in consumer
            .recv_batch_timeout(100, Duration::from_millis(200))
            .await
            .unwrap()
        {
            got.push(std::str::from_utf8(&m.payload).unwrap().parse().unwrap());
        }
    }
    let report = rebalance.await.unwrap();
    newer.await.unwrap();
    assert_eq!(report.retired.len(), 1, "{report:?}");
    assert_eq!(got, (0..600).collect::<Vec<u32>>(), "in order, once each");
    consumer.close().await;
}

/// A rebalance cancelled right after it took a shard off the registry, before it moved
/// what was left in it (a delayed message): its lock goes with it, and the next rebalance
/// moves the leftover, which is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_cancelled_mid_retirement_is_finished_by_the_next() {
    let (_c, _client, q) = queue_on_an_emptied_master("cancelled", 0, |b| b.reliable()).await;
    let plan = q.rebalance_plan().await.unwrap();
    assert_eq!(plan.drain.len(), 1, "{plan:?}");
    let victim = plan.drain[0];
    let key = slotq_tests::key_for_shard(&q.shards(), victim);
    q.producer()
        .build()
        .unwrap()
        .send_keyed(&key, "later")
        .await
        .unwrap();
    // Taken and nacked with a delay: only the shard's delayed set holds it.
    let mut consumer = q.consumer().without_group().build().unwrap();
    let m = consumer.recv().await.unwrap();
    m.nack(Some(Duration::from_secs(3))).await.unwrap();
    consumer.close().await;

    let step = {
        let q = q.clone();
        tokio::spawn(async move { q.rebalance().await })
    };
    // Cancelled once the shard is off the registry (its leftovers move two polls later).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let set = q.reload().await.unwrap();
        if set.shard(victim).is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shard never left the registry"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    step.abort();
    assert!(step.await.unwrap_err().is_cancelled());
    let set = q.reload().await.unwrap();
    assert_eq!(
        set.cleanup,
        vec![victim],
        "the half-done retirement is recorded"
    );
    // The lock went with the cancelled step.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = q
        .rebalance()
        .await
        .expect("not busy: the cancelled step released its lock");
    assert_eq!(r.moved, 1, "the leftover moved: {r:?}");
    assert!(q.reload().await.unwrap().cleanup.is_empty());
    let mut consumer = q.consumer().without_group().build().unwrap();
    let got = consumer
        .recv_batch_timeout(10, Duration::from_secs(8))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "the delayed message is delivered");
    assert_eq!(&got[0].payload[..], b"later");
    consumer.close().await;
}
