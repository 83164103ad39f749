//! The socket fast path: the one place that reads and writes TCP streams.
//!
//! glommio's stream arms an io_uring poll after every short read, and the next
//! read waits for that poll; measured against nginx (../shared/design/GLOMMIO.md)
//! that costs about a third of the throughput. So reads and writes go straight
//! to the fd with `MSG_DONTWAIT`, and readiness comes the way nginx and HAProxy
//! get it: each shard keeps one edge-triggered epoll set ([`Poller`]) with
//! every socket of the shard registered once. A socket that would block
//! parks its task on its slot (no system call); the shard's pump task asks
//! epoll what became ready, once per round for all sockets, wakes those
//! tasks, and when nothing is ready parks itself on the epoll descriptor with
//! a single io_uring poll. A read that returned less than asked leaves the
//! socket marked not ready, so the next read waits for the edge instead of
//! trying `recv` for an `EAGAIN`.
//!
//! Without a pump on the thread (a socket made outside a shard), a socket
//! falls back to yielding a bounded number of times on `EAGAIN` and then
//! glommio's own readiness wait, bounded by a deadline.

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use slab::Slab;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Rounds the pump polls epoll and finds nothing before it parks on the
/// epoll descriptor (and, without a pump, yields on `EAGAIN` before parking
/// on glommio). Large enough to catch a reply already on its way, small
/// enough that the reactor (accepts, timers) still runs often.
pub const SPIN_YIELDS: u32 = 16;

/// The spin budget: [`SPIN_YIELDS`], or `CORRAL_SPIN_YIELDS` from the
/// environment for tuning on other hardware.
fn spin_yields() -> u32 {
    thread_local! {
        static SPIN: u32 = std::env::var("CORRAL_SPIN_YIELDS").ok().and_then(|v| v.parse().ok()).unwrap_or(SPIN_YIELDS);
    }
    SPIN.with(|s| *s)
}

/// Which way a socket waits.
#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

#[derive(Default)]
struct Ready {
    /// An edge arrived since the socket last came up empty this way (or the
    /// socket has not been tried yet).
    ready: bool,
    waker: Option<Waker>,
}

struct Slot {
    /// Distinguishes this socket from an earlier one in the same slot, whose
    /// events may still be queued.
    generation: u32,
    read: Ready,
    write: Ready,
    /// The socket failed or hung up both ways: it stays ready both ways
    /// (the edge came once).
    ended: bool,
    /// The peer shut its side (FIN, `EPOLLRDHUP`), or the socket ended: it
    /// stays ready to read (a read that returns the data before the EOF
    /// must not then wait for another edge). Not for writing: a peer that
    /// half-closed may still read, and a write that would block must wait
    /// for room, not retry at once forever.
    read_ended: bool,
    /// TCP urgent data came (`EPOLLPRI`): `recv` stops short at its mark
    /// with more queued, so a short read does not mean "empty" until one
    /// finds nothing.
    urgent: bool,
    /// When the current wait gives up, and whether it has.
    deadline: Option<Instant>,
    timed_out: bool,
}

impl Slot {
    /// Whether this way stays ready for good.
    fn ended(&self, dir: Dir) -> bool {
        match dir {
            Dir::Read => self.read_ended,
            Dir::Write => self.ended,
        }
    }

    fn way(&mut self, dir: Dir) -> &mut Ready {
        match dir {
            Dir::Read => &mut self.read,
            Dir::Write => &mut self.write,
        }
    }
}

/// A shard's edge-triggered epoll set and the sockets waiting on it.
pub struct Poller {
    epfd: OwnedFd,
    slots: RefCell<Slab<Slot>>,
    generation: std::cell::Cell<u32>,
    /// No waiting socket's deadline is earlier than this (it may be too
    /// early, never too late: a sweep recomputes it).
    earliest: std::cell::Cell<Option<Instant>>,
    /// The time at the pump's last round (one clock read per round, not
    /// per wait).
    now: std::cell::Cell<Instant>,
    /// Whether `now` is this round's: false while the pump is parked, when
    /// the last reading may be arbitrarily old.
    fresh: std::cell::Cell<bool>,
    /// The parked pump, woken when a wait brings the earliest deadline
    /// forward (its timer was set for the old one).
    pump: RefCell<Option<Waker>>,
}

thread_local! {
    static POLLER: RefCell<Option<Rc<Poller>>> = const { RefCell::new(None) };
}

/// Events taken from epoll per call.
const EVENTS: usize = 256;

impl Poller {
    /// Makes this thread's poller and starts its pump in `queue`: from then
    /// on every [`Sock`] made on the thread waits through it.
    pub fn start(queue: glommio::TaskQueueHandle) -> io::Result<()> {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let p = Rc::new(Poller {
            // SAFETY: a fresh descriptor nobody else owns.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            slots: RefCell::new(Slab::new()),
            generation: std::cell::Cell::new(0),
            earliest: std::cell::Cell::new(None),
            now: std::cell::Cell::new(Instant::now()),
            fresh: std::cell::Cell::new(false),
            pump: RefCell::new(None),
        });
        glommio::spawn_local_into(p.clone().pump(), queue)
            .map_err(|e| io::Error::other(e.to_string()))?
            .detach();
        POLLER.with(|cell| *cell.borrow_mut() = Some(p));
        Ok(())
    }

    /// The pump's reading of the clock at the start of this round, while
    /// it runs rounds; `None` when it is parked or not running.
    fn round_time() -> Option<Instant> {
        POLLER.with(|cell| {
            cell.borrow()
                .as_ref()
                .filter(|p| p.fresh.get())
                .map(|p| p.now.get())
        })
    }

    fn current() -> Option<Rc<Poller>> {
        POLLER.with(|cell| cell.borrow().clone())
    }

    /// Adds `fd` to the set; its slot starts ready both ways.
    fn register(&self, fd: RawFd) -> Option<usize> {
        let generation = self.generation.get().wrapping_add(1);
        self.generation.set(generation);
        let key = self.slots.borrow_mut().insert(Slot {
            generation,
            read: Ready {
                ready: true,
                waker: None,
            },
            write: Ready {
                ready: true,
                waker: None,
            },
            ended: false,
            read_ended: false,
            urgent: false,
            deadline: None,
            timed_out: false,
        });
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN
                | libc::EPOLLPRI
                | libc::EPOLLOUT
                | libc::EPOLLRDHUP
                | libc::EPOLLET) as u32,
            u64: (u64::from(generation) << 32) | key as u64,
        };
        // SAFETY: both descriptors are open; ev is a valid event.
        if unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            self.slots.borrow_mut().remove(key);
            return None;
        }
        Some(key)
    }

    fn deregister(&self, key: usize, fd: RawFd) {
        // SAFETY: both descriptors are open (the stream closes after this).
        unsafe {
            libc::epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
        self.slots.borrow_mut().try_remove(key);
    }

    /// Whether the socket may have something this way; clears the mark, so
    /// that an empty try leaves the socket waiting for its next edge.
    fn take(&self, key: usize, dir: Dir) -> bool {
        match self.slots.borrow_mut().get_mut(key) {
            Some(s) => std::mem::take(&mut s.way(dir).ready) || s.ended(dir),
            None => true,
        }
    }

    /// Whether an edge came this way (or the socket ended) since the
    /// socket was last found empty; unknown sockets count as ready.
    fn is_ready(&self, key: usize, dir: Dir) -> bool {
        self.slots.borrow().get(key).is_none_or(|s| {
            s.ended(dir)
                || match dir {
                    Dir::Read => s.read.ready,
                    Dir::Write => s.write.ready,
                }
        })
    }

    /// [`Poller::take`] for reading: `None` when nothing can have come,
    /// else whether TCP urgent data is pending (a short read may then have
    /// stopped at its mark with more queued).
    fn take_read(&self, key: usize) -> Option<bool> {
        match self.slots.borrow_mut().get_mut(key) {
            Some(s) => (std::mem::take(&mut s.read.ready) || s.read_ended).then_some(s.urgent),
            None => Some(false),
        }
    }

    /// After a short read with urgent data pending: one that returned bytes
    /// may have stopped at the mark, so the socket stays ready; one that
    /// found nothing ends the urgent state.
    fn after_urgent(&self, key: usize, got: bool) {
        if let Some(s) = self.slots.borrow_mut().get_mut(key) {
            s.urgent = got;
            s.read.ready |= got;
        }
    }

    fn mark(&self, key: usize, dir: Dir) {
        if let Some(s) = self.slots.borrow_mut().get_mut(key) {
            s.way(dir).ready = true;
        }
    }

    /// Until an edge arrives this way, or `deadline` passes. The deadline
    /// is kept in the slot and checked by the pump (each round against the
    /// earliest one, and with one timer for it when the pump parks), not
    /// with a glommio timer per wait: those cost 10–20% of a 1 KiB hit's
    /// throughput.
    async fn wait(&self, key: usize, dir: Dir, deadline: Instant) -> Result<(), NetError> {
        let mut first = true;
        std::future::poll_fn(|cx| {
            let mut slots = self.slots.borrow_mut();
            let Some(s) = slots.get_mut(key) else {
                return Poll::Ready(Ok(()));
            };
            if first {
                // A cancelled earlier wait may have left its verdict behind.
                first = false;
                s.timed_out = false;
                if deadline <= self.now.get() {
                    return Poll::Ready(Err(NetError::TimedOut));
                }
                s.deadline = Some(deadline);
                if self.earliest.get().is_none_or(|e| deadline < e) {
                    self.earliest.set(Some(deadline));
                    if let Some(w) = self.pump.borrow_mut().take() {
                        w.wake();
                    }
                }
            }
            let ended = s.ended(dir);
            if s.way(dir).ready || ended {
                s.deadline = None;
                return Poll::Ready(Ok(()));
            }
            if s.timed_out {
                return Poll::Ready(Err(NetError::TimedOut));
            }
            let r = s.way(dir);
            match &r.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => r.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Times out the waits whose deadline has passed and finds the next.
    fn sweep(&self, now: Instant) {
        let mut wake = Vec::new();
        let mut earliest: Option<Instant> = None;
        for (_, s) in self.slots.borrow_mut().iter_mut() {
            match s.deadline {
                Some(d) if d <= now => {
                    s.deadline = None;
                    s.timed_out = true;
                    wake.extend(s.read.waker.take());
                    wake.extend(s.write.waker.take());
                }
                Some(d) => earliest = Some(earliest.map_or(d, |e| e.min(d))),
                None => {}
            }
        }
        self.earliest.set(earliest);
        wake.into_iter().for_each(Waker::wake);
    }

    /// The pump: asks epoll what became ready and wakes those sockets' tasks,
    /// once per round of the task queue while there is traffic; after
    /// [`spin_yields`] empty rounds it parks on the epoll descriptor.
    async fn pump(self: Rc<Self>) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let mut wake: Vec<Waker> = Vec::with_capacity(EVENTS);
        let mut empty = 0;
        loop {
            let now = Instant::now();
            self.now.set(now);
            self.fresh.set(true);
            if self.earliest.get().is_some_and(|e| e <= now) {
                self.sweep(now);
            }
            // SAFETY: events has room for EVENTS entries; timeout 0 never blocks.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    EVENTS as libc::c_int,
                    0,
                )
            };
            if n > 0 {
                empty = 0;
                {
                    let mut slots = self.slots.borrow_mut();
                    for ev in &events[..n as usize] {
                        let (generation, key) = ((ev.u64 >> 32) as u32, ev.u64 as u32 as usize);
                        let Some(s) = slots.get_mut(key).filter(|s| s.generation == generation)
                        else {
                            continue;
                        };
                        let bits = ev.events as libc::c_int;
                        let broken = bits & (libc::EPOLLERR | libc::EPOLLHUP) != 0;
                        let read_shut = broken || bits & libc::EPOLLRDHUP != 0;
                        s.ended |= broken;
                        s.read_ended |= read_shut;
                        s.urgent |= bits & libc::EPOLLPRI != 0;
                        if read_shut || bits & libc::EPOLLIN != 0 {
                            s.read.ready = true;
                            wake.extend(s.read.waker.take());
                        }
                        if broken || bits & libc::EPOLLOUT != 0 {
                            s.write.ready = true;
                            wake.extend(s.write.waker.take());
                        }
                    }
                }
                wake.drain(..).for_each(Waker::wake);
                glommio::executor().yield_now().await;
                continue;
            }
            empty += 1;
            if empty <= spin_yields() {
                glommio::executor().yield_now().await;
                continue;
            }
            empty = 0;
            self.fresh.set(false);
            // Nothing for a while: sleep until any socket has an edge or the
            // earliest deadline passes. A failed poll (it should not fail)
            // is not retried in a hot loop.
            let parked = async {
                if glommio::net::wait_readable(self.epfd.as_raw_fd())
                    .await
                    .is_err()
                {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
            };
            let planned = self.earliest.get();
            let timer = async {
                match planned {
                    Some(e) => glommio::timer::sleep(e.saturating_duration_since(now)).await,
                    None => std::future::pending().await,
                }
            };
            // Woken early when a wait brings the earliest deadline forward.
            let moved = std::future::poll_fn(|cx| {
                if self.earliest.get() != planned {
                    return Poll::Ready(());
                }
                *self.pump.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            });
            futures_lite::future::or(parked, futures_lite::future::or(timer, moved)).await;
            self.pump.borrow_mut().take();
        }
    }
}

/// The time to count deadlines from: on a shard whose pump is running
/// rounds, its reading at the start of the round (no clock read per
/// request, and at most a round old, as nginx's cached time is); a fresh
/// reading otherwise. For deadlines, not for latency figures.
pub fn round_now() -> Instant {
    Poller::round_time().unwrap_or_else(Instant::now)
}

/// Why a socket operation did not complete.
#[derive(Debug)]
pub enum NetError {
    TimedOut,
    Io(io::Error),
}

impl From<io::Error> for NetError {
    fn from(e: io::Error) -> Self {
        NetError::Io(e)
    }
}

/// Runs `fut` until `deadline`; `None` if the deadline passed first.
pub async fn until<T>(deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    let now = Instant::now();
    if deadline <= now {
        return None;
    }
    let dur = deadline - now;
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::Timer::new(dur).await;
        None
    })
    .await
}

/// A TCP stream with the fast path.
pub struct Sock {
    stream: TcpStream,
    fd: RawFd,
    /// Bytes written so far (for the access log).
    pub sent: u64,
    /// Whether the fd is O_NONBLOCK (set on first sendfile).
    nonblocking: bool,
    /// The shard's poller and this socket's slot in it.
    poll: Option<(Rc<Poller>, usize)>,
    /// Closes with a reset ([`Sock::set_reset_on_close`]).
    resets: std::cell::Cell<bool>,
}

impl Drop for Sock {
    fn drop(&mut self) {
        if let Some((p, key)) = &self.poll {
            p.deregister(*key, self.fd);
        }
    }
}

impl Sock {
    pub fn new(stream: TcpStream) -> Sock {
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let poll = Poller::current().and_then(|p| p.register(fd).map(|key| (p, key)));
        Sock {
            stream,
            fd,
            sent: 0,
            nonblocking: false,
            poll,
            resets: std::cell::Cell::new(false),
        }
    }

    /// Whether the socket closes with a reset.
    pub fn resets(&self) -> bool {
        self.resets.get()
    }

    /// Connects within `timeout`.
    pub async fn connect(addr: std::net::SocketAddr, timeout: Duration) -> Result<Sock, NetError> {
        match TcpStream::connect_timeout(addr, timeout).await {
            Ok(s) => Ok(Sock::new(s)),
            Err(e) => {
                let e: io::Error = e.into();
                if e.kind() == io::ErrorKind::TimedOut {
                    Err(NetError::TimedOut)
                } else {
                    Err(NetError::Io(e))
                }
            }
        }
    }

    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.peer_addr().ok()
    }

    /// One non-blocking `recv`: `Ok(Some(n))`, or `Ok(None)` on EAGAIN.
    fn try_recv(&self, buf: &mut [u8], flags: libc::c_int) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: buf is a valid, writable slice for its whole length.
            let n = unsafe {
                libc::recv(
                    self.fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// One read that never waits: `Ok(None)` when nothing has arrived
    /// (with a poller, without a system call when it saw no edge).
    pub fn try_read_now(&self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some((p, key)) = &self.poll {
            let Some(urgent) = p.take_read(*key) else {
                return Ok(None);
            };
            let r = self.try_recv(buf, 0)?;
            if r == Some(buf.len()) {
                // There may be more: the next read tries at once.
                p.mark(*key, Dir::Read);
            } else if urgent {
                // Perhaps stopped at an urgent mark: the rest came with the
                // edge already taken.
                p.after_urgent(*key, r.is_some());
            }
            return Ok(r);
        }
        Ok(self.try_recv(buf, 0)?)
    }

    /// Whether bytes are waiting to be read (not EOF, not an error), looked
    /// at directly, whatever edges the poller has collected; if so the
    /// socket is marked ready, so the next read takes them.
    pub fn has_pending(&self) -> bool {
        let mut b = [0u8; 1];
        let pending = matches!(self.try_recv(&mut b, libc::MSG_PEEK), Ok(Some(1)));
        if pending {
            if let Some((p, key)) = &self.poll {
                p.mark(*key, Dir::Read);
            }
        }
        pending
    }

    /// Whether [`Sock::wait_readable`] can wait (the socket is in the
    /// shard's epoll set); without one, waiting needs a read in flight.
    pub fn waits_without_buffer(&self) -> bool {
        self.poll.is_some()
    }

    /// Until something can be read (data, EOF or an error) or `deadline`
    /// passes, holding no buffer; call after a read found nothing. Without
    /// a poller ([`Sock::waits_without_buffer`]) it returns at once.
    pub async fn wait_readable(&self, deadline: Instant) -> Result<(), NetError> {
        match &self.poll {
            Some((p, key)) => p.wait(*key, Dir::Read, deadline).await,
            None => Ok(()),
        }
    }

    /// Reads at least one byte (or 0 at EOF), waiting until `deadline`.
    pub async fn read(&mut self, buf: &mut [u8], deadline: Instant) -> Result<usize, NetError> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some((p, key)) = &self.poll {
            loop {
                if let Some(n) = self.try_read_now(buf)? {
                    return Ok(n);
                }
                p.wait(*key, Dir::Read, deadline).await?;
            }
        }
        if let Some(n) = self.try_recv(buf, 0)? {
            return Ok(n);
        }
        for _ in 0..spin_yields() {
            glommio::executor().yield_now().await;
            if let Some(n) = self.try_recv(buf, 0)? {
                return Ok(n);
            }
        }
        match Box::pin(until(deadline, self.stream.read(buf))).await {
            Some(r) => Ok(r?),
            None => Err(NetError::TimedOut),
        }
    }

    /// Whether nothing (no byte, no EOF, no error) can have arrived since
    /// the last read came up short: the poller saw no edge. Without a
    /// poller, unknown: false.
    pub fn quiet(&self) -> bool {
        self.poll
            .as_ref()
            .is_some_and(|(p, key)| !p.is_ready(*key, Dir::Read))
    }

    /// Whether an idle pooled connection is still usable: no EOF, no error and
    /// no unexpected bytes waiting.
    pub fn idle_is_alive(&self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.try_recv(&mut b, libc::MSG_PEEK), Ok(None))
    }

    /// After an `EAGAIN` this way, waits (until `deadline`) for the socket's
    /// next edge from the shard's poller. `Ok(false)` when there is no
    /// poller on this thread: the caller waits through glommio.
    async fn wait_edge(&self, dir: Dir, deadline: Instant) -> Result<bool, NetError> {
        let Some((p, key)) = &self.poll else {
            return Ok(false);
        };
        // Nothing ran between the EAGAIN and here, so no edge is lost.
        p.take(*key, dir);
        p.wait(*key, dir, deadline).await.map(|()| true)
    }

    /// Writes all of `buf`, waiting until `deadline`.
    pub async fn write_all(&mut self, buf: &[u8], deadline: Instant) -> Result<(), NetError> {
        self.send_all(buf, 0, deadline, None).await
    }

    /// Writes all of `buf`, failing only when `idle` passes without the
    /// peer taking a byte (nginx's `send_timeout`): a client reading a large
    /// body slowly but steadily is not cut off.
    pub async fn write_all_idle(&mut self, buf: &[u8], idle: Duration) -> Result<(), NetError> {
        self.send_all(buf, 0, round_now() + idle, Some(idle)).await
    }

    /// `write_all` with extra `send` flags (`MSG_MORE`) for the direct sends;
    /// with `idle`, the deadline moves on by it whenever bytes go out.
    async fn send_all(
        &mut self,
        mut buf: &[u8],
        flags: libc::c_int,
        mut deadline: Instant,
        idle: Option<Duration>,
    ) -> Result<(), NetError> {
        let progress = |deadline: &mut Instant| {
            if let Some(idle) = idle {
                *deadline = round_now() + idle;
            }
        };
        while !buf.is_empty() {
            // SAFETY: buf is a valid slice for its whole length.
            let n = unsafe {
                libc::send(
                    self.fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                buf = &buf[n as usize..];
                self.sent += n as u64;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if self.wait_edge(Dir::Write, deadline).await? => {
                    progress(&mut deadline);
                }
                Some(libc::EAGAIN) => {
                    // The send buffer is full: let glommio wait for room.
                    match Box::pin(until(deadline, self.stream.write(buf))).await {
                        Some(Ok(n)) => {
                            buf = &buf[n..];
                            self.sent += n as u64;
                            progress(&mut deadline);
                        }
                        Some(Err(e)) => return Err(NetError::Io(e)),
                        None => return Err(NetError::TimedOut),
                    }
                }
                _ => return Err(NetError::Io(e)),
            }
        }
        Ok(())
    }

    /// Writes `head`, then `body`, which is also the bytes of `file` from
    /// `offset`, with `sendfile(2)`: the socket takes references to the
    /// file's pages instead of a copy. The head goes with `MSG_MORE`, so it
    /// leaves in the same segment as the body's first bytes.
    ///
    /// sendfile has no `MSG_DONTWAIT`, so the socket is switched to
    /// non-blocking on first use (glommio's own reads and writes do not
    /// depend on the flag). When the socket is full, the shard's poller waits
    /// for room; without one, the next byte of `body` goes through the
    /// ordinary write, which waits, and sendfile goes on after it. It fails
    /// when `idle` passes without the peer taking a byte.
    pub async fn write_file(
        &mut self,
        head: &[u8],
        body: &[u8],
        file: RawFd,
        offset: usize,
        idle: Duration,
    ) -> Result<(), NetError> {
        if !self.nonblocking {
            // SAFETY: fcntl on our own open fd.
            let flags = unsafe { libc::fcntl(self.fd, libc::F_GETFL) };
            // SAFETY: as above.
            if flags < 0
                || unsafe { libc::fcntl(self.fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
            {
                return self.write_two(head, body, idle).await;
            }
            self.nonblocking = true;
        }
        self.send_all(head, libc::MSG_MORE, round_now() + idle, Some(idle))
            .await?;
        let mut deadline = round_now() + idle;
        let mut done = 0;
        while done < body.len() {
            let mut off = (offset + done) as libc::off_t;
            // SAFETY: both fds are open; off is a valid in/out offset.
            let n = unsafe { libc::sendfile(self.fd, file, &mut off, body.len() - done) };
            if n > 0 {
                done += n as usize;
                self.sent += n as u64;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                _ if n == 0 => return Err(NetError::Io(io::ErrorKind::UnexpectedEof.into())),
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) if self.wait_edge(Dir::Write, deadline).await? => {
                    deadline = round_now() + idle;
                }
                Some(libc::EAGAIN) => {
                    // No room: one byte the ordinary way, which waits for it.
                    self.write_all(&body[done..done + 1], deadline).await?;
                    done += 1;
                    deadline = round_now() + idle;
                }
                _ => return Err(NetError::Io(e)),
            }
        }
        Ok(())
    }

    /// Writes `head` then `body` with one `sendmsg` where the socket takes
    /// both, without copying them together first; the rest as
    /// `write_all_idle`.
    pub async fn write_two(
        &mut self,
        head: &[u8],
        body: &[u8],
        idle: Duration,
    ) -> Result<(), NetError> {
        let iov = [
            libc::iovec {
                iov_base: head.as_ptr() as *mut libc::c_void,
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: body.as_ptr() as *mut libc::c_void,
                iov_len: body.len(),
            },
        ];
        // SAFETY: a zeroed msghdr is valid; the iovecs point into live slices.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = 2;
        let sent = loop {
            // SAFETY: msg describes valid buffers for the whole call.
            let n =
                unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if n >= 0 {
                break n as usize;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => break 0,
                _ => return Err(NetError::Io(io::Error::last_os_error())),
            }
        };
        self.sent += sent as u64;
        if sent < head.len() {
            self.write_all_idle(&head[sent..], idle).await?;
            self.write_all_idle(body, idle).await
        } else {
            self.write_all_idle(&body[sent - head.len()..], idle).await
        }
    }

    /// Sends what fits without waiting (for refusing a connection cheaply).
    pub fn try_write(&self, buf: &[u8]) {
        // SAFETY: buf is a valid slice for its whole length.
        unsafe {
            libc::send(
                self.fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
    }

    /// Reads and drops whatever has arrived, without waiting (so that a
    /// close right after is not a reset for unread data).
    pub fn drain_now(&self) {
        let mut scratch = [0u8; 4096];
        for _ in 0..64 {
            match self.try_recv(&mut scratch, 0) {
                Ok(Some(n)) if n > 0 => continue,
                _ => break,
            }
        }
    }

    /// Half-closes the write side, so the peer sees EOF after what was sent.
    pub fn shutdown_write(&self) {
        // SAFETY: fd is owned by self.stream and open.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_WR);
        }
    }

    /// Closes with a reset instead of FIN (SO_LINGER 0): for a body that was
    /// cut short, so the client cannot mistake it for a complete message.
    pub fn set_reset_on_close(&self) {
        self.resets.set(true);
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd and a correctly sized option value.
        unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
}
