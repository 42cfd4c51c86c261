//! A nemesis for ordered groups: members paused (SIGSTOP) past their membership and
//! continued, killed -9 and replaced, the registry's master paused, and a member cut off
//! from the registry's master by a partition (each member connects from a loopback
//! address of its own; nftables drops its traffic with that node), while a producer
//! sends numbered sequences per key. The checker reads the whole history: per key, the
//! order in which messages were first processed, and (an at-least-once queue) that every
//! message sent was processed.
//!
//! It runs for `SLOTQ_NEMESIS_SECS` seconds (default 20, as in CI).

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use slotq::Client;
use slotq_testkit::TestCluster;
use slotq_tests::history::{Done, check, collect, distinct, group_member_from, history};
use slotq_tests::nft::Partition;

/// The address member `who` connects from.
fn member_ip(who: usize) -> String {
    format!("127.0.0.{}", 201 + who)
}

/// A member process of ordered group "g", its processings collected into `done`.
fn member(url: &str, lease_ms: u64, who: usize, done: &Done) -> Child {
    let mut child = group_member_from(
        env!("CARGO_BIN_EXE_slotq-test-consumer"),
        url,
        "nemesis",
        lease_ms,
        5,
        "g",
        true,
        Some(&member_ip(who)),
    );
    collect(&mut child, who, done);
    child
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_group_keeps_order_and_loses_nothing_under_a_nemesis() {
    const KEYS: usize = 12;
    let secs: u64 = std::env::var("SLOTQ_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let c = TestCluster::start(3, 0).unwrap();
    let url = c.url();
    let client = Client::from_cluster(slotq_tests::router(&url).await);
    let q = client
        .queue("nemesis")
        .shards_per_master(2)
        .reliable()
        .open()
        .await
        .unwrap();
    let done = history();
    let leases = [1_000u64, 3_000, 10_000];
    let mut members: Vec<Child> = leases
        .iter()
        .enumerate()
        .map(|(i, &l)| member(&url, l, i, &done))
        .collect();

    // The producer: one message per key every 20 ms, numbered per key.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let producing = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let producer = q.producer().build().unwrap();
        tokio::spawn(async move {
            let mut seq = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // A send that fails (the stalled master holds shards too) is sent again
                // before the key's next one: a copy that landed anyway is a duplicate,
                // which the checker counts once.
                let sends = (0..KEYS).map(|k| {
                    let producer = producer.clone();
                    async move {
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while let Err(e) = producer
                            .send_keyed(format!("k{k}"), format!("k{k}:{seq}"))
                            .await
                        {
                            assert!(Instant::now() < deadline, "keyed send: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                });
                futures::future::join_all(sends).await;
                seq += 1;
                sent.store(seq, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seq
        })
    };

    // The nemesis.
    let meta = format!("slotq:{{{}}}:meta", q.name());
    let registry_master = c.owner_of(slotq::slot::key_slot(&meta)).unwrap();
    // The members connect from their own addresses (else the cuts below cut nothing).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(0..members.len()).all(|i| {
        c.node(registry_master)
            .cmd::<String>(slotq::redis::cmd("CLIENT").arg("LIST"))
            .is_ok_and(|l| l.contains(&format!("addr={}:", member_ip(i))))
    }) {
        assert!(
            Instant::now() < deadline,
            "members connect from their own addresses"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    let mut ops: HashMap<&str, usize> = HashMap::new();
    let mut round = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(rand::random_range(800..2000))).await;
        let i = rand::random_range(0..members.len());
        // Every kind of fault in turn, on a member picked at random.
        round += 1;
        match round % 4 {
            0 => {
                // Paused past the membership (3 s), then continued.
                let pid = members[i].id();
                signal(pid, "-STOP");
                tokio::time::sleep(Duration::from_millis(rand::random_range(3500..5500))).await;
                signal(pid, "-CONT");
                *ops.entry("pause a member").or_default() += 1;
            }
            1 => {
                members[i].kill().unwrap();
                members[i].wait().unwrap();
                members[i] = member(&url, leases[i], i, &done);
                *ops.entry("kill -9 and replace a member").or_default() += 1;
            }
            2 => {
                // One member cut off from the registry's master past its membership: its
                // heartbeats fail while it still reaches the other masters.
                let cut = Partition::new();
                cut.cut_ip_from_port(&member_ip(i), c.node(registry_master).port());
                tokio::time::sleep(Duration::from_millis(rand::random_range(3500..5500))).await;
                cut.heal();
                *ops.entry("cut a member off from the registry master")
                    .or_default() += 1;
            }
            _ => {
                // The registry's master stalls (under the node timeout): heartbeats wait.
                c.pause(registry_master).unwrap();
                tokio::time::sleep(Duration::from_millis(1200)).await;
                c.resume(registry_master).unwrap();
                *ops.entry("pause the registry master").or_default() += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let per_key = producing.await.unwrap();
    let total = per_key * KEYS;
    // Everything sent is processed (at-least-once), within a bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    while distinct(&done) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for m in &mut members {
        let _ = m.kill();
        let _ = m.wait();
    }
    let r = check(&done);
    eprintln!(
        "nemesis {secs} s ({ops:?}): {total} sent, {} processed ({} processings), {} order violations",
        r.distinct,
        r.processings,
        r.violations.len()
    );
    assert_eq!(r.distinct, total, "nothing lost");
    assert!(
        r.violations.is_empty(),
        "{:?}",
        &r.violations[..r.violations.len().min(10)]
    );
    assert_eq!(ops.len(), 4, "every kind of fault happened: {ops:?}");
}
