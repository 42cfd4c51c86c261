//! What a reply means for routing: done, redirected, busy (retry later) or failed.

use redis::{RedisError, RedisResult, Value};

use crate::error::Error;
use crate::server_error::{RetryMethod, ServerErrorKind};
use crate::slot::Slot;
use crate::topology::NodeAddr;

/// The routing meaning of one reply.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A reply for the caller (which may still be an application-level value).
    Done(Value),
    /// The slot lives elsewhere for good: fix the map and resend there.
    Moved { slot: Slot, to: NodeAddr },
    /// The key is being migrated: resend once to `to`, preceded by ASKING.
    Ask { to: NodeAddr },
    /// Transient (TRYAGAIN, LOADING, BUSY; CLUSTERDOWN, MASTERDOWN, READONLY, UNBLOCKED
    /// also want a fresh slot map): pause and resend.
    Busy {
        kind: ServerErrorKind,
        code: String,
        message: String,
    },
    /// A final error for the caller.
    Failed(Error),
}

/// Classifies the reply to one command sent to `node`.
pub(crate) fn classify(node: &NodeAddr, reply: RedisResult<Value>) -> Outcome {
    match reply {
        Ok(Value::ServerError(e)) => by_code(node, e.code(), e.details().unwrap_or_default()),
        Ok(v) => Outcome::Done(v),
        Err(e) => classify_error(node, &e),
    }
}

fn classify_error(node: &NodeAddr, e: &RedisError) -> Outcome {
    match e.code() {
        Some(code) => by_code(node, code, e.detail().unwrap_or_default()),
        None => Outcome::Failed(Error::Protocol(format!("{node}: {e}"))),
    }
}

fn by_code(node: &NodeAddr, code: &str, detail: &str) -> Outcome {
    let kind = ServerErrorKind::parse(code);
    match kind.retry_method() {
        RetryMethod::Redirect => {
            let mut parts = detail.split_whitespace();
            let slot = parts.next().and_then(|s| s.parse::<Slot>().ok());
            let to = parts.next().and_then(|a| parse_redirect_addr(a, node));
            match (kind, slot, to) {
                (ServerErrorKind::Moved, Some(slot), Some(to)) => Outcome::Moved { slot, to },
                (ServerErrorKind::Ask, Some(_), Some(to)) => Outcome::Ask { to },
                _ => Outcome::Failed(Error::Protocol(format!(
                    "{node}: malformed redirect {code} {detail}"
                ))),
            }
        }
        // The command was not run: resend (after a fresh slot map where the cluster moved).
        RetryMethod::WaitAndRetry | RetryMethod::RefreshAndRetry => Outcome::Busy {
            kind,
            code: code.to_string(),
            message: detail.to_string(),
        },
        _ if kind.is_auth() => Outcome::Failed(Error::Auth {
            node: node.clone(),
            reason: format!("{code} {detail}"),
        }),
        _ => Outcome::Failed(Error::Server {
            node: node.clone(),
            kind,
            code: code.to_string(),
            message: detail.to_string(),
        }),
    }
}

/// A redirect names `host:port`; an empty host (`:7001`) means "the host you asked".
fn parse_redirect_addr(s: &str, from: &NodeAddr) -> Option<NodeAddr> {
    let mut addr = NodeAddr::parse(s)?;
    if addr.host.is_empty() || addr.host == "?" {
        addr.host = from.host.clone();
    }
    Some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeAddr {
        NodeAddr::new("10.0.0.1", 7000)
    }

    #[test]
    fn redirects() {
        match by_code(&node(), "MOVED", "3999 127.0.0.1:6381") {
            Outcome::Moved { slot, to } => {
                assert_eq!(slot, 3999);
                assert_eq!(to, NodeAddr::new("127.0.0.1", 6381));
            }
            o => panic!("{o:?}"),
        }
        match by_code(&node(), "ASK", "3999 :6381") {
            Outcome::Ask { to } => assert_eq!(to, NodeAddr::new("10.0.0.1", 6381)),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            by_code(&node(), "MOVED", "garbage"),
            Outcome::Failed(Error::Protocol(_))
        ));
    }

    #[test]
    fn busy_and_final() {
        for code in [
            "TRYAGAIN",
            "CLUSTERDOWN",
            "LOADING",
            "MASTERDOWN",
            "BUSY",
            "READONLY",
        ] {
            assert!(matches!(by_code(&node(), code, "x"), Outcome::Busy { .. }));
        }
        assert!(matches!(
            by_code(&node(), "WRONGTYPE", "Operation against a key"),
            Outcome::Failed(Error::Server { .. })
        ));
        assert!(matches!(
            by_code(&node(), "NOAUTH", "Authentication required."),
            Outcome::Failed(Error::Auth { .. })
        ));
    }
}
