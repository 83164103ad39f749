//! A cached response: the end-to-end header fields to replay, the body, and
//! what RFC 9111 needs to judge it later; how it is built from an upstream
//! head and how a hit is written. Pure.

use super::body::{heap, Body};
use super::policy::{parse_http_date, CacheControl, ResponseFacts, Timing};
use crate::http::request::RequestHead;
use crate::http::response::ResponseHead;
use crate::http::{list_elements, name_is, push_decimal, push_signed};
use std::sync::Arc;

/// The cacheable description of a response, known once its head arrived.
#[derive(Debug, Clone)]
pub struct Meta {
    pub status: u16,
    pub reason: Vec<u8>,
    /// `Name: value\r\n` lines: every end-to-end field except the framing
    /// ones and `Age` (re-computed on every hit).
    pub fields: Vec<u8>,
    pub facts: ResponseFacts,
    pub etag: Option<Vec<u8>>,
    /// The body length, when the origin gave one.
    pub content_length: Option<u64>,
    /// Lower-cased request field names from `Vary`.
    pub vary: Vec<Vec<u8>>,
    /// The fetching request's values of those fields: a request with other
    /// values must not be given this response (even while it streams).
    pub request_vary: Vec<Option<Vec<u8>>>,
    /// The request target it answers (for purging by path).
    pub target: Vec<u8>,
    /// The response's `Set-Cookie`, `Proxy-Authenticate` and
    /// `Proxy-Authentication-Info` lines, apart from `fields`: they go to
    /// the client whose request fetched the response and never into the
    /// cache (a stored copy carries none; RFC 9111 §3.1 for the proxy
    /// fields), so one client's cookie is never handed to the others (see
    /// [`Meta::for_storage`]).
    pub fetcher_fields: Vec<u8>,
}

/// A plain 200 `Meta` for tests of the modules that carry one.
#[cfg(test)]
pub fn test_meta() -> Arc<Meta> {
    Arc::new(Meta {
        status: 200,
        reason: b"OK".to_vec(),
        fields: Vec::new(),
        facts: Default::default(),
        etag: None,
        content_length: None,
        vary: Vec::new(),
        request_vary: Vec::new(),
        target: Vec::new(),
        fetcher_fields: Vec::new(),
    })
}

/// A stored response.
#[derive(Debug, Clone)]
pub struct Object {
    pub meta: Arc<Meta>,
    /// The body; from [`body::FILE_MIN`] bytes kept in a memory file that
    /// hits send with sendfile.
    pub body: Arc<Body>,
    pub timing: Timing,
    pub lifetime: u64,
    /// The request's values of the `Vary` fields, in `meta.vary` order: a
    /// request matches this object only with the same values.
    pub vary_values: Vec<Option<Vec<u8>>>,
    /// Stored under a secondary key (`super::variant_key`): the primary
    /// key it is a variant of.
    pub variant_of: Option<u64>,
}

/// A request's values for the named fields (several fields joined by ", ").
/// A field the request's `Connection` names counts as absent: it is not
/// forwarded (hop-by-hop), so the response fetched is the one for its
/// absence, and must not be stored as the answer to its value.
pub fn vary_values(buf: &[u8], req: &RequestHead, names: &[Vec<u8>]) -> Vec<Option<Vec<u8>>> {
    let hop: Vec<&[u8]> = req
        .fields
        .iter()
        .filter(|f| name_is(f.name(buf), b"connection"))
        .flat_map(|f| list_elements(f.value(buf)))
        .collect();
    names
        .iter()
        .map(|n| {
            let mut v: Option<Vec<u8>> = None;
            if hop.iter().any(|h| h.eq_ignore_ascii_case(n)) {
                return v;
            }
            for f in req.fields.iter().filter(|f| name_is(f.name(buf), n)) {
                let out = v.get_or_insert_with(Vec::new);
                if !out.is_empty() {
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(crate::http::trim_ows(f.value(buf)));
            }
            v
        })
        .collect()
}

/// What the store's index spends per entry besides the object: the slab
/// slot's own fields, the hash map's slot and control byte, the queue
/// reference, with allowance for the tables' spare room.
const ENTRY_OVERHEAD: usize = 128;

impl Meta {
    /// Bytes it holds: the struct (in its `Arc`) and what it points to.
    pub fn footprint(&self) -> usize {
        let vec = std::mem::size_of::<Vec<u8>>();
        heap(std::mem::size_of::<Meta>() + 2 * std::mem::size_of::<usize>())
            + heap(self.reason.capacity())
            + heap(self.fields.capacity())
            + self.etag.as_ref().map_or(0, |e| heap(e.capacity()))
            + heap(self.vary.capacity() * vec)
            + self.vary.iter().map(|v| heap(v.capacity())).sum::<usize>()
            + heap(self.request_vary.capacity() * std::mem::size_of::<Option<Vec<u8>>>())
            + self
                .request_vary
                .iter()
                .flatten()
                .map(|v| heap(v.capacity()))
                .sum::<usize>()
            + heap(self.target.capacity())
            + heap(self.fetcher_fields.capacity())
    }

    /// The copy the cache keeps: without the fetching client's fields.
    pub fn for_storage(meta: Arc<Meta>) -> Arc<Meta> {
        if meta.fetcher_fields.is_empty() {
            return meta;
        }
        let mut m = (*meta).clone();
        m.fetcher_fields = Vec::new();
        Arc::new(m)
    }
}

impl Object {
    /// Bytes it costs in the store: what it really holds in memory (the
    /// allocations' sizes, not the lengths; a memory file's whole pages),
    /// so that `--cache-size` bounds the process's memory, not only the
    /// bodies'.
    pub fn cost(&self) -> u64 {
        let values = heap(self.vary_values.capacity() * std::mem::size_of::<Option<Vec<u8>>>())
            + self
                .vary_values
                .iter()
                .flatten()
                .map(|v| heap(v.capacity()))
                .sum::<usize>();
        (self.body.footprint()
            + self.meta.footprint()
            + values
            + std::mem::size_of::<Object>()
            + ENTRY_OVERHEAD) as u64
    }
}

/// Fields never replayed from the cache: hop-by-hop and framing fields, and
/// `Age`, which the cache writes itself.
fn skip_stored(name: &[u8]) -> bool {
    crate::http::rewrite::HOP_BY_HOP
        .iter()
        .chain([&b"content-length"[..], &b"age"[..]].iter())
        .any(|s| name_is(name, s))
}

/// Fields for the client whose request fetched the response only
/// ([`Meta::fetcher_fields`]).
fn for_fetcher(name: &[u8]) -> bool {
    name_is(name, b"set-cookie")
        || name_is(name, b"proxy-authenticate")
        || name_is(name, b"proxy-authentication-info")
}

/// Extracts the cache's view of an upstream response head.
pub fn meta_from_response(buf: &[u8], head: &ResponseHead) -> Meta {
    let mut facts = ResponseFacts {
        status: head.code,
        ..Default::default()
    };
    let mut cc_values: Vec<&[u8]> = Vec::new();
    let mut fields = Vec::with_capacity(256);
    let mut etag = None;
    let mut connection_named: Vec<&[u8]> = Vec::new();
    for f in &head.fields {
        if name_is(f.name(buf), b"connection") {
            connection_named.extend(list_elements(f.value(buf)));
        }
    }
    let mut content_length = None;
    let mut vary = Vec::new();
    let mut fetcher_fields = Vec::new();
    for f in &head.fields {
        let (name, value) = (f.name(buf), f.value(buf));
        if name_is(name, b"cache-control") {
            cc_values.push(value);
        } else if name_is(name, b"expires") {
            // The first Expires counts (RFC 9111 §4.2.1).
            if facts.expires.is_none() && !facts.expires_invalid {
                match parse_http_date(value) {
                    Some(t) => facts.expires = Some(t),
                    None => facts.expires_invalid = true,
                }
            }
        } else if name_is(name, b"date") {
            match parse_http_date(value) {
                Some(t) if facts.date.is_none() => facts.date = Some(t),
                // Not a date, or a second one: not stored. Without a valid
                // one the fill dates the response on arrival (RFC 9110
                // §6.6.1), so what is stored has one Date line.
                _ => continue,
            }
        } else if name_is(name, b"age") {
            // Capped at 2^31 like every delta-seconds (§1.2.2): a huge Age
            // must make the response stale, not wrap the arithmetic.
            facts.age = super::policy::delta_seconds(crate::http::trim_ows(value));
        } else if name_is(name, b"last-modified") {
            // The first valid one counts (a second, broken line must not
            // take heuristic freshness and If-Modified-Since away).
            if facts.last_modified.is_none() {
                facts.last_modified = parse_http_date(value);
            }
        } else if name_is(name, b"etag") {
            // The first is the one compared (as Date and Expires).
            facts.has_etag = true;
            if etag.is_none() {
                etag = Some(value.to_vec());
            }
        } else if name_is(name, b"set-cookie") {
            facts.has_set_cookie = true;
        } else if name_is(name, b"vary") {
            for v in list_elements(value) {
                if v == b"*" {
                    facts.vary_star = true;
                } else {
                    vary.push(v.to_ascii_lowercase());
                }
            }
        } else if name_is(name, b"content-length") {
            content_length = crate::http::parse_content_length(value);
        }
        if skip_stored(name)
            || connection_named
                .iter()
                .any(|c| c.eq_ignore_ascii_case(name))
        {
            continue;
        }
        let out = if for_fetcher(name) {
            &mut fetcher_fields
        } else {
            &mut fields
        };
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    facts.cc = CacheControl::parse(cc_values);
    // Kept as long as the object: no spare room (it counts in the budget).
    fields.shrink_to_fit();
    Meta {
        status: head.code,
        reason: head.reason(buf).to_vec(),
        fields,
        facts,
        etag,
        vary,
        request_vary: Vec::new(),
        target: Vec::new(),
        fetcher_fields,
        // A Transfer-Encoding overrides any Content-Length (RFC 9112
        // §6.3): the body was chunked or runs to the close, whatever
        // length the backend also claimed.
        content_length: match head.body() {
            crate::http::BodyKind::Chunked | crate::http::BodyKind::Close => None,
            _ => content_length,
        },
    }
}

/// How a client request may be answered with 304 from a stored response
/// (RFC 9110 §13.1.2 and §13.1.3): `If-None-Match` wins over
/// `If-Modified-Since`, which is compared with the stored Last-Modified,
/// or without one with the stored Date (RFC 9111 §4.3.2).
pub fn not_modified(buf: &[u8], req: &RequestHead, meta: &Meta) -> bool {
    conditional_not_modified(
        buf,
        req,
        meta.etag.as_deref(),
        meta.facts.last_modified.or(meta.facts.date),
    )
}

/// The same for any representation with these validators (the origin
/// store's files too). Every `If-None-Match` line counts (a list may be
/// split over several); `*` matches any representation there is.
pub fn conditional_not_modified(
    buf: &[u8],
    req: &RequestHead,
    etag: Option<&[u8]>,
    last_modified: Option<i64>,
) -> bool {
    // Weak comparison: W/"x" matches "x".
    let mine = etag.map(|t| t.strip_prefix(b"W/").unwrap_or(t));
    let weak_match = |t: &[u8]| t == b"*" || Some(t.strip_prefix(b"W/").unwrap_or(t)) == mine;
    match condition(buf, req, b"if-none-match", b"if-modified-since", weak_match) {
        Condition::Tags(matched) => matched,
        Condition::Date(since) => last_modified.is_some_and(|lm| lm <= since),
        Condition::Absent => false,
    }
}

/// Whether `If-Match` or `If-Unmodified-Since` fails for a representation
/// with these validators (RFC 9110 §13.1.1, §13.1.4, evaluated first,
/// §13.2.2): then the answer is 412, not the representation. `If-Match`
/// compares strongly (a weak tag never matches; `*` matches whatever is
/// there); `If-Unmodified-Since` counts only without `If-Match`, when it is
/// exactly one valid date and the last modification is known.
pub fn precondition_fails(
    buf: &[u8],
    req: &RequestHead,
    etag: Option<&[u8]>,
    last_modified: Option<i64>,
) -> bool {
    let strong = etag.filter(|t| !t.starts_with(b"W/"));
    let strong_match = |t: &[u8]| t == b"*" || Some(t) == strong;
    match condition(buf, req, b"if-match", b"if-unmodified-since", strong_match) {
        Condition::Tags(matched) => !matched,
        Condition::Date(since) => last_modified.is_some_and(|lm| lm > since),
        Condition::Absent => false,
    }
}

/// What a pair of preconditions asks (RFC 9110 §13.1: a tag list, and a
/// date that counts only without it).
enum Condition {
    /// Some line of the tag list was given; whether a member matched.
    Tags(bool),
    /// No tag list; exactly one line of the date field, a valid date (more
    /// than one line, or not a date, is ignored: §13.1.3, §13.1.4).
    Date(i64),
    Absent,
}

fn condition(
    buf: &[u8],
    req: &RequestHead,
    tags: &[u8],
    date: &[u8],
    matches: impl Fn(&[u8]) -> bool,
) -> Condition {
    let mut listed = false;
    let mut matched = false;
    let mut dates: Option<&[u8]> = None;
    let mut date_lines = 0;
    for f in &req.fields {
        if name_is(f.name(buf), tags) {
            listed = true;
            matched |= entity_tags(f.value(buf)).any(&matches);
        } else if name_is(f.name(buf), date) {
            dates = Some(f.value(buf));
            date_lines += 1;
        }
    }
    if listed {
        return Condition::Tags(matched);
    }
    match dates.filter(|_| date_lines == 1).and_then(parse_http_date) {
        Some(since) => Condition::Date(since),
        None => Condition::Absent,
    }
}

/// The members of an `If-None-Match` list: `*` or entity-tags, each with
/// its `W/`. An entity-tag may hold a comma inside its quotes (RFC 9110
/// §8.8.3), so the list is not split at every comma.
fn entity_tags(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = value;
    std::iter::from_fn(move || loop {
        while let [b' ' | b'\t' | b',', tail @ ..] = rest {
            rest = tail;
        }
        if rest.is_empty() {
            return None;
        }
        let open = if rest.starts_with(b"W/\"") {
            Some(2)
        } else if rest.starts_with(b"\"") {
            Some(0)
        } else {
            None
        };
        let end = match open {
            Some(q) => match memchr::memchr(b'"', &rest[q + 1..]) {
                Some(i) => q + 1 + i + 1,
                None => rest.len(),
            },
            // Not an entity-tag (`*`, or something malformed): up to the
            // next comma.
            None => memchr::memchr(b',', rest).unwrap_or(rest.len()),
        };
        let (item, tail) = rest.split_at(end);
        rest = tail;
        let item = crate::http::trim_ows(item);
        if !item.is_empty() {
            return Some(item);
        }
    })
}

/// Merges the fields of a 304 into a stored header block (RFC 9111
/// §4.3.4): every field the 304 carries replaces the stored ones of that
/// name; the others stay.
pub fn merge_fields(stored: &[u8], update: &[u8]) -> Vec<u8> {
    let name_of = |line: &[u8]| -> Vec<u8> {
        let end = memchr::memchr(b':', line).unwrap_or(line.len());
        line[..end].to_ascii_lowercase()
    };
    let lines = |block: &[u8]| -> Vec<Vec<u8>> {
        block
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let mut v = l.to_vec();
                v.push(b'\n');
                v
            })
            .collect()
    };
    let new_lines = lines(update);
    let replaced: Vec<Vec<u8>> = new_lines.iter().map(|l| name_of(l)).collect();
    let mut out = Vec::with_capacity(stored.len() + update.len());
    for l in lines(stored) {
        if !replaced.contains(&name_of(&l)) {
            out.extend_from_slice(&l);
        }
    }
    for l in new_lines {
        out.extend_from_slice(&l);
    }
    out
}

/// A single byte range asked for by `Range: bytes=...` (RFC 9110 §14.1.2),
/// resolved against a representation of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable Range: send the whole body (also for multiple ranges, and
    /// when `If-Range` is present, which corral answers in full).
    Whole,
    /// `first..=last`.
    Part(u64, u64),
    /// 416.
    Unsatisfiable,
}

pub fn range_ask(buf: &[u8], req: &RequestHead, len: u64) -> RangeAsk {
    let mut range = None;
    for f in &req.fields {
        if name_is(f.name(buf), b"if-range") {
            return RangeAsk::Whole;
        }
        if name_is(f.name(buf), b"range") {
            if range.is_some() {
                // Two field lines make one list: several ranges, which
                // are answered whole (the last one used to win).
                return RangeAsk::Whole;
            }
            range = Some(crate::http::trim_ows(f.value(buf)));
        }
    }
    // The unit is case-insensitive (RFC 9110 §14.1).
    let Some(spec) = range
        .filter(|r| r.len() >= 6 && r[..6].eq_ignore_ascii_case(b"bytes="))
        .map(|r| &r[6..])
    else {
        return RangeAsk::Whole;
    };
    if spec.contains(&b',') {
        return RangeAsk::Whole;
    }
    let Some(dash) = memchr::memchr(b'-', spec) else {
        return RangeAsk::Whole;
    };
    // Digits beyond u64 saturate: a position past any length (416 as a
    // first byte, the end as a last one, the whole as a suffix).
    let num = |s: &[u8]| -> Option<u64> {
        let s = crate::http::trim_ows(s);
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(s.iter().fold(0u64, |n, d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        }))
    };
    let (a, b) = (&spec[..dash], &spec[dash + 1..]);
    match (num(a), num(b), a.is_empty()) {
        // bytes=-N: the last N bytes.
        (None, Some(n), true) => {
            if n == 0 || len == 0 {
                RangeAsk::Unsatisfiable
            } else {
                RangeAsk::Part(len.saturating_sub(n), len - 1)
            }
        }
        (Some(first), last, false) if b.is_empty() || last.is_some() => {
            if last.is_some_and(|l| l < first) {
                // Not a valid range at all (§14.1.1): ignored.
                return RangeAsk::Whole;
            }
            if first >= len {
                return RangeAsk::Unsatisfiable;
            }
            RangeAsk::Part(first, last.map_or(len - 1, |l| l.min(len - 1)))
        }
        _ => RangeAsk::Whole,
    }
}

/// Writes the head of a response served from the cache.
pub struct HitHead<'a> {
    pub meta: &'a Meta,
    /// 200 (or the stored status), or 304 for a conditional hit.
    pub status: u16,
    pub age: u64,
    /// `Cache-Status` parameters after `corral; `.
    pub cache_status: &'a str,
    /// Written after them as `; ttl=N` (hits), then `status_tail`.
    pub ttl: Option<i64>,
    pub status_tail: &'a str,
    /// The body length, or `None` to send a chunked body.
    pub length: Option<u64>,
    pub close: bool,
    pub client_minor: u8,
    /// Extra field lines (e.g. `Content-Range`), each ending in CRLF.
    pub extra: &'a str,
    /// Lines for this client only (the one whose request fetched the
    /// response: [`Meta::fetcher_fields`]), each ending in CRLF.
    pub fetcher_fields: &'a [u8],
}

impl HitHead<'_> {
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, u64::from(self.status));
        out.push(b' ');
        if self.status == self.meta.status && !self.meta.reason.is_empty() {
            out.extend_from_slice(&self.meta.reason);
        } else {
            out.extend_from_slice(crate::http::reason_phrase(self.status).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.meta.fields);
        out.extend_from_slice(b"Age: ");
        push_decimal(out, self.age);
        out.extend_from_slice(b"\r\nCache-Status: corral; ");
        out.extend_from_slice(self.cache_status.as_bytes());
        if let Some(ttl) = self.ttl {
            out.extend_from_slice(b"; ttl=");
            push_signed(out, ttl);
        }
        out.extend_from_slice(self.status_tail.as_bytes());
        out.extend_from_slice(b"\r\nVia: 1.1 corral\r\n");
        out.extend_from_slice(self.extra.as_bytes());
        out.extend_from_slice(self.fetcher_fields);
        if self.status != 304 && self.status != 204 {
            match self.length {
                Some(n) => {
                    out.extend_from_slice(b"Content-Length: ");
                    push_decimal(out, n);
                    out.extend_from_slice(b"\r\n");
                }
                None if self.client_minor >= 1 => {
                    out.extend_from_slice(b"Transfer-Encoding: chunked\r\n")
                }
                None => {}
            }
        }
        crate::http::push_connection(out, self.close, self.client_minor);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::request::{parse_request, HeadLimits};
    use crate::http::response::parse_response;

    /// A parsed request head.
    fn request(req: &[u8]) -> RequestHead {
        let lim = HeadLimits {
            max_header_bytes: 8192,
            max_headers: 50,
            max_uri_bytes: 1024,
        };
        let mut h = RequestHead::default();
        assert!(parse_request(req, &lim, &mut h).unwrap());
        h
    }

    fn meta(resp: &[u8]) -> Meta {
        let mut h = ResponseHead::default();
        assert!(parse_response(resp, false, 65536, &mut h).unwrap());
        meta_from_response(resp, &h)
    }

    fn object(meta: Meta, body: Vec<u8>) -> Object {
        let meta_facts = meta.facts.clone();
        Object {
            meta: Arc::new(meta),
            body: Arc::new(Body::new(body)),
            timing: Timing::new(&meta_facts, 0, 0),
            lifetime: 60,
            vary_values: Vec::new(),
            variant_of: None,
        }
    }

    #[test]
    fn a_url_s_variant_index_stays_bounded_by_its_live_variants() {
        // One URL stored under ever new Vary values in a cache that holds
        // few of them: the index of its variants keeps up with evictions
        // (and a variant in another partition than its URL's is kept).
        use crate::cache::{Partitions, ShardCache};
        let parts = Arc::new(Partitions::new(64 << 10, 2));
        let cache = ShardCache::new(0, parts.clone(), 64 << 10);
        let head = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nVary: X-V\r\nContent-Length: 500\r\n\r\n";
        let primary = 7u64;
        let mut keys = Vec::new();
        for i in 0..2000u32 {
            let mut o = object(meta(head), vec![b'x'; 500]);
            let values = vec![Some(i.to_string().into_bytes())];
            let vk = parts.variant_key(primary, &values);
            o.vary_values = values;
            o.variant_of = Some(primary);
            assert!(cache.insert(vk, o));
            keys.push(vk);
        }
        let live = keys
            .iter()
            .filter(|k| cache.lookup(**k, 0).is_some())
            .count();
        let noted = parts.variants_noted(primary);
        assert!(live > 0 && live < 200, "{live}");
        assert!(
            noted >= live && noted <= 2 * live.max(64),
            "{noted} for {live}"
        );
    }

    #[test]
    fn removing_a_revalidated_copy_spares_a_newer_one() {
        // A 304 path drops the copy it revalidated, not one stored since.
        use crate::cache::{Partitions, ShardCache};
        let cache = ShardCache::new(0, Arc::new(Partitions::new(1 << 20, 1)), 1 << 20);
        let head = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 3\r\n\r\n";
        let old = object(meta(head), b"old".to_vec());
        let new = object(meta(head), b"new".to_vec());
        assert!(cache.insert(7, old.clone()));
        assert!(cache.insert(7, new.clone()));
        assert!(!cache.remove_if_still(7, &old));
        assert_eq!(&cache.find(7, 0, |_| Vec::new()).unwrap().body[..], b"new");
        assert!(cache.remove_if_still(7, &new));
        assert!(cache.find(7, 0, |_| Vec::new()).is_err());
    }

    #[test]
    fn an_objects_cost_is_what_it_holds() {
        let head = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nETag: \"v1\"\r\nContent-Length: 1024\r\n\r\n";
        let m = meta(head);
        // The fields are kept without spare room.
        assert_eq!(m.fields.capacity(), m.fields.len());
        let small = object(m.clone(), vec![b'x'; 1024]);
        let cost = small.cost() as usize;
        // At least every byte it points to, plus the structs and the index.
        assert!(
            cost >= 1024
                + m.fields.len()
                + m.reason.len()
                + 4
                + std::mem::size_of::<Meta>()
                + ENTRY_OVERHEAD
        );
        // And not wildly more: under twice the body for a 1 KiB object.
        assert!(cost < 2048, "{cost}");
        // A memory-file body costs whole pages.
        let big = object(m, vec![b'y'; super::super::body::FILE_MIN + 1]);
        if big.body.file().is_some() {
            let pages = (super::super::body::FILE_MIN + 1).div_ceil(4096) * 4096;
            assert!(big.cost() as usize >= pages);
        }
    }

    #[test]
    fn stored_fields_skip_hop_by_hop_and_age() {
        let m = meta(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nAge: 5\r\nConnection: X-A\r\nX-A: 1\r\nContent-Length: 3\r\nETag: \"v1\"\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nX-Keep: y\r\n\r\n");
        let f = String::from_utf8(m.fields.clone()).unwrap();
        assert_eq!(
            f,
            "Cache-Control: max-age=60\r\nETag: \"v1\"\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nX-Keep: y\r\n"
        );
        assert_eq!(m.facts.cc.max_age, Some(60));
        assert_eq!(m.facts.age, Some(5));
        assert_eq!(m.facts.date, Some(784_111_777));
        assert_eq!(m.etag.as_deref(), Some(&b"\"v1\""[..]));
        assert_eq!(m.content_length, Some(3));
    }

    #[test]
    fn a_transfer_encoding_overrides_the_stored_length() {
        // (A coding other than chunked is a 502 before anything is stored.)
        let m = meta(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(m.content_length, None);
        let m = meta(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(m.content_length, Some(5));
    }

    #[test]
    fn a_huge_age_is_capped_and_the_first_expires_counts() {
        let m = meta(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nAge: 18446744073709551615\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(m.facts.age, Some(1 << 31));
        let t = Timing::new(&m.facts, 100, 101);
        assert!(t.current_age(102) > 60, "a huge Age makes it stale");
        let m =
            meta(b"HTTP/1.1 200 OK\r\nAge: 99999999999999999999999\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(m.facts.age, Some(1 << 31));
        let m = meta(b"HTTP/1.1 200 OK\r\nExpires: Sun, 06 Nov 1994 08:49:37 GMT\r\nExpires: Sun, 06 Nov 2094 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(m.facts.expires, Some(784_111_777));
    }

    #[test]
    fn conditionals() {
        let m = meta(b"HTTP/1.1 200 OK\r\nETag: W/\"v1\"\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n");
        let check = |req: &[u8]| not_modified(req, &request(req), &m);
        assert!(check(
            b"GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"x\", \"v1\"\r\n\r\n"
        ));
        assert!(check(
            b"GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: *\r\n\r\n"
        ));
        assert!(!check(b"GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"v2\"\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n"));
        assert!(check(b"GET / HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n"));
        assert!(!check(b"GET / HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: Sat, 05 Nov 1994 08:49:37 GMT\r\n\r\n"));
        assert!(!check(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        // A list split over two lines.
        assert!(check(
            b"GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"x\"\r\nIf-None-Match: W/\"v1\"\r\n\r\n"
        ));
        // Two If-Modified-Since lines are no valid date: ignored.
        assert!(!check(b"GET / HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n"));
    }

    #[test]
    fn a_field_named_in_connection_is_absent_for_vary() {
        // It is not forwarded, so the response is the one for its absence.
        let names = vec![b"origin".to_vec(), b"accept-language".to_vec()];
        let req = b"GET / HTTP/1.1\r\nHost: a\r\nOrigin: https://app\r\nAccept-Language: fr\r\nConnection: keep-alive, Origin\r\n\r\n";
        assert_eq!(
            vary_values(req, &request(req), &names),
            vec![None, Some(b"fr".to_vec())]
        );
        let req = b"GET / HTTP/1.1\r\nHost: a\r\nOrigin: https://app\r\n\r\n";
        assert_eq!(
            vary_values(req, &request(req), &names),
            vec![Some(b"https://app".to_vec()), None]
        );
    }

    #[test]
    fn if_match_and_if_unmodified_since() {
        let m = meta(b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n");
        let weak = meta(b"HTTP/1.1 200 OK\r\nETag: W/\"v1\"\r\nContent-Length: 0\r\n\r\n");
        let fails = |m: &Meta, fields: &str| {
            let req = format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
            let h = request(req.as_bytes());
            precondition_fails(req.as_bytes(), &h, m.etag.as_deref(), m.facts.last_modified)
        };
        assert!(!fails(&m, ""));
        assert!(!fails(&m, "If-Match: \"v0\", \"v1\"\r\n"));
        assert!(!fails(&m, "If-Match: *\r\n"));
        assert!(fails(&m, "If-Match: \"v2\"\r\n"));
        // Strong comparison: weak tags never match.
        assert!(fails(&m, "If-Match: W/\"v1\"\r\n"));
        assert!(fails(&weak, "If-Match: W/\"v1\"\r\n"));
        assert!(!fails(&weak, "If-Match: *\r\n"));
        // If-Unmodified-Since: modified after it fails; If-Match wins.
        assert!(!fails(
            &m,
            "If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        ));
        assert!(fails(
            &m,
            "If-Unmodified-Since: Sat, 05 Nov 1994 08:49:37 GMT\r\n"
        ));
        assert!(!fails(
            &m,
            "If-Match: \"v1\"\r\nIf-Unmodified-Since: Sat, 05 Nov 1994 08:49:37 GMT\r\n"
        ));
        assert!(!fails(&m, "If-Unmodified-Since: yesterday\r\n"));
    }

    #[test]
    fn entity_tag_lists_keep_commas_inside_quotes() {
        let tags: Vec<&[u8]> = entity_tags(b" \"a,b\" , W/\"c\",*,, \"d").collect();
        assert_eq!(tags, vec![&b"\"a,b\""[..], b"W/\"c\"", b"*", b"\"d"]);
        let m = meta(
            b"HTTP/1.1 200 OK\r\nETag: \"a,b\"\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n",
        );
        let check = |req: &[u8]| not_modified(req, &request(req), &m);
        assert!(check(
            b"GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"a,b\"\r\n\r\n"
        ));
        assert!(!check(
            b"GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"a\", \"b\"\r\n\r\n"
        ));
        // Without Last-Modified, If-Modified-Since is compared with Date
        // (RFC 9111 §4.3.2).
        assert!(check(b"GET / HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n"));
        assert!(!check(b"GET / HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:36 GMT\r\n\r\n"));
        // `*` matches whatever the stored response's validators.
        let bare = meta(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let req = b"GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: *\r\n\r\n";
        assert!(not_modified(req, &request(req), &bare));
    }

    #[test]
    fn the_first_validators_count_and_fetcher_fields_stay_apart() {
        let m = meta(
            b"HTTP/1.1 200 OK\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
              Last-Modified: not a date\r\nETag: \"a\"\r\nETag: \"b\"\r\n\
              Set-Cookie: s=1\r\nProxy-Authenticate: Basic\r\nX-Other: y\r\n\
              Content-Length: 0\r\n\r\n",
        );
        assert_eq!(m.facts.last_modified, Some(784111777));
        assert_eq!(m.etag.as_deref(), Some(&b"\"a\""[..]));
        assert!(m.facts.has_set_cookie);
        assert_eq!(
            String::from_utf8_lossy(&m.fetcher_fields),
            "Set-Cookie: s=1\r\nProxy-Authenticate: Basic\r\n"
        );
        let fields = String::from_utf8_lossy(&m.fields);
        assert!(!fields.contains("Set-Cookie") && !fields.contains("Proxy-Auth"));
        assert!(fields.contains("X-Other: y\r\n"));
    }

    #[test]
    fn merging_a_304() {
        let stored = b"Cache-Control: max-age=1\r\nETag: \"a\"\r\nX-Old: 1\r\n";
        let update = b"Cache-Control: max-age=60\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n";
        assert_eq!(
            String::from_utf8(merge_fields(stored, update)).unwrap(),
            "ETag: \"a\"\r\nX-Old: 1\r\nCache-Control: max-age=60\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        );
    }

    #[test]
    fn ranges() {
        let ask = |r: &str| {
            let req = format!("GET / HTTP/1.1\r\nHost: a\r\n{r}\r\n");
            range_ask(req.as_bytes(), &request(req.as_bytes()), 100)
        };
        assert_eq!(ask(""), RangeAsk::Whole);
        assert_eq!(ask("Range: bytes=0-9\r\n"), RangeAsk::Part(0, 9));
        assert_eq!(ask("Range: bytes=90-\r\n"), RangeAsk::Part(90, 99));
        assert_eq!(ask("Range: bytes=90-500\r\n"), RangeAsk::Part(90, 99));
        assert_eq!(ask("Range: bytes=-10\r\n"), RangeAsk::Part(90, 99));
        assert_eq!(ask("Range: bytes=-500\r\n"), RangeAsk::Part(0, 99));
        assert_eq!(ask("Range: bytes=100-\r\n"), RangeAsk::Unsatisfiable);
        assert_eq!(ask("Range: bytes=0-1,5-6\r\n"), RangeAsk::Whole);
        assert_eq!(ask("Range: bytes=5-1\r\n"), RangeAsk::Whole);
        assert_eq!(ask("Range: items=0-1\r\n"), RangeAsk::Whole);
        // The unit in any case; positions beyond u64; an invalid range
        // (last before first) past the end is ignored, not a 416.
        assert_eq!(ask("Range: Bytes=0-9\r\n"), RangeAsk::Part(0, 9));
        assert_eq!(ask("Range: BYTES=-5\r\n"), RangeAsk::Part(95, 99));
        assert_eq!(
            ask("Range: bytes=99999999999999999999-\r\n"),
            RangeAsk::Unsatisfiable
        );
        assert_eq!(
            ask("Range: bytes=5-99999999999999999999\r\n"),
            RangeAsk::Part(5, 99)
        );
        assert_eq!(
            ask("Range: bytes=-99999999999999999999\r\n"),
            RangeAsk::Part(0, 99)
        );
        assert_eq!(ask("Range: bytes=200-150\r\n"), RangeAsk::Whole);
        assert_eq!(ask("Range: bytes=\r\n"), RangeAsk::Whole);
        assert_eq!(ask("Range: byte=0-1\r\n"), RangeAsk::Whole);
        assert_eq!(
            ask("Range: bytes=0-1\r\nIf-Range: \"x\"\r\n"),
            RangeAsk::Whole
        );
    }

    #[test]
    fn hit_head() {
        let m = meta(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\n");
        let mut out = Vec::new();
        HitHead {
            meta: &m,
            status: 200,
            age: 7,
            cache_status: "hit",
            ttl: Some(53),
            status_tail: "",
            length: Some(3),
            close: false,
            client_minor: 1,
            extra: "",
            fetcher_fields: b"",
        }
        .write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nAge: 7\r\nCache-Status: corral; hit; ttl=53\r\nVia: 1.1 corral\r\nContent-Length: 3\r\n\r\n"
        );
    }
}
