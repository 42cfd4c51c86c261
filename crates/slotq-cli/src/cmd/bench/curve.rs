//! `slotq bench --curve 1,4,16,64,256`: the same traffic with each consumer count in turn,
//! in one command, so that throughput and balance can be compared across counts measured
//! minutes apart at most. Per count and round: a push phase (not reported), a pop phase
//! draining it, and a push+pop phase; each row gives the median of the rounds and every
//! round's figure, and the least and most one consumer took as a share of the mean (the
//! median round's). The queue is emptied between counts.

use std::time::Instant;

use serde::Serialize;
use slotq::Queue;

use super::{Phase, e2e_phase, pop_phase, push_phase};
use crate::CliError;
use crate::args::BenchArgs;

/// One consumer count's figures.
#[derive(Debug, Serialize)]
pub struct Point {
    /// Consumers.
    pub consumers: usize,
    /// Pop: median msgs/s, and each round's.
    pub pop: f64,
    /// Pop rounds.
    pub pop_rounds: Vec<f64>,
    /// Pop: least and most one consumer took, as a share of the mean (median round).
    pub pop_shares: Option<(f64, f64)>,
    /// Push+pop: median msgs/s.
    pub push_pop: f64,
    /// Push+pop rounds.
    pub push_pop_rounds: Vec<f64>,
    /// Push+pop shares (median round).
    pub push_pop_shares: Option<(f64, f64)>,
}

fn median_of(phases: &[Phase]) -> (f64, Vec<f64>, Option<(f64, f64)>) {
    let rates: Vec<f64> = phases.iter().map(Phase::rate).collect();
    let mut order: Vec<usize> = (0..phases.len()).collect();
    order.sort_by(|&a, &b| rates[a].total_cmp(&rates[b]));
    let mid = order[order.len() / 2];
    (rates[mid], rates, phases[mid].shares)
}

/// Runs the curve and renders it.
pub async fn run(
    q: &Queue,
    args: &BenchArgs,
    counts: &[usize],
    as_json: bool,
) -> Result<String, CliError> {
    let show = !as_json;
    let start = Instant::now();
    let mut points = Vec::new();
    for &c in counts {
        if c == 0 {
            return Err(CliError::Usage("--curve counts must be at least 1".into()));
        }
        let mut a = args.clone();
        a.consumers = c;
        let (mut pops, mut boths) = (Vec::new(), Vec::new());
        for round in 1..=args.rounds {
            if show {
                eprintln!("{c} consumer(s), round {round} of {}", args.rounds);
            }
            push_phase(q, &a, start, show).await?;
            pops.push(pop_phase(q, &a, show).await?);
            boths.push(e2e_phase(q, &a, start, show).await?);
        }
        let (pop, pop_rounds, pop_shares) = median_of(&pops);
        let (push_pop, push_pop_rounds, push_pop_shares) = median_of(&boths);
        points.push(Point {
            consumers: c,
            pop,
            pop_rounds,
            pop_shares,
            push_pop,
            push_pop_rounds,
            push_pop_shares,
        });
    }
    if as_json {
        return Ok(crate::json::line(&points));
    }
    let m = |r: f64| format!("{:.2}", r / 1e6);
    let shares = |s: Option<(f64, f64)>| s.map_or("-".into(), |(a, b)| format!("{a:.2}-{b:.2}"));
    let rows: Vec<Vec<String>> = points
        .iter()
        .map(|p| {
            vec![
                p.consumers.to_string(),
                m(p.pop),
                p.pop_rounds
                    .iter()
                    .map(|r| m(*r))
                    .collect::<Vec<_>>()
                    .join(" "),
                shares(p.pop_shares),
                m(p.push_pop),
                p.push_pop_rounds
                    .iter()
                    .map(|r| m(*r))
                    .collect::<Vec<_>>()
                    .join(" "),
                shares(p.push_pop_shares),
            ]
        })
        .collect();
    Ok(format!(
        "slotq bench --curve: {} messages of {} bytes a phase, {} producer(s), {} shard(s), {} round(s) per count (M msgs/s)\n{}",
        args.messages,
        args.size,
        args.producers,
        q.shards().shards.len(),
        args.rounds,
        crate::output::table(
            &[
                "CONSUMERS",
                "POP",
                "POP ROUNDS",
                "POP SHARES",
                "PUSH+POP",
                "PUSH+POP ROUNDS",
                "PUSH+POP SHARES"
            ],
            &rows
        )
    ))
}
