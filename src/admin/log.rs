//! The access log: each shard formats its lines into its own buffer, and
//! hands full buffers to one writer thread over a bounded channel. A shard
//! never waits on the disk: when the writer falls behind, a buffer is dropped
//! and counted (`corral_access_log_dropped_bytes_total`).

use crate::config::{AccessLog, LogFormat};
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A shard hands its buffer over at this size (or at its 100 ms housekeeping tick).
pub const FLUSH_AT: usize = 64 * 1024;
/// Buffers in flight to the writer before new ones are dropped.
const QUEUE: usize = 64;

/// The writer thread, as the shards and the process's end see it.
pub struct Writer {
    /// Every shard's sender is a clone.
    pub tx: crossbeam_channel::Sender<Vec<u8>>,
    /// Bytes the writer could not write (disk full, I/O error): counted with
    /// the dropped ones.
    pub lost: Arc<AtomicU64>,
    pub handle: std::thread::JoinHandle<()>,
}

/// Starts the writer thread.
pub fn start_writer(cfg: &AccessLog) -> std::io::Result<Writer> {
    let mut out: Box<dyn Write + Send> = match &cfg.path {
        None => Box::new(std::io::stderr()),
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
    };
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(QUEUE);
    let lost = Arc::new(AtomicU64::new(0));
    let counted = lost.clone();
    let handle = std::thread::Builder::new()
        .name("corral-access-log".into())
        .spawn(move || {
            let mut said = false;
            for buf in rx {
                if let Err(e) = out.write_all(&buf).and_then(|()| out.flush()) {
                    counted.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    if !said {
                        // Once: a full disk would otherwise say it per buffer.
                        eprintln!("corral: cannot write the access log ({e}); lines are lost and counted in corral_access_log_dropped_bytes_total");
                        said = true;
                    }
                }
            }
        })?;
    Ok(Writer { tx, lost, handle })
}

/// What one log line says.
pub struct Entry<'a> {
    pub client: &'a str,
    pub method: &'a [u8],
    pub target: &'a [u8],
    /// The request's HTTP/1.x minor version; `None` when no request line
    /// parsed (the line then reads `"-"`, as Apache writes it).
    pub minor: Option<u8>,
    pub status: u16,
    pub bytes: u64,
    pub duration_us: u64,
    pub cache: &'static str,
    /// Seconds since the Unix epoch.
    pub time: i64,
}

/// One shard's side of the log.
pub struct ShardLog {
    format: LogFormat,
    tx: crossbeam_channel::Sender<Vec<u8>>,
    buf: RefCell<Vec<u8>>,
    /// The formatted time of the second last formatted.
    stamp: RefCell<(i64, String)>,
    pub dropped: Cell<u64>,
    /// The writer's own losses, reported by one shard only.
    lost: Option<Arc<AtomicU64>>,
}

impl ShardLog {
    /// `lost`: the writer's count of bytes it failed to write, for the one
    /// shard that reports it (the counter is process-wide).
    pub fn new(
        format: LogFormat,
        tx: crossbeam_channel::Sender<Vec<u8>>,
        lost: Option<Arc<AtomicU64>>,
    ) -> ShardLog {
        ShardLog {
            format,
            tx,
            buf: RefCell::new(Vec::with_capacity(FLUSH_AT + 1024)),
            stamp: RefCell::new((i64::MIN, String::new())),
            dropped: Cell::new(0),
            lost,
        }
    }

    /// Bytes of this shard's lines dropped (the writer behind), plus, on
    /// the reporting shard, those the writer failed to write.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped.get() + self.lost.as_ref().map_or(0, |l| l.load(Ordering::Relaxed))
    }

    /// Appends one line; hands the buffer over when it is full.
    pub fn write(&self, e: &Entry<'_>) {
        let full = {
            let mut buf = self.buf.borrow_mut();
            let mut stamp = self.stamp.borrow_mut();
            if stamp.0 != e.time {
                *stamp = (e.time, clf_time(e.time));
            }
            match self.format {
                LogFormat::Common => common(&mut buf, e, &stamp.1),
                LogFormat::Json => json(&mut buf, e),
            }
            buf.len() >= FLUSH_AT
        };
        if full {
            self.flush();
        }
    }

    /// Hands what is buffered to the writer, without waiting.
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        let out = std::mem::replace(&mut *buf, Vec::with_capacity(FLUSH_AT + 1024));
        let n = out.len() as u64;
        if self.tx.try_send(out).is_err() {
            self.dropped.set(self.dropped.get() + n);
        }
    }
}

/// Bytes as log text: printable ASCII kept, `"` and `\` escaped, the rest
/// `\xNN` (common format) or `\u00NN` (JSON), so a hostile target can
/// neither forge a line nor break the JSON.
fn escaped(out: &mut Vec<u8>, s: &[u8], json: bool) {
    for &b in s {
        match b {
            b'"' | b'\\' => {
                out.push(b'\\');
                out.push(b);
            }
            0x20..=0x7e => out.push(b),
            _ if json => {
                let _ = write!(out, "\\u{b:04x}");
            }
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
}

/// `127.0.0.1 - - [27/Nov/2026:07:18:31 +0000] "GET / HTTP/1.1" 200 1024`
fn common(out: &mut Vec<u8>, e: &Entry<'_>, time: &str) {
    out.extend_from_slice(e.client.as_bytes());
    out.extend_from_slice(b" - - [");
    out.extend_from_slice(time.as_bytes());
    out.extend_from_slice(b"] \"");
    match e.minor {
        Some(minor) => {
            escaped(out, e.method, false);
            out.push(b' ');
            escaped(out, e.target, false);
            let _ = write!(out, " HTTP/1.{minor}");
        }
        None => out.push(b'-'),
    }
    let _ = writeln!(out, "\" {} {}", e.status, e.bytes);
}

fn json(out: &mut Vec<u8>, e: &Entry<'_>) {
    let _ = write!(out, "{{\"time\":{},\"client\":\"", e.time);
    escaped(out, e.client.as_bytes(), true);
    out.extend_from_slice(b"\",\"method\":\"");
    escaped(out, e.method, true);
    out.extend_from_slice(b"\",\"target\":\"");
    escaped(out, e.target, true);
    out.extend_from_slice(b"\",\"version\":\"");
    match e.minor {
        Some(minor) => {
            let _ = write!(out, "HTTP/1.{minor}");
        }
        None => out.push(b'-'),
    }
    let _ = writeln!(
        out,
        "\",\"status\":{},\"bytes\":{},\"duration_us\":{},\"cache\":\"{}\"}}",
        e.status, e.bytes, e.duration_us, e.cache
    );
}

/// `27/Nov/2026:07:18:31 +0000`
pub fn clf_time(t: i64) -> String {
    // From the HTTP date ("Fri, 27 Nov 2026 07:18:31 GMT"), reordered.
    let d = crate::cache::policy::format_http_date(t);
    let p: Vec<&str> = d.split_whitespace().collect();
    match p.as_slice() {
        [_, day, mon, year, hms, _] => format!("{day}/{mon}/{year}:{hms} +0000"),
        _ => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(target: &'a [u8]) -> Entry<'a> {
        Entry {
            client: "127.0.0.1",
            method: b"GET",
            target,
            minor: Some(1),
            status: 200,
            bytes: 1024,
            duration_us: 250,
            cache: "hit",
            time: 1_795_763_911,
        }
    }

    #[test]
    fn formats_common_and_json_lines() {
        let mut out = Vec::new();
        common(&mut out, &entry(b"/a?b=1"), &clf_time(1_795_763_911));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "127.0.0.1 - - [27/Nov/2026:07:18:31 +0000] \"GET /a?b=1 HTTP/1.1\" 200 1024\n"
        );
        let mut out = Vec::new();
        json(&mut out, &entry(b"/x\"\n"));
        let line = String::from_utf8(out).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["target"], "/x\"\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["cache"], "hit");
        assert_eq!(v["version"], "HTTP/1.1");
    }

    #[test]
    fn a_request_that_did_not_parse_is_logged_as_a_dash() {
        let e = Entry {
            method: b"-",
            target: b"-",
            minor: None,
            status: 400,
            ..entry(b"-")
        };
        let mut out = Vec::new();
        common(&mut out, &e, &clf_time(1_795_763_911));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "127.0.0.1 - - [27/Nov/2026:07:18:31 +0000] \"-\" 400 1024\n"
        );
        let mut out = Vec::new();
        json(&mut out, &e);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["version"], "-");
        assert_eq!(v["method"], "-");
        assert_eq!(v["status"], 400);
    }
}
