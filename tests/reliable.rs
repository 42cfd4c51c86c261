//! At-least-once delivery against real clusters: leases, ack / nack / extend, redelivery
//! after consumer crashes (real processes killed with SIGKILL), dead letters, durability.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slotq::{Client, Error, Settled, redis};
use slotq_testkit::{ClusterBuilder, TestCluster};

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

fn consumer_process(url: &str, queue: &str, lease_ms: u64, mode: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_slotq-test-consumer"))
        .args([url, queue, &lease_ms.to_string()])
        .args(mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("consumer process starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_process_leases_come_back() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("crash").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    producer
        .send_batch((0..100).map(|i| format!("m{i}")))
        .await
        .unwrap();

    let mut holder = consumer_process(&c.url(), "crash", 1500, &["hold", "100"]);
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "LEASED 100");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let killed_at = Instant::now();

    let stats = q.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.in_flight.unwrap()).sum::<u64>(), 100);
    assert_eq!(stats.iter().map(|s| s.depth).sum::<u64>(), 0);

    let mut consumer = q.consumer().build().unwrap();
    let mut got = HashMap::new();
    while got.len() < 100 {
        let batch = consumer
            .recv_batch_timeout(100, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!batch.is_empty(), "redelivery after the lease");
        for m in &batch {
            assert_eq!(m.attempt, 2, "second delivery");
            got.insert(m.payload.clone(), m.id.unwrap());
        }
        consumer.ack_all(&batch).await.unwrap();
    }
    let after = killed_at.elapsed();
    eprintln!(
        "100 leased messages of a killed process redelivered {after:?} after the kill (lease 1.5 s)"
    );
    assert!(
        after >= Duration::from_millis(1000),
        "not before the lease expired: {after:?}"
    );
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.in_flight.unwrap()).sum::<u64>(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_messages_survive_random_consumer_kills() {
    const TOTAL: usize = 200_000;
    let c = TestCluster::start(3, 0).unwrap();
    let url = c.url();
    let client = client(&url).await;
    let q = client.queue("chaos").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    producer
        .send_batch((0..TOTAL).map(|i| format!("{i}")))
        .await
        .unwrap();

    let seen: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new(vec![0; TOTAL]));
    let spawn = |seen: Arc<Mutex<Vec<u32>>>| {
        // 3 ms of "work" per batch of 100 keeps the run long enough for the kills.
        let mut child = consumer_process(&url, "chaos", 1000, &["work", "3"]);
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(i) = line
                    .strip_prefix("DONE ")
                    .and_then(|s| s.parse::<usize>().ok())
                {
                    seen.lock().unwrap()[i] += 1;
                }
            }
        });
        child
    };
    let mut workers: Vec<Child> = (0..3).map(|_| spawn(seen.clone())).collect();
    let started = Instant::now();
    let mut kills = 0;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let deadline = started + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let done = seen.lock().unwrap().iter().filter(|&&n| n > 0).count();
        if done == TOTAL {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {TOTAL} processed after 120 s"
        );
        if kills < 10 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let victim = (rng % workers.len() as u64) as usize;
            workers[victim].kill().unwrap();
            workers[victim].wait().unwrap();
            workers[victim] = spawn(seen.clone());
            kills += 1;
        }
    }
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    // The last workers died holding leases: a final consumer takes those over once they
    // expire and acknowledges everything, so nothing stays in flight.
    let mut last = q.consumer().lease(Duration::from_secs(5)).build().unwrap();
    let drain_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = q.stats().await.unwrap();
        let open: u64 = stats.iter().map(|s| s.depth + s.in_flight.unwrap()).sum();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < drain_deadline,
            "{open} messages still open"
        );
        let batch = last
            .recv_batch_timeout(1000, Duration::from_millis(300))
            .await
            .unwrap();
        {
            let mut seen = seen.lock().unwrap();
            for m in &batch {
                let i: usize = String::from_utf8_lossy(&m.payload).parse().unwrap();
                seen[i] += 1;
            }
        }
        last.ack_all(&batch).await.unwrap();
    }
    let (missing, duplicates) = {
        let seen = seen.lock().unwrap();
        let missing = seen.iter().filter(|&&n| n == 0).count();
        let duplicates: u32 = seen.iter().map(|&n| n.saturating_sub(1)).sum();
        (missing, duplicates)
    };
    eprintln!(
        "{TOTAL} messages, {kills} consumer processes killed: missing {missing}, duplicate deliveries {duplicates}, took {:?}",
        started.elapsed()
    );
    assert_eq!(missing, 0, "every message processed at least once");
    // Every message was acknowledged: nothing ready, in flight, delayed or dead.
    let stats = q.stats().await.unwrap();
    let left: u64 = stats
        .iter()
        .map(|s| s.depth + s.in_flight.unwrap() + s.delayed.unwrap() + s.dead.unwrap())
        .sum();
    assert_eq!(left, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_delay_extend_dead_letters_and_replay() {
    let c = TestCluster::start(2, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("settle").max_attempts(2).open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let mut consumer = q
        .consumer()
        .lease(Duration::from_millis(800))
        .build()
        .unwrap();
    let quick = Duration::from_millis(50);

    // nack: delivered again at once, attempt 2, same id.
    producer.send("a").await.unwrap();
    let m = consumer.recv().await.unwrap();
    assert_eq!((m.attempt, &m.payload[..]), (1, b"a".as_slice()));
    let id = m.id.unwrap();
    assert_eq!(m.nack(None).await.unwrap(), Settled::Done);
    assert_eq!(
        m.nack(None).await.unwrap(),
        Settled::LeaseGone,
        "settled twice"
    );
    let m2 = consumer.recv().await.unwrap();
    assert_eq!((m2.attempt, m2.id.unwrap()), (2, id));

    // After max_attempts (2) deliveries a nack dead-letters it.
    assert_eq!(m2.nack(None).await.unwrap(), Settled::Done);
    assert!(
        consumer
            .recv_batch_timeout(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].id, dead[0].deliveries, dead[0].payload.as_slice()),
        (id, 2, b"a".as_slice())
    );
    assert_eq!(
        dead[0].reason,
        slotq::DeadReason::Failed,
        "nacked on its last attempt"
    );
    assert!(dead[0].died_ms.is_some());
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.dead.unwrap()).sum::<u64>(), 1);
    // Zero asked, zero listed (not every dead letter).
    assert!(q.dead_letters(0).await.unwrap().is_empty());

    // Replay: back in the ready list, delivery count reset.
    assert_eq!(q.replay_dead(100).await.unwrap(), 1);
    let m3 = consumer.recv().await.unwrap();
    assert_eq!((m3.attempt, m3.id.unwrap()), (1, id));
    assert_eq!(m3.ack().await.unwrap(), Settled::Done);
    assert!(q.dead_letters(10).await.unwrap().is_empty());

    // Delayed nack: invisible for the delay, then delivered.
    producer.send("b").await.unwrap();
    let m = consumer.recv().await.unwrap();
    m.nack(Some(Duration::from_millis(700))).await.unwrap();
    let t0 = Instant::now();
    assert!(
        consumer
            .recv_batch_timeout(10, Duration::from_millis(400))
            .await
            .unwrap()
            .is_empty()
    );
    let again = consumer
        .recv_batch_timeout(10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(650),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(again[0].attempt, 2);
    again[0].ack().await.unwrap();

    // Extension: a lease extended past its deadline is not redelivered.
    producer.send("c").await.unwrap();
    let m = consumer.recv().await.unwrap();
    let new_deadline = m.extend(Duration::from_secs(5)).await.unwrap();
    assert!(new_deadline.is_some());
    let mut other = q.consumer().build().unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        other
            .recv_batch_timeout(10, quick)
            .await
            .unwrap()
            .is_empty(),
        "still leased"
    );
    assert_eq!(m.ack().await.unwrap(), Settled::Done);

    // An expired lease: ack says so, the message comes back.
    producer.send("d").await.unwrap();
    let m = consumer.recv().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let back = other
        .recv_batch_timeout(10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(back.len(), 1, "redelivered after expiry");
    assert_eq!(m.ack().await.unwrap(), Settled::LeaseGone);
    assert_eq!(m.extend(Duration::from_secs(1)).await.unwrap(), None);
    assert_eq!(back[0].ack().await.unwrap(), Settled::Done);

    assert_eq!(q.purge_dead().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_messages_have_nothing_to_settle() {
    let c = TestCluster::start(2, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("plain").open().await.unwrap();
    q.producer().build().unwrap().send("x").await.unwrap();
    let m = q.consumer().build().unwrap().recv().await.unwrap();
    assert!(m.id.is_none());
    assert!(matches!(m.ack().await, Err(Error::NotReliable(_))));
    assert!(matches!(
        q.dead_letters(1).await,
        Err(Error::NotReliable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_sends_wait_for_replicas_or_fail_typed() {
    let c = ClusterBuilder::new()
        .masters(3)
        .replicas(1)
        .start()
        .unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("durable").reliable().open().await.unwrap();
    let producer = q
        .producer()
        .durability(1, Duration::from_millis(500))
        .build()
        .unwrap();
    for i in 0..100 {
        producer.send(format!("d{i}")).await.unwrap();
    }
    // The replicas hold what was acknowledged: the shard's list, all 100 messages.
    let stats = q.stats().await.unwrap();
    let shard = stats.iter().find(|s| s.depth > 0).unwrap();
    assert_eq!(shard.depth, 100);
    let master = c.owner_of(shard.slot).unwrap();
    let replica = c.replicas_of(master)[0];
    let mut conn = c.node(replica).conn().unwrap();
    let _: () = redis::cmd("READONLY").query(&mut conn).unwrap();
    let on_replica: i64 = redis::cmd("LLEN")
        .arg(q.ready_key(&shard.tag))
        .query(&mut conn)
        .unwrap();
    // Each send is a frame behind its head: two list elements.
    assert_eq!(on_replica, 200, "acknowledged sends are on the replica");
    let replicas: Vec<usize> = (3..6).collect();
    for &r in &replicas {
        c.pause(r).unwrap();
    }
    let t0 = Instant::now();
    let err = producer.send("unreplicated").await.unwrap_err();
    let took = t0.elapsed();
    for &r in &replicas {
        c.resume(r).unwrap();
    }
    eprintln!("with replicas stopped: {err} after {took:?}");
    assert!(
        matches!(
            err,
            Error::NotReplicated {
                wanted: 1,
                acked: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.may_have_run());
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reliable_consumer_blocks_and_wakes() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("idle").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let mut consumer = q
        .consumer()
        .block_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let commands = || slotq_tests::total_commands(&c);
    let waiting = tokio::spawn(async move {
        let m = consumer.recv().await.unwrap();
        m.ack().await.unwrap();
        (m, Instant::now())
    });
    // Let it connect and block, then count every command the cluster sees in 3 s (the
    // count itself included: one INFO per node, plus the registry's version checks).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = commands();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = commands() - before;
    eprintln!("reliable consumer idle for 3 s (block timeout 5 s): {idle} commands in all");
    // Plus the group membership: one heartbeat script a second, five commands; and the
    // promoter's read of each shard's earliest scheduled and delayed message every 2 s
    // (two ZRANGEs a shard, at most two polls in the window).
    assert!(
        idle <= 12 + 3 * 5 + 3 * 2 * 2,
        "idle consumer polls: {idle} commands"
    );
    let sent = Instant::now();
    producer.send("wake").await.unwrap();
    let (m, at) = waiting.await.unwrap();
    let wake = at.duration_since(sent);
    eprintln!("reliable consumer woke {wake:?} after the send");
    assert_eq!(m.payload, &b"wake"[..]);
    assert!(
        wake < Duration::from_secs(1),
        "woken by data, not a timeout: {wake:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_count_left_wrong_by_a_partial_push_heals_when_the_shard_empties() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("drift").reliable().open().await.unwrap();
    q.producer().build().unwrap().send("m").await.unwrap();
    // As if a push's count update ran without its RPUSH (they are separate commands).
    let stats = q.stats().await.unwrap();
    let s = stats.iter().find(|s| s.depth == 1).unwrap();
    let count_key = shard_key(&q, &s.tag, "count");
    let owner = c.owner_of(s.slot).unwrap();
    c.node(owner)
        .cmd::<()>(redis::cmd("INCRBY").arg(&count_key).arg(1000))
        .unwrap();
    assert_eq!(
        q.stats()
            .await
            .unwrap()
            .iter()
            .map(|s| s.depth)
            .sum::<u64>(),
        1001
    );
    let mut consumer = q.consumer().build().unwrap();
    let m = consumer.recv().await.unwrap();
    m.ack().await.unwrap();
    assert_eq!(
        q.stats()
            .await
            .unwrap()
            .iter()
            .map(|s| s.depth)
            .sum::<u64>(),
        0
    );
}

/// Leases take part of a frame (a producer batch) when the whole would be more than twice
/// what was asked, by walking the envelopes' headers: every header size (envelopes of
/// 29 bytes to 70 kB) and every batch size must come through intact, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_split_frames_of_every_shape_without_loss_or_reorder() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("split").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let sizes = [1usize, 3, 100, 300, 70_000];
    let mut sent = Vec::new();
    for (b, n) in [1000usize, 7, 300, 1, 999, 16, 15].into_iter().enumerate() {
        let batch: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                // The large size only in the small batches (a frame stays a few MB).
                let len = sizes[i % if n <= 16 { 5 } else { 4 }];
                let mut p = format!("{b}:{i}:").into_bytes();
                p.resize(len.max(p.len()), b'x');
                p
            })
            .collect();
        sent.extend(batch.iter().cloned());
        producer.send_batch(batch).await.unwrap();
    }

    let mut consumer = q.consumer().pop_batch(5).build().unwrap();
    let first = consumer
        .recv_batch_timeout(5, Duration::from_secs(10))
        .await
        .unwrap();
    let leased: u64 = q
        .stats()
        .await
        .unwrap()
        .iter()
        .map(|s| s.in_flight.unwrap())
        .sum();
    // The first round asks each of three shards for at most 5 (8 before sizes are known):
    // a lease holds at most twice that.
    assert!(
        !first.is_empty() && leased <= 3 * 16,
        "first round leased {leased}"
    );
    consumer.ack_all(&first).await.unwrap();
    let mut got: Vec<slotq::Message> = first;
    while got.len() < sent.len() {
        let batch = consumer
            .recv_batch_timeout(50, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!batch.is_empty(), "{} of {} arrived", got.len(), sent.len());
        consumer.ack_all(&batch).await.unwrap();
        got.extend(batch);
    }
    assert!(got.iter().all(|m| m.attempt == 1), "no redelivery");
    let mut by_shard: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for m in &got {
        by_shard
            .entry(m.shard.to_string())
            .or_default()
            .push(m.payload.to_vec());
    }
    let mut all: Vec<Vec<u8>> = got.iter().map(|m| m.payload.to_vec()).collect();
    all.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(all, want, "every message once, intact");
    // Within a shard, batches and their messages come in the order they were sent.
    let pos: HashMap<&Vec<u8>, usize> = sent.iter().enumerate().map(|(i, p)| (p, i)).collect();
    for (shard, list) in &by_shard {
        let order: Vec<usize> = list.iter().map(|p| pos[p]).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "order in {shard}");
    }
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.in_flight.unwrap()).sum::<u64>(), 0);
    assert_eq!(stats.iter().map(|s| s.depth).sum::<u64>(), 0);
}

/// A ready list may hold frames written without a head (by an older version), elements no
/// slotq producer wrote, and leases stored in the inflight hash: frames are served in their
/// place (a large one cut in pieces), foreign elements are parked with the dead letters,
/// and an expired lease stored in place comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_without_heads_foreign_elements_and_leases_stored_in_place_are_served() {
    use slotq::lease::{MessageId, encode_envelope, encode_frame};
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("older").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let payloads = |from: usize, n: usize| (from..from + n).map(|i| format!("m{i:05}"));
    producer
        .send_keyed_batch(payloads(0, 100).map(|p| ("k", p)))
        .await
        .unwrap();
    let (owner, tag) = shard_holding(&c, &q, 100).await;
    let key = |kind: &str| shard_key(&q, &tag, kind);
    let frame_of = |ps: Vec<String>| {
        let envs: Vec<Vec<u8>> = ps
            .iter()
            .map(|p| encode_envelope(MessageId(rand_id()), p.as_bytes()))
            .collect();
        encode_frame(&envs)
    };
    let node = c.node(owner);
    let run = |cmd: &mut redis::Cmd| node.cmd::<redis::Value>(cmd).unwrap();
    run(redis::cmd("RPUSH")
        .arg(key("ready"))
        .arg(frame_of(payloads(100, 50).collect()))
        .arg("not a frame")
        .arg(frame_of(payloads(150, 2000).collect())));
    run(redis::cmd("INCRBY").arg(key("count")).arg(2050));
    producer
        .send_keyed_batch(payloads(2150, 100).map(|p| ("k", p)))
        .await
        .unwrap();
    // A lease an older version stored in place, expired long ago: 3 messages, none settled.
    run(redis::cmd("HSET")
        .arg(key("inflight"))
        .arg("old-lease")
        .arg(frame_of(payloads(2250, 3).collect())));
    run(redis::cmd("HSET")
        .arg(key("acks"))
        .arg("old-lease")
        .arg(&[0u8, 3, 0, 0, 0][..]));
    run(redis::cmd("ZADD")
        .arg(key("leases"))
        .arg(1)
        .arg("old-lease"));

    let mut consumer = q.consumer().pop_batch(100).build().unwrap();
    let mut got: Vec<slotq::Message> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 2253 && Instant::now() < deadline {
        let batch = consumer
            .recv_batch_timeout(100, Duration::from_millis(500))
            .await
            .unwrap();
        consumer.ack_all(&batch).await.unwrap();
        got.extend(batch);
    }
    let seen: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(seen.len(), 2253, "every message once");
    // The reaped lease comes first (back to the head of the list), then the list in order.
    let (reaped, rest): (Vec<_>, Vec<_>) = got.iter().partition(|m| m.attempt == 2);
    assert_eq!(reaped.len(), 3, "the lease stored in place came back");
    let rest: Vec<String> = rest
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(rest, payloads(0, 2250).collect::<Vec<_>>(), "in order");
    let dead = q.dead_letters(100).await.unwrap();
    assert!(
        dead.iter()
            .any(|d| d.payload == b"not a frame" && d.reason == slotq::DeadReason::Unreadable),
        "parked, saying why: {dead:?}"
    );
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.depth).sum::<u64>(), 0);
    assert_eq!(stats.iter().map(|s| s.in_flight.unwrap()).sum::<u64>(), 0);
}

/// The shard holding `depth` messages (a keyed batch's): its master's index and its tag.
async fn shard_holding(c: &TestCluster, q: &slotq::Queue, depth: u64) -> (usize, String) {
    let stats = q.stats().await.unwrap();
    let s = stats.iter().find(|s| s.depth == depth).unwrap();
    (c.owner_of(s.slot).unwrap(), s.tag.clone())
}

/// The name of one of a shard's keys (`ready`, `count`, `dead`, ...).
fn shard_key(q: &slotq::Queue, tag: &str, kind: &str) -> String {
    q.ready_key(tag).replace(":ready", &format!(":{kind}"))
}

fn rand_id() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    id
}

/// A frame that cannot be read, behind a valid head, is leased unread with the frames
/// around it: the lease fails to decode on the consumer, expires, and the reaper returns
/// the good messages and parks the bad frame with the dead letters. The shard never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_frame_goes_to_the_dead_letters_and_never_stops_the_shard() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("corrupt").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let payloads = |from: usize, n: usize| (from..from + n).map(|i| format!("m{i:03}"));
    producer
        .send_keyed_batch(payloads(0, 50).map(|p| ("k", p)))
        .await
        .unwrap();
    let (owner, tag) = shard_holding(&c, &q, 50).await;
    let node = c.node(owner);
    let key = |kind: &str| shard_key(&q, &tag, kind);
    // Five messages announced, then bytes that are no msgpack (0xc1 is never used).
    let bad: Vec<u8> = [0xA5, 0x02, 0, 5, 0xdc, 0, 5, 0xc1, 0xc1, 0xc1].to_vec();
    let _: redis::Value = node
        .cmd(
            redis::cmd("RPUSH")
                .arg(key("ready"))
                .arg(slotq::lease::frame_head(&bad))
                .arg(&bad),
        )
        .unwrap();
    producer
        .send_keyed_batch(payloads(50, 50).map(|p| ("k", p)))
        .await
        .unwrap();

    let mut consumer = q
        .consumer()
        .pop_batch(100)
        .lease(Duration::from_millis(500))
        .build()
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut errors = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.len() < 100 && Instant::now() < deadline {
        match consumer
            .recv_batch_timeout(100, Duration::from_millis(300))
            .await
        {
            Ok(batch) => {
                consumer.ack_all(&batch).await.unwrap();
                seen.extend(batch.into_iter().map(|m| m.payload.to_vec()));
            }
            Err(e) => {
                assert!(matches!(e, Error::Protocol(_)), "{e:?}");
                errors += 1;
            }
        }
    }
    eprintln!("{} of 100 received; {errors} receive errors", seen.len());
    assert_eq!(seen.len(), 100, "every good message arrives");
    let dead = q.dead_letters(100).await.unwrap();
    assert!(
        dead.iter()
            .any(|d| d.payload == bad && d.reason == slotq::DeadReason::Unreadable),
        "the bad frame is parked, saying why: {dead:?}"
    );
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.in_flight.unwrap()).sum::<u64>(), 0);
}

/// A lease that takes everything a shard holds renames the ready list into its own (no
/// copy): the ready list is gone, the lease's list holds the frames with their heads, a
/// later push starts a new ready list, and a release puts the leased messages back in
/// front of it, in their order, without counting a delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_a_whole_shard_renames_its_list_and_a_release_puts_it_back_first() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("whole").reliable().open().await.unwrap();
    let producer = q.producer().build().unwrap();
    let payloads = |from: usize, n: usize| (from..from + n).map(|i| format!("m{i:03}"));
    // A first message, so that the consumer knows the payload size and asks for 100 (not
    // a first few, which would cut the frame). Without prefetch: the later push must stay
    // in the shard while the consumer holds its lease (with prefetch, its waiter would
    // lease what arrives while it works).
    let mut consumer = q.consumer().pop_batch(100).prefetch(false).build().unwrap();
    producer.send_keyed("k", "first").await.unwrap();
    let m = consumer.recv().await.unwrap();
    m.ack().await.unwrap();
    for (from, n) in [(0, 30), (30, 20)] {
        producer
            .send_keyed_batch(payloads(from, n).map(|p| ("k", p)))
            .await
            .unwrap();
    }
    let (owner, tag) = shard_holding(&c, &q, 50).await;
    let node = c.node(owner);
    let key = |kind: &str| shard_key(&q, &tag, kind);
    let len = |k: &str| -> i64 { node.cmd(redis::cmd("LLEN").arg(k)).unwrap() };
    assert_eq!(len(&key("ready")), 4, "two frames, each behind its head");
    let _: () = node.cmd(redis::cmd("CONFIG").arg("RESETSTAT")).unwrap();

    let mut got = Vec::new();
    while got.len() < 50 {
        got.extend(
            consumer
                .recv_batch_timeout(100, Duration::from_secs(2))
                .await
                .unwrap(),
        );
    }
    let (_, lease) = got[0].lease_id().unwrap();
    assert!(
        got.iter().all(|m| m.lease_id().unwrap().1 == lease),
        "one lease"
    );
    let exists: i64 = node.cmd(redis::cmd("EXISTS").arg(key("ready"))).unwrap();
    assert_eq!(exists, 0, "the ready list became the lease's");
    let commands: String = node.cmd(redis::cmd("INFO").arg("commandstats")).unwrap();
    assert!(commands.contains("cmdstat_rename:calls=1,"), "{commands}");
    assert!(
        !commands.contains("cmdstat_sort:"),
        "nothing copied: {commands}"
    );
    assert_eq!(len(&key(&format!("lease:{lease}"))), 4);

    producer
        .send_keyed_batch(payloads(50, 10).map(|p| ("k", p)))
        .await
        .unwrap();
    assert_eq!(len(&key("ready")), 2, "a new ready list");
    assert_eq!(consumer.release_all(&got).await.unwrap().settled, 50);
    assert_eq!(
        len(&key(&format!("lease:{lease}"))),
        0,
        "the lease's list is gone"
    );

    let mut again = Vec::new();
    while again.len() < 60 {
        let batch = consumer
            .recv_batch_timeout(100, Duration::from_secs(2))
            .await
            .unwrap();
        consumer.ack_all(&batch).await.unwrap();
        again.extend(batch);
    }
    let order: Vec<Vec<u8>> = again.iter().map(|m| m.payload.to_vec()).collect();
    let expected: Vec<Vec<u8>> = payloads(0, 60).map(String::into_bytes).collect();
    assert_eq!(
        order, expected,
        "released first, in order, then the later push"
    );
    assert!(
        again.iter().all(|m| m.attempt == 1),
        "a release counts no delivery"
    );
}
