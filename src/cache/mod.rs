//! The HTTP cache: RFC 9111 policy ([`policy`], pure), the S3-FIFO object
//! store ([`store`], pure), the per-shard collapse table ([`collapse`],
//! single-threaded), and the cached object with its key ([`object`]).

pub mod body;
pub mod collapse;
pub mod object;
pub mod policy;
pub mod shared;
pub mod store;

/// A stored target's path as a purge compares it: an absolute form's
/// scheme and authority dropped, the query dropped, percent-decoded, so
/// `GET http://h/a?x` and `GET /%61` are both reached by a purge of `/a`.
fn purge_form(target: &[u8]) -> Vec<u8> {
    use crate::http::request::{origin_form, path_of};
    crate::http::percent_decode(path_of(origin_form(target))).0
}

/// The cache key of a request: its host and target, hashed with SipHash
/// under keys drawn at random once per process. Lookups match on this
/// number alone, so it must not be possible to make two URLs collide on
/// purpose (FNV, [`key_hash`], is easy to collide): a collision would serve
/// one URL's stored response for the other.
pub fn cache_key(host: &[u8], target: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = keyed_hasher();
    // The host's length first: no choice of bytes in host and target makes
    // two different pairs hash the same input.
    h.write_usize(host.len());
    h.write(host);
    h.write(target);
    h.finish()
}

/// The cache key of a request as it reaches the cache: the host it is for
/// (the absolute-form authority, else `Host`) compared case-insensitively
/// and without the default port, and the target in origin form, so every
/// spelling of one URI (RFC 9110 §4.2.3) has one key: `GET /a` with
/// `Host: Example.COM:80` and `GET http://example.com/a` find what
/// `GET /a` with `Host: example.com` stored, and a `POST` to any of them
/// invalidates it (RFC 9111 §4.4).
pub fn request_key(head: &crate::http::request::RequestHead, buf: &[u8]) -> u64 {
    let authority = head.host.clone().map_or(&b""[..], |r| &buf[r]);
    // `a.example.:80` is `a.example` (as routes see it).
    let (name, port) = crate::http::request::split_authority(authority);
    let port = if port == b":80" || port == b":" {
        &b""[..]
    } else {
        port
    };
    let target = head.origin_target(buf);
    // `GET http://h?q` is `GET /?q` (the rewriter puts the `/` in), and
    // `/%7Ea` is `/~a` (RFC 9110 §4.2.3).
    let normal;
    let target = if target.first() == Some(&b'?') || memchr::memchr(b'%', target).is_some() {
        normal = normal_target(target);
        &normal[..]
    } else {
        target
    };
    let len = name.len() + port.len();
    let mut short = [0u8; 256];
    let mut long = Vec::new();
    let host: &mut [u8] = if len <= short.len() {
        &mut short[..len]
    } else {
        long.resize(len, 0);
        &mut long
    };
    host[..name.len()].copy_from_slice(name);
    host[name.len()..].copy_from_slice(port);
    host.make_ascii_lowercase();
    cache_key(host, target)
}

/// A target with a `/` before a bare query, percent-encoded unreserved
/// characters decoded and the hex digits of the other escapes upper-cased
/// (RFC 3986 §6.2.2): one spelling for the cache key.
fn normal_target(target: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(target.len() + 1);
    if target.first() == Some(&b'?') {
        out.push(b'/');
    }
    let mut i = 0;
    while i < target.len() {
        if let Some(c) = crate::http::escape_at(target, i) {
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c);
            } else {
                out.push(b'%');
                out.push(target[i + 1].to_ascii_uppercase());
                out.push(target[i + 2].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        out.push(target[i]);
        i += 1;
    }
    out
}

/// SipHash under keys drawn at random once per process.
fn keyed_hasher() -> std::collections::hash_map::DefaultHasher {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEYS.get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher()
}

/// The secondary key (RFC 9111 §4.1) of the variant of `primary` chosen by
/// these request values of its `Vary` fields (a missing field apart from
/// an empty one). Also the key a herd for that variant collapses under, in
/// a shard's table and process-wide.
pub(crate) fn variant_key(primary: u64, values: &[Option<Vec<u8>>]) -> u64 {
    use std::hash::Hasher;
    let mut h = keyed_hasher();
    h.write_u64(primary);
    for v in values {
        match v {
            None => h.write_u8(0),
            Some(b) => {
                h.write_u8(1);
                h.write_usize(b.len());
                h.write(b);
            }
        }
    }
    h.finish()
}

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

/// The process's object store: one partition per shard, owning the keys
/// with `key % shards == id`, so each object is stored once process-wide.
/// Each partition sits behind its own lock, taken for a lookup only when the
/// shard's hot set misses (and uncontended when the shard owns the key).
pub struct Partitions {
    parts: Vec<std::sync::Mutex<store::Store<object::Object>>>,
    /// Bumped by every purge and removal: hot-set entries from before are
    /// not used (a hot copy may outlive its owner's, so this is bumped even
    /// when the owner had nothing left to drop).
    purges: std::sync::atomic::AtomicU64,
    /// How many purges were logged (read without the log's lock).
    purge_count: std::sync::atomic::AtomicU64,
    /// The recent purges, for fills that were under way meanwhile.
    purge_log: std::sync::Mutex<PurgeLog>,
    /// Per partition, the secondary keys stored for each primary key, so a
    /// purge or an invalidation drops a URL's variants without sweeping
    /// the partition. Locked before the partition when both are held.
    variants: Vec<std::sync::Mutex<std::collections::HashMap<u64, Vec<u64>>>>,
    /// Invalidation stamps by primary key (hashed into a few buckets): an
    /// unsafe request's invalidation bumps its URL's bucket, and a hot copy
    /// taken under an older stamp is not used. It works whether or not the
    /// owner still held the object (a hot copy may outlive the owner's) and
    /// costs the other hot copies of one bucket in `INVALIDATION_BUCKETS`,
    /// not every hot set as a purge-generation bump would.
    invalidations: Box<[std::sync::atomic::AtomicU64]>,
}

/// How many invalidation stamps (a power of two).
const INVALIDATION_BUCKETS: usize = 4096;

/// Purges numbered in order, the last [`PURGE_LOG`] of them with what they
/// dropped.
#[derive(Default)]
struct PurgeLog {
    /// How many purges the process has seen.
    count: u64,
    recent: std::collections::VecDeque<Purged>,
}

/// What one purge dropped.
enum Purged {
    /// Every stored response with this path (`POST /purge?path=`).
    Path(Vec<u8>),
    /// One key (the `PURGE` method).
    Key(u64),
}

impl PurgeLog {
    /// Logs a purge (before its removals).
    fn push(&mut self, what: Purged) {
        self.count += 1;
        if self.recent.len() == PURGE_LOG {
            self.recent.pop_front();
        }
        self.recent.push_back(what);
    }
}

/// Purges remembered for fills under way: a fill that saw more purges go
/// by than this does not store what it fetched (it cannot tell whether one
/// of the forgotten ones was meant for it).
const PURGE_LOG: usize = 1024;

/// The largest object a cache of `size_bytes` over `shards` can store: an
/// object lives in its owner shard's partition (the budget less the hot
/// sets' sixteenth, over the shards), with room left for its head and
/// bookkeeping (its cost is body, fields, its metadata and the index
/// entry's allowance, see `object::Meta::footprint`).
pub fn largest_storable(size_bytes: u64, shards: usize) -> u64 {
    let part = (size_bytes - size_bytes / HOT_SET_SHARE) / shards.max(1) as u64;
    part - (part / 2).min(64 << 10)
}

impl Partitions {
    pub fn new(budget_bytes: u64, shards: usize) -> Partitions {
        let shards = shards.max(1);
        Partitions {
            parts: (0..shards)
                .map(|_| std::sync::Mutex::new(store::Store::new(budget_bytes / shards as u64)))
                .collect(),
            purges: Default::default(),
            purge_count: Default::default(),
            purge_log: Default::default(),
            variants: (0..shards).map(|_| Default::default()).collect(),
            invalidations: (0..INVALIDATION_BUCKETS)
                .map(|_| Default::default())
                .collect(),
        }
    }

    /// The invalidation stamp of the URL whose key (primary key) is
    /// `primary`.
    fn stamp(&self, primary: u64) -> u64 {
        self.invalidations[primary as usize & (INVALIDATION_BUCKETS - 1)]
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump_stamp(&self, primary: u64) {
        self.invalidations[primary as usize & (INVALIDATION_BUCKETS - 1)]
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Records `vk` as a stored variant of `primary`. Variants evicted
    /// since linger in the index: a URL's list is pruned to its live
    /// variants whenever it reaches a power of two from 64 (one URL asked
    /// with ever new `Vary` values cannot grow it without bound), and the
    /// whole index when it outgrows the partition. A variant lives in its
    /// own key's partition, looked at one lock at a time.
    fn note_variant(&self, primary: u64, vk: u64) {
        let mut index = self.variants[self.owner(primary)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let live = |k: &u64| self.part(*k).peek(*k).is_some();
        let list = index.entry(primary).or_default();
        if list.contains(&vk) {
            return;
        }
        list.push(vk);
        if list.len() >= 64 && list.len().is_power_of_two() {
            list.retain(live);
        }
        if index.len() > 1024 && index.len() > 2 * self.part(primary).len() {
            index.retain(|_, l| {
                l.retain(live);
                !l.is_empty()
            });
        }
    }

    /// The variant keys recorded for `primary` (for tests).
    #[cfg(test)]
    pub fn variants_noted(&self, primary: u64) -> usize {
        self.variants[self.owner(primary)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&primary)
            .map_or(0, Vec::len)
    }

    /// Drops `primary` and every variant of it; whether anything was stored.
    fn drop_with_variants(&self, primary: u64) -> bool {
        let variants = self.variants[self.owner(primary)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&primary)
            .unwrap_or_default();
        let mut p = self.part(primary);
        let mut removed = p.remove(primary).is_some();
        for vk in variants {
            removed |= p.remove(vk).is_some();
        }
        removed
    }

    /// The secondary key of a variant of `primary` ([`variant_key`]), in
    /// the same partition as `primary`, so a purge of the primary finds
    /// its variants there.
    pub fn variant_key(&self, primary: u64, values: &[Option<Vec<u8>>]) -> u64 {
        let n = self.parts.len() as u64;
        ((variant_key(primary, values) >> 1) / n) * n + primary % n
    }

    /// Logs a purge, before its removals: a fill that stores after this
    /// sees it ([`Self::insert_unless_purged`]).
    fn log_purge(&self, what: Purged) {
        let mut log = self.purge_log.lock().unwrap_or_else(|e| e.into_inner());
        log.push(what);
        self.purge_count
            .store(log.count, std::sync::atomic::Ordering::Release);
    }

    /// Whether a purge logged since purge number `since` was meant for a
    /// response for `key` with this target (or the log has forgotten).
    fn purged_since(&self, since: u64, key: u64, target: &[u8], variant_of: Option<u64>) -> bool {
        let log = self.purge_log.lock().unwrap_or_else(|e| e.into_inner());
        let missed = log.count.saturating_sub(since);
        if missed > log.recent.len() as u64 {
            return true;
        }
        let skip = log.recent.len() - missed as usize;
        // The target's purge form is computed at most once (it allocates).
        let mut form: Option<Vec<u8>> = None;
        log.recent.iter().skip(skip).any(|p| match p {
            Purged::Path(p) => {
                target == p.as_slice()
                    || form.get_or_insert_with(|| purge_form(target)).as_slice() == p.as_slice()
            }
            Purged::Key(k) => *k == key || variant_of == Some(*k),
        })
    }

    pub fn owner(&self, key: u64) -> usize {
        (key % self.parts.len() as u64) as usize
    }

    fn part(&self, key: u64) -> std::sync::MutexGuard<'_, store::Store<object::Object>> {
        self.parts[self.owner(key)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Drops every stored response whose target's path is `path` (any
    /// host, any query, any variant), or whose whole target is `path`;
    /// how many. Hot sets drop theirs through the purge generation.
    pub fn purge_path(&self, path: &[u8]) -> usize {
        self.log_purge(Purged::Path(path.to_vec()));
        let mut n = 0;
        for p in &self.parts {
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            p.retain(|_, o| {
                let t = &o.meta.target;
                let hit = t.as_slice() == path || purge_form(t) == path;
                n += usize::from(hit);
                !hit
            });
        }
        self.purges
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        n
    }

    /// Stores `obj` unless a purge since purge number `since` matched its
    /// target (or the log has forgotten whether one did). When stored, the
    /// hot-set generation from before it was: a copy in a hot set under
    /// that generation is dropped by any purge that removes it.
    fn insert_unless_purged(
        &self,
        since: u64,
        key: u64,
        obj: object::Object,
        cost: u64,
    ) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let (meta, variant_of) = (obj.meta.clone(), obj.variant_of);
        let checked = self.purge_count.load(Ordering::Acquire);
        if self.purged_since(since, key, &meta.target, variant_of) {
            return None;
        }
        let generation = self.purges.load(Ordering::Acquire);
        if !self.part(key).insert(key, obj, cost) {
            return None;
        }
        if let Some(primary) = variant_of {
            self.note_variant(primary, key);
        }
        // A purge logged between the check and the insert may have swept
        // this partition before the object was in it: take it out again.
        if self.purge_count.load(Ordering::Acquire) != checked
            && self.purged_since(checked, key, &meta.target, variant_of)
        {
            let mut p = self.part(key);
            if p.peek(key)
                .is_some_and(|o| std::sync::Arc::ptr_eq(&o.meta, &meta))
            {
                p.remove(key);
            }
            return None;
        }
        Some(generation)
    }

    /// Drops `key` for a purge: logged, so a fetch of it under way is not
    /// stored either. Whether it was stored.
    fn purge_key(&self, key: u64) -> bool {
        self.log_purge(Purged::Key(key));
        let removed = self.drop_with_variants(key);
        self.purges
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        removed
    }

    /// Objects and bytes stored, over every partition.
    pub fn usage(&self) -> (usize, u64) {
        self.parts.iter().fold((0, 0), |(n, b), p| {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            (n + p.len(), b + p.bytes())
        })
    }
}

/// A hot-set entry: the object, with the purge generation and its URL's
/// invalidation stamp from before it was copied (either moved since: not
/// used).
type HotCopy = (object::Object, u64, u64);

/// The key of the URL `obj`, stored under `key`, answers: a variant's
/// primary key, else `key`.
fn primary_of(key: u64, obj: &object::Object) -> u64 {
    obj.variant_of.unwrap_or(key)
}

/// One hot-set hit in this many is counted at the owner as well.
const HOT_HIT_SAMPLE: u64 = 16;

/// Share of the cache budget for the shards' hot sets.
pub(crate) const HOT_SET_SHARE: u64 = 16;

/// One shard's cache: a view of the process's partitions, its hot set (L1)
/// of popular objects owned by other shards, its collapse table, and its
/// counters (single-threaded).
pub struct ShardCache {
    id: usize,
    parts: std::sync::Arc<Partitions>,
    /// Objects owned elsewhere, by key, with the purge generation they were
    /// taken at. They share their bytes with the owner's copy (`Arc`); the
    /// budget bounds how much they can keep alive after the owner evicts.
    hot: std::cell::RefCell<store::Store<HotCopy>>,
    pub collapse: collapse::CollapseTable,
    pub hits: std::cell::Cell<u64>,
    pub misses: std::cell::Cell<u64>,
    pub collapsed: std::cell::Cell<u64>,
    pub stored: std::cell::Cell<u64>,
    /// Hot-set hits, for sampling them to the owner.
    hot_hits: std::cell::Cell<u64>,
}

impl ShardCache {
    /// How many purges the process has seen: a fill that started before a
    /// purge of its path does not store what it fetched (it may be what was
    /// purged).
    pub fn purge_generation(&self) -> u64 {
        self.parts
            .purge_count
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether a purge since purge count `since` was meant for `key` (or
    /// the request target `target`).
    pub fn purged_since(&self, since: u64, key: u64, target: &[u8]) -> bool {
        since != self.purge_generation() && self.parts.purged_since(since, key, target, None)
    }

    pub fn new(id: usize, parts: std::sync::Arc<Partitions>, budget_bytes: u64) -> ShardCache {
        let shards = parts.parts.len() as u64;
        ShardCache {
            id,
            parts,
            hot: std::cell::RefCell::new(store::Store::new(budget_bytes / HOT_SET_SHARE / shards)),
            collapse: collapse::CollapseTable::default(),
            hits: Default::default(),
            misses: Default::default(),
            collapsed: Default::default(),
            stored: Default::default(),
            hot_hits: Default::default(),
        }
    }

    pub fn bump(c: &std::cell::Cell<u64>) {
        c.set(c.get() + 1);
    }

    /// The stored object for `key`: from the hot set while it is fresh there
    /// (no lock, no other shard), else from the owner's partition.
    pub fn lookup(&self, key: u64, now: i64) -> Option<object::Object> {
        let owner = self.parts.owner(key);
        if owner == self.id {
            return self.parts.part(key).get(key).cloned();
        }
        let generation = self.parts.purges.load(std::sync::atomic::Ordering::Acquire);
        let mut hot = self.hot.borrow_mut();
        if let Some((o, g, stamp)) = hot.get(key) {
            if *g == generation
                && *stamp == self.parts.stamp(primary_of(key, o))
                && o.timing.current_age(now) < o.lifetime
            {
                let o = o.clone();
                // Every so often the owner hears of a hot-set hit too, so
                // its eviction does not take the most popular objects
                // (served from hot sets) for one-hit wonders.
                let n = self.hot_hits.get().wrapping_add(1);
                self.hot_hits.set(n);
                if n.is_multiple_of(HOT_HIT_SAMPLE) {
                    drop(hot);
                    self.parts.part(key).get(key);
                }
                return Some(o);
            }
        }
        // The stamp is read before the copy is taken: an invalidation that
        // removes the object after the copy moves it on.
        let own_stamp = self.parts.stamp(key);
        let found = self.parts.part(key).get(key).cloned();
        match &found {
            Some(o) => {
                // A variant carries its URL's stamp, known only from the
                // copy: read after it, it holds if the object is still
                // stored (the invalidation removes, then stamps).
                let primary = primary_of(key, o);
                let stamp = if primary == key {
                    own_stamp
                } else {
                    let stamp = self.parts.stamp(primary);
                    let same = |x: &object::Object| std::sync::Arc::ptr_eq(&x.meta, &o.meta);
                    if !self.parts.part(key).peek(key).is_some_and(same) {
                        return found;
                    }
                    stamp
                };
                hot.insert(key, (o.clone(), generation, stamp), o.cost());
            }
            None => {
                hot.remove(key);
            }
        }
        found
    }

    /// The stored response for a request, given how to read the request's
    /// values of a stored response's `Vary` fields: the key's own when it
    /// has no `Vary` or the values match, else the variant stored under
    /// its secondary key, if any. A miss says the request's values when the
    /// key holds another variant (the fetch collapses under its own).
    pub fn find(
        &self,
        key: u64,
        now: i64,
        values: impl Fn(&[Vec<u8>]) -> Vec<Option<Vec<u8>>>,
    ) -> Result<object::Object, Option<Vec<Option<Vec<u8>>>>> {
        let o = self.lookup(key, now).ok_or(None)?;
        if o.meta.vary.is_empty() {
            return Ok(o);
        }
        let want = values(&o.meta.vary);
        if o.vary_values == want {
            return Ok(o);
        }
        match self.lookup(self.parts.variant_key(key, &want), now) {
            Some(v) if v.variant_of == Some(key) && v.vary_values == values(&v.meta.vary) => Ok(v),
            _ => Err(Some(want)),
        }
    }

    /// Where a fetched response for `key` is stored: under `key`, unless
    /// that holds another variant of a response with `Vary`; then under
    /// the secondary key of its own variant, marked as such (so variants
    /// do not push each other out).
    pub fn place(&self, key: u64, obj: &mut object::Object) -> u64 {
        obj.variant_of = None;
        if obj.meta.vary.is_empty() {
            return key;
        }
        let other = self.parts.part(key).peek(key).is_some_and(|p| {
            p.variant_of.is_none() && !p.meta.vary.is_empty() && p.vary_values != obj.vary_values
        });
        if other {
            obj.variant_of = Some(key);
            self.parts.variant_key(key, &obj.vary_values)
        } else {
            key
        }
    }

    /// The key `obj`, a response for `key`, is stored under.
    pub fn slot_of(&self, key: u64, obj: &object::Object) -> u64 {
        obj.variant_of.map_or(key, |primary| {
            self.parts.variant_key(primary, &obj.vary_values)
        })
    }

    /// Stores `obj` in its owner's partition; false if it does not fit.
    pub fn insert(&self, key: u64, obj: object::Object) -> bool {
        self.insert_fetched(self.purge_generation(), key, obj)
    }

    /// Stores `obj`, fetched from the origin since purge generation `since`
    /// ([`Self::purge_generation`]), unless a purge came in between: what
    /// was fetched may be what the purge meant to drop. Whether it was
    /// stored.
    pub fn insert_fetched(&self, since: u64, key: u64, obj: object::Object) -> bool {
        let cost = obj.cost();
        let stamp = self.parts.stamp(primary_of(key, &obj));
        let Some(generation) = self
            .parts
            .insert_unless_purged(since, key, obj.clone(), cost)
        else {
            return false;
        };
        if self.parts.owner(key) != self.id {
            self.hot
                .borrow_mut()
                .insert(key, (obj, generation, stamp), cost);
        }
        true
    }

    /// Purges `key` process-wide (a fetch of it under way is not stored);
    /// whether it was stored.
    pub fn purge(&self, key: u64) -> bool {
        self.hot.borrow_mut().remove(key);
        self.parts.purge_key(key)
    }

    /// Invalidates `key` and its variants after a successful unsafe request
    /// to its URL (RFC 9111 §4.4), in every shard's hot set too, whether or
    /// not the owner still held them (its URL's invalidation stamp moves,
    /// after the removal). Not logged as a purge (a fill under way may
    /// still store what it fetched), and not a purge-generation bump: a
    /// POST stream must not flush every hot set or the purge log.
    pub fn invalidate(&self, key: u64) -> bool {
        self.hot.borrow_mut().remove(key);
        let removed = self.parts.drop_with_variants(key);
        self.parts.bump_stamp(key);
        removed
    }

    /// Drops `key` process-wide; whether it was stored.
    /// Removes what `key` holds (and this shard's hot copy) while it is
    /// still `old`: a copy stored since (a newer response) stays. Whether
    /// it was removed.
    pub fn remove_if_still(&self, key: u64, old: &object::Object) -> bool {
        let same = |o: &object::Object| std::sync::Arc::ptr_eq(&o.meta, &old.meta);
        let removed = {
            let mut p = self.parts.part(key);
            if p.peek(key).is_some_and(same) {
                p.remove(key);
                true
            } else {
                false
            }
        };
        let mut hot = self.hot.borrow_mut();
        if hot.peek(key).is_some_and(|(o, _, _)| same(o)) {
            hot.remove(key);
        }
        drop(hot);
        if removed {
            // Other shards' hot copies of it go too. After the removal: a
            // shard that sees the new generation must not find the object
            // still in its partition and copy it back into its hot set.
            self.parts
                .purges
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        removed
    }
}

/// Seconds since the Unix epoch, for RFC 9111 age arithmetic: the coarse
/// clock (updated every tick, a few ms; no time-stamp counter read), as
/// whole seconds are all the arithmetic needs.
pub fn unix_now() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        return ts.tv_sec;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::key_hash;

    #[test]
    fn an_invalidation_reaches_hot_copies_the_owner_no_longer_holds() {
        // Shard 1 keeps a hot copy of an object shard 0 owns; shard 0
        // evicts it; an unsafe request's invalidation on shard 0 (which has
        // nothing left to drop) must still keep shard 1 from serving it.
        // Its variants too, and only their URL's copies go.
        use super::body::Body;
        use super::object::{test_meta, Object};
        use super::policy::Timing;
        use super::{Partitions, ShardCache};
        use std::sync::Arc;
        let object = |variant_of: Option<u64>| Object {
            meta: test_meta(),
            body: Arc::new(Body::new(b"x".to_vec())),
            timing: Timing::new(&Default::default(), super::unix_now(), super::unix_now()),
            lifetime: 600,
            vary_values: Vec::new(),
            variant_of,
        };
        let parts = Arc::new(Partitions::new(64 << 20, 2));
        let (owner, other) = (
            ShardCache::new(0, parts.clone(), 64 << 20),
            ShardCache::new(1, parts.clone(), 64 << 20),
        );
        let now = super::unix_now();
        // Keys owned by shard 0 (even); a variant of 10 lives with it.
        let (url, variant, neighbour) = (10u64, parts.variant_key(10, &[None]), 12u64);
        assert!(owner.insert(url, object(None)));
        assert!(owner.insert(variant, object(Some(url))));
        assert!(owner.insert(neighbour, object(None)));
        for k in [url, variant, neighbour] {
            assert!(other.lookup(k, now).is_some(), "hot copy of {k}");
        }
        // Evicted by the owner (as its FIFO would): the hot copies stay.
        for k in [url, variant, neighbour] {
            parts.part(k).remove(k);
            assert!(other.lookup(k, now).is_some(), "{k} outlives the owner's");
        }
        assert!(!owner.invalidate(url));
        assert!(other.lookup(url, now).is_none());
        assert!(other.lookup(variant, now).is_none());
        assert!(
            other.lookup(neighbour, now).is_some(),
            "another URL's copy stays"
        );
    }

    #[test]
    fn the_largest_storable_object_fits_its_partition() {
        use super::{largest_storable, HOT_SET_SHARE};
        // 8 MiB over 2 shards: partitions of 3.75 MiB, less 64 KiB.
        assert_eq!(largest_storable(8 << 20, 2), (15 << 18) - (64 << 10));
        // A tiny partition keeps half for the head and bookkeeping.
        assert_eq!(largest_storable(16 * 1024, 1), 7680);
        for (size, shards) in [(1u64 << 30, 1), (64 << 20, 16), (1 << 20, 7)] {
            let part = (size - size / HOT_SET_SHARE) / shards as u64;
            let most = largest_storable(size, shards);
            assert!(most < part && most >= part / 2, "{size} {shards}");
        }
    }

    #[test]
    fn purge_compares_decoded_origin_form_paths() {
        use super::purge_form;
        assert_eq!(purge_form(b"/a?x=1"), b"/a");
        assert_eq!(purge_form(b"/%61"), b"/a");
        assert_eq!(purge_form(b"http://h:80/a?q"), b"/a");
        assert_eq!(purge_form(b"HTTPS://h"), b"/");
        assert_eq!(purge_form(b"/a%2Fb"), b"/a/b");
    }

    #[test]
    fn every_spelling_of_a_uri_has_one_key() {
        use super::request_key;
        use crate::http::request::{parse_request, HeadLimits, RequestHead};
        let limits = HeadLimits {
            max_header_bytes: 8192,
            max_headers: 64,
            max_uri_bytes: 4096,
        };
        let key = |req: &str| {
            let mut h = RequestHead::default();
            assert!(parse_request(req.as_bytes(), &limits, &mut h).unwrap());
            request_key(&h, req.as_bytes())
        };
        let one = |a: &str, b: &str| {
            let ka = key(&format!("GET {a} HTTP/1.1\r\nHost: h\r\n\r\n"));
            let kb = key(&format!("GET {b} HTTP/1.1\r\nHost: h\r\n\r\n"));
            ka == kb
        };
        assert!(one("http://h?q", "/?q"));
        assert!(one("http://H:80/a", "/a"));
        assert!(one("/%7Ea", "/~a"));
        assert!(one("/%41%2d%2E", "/A-."));
        assert!(one("/a%2fb", "/a%2Fb"));
        assert!(!one("/a%2Fb", "/a/b"));
        assert!(!one("/a%3Fb", "/a?b"));
        assert!(!one("/a", "/b"));
        // A trailing dot on the host is the same host, with or without a
        // port; a different port is not.
        let host = |h: &str| key(&format!("GET /a HTTP/1.1\r\nHost: {h}\r\n\r\n"));
        assert_eq!(host("h."), host("h"));
        assert_eq!(host("H.:80"), host("h"));
        assert_eq!(host("h.:8080"), host("h:8080"));
        assert_ne!(host("h:8080"), host("h"));
        assert_eq!(
            key("GET http://h./a HTTP/1.1\r\nHost: x\r\n\r\n"),
            host("h")
        );
    }

    #[test]
    fn cache_keys_separate_host_and_target() {
        use super::cache_key;
        assert_eq!(cache_key(b"a", b"/x"), cache_key(b"a", b"/x"));
        assert_ne!(cache_key(b"a", b"/x"), cache_key(b"a", b"/y"));
        assert_ne!(cache_key(b"a", b"b/x"), cache_key(b"ab", b"/x"));
        assert_ne!(cache_key(b"h1", b"/x"), cache_key(b"h2", b"/x"));
        assert_ne!(cache_key(b"a\xffb", b"/x"), cache_key(b"a", b"b\xff/x"));
    }

    #[test]
    fn key_parts_are_separated() {
        assert_ne!(key_hash(&[b"ab", b"c"]), key_hash(&[b"a", b"bc"]));
        assert_eq!(key_hash(&[b"host", b"/p"]), key_hash(&[b"host", b"/p"]));
    }
}
