//! HTTP/1.1 wire format (RFC 9112): request and response heads, body framing,
//! header rewriting and the responses corral makes itself. Pure: bytes in,
//! bytes and decisions out; no I/O.

pub mod chunked;
pub mod request;
pub mod response;
pub mod rewrite;

use std::fmt;

/// A failure to accept a client request, mapped to the status code the client
/// gets. Every one of them closes the connection after the answer, because the
/// framing of whatever follows can no longer be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientError {
    /// 400: malformed or ambiguous framing; the reason is for the log.
    BadRequest(&'static str),
    /// 408: the head (or a body chunk) did not arrive in time.
    Timeout,
    /// 413: the declared or streamed body exceeds `max_body_bytes`.
    BodyTooLarge,
    /// 414: the request target exceeds `max_uri_bytes`.
    UriTooLong,
    /// 431: the head exceeds `max_header_bytes` or `max_headers`.
    HeaderTooLarge,
    /// 501: a transfer-coding corral does not know.
    NotImplemented(&'static str),
    /// 505: an HTTP major version other than 1.
    VersionNotSupported,
}

impl ClientError {
    pub fn status(self) -> u16 {
        match self {
            ClientError::BadRequest(_) => 400,
            ClientError::Timeout => 408,
            ClientError::BodyTooLarge => 413,
            ClientError::UriTooLong => 414,
            ClientError::HeaderTooLarge => 431,
            ClientError::NotImplemented(_) => 501,
            ClientError::VersionNotSupported => 505,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            ClientError::BadRequest(r) | ClientError::NotImplemented(r) => r,
            ClientError::Timeout => "request head not received in time",
            ClientError::BodyTooLarge => "request body larger than max_body_bytes",
            ClientError::UriTooLong => "request target longer than max_uri_bytes",
            ClientError::HeaderTooLarge => "request head larger than max_header_bytes",
            ClientError::VersionNotSupported => "HTTP major version other than 1",
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.status(), self.reason())
    }
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body at all (GET without framing headers, HEAD responses, 204, 304, 1xx).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Transfer-Encoding: chunked.
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

/// Canonical reason phrases for the statuses corral writes itself.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        412 => "Precondition Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// The path routes are matched against: percent-decoded, with empty and
/// `.` segments dropped and `..` taking the segment before it (RFC 3986
/// §5.2.4), as nginx matches its locations, so that `/files/%70rivate/`
/// or `/files//private/` cannot pass by a route for `/files/private/`
/// (a store decodes what it serves). A trailing `/` stays. Paths without
/// `%`, `//` or `/.` (nearly all) are returned as they are.
pub fn route_path(path: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    // One pass over the few `/` and `%` of a path.
    let plain = memchr::memchr2_iter(b'/', b'%', path)
        .all(|i| path[i] == b'/' && !matches!(path.get(i + 1), Some(b'/' | b'.')));
    if plain {
        return Cow::Borrowed(path);
    }
    let (decoded, _) = percent_decode(path);
    let mut segs: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&c| c == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for s in &segs {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    let dir = decoded.ends_with(b"/") || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    if out.is_empty() || dir {
        out.push(b'/');
    }
    Cow::Owned(out)
}

/// The byte a valid `%XX` escape at `s[i]` stands for.
pub fn escape_at(s: &[u8], i: usize) -> Option<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if s.get(i) != Some(&b'%') {
        return None;
    }
    Some(hex(*s.get(i + 1)?)? << 4 | hex(*s.get(i + 2)?)?)
}

/// `%XX` decoding: the decoded bytes (an invalid escape is kept as it is),
/// and whether every escape was valid.
pub fn percent_decode(s: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(s.len());
    let mut clean = true;
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if let Some(c) = escape_at(s, i) {
                out.push(c);
                i += 3;
                continue;
            }
            clean = false;
        }
        out.push(s[i]);
        i += 1;
    }
    (out, clean)
}

/// How the request being answered shapes corral's own answer to it.
#[derive(Debug, Clone, Copy)]
pub struct Answering {
    /// The request was HEAD: the head only (its Content-Length says what
    /// GET would get), else the next response on the connection would be
    /// read as this one's body.
    pub head_only: bool,
    /// The request's HTTP/1.x minor version: an HTTP/1.0 client whose
    /// connection stays open is told `keep-alive`.
    pub minor: u8,
}

impl Answering {
    /// For a request whose head could not be read (the answer closes).
    pub const UNKNOWN: Answering = Answering {
        head_only: false,
        minor: 1,
    };
}

/// Appends a complete response that corral makes itself (an error page) to
/// `out`: a short text body, `Via`, `Date`, and `Connection: close` when
/// `close`.
pub fn write_simple_response(
    out: &mut Vec<u8>,
    code: u16,
    body: &str,
    close: bool,
    to: Answering,
    extra: &[(&str, &str)],
) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nVia: 1.1 corral\r\n",
        code,
        reason_phrase(code),
        body.len() + 1
    );
    push_date_now(out);
    for (k, v) in extra {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    push_connection(out, close, to.minor);
    out.extend_from_slice(b"\r\n");
    if !to.head_only {
        out.extend_from_slice(body.as_bytes());
        out.push(b'\n');
    }
}

/// `Connection: close` when the connection ends after this response, or
/// `Connection: keep-alive` for an HTTP/1.0 client whose connection stays.
pub fn push_connection(out: &mut Vec<u8>, close: bool, minor: u8) {
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if minor == 0 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
}

/// Appends `Date: <t>\r\n` (`t` in seconds since the epoch).
pub fn push_date(out: &mut Vec<u8>, t: i64) {
    out.extend_from_slice(b"Date: ");
    out.extend_from_slice(crate::cache::policy::format_http_date(t).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `Date: <now>\r\n` (RFC 9110 §6.6.1: corral dates what it
/// answers itself, and what it forwards or stores without a Date). The line
/// is formatted once per second per thread.
pub fn push_date_now(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static LINE: RefCell<(i64, Vec<u8>)> = const { RefCell::new((i64::MIN, Vec::new())) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    LINE.with(|l| {
        let mut l = l.borrow_mut();
        if l.0 != now {
            l.0 = now;
            l.1.clear();
            push_date(&mut l.1, now);
        }
        out.extend_from_slice(&l.1);
    });
}

/// Appends `n` in decimal: what `write!(out, "{n}")` does, without the
/// formatting machinery (a hit writes three numbers into its head).
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// [`push_decimal`] for a signed number.
pub fn push_signed(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    push_decimal(out, n.unsigned_abs());
}

/// ASCII case-insensitive comparison of a header name.
#[inline]
pub fn name_is(name: &[u8], lower: &[u8]) -> bool {
    name.eq_ignore_ascii_case(lower)
}

/// Iterates the comma-separated elements of a list-valued field (RFC 9110
/// §5.6.1), trimmed of optional whitespace, skipping empty elements.
pub fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

/// Trims spaces and tabs from both ends.
pub fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Parses a Content-Length field value: one or more comma-separated copies of
/// the same decimal number (RFC 9110 §8.6 lets a recipient accept identical
/// repeats); a sign, whitespace inside the number, differing values or
/// overflow are errors.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    let mut any = false;
    for part in value.split(|&b| b == b',') {
        let part = trim_ows(part);
        // Leading zeros are digits like any (`007`); overflow is caught below.
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let mut n: u64 = 0;
        for &d in part {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        // At most 19 significant digits, as before leading zeros counted.
        if n > 9_999_999_999_999_999_999 {
            return None;
        }
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
        any = true;
    }
    if any {
        found
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_paths_are_decoded_and_normalised() {
        for (raw, want) in [
            ("/files/a", "/files/a"),
            ("/files/%70rivate/x", "/files/private/x"),
            ("/files//private/x", "/files/private/x"),
            ("/files/./private/x", "/files/private/x"),
            ("/public/../files/private/x", "/files/private/x"),
            ("/files/private/../../public/x", "/public/x"),
            ("/../../x", "/x"),
            ("/a/b/", "/a/b/"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a%2Fb", "/a/b"),
            ("//", "/"),
            ("/.", "/"),
            ("/%2e%2e/x", "/x"),
            ("/.well-known/x", "/.well-known/x"),
        ] {
            assert_eq!(
                route_path(raw.as_bytes()).as_ref(),
                want.as_bytes(),
                "{raw}"
            );
        }
        assert!(matches!(
            route_path(b"/plain/path"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn content_length_values() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b" 42 "), Some(42));
        assert_eq!(parse_content_length(b"42, 42"), Some(42));
        assert_eq!(parse_content_length(b"42, 43"), None);
        assert_eq!(parse_content_length(b"+42"), None);
        assert_eq!(parse_content_length(b"-1"), None);
        assert_eq!(parse_content_length(b"4 2"), None);
        assert_eq!(parse_content_length(b""), None);
        assert_eq!(parse_content_length(b"0x10"), None);
        assert_eq!(parse_content_length(b"99999999999999999999"), None);
        assert_eq!(parse_content_length(b"18446744073709551615"), None);
        // Leading zeros are digits like any (RFC 9110 §8.6: 1*DIGIT).
        assert_eq!(parse_content_length(b"00000000000000000001"), Some(1));
        assert_eq!(
            parse_content_length(b"0000000000000000000000000000042, 42"),
            Some(42)
        );
        assert_eq!(
            parse_content_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(
            parse_content_length(b"1844674407370955161"),
            Some(1844674407370955161)
        );
    }

    #[test]
    fn list_elements_skip_empty() {
        let v: Vec<&[u8]> = list_elements(b" gzip ,, chunked,").collect();
        assert_eq!(v, vec![&b"gzip"[..], &b"chunked"[..]]);
    }

    #[test]
    fn simple_response_is_framed() {
        let mut out = Vec::new();
        write_simple_response(&mut out, 502, "bad gateway", false, Answering::UNKNOWN, &[]);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(s.contains("Content-Length: 12\r\n"));
        assert!(s.ends_with("\r\n\r\nbad gateway\n"));
    }

    #[test]
    fn decimals_match_format() {
        for n in [0u64, 1, 9, 10, 99, 100, 12_345, u64::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
        for n in [0i64, -1, 7, -86_400, i64::MIN, i64::MAX] {
            let mut out = Vec::new();
            push_signed(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }
}
