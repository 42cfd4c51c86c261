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

fn slotq_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(args)
        .env_remove("SLOTQ_URL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("slotq runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn push_pop_stats_plan_expand_round_trip() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();

    // Dry run on a queue that does not exist: three shards, one per master, nothing written.
    let o = slotq(&["--url", u, "plan", "jobs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("would be created with 3 shard(s)"),
        "{}",
        stdout(&o)
    );
    let o = slotq(&["--url", u, "stats", "jobs"]);
    assert_eq!(o.status.code(), Some(4), "unknown queue: {}", stderr(&o));
    assert!(stderr(&o).contains("does not exist"));

    // Arguments, then stdin lines.
    let o = slotq(&["--url", u, "push", "jobs", "a", "b"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: String = (0..100).map(|i| format!("line-{i}\n")).collect();
    let o = slotq_stdin(&["--url", u, "--json", "push", "jobs"], &lines);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["pushed"], 100);

    let o = slotq(&["--url", u, "--json", "stats", "jobs"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["total_depth"], 102);
    assert_eq!(v["shards"].as_array().unwrap().len(), 3);
    let o = slotq(&["--url", u, "stats", "jobs"]);
    assert!(stdout(&o).contains("total depth 102"), "{}", stdout(&o));

    let o = slotq(&["--url", u, "slots", "--queue", "jobs"]);
    assert!(
        stdout(&o).contains("queue jobs (registry version 1)"),
        "{}",
        stdout(&o)
    );
    let o = slotq(&["--url", u, "--json", "slots", "--queue", "jobs"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["queue"]["shard_skew"], 1.0);

    // Pop exactly n, one per line; the rest stays queued.
    let o = slotq(&["--url", u, "pop", "jobs", "-n", "10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 10);
    let o = slotq(&["--url", u, "--json", "pop", "jobs", "-n", "200"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 92);
    let o = slotq(&["--url", u, "pop", "jobs", "--wait", "0.2"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), "", "empty queue, nothing printed");

    // Keyed pushes keep their order.
    let o = slotq(&["--url", u, "push", "jobs", "--key", "k1", "1", "2", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = slotq(&["--url", u, "pop", "jobs", "-n", "3"]);
    assert_eq!(stdout(&o), "1\n2\n3\n");

    let o = slotq(&["--url", u, "expand", "jobs"]);
    assert!(
        stdout(&o).contains("every master already has its shards"),
        "{}",
        stdout(&o)
    );

    // Bad input: exit code 2; from standard input, the lines before the bad one are sent
    // (input is streamed), the bad one and the rest are not.
    let o = slotq(&["--url", u, "push", "bad name", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("invalid queue name"));
    let o = slotq_stdin(&["--url", u, "push", "jobs"], "ok\n\nok\n");
    assert_eq!(
        o.status.code(),
        Some(2),
        "an empty line is an empty payload"
    );
    assert!(stderr(&o).contains("message 2"), "{}", stderr(&o));
    let o = slotq(&["--url", u, "--json", "stats", "jobs"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["total_depth"], 1);
}

#[test]
fn two_processes_opening_one_new_queue_agree() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    for round in 0..3 {
        let q = format!("race{round}");
        let spawn = || {
            Command::new(env!("CARGO_BIN_EXE_slotq"))
                .args(["--url", &url, "push", &q, "x"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let (mut a, mut b) = (spawn(), spawn());
        assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
        let o = slotq(&["--url", &url, "--json", "stats", &q]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(
            v["shards"].as_array().unwrap().len(),
            3,
            "one shard set: {v}"
        );
        assert_eq!(v["total_depth"], 2, "both pushes landed in it");
        assert_eq!(v["version"], 1);
    }
}

#[test]
fn bench_reports_three_phases() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let o = slotq(&[
        "--url",
        &c.url(),
        "--json",
        "bench",
        "--messages",
        "20000",
        "--producers",
        "2",
        "--consumers",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let phases: Vec<&str> = v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["push", "pop", "push+pop"]);
    assert!(v["phases"][2]["latency_us"]["p99"].as_u64().unwrap() > 0);
    let per_node = v["messages_per_node"].as_object().unwrap();
    assert_eq!(per_node.len(), 3);
    assert_eq!(
        per_node.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        20000
    );
    // The bench cleans up after itself.
    let keys: i64 = (0..3)
        .map(|i| c.node(i).cmd::<i64>(&redis::cmd("DBSIZE")).unwrap())
        .sum();
    assert_eq!(keys, 0);

    let o = slotq(&["--url", &c.url(), "bench", "--size", "8"]);
    assert_eq!(o.status.code(), Some(2));

    // Open loop: 4,000 a second for half a second after a quarter of a second of
    // warm-up, latency from the intended send times.
    let o = slotq(&[
        "--url",
        &c.url(),
        "--json",
        "bench",
        "--rate",
        "4000",
        "--duration",
        "0.5",
        "--warm-up",
        "0.25",
        "--producers",
        "2",
        "--consumers",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let phases = v["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 1, "{v}");
    let p = &phases[0];
    assert_eq!(p["phase"], "rate");
    assert_eq!(p["messages"], 2000);
    assert_eq!(p["target_msgs_per_s"], 4000.0);
    assert!(p["offered_msgs_per_s"].as_f64().unwrap() > 0.0, "{p}");
    let l = &p["latency_us"];
    let q = |k: &str| l[k].as_u64().unwrap();
    assert!(
        q("p50") > 0 && q("p50") <= q("p99") && q("p99") <= q("p999") && q("p999") <= q("max"),
        "{l}"
    );
    // How late the schedule was: every hand-over counted, none later than the latest
    // message (the hand-over is part of its latency).
    let s = &p["schedule_late_us"];
    let handovers = s["handovers"].as_u64().unwrap();
    assert!(handovers > 0 && handovers <= 2000, "{s}");
    assert!(s["over_1ms"].as_u64().unwrap() <= handovers, "{s}");
    // Each late hand-over carries at least its first message late; none beyond the phase.
    let late = s["messages_over_1ms"].as_u64().unwrap();
    assert!(
        late >= s["over_1ms"].as_u64().unwrap() && late <= 2000,
        "{s}"
    );
    assert!(s["max"].as_u64().unwrap() <= q("max"), "{s} {l}");
    // The warm-up went first on the same schedule, measured apart.
    let w = &p["warm_up"];
    assert_eq!(w["messages"], 1000, "{p}");
    assert_eq!(w["secs"], 0.25, "{p}");
    assert!(w["latency_us"]["p99"].as_u64().unwrap() > 0, "{p}");
    let url = c.url();
    for bad in [
        ["--rate", "0"],
        ["--rate", "-5"],
        ["--duration", "0"],
        ["--warm-up", "-1"],
        ["--warm-up", "soon"],
    ] {
        let mut args = vec!["--url", &url, "bench", "--rate", "1000"];
        args.extend(bad);
        let o = slotq(&args);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
    }

    // Load levels: the run's own push+pop maximum first, then each level at its fraction.
    let o = slotq(&[
        "--url",
        &url,
        "--json",
        "bench",
        "--messages",
        "20000",
        "--load",
        "10%,0.5",
        "--duration",
        "0.5",
        "--warm-up",
        "0",
        "--producers",
        "2",
        "--consumers",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let phases = v["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 3, "{v}");
    assert_eq!(phases[0]["phase"], "push+pop");
    let top = phases[0]["msgs_per_s"].as_f64().unwrap();
    for (p, f) in phases[1..].iter().zip([0.1, 0.5]) {
        assert_eq!(p["phase"], "rate");
        assert_eq!(p["load"], f);
        let target = p["target_msgs_per_s"].as_f64().unwrap();
        assert!((target - top * f).abs() <= 1.0, "{p} against {top}");
        assert!(p["latency_us"]["p99"].as_u64().unwrap() > 0, "{p}");
        assert!(
            p["schedule_late_us"]["handovers"].as_u64().unwrap() > 0,
            "{p}"
        );
        assert!(p["warm_up"].is_null(), "no warm-up asked for: {p}");
    }
    assert!(phases[0]["schedule_late_us"].is_null(), "{v}");
    for bad in [
        vec!["--load", "0"],
        vec!["--load", "150%"],
        vec!["--load", "ten"],
        vec!["--load", "10%", "--rate", "1000"],
    ] {
        let mut args = vec!["--url", &url, "bench"];
        args.extend(bad.iter().copied());
        let o = slotq(&args);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("load"), "{bad:?}: {}", stderr(&o));
    }
}

/// `--rounds`: the anchor and the phases run side by side each round; every round's
/// figures are reported, and each phase's ratio is the median of its rounds' ratios. The
/// anchor here is a script with fixed figures (a different one each round), so the ratios
/// can be checked exactly.
#[test]
fn bench_rounds_report_every_round_and_the_median() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let dir = std::env::temp_dir().join(format!("slotq-rounds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("anchor.sh");
    let calls = dir.join("calls");
    let _ = std::fs::remove_file(&calls);
    // Called at batch 100 and 1000 each round: the better figure of the two counts.
    std::fs::write(
        &script,
        format!(
            "echo \"$@\" >> {calls}\nn=$(wc -l < {calls})\n\
             echo \"ANCHOR op=push masters=3 msgs=1 secs=1 msgs_per_s=$((n * 100000))\"\n\
             echo \"ANCHOR op=pop masters=3 msgs=1 secs=1 msgs_per_s=$((n * 200000))\"\n",
            calls = calls.display()
        ),
    )
    .unwrap();
    let o = slotq(&[
        "--url",
        &c.url(),
        "--json",
        "bench",
        "--messages",
        "20000",
        "--producers",
        "2",
        "--consumers",
        "2",
        "--phases",
        "push,pop",
        "--no-prefetch",
        "--rounds",
        "3",
        "--anchor",
        script.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // Two anchor runs a round, each for the master it was given, at batch 100 and 1000.
    let called = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(called.lines().count(), 6, "{called}");
    assert!(called.lines().all(|l| l.contains("127.0.0.1:")), "{called}");
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "{v}");
    let f = |x: &serde_json::Value| x.as_f64().unwrap();
    let mut push_ratios = Vec::new();
    for (i, r) in rounds.iter().enumerate() {
        // The better of the round's two anchor runs: the second, 2 * (i + 1) calls in.
        let push = 2.0 * (i as f64 + 1.0) * 100_000.0;
        assert_eq!(f(&r["anchor"]["push_msgs_per_s"]), push, "{r}");
        assert_eq!(f(&r["anchor"]["pop_msgs_per_s"]), 2.0 * push, "{r}");
        let phases = r["phases"].as_array().unwrap();
        assert_eq!(phases.len(), 2, "{r}");
        assert_eq!(phases[0]["phase"], "push");
        let ratio = f(&phases[0]["ratio"]);
        assert!(
            (ratio - f(&phases[0]["msgs_per_s"]) / push).abs() < 1e-3,
            "{r}"
        );
        assert!((f(&phases[1]["ratio"]) - f(&phases[1]["msgs_per_s"]) / (2.0 * push)).abs() < 1e-3);
        push_ratios.push(ratio);
    }
    push_ratios.sort_by(f64::total_cmp);
    let summed = &v["ratios"].as_array().unwrap()[0];
    assert_eq!(summed["phase"], "push");
    assert!((f(&summed["ratio"]) - push_ratios[1]).abs() < 1e-9, "{v}");
    // The anchor's median, and the phase of the median round (one of the rounds' own).
    assert_eq!(f(&v["anchor"]["push_msgs_per_s"]), 400_000.0, "{v}");
    let mut pushes: Vec<f64> = rounds
        .iter()
        .map(|r| f(&r["phases"][0]["msgs_per_s"]))
        .collect();
    pushes.sort_by(f64::total_cmp);
    assert_eq!(f(&v["phases"][0]["msgs_per_s"]), pushes[1], "{v}");
    // The text report carries every round beside the median.
    let o = slotq(&[
        "--url",
        &c.url(),
        "bench",
        "--messages",
        "5000",
        "--phases",
        "push",
        "--rounds",
        "2",
        "--anchor",
        script.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("2 rounds:") && out.contains("BY ROUND (x anchor)"),
        "{out}"
    );
    let row = out.lines().find(|l| l.starts_with("push ")).unwrap();
    assert_eq!(row.split_whitespace().count(), 10, "{row}");
    // Rounds are for closed-loop phases, and at least one.
    let url = c.url();
    for bad in [
        vec!["--rounds", "0"],
        vec!["--rounds", "many"],
        vec!["--rounds", "2", "--rate", "1000"],
        vec!["--rounds", "2", "--load", "10%"],
    ] {
        let mut args = vec!["--url", &url, "bench"];
        args.extend(bad.iter().copied());
        let o = slotq(&args);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("rounds"), "{bad:?}: {}", stderr(&o));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_shows_placement_and_traffic_then_cleans_up() {
    let o = slotq(&["demo", "--replicas", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "cluster, 3 masters",
        "queue orders: 3 shards, one per master",
        "shards per master skew 1.00",
        "throughput: pushed 300000",
        "latency from send to receive while both run: p50",
        "at-least-once queue payments: 999 acknowledged, 2 failed deliveries, 1 dead letter(s)",
        "the cluster is stopped",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

#[test]
fn reliable_pop_ack_dead_letters_and_stats() {
    let c = ClusterBuilder::new().masters(2).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    let o = slotq(&[
        "--url",
        u,
        "push",
        "rq",
        "--reliable",
        "--max-attempts",
        "1",
        "a",
        "b",
        "c",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Without --ack the messages stay leased (in flight).
    let o = slotq(&["--url", u, "pop", "rq", "-n", "2"]);
    assert_eq!(stdout(&o).lines().count(), 2);
    assert!(stderr(&o).contains("not acknowledged"), "{}", stderr(&o));
    let o = slotq(&["--url", u, "--json", "stats", "rq"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let sum = |f: &str| -> u64 {
        v["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[f].as_u64().unwrap())
            .sum()
    };
    assert_eq!((sum("depth"), sum("in_flight")), (1, 2));
    let o = slotq(&["--url", u, "stats", "rq"]);
    assert!(
        stdout(&o).contains("at-least-once, 1 attempts"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("IN-FLIGHT"));

    // --ack settles what was printed; the JSON carries id and attempt.
    let o = slotq(&["--url", u, "--json", "pop", "rq", "-n", "5", "--ack"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["attempt"], 1);
    assert_eq!(v[0]["id"].as_str().unwrap().len(), 32);

    // --ack on an at-most-once queue is refused.
    slotq(&["--url", u, "push", "plain", "x"]);
    let o = slotq(&["--url", u, "pop", "plain", "--ack"]);
    assert_eq!(o.status.code(), Some(2));
    let o = slotq(&["--url", u, "dead", "plain", "list"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("at-most-once"), "{}", stderr(&o));

    // Dead letters: list, replay, purge (empty here), with JSON.
    let o = slotq(&["--url", u, "--json", "dead", "rq", "list"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 0);
    let o = slotq(&["--url", u, "dead", "rq", "replay"]);
    assert!(
        stdout(&o).contains("0 dead letter(s) moved back"),
        "{}",
        stdout(&o)
    );
    let o = slotq(&["--url", u, "--json", "dead", "rq", "purge"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["purged"], 0);
}

#[test]
fn consume_prints_acks_and_serves_metrics() {
    use std::io::{Read, Write};
    let c = ClusterBuilder::new().masters(2).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    assert!(
        slotq(&["--url", u, "push", "mq", "--reliable", "a", "b", "c"])
            .status
            .success()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(["--url", u, "consume", "mq", "--ack", "--metrics", &addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        slotq(&["--url", u, "push", "mq", "d", "e"])
            .status
            .success()
    );
    let scrape = || -> String {
        let Ok(mut s) = std::net::TcpStream::connect(&addr) else {
            return String::new();
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let body = loop {
        let body = scrape();
        if body.contains("slotq_messages_settled_total{kind=\"ack\"} 5") {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never showed 5 acks:\n{body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(lines, ["a", "b", "c", "d", "e"]);
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    for name in [
        "slotq_messages_popped_total{queue=\"mq\"} 5",
        "slotq_pop_round_seconds_count",
    ] {
        assert!(body.contains(name), "missing {name}:\n{body}");
    }
    let o = slotq(&["--url", u, "--json", "stats", "mq"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let open: u64 = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["depth"].as_u64().unwrap() + s["in_flight"].as_u64().unwrap())
        .sum();
    assert_eq!(open, 0, "everything acknowledged");
}

#[test]
fn plan_expand_and_dev_cluster_json() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    let o = slotq(&[
        "--url",
        u,
        "--json",
        "plan",
        "fresh",
        "--shards-per-master",
        "2",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["action"], "create");
    assert_eq!(v["shards"].as_array().unwrap().len(), 6);
    assert!(slotq(&["--url", u, "push", "fresh", "x"]).status.success());
    let o = slotq(&["--url", u, "--json", "plan", "fresh"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["action"], "expand");
    assert_eq!(v["shards"].as_array().unwrap().len(), 0);
    let o = slotq(&["--url", u, "--json", "expand", "fresh"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (v["added"].as_array().unwrap().len(), v["version"].as_u64()),
        (0, Some(1))
    );
    let o = slotq(&["--url", u, "expand", "missing"]);
    assert_eq!(o.status.code(), Some(4));
    let o = slotq(&["--url", u, "plan", "bad name"]);
    assert_eq!(o.status.code(), Some(2));
    let o = slotq(&["--url", u, "stats", "fresh", "--watch", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn group_shows_members_their_shards_and_lag() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let u = c.url();
    let o = slotq(&["--url", &u, "push", "gq", "a", "b", "c"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Two members of group "work": one prints what it takes, the other idles.
    let mut members: Vec<std::process::Child> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_slotq"))
                .args(["--url", &u, "consume", "gq", "--group", "work"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let o = slotq(&["--url", &u, "--json", "group", "gq", "--group", "work"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["mode"], "unordered");
    assert_eq!(v["members"].as_array().unwrap().len(), 2);
    let shards = v["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3);
    assert!(shards.iter().all(|s| s["owner"].is_string()), "{v}");
    assert_eq!(v["lag"], 0, "the members took the messages");
    let owned: usize = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["shards"].as_array().unwrap().len())
        .sum();
    assert_eq!(owned, 3);
    let o = slotq(&["--url", &u, "group", "gq", "--group", "work"]);
    let text = stdout(&o);
    assert!(
        text.contains("2 members, unordered") && text.contains("MEMBER"),
        "{text}"
    );
    for m in &mut members {
        m.kill().unwrap();
        m.wait().unwrap();
    }
    let o = slotq(&["--url", &u, "group", "gq", "--group", "bad name"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid group name"), "{}", stderr(&o));
    let o = slotq(&["--url", &u, "consume", "gq", "--group", "{x}"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn rebalance_follows_an_emptied_master_and_plan_simulates_a_thousand() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    assert!(
        slotq(&["--url", u, "push", "follow", "a", "b", "c"])
            .status
            .success()
    );
    assert_eq!(
        stdout(&slotq(&["--url", u, "pop", "follow", "-n", "3"]))
            .lines()
            .count(),
        3
    );
    c.migrate_slots(&c.slots_of(2), 0).unwrap();

    let o = slotq(&["--url", u, "stats", "follow"]);
    assert!(
        stdout(&o).contains("rebalance: would add 0, reactivate 0, drain 1"),
        "{}",
        stdout(&o)
    );
    let o = slotq(&["--url", u, "--json", "rebalance", "follow", "--dry-run"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["drain"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["add"].as_array().unwrap().len(), 0, "{v}");
    let drained = v["drain"][0]["tag"].as_str().unwrap().to_string();

    let o = slotq(&["--url", u, "--json", "rebalance", "follow"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["retired"], serde_json::json!([drained]), "{v}");
    assert_eq!(v["settled"], true);
    let o = slotq(&["--url", u, "rebalance", "follow"]);
    assert!(stdout(&o).contains("balanced"), "{}", stdout(&o));
    let o = slotq(&["--url", u, "--json", "stats", "follow"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["shards"].as_array().unwrap().len(), 2);

    // --watch follows the cluster: slots go back to the emptied master, which gets a
    // shard again without anyone asking.
    let mut watch = Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(["--url", u, "rebalance", "follow", "--watch", "0.3"])
        .env_remove("SLOTQ_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let back: Vec<u16> = c.slots_of(0).into_iter().take(200).collect();
    c.migrate_slots(&back, 2).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = slotq(&["--url", u, "--json", "stats", "follow"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        if v["shards"].as_array().unwrap().len() == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &watch.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(watch.wait().unwrap().success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("added follow#"), "{err}");

    // No server needed to see placement at 1000 masters.
    let o = slotq(&[
        "--json",
        "plan",
        "any",
        "--simulate",
        "1000",
        "--reshard",
        "10",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["shards"], 1000);
    assert_eq!(
        (
            v["shards_per_master_min"].as_u64(),
            v["shards_per_master_max"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(v["reshard"]["add"], v["reshard"]["drain"]);
    for bad in [
        &["plan", "any", "--reshard", "10"][..],
        &["plan", "any", "--simulate", "0"],
        &["plan", "any", "--simulate", "10", "--reshard", "150"],
        &["rebalance", "follow", "--dry-run", "--watch", "1"],
    ] {
        let o = slotq(&[&["--url", u], bad].concat());
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
    }
}

#[test]
fn a_rebalance_stopped_mid_retirement_says_what_it_left_and_the_next_finishes() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    assert!(slotq(&["--url", u, "push", "cut", "a"]).status.success());
    assert!(
        slotq(&["--url", u, "pop", "cut", "-n", "1"])
            .status
            .success()
    );
    c.migrate_slots(&c.slots_of(2), 0).unwrap();
    // The step drains the surplus shard, sets it retiring, and waits two registry polls
    // (2 s) before it looks whether it is empty: stopped in that wait.
    let step = Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(["--url", u, "rebalance", "cut"])
        .env_remove("SLOTQ_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let killed = Command::new("kill")
        .args(["-TERM", &step.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = step.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a cancelled step exits non-zero: {err}"
    );
    assert!(err.contains("cancelled mid-step"), "{err}");
    assert!(err.contains("back to draining: cut#"), "{err}");
    // The next rebalance takes it from there (the lock went with the cancelled one).
    let o = slotq(&["--url", u, "--json", "rebalance", "cut"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["settled"], true, "{v}");
    assert_eq!(v["retired"].as_array().unwrap().len(), 1, "{v}");
}
