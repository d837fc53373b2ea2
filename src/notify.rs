//! A single-threaded broadcast notification for async tasks on one
//! executor (a shard is one thread, so no atomics and no locks), and a
//! one-value slot built on it.
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
    /// The list `notify_all` last emptied, kept for its capacity: swapped
    /// in, so that a waiter after a notify does not allocate a new list
    /// (a connection's reader waits on one per request).
    spare: RefCell<Vec<Waker>>,
}

impl Notify {
    /// Read before checking the condition; pass to [`Notify::wait`].
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        // Nothing is borrowed while the wakers run.
        let mut woken = std::mem::replace(&mut *self.wakers.borrow_mut(), self.spare.take());
        for w in woken.drain(..) {
            w.wake();
        }
        *self.spare.borrow_mut() = woken;
    }

    /// Completes once `done()` holds, checked first and after each
    /// `notify_all` (read before the check, so no wake-up between the check
    /// and the wait is lost). Only the node's tasks use it.
    #[cfg(feature = "node")]
    pub async fn wait_until(&self, mut done: impl FnMut() -> bool) {
        loop {
            let seen = self.generation();
            if done() {
                return;
            }
            self.wait(seen).await;
        }
    }

    /// Completes once `notify_all` has run since `seen` was read.
    pub async fn wait(&self, seen: u64) {
        poll_fn(|cx| {
            if self.generation.get() != seen {
                Poll::Ready(())
            } else {
                // One registration per waiter: a future polled again (say,
                // inside a `select` with a socket read) must not add another
                // clone each time, or the list grows without bound until the
                // next notify (glommio panics past 32767 clones of a waker).
                let mut wakers = self.wakers.borrow_mut();
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }
}

/// Where one task leaves a value for another (a reply for its request).
/// Only the node's tasks use it.
#[cfg(feature = "node")]
pub struct Slot<T> {
    value: RefCell<Option<T>>,
    ready: Notify,
}

#[cfg(feature = "node")]
impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot { value: RefCell::new(None), ready: Notify::default() }
    }
}

#[cfg(feature = "node")]
impl<T> Slot<T> {
    /// Leaves `value` (replacing one not yet taken) and wakes the taker.
    pub fn set(&self, value: T) {
        *self.value.borrow_mut() = Some(value);
        self.ready.notify_all();
    }

    /// Waits for a value and takes it.
    pub async fn take(&self) -> T {
        loop {
            let g = self.ready.generation();
            if let Some(v) = self.value.borrow_mut().take() {
                return v;
            }
            self.ready.wait(g).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::Context;

    #[test]
    fn repolling_a_waiter_registers_it_once() {
        let n = Notify::default();
        struct Nop;
        impl std::task::Wake for Nop {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        let waker = Waker::from(std::sync::Arc::new(Nop));
        let mut cx = Context::from_waker(&waker);
        let g = n.generation();
        let mut fut = pin!(n.wait(g));
        for _ in 0..100_000 {
            assert!(fut.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(n.wakers.borrow().len(), 1);
        n.notify_all();
        assert!(fut.as_mut().poll(&mut cx).is_ready());
    }
}
