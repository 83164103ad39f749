//! The load engine (I/O): one pinned glommio executor per thread, the
//! connections spread over them, each connection a task that writes
//! requests and reads responses with the same non-blocking fast path corral
//! uses (direct `recv`/`send`, a few yields on EAGAIN, then the reactor).

use crate::client::ResponseReader;
use crate::keys::{random_range, Dist, Keys, Rng};
use crate::stats::{corrected_latency_us, Report, Round, Schedule, Stats};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::io::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Yields on EAGAIN before parking on the reactor (as in corral), by default.
pub const SPIN_YIELDS: u32 = 16;

/// How often the main thread wakes every worker while a run lasts: the
/// longest a missed timer wake-up can stall a worker. Twice in a day here a
/// worker outlived its run by more than all its timeouts before this existed
/// (the watchdog in `run` still guards against anything else).
const NUDGE: Duration = Duration::from_millis(100);
/// Body bytes left in a response from which loadgen receives them without
/// copying them out (`MSG_TRUNC`); below it, one ordinary read that may
/// also take the next response is cheaper.
const SKIP_MIN: u64 = 4096;
/// The most bytes the first read of a response takes (the head and the
/// start of the body; the rest of a large body is skipped, see SKIP_MIN).
const HEAD_READ: usize = 32 * 1024;
/// Pause before reconnecting after a connect error.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);
/// Gap between herd rounds, so every connection is parked and ready.
const HERD_GAP: Duration = Duration::from_millis(50);
/// A connection idle longer than this is checked (one `MSG_PEEK`) before
/// its next request: servers close idle keep-alive connections (Node after
/// 5 s, nginx after 75 s), and a request written into such a connection
/// would fail through no fault of its own.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Where requests go, parsed from `http://host[:port]/path`.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("only http:// URLs are supported, not `{url}`"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if hostport.is_empty() {
            return Err(format!("no host in `{url}`"));
        }
        let with_port = if hostport.starts_with('[') {
            if hostport.contains("]:") {
                hostport.to_string()
            } else {
                format!("{hostport}:80")
            }
        } else if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{hostport}`: {e}"))?
            .next()
            .ok_or_else(|| format!("`{hostport}` resolves to nothing"))?;
        Ok(Target {
            addr,
            host: hostport.to_string(),
            path: path.to_string(),
        })
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub target: Target,
    pub url: String,
    pub connections: usize,
    pub duration: Duration,
    /// Stop after this many responses instead of after `duration`.
    pub requests: Option<u64>,
    /// Open loop: total requests per second.
    pub rate: Option<f64>,
    pub pipeline: usize,
    pub threads: usize,
    pub cpus: Option<Vec<usize>>,
    pub keys: Option<u64>,
    pub dist: Dist,
    pub herd: bool,
    pub range: Option<u64>,
    pub object_size: Option<u64>,
    pub headers: Vec<(String, String)>,
    /// A response not complete after this long is a timeout.
    pub timeout: Duration,
    pub method: String,
    /// Print a progress line on stderr each second.
    pub progress: bool,
    pub seed: u64,
    /// Yields on EAGAIN before parking. Spinning wins on a core of its own
    /// and steals from anything sharing the core (an origin, say).
    pub spin_yields: u32,
}

impl Options {
    pub fn new(url: &str) -> Result<Options, String> {
        Ok(Options {
            target: Target::parse(url)?,
            url: url.to_string(),
            connections: 64,
            duration: Duration::from_secs(10),
            requests: None,
            rate: None,
            pipeline: 1,
            threads: 1,
            cpus: None,
            keys: None,
            dist: Dist::Uniform,
            herd: false,
            range: None,
            object_size: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            method: "GET".into(),
            progress: false,
            seed: 0x5EED,
            spin_yields: SPIN_YIELDS,
        })
    }

    fn validate(&self) -> Result<(), String> {
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.threads == 0 || self.threads > self.connections {
            return Err("--threads must be between 1 and --connections".into());
        }
        if self.pipeline == 0 || self.pipeline > MAX_PIPELINE {
            return Err(format!("--pipeline must be between 1 and {MAX_PIPELINE}"));
        }
        if self.connections > MAX_CONNECTIONS {
            return Err(format!("--connections must be at most {MAX_CONNECTIONS}"));
        }
        if self.range.is_some() != self.object_size.is_some() {
            return Err("--range and --object-size go together".into());
        }
        if self.range == Some(0) || self.object_size == Some(0) {
            return Err("--range and --object-size must be at least 1 byte".into());
        }
        if self.herd && (self.rate.is_some() || self.pipeline > 1) {
            return Err("--herd is closed loop with one request per connection".into());
        }
        if let Some(r) = self.rate {
            if !r.is_finite() || r <= 0.0 {
                return Err("--rate must be a positive number".into());
            }
        }
        // Durations and times are nanoseconds in a u64 from the start:
        // bounded far below its ~584 years.
        const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);
        if self.duration > LONGEST {
            return Err("--duration must be at most a year".into());
        }
        if self.timeout.is_zero() || self.timeout > LONGEST {
            return Err("--timeout must be between 1ns and a year".into());
        }
        if let Some(c) = &self.cpus {
            if c.is_empty() {
                return Err("--cpus is empty".into());
            }
        }
        Ok(())
    }

    fn mode(&self) -> String {
        if self.herd {
            "herd".into()
        } else if let Some(r) = self.rate {
            format!("open loop at {r:.0} req/s")
        } else if self.pipeline > 1 {
            format!("closed loop, pipeline {}", self.pipeline)
        } else {
            "closed loop".into()
        }
    }
}

/// State shared by every thread.
struct Shared {
    opts: Options,
    keys: Option<Keys>,
    start: Instant,
    stop: AtomicBool,
    /// Requests handed out (for `--requests`); never more than asked.
    issued: AtomicU64,
    /// Responses received.
    completed: AtomicU64,
    /// Requests that ended without a response: `--requests` stops when
    /// every request was answered or failed, so a failing server cannot
    /// keep the run going.
    unanswered: AtomicU64,
    errors: AtomicU64,
    /// A unique tag so herd keys were never seen before.
    run_tag: u64,
    herd: HerdSync,
}

/// Herd rounds: all connections fire at `start_ns` of `round`; the last one
/// to finish opens the next round.
struct HerdSync {
    round: AtomicU64,
    /// `u64::MAX` until every connection checked in for round 0.
    start_ns: AtomicU64,
    remaining: AtomicUsize,
    /// Connections that have connected (or failed to) once: round 0 opens
    /// when all have, so a slow connect does not spread it out.
    checked_in: AtomicUsize,
    rounds: Mutex<Vec<Round>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// A connection's first connect, made or failed: the last one sets
    /// round 0's instant.
    fn herd_check_in(&self) {
        let all = self.opts.connections;
        if self.herd.checked_in.fetch_add(1, Ordering::AcqRel) + 1 == all {
            let at = self.now_ns() + HERD_GAP.as_nanos() as u64;
            self.herd.start_ns.store(at, Ordering::Release);
        }
    }

    /// When the run's sends end: `--duration` after the start, or never
    /// (`--requests`).
    fn end_ns(&self) -> u64 {
        match self.opts.requests {
            Some(_) => u64::MAX,
            None => self.opts.duration.as_nanos() as u64,
        }
    }

    fn should_stop(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return true;
        }
        match self.opts.requests {
            Some(n) => {
                self.completed.load(Ordering::Relaxed) + self.unanswered.load(Ordering::Relaxed)
                    >= n
            }
            None => self.start.elapsed() >= self.opts.duration,
        }
    }

    /// Claims one request slot; false when `--requests` are all handed out.
    fn claim(&self) -> bool {
        match self.opts.requests {
            Some(n) => self
                .issued
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| {
                    (i < n).then_some(i + 1)
                })
                .is_ok(),
            None => true,
        }
    }

    /// `n` requests ended without a response (their errors are counted
    /// by the caller).
    fn failed(&self, n: u64) {
        self.unanswered.fetch_add(n, Ordering::Relaxed);
    }
}

/// The most requests one connection keeps in flight (`--pipeline`): a
/// closed-loop connection builds them all at once.
const MAX_PIPELINE: usize = 4096;
/// The most connections (each is a descriptor and a task).
const MAX_CONNECTIONS: usize = 1 << 22;

/// Runs the load and returns the merged report.
pub fn run(opts: Options) -> Result<Report, String> {
    opts.validate()?;
    raise_nofile(opts.connections as u64 + 256)?;
    let keys = match opts.keys {
        Some(n) => Some(Keys::new(n, &opts.dist)?),
        None => None,
    };
    let run_tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let shared = Arc::new(Shared {
        keys,
        start: Instant::now() + Duration::from_millis(20),
        stop: AtomicBool::new(false),
        issued: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        unanswered: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        run_tag,
        herd: HerdSync {
            round: AtomicU64::new(0),
            start_ns: AtomicU64::new(u64::MAX),
            remaining: AtomicUsize::new(opts.connections),
            checked_in: AtomicUsize::new(0),
            rounds: Mutex::new(vec![Round::default()]),
        },
        opts,
    });
    let opts = &shared.opts;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Stats>();
    let mut nudges = Vec::new();
    for t in 0..opts.threads {
        let (nudge, nudged) = std::os::unix::net::UnixStream::pair()
            .and_then(|(a, b)| {
                a.set_nonblocking(true)?;
                b.set_nonblocking(true)?;
                Ok((a, b))
            })
            .map_err(|e| format!("cannot start thread {t}: {e}"))?;
        nudges.push(nudge);
        let placement = match &opts.cpus {
            Some(c) => Placement::Fixed(c[t % c.len()]),
            None => Placement::Unbound,
        };
        let (sh, tx) = (shared.clone(), done_tx.clone());
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("loadgen{t}"))
            .io_memory(1 << 20)
            .spawn(move || async move {
                // Each byte the main thread sends wakes this executor, which
                // then also runs any timer that is due: a parked executor has
                // been seen to miss a timer's wake-up (see NUDGE).
                glommio::spawn_local(async move {
                    use std::io::Read;
                    let mut sink = [0u8; 64];
                    while glommio::net::wait_readable(nudged.as_raw_fd())
                        .await
                        .is_ok()
                    {
                        while matches!((&nudged).read(&mut sink), Ok(n) if n > 0) {}
                    }
                })
                .detach();
                let _ = tx.send(worker(t, sh).await);
            })
            .map_err(|e| format!("cannot start thread {t}: {e}"))?;
        // Finished workers report through the channel; the handle is not joined
        // so that a stuck worker cannot hang the run (see below).
        drop(handle);
    }
    drop(done_tx);
    // A watchdog: every request is bounded by `timeout`, so all workers end
    // by then; if one does not, say so instead of hanging. With
    // `--requests` the run has no set length: it fires when no request has
    // ended for that long (plus the open loop's gap between two sends).
    let stall = 2 * opts.timeout
        + Duration::from_secs(5)
        + opts.rate.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64((1.0 / r).min(86_400.0))
        });
    let patience = match opts.requests {
        Some(_) => stall,
        None => opts.duration + stall,
    };
    let mut deadline = shared.start + patience;
    let mut ended = 0;
    let mut stats = Stats::default();
    let mut finished = 0;
    while finished < opts.threads {
        if opts.requests.is_some() {
            let now_ended = shared.completed.load(Ordering::Relaxed)
                + shared.unanswered.load(Ordering::Relaxed);
            if now_ended != ended {
                ended = now_ended;
                deadline = Instant::now() + patience;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left.min(NUDGE)) {
            Ok(s) => {
                stats.merge(&s);
                finished += 1;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                for mut n in &nudges {
                    let _ = std::io::Write::write(&mut n, b"n");
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                shared.stop.store(true, Ordering::SeqCst);
                return Err(format!(
                    "{} of {} worker threads did not stop within {:?}; results discarded",
                    opts.threads - finished,
                    opts.threads,
                    patience
                ));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err("a worker thread died".into());
            }
        }
    }
    // The rate's time: until the last response for `--requests` (not the
    // teardown after it); for `--duration`, the duration, over which only
    // the responses that came within it count (as wrk): one slow response
    // after the end must not stretch the time every connection is charged.
    let elapsed = shared.start.elapsed();
    let last = Duration::from_nanos(stats.last_response_ns);
    let duration = match opts.requests {
        Some(_) if !last.is_zero() => last,
        Some(_) => elapsed,
        None => opts.duration.min(elapsed).max(Duration::from_millis(1)),
    };
    let mut rounds =
        std::mem::take(&mut *shared.herd.rounds.lock().unwrap_or_else(|p| p.into_inner()));
    // Only whole rounds: the last one may be cut short by the end of the run.
    rounds.retain(|r| r.latencies_us.len() + r.failed as usize == opts.connections);
    Ok(Report {
        stats,
        duration,
        rounds,
        url: opts.url.clone(),
        connections: opts.connections,
        threads: opts.threads,
        mode: opts.mode(),
    })
}

async fn worker(t: usize, shared: Arc<Shared>) -> Stats {
    let opts = &shared.opts;
    let stats = Rc::new(RefCell::new(Stats::default()));
    let queue = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::Matters(Duration::from_millis(1)),
        "load",
    );
    // Warm the timer wheel before the clock starts.
    glommio::timer::sleep(Duration::from_millis(1)).await;
    let wait = shared.start.saturating_duration_since(Instant::now());
    glommio::timer::sleep(wait).await;
    let mut tasks = Vec::new();
    for c in (t..opts.connections).step_by(opts.threads) {
        let (sh, st) = (shared.clone(), stats.clone());
        let fut = connection(c, sh, st);
        if let Ok(task) = glommio::spawn_local_into(fut, queue) {
            tasks.push(task);
        }
    }
    if t == 0 && opts.progress {
        let sh = shared.clone();
        tasks.push(glommio::spawn_local(async move {
            let mut last = 0u64;
            while !sh.should_stop() {
                glommio::timer::sleep(Duration::from_secs(1)).await;
                let done = sh.completed.load(Ordering::Relaxed);
                eprint!(
                    "\r  {:>5.1}s  {:>9} req/s  {:>10} done  {:>6} errors   ",
                    sh.start.elapsed().as_secs_f64(),
                    done - last,
                    done,
                    sh.errors.load(Ordering::Relaxed)
                );
                last = done;
            }
            eprintln!();
        }));
    }
    for task in tasks {
        task.await;
    }
    let s = stats.borrow().clone();
    s
}

/// One request in flight: when it counts from, and whether it was HEAD.
struct InFlight {
    from_ns: u64,
    /// When it was written, for the timeout.
    sent_ns: u64,
    head: bool,
    round: Option<u64>,
    /// What it asked for, to send it again on a new connection when the
    /// server closed the one it was pipelined on before answering it.
    key: Option<String>,
    range: Option<(u64, u64)>,
}

struct Conn {
    /// When a request last went out on it (ns since the start).
    sent_ns: u64,
    stream: TcpStream,
    write_timeout: Duration,
    fd: i32,
    reader: ResponseReader,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

enum Io {
    Ok,
    Eof,
    Err,
    TimedOut,
}

impl Conn {
    async fn open(addr: SocketAddr, timeout: Duration, now_ns: u64) -> Option<Conn> {
        let stream = TcpStream::connect_timeout(addr, timeout).await.ok()?;
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        Some(Conn {
            sent_ns: now_ns,
            write_timeout: timeout,
            stream,
            fd,
            reader: ResponseReader::new(),
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        })
    }

    /// Whether the server closed the connection while it sat idle since
    /// its last request for more than [`IDLE_CHECK`] (one `MSG_PEEK`, only
    /// then); marks a request going out at `now_ns`.
    fn closed_while_idle(&mut self, now_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(self.sent_ns) > IDLE_CHECK.as_nanos() as u64;
        self.sent_ns = now_ns;
        if !idle || self.start < self.end {
            return false;
        }
        let mut b = [0u8; 1];
        // SAFETY: a valid one-byte buffer and our own open fd.
        let n = unsafe {
            libc::recv(
                self.fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let e = io::Error::last_os_error().raw_os_error();
        n == 0 || (n < 0 && e != Some(libc::EAGAIN) && e != Some(libc::EINTR))
    }

    async fn write_all(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            // SAFETY: a valid slice and our own open fd.
            let n = unsafe {
                libc::send(
                    self.fd,
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                data = &data[n as usize..];
                continue;
            }
            let e = io::Error::last_os_error().raw_os_error();
            if n < 0 && (e == Some(libc::EAGAIN) || e == Some(libc::EINTR)) {
                // The server is not reading: wait for room, but not forever.
                match until(self.write_timeout, self.stream.write(data)).await {
                    Some(Ok(k)) => data = &data[k..],
                    _ => return false,
                }
                continue;
            }
            return false;
        }
        true
    }

    /// Reads more bytes into the buffer, waiting until `deadline_ns`.
    async fn fill(&mut self, shared: &Shared, deadline_ns: u64) -> Io {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // The rest of a large body is received without being copied out
        // (`MSG_TRUNC`: TCP drops the bytes in the kernel), as a server
        // sending it with `sendfile` copies none: only its length matters
        // here. Otherwise the first read of a response takes at most
        // HEAD_READ bytes, so that a large body mostly arrives that way.
        let skip = if self.start == self.end {
            self.reader.skippable()
        } else {
            0
        };
        // (The buffer is empty when skipping: `end` is 0.)
        let trunc = skip >= SKIP_MIN;
        let (len, flags) = if trunc {
            (
                skip.min(self.buf.len() as u64) as usize,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        } else if self.end == 0 && self.reader.idle() {
            (HEAD_READ.min(self.buf.len()), libc::MSG_DONTWAIT)
        } else {
            (self.buf.len() - self.end, libc::MSG_DONTWAIT)
        };
        let spin = shared.opts.spin_yields;
        for attempt in 0..=spin {
            let space = &mut self.buf[self.end..self.end + len];
            // SAFETY: a valid writable slice and our own open fd (with
            // MSG_TRUNC the kernel writes nothing; the slice is valid for
            // its length all the same).
            let n = unsafe { libc::recv(self.fd, space.as_mut_ptr().cast(), space.len(), flags) };
            if n > 0 {
                if trunc {
                    self.reader.skip(n as u64);
                } else {
                    self.end += n as usize;
                }
                return Io::Ok;
            }
            if n == 0 {
                return Io::Eof;
            }
            let e = io::Error::last_os_error().raw_os_error();
            if e != Some(libc::EAGAIN) && e != Some(libc::EINTR) {
                return Io::Err;
            }
            if attempt < spin {
                glommio::executor().yield_now().await;
            }
        }
        let now = shared.now_ns();
        if deadline_ns <= now {
            return Io::TimedOut;
        }
        let wait = Duration::from_nanos(deadline_ns - now);
        let end = self.end;
        let stream = &mut self.stream;
        let space = &mut self.buf[end..];
        match until(wait, stream.read(space)).await {
            None => Io::TimedOut,
            Some(Ok(0)) => Io::Eof,
            Some(Ok(n)) => {
                self.end += n;
                Io::Ok
            }
            Some(Err(_)) => Io::Err,
        }
    }
}

/// Raises the soft open-file limit to `want` (at most the hard limit): a
/// herd of 1000 connections does not fit the usual 1024. An error naming
/// the limit when even the hard one is too low.
fn raise_nofile(want: u64) -> Result<(), String> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0
        || r.rlim_cur == libc::RLIM_INFINITY
        || r.rlim_cur >= want
    {
        return Ok(());
    }
    let raised = libc::rlimit {
        rlim_cur: want.min(r.rlim_max),
        rlim_max: r.rlim_max,
    };
    // SAFETY: setrlimit reads a valid rlimit; raising the soft limit up to
    // the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 || raised.rlim_cur < want {
        return Err(format!(
            "the open-file limit (hard {}) is too low for {} connections; raise it with `ulimit -n`",
            r.rlim_max,
            want - 256
        ));
    }
    Ok(())
}

async fn until<T>(dur: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(dur).await;
        None
    })
    .await
}

/// Builds one request into `out`; returns whether it is HEAD.
fn build_request(
    out: &mut Vec<u8>,
    opts: &Options,
    key: Option<&str>,
    range: Option<(u64, u64)>,
) -> bool {
    use std::io::Write;
    let path = match key {
        None => opts.target.path.clone(),
        Some(k) => {
            if opts.target.path.contains("{key}") {
                opts.target.path.replace("{key}", k)
            } else if opts.target.path.contains('?') {
                format!("{}&k={k}", opts.target.path)
            } else {
                format!("{}?k={k}", opts.target.path)
            }
        }
    };
    let _ = write!(out, "{} {} HTTP/1.1\r\n", opts.method, path);
    // A `-H Host:` or `-H Range:` replaces loadgen's own (as in wrk): two
    // Host fields would be a 400.
    let given = |name: &str| {
        opts.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
    };
    if !given("host") {
        let _ = write!(out, "Host: {}\r\n", opts.target.host);
    }
    if let Some((a, b)) = range.filter(|_| !given("range")) {
        let _ = write!(out, "Range: bytes={a}-{b}\r\n");
    }
    for (k, v) in &opts.headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    opts.method == "HEAD"
}

async fn connection(id: usize, shared: Arc<Shared>, stats: Rc<RefCell<Stats>>) {
    let opts = &shared.opts;
    let mut rng = Rng::new(opts.seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9));
    let mut schedule = opts.rate.map(|r| {
        let per_conn = r / opts.connections as f64;
        let interval = 1e9 / per_conn;
        Schedule::new(
            per_conn,
            (interval * id as f64 / opts.connections as f64) as u64,
        )
    });
    let timeout_ns = opts.timeout.as_nanos() as u64;
    let mut conn: Option<Conn> = None;
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    // Requests pipelined behind an answer that closed the connection: the
    // server did not process them (RFC 9112 §9.6), so they go out again,
    // first, on the next connection, keeping their intended send time.
    let mut resend: VecDeque<InFlight> = VecDeque::new();
    let mut out = Vec::with_capacity(512);
    let mut herd_round = 0u64;
    let mut checked_in = false;
    // Drops the connection, failing what is in flight on it.
    macro_rules! fail {
        ($clean:expr) => {
            fail_connection(
                &shared,
                &stats,
                &mut conn,
                &mut inflight,
                $clean,
                &mut herd_round,
            )
        };
    }
    'run: loop {
        // After the end a connection still reads the answers to what it
        // sent, each bounded by `timeout`, sending nothing more: they count
        // as `after_end` at any pipeline depth (it used to leave after the
        // first, dropping the rest uncounted). Not when the watchdog stops
        // the run.
        let ending = shared.should_stop();
        if ending && (conn.is_none() || inflight.is_empty() || shared.stop.load(Ordering::Relaxed))
        {
            break;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                let opened = Conn::open(opts.target.addr, opts.timeout, shared.now_ns()).await;
                // A herd connection's first connect, made or failed,
                // checks it in for round 0.
                if opts.herd && !checked_in {
                    checked_in = true;
                    shared.herd_check_in();
                }
                match opened {
                    Some(c) => {
                        // The connect may have taken until after the end.
                        if shared.should_stop() {
                            break 'run;
                        }
                        conn.insert(c)
                    }
                    None => {
                        stats.borrow_mut().connect_errors += 1;
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        // With --requests a failed connect uses up a request (one
                        // waiting to go again first), so a server that refuses
                        // cannot keep the run going.
                        if resend.pop_front().is_some() {
                            shared.failed(1);
                        } else if opts.requests.is_some() {
                            if !shared.claim() {
                                break 'run;
                            }
                            shared.failed(1);
                        }
                        if opts.herd {
                            // One failure in the round that is open, counted
                            // once it opens (as a sender waits for it): racing
                            // ahead would open rounds before the previous ended.
                            match wait_round(&shared, herd_round).await {
                                Some(r) => herd_round = r,
                                None => break 'run,
                            }
                            herd_done(&shared, herd_round, None);
                            herd_round += 1;
                        }
                        glommio::timer::sleep(RECONNECT_PAUSE).await;
                        continue;
                    }
                }
            }
        };
        // Send what the mode allows.
        out.clear();
        let older = inflight.len();
        let now = shared.now_ns();
        let mut wait_until: Option<u64> = None;
        if ending {
            // Only the answers in flight are awaited.
        } else if opts.herd {
            if inflight.is_empty() {
                // Wait for the round to open, then fire at its instant.
                match wait_round(&shared, herd_round).await {
                    Some(r) => herd_round = r,
                    None => break 'run,
                }
                let mut at = shared.herd.start_ns.load(Ordering::Acquire);
                while at == u64::MAX {
                    // Round 0, before every connection checked in.
                    if shared.should_stop() {
                        break 'run;
                    }
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    at = shared.herd.start_ns.load(Ordering::Acquire);
                }
                let now = shared.now_ns();
                if at > now {
                    glommio::timer::sleep(Duration::from_nanos(at - now)).await;
                }
                if !shared.claim() {
                    break;
                }
                let key = format!("herd-{:x}-{herd_round}", shared.run_tag);
                let head = build_request(&mut out, opts, Some(&key), None);
                inflight.push_back(InFlight {
                    from_ns: shared.now_ns(),
                    sent_ns: shared.now_ns(),
                    head,
                    round: Some(herd_round),
                    key: Some(key),
                    range: None,
                });
            }
        } else if let Some(s) = schedule.as_mut() {
            resend_first(&mut resend, &mut inflight, &mut out, opts, now);
            let mut exhausted = false;
            while inflight.len() < opts.pipeline && s.peek() <= now {
                if !shared.claim() {
                    exhausted = true;
                    break;
                }
                let (intended, late) = s.take(now);
                if late {
                    stats.borrow_mut().late += 1;
                }
                let (key, range) = draw(&shared, &mut rng);
                let head = build_request(&mut out, opts, key.as_deref(), range);
                inflight.push_back(InFlight {
                    from_ns: intended,
                    sent_ns: now,
                    head,
                    round: None,
                    key,
                    range,
                });
            }
            // With every request handed out there is nothing to wait for
            // but the answers in flight (or the end).
            if inflight.len() < opts.pipeline && !exhausted {
                wait_until = Some(s.peek());
            }
        } else {
            resend_first(&mut resend, &mut inflight, &mut out, opts, now);
            while inflight.len() < opts.pipeline && shared.claim() {
                let (key, range) = draw(&shared, &mut rng);
                let head = build_request(&mut out, opts, key.as_deref(), range);
                inflight.push_back(InFlight {
                    from_ns: now,
                    sent_ns: now,
                    head,
                    round: None,
                    key,
                    range,
                });
            }
        }
        if !out.is_empty() {
            // A keep-alive connection idle for a while may have been closed
            // by the server meanwhile (its idle timeout): that is no error
            // of the request about to go, so the connection is reopened.
            // Only with nothing older in flight on it: those would be
            // matched with the new connection's answers.
            let open = older > 0
                || !c.closed_while_idle(now)
                || Conn::open(opts.target.addr, opts.timeout, shared.now_ns())
                    .await
                    .map(|fresh| *c = fresh)
                    .is_some();
            if !open || !c.write_all(&out).await {
                fail!(false);
                continue;
            }
            // The answer needs a round trip: let the other connections run
            // before the first receive attempt instead of failing it.
            if opts.spin_yields > 0 {
                glommio::executor().yield_now().await;
            }
        }
        if inflight.is_empty() {
            match wait_until {
                Some(t) => {
                    // Not past the run's end: a slow rate's next slot may
                    // lie far beyond it.
                    let t = t.min(shared.end_ns());
                    let now = shared.now_ns();
                    if t > now {
                        // In slices: with `--requests` the run may end
                        // (every request answered) long before this slot.
                        let slice = Duration::from_nanos(t - now).min(NUDGE);
                        glommio::timer::sleep(slice).await;
                    }
                    continue;
                }
                None => break, // closed loop with nothing left to send
            }
        }
        // Read until at least one response completes, or it is time to send.
        let timeout_at = inflight.front().map_or(0, |f| f.sent_ns) + timeout_ns;
        let deadline = wait_until.map_or(timeout_at, |w| w.min(timeout_at));
        let mut completed_any = false;
        let mut refill = false;
        loop {
            // Parse what is buffered.
            while c.start < c.end || c.reader.skipped_to_end() {
                let Some(front) = inflight.front() else { break };
                match c.reader.feed(&c.buf[c.start..c.end], front.head) {
                    Ok(p) => {
                        c.start += p.consumed;
                        if let Some(done) = p.done {
                            if let Some(next) =
                                complete(&shared, &stats, inflight.pop_front(), done)
                            {
                                herd_round = next;
                            }
                            completed_any = true;
                            if done.close {
                                // What was pipelined behind it goes again.
                                resend.extend(inflight.drain(..));
                                fail!(true);
                                continue 'run;
                            }
                        } else {
                            break;
                        }
                    }
                    Err(_) => {
                        fail!(false);
                        continue 'run;
                    }
                }
            }
            if completed_any || inflight.is_empty() {
                continue 'run;
            }
            // A response whose bytes keep coming is still bounded by its
            // timeout (and an open loop's next send by its slot): looked at
            // before each read after the first, so that a response that
            // comes in one read costs no clock reading here.
            let got = if refill && shared.now_ns() >= deadline {
                Io::TimedOut
            } else {
                c.fill(&shared, deadline).await
            };
            refill = true;
            match got {
                Io::Ok => {}
                Io::TimedOut => {
                    if shared.now_ns() >= timeout_at {
                        stats.borrow_mut().timeouts += 1;
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(f) = inflight.front() {
                            if let Some(r) = f.round {
                                herd_done(&shared, r, None);
                                herd_round = r + 1;
                            }
                        }
                        if inflight.pop_front().is_some() {
                            shared.failed(1);
                        }
                        // The timeout is counted; requests behind it on the
                        // connection are the read errors, not the timeout.
                        fail!(true);
                    }
                    continue 'run;
                }
                Io::Eof => {
                    if let Ok(Some(done)) = c.reader.eof() {
                        if let Some(next) = complete(&shared, &stats, inflight.pop_front(), done) {
                            herd_round = next;
                        }
                        // A close-delimited answer closes the connection as
                        // `Connection: close` does: what was pipelined
                        // behind it goes again.
                        resend.extend(inflight.drain(..));
                        fail!(true);
                    } else {
                        fail!(false);
                    }
                    continue 'run;
                }
                Io::Err => {
                    fail!(false);
                    continue 'run;
                }
            }
        }
    }
    // Requests still waiting to go again when the run ended were sent
    // once and never answered: read errors, as they were before they could
    // go again (and ended, for `--requests`).
    if !resend.is_empty() {
        let n = resend.len() as u64;
        stats.borrow_mut().read_errors += n;
        shared.errors.fetch_add(n, Ordering::Relaxed);
        shared.failed(n);
    }
    // Open loop: slots that came due before the end but never went out
    // (behind a stalled connection) are exactly the slow ones; say how many.
    if let Some(sch) = &schedule {
        let end = shared.end_ns();
        if end != u64::MAX && sch.peek() < end {
            let due = (end - sch.peek()).div_ceil(sch.interval_ns().max(1));
            stats.borrow_mut().unsent += due;
        }
    }
}

/// Puts the requests waiting to go again ahead of new ones (within the
/// pipeline depth), each with its intended send time kept.
fn resend_first(
    resend: &mut VecDeque<InFlight>,
    inflight: &mut VecDeque<InFlight>,
    out: &mut Vec<u8>,
    opts: &Options,
    now: u64,
) {
    while inflight.len() < opts.pipeline {
        let Some(f) = resend.pop_front() else { break };
        build_request(out, opts, f.key.as_deref(), f.range);
        inflight.push_back(InFlight { sent_ns: now, ..f });
    }
}

/// Records the response that completed request `f`; for a herd request,
/// the round that comes next.
fn complete(
    shared: &Shared,
    stats: &Rc<RefCell<Stats>>,
    f: Option<InFlight>,
    done: crate::client::Completed,
) -> Option<u64> {
    let f = f?;
    let now = shared.now_ns();
    let lat = corrected_latency_us(f.from_ns, now);
    {
        let mut s = stats.borrow_mut();
        s.record(done.status, lat, done.body_bytes);
        s.last_response_ns = now;
        if now > shared.end_ns() {
            s.after_end += 1;
        }
    }
    shared.completed.fetch_add(1, Ordering::Relaxed);
    let round = f.round?;
    herd_done(shared, round, Some(lat));
    Some(round + 1)
}

/// Drops the connection. Requests still in flight on it are lost: each is a
/// read error (unless `clean` and none are left), ends (for `--requests`),
/// and fails its herd round, after which the connection moves on to the
/// next round (it must not ask again in the one it failed).
fn fail_connection(
    shared: &Shared,
    stats: &Rc<RefCell<Stats>>,
    conn: &mut Option<Conn>,
    inflight: &mut VecDeque<InFlight>,
    clean: bool,
    herd_round: &mut u64,
) {
    *conn = None;
    let lost = inflight.len() as u64;
    if lost > 0 || !clean {
        let n = lost.max(u64::from(!clean));
        stats.borrow_mut().read_errors += n;
        shared.errors.fetch_add(n, Ordering::Relaxed);
    }
    shared.failed(lost);
    for f in inflight.drain(..) {
        if let Some(r) = f.round {
            herd_done(shared, r, None);
            *herd_round = (*herd_round).max(r + 1);
        }
    }
}

/// Waits until herd round `round` (or a later one) is open; the open
/// round, or `None` when the run stops first.
async fn wait_round(shared: &Shared, round: u64) -> Option<u64> {
    loop {
        if shared.should_stop() {
            return None;
        }
        let r = shared.herd.round.load(Ordering::Acquire);
        if r >= round {
            return Some(r);
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// Records a herd response (or a failure) for `round`; the last one opens
/// the next round.
fn herd_done(shared: &Shared, round: u64, latency_us: Option<u64>) {
    {
        let mut rounds = shared.herd.rounds.lock().unwrap_or_else(|p| p.into_inner());
        while rounds.len() as u64 <= round + 1 {
            rounds.push(Round::default());
        }
        match latency_us {
            Some(l) => rounds[round as usize].latencies_us.push(l),
            None => rounds[round as usize].failed += 1,
        }
    }
    if shared.herd.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        shared
            .herd
            .remaining
            .store(shared.opts.connections, Ordering::Release);
        shared.herd.start_ns.store(
            shared.now_ns() + HERD_GAP.as_nanos() as u64,
            Ordering::Release,
        );
        shared.herd.round.store(round + 1, Ordering::Release);
    }
}

/// The key and range of the next request.
fn draw(shared: &Shared, rng: &mut Rng) -> (Option<String>, Option<(u64, u64)>) {
    let key = shared.keys.as_ref().map(|k| k.draw(rng).to_string());
    let range = match (shared.opts.range, shared.opts.object_size) {
        (Some(r), Some(o)) => Some(random_range(rng, r, o)),
        _ => None,
    };
    (key, range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_durations_are_refused_not_overflowed() {
        let mut o = Options::new("http://127.0.0.1:1/").unwrap();
        assert!(o.validate().is_ok());
        o.duration = Duration::from_secs(u64::MAX);
        assert!(o.validate().is_err());
        o.duration = Duration::from_secs(10);
        o.timeout = Duration::ZERO;
        assert!(o.validate().is_err());
        o.timeout = Duration::from_secs(20_000_000_000);
        assert!(o.validate().is_err());
        assert!(crate::parse_duration("18446744073709551615m").is_err());
        assert_eq!(crate::parse_duration("2m"), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn parse_targets() {
        let t = Target::parse("http://127.0.0.1:8080/a/b?c=1").unwrap();
        assert_eq!(t.addr.port(), 8080);
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(t.path, "/a/b?c=1");
        let t = Target::parse("http://127.0.0.1").unwrap();
        assert_eq!(t.addr.port(), 80);
        assert_eq!(t.path, "/");
        assert!(Target::parse("https://x/").is_err());
    }

    #[test]
    fn requests_carry_keys_and_ranges() {
        let mut o = Options::new("http://127.0.0.1:1/obj/{key}").unwrap();
        o.headers.push(("X-A".into(), "b".into()));
        let mut out = Vec::new();
        build_request(&mut out, &o, Some("42"), Some((0, 99)));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /obj/42 HTTP/1.1\r\nHost: 127.0.0.1:1\r\nRange: bytes=0-99\r\nX-A: b\r\n\r\n"
        );
        let o = Options::new("http://127.0.0.1:1/x?a=1").unwrap();
        let mut out = Vec::new();
        build_request(&mut out, &o, Some("7"), None);
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("GET /x?a=1&k=7 HTTP/1.1"));
        // -H Host (any case) and -H Range replace loadgen's own.
        let mut o = Options::new("http://127.0.0.1:1/").unwrap();
        o.headers.push(("host".into(), "app.example".into()));
        o.headers.push(("Range".into(), "bytes=5-6".into()));
        let mut out = Vec::new();
        build_request(&mut out, &o, None, Some((0, 99)));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: app.example\r\nRange: bytes=5-6\r\n\r\n"
        );
    }
}
