//! Upstream pools. Each shard has its own [`UpstreamPool`] per configured
//! pool: the balancer's state and a keep-alive cache of idle connections per
//! backend (shard-local, no locks). What every shard must agree on lives in
//! one [`PoolShared`] per pool:
//!
//! - health: written only by the pool's owner shard (see [`crate::health`]),
//!   read by all: one atomic word per backend is the broadcast;
//! - requests in flight per backend, process-wide: one cache line per
//!   backend, incremented and decremented by the shard that sends;
//! - failure reports from any shard to the owner, over a channel.

use crate::admin::stats::{BackendFigures, PoolFigures};
use crate::balance::{
    bit, eligible, two_choices, weighted_random, Mask, PeakEwma, RetryBudget, Ring, Rng,
    SmoothRoundRobin,
};
use crate::config::{Balance, PoolConfig};
use crate::http::response::ResponseHead;
use crate::http::BodyKind;
use crate::shard::net::Sock;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a request to a backend failed, as reported to the pool's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    Connect,
    ConnectTimeout,
    /// Reset or closed before a whole response.
    Reset,
    /// No response head within `response_timeout`.
    Timeout,
    /// A 5xx status (counted only with `eject.on_5xx`).
    Status,
}

impl FailKind {
    pub fn describe(self) -> &'static str {
        match self {
            FailKind::Connect => "connect failed",
            FailKind::ConnectTimeout => "connect timed out",
            FailKind::Reset => "connection reset or closed",
            FailKind::Timeout => "response timed out",
            FailKind::Status => "5xx response",
        }
    }
}

/// A message to a pool's owner shard.
#[derive(Debug)]
pub enum Report {
    /// A request failed (passive check).
    Failure { backend: usize, kind: FailKind },
    /// A request succeeded after this shard had reported failures.
    Success { backend: usize },
    /// An active probe's result (from the owner's own probe tasks).
    Probe {
        backend: usize,
        ok: bool,
        why: String,
    },
}

/// One backend's process-wide state, on its own cache line.
#[repr(align(64))]
#[derive(Debug)]
pub struct BackendShared {
    /// Requests in flight to it from every shard.
    pub inflight: AtomicU32,
    /// Its share of its weight in thousandths; 0: do not pick it. Written
    /// by the owner only.
    pub permille: AtomicU32,
    /// Active checks say up (owner-written).
    pub up: AtomicBool,
    /// Passive checks ejected it (owner-written).
    pub ejected: AtomicBool,
    /// The load it last reported in the pool's `load_header`.
    pub reported_load: AtomicU32,
    /// When (ms since the pool's `epoch`): a report older than `ewma_decay`
    /// no longer counts, so a backend that reported a spike and then got no
    /// traffic (it lost every choice) is not shunned on it for good.
    pub reported_at_ms: AtomicU64,
    /// Times it has been ejected.
    pub ejections: AtomicU64,
    /// Owner-written: 0 while its passive failure streak is 0, else a mark
    /// that changes with every failure extending the streak. A shard that
    /// sees a success while the mark is one it has not answered reports
    /// the success, whoever reported the failures: a streak is of failures
    /// with no success in between on any shard.
    pub streak: AtomicU64,
}

impl Default for BackendShared {
    fn default() -> Self {
        BackendShared {
            inflight: AtomicU32::new(0),
            permille: AtomicU32::new(1000),
            up: AtomicBool::new(true),
            ejected: AtomicBool::new(false),
            reported_load: AtomicU32::new(0),
            reported_at_ms: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            streak: AtomicU64::new(0),
        }
    }
}

/// What the shards share about one pool.
#[derive(Debug)]
pub struct PoolShared {
    pub backends: Vec<BackendShared>,
    /// The shard that probes this pool's backends and decides their health.
    pub owner: usize,
    pub reports: crossbeam_channel::Sender<Report>,
    pub inbox: crossbeam_channel::Receiver<Report>,
    /// Sticky cookie values, one per backend: opaque, keyed by a secret.
    pub tokens: Vec<String>,
    /// What the shards time load reports from.
    pub epoch: Instant,
}

/// Reports a shard may queue for the owner before new ones are dropped.
const REPORT_QUEUE: usize = 4096;

impl PoolShared {
    /// `owner`: the shard deciding this pool's health; `secret` keys the
    /// sticky cookie values.
    pub fn new(cfg: &PoolConfig, owner: usize, secret: u64) -> PoolShared {
        let (tx, rx) = crossbeam_channel::bounded(REPORT_QUEUE);
        PoolShared {
            backends: cfg
                .backends
                .iter()
                .map(|_| BackendShared::default())
                .collect(),
            owner,
            reports: tx,
            inbox: rx,
            epoch: Instant::now(),
            tokens: cfg
                .backends
                .iter()
                .map(|b| {
                    let id = crate::cache::key_hash(&[
                        cfg.name.as_bytes(),
                        b.addr.to_string().as_bytes(),
                        &secret.to_le_bytes(),
                    ]);
                    format!("{id:016x}")
                })
                .collect(),
        }
    }
}

/// What the balancer may use about a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hint {
    /// The hash of the pool's `hash_key` for this request, if present.
    pub key: Option<u64>,
    /// The backend the request's sticky cookie names, if valid.
    pub session: Option<usize>,
}

/// The balancer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Backend(usize),
    /// No backend is usable: 503.
    NoneUp,
    /// Every usable backend was tried already.
    Exhausted,
}

/// One request's way through a pool's backends: the first pick, then the
/// retries on other backends that its failures allow.
pub struct Attempts<'a> {
    pool: &'a UpstreamPool,
    hint: Hint,
    tried: Mask,
    retries_left: u32,
}

impl<'a> Attempts<'a> {
    pub fn new(pool: &'a UpstreamPool, hint: Hint) -> Self {
        Attempts {
            pool,
            hint,
            tried: 0,
            retries_left: pool.cfg.retries,
        }
    }

    /// The backend of the first attempt; `None`: no backend is usable.
    pub fn first(&mut self) -> Option<usize> {
        match self.pool.pick(self.hint, 0) {
            Pick::Backend(b) => {
                self.tried |= bit(b);
                self.pool.budget.borrow_mut().deposit();
                Some(b)
            }
            _ => None,
        }
    }

    /// After a failed attempt: the backend to try next, if the failure was
    /// `retryable` and the retries, the other backends and the retry budget
    /// allow one more; else why not.
    pub fn retry(&mut self, retryable: bool) -> Result<usize, &'static str> {
        if !retryable {
            return Err("not safe to retry");
        }
        if self.retries_left == 0 {
            return Err("no retries left");
        }
        let Pick::Backend(b) = self.pool.pick(self.hint, self.tried) else {
            return Err("no other backend");
        };
        let now = self.pool.nanos(Instant::now());
        if !self.pool.budget.borrow_mut().withdraw(now) {
            return Err("retry budget spent");
        }
        self.retries_left -= 1;
        self.tried |= bit(b);
        Ok(b)
    }
}

/// Counts a request in flight to a backend until dropped.
pub struct InFlight<'a> {
    shared: &'a BackendShared,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct UpstreamPool {
    pub cfg: PoolConfig,
    /// Each backend as configured (`host:port`), for a `Host` field when the
    /// client sent none, and for health checks.
    pub backend_names: Vec<String>,
    pub shared: Arc<PoolShared>,
    rr: RefCell<SmoothRoundRobin>,
    rng: RefCell<Rng>,
    ring: Option<Ring>,
    ewma: RefCell<Vec<PeakEwma>>,
    budget: RefCell<RetryBudget>,
    /// This shard reported a failure of the backend and no success since.
    reported: Vec<Cell<bool>>,
    /// The owner's failure-streak mark this shard last answered with a
    /// success report (see [`BackendShared::streak`]).
    answered_streak: Vec<Cell<u64>>,
    /// Scratch: effective weights for one pick.
    weights: RefCell<Vec<u32>>,
    /// This shard saw a connection to the backend fail: it skips the
    /// backend until then, while the owner decides (see [`LOCAL_HOLD`]).
    held_until: Vec<Cell<Option<Instant>>>,
    /// Some backend is held.
    any_held: Cell<bool>,
    /// The backends usable at the last pick (a newly usable one has
    /// returned).
    was_usable: Cell<u64>,
    /// Statistics are recorded.
    metrics: bool,
    /// Requests, failures and time to first byte per backend (this shard's).
    figures: RefCell<PoolFigures>,
    epoch: Instant,
    /// Idle connections per backend, most recently used last (LIFO reuse
    /// keeps the working set warm and lets the oldest expire; a full pool
    /// closes its oldest, as nginx's `keepalive` does).
    idle: Vec<RefCell<VecDeque<(Sock, Instant)>>>,
}

/// How long a shard avoids a backend it could not connect to. The owner
/// shard decides ejection from every shard's reports, but that takes a
/// tick; meanwhile each failed connect would cost a retry, and a dead
/// backend would drain the retry budget (nginx's `fail_timeout` does the
/// same per worker). Never applied to the last usable backend.
pub const LOCAL_HOLD: Duration = Duration::from_millis(250);

/// Retries a quiet pool may make per second whatever its request rate.
const MIN_RETRIES_PER_SEC: f64 = 10.0;

impl UpstreamPool {
    pub fn new(cfg: PoolConfig, shared: Arc<PoolShared>, seed: u64, metrics: bool) -> UpstreamPool {
        let n = cfg.backends.len();
        let weights: Vec<u32> = cfg.backends.iter().map(|b| b.weight).collect();
        let ring = matches!(cfg.balance, Balance::Hash | Balance::Sticky).then(|| {
            let ids: Vec<u64> = cfg
                .backends
                .iter()
                .map(|b| crate::cache::key_hash(&[b.addr.to_string().as_bytes()]))
                .collect();
            Ring::new(&ids, &weights)
        });
        UpstreamPool {
            backend_names: cfg.backends.iter().map(|b| b.name.clone()).collect(),
            idle: (0..n).map(|_| RefCell::new(VecDeque::new())).collect(),
            rr: RefCell::new(SmoothRoundRobin::new(n)),
            rng: RefCell::new(Rng::new(seed)),
            ring,
            ewma: RefCell::new(vec![PeakEwma::new(cfg.ewma_decay.as_nanos() as u64); n]),
            budget: RefCell::new(RetryBudget::new(cfg.retry_budget, MIN_RETRIES_PER_SEC)),
            reported: (0..n).map(|_| Cell::new(false)).collect(),
            answered_streak: (0..n).map(|_| Cell::new(0)).collect(),
            weights: RefCell::new(vec![0; n]),
            held_until: (0..n).map(|_| Cell::new(None)).collect(),
            any_held: Cell::new(false),
            was_usable: Cell::new(!0),
            metrics,
            figures: RefCell::new(PoolFigures {
                backends: (0..n).map(|_| BackendFigures::new()).collect(),
            }),
            epoch: Instant::now(),
            shared,
            cfg,
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// `t` on the clock every shard times load reports by.
    fn report_ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.shared.epoch).as_millis() as u64
    }

    /// Whether backend `b` may take requests now.
    pub fn usable(&self, b: usize) -> bool {
        self.shared
            .backends
            .get(b)
            .is_some_and(|s| s.permille.load(Ordering::Relaxed) > 0)
    }

    /// The backend for the next attempt of a request, never one in `tried`.
    pub fn pick(&self, hint: Hint, tried: Mask) -> Pick {
        let mut w = self.weights.borrow_mut();
        for (i, b) in self.cfg.backends.iter().enumerate() {
            let permille = self.shared.backends[i].permille.load(Ordering::Relaxed);
            w[i] = b.weight * permille;
        }
        let mut usable = eligible(&w, !0);
        let returned = usable & !self.was_usable.replace(usable);
        if returned != 0 && self.cfg.balance == Balance::PeakEwma {
            // Back from down or ejection: its old estimate decayed while it
            // was away, and its last load report is from before; it starts
            // unknown.
            let mut ewma = self.ewma.borrow_mut();
            for (i, e) in ewma.iter_mut().enumerate() {
                if returned & bit(i) != 0 {
                    e.reset();
                    self.shared.backends[i]
                        .reported_load
                        .store(0, Ordering::Relaxed);
                }
            }
        }
        if usable == 0 {
            return Pick::NoneUp;
        }
        if self.any_held.get() {
            let held = self.held(Instant::now());
            if usable & !held & !tried != 0 {
                usable &= !held;
                for (i, wi) in w.iter_mut().enumerate() {
                    if held & bit(i) != 0 {
                        *wi = 0;
                    }
                }
            }
        }
        let allowed = !tried;
        if usable & allowed == 0 {
            return Pick::Exhausted;
        }
        if let Some(b) = hint.session.filter(|&b| usable & allowed & bit(b) != 0) {
            return Pick::Backend(b);
        }
        let inflight =
            |i: usize| u64::from(self.shared.backends[i].inflight.load(Ordering::Relaxed));
        let mut rng = self.rng.borrow_mut();
        let picked = match (self.cfg.balance, hint.key, &self.ring) {
            (Balance::Random, _, _) => weighted_random(&w, allowed, &mut rng),
            (Balance::LeastLoaded, _, _) => {
                two_choices(&w, allowed, &mut rng, |i| inflight(i) as f64 + 1.0)
            }
            (Balance::PeakEwma, _, _) => {
                let instant = Instant::now();
                let now = self.nanos(instant);
                let now_ms = self.report_ms(instant);
                let report_life = self.cfg.ewma_decay.as_millis() as u64;
                let ewma = self.ewma.borrow();
                // What an unknown backend is predicted: the slowest known
                // (worked out only when a candidate is unknown).
                let slowest = std::cell::OnceCell::new();
                let unknown = || {
                    *slowest.get_or_init(|| {
                        ewma.iter()
                            .filter(|e| e.observed())
                            .map(|e| e.estimate(now))
                            .fold(0.0, f64::max)
                    })
                };
                two_choices(&w, allowed, &mut rng, |i| {
                    let b = &self.shared.backends[i];
                    let at = b.reported_at_ms.load(Ordering::Relaxed);
                    let reported = if now_ms.saturating_sub(at) < report_life {
                        u64::from(b.reported_load.load(Ordering::Relaxed))
                    } else {
                        0
                    };
                    let unknown = if ewma[i].observed() { 0.0 } else { unknown() };
                    ewma[i].cost(now, inflight(i), reported, unknown)
                })
            }
            (Balance::Hash | Balance::Sticky, Some(key), Some(ring)) => {
                ring.pick(key, &w, allowed, inflight, self.cfg.hash_balance_factor)
            }
            _ => self.rr.borrow_mut().pick(&w, allowed),
        };
        picked.map_or(Pick::Exhausted, Pick::Backend)
    }

    /// The backends this shard holds back now; forgets expired holds.
    fn held(&self, now: Instant) -> Mask {
        let mut m = 0;
        for (i, h) in self.held_until.iter().enumerate() {
            match h.get() {
                Some(t) if t > now => m |= bit(i),
                Some(_) => h.set(None),
                None => {}
            }
        }
        if m == 0 {
            self.any_held.set(false);
        }
        m
    }

    /// Counts a request to `b` as in flight until the guard drops.
    pub fn begin(&self, b: usize) -> InFlight<'_> {
        let shared = &self.shared.backends[b];
        shared.inflight.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self.figures.borrow_mut().backends.get_mut(b) {
            f.sent += 1;
        }
        InFlight { shared }
    }

    /// Backend `b` answered a response head after `started`: feeds the
    /// latency estimate and the reported load, and the passive checks.
    pub fn answered(&self, b: usize, started: Instant, head: &[u8], rhead: &ResponseHead) {
        let now = Instant::now();
        if self.metrics {
            if let Some(f) = self.figures.borrow_mut().backends.get_mut(b) {
                let us = now.saturating_duration_since(started).as_micros() as u64;
                f.ttfb.saturating_record(us.max(1));
            }
        }
        if self.cfg.balance == Balance::PeakEwma {
            let rtt = now.saturating_duration_since(started).as_nanos() as u64;
            let t = self.nanos(now);
            self.ewma.borrow_mut()[b].observe(rtt, t);
            if let Some(name) = &self.cfg.load_header {
                if let Some(v) = rhead
                    .fields
                    .iter()
                    .find(|f| f.name(head).eq_ignore_ascii_case(name.as_bytes()))
                    .and_then(|f| std::str::from_utf8(f.value(head)).ok())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|v| v.is_finite() && *v >= 0.0)
                {
                    let shared = &self.shared.backends[b];
                    shared
                        .reported_at_ms
                        .store(self.report_ms(now), Ordering::Relaxed);
                    shared
                        .reported_load
                        .store(v.min(1e6) as u32, Ordering::Relaxed);
                }
            }
        }
        if self.fails_at_head(rhead.code) {
            self.failed(b, FailKind::Status);
        } else if rhead.body() == BodyKind::Empty {
            self.succeeded(b);
        }
        // Otherwise the success is the body's: `completed`.
    }

    /// Backend `b`'s response (head `code`) broke off mid-body: a failure,
    /// unless its 5xx head was counted as one already (`on_5xx`).
    pub fn body_failed(&self, b: usize, code: u16) {
        if !self.fails_at_head(code) {
            self.failed(b, FailKind::Reset);
        }
    }

    /// Backend `b`'s response (head `code`) was read to its end: a success
    /// for the passive checks. Not at the head: a backend that sends heads
    /// and then fails every body would have each failure's streak cleared
    /// by the next request's head, and never be ejected.
    pub fn completed(&self, b: usize, code: u16) {
        if !self.fails_at_head(code) {
            self.succeeded(b);
        }
    }

    /// Whether a response with status `code` is a failure from its head on
    /// (a 5xx with `eject.on_5xx`): its body's end or break changes nothing.
    fn fails_at_head(&self, code: u16) -> bool {
        code >= 500 && self.cfg.eject.on_5xx
    }

    /// Tells the owner that a request to `b` failed.
    pub fn failed(&self, b: usize, kind: FailKind) {
        if let Some(r) = self.reported.get(b) {
            r.set(true);
        }
        if let Some(f) = self.figures.borrow_mut().backends.get_mut(b) {
            f.failures += 1;
        }
        if matches!(kind, FailKind::Connect | FailKind::ConnectTimeout) {
            if let Some(h) = self.held_until.get(b) {
                h.set(Some(Instant::now() + LOCAL_HOLD));
                self.any_held.set(true);
            }
        }
        if self.cfg.balance == Balance::PeakEwma {
            // A failure costs like a slow answer: push the estimate up.
            let now = self.nanos(Instant::now());
            let penalty = self.cfg.connect_timeout.as_nanos() as u64;
            self.ewma.borrow_mut()[b].observe(penalty, now);
        }
        let _ = self
            .shared
            .reports
            .try_send(Report::Failure { backend: b, kind });
    }

    /// Tells the owner that `b` works again, if this shard reported it
    /// failing or the owner has a failure streak for it (from any shard)
    /// that this shard has not answered yet.
    fn succeeded(&self, b: usize) {
        let (Some(h), Some(r), Some(answered), Some(sb)) = (
            self.held_until.get(b),
            self.reported.get(b),
            self.answered_streak.get(b),
            self.shared.backends.get(b),
        ) else {
            return;
        };
        h.set(None);
        let mark = sb.streak.load(Ordering::Relaxed);
        if !r.get() && (mark == 0 || answered.get() == mark) {
            return;
        }
        // Forgotten only once the owner has it: a success lost to a full
        // queue would leave the failure streak standing, and the next
        // failure would eject a healthy backend.
        if self
            .shared
            .reports
            .try_send(Report::Success { backend: b })
            .is_ok()
        {
            r.set(false);
            answered.set(mark);
        }
    }

    /// This shard's figures for the pool, as of now.
    pub fn figures(&self) -> PoolFigures {
        self.figures.borrow().clone()
    }

    /// The sticky cookie value naming backend `b`.
    pub fn token(&self, b: usize) -> &str {
        &self.shared.tokens[b]
    }

    /// The backend a sticky cookie value names, if any.
    pub fn session(&self, value: &[u8]) -> Option<usize> {
        self.shared
            .tokens
            .iter()
            .position(|t| t.as_bytes() == value)
    }

    /// An idle connection to backend `b`, if one is kept. Connections that
    /// idled too long are dropped here. With `verify`, a connection the
    /// backend closed (or that has unexpected bytes waiting) is detected and
    /// dropped too, at the cost of a `recv` call; callers whose request can
    /// be retried on a fresh connection skip it, unless the poller saw the
    /// idle socket stir.
    pub fn checkout(&self, b: usize, now: Instant, verify: bool) -> Option<Sock> {
        let mut idle = self.idle.get(b)?.borrow_mut();
        while let Some((sock, since)) = idle.pop_back() {
            // A socket the poller saw an edge on while it sat idle has an
            // EOF or stray bytes (a late 408, say) waiting: it is checked,
            // whatever the caller asked, so those bytes are never read as
            // the next response.
            // Also checked after a second idle: a backend's stray answer
            // at its own idle timeout may have come after the poller's
            // last look this round.
            let idled = now.duration_since(since);
            if idled < self.cfg.keepalive_timeout
                && ((!verify && idled < VERIFY_AFTER && sock.quiet()) || sock.idle_is_alive())
            {
                return Some(sock);
            }
        }
        None
    }

    /// Returns a connection whose last exchange completed cleanly.
    pub fn checkin(&self, b: usize, sock: Sock, now: Instant) {
        if let Some(idle) = self.idle.get(b) {
            if self.cfg.keepalive == 0 {
                return;
            }
            let mut idle = idle.borrow_mut();
            // The oldest has idled longest: the likeliest to meet the
            // backend's own idle timeout first.
            while idle.len() >= self.cfg.keepalive {
                idle.pop_front();
            }
            idle.push_back((sock, now));
        }
    }

    /// Drops idle connections older than the keep-alive timeout, every idle
    /// connection to a backend that is not usable, and those the poller saw
    /// stir that the backend closed (or sent stray bytes on): they held a
    /// descriptor in CLOSE_WAIT until the keep-alive timeout.
    pub fn sweep(&self, now: Instant) {
        for (b, idle) in self.idle.iter().enumerate() {
            let usable = self.usable(b);
            idle.borrow_mut().retain(|(sock, since)| {
                usable
                    && now.duration_since(*since) < self.cfg.keepalive_timeout
                    && (sock.quiet() || sock.idle_is_alive())
            });
        }
    }

    /// Drops every idle connection (at shutdown).
    pub fn clear(&self) {
        for idle in &self.idle {
            idle.borrow_mut().clear();
        }
    }
}

/// An idle pooled connection older than this is checked (one `recv` with
/// `MSG_PEEK`) before reuse even for a request that could be retried.
const VERIFY_AFTER: Duration = Duration::from_secs(1);

/// How long a failure report may wait in the owner's inbox, at most, while
/// reports come in.
pub const OWNER_TICK: Duration = Duration::from_millis(20);
/// The same after a quiet second: the first report after a lull may wait
/// this long (the shard-local hold covers a dead backend meanwhile).
pub const OWNER_IDLE_TICK: Duration = Duration::from_millis(250);
