//! Queue commands: `push`, `pop`, `stats`, `plan`, `expand`.

use std::time::Duration;

use slotq::placement::{self, ShardState};
use slotq::{Client, Cluster};

use crate::CliError;
use crate::output::{RawOut, table};

/// What `pop` and `consume` write.
#[derive(Debug, Clone, Copy)]
pub struct OutputFormat {
    /// NUL after each payload instead of a newline (`-0`).
    pub null: bool,
    /// A JSON document instead of raw payloads.
    pub json: bool,
}

/// Writes a batch of messages to standard output as it arrives; on an at-least-once
/// queue with `ack`, acknowledges exactly those written. If the output fails, gives back
/// what was not written (and what the consumer still holds) and returns the error.
pub async fn write_batch(
    out: &mut RawOut,
    consumer: &mut slotq::Consumer,
    batch: Vec<slotq::Message>,
    null: bool,
    ack: bool,
) -> Result<(), CliError> {
    let sep = if null { 0 } else { b'\n' };
    let (n, error) = out.write_items(batch.iter().map(|m| &m.payload[..]), sep);
    if ack {
        consumer.ack_all(&batch[..n]).await?;
    }
    match error {
        None => Ok(()),
        Some(error) => Err(give_back(consumer, &batch[n..], error).await),
    }
}

/// Gives back `unwritten` (the caller then closes the consumer, which gives back what it
/// popped and did not hand out); the error to return.
pub async fn give_back(
    consumer: &mut slotq::Consumer,
    unwritten: &[slotq::Message],
    error: std::io::Error,
) -> CliError {
    match consumer.release_all(unwritten).await {
        Ok(_) => CliError::Output {
            error,
            given_back: unwritten.len(),
        },
        Err(e) => CliError::Other(format!(
            "writing output: {error}; and giving back {} message(s) not written failed: {e}",
            unwritten.len()
        )),
    }
}

/// `slotq pop QUEUE [-n N] [--wait SECS]`: writes each batch as it arrives.
/// Most messages a `pop` asks of one shard per round.
const POP_ROUND_PER_SHARD: usize = 1000;

pub async fn pop(
    cluster: &Cluster,
    queue: &str,
    count: usize,
    wait: f64,
    ack: bool,
    format: OutputFormat,
) -> Result<String, CliError> {
    if count == 0 {
        return Err(CliError::Usage("-n must be at least 1".into()));
    }
    if !(0.0..=86_400.0).contains(&wait) {
        return Err(CliError::Usage(
            "--wait must be between 0 and 86400 seconds".into(),
        ));
    }
    let q = open_existing(cluster, queue).await?;
    let reliable = q.mode() != slotq::DeliveryMode::AtMostOnce;
    if ack && !reliable {
        return Err(CliError::Usage(format!(
            "--ack needs an at-least-once queue; {queue} is at-most-once (pops are final)"
        )));
    }
    let mut out = RawOut::stdout().map_err(|error| CliError::Output {
        error,
        given_back: 0,
    })?;
    // Popped and written in rounds of at most POP_ROUND_PER_SHARD a shard: memory stays
    // bounded however many are asked for (100,000 at once held 63 MB, now 15 MB).
    let per_shard = count
        .div_ceil(q.shards().shards.len().max(1))
        .clamp(1, POP_ROUND_PER_SHARD);
    // A one-off pop reads every shard itself: it takes no shards from a running group.
    let mut consumer = q.consumer().without_group().pop_batch(per_shard).build()?;
    let wait = Duration::from_secs_f64(wait).max(Duration::from_millis(1));
    let mut taken = 0usize;
    let mut kept = Vec::new();
    while taken < count {
        let got = consumer
            .recv_batch_timeout(
                count - taken,
                if taken == 0 {
                    wait
                } else {
                    Duration::from_millis(1)
                },
            )
            .await?;
        if got.is_empty() {
            if taken == 0 && q.is_paused() {
                eprintln!("{queue} is paused: nothing popped (slotq resume {queue})");
            }
            break;
        }
        taken += got.len();
        if format.json {
            kept.extend(got);
        } else if let Err(e) = write_batch(&mut out, &mut consumer, got, format.null, ack).await {
            consumer.close().await;
            return Err(e);
        }
    }
    if format.json {
        let items: Vec<crate::json::Message<'_>> = kept
            .iter()
            .map(|m| crate::json::Message {
                shard: &m.shard,
                id: m.id.map(|i| i.to_string()),
                attempt: Some(m.attempt),
                headers: crate::json::Headers::of(m.headers()),
                expires_ms: m.expires_ms(),
                priority: q.shards().priorities.then(|| m.priority().as_str()),
                payload: crate::json::Payload::of(&m.payload),
            })
            .collect();
        let text = crate::json::line(&items);
        if let Err(error) = out.write_all(text.as_bytes()) {
            let e = give_back(&mut consumer, &kept, error).await;
            consumer.close().await;
            return Err(e);
        }
        if ack {
            consumer.ack_all(&kept).await?;
        }
    }
    if reliable {
        if !ack && taken > 0 {
            eprintln!(
                "{taken} message(s) leased, not acknowledged: they return when the lease expires (use --ack)"
            );
        }
        // Whatever the consumer popped beyond `count` must not sit out a lease.
        let mut rest = Vec::new();
        while let Ok(more) = consumer
            .recv_batch_timeout(10_000, Duration::from_millis(1))
            .await
        {
            if more.is_empty() {
                break;
            }
            rest.extend(more);
        }
        if !rest.is_empty() {
            consumer.release_all(&rest).await?;
        }
    }
    consumer.close().await;
    // Counted messages reach the queue's totals before the process exits.
    let _ = q.flush_flow().await;
    Ok(String::new())
}

/// `slotq stats QUEUE`.
pub async fn stats(cluster: &Cluster, queue: &str, as_json: bool) -> Result<String, CliError> {
    let q = open_existing(cluster, queue).await?;
    let stats = q.stats().await?;
    let total: u64 = stats.iter().map(|s| s.depth).sum();
    let set = q.shards();
    // What a rebalance would change on the cluster as it is now.
    let plan = q.rebalance_plan().await?;
    let idle = set
        .shards
        .iter()
        .filter(|s| s.state != ShardState::Active)
        .count();
    if as_json {
        let shards = stats
            .iter()
            .map(|s| crate::json::Shard {
                tag: s.tag.clone(),
                slot: s.slot,
                node: s.node.as_ref().map(|n| n.to_string()),
                state: state(s.state),
                depth: s.depth,
                in_flight: s.in_flight,
                delayed: s.delayed,
                dead: s.dead,
                oldest_age_ms: s.oldest_age.map(|a| a.as_millis() as u64),
                scheduled: s.scheduled,
            })
            .collect();
        return Ok(crate::json::line(&crate::json::Stats {
            queue,
            version: set.version,
            shards,
            total_depth: total,
            paused: set.paused,
            cleanup: set.cleanup.iter().map(|n| format!("{queue}#{n}")).collect(),
            rebalance: crate::json::RebalanceHint {
                add: plan.add.len(),
                reactivate: plan.reactivate.len(),
                drain: plan.drain.len(),
                retire_when_empty: idle,
            },
        }));
    }
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.tag.clone(),
                s.slot.to_string(),
                s.node.as_ref().map_or("-".into(), |n| n.to_string()),
                state(s.state).into(),
                s.depth.to_string(),
                opt(s.in_flight),
                opt(s.delayed),
                opt(s.dead),
                s.oldest_age
                    .map_or("-".into(), |a| format!("{:.1}s", a.as_secs_f64())),
                s.scheduled.to_string(),
            ]
        })
        .collect();
    let mode = match set.mode {
        slotq::DeliveryMode::AtMostOnce => "at-most-once".to_string(),
        slotq::DeliveryMode::AtLeastOnce { max_attempts } => {
            format!("at-least-once, {max_attempts} attempts")
        }
    };
    let leftovers = if set.cleanup.is_empty() {
        String::new()
    } else {
        format!(
            "leftovers of removed shard(s) {} not moved yet (a retirement cut short): slotq rebalance {queue} moves them\n",
            set.cleanup
                .iter()
                .map(|n| format!("{queue}#{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let advice = if plan.is_empty() && idle == 0 {
        leftovers
    } else {
        format!(
            "rebalance: would add {}, reactivate {}, drain {}; {idle} shard(s) draining, retired once empty (slotq rebalance {queue})\n{leftovers}",
            plan.add.len(),
            plan.reactivate.len(),
            plan.drain.len()
        )
    };
    let scheduled: u64 = stats.iter().map(|s| s.scheduled).sum();
    let scheduled_note = if scheduled > 0 {
        format!(", {scheduled} scheduled for later")
    } else {
        String::new()
    };
    let paused = if set.paused {
        ", PAUSED (slotq resume to resume)"
    } else {
        ""
    };
    Ok(format!(
        "queue {queue}: {} shards, {mode}{paused}, registry version {}\n\n{}\ntotal depth {total}{}\n{advice}",
        stats.len(),
        set.version,
        table(
            &[
                "SHARD",
                "SLOT",
                "NODE",
                "STATE",
                "DEPTH",
                "IN-FLIGHT",
                "DELAYED",
                "DEAD",
                "OLDEST",
                "SCHEDULED"
            ],
            &rows
        ),
        scheduled_note
    ))
}

/// `slotq plan QUEUE`: the placement a new queue would get (and, for an existing queue,
/// what `expand` would add).
pub async fn plan(
    cluster: &Cluster,
    queue: &str,
    shards_per_master: u32,
    as_json: bool,
) -> Result<String, CliError> {
    placement::validate_queue_name(queue)?;
    if shards_per_master == 0 {
        return Err(CliError::Usage(
            "--shards-per-master must be at least 1".into(),
        ));
    }
    let topology = cluster.topology();
    let existing = Client::from_cluster(cluster.clone())
        .queue(queue)
        .must_exist()
        .open()
        .await;
    let (kind, shards) = match existing {
        Ok(q) => {
            let set = q.shards();
            let add = placement::extend_plan(queue, &topology, set.shards_per_master, &set.shards);
            ("expand", add)
        }
        Err(slotq::Error::QueueNotFound(_)) => (
            "create",
            placement::plan(queue, &topology, shards_per_master),
        ),
        Err(e) => return Err(e.into()),
    };
    let rows: Vec<(String, u16, String)> = shards
        .iter()
        .map(|s| {
            let node = topology.owner(s.slot).map_or("-".into(), |n| n.to_string());
            (s.tag.clone(), s.slot, node)
        })
        .collect();
    if as_json {
        let shards = rows
            .iter()
            .map(|(t, s, n)| crate::json::PlannedShard {
                tag: t.clone(),
                slot: *s,
                node: n.clone(),
            })
            .collect();
        return Ok(crate::json::line(&crate::json::Planned {
            queue,
            action: kind,
            shards,
        }));
    }
    if rows.is_empty() {
        return Ok(format!(
            "queue {queue} exists and every master has its shards: nothing to add\n"
        ));
    }
    let verb = if kind == "create" {
        "would be created with"
    } else {
        "would gain"
    };
    let body: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(t, s, n)| vec![t, s.to_string(), n])
        .collect();
    Ok(format!(
        "queue {queue} {verb} {} shard(s) (dry run, nothing written):\n\n{}",
        body.len(),
        table(&["SHARD", "SLOT", "MASTER"], &body)
    ))
}

/// `slotq expand QUEUE`.
pub async fn expand(cluster: &Cluster, queue: &str, as_json: bool) -> Result<String, CliError> {
    let q = open_existing(cluster, queue).await?;
    let report = q.expand().await?;
    Ok(if as_json {
        crate::json::line(&crate::json::Expanded {
            queue,
            added: &report.added,
            version: report.version,
        })
    } else if report.added.is_empty() {
        format!(
            "queue {queue}: every master already has its shards (version {})\n",
            report.version
        )
    } else {
        format!(
            "queue {queue}: added {} (version {})\n",
            report.added.join(", "),
            report.version
        )
    })
}

/// How a shard state is shown.
pub(crate) fn state(s: ShardState) -> &'static str {
    match s {
        ShardState::Active => "active",
        ShardState::Draining => "draining",
        ShardState::Retiring => "retiring",
    }
}

/// Opens a queue that must already exist (exit code 4 otherwise).
pub async fn open_existing(cluster: &Cluster, queue: &str) -> Result<slotq::Queue, CliError> {
    Ok(Client::from_cluster(cluster.clone())
        .queue(queue)
        .must_exist()
        .open()
        .await?)
}

/// `slotq stats QUEUE --watch SECS`: redraws in place on a terminal, one block (or JSON
/// line) per refresh otherwise; stops on Ctrl-C or after `count` refreshes.
pub async fn watch(
    cluster: &Cluster,
    queue: &str,
    every: f64,
    count: Option<u32>,
    as_json: bool,
) -> Result<String, CliError> {
    use std::io::{IsTerminal, Write};
    if !(0.05..=3600.0).contains(&every) {
        return Err(CliError::Usage("--watch takes 0.05 to 3600 seconds".into()));
    }
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout();
    let mut n = 0u32;
    loop {
        let text = stats(cluster, queue, as_json).await?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let frame = if as_json {
            text
        } else if tty {
            // Home the cursor and clear the screen, then draw.
            format!(
                "\x1b[H\x1b[2J{text}\nrefreshing every {every} s (unix time {stamp}), Ctrl-C to stop\n"
            )
        } else {
            format!("{text}\n")
        };
        out.write_all(frame.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| CliError::Other(e.to_string()))?;
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(String::new());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(every)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(String::new()),
        }
    }
}

/// `slotq pause QUEUE` / `slotq resume QUEUE`.
pub async fn set_paused(
    cluster: &Cluster,
    queue: &str,
    pause: bool,
    as_json: bool,
) -> Result<String, CliError> {
    let q = open_existing(cluster, queue).await?;
    let changed = if pause {
        q.pause().await?
    } else {
        q.resume().await?
    };
    if as_json {
        return Ok(crate::json::line(&crate::json::PauseChange {
            queue,
            paused: pause,
            changed,
        }));
    }
    Ok(match (pause, changed) {
        (true, true) => format!(
            "paused {queue}: consumers take nothing new within a registry poll (1 s); producers go on sending\n"
        ),
        (true, false) => format!("{queue} was paused already\n"),
        (false, true) => format!("resumed {queue}\n"),
        (false, false) => format!("{queue} was not paused\n"),
    })
}
