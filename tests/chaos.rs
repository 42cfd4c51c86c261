//! Failures under load, against real clusters with replicas and a small node timeout:
//! master killed, master frozen, manual failover. Each test prints the load driver's report.

use std::time::{Duration, Instant};

use slotq::placement::{fnv1a, jump_hash};
use slotq::{Client, Queue};
use slotq_testkit::{ClusterBuilder, TestCluster};
use slotq_tests::load::{Load, LoadConfig};

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

fn cluster(node_timeout_ms: u64) -> TestCluster {
    ClusterBuilder::new()
        .masters(3)
        .replicas(1)
        .node_timeout_ms(node_timeout_ms)
        .start()
        .expect("cluster starts")
}

/// The shard of `q` that master `m` serves, and a key that maps to it.
fn shard_on(c: &TestCluster, q: &Queue, m: usize) -> (String, String) {
    let set = q.shards();
    let active: Vec<_> = set.active().collect();
    let (i, shard) = active
        .iter()
        .enumerate()
        .find(|(_, s)| c.owner_of(s.slot) == Some(m))
        .expect("every master has a shard");
    let key = (0..)
        .map(|n| format!("key{n}"))
        .find(|k| jump_hash(fnv1a(k.as_bytes()), active.len()) == i)
        .expect("some key maps to every shard");
    (shard.tag.clone(), key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_master_under_load_loses_no_acknowledged_message() {
    let mut c = cluster(1000);
    let client = client(&c.url()).await;
    let q = client.queue("kill").reliable().open().await.unwrap();
    let producer = q
        .producer()
        .durability(1, Duration::from_millis(500))
        .build()
        .unwrap();
    // The marker measures when the killed master's shard serves again, not durability:
    // it does not wait for a replica (the promoted master has none left).
    let marker = q.producer().no_durability().build().unwrap();
    let load = Load::start(&q, producer, LoadConfig::default());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let victim = 1;
    let (victim_shard, key) = shard_on(&c, &q, victim);
    c.kill(victim).unwrap();
    let killed = Instant::now();
    let promoted =
        tokio::task::block_in_place(|| c.wait_for_promotion(victim, Duration::from_secs(30)))
            .unwrap();
    let promoted_at = Instant::now();
    // A message for the killed master's shard, sent right after the promotion.
    let t0 = Instant::now();
    marker.send_keyed(&key, "marker").await.unwrap();
    let marker_sent_in = t0.elapsed();
    let deadline = promoted_at + c.node_timeout() + Duration::from_secs(3);
    let resumed = loop {
        if let Some(t) = load.first_delivery_after(&victim_shard, promoted_at) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "pops of {victim_shard} did not resume"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish(Duration::from_secs(20)).await;
    eprintln!(
        "kill -9 of master {victim} (node timeout {:?}): promoted node {promoted} after {:?}; pops of {victim_shard} resumed {:?} after the promotion (marker sent in {marker_sent_in:?}); {report}",
        c.node_timeout(),
        promoted_at - killed,
        resumed - promoted_at
    );
    assert_eq!(report.failed, 0, "unkeyed sends never fail: {report}");
    assert_eq!(report.lost, 0, "no acknowledged message lost: {report}");
    assert!(report.acked > 1000, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_master_for_10s_under_load_blocks_no_call() {
    let c = cluster(2000);
    let client = client(&c.url()).await;
    let q = client.queue("freeze").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let load = Load::start(&q, producer, LoadConfig::default());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let victim = 2;
    c.pause(victim).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    c.resume(victim).unwrap();
    tokio::task::block_in_place(|| c.wait_stable()).unwrap();
    let acked_at_resume = load.acked();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked_after = load.acked();
    let report = load.finish(Duration::from_secs(20)).await;
    eprintln!("SIGSTOP of master {victim} for 10 s: {report}");
    // Bound of one call: a 500 ms attempt, a reroute, the consumer's own waits.
    let bound = Duration::from_secs(4);
    assert!(report.longest_send < bound, "{report}");
    assert!(report.longest_recv < bound, "{report}");
    assert!(acked_after > acked_at_resume, "sends go on after SIGCONT");
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(report.lost, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failover_wakes_blocked_consumers_within_a_second() {
    let c = cluster(2000);
    let client = client(&c.url()).await;
    let q = client.queue("switch").open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let mut consumer = q.consumer().build().unwrap();
    // Block the consumer (empty queue), then fail master 0 over to its replica.
    let waiting = tokio::spawn(async move {
        let m = consumer.recv().await.unwrap();
        (m, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (shard, key) = shard_on(&c, &q, 0);
    let replica = c.replicas_of(0)[0];
    tokio::task::block_in_place(|| c.failover(replica)).unwrap();
    let promoted_at = Instant::now();
    producer.send_keyed(&key, "after failover").await.unwrap();
    let (m, got_at) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the blocked consumer got going again")
        .unwrap();
    let after = got_at - promoted_at;
    eprintln!(
        "manual failover: blocked consumer received from {} {after:?} after the promotion",
        m.shard
    );
    assert_eq!(m.payload, &b"after failover"[..]);
    assert_eq!(&*m.shard, shard.as_str());
    assert!(after < Duration::from_secs(1), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reshard_of_2000_slots_under_load_is_invisible() {
    let c = ClusterBuilder::new()
        .masters(3)
        .node_timeout_ms(2000)
        .start()
        .unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("reshard").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let load = Load::start(&q, producer, LoadConfig::default());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Step by step: 1000 slots of master 0 to master 1, the queue's shard slot among them.
    let (shard0, _) = shard_on(&c, &q, 0);
    let slot0 = q
        .shards()
        .shards
        .iter()
        .find(|s| s.tag == shard0)
        .unwrap()
        .slot;
    let mut slots: Vec<u16> = vec![slot0];
    slots.extend(c.slots_of(0).into_iter().filter(|&s| s != slot0).take(999));
    let t0 = Instant::now();
    tokio::task::block_in_place(|| c.migrate_slots(&slots, 1)).unwrap();
    let step_by_step = t0.elapsed();

    // As an operator would: redis-cli moves master 2's lowest slots, through its shard.
    let (shard2, _) = shard_on(&c, &q, 2);
    let slot2 = q
        .shards()
        .shards
        .iter()
        .find(|s| s.tag == shard2)
        .unwrap()
        .slot;
    let first2 = c.slots_of(2)[0];
    let count = ((slot2 - first2) as usize + 1).max(1000);
    let t0 = Instant::now();
    tokio::task::block_in_place(|| c.redis_cli_reshard(2, 1, count)).unwrap();
    let with_cli = t0.elapsed();
    assert_eq!(c.owner_of(slot0), Some(1));
    assert_eq!(c.owner_of(slot2), Some(1));
    let moved_at = Instant::now();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let resumed0 = load.first_delivery_after(&shard0, moved_at);
    let resumed2 = load.first_delivery_after(&shard2, moved_at);
    let report = load.finish(Duration::from_secs(20)).await;
    eprintln!(
        "reshard under load: 1000 slots step by step in {step_by_step:?}, {count} slots with redis-cli in {with_cli:?}; {report}"
    );
    assert!(
        resumed0.is_some() && resumed2.is_some(),
        "moved shards keep being consumed"
    );
    assert_eq!(report.failed, 0, "{report}");
    assert!(
        report.errors.is_empty(),
        "no error reaches the user: {report}"
    );
    assert_eq!(report.lost, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_master_then_remove_one_under_load() {
    let mut c = ClusterBuilder::new()
        .masters(3)
        .node_timeout_ms(2000)
        .start()
        .unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("grow-shrink")
        .reliable()
        .registry_poll(Duration::from_millis(200))
        .open()
        .await
        .unwrap();
    let producer = q.producer().build().unwrap();
    let load = Load::start(&q, producer, LoadConfig::default());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Grow: a fourth master takes 1000 slots; the queue gains a shard there.
    let new = tokio::task::block_in_place(|| {
        let new = c.add_master()?;
        c.reshard(1000, 0, new)?;
        Ok::<_, slotq_testkit::TestkitError>(new)
    })
    .unwrap();
    client.cluster().refresh().await.unwrap();
    let report = q.expand().await.unwrap();
    assert_eq!(report.added.len(), 1, "{report:?}");
    let grown_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let new_used = load.first_delivery_after(&report.added[0], grown_at);

    // Shrink: master 0 hands every slot (and its shard) to master 1 and leaves.
    let gone = c.node(0).port();
    tokio::task::block_in_place(|| {
        let slots = c.slots_of(0);
        c.migrate_slots(&slots, 1)?;
        c.remove_node(0)
    })
    .unwrap();
    let acked_at_removal = load.acked();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The next map (periodic, or on any error) no longer has it.
    let topology = client.cluster().refresh().await.unwrap();
    let report = load.finish(Duration::from_secs(20)).await;
    eprintln!(
        "grow to 4 masters (new shard on node {new}) and shrink to 3 under load: {report}; removed node in the slot map: {}",
        topology.nodes().iter().any(|n| n.addr.port == gone)
    );
    assert!(new_used.is_some(), "the new shard is used");
    assert!(
        !topology.nodes().iter().any(|n| n.addr.port == gone),
        "removed node forgotten"
    );
    assert!(
        load_acked_after(&report, acked_at_removal),
        "sends go on after the master left: {report}"
    );
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(report.lost, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_master_kills_with_restarts_account_for_every_message() {
    let mut c = cluster(1000);
    let client = client(&c.url()).await;
    let q = client.queue("loop").reliable().open().await.unwrap();
    let producer = q
        .producer()
        .durability(1, Duration::from_millis(500))
        .build()
        .unwrap();
    let load = Load::start(&q, producer, LoadConfig::default());
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut recoveries = Vec::new();
    for round in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let masters = c.masters();
        let victim = masters[(rng % masters.len() as u64) as usize];
        let took = tokio::task::block_in_place(|| {
            let t0 = Instant::now();
            c.kill(victim)?;
            c.wait_for_promotion(victim, Duration::from_secs(30))?;
            let promoted = t0.elapsed();
            c.restart(victim)?;
            c.wait_stable()?;
            c.wait_replica_synced(victim)?;
            Ok::<_, slotq_testkit::TestkitError>(promoted)
        })
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        recoveries.push(took);
    }
    let report = load.finish(Duration::from_secs(30)).await;
    eprintln!("10 master kills with restarts (promotions after {recoveries:?}): {report}");
    assert_eq!(
        report.lost, 0,
        "every acknowledged message delivered: {report}"
    );
    assert_eq!(report.failed, 0, "{report}");
}

/// Whether the run acknowledged more than `before` messages in all.
fn load_acked_after(report: &slotq_tests::load::Report, before: u64) -> bool {
    report.acked > before
}
