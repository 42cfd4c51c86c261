//! A batch: the messages one push carries, written as that push will carry them, and the
//! signal its senders wait on.
//!
//! Payloads are copied once, when they are queued, into one buffer per batch: on plain
//! queues as the RESP bulk strings that follow `RPUSH key` (or the bounded push script's
//! head), on at-least-once queues as the frame's envelope entries. The push then writes a
//! short head before that buffer; nothing is formatted or allocated per message after
//! the send returns, and the caller's payloads are free to go (on the caller's thread).

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use tokio::sync::Notify;

use crate::cluster::{push_bulk, push_bulk_header};
use crate::error::Result;
use crate::lease::ENVELOPE_HEADER;

/// An extension with nothing in it: no deadline, no headers.
pub(super) const EMPTY_EXT: [u8; crate::meta::EXT_FIXED] = [0; crate::meta::EXT_FIXED];

#[derive(Default)]
pub(super) struct Batch {
    /// The messages, back to back, as their push carries them (see the module notes).
    body: Vec<u8>,
    /// Messages in `body`.
    count: usize,
    /// At-least-once queues: the first envelope's header (the frame head repeats its
    /// enqueue time).
    first: Option<[u8; ENVELOPE_HEADER]>,
    /// What the batch counts against `max_batch_bytes`.
    pub(super) bytes: usize,
    pub(super) keyed: bool,
    pub(super) signal: Arc<Signal>,
    /// When its first message was enqueued: a send's retry budget counts from there, so
    /// time spent queued behind a lane's failing push comes out of it.
    pub(super) born: Option<std::time::Instant>,
    /// A send with a dedup id: one message, pushed by `lua/push_dedup.lua`.
    pub(super) dedup: Option<String>,
    /// Scheduled messages, stored by `lua/schedule.lua`: the body holds (id, due ms,
    /// element) triples.
    pub(super) schedule: bool,
    /// The priority level whose ready list the batch goes to (queues with priorities).
    pub(super) level: crate::priority::Priority,
}

impl Batch {
    /// Messages in the batch.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Makes room for `n` more payloads of `payload_bytes` in all, with what each takes
    /// beside it (a RESP length line, or an envelope header on at-least-once queues).
    pub(super) fn reserve(&mut self, n: usize, payload_bytes: usize, reliable: bool) {
        let per = if reliable { ENVELOPE_HEADER + 5 } else { 16 };
        self.body.reserve(payload_bytes + n * per);
    }

    /// Adds a payload of a plain queue, as a RESP bulk string. One that begins with `0xA5`
    /// goes behind an empty extension (see `meta.rs`), so that no payload is ever read as
    /// one.
    pub(super) fn push_payload(&mut self, payload: &[u8]) {
        if crate::meta::needs_plain_ext(payload) {
            self.push_payload_ext(&EMPTY_EXT, payload);
            return;
        }
        push_bulk(&mut self.body, payload);
        self.count += 1;
    }

    /// Adds a payload of a plain queue behind an extension (headers, a deadline).
    pub(super) fn push_payload_ext(&mut self, ext: &[u8], payload: &[u8]) {
        push_bulk_header(&mut self.body, 2 + ext.len() + payload.len());
        self.body.extend_from_slice(&crate::meta::PLAIN_EXT_MAGIC);
        self.body.extend_from_slice(ext);
        self.body.extend_from_slice(payload);
        self.body.extend_from_slice(b"\r\n");
        self.count += 1;
    }

    /// Adds a message of an at-least-once queue with an extension: a format-2 envelope.
    pub(super) fn push_envelope_ext(
        &mut self,
        header: &[u8; ENVELOPE_HEADER],
        ext: &[u8],
        payload: &[u8],
    ) {
        crate::lease::push_envelope_ext(&mut self.body, header, ext, payload);
        self.first.get_or_insert(*header);
        self.count += 1;
    }

    /// Adds a scheduled message: its id, its due time and the element to push then (the
    /// payload, or on at-least-once queues the envelope: `head` then the payload), as
    /// three RESP bulk strings.
    pub(super) fn push_scheduled(&mut self, id: &[u8; 16], due_ms: u64, element: &[&[u8]]) {
        push_bulk(&mut self.body, id);
        push_bulk(&mut self.body, due_ms.to_string().as_bytes());
        push_bulk_header(&mut self.body, element.iter().map(|p| p.len()).sum());
        for p in element {
            self.body.extend_from_slice(p);
        }
        self.body.extend_from_slice(b"\r\n");
        self.bytes += element.last().map_or(0, |p| p.len());
        self.count += 1;
    }

    /// Adds a message of an at-least-once queue: its envelope, as a frame entry.
    pub(super) fn push_envelope(&mut self, header: &[u8; ENVELOPE_HEADER], payload: &[u8]) {
        crate::lease::push_envelope(&mut self.body, header, payload);
        self.first.get_or_insert(*header);
        self.count += 1;
    }

    /// The messages as written, handed over to be sent (the batch keeps its count and
    /// signal): plain queues' payloads as RESP bulk strings, at-least-once queues'
    /// envelopes as frame entries; [`Batch::len`] of them. No copy: a rerouted push sends
    /// the same bytes.
    pub(super) fn take_body(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.body))
    }

    /// At-least-once queues: what goes before the body (of `body_len` bytes, see
    /// [`Batch::take_body`]) to make the frame one RESP bulk string (its length line, then
    /// the frame's start; `\r\n` goes after), and the frame's head.
    pub(super) fn frame_open(&self, body_len: usize) -> (Vec<u8>, Vec<u8>) {
        let start = crate::lease::frame_start(self.count, 0);
        let len = start.len() + body_len;
        let head = crate::lease::frame_head_of(
            self.count,
            len,
            self.first.as_ref().unwrap_or(&[0; ENVELOPE_HEADER]),
        );
        let mut open = Vec::with_capacity(start.len() + 16);
        push_bulk_header(&mut open, len);
        open.extend_from_slice(&start);
        (open, head)
    }
}

/// Completion of one batch, awaited by every send in it.
#[derive(Default)]
pub(super) struct Signal {
    pub(super) done: OnceLock<Result<()>>,
    pub(super) notify: Notify,
}

impl Signal {
    pub(super) fn complete(&self, r: Result<()>) {
        let _ = self.done.set(r);
        self.notify.notify_waiters();
    }

    pub(super) async fn wait(&self) -> Result<()> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.done.get() {
                return r.clone();
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Command, Wire};
    use crate::lease::{MessageId, encode_envelope_at, encode_frame, envelope_header, frame_head};
    use proptest::prelude::*;

    fn wire(c: Command) -> Vec<u8> {
        let mut out = Wire::default();
        c.encode(&mut out);
        out.into_parts().concat()
    }

    proptest! {
        /// The push a batch makes is byte for byte the command built the old way from the
        /// same payloads: `RPUSH key p1 p2 ...` on plain queues, `RPUSH key head frame` on
        /// at-least-once queues.
        #[test]
        fn a_batch_pushes_what_a_built_command_would(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..40),
            id in any::<[u8; 16]>(),
        ) {
            let key = b"slotq:{q#1}:ready";
            let mut plain = Batch::default();
            let mut reliable = Batch::default();
            let header = envelope_header(MessageId(id), 7);
            for p in &payloads {
                plain.push_payload(p);
                reliable.push_envelope(&header, p);
            }
            prop_assert_eq!(plain.len(), payloads.len());
            let body = plain.take_body();
            let ours = wire(Command::with_body(&[b"RPUSH", key], plain.len(), vec![body]));
            let mut cmd = redis::cmd("RPUSH");
            cmd.arg(&key[..]);
            for p in &payloads {
                // A payload that begins with 0xA5 is stored behind an empty extension.
                if p.first() == Some(&0xA5) {
                    let mut e = crate::meta::PLAIN_EXT_MAGIC.to_vec();
                    e.extend_from_slice(&EMPTY_EXT);
                    e.extend_from_slice(p);
                    prop_assert_eq!(crate::meta::read_plain(&e).1, p.as_slice());
                    cmd.arg(e);
                } else {
                    cmd.arg(p.as_slice());
                }
            }
            prop_assert_eq!(ours, wire(Command::Built(cmd)));

            let body = reliable.take_body();
            let (open, head) = reliable.frame_open(body.len());
            let ours = wire(Command::with_body(
                &[b"RPUSH", key, &head],
                1,
                vec![open.into(), body, Bytes::from_static(b"\r\n")],
            ));
            let envelopes: Vec<Vec<u8>> =
                payloads.iter().map(|p| encode_envelope_at(MessageId(id), p, 7)).collect();
            let frame = encode_frame(&envelopes);
            let built = redis::cmd("RPUSH").arg(&key[..]).arg(frame_head(&frame)).arg(frame).clone();
            prop_assert_eq!(ours, wire(Command::Built(built)));
        }
    }
}
