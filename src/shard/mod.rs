//! Shards (I/O): one pinned glommio executor per CPU, each with its own
//! SO_REUSEPORT listeners, connections and upstream pools; start-up checks,
//! and the graceful drain on SIGINT/SIGTERM.

pub mod buf;
pub mod conn;
pub mod mailbox;
pub mod net;

use crate::config::Config;
use crate::http::request::HeadLimits;
use crate::origin::pool::{PoolShared, UpstreamPool};
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use mailbox::Mailbox;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Listen backlog per shard socket.
const BACKLOG: i32 = 4096;
/// How often the nudger wakes every shard: the longest a missed timer
/// wake-up can delay a timer. Each nudge is also the shard's housekeeping
/// tick: it looks at the process-wide stop flag, flushes the access log and
/// (each second) sweeps idle upstream connections, so an idle shard wakes
/// ten times a second for all of it.
const NUDGE: Duration = Duration::from_millis(100);
/// Preemption period of the connection task queue: the longest a parked
/// connection can wait behind connections that keep running.
const CONN_PREEMPT: Duration = Duration::from_millis(1);
/// Registered io_uring buffer memory per executor, without and with origin
/// stores (their reads use it). glommio locks about three times this per
/// executor.
const IO_MEMORY: usize = 2 << 20;
const IO_MEMORY_STORES: usize = 16 << 20;

/// A start-up failure; the binary prints it and exits with code 2.
#[derive(Debug)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// One shard's state, shared by its tasks through `Rc`.
pub struct Shard {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub head_limits: HeadLimits,
    pub pools: Vec<UpstreamPool>,
    /// This shard's side of each origin store.
    pub stores: Vec<Rc<crate::origin::store::StoreShard>>,
    /// This shard's cache, unless `cache.size` is 0.
    pub cache: Option<crate::cache::ShardCache>,
    /// Misses in flight anywhere in the process (shared by every shard).
    pub shared_fills: Arc<crate::cache::shared::SharedFills>,
    /// The task queue connections and cache fills run in.
    pub queue: glommio::TaskQueueHandle,
    /// This shard's request statistics (written only here).
    pub stats: RefCell<crate::admin::stats::ShardStats>,
    /// This shard's side of the access log, when one is configured.
    pub log: Option<crate::admin::log::ShardLog>,
    /// Open client connections.
    conns: Cell<usize>,
    /// Cache fill tasks under way (a fetch may outlive its connection, and
    /// other shards may be relaying it): the drain waits for them too.
    fills: Cell<usize>,
    /// Connections refused at the cap that are in their lingering close.
    refused_lingering: Cell<usize>,
    /// Connections refused at the cap since start (their 503s are not
    /// requests read: not in the request counts).
    refused: Cell<u64>,
    draining: Cell<bool>,
    /// Tasks waiting for the drain, each registered while it waits.
    drain_wakers: RefCell<slab::Slab<Waker>>,
    /// The shard's main task while it waits for the last connection to end.
    drained: RefCell<Option<Waker>>,
}

impl Shard {
    fn new(id: usize, cfg: Arc<Config>, queue: glommio::TaskQueueHandle, common: &Common) -> Shard {
        let cache = common
            .parts
            .clone()
            .map(|p| crate::cache::ShardCache::new(id, p, cfg.cache.size_bytes));
        let pools = &common.pools;
        let log = match (&cfg.access_log, &common.log) {
            (Some(l), Some((tx, lost))) => Some(crate::admin::log::ShardLog::new(
                l.format,
                tx.clone(),
                (id == 0).then(|| lost.clone()),
            )),
            _ => None,
        };
        let stores = cfg
            .stores
            .iter()
            .map(|s| {
                Rc::new(crate::origin::store::StoreShard::new(
                    s.clone(),
                    cfg.shards,
                    cfg.metrics,
                ))
            })
            .collect();
        Shard {
            cache,
            queue,
            stores,
            shared_fills: common.fills.clone(),
            stats: RefCell::new(crate::admin::stats::ShardStats::recording()),
            log,
            id,
            head_limits: HeadLimits {
                max_header_bytes: cfg.limits.max_header_bytes,
                max_headers: cfg.limits.max_headers,
                max_uri_bytes: cfg.limits.max_uri_bytes,
            },
            pools: cfg
                .pools
                .iter()
                .zip(pools.iter())
                .enumerate()
                .map(|(i, (p, s))| {
                    let seed = crate::cache::key_hash(&[&id.to_le_bytes(), &i.to_le_bytes()])
                        ^ random_seed();
                    UpstreamPool::new(p.clone(), s.clone(), seed, cfg.metrics)
                })
                .collect(),
            conns: Cell::new(0),
            fills: Cell::new(0),
            refused_lingering: Cell::new(0),
            refused: Cell::new(0),
            draining: Cell::new(false),
            drain_wakers: RefCell::new(slab::Slab::new()),
            drained: RefCell::new(None),
            cfg,
        }
    }

    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Everything this shard counts, as of now.
    pub fn snapshot(&self) -> crate::admin::stats::Snapshot {
        let now = crate::admin::stats::period_of(std::time::Instant::now());
        let mut stats = self.stats.borrow().snapshot(now);
        if let Some(l) = &self.log {
            stats.log_dropped = l.dropped_bytes();
        }
        crate::admin::stats::Snapshot {
            shard: self.id,
            connections: self.conns.get() as u64,
            refused: self.refused.get(),
            stats,
            cache: self.cache.as_ref().map_or(Default::default(), |c| {
                crate::admin::stats::CacheFigures {
                    hits: c.hits.get(),
                    misses: c.misses.get(),
                    collapsed: c.collapsed.get(),
                    stored: c.stored.get(),
                }
            }),
            pools: self.pools.iter().map(|p| p.figures()).collect(),
            stores: self.stores.iter().map(|s| s.figures()).collect(),
        }
    }

    fn begin_drain(&self) {
        self.draining.set(true);
        for w in self.drain_wakers.borrow_mut().drain() {
            w.wake();
        }
    }

    /// Completes when the shard starts draining.
    pub fn drain_signal(&self) -> DrainSignal<'_> {
        DrainSignal {
            shard: self,
            slot: None,
        }
    }
}

/// A wait for the drain. Its waker is registered while it waits and
/// removed when it is dropped, so connections that end leave nothing behind
/// (a kept waker would keep its task's memory alive).
pub struct DrainSignal<'a> {
    shard: &'a Shard,
    slot: Option<usize>,
}

impl Future for DrainSignal<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.shard.draining.get() {
            return Poll::Ready(());
        }
        let shard = self.shard;
        let mut w = shard.drain_wakers.borrow_mut();
        match self.slot.and_then(|k| w.get_mut(k)) {
            Some(old) if old.will_wake(cx.waker()) => {}
            Some(old) => *old = cx.waker().clone(),
            None => self.slot = Some(w.insert(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for DrainSignal<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.slot.take() {
            self.shard.drain_wakers.borrow_mut().try_remove(k);
        }
    }
}

/// Counts a connection (or a cache fill) for its whole life, even if its
/// task panics or is dropped unrun: the drain waits for both.
pub struct Busy {
    shard: Rc<Shard>,
    fill: bool,
}

impl Busy {
    fn conn(shard: Rc<Shard>) -> Busy {
        shard.conns.set(shard.conns.get() + 1);
        Busy { shard, fill: false }
    }

    pub fn fill(shard: Rc<Shard>) -> Busy {
        shard.fills.set(shard.fills.get() + 1);
        Busy { shard, fill: true }
    }
}

impl Shard {
    /// No connection and no cache fill left.
    fn idle(&self) -> bool {
        self.conns.get() == 0 && self.fills.get() == 0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let count = if self.fill {
            &self.shard.fills
        } else {
            &self.shard.conns
        };
        count.set(count.get() - 1);
        if self.shard.idle() {
            if let Some(w) = self.shard.drained.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

/// A seed that differs from run to run (time and pid; not for secrets
/// that must resist a determined guesser).
fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    crate::balance::mix(t ^ (u64::from(std::process::id()) << 32))
}

/// Checks that io_uring can be used, naming the likely causes when not.
pub fn check_io_uring() -> Result<(), StartError> {
    #[repr(C)]
    #[derive(Default)]
    struct Params {
        sq_entries: u32,
        cq_entries: u32,
        flags: u32,
        sq_thread_cpu: u32,
        sq_thread_idle: u32,
        features: u32,
        wq_fd: u32,
        resv: [u32; 3],
        sq_off: [u32; 10],
        cq_off: [u32; 10],
    }
    let mut p = Params::default();
    // SAFETY: io_uring_setup reads and writes a correctly sized params struct.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &mut p as *mut Params) };
    if fd >= 0 {
        // SAFETY: fd was just returned by the kernel and is ours.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    let why = match e.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no io_uring (Linux 5.8 or newer is needed)",
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "io_uring is forbidden here: a container seccomp profile, or sysctl kernel.io_uring_disabled"
        }
        Some(libc::ENOMEM) => "not enough locked memory for io_uring: raise the memlock limit (ulimit -l)",
        _ => "io_uring could not be set up",
    };
    Err(StartError(format!("io_uring is unavailable: {why} ({e})")))
}

/// A memlock limit too small for glommio's registered buffers, as a warning.
fn memlock_note() -> Option<String> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root || r.rlim_cur == libc::RLIM_INFINITY || r.rlim_cur >= (3 * IO_MEMORY as u64 + (1 << 20))
    {
        return None;
    }
    Some(format!(
        "memlock limit is {} KiB: io_uring buffers will not be registered (slower file I/O); raise it with `ulimit -l`",
        r.rlim_cur / 1024
    ))
}

/// Raises the soft open-file limit towards the hard one, as far as
/// `clients` connections (each with an upstream connection) and some files
/// can use: distributions start services at 1024, which would cap a shard
/// long before `max_connections`. A note when even the raised limit is
/// below `clients` (nginx warns the same way about `worker_connections`).
fn raise_nofile(clients: usize) -> Option<String> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return None;
    }
    let want = (clients as u64).saturating_mul(2).saturating_add(1024);
    let target = want.min(r.rlim_max);
    if r.rlim_cur != libc::RLIM_INFINITY && r.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads a valid rlimit; raising the soft limit up
        // to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            r.rlim_cur = target;
        }
    }
    (r.rlim_cur != libc::RLIM_INFINITY && r.rlim_cur < clients as u64).then(|| {
        format!(
            "open-file limit is {} (hard {}), below the {clients} connections shards × max_connections allow: \
             accepts will fail beyond it; raise it with `ulimit -n` or LimitNOFILE=",
            r.rlim_cur, r.rlim_max
        )
    })
}

fn listen_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// Resolves port 0 to a concrete port shared by every shard and detects an
/// address already in use. The returned sockets hold the ports until every
/// shard has bound its own.
fn reserve(listen: &[SocketAddr]) -> Result<(Vec<SocketAddr>, Vec<socket2::Socket>), StartError> {
    let mut addrs = Vec::new();
    let mut holds = Vec::new();
    for &a in listen {
        if a.port() == 0 {
            let s =
                listen_socket(a, true).map_err(|e| StartError(format!("cannot bind {a}: {e}")))?;
            let local = s
                .local_addr()
                .ok()
                .and_then(|l| l.as_socket())
                .ok_or_else(|| StartError(format!("cannot read the bound address of {a}")))?;
            addrs.push(local);
            holds.push(s);
        } else {
            // Without SO_REUSEPORT this fails if anyone listens there, even
            // another process that set SO_REUSEPORT itself.
            match listen_socket(a, false) {
                Ok(_) => addrs.push(a),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(StartError(format!("address {a} is already in use")))
                }
                Err(e) => return Err(StartError(format!("cannot bind {a}: {e}"))),
            }
        }
    }
    Ok((addrs, holds))
}

/// The longest the process waits at its end for the access log's last
/// buffers to be written.
const LOG_DRAIN: Duration = Duration::from_secs(5);

/// A running proxy: its bound addresses and a way to stop it.
pub struct Running {
    pub addrs: Vec<SocketAddr>,
    /// The admin listener's address, if there is one.
    pub admin: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    /// Cleared once every shard has ended: the nudger runs until then.
    nudging: Arc<AtomicBool>,
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    /// The access log's writer thread, which ends once every shard (and
    /// its sender) has.
    log_writer: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Asks every shard to drain and stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits for every shard to finish, then for the access log writer to
    /// write what they handed it last (their final flush), for at most
    /// LOG_DRAIN.
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
        self.nudging.store(false, Ordering::Relaxed);
        if let Some(w) = self.log_writer {
            let until = Instant::now() + LOG_DRAIN;
            while !w.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if w.is_finished() {
                let _ = w.join();
            }
        }
    }
}

/// The CPUs `--cpus` names must be ones this process may run on (a
/// container's cpuset, `taskset`): else the shard's executor fails to pin.
fn check_affinity(cpus: Option<&[usize]>) -> Result<(), StartError> {
    let Some(cpus) = cpus else { return Ok(()) };
    let Some(allowed) = allowed_cpus() else {
        return Ok(()); // cannot tell: let the executor say
    };
    match cpus.iter().find(|c| !allowed.contains(c)) {
        None => Ok(()),
        Some(bad) => Err(StartError(format!(
            "--cpus / server.cpus: CPU {bad} is not one this process may run on (allowed: {})",
            allowed
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ))),
    }
}

/// CPUs online on the machine. Not `available_parallelism`, which is the
/// caller's affinity mask: under `taskset -c 1`, `--cpus 1` must still be
/// valid.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The highest number of an online CPU (CPUs may be offline in between, so
/// it can exceed the online count), from `/sys/devices/system/cpu/online`.
pub fn highest_online_cpu() -> Option<usize> {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    crate::config::parse_cpus(list.trim())
        .ok()?
        .into_iter()
        .max()
}

/// The CPUs this process may run on (its affinity mask), in order.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size is that of the set passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return None;
    }
    Some(
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: i is below CPU_SETSIZE.
            .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
            .collect(),
    )
}

/// Starts every shard and returns once all of them listen.
pub fn start(cfg: Config) -> Result<Running, StartError> {
    start_with(cfg, Arc::new(AtomicBool::new(false)))
}

/// [`start`] with the flag that stops the shards made beforehand, so that
/// signal handlers can be set before start-up (a stop during it is then
/// a drain and a clean exit, not the default action's kill).
pub fn start_with(mut cfg: Config, stop: Arc<AtomicBool>) -> Result<Running, StartError> {
    check_io_uring()?;
    check_affinity(cfg.cpus.as_deref())?;
    if let Some(note) = memlock_note() {
        eprintln!("corral: warning: {note}");
    }
    if let Some(note) = raise_nofile(cfg.shards * cfg.max_connections) {
        eprintln!("corral: warning: {note}");
    }
    let (addrs, holds) = reserve(&cfg.listen)?;
    for s in &cfg.stores {
        let (direct, why) = crate::origin::store::direct_io(&s.root);
        eprintln!(
            "corral: store {} at {}: {} reads of {}-byte blocks, merged up to {} bytes",
            s.name,
            s.root.display(),
            if direct { "O_DIRECT" } else { "buffered" },
            s.block_size,
            s.max_merge
        );
        if !direct {
            eprintln!(
                "corral: store {}: {why}: reads go through the page cache",
                s.name
            );
        }
    }
    if cfg.cache.size_bytes > 0 {
        // A response larger than its owner's partition could never be
        // stored: it streams through unstored (and is remembered as
        // uncacheable) rather than being shared, said `stored` and dropped.
        let most = crate::cache::largest_storable(cfg.cache.size_bytes, cfg.shards);
        if cfg.cache.max_object_bytes > most {
            eprintln!(
                "corral: cache.max_object_size ({} bytes) is more than a shard's share of the cache holds: responses over {most} bytes pass through unstored",
                cfg.cache.max_object_bytes
            );
            cfg.cache.max_object_bytes = most;
        }
    }
    let cfg = Arc::new(cfg);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let shared_fills = Arc::new(crate::cache::shared::SharedFills::default());
    // The hot sets take 1/16 of the budget; the partitions the rest.
    let partitions = (cfg.cache.size_bytes > 0).then(|| {
        Arc::new(crate::cache::Partitions::new(
            cfg.cache.size_bytes - cfg.cache.size_bytes / crate::cache::HOT_SET_SHARE,
            cfg.shards,
        ))
    });
    // What the shards share about each pool; pool i's health is decided on
    // shard i % shards.
    let pools: Arc<Vec<Arc<PoolShared>>> = Arc::new(
        cfg.pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let secret = match p.sticky.as_ref().and_then(|s| s.secret.as_ref()) {
                    Some(s) => crate::cache::key_hash(&[s.as_bytes()]),
                    None => random_seed(),
                };
                Arc::new(PoolShared::new(p, i % cfg.shards, secret))
            })
            .collect(),
    );
    let mailboxes: Arc<Vec<Arc<Mailbox<crate::admin::StatsRequest>>>> = Arc::new(
        (0..cfg.shards)
            .map(|_| Arc::new(Mailbox::new(64)))
            .collect(),
    );
    let mut writer = match &cfg.access_log {
        Some(l) => Some(crate::admin::log::start_writer(l).map_err(|e| {
            StartError(format!(
                "cannot open the access log {}: {e}",
                l.path.as_deref().unwrap_or("stderr")
            ))
        })?),
        None => None,
    };
    let log = writer.as_ref().map(|w| (w.tx.clone(), w.lost.clone()));
    let mut admin = match cfg.admin {
        Some(a) => {
            let s = listen_socket(a, false)
                .and_then(|s| s.listen(128).map(|_| s))
                .map_err(|e| StartError(format!("cannot listen on the admin address {a}: {e}")))?;
            Some(s)
        }
        None => None,
    };
    let admin_addr = admin
        .as_ref()
        .and_then(|s| s.local_addr().ok())
        .and_then(|a| a.as_socket());
    let started = Instant::now();
    let mut handles = Vec::new();
    let mut wakes = Vec::new();
    for id in 0..cfg.shards {
        let (wake, woken) = UnixStream::pair()
            .and_then(|(a, b)| {
                a.set_nonblocking(true)?;
                b.set_nonblocking(true)?;
                Ok((a, b))
            })
            .map_err(|e| StartError(format!("cannot start shard {id}: {e}")))?;
        wakes.push(wake);
        let placement = match &cfg.cpus {
            Some(c) => Placement::Fixed(c[id]),
            None => Placement::Unbound,
        };
        let (cfg, addrs, stop, ready) =
            (cfg.clone(), addrs.clone(), stop.clone(), ready_tx.clone());
        let common = Common {
            fills: shared_fills.clone(),
            parts: partitions.clone(),
            pools: pools.clone(),
            mailboxes: mailboxes.clone(),
            log: log.clone(),
            admin: if id == 0 { admin.take() } else { None },
            started,
        };
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("corral-shard{id}"))
            .io_memory(if cfg.stores.is_empty() {
                IO_MEMORY
            } else {
                IO_MEMORY_STORES
            })
            .spawn(move || shard_main(id, cfg, common, addrs, stop, woken, ready))
            .map_err(|e| StartError(format!("cannot start shard {id}: {e}")))?;
        handles.push(h);
    }
    drop(ready_tx);
    for _ in 0..cfg.shards {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(m)) => {
                stop.store(true, Ordering::SeqCst);
                return Err(StartError(m));
            }
            Err(_) => {
                stop.store(true, Ordering::SeqCst);
                // A shard whose executor could not even start (its CPU
                // placement, its ring) ended with its error: say it.
                let why: Vec<String> = handles
                    .into_iter()
                    .filter(|h| h.is_finished())
                    .filter_map(|h| h.join().err().map(|e| e.to_string()))
                    .collect();
                return Err(StartError(if why.is_empty() {
                    "a shard failed to start (see above)".into()
                } else {
                    format!("a shard failed to start: {}", why.join("; "))
                }));
            }
        }
    }
    drop(holds);
    // The nudger: a byte to every shard each NUDGE, until every shard has
    // ended (the drain too waits on timers: its own, a stuck client's), so
    // that a missed timer wake-up costs at most that long (see shard_main).
    let nudging = Arc::new(AtomicBool::new(true));
    let nudge_on = nudging.clone();
    let nudger = std::thread::Builder::new()
        .name("corral-nudge".into())
        .spawn(move || {
            while nudge_on.load(Ordering::Relaxed) {
                std::thread::sleep(NUDGE);
                for mut w in &wakes {
                    let _ = w.write(b"n"); // full: already woken
                }
            }
        });
    if let Err(e) = nudger {
        stop.store(true, Ordering::SeqCst);
        return Err(StartError(format!("cannot start the nudger thread: {e}")));
    }
    // Only the shards hold senders now: the writer ends when they have.
    drop(log);
    let log_writer = writer.take().map(|w| {
        drop(w.tx);
        w.handle
    });
    Ok(Running {
        addrs,
        admin: admin_addr,
        stop,
        nudging,
        handles,
        log_writer,
    })
}

/// Waits for the nudger's next byte on the shard's wake socket (a tick, if
/// the socket cannot be waited on) and takes what is there.
async fn next_nudge(mut woken: &UnixStream) {
    if glommio::net::wait_readable(woken.as_raw_fd())
        .await
        .is_err()
    {
        glommio::timer::sleep(NUDGE).await;
    }
    let mut sink = [0u8; 64];
    while matches!(woken.read(&mut sink), Ok(n) if n > 0) {}
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<(TcpListener, RawFd)> {
    let s = listen_socket(addr, true)?;
    s.listen(BACKLOG)?;
    Ok(into_glommio(s))
}

/// A listening socket handed to glommio, and its descriptor (kept for
/// [`stop_listening`]).
fn into_glommio(listening: socket2::Socket) -> (TcpListener, RawFd) {
    let fd = listening.into_raw_fd();
    // SAFETY: a bound, listening TCP socket whose ownership moves to glommio.
    (unsafe { TcpListener::from_raw_fd(fd) }, fd)
}

/// What every shard shares.
struct Common {
    /// Misses in flight anywhere in the process.
    fills: Arc<crate::cache::shared::SharedFills>,
    /// The cache's partitions, one per shard, unless caching is off.
    parts: Option<Arc<crate::cache::Partitions>>,
    /// Health and load of each pool's backends.
    pools: Arc<Vec<Arc<PoolShared>>>,
    /// Each shard's mailbox for statistics requests.
    mailboxes: Arc<Vec<Arc<Mailbox<crate::admin::StatsRequest>>>>,
    /// The access log writer's sender and its count of lost bytes, if any.
    log: Option<(
        crossbeam_channel::Sender<Vec<u8>>,
        Arc<std::sync::atomic::AtomicU64>,
    )>,
    /// The admin listener's socket (shard 0 only).
    admin: Option<socket2::Socket>,
    started: Instant,
}

async fn shard_main(
    id: usize,
    cfg: Arc<Config>,
    common: Common,
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    woken: UnixStream,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let mut listeners = Vec::new();
    for a in &addrs {
        match bind_listener(*a) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                let _ = ready.send(Err(format!("shard {id}: cannot listen on {a}: {e}")));
                return;
            }
        }
    }
    // The first timer in a process is slow to register: pay it before serving.
    glommio::timer::sleep(Duration::from_millis(1)).await;
    // Connections run in a latency-sensitive queue: its I/O completes on
    // glommio's latency ring, and any completion there preempts the tasks
    // that are spinning on the fast path (see net.rs), so a parked
    // connection is woken at once instead of at the next preempt tick.
    let queue = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::Matters(CONN_PREEMPT),
        "connections",
    );
    // Every socket of the shard waits on one epoll set (see net.rs).
    if let Err(e) = net::Poller::start(queue) {
        eprintln!("corral[{id}]: no epoll set ({e}); sockets wait through glommio");
    }
    let shard = Rc::new(Shard::new(id, cfg.clone(), queue, &common));
    let hub = crate::admin::Hub {
        mailboxes: common.mailboxes.clone(),
        pools: common.pools.clone(),
        parts: common.parts.clone(),
        started: common.started,
        last: Default::default(),
    };
    // The shard's background tasks, beside its connections.
    let mut background: Vec<Pin<Box<dyn Future<Output = ()>>>> = Vec::new();
    for st in &shard.stores {
        background.push(Box::pin(crate::origin::store::reader(st.clone(), queue)));
    }
    // Statistics requests from the admin side.
    let mailbox = common.mailboxes[id].clone();
    background.push(Box::pin(crate::admin::answer_stats(shard.clone(), mailbox)));
    if let Some(sock) = common.admin {
        let (l, fd) = into_glommio(sock);
        background.push(Box::pin(crate::admin::serve(
            shard.clone(),
            hub.clone(),
            l,
            fd,
        )));
    }
    if let (0, Some(every)) = (id, cfg.stats_interval) {
        background.push(Box::pin(crate::admin::summaries(
            shard.clone(),
            hub.clone(),
            every,
        )));
    }
    for (i, p) in common.pools.iter().enumerate() {
        if p.owner == id {
            background.push(Box::pin(crate::health::owner::run(shard.clone(), i)));
        }
    }
    for task in background {
        if let Err(e) = glommio::spawn_local_into(task, queue).map(|t| t.detach()) {
            let _ = ready.send(Err(format!("shard {id}: cannot spawn: {e}")));
            return;
        }
    }
    let mut accept_tasks = Vec::new();
    for (l, fd) in listeners {
        let shard = shard.clone();
        match glommio::spawn_local_into(accept_loop(shard, l, fd), queue) {
            Ok(t) => accept_tasks.push(t),
            Err(e) => {
                let _ = ready.send(Err(format!("shard {id}: cannot spawn: {e}")));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));
    drop(ready);

    let mut last_sweep = Instant::now();
    // Housekeeping runs on the nudger's tick: every byte on the wake socket
    // wakes this executor, which then also runs any timer that is due (a
    // parked shard has been seen to miss a timer's own wake-up).
    while !stop.load(Ordering::Relaxed) {
        next_nudge(&woken).await;
        if let Some(l) = &shard.log {
            l.flush();
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= Duration::from_secs(1) {
            for p in &shard.pools {
                p.sweep(now);
            }
            for s in &shard.stores {
                s.sweep();
            }
            last_sweep = now;
        }
    }
    // Drain: stop accepting, close idle connections, let requests finish.
    shard.begin_drain();
    for t in accept_tasks {
        t.await;
    }
    // Until the last connection and the last cache fill end (their guards
    // wake us) or the timeout: a fill whose client is gone may still be
    // storing, or streaming to other shards' relays. The nudger's bytes go
    // on waking the executor meanwhile, so that the drain's timers (its
    // own, its connections') are not missed either.
    let drained = futures_lite::future::or(glommio::timer::sleep(cfg.drain_timeout), {
        let shard = &shard;
        std::future::poll_fn(move |cx| {
            if shard.idle() {
                return Poll::Ready(());
            }
            *shard.drained.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
    });
    let nudged = async {
        loop {
            next_nudge(&woken).await;
        }
    };
    futures_lite::future::or(drained, nudged).await;
    if !shard.idle() {
        eprintln!(
            "corral[{id}]: drain timeout: closing {} connections, {} cache fills",
            shard.conns.get(),
            shard.fills.get()
        );
    }
    for p in &shard.pools {
        p.clear();
    }
    if let Some(l) = &shard.log {
        l.flush();
    }
}

/// The next connection on `listener`; `None` once the shard drains.
pub async fn accept(shard: &Shard, listener: &TcpListener) -> Option<glommio::net::TcpStream> {
    loop {
        let next = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.drain_signal().await;
            None
        })
        .await;
        match next {
            None => return None,
            Some(Ok(s)) => return Some(s),
            Some(Err(e)) => {
                eprintln!("corral[{}]: accept failed: {e}", shard.id);
                // Out of file descriptors or similar: back off briefly.
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Refused connections (over `max_connections`) lingering at once, per
/// shard.
const MAX_REFUSED_LINGERING: usize = 64;

/// Counts a refused connection's lingering close while it lasts (however
/// its task ends).
struct LingerGuard(Rc<Shard>);

impl LingerGuard {
    fn new(shard: Rc<Shard>) -> LingerGuard {
        shard
            .refused_lingering
            .set(shard.refused_lingering.get() + 1);
        LingerGuard(shard)
    }
}

impl Drop for LingerGuard {
    fn drop(&mut self) {
        self.0
            .refused_lingering
            .set(self.0.refused_lingering.get() - 1);
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, fd: RawFd) {
    let queue = shard.queue;
    let mut refusal = Vec::new();
    while let Some(stream) = accept(&shard, &listener).await {
        let sock = net::Sock::new(stream);
        if shard.conns.get() >= shard.cfg.max_connections {
            shard.refused.set(shard.refused.get() + 1);
            // Made for each refusal: it carries the current Date.
            refusal.clear();
            crate::http::write_simple_response(
                &mut refusal,
                503,
                "too many connections",
                true,
                crate::http::Answering::UNKNOWN,
                &[("Retry-After", "1")],
            );
            sock.try_write(&refusal);
            // Closing at once, with the client's request unread, would be a
            // reset that can destroy the 503 on its way: FIN after it, what
            // has arrived is dropped, and a few refused connections linger
            // like any other for what is still coming (each holds a
            // descriptor, so their number is capped).
            sock.shutdown_write();
            sock.drain_now();
            if shard.refused_lingering.get() < MAX_REFUSED_LINGERING {
                let lingering = LingerGuard::new(shard.clone());
                let mut sock = sock;
                let task = glommio::spawn_local_into(
                    async move {
                        let _lingering = lingering;
                        let linger = AssertUnwindSafe(conn::linger_close(&mut sock));
                        let _ = futures_lite::FutureExt::catch_unwind(linger).await;
                    },
                    queue,
                );
                if let Ok(t) = task {
                    drop(t.detach());
                }
            }
            continue;
        }
        let guard = Busy::conn(shard.clone());
        let conn = conn::ClientConn::new(shard.clone(), sock);
        let task = glommio::spawn_local_into(conn.run(guard), queue);
        match task {
            Ok(t) => drop(t.detach()),
            Err(e) => eprintln!("corral[{}]: cannot spawn a connection task: {e}", shard.id),
        };
    }
    stop_listening(fd);
}

/// Takes a listening socket out of the listen state at once. Closing it is
/// not enough: the ring's cancelled accept still holds the socket, and the
/// kernel tears the ring down after the process has exited, which was seen
/// to take seconds, during which the socket took connections nobody would
/// accept (and a restarted corral shared the port with it).
pub fn stop_listening(fd: RawFd) {
    // SAFETY: shutdown on a listening socket we own (its listener is still
    // alive in the caller); errors are harmless.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}
