//! The cache path of a client connection: fresh hits from memory, misses
//! joined to the shard's one fetch per key (collapsed forwarding,
//! read-while-write), and the fill task that fetches from the origin and
//! stores what RFC 9111 allows.

use super::{ClientConn, Outcome};
use crate::admin::stats::Class;
use crate::cache::body::FILE_MIN;
use crate::cache::collapse::{Fill, Next, Phase, Reader, Source};
use crate::cache::object::Meta;
use crate::cache::object::{
    conditional_not_modified, merge_fields, meta_from_response, not_modified, precondition_fails,
    range_ask, vary_values, HitHead, Object, RangeAsk,
};
use crate::cache::policy::{
    format_http_date, freshness_lifetime, stale_if_error_ok, stale_on_arrival, storable, usable,
    CacheControl, RequestFacts, Timing, Use,
};
use crate::cache::shared::{Claim, End, Relay, SharedFill, SharedFills};
use crate::cache::{unix_now, ShardCache};
use crate::http::chunked;
use crate::http::name_is;
use crate::http::request::{Method, RequestHead};
use crate::http::response::{parse_response, ResponseHead};
use crate::http::rewrite::{retarget_host, write_fill_request};
use crate::origin::body::{BodyReader, UPSTREAM_BUF};
use crate::origin::pool::{Attempts, FailKind, Hint};
use crate::origin::upstream::{connection, read_head, Head, UpstreamFail};
use crate::shard::buf::Buf;
use crate::shard::net::{round_now, until};
use crate::shard::Shard;
use futures_lite::FutureExt;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// An uncacheable response streamed to its one reader is read ahead of that
/// reader by at most this much.
const UNCACHEABLE_AHEAD: u64 = 256 * 1024;
/// Bodies up to this size are copied behind their head and written with one
/// `send`; larger ones go out with the head in one `sendmsg` of two buffers.
const INLINE_BODY: usize = 4 * 1024;

/// What the request says about caching.
fn request_facts(buf: &[u8], head: &RequestHead) -> RequestFacts {
    let mut cc = Vec::new();
    let mut facts = RequestFacts {
        is_get: true,
        ..Default::default()
    };
    let mut pragma = false;
    for f in &head.fields {
        let name = f.name(buf);
        if name_is(name, b"authorization") {
            facts.has_authorization = true;
        } else if name_is(name, b"cache-control") {
            cc.push(f.value(buf));
        } else if name_is(name, b"pragma") {
            pragma |= crate::http::list_elements(f.value(buf))
                .any(|t| t.eq_ignore_ascii_case(b"no-cache"));
        }
    }
    facts.pragma_no_cache = pragma && cc.is_empty();
    facts.cc = CacheControl::parse(cc);
    facts
}

impl ClientConn {
    fn set_cache_status(&mut self, params: &str) {
        self.cache_status.clear();
        self.cache_status.push_str("Cache-Status: corral; ");
        self.cache_status.push_str(params);
        self.cache_status.push_str("\r\n");
    }

    /// Answers a GET or HEAD through the cache. `None`: the request goes to
    /// the origin on its own (pass-through), with `cache_status` set.
    pub(super) async fn try_cache(&mut self, pool_idx: usize) -> Option<Outcome> {
        let shard = self.shard.clone();
        let cache = shard.cache.as_ref()?;
        let buf = self.inbuf.filled();
        let facts = request_facts(buf, &self.head);
        if facts.has_authorization || facts.cc.no_store {
            if facts.cc.only_if_cached {
                // Not answerable from the cache, and not to be forwarded.
                return Some(self.not_in_cache().await);
            }
            self.set_cache_status("fwd=bypass");
            return None;
        }
        let key = crate::cache::request_key(&self.head, buf);
        let now = unix_now();
        let found = cache.find(key, now, |names| vary_values(buf, &self.head, names));
        let mut stale: Option<Object> = None;
        // The request's values when the URL holds another variant.
        let mut other_variant = None;
        match found {
            Err(values) => other_variant = values,
            Ok(obj) => {
                let age = obj.timing.current_age(now);
                let ttl = obj.lifetime as i64 - age as i64;
                match usable(&obj.meta.facts.cc, obj.lifetime, age, &facts) {
                    Use::Fresh => {
                        ShardCache::bump(&cache.hits);
                        self.class = Class::Hit;
                        return Some(self.serve_object(&obj, age, ttl, "").await);
                    }
                    Use::StaleOk => {
                        ShardCache::bump(&cache.hits);
                        self.class = Class::Hit;
                        // One background refresh: lead a fill nobody reads;
                        // none while the last one's answer is remembered as
                        // uncacheable (no back-to-back refreshes).
                        let now = Instant::now();
                        let fill_key = fill_key_of(key, &obj);
                        if !cache.collapse.is_uncacheable(fill_key, now)
                            && !cache.collapse.refresh_held(fill_key, now)
                        {
                            let (reader, lead) = self.join(cache, key, fill_key);
                            if lead {
                                self.spawn_fill(
                                    pool_idx,
                                    key,
                                    reader.fill.clone(),
                                    facts,
                                    Some(obj.clone()),
                                    true,
                                );
                            }
                            drop(reader);
                        }
                        return Some(self.serve_object(&obj, age, ttl, "; fwd=stale").await);
                    }
                    Use::Revalidate => stale = Some(obj),
                }
            }
        }
        ShardCache::bump(&cache.misses);
        self.class = Class::Miss;
        if facts.cc.only_if_cached {
            return Some(self.not_in_cache().await);
        }
        let fwd = if stale.is_some() {
            "fwd=stale"
        } else if other_variant.is_some() {
            // RFC 9211: a stored response for the URI, not for these Vary
            // values.
            "fwd=vary-miss"
        } else {
            "fwd=uri-miss"
        };
        if facts.cc.no_cache || facts.pragma_no_cache {
            // The client asked for the origin's answer: no collapsing.
            self.set_cache_status("fwd=request");
            return None;
        }
        // A request for another variant than the one stored under the
        // URL's key collapses with the requests for its own variant.
        let fill_key = match &stale {
            Some(obj) => fill_key_of(key, obj),
            None => other_variant.map_or(key, |values| crate::cache::variant_key(key, &values)),
        };
        if cache.collapse.is_uncacheable(fill_key, Instant::now()) {
            self.set_cache_status(&format!("{fwd}; detail=uncacheable"));
            return None;
        }
        let reader = if shard.cfg.cache.collapse {
            let (reader, lead) = self.join(cache, key, fill_key);
            if lead {
                self.spawn_fill(pool_idx, key, reader.fill.clone(), facts, stale, true);
            }
            reader
        } else {
            // Collapsing off: every miss fetches (and may store) on its own.
            let reader = cache.collapse.alone(key, cache.purge_generation());
            self.spawn_fill(pool_idx, key, reader.fill.clone(), facts, stale, false);
            reader
        };
        // Boxed: a fill's reader has large state (see forward()).
        Box::pin(self.serve_fill(reader, fwd, pool_idx, Some(key), None)).await
    }

    /// Joins the shard's fill for `key`, unless it began before a purge
    /// of this key or target (it may be fetching what was purged).
    /// `fill_key`: the key the fill collapses under (`key`, or its
    /// variant's, see [`fill_key_of`]).
    fn join(&self, cache: &ShardCache, key: u64, fill_key: u64) -> (Reader, bool) {
        let target = self.head.target(self.inbuf.filled());
        cache
            .collapse
            .join_since(fill_key, cache.purge_generation(), |g| {
                cache.purged_since(g, key, target)
            })
    }

    /// A fill's reader stopped mid-body (failed or stalled): the client
    /// must see a truncated message. With a close-delimited body (neither
    /// chunked nor a length) a FIN would look like its end: that one ends
    /// with a reset.
    fn cut_mid_body(&self, chunked_out: bool, fill: &Fill) {
        if !chunked_out && fill.meta().is_some_and(|m| m.content_length.is_none()) {
            self.sock.set_reset_on_close();
        }
    }

    /// Counts a request answered by joining another's fetch ([`joined`]),
    /// where that answer starts going out.
    fn count_collapsed(&self, first: bool, fill: &Fill) {
        if joined(first, fill) {
            if let Some(cache) = &self.shard.cache {
                ShardCache::bump(&cache.collapsed);
            }
        }
    }

    /// The 504 of `only-if-cached` when the cache cannot answer.
    async fn not_in_cache(&mut self) -> Outcome {
        self.inbuf.consume(self.head.head_len);
        self.send_error(504, "not in cache (only-if-cached)", self.head.close)
            .await;
        self.keep_or_close()
    }

    pub(super) fn keep_or_close(&self) -> Outcome {
        if self.head.close || self.shard.draining() {
            self.sock.shutdown_write();
            Outcome::Close
        } else {
            Outcome::KeepAlive
        }
    }

    /// Writes a stored response: whole, as a 304 for a matching
    /// conditional, or one byte range of it (206, or 416).
    /// A hit: `Cache-Status: corral; hit; ttl=N` then `status_tail`.
    async fn serve_object(
        &mut self,
        obj: &Object,
        age: u64,
        ttl: i64,
        status_tail: &str,
    ) -> Outcome {
        let buf = self.inbuf.filled();
        let len = obj.body.len() as u64;
        let validators = (obj.meta.etag.as_deref(), obj.meta.facts.last_modified);
        if (200..300).contains(&obj.meta.status)
            && precondition_fails(buf, &self.head, validators.0, validators.1)
        {
            // If-Match / If-Unmodified-Since fail against the stored
            // response (evaluated as nginx does for its cache hits).
            self.inbuf.consume(self.head.head_len);
            self.send_error(412, "precondition failed", self.head.close)
                .await;
            return self.keep_or_close();
        }
        // Preconditions only apply to what would be a 2xx (RFC 9110
        // §13.2.1): a stored 404 with an ETag is not "not modified".
        let mut status =
            if (200..300).contains(&obj.meta.status) && not_modified(buf, &self.head, &obj.meta) {
                304
            } else {
                obj.meta.status
            };
        let mut part = 0..obj.body.len();
        let mut extra = String::new();
        // Range applies to GET only (RFC 9110 §14.2): a HEAD gets the
        // whole representation's head.
        if status == 200 && self.head.method() == Method::Get {
            match range_ask(buf, &self.head, len) {
                RangeAsk::Whole => {}
                RangeAsk::Part(a, b) => {
                    status = 206;
                    part = a as usize..b as usize + 1;
                    extra = format!("Content-Range: bytes {a}-{b}/{len}\r\n");
                }
                RangeAsk::Unsatisfiable => {
                    status = 416;
                    part = 0..0;
                    extra = format!("Content-Range: bytes */{len}\r\n");
                }
            }
        }
        extra.push_str(&self.set_cookie);
        self.status = status;
        let head_only = self.head.method() == Method::Head || status == 304 || status == 204;
        let close = self.head.close || self.shard.draining();
        self.out.clear();
        HitHead {
            meta: &obj.meta,
            status,
            age,
            cache_status: "hit",
            ttl: Some(ttl),
            status_tail,
            length: Some(part.len() as u64),
            close,
            client_minor: self.head.minor,
            extra: &extra,
            // A hit: stored copies have none.
            fetcher_fields: b"",
        }
        .write(&mut self.out);
        self.inbuf.consume(self.head.head_len);
        // body_timeout bounds each wait for the client to take bytes, not
        // the whole body: a large object to a slow reader takes long.
        let timeout = self.shard.cfg.limits.body_timeout;
        let body = &obj.body[part.clone()];
        let sent = if head_only || body.len() <= INLINE_BODY {
            if !head_only {
                self.out.extend_from_slice(body);
            }
            self.sock.write_all(&self.out, round_now() + timeout).await
        } else if let Some(file) = obj.body.file().filter(|_| body.len() >= FILE_MIN) {
            // Boxed, like the next one: large bodies only, and their write
            // state would otherwise sit in every idle connection.
            Box::pin(
                self.sock
                    .write_file(&self.out, body, file, part.start, timeout),
            )
            .await
        } else {
            Box::pin(self.sock.write_two(&self.out, body, timeout)).await
        };
        self.out.clear();
        if sent.is_err() {
            return Outcome::Close;
        }
        self.keep_or_close()
    }

    /// Starts the task that fetches `key` from the origin into `fill`.
    /// With `stale`, the fill revalidates that stored response: it asks
    /// conditionally, refreshes it on 304, and may serve it on an origin
    /// error (stale-if-error).
    fn spawn_fill(
        &self,
        pool_idx: usize,
        key: u64,
        fill: Rc<Fill>,
        facts: RequestFacts,
        stale: Option<Object>,
        collapse: bool,
    ) {
        let buf = self.inbuf.filled();
        let pool = &self.shard.pools[pool_idx];
        let mut up_head = Vec::with_capacity(self.head.head_len + 128);
        // The fill picks the backend; a Host it adds is renamed then.
        write_fill_request(
            &mut up_head,
            buf,
            &self.head,
            &self.forwarded(&pool.backend_names[0]),
        );
        if let Some(obj) = &stale {
            // Validators go before the head's final empty line.
            up_head.truncate(up_head.len() - 2);
            if let Some(etag) = &obj.meta.etag {
                up_head.extend_from_slice(b"If-None-Match: ");
                up_head.extend_from_slice(etag);
                up_head.extend_from_slice(b"\r\n");
            }
            if let Some(lm) = obj.meta.facts.last_modified {
                let line = format!("If-Modified-Since: {}\r\n", format_http_date(lm));
                up_head.extend_from_slice(line.as_bytes());
            }
            up_head.extend_from_slice(b"\r\n");
        }
        let job = FillJob {
            publish: None,
            collapse,
            stale,
            shard: self.shard.clone(),
            pool_idx,
            key,
            fill,
            up_head,
            facts,
            request: buf[..self.head.head_len].to_vec(),
            head: self.head.clone(),
            hint: self.hint,
        };
        // A panic in the fill (origin bytes are parsed there) ends this
        // task only: its Drop guards release the readers and the claim.
        let busy = crate::shard::Busy::fill(self.shard.clone());
        let spawned = glommio::spawn_local_into(
            async move {
                let _busy = busy;
                if AssertUnwindSafe(job.run()).catch_unwind().await.is_err() {
                    eprintln!("corral: a cache fill task panicked; the shard goes on");
                }
            },
            self.shard.queue,
        );
        match spawned {
            Ok(t) => drop(t.detach()),
            Err(e) => self.log(&format!("cannot spawn a cache fill: {e}")),
        }
    }

    /// Adds body bytes from a fill to the output: a large piece (a whole
    /// stored body is pushed as one chunk) is written at once from the
    /// fill's own buffer, with what the output holds, rather than copied
    /// into this reader's: buffering per follower stays small.
    async fn put_body(&mut self, piece: &[u8], timeout: std::time::Duration) -> Result<(), ()> {
        if piece.len() <= INLINE_BODY {
            self.out.extend_from_slice(piece);
            return Ok(());
        }
        let r = Box::pin(self.sock.write_two(&self.out, piece, timeout)).await;
        self.out.clear();
        r.map(|_| ()).map_err(|_| ())
    }

    /// Answers from a fill: the response head as soon as the origin's is
    /// known, then each chunk as it arrives. `None`: go to the origin alone.
    /// `primary`: the request's key, when a response for another `Vary`
    /// variant may send it to the fill of its own variant (once).
    async fn serve_fill(
        &mut self,
        mut reader: Reader,
        fwd: &str,
        pool_idx: usize,
        primary: Option<u64>,
        waited_since: Option<Instant>,
    ) -> Option<Outcome> {
        let started = Instant::now();
        let fill = reader.fill.clone();
        let shard = self.shard.clone();
        let cfg = &shard.cfg;
        // A follower waits for the head at most collapse_timeout, then goes
        // alone. The request that leads the fill has nothing better to wait
        // for (going alone would be a second origin request): it waits as
        // long as the fill's own fetch may take, every attempt's connect
        // and response timeouts (a safety bound; the fill ends first).
        let wait = if reader.first {
            let p = &cfg.pools[pool_idx];
            cfg.cache
                .collapse_timeout
                .max((p.connect_timeout + p.response_timeout) * (p.retries + 2))
        } else {
            cfg.cache.collapse_timeout
        };
        // A follower sent on to its variant's fill keeps the deadline of
        // its first wait: collapse_timeout bounds the two together.
        let mut wait_deadline = match waited_since {
            Some(t) if !reader.first => t + wait,
            _ => Instant::now() + wait,
        };
        let body_timeout = cfg.limits.body_timeout;
        let head_only = self.head.method() == Method::Head;
        let minor = self.head.minor;
        // The response head is built once the fill's is known, but the
        // request is only consumed when the first bytes go out: until then
        // the fill may still send this reader to the origin on its own
        // (it outgrew the cache before the reader took a byte), and the
        // request must be there to be forwarded.
        let mut head_sent = false;
        let mut consumed = false;
        let mut chunked_out = false;
        // A single byte range of a 200 of known length, cut from the body
        // as it streams (first and last byte), and the body bytes seen.
        let mut range: Option<(u64, u64)> = None;
        let mut seen_bytes = 0u64;
        let mut close = self.head.close || self.shard.draining();
        loop {
            if !head_sent {
                match fill.phase() {
                    Phase::Waiting => {}
                    Phase::Failed(code) => {
                        self.inbuf.consume(self.head.head_len);
                        let text = if code == 504 {
                            "upstream timed out"
                        } else {
                            "upstream failed"
                        };
                        self.send_error(code, text, close).await;
                        return Some(self.keep_or_close());
                    }
                    _ if fill.exclusive() && (!reader.first || fill.alone()) => {
                        self.set_cache_status(&format!("{fwd}; detail=uncacheable"));
                        return None;
                    }
                    _ => {
                        let meta = fill.meta()?;
                        let buf = self.inbuf.filled();
                        if !meta.vary.is_empty()
                            && vary_values(buf, &self.head, &meta.vary) != meta.request_vary
                        {
                            // Another variant than this request's: join (or
                            // lead) the fill of its own variant, so a herd
                            // split over a few variants is a fetch for each.
                            let cache = shard.cache.as_ref()?;
                            let Some(primary) = primary else {
                                self.set_cache_status(&format!("{fwd}; detail=vary"));
                                return None;
                            };
                            let values = vary_values(buf, &self.head, &meta.vary);
                            let vkey = crate::cache::variant_key(primary, &values);
                            if cache.collapse.is_uncacheable(vkey, Instant::now()) {
                                self.set_cache_status(&format!("{fwd}; detail=vary"));
                                return None;
                            }
                            let (variant, lead) = self.join(cache, primary, vkey);
                            if lead {
                                let facts = request_facts(buf, &self.head);
                                let fill = variant.fill.clone();
                                self.spawn_fill(pool_idx, primary, fill, facts, None, true);
                            }
                            // Nothing of the URL's fill is kept while this
                            // reads its variant's.
                            drop((reader, fill, meta));
                            return Box::pin(self.serve_fill(
                                variant,
                                fwd,
                                pool_idx,
                                None,
                                Some(waited_since.unwrap_or(started)),
                            ))
                            .await;
                        }
                        // The fill asked for the whole representation, without
                        // this request's conditionals: they are evaluated on its
                        // head, as on a hit (If-Match / If-Unmodified-Since
                        // first, 412; then If-None-Match / If-Modified-Since,
                        // 304), for 2xx responses only (RFC 9110 §13.2.1).
                        let two_xx = (200..300).contains(&meta.status);
                        let (etag, last_modified) =
                            (meta.etag.as_deref(), meta.facts.last_modified);
                        if two_xx && precondition_fails(buf, &self.head, etag, last_modified) {
                            self.inbuf.consume(self.head.head_len);
                            self.count_collapsed(reader.first, &fill);
                            self.send_error(412, "precondition failed", close).await;
                            return Some(self.keep_or_close());
                        }
                        // A response the cache does not keep is compared by
                        // its own validators only: with no Last-Modified,
                        // its Date stands in only for a stored copy (RFC
                        // 9111 §4.3.2), else an If-Modified-Since at or
                        // after the Date would get a 304 the origin never
                        // sent.
                        let matches = if fill.exclusive() {
                            conditional_not_modified(buf, &self.head, etag, last_modified)
                        } else {
                            not_modified(buf, &self.head, &meta)
                        };
                        let mut status = if two_xx && matches { 304 } else { meta.status };
                        // A Range on a GET is answered from the stream
                        // when the length is known (206, or 416), as nginx
                        // and Varnish do on a miss; otherwise the whole 200.
                        let mut length = meta.content_length;
                        let mut extra = String::new();
                        if let (200, Some(len), Method::Get) =
                            (status, meta.content_length, self.head.method())
                        {
                            match range_ask(buf, &self.head, len) {
                                RangeAsk::Whole => {}
                                RangeAsk::Part(a, b) => {
                                    status = 206;
                                    range = Some((a, b));
                                    length = Some(b - a + 1);
                                    extra = format!("Content-Range: bytes {a}-{b}/{len}\r\n");
                                }
                                RangeAsk::Unsatisfiable => {
                                    status = 416;
                                    length = Some(0);
                                    extra = format!("Content-Range: bytes */{len}\r\n");
                                }
                            }
                        }
                        if range.is_some() && fill.exclusive() {
                            // Not stored (too large, or uncacheable): the
                            // range goes to the origin with its Range, not
                            // cut from a whole download paced by this client.
                            self.set_cache_status(&format!("{fwd}; detail=uncacheable"));
                            return None;
                        }
                        extra.push_str(&self.set_cookie);
                        let status_text = if joined(reader.first, &fill) {
                            format!("{fwd}; collapsed")
                        } else if fill.exclusive() {
                            format!("{fwd}; detail=uncacheable")
                        } else {
                            match fill.source() {
                                Source::Origin => format!("{fwd}; stored"),
                                // Another shard's fetch stored it meanwhile:
                                // this request joined that fetch (and is
                                // counted a miss, as it arrived).
                                Source::Stored => format!("{fwd}; collapsed"),
                                Source::Refreshed => format!("{fwd}; fwd-status=304; stored"),
                                Source::StaleOnError => {
                                    format!("{fwd}; detail=stale-if-error")
                                }
                                Source::Unstored => {
                                    format!("{fwd}; fwd-status={}", meta.status)
                                }
                            }
                        };
                        close |= self.shard.draining();
                        let no_body = head_only || matches!(status, 204 | 304 | 416);
                        chunked_out = !no_body && meta.content_length.is_none() && minor >= 1;
                        if !no_body && meta.content_length.is_none() && minor == 0 {
                            close = true;
                        }
                        self.out.clear();
                        self.status = status;
                        HitHead {
                            meta: &meta,
                            status,
                            age: meta.facts.age.unwrap_or(0),
                            cache_status: &status_text,
                            ttl: None,
                            status_tail: "",
                            length,
                            close,
                            client_minor: minor,
                            extra: &extra,
                            // Set-Cookie and the like go to the client
                            // whose request this shard fetched for, and
                            // to no one who joined.
                            fetcher_fields: if reader.first && !fill.relayed() {
                                &meta.fetcher_fields
                            } else {
                                b""
                            },
                        }
                        .write(&mut self.out);
                        head_sent = true;
                        if no_body {
                            self.inbuf.consume(self.head.head_len);
                            self.count_collapsed(reader.first, &fill);
                            if self.write_client(body_timeout).await.is_err() {
                                return Some(Outcome::Close);
                            }
                            return Some(if close {
                                Outcome::Close
                            } else {
                                self.keep_or_close()
                            });
                        }
                    }
                }
            }
            let step = reader.step();
            if head_sent && !consumed && matches!(step, Next::Chunk(_) | Next::End) {
                self.inbuf.consume(self.head.head_len);
                consumed = true;
                // Counted here, where another request's fetch answers it
                // (not at joining, nor at its head: a follower may still be
                // sent to the origin on its own until its first bytes).
                self.count_collapsed(reader.first, &fill);
            }
            match step {
                Next::Chunk(c) => {
                    if let Some((a, b)) = range {
                        // Only the part of this chunk inside the range.
                        let from = seen_bytes;
                        seen_bytes += c.len() as u64;
                        let lo = a.max(from) - from;
                        let hi = (b + 1).min(seen_bytes).saturating_sub(from);
                        let part = &c[lo.min(hi) as usize..hi as usize];
                        if self.put_body(part, body_timeout).await.is_err() {
                            return Some(Outcome::Close);
                        }
                        if seen_bytes > b {
                            // The range is complete: the rest of the fill
                            // goes on without this reader.
                            if self.write_client(body_timeout).await.is_err() || close {
                                self.sock.shutdown_write();
                                return Some(Outcome::Close);
                            }
                            return Some(self.keep_or_close());
                        }
                    } else if c.is_empty() {
                        // Nothing to frame (chunked, an empty chunk would
                        // be the last-chunk marker).
                    } else {
                        if chunked_out {
                            chunked::encode_chunk_head(&mut self.out, c.len());
                        }
                        if self.put_body(&c, body_timeout).await.is_err() {
                            return Some(Outcome::Close);
                        }
                        if chunked_out {
                            self.out.extend_from_slice(chunked::CHUNK_END);
                        }
                    }
                    if self.write_client(body_timeout).await.is_err() {
                        return Some(Outcome::Close);
                    }
                }
                Next::Pending => {
                    let seen = fill.version();
                    let deadline = if head_sent {
                        // The fill task bounds the origin's pace itself.
                        Instant::now() + cfg.limits.body_timeout.max(cfg.cache.collapse_timeout) * 4
                    } else {
                        wait_deadline
                    };
                    let changed = until(deadline, fill.changed(seen)).await;
                    if changed.is_some() && reader.first && !head_sent {
                        // News of a live fetch (a new attempt, an interim
                        // answer): the leader's wait starts again.
                        wait_deadline = Instant::now() + wait;
                    }
                    if changed.is_none() {
                        if consumed {
                            self.cut_mid_body(chunked_out, &fill);
                            return Some(Outcome::Close);
                        }
                        if head_sent {
                            // The origin stalled before the first byte.
                            self.out.clear();
                            self.inbuf.consume(self.head.head_len);
                            self.send_error(504, "upstream timed out", true).await;
                            return Some(Outcome::Close);
                        }
                        // collapse_timeout: go to the origin on our own.
                        self.set_cache_status(&format!("{fwd}; detail=collapse-timeout"));
                        return None;
                    }
                }
                Next::End => {
                    if range.is_some_and(|(_, b)| seen_bytes <= b) {
                        // Shorter than its length said (a fill fails
                        // first, so this is only a guard): never a short
                        // 206 on a kept-alive connection.
                        self.cut_mid_body(false, &fill);
                        return Some(Outcome::Close);
                    }
                    if chunked_out {
                        self.out.extend_from_slice(chunked::LAST_CHUNK);
                    }
                    if self.write_client(body_timeout).await.is_err() || close {
                        self.sock.shutdown_write();
                        return Some(Outcome::Close);
                    }
                    return Some(self.keep_or_close());
                }
                Next::GoAlone if consumed => return Some(Outcome::Close),
                Next::GoAlone => {
                    // Nothing of the response went out: forget its head.
                    self.out.clear();
                    self.set_cache_status(&format!("{fwd}; detail=uncacheable"));
                    return None;
                }
                Next::Failed(code) => {
                    if consumed {
                        self.cut_mid_body(chunked_out, &fill);
                        return Some(Outcome::Close);
                    }
                    self.out.clear();
                    self.inbuf.consume(self.head.head_len);
                    self.send_error(code, "upstream failed", close).await;
                    return Some(self.keep_or_close());
                }
            }
        }
    }
}

/// Everything a fill task needs; it outlives the request that started it.
struct FillJob {
    shard: Rc<Shard>,
    pool_idx: usize,
    key: u64,
    fill: Rc<Fill>,
    up_head: Vec<u8>,
    facts: RequestFacts,
    /// The starting request's head bytes and parse, for `Vary`.
    request: Vec<u8>,
    head: RequestHead,
    /// The stored response being revalidated, if any.
    stale: Option<Object>,
    /// Where this fetch is published for the other shards.
    publish: Option<Published>,
    /// Whether other requests may share this fetch: when not, it is
    /// neither in the shard's table nor claimed process-wide.
    collapse: bool,
    /// What the balancer may use about the starting request.
    hint: Hint,
}

/// This shard's claim on a key process-wide; releasing it (also when the
/// task is dropped) ends the shared fill so no other shard waits forever.
struct Published {
    fills: Arc<SharedFills>,
    key: u64,
    fill: Arc<SharedFill>,
}

impl Drop for Published {
    fn drop(&mut self) {
        self.fill.fail(502);
        self.fills.release(self.key, &self.fill);
    }
}

impl Drop for FillJob {
    /// A fill task that never ran (its spawn failed) or was dropped midway
    /// must not leave readers waiting for it or its key stuck in the
    /// collapse table: waiting readers go to the origin alone, streaming
    /// ones are cut.
    fn drop(&mut self) {
        match self.fill.phase() {
            Phase::Waiting => self.fill.go_alone(),
            Phase::Streaming => self.fill.fail(502),
            Phase::Uncacheable if !self.fill.alone() => self.fill.fail(502),
            _ => {}
        }
        if let Some(cache) = self.shard.cache.as_ref() {
            cache.collapse.remove(&self.fill);
        }
    }
}

impl FillJob {
    async fn run(mut self) {
        let shard = self.shard.clone();
        let Some(cache) = shard.cache.as_ref() else {
            return;
        };
        let target = self.head.target(&self.request);
        let claim = self.collapse.then(|| {
            shard
                .shared_fills
                // The fill's own key: a variant's fill (see serve_fill)
                // is claimed apart from the URL's.
                .claim_since(self.fill.key, cache.purge_generation(), |g| {
                    cache.purged_since(g, self.key, target)
                })
        });
        match claim {
            Some(Claim::Follow(shared)) => {
                self.relay(shared).await;
                cache.collapse.remove(&self.fill);
                return;
            }
            Some(Claim::Fetch(fill)) => {
                self.publish = Some(Published {
                    fills: shard.shared_fills.clone(),
                    key: self.fill.key,
                    fill,
                })
            }
            None => {}
        }
        // Another shard's fetch may have stored the response between this
        // shard's miss and its claim: then it answers, not a second fetch.
        // So may a revalidation: another shard's 304 refreshed the copy
        // this one found stale (which is no fresher for this request now).
        let values = |names: &[Vec<u8>]| vary_values(&self.request, &self.head, names);
        if let Ok(o) = cache.find(self.key, unix_now(), values) {
            let age = o.timing.current_age(unix_now());
            if usable(&o.meta.facts.cc, o.lifetime, age, &self.facts) == Use::Fresh {
                self.fill.set_source(Source::Stored);
                self.serve_stored(&o, true);
                cache.collapse.remove(&self.fill);
                return;
            }
        }
        let result = self.fetch(cache).await;
        let origin_error = matches!(
            result,
            Err(UpstreamFail::Bad(_) | UpstreamFail::Timeout(_) | UpstreamFail::NoBackend)
        );
        if origin_error {
            self.hold_refreshes();
        }
        if origin_error && self.stale_usable() {
            // stale-if-error: the stored response answers for the origin.
            self.serve_stale();
        } else if let Err(UpstreamFail::ClientGone) = result {
            // The one reader of an uncacheable response left (or a
            // background refresh turned out uncacheable): the origin
            // answered, so the others go to it on their own, not to an error.
            self.fill.go_alone();
            if let Some(p) = &self.publish {
                p.fill.fail(0);
            }
        } else if let Err(f) = result {
            let msg = match &f {
                UpstreamFail::Bad(m) | UpstreamFail::Timeout(m) => m.clone(),
                UpstreamFail::NoBackend => "no healthy backend".into(),
                _ => "failed".into(),
            };
            eprintln!("corral[{}]: cache fill failed: {msg}", self.shard.id);
            self.fail(f.status());
        }
        cache.collapse.remove(&self.fill);
    }

    // Each step of the fill goes to this shard's readers and, when this
    // shard fetches for the process, to the other shards' relays.

    /// The head is known: `shared`, every reader may read it (else only
    /// the first).
    fn start(&self, meta: Arc<Meta>, shared: bool) {
        self.fill.start(meta.clone(), shared);
        if let Some(p) = &self.publish {
            p.fill.start(meta, shared, self.fill.source());
        }
    }

    /// Tells the fill's leading reader and other shards' relays that the
    /// fetch is alive ([`Fill::progress`], [`SharedFill::progress`]).
    fn progress(&self) {
        self.fill.progress();
        if let Some(p) = &self.publish {
            p.fill.progress();
        }
    }

    fn push(&self, chunk: Arc<[u8]>) {
        self.push_with(chunk, false);
    }

    /// `held`: the chunk is a stored body, held whole (see
    /// [`Fill::push_held`]).
    fn push_with(&self, chunk: Arc<[u8]>, held: bool) {
        if held {
            self.fill.push_held(chunk.clone());
        } else {
            self.fill.push(chunk.clone());
        }
        // Relayed while shared, and once demoted too, every chunk (relays
        // read by index; the shared fill keeps only what they have not
        // copied); an uncacheable fill has its one reader here.
        if let Some(p) = &self.publish {
            if !self.fill.exclusive() || p.fill.demoted() {
                p.fill.push(chunk);
            }
        }
    }

    fn finish(&self) {
        self.fill.finish();
        if let Some(p) = &self.publish {
            p.fill.finish();
        }
    }

    fn fail(&self, status: u16) {
        self.fill.fail(status);
        if let Some(p) = &self.publish {
            p.fill.fail(status);
        }
    }

    /// The response outgrew `max_object_size`: readers that have not
    /// started go to the origin alone, here and on other shards, and the
    /// others read on (see [`Fill::demote`]). Other shards' later misses
    /// for the key find it still claimed, learn that it is not shareable
    /// and fetch on their own (hit-for-miss there too).
    fn demote(&self) {
        self.fill.demote();
        if let Some(p) = &self.publish {
            p.fill.demote();
        }
    }

    /// Waits until an exclusive stream may read on: its fastest reader is
    /// at most UNCACHEABLE_AHEAD behind, counting this shard's readers
    /// (uncacheable: the first only; demoted: those that had started) and
    /// the other shards' relays of a demoted fetch (each paced on its own
    /// readers). Slower ones are cut MAX_LAG behind. False: no reader is
    /// left anywhere, the fetch stops.
    async fn paced(&self) -> bool {
        let remote = self
            .publish
            .as_ref()
            .map(|p| p.fill.clone())
            .filter(|f| f.demoted());
        loop {
            let local = self.fill.live_readers() > 0;
            let relays = remote.as_ref().filter(|f| f.relays() > 0);
            if !local && relays.is_none() {
                return false;
            }
            if (local && self.fill.backlog() <= UNCACHEABLE_AHEAD)
                || relays.is_some_and(|f| f.relay_backlog() <= UNCACHEABLE_AHEAD)
            {
                return true;
            }
            // A reader waits on its client at most the client body timeout
            // per write; a relay that has not moved for longer than that is
            // on a shard that stopped: read on (it is cut MAX_LAG behind).
            let bound = self.shard.cfg.limits.body_timeout + std::time::Duration::from_secs(2);
            let waited = until(Instant::now() + bound, async {
                match relays {
                    None => self.fill.readers_within(UNCACHEABLE_AHEAD).await,
                    Some(f) if !local => f.relays_within(UNCACHEABLE_AHEAD).await,
                    Some(f) => {
                        let mut here = std::pin::pin!(self.fill.readers_within(UNCACHEABLE_AHEAD));
                        let mut there = std::pin::pin!(f.relays_within(UNCACHEABLE_AHEAD));
                        std::future::poll_fn(|cx| {
                            if here.as_mut().poll(cx).is_ready()
                                || there.as_mut().poll(cx).is_ready()
                            {
                                std::task::Poll::Ready(())
                            } else {
                                std::task::Poll::Pending
                            }
                        })
                        .await
                    }
                }
            })
            .await;
            if waited.is_none() {
                return true;
            }
        }
    }

    /// This shard's requests for the key go to the origin on their own for
    /// a while (`hit_for_miss`): another shard found it uncacheable.
    fn remember_uncacheable(&self) {
        if let Some(cache) = self.shard.cache.as_ref() {
            let until = Instant::now() + self.shard.cfg.cache.hit_for_miss;
            cache.collapse.mark_uncacheable(self.fill.key, until);
        }
    }

    /// A revalidation of a stored response failed at the origin (a 5xx,
    /// whether or not stale-if-error answered it; no connection; a
    /// timeout), here or on the shard whose fetch this one relayed:
    /// stale-while-revalidate hits start no refresh for `hit_for_miss`,
    /// so a failing origin is not asked back to back.
    fn hold_refreshes(&self) {
        if self.stale.is_none() {
            return;
        }
        if let Some(cache) = self.shard.cache.as_ref() {
            let until = Instant::now() + self.shard.cfg.cache.hit_for_miss;
            cache.collapse.hold_refresh(self.fill.key, until);
        }
    }

    /// Another shard fetches this key: copy its response into this shard's
    /// fill as it arrives.
    async fn relay(&self, shared: Arc<SharedFill>) {
        struct Subscribed(Arc<SharedFill>, Relay);
        impl Drop for Subscribed {
            fn drop(&mut self) {
                self.0.unsubscribe(self.1);
            }
        }
        let me = Subscribed(shared.clone(), shared.subscribe());
        let mut pos = 0;
        let mut started = false;
        let mut demoted = false;
        // The longest the fetching shard may leave its fill unchanged
        // (every attempt's connect and head, or a body read), with room:
        // past it that shard is gone (its thread died), and waiting on
        // would hold this shard's readers and collapse entry forever.
        let pool = &self.shard.pools[self.pool_idx].cfg;
        // A demoted fetch waits for its fastest reader, which may wait on
        // its client for up to the client body timeout.
        let quiet = (pool.connect_timeout + pool.response_timeout) * (pool.retries + 1)
            + pool.body_timeout
            + self.shard.cfg.limits.body_timeout
            + std::time::Duration::from_secs(1);
        loop {
            let u = shared.read(me.1, pos);
            if !started {
                if let Some((meta, shared, source)) = u.head.clone() {
                    // Not shareable, or no longer for readers that have
                    // not started (it outgrew the cache before this relay
                    // read its head).
                    if !shared || u.demoted || u.cut {
                        self.remember_uncacheable();
                        self.fill.go_alone();
                        return;
                    }
                    if meta.status >= 500 || matches!(source, Source::StaleOnError) {
                        self.hold_refreshes();
                    }
                    self.fill.set_source(source);
                    self.fill.set_relayed();
                    self.fill.start(meta, true);
                    started = true;
                }
            }
            if u.cut {
                // Too far behind a demoted fetch: readers that started here
                // are cut, those that had not go to the origin alone.
                self.remember_uncacheable();
                return self.fill.go_alone();
            }
            if started {
                pos += u.chunks.len();
                for c in u.chunks {
                    self.fill.push(c);
                }
            }
            if u.demoted && !demoted && started {
                // It outgrew the cache: this shard's readers that have
                // started read on, the others go to the origin alone.
                demoted = true;
                self.remember_uncacheable();
                self.fill.demote();
            }
            if demoted && u.end == End::Open {
                // Read on at the pace of this shard's fastest reader (the
                // fetch is paced on the fastest relay or reader anywhere);
                // when nobody here reads it any more, stop holding chunks.
                self.fill.readers_within(UNCACHEABLE_AHEAD).await;
                if self.fill.live_readers() == 0 {
                    return self.fill.go_alone();
                }
            }
            match u.end {
                End::Open => {
                    let changed = until(Instant::now() + quiet, shared.changed(u.version)).await;
                    if changed.is_some() && !started {
                        // News of the fetch without its head yet (an
                        // attempt, an interim answer): this shard's leading
                        // reader hears it too.
                        self.fill.progress();
                    }
                    if changed.is_none() {
                        // Its fetcher is gone, or slower than the pool's
                        // timeouts should allow: this shard's readers get
                        // a 504 and later misses claim afresh, but other
                        // shards' relays keep waiting for it (if it is
                        // alive, failing them would cost a second fetch).
                        self.shard.shared_fills.release(self.fill.key, &shared);
                        return self.fill.fail(504);
                    }
                }
                // The fetching shard stored it in its owner's partition.
                End::Done if started => return self.fill.finish(),
                // Outgrew the object size limit (or turned out not to be
                // shareable): readers that have not started go to the
                // origin alone, the others are cut (`Reader::step`).
                End::Failed(0) => {
                    // A head that was published, then given up (too large,
                    // or not shareable after all); without a head it is a
                    // 304 naming another representation, which says
                    // nothing about cacheability.
                    if started {
                        self.remember_uncacheable();
                    }
                    return self.fill.go_alone();
                }
                End::Failed(code) if code != 0 => return self.fill.fail(code),
                End::Done | End::Failed(_) => return self.fill.fail(502),
            }
        }
    }

    /// Whether the stale response may stand in for an origin error. Only
    /// the response's `stale-if-error` counts: the fill answers every
    /// request collapsed onto it, and one client's request directive must
    /// not hand the others a stale response they did not accept.
    fn stale_usable(&self) -> bool {
        self.fill.phase() == Phase::Waiting
            && self.stale.as_ref().is_some_and(|o| {
                let age = o.timing.current_age(unix_now());
                let no_request_directive = CacheControl::default();
                stale_if_error_ok(&o.meta.facts.cc, &no_request_directive, o.lifetime, age)
            })
    }

    fn serve_stale(&self) {
        if let Some(o) = &self.stale {
            self.fill.set_source(Source::StaleOnError);
            self.serve_stored(o, true);
        }
    }

    /// Answers the fill's readers with a stored response, whole, at its
    /// current age (`shareable`: every reader may read it).
    fn serve_stored(&self, o: &Object, shareable: bool) {
        let age = o.timing.current_age(unix_now());
        // The stored body is whole: it goes out with its length, even when
        // the origin sent it chunked or close-delimited.
        let mut meta = (*o.meta).clone();
        meta.facts.age = Some(age);
        meta.content_length = Some(o.body.len() as u64);
        self.start(Arc::new(meta), shareable);
        if !o.body.is_empty() {
            self.push_with(Arc::from(&o.body[..]), true);
        }
        self.finish();
    }

    /// A 304 answered the revalidation: the stored response with the 304's
    /// fields merged in (RFC 9111 §4.3.4) is stored again and served.
    fn refresh(
        &self,
        cache: &ShardCache,
        old: &Object,
        update: &[u8],
        age: Option<u64>,
        request_time: i64,
        generation: u64,
    ) -> Result<(), UpstreamFail> {
        let fields = merge_fields(&old.meta.fields, update);
        let mut synthetic = format!("HTTP/1.1 {} X\r\n", old.meta.status).into_bytes();
        synthetic.extend_from_slice(&fields);
        synthetic
            .extend_from_slice(format!("Content-Length: {}\r\n\r\n", old.body.len()).as_bytes());
        let mut rhead = ResponseHead::default();
        match parse_response(&synthetic, false, synthetic.len() + 1, &mut rhead) {
            Ok(true) => {}
            _ => return Err(UpstreamFail::Bad("cannot merge the 304's fields".into())),
        }
        let mut meta = meta_from_response(&synthetic, &rhead);
        meta.reason = old.meta.reason.clone();
        // The request values the response answers: the stored ones, or if
        // the 304 changed Vary, those of the request that revalidated (the
        // 304 was its answer; the copy is not kept then, see below).
        meta.request_vary = if meta.vary == old.meta.vary {
            old.meta.request_vary.clone()
        } else {
            vary_values(&self.request, &self.head, &meta.vary)
        };
        meta.target = old.meta.target.clone();
        // The 304's Age (an upstream cache's) counts in the refreshed
        // copy's age as a 200's would (RFC 9111 §4.2.3); it is not stored
        // as a field (each answer computes its own).
        meta.facts.age = age;
        let now = unix_now();
        let mut obj = Object {
            lifetime: freshness_lifetime(&meta.facts, now),
            timing: Timing::new(&meta.facts, request_time, now),
            meta: Arc::new(meta),
            body: old.body.clone(),
            vary_values: old.vary_values.clone(),
            variant_of: None,
        };
        // The 304's fields may make the response unstorable (private,
        // no-store, a Set-Cookie without public): then it answers the
        // request that revalidated it only, and the stored copy goes. So
        // does a copy whose Vary the 304 changed: the request values it was
        // stored under no longer say which requests it answers (the next
        // request fetches it whole again).
        let vary_changed = obj.meta.vary != old.meta.vary;
        let shareable = storable(&self.facts, &obj.meta.facts).is_ok() && !vary_changed;
        self.fill.set_source(Source::Refreshed);
        self.serve_stored(&obj, shareable);
        if !shareable {
            cache.remove_if_still(cache.slot_of(self.key, old), old);
            if !vary_changed {
                let hit_for_miss = self.shard.cfg.cache.hit_for_miss;
                cache
                    .collapse
                    .mark_uncacheable(self.fill.key, Instant::now() + hit_for_miss);
            }
            return Ok(());
        }
        obj.meta = Meta::for_storage(obj.meta);
        let slot = cache.place(self.key, &mut obj);
        if cache.insert_fetched(generation, slot, obj) {
            ShardCache::bump(&cache.stored);
        }
        Ok(())
    }

    async fn fetch(&self, cache: &ShardCache) -> Result<(), UpstreamFail> {
        // Purges since the fill began count, not only since this fetch: a
        // background refresh is polled after its stale hit returned, and a
        // purge in between must keep its answer (a 304 merged into the
        // purged copy, above all) out of the cache.
        let generation = self.fill.generation();
        let pool = &self.shard.pools[self.pool_idx];
        let request_time = unix_now();
        let mut ubuf = Buf::take(UPSTREAM_BUF);
        let mut rhead = ResponseHead::default();
        let mut attempts = Attempts::new(pool, self.hint);
        let mut backend = attempts.first().ok_or(UpstreamFail::NoBackend)?;
        let mut flight;
        // The head names the first backend when the client sent no Host.
        let mut up_head = std::borrow::Cow::Borrowed(&self.up_head[..]);
        let mut named = 0;
        let mut up = 'attempts: loop {
            if self.head.host.is_none() && named != backend {
                let names = &pool.backend_names;
                retarget_host(up_head.to_mut(), &self.head, &names[named], &names[backend]);
                named = backend;
            }
            flight = pool.begin(backend);
            let started = Instant::now();
            let mut attempt = 0;
            // The failure, and whether another backend may be tried: the
            // request never reached this one, or no response byte came back
            // (a fill is a GET without a body, so it is safe to repeat).
            let (err, retryable) = loop {
                attempt += 1;
                self.progress();
                // After a stale pooled connection, a fresh one (see proxy).
                let (mut up, reused) = match connection(pool, backend, false, attempt > 1).await {
                    Ok(c) => c,
                    Err(f) => break (f, true),
                };
                let sent = up
                    .write_all(
                        &up_head,
                        Instant::now() + self.shard.cfg.limits.body_timeout,
                    )
                    .await;
                if sent.is_err() {
                    if reused && attempt < 3 {
                        continue;
                    }
                    pool.failed(backend, FailKind::Reset);
                    break (
                        UpstreamFail::Bad("sending the fill request failed".into()),
                        true,
                    );
                }
                ubuf.clear();
                let mut deadline = Instant::now() + pool.cfg.response_timeout;
                let mut interim = 0;
                let got = loop {
                    // As in forwarding: a close after an interim answer is
                    // not a stale connection, each interim answer restarts
                    // the wait, and at most MAX_INTERIM of them.
                    let stale_possible = reused && interim == 0;
                    match read_head(
                        &mut up,
                        &mut ubuf,
                        &mut rhead,
                        false,
                        deadline,
                        stale_possible,
                    )
                    .await
                    {
                        Ok(Head::Final) => break Ok(()),
                        Ok(Head::Interim) if interim >= super::MAX_INTERIM => {
                            break Err(UpstreamFail::Bad(format!(
                                "more than {} interim (1xx) responses",
                                super::MAX_INTERIM
                            )))
                        }
                        Ok(Head::Interim) => {
                            interim += 1;
                            ubuf.consume(rhead.head_len);
                            deadline = Instant::now() + pool.cfg.response_timeout;
                            self.progress();
                        }
                        Err(e) => break Err(e),
                    }
                };
                match got {
                    Ok(()) => {
                        pool.answered(backend, started, ubuf.filled(), &rhead);
                        break 'attempts up;
                    }
                    Err(UpstreamFail::Stale) if attempt < 3 => continue,
                    Err(UpstreamFail::Stale) => {
                        pool.failed(backend, FailKind::Reset);
                        break (
                            UpstreamFail::Bad("backend closed the connection".into()),
                            true,
                        );
                    }
                    Err(UpstreamFail::Timeout(m)) => {
                        pool.failed(backend, FailKind::Timeout);
                        break (UpstreamFail::Timeout(m), false);
                    }
                    Err(e @ UpstreamFail::Bad(_)) => {
                        pool.failed(backend, FailKind::Reset);
                        let none_back = ubuf.is_empty();
                        break (e, none_back);
                    }
                    Err(e) => return Err(e),
                }
            };
            drop(flight);
            let Ok(next) = attempts.retry(retryable) else {
                return Err(err);
            };
            let msg = match &err {
                UpstreamFail::Bad(m) | UpstreamFail::Timeout(m) => m.as_str(),
                _ => "failed",
            };
            eprintln!(
                "corral[{}]: cache fill: {msg}; retrying on {}",
                self.shard.id, pool.cfg.backends[next].addr
            );
            backend = next;
        };
        let response_time = unix_now();
        let cfg = &self.shard.cfg.cache;
        if let Some(old) = &self.stale {
            if rhead.code == 304 {
                let answer = meta_from_response(ubuf.filled(), &rhead);
                fn opaque(t: &[u8]) -> &[u8] {
                    t.strip_prefix(b"W/").unwrap_or(t)
                }
                // Whether the 304 is for the stored response (RFC 9111
                // §4.3.4): a strong ETag must equal the stored one, a weak
                // one match it weakly; without an ETag, a Last-Modified
                // must equal the stored one. A 304 with no validator at all
                // updates the one stored response (as nginx and Varnish
                // do; the RFC asks for a stored response without
                // validators then).
                let stored_tag = old.meta.etag.as_deref();
                let other = match answer.etag.as_deref() {
                    Some(tag) if !tag.starts_with(b"W/") => stored_tag != Some(tag),
                    Some(tag) => stored_tag.map(opaque) != Some(opaque(tag)),
                    None => answer
                        .facts
                        .last_modified
                        .is_some_and(|lm| old.meta.facts.last_modified != Some(lm)),
                };
                if other {
                    // The 304 names another representation than the one
                    // stored (it must not update it): the stored copy goes,
                    // and the waiting requests go to the origin on their
                    // own.
                    cache.remove_if_still(cache.slot_of(self.key, old), old);
                    self.fill.go_alone();
                    if let Some(p) = &self.publish {
                        p.fill.fail(0);
                    }
                    return Ok(());
                }
                let mut update = answer.fields;
                // Its Set-Cookie (and the like) goes to the client that
                // revalidated: back among the fields, the merged head
                // sorts it out again.
                update.extend_from_slice(&answer.fetcher_fields);
                // A 304 without Date is dated on arrival (RFC 9110 §6.6.1):
                // else the stored Date, as old as the first fetch, would
                // make the refreshed copy look that old (apparent age).
                if answer.facts.date.is_none() {
                    crate::http::push_date(&mut update, response_time);
                }
                let reusable = !rhead.close && ubuf.len() == rhead.head_len;
                let age = answer.facts.age;
                self.refresh(cache, old, &update, age, request_time, generation)?;
                if reusable {
                    pool.checkin(backend, up, Instant::now());
                }
                return Ok(());
            }
            if rhead.code >= 500 && self.stale_usable() {
                self.hold_refreshes();
                self.serve_stale();
                return Ok(());
            }
        }
        let mut meta = meta_from_response(ubuf.filled(), &rhead);
        if meta.facts.date.is_none() {
            // Dated on arrival (RFC 9110 §6.6.1), so that every hit carries
            // the Date its Age is counted from.
            crate::http::push_date(&mut meta.fields, response_time);
            meta.facts.date = Some(response_time);
        }
        let lifetime = freshness_lifetime(&meta.facts, response_time);
        let store = storable(&self.facts, &meta.facts);
        let fits = meta
            .content_length
            .is_none_or(|n| n <= cfg.max_object_bytes);
        // A response with no freshness at all is not shared with waiting
        // requests either: using it for them would be using a stale
        // response. Nor is one that was stale when the upstream sent it (an
        // Age or a Date older than its lifetime).
        let mut cacheable = store.is_ok()
            && fits
            && (lifetime > 0 || meta.facts.cc.stale_while_revalidate.is_some())
            && !stale_on_arrival(&meta.facts, lifetime, response_time);
        // Except an error (5xx) that only its status or its lack of
        // freshness keeps out of the cache: it is the origin's answer to the
        // requests waiting, as a failed connection's 502 would be, and
        // sending them on one by one would turn the herd loose on an origin
        // that is failing. Not stored, and not remembered as uncacheable:
        // the next miss asks again (collapsed), so a recovering origin
        // still sees one request per herd.
        let error_shared = !cacheable
            && rhead.code >= 500
            && fits
            && matches!(store, Ok(()) | Err("not-cacheable-status"));
        if error_shared {
            self.fill.set_source(Source::Unstored);
        } else if !cacheable {
            cache
                .collapse
                .mark_uncacheable(self.fill.key, Instant::now() + cfg.hit_for_miss);
        }
        let mut shared = cacheable || error_shared;
        let timing = Timing::new(&meta.facts, request_time, response_time);
        // The fill's readers send the corrected initial age (RFC 9111
        // §4.2.3: the origin's Age plus the response delay, or the apparent
        // age from Date), not the origin's Age alone.
        if timing.initial_age > 0 {
            meta.facts.age = Some(timing.initial_age);
        }
        let vary = vary_values(&self.request, &self.head, &meta.vary);
        meta.request_vary = vary.clone();
        meta.target = self.head.target(&self.request).to_vec();
        let meta = Arc::new(meta);
        self.start(meta.clone(), shared);
        if error_shared {
            // Requests that must revalidate still collapse onto one fetch.
            self.hold_refreshes();
        }
        ubuf.consume(rhead.head_len);
        let up_close = rhead.close;
        let mut body = BodyReader::new(rhead.body());
        loop {
            if !shared && !self.paced().await {
                return Err(UpstreamFail::ClientGone);
            }
            match body.next(&mut up, &mut ubuf, pool.cfg.body_timeout).await {
                Ok(Some(n)) => {
                    self.push(Arc::from(&ubuf.filled()[..n]));
                    ubuf.consume(n);
                    if shared && self.fill.bytes() > cfg.max_object_bytes {
                        cacheable = false;
                        shared = false;
                        self.demote();
                        cache
                            .collapse
                            .mark_uncacheable(self.fill.key, Instant::now() + cfg.hit_for_miss);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // Counts towards the backend's ejection, as before a head.
                    pool.body_failed(backend, rhead.code);
                    return Err(UpstreamFail::Bad(e.to_string()));
                }
            }
        }
        self.finish();
        pool.completed(backend, rhead.code);
        if body.reusable() && !up_close && ubuf.is_empty() {
            pool.checkin(backend, up, Instant::now());
        }
        if cacheable {
            if let Some(body) = self.fill.body() {
                let mut obj = Object {
                    meta: Meta::for_storage(meta),
                    body: Arc::new(body),
                    timing,
                    lifetime,
                    vary_values: vary,
                    variant_of: None,
                };
                // Served either way; not stored if a purge came meanwhile.
                let slot = cache.place(self.key, &mut obj);
                if cache.insert_fetched(generation, slot, obj) {
                    ShardCache::bump(&cache.stored);
                    cache.collapse.forget_uncacheable(self.fill.key);
                }
            }
        }
        Ok(())
    }
}

/// Whether a reader's answer joined another request's fetch (its
/// Cache-Status says `collapsed`, `corral_collapsed_total` counts it): a
/// reader not first; the first reader of a fetch relayed from another shard
/// (of the origin's answer, or a refreshed or stored copy); the first
/// reader of a fill that found the response stored by another shard's
/// fetch meanwhile. Not a relayed error or stale-if-error answer, which
/// says what it is instead.
fn joined(first: bool, fill: &Fill) -> bool {
    !first
        || matches!(fill.source(), Source::Stored)
        || (fill.relayed() && matches!(fill.source(), Source::Origin | Source::Refreshed))
}

/// The key a fill for `obj`, stored for `key`, collapses under: `key`, or
/// for a variant stored under its own key, that variant's.
fn fill_key_of(key: u64, obj: &Object) -> u64 {
    match obj.variant_of {
        Some(_) => crate::cache::variant_key(key, &obj.vary_values),
        None => key,
    }
}
