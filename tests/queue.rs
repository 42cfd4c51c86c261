//! The sharded queue against real clusters: delivery, balance, ordering, agreement on the
//! shard set, expansion, blocking wake-up, backpressure and bad input.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slotq::redis;
use slotq::slot::key_slot;
use slotq::{Client, EmptyPayloads, Error};
use slotq_testkit::{ClusterBuilder, Server, TestCluster};

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

fn id_payload(producer: u32, seq: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(16);
    p.extend_from_slice(&producer.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"-payload");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_messages_exactly_once_and_balanced() {
    const PRODUCERS: u32 = 8;
    const PER_PRODUCER: u32 = 125_000;
    const TOTAL: usize = (PRODUCERS * PER_PRODUCER) as usize;
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("million").open().await.unwrap();
    let producer = q.producer().build().unwrap();

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in (0..PER_PRODUCER).collect::<Vec<_>>().chunks(5_000) {
                producer
                    .send_batch(chunk.iter().map(|&s| id_payload(p, s)))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("pushed {TOTAL} in {:?}", t0.elapsed());

    // Balance, checked with plain commands: each shard's slot and depth.
    let set = q.shards();
    let mut masters_with_shards = std::collections::BTreeSet::new();
    let mut depths = Vec::new();
    for s in &set.shards {
        let key = q.ready_key(&s.tag);
        let owner = c.owner_of(key_slot(&key)).unwrap();
        let server_slot: u16 = c
            .node(owner)
            .cmd(redis::cmd("CLUSTER").arg("KEYSLOT").arg(&key))
            .unwrap();
        assert_eq!(server_slot, s.slot);
        let len: u64 = c.node(owner).cmd(redis::cmd("LLEN").arg(&key)).unwrap();
        masters_with_shards.insert(owner);
        depths.push(len);
    }
    let (max, min) = (*depths.iter().max().unwrap(), *depths.iter().min().unwrap());
    let skew = max as f64 / min as f64;
    eprintln!("shard depths {depths:?}, skew {skew:.4}");
    assert_eq!(depths.iter().sum::<u64>(), TOTAL as u64);
    assert!(skew <= 1.10, "skew {skew}");
    assert_eq!(masters_with_shards.len(), 3, "every master holds shards");

    // Drain with 8 consumers in separate tasks; every id exactly once.
    let t0 = Instant::now();
    let seen = Arc::new(std::sync::Mutex::new(vec![0u8; TOTAL]));
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut consumer = q.consumer().build().unwrap();
        let seen = seen.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            while count.load(std::sync::atomic::Ordering::Relaxed) < TOTAL {
                let batch = consumer
                    .recv_batch_timeout(1000, Duration::from_millis(500))
                    .await
                    .unwrap();
                let mut seen = seen.lock().unwrap();
                for m in &batch {
                    let p = u32::from_be_bytes(m.payload[0..4].try_into().unwrap());
                    let s = u32::from_be_bytes(m.payload[4..8].try_into().unwrap());
                    seen[(p * PER_PRODUCER + s) as usize] += 1;
                }
                count.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("drained {TOTAL} in {:?}", t0.elapsed());
    let seen = seen.lock().unwrap();
    let missing = seen.iter().filter(|&&n| n == 0).count();
    let dup = seen.iter().filter(|&&n| n > 1).count();
    assert_eq!((missing, dup), (0, 0), "every message exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_sends_keep_per_key_order() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("keyed").open().await.unwrap();
    let producer = q.producer().max_buffered(1_000_000).build().unwrap();
    let mut tasks = Vec::new();
    for k in 0..100u32 {
        let producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            // One send at a time per key; the 100 keys' sends coalesce into shared batches.
            for i in 0..1000u32 {
                producer
                    .send_keyed(format!("key-{k}"), format!("{k}:{i}"))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut consumer = q.consumer().build().unwrap();
    let mut order = KeyOrder::default();
    let mut n = 0;
    while n < 100_000 {
        for m in consumer.recv_batch(1000).await.unwrap() {
            order.check(&m);
            n += 1;
        }
    }
    assert!(order.last.values().all(|&i| i == 999));
}

/// Checks messages `"<key>:<seq>"` as they arrive: each key's sequence has no gap and no
/// reordering, and a key stays in one shard.
#[derive(Default)]
struct KeyOrder {
    last: HashMap<u32, i64>,
    shard_of: HashMap<u32, Arc<str>>,
}

impl KeyOrder {
    fn check(&mut self, m: &slotq::Message) {
        let s = std::str::from_utf8(&m.payload).unwrap();
        let (k, i) = s.split_once(':').unwrap();
        let (k, i): (u32, i64) = (k.parse().unwrap(), i.parse().unwrap());
        let prev = self.last.insert(k, i).unwrap_or(-1);
        assert_eq!(i, prev + 1, "key {k}: {i} after {prev}");
        let shard = self.shard_of.entry(k).or_insert_with(|| m.shard.clone());
        assert_eq!(*shard, m.shard, "a key stays in one shard");
    }
}

/// `send_keyed_batch` puts each key where `send_keyed` does, in the order given: batches
/// and single sends of the same keys, interleaved, read back in sequence per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_batches_keep_per_key_order_with_single_sends() {
    const KEYS: u32 = 50;
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("keyed-batch").open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let mut next = vec![0u32; KEYS as usize];
    let batch = |n: u32, next: &mut Vec<u32>| -> Vec<(String, String)> {
        (0..n)
            .map(|i| {
                let k = i % KEYS;
                let seq = next[k as usize];
                next[k as usize] += 1;
                (format!("key-{k}"), format!("{k}:{seq}"))
            })
            .collect()
    };
    for round in 0..3 {
        // 10,000 in one call: more than a push per shard (1,000), so shards take several.
        let items = batch(10_000, &mut next);
        producer.send_keyed_batch(items).await.unwrap();
        if round < 2 {
            let singles = batch(KEYS, &mut next);
            let sends = singles.into_iter().map(|(k, p)| {
                let producer = producer.clone();
                async move { producer.send_keyed(k, p).await }
            });
            for r in futures::future::join_all(sends).await {
                r.unwrap();
            }
        }
    }
    let total: u32 = next.iter().sum();
    let mut consumer = q.consumer().build().unwrap();
    let mut order = KeyOrder::default();
    let mut n = 0;
    while n < total {
        let got = consumer
            .recv_batch_timeout(1000, std::time::Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!got.is_empty(), "{n} of {total} arrived");
        for m in got {
            order.check(&m);
            n += 1;
        }
    }
    let shards: std::collections::HashSet<&Arc<str>> = order.shard_of.values().collect();
    assert_eq!(shards.len(), 3, "50 keys spread over the three shards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_openers_agree_on_one_shard_set() {
    let c = TestCluster::start(3, 0).unwrap();
    for round in 0..5 {
        let a = client(&c.url()).await;
        let b = client(&c.url()).await;
        let name = format!("race{round}");
        let (qa, qb) = tokio::join!(
            a.queue(&name).shards_per_master(2).open(),
            b.queue(&name).shards_per_master(2).open()
        );
        let (qa, qb) = (qa.unwrap(), qb.unwrap());
        assert_eq!(*qa.shards(), *qb.shards());
        assert_eq!(qa.shards().shards.len(), 6);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_adds_shards_on_a_new_master_and_loses_nothing() {
    let mut c = ClusterBuilder::new().masters(3).start().unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("grow")
        .registry_poll(Duration::from_millis(100))
        .open()
        .await
        .unwrap();
    let producer = q.producer().build().unwrap();
    producer
        .send_batch((0..3000).map(|i| format!("old-{i}")))
        .await
        .unwrap();
    let before = q.shards();
    assert_eq!(before.shards.len(), 3);

    let new = c.add_master().unwrap();
    c.reshard(1000, 0, new).unwrap();
    client.cluster().refresh().await.unwrap();
    let report = q.expand().await.unwrap();
    assert_eq!(report.added.len(), 1, "{report:?}");
    assert_eq!(report.version, before.version + 1);
    let new_port = c.node(new).port();
    let added = q
        .shards()
        .shards
        .iter()
        .find(|s| s.tag == report.added[0])
        .cloned()
        .unwrap();
    assert_eq!(
        client.cluster().topology().owner(added.slot).unwrap().port,
        new_port
    );

    // The running producer picks the new shard up without restart and it gets traffic.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..40 {
        producer
            .send_batch((0..100).map(|j| format!("new-{i}-{j}")))
            .await
            .unwrap();
    }
    let stats = q.stats().await.unwrap();
    let on_new = stats.iter().find(|s| s.tag == added.tag).unwrap().depth;
    assert!(on_new > 0, "the new shard received messages: {stats:?}");
    let total: u64 = stats.iter().map(|s| s.depth).sum();
    assert_eq!(total, 3000 + 4000);

    // Everything, old and new, is delivered.
    let mut consumer = q.consumer().build().unwrap();
    let mut got = std::collections::HashSet::new();
    while got.len() < 7000 {
        for m in consumer.recv_batch(1000).await.unwrap() {
            assert!(got.insert(m.payload), "no duplicates");
        }
    }
    assert!(got.contains(b"old-0".as_slice()) && got.contains(b"new-39-99".as_slice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumer_blocks_and_wakes_on_new_data() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("wake").open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let mut consumer = q
        .consumer()
        .block_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let waiting = tokio::spawn(async move {
        let m = consumer.recv().await.unwrap();
        (m, Instant::now(), consumer)
    });
    // Let it connect and block, then count every command the cluster sees in 3 s (the
    // count itself included: one INFO per node, plus the registry's version checks).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let commands_before: u64 = slotq_tests::total_commands(&c);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_commands = slotq_tests::total_commands(&c) - commands_before;
    eprintln!("commands while idle for 3 s (block timeout 5 s): {idle_commands} in all");
    // A group member also renews its membership once a second: one script, five
    // commands as the server counts them (its calls inside included); and its promoter
    // reads each shard's earliest scheduled message every 2 s (one ZRANGE a shard, at
    // most two polls in the window).
    assert!(
        idle_commands <= 12 + 3 * 5 + 3 * 2,
        "idle consumer polls: {idle_commands} commands"
    );
    let sent = Instant::now();
    producer.send("ping").await.unwrap();
    let (m, at, consumer) = waiting.await.unwrap();
    let wake = at.duration_since(sent);
    eprintln!("woke {wake:?} after the send");
    assert_eq!(m.payload, &b"ping"[..]);
    assert!(
        wake < Duration::from_secs(1),
        "woken by data, not by a timeout: {wake:?}"
    );

    // A dropped idle consumer takes nothing with it.
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(300)).await;
    producer.send("after-drop").await.unwrap();
    let mut other = q.consumer().build().unwrap();
    let got = other
        .recv_batch_timeout(10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, &b"after-drop"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_server_holds_every_shard() {
    let s = Server::start().unwrap();
    let client = client(&s.url()).await;
    let q = client
        .queue("solo")
        .shards_per_master(2)
        .open()
        .await
        .unwrap();
    assert_eq!(q.shards().shards.len(), 2);
    let producer = q.producer().build().unwrap();
    producer
        .send_batch((0..500).map(|i| i.to_string()))
        .await
        .unwrap();
    let mut consumer = q.consumer().build().unwrap();
    let mut n = 0;
    while n < 500 {
        n += consumer.recv_batch(100).await.unwrap().len();
    }
    assert_eq!(n, 500);
}

/// Calls of `EVALSHA`/`EVAL` a server answered (the flow writes are `EVAL`).
async fn eval_calls(q: &slotq::Queue) -> u64 {
    let info: String = q
        .cluster()
        .query(0, redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_and_out_add_up_across_clients_and_idle_clients_write_nothing() {
    let s = Server::start().unwrap();
    let a = client(&s.url())
        .await
        .queue("flowing")
        .open()
        .await
        .unwrap();
    let b = client(&s.url())
        .await
        .queue("flowing")
        .open()
        .await
        .unwrap();
    let pa = a.producer().build().unwrap();
    let pb = b.producer().build().unwrap();
    pa.send_batch((0..300).map(|i| i.to_string()))
        .await
        .unwrap();
    pb.send_batch((0..200).map(|i| i.to_string()))
        .await
        .unwrap();
    pb.send("one more").await.unwrap();
    let mut consumer = b.consumer().build().unwrap();
    let mut n = 0;
    while n < 250 {
        n += consumer.recv_batch(250 - n).await.unwrap().len();
    }
    // Written within a flush period by the clients' own tasks.
    let deadline = Instant::now() + slotq::queue::FLOW_FLUSH * 4;
    let mut seen = a.flow().await.unwrap();
    while seen.pushed < 501 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = a.flow().await.unwrap();
    }
    assert_eq!(seen.pushed, 501, "{seen:?}");
    assert!(seen.popped >= 250, "{seen:?}");
    // An explicit flush writes the rest at once; a failed one keeps it for the next.
    b.flush_flow().await.unwrap();
    let taken = a.flow().await.unwrap().popped;
    assert!(taken >= 250, "{taken}");
    // Idle: nothing moves, so nothing is written.
    tokio::time::sleep(slotq::queue::FLOW_FLUSH * 2).await;
    let before = eval_calls(&a).await;
    tokio::time::sleep(slotq::queue::FLOW_FLUSH * 3).await;
    assert_eq!(
        eval_calls(&a).await,
        before,
        "idle clients wrote flow counts"
    );
    assert_eq!(a.flow().await.unwrap().popped, taken);
    // Deleting the queue takes its totals with it.
    drop(consumer);
    a.delete().await.unwrap();
    let c = client(&s.url())
        .await
        .queue("flowing")
        .open()
        .await
        .unwrap();
    assert_eq!(c.flow().await.unwrap(), slotq::FlowTotals::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_shards_refuse_pushes_with_a_typed_error() {
    let c = TestCluster::start(2, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("bounded").open().await.unwrap();
    let producer = q.producer().max_depth(10).build().unwrap();
    // Two shards of 10: 20 fit (unkeyed pushes move to the other shard when one is full).
    for i in 0..20 {
        producer.send(format!("m{i}")).await.unwrap();
    }
    let err = producer.send("one too many").await.unwrap_err();
    assert!(matches!(err, Error::QueueFull { max: 10, .. }), "{err:?}");
    let total: u64 = q.stats().await.unwrap().iter().map(|s| s.depth).sum();
    assert_eq!(total, 20, "nothing extra was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_loses_nothing() {
    let c = TestCluster::start(2, 0).unwrap();
    let client = client(&c.url()).await;
    for bad in ["", "has space", "br{ace}", "x#1"] {
        let err = client.queue(bad).open().await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidQueueName { .. }),
            "{bad:?}: {err:?}"
        );
    }
    let q = client.queue("strict").open().await.unwrap();
    let producer = q.producer().max_payload(1024).build().unwrap();
    producer.send("kept").await.unwrap();
    let err = producer.send(Vec::new()).await.unwrap_err();
    assert!(matches!(err, Error::InvalidPayload(_)), "{err:?}");
    let err = producer.send(vec![b'x'; 1025]).await.unwrap_err();
    assert!(
        err.to_string().contains("exceeds the maximum of 1024"),
        "{err}"
    );
    let err = producer
        .send_batch(vec![b"ok".to_vec(), vec![b'x'; 2000]])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPayload(_)));
    let err = producer
        .send_keyed_batch([("k1", b"ok".to_vec()), ("k2", Vec::new())])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPayload(_)), "{err:?}");
    // A batch with one bad payload (keyed or not) sends none of it.
    let total: u64 = q.stats().await.unwrap().iter().map(|s| s.depth).sum();
    assert_eq!(total, 1);
    let lenient = q
        .producer()
        .empty_payloads(EmptyPayloads::Allow)
        .build()
        .unwrap();
    lenient.send(Vec::new()).await.unwrap();
    let mut consumer = q.consumer().build().unwrap();
    let got = consumer.recv_batch(10).await.unwrap();
    let mut payloads: Vec<Vec<u8>> = got.into_iter().map(|m| m.payload.to_vec()).collect();
    while payloads.len() < 2 {
        payloads.extend(
            consumer
                .recv_batch(10)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.payload.to_vec()),
        );
    }
    payloads.sort();
    assert_eq!(payloads, vec![b"".to_vec(), b"kept".to_vec()]);

    assert!(matches!(
        q.producer().max_batch_messages(0).build(),
        Err(Error::Config(_))
    ));
    let err = client
        .queue("never-made")
        .must_exist()
        .open()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::QueueNotFound(_)), "{err:?}");
}

/// Deleting a queue removes every key of it (ready lists, leases, counts, dead letters,
/// groups, the registry), and producers and consumers still using it get a typed error
/// instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_leaves_no_key_and_its_users_get_a_typed_error() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("doomed").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    producer
        .send_batch((0..1000).map(|i| format!("m{i}")))
        .await
        .unwrap();
    // Some leased, one nacked to the dead letters, a group member with a heartbeat.
    let mut member = q.consumer().build().unwrap();
    let taken = member.recv_batch(10).await.unwrap();
    taken[0].nack(None).await.unwrap();
    let idle = client.queue("doomed").open().await.unwrap();
    let mut waiting = idle.consumer().build().unwrap();
    let waiter = tokio::spawn(async move {
        loop {
            match waiting.recv().await {
                Ok(m) => drop(m),
                Err(e) => return e,
            }
        }
    });
    let dbsize = || -> i64 {
        c.masters()
            .into_iter()
            .map(|m| c.node(m).cmd::<i64>(&redis::cmd("DBSIZE")).unwrap())
            .sum()
    };
    assert!(dbsize() > 3);

    let report = q.delete().await.unwrap();
    assert_eq!(report.shards, 3);
    assert!(report.keys > 3 && report.messages <= 1000, "{report:?}");
    assert_eq!(
        leftovers(&c),
        (0, 15),
        "every key of the queue is gone but its shards' fences"
    );

    // Users of the queue find out within a registry poll or two.
    let started = Instant::now();
    let err = loop {
        match producer.send("late").await {
            Err(e) => break e,
            Ok(()) => assert!(started.elapsed() < Duration::from_secs(5), "sends go on"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(matches!(err, slotq::Error::QueueNotFound(_)), "{err}");
    let err = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("a consumer of a deleted queue does not wait forever")
        .unwrap();
    assert!(matches!(err, slotq::Error::QueueNotFound(_)), "{err}");
    assert!(matches!(
        member.recv_batch_timeout(10, Duration::from_secs(3)).await,
        Err(slotq::Error::QueueNotFound(_))
    ));
    // Nobody wrote to it after the delete.
    drop(member);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(leftovers(&c), (0, 15), "no key written after the delete");
    assert!(
        client.queue("doomed").must_exist().open().await.is_err(),
        "the registry is gone"
    );
}

/// Keys of every master: (anything but a delete's fence, fences). A fence is a string
/// `~deleted:<ms>` that expires within the hour.
fn leftovers(c: &TestCluster) -> (usize, usize) {
    let (mut other, mut fences) = (0, 0);
    for m in c.masters() {
        let node = c.node(m);
        for k in node
            .cmd::<Vec<String>>(redis::cmd("KEYS").arg("*"))
            .unwrap()
        {
            let kind: String = node.cmd(redis::cmd("TYPE").arg(&k)).unwrap();
            let fence = kind == "string"
                && node
                    .cmd::<String>(redis::cmd("GET").arg(&k))
                    .unwrap()
                    .starts_with(slotq::delete_fence::FENCE_MARK)
                && (1..=3_600_000).contains(&node.cmd::<i64>(redis::cmd("PTTL").arg(&k)).unwrap());
            if fence {
                fences += 1;
            } else {
                other += 1;
            }
        }
    }
    (other, fences)
}

/// A producer that stalls between its registry look and its push (here: one that looks
/// once an hour) used to store into a deleted queue's keys and succeed. The delete's fences
/// refuse it inside Redis, for plain and scheduled sends of both modes; a queue created
/// again lifts them, and the stalled producer's next send lands in the new queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_stalled_past_its_registry_looks_is_refused_by_the_delete_fences() {
    let c = TestCluster::start(3, 0).unwrap();
    for reliable in [false, true] {
        let name = if reliable { "fenced-r" } else { "fenced" };
        let stalled = |client: Client| async move {
            let mut b = client.queue(name).registry_poll(Duration::from_secs(3600));
            if reliable {
                b = b.reliable();
            }
            b.open().await.unwrap()
        };
        let a = stalled(client(&c.url()).await).await;
        let b = stalled(client(&c.url()).await).await;
        // Opened before the delete, used only after the queue is created again.
        let late = stalled(client(&c.url()).await).await;
        let pa = a.producer().build().unwrap();
        let pb = b.producer().build().unwrap();
        pa.send("before").await.unwrap();
        // Fences of the queue of the previous turn, deleted at its end.
        let base = leftovers(&c).1;
        let deleter = client(&c.url())
            .await
            .queue(name)
            .must_exist()
            .open()
            .await
            .unwrap();
        deleter.delete().await.unwrap();
        assert_eq!(
            leftovers(&c),
            (0, base + 15),
            "{name}: only the fences are left"
        );

        let err = pa.send("after").await.unwrap_err();
        assert!(matches!(err, Error::QueueNotFound(_)), "{name}: {err}");
        let err = pa.send_batch(["x", "y"]).await.unwrap_err();
        assert!(matches!(err, Error::QueueNotFound(_)), "{name}: {err}");
        let err = pb
            .send_after("later", Duration::from_secs(600))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::QueueNotFound(_)), "{name}: {err}");
        let err = pb.send_dedup("once", "deduped").await.unwrap_err();
        assert!(matches!(err, Error::QueueNotFound(_)), "{name}: {err}");
        assert_eq!(leftovers(&c), (0, base + 15), "{name}: nothing was stored");

        // Created again: its shards' fences are lifted at once.
        let fresh = {
            let mut q = client(&c.url()).await.queue(name);
            if reliable {
                q = q.reliable();
            }
            q.open().await.unwrap()
        };
        assert_eq!(
            leftovers(&c).1,
            base,
            "{name}: the new queue lifted the fences"
        );
        // Fences put back (as if the creator had died before lifting them): a producer of
        // an old handle that noticed nothing meets them, finds the queue there again,
        // lifts them and sends into the new queue.
        for s in &fresh.shards().shards {
            let _: () = fresh
                .cluster()
                .query(
                    s.slot,
                    redis::cmd("SET")
                        .arg(fresh.ready_key(&s.tag))
                        .arg(format!("{}0", slotq::delete_fence::FENCE_MARK))
                        .arg("PX")
                        .arg(60_000),
                )
                .await
                .unwrap();
        }
        let pc = late.producer().build().unwrap();
        pc.send("into the new queue").await.unwrap();
        let mut consumer = fresh.consumer().build().unwrap();
        let got = consumer
            .recv_batch_timeout(10, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.len(), 1, "{name}");
        assert_eq!(&got[0].payload[..], b"into the new queue");
        if reliable {
            consumer.ack_all(&got).await.unwrap();
        }
        drop(consumer);
        fresh.delete().await.unwrap();
        assert_eq!(leftovers(&c).0, 0, "{name}");
    }
}

/// A queue opened (and so created) again while a delete is under way: refused until the
/// delete ends, so the delete never removes what a new queue stored. After it, the queue
/// is created afresh and keeps what it is sent. A delete cut short leaves the queue gone
/// until a delete finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_cannot_be_recreated_into_keys_that_a_delete_is_removing() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let poll = Duration::from_millis(300);
    let q = client
        .queue("racing")
        .registry_poll(poll)
        .open()
        .await
        .unwrap();
    q.producer().build().unwrap().send("m0").await.unwrap();
    let deleting = {
        let q = q.clone();
        tokio::spawn(async move { q.delete().await })
    };
    // In the middle of the delete (it waits two polls before the shards' keys go).
    tokio::time::sleep(poll).await;
    let again = client.queue("racing").registry_poll(poll).open().await;
    assert!(
        matches!(again, Err(Error::QueueNotFound(_))),
        "a queue being deleted is not created again: {again:?}"
    );
    let report = deleting.await.unwrap().unwrap();
    assert_eq!(report.messages, 1);
    // Created afresh once the delete is over: what it is sent stays.
    let fresh = client
        .queue("racing")
        .registry_poll(poll)
        .open()
        .await
        .unwrap();
    let producer = fresh.producer().build().unwrap();
    producer.send_batch(["a", "b", "c"]).await.unwrap();
    tokio::time::sleep(poll * 3).await;
    let depth: u64 = fresh.stats().await.unwrap().iter().map(|s| s.depth).sum();
    assert_eq!(depth, 3, "the new queue's messages are kept");

    // A delete cut short (its tombstone left behind): the queue stays gone for everyone
    // until a delete finishes it.
    let meta = format!("slotq:{{{}}}:meta", fresh.name());
    let node = c.node(c.owner_of(key_slot(&meta)).unwrap());
    node.cmd::<i64>(redis::cmd("HDEL").arg(&meta).arg("version"))
        .unwrap();
    node.cmd::<i64>(redis::cmd("HSET").arg(&meta).arg("deleting").arg(1))
        .unwrap();
    let gone = client.queue("racing").open().await;
    assert!(matches!(gone, Err(Error::QueueNotFound(_))), "{gone:?}");
    let finishing = client
        .queue("racing")
        .to_finish_a_delete()
        .open()
        .await
        .unwrap();
    let report = finishing.delete().await.unwrap();
    assert_eq!(report.messages, 3);
    assert_eq!(
        leftovers(&c).0,
        0,
        "the finished delete leaves nothing but its fences"
    );
}
