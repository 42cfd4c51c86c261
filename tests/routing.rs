//! The router against real clusters: slot math vs the server, MOVED, ASK, pipelines
//! across nodes, standalone servers.

use rand::Rng;
use slotq::redis;
use slotq::slot::key_slot;
use slotq_testkit::{ClusterBuilder, Server, TestCluster};
use slotq_tests::{key_on, router};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_slot_matches_server_for_10000_random_keys() {
    let server = ClusterBuilder::new().masters(1).start().unwrap();
    let mut conn = server.node(0).conn().unwrap();
    let mut rng = rand::rng();
    let mut keys: Vec<Vec<u8>> = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let len = rng.random_range(0..24);
        let mut k: Vec<u8> = if i % 2 == 0 {
            // Binary keys.
            (0..len).map(|_| rng.random::<u8>()).collect()
        } else {
            // Text keys with braces sprinkled in, to exercise the hash-tag rules.
            (0..len)
                .map(|_| b"ab{}c}{x"[rng.random_range(0..8)])
                .collect()
        };
        if i % 7 == 0 {
            k.extend_from_slice(b"{tag}");
        }
        keys.push(k);
    }
    let mut pipe = redis::pipe();
    for k in &keys {
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(k.as_slice());
    }
    let slots: Vec<u16> = pipe.query(&mut conn).unwrap();
    for (k, s) in keys.iter().zip(slots) {
        assert_eq!(key_slot(k), s, "key {k:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_updates_the_map_and_succeeds() {
    let c = ClusterBuilder::new().masters(2).start().unwrap();
    let r = router(&c.url()).await;
    let key = key_on(&c, 0, "moved");
    let slot = key_slot(&key);
    let _: () = r
        .query(slot, redis::cmd("SET").arg(&key).arg("v1"))
        .await
        .unwrap();
    c.migrate_slot(slot, 1).unwrap();
    let before = r.stats();
    let v: String = r.query(slot, redis::cmd("GET").arg(&key)).await.unwrap();
    assert_eq!(v, "v1");
    assert!(r.stats().moved > before.moved, "a MOVED was followed");
    let owner = r.topology().owner(slot).cloned().unwrap();
    assert_eq!(
        owner.port,
        c.node(1).port(),
        "the slot map names the new owner"
    );
    // Other slots still route to the old owner.
    let other = key_on(&c, 0, "stay");
    let _: () = r
        .query_key(&other, redis::cmd("SET").arg(&other).arg("x"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_reads_mid_migration_without_changing_the_map() {
    let c = ClusterBuilder::new().masters(2).start().unwrap();
    let r = router(&c.url()).await;
    let key = key_on(&c, 0, "ask");
    let slot = key_slot(&key);
    let _: () = r
        .query(slot, redis::cmd("SET").arg(&key).arg("moving"))
        .await
        .unwrap();
    let m = c.begin_migration(slot, 1).unwrap();
    assert_eq!(
        c.migrate_keys(&m, 100).unwrap(),
        1,
        "the key is now on the target"
    );
    let map_before = r.topology();
    let asked_before = r.stats().asked;
    let v: String = r.query(slot, redis::cmd("GET").arg(&key)).await.unwrap();
    assert_eq!(v, "moving");
    assert!(r.stats().asked > asked_before, "an ASK was followed");
    assert_eq!(
        *r.topology(),
        *map_before,
        "ASK does not change the slot map"
    );
    assert_eq!(r.topology().owner(slot).unwrap().port, c.node(0).port());
    // A new key in the migrating slot is created on the target via ASK too.
    let sibling = format!("{key}:sibling");
    assert_eq!(key_slot(&sibling), slot);
    let _: () = r
        .query(slot, redis::cmd("SET").arg(&sibling).arg("s"))
        .await
        .unwrap();
    c.finish_migration(&m).unwrap();
    let v: String = r
        .query(slot, redis::cmd("GET").arg(&sibling))
        .await
        .unwrap();
    assert_eq!(v, "s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_spans_nodes_and_keeps_order() {
    let c = TestCluster::start(3, 0).unwrap();
    let r = router(&c.url()).await;
    let cmds: Vec<_> = (0..300)
        .map(|i| {
            let k = format!("batch:{i}");
            (key_slot(&k), redis::cmd("SET").arg(&k).arg(i).clone())
        })
        .collect();
    for res in r.batch(cmds, r.default_opts()).await {
        res.unwrap();
    }
    let gets: Vec<_> = (0..300)
        .map(|i| {
            let k = format!("batch:{i}");
            (key_slot(&k), redis::cmd("GET").arg(&k).clone())
        })
        .collect();
    let out = r.batch(gets, r.default_opts()).await;
    for (i, res) in out.into_iter().enumerate() {
        let v: i64 = redis::from_redis_value(res.unwrap()).unwrap();
        assert_eq!(v, i as i64);
    }
    // Keys landed on all three masters.
    let mut per_master = [0; 3];
    for i in 0..300 {
        per_master[c.owner_of(key_slot(format!("batch:{i}"))).unwrap()] += 1;
    }
    assert!(per_master.iter().all(|&n| n > 50), "{per_master:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_typed_per_command() {
    let c = TestCluster::start(2, 0).unwrap();
    let r = router(&c.url()).await;
    let _: () = r
        .query_key("str", redis::cmd("SET").arg("str").arg("x"))
        .await
        .unwrap();
    let err = r
        .query_key::<i64>("str", redis::cmd("LPUSH").arg("str").arg("y"))
        .await
        .unwrap_err();
    match err {
        slotq::Error::Server { code, .. } => assert_eq!(code, "WRONGTYPE"),
        other => panic!("expected WRONGTYPE, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_server_is_one_node_owning_every_slot() {
    let s = Server::start().unwrap();
    let r = router(&s.url()).await;
    let t = r.topology();
    assert!(t.is_standalone());
    assert_eq!(t.masters().len(), 1);
    assert!(t.gaps().is_empty());
    let n: i64 = r
        .query_key("a", redis::cmd("RPUSH").arg("a").arg(1).arg(2))
        .await
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_a_silent_node_share_one_connection_attempt() {
    use std::time::{Duration, Instant};
    let server = Server::start().unwrap();
    let timeout = Duration::from_millis(200);
    let cluster = slotq::Cluster::connect(
        slotq::ClusterConfig::from_url(&server.url())
            .unwrap()
            .connect_timeout(timeout)
            .request_timeout(timeout),
    )
    .await
    .unwrap();
    // Accepts connections (the kernel's backlog does) and never answers, like a stopped node.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = slotq::NodeAddr::new("127.0.0.1", silent.local_addr().unwrap().port());
    let calls = (0..50).map(|_| {
        let (cluster, addr) = (cluster.clone(), addr.clone());
        async move {
            let t = Instant::now();
            let r = cluster
                .node_query::<redis::Value>(&addr, &redis::cmd("PING"))
                .await;
            (t.elapsed(), r)
        }
    });
    let out = futures::future::join_all(calls).await;
    let slowest = out.iter().map(|(t, _)| *t).max().unwrap();
    assert!(
        out.iter().all(|(_, r)| r.is_err()),
        "a silent node answered"
    );
    // One attempt for everyone: the slowest caller waits about one connect timeout, not
    // fifty of them one after the other.
    assert!(
        slowest < timeout * 5,
        "slowest of 50 callers took {slowest:?} (connect timeout {timeout:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_wait_out_a_long_script_busy() {
    use std::time::{Duration, Instant};
    let c = TestCluster::start(3, 0).unwrap();
    let cluster = router(&c.url()).await;
    let key = key_on(&c, 0, "busy");
    c.node(0)
        .cmd::<()>(
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("busy-reply-threshold")
                .arg(50),
        )
        .unwrap();
    // A script that runs for 800 ms on the key's master: other clients get BUSY meanwhile.
    let mut conn = c.node(0).conn().unwrap();
    let script = std::thread::spawn(move || {
        let spin = "local t = redis.call('TIME') local s = t[1] * 1000000 + t[2] \
                    while true do local n = redis.call('TIME') \
                    if n[1] * 1000000 + n[2] - s > 800000 then return 1 end end";
        let _: i64 = redis::cmd("EVAL")
            .arg(spin)
            .arg(0)
            .query(&mut conn)
            .unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let n: i64 = cluster
        .query(
            slotq::slot::key_slot(&key),
            redis::cmd("RPUSH").arg(&key).arg("x"),
        )
        .await
        .expect("retried until the script ended");
    assert_eq!(n, 1);
    assert!(
        t.elapsed() > Duration::from_millis(300),
        "the push did meet BUSY"
    );
    script.join().unwrap();
}

/// A master at `maxmemory` refuses writes with OOM: a keyed push to its shard fails at
/// once with a typed error (no retry can help), unkeyed batches go to the other masters,
/// and pops (which free memory) still drain it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_out_of_memory_refuses_pushes_typed_and_unkeyed_go_elsewhere() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let client = slotq::Client::from_cluster(router(&c.url()).await);
    let q = client.queue("oom").open().await.unwrap();
    let p = q.producer().build().unwrap();
    let set = q.shards();
    let full = set.shards[0].clone();
    let owner = c.owner_of(full.slot).unwrap();
    let key = slotq_tests::key_for_shard(&set, full.number);
    p.send_keyed(&key, "before").await.unwrap();
    let _: () = c
        .node(owner)
        .cmd(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(1))
        .unwrap();

    let started = std::time::Instant::now();
    let e = p.send_keyed(&key, "refused").await.unwrap_err();
    assert!(
        matches!(
            e,
            slotq::Error::Server {
                kind: slotq::ServerErrorKind::OutOfMemory,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.may_have_run());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "final, not retried for the whole budget"
    );
    p.send_batch((0..3000).map(|i| format!("u{i}")))
        .await
        .unwrap();
    let stats = q.stats().await.unwrap();
    let on_full = stats.iter().find(|s| s.tag == full.tag).unwrap().depth;
    assert_eq!(on_full, 1, "only the message from before: {stats:?}");
    assert_eq!(stats.iter().map(|s| s.depth).sum::<u64>(), 3001);

    // Pops still work on the full master.
    let mut consumer = q.consumer().without_group().build().unwrap();
    let mut got = 0;
    while got < 3001 {
        got += consumer.recv_batch(1000).await.unwrap().len();
    }
    assert_eq!(got, 3001);
    consumer.close().await;
    let _: () = c
        .node(owner)
        .cmd(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0))
        .unwrap();
    p.send_keyed(&key, "after").await.unwrap();
}
