//! The shapes of `--json` output, one struct per document, so that every field is written
//! down once (and a test that reads the output reads what these say).

use serde::Serialize;

/// A payload: UTF-8 text as `"payload"`, anything else as `"payload_base64"` (standard
/// alphabet, padded), so that bytes survive the trip through JSON.
#[derive(Debug, Serialize)]
pub enum Payload {
    /// Valid UTF-8.
    #[serde(rename = "payload")]
    Text(String),
    /// Anything else, in base64.
    #[serde(rename = "payload_base64")]
    Base64(String),
}

impl Payload {
    /// The JSON form of `bytes`.
    pub fn of(bytes: &[u8]) -> Payload {
        match std::str::from_utf8(bytes) {
            Ok(text) => Payload::Text(text.to_string()),
            Err(_) => Payload::Base64(crate::output::base64(bytes)),
        }
    }
}

/// A message, as `pop` (with `attempt`) and `peek` (without) print it.
#[derive(Debug, Serialize)]
pub struct Message<'a> {
    /// The shard it came from.
    pub shard: &'a str,
    /// At-least-once queues: the message id (32 hex digits).
    pub id: Option<String>,
    /// Which delivery this is (pop only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Headers it was sent with, in order (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    /// When it expires, ms since the Unix epoch (absent when it does not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// Queues with priorities: `high`, `normal` or `low` (absent on other queues).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<&'static str>,
    /// The payload.
    #[serde(flatten)]
    pub payload: Payload,
}

/// Headers as a JSON object (a key sent twice keeps its first value).
#[derive(Debug)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// `None` for no headers.
    pub fn of(h: &[(String, String)]) -> Option<Headers> {
        (!h.is_empty()).then(|| Headers(h.to_vec()))
    }
}

impl Serialize for Headers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut seen = std::collections::HashSet::new();
        let mut m = s.serialize_map(None)?;
        for (k, v) in &self.0 {
            if seen.insert(k.as_str()) {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

/// A dead letter (`dead Q list`).
#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    /// Its shard.
    pub shard: &'a str,
    /// Its id.
    pub id: String,
    /// Deliveries it had.
    pub deliveries: u32,
    /// First enqueued, ms since the Unix epoch (producer clock).
    pub enqueued_ms: u64,
    /// Why it died: attempts, failed, rejected, expired, unreadable, unknown.
    pub reason: &'static str,
    /// What was recorded with the reason (may be empty).
    pub detail: &'a str,
    /// When it died, ms since the Unix epoch (server clock); null when not recorded.
    pub died_ms: Option<u64>,
    /// Headers it was sent with (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    /// The payload.
    #[serde(flatten)]
    pub payload: Payload,
}

/// `stats Q`.
#[derive(Debug, Serialize)]
pub struct Stats<'a> {
    /// The queue.
    pub queue: &'a str,
    /// Its registry version.
    pub version: u64,
    /// Every shard.
    pub shards: Vec<Shard>,
    /// Ready messages in all shards.
    pub total_depth: u64,
    /// Paused (`slotq pause`): consumers take nothing until it is resumed.
    pub paused: bool,
    /// Shards removed from the set whose leftovers were not moved yet (a retirement cut
    /// short; the next rebalance moves them).
    pub cleanup: Vec<String>,
    /// What a rebalance would do now.
    pub rebalance: RebalanceHint,
}

/// One shard in `stats`.
#[derive(Debug, Serialize)]
pub struct Shard {
    /// `<queue>#<n>`.
    pub tag: String,
    /// Its slot.
    pub slot: u16,
    /// The master serving it.
    pub node: Option<String>,
    /// `active`, `draining` or `retiring`.
    pub state: &'static str,
    /// Ready messages.
    pub depth: u64,
    /// At-least-once: leased, not settled.
    pub in_flight: Option<u64>,
    /// At-least-once: waiting for a delayed redelivery.
    pub delayed: Option<u64>,
    /// At-least-once: dead letters.
    pub dead: Option<u64>,
    /// At-least-once: age of the oldest ready message.
    pub oldest_age_ms: Option<u64>,
    /// Scheduled for later, not due yet.
    pub scheduled: u64,
}

/// What `slotq rebalance` would do.
#[derive(Debug, Serialize)]
pub struct RebalanceHint {
    /// Shards it would add.
    pub add: usize,
    /// Draining shards it would make active again.
    pub reactivate: usize,
    /// Active shards it would set to drain.
    pub drain: usize,
    /// Shards draining now, retired once empty.
    pub retire_when_empty: usize,
}

/// One queue in `queues`.
#[derive(Debug, Serialize)]
pub struct QueueSummary {
    /// Its name.
    pub queue: String,
    /// `at-most-once` or `at-least-once`.
    pub mode: &'static str,
    /// Its shards.
    pub shards: usize,
    /// Ready messages.
    pub depth: u64,
    /// At-least-once: leased, not settled.
    pub in_flight: Option<u64>,
    /// At-least-once: dead letters.
    pub dead: Option<u64>,
    /// Paused (`slotq pause`).
    pub paused: bool,
}

/// `pause` / `resume`.
#[derive(Debug, Serialize)]
pub struct PauseChange<'a> {
    /// The queue.
    pub queue: &'a str,
    /// Paused now.
    pub paused: bool,
    /// Whether this call changed it (false: it was so already).
    pub changed: bool,
}

/// `push` (summary).
#[derive(Debug, Serialize)]
pub struct Pushed<'a> {
    /// The queue.
    pub queue: &'a str,
    /// Messages sent.
    pub pushed: u64,
    /// Scheduled sends (`--delay`, `--at`): their ids, in order, for `slotq cancel`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
}

/// `cancel Q ID...`.
#[derive(Debug, Serialize)]
pub struct Cancelled {
    /// Ids cancelled.
    pub cancelled: Vec<String>,
}

/// `expand`.
#[derive(Debug, Serialize)]
pub struct Expanded<'a> {
    /// The queue.
    pub queue: &'a str,
    /// Shards added.
    pub added: &'a [String],
    /// Registry version after.
    pub version: u64,
}

/// `plan` (a new queue, or what `expand` would add).
#[derive(Debug, Serialize)]
pub struct Planned<'a> {
    /// The queue.
    pub queue: &'a str,
    /// `create` or `expand`.
    pub action: &'a str,
    /// The shards.
    pub shards: Vec<PlannedShard>,
}

/// One shard of a plan.
#[derive(Debug, Serialize)]
pub struct PlannedShard {
    /// `<queue>#<n>`.
    pub tag: String,
    /// Its slot.
    pub slot: u16,
    /// The master serving the slot.
    pub node: String,
}

/// `dead Q replay`.
#[derive(Debug, Serialize)]
pub struct Replayed {
    /// Dead letters put back into the queue.
    pub replayed: u64,
    /// With `--id`: the ids asked for that were not among the dead letters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_found: Vec<String>,
}

/// `dead Q purge`.
#[derive(Debug, Serialize)]
pub struct Purged {
    /// Dead letters removed.
    pub purged: u64,
}

/// `delete Q --yes`.
#[derive(Debug, Serialize)]
pub struct Deleted<'a> {
    /// The queue.
    pub queue: &'a str,
    /// Keys deleted.
    pub keys: usize,
    /// Ready messages that were in it.
    pub messages: u64,
    /// Shards whose keys were deleted.
    pub shards: usize,
}

/// `keyslot` (one per key).
#[derive(Debug, Serialize)]
pub struct KeySlot<'a> {
    /// The key.
    pub key: &'a str,
    /// Its slot.
    pub slot: u16,
}

/// `dev-cluster up` and `status`.
#[derive(Debug, Serialize)]
pub struct DevCluster<'a> {
    /// The URL to use.
    pub url: String,
    /// Where its files are.
    pub dir: &'a std::path::Path,
    /// Its processes.
    pub nodes: Vec<DevNode>,
}

/// One process of a dev cluster.
#[derive(Debug, Serialize)]
pub struct DevNode {
    /// Its port.
    pub port: u16,
    /// Its process id.
    pub pid: u32,
    /// `status` only: whether it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
}

/// `dev-cluster down`.
#[derive(Debug, Serialize)]
pub struct Stopped {
    /// Processes stopped.
    pub stopped: usize,
}

/// One JSON document and a newline.
pub fn line(v: &impl Serialize) -> String {
    // Serializing these shapes (strings, numbers, options) cannot fail.
    format!(
        "{}\n",
        serde_json::to_string(v).expect("plain data serializes")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_text_or_base64_beside_the_other_fields() {
        let m = Message {
            shard: "q#0",
            id: None,
            attempt: Some(1),
            headers: None,
            expires_ms: None,
            priority: None,
            payload: Payload::of(b"caf\xe9"),
        };
        assert_eq!(
            line(&m),
            "{\"shard\":\"q#0\",\"id\":null,\"attempt\":1,\"payload_base64\":\"Y2Fm6Q==\"}\n"
        );
        let m = Message {
            shard: "q#0",
            id: None,
            attempt: None,
            headers: None,
            expires_ms: None,
            priority: None,
            payload: Payload::of("café".as_bytes()),
        };
        assert_eq!(
            line(&m),
            "{\"shard\":\"q#0\",\"id\":null,\"payload\":\"café\"}\n"
        );
    }
}
