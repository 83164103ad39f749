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

/// A histogram for the recent window: 2 significant figures (1%), a
/// tenth of the memory of [`histogram`]; there are 18 per shard.
pub fn window_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid histogram bounds")
}

/// The recent window of the summaries' quantiles is [`WINDOW_SLOTS`]
/// periods of this many seconds (the last 50–60 s), as Prometheus client
/// summaries keep a sliding window rather than the process's whole life.
pub const SLOT_SECS: u64 = 10;
pub const WINDOW_SLOTS: usize = 6;

/// The period (of [`SLOT_SECS`]) an instant falls in, counted from the
/// first call in the process (the same clock on every shard).
pub fn period_of(at: std::time::Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    at.saturating_duration_since(epoch).as_secs() / SLOT_SECS
}

/// The latencies of the last [`WINDOW_SLOTS`] periods, by cache class:
/// a ring of per-period histograms, a slot cleared when a new period
/// reuses it.
#[derive(Debug, Clone)]
pub struct Window {
    /// The period each slot holds (`u64::MAX`: none yet).
    period: [u64; WINDOW_SLOTS],
    slots: Vec<[Histogram<u64>; 3]>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            period: [u64::MAX; WINDOW_SLOTS],
            slots: (0..WINDOW_SLOTS)
                .map(|_| [window_histogram(), window_histogram(), window_histogram()])
                .collect(),
        }
    }
}

impl Window {
    fn record(&mut self, class: Class, us: u64, period: u64) {
        let i = (period % WINDOW_SLOTS as u64) as usize;
        if self.period[i] != period {
            for h in &mut self.slots[i] {
                h.reset();
            }
            self.period[i] = period;
        }
        self.slots[i][class.index()].saturating_record(us);
    }

    /// The last [`WINDOW_SLOTS`] periods up to `now` (a period), merged,
    /// by class.
    pub fn recent(&self, now: u64) -> [Histogram<u64>; 3] {
        let mut out = [window_histogram(), window_histogram(), window_histogram()];
        for (slot, &p) in self.slots.iter().zip(&self.period) {
            if p != u64::MAX && p <= now && now - p < WINDOW_SLOTS as u64 {
                for (o, h) in out.iter_mut().zip(slot) {
                    let _ = o.add(h);
                }
            }
        }
        out
    }
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
    /// The recent window, on the shard that records (`None` in a
    /// snapshot, which carries [`ShardStats::recent`] instead).
    pub window: Option<Window>,
    /// In a snapshot: the recent window's latencies by class, merged.
    pub recent: [Histogram<u64>; 3],
}

impl Default for ShardStats {
    fn default() -> Self {
        ShardStats {
            codes: vec![0; 600],
            by_class: [histogram(), histogram(), histogram()],
            class_count: [0; 3],
            log_dropped: 0,
            window: None,
            recent: [window_histogram(), window_histogram(), window_histogram()],
        }
    }
}

impl ShardStats {
    /// A shard's own figures: with the ring of the recent window (a
    /// snapshot or a sum has none).
    pub fn recording() -> ShardStats {
        ShardStats {
            window: Some(Window::default()),
            ..Default::default()
        }
    }

    /// One answered request: its status, cache class and latency (µs).
    pub fn record(&mut self, code: u16, class: Class, us: u64) {
        self.record_at(code, class, us, period_of(std::time::Instant::now()));
    }

    /// [`Self::record`] for a request that ended in `period` ([`period_of`]).
    pub fn record_at(&mut self, code: u16, class: Class, us: u64, period: u64) {
        let us = us.clamp(1, MAX_LATENCY_US);
        if let Some(c) = self.codes.get_mut(code as usize) {
            *c += 1;
        }
        self.by_class[class.index()].saturating_record(us);
        self.class_count[class.index()] += 1;
        if let Some(w) = &mut self.window {
            w.record(class, us, period);
        }
    }

    /// A copy to send away: the lifetime figures, and the recent window as
    /// of period `now`, merged (the ring itself stays here).
    pub fn snapshot(&self, now: u64) -> ShardStats {
        ShardStats {
            codes: self.codes.clone(),
            by_class: self.by_class.clone(),
            class_count: self.class_count,
            log_dropped: self.log_dropped,
            window: None,
            recent: self
                .window
                .as_ref()
                .map_or_else(|| self.recent.clone(), |w| w.recent(now)),
        }
    }

    pub fn merge(&mut self, o: &ShardStats) {
        for (a, b) in self.codes.iter_mut().zip(&o.codes) {
            *a += b;
        }
        for i in 0..3 {
            let _ = self.by_class[i].add(&o.by_class[i]);
            self.class_count[i] += o.class_count[i];
            let _ = self.recent[i].add(&o.recent[i]);
        }
        self.log_dropped += o.log_dropped;
    }

    /// The recent window's latency over every class.
    pub fn recent_latency(&self) -> Histogram<u64> {
        let mut h = self.recent[0].clone();
        for c in &self.recent[1..] {
            let _ = h.add(c);
        }
        h
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
    /// Connections refused at `max_connections` (a 503 each).
    pub refused: u64,
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
        total.refused += s.refused;
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
    fn the_recent_window_slides_and_the_lifetime_stays() {
        let mut s = ShardStats::recording();
        s.record_at(200, Class::Hit, 100, 10);
        s.record_at(200, Class::Miss, 5_000, 12);
        // Within the window: both, each in its class.
        let snap = s.snapshot(15);
        assert_eq!(snap.recent_latency().len(), 2);
        assert_eq!(snap.recent[Class::Hit as usize].len(), 1);
        assert!(snap.window.is_none());
        // Period 16: the one of period 10 has left the window (10..=15).
        let snap = s.snapshot(16);
        assert_eq!(snap.recent_latency().len(), 1);
        assert_eq!(snap.recent[Class::Miss as usize].len(), 1);
        // Long after: nothing recent, everything in the lifetime figures.
        let snap = s.snapshot(100);
        assert!(snap.recent_latency().is_empty());
        assert_eq!(snap.latency().len(), 2);
        // A later period reusing a slot starts it empty (16 % 6 == 10 % 6).
        s.record_at(200, Class::Pass, 50, 16);
        let snap = s.snapshot(16);
        assert_eq!(snap.recent[Class::Hit as usize].len(), 0);
        assert_eq!(snap.recent_latency().len(), 2);
        // Snapshots merge their windows.
        let mut a = s.snapshot(16);
        a.merge(&s.snapshot(16));
        assert_eq!(a.recent_latency().len(), 4);
    }

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
