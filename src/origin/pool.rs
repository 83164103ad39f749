//! One shard's view of an upstream pool: the balancer and a keep-alive cache
//! of idle connections per backend (I/O, shard-local, no locks).

use crate::balance::SmoothRoundRobin;
use crate::config::PoolConfig;
use crate::shard::net::Sock;
use std::cell::RefCell;
use std::time::Instant;

pub struct UpstreamPool {
    pub cfg: PoolConfig,
    /// `host:port` of each backend, for a `Host` field when the client sent none.
    pub backend_names: Vec<String>,
    rr: RefCell<SmoothRoundRobin>,
    /// Idle connections per backend, most recently used last (LIFO reuse
    /// keeps the working set warm and lets the oldest expire).
    idle: Vec<RefCell<Vec<(Sock, Instant)>>>,
}

impl UpstreamPool {
    pub fn new(cfg: PoolConfig) -> UpstreamPool {
        let weights: Vec<u32> = cfg.backends.iter().map(|b| b.weight).collect();
        UpstreamPool {
            backend_names: cfg.backends.iter().map(|b| b.addr.to_string()).collect(),
            idle: cfg
                .backends
                .iter()
                .map(|_| RefCell::new(Vec::new()))
                .collect(),
            rr: RefCell::new(SmoothRoundRobin::new(&weights)),
            cfg,
        }
    }

    /// The backend for the next request.
    pub fn pick(&self) -> usize {
        self.rr.borrow_mut().pick().unwrap_or(0)
    }

    /// An idle connection to backend `b`, if one is kept. Connections that
    /// idled too long are dropped here. With `verify`, a connection the
    /// backend closed (or that has unexpected bytes waiting) is detected and
    /// dropped too, at the cost of a `recv` call; callers whose request can
    /// be retried on a fresh connection skip it.
    pub fn checkout(&self, b: usize, now: Instant, verify: bool) -> Option<Sock> {
        let mut idle = self.idle.get(b)?.borrow_mut();
        while let Some((sock, since)) = idle.pop() {
            if now.duration_since(since) < self.cfg.keepalive_timeout
                && (!verify || sock.idle_is_alive())
            {
                return Some(sock);
            }
        }
        None
    }

    /// Returns a connection whose last exchange completed cleanly.
    pub fn checkin(&self, b: usize, sock: Sock, now: Instant) {
        if let Some(idle) = self.idle.get(b) {
            let mut idle = idle.borrow_mut();
            if idle.len() < self.cfg.keepalive {
                idle.push((sock, now));
            }
        }
    }

    /// Drops idle connections older than the keep-alive timeout.
    pub fn sweep(&self, now: Instant) {
        for idle in &self.idle {
            idle.borrow_mut()
                .retain(|(_, since)| now.duration_since(*since) < self.cfg.keepalive_timeout);
        }
    }

    /// Drops every idle connection (at shutdown).
    pub fn clear(&self) {
        for idle in &self.idle {
            idle.borrow_mut().clear();
        }
    }
}
