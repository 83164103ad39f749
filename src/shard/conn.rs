//! The client connection driver (I/O): reads request heads, applies limits
//! and timeouts, forwards each request to its upstream pool and streams the
//! response back, in order, until the connection ends.
//!
//! Bodies stream in both directions through fixed-size buffers: memory per
//! connection is bounded by `max_header_bytes` plus [`UPSTREAM_BUF`], whatever
//! the body sizes.

mod cached;
mod store;

use super::buf::{ensure_out, release_out, Buf};
use super::net::{round_now, NetError, Sock};
use super::Shard;
use crate::admin::log::Entry;
use crate::admin::stats::Class;
use crate::cache::key_hash;
use crate::config::{HashKey, Target};
use crate::http::chunked::{self, ChunkedDecoder, Decoded};
use crate::http::request::{parse_request, Method, RequestHead};
use crate::http::response::ResponseHead;
use crate::http::rewrite::{
    retarget_host, write_client_response, write_interim, write_upstream_request, ClientFraming,
    Forwarded,
};
use crate::http::{write_simple_response, BodyKind, ClientError};
use crate::origin::body::{BodyReader, Step, UPSTREAM_BUF};
use crate::origin::pool::{Attempts, FailKind, Hint, Pick, UpstreamPool};
use crate::origin::upstream::{connection, read_head, Head, UpstreamFail};
use std::rc::Rc;
use std::time::Instant;

/// Initial client buffer; grows to `max_header_bytes` only for large heads.
const CLIENT_BUF: usize = 16 * 1024;
/// Request body bytes coalesced with the head into one upstream write.
const COALESCE_BODY: usize = 16 * 1024;

/// How one request ended, for the connection loop.
enum Outcome {
    /// Response complete; the connection may serve another request.
    KeepAlive,
    /// Close the connection (cleanly, after what was written).
    Close,
}

/// A chunked request body is re-encoded and sent to the backend in writes
/// of about this much (or less, when the client has sent nothing more).
const BODY_BATCH: usize = 16 * 1024;

/// How long a closing connection reads and drops what its client still
/// sends ([`ClientConn::linger_close`]), and how much at most.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// How long a backend that failed to take a request body may take to show
/// the answer it sent early.
const EARLY_ANSWER_GRACE: std::time::Duration = std::time::Duration::from_millis(100);
/// Interim (1xx) responses accepted before the final one: each restarts the
/// response-head timeout, so without a cap a backend repeating them would
/// hold the request forever. Past the cap the answer is a 502.
pub(crate) const MAX_INTERIM: u32 = 128;

/// What an upstream attempt sends, the same bytes on a retry.
struct UpRequest<'a> {
    head: &'a [u8],
    body: BodyKind,
    expect_continue: bool,
    method: Method,
    response_timeout: std::time::Duration,
}

pub struct ClientConn {
    shard: Rc<Shard>,
    sock: Sock,
    peer_ip: String,
    inbuf: Buf,
    ubuf: Buf,
    out: Vec<u8>,
    head: RequestHead,
    rhead: ResponseHead,
    /// A `Cache-Status` field line for the response being forwarded, when
    /// the cache looked at the request; empty otherwise.
    cache_status: String,
    /// A `Set-Cookie` field line pinning a sticky session, or empty.
    set_cookie: String,
    /// What the balancer may use about the current request.
    hint: Hint,
    /// The connection ends while the client may still be sending (an
    /// error answered before its request was read whole): close lingering.
    linger: bool,
    /// No request has begun on this connection yet: its first byte is
    /// awaited for `header_timeout`, not `idle_timeout` (nginx's
    /// `client_header_timeout`, HAProxy's `timeout http-request`), so that
    /// connections that send nothing do not hold places for long.
    fresh: bool,
    /// The current exchange got an interim (1xx) answer back: response
    /// bytes came, so its failure is not retried elsewhere.
    interim_back: bool,
    /// The status of the response to the current request (0: none yet).
    status: u16,
    /// How the cache took part in the current request.
    class: Class,
    /// The current request's method and target, for the access log.
    req_line: Vec<u8>,
    req_method_len: usize,
}

/// The value of cookie `name` in the request's `Cookie` fields.
fn cookie<'a>(buf: &'a [u8], head: &RequestHead, name: &[u8]) -> Option<&'a [u8]> {
    head.fields
        .iter()
        .filter(|f| f.name(buf).eq_ignore_ascii_case(b"cookie"))
        .flat_map(|f| f.value(buf).split(|&c| c == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&c| c == b'=')?;
            (&pair[..eq] == name).then(|| pair[eq + 1..].trim_ascii())
        })
}

/// The lingering close of any client socket (see
/// [`ClientConn::linger_close`]; also a connection refused at the cap): FIN
/// after what was written, then what the client still sends is read and
/// dropped, up to 1 MiB for up to 2 s.
pub async fn linger_close(sock: &mut Sock) {
    sock.shutdown_write();
    let until = Instant::now() + LINGER_TIME;
    let mut left = LINGER_BYTES;
    let mut scratch = vec![0u8; 16 * 1024];
    while left > 0 {
        match sock.read(&mut scratch, until).await {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// A request body write to the backend that failed: a backend that stops
/// reading for `body_timeout` is a timeout (504), like a stalled head
/// write; a reset or broken pipe is a 502.
fn body_send_failed(e: NetError) -> UpstreamFail {
    match e {
        NetError::TimedOut => UpstreamFail::Timeout("sending the request body timed out".into()),
        NetError::Io(e) => UpstreamFail::Bad(format!("sending the request body failed: {e}")),
    }
}

/// Drops empty lines (CR, LF) at the start of `buf`, where a request line
/// is expected.
fn skip_blank_lines(buf: &mut Buf) {
    let n = buf
        .filled()
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if n > 0 {
        buf.consume(n);
    }
}

/// Ends with `TimedOut` when the shard begins to drain: raced against a
/// wait between requests, so that idle connections close on shutdown.
async fn drained<T>(shard: Rc<Shard>) -> Result<T, NetError> {
    shard.drain_signal().await;
    Err(NetError::TimedOut)
}

impl ClientConn {
    pub fn new(shard: Rc<Shard>, sock: Sock) -> ClientConn {
        let peer_ip = sock
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "unknown".into());
        ClientConn {
            shard,
            sock,
            peer_ip,
            // Given memory when a request comes, taken back while the
            // connection waits for the next one (see read_head).
            inbuf: Buf::empty(),
            ubuf: Buf::empty(),
            out: Vec::new(),
            head: RequestHead::default(),
            rhead: ResponseHead::default(),
            cache_status: String::new(),
            set_cookie: String::new(),
            hint: Hint::default(),
            linger: false,
            fresh: true,
            interim_back: false,
            status: 0,
            class: Class::Pass,
            req_line: Vec::new(),
            req_method_len: 0,
        }
    }

    /// Serves requests until the client leaves, an error closes the
    /// connection, or the shard drains; `guard` is dropped at the end. A
    /// panic ends this connection only.
    ///
    /// Not an `async fn`: one would hold the connection twice (the moved
    /// argument and its binding, rust-lang/rust#62958), and this future is
    /// what every idle connection costs; the block borrows its capture.
    #[allow(clippy::manual_async_fn)] // see above: async fn doubles the size
    pub fn run<G>(mut self, guard: G) -> impl std::future::Future<Output = ()> {
        async move {
            let _guard = guard;
            let served =
                futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(self.serve()))
                    .await;
            if served.is_err() {
                eprintln!("corral: a connection task panicked; the shard goes on");
                return;
            }
            // Also when the client may have sent more than was answered
            // (pipelined requests unread at a close, or at shutdown): a
            // close with unread bytes is a reset, which can destroy the
            // last response on its way.
            let unread = !self.inbuf.is_empty() || !self.sock.quiet();
            if (self.linger || unread) && !self.sock.resets() {
                Box::pin(self.linger_close()).await;
            }
            release_out(&mut self.out);
        }
    }

    /// Before closing a connection whose client may still be sending (an
    /// error answered before its request or body was read whole): the
    /// FIN has gone out after the response; what the client still sends is
    /// read and dropped for a while, so the kernel does not answer it with
    /// a reset that would destroy the response on its way (nginx's
    /// lingering close).
    async fn linger_close(&mut self) {
        linger_close(&mut self.sock).await;
    }

    async fn serve(&mut self) {
        loop {
            // Only an error that ends the connection mid-request lingers.
            self.linger = false;
            self.status = 0;
            self.class = Class::Pass;
            let r = self.read_head().await;
            if !matches!(r, Ok(false)) {
                ensure_out(&mut self.out);
            }
            // Only taken when something records the request.
            let recorded = self.shard.cfg.metrics || self.shard.log.is_some();
            let started = recorded.then(Instant::now);
            let sent = self.sock.sent;
            match r {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    self.log(&format!("rejected request: {e}"));
                    self.req_line.clear();
                    self.req_method_len = 0;
                    // No head to go by (it did not parse). Boxed like
                    // proxy().
                    Box::pin(self.send_answer(
                        e.status(),
                        e.reason(),
                        true,
                        crate::http::Answering::UNKNOWN,
                    ))
                    .await;
                    self.record(started, sent);
                    return;
                }
            }
            if self.shard.log.is_some() {
                let buf = self.inbuf.filled();
                self.req_line.clear();
                self.req_line
                    .extend_from_slice(&buf[self.head.method_range.clone()]);
                self.req_method_len = self.req_line.len();
                self.req_line.extend_from_slice(self.head.target(buf));
            }
            // The large parts of a request's state (forwarding, a miss's
            // fill, the store) are boxed where they begin, so that they
            // exist while such a request is served, not in every idle
            // connection's future; a hit allocates nothing.
            let outcome = self.proxy().await;
            self.record(started, sent);
            match outcome {
                Outcome::KeepAlive if !self.shard.draining() => {}
                // At shutdown, a request the client had already sent
                // (pipelined) is answered too, with `Connection: close`.
                Outcome::KeepAlive if self.has_request_buffered() => {}
                _ => return,
            }
        }
    }

    /// Counts the request just answered (statistics, access log).
    fn record(&self, started: Option<Instant>, sent_before: u64) {
        let Some(started) = started.filter(|_| self.status != 0) else {
            return; // nothing records, or the client left before any answer
        };
        let now = Instant::now();
        let us = now.saturating_duration_since(started).as_micros() as u64;
        if self.shard.cfg.metrics {
            let period = crate::admin::stats::period_of(now);
            self.shard
                .stats
                .borrow_mut()
                .record_at(self.status, self.class, us, period);
        }
        if let Some(log) = &self.shard.log {
            let (method, target, minor) = if self.req_method_len == 0 {
                // No request line parsed: self.head is an earlier request's.
                (&b"-"[..], &b"-"[..], None)
            } else {
                let (m, t) = self.req_line.split_at(self.req_method_len);
                (m, t, Some(self.head.minor))
            };
            log.write(&Entry {
                client: &self.peer_ip,
                method,
                target,
                minor,
                status: self.status,
                bytes: self.sock.sent - sent_before,
                duration_us: us,
                cache: self.class.name(),
                time: crate::cache::unix_now(),
            });
        }
    }

    /// What an upstream request adds for this client (plain listeners only).
    fn forwarded<'a>(&'a self, backend_host: &'a str) -> Forwarded<'a> {
        Forwarded {
            client_ip: &self.peer_ip,
            proto: "http",
            backend_host,
        }
    }

    fn log(&self, msg: &str) {
        eprintln!("corral[{}] {}: {}", self.shard.id, self.peer_ip, msg);
    }

    fn max_inbuf(&self) -> usize {
        (self.shard.cfg.limits.max_header_bytes + 1024).max(CLIENT_BUF)
    }

    /// Whether the input buffer holds the whole head of a next request.
    fn has_request_buffered(&mut self) -> bool {
        skip_blank_lines(&mut self.inbuf);
        let limits = self.shard.head_limits;
        let mut head = RequestHead::default();
        !self.inbuf.is_empty()
            && matches!(
                parse_request(self.inbuf.filled(), &limits, &mut head),
                Ok(true)
            )
    }

    /// Reads and parses the next request head. `Ok(false)`: the connection
    /// ended between requests (EOF, idle timeout, shutdown).
    async fn read_head(&mut self) -> Result<bool, ClientError> {
        let limits = &self.shard.cfg.limits;
        let head_limits = self.shard.head_limits;
        // Empty lines before a request line are ignored (RFC 9112 §2.2):
        // a stray CRLF after a body does not start a head (and its
        // header_timeout, and a 408).
        skip_blank_lines(&mut self.inbuf);
        let mut started = !self.inbuf.is_empty();
        let mut deadline = round_now()
            + if started {
                limits.header_timeout
            } else if self.fresh {
                limits.header_timeout.min(limits.idle_timeout)
            } else {
                limits.idle_timeout
            };
        self.fresh = false;
        // How much of the buffer the last parse saw. A head arriving in
        // small pieces is parsed again only when a line has ended, the
        // buffer has doubled or a limit is crossed: parsing at every read
        // from the start of the head made a client sending a byte at a
        // time cost the shard the square of the head's size (about 5·10^8
        // bytes scanned for a 32 KiB head).
        let mut parsed = 0usize;
        loop {
            let filled = self.inbuf.filled();
            let len = filled.len();
            let uri_cap = head_limits.max_uri_bytes + 32;
            let worth = parsed == 0
                || len >= 2 * parsed
                || memchr::memchr(b'\n', &filled[parsed..]).is_some()
                || (parsed <= uri_cap && len > uri_cap)
                || len >= head_limits.max_header_bytes;
            if started && worth {
                parsed = len;
                if parse_request(filled, &head_limits, &mut self.head)? {
                    return Ok(true);
                }
            }
            let max = self.max_inbuf();
            self.inbuf.ensure(CLIENT_BUF);
            let space = self.inbuf.space(4096, max);
            let r = if started {
                // The rest of a head that came in pieces. Boxed, as are the
                // other waits below but the idle one: a socket read's
                // future (glommio's read and timer included, without a
                // poller) would otherwise sit in every idle connection.
                Box::pin(self.sock.read(space, deadline)).await
            } else if !self.sock.waits_without_buffer() {
                // Between requests, without a poller (rare): a read waits,
                // buffer and all; it also ends on shutdown.
                Box::pin(futures_lite::future::or(
                    self.sock.read(space, deadline),
                    drained(self.shard.clone()),
                ))
                .await
            } else {
                // Between requests: an idle connection gives its buffers
                // back to the shard's spares while it waits (an idle
                // keep-alive connection then costs about 2 KiB, not the
                // 84 KiB of its buffers), and the wait also ends on
                // shutdown.
                match self.sock.try_read_now(space) {
                    Ok(Some(n)) => Ok(n),
                    Err(e) => Err(e),
                    Ok(None) => {
                        self.inbuf.release();
                        // Whatever it holds is stale (forward() clears it).
                        self.ubuf.recycle();
                        release_out(&mut self.out);
                        let woke = futures_lite::future::or(
                            self.sock.wait_readable(deadline),
                            drained(self.shard.clone()),
                        )
                        .await;
                        match woke {
                            // Readable: the next round reads (with a buffer).
                            Ok(()) => continue,
                            // The stop came, but so may have a request
                            // whose edge the poller has not collected yet:
                            // it is read and answered (with close), not
                            // dropped with a reset.
                            Err(NetError::TimedOut)
                                if self.shard.draining() && self.sock.has_pending() =>
                            {
                                continue
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
            };
            match r {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.inbuf.advance(n);
                    if !started {
                        skip_blank_lines(&mut self.inbuf);
                        if self.inbuf.is_empty() {
                            continue;
                        }
                        started = true;
                        deadline = round_now() + limits.header_timeout;
                    }
                }
                Err(NetError::TimedOut) if started => return Err(ClientError::Timeout),
                Err(_) => return Ok(false),
            }
        }
    }

    /// Writes a response corral makes itself, to the request just read.
    async fn send_error(&mut self, code: u16, body: &str, close: bool) {
        let to = crate::http::Answering {
            head_only: self.head.method() == Method::Head,
            minor: self.head.minor,
        };
        self.send_answer(code, body, close, to).await;
    }

    /// [`Self::send_error`] for any request, read or not.
    async fn send_answer(
        &mut self,
        code: u16,
        body: &str,
        close: bool,
        to: crate::http::Answering,
    ) {
        self.linger |= close;
        self.out.clear();
        let extra: &[(&str, &str)] = if code == 503 {
            &[("Retry-After", "1")]
        } else {
            &[]
        };
        self.status = code;
        write_simple_response(&mut self.out, code, body, close, to, extra);
        let deadline = Instant::now() + self.shard.cfg.limits.body_timeout;
        let _ = self.sock.write_all(&self.out, deadline).await;
        if close {
            self.sock.shutdown_write();
        }
    }

    /// Forwards the parsed request and streams the response back.
    async fn proxy(&mut self) -> Outcome {
        let shard = self.shard.clone();
        let cfg = &shard.cfg;
        let buf = self.inbuf.filled();
        let path = crate::http::route_path(self.head.path(buf));
        let pool_idx = match cfg.route(self.head.host(buf), &path) {
            // Boxed like forward().
            Some(Target::Store(i)) => return Box::pin(self.serve_store(i)).await,
            Some(Target::Pool(i)) => i,
            // No route matched (`OPTIONS *` with only `/...` routes): the
            // first pool, if there is one.
            None if shard.pools.is_empty() => {
                let close = self.head.close || self.head.body() != BodyKind::Empty;
                self.inbuf.consume(self.head.head_len);
                self.send_error(404, "no route for this target", close)
                    .await;
                return if close {
                    Outcome::Close
                } else {
                    self.keep_or_close()
                };
            }
            None => 0,
        };
        let pool = &shard.pools[pool_idx];
        let req_body = self.head.body();
        let method = self.head.method();
        self.cache_status.clear();
        if method == Method::Other && &buf[self.head.method_range.clone()] == b"PURGE" {
            return Box::pin(self.purge()).await;
        }
        self.set_cookie.clear();
        self.hint = Hint::default();
        if pool.cfg.hash_key.is_some() || pool.cfg.sticky.is_some() {
            self.hint = self.balance_hint(pool);
        }
        if req_body == BodyKind::Empty && matches!(method, Method::Get | Method::Head) {
            if let Some(outcome) = self.try_cache(pool_idx).await {
                return outcome;
            }
        }
        Box::pin(self.forward(pool_idx)).await
    }

    /// Forwards the request to a backend of pool `pool_idx` and streams the
    /// answer back. Called boxed: its state is large (connect, exchange,
    /// retries, streaming) and must not sit in every idle connection's
    /// future; a hit never gets here.
    async fn forward(&mut self, pool_idx: usize) -> Outcome {
        let shard = self.shard.clone();
        let cfg = &shard.cfg;
        let pool = &shard.pools[pool_idx];
        let req_body = self.head.body();
        let method = self.head.method();
        let minor = self.head.minor;
        let buf = self.inbuf.filled();
        if let BodyKind::Length(n) = req_body {
            if n > cfg.limits.max_body_bytes {
                self.log("rejected request: 413 (declared body too large)");
                self.send_error(413, ClientError::BodyTooLarge.reason(), true)
                    .await;
                return Outcome::Close;
            }
        }
        let response_timeout = pool.cfg.response_timeout;
        let body_timeout = pool.cfg.body_timeout;
        let hint = self.hint;
        let mut attempts = Attempts::new(pool, hint);
        let first = match attempts.first() {
            Some(b) => b,
            None => {
                self.inbuf.consume(self.head.head_len);
                let unread = req_body != BodyKind::Empty;
                return self
                    .upstream_failed(
                        503,
                        &format!("pool {}: no healthy backend", pool.cfg.name),
                        unread,
                    )
                    .await;
            }
        };
        // The upstream head is built once; a retry resends the same bytes.
        let mut up_head = Vec::with_capacity(self.head.head_len + 128);
        write_upstream_request(
            &mut up_head,
            buf,
            &self.head,
            &self.forwarded(&pool.backend_names[first]),
        );
        let expect_continue = self.head.expect_continue;
        // An unsafe method that succeeds invalidates what is stored for its
        // URL (RFC 9111 §4.4); the key is taken while the head is here.
        let invalidate = match (&shard.cache, method) {
            (None, _) | (_, Method::Get | Method::Head | Method::Options | Method::Trace) => None,
            (Some(_), _) => Some(crate::cache::request_key(&self.head, buf)),
        };
        self.inbuf.consume(self.head.head_len);

        let has_body = req_body != BodyKind::Empty;
        // Only such a request may be sent again after a pooled connection
        // failed without a response byte: the backend may have run anything
        // else before it closed (RFC 9112 §9.3.1.1).
        let repeatable = !has_body && method.is_idempotent();
        let mut backend = first;
        let mut flight;
        let mut up = 'attempts: loop {
            flight = pool.begin(backend);
            let started = Instant::now();
            let mut stale_left = 2;
            let mut fresh = false;
            // The failure of this backend, and whether the request can go
            // to another one: it provably never reached this one (no
            // connection), or it is idempotent, had no body, and no
            // response byte came back.
            let (code, msg, retryable) = loop {
                // A repeatable request is retried if a pooled connection
                // turns out stale, on a fresh one (the next pooled one may
                // be as dead: the backend restarted, or its idle timeout is
                // shorter than ours; draining them is no failure of the
                // backend); any other request cannot be, so its pooled
                // connection is verified first.
                let (mut up, reused) = match connection(pool, backend, !repeatable, fresh).await {
                    Ok(c) => c,
                    Err(UpstreamFail::Timeout(m)) => break (504, m, true),
                    Err(UpstreamFail::Bad(m)) => break (502, m, true),
                    Err(_) => break (502, String::new(), true),
                };
                self.ubuf.ensure(UPSTREAM_BUF);
                self.ubuf.clear();
                let up_req = UpRequest {
                    head: &up_head,
                    body: req_body,
                    expect_continue,
                    method,
                    response_timeout,
                };
                match self.exchange(&mut up, &up_req, reused).await {
                    Ok(()) => {
                        pool.answered(backend, started, self.ubuf.filled(), &self.rhead);
                        break 'attempts up;
                    }
                    Err(UpstreamFail::Stale) if repeatable && stale_left > 0 => {
                        stale_left -= 1;
                        fresh = true;
                        continue;
                    }
                    // Never sent: any method goes again, as a connect
                    // failure does.
                    Err(UpstreamFail::Unsent) if stale_left > 0 => {
                        stale_left -= 1;
                        fresh = true;
                        continue;
                    }
                    Err(f @ (UpstreamFail::Stale | UpstreamFail::Unsent)) => {
                        pool.failed(backend, FailKind::Reset);
                        let addr = pool.cfg.backends[backend].describe();
                        let unsent = matches!(f, UpstreamFail::Unsent);
                        break (
                            502,
                            format!("{addr} closed the connection"),
                            repeatable || unsent,
                        );
                    }
                    Err(UpstreamFail::Bad(m)) => {
                        pool.failed(backend, FailKind::Reset);
                        let none_back = self.ubuf.is_empty() && !self.interim_back;
                        break (502, m, !has_body && none_back && method.is_idempotent());
                    }
                    Err(UpstreamFail::Timeout(m)) => {
                        pool.failed(backend, FailKind::Timeout);
                        break (504, m, false);
                    }
                    Err(UpstreamFail::Client(e)) => {
                        self.log(&format!("rejected request body: {e}"));
                        self.send_error(e.status(), e.reason(), true).await;
                        return Outcome::Close;
                    }
                    Err(UpstreamFail::ClientGone) => return Outcome::Close,
                    Err(UpstreamFail::NoBackend) => break (503, String::new(), false),
                }
            };
            drop(flight);
            // With a body, part of it may still be unread on the client
            // socket: answer, then close.
            match attempts.retry(retryable) {
                Ok(next) => {
                    let addr = pool.cfg.backends[next].describe();
                    self.log(&format!("{msg}; retrying on {addr}"));
                    let names = &pool.backend_names;
                    retarget_host(&mut up_head, &self.head, &names[backend], &names[next]);
                    backend = next;
                }
                Err(why) => {
                    let msg = if retryable {
                        format!("{msg} ({why})")
                    } else {
                        msg
                    };
                    return self.upstream_failed(code, &msg, has_body).await;
                }
            }
        };
        if let (Some(key), Some(cache)) = (invalidate, &shard.cache) {
            if (200..400).contains(&self.rhead.code) {
                cache.invalidate(key);
            }
        }
        if pool.cfg.sticky.is_some() && hint.session != Some(backend) {
            self.pin(pool, backend);
        }
        // The client's close, or one an early answer forced (its body is
        // unread).
        let outcome = match self
            .stream_response(&mut up, minor, self.head.close, body_timeout)
            .await
        {
            Err(StreamFail::Backend) => {
                // A response head is no success if the body never comes:
                // a backend failing mid-body counts towards its ejection.
                // Not an early answer's (a 413 before the upload was
                // read): closing with the upload unread resets the
                // connection, which may cut the answer's own body; the
                // backend only enforced its limit.
                if !self.linger {
                    pool.body_failed(backend, self.rhead.code);
                }
                Outcome::Close
            }
            Err(StreamFail::Client) => Outcome::Close,
            Err(StreamFail::ClientAfterBody { reusable }) => {
                // The backend's exchange ended cleanly: its connection
                // serves the next request whatever became of this client.
                pool.completed(backend, self.rhead.code);
                if reusable {
                    pool.checkin(backend, up, Instant::now());
                }
                Outcome::Close
            }
            Ok((reusable, close)) => {
                pool.completed(backend, self.rhead.code);
                if reusable {
                    pool.checkin(backend, up, Instant::now());
                }
                if close {
                    self.sock.shutdown_write();
                    Outcome::Close
                } else {
                    Outcome::KeepAlive
                }
            }
        };
        drop(flight);
        outcome
    }

    /// What the balancer may use about this request: the hash of the pool's
    /// `hash_key`, and for sticky pools the backend of the session (picked
    /// and pinned now when the request has no valid cookie, or when its
    /// backend is not usable).
    fn balance_hint(&mut self, pool: &UpstreamPool) -> Hint {
        let buf = self.inbuf.filled();
        let key = match &pool.cfg.hash_key {
            None => None,
            Some(HashKey::Uri) => Some(key_hash(&[self.head.target(buf)])),
            Some(HashKey::Ip) => Some(key_hash(&[self.peer_ip.as_bytes()])),
            Some(HashKey::Header(name)) => self
                .head
                .fields
                .iter()
                .find(|f| f.name(buf).eq_ignore_ascii_case(name.as_bytes()))
                .map(|f| key_hash(&[f.value(buf)])),
            Some(HashKey::Cookie(name)) => {
                cookie(buf, &self.head, name.as_bytes()).map(|v| key_hash(&[v]))
            }
        };
        let mut hint = Hint { key, session: None };
        if let Some(st) = &pool.cfg.sticky {
            hint.session = cookie(buf, &self.head, st.cookie.as_bytes())
                .and_then(|v| pool.session(v))
                .filter(|&b| pool.usable(b));
            if hint.session.is_none() {
                if let Pick::Backend(b) = pool.pick(hint, 0) {
                    hint.session = Some(b);
                    self.pin(pool, b);
                }
            }
        }
        hint
    }

    /// Pins this client's session to backend `b` with the response.
    fn pin(&mut self, pool: &UpstreamPool, b: usize) {
        if let Some(st) = &pool.cfg.sticky {
            self.set_cookie.clear();
            self.set_cookie.push_str("Set-Cookie: ");
            self.set_cookie.push_str(&st.cookie);
            self.set_cookie.push('=');
            self.set_cookie.push_str(pool.token(b));
            self.set_cookie.push_str("; Path=/; HttpOnly\r\n");
        }
    }

    /// `PURGE /path` from a loopback client drops the cached entry for that
    /// host and target (the admin listener's `POST /purge` comes later).
    async fn purge(&mut self) -> Outcome {
        let loopback = self.sock.peer_addr().is_some_and(|a| a.ip().is_loopback());
        let buf = self.inbuf.filled();
        let key = crate::cache::request_key(&self.head, buf);
        let body_unread = self.head.body() != BodyKind::Empty;
        self.inbuf.consume(self.head.head_len);
        let close = body_unread || self.head.close;
        let (code, text) = match self.shard.cache.as_ref() {
            _ if !loopback => (403, "PURGE is allowed from loopback only"),
            None => (404, "caching is off"),
            Some(c) => {
                c.collapse.forget_uncacheable(key);
                if c.purge(key) {
                    (200, "purged")
                } else {
                    (404, "not in cache")
                }
            }
        };
        self.send_error(code, text, close).await;
        if close {
            Outcome::Close
        } else {
            Outcome::KeepAlive
        }
    }

    /// Answers an upstream failure with `code`. `body_unread`: the request
    /// body is still on the client socket, so the connection must close.
    async fn upstream_failed(&mut self, code: u16, msg: &str, body_unread: bool) -> Outcome {
        self.log(&format!("{code}: {msg}"));
        let close = body_unread || self.head.close || self.shard.draining();
        let text = if code == 504 {
            "upstream timed out"
        } else {
            "upstream failed"
        };
        self.send_error(code, text, close).await;
        if close {
            Outcome::Close
        } else {
            Outcome::KeepAlive
        }
    }

    /// Sends the request (head and body) and reads the final response head
    /// into `self.rhead`/`self.ubuf`, forwarding interim responses.
    async fn exchange(
        &mut self,
        up: &mut Sock,
        req: &UpRequest<'_>,
        reused: bool,
    ) -> Result<(), UpstreamFail> {
        let (up_head, req_body, expect_continue, method) =
            (req.head, req.body, req.expect_continue, req.method);
        let shard = self.shard.clone();
        let cfg = &shard.cfg;
        let pool_timeout = Instant::now() + cfg.limits.body_timeout;
        self.interim_back = false;
        // Head, plus as much of a length-delimited body as is already here.
        self.out.clear();
        self.out.extend_from_slice(up_head);
        let mut body_left = match req_body {
            BodyKind::Length(n) => n,
            _ => 0,
        };
        if body_left > 0 {
            let take = (body_left as usize)
                .min(self.inbuf.len())
                .min(COALESCE_BODY);
            self.out.extend_from_slice(&self.inbuf.filled()[..take]);
            self.inbuf.consume(take);
            body_left -= take as u64;
        }
        if let Err(e) = up.write_all(&self.out, pool_timeout).await {
            return Err(match e {
                NetError::TimedOut => UpstreamFail::Timeout("sending request timed out".into()),
                _ if reused && req_body == BodyKind::Empty => UpstreamFail::Unsent,
                NetError::Io(e) => UpstreamFail::Bad(format!("sending request failed: {e}")),
            });
        }
        if req_body != BodyKind::Empty {
            if expect_continue && self.inbuf.is_empty() {
                let deadline = Instant::now() + cfg.limits.body_timeout;
                if self
                    .sock
                    .write_all(
                        b"HTTP/1.1 100 Continue\r\nVia: 1.1 corral\r\n\r\n",
                        deadline,
                    )
                    .await
                    .is_err()
                {
                    return Err(UpstreamFail::ClientGone);
                }
            }
            if let Err(e) = self.send_body(up, req_body, body_left).await {
                // Body bytes batched for the backend are not the client's.
                self.out.clear();
                // The backend may have answered before taking the whole body
                // (a 413 or 401) and closed or stopped reading: its answer,
                // if it is here, is the response. The client's connection
                // closes after it (the rest of its body is unread), and so
                // does the upstream one.
                if !matches!(e, UpstreamFail::Bad(_) | UpstreamFail::Timeout(_)) {
                    return Err(e);
                }
                self.ubuf.clear();
                let grace = Instant::now() + EARLY_ANSWER_GRACE;
                let head_req = method == Method::Head;
                // Past any interim heads (a 100 Continue sent anyway before
                // the 413), within the grace.
                for _ in 0..=MAX_INTERIM {
                    match read_head(up, &mut self.ubuf, &mut self.rhead, head_req, grace, false)
                        .await
                    {
                        Ok(Head::Final) => {
                            self.head.close = true;
                            self.rhead.close = true;
                            self.linger = true;
                            return Ok(());
                        }
                        Ok(Head::Interim) => self.ubuf.consume(self.rhead.head_len),
                        Err(_) => break,
                    }
                }
                return Err(e);
            }
        }
        // The response head, after any interim ones.
        self.ubuf.clear();
        let mut deadline = Instant::now() + req.response_timeout;
        let mut interim = 0;
        loop {
            let head_req = method == Method::Head;
            // A connection that closes after an interim answer is not a
            // stale pooled one: a response byte came back (no resend).
            match read_head(
                up,
                &mut self.ubuf,
                &mut self.rhead,
                head_req,
                deadline,
                reused && interim == 0,
            )
            .await?
            {
                Head::Final => return Ok(()),
                Head::Interim => {
                    interim += 1;
                    self.interim_back = true;
                    if interim > MAX_INTERIM {
                        return Err(UpstreamFail::Bad(format!(
                            "more than {MAX_INTERIM} interim (1xx) responses"
                        )));
                    }
                    // Pass it on to HTTP/1.1 clients (corral answered any
                    // 100-continue itself), keep reading.
                    if self.head.minor >= 1 && self.rhead.code != 100 {
                        self.out.clear();
                        write_interim(&mut self.out, self.ubuf.filled(), &self.rhead);
                        let d = Instant::now() + cfg.limits.body_timeout;
                        if self.sock.write_all(&self.out, d).await.is_err() {
                            return Err(UpstreamFail::ClientGone);
                        }
                    }
                    self.ubuf.consume(self.rhead.head_len);
                    // An interim answer is progress (102 Processing during a
                    // long WebDAV COPY): the wait for the final head starts
                    // again, as nginx's and HAProxy's inactivity timeouts do.
                    deadline = Instant::now() + req.response_timeout;
                }
            }
        }
    }

    /// Streams the request body from the client to the backend.
    async fn send_body(
        &mut self,
        up: &mut Sock,
        req_body: BodyKind,
        mut body_left: u64,
    ) -> Result<(), UpstreamFail> {
        let shard = self.shard.clone();
        let limits = &shard.cfg.limits;
        let max = self.max_inbuf();
        match req_body {
            BodyKind::Length(_) => {
                while body_left > 0 {
                    if self.inbuf.is_empty() {
                        let deadline = Instant::now() + limits.body_timeout;
                        self.read_body_bytes(max, deadline).await?;
                    }
                    let take = (body_left as usize).min(self.inbuf.len());
                    let deadline = Instant::now() + limits.body_timeout;
                    up.write_all(&self.inbuf.filled()[..take], deadline)
                        .await
                        .map_err(body_send_failed)?;
                    self.inbuf.consume(take);
                    body_left -= take as u64;
                }
            }
            BodyKind::Chunked => {
                let mut dec = ChunkedDecoder::new();
                let mut total: u64 = 0;
                // Re-encoded chunks are batched: a body of tiny chunks
                // costs a write per BODY_BATCH or per read from the client,
                // not a system call (and a packet) per chunk.
                self.out.clear();
                loop {
                    if !self.inbuf.is_empty() {
                        match dec.decode(self.inbuf.filled()) {
                            Ok(Decoded::NeedMore { consumed }) => self.inbuf.consume(consumed),
                            Ok(Decoded::Data {
                                consumed,
                                start,
                                len,
                            }) => {
                                total += len as u64;
                                if total > limits.max_body_bytes {
                                    return Err(UpstreamFail::Client(ClientError::BodyTooLarge));
                                }
                                chunked::encode_chunk_head(&mut self.out, len);
                                self.out
                                    .extend_from_slice(&self.inbuf.filled()[start..start + len]);
                                self.out.extend_from_slice(chunked::CHUNK_END);
                                self.inbuf.consume(consumed);
                                if self.out.len() >= BODY_BATCH {
                                    self.flush_body(up).await?;
                                }
                                continue;
                            }
                            Ok(Decoded::Done { consumed }) => {
                                self.inbuf.consume(consumed);
                                self.out.extend_from_slice(chunked::LAST_CHUNK);
                                return self.flush_body(up).await;
                            }
                            Err(e) => {
                                return Err(UpstreamFail::Client(ClientError::BadRequest(
                                    e.reason(),
                                )))
                            }
                        }
                    }
                    // Before waiting on the client, send what is batched.
                    if !self.out.is_empty() {
                        self.flush_body(up).await?;
                    }
                    let deadline = Instant::now() + limits.body_timeout;
                    self.read_body_bytes(max, deadline).await?;
                }
            }
            BodyKind::Empty | BodyKind::Close => {}
        }
        Ok(())
    }

    /// Writes the request body batched in `self.out` to the backend, and
    /// clears it.
    async fn flush_body(&mut self, up: &mut Sock) -> Result<(), UpstreamFail> {
        let deadline = Instant::now() + self.shard.cfg.limits.body_timeout;
        let r = up.write_all(&self.out, deadline).await;
        self.out.clear();
        r.map_err(body_send_failed)
    }

    /// Reads more request body from the client into `inbuf`.
    async fn read_body_bytes(&mut self, max: usize, deadline: Instant) -> Result<(), UpstreamFail> {
        let space = self.inbuf.space(16 * 1024, max);
        match self.sock.read(space, deadline).await {
            Ok(0) | Err(NetError::Io(_)) => Err(UpstreamFail::ClientGone),
            Ok(n) => {
                self.inbuf.advance(n);
                Ok(())
            }
            Err(NetError::TimedOut) => Err(UpstreamFail::Client(ClientError::Timeout)),
        }
    }

    /// Writes the response head and streams the body to the client.
    /// `Ok((reusable, close))`: the client got the whole response; the
    /// upstream connection may go back to the pool if `reusable`; the client
    /// connection ends if `close`. `Err`: the client connection must close
    /// now (a truncated body, or the client went away), and whose fault.
    async fn stream_response(
        &mut self,
        up: &mut Sock,
        minor: u8,
        client_close: bool,
        body_timeout: std::time::Duration,
    ) -> Result<(bool, bool), StreamFail> {
        let shard = self.shard.clone();
        let send_timeout = shard.cfg.limits.body_timeout;
        let up_body = self.rhead.body();
        let framing = ClientFraming::choose(up_body, minor);
        let close = client_close || shard.draining() || framing == ClientFraming::Close;
        self.status = self.rhead.code;
        if !self.set_cookie.is_empty() {
            self.cache_status.push_str(&self.set_cookie);
        }
        self.out.clear();
        write_client_response(
            &mut self.out,
            self.ubuf.filled(),
            &self.rhead,
            framing,
            close,
            minor,
            self.cache_status.as_bytes(),
        );
        self.ubuf.consume(self.rhead.head_len);
        let up_close = self.rhead.close;
        let mut body = BodyReader::new(up_body);
        loop {
            let piece = match body.step(&mut self.ubuf) {
                Ok(Step::Data(n)) => Ok(Some(n)),
                Ok(Step::End) => Ok(None),
                Ok(Step::NeedRead) => {
                    match body.try_fill(up, &mut self.ubuf) {
                        Ok(true) => continue,
                        Ok(false) => {
                            // Nothing more has come yet: what is at hand (the
                            // head, the pieces so far) goes out before waiting,
                            // so a response the backend produces slowly (server-
                            // sent events, a long poll) streams as it comes.
                            if !self.out.is_empty() {
                                self.write_client(send_timeout).await?;
                            }
                            match body.fill(up, &mut self.ubuf, body_timeout).await {
                                Ok(()) => continue,
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match piece {
                Ok(Some(n)) => {
                    let data = &self.ubuf.filled()[..n];
                    match framing {
                        ClientFraming::Chunked => {
                            chunked::encode_chunk_head(&mut self.out, n);
                            self.out.extend_from_slice(data);
                            self.out.extend_from_slice(chunked::CHUNK_END);
                        }
                        _ if self.out.is_empty() && n >= COALESCE_BODY => {
                            // Large pieces go out straight from the buffer;
                            // the timeout bounds each wait for the client.
                            let r = self.sock.write_all_idle(data, send_timeout).await;
                            self.ubuf.consume(n);
                            r.map_err(|_| ())?;
                            continue;
                        }
                        _ => self.out.extend_from_slice(data),
                    }
                    self.ubuf.consume(n);
                    if self.out.len() >= COALESCE_BODY {
                        self.write_client(send_timeout).await?;
                    }
                }
                Ok(None) => {
                    if framing == ClientFraming::Chunked {
                        self.out.extend_from_slice(chunked::LAST_CHUNK);
                    }
                    // Bytes past the body are a backend protocol error:
                    // never reuse that connection.
                    let reusable = body.reusable() && !up_close && self.ubuf.is_empty();
                    self.write_client(send_timeout)
                        .await
                        .map_err(|_| StreamFail::ClientAfterBody { reusable })?;
                    return Ok((reusable, close));
                }
                Err(e) => {
                    self.log(&format!(
                        "backend failed mid-body ({e}); closing the client connection"
                    ));
                    let _ = self.write_client(send_timeout).await;
                    // The client must see a truncated message: with a
                    // close-delimited body (an HTTP/1.0 client) a FIN would
                    // look like its end, so that one ends with a reset.
                    if framing == ClientFraming::Close {
                        self.sock.set_reset_on_close();
                    }
                    return Err(StreamFail::Backend);
                }
            }
        }
    }

    /// Writes and clears `self.out`.
    /// `timeout` bounds each wait for the client to take bytes.
    async fn write_client(&mut self, timeout: std::time::Duration) -> Result<(), ()> {
        let r = self.sock.write_all_idle(&self.out, timeout).await;
        self.out.clear();
        r.map_err(|_| ())
    }
}
/// Why a response could not be streamed to its end.
enum StreamFail {
    /// The client went away (or would not read).
    Client,
    /// The same, once the backend's whole response was read: the backend
    /// did its part, and its connection may serve another request.
    ClientAfterBody { reusable: bool },
    /// The backend failed or stalled mid-body.
    Backend,
}

impl From<()> for StreamFail {
    fn from(_: ()) -> Self {
        StreamFail::Client
    }
}
