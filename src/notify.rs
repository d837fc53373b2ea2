//! A single-threaded broadcast notification for async tasks on one
//! executor (a shard is one thread, so no atomics and no locks).
//!
//! Invariant: a waiter that read generation `g` before checking its
//! condition is woken by any `notify_all` after that read, so a wake-up
//! between the check and the wait is never lost.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Wakes every waiter when some state changes.
#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Notify {
    /// Read before checking the condition; pass to [`Notify::wait`].
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.wakers.take() {
            w.wake();
        }
    }

    /// Completes once `notify_all` has run since `seen` was read.
    pub async fn wait(&self, seen: u64) {
        poll_fn(|cx| {
            if self.generation.get() != seen {
                Poll::Ready(())
            } else {
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
