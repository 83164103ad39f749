//! Answering a request from an origin store: safe paths, validators and
//! conditionals, single ranges, and the body streamed block by block.

use super::{ClientConn, Outcome};
use crate::admin::stats::Class;
use crate::cache::object::{conditional_not_modified, precondition_fails, range_ask, RangeAsk};
use crate::cache::policy::format_http_date;
use crate::http::request::Method;
use crate::http::BodyKind;
use crate::origin::store::Lookup;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// What a connection's output buffer keeps after a store response (a
/// window of blocks may have grown it to `max_merge`).
const OUT_KEEP: usize = 256 * 1024;
use std::time::Instant;

/// Why a request path cannot name a file.
#[derive(Debug, PartialEq, Eq)]
pub enum BadPath {
    /// Undecodable, or a NUL byte: 400.
    Malformed,
    /// A `..` segment: 403 (never served, whatever it would resolve to).
    Traversal,
}

/// The request path (without query), percent-decoded, as a relative path
/// of normal components: `.` and empty segments dropped, `..` refused. A
/// path ending in `/` (but `/` itself) keeps a final `.`, so that it names
/// a directory: `/a.txt/` and `/a.txt/.` are not the file `a.txt` (a 404,
/// as nginx's ENOTDIR), `/dir/` is the directory.
pub fn decode_path(path: &[u8]) -> Result<PathBuf, BadPath> {
    let (raw, clean) = crate::http::percent_decode(path);
    if !clean {
        return Err(BadPath::Malformed);
    }
    if raw.first() != Some(&b'/') || raw.contains(&0) {
        return Err(BadPath::Malformed);
    }
    let mut rel = PathBuf::new();
    for seg in raw.split(|&c| c == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => return Err(BadPath::Traversal),
            s => rel.push(std::ffi::OsStr::from_bytes(s)),
        }
    }
    // `/a.txt/.` is `/a.txt/` (RFC 3986 §5.2.4).
    let dir = raw.ends_with(b"/") || raw.ends_with(b"/.");
    if raw.len() > 1 && dir && !rel.as_os_str().is_empty() {
        rel.push(".");
    }
    Ok(rel)
}

/// Content-Type by extension.
pub fn content_type(path: &std::path::Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "txt" | "log" | "md" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "parquet" => "application/vnd.apache.parquet",
        _ => "application/octet-stream",
    }
}

impl ClientConn {
    /// Answers the parsed request from store `i`.
    pub(super) async fn serve_store(&mut self, i: usize) -> Outcome {
        let shard = self.shard.clone();
        let store = shard.stores[i].clone();
        let method = self.head.method();
        let body_unread = self.head.body() != BodyKind::Empty;
        self.class = Class::Pass;
        if body_unread || !matches!(method, Method::Get | Method::Head) {
            self.inbuf.consume(self.head.head_len);
            self.status = 405;
            self.out.clear();
            crate::http::write_simple_response(
                &mut self.out,
                405,
                "only GET and HEAD",
                true,
                crate::http::Answering {
                    head_only: method == Method::Head,
                    minor: self.head.minor,
                },
                &[("Allow", "GET, HEAD")],
            );
            let d = Instant::now() + shard.cfg.limits.body_timeout;
            let _ = self.sock.write_all(&self.out, d).await;
            self.sock.shutdown_write();
            // The body left unread must not turn the close into a reset
            // that loses the 405: lingering close, as for other errors.
            self.linger |= body_unread;
            return Outcome::Close;
        }
        let buf = self.inbuf.filled();
        let rel = match decode_path(self.head.path(buf)) {
            Ok(r) => r,
            Err(BadPath::Malformed) => return self.store_error(400, "bad path").await,
            Err(BadPath::Traversal) => return self.store_error(403, "forbidden").await,
        };
        let file = match store.lookup(&rel).await {
            Lookup::Found(f) => f,
            Lookup::NotFound => return self.store_error(404, "not found").await,
            Lookup::Forbidden | Lookup::Directory => {
                return self.store_error(403, "forbidden").await
            }
            Lookup::Failed(m) => {
                self.log(&format!("store {}: {m}", store.cfg.name));
                return self.store_error(500, "cannot read the file").await;
            }
        };
        let buf = self.inbuf.filled();
        let etag = file.etag();
        let size = file.size;
        if precondition_fails(buf, &self.head, Some(etag.as_bytes()), Some(file.mtime)) {
            return self.store_error(412, "precondition failed").await;
        }
        let (status, range) =
            if conditional_not_modified(buf, &self.head, Some(etag.as_bytes()), Some(file.mtime)) {
                (304, 0..0)
            } else if method != Method::Get {
                // Range applies to GET only (RFC 9110 §14.2).
                (200, 0..size)
            } else {
                match range_ask(buf, &self.head, size) {
                    RangeAsk::Whole => (200, 0..size),
                    RangeAsk::Part(a, b) => (206, a..b + 1),
                    RangeAsk::Unsatisfiable => (416, 0..0),
                }
            };
        let head_only = method == Method::Head || status == 304 || status == 416;
        let close = self.head.close || shard.draining();
        self.inbuf.consume(self.head.head_len);
        self.status = status;
        self.out.clear();
        let _ = write!(
            self.out,
            "HTTP/1.1 {status} {}\r\n",
            crate::http::reason_phrase(status)
        );
        crate::http::push_date_now(&mut self.out);
        if status != 304 {
            let _ = write!(self.out, "Content-Type: {}\r\n", content_type(&file.path));
        }
        let length = if status == 304 {
            None
        } else {
            Some(range.end - range.start)
        };
        if let Some(n) = length {
            let _ = write!(self.out, "Content-Length: {n}\r\n");
        }
        match status {
            206 => {
                let _ = write!(
                    self.out,
                    "Content-Range: bytes {}-{}/{size}\r\n",
                    range.start,
                    range.end - 1
                );
            }
            416 => {
                let _ = write!(self.out, "Content-Range: bytes */{size}\r\n");
            }
            _ => {}
        }
        let _ = write!(
            self.out,
            "ETag: {etag}\r\nLast-Modified: {}\r\nAccept-Ranges: bytes\r\nVia: 1.1 corral\r\n",
            format_http_date(file.mtime),
        );
        crate::http::push_connection(&mut self.out, close, self.head.minor);
        self.out.extend_from_slice(b"\r\n");
        let timeout = shard.cfg.limits.body_timeout;
        if head_only || range.is_empty() {
            let r = self.sock.write_all_idle(&self.out, timeout).await;
            self.out.clear();
            return if r.is_err() {
                Outcome::Close
            } else {
                self.keep_or_close()
            };
        }
        // The body, one window of blocks at a time: memory stays bounded
        // whatever the file size.
        let bs = store.cfg.block_size;
        let window = (store.cfg.max_merge / bs).max(1);
        let mut pos = range.start;
        let mut first_window = true;
        while pos < range.end {
            let first = pos / bs;
            let last = ((range.end - 1) / bs).min(first + window - 1);
            let failure = match store.blocks(&file, first, last).await {
                Ok(blocks) => {
                    let mut short = false;
                    for (j, block) in blocks.iter().enumerate() {
                        let start = (first + j as u64) * bs;
                        // Every block is whole up to the size the file had:
                        // a shorter one means it shrank under us, and its
                        // bytes must not close up over the gap.
                        if (block.len() as u64) < bs.min(size.saturating_sub(start)) {
                            short = true;
                            break;
                        }
                        let lo = pos.saturating_sub(start).min(block.len() as u64) as usize;
                        let hi = (range.end - start).min(block.len() as u64) as usize;
                        if lo < hi {
                            self.out.extend_from_slice(&block[lo..hi]);
                        }
                        pos = pos.max(start + hi as u64);
                    }
                    short.then(|| format!("{} is shorter than it was", file.path.display()))
                }
                Err(m) => Some(m),
            };
            if let Some(m) = failure {
                let msg = format!("store {}: {m}", store.cfg.name);
                if first_window {
                    // Nothing sent yet: an error status, not a cut message.
                    self.log(&msg);
                    self.send_error(500, "cannot read the file", close).await;
                    return if close {
                        Outcome::Close
                    } else {
                        Outcome::KeepAlive
                    };
                }
                self.out.clear();
                return self.cut_short(&msg, timeout).await;
            }
            first_window = false;
            // body_timeout bounds each wait for the client, not a window.
            let r = self.sock.write_all_idle(&self.out, timeout).await;
            self.out.clear();
            if r.is_err() {
                return Outcome::Close;
            }
        }
        // A window may have grown the buffer to `max_merge`: an idle
        // keep-alive connection does not keep more than OUT_KEEP (windows
        // up to that size keep their buffer from response to response).
        if self.out.capacity() > OUT_KEEP {
            self.out.shrink_to(OUT_KEEP);
        }
        self.keep_or_close()
    }

    /// A body that cannot be finished: send what is buffered, then reset,
    /// so the client sees a truncated message, never a short complete one.
    async fn cut_short(&mut self, why: &str, timeout: std::time::Duration) -> Outcome {
        self.log(&format!("{why}; closing the connection"));
        let _ = self.sock.write_all_idle(&self.out, timeout).await;
        self.out.clear();
        self.sock.set_reset_on_close();
        Outcome::Close
    }

    async fn store_error(&mut self, code: u16, text: &str) -> Outcome {
        self.inbuf.consume(self.head.head_len);
        let close = self.head.close;
        self.send_error(code, text, close).await;
        if close {
            Outcome::Close
        } else {
            Outcome::KeepAlive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_decode_safely() {
        assert_eq!(decode_path(b"/a/b.txt"), Ok(PathBuf::from("a/b.txt")));
        assert_eq!(decode_path(b"/a%20b/./c//d"), Ok(PathBuf::from("a b/c/d")));
        assert_eq!(decode_path(b"/a.txt/"), Ok(PathBuf::from("a.txt/.")));
        assert_eq!(decode_path(b"/"), Ok(PathBuf::new()));
        assert_eq!(decode_path(b"/../etc/passwd"), Err(BadPath::Traversal));
        assert_eq!(decode_path(b"/a/%2e%2e/%2E%2E/x"), Err(BadPath::Traversal));
        assert_eq!(decode_path(b"/a%2f..%2fb"), Err(BadPath::Traversal));
        assert_eq!(decode_path(b"/a%00b"), Err(BadPath::Malformed));
        assert_eq!(decode_path(b"/a%zz"), Err(BadPath::Malformed));
        assert_eq!(decode_path(b"a"), Err(BadPath::Malformed));
        assert_eq!(
            content_type(std::path::Path::new("x/y.HTML")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(std::path::Path::new("x/y")),
            "application/octet-stream"
        );
    }
}
