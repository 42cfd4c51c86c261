//! `slotq dashboard`: its HTTP answers (token, host, read-only, bad requests), and the page
//! itself driven in the system's headless Chromium (`tests/browser/dashboard.mjs`, with
//! playwright-core): it loads with no console error, shows a queue's depth changing while a
//! producer runs, and a dead letter replayed from the page comes back to its queue. The
//! page's screenshot is kept as `target/artifacts/dashboard.png`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{slotq, text};
use slotq_testkit::ClusterBuilder;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a dashboard on a free port; its address.
fn dashboard(url: &str, extra: &[&str]) -> (Kill, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(["--url", url, "dashboard", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("SLOTQ_URL")
        .env_remove("SLOTQ_DASHBOARD_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("slotq dashboard: http://")
        .and_then(|r| r.strip_suffix('/'))
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_string();
    (Kill(child), addr)
}

/// One request; (status code, body).
fn request(addr: &str, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(head.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// A producer that pushes a line every few milliseconds until dropped.
struct Producer {
    child: Kill,
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<ChildStdin>>,
}

impl Producer {
    fn start(url: &str, queue: &str) -> Producer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_slotq"))
            .args(["--url", url, "push", queue])
            .env_remove("SLOTQ_URL")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                if writeln!(stdin, "message {n}").is_err() {
                    break;
                }
                let _ = stdin.flush();
                n += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            stdin
        });
        Producer {
            child: Kill(child),
            stop,
            writer: Some(writer),
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            drop(w.join());
        }
        let _ = self.child.0.wait();
    }
}

#[test]
fn the_dashboard_answers_only_who_it_should() {
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();
    assert!(
        slotq(&["--url", u, "push", "shown", "a", "b"])
            .status
            .success()
    );
    let (_d, addr) = dashboard(u, &["--token", "s3cret"]);

    // The page itself holds no data: served without the token.
    let (status, page) = request(&addr, "GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(page.contains("<script src=\"/app.js\">"), "{page}");
    // The data needs it, as a header or (for the event stream) a parameter.
    let (status, body) = request(&addr, "GET", "/api/snapshot", &[], "");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("#token="), "{body}");
    let (status, _) = request(&addr, "GET", "/api/snapshot?token=wrong", &[], "");
    assert_eq!(status, 401);
    let (status, body) = request(
        &addr,
        "GET",
        "/api/snapshot",
        &["Authorization: Bearer s3cret"],
        "",
    );
    assert_eq!(status, 200, "{body}");
    let snap = json(&body);
    assert_eq!(snap["masters"].as_array().unwrap().len(), 3, "{body}");
    assert_eq!(snap["writes"], false);
    let shown = snap["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "shown")
        .unwrap_or_else(|| panic!("{body}"));
    let depth: u64 = shown["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["depth"].as_u64().unwrap())
        .sum();
    assert_eq!(depth, 2, "{body}");
    assert_eq!(
        shown["in_total"], 2,
        "push flushes its counts before it exits"
    );

    // A page that names another host (a DNS name rebound to 127.0.0.1) gets nothing.
    let (status, body) = request(
        &addr,
        "GET",
        "/api/snapshot?token=s3cret",
        &["Host: attacker.example:80"],
        "",
    );
    assert_eq!(status, 403, "{body}");

    // Read-only: a write is refused and changes nothing.
    let token = "Authorization: Bearer s3cret";
    let (status, body) = request(
        &addr,
        "POST",
        "/api/pause",
        &[token, "X-Slotq-Action: 1"],
        r#"{"queue":"shown"}"#,
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--allow-writes"), "{body}");
    let o = slotq(&["--url", u, "--json", "stats", "shown"]);
    assert!(
        !text(&o.stdout).contains("\"paused\":true"),
        "{}",
        text(&o.stdout)
    );
    let (status, _) = request(&addr, "GET", "/nowhere", &[], "");
    assert_eq!(status, 404);
}

#[test]
fn a_page_in_a_real_browser_shows_the_queues_and_replays_a_dead_letter() {
    let node_modules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists()
            && node_modules.join("node_modules/playwright-core").exists(),
        "the browser test needs Debian's chromium ({chromium}) and playwright-core in \
         tests/browser/node_modules: `bash tests/run.sh` installs both"
    );
    let c = ClusterBuilder::new().masters(3).start().unwrap();
    let url = c.url();
    let u = url.as_str();

    // A dead letter: one attempt, a handler that fails.
    let o = slotq(&[
        "--url",
        u,
        "push",
        "dl",
        "--reliable",
        "--max-attempts",
        "1",
        "poison",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = slotq(&[
        "--url",
        u,
        "consume",
        "dl",
        "--exec",
        "echo boom >&2; exit 3",
        "--count",
        "1",
    ]);
    assert!(
        text(&o.stderr).contains("dead-lettered"),
        "{}",
        text(&o.stderr)
    );
    let o = slotq(&["--url", u, "--json", "dead", "dl", "list"]);
    let dead = json(&text(&o.stdout));
    let id = dead[0]["id"].as_str().unwrap().to_string();

    // The queue exists before the dashboard looks for queues (it looks again every 10 s).
    assert!(
        slotq(&["--url", u, "push", "busy", "first"])
            .status
            .success()
    );
    let producer = Producer::start(u, "busy");
    let (_d, addr) = dashboard(u, &["--allow-writes"]);

    // Writes: the action header is required, and a write from another origin is refused.
    let (status, _) = request(&addr, "POST", "/api/pause", &[], r#"{"queue":"busy"}"#);
    assert_eq!(status, 403);
    let (status, _) = request(
        &addr,
        "POST",
        "/api/pause",
        &["X-Slotq-Action: 1", "Origin: http://attacker.example"],
        r#"{"queue":"busy"}"#,
    );
    assert_eq!(status, 403);
    let action = "X-Slotq-Action: 1";
    let (status, body) = request(&addr, "POST", "/api/dead/replay", &[action], "{not json");
    assert_eq!(status, 400, "{body}");
    let (status, body) = request(
        &addr,
        "POST",
        "/api/dead/replay",
        &[action],
        r#"{"queue":"dl","ids":["nothex"]}"#,
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = request(&addr, "GET", "/api/dead?queue=nosuch", &[], "");
    assert_eq!(status, 404, "{body}");
    let unknown = "00000000000000000000000000000001";
    let (status, body) = request(
        &addr,
        "POST",
        "/api/dead/replay",
        &[action],
        &format!(r#"{{"queue":"dl","ids":["{unknown}"]}}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["missing"][0], unknown, "{body}");
    let (status, body) = request(&addr, "GET", "/api/dead?queue=dl", &[], "");
    assert_eq!(status, 200);
    let listed = json(&body);
    assert_eq!(listed["dead"][0]["id"], id.as_str(), "{body}");
    assert_eq!(listed["dead"][0]["reason"], "failed", "{body}");

    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let run = Command::new("node")
        .arg("dashboard.mjs")
        .arg(format!("http://{addr}/"))
        .args(["busy", "dl", &id])
        .arg(&shot)
        .current_dir(&node_modules)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("node runs");
    drop(producer);
    assert!(
        run.status.success(),
        "browser: {}\n{}",
        text(&run.stdout),
        text(&run.stderr)
    );
    let seen = json(text(&run.stdout).lines().last().unwrap_or("{}"));
    assert_eq!(seen["consoleErrors"], serde_json::json!([]));
    assert_eq!(seen["masters"], 3);
    assert_eq!(seen["deadReason"], "failed");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot was kept"
    );

    // The replayed message is back in its queue, and no longer dead.
    let o = slotq(&["--url", u, "--json", "dead", "dl", "list"]);
    assert_eq!(json(&text(&o.stdout)), serde_json::json!([]));
    let o = slotq(&["--url", u, "pop", "dl", "--ack"]);
    assert_eq!(text(&o.stdout), "poison\n", "{}", text(&o.stderr));
}
