//! Backend selection. Pure: every function sees weights, a set of eligible
//! backends, loads and randomness as arguments and returns an index.
//!
//! Weights here are *effective* weights: the configured weight times the
//! backend's slow-start factor (in thousandths), 0 for a backend that must
//! not be picked. A pool has at most [`MAX_BACKENDS`] backends, so a set of
//! backends is one `u64` ([`Mask`]).
//!
//! - [`SmoothRoundRobin`]: nginx's smooth weighted round robin.
//! - [`weighted_random`]: a draw proportional to weight.
//! - [`two_choices`]: the better of two random backends by a cost; the
//!   least-loaded and peak-EWMA balancers are this with different costs.
//! - [`Ring`]: consistent hashing with bounded loads.
//! - [`PeakEwma`]: Finagle's peak-sensitive latency estimate.
//! - [`RetryBudget`]: how many retries a stream of requests may add.

/// The most backends one pool may have.
pub const MAX_BACKENDS: usize = 64;

/// A set of backends by index.
pub type Mask = u64;

/// The set holding only backend `i`.
pub fn bit(i: usize) -> Mask {
    1u64 << i
}

/// The set of the first `n` backends.
pub fn all(n: usize) -> Mask {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// The seeded xorshift64* generator loadgen uses too; one per shard.
pub use loadgen::keys::Rng;

/// splitmix64's finalizer: spreads any 64-bit value over all bits.
pub fn mix(mut h: u64) -> u64 {
    h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The backends with a positive weight that are in `allowed`.
pub fn eligible(weights: &[u32], allowed: Mask) -> Mask {
    let mut m = 0;
    for (i, &w) in weights.iter().enumerate().take(MAX_BACKENDS) {
        if w > 0 && allowed & bit(i) != 0 {
            m |= bit(i);
        }
    }
    m
}

/// Smooth weighted round robin (nginx's `ngx_http_upstream_round_robin.c`):
/// each pick adds every eligible backend's weight to its current value,
/// takes the largest, and subtracts the eligible total from it, so weights
/// 5:1:1 give `a a b a c a a` rather than five `a`s in a row. A backend that
/// is not eligible keeps its current value until it is again.
#[derive(Debug, Clone)]
pub struct SmoothRoundRobin {
    current: Vec<i64>,
}

impl SmoothRoundRobin {
    pub fn new(n: usize) -> Self {
        SmoothRoundRobin {
            current: vec![0; n],
        }
    }

    /// The next backend among `allowed` with a positive weight.
    pub fn pick(&mut self, weights: &[u32], allowed: Mask) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut total = 0i64;
        for (i, &w) in weights.iter().enumerate().take(self.current.len()) {
            if w == 0 || allowed & bit(i) == 0 {
                continue;
            }
            self.current[i] += i64::from(w);
            total += i64::from(w);
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(b)
    }
}

/// A backend among `allowed` drawn with probability proportional to weight.
pub fn weighted_random(weights: &[u32], allowed: Mask, rng: &mut Rng) -> Option<usize> {
    let set = eligible(weights, allowed);
    if set == 0 {
        return None;
    }
    let total: u64 = (0..weights.len())
        .filter(|&i| set & bit(i) != 0)
        .map(|i| u64::from(weights[i]))
        .sum();
    let mut r = rng.below(total);
    for (i, &w) in weights.iter().enumerate() {
        if set & bit(i) == 0 {
            continue;
        }
        if r < u64::from(w) {
            return Some(i);
        }
        r -= u64::from(w);
    }
    None
}

/// The power of two choices: two distinct eligible backends drawn at
/// random in proportion to their weights, and the one with the lower
/// `cost / weight` wins (the first on a tie). With one eligible backend,
/// that one. Drawn uniformly, a backend could win only the draws it is in:
/// at most 2/n of the requests whatever its weight (weights 10:1:1 got
/// 67%, not 83%), and a backend in slow start would still be a candidate
/// at the full rate.
pub fn two_choices(
    weights: &[u32],
    allowed: Mask,
    rng: &mut Rng,
    cost: impl Fn(usize) -> f64,
) -> Option<usize> {
    let set = eligible(weights, allowed);
    let a = weighted_random(weights, set, rng)?;
    let Some(b) = weighted_random(weights, set & !bit(a), rng) else {
        return Some(a);
    };
    let ca = cost(a) / f64::from(weights[a]);
    let cb = cost(b) / f64::from(weights[b]);
    Some(if cb < ca { b } else { a })
}

/// Points on the ring per backend of average weight.
const POINTS_PER_BACKEND: u64 = 160;

/// Consistent hashing on a ring of virtual points (Karger et al.), with
/// bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): a key goes to the
/// first backend clockwise from its hash whose load is under
/// `factor × (total load + 1) × its weight share`, so a hot key spills to
/// the next node instead of melting one. The ring depends only on the
/// backends' identities and weights, so every shard maps a key alike.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, u8)>,
}

impl Ring {
    /// `ids`: a stable identity per backend (a hash of its address).
    pub fn new(ids: &[u64], weights: &[u32]) -> Ring {
        let n = ids.len().min(MAX_BACKENDS);
        let mean = (weights
            .iter()
            .take(n)
            .map(|&w| u64::from(w.max(1)))
            .sum::<u64>()
            / n.max(1) as u64)
            .max(1);
        let mut points = Vec::new();
        for (i, &id) in ids.iter().enumerate().take(n) {
            let w = u64::from(weights.get(i).copied().unwrap_or(1).max(1));
            let count = (POINTS_PER_BACKEND * w / mean).clamp(1, 4 * 1024);
            for j in 0..count {
                points.push((mix(id ^ mix(j)), i as u8));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The backend for `key` among `allowed` with a positive weight; `loads`
    /// gives each backend's requests in flight, `factor` is `1 + ε` (0 turns
    /// the bound off).
    pub fn pick(
        &self,
        key: u64,
        weights: &[u32],
        allowed: Mask,
        loads: impl Fn(usize) -> u64,
        factor: f64,
    ) -> Option<usize> {
        let set = eligible(weights, allowed);
        if set == 0 || self.points.is_empty() {
            return None;
        }
        let (mut total_load, mut total_weight) = (1u64, 0u64);
        for (i, &w) in weights.iter().enumerate().take(MAX_BACKENDS) {
            if set & bit(i) != 0 {
                total_load += loads(i);
                total_weight += u64::from(w);
            }
        }
        let key = mix(key);
        let start = self.points.partition_point(|&(h, _)| h < key);
        let mut first = None;
        // Backends found at their cap: skipped without another look.
        let mut full: Mask = 0;
        for k in 0..self.points.len() {
            let b = self.points[(start + k) % self.points.len()].1 as usize;
            if (set & !full) & bit(b) == 0 {
                continue;
            }
            if factor <= 0.0 {
                return Some(b);
            }
            first.get_or_insert(b);
            let share = weights[b] as f64 / total_weight as f64;
            let cap = (factor * total_load as f64 * share).ceil();
            if (loads(b) as f64) < cap {
                return Some(b);
            }
            full |= bit(b);
            if full == set {
                break;
            }
        }
        first
    }
}

/// Finagle's peak-EWMA latency estimate: a new sample above the estimate
/// replaces it at once (peak-sensitive), one below is averaged in with a
/// weight that decays with the time since the last sample, and the estimate
/// itself decays towards 0 while a backend gets no traffic, so a backend
/// once slow is tried again eventually. Times in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    value: f64,
    stamp: u64,
    decay: f64,
    /// Whether any answer came yet (an estimate decayed to nothing after
    /// a quiet spell is not "unknown").
    observed: bool,
}

impl PeakEwma {
    pub fn new(decay_ns: u64) -> PeakEwma {
        PeakEwma {
            value: 0.0,
            stamp: 0,
            decay: decay_ns.max(1) as f64,
            observed: false,
        }
    }

    fn decayed(&self, now: u64) -> f64 {
        let dt = now.saturating_sub(self.stamp) as f64;
        self.value * (-dt / self.decay).exp()
    }

    pub fn observe(&mut self, rtt_ns: u64, now: u64) {
        let rtt = rtt_ns as f64;
        let w = (-(now.saturating_sub(self.stamp) as f64) / self.decay).exp();
        self.value = if rtt > self.value {
            rtt
        } else {
            self.value * w + rtt * (1.0 - w)
        };
        self.stamp = now;
        self.observed = true;
    }

    /// The estimate now.
    pub fn estimate(&self, now: u64) -> f64 {
        self.decayed(now)
    }

    /// Whether an answer was observed since it was made or reset.
    pub fn observed(&self) -> bool {
        self.observed
    }

    /// Forgets what was observed: for a backend back from down or
    /// ejection, whose estimate decayed toward zero while it was away (it
    /// would otherwise win every choice until its first answer, and
    /// swamp its slow start).
    pub fn reset(&mut self) {
        self.value = 0.0;
        self.stamp = 0;
        self.observed = false;
    }

    /// The balancing cost with `inflight` requests outstanding from this
    /// process and a load of `reported` by the backend itself: predicted
    /// latency × (load + 1). A backend not heard from yet is predicted
    /// `unknown`, the pessimistic estimate (the slowest one known to the
    /// caller; at least 1, so that unknown backends among themselves go by
    /// load): it is not flooded before its first answer, and not shunned
    /// either because other shards keep it busy.
    pub fn cost(&self, now: u64, inflight: u64, reported: u64, unknown: f64) -> f64 {
        let predicted = if self.observed {
            self.decayed(now)
        } else {
            unknown.max(1.0)
        };
        predicted * (inflight.max(reported) + 1) as f64
    }
}

/// A retry budget (Finagle's, Envoy's): every request deposits `ratio` of a
/// token, every retry withdraws one; besides, `min_per_sec` tokens accrue
/// per second so that a quiet pool can still retry. Tokens are capped, so a
/// long healthy spell cannot bank an unbounded burst of retries.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    cap: f64,
    tokens: f64,
    last: u64,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: f64) -> RetryBudget {
        let cap = (min_per_sec + 100.0 * ratio).max(1.0);
        RetryBudget {
            ratio,
            min_per_sec,
            cap,
            tokens: cap,
            last: 0,
        }
    }

    /// A request was sent (first attempt).
    pub fn deposit(&mut self) {
        self.tokens = (self.tokens + self.ratio).min(self.cap);
    }

    /// Whether a retry may go now (`now` in nanoseconds); takes a token if so.
    pub fn withdraw(&mut self, now: u64) -> bool {
        let dt = now.saturating_sub(self.last) as f64 / 1e9;
        self.last = now;
        self.tokens = (self.tokens + dt * self.min_per_sec).min(self.cap);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The most tokens it can hold (the largest burst of retries).
    pub fn cap(&self) -> f64 {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert, prop_assert_eq, proptest};

    #[test]
    fn interleaves_weights() {
        let mut rr = SmoothRoundRobin::new(3);
        let seq: Vec<usize> = (0..7).map(|_| rr.pick(&[5, 1, 1], !0).unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_rotate() {
        let mut rr = SmoothRoundRobin::new(3);
        let seq: Vec<usize> = (0..6).map(|_| rr.pick(&[1, 1, 1], !0).unwrap()).collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_skips_the_excluded() {
        let mut rr = SmoothRoundRobin::new(3);
        let seq: Vec<usize> = (0..4).map(|_| rr.pick(&[1, 0, 1], !0).unwrap()).collect();
        assert_eq!(seq, vec![0, 2, 0, 2]);
        assert_eq!(rr.pick(&[1, 1, 1], bit(1)), Some(1));
        assert_eq!(rr.pick(&[1, 1, 1], 0), None);
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays() {
        let mut e = PeakEwma::new(1_000_000_000);
        e.observe(1_000_000, 1);
        assert_eq!(e.estimate(1), 1_000_000.0);
        e.observe(10_000_000, 2);
        assert_eq!(e.estimate(2), 10_000_000.0, "a peak replaces the estimate");
        e.observe(1_000_000, 500_000_002);
        let v = e.estimate(500_000_002);
        assert!(v < 10_000_000.0 && v > 1_000_000.0);
        assert!(e.estimate(10_000_000_000) < 1000.0, "idle estimates decay");
        // An unknown backend is predicted the pessimistic estimate it is
        // given, times its load: busier is dearer.
        assert_eq!(PeakEwma::new(1).cost(0, 1, 0, 5e6), 1e7);
        assert!(PeakEwma::new(1).cost(0, 2, 0, 5e6) > PeakEwma::new(1).cost(0, 1, 0, 5e6));
        assert_eq!(
            PeakEwma::new(1).cost(0, 3, 0, 0.0),
            4.0,
            "nothing known: by load"
        );
        // A backend heard from long ago, reporting a load of its own, is not
        // mistaken for an unknown one: its estimate has decayed to nothing
        // and so has its cost.
        let mut quiet = PeakEwma::new(10_000_000_000);
        quiet.observe(1_000_000, 1);
        assert!(quiet.cost(1_000_000_000_000, 0, 1, 5e6) < 1.0);
        assert!(quiet.cost(1_000_000_000_000, 1, 1, 5e6) < 1.0);
        // Reset (back from down): unknown again, not the decayed nothing.
        quiet.reset();
        assert!(!quiet.observed());
        assert_eq!(quiet.cost(1_000_000_000_000, 0, 0, 5e6), 5e6);
    }

    #[test]
    fn budget_caps_retries_to_the_ratio() {
        let mut b = RetryBudget::new(0.2, 0.0);
        let cap = b.cap();
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw(0) {
                retries += 1;
            }
        }
        assert!(f64::from(retries) <= 200.0 + cap, "{retries}");
        assert!(retries >= 190, "{retries}");
    }

    #[test]
    fn bounded_load_spills_a_hot_key() {
        let ring = Ring::new(&[1, 2, 3, 4], &[1, 1, 1, 1]);
        let w = [1, 1, 1, 1];
        let mut loads = [0u64; 4];
        // One hot key, never completing: it may not pile up on one node.
        for _ in 0..100 {
            let b = ring.pick(42, &w, !0, |i| loads[i], 1.25).unwrap();
            loads[b] += 1;
        }
        let max = *loads.iter().max().unwrap();
        assert!(max <= 32, "{loads:?}");
        // Without the bound, every request goes to the same node.
        let b0 = ring.pick(42, &w, !0, |i| loads[i], 0.0).unwrap();
        assert!((0..10).all(|_| ring.pick(42, &w, !0, |i| loads[i], 0.0) == Some(b0)));
    }

    proptest! {
        /// Over one full cycle every backend is picked exactly its weight.
        #[test]
        fn round_robin_exact_over_a_cycle(weights in proptest::collection::vec(1u32..20, 1..8)) {
            let mut rr = SmoothRoundRobin::new(weights.len());
            let total: u32 = weights.iter().sum();
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..total {
                counts[rr.pick(&weights, !0).unwrap()] += 1;
            }
            prop_assert_eq!(counts, weights);
        }

        /// Weighted random draws land within 1.5 points of each weight share.
        #[test]
        fn random_is_weighted(weights in proptest::collection::vec(1u32..10, 1..6), seed: u64) {
            let mut rng = Rng::new(seed);
            let n = 40_000;
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..n {
                counts[weighted_random(&weights, !0, &mut rng).unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (c, w) in counts.iter().zip(&weights) {
                let got = f64::from(*c) / f64::from(n);
                let want = f64::from(*w) / f64::from(total);
                prop_assert!((got - want).abs() < 0.015, "{} vs {}", got, want);
            }
        }

        /// No algorithm returns an ineligible backend while an eligible one exists.
        #[test]
        fn never_picks_a_down_backend(
            weights in proptest::collection::vec(0u32..5, 1..10),
            allowed: u64,
            seed: u64,
            key: u64,
        ) {
            let set = eligible(&weights, allowed);
            let mut rng = Rng::new(seed);
            let mut rr = SmoothRoundRobin::new(weights.len());
            let ring = Ring::new(&(0..weights.len() as u64).collect::<Vec<_>>(), &weights);
            for _ in 0..20 {
                let picks = [
                    rr.pick(&weights, allowed),
                    weighted_random(&weights, allowed, &mut rng),
                    two_choices(&weights, allowed, &mut rng, |i| i as f64),
                    ring.pick(key, &weights, allowed, |i| i as u64, 1.25),
                ];
                for p in picks {
                    match p {
                        Some(b) => prop_assert!(set & bit(b) != 0),
                        None => prop_assert_eq!(set, 0),
                    }
                }
            }
        }

        /// Two choices follow weights: with arrivals that never complete,
        /// loads end proportional to weights (10:1:1 gives the heavy one
        /// 10/12; drawn uniformly it could not pass 2/3).
        #[test]
        fn two_choices_follow_weights(seed: u64) {
            let w = [10u32, 1, 1];
            let mut rng = Rng::new(seed);
            let mut loads = [0u64; 3];
            for _ in 0..12_000 {
                let b = two_choices(&w, !0, &mut rng, |i| loads[i] as f64 + 1.0).unwrap();
                loads[b] += 1;
            }
            let heavy = loads[0] as f64 / 12_000.0;
            prop_assert!((0.80..0.87).contains(&heavy), "{:?}", loads);
        }

        /// Two choices by load keep loads close: with arrivals that never
        /// complete, no backend ends more than 10% above the average.
        #[test]
        fn two_choices_balance_load(n in 2usize..8, seed: u64) {
            let w = vec![1u32; n];
            let mut rng = Rng::new(seed);
            let mut loads = vec![0u64; n];
            for _ in 0..(n * 100) {
                let b = two_choices(&w, !0, &mut rng, |i| loads[i] as f64).unwrap();
                loads[b] += 1;
            }
            let max = *loads.iter().max().unwrap();
            prop_assert!(max <= 100 + 10, "{:?}", loads);
        }

        /// When one of N backends leaves, only its keys move: about 1/N of
        /// all keys, always under 2/N; the same whether it is marked down
        /// or removed from the ring.
        #[test]
        fn hashing_moves_about_one_nth(n in 3usize..12, gone in 0usize..12, seed: u64) {
            let gone = gone % n;
            let ids: Vec<u64> = (0..n as u64).map(|i| mix(seed ^ i)).collect();
            let w = vec![1u32; n];
            let ring = Ring::new(&ids, &w);
            let mut w_down = w.clone();
            w_down[gone] = 0;
            let mut ids_less = ids.clone();
            ids_less.remove(gone);
            let ring_less = Ring::new(&ids_less, &vec![1u32; n - 1]);
            let keys = 20_000u64;
            let (mut moved, mut moved_rebuilt) = (0, 0);
            for k in 0..keys {
                let key = mix(k ^ seed.rotate_left(7));
                let before = ring.pick(key, &w, !0, |_| 0, 0.0).unwrap();
                let after = ring.pick(key, &w_down, !0, |_| 0, 0.0).unwrap();
                if before != after {
                    prop_assert_eq!(before, gone, "a key moved off a backend that stayed");
                    moved += 1;
                }
                let rebuilt = ring_less.pick(key, &w[..n - 1], !0, |_| 0, 0.0).unwrap();
                let rebuilt = if rebuilt >= gone { rebuilt + 1 } else { rebuilt };
                if rebuilt != before {
                    moved_rebuilt += 1;
                }
            }
            let frac = moved as f64 / keys as f64;
            let frac2 = moved_rebuilt as f64 / keys as f64;
            prop_assert!(frac < 2.0 / n as f64, "moved {} of keys, N = {}", frac, n);
            prop_assert!(frac > 0.3 / n as f64, "moved {} of keys, N = {}", frac, n);
            prop_assert!((frac - frac2).abs() < 1e-9, "{} vs {}", frac, frac2);
        }

        /// Bounded load: with keys arriving (and never completing), no
        /// backend's load exceeds ceil(factor × (total + 1) / N).
        #[test]
        fn bounded_load_holds(n in 2usize..10, seed: u64, hot in 1u64..5) {
            let ids: Vec<u64> = (0..n as u64).map(|i| mix(seed ^ i)).collect();
            let w = vec![1u32; n];
            let ring = Ring::new(&ids, &w);
            let mut loads = vec![0u64; n];
            let mut rng = Rng::new(seed);
            for t in 0..(n as u64 * 50) {
                // A skewed key stream: a few hot keys most of the time.
                let key = if rng.below(4) > 0 { rng.below(hot) } else { rng.next_u64() };
                let b = ring.pick(key, &w, !0, |i| loads[i], 1.25).unwrap();
                let cap = (1.25 * (t + 1) as f64 / n as f64).ceil() as u64;
                prop_assert!(loads[b] < cap, "backend {} at {} of cap {}", b, loads[b], cap);
                loads[b] += 1;
            }
        }
    }
}
