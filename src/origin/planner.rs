//! The block planner of the origin store (pure: no I/O, no clock).
//!
//! A request for a byte range becomes a span of page-aligned blocks. Each
//! block is answered from the shard's block cache, or joins the read already
//! in flight for it (per-block collapse), or becomes *pending*. When the
//! store's reader task runs, [`Planner::plan`] turns every pending block of
//! every waiting request into as few reads as it can: adjacent blocks of the
//! same file merge into one read, and so do blocks a small gap apart, as long
//! as a read stays within `max_merge` and its read amplification (blocks read
//! ÷ blocks wanted) within `max_amplification`. Completed reads fill the
//! cache and every request waiting on their blocks.

use crate::cache::store::Store;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// A file as the planner knows it: a fresh id per open, so blocks of a
/// replaced file are never mixed with the new one's.
pub type FileId = u32;

/// A block of a file.
type Block = (FileId, u64);

/// The largest block index (blocks are numbered by `u32`).
pub const MAX_BLOCK: u64 = u32::MAX as u64;

/// How reads are merged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub block_size: u64,
    /// Blocks in one read, at most.
    pub max_merge_blocks: u64,
    /// Unrequested blocks a read may span between two requested ones.
    pub max_gap_blocks: u64,
    /// Blocks read ÷ blocks wanted, per read, at most.
    pub max_amplification: f64,
}

/// One read to issue: `count` blocks of `file` from block `first`, of which
/// `wanted` were asked for (the rest are gap blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Read {
    pub file: FileId,
    pub first: u64,
    pub count: u64,
    pub wanted: u64,
}

impl Read {
    /// Byte offset and length of the read.
    pub fn bytes(&self, block_size: u64) -> (u64, usize) {
        (self.first * block_size, (self.count * block_size) as usize)
    }
}

/// Merges sorted, distinct pending blocks into reads. `busy` says whether a
/// block is already being read or cached (a gap may not include such a
/// block).
pub fn merge(
    pending: &[(FileId, u64)],
    p: &Params,
    busy: impl Fn(FileId, u64) -> bool,
) -> Vec<Read> {
    let mut out: Vec<Read> = Vec::new();
    for &(f, b) in pending {
        if let Some(r) = out.last_mut() {
            let last = r.first + r.count - 1;
            if r.file == f && b > last {
                let gap = b - last - 1;
                let count = b - r.first + 1;
                let wanted = r.wanted + 1;
                if count <= p.max_merge_blocks
                    && gap <= p.max_gap_blocks
                    && count as f64 <= p.max_amplification * wanted as f64
                    && !(last + 1..b).any(|g| busy(f, g))
                {
                    r.count = count;
                    r.wanted = wanted;
                    continue;
                }
            }
        }
        out.push(Read {
            file: f,
            first: b,
            count: 1,
            wanted: 1,
        });
    }
    out
}

/// Counters of the planner's work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlannerStats {
    /// Blocks that requests asked for.
    pub blocks_requested: u64,
    /// Of those, answered from the block cache.
    pub cache_hits: u64,
    /// Of those, joined to a read already in flight or pending.
    pub joined: u64,
    /// Reads issued.
    pub reads: u64,
    /// Reads that serve more than one request.
    pub merged_reads: u64,
    /// Requests served by the reads (a request counted once per read that
    /// serves it): ÷ `reads` = requests per read.
    pub read_requests: u64,
    /// Blocks read (wanted and gap).
    pub blocks_read: u64,
    /// Of those, the wanted ones (the rest were read to merge over a gap).
    pub blocks_wanted: u64,
    /// Merged reads that failed and were split into reads of one block.
    pub split_reads: u64,
}

struct Ticket {
    file: FileId,
    first: u64,
    slots: Vec<Option<Arc<[u8]>>>,
    missing: usize,
    failed: bool,
}

/// One shard's planner: block cache, reads in flight, waiting requests.
pub struct Planner {
    p: Params,
    cache: Store<Arc<[u8]>>,
    inflight: HashSet<(FileId, u64)>,
    pending: BTreeSet<(FileId, u64)>,
    /// Pending blocks to be read alone: a merged read over them failed.
    alone: HashSet<(FileId, u64)>,
    waiters: HashMap<(FileId, u64), Vec<(usize, usize)>>,
    tickets: slab::Slab<Ticket>,
    pub stats: PlannerStats,
}

fn key(f: FileId, b: u64) -> u64 {
    (u64::from(f) << 32) | (b & MAX_BLOCK)
}

impl Planner {
    pub fn new(p: Params, cache_bytes: u64) -> Planner {
        Planner {
            p,
            cache: Store::new(cache_bytes),
            inflight: HashSet::new(),
            pending: BTreeSet::new(),
            alone: HashSet::new(),
            waiters: HashMap::new(),
            tickets: slab::Slab::new(),
            stats: PlannerStats::default(),
        }
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    /// Asks for blocks `first..=last` of `file` (`last <= MAX_BLOCK`); a
    /// ticket to wait on.
    pub fn request(&mut self, file: FileId, first: u64, last: u64) -> usize {
        let n = (last + 1).saturating_sub(first) as usize;
        let t = self.tickets.insert(Ticket {
            file,
            first,
            slots: vec![None; n],
            missing: 0,
            failed: false,
        });
        for (i, b) in (first..=last).enumerate() {
            self.stats.blocks_requested += 1;
            if let Some(d) = self.cache.get(key(file, b)) {
                self.tickets[t].slots[i] = Some(d.clone());
                self.stats.cache_hits += 1;
                continue;
            }
            self.tickets[t].missing += 1;
            let w = self.waiters.entry((file, b)).or_default();
            if !w.is_empty() || self.inflight.contains(&(file, b)) {
                self.stats.joined += 1;
            }
            w.push((t, i));
            if !self.inflight.contains(&(file, b)) {
                self.pending.insert((file, b));
            }
        }
        t
    }

    /// Whether ticket `t` has all its blocks (or failed).
    pub fn is_done(&self, t: usize) -> bool {
        self.tickets
            .get(t)
            .is_none_or(|k| k.missing == 0 || k.failed)
    }

    /// Takes a done ticket's blocks, in order; `None` if a read failed.
    pub fn take(&mut self, t: usize) -> Option<Vec<Arc<[u8]>>> {
        let k = self.tickets.try_remove(t)?;
        if k.failed {
            self.unwait(t, &k);
            return None;
        }
        k.slots.into_iter().collect()
    }

    /// Forgets ticket `t` (its request went away).
    pub fn cancel(&mut self, t: usize) {
        if let Some(k) = self.tickets.try_remove(t) {
            self.unwait(t, &k);
        }
    }

    fn unwait(&mut self, t: usize, k: &Ticket) {
        for (i, slot) in k.slots.iter().enumerate() {
            if slot.is_none() {
                let b = (k.file, k.first + i as u64);
                if let Some(w) = self.waiters.get_mut(&b) {
                    w.retain(|&(tt, _)| tt != t);
                    if w.is_empty() {
                        self.waiters.remove(&b);
                        self.pending.remove(&b);
                        self.alone.remove(&b);
                    }
                }
            }
        }
    }

    /// Blocks waiting to be read.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether some block waits to be read.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The reads for every pending block; their blocks are in flight from now.
    pub fn plan(&mut self) -> Vec<Read> {
        let (alone, pending): (Vec<Block>, Vec<Block>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|b| self.alone.contains(b));
        // A gap may not span a block being read (it would be read twice at
        // once), one already cached (it would be read again for nothing) nor
        // one to be read alone.
        let (inflight, cache, lone) = (&self.inflight, &self.cache, &self.alone);
        let mut reads = merge(&pending, &self.p, |f, b| {
            inflight.contains(&(f, b)) || cache.peek(key(f, b)).is_some() || lone.contains(&(f, b))
        });
        for (file, first) in alone {
            self.alone.remove(&(file, first));
            reads.push(Read {
                file,
                first,
                count: 1,
                wanted: 1,
            });
        }
        let mut served: Vec<usize> = Vec::new();
        for r in &reads {
            served.clear();
            for b in r.first..r.first + r.count {
                self.inflight.insert((r.file, b));
                if let Some(w) = self.waiters.get(&(r.file, b)) {
                    served.extend(w.iter().map(|&(t, _)| t));
                }
            }
            served.sort_unstable();
            served.dedup();
            self.stats.reads += 1;
            self.stats.blocks_read += r.count;
            self.stats.blocks_wanted += r.wanted;
            self.stats.read_requests += served.len() as u64;
            if served.len() > 1 {
                self.stats.merged_reads += 1;
            }
        }
        reads
    }

    /// A read finished with `data` (shorter than asked at the end of the
    /// file); the tickets it completed.
    pub fn complete(&mut self, r: &Read, data: &[u8]) -> Vec<usize> {
        let bs = self.p.block_size as usize;
        let mut done = Vec::new();
        for i in 0..r.count as usize {
            let b = r.first + i as u64;
            let lo = (i * bs).min(data.len());
            let hi = ((i + 1) * bs).min(data.len());
            let block: Arc<[u8]> = Arc::from(&data[lo..hi]);
            self.inflight.remove(&(r.file, b));
            self.cache
                .insert(key(r.file, b), block.clone(), block.len().max(64) as u64);
            for (t, slot) in self.waiters.remove(&(r.file, b)).unwrap_or_default() {
                if let Some(k) = self.tickets.get_mut(t) {
                    if k.slots[slot].is_none() {
                        k.slots[slot] = Some(block.clone());
                        k.missing -= 1;
                        if k.missing == 0 {
                            done.push(t);
                        }
                    }
                }
            }
        }
        done
    }

    /// A read failed: every request waiting on its blocks fails.
    pub fn fail(&mut self, r: &Read) -> Vec<usize> {
        let mut done = Vec::new();
        for b in r.first..r.first + r.count {
            self.inflight.remove(&(r.file, b));
            for (t, _) in self.waiters.remove(&(r.file, b)).unwrap_or_default() {
                if let Some(k) = self.tickets.get_mut(t) {
                    if !k.failed {
                        k.failed = true;
                        done.push(t);
                    }
                }
            }
        }
        done
    }

    /// A read failed with an I/O error. A read of one block fails the
    /// requests waiting on it ([`Self::fail`]); a merged one fails nobody
    /// yet: its blocks that requests still wait on are read again, each
    /// alone, at the next plan, so that one bad block fails only the
    /// requests that need it, not the neighbours it was merged with. The
    /// tickets that failed.
    pub fn fail_or_split(&mut self, r: &Read) -> Vec<usize> {
        if r.count == 1 {
            return self.fail(r);
        }
        for b in r.first..r.first + r.count {
            self.inflight.remove(&(r.file, b));
            if self.waiters.contains_key(&(r.file, b)) {
                self.pending.insert((r.file, b));
                self.alone.insert((r.file, b));
            }
        }
        self.stats.split_reads += 1;
        Vec::new()
    }

    /// Drops every cached block of `file` (it was replaced or closed).
    pub fn forget_file(&mut self, file: FileId) {
        self.cache.retain(|k, _| (k >> 32) as FileId != file);
    }

    /// The same for several files, in one pass over the cache.
    pub fn forget_files(&mut self, files: &std::collections::HashSet<FileId>) {
        if !files.is_empty() {
            self.cache
                .retain(|k, _| !files.contains(&((k >> 32) as FileId)));
        }
    }

    /// Bytes the block cache holds.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Rng;
    use proptest::prelude::{prop_assert, prop_assert_eq, proptest};

    fn params() -> Params {
        Params {
            block_size: 16,
            max_merge_blocks: 8,
            max_gap_blocks: 2,
            max_amplification: 1.5,
        }
    }

    #[test]
    fn merges_adjacent_and_near_blocks() {
        let p = params();
        let reads = merge(
            &[(1, 0), (1, 1), (1, 2), (1, 4), (1, 20), (2, 5)],
            &p,
            |_, _| false,
        );
        assert_eq!(
            reads,
            vec![
                Read {
                    file: 1,
                    first: 0,
                    count: 5,
                    wanted: 4
                },
                Read {
                    file: 1,
                    first: 20,
                    count: 1,
                    wanted: 1
                },
                Read {
                    file: 2,
                    first: 5,
                    count: 1,
                    wanted: 1
                },
            ]
        );
        // A gap block in flight is not read again: the run splits.
        let reads = merge(&[(1, 0), (1, 2)], &p, |_, b| b == 1);
        assert_eq!(reads.len(), 2);
        // max_merge caps a run.
        let run: Vec<_> = (0..20).map(|b| (1, b)).collect();
        let reads = merge(&run, &p, |_, _| false);
        assert_eq!(
            reads.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![8, 8, 4]
        );
    }

    #[test]
    fn concurrent_neighbours_share_one_read() {
        let mut pl = Planner::new(params(), 1 << 20);
        // Sixteen requests for consecutive 2-block ranges, all pending together.
        let tickets: Vec<usize> = (0..16).map(|i| pl.request(7, i * 2, i * 2 + 1)).collect();
        let reads = pl.plan();
        assert_eq!(reads.len(), 4, "32 blocks in reads of at most 8: {reads:?}");
        for r in &reads {
            let (pos, len) = r.bytes(16);
            let data: Vec<u8> = (pos..pos + len as u64).map(|x| x as u8).collect();
            pl.complete(r, &data);
        }
        for (i, t) in tickets.into_iter().enumerate() {
            let blocks = pl.take(t).unwrap();
            let bytes: Vec<u8> = blocks.concat();
            let want: Vec<u8> = (i as u64 * 32..i as u64 * 32 + 32)
                .map(|x| x as u8)
                .collect();
            assert_eq!(bytes, want);
        }
        // Now cached: no read at all.
        let t = pl.request(7, 3, 5);
        assert!(pl.is_done(t) && !pl.has_pending());
        assert_eq!(pl.stats.reads, 4);
    }

    #[test]
    fn a_failed_read_fails_its_waiters_only() {
        let mut pl = Planner::new(params(), 1 << 20);
        let a = pl.request(1, 0, 1);
        let b = pl.request(1, 10, 10);
        let reads = pl.plan();
        assert_eq!(reads.len(), 2);
        assert_eq!(pl.fail(&reads[0]), vec![a]);
        assert!(pl.take(a).is_none());
        assert!(!pl.is_done(b));
        pl.complete(&reads[1], &[9; 16]);
        assert_eq!(pl.take(b).unwrap().concat(), vec![9; 16]);
    }

    #[test]
    fn a_failed_merged_read_is_split_and_fails_only_the_bad_blocks_requests() {
        let mut pl = Planner::new(params(), 1 << 20);
        let a = pl.request(1, 0, 1);
        let b = pl.request(1, 2, 2);
        let c = pl.request(1, 3, 4);
        let reads = pl.plan();
        assert_eq!(reads.len(), 1, "{reads:?}");
        assert_eq!(reads[0].count, 5);
        // The merged read fails: nobody fails yet, each block is pending
        // alone.
        assert!(pl.fail_or_split(&reads[0]).is_empty());
        assert!(!pl.is_done(a) && !pl.is_done(b) && !pl.is_done(c));
        // A request arriving now for a block of the run joins its lone read.
        let d = pl.request(1, 2, 2);
        let mut alone = pl.plan();
        alone.sort_by_key(|r| r.first);
        assert_eq!(
            alone.iter().map(|r| (r.first, r.count)).collect::<Vec<_>>(),
            vec![(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]
        );
        // Block 2 is bad: b and d fail, a and c get their bytes.
        for r in &alone {
            let done = if r.first == 2 {
                pl.fail_or_split(r)
            } else {
                pl.complete(r, &[r.first as u8; 16])
            };
            if r.first == 2 {
                assert_eq!(done.len(), 2);
            }
        }
        assert!(pl.take(b).is_none() && pl.take(d).is_none());
        assert_eq!(pl.take(a).unwrap().concat(), [[0u8; 16], [1; 16]].concat());
        assert_eq!(pl.take(c).unwrap().concat(), [[3u8; 16], [4; 16]].concat());
        assert_eq!(pl.stats.split_reads, 1);
        // Blocks read alone merge again later.
        let e = pl.request(1, 20, 21);
        assert_eq!(pl.plan().len(), 1);
        pl.cancel(e);
    }

    #[test]
    fn a_split_block_nobody_waits_for_any_more_is_not_read() {
        let mut pl = Planner::new(params(), 1 << 20);
        let a = pl.request(1, 0, 0);
        let b = pl.request(1, 1, 1);
        let reads = pl.plan();
        assert_eq!(reads.len(), 1);
        pl.fail_or_split(&reads[0]);
        pl.cancel(a);
        let again = pl.plan();
        assert_eq!(
            again.iter().map(|r| (r.first, r.count)).collect::<Vec<_>>(),
            vec![(1, 1)]
        );
        pl.complete(&again[0], &[7; 16]);
        assert_eq!(pl.take(b).unwrap().concat(), vec![7; 16]);
        assert!(pl.alone.is_empty() && pl.waiters.is_empty());
    }

    proptest! {
        /// A seeded simulation: requests arrive, plans and completions run in
        /// random order. Every request gets exactly its bytes; no block is in
        /// two reads at once; reads stay within max_merge and the
        /// amplification bound.
        #[test]
        fn simulation(seed: u64, budget in 0u64..20_000) {
            let p = params();
            let mut pl = Planner::new(p, budget);
            let mut rng = Rng::new(seed);
            let byte = |f: FileId, pos: u64| (pos as u8).wrapping_mul(31) ^ (f as u8);
            let mut open: Vec<(usize, FileId, u64, u64)> = Vec::new();
            let mut flying: Vec<Read> = Vec::new();
            let mut busy: HashSet<(FileId, u64)> = HashSet::new();
            // With a cache that holds everything, no block is ever read twice.
            let mut ever: HashSet<(FileId, u64)> = HashSet::new();
            let roomy = budget >= 10_000;
            // Tickets failed by a lone read, and blocks whose lone read failed.
            let mut failed: HashSet<usize> = HashSet::new();
            let mut bad: HashSet<(FileId, u64)> = HashSet::new();
            for _ in 0..400 {
                match rng.below(4) {
                    0 | 1 => {
                        let f = rng.below(3) as FileId;
                        let first = rng.below(40);
                        let last = first + rng.below(6);
                        open.push((pl.request(f, first, last), f, first, last));
                    }
                    2 => {
                        for r in pl.plan() {
                            prop_assert!(r.count <= p.max_merge_blocks);
                            prop_assert!(r.count as f64 <= p.max_amplification * r.wanted as f64 || r.count == r.wanted);
                            for b in r.first..r.first + r.count {
                                prop_assert!(busy.insert((r.file, b)), "block {} read twice at once", b);
                                prop_assert!(ever.insert((r.file, b)) || !roomy, "block {} read again", b);
                            }
                            flying.push(r);
                        }
                    }
                    _ if !flying.is_empty() => {
                        let r = flying.swap_remove(rng.below(flying.len() as u64) as usize);
                        for b in r.first..r.first + r.count {
                            busy.remove(&(r.file, b));
                            // A split block is read again.
                            ever.remove(&(r.file, b));
                        }
                        if bad.contains(&(r.file, r.first)) && r.count == 1 || rng.below(8) == 0 {
                            // An I/O error: a merged read is split, a lone
                            // read fails its requests.
                            for t in pl.fail_or_split(&r) {
                                failed.insert(t);
                            }
                            if r.count == 1 {
                                bad.insert((r.file, r.first));
                            }
                            continue;
                        }
                        let (pos, len) = r.bytes(p.block_size);
                        let data: Vec<u8> = (pos..pos + len as u64).map(|x| byte(r.file, x)).collect();
                        for b in r.first..r.first + r.count {
                            ever.insert((r.file, b));
                        }
                        pl.complete(&r, &data);
                    }
                    _ => {}
                }
                let mut k = 0;
                while k < open.len() {
                    let (t, f, first, last) = open[k];
                    if pl.is_done(t) {
                        let Some(got) = pl.take(t) else {
                            // Only a lone read's failure fails a request.
                            prop_assert!(failed.remove(&t));
                            open.swap_remove(k);
                            continue;
                        };
                        let got = got.concat();
                        let want: Vec<u8> = (first * p.block_size..(last + 1) * p.block_size)
                            .map(|x| byte(f, x))
                            .collect();
                        prop_assert_eq!(got, want);
                        open.swap_remove(k);
                    } else {
                        k += 1;
                    }
                }
            }
        }
    }
}
