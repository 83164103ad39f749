//! Test helpers: a scriptable origin server, the corral binary started on
//! port 0, and a small blocking HTTP/1.1 client. Real sockets on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A request as the origin saw it.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    pub body_sum: u64,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A threaded origin whose behaviour is chosen by the request path:
///
/// - `/size/N`: N bytes with Content-Length
/// - `/chunked/N`: N bytes, chunked in pieces of 1000
/// - `/close/N`: N bytes, delimited by closing (no length)
/// - `/delay/MS`: waits MS, then a short body
/// - `/die/N`: announces 2N bytes, sends N, closes
/// - `/hang`: never answers
/// - `/status/CODE`: that status, body "s" unless 204/304
/// - `/echo`: the request body's length and byte sum as `LEN SUM`
/// - `/oneshot`: answers, then closes the connection without saying so
/// - `/cache/CC/MS/NAME`: after MS ms, `NAME #N` (N counts requests for this
///   path) with `Cache-Control: CC` (`+` stands for `,`), an ETag and a
///   Last-Modified; request headers `X-Resp-Vary` and `X-Resp-Cookie` add
///   `Vary` and `Set-Cookie`; the body ends with the `Accept-Language` sent
/// - anything else: `ok PATH`
pub struct Origin {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// While set, `/cache/` paths answer 500.
    pub failing: Arc<std::sync::atomic::AtomicBool>,
}

impl Origin {
    pub fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, c, s, f) = (
            requests.clone(),
            connections.clone(),
            seen.clone(),
            failing.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, s, f) = (r.clone(), s.clone(), f.clone());
                std::thread::spawn(move || {
                    let _ = serve_origin(stream, r, s, f);
                });
            }
        });
        Origin {
            addr,
            requests,
            connections,
            seen,
            failing,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests the origin answered for exactly `path`.
    pub fn requests_for(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .count()
    }

    pub fn last_seen(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

fn serve_origin(
    stream: TcpStream,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    failing: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let (mut len, mut sum) = (0u64, 0u64);
        let mut eat = |data: &[u8]| {
            len += data.len() as u64;
            sum = data.iter().fold(sum, |a, &b| a.wrapping_add(u64::from(b)));
        };
        if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut l = String::new();
                r.read_line(&mut l)?;
                let size = usize::from_str_radix(l.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| std::io::Error::other("bad chunk"))?;
                if size == 0 {
                    let mut t = String::new();
                    r.read_line(&mut t)?;
                    break;
                }
                let mut buf = vec![0; size + 2];
                r.read_exact(&mut buf)?;
                eat(&buf[..size]);
            }
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<u64>().ok()) {
            let mut left = n;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let want = (left as usize).min(buf.len());
                let got = r.read(&mut buf[..want])?;
                if got == 0 {
                    return Ok(());
                }
                eat(&buf[..got]);
                left -= got as u64;
            }
        }
        requests.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
            body_len: len,
            body_sum: sum,
        });
        let head_only = method == "HEAD";
        let nth = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .count();
        let arg = |p: &str| path.strip_prefix(p).and_then(|s| s.parse::<usize>().ok());
        let send_len = |w: &mut TcpStream, code: u16, body: &[u8]| -> std::io::Result<()> {
            let mut out = format!(
                "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nX-Origin: yes\r\n\r\n",
                body.len()
            )
            .into_bytes();
            if !head_only {
                out.extend_from_slice(body);
            }
            w.write_all(&out)
        };
        if let Some(n) = arg("/size/") {
            let body = vec![b'a'; n];
            send_len(&mut w, 200, &body)?;
        } else if let Some(n) = arg("/big/") {
            // A cacheable body of n bytes in which every offset differs.
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: {n}\r\n\r\n"
            )
            .into_bytes();
            if !head_only {
                out.extend_from_slice(&big_body(n));
            }
            w.write_all(&out)?;
        } else if let Some(n) = arg("/chunked/") {
            let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            let mut left = n;
            while left > 0 {
                let c = left.min(1000);
                out.extend_from_slice(format!("{c:x}\r\n").as_bytes());
                out.extend(std::iter::repeat_n(b'c', c));
                out.extend_from_slice(b"\r\n");
                left -= c;
            }
            out.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
            w.write_all(&out)?;
        } else if let Some(n) = arg("/close/") {
            w.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
            w.write_all(&vec![b'z'; n])?;
            return Ok(());
        } else if let Some(ms) = arg("/delay/") {
            std::thread::sleep(Duration::from_millis(ms as u64));
            send_len(&mut w, 200, b"late")?;
        } else if let Some(n) = arg("/die/") {
            let mut out =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 2 * n).into_bytes();
            out.extend(std::iter::repeat_n(b'd', n));
            w.write_all(&out)?;
            w.flush()?;
            std::thread::sleep(Duration::from_millis(50));
            return Ok(());
        } else if path == "/hang" {
            std::thread::sleep(Duration::from_secs(10));
            return Ok(());
        } else if let Some(code) = arg("/status/") {
            if code == 204 || code == 304 {
                w.write_all(format!("HTTP/1.1 {code} X\r\n\r\n").as_bytes())?;
            } else {
                send_len(&mut w, code as u16, b"s")?;
            }
        } else if let Some(rest) = path.strip_prefix("/cache/") {
            let mut parts = rest.splitn(3, '/');
            let cc = parts.next().unwrap_or("").replace('+', ", ");
            let ms: u64 = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
            let name = parts.next().unwrap_or("");
            std::thread::sleep(Duration::from_millis(ms));
            if failing.load(Ordering::SeqCst) {
                send_len(&mut w, 500, b"down")?;
                continue;
            }
            if let Some(tag) = get("if-none-match") {
                // The representation never changes: every validator matches.
                w.write_all(format!("HTTP/1.1 304 Not Modified\r\nCache-Control: {cc}\r\nETag: {tag}\r\nX-Revalidated: yes\r\n\r\n").as_bytes())?;
                continue;
            }
            let lang = get("accept-language").unwrap_or_default();
            let body = format!("{name} #{nth} {lang}");
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nCache-Control: {cc}\r\nETag: \"e{nth}\"\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: {}\r\n",
                body.len()
            );
            if let Some(v) = get("x-resp-vary") {
                out.push_str(&format!("Vary: {v}\r\n"));
            }
            if get("x-resp-cookie").is_some() {
                out.push_str("Set-Cookie: s=1\r\n");
            }
            out.push_str("\r\n");
            if !head_only {
                out.push_str(&body);
            }
            w.write_all(out.as_bytes())?;
        } else if path == "/echo" {
            send_len(&mut w, 200, format!("{len} {sum}").as_bytes())?;
        } else if path == "/oneshot" {
            send_len(&mut w, 200, b"once")?;
            std::thread::sleep(Duration::from_millis(20));
            return Ok(());
        } else {
            send_len(&mut w, 200, format!("ok {path}").as_bytes())?;
        }
    }
}

/// The corral binary, started on port 0 and killed when dropped.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
    /// What it printed on stdout after the first line.
    pub stdout: Arc<Mutex<String>>,
}

impl Proxy {
    /// Starts corral with `args` (plus `--listen 127.0.0.1:0` unless a config
    /// is given that listens itself).
    pub fn start(args: &[&str]) -> Proxy {
        Self::try_start(args).expect("corral did not start")
    }

    pub fn try_start(args: &[&str]) -> Result<Proxy, (i32, String)> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
        if !args.iter().any(|a| *a == "-c" || *a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn corral");
        let stderr = Arc::new(Mutex::new(String::new()));
        let e = stderr.clone();
        let mut err_pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            let code = child.wait().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1);
            std::thread::sleep(Duration::from_millis(50));
            let msg = stderr.lock().unwrap().clone();
            return Err((code, msg));
        }
        let addr: SocketAddr = line
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .expect("listening line names an address");
        // Keep draining stdout so the child never blocks on it.
        let stdout = Arc::new(Mutex::new(String::new()));
        let o = stdout.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            while out.read_line(&mut s).unwrap_or(0) > 0 {
                o.lock().unwrap().push_str(&s);
                s.clear();
            }
        });
        Ok(Proxy {
            child,
            addr,
            stderr,
            stdout,
        })
    }

    /// The admin listener's address (from its start-up line).
    pub fn admin_addr(&self) -> SocketAddr {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            let out = self.stdout.lock().unwrap().clone();
            if let Some(rest) = out.split("admin on http://").nth(1) {
                return rest.split('/').next().unwrap().parse().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no admin line on stdout");
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the proxy.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for exit, up to `timeout`; the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Resident memory of the proxy process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as the test client read it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body was cut short by EOF (a length or chunked body incomplete).
    pub truncated: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response from `r`. `head_req`: the request was HEAD.
pub fn read_response<R: BufRead>(r: &mut R, head_req: bool) -> std::io::Result<Response> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "no response",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        if (100..200).contains(&status) {
            continue;
        }
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        let mut truncated = false;
        if head_req || status == 204 || status == 304 {
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut l = String::new();
                if r.read_line(&mut l)? == 0 {
                    truncated = true;
                    break;
                }
                let size = usize::from_str_radix(l.trim(), 16).map_err(std::io::Error::other)?;
                if size == 0 {
                    let mut t = String::new();
                    r.read_line(&mut t)?;
                    break;
                }
                let mut buf = vec![0; size + 2];
                if r.read_exact(&mut buf).is_err() {
                    truncated = true;
                    break;
                }
                body.extend_from_slice(&buf[..size]);
            }
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            let mut got = 0;
            while got < n {
                match r.read(&mut body[got..])? {
                    0 => break,
                    k => got += k,
                }
            }
            truncated = got < n;
            body.truncate(got);
        } else {
            r.read_to_end(&mut body)?;
        }
        return Ok(Response {
            status,
            headers,
            body,
            truncated,
        });
    }
}

/// One GET on a fresh connection.
/// The body `/big/N` answers: byte i is a function of i with period 251 × 256.
pub fn big_body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, "")
}

/// One request with extra header lines `fields` on a fresh connection.
pub fn request(addr: SocketAddr, method: &str, path: &str, fields: &str) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{fields}Connection: close\r\n\r\n"
    )
    .unwrap();
    read_response(&mut BufReader::new(s), method == "HEAD").unwrap()
}

/// Sends raw bytes and reads everything until the server closes.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closed `s` (EOF or reset) within `timeout`. Any bytes
/// still unread count as "not closed".
pub fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Writes a config file into a fresh temporary folder; its path.
pub fn write_config(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("corral-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("corral.toml");
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// The sum of every sample of metric `name` (whatever its labels) on the
/// admin listener's `/metrics`.
#[allow(dead_code)]
pub fn metric_sum(admin: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_response(&mut BufReader::new(s), false).unwrap();
    let samples: Vec<f64> = r
        .text()
        .lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!samples.is_empty(), "no {name}");
    samples.iter().sum()
}

/// `setsockopt(SOL_SOCKET, name, value)` on a test's own socket.
pub fn set_socket_option<T>(s: &TcpStream, name: libc::c_int, value: &T) {
    // SAFETY: our own open socket, and `value` points at a live T of the
    // size passed.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt {name}");
}
