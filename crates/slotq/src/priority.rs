//! Priorities: three levels per queue, chosen when the queue is created
//! ([`QueueBuilder::priorities`](crate::queue::QueueBuilder::priorities)).
//!
//! Each shard keeps one ready list per level, all in the shard's slot:
//! `slotq:{orders#5}:ready:high`, `slotq:{orders#5}:ready` (normal, the list every queue
//! has) and `slotq:{orders#5}:ready:low`. A consumer's pop of such a shard is
//! `LMPOP 3 high normal low LEFT COUNT n` and its blocking wait
//! `BLMPOP timeout 3 high normal low LEFT COUNT n`: one command takes the highest level
//! that holds anything, atomically, and one wait covers every level. Every shard is asked
//! every round, so a lower level is taken from a shard only when that shard had nothing
//! higher at that moment, and a higher message waiting in another shard is taken in the
//! same round.
//!
//! Invariants:
//! - A queue without priorities never names the extra lists: its pops and waits are the
//!   single-key commands they always were (no cost, no `TRYAGAIN` from multi-key commands
//!   in a migrating slot).
//! - A message given back (a consumer closed, a pop no replica confirmed) goes back to the
//!   head of the level it was taken from.
//! - At-most-once queues only, and not with ordered groups (a key's high message would
//!   overtake its normal ones by design): both are refused with typed errors.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::placement::{ready_key, shard_key};

/// A message's priority level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Priority {
    /// Taken before normal and low messages.
    High,
    /// The default.
    #[default]
    Normal,
    /// Taken only when a shard holds nothing higher.
    Low,
}

/// The levels, highest first: the order a shard's lists are named in its pops.
pub const LEVELS: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

impl Priority {
    /// `high`, `normal` or `low`.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// The ready list of this level in a shard.
    pub fn ready_key(self, prefix: &str, tag: &str) -> String {
        match self {
            Priority::Normal => ready_key(prefix, tag),
            Priority::High => shard_key(prefix, tag, "ready:high"),
            Priority::Low => shard_key(prefix, tag, "ready:low"),
        }
    }

    /// The level whose ready list `key` is (a reply of `LMPOP` names it).
    pub(crate) fn of_key(key: &[u8]) -> Priority {
        if key.ends_with(b":ready:high") {
            Priority::High
        } else if key.ends_with(b":ready:low") {
            Priority::Low
        } else {
            Priority::Normal
        }
    }
}

/// Splits an `LMPOP`/`BLMPOP` reply: nil, or `[key, [payloads...]]`; the level is read
/// from the key.
pub(crate) fn split_mpop(v: redis::Value) -> Result<(Priority, Vec<bytes::Bytes>), Error> {
    use redis::Value;
    match v {
        Value::Nil => Ok((Priority::Normal, Vec::new())),
        Value::Array(mut parts) if parts.len() == 2 => {
            let items = parts.pop().expect("two parts");
            let level = match &parts[0] {
                Value::BulkString(k) => Priority::of_key(k),
                _ => Priority::Normal,
            };
            match items {
                Value::Array(items) => items
                    .into_iter()
                    .map(|i| match i {
                        Value::BulkString(b) => Ok(bytes::Bytes::from(b)),
                        other => Err(Error::Protocol(format!("pop: unexpected item {other:?}"))),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(|items| (level, items)),
                other => Err(Error::Protocol(format!("pop: unexpected items {other:?}"))),
            }
        }
        other => Err(Error::Protocol(format!(
            "LMPOP: unexpected reply {other:?}"
        ))),
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = Error;

    fn from_str(s: &str) -> Result<Priority, Error> {
        match s {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(Error::InvalidPriority(format!(
                "{other:?} is not a priority: use high, normal or low"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_name_their_lists_and_are_found_from_them() {
        for p in LEVELS {
            assert_eq!(p.as_str().parse::<Priority>().unwrap(), p);
            let key = p.ready_key("slotq", "q#3");
            assert_eq!(Priority::of_key(key.as_bytes()), p);
        }
        assert_eq!(
            Priority::Normal.ready_key("slotq", "q#3"),
            "slotq:{q#3}:ready"
        );
        assert!(matches!(
            "urgent".parse::<Priority>(),
            Err(Error::InvalidPriority(_))
        ));
        assert!(Priority::High < Priority::Normal && Priority::Normal < Priority::Low);
    }
}
