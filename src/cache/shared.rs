//! Process-wide arbitration of cache misses: key → the one origin fetch in
//! flight anywhere in the process. The shard whose fill task claims a key
//! fetches it and publishes the response here as it arrives; a fill task on
//! any other shard subscribes and relays it into its own shard's fill, so a
//! herd spread over every shard costs one origin fetch.
//!
//! Thread-safe by necessity (every shard reaches it), but off the hit path:
//! only a shard's *first* miss for a key touches the lock, once. Readers are
//! woken across threads through their wakers (glommio accepts foreign
//! wakes). The design document asks for this to go through the key's owner
//! shard by message; a short critical section on misses only costs less
//! than a message round trip and keeps the same guarantee.

use super::collapse::{release_before, Source, MAX_LAG};
use super::object::Meta;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// What a fill task is to do for a key.
pub enum Claim {
    /// Fetch from the origin and publish into this fill.
    Fetch(Arc<SharedFill>),
    /// Another shard is fetching: relay from this fill.
    Follow(Arc<SharedFill>),
}

#[derive(Default)]
pub struct SharedFills {
    map: Mutex<HashMap<u64, Arc<SharedFill>>>,
}

impl SharedFills {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<SharedFill>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub fn claim(&self, key: u64) -> Claim {
        self.claim_since(key, 0, |_| false)
    }

    /// Claims the fetch of `key` at purge count `generation`, or follows
    /// the one in flight, unless `purged` (given its count) says a purge
    /// since it began was meant for it: then this fetch replaces it.
    pub fn claim_since(&self, key: u64, generation: u64, purged: impl Fn(u64) -> bool) -> Claim {
        let mut map = self.lock();
        if let Some(f) = map.get(&key) {
            if f.generation == generation || !purged(f.generation) {
                return Claim::Follow(f.clone());
            }
        }
        let f = Arc::new(SharedFill {
            state: Mutex::default(),
            generation,
        });
        map.insert(key, f.clone());
        Claim::Fetch(f)
    }

    /// Ends the fetch of `key` (only if `fill` is still the current one).
    pub fn release(&self, key: u64, fill: &Arc<SharedFill>) {
        let mut map = self.lock();
        if map.get(&key).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            map.remove(&key);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }
}

/// How a published fetch ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Open,
    Done,
    /// The origin failed with this status.
    Failed(u16),
}

/// What a subscriber copies out.
pub struct Update {
    /// The head, whether every reader may read it, and where the response
    /// came from, once known.
    pub head: Option<(Arc<Meta>, bool, Source)>,
    /// Chunks from the subscriber's position on.
    pub chunks: Vec<Arc<[u8]>>,
    pub end: End,
    pub version: u64,
    /// It outgrew the object size limit: no longer shared with readers
    /// that have not started.
    pub demoted: bool,
    /// This subscriber fell [`MAX_LAG`] behind a demoted fetch, and what it
    /// needed was released.
    pub cut: bool,
}

#[derive(Default)]
pub struct SharedFill {
    state: Mutex<State>,
    /// The purge count when the fetch was claimed.
    generation: u64,
}

#[derive(Default)]
struct State {
    /// Meta, shared with every reader, source.
    head: Option<(Arc<Meta>, bool, Source)>,
    /// Chunks from index `base` on (earlier ones were released).
    chunks: Vec<Arc<[u8]>>,
    base: usize,
    bytes: u64,
    end: Option<End>,
    version: u64,
    wakers: Vec<Waker>,
    demoted: bool,
    /// Each subscribed relay's next chunk, the bytes it has copied and its
    /// id (slab keys are reused once removed).
    relays: slab::Slab<(usize, u64, u64)>,
    next_relay: u64,
    /// Bytes copied by the fastest relay.
    max_copied: u64,
    /// The fetching task waiting for the relays of a demoted fetch.
    pacer: Option<Waker>,
}

impl State {
    fn fastest(&mut self) {
        self.max_copied = self.relays.iter().map(|(_, r)| r.1).max().unwrap_or(0);
    }
}

/// A relay's subscription to a [`SharedFill`].
#[derive(Debug, Clone, Copy)]
pub struct Relay {
    key: usize,
    id: u64,
}

impl SharedFill {
    fn update(&self, f: impl FnOnce(&mut State)) {
        let wakers = {
            let mut st = self.lock();
            f(&mut st);
            st.version += 1;
            std::mem::take(&mut st.wakers)
        };
        // Woken outside the lock.
        for w in wakers {
            w.wake();
        }
    }

    /// The head is known: `shared`, every reader may read the response;
    /// `source`, where it came from (an origin error is shared with the
    /// requests waiting but not stored).
    pub fn start(&self, meta: Arc<Meta>, shared: bool, source: Source) {
        self.update(|st| st.head = Some((meta, shared, source)));
    }

    /// Appends body bytes. Once demoted, relays more than [`MAX_LAG`]
    /// behind are cut and what every remaining relay copied is released.
    pub fn push(&self, chunk: Arc<[u8]>) {
        self.update(|st| {
            st.bytes += chunk.len() as u64;
            st.chunks.push(chunk);
            if st.demoted {
                let bytes = st.bytes;
                st.relays.retain(|_, r| bytes - r.1 <= MAX_LAG);
                st.fastest();
                let low = st.relays.iter().map(|(_, r)| r.0).min();
                release_before(&mut st.chunks, &mut st.base, low);
            }
        });
    }

    pub fn finish(&self) {
        self.update(|st| {
            st.end.get_or_insert(End::Done);
        });
    }

    pub fn fail(&self, status: u16) {
        self.update(|st| {
            st.end.get_or_insert(End::Failed(status));
        });
    }

    /// The fetch is alive without news for the relays (a new attempt, an
    /// interim response): their wait for the fetching shard starts again,
    /// so a slow but live fetch is not taken for a dead one.
    pub fn progress(&self) {
        self.update(|_| {});
    }

    /// It outgrew the object size limit: relays whose readers have started
    /// go on (each cut [`MAX_LAG`] behind), the others are told to go to
    /// the origin on their own, and chunks are released behind the
    /// slowest relay.
    pub fn demote(&self) {
        self.update(|st| st.demoted = true);
    }

    /// Registers a relay (reading from chunk 0): a demoted fetch keeps
    /// what it has not copied. [`Self::unsubscribe`] when it stops.
    pub fn subscribe(&self) -> Relay {
        let mut st = self.lock();
        let id = st.next_relay;
        st.next_relay += 1;
        Relay {
            key: st.relays.insert((0, 0, id)),
            id,
        }
    }

    pub fn unsubscribe(&self, relay: Relay) {
        let pacer = {
            let mut st = self.lock();
            if st.relays.get(relay.key).is_some_and(|r| r.2 == relay.id) {
                st.relays.remove(relay.key);
                st.fastest();
            }
            st.pacer.take()
        };
        if let Some(w) = pacer {
            w.wake();
        }
    }

    /// Bytes pushed but not yet copied by the fastest relay.
    pub fn relay_backlog(&self) -> u64 {
        let st = self.lock();
        st.bytes.saturating_sub(st.max_copied)
    }

    /// Completes when no relay is left or the fastest is at most `ahead`
    /// bytes behind (the pace of a demoted fetch that relays still read).
    pub fn relays_within(self: &Arc<Self>, ahead: u64) -> RelaysWithin {
        RelaysWithin {
            fill: self.clone(),
            ahead,
        }
    }

    /// Relays still subscribed.
    pub fn relays(&self) -> usize {
        self.lock().relays.len()
    }

    pub fn demoted(&self) -> bool {
        self.lock().demoted
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything after chunk `from`, and the state, for `relay`, which
    /// copies all of it.
    pub fn read(&self, relay: Relay, from: usize) -> Update {
        let mut pacer = None;
        let mut st = self.lock();
        let cut = from < st.base || st.relays.get(relay.key).is_none_or(|r| r.2 != relay.id);
        let chunks = match cut {
            true => Vec::new(),
            false => st
                .chunks
                .get(from - st.base..)
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
        };
        if !cut {
            let copied: u64 = chunks.iter().map(|c| c.len() as u64).sum();
            let r = &mut st.relays[relay.key];
            r.0 = from + chunks.len();
            r.1 += copied;
            let copied = r.1;
            if copied > st.max_copied {
                st.max_copied = copied;
                pacer = st.pacer.take();
            }
        }
        let update = Update {
            head: st.head.clone(),
            chunks,
            end: st.end.unwrap_or(End::Open),
            version: st.version,
            demoted: st.demoted,
            cut,
        };
        drop(st);
        if let Some(w) = pacer {
            w.wake();
        }
        update
    }

    /// Completes when the fill changed after `seen`.
    pub fn changed(self: &Arc<Self>, seen: u64) -> SharedChanged {
        SharedChanged {
            fill: self.clone(),
            seen,
        }
    }
}

pub struct RelaysWithin {
    fill: Arc<SharedFill>,
    ahead: u64,
}

impl Future for RelaysWithin {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.fill.lock();
        if st.relays.is_empty() || st.bytes.saturating_sub(st.max_copied) <= self.ahead {
            return Poll::Ready(());
        }
        st.pacer = Some(cx.waker().clone());
        Poll::Pending
    }
}

pub struct SharedChanged {
    fill: Arc<SharedFill>,
    seen: u64,
}

impl Future for SharedChanged {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.fill.lock();
        if st.version != self.seen {
            return Poll::Ready(());
        }
        if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            st.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cache::object::test_meta as meta;

    #[test]
    fn one_fetcher_per_key() {
        let t = SharedFills::default();
        let Claim::Fetch(f) = t.claim(1) else {
            panic!("first claim must fetch")
        };
        assert!(matches!(t.claim(1), Claim::Follow(_)));
        assert!(matches!(t.claim(2), Claim::Fetch(_)));
        // A fetch claimed before a purge meant for it is not followed.
        assert!(matches!(t.claim_since(2, 3, |_| false), Claim::Follow(_)));
        let Claim::Fetch(newer) = t.claim_since(2, 3, |g| g == 0) else {
            panic!("a purged fetch was followed");
        };
        assert!(
            matches!(t.claim_since(2, 3, |_| true), Claim::Follow(f) if Arc::ptr_eq(&f, &newer))
        );
        t.release(1, &f);
        assert!(matches!(t.claim(1), Claim::Fetch(_)));
    }

    #[test]
    fn a_demoted_fetch_keeps_only_what_its_relays_have_not_copied() {
        let t = SharedFills::default();
        let Claim::Fetch(f) = t.claim(3) else {
            panic!()
        };
        let (fast, slow) = (f.subscribe(), f.subscribe());
        f.start(meta(), true, Source::Origin);
        f.push(Arc::from(vec![1u8; 10]));
        assert_eq!(f.read(fast, 0).chunks.len(), 1);
        assert_eq!(f.read(slow, 0).chunks.len(), 1);
        f.demote();
        f.push(Arc::from(vec![2u8; 10]));
        // Both copied chunk 0: released; chunk 1 kept for both.
        assert_eq!(f.lock().base, 1);
        let u = f.read(fast, 1);
        assert!(u.demoted && !u.cut && u.chunks.len() == 1);
        // The slow relay falls MAX_LAG behind (the fast one not quite):
        // cut, and nothing is kept for it.
        f.push(Arc::from(vec![3u8; MAX_LAG as usize - 5]));
        assert!(f.read(slow, 1).cut);
        assert_eq!(f.relays(), 1);
        // A relay subscribing now takes the cut one's slab key: the cut
        // one stays cut and cannot move the new one's position.
        let late = f.subscribe();
        assert!(f.read(slow, 2).cut);
        assert!(
            f.read(late, 0).cut,
            "its chunks were released before it came"
        );
        f.unsubscribe(slow);
        assert_eq!(f.relays(), 2, "unsubscribing a cut relay removes nothing");
        f.unsubscribe(late);
        let u = f.read(fast, 2);
        assert_eq!(u.chunks.len(), 1);
        f.unsubscribe(fast);
        f.push(Arc::from(vec![4u8; 10]));
        assert_eq!(f.lock().chunks.len(), 0, "no relay left: nothing kept");
    }

    #[test]
    fn subscribers_see_everything_across_threads() {
        let t = Arc::new(SharedFills::default());
        let Claim::Fetch(f) = t.claim(7) else {
            panic!()
        };
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    let Claim::Follow(f) = t.claim(7) else {
                        panic!()
                    };
                    let me = f.subscribe();
                    let mut got = Vec::new();
                    loop {
                        let u = f.read(me, got.len());
                        got.extend(u.chunks);
                        if u.end != End::Open {
                            return (got.concat(), u.end);
                        }
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        f.start(meta(), true, Source::Origin);
        for i in 0..100u8 {
            f.push(Arc::from(vec![i; 10]));
        }
        f.finish();
        let want: Vec<u8> = (0..100u8).flat_map(|i| vec![i; 10]).collect();
        for r in readers {
            let (got, end) = r.join().unwrap();
            assert_eq!(end, End::Done);
            assert_eq!(got, want);
        }
    }
}
