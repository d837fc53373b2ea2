//! A shard's sockets (clients' and peers'): readiness from one edge-triggered epoll
//! instance per shard, and reads and writes as plain non-blocking system
//! calls, the way Redis's event loop does it, inside the shard's glommio
//! executor.
//!
//! Why not glommio's own `TcpStream`: glommio arms a one-shot io_uring
//! poll for every read, and io_uring completes a poll as task work on the
//! shard thread, kicking it with a reschedule IPI when it is running.
//! Unpipelined, that is one IPI per request; on this project's VM a
//! profile of one shard at saturation put 19% of its time in those
//! interrupts and 7% more in submitting the polls (perf/RESULTS.md,
//! "Where the time went (the diagnosis behind the front)"). An epoll callback only links the socket onto a
//! ready list: while the shard is busy, readiness costs one
//! `epoll_wait(0)` per batch of requests and interrupts nothing.
//!
//! When nothing is ready the shard must sleep inside glommio, which can
//! only wait on its own rings. The [`Bridge`] does that: a one-shot poll
//! of the epoll fd on a small io_uring of our own (the `io-uring` crate),
//! whose completions signal an eventfd that glommio reads. It is armed
//! only when a shard goes idle, so its wake-up costs once per idle period.
//! While batches keep coming, the front delivers one, yields so that the
//! woken connections run (a batch of several: [`PREFETCH_PASSES`] times,
//! for their prefetch stages), and asks epoll again; every
//! [`ROUNDS_PER_REACTOR_TURN`] batches it sleeps on a short timer instead,
//! which lets glommio poll its own rings (disk completions) in between.
//!
//! Owns: the epoll fd, the table of registered sockets (token to
//! readiness cell, a `slab`) and the bridge. Sockets leave `accept` and
//! `connect` non-blocking with Nagle's algorithm off.
//!
//! Invariant: a socket's readiness cell says "readable" (or "writable")
//! from the moment epoll reports it until a read (or write) finds the
//! socket empty (or full), and once the peer's end of stream was reported,
//! until a read returns it; edge-triggered epoll reports the next change,
//! so a task that waits only after seeing `EAGAIN` never misses data. A
//! token is removed from epoll before its socket closes, and a token is
//! never looked up after its socket was deregistered (events are handled
//! in the same synchronous step that fetched them).

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use crate::notify::Notify;
use crate::storage::backend::glommio::yield_to_reactor;

/// Events fetched per `epoll_wait`; any non-empty batch is followed by
/// another wait once the woken tasks have run, so this bounds only the
/// stack array.
const EVENTS_PER_WAIT: usize = 256;

/// Batches of readiness the front delivers, letting the woken tasks run
/// after each, before it gives the reactor a turn. Without the turn, a
/// loaded shard never ran its queues dry, the reactor polled its rings
/// only at the 100 ms preemption timer, and a writer waiting on a flush
/// waited that long (200-300 ms maxima in closed-loop SET runs). Eight
/// and 32 measured the same; two was slower (perf/RESULTS.md).
const ROUNDS_PER_REACTOR_TURN: u32 = 8;

/// Times the front lets the queue of runnable tasks go round after
/// delivering a batch of several sockets before it asks epoll again: the
/// connections' [`Prefetch`](crate::storage::Prefetch) stages, one yield
/// each, and then their serving. Asking sooner finds little (their replies
/// are not out yet) and costs an `epoll_wait` that measured as more kernel
/// time per request and no gain from the prefetch at all (perf/RESULTS.md).
pub(super) const PREFETCH_PASSES: usize = crate::storage::Prefetch::STAGES.len() + 1;

/// The readiness of one registered socket, as last reported by epoll and
/// consumed by its connection's reads and writes.
#[derive(Default)]
pub(super) struct Ready {
    readable: Cell<bool>,
    writable: Cell<bool>,
    /// Epoll reported the peer's end of stream (or a hang-up or error).
    /// It is reported once, often in the same event as the last data: a
    /// short read then must not count as "drained", or the end of stream
    /// would never be read and the connection never closed.
    hung_up: Cell<bool>,
    /// Fires when epoll reports anything for the socket.
    changed: Notify,
}

/// A socket registered with its shard's front. Dropping it deregisters
/// the socket and then closes it.
pub(super) struct Socket {
    fd: OwnedFd,
    token: usize,
    ready: Rc<Ready>,
    front: Rc<Front>,
}

/// `send(2)` as a bare system call, and [`recv`] likewise: glibc's
/// wrappers are cancellation points, and in a process with threads they
/// bracket every call with `__pthread_{enable,disable}_asynccancel` (0.8%
/// of a SET-saturated shard, profiled). Nothing in Gyre cancels a thread.
///
/// # Safety
/// `buf` must be valid for `len` bytes.
unsafe fn send(fd: libc::c_int, buf: *const u8, len: usize, flags: libc::c_int) -> isize {
    let no_addr = std::ptr::null::<libc::sockaddr>();
    libc::syscall(libc::SYS_sendto, fd, buf, len, flags, no_addr, 0 as libc::socklen_t) as isize
}

/// `recv(2)` as a bare system call (see [`send`]).
///
/// # Safety
/// `buf` must be valid for `len` bytes.
unsafe fn recv(fd: libc::c_int, buf: *mut u8, len: usize, flags: libc::c_int) -> isize {
    let (no_addr, no_len) = (std::ptr::null_mut::<libc::sockaddr>(), std::ptr::null_mut::<libc::socklen_t>());
    libc::syscall(libc::SYS_recvfrom, fd, buf, len, flags, no_addr, no_len) as isize
}

/// What one non-blocking call on a socket did.
fn check(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Socket {
    /// Runs `op` once the socket is ready in the direction `flag` tracks,
    /// again after every `EAGAIN`. `op` returns its value and whether it
    /// left the socket drained (a short read), which clears the flag
    /// without paying a system call to see `EAGAIN`.
    async fn when_ready<T>(&self, flag: &Cell<bool>, mut op: impl FnMut() -> io::Result<(T, bool)>) -> io::Result<T> {
        loop {
            let seen = self.ready.changed.generation();
            if flag.get() {
                match op() {
                    Ok((v, drained)) => {
                        if drained {
                            flag.set(false);
                        }
                        return Ok(v);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => flag.set(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            self.ready.changed.wait(seen).await;
        }
    }

    /// Reads what the socket has into `buf`, waiting until it has
    /// something. `Ok(0)` is end of stream.
    pub(super) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let hung_up = &self.ready.hung_up;
        self.when_ready(&self.ready.readable, || {
            // SAFETY: `buf` is valid for `buf.len()` bytes and the fd is open.
            let n = check(unsafe { recv(fd, buf.as_mut_ptr(), buf.len(), libc::MSG_DONTWAIT) })?;
            Ok((n, n > 0 && n < buf.len() && !hung_up.get()))
        })
        .await
    }

    /// Writes all of `buf`, waiting while the socket's send buffer is full.
    pub(super) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        while !buf.is_empty() {
            let n = self
                .when_ready(&self.ready.writable, || {
                    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
                    // SAFETY: `buf` is valid for `buf.len()` bytes and the fd is open.
                    let n = check(unsafe { send(fd, buf.as_ptr(), buf.len(), flags) })?;
                    Ok((n, false))
                })
                .await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Writes what the socket takes of `buf` now, without waiting: 0 when
    /// its send buffer is full (the caller leaves the rest to a task that
    /// waits with [`Socket::write_all`]).
    pub(super) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        while self.ready.writable.get() {
            let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
            // SAFETY: `buf` is valid for `buf.len()` bytes and the fd is open.
            match check(unsafe { send(fd, buf.as_ptr(), buf.len(), flags) }) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready.writable.set(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(0)
    }

    /// Accepts one connection on a listening socket, as a non-blocking
    /// socket with Nagle's algorithm off.
    pub(super) async fn accept(&self) -> io::Result<OwnedFd> {
        let fd = self.fd.as_raw_fd();
        self.when_ready(&self.ready.readable, || {
            let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            // SAFETY: null address pointers are allowed; the fd is open.
            let c = check(unsafe { libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), flags) } as isize)?;
            // SAFETY: accept4 returned a new fd that nothing else owns.
            let stream = unsafe { std::net::TcpStream::from_raw_fd(c as RawFd) };
            no_delay(&stream);
            Ok((stream.into(), false))
        })
        .await
    }

    /// Whether the front's latest epoll batch held more than one event
    /// (other connections' tasks are queued to run, or have just run).
    pub(super) fn in_busy_round(&self) -> bool {
        self.front.round.get() > 1
    }

    /// Ends the write side (the client reads end of stream after the
    /// replies already sent).
    pub(super) fn shutdown_write(&self) {
        // SAFETY: plain system call on an open fd.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
    }
}

/// Turns Nagle's algorithm off: replies and replica frames are small and
/// must leave at once. A failure only costs latency, so it is logged.
fn no_delay(stream: &std::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
}

/// Turns TCP keepalive on for a connection, as Redis's `tcp-keepalive`
/// does: after `idle_s` seconds without traffic the kernel probes the
/// other end every `idle_s / 3` seconds (at least 1), and closes the
/// connection after 3 unanswered probes. A client whose host died or
/// vanished behind a partition sends no FIN: without this its connection,
/// its buffers and its slot under `max_connections` would be held for
/// ever. `idle_s == 0` leaves keepalive off. Set on a listener, it holds
/// for every connection accepted from it (Linux copies the options).
pub(super) fn keep_alive(socket: &impl AsRawFd, idle_s: u32) {
    if idle_s == 0 {
        return;
    }
    let fd = socket.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: u32| {
        let value = value as libc::c_int;
        // SAFETY: plain system call on an open fd with a valid int option.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), name, "setting TCP keepalive failed");
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle_s);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, (idle_s / 3).max(1));
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.front.deregister(self.fd.as_raw_fd(), self.token);
    }
}

/// One shard's epoll instance and registered sockets.
pub(super) struct Front {
    epfd: OwnedFd,
    /// Readiness cells by token (the epoll event's data).
    sockets: RefCell<slab::Slab<Rc<Ready>>>,
    bridge: Bridge,
    /// Set when the shard no longer needs readiness; the loop exits.
    stopped: Cell<bool>,
    stop: Notify,
    /// Sockets in the batch being delivered (the last `epoll_wait`'s count).
    round: Cell<usize>,
    /// Seconds of silence after which TCP keepalive probes a connection
    /// this shard dials (0: none): see [`keep_alive`]. Accepted ones
    /// inherit it from the listener.
    keepalive_s: u32,
}

impl Front {
    pub(super) fn new(keepalive_s: u32) -> io::Result<Rc<Front>> {
        // SAFETY: plain system call; the fd is owned right after.
        let epfd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as isize)?;
        // SAFETY: epoll_create1 returned a new fd that nothing else owns.
        let epfd = unsafe { OwnedFd::from_raw_fd(epfd as RawFd) };
        let bridge = Bridge::new(epfd.as_raw_fd())?;
        Ok(Rc::new(Front {
            epfd,
            sockets: RefCell::default(),
            bridge,
            stopped: Cell::new(false),
            stop: Notify::default(),
            round: Cell::new(0),
            keepalive_s,
        }))
    }

    /// Registers a non-blocking socket for edge-triggered reads and writes.
    pub(super) fn register(self: &Rc<Self>, fd: OwnedFd) -> io::Result<Socket> {
        let ready = Rc::new(Ready::default());
        // A new socket may already hold data, and has room to write.
        ready.readable.set(true);
        ready.writable.set(true);
        let mut sockets = self.sockets.borrow_mut();
        let slot = sockets.vacant_entry();
        let token = slot.key();
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token as u64,
        };
        // SAFETY: both fds are open; `ev` outlives the call.
        let r = unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) };
        check(r as isize)?;
        slot.insert(ready.clone());
        Ok(Socket { fd, token, ready, front: self.clone() })
    }

    /// Connects to `addr` through glommio (which bounds the attempt by
    /// `timeout` without blocking the shard), then moves the connected
    /// socket (non-blocking, Nagle's algorithm off) onto this front.
    pub(super) async fn connect(self: &Rc<Self>, addr: SocketAddr, timeout: Duration) -> io::Result<Socket> {
        let glommio_stream = glommio::net::TcpStream::connect_timeout(addr, timeout).await.map_err(io::Error::from)?;
        // SAFETY: the fd is open for as long as `glommio_stream` lives.
        let fd = unsafe { BorrowedFd::borrow_raw(glommio_stream.as_raw_fd()) }.try_clone_to_owned()?;
        // glommio's copy closes; the socket lives on in `fd`.
        drop(glommio_stream);
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        no_delay(&stream);
        keep_alive(&stream, self.keepalive_s);
        self.register(stream.into())
    }

    fn deregister(&self, fd: RawFd, token: usize) {
        // SAFETY: the fd is still open (the caller closes it after this).
        unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        self.sockets.borrow_mut().remove(token);
    }

    /// Ends [`Front::run`].
    pub(super) fn stop(&self) {
        self.stopped.set(true);
        self.stop.notify_all();
    }

    /// Delivers readiness to the registered sockets until [`Front::stop`].
    pub(super) async fn run(self: Rc<Self>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
        // Non-empty batches since the reactor last had a turn.
        let mut rounds = 0u32;
        while !self.stopped.get() {
            // SAFETY: `events` is valid for EVENTS_PER_WAIT entries.
            let n = unsafe {
                libc::epoll_wait(self.epfd.as_raw_fd(), events.as_mut_ptr(), EVENTS_PER_WAIT as libc::c_int, 0)
            };
            let n = match check(n as isize) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Only a bug can get here (a bad fd or pointer); keep
                    // the shard alive and say so.
                    tracing::error!(error = %e, "epoll_wait failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            self.round.set(n);
            {
                let sockets = self.sockets.borrow();
                for ev in &events[..n] {
                    let Some(ready) = sockets.get(ev.u64 as usize) else { continue };
                    let bits = ev.events as libc::c_int;
                    // An error or hang-up makes both directions fail fast.
                    let broken = bits & (libc::EPOLLERR | libc::EPOLLHUP) != 0;
                    if broken || bits & libc::EPOLLRDHUP != 0 {
                        ready.hung_up.set(true);
                    }
                    if broken || bits & (libc::EPOLLIN | libc::EPOLLRDHUP) != 0 {
                        ready.readable.set(true);
                    }
                    if broken || bits & libc::EPOLLOUT != 0 {
                        ready.writable.set(true);
                    }
                    ready.changed.notify_all();
                }
            }
            if n > 0 {
                // Let the woken connections run, then look again before
                // paying for a sleep: under load more requests are in by
                // then, and epoll hands them over without the bridge's
                // round trip through two rings. A plain yield keeps this
                // task runnable, though, and glommio polls its rings (the
                // log's writes and syncs complete there) only once no
                // queue has work: every `ROUNDS_PER_REACTOR_TURN` batches
                // the reactor gets its turn.
                rounds += 1;
                if rounds < ROUNDS_PER_REACTOR_TURN {
                    // A batch of several runs the connections' prefetch
                    // stages first: wait until they have served.
                    for _ in 0..if n > 1 { PREFETCH_PASSES } else { 1 } {
                        futures_lite::future::yield_now().await;
                    }
                } else {
                    rounds = 0;
                    yield_to_reactor().await;
                }
                continue;
            }
            rounds = 0;
            let seen = self.stop.generation();
            if self.stopped.get() {
                break;
            }
            let woke = futures_lite::future::or(async { Some(self.bridge.wait().await) }, async {
                self.stop.wait(seen).await;
                None
            })
            .await;
            if let Some(Err(e)) = woke {
                tracing::error!(error = %e, "waiting for socket readiness failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Lets a glommio executor sleep until the epoll fd is readable.
struct Bridge {
    epfd: RawFd,
    ring: RefCell<io_uring::IoUring>,
    /// A poll of the epoll fd is in the ring and has not completed.
    armed: Cell<bool>,
    /// The eventfd the ring signals on each completion, read through
    /// glommio's own ring (a blocking eventfd: io_uring waits for it
    /// with a poll of its own instead of failing with EAGAIN).
    eventfd: glommio::io::BufferedFile,
}

impl Bridge {
    fn new(epfd: RawFd) -> io::Result<Bridge> {
        let ring = io_uring::IoUring::builder().dontfork().build(4)?;
        // SAFETY: plain system call; the fd is owned right after.
        let efd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) } as isize)? as RawFd;
        // SAFETY: a new fd that nothing else owns; the file closes it.
        let eventfd = unsafe { <glommio::io::BufferedFile as FromRawFd>::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd)?;
        Ok(Bridge { epfd, ring: RefCell::new(ring), armed: Cell::new(false), eventfd })
    }

    /// Completes once the epoll fd is readable (perhaps spuriously).
    async fn wait(&self) -> io::Result<()> {
        if !self.armed.get() {
            let poll = io_uring::opcode::PollAdd::new(io_uring::types::Fd(self.epfd), libc::POLLIN as u32)
                .build()
                .user_data(1);
            let mut ring = self.ring.borrow_mut();
            // SAFETY: the entry refers to no memory. One poll is armed at
            // a time, so the 4-entry queue has room unless a submit failed
            // and left entries behind; then this says so.
            unsafe { ring.submission().push(&poll) }
                .map_err(|_| io::Error::other("the readiness ring's submission queue is full"))?;
            ring.submit()?;
            self.armed.set(true);
        }
        loop {
            if self.ring.borrow_mut().completion().next().is_some() {
                self.armed.set(false);
                return Ok(());
            }
            self.eventfd.read_at(0, 8).await.map_err(io::Error::from)?;
        }
    }
}
