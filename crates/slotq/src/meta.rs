//! What a message may carry beside its payload: headers (content type, correlation id, a
//! W3C `traceparent`, user metadata) and a deadline after which it is never delivered.
//! Pure functions, no I/O; producers write it, consumers read it.
//!
//! The **extension** both queue modes store (after the envelope header on at-least-once
//! queues, after a 2-byte magic on at-most-once ones; see docs/architecture.md):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | expires, ms since the Unix epoch (0: never), u64 big-endian |
//! | 8..10 | headers length `h`, u16 big-endian |
//! | 10..10+h | headers: per header a u8 key length, the key, a u16 BE value length, the value |
//!
//! Messages without headers or a deadline are stored as before (no extension), so they
//! cost what they cost: the plain path never looks for one unless the first byte says so.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Most bytes all of a message's headers take, encoded (keys, values and 3 bytes each).
pub const MAX_HEADERS_BYTES: usize = 4096;
/// Longest header key, in bytes.
pub const MAX_HEADER_KEY: usize = 128;
/// Longest time to live (ten years).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Bytes of the extension before its headers.
pub(crate) const EXT_FIXED: usize = 10;

/// First two bytes of an at-most-once message that carries an extension. An at-most-once
/// payload that begins with `0xA5` is always stored with one (even an empty one), so no
/// payload is ever mistaken for it.
pub const PLAIN_EXT_MAGIC: [u8; 2] = [0xA5, 0x07];

/// Headers and a time to live for a send ([`Producer::send_with`](crate::Producer::send_with)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    headers: Vec<(String, String)>,
    ttl: Option<Duration>,
    priority: crate::priority::Priority,
}

impl SendOptions {
    /// No headers, no deadline.
    pub fn new() -> SendOptions {
        SendOptions::default()
    }

    /// Adds a header (checked when sent: see [`check_header`]).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> SendOptions {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// The message is never delivered after `ttl` from the send: consumers drop it and
    /// count it, or (at-least-once queues, by default) dead-letter it with reason
    /// `expired`.
    pub fn ttl(mut self, ttl: Duration) -> SendOptions {
        self.ttl = Some(ttl);
        self
    }

    /// The message's priority level (queues created with priorities; see
    /// [`crate::priority`]). Normal by default.
    pub fn priority(mut self, level: crate::priority::Priority) -> SendOptions {
        self.priority = level;
        self
    }

    /// The priority level asked.
    pub fn level(&self) -> crate::priority::Priority {
        self.priority
    }

    /// Whether the messages carry an extension (headers or a deadline): a priority alone
    /// is where a message is stored, not part of it.
    pub(crate) fn carries_meta(&self) -> bool {
        !self.headers.is_empty() || self.ttl.is_some()
    }

    /// The headers, in the order added.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Whether there is nothing to carry and no priority asked (a plain send).
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
            && self.ttl.is_none()
            && self.priority == crate::priority::Priority::Normal
    }

    /// Checks every header and the time to live ([`Error::InvalidHeader`]), as a send
    /// would, without sending anything.
    pub fn check(&self) -> Result<()> {
        self.encode().map(|_| ())
    }

    /// Checks every header and the time to live, and encodes the extension.
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let expires = match self.ttl {
            None => 0,
            Some(t) if t.is_zero() || t > MAX_TTL => {
                return Err(Error::InvalidHeader(format!(
                    "a time to live must be more than 0 and at most {} days",
                    MAX_TTL.as_secs() / 86_400
                )));
            }
            Some(t) => now_ms() + t.as_millis() as u64,
        };
        let mut block = Vec::new();
        for (k, v) in &self.headers {
            check_header(k, v)?;
            block.push(k.len() as u8);
            block.extend_from_slice(k.as_bytes());
            block.extend_from_slice(&(v.len() as u16).to_be_bytes());
            block.extend_from_slice(v.as_bytes());
        }
        if block.len() > MAX_HEADERS_BYTES {
            return Err(Error::InvalidHeader(format!(
                "headers take {} bytes encoded, the most is {MAX_HEADERS_BYTES}",
                block.len()
            )));
        }
        let mut ext = Vec::with_capacity(EXT_FIXED + block.len());
        ext.extend_from_slice(&expires.to_be_bytes());
        ext.extend_from_slice(&(block.len() as u16).to_be_bytes());
        ext.extend_from_slice(&block);
        Ok(ext)
    }
}

/// Refuses an empty or oversized key, a key with characters other than visible ASCII
/// (or with `=`), and a value too long to fit.
pub fn check_header(key: &str, value: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_HEADER_KEY {
        return Err(Error::InvalidHeader(format!(
            "header key {key:?}: 1 to {MAX_HEADER_KEY} bytes"
        )));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic() && b != b'=') {
        return Err(Error::InvalidHeader(format!(
            "header key {key:?}: visible ASCII characters only, no '='"
        )));
    }
    if value.len() > MAX_HEADERS_BYTES {
        return Err(Error::InvalidHeader(format!(
            "header {key:?}: value of {} bytes, the most for all headers is {MAX_HEADERS_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

/// What a message carried: its headers and deadline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Headers, in the order sent.
    pub headers: Vec<(String, String)>,
    /// When it expires (ms since the Unix epoch), if it does.
    pub expires_ms: Option<u64>,
}

impl Meta {
    /// Whether its deadline has passed (on this machine's clock).
    pub fn expired(&self) -> bool {
        self.expires_ms.is_some_and(|e| e <= now_ms())
    }
}

/// Reads an extension at the start of `b`: what it says and how many bytes it took; `None`
/// when it is cut short or its headers are not readable.
pub(crate) fn decode_ext(b: &[u8]) -> Option<(Meta, usize)> {
    let expires = u64::from_be_bytes(b.get(0..8)?.try_into().ok()?);
    let len = u16::from_be_bytes(b.get(8..10)?.try_into().ok()?) as usize;
    let mut block = b.get(EXT_FIXED..EXT_FIXED + len)?;
    let mut headers = Vec::new();
    while !block.is_empty() {
        let k = *block.first()? as usize;
        let key = std::str::from_utf8(block.get(1..1 + k)?).ok()?;
        let v = u16::from_be_bytes(block.get(1 + k..3 + k)?.try_into().ok()?) as usize;
        let value = String::from_utf8_lossy(block.get(3 + k..3 + k + v)?);
        headers.push((key.to_string(), value.into_owned()));
        block = &block[3 + k + v..];
    }
    Some((
        Meta {
            headers,
            expires_ms: (expires > 0).then_some(expires),
        },
        EXT_FIXED + len,
    ))
}

/// An at-most-once element as stored: the payload alone, or (options given, or a payload
/// that begins with `0xA5`) [`PLAIN_EXT_MAGIC`], the extension and the payload.
pub(crate) fn needs_plain_ext(payload: &[u8]) -> bool {
    payload.first() == Some(&0xA5)
}

/// An at-most-once list element as a reader sees it: what its extension says (if it has
/// one) and the payload. For tools that read lists themselves (`slotq peek`).
pub fn read_plain(element: &[u8]) -> (Option<Meta>, &[u8]) {
    match split_plain(element) {
        Some((meta, at)) => (Some(meta).filter(|m| *m != Meta::default()), &element[at..]),
        None => (None, element),
    }
}

/// Splits an at-most-once element into its extension's contents and where the payload
/// starts; `None` for a plain payload (or one whose extension cannot be read: then it is
/// handed out as it is).
pub(crate) fn split_plain(element: &[u8]) -> Option<(Meta, usize)> {
    if element.get(0..2) != Some(&PLAIN_EXT_MAGIC[..]) {
        return None;
    }
    let (meta, used) = decode_ext(&element[2..])?;
    Some((meta, 2 + used))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_round_trip_and_bad_headers_are_refused() {
        let o = SendOptions::new()
            .header("content-type", "application/json")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .ttl(Duration::from_secs(60));
        let ext = o.encode().unwrap();
        let (meta, used) = decode_ext(&ext).unwrap();
        assert_eq!(used, ext.len());
        assert_eq!(meta.headers, o.headers());
        assert!(meta.expires_ms.unwrap() > now_ms() + 59_000 && !meta.expired());
        for (k, v) in [("", "x"), ("a=b", "x"), ("sp ace", "x"), ("é", "x")] {
            assert!(matches!(
                SendOptions::new().header(k, v).encode(),
                Err(Error::InvalidHeader(_))
            ));
        }
        let big = "v".repeat(MAX_HEADERS_BYTES);
        assert!(SendOptions::new().header("k", &big).encode().is_err());
        assert!(SendOptions::new().ttl(Duration::ZERO).encode().is_err());
        let mut plain = PLAIN_EXT_MAGIC.to_vec();
        plain.extend_from_slice(&ext);
        plain.extend_from_slice(b"payload");
        let (m, at) = split_plain(&plain).unwrap();
        assert_eq!((&plain[at..], m.headers.len()), (&b"payload"[..], 2));
        assert!(split_plain(b"payload").is_none());
        assert!(decode_ext(&ext[..5]).is_none());
    }
}
