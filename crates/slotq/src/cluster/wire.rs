//! What a connection writes: a request's bytes as parts, and writing many requests' parts
//! in one system call.
//!
//! A push of a thousand payloads is a short head before a body the producer already wrote
//! in RESP. Copied into one buffer per request, and again into one buffer per write, that
//! body crossed memory twice before the socket did its own copy. As parts, the body goes
//! from the producer's buffer straight to the socket (`writev`); only short pieces (heads,
//! whole small commands) are gathered into a buffer, because a system call per 30 bytes
//! would cost more than the copy.

use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Parts at least this long go to the socket from their own memory; shorter ones are
/// copied together.
pub(crate) const SHARE_FROM: usize = 2048;
/// Slices per `writev` (the system allows 1024).
const MAX_SLICES: usize = 128;

/// The bytes of one request, in order: short pieces gathered, long shared parts as they are.
#[derive(Debug, Default)]
pub(crate) struct Wire {
    parts: Vec<Bytes>,
    short: Vec<u8>,
}

impl Wire {
    /// An empty request expecting about `short` bytes of short pieces.
    pub(crate) fn with_capacity(short: usize) -> Wire {
        Wire {
            parts: Vec::new(),
            short: Vec::with_capacity(short),
        }
    }

    /// Where short pieces are appended (heads, built commands).
    pub(crate) fn short(&mut self) -> &mut Vec<u8> {
        &mut self.short
    }

    /// Appends `part`: shared if long, copied if short.
    pub(crate) fn put(&mut self, part: &Bytes) {
        if part.len() < SHARE_FROM {
            self.short.extend_from_slice(part);
        } else {
            self.seal();
            self.parts.push(part.clone());
        }
    }

    fn seal(&mut self) {
        if !self.short.is_empty() {
            let short = std::mem::take(&mut self.short);
            self.parts.push(Bytes::from(short));
        }
    }

    /// The parts, in order.
    pub(crate) fn into_parts(mut self) -> Vec<Bytes> {
        self.seal();
        self.parts
    }
}

impl From<Vec<u8>> for Wire {
    fn from(bytes: Vec<u8>) -> Wire {
        Wire {
            parts: Vec::new(),
            short: bytes,
        }
    }
}

/// Writes `parts` in order. With a writer that takes vectors (TCP), long parts go from
/// their own memory and runs of short ones through `scratch`; otherwise (TLS: one record
/// per call) everything is copied into `scratch` and written at once.
pub(crate) async fn write_parts<W: AsyncWrite + Unpin + ?Sized>(
    writer: &mut W,
    parts: &[Bytes],
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    if parts.len() == 1 {
        return writer.write_all(&parts[0]).await;
    }
    scratch.clear();
    if !writer.is_write_vectored() {
        for p in parts {
            scratch.extend_from_slice(p);
        }
        return writer.write_all(scratch).await;
    }
    // Segments in order: a range of `scratch` (short parts gathered) or a long part.
    let mut segments: Vec<Segment> = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        if p.len() >= SHARE_FROM {
            segments.push(Segment::Part(i));
        } else {
            let start = scratch.len();
            scratch.extend_from_slice(p);
            match segments.last_mut() {
                Some(Segment::Scratch(_, end)) if *end == start => *end = scratch.len(),
                _ => segments.push(Segment::Scratch(start, scratch.len())),
            }
        }
    }
    let bytes_of = |s: &Segment| -> &[u8] {
        match *s {
            Segment::Part(i) => &parts[i],
            Segment::Scratch(a, b) => &scratch[a..b],
        }
    };
    // The first unwritten segment and how much of it went already.
    let (mut at, mut done) = (0usize, 0usize);
    while at < segments.len() {
        let end = (at + MAX_SLICES).min(segments.len());
        let slices: Vec<IoSlice<'_>> = (at..end)
            .map(|k| {
                let b = bytes_of(&segments[k]);
                IoSlice::new(if k == at { &b[done..] } else { b })
            })
            .collect();
        let mut n = writer.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = bytes_of(&segments[at]).len() - done;
            if n >= left {
                n -= left;
                at += 1;
                done = 0;
            } else {
                done += n;
                n = 0;
            }
        }
        while at < segments.len() && bytes_of(&segments[at]).len() == done {
            at += 1;
            done = 0;
        }
    }
    Ok(())
}

enum Segment {
    Scratch(usize, usize),
    Part(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that takes at most `step` bytes a call, vectored or not.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        vectored: bool,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            self.calls += 1;
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut left = self.step;
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(left);
                self.out.extend_from_slice(&b[..k]);
                left -= k;
                n += k;
                if left == 0 {
                    break;
                }
            }
            self.calls += 1;
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn parts_of(sizes: &[usize]) -> (Vec<Bytes>, Vec<u8>) {
        let mut all = Vec::new();
        let parts = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let p: Vec<u8> = (0..n).map(|k| (i * 31 + k) as u8).collect();
                all.extend_from_slice(&p);
                Bytes::from(p)
            })
            .collect();
        (parts, all)
    }

    #[tokio::test]
    async fn parts_arrive_in_order_whatever_each_write_takes() {
        let sizes = [10, 5000, 0, 3, 7, 9000, 2047, 2048, 1, 0, 300, 70_000];
        let (parts, all) = parts_of(&sizes);
        for vectored in [true, false] {
            for step in [1, 7, 2048, 4096, 100_000] {
                let mut w = Trickle {
                    out: Vec::new(),
                    step,
                    vectored,
                    calls: 0,
                };
                let mut scratch = Vec::new();
                write_parts(&mut w, &parts, &mut scratch).await.unwrap();
                assert_eq!(w.out, all, "vectored {vectored}, step {step}");
            }
        }
    }

    #[tokio::test]
    async fn many_parts_take_few_calls() {
        // 300 short requests and 300 long parts: short runs are gathered, and each call
        // carries up to MAX_SLICES segments.
        let sizes: Vec<usize> = (0..600)
            .map(|i| if i % 2 == 0 { 40 } else { 4000 })
            .collect();
        let (parts, all) = parts_of(&sizes);
        let mut w = Trickle {
            out: Vec::new(),
            step: usize::MAX,
            vectored: true,
            calls: 0,
        };
        write_parts(&mut w, &parts, &mut Vec::new()).await.unwrap();
        assert_eq!(w.out, all);
        assert_eq!(w.calls, 600usize.div_ceil(MAX_SLICES));
    }

    #[test]
    fn a_wire_keeps_long_parts_apart_and_gathers_short_ones() {
        let mut w = Wire::with_capacity(16);
        w.short().extend_from_slice(b"*3\r\n");
        w.put(&Bytes::from_static(b"$5\r\nRPUSH\r\n"));
        let long = Bytes::from(vec![b'x'; SHARE_FROM]);
        w.put(&long);
        w.put(&Bytes::from_static(b"\r\n"));
        let parts = w.into_parts();
        assert_eq!(parts.len(), 3);
        assert_eq!(&parts[0][..], b"*3\r\n$5\r\nRPUSH\r\n");
        assert_eq!(
            parts[1].as_ptr(),
            long.as_ptr(),
            "the long part is shared, not copied"
        );
        assert_eq!(&parts[2][..], b"\r\n");
        assert!(Wire::default().into_parts().is_empty());
    }
}
