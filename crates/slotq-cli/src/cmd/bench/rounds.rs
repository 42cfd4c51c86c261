//! Repeated rounds of a closed-loop bench (`--rounds N`): each round runs the anchor (if
//! asked) and then the phases, so that slotq and the anchor are measured side by side N
//! times, and the report gives each ratio's median with every round's figure beside it.
//!
//! Why: on a shared two-core machine the same work takes 20-40% more CPU time in one run
//! than in the next (the same commands, the same replies), and a phase of a second or two
//! catches that whole. A ratio from one anchor and one phase carries both runs' luck; the
//! median of interleaved rounds is the figure that repeats.

use super::Phase;
use super::reference::Anchor;

/// What one round measured.
pub(super) struct Round {
    pub(super) anchor: Option<Anchor>,
    pub(super) phases: Vec<Phase>,
}

impl Round {
    /// Each phase's ratio to this round's anchor.
    fn ratios(&self) -> Option<Vec<f64>> {
        let a = self.anchor?;
        Some(self.phases.iter().map(|p| a.ratio(p)).collect())
    }
}

/// The rounds, summed up: per phase, the round whose rate is the median, and the median
/// of the ratios.
pub(super) struct Summary {
    /// Per phase, the phase of the round whose rate was the median (the lower median for
    /// an even number of rounds): a phase as measured, not a blend of several.
    pub(super) phases: Vec<Phase>,
    /// The median of the anchor's push rates and of its pop rates.
    pub(super) anchor: Option<Anchor>,
    /// Per phase, the median of its ratios to the anchor of its own round.
    pub(super) ratios: Option<Vec<f64>>,
    /// Every round, in the order run.
    pub(super) rounds: Vec<Round>,
}

impl Summary {
    /// Sums up `rounds`: every round ran the same phases in the same order.
    pub(super) fn of(rounds: Vec<Round>) -> Summary {
        let first = rounds.first().map_or(0, |r| r.phases.len());
        debug_assert!(rounds.iter().all(|r| r.phases.len() == first));
        let phases = (0..first)
            .map(|i| {
                let mut these: Vec<&Phase> = rounds.iter().map(|r| &r.phases[i]).collect();
                these.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
                these[(these.len() - 1) / 2].clone()
            })
            .collect();
        let anchors: Vec<Anchor> = rounds.iter().filter_map(|r| r.anchor).collect();
        let anchor = (!anchors.is_empty()).then(|| Anchor {
            push: median(anchors.iter().map(|a| a.push).collect()),
            pop: median(anchors.iter().map(|a| a.pop).collect()),
            both: {
                let both: Vec<f64> = anchors.iter().filter_map(|a| a.both).collect();
                (!both.is_empty()).then(|| median(both))
            },
        });
        let per_round: Option<Vec<Vec<f64>>> = rounds.iter().map(Round::ratios).collect();
        let ratios = per_round.map(|per_round| {
            (0..first)
                .map(|i| median(per_round.iter().map(|r| r[i]).collect()))
                .collect()
        });
        Summary {
            phases,
            anchor,
            ratios,
            rounds,
        }
    }

    /// The ratio to report for phase `i` of the report: the median of its rounds' ratios
    /// for the rounds' phases; for phases run once after them (the baseline), its ratio to
    /// the anchor's median.
    pub(super) fn ratio_of(&self, i: usize, p: &Phase) -> Option<f64> {
        match (&self.ratios, self.anchor) {
            (Some(r), _) if i < r.len() => Some(r[i]),
            (_, Some(a)) => Some(a.ratio(p)),
            _ => None,
        }
    }

    /// Phase `i`'s figure in every round: its ratio to that round's anchor, or its rate
    /// (messages a second) without an anchor.
    pub(super) fn by_round(&self, i: usize) -> Vec<f64> {
        self.rounds
            .iter()
            .map(|r| match r.anchor {
                Some(a) => a.ratio(&r.phases[i]),
                None => r.phases[i].rate(),
            })
            .collect()
    }

    /// The push+pop phase against the concurrent anchor: the median of its rounds' ratios
    /// to their own round's concurrent anchor.
    pub(super) fn e2e_vs_both(&self) -> Option<f64> {
        let per: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|r| {
                let a = r.anchor?;
                r.phases.iter().find_map(|p| a.ratio_both(p))
            })
            .collect();
        (!per.is_empty()).then(|| median(per))
    }

    /// What one round of `by_round` means.
    pub(super) fn by_round_unit(&self) -> &'static str {
        if self.ratios.is_some() {
            "x anchor"
        } else {
            "msgs/s"
        }
    }
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(name: &'static str, secs: f64) -> Phase {
        Phase {
            name,
            messages: 1_000_000,
            secs,
            latency_us: None,
            shares: None,
            offered: None,
            load: None,
            schedule: None,
            warm_up: None,
        }
    }

    fn round(push_anchor: f64, push_secs: f64, e2e_secs: f64) -> Round {
        Round {
            anchor: Some(Anchor {
                push: push_anchor,
                pop: 2.0 * push_anchor,
                both: None,
            }),
            phases: vec![phase("push", push_secs), phase("push+pop", e2e_secs)],
        }
    }

    #[test]
    fn one_round_is_itself() {
        let s = Summary::of(vec![round(1e6, 1.0, 2.0)]);
        assert_eq!(s.phases.len(), 2);
        assert_eq!(s.phases[1].secs, 2.0);
        let r = s.ratios.as_ref().expect("an anchor was run");
        assert!((r[0] - 1.0).abs() < 1e-9 && (r[1] - 0.5).abs() < 1e-9);
        assert_eq!(s.by_round(1), vec![0.5]);
    }

    #[test]
    fn the_median_round_is_a_measured_phase_and_ratios_are_per_round() {
        // Round ratios for push+pop: 1e6/2/1e6 = 0.5, 1e6/1.25/2e6 = 0.4, 1e6/1/1e6 = 1.0.
        let s = Summary::of(vec![
            round(1e6, 1.0, 2.0),
            round(2e6, 1.0, 1.25),
            round(1e6, 1.0, 1.0),
        ]);
        // The median push+pop rate is the 1.25 s round's: that phase, unchanged.
        assert_eq!(s.phases[1].secs, 1.25);
        let r = s.ratios.as_ref().expect("an anchor was run");
        assert!(
            (r[1] - 0.5).abs() < 1e-9,
            "median of 0.5, 0.4, 1.0: {}",
            r[1]
        );
        // The anchor's median, op by op.
        let a = s.anchor.expect("an anchor was run");
        assert_eq!((a.push, a.pop), (1e6, 2e6));
        assert_eq!(s.by_round(1), vec![0.5, 0.4, 1.0]);
    }

    #[test]
    fn without_an_anchor_rounds_give_rates() {
        let s = Summary::of(vec![
            Round {
                anchor: None,
                phases: vec![phase("pop", 0.5)],
            },
            Round {
                anchor: None,
                phases: vec![phase("pop", 0.25)],
            },
        ]);
        assert!(s.ratios.is_none() && s.anchor.is_none());
        assert_eq!(s.by_round(0), vec![2e6, 4e6]);
        assert_eq!(s.by_round_unit(), "msgs/s");
        // Two rounds: the lower median is the slower one.
        assert_eq!(s.phases[0].secs, 0.5);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
