//! The socket fast path: the one place that reads and writes TCP streams.
//!
//! glommio's stream arms an io_uring poll after every short read, and the next
//! read waits for that poll; each wake-up interrupts the CPU. Measured against
//! nginx (../shared/design/GLOMMIO.md) that costs about a third of the
//! throughput. So reads and writes first go straight to the fd with
//! `MSG_DONTWAIT`; on `EAGAIN` the task yields to the others a bounded number
//! of times ([`SPIN_YIELDS`]) and only then falls back to glommio's readiness
//! wait, bounded by a deadline. An idle connection therefore costs a few
//! yields and then nothing.

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::future::Future;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Yields on `EAGAIN` before parking on the reactor. Tuned with the
/// pass-through benchmark; large enough to catch a response already on its
/// way, small enough that the reactor (accepts, timers) still runs often.
pub const SPIN_YIELDS: u32 = 16;

/// The spin budget: [`SPIN_YIELDS`], or `CORRAL_SPIN_YIELDS` from the
/// environment for tuning on other hardware.
fn spin_yields() -> u32 {
    thread_local! {
        static SPIN: u32 = std::env::var("CORRAL_SPIN_YIELDS").ok().and_then(|v| v.parse().ok()).unwrap_or(SPIN_YIELDS);
    }
    SPIN.with(|s| *s)
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
}

impl Sock {
    pub fn new(stream: TcpStream) -> Sock {
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        Sock {
            stream,
            fd,
            sent: 0,
            nonblocking: false,
        }
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

    /// Reads at least one byte (or 0 at EOF), waiting until `deadline`.
    pub async fn read(&mut self, buf: &mut [u8], deadline: Instant) -> Result<usize, NetError> {
        if buf.is_empty() {
            return Ok(0);
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
        match until(deadline, self.stream.read(buf)).await {
            Some(r) => Ok(r?),
            None => Err(NetError::TimedOut),
        }
    }

    /// Whether an idle pooled connection is still usable: no EOF, no error and
    /// no unexpected bytes waiting.
    pub fn idle_is_alive(&self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.try_recv(&mut b, libc::MSG_PEEK), Ok(None))
    }

    /// Writes all of `buf`, waiting until `deadline`.
    pub async fn write_all(&mut self, buf: &[u8], deadline: Instant) -> Result<(), NetError> {
        self.send_all(buf, 0, deadline).await
    }

    /// `write_all` with extra `send` flags (`MSG_MORE`) for the direct sends.
    async fn send_all(
        &mut self,
        mut buf: &[u8],
        flags: libc::c_int,
        deadline: Instant,
    ) -> Result<(), NetError> {
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
                Some(libc::EAGAIN) => {
                    // The send buffer is full: let glommio wait for room.
                    match until(deadline, self.stream.write(buf)).await {
                        Some(Ok(n)) => {
                            buf = &buf[n..];
                            self.sent += n as u64;
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
    /// depend on the flag). When the socket is full, the next byte of `body`
    /// goes through the ordinary write, which waits for room, and sendfile
    /// goes on after it.
    pub async fn write_file(
        &mut self,
        head: &[u8],
        body: &[u8],
        file: RawFd,
        offset: usize,
        deadline: Instant,
    ) -> Result<(), NetError> {
        if !self.nonblocking {
            // SAFETY: fcntl on our own open fd.
            let flags = unsafe { libc::fcntl(self.fd, libc::F_GETFL) };
            // SAFETY: as above.
            if flags < 0
                || unsafe { libc::fcntl(self.fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
            {
                return self.write_two(head, body, deadline).await;
            }
            self.nonblocking = true;
        }
        self.send_all(head, libc::MSG_MORE, deadline).await?;
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
                Some(libc::EAGAIN) => {
                    // No room: one byte the ordinary way, which waits for it.
                    self.write_all(&body[done..done + 1], deadline).await?;
                    done += 1;
                }
                _ => return Err(NetError::Io(e)),
            }
        }
        Ok(())
    }

    /// Writes `head` then `body` with one `sendmsg` where the socket takes
    /// both, without copying them together first; the rest as `write_all`.
    pub async fn write_two(
        &mut self,
        head: &[u8],
        body: &[u8],
        deadline: Instant,
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
            self.write_all(&head[sent..], deadline).await?;
            self.write_all(body, deadline).await
        } else {
            self.write_all(&body[sent - head.len()..], deadline).await
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
