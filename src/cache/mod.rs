//! The HTTP cache: RFC 9111 policy ([`policy`], pure), the S3-FIFO object
//! store ([`store`], pure), the per-shard collapse table ([`collapse`],
//! single-threaded), and the cached object with its key ([`object`]).

pub mod collapse;
pub mod object;
pub mod policy;
pub mod shared;
pub mod store;

/// FNV-1a over the parts of a cache key, with a separator between parts so
/// that ("ab", "c") and ("a", "bc") differ.
pub fn key_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Final avalanche (from splitmix64) so that `% shards` spreads well.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// One shard's cache: its share of the store, its collapse table, and its
/// counters (single-threaded).
pub struct ShardCache {
    pub store: std::cell::RefCell<store::Store<object::Object>>,
    pub collapse: collapse::CollapseTable,
    pub hits: std::cell::Cell<u64>,
    pub misses: std::cell::Cell<u64>,
    pub collapsed: std::cell::Cell<u64>,
    pub stored: std::cell::Cell<u64>,
}

impl ShardCache {
    pub fn new(budget_bytes: u64) -> ShardCache {
        ShardCache {
            store: std::cell::RefCell::new(store::Store::new(budget_bytes)),
            collapse: collapse::CollapseTable::default(),
            hits: Default::default(),
            misses: Default::default(),
            collapsed: Default::default(),
            stored: Default::default(),
        }
    }

    pub fn bump(c: &std::cell::Cell<u64>) {
        c.set(c.get() + 1);
    }
}

/// Seconds since the Unix epoch, for RFC 9111 age arithmetic.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::key_hash;

    #[test]
    fn key_parts_are_separated() {
        assert_ne!(key_hash(&[b"ab", b"c"]), key_hash(&[b"a", b"bc"]));
        assert_eq!(key_hash(&[b"host", b"/p"]), key_hash(&[b"host", b"/p"]));
    }
}
