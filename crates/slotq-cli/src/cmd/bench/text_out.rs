//! The text report of `slotq bench`.

use std::collections::BTreeMap;

use super::Phase;
use super::rounds::Summary;
use crate::args::BenchArgs;
use crate::output::table;

/// Renders the report: the phases (each round's median with `--rounds`), the open-loop
/// schedule and warm-up lines, and where the push phase left the messages.
pub(super) fn render(
    args: &BenchArgs,
    phases: &[&Phase],
    summary: &Summary,
    per_node: &BTreeMap<String, u64>,
    shards: usize,
) -> String {
    let anchor = summary.anchor;
    let several = summary.rounds.len() > 1;
    let rows: Vec<Vec<String>> = phases
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let lat = |f: fn(&(u64, u64, u64, u64)) -> u64| {
                p.latency_us.as_ref().map_or("-".into(), |l| fmt_us(f(l)))
            };
            let mut row = vec![
                match p.load {
                    Some(f) => format!("{} {}%", p.name, f * 100.0),
                    None => p.name.to_string(),
                },
                p.messages.to_string(),
                format!("{:.3}", p.secs),
                format!("{:.0}", p.rate()),
                lat(|l| l.0),
                lat(|l| l.1),
                lat(|l| l.2),
                summary
                    .ratio_of(i, p)
                    .map_or("-".into(), |r| format!("{r:.2}")),
            ];
            if several {
                row.push(if i < summary.phases.len() {
                    let each = summary.by_round(i).into_iter();
                    match summary.ratios {
                        Some(_) => each.map(|r| format!("{r:.2}")).collect::<Vec<_>>(),
                        None => each.map(|r| format!("{:.2}M", r / 1e6)).collect(),
                    }
                    .join(" ")
                } else {
                    "-".into()
                });
            }
            row
        })
        .collect();
    let nodes: Vec<Vec<String>> = per_node
        .iter()
        .map(|(n, c)| vec![n.clone(), c.to_string()])
        .collect();
    let what = match (args.rate, &args.load) {
        (Some(rate), _) => format!(
            "open loop: {rate:.0} msgs/s for {} s (latency from each message's intended send time)",
            args.duration
        ),
        (None, Some(_)) => format!(
            "open loop at fractions of the push+pop maximum measured first ({} messages), {} s each (latency from each message's intended send time)",
            args.messages, args.duration
        ),
        (None, None) => format!("{} messages", args.messages),
    };
    // Open loop: how late the schedule itself was (a stall of the machine shows here too),
    // and the warm-up sent before each measured phase.
    let schedule: String = phases
        .iter()
        .filter_map(|p| {
            let name = match p.load {
                Some(f) => format!("{} {}%", p.name, f * 100.0),
                None => p.name.to_string(),
            };
            let warm = p.warm_up.map(|w| {
                format!(
                    "warm-up of {name}: {} messages in {} s before it, not in the table: p50 {} p99 {} p999 {}\n",
                    w.messages,
                    w.secs,
                    fmt_us(w.latency_us.0),
                    fmt_us(w.latency_us.1),
                    fmt_us(w.latency_us.2)
                )
            });
            p.schedule.map(|l| {
                format!(
                    "{}schedule of {name}: hand-overs up to {} late, {} of {} over 1 ms; {} of {} messages ({:.2}%) handed over more than 1 ms late\n",
                    warm.unwrap_or_default(),
                    fmt_us(l.max_us),
                    l.over_1ms,
                    l.handovers,
                    l.messages_over_1ms,
                    p.messages,
                    100.0 * l.messages_over_1ms as f64 / p.messages.max(1) as f64
                )
            })
        })
        .collect();
    let placement = if per_node.is_empty() {
        String::new()
    } else {
        format!(
            "\nmessages per node after the push phase:\n{}",
            table(&["NODE", "MESSAGES"], &nodes)
        )
    };
    format!(
        "slotq bench: {what} of {} bytes, {} producers, {} consumers, {}, {} shards\n{}\n{}{schedule}{placement}",
        args.size,
        args.producers,
        args.consumers,
        match (args.keyed, args.reliable) {
            (false, false) => "unkeyed",
            (true, false) => "keyed",
            (false, true) => "unkeyed, at-least-once (lease + ack)",
            (true, true) => "keyed, at-least-once (lease + ack)",
        },
        shards,
        match (anchor, several) {
            (None, _) => String::new(),
            (Some(a), false) => format!(
                "anchor (redis-benchmark, same cluster, this run): push {:.0} msgs/s, pop {:.0} msgs/s{}\n",
                a.push,
                a.pop,
                both_line(a.both, summary.e2e_vs_both())
            ),
            (Some(a), true) => format!(
                "anchor (redis-benchmark, same cluster, before each round; medians): push {:.0} msgs/s, pop {:.0} msgs/s{}\n",
                a.push,
                a.pop,
                both_line(a.both, summary.e2e_vs_both())
            ),
        },
        if several {
            let by_round = format!("BY ROUND ({})", summary.by_round_unit());
            let header = [
                "PHASE", "MESSAGES", "SECONDS", "MSGS/S", "P50", "P99", "P999", "X ANCHOR",
                &by_round,
            ];
            format!(
                "{} rounds: each phase's row is its median round, X ANCHOR the median of the rounds' ratios\n{}",
                summary.rounds.len(),
                table(&header, &rows)
            )
        } else {
            table(
                &[
                    "PHASE", "MESSAGES", "SECONDS", "MSGS/S", "P50", "P99", "P999", "X ANCHOR",
                ],
                &rows,
            )
        },
    )
}

/// The concurrent anchor, and the push+pop phase against it (X ANCHOR of push+pop is
/// against the push anchor).
fn both_line(both: Option<f64>, ratio: Option<f64>) -> String {
    match (both, ratio) {
        (Some(b), Some(r)) => {
            format!(", push+pop at once {b:.0} msgs/s (push+pop phase: {r:.2}x of that)")
        }
        (Some(b), None) => format!(", push+pop at once {b:.0} msgs/s"),
        _ => String::new(),
    }
}

pub(super) fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{us}µs")
    }
}
