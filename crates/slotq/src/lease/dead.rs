//! Dead letters that say why they died: the record `settle.lua` and `lease_pop.lua` write
//! around what they move to a shard's dead list (`dead_record` in `lua/frames.lua`), read
//! here. Pure functions, no I/O.
//!
//! | bytes | field |
//! |---|---|
//! | 0..2 | magic `0xA5 0x04` |
//! | 2 | reason (see [`DeadReason`]) |
//! | 3..11 | when it died, ms since the Unix epoch (server clock), u64 big-endian |
//! | 11..13 | detail length `d`, u16 big-endian (at most 1024) |
//! | 13..13+d | detail (text) |
//! | 13+d.. | what died: an envelope, or bytes no slotq producer wrote |
//!
//! Dead letters written before records existed are bare envelopes; they read as
//! [`DeadReason::Unknown`].

use std::str::FromStr;

use super::codec::MessageId;
use crate::error::Error;

/// First two bytes of every dead record.
pub const DEAD_MAGIC: [u8; 2] = [0xA5, 0x04];
/// Longest detail a dead record keeps, in bytes; a longer one is cut (at a character
/// boundary) rather than refused: a nack must never fail for its explanation.
pub const MAX_DEAD_DETAIL: usize = 1024;

/// Why a message went to the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The lease of its last allowed delivery ran out: no consumer settled it.
    Attempts,
    /// It was nacked on its last allowed delivery; the detail says why when the consumer
    /// said (`slotq consume --exec`: the handler's exit status and the tail of its stderr).
    Failed,
    /// A consumer dead-lettered it on purpose ([`Message::dead_letter`](crate::Message::dead_letter)).
    Rejected,
    /// Its deadline passed before it was delivered.
    Expired,
    /// Not a slotq frame or envelope (pushed by hand, or damaged): kept as found.
    Unreadable,
    /// Dead-lettered by a version that recorded no reason.
    Unknown,
}

impl DeadReason {
    /// The reason's name, as `slotq dead Q list` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Attempts => "attempts",
            DeadReason::Failed => "failed",
            DeadReason::Rejected => "rejected",
            DeadReason::Expired => "expired",
            DeadReason::Unreadable => "unreadable",
            DeadReason::Unknown => "unknown",
        }
    }

    /// The code stored in a record (0 for `Unknown`, which is never written).
    pub(crate) fn code(self) -> u8 {
        match self {
            DeadReason::Attempts => 1,
            DeadReason::Failed => 2,
            DeadReason::Rejected => 3,
            DeadReason::Expired => 4,
            DeadReason::Unreadable => 5,
            DeadReason::Unknown => 0,
        }
    }

    fn from_code(c: u8) -> DeadReason {
        match c {
            1 => DeadReason::Attempts,
            2 => DeadReason::Failed,
            3 => DeadReason::Rejected,
            4 => DeadReason::Expired,
            5 => DeadReason::Unreadable,
            _ => DeadReason::Unknown,
        }
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dead list element, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRecord<'a> {
    /// Why it died.
    pub reason: DeadReason,
    /// When, ms since the Unix epoch (server clock); `None` for an old bare envelope.
    pub died_ms: Option<u64>,
    /// What the consumer or the script said (may be empty).
    pub detail: String,
    /// What died: an envelope, or the bytes found.
    pub body: &'a [u8],
}

/// Reads a dead list element: a record, or (older versions) a bare element.
pub fn decode_dead(d: &[u8]) -> DeadRecord<'_> {
    let bare = DeadRecord {
        reason: if super::ext::is_envelope(d) {
            DeadReason::Unknown
        } else {
            DeadReason::Unreadable
        },
        died_ms: None,
        detail: String::new(),
        body: d,
    };
    if d.len() < 13 || d[0..2] != DEAD_MAGIC {
        return bare;
    }
    let len = u16::from_be_bytes([d[11], d[12]]) as usize;
    let Some(detail) = d.get(13..13 + len) else {
        return bare;
    };
    DeadRecord {
        reason: DeadReason::from_code(d[2]),
        died_ms: Some(u64::from_be_bytes(d[3..11].try_into().expect("8 bytes"))),
        detail: String::from_utf8_lossy(detail).into_owned(),
        body: &d[13 + len..],
    }
}

/// The id of the envelope a dead list element holds, if it holds one.
pub(crate) fn dead_id(d: &[u8]) -> Option<MessageId> {
    let body = decode_dead(d).body;
    if !super::ext::is_envelope(body) {
        return None;
    }
    Some(MessageId(body[2..18].try_into().expect("16 bytes")))
}

/// `detail` cut to [`MAX_DEAD_DETAIL`] bytes at a character boundary.
pub(crate) fn clip_detail(detail: &str) -> &str {
    if detail.len() <= MAX_DEAD_DETAIL {
        return detail;
    }
    let mut end = MAX_DEAD_DETAIL;
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    &detail[..end]
}

impl FromStr for MessageId {
    type Err = Error;

    /// 32 hexadecimal digits, as [`MessageId`]'s `Display` writes them.
    fn from_str(s: &str) -> Result<MessageId, Error> {
        let bad = || Error::InvalidMessageId(s.chars().take(64).collect());
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(MessageId(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reason: u8, when: u64, detail: &str, body: &[u8]) -> Vec<u8> {
        let mut r = DEAD_MAGIC.to_vec();
        r.push(reason);
        r.extend_from_slice(&when.to_be_bytes());
        r.extend_from_slice(&(detail.len() as u16).to_be_bytes());
        r.extend_from_slice(detail.as_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn records_and_bare_elements_read_back() {
        let env = super::super::encode_envelope_at(MessageId([7; 16]), b"pay", 5);
        let r = record(2, 1_700_000_000_123, "exit status 3", &env);
        let d = decode_dead(&r);
        assert_eq!(d.reason, DeadReason::Failed);
        assert_eq!(d.died_ms, Some(1_700_000_000_123));
        assert_eq!(d.detail, "exit status 3");
        assert_eq!(d.body, &env[..]);
        assert_eq!(dead_id(&r), Some(MessageId([7; 16])));

        let bare = decode_dead(&env);
        assert_eq!((bare.reason, bare.died_ms), (DeadReason::Unknown, None));
        assert_eq!(decode_dead(b"junk").reason, DeadReason::Unreadable);
        assert_eq!(dead_id(b"junk"), None);
        // A record whose detail runs past its end is shown as found.
        let mut cut = record(1, 1, "abcdef", b"");
        cut.truncate(15);
        assert_eq!(decode_dead(&cut).reason, DeadReason::Unreadable);
    }

    #[test]
    fn ids_parse_as_they_print_and_bad_ones_are_refused() {
        let id = MessageId([0xab; 16]);
        assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
        for bad in ["", "ab", &"g".repeat(32), &"é".repeat(16)] {
            assert!(matches!(
                bad.parse::<MessageId>(),
                Err(Error::InvalidMessageId(_))
            ));
        }
    }

    #[test]
    fn long_details_are_cut_at_a_character_boundary() {
        let long = "é".repeat(600);
        let c = clip_detail(&long);
        assert!(c.len() <= MAX_DEAD_DETAIL && c.len() >= MAX_DEAD_DETAIL - 1);
        assert_eq!(clip_detail("short"), "short");
    }
}
