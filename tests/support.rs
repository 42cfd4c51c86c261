//! Shared helpers for the integration tests: connecting a router to a testkit cluster, and
//! a load driver for failure tests ([`load`]).

#[path = "load.rs"]
pub mod load;

#[path = "history.rs"]
pub mod history;

#[path = "scripts.rs"]
pub mod scripts;

#[path = "nft.rs"]
pub mod nft;

use std::time::Duration;

use slotq::{Cluster, ClusterConfig};

/// Connects a router to `url` with short deadlines suited to failure tests.
pub async fn router(url: &str) -> Cluster {
    Cluster::connect(fast_config(url))
        .await
        .expect("router connects")
}

/// The partition tests' cluster: 3 masters + 3 replicas, node timeout 2 s, node `i` on
/// its own loopback address 127.0.0.(`first_ip` + i), so that nftables can cut nodes apart.
pub fn partition_cluster(first_ip: u8) -> slotq_testkit::TestCluster {
    slotq_testkit::ClusterBuilder::new()
        .masters(3)
        .replicas(1)
        .own_addresses(first_ip)
        .node_timeout_ms(2000)
        .start()
        .expect("cluster starts")
}

/// Settings with short deadlines: 500 ms per attempt, 2 s retry budget.
pub fn fast_config(url: &str) -> ClusterConfig {
    ClusterConfig::from_url(url)
        .expect("valid url")
        .request_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .retry_budget(Duration::from_secs(2))
}

/// A key whose slot is owned by master index `m` of `cluster`.
pub fn key_on(cluster: &slotq_testkit::TestCluster, m: usize, prefix: &str) -> String {
    (0..)
        .map(|n| format!("{prefix}{{k{n}}}"))
        .find(|k| cluster.owner_of(slotq::slot::key_slot(k)) == Some(m))
        .expect("some key lands on every master")
}

/// Commands processed by every node of `c` so far (`INFO stats`; each call adds one per node).
pub fn total_commands(c: &slotq_testkit::TestCluster) -> u64 {
    info_sum(c, "stats", "total_commands_processed:")
}

/// Calls of one command (lower case, e.g. "lrange") on every node, from `INFO commandstats`
/// (commands that scripts run count too).
pub fn command_calls(c: &slotq_testkit::TestCluster, command: &str) -> u64 {
    info_sum(c, "commandstats", &format!("cmdstat_{command}:calls="))
}

/// Clients blocked in a blocking command (`BLMOVE`, `BLMPOP`, ...) on every node.
pub fn blocked_clients(c: &slotq_testkit::TestCluster) -> u64 {
    info_sum(c, "clients", "blocked_clients:")
}

/// The number after `prefix` (up to a comma) in one `INFO` section, summed over every
/// node; 0 for a node whose section lacks the line.
fn info_sum(c: &slotq_testkit::TestCluster, section: &str, prefix: &str) -> u64 {
    (0..c.len())
        .map(|i| {
            let info: String = c
                .node(i)
                .cmd(slotq::redis::cmd("INFO").arg(section))
                .expect("INFO");
            info.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.trim().split(',').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Depth per shard and the skew: the deepest over the mean.
pub async fn skew(q: &slotq::Queue) -> (Vec<u64>, f64) {
    let d: Vec<u64> = q.stats().await.unwrap().iter().map(|s| s.depth).collect();
    let mean = d.iter().sum::<u64>() as f64 / d.len() as f64;
    let max = *d.iter().max().unwrap() as f64;
    (d, max / mean)
}

/// A key that keyed sends put on shard `number` of the queue's current keyed layout.
pub fn key_for_shard(set: &slotq::placement::ShardSet, number: u32) -> String {
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| {
            set.keyed_shard(slotq::placement::fnv1a(k.as_bytes()))
                .is_some_and(|s| s.number == number)
        })
        .expect("some key lands on every keyed shard")
}

/// Sends `total` messages named `m0`, `m1`, ... from a task, in batches of `batch`, each a
/// `pause` after the one before.
pub fn send_paced(
    producer: slotq::Producer,
    total: usize,
    batch: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..total.div_ceil(batch) {
            let first = i * batch;
            producer
                .send_batch((first..total.min(first + batch)).map(|j| format!("m{j}")))
                .await
                .unwrap();
            tokio::time::sleep(pause).await;
        }
    })
}

/// Waits until `done` holds, checking every 50 ms, for at most `timeout`; returns whether
/// it held.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Messages received by test group members: payload and delivery number.
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(Vec<u8>, u32)>>>;

/// How test group members receive.
#[derive(Clone, Copy)]
pub struct Members {
    /// How long one call waits for a first message.
    pub wait: Duration,
    /// After a call that brought nothing, how long a member does other work (away).
    pub away: Duration,
    /// Acknowledge every batch (at-least-once queues).
    pub ack: bool,
}

/// Starts `n` members of group "g" that receive batches of up to 500 until `stop`, each
/// noting what it got in `got`, then close.
pub fn start_members(
    q: &slotq::Queue,
    n: usize,
    how: Members,
    got: &Received,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    (0..n)
        .map(|_| {
            let (q, got, stop) = (q.clone(), got.clone(), stop.clone());
            tokio::spawn(async move {
                let mut consumer = q.consumer().group("g").build().unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let b = consumer.recv_batch_timeout(500, how.wait).await.unwrap();
                    if b.is_empty() {
                        tokio::time::sleep(how.away).await;
                        continue;
                    }
                    if how.ack {
                        assert_eq!(consumer.ack_all(&b).await.unwrap().settled, b.len());
                    }
                    got.lock()
                        .unwrap()
                        .extend(b.into_iter().map(|m| (m.payload.to_vec(), m.attempt)));
                }
                consumer.close().await;
            })
        })
        .collect()
}

/// Receives and acknowledges everything an at-least-once queue holds, until a wait of
/// `quiet` brings nothing; the payloads, as text.
pub async fn drain_payloads(
    q: &slotq::Queue,
    quiet: Duration,
) -> std::collections::HashSet<String> {
    let mut consumer = q.consumer().without_group().build().unwrap();
    let mut got = std::collections::HashSet::new();
    loop {
        let batch = consumer.recv_batch_timeout(1000, quiet).await.unwrap();
        if batch.is_empty() {
            break;
        }
        if q.mode() != slotq::DeliveryMode::AtMostOnce {
            consumer.ack_all(&batch).await.unwrap();
        }
        got.extend(
            batch
                .iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned()),
        );
    }
    consumer.close().await;
    got
}
