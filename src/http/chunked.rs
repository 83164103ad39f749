//! The chunked transfer coding (RFC 9112 §7.1): an incremental decoder that
//! accepts input split anywhere, and the encoder. Pure.
//!
//! The decoder is strict where leniency enables request smuggling: chunk
//! lines must end in CRLF (a bare LF or bare CR is an error), sizes are hex
//! digits only (no sign, no `0x`), at most 16 digits, and chunk data must be
//! followed by exactly CRLF. Extensions are skipped; trailer fields are read
//! and discarded (corral does not forward trailers).

/// The longest chunk-size line (size plus extensions) accepted.
const MAX_LINE_BYTES: usize = 4096;
/// The most trailer bytes accepted after the last chunk.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    BadSize,
    BadLineEnd,
    LineTooLong,
    BadDataEnd,
    TrailerTooLarge,
}

impl ChunkError {
    pub fn reason(self) -> &'static str {
        match self {
            ChunkError::BadSize => "invalid chunk size",
            ChunkError::BadLineEnd => "chunk line not ended by CRLF",
            ChunkError::LineTooLong => "chunk size line too long",
            ChunkError::BadDataEnd => "chunk data not followed by CRLF",
            ChunkError::TrailerTooLarge => "chunked trailer too large",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size; `digits` counted so far.
    Size { digits: u8 },
    /// After the size: optional whitespace, then `;` extensions or CR.
    SizeWs,
    /// Inside chunk extensions, until CR.
    Ext,
    /// Saw CR ending the size line; expecting LF.
    SizeLf,
    /// Inside chunk data; `remaining` bytes to go.
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// Saw CR ending a trailer line; expecting LF.
    TrailerLf { empty: bool },
    /// The terminating empty line has been read.
    Done,
}

/// What one call to [`ChunkedDecoder::decode`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// `consumed` bytes of framing were eaten; more input is needed.
    NeedMore { consumed: usize },
    /// Body data at `input[start..start + len]`; `consumed` counts through it.
    Data {
        consumed: usize,
        start: usize,
        len: usize,
    },
    /// The message is complete after `consumed` bytes; anything after belongs
    /// to the next message.
    Done { consumed: usize },
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Size of the current chunk while reading its size, then the bytes of it
    /// still to come while in `Data`.
    remaining: u64,
    line_bytes: usize,
    trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            remaining: 0,
            line_bytes: 0,
            trailer_bytes: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input` until it yields data, finishes, or runs out.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size { digits } => {
                    let v = match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        b'A'..=b'F' => b - b'A' + 10,
                        _ => {
                            if digits == 0 {
                                return Err(ChunkError::BadSize);
                            }
                            self.state = State::SizeWs;
                            continue; // re-examine this byte
                        }
                    };
                    // Leading zeros are allowed (`0000000000000001a`);
                    // a size past u64 is not.
                    if self.remaining >> 60 != 0 {
                        return Err(ChunkError::BadSize);
                    }
                    self.remaining = (self.remaining << 4) | u64::from(v);
                    self.state = State::Size {
                        digits: digits.saturating_add(1),
                    };
                    self.bump_line()?;
                }
                State::SizeWs => match b {
                    b' ' | b'\t' => self.bump_line()?,
                    b';' => {
                        self.state = State::Ext;
                        self.bump_line()?;
                    }
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError::BadLineEnd),
                    _ => return Err(ChunkError::BadSize),
                },
                State::Ext => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError::BadLineEnd),
                    0..=8 | 10..=31 | 127 => return Err(ChunkError::BadSize),
                    _ => self.bump_line()?,
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.line_bytes = 0;
                    self.state = if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let avail = (input.len() - i) as u64;
                    let take = avail.min(self.remaining) as usize;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok(Decoded::Data {
                        consumed: i + take,
                        start: i,
                        len: take,
                    });
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::BadDataEnd);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadDataEnd);
                    }
                    self.state = State::Size { digits: 0 };
                }
                State::TrailerStart => {
                    self.bump_trailer()?;
                    match b {
                        b'\r' => self.state = State::TrailerLf { empty: true },
                        b'\n' => return Err(ChunkError::BadLineEnd),
                        _ => self.state = State::TrailerLine,
                    }
                }
                State::TrailerLine => {
                    self.bump_trailer()?;
                    match b {
                        b'\r' => self.state = State::TrailerLf { empty: false },
                        b'\n' => return Err(ChunkError::BadLineEnd),
                        _ => {}
                    }
                }
                State::TrailerLf { empty } => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    if empty {
                        self.state = State::Done;
                        return Ok(Decoded::Done { consumed: i + 1 });
                    }
                    self.state = State::TrailerStart;
                }
                State::Done => return Ok(Decoded::Done { consumed: i }),
            }
            i += 1;
        }
        if self.state == State::Done {
            return Ok(Decoded::Done { consumed: i });
        }
        Ok(Decoded::NeedMore { consumed: i })
    }

    fn bump_line(&mut self) -> Result<(), ChunkError> {
        self.line_bytes += 1;
        if self.line_bytes > MAX_LINE_BYTES {
            return Err(ChunkError::LineTooLong);
        }
        Ok(())
    }

    fn bump_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILER_BYTES {
            return Err(ChunkError::TrailerTooLarge);
        }
        Ok(())
    }
}

/// Appends the chunk-size line for a chunk of `len` bytes (`len` > 0).
pub fn encode_chunk_head(out: &mut Vec<u8>, len: usize) {
    let mut tmp = [0u8; 18];
    let mut n = len;
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The CRLF that ends every chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk and the empty trailer.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Decodes a whole buffer at once: the body and the bytes consumed, or
/// `None` if incomplete. For tests and the fuzz target.
pub fn decode_all(input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ChunkError> {
    let mut d = ChunkedDecoder::new();
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        match d.decode(&input[pos..])? {
            Decoded::NeedMore { .. } => return Ok(None),
            Decoded::Data {
                consumed,
                start,
                len,
            } => {
                body.extend_from_slice(&input[pos + start..pos + start + len]);
                pos += consumed;
            }
            Decoded::Done { consumed } => return Ok(Some((body, pos + consumed))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` split at `split`, returning body and total consumed.
    fn decode_split(input: &[u8], split: usize) -> Result<Option<(Vec<u8>, usize)>, ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut body = Vec::new();
        // Simulate a receive buffer: unconsumed bytes stay, new bytes append.
        let mut buf: Vec<u8> = Vec::new();
        let mut total = 0;
        for part in [&input[..split], &input[split..]] {
            buf.extend_from_slice(part);
            loop {
                match d.decode(&buf)? {
                    Decoded::NeedMore { consumed } => {
                        buf.drain(..consumed);
                        total += consumed;
                        break;
                    }
                    Decoded::Data {
                        consumed,
                        start,
                        len,
                    } => {
                        body.extend_from_slice(&buf[start..start + len]);
                        buf.drain(..consumed);
                        total += consumed;
                    }
                    Decoded::Done { consumed } => return Ok(Some((body, total + consumed))),
                }
            }
        }
        Ok(None)
    }

    #[test]
    fn decodes_at_every_split() {
        let msg = b"5\r\nhello\r\n1;ext=1\r\n \r\nA \r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let want = b"hello 0123456789".to_vec();
        for split in 0..=msg.len() {
            let got = decode_split(msg, split).unwrap().unwrap();
            assert_eq!(got.0, want, "split at {split}");
            assert_eq!(got.1, msg.len() - 4, "split at {split}");
        }
    }

    #[test]
    fn rejects_smuggling_shapes() {
        let bad: &[&[u8]] = &[
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\rhello\r\n0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"0\r\n\n",
            b"0\r\nX: y\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        ];
        for m in bad {
            assert!(
                decode_all(m).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(m)
            );
        }
    }

    #[test]
    fn large_size_and_incomplete() {
        assert_eq!(decode_all(b"ffffffffffffffff\r\nab").unwrap(), None);
        // Leading zeros do not count against the size; a size past u64 is
        // refused.
        assert_eq!(
            decode_all(b"00000000000000000005\r\nhello\r\n0\r\n\r\n")
                .unwrap()
                .map(|(body, _)| body),
            Some(b"hello".to_vec())
        );
        assert!(decode_all(b"10000000000000000\r\n").is_err());
        assert_eq!(decode_all(b"5\r\nhel").unwrap(), None);
        assert_eq!(decode_all(b"0\r\n\r\n").unwrap(), Some((vec![], 5)));
    }

    #[test]
    fn encoder_roundtrip() {
        for len in [1usize, 9, 10, 15, 16, 255, 4096, 65535, 1 << 20] {
            let data = vec![b'x'; len];
            let mut out = Vec::new();
            encode_chunk_head(&mut out, len);
            out.extend_from_slice(&data);
            out.extend_from_slice(CHUNK_END);
            out.extend_from_slice(LAST_CHUNK);
            let (body, used) = decode_all(&out).unwrap().unwrap();
            assert_eq!(body.len(), len);
            assert_eq!(used, out.len());
        }
    }

    proptest::proptest! {
        #[test]
        fn roundtrip_any_chunks(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 0..8), split in 0usize..4000) {
            let mut out = Vec::new();
            let mut want = Vec::new();
            for c in &chunks {
                encode_chunk_head(&mut out, c.len());
                out.extend_from_slice(c);
                out.extend_from_slice(CHUNK_END);
                want.extend_from_slice(c);
            }
            out.extend_from_slice(LAST_CHUNK);
            let split = split.min(out.len());
            let (body, used) = decode_split(&out, split).unwrap().unwrap();
            proptest::prop_assert_eq!(body, want);
            proptest::prop_assert_eq!(used, out.len());
        }
    }
}
