//! One shard's connections to the shards of the other nodes of its
//! cluster: replica reads and writes, and client requests it forwards to
//! a key's coordinator.
//!
//! Owns: two connections per (peer node, peer shard), opened on first use:
//! one for replica messages, one for the client requests it relays
//! ([`Lane`]);
//! each peer's shard ports (learned with a PING to its shard 0); the
//! requests waiting for their replies; and the batching of outgoing
//! frames.
//!
//! Batching: frames queued on one connection while the shard runs other
//! tasks leave together when the connection's writer task runs next, in
//! one write per 64 KiB run ([`crate::wire::WRITE_RUN`]), so the replica messages of
//! every request that became ready in the same scheduling tick share a
//! write. `replica_frames / replica_writes` in STATS shows the ratio.
//!
//! Invariant: a call always ends by its deadline: with the reply, or with
//! an error when the peer is unreachable, the connection breaks, or the
//! deadline passes. A peer that refused a connection is not tried again
//! for [`RETRY_AFTER`], so a dead node costs its callers nothing but an
//! immediate error. Frames carry the time left as their deadline, so the
//! receiver drops work that is already too late; a frame whose deadline
//! passes while it waits in the queue is dropped unsent.
//!
//! Backpressure: a peer that stops reading (a hung or SIGSTOPped process)
//! fills its socket, and its connection's writer blocks. The bytes queued
//! on one connection (waiting, plus the batch being written) are capped at
//! [`MAX_QUEUED_BYTES`]: past it, expired frames are dropped from the
//! queue, and if it is still full a new call fails at once as unreachable
//! (`queue_full` in STATS), so its coordinator counts that replica out
//! instead of waiting, and memory stays bounded. A write that makes no
//! progress for [`WRITE_STALL_TIMEOUT`] closes the connection (its calls
//! fail) and marks the peer down for [`RETRY_AFTER`], as a refused
//! connection does.
//!
//! Cluster secret: a shard with one opens each connection with a HELLO
//! and the AUTH that answers the HELLO reply's challenge, each awaited
//! before any call's frame is written (the peer refuses replica messages
//! until the AUTH is taken), within [`HANDSHAKE_TIMEOUT`]; the AUTH reply's
//! own proof is checked too, so an impostor at a member's address is never
//! sent a call. A peer that sends no challenge (no secret; taken only with
//! `accept_unauthenticated`), refuses the proof, or fails its own, fails
//! the connection's calls with the reason, and is not dialed again for
//! [`RETRY_AFTER`], as a peer whose connection failed.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::bump;
use super::front::Front;
use crate::auth::{ClusterKeys, Sealer, Side};
use crate::core::partition::shard_of;
use crate::core::ring::{Member, MemberIdx};
use crate::notify::Notify;
use crate::wire::{
    decode_reply_frame, split_frame, ErrorCode, Quorum, Request, Response, StampedRun, HEADER_LEN, MAX_BODY_LEN,
};

/// How long a HELLO may wait in a new connection's queue before it is
/// dropped unsent (with the rest of what expired): as long as a connect
/// may take, and then some.
const HELLO_LIFETIME: Duration = Duration::from_secs(2);

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a peer whose connection failed is considered down before a
/// call tries to connect again.
pub const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Most bytes queued on one peer connection (frames waiting for the writer
/// plus the batch it is writing) before new calls on it are refused; a
/// frame is taken while the queue is under the cap, so one frame of any
/// size always fits, and a connection holds at most this plus one frame
/// ([`MAX_BODY_LEN`]). A healthy peer drains 4 MiB in milliseconds (a
/// group of replica puts of one tick is far less), so a queue this long
/// means the peer has stopped reading; with the socket buffers it bounds
/// what a hung peer costs each shard per connection to ~15 MiB (two
/// connections per peer shard, [`Lane`]) instead of all the writes of a
/// request deadline.
pub const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// How long one write to a peer may make no progress (not even
/// [`WRITE_CHUNK`] bytes) before the connection is closed. As long as the
/// default quorum timeout: by then every frame of the batch has expired
/// for a caller that set no deadline.
const WRITE_STALL_TIMEOUT: Duration = super::coordinate::DEFAULT_QUORUM_TIMEOUT;
/// The writer hands a batch to the socket in pieces of at most this many
/// bytes, each bounded by [`WRITE_STALL_TIMEOUT`].
const WRITE_CHUNK: usize = 256 * 1024;

/// Why a call to a peer got no reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The request was never sent (the peer is down, its connection could
    /// not be made or is full): another replica may be asked instead.
    #[error("peer {0} is unreachable: {1}")]
    Unreachable(String, String),
    /// The connection failed after the request was handed to the socket:
    /// the peer may have run it. A write must not then be sent elsewhere
    /// (a second coordinator would make a second version of it).
    #[error("the connection to peer {0} failed after the request was sent: {1}")]
    Lost(String, String),
    #[error("no reply from peer {0} before the deadline")]
    Timeout(String),
    #[error("peer {0} sent a bad reply: {1}")]
    BadReply(String, String),
}

/// Counters of a shard's peer traffic, reported by STATS.
#[derive(Default, Serialize)]
pub struct PeerCounters {
    /// Frames sent to peers, and the writes that carried them (one per
    /// 64 KiB run of a batch, `WRITE_RUN`, or per range of a run around a
    /// frame left out because its time was up; a range over `WRITE_CHUNK`,
    /// one large frame, is handed to the socket in pieces).
    pub replica_frames: Cell<u64>,
    pub replica_writes: Cell<u64>,
    pub connects: Cell<u64>,
    pub connect_failures: Cell<u64>,
    /// Calls that ended without a reply (unreachable, broken, deadline).
    pub call_failures: Cell<u64>,
    /// Frames dropped unsent because their deadline passed: found so when
    /// their run was about to be written, or when a full queue made room.
    pub expired_unsent: Cell<u64>,
    /// Calls refused at once because their connection's queue was full
    /// ([`MAX_QUEUED_BYTES`]).
    pub queue_full: Cell<u64>,
    /// Connections closed because a write made no progress for
    /// [`WRITE_STALL_TIMEOUT`].
    pub write_stalls: Cell<u64>,
    /// Times a member's ring, or N, R or W, was found to differ from this
    /// node's: their cluster files differ. Asked (RING) once for the
    /// node, by the shard that first calls the member, again after any
    /// shard's connection to it failed, and at the first call
    /// `RING_ASK_RETRY` after an ask that got no ring. (A member that restarts and takes the next connection at once
    /// is not asked again.)
    pub rings_differ: Cell<u64>,
    /// Members' rings compared with this node's (`rings_differ` counts
    /// the ones that differed).
    pub rings_compared: Cell<u64>,
    /// Connections whose opening exchange (cluster secret) failed: the
    /// member refused the HELLO or the AUTH, sent no challenge (it has no
    /// secret), answered the AUTH with a proof that is wrong, sent a frame
    /// that is not a reply to them, closed the connection, or answered
    /// nothing in time; or the write or read failed, or there were no
    /// random bytes for the nonce.
    pub handshake_failures: Cell<u64>,
    /// Connections closed for a reply that failed its seal: unsealed after
    /// the AUTH (a member of an older build), or whose tag did not match
    /// (changed, replayed, reordered or injected on the way).
    pub seal_failures: Cell<u64>,
    /// With `accept_unauthenticated`: connections to members that sent no
    /// challenge (no secret), taken unproven.
    pub unproven_peers: Cell<u64>,
}

/// Request ids of the frames that open a connection: its HELLO and (with a
/// cluster secret) its AUTH. Calls take ids from [`FIRST_CALL_ID`] on.
const HELLO_ID: u64 = 1;
const AUTH_ID: u64 = 2;
const FIRST_CALL_ID: u64 = 3;

/// How long the HELLO and AUTH of a new connection may take to be
/// answered (a shard with a cluster secret waits for both).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest body of a reply to a HELLO or an AUTH the dialer reads: an
/// error with the longest message, and more than a challenge or a proof
/// (a peer that declares more is no member; the protocol's 8 MiB would
/// be read into memory first).
const OPENING_MAX_BODY: usize = 4 + crate::wire::MAX_ERROR_MESSAGE;
const _: () = assert!(crate::wire::PROOF_LEN <= OPENING_MAX_BODY && crate::wire::CHALLENGE_LEN <= OPENING_MAX_BODY);

/// A peer connection's read buffer: the bytes read are `buf[start..end]`.
/// The opening exchange reads into it, and the reader goes on with it.
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox { buf: vec![0u8; super::conn::READ_CHUNK], start: 0, end: 0 }
    }

    /// The next whole frame's header and length, if one is read, with at
    /// most `max_body` bytes of body.
    fn next_frame(&self, max_body: usize) -> Result<Option<(crate::wire::Header, usize)>, crate::wire::WireError> {
        split_frame(&self.buf[self.start..self.end], max_body)
    }

    /// [`Self::next_frame`] on a sealed connection
    /// ([`crate::wire::split_sealed_frame`]).
    fn next_sealed_frame(&self) -> Result<Option<(crate::wire::Header, usize)>, crate::wire::WireError> {
        crate::wire::split_sealed_frame(&self.buf[self.start..self.end])
    }

    /// The frame of `total` bytes at the front (from [`Self::next_frame`]).
    fn front(&self, total: usize) -> &[u8] {
        &self.buf[self.start..self.start + total]
    }

    /// Room for the next read, which goes to `buf[end..]`.
    fn make_room(&mut self) {
        super::conn::make_room(&mut self.buf, &mut self.start, &mut self.end);
    }
}

/// Why calls fail on a connection its member refused at its connection
/// limit.
const REFUSED: &str = "it refused the connection (at its connection limit)";

/// Why a connection's opening exchange failed.
enum Shake {
    /// The peer refused the whole connection at its connection limit.
    Refused,
    Failed(String),
}

/// How long the ask for a member's ring ([`Peers::compare_ring`]) may take.
const RING_ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after an ask that got no ring the next call to the member asks
/// again: at most one RING a member this often while it answers none.
const RING_ASK_RETRY: Duration = Duration::from_secs(5);

/// Where a call's reply frame lands.
type Slot = crate::notify::Slot<Result<Vec<u8>, PeerError>>;

/// One connection to one shard of a peer.
struct PeerConn {
    name: String,
    /// Frames waiting for the writer.
    out: RefCell<OutQueue>,
    pending: RefCell<HashMap<u64, Rc<Slot>>>,
    next_id: Cell<u64>,
    /// The highest request id the writer has taken for the socket (ids are
    /// queued in order and taken all at once): a call at or under it may
    /// have reached the peer when the connection fails.
    sent_upto: Cell<u64>,
    /// The connection failed; no more frames are accepted.
    dead: Cell<bool>,
    /// Fires when a frame is queued (the writer waits on it) or the
    /// connection dies.
    queued: Notify,
    /// Fires when the connection dies (the reader waits on it beside its
    /// socket, so queued frames do not wake it).
    died: Notify,
}

impl PeerConn {
    /// Fails every waiting call and refuses new ones.
    fn kill(&self, why: &str) {
        self.dead.set(true);
        let sent = self.sent_upto.get();
        for (id, slot) in self.pending.borrow_mut().drain() {
            let (name, why) = (self.name.clone(), why.to_string());
            slot.set(Err(if id <= sent { PeerError::Lost(name, why) } else { PeerError::Unreachable(name, why) }));
        }
        self.queued.notify_all();
        self.died.notify_all();
    }
}

/// Whether a reply frame with request id 0 is a node's refusal of the
/// whole connection at its connection limit (`Shard::connection_refusal`):
/// one `Overloaded` error, sent before it runs any request. Calls never
/// use id 0.
fn refused_at_accept(opcode: u8, body: &[u8]) -> bool {
    matches!(Response::decode(opcode, body), Ok(Response::Error { code: ErrorCode::Overloaded, .. }))
}

/// The frames of `batch` (ending at the offsets in `spans`) whose deadline
/// is still ahead, with their spans in the result. Copies only when one
/// expired.
fn drop_expired(batch: Vec<u8>, spans: Vec<(usize, Instant)>, now: Instant) -> (Vec<u8>, Vec<(usize, Instant)>) {
    if spans.iter().all(|&(_, d)| d > now) {
        return (batch, spans);
    }
    let mut kept = Vec::with_capacity(batch.len());
    let mut kept_spans = Vec::with_capacity(spans.len());
    let mut start = 0;
    for (end, deadline) in spans {
        if deadline > now {
            kept.extend_from_slice(&batch[start..end]);
            kept_spans.push((kept.len(), deadline));
        }
        start = end;
    }
    (kept, kept_spans)
}

/// Where each frame of a batch ends, and when its caller stops waiting.
type Spans = Vec<(usize, Instant)>;

/// The outgoing frames of one connection, capped at [`MAX_QUEUED_BYTES`].
#[derive(Default)]
struct OutQueue {
    /// Frames waiting for the writer.
    buf: Vec<u8>,
    /// Where each frame in `buf` ends, and its deadline: a frame whose
    /// caller has stopped waiting is dropped instead of sent late.
    spans: Vec<(usize, Instant)>,
    /// Bytes of the batch the writer is writing now.
    writing: usize,
}

impl OutQueue {
    /// Bytes this connection holds for sending.
    fn queued(&self) -> usize {
        self.buf.len() + self.writing
    }

    /// Whether a new frame may be queued at `now`: while under the cap;
    /// at the cap, after dropping the frames whose deadline passed, if
    /// that brought it under. Also returns how many frames were dropped.
    fn admit(&mut self, now: Instant) -> (bool, u64) {
        if self.queued() < MAX_QUEUED_BYTES {
            return (true, 0);
        }
        let before = self.spans.len();
        let (buf, spans) = drop_expired(std::mem::take(&mut self.buf), std::mem::take(&mut self.spans), now);
        (self.buf, self.spans) = (buf, spans);
        let dropped = (before - self.spans.len()) as u64;
        (self.queued() < MAX_QUEUED_BYTES, dropped)
    }

    /// Queues the frame `encode` appends, to be dropped unsent after
    /// `deadline`.
    fn push(&mut self, encode: impl FnOnce(&mut Vec<u8>), deadline: Instant) {
        encode(&mut self.buf);
        self.spans.push((self.buf.len(), deadline));
    }

    /// Takes every queued frame for the writer (it then counts as being
    /// written until [`Self::written`]): the bytes, and where each frame
    /// ends and its deadline. Those whose time is up are left out as their
    /// run is written ([`stamp_run`]).
    fn take(&mut self) -> (Vec<u8>, Spans) {
        let batch = std::mem::take(&mut self.buf);
        self.writing = batch.len();
        (batch, std::mem::take(&mut self.spans))
    }

    /// The writer finished (or gave up) the batch it took.
    fn written(&mut self) {
        self.writing = 0;
    }
}

/// Which of a shard's two connections to a peer shard a call takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lane {
    /// Replica messages: the peer answers them from its own store, waiting
    /// on no other member.
    Replica,
    /// Client requests relayed to a replica, which coordinates them and so
    /// waits on replica messages of its own. On a connection of their
    /// own: sharing one with replica messages, a receiver whose reader
    /// stopped at its bound on running requests (full of relayed requests)
    /// left the replica messages behind them unread, and with members
    /// relaying to each other in a cycle every relayed request waited on
    /// another stopped reader until its deadline (found by reviews; the
    /// relayed requests were then left out of the bound, which any client
    /// could claim to be).
    Forward,
}

/// A peer connection's key: the member, its shard, and the lane.
type ConnKey = (MemberIdx, u16, Lane);

/// A shard's view of its peers.
pub struct Peers {
    /// This node, named by the HELLO that opens every connection.
    me: MemberIdx,
    /// The ring's members (shard 0's address and the name of each).
    members: Vec<Member>,
    partitions: u32,
    /// Each peer's shard ports, learned by PING.
    ports: RefCell<HashMap<MemberIdx, Rc<Vec<u16>>>>,
    conns: RefCell<HashMap<ConnKey, Rc<PeerConn>>>,
    /// Peers whose last connection attempt failed, until when they are
    /// not tried again.
    down_until: RefCell<HashMap<MemberIdx, Instant>>,
    /// Connections a member refused at its connection limit, until when
    /// they are not dialed again. Per connection, not per member: the
    /// member still serves the connections it has (found by a review:
    /// marking the member down for a refused relay connection failed the
    /// replica calls on its open one).
    refused_until: RefCell<HashMap<ConnKey, Instant>>,
    /// This node's ring as a RING reply carries it, and its N, R and W:
    /// what each member's answer is compared with ([`Self::compare_ring`]).
    ring: (Vec<u8>, [u8; 3]),
    /// By member: whether this node (any of its shards) has asked for its
    /// ring (or is asking), until the ask fails or the member is found
    /// restarted (the node's, shared by its shards: `ShardSetup`). A flag per
    /// member, not a set: every keyed call looks at it.
    ring_asked: Arc<[AtomicBool]>,
    /// The shard's socket readiness (peer connections are its sockets too).
    front: Rc<Front>,
    /// The cluster secret's keys: with them, each connection proves the
    /// secret before its calls are written.
    keys: Option<Rc<ClusterKeys>>,
    /// The last reason a handshake failed that was logged as a warning: a
    /// member with another secret fails every redial, so a reason is
    /// warned of once, until another one comes (a timeout first left a
    /// later mismatch unlogged; found by a review).
    warned_handshake: RefCell<String>,
    pub counters: PeerCounters,
}

impl Peers {
    pub(super) fn new(
        cluster: &super::cluster::Cluster,
        front: Rc<Front>,
        keys: Option<Rc<ClusterKeys>>,
        ring_asked: Arc<[AtomicBool]>,
    ) -> Peers {
        let ring = &cluster.ring;
        Peers {
            me: cluster.me,
            members: ring.members().to_vec(),
            partitions: ring.partitions(),
            ring: (cluster.ring_bytes.clone(), cluster.quorum_bytes()),
            ring_asked,
            ports: RefCell::default(),
            conns: RefCell::default(),
            down_until: RefCell::default(),
            refused_until: RefCell::default(),
            front,
            keys,
            warned_handshake: RefCell::default(),
            counters: PeerCounters::default(),
        }
    }

    pub fn name(&self, member: MemberIdx) -> &str {
        &self.members[member as usize].name
    }

    fn fail(&self, e: PeerError) -> PeerError {
        bump(&self.counters.call_failures, 1);
        e
    }

    /// Sends `req` to the shard of `member` that owns the request's key
    /// (shard 0 for a request without one) and returns the reply frame.
    pub async fn call(
        self: &Rc<Self>,
        member: MemberIdx,
        req: &Request<'_>,
        quorum: Quorum,
        deadline: Instant,
    ) -> Result<Vec<u8>, PeerError> {
        let name = || self.name(member).to_string();
        if self.down_until.borrow().get(&member).is_some_and(|&t| Instant::now() < t) {
            return Err(self.fail(PeerError::Unreachable(name(), "its last connection attempt failed".into())));
        }
        let shard = match req.key() {
            None => 0,
            Some(key) => {
                // A PING lost with its connection is not this request
                // lost: this one was never sent.
                let ports = self.ports(member, deadline).await.map_err(|e| match e {
                    PeerError::Lost(peer, why) => PeerError::Unreachable(peer, why),
                    e => e,
                })?;
                shard_of(key, self.partitions, ports.len()) as u16
            }
        };
        let lane = if req.is_quorum_op() { Lane::Forward } else { Lane::Replica };
        let key = (member, shard, lane);
        if self.refused_until.borrow().get(&key).is_some_and(|&t| Instant::now() < t) {
            return Err(self.fail(PeerError::Unreachable(name(), REFUSED.into())));
        }
        let conn = self.conn(key);
        if conn.dead.get() {
            return Err(self.fail(PeerError::Unreachable(name(), "the connection failed".into())));
        }
        let now = Instant::now();
        {
            let (admitted, expired) = conn.out.borrow_mut().admit(now);
            bump(&self.counters.expired_unsent, expired);
            if !admitted {
                bump(&self.counters.queue_full, 1);
                return Err(self.fail(PeerError::Unreachable(
                    name(),
                    format!("it is not reading: over {MAX_QUEUED_BYTES} bytes wait to be sent to it"),
                )));
            }
        }
        let id = conn.next_id.get();
        conn.next_id.set(id + 1);
        // Stamped again as it leaves (`stamp_run`).
        let deadline_us = crate::wire::deadline_us_for(deadline.saturating_duration_since(now));
        conn.out.borrow_mut().push(|out| req.encode_with(out, id, shard, deadline_us, quorum), deadline);
        let slot = Rc::new(Slot::default());
        conn.pending.borrow_mut().insert(id, slot.clone());
        conn.queued.notify_all();
        let wait = async { Some(slot.take().await) };
        let timeout = async {
            glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
            None
        };
        match futures_lite::future::or(wait, timeout).await {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(e)) => Err(self.fail(e)),
            None => {
                conn.pending.borrow_mut().remove(&id);
                Err(self.fail(PeerError::Timeout(name())))
            }
        }
    }

    /// The peer's shard ports, asked once with a PING to its shard 0.
    async fn ports(self: &Rc<Self>, member: MemberIdx, deadline: Instant) -> Result<Rc<Vec<u16>>, PeerError> {
        let known = self.ports.borrow().get(&member).cloned();
        if let Some(ports) = known {
            // Again once an ask that got no ring has waited out its retry.
            self.ask_ring(member);
            return Ok(ports);
        }
        let frame = Box::pin(self.call(member, &Request::Ping, Quorum::default(), deadline)).await?;
        let name = self.name(member).to_string();
        let bad = |why: String| PeerError::BadReply(name.clone(), why);
        match decode_reply_frame(&frame) {
            Ok(Response::Pong(info)) if !info.ports.is_empty() && info.partitions == self.partitions => {
                let ports = Rc::new(info.ports);
                self.ports.borrow_mut().insert(member, ports.clone());
                self.ask_ring(member);
                Ok(ports)
            }
            Ok(Response::Pong(info)) => {
                Err(bad(format!("it has {} partitions, this cluster {}", info.partitions, self.partitions)))
            }
            Ok(other) => Err(bad(format!("unexpected reply to PING: {other:?}"))),
            Err(e) => Err(bad(e.to_string())),
        }
    }

    /// Starts [`Self::compare_ring`] for `member` unless one ran or runs:
    /// apart, with a deadline of its own, so the request that reached the
    /// member waits for none of it (found by a review: it waited for the
    /// RING answer, and failed with a member that did not give one).
    fn ask_ring(self: &Rc<Self>, member: MemberIdx) {
        // Looked at first: every keyed call comes here, and a look leaves
        // the flags' cache line shared between the cores, where a swap
        // would take it each time.
        let asked = &self.ring_asked[member as usize];
        if !asked.load(Relaxed) && !asked.swap(true, Relaxed) {
            let me = self.clone();
            glommio::spawn_local(async move { me.compare_ring(member).await }).detach();
        }
    }

    /// Asks `member` for its ring (RING) when this node first calls it
    /// (and again after a connection to it failed), and says so if it
    /// differs from this node's: their cluster files differ (members, their
    /// order, or N, R, W), and requests relayed between them may be refused
    /// (RingMismatch). It was found only by such refusals, one request at a
    /// time. Best effort: an ask that gets no RING answer (unreachable,
    /// refused, ShuttingDown) says nothing, and is made again at the first
    /// call to the member after [`RING_ASK_RETRY`].
    async fn compare_ring(self: &Rc<Self>, member: MemberIdx) {
        let deadline = Instant::now() + RING_ASK_TIMEOUT;
        let answer = Box::pin(self.call(member, &Request::Ring, Quorum::default(), deadline)).await;
        let ring = answer.ok().and_then(|f| match decode_reply_frame(&f) {
            Ok(Response::Ring { n, r, w, ring }) => Some(([n, r, w], ring.to_vec())),
            _ => None,
        });
        let Some((quorums, ring)) = ring else {
            // Any answer but a ring (found by reviews: an error reply left
            // the member marked asked for good, and then, while its
            // connection stayed up, unasked but never asked again).
            glommio::timer::sleep(RING_ASK_RETRY).await;
            self.ring_asked[member as usize].store(false, Relaxed);
            return;
        };
        bump(&self.counters.rings_compared, 1);
        if ring != self.ring.0 || quorums != self.ring.1 {
            bump(&self.counters.rings_differ, 1);
            tracing::error!(
                peer = self.name(member),
                "this member's ring (or N, R, W) differs from this node's: their cluster files differ \
                 (members, their order, or quorums); requests relayed between them may be refused \
                 (RingMismatch). Give every member the same cluster file"
            );
        }
    }

    /// The connection of `key`, opened if there is none.
    fn conn(self: &Rc<Self>, key: ConnKey) -> Rc<PeerConn> {
        if let Some(c) = self.conns.borrow().get(&key) {
            if !c.dead.get() {
                return c.clone();
            }
        }
        let (member, shard, lane) = key;
        let conn = Rc::new(PeerConn {
            name: format!("{} shard {shard} ({lane:?})", self.name(member)),
            out: RefCell::default(),
            pending: RefCell::default(),
            next_id: Cell::new(FIRST_CALL_ID),
            sent_upto: Cell::new(0),
            dead: Cell::new(false),
            queued: Notify::default(),
            died: Notify::default(),
        });
        // The first frame names this member (HELLO): the peer counts the
        // connection apart from its clients, and takes it into its reserve
        // for members when clients fill its connection limit. Its reply
        // (no caller) is dropped by the reader. With a cluster secret the
        // connection sends it itself, and awaits it ([`Self::handshake`]).
        if self.keys.is_none() {
            let hello = Request::Hello { member: self.members[self.me as usize].name.as_bytes() };
            let hello = |out: &mut Vec<u8>| hello.encode(out, HELLO_ID, shard, 0);
            conn.out.borrow_mut().push(hello, Instant::now() + HELLO_LIFETIME);
        }
        self.conns.borrow_mut().insert(key, conn.clone());
        let mut addr = self.members[member as usize].addr;
        if shard != 0 {
            if let Some(p) = self.ports.borrow().get(&member).and_then(|p| p.get(shard as usize)) {
                addr.set_port(*p);
            }
        }
        glommio::spawn_local(self.clone().run_conn(key, addr, conn.clone())).detach();
        conn
    }

    /// Connects, then writes queued frames and hands replies to their
    /// callers until the connection fails.
    async fn run_conn(self: Rc<Self>, key: ConnKey, addr: SocketAddr, conn: Rc<PeerConn>) {
        let member = key.0;
        let sock = match self.front.connect(addr, CONNECT_TIMEOUT).await {
            Ok(s) => s,
            Err(e) => {
                bump(&self.counters.connect_failures, 1);
                tracing::debug!(peer = %conn.name, %addr, error = %e, "connecting to a peer failed");
                // Its ports may have changed if it restarted (and its
                // cluster file with them: its ring is asked for again).
                self.ports.borrow_mut().remove(&member);
                self.ring_asked[member as usize].store(false, Relaxed);
                self.give_up(key, &conn, &e.to_string());
                return;
            }
        };
        bump(&self.counters.connects, 1);
        let sock = Rc::new(sock);
        let mut inbox = Inbox::new();
        // With a cluster secret, what follows the opening exchange is
        // sealed both ways (unless a lenient member took one that proved
        // nothing).
        let mut session = None;
        if let Some(keys) = &self.keys {
            let shake = self.handshake(keys, member, key.1, &sock, &mut inbox);
            let late = async {
                glommio::timer::sleep(HANDSHAKE_TIMEOUT).await;
                Err(Shake::Failed(format!("no answer to its HELLO and AUTH in {HANDSHAKE_TIMEOUT:?}")))
            };
            match futures_lite::future::or(shake, late).await {
                Ok(s) => session = s,
                Err(Shake::Refused) => {
                    // As the reader does with a refusal (nothing was sent).
                    self.refused(key);
                    self.forget(key, &conn);
                    conn.kill(REFUSED);
                    return;
                }
                Err(Shake::Failed(why)) => {
                    bump(&self.counters.handshake_failures, 1);
                    if *self.warned_handshake.borrow() != why {
                        tracing::warn!(peer = %conn.name, why, "opening a connection to a member failed");
                        why.clone_into(&mut self.warned_handshake.borrow_mut());
                    } else {
                        tracing::debug!(peer = %conn.name, why, "opening a connection to a member failed");
                    }
                    self.give_up(key, &conn, &why);
                    return;
                }
            }
        }
        self.down_until.borrow_mut().remove(&member);
        let (sealer, mut opener) = session.map(crate::auth::Session::dialer).unzip();
        let writer_task = {
            let (conn, peers, writer) = (conn.clone(), self.clone(), sock.clone());
            glommio::spawn_local(async move {
                let mut run = StampedRun::default();
                let mut sealing = sealer.map(|sealer| Sealing { sealer, sealed: Vec::new() });
                loop {
                    let g = conn.queued.generation();
                    if conn.dead.get() {
                        return;
                    }
                    if conn.out.borrow().buf.is_empty() {
                        conn.queued.wait(g).await;
                        continue;
                    }
                    let (mut batch, spans) = conn.out.borrow_mut().take();
                    conn.sent_upto.set(conn.next_id.get() - 1);
                    let result = write_stamped(&writer, &mut batch, &spans, &mut run, sealing.as_mut()).await;
                    conn.out.borrow_mut().written();
                    let written = match result {
                        Ok(written) => {
                            bump(&peers.counters.expired_unsent, written.late);
                            written
                        }
                        Err(WriteError::Stalled) => {
                            bump(&peers.counters.write_stalls, 1);
                            peers.give_up(key, &conn, &format!("it took nothing for {WRITE_STALL_TIMEOUT:?}"));
                            return;
                        }
                        Err(WriteError::Io(e)) => {
                            conn.kill(&format!("write failed: {e}"));
                            return;
                        }
                    };
                    bump(&peers.counters.replica_writes, written.writes);
                    bump(&peers.counters.replica_frames, written.frames);
                }
            })
        };
        let why = 'read: loop {
            loop {
                let framed = match opener {
                    Some(_) => inbox.next_sealed_frame(),
                    None => inbox.next_frame(MAX_BODY_LEN),
                };
                match framed {
                    Ok(Some((h, whole))) => {
                        // A sealed frame is opened before anything reads it:
                        // `total` is the frame without its tag.
                        let (h, total) = match opener.as_mut() {
                            None => (h, whole),
                            Some(o) => match o.open(&mut inbox.buf[inbox.start..inbox.start + whole]) {
                                Ok(len) => (h.opened(), len),
                                Err(e) => break 'read self.seal_failed(&conn, &e.to_string()),
                            },
                        };
                        if h.request_id == 0 && refused_at_accept(h.opcode, &inbox.front(total)[HEADER_LEN..]) {
                            // The peer read none of this connection's
                            // frames: its calls were never taken, and it
                            // is not dialed again for a while (it said it
                            // failed as "may have been taken", and was
                            // redialed at once; found by a review).
                            conn.sent_upto.set(0);
                            self.refused(key);
                            break 'read REFUSED.to_string();
                        }
                        if let Some(slot) = conn.pending.borrow_mut().remove(&h.request_id) {
                            slot.set(Ok(inbox.front(total).to_vec()));
                        }
                        inbox.start += whole;
                    }
                    Ok(None) => break,
                    Err(e) if opener.is_some() => break 'read self.seal_failed(&conn, &e.to_string()),
                    Err(e) => break 'read format!("bad frame: {e}"),
                }
            }
            if conn.dead.get() {
                break "write failed".to_string();
            }
            inbox.make_room();
            // Wake on a failed write too, so the reader does not wait forever.
            let read = futures_lite::future::or(async { Some(sock.read(&mut inbox.buf[inbox.end..]).await) }, async {
                loop {
                    let g = conn.died.generation();
                    if conn.dead.get() {
                        return None;
                    }
                    conn.died.wait(g).await;
                }
            })
            .await;
            match read {
                Some(Ok(0)) => break "the peer closed the connection".to_string(),
                Some(Ok(n)) => inbox.end += n,
                Some(Err(e)) => break format!("read failed: {e}"),
                None => break "write failed".to_string(),
            }
        };
        tracing::debug!(peer = %conn.name, why, "peer connection closed");
        self.forget(key, &conn);
        conn.kill(&why);
        writer_task.await;
    }

    /// Opens `sock`, a connection to `member`'s `shard`, as a member's
    /// with the cluster secret's `keys`: a HELLO, then the AUTH that
    /// answers its reply's challenge, each awaited, and the AUTH reply's
    /// proof checked. A peer that sends no challenge, or whose proof is
    /// wrong, is refused: it does not hold the secret (an impostor at the
    /// member's address, or a member without the secret), and this node
    /// would merge the versions it sends and sign them into contexts
    /// (found by a review, when a peer without a challenge was taken).
    /// Replies are read into `inbox`, as the reader goes on with it.
    ///
    /// Its session (sealing what follows, both ways), or `None` for a
    /// member that sent no challenge, taken only while the cluster turns
    /// its secret on or off.
    async fn handshake(
        &self,
        keys: &ClusterKeys,
        member: MemberIdx,
        shard: u16,
        sock: &super::front::Socket,
        inbox: &mut Inbox,
    ) -> Result<Option<crate::auth::Session>, Shake> {
        let dialer = self.members[self.me as usize].name.as_bytes();
        let mut out = Vec::new();
        Request::Hello { member: dialer }.encode(&mut out, HELLO_ID, shard, 0);
        send_opening(sock, &out).await?;
        let challenge = match read_opening(sock, inbox, HELLO_ID).await? {
            Response::Hello { challenge: Some(c) } => c,
            // Taken only while the cluster turns its secret on or off.
            Response::Hello { challenge: None } if keys.accepts_unauthenticated() => {
                bump(&self.counters.unproven_peers, 1);
                return Ok(None);
            }
            Response::Hello { challenge: None } => {
                let why = "it sent no challenge: it has no cluster secret (every member needs the same \
                           cluster_secret_file)";
                return Err(Shake::Failed(why.into()));
            }
            _ => return Err(Shake::Failed("its HELLO reply was another reply".into())),
        };
        let nonce = crate::auth::challenge().map_err(|e| Shake::Failed(format!("no random bytes: {e}")))?;
        let responder = self.members[member as usize].name.as_bytes();
        let ex = crate::auth::Exchange { challenge: &challenge, nonce: &nonce, dialer, responder };
        out.clear();
        Request::Auth { nonce: &nonce, proof: &keys.proof(Side::Dialer, &ex) }.encode(&mut out, AUTH_ID, shard, 0);
        send_opening(sock, &out).await?;
        match read_opening(sock, inbox, AUTH_ID).await? {
            Response::Auth { proof } if keys.check_answer(&ex, &proof) => Ok(Some(keys.session(&ex))),
            Response::Auth { .. } => Err(Shake::Failed(
                "its answer to AUTH does not prove the cluster secret (is something else at its address?)".into(),
            )),
            _ => Err(Shake::Failed("its AUTH reply was another reply".into())),
        }
    }

    /// A sealed connection's reply that did not open, or did not frame:
    /// counted and warned of; the reader closes the connection for the
    /// reason returned.
    fn seal_failed(&self, conn: &PeerConn, why: &str) -> String {
        bump(&self.counters.seal_failures, 1);
        tracing::warn!(peer = %conn.name, why, "a member's reply failed its seal");
        format!("a reply failed its seal: {why}")
    }

    /// The member refused connection `key` at its connection limit: it is
    /// not dialed again for [`RETRY_AFTER`] (the member still serves the
    /// connections it has).
    fn refused(&self, key: ConnKey) {
        self.refused_until.borrow_mut().insert(key, Instant::now() + RETRY_AFTER);
    }

    /// Gives up on `conn` to a peer that failed it: the peer is not dialed
    /// again for [`RETRY_AFTER`], and the connection's calls fail with `why`.
    fn give_up(&self, key: ConnKey, conn: &Rc<PeerConn>, why: &str) {
        self.down_until.borrow_mut().insert(key.0, Instant::now() + RETRY_AFTER);
        self.forget(key, conn);
        conn.kill(why);
    }

    /// Drops `conn` from the table if it is still the current one.
    fn forget(&self, key: ConnKey, conn: &Rc<PeerConn>) {
        let mut conns = self.conns.borrow_mut();
        if conns.get(&key).is_some_and(|c| Rc::ptr_eq(c, conn)) {
            conns.remove(&key);
        }
    }
}

/// Why a bounded write ended early.
enum WriteError {
    Io(std::io::Error),
    /// No piece of the write went out within [`WRITE_STALL_TIMEOUT`].
    Stalled,
}

/// Writes a frame of a connection's opening exchange.
async fn send_opening(sock: &super::front::Socket, frame: &[u8]) -> Result<(), Shake> {
    write_bounded(sock, frame).await.map_err(|e| match e {
        WriteError::Stalled => Shake::Failed("it took nothing of its HELLO or AUTH".into()),
        WriteError::Io(e) => Shake::Failed(format!("write failed: {e}")),
    })
}

/// Reads the reply to the opening frame with request id `id` (the next
/// whole frame, taken off `inbox`): a refusal at the peer's connection
/// limit, an error reply, and any other frame are failures.
async fn read_opening<'a>(sock: &super::front::Socket, inbox: &'a mut Inbox, id: u64) -> Result<Response<'a>, Shake> {
    let (h, total) = loop {
        match inbox.next_frame(OPENING_MAX_BODY) {
            Ok(Some(frame)) => break frame,
            Ok(None) => {}
            Err(e) => return Err(Shake::Failed(format!("bad frame: {e}"))),
        }
        inbox.make_room();
        match sock.read(&mut inbox.buf[inbox.end..]).await {
            Ok(0) => return Err(Shake::Failed("the peer closed the connection".into())),
            Ok(n) => inbox.end += n,
            Err(e) => return Err(Shake::Failed(format!("read failed: {e}"))),
        }
    };
    inbox.start += total;
    let body = &inbox.buf[inbox.start - total + HEADER_LEN..inbox.start];
    if h.request_id == 0 && refused_at_accept(h.opcode, body) {
        return Err(Shake::Refused);
    }
    match Response::decode(h.opcode, body).map_err(|e| Shake::Failed(format!("bad reply: {e}")))? {
        Response::Error { code, message } => Err(Shake::Failed(format!("it refused: {message} ({code:?})"))),
        _ if h.request_id != id => Err(Shake::Failed(format!("a reply to request {}, not to {id}", h.request_id))),
        reply => Ok(reply),
    }
}

/// Fills `run` with `batch`'s frames (each ending at its `spans` offset)
/// from frame `first` on, each stamped with the time its caller has left
/// at `now` or left out if none is (the run's `ranges` are what to
/// write). Returns the index of the next run's first frame and how many
/// were left out.
fn stamp_run(
    batch: &mut [u8],
    spans: &[(usize, Instant)],
    first: usize,
    now: Instant,
    run: &mut StampedRun,
) -> (usize, u64) {
    run.start();
    let mut at = first.checked_sub(1).map_or(0, |i| spans[i].0);
    let (mut next, mut late) = (first, 0);
    while let Some(&(end, deadline)) = spans.get(next).filter(|&&(end, _)| run.fits(end - at)) {
        if !run.take(batch, at, end, deadline.saturating_duration_since(now)) {
            late += 1;
        }
        (at, next) = (end, next + 1);
    }
    (next, late)
}

/// What [`write_stamped`] wrote of a batch.
struct Written {
    frames: u64,
    /// Frames left out because their time was up.
    late: u64,
    /// Socket writes (one per run, or per range of a run around a late
    /// frame).
    writes: u64,
}

/// Writes the frames of `batch` (ending at the offsets in `spans`) a
/// stamped run at a time ([`stamp_run`], into the writer's reused `run`).
async fn write_stamped(
    sock: &super::front::Socket,
    batch: &mut [u8],
    spans: &[(usize, Instant)],
    run: &mut StampedRun,
    mut sealing: Option<&mut Sealing>,
) -> Result<Written, WriteError> {
    let mut next = 0;
    let mut done = Written { frames: 0, late: 0, writes: 0 };
    while next < spans.len() {
        let first = next;
        let left_out;
        (next, left_out) = stamp_run(batch, spans, first, Instant::now(), run);
        done.late += left_out;
        match sealing.as_deref_mut() {
            None => {
                for &(a, b) in &run.ranges {
                    write_bounded(sock, &batch[a..b]).await?;
                    done.writes += 1;
                }
            }
            // Sealed: each frame kept, stamped, is copied out with its
            // tag, in the order they go out, and the run written at once.
            Some(Sealing { sealer, sealed }) => {
                sealed.clear();
                for &(a, b) in &run.ranges {
                    let mut at = a;
                    while at < b {
                        let end = at
                            + crate::wire::declared_frame_len(
                                batch[at..].first_chunk().expect("frames this node encoded"),
                            );
                        let from = sealed.len();
                        sealed.extend_from_slice(&batch[at..end]);
                        sealer.seal(sealed, from);
                        at = end;
                    }
                }
                write_bounded(sock, sealed).await?;
                done.writes += 1;
                // One large frame's copy is not kept for the connection's
                // life (found by a review: as the connections' read
                // buffers once were, `conn::KEEP_BUFFER`).
                if sealed.capacity() > super::conn::KEEP_BUFFER {
                    *sealed = Vec::new();
                }
            }
        }
    }
    done.frames = spans.len() as u64 - done.late;
    Ok(done)
}

/// A sealed connection's writer: its sealer, and the run of sealed frames
/// it writes (each frame copied out of the batch with its tag).
struct Sealing {
    sealer: Sealer,
    sealed: Vec<u8>,
}

/// Writes all of `batch` in pieces of [`WRITE_CHUNK`], each of which must
/// go out within [`WRITE_STALL_TIMEOUT`].
async fn write_bounded(sock: &super::front::Socket, batch: &[u8]) -> Result<(), WriteError> {
    for piece in batch.chunks(WRITE_CHUNK) {
        let write = async { Some(sock.write_all(piece).await) };
        let stall = async {
            glommio::timer::sleep(WRITE_STALL_TIMEOUT).await;
            None
        };
        match futures_lite::future::or(write, stall).await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(WriteError::Io(e)),
            None => return Err(WriteError::Stalled),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's refusal of a whole connection (one `Overloaded` error with
    /// request id 0, `node::refuse_connection`) is told from any other
    /// reply, so that calls on it fail as never sent.
    #[test]
    fn a_refusal_at_the_connection_limit_is_recognised() {
        let frame = |resp: Response<'_>| {
            let mut out = Vec::new();
            resp.encode(&mut out, 0, 0);
            out
        };
        let refusal = frame(Response::Error { code: ErrorCode::Overloaded, message: "too many connections" });
        assert!(refused_at_accept(refusal[3], &refusal[HEADER_LEN..]));
        for other in [
            frame(Response::Error { code: ErrorCode::Malformed, message: "bad magic" }),
            frame(Response::ReplicaPut),
            frame(Response::Pong(crate::wire::NodeInfo { node_id: 1, partitions: 64, shard: 0, ports: vec![1] })),
        ] {
            assert!(!refused_at_accept(other[3], &other[HEADER_LEN..]));
        }
    }

    #[test]
    fn only_frames_past_their_deadline_are_dropped() {
        let now = Instant::now();
        let (late, soon) = (now - Duration::from_millis(1), now + Duration::from_secs(1));
        let batch = b"aaabbbbcc".to_vec();
        let all_live = vec![(3, soon), (7, soon), (9, soon)];
        assert_eq!(drop_expired(batch.clone(), all_live.clone(), now), (batch.clone(), all_live));
        let middle_late = vec![(3, soon), (7, late), (9, soon)];
        assert_eq!(drop_expired(batch.clone(), middle_late, now), (b"aaacc".to_vec(), vec![(3, soon), (5, soon)]));
        let all_late = vec![(3, late), (7, late), (9, late)];
        assert_eq!(drop_expired(batch, all_late, now), (Vec::new(), Vec::new()));
    }

    fn frame(len: usize) -> impl FnOnce(&mut Vec<u8>) {
        move |out: &mut Vec<u8>| out.resize(out.len() + len, b'f')
    }

    /// Regression: a peer connection's queue had no cap, so a peer that
    /// stopped reading made its callers' frames pile up without limit.
    #[test]
    fn a_full_queue_refuses_frames_until_expired_ones_are_dropped_or_written() {
        let now = Instant::now();
        let (soon, later) = (now + Duration::from_millis(10), now + Duration::from_secs(10));
        let mut q = OutQueue::default();
        // Under the cap, frames are taken; the one that crosses it too.
        let big = MAX_QUEUED_BYTES / 4 + 1;
        for deadline in [soon, soon, later, later] {
            assert_eq!(q.admit(now), (true, 0));
            q.push(frame(big), deadline);
        }
        assert!(q.queued() > MAX_QUEUED_BYTES);
        // At the cap: refused while nothing has expired.
        assert_eq!(q.admit(now), (false, 0));
        // Once the two short ones expire, they make room.
        let after = soon + Duration::from_millis(1);
        assert_eq!(q.admit(after), (true, 2));
        assert_eq!(q.queued(), 2 * big);
        q.push(frame(big), later);
        q.push(frame(big), later);
        assert_eq!(q.admit(after), (false, 0));
        // The batch being written counts until it is written.
        let (batch, spans) = q.take();
        assert_eq!((batch.len(), spans.len()), (4 * big, 4));
        assert_eq!(q.admit(after), (false, 0), "the writer is blocked on it");
        q.written();
        assert_eq!(q.admit(after), (true, 0));
        // One frame larger than the cap still fits an empty queue.
        q.push(frame(MAX_QUEUED_BYTES * 2), later);
        assert_eq!(q.admit(after), (false, 0));
    }

    /// A HELLO goes out with no deadline, as it was encoded: queued with
    /// `HELLO_LIFETIME` only to be dropped if the connect takes longer. (A
    /// review found it stamped with that lifetime, so a node whose reader
    /// had waited could answer it DeadlineExceeded and never take the
    /// connection as a member's.)
    #[test]
    fn a_hello_is_sent_without_a_deadline() {
        let queued = Instant::now();
        let mut q = OutQueue::default();
        let hello = Request::Hello { member: b"n1" };
        q.push(|out| hello.encode(out, HELLO_ID, 0, 0), queued + HELLO_LIFETIME);
        let (mut batch, spans) = q.take();
        let mut run = StampedRun::default();
        assert_eq!(stamp_run(&mut batch, &spans, 0, queued + Duration::from_millis(5), &mut run), (1, 0));
        let h: &[u8; HEADER_LEN] = batch[..HEADER_LEN].try_into().unwrap();
        assert_eq!(crate::wire::decode_header(h, MAX_BODY_LEN).unwrap().deadline_us, 0);
    }

    /// The writer stamps each frame with what its caller has left as its
    /// run leaves, a run of up to `WRITE_RUN` bytes at a time, and leaves
    /// out the frames whose time is up by then. Frames were stamped when
    /// queued, so one behind a large batch reached the peer with a budget
    /// its caller no longer had, and the peer did work nobody waited for.
    #[test]
    fn frames_are_stamped_with_the_time_left_as_their_run_leaves() {
        let queued = Instant::now();
        let mut q = OutQueue::default();
        let req = Request::Get { key: b"k" };
        let deadlines = [100, 200, 50, 300].map(|ms| queued + Duration::from_millis(ms));
        for (i, &d) in deadlines.iter().enumerate() {
            // Stamped when queued with the whole budget, as a call does.
            let us = crate::wire::deadline_us_for(d - queued);
            q.push(|out| req.encode(out, i as u64 + FIRST_CALL_ID, 0, us), d);
        }
        // A large frame then, whose run is a run of its own.
        let big = Request::Put { key: b"b", context: &[], value: &[7; crate::wire::WRITE_RUN] };
        q.push(|out| big.encode(out, 9, 0, 1), queued + Duration::from_secs(1));
        let (mut batch, spans) = q.take();
        let deadline_of = |b: &[u8], at: usize| {
            let h: &[u8; HEADER_LEN] = b[at..at + HEADER_LEN].try_into().unwrap();
            crate::wire::decode_header(h, MAX_BODY_LEN).unwrap().deadline_us
        };
        // The run leaves 60 ms after the frames were queued: the third
        // frame's caller has given up.
        let now = queued + Duration::from_millis(60);
        let mut run = StampedRun::default();
        let (next, late) = stamp_run(&mut batch, &spans, 0, now, &mut run);
        assert_eq!((next, late), (4, 1), "the small frames are one run; the big one waits for the next");
        let starts: Vec<usize> = std::iter::once(0).chain(spans.iter().map(|s| s.0)).collect();
        assert_eq!(run.ranges, vec![(0, starts[2]), (starts[3], starts[4])], "the late frame is left out");
        for (i, ms) in [(0, 40), (1, 140), (3, 240)] {
            assert_eq!(deadline_of(&batch, starts[i]), ms * 1000, "frame {i}: its deadline less the 60 ms gone");
        }
        // The big frame, stamped as its own run leaves, 100 ms later.
        let (next, late) = stamp_run(&mut batch, &spans, 4, now + Duration::from_millis(100), &mut run);
        assert_eq!((next, late, run.ranges.clone()), (5, 0, vec![(starts[4], starts[5])]));
        assert_eq!(deadline_of(&batch, starts[4]), 840_000);
    }
}
