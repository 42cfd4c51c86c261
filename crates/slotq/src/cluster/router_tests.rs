//! The router against scripted fake nodes under a paused clock: every retry rule of
//! `docs/architecture.md` ("Router decisions") with exact sequences and deadlines.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

use super::fake_node::{Act, FakeNode, bulk, cluster_slots, default, error, simple};
use super::{Cluster, RequestOpts};
use crate::config::ClusterConfig;
use crate::error::Error;
use crate::server_error::ServerErrorKind;
use crate::topology::NodeAddr;

fn config(seed: &NodeAddr) -> ClusterConfig {
    ClusterConfig::from_url(&format!("redis://{seed}"))
        .unwrap()
        .request_timeout(Duration::from_millis(500))
        .retry_budget(Duration::from_secs(2))
        .max_redirects(5)
        .periodic_refresh(None)
}

fn is(w: &[String], cmd: &str) -> bool {
    w.first().is_some_and(|c| c.eq_ignore_ascii_case(cmd))
}

fn slots(w: &[String]) -> bool {
    is(w, "CLUSTER") && w.get(1).is_some_and(|s| s.eq_ignore_ascii_case("SLOTS"))
}

/// One fake node owning every slot, answering GET/SET by `script`.
async fn one_node(
    script: impl Fn(&[String], usize) -> Act + Send + Sync + 'static,
) -> (FakeNode, Cluster) {
    let (l, a) = FakeNode::bind().await;
    let me = a.clone();
    let node = FakeNode::serve(
        l,
        Arc::new(move |w, seen| {
            if slots(w) {
                cluster_slots(&[(0, 16383, &me)])
            } else {
                script(w, seen)
            }
        }),
    );
    let c = Cluster::connect(config(&a)).await.unwrap();
    (node, c)
}

async fn get(c: &Cluster, opts: RequestOpts) -> crate::Result<Value> {
    c.query_with(100, redis::cmd("GET").arg("k"), opts).await
}

#[tokio::test(start_paused = true)]
async fn a_slot_that_keeps_moving_stops_at_the_redirect_cap() {
    let (l, a) = FakeNode::bind().await;
    let me = a.clone();
    let node = FakeNode::serve(
        l,
        Arc::new(move |w, _| {
            if slots(w) {
                cluster_slots(&[(0, 16383, &me)])
            } else if is(w, "GET") {
                error(&format!("MOVED 100 {me}"))
            } else {
                default()
            }
        }),
    );
    let c = Cluster::connect(config(&a)).await.unwrap();
    let r = get(&c, c.default_opts()).await;
    assert!(
        matches!(
            r,
            Err(Error::TooManyRedirects {
                slot: 100,
                count: 6
            })
        ),
        "{r:?}"
    );
    // Five redirects followed; the sixth ends the call.
    assert_eq!(node.count("GET"), 6, "the first send and five redirects");
}

#[tokio::test(start_paused = true)]
async fn ask_sends_asking_and_the_command_in_one_write_and_keeps_the_map() {
    let (la, a) = FakeNode::bind().await;
    let (lb, b) = FakeNode::bind().await;
    let (a1, b1) = (a.clone(), b.clone());
    let node_a = FakeNode::serve(
        la,
        Arc::new(move |w, _| {
            if slots(w) {
                cluster_slots(&[(0, 16383, &a1)])
            } else if is(w, "GET") {
                error(&format!("ASK 100 {b1}"))
            } else {
                default()
            }
        }),
    );
    let node_b = FakeNode::serve(
        lb,
        Arc::new(|w, _| {
            if is(w, "ASKING") {
                simple("OK")
            } else if is(w, "GET") {
                bulk("there")
            } else {
                default()
            }
        }),
    );
    let c = Cluster::connect(config(&a)).await.unwrap();
    let v = get(&c, c.default_opts()).await.unwrap();
    assert_eq!(v, Value::BulkString(b"there".to_vec()));
    assert!(
        node_b
            .reads()
            .contains(&vec!["ASKING".to_string(), "GET".to_string()]),
        "ASKING and GET in one write: {:?}",
        node_b.reads()
    );
    assert_eq!(node_a.count("GET"), 1);
    assert_eq!(
        c.topology().owner(100),
        Some(&a),
        "ASK does not change the map"
    );
}

#[tokio::test(start_paused = true)]
async fn tryagain_is_retried_with_growing_pauses_until_the_budget_ends() {
    let (node, c) = one_node(|w, _| {
        if is(w, "GET") {
            error("TRYAGAIN Multiple keys request during rehashing of slot")
        } else {
            default()
        }
    })
    .await;
    let started = Instant::now();
    let r = get(&c, c.default_opts()).await;
    let took = started.elapsed();
    assert!(
        matches!(
            &r,
            Err(Error::ClusterUnavailable {
                kind: ServerErrorKind::TryAgain,
                ..
            })
        ),
        "{r:?}"
    );
    // Pauses 10, 20, 40, ..., 200 ms: about 15 sends in 2 s, and no pause past the budget.
    assert!(took <= Duration::from_secs(2), "{took:?}");
    assert!(took >= Duration::from_millis(1800), "{took:?}");
    let sends = node.count("GET");
    assert!((10..=20).contains(&sends), "{sends}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_costs_one_request_timeout_and_may_have_run() {
    let (node, c) = one_node(|w, _| if is(w, "GET") { Act::Silent } else { default() }).await;
    let started = Instant::now();
    let opts = RequestOpts {
        retry_budget: Duration::ZERO,
        ..c.default_opts()
    };
    let r = get(&c, opts).await;
    let took = started.elapsed();
    let e = r.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.may_have_run());
    assert_eq!(
        took,
        Duration::from_millis(500),
        "exactly the request timeout"
    );
    assert_eq!(node.count("GET"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_is_retried_only_when_idempotent() {
    let gets = std::sync::atomic::AtomicUsize::new(0);
    let (node, c) = one_node(move |w, _| {
        if is(w, "GET") {
            // Every other GET loses its reply (the connection closes unanswered).
            if gets
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                .is_multiple_of(2)
            {
                Act::Close
            } else {
                bulk("v")
            }
        } else {
            default()
        }
    })
    .await;
    let log_before = node.log().len();
    let r = get(&c, c.default_opts()).await;
    let e = r.unwrap_err();
    assert!(matches!(e, Error::ConnectionLost { .. }), "{e:?}");
    assert!(e.may_have_run(), "not idempotent: not sent twice");
    assert_eq!(node.count("GET"), 1);

    // Idempotent: sent again on a new connection (after its PING), answered.
    let opts = RequestOpts {
        idempotent: true,
        ..c.default_opts()
    };
    let mut got = None;
    for _ in 0..4 {
        if let Ok(v) = get(&c, opts).await {
            got = Some(v);
            break;
        }
    }
    assert_eq!(got, Some(Value::BulkString(b"v".to_vec())));
    assert!(node.log().len() > log_before);
}

#[tokio::test(start_paused = true)]
async fn a_reply_cut_short_is_a_lost_connection_not_a_hang() {
    let (_node, c) = one_node(|w, _| {
        if is(w, "GET") {
            Act::CloseMidReply(b"$10\r\nabc".to_vec())
        } else {
            default()
        }
    })
    .await;
    let started = Instant::now();
    let e = get(&c, c.default_opts()).await.unwrap_err();
    assert!(matches!(e, Error::ConnectionLost { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "no wait for a deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn readonly_refreshes_the_map_and_retries_but_oom_is_final() {
    let (node, c) = one_node(|w, _| {
        if is(w, "SET") {
            // Only the first SET meets a node that just became a replica.
            if w.get(1).is_some_and(|k| k == "first") {
                error("READONLY You can't write against a read only replica.")
            } else {
                simple("OK")
            }
        } else if is(w, "INCR") {
            error("OOM command not allowed when used memory > 'maxmemory'.")
        } else {
            default()
        }
    })
    .await;
    let slots_before = node.count("CLUSTER");
    let r: crate::Result<Value> = c.query(100, redis::cmd("SET").arg("first").arg("v")).await;
    // The retry goes to the same node (the fake map does not change) and meets READONLY
    // again until the budget ends; what matters: it was retried and the map refreshed.
    assert!(
        matches!(
            &r,
            Err(Error::ClusterUnavailable {
                kind: ServerErrorKind::ReadOnly,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(node.count("SET") > 1, "retried");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        node.count("CLUSTER") > slots_before,
        "the slot map was fetched again"
    );
    let ok: Value = c
        .query(100, redis::cmd("SET").arg("second").arg("v"))
        .await
        .unwrap();
    assert_eq!(ok, Value::Okay);

    let incrs = node.count("INCR");
    let e = c
        .query::<Value>(100, redis::cmd("INCR").arg("n"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Server {
                kind: ServerErrorKind::OutOfMemory,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(node.count("INCR"), incrs + 1, "OOM is not retried");
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_moved_replies_share_a_few_refreshes() {
    let (la, a) = FakeNode::bind().await;
    let (lb, b) = FakeNode::bind().await;
    // The slots really moved to B: every map fetched after the first says so.
    let maps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let map = {
        let (a, b, maps) = (a.clone(), b.clone(), maps.clone());
        move || {
            let owner = if maps.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                &a
            } else {
                &b
            };
            cluster_slots(&[(0, 16383, owner)])
        }
    };
    let (map_a, map_b) = (map.clone(), map);
    let b1 = b.clone();
    let _node_a = FakeNode::serve(
        la,
        Arc::new(move |w, _| {
            if slots(w) {
                map_a()
            } else if is(w, "GET") {
                let slot = crate::slot::key_slot(&w[1]);
                error(&format!("MOVED {slot} {b1}"))
            } else {
                default()
            }
        }),
    );
    let node_b = FakeNode::serve(
        lb,
        Arc::new(move |w, _| {
            if slots(w) {
                map_b()
            } else if is(w, "GET") {
                bulk("v")
            } else {
                default()
            }
        }),
    );
    let c = Cluster::connect(config(&a)).await.unwrap();
    // Every refresh asks both nodes at once (see `fetch_topology`): B's count is theirs.
    let fetches = || node_b.log().iter().filter(|w| slots(w)).count();
    let before = fetches();
    let started = Instant::now();
    let calls = (0..1000).map(|i| {
        let c = c.clone();
        async move {
            let key = format!("key{i}");
            c.query_key::<Value>(&key, redis::cmd("GET").arg(&key))
                .await
        }
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap(), Value::BulkString(b"v".to_vec()));
    }
    let storm = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refreshes = fetches() - before;
    // One fetch at a time, at most one per refresh interval (100 ms): the first at once,
    // one for the MOVED replies that came while it ran, one for those that came after it
    // (the storm takes no time on the paused clock, but runs on both sides of a fetch).
    let most = 3 + (storm.as_millis() / 100) as usize;
    assert_eq!(c.topology().owner(100), Some(&b), "the new map is in");
    assert!(
        (1..=most).contains(&refreshes),
        "{refreshes} refreshes for 1000 MOVED replies in {storm:?}"
    );
}

/// The slot map comes from the majority: a seed that says the cluster is down for it (a
/// master cut off from the others, still serving its old map) is not believed while a
/// node it names says the cluster is up with a higher epoch (its slots moved there).
#[tokio::test(start_paused = true)]
async fn the_slot_map_of_a_node_cut_off_from_the_majority_is_not_believed() {
    let (la, a) = FakeNode::bind().await;
    let (lb, b) = FakeNode::bind().await;
    let info = |state: &str, epoch: u64| {
        bulk(&format!(
            "cluster_state:{state}\r\ncluster_current_epoch:{epoch}\r\n"
        ))
    };
    let stale = {
        let (a, b) = (a.clone(), b.clone());
        FakeNode::serve(
            la,
            Arc::new(move |w, _| {
                if slots(w) {
                    cluster_slots(&[(0, 8191, &a), (8192, 16383, &b)])
                } else if is(w, "CLUSTER") && w[1].eq_ignore_ascii_case("INFO") {
                    info("fail", 5)
                } else if is(w, "GET") {
                    bulk("stale")
                } else {
                    default()
                }
            }),
        )
    };
    let _fresh = {
        let b = b.clone();
        FakeNode::serve(
            lb,
            Arc::new(move |w, _| {
                if slots(w) {
                    cluster_slots(&[(0, 16383, &b)])
                } else if is(w, "CLUSTER") && w[1].eq_ignore_ascii_case("INFO") {
                    info("ok", 6)
                } else if is(w, "GET") {
                    bulk("fresh")
                } else {
                    default()
                }
            }),
        )
    };
    let c = Cluster::connect(config(&a)).await.unwrap();
    assert_eq!(c.topology().owner(100), Some(&b), "{:?}", c.topology());
    let v = get(&c, c.default_opts()).await.unwrap();
    assert_eq!(v, Value::BulkString(b"fresh".to_vec()));
    assert_eq!(stale.count("GET"), 0, "nothing was asked of the stale node");
}
