//! Consumer groups against real clusters: one owner per shard, balanced and sticky; an
//! idle group costs one blocked pop per shard; members that die (kill -9) or join under
//! load lose nothing; ordered groups keep per-key order in processing across a crash.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slotq::{Client, Error, Queue, redis};
use slotq_testkit::TestCluster;
use slotq_tests::history::{check, collect, distinct, group_member, history};

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

/// Blocked clients on every master (`INFO clients`).
fn blocked_clients(c: &TestCluster) -> u64 {
    c.masters()
        .into_iter()
        .map(|m| {
            let info: String = c.node(m).cmd(redis::cmd("INFO").arg("clients")).unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("blocked_clients:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap()
        })
        .sum()
}

/// Starts `n` consumers of `q` that wait idle for messages, each in its own task.
fn idle_consumers(q: &Queue, n: usize, group: Option<&str>) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..n)
        .map(|_| {
            let q = q.clone();
            let group = group.map(str::to_string);
            tokio::spawn(async move {
                let mut b = q.consumer();
                b = match group {
                    Some(g) => b.group(g),
                    None => b.without_group(),
                };
                let mut consumer = b.build().unwrap();
                let got = consumer
                    .recv_batch_timeout(10, Duration::from_secs(4))
                    .await
                    .unwrap()
                    .len();
                consumer.close().await;
                got
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_group_blocks_once_per_shard_not_once_per_member() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("idle-group")
        .shards_per_master(2)
        .open()
        .await
        .unwrap();
    let shards = q.shards().shards.len() as u64;
    let members = idle_consumers(&q, 8, Some("g"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let grouped = blocked_clients(&c);
    for m in members {
        assert_eq!(m.await.unwrap(), 0);
    }
    let loners = idle_consumers(&q, 8, None);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ungrouped = blocked_clients(&c);
    for m in loners {
        m.await.unwrap();
    }
    eprintln!(
        "8 idle consumers, {shards} shards: {grouped} blocked pops in a group, {ungrouped} without"
    );
    assert!(
        grouped <= shards,
        "{grouped} blocked pops for {shards} shards"
    );
    assert_eq!(ungrouped, 8 * shards);
}

/// Shards per member, and owner per shard.
/// More members than shards: those without a shard of their own live on stealing, and
/// hear of deep shards within a fraction of a heartbeat (they beat ten times as often
/// while hungry), so a short burst is shared by all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_without_shards_steal_their_share_of_a_burst() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("burst").open().await.unwrap();
    // Six members on three shards, settled before the burst.
    let mut members = Vec::new();
    for _ in 0..6 {
        let mut m = q.consumer().group("g").build().unwrap();
        assert!(
            m.recv_batch_timeout(1, Duration::from_millis(50))
                .await
                .unwrap()
                .is_empty()
        );
        members.push(m);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let total = 60_000usize;
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = members
        .into_iter()
        .map(|mut m| {
            let got = got.clone();
            tokio::spawn(async move {
                let mut mine = 0usize;
                while got.load(std::sync::atomic::Ordering::Relaxed) < total {
                    let batch = m
                        .recv_batch_timeout(100, Duration::from_millis(100))
                        .await
                        .unwrap();
                    // Work that takes time: 5 ms per 100 messages.
                    if !batch.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    mine += batch.len();
                    got.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
                }
                m.close().await;
                mine
            })
        })
        .collect();
    let producer = q.producer().build().unwrap();
    producer
        .send_batch((0..total).map(|i| format!("m{i}")))
        .await
        .unwrap();
    let shares: Vec<usize> = futures::future::try_join_all(tasks).await.unwrap();
    assert_eq!(shares.iter().sum::<usize>(), total);
    let mean = total as f64 / shares.len() as f64;
    eprintln!("six members on three shards, shares of a burst of {total}: {shares:?}");
    assert!(
        shares.iter().all(|&n| n as f64 >= 0.75 * mean),
        "a member got less than 0.75 of the mean: {shares:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_reports_the_backlog_of_shards_it_gains_at_its_next_beat() {
    // Until an owner reports its shard deep, no other member steals from it; a member
    // measures the shards it gains at once (a hundredth of a beat later), not at the next
    // tenth of a beat. With a 60 s membership a beat is 20 s: the report must come long
    // before the 2 s a tenth of a beat would take.
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("gained").open().await.unwrap();
    let producer = q.producer().build().unwrap();
    producer
        .send_batch((0..9_000).map(|i| format!("m{i}")))
        .await
        .unwrap();
    let mut m = q
        .consumer()
        .group("g")
        .member_timeout(Duration::from_secs(60))
        .prefetch(false)
        .build()
        .unwrap();
    let joined = Instant::now();
    assert_eq!(
        m.recv_batch_timeout(1, Duration::from_secs(1))
            .await
            .unwrap()
            .len(),
        1
    );
    let key = "slotq:{gained}:group:g";
    let node = c.owner_of(slotq_testkit::key_slot(key.as_bytes())).unwrap();
    let reported = slotq_testkit::wait_for(
        "the shards reported deep",
        Duration::from_millis(1500),
        || {
            let group: HashMap<String, String> =
                c.node(node).cmd(redis::cmd("HGETALL").arg(key)).ok()?;
            let deep = group.keys().filter(|k| k.starts_with("d:")).count();
            (deep == 3).then_some(group)
        },
    );
    assert!(
        reported.is_ok(),
        "{:?} after joining, the group does not know its member's backlog",
        joined.elapsed()
    );
    m.close().await;
}

async fn owners(q: &Queue, group: &str) -> (Vec<usize>, BTreeMap<String, String>) {
    let st = q.group_status(group).await.unwrap();
    let mut per: Vec<usize> = st.members.iter().map(|m| m.shards.len()).collect();
    per.sort_unstable();
    let by_shard = st
        .shards
        .iter()
        .filter_map(|s| s.owner.clone().map(|o| (s.tag.clone(), o)))
        .collect();
    (per, by_shard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_are_shared_evenly_and_move_only_as_much_as_needed() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("share")
        .shards_per_master(4)
        .open()
        .await
        .unwrap();
    let first = idle_consumers(&q, 4, Some("g"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (per, before) = owners(&q, "g").await;
    assert_eq!(per, vec![3, 3, 3, 3]);
    assert_eq!(before.len(), 12, "every shard has an owner");

    let more = idle_consumers(&q, 2, Some("g"));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (per, after) = owners(&q, "g").await;
    assert_eq!(per, vec![2, 2, 2, 2, 2, 2]);
    let moved = before
        .iter()
        .filter(|(t, o)| after.get(*t) != Some(o))
        .count();
    assert_eq!(moved, 4, "sticky: only what the newcomers need moves");
    for h in first.into_iter().chain(more) {
        h.await.unwrap();
    }
    // Members that leave hand their shards on at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = q.group_status("g").await.unwrap();
    assert!(st.members.is_empty(), "{st:?}");
}

/// A member process of group "g" (see `slotq_tests::history::group_member`).
fn member(url: &str, queue: &str, lease_ms: u64, pause_ms: u64, ordered: bool) -> Child {
    group_member(
        env!("CARGO_BIN_EXE_slotq-test-consumer"),
        url,
        queue,
        lease_ms,
        pause_ms,
        "g",
        ordered,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_s_shards_go_to_the_others_and_nothing_is_lost() {
    const TOTAL: usize = 20_000;
    let c = TestCluster::start(3, 0).unwrap();
    let url = c.url();
    let client = client(&url).await;
    let q = client
        .queue("kill-member")
        .shards_per_master(4)
        .reliable()
        .open()
        .await
        .unwrap();
    let done = history();
    let mut members: Vec<Child> = (0..8)
        .map(|_| member(&url, "kill-member", 2000, 0, false))
        .collect();
    for (i, m) in members.iter_mut().enumerate() {
        collect(m, i, &done);
    }
    let producer = q.producer().build().unwrap();
    let sending = tokio::spawn(async move {
        for i in 0..TOTAL / 100 {
            producer
                .send_batch((0..100).map(|j| format!("m{}", i * 100 + j)))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    members[0].kill().unwrap();
    members[0].wait().unwrap();
    let killed = Instant::now();
    // Within the member timeout (3 s) + 2 s, every shard has a live owner among the 7.
    let rehomed = loop {
        let st = q.group_status("g").await.unwrap();
        if st.members.len() == 7 && st.shards.iter().all(|s| s.owner.is_some()) {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(5), "{st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sending.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while distinct(&done) < TOTAL && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for m in &mut members[1..] {
        m.kill().unwrap();
        m.wait().unwrap();
    }
    let got = distinct(&done);
    eprintln!(
        "kill -9 of one member of 8: its shards re-owned after {rehomed:?}; {got} of {TOTAL} processed"
    );
    assert_eq!(got, TOTAL, "nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_under_load_lose_and_duplicate_nothing() {
    const TOTAL: usize = 50_000;
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("join")
        .shards_per_master(2)
        .open()
        .await
        .unwrap();
    let got: slotq_tests::Received = Arc::new(Mutex::new(Vec::with_capacity(TOTAL)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let how = slotq_tests::Members {
        wait: Duration::from_millis(100),
        away: Duration::ZERO,
        ack: false,
    };
    let start = |n: usize| slotq_tests::start_members(&q, n, how, &got, &stop);
    let mut consumers = start(2);
    let producer = q.producer().build().unwrap();
    let sending = slotq_tests::send_paced(producer, TOTAL, 500, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(800)).await;
    consumers.extend(start(8));
    sending.await.unwrap();
    slotq_tests::wait_until(Duration::from_secs(20), || {
        got.lock().unwrap().len() >= TOTAL
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in consumers {
        h.await.unwrap();
    }
    let got = got.lock().unwrap();
    let set: HashSet<&Vec<u8>> = got.iter().map(|(p, _)| p).collect();
    assert_eq!(set.len(), got.len(), "no duplicates");
    assert_eq!(got.len(), TOTAL, "nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_group_keeps_per_key_order_across_a_member_crash() {
    const KEYS: usize = 20;
    const PER_KEY: usize = 150;
    let c = TestCluster::start(3, 0).unwrap();
    let url = c.url();
    let client = client(&url).await;
    let q = client
        .queue("ordered")
        .shards_per_master(2)
        .reliable()
        .open()
        .await
        .unwrap();
    let producer = q.producer().build().unwrap();
    for seq in 0..PER_KEY {
        let sends = (0..KEYS).map(|k| producer.send_keyed(format!("k{k}"), format!("k{k}:{seq}")));
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
    }
    let done = history();
    let mut members: Vec<Child> = (0..4)
        .map(|_| member(&url, "ordered", 1500, 5, true))
        .collect();
    for (i, m) in members.iter_mut().enumerate() {
        collect(m, i, &done);
    }
    // Killed in the middle of the work (about 2 s of it for each of the 4).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before_kill = distinct(&done);
    members[1].kill().unwrap();
    members[1].wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while distinct(&done) < KEYS * PER_KEY && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, m) in members.iter_mut().enumerate() {
        if i != 1 {
            m.kill().unwrap();
            m.wait().unwrap();
        }
    }
    let r = check(&done);
    assert_eq!(r.distinct, KEYS * PER_KEY, "every message processed");
    // Processing order per key: a message is first processed only after every earlier one
    // of its key was (redeliveries of earlier ones may repeat).
    assert!(
        r.violations.is_empty(),
        "{:?}",
        &r.violations[..r.violations.len().min(10)]
    );
    eprintln!(
        "ordered group, 4 members, one killed after {before_kill} of {} were processed: {} processings, {} repeats, order kept",
        KEYS * PER_KEY,
        r.processings,
        r.processings - r.distinct
    );
    assert!(before_kill < KEYS * PER_KEY / 2, "the crash came mid-work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_names_and_modes_get_typed_errors() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client.queue("names").open().await.unwrap();
    for bad in ["", "a b", "x{y}", &"g".repeat(65)] {
        let e = q.consumer().group(bad).build().unwrap_err();
        assert!(
            matches!(e, Error::InvalidGroupName { .. }),
            "{bad:?}: {e:?}"
        );
    }
    let e = q.consumer().without_group().ordered().build().unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    // A group runs one mode: an ordered consumer cannot join an unordered group.
    let mut plain = q.consumer().group("mixed").build().unwrap();
    assert!(
        plain
            .recv_batch_timeout(1, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
    let mut ordered = q.consumer().group("mixed").ordered().build().unwrap();
    let e = ordered
        .recv_batch_timeout(1, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::GroupModeMismatch { .. }), "{e:?}");
    plain.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retiring_shard_stays_owned_and_read_until_empty() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    let q = client
        .queue("retiring")
        .shards_per_master(2)
        .registry_poll(Duration::from_millis(100))
        .open()
        .await
        .unwrap();
    let set = q.shards();
    let last = set.shards.iter().map(|s| s.number).max().unwrap();
    let key = slotq_tests::key_for_shard(&set, last);
    let producer = q.producer().build().unwrap();
    for i in 0..221 {
        producer.send_keyed(&key, format!("{i}")).await.unwrap();
    }
    // The shard turns retiring (as a rebalance step makes it: no pushes, still read).
    let meta = format!("slotq:{{{}}}:meta", q.name());
    let node = c.node(c.owner_of(slotq::slot::key_slot(&meta)).unwrap());
    let fields: BTreeMap<String, String> = node.cmd(redis::cmd("HGETALL").arg(&meta)).unwrap();
    let active: Vec<&str> = fields["active"]
        .split_whitespace()
        .filter(|n| *n != last.to_string())
        .collect();
    let version: u64 = fields["version"].parse().unwrap();
    node.cmd::<i64>(
        redis::cmd("HSET")
            .arg(&meta)
            .arg("active")
            .arg(active.join(" "))
            .arg("retiring")
            .arg(last.to_string())
            .arg("version")
            .arg(version + 1),
    )
    .unwrap();
    let mut consumer = q.consumer().group("g").build().unwrap();
    let start = Instant::now();
    let mut got = 0;
    while got < 221 && start.elapsed() < Duration::from_secs(5) {
        got += consumer
            .recv_batch_timeout(500, Duration::from_millis(200))
            .await
            .unwrap()
            .len();
    }
    eprintln!(
        "a retiring shard's 221 messages read by a group in {:?}",
        start.elapsed()
    );
    assert_eq!(got, 221, "the retiring shard is read");
    let st = q.group_status("g").await.unwrap();
    assert!(
        st.shards
            .iter()
            .any(|s| s.tag.ends_with(&format!("#{last}")) && s.owner.is_some()),
        "the retiring shard has an owner: {st:?}"
    );
    consumer.close().await;
}
