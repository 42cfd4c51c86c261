//! The `slotq` binary as a user runs it: output (human and JSON) and exit codes.

use std::process::{Command, Output};

use slotq_testkit::{ClusterBuilder, Server};

fn slotq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(args)
        .env_remove("SLOTQ_URL")
        .output()
        .expect("slotq runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn keyslot_human_and_json() {
    let o = slotq(&["keyslot", "somekey", "foo{hash_tag}", "bar{hash_tag}"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o),
        "somekey\t11058\nfoo{hash_tag}\t2515\nbar{hash_tag}\t2515\n"
    );
    let o = slotq(&["keyslot", "--json", "somekey"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["slot"], 11058);
}

#[test]
fn keyslot_without_keys_is_a_usage_error() {
    let o = slotq(&["keyslot"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn slots_shows_masters_replicas_and_keys() {
    let c = ClusterBuilder::new()
        .masters(3)
        .replicas(1)
        .start()
        .unwrap();
    c.node(0)
        .cmd::<()>(redis::cmd("SET").arg("{a}x").arg(1))
        .ok();
    let url = c.url();
    let o = slotq(&["--url", &url, "slots"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("cluster, 3 masters"), "{out}");
    assert!(out.contains("all 16384 slots covered"), "{out}");
    for m in 0..3 {
        assert!(
            out.contains(&format!("127.0.0.1:{}", c.node(m).port())),
            "{out}"
        );
    }
    let o = slotq(&["--url", &url, "--json", "slots"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let masters = v["masters"].as_array().unwrap();
    assert_eq!(masters.len(), 3);
    let total: u64 = masters.iter().map(|m| m["slots"].as_u64().unwrap()).sum();
    assert_eq!(total, 16384);
    assert!(
        masters
            .iter()
            .all(|m| m["replicas"].as_array().unwrap().len() == 1)
    );
    assert_eq!(v["mode"], "cluster");
}

#[test]
fn slots_on_standalone_says_so() {
    let s = Server::start().unwrap();
    let o = slotq(&["--url", &s.url(), "slots"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("standalone server"), "{}", stdout(&o));
}

#[test]
fn bad_url_and_server_down_have_distinct_exit_codes() {
    let o = slotq(&["--url", "http://127.0.0.1:1", "slots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("use redis:// or rediss://"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("Error {"), "no debug dumps");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = slotq(&["--url", &format!("redis://127.0.0.1:{port}"), "slots"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("cannot connect"), "{}", stderr(&o));
}

#[test]
fn dev_cluster_up_status_down() {
    // A port range unlikely to clash with other tests (they use random ports >= 20000).
    let port = 17_100 + (std::process::id() % 200) as u16 * 8;
    let p = port.to_string();
    let o = slotq(&[
        "dev-cluster",
        "up",
        "--masters",
        "2",
        "--replicas",
        "0",
        "--port",
        &p,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let url = format!("redis://127.0.0.1:{port}");
    assert!(out.contains(&format!("export SLOTQ_URL={url}")), "{out}");

    let o = slotq(&["dev-cluster", "status", "--port", &p, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 2);
    assert!(
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["running"] == true)
    );

    let o = slotq(&["--url", &url, "--json", "slots"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["masters"].as_array().unwrap().len(), 2);

    // A second `up` on the same ports is refused, clearly.
    let o = slotq(&[
        "dev-cluster",
        "up",
        "--masters",
        "2",
        "--replicas",
        "0",
        "--port",
        &p,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));

    let o = slotq(&["dev-cluster", "down", "--port", &p]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("stopped (2 processes)"));
    let o = slotq(&["--url", &url, "slots"]);
    assert_eq!(o.status.code(), Some(3));
}
