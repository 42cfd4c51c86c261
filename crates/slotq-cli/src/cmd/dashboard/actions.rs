//! The dashboard's requests that name a queue: dead letters to look at (always), and,
//! with `--allow-writes`, replaying or purging them, pausing and resuming.

use serde_json::{Value, json};
use slotq::{Client, Cluster, MessageId};

use super::super::http::Request;

/// Dead letters a page asks for at most.
const MAX_DEAD_SHOWN: usize = 200;
/// Payload bytes shown per dead letter.
const PREVIEW_BYTES: usize = 512;

type Reply = (&'static str, Value);

fn bad(why: impl Into<String>) -> Reply {
    ("400 Bad Request", json!({ "error": why.into() }))
}

fn failed(e: slotq::Error) -> Reply {
    let status = match e {
        slotq::Error::QueueNotFound(_) => "404 Not Found",
        slotq::Error::NotReliable(_) => "409 Conflict",
        _ => "502 Bad Gateway",
    };
    (status, json!({ "error": e.to_string() }))
}

async fn open(cluster: &Cluster, name: &str) -> Result<slotq::Queue, Reply> {
    slotq::placement::validate_queue_name(name).map_err(|e| bad(e.to_string()))?;
    Client::from_cluster(cluster.clone())
        .queue(name)
        .must_exist()
        .open()
        .await
        .map_err(failed)
}

/// `GET /api/dead?queue=Q&limit=N`: the oldest dead letters of each shard, up to `limit`
/// in all (50 by default).
pub async fn dead_letters(cluster: &Cluster, req: &Request) -> Reply {
    let Some(name) = req.param("queue") else {
        return bad("name the queue: /api/dead?queue=NAME");
    };
    let limit = match req.param("limit").map(str::parse::<usize>) {
        None => 50,
        Some(Ok(n)) if (1..=MAX_DEAD_SHOWN).contains(&n) => n,
        Some(_) => return bad(format!("limit must be 1..={MAX_DEAD_SHOWN}")),
    };
    let q = match open(cluster, name).await {
        Ok(q) => q,
        Err(r) => return r,
    };
    let letters = match q.dead_letters(limit).await {
        Ok(l) => l,
        Err(e) => return failed(e),
    };
    let items: Vec<Value> = letters
        .iter()
        .take(limit)
        .map(|d| {
            let shown = &d.payload[..d.payload.len().min(PREVIEW_BYTES)];
            json!({
                "shard": d.shard,
                "id": d.id.to_string(),
                "deliveries": d.deliveries,
                "reason": d.reason.to_string(),
                "detail": d.detail,
                "died_ms": d.died_ms,
                "enqueued_ms": d.enqueued_ms,
                "headers": d.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                "bytes": d.payload.len(),
                "preview": String::from_utf8_lossy(shown),
                "binary": std::str::from_utf8(&d.payload).is_err(),
            })
        })
        .collect();
    ("200 OK", json!({ "queue": name, "dead": items }))
}

/// `POST /api/...` with a JSON body naming the queue; refused unless `allowed`
/// (`--allow-writes`).
pub async fn write(cluster: &Cluster, req: &Request, path: &str, allowed: bool) -> Reply {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return bad(format!("the body must be JSON ({e})")),
    };
    let Some(name) = body.get("queue").and_then(Value::as_str) else {
        return bad("the body must name the queue: {\"queue\": NAME}");
    };
    let known = matches!(
        path,
        "/api/dead/replay" | "/api/dead/purge" | "/api/pause" | "/api/resume"
    );
    if !known {
        return (
            "404 Not Found",
            json!({ "error": format!("no such action: {path}") }),
        );
    }
    if !allowed {
        return (
            "403 Forbidden",
            json!({ "error": "read-only: start the dashboard with --allow-writes to change queues" }),
        );
    }
    let q = match open(cluster, name).await {
        Ok(q) => q,
        Err(r) => return r,
    };
    let done = match path {
        "/api/dead/replay" => match body.get("ids").and_then(Value::as_array) {
            Some(ids) => {
                let mut parsed = Vec::with_capacity(ids.len());
                for id in ids {
                    match id.as_str().map(str::parse::<MessageId>) {
                        Some(Ok(id)) => parsed.push(id),
                        _ => return bad(format!("not a message id: {id}")),
                    }
                }
                q.replay_dead_ids(&parsed).await.map(|moved| {
                    let missing: Vec<String> = parsed
                        .iter()
                        .filter(|id| !moved.contains(id))
                        .map(ToString::to_string)
                        .collect();
                    json!({ "replayed": moved.len(), "missing": missing })
                })
            }
            None if body.get("all") == Some(&Value::Bool(true)) => q
                .replay_dead(usize::MAX >> 1)
                .await
                .map(|n| json!({ "replayed": n })),
            None => return bad("say which: {\"ids\": [...]} or {\"all\": true}"),
        },
        "/api/dead/purge" => q.purge_dead().await.map(|n| json!({ "purged": n })),
        "/api/pause" => q
            .pause()
            .await
            .map(|changed| json!({ "paused": true, "changed": changed })),
        _ => q
            .resume()
            .await
            .map(|changed| json!({ "paused": false, "changed": changed })),
    };
    match done {
        Ok(v) => ("200 OK", v),
        Err(e) => failed(e),
    }
}
