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
