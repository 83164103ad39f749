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

impl From<NetError> for BodyError {
    fn from(e: NetError) -> BodyError {
        match e {
            NetError::TimedOut => BodyError::TimedOut,
            NetError::Io(e) => BodyError::Io(e),
        }
    }
}

/// What the bytes at hand give ([`BodyReader::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `buf.filled()[..n]` is body data.
    Data(usize),
    /// The body is complete.
    End,
    /// More bytes must be read first.
    NeedRead,
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
            match self.step(buf)? {
                Step::Data(n) => return Ok(Some(n)),
                Step::End => return Ok(None),
                Step::NeedRead => self.fill(up, buf, idle).await?,
            }
        }
    }

    /// What the bytes already in `buf` give, without reading.
    pub fn step(&mut self, buf: &mut Buf) -> Result<Step, BodyError> {
        if self.done {
            return Ok(Step::End);
        }
        if buf.is_empty() {
            return Ok(Step::NeedRead);
        }
        Ok(match self.kind {
            BodyKind::Empty => {
                self.done = true;
                Step::End
            }
            BodyKind::Length(_) => {
                let n = (self.left as usize).min(buf.len());
                self.left -= n as u64;
                self.done = self.left == 0;
                Step::Data(n)
            }
            BodyKind::Close => Step::Data(buf.len()),
            BodyKind::Chunked => match self.dec.decode(buf.filled()) {
                Ok(Decoded::NeedMore { consumed }) => {
                    buf.consume(consumed);
                    Step::NeedRead
                }
                Ok(Decoded::Data { start, len, .. }) => {
                    buf.consume(start);
                    Step::Data(len)
                }
                Ok(Decoded::Done { consumed }) => {
                    buf.consume(consumed);
                    self.done = true;
                    Step::End
                }
                Err(e) => return Err(BodyError::Bad(e.reason())),
            },
        })
    }

    /// Reads more of the body into `buf`, waiting at most `idle`.
    pub async fn fill(
        &mut self,
        up: &mut Sock,
        buf: &mut Buf,
        idle: Duration,
    ) -> Result<(), BodyError> {
        let n = up
            .read(self.room(buf), Instant::now() + idle)
            .await
            .map_err(BodyError::from)?;
        self.got(buf, n)
    }

    /// [`Self::fill`] if bytes (or the end) are there already: whether it
    /// read; never waits.
    pub fn try_fill(&mut self, up: &mut Sock, buf: &mut Buf) -> Result<bool, BodyError> {
        match up.try_read_now(self.room(buf)).map_err(BodyError::from)? {
            Some(n) => self.got(buf, n).map(|()| true),
            None => Ok(false),
        }
    }

    /// Where one read goes: free space in `buf`, never past the end of a
    /// length-delimited body.
    fn room<'a>(&self, buf: &'a mut Buf) -> &'a mut [u8] {
        let space = buf.space(16 * 1024, UPSTREAM_BUF);
        let cap = match self.kind {
            BodyKind::Length(_) => (self.left as usize).min(space.len()),
            _ => space.len(),
        };
        &mut space[..cap]
    }

    fn got(&mut self, buf: &mut Buf, n: usize) -> Result<(), BodyError> {
        match n {
            0 if self.kind == BodyKind::Close => {
                self.done = true;
                Ok(())
            }
            0 => Err(BodyError::Truncated),
            n => {
                buf.advance(n);
                Ok(())
            }
        }
    }
}
