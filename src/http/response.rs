//! Response heads from upstream (RFC 9112 §4, §6.3): parsing and the body
//! length rules. Pure.

use super::request::Field;
use super::{list_elements, name_is, parse_content_length, trim_ows, BodyKind};
use std::mem::MaybeUninit;

/// The most header fields accepted in an upstream response.
pub const MAX_RESPONSE_FIELDS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// The backend's response head is malformed or too large: 502.
    BadHead(&'static str),
}

/// A parsed response head; fields refer to the buffer by ranges.
#[derive(Debug, Clone, Default)]
pub struct ResponseHead {
    pub head_len: usize,
    pub code: u16,
    pub minor: u8,
    pub reason: (u32, u32),
    pub fields: Vec<Field>,
    /// The backend will close after this response (`Connection: close` or
    /// HTTP/1.0 without keep-alive).
    pub close: bool,
    pub body: Option<BodyKind>,
}

impl ResponseHead {
    pub fn body(&self) -> BodyKind {
        self.body.unwrap_or(BodyKind::Empty)
    }
    pub fn reason<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.reason.0 as usize..self.reason.1 as usize]
    }
}

/// Parses a response head at the start of `buf`. `head_request` and the status
/// decide whether a body follows (RFC 9112 §6.3). `Ok(false)`: incomplete.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    max_bytes: usize,
    head: &mut ResponseHead,
) -> Result<bool, UpstreamError> {
    // Left uninitialised, as in `parse_request`: httparse writes only the
    // entries it returns.
    let mut table = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_RESPONSE_FIELDS];
    let mut resp = httparse::Response::new(&mut []);
    let n = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut table)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_bytes {
                return Err(UpstreamError::BadHead("response head too large"));
            }
            return Ok(false);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpstreamError::BadHead("too many response header fields"))
        }
        Err(_) => return Err(UpstreamError::BadHead("malformed response head")),
    };
    if n > max_bytes {
        return Err(UpstreamError::BadHead("response head too large"));
    }
    let base = buf.as_ptr() as usize;
    let off = |s: &[u8]| s.as_ptr() as usize - base;
    let code = resp.code.unwrap_or(0);
    // RFC 9110 §15: 600-999 are invalid (internal codes of some
    // libraries): a bad head, 502.
    if !(100..=599).contains(&code) {
        return Err(UpstreamError::BadHead("invalid status code"));
    }
    let minor = resp.version.unwrap_or(1);
    let reason = resp.reason.unwrap_or("");
    head.head_len = n;
    head.code = code;
    head.minor = minor;
    head.reason = if reason.is_empty() {
        (0, 0)
    } else {
        let r0 = off(reason.as_bytes());
        (r0 as u32, (r0 + reason.len()) as u32)
    };
    head.fields.clear();
    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    // The transfer codings, parameters stripped: the only one corral
    // decodes is a single `chunked`.
    let mut te_chunked = 0usize;
    let mut te_other = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let n0 = off(name);
        let v0 = off(h.value);
        head.fields.push(Field {
            name: (n0 as u32, (n0 + name.len()) as u32),
            value: (v0 as u32, (v0 + h.value.len()) as u32),
        });
        if name_is(name, b"content-length") {
            let v = parse_content_length(h.value)
                .ok_or(UpstreamError::BadHead("invalid Content-Length"))?;
            if content_length.is_some_and(|c| c != v) {
                return Err(UpstreamError::BadHead("conflicting Content-Length"));
            }
            content_length = Some(v);
        } else if name_is(name, b"transfer-encoding") {
            te_seen = true;
            for c in list_elements(h.value) {
                let c = trim_ows(c.split(|&b| b == b';').next().unwrap_or(c));
                if c.eq_ignore_ascii_case(b"chunked") {
                    te_chunked += 1;
                } else {
                    te_other = true;
                }
            }
        } else if name_is(name, b"connection") {
            for t in list_elements(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    conn_close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    conn_keep_alive = true;
                }
            }
        }
    }
    head.close = conn_close || (minor == 0 && !conn_keep_alive);
    head.body = Some(
        if head_request || (100..200).contains(&code) || code == 204 || code == 304 {
            BodyKind::Empty
        } else if te_seen {
            // RFC 9112 §6.3 (3): Transfer-Encoding overrides Content-Length.
            // Any coding but one `chunked` (`gzip`, `gzip, chunked`,
            // `chunked, chunked`, none) is one corral cannot decode, and
            // Transfer-Encoding is hop-by-hop: forwarding the bytes without
            // it would hand the client (and the cache) coded content as if
            // it were plain. A 502, as nginx answers.
            if te_chunked != 1 || te_other {
                return Err(UpstreamError::BadHead("unsupported Transfer-Encoding"));
            }
            BodyKind::Chunked
        } else {
            match content_length {
                Some(n) => BodyKind::Length(n),
                None => {
                    head.close = true;
                    BodyKind::Close
                }
            }
        },
    );
    if te_seen && (content_length.is_some() || minor == 0) {
        // The response was framed ambiguously, or is an HTTP/1.0 message
        // with Transfer-Encoding (RFC 9112 §6.1: its framing is faulty even
        // if read as chunked): never reuse the connection.
        head.close = true;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8], head_req: bool) -> Result<Option<ResponseHead>, UpstreamError> {
        let mut h = ResponseHead::default();
        Ok(parse_response(buf, head_req, 65536, &mut h)?.then_some(h))
    }

    #[test]
    fn framing_rules() {
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.body(), BodyKind::Length(5));
        assert!(!h.close);
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.body(), BodyKind::Empty);
        let h = parse(b"HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.body(), BodyKind::Empty);
        let h = parse(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.body(), BodyKind::Empty);
        let h = parse(b"HTTP/1.1 100 Continue\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.body(), BodyKind::Empty);
        let h = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.body(), BodyKind::Chunked);
        let h = parse(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(h.body(), BodyKind::Close);
        assert!(h.close);
        let h = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(h.close);
        let h = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.body(), BodyKind::Chunked);
        assert!(h.close);
        // Only a single `chunked` is decoded (parameters and case aside);
        // any other coding is a 502, except where no body follows.
        for te in [
            "chunked;ext=1",
            "Chunked ",
            "chunked\r\nTransfer-Encoding: ",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n");
            let h = parse(raw.as_bytes(), false).unwrap().unwrap();
            assert_eq!(h.body(), BodyKind::Chunked, "{te}");
        }
        for te in [
            "gzip",
            "gzip, chunked",
            "chunked, chunked",
            "chunked\r\nTransfer-Encoding: chunked",
            "chunked, gzip",
            "",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert!(parse(raw.as_bytes(), false).is_err(), "{te:?}");
            let raw = format!("HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(
                parse(raw.as_bytes(), false).unwrap().unwrap().body(),
                BodyKind::Empty
            );
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(
                parse(raw.as_bytes(), true).unwrap().unwrap().body(),
                BodyKind::Empty
            );
        }
        // HTTP/1.0 with Transfer-Encoding: faulty framing (RFC 9112 §6.1),
        // read as chunked, never reused, keep-alive or not.
        let h = parse(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.body(), BodyKind::Chunked);
        assert!(h.close);
        let h = parse(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.close);
    }

    #[test]
    fn bad_heads() {
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse(b"HTTP/1.1 abc OK\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 600 Internal\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 099 Low\r\n\r\n", false).is_err());
        assert!(parse(b"garbage\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n", false).unwrap().is_none());
    }
}
