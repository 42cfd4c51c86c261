//! Sends with headers or a time to live ([`SendOptions`]).
//!
//! Such messages carry the extension of [`crate::meta`]: at-least-once queues store them
//! as format-2 envelopes, at-most-once queues behind [`PLAIN_EXT_MAGIC`](crate::meta::PLAIN_EXT_MAGIC).
//! A send with options is pushed on its own (a batch of them together), not merged into
//! the lane's open batch with plain sends: messages without options keep the plain path
//! untouched. So a send with options is ordered with this producer's other sends of the
//! same key only when the caller waits for each (as one awaits `send_keyed` anyway).

use std::time::{Instant, SystemTime};

use super::Producer;
use super::batch::Batch;
use crate::error::Result;
use crate::lease::MessageId;
use crate::meta::SendOptions;

impl Producer {
    /// Sends one message with headers or a time to live; resolves when Redis stored it.
    /// Bad headers or a bad time to live are refused before anything is sent
    /// ([`Error::InvalidHeader`](crate::Error::InvalidHeader)).
    pub async fn send_with(&self, payload: impl AsRef<[u8]>, opts: &SendOptions) -> Result<()> {
        self.send_batch_with([payload], opts).await
    }

    /// Sends many messages, each with the same headers and time to live, spread over the
    /// shards like [`Producer::send_batch`].
    pub async fn send_batch_with<P: AsRef<[u8]>>(
        &self,
        payloads: impl IntoIterator<Item = P>,
        opts: &SendOptions,
    ) -> Result<()> {
        let called = Instant::now();
        let ext = opts.carries_meta().then(|| opts.encode()).transpose()?;
        let payloads: Vec<P> = payloads.into_iter().collect();
        for p in &payloads {
            self.inner.check(p.as_ref())?;
        }
        self.inner.check_priority(opts.level())?;
        self.inner.cfg.queue.check_live().await?;
        for chunk in payloads.chunks(self.inner.cfg.max_batch_messages.max(1)) {
            let lane = self.inner.pick_fresh()?;
            let mut batch = self
                .inner
                .batch_with(ext.as_deref(), chunk.iter().map(AsRef::as_ref));
            batch.born = Some(called);
            batch.level = opts.level();
            let body = batch.take_body();
            self.inner.push_routed(&lane, &batch, &body).await?;
        }
        Ok(())
    }

    /// A keyed [`Producer::send_with`]: to its key's shard, behind what was sent for the
    /// key before this call.
    pub async fn send_keyed_with(
        &self,
        key: impl AsRef<[u8]>,
        payload: impl AsRef<[u8]>,
        opts: &SendOptions,
    ) -> Result<()> {
        let called = Instant::now();
        let ext = opts.carries_meta().then(|| opts.encode()).transpose()?;
        let payload = payload.as_ref();
        self.inner.check(payload)?;
        self.inner.check_priority(opts.level())?;
        self.inner.cfg.queue.check_live().await?;
        let lane = self.inner.keyed_lane(key.as_ref()).await?;
        let mut batch = self.inner.batch_with(ext.as_deref(), [payload]);
        batch.keyed = true;
        batch.born = Some(called);
        batch.level = opts.level();
        let body = batch.take_body();
        self.inner.push_routed(&lane, &batch, &body).await
    }

    /// A scheduled [`Producer::send_with`] (see [`Producer::send_at`]).
    pub async fn send_at_with(
        &self,
        payload: impl AsRef<[u8]>,
        at: SystemTime,
        opts: &SendOptions,
    ) -> Result<MessageId> {
        let called = Instant::now();
        let due = crate::queue::due_ms(at)?;
        let ext = opts.encode()?;
        if opts.level() != crate::priority::Priority::Normal {
            return Err(crate::Error::Priorities(
                "a scheduled message becomes ready at normal priority: send it without one".into(),
            ));
        }
        let payload = payload.as_ref();
        self.inner.check(payload)?;
        self.inner.cfg.queue.check_live().await?;
        let lane = self.inner.pick_fresh()?;
        let ids = self
            .inner
            .send_scheduled(&lane, false, &[payload], due, called, Some(&ext))
            .await?;
        Ok(ids[0])
    }
}

impl super::ProducerInner {
    /// A batch of messages carrying the extension `ext` (none: plain messages).
    fn batch_with<'a>(
        &self,
        ext: Option<&[u8]>,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> Batch {
        let mut batch = Batch::default();
        let now = crate::lease::now_ms();
        for p in payloads {
            match (self.reliable, ext) {
                (true, Some(ext)) => {
                    let header = self.envelope_header(now);
                    batch.push_envelope_ext(&header, ext, p);
                }
                (true, None) => {
                    let header = self.envelope_header(now);
                    batch.push_envelope(&header, p);
                }
                (false, Some(ext)) => batch.push_payload_ext(ext, p),
                (false, None) => batch.push_payload(p),
            }
        }
        batch
    }

    /// A priority other than normal needs a queue created with priorities.
    fn check_priority(&self, level: crate::priority::Priority) -> crate::error::Result<()> {
        if level == crate::priority::Priority::Normal || self.cfg.queue.shards().priorities {
            return Ok(());
        }
        Err(crate::Error::Priorities(format!(
            "queue {:?} was created without priorities: create it with \
             QueueBuilder::priorities() (`slotq push --priority` creates a missing queue with them)",
            self.cfg.queue.name()
        )))
    }
}
