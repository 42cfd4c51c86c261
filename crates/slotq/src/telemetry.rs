//! Metric names, emitted through the `metrics` facade. Nothing is recorded unless the
//! application installs a recorder (the `slotq consume --metrics` command serves them for
//! Prometheus); without one every update is a no-op.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `slotq_messages_pushed_total` | counter | queue | messages stored by producers |
//! | `slotq_push_failures_total` | counter | queue | messages whose send failed |
//! | `slotq_push_batch_messages` | histogram | queue | messages per push |
//! | `slotq_push_seconds` | histogram | queue | time of one push (with reroutes) |
//! | `slotq_messages_popped_total` | counter | queue | messages taken by consumers |
//! | `slotq_pop_replies_lost_total` | counter | | at-most-once pops whose reply was lost (their messages may be gone) |
//! | `slotq_pop_round_seconds` | histogram | queue | time of one sweep over every shard |
//! | `slotq_messages_settled_total` | counter | kind (ack, nack, release) | settled messages |
//! | `slotq_redirects_total` | counter | kind (moved, ask) | redirects followed |
//! | `slotq_busy_retries_total` | counter | | TRYAGAIN / CLUSTERDOWN / LOADING / MASTERDOWN retries |
//! | `slotq_topology_refreshes_total` | counter | | slot-map refreshes |
//! | `slotq_node_down_total` | counter | node | times a node was marked down |
//! | `slotq_group_rebalances_total` | counter | group | assignment changes a member saw |
//! | `slotq_group_owned_shards` | gauge | group | shards the member owns |
//! | `slotq_group_steals_total` | counter | group | messages taken from other members' shards |

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
/// Time of one sweep over every shard.
pub const POP_ROUND_SECONDS: &str = "slotq_pop_round_seconds";
/// Settled messages, by kind.
pub const SETTLED: &str = "slotq_messages_settled_total";
/// Redirects followed, by kind.
pub const REDIRECTS: &str = "slotq_redirects_total";
/// Busy-reply retries.
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
