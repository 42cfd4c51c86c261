//! Envelopes that carry headers or a deadline (format 2, magic `0xA5 0x06`): the 28-byte
//! header of format 1 with its magic changed, then the extension of [`crate::meta`], then
//! the payload. The scripts read only the first 28 bytes (delivery count, enqueue time),
//! which both formats share.

use super::codec::{ENVELOPE_HEADER, ENVELOPE_MAGIC, push_string_header};
use crate::meta::Meta;

/// First two bytes of an envelope with an extension.
pub const EXT_ENVELOPE_MAGIC: [u8; 2] = [0xA5, 0x06];

/// Whether `e` starts like an envelope of either format.
pub(crate) fn is_envelope(e: &[u8]) -> bool {
    e.len() >= ENVELOPE_HEADER && (e[0..2] == ENVELOPE_MAGIC || e[0..2] == EXT_ENVELOPE_MAGIC)
}

/// What follows the 28-byte header: the extension's contents (format 2) and where the
/// payload starts; `None` when the extension cannot be read.
pub(crate) fn after_header(e: &[u8]) -> Option<(Option<Meta>, usize)> {
    if e[0..2] == ENVELOPE_MAGIC {
        return Some((None, ENVELOPE_HEADER));
    }
    let (meta, used) = crate::meta::decode_ext(&e[ENVELOPE_HEADER..])?;
    Some((Some(meta), ENVELOPE_HEADER + used))
}

/// Appends a format-2 envelope as a frame entry (`header` is a format-1 header; its magic
/// is changed here).
pub(crate) fn push_envelope_ext(
    body: &mut Vec<u8>,
    header: &[u8; ENVELOPE_HEADER],
    ext: &[u8],
    payload: &[u8],
) {
    push_string_header(body, ENVELOPE_HEADER + ext.len() + payload.len());
    body.extend_from_slice(&EXT_ENVELOPE_MAGIC);
    body.extend_from_slice(&header[2..]);
    body.extend_from_slice(ext);
    body.extend_from_slice(payload);
}
