//! Lanes: one per shard, holding the batches waiting for it and what the producer knows
//! of its depth; and the choice of a lane for unkeyed messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use super::batch::Batch;
use crate::slot::Slot;

#[derive(Default)]
pub(super) struct Lanes {
    pub(super) version: u64,
    pub(super) by_tag: HashMap<String, Arc<Lane>>,
    pub(super) active: Vec<Arc<Lane>>,
}

pub(super) struct Lane {
    pub(super) tag: String,
    pub(super) slot: Slot,
    pub(super) key: String,
    /// The shard's depth at the last snapshot, less this producer's messages that had
    /// landed by then: what others put there (or took away).
    pub(super) base: AtomicI64,
    /// This producer's messages the shard has acknowledged, ever.
    pub(super) landed: AtomicI64,
    /// Messages this producer queued for the shard and not yet heard back about. Choices
    /// count them, so the chunks of one big batch spread before any reply comes back.
    pub(super) pending: AtomicI64,
    pub(super) state: Mutex<LaneState>,
}

impl Lane {
    /// The depth the shard will have once what is queued lands, as far as this producer
    /// knows: the last snapshot, plus its own messages since.
    pub(super) fn estimate(&self) -> i64 {
        self.base.load(Ordering::Relaxed)
            + self.landed.load(Ordering::Relaxed)
            + self.pending.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub(super) struct LaneState {
    pub(super) open: Batch,
    pub(super) sealed: VecDeque<Batch>,
    pub(super) flushing: bool,
}

/// Unkeyed messages placed on a lane per choice. A tenth of a default batch: 200,000
/// messages on 30 shards are 6,667 a shard, so a grain of 1,000 could leave one shard 15%
/// over the mean; 100 keeps it within 1.5% for one producer.
pub(crate) const CHOICE_SPAN: usize = 100;

/// Most lanes one unkeyed choice compares. A queue of up to this many active shards is
/// scanned whole (the least-loaded lane wins, ties going to one at random); a larger one
/// compares this many distinct lanes drawn at random. One choice is made per
/// [`CHOICE_SPAN`] messages, so a scan of 64 estimates costs a few nanoseconds a message.
pub(crate) const MAX_CHOICES: usize = 64;

/// The lane an unkeyed chunk goes to: the least `estimate` among the lanes of `pool` (all
/// of them, or [`MAX_CHOICES`] drawn at random from a larger pool).
///
/// Why not two random choices: a producer places a whole `send_batch` before any reply
/// comes back; two (or four) random choices let a shard take a few chunks more than its
/// share. The least of all, counting what this producer queued and has in flight, keeps
/// every shard within one chunk of the others for a single producer. Many producers do not
/// pile onto one shard because an estimate never mixes fresh and stale figures: every
/// shard's depth comes from one snapshot, and each producer adds only its own messages,
/// which it spreads evenly, as do the others (see the simulation in the tests).
pub(crate) fn least_loaded(
    pool: &[usize],
    estimate: impl Fn(usize) -> i64,
    rng: &mut impl rand::Rng,
) -> usize {
    assert!(!pool.is_empty(), "a choice needs at least one lane");
    let n = pool.len();
    let sample;
    let candidates: &[usize] = if n <= MAX_CHOICES {
        pool
    } else {
        sample = rand::seq::index::sample(rng, n, MAX_CHOICES)
            .into_iter()
            .map(|k| pool[k])
            .collect::<Vec<usize>>();
        &sample
    };
    // The least estimate; ties go to one of them uniformly at random (reservoir sampling),
    // so that producers with the same figures do not favour the same lanes.
    let mut best = candidates[0];
    let mut best_estimate = estimate(best);
    let mut ties = 1u32;
    for &i in &candidates[1..] {
        let e = estimate(i);
        if e < best_estimate {
            (best, best_estimate, ties) = (i, e, 1);
        } else if e == best_estimate {
            ties += 1;
            if rng.random_range(0..ties) == 0 {
                best = i;
            }
        }
    }
    best
}

/// Most of a later snapshot's news one producer acts on (see [`fold_snapshot`]).
pub(crate) const MAX_GAIN: f64 = 0.25;

/// What the previous snapshot saw.
#[derive(Debug, Default)]
pub(crate) struct SnapshotHistory {
    /// No snapshot yet.
    taken: bool,
    /// Sum of the shards' depths.
    total: i64,
    /// Sum of this producer's landed messages then.
    landed: i64,
}

/// Folds a snapshot of the shards' `depths` into the lanes' `base` figures (a shard's depth
/// less this producer's `landed` messages).
///
/// The first snapshot is taken as it is, but for a `dead_band` (one push): a producer
/// alone on shards of unequal depth fills the shallow ones first, and a producer starting
/// while others send does not take their pushes, landed a whole push at a time, for shards
/// of unequal depth (four producers each sending one batch of 50,000 on 30 shards, a
/// little apart, ended up to 1.2 apart without it; see the test below). A later one is news about the other producers and consumers,
/// and every producer reads the same news: if each corrected a shard's whole deficit, n
/// producers would put n deficits on it and the next snapshot would show it n-1 deficits
/// deep (each period the swing grows). So each acts on its own share of the growth since
/// the previous snapshot (its landed messages over the total growth; all of it when
/// nothing else grew), and at most [`MAX_GAIN`] of it: the deviations of `base` from their
/// mean move that far toward the snapshot's. Sixteen producers with equal shares correct
/// one deficit together; consumers popping make the share look larger, which the cap
/// bounds.
pub(crate) fn fold_snapshot(
    history: &mut SnapshotHistory,
    base: &mut [i64],
    depths: &[i64],
    landed: &[i64],
    dead_band: i64,
) {
    let n = base.len();
    if n == 0 || depths.len() != n || landed.len() != n {
        return;
    }
    let raw: Vec<i64> = depths.iter().zip(landed).map(|(d, l)| d - l).collect();
    let total: i64 = depths.iter().sum();
    let landed_total: i64 = landed.iter().sum();
    if !history.taken {
        // Within `dead_band` of the shallowest shard, a shard counts as level with it:
        // other producers' pushes land a whole push at a time, so a snapshot taken while
        // they send shows shards a push apart that will end level; a deeper shard keeps
        // its lead beyond the band, and the shallow ones are filled first.
        let floor = raw.iter().copied().min().unwrap_or(0);
        for (b, r) in base.iter_mut().zip(&raw) {
            *b = floor + (r - floor - dead_band).max(0);
        }
    } else {
        let own = (landed_total - history.landed).max(0) as f64;
        let others = ((total - history.total) as f64 - own).max(0.0);
        let share = if others == 0.0 {
            1.0
        } else {
            own / (own + others)
        };
        let gain = share.min(MAX_GAIN);
        let mean = |v: &[i64]| v.iter().sum::<i64>() as f64 / n as f64;
        let (mean_raw, mean_base) = (mean(&raw), mean(base));
        for (b, r) in base.iter_mut().zip(&raw) {
            let old = *b as f64 - mean_base;
            let new = *r as f64 - mean_raw;
            *b = (mean_raw + (1.0 - gain) * old + gain * new).round() as i64;
        }
    }
    *history = SnapshotHistory {
        taken: true,
        total,
        landed: landed_total,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use std::collections::VecDeque;

    const CHUNK: i64 = CHOICE_SPAN as i64;
    /// The producer's dead band: one push of the default size.
    const DEAD_BAND: i64 = 10 * CHUNK;

    /// `producers` producers place `chunks` chunks round-robin on `initial.len()` shards.
    /// Each estimates a shard as the producer does: the depth at its last snapshot (taken
    /// at the start and every `snapshot_every` of its own placements, all shards at once)
    /// plus its own chunks since, landed or in flight. A push lands `latency` placements
    /// after it was chosen. Returns the shards' final depths.
    fn simulate(
        initial: &[i64],
        producers: usize,
        chunks: usize,
        latency: usize,
        snapshot_every: usize,
        seed: u64,
    ) -> Vec<i64> {
        let n = initial.len();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut real = initial.to_vec();
        let mut history: Vec<SnapshotHistory> =
            (0..producers).map(|_| SnapshotHistory::default()).collect();
        let mut base = vec![vec![0i64; n]; producers];
        let mut mine = vec![vec![0i64; n]; producers]; // landed + in flight
        let mut landed = vec![vec![0i64; n]; producers];
        let mut flying: VecDeque<(usize, usize, usize)> = VecDeque::new(); // (due, producer, lane)
        let pool: Vec<usize> = (0..n).collect();
        for t in 0..chunks + latency {
            while flying.front().is_some_and(|f| f.0 <= t) {
                let (_, p, lane) = flying.pop_front().unwrap();
                real[lane] += CHUNK;
                landed[p][lane] += CHUNK;
            }
            if t < chunks {
                let p = t % producers;
                if (t / producers).is_multiple_of(snapshot_every) {
                    fold_snapshot(&mut history[p], &mut base[p], &real, &landed[p], DEAD_BAND);
                }
                let lane = least_loaded(&pool, |i| base[p][i] + mine[p][i], &mut rng);
                mine[p][lane] += CHUNK;
                flying.push_back((t + latency, p, lane));
            }
        }
        real
    }

    /// What four producers each sending one batch of 50,000 do on 30 shards: producer
    /// `p` starts `p * stagger` ticks late, reads the depths once (its first snapshot),
    /// and places all its chunks at once; a shard's chunks then land together, up to
    /// `lump` at once (one push per lane in flight, chunks merged into it), each shard
    /// every `latency` ticks at a phase of its own. A late producer's snapshot sees the others' pushes
    /// landed unevenly: some shards a push or two ahead of the rest, for a moment.
    fn simulate_batches(latency: usize, stagger: usize, dead_band: i64, seed: u64) -> Vec<i64> {
        // Thirty shards, four producers of 500 chunks (50,000 messages), pushes of ten.
        let (n, producers, per_producer, lump) = (30, 4, 500, 10);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut real = vec![0i64; n];
        let mut queued = vec![0usize; n];
        let pool: Vec<usize> = (0..n).collect();
        let mut t = 0;
        let mut started = 0;
        while started < producers || queued.iter().any(|&q| q > 0) {
            if started < producers && t == started * stagger {
                let mut history = SnapshotHistory::default();
                let mut base = vec![0i64; n];
                fold_snapshot(&mut history, &mut base, &real, &vec![0; n], dead_band);
                let mut mine = vec![0i64; n];
                for _ in 0..per_producer {
                    let lane = least_loaded(&pool, |i| base[i] + mine[i], &mut rng);
                    mine[lane] += CHUNK;
                    queued[lane] += 1;
                }
                started += 1;
            }
            for (lane, q) in queued.iter_mut().enumerate() {
                if (t + lane * latency / n).is_multiple_of(latency) {
                    let k = lump.min(*q);
                    *q -= k;
                    real[lane] += k as i64 * CHUNK;
                }
            }
            t += 1;
        }
        real
    }

    /// Four producers sending one batch of 50,000 each (chunks of 100, pushes of up to
    /// 1,000) on 30 shards, starting a little apart: a late starter's first snapshot does
    /// not take the others' unevenly landed pushes for shards of unequal depth (without
    /// the dead band: up to 1.2 here, and 1.16 once in the real-cluster test under load).
    #[test]
    fn a_late_producer_does_not_fill_what_others_have_in_flight() {
        let (mut worst_with, mut worst_without) = (0.0f64, 0.0f64);
        for seed in 0..20 {
            for stagger in [1, 5, 20, 50, 100] {
                let with = simulate_batches(100, stagger, DEAD_BAND, seed);
                let without = simulate_batches(100, stagger, 0, seed);
                worst_with = worst_with.max(skew(&with));
                worst_without = worst_without.max(skew(&without));
            }
        }
        eprintln!("worst skew: {worst_with:.3} with a dead band, {worst_without:.3} without");
        assert!(worst_with <= 1.05, "{worst_with}");
    }

    fn skew(d: &[i64]) -> f64 {
        let mean = d.iter().sum::<i64>() as f64 / d.len() as f64;
        *d.iter().max().unwrap() as f64 / mean
    }

    proptest! {
        /// One producer, however many chunks it has in flight: every shard ends within one
        /// chunk of the others, once the chunks have filled the shallow shards up, except
        /// for what its first snapshot's dead band takes as level: a shard up to a push
        /// (ten chunks) deeper than the shallowest keeps that lead.
        #[test]
        fn one_producer_keeps_shards_within_a_chunk(
            n in 1usize..=64,
            latency in 1usize..200,
            extra in prop::collection::vec(0i64..40, 64),
            per_shard in 2usize..12,
            seed in any::<u64>(),
        ) {
            let initial: Vec<i64> = extra[..n].iter().map(|e| e * CHUNK).collect();
            let filled: i64 = initial.iter().map(|d| initial.iter().max().unwrap() - d).sum();
            let chunks = (filled / CHUNK) as usize + per_shard * n;
            let d = simulate(&initial, 1, chunks, latency, usize::MAX, seed);
            let spread = d.iter().max().unwrap() - d.iter().min().unwrap();
            let was = initial.iter().max().unwrap() - initial.iter().min().unwrap();
            prop_assert!(spread <= CHUNK + was.min(DEAD_BAND), "{d:?} from {initial:?}");
        }

        /// Many producers, each blind to the others' writes between snapshots, however
        /// many chunks each has in flight: 2,000 chunks of 100 (200,000 messages) on 3 to
        /// 30 shards end within 1.10 of the mean with up to 8 producers, 1.15 with up to
        /// 16 (each then places only a few chunks per shard: independent choices are
        /// uneven by a chunk or two). A producer snapshots once a second, and what it sent
        /// lands well within that: a snapshot comes after at least as many of its own
        /// placements as it has in flight, and after at least 200 (20,000 messages: a
        /// second's worth for a producer sending 20,000 a second).
        #[test]
        fn many_producers_stay_within_ten_percent(
            n in 3usize..=30,
            producers in 1usize..=16,
            in_flight in 1usize..300,
            periods in 1usize..10,
            floor in 200usize..1000,
            seed in any::<u64>(),
        ) {
            let snapshot_every = (in_flight * periods).max(floor);
            let d = simulate(&vec![0; n], producers, 2000, producers * in_flight, snapshot_every, seed);
            let bound = if producers <= 8 { 1.10 } else { 1.15 };
            prop_assert!(skew(&d) <= bound, "skew {} {d:?}", skew(&d));
        }
    }

    #[test]
    fn a_large_pool_compares_a_sample() {
        let pool: Vec<usize> = (0..1000).collect();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        // Lane 999 is the only empty one: a sample of 64 of 1000 misses it most times.
        let hits = (0..1000)
            .filter(|_| least_loaded(&pool, |i| if i == 999 { 0 } else { 5 }, &mut rng) == 999)
            .count();
        assert!((20..150).contains(&hits), "{hits}");
    }
}
