//! The one error type of slotq.
//!
//! Every variant says what went wrong and where; [`Error::is_retryable`] tells whether the
//! same call may succeed later, and [`Error::may_have_run`] whether a failed command may
//! still have been executed by the server (so a blind retry could apply it twice).

use std::time::Duration;

use crate::node_addr::NodeAddr;
use crate::server_error::ServerErrorKind;

/// The lower-level error behind a connection failure (an I/O or TLS error), kept whole so
/// that [`std::error::Error::source`] reaches it; shared, so that [`Error`] stays `Clone`.
#[derive(Clone)]
pub struct Cause(std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    /// Wraps an error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause(std::sync::Arc::new(e))
    }

    /// The wrapped error, to downcast (`cause.inner().downcast_ref::<std::io::Error>()`).
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in slotq.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is out of range or inconsistent; nothing was contacted.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The URL is not a Redis URL (`redis://` or `rediss://`) or is malformed.
    #[error("invalid Redis URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given, with any password masked.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// No connection could be made to a node (refused, unreachable, or not speaking Redis).
    #[error("cannot connect to {node}: {reason}")]
    Connect {
        /// The node that was dialled.
        node: NodeAddr,
        /// Why the connection failed.
        reason: String,
        /// The I/O error behind it, when there is one.
        #[source]
        cause: Option<Cause>,
    },

    /// The server rejected the username/password.
    #[error("authentication failed at {node}: {reason}")]
    Auth {
        /// The node that refused.
        node: NodeAddr,
        /// The server's message.
        reason: String,
    },

    /// The TLS handshake failed (certificate, protocol or a plain-text server).
    #[error("TLS failure with {node}: {reason}")]
    Tls {
        /// The node in question.
        node: NodeAddr,
        /// What the TLS layer reported.
        reason: String,
        /// The TLS or I/O error behind it, when there is one.
        #[source]
        cause: Option<Cause>,
    },

    /// A node did not answer within the request deadline. The command may have run.
    #[error("{node} did not answer within {timeout:?}; the command may or may not have run")]
    Timeout {
        /// The silent node.
        node: NodeAddr,
        /// The deadline that passed.
        timeout: Duration,
    },

    /// The connection broke while a command was in flight. The command may have run.
    #[error("connection to {node} lost: {reason}; the command may or may not have run")]
    ConnectionLost {
        /// The node whose connection broke.
        node: NodeAddr,
        /// What the I/O layer reported.
        reason: String,
        /// The I/O error behind it, when there is one.
        #[source]
        cause: Option<Cause>,
    },

    /// The node is marked down after recent failures; the call was not sent.
    #[error("node {node} is down (recent failures); not sent")]
    NodeDown {
        /// The node that is down.
        node: NodeAddr,
    },

    /// No master serves this slot in the current slot map.
    #[error("slot {slot} is not served by any master")]
    SlotUncovered {
        /// The uncovered slot.
        slot: u16,
    },

    /// The cluster kept answering TRYAGAIN / CLUSTERDOWN / LOADING / MASTERDOWN / BUSY /
    /// READONLY until the call's deadline.
    #[error("cluster unavailable at {node}: {code} {message}")]
    ClusterUnavailable {
        /// The node that answered.
        node: NodeAddr,
        /// What the reply meant.
        kind: ServerErrorKind,
        /// The error code (e.g. `CLUSTERDOWN`).
        code: String,
        /// The server's message.
        message: String,
    },

    /// No master owns a slot in the current slot map (a cluster not set up yet, or every
    /// master lost): a new queue's shards have nowhere to go.
    #[error("no master owns slots: the cluster is not serving yet")]
    NoMasters,

    /// The slot kept moving: more MOVED/ASK redirects than allowed for one call.
    #[error("gave up on slot {slot} after {count} redirects")]
    TooManyRedirects {
        /// The slot being routed.
        slot: u16,
        /// How many redirects were followed.
        count: u32,
    },

    /// A cluster was required but the server runs with cluster mode disabled.
    #[error("{node} is a standalone Redis server, but a cluster was required")]
    NotACluster {
        /// The standalone server.
        node: NodeAddr,
    },

    /// The server answered with an error that is not about routing.
    #[error("{node} replied with an error: {code} {message}")]
    Server {
        /// The node that answered.
        node: NodeAddr,
        /// What the reply meant (parsed from the code once).
        kind: ServerErrorKind,
        /// The error code (`ERR`, `WRONGTYPE`, `OOM`, ...).
        code: String,
        /// The rest of the message.
        message: String,
    },

    /// A queue name is empty, too long, or uses characters outside `[A-Za-z0-9_.:-]`.
    #[error("invalid queue name {name:?}: {reason}")]
    InvalidQueueName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A consumer-group name is empty, too long, or uses characters outside
    /// `[A-Za-z0-9_.:-]`.
    #[error("invalid group name {name:?}: {reason}")]
    InvalidGroupName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A consumer joined a group that runs in the other mode (ordered vs unordered).
    #[error("group {group:?} runs {mode}; a consumer of the other mode cannot join it")]
    GroupModeMismatch {
        /// The group.
        group: String,
        /// The mode its members run.
        mode: String,
    },

    /// A payload was refused before anything was sent (empty, or larger than allowed).
    #[error("invalid payload: {0}")]
    InvalidPayload(String),

    /// A send with a dedup id that was sent already within the dedup window: not enqueued
    /// again (the first one is, or was, in the queue).
    #[error(
        "duplicate: dedup id {id:?} was sent to queue {queue:?} within its dedup window; not enqueued again"
    )]
    Duplicate {
        /// The queue.
        queue: String,
        /// The dedup id.
        id: String,
    },

    /// A dedup id refused before anything was sent (empty, or longer than allowed).
    #[error("invalid dedup id: {0}")]
    InvalidDedupId(String),

    /// A header or time to live refused before anything was sent.
    #[error("invalid header: {0}")]
    InvalidHeader(String),

    /// A due time refused before anything was sent (too far in the past or ahead).
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),

    /// A priority that is not `high`, `normal` or `low`.
    #[error("invalid priority: {0}")]
    InvalidPriority(String),

    /// Priorities asked of a queue that was not created with them, or of a mode that has
    /// none (at-least-once queues, ordered groups); nothing was sent or received.
    #[error("priorities: {0}")]
    Priorities(String),

    /// A message id that is not 32 hexadecimal digits (as slotq prints ids).
    #[error(
        "invalid message id {0:?}: expected 32 hexadecimal digits, as `slotq dead Q list` prints ids"
    )]
    InvalidMessageId(String),

    /// The shard would grow past the configured maximum depth; nothing was pushed.
    #[error("queue full: shard {shard} holds {depth} messages (max {max})")]
    QueueFull {
        /// The shard's tag.
        shard: String,
        /// Its depth when the push was refused.
        depth: u64,
        /// The configured maximum.
        max: u64,
    },

    /// The write is stored on the master but fewer replicas than asked acknowledged it in
    /// time: it may be lost if the master fails now.
    #[error(
        "written to {node} but only {acked} of {wanted} replicas acknowledged it in time; it may not survive a failover"
    )]
    NotReplicated {
        /// The master.
        node: NodeAddr,
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that acknowledged.
        acked: u32,
    },

    /// An ordered group's member could not renew its membership for a member timeout
    /// (the registry's master is unreachable, or the process was paused): it hands out
    /// nothing, since another member may own its shards by now. Receiving again retries.
    #[error(
        "group {group:?}: membership not renewed for {timeout:?}; nothing is handed out until a heartbeat goes through"
    )]
    MembershipLapsed {
        /// The group.
        group: String,
        /// The member timeout.
        timeout: Duration,
    },

    /// A reliable-mode operation on an at-most-once queue (or its messages).
    #[error("{0}")]
    NotReliable(String),

    /// The queue has no registry in Redis (it was never opened).
    #[error("queue {0:?} does not exist (no registry found)")]
    QueueNotFound(String),

    /// Another client kept changing the queue's registry while this call tried to change
    /// it (compare-and-set lost every time); nothing was changed by this call.
    #[error("the registry of queue {0:?} kept changing under this update; try again")]
    RegistryContention(String),

    /// Someone else is doing this already (another rebalance of the same queue).
    #[error("busy: {0}")]
    Busy(String),

    /// A reply had an unexpected shape.
    #[error("unexpected reply: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether the same call may succeed if tried again later (after a failover, a
    /// migration step, a reconnect).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::Timeout { .. }
                | Error::ConnectionLost { .. }
                | Error::NodeDown { .. }
                | Error::SlotUncovered { .. }
                | Error::NoMasters
                | Error::ClusterUnavailable { .. }
                | Error::TooManyRedirects { .. }
                | Error::QueueFull { .. }
                | Error::RegistryContention(_)
                | Error::Busy(_)
                | Error::MembershipLapsed { .. }
        )
    }

    /// Whether the failed command may nevertheless have been executed by the server.
    pub fn may_have_run(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. } | Error::ConnectionLost { .. } | Error::NotReplicated { .. }
        )
    }

    /// The node the error is about, when there is one.
    pub fn node(&self) -> Option<&NodeAddr> {
        match self {
            Error::Connect { node, .. }
            | Error::Auth { node, .. }
            | Error::Tls { node, .. }
            | Error::Timeout { node, .. }
            | Error::ConnectionLost { node, .. }
            | Error::NodeDown { node }
            | Error::ClusterUnavailable { node, .. }
            | Error::NotACluster { node }
            | Error::NotReplicated { node, .. }
            | Error::Server { node, .. } => Some(node),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_and_ambiguity_are_distinct() {
        let node = NodeAddr::new("127.0.0.1", 7000);
        let timeout = Error::Timeout {
            node: node.clone(),
            timeout: Duration::from_secs(1),
        };
        assert!(timeout.is_retryable() && timeout.may_have_run());
        let down = Error::NodeDown { node: node.clone() };
        assert!(down.is_retryable() && !down.may_have_run());
        let auth = Error::Auth {
            node,
            reason: "WRONGPASS".into(),
        };
        assert!(!auth.is_retryable());
        assert!(
            auth.to_string()
                .contains("authentication failed at 127.0.0.1:7000")
        );
    }
}
