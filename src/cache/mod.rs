//! The HTTP cache: RFC 9111 policy ([`policy`], pure), the S3-FIFO object
//! store ([`store`], pure), the per-shard collapse table ([`collapse`],
//! single-threaded), and the cached object with its key ([`object`]).

pub mod collapse;
pub mod object;
pub mod policy;
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

#[cfg(test)]
mod tests {
    use super::key_hash;

    #[test]
    fn key_parts_are_separated() {
        assert_ne!(key_hash(&[b"ab", b"c"]), key_hash(&[b"a", b"bc"]));
        assert_eq!(key_hash(&[b"host", b"/p"]), key_hash(&[b"host", b"/p"]));
    }
}
