//! Ordered groups under pauses, crashes and slow work: ownership is fenced by the server.
//!
//! Each grant of a shard to a member carries an epoch that only grows; the shard keeps the
//! highest epoch presented to it, and a pop with an older one is refused (`FENCED`). The
//! tests try to break per-key order the ways it breaks in practice: a member paused
//! (SIGSTOP) past its membership and continued, a lease extended past its first deadline,
//! a member with a long lease killed -9, a member that leaves cleanly. The checker is the
//! same everywhere: per key, the order in which messages were first processed.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slotq::{Client, Queue, redis};
use slotq_testkit::TestCluster;
use slotq_tests::history::{Done, check, collect, group_member, history};

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

/// A member process of ordered group "g" (see `slotq_tests::history::group_member`).
fn member(url: &str, queue: &str, lease_ms: u64, pause_ms: u64) -> Child {
    group_member(
        env!("CARGO_BIN_EXE_slotq-test-consumer"),
        url,
        queue,
        lease_ms,
        pause_ms,
        "g",
        true,
    )
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Sends `per_key` messages `k<k>:<seq>` for each of `keys` keys, in sequence order.
async fn send_sequences(q: &Queue, keys: usize, per_key: usize) {
    let producer = q.producer().build().unwrap();
    for seq in 0..per_key {
        let sends = (0..keys).map(|k| producer.send_keyed(format!("k{k}"), format!("k{k}:{seq}")));
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
    }
}

async fn wait_distinct(done: &Done, total: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while check(done).distinct < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stop_all(members: &mut [Child]) {
    for m in members {
        let _ = Command::new("kill")
            .args(["-CONT", &m.id().to_string()])
            .status();
        let _ = m.kill();
        let _ = m.wait();
    }
}

/// A 3-master cluster, an at-least-once queue of 6 shards holding `per_key` numbered
/// messages for each of `keys` keys, and two ordered member processes (leases as given,
/// up to `pause_ms` of work a message) working on it for 1.2 s already.
async fn working_members(
    queue: &str,
    keys: usize,
    per_key: usize,
    leases: [u64; 2],
    pause_ms: u64,
) -> (TestCluster, Done, Vec<Child>) {
    let c = TestCluster::start(3, 0).unwrap();
    let url = c.url();
    let q = client(&url)
        .await
        .queue(queue)
        .shards_per_master(2)
        .reliable()
        .open()
        .await
        .unwrap();
    send_sequences(&q, keys, per_key).await;
    let done = history();
    let mut members: Vec<Child> = leases
        .iter()
        .map(|&l| member(&url, queue, l, pause_ms))
        .collect();
    for (i, m) in members.iter_mut().enumerate() {
        collect(m, i, &done);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    (c, done, members)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_member_hands_out_nothing_once_its_shards_moved() {
    const KEYS: usize = 6;
    const PER_KEY: usize = 120;
    // 20 ms of work per message on average: about 7 s of work for the two. The member to
    // be paused holds 30 s leases, so what it buffered is still fresh when it continues;
    // the other holds 1 s leases.
    let (_c, done, mut members) =
        working_members("zombie", KEYS, PER_KEY, [30_000, 1_000], 40).await;
    // Paused past its membership (3 s) while it holds messages, then continued.
    signal(&members[0], "-STOP");
    let paused_at = check(&done).distinct;
    tokio::time::sleep(Duration::from_secs(7)).await;
    signal(&members[0], "-CONT");
    wait_distinct(&done, KEYS * PER_KEY, Duration::from_secs(60)).await;
    // The paused member's batch in hand finishes after it continued: those are second
    // processings; nothing it takes after that may be first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_all(&mut members);
    let r = check(&done);
    eprintln!(
        "member paused 7 s after {paused_at} of {} processed: {} processings, {} order violations",
        KEYS * PER_KEY,
        r.processings,
        r.violations.len()
    );
    assert!(paused_at < KEYS * PER_KEY / 2, "the pause came mid-work");
    assert_eq!(r.distinct, KEYS * PER_KEY, "every message processed");
    assert!(
        r.violations.is_empty(),
        "{:?}",
        &r.violations[..r.violations.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_s_leases_come_back_before_newer_messages_at_once() {
    const KEYS: usize = 6;
    const PER_KEY: usize = 100;
    // A member with a 15 s lease and one with a 1 s lease.
    let (_c, done, mut members) =
        working_members("longlease", KEYS, PER_KEY, [15_000, 1_000], 30).await;
    members[0].kill().unwrap();
    members[0].wait().unwrap();
    let killed = Instant::now();
    let at_kill = check(&done).distinct;
    wait_distinct(&done, KEYS * PER_KEY, Duration::from_secs(60)).await;
    let took = killed.elapsed();
    stop_all(&mut members);
    let r = check(&done);
    eprintln!(
        "member with a 15 s lease killed after {at_kill} processed: the rest took {took:?}, {} processings, {} order violations",
        r.processings,
        r.violations.len()
    );
    assert_eq!(r.distinct, KEYS * PER_KEY, "every message processed");
    assert!(
        r.violations.is_empty(),
        "{:?}",
        &r.violations[..r.violations.len().min(10)]
    );
}

/// A key that keyed sends put on the first shard.
fn key_of_some_shard(q: &Queue) -> String {
    let set = q.shards();
    slotq_tests::key_for_shard(&set, set.shards[0].number)
}

/// A key of the highest-numbered shard: the one a member that owns every shard hands to
/// the second member to join (surplus goes highest first).
fn key_of_last_shard(q: &Queue) -> (String, String) {
    let set = q.shards();
    let last = set.shards.iter().max_by_key(|s| s.number).unwrap();
    (
        slotq_tests::key_for_shard(&set, last.number),
        last.tag.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_lease_holds_its_shard_until_the_ack() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("extend")
        .shards_per_master(1)
        .reliable()
        .open()
        .await
        .unwrap();
    let (key, tag) = key_of_last_shard(&q);
    let producer = q.producer().build().unwrap();
    producer.send_keyed(&key, "m1").await.unwrap();
    let lease = Duration::from_secs(2);
    let mut a = q
        .consumer()
        .group("g")
        .ordered()
        .lease(lease)
        .build()
        .unwrap();
    let m1 = a.recv().await.unwrap();
    assert_eq!(&m1.payload[..], b"m1");
    producer.send_keyed(&key, "m2").await.unwrap();
    // A works on m1 for 7 s (three and a half leases), extending it every 0.5 s.
    let acked = Arc::new(Mutex::new(None::<Instant>));
    let work = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(7) {
                assert!(m1.extend(lease).await.unwrap().is_some(), "extended");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            m1.ack().await.unwrap();
            *acked.lock().unwrap() = Some(Instant::now());
        })
    };
    // B joins, and is to be handed m1's shard.
    let b_task = {
        let q = q.clone();
        tokio::spawn(async move {
            let mut b = q
                .consumer()
                .group("g")
                .ordered()
                .lease(lease)
                .build()
                .unwrap();
            let mut got = Vec::new();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(11) {
                for m in b
                    .recv_batch_timeout(10, Duration::from_millis(200))
                    .await
                    .unwrap()
                {
                    got.push((
                        Instant::now(),
                        String::from_utf8_lossy(&m.payload).into_owned(),
                    ));
                    m.ack().await.unwrap();
                }
            }
            b.close().await;
            got
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = q.group_status("g").await.unwrap();
        if st.shards.iter().any(|s| s.tag == tag && s.next.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "no handover planned: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A keeps receiving (nothing), so it takes part in the handover.
    let polling_a = tokio::spawn(async move {
        let start = Instant::now();
        let mut got = Vec::new();
        while start.elapsed() < Duration::from_secs(10) {
            for m in a
                .recv_batch_timeout(10, Duration::from_millis(200))
                .await
                .unwrap()
            {
                got.push((
                    Instant::now(),
                    String::from_utf8_lossy(&m.payload).into_owned(),
                ));
                m.ack().await.unwrap();
            }
        }
        a.close().await;
        got
    });
    let b_got = b_task.await.unwrap();
    work.await.unwrap();
    let a_got = polling_a.await.unwrap();
    let acked = acked.lock().unwrap().expect("m1 acked");
    let m2 = a_got
        .iter()
        .chain(&b_got)
        .find(|(_, p)| p == "m2")
        .map(|(t, _)| *t)
        .expect("m2 handed out");
    eprintln!(
        "m1 extended for 7 s: m2 handed out {:?} after m1's ack",
        m2.saturating_duration_since(acked)
    );
    assert!(
        m2 >= acked,
        "m2 handed out {:?} before m1 was acked",
        acked - m2
    );
    assert!(
        !b_got.iter().any(|(t, p)| p == "m1" && *t < acked),
        "m1 handed to B while A still held it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_leaves_cleanly_frees_its_shards_at_once() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("leave")
        .shards_per_master(2)
        .reliable()
        .open()
        .await
        .unwrap();
    let lease = Duration::from_secs(10);
    let consumer = || {
        q.consumer()
            .group("g")
            .ordered()
            .lease(lease)
            .build()
            .unwrap()
    };
    let (mut a, mut b) = (consumer(), consumer());
    // Both join and settle on three shards each, holding nothing.
    let (ra, rb) = tokio::join!(
        a.recv_batch_timeout(10, Duration::from_millis(300)),
        b.recv_batch_timeout(10, Duration::from_millis(300))
    );
    assert!(ra.unwrap().is_empty() && rb.unwrap().is_empty());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = q.group_status("g").await.unwrap();
        if st.members.len() == 2 && st.members.iter().all(|m| m.shards.len() == 3) {
            break;
        }
        assert!(Instant::now() < deadline, "not settled: {st:?}");
        let _ = a.recv_batch_timeout(10, Duration::from_millis(50)).await;
        let _ = b.recv_batch_timeout(10, Duration::from_millis(50)).await;
    }
    // A leaves; a message for every shard follows.
    a.close().await;
    let set = q.shards();
    let producer = q.producer().build().unwrap();
    for s in &set.shards {
        let key = slotq_tests::key_for_shard(&set, s.number);
        producer
            .send_keyed(&key, format!("for {}", s.tag))
            .await
            .unwrap();
    }
    let start = Instant::now();
    let mut got = 0;
    while got < set.shards.len() && start.elapsed() < Duration::from_secs(8) {
        let batch = b
            .recv_batch_timeout(10, Duration::from_millis(200))
            .await
            .unwrap();
        got += batch.len();
        b.ack_all(&batch).await.unwrap();
    }
    let took = start.elapsed();
    eprintln!(
        "after a clean leave with nothing held, the other member had every shard's message in {took:?} (lease 10 s)"
    );
    assert_eq!(
        got,
        set.shards.len(),
        "the remaining member gets every shard's message"
    );
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} (the lease is 10 s)"
    );
    b.close().await;
}

/// The lease script of at-least-once shards, as the library sends it.
/// Writes into group "g" a member "zz" that lives for ever and holds shard `tag` under
/// `epoch`, as the group script would after this test's member lapsed.
fn grant_to_another_member(c: &TestCluster, q: &Queue, tag: &str, epoch: u64) {
    let number = tag.rsplit_once('#').unwrap().1;
    let meta = format!("slotq:{{{}}}:group:g", q.name());
    c.node(c.owner_of(slotq::slot::key_slot(&meta)).unwrap())
        .cmd::<i64>(
            redis::cmd("HSET")
                .arg(&meta)
                .arg("m:zz")
                .arg(i64::MAX / 2)
                .arg(format!("o:{number}"))
                .arg("zz")
                .arg(format!("e:{number}"))
                .arg(epoch),
        )
        .unwrap();
}

fn lease_with(
    c: &TestCluster,
    tag: &str,
    id: &str,
    epoch: u64,
) -> redis::RedisResult<Vec<redis::Value>> {
    slotq_tests::scripts::lease_pop(c, tag, id, 100, Some(("g", epoch)))
}

/// The fence itself, script by script: a pop presenting an older grant than the shard's
/// fence is refused; a newer grant claims the shard and returns every lease in it, oldest
/// first, before anything newer; the old holder then takes nothing and settles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shard_s_fence_refuses_an_older_grant_and_a_claim_returns_the_leases() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("fence")
        .shards_per_master(1)
        .reliable()
        .open()
        .await
        .unwrap();
    let key = key_of_some_shard(&q);
    let producer = q.producer().build().unwrap();
    for i in 0..5 {
        producer.send_keyed(&key, format!("m{i}")).await.unwrap();
    }
    // Member A: granted the shard, holds m0..m4.
    let mut a = q.consumer().group("g").ordered().build().unwrap();
    let mut held = Vec::new();
    while held.len() < 5 {
        held.extend(a.recv_batch(10).await.unwrap());
    }
    let tag = held[0].shard.to_string();
    let number = tag.rsplit_once('#').unwrap().1.to_string();
    let meta = format!("slotq:{{{}}}:group:g", q.name());
    let group: HashMap<String, String> = c
        .node(c.owner_of(slotq::slot::key_slot(&meta)).unwrap())
        .cmd(redis::cmd("HGETALL").arg(&meta))
        .unwrap();
    let epoch: u64 = group[&format!("e:{number}")].parse().unwrap();
    let acks = format!("slotq:{{{tag}}}:acks");
    let fence: String = c
        .node(c.owner_of(slotq::slot::key_slot(&acks)).unwrap())
        .cmd(redis::cmd("HGET").arg(&acks).arg("~f:g"))
        .unwrap();
    assert_eq!(
        fence,
        epoch.to_string(),
        "A's pop set the fence to its grant"
    );
    // An older grant is refused by the server.
    let refused = lease_with(&c, &tag, &"0".repeat(32), epoch - 1).unwrap_err();
    assert_eq!(refused.code(), Some("FENCED"), "{refused:?}");
    // A newer grant (the group makes one when A's membership lapses) claims the shard:
    // A's lease comes back at once, ahead of m5.
    producer.send_keyed(&key, "m5").await.unwrap();
    let claimed = lease_with(&c, &tag, &"b".repeat(32), epoch + 1).unwrap();
    let int = |v: &redis::Value| match v {
        redis::Value::Int(n) => *n,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        int(&claimed[2]),
        5,
        "the claim returned A's five leased messages"
    );
    assert_eq!(
        int(&claimed[3]),
        6,
        "and the new lease took them with m5: {claimed:?}"
    );
    // The group agrees (another member, "zz", holds that newer grant): A's next pop is
    // refused by the fence, its next heartbeat shows the shard gone, and A hands out
    // nothing more of it; its acks find the lease gone.
    grant_to_another_member(&c, &q, &tag, epoch + 1);
    producer.send_keyed(&key, "m6").await.unwrap();
    let more = a
        .recv_batch_timeout(10, Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(more.is_empty(), "a fenced member takes nothing: {more:?}");
    let report = a.ack_all(&held).await.unwrap();
    assert_eq!(
        report.settled, 0,
        "A's lease went back with the claim: {report:?}"
    );
    drop(a);
}

/// At-most-once queues: an ordered member pops behind the shard's fence too
/// (`fenced_pop.lua`), and a newer grant claims the shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_at_most_once_shard_s_fence_refuses_an_older_grant() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("fence-plain")
        .shards_per_master(1)
        .open()
        .await
        .unwrap();
    let key = key_of_some_shard(&q);
    let producer = q.producer().build().unwrap();
    for i in 0..3 {
        producer.send_keyed(&key, format!("m{i}")).await.unwrap();
    }
    let mut a = q.consumer().group("g").ordered().build().unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(a.recv_batch(10).await.unwrap());
    }
    let tag = got[0].shard.to_string();
    let fence_key = format!("slotq:{{{tag}}}:fence");
    let node = c.node(c.owner_of(slotq::slot::key_slot(&fence_key)).unwrap());
    let epoch: u64 = node
        .cmd::<String>(redis::cmd("HGET").arg(&fence_key).arg("g"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(epoch > 0, "the member's pops set the fence to its grant");
    producer.send_keyed(&key, "m3").await.unwrap();
    let pop = |epoch: u64| -> redis::RedisResult<Option<Vec<String>>> {
        let mut conn = node.client().unwrap().get_connection().unwrap();
        redis::cmd("EVAL")
            .arg(include_str!("../crates/slotq/src/lua/fenced_pop.lua"))
            .arg(2)
            .arg(format!("slotq:{{{tag}}}:ready"))
            .arg(&fence_key)
            .arg(10)
            .arg("g")
            .arg(epoch)
            .query(&mut conn)
    };
    let refused = pop(epoch - 1).unwrap_err();
    assert_eq!(refused.code(), Some("FENCED"), "{refused:?}");
    assert_eq!(
        pop(epoch + 1).unwrap(),
        Some(vec!["m3".to_string()]),
        "a newer grant pops"
    );
    // The group agrees ("zz" holds that newer grant): A presents the grant it holds, now
    // older than the fence, and takes nothing of the shard.
    grant_to_another_member(&c, &q, &tag, epoch + 1);
    producer.send_keyed(&key, "m4").await.unwrap();
    let more = a
        .recv_batch_timeout(10, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(
        more.iter().all(|m| m.shard.as_ref() != tag.as_str()),
        "a fenced member takes nothing of the shard: {more:?}"
    );
    drop(a);
}

/// A pop whose reply a consumer gave up on (a stalled node, a dropped connection) and
/// released by name before the pop ran: when it runs at last it leases nothing, so an
/// ordered member that went on with newer pops never sees those messages come back later,
/// behind newer ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_released_before_it_ran_leases_nothing_when_it_runs() {
    use slotq_tests::scripts::{lease_pop, release_lost};
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("late-pop")
        .shards_per_master(1)
        .reliable()
        .open()
        .await
        .unwrap();
    let key = key_of_some_shard(&q);
    let tag = q.shards().shards[0].tag.clone();
    let producer = q.producer().build().unwrap();
    for i in 0..3 {
        producer.send_keyed(&key, format!("m{i}")).await.unwrap();
    }
    let late = "c".repeat(32);
    assert!(
        !release_lost(&c, &tag, &late),
        "the pop has not run: nothing to release"
    );
    let ran = lease_pop(&c, &tag, &late, 100, Some(("g", 1))).unwrap();
    assert_eq!(
        ran[0],
        redis::Value::Int(0),
        "the late pop leased nothing: {ran:?}"
    );
    let next = lease_pop(&c, &tag, &"d".repeat(32), 100, Some(("g", 1))).unwrap();
    assert_eq!(
        next[3],
        redis::Value::Int(3),
        "the messages are still there: {next:?}"
    );
    // A pop that ran before its release is released as it always was.
    assert!(release_lost(&c, &tag, &"d".repeat(32)));
}

/// A claim gives the old holder's leases back in the order they were made, not by
/// deadline: a lease extended past newer ones (a worker extends what it holds while a
/// handler runs) still comes back ahead of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_returns_leases_in_the_order_they_were_made_even_when_extended() {
    use slotq_tests::scripts::{lease_pop, payloads_in_lease};
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("claim-order")
        .shards_per_master(1)
        .reliable()
        .open()
        .await
        .unwrap();
    let key = key_of_some_shard(&q);
    let tag = q.shards().shards[0].tag.clone();
    let producer = q.producer().build().unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("payload-number-{i}")).collect();
    for n in &names {
        producer.send_keyed(&key, n.as_str()).await.unwrap();
    }
    // Three leases of two messages each, under grant 1; the first extended far ahead.
    let ids: Vec<String> = ["1", "2", "3"].iter().map(|d| d.repeat(32)).collect();
    for id in &ids {
        let r = lease_pop(&c, &tag, id, 2, Some(("g", 1))).unwrap();
        assert_eq!(r[3], redis::Value::Int(2), "{r:?}");
    }
    let leases = format!("slotq:{{{tag}}}:leases");
    let node = c.owner_of(slotq::slot::key_slot(&leases)).unwrap();
    c.node(node)
        .cmd::<i64>(
            redis::cmd("ZADD")
                .arg(&leases)
                .arg("XX")
                .arg(i64::MAX / 4)
                .arg(&ids[0]),
        )
        .unwrap();
    // Grant 2 claims the shard: every lease back, in the order made, then leased anew.
    let claim = "e".repeat(32);
    let r = lease_pop(&c, &tag, &claim, 100, Some(("g", 2))).unwrap();
    assert_eq!(r[2], redis::Value::Int(6), "all six came back: {r:?}");
    assert_eq!(
        payloads_in_lease(&c, &tag, &claim, &names),
        names,
        "in the order they were sent"
    );
}
