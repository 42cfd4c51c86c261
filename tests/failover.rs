//! Node loss: kill -9 of a master with a replica, SIGSTOP of a master. No call may hang
//! past its deadline; routing recovers after promotion.

use std::time::{Duration, Instant};

use slotq::redis;
use slotq::slot::key_slot;
use slotq_testkit::ClusterBuilder;
use slotq_tests::{fast_config, key_on};

/// One attempt of 500 ms + a 2 s retry budget + a 500 ms connect, plus scheduling slack.
const CALL_BOUND: Duration = Duration::from_millis(4500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_master_recovers_after_promotion() {
    let mut c = ClusterBuilder::new()
        .masters(3)
        .replicas(1)
        .node_timeout_ms(1000)
        .start()
        .unwrap();
    let r = slotq::Cluster::connect(fast_config(&c.url()))
        .await
        .unwrap();
    let victim = 1;
    let key = key_on(&c, victim, "failover");
    let slot = key_slot(&key);
    let _: () = r
        .query(slot, redis::cmd("SET").arg(&key).arg("before"))
        .await
        .unwrap();
    // Let the replica catch up so the key survives.
    let _: i64 = r
        .query(slot, redis::cmd("WAIT").arg(1).arg(2000))
        .await
        .unwrap();
    let other = key_on(&c, 0, "healthy");

    c.kill(victim).unwrap();
    let killed_at = Instant::now();
    let mut longest = Duration::ZERO;
    let mut recovered_after = None;
    let mut healthy_failures = 0;
    while killed_at.elapsed() < Duration::from_secs(30) {
        let t0 = Instant::now();
        let res: slotq::Result<String> = r.query(slot, redis::cmd("GET").arg(&key)).await;
        longest = longest.max(t0.elapsed());
        assert!(
            t0.elapsed() < CALL_BOUND,
            "a call hung for {:?}",
            t0.elapsed()
        );
        if let Err(e) = &res {
            assert!(
                e.is_retryable(),
                "failure during failover must be retryable: {e}"
            );
        }
        // Slots of the healthy masters keep working throughout.
        if r.query_key::<()>(&other, redis::cmd("SET").arg(&other).arg(1))
            .await
            .is_err()
        {
            healthy_failures += 1;
        }
        if let Ok(v) = res {
            assert_eq!(v, "before");
            recovered_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered_after = recovered_after.expect("routing recovered after promotion");
    eprintln!(
        "kill -9: recovered after {recovered_after:?} (node timeout {:?}), longest call {longest:?}, healthy-slot failures {healthy_failures}",
        c.node_timeout()
    );
    assert!(recovered_after < c.node_timeout() + Duration::from_secs(5));
    assert_eq!(healthy_failures, 0, "other masters were unaffected");
    let owner = r.topology().owner(slot).cloned().unwrap();
    assert_ne!(
        owner.port,
        c.node(victim).port(),
        "the map names the promoted replica"
    );

    // The killed master comes back as a replica; routing stays correct.
    c.restart(victim).unwrap();
    c.wait_stable().unwrap();
    let v: String = r.query(slot, redis::cmd("GET").arg(&key)).await.unwrap();
    assert_eq!(v, "before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_master_times_out_by_the_deadline() {
    let c = ClusterBuilder::new()
        .masters(3)
        .node_timeout_ms(5000)
        .start()
        .unwrap();
    let r = slotq::Cluster::connect(fast_config(&c.url()))
        .await
        .unwrap();
    let victim = 2;
    let key = key_on(&c, victim, "paused");
    let slot = key_slot(&key);
    let _: () = r
        .query(slot, redis::cmd("SET").arg(&key).arg("x"))
        .await
        .unwrap();

    c.pause(victim).unwrap();
    let t0 = Instant::now();
    let err = r
        .query::<String>(slot, redis::cmd("GET").arg(&key))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    eprintln!("SIGSTOP: first call failed after {took:?}: {err}");
    assert!(matches!(err, slotq::Error::Timeout { .. }), "{err:?}");
    assert!(err.may_have_run());
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert!(r.is_node_down(&r.topology().owner(slot).cloned().unwrap()));

    // Further calls fail by their deadline too, without hanging.
    for _ in 0..3 {
        let t0 = Instant::now();
        let err = r
            .query::<String>(slot, redis::cmd("GET").arg(&key))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert!(t0.elapsed() < CALL_BOUND, "{:?}", t0.elapsed());
    }
    // Other masters keep serving meanwhile.
    let other = key_on(&c, 0, "alive");
    let _: () = r
        .query_key(&other, redis::cmd("SET").arg(&other).arg(1))
        .await
        .unwrap();

    c.resume(victim).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match r.query::<String>(slot, redis::cmd("GET").arg(&key)).await {
            Ok(v) => {
                assert_eq!(v, "x");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("after SIGCONT: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery after SIGCONT: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_callers_of_a_frozen_master_each_keep_their_deadline() {
    // Default settings: 1 s per attempt, 1 s to connect, 3 s retry budget.
    let c = ClusterBuilder::new()
        .masters(3)
        .replicas(1)
        .node_timeout_ms(2000)
        .start()
        .unwrap();
    let r = slotq::Cluster::connect(slotq::ClusterConfig::from_url(&c.url()).unwrap())
        .await
        .unwrap();
    let victim = 1;
    let key = key_on(&c, victim, "frozen");
    let slot = key_slot(&key);
    let _: () = r
        .query(slot, redis::cmd("SET").arg(&key).arg("x"))
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let (r, key, stop) = (r.clone(), key.clone(), stop.clone());
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let _ = r
                        .query::<Option<String>>(slot, redis::cmd("GET").arg(&key))
                        .await;
                    slowest = slowest.max(t0.elapsed());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                slowest
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.pause(victim).unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    c.resume(victim).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut slowest = Duration::ZERO;
    for h in callers {
        slowest = slowest.max(h.await.unwrap());
    }
    eprintln!("50 callers, master frozen 12 s: slowest call {slowest:?}");
    // One attempt (1 s) after the retry budget (3 s) ran out, plus a connection attempt
    // (1 s) and the pauses between retries: about 5 s at most, however many callers.
    assert!(
        slowest < Duration::from_millis(5500),
        "slowest call {slowest:?}"
    );
}

/// A durable push (`RPUSH`, the ready count and `WAIT` as one unit) sent to a master that a
/// manual failover just demoted: the push and the count answer MOVED, the `WAIT` "cannot
/// be used with replica instances"; the unit follows the MOVED to the new master and the
/// send succeeds (it used to fail for good with the `WAIT` error, 3 tries of 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_send_to_a_master_just_demoted_follows_the_moved() {
    let c = ClusterBuilder::new()
        .masters(3)
        .replicas(1)
        .node_timeout_ms(1000)
        .start()
        .unwrap();
    let client = slotq::Client::from_cluster(slotq_tests::router(&c.url()).await);
    let q = client
        .queue("durable-moved")
        .shards_per_master(1)
        .reliable()
        .open()
        .await
        .unwrap();
    let producer = q
        .producer()
        .durability(1, Duration::from_millis(500))
        .build()
        .unwrap();
    let set = q.shards();
    let shard = &set.shards[0];
    let key = slotq_tests::key_for_shard(&set, shard.number);
    producer.send_keyed(&key, "before").await.unwrap();
    let master = c.owner_of(shard.slot).unwrap();
    let replica = c.replicas_of(master)[0];
    tokio::task::block_in_place(|| c.failover(replica)).unwrap();
    // The client's map still names the demoted master.
    producer
        .send_keyed(&key, "after")
        .await
        .expect("the unit follows the MOVED");
    let mut consumer = q.consumer().without_group().build().unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let batch = consumer
            .recv_batch_timeout(10, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!batch.is_empty(), "both messages are there: {got:?}");
        consumer.ack_all(&batch).await.unwrap();
        got.extend(batch.into_iter().map(|m| m.payload));
    }
    assert_eq!(got, [&b"before"[..], &b"after"[..]]);
    consumer.close().await;
}
