//! Network partitions, cut with nftables rules in a table of the test's own
//! (`slotq_tests::nft`), healed when the test ends.

use std::time::Duration;

use slotq::{Cluster, redis};
use slotq_testkit::TestCluster;
use slotq_tests::{fast_config, key_on, nft::Partition};

/// A client cut off from one master gives up on a request (`Timeout`, which says it may
/// have run) and resets its connection: the request, still in the client's kernel when the
/// network heals, is never delivered. (Closed gracefully, the connection kept
/// retransmitting it, and the push landed seconds after the heal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_on_during_a_partition_never_runs_after_the_heal() {
    let c = TestCluster::start(3, 0).unwrap();
    let cluster = Cluster::connect(fast_config(&c.url()).retry_budget(Duration::from_millis(300)))
        .await
        .unwrap();
    let m = c.masters()[0];
    let key = key_on(&c, m, "abandoned");
    let slot = slotq::slot::key_slot(&key);
    let _: i64 = cluster
        .query(slot, redis::cmd("RPUSH").arg(&key).arg("before"))
        .await
        .unwrap();
    let cut = Partition::new();
    cut.cut_port(c.node(m).port());
    let e = cluster
        .query::<i64>(slot, redis::cmd("RPUSH").arg(&key).arg("given up on"))
        .await
        .unwrap_err();
    assert!(e.may_have_run(), "a push that timed out may have run: {e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    cut.heal();
    // A graceful close goes on retransmitting with backoff (0.2, 0.4, 0.8, 1.6, 3.2 s):
    // what it held would arrive well within this.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let items: Vec<String> = c
        .node(m)
        .cmd(redis::cmd("LRANGE").arg(&key).arg(0).arg(-1))
        .unwrap();
    assert_eq!(items, ["before"], "the push given up on never ran");
    // And the client serves again.
    let n: i64 = cluster
        .query(slot, redis::cmd("RPUSH").arg(&key).arg("after"))
        .await
        .unwrap();
    assert_eq!(n, 2);
}

/// Which nodes a partition test cuts apart.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Cut {
    /// One master from every other node (clients still reach it); keyed sends to its shard.
    MasterFromAll,
    /// That master's replica from the master (both still reach the others); unkeyed sends.
    ReplicaFromMaster,
}

/// What a cut costs the messages sent meanwhile: (acknowledged, acknowledged then lost,
/// sends that failed). The cut lasts 8 s (node timeout 2 s: a master cut off from every
/// other node sees its replica promoted on the other side, and refuses writes once it
/// sees it lost the majority), then heals.
async fn partitioned(first_ip: u8, durable: bool, cut_what: Cut) -> (usize, usize, usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let c = slotq_tests::partition_cluster(first_ip);
    let client = slotq::Client::from_cluster(slotq_tests::router(&c.url()).await);
    let q = client
        .queue("cut")
        .shards_per_master(1)
        .reliable()
        .open()
        .await
        .unwrap();
    let set = q.shards();
    let shard = set.shards[0].clone();
    let key = slotq_tests::key_for_shard(&set, shard.number);
    let m = c.owner_of(shard.slot).unwrap();
    // The default producer of an at-least-once queue waits for a replica.
    let mut producer = q.producer();
    if !durable {
        producer = producer.no_durability();
    }
    let producer = producer.build().unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (producer, acked, stop, key, failed) = (
                producer.clone(),
                acked.clone(),
                stop.clone(),
                key.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = format!("t{t}-{seq}");
                    seq += 1;
                    let sent = match cut_what {
                        Cut::MasterFromAll => producer.send_keyed(&key, body.as_str()).await,
                        Cut::ReplicaFromMaster => producer.send(body.as_str()).await,
                    };
                    if sent.is_ok() {
                        acked.lock().unwrap().push(body);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = Partition::new();
    match cut_what {
        Cut::MasterFromAll => cut.isolate_node(&c, m),
        Cut::ReplicaFromMaster => {
            let r = c.replicas_of(m)[0];
            cut.isolate(c.node(r).host(), &[c.node(m).host()]);
        }
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    cut.heal();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    // The old master rejoins as a replica of the promoted one, and resyncs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = slotq_tests::drain_payloads(&q, Duration::from_secs(3)).await;
    let acked = acked.lock().unwrap();
    let lost = acked.iter().filter(|a| !got.contains(*a)).count();
    let failed = failed.load(Ordering::Relaxed);
    eprintln!(
        "{cut_what:?}, durable {durable}: {} acknowledged, {lost} of them lost; {failed} sends failed",
        acked.len()
    );
    (acked.len(), lost, failed)
}

/// Without durability (`no_durability()`), sends the cut-off master acknowledged before it noticed it lost
/// the majority are lost when its replica takes over: the documented bound (the node
/// timeout's worth of sends to that master), pinned so that a change shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_master_loses_what_it_acknowledged_without_durability() {
    let (acked, lost, _) = partitioned(11, false, Cut::MasterFromAll).await;
    assert!(acked > 0);
    assert!(
        lost > 0,
        "this case loses acknowledged sends: docs/operations.md says so"
    );
}

/// By default (an at-least-once queue's producer waits for a replica), a master cut off
/// from its replica acknowledges nothing: no acknowledged send is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_master_loses_nothing_acknowledged_by_default() {
    let (acked, lost, _) = partitioned(31, true, Cut::MasterFromAll).await;
    assert!(acked > 0);
    assert_eq!(lost, 0, "of {acked} acknowledged sends");
}

/// A replica cut off from its master (both still see the rest of the cluster): nothing is
/// promoted, the master's pushes find no replica to confirm them, and the default producer
/// sends unkeyed batches to the other masters instead: nothing acknowledged is lost, and
/// no send fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_from_its_master_costs_no_acknowledged_send_and_no_failed_one() {
    let (acked, lost, failed) = partitioned(51, true, Cut::ReplicaFromMaster).await;
    assert!(acked > 0);
    assert_eq!(lost, 0, "of {acked} acknowledged sends");
    assert_eq!(failed, 0, "unkeyed sends go to the other masters");
}

/// What consumers of an at-most-once queue deliver across a cut of the master that holds
/// a backlog (cut from every other node, clients still reach it, replica promoted on the
/// other side): (messages in the backlog, delivered twice, never delivered). The backlog
/// is written durably before the cut, so the promoted replica has all of it; consumers
/// take it slowly (about 5,000 a second) from before the cut until after the heal.
async fn popped_across_a_cut(first_ip: u8, confirmed: bool) -> (usize, usize, usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let c = slotq_tests::partition_cluster(first_ip);
    let client = slotq::Client::from_cluster(slotq_tests::router(&c.url()).await);
    let q = client
        .queue("cutpops")
        .shards_per_master(1)
        .open()
        .await
        .unwrap();
    let set = q.shards();
    let shard = set.shards[0].clone();
    let key = slotq_tests::key_for_shard(&set, shard.number);
    let m = c.owner_of(shard.slot).unwrap();
    let backlog = 60_000;
    let producer = q
        .producer()
        .durability(1, Duration::from_secs(2))
        .build()
        .unwrap();
    for chunk in (0..backlog).collect::<Vec<_>>().chunks(1000) {
        let batch: Vec<(&str, String)> = chunk
            .iter()
            .map(|i| (key.as_str(), format!("m{i}")))
            .collect();
        producer.send_keyed_batch(batch).await.unwrap();
    }
    let delivered: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let mut b = q.consumer().pop_batch(50);
            if !confirmed {
                b = b.unconfirmed_pops();
            }
            let mut consumer = b.build().unwrap();
            let (delivered, stop) = (delivered.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match consumer
                        .recv_batch_timeout(50, Duration::from_millis(200))
                        .await
                    {
                        Ok(batch) => delivered.lock().unwrap().extend(
                            batch
                                .iter()
                                .map(|m| String::from_utf8_lossy(&m.payload).into_owned()),
                        ),
                        Err(e) => {
                            eprintln!("receive failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                consumer.close().await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = Partition::new();
    cut.isolate_node(&c, m);
    tokio::time::sleep(Duration::from_secs(8)).await;
    cut.heal();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in consumers {
        t.await.unwrap();
    }
    // The old master rejoins as a replica of the promoted one, and resyncs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rest = slotq_tests::drain_payloads(&q, Duration::from_secs(3)).await;
    let mut all = delivered.lock().unwrap().clone();
    let during = all.len();
    all.extend(rest);
    let unique: std::collections::HashSet<&String> = all.iter().collect();
    let twice = all.len() - unique.len();
    let lost = backlog - unique.len();
    eprintln!(
        "confirmed pops {confirmed}: {backlog} in the backlog, {during} delivered during the run, \
         {twice} delivered twice, {lost} never delivered"
    );
    (backlog, twice, lost)
}

/// By default an at-most-once consumer hands out only pops a replica confirmed: the
/// minority master's pops during the cut go back to its list (and die with it), the
/// promoted replica delivers them once. Nothing twice, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_at_most_once_queue_delivers_nothing_twice_across_a_cut_by_default() {
    let (backlog, twice, lost) = popped_across_a_cut(71, true).await;
    assert_eq!(twice, 0, "of a backlog of {backlog}");
    assert_eq!(lost, 0, "of a backlog of {backlog}");
}

/// With `unconfirmed_pops()`, what the minority master hands out before it notices the
/// cut is handed out again by the promoted replica: the documented cost of that setting,
/// pinned so that a change shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_pops_deliver_twice_what_a_minority_master_handed_out() {
    let (backlog, twice, _) = popped_across_a_cut(91, false).await;
    assert!(
        twice > 0,
        "of a backlog of {backlog}: docs/operations.md says this case delivers twice"
    );
}

/// The client on the minority side: it reaches one master only, which is cut off from
/// every other node (the majority promotes that master's replica). Every call returns
/// within the documented bound — the retry budget, plus one request timeout for the
/// attempt under way, plus the `WAIT` of a durable send — whatever it answers. Returns
/// (sends, the longest one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_the_minority_side_gets_an_answer_within_the_retry_budget() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let c = slotq_tests::partition_cluster(111);
    let config = slotq::ClusterConfig::from_url(&c.url()).unwrap();
    let (budget, timeout) = (config.retry_budget_value(), config.request_timeout_value());
    let client = slotq::Client::from_cluster(Cluster::connect(config).await.unwrap());
    let q = client.queue("minority").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let m = c.masters()[0];
    let longest: Arc<Mutex<(Duration, String)>> = Arc::default();
    let counts: Arc<Mutex<std::collections::BTreeMap<String, usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (producer, longest, counts, stop) = (
                producer.clone(),
                longest.clone(),
                counts.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let started = std::time::Instant::now();
                    let sent = producer.send(format!("t{t}-{seq}")).await;
                    seq += 1;
                    let took = started.elapsed();
                    let what = match &sent {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("{e:?}")
                            .split([' ', '{', '('])
                            .next()
                            .unwrap()
                            .to_string(),
                    };
                    *counts.lock().unwrap().entry(what.clone()).or_default() += 1;
                    let mut l = longest.lock().unwrap();
                    if took > l.0 {
                        *l = (took, what);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = Partition::new();
    cut.isolate_node(&c, m);
    cut.isolate_from_nodes("127.0.0.1", &c, m);
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    cut.heal();
    let (took, what) = longest.lock().unwrap().clone();
    eprintln!(
        "minority client: {:?}; longest send {took:?} ({what}); budget {budget:?}, request timeout {timeout:?}",
        counts.lock().unwrap()
    );
    // The budget, then the attempt under way when it ran out: a connection (connect
    // timeout, 1 s by default), the request timeout, and the `WAIT` of a durable send.
    let wait = Duration::from_millis(500);
    let bound = budget + Duration::from_secs(1) + timeout + wait;
    assert!(
        took <= bound,
        "a send took {took:?} ({what}); the bound is {bound:?}"
    );
}

/// A consumer blocked on an idle shard follows the promotion of that shard's replica
/// within a second, even when the old master (cut off from every other node, still
/// reachable by the client) has the lowest address, the one a slot-map refresh asked
/// first: the refresh believes the majority's map, not the first node that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_consumer_follows_a_promotion_within_a_second() {
    let c = slotq_tests::partition_cluster(151);
    let config = slotq::ClusterConfig::from_url(&c.url()).unwrap();
    let client = slotq::Client::from_cluster(Cluster::connect(config).await.unwrap());
    let q = client
        .queue("promoted")
        .shards_per_master(1)
        .open()
        .await
        .unwrap();
    // The shard of the master with the lowest address.
    let m = (0..c.len())
        .filter(|i| c.masters().contains(i))
        .min_by_key(|&i| c.node(i).host().to_string())
        .unwrap();
    let set = q.shards();
    let shard = set
        .shards
        .iter()
        .find(|s| c.owner_of(s.slot) == Some(m))
        .unwrap()
        .clone();
    let r = c.replicas_of(m)[0];
    let mut consumer = q.consumer().build().unwrap();
    let receiving = tokio::spawn(async move {
        let got = consumer
            .recv_batch_timeout(1, Duration::from_secs(30))
            .await
            .unwrap();
        (std::time::Instant::now(), got)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = Partition::new();
    cut.isolate_node(&c, m);
    // Wait for the promotion, then push straight to the new master.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let role: Vec<redis::Value> = c.node(r).cmd(&redis::cmd("ROLE")).unwrap();
        if matches!(&role[0], redis::Value::BulkString(b) if b == b"master") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no promotion");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let key = slotq::placement::ready_key(q.prefix(), &shard.tag);
    let _: i64 = c
        .node(r)
        .cmd(redis::cmd("RPUSH").arg(&key).arg("after the promotion"))
        .unwrap();
    let pushed = std::time::Instant::now();
    let (at, got) = receiving.await.unwrap();
    cut.heal();
    assert_eq!(got.len(), 1, "the message pushed to the new master arrives");
    assert_eq!(&got[0].payload[..], b"after the promotion");
    let took = at.saturating_duration_since(pushed);
    eprintln!("delivered {took:?} after it was pushed to the promoted replica");
    assert!(took <= Duration::from_secs(1), "took {took:?}");
}
