//! Metric names, emitted through the `metrics` facade. Nothing is recorded unless the
//! application installs a recorder (the `slotq consume --metrics` command serves them for
//! Prometheus); without one every update is a no-op.
//!
//! The table of every metric (name, kind, labels, meaning) is in `docs/operations.md`,
//! "Metrics"; the constants below are the names.

/// Messages stored by producers.
pub const PUSHED: &str = "slotq_messages_pushed_total";
/// Messages whose send failed.
pub const PUSH_FAILURES: &str = "slotq_push_failures_total";
/// Messages per push.
pub const PUSH_BATCH: &str = "slotq_push_batch_messages";
/// Time of one push.
pub const PUSH_SECONDS: &str = "slotq_push_seconds";
/// Messages taken by consumers.
pub const POPPED: &str = "slotq_messages_popped_total";
/// At-most-once pops whose reply was lost: if the pop ran, its messages are gone.
pub const POP_REPLIES_LOST: &str = "slotq_pop_replies_lost_total";
/// At-most-once messages popped but not handed out because no replica confirmed the pop
/// in time: pushed back to the node that popped them (see `consumer/confirm.rs`).
pub const POPS_UNCONFIRMED: &str = "slotq_pops_unconfirmed_total";
/// Of those, messages whose push-back failed: lost (never delivered twice).
pub const UNCONFIRMED_LOST: &str = "slotq_unconfirmed_lost_total";
/// Messages past their time to live, not handed out: `action` dropped or dead-lettered.
pub const EXPIRED: &str = "slotq_expired_total";
/// Gauge: 1 while a consumer of the queue finds it paused (`Queue::pause`), else 0.
pub const QUEUE_PAUSED: &str = "slotq_queue_paused";
/// Time of one sweep over every shard.
pub const POP_ROUND_SECONDS: &str = "slotq_pop_round_seconds";
/// Settled messages, by kind.
pub const SETTLED: &str = "slotq_messages_settled_total";
/// Redirects followed, by kind.
pub const REDIRECTS: &str = "slotq_redirects_total";
/// Retries after a transient error reply (TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN,
/// BUSY, READONLY).
pub const BUSY_RETRIES: &str = "slotq_busy_retries_total";
/// Slot-map refreshes.
pub const REFRESHES: &str = "slotq_topology_refreshes_total";
/// Times a node was marked down.
pub const NODE_DOWN: &str = "slotq_node_down_total";
/// Assignment changes a group member saw.
pub const GROUP_REBALANCES: &str = "slotq_group_rebalances_total";
/// Shards a group member owns.
pub const GROUP_OWNED_SHARDS: &str = "slotq_group_owned_shards";
/// Messages a group member took from shards it does not own.
pub const GROUP_STEALS: &str = "slotq_group_steals_total";
/// Counter: messages an ordered member of an at-most-once queue popped but could no longer
/// hand out: it lost the shard meanwhile (its membership lapsed, or the shard's fence
/// refused it), and handing them out would put them after newer messages.
pub const FENCED_DROPPED: &str = "slotq_fenced_dropped_total";
