//! The async client over tokio (feature `tokio`): the blocking
//! [`Client`](super::Client)'s routing (by the cluster's ring, or through
//! the node given) and semantics, with one pipelined connection per shard
//! of each node shared by every task that calls it.
//!
//! Owns: the per-shard connections (opened lazily, replaced after they
//! break), their writer and reader tasks, request ids, the in-flight bound
//! per connection, per-call deadlines (a call's connects, retry and moves
//! to other replicas share one `request_timeout`, as in the blocking
//! client), and the async get-merge-put helper [`AsyncClient::update`].
//!
//! A call encodes its frame into the connection's write buffer and waits
//! on a oneshot; the connection's writer task writes whatever has queued
//! up, in runs of up to `wire::WRITE_RUN` bytes (several frames per write under
//! load), stamping each frame with what is left of its caller's time as
//! its run leaves and leaving out those whose caller gave up; its reader
//! task matches each reply to its waiter by request id, in any order.
//!
//! Invariant: every id in a connection's pending table has exactly one
//! frame queued or written on that connection and holds one of its
//! [`MAX_IN_FLIGHT`] permits until its reply arrives or the connection
//! breaks (a caller that timed out or was dropped leaves its entry to be
//! cleared by the reply). A connection that saw an I/O or protocol error,
//! or on which a request waited at least half a request timeout, to its
//! deadline, without a byte read, is broken: every waiter
//! gets an error, nothing more is written on it, and the next call opens
//! a new one. A request is resent only if it was never queued (the
//! connection was already broken), or if it is a read that failed with an
//! I/O error, once; a write that may have reached the node is never
//! resent (it could add a sibling).
//!
//! Must be used from within a tokio runtime (the connection tasks are
//! spawned on the current one); outside one, calls fail with an I/O error.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::{
    check_node_info, check_request, connect_error, handshake_deadline, handshake_error, ring_targets, ring_view,
    up_first, ClientConfig, ClientError, Context, Put, Reply, Result, RingView, Routing, Versions, MAX_UPDATE_ATTEMPTS,
    MEMBER_RETRY_AFTER,
};
use crate::core::partition;
use crate::core::ring::MemberIdx;
use crate::wire::{
    flags, split_frame, ErrorCode, Header, NodeInfo, Quorum, Request, Response, StampedRun, ANY_SHARD, HEADER_LEN,
    MAX_BODY_LEN, MAX_IN_FLIGHT,
};

/// Free space the reader makes before each read.
const READ_CHUNK: usize = 64 * 1024;
/// A read or write buffer that grew past this (large values) is not kept.
const KEEP_BUFFER: usize = 1 << 20;

/// An async client of a node or of a cluster. Cheap to clone; every
/// clone shares the same connections (and ring), and any number of tasks
/// may call through `&self` at once.
#[derive(Clone)]
pub struct AsyncClient {
    inner: Arc<Inner>,
    /// R/W overrides sent with this handle's GETs, PUTs and DELETEs.
    quorum: Quorum,
}

struct Inner {
    config: ClientConfig,
    /// The node given to `connect`.
    seed: NodeSlots,
    /// The cluster's ring and the connections to its members, when routing
    /// by it (`Routing::Client` against a cluster).
    route: Mutex<Option<Arc<Route>>>,
}

/// The shortest wait without a byte read that proves a connection dead
/// ([`Broken::Silent`]): below it a quiet node is as likely as a dead one.
const MIN_SILENCE: Duration = Duration::from_millis(100);
/// Taken off an attempt's budget before it is compared with the silence
/// measured at its timeout (that starts a moment after the budget does).
const SILENCE_SLACK: Duration = Duration::from_millis(1);

/// The ring the client routes by, and its members' connections.
struct Route {
    view: RingView,
    /// By member index, opened on first use.
    members: Vec<tokio::sync::OnceCell<Arc<NodeSlots>>>,
    /// Members that could not be reached, until when they are tried last.
    down_until: Mutex<Vec<Option<Instant>>>,
}

/// One node: its shard layout, and one slot per shard (or a single slot
/// when not shard-aware).
struct NodeSlots {
    addr: SocketAddr,
    info: NodeInfo,
    slots: Vec<Slot>,
}

impl NodeSlots {
    /// Connects to a node and learns its shard layout with a PING, before
    /// `deadline` and within `config.connect_timeout` (see
    /// [`handshake_deadline`]).
    async fn connect(addr: SocketAddr, config: &ClientConfig, deadline: Instant) -> Result<NodeSlots> {
        let (deadline, limit) = handshake_deadline(config, deadline);
        let first = Arc::new(Conn::open(addr, config, deadline).await?);
        let ping = first.call(&Request::Ping, ANY_SHARD, Quorum::default(), deadline).await;
        let info = match ping.map_err(|e| handshake_error(e.into_error(), limit))?.0? {
            Reply::Pong(info) => info,
            other => return Err(protocol(addr, format!("PING answered with {other:?}"))),
        };
        check_node_info(&info).map_err(|reason| protocol(addr, reason))?;
        let slots: Vec<Slot> = if config.shard_aware {
            info.ports.iter().map(|&port| Slot::new(SocketAddr::new(addr.ip(), port))).collect()
        } else {
            vec![Slot::new(addr)]
        };
        let first_slot = if config.shard_aware { info.shard as usize } else { 0 };
        if let Some(slot) = slots.get(first_slot) {
            *lock(&slot.current) = Some(first);
        }
        Ok(NodeSlots { addr, info, slots })
    }

    fn slot_for(&self, key: Option<&[u8]>, shard_aware: bool) -> (usize, u16) {
        super::slot_for(&self.info, key, shard_aware)
    }

    /// Sends one request on `slot` and waits for its reply and whether
    /// the reply said the ring is stale, until `deadline`. Reads are
    /// retried once on a fresh connection after an I/O error, if time is
    /// left; a connection that cannot be opened is `Failure::Unsent`.
    async fn call_on(
        &self,
        slot: usize,
        shard: u16,
        req: &Request<'_>,
        quorum: Quorum,
        config: &ClientConfig,
        deadline: Instant,
    ) -> Result<Answer, Failure> {
        let Some(slot) = self.slots.get(slot) else {
            return Err(Failure::Failed(ClientError::Invalid(format!("no shard {slot} on this node"))));
        };
        let read = req.is_idempotent();
        match slot.conn(config, deadline).await.map_err(Failure::Unsent)?.call(req, shard, quorum, deadline).await {
            Ok(reply) => return Ok(reply),
            Err(e) if Instant::now() >= deadline => return Err(e),
            // Never queued: resending cannot duplicate it.
            Err(Failure::Unsent(_)) => {}
            Err(Failure::Failed(ClientError::Io { .. })) if read => {}
            Err(e) => return Err(e),
        }
        slot.conn(config, deadline).await.map_err(Failure::Unsent)?.call(req, shard, quorum, deadline).await
    }
}

impl AsyncClient {
    /// Connects to a node with the default settings.
    pub async fn connect(addr: &str) -> Result<AsyncClient> {
        AsyncClient::connect_with(addr, ClientConfig::default()).await
    }

    /// Connects to a node, learns its shard layout with a PING and, when
    /// routing by the ring, fetches the cluster's ring (a lone node has
    /// none: every request then goes to it). A name is resolved first, and
    /// each of its addresses tried in turn. All of it is one call: it ends
    /// within `config.request_timeout`.
    pub async fn connect_with(addr: &str, config: ClientConfig) -> Result<AsyncClient> {
        let deadline = Instant::now() + config.request_timeout;
        let mut last = None;
        for addr in resolve(addr, deadline).await? {
            match NodeSlots::connect(addr, &config, deadline).await {
                Ok(seed) => return AsyncClient::with_seed(seed, config, deadline).await,
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("resolve returns at least one address"))
    }

    /// The client of a connected seed node, with the ring fetched when
    /// routing by it.
    async fn with_seed(seed: NodeSlots, config: ClientConfig, deadline: Instant) -> Result<AsyncClient> {
        let routing = config.routing;
        let client =
            AsyncClient { inner: Arc::new(Inner { config, seed, route: Mutex::new(None) }), quorum: Quorum::default() };
        if routing == Routing::Client {
            client.refresh_ring_until(deadline).await?;
        }
        Ok(client)
    }

    /// The deadline of a call starting now.
    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.config.request_timeout
    }

    /// A handle on the same connections that sends `quorum` (R/W
    /// overrides, 0 = the namespace's default) with its GETs, PUTs and
    /// DELETEs.
    pub fn with_quorum(&self, quorum: Quorum) -> AsyncClient {
        AsyncClient { inner: self.inner.clone(), quorum }
    }

    /// Asks the seed node for the cluster's ring.
    pub async fn fetch_ring(&self) -> Result<RingView> {
        self.fetch_ring_until(self.deadline()).await
    }

    async fn fetch_ring_until(&self, deadline: Instant) -> Result<RingView> {
        let (reply, _) = self.call_seed(0, ANY_SHARD, &Request::Ring, deadline).await?;
        ring_view(self.inner.seed.addr, reply?)
    }

    /// Fetches the ring again; a lone node leaves the client without one.
    pub async fn refresh_ring(&self) -> Result<()> {
        self.refresh_ring_until(self.deadline()).await
    }

    async fn refresh_ring_until(&self, deadline: Instant) -> Result<()> {
        let view = match self.fetch_ring_until(deadline).await {
            Ok(v) => v,
            Err(ClientError::Server { code: ErrorCode::NotClustered, .. }) => {
                *lock(&self.inner.route) = None;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut route = lock(&self.inner.route);
        let next = match route.as_ref() {
            Some(r) if r.view.ring == view.ring && (r.view.n, r.view.r, r.view.w) == (view.n, view.r, view.w) => {
                return Ok(());
            }
            // The same members with another N, R or W: the connections and
            // what is known of who is down carry over, the routing does not
            // (found by a review: a new N was ignored while the ring was
            // unchanged, so reads went by the old preference lists).
            Some(r) if r.view.ring == view.ring => {
                Route { members: r.members.clone(), down_until: Mutex::new(lock(&r.down_until).clone()), view }
            }
            _ => {
                let members = view.ring.members().len();
                Route {
                    members: (0..members).map(|_| tokio::sync::OnceCell::new()).collect(),
                    down_until: Mutex::new(vec![None; members]),
                    view,
                }
            }
        };
        *route = Some(Arc::new(next));
        Ok(())
    }

    /// The ring the client routes by, if any.
    pub fn ring(&self) -> Option<RingView> {
        lock(&self.inner.route).as_ref().map(|r| r.view.clone())
    }

    /// The seed node's identity and shard ports, as learnt when connecting.
    pub fn node_info(&self) -> &NodeInfo {
        &self.inner.seed.info
    }

    /// The shard that owns `key` on the seed node.
    pub fn shard_of(&self, key: &[u8]) -> usize {
        let info = &self.inner.seed.info;
        partition::shard_of(key, info.partitions, info.ports.len())
    }

    async fn call_seed(&self, slot: usize, shard: u16, req: &Request<'_>, deadline: Instant) -> Result<Answer> {
        let (quorum, config) = (self.quorum, &self.inner.config);
        self.inner.seed.call_on(slot, shard, req, quorum, config, deadline).await.map_err(Failure::into_error)
    }

    /// Sends one request and waits for its reply (an error reply is
    /// `Err(ClientError::Server)`): by the ring to a replica of its key
    /// when the client routes by it, else to the seed node's owning shard.
    /// Routing by the ring moves on to the next replica when one cannot be
    /// connected to (nothing was sent), and for a read also when the
    /// connection fails; a write that may have been sent is never resent.
    /// All of that shares one deadline, `request_timeout` from now.
    pub async fn call(&self, req: &Request<'_>) -> Result<Reply> {
        check_request(req)?;
        let deadline = self.deadline();
        let route = lock(&self.inner.route).clone();
        let targets = route.as_ref().map_or_else(Vec::new, |r| ring_targets(&r.view, req));
        let (reply, stale) = match route {
            Some(route) if !targets.is_empty() => self.call_replicas(&route, req, &targets, deadline).await?,
            _ => {
                let (slot, shard) = self.inner.seed.slot_for(req.key(), self.inner.config.shard_aware);
                self.call_seed(slot, shard, req, deadline).await?
            }
        };
        if stale && self.inner.config.routing == Routing::Client && Instant::now() < deadline {
            // Best effort, in what is left of the call: the reply itself
            // (an error reply too) is good either way.
            let _ = self.refresh_ring_until(deadline).await;
        }
        reply
    }

    async fn call_replicas(
        &self,
        route: &Route,
        req: &Request<'_>,
        targets: &[MemberIdx],
        deadline: Instant,
    ) -> Result<Answer> {
        let config = &self.inner.config;
        let is_read = matches!(req, Request::Get { .. });
        let now = Instant::now();
        let order = up_first(targets, &lock(&route.down_until), now);
        let mark_down = |m: MemberIdx| lock(&route.down_until)[m as usize] = Some(Instant::now() + MEMBER_RETRY_AFTER);
        let mut last = None;
        for (tried, &m) in order.iter().enumerate() {
            let addr = route.view.ring.member(m).addr;
            if let Some(e) = last.take_if(|_| Instant::now() >= deadline) {
                // Out of time: the replicas not tried are not marked down.
                return Err(e);
            }
            // Bounded here too: another task may be the one connecting.
            let init = route.members[m as usize]
                .get_or_try_init(|| async { NodeSlots::connect(addr, config, deadline).await.map(Arc::new) });
            let node = match tokio::time::timeout_at(deadline.into(), init).await {
                Ok(Ok(n)) => n.clone(),
                Ok(Err(e)) => {
                    mark_down(m);
                    last = Some(e);
                    continue;
                }
                Err(_elapsed) => {
                    mark_down(m);
                    last = Some(ClientError::Timeout { addr, timeout: config.request_timeout });
                    continue;
                }
            };
            let (slot, shard) = node.slot_for(req.key(), config.shard_aware);
            let until = super::attempt_deadline(deadline, order.len() - tried, is_read);
            match node.call_on(slot, shard, req, self.quorum, config, until).await {
                Err(Failure::Unsent(e)) => {
                    mark_down(m);
                    last = Some(e);
                }
                Err(Failure::Failed(e)) if super::replica_unavailable(&e) => {
                    // Tried last for a while, by writes too; but only a
                    // read moves on (a write may have been taken).
                    mark_down(m);
                    if !is_read {
                        return Err(e);
                    }
                    last = Some(e);
                }
                Err(Failure::Failed(e)) => return Err(e),
                // A node stopping or overloaded answers so: the same rule
                // (as the blocking client's).
                Ok((Err(e), stale)) if super::replica_unavailable(&e) => {
                    mark_down(m);
                    if !is_read {
                        return Ok((Err(e), stale));
                    }
                    last = Some(e);
                }
                Ok(r) => {
                    lock(&route.down_until)[m as usize] = None;
                    return Ok(r);
                }
            }
        }
        Err(last.expect("at least one replica was tried"))
    }

    /// Every concurrent value of `key` and the context to write back with.
    pub async fn get(&self, key: &[u8]) -> Result<Versions> {
        match self.call(&Request::Get { key }).await? {
            Reply::Get(v) => Ok(v),
            other => Err(self.unexpected(other)),
        }
    }

    /// Writes `value` as the successor of what `context` saw (empty: a new
    /// sibling beside whatever is there).
    pub async fn put(&self, key: &[u8], value: &[u8], context: &Context) -> Result<Put> {
        match self.call(&Request::Put { key, context: &context.0, value }).await? {
            Reply::Put(p) => Ok(p),
            other => Err(self.unexpected(other)),
        }
    }

    /// Deletes the versions `context` saw; concurrent writes survive.
    pub async fn delete(&self, key: &[u8], context: &Context) -> Result<Context> {
        match self.call(&Request::Delete { key, context: &context.0 }).await? {
            Reply::Delete(c) => Ok(c),
            other => Err(self.unexpected(other)),
        }
    }

    /// Reads `key`, computes a new value from its siblings (an empty slice
    /// if absent) with `merge`, and writes it back with the read's context.
    /// If a concurrent write left siblings, it reads and merges again, up
    /// to [`MAX_UPDATE_ATTEMPTS`] times. `merge` then sees its own earlier
    /// result among the siblings (that write was stored), so it must
    /// merge, not apply a change: a set union is right, an increment
    /// would count twice (a change belongs in the value, as an element
    /// with an id of its own). In a cluster, "left siblings" is what the
    /// write's coordinator holds after it: a concurrent write that other
    /// replicas hold and it has not heard of yet shows as a sibling at the
    /// next read, not here.
    pub async fn update(&self, key: &[u8], mut merge: impl FnMut(&[Vec<u8>]) -> Vec<u8>) -> Result<Put> {
        let mut siblings = 0;
        for _ in 0..MAX_UPDATE_ATTEMPTS {
            let read = self.get(key).await?;
            let value = merge(&read.values);
            let put = self.put(key, &value, &read.context).await?;
            if put.siblings <= 1 {
                return Ok(put);
            }
            siblings = put.siblings;
        }
        Err(ClientError::Conflict { attempts: MAX_UPDATE_ATTEMPTS, siblings })
    }

    /// The seed node's identity (a PING).
    pub async fn ping(&self) -> Result<NodeInfo> {
        match self.call(&Request::Ping).await? {
            Reply::Pong(info) => Ok(info),
            other => Err(self.unexpected(other)),
        }
    }

    /// One shard's counters of the seed node as JSON (as the blocking
    /// client's `stats`: a shard the node does not have is refused).
    pub async fn stats(&self, shard: usize) -> Result<String> {
        let slot = super::stats_slot(shard, &self.inner.seed.info, self.inner.config.shard_aware)?;
        match self.call_seed(slot, shard as u16, &Request::Stats, self.deadline()).await?.0? {
            Reply::Stats(s) => Ok(s),
            other => Err(self.unexpected(other)),
        }
    }

    fn unexpected(&self, r: Reply) -> ClientError {
        protocol(self.inner.seed.addr, format!("unexpected reply {r:?}"))
    }
}

/// Resolves `addr` ("host:port") to its socket addresses without blocking
/// the runtime's thread, giving up at `deadline` (the blocking client's
/// [`resolve`](super::resolve), on tokio's resolver).
async fn resolve(addr: &str, deadline: Instant) -> Result<Vec<SocketAddr>> {
    if let Ok(ip) = addr.parse::<SocketAddr>() {
        return Ok(vec![ip]);
    }
    let found = match deadline > Instant::now() {
        true => tokio::time::timeout_at(deadline.into(), tokio::net::lookup_host(addr)).await.ok(),
        false => None,
    };
    super::resolved(addr, found.map(|f| f.map(Iterator::collect)))
}

fn protocol(addr: SocketAddr, reason: String) -> ClientError {
    ClientError::Protocol { addr, reason }
}

/// A mutex whose holder panicked still guards consistent data here (every
/// critical section is a few plain field updates), so poison is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The connection of one shard.
struct Slot {
    addr: SocketAddr,
    current: Mutex<Option<Arc<Conn>>>,
    /// Held while opening, so that concurrent callers open one connection.
    opening: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(addr: SocketAddr) -> Slot {
        Slot { addr, current: Mutex::new(None), opening: tokio::sync::Mutex::new(()) }
    }

    fn live(&self) -> Option<Arc<Conn>> {
        lock(&self.current).as_ref().filter(|c| !c.shared.broken.load(Ordering::Acquire)).cloned()
    }

    /// The live connection, or a new one opened before `deadline`.
    async fn conn(&self, config: &ClientConfig, deadline: Instant) -> Result<Arc<Conn>> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        // Another caller may be opening it, for longer than this one has.
        let Ok(_opening) = tokio::time::timeout_at(deadline.into(), self.opening.lock()).await else {
            return Err(ClientError::Timeout { addr: self.addr, timeout: config.request_timeout });
        };
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let conn = Arc::new(Conn::open(self.addr, config, deadline).await?);
        *lock(&self.current) = Some(conn.clone());
        Ok(conn)
    }
}

/// Why a call failed, and whether resending it is safe.
enum Failure {
    /// The connection was broken before the request was queued: nothing
    /// was sent.
    Unsent(ClientError),
    /// The request may have reached the node, and no answer came (an error
    /// reply is an answer: `Answer`'s `Err(ClientError::Server)`).
    Failed(ClientError),
}

impl Failure {
    fn into_error(self) -> ClientError {
        match self {
            Failure::Unsent(e) | Failure::Failed(e) => e,
        }
    }
}

/// Why a connection broke; every waiter gets its own error made from it.
#[derive(Clone, Debug)]
enum Broken {
    Io(io::ErrorKind, String),
    Protocol(String),
    /// The node's error for the whole connection (request id 0: refused
    /// at its connection limit, or a frame it could not read).
    Server(crate::wire::ErrorCode, String),
    /// A request timed out and nothing at all was read while it waited.
    /// That request's caller gets its timeout; the others on the
    /// connection get an I/O error (their own time was not up, and a read
    /// among them is retried on a new connection).
    Silent,
}

impl Broken {
    fn error(&self, addr: SocketAddr, timeout: Duration) -> ClientError {
        match self {
            Broken::Io(kind, msg) => ClientError::Io { addr, source: io::Error::new(*kind, msg.clone()) },
            Broken::Protocol(reason) => protocol(addr, reason.clone()),
            Broken::Server(code, message) => ClientError::Server { code: *code, message: message.clone() },
            Broken::Silent => ClientError::Io {
                addr,
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection closed: the node sent nothing while a request waited (of {timeout:?})"),
                ),
            },
        }
    }
}

/// What a node answered to one request: the reply (an error reply is
/// `Err(ClientError::Server)`), and whether the frame was flagged
/// STALE_ROUTE (a node that is no replica of the key relayed it; its
/// error replies are flagged too).
type Answer = (Result<Reply>, bool);

/// A caller waiting for its reply.
struct Waiter {
    /// The answer, or why the connection failed before it came.
    tx: oneshot::Sender<Result<Answer>>,
    /// Released when the reply arrives or the connection breaks.
    _permit: OwnedSemaphorePermit,
}

struct State {
    next_id: u64,
    /// Encoded requests the writer has not taken yet.
    wbuf: Vec<u8>,
    /// The frames in `wbuf`, in order: the writer stamps each one's budget
    /// as it takes them, and leaves out those whose caller's time is up
    /// (found by a review: a frame queued behind a large write went out
    /// with the budget it had when queued, and the node ran a write whose
    /// caller had been told it timed out).
    queued: VecDeque<Queued>,
    pending: HashMap<u64, Waiter>,
    broken: Option<Broken>,
}

/// What a connection's callers and its two tasks share.
struct Shared {
    addr: SocketAddr,
    request_timeout: Duration,
    state: Mutex<State>,
    /// Mirrors `state.broken.is_some()` for the lock-free check in `Slot`.
    broken: AtomicBool,
    /// `MAX_IN_FLIGHT` permits; closed when the connection breaks.
    permits: Arc<Semaphore>,
    /// Something was queued in `wbuf`.
    write_ready: Notify,
    /// Set to true when the connection breaks; stops both tasks.
    closed: watch::Sender<bool>,
    epoch: Instant,
    /// When bytes were last read, in microseconds since `epoch`.
    last_read_us: AtomicU64,
}

impl Shared {
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn error_of(&self, why: &Broken) -> ClientError {
        why.error(self.addr, self.request_timeout)
    }

    /// Marks the connection broken (the first reason wins), answers every
    /// waiter with an error, wakes permit waiters and stops both tasks.
    fn fail(&self, why: Broken) {
        let waiters = {
            let mut st = lock(&self.state);
            if st.broken.is_some() {
                return;
            }
            st.broken = Some(why.clone());
            st.wbuf = Vec::new();
            st.queued = VecDeque::new();
            std::mem::take(&mut st.pending)
        };
        self.broken.store(true, Ordering::Release);
        self.permits.close();
        self.closed.send_replace(true);
        if !waiters.is_empty() {
            tracing::debug!(addr = %self.addr, ?why, waiters = waiters.len(), "connection broken");
        }
        for (_, w) in waiters {
            let _ = w.tx.send(Err(self.error_of(&why)));
        }
    }

    /// Hands one reply frame to its waiter.
    fn deliver(&self, header: &Header, body: &[u8]) -> Result<(), Broken> {
        let (id, stale) = (header.request_id, header.flags & flags::STALE_ROUTE != 0);
        let reply = match Response::decode(header.opcode, body) {
            Ok(r) => Reply::from_response(self.addr, r),
            Err(e) => return Err(Broken::Protocol(e.to_string())),
        };
        if id == 0 {
            // The node's word on the whole connection: its reason fails
            // every request on it.
            return Err(match reply {
                Err(ClientError::Server { code, message }) => Broken::Server(code, message),
                _ => Broken::Protocol("a reply to request 0".into()),
            });
        }
        let reply = Ok((reply, stale));
        let waiter = lock(&self.state).pending.remove(&id);
        match waiter {
            // The caller may have given up (timeout, cancelled): fine.
            Some(w) => {
                let _ = w.tx.send(reply);
                Ok(())
            }
            None => Err(Broken::Protocol(format!("reply to unknown request {id}"))),
        }
    }
}

/// A handle on one connection; dropping the last one closes it.
struct Conn {
    shared: Arc<Shared>,
}

impl Conn {
    /// Connects within `config.connect_timeout` and before `deadline`.
    async fn open(addr: SocketAddr, config: &ClientConfig, deadline: Instant) -> Result<Conn> {
        let io = |source| ClientError::Io { addr, source };
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| io(io::Error::other(e)))?;
        let limit = config.connect_timeout.min(deadline.saturating_duration_since(Instant::now()));
        if limit.is_zero() {
            return Err(ClientError::Timeout { addr, timeout: config.request_timeout });
        }
        let stream = match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(connect_error(addr, e, limit)),
            Err(_) => return Err(ClientError::Timeout { addr, timeout: limit }),
        };
        stream.set_nodelay(true).map_err(io)?;
        let (rd, wr) = stream.into_split();
        let shared = Arc::new(Shared {
            addr,
            request_timeout: config.request_timeout,
            state: Mutex::new(State {
                next_id: 1,
                wbuf: Vec::new(),
                queued: VecDeque::new(),
                pending: HashMap::new(),
                broken: None,
            }),
            broken: AtomicBool::new(false),
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            write_ready: Notify::new(),
            closed: watch::channel(false).0,
            epoch: Instant::now(),
            last_read_us: AtomicU64::new(0),
        });
        runtime.spawn(read_loop(shared.clone(), rd, shared.closed.subscribe()));
        runtime.spawn(write_loop(shared.clone(), wr, shared.closed.subscribe()));
        Ok(Conn { shared })
    }

    /// Queues one request, waits for its reply until `deadline` (which
    /// also covers waiting for an in-flight permit).
    async fn call(&self, req: &Request<'_>, shard: u16, quorum: Quorum, deadline: Instant) -> Result<Answer, Failure> {
        let s = &self.shared;
        let timeout = ClientError::Timeout { addr: s.addr, timeout: s.request_timeout };
        let deadline = tokio::time::Instant::from_std(deadline);
        let permit = match tokio::time::timeout_at(deadline, s.permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_closed)) => return Err(Failure::Unsent(self.broken_error())),
            Err(_elapsed) => return Err(Failure::Failed(timeout)),
        };
        let (tx, rx) = oneshot::channel();
        let (sent_us, budget) = {
            let mut st = lock(&s.state);
            if let Some(why) = &st.broken {
                return Err(Failure::Unsent(s.error_of(why)));
            }
            let id = st.next_id;
            st.next_id += 1;
            // What is left of the timeout: the node drops the request
            // rather than run it after the caller gave up. Stamped again
            // as the frame leaves (`stamp_run`).
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let deadline_us = crate::wire::deadline_us_for(left);
            let at = st.wbuf.len();
            req.encode_with(&mut st.wbuf, id, shard, deadline_us, quorum);
            let len = st.wbuf.len() - at;
            st.queued.push_back(Queued { at, len, id, deadline });
            st.pending.insert(id, Waiter { tx, _permit: permit });
            (s.now_us(), left)
        };
        s.write_ready.notify_one();
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(e))) => Err(Failure::Failed(e)),
            Ok(Err(_dropped)) => Err(Failure::Failed(self.broken_error())),
            Err(_elapsed) => {
                let silent_us = s.now_us().saturating_sub(sent_us);
                // Half a request timeout, or this attempt's whole budget if
                // less (a read tried on several replicas gives each a share:
                // found by a review, a dead connection was kept for good
                // since no share reached half), but not under a floor: a
                // wait that short proves little.
                let enough =
                    (s.request_timeout / 2).min(budget.saturating_sub(SILENCE_SLACK)).max(MIN_SILENCE).as_micros();
                if s.last_read_us.load(Ordering::Acquire) < sent_us && u128::from(silent_us) >= enough {
                    // Not a byte while this request waited: the node or the
                    // path to it is gone; let the next call open a new one.
                    s.fail(Broken::Silent);
                }
                Err(Failure::Failed(timeout))
            }
        }
    }

    fn broken_error(&self) -> ClientError {
        let s = &self.shared;
        let why = lock(&s.state).broken.clone();
        let why = why.unwrap_or_else(|| Broken::Io(io::ErrorKind::BrokenPipe, "connection closed".into()));
        s.error_of(&why)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.fail(Broken::Io(io::ErrorKind::ConnectionAborted, "closed by the client".into()));
    }
}

/// One request's frame in a connection's write buffer.
struct Queued {
    /// Where it starts in the buffer, and its length.
    at: usize,
    len: usize,
    id: u64,
    /// When its caller stops waiting.
    deadline: tokio::time::Instant,
}

/// Fills `run` with the frames at the front of `frames`, each stamped with
/// what is left of its caller's time (`wire::StampedRun`), and takes them
/// off `frames`; answers each caller whose time is up with a timeout,
/// leaving its frame out (the node counts a budget from when the frame
/// arrives).
fn stamp_run(s: &Shared, out: &mut [u8], frames: &mut VecDeque<Queued>, run: &mut StampedRun) {
    let now = tokio::time::Instant::now();
    run.start();
    let mut late = Vec::new();
    while let Some(f) = frames.pop_front() {
        if !run.fits(f.len) {
            frames.push_front(f);
            break;
        }
        if !run.take(out, f.at, f.at + f.len, f.deadline.saturating_duration_since(now)) {
            late.push(f.id);
        }
    }
    if !late.is_empty() {
        let mut st = lock(&s.state);
        for id in late {
            if let Some(w) = st.pending.remove(&id) {
                let _ = w.tx.send(Err(ClientError::Timeout { addr: s.addr, timeout: s.request_timeout }));
            }
        }
    }
}

/// Breaks its connection when dropped, unless something broke it first:
/// a reader or writer task dropped unfinished (its runtime shut down: a
/// client kept across several runtimes, say) left the connection looking
/// live, and requests queued on it were never sent and reported as
/// timeouts (found by a review).
struct BreakOnDrop(Arc<Shared>);

impl Drop for BreakOnDrop {
    fn drop(&mut self) {
        let why = "the connection's task ended (its runtime shut down)".to_string();
        self.0.fail(Broken::Io(io::ErrorKind::NotConnected, why));
    }
}

/// Reads reply frames and hands each to its waiter, until the connection
/// breaks or is closed.
async fn read_loop(s: Arc<Shared>, mut rd: OwnedReadHalf, mut closed: watch::Receiver<bool>) {
    let _break = BreakOnDrop(s.clone());
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        let mut at = 0;
        loop {
            match split_frame(&buf[at..], MAX_BODY_LEN) {
                Ok(Some((header, total))) => {
                    let body = &buf[at + HEADER_LEN..at + total];
                    if let Err(why) = s.deliver(&header, body) {
                        s.fail(why);
                        return;
                    }
                    at += total;
                }
                Ok(None) => break,
                Err(e) => {
                    s.fail(Broken::Protocol(e.to_string()));
                    return;
                }
            }
        }
        buf.drain(..at);
        if buf.capacity() > KEEP_BUFFER && buf.len() < READ_CHUNK {
            buf.shrink_to(2 * READ_CHUNK);
        }
        buf.reserve(READ_CHUNK);
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => {
                    s.fail(Broken::Io(io::ErrorKind::UnexpectedEof, "the node closed the connection".into()));
                    return;
                }
                Ok(_) => s.last_read_us.store(s.now_us(), Ordering::Release),
                Err(e) => {
                    s.fail(Broken::Io(e.kind(), e.to_string()));
                    return;
                }
            },
            _ = closed.wait_for(|c| *c) => return,
        }
    }
}

/// Writes queued requests, a run at a time (`stamp_run`), until the
/// connection breaks or is closed.
async fn write_loop(s: Arc<Shared>, mut wr: OwnedWriteHalf, mut closed: watch::Receiver<bool>) {
    let _break = BreakOnDrop(s.clone());
    let mut out: Vec<u8> = Vec::new();
    let mut frames = VecDeque::new();
    let mut run = StampedRun::default();
    loop {
        {
            let mut st = lock(&s.state);
            if st.broken.is_some() {
                return;
            }
            std::mem::swap(&mut st.wbuf, &mut out);
            std::mem::swap(&mut st.queued, &mut frames);
        }
        if out.is_empty() {
            tokio::select! {
                _ = s.write_ready.notified() => continue,
                _ = closed.wait_for(|c| *c) => return,
            }
        }
        while !frames.is_empty() {
            stamp_run(&s, &mut out, &mut frames, &mut run);
            for &(from, to) in &run.ranges {
                tokio::select! {
                    r = wr.write_all(&out[from..to]) => if let Err(e) = r {
                        s.fail(Broken::Io(e.kind(), e.to_string()));
                        return;
                    },
                    _ = closed.wait_for(|c| *c) => return,
                }
            }
        }
        out.clear();
        if out.capacity() > KEEP_BUFFER {
            out = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against a scripted fake node, so that reply order, silence and
    //! dropped connections are under the test's control.

    use std::sync::atomic::AtomicUsize;

    use tokio::net::TcpListener;

    use super::*;
    use crate::wire::decode_header;

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn client_is_send_sync_clone() {
        assert_send_sync::<AsyncClient>();
    }

    /// Compiles only if every call's future can be spawned on a
    /// multi-threaded runtime.
    #[allow(dead_code)]
    fn futures_are_send(c: &AsyncClient, ctx: &Context) {
        fn send<T: Send>(_: T) {}
        send(c.get(b"k"));
        send(c.put(b"k", b"v", ctx));
        send(c.delete(b"k", ctx));
        send(c.update(b"k", |v| v.concat()));
        send(c.ping());
        send(c.stats(0));
        send(c.call(&Request::Ping));
    }

    /// As the blocking client's: an IP address is taken as it is, and a
    /// lookup never runs past the call's deadline.
    #[tokio::test]
    async fn a_name_is_resolved_within_the_deadline() {
        let later = Instant::now() + Duration::from_secs(30);
        assert_eq!(resolve("127.0.0.1:7700", Instant::now()).await.unwrap(), vec!["127.0.0.1:7700".parse().unwrap()]);
        let local = resolve("localhost:7700", later).await.unwrap();
        assert!(!local.is_empty() && local.iter().all(|a| a.ip().is_loopback() && a.port() == 7700), "{local:?}");
        let e = resolve("localhost:7700", Instant::now()).await.unwrap_err();
        assert!(matches!(&e, ClientError::Resolve(m) if m.contains("in time")), "{e:?}");
    }

    async fn read_frame(s: &mut TcpStream) -> Option<(Header, Vec<u8>)> {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).await.ok()?;
        let header = decode_header(&h, MAX_BODY_LEN).ok()?;
        let mut body = vec![0u8; header.body_len as usize];
        s.read_exact(&mut body).await.ok()?;
        Some((header, body))
    }

    /// A fake node's next connection, its PING answered
    /// ([`answer_ping`], shard 0 on `l`'s port).
    async fn accept_answering_ping(l: &TcpListener) -> TcpStream {
        let (mut s, _) = l.accept().await.unwrap();
        answer_ping(&mut s, l.local_addr().unwrap().port()).await;
        s
    }

    /// Answers the PING a client opens with (one shard, on `port`).
    async fn answer_ping(s: &mut TcpStream, port: u16) {
        let (h, _) = read_frame(s).await.expect("a PING");
        let info = NodeInfo { node_id: 7, partitions: 64, shard: 0, ports: vec![port] };
        let mut out = Vec::new();
        Response::Pong(info).encode(&mut out, h.request_id, 0);
        s.write_all(&out).await.expect("PONG written");
    }

    fn get_reply(id: u64, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Response::Get { context: b"", values: vec![value] }.encode(&mut out, id, 0);
        out
    }

    /// The fake node is a lone node that speaks only what each test
    /// scripts, so the client is not asked to fetch a ring.
    fn config(timeout_ms: u64) -> ClientConfig {
        ClientConfig {
            request_timeout: Duration::from_millis(timeout_ms),
            routing: Routing::Server,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn out_of_order_replies_reach_their_callers() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        const N: usize = 64;
        tokio::spawn(async move {
            let mut s = accept_answering_ping(&l).await;
            let mut got = Vec::new();
            while got.len() < N {
                let (h, body) = read_frame(&mut s).await.unwrap();
                let Ok(Request::Get { key }) = Request::decode(h.opcode, &body) else { panic!("not a GET") };
                got.push((h.request_id, key.to_vec()));
            }
            // Every reply in one write, last request first.
            let out: Vec<u8> = got.iter().rev().flat_map(|(id, key)| get_reply(*id, key)).collect();
            s.write_all(&out).await.unwrap();
            std::future::pending::<()>().await;
        });
        let client = AsyncClient::connect_with(&format!("127.0.0.1:{port}"), config(5000)).await.unwrap();
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move {
                    let key = format!("key-{i}");
                    let v = c.get(key.as_bytes()).await.unwrap();
                    assert_eq!(v.values, vec![key.into_bytes()]);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn in_flight_is_bounded_per_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        const EXTRA: usize = 10;
        let server = tokio::spawn(async move {
            let mut s = accept_answering_ping(&l).await;
            let mut ids = Vec::new();
            while ids.len() < MAX_IN_FLIGHT {
                ids.push(read_frame(&mut s).await.unwrap().0.request_id);
            }
            // No more may come before a reply frees a permit.
            let more = tokio::time::timeout(Duration::from_millis(300), read_frame(&mut s)).await;
            assert!(more.is_err(), "a request past MAX_IN_FLIGHT was sent");
            let out: Vec<u8> = ids.iter().flat_map(|id| get_reply(*id, b"v")).collect();
            s.write_all(&out).await.unwrap();
            for _ in 0..EXTRA {
                let id = read_frame(&mut s).await.unwrap().0.request_id;
                s.write_all(&get_reply(id, b"v")).await.unwrap();
            }
            s
        });
        let client = AsyncClient::connect_with(&format!("127.0.0.1:{port}"), config(10_000)).await.unwrap();
        let gets = (0..MAX_IN_FLIGHT + EXTRA).map(|_| client.get(b"k"));
        for r in futures_util::future::join_all(gets).await {
            assert_eq!(r.unwrap().values, vec![b"v".to_vec()]);
        }
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn a_silent_node_times_out_and_the_connection_is_replaced() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                    answer_ping(&mut s, port).await;
                }
                held.push(s); // read nothing, answer nothing
            }
        });
        let client = AsyncClient::connect_with(&format!("127.0.0.1:{port}"), config(200)).await.unwrap();
        let started = Instant::now();
        let err = client.get(b"k").await.unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(client.get(b"k").await, Err(ClientError::Timeout { .. })));
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the silent connection was not replaced");
    }

    /// Accepts every connection and never reads or answers a byte: a
    /// stopped node, as its peers see it.
    async fn silent_listener() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        addr
    }

    /// A node on `l` that answers PING (one shard, on its port), RING
    /// (with `ring`, N = 3), GET (with "v") and PUT on every connection.
    async fn ring_seed(l: TcpListener, ring: crate::core::ring::Ring) -> SocketAddr {
        ring_seed_with(l, ring, |id| get_reply(id, b"v")).0
    }

    /// [`ring_seed`] answering a GET with `get(request id)`; also the count
    /// of RING requests it got.
    fn ring_seed_with(
        l: TcpListener,
        ring: crate::core::ring::Ring,
        get: fn(u64) -> Vec<u8>,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let port = l.local_addr().unwrap().port();
        let ring = ring.to_bytes();
        let rings = Arc::new(AtomicUsize::new(0));
        let asked = rings.clone();
        let addr = scripted_node(l, move |id, req| {
            let mut out = Vec::new();
            match req {
                Request::Ping => Response::Pong(one_shard(port)).encode(&mut out, id, 0),
                Request::Ring => {
                    asked.fetch_add(1, Ordering::SeqCst);
                    Response::Ring { n: 3, r: 2, w: 2, ring: &ring }.encode(&mut out, id, 0)
                }
                Request::Get { .. } => out = get(id),
                Request::Put { .. } => Response::Put { context: b"", siblings: 1 }.encode(&mut out, id, 0),
                other => panic!("the seed got {other:?}"),
            }
            Some(out)
        });
        (addr, rings)
    }

    /// A node of one shard on `port`.
    fn one_shard(port: u16) -> NodeInfo {
        NodeInfo { node_id: 1, partitions: 64, shard: 0, ports: vec![port] }
    }

    /// A fake node on `l` serving each connection in a task of its own:
    /// `answer(id, request)` is the reply frame to each request, or `None`
    /// to hang up.
    fn scripted_node(
        l: TcpListener,
        answer: impl Fn(u64, Request<'_>) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> SocketAddr {
        let addr = l.local_addr().unwrap();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    while let Some((h, body)) = read_frame(&mut s).await {
                        let req = Request::decode(h.opcode, &body).expect("a request");
                        let Some(out) = answer(h.request_id, req) else { return };
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// A node on `l` that answers PING (one shard, on its port) and never
    /// a read: a node that hangs after the client connected.
    async fn read_hanging_node(l: TcpListener, unanswered: Arc<AtomicUsize>) -> SocketAddr {
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let unanswered = unanswered.clone();
                tokio::spawn(async move {
                    while let Some((h, body)) = read_frame(&mut s).await {
                        if !matches!(Request::decode(h.opcode, &body), Ok(Request::Ping)) {
                            unanswered.fetch_add(1, Ordering::SeqCst);
                        }
                        if let Ok(Request::Ping) = Request::decode(h.opcode, &body) {
                            let info = NodeInfo { node_id: 2, partitions: 64, shard: 0, ports: vec![addr.port()] };
                            let mut out = Vec::new();
                            Response::Pong(info).encode(&mut out, h.request_id, 0);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// A ring of a replica that hangs after the handshake, one that answers
    /// (the seed) and one that is silent, a client routing by it with
    /// `request_timeout`, and a key tried on the hung replica first and the
    /// answering one second; also the count of requests the hung replica
    /// got (and never answered).
    async fn hung_then_good(request_timeout: Duration) -> (AsyncClient, Vec<u8>, Arc<AtomicUsize>) {
        let unanswered = Arc::new(AtomicUsize::new(0));
        let hung = read_hanging_node(TcpListener::bind("127.0.0.1:0").await.unwrap(), unanswered.clone()).await;
        let config =
            ClientConfig { request_timeout, connect_timeout: Duration::from_millis(300), ..Default::default() };
        let (client, key, _) = first_then_good(hung, config).await;
        (client, key, unanswered)
    }

    /// A ring of `first`, a node that answers (the seed) and one that is
    /// silent; a client routing by it with `config`, a key tried on
    /// `first` first and the answering node second, and the seed.
    async fn first_then_good(first: SocketAddr, config: ClientConfig) -> (AsyncClient, Vec<u8>, SocketAddr) {
        use crate::core::ring::{Member, Ring};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = l.local_addr().unwrap();
        let members = vec![
            Member { name: "first".into(), addr: first, zone: None },
            Member { name: "good".into(), addr: good, zone: None },
            Member { name: "silent".into(), addr: silent_listener().await, zone: None },
        ];
        let seed = ring_seed(l, Ring::with_members(64, members).unwrap()).await;
        let client = AsyncClient::connect_with(&seed.to_string(), config).await.unwrap();
        let view = client.ring().expect("routes by the ring");
        let key = (0..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| {
                let prefs = view.prefs.of_key(k);
                view.ring.member(prefs[0]).addr == first && view.ring.member(prefs[1]).addr == good
            })
            .expect("a key");
        (client, key, seed)
    }

    /// A node on `l` that answers PING (one shard, on its port) and every
    /// other request with the error `code` (stopping, or overloaded).
    async fn refusing_node(l: TcpListener, code: crate::wire::ErrorCode) -> SocketAddr {
        let port = l.local_addr().unwrap().port();
        scripted_node(l, move |id, req| {
            let mut out = Vec::new();
            match req {
                Request::Ping => Response::Pong(one_shard(port)).encode(&mut out, id, 0),
                _ => Response::Error { code, message: "bye" }.encode(&mut out, id, 0),
            }
            Some(out)
        })
    }

    /// A read whose first replica is stopping (or overloaded) moves on to
    /// the next, as the blocking client's does (found by a review); a
    /// write does not (it may have been taken).
    #[tokio::test]
    async fn a_read_moves_on_from_a_replica_that_is_stopping_and_a_write_does_not() {
        for code in [crate::wire::ErrorCode::ShuttingDown, crate::wire::ErrorCode::Overloaded] {
            let down = refusing_node(TcpListener::bind("127.0.0.1:0").await.unwrap(), code).await;
            let (client, key, seed) = first_then_good(down, ClientConfig::default()).await;
            let got = client.get(&key).await.unwrap_or_else(|e| panic!("{code:?}: the read stopped: {e}"));
            assert_eq!(got.values, vec![b"v".to_vec()], "{code:?}");
            let fresh = AsyncClient::connect_with(&seed.to_string(), ClientConfig::default()).await.unwrap();
            let err = fresh.put(&key, b"w", &Context::default()).await.unwrap_err();
            assert_eq!(err.code(), Some(code), "a write is not resent: {err}");
        }
    }

    /// A read whose first replica hangs after the handshake still reaches
    /// the next one before the call's deadline (each replica tried gets a
    /// share of what is left).
    #[tokio::test]
    async fn a_read_moves_on_from_a_replica_that_hangs_in_time_for_the_next() {
        let request_timeout = Duration::from_secs(6);
        let (client, key, _) = hung_then_good(request_timeout).await;
        let started = Instant::now();
        let got = client.get(&key).await.expect("the read reaches the answering replica");
        assert_eq!(got.values, vec![b"v".to_vec()]);
        // The hung replica's share (a third of the deadline) and the answer:
        // a success alone would allow the whole deadline.
        assert!(started.elapsed() < request_timeout * 2 / 3, "took {:?}", started.elapsed());
    }

    /// Regression: when one caller's timeout found its connection silent
    /// and closed it, every other caller waiting on it got that timeout
    /// too, early (its own time was not up), and a read among them was
    /// not retried, though a new connection would have answered it.
    #[tokio::test]
    async fn a_read_caught_by_another_callers_silence_is_retried_on_a_new_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // The keys the first connection got, as it gets them.
        let (on_first, mut first_got) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            // The first connection goes silent after the handshake; every
            // later one answers its GETs.
            let (mut first, _) = l.accept().await.unwrap();
            answer_ping(&mut first, port).await;
            tokio::spawn(async move {
                while let Some((h, body)) = read_frame(&mut first).await {
                    match Request::decode(h.opcode, &body) {
                        Ok(Request::Get { key }) => drop(on_first.send(key.to_vec())),
                        other => panic!("the first connection got {other:?}"),
                    }
                }
            });
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    while let Some((h, _)) = read_frame(&mut s).await {
                        if s.write_all(&get_reply(h.request_id, b"v")).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let timeout = Duration::from_secs(4);
        let client = AsyncClient::connect_with(&format!("127.0.0.1:{port}"), config(4000)).await.unwrap();
        let a = tokio::spawn({
            let c = client.clone();
            async move { c.get(b"a").await }
        });
        assert_eq!(
            tokio::time::timeout(timeout * 2, first_got.recv()).await.ok().flatten().as_deref(),
            Some(&b"a"[..]),
            "A on the first connection"
        );
        // B goes out on the same connection half A's timeout after A: it
        // is still waiting when A's timeout closes the connection, with
        // half its own time left for the retry.
        tokio::time::sleep(timeout / 2).await;
        let b = tokio::spawn({
            let c = client.clone();
            async move {
                let started = Instant::now();
                (c.get(b"b").await, started.elapsed())
            }
        });
        // Not a pass by luck: B went out on the silent connection too,
        // before A's timeout closed it (the retry then on a new one).
        let b_on_first = tokio::time::timeout(timeout * 2, first_got.recv()).await.ok().flatten();
        assert_eq!(b_on_first.as_deref(), Some(&b"b"[..]), "B not on the first connection before A's timeout");
        assert!(matches!(a.await.unwrap(), Err(ClientError::Timeout { .. })), "A's own time ran out");
        let (b, took) = b.await.unwrap();
        assert_eq!(b.unwrap_or_else(|e| panic!("B failed after {took:?}: {e}")).values, vec![b"v".to_vec()]);
    }

    /// A write that timed out on a replica puts that replica last for a
    /// while, as a read does: the next write goes to another replica
    /// first instead of waiting out the timeout again. (The timed-out
    /// write itself is not resent.)
    #[tokio::test]
    async fn a_write_that_timed_out_puts_its_replica_last_for_the_next_call() {
        let (client, key, unanswered) = hung_then_good(Duration::from_millis(600)).await;
        let first = client.put(&key, b"v", &Context::default()).await;
        assert!(matches!(first, Err(ClientError::Timeout { .. })), "sent once, to the hung replica: {first:?}");
        assert_eq!(unanswered.load(Ordering::SeqCst), 1);
        // Sent to the hung replica first again, it would time out again (a
        // write is never resent to the next).
        let second = client.put(&key, b"v", &Context::default()).await.expect("the next write goes to the good one");
        assert_eq!(second.siblings, 1);
        assert_eq!(unanswered.load(Ordering::SeqCst), 1, "the hung replica got the second write");
    }

    /// Regression (found by a review): an error reply flagged STALE_ROUTE
    /// (a node that is no replica relays its replica's error flagged) did
    /// not make the client fetch the ring again; only a successful one did.
    #[tokio::test]
    async fn an_error_reply_flagged_stale_route_refreshes_the_ring() {
        use crate::core::ring::{Member, Ring};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ring = Ring::with_members(64, vec![Member { name: "a".into(), addr, zone: None }]).unwrap();
        let (_, rings) = ring_seed_with(l, ring, |id| {
            let mut out = Vec::new();
            Response::Error { code: ErrorCode::QuorumFailed, message: "relayed" }.encode(&mut out, id, 0);
            crate::wire::patch_reply(&mut out, id, flags::STALE_ROUTE);
            out
        });
        let config = ClientConfig { request_timeout: Duration::from_secs(2), ..Default::default() };
        let client = AsyncClient::connect_with(&addr.to_string(), config).await.unwrap();
        assert_eq!(rings.load(Ordering::SeqCst), 1, "the ring fetched at connect");
        let err = client.get(b"k").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::QuorumFailed), "{err:?}");
        assert_eq!(rings.load(Ordering::SeqCst), 2, "the flagged error reply did not refresh the ring");
    }

    /// With every replica of a key silent, a call fails with a timeout
    /// once its one deadline has passed, not after a full timeout per
    /// replica tried.
    #[tokio::test]
    async fn a_call_ends_by_its_deadline_however_many_replicas_are_silent() {
        use crate::core::ring::{Member, Ring};
        let mut members = Vec::new();
        for i in 0..3 {
            members.push(Member { name: format!("n{i}"), addr: silent_listener().await, zone: None });
        }
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let seed = ring_seed(l, Ring::with_members(64, members).unwrap()).await;
        // Long enough that a loaded machine's scheduling fits well within
        // the bound below, and paying the timeout per member (three times
        // it) stays past it (found by a review: 300 ms and 750 ms left
        // 450 ms of slack).
        let timeout = Duration::from_millis(1500);
        let config = ClientConfig { request_timeout: timeout, connect_timeout: timeout, ..Default::default() };
        let client = AsyncClient::connect_with(&seed.to_string(), config).await.unwrap();
        assert_eq!(client.ring().expect("routes by the ring").ring.members().len(), 3);
        // Well short of what paying the timeout per member took (about
        // three times it), with room for a loaded machine's scheduling.
        let bound = timeout * 5 / 2;
        for round in 0..2 {
            let started = Instant::now();
            let put = client.put(b"k", b"v", &Context::default()).await;
            let took = started.elapsed();
            assert!(matches!(put, Err(ClientError::Timeout { .. })), "round {round}: {put:?}");
            assert!(took < bound, "round {round}: a put with a {timeout:?} timeout took {took:?}");
            let started = Instant::now();
            let get = client.get(b"k").await;
            let took = started.elapsed();
            assert!(matches!(get, Err(ClientError::Timeout { .. })), "round {round}: {get:?}");
            assert!(took < bound, "round {round}: a get with a {timeout:?} timeout took {took:?}");
        }
    }

    /// A replica that accepts connections but never answers costs a call
    /// at most the connect timeout (TCP connect and PING handshake), so the
    /// rest of the call's deadline is left to the next replica.
    #[tokio::test]
    async fn a_silent_replica_costs_a_call_only_the_connect_timeout() {
        use crate::core::ring::{Member, Ring};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = l.local_addr().unwrap();
        let members = vec![
            Member { name: "silent1".into(), addr: silent_listener().await, zone: None },
            Member { name: "silent2".into(), addr: silent_listener().await, zone: None },
            Member { name: "good".into(), addr: good, zone: None },
        ];
        let seed = ring_seed(l, Ring::with_members(64, members).unwrap()).await;
        let (connect_timeout, request_timeout) = (Duration::from_millis(200), Duration::from_secs(6));
        let config = ClientConfig { request_timeout, connect_timeout, ..Default::default() };
        let client = AsyncClient::connect_with(&seed.to_string(), config).await.unwrap();
        let view = client.ring().expect("routes by the ring");
        // A key whose replicas are tried silent ones first.
        let key = (0..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| view.prefs.of_key(k).last().is_some_and(|&m| view.ring.member(m).addr == good))
            .expect("a key");
        let started = Instant::now();
        let put = client.put(&key, b"v", &Context::default()).await.expect("the put reaches the answering replica");
        assert_eq!(put.siblings, 1);
        let took = started.elapsed();
        // Two connect timeouts and the answer, not the call's deadline: a
        // success alone would allow up to it.
        assert!(took < request_timeout / 2, "took {took:?}");
        assert_eq!(client.get(&key).await.expect("get").values, vec![b"v".to_vec()]);
    }

    /// As in the blocking client: a connect that times out is a timeout
    /// error. A listener whose accept queue is full (backlog 0, never
    /// accepting) makes Linux drop the SYNs of further connects.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_connect_timeout_is_a_timeout_error() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // SAFETY: a plain listen(2) on a socket this test owns.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let mut queued = Vec::new();
        let full = (0..16).any(|_| match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            Ok(s) => {
                queued.push(s);
                false
            }
            Err(_) => true,
        });
        assert!(full, "the accept queue never filled");
        let limit = Duration::from_millis(200);
        let config = ClientConfig { connect_timeout: limit, ..config(2000) };
        let err = AsyncClient::connect_with(&addr.to_string(), config).await.err().expect("the connect times out");
        assert!(matches!(err, ClientError::Timeout { addr: a, timeout } if a == addr && timeout <= limit), "{err:?}");
    }

    #[tokio::test]
    async fn reads_are_retried_once_and_writes_never() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let frames = Arc::new(Mutex::new(Vec::<u8>::new()));
        let seen = frames.clone();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                if std::mem::take(&mut first) {
                    answer_ping(&mut s, port).await;
                }
                // Read one request, then hang up without answering.
                if let Some((h, _)) = read_frame(&mut s).await {
                    lock(&seen).push(h.opcode);
                }
            }
        });
        let client = AsyncClient::connect_with(&format!("127.0.0.1:{port}"), config(2000)).await.unwrap();
        let err = client.get(b"k").await.unwrap_err();
        assert!(matches!(err, ClientError::Io { .. }), "{err:?}");
        let err = client.put(b"k", b"v", &Context::default()).await.unwrap_err();
        assert!(matches!(err, ClientError::Io { .. }), "{err:?}");
        let ops = lock(&frames).clone();
        assert_eq!(ops, [crate::wire::op::GET, crate::wire::op::GET, crate::wire::op::PUT]);
    }

    /// Found by a review: the check that nothing was sent sat in a detached
    /// task, so its panic was lost. The fake node now returns every frame
    /// it read after the handshake, up to the client's close; a valid GET
    /// after the refused calls flushes anything they might have queued.
    #[tokio::test]
    async fn invalid_requests_are_refused_before_sending() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let node = tokio::spawn(async move {
            let mut s = accept_answering_ping(&l).await;
            let frames = async {
                let mut frames = Vec::new();
                while let Some((h, body)) = read_frame(&mut s).await {
                    if h.opcode == crate::wire::op::GET {
                        s.write_all(&get_reply(h.request_id, b"v")).await.unwrap();
                    }
                    frames.push((h.opcode, body));
                }
                frames
            };
            tokio::time::timeout(Duration::from_secs(10), frames).await
        });
        let client = AsyncClient::connect_with(&format!("127.0.0.1:{port}"), config(2000)).await.unwrap();
        assert!(matches!(client.get(b"").await, Err(ClientError::Invalid(_))));
        let long = Context(vec![0; crate::core::version::MAX_CONTEXT_LEN + 1]);
        assert!(matches!(client.delete(b"k", &long).await, Err(ClientError::Invalid(_))));
        assert_eq!(client.get(b"k").await.expect("a valid GET").values, vec![b"v".to_vec()]);
        drop(client);
        let frames = node.await.unwrap().expect("the client closed its connection when dropped");
        let requests: Vec<_> = frames.iter().map(|(op, body)| Request::decode(*op, body)).collect();
        assert!(matches!(requests[..], [Ok(Request::Get { key: b"k" })]), "sent after the handshake: {requests:?}");
    }

    /// Found by a review: a refresh that brought a new N (or R, W) with
    /// the same ring was ignored, so keys went by the old N's preference
    /// lists; the member connections carry over.
    #[tokio::test]
    async fn a_refresh_takes_a_new_n_when_the_ring_is_unchanged() {
        use std::sync::atomic::AtomicU8;

        use crate::core::ring::{Member, Ring};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let members = vec![
            Member { name: "a".into(), addr, zone: None },
            Member { name: "b".into(), addr: silent_listener().await, zone: None },
        ];
        let ring = Ring::with_members(64, members).unwrap().to_bytes();
        let n = Arc::new(AtomicU8::new(2));
        let served_n = n.clone();
        scripted_node(l, move |id, req| {
            let mut out = Vec::new();
            match req {
                Request::Ping => Response::Pong(one_shard(addr.port())).encode(&mut out, id, 0),
                Request::Ring => {
                    let n = served_n.load(Ordering::SeqCst);
                    Response::Ring { n, r: 1, w: 1, ring: &ring }.encode(&mut out, id, 0)
                }
                other => panic!("{other:?}"),
            }
            Some(out)
        });
        let config = ClientConfig { request_timeout: Duration::from_secs(2), ..Default::default() };
        let client = AsyncClient::connect_with(&addr.to_string(), config).await.unwrap();
        assert_eq!(client.ring().unwrap().n, 2);
        n.store(1, Ordering::SeqCst);
        client.refresh_ring().await.unwrap();
        let view = client.ring().unwrap();
        assert_eq!(view.n, 1, "the refreshed view has the new N");
        assert_eq!(view.prefs.of_key(b"k").len(), 1, "keys go by the new N's preference lists");
    }

    /// Found by a review: a connection that went silent (a dead path) was
    /// never replaced when only reads timed out on it, since a read tried
    /// on several replicas gives each a share of the deadline and the
    /// silence rule wanted half a request timeout. Every read then waited
    /// on it first, each time its replica was tried again.
    #[tokio::test]
    async fn a_dead_connection_that_times_out_reads_is_replaced() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let first = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = l.accept().await {
                if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                    answer_ping(&mut s, first.port()).await;
                    // Silent from now on.
                    held.push(s);
                    continue;
                }
                tokio::spawn(async move {
                    while let Some((h, body)) = read_frame(&mut s).await {
                        let mut out = Vec::new();
                        if let Ok(Request::Ping) = Request::decode(h.opcode, &body) {
                            let info = NodeInfo { node_id: 9, partitions: 64, shard: 0, ports: vec![first.port()] };
                            Response::Pong(info).encode(&mut out, h.request_id, 0);
                        } else {
                            out = get_reply(h.request_id, b"first");
                        }
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let config = ClientConfig {
            request_timeout: Duration::from_millis(900),
            connect_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let (client, key, _) = first_then_good(first, config).await;
        assert_eq!(client.get(&key).await.unwrap().values, vec![b"v".to_vec()], "past the silent connection");
        tokio::time::sleep(MEMBER_RETRY_AFTER + Duration::from_millis(100)).await;
        let got = client.get(&key).await.unwrap();
        assert_eq!(got.values, vec![b"first".to_vec()], "from a new connection to the first replica");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A node at its connection limit answers a new connection with one
    /// error frame for request id 0: the client reports that error, not a
    /// protocol error about a reply to no request.
    #[tokio::test]
    async fn a_connection_the_node_refuses_fails_with_its_reason() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = scripted_node(l, |_, _| {
            let mut out = Vec::new();
            Response::Error { code: crate::wire::ErrorCode::Overloaded, message: "too many connections" }
                .encode(&mut out, 0, 0);
            Some(out)
        });
        let err = AsyncClient::connect_with(&addr.to_string(), config(2000)).await.err().expect("refused");
        assert!(matches!(&err, ClientError::Server { code: crate::wire::ErrorCode::Overloaded, .. }), "{err:?}");
    }

    /// Found by a review: a client whose connections were opened on a
    /// runtime that has since shut down (one kept in a static, used from
    /// several `#[tokio::test]`s or `block_on`s) queued into a connection
    /// whose reader and writer tasks were gone: the write was never sent,
    /// and reported as a timeout after the whole request timeout.
    #[test]
    fn a_client_outliving_its_first_runtime_still_sends() {
        let node_rt = tokio::runtime::Runtime::new().unwrap();
        let (port, puts) = node_rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            let puts = Arc::new(AtomicUsize::new(0));
            let seen = puts.clone();
            scripted_node(l, move |id, req| {
                let mut out = Vec::new();
                match req {
                    Request::Ping => Response::Pong(one_shard(port)).encode(&mut out, id, 0),
                    Request::Get { .. } => out = get_reply(id, b"v"),
                    Request::Put { .. } => {
                        seen.fetch_add(1, Ordering::SeqCst);
                        Response::Put { context: b"", siblings: 1 }.encode(&mut out, id, 0)
                    }
                    other => panic!("{other:?}"),
                }
                Some(out)
            });
            (port, puts)
        });
        let first = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = first.block_on(async {
            let c = AsyncClient::connect_with(&format!("127.0.0.1:{port}"), config(1000)).await.unwrap();
            c.get(b"k").await.unwrap();
            c
        });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let put = second.block_on(client.put(b"k", b"v", &Context::default()));
        assert!(put.is_ok(), "{put:?} (puts the node got: {})", puts.load(Ordering::SeqCst));
        assert_eq!(puts.load(Ordering::SeqCst), 1);
    }

    /// Checks the PUTs a fake node saw `(key, when it arrived, its
    /// deadline)`: the one of key `late`, if it came, may not run past
    /// `gave_up`, when its caller was told it timed out.
    fn assert_late_not_run_after(seen: Vec<(Vec<u8>, Instant, u32)>, gave_up: Instant) {
        for (key, arrived, deadline_us) in seen {
            let runs_until = arrived + Duration::from_micros(deadline_us.into());
            assert!(
                key != b"late" || runs_until <= gave_up + Duration::from_millis(20),
                "the node may run the write {:?} after its caller gave up",
                runs_until - gave_up
            );
        }
    }

    /// Found by a review: a request whose caller timed out while its frame
    /// still sat in the connection's write buffer (behind a large write to
    /// a node that reads slowly) was written later with the budget it had
    /// when it was queued; the node counts that budget from receipt, so it
    /// ran a write long after its caller was told it timed out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_whose_caller_gave_up_is_not_sent_with_a_fresh_budget() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut s = accept_answering_ping(&l).await;
            // A GET, answered late (so the connection is not silent).
            let (g, _) = read_frame(&mut s).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            s.write_all(&get_reply(g.request_id, b"v")).await.unwrap();
            // Reads nothing more until well after the callers gave up.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut seen = Vec::new();
            while let Ok(Some((h, body))) = tokio::time::timeout(Duration::from_millis(500), read_frame(&mut s)).await {
                if let Ok(Request::Put { key, .. }) = Request::decode(h.opcode, &body) {
                    seen.push((key.to_vec(), Instant::now(), h.deadline_us));
                }
            }
            let _ = tx.send(seen);
            std::future::pending::<()>().await;
        });
        let client = AsyncClient::connect_with(&format!("127.0.0.1:{port}"), config(300)).await.unwrap();
        let c = client.clone();
        let g = tokio::spawn(async move { c.get(b"g").await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c = client.clone();
        let big = tokio::spawn(async move { c.put(b"big", &vec![b'a'; 8 << 20], &Context::default()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let late = client.put(b"late", b"v", &Context::default()).await;
        let gave_up = Instant::now();
        assert!(matches!(late, Err(ClientError::Timeout { .. })), "{late:?}");
        assert!(g.await.unwrap().is_ok());
        let _ = big.await.unwrap();
        assert_late_not_run_after(rx.await.unwrap(), gave_up);
    }

    /// Found by a review: frames were stamped a whole batch at a time, so
    /// a frame queued in the same batch as a large one (together while the
    /// writer was idle) was stamped before the large frame went out, and
    /// left a second later with that budget.
    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_behind_a_large_one_in_the_same_batch_is_stamped_as_it_leaves() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut s = accept_answering_ping(&l).await;
            // Reads slowly: at most 64 KiB every 10 ms.
            let (mut buf, mut chunk, mut seen) = (Vec::new(), vec![0u8; 64 * 1024], Vec::new());
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let n = match tokio::time::timeout(Duration::from_secs(1), s.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Ok(Some((h, total))) = crate::wire::split_frame(&buf, crate::wire::MAX_BODY_LEN) {
                    match Request::decode(h.opcode, &buf[HEADER_LEN..total]) {
                        Ok(Request::Get { .. }) => s.write_all(&get_reply(h.request_id, b"v")).await.unwrap(),
                        Ok(Request::Put { key, .. }) => seen.push((key.to_vec(), Instant::now(), h.deadline_us)),
                        _ => {}
                    }
                    buf.drain(..total);
                }
                if seen.iter().any(|(k, _, _)| k == b"late") {
                    break;
                }
            }
            let _ = tx.send(seen);
            std::future::pending::<()>().await;
        });
        let client = AsyncClient::connect_with(&format!("127.0.0.1:{port}"), config(600)).await.unwrap();
        // Queued one after the other before the writer runs: one batch.
        let c = client.clone();
        let g = tokio::spawn(async move { c.get(b"g").await });
        let c = client.clone();
        let big = tokio::spawn(async move { c.put(b"big", &vec![b'a'; 8 << 20], &Context::default()).await });
        let c = client.clone();
        let late = tokio::spawn(async move {
            let r = c.put(b"late", b"v", &Context::default()).await;
            (r, Instant::now())
        });
        let (late, gave_up) = late.await.unwrap();
        assert!(matches!(late, Err(ClientError::Timeout { .. })), "{late:?}");
        assert!(g.await.unwrap().is_ok());
        let _ = big.await.unwrap();
        assert_late_not_run_after(rx.await.unwrap(), gave_up);
    }
}
