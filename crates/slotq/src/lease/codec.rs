//! The bytes of at-least-once messages: the envelope around each payload and the frame
//! that carries a producer batch of envelopes in one list element (formats in the
//! [module documentation](super)). Pure functions, no I/O.

use bytes::Bytes;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Bytes before the payload in an envelope.
pub const ENVELOPE_HEADER: usize = 28;
/// First two bytes of every envelope.
pub const ENVELOPE_MAGIC: [u8; 2] = [0xA5, 0x01];
/// First two bytes of every frame.
pub const FRAME_MAGIC: [u8; 2] = [0xA5, 0x02];
/// Most messages in one frame.
pub const MAX_FRAME: usize = 8192;
/// First two bytes of every frame head.
pub const FRAME_HEAD_MAGIC: [u8; 2] = [0xA5, 0x03];
/// Bytes in a frame head.
pub const FRAME_HEAD_LEN: usize = 16;

/// The head a frame is stored behind in a ready list: `0xA5 0x03`, the frame's message
/// count (u16 BE), its length in bytes (u32 BE), and the enqueue time of its first envelope
/// (u64 BE ms, zero when it has none). Scripts read heads, never frames (see
/// `lua/frames.lua`).
pub fn frame_head(frame: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(FRAME_HEAD_LEN);
    h.extend_from_slice(&FRAME_HEAD_MAGIC);
    h.extend_from_slice(frame.get(2..4).unwrap_or(&[0, 0]));
    h.extend_from_slice(&(frame.len().min(u32::MAX as usize) as u32).to_be_bytes());
    let first = first_envelope(frame).and_then(|e| e.get(20..28));
    h.extend_from_slice(first.unwrap_or(&[0; 8]));
    h
}

/// What a frame head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// Messages in the frame.
    pub count: usize,
    /// The frame's length in bytes.
    pub bytes: usize,
    /// Enqueue time of the frame's first message, ms since the Unix epoch (0: not known).
    pub first_enqueued_ms: u64,
}

/// Reads a frame head; `None` for anything else (a frame, a KEEP entry).
pub fn decode_frame_head(h: &[u8]) -> Option<FrameHead> {
    if h.len() != FRAME_HEAD_LEN || h[0..2] != FRAME_HEAD_MAGIC {
        return None;
    }
    Some(FrameHead {
        count: u16::from_be_bytes([h[2], h[3]]) as usize,
        bytes: u32::from_be_bytes(h[4..8].try_into().expect("4 bytes")) as usize,
        first_enqueued_ms: u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
    })
}

/// The bytes of a frame's first envelope, read from the msgpack headers alone.
fn first_envelope(f: &[u8]) -> Option<&[u8]> {
    let be = |s: &[u8]| s.iter().fold(0usize, |acc, &x| (acc << 8) | x as usize);
    let start = match *f.get(4)? {
        0x91..=0x9f => 5,
        0xdc => 7,
        0xdd => 9,
        _ => return None,
    };
    let h = *f.get(start)?;
    let (from, len) = match h {
        0xa0..=0xbf => (start + 1, (h & 0x1f) as usize),
        0xd9 | 0xc4 => (start + 2, be(f.get(start + 1..start + 2)?)),
        0xda | 0xc5 => (start + 3, be(f.get(start + 1..start + 3)?)),
        0xdb | 0xc6 => (start + 5, be(f.get(start + 1..start + 5)?)),
        _ => return None,
    };
    f.get(from..from.checked_add(len)?)
}

/// Packs envelopes into a frame.
pub fn encode_frame(envelopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = frame_start(envelopes.len(), envelopes.iter().map(Vec::len).sum());
    for e in envelopes {
        push_string_header(&mut f, e.len());
        f.extend_from_slice(e);
    }
    f
}

/// Appends one envelope, given as its header and payload, to the body of a frame being
/// written (its msgpack string header, then both): each payload is copied once, straight
/// into the frame, with no envelope built on its own. [`frame_start`] of the count goes
/// before the body.
pub(crate) fn push_envelope(body: &mut Vec<u8>, header: &[u8; ENVELOPE_HEADER], payload: &[u8]) {
    push_string_header(body, ENVELOPE_HEADER + payload.len());
    body.extend_from_slice(header);
    body.extend_from_slice(payload);
}

/// The head of a frame of `count` envelopes, `len` bytes long, whose first envelope has
/// `header` ([`frame_head`] without the frame at hand).
pub(crate) fn frame_head_of(count: usize, len: usize, header: &[u8; ENVELOPE_HEADER]) -> Vec<u8> {
    let mut h = Vec::with_capacity(FRAME_HEAD_LEN);
    h.extend_from_slice(&FRAME_HEAD_MAGIC);
    h.extend_from_slice(&(count.min(u16::MAX as usize) as u16).to_be_bytes());
    h.extend_from_slice(&(len.min(u32::MAX as usize) as u32).to_be_bytes());
    h.extend_from_slice(&header[20..28]);
    h
}

/// A frame's magic, count and msgpack array header, with room for `n` envelopes of
/// `bytes` in all.
pub(crate) fn frame_start(n: usize, bytes: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(bytes + 5 * n + 9);
    f.extend_from_slice(&FRAME_MAGIC);
    f.extend_from_slice(&(n as u16).to_be_bytes());
    if n < 16 {
        f.push(0x90 | n as u8);
    } else if n <= 0xffff {
        f.push(0xdc);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0xdd);
        f.extend_from_slice(&(n as u32).to_be_bytes());
    }
    f
}

/// The msgpack header of a string of `len` bytes.
pub(crate) fn push_string_header(f: &mut Vec<u8>, len: usize) {
    if len < 32 {
        f.push(0xa0 | len as u8);
    } else if len <= 0xff {
        f.extend_from_slice(&[0xd9, len as u8]);
    } else if len <= 0xffff {
        f.push(0xda);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0xdb);
        f.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// Unpacks a frame into its envelopes.
pub fn decode_frame(f: &[u8]) -> Result<Vec<Vec<u8>>> {
    if f.len() < 5 || f[0..2] != FRAME_MAGIC {
        return Err(Error::Protocol("not a slotq frame".into()));
    }
    let envelopes = unpack_strings(&f[4..])?;
    if envelopes.len() != u16::from_be_bytes([f[2], f[3]]) as usize {
        return Err(Error::Protocol(
            "frame count does not match its contents".into(),
        ));
    }
    Ok(envelopes)
}

/// A message id: 16 bytes, unique per message, the same on every delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Wraps a payload in an envelope, enqueued now.
pub fn encode_envelope(id: MessageId, payload: &[u8]) -> Vec<u8> {
    encode_envelope_at(id, payload, now_ms())
}

/// Milliseconds since the Unix epoch, on this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Wraps a payload in an envelope enqueued at `now` (ms since the Unix epoch): a batch
/// reads the clock once, not once per message.
pub fn encode_envelope_at(id: MessageId, payload: &[u8], now: u64) -> Vec<u8> {
    let mut e = Vec::with_capacity(ENVELOPE_HEADER + payload.len());
    e.extend_from_slice(&envelope_header(id, now));
    e.extend_from_slice(payload);
    e
}

/// The bytes an envelope puts before its payload: magic, id, no delivery yet, enqueue
/// time (ms since the Unix epoch).
pub(crate) fn envelope_header(id: MessageId, now: u64) -> [u8; ENVELOPE_HEADER] {
    let mut h = [0u8; ENVELOPE_HEADER];
    h[0..2].copy_from_slice(&ENVELOPE_MAGIC);
    h[2..18].copy_from_slice(&id.0);
    h[20..28].copy_from_slice(&now.to_be_bytes());
    h
}

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The message id.
    pub id: MessageId,
    /// Deliveries before the current one.
    pub deliveries: u16,
    /// Enqueue time, ms since the Unix epoch.
    pub enqueued_ms: u64,
    /// The payload.
    pub payload: Vec<u8>,
    /// Headers and deadline, for envelopes that carry them (format 2).
    pub meta: Option<crate::meta::Meta>,
}

/// An envelope of a frame as it was read: its payload a slice of the frame (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharedEnvelope {
    pub(crate) id: MessageId,
    pub(crate) deliveries: u16,
    pub(crate) enqueued_ms: u64,
    pub(crate) payload: Bytes,
    pub(crate) meta: Option<crate::meta::Meta>,
}

/// Unwraps an envelope `e` held in `frame`: the payload stays in the frame's buffer.
fn decode_envelope_in(frame: &Bytes, e: &[u8]) -> Result<SharedEnvelope> {
    if !super::ext::is_envelope(e) {
        return Err(not_an_envelope());
    }
    let (meta, start) = super::ext::after_header(e).ok_or_else(not_an_envelope)?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&e[2..18]);
    Ok(SharedEnvelope {
        id: MessageId(id),
        deliveries: u16::from_be_bytes([e[18], e[19]]),
        enqueued_ms: u64::from_be_bytes(e[20..28].try_into().expect("8 bytes")),
        payload: frame.slice_ref(&e[start..]),
        meta,
    })
}

fn not_an_envelope() -> Error {
    Error::Protocol(
        "not a slotq envelope (was the queue written by an at-most-once producer?)".into(),
    )
}

/// Hands every envelope of a frame to `each`, decoded, each payload a slice of the frame;
/// returns how many there were. Nothing is handed out from a frame whose count or
/// layout is wrong.
pub(crate) fn for_each_envelope(f: &Bytes, mut each: impl FnMut(SharedEnvelope)) -> Result<usize> {
    if f.len() < 5 || f[0..2] != FRAME_MAGIC {
        return Err(Error::Protocol("not a slotq frame".into()));
    }
    let mut slices = Vec::with_capacity(u16::from_be_bytes([f[2], f[3]]) as usize);
    strings(&f[4..], |s| slices.push(s))?;
    if slices.len() != u16::from_be_bytes([f[2], f[3]]) as usize {
        return Err(Error::Protocol(
            "frame count does not match its contents".into(),
        ));
    }
    if slices.iter().any(|e| !super::ext::is_envelope(e)) {
        return Err(not_an_envelope());
    }
    for e in &slices {
        each(decode_envelope_in(f, e)?);
    }
    Ok(slices.len())
}

/// Unwraps an envelope.
pub fn decode_envelope(mut e: Vec<u8>) -> Result<Envelope> {
    if !super::ext::is_envelope(&e) {
        return Err(not_an_envelope());
    }
    let (meta, start) = super::ext::after_header(&e).ok_or_else(not_an_envelope)?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&e[2..18]);
    let deliveries = u16::from_be_bytes([e[18], e[19]]);
    let enqueued_ms = u64::from_be_bytes(e[20..28].try_into().expect("8 bytes"));
    e.drain(..start);
    Ok(Envelope {
        id: MessageId(id),
        deliveries,
        enqueued_ms,
        payload: e,
        meta,
    })
}

/// The frames of a lease stored in place (in the inflight hash): one frame as it is, more
/// as a msgpack array of frames.
pub(crate) fn frames_of_lease(stored: &[u8]) -> Result<Vec<Vec<u8>>> {
    if stored.len() >= 5 && stored[0..2] == FRAME_MAGIC {
        Ok(vec![stored.to_vec()])
    } else {
        unpack_strings(stored)
    }
}

/// Decodes a msgpack array of strings, borrowing nothing: each string is copied out once.
pub(crate) fn unpack_strings(b: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    strings(b, |s| out.push(s.to_vec()))?;
    Ok(out)
}

/// Walks a msgpack array of strings (what `cmsgpack.pack` makes of a Lua list of strings),
/// handing each string to `each` as a slice of `b`; returns how many there were.
fn strings<'b>(b: &'b [u8], mut each: impl FnMut(&'b [u8])) -> Result<usize> {
    let bad = || Error::Protocol("lease: malformed msgpack".into());
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&'b [u8]> {
        let s = b
            .get(at..at.checked_add(n).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        at += n;
        Ok(s)
    };
    let be = |s: &[u8]| s.iter().fold(0usize, |acc, &x| (acc << 8) | x as usize);
    let head = take(1)?[0];
    let len = match head {
        0x90..=0x9f => (head & 0x0f) as usize,
        0xdc => be(take(2)?),
        0xdd => be(take(4)?),
        _ => return Err(bad()),
    };
    for _ in 0..len {
        let h = take(1)?[0];
        let n = match h {
            0xa0..=0xbf => (h & 0x1f) as usize,
            0xd9 | 0xc4 => be(take(1)?),
            0xda | 0xc5 => be(take(2)?),
            0xdb | 0xc6 => be(take(4)?),
            _ => return Err(bad()),
        };
        each(take(n)?);
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_lease_is_stored_as_its_one_frame_or_an_array_of_frames() {
        let envs = vec![encode_envelope(MessageId([7; 16]), b"payload")];
        let f = encode_frame(&envs);
        assert_eq!(frames_of_lease(&f).unwrap(), vec![f.clone()]);
        // Two frames: a msgpack array of two strings (as `cmsgpack.pack` writes it).
        let mut two = vec![0x92];
        for _ in 0..2 {
            two.extend_from_slice(&[0xd9, f.len() as u8]);
            two.extend_from_slice(&f);
        }
        assert_eq!(frames_of_lease(&two).unwrap(), vec![f.clone(), f]);
    }

    #[test]
    fn a_frame_head_tells_count_length_and_first_enqueue_time() {
        for n in [1usize, 15, 16, 300] {
            let envs: Vec<Vec<u8>> = (0..n)
                .map(|i| encode_envelope(MessageId([i as u8; 16]), &vec![b'p'; 40 + i]))
                .collect();
            let f = encode_frame(&envs);
            let h = frame_head(&f);
            let d = decode_frame_head(&h).expect("a head");
            assert_eq!(d.count, n);
            assert_eq!(d.bytes, f.len());
            let first = decode_envelope(envs[0].clone()).unwrap();
            assert_eq!(d.first_enqueued_ms, first.enqueued_ms);
        }
        let empty = frame_head(&encode_frame(&[]));
        assert_eq!(decode_frame_head(&empty).unwrap().first_enqueued_ms, 0);
        assert!(decode_frame_head(&encode_frame(&[])).is_none());
        assert!(decode_frame_head(b"~").is_none());
    }

    #[test]
    fn frames_round_trip() {
        for n in [0usize, 1, 15, 16, 300] {
            let envs: Vec<Vec<u8>> = (0..n)
                .map(|i| encode_envelope(MessageId([i as u8; 16]), &vec![b'p'; i * 3]))
                .collect();
            let f = encode_frame(&envs);
            assert_eq!(decode_frame(&f).unwrap(), envs, "{n} envelopes");
        }
        assert!(decode_frame(b"\xA5\x01junk").is_err());
    }

    #[test]
    fn msgpack_arrays_of_strings() {
        // fixarray of fixstr "a", str8 of 40 bytes.
        let mut b = vec![0x92, 0xa1, b'a', 0xd9, 40];
        b.extend_from_slice(&[b'x'; 40]);
        assert_eq!(
            unpack_strings(&b).unwrap(),
            vec![b"a".to_vec(), vec![b'x'; 40]]
        );
        // array16 of one str16.
        let mut b = vec![0xdc, 0, 1, 0xda, 1, 0];
        b.extend_from_slice(&[7; 256]);
        assert_eq!(unpack_strings(&b).unwrap(), vec![vec![7; 256]]);
        assert!(unpack_strings(&[0x92, 0xa1]).is_err());
        assert!(unpack_strings(&[0x01]).is_err());
    }

    #[test]
    fn envelope_round_trip() {
        let id = MessageId([7; 16]);
        let e = encode_envelope(id, b"hello");
        assert_eq!(e.len(), ENVELOPE_HEADER + 5);
        assert_eq!(&e[..2], &ENVELOPE_MAGIC);
        let d = decode_envelope(e).unwrap();
        assert_eq!(d.id, id);
        assert_eq!(d.deliveries, 0);
        assert_eq!(d.payload, b"hello");
        assert!(d.enqueued_ms > 1_600_000_000_000);
        assert!(decode_envelope(b"raw payload".to_vec()).is_err());
        assert_eq!(id.to_string(), "07".repeat(16));
    }
    proptest! {
        #[test]
        fn any_envelopes_round_trip_through_a_frame(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
            id in any::<[u8; 16]>(),
        ) {
            let envs: Vec<Vec<u8>> = payloads.iter().map(|p| encode_envelope_at(MessageId(id), p, 7)).collect();
            let frame = encode_frame(&envs);
            // Written from headers and payloads, the frame is the same bytes, and so is
            // its head.
            let header = envelope_header(MessageId(id), 7);
            let mut written = frame_start(payloads.len(), 0);
            let mut body = Vec::new();
            for p in &payloads {
                push_envelope(&mut body, &header, p);
            }
            written.extend_from_slice(&body);
            prop_assert_eq!(&written, &frame);
            if !payloads.is_empty() {
                prop_assert_eq!(frame_head_of(payloads.len(), frame.len(), &header), frame_head(&frame));
            }
            let back = decode_frame(&frame).unwrap();
            prop_assert_eq!(&back, &envs);
            let mut direct = Vec::new();
            let shared = Bytes::from(frame.clone());
            prop_assert_eq!(for_each_envelope(&shared, |e| direct.push(e)).unwrap(), envs.len());
            let direct: Vec<Envelope> = direct
                .into_iter()
                .map(|e| Envelope { id: e.id, deliveries: e.deliveries, enqueued_ms: e.enqueued_ms, payload: e.payload.to_vec(), meta: e.meta })
                .collect();
            let via_vec: Vec<Envelope> = back.iter().map(|e| decode_envelope(e.clone()).unwrap()).collect();
            prop_assert_eq!(direct, via_vec);
            for (e, p) in back.into_iter().zip(&payloads) {
                let d = decode_envelope(e).unwrap();
                prop_assert_eq!(d.id, MessageId(id));
                prop_assert_eq!(&d.payload, p);
            }
            // Any cut of a frame is refused, never a panic or a short read taken as whole.
            for cut in 0..frame.len() {
                prop_assert!(decode_frame(&frame[..cut]).is_err() || envs.is_empty());
            }
        }

        #[test]
        fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame(&bytes);
            let _ = frame_head(&bytes);
            let _ = for_each_envelope(&Bytes::from(bytes.clone()), |_| {});
            let _ = decode_frame_head(&bytes);
            let _ = unpack_strings(&bytes);
            let _ = decode_envelope(bytes);
        }
    }
}
