//! Human output helpers: aligned tables without colours (colours only where a TTY is).

/// Standard output written with plain `write(2)` calls on a duplicate of file descriptor 1,
/// so that how much was written is known exactly (the standard library's stdout buffers
/// lines, and a failed flush does not say what got out).
pub struct RawOut {
    file: std::fs::File,
}

impl RawOut {
    /// Duplicates standard output.
    pub fn stdout() -> std::io::Result<RawOut> {
        use std::os::fd::AsFd;
        let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
        Ok(RawOut {
            file: std::fs::File::from(fd),
        })
    }

    /// Writes all of `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        std::io::Write::write_all(&mut self.file, bytes)
    }

    /// Writes `items`, each followed by `sep`, as few writes as the kernel takes. Returns
    /// how many items were written whole, and the error that stopped the rest.
    pub fn write_items<'a>(
        &mut self,
        items: impl Iterator<Item = &'a [u8]>,
        sep: u8,
    ) -> (usize, Option<std::io::Error>) {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for item in items {
            buf.extend_from_slice(item);
            buf.push(sep);
            ends.push(buf.len());
        }
        let mut written = 0;
        let mut error = None;
        while written < buf.len() {
            match std::io::Write::write(&mut self.file, &buf[written..]) {
                Ok(0) => {
                    error = Some(std::io::Error::from(std::io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        (ends.iter().take_while(|&&e| e <= written).count(), error)
    }
}

/// Whether a write failed because the reader of a pipe went away.
pub fn is_closed_pipe(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Renders rows as left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Slot ranges as `0-5460,5462`.
pub fn ranges(r: &[std::ops::RangeInclusive<u16>]) -> String {
    r.iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A bar of `width` cells, `filled` of `total` full.
pub fn bar(filled: usize, total: usize, width: usize) -> String {
    let n = (filled * width + total / 2).checked_div(total).unwrap_or(0);
    format!("{}{}", "█".repeat(n), "░".repeat(width - n.min(width)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        for (raw, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"caf\xe9", "Y2Fm6Q=="),
        ] {
            assert_eq!(base64(raw), enc);
        }
    }

    #[test]
    fn table_aligns() {
        let t = table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "a    bb\nxxx  y\n");
    }

    #[test]
    fn ranges_and_bars() {
        assert_eq!(ranges(&[0..=10, 12..=12]), "0-10,12");
        assert_eq!(bar(1, 2, 4), "██░░");
        assert_eq!(bar(0, 0, 2), "░░");
    }
}
