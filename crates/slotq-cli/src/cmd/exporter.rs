//! `slotq exporter --listen ADDR [--queue Q ...]`: the queues' gauges for Prometheus.
//!
//! Each scrape of `/metrics` reads every queue's shards in one pipelined round per master
//! (`queue_reads.rs`; queue handles are kept between scrapes), their flows and groups
//! concurrently, and answers in the text format. The queue list is found with `SCAN` (as `slotq queues` does) at most every 30 s,
//! not per scrape: a `SCAN` walks every key of a master. With `--queue`, only those.
//!
//! Gauges (labels): `slotq_queue_depth`, `slotq_queue_in_flight`, `slotq_queue_delayed`,
//! `slotq_queue_dead`, `slotq_queue_oldest_age_seconds`, `slotq_queue_scheduled` (`queue`,
//! `shard`, `node`); `slotq_queue_paused` (`queue`); `slotq_group_members`,
//! `slotq_group_lag` (`queue`, `group`); `slotq_group_member_shards`,
//! `slotq_group_member_lag` (`queue`, `group`, `member`); `slotq_exporter_scrape_seconds`
//! and `slotq_exporter_errors` (queues that could not be read this scrape); counters
//! `slotq_queue_messages_in_total` and `slotq_queue_messages_out_total` (`queue`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slotq::Cluster;
use tokio::sync::Mutex;

use super::http;
use super::queue_reads::{Opened, QueueRead};
use crate::CliError;

/// How long a discovered queue list is used before it is looked for again.
const DISCOVER_EVERY: Duration = Duration::from_secs(30);

struct State {
    cluster: Cluster,
    fixed: Vec<String>,
    found: Mutex<Option<(Instant, Vec<String>)>>,
    /// Queue handles kept between scrapes; one scrape at a time reads through them.
    opened: Mutex<Opened>,
}

/// Serves `/metrics` on `listen` until Ctrl-C or SIGTERM.
pub async fn run(
    cluster: &Cluster,
    listen: std::net::SocketAddr,
    queues: &[String],
) -> Result<String, CliError> {
    for q in queues {
        slotq::placement::validate_queue_name(q)?;
    }
    let listener = http::bind(listen, "exporter", "/metrics").await?;
    let state = Arc::new(State {
        cluster: cluster.clone(),
        fixed: queues.to_vec(),
        found: Mutex::new(None),
        opened: Mutex::new(Opened::new(cluster)),
    });
    let stop = http::stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            stopped = &mut stop => return stopped.map(|()| String::new()),
            accepted = listener.accept() => {
                let Ok((conn, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move { serve(conn, &state).await });
            }
        }
    }
}

/// One HTTP/1.x exchange: `GET /metrics` gets the gauges, anything else a 404.
async fn serve(mut conn: tokio::net::TcpStream, state: &State) {
    let Some(req) = http::read_request(&mut conn).await else {
        return;
    };
    let (status, body) = if req.method == "GET" && req.path == "/metrics" {
        ("200 OK", scrape(state).await)
    } else {
        ("404 Not Found", "not found: try /metrics\n".to_string())
    };
    http::respond(
        &mut conn,
        status,
        "text/plain; version=0.0.4; charset=utf-8",
        body.as_bytes(),
    )
    .await;
}

async fn queue_list(state: &State) -> Vec<String> {
    if !state.fixed.is_empty() {
        return state.fixed.clone();
    }
    let mut found = state.found.lock().await;
    if let Some((at, names)) = found.as_ref()
        && at.elapsed() < DISCOVER_EVERY
    {
        return names.clone();
    }
    match super::inspect::queue_names(&state.cluster).await {
        Ok(names) => {
            *found = Some((Instant::now(), names.clone()));
            names
        }
        Err(e) => {
            tracing::warn!(cause = %e, "listing queues failed");
            found.as_ref().map(|(_, n)| n.clone()).unwrap_or_default()
        }
    }
}

/// One family of samples: its help, its type and its lines.
#[derive(Default)]
struct Family {
    lines: String,
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Reads every queue and renders the gauges.
async fn scrape(state: &State) -> String {
    let started = Instant::now();
    let names = queue_list(state).await;
    let families = [
        ("slotq_queue_depth", "Messages ready in a shard."),
        (
            "slotq_queue_in_flight",
            "At-least-once: messages leased and not settled.",
        ),
        (
            "slotq_queue_delayed",
            "At-least-once: messages waiting for a delayed redelivery.",
        ),
        ("slotq_queue_dead", "At-least-once: dead letters."),
        (
            "slotq_queue_oldest_age_seconds",
            "At-least-once: age of the message at the head of a shard.",
        ),
        (
            "slotq_queue_scheduled",
            "Messages scheduled for later, not due yet.",
        ),
        ("slotq_queue_paused", "1 while the queue is paused."),
        ("slotq_group_members", "Live members of a consumer group."),
        (
            "slotq_group_lag",
            "Messages waiting in the shards a group reads.",
        ),
        ("slotq_group_member_shards", "Shards a group member owns."),
        (
            "slotq_group_member_lag",
            "Messages waiting in the shards a member owns.",
        ),
    ];
    let mut out: Vec<Family> = families.iter().map(|_| Family::default()).collect();
    let mut errors = 0u64;
    let mut flows = (String::new(), String::new());
    let reads = state.opened.lock().await.read_all(&names).await;
    for (name, read) in reads {
        match read {
            Ok(read) => render_queue(&name, &read, &mut out, &mut flows),
            Err(e) => {
                tracing::warn!(queue = %name, cause = %e, "reading the queue failed");
                errors += 1;
            }
        }
    }
    let mut text = String::new();
    for ((fam, help), f) in families.iter().zip(&out) {
        let _ = writeln!(text, "# HELP {fam} {help}\n# TYPE {fam} gauge");
        text.push_str(&f.lines);
    }
    let _ = writeln!(
        text,
        "# HELP slotq_queue_messages_in_total Messages stored by producers (written by each client once a second).\n# TYPE slotq_queue_messages_in_total counter"
    );
    text.push_str(&flows.0);
    let _ = writeln!(
        text,
        "# HELP slotq_queue_messages_out_total Messages taken by consumers (written by each client once a second).\n# TYPE slotq_queue_messages_out_total counter"
    );
    text.push_str(&flows.1);
    let _ = writeln!(
        text,
        "# HELP slotq_exporter_scrape_seconds Time this scrape took.\n# TYPE slotq_exporter_scrape_seconds gauge\nslotq_exporter_scrape_seconds {:.6}",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        text,
        "# HELP slotq_exporter_errors Queues that could not be read in this scrape.\n# TYPE slotq_exporter_errors gauge\nslotq_exporter_errors {errors}"
    );
    text
}

fn render_queue(name: &str, read: &QueueRead, out: &mut [Family], flows: &mut (String, String)) {
    let qn = label(name);
    for s in &read.stats {
        let shard = label(&s.tag);
        let node = s
            .node
            .as_ref()
            .map(|n| label(&n.to_string()))
            .unwrap_or_default();
        let l = format!("{{queue=\"{qn}\",shard=\"{shard}\",node=\"{node}\"}}");
        let mut put = |i: usize, v: Option<f64>| {
            if let Some(v) = v {
                let _ = writeln!(out[i].lines, "{}{l} {v}", FAMILY_NAMES[i]);
            }
        };
        put(0, Some(s.depth as f64));
        put(1, s.in_flight.map(|v| v as f64));
        put(2, s.delayed.map(|v| v as f64));
        put(3, s.dead.map(|v| v as f64));
        put(4, s.oldest_age.map(|a| a.as_secs_f64()));
        put(5, Some(s.scheduled as f64));
    }
    let _ = writeln!(
        out[6].lines,
        "slotq_queue_paused{{queue=\"{qn}\"}} {}",
        u8::from(read.queue.is_paused())
    );
    let _ = writeln!(
        flows.0,
        "slotq_queue_messages_in_total{{queue=\"{qn}\"}} {}",
        read.flow.pushed
    );
    let _ = writeln!(
        flows.1,
        "slotq_queue_messages_out_total{{queue=\"{qn}\"}} {}",
        read.flow.popped
    );
    for (g, st) in &read.groups {
        let gl = format!("queue=\"{qn}\",group=\"{}\"", label(g));
        let lag: u64 = st.shards.iter().map(|s| s.depth).sum();
        let _ = writeln!(
            out[7].lines,
            "slotq_group_members{{{gl}}} {}",
            st.members.len()
        );
        let _ = writeln!(out[8].lines, "slotq_group_lag{{{gl}}} {lag}");
        for m in &st.members {
            let ml = format!("{gl},member=\"{}\"", label(&m.id));
            let mlag: u64 = st
                .shards
                .iter()
                .filter(|s| m.shards.contains(&s.tag))
                .map(|s| s.depth)
                .sum();
            let _ = writeln!(
                out[9].lines,
                "slotq_group_member_shards{{{ml}}} {}",
                m.shards.len()
            );
            let _ = writeln!(out[10].lines, "slotq_group_member_lag{{{ml}}} {mlag}");
        }
    }
}

/// The per-shard families, by index (as in `scrape`).
const FAMILY_NAMES: [&str; 6] = [
    "slotq_queue_depth",
    "slotq_queue_in_flight",
    "slotq_queue_delayed",
    "slotq_queue_dead",
    "slotq_queue_oldest_age_seconds",
    "slotq_queue_scheduled",
];
