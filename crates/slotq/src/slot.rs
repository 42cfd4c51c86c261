//! Hash slots exactly as Redis Cluster computes them.
//!
//! A key's slot is `CRC16/XMODEM(k) mod 16384`, where `k` is the whole key unless the key
//! holds a hash tag: the bytes between the first `{` and the first `}` after it, when that
//! span is non-empty. Pure functions, no I/O.

use std::ops::RangeInclusive;

/// Number of hash slots in a Redis Cluster.
pub const SLOT_COUNT: u16 = 16384;

/// A hash slot, `0..SLOT_COUNT`.
pub type Slot = u16;

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster uses.
pub fn crc16(data: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(data)
}

/// The part of `key` that is hashed: the hash tag if the key has a non-empty one,
/// else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.iter().position(|&b| b == b'}')
            && close > 0
        {
            return &rest[..close];
        }
    }
    key
}

/// The hash slot of `key`, as `CLUSTER KEYSLOT` reports it.
pub fn key_slot(key: impl AsRef<[u8]>) -> Slot {
    crc16(hash_tag(key.as_ref())) % SLOT_COUNT
}

/// The slot of the hash tag `tag` itself, i.e. of any key containing `{tag}`.
pub fn tag_slot(tag: &str) -> Slot {
    crc16(tag.as_bytes()) % SLOT_COUNT
}

/// The tag `<base>#<n>` for a shard number `n`.
pub fn shard_tag(base: &str, n: u32) -> String {
    format!("{base}#{n}")
}

/// Finds the first tag `<base>#<n>` with `n >= from` whose slot satisfies `wanted`,
/// trying at most `limit` numbers. Returns the number, the tag and its slot.
///
/// With a set of slots covering a fraction `f` of the slot space, about `1/f` numbers are
/// tried on average; `limit` bounds the search when `wanted` accepts nothing.
pub fn find_tag(
    base: &str,
    from: u32,
    limit: u32,
    mut wanted: impl FnMut(Slot) -> bool,
) -> Option<(u32, String, Slot)> {
    (from..from.saturating_add(limit)).find_map(|n| {
        let tag = shard_tag(base, n);
        let slot = tag_slot(&tag);
        wanted(slot).then_some((n, tag, slot))
    })
}

/// Finds the first tag `<base>#<n>` (`n >= from`) whose slot lies in one of `ranges`.
pub fn find_tag_in_ranges(
    base: &str,
    from: u32,
    ranges: &[RangeInclusive<Slot>],
) -> Option<(u32, String, Slot)> {
    find_tag(base, from, 1 << 20, |slot| {
        ranges.iter().any(|r| r.contains(&slot))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_check_value() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn spec_vectors() {
        assert_eq!(key_slot("somekey"), 11058);
        assert_eq!(key_slot("foo{hash_tag}"), 2515);
        assert_eq!(key_slot("bar{hash_tag}"), 2515);
        assert_eq!(key_slot("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOT_COUNT);
        assert_eq!(key_slot("foo{{bar}}zap"), 4015);
        assert_eq!(key_slot("foo{bar}{zap}"), 5061);
        assert_eq!(key_slot("foo{bar}{zap}"), key_slot("bar"));
    }

    #[test]
    fn tag_rules() {
        assert_eq!(hash_tag(b"plain"), b"plain");
        assert_eq!(hash_tag(b"a{b}c"), b"b");
        assert_eq!(hash_tag(b"a{}c{d}"), b"a{}c{d}");
        assert_eq!(hash_tag(b"a{b"), b"a{b");
        assert_eq!(hash_tag(b"a}b{c}"), b"c");
        assert_eq!(hash_tag(b"{{x}}"), b"{x");
        assert_eq!(hash_tag(b""), b"");
    }

    #[test]
    fn tag_slot_matches_braced_key() {
        assert_eq!(tag_slot("orders#3"), key_slot("slotq:{orders#3}:ready"));
    }

    #[test]
    fn find_tag_lands_in_ranges() {
        let ranges = [100..=200, 9000..=9001];
        let (n, tag, slot) = find_tag_in_ranges("q", 0, &ranges).unwrap();
        assert_eq!(tag, format!("q#{n}"));
        assert_eq!(slot, tag_slot(&tag));
        assert!(ranges.iter().any(|r| r.contains(&slot)));
        // Every smaller number misses.
        for m in 0..n {
            let s = tag_slot(&shard_tag("q", m));
            assert!(!ranges.iter().any(|r| r.contains(&s)));
        }
        let (n2, _, _) = find_tag_in_ranges("q", n + 1, &ranges).unwrap();
        assert!(n2 > n);
        assert!(find_tag("q", 0, 1000, |_| false).is_none());
    }
}
