//! `slotq dashboard --listen ADDR`: a web page served by the CLI, its assets built into the
//! binary (no CDN, no Node at run time).
//!
//! One task reads the cluster and every queue once a second (`snapshot.rs`) while someone
//! watches (a page connected, or a request in the last minute), whatever the number of
//! pages; each page gets the picture as it changes over server-sent events
//! (`/api/events`), and `/api/snapshot` gives it once. Dead letters are read on demand.
//!
//! Safety, because a browser is not a terminal:
//! - Read-only unless started with `--allow-writes` (replay and purge dead letters, pause
//!   and resume); a write is a `POST` with the header `X-Slotq-Action: 1`, which a page of
//!   another origin cannot send without a CORS preflight this server never grants, and
//!   whose `Origin`, when present, must be this server.
//! - Listening on a loopback address (the default), requests must name a loopback host
//!   (`Host`), so a DNS name rebound to 127.0.0.1 gets nothing.
//! - `--token T` (or `SLOTQ_DASHBOARD_TOKEN`): every `/api/` request carries it
//!   (`Authorization: Bearer T`, or `?token=T` for the event stream); the page reads it
//!   from its address's fragment (`#token=T`), which browsers never send to a server.

mod actions;
mod assets;
mod snapshot;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use slotq::Cluster;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::http::{self, Request};
use crate::CliError;

/// How often the picture is read.
const POLL: Duration = Duration::from_secs(1);
/// How long the picture keeps being read after the last request, with no page connected.
const IDLE_AFTER: Duration = Duration::from_secs(60);
/// How often the queue list is looked for again (a `SCAN` of every master).
const DISCOVER_EVERY: Duration = Duration::from_secs(10);

/// How the dashboard was started.
pub struct Options {
    pub listen: std::net::SocketAddr,
    pub queues: Vec<String>,
    pub allow_writes: bool,
    pub token: Option<String>,
}

pub(crate) struct State {
    cluster: Cluster,
    opts: Options,
    latest: watch::Receiver<Arc<String>>,
    /// Ms since the epoch of the last request (for `IDLE_AFTER`).
    last_request: AtomicU64,
}

/// Serves the dashboard until Ctrl-C or SIGTERM.
pub async fn run(cluster: &Cluster, opts: Options) -> Result<String, CliError> {
    for q in &opts.queues {
        slotq::placement::validate_queue_name(q)?;
    }
    if opts.token.as_deref().is_some_and(str::is_empty) {
        return Err(CliError::Usage("--token must not be empty".into()));
    }
    let listener = http::bind(opts.listen, "dashboard", "/").await?;
    if !opts.listen.ip().is_loopback() && opts.token.is_none() {
        eprintln!(
            "warning: listening on {} with no --token: anyone who reaches it sees every queue",
            opts.listen
        );
    }
    let (tx, rx) = watch::channel(Arc::new(String::new()));
    let state = Arc::new(State {
        cluster: cluster.clone(),
        opts,
        latest: rx,
        last_request: AtomicU64::new(snapshot::now_ms()),
    });
    let reader = tokio::spawn(read_loop(state.clone(), tx));
    let stop = http::stop_signal();
    tokio::pin!(stop);
    let result = loop {
        tokio::select! {
            stopped = &mut stop => break stopped.map(|()| String::new()),
            accepted = listener.accept() => {
                let Ok((conn, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move { serve(conn, &state).await });
            }
        }
    };
    reader.abort();
    result
}

/// Reads the picture once a poll while someone watches, and publishes it.
async fn read_loop(state: Arc<State>, tx: watch::Sender<Arc<String>>) {
    let mut rates = snapshot::Rates::default();
    let mut opened = super::queue_reads::Opened::new(&state.cluster);
    let mut names: Option<(std::time::Instant, Vec<String>)> = None;
    loop {
        let started = std::time::Instant::now();
        let idle = snapshot::now_ms().saturating_sub(state.last_request.load(Ordering::Relaxed))
            > IDLE_AFTER.as_millis() as u64;
        // `tx` holds no receiver of its own beyond the state's.
        if tx.receiver_count() > 1 || !idle {
            let list = match (&state.opts.queues, &names) {
                (fixed, _) if !fixed.is_empty() => fixed.clone(),
                (_, Some((at, found))) if at.elapsed() < DISCOVER_EVERY => found.clone(),
                _ => match super::inspect::queue_names(&state.cluster).await {
                    Ok(found) => {
                        names = Some((std::time::Instant::now(), found.clone()));
                        found
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, "listing queues failed");
                        names.as_ref().map(|n| n.1.clone()).unwrap_or_default()
                    }
                },
            };
            let snap = snapshot::read(
                &state.cluster,
                &mut opened,
                &list,
                &mut rates,
                state.opts.allow_writes,
            )
            .await;
            let json = serde_json::to_string(&snap).unwrap_or_else(|_| "{}".into());
            tx.send_replace(Arc::new(json));
        }
        tokio::time::sleep(POLL.saturating_sub(started.elapsed())).await;
    }
}

/// One request.
async fn serve(mut conn: TcpStream, state: &State) {
    let Some(req) = http::read_request(&mut conn).await else {
        return;
    };
    state
        .last_request
        .store(snapshot::now_ms(), Ordering::Relaxed);
    if let Err((status, why)) = admit(&req, state) {
        return json_reply(&mut conn, status, &serde_json::json!({ "error": why })).await;
    }
    if req.method == "GET"
        && let Some((content_type, body)) = assets::by_path(&req.path)
    {
        return http::respond(&mut conn, "200 OK", content_type, body.as_bytes()).await;
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/favicon.ico") => {
            http::respond(&mut conn, "204 No Content", "text/plain", b"").await
        }
        ("GET", "/api/snapshot") => {
            let json = current(state).await;
            http::respond(&mut conn, "200 OK", "application/json", json.as_bytes()).await
        }
        ("GET", "/api/events") => events(conn, state).await,
        ("GET", "/api/dead") => {
            let (status, body) = actions::dead_letters(&state.cluster, &req).await;
            json_reply(&mut conn, status, &body).await
        }
        ("POST", path) if path.starts_with("/api/") => {
            let (status, body) =
                actions::write(&state.cluster, &req, path, state.opts.allow_writes).await;
            json_reply(&mut conn, status, &body).await
        }
        _ => {
            json_reply(
                &mut conn,
                "404 Not Found",
                &serde_json::json!({ "error": format!("no such page: {}", req.path) }),
            )
            .await
        }
    }
}

/// The latest picture, waiting briefly for the first one.
async fn current(state: &State) -> Arc<String> {
    let mut rx = state.latest.clone();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|json| !json.is_empty()),
    )
    .await;
    let json = rx.borrow().clone();
    if json.is_empty() {
        Arc::new("{}".into())
    } else {
        json
    }
}

/// Server-sent events: the picture each time it changes, a comment every 15 s so that
/// proxies keep the stream open; ends when the page goes away.
async fn events(mut conn: TcpStream, state: &State) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n";
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut rx = state.latest.clone();
    rx.mark_changed();
    loop {
        match tokio::time::timeout(Duration::from_secs(15), rx.changed()).await {
            Ok(Ok(())) => {
                let json = rx.borrow_and_update().clone();
                if json.is_empty() {
                    continue;
                }
                let frame = format!("data: {json}\n\n");
                if conn.write_all(frame.as_bytes()).await.is_err() {
                    return;
                }
            }
            Ok(Err(_)) => return,
            Err(_) => {
                if conn.write_all(b": keep-alive\n\n").await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Checks the host, the token and, for writes, the action header and origin.
fn admit(req: &Request, state: &State) -> Result<(), (&'static str, String)> {
    if state.opts.listen.ip().is_loopback() {
        let host = req.header("host").unwrap_or("");
        let name = host
            .rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(host, |(name, _)| name);
        if !matches!(name, "127.0.0.1" | "localhost" | "[::1]" | "") && !is_loopback_v4(name) {
            return Err((
                "403 Forbidden",
                format!(
                    "host {host:?} is not this machine: open the dashboard by its loopback address"
                ),
            ));
        }
    }
    if !req.path.starts_with("/api/") {
        return Ok(());
    }
    if let Some(token) = &state.opts.token {
        let given = req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .or_else(|| req.param("token"))
            .unwrap_or("");
        if !same(given.as_bytes(), token.as_bytes()) {
            return Err((
                "401 Unauthorized",
                "a token is needed: open the page as http://HOST:PORT/#token=TOKEN".into(),
            ));
        }
    }
    if req.method == "POST" {
        if req.header("x-slotq-action") != Some("1") {
            return Err((
                "403 Forbidden",
                "writes need the header X-Slotq-Action: 1".into(),
            ));
        }
        if let Some(origin) = req.header("origin") {
            let host = req.header("host").unwrap_or("");
            let ours = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|o| o == host);
            if !ours {
                return Err((
                    "403 Forbidden",
                    format!("a write from another origin ({origin}) is refused"),
                ));
            }
        }
    }
    Ok(())
}

fn is_loopback_v4(name: &str) -> bool {
    name.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn json_reply(conn: &mut TcpStream, status: &str, body: &serde_json::Value) {
    http::respond(
        conn,
        status,
        "application/json",
        body.to_string().as_bytes(),
    )
    .await
}
