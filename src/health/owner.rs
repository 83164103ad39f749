//! The owner of a pool's health (I/O): on one shard per pool, it probes the
//! backends (active checks), reads the failure reports every shard sends
//! (passive checks), runs each backend's [`Health`] state machine, and
//! publishes the result in the pool's shared state, which every shard reads
//! when it picks.

use super::{max_ejected, Change, Health, Params};
use crate::config::ActiveHealth;
use crate::http::response::ResponseHead;
use crate::origin::pool::{Report, OWNER_IDLE_TICK, OWNER_TICK};
use crate::origin::upstream::{read_head, Head, UpstreamFail};
use crate::shard::buf::Buf;
use crate::shard::net::{NetError, Sock};
use crate::shard::Shard;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// After this long without reports or transitions, the owner ticks every
/// [`OWNER_IDLE_TICK`] instead of every [`OWNER_TICK`].
const QUIET: Duration = Duration::from_secs(1);

/// Runs until the shard drains: the health decisions for pool `pool_idx`.
pub async fn run(shard: Rc<Shard>, pool_idx: usize) {
    let pool = &shard.pools[pool_idx];
    let cfg = &pool.cfg;
    let params = Params {
        active: cfg.health.is_some(),
        rise: cfg.health.as_ref().map_or(1, |h| h.rise),
        fall: cfg.health.as_ref().map_or(1, |h| h.fall),
        failures: cfg.eject.failures,
        cooldown: cfg.eject.cooldown,
        max_cooldown: cfg.eject.max_cooldown,
        slow_start: cfg.slow_start,
    };
    let n = cfg.backends.len();
    let mut states: Vec<Health> = (0..n).map(|_| Health::new(params)).collect();
    let mut last_failure: Vec<&'static str> = vec![""; n];
    // Failure reports per backend: the streak marks published to shards.
    let mut failures_seen: Vec<u64> = vec![0; n];
    // Probes run on this shard and hand their results over directly: a
    // queue full of other shards' failure reports cannot lose them.
    let probes: Rc<RefCell<Vec<Report>>> = Rc::default();
    if let Some(h) = &cfg.health {
        for b in 0..n {
            let task = probe_loop(shard.clone(), pool_idx, b, h.clone(), probes.clone());
            match glommio::spawn_local_into(task, shard.queue) {
                Ok(t) => drop(t.detach()),
                Err(e) => eprintln!("corral: cannot start health checks: {e}"),
            }
        }
    }
    let shared = pool.shared.clone();
    let mut tick = OWNER_TICK;
    let mut busy_at = Instant::now();
    while !shard.draining() {
        glommio::timer::sleep(tick).await;
        let now = Instant::now();
        let mut changes: Vec<(usize, Change, String)> = Vec::new();
        let probed: Vec<Report> = std::mem::take(&mut *probes.borrow_mut());
        for r in probed
            .into_iter()
            .chain(std::iter::from_fn(|| shared.inbox.try_recv().ok()))
        {
            busy_at = now;
            match r {
                Report::Failure { backend, kind } if backend < n => {
                    let ejected = states.iter().filter(|s| s.is_ejected()).count();
                    // Never the last usable backend (down ones count too):
                    // an ejection that empties the pool turns a blip into
                    // cool-down-long 503s (nginx never marks its only
                    // server unavailable either).
                    let others_usable = states
                        .iter()
                        .enumerate()
                        .any(|(i, s)| i != backend && s.usable());
                    let may = others_usable && ejected < max_ejected(n, cfg.eject.max_percent);
                    last_failure[backend] = kind.describe();
                    failures_seen[backend] += 1;
                    if let Some(c) = states[backend].passive_failure(now, may) {
                        let why = format!(
                            "{} consecutive failures, last: {}",
                            cfg.eject.failures,
                            kind.describe()
                        );
                        changes.push((backend, c, why));
                    }
                }
                Report::Success { backend } if backend < n => {
                    states[backend].passive_success();
                }
                Report::Probe { backend, ok, why } if backend < n => {
                    if let Some(c) = states[backend].probe(ok, now) {
                        changes.push((backend, c, why));
                    }
                }
                _ => {}
            }
        }
        for (b, s) in states.iter_mut().enumerate() {
            if let Some(c) = s.tick(now) {
                changes.push((b, c, "cool-down over".into()));
            }
        }
        for (b, c, why) in &changes {
            let addr = cfg.backends[*b].describe();
            let name = &cfg.name;
            match c {
                Change::Down => eprintln!("corral: pool {name}: backend {addr} is DOWN ({why})"),
                Change::Up => eprintln!("corral: pool {name}: backend {addr} is UP ({why})"),
                Change::Ejected(d) => {
                    shared.backends[*b]
                        .ejections
                        .fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "corral: pool {name}: backend {addr} ejected for {:?} ({why})",
                        d
                    )
                }
                Change::Returned => {
                    eprintln!("corral: pool {name}: backend {addr} returns after ejection ({why})")
                }
            }
        }
        for (b, s) in states.iter().enumerate() {
            let sb = &shared.backends[b];
            sb.permille.store(s.weight_permille(now), Ordering::Relaxed);
            sb.up.store(s.active_up(), Ordering::Relaxed);
            sb.ejected.store(s.is_ejected(), Ordering::Relaxed);
            let mark = if s.passive_streak() > 0 {
                failures_seen[b]
            } else {
                0
            };
            // Written on change only: every shard reads it per success.
            if sb.streak.load(Ordering::Relaxed) != mark {
                sb.streak.store(mark, Ordering::Relaxed);
            }
        }
        // Quiet for a second (no reports, nothing ejected or ramping up):
        // look less often, so that an idle proxy seldom wakes.
        if !changes.is_empty() || states.iter().any(|s| s.is_ejected() || s.ramping(now)) {
            busy_at = now;
        }
        tick = if now.duration_since(busy_at) >= QUIET {
            OWNER_IDLE_TICK
        } else {
            OWNER_TICK
        };
        let up = states.iter().filter(|s| s.usable()).count();
        if !changes.is_empty() && up == 0 {
            eprintln!(
                "corral: pool {}: no backend is usable; requests get 503",
                cfg.name
            );
        }
    }
}

/// Probes backend `b` every interval, the first one spread over the first
/// interval so that a pool's probes do not all go at once.
async fn probe_loop(
    shard: Rc<Shard>,
    pool_idx: usize,
    b: usize,
    h: ActiveHealth,
    results: Rc<RefCell<Vec<Report>>>,
) {
    let pool = &shard.pools[pool_idx];
    let n = pool.cfg.backends.len() as u32;
    let first = h
        .interval
        .mul_f64(f64::from(b as u32) / f64::from(n.max(1)));
    glommio::timer::sleep(first.max(Duration::from_millis(1))).await;
    let addr = pool.cfg.backends[b].addr;
    // The configured host, else the backend as configured (its name, not
    // the address it resolved to: name-based virtual hosts answer that).
    let host = h.host.as_deref().unwrap_or(&pool.backend_names[b]);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: corral-health-check\r\nConnection: close\r\n\r\n",
        h.path
    );
    let mut ubuf = Buf::new(8 * 1024);
    let mut rhead = ResponseHead::default();
    while !shard.draining() {
        let started = Instant::now();
        let r = probe(addr, &request, &h, &mut ubuf, &mut rhead).await;
        let (ok, why) = match r {
            Ok(code) if code >= h.status.0 && code <= h.status.1 => {
                (true, format!("check: {code}"))
            }
            Ok(code) => (false, format!("check: status {code}")),
            Err(m) => (false, format!("check: {m}")),
        };
        results.borrow_mut().push(Report::Probe {
            backend: b,
            ok,
            why,
        });
        let next = started + h.interval;
        glommio::timer::sleep(next.saturating_duration_since(Instant::now())).await;
    }
}

/// One check: the response status, or why there was none.
async fn probe(
    addr: std::net::SocketAddr,
    request: &str,
    h: &ActiveHealth,
    ubuf: &mut Buf,
    rhead: &mut ResponseHead,
) -> Result<u16, String> {
    let deadline = Instant::now() + h.timeout;
    let mut sock = match Sock::connect(addr, h.timeout).await {
        Ok(s) => s,
        Err(NetError::TimedOut) => return Err("connect timed out".into()),
        Err(NetError::Io(e)) => return Err(format!("connect failed: {e}")),
    };
    if sock.write_all(request.as_bytes(), deadline).await.is_err() {
        return Err("sending the check failed".into());
    }
    ubuf.clear();
    loop {
        match read_head(&mut sock, ubuf, rhead, false, deadline, false).await {
            Ok(Head::Final) => return Ok(rhead.code),
            Ok(Head::Interim) => ubuf.consume(rhead.head_len),
            Err(UpstreamFail::Timeout(_)) => return Err("timed out".into()),
            Err(UpstreamFail::Bad(m)) => return Err(m),
            Err(_) => return Err("no response".into()),
        }
    }
}
