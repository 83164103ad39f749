//! A receive buffer with a read cursor, shared by the client and upstream
//! sides. Pure.

/// A byte buffer with a read cursor: `data[start..end]` is unconsumed input.
pub struct Buf {
    pub data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
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
