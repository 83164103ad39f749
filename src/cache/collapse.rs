//! Collapsed forwarding within a shard: key → the one origin fetch in flight
//! ([`Fill`]), which every request for that key reads while it is written.
//! Single-threaded (`Rc`/`RefCell`), no locks, no polling: readers are woken
//! by the fetch's progress through stored wakers.
//!
//! The fetch runs in its own task, not in any client's: a reader that goes
//! away (even the first) never stops a cacheable fetch, and a slow reader
//! never slows the fetch or the other readers; each reader keeps its own
//! cursor into the shared, immutable chunks.
//!
//! States of a fill (pingora's lock states, single-threaded):
//! `Waiting` (no head yet) → `Streaming` (head known, chunks arriving) →
//! `Done`; or `Uncacheable` (exclusive: only the readers that have started
//! may read it, the others go to the origin on their own; an uncacheable
//! response's only reader is the first, a stream demoted when it outgrew
//! the object size limit keeps the readers it had); or `Failed` (an origin
//! error before any byte: readers answer with the status; after bytes:
//! readers close). An exclusive stream is paced on its fastest reader,
//! keeps only what its slowest has not taken, and cuts a reader that falls
//! [`MAX_LAG`] behind.

use super::object::Meta;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    Streaming,
    Done,
    /// Not cacheable: the first reader alone reads it.
    Uncacheable,
    /// The origin failed; the status readers answer with if they sent nothing.
    Failed(u16),
}

/// How far (in bytes) a reader of an exclusive stream (uncacheable, or
/// demoted because it outgrew the object size limit) may fall behind the
/// newest chunk before it is cut: the chunks behind the slowest reader are
/// kept for it, so this bounds what such a stream holds.
pub const MAX_LAG: u64 = 8 * 1024 * 1024;

/// Drops the chunks before index `low` (all of them when no reader is
/// left: `None`) from `chunks`, which holds those from index `base` on.
pub(super) fn release_before(chunks: &mut Vec<Arc<[u8]>>, base: &mut usize, low: Option<usize>) {
    let n = low.map_or(chunks.len(), |low| {
        low.saturating_sub(*base).min(chunks.len())
    });
    chunks.drain(..n);
    *base += n;
}

/// One origin fetch shared by every reader of its key.
pub struct Fill {
    pub key: u64,
    /// The purge count when it started: a request after a purge of its key
    /// does not join a fetch begun before it.
    generation: u64,
    state: RefCell<State>,
    /// Readers that joined, the first included.
    readers: Cell<usize>,
}

/// A reader that has started reading (or the first, from its start).
struct Cursor {
    /// Which registration (slab keys are reused once removed).
    id: u64,
    next_chunk: usize,
    taken: u64,
}

struct State {
    phase: Phase,
    meta: Option<Arc<Meta>>,
    /// Chunks from index `base` on; earlier ones were released.
    chunks: Vec<Arc<[u8]>>,
    base: usize,
    bytes: u64,
    /// Incremented on every change; readers wait for it to move.
    version: u64,
    /// Only the first reader may read (uncacheable, or demoted): its taken
    /// chunks can be released.
    exclusive: bool,
    /// No reader may read: everyone goes to the origin alone (a response
    /// another shard found uncacheable).
    alone: bool,
    /// Where the response came from (for the first reader's Cache-Status).
    source: Source,
    /// Relayed from another shard's fetch: every reader here, the first
    /// included, joined that fetch (collapsed).
    relayed: bool,
    wakers: Vec<Waker>,
    /// The readers still there that have started: they keep what they
    /// need of an exclusive stream, which is paced on the fastest of them
    /// and ends when none is left.
    cursors: slab::Slab<Cursor>,
    /// The next cursor's id.
    next_id: u64,
    /// Bytes taken by the fastest of `cursors` (recomputed when read if
    /// `max_stale`: the fastest left).
    max_taken: u64,
    max_stale: bool,
    /// The fill task waiting for the readers of an exclusive stream.
    pacer: Option<Waker>,
}

impl State {
    fn wake_pacer(&mut self) {
        if let Some(w) = self.pacer.take() {
            w.wake();
        }
    }

    /// Registers a started reader; its key and id.
    fn register(&mut self, next_chunk: usize, taken: u64) -> (usize, u64) {
        let id = self.next_id;
        self.next_id += 1;
        let key = self.cursors.insert(Cursor {
            id,
            next_chunk,
            taken,
        });
        (key, id)
    }

    /// Whether `slot` is still registered (not cut).
    fn holds(&self, (key, id): (usize, u64)) -> bool {
        self.cursors.get(key).is_some_and(|c| c.id == id)
    }

    /// A started reader left or was cut: the fastest may be another.
    fn forget(&mut self, slot: (usize, u64)) {
        if self.holds(slot) {
            let gone = self.cursors.remove(slot.0);
            // Recomputed once, when the pace is next read, not per reader
            // leaving (a herd's readers leave together).
            if gone.taken >= self.max_taken {
                self.max_stale = true;
            }
            self.wake_pacer();
        }
    }

    /// Bytes pushed but not yet taken by the fastest reader.
    fn backlog(&mut self) -> u64 {
        if self.max_stale {
            self.max_stale = false;
            self.max_taken = self.cursors.iter().map(|(_, c)| c.taken).max().unwrap_or(0);
        }
        self.bytes.saturating_sub(self.max_taken)
    }
}

/// Where a fill's response came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// The origin's answer to the fetch.
    #[default]
    Origin,
    /// Already stored (another shard's fetch stored it first).
    Stored,
    /// The stored response, refreshed by a 304.
    Refreshed,
    /// The stored (stale) response, because the origin failed
    /// (`stale-if-error`).
    StaleOnError,
    /// The origin's error answer (5xx, without freshness): shared with the
    /// requests waiting for it, not stored.
    Unstored,
}

/// What a reader sees at its cursor.
pub enum Next {
    /// The response head, once, before any chunk.
    Chunk(Arc<[u8]>),
    /// Nothing new yet: wait with [`Fill::changed`].
    Pending,
    /// The body is complete.
    End,
    /// This reader must not use the fill: go to the origin on its own.
    GoAlone,
    /// The origin failed: the status if nothing was sent, else close.
    Failed(u16),
}

impl Fill {
    fn new(key: u64, generation: u64) -> Fill {
        Fill {
            key,
            generation,
            state: RefCell::new(State {
                phase: Phase::Waiting,
                meta: None,
                chunks: Vec::new(),
                base: 0,
                bytes: 0,
                version: 0,
                exclusive: false,
                alone: false,
                source: Source::Origin,
                relayed: false,
                wakers: Vec::new(),
                cursors: slab::Slab::new(),
                next_id: 0,
                max_taken: 0,
                max_stale: false,
                pacer: None,
            }),
            readers: Cell::new(0),
        }
    }

    /// A new fill and its first reader (the one the fetch is made for).
    fn with_first(key: u64, generation: u64) -> (Rc<Fill>, Reader) {
        let fill = Rc::new(Fill::new(key, generation));
        fill.readers.set(1);
        let slot = fill.state.borrow_mut().register(0, 0);
        let reader = Reader {
            fill: fill.clone(),
            first: true,
            next_chunk: 0,
            taken: 0,
            slot: Some(slot),
        };
        (fill, reader)
    }

    pub fn phase(&self) -> Phase {
        self.state.borrow().phase
    }

    pub fn meta(&self) -> Option<Arc<Meta>> {
        self.state.borrow().meta.clone()
    }

    /// Only the first reader may read this fill (it was found uncacheable
    /// or outgrew the object size limit), even once it is done.
    pub fn exclusive(&self) -> bool {
        self.state.borrow().exclusive
    }

    pub fn readers(&self) -> usize {
        self.readers.get()
    }

    pub fn version(&self) -> u64 {
        self.state.borrow().version
    }

    pub fn bytes(&self) -> u64 {
        self.state.borrow().bytes
    }

    /// The fetch is alive without news for the readers (a new attempt, an
    /// interim answer): the leading reader's wait for the head starts
    /// again.
    pub fn progress(&self) {
        let mut st = self.state.borrow_mut();
        self.bump(&mut st);
    }

    fn bump(&self, st: &mut State) {
        st.version += 1;
        for w in st.wakers.drain(..) {
            w.wake();
        }
    }

    /// Where the response came from: [`Source::Origin`] unless set before
    /// [`Self::start`].
    pub fn source(&self) -> Source {
        self.state.borrow().source
    }

    /// The purge count when the fill began (when its first request found
    /// the key missing or stale).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn set_source(&self, source: Source) {
        self.state.borrow_mut().source = source;
    }

    /// Whether the response is relayed from another shard's fetch.
    pub fn relayed(&self) -> bool {
        self.state.borrow().relayed
    }

    /// Marks the response as another shard's fetch, relayed.
    pub fn set_relayed(&self) {
        self.state.borrow_mut().relayed = true;
    }

    /// The head is known; `cacheable` decides whether every reader may read.
    pub fn start(&self, meta: Arc<Meta>, cacheable: bool) {
        let mut st = self.state.borrow_mut();
        st.meta = Some(meta);
        st.phase = if cacheable {
            Phase::Streaming
        } else {
            Phase::Uncacheable
        };
        st.exclusive = !cacheable;
        self.bump(&mut st);
    }

    /// Appends body bytes. In an exclusive stream, readers more than
    /// [`MAX_LAG`] behind are cut and the chunks every remaining reader
    /// has taken are released, so memory stays bounded.
    pub fn push(&self, chunk: Arc<[u8]>) {
        self.push_inner(chunk, true);
    }

    /// [`Self::push`] for a body held whole already (a stored response
    /// served through the fill): its readers are not cut for lagging, as
    /// keeping it for them costs nothing its copy does not.
    pub fn push_held(&self, chunk: Arc<[u8]>) {
        self.push_inner(chunk, false);
    }

    fn push_inner(&self, chunk: Arc<[u8]>, cut: bool) {
        let mut st = self.state.borrow_mut();
        st.bytes += chunk.len() as u64;
        st.chunks.push(chunk);
        if st.exclusive && cut {
            let bytes = st.bytes;
            let behind: Vec<(usize, u64)> = st
                .cursors
                .iter()
                .filter(|(_, c)| bytes - c.taken > MAX_LAG)
                .map(|(i, c)| (i, c.id))
                .collect();
            for i in behind {
                st.forget(i);
            }
            let low = st.cursors.iter().map(|(_, c)| c.next_chunk).min();
            let st = &mut *st;
            release_before(&mut st.chunks, &mut st.base, low);
        }
        self.bump(&mut st);
    }

    /// The body is complete.
    pub fn finish(&self) {
        let mut st = self.state.borrow_mut();
        if matches!(
            st.phase,
            Phase::Streaming | Phase::Uncacheable | Phase::Waiting
        ) {
            st.phase = Phase::Done;
        }
        self.bump(&mut st);
    }

    /// The origin failed.
    pub fn fail(&self, status: u16) {
        let mut st = self.state.borrow_mut();
        st.phase = Phase::Failed(status);
        self.bump(&mut st);
    }

    /// Turns a cacheable stream into an exclusive one (it outgrew the
    /// object size limit): readers that have not started go alone, those
    /// already streaming go on to the end unless they fall [`MAX_LAG`]
    /// behind.
    pub fn demote(&self) {
        let mut st = self.state.borrow_mut();
        if st.phase == Phase::Streaming {
            st.phase = Phase::Uncacheable;
        }
        st.exclusive = true;
        st.max_stale = true;
        self.bump(&mut st);
    }

    /// Sends every reader, the first included, to the origin on its own.
    pub fn go_alone(&self) {
        let mut st = self.state.borrow_mut();
        st.phase = Phase::Uncacheable;
        st.exclusive = true;
        st.alone = true;
        self.bump(&mut st);
    }

    /// Whether every reader must go alone.
    pub fn alone(&self) -> bool {
        self.state.borrow().alone
    }

    /// The body so far, as one stored body (for storing a finished fill).
    pub fn body(&self) -> Option<super::body::Body> {
        let st = self.state.borrow();
        if st.base != 0 {
            return None;
        }
        Some(super::body::Body::from_parts(&st.chunks))
    }

    /// Readers still there that have started (the first counts from its
    /// start): an exclusive stream ends when none is left.
    pub fn live_readers(&self) -> usize {
        self.state.borrow().cursors.len()
    }

    /// Bytes pushed but not yet taken by the fastest reader.
    pub fn backlog(&self) -> u64 {
        self.state.borrow_mut().backlog()
    }

    /// Completes when no reader is left or the fastest is at most `ahead`
    /// bytes behind (the pace of an exclusive stream).
    pub fn readers_within(self: &Rc<Self>, ahead: u64) -> ReadersWithin {
        ReadersWithin {
            fill: self.clone(),
            ahead,
        }
    }

    /// Waits until the fill changes after `seen`.
    pub fn changed(self: &Rc<Self>, seen: u64) -> Changed {
        Changed {
            fill: self.clone(),
            seen,
            registered: None,
        }
    }
}

pub struct Changed {
    fill: Rc<Fill>,
    seen: u64,
    /// The waker this future put in the fill's list (it stays there until
    /// the next change, which makes this future ready).
    registered: Option<Waker>,
}

pub struct ReadersWithin {
    fill: Rc<Fill>,
    ahead: u64,
}

impl Future for ReadersWithin {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.fill.state.borrow_mut();
        if st.cursors.is_empty() || st.backlog() <= self.ahead {
            return Poll::Ready(());
        }
        st.pacer = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Future for Changed {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut st = this.fill.state.borrow_mut();
        if st.version != this.seen {
            return Poll::Ready(());
        }
        // Registered once per wait, not once per poll, and without scanning
        // the list for its waker: with N readers waiting, scanning made
        // every change cost N²/2 comparisons.
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            st.wakers.push(cx.waker().clone());
            this.registered = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// One reader's position in a fill.
pub struct Reader {
    pub fill: Rc<Fill>,
    /// Whether this reader is the first (the one the fetch was made for).
    pub first: bool,
    next_chunk: usize,
    taken: u64,
    /// Its entry among the fill's started readers (key, id).
    slot: Option<(usize, u64)>,
}

impl Reader {
    /// The next thing to do at this reader's cursor.
    pub fn step(&mut self) -> Next {
        let mut st = self.fill.state.borrow_mut();
        match st.phase {
            Phase::Waiting => return Next::Pending,
            Phase::Failed(code) => return Next::Failed(code),
            // Everyone was sent alone after this reader had started (its
            // fill lost its only other reader): nothing more will come.
            _ if st.alone && (self.next_chunk > 0 || self.taken > 0) => return Next::Failed(502),
            _ if st.exclusive
                && (!self.first || st.alone)
                && self.next_chunk == 0
                && self.taken == 0 =>
            {
                return Next::GoAlone
            }
            _ => {}
        }
        if self.next_chunk < st.base || self.slot.is_some_and(|s| !st.holds(s)) {
            // Cut: it fell too far behind an exclusive stream, and what it
            // needed was released.
            self.slot = None;
            return Next::Failed(502);
        }
        if let Some(c) = st.chunks.get(self.next_chunk - st.base).cloned() {
            self.next_chunk += 1;
            self.taken += c.len() as u64;
            match self.slot {
                Some((key, _)) => {
                    let c = &mut st.cursors[key];
                    c.next_chunk = self.next_chunk;
                    c.taken = self.taken;
                }
                None => self.slot = Some(st.register(self.next_chunk, self.taken)),
            }
            if self.taken > st.max_taken {
                st.max_taken = self.taken;
                st.wake_pacer();
            }
            return Next::Chunk(c);
        }
        if st.phase == Phase::Done {
            Next::End
        } else {
            Next::Pending
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            self.fill.state.borrow_mut().forget(s);
        }
    }
}

/// Hit-for-miss keys a shard remembers at most; each sweep leaves at most
/// half, so the sweeps cost O(1) per insert.
const MAX_UNCACHEABLE: usize = 100_000;

/// Keys with a deadline, at most [`MAX_UNCACHEABLE`] of them.
#[derive(Default)]
struct Deadlines(RefCell<HashMap<u64, Instant>>);

impl Deadlines {
    fn set(&self, key: u64, until: Instant) {
        let mut m = self.0.borrow_mut();
        if m.len() >= MAX_UNCACHEABLE {
            let now = Instant::now();
            m.retain(|_, t| *t > now);
            // Still half full (a flood of distinct keys): forget them all
            // rather than sweep again at the next insert. Losing one costs
            // only a wait on a fetch that turns out uncacheable (or one
            // more refresh).
            if m.len() >= MAX_UNCACHEABLE / 2 {
                m.clear();
            }
        }
        m.insert(key, until);
    }

    fn forget(&self, key: u64) {
        self.0.borrow_mut().remove(&key);
    }

    fn holds(&self, key: u64, now: Instant) -> bool {
        let mut m = self.0.borrow_mut();
        match m.get(&key) {
            Some(t) if *t > now => true,
            Some(_) => {
                m.remove(&key);
                false
            }
            None => false,
        }
    }
}

/// The shard's fills by key, and keys recently found uncacheable.
#[derive(Default)]
pub struct CollapseTable {
    fills: RefCell<HashMap<u64, Rc<Fill>>>,
    /// Hit-for-miss: key → until when requests for it skip the table.
    uncacheable: Deadlines,
    /// Key → until when a stale-while-revalidate hit starts no refresh
    /// (the last one got an error).
    no_refresh: Deadlines,
}

impl CollapseTable {
    /// Joins the fill for `key`, creating it if none is in flight. The
    /// second value is true for the reader that created it: that reader
    /// must start the fetch.
    #[cfg(test)]
    pub fn join(&self, key: u64) -> (Reader, bool) {
        self.join_since(key, 0, |_| false)
    }

    /// [`Self::join`] at purge count `generation`: a fill for the key that
    /// began before a purge that `purged` (given the fill's count) says was
    /// meant for it is not joined; a new one replaces it in the table (the
    /// old one finishes for the readers it has).
    pub fn join_since(
        &self,
        key: u64,
        generation: u64,
        purged: impl Fn(u64) -> bool,
    ) -> (Reader, bool) {
        let mut fills = self.fills.borrow_mut();
        match fills.get(&key) {
            Some(f)
                if !matches!(f.phase(), Phase::Done | Phase::Failed(_))
                    && (f.generation == generation || !purged(f.generation)) =>
            {
                f.readers.set(f.readers.get() + 1);
                let reader = Reader {
                    fill: f.clone(),
                    first: false,
                    next_chunk: 0,
                    taken: 0,
                    slot: None,
                };
                (reader, false)
            }
            _ => {
                let (f, reader) = Fill::with_first(key, generation);
                fills.insert(key, f);
                (reader, true)
            }
        }
    }

    /// A fill for `key` that nobody else joins (collapsing turned off): it
    /// is not in the table, so its reader is its only one.
    pub fn alone(&self, key: u64, generation: u64) -> Reader {
        Fill::with_first(key, generation).1
    }

    /// Removes the fill once it ended (only if it is still the current one).
    pub fn remove(&self, fill: &Rc<Fill>) {
        let mut fills = self.fills.borrow_mut();
        if fills.get(&fill.key).is_some_and(|f| Rc::ptr_eq(f, fill)) {
            fills.remove(&fill.key);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.fills.borrow().len()
    }

    /// Remembers `key` as uncacheable until `until` (hit-for-miss).
    pub fn mark_uncacheable(&self, key: u64, until: Instant) {
        self.uncacheable.set(key, until);
    }

    pub fn forget_uncacheable(&self, key: u64) {
        self.uncacheable.forget(key);
    }

    /// Whether requests for `key` should bypass the table.
    pub fn is_uncacheable(&self, key: u64, now: Instant) -> bool {
        self.uncacheable.holds(key, now)
    }

    /// No background refresh of `key` until `until` (the last one failed).
    pub fn hold_refresh(&self, key: u64, until: Instant) {
        self.no_refresh.set(key, until);
    }

    pub fn refresh_held(&self, key: u64, now: Instant) -> bool {
        self.no_refresh.holds(key, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_for_miss_stays_bounded() {
        let t = CollapseTable::default();
        let later = Instant::now() + std::time::Duration::from_secs(60);
        for k in 0..(MAX_UNCACHEABLE as u64 * 3) {
            t.mark_uncacheable(k, later);
            assert!(t.uncacheable.0.borrow().len() <= MAX_UNCACHEABLE);
        }
        // The newest is remembered.
        assert!(t.is_uncacheable(MAX_UNCACHEABLE as u64 * 3 - 1, Instant::now()));
    }

    use crate::cache::object::test_meta as meta;

    fn drain(r: &mut Reader) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        loop {
            match r.step() {
                Next::Chunk(c) => out.extend_from_slice(&c),
                Next::End => return (out, true),
                _ => return (out, false),
            }
        }
    }

    #[test]
    fn one_leader_many_followers() {
        let t = CollapseTable::default();
        let (mut a, lead_a) = t.join(7);
        let (mut b, lead_b) = t.join(7);
        let (_c, lead_c) = t.join(8);
        assert!(lead_a && !lead_b && lead_c);
        assert!(matches!(b.step(), Next::Pending));
        let f = a.fill.clone();
        f.start(meta(), true);
        f.push(Arc::from(&b"hel"[..]));
        assert_eq!(drain(&mut b), (b"hel".to_vec(), false));
        f.push(Arc::from(&b"lo"[..]));
        f.finish();
        assert_eq!(drain(&mut a), (b"hello".to_vec(), true));
        // The first reader finishing does not release what others still need.
        drop(a);
        assert_eq!(drain(&mut b), (b"lo".to_vec(), true));
        assert_eq!(f.readers(), 2);
        t.remove(&f);
        // After the fill ended a new request leads a new fetch.
        let (_d, lead_d) = t.join(7);
        assert!(lead_d);
    }

    #[test]
    fn a_fill_from_before_a_purge_is_not_joined() {
        let t = CollapseTable::default();
        let (a, lead) = t.join_since(1, 5, |_| false);
        assert!(lead);
        // Same purge count: joined.
        let (b, lead) = t.join_since(1, 5, |_| true);
        assert!(!lead && Rc::ptr_eq(&a.fill, &b.fill));
        // A later count, but no purge meant for it: joined.
        let (c, lead) = t.join_since(1, 6, |g| g != 5);
        assert!(!lead && Rc::ptr_eq(&a.fill, &c.fill));
        // A purge of it since: a new fill replaces it in the table, and
        // the old one can no longer remove the new one.
        let (d, lead) = t.join_since(1, 7, |g| g == 5);
        assert!(lead && !Rc::ptr_eq(&a.fill, &d.fill));
        t.remove(&a.fill);
        let (e, lead) = t.join_since(1, 7, |_| false);
        assert!(!lead && Rc::ptr_eq(&d.fill, &e.fill));
    }

    #[test]
    fn uncacheable_sends_followers_alone() {
        let t = CollapseTable::default();
        let (mut a, _) = t.join(1);
        let (mut b, _) = t.join(1);
        a.fill.start(meta(), false);
        assert!(matches!(b.step(), Next::GoAlone));
        a.fill.push(Arc::from(&b"x"[..]));
        assert!(matches!(a.step(), Next::Chunk(_)));
        assert_eq!(a.fill.backlog(), 0);
        a.fill.push(Arc::from(&b"y"[..]));
        // What the only reader took is released as the stream goes on.
        assert_eq!(a.fill.state.borrow().base, 1);
        assert_eq!(a.fill.backlog(), 1);
        assert!(matches!(a.step(), Next::Chunk(_)));
        a.fill.finish();
        assert!(matches!(a.step(), Next::End));
        // Still not for the others once done.
        assert!(matches!(b.step(), Next::GoAlone));
    }

    #[test]
    fn sending_everyone_alone_cuts_readers_already_reading() {
        let t = CollapseTable::default();
        let (a, _) = t.join(1);
        let (mut b, _) = t.join(1);
        let (mut c, _) = t.join(1);
        a.fill.start(meta(), true);
        a.fill.push(Arc::from(&b"x"[..]));
        assert!(matches!(b.step(), Next::Chunk(_)));
        // The fill loses its only other reader and sends everyone alone:
        // one who has not started goes to the origin, one midway is cut
        // (it would wait for chunks that never come).
        drop(a);
        c.fill.go_alone();
        assert!(matches!(c.step(), Next::GoAlone));
        assert!(matches!(b.step(), Next::Failed(502)));
    }

    #[test]
    fn failures_reach_every_reader() {
        let t = CollapseTable::default();
        let (a, _) = t.join(1);
        let (mut b, _) = t.join(1);
        a.fill.fail(504);
        assert!(matches!(b.step(), Next::Failed(504)));
        // A failed fill is replaced by the next join.
        let (_c, lead) = t.join(1);
        assert!(lead);
    }

    #[test]
    fn first_reader_leaving_is_visible() {
        let t = CollapseTable::default();
        let (a, _) = t.join(1);
        let (b, _) = t.join(1);
        let f = a.fill.clone();
        assert_eq!(f.live_readers(), 1, "the first counts from its start");
        drop(b);
        assert_eq!(f.live_readers(), 1);
        drop(a);
        assert_eq!(f.live_readers(), 0);
    }

    #[test]
    fn a_demoted_stream_goes_on_for_readers_that_started() {
        // A cacheable stream with three readers, two of them started, then
        // demoted (it outgrew the cache): the started ones read to the end
        // (the first leaving does not stop them), the one that had not
        // started goes alone, and chunks are released behind the slowest.
        let t = CollapseTable::default();
        let (mut a, _) = t.join(1);
        let (mut b, _) = t.join(1);
        let (mut c, _) = t.join(1);
        let f = a.fill.clone();
        f.start(meta(), true);
        f.push(Arc::from(&b"ab"[..]));
        assert!(matches!(a.step(), Next::Chunk(_)));
        assert!(matches!(b.step(), Next::Chunk(_)));
        f.demote();
        assert!(matches!(c.step(), Next::GoAlone));
        f.push(Arc::from(&b"cd"[..]));
        assert_eq!(f.state.borrow().base, 1, "both took the first chunk");
        assert_eq!(drain(&mut a), (b"cd".to_vec(), false));
        drop(a);
        assert_eq!(f.live_readers(), 1);
        f.push(Arc::from(&b"ef"[..]));
        f.finish();
        assert_eq!(drain(&mut b), (b"cdef".to_vec(), true));
    }

    #[test]
    fn a_reader_too_far_behind_an_exclusive_stream_is_cut() {
        let t = CollapseTable::default();
        let (mut a, _) = t.join(1);
        let (mut b, _) = t.join(1);
        let f = a.fill.clone();
        f.start(meta(), true);
        f.push(Arc::from(&b"x"[..]));
        assert!(matches!(b.step(), Next::Chunk(_)));
        f.demote();
        let big: Arc<[u8]> = Arc::from(vec![0u8; (MAX_LAG / 2) as usize]);
        for _ in 0..3 {
            f.push(big.clone());
            drain(&mut a);
        }
        // b took one byte of 12 MiB: cut, and nothing is kept for it (only
        // the newest chunk, which a had not taken at the push).
        assert_eq!(f.live_readers(), 1);
        assert!(matches!(b.step(), Next::Failed(502)));
        assert_eq!(f.state.borrow().chunks.len(), 1);
        assert_eq!(f.backlog(), 0);
    }

    #[test]
    fn hit_for_miss_expires() {
        let t = CollapseTable::default();
        let now = Instant::now();
        t.mark_uncacheable(5, now + std::time::Duration::from_secs(1));
        assert!(t.is_uncacheable(5, now));
        assert!(!t.is_uncacheable(5, now + std::time::Duration::from_secs(2)));
        assert!(!t.is_uncacheable(5, now));
    }

    proptest::proptest! {
        /// Any interleaving of joins, pushes and reads: at most one fetch per
        /// key is in flight, and every reader gets exactly the pushed bytes.
        #[test]
        fn every_reader_gets_every_byte(ops in proptest::collection::vec((0u8..3, 0usize..4), 1..60)) {
            let t = CollapseTable::default();
            let (first, _) = t.join(9);
            let fill = first.fill.clone();
            let mut readers = vec![(first, Vec::new())];
            fill.start(meta(), true);
            let mut pushed = Vec::new();
            let mut n = 0u8;
            for (op, which) in ops {
                match op {
                    0 => {
                        let (r, lead) = t.join(9);
                        proptest::prop_assert!(!lead);
                        readers.push((r, Vec::new()));
                    }
                    1 => {
                        n = n.wrapping_add(1);
                        let chunk = vec![n; (which + 1) * 3];
                        pushed.extend_from_slice(&chunk);
                        fill.push(Arc::from(chunk));
                    }
                    _ => {
                        let i = which % readers.len();
                        let (r, got) = &mut readers[i];
                        got.extend(drain(r).0);
                    }
                }
            }
            fill.finish();
            for (r, got) in &mut readers {
                let (rest, ended) = drain(r);
                got.extend(rest);
                proptest::prop_assert!(ended);
                proptest::prop_assert_eq!(&*got, &pushed);
            }
        }
    }
}
