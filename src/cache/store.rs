//! A byte-budgeted object store with S3-FIFO eviction (Yang et al., "FIFO
//! queues are all you need for cache eviction", SOSP 2023). Pure and
//! single-threaded: one store per shard.
//!
//! New objects enter a small FIFO (10% of the bytes). An object evicted from
//! it that was hit while there moves to the main FIFO; one that was not
//! leaves a ghost (its key only), and if it comes back soon it goes straight
//! to main. The main FIFO gives objects with hits another lap (a CLOCK with a
//! 2-bit counter). One-hit wonders, most of a skewed trace, never reach
//! main, which is why it beats LRU on zipf traffic (see
//! `cargo bench --bench eviction`). Hits only bump a counter: no list moves.

use slab::Slab;
use std::collections::{HashMap, HashSet, VecDeque};

/// Share of the byte budget for the small queue.
const SMALL_SHARE_PERCENT: u64 = 10;
/// Access counts saturate here (2 bits).
const MAX_FREQ: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

struct Entry<V> {
    key: u64,
    value: V,
    size: u64,
    freq: u8,
    queue: Queue,
    /// Distinguishes this entry from an earlier one in the same slab slot,
    /// so stale queue references are skipped.
    generation: u64,
}

/// The store. Keys are 64-bit hashes computed by the caller.
pub struct Store<V> {
    budget: u64,
    used: u64,
    small_bytes: u64,
    map: HashMap<u64, usize>,
    slab: Slab<Entry<V>>,
    /// Queues of (slot, generation): the front is the tail (oldest).
    small: VecDeque<(usize, u64)>,
    main: VecDeque<(usize, u64)>,
    ghost: HashSet<u64>,
    ghost_order: VecDeque<u64>,
    next_generation: u64,
    pub evictions: u64,
}

impl<V> Store<V> {
    pub fn new(budget_bytes: u64) -> Store<V> {
        Store {
            budget: budget_bytes,
            used: 0,
            small_bytes: 0,
            map: HashMap::new(),
            slab: Slab::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            ghost: HashSet::new(),
            ghost_order: VecDeque::new(),
            next_generation: 0,
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.used
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Looks up and counts a hit.
    pub fn get(&mut self, key: u64) -> Option<&V> {
        let slot = *self.map.get(&key)?;
        let e = &mut self.slab[slot];
        e.freq = (e.freq + 1).min(MAX_FREQ);
        Some(&e.value)
    }

    /// Looks up without counting a hit.
    pub fn peek(&self, key: u64) -> Option<&V> {
        self.map.get(&key).map(|&s| &self.slab[s].value)
    }

    /// Mutable access without counting a hit (to refresh stored metadata).
    pub fn peek_mut(&mut self, key: u64) -> Option<&mut V> {
        let slot = *self.map.get(&key)?;
        Some(&mut self.slab[slot].value)
    }

    /// Stores `value` of `size` bytes under `key`, replacing any earlier one,
    /// and evicts until the budget holds. Whether it is stored: not an
    /// object larger than the whole budget, nor one evicted at once to
    /// make room.
    pub fn insert(&mut self, key: u64, value: V, size: u64) -> bool {
        if size > self.budget {
            // The earlier version is outdated all the same.
            self.remove(key);
            return false;
        }
        if let Some(&slot) = self.map.get(&key) {
            // Replaced in place: same queue position and hits, no second
            // queue entry (a key replaced over and over, as a hot set's
            // copy of a refreshed object is, must not grow the queues).
            let e = &mut self.slab[slot];
            let old = std::mem::replace(&mut e.size, size);
            e.value = value;
            self.used = self.used - old + size;
            if e.queue == Queue::Small {
                self.small_bytes = self.small_bytes - old + size;
            }
            while self.used > self.budget {
                if !self.evict_one() {
                    break;
                }
            }
            return self.map.contains_key(&key);
        }
        // An object larger than the small queue's share would push itself
        // out of it at once in a full store: it starts in the main queue.
        let queue = if self.ghost.remove(&key) || size * 100 > self.budget * SMALL_SHARE_PERCENT {
            Queue::Main
        } else {
            Queue::Small
        };
        let generation = self.next_generation;
        self.next_generation += 1;
        let slot = self.slab.insert(Entry {
            key,
            value,
            size,
            freq: 0,
            queue,
            generation,
        });
        self.map.insert(key, slot);
        self.used += size;
        match queue {
            Queue::Small => {
                self.small_bytes += size;
                self.small.push_back((slot, generation));
            }
            Queue::Main => self.main.push_back((slot, generation)),
        }
        while self.used > self.budget {
            if !self.evict_one() {
                break;
            }
        }
        // Making room may have taken the newcomer itself (a large object
        // entering a small queue it fills): then it is not stored.
        self.map.contains_key(&key)
    }

    /// Drops `key`; its value if it was stored.
    pub fn remove(&mut self, key: u64) -> Option<V> {
        let slot = self.map.remove(&key)?;
        let e = self.slab.remove(slot);
        self.used -= e.size;
        if e.queue == Queue::Small {
            self.small_bytes -= e.size;
        }
        self.compact();
        Some(e.value)
    }

    /// Drops the queue entries of removed objects once they outnumber the
    /// live ones (eviction skips them, but removals under budget would
    /// otherwise pile them up): amortized O(1) per removal.
    fn compact(&mut self) {
        if self.small.len() + self.main.len() <= 2 * self.map.len() + 1024 {
            return;
        }
        let slab = &self.slab;
        let queued = |slot: usize, generation: u64, q: Queue| {
            live(slab, slot, generation) && slab[slot].queue == q
        };
        self.small.retain(|&(s, g)| queued(s, g, Queue::Small));
        self.main.retain(|&(s, g)| queued(s, g, Queue::Main));
    }

    /// Removes every entry for which `f` is true.
    pub fn retain(&mut self, mut f: impl FnMut(u64, &V) -> bool) {
        let gone: Vec<u64> = self
            .slab
            .iter()
            .filter(|(_, e)| !f(e.key, &e.value))
            .map(|(_, e)| e.key)
            .collect();
        for k in gone {
            self.remove(k);
        }
    }

    fn live(&self, slot: usize, generation: u64) -> bool {
        live(&self.slab, slot, generation)
    }

    /// Evicts one object; false when nothing is left to evict.
    fn evict_one(&mut self) -> bool {
        loop {
            let small_over = self.small_bytes * 100 > self.budget * SMALL_SHARE_PERCENT;
            if (small_over || self.main.is_empty()) && !self.small.is_empty() {
                let Some((slot, generation)) = self.small.pop_front() else {
                    continue;
                };
                if !self.live(slot, generation) || self.slab[slot].queue != Queue::Small {
                    continue;
                }
                let e = &mut self.slab[slot];
                self.small_bytes -= e.size;
                if e.freq > 0 {
                    // Hit while in the small queue: promote.
                    e.queue = Queue::Main;
                    e.freq = 0;
                    self.main.push_back((slot, generation));
                    continue;
                }
                let key = e.key;
                self.drop_slot(slot);
                self.remember_ghost(key);
                return true;
            }
            let Some((slot, generation)) = self.main.pop_front() else {
                return false;
            };
            if !self.live(slot, generation) || self.slab[slot].queue != Queue::Main {
                continue;
            }
            let e = &mut self.slab[slot];
            if e.freq > 0 {
                e.freq -= 1;
                self.main.push_back((slot, generation));
                continue;
            }
            self.drop_slot(slot);
            return true;
        }
    }

    fn drop_slot(&mut self, slot: usize) {
        let e = self.slab.remove(slot);
        self.map.remove(&e.key);
        self.used -= e.size;
        self.evictions += 1;
    }

    /// Ghosts are bounded by the number of live entries (as in the paper,
    /// the ghost queue tracks as many keys as the main queue holds).
    fn remember_ghost(&mut self, key: u64) {
        if self.ghost.insert(key) {
            self.ghost_order.push_back(key);
        }
        let cap = self.map.len().max(16);
        while self.ghost_order.len() > cap {
            if let Some(k) = self.ghost_order.pop_front() {
                self.ghost.remove(&k);
            }
        }
    }
}

/// A plain LRU over the same interface, for comparison in tests and benches.
pub struct Lru {
    budget: u64,
    used: u64,
    tick: u64,
    map: HashMap<u64, (u64, u64)>,
    order: std::collections::BTreeMap<u64, u64>,
}

impl Lru {
    pub fn new(budget: u64) -> Lru {
        Lru {
            budget,
            used: 0,
            tick: 0,
            map: HashMap::new(),
            order: Default::default(),
        }
    }

    /// A hit refreshes recency; a miss inserts. Returns whether it hit.
    pub fn access(&mut self, key: u64, size: u64) -> bool {
        self.tick += 1;
        if let Some((t, s)) = self.map.get_mut(&key) {
            self.order.remove(t);
            *t = self.tick;
            let _ = s;
            self.order.insert(self.tick, key);
            return true;
        }
        self.map.insert(key, (self.tick, size));
        self.order.insert(self.tick, key);
        self.used += size;
        while self.used > self.budget {
            let Some((&t, &k)) = self.order.iter().next() else {
                break;
            };
            self.order.remove(&t);
            if let Some((_, s)) = self.map.remove(&k) {
                self.used -= s;
            }
        }
        false
    }
}

/// Whether `slot` still holds the entry a queue reference of `generation`
/// was made for.
fn live<V>(slab: &Slab<Entry<V>>, slot: usize, generation: u64) -> bool {
    slab.get(slot).is_some_and(|e| e.generation == generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_kept() {
        let mut s: Store<u32> = Store::new(1000);
        for k in 0..500u64 {
            assert!(s.insert(k, k as u32, 10 + k % 7));
            assert!(s.bytes() <= 1000);
        }
        assert!(!s.insert(9999, 0, 1001));
        assert!(s.evictions > 0);
    }

    #[test]
    fn a_large_object_is_stored_in_a_full_store() {
        // Larger than the small queue's share (10%): admitted to the main
        // queue, where older objects make room, not pushed out at once.
        let mut s: Store<u32> = Store::new(10_000);
        for k in 0..200u64 {
            s.insert(k, 0, 100);
        }
        // Evicted once, so back in the main queue.
        for k in 0..100u64 {
            s.insert(k, 0, 100);
        }
        assert!(!s.main.is_empty());
        assert!(s.bytes() > 9_000);
        assert!(s.insert(5000, 1, 3000));
        assert_eq!(s.peek(5000), Some(&1));
        assert!(s.bytes() <= 10_000);
    }

    #[test]
    fn replacing_or_removing_under_budget_does_not_grow_the_queues() {
        let mut s: Store<u64> = Store::new(1 << 30);
        for i in 0..100_000u64 {
            s.insert(i % 10, i, 10 + i % 3);
        }
        assert_eq!(s.len(), 10);
        assert!(s.small.len() + s.main.len() <= 10, "{}", s.small.len());
        assert_eq!(s.peek(7), Some(&99_997));
        for i in 0..100_000u64 {
            s.insert(1000 + i, i, 10);
            s.remove(1000 + i);
        }
        assert!(s.small.len() + s.main.len() <= 2 * s.len() + 1024 + 1);
        assert_eq!(
            s.bytes(),
            (0..10).map(|k| 10 + (99_990 + k) % 3).sum::<u64>()
        );
        // A replacement too big for the store drops the outdated version.
        assert!(!s.insert(3, 0, 1 << 31));
        assert_eq!(s.peek(3), None);
    }

    #[test]
    fn replace_and_remove() {
        let mut s: Store<&str> = Store::new(100);
        s.insert(1, "a", 10);
        s.insert(1, "b", 20);
        assert_eq!(s.get(1), Some(&"b"));
        assert_eq!(s.bytes(), 20);
        assert_eq!(s.remove(1), Some("b"));
        assert_eq!(s.bytes(), 0);
        assert!(s.get(1).is_none());
        s.insert(2, "x", 10);
        s.insert(3, "y", 10);
        s.retain(|k, _| k != 2);
        assert!(s.peek(2).is_none() && s.peek(3).is_some());
    }

    #[test]
    fn hit_objects_survive_a_scan() {
        let mut s: Store<u64> = Store::new(100);
        for k in 0..5 {
            s.insert(k, k, 10);
            s.get(k);
            s.get(k);
        }
        // A scan of one-hit wonders three times the cache size.
        for k in 100..130 {
            s.insert(k, k, 10);
        }
        for k in 0..5 {
            assert!(s.peek(k).is_some(), "hot key {k} was evicted by the scan");
        }
    }

    /// The hit ratio on a seeded zipf(1.0) trace beats LRU at the same size.
    #[test]
    fn beats_lru_on_zipf() {
        let keys = loadgen::keys::Keys::new(100_000, &loadgen::keys::Dist::Zipf(1.0)).unwrap();
        let mut rng = loadgen::keys::Rng::new(42);
        let budget = 5_000;
        let mut s: Store<()> = Store::new(budget);
        let mut lru = Lru::new(budget);
        let (mut hs, mut hl) = (0u64, 0u64);
        let n = 500_000;
        for _ in 0..n {
            let k = keys.draw(&mut rng);
            if s.get(k).is_some() {
                hs += 1;
            } else {
                s.insert(k, (), 1);
            }
            if lru.access(k, 1) {
                hl += 1;
            }
        }
        let (rs, rl) = (hs as f64 / n as f64, hl as f64 / n as f64);
        assert!(rs > rl, "S3-FIFO {rs:.4} vs LRU {rl:.4}");
    }

    proptest::proptest! {
        /// Under any sequence of operations the accounting stays exact.
        #[test]
        fn accounting(ops in proptest::collection::vec((0u8..4, 0u64..50, 1u64..40), 0..400)) {
            let mut s: Store<u64> = Store::new(300);
            let mut model: HashMap<u64, u64> = HashMap::new();
            for (op, k, size) in ops {
                match op {
                    0 | 1 => { if s.insert(k, size, size) { model.insert(k, size); } }
                    2 => { s.get(k); }
                    _ => { s.remove(k); model.remove(&k); }
                }
                proptest::prop_assert!(s.bytes() <= 300);
                let live: u64 = model.keys().filter_map(|k| s.peek(*k)).sum();
                proptest::prop_assert_eq!(live, s.bytes());
            }
        }
    }
}
