//! One exchange with a backend, the parts shared by pass-through and cache
//! fills: getting a connection (pooled or new), and reading a response head.

use super::pool::{FailKind, UpstreamPool};
use crate::http::response::{parse_response, ResponseHead, UpstreamError};
use crate::shard::buf::Buf;
use crate::shard::net::{NetError, Sock};
use std::time::Instant;

/// Largest upstream response head accepted (502 beyond).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why an upstream exchange failed before the response head.
#[derive(Debug)]
pub enum UpstreamFail {
    /// Refused, reset, closed or malformed: 502.
    Bad(String),
    /// Connect, send or response-head timeout: 504.
    Timeout(String),
    /// A reused keep-alive connection failed before any response byte: safe
    /// to retry on a fresh connection when the request had no body.
    Stale,
    /// The same, failing already at the write of a bodiless request's head
    /// (a small write to an idle connection is taken whole or not at all):
    /// the request never reached the backend, so any method may be retried
    /// on a fresh connection.
    Unsent,
    /// The client's body broke a rule (413, 400): answer it and close.
    Client(crate::http::ClientError),
    /// The client went away mid-request: close quietly.
    ClientGone,
    /// No backend of the pool is usable: 503.
    NoBackend,
}

impl UpstreamFail {
    /// The status a client gets for it.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamFail::Timeout(_) => 504,
            UpstreamFail::Client(e) => e.status(),
            UpstreamFail::NoBackend => 503,
            _ => 502,
        }
    }
}

/// A connection to backend `b` of `pool`: pooled if one is idle (verified
/// first when `verify`), else new. The flag says whether it was reused. A
/// failed connect is reported to the pool's health.
pub async fn connection(
    pool: &UpstreamPool,
    b: usize,
    verify: bool,
    fresh: bool,
) -> Result<(Sock, bool), UpstreamFail> {
    if let Some(s) = (!fresh)
        .then(|| pool.checkout(b, Instant::now(), verify))
        .flatten()
    {
        return Ok((s, true));
    }
    let backend = &pool.cfg.backends[b];
    match Sock::connect(backend.addr, pool.cfg.connect_timeout).await {
        Ok(s) => Ok((s, false)),
        Err(NetError::TimedOut) => {
            pool.failed(b, FailKind::ConnectTimeout);
            Err(UpstreamFail::Timeout(format!(
                "connect to {} timed out",
                backend.describe()
            )))
        }
        Err(NetError::Io(e)) => {
            pool.failed(b, FailKind::Connect);
            Err(UpstreamFail::Bad(format!(
                "connect to {} failed: {e}",
                backend.describe()
            )))
        }
    }
}

/// What [`read_head`] found.
pub enum Head {
    /// The final response head is in `rhead` (its bytes at the front of the buffer).
    Final,
    /// An interim (1xx) head is in `rhead`; the caller consumes it and calls again.
    Interim,
}

/// Reads one response head into `rhead`, from what is buffered in `ubuf`
/// and then from `up`, until `deadline`.
pub async fn read_head(
    up: &mut Sock,
    ubuf: &mut Buf,
    rhead: &mut ResponseHead,
    head_request: bool,
    deadline: Instant,
    reused: bool,
) -> Result<Head, UpstreamFail> {
    loop {
        if !ubuf.is_empty() {
            let done = parse_response(ubuf.filled(), head_request, MAX_RESPONSE_HEAD, rhead)
                .map_err(|UpstreamError::BadHead(m)| UpstreamFail::Bad(m.to_string()))?;
            if done {
                return match rhead.code {
                    101 => Err(UpstreamFail::Bad("backend switched protocols".into())),
                    100..=199 => Ok(Head::Interim),
                    _ => Ok(Head::Final),
                };
            }
        }
        let space = ubuf.space(4096, MAX_RESPONSE_HEAD + 4096);
        match up.read(space, deadline).await {
            Ok(0) | Err(NetError::Io(_)) if reused && ubuf.is_empty() => {
                return Err(UpstreamFail::Stale)
            }
            Ok(0) => {
                return Err(UpstreamFail::Bad(
                    "backend closed the connection before a response".into(),
                ))
            }
            Ok(n) => ubuf.advance(n),
            Err(NetError::TimedOut) => {
                return Err(UpstreamFail::Timeout("response head timed out".into()))
            }
            Err(NetError::Io(e)) => {
                return Err(UpstreamFail::Bad(format!("reading response failed: {e}")))
            }
        }
    }
}
