//! Keyed sends: each message goes to the shard its key maps to (a jump consistent hash of
//! the key over the keyed layout), so a key's messages stay in one shard, in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lanes::Lane;
use super::{Producer, ProducerInner};
use crate::error::{Error, Result};
use crate::placement::{ShardState, fnv1a};

/// Longest a keyed send waits for the keys of a retiring shard to move.
pub const KEYED_HOLD: Duration = Duration::from_secs(30);
/// How often a held keyed send looks at the shard set again.
const KEYED_HOLD_STEP: Duration = Duration::from_millis(50);

impl Producer {
    /// Sends one message to the shard `key` maps to; messages with the same key are
    /// delivered in the order they were sent (while the shard set does not change).
    pub async fn send_keyed(&self, key: impl AsRef<[u8]>, payload: impl AsRef<[u8]>) -> Result<()> {
        let called = std::time::Instant::now();
        self.inner.cfg.queue.check_live().await?;
        let payload = payload.as_ref();
        self.inner.check(payload)?;
        let now = crate::lease::now_ms();
        let lane = self.inner.keyed_lane(key.as_ref()).await?;
        if self.inner.cfg.idempotent {
            return self.inner.send_idempotent(&lane, payload, called).await;
        }
        self.inner.acquire(1).await;
        let signal = self.inner.enqueue(&lane, &[payload], true, (now, called));
        signal.wait().await
    }

    /// Sends many keyed messages: each goes to the shard its key maps to, as
    /// [`send_keyed`](Self::send_keyed) would send it, and messages with the same key are
    /// stored in the order given. The messages of one shard travel together, in pushes of
    /// up to `max_batch_messages`. Resolves when all are stored, or with the first error
    /// (then some of the messages may have been stored).
    pub async fn send_keyed_batch<K: AsRef<[u8]>, P: AsRef<[u8]>>(
        &self,
        items: impl IntoIterator<Item = (K, P)>,
    ) -> Result<()> {
        self.inner.cfg.queue.check_live().await?;
        if self.inner.cfg.idempotent {
            // One push per message: each key's messages one after another (their order),
            // the keys at once.
            let mut by_key: Vec<(K, Vec<P>)> = Vec::new();
            let mut index: std::collections::HashMap<Vec<u8>, usize> = Default::default();
            for (k, p) in items {
                match index.get(k.as_ref()) {
                    Some(&i) => by_key[i].1.push(p),
                    None => {
                        index.insert(k.as_ref().to_vec(), by_key.len());
                        by_key.push((k, vec![p]));
                    }
                }
            }
            let sends = by_key.iter().map(|(k, ps)| async move {
                for p in ps {
                    self.send_keyed(k.as_ref(), p.as_ref()).await?;
                }
                Ok::<(), Error>(())
            });
            return futures::future::join_all(sends)
                .await
                .into_iter()
                .find(Result::is_err)
                .unwrap_or(Ok(()));
        }
        let items: Vec<(u64, P)> = items
            .into_iter()
            .map(|(k, p)| (fnv1a(k.as_ref()), p))
            .collect();
        for (_, p) in &items {
            self.inner.check(p.as_ref())?;
        }
        // Group by shard, keeping the given order within each (so within each key).
        let set = self.inner.cfg.queue.shards();
        let mut groups: Vec<(Arc<Lane>, Vec<P>)> = Vec::new();
        let mut group_of: std::collections::HashMap<u32, usize> = Default::default();
        let mut held = Vec::new();
        let now = crate::lease::now_ms();
        for (hash, payload) in items {
            let shard = set
                .keyed_shard(hash)
                .ok_or_else(|| Error::QueueNotFound(self.inner.cfg.queue.name().to_string()))?;
            if shard.state == ShardState::Retiring || !held.is_empty() {
                // A shard is handing its keys over: from here on, each message waits for
                // its key's shard as a single keyed send does (and in order).
                held.push((hash, payload));
                continue;
            }
            let g = *group_of.entry(shard.number).or_insert_with(|| {
                groups.push((self.inner.lane_of(shard), Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(payload);
        }
        let mut signals = Vec::new();
        let grain = self.inner.cfg.max_batch_messages.max(1);
        for (lane, payloads) in groups {
            for chunk in payloads.chunks(grain) {
                self.inner.acquire(chunk.len()).await;
                signals.push(self.inner.enqueue(
                    &lane,
                    chunk,
                    true,
                    (now, std::time::Instant::now()),
                ));
            }
        }
        for (hash, payload) in held {
            let lane = self.inner.keyed_lane_by_hash(hash).await?;
            self.inner.acquire(1).await;
            signals.push(self.inner.enqueue(
                &lane,
                &[payload],
                true,
                (now, std::time::Instant::now()),
            ));
        }
        let mut first_err = None;
        for s in signals {
            if let Err(e) = s.wait().await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl ProducerInner {
    /// The lane of the shard that serves `key` in the keyed layout. While that shard is
    /// being retired, the send waits (up to [`KEYED_HOLD`]) until its keys have moved: a
    /// key's messages never wait on two shards at once, so they stay in order. After the
    /// hold the shard is used as it is (the rebalance retires a shard well within the
    /// hold, or gives up and puts it back to draining).
    pub(super) async fn keyed_lane(&self, key: &[u8]) -> Result<Arc<Lane>> {
        self.keyed_lane_by_hash(fnv1a(key)).await
    }

    /// [`keyed_lane`](Self::keyed_lane) of a key by its hash.
    async fn keyed_lane_by_hash(&self, hash: u64) -> Result<Arc<Lane>> {
        let held_since = Instant::now();
        loop {
            let set = self.cfg.queue.shards();
            let shard = set
                .keyed_shard(hash)
                .ok_or_else(|| Error::QueueNotFound(self.cfg.queue.name().to_string()))?;
            if shard.state != ShardState::Retiring || held_since.elapsed() >= KEYED_HOLD {
                return Ok(self.lane_of(shard));
            }
            tokio::time::sleep(KEYED_HOLD_STEP).await;
        }
    }
}
