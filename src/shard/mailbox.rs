//! A cross-shard mailbox: a bounded crossbeam channel whose receiving task
//! parks on a stored waker, which the sender wakes (glommio's wakers may be
//! woken from another thread; see GLOMMIO.md). Sending never blocks: a full
//! mailbox refuses the message.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

pub struct Mailbox<T> {
    tx: crossbeam_channel::Sender<T>,
    rx: crossbeam_channel::Receiver<T>,
    waker: Mutex<Option<Waker>>,
}

impl<T> Mailbox<T> {
    pub fn new(capacity: usize) -> Mailbox<T> {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        Mailbox {
            tx,
            rx,
            waker: Mutex::new(None),
        }
    }

    /// Posts `v` and wakes the receiver; false if the mailbox is full.
    pub fn send(&self, v: T) -> bool {
        let ok = self.tx.try_send(v).is_ok();
        let w = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = w {
            w.wake();
        }
        ok
    }

    /// The next message, waiting for one (a single receiving task).
    pub fn recv(&self) -> Recv<'_, T> {
        Recv { mailbox: self }
    }
}

pub struct Recv<'a, T> {
    mailbox: &'a Mailbox<T>,
}

impl<T> Future for Recv<'_, T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if let Ok(v) = self.mailbox.rx.try_recv() {
            return Poll::Ready(v);
        }
        *self.mailbox.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        // A message sent between the first look and storing the waker.
        match self.mailbox.rx.try_recv() {
            Ok(v) => Poll::Ready(v),
            Err(_) => Poll::Pending,
        }
    }
}
