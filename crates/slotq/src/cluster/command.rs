//! Commands as the router sends them: built with [`redis::Cmd`], or already written in
//! RESP by their caller.
//!
//! A push of a thousand payloads built as a `Cmd` copies every payload twice before the
//! socket (into the command, then into the write) and formats a length per argument each
//! time. A producer instead writes each payload as a RESP bulk string once, as it is
//! queued ([`push_bulk`]), and the push is a head (`*N`, `RPUSH`, the key) before those
//! bytes ([`Command::with_body`]), which it shares (`Bytes`) down to the socket's `writev`
//! (see `wire.rs`).

use bytes::Bytes;
use redis::Cmd;

use super::wire::{SHARE_FROM, Wire};

/// One command for [`super::Cluster::batch_commands`].
#[derive(Debug, Clone)]
pub(crate) enum Command {
    /// Encoded when it is written.
    Built(Cmd),
    /// Already RESP: a whole command (`*N\r\n` and its `N` bulk strings), written as its
    /// head and then the parts of its body, back to back.
    Resp { head: Vec<u8>, body: Vec<Bytes> },
}

impl Command {
    /// A command of the bulk strings `head`, then `body_args` more already written as RESP
    /// bulk strings (by [`push_bulk`]) in `body`, whose parts go out back to back (shared,
    /// not copied, until the write).
    pub(crate) fn with_body(head: &[&[u8]], body_args: usize, body: Vec<Bytes>) -> Command {
        let mut out = Vec::with_capacity(16 + head.iter().map(|a| a.len() + 16).sum::<usize>());
        push_array_header(&mut out, head.len() + body_args);
        for arg in head {
            push_bulk(&mut out, arg);
        }
        Command::Resp { head: out, body }
    }

    /// About how many bytes the command takes on the wire (exact for [`Command::Resp`]).
    pub(crate) fn encoded_len(&self) -> usize {
        match self {
            Command::Built(cmd) => {
                16 + cmd
                    .args_iter()
                    .map(|a| match a {
                        redis::Arg::Simple(b) => b.len() + 16,
                        _ => 24,
                    })
                    .sum::<usize>()
            }
            Command::Resp { head, body } => head.len() + body.iter().map(Bytes::len).sum::<usize>(),
        }
    }

    /// About how many bytes of the command [`Command::encode`] copies (its short pieces).
    pub(crate) fn short_len(&self) -> usize {
        match self {
            Command::Built(_) => self.encoded_len(),
            Command::Resp { head, body } => {
                head.len()
                    + body
                        .iter()
                        .map(Bytes::len)
                        .filter(|&n| n < SHARE_FROM)
                        .sum::<usize>()
            }
        }
    }

    /// Appends the command's RESP to `out`: a body's long parts shared, not copied.
    pub(crate) fn encode(&self, out: &mut Wire) {
        match self {
            Command::Built(cmd) => cmd.write_packed_command(out.short()),
            Command::Resp { head, body } => {
                out.short().extend_from_slice(head);
                for part in body {
                    out.put(part);
                }
            }
        }
    }
}

impl From<Cmd> for Command {
    fn from(cmd: Cmd) -> Command {
        Command::Built(cmd)
    }
}

/// Appends `arg` as a RESP bulk string (`$len\r\n`, the bytes, `\r\n`).
pub(crate) fn push_bulk(out: &mut Vec<u8>, arg: &[u8]) {
    out.reserve(arg.len() + 25);
    push_bulk_header(out, arg.len());
    out.extend_from_slice(arg);
    out.push(b'\r');
    out.push(b'\n');
}

/// Appends the length line of a RESP bulk string of `len` bytes (`$len\r\n`).
pub(crate) fn push_bulk_header(out: &mut Vec<u8>, len: usize) {
    out.push(b'$');
    push_decimal(out, len);
    out.push(b'\r');
    out.push(b'\n');
}

fn push_array_header(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Byte by byte: a payload's length is two or three digits, and a copy of so few bytes
/// through `memmove` cost more than the payload's own (a tenth of the producer's time).
fn push_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A command written as a head and a body of bulk strings is byte for byte the
        /// command `redis::Cmd` writes from the same arguments.
        #[test]
        fn a_command_with_a_body_is_the_built_one(
            head in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 1..4),
            args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..40),
        ) {
            let mut body = Vec::new();
            for a in &args {
                push_bulk(&mut body, a);
            }
            let expected_len: usize = args.iter().map(|a| a.len() + 5 + a.len().to_string().len()).sum();
            prop_assert_eq!(body.len(), expected_len);
            let heads: Vec<&[u8]> = head.iter().map(Vec::as_slice).collect();
            let resp = Command::with_body(&heads, args.len(), vec![Bytes::from(body)]);
            let mut cmd = redis::Cmd::new();
            for a in head.iter().chain(&args) {
                cmd.arg(a.as_slice());
            }
            let (mut ours, mut theirs) = (Wire::default(), Wire::default());
            resp.encode(&mut ours);
            Command::Built(cmd).encode(&mut theirs);
            let (ours, theirs) = (ours.into_parts().concat(), theirs.into_parts().concat());
            prop_assert_eq!(resp.encoded_len(), ours.len());
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn decimals_are_written_at_every_power_of_ten() {
        for n in [0, 9, 10, 99, 100, 65_535, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }
}
