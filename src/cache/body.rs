//! A stored response body: plain memory, or, from [`FILE_MIN`] bytes, the
//! pages of an anonymous memory file (`memfd`) mapped read-only.
//!
//! The mapped pages are the body's only copy: the cache reads them as a
//! slice (ranges, HEAD, read-while-write followers, revalidation) and a hit
//! hands them to the socket with `sendfile(2)`, which queues references to
//! the pages instead of copying them into the socket buffer. That copy was a
//! third of the proxy's CPU for a 64 KiB hit; nginx avoids it the same way,
//! sending its cache files with sendfile.
//!
//! Every memory file is a descriptor: at most [`file_budget`] bodies are kept
//! as files at once (a quarter of the descriptor limit), and any failure
//! (descriptors, memory) keeps the body in plain memory. Either way the bytes
//! are the same and cost the same in the cache's budget.

use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bodies from this size are kept in a memory file and sent with sendfile.
/// Below it one `sendmsg` copy is cheaper than the extra system calls.
pub const FILE_MIN: usize = 16 * 1024;

/// Per heap allocation: the allocator's rounding up to its size class, on
/// average (for what the cache's budget counts).
const ALLOCATION_OVERHEAD: usize = 16;

/// What an allocation of `capacity` bytes costs (nothing for none).
pub(super) fn heap(capacity: usize) -> usize {
    if capacity == 0 {
        0
    } else {
        capacity + ALLOCATION_OVERHEAD
    }
}

/// Memory files open now, process-wide.
static FILES: AtomicUsize = AtomicUsize::new(0);

/// How many bodies may be memory files at once: a quarter of the soft
/// descriptor limit, leaving the rest to connections.
pub fn file_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: r is a valid rlimit to write into.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
            return 0;
        }
        (r.rlim_cur.min(1 << 24) / 4) as usize
    })
}

/// How many bodies are memory files now (for the status page and tests).
pub fn files_open() -> usize {
    FILES.load(Ordering::Relaxed)
}

enum Bytes {
    Heap(Vec<u8>),
    Mapped {
        ptr: *const u8,
        len: usize,
        file: OwnedFd,
    },
}

/// A stored body; derefs to its bytes.
pub struct Body(Bytes);

// SAFETY: the mapping is read-only and lives as long as the Body; nothing
// writes to it after construction, so sharing the pointer across threads is
// as safe as sharing a `&[u8]`.
unsafe impl Send for Body {}
// SAFETY: as above: immutable after construction.
unsafe impl Sync for Body {}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("len", &self.len())
            .field("file", &self.file().is_some())
            .finish()
    }
}

impl Body {
    /// Takes `bytes`; from [`FILE_MIN`] bytes moves them into a memory file
    /// when one can be had.
    pub fn new(bytes: Vec<u8>) -> Body {
        if bytes.len() >= FILE_MIN {
            if let Some(b) = Self::mapped(&[&bytes[..]], bytes.len()) {
                return b;
            }
        }
        Body(Bytes::Heap(bytes))
    }

    /// The concatenation of `parts` (a finished fill's chunks), copied once:
    /// straight into the memory file, or into one buffer.
    pub fn from_parts<P: AsRef<[u8]>>(parts: &[P]) -> Body {
        let len = parts.iter().map(|p| p.as_ref().len()).sum();
        if len >= FILE_MIN {
            if let Some(b) = Self::mapped(parts, len) {
                return b;
            }
        }
        let mut v = Vec::with_capacity(len);
        for p in parts {
            v.extend_from_slice(p.as_ref());
        }
        Body(Bytes::Heap(v))
    }

    fn mapped<P: AsRef<[u8]>>(parts: &[P], len: usize) -> Option<Body> {
        if FILES.fetch_add(1, Ordering::Relaxed) >= file_budget() {
            FILES.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let made = Self::make_file(parts, len);
        if made.is_none() {
            FILES.fetch_sub(1, Ordering::Relaxed);
        }
        made
    }

    fn make_file<P: AsRef<[u8]>>(parts: &[P], len: usize) -> Option<Body> {
        // SAFETY: a valid NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"corral-body".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        for part in parts {
            let mut rest = part.as_ref();
            while !rest.is_empty() {
                // SAFETY: rest is a valid slice; fd is open.
                let n = unsafe { libc::write(file.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
                if n <= 0 {
                    if n < 0
                        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                    {
                        continue;
                    }
                    return None;
                }
                rest = &rest[n as usize..];
            }
        }
        // SAFETY: maps `len` bytes of a file that has exactly that many,
        // read-only and shared; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(Body(Bytes::Mapped {
            ptr: ptr as *const u8,
            len,
            file,
        }))
    }

    /// Bytes it holds in memory: the struct with its `Arc` counts, and the
    /// buffer's allocation or the memory file's whole pages (mapped once,
    /// shared with the page cache).
    pub fn footprint(&self) -> usize {
        let page = 4096;
        std::mem::size_of::<Body>()
            + 2 * std::mem::size_of::<usize>()
            + match &self.0 {
                Bytes::Heap(v) => heap(v.capacity()),
                Bytes::Mapped { len, .. } => len.div_ceil(page) * page,
            }
    }

    /// The memory file holding the bytes, if they are in one.
    pub fn file(&self) -> Option<RawFd> {
        match &self.0 {
            Bytes::Mapped { file, .. } => Some(file.as_raw_fd()),
            Bytes::Heap(_) => None,
        }
    }
}

impl Deref for Body {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Bytes::Heap(v) => v,
            // SAFETY: the mapping covers len bytes and lives as long as self.
            Bytes::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Bytes::Mapped { ptr, len, .. } = &self.0 {
            // SAFETY: unmaps exactly the mapping made in make_file; the
            // slice cannot outlive self. The file closes after this.
            unsafe { libc::munmap(*ptr as *mut libc::c_void, *len) };
            FILES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bodies_stay_in_memory() {
        let b = Body::new(vec![7u8; FILE_MIN - 1]);
        assert!(b.file().is_none());
        assert_eq!(&b[..], &vec![7u8; FILE_MIN - 1][..]);
    }

    #[test]
    fn parts_are_joined_once_either_way() {
        let parts: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 1000]).collect();
        let joined: Vec<u8> = parts.concat();
        let big = Body::from_parts(&parts);
        assert!(big.file().is_some());
        assert_eq!(&big[..], &joined[..]);
        let small = Body::from_parts(&parts[..3]);
        assert!(small.file().is_none());
        assert_eq!(&small[..], &joined[..3000]);
    }

    #[test]
    fn large_bodies_are_memory_files_with_the_same_bytes() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let b = Body::new(bytes.clone());
        assert!(
            b.file().is_some(),
            "a memory file is made within the budget"
        );
        assert!(files_open() >= 1);
        assert_eq!(&b[..], &bytes[..]);
        // The file holds the bytes too: that is what sendfile sends.
        let mut back = vec![0u8; bytes.len()];
        // SAFETY: back is a valid buffer; the fd is open.
        let n = unsafe { libc::pread(b.file().unwrap(), back.as_mut_ptr().cast(), back.len(), 0) };
        assert_eq!(n as usize, bytes.len());
        assert_eq!(back, bytes);
        let shared = std::sync::Arc::new(b);
        let other = shared.clone();
        std::thread::spawn(move || assert_eq!(other.len(), 100_000))
            .join()
            .unwrap();
        drop(shared);
    }
}
