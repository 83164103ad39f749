//! A receive buffer with a read cursor, shared by the client and upstream
//! sides. Pure.

/// A byte buffer with a read cursor: `data[start..end]` is unconsumed input.
pub struct Buf {
    pub data: Vec<u8>,
    start: usize,
    end: usize,
}

/// Spare buffers kept per size, per thread (one shard per thread), at most
/// this many bytes of each size: enough for the connections that are busy
/// at once, not for every connection there is.
const SPARE_BYTES: usize = 4 << 20;

thread_local! {
    /// Released buffers by size, for the next connection that needs one.
    /// Their contents are stale; only their allocations are reused (no
    /// allocation, no zeroing, and the pages already resident).
    static SPARES: std::cell::RefCell<Vec<(usize, Vec<Vec<u8>>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The capacity a new output buffer starts with ([`ensure_out`]).
pub const OUT_CAP: usize = 4096;

/// The largest output buffer kept as a spare (one grown for a coalesced
/// body or a store read is freed instead).
const OUT_SPARE_MAX: usize = 64 * 1024;

thread_local! {
    /// Released output buffers (empty, of any capacity up to
    /// [`OUT_SPARE_MAX`]) and the sum of their capacities.
    static SPARE_OUT: std::cell::RefCell<(Vec<Vec<u8>>, usize)> =
        const { std::cell::RefCell::new((Vec::new(), 0)) };
}

/// Gives an output buffer without memory a spare one when the thread has
/// it (whatever capacity it grew to), else [`OUT_CAP`] bytes.
pub fn ensure_out(out: &mut Vec<u8>) {
    if out.capacity() == 0 {
        let spare = SPARE_OUT.with(|s| {
            let mut s = s.borrow_mut();
            let v = s.0.pop()?;
            s.1 -= v.capacity();
            Some(v)
        });
        *out = spare.unwrap_or_else(|| Vec::with_capacity(OUT_CAP));
    }
}

/// Takes an output buffer's memory away while its connection is idle: to
/// the thread's spares as it is (no reallocation), within [`SPARE_BYTES`]
/// in all and up to [`OUT_SPARE_MAX`] each; otherwise freed.
pub fn release_out(out: &mut Vec<u8>) {
    if out.capacity() == 0 {
        return;
    }
    let mut v = std::mem::take(out);
    v.clear();
    if v.capacity() <= OUT_SPARE_MAX {
        let _ = SPARE_OUT.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.1 + v.capacity() <= SPARE_BYTES {
                s.1 += v.capacity();
                s.0.push(v);
            }
        });
    }
}

impl Buf {
    /// A buffer without memory; [`Buf::ensure`] gives it some.
    pub const fn empty() -> Buf {
        Buf {
            data: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// A buffer of `cap` bytes, a spare one if the thread has it. Buffers
    /// of this size are kept as spares from now on ([`Buf::release`]);
    /// other sizes (grown ones, or never asked for this way) are freed.
    pub fn take(cap: usize) -> Buf {
        let spare = SPARES.with(|s| {
            let mut s = s.borrow_mut();
            match s.iter_mut().find(|(size, _)| *size == cap) {
                Some((_, list)) => list.pop(),
                None => {
                    s.push((cap, Vec::new()));
                    None
                }
            }
        });
        match spare {
            Some(data) => Buf {
                data,
                start: 0,
                end: 0,
            },
            None => Buf::new(cap),
        }
    }

    /// Gives an empty buffer `cap` bytes of memory (a spare one when there
    /// is one), if it has none.
    pub fn ensure(&mut self, cap: usize) {
        if self.data.is_empty() {
            *self = Buf::take(cap);
        }
    }

    /// Hands the memory of a buffer holding no data back to the thread's
    /// spares (or frees it, beyond [`SPARE_BYTES`] of its size); a buffer
    /// still holding data keeps it. What an idle connection does, so that
    /// it holds no buffers while it waits.
    pub fn release(&mut self) {
        if !self.is_empty() || self.data.is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.data);
        self.clear();
        let size = data.len();
        // try_with: a buffer dropped while the thread ends just frees.
        let _ = SPARES.try_with(|s| {
            let mut s = s.borrow_mut();
            if let Some((_, list)) = s.iter_mut().find(|(sz, _)| *sz == size) {
                if (list.len() + 1) * size <= SPARE_BYTES {
                    list.push(data);
                }
            }
        });
    }

    /// Gives its memory back to the spares whatever it holds: for a
    /// buffer at the end of its use (dropped ones do so too).
    pub fn recycle(&mut self) {
        self.clear();
        self.release();
    }

    pub fn new(cap: usize) -> Buf {
        Buf {
            data: vec![0; cap],
            start: 0,
            end: 0,
        }
    }
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    pub fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
    /// Free space after the data, at least `want` bytes if the buffer may
    /// grow to `max_cap`; moves the data to the front when that helps.
    pub fn space(&mut self, want: usize, max_cap: usize) -> &mut [u8] {
        if self.data.len() - self.end < want && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() - self.end < want && self.data.len() < max_cap {
            let new_len = (self.data.len() * 2).max(self.end + want).min(max_cap);
            self.data.resize(new_len, 0);
        }
        &mut self.data[self.end..]
    }
    pub fn advance(&mut self, n: usize) {
        self.end += n;
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.recycle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_buffers_are_reused_and_bounded() {
        let mut a = Buf::take(1000);
        let first = a.data.as_ptr();
        a.space(10, 1000)[..3].copy_from_slice(b"abc");
        a.advance(3);
        // Holding data: kept.
        a.release();
        assert_eq!(a.filled(), b"abc");
        a.consume(3);
        a.release();
        assert!(a.data.is_empty() && a.is_empty());
        // The next one of that size is the same memory.
        a.ensure(1000);
        assert_eq!((a.data.len(), a.data.as_ptr()), (1000, first));
        // Another size is not mixed in.
        let b = Buf::take(2000);
        assert_eq!(b.data.len(), 2000);
        // A size never taken this way (a grown buffer) is not kept.
        let mut grown = Buf::new(3000);
        grown.release();
        let kept = SPARES.with(|s| s.borrow().iter().any(|(sz, _)| *sz == 3000));
        assert!(!kept);
        // At most SPARE_BYTES of a size are kept.
        let mut many: Vec<Buf> = (0..SPARE_BYTES / 1000 + 10)
            .map(|_| Buf::take(1000))
            .collect();
        for m in &mut many {
            m.release();
        }
        let kept = SPARES.with(|s| {
            s.borrow()
                .iter()
                .find(|(sz, _)| *sz == 1000)
                .map_or(0, |(_, l)| l.len())
        });
        assert_eq!(kept, SPARE_BYTES / 1000);
    }

    #[test]
    fn output_buffers_come_back_empty() {
        let mut out = Vec::new();
        ensure_out(&mut out);
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        release_out(&mut out);
        assert_eq!(out.capacity(), 0);
        ensure_out(&mut out);
        assert!(out.is_empty() && out.capacity() >= OUT_CAP);
        // A grown one is kept as it is (no reallocation), up to a size.
        out.resize(3 * OUT_CAP, 0);
        let ptr = out.as_ptr();
        release_out(&mut out);
        assert_eq!(out.capacity(), 0);
        ensure_out(&mut out);
        assert_eq!((out.len(), out.as_ptr()), (0, ptr));
        out.resize(OUT_SPARE_MAX + 1, 0);
        release_out(&mut out);
        ensure_out(&mut out);
        assert_eq!(out.capacity(), OUT_CAP);
    }
}
