//! The chunked decoder on arbitrary bytes, fed whole and split at a point the
//! input chooses: it never panics and both feeds agree exactly.
#![no_main]

use corral::http::chunked::{decode_all, ChunkedDecoder, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let whole = decode_all(input);
    let split = (first as usize).min(input.len());
    let mut d = ChunkedDecoder::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut body = Vec::new();
    let mut total = 0usize;
    let mut result = None;
    'feed: for part in [&input[..split], &input[split..]] {
        buf.extend_from_slice(part);
        loop {
            match d.decode(&buf) {
                Err(e) => {
                    result = Some(Err(e));
                    break 'feed;
                }
                Ok(Decoded::NeedMore { consumed }) => {
                    buf.drain(..consumed);
                    total += consumed;
                    break;
                }
                Ok(Decoded::Data { consumed, start, len }) => {
                    body.extend_from_slice(&buf[start..start + len]);
                    buf.drain(..consumed);
                    total += consumed;
                }
                Ok(Decoded::Done { consumed }) => {
                    result = Some(Ok(Some((body.clone(), total + consumed))));
                    break 'feed;
                }
            }
        }
    }
    let split_result = result.unwrap_or(Ok(None));
    assert_eq!(whole, split_result);
});
