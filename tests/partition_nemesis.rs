//! The partition nemesis: one cluster (3 masters + 3 replicas, each node on a loopback
//! address of its own, node timeout 2 s), an at-least-once and an at-most-once queue with
//! default producers and consumers running throughout, and a sequence of cuts made with
//! nftables (`slotq_tests::nft`): a master cut off from every other node (clients still
//! reach it), the client cut off from one master, a replica cut off from its master, and
//! the client on the minority side with one master. A checker reads the whole history of
//! each queue: acknowledged but never delivered, delivered twice, sends that said "not
//! stored" but were, the longest send, the longest time a shard delivered nothing.
//!
//! One pass of the four cuts in CI; `SLOTQ_PARTITION_ROUNDS=N` runs N passes.

use std::time::{Duration, Instant};

use slotq::{Client, Cluster, ClusterConfig};
use slotq_testkit::TestCluster;
use slotq_tests::load::{Load, LoadConfig};
use slotq_tests::nft::Partition;

/// How long each cut lasts, and how long the cluster gets after it is healed.
const CUT: Duration = Duration::from_secs(6);
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy)]
enum Fault {
    MasterFromAll,
    ClientFromMaster,
    ReplicaFromMaster,
    ClientOnMinoritySide,
}

/// Waits (bounded) until every node says the cluster is ok and every master has its
/// replica connected again (an old master rejoining as a replica resyncs first).
fn wait_whole(c: &TestCluster) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let ok = (0..c.len()).all(|i| {
            c.node(i)
                .cmd::<String>(slotq::redis::cmd("CLUSTER").arg("INFO"))
                .is_ok_and(|s| s.contains("cluster_state:ok"))
        });
        let masters = c.masters();
        let replicated = masters.len() == 3
            && masters.iter().all(|&m| {
                c.node(m)
                    .cmd::<String>(slotq::redis::cmd("INFO").arg("replication"))
                    .is_ok_and(|s| s.contains("connected_slaves:1") && s.contains("state=online"))
            });
        if ok && replicated {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not become whole"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Makes the cut of `fault`; what it cuts is chosen from the cluster as it is now.
fn cut(c: &TestCluster, fault: Fault, round: usize) -> Partition {
    let masters = c.masters();
    let m = masters[round % masters.len()];
    let p = Partition::new();
    match fault {
        Fault::MasterFromAll => p.isolate_node(c, m),
        Fault::ClientFromMaster => p.isolate("127.0.0.1", &[c.node(m).host()]),
        Fault::ReplicaFromMaster => {
            let r = c.replicas_of(m)[0];
            p.isolate(c.node(r).host(), &[c.node(m).host()]);
        }
        Fault::ClientOnMinoritySide => {
            p.isolate_node(c, m);
            p.isolate_from_nodes("127.0.0.1", c, m);
        }
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_lose_nothing_acknowledged_and_deliver_nothing_twice() {
    let rounds: usize = std::env::var("SLOTQ_PARTITION_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let c = slotq_tests::partition_cluster(131);
    // The router's defaults: what a user gets.
    let config = ClusterConfig::from_url(&c.url()).unwrap();
    let client = Client::from_cluster(Cluster::connect(config).await.unwrap());
    let load = LoadConfig {
        producers: 6,
        consumers: 2,
        batch: 20,
        pause: Duration::from_millis(2),
        one_by_one: true,
    };
    let alo = client.queue("pn-alo").reliable().open().await.unwrap();
    let amo = client.queue("pn-amo").open().await.unwrap();
    let alo_load = Load::start(&alo, alo.producer().build().unwrap(), load);
    let amo_load = Load::start(&amo, amo.producer().build().unwrap(), load);
    let started = Instant::now();
    for round in 0..rounds {
        for fault in [
            Fault::MasterFromAll,
            Fault::ClientFromMaster,
            Fault::ReplicaFromMaster,
            Fault::ClientOnMinoritySide,
        ] {
            wait_whole(&c);
            let p = cut(&c, fault, round);
            eprintln!("{:>6.1?} round {round}: {fault:?}", started.elapsed());
            tokio::time::sleep(CUT).await;
            p.heal();
            tokio::time::sleep(SETTLE).await;
        }
    }
    wait_whole(&c);
    let alo_report = alo_load.finish(Duration::from_secs(20)).await;
    let amo_report = amo_load.finish(Duration::from_secs(20)).await;
    eprintln!("at-least-once: {alo_report}");
    eprintln!("at-most-once: {amo_report}");
    // The retry budget (3 s), then the attempt under way: a connection (1 s), the request
    // timeout (1 s) and the `WAIT` of a durable send (0.5 s).
    let bound = Duration::from_millis(5500);
    assert!(alo_report.acked > 0 && amo_report.acked > 0);
    assert_eq!(alo_report.lost, 0, "acknowledged and lost: {alo_report}");
    assert_eq!(amo_report.duplicated, 0, "delivered twice: {amo_report}");
    assert_eq!(alo_report.refused_but_stored, 0, "{alo_report}");
    assert_eq!(amo_report.refused_but_stored, 0, "{amo_report}");
    assert!(alo_report.longest_send <= bound, "{alo_report}");
    assert!(amo_report.longest_send <= bound, "{amo_report}");
}
