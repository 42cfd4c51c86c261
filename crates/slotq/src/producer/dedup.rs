//! Sends with a dedup id, and the idempotent producer.
//!
//! A send with a dedup id goes to the shard its id maps to (as a key would: the queue's
//! keyed layout), and `lua/push_dedup.lua` sets the id's marker (`<prefix>:{<shard>}:dedup:
//! <id>`, expiring after the window) and pushes the message in one atomic write, in that
//! shard's slot. A second send of the id within the window finds the marker and enqueues
//! nothing ([`Error::Duplicate`]), from any producer in any process. Marker and message are
//! replicated together, so a failover keeps both or neither: a send whose outcome is
//! unknown can be sent again with the same id, and is then enqueued exactly once.
//!
//! The idempotent producer ([`ProducerBuilder::idempotent`](super::ProducerBuilder::idempotent))
//! does that for every send: each gets a random id, and an ambiguous failure is resent to
//! the same shard until the retry budget is spent; a resend that finds the id means the
//! first send stored the message (with durability, a resend that finds it answers only
//! once the first send is on a replica: the script writes even then, see the script).
//!
//! Invariants: the marker always lives in the slot of the shard that holds the message; a
//! resend always goes to the shard of the first attempt (the shard set may change between
//! the two only by a retirement, which waits for the shard to be empty).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::batch::Batch;
use super::lanes::Lane;
use super::{Producer, ProducerInner};
use crate::cluster::Command;
use crate::error::{Error, Result};

/// How long a dedup id keeps a second send out, unless the producer says otherwise.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(600);
/// Longest dedup id, in bytes.
pub const MAX_DEDUP_ID: usize = 256;

/// Refuses an empty or oversized dedup id.
pub fn check_dedup_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidDedupId("empty".into()));
    }
    if id.len() > MAX_DEDUP_ID {
        return Err(Error::InvalidDedupId(format!(
            "{} bytes, the most is {MAX_DEDUP_ID}",
            id.len()
        )));
    }
    Ok(())
}

impl Producer {
    /// Sends one message with a dedup id: enqueued unless a message with the same id was
    /// sent to this queue within the dedup window (10 minutes by default, see
    /// [`ProducerBuilder::dedup_window`](super::ProducerBuilder::dedup_window)), by any
    /// producer; then [`Error::Duplicate`] says so and nothing is enqueued. A send that
    /// failed with [`Error::may_have_run`] can be sent again with the same id safely.
    /// Messages with dedup ids go to the shard their id maps to, one push each.
    pub async fn send_dedup(&self, id: &str, payload: impl AsRef<[u8]>) -> Result<()> {
        let called = Instant::now();
        check_dedup_id(id)?;
        self.inner.cfg.queue.check_live().await?;
        let payload = payload.as_ref();
        self.inner.check(payload)?;
        let lane = self.inner.keyed_lane(id.as_bytes()).await?;
        self.inner
            .send_with_id(&lane, id, payload, called, false)
            .await
    }
}

impl ProducerInner {
    /// An idempotent producer's send: a random id, resent on ambiguous failures.
    pub(super) async fn send_idempotent(
        &self,
        lane: &Arc<Lane>,
        payload: &[u8],
        called: Instant,
    ) -> Result<()> {
        let id = format!("{:032x}", rand::random::<u128>());
        self.send_with_id(lane, &id, payload, called, true).await
    }

    /// One message with a dedup id, to `lane`. With `resend`, an ambiguous failure is sent
    /// again (same shard, same id, same message id) until the retry budget since `called`
    /// is spent; a resend that finds the id means an earlier attempt stored the message.
    pub(super) async fn send_with_id(
        &self,
        lane: &Arc<Lane>,
        id: &str,
        payload: &[u8],
        called: Instant,
        resend: bool,
    ) -> Result<()> {
        let mut batch = Batch::default();
        if self.reliable {
            let header = self.envelope_header(crate::lease::now_ms());
            batch.push_envelope(&header, payload);
        } else {
            batch.push_payload(payload);
        }
        batch.keyed = true;
        batch.born = Some(called);
        batch.dedup = Some(id.to_string());
        let body = batch.take_body();
        let deadline = called + self.cfg.queue.cluster().config().retry_budget_value();
        let mut sent_before = false;
        loop {
            match self.push_routed(lane, &batch, &body).await {
                Ok(()) => {
                    self.cfg.queue.count_pushed(1);
                    return Ok(());
                }
                Err(Error::Duplicate { .. }) if sent_before => {
                    self.cfg.queue.count_pushed(1);
                    return Ok(());
                }
                Err(e) if resend && e.may_have_run() && Instant::now() < deadline => {
                    tracing::debug!(shard = %lane.tag, cause = %e, "idempotent send: sending again");
                    sent_before = true;
                    tokio::time::sleep(crate::config::FIRST_RETRY_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    /// The push of a dedup batch (see `lua/push_dedup.lua`).
    pub(super) fn dedup_command(
        &self,
        lane: &Lane,
        id: &str,
        batch: &Batch,
        body: &Bytes,
    ) -> Command {
        let prefix = self.cfg.queue.prefix();
        let marker = crate::placement::shard_key(prefix, &lane.tag, &format!("dedup:{id}"));
        let window = self.cfg.dedup_window.as_millis().max(1).to_string();
        let count = batch.len().to_string();
        let script = &self.cfg.queue.scripts().push_dedup;
        if self.reliable {
            let counted = crate::placement::shard_key(prefix, &lane.tag, "count");
            let (open, head) = batch.frame_open(body.len());
            script.with_body(
                &[&lane.key, &marker, &counted],
                &[window.as_bytes(), count.as_bytes(), &head],
                1,
                vec![open.into(), body.clone(), Bytes::from_static(b"\r\n")],
            )
        } else {
            script.with_body(
                &[&lane.key, &marker],
                &[window.as_bytes(), count.as_bytes()],
                batch.len(),
                vec![body.clone()],
            )
        }
    }
}
