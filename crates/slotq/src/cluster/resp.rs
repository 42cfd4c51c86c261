//! A lean RESP2 reply parser for the hot path.
//!
//! Replies are parsed straight from the read buffer into [`redis::Value`]s, so the rest of
//! the crate (and its users) keep the `redis` crate's types. Error replies, which are rare,
//! are handed to `redis::parse_redis_value` so that they become the same
//! `Value::ServerError` the `redis` crate would produce.

use bytes::Bytes;
use redis::Value;

/// A reply as a connection hands it over.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// Any reply, as the `redis` crate's value.
    Value(Value),
    /// An array of bulk strings, each a slice of the buffer it was read into: popped
    /// payloads reach their messages without a copy or an allocation each. Only for
    /// requests that ask for it.
    Items(Items),
}

/// The bulk strings of an array reply: the reply's buffer and where each string lies in
/// it. A string becomes a [`Bytes`] (a slice of that buffer) only when it is taken, so a
/// pop's payloads go straight into their messages, with no vector of slices between.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Items {
    buf: Bytes,
    spans: Vec<(usize, usize)>,
}

impl Items {
    /// Strings in the array.
    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    /// Each string, in order, as a slice of the reply's buffer.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Bytes> + '_ {
        self.spans.iter().map(|&(a, b)| self.buf.slice(a..b))
    }

    /// The strings as a vector of slices.
    pub(crate) fn into_vec(self) -> Vec<Bytes> {
        self.iter().collect()
    }
}

impl Reply {
    /// As a `redis` value (arrays of items become arrays of bulk strings, copied).
    pub(crate) fn into_value(self) -> Value {
        match self {
            Reply::Value(v) => v,
            Reply::Items(items) => Value::Array(
                items
                    .iter()
                    .map(|b| Value::BulkString(b.to_vec()))
                    .collect(),
            ),
        }
    }
}

/// Parses `whole`, exactly one whole reply: an array whose elements are all bulk strings
/// (not nil) becomes [`Reply::Items`], slices of `whole`; anything else a value, as
/// [`parse`] makes it.
pub(crate) fn parse_items(whole: Bytes) -> Result<Reply, ProtocolError> {
    if let Some(items) = items_of(&whole)? {
        return Ok(Reply::Items(items));
    }
    match parse(&whole)? {
        Some((v, n)) if n == whole.len() => Ok(Reply::Value(v)),
        _ => Err(ProtocolError("reply shorter than announced".into())),
    }
}

/// The bulk strings of an array of bulk strings, or `None` for any other reply.
fn items_of(whole: &Bytes) -> Result<Option<Items>, ProtocolError> {
    let Some((n, mut at)) = header(whole, 0, b'*')? else {
        return Ok(None);
    };
    let mut spans = Vec::with_capacity((n as usize).min(whole.len() / 4));
    for _ in 0..n {
        let Some((len, next)) = header(whole, at, b'$')? else {
            return Ok(None);
        };
        let end = next + len as usize;
        if whole.len() < end + 2 || &whole[end..end + 2] != b"\r\n" {
            return Ok(None);
        }
        spans.push((next, end));
        at = end + 2;
    }
    Ok((at == whole.len()).then(|| Items {
        buf: whole.clone(),
        spans,
    }))
}

/// The length in a `kind` line at `at` (`*n` or `$n`) and where the line ends; `None` for
/// another kind of line, a negative length (nil) or a line not ended by CRLF.
fn header(buf: &[u8], at: usize, kind: u8) -> Result<Option<(i64, usize)>, ProtocolError> {
    if buf.get(at) != Some(&kind) {
        return Ok(None);
    }
    let Some((text, next)) = line(buf, at + 1) else {
        return Ok(None);
    };
    if next == usize::MAX {
        return Ok(None);
    }
    let n = int(text)?;
    Ok((n >= 0).then_some((n, next)))
}

/// A reply that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProtocolError(pub(crate) String);

/// Parses one value from the front of `buf`: `Ok(Some((value, bytes used)))`, or
/// `Ok(None)` when `buf` does not hold a whole value yet.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtocolError> {
    parse_at(buf, 0, 0)
}

const MAX_DEPTH: usize = 64;

/// Finds where the first whole value of a growing buffer ends, resuming where the last
/// call stopped: a large reply that arrives over many reads is walked once in total, not
/// once per read (which would cost quadratic time). Only then is the value parsed, once;
/// or, for an array of bulk strings (a pop), not at all: the walk notes where each string
/// lies ([`Scanner::items`]). Validation is otherwise left to [`parse`].
#[derive(Debug, Default)]
pub(crate) struct Scanner {
    /// Where the next element starts.
    pos: usize,
    /// Elements still to come in each array being walked, innermost last.
    open: Vec<i64>,
    /// The value walked is an array of bulk strings so far (none nil).
    flat: bool,
    /// Where each of its strings lies (start, end), when `flat`.
    items: Vec<(usize, usize)>,
}

impl Scanner {
    /// Walks `buf` (the same bytes as last time, maybe more at the end): the length of the
    /// first whole value, or `None` while it is incomplete.
    pub(crate) fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        loop {
            let Some(&kind) = buf.get(self.pos) else {
                return Ok(None);
            };
            // A length (every payload has one) is read in one pass; other lines are only
            // walked over.
            let (n, next) = if kind == b'$' || kind == b'*' {
                match number_line(buf, self.pos + 1) {
                    None => return Ok(None),
                    Some(r) => r?,
                }
            } else {
                match line(buf, self.pos + 1) {
                    None => return Ok(None),
                    Some((_, usize::MAX)) => {
                        return Err(ProtocolError("line not ended by CRLF".into()));
                    }
                    Some((_, next)) => (0, next),
                }
            };
            let depth = self.open.len();
            if depth == 0 {
                // A new value: an array may turn out to be one of bulk strings.
                self.flat = kind == b'*';
                self.items.clear();
            }
            match kind {
                b'$' => {
                    let end = if n < 0 { next } else { next + n as usize + 2 };
                    if buf.len() < end {
                        return Ok(None);
                    }
                    if n >= 0 && &buf[end - 2..end] != b"\r\n" {
                        return Err(ProtocolError("bulk string not ended by CRLF".into()));
                    }
                    if depth == 1 && n >= 0 {
                        self.items.push((next, end - 2));
                    } else {
                        self.flat = false;
                    }
                    self.pos = end;
                }
                b'*' => {
                    if depth > 0 || n < 0 {
                        self.flat = false;
                    }
                    self.pos = next;
                    if n > 0 {
                        if self.open.len() >= MAX_DEPTH {
                            return Err(ProtocolError("reply nested too deeply".into()));
                        }
                        self.open.push(n);
                        continue;
                    }
                }
                _ => {
                    self.flat = false;
                    self.pos = next;
                }
            }
            // One element done: close every array it completes.
            loop {
                match self.open.last_mut() {
                    None => {
                        let len = self.pos;
                        self.pos = 0;
                        return Ok(Some(len));
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }

    /// After [`Scanner::scan`] found a whole value: whether it is an array of bulk
    /// strings (none of them nil), whose strings [`Scanner::take_items`] tells.
    pub(crate) fn found_items(&self) -> bool {
        self.flat
    }

    /// After [`Scanner::scan`] found a whole value, `whole`, that is an array of bulk
    /// strings ([`Scanner::found_items`]): its strings, from where the walk found them,
    /// nothing parsed again.
    pub(crate) fn take_items(&mut self, whole: Bytes) -> Reply {
        self.flat = false;
        Reply::Items(Items {
            buf: whole,
            spans: std::mem::take(&mut self.items),
        })
    }
}

fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(from..)?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    if nl == 0 || rest[nl - 1] != b'\r' {
        return Some((&rest[..0], usize::MAX));
    }
    Some((&rest[..nl - 1], from + nl + 1))
}

/// The line at `from` as a decimal integer (see [`int`]) and where the next line starts,
/// in one pass over its bytes; `None` while the line is incomplete.
fn number_line(buf: &[u8], from: usize) -> Option<Result<(i64, usize), ProtocolError>> {
    let rest = buf.get(from..)?;
    let negative = rest.first() == Some(&b'-');
    let start = usize::from(negative);
    let mut i = start;
    let mut n: u64 = 0;
    while let Some(&d) = rest.get(i) {
        if !d.is_ascii_digit() {
            break;
        }
        // 19 digits always fit in a u64.
        if i - start == 19 {
            return Some(Err(bad_line(rest)));
        }
        n = n * 10 + u64::from(d - b'0');
        i += 1;
    }
    match (rest.get(i), rest.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => return None,
        (Some(b'\r'), Some(b'\n')) if i > start => {}
        (Some(b'\r'), Some(b'\n')) => return Some(Err(bad_line(rest))),
        (Some(b'\r'), Some(_)) => {
            return Some(Err(ProtocolError("line not ended by CRLF".into())));
        }
        (Some(_), _) => return Some(Err(bad_line(rest))),
    }
    let value = if negative {
        0i64.checked_sub_unsigned(n)
    } else {
        i64::try_from(n).ok()
    };
    Some(
        value
            .map(|v| (v, from + i + 2))
            .ok_or_else(|| bad_line(rest)),
    )
}

fn bad_line(rest: &[u8]) -> ProtocolError {
    let end = rest
        .iter()
        .position(|&b| b == b'\r')
        .unwrap_or(rest.len())
        .min(24);
    ProtocolError(format!(
        "bad integer {:?}",
        String::from_utf8_lossy(&rest[..end])
    ))
}

/// A decimal integer: an optional `-`, then 1 to 19 digits, without overflow. (Every
/// length prefix goes through here, one per payload, so it avoids `str::parse`.)
fn int(s: &[u8]) -> Result<i64, ProtocolError> {
    let bad = || ProtocolError(format!("bad integer {:?}", String::from_utf8_lossy(s)));
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(bad());
    }
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(bad());
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or_else(bad)?;
    }
    if negative {
        0i64.checked_sub_unsigned(n).ok_or_else(bad)
    } else {
        i64::try_from(n).map_err(|_| bad())
    }
}

fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Value, usize)>, ProtocolError> {
    if depth > MAX_DEPTH {
        return Err(ProtocolError("reply nested too deeply".into()));
    }
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some((text, next)) = line(buf, pos + 1) else {
        return Ok(None);
    };
    if next == usize::MAX {
        return Err(ProtocolError("line not ended by CRLF".into()));
    }
    match kind {
        b'+' => {
            let v = if text == b"OK" {
                Value::Okay
            } else {
                Value::SimpleString(String::from_utf8_lossy(text).into_owned())
            };
            Ok(Some((v, next)))
        }
        b'-' => match redis::parse_redis_value(&buf[pos..next]) {
            Ok(v) => Ok(Some((v, next))),
            Err(e) => Err(ProtocolError(format!("bad error reply: {e}"))),
        },
        b':' => Ok(Some((Value::Int(int(text)?), next))),
        b'$' => {
            let n = int(text)?;
            if n < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            let end = next + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("bulk string not ended by CRLF".into()));
            }
            Ok(Some((Value::BulkString(buf[next..end].to_vec()), end + 2)))
        }
        b'*' => {
            let n = int(text)?;
            if n < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            // Do not trust a huge announced length with an allocation up front.
            let mut items = Vec::with_capacity((n as usize).min(4096));
            let mut at = next;
            for _ in 0..n {
                // Bulk strings (popped payloads) are most elements: read them here rather
                // than through a call that returns the value by a long way round.
                if buf.get(at) == Some(&b'$') {
                    let Some((text, next)) = line(buf, at + 1) else {
                        return Ok(None);
                    };
                    let len = int(text)?;
                    if next != usize::MAX && len >= 0 {
                        let end = next + len as usize;
                        if buf.len() < end + 2 {
                            return Ok(None);
                        }
                        if &buf[end..end + 2] != b"\r\n" {
                            return Err(ProtocolError("bulk string not ended by CRLF".into()));
                        }
                        items.push(Value::BulkString(buf[next..end].to_vec()));
                        at = end + 2;
                        continue;
                    }
                }
                match parse_at(buf, at, depth + 1)? {
                    Some((v, after)) => {
                        items.push(v);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Value::Array(items), at)))
        }
        b'_' => Ok(Some((Value::Nil, next))),
        other => Err(ProtocolError(format!(
            "unexpected reply type byte {:?}",
            other as char
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A RESP2 reply as a tree, and its bytes.
    #[derive(Debug, Clone)]
    enum Reply {
        Simple(String),
        Error(String, String),
        Int(i64),
        Bulk(Vec<u8>),
        NilBulk,
        NilArray,
        Array(Vec<Reply>),
    }

    fn encode(r: &Reply, out: &mut Vec<u8>) {
        match r {
            Reply::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Reply::Error(code, msg) => {
                out.extend_from_slice(format!("-{code} {msg}\r\n").as_bytes())
            }
            Reply::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Reply::Bulk(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::NilBulk => out.extend_from_slice(b"$-1\r\n"),
            Reply::NilArray => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for i in items {
                    encode(i, out);
                }
            }
        }
    }

    fn reply() -> impl Strategy<Value = Reply> {
        let leaf = prop_oneof![
            "[a-zA-Z0-9 ]{0,12}".prop_map(Reply::Simple),
            ("[A-Z]{2,10}", "[a-z0-9 ]{0,20}").prop_map(|(c, m)| Reply::Error(c, m)),
            any::<i64>().prop_map(Reply::Int),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Reply::Bulk),
            Just(Reply::NilBulk),
            Just(Reply::NilArray),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(Reply::Array)
        })
    }

    proptest! {
        /// A length line reads as `int` reads its text, whole or cut anywhere.
        #[test]
        fn length_lines_read_as_int_does(text in "-?[0-9]{0,21}|[-+0-9a\r]{0,6}", tail in "(\r\n)?x?") {
            let full = format!("{text}{tail}");
            let got = number_line(full.as_bytes(), 0);
            match (line(full.as_bytes(), 0), int(text.as_bytes())) {
                (Some((t, next)), Ok(n)) if next != usize::MAX && t == text.as_bytes() => {
                    prop_assert_eq!(got.map(|r| r.ok()), Some(Some((n, next))));
                }
                (Some((t, next)), _) if next != usize::MAX && t == text.as_bytes() => {
                    prop_assert!(matches!(got, Some(Err(_))), "{:?}", got);
                }
                _ => prop_assert!(!matches!(got, Some(Ok(_))), "{:?}", got),
            }
        }

        #[test]
        fn integers_parse_as_str_parse_does(n in any::<i64>(), junk in "[-+0-9a]{0,21}") {
            let text = n.to_string();
            prop_assert_eq!(int(text.as_bytes()).ok(), Some(n));
            // The protocol never writes a `+` sign; `str::parse` accepts one.
            let expected = junk.parse::<i64>().ok().filter(|_| !junk.starts_with('+'));
            prop_assert_eq!(int(junk.as_bytes()).ok(), expected);
        }

        /// The hot-path parser reads every reply as the `redis` crate does, takes exactly
        /// its bytes, agrees with the scanner, and waits (never errs) on every cut.
        #[test]
        fn parses_as_the_redis_crate_does(r in reply(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = Vec::new();
            encode(&r, &mut bytes);
            let len = bytes.len();
            let expected = redis::parse_redis_value(&bytes).unwrap();
            bytes.extend_from_slice(&tail);
            let (ours, used) = parse(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, len);
            prop_assert_eq!(ours, expected);
            prop_assert_eq!(Scanner::default().scan(&bytes).unwrap(), Some(len));
            for cut in 0..len {
                prop_assert_eq!(parse(&bytes[..cut]).unwrap(), None, "cut at {}", cut);
                prop_assert_eq!(Scanner::default().scan(&bytes[..cut]).unwrap(), None);
            }
        }

        /// Read as items (slices of the buffer), a reply means what it means as a value,
        /// and every array of bulk strings comes out as items.
        #[test]
        fn items_agree_with_values(r in reply()) {
            let mut bytes = Vec::new();
            encode(&r, &mut bytes);
            let expected = parse(&bytes).unwrap().unwrap().0;
            let whole = bytes::Bytes::from(bytes);
            let read = parse_items(whole.clone()).unwrap();
            let all_bulk = matches!(&r, Reply::Array(items) if items.iter().all(|i| matches!(i, Reply::Bulk(_))));
            prop_assert_eq!(matches!(read, super::Reply::Items(_)), all_bulk);
            // The scanner finds the same items, whole or read a few bytes at a time.
            for step in [whole.len().max(1), 3, 1] {
                let mut sc = Scanner::default();
                let mut at = 0;
                let len = loop {
                    at = (at + step).min(whole.len());
                    if let Some(n) = sc.scan(&whole[..at]).unwrap() {
                        break n;
                    }
                };
                prop_assert_eq!(len, whole.len());
                prop_assert_eq!(sc.found_items(), all_bulk);
                if sc.found_items() {
                    prop_assert_eq!(&sc.take_items(whole.clone()), &read);
                }
            }
            prop_assert_eq!(read.into_value(), expected);
        }

        /// On any bytes: no panic, and whatever it accepts, the `redis` crate reads the same;
        /// the scanner finds a whole value exactly where the parser does.
        #[test]
        fn random_bytes_never_panic_and_what_parses_agrees(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let scanned = Scanner::default().scan(&bytes);
            if let Ok(Some((_, used))) = parse(&bytes) {
                prop_assert_eq!(scanned.ok().flatten(), Some(used));
            }
            if let Ok(Some((ours, used))) = parse(&bytes)
                && let Ok(theirs) = redis::parse_redis_value(&bytes[..used])
            {
                prop_assert_eq!(ours, theirs);
            }
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(parse(b"+OK\r\n").unwrap(), Some((Value::Okay, 5)));
        assert_eq!(
            parse(b"+PONG\r\n").unwrap(),
            Some((Value::SimpleString("PONG".into()), 7))
        );
        assert_eq!(parse(b":-42\r\n").unwrap(), Some((Value::Int(-42), 6)));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Value::Nil, 5)));
        assert_eq!(
            parse(b"$3\r\nabc\r\n").unwrap(),
            Some((Value::BulkString(b"abc".to_vec()), 9))
        );
        assert_eq!(
            parse(b"$0\r\n\r\n").unwrap(),
            Some((Value::BulkString(Vec::new()), 6))
        );
    }

    #[test]
    fn arrays_and_partial_input() {
        let full = b"*3\r\n$1\r\na\r\n:1\r\n*-1\r\n";
        let (v, used) = parse(full).unwrap().unwrap();
        assert_eq!(used, full.len());
        assert_eq!(
            v,
            Value::Array(vec![
                Value::BulkString(b"a".to_vec()),
                Value::Int(1),
                Value::Nil
            ])
        );
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        // Binary payloads with CR/LF inside are taken by length.
        let bin = b"$4\r\n\r\n\r\n\r\n";
        assert_eq!(
            parse(bin).unwrap().unwrap().0,
            Value::BulkString(b"\r\n\r\n".to_vec())
        );
    }

    #[test]
    fn the_scanner_resumes_and_agrees_with_the_parser() {
        let full: &[u8] = b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n$-1\r\n*0\r\n+OK\r\n";
        let first = parse(full).unwrap().unwrap().1;
        // Fed one byte more each time, as reads would.
        let mut sc = Scanner::default();
        for cut in 0..first {
            assert_eq!(sc.scan(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(sc.scan(full).unwrap(), Some(first));
        // The scanner starts afresh for the next value.
        assert_eq!(sc.scan(&full[first..]).unwrap(), Some(5));
        // A big array over many reads: each call walks only what is new.
        let mut big = format!("*{}\r\n", 10_000).into_bytes();
        for i in 0..10_000 {
            big.extend_from_slice(format!("$5\r\nm{i:04}\r\n").as_bytes());
        }
        let mut sc = Scanner::default();
        let mut at = 0;
        let done = loop {
            at = (at + 4096).min(big.len());
            if let Some(n) = sc.scan(&big[..at]).unwrap() {
                break n;
            }
        };
        assert_eq!(done, big.len());
        assert!(Scanner::default().scan(b"HTTP/1.1 400\r\n").is_ok());
        assert!(Scanner::default().scan(b"*1x\r\n").is_err());
        assert!(Scanner::default().scan(b"*1\r\n$3\r\nabcd\r\n").is_err());
        // Items are told only for an array of bulk strings, and start afresh each value.
        let mut sc = Scanner::default();
        let two: &[u8] = b"*2\r\n$1\r\na\r\n$0\r\n\r\n*1\r\n:1\r\n";
        assert_eq!(sc.scan(two).unwrap(), Some(17));
        assert!(sc.found_items());
        match sc.take_items(Bytes::copy_from_slice(&two[..17])) {
            super::Reply::Items(items) => {
                let items = items.into_vec();
                assert_eq!(items, vec![Bytes::from_static(b"a"), Bytes::new()]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(sc.scan(&two[17..]).unwrap(), Some(8));
        assert!(!sc.found_items());
    }

    #[test]
    fn errors() {
        match parse(b"-MOVED 3999 127.0.0.1:6381\r\n").unwrap().unwrap().0 {
            Value::ServerError(e) => {
                assert_eq!(e.code(), "MOVED");
                assert_eq!(e.details(), Some("3999 127.0.0.1:6381"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(b"HTTP/1.1 400 Bad Request\r\n").is_err());
        assert!(parse(b":12x\r\n").is_err());
        assert!(parse(b"$3\r\nabcd\r\n").is_err());
    }
}
