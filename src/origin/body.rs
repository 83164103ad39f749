//! Reading a response body from upstream, whatever its framing (RFC 9112
//! §6.3): yields the body's bytes in pieces, consuming the framing, until
//! the end. Shared by pass-through streaming and cache fills.

use crate::http::chunked::{ChunkedDecoder, Decoded};
use crate::http::BodyKind;
use crate::shard::buf::Buf;
use crate::shard::net::{NetError, Sock};
use std::time::{Duration, Instant};

/// The most bytes buffered from upstream at once.
pub const UPSTREAM_BUF: usize = 64 * 1024;

#[derive(Debug)]
pub enum BodyError {
    /// No byte arrived within the body idle timeout.
    TimedOut,
    /// The connection ended before the body did.
    Truncated,
    /// A read failed.
    Io(std::io::Error),
    /// The chunked framing was invalid.
    Bad(&'static str),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TimedOut => f.write_str("body timed out"),
            BodyError::Truncated => f.write_str("connection closed mid-body"),
            BodyError::Io(e) => write!(f, "body read failed: {e}"),
            BodyError::Bad(r) => write!(f, "bad chunked body: {r}"),
        }
    }
}

pub struct BodyReader {
    kind: BodyKind,
    /// Bytes still to come of a length-delimited body.
    left: u64,
    dec: ChunkedDecoder,
    done: bool,
}

impl BodyReader {
    pub fn new(kind: BodyKind) -> BodyReader {
        let left = match kind {
            BodyKind::Length(n) => n,
            _ => 0,
        };
        BodyReader {
            kind,
            left,
            dec: ChunkedDecoder::new(),
            done: matches!(kind, BodyKind::Empty | BodyKind::Length(0)),
        }
    }

    /// Whether the connection can carry another exchange once the body ended.
    pub fn reusable(&self) -> bool {
        self.done && self.kind != BodyKind::Close
    }

    /// The next piece of body: `Some(n)` means `buf.filled()[..n]` is body
    /// data, which the caller consumes with `buf.consume(n)` when done with
    /// it. `None` at the end of the body.
    pub async fn next(
        &mut self,
        up: &mut Sock,
        buf: &mut Buf,
        idle: Duration,
    ) -> Result<Option<usize>, BodyError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if !buf.is_empty() {
                match self.kind {
                    BodyKind::Empty => {
                        self.done = true;
                        return Ok(None);
                    }
                    BodyKind::Length(_) => {
                        let n = (self.left as usize).min(buf.len());
                        self.left -= n as u64;
                        self.done = self.left == 0;
                        return Ok(Some(n));
                    }
                    BodyKind::Close => return Ok(Some(buf.len())),
                    BodyKind::Chunked => match self.dec.decode(buf.filled()) {
                        Ok(Decoded::NeedMore { consumed }) => buf.consume(consumed),
                        Ok(Decoded::Data { start, len, .. }) => {
                            buf.consume(start);
                            return Ok(Some(len));
                        }
                        Ok(Decoded::Done { consumed }) => {
                            buf.consume(consumed);
                            self.done = true;
                            return Ok(None);
                        }
                        Err(e) => return Err(BodyError::Bad(e.reason())),
                    },
                }
            }
            let space = buf.space(16 * 1024, UPSTREAM_BUF);
            // Never read past a length-delimited body.
            let cap = match self.kind {
                BodyKind::Length(_) => (self.left as usize).min(space.len()),
                _ => space.len(),
            };
            match up.read(&mut space[..cap], Instant::now() + idle).await {
                Ok(0) if self.kind == BodyKind::Close => {
                    self.done = true;
                    return Ok(None);
                }
                Ok(0) => return Err(BodyError::Truncated),
                Ok(n) => buf.advance(n),
                Err(NetError::TimedOut) => return Err(BodyError::TimedOut),
                Err(NetError::Io(e)) => return Err(BodyError::Io(e)),
            }
        }
    }
}
