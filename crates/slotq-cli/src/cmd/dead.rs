//! `slotq dead QUEUE list|replay|purge`: the dead letters of an at-least-once queue, each
//! with why and when it died; and `slotq cancel QUEUE ID...`, the other command that acts
//! on messages by id.

use std::time::{Duration, UNIX_EPOCH};

use slotq::{Cluster, MessageId};

use super::queue::open_existing;
use crate::CliError;
use crate::args::DeadAction;
use crate::output::table;

/// Runs one `dead` action.
pub async fn run(
    cluster: &Cluster,
    queue: &str,
    action: DeadAction,
    count: usize,
    ids: &[String],
    as_json: bool,
) -> Result<String, CliError> {
    // Ids are checked before anything is read or moved.
    let ids = parse_ids(ids)?;
    if !ids.is_empty() && !matches!(action, DeadAction::Replay) {
        return Err(CliError::Usage("--id goes with `replay` only".into()));
    }
    let q = open_existing(cluster, queue).await?;
    match action {
        DeadAction::List => list(&q, queue, count, as_json).await,
        DeadAction::Replay if ids.is_empty() => {
            let n = q.replay_dead(count).await?;
            Ok(if as_json {
                crate::json::line(&crate::json::Replayed {
                    replayed: n,
                    not_found: Vec::new(),
                })
            } else {
                format!("{n} dead letter(s) moved back into {queue}\n")
            })
        }
        DeadAction::Replay => {
            let moved = q.replay_dead_ids(&ids).await?;
            let missing: Vec<String> = ids
                .iter()
                .filter(|id| !moved.contains(id))
                .map(|id| id.to_string())
                .collect();
            if !missing.is_empty() {
                return Err(CliError::NotFound(format!(
                    "{} of {} dead letter(s) moved back into {queue}; not among its dead \
                     letters (never there, or replayed or purged already): {}",
                    moved.len(),
                    ids.len(),
                    missing.join(", ")
                )));
            }
            Ok(if as_json {
                crate::json::line(&crate::json::Replayed {
                    replayed: moved.len() as u64,
                    not_found: missing,
                })
            } else {
                format!("{} dead letter(s) moved back into {queue}\n", moved.len())
            })
        }
        DeadAction::Purge => {
            let n = q.purge_dead().await?;
            Ok(if as_json {
                crate::json::line(&crate::json::Purged { purged: n })
            } else {
                format!("{n} dead letter(s) deleted from {queue}\n")
            })
        }
    }
}

async fn list(
    q: &slotq::Queue,
    queue: &str,
    count: usize,
    as_json: bool,
) -> Result<String, CliError> {
    let dead = q.dead_letters(count).await?;
    if as_json {
        // Payloads that are not UTF-8 show as base64, as everywhere.
        let items: Vec<crate::json::DeadLetter<'_>> = dead
            .iter()
            .map(|d| crate::json::DeadLetter {
                shard: &d.shard,
                id: d.id.to_string(),
                deliveries: d.deliveries,
                enqueued_ms: d.enqueued_ms,
                reason: d.reason.as_str(),
                detail: &d.detail,
                died_ms: d.died_ms,
                headers: crate::json::Headers::of(&d.headers),
                payload: crate::json::Payload::of(&d.payload),
            })
            .collect();
        return Ok(crate::json::line(&items));
    }
    let rows: Vec<Vec<String>> = dead
        .iter()
        .map(|d| {
            vec![
                d.shard.clone(),
                d.id.to_string(),
                d.deliveries.to_string(),
                d.reason.to_string(),
                d.died_ms.map_or_else(|| "-".into(), when),
                one_line(&d.detail, 60),
                one_line(&String::from_utf8_lossy(&d.payload), 60),
            ]
        })
        .collect();
    Ok(format!(
        "{} dead letter(s) in {queue}\n\n{}",
        rows.len(),
        table(
            &[
                "SHARD",
                "ID",
                "DELIVERIES",
                "REASON",
                "DIED (UTC)",
                "DETAIL",
                "PAYLOAD"
            ],
            &rows
        )
    ))
}

/// A time as `2026-12-07T18:00:00Z` (seconds).
fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Text on one line of a table: control characters (newlines of a stderr tail) as spaces,
/// at most `max` characters, "..." when cut.
fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.chars().count() <= max {
        return flat.to_string();
    }
    let mut out: String = flat.chars().take(max - 3).collect();
    out.push_str("...");
    out
}

/// `slotq cancel QUEUE ID...`: cancels scheduled messages not due yet.
pub async fn cancel(
    cluster: &Cluster,
    queue: &str,
    ids: &[String],
    as_json: bool,
) -> Result<String, CliError> {
    // Ids are checked before anything is cancelled.
    let ids = parse_ids(ids)?;
    let q = open_existing(cluster, queue).await?;
    let done = q.cancel(&ids).await?;
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !done.contains(id))
        .map(|id| id.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(CliError::NotFound(format!(
            "cancelled {} of {} message(s) of {queue}; not waiting (due and delivered \
             already, cancelled before, or never scheduled): {}",
            done.len(),
            ids.len(),
            missing.join(", ")
        )));
    }
    Ok(if as_json {
        crate::json::line(&crate::json::Cancelled {
            cancelled: done.iter().map(|id| id.to_string()).collect(),
        })
    } else {
        format!("cancelled {} scheduled message(s) of {queue}\n", done.len())
    })
}

/// Message ids as typed (32 hex digits each); the first bad one is the error.
fn parse_ids(ids: &[String]) -> Result<Vec<MessageId>, CliError> {
    Ok(ids
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, slotq::Error>>()?)
}
