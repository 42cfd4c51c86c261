//! `slotq bench`: push only, pop only, then push and pop together, each reported on its
//! own; optionally the same traffic through one plain list with the redis crate's cluster
//! client (the usual way to run a Redis queue on a cluster); or, with `--rate`, traffic at a
//! fixed arrival rate with latencies from each message's intended send time.

mod curve;
mod json_out;
mod priorities;
mod rate;
mod reference;
mod rounds;
mod scheduled;
mod text_out;
mod traffic;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use slotq::{Client, Cluster, Queue};

use crate::CliError;
use crate::args::{BenchArgs, BenchPhase};
use traffic::{consume, nanos_since, payload, produce, write_payload};

/// Messages each producer task hands to the producer per call.
const PRODUCER_CHUNK: usize = 1000;
/// Distinct keys of a keyed run.
const KEYS: u64 = 1000;
/// Bytes of the id + timestamp header every payload starts with.
const HEADER: usize = 16;

/// The figures of one phase.
#[derive(Debug, Clone)]
pub struct Phase {
    name: &'static str,
    messages: usize,
    secs: f64,
    latency_us: Option<(u64, u64, u64, u64)>,
    /// Pop phases: the least and the most one consumer took, as a share of the mean.
    shares: Option<(f64, f64)>,
    /// Open-loop phases: the rate asked for and the rate the messages were handed over at.
    offered: Option<(f64, f64)>,
    /// `--load` phases: the fraction of the run's push+pop maximum asked for.
    load: Option<f64>,
    /// Open-loop phases: how late the schedule's hand-overs were.
    schedule: Option<rate::Lateness>,
    /// Open-loop phases: the traffic before the measured part.
    warm_up: Option<WarmUp>,
}

/// The warm-up of an open-loop phase: sent on the phase's schedule before it is measured.
#[derive(Debug, Clone, Copy)]
pub struct WarmUp {
    secs: f64,
    messages: usize,
    latency_us: (u64, u64, u64, u64),
}

impl Phase {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }
}

/// Runs the benchmark and renders its report.
pub async fn run(
    cluster: &Cluster,
    url: &str,
    args: &BenchArgs,
    as_json: bool,
) -> Result<String, CliError> {
    if args.size < HEADER {
        return Err(CliError::Usage(format!("--size must be at least {HEADER}")));
    }
    if args.messages == 0 || args.producers == 0 || args.consumers == 0 {
        return Err(CliError::Usage(
            "--messages, --producers and --consumers must be at least 1".into(),
        ));
    }
    let name = args.queue.clone().unwrap_or_else(|| {
        format!(
            "bench-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        )
    });
    let mut builder = Client::from_cluster(cluster.clone()).queue(&name);
    if args.reliable {
        builder = builder.reliable();
    }
    let q = builder.open().await?;
    let show = !as_json;
    let start = Instant::now();
    if let Some(counts) = &args.curve {
        if args.rate.is_some() || args.load.is_some() {
            return Err(CliError::Usage(
                "--curve runs closed-loop phases: not with --rate or --load".into(),
            ));
        }
        let out = curve::run(&q, args, counts, as_json).await;
        cleanup(&q).await;
        return out;
    }
    if let Some(n) = args.priorities {
        let out = priorities::run(&q, args, n, as_json).await;
        cleanup(&q).await;
        return out;
    }
    if let Some(n) = args.scheduled {
        let out = scheduled::run(cluster, &q, args, n, as_json).await;
        cleanup(&q).await;
        return out;
    }

    let open_loop = args.rate.is_some() || args.load.is_some();
    if open_loop && args.rounds > 1 {
        return Err(CliError::Usage(
            "--rounds repeats the push, pop and push+pop phases; an open-loop run (--rate, --load) is made longer with --duration".into(),
        ));
    }
    let want = |p: BenchPhase| !open_loop && args.phases.contains(&p);
    let mut per_node = BTreeMap::new();
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if open_loop && !positive(args.duration) {
        return Err(CliError::Usage(
            "--duration must be a positive number".into(),
        ));
    }
    if let Some(rate) = args.rate
        && !positive(rate)
    {
        return Err(CliError::Usage("--rate must be a positive number".into()));
    }
    let duration = Duration::from_secs_f64(args.duration);
    let mut done = Vec::new();
    for round in 1..=args.rounds {
        if show && args.rounds > 1 {
            eprintln!("round {round} of {}", args.rounds);
        }
        let anchor = match &args.anchor {
            Some(script) => Some(reference::run_anchor(script, cluster, args.size, show).await?),
            None => None,
        };
        let mut ran = Vec::new();
        if let Some(rate) = args.rate {
            ran.push(rate::rate_phase(&q, args, rate, duration, show).await?);
        }
        if let Some(loads) = &args.load {
            // The maximum first, then each level at its fraction of it.
            let max = e2e_phase(&q, args, start, show).await?;
            let top = max.rate();
            ran.push(max);
            for &f in loads {
                let mut p = rate::rate_phase(&q, args, top * f, duration, show).await?;
                p.load = Some(f);
                ran.push(p);
            }
        }
        if want(BenchPhase::Push) || want(BenchPhase::Pop) {
            ran.push(push_phase(&q, args, start, show).await?);
            per_node = self::per_node(&q).await?;
        }
        if want(BenchPhase::Pop) {
            ran.push(pop_phase(&q, args, show).await?);
        }
        if want(BenchPhase::E2e) {
            ran.push(e2e_phase(&q, args, start, show).await?);
        }
        done.push(rounds::Round {
            anchor,
            phases: ran,
        });
    }
    let summary = rounds::Summary::of(done);
    let (ran, anchor) = (&summary.phases, summary.anchor);
    let baseline = if args.baseline {
        Some(reference::baseline(url, args, show).await?)
    } else {
        None
    };
    cleanup(&q).await;

    let phases: Vec<&Phase> = ran.iter().chain(baseline.iter().flatten()).collect();
    if as_json {
        let report = json_out::Report {
            queue: &name,
            messages: args.messages,
            size: args.size,
            producers: args.producers,
            consumers: args.consumers,
            keyed: args.keyed,
            reliable: args.reliable,
            rate: args.rate,
            duration: (args.rate.is_some() || args.load.is_some()).then_some(args.duration),
            shards: q.shards().shards.len(),
            phases: phases.iter().map(|p| json_out::PhaseOut::of(p)).collect(),
            messages_per_node: &per_node,
            anchor: anchor.as_ref().map(|a| json_out::AnchorOut {
                push_msgs_per_s: a.push,
                pop_msgs_per_s: a.pop,
                push_pop_msgs_per_s: a.both,
            }),
            push_pop_vs_concurrent: summary.e2e_vs_both(),
            ratios: anchor.map(|_| {
                phases
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        Some(json_out::Ratio {
                            phase: p.name,
                            ratio: summary.ratio_of(i, p)?,
                        })
                    })
                    .collect()
            }),
            rounds: json_out::RoundOut::all(&summary.rounds),
        };
        return Ok(crate::json::line(&report));
    }
    Ok(text_out::render(
        args,
        &phases,
        &summary,
        &per_node,
        q.shards().shards.len(),
    ))
}

pub(super) fn bar(total: usize, label: &str, show: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        Some(total as u64),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    pb.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

async fn push_phase(
    q: &Queue,
    args: &BenchArgs,
    start: Instant,
    show: bool,
) -> Result<Phase, CliError> {
    let pb = bar(args.messages, "push", show);
    let t0 = Instant::now();
    produce(q, args, start, &pb).await?;
    let secs = t0.elapsed().as_secs_f64();
    pb.finish();
    Ok(Phase {
        name: "push",
        messages: args.messages,
        secs,
        latency_us: None,
        shares: None,
        offered: None,
        schedule: None,
        warm_up: None,
        load: None,
    })
}

/// p50, p99, p999 and max of a latency histogram, in microseconds.
pub(super) fn percentiles(h: &Histogram<u64>) -> (u64, u64, u64, u64) {
    (
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    )
}

/// The least and the most of `counts`, as a share of their mean.
pub(super) fn spread(counts: &[usize]) -> Option<(f64, f64)> {
    let mean = counts.iter().sum::<usize>() as f64 / counts.len().max(1) as f64;
    (mean > 0.0).then(|| {
        let min = counts.iter().copied().min().unwrap_or(0) as f64 / mean;
        let max = counts.iter().copied().max().unwrap_or(0) as f64 / mean;
        ((min * 100.0).round() / 100.0, (max * 100.0).round() / 100.0)
    })
}

async fn pop_phase(q: &Queue, args: &BenchArgs, show: bool) -> Result<Phase, CliError> {
    let pb = bar(args.messages, "pop", show);
    let t0 = Instant::now();
    let got = consume(q, args, args.messages, None, &pb).await?;
    let secs = got.last.duration_since(t0).as_secs_f64();
    pb.finish();
    Ok(Phase {
        shares: spread(&got.counts),
        offered: None,
        schedule: None,
        warm_up: None,
        load: None,
        name: "pop",
        messages: args.messages,
        secs,
        latency_us: None,
    })
}

async fn e2e_phase(
    q: &Queue,
    args: &BenchArgs,
    start: Instant,
    show: bool,
) -> Result<Phase, CliError> {
    let pb = bar(args.messages, "push+pop", show);
    let t0 = Instant::now();
    let clock = traffic::Clock {
        origin: start,
        measure_from_ns: 0,
    };
    let consumers = consume(q, args, args.messages, Some(clock), &pb);
    let hidden = ProgressBar::hidden();
    let producers = produce(q, args, start, &hidden);
    let (consumed, produced) = tokio::join!(consumers, producers);
    produced?;
    let got = consumed?;
    let secs = got.last.duration_since(t0).as_secs_f64();
    pb.finish();
    Ok(Phase {
        shares: spread(&got.counts),
        offered: None,
        schedule: None,
        warm_up: None,
        load: None,
        name: "push+pop",
        messages: args.messages,
        secs,
        latency_us: Some(percentiles(&got.latency)),
    })
}

async fn per_node(q: &Queue) -> Result<BTreeMap<String, u64>, CliError> {
    let mut m = BTreeMap::new();
    for s in q.stats().await? {
        *m.entry(s.node.map_or("-".into(), |n| n.to_string()))
            .or_default() += s.depth;
    }
    Ok(m)
}

async fn cleanup(q: &Queue) {
    let cluster = q.cluster();
    let mut cmds: Vec<_> = q
        .shards()
        .shards
        .iter()
        .map(|s| {
            (
                s.slot,
                slotq::redis::cmd("DEL").arg(q.ready_key(&s.tag)).clone(),
            )
        })
        .collect();
    // The registry, and the group the bench's consumers joined (its hash keeps the
    // group's epochs after the last member left).
    let group = format!(
        "{}:{{{}}}:group:{}",
        q.prefix(),
        q.name(),
        slotq::group::DEFAULT_GROUP
    );
    cmds.push((
        slotq::slot::key_slot(q.meta_key()),
        slotq::redis::cmd("DEL")
            .arg(q.meta_key())
            .arg(group)
            .clone(),
    ));
    let _ = cluster.batch(cmds, cluster.default_opts()).await;
}
