//! A single-threaded broadcast notification for async tasks on one
//! executor (a shard is one thread, so no atomics and no locks), and a
//! one-value slot built on it.
//!
//! Invariant: a waiter that read generation `g` before checking its
//! condition is woken by any `notify_all` after that read, so a wake-up
//! between the check and the wait is never lost. A waiter holds one entry
//! in the list of wakers while it is registered, and none once it is
//! dropped or woken: a wait dropped unfinished (the losing side of a
//! `select`, say a connection's wait for shutdown when its socket read
//! wins) leaves nothing behind.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakes every waiter when some state changes.
#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    /// The registered waiters' wakers, by the key each [`Wait`] holds:
    /// keys (not a scan for an equal waker) so that a wait registers and
    /// leaves in constant time however many others wait (every connection
    /// of a shard waits on its shutdown); freed keys are reused.
    wakers: RefCell<slab::Slab<Waker>>,
    /// The list `notify_all` last emptied, kept for its capacity: swapped
    /// in, so that a waiter after a notify does not allocate a new list
    /// (a connection's reader waits on one per request).
    spare: RefCell<slab::Slab<Waker>>,
}

impl Notify {
    /// Read before checking the condition; pass to [`Notify::wait`].
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        // Every key goes with the list: waiters registered before see the
        // new generation and leave theirs alone. Nothing is borrowed while
        // the wakers run.
        let mut woken = std::mem::replace(&mut *self.wakers.borrow_mut(), self.spare.take());
        for w in woken.drain() {
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
    pub fn wait(&self, seen: u64) -> Wait<'_> {
        Wait { notify: self, seen, key: None }
    }

    /// Waiters registered now (for the tests).
    #[cfg(test)]
    fn registered(&self) -> usize {
        self.wakers.borrow().len()
    }
}

/// [`Notify::wait`]'s future.
pub struct Wait<'a> {
    notify: &'a Notify,
    seen: u64,
    /// Its entry in the notify's list, once it is registered; valid while
    /// the generation is still `seen` (a `notify_all` empties the list).
    key: Option<usize>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let notify = this.notify;
        if notify.generation.get() != this.seen {
            this.key = None;
            return Poll::Ready(());
        }
        let mut wakers = notify.wakers.borrow_mut();
        match this.key {
            // Polled again (inside a `select`, say): one entry, its waker
            // replaced only if the task's changed.
            Some(key) => {
                let w = &mut wakers[key];
                if !w.will_wake(cx.waker()) {
                    *w = cx.waker().clone();
                }
            }
            None => this.key = Some(wakers.insert(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        // Unless a `notify_all` took the whole list since it registered
        // (the key may be another waiter's now).
        if let Some(key) = self.key.filter(|_| self.notify.generation.get() == self.seen) {
            self.notify.wakers.borrow_mut().remove(key);
        }
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
    use std::pin::pin;

    fn nop_waker() -> Waker {
        struct Nop;
        impl std::task::Wake for Nop {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        Waker::from(std::sync::Arc::new(Nop))
    }

    #[test]
    fn repolling_a_waiter_registers_it_once() {
        let n = Notify::default();
        let waker = nop_waker();
        let mut cx = Context::from_waker(&waker);
        let g = n.generation();
        let mut fut = pin!(n.wait(g));
        for _ in 0..100_000 {
            assert!(fut.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(n.registered(), 1);
        n.notify_all();
        assert!(fut.as_mut().poll(&mut cx).is_ready());
    }

    /// Found by a review: a wait dropped unfinished (a connection's wait
    /// for shutdown, when its socket read won) left its waker in the list
    /// until the next `notify_all`, which for shutdown is the node's stop,
    /// and a glommio waker holds its whole finished task: every closed
    /// connection leaked one.
    #[test]
    fn a_dropped_waiter_leaves_nothing_behind() {
        let n = Notify::default();
        let waker = nop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..1_000 {
            let mut fut = pin!(n.wait(n.generation()));
            assert!(fut.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(n.registered(), 0);
        assert_eq!(n.wakers.borrow().vacant_key(), 0, "keys are reused");
        // One still waiting is woken; one dropped after a notify_all
        // leaves the waiter registered since alone.
        let g = n.generation();
        let mut kept = Box::pin(n.wait(g));
        assert!(kept.as_mut().poll(&mut cx).is_pending());
        let mut old = Box::pin(n.wait(g));
        assert!(old.as_mut().poll(&mut cx).is_pending());
        n.notify_all();
        let mut newer = Box::pin(n.wait(n.generation()));
        assert!(newer.as_mut().poll(&mut cx).is_pending());
        drop(old);
        assert_eq!(n.registered(), 1, "the newer waiter's entry stays");
        assert!(kept.as_mut().poll(&mut cx).is_ready());
        drop(kept);
        n.notify_all();
        assert!(newer.as_mut().poll(&mut cx).is_ready());
    }
}
