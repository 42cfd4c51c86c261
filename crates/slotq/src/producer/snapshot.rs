//! What a producer knows of its shards' depths: a snapshot of all of them, read before the
//! first send and again while it sends (see `lanes::fold_snapshot` for how one is folded
//! in).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::ProducerInner;
use super::lanes::{self, CHOICE_SPAN};

/// How often a producer re-reads its shards' depths while it sends.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Messages per active shard a producer sends before it reads the depths again (see
/// [`ProducerInner::snapshot_if_due`]): two choice spans.
const SNAPSHOT_SHARE: usize = 2 * CHOICE_SPAN;

impl ProducerInner {
    /// Takes the first snapshot of the shards' depths (awaited, so that a producer starting
    /// on shards of unequal depth fills the shallow ones first), and a new one in the
    /// background once [`SNAPSHOT_EVERY`] has passed since the last, or once this producer
    /// sent [`SNAPSHOT_SHARE`] messages per active shard (so that a fast producer learns
    /// what the others did within a fraction of a second, not after a whole one: four
    /// producers sending 200,000 in batches of 1,000 on 30 masters ended 1.2 apart with
    /// the time rule alone). `sending` messages are about to be placed.
    pub(super) async fn snapshot_if_due(self: &Arc<Self>, sending: usize) {
        let sent = self
            .sent_since_snapshot
            .fetch_add(sending, Ordering::Relaxed)
            + sending;
        let due = {
            let at = self.snapshot_at.lock().unwrap();
            match *at {
                None => Some(true),
                Some(t) if t.elapsed() >= SNAPSHOT_EVERY => Some(false),
                Some(_) if sent >= self.snapshot_quota() => Some(false),
                Some(_) => None,
            }
        };
        let Some(first) = due else { return };
        if self.snapshotting.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.snapshot_at.lock().unwrap() = Some(Instant::now());
        self.sent_since_snapshot.store(0, Ordering::Relaxed);
        if first {
            self.snapshot().await;
        } else {
            let me = self.clone();
            tokio::spawn(async move { me.snapshot().await });
        }
    }

    /// Reads every active shard's depth (one pipeline per node) and folds it into the
    /// lanes' `base` ([`lanes::fold_snapshot`]). All lanes are read at once, so their
    /// figures are equally fresh: a producer that learned one shard's depth from a push
    /// reply and kept older figures for the others would see the fresh one as deep and pile
    /// onto the stale ones. Best effort: if a shard does not answer, nothing changes.
    async fn snapshot(&self) {
        let lanes = self.lanes();
        let prefix = self.cfg.queue.prefix();
        let cmds = lanes
            .iter()
            .map(|l| {
                let cmd = if self.reliable {
                    redis::cmd("GET")
                        .arg(crate::placement::shard_key(prefix, &l.tag, "count"))
                        .clone()
                } else {
                    redis::cmd("LLEN").arg(&l.key).clone()
                };
                (l.slot, cmd)
            })
            .collect();
        let cluster = self.cfg.queue.cluster();
        let opts = crate::cluster::RequestOpts {
            idempotent: true,
            retry_budget: Duration::ZERO,
            ..cluster.default_opts()
        };
        let depths: Option<Vec<i64>> = cluster
            .batch(cmds, opts)
            .await
            .into_iter()
            .map(|r| {
                let d = redis::from_redis_value::<Option<i64>>(r.ok()?).ok()?;
                Some(d.unwrap_or(0).max(0))
            })
            .collect();
        if let Some(depths) = depths {
            // Messages of ours that landed but whose reply is still on its way are in the
            // depth and not yet in `landed`: counted twice until the next snapshot, at most
            // one batch per shard.
            let landed: Vec<i64> = lanes
                .iter()
                .map(|l| l.landed.load(Ordering::Relaxed))
                .collect();
            let mut base: Vec<i64> = lanes
                .iter()
                .map(|l| l.base.load(Ordering::Relaxed))
                .collect();
            let mut history = self.snapshot_history.lock().unwrap();
            lanes::fold_snapshot(
                &mut history,
                &mut base,
                &depths,
                &landed,
                self.cfg.max_batch_messages as i64,
            );
            for (l, b) in lanes.iter().zip(base) {
                l.base.store(b, Ordering::Relaxed);
            }
        }
        self.snapshotting.store(false, Ordering::Release);
    }

    /// Messages sent between snapshots that are due by count: [`SNAPSHOT_SHARE`] per active
    /// shard, and at least four full pushes.
    fn snapshot_quota(&self) -> usize {
        let shards = self.lanes.read().unwrap().active.len().max(1);
        (shards * SNAPSHOT_SHARE).max(4 * self.cfg.max_batch_messages)
    }
}
