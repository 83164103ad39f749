//! The origin store (I/O): one shard's view of a directory served as an
//! origin. Files are opened once and kept (a bounded cache that notices a
//! file replaced on disk), read with glommio's `DmaFile` (O_DIRECT) in
//! page-aligned blocks planned by [`Planner`]: blocks of concurrent requests
//! that lie close together are read together, and a per-shard block cache
//! answers hot blocks without I/O.
//!
//! A request asks for a span of blocks and waits on a ticket. The shard's
//! reader task wakes when blocks are pending, lets every connection that is
//! ready to run queue its blocks first (one yield: the merge window), plans
//! the reads, and issues them concurrently; each completion fills the cache
//! and wakes the requests it completed.

use super::planner::{FileId, Params, Planner, Read, MAX_BLOCK};
use crate::admin::stats::StoreFigures;
use crate::config::StoreConfig;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// How a file is read.
pub enum Handle {
    Dma(glommio::io::DmaFile),
    Buffered(glommio::io::BufferedFile),
}

impl Handle {
    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Handle::Dma(f) => f.as_raw_fd(),
            Handle::Buffered(f) => f.as_raw_fd(),
        }
    }

    /// The opened file's own identity and path: what is served is what was
    /// opened, even if the path changed between its `stat` and the open.
    /// The path is `None` without `/proc`.
    fn identity(&self) -> std::io::Result<(std::fs::Metadata, Option<PathBuf>)> {
        use std::os::fd::FromRawFd;
        let fd = self.fd();
        // SAFETY: the descriptor is open while self is; the borrowed File
        // is never dropped, so it does not close it.
        let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        let meta = file.metadata()?; // fstat
        Ok((meta, std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()))
    }

    /// The opened file's link count (0: deleted), by `fstat`.
    fn links(&self) -> Option<u64> {
        use std::os::fd::FromRawFd;
        // SAFETY: as in `identity`: borrowed, never closed here.
        let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(self.fd()) });
        file.metadata().ok().map(|m| m.nlink())
    }

    async fn read(&self, pos: u64, len: usize) -> std::io::Result<glommio::io::ReadResult> {
        match self {
            Handle::Dma(f) => {
                let a = f.alignment().max(1);
                let r = if pos.is_multiple_of(a) && (len as u64).is_multiple_of(a) {
                    f.read_at_aligned(pos, len).await
                } else {
                    f.read_at(pos, len).await
                };
                r.map_err(Into::into)
            }
            Handle::Buffered(f) => f.read_at(pos, len).await.map_err(Into::into),
        }
    }
}

/// An open file of the store.
pub struct OpenFile {
    pub id: FileId,
    /// `None` for an empty file (never opened: nothing to read).
    handle: Option<Rc<Handle>>,
    pub path: PathBuf,
    /// The device and inode: an inode number is unique on its device only
    /// (two mounted images under the root may share one).
    pub dev: u64,
    pub ino: u64,
    pub mtime: i64,
    mtime_ns: i64,
    /// The inode's change time: every write moves it and nothing can set it
    /// back (a file rewritten in place, keeping its inode and size, with its
    /// mtime pinned by `cp -p` or a reproducible build, is still new).
    ctime_ns: i64,
    pub size: u64,
    used: Cell<u64>,
}

impl OpenFile {
    /// A strong validator from the file's identity, times and size.
    pub fn etag(&self) -> String {
        format!(
            "\"{:x}-{:x}-{:x}-{:x}-{:x}\"",
            self.dev, self.ino, self.mtime_ns as u64, self.ctime_ns as u64, self.size
        )
    }
}

/// What a path names.
pub enum Lookup {
    Found(Rc<OpenFile>),
    NotFound,
    /// Outside the root (a symlink), or not a regular file.
    Forbidden,
    /// A directory: no listings.
    Directory,
    Failed(String),
}

/// Is the filesystem under `root` able to do O_DIRECT? `(direct, why not)`.
pub fn direct_io(root: &Path) -> (bool, &'static str) {
    let Ok(c) = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()) else {
        return (true, "");
    };
    // SAFETY: a valid NUL-terminated path and a zeroed statfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return (true, "");
    }
    match st.f_type as i64 {
        0x8584_58f6 => (false, "ramfs has no O_DIRECT"),
        0x0102_1994 => (false, "tmpfs has no O_DIRECT"),
        _ => (true, ""),
    }
}

pub struct StoreShard {
    pub cfg: StoreConfig,
    /// O_DIRECT reads (else buffered).
    direct: bool,
    planner: RefCell<Planner>,
    files: RefCell<HashMap<PathBuf, Rc<OpenFile>>>,
    by_id: RefCell<HashMap<FileId, Weak<OpenFile>>>,
    next_id: Cell<FileId>,
    /// File ids have wrapped around: a reused id may still have blocks in
    /// the block cache from the file that had it before.
    ids_wrapped: Cell<bool>,
    clock: Cell<u64>,
    /// Blocks are pending and the reader should plan.
    pending: Cell<bool>,
    reader: RefCell<Option<Waker>>,
    tickets: RefCell<HashMap<usize, Waker>>,
    figures: RefCell<StoreFigures>,
    metrics: bool,
}

impl StoreShard {
    pub fn new(cfg: StoreConfig, shards: usize, metrics: bool) -> StoreShard {
        let bs = cfg.block_size;
        let params = Params {
            block_size: bs,
            max_merge_blocks: (cfg.max_merge / bs).max(1),
            max_gap_blocks: cfg.max_gap / bs,
            max_amplification: cfg.max_amplification,
        };
        let (direct, _) = direct_io(&cfg.root);
        StoreShard {
            planner: RefCell::new(Planner::new(params, cfg.cache_bytes / shards.max(1) as u64)),
            direct,
            files: RefCell::new(HashMap::new()),
            by_id: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            ids_wrapped: Cell::new(false),
            clock: Cell::new(0),
            pending: Cell::new(false),
            reader: RefCell::new(None),
            tickets: RefCell::new(HashMap::new()),
            figures: RefCell::new(StoreFigures::default()),
            metrics,
            cfg,
        }
    }

    /// This shard's figures for the store, as of now.
    pub fn figures(&self) -> StoreFigures {
        let mut f = self.figures.borrow().clone();
        let p = self.planner.borrow();
        f.blocks_requested = p.stats.blocks_requested;
        f.block_cache_hits = p.stats.cache_hits;
        f.merged_reads = p.stats.merged_reads;
        f.read_requests = p.stats.read_requests;
        f.blocks_read = p.stats.blocks_read;
        f.blocks_wanted = p.stats.blocks_wanted;
        f.cached_bytes = p.cached_bytes();
        f
    }

    /// The open file for `rel` (a relative path of normal components),
    /// opening it (or reopening it, if it changed on disk) as needed.
    pub async fn lookup(&self, rel: &Path) -> Lookup {
        let full = self.cfg.root.join(rel);
        let meta = match std::fs::metadata(&full) {
            Ok(m) => m,
            Err(e) => {
                // Gone (or unreadable): its descriptor, if kept, goes too,
                // so a deleted file's space is freed. Not for a name that
                // must be a directory (`a.txt/.`, from `/a.txt/`): `Path`
                // compares it equal to `a.txt`, which is still there.
                if !names_directory(rel) {
                    self.files.borrow_mut().remove(rel);
                }
                return match lookup_error(e) {
                    // Not a 404 for a name under a directory out of the
                    // root: that would tell which files exist out there.
                    Lookup::NotFound if self.out_of_root(&full) => Lookup::Forbidden,
                    l => l,
                };
            }
        };
        let now = self.clock.get() + 1;
        self.clock.set(now);
        if let Some(f) = self.open_as(rel, &meta, now) {
            return Lookup::Found(f);
        }
        // Whatever was kept for this path is another file now: let go of
        // its descriptor (requests still reading it hold their own).
        self.files.borrow_mut().remove(rel);
        if meta.is_dir() {
            return Lookup::Directory;
        }
        if !meta.is_file() {
            return Lookup::Forbidden;
        }
        // Symlinks may point anywhere: the real path must stay under the root.
        let real = match std::fs::canonicalize(&full) {
            Ok(r) if r.starts_with(&self.cfg.root) => r,
            Ok(_) => return Lookup::Forbidden,
            Err(e) => return lookup_error(e),
        };
        let (handle, dev, ino, mtime, mtime_nanos, ctime_nanos, size) = if meta.len() == 0 {
            // Never opened: glommio's first open on a device probes with a
            // read, and an empty file would fool the probe (GLOMMIO.md).
            (
                None,
                meta.dev(),
                meta.ino(),
                meta.mtime(),
                mtime_ns(&meta),
                ctime_ns(&meta),
                0,
            )
        } else {
            let h = match self.open(&real).await {
                Ok(h) => h,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Lookup::Forbidden
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::NotFound,
                Err(e) => return Lookup::Failed(format!("cannot open {}: {e}", real.display())),
            };
            // The path may have changed between the checks and the open (a
            // rename over it, a component swapped for a symlink): validators
            // and size come from what was opened, which must be a regular
            // file under the root.
            let (st, opened) = match h.identity() {
                Ok(i) => i,
                Err(e) => return Lookup::Failed(format!("cannot stat {}: {e}", real.display())),
            };
            let inside = match opened {
                Some(p) => p.starts_with(&self.cfg.root),
                // No /proc: what was opened must be the file at the checked
                // real path (same device and inode).
                None => std::fs::metadata(&real)
                    .is_ok_and(|m| m.dev() == st.dev() && m.ino() == st.ino()),
            };
            if !inside || !st.is_file() {
                return Lookup::Forbidden;
            }
            (
                Some(Rc::new(h)),
                st.dev(),
                st.ino(),
                st.mtime(),
                mtime_ns(&st),
                ctime_ns(&st),
                st.len(),
            )
        };
        // Another request may have opened it while this one waited.
        if let Some(f) = self.open_as(rel, &meta, now) {
            return Lookup::Found(f);
        }
        let id = self.new_id();
        let f = Rc::new(OpenFile {
            id,
            handle,
            path: real,
            dev,
            ino,
            mtime,
            mtime_ns: mtime_nanos,
            ctime_ns: ctime_nanos,
            size,
            used: Cell::new(now),
        });
        let mut files = self.files.borrow_mut();
        files.insert(rel.to_path_buf(), f.clone());
        let mut by_id = self.by_id.borrow_mut();
        by_id.insert(id, Rc::downgrade(&f));
        if files.len() > self.cfg.open_files {
            // Close the least recently used (requests still reading it keep
            // it open until they finish: reads find it by id while any
            // request holds it).
            if let Some(k) = files
                .iter()
                .min_by_key(|(_, v)| v.used.get())
                .map(|(k, _)| k.clone())
            {
                files.remove(&k);
            }
        }
        if by_id.len() > 2 * self.cfg.open_files + 16 {
            by_id.retain(|_, w| w.strong_count() > 0);
        }
        Lookup::Found(f)
    }

    /// Lets go of kept files that were deleted (no link left), and of
    /// their cached blocks: their descriptors held the disk space until the
    /// path was asked for again or the file aged out of `open_files`. Run
    /// every second (one `fstat` per kept file); requests still reading
    /// one keep it open until they finish.
    pub fn sweep(&self) {
        let gone: Vec<(PathBuf, FileId)> = self
            .files
            .borrow()
            .iter()
            .filter(|(_, f)| f.handle.as_ref().is_some_and(|h| h.links() == Some(0)))
            .map(|(k, f)| (k.clone(), f.id))
            .collect();
        let mut ids = std::collections::HashSet::new();
        for (k, id) in gone {
            self.files.borrow_mut().remove(&k);
            ids.insert(id);
        }
        // One pass over the block cache, however many went (a deploy may
        // replace hundreds of kept files at once).
        self.planner.borrow_mut().forget_files(&ids);
    }

    /// Whether the deepest existing directory on the way to `full` (which
    /// does not exist) lies out of the root through a symlink. Only asked
    /// on a miss.
    fn out_of_root(&self, full: &Path) -> bool {
        let mut dir = full.parent();
        while let Some(d) = dir {
            if let Ok(real) = std::fs::canonicalize(d) {
                return !real.starts_with(&self.cfg.root);
            }
            if d == self.cfg.root {
                return false;
            }
            dir = d.parent();
        }
        false
    }

    /// The open file for `rel` if it is still the file `meta` describes.
    /// A file id no open file has. Ids are 32 bits: after 4 billion opens
    /// they wrap, skipping those still in use, and a reused id's blocks
    /// from its earlier file are dropped from the block cache first.
    fn new_id(&self) -> FileId {
        let by_id = self.by_id.borrow();
        let mut id = self.next_id.get();
        while by_id.get(&id).is_some_and(|w| w.strong_count() > 0) {
            id = id.wrapping_add(1).max(1);
        }
        drop(by_id);
        let next = id.wrapping_add(1).max(1);
        if next < id {
            self.ids_wrapped.set(true);
        }
        self.next_id.set(next);
        if self.ids_wrapped.get() {
            self.planner.borrow_mut().forget_file(id);
        }
        id
    }

    fn open_as(&self, rel: &Path, meta: &std::fs::Metadata, now: u64) -> Option<Rc<OpenFile>> {
        let files = self.files.borrow();
        let f = files.get(rel)?;
        if f.ino == meta.ino()
            && f.dev == meta.dev()
            && f.mtime_ns == mtime_ns(meta)
            && f.ctime_ns == ctime_ns(meta)
            && f.size == meta.len()
        {
            f.used.set(now);
            return Some(f.clone());
        }
        None
    }

    /// Wakes the requests whose tickets `done` completed or failed.
    fn wake(&self, done: Vec<usize>) {
        let mut wakers = self.tickets.borrow_mut();
        for t in done {
            if let Some(w) = wakers.remove(&t) {
                w.wake();
            }
        }
    }

    /// glommio probes a device with a real read on the first O_DIRECT open
    /// of each thread, and an empty file fools the probe for good (every
    /// later read on the device fails, GLOMMIO.md). Empty files are never
    /// opened, but one could become empty between its `stat` and its open:
    /// so each shard first opens a non-empty file under the root.
    async fn prime(&self) {
        if !self.direct {
            return;
        }
        if let Some(path) = find_nonempty(&self.cfg.root, PRIME_SEARCH) {
            if let Ok(f) = glommio::io::DmaFile::open(&path).await {
                let _ = f.close().await;
            }
        }
    }

    async fn open(&self, path: &Path) -> std::io::Result<Handle> {
        if self.direct {
            match glommio::io::DmaFile::open(path).await {
                Ok(f) => return Ok(Handle::Dma(f)),
                Err(e) => {
                    let e: std::io::Error = e.into();
                    // glommio's error keeps the kind, not the errno.
                    if e.raw_os_error() != Some(libc::EINVAL)
                        && e.kind() != std::io::ErrorKind::InvalidInput
                    {
                        return Err(e);
                    }
                    // This filesystem refuses O_DIRECT after all.
                }
            }
        }
        glommio::io::BufferedFile::open(path)
            .await
            .map(Handle::Buffered)
            .map_err(Into::into)
    }

    /// Blocks `first..=last` of `file`, from the cache or the disk.
    pub async fn blocks(
        self: &Rc<Self>,
        file: &Rc<OpenFile>,
        first: u64,
        last: u64,
    ) -> Result<Vec<Arc<[u8]>>, String> {
        if last > MAX_BLOCK {
            return Err("file too large for its block size".into());
        }
        let t = self.planner.borrow_mut().request(file.id, first, last);
        let mut wait = TicketWait {
            store: self.clone(),
            ticket: Some(t),
        };
        self.kick();
        (&mut wait).await;
        let t = wait.ticket.take().unwrap_or(t);
        self.planner
            .borrow_mut()
            .take(t)
            .ok_or_else(|| format!("reading {} failed", file.path.display()))
    }

    /// One read, then the wake-ups of the requests it completed.
    async fn read(self: Rc<Self>, r: Read) {
        let file = self.by_id.borrow().get(&r.file).and_then(Weak::upgrade);
        let handle = file.as_ref().and_then(|f| f.handle.clone());
        let started = Instant::now();
        let done = match (file, handle) {
            (Some(f), Some(h)) => {
                let (pos, len) = r.bytes(self.cfg.block_size);
                let expected = len.min(f.size.saturating_sub(pos) as usize);
                match h.read(pos, len).await {
                    // Less than the file held at its stat (it shrank, or a
                    // short read): not cached, and the requests fail (a
                    // short block kept in the cache would fail every later
                    // request for it).
                    Ok(data) if data.len() < expected => {
                        eprintln!(
                            "corral: store {}: reading {} came back short ({} of {expected} bytes at {pos})",
                            self.cfg.name,
                            f.path.display(),
                            data.len()
                        );
                        self.figures.borrow_mut().read_errors += 1;
                        self.planner.borrow_mut().fail(&r)
                    }
                    Ok(data) => {
                        // glommio may hand back more than the file holds
                        // near its end (GLOMMIO.md): clamp to the size.
                        let n = data.len().min(expected);
                        let mut fig = self.figures.borrow_mut();
                        fig.reads += 1;
                        fig.read_bytes += n as u64;
                        if self.metrics {
                            let us = started.elapsed().as_micros() as u64;
                            fig.latency.saturating_record(us.max(1));
                        }
                        drop(fig);
                        self.planner.borrow_mut().complete(&r, &data[..n])
                    }
                    Err(e) => {
                        eprintln!(
                            "corral: store {}: reading {} failed: {e}{}",
                            self.cfg.name,
                            f.path.display(),
                            if r.count > 1 {
                                " (reading its blocks one by one)"
                            } else {
                                ""
                            }
                        );
                        self.figures.borrow_mut().read_errors += 1;
                        self.planner.borrow_mut().fail_or_split(&r)
                    }
                }
            }
            _ => self.planner.borrow_mut().fail(&r),
        };
        self.wake(done);
        // A split read's blocks are pending again.
        self.kick();
    }

    /// Wakes the reader task if blocks wait to be read.
    fn kick(&self) {
        if self.planner.borrow().has_pending() && !self.pending.replace(true) {
            if let Some(w) = self.reader.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

fn ctime_ns(m: &std::fs::Metadata) -> i64 {
    m.ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.ctime_nsec())
}

/// Waits for a ticket; forgets it if the request goes away first.
struct TicketWait {
    store: Rc<StoreShard>,
    ticket: Option<usize>,
}

impl Future for &mut TicketWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(t) = self.ticket else {
            return Poll::Ready(());
        };
        if self.store.planner.borrow().is_done(t) {
            return Poll::Ready(());
        }
        self.store
            .tickets
            .borrow_mut()
            .insert(t, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for TicketWait {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.store.tickets.borrow_mut().remove(&t);
            self.store.planner.borrow_mut().cancel(t);
        }
    }
}

/// Waits until blocks are pending.
struct Pending<'a>(&'a StoreShard);

impl Future for Pending<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.pending.get() {
            return Poll::Ready(());
        }
        *self.0.reader.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// The store's reader task on this shard: plans and issues reads.
pub async fn reader(store: Rc<StoreShard>, queue: glommio::TaskQueueHandle) {
    store.prime().await;
    loop {
        Pending(&store).await;
        // The merge window: let requests arriving just after this one queue
        // their blocks too, so neighbours end up in one plan. With no window,
        // one scheduler round (connections ready now run first).
        if store.cfg.merge_window.is_zero() {
            futures_lite::future::yield_now().await;
        } else {
            glommio::timer::sleep(store.cfg.merge_window).await;
        }
        store.pending.set(false);
        let reads = store.planner.borrow_mut().plan();
        for r in reads {
            let task = store.clone().read(r);
            if let Err(e) = glommio::spawn_local_into(task, queue).map(|t| t.detach()) {
                eprintln!("corral: cannot spawn a store read: {e}");
                let done = store.planner.borrow_mut().fail(&r);
                store.wake(done);
            }
        }
    }
}

/// Directory entries looked at, at most, for a file to prime glommio's
/// device probe with.
const PRIME_SEARCH: usize = 1024;

/// A non-empty regular file under `root` (not through symlinks), looking
/// at no more than `budget` directory entries, breadth first.
fn find_nonempty(root: &Path, budget: usize) -> Option<PathBuf> {
    let mut dirs = std::collections::VecDeque::from([root.to_path_buf()]);
    let mut left = budget;
    while let Some(dir) = dirs.pop_front() {
        // An unreadable directory (`lost+found` at a mount's root) is
        // passed by, not the end of the search.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if left == 0 {
                return None;
            }
            left -= 1;
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                dirs.push_back(entry.path());
            } else if kind.is_file() && entry.metadata().is_ok_and(|m| m.len() > 0) {
                return Some(entry.path());
            }
        }
    }
    None
}

/// What a failed `stat` of a requested path means for the client: a path
/// through a file (`ENOTDIR`) or with a name too long names nothing (404),
/// a symlink loop or a denied directory is forbidden (403); anything else
/// is the server's failure (500).
fn lookup_error(e: std::io::Error) -> Lookup {
    use std::io::ErrorKind;
    match (e.kind(), e.raw_os_error()) {
        (ErrorKind::NotFound, _) => Lookup::NotFound,
        (_, Some(libc::ENOTDIR | libc::ENAMETOOLONG)) => Lookup::NotFound,
        (ErrorKind::PermissionDenied, _) | (_, Some(libc::ELOOP)) => Lookup::Forbidden,
        _ => Lookup::Failed(e.to_string()),
    }
}

/// A path from `decode_path` for a request ending in `/`: its final `.`
/// makes the stat fail unless it is a directory.
fn names_directory(rel: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    rel.as_os_str().as_bytes().ends_with(b"/.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonempty_file_is_found_to_prime_the_probe() {
        let root = std::env::temp_dir().join(format!("corral-prime-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join("a/empty"), b"").unwrap();
        assert_eq!(find_nonempty(&root, 100), None);
        std::fs::write(root.join("a/b/data"), b"x").unwrap();
        assert_eq!(find_nonempty(&root, 100), Some(root.join("a/b/data")));
        // Within its budget only.
        assert_eq!(find_nonempty(&root, 3), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn file_ids_wrap_around_live_ones() {
        let cfg = StoreConfig {
            name: "t".into(),
            root: std::env::temp_dir(),
            block_size: 4096,
            max_merge: 1 << 20,
            max_gap: 0,
            max_amplification: 2.0,
            cache_bytes: 1 << 20,
            open_files: 4,
            merge_window: std::time::Duration::from_micros(200),
        };
        let s = StoreShard::new(cfg, 1, false);
        // Id 1 is held by an open file; the counter is about to wrap.
        let held = Rc::new(OpenFile {
            id: 1,
            handle: None,
            path: PathBuf::from("x"),
            dev: 0,
            ino: 0,
            mtime: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            size: 0,
            used: Cell::new(0),
        });
        s.by_id.borrow_mut().insert(1, Rc::downgrade(&held));
        s.next_id.set(FileId::MAX);
        assert_eq!(s.new_id(), FileId::MAX);
        assert!(s.ids_wrapped.get());
        // 0 is never an id, and 1 is taken: the next is 2.
        assert_eq!(s.new_id(), 2);
        drop(held);
        s.next_id.set(1);
        assert_eq!(s.new_id(), 1, "a closed file's id is free again");
    }
}
