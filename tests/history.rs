//! Member processes of a consumer group and the history they leave: who processed what,
//! when; and the checker that reads it (per key, the order of first processing).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// `(ns since the epoch, payload, member)` for every processing.
pub type Done = Arc<Mutex<Vec<(u128, String, usize)>>>;

/// A new, empty history.
pub fn history() -> Done {
    Arc::new(Mutex::new(Vec::new()))
}

/// A member process of `group` (`tests/bin/consumer.rs`, mode `group-work`; `exe` is its
/// path, `env!("CARGO_BIN_EXE_slotq-test-consumer")` in a test): a random pause of up to
/// `pause_ms` per message, then `DONE <ns> <payload>`, then its ack.
pub fn group_member(
    exe: &str,
    url: &str,
    queue: &str,
    lease_ms: u64,
    pause_ms: u64,
    group: &str,
    ordered: bool,
) -> Child {
    group_member_from(exe, url, queue, lease_ms, pause_ms, group, ordered, None)
}

/// [`group_member`], its connections made from `source` (an address of its own that a
/// partition can cut off) when given.
#[allow(clippy::too_many_arguments)]
pub fn group_member_from(
    exe: &str,
    url: &str,
    queue: &str,
    lease_ms: u64,
    pause_ms: u64,
    group: &str,
    ordered: bool,
    source: Option<&str>,
) -> Child {
    let mut cmd = Command::new(exe);
    if let Some(ip) = source {
        cmd.env("SLOTQ_TEST_SOURCE_IP", ip);
    }
    cmd.args([
        url,
        queue,
        &lease_ms.to_string(),
        "group-work",
        &pause_ms.to_string(),
        group,
        if ordered { "1" } else { "0" },
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("consumer process starts")
}

/// Collects the `DONE <ns> <payload>` lines of member `who` into `into`, from a thread.
pub fn collect(child: &mut Child, who: usize, into: &Done) {
    let out = child.stdout.take().expect("a piped stdout");
    let into = into.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let mut parts = line.splitn(3, ' ');
            if let (Some("DONE"), Some(ns), Some(p)) = (parts.next(), parts.next(), parts.next()) {
                into.lock()
                    .unwrap()
                    .push((ns.parse().unwrap(), p.to_string(), who));
            }
        }
    });
}

/// Distinct payloads processed so far.
pub fn distinct(done: &Done) -> usize {
    done.lock()
        .unwrap()
        .iter()
        .map(|(_, p, _)| p.as_str())
        .collect::<HashSet<_>>()
        .len()
}

/// What a history of `<key>:<seq>` payloads shows.
pub struct Checked {
    /// Distinct messages processed.
    pub distinct: usize,
    /// Processings, repeats included.
    pub processings: usize,
    /// Messages first processed after a later one of their key.
    pub violations: Vec<String>,
}

/// Reads a history of `<key>:<seq>` payloads (seq from 0 per key): per key, the order in
/// which messages were first processed (repeats may come in any order; they never count).
pub fn check(done: &Done) -> Checked {
    let mut events = done.lock().unwrap().clone();
    events.sort();
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut seen = HashSet::new();
    let mut violations = Vec::new();
    for (_, p, who) in &events {
        let (key, seq) = p.split_once(':').expect("<key>:<seq>");
        let seq: usize = seq.parse().expect("a sequence number");
        let n = next.entry(key.to_string()).or_insert(0);
        if seen.insert(p.clone()) {
            if seq != *n {
                violations.push(format!(
                    "{key}: {seq} first processed (by {who}) before {n}"
                ));
            }
            *n = (*n).max(seq + 1);
        }
    }
    Checked {
        distinct: seen.len(),
        processings: events.len(),
        violations,
    }
}
