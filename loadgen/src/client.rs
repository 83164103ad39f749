//! The client side of HTTP/1.1 (RFC 9112 §6.3), as far as a load generator
//! needs it: find where each response ends (Content-Length, chunked,
//! close-delimited, or no body), and what its status was. Pure and
//! incremental: bytes may arrive split anywhere.

/// Where the reader is within the current response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length {
        left: u64,
    },
    /// Reading a chunk-size line; `size` so far, `digits` seen, `ext` after `;`.
    ChunkSize {
        size: u64,
        digits: u8,
        ext: bool,
    },
    ChunkSizeLf {
        size: u64,
    },
    ChunkData {
        left: u64,
    },
    ChunkDataCr,
    ChunkDataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf {
        empty: bool,
    },
    UntilClose,
}

/// A response that finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    pub status: u16,
    /// The server will close after it (or already has).
    pub close: bool,
    /// Body bytes received.
    pub body_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    BadHead,
    BadChunk,
    /// The connection ended inside a response.
    Truncated,
}

/// One step of [`ResponseReader::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub consumed: usize,
    pub done: Option<Completed>,
}

#[derive(Debug, Clone)]
pub struct ResponseReader {
    state: State,
    status: u16,
    close: bool,
    body_bytes: u64,
}

impl Default for ResponseReader {
    fn default() -> Self {
        Self::new()
    }
}

/// The most bytes of a response head accepted: a connection's whole read
/// buffer (engine.rs).
const MAX_HEAD: usize = 64 * 1024;

impl ResponseReader {
    pub fn new() -> Self {
        ResponseReader {
            state: State::Head,
            status: 0,
            close: false,
            body_bytes: 0,
        }
    }

    /// Whether the reader is between responses.
    pub fn idle(&self) -> bool {
        self.state == State::Head
    }

    /// Consumes bytes of the response to a request (`head_request` if it was
    /// HEAD). Stops after one completed response, so the caller can match it
    /// to its request; call again with the rest.
    pub fn feed(&mut self, buf: &[u8], head_request: bool) -> Result<Progress, ReadError> {
        let mut i = 0;
        loop {
            match self.state {
                State::Head => {
                    // Uninitialised: httparse writes only what it returns,
                    // and filling 96 empty headers per response cost more
                    // than the parse.
                    let mut headers =
                        [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; 96];
                    let mut resp = httparse::Response::new(&mut []);
                    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                        &mut resp,
                        &buf[i..],
                        &mut headers,
                    ) {
                        Ok(httparse::Status::Partial) => {
                            // A head as large as the connection's whole
                            // buffer cannot complete: an error, not a wait
                            // for room that never comes.
                            if buf.len() - i >= MAX_HEAD {
                                return Err(ReadError::BadHead);
                            }
                            return Ok(Progress {
                                consumed: i,
                                done: None,
                            });
                        }
                        Err(_) => return Err(ReadError::BadHead),
                        Ok(httparse::Status::Complete(n)) => {
                            let status = resp.code.unwrap_or(0);
                            let mut length = None;
                            let mut chunked = false;
                            // A Transfer-Encoding whose last coding is not
                            // chunked: the body runs to the close, whatever
                            // Content-Length says (RFC 9112 §6.3).
                            let mut coded = false;
                            let mut close = resp.version == Some(0);
                            for h in resp.headers.iter() {
                                if h.name.eq_ignore_ascii_case("content-length") {
                                    length = std::str::from_utf8(h.value)
                                        .ok()
                                        .and_then(|v| v.trim().parse::<u64>().ok());
                                    if length.is_none() {
                                        return Err(ReadError::BadHead);
                                    }
                                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                                    chunked =
                                        h.value.rsplit(|&b| b == b',').next().is_some_and(|v| {
                                            v.trim_ascii().eq_ignore_ascii_case(b"chunked")
                                        });
                                    coded = !chunked;
                                } else if h.name.eq_ignore_ascii_case("connection") {
                                    for t in h.value.split(|&b| b == b',') {
                                        let t = t.trim_ascii();
                                        if t.eq_ignore_ascii_case(b"close") {
                                            close = true;
                                        } else if t.eq_ignore_ascii_case(b"keep-alive") {
                                            close = false;
                                        }
                                    }
                                }
                            }
                            i += n;
                            if (100..200).contains(&status) && status != 101 {
                                continue; // interim: the final response follows
                            }
                            // 101: what follows is another protocol, so the
                            // response ends here and so does the connection.
                            self.status = status;
                            self.close = close || status == 101;
                            self.body_bytes = 0;
                            let no_body =
                                head_request || status == 204 || status == 304 || status == 101;
                            self.state = if no_body {
                                return Ok(self.finish(i));
                            } else if chunked {
                                State::ChunkSize {
                                    size: 0,
                                    digits: 0,
                                    ext: false,
                                }
                            } else if let Some(len) = length.filter(|_| !coded) {
                                if len == 0 {
                                    return Ok(self.finish(i));
                                }
                                State::Length { left: len }
                            } else {
                                self.close = true;
                                State::UntilClose
                            };
                        }
                    }
                }
                State::Length { left } => {
                    let take = ((buf.len() - i) as u64).min(left);
                    i += take as usize;
                    self.body_bytes += take;
                    if take == left {
                        return Ok(self.finish(i));
                    }
                    self.state = State::Length { left: left - take };
                    return Ok(Progress {
                        consumed: i,
                        done: None,
                    });
                }
                State::ChunkData { left } => {
                    let take = ((buf.len() - i) as u64).min(left);
                    i += take as usize;
                    self.body_bytes += take;
                    self.state = if take == left {
                        State::ChunkDataCr
                    } else {
                        State::ChunkData { left: left - take }
                    };
                    if i == buf.len() {
                        return Ok(Progress {
                            consumed: i,
                            done: None,
                        });
                    }
                }
                State::UntilClose => {
                    self.body_bytes += (buf.len() - i) as u64;
                    return Ok(Progress {
                        consumed: buf.len(),
                        done: None,
                    });
                }
                _ => {
                    // Byte-at-a-time states of the chunked framing.
                    let Some(&b) = buf.get(i) else {
                        return Ok(Progress {
                            consumed: i,
                            done: None,
                        });
                    };
                    i += 1;
                    self.state = match (self.state, b) {
                        (
                            State::ChunkSize {
                                size,
                                digits,
                                ext: false,
                            },
                            _,
                        ) if b.is_ascii_hexdigit() => {
                            if digits >= 16 {
                                return Err(ReadError::BadChunk);
                            }
                            let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                            State::ChunkSize {
                                size: size << 4 | v,
                                digits: digits + 1,
                                ext: false,
                            }
                        }
                        (State::ChunkSize { size, digits, .. }, b'\r') if digits > 0 => {
                            State::ChunkSizeLf { size }
                        }
                        (State::ChunkSize { size, digits, .. }, _) if digits > 0 && b != b'\n' => {
                            State::ChunkSize {
                                size,
                                digits,
                                ext: true,
                            }
                        }
                        (State::ChunkSizeLf { size: 0 }, b'\n') => State::TrailerStart,
                        (State::ChunkSizeLf { size }, b'\n') => State::ChunkData { left: size },
                        (State::ChunkDataCr, b'\r') => State::ChunkDataLf,
                        (State::ChunkDataLf, b'\n') => State::ChunkSize {
                            size: 0,
                            digits: 0,
                            ext: false,
                        },
                        (State::TrailerStart, b'\r') => State::TrailerLf { empty: true },
                        (State::TrailerStart | State::TrailerLine, b'\n') => {
                            return Err(ReadError::BadChunk)
                        }
                        (State::TrailerLine, b'\r') => State::TrailerLf { empty: false },
                        (State::TrailerStart | State::TrailerLine, _) => State::TrailerLine,
                        (State::TrailerLf { empty: true }, b'\n') => return Ok(self.finish(i)),
                        (State::TrailerLf { empty: false }, b'\n') => State::TrailerStart,
                        _ => return Err(ReadError::BadChunk),
                    };
                }
            }
        }
    }

    /// The connection reached EOF: completes a close-delimited response.
    /// Body bytes of the current response that may be received without
    /// being looked at: the rest of a Content-Length body, of a chunk's
    /// data, or (`u64::MAX`) of a close-delimited body; 0 elsewhere.
    pub fn skippable(&self) -> u64 {
        match self.state {
            State::Length { left } | State::ChunkData { left } => left,
            State::UntilClose => u64::MAX,
            _ => 0,
        }
    }

    /// Counts `n` body bytes (at most [`Self::skippable`]) as received
    /// without their bytes. If they were the last of a Content-Length body,
    /// the next [`Self::feed`], even of no bytes, completes the response
    /// ([`Self::skipped_to_end`]).
    pub fn skip(&mut self, n: u64) {
        match &mut self.state {
            State::Length { left } | State::ChunkData { left } => {
                let n = n.min(*left);
                *left -= n;
                self.body_bytes += n;
            }
            State::UntilClose => self.body_bytes += n,
            _ => {}
        }
    }

    /// Whether a skip reached the end of a Content-Length body: the
    /// response completes at the next feed.
    pub fn skipped_to_end(&self) -> bool {
        self.state == State::Length { left: 0 }
    }

    pub fn eof(&mut self) -> Result<Option<Completed>, ReadError> {
        match self.state {
            State::Head => Ok(None),
            State::UntilClose => Ok(self.finish(0).done),
            _ => Err(ReadError::Truncated),
        }
    }

    fn finish(&mut self, consumed: usize) -> Progress {
        self.state = State::Head;
        Progress {
            consumed,
            done: Some(Completed {
                status: self.status,
                close: self.close,
                body_bytes: self.body_bytes,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; the completed responses.
    fn feed_all(input: &[u8], step: usize, head: bool) -> Result<Vec<Completed>, ReadError> {
        let mut r = ResponseReader::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                let p = r.feed(&buf, head)?;
                buf.drain(..p.consumed);
                match p.done {
                    Some(c) => out.push(c),
                    None => break,
                }
            }
        }
        if let Some(c) = r.eof()? {
            out.push(c);
        }
        Ok(out)
    }

    /// Feeds `input` split at every byte; asserts each split reads `want`
    /// (status, body bytes, close) in order.
    fn reads_at_every_split(input: &[u8], want: &[(u16, u64, bool)]) {
        for step in 1..input.len() {
            let got = feed_all(input, step, false).unwrap();
            let summary: Vec<(u16, u64, bool)> = got
                .iter()
                .map(|c| (c.status, c.body_bytes, c.close))
                .collect();
            assert_eq!(summary, want, "step {step}");
        }
    }

    #[test]
    fn skipped_body_bytes_count_and_framing_holds() {
        // A Content-Length body skipped in two steps, a chunk's data
        // skipped, then a close-delimited body: every response completes
        // with its byte count, and what follows each still parses.
        let mut r = ResponseReader::new();
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\nab";
        let p = r.feed(head, false).unwrap();
        assert_eq!((p.consumed, p.done), (head.len(), None));
        assert_eq!(r.skippable(), 9998);
        r.skip(5000);
        assert!(!r.skipped_to_end());
        r.skip(4998);
        assert!(r.skipped_to_end());
        let p = r.feed(b"", false).unwrap();
        assert_eq!(
            p.done,
            Some(Completed {
                status: 200,
                close: false,
                body_bytes: 10000
            })
        );
        assert_eq!(r.skippable(), 0);
        let p = r
            .feed(
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\nxy",
                false,
            )
            .unwrap();
        assert_eq!(p.done, None);
        assert_eq!(r.skippable(), 0x1000 - 2);
        r.skip(0x1000 - 2);
        assert!(!r.skipped_to_end());
        let p = r.feed(b"\r\n0\r\n\r\n", false).unwrap();
        assert_eq!(
            p.done.map(|d| (d.status, d.body_bytes)),
            Some((201, 0x1000))
        );
        let p = r.feed(b"HTTP/1.0 200 OK\r\n\r\nabc", false).unwrap();
        assert_eq!(p.done, None);
        assert_eq!(r.skippable(), u64::MAX);
        r.skip(7);
        assert_eq!(r.eof().unwrap().map(|d| d.body_bytes), Some(10));
    }

    #[test]
    fn framings_at_every_split() {
        let input: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\nHTTP/1.0 200 OK\r\n\r\nuntil close";
        reads_at_every_split(
            input,
            &[
                (200, 5, false),
                (201, 19, false),
                (204, 0, false),
                (404, 0, false),
                (200, 11, true),
            ],
        );
    }

    #[test]
    fn a_coding_other_than_chunked_runs_to_the_close() {
        // RFC 9112 §6.3: Transfer-Encoding without chunked last overrides
        // Content-Length; the body ends with the connection.
        reads_at_every_split(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabcdef",
            &[(200, 6, true)],
        );
        // gzip then chunked (in two fields) is chunked.
        reads_at_every_split(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
            &[(200, 2, false)],
        );
    }

    #[test]
    fn head_responses_have_no_body() {
        let got = feed_all(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 7, true).unwrap();
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn a_switch_of_protocols_is_final_and_ends_the_connection() {
        reads_at_every_split(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
            &[(101, 0, true)],
        );
    }

    #[test]
    fn not_modified_and_head_ignore_their_framing_fields() {
        let input: &[u8] = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let got = feed_all(input, 5, false).unwrap();
        let summary: Vec<(u16, u64)> = got.iter().map(|c| (c.status, c.body_bytes)).collect();
        assert_eq!(summary, vec![(304, 0), (200, 2)]);
        let got = feed_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            3,
            true,
        )
        .unwrap();
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn truncation_and_garbage() {
        assert_eq!(
            feed_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                4,
                false
            ),
            Err(ReadError::Truncated)
        );
        assert_eq!(
            feed_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                100,
                false
            ),
            Err(ReadError::BadChunk)
        );
        assert_eq!(
            feed_all(b"NOT HTTP\r\n\r\n", 100, false),
            Err(ReadError::BadHead)
        );
        let r = feed_all(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
            3,
            false,
        )
        .unwrap();
        assert!(r[0].close);
    }
}
