//! One client connection: a reader that frames requests, starts each one
//! and sends the replies that are ready once it has framed all it read (one
//! write, no task switch), and a writer task for the rest: replies of
//! requests that had to wait, and what a full socket would not take.
//!
//! When other connections were ready in the same batch, the reader first
//! prefetches its requests' lookups in stages, yielding between them
//! ([`prefetch`]), so that the batch's cache misses overlap.
//!
//! Writes that must still settle (a durable write waiting for its group
//! commit, or any write past the write buffer's backlog limit), and GETs
//! of a version not yet durable under `always`, have their replies held
//! in the shard's [`Settling`] queue, which one task per shard hands out
//! as they settle.
//!
//! Owns: the connection's read buffer, its in-flight count and its reply
//! queue (sealed, with its reads, once a member's AUTH proved the cluster
//! secret: `crate::auth`), and its standing (a client's, a cluster member's once it sent a
//! HELLO naming one (with a cluster secret: once its AUTH proved it), or
//! admitted past the connection limit into the members' reserve:
//! [`Standing`]); and the shard's queue of held replies (in log order;
//! a held GET waits for its version's commit).
//!
//! Invariant: at most `MAX_IN_FLIGHT` requests of a connection are owed
//! replies, at most `MAX_RUNNING` of them in tasks of their own, and none
//! starts while `MAX_QUEUED_REPLY_BYTES` of replies wait for the client
//! (past any of these the reader stops reading: backpressure, not errors),
//! nor once a write to the client failed;
//! the read buffer holds at most about twice what the client has sent of
//! its current frame, whatever size the frame declares; a frame over the
//! node's size limit but within the protocol's is skipped unread into
//! memory and answered with an error; a frame that cannot be framed or
//! decoded gets an error reply and ends the connection after the replies
//! before it are written; other connections never notice. A connection in
//! the members' reserve runs nothing before a HELLO naming a member (with
//! a cluster secret, and the AUTH that answers its challenge), and sends
//! nothing else before it.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use futures_lite::future::poll_once;

use super::front::Socket;
use super::{bump, bump_first, decode_error_frame, Answer, Shard};
use crate::auth::{ClusterKeys, Opener, Sealer};
use crate::notify::Notify;
use crate::storage::{PendingWrite, Prefetch};
use crate::wire::{
    declared_frame_len, op, split_frame, ErrorCode, Request, WireError, HEADER_LEN, MAX_BODY_LEN, MAX_IN_FLIGHT,
};

/// The room a read is given once reads fill what they are given (a client
/// that pipelines); the buffer also grows to hold the largest frame being
/// read.
pub(super) const READ_CHUNK: usize = 64 * 1024;

/// A client connection's first read buffer: a request without a large
/// value fits, and a connection whose reads never filled it holds no more
/// (found by a review: every connection took `READ_CHUNK` at accept). A
/// read that fills it grows it to `READ_CHUNK` ([`make_room`]), which it
/// keeps.
pub(super) const FIRST_READ: usize = 4 * 1024;
const _: () = assert!(FIRST_READ >= HEADER_LEN && FIRST_READ < READ_CHUNK);

/// Reply bytes a connection may have queued for the writer before its
/// reader stops starting requests (until the client reads). The count
/// bound, `MAX_IN_FLIGHT`, alone let a client that sent 1024 pipelined
/// GETs of a 1 MiB value and read nothing make the node hold a GiB, for as
/// long as it kept the connection (found by a review). With it a client
/// that does not read holds at most this, one reply past it, the batch the
/// writer is stuck on, and the replies of requests already running.
/// 4 MiB is many replies of any usual size, so pipelining is not slowed.
pub(super) const MAX_QUEUED_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// Requests of one connection that may run at once in tasks of their own
/// (not answered on the spot: a record read from disk, a request a
/// cluster member coordinates or relays). Their replies reach the queue only when they end,
/// so the byte budget above does not see them coming: without this bound,
/// a client that read nothing had all `MAX_IN_FLIGHT` of them run on cache
/// misses, and their replies piled up past the budget (found by a review).
/// With it, such a client holds at most the budget, this many replies, and
/// the batch the writer is stuck on. 64 is deeper than a pipeline needs
/// to keep a disk busy from one connection.
pub(super) const MAX_RUNNING: usize = 64;
const _: () = assert!(MAX_RUNNING <= MAX_IN_FLIGHT && MAX_QUEUED_REPLY_BYTES >= crate::wire::MAX_BODY_LEN / 4);

/// A read or reply buffer that grew past this (a large frame, or a burst)
/// is given back once done with, not kept for the connection's life: an
/// idle pool of connections that had each read one large value held it all
/// (found by a review).
pub(super) const KEEP_BUFFER: usize = 4 * READ_CHUNK;

/// Prepares a frame reader's buffer for the next read: moves the partial
/// frame in `buf[start..end]` to the front, grows the buffer toward the
/// size of a big frame whose header is in (its size was checked against
/// the limit when it was framed), and gives back the memory of a big one
/// once it is consumed. Used by client and peer connections alike.
///
/// The buffer grows as the frame's bytes arrive, at most doubling what
/// is in it, not to the declared size at once: otherwise a header alone,
/// 24 bytes, would make the node allocate (and zero) a megabyte, and a few
/// hundred such connections would hold hundreds of megabytes for nothing.
pub(super) fn make_room(buf: &mut Vec<u8>, start: &mut usize, end: &mut usize) {
    // The last read took all the room it had (`end` is where it ended):
    // the client sends faster than the buffer takes, so the next read gets
    // `READ_CHUNK`; otherwise the room there is, at least `FIRST_READ`.
    let filled = *end == buf.len();
    if *start > 0 {
        buf.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
    }
    let room = if filled { READ_CHUNK } else { FIRST_READ };
    let needed = buf[..*end].first_chunk::<HEADER_LEN>().map_or(READ_CHUNK, declared_frame_len);
    let target = needed.min(buf.len().max(2 * *end).max(*end + room)).max(*end + 1);
    if buf.len() < target {
        buf.resize(target, 0);
    } else if buf.len() > KEEP_BUFFER && *end < READ_CHUNK && needed <= READ_CHUNK {
        // A big frame was consumed and what is left (the start of a small
        // one) fits a small buffer: give the big one back. Not only when
        // nothing is left: a client that pipelines without pause seldom
        // leaves a read ending on a frame's end.
        let mut small = vec![0u8; READ_CHUNK];
        small[..*end].copy_from_slice(&buf[..*end]);
        *buf = small;
    }
}

/// Replies waiting for the writer, and the connection's in-flight count.
#[derive(Default)]
struct Outbox {
    buf: RefCell<Vec<u8>>,
    /// Replies in `buf`.
    queued: Cell<usize>,
    /// Requests read whose replies are not yet written to the socket
    /// (running, or queued in `buf`): bounds the memory a client that does
    /// not read its replies can make us hold.
    in_flight: Cell<usize>,
    /// Requests running in tasks of their own, their replies still to come
    /// ([`MAX_RUNNING`]).
    running: Cell<usize>,
    /// Bytes of this connection's replies held in the shard's settle queue
    /// ([`Settling`]), counted against [`MAX_QUEUED_REPLY_BYTES`] as if
    /// queued: a held GET's reply carries its values (found by a review: a
    /// PUT of a large value, then GETs of it read by nobody, had every GET
    /// started and copied past the budget).
    held: Cell<usize>,
    /// No more replies will come; the writer exits once `buf` is empty.
    closing: Cell<bool>,
    /// A write failed; the reader stops.
    broken: Cell<bool>,
    /// The reader is starting requests and will send the replies they
    /// queue itself once it has framed all it read ([`Outbox::send_now`]):
    /// one `send`, and no wake-up and task switch to the writer per
    /// request. Replies queued meanwhile do not wake the writer.
    reader_sends: Cell<bool>,
    /// The writer holds a batch it has not finished writing: nothing else
    /// may write before it, or replies would reach the socket out of order.
    writing: Cell<bool>,
    changed: Notify,
    /// A member connection that proved the cluster secret: each reply is
    /// sealed as it is queued, which is the order replies go out in.
    sealer: RefCell<Option<Sealer>>,
}

impl Outbox {
    /// A request was read; its reply is owed.
    fn start(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
    }

    /// A request was read and is answered at once: [`Self::start`], then
    /// [`Self::push`].
    fn reply(&self, frame: &[u8]) {
        self.start();
        self.push(frame);
    }

    /// Queues the reply of a started request.
    fn push(&self, frame: &[u8]) {
        let mut buf = self.buf.borrow_mut();
        let at = buf.len();
        buf.extend_from_slice(frame);
        self.seal(&mut buf, at);
        drop(buf);
        self.queued_one();
    }

    /// Seals the reply just queued at `buf[at..]` if the connection is
    /// sealed.
    fn seal(&self, buf: &mut Vec<u8>, at: usize) {
        if let Some(sealer) = self.sealer.borrow_mut().as_mut() {
            sealer.seal(buf, at);
        }
    }

    /// Queues the reply of a started request once `reply` has it, from a
    /// task of its own (the reader goes on meanwhile), counted against
    /// [`MAX_RUNNING`] until then. Every request is, a cluster's
    /// coordinated and relayed ones included: members relay client
    /// requests on connections of their own, apart from replica messages
    /// (`peer::Lane`), so a reader stopped at the bound by relayed
    /// requests holds up no replica message they wait on.
    fn push_later(self: &Rc<Self>, shard: &Rc<Shard>, reply: impl std::future::Future<Output = Vec<u8>> + 'static) {
        let out = self.clone();
        out.running.set(out.running.get() + 1);
        let running = super::Gauged::new(shard, |s| &s.counters.requests_running);
        glommio::spawn_local(async move {
            let reply = reply.await;
            drop(running);
            out.running.set(out.running.get() - 1);
            out.push(&reply);
        })
        .detach();
    }

    /// Lets `answer` append a reply at once; if it did
    /// ([`Answer::Now`]), counts a request started and its reply queued.
    fn push_now(&self, answer: impl FnOnce(&mut Vec<u8>) -> Answer) -> Answer {
        let mut buf = self.buf.borrow_mut();
        let at = buf.len();
        let answer = answer(&mut buf);
        if let Answer::Now = answer {
            self.seal(&mut buf, at);
            drop(buf);
            self.start();
            self.queued_one();
        } else {
            debug_assert_eq!(buf.len(), at, "a reply appended but not answered now");
        }
        answer
    }

    /// A reply was appended to `buf`: wake the writer, unless the reader
    /// will send it.
    fn queued_one(&self) {
        self.queued.set(self.queued.get() + 1);
        if !self.reader_sends.get() {
            self.changed.notify_all();
        }
    }

    /// `n` replies reached the socket in one write.
    fn written(&self, shard: &Shard, n: usize) {
        self.in_flight.set(self.in_flight.get() - n);
        bump(&shard.counters.reply_writes, 1);
        bump(&shard.counters.replies, n as u64);
    }

    /// Whether the reader must wait before it starts another request:
    /// `MAX_IN_FLIGHT` are owed replies, `MAX_RUNNING` run in tasks, or
    /// `MAX_QUEUED_REPLY_BYTES` of replies wait for a client that does not
    /// read them.
    fn full(&self) -> bool {
        self.in_flight.get() >= MAX_IN_FLIGHT
            || self.running.get() >= MAX_RUNNING
            || self.buf.borrow().len() + self.held.get() >= MAX_QUEUED_REPLY_BYTES
    }

    /// Waits until one more request may start (not [`Self::full`]),
    /// sending what is queued meanwhile; the reader then starts it, sending
    /// its own replies. Whether it had to wait; `None` if the connection
    /// broke: nobody will read a reply, so nothing more is started (found
    /// by a review: every frame buffered went on to run, past
    /// `MAX_IN_FLIGHT`, with its reply piling up unsent).
    async fn room_for_one(&self, sock: &Socket, shard: &Rc<Shard>) -> Option<bool> {
        let waits = self.full() && !self.broken.get();
        let _waiting = waits.then(|| super::Gauged::new(shard, |s| &s.counters.readers_waiting));
        while self.full() && !self.broken.get() {
            self.send_now(sock, shard);
            let g = self.changed.generation();
            if !self.full() {
                break;
            }
            self.changed.wait(g).await;
        }
        self.reader_sends.set(true);
        (!self.broken.get()).then_some(waits)
    }

    /// The reader is done starting requests: writes the replies queued so
    /// far at once if the writer is idle and the socket takes them all, and
    /// otherwise leaves them (and the waiting) to the writer.
    fn send_now(&self, sock: &Socket, shard: &Shard) {
        self.reader_sends.set(false);
        if self.buf.borrow().is_empty() {
            return;
        }
        if !self.writing.get() {
            let mut buf = self.buf.borrow_mut();
            match sock.try_write(&buf) {
                Ok(n) if n == buf.len() => {
                    buf.clear();
                    if buf.capacity() > KEEP_BUFFER {
                        *buf = Vec::new();
                    }
                    // No notify: the reader, which is here, is the only
                    // task waiting for the in-flight count to fall.
                    self.written(shard, self.queued.replace(0));
                    return;
                }
                Ok(n) => {
                    // Its replies are counted when the writer finishes them.
                    buf.drain(..n);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "connection write failed");
                    self.broken.set(true);
                }
            }
        }
        self.changed.notify_all();
    }
}

/// The reply of a write that has not settled yet, or of a GET of a version
/// not yet durable. A write's reply is a header and the new version's
/// context, a few dozen bytes for a lone node's clock: inline, it costs no
/// allocation while it waits. A GET's carries its values, and counts
/// against its connection's reply budget while held (`Outbox::held`).
pub(super) type HeldReply = smallvec::SmallVec<[u8; 96]>;

/// Writes of a shard's connections that are appended but not yet settled
/// (under `fsync = always`, waiting for their group commit; under the
/// other policies, appended past the write buffer's backlog limit and
/// waiting for a flush), in the order they were appended, which is log
/// order, so they settle front first; and GETs of versions not yet durable
/// (`fsync = always`), queued in the same order by where their records
/// end. A GET's record may be earlier in the log than writes held before
/// it: it goes before them, so that it does not wait for a later group
/// commit than its own (it once went to the back, and could).
///
/// One task ([`settle_held`]) waits for the front write and hands out the
/// replies of every write the same group commit settled, instead of one
/// task, one future and one reply buffer per write.
#[derive(Default)]
pub(super) struct Settling {
    queue: RefCell<std::collections::VecDeque<Held>>,
    /// A [`settle_held`] task is running: it takes every write queued
    /// before it finds the queue empty.
    running: Cell<bool>,
}

/// A write waiting in [`Settling`], and where its reply goes.
struct Held {
    out: Rc<Outbox>,
    id: u64,
    pending: PendingWrite,
    reply: HeldReply,
}

/// Queues the reply of a write appended just now (nothing appended since),
/// or of a GET of a version not yet durable, to go to `out` once it
/// settles.
fn hold(shard: &Rc<Shard>, out: &Rc<Outbox>, id: u64, pending: PendingWrite, reply: HeldReply) {
    out.held.set(out.held.get() + reply.len());
    in_log_order(&mut shard.settling.queue.borrow_mut(), Held { out: out.clone(), id, pending, reply });
    if !shard.settling.running.replace(true) {
        glommio::spawn_local(settle_held(shard.clone())).detach();
    }
}

/// Queues `held` after every entry whose record ends no later in the log,
/// so the queue stays in log order: a write appended just now goes to the
/// back, a GET of an earlier record before the writes after it.
fn in_log_order(queue: &mut std::collections::VecDeque<Held>, held: Held) {
    let at = queue.partition_point(|h| h.pending.no_later_than(&held.pending));
    queue.insert(at, held);
}

/// Settles the held writes front first, handing each reply (or its error)
/// to its connection, until none is left. The first write of a group waits
/// (leading the group's flush if nobody else does); the rest of the group
/// is settled by then and goes out without waiting.
async fn settle_held(shard: Rc<Shard>) {
    let engine = shard.store.engine();
    loop {
        let Some(held) = shard.settling.queue.borrow_mut().pop_front() else {
            shard.settling.running.set(false);
            return;
        };
        let settled = engine.settle(held.pending).await;
        held.out.held.set(held.out.held.get() - held.reply.len());
        match settled {
            Ok(_) => held.out.push(&held.reply),
            Err(e) => held.out.push(&shard.store_error_frame(held.id, &e.into())),
        }
    }
}

/// What ended a reader's wait.
enum Woke {
    Read(std::io::Result<usize>),
    /// Shutdown, or a provisional connection's time ran out.
    Stop,
    /// A frame begun stayed unfinished for `frame_timeout_ms`.
    Stalled,
}

/// Frames of one read whose lookups [`prefetch`] fetches ahead: one is
/// the unpipelined case; a few more cover a short pipeline, and past that
/// the first lookups' lines would be evicted before they are used.
const PREFETCH_FRAMES: usize = 4;

/// The error of a request that arrived, but had not started, when the
/// node began to stop.
const SHUTTING_DOWN: &str =
    "the node is shutting down; the request did not run (retry it, on another replica if there is one)";

/// Fetches what the lookups of the first requests in `buf` will touch, one
/// level per stage ([`Prefetch`]), yielding after each stage, so that
/// every connection ready in the same batch runs its stage in between: the
/// misses of all of them are in flight together. The reader calls it only
/// when the front's batch held other events ([`Socket::in_busy_round`]);
/// alone, a yield would overlap nothing. The front gives the batch the
/// passes this takes before it asks epoll again
/// ([`super::front::PREFETCH_PASSES`]).
async fn prefetch(shard: &Shard, mut buf: &[u8]) {
    let mut hashes = [0u64; PREFETCH_FRAMES];
    let mut n = 0;
    while n < PREFETCH_FRAMES {
        let Ok(Some((header, total))) = split_frame(buf, shard.max_body(buf)) else { break };
        if let Some(hash) =
            Request::decode_with(&header, &buf[HEADER_LEN..total]).ok().and_then(|(req, _)| shard.local_key_hash(&req))
        {
            hashes[n] = hash;
            n += 1;
        }
        buf = &buf[total..];
    }
    if n == 0 {
        return;
    }
    bump(&shard.counters.prefetched, n as u64);
    for stage in Prefetch::STAGES {
        for &hash in &hashes[..n] {
            shard.store.engine().prefetch(hash, stage);
        }
        futures_lite::future::yield_now().await;
    }
}

/// Connections of members a shard of a cluster node takes beyond
/// `max_connections`: those that named a member (HELLO; with a cluster
/// secret, that proved it with an AUTH) and those admitted past the limit
/// that must do so first, together. Enough for two connections (replica
/// and relay) from each of 512 member shards. Without a secret a name is
/// not proof (member names are public): a client that claims one is still
/// held to this, so no more than `max_connections` plus this many
/// connections are open (and a client that claims every place locks the
/// members out again); with one, only a proof takes a place (unless the
/// node also has `accept_unauthenticated`, which takes a HELLO as without
/// a secret). One admitted past the limit holds its read buffer
/// ([`FIRST_READ`]) and at most a HELLO's bytes (and one reply) until it
/// is a member's or [`PROVISIONAL_WAIT`] passes: while it is in the
/// reserve it may send one HELLO naming a member and, with a secret, then
/// one AUTH, nothing else.
pub(super) const MEMBER_RESERVE: u64 = 1024;

/// How long from its accept a connection admitted into the members'
/// reserve may take to send its HELLO (and AUTH) before it is closed.
const PROVISIONAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most bytes a HELLO's body has: what a connection in the members'
/// reserve may declare for its HELLO or its AUTH (whose body is shorter).
const MAX_OPENING_BODY: usize = 2 + crate::core::ring::MAX_NAME_LEN;
const _: () = assert!(crate::wire::CHALLENGE_LEN + crate::wire::PROOF_LEN <= MAX_OPENING_BODY);

/// An open connection, and whether it is a client's or a member's, kept
/// in the shard's counters (the accept loop reads them against the
/// connection limit; the shutdown waits for `connections_open` to reach 0)
/// from the accept for as long as the connection is open.
pub(super) struct Standing {
    shard: Rc<Shard>,
    /// Admitted into the members' reserve, and not yet a member's (no
    /// HELLO naming one; with a cluster secret, no AUTH proving it).
    provisional: Cell<bool>,
    /// When a provisional connection is closed if it is not a member's by
    /// then: set once, at accept (a timer per read let a connection that
    /// sent a byte a second stay for good; found by a review).
    deadline: std::time::Instant,
    /// A member's (its HELLO; with a cluster secret, its AUTH), and
    /// counted as one.
    member: Cell<bool>,
    /// Named a member (HELLO), counted as one or not: its quorum requests
    /// are that member's relays ([`Shard::misrouted_relay`]).
    named: Cell<bool>,
    /// With a cluster secret: whether the connection proved it (AUTH), and
    /// until then what its HELLO asked. Replica messages are taken, and the
    /// connection counts as a member's, only once it is proved.
    auth: Cell<Auth>,
}

/// What the cluster secret made of a request ([`Standing::screen`]): the
/// reply it gets instead of running, and what follows it.
enum Screened {
    /// Refused; the connection goes on.
    Refused(Vec<u8>),
    /// Refused; the connection closes.
    Closing(Vec<u8>),
    /// An AUTH answered: every frame after the answer, both ways, is
    /// sealed under the session.
    Proven(Vec<u8>, crate::auth::Session),
}

/// A connection's standing with the cluster secret (`Standing::auth`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// Nothing asked yet (no HELLO, or the node has no secret).
    None,
    /// A HELLO named `member`, and its reply sent `challenge`: the AUTH
    /// that follows must answer it.
    Challenged { challenge: [u8; crate::wire::CHALLENGE_LEN], member: crate::core::ring::MemberIdx },
    /// Proved: replica messages are taken.
    Proven,
    /// A lenient node took a frame other than the AUTH after the challenge
    /// (a member without the secret): the connection goes on unproven for
    /// good, and takes no HELLO or AUTH again.
    Unproven,
}

impl Standing {
    /// A connection just accepted; `provisional` if past the limit.
    pub(super) fn new(shard: Rc<Shard>, provisional: bool) -> Standing {
        bump(&shard.counters.connections_open, 1);
        if provisional {
            bump(&shard.counters.provisional_connections, 1);
        }
        let deadline = std::time::Instant::now() + PROVISIONAL_WAIT;
        Standing {
            shard,
            provisional: Cell::new(provisional),
            deadline,
            member: Cell::new(false),
            named: Cell::new(false),
            auth: Cell::new(Auth::None),
        }
    }

    /// What this connection's opening exchange allows `opcode` now, with
    /// `owed` replies not yet written: `None` to go on, or why the
    /// connection is refused and closed. Once a HELLO got a challenge,
    /// only its AUTH may follow, and only with nothing owed: a request
    /// started before the AUTH, or slipped in before it, would have its
    /// reply sealed as the first of the member's sequence (found by a
    /// review: a GET an attacker on the path put before the AUTH was
    /// answered sealed, and the dialer took it for its own first call).
    /// Once proven, no HELLO may start the exchange again.
    ///
    /// While the cluster turns its secret on or off (a lenient node), a
    /// member without the secret sends its calls right after its HELLO and
    /// never an AUTH: such a frame is taken, and the connection goes on
    /// unproven, never to be sealed (a later AUTH is refused).
    fn opening_refuses(&self, opcode: u8, owed: usize) -> Option<&'static str> {
        match self.auth.get() {
            Auth::Challenged { .. } if opcode != op::AUTH => {
                if self.shard.keys().is_some_and(ClusterKeys::accepts_unauthenticated) {
                    self.auth.set(Auth::Unproven);
                    return None;
                }
                Some("only the AUTH may follow a challenge")
            }
            Auth::Challenged { .. } if owed > 0 => Some("an AUTH with replies still owed on its connection"),
            Auth::Proven if opcode == op::HELLO => Some("a HELLO on a connection that proved the secret"),
            Auth::Unproven if opcode == op::HELLO => Some("a HELLO on a connection that went on unproven"),
            _ => None,
        }
    }

    /// Whether a provisional connection may send this frame: the first
    /// HELLO, if it names a member, and after it (with a cluster secret)
    /// the AUTH that answers its challenge.
    fn may_open(&self, hello_names_member: bool, auth: bool) -> bool {
        match self.auth.get() {
            Auth::None => hello_names_member && !self.named.get(),
            Auth::Challenged { .. } => auth,
            Auth::Proven | Auth::Unproven => true,
        }
    }

    /// The reply to a HELLO naming `name`, and what it does to the
    /// connection. Without a cluster secret, a member's HELLO makes the
    /// connection a member's. With one, the reply carries a challenge and
    /// only the AUTH that answers it does (a name is public; found by a
    /// review: a client naming a member held a place in the members'
    /// reserve for good), unless the node has `accept_unauthenticated`:
    /// then the HELLO does, as without a secret.
    fn hello(&self, id: u64, name: &[u8]) -> Vec<u8> {
        let shard = &self.shard;
        let Some(member) = shard.member_of(name) else { return shard.hello_reply(id, false, None) };
        self.named.set(true);
        let Some(keys) = shard.keys() else {
            self.named_member();
            return shard.hello_reply(id, true, None);
        };
        // While the cluster turns its secret on, a member without one never
        // sends an AUTH: its HELLO is taken as before.
        if keys.accepts_unauthenticated() {
            self.named_member();
        }
        match crate::auth::challenge() {
            Ok(challenge) => {
                self.auth.set(Auth::Challenged { challenge, member });
                shard.hello_reply(id, true, Some(challenge))
            }
            // A reply without a challenge would say "no secret here".
            Err(e) => {
                tracing::error!(error = %e, "no random bytes for a member's challenge");
                self.auth.set(Auth::None);
                shard.error_frame(id, ErrorCode::Internal, "no random bytes for a challenge")
            }
        }
    }

    /// What the cluster secret says of `req`, decoded on this connection:
    /// `None` to run it. An AUTH is answered here; a replica message on a
    /// connection that has not proved the secret is refused.
    fn screen(&self, id: u64, req: &Request<'_>) -> Option<Screened> {
        let shard = &self.shard;
        match req {
            Request::Auth { nonce, proof } => {
                // Only the AUTH that answers this connection's challenge:
                // one without a HELLO, or a second one, is refused.
                let Some(keys) = shard.keys() else {
                    let why = "this node has no cluster secret: there is nothing to prove";
                    return Some(Screened::Closing(shard.error_frame(id, ErrorCode::Unauthenticated, why)));
                };
                let answer = match (self.auth.replace(Auth::None), shard.own_name()) {
                    (Auth::Challenged { challenge, member }, Some(own)) => {
                        let dialer = shard.member_name(member).unwrap_or_default();
                        let ex = crate::auth::Exchange { challenge: &challenge, nonce, dialer, responder: own };
                        keys.answer(&ex, proof)
                    }
                    _ => None,
                };
                if let Some((proof, session)) = answer {
                    self.auth.set(Auth::Proven);
                    self.named_member();
                    let mut out = Vec::with_capacity(HEADER_LEN + crate::wire::PROOF_LEN);
                    crate::wire::Response::Auth { proof }.encode(&mut out, id, shard.id as u16);
                    return Some(Screened::Proven(out, session));
                }
                // Warned once a shard; STATS counts them all.
                if bump_first(&shard.counters.auth_failures) {
                    tracing::warn!(
                        "a connection's AUTH failed (its proof is not this node's cluster secret's, or it answered \
                         no challenge of this connection): closed; do all members have the same \
                         cluster_secret_file?"
                    );
                }
                let why = "the proof does not match this node's cluster secret (or no HELLO asked for one)";
                Some(Screened::Closing(shard.error_frame(id, ErrorCode::Unauthenticated, why)))
            }
            Request::ReplicaGet { .. } | Request::ReplicaPut { .. }
                if shard.keys().is_some() && self.auth.get() != Auth::Proven =>
            {
                if shard.keys().is_some_and(ClusterKeys::accepts_unauthenticated) {
                    bump(&shard.counters.unauthenticated_taken, 1);
                    return None;
                }
                // Warned once a shard; STATS counts them all.
                if bump_first(&shard.counters.unauthenticated) {
                    tracing::warn!(
                        "refused a replica message from a connection that has not proved the cluster secret \
                         (a member without cluster_secret_file, or a client): Unauthenticated"
                    );
                }
                let why = "replica messages are taken only from members that proved the cluster secret (AUTH)";
                Some(Screened::Refused(shard.error_frame(id, ErrorCode::Unauthenticated, why)))
            }
            _ => None,
        }
    }

    /// The connection is a member's: it named one (HELLO), and with a
    /// cluster secret proved it (AUTH). A provisional one becomes a
    /// member's; a client's does too while the reserve has room, and
    /// otherwise stays a client's (found by a review: any client could
    /// name a member and so escape every limit).
    fn named_member(&self) {
        self.named.set(true);
        let c = &self.shard.counters;
        if self.provisional.replace(false) {
            c.provisional_connections.set(c.provisional_connections.get() - 1);
        } else if self.member.get() || c.reserve_used() >= MEMBER_RESERVE {
            return;
        }
        if !self.member.replace(true) {
            bump(&c.member_connections, 1);
        }
    }
}

impl Drop for Standing {
    fn drop(&mut self) {
        let c = &self.shard.counters;
        if self.provisional.get() {
            c.provisional_connections.set(c.provisional_connections.get() - 1);
        }
        if self.member.get() {
            c.member_connections.set(c.member_connections.get() - 1);
        }
        c.connections_open.set(c.connections_open.get() - 1);
        self.shard.closed.notify_all();
    }
}

/// What a member connection that sent a frame that failed its seal is
/// told before it is closed (request id 0: the connection's, not one
/// request's).
const SEAL_REFUSED: &str = "a frame failed its seal (sent unsealed after the AUTH, or changed on the way): the \
                            connection is closed";

/// Refuses a sealed connection's frame that does not open, or does not
/// frame, with no request's id (one taken from its unchecked header would
/// answer, sealed, a call the member has in flight); counted, and warned
/// of once a shard. The reader then closes the connection.
fn seal_refused(shard: &Shard, out: &Outbox, why: &str) {
    if bump_first(&shard.counters.seal_failures) {
        tracing::warn!(why, "closed a member connection whose frame failed its seal");
    }
    out.reply(&shard.error_frame(0, ErrorCode::Unauthenticated, SEAL_REFUSED));
}

/// The refusal a connection past the limit gets (request id 0, as the
/// accept loop's): peers take it for "nothing was read".
fn too_many_connections(shard: &Shard) -> Vec<u8> {
    shard.connection_refusal("too many connections: this shard's are taken (past its limit, only members are admitted)")
}

/// Serves one connection until the client closes it, a frame is bad, a
/// write fails, or the node shuts down. The accept loop counted it open
/// (its `standing`, made at accept, so that connections accepted in one go
/// are counted against the limit before any of them runs); dropping
/// `standing` when this ends takes it off the count.
pub(super) async fn serve(shard: Rc<Shard>, sock: Socket, standing: Standing) {
    let sock = Rc::new(sock);
    let out = Rc::new(Outbox::default());
    let writer_task = {
        let (out, shard, writer) = (out.clone(), shard.clone(), sock.clone());
        glommio::spawn_local(async move {
            loop {
                let g = out.changed.generation();
                let batch = std::mem::take(&mut *out.buf.borrow_mut());
                if !batch.is_empty() {
                    let n = out.queued.replace(0);
                    out.writing.set(true);
                    let res = writer.write_all(&batch).await;
                    out.writing.set(false);
                    if res.is_err() {
                        out.broken.set(true);
                        out.changed.notify_all();
                        return;
                    }
                    out.written(&shard, n);
                    out.changed.notify_all();
                    // Give the emptied buffer back to be refilled.
                    let mut b = batch;
                    b.clear();
                    let mut cur = out.buf.borrow_mut();
                    if cur.is_empty() && cur.capacity() < b.capacity() && b.capacity() <= KEEP_BUFFER {
                        *cur = b;
                    }
                    continue;
                }
                if out.closing.get() && out.in_flight.get() == 0 {
                    writer.shutdown_write();
                    return;
                }
                out.changed.wait(g).await;
            }
        })
    };
    let mut buf = vec![0u8; FIRST_READ];
    let (mut start, mut end) = (0usize, 0usize);
    // Bytes of an oversized frame's body still to be read and dropped (or
    // of a sealed frame's tag, once it is checked).
    let mut skip = 0usize;
    // A member connection that proved the cluster secret: every frame
    // after its AUTH is sealed, and opened here before anything reads it.
    let mut opener: Option<Opener> = None;
    // The connection closes for a frame left unfinished
    // (`frame_timeout_ms`).
    let mut stalled = false;
    // When the last read ended: the frames it completed arrived then, and
    // their deadlines count from it. Whether the reader has waited since
    // (its client not reading its replies, `room_for_one`): only then can
    // a frame's deadline have passed before it starts, so only then is
    // the clock read for each frame.
    let mut read_at = std::time::Instant::now();
    let mut waited = false;
    'read: loop {
        // Frame and start every whole request in the buffer, then send the
        // replies that are ready.
        out.reader_sends.set(true);
        loop {
            if skip > 0 {
                let n = skip.min(end - start);
                start += n;
                skip -= n;
                if skip > 0 {
                    break;
                }
            }
            // In the members' reserve, a frame that cannot be a HELLO (or,
            // with a cluster secret, the AUTH after it) is refused at its
            // header, before its body is read into memory.
            if standing.provisional.get() {
                if let Some(h) = buf[start..end].first_chunk::<HEADER_LEN>() {
                    let opening = matches!(crate::wire::peek_opcode(h), Some(op::HELLO | op::AUTH));
                    if !opening || crate::wire::declared_frame_len(h) > HEADER_LEN + MAX_OPENING_BODY {
                        out.reply(&too_many_connections(&shard));
                        break 'read;
                    }
                }
            }
            // A sealed connection's frames are read whole up to the
            // protocol's limit, and opened before this node's limit is
            // looked at: a frame skipped unread would be answered, and
            // counted in the sequence, on a header no one checked (found
            // by a review: on the way, a frame could be dropped or replaced
            // by one over the limit, unseen).
            let framed = match opener {
                Some(_) => crate::wire::split_sealed_frame(&buf[start..end]),
                None => split_frame(&buf[start..end], shard.max_body(&buf[start..end])),
            };
            match framed {
                Ok(Some((header, total))) => {
                    let (header, total) = match opener.as_mut() {
                        None => (header, total),
                        Some(o) => {
                            let Ok(len) = o.open(&mut buf[start..start + total]) else {
                                seal_refused(&shard, &out, "a frame did not open");
                                break 'read;
                            };
                            // The tag is skipped after the frame.
                            skip = total - len;
                            let max = shard.max_body(&buf[start..start + len]);
                            let header = header.opened();
                            if header.body_len as usize > max {
                                // Opened, and over this node's limit:
                                // answered as an unsealed one is, and the
                                // connection goes on.
                                if out.room_for_one(&sock, &shard).await.is_none() {
                                    break 'read;
                                }
                                let h = buf[start..start + HEADER_LEN].first_chunk().expect("a header was read");
                                out.reply(&shard.oversized_frame_reply(h, header.body_len as usize, max));
                                start += len;
                                continue;
                            }
                            (header, len)
                        }
                    };
                    if let Some(why) = standing.opening_refuses(header.opcode, out.in_flight.get()) {
                        bump(&shard.counters.auth_failures, 1);
                        out.reply(&shard.error_frame(header.request_id, ErrorCode::Unauthenticated, why));
                        break 'read;
                    }
                    let body = &buf[start + HEADER_LEN..start + total];
                    // A HELLO is the connection's, answered here (members
                    // count apart from clients); in the members' reserve
                    // it must come first.
                    // (A HELLO that does not decode goes the way of any
                    // malformed request.)
                    let hello = match header.opcode {
                        op::HELLO => match Request::decode_with(&header, body) {
                            Ok((Request::Hello { member }, _)) => Some(member),
                            _ => None,
                        },
                        _ => None,
                    };
                    // A provisional connection's one HELLO must name a
                    // member, and with a secret its one AUTH must follow
                    // (judged where it is decoded, `screen`). More HELLOs
                    // each got a reply and a new challenge: a sender that
                    // read none stopped the reader on its replies, where
                    // the deadline is not checked, and kept its place for
                    // good (found by a review).
                    let names_member = hello.is_some_and(|name| shard.is_member(name));
                    if standing.provisional.get() && !standing.may_open(names_member, header.opcode == op::AUTH) {
                        out.reply(&too_many_connections(&shard));
                        break 'read;
                    }
                    match out.room_for_one(&sock, &shard).await {
                        Some(w) => waited |= w,
                        None => break 'read,
                    }
                    if waited && header.deadline().is_some_and(|budget| read_at.elapsed() > budget) {
                        // Its deadline counts from its arrival: counted
                        // from here, a request that waited behind unread
                        // replies would run for a client that had given
                        // up on it.
                        out.reply(&shard.deadline_exceeded(header.request_id));
                        start += total;
                        continue;
                    }
                    if let Some(name) = hello {
                        out.reply(&standing.hello(header.request_id, name));
                        start += total;
                        continue;
                    }
                    if shard.is_shutting_down() {
                        // A stop finishes what has started; a request
                        // only buffered is refused, retryably. Running
                        // every buffered frame let a peer that kept
                        // sending hold a stop past 10 s.
                        out.reply(&shard.error_frame(header.request_id, ErrorCode::ShuttingDown, SHUTTING_DOWN));
                        start += total;
                        continue;
                    }
                    let owner = match Request::decode_with(&header, body) {
                        Ok((req, _)) => {
                            if let Some(screened) = standing.screen(header.request_id, &req) {
                                match screened {
                                    Screened::Refused(reply) => out.reply(&reply),
                                    Screened::Closing(reply) => {
                                        out.reply(&reply);
                                        break 'read;
                                    }
                                    // The answer goes out unsealed; what
                                    // follows it, both ways, is sealed.
                                    Screened::Proven(reply, session) => {
                                        out.reply(&reply);
                                        let (sealer, o) = session.responder();
                                        *out.sealer.borrow_mut() = Some(sealer);
                                        opener = Some(o);
                                    }
                                }
                                start += total;
                                continue;
                            }
                            if let Some(reply) =
                                standing.named.get().then(|| shard.misrouted_relay(header.request_id, &req)).flatten()
                            {
                                out.reply(&reply);
                                start += total;
                                continue;
                            }
                            let owner = req.key().map_or(shard.id, |k| shard.owner(k));
                            match out.push_now(|buf| shard.answer_now(&header, &req, owner, buf)) {
                                Answer::No => owner,
                                Answer::Now => {
                                    start += total;
                                    continue;
                                }
                                Answer::Settle(pending, reply) => {
                                    // A write appended, or a GET of a version
                                    // not yet durable: answered once it settles.
                                    out.start();
                                    hold(&shard, &out, header.request_id, pending, reply);
                                    start += total;
                                    continue;
                                }
                            }
                        }
                        Err(e) => {
                            let reply = shard.request_error_frame(header.request_id, &e);
                            out.reply(&reply);
                            if !e.keeps_connection() {
                                tracing::debug!(error = %e, "closing a connection after a malformed request");
                                break 'read;
                            }
                            start += total;
                            continue;
                        }
                    };
                    let frame = buf[start..start + total].to_vec();
                    start += total;
                    out.start();
                    let mut fut = Box::pin(shard.clone().dispatch(header, frame, owner, read_at));
                    // Most requests complete without waiting (cache hits,
                    // buffered writes): answer those without a task.
                    match poll_once(&mut fut).await {
                        Some(reply) => out.push(&reply),
                        None => out.push_later(&shard, fut),
                    }
                }
                Ok(None) => break,
                // Over this node's limit but within the protocol's: the
                // frame's end is known, so its body is read and dropped
                // as it arrives (never held), the request gets an error
                // reply, and the connection goes on. Closing at once would
                // leave the client writing into a reset connection, with
                // a broken pipe for an answer instead of the reason.
                Err(WireError::FrameTooLarge { len, max }) if len <= MAX_BODY_LEN => {
                    // Within the opening exchange's rules too: after a
                    // challenge, a frame over the limit is no AUTH (found by
                    // a review: answered, it let the AUTH follow another
                    // frame).
                    let h: &[u8; HEADER_LEN] = buf[start..start + HEADER_LEN].try_into().expect("a header was read");
                    let opcode = crate::wire::peek_opcode(h).unwrap_or(0);
                    if let Some(why) = standing.opening_refuses(opcode, out.in_flight.get()) {
                        bump(&shard.counters.auth_failures, 1);
                        let id = crate::wire::peek_request_id(h).unwrap_or(0);
                        out.reply(&shard.error_frame(id, ErrorCode::Unauthenticated, why));
                        break 'read;
                    }
                    // Its error reply is owed like any reply: the same
                    // bound on what a client that does not read can pile up.
                    if out.room_for_one(&sock, &shard).await.is_none() {
                        break 'read;
                    }
                    let header: &[u8; HEADER_LEN] =
                        buf[start..start + HEADER_LEN].try_into().expect("a header was read");
                    out.reply(&shard.oversized_frame_reply(header, len, max));
                    start += HEADER_LEN;
                    skip = len;
                }
                // On a sealed connection a header that does not frame is
                // refused as a frame that does not open (found by a review:
                // answered with its own id).
                Err(e) if opener.is_some() => {
                    seal_refused(&shard, &out, &e.to_string());
                    break 'read;
                }
                Err(e) => {
                    let header: [u8; HEADER_LEN] =
                        buf[start..start + HEADER_LEN].try_into().expect("a header was read");
                    out.reply(&decode_error_frame(&shard, &header, &e));
                    tracing::debug!(error = %e, "closing a connection after a bad frame");
                    break 'read;
                }
            }
        }
        out.send_now(&sock, &shard);
        if out.broken.get() || shard.is_shutting_down() {
            break;
        }
        make_room(&mut buf, &mut start, &mut end);
        // A frame begun and not finished (or an oversized body being
        // skipped) may wait for its next byte only so long.
        let stall = shard.frame_timeout.filter(|_| end > start || skip > 0);
        let stop = async {
            if standing.provisional.get() {
                // One in the members' reserve that names none in time is
                // closed, as on a stop.
                let left = standing.deadline.saturating_duration_since(std::time::Instant::now());
                futures_lite::future::or(shard.shutdown_requested(), glommio::timer::sleep(left)).await;
            } else {
                shard.shutdown_requested().await;
            }
            Woke::Stop
        };
        let stalling = async {
            match stall {
                Some(wait) => glommio::timer::sleep(wait).await,
                None => std::future::pending().await,
            }
            Woke::Stalled
        };
        let read = async { Woke::Read(sock.read(&mut buf[end..]).await) };
        match futures_lite::future::or(read, futures_lite::future::or(stop, stalling)).await {
            Woke::Read(Ok(0)) | Woke::Stop => break,
            Woke::Read(Ok(n)) => {
                end += n;
                (read_at, waited) = (std::time::Instant::now(), false);
                // Not on a sealed connection: its frames are read only once
                // opened, and opening moves its sequence on.
                if sock.in_busy_round() && opener.is_none() {
                    prefetch(&shard, &buf[start..end]).await;
                }
            }
            Woke::Read(Err(e)) => {
                tracing::debug!(error = %e, "connection read failed");
                break;
            }
            Woke::Stalled => {
                bump(&shard.counters.stalled_frames, 1);
                let message = format!(
                    "a frame begun on this connection stayed unfinished, nothing sent, for {} ms (frame_timeout_ms): \
                     closing the connection",
                    stall.unwrap_or_default().as_millis()
                );
                out.reply(&shard.error_frame(0, ErrorCode::DeadlineExceeded, &message));
                out.send_now(&sock, &shard);
                tracing::debug!("closing a connection whose frame stalled");
                stalled = true;
                break;
            }
        }
    }
    // Let in-flight requests finish and the writer send their replies.
    out.reader_sends.set(false);
    out.closing.set(true);
    out.changed.notify_all();
    drop(buf);
    match shard.frame_timeout.filter(|_| stalled) {
        None => writer_task.await,
        // A client that stalled its frame may read nothing either: its
        // replies get as long as the frame did, then the socket is closed.
        Some(wait) => futures_lite::future::or(writer_task, glommio::timer::sleep(wait)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ANY_SHARD;

    /// The settle queue stays in log order: a GET of a record earlier in
    /// the log than held writes is settled before them, not behind a
    /// later group commit than its own; writes keep their order.
    #[test]
    fn a_held_get_goes_before_the_writes_after_its_record() {
        let out = Rc::new(Outbox::default());
        let held =
            |id, end| Held { out: out.clone(), id, pending: PendingWrite::ending_at(end), reply: HeldReply::new() };
        let mut queue = std::collections::VecDeque::new();
        for (id, end) in [(1, (0, 100)), (2, (0, 200)), (3, (1, 50)), (4, (0, 150)), (5, (0, 200)), (6, (1, 60))] {
            in_log_order(&mut queue, held(id, end));
        }
        let ids: Vec<u64> = queue.iter().map(|h| h.id).collect();
        // 4 (a GET of a record at 150) before 2; 5 (a GET of the record 2
        // wrote) after 2, not before it.
        assert_eq!(ids, [1, 4, 2, 5, 3, 6]);
    }

    #[test]
    fn the_read_buffer_grows_with_what_arrives_not_with_what_a_header_declares() {
        let value = vec![9u8; 3 * 1024 * 1024];
        let mut frame = Vec::new();
        Request::Put { key: b"k", context: b"", value: &value }.encode(&mut frame, 1, ANY_SHARD, 0);
        let mut buf = vec![0u8; READ_CHUNK];
        // The header alone: no room is made for the declared body.
        let (mut start, mut end) = (0, HEADER_LEN);
        buf[..end].copy_from_slice(&frame[..end]);
        make_room(&mut buf, &mut start, &mut end);
        assert!(buf.len() <= READ_CHUNK + HEADER_LEN, "{} bytes for a header", buf.len());
        // Then the body as fast as the buffer takes it: at most about
        // twice what arrived, and the whole frame at the end.
        while end < frame.len() {
            let n = (buf.len() - end).min(frame.len() - end);
            buf[end..end + n].copy_from_slice(&frame[end..end + n]);
            end += n;
            make_room(&mut buf, &mut start, &mut end);
            assert!(buf.len() <= (2 * end).max(end + READ_CHUNK), "{} bytes held for {end} read", buf.len());
        }
        assert_eq!(&buf[..end], &frame[..]);
        assert_eq!(buf.len(), frame.len().max(end + 1));
        // Consumed: the big buffer is given back.
        let (mut big, mut start, mut end) = (buf.clone(), end, end);
        make_room(&mut buf, &mut start, &mut end);
        assert_eq!(buf.len(), READ_CHUNK);
        // Also when the same read brought the start of the next frame (a
        // client that pipelines seldom leaves a read ending on a frame's
        // end; found by a review), which moves to the front.
        let mut next = Vec::new();
        Request::Get { key: b"k" }.encode(&mut next, 2, ANY_SHARD, 0);
        let at = frame.len();
        big.resize(at + 10, 0);
        big[at..].copy_from_slice(&next[..10]);
        let (mut start, mut end) = (at, at + 10);
        make_room(&mut big, &mut start, &mut end);
        assert_eq!((big.len(), start, end), (READ_CHUNK, 0, 10));
        assert_eq!(&big[..10], &next[..10]);
    }

    /// Found by a review: every connection took a `READ_CHUNK` buffer at
    /// once, so idle clients held 64 KiB each. A connection starts at
    /// `FIRST_READ` and keeps it while reads leave room; a read that fills
    /// it (a client that pipelines) grows it to `READ_CHUNK`.
    #[test]
    fn the_read_buffer_starts_small_and_grows_when_reads_fill_it() {
        let mut get = Vec::new();
        Request::Get { key: b"k" }.encode(&mut get, 1, ANY_SHARD, 0);
        let mut buf = vec![0u8; FIRST_READ];
        let (mut start, mut end) = (0, 0);
        for _ in 0..100 {
            // One request a read, consumed whole.
            make_room(&mut buf, &mut start, &mut end);
            buf[end..end + get.len()].copy_from_slice(&get);
            end += get.len();
            start = end;
        }
        make_room(&mut buf, &mut start, &mut end);
        assert_eq!(buf.len(), FIRST_READ, "one request at a time keeps it small");
        // A pipeline fills it: part of a frame left over.
        let (mut start, mut end) = (FIRST_READ - 10, FIRST_READ);
        make_room(&mut buf, &mut start, &mut end);
        assert_eq!((start, end), (0, 10));
        assert_eq!(buf.len(), READ_CHUNK, "grown");
    }
}
