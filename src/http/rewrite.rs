//! Header rewriting between the client and upstream sides (RFC 9110 §7.6):
//! hop-by-hop fields are dropped, `X-Forwarded-For`, `X-Forwarded-Proto` and
//! `Via` are added, and each side gets the framing corral chose for it. Pure.

use super::request::{Field, RequestHead};
use super::response::ResponseHead;
use super::{list_elements, name_is, reason_phrase, BodyKind};
use std::io::Write;

/// Fields that describe one connection and never cross the proxy
/// (RFC 9110 §7.6.1), plus the framing fields corral rewrites itself.
pub const HOP_BY_HOP: &[&[u8]] = &[
    b"connection",
    b"keep-alive",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-connection",
];

/// Whether a field must not be forwarded, for one head: the fixed
/// hop-by-hop list, plus the names its `Connection` fields list, collected
/// once (up to [`HopByHop::KEEP`]; a head
/// naming more falls back to scanning its `Connection` fields per name).
struct HopByHop<'a> {
    buf: &'a [u8],
    fields: &'a [Field],
    named: [&'a [u8]; HopByHop::KEEP],
    count: usize,
    more: bool,
}

impl<'a> HopByHop<'a> {
    const KEEP: usize = 8;

    fn new(buf: &'a [u8], fields: &'a [Field]) -> HopByHop<'a> {
        let mut h = HopByHop {
            buf,
            fields,
            named: [&[][..]; HopByHop::KEEP],
            count: 0,
            more: false,
        };
        for f in fields
            .iter()
            .filter(|f| name_is(f.name(buf), b"connection"))
        {
            for t in list_elements(f.value(buf)) {
                if h.count < HopByHop::KEEP {
                    h.named[h.count] = t;
                    h.count += 1;
                } else {
                    h.more = true;
                }
            }
        }
        h
    }

    fn is(&self, name: &[u8]) -> bool {
        HOP_BY_HOP.iter().any(|h| name_is(name, h))
            || self.named[..self.count]
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name))
            || (self.more
                && self
                    .fields
                    .iter()
                    .filter(|f| name_is(f.name(self.buf), b"connection"))
                    .any(|f| {
                        list_elements(f.value(self.buf)).any(|t| t.eq_ignore_ascii_case(name))
                    }))
    }
}

/// What the upstream request needs beyond the client's head.
pub struct Forwarded<'a> {
    /// The client's address, for `X-Forwarded-For`.
    pub client_ip: &'a str,
    /// `http` for plain listeners.
    pub proto: &'a str,
    /// The backend's address, used as `Host` when the client sent none.
    pub backend_host: &'a str,
}

/// Writes the request head sent upstream. The body framing is `body` (the
/// client's own length, or chunked, re-encoded by the caller). Always
/// HTTP/1.1 with keep-alive towards the backend.
pub fn write_upstream_request(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, fwd: &Forwarded) {
    write_request(out, buf, head, fwd, false);
}

/// Renames the backend in the `Host` field that [`write_upstream_request`]
/// or [`write_fill_request`] added because the client sent none (HTTP/1.0):
/// a request retried on another backend, or a fill that picked one, names
/// the backend it goes to. Does nothing when the client sent its own Host.
pub fn retarget_host(out: &mut Vec<u8>, head: &RequestHead, from: &str, to: &str) {
    if head.host.is_some() || from == to {
        return;
    }
    let Some(at) = memchr::memmem::find(out, b"\r\nHost: ").map(|i| i + 8) else {
        return;
    };
    let end = at + from.len();
    if out.get(at..end) == Some(from.as_bytes()) && out.get(end..end + 2) == Some(b"\r\n") {
        out.splice(at..end, to.bytes());
    }
}

/// Fields a cache fill never forwards: the fill asks for the whole current
/// representation, whatever the client's conditions or range.
const FILL_DROPS: &[&[u8]] = &[
    b"if-none-match",
    b"if-modified-since",
    b"if-match",
    b"if-unmodified-since",
    b"if-range",
    b"range",
];

/// Writes `name: v1, v2, …, last`: the values the client sent, in order,
/// then this hop's.
fn write_list(out: &mut Vec<u8>, name: &[u8], values: &[&[u8]], last: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for v in values.iter().filter(|v| !v.is_empty()) {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(last);
    out.extend_from_slice(b"\r\n");
}

/// Writes the request head of a cache fill: always GET (a HEAD is answered
/// from the stored GET), without conditional or range fields.
pub fn write_fill_request(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, fwd: &Forwarded) {
    write_request(out, buf, head, fwd, true);
}

fn write_request(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, fwd: &Forwarded, fill: bool) {
    if fill {
        out.extend_from_slice(b"GET");
    } else {
        out.extend_from_slice(&buf[head.method_range.clone()]);
    }
    out.push(b' ');
    // Origin form: an absolute-form target's authority goes in `Host`.
    let target = head.origin_target(buf);
    if target.first() == Some(&b'?') {
        out.push(b'/');
    }
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let (Some(_), Some(h)) = (&head.origin_form, &head.host) {
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(&buf[h.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    // Every X-Forwarded-For and Via field the client sent goes into one of
    // each, written after the others with this hop at the end: appending to
    // the first of several would let a later one pass for the last hop.
    let mut xff: Vec<&[u8]> = Vec::new();
    let mut via: Vec<&[u8]> = Vec::new();
    let mut forwarded: Vec<&[u8]> = Vec::new();
    let hop = HopByHop::new(buf, &head.fields);
    for f in &head.fields {
        let name = f.name(buf);
        // A client cannot make `Host` hop-by-hop by naming it in
        // `Connection`: dropping it would send an HTTP/1.1 request without
        // its authority (found by the fuzz target).
        if (hop.is(name) && !name_is(name, b"host"))
            || (head.origin_form.is_some() && name_is(name, b"host"))
            || name_is(name, b"expect")
            || name_is(name, b"x-forwarded-proto")
            || (fill && FILL_DROPS.iter().any(|d| name_is(name, d)))
            // As nginx (`underscores_in_headers off`): CGI-style backends
            // read `X_Forwarded_Proto` as `X-Forwarded-Proto`, which would
            // pass a client's claim by the one corral replaces.
            || name.contains(&b'_')
        {
            continue;
        }
        if name_is(name, b"content-length") {
            // Re-written below from the validated framing.
            continue;
        }
        if name_is(name, b"x-forwarded-for") {
            xff.push(f.value(buf));
            continue;
        }
        if name_is(name, b"via") {
            via.push(f.value(buf));
            continue;
        }
        if name_is(name, b"forwarded") {
            forwarded.push(f.value(buf));
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(f.value(buf));
        out.extend_from_slice(b"\r\n");
    }
    if head.host.is_none() {
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(fwd.backend_host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    write_list(out, b"X-Forwarded-For", &xff, fwd.client_ip.as_bytes());
    out.extend_from_slice(b"X-Forwarded-Proto: ");
    out.extend_from_slice(fwd.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    write_list(out, b"Via", &via, b"1.1 corral");
    // A client's `Forwarded` (RFC 7239) gets this hop's element at its end,
    // as X-Forwarded-For does: the last element is the one corral vouches
    // for. Not added when the client sent none (X-Forwarded-* say it).
    if !forwarded.is_empty() {
        let ip = &fwd.client_ip;
        let last = if ip.contains(':') {
            format!("for=\"[{ip}]\";proto={}", fwd.proto)
        } else {
            format!("for={ip};proto={}", fwd.proto)
        };
        write_list(out, b"Forwarded", &forwarded, last.as_bytes());
    }
    match head.body() {
        BodyKind::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        BodyKind::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyKind::Empty | BodyKind::Close => {
            // Keep an explicit zero length the client sent for methods that
            // usually carry a body.
            if head
                .fields
                .iter()
                .any(|f| name_is(f.name(buf), b"content-length"))
            {
                out.extend_from_slice(b"Content-Length: 0\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// How corral frames a response body towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFraming {
    /// No body bytes follow the head (HEAD, 1xx, 204, 304); the backend's
    /// `Content-Length`, if any, is kept as information.
    NoBody,
    /// The backend's Content-Length, passed through.
    Length(u64),
    /// Re-encoded as chunked (HTTP/1.1 clients, when the backend sent chunked
    /// or close-delimited).
    Chunked,
    /// Delimited by closing the connection (HTTP/1.0 clients without a length).
    Close,
}

impl ClientFraming {
    /// Picks the client framing for an upstream body.
    pub fn choose(upstream: BodyKind, client_minor: u8) -> ClientFraming {
        match upstream {
            BodyKind::Empty => ClientFraming::NoBody,
            BodyKind::Length(n) => ClientFraming::Length(n),
            BodyKind::Chunked | BodyKind::Close => {
                if client_minor >= 1 {
                    ClientFraming::Chunked
                } else {
                    ClientFraming::Close
                }
            }
        }
    }
}

/// Writes the response head sent to the client. `close`: the connection ends
/// after this response; `client_minor` decides whether an HTTP/1.0 client is
/// told `keep-alive`.
pub fn write_client_response(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &ResponseHead,
    framing: ClientFraming,
    close: bool,
    client_minor: u8,
    extra: &[u8],
) {
    let _ = write!(out, "HTTP/1.1 {} ", head.code);
    let reason = head.reason(buf);
    if reason.is_empty() {
        out.extend_from_slice(reason_phrase(head.code).as_bytes());
    } else {
        out.extend_from_slice(reason);
    }
    out.extend_from_slice(b"\r\n");
    // Content-Length is the client framing's, except on a HEAD's or a 304's
    // answer (the representation's length); never on a 204 or a 1xx (RFC
    // 9110 §8.6).
    let keep_length = framing == ClientFraming::NoBody && head.code >= 200 && head.code != 204;
    let dated = copy_fields(out, buf, head, keep_length);
    if !dated {
        // A recipient with a clock dates a response that has no Date
        // before forwarding it (RFC 9110 §6.6.1).
        crate::http::push_date_now(out);
    }
    match framing {
        ClientFraming::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        ClientFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        ClientFraming::NoBody | ClientFraming::Close => {}
    }
    crate::http::push_connection(out, close, client_minor);
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
}

/// Copies a backend response's end-to-end fields (Content-Length only if
/// `keep_length`) and adds this hop to its `Via` list; whether it has a
/// `Date`.
fn copy_fields(out: &mut Vec<u8>, buf: &[u8], head: &ResponseHead, keep_length: bool) -> bool {
    let mut via_done = false;
    let mut dated = false;
    let hop = HopByHop::new(buf, &head.fields);
    // This hop goes at the end of the Via list (RFC 9110 §7.6.3): on the
    // backend's last Via line, or on a line of its own.
    let last_via = head
        .fields
        .iter()
        .rposition(|f| name_is(f.name(buf), b"via"));
    for (i, f) in head.fields.iter().enumerate() {
        let name = f.name(buf);
        if hop.is(name) {
            continue;
        }
        dated |= name_is(name, b"date");
        if !keep_length && name_is(name, b"content-length") {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(f.value(buf));
        if Some(i) == last_via {
            out.extend_from_slice(b", 1.1 corral");
            via_done = true;
        }
        out.extend_from_slice(b"\r\n");
    }
    if !via_done {
        out.extend_from_slice(b"Via: 1.1 corral\r\n");
    }
    dated
}

/// Writes an interim (1xx) response through to the client: its fields
/// but Content-Length (RFC 9110 §8.6), with this hop in its `Via`.
pub fn write_interim(out: &mut Vec<u8>, buf: &[u8], head: &ResponseHead) {
    let _ = write!(out, "HTTP/1.1 {} ", head.code);
    out.extend_from_slice(head.reason(buf));
    out.extend_from_slice(b"\r\n");
    copy_fields(out, buf, head, false);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::super::request::{parse_request, HeadLimits};
    use super::super::response::parse_response;
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_header_bytes: 8192,
        max_headers: 64,
        max_uri_bytes: 2048,
    };

    /// The upstream request `write_upstream_request` makes of `buf`.
    fn upstream(buf: &[u8]) -> Vec<u8> {
        let mut head = RequestHead::default();
        assert!(parse_request(buf, &LIMITS, &mut head).unwrap());
        let mut out = Vec::new();
        write_upstream_request(
            &mut out,
            buf,
            &head,
            &Forwarded {
                client_ip: "127.0.0.1",
                proto: "http",
                backend_host: "b:1",
            },
        );
        out
    }

    #[test]
    fn every_forwarded_for_and_via_merge_into_one_ending_with_this_hop() {
        let buf = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nVia: 1.0 a\r\nX-Forwarded-For: 6.6.6.6\r\nVia: 1.1 b\r\n\r\n";
        let s = String::from_utf8(upstream(buf)).unwrap();
        assert_eq!(s.matches("X-Forwarded-For").count(), 1, "{s}");
        assert!(
            s.contains("X-Forwarded-For: 1.1.1.1, 6.6.6.6, 127.0.0.1\r\n"),
            "{s}"
        );
        assert_eq!(s.matches("Via").count(), 1, "{s}");
        assert!(s.contains("Via: 1.0 a, 1.1 b, 1.1 corral\r\n"), "{s}");
    }

    #[test]
    fn forwarded_gets_this_hop_and_underscored_names_are_dropped() {
        let buf = b"GET /x HTTP/1.1\r\nHost: a\r\nForwarded: for=6.6.6.6;proto=https\r\nX_Forwarded_Proto: https\r\nX_Real_IP: 6.6.6.6\r\nX-Ok: 1\r\n\r\n";
        let s = String::from_utf8(upstream(buf)).unwrap();
        assert!(
            s.contains("Forwarded: for=6.6.6.6;proto=https, for=127.0.0.1;proto=http\r\n"),
            "{s}"
        );
        assert!(!s.contains('_'), "{s}");
        assert!(
            s.contains("X-Ok: 1\r\n") && s.contains("X-Forwarded-Proto: http\r\n"),
            "{s}"
        );
        // None from the client: none added (X-Forwarded-* say it).
        let s = String::from_utf8(upstream(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")).unwrap();
        assert!(!s.contains("Forwarded:"), "{s}");
    }

    #[test]
    fn an_absolute_form_target_goes_upstream_in_origin_form_with_its_host() {
        // RFC 9112 §3.2.2: the target's authority wins over `Host`, which
        // routing and the cache use too.
        let buf = b"GET http://internal.example/admin?x=1 HTTP/1.1\r\nHost: public.example\r\nX: y\r\n\r\n";
        let mut head = RequestHead::default();
        assert!(parse_request(buf, &LIMITS, &mut head).unwrap());
        assert_eq!(head.host(buf), Some(&b"internal.example"[..]));
        assert_eq!(head.path(buf), b"/admin");
        let s = String::from_utf8(upstream(buf)).unwrap();
        assert!(
            s.starts_with("GET /admin?x=1 HTTP/1.1\r\nHost: internal.example\r\n"),
            "{s}"
        );
        assert!(!s.contains("public.example"), "{s}");
        let buf = b"GET HTTPS://h.example:8443 HTTP/1.1\r\nHost: h.example:8443\r\n\r\n";
        assert!(parse_request(buf, &LIMITS, &mut head).unwrap());
        assert_eq!(head.host(buf), Some(&b"h.example"[..]));
        let s = String::from_utf8(upstream(buf)).unwrap();
        assert!(
            s.starts_with("GET / HTTP/1.1\r\nHost: h.example:8443\r\n"),
            "{s}"
        );
        let buf = b"GET http://h.example?q=1 HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(parse_request(buf, &LIMITS, &mut head).unwrap());
        assert_eq!(head.path(buf), b"/");
        let s = String::from_utf8(upstream(buf)).unwrap();
        assert!(
            s.starts_with("GET /?q=1 HTTP/1.1\r\nHost: h.example\r\n"),
            "{s}"
        );
        let buf = b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(parse_request(buf, &LIMITS, &mut head).is_err());
    }

    #[test]
    fn connection_cannot_remove_host() {
        let buf = b"GET /x HTTP/1.1\r\nHost: a.example\r\nConnection: x, Host\r\nX: 1\r\n\r\n";
        let out = upstream(buf);
        let s = String::from_utf8(out.clone()).unwrap();
        assert!(s.contains("Host: a.example\r\n"), "{s}");
        assert!(!s.contains("X: 1"), "{s}");
        let mut again = RequestHead::default();
        assert!(parse_request(&out, &LIMITS, &mut again).unwrap());
    }

    #[test]
    fn upstream_request_drops_hop_by_hop() {
        let buf = b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 300\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Connection: close\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nVia: 1.0 edge\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\nAccept: */*\r\n\r\n";
        let out = upstream(buf);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("POST /x HTTP/1.1\r\nHost: a\r\n"), "{s}");
        for gone in [
            "Connection",
            "X-Secret",
            "Keep-Alive",
            "TE:",
            "Upgrade",
            "Proxy-Connection",
            "Expect",
            "https",
        ] {
            assert!(!s.contains(gone), "{gone} forwarded in {s}");
        }
        assert!(s.contains("X-Forwarded-For: 10.0.0.1, 127.0.0.1\r\n"));
        assert!(s.contains("X-Forwarded-Proto: http\r\n"));
        assert!(s.contains("Via: 1.0 edge, 1.1 corral\r\n"));
        assert!(s.contains("Transfer-Encoding: chunked\r\n"));
        assert!(s.contains("Accept: */*\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }

    #[test]
    fn a_retry_renames_only_the_host_corral_added() {
        // The client sent no Host: the added one follows the backend.
        let buf = b"GET / HTTP/1.0\r\nX-Host: b:1\r\n\r\n";
        let mut head = RequestHead::default();
        assert!(parse_request(buf, &LIMITS, &mut head).unwrap());
        let mut out = upstream(buf);
        retarget_host(&mut out, &head, "b:1", "127.0.0.1:8080");
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("\r\nHost: 127.0.0.1:8080\r\n"), "{s}");
        assert!(s.contains("\r\nX-Host: b:1\r\n"), "{s}");
        let mut again = RequestHead::default();
        assert!(parse_request(s.as_bytes(), &LIMITS, &mut again).unwrap());
        // The client's own Host is never touched.
        let buf = b"GET / HTTP/1.1\r\nHost: b:1\r\n\r\n";
        let mut head = RequestHead::default();
        assert!(parse_request(buf, &LIMITS, &mut head).unwrap());
        let mut out = upstream(buf);
        let before = out.clone();
        retarget_host(&mut out, &head, "b:1", "c:2");
        assert_eq!(out, before);
    }

    #[test]
    fn upstream_request_for_http10_gets_host() {
        let buf = b"GET / HTTP/1.0\r\n\r\n";
        let mut head = RequestHead::default();
        assert!(parse_request(buf, &LIMITS, &mut head).unwrap());
        let mut out = Vec::new();
        write_upstream_request(
            &mut out,
            buf,
            &head,
            &Forwarded {
                client_ip: "::1",
                proto: "http",
                backend_host: "127.0.0.1:9",
            },
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("GET / HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"),
            "{s}"
        );
    }

    #[test]
    fn client_response_reframes() {
        let buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: X-Hop\r\nX-Hop: 1\r\nContent-Type: text/plain\r\n\r\n";
        let mut head = ResponseHead::default();
        assert!(parse_response(buf, false, 8192, &mut head).unwrap());
        let mut out = Vec::new();
        let framing = ClientFraming::choose(head.body(), 0);
        assert_eq!(framing, ClientFraming::Close);
        write_client_response(&mut out, buf, &head, framing, true, 0, b"");
        let s = String::from_utf8(out).unwrap();
        // No Date from the backend: corral adds one (RFC 9110 §6.6.1).
        let (before, date) = s.split_once("Date: ").unwrap();
        assert_eq!(
            before,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nVia: 1.1 corral\r\n"
        );
        assert!(
            date.ends_with(" GMT\r\nConnection: close\r\n\r\n"),
            "{date}"
        );
        let date = &date[..date.find("\r\n").unwrap()];
        assert!(crate::cache::policy::parse_http_date(date.as_bytes()).is_some());
        // A backend's Date is kept, and not doubled.
        let dated =
            b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n";
        let mut head = ResponseHead::default();
        assert!(parse_response(dated, false, 8192, &mut head).unwrap());
        let mut out = Vec::new();
        write_client_response(
            &mut out,
            dated,
            &head,
            ClientFraming::Length(0),
            false,
            1,
            b"",
        );
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s.matches("Date: ").count(), 1);
        assert!(s.contains("Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"));
        let buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: X-Hop\r\nX-Hop: 1\r\nContent-Type: text/plain\r\n\r\n";
        let mut head = ResponseHead::default();
        assert!(parse_response(buf, false, 8192, &mut head).unwrap());
        let mut out = Vec::new();
        write_client_response(&mut out, buf, &head, ClientFraming::Chunked, false, 1, b"");
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("Transfer-Encoding: chunked\r\n"));
        assert!(!s.contains("Connection"));
    }

    #[test]
    fn connection_may_name_more_fields_than_are_kept() {
        // Ten names over two Connection fields: the first eight are kept,
        // the rest found by the scan; all ten go, the others stay.
        let names: Vec<String> = (0..10).map(|i| format!("X-H{i}")).collect();
        let mut text = format!(
            "HTTP/1.1 200 OK\r\nConnection: {}\r\nConnection: {}\r\n",
            names[..6].join(", "),
            names[6..].join(", ")
        );
        for n in &names {
            text.push_str(&format!("{n}: 1\r\n"));
        }
        text.push_str("X-Stay: 1\r\nContent-Length: 0\r\n\r\n");
        let buf = text.as_bytes();
        let mut head = ResponseHead::default();
        assert!(parse_response(buf, false, 8192, &mut head).unwrap());
        let mut out = Vec::new();
        write_client_response(
            &mut out,
            buf,
            &head,
            ClientFraming::Length(0),
            false,
            1,
            b"",
        );
        let s = String::from_utf8(out).unwrap();
        for n in &names {
            assert!(!s.contains(&format!("{n}:")), "{n} kept: {s}");
        }
        assert!(s.contains("X-Stay: 1\r\n"));
    }
}
