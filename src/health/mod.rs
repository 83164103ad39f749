//! Backend health: the state machine (pure, time as an argument) and the
//! owner task that probes backends and publishes their state ([`owner`], I/O).
//!
//! A backend is *usable* when its active checks say it is up and passive
//! ejection has not taken it out. Each pool's health is decided by one shard
//! (its owner), so decisions that look at the whole pool, like the cap on
//! ejected backends, see every backend at once.

pub mod owner;

use std::time::{Duration, Instant};

/// What a pool's health settings say, for the state machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Active checks run (else `rise`/`fall` are unused).
    pub active: bool,
    /// Consecutive good probes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failed probes that take an up backend down.
    pub fall: u32,
    /// Consecutive passive failures that eject a backend; 0: never.
    pub failures: u32,
    /// The first ejection's length; each further one doubles it.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    /// How long a returning backend takes to reach its full weight.
    pub slow_start: Duration,
}

/// A change worth logging and publishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Active checks took it down.
    Down,
    /// Active checks brought it back up.
    Up,
    /// Passive failures ejected it for this long.
    Ejected(Duration),
    /// An ejection ended.
    Returned,
}

/// One backend's health.
#[derive(Debug, Clone)]
pub struct Health {
    params: Params,
    active_up: bool,
    ok_streak: u32,
    fail_streak: u32,
    passive_streak: u32,
    /// Ejected until then (and, with active checks, until a good probe).
    ejected_until: Option<Instant>,
    /// Ejections since the backend last proved healthy for a full cool-down:
    /// the exponent of the next cool-down.
    ejections: u32,
    /// When it last came back (for slow start and for forgiving ejections).
    back_since: Option<Instant>,
}

impl Health {
    /// A backend at start-up: up, at full weight.
    pub fn new(params: Params) -> Health {
        Health {
            params,
            active_up: true,
            ok_streak: 0,
            fail_streak: 0,
            passive_streak: 0,
            ejected_until: None,
            ejections: 0,
            back_since: None,
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Whether active checks say it is up.
    pub fn active_up(&self) -> bool {
        self.active_up
    }

    /// Whether requests may go to it.
    pub fn usable(&self) -> bool {
        self.active_up && self.ejected_until.is_none()
    }

    /// Its share of its configured weight now, in thousandths: 0 when not
    /// usable, ramping from 1/20 to all of it over `slow_start` after a return.
    pub fn weight_permille(&self, now: Instant) -> u32 {
        if !self.usable() {
            return 0;
        }
        match self.back_since {
            Some(t) if !self.params.slow_start.is_zero() => {
                let f = now.saturating_duration_since(t).as_secs_f64()
                    / self.params.slow_start.as_secs_f64();
                (f.clamp(0.05, 1.0) * 1000.0) as u32
            }
            _ => 1000,
        }
    }

    /// Still ramping up (the owner republishes its weight while so).
    pub fn ramping(&self, now: Instant) -> bool {
        self.usable() && self.weight_permille(now) < 1000
    }

    /// An active probe's result.
    pub fn probe(&mut self, ok: bool, now: Instant) -> Option<Change> {
        if ok {
            self.ok_streak = self.ok_streak.saturating_add(1);
            self.fail_streak = 0;
            if !self.active_up && self.ok_streak >= self.params.rise {
                self.active_up = true;
                self.passive_streak = 0;
                self.back_since = Some(now);
                // Checks that pass again end an ejection (as Envoy's
                // default does: a restarted backend is back at once), but
                // its back-off record stays, so a crash-looping backend's
                // ejections keep growing longer (forgiven, as any, after
                // four good cool-downs).
                self.ejected_until = None;
                return Some(Change::Up);
            }
            if self.ejected_until.is_some_and(|t| now >= t) && self.active_up {
                self.ejected_until = None;
                self.passive_streak = 0;
                self.back_since = Some(now);
                return Some(Change::Returned);
            }
            None
        } else {
            self.fail_streak = self.fail_streak.saturating_add(1);
            self.ok_streak = 0;
            if self.active_up && self.fail_streak >= self.params.fall {
                self.active_up = false;
                return Some(Change::Down);
            }
            None
        }
    }

    /// A request to it failed (connect error, reset, timeout, or a 5xx
    /// where configured). `may_eject`: the pool's cap on ejected backends
    /// leaves room for one more.
    pub fn passive_failure(&mut self, now: Instant, may_eject: bool) -> Option<Change> {
        if !self.usable() || self.params.failures == 0 {
            return None;
        }
        self.passive_streak = self.passive_streak.saturating_add(1);
        if self.passive_streak < self.params.failures || !may_eject {
            return None;
        }
        // A backend that stayed good for four base cool-downs since it came
        // back is forgiven its earlier ejections.
        if self
            .back_since
            .is_some_and(|t| now.saturating_duration_since(t) >= 4 * self.params.cooldown)
        {
            self.ejections = 0;
        }
        let shift = self.ejections.min(20);
        let cd = self
            .params
            .cooldown
            .saturating_mul(1u32 << shift)
            .min(self.params.max_cooldown.max(self.params.cooldown));
        self.ejections += 1;
        self.passive_streak = 0;
        self.ejected_until = Some(now + cd);
        Some(Change::Ejected(cd))
    }

    /// A request to it succeeded after failures were reported.
    pub fn passive_success(&mut self) {
        self.passive_streak = 0;
    }

    /// Consecutive failures reported since the last success or ejection.
    pub fn passive_streak(&self) -> u32 {
        self.passive_streak
    }

    /// Time passing: without active checks an ejection ends with its
    /// cool-down (the backend returns on probation: its next ejection is
    /// longer). With active checks it ends at the first good probe after.
    pub fn tick(&mut self, now: Instant) -> Option<Change> {
        if self.params.active {
            return None;
        }
        if self.ejected_until.is_some_and(|t| now >= t) {
            self.ejected_until = None;
            self.passive_streak = 0;
            self.back_since = Some(now);
            return Some(Change::Returned);
        }
        None
    }
}

/// How many backends of `n` may be ejected at once, for a cap in percent:
/// at least one, so a single bad node is always taken out.
pub fn max_ejected(n: usize, percent: u32) -> usize {
    (n * percent as usize / 100).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(active: bool) -> Params {
        Params {
            active,
            rise: 2,
            fall: 3,
            failures: 2,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(5),
            slow_start: Duration::from_secs(10),
        }
    }

    #[test]
    fn fall_and_rise_counts() {
        let t = Instant::now();
        let mut h = Health::new(params(true));
        assert_eq!(h.probe(false, t), None);
        assert_eq!(h.probe(false, t), None);
        assert!(h.usable());
        assert_eq!(h.probe(false, t), Some(Change::Down));
        assert!(!h.usable());
        assert_eq!(h.weight_permille(t), 0);
        assert_eq!(h.probe(true, t), None);
        assert_eq!(h.probe(false, t), None, "a failure resets the rise count");
        assert_eq!(h.probe(true, t), None);
        assert_eq!(h.probe(true, t), Some(Change::Up));
        assert!(h.usable());
    }

    #[test]
    fn slow_start_ramps_weight() {
        let t = Instant::now();
        let mut h = Health::new(params(true));
        assert_eq!(h.weight_permille(t), 1000, "full weight at start-up");
        for _ in 0..3 {
            h.probe(false, t);
        }
        h.probe(true, t);
        h.probe(true, t);
        assert_eq!(h.weight_permille(t), 50);
        assert_eq!(h.weight_permille(t + Duration::from_secs(5)), 500);
        assert_eq!(h.weight_permille(t + Duration::from_secs(11)), 1000);
        assert!(h.ramping(t + Duration::from_secs(1)));
    }

    #[test]
    fn ejection_backs_off_and_returns() {
        let t = Instant::now();
        let mut h = Health::new(params(false));
        assert_eq!(h.passive_failure(t, true), None);
        h.passive_success();
        assert_eq!(
            h.passive_failure(t, true),
            None,
            "success resets the streak"
        );
        assert_eq!(
            h.passive_failure(t, true),
            Some(Change::Ejected(Duration::from_secs(1)))
        );
        assert!(!h.usable());
        assert_eq!(h.tick(t + Duration::from_millis(999)), None);
        let t1 = t + Duration::from_secs(1);
        assert_eq!(h.tick(t1), Some(Change::Returned));
        h.passive_failure(t1, true);
        assert_eq!(
            h.passive_failure(t1, true),
            Some(Change::Ejected(Duration::from_secs(2))),
            "the second ejection is twice as long"
        );
        let t2 = t1 + Duration::from_secs(2);
        h.tick(t2);
        for _ in 0..6 {
            h.passive_failure(t2, true);
            h.passive_failure(t2, true);
            h.tick(t2 + Duration::from_secs(60));
        }
        h.passive_failure(t2, true);
        assert_eq!(
            h.passive_failure(t2, true),
            Some(Change::Ejected(Duration::from_secs(5))),
            "capped at max_cooldown"
        );
    }

    #[test]
    fn coming_up_from_down_ends_an_ejection_but_keeps_its_back_off() {
        let t = Instant::now();
        let mut h = Health::new(params(true));
        h.passive_failure(t, true);
        assert_eq!(
            h.passive_failure(t, true),
            Some(Change::Ejected(Duration::from_secs(1)))
        );
        for _ in 0..3 {
            h.probe(false, t);
        }
        h.probe(true, t);
        assert_eq!(h.probe(true, t), Some(Change::Up));
        assert!(h.usable(), "checks that pass again end the ejection");
        let t1 = t + Duration::from_secs(1);
        h.passive_failure(t1, true);
        assert_eq!(
            h.passive_failure(t1, true),
            Some(Change::Ejected(Duration::from_secs(2))),
            "the back-off went on growing"
        );
    }

    #[test]
    fn cap_on_ejections_is_respected() {
        let t = Instant::now();
        let mut h = Health::new(params(false));
        h.passive_failure(t, false);
        assert_eq!(h.passive_failure(t, false), None);
        assert!(h.usable());
        assert_eq!(max_ejected(3, 50), 1);
        assert_eq!(max_ejected(10, 50), 5);
        assert_eq!(max_ejected(2, 10), 1);
    }

    #[test]
    fn with_active_checks_an_ejection_ends_on_a_good_probe() {
        let t = Instant::now();
        let mut h = Health::new(params(true));
        h.passive_failure(t, true);
        assert!(matches!(
            h.passive_failure(t, true),
            Some(Change::Ejected(_))
        ));
        assert_eq!(h.tick(t + Duration::from_secs(9)), None);
        assert_eq!(
            h.probe(true, t + Duration::from_millis(500)),
            None,
            "cool-down first"
        );
        assert_eq!(
            h.probe(true, t + Duration::from_secs(1)),
            Some(Change::Returned)
        );
        assert!(h.usable());
    }
}
