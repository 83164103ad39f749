//! The client connection driver (I/O): reads request heads, applies limits
//! and timeouts, forwards each request to its upstream pool and streams the
//! response back, in order, until the connection ends.
//!
//! Bodies stream in both directions through fixed-size buffers: memory per
//! connection is bounded by `max_header_bytes` plus [`UPSTREAM_BUF`], whatever
//! the body sizes.

mod cached;

use super::buf::Buf;
use super::net::{NetError, Sock};
use super::Shard;
use crate::http::chunked::{self, ChunkedDecoder, Decoded};
use crate::http::request::{parse_request, Method, RequestHead};
use crate::http::response::ResponseHead;
use crate::http::rewrite::{
    write_client_response, write_interim, write_upstream_request, ClientFraming, Forwarded,
};
use crate::http::{write_simple_response, BodyKind, ClientError};
use crate::origin::body::{BodyReader, UPSTREAM_BUF};
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
            inbuf: Buf::new(CLIENT_BUF),
            ubuf: Buf::new(UPSTREAM_BUF),
            out: Vec::with_capacity(4096),
            head: RequestHead::default(),
            rhead: ResponseHead::default(),
            cache_status: String::new(),
        }
    }

    /// Serves requests until the client leaves, an error closes the
    /// connection, or the shard drains.
    pub async fn run(mut self) {
        loop {
            match self.read_head().await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    self.log(&format!("rejected request: {e}"));
                    self.send_error(e.status(), e.reason(), true).await;
                    return;
                }
            }
            match self.proxy().await {
                Outcome::KeepAlive if !self.shard.draining() => {}
                _ => return,
            }
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

    /// Reads and parses the next request head. `Ok(false)`: the connection
    /// ended between requests (EOF, idle timeout, shutdown).
    async fn read_head(&mut self) -> Result<bool, ClientError> {
        let limits = &self.shard.cfg.limits;
        let head_limits = self.shard.head_limits;
        let mut started = !self.inbuf.is_empty();
        let mut deadline = Instant::now()
            + if started {
                limits.header_timeout
            } else {
                limits.idle_timeout
            };
        loop {
            if started && parse_request(self.inbuf.filled(), &head_limits, &mut self.head)? {
                return Ok(true);
            }
            let max = self.max_inbuf();
            let space = self.inbuf.space(4096, max);
            let r = if started {
                self.sock.read(space, deadline).await
            } else {
                // Between requests: also end on shutdown.
                let shard = self.shard.clone();
                let sock = &mut self.sock;
                futures_lite::future::or(sock.read(space, deadline), async move {
                    shard.drain_signal().await;
                    Err(NetError::TimedOut)
                })
                .await
            };
            match r {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.inbuf.advance(n);
                    if !started {
                        started = true;
                        deadline = Instant::now() + limits.header_timeout;
                    }
                }
                Err(NetError::TimedOut) if started => return Err(ClientError::Timeout),
                Err(_) => return Ok(false),
            }
        }
    }

    /// Writes a response corral makes itself.
    async fn send_error(&mut self, code: u16, body: &str, close: bool) {
        self.out.clear();
        let extra: &[(&str, &str)] = if code == 503 {
            &[("Retry-After", "1")]
        } else {
            &[]
        };
        write_simple_response(&mut self.out, code, body, close, extra);
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
        let pool_idx = cfg
            .route(self.head.host(buf), self.head.path(buf))
            .unwrap_or(0);
        let pool = &shard.pools[pool_idx];
        let req_body = self.head.body();
        let method = self.head.method();
        let minor = self.head.minor;
        let client_close = self.head.close;
        self.cache_status.clear();
        if method == Method::Other && &buf[self.head.method_range.clone()] == b"PURGE" {
            return self.purge().await;
        }
        if req_body == BodyKind::Empty && matches!(method, Method::Get | Method::Head) {
            if let Some(outcome) = self.try_cache(pool_idx).await {
                return outcome;
            }
        }
        let buf = self.inbuf.filled();
        if let BodyKind::Length(n) = req_body {
            if n > cfg.limits.max_body_bytes {
                self.log("rejected request: 413 (declared body too large)");
                self.send_error(413, ClientError::BodyTooLarge.reason(), true)
                    .await;
                return Outcome::Close;
            }
        }
        let backend = pool.pick();
        let response_timeout = pool.cfg.response_timeout;
        let body_timeout = pool.cfg.body_timeout;
        // The upstream head is built once; a retry resends the same bytes.
        let mut up_head = Vec::with_capacity(self.head.head_len + 128);
        write_upstream_request(
            &mut up_head,
            buf,
            &self.head,
            &self.forwarded(&pool.backend_names[backend]),
        );
        let expect_continue = self.head.expect_continue;
        self.inbuf.consume(self.head.head_len);

        let has_body = req_body != BodyKind::Empty;
        let up_req = UpRequest {
            head: &up_head,
            body: req_body,
            expect_continue,
            method,
            response_timeout,
        };
        let mut attempt = 0;
        let (mut up, resp_ok) = loop {
            attempt += 1;
            // A request without a body is retried on a fresh connection if
            // a pooled one turns out stale; one with a body cannot be, so
            // its pooled connection is verified first.
            let (mut up, reused) = match connection(pool, backend, has_body).await {
                Ok(c) => c,
                Err(f) => {
                    let msg = match &f {
                        UpstreamFail::Bad(m) | UpstreamFail::Timeout(m) => m.clone(),
                        _ => String::new(),
                    };
                    return self.upstream_failed(f.status(), &msg, has_body).await;
                }
            };
            let r = self.exchange(&mut up, &up_req, reused).await;
            match r {
                Ok(()) => break (up, true),
                Err(UpstreamFail::Stale) if !has_body && attempt < 3 => continue,
                Err(UpstreamFail::Stale) => {
                    let addr = pool.cfg.backends[backend].addr;
                    return self
                        .upstream_failed(502, &format!("{addr} closed the connection"), false)
                        .await;
                }
                // With a body, part of it may still be unread on the client
                // socket: answer, then close.
                Err(UpstreamFail::Bad(m)) => return self.upstream_failed(502, &m, has_body).await,
                Err(UpstreamFail::Timeout(m)) => {
                    return self.upstream_failed(504, &m, has_body).await
                }
                Err(UpstreamFail::Client(e)) => {
                    self.log(&format!("rejected request body: {e}"));
                    self.send_error(e.status(), e.reason(), true).await;
                    return Outcome::Close;
                }
                Err(UpstreamFail::ClientGone) => return Outcome::Close,
            }
        };
        debug_assert!(resp_ok);
        match self
            .stream_response(&mut up, minor, client_close, body_timeout)
            .await
        {
            Err(()) => Outcome::Close,
            Ok((reusable, close)) => {
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
        }
    }

    /// `PURGE /path` from a loopback client drops the cached entry for that
    /// host and target (the admin listener's `POST /purge` comes later).
    async fn purge(&mut self) -> Outcome {
        let loopback = self.sock.peer_addr().is_some_and(|a| a.ip().is_loopback());
        let buf = self.inbuf.filled();
        let host = self.head.host.clone().map_or(&b""[..], |r| &buf[r]);
        let key = crate::cache::key_hash(&[host, self.head.target(buf)]);
        let body_unread = self.head.body() != BodyKind::Empty;
        self.inbuf.consume(self.head.head_len);
        let close = body_unread || self.head.close;
        let (code, text) = match self.shard.cache.as_ref() {
            _ if !loopback => (403, "PURGE is allowed from loopback only"),
            None => (404, "caching is off"),
            Some(c) => {
                c.collapse.forget_uncacheable(key);
                if c.remove(key) {
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
                _ if reused && req_body == BodyKind::Empty => UpstreamFail::Stale,
                NetError::TimedOut => UpstreamFail::Timeout("sending request timed out".into()),
                NetError::Io(e) => UpstreamFail::Bad(format!("sending request failed: {e}")),
            });
        }
        if req_body != BodyKind::Empty {
            if expect_continue && self.inbuf.is_empty() {
                let deadline = Instant::now() + cfg.limits.body_timeout;
                if self
                    .sock
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n", deadline)
                    .await
                    .is_err()
                {
                    return Err(UpstreamFail::ClientGone);
                }
            }
            self.send_body(up, req_body, body_left).await?;
        }
        // The response head, after any interim ones.
        self.ubuf.clear();
        let deadline = Instant::now() + req.response_timeout;
        loop {
            let head_req = method == Method::Head;
            match read_head(
                up,
                &mut self.ubuf,
                &mut self.rhead,
                head_req,
                deadline,
                reused,
            )
            .await?
            {
                Head::Final => return Ok(()),
                Head::Interim => {
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
                        .map_err(|_| UpstreamFail::Bad("sending body failed".into()))?;
                    self.inbuf.consume(take);
                    body_left -= take as u64;
                }
            }
            BodyKind::Chunked => {
                let mut dec = ChunkedDecoder::new();
                let mut total: u64 = 0;
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
                                self.out.clear();
                                chunked::encode_chunk_head(&mut self.out, len);
                                self.out
                                    .extend_from_slice(&self.inbuf.filled()[start..start + len]);
                                self.out.extend_from_slice(chunked::CHUNK_END);
                                self.inbuf.consume(consumed);
                                let deadline = Instant::now() + limits.body_timeout;
                                up.write_all(&self.out, deadline)
                                    .await
                                    .map_err(|_| UpstreamFail::Bad("sending body failed".into()))?;
                                continue;
                            }
                            Ok(Decoded::Done { consumed }) => {
                                self.inbuf.consume(consumed);
                                let deadline = Instant::now() + limits.body_timeout;
                                up.write_all(chunked::LAST_CHUNK, deadline)
                                    .await
                                    .map_err(|_| UpstreamFail::Bad("sending body failed".into()))?;
                                return Ok(());
                            }
                            Err(e) => {
                                return Err(UpstreamFail::Client(ClientError::BadRequest(
                                    e.reason(),
                                )))
                            }
                        }
                    }
                    let deadline = Instant::now() + limits.body_timeout;
                    self.read_body_bytes(max, deadline).await?;
                }
            }
            BodyKind::Empty | BodyKind::Close => {}
        }
        Ok(())
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
    /// connection ends if `close`. `Err(())`: the client connection must
    /// close now (a truncated body, or the client went away).
    async fn stream_response(
        &mut self,
        up: &mut Sock,
        minor: u8,
        client_close: bool,
        body_timeout: std::time::Duration,
    ) -> Result<(bool, bool), ()> {
        let shard = self.shard.clone();
        let send_timeout = shard.cfg.limits.body_timeout;
        let up_body = self.rhead.body();
        let framing = ClientFraming::choose(up_body, minor);
        let close = client_close || shard.draining() || framing == ClientFraming::Close;
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
            match body.next(up, &mut self.ubuf, body_timeout).await {
                Ok(Some(n)) => {
                    let data = &self.ubuf.filled()[..n];
                    match framing {
                        ClientFraming::Chunked => {
                            chunked::encode_chunk_head(&mut self.out, n);
                            self.out.extend_from_slice(data);
                            self.out.extend_from_slice(chunked::CHUNK_END);
                        }
                        _ if self.out.is_empty() && n >= COALESCE_BODY => {
                            // Large pieces go out straight from the buffer.
                            let deadline = Instant::now() + send_timeout;
                            let r = self.sock.write_all(data, deadline).await;
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
                    self.write_client(send_timeout).await?;
                    // Bytes past the body are a backend protocol error:
                    // never reuse that connection.
                    let reusable = body.reusable() && !up_close && self.ubuf.is_empty();
                    return Ok((reusable, close));
                }
                Err(e) => {
                    self.log(&format!(
                        "backend failed mid-body ({e}); closing the client connection"
                    ));
                    let _ = self.write_client(send_timeout).await;
                    return Err(());
                }
            }
        }
    }

    /// Writes and clears `self.out`.
    async fn write_client(&mut self, timeout: std::time::Duration) -> Result<(), ()> {
        let r = self
            .sock
            .write_all(&self.out, Instant::now() + timeout)
            .await;
        self.out.clear();
        r.map_err(|_| ())
    }
}
