//! The JSON report of `slotq bench`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Phase;
use super::rounds::Round;

#[derive(Serialize)]
pub(super) struct Report<'a> {
    pub(super) queue: &'a str,
    pub(super) messages: usize,
    pub(super) size: usize,
    pub(super) producers: usize,
    pub(super) consumers: usize,
    pub(super) keyed: bool,
    pub(super) reliable: bool,
    pub(super) rate: Option<f64>,
    pub(super) duration: Option<f64>,
    pub(super) shards: usize,
    pub(super) phases: Vec<PhaseOut>,
    pub(super) messages_per_node: &'a BTreeMap<String, u64>,
    pub(super) anchor: Option<AnchorOut>,
    pub(super) ratios: Option<Vec<Ratio>>,
    /// The push+pop phase against the concurrent anchor (redis-benchmark pushing and
    /// popping at once): the median of the rounds' ratios.
    pub(super) push_pop_vs_concurrent: Option<f64>,
    /// `--rounds`: every round's anchor and phase rates (one entry for a single round).
    pub(super) rounds: Vec<RoundOut>,
}

/// One phase: throughput, and latency percentiles, consumer shares and the offered
/// rate where the phase measures them.
#[derive(Serialize)]
pub(super) struct PhaseOut {
    phase: &'static str,
    messages: usize,
    secs: f64,
    msgs_per_s: f64,
    latency_us: Option<Latency>,
    consumer_share: Option<Share>,
    target_msgs_per_s: Option<f64>,
    offered_msgs_per_s: Option<f64>,
    /// `--load`: the fraction of the run's push+pop maximum asked for.
    load: Option<f64>,
    /// Open-loop phases: how late the schedule's hand-overs were.
    schedule_late_us: Option<Schedule>,
    /// Open-loop phases: the traffic sent before the measured part, and its latency.
    warm_up: Option<WarmUpOut>,
}

impl PhaseOut {
    pub(super) fn of(p: &Phase) -> PhaseOut {
        PhaseOut {
            phase: p.name,
            messages: p.messages,
            secs: p.secs,
            msgs_per_s: p.rate().round(),
            latency_us: p.latency_us.map(Latency::of),
            consumer_share: p.shares.map(|(min, max)| Share { min, max }),
            target_msgs_per_s: p.offered.map(|o| o.0),
            offered_msgs_per_s: p.offered.map(|o| o.1.round()),
            load: p.load,
            schedule_late_us: p.schedule.map(|l| Schedule {
                max: l.max_us,
                over_1ms: l.over_1ms,
                handovers: l.handovers,
                messages_over_1ms: l.messages_over_1ms,
            }),
            warm_up: p.warm_up.map(|w| WarmUpOut {
                secs: w.secs,
                messages: w.messages,
                latency_us: Latency::of(w.latency_us),
            }),
        }
    }
}

#[derive(Serialize)]
struct Latency {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Latency {
    fn of((p50, p99, p999, max): (u64, u64, u64, u64)) -> Latency {
        Latency {
            p50,
            p99,
            p999,
            max,
        }
    }
}

#[derive(Serialize)]
struct WarmUpOut {
    secs: f64,
    messages: usize,
    latency_us: Latency,
}

#[derive(Serialize)]
struct Schedule {
    max: u64,
    over_1ms: usize,
    handovers: usize,
    /// Measured messages handed over more than 1 ms after their intended send time.
    messages_over_1ms: usize,
}

#[derive(Serialize)]
struct Share {
    min: f64,
    max: f64,
}

#[derive(Serialize)]
pub(super) struct AnchorOut {
    pub(super) push_msgs_per_s: f64,
    pub(super) pop_msgs_per_s: f64,
    /// Pushed and popped at once (the concurrent anchor).
    pub(super) push_pop_msgs_per_s: Option<f64>,
}

#[derive(Serialize)]
pub(super) struct Ratio {
    pub(super) phase: &'static str,
    pub(super) ratio: f64,
}

/// One round of `--rounds`: its anchor, and each phase's rate and ratio to that anchor.
#[derive(Serialize)]
pub(super) struct RoundOut {
    anchor: Option<AnchorOut>,
    phases: Vec<RoundPhase>,
}

#[derive(Serialize)]
struct RoundPhase {
    phase: &'static str,
    msgs_per_s: f64,
    ratio: Option<f64>,
}

impl RoundOut {
    pub(super) fn all(rounds: &[Round]) -> Vec<RoundOut> {
        rounds
            .iter()
            .map(|r| RoundOut {
                anchor: r.anchor.map(|a| AnchorOut {
                    push_msgs_per_s: a.push,
                    pop_msgs_per_s: a.pop,
                    push_pop_msgs_per_s: a.both,
                }),
                phases: r
                    .phases
                    .iter()
                    .map(|p| RoundPhase {
                        phase: p.name,
                        msgs_per_s: p.rate().round(),
                        ratio: r.anchor.map(|a| a.ratio(p)),
                    })
                    .collect(),
            })
            .collect()
    }
}
