//! The testkit itself: clusters come up, agree, and obey kill/pause/migrate.

use std::time::{Duration, Instant};

use slotq_testkit::{ClusterBuilder, Server, TestCluster, key_slot};

#[test]
fn standalone_starts_and_stops_on_drop() {
    let s = Server::start().unwrap();
    let pong: String = s.cmd(&redis::cmd("PING")).unwrap();
    assert_eq!(pong, "PONG");
    let port = s.port();
    drop(s);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn cluster_with_replicas_covers_all_slots() {
    let t0 = Instant::now();
    let c = TestCluster::start(3, 1).unwrap();
    eprintln!("3+3 cluster up in {:?}", t0.elapsed());
    assert_eq!(c.len(), 6);
    assert_eq!(c.masters(), vec![0, 1, 2]);
    let covered: u32 = c
        .slot_owners()
        .keys()
        .map(|(a, b)| (*b - *a) as u32 + 1)
        .sum();
    assert_eq!(covered, 16384);
    for m in 0..3 {
        assert_eq!(c.replicas_of(m).len(), 1, "master {m}");
    }
}

#[test]
fn every_replica_can_take_over_a_dead_master() {
    // Each node starts with a config epoch of its own: a replica left with its master's
    // epoch, when that is the highest, claims the slots with a TAKEOVER that the other
    // nodes never accept.
    let mut c = TestCluster::start(3, 1).unwrap();
    let nodes: String = c.node(0).cmd(redis::cmd("CLUSTER").arg("NODES")).unwrap();
    let mut epochs: Vec<u64> = nodes
        .lines()
        .filter(|l| l.contains("master"))
        .map(|l| l.split(' ').nth(6).unwrap().parse().unwrap())
        .collect();
    epochs.sort_unstable();
    epochs.dedup();
    assert_eq!(epochs.len(), 3, "masters share a config epoch: {nodes}");
    assert!(
        epochs[0] > 0,
        "a master without an epoch of its own: {nodes}"
    );
    for m in 0..3 {
        let r = c.replicas_of(m)[0];
        c.kill(m).unwrap();
        c.node(r)
            .cmd::<()>(redis::cmd("CLUSTER").arg("FAILOVER").arg("TAKEOVER"))
            .unwrap();
        assert_eq!(c.wait_for_promotion(m, Duration::from_secs(15)).unwrap(), r);
    }
}

#[test]
fn migration_moves_keys_and_slot() {
    let c = ClusterBuilder::new().masters(2).start().unwrap();
    let key = "{mig}k";
    let slot = key_slot(key.as_bytes());
    let from = c.owner_of(slot).unwrap();
    let to = 1 - from;
    c.node(from)
        .cmd::<()>(redis::cmd("SET").arg(key).arg("v"))
        .unwrap();
    let m = c.begin_migration(slot, to).unwrap();
    assert_eq!(c.migrate_keys(&m, 10).unwrap(), 1);
    c.finish_migration(&m).unwrap();
    c.wait_stable().unwrap();
    assert_eq!(c.owner_of(slot), Some(to));
    let v: String = c.node(to).cmd(redis::cmd("GET").arg(key)).unwrap();
    assert_eq!(v, "v");
}

#[test]
fn missing_binary_is_a_clear_error() {
    let msg = slotq_testkit::TestkitError::RedisServerMissing.to_string();
    assert!(msg.contains("apt-get install -y redis-server"), "{msg}");
}

#[test]
fn pause_and_resume() {
    let s = Server::start().unwrap();
    s.pause().unwrap();
    let t0 = Instant::now();
    assert!(s.cmd::<String>(&redis::cmd("PING")).is_err());
    assert!(t0.elapsed() < Duration::from_secs(10));
    s.resume().unwrap();
    let pong: String = s.cmd(&redis::cmd("PING")).unwrap();
    assert_eq!(pong, "PONG");
}
