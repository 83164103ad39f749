//! Request heads (RFC 9112 §2–3, §6): parsing with httparse, then the framing
//! checks that keep a proxy safe from request smuggling. Pure.
//!
//! The parsed head refers to the receive buffer by byte ranges, so parsing
//! allocates nothing per request beyond the reusable header table.

use super::{list_elements, name_is, parse_content_length, trim_ows, BodyKind, ClientError};
use std::mem::MaybeUninit;
use std::ops::Range;

/// httparse needs a fixed header table; `max_headers` is checked against the
/// count and may not exceed this.
pub const HEADER_TABLE: usize = 256;

/// Limits applied while parsing a head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Trace,
    Connect,
    Other,
}

impl Method {
    fn from_bytes(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"PATCH" => Method::Patch,
            b"TRACE" => Method::Trace,
            b"CONNECT" => Method::Connect,
            _ => Method::Other,
        }
    }

    /// RFC 9110 §9.2.2: safe to repeat without changing the outcome.
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }
}

/// One header field as ranges into the buffer the head was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub name: (u32, u32),
    pub value: (u32, u32),
}

impl Field {
    pub fn name<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.name.0 as usize..self.name.1 as usize]
    }
    pub fn value<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.value.0 as usize..self.value.1 as usize]
    }
}

/// A parsed, validated request head.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    /// Length of the head in the buffer, including the final empty line.
    pub head_len: usize,
    pub method: Option<Method>,
    pub method_range: Range<usize>,
    pub target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub fields: Vec<Field>,
    pub body: Option<BodyKind>,
    /// The client asked to close (`Connection: close`, or HTTP/1.0 without
    /// `keep-alive`).
    pub close: bool,
    pub expect_continue: bool,
    /// The authority the request is for: the target's, for an absolute-form
    /// target (RFC 9112 §3.2.2: its `Host` field is then ignored), else the
    /// `Host` field's.
    pub host: Option<Range<usize>>,
    /// For an absolute-form target, its origin-form part (path and query).
    pub origin_form: Option<Range<usize>>,
}

impl RequestHead {
    pub fn method(&self) -> Method {
        self.method.unwrap_or(Method::Other)
    }
    pub fn body(&self) -> BodyKind {
        self.body.unwrap_or(BodyKind::Empty)
    }
    pub fn target<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.target.clone()]
    }
    /// The target in origin form, as it is forwarded: an absolute-form
    /// target's path and query (`/` when it has none). An absolute-form
    /// target with a query but no path (`http://h?q`) gives `?q`: the
    /// writer puts the `/` before it ([`crate::http::rewrite`]).
    pub fn origin_target<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        match &self.origin_form {
            Some(r) if r.is_empty() => b"/",
            Some(r) => &buf[r.clone()],
            None => self.target(buf),
        }
    }
    /// The path part of the target, without query.
    pub fn path<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        path_of(self.origin_target(buf))
    }
    /// The host the request is for, without port and without a trailing
    /// dot (`a.example.` is `a.example`, the DNS root's empty label, as
    /// nginx takes it), lower-cased by the caller when needed.
    pub fn host<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        Some(split_authority(&buf[self.host.clone()?]).0)
    }
}

/// A validated authority ([`valid_authority`]) split into its host,
/// without a trailing dot (`a.example.` is `a.example`, the DNS root's
/// empty label, as nginx takes it), and its port part (`:8080`, `:` or
/// empty), minding IPv6 literals.
pub fn split_authority(a: &[u8]) -> (&[u8], &[u8]) {
    let at = if a.first() == Some(&b'[') {
        memchr::memchr(b']', a).map_or(a.len(), |i| i + 1)
    } else {
        memchr::memrchr(b':', a).unwrap_or(a.len())
    };
    let (host, port) = a.split_at(at);
    (host.strip_suffix(b".").unwrap_or(host), port)
}

/// The path of an origin-form target, without its query (`/` for `?q`).
pub fn path_of(t: &[u8]) -> &[u8] {
    match memchr::memchr(b'?', t) {
        Some(0) => b"/",
        Some(i) => &t[..i],
        None => t,
    }
}

/// Any target in origin form, as [`RequestHead::origin_target`] gives it
/// for a parsed request: `http://h/a?q` → `/a?q`, `http://h` → `/`.
pub fn origin_form(t: &[u8]) -> &[u8] {
    match absolute_form(t) {
        Some((_, rest)) if rest.is_empty() => b"/",
        Some((_, rest)) => &t[rest],
        None => t,
    }
}

/// An absolute-form target's authority and its origin-form rest, as
/// offsets into the target: `http://a.example:8080/x?y` gives `7..23` and
/// `23..27`. `None` for any other form.
fn absolute_form(t: &[u8]) -> Option<(Range<usize>, Range<usize>)> {
    let start = [&b"http://"[..], b"https://"]
        .iter()
        .find(|s| t.len() >= s.len() && t[..s.len()].eq_ignore_ascii_case(s))?
        .len();
    let end = t[start..]
        .iter()
        .position(|&c| c == b'/' || c == b'?')
        .map_or(t.len(), |i| start + i);
    Some((start..end, end..t.len()))
}

/// Whether `v` is `uri-host [":" port]` (RFC 3986 §3.2.2–3.2.3, RFC 9110
/// §7.2): an IP literal in brackets, or a reg-name of unreserved,
/// percent-encoded and sub-delim characters (which covers IPv4), then an
/// optional colon and digits. Empty is valid (RFC 9112 §3.2: a target
/// without an authority is sent with an empty Host).
pub fn valid_authority(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(end) = memchr::memchr(b']', v) else {
            return false;
        };
        let inner = &v[1..end];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || b":.%-_~".contains(&c))
        {
            return false;
        }
        (&v[..0], &v[end + 1..])
    } else {
        match memchr::memchr(b':', v) {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, &v[v.len()..]),
        }
    };
    let reg_name = |c: u8| c.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&c);
    host.iter().all(|&c| reg_name(c))
        && match port.split_first() {
            None => true,
            Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
            Some(_) => false,
        }
}

/// httparse knows HTTP/1.0 and 1.1 only. A later 1.x minor is served as
/// 1.1 (RFC 9112 §2.3: a recipient processes a higher minor version as the
/// highest one it implements, as nginx does), another major version is
/// 505, and a version that is not `HTTP/` DIGIT `.` DIGIT is 400.
fn later_version(
    buf: &[u8],
    limits: &HeadLimits,
    head: &mut RequestHead,
) -> Result<bool, ClientError> {
    // The request line, past the empty lines httparse skips.
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let line_end = memchr::memchr(b'\n', &buf[start..]).map(|i| start + i);
    let line = &buf[start..line_end.unwrap_or(buf.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let at = memchr::memrchr(b' ', line).map_or(0, |i| i + 1);
    let version = &line[at..];
    const SHAPE: &[u8] = b"HTTP/0.0";
    let fits = version.len() <= SHAPE.len()
        && version.iter().zip(SHAPE).all(|(&c, &s)| {
            if s == b'0' {
                c.is_ascii_digit()
            } else {
                c == s
            }
        });
    if !fits {
        return Err(ClientError::BadRequest("invalid HTTP version"));
    }
    if line_end.is_none() {
        // The rest of the line has yet to come (a longer version is 400
        // once it has).
        if buf.len() > limits.max_header_bytes {
            return Err(ClientError::HeaderTooLarge);
        }
        return Ok(false);
    }
    if version.len() != SHAPE.len() {
        return Err(ClientError::BadRequest("invalid HTTP version"));
    }
    if version[5] != b'1' {
        return Err(ClientError::VersionNotSupported);
    }
    if version[7] <= b'1' {
        // 1.0 and 1.1 parse: what httparse took for the version was not
        // the line's last word (a space in the target).
        return Err(ClientError::BadRequest("invalid HTTP version"));
    }
    // The same head with the minor digit made 1: every range parsed from
    // the copy is the same in `buf`.
    let mut copy = buf.to_vec();
    copy[start + at + SHAPE.len() - 1] = b'1';
    parse_request(&copy, limits, head)
}

/// Parses the head at the start of `buf` into `head` (whose field table is
/// reused). `Ok(false)` means the head is incomplete and within limits.
pub fn parse_request(
    buf: &[u8],
    limits: &HeadLimits,
    head: &mut RequestHead,
) -> Result<bool, ClientError> {
    // Left uninitialised: filling 256 empty headers cost more than parsing
    // a small request (httparse writes only the entries it returns).
    let mut table = [const { MaybeUninit::<httparse::Header>::uninit() }; HEADER_TABLE];
    let max = limits.max_headers.min(HEADER_TABLE);
    let mut req = httparse::Request::new(&mut []);
    let status = match req.parse_with_uninit_headers(buf, &mut table[..max]) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(ClientError::HeaderTooLarge),
        Err(httparse::Error::Token) => return Err(ClientError::BadRequest("invalid method token")),
        Err(httparse::Error::Version) => return later_version(buf, limits, head),
        Err(httparse::Error::HeaderName) => {
            return Err(ClientError::BadRequest("invalid header name"))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(ClientError::BadRequest("invalid header value"))
        }
        Err(httparse::Error::NewLine) => {
            return Err(ClientError::BadRequest("invalid line ending"))
        }
        Err(_) => return Err(ClientError::BadRequest("malformed request head")),
    };
    let head_len = match status {
        httparse::Status::Partial => {
            // A request line that alone exceeds the URI limit gets 414, any
            // other oversized head 431.
            if memchr::memchr(b'\n', buf).is_none() && buf.len() > limits.max_uri_bytes + 32 {
                return Err(ClientError::UriTooLong);
            }
            if buf.len() > limits.max_header_bytes {
                return Err(ClientError::HeaderTooLarge);
            }
            return Ok(false);
        }
        httparse::Status::Complete(n) => n,
    };
    let base = buf.as_ptr() as usize;
    let off = |s: &[u8]| s.as_ptr() as usize - base;
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("");
    if path.len() > limits.max_uri_bytes {
        return Err(ClientError::UriTooLong);
    }
    if head_len > limits.max_header_bytes {
        return Err(ClientError::HeaderTooLarge);
    }
    let minor = req.version.unwrap_or(1);
    head.head_len = head_len;
    head.method = Some(Method::from_bytes(method.as_bytes()));
    head.method_range = off(method.as_bytes())..off(method.as_bytes()) + method.len();
    head.target = off(path.as_bytes())..off(path.as_bytes()) + path.len();
    head.minor = minor;
    head.fields.clear();
    head.body = None;
    head.expect_continue = false;
    head.host = None;
    head.origin_form = None;
    let mut authority = None;
    if let Some((a, rest)) = absolute_form(path.as_bytes()) {
        let base = head.target.start;
        if a.is_empty() {
            return Err(ClientError::BadRequest(
                "absolute-form target without a host",
            ));
        }
        authority = Some(base + a.start..base + a.end);
        head.origin_form = Some(base + rest.start..base + rest.end);
    }

    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    let mut te_chunked_last = false;
    let mut te_chunked_count = 0;
    let mut te_unknown = false;
    let mut te_other = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        let n0 = off(name);
        let v0 = off(value);
        head.fields.push(Field {
            name: (n0 as u32, (n0 + name.len()) as u32),
            value: (v0 as u32, (v0 + value.len()) as u32),
        });
        if name_is(name, b"content-length") {
            let v = parse_content_length(value)
                .ok_or(ClientError::BadRequest("invalid Content-Length"))?;
            if content_length.is_some_and(|c| c != v) {
                return Err(ClientError::BadRequest("conflicting Content-Length"));
            }
            content_length = Some(v);
        } else if name_is(name, b"transfer-encoding") {
            te_seen = true;
            for coding in list_elements(value) {
                // Codings may carry parameters; only the name matters here.
                let coding = trim_ows(coding.split(|&b| b == b';').next().unwrap_or(coding));
                if coding.eq_ignore_ascii_case(b"chunked") {
                    te_chunked_count += 1;
                    te_chunked_last = true;
                } else {
                    te_chunked_last = false;
                    te_other = true;
                    if !KNOWN_CODINGS.iter().any(|k| coding.eq_ignore_ascii_case(k)) {
                        te_unknown = true;
                    }
                }
            }
        } else if name_is(name, b"connection") {
            for t in list_elements(value) {
                if t.eq_ignore_ascii_case(b"close") {
                    conn_close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    conn_keep_alive = true;
                }
            }
        } else if name_is(name, b"host") {
            if head.host.is_some() {
                return Err(ClientError::BadRequest("more than one Host field"));
            }
            let v = trim_ows(value);
            let v0 = off(v);
            head.host = Some(v0..v0 + v.len());
        } else if name_is(name, b"expect") {
            if trim_ows(value).eq_ignore_ascii_case(b"100-continue") {
                head.expect_continue = true;
            } else {
                // RFC 9110 §10.1.1 permits 417; 400 keeps the error set small.
                return Err(ClientError::BadRequest("unsupported Expect"));
            }
        }
    }

    // RFC 9112 §3.2: a 1.1 request without exactly one Host is a 400, and
    // so is one whose Host (or absolute-form authority) is not a valid
    // `uri-host [":" port]`: a value with userinfo (`a@b`), spaces or a
    // path would be routed by one host and read by the backend as another.
    if minor == 1 && head.host.is_none() {
        return Err(ClientError::BadRequest("missing Host"));
    }
    if let Some(r) = head.host.clone() {
        if !valid_authority(&buf[r]) {
            return Err(ClientError::BadRequest("invalid Host"));
        }
    }
    if let Some(r) = authority.clone() {
        // RFC 9110 §4.2.1: an http URI's host is not empty (`http://:80/`).
        if !valid_authority(&buf[r.clone()]) || buf[r].first() == Some(&b':') {
            return Err(ClientError::BadRequest("invalid Host"));
        }
    }
    // §3.2.2: an absolute-form target's authority replaces `Host`.
    if authority.is_some() {
        head.host = authority;
    }
    // RFC 9112 §6.1 and §6.3: the framing rules.
    head.body = Some(if te_seen {
        if minor == 0 {
            return Err(ClientError::BadRequest("Transfer-Encoding in HTTP/1.0"));
        }
        if content_length.is_some() {
            return Err(ClientError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if te_unknown {
            return Err(ClientError::NotImplemented("unsupported transfer-coding"));
        }
        if !te_chunked_last || te_chunked_count != 1 {
            return Err(ClientError::BadRequest(
                "Transfer-Encoding does not end in a single chunked",
            ));
        }
        if te_other {
            // `gzip, chunked`: corral would forward the decoded chunks
            // as plain bytes, losing the coding (nginx answers 501 too).
            return Err(ClientError::NotImplemented(
                "transfer-codings other than chunked",
            ));
        }
        BodyKind::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyKind::Empty,
            Some(n) => BodyKind::Length(n),
        }
    });
    if head.expect_continue && minor == 0 {
        // RFC 9110 §10.1.1: ignore 100-continue from HTTP/1.0 clients.
        head.expect_continue = false;
    }
    head.close = conn_close || (minor == 0 && !conn_keep_alive);
    if matches!(head.method(), Method::Connect) {
        return Err(ClientError::NotImplemented("CONNECT is not supported"));
    }
    // RFC 9112 §3.2: origin-form (`/...`), absolute-form, or `*` for
    // OPTIONS; anything else (`foo`, an authority) is no target to route.
    let target = &buf[head.target.clone()];
    if head.origin_form.is_none()
        && !target.starts_with(b"/")
        && !(target == b"*" && head.method() == Method::Options)
    {
        return Err(ClientError::BadRequest(
            "request target is not in origin form",
        ));
    }
    Ok(true)
}

/// Transfer-codings that are registered but that corral does not decode; a
/// request ending in one of them is a 400 (its body is not chunked), one
/// with one of them before `chunked` a 501, any other coding a 501.
const KNOWN_CODINGS: &[&[u8]] = &[
    b"gzip",
    b"x-gzip",
    b"deflate",
    b"compress",
    b"x-compress",
    b"identity",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        for ok in [
            "",
            "t",
            "a.example",
            "a.example:8080",
            "a.example:",
            "A-b_c~d.e.",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "[fe80::1%25eth0]",
            "xn--bcher-kva.example",
            "a%2Eb",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "a@b",
            "a.example:80@evil",
            "a/b",
            "a b",
            "a:8o",
            "a:1:2",
            "[::1",
            "[]",
            "[::1]x",
            "[::1]:x",
            "a\\b",
            "a\"b",
            "<a>",
            "a?b",
            "a#b",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad:?}");
        }
    }

    const LIMITS: HeadLimits = HeadLimits {
        max_header_bytes: 8192,
        max_headers: 64,
        max_uri_bytes: 2048,
    };

    fn parse(buf: &[u8]) -> Result<Option<RequestHead>, ClientError> {
        let mut h = RequestHead::default();
        Ok(parse_request(buf, &LIMITS, &mut h)?.then_some(h))
    }

    fn status(buf: &[u8]) -> u16 {
        match parse(buf) {
            Ok(Some(_)) => 200,
            Ok(None) => 0,
            Err(e) => e.status(),
        }
    }

    #[test]
    fn a_host_s_trailing_dot_is_dropped() {
        for (host, want) in [
            ("a.example.", "a.example"),
            ("a.example.:8080", "a.example"),
            ("a.example", "a.example"),
            ("[::1]:80", "[::1]"),
        ] {
            let buf = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let h = parse(buf.as_bytes()).unwrap().unwrap();
            assert_eq!(h.host(buf.as_bytes()), Some(want.as_bytes()), "{host}");
        }
    }

    #[test]
    fn simple_get() {
        let buf = b"GET /a/b?x=1 HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\r\nrest";
        let h = parse(buf).unwrap().unwrap();
        assert_eq!(h.method(), Method::Get);
        assert_eq!(h.target(buf), b"/a/b?x=1");
        assert_eq!(h.path(buf), b"/a/b");
        assert_eq!(h.host(buf), Some(&b"example.com"[..]));
        assert_eq!(h.head_len, buf.len() - 4);
        assert_eq!(h.body(), BodyKind::Empty);
        assert!(!h.close);
        assert_eq!(h.fields.len(), 2);
        assert_eq!(h.fields[1].name(buf), b"Accept");
        assert_eq!(h.fields[1].value(buf), b"*/*");
    }

    #[test]
    fn http10_keepalive_rules() {
        let h = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.close);
        let h = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.close);
        let h = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.close);
    }

    #[test]
    fn body_framing() {
        let h = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body(), BodyKind::Length(10));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(ClientError::NotImplemented(_))
        ));
        let h = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body(), BodyKind::Chunked);
        let h =
            parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.body(), BodyKind::Length(5));
        let h = parse(
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(h.expect_continue);
    }

    /// Request-smuggling and malformed-head cases, each with the status the
    /// client must get (hyper's table, extended).
    #[test]
    fn smuggling_table() {
        let cases: &[(&[u8], u16)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +10\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: foo, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
            (b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX\x00: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
            (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 200),
            (b"GET / HTTP/1.9\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.x\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/12.0\r\nHost: a\r\n\r\n", 400),
            (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n", 505),
            (b"GET / HTTP/2", 0),
            (b"GET / HTTP/2\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/2.0 \r\nHost: a\r\n\r\n", 400),
            (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET /a b HTTP/1.2\r\nHost: a\r\n\r\n", 400),
            (b"\r\nGET / HTTP/1.3\r\nHost: a\r\n\r\n", 200),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"G\x01T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n", 400),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 501),
            (b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET a.example:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 200),
            (b"GET http://a.example/x HTTP/1.1\r\nHost: a\r\n\r\n", 200),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", 0),
        ];
        for (input, want) in cases {
            assert_eq!(
                status(input),
                *want,
                "for {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn limits() {
        let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(3000));
        assert_eq!(status(long_uri.as_bytes()), 414);
        // Still in the request line when the limit is passed.
        let partial = format!("GET /{}", "a".repeat(3000));
        assert_eq!(status(partial.as_bytes()), 414);
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "b".repeat(9000)
        );
        assert_eq!(status(big.as_bytes()), 431);
        let big_partial = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}", "b".repeat(9000));
        assert_eq!(status(big_partial.as_bytes()), 431);
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..70 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(status(many.as_bytes()), 431);
    }

    /// Every prefix of a valid head is either incomplete or (at full length)
    /// the same parse: splitting the input anywhere changes nothing.
    #[test]
    fn every_split_point() {
        let buf: &[u8] =
            b"POST /upload?x=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n";
        let full = parse(buf).unwrap().unwrap();
        for i in 0..buf.len() {
            assert!(parse(&buf[..i]).unwrap().is_none(), "prefix {i} parsed");
        }
        assert_eq!(full.head_len, buf.len());
        assert_eq!(full.body(), BodyKind::Chunked);
    }

    /// The same for a later 1.x minor version (served as 1.1) and for 505,
    /// whose answer must not come before the version is whole.
    #[test]
    fn every_split_point_of_other_versions() {
        let buf: &[u8] = b"GET /v HTTP/1.2\r\nHost: h\r\nConnection: close\r\n\r\n";
        let full = parse(buf).unwrap().unwrap();
        for i in 0..buf.len() {
            assert!(parse(&buf[..i]).unwrap().is_none(), "prefix {i} parsed");
        }
        assert_eq!((full.head_len, full.minor), (buf.len(), 1));
        assert_eq!(full.target(buf), b"/v");
        assert!(full.close);
        let buf: &[u8] = b"GET /v HTTP/3.0\r\nHost: h\r\n\r\n";
        let line = b"GET /v HTTP/3.0\r\n".len();
        for i in 0..buf.len() {
            let want = if i >= line { 505 } else { 0 };
            assert_eq!(status(&buf[..i]), want, "prefix {i}");
        }
    }

    #[test]
    fn absolute_form_path() {
        let buf = b"GET http://x.org/p/q?z HTTP/1.1\r\nHost: x.org\r\n\r\n";
        let h = parse(buf).unwrap().unwrap();
        assert_eq!(h.path(buf), b"/p/q");
    }

    proptest::proptest! {
        /// The parser never panics, whatever the bytes.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse(&bytes);
        }
    }
}
