//! Observability: per-shard statistics ([`stats`], pure), their rendering
//! ([`render`], pure), the access log ([`log`]), and the admin listener
//! (I/O) with `/metrics`, `/status`, `/`, `/histogram` and `POST /purge`.
//!
//! Each shard counts on its own; nothing is shared on the request path. When
//! the admin listener (on shard 0) or the periodic summary wants figures, it
//! asks every other shard through its [`Mailbox`] and merges the snapshots.

pub mod log;
pub mod render;
pub mod stats;

use crate::http::request::{parse_request, Method, RequestHead};
use crate::origin::pool::PoolShared;
use crate::shard::buf::Buf;
use crate::shard::mailbox::Mailbox;
use crate::shard::net::{until, NetError, Sock};
use crate::shard::Shard;
use render::{BackendView, PoolView, View};
use stats::{Merged, Snapshot};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request for a shard's snapshot; the answer goes to `reply`.
pub struct StatsRequest {
    pub reply: Arc<Mailbox<Snapshot>>,
}

/// What the admin side needs besides the shard it runs on.
#[derive(Clone)]
pub struct Hub {
    /// One mailbox per shard, by shard id.
    pub mailboxes: Arc<Vec<Arc<Mailbox<StatsRequest>>>>,
    pub pools: Arc<Vec<Arc<PoolShared>>>,
    pub parts: Option<Arc<crate::cache::Partitions>>,
    pub started: Instant,
    /// Each shard's last snapshot, standing in for a shard that does not
    /// answer in time (counters never go backwards).
    pub last: std::rc::Rc<std::cell::RefCell<Vec<Option<Snapshot>>>>,
}

/// How long the admin side waits for the other shards' snapshots.
const GATHER_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers snapshot requests for this shard until the process ends.
pub async fn answer_stats(shard: Rc<Shard>, mailbox: Arc<Mailbox<StatsRequest>>) {
    loop {
        let req = mailbox.recv().await;
        req.reply.send(shard.snapshot());
    }
}

impl Hub {
    /// Every shard's snapshot, merged. A shard that does not answer within
    /// [`GATHER_TIMEOUT`] counts with the last snapshot it gave (its
    /// figures are late, and counters in `/metrics` never go backwards).
    pub async fn gather(&self, shard: &Shard) -> Merged {
        let n = self.mailboxes.len();
        let reply = Arc::new(Mailbox::new(n.max(1)));
        let mut snaps = vec![shard.snapshot()];
        let mut asked = 0;
        for (i, m) in self.mailboxes.iter().enumerate() {
            if i != shard.id
                && m.send(StatsRequest {
                    reply: reply.clone(),
                })
            {
                asked += 1;
            }
        }
        let deadline = Instant::now() + GATHER_TIMEOUT;
        for _ in 0..asked {
            match until(deadline, reply.recv()).await {
                Some(s) => snaps.push(s),
                None => break,
            }
        }
        let mut last = self.last.borrow_mut();
        last.resize(n.max(1), None);
        for s in &snaps {
            if let Some(slot) = last.get_mut(s.shard) {
                *slot = Some(s.clone());
            }
        }
        let answered: Vec<usize> = snaps.iter().map(|s| s.shard).collect();
        for (i, l) in last.iter().enumerate() {
            if let Some(l) = l.as_ref().filter(|_| !answered.contains(&i)) {
                snaps.push(l.clone());
            }
        }
        stats::merge(snaps)
    }

    /// The process-wide state beside the counters.
    pub fn view(&self, shard: &Shard) -> View {
        let cfg = &shard.cfg;
        let (entries, bytes) = self.parts.as_ref().map_or((0, 0), |p| p.usage());
        View {
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs_f64(),
            metrics: cfg.metrics,
            cache_enabled: self.parts.is_some(),
            cache_entries: entries as u64,
            cache_bytes: bytes,
            cache_budget: cfg.cache.size_bytes,
            stores: cfg.stores.iter().map(|s| s.name.clone()).collect(),
            pools: cfg
                .pools
                .iter()
                .zip(self.pools.iter())
                .map(|(p, s)| PoolView {
                    name: p.name.clone(),
                    balance: p.balance.name().to_string(),
                    health_checks: p.health.is_some(),
                    backends: p
                        .backends
                        .iter()
                        .zip(&s.backends)
                        .map(|(b, sb)| BackendView {
                            addr: b.name.clone(),
                            weight: b.weight,
                            up: sb.up.load(Ordering::Relaxed),
                            ejected: sb.ejected.load(Ordering::Relaxed),
                            permille: sb.permille.load(Ordering::Relaxed),
                            inflight: sb.inflight.load(Ordering::Relaxed),
                            ejections: sb.ejections.load(Ordering::Relaxed),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// The admin listener's accept loop (on shard 0).
pub async fn serve(
    shard: Rc<Shard>,
    hub: Hub,
    listener: glommio::net::TcpListener,
    fd: std::os::fd::RawFd,
) {
    while let Some(stream) = crate::shard::accept(&shard, &listener).await {
        let (shard, hub) = (shard.clone(), hub.clone());
        let task = glommio::spawn_local_into(
            async move {
                let conn = AdminConn {
                    sock: Sock::new(stream),
                    shard,
                    hub,
                    head_request: false,
                };
                // A panic must not take shard 0 (and its traffic) down.
                use futures_lite::FutureExt;
                if std::panic::AssertUnwindSafe(conn.run())
                    .catch_unwind()
                    .await
                    .is_err()
                {
                    eprintln!("corral: an admin connection task panicked; the shard goes on");
                }
            },
            glommio::executor().current_task_queue(),
        );
        if let Ok(t) = task {
            t.detach();
        }
    }
    crate::shard::stop_listening(fd);
}

struct AdminConn {
    sock: Sock,
    shard: Rc<Shard>,
    hub: Hub,
    /// The request being answered is a HEAD: no body goes out.
    head_request: bool,
}

/// An admin request that is not answered within this is dropped.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

impl AdminConn {
    async fn run(mut self) {
        let mut buf = Buf::new(8 * 1024);
        let mut head = RequestHead::default();
        let limits = self.shard.head_limits;
        loop {
            let deadline = Instant::now() + ADMIN_TIMEOUT;
            let parsed = loop {
                match parse_request(buf.filled(), &limits, &mut head) {
                    Ok(true) => break true,
                    Ok(false) => {}
                    Err(e) => {
                        // No request parsed: the answer has its body even
                        // after a HEAD on this connection.
                        self.head_request = false;
                        let _ = self
                            .respond(e.status(), "text/plain", e.reason().as_bytes(), true)
                            .await;
                        // Lingering, as the client listener does: closing
                        // with the rest of the request unread would reset
                        // the connection under the answer.
                        crate::shard::conn::linger_close(&mut self.sock).await;
                        return;
                    }
                }
                // Room past the head limit, so that an oversized head is a
                // 431 rather than a full buffer read as end of stream.
                let space = buf.space(4096, (limits.max_header_bytes + 4096).max(64 * 1024));
                match self.sock.read(space, deadline).await {
                    Ok(0) | Err(_) => break false,
                    Ok(n) => buf.advance(n),
                }
            };
            if !parsed {
                return;
            }
            let bytes = buf.filled();
            // In origin form: `GET http://admin:9090/metrics` is /metrics
            // (RFC 9112 §3.2.2).
            let target = String::from_utf8_lossy(head.origin_target(bytes)).into_owned();
            let method = head.method();
            let has_body = head.body() != crate::http::BodyKind::Empty;
            let close = head.close || has_body;
            buf.consume(head.head_len);
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            self.head_request = method == Method::Head;
            let r = match (method, path) {
                (Method::Get | Method::Head, "/metrics") => {
                    let m = self.hub.gather(&self.shard).await;
                    let body = render::prometheus(&m, &self.hub.view(&self.shard));
                    self.respond(200, "text/plain; version=0.0.4", body.as_bytes(), close)
                        .await
                }
                (Method::Get | Method::Head, "/status") => {
                    let m = self.hub.gather(&self.shard).await;
                    let body = render::status_json(&m, &self.hub.view(&self.shard));
                    self.respond(200, "application/json", body.as_bytes(), close)
                        .await
                }
                (Method::Get | Method::Head, "/") => {
                    let m = self.hub.gather(&self.shard).await;
                    let body = render::status_html(&m, &self.hub.view(&self.shard));
                    self.respond(200, "text/html; charset=utf-8", body.as_bytes(), close)
                        .await
                }
                (Method::Get | Method::Head, "/histogram") => {
                    let m = self.hub.gather(&self.shard).await;
                    let body = render::hgrm(&m);
                    self.respond(200, "text/plain", body.as_bytes(), close)
                        .await
                }
                (Method::Post, "/purge") => {
                    let (code, body) = self.purge(query);
                    self.respond(code, "application/json", body.as_bytes(), close)
                        .await
                }
                (_, "/metrics" | "/status" | "/" | "/histogram" | "/purge") => {
                    let allow = if path == "/purge" {
                        "Allow: POST\r\n"
                    } else {
                        "Allow: GET, HEAD\r\n"
                    };
                    self.respond_with(405, "text/plain", b"method not allowed\n", close, allow)
                        .await
                }
                _ => self.respond(404, "text/plain", b"not found\n", close).await,
            };
            if r.is_err() || close {
                if has_body && r.is_ok() {
                    // Its body was not read (no endpoint takes one).
                    crate::shard::conn::linger_close(&mut self.sock).await;
                } else {
                    self.sock.shutdown_write();
                }
                return;
            }
        }
    }

    /// `POST /purge?path=P`: drops every stored response whose path is P
    /// (every host, query and variant).
    fn purge(&self, query: &str) -> (u16, String) {
        let Some(path) = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("path="))
            .map(|v| crate::http::percent_decode(v.as_bytes()).0)
        else {
            return (400, "{\"error\":\"give ?path=/some/path\"}\n".into());
        };
        if !path.starts_with(b"/") {
            return (400, "{\"error\":\"the path must start with /\"}\n".into());
        }
        let Some(parts) = &self.hub.parts else {
            return (404, "{\"error\":\"caching is off\"}\n".into());
        };
        let n = parts.purge_path(&path);
        let path = String::from_utf8_lossy(&path);
        eprintln!("corral: purged {n} stored response(s) for {path}");
        (
            200,
            format!(
                "{{\"purged\":{n},\"path\":{}}}\n",
                serde_json::Value::from(path.as_ref())
            ),
        )
    }

    async fn respond(
        &mut self,
        code: u16,
        content_type: &str,
        body: &[u8],
        close: bool,
    ) -> Result<(), NetError> {
        self.respond_with(code, content_type, body, close, "").await
    }

    /// [`Self::respond`] with `extra` header lines.
    async fn respond_with(
        &mut self,
        code: u16,
        content_type: &str,
        body: &[u8],
        close: bool,
        extra: &str,
    ) -> Result<(), NetError> {
        let mut out = format!(
            "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nVia: 1.1 corral\r\n{extra}{}",
            crate::http::reason_phrase(code),
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        crate::http::push_date_now(&mut out);
        out.extend_from_slice(b"\r\n");
        // HEAD gets the head only (its Content-Length says what GET sends).
        if !self.head_request {
            out.extend_from_slice(body);
        }
        self.sock
            .write_all(&out, Instant::now() + ADMIN_TIMEOUT)
            .await
    }
}

/// The periodic one-line summary (`--stats-interval`), on shard 0.
pub async fn summaries(shard: Rc<Shard>, hub: Hub, every: Duration) {
    let mut last = hub.gather(&shard).await;
    let mut at = Instant::now();
    while !shard.draining() {
        glommio::timer::sleep(every).await;
        let now = hub.gather(&shard).await;
        let secs = at.elapsed().as_secs_f64().max(1e-3);
        at = Instant::now();
        eprintln!("{}", summary_line(&last, &now, secs, &hub.view(&shard)));
        last = now;
    }
}

/// One interval's summary: request rate, status classes, cache hit ratio,
/// latency percentiles of the interval, connections and usable backends.
pub fn summary_line(before: &Merged, now: &Merged, secs: f64, v: &View) -> String {
    let (a, b) = (&before.total, &now.total);
    let reqs = b.stats.requests().saturating_sub(a.stats.requests());
    let class = |lo: usize, hi: usize| -> u64 {
        (lo..hi)
            .map(|c| b.stats.codes[c].saturating_sub(a.stats.codes[c]))
            .sum()
    };
    let pct = |n: u64| {
        if reqs == 0 {
            0.0
        } else {
            100.0 * n as f64 / reqs as f64
        }
    };
    let hits = b.cache.hits.saturating_sub(a.cache.hits);
    let lookups = hits + b.cache.misses.saturating_sub(a.cache.misses);
    let mut h = b.stats.latency();
    let _ = h.subtract(a.stats.latency());
    let q = |p: f64| {
        if h.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}ms", h.value_at_percentile(p) as f64 / 1000.0)
        }
    };
    let (up, total) = v
        .pools
        .iter()
        .flat_map(|p| &p.backends)
        .fold((0, 0), |(u, t), b| {
            (u + usize::from(b.up && !b.ejected), t + 1)
        });
    format!(
        "corral: {:.0} req/s ({reqs} in {secs:.1}s) 2xx {:.1}% 3xx {:.1}% 4xx {:.1}% 5xx {:.1}% | cache hit {:.1}% | p50 {} p99 {} max {} | {} conns | backends {up}/{total} up",
        reqs as f64 / secs,
        pct(class(200, 300)),
        pct(class(300, 400)),
        pct(class(400, 500)),
        pct(class(500, 600)),
        if lookups == 0 { 0.0 } else { 100.0 * hits as f64 / lookups as f64 },
        q(50.0),
        q(99.0),
        if h.is_empty() { "-".to_string() } else { format!("{:.2}ms", h.max() as f64 / 1000.0) },
        b.connections,
    )
}
