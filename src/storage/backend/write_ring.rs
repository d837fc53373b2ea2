//! A small io_uring of the shard's own for the log's writes, which it
//! hands to the kernel the moment they are made, not when glommio next
//! polls its rings.
//!
//! Why: glommio queues a request and submits it only when its executor
//! polls the reactor, which it does once the queues of runnable tasks have
//! run dry. Under `fsync = always` the group commit's leader plans the
//! next write just as the last one completed, when every writer of that
//! group is woken to send its reply: the next write then waited for all of
//! those replies, and for the requests read meanwhile, before it reached
//! the disk. An io_uring trace of a closed-loop durable SET run had a log
//! write in flight only 56% of the time (perf/RESULTS.md, fourteenth
//! session). Submitted here, the write is on its way while the shard sends
//! the last group's replies.
//!
//! Completions signal an eventfd that the waiting task reads through
//! glommio (as the socket front's readiness bridge does), so the shard
//! still sleeps only inside glommio.
//!
//! Owns: the ring, its eventfd, and the buffer and file of the write in
//! flight. Invariants: at most one write is in flight ([`WriteRing::write_at`]
//! refuses a second, and its caller falls back to glommio's own path);
//! the buffer and the descriptor of a submitted write live until the
//! kernel has completed it, even if the future waiting for it is dropped
//! (dropping it waits for the completion, so that a later write of the same
//! blocks cannot be overtaken by this one).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::rc::Rc;

use glommio::io::{BufferedFile, DmaBuffer, DmaFile};

/// The one write that may be in flight, and what it needs kept alive.
struct InFlight<'a> {
    ring: &'a WriteRing,
    /// The kernel reads from this buffer until the write completes.
    buf: Option<DmaBuffer>,
    /// The descriptor the write goes to stays open until then.
    file: Option<Rc<DmaFile>>,
    /// Its completion was seen (or it never reached the kernel).
    done: bool,
}

impl InFlight<'_> {
    /// The write may still be in the ring's queue, or in the kernel, and
    /// this can no longer tell: its buffer and descriptor are kept for
    /// good, and the ring is never used again.
    fn abandon(&mut self) {
        std::mem::forget(self.buf.take());
        std::mem::forget(self.file.take());
        self.ring.poisoned.set(true);
        self.done = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Dropped before its completion was seen (a cancelled flush):
            // wait for it here, blocking the thread for what is left of
            // one write, so the buffer is not freed under the kernel and a
            // rewrite of the same blocks cannot be overtaken by this one.
            let mut ring = self.ring.ring.borrow_mut();
            while ring.completion().next().is_none() {
                match ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::error!(error = %e, "waiting for a cancelled log write failed");
                        drop(ring);
                        self.abandon();
                        break;
                    }
                }
            }
        }
        self.ring.busy.set(false);
    }
}

/// See the module docs.
pub struct WriteRing {
    ring: RefCell<io_uring::IoUring>,
    /// Signalled by the ring on every completion; read through glommio.
    eventfd: BufferedFile,
    /// A write is in flight.
    busy: Cell<bool>,
    /// A submission failed and may have left an entry in the queue: the
    /// ring is not used again (every write then goes glommio's way).
    poisoned: Cell<bool>,
    /// Writes submitted through the ring.
    submitted: Cell<u64>,
}

impl WriteRing {
    pub fn new() -> io::Result<WriteRing> {
        let ring = io_uring::IoUring::builder().dontfork().build(2)?;
        // SAFETY: plain system call; the fd is owned right after.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns; the file closes it.
        let eventfd = unsafe { <BufferedFile as FromRawFd>::from_raw_fd(efd as RawFd) };
        ring.submitter().register_eventfd(efd)?;
        Ok(WriteRing {
            ring: RefCell::new(ring),
            eventfd,
            busy: Cell::new(false),
            poisoned: Cell::new(false),
            submitted: Cell::new(0),
        })
    }

    /// Writes submitted through the ring so far.
    pub fn submitted(&self) -> u64 {
        self.submitted.get()
    }

    /// Writes `buf` to `file` at `off` through this ring, submitted at
    /// once; the bytes written. `Err(buf)`, with nothing submitted, if a
    /// write is already in flight or the ring is out of use: the caller
    /// writes it another way.
    pub async fn write_at(&self, file: &Rc<DmaFile>, buf: DmaBuffer, off: u64) -> Result<io::Result<usize>, DmaBuffer> {
        if self.poisoned.get() || self.busy.get() {
            return Err(buf);
        }
        let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("log write over 4 GiB"));
        let len = match len {
            Ok(len) => len,
            Err(e) => return Ok(Err(e)),
        };
        let entry = io_uring::opcode::Write::new(io_uring::types::Fd(file.as_raw_fd()), buf.as_ptr(), len)
            .offset(off)
            .build()
            .user_data(1);
        self.busy.set(true);
        let mut op = InFlight { ring: self, buf: Some(buf), file: Some(file.clone()), done: false };
        {
            let mut ring = self.ring.borrow_mut();
            // SAFETY: the buffer and the descriptor outlive the write: both
            // are held by `op`, which lets go of them only once the
            // completion is seen (or never).
            if unsafe { ring.submission().push(&entry) }.is_err() {
                // Nothing queued (the queue was full, which one write at a
                // time cannot make it): hand the buffer back.
                op.done = true;
                return Err(op.buf.take().expect("held until here"));
            }
            loop {
                match ring.submit() {
                    Ok(_) => {
                        self.submitted.set(self.submitted.get() + 1);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        drop(ring);
                        op.abandon();
                        return Ok(Err(e));
                    }
                }
            }
        }
        loop {
            if let Some(cqe) = self.ring.borrow_mut().completion().next() {
                op.done = true;
                let res = cqe.result();
                return Ok(if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) });
            }
            // Returns once the eventfd is non-zero (perhaps from an earlier
            // completion already seen: the loop looks again).
            if let Err(e) = self.eventfd.read_at(0, 8).await {
                // Still in flight: `op` waits for it as it is dropped.
                return Ok(Err(io::Error::from(e)));
            }
        }
    }
}
