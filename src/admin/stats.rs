//! Statistics (pure): what one shard counts on its request path, with no
//! shared writes, and how snapshots of every shard merge into one view when
//! someone asks (`/metrics`, `/status`, the status page, `--stats-interval`).

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, up to this (longer ones clamp).
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A histogram of microseconds with 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// How the cache took part in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Answered from memory (fresh, or stale while revalidating).
    Hit,
    /// Looked up and not usable: fetched, collapsed, or revalidated.
    Miss,
    /// Not a cache request: bypassed, not GET/HEAD, or caching off.
    Pass,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Hit, Class::Miss, Class::Pass];

    pub fn name(self) -> &'static str {
        match self {
            Class::Hit => "hit",
            Class::Miss => "miss",
            Class::Pass => "pass",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One backend's figures from one shard.
#[derive(Debug, Clone)]
pub struct BackendFigures {
    /// Requests sent to it (every attempt, retries included).
    pub sent: u64,
    /// Failures reported for it (connect, reset, timeout, counted 5xx).
    pub failures: u64,
    /// Time from sending a request to its response head, µs.
    pub ttfb: Histogram<u64>,
}

impl BackendFigures {
    pub fn new() -> BackendFigures {
        BackendFigures {
            sent: 0,
            failures: 0,
            ttfb: histogram(),
        }
    }
}

impl Default for BackendFigures {
    fn default() -> Self {
        Self::new()
    }
}

/// One shard's counters and histograms. Owned by the shard, written only
/// by it; a snapshot is a clone.
#[derive(Debug, Clone)]
pub struct ShardStats {
    /// Responses by status code (index = code, 0..600).
    pub codes: Vec<u64>,
    /// Latency by cache class; the overall histogram is their sum
    /// ([`ShardStats::latency`]), so a request is recorded once.
    pub by_class: [Histogram<u64>; 3],
    /// Requests by cache class.
    pub class_count: [u64; 3],
    /// Access log bytes dropped because the writer fell behind.
    pub log_dropped: u64,
}

impl Default for ShardStats {
    fn default() -> Self {
        ShardStats {
            codes: vec![0; 600],
            by_class: [histogram(), histogram(), histogram()],
            class_count: [0; 3],
            log_dropped: 0,
        }
    }
}

impl ShardStats {
    /// One answered request: its status, cache class and latency (µs).
    pub fn record(&mut self, code: u16, class: Class, us: u64) {
        let us = us.clamp(1, MAX_LATENCY_US);
        if let Some(c) = self.codes.get_mut(code as usize) {
            *c += 1;
        }
        self.by_class[class.index()].saturating_record(us);
        self.class_count[class.index()] += 1;
    }

    pub fn merge(&mut self, o: &ShardStats) {
        for (a, b) in self.codes.iter_mut().zip(&o.codes) {
            *a += b;
        }
        for i in 0..3 {
            let _ = self.by_class[i].add(&o.by_class[i]);
            self.class_count[i] += o.class_count[i];
        }
        self.log_dropped += o.log_dropped;
    }

    pub fn requests(&self) -> u64 {
        self.codes.iter().sum()
    }

    /// Every request's latency: the sum of the per-class histograms.
    pub fn latency(&self) -> Histogram<u64> {
        let mut h = self.by_class[0].clone();
        for c in &self.by_class[1..] {
            let _ = h.add(c);
        }
        h
    }
}

/// One pool's figures from one shard (or merged).
#[derive(Debug, Clone, Default)]
pub struct PoolFigures {
    pub backends: Vec<BackendFigures>,
}

impl PoolFigures {
    pub fn merge(&mut self, o: &PoolFigures) {
        if self.backends.len() < o.backends.len() {
            self.backends
                .resize_with(o.backends.len(), BackendFigures::new);
        }
        for (a, b) in self.backends.iter_mut().zip(&o.backends) {
            a.sent += b.sent;
            a.failures += b.failures;
            let _ = a.ttfb.add(&b.ttfb);
        }
    }

    pub fn fetches(&self) -> u64 {
        self.backends.iter().map(|b| b.sent).sum()
    }
}

/// One origin store's figures from one shard (or merged).
#[derive(Debug, Clone)]
pub struct StoreFigures {
    /// I/O operations issued.
    pub reads: u64,
    pub read_bytes: u64,
    /// Reads serving more than one request.
    pub merged_reads: u64,
    /// Requests served by reads (each counted once per read serving it).
    pub read_requests: u64,
    /// Blocks read, and of those the ones some request wanted.
    pub blocks_read: u64,
    pub blocks_wanted: u64,
    /// Blocks that requests asked for.
    pub blocks_requested: u64,
    /// Of those, answered by the block cache.
    pub block_cache_hits: u64,
    pub read_errors: u64,
    /// Bytes in the block cache (a gauge).
    pub cached_bytes: u64,
    /// Time of each read, µs.
    pub latency: Histogram<u64>,
}

impl Default for StoreFigures {
    fn default() -> Self {
        StoreFigures {
            reads: 0,
            read_bytes: 0,
            merged_reads: 0,
            read_requests: 0,
            blocks_read: 0,
            blocks_wanted: 0,
            blocks_requested: 0,
            block_cache_hits: 0,
            read_errors: 0,
            cached_bytes: 0,
            latency: histogram(),
        }
    }
}

impl StoreFigures {
    pub fn merge(&mut self, o: &StoreFigures) {
        self.reads += o.reads;
        self.read_bytes += o.read_bytes;
        self.merged_reads += o.merged_reads;
        self.read_requests += o.read_requests;
        self.blocks_read += o.blocks_read;
        self.blocks_wanted += o.blocks_wanted;
        self.blocks_requested += o.blocks_requested;
        self.block_cache_hits += o.block_cache_hits;
        self.read_errors += o.read_errors;
        self.cached_bytes += o.cached_bytes;
        let _ = self.latency.add(&o.latency);
    }
}

/// The cache's counters from one shard (or merged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheFigures {
    pub hits: u64,
    pub misses: u64,
    pub collapsed: u64,
    pub stored: u64,
}

impl CacheFigures {
    pub fn merge(&mut self, o: &CacheFigures) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.collapsed += o.collapsed;
        self.stored += o.stored;
    }
}

/// Everything one shard reports when asked.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub shard: usize,
    pub connections: u64,
    pub stats: ShardStats,
    pub cache: CacheFigures,
    pub pools: Vec<PoolFigures>,
    pub stores: Vec<StoreFigures>,
}

/// Every shard's snapshot and their sum.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    pub shards: Vec<Snapshot>,
    pub total: Snapshot,
}

/// Merges the shards' snapshots (in shard order).
pub fn merge(mut shards: Vec<Snapshot>) -> Merged {
    shards.sort_by_key(|s| s.shard);
    let mut total = Snapshot::default();
    for s in &shards {
        total.connections += s.connections;
        total.stats.merge(&s.stats);
        total.cache.merge(&s.cache);
        if total.pools.len() < s.pools.len() {
            total.pools.resize_with(s.pools.len(), PoolFigures::default);
        }
        for (a, b) in total.pools.iter_mut().zip(&s.pools) {
            a.merge(b);
        }
        if total.stores.len() < s.stores.len() {
            total
                .stores
                .resize_with(s.stores.len(), StoreFigures::default);
        }
        for (a, b) in total.stores.iter_mut().zip(&s.stores) {
            a.merge(b);
        }
    }
    Merged { shards, total }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert_eq, proptest};

    #[test]
    fn records_by_code_and_class() {
        let mut s = ShardStats::default();
        s.record(200, Class::Hit, 100);
        s.record(200, Class::Miss, 5_000);
        s.record(503, Class::Pass, 0);
        assert_eq!(s.codes[200], 2);
        assert_eq!(s.codes[503], 1);
        assert_eq!(s.requests(), 3);
        assert_eq!(s.class_count, [1, 1, 1]);
        assert_eq!(s.by_class[0].max(), 100);
        assert_eq!(s.latency().min(), 1, "zero clamps to the histogram's floor");
        assert_eq!(s.latency().len(), 3);
    }

    proptest! {
        /// Merging shards gives exactly the histogram and counters of
        /// recording everything in one place, in any split.
        #[test]
        fn merge_is_exact(values in proptest::collection::vec((1u64..10_000_000, 0usize..3, 0u16..600), 0..300), shards in 1usize..5) {
            let mut one = ShardStats::default();
            let mut parts: Vec<Snapshot> = (0..shards).map(|i| Snapshot { shard: i, ..Default::default() }).collect();
            for (i, &(us, class, code)) in values.iter().enumerate() {
                let class = Class::ALL[class];
                one.record(code, class, us);
                parts[i % shards].stats.record(code, class, us);
                parts[i % shards].cache.hits += 1;
            }
            let m = merge(parts);
            prop_assert_eq!(&m.total.stats.codes, &one.codes);
            let (merged, all) = (m.total.stats.latency(), one.latency());
            prop_assert_eq!(merged.len(), values.len() as u64);
            prop_assert_eq!(merged.len(), all.len());
            for q in [0.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
                prop_assert_eq!(merged.value_at_percentile(q), all.value_at_percentile(q));
            }
            prop_assert_eq!(merged.mean().to_bits(), all.mean().to_bits());
            for c in 0..3 {
                prop_assert_eq!(m.total.stats.by_class[c].len(), one.by_class[c].len());
            }
            prop_assert_eq!(m.total.cache.hits, values.len() as u64);
        }
    }
}
