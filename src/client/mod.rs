//! The Gyre client: a blocking client over std sockets (always built), and
//! an async one over tokio (feature `tokio`). Neither needs glommio, so
//! this module builds with `default-features = false` on any platform.
//!
//! Owns: connections to the shards of the nodes it talks to, request ids,
//! request timeouts, routing, and the get-merge-put helper
//! [`Client::update`].
//!
//! Routing: with [`Routing::Client`] (the default) the client fetches the
//! cluster's ring (a RING request), hashes the key, and sends the request
//! straight to a replica from the key's preference list (a write to the
//! replica its context names as the fastest reader), to the shard that
//! owns the key there (shard ports come from a PING). A reply flagged
//! STALE_ROUTE makes it fetch the ring again. With [`Routing::Server`],
//! or against a lone node, everything goes to the node given.
//!
//! Invariant: a request is checked against the protocol's limits before
//! anything is sent, a connection that saw an I/O or protocol error is
//! dropped (never reused half-read), and a write is never retried
//! blindly (it could add a sibling); reads are retried once on a new
//! connection.

#[cfg(feature = "tokio")]
pub mod tokio;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::core::coord::coordinator_order;
use crate::core::partition;
use crate::core::ring::{MemberIdx, PreferenceTable, Ring};
use crate::core::version::MAX_CONTEXT_LEN;
use crate::limits::VALUE_LEN_HARD_CAP;
use crate::wire::{
    check_context_len, check_key_len, flags, split_frame, ErrorCode, NodeInfo, Quorum, Request, Response, WireError,
    ANY_SHARD, HEADER_LEN, MAX_BODY_LEN,
};

/// How long a ring member that could not be reached is tried only after
/// the other replicas.
pub const MEMBER_RETRY_AFTER: Duration = Duration::from_millis(500);

/// Get-merge-put rounds [`Client::update`] makes before giving up.
pub const MAX_UPDATE_ATTEMPTS: usize = 16;

/// Why a request failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("I/O error talking to {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("no reply from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("protocol error from {addr}: {reason}")]
    Protocol { addr: SocketAddr, reason: String },
    /// The node answered with an error.
    #[error("{code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// `update` gave up: each round's write was stored (the last one too),
    /// but concurrent writers kept leaving siblings beside it.
    #[error("still {siblings} siblings after {attempts} get-merge-put rounds (each round's write was stored)")]
    Conflict { attempts: usize, siblings: usize },
}

impl ClientError {
    /// Whether a write that failed so may still have been stored, so that
    /// writing it again can add a sibling: no answer came (a timeout, or
    /// the connection failed under it: the client never resends such a
    /// write, `replica_unavailable`), an answer came that could not be
    /// read (a protocol error: found by a review, a node that stored the
    /// write and set a reply flag this client does not know was taken for
    /// one that did not), or its coordinator stored it and too few
    /// replicas answered (QuorumFailed). Conservative: an I/O or protocol
    /// error that came before the write was sent (a connection that could
    /// not be made, was already broken, or whose PING was answered wrong)
    /// says "may" too.
    pub fn write_may_have_landed(&self) -> bool {
        matches!(
            self,
            ClientError::Io { .. }
                | ClientError::Timeout { .. }
                | ClientError::Protocol { .. }
                | ClientError::Server { code: ErrorCode::QuorumFailed, .. }
        )
    }

    /// The server's error code, if the node answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The connection slot that reaches `shard` of the node `info` describes
/// (STATS is answered by the shard it reaches): its own with shard-aware
/// routing, else the one connection, to the shard at the address given.
pub(crate) fn stats_slot(shard: usize, info: &NodeInfo, shard_aware: bool) -> Result<usize> {
    let shards = info.ports.len();
    if shard >= shards {
        return Err(ClientError::Invalid(if shards == 1 {
            format!("shard {shard}: the node has one shard, shard 0")
        } else {
            format!("shard {shard}: the node has shards 0 to {}", shards - 1)
        }));
    }
    if !shard_aware && shard != usize::from(info.shard) {
        // The one connection reaches the seed address's shard, whatever
        // shard is asked for (found by a review: stats(0) through shard
        // 1's port answered with shard 1's counters).
        return Err(ClientError::Invalid(format!(
            "shard {shard}: without shard-aware routing only shard {}, the one at the address given, is reachable",
            info.shard
        )));
    }
    Ok(if shard_aware { shard } else { 0 })
}

/// The opaque causal context of a read, to pass back with the next write.
/// As text it is lowercase hex (empty for "no context").
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Context(pub Vec<u8>);

impl Context {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({self})")
    }
}

impl FromStr for Context {
    type Err = String;
    /// Parses hex digits (either case; surrounding whitespace ignored).
    /// Any other input, non-ASCII included, is an error, never a panic.
    fn from_str(s: &str) -> Result<Context, String> {
        let s = s.trim();
        // Bytes, not `&str` slices: a slice could split a multi-byte
        // character, and `u8::from_str_radix` would accept a sign.
        let digits = s.as_bytes();
        if !digits.len().is_multiple_of(2) || digits.len() / 2 > MAX_CONTEXT_LEN {
            return Err("a context is an even number of hex digits, as printed by get".into());
        }
        let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
        digits
            .chunks_exact(2)
            .map(|pair| Some(hex(pair[0])? << 4 | hex(pair[1])?))
            .collect::<Option<Vec<u8>>>()
            .map(Context)
            .ok_or_else(|| format!("not hex: {s:?}"))
    }
}

/// What a get returns: every concurrent value and one context.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Versions {
    /// The live siblings; empty if the key does not exist.
    pub values: Vec<Vec<u8>>,
    pub context: Context,
}

/// What a put returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Put {
    /// What this write has seen, to pass with the next write of the key:
    /// the key's whole context when the new value is its only one;
    /// otherwise it covers no sibling this client was not given (a `get`
    /// shows them, with the context that replaces them all).
    pub context: Context,
    /// Live values of the key after the write (more than one: a concurrent
    /// write happened and the key has siblings).
    pub siblings: usize,
}

/// An owned reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Pong(NodeInfo),
    Stats(String),
    Get(Versions),
    Put(Put),
    Delete(Context),
    /// The cluster's default quorum and its encoded ring.
    Ring {
        n: u8,
        r: u8,
        w: u8,
        ring: Vec<u8>,
    },
}

impl Reply {
    /// The reply `r` from `addr`; one no client request has (a replica
    /// message's) is the node's protocol error.
    pub(crate) fn from_response(addr: SocketAddr, r: Response<'_>) -> Result<Reply> {
        Ok(match r {
            Response::Pong(info) => Reply::Pong(info),
            Response::Stats(s) => Reply::Stats(s.to_string()),
            Response::Get { context, values } => Reply::Get(Versions {
                values: values.into_iter().map(<[u8]>::to_vec).collect(),
                context: Context(context.to_vec()),
            }),
            Response::Put { context, siblings } => {
                Reply::Put(Put { context: Context(context.to_vec()), siblings: siblings as usize })
            }
            Response::Delete { context } => Reply::Delete(Context(context.to_vec())),
            Response::Ring { n, r, w, ring } => Reply::Ring { n, r, w, ring: ring.to_vec() },
            Response::ReplicaGet { .. } | Response::ReplicaPut | Response::Hello { .. } | Response::Auth { .. } => {
                let reason = "a replica message's reply answered a client request".into();
                return Err(ClientError::Protocol { addr, reason });
            }
            Response::Error { code, message } => {
                return Err(ClientError::Server { code, message: message.to_string() })
            }
        })
    }
}

/// Checks a request against the protocol limits before it is sent.
pub fn check_request(req: &Request<'_>) -> Result<()> {
    let invalid = |e: WireError| ClientError::Invalid(e.to_string());
    if let Some(key) = req.key() {
        check_key_len(key.len()).map_err(invalid)?;
    }
    match req {
        Request::Put { context, value, .. } => {
            if value.len() > VALUE_LEN_HARD_CAP {
                return Err(ClientError::Invalid(format!(
                    "value of {} bytes exceeds the protocol's cap of {VALUE_LEN_HARD_CAP}",
                    value.len()
                )));
            }
            check_context_len(context.len()).map_err(invalid)
        }
        Request::Delete { context, .. } => check_context_len(context.len()).map_err(invalid),
        _ => Ok(()),
    }
}

/// Settings of a client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long opening one connection may take (within what is left of
    /// the call's `request_timeout`); for the first connection to a node,
    /// that includes the PING that learns its shard layout.
    pub connect_timeout: Duration,
    /// How long one call of a client (`get`, `put`, `delete`, `get_many`,
    /// `ping`, `stats`, `fetch_ring`, `connect_with`...) may take in all:
    /// its connection attempts, its retry of a read and its moves to other
    /// replicas share this one deadline, each getting what is left of it.
    /// [`Client::update`] is several calls, each with its own. On a bare
    /// [`Connection`], each `recv` (or `call`) may wait this long.
    pub request_timeout: Duration,
    /// Send each key straight to the shard that owns it on the node it
    /// goes to (otherwise to that node's listed address, the one given or
    /// a replica's from the ring, and the node forwards it).
    pub shard_aware: bool,
    /// Route by the cluster's ring, or let the node given coordinate.
    pub routing: Routing,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            shard_aware: true,
            routing: Routing::Client,
        }
    }
}

/// How far a socket's read or write timeout may be from what is left of a
/// call before it is set again: a read may overrun the call's deadline by
/// this much, and a call that starts with a full timeout makes no
/// `setsockopt`.
const SOCKET_TIMEOUT_SLACK: Duration = Duration::from_millis(2);

/// What is left until `deadline` (zero once it has passed).
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Until when a call tries one replica, with `untried` replicas (this one
/// included) still to go before `deadline`. A read gives each an equal
/// share of what is left, so that a replica that hangs (its node stopped,
/// a connection that accepts and never answers) cannot take the whole
/// call: the next one still gets its turn. A write is not tried elsewhere
/// after a timeout (it may have been applied), so it gets all of it.
pub(crate) fn attempt_deadline(deadline: Instant, untried: usize, is_read: bool) -> Instant {
    if !is_read || untried <= 1 {
        return deadline;
    }
    (Instant::now() + left(deadline) / untried as u32).min(deadline)
}

/// Whether an I/O error is a socket timeout expiring.
fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// The error of a failed connect to `addr` that was given `limit`: a
/// timeout is [`ClientError::Timeout`] (as in the async client), anything
/// else [`ClientError::Io`].
pub(crate) fn connect_error(addr: SocketAddr, source: io::Error, limit: Duration) -> ClientError {
    if is_timeout(&source) {
        ClientError::Timeout { addr, timeout: limit }
    } else {
        ClientError::Io { addr, source }
    }
}

/// One connection to one shard, with pipelining: [`Connection::send`] any
/// number of requests, then [`Connection::recv`] their replies, matched by
/// the ids `send` returned (they may come back in any order).
pub struct Connection {
    addr: SocketAddr,
    stream: TcpStream,
    /// Bytes read but not yet consumed as frames.
    rbuf: Vec<u8>,
    /// Encoded requests not yet written.
    wbuf: Vec<u8>,
    next_id: u64,
    timeout: Duration,
    /// The socket's read and write timeouts as last set.
    read_timeout: Duration,
    write_timeout: Duration,
    /// Set after any I/O or protocol error: the stream's position in the
    /// frame sequence is unknown, so every later use fails
    /// ([`Self::check_usable`]).
    broken: bool,
    /// Requests sent (or queued) whose replies have not been read: while
    /// none are owed, anything the node sends, or its closing, means the
    /// connection is done with ([`Self::closed_while_idle`]).
    owed: usize,
    /// Found open by a look (or just opened) and nothing sent since: a
    /// second look before the next request is skipped (routing by the
    /// ring opens the connection, then calls on it).
    looked: bool,
    /// A reply came flagged STALE_ROUTE (the node was not a replica of its
    /// key): the client's ring is out of date. Cleared by whoever acts on it.
    pub stale_route: bool,
}

/// Peeks at one byte of `stream` without waiting: `WouldBlock` when
/// nothing has come (the connection is idle and open), `Ok(0)` when the
/// peer closed it. One `recv(MSG_PEEK | MSG_DONTWAIT)` on Unix; elsewhere
/// the socket is made non-blocking for the peek and blocking again.
#[cfg(unix)]
fn peek_without_waiting(stream: &TcpStream) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: the buffer is one valid, writable byte; the descriptor is
    // the stream's own, open for as long as `stream` is borrowed.
    let n = unsafe { libc::recv(stream.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    match n {
        -1 => Err(io::Error::last_os_error()),
        n => Ok(n as usize),
    }
}

#[cfg(not(unix))]
fn peek_without_waiting(stream: &TcpStream) -> io::Result<usize> {
    stream.set_nonblocking(true)?;
    let seen = stream.peek(&mut [0u8; 1]);
    // A socket left non-blocking would fail later reads: that is an error
    // of the look, whatever it saw.
    stream.set_nonblocking(false).and(seen)
}

impl Connection {
    /// Connects within `config.connect_timeout` (a timeout is
    /// [`ClientError::Timeout`]).
    pub fn connect(addr: SocketAddr, config: &ClientConfig) -> Result<Connection> {
        Connection::connect_within(addr, config, config.connect_timeout)
    }

    /// Connects within `config.connect_timeout` and before `deadline`.
    fn open(addr: SocketAddr, config: &ClientConfig, deadline: Instant) -> Result<Connection> {
        let limit = config.connect_timeout.min(left(deadline));
        if limit.is_zero() {
            return Err(ClientError::Timeout { addr, timeout: config.request_timeout });
        }
        Connection::connect_within(addr, config, limit)
    }

    fn connect_within(addr: SocketAddr, config: &ClientConfig, limit: Duration) -> Result<Connection> {
        let stream = TcpStream::connect_timeout(&addr, limit).map_err(|e| connect_error(addr, e, limit))?;
        let io = |source| ClientError::Io { addr, source };
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(config.request_timeout)).map_err(io)?;
        stream.set_write_timeout(Some(config.request_timeout)).map_err(io)?;
        Ok(Connection {
            addr,
            stream,
            rbuf: Vec::with_capacity(16 * 1024),
            wbuf: Vec::new(),
            next_id: 1,
            timeout: config.request_timeout,
            read_timeout: config.request_timeout,
            write_timeout: config.request_timeout,
            broken: false,
            owed: 0,
            looked: true,
            stale_route: false,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether the node closed this connection (or sent what no request
    /// asked for) while it owed nothing: a look at the socket that does not
    /// wait. Checked before a client reuses an idle connection: a node
    /// that restarted meanwhile had closed it, and a write sent into it
    /// failed as "may have been taken" though no node ever saw it, while
    /// reads had only one retry (found by a review). A connection with
    /// replies owed is never judged by it. Looked at before every call (one
    /// system call on Unix, three elsewhere): a node that stops answers its
    /// last request and closes at once, so a client calling back to back
    /// is the one that meets the closed connection (a review found a 1 ms
    /// idle threshold let every such write through).
    fn closed_while_idle(&mut self) -> bool {
        if self.owed > 0 || !self.wbuf.is_empty() || self.looked {
            return false;
        }
        if !self.rbuf.is_empty() {
            return true;
        }
        self.looked = matches!(peek_without_waiting(&self.stream), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        !self.looked
    }

    /// Queues a request for `shard` (`ANY_SHARD`: let the node route) and
    /// returns its id; it is written by the next `flush` or `recv`.
    pub fn send(&mut self, req: &Request<'_>, shard: u16) -> Result<u64> {
        self.send_with(req, shard, Quorum::default())
    }

    /// [`Self::send`] with R/W overrides for a GET, PUT or DELETE.
    pub fn send_with(&mut self, req: &Request<'_>, shard: u16, quorum: Quorum) -> Result<u64> {
        self.queue(req, shard, quorum, self.timeout)
    }

    /// Queues a request the node may start within `budget`: the node drops
    /// it instead of running it once the client has stopped waiting.
    fn queue(&mut self, req: &Request<'_>, shard: u16, quorum: Quorum, budget: Duration) -> Result<u64> {
        self.check_usable()?;
        check_request(req)?;
        let id = self.next_id;
        self.next_id += 1;
        self.owed += 1;
        self.looked = false;
        let deadline_us = crate::wire::deadline_us_for(budget);
        req.encode_with(&mut self.wbuf, id, shard, deadline_us, quorum);
        Ok(id)
    }

    /// Writes every queued request (within the request timeout).
    pub fn flush(&mut self) -> Result<()> {
        self.flush_until(Instant::now() + self.timeout)
    }

    /// Writes every queued request before `deadline`.
    fn flush_until(&mut self, deadline: Instant) -> Result<()> {
        self.check_usable()?;
        let mut at = 0;
        while at < self.wbuf.len() {
            let res = match self.arm(deadline, true) {
                Ok(()) => self.stream.write(&self.wbuf[at..]),
                Err(e) => {
                    self.wbuf.clear();
                    return Err(e);
                }
            };
            match res {
                Ok(0) => {
                    self.wbuf.clear();
                    return Err(self.fail(io::Error::new(io::ErrorKind::WriteZero, "the node stopped reading")));
                }
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The socket's timeout was shorter than what is left.
                Err(e) if is_timeout(&e) && Instant::now() < deadline => {}
                Err(e) => {
                    self.wbuf.clear();
                    return Err(self.fail(e));
                }
            }
        }
        self.wbuf.clear();
        Ok(())
    }

    /// Before a blocking read (or write): fails with a timeout once
    /// `deadline` has passed, else makes the socket's timeout what is left
    /// (unless it is already within [`SOCKET_TIMEOUT_SLACK`] of it).
    fn arm(&mut self, deadline: Instant, write: bool) -> Result<()> {
        let left = left(deadline);
        if left.is_zero() {
            return Err(self.fail(io::ErrorKind::TimedOut.into()));
        }
        let set = if write { self.write_timeout } else { self.read_timeout };
        if set.abs_diff(left) <= SOCKET_TIMEOUT_SLACK {
            return Ok(());
        }
        let res =
            if write { self.stream.set_write_timeout(Some(left)) } else { self.stream.set_read_timeout(Some(left)) };
        res.map_err(|e| self.fail(e))?;
        if write {
            self.write_timeout = left;
        } else {
            self.read_timeout = left;
        }
        Ok(())
    }

    /// Refuses any use of a broken connection: a write cut part-way
    /// through a frame would have the next request's bytes read as the
    /// rest of it (a PUT's value the client never sent: found by a review),
    /// and after a protocol error nothing read can be trusted.
    fn check_usable(&self) -> Result<()> {
        if !self.broken {
            return Ok(());
        }
        let why = "the connection broke on an earlier error and cannot be used again; open a new one";
        Err(ClientError::Io { addr: self.addr, source: io::Error::new(io::ErrorKind::NotConnected, why) })
    }

    fn fail(&mut self, e: io::Error) -> ClientError {
        self.broken = true;
        if is_timeout(&e) {
            ClientError::Timeout { addr: self.addr, timeout: self.timeout }
        } else {
            ClientError::Io { addr: self.addr, source: e }
        }
    }

    fn protocol(&mut self, reason: String) -> ClientError {
        self.broken = true;
        ClientError::Protocol { addr: self.addr, reason }
    }

    /// The next reply: its request id and the reply (an error reply is
    /// `Err(ClientError::Server)` in the second field). Waits up to the
    /// request timeout.
    pub fn recv(&mut self) -> Result<(u64, Result<Reply>)> {
        self.recv_until(Instant::now() + self.timeout)
    }

    /// [`Self::recv`] that gives up at `deadline`.
    fn recv_until(&mut self, deadline: Instant) -> Result<(u64, Result<Reply>)> {
        self.flush_until(deadline)?;
        loop {
            match split_frame(&self.rbuf, MAX_BODY_LEN) {
                Ok(Some((header, total))) => {
                    let reply = Response::decode(header.opcode, &self.rbuf[HEADER_LEN..total])
                        .map_err(|e: WireError| e.to_string());
                    let reply = match reply {
                        Ok(r) => Reply::from_response(self.addr, r),
                        Err(e) => return Err(self.protocol(e)),
                    };
                    self.rbuf.drain(..total);
                    if header.request_id == 0 {
                        // The node's word on the whole connection (it
                        // refused it at its limit, or could not read a
                        // frame): no request is answered, and the
                        // connection is done. Its reason is the error.
                        self.broken = true;
                        return Err(match reply {
                            Err(e) => e,
                            Ok(r) => self.protocol(format!("{r:?} as a reply to request 0")),
                        });
                    }
                    self.owed = self.owed.saturating_sub(1);
                    self.stale_route |= header.flags & flags::STALE_ROUTE != 0;
                    return Ok((header.request_id, reply));
                }
                Ok(None) => {}
                Err(e) => return Err(self.protocol(e.to_string())),
            }
            self.arm(deadline, false)?;
            let at = self.rbuf.len();
            self.rbuf.resize(at + 64 * 1024, 0);
            let n = match self.stream.read(&mut self.rbuf[at..]) {
                Ok(n) => n,
                Err(e) => {
                    self.rbuf.truncate(at);
                    if e.kind() == io::ErrorKind::Interrupted || (is_timeout(&e) && Instant::now() < deadline) {
                        continue;
                    }
                    return Err(self.fail(e));
                }
            };
            self.rbuf.truncate(at + n);
            if n == 0 {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "the node closed the connection");
                return Err(self.fail(e));
            }
        }
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, req: &Request<'_>, shard: u16) -> Result<Reply> {
        self.call_with(req, shard, Quorum::default())
    }

    /// [`Self::call`] with R/W overrides.
    pub fn call_with(&mut self, req: &Request<'_>, shard: u16, quorum: Quorum) -> Result<Reply> {
        self.call_until(req, shard, quorum, Instant::now() + self.timeout)
    }

    /// [`Self::call_with`] that gives up at `deadline`.
    fn call_until(&mut self, req: &Request<'_>, shard: u16, quorum: Quorum, deadline: Instant) -> Result<Reply> {
        let id = self.queue(req, shard, quorum, left(deadline))?;
        let (got, reply) = self.recv_until(deadline)?;
        if got != id {
            return Err(self.protocol(format!("reply to request {got} while waiting for {id}")));
        }
        reply
    }
}

/// The deadline of a handshake with a node (its TCP connect and the PING
/// that learns its shard layout) that starts now in a call ending at
/// `deadline`, and how long that gives it: at most `connect_timeout`, so
/// that a node that accepts connections but never answers (a stopped
/// process) leaves the rest of the call to the other replicas.
pub(crate) fn handshake_deadline(config: &ClientConfig, deadline: Instant) -> (Instant, Duration) {
    let now = Instant::now();
    let deadline = deadline.min(now + config.connect_timeout);
    (deadline, deadline.saturating_duration_since(now))
}

/// A handshake's timeout says how long the handshake had.
pub(crate) fn handshake_error(e: ClientError, limit: Duration) -> ClientError {
    match e {
        ClientError::Timeout { addr, .. } => ClientError::Timeout { addr, timeout: limit },
        other => other,
    }
}

/// One node as the client sees it: its shard layout and a reused
/// connection per shard.
struct NodeConns {
    addr: SocketAddr,
    info: NodeInfo,
    /// One slot per shard (index = shard id), or a single slot when not
    /// shard-aware.
    conns: Vec<Option<Connection>>,
}

impl NodeConns {
    /// Connects to a node and learns its shard layout with a PING, before
    /// `deadline` and within `config.connect_timeout` (see
    /// [`handshake_deadline`]).
    fn connect(addr: SocketAddr, config: &ClientConfig, deadline: Instant) -> Result<NodeConns> {
        let (deadline, limit) = handshake_deadline(config, deadline);
        let mut conn = Connection::open(addr, config, deadline)?;
        let ping = conn.call_until(&Request::Ping, ANY_SHARD, Quorum::default(), deadline);
        let info = match ping.map_err(|e| handshake_error(e, limit))? {
            Reply::Pong(info) => info,
            other => return Err(conn.protocol(format!("PING answered with {other:?}"))),
        };
        if let Err(reason) = check_node_info(&info) {
            return Err(conn.protocol(reason));
        }
        let slots = if config.shard_aware { info.ports.len() } else { 1 };
        let mut conns: Vec<Option<Connection>> = (0..slots).map(|_| None).collect();
        let first = if config.shard_aware { info.shard as usize } else { 0 };
        if first < conns.len() {
            conns[first] = Some(conn);
        }
        Ok(NodeConns { addr, info, conns })
    }

    fn slot_for(&self, key: Option<&[u8]>, shard_aware: bool) -> (usize, u16) {
        slot_for(&self.info, key, shard_aware)
    }

    /// The connection of `slot`, opened (before `deadline`) if it has none
    /// or its last one broke.
    fn conn(&mut self, slot: usize, config: &ClientConfig, deadline: Instant) -> Result<&mut Connection> {
        if self.conns[slot].as_mut().is_some_and(|c| c.is_broken() || c.closed_while_idle()) {
            self.conns[slot] = None;
        }
        if self.conns[slot].is_none() {
            let addr =
                if config.shard_aware { SocketAddr::new(self.addr.ip(), self.info.ports[slot]) } else { self.addr };
            self.conns[slot] = Some(Connection::open(addr, config, deadline)?);
        }
        Ok(self.conns[slot].as_mut().expect("connected above"))
    }

    /// Sends one request to the right shard and waits for its reply until
    /// `deadline`; reads are retried once on a fresh connection after an
    /// I/O error, if time is left. Also returns whether the reply said the
    /// client's ring is stale.
    fn call(
        &mut self,
        req: &Request<'_>,
        quorum: Quorum,
        config: &ClientConfig,
        deadline: Instant,
    ) -> (Result<Reply>, bool) {
        let (slot, shard) = self.slot_for(req.key(), config.shard_aware);
        let retry = req.is_idempotent();
        // The stale flag comes with error replies too (a node that is no
        // replica relays its replica's error flagged).
        let mut once = || -> (Result<Reply>, bool) {
            let c = match self.conn(slot, config, deadline) {
                Ok(c) => c,
                Err(e) => return (Err(e), false),
            };
            let reply = c.call_until(req, shard, quorum, deadline);
            (reply, std::mem::take(&mut c.stale_route))
        };
        match once() {
            (Err(ClientError::Io { .. }), _) if retry && Instant::now() < deadline => once(),
            other => other,
        }
    }
}

/// How a client picks the node for a key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// Fetch the cluster's ring and send each request straight to a
    /// replica of its key (to the owning shard), as Dynamo's
    /// client-driven coordination. A lone node is its own replica.
    #[default]
    Client,
    /// Send everything to the node given; it coordinates or forwards, as
    /// behind a load balancer.
    Server,
}

/// The ring as a client uses it.
#[derive(Clone, Debug)]
pub struct RingView {
    pub ring: Ring,
    /// Replicas per key, and the cluster's default quorums.
    pub n: u8,
    pub r: u8,
    pub w: u8,
    /// Every partition's first N replicas, computed once per ring.
    pub prefs: PreferenceTable,
}

/// The members to try for `req`, best first (`core::coord::coordinator_order`
/// over the key's preference list). Empty for a request without a key.
pub(crate) fn ring_targets(view: &RingView, req: &Request<'_>) -> Vec<MemberIdx> {
    let Some(key) = req.key() else { return Vec::new() };
    let context = match req {
        Request::Put { context, .. } | Request::Delete { context, .. } => Some(*context),
        _ => None,
    };
    coordinator_order(view.prefs.of_key(key), context)
}

/// The connection slot of a node for a request on `key`, and the shard id
/// to put in its frame: the owning shard when shard-aware, else the single
/// slot and "any shard".
pub(crate) fn slot_for(info: &NodeInfo, key: Option<&[u8]>, shard_aware: bool) -> (usize, u16) {
    match key {
        Some(k) if shard_aware => {
            let s = partition::shard_of(k, info.partitions, info.ports.len());
            (s, s as u16)
        }
        _ => (0, ANY_SHARD),
    }
}

/// Checks a PING reply's node info before routing by it.
pub(crate) fn check_node_info(info: &NodeInfo) -> Result<(), String> {
    if info.ports.is_empty() {
        return Err(format!("node info without shard ports: {info:?}"));
    }
    partition::validate_partitions(info.partitions).map_err(|e| format!("node info {info:?}: {e}"))
}

/// Whether a replica's failure means it cannot serve now (unreachable,
/// silent, stopping or overloaded), so that it is tried last for a while
/// and a read moves on to the next replica. A read is safe to resend; a
/// write is not (it may have been taken), and stops at the first. Not a
/// refusal of the request itself (a bad context, a value too large).
pub(crate) fn replica_unavailable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Io { .. }
            | ClientError::Timeout { .. }
            | ClientError::Server { code: ErrorCode::ShuttingDown | ErrorCode::Overloaded, .. }
    )
}

/// `targets` with the members marked down (until after `now`) moved last:
/// a dead node costs a request a connection attempt only when nothing
/// better is left.
pub(crate) fn up_first(targets: &[MemberIdx], down_until: &[Option<Instant>], now: Instant) -> Vec<MemberIdx> {
    let (mut order, down): (Vec<MemberIdx>, Vec<MemberIdx>) =
        targets.iter().partition(|&&m| down_until[m as usize].is_none_or(|t| t <= now));
    order.extend(down);
    order
}

/// Decodes a RING reply into the view a client routes by.
pub(crate) fn ring_view(addr: SocketAddr, reply: Reply) -> Result<RingView> {
    match reply {
        Reply::Ring { n, r, w, ring } => {
            let bad = |reason: String| ClientError::Protocol { addr, reason };
            let ring = Ring::decode(&ring).map_err(|e| bad(format!("bad ring: {e}")))?;
            // Routing needs a replica for every key: a ring without members
            // (which decodes) or N = 0 would leave keys with none.
            if ring.members().is_empty() || n == 0 {
                return Err(bad(format!("a ring with {} members and N = {n} routes no key", ring.members().len())));
            }
            let prefs = ring.preference_table(n as usize);
            Ok(RingView { ring, n, r, w, prefs })
        }
        other => Err(ClientError::Protocol { addr, reason: format!("RING answered with {other:?}") }),
    }
}

/// A blocking client of a node or of a cluster, with one reused
/// connection per shard of each node it talks to.
pub struct Client {
    config: ClientConfig,
    /// The node given to `connect`.
    seed: NodeConns,
    /// The cluster's ring, when routing by it.
    ring: Option<RingView>,
    /// Connections to ring members, by member index.
    members: Vec<Option<NodeConns>>,
    /// Members that could not be reached, until when they are tried last.
    down_until: Vec<Option<Instant>>,
    /// R/W overrides sent with every GET, PUT and DELETE.
    quorum: Quorum,
}

/// Resolves `addr` ("host:port") to its socket addresses, in the
/// resolver's order, giving up at `deadline`. An address written as an IP
/// needs no lookup. A name is looked up on a thread of its own, since the
/// system resolver takes no timeout: when the deadline passes first, the
/// call returns and the thread finishes on its own.
pub fn resolve(addr: &str, deadline: Instant) -> Result<Vec<SocketAddr>> {
    if let Ok(ip) = addr.parse::<SocketAddr>() {
        return Ok(vec![ip]);
    }
    let name = addr.to_string();
    resolved(addr, within(deadline, move || name.to_socket_addrs().map(Vec::from_iter)))
}

/// What a lookup of `addr` gave (`None`: no answer before the deadline),
/// as both clients take it: at least one address, or why not.
pub(crate) fn resolved(addr: &str, found: Option<io::Result<Vec<SocketAddr>>>) -> Result<Vec<SocketAddr>> {
    let found = found
        .ok_or_else(|| ClientError::Resolve(format!("{addr}: no answer from the resolver in time")))?
        .map_err(|e| ClientError::Resolve(format!("{addr}: {e}")))?;
    if found.is_empty() {
        return Err(ClientError::Resolve(format!("{addr}: no address")));
    }
    Ok(found)
}

/// Runs `f` on a thread of its own and returns its result, or `None` if
/// `deadline` passes first (or the thread could not be started, or `f`
/// panicked).
fn within<T: Send + 'static>(deadline: Instant, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    if left(deadline).is_zero() {
        return None;
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("gyre-resolve".into())
        .spawn(move || {
            // The caller may have stopped waiting; the result is then dropped.
            let _ = tx.send(f());
        })
        .ok()?;
    rx.recv_timeout(left(deadline)).ok()
}

/// Calls `connect` with each of `addrs` in turn until one succeeds; the
/// last error if none does. A name that resolves to several addresses
/// (`localhost`: `::1`, then `127.0.0.1`) reaches a node listening on any
/// of them, as `TcpStream::connect` does.
pub(crate) fn first_that_connects<T>(
    addrs: &[SocketAddr],
    mut connect: impl FnMut(SocketAddr) -> Result<T>,
) -> Result<T> {
    let mut last = None;
    for &addr in addrs {
        match connect(addr) {
            Ok(conn) => return Ok(conn),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("resolve returns at least one address"))
}

/// The most requests one `get_many` call has unanswered on a connection.
/// It once wrote every request before reading a reply: with more requests
/// than the sockets hold, the node stopped reading (its reply budget full
/// of replies no one read) while the client blocked writing, until the
/// deadline. A full window of the longest keys is 32 × (24 + 2 + 2 KiB)
/// bytes, 65 KiB: a receive buffer of Linux's default size (128 KiB)
/// takes it whole while the node reads nothing. 32 in flight is still
/// far more than a round trip needs to keep a shard busy.
pub const GET_MANY_WINDOW: usize = 32;

const _: () = assert!(GET_MANY_WINDOW > 0 && GET_MANY_WINDOW <= crate::wire::MAX_IN_FLIGHT);
const _: () = assert!(GET_MANY_WINDOW * (crate::wire::HEADER_LEN + 2 + crate::limits::MAX_KEY_LEN) <= 128 * 1024);

impl Client {
    /// Connects to a node with the default settings.
    pub fn connect(addr: &str) -> Result<Client> {
        Client::connect_with(addr, ClientConfig::default())
    }

    /// Connects to a node, learns its shard layout with a PING and, when
    /// routing by the ring, fetches the cluster's ring (a lone node has
    /// none: every request then goes to it). A name is resolved first, and
    /// each of its addresses tried in turn ([`resolve`]). All of it is one
    /// call: it ends within `config.request_timeout`.
    pub fn connect_with(addr: &str, config: ClientConfig) -> Result<Client> {
        let deadline = Instant::now() + config.request_timeout;
        let addrs = resolve(addr, deadline)?;
        let seed = first_that_connects(&addrs, |addr| NodeConns::connect(addr, &config, deadline))?;
        let mut client =
            Client { config, seed, ring: None, members: Vec::new(), down_until: Vec::new(), quorum: Quorum::default() };
        if client.config.routing == Routing::Client {
            client.refresh_ring_until(deadline)?;
        }
        Ok(client)
    }

    /// The deadline of a call starting now.
    fn deadline(&self) -> Instant {
        Instant::now() + self.config.request_timeout
    }

    /// Sets R/W overrides for every later GET, PUT and DELETE (0: the
    /// namespace's default).
    pub fn set_quorum(&mut self, quorum: Quorum) {
        self.quorum = quorum;
    }

    /// Asks the seed node for the cluster's ring.
    pub fn fetch_ring(&mut self) -> Result<RingView> {
        self.fetch_ring_until(self.deadline())
    }

    fn fetch_ring_until(&mut self, deadline: Instant) -> Result<RingView> {
        let reply = self.seed.call(&Request::Ring, Quorum::default(), &self.config, deadline).0?;
        ring_view(self.seed.addr, reply)
    }

    /// Fetches the ring again (after a node said it is stale); a lone
    /// node leaves the client without one.
    pub fn refresh_ring(&mut self) -> Result<()> {
        self.refresh_ring_until(self.deadline())
    }

    fn refresh_ring_until(&mut self, deadline: Instant) -> Result<()> {
        match self.fetch_ring_until(deadline) {
            Ok(view) => {
                if self.ring.as_ref().is_none_or(|old| old.ring != view.ring) {
                    self.members = (0..view.ring.members().len()).map(|_| None).collect();
                    self.down_until = vec![None; view.ring.members().len()];
                }
                self.ring = Some(view);
                Ok(())
            }
            Err(ClientError::Server { code: ErrorCode::NotClustered, .. }) => {
                self.ring = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The ring the client routes by, if any.
    pub fn ring(&self) -> Option<&RingView> {
        self.ring.as_ref()
    }

    /// The seed node's identity and shard ports.
    pub fn node_info(&self) -> &NodeInfo {
        &self.seed.info
    }

    /// The shard that owns `key` on the seed node.
    pub fn shard_of(&self, key: &[u8]) -> usize {
        partition::shard_of(key, self.seed.info.partitions, self.seed.info.ports.len())
    }

    fn targets(&self, req: &Request<'_>) -> Vec<MemberIdx> {
        self.ring.as_ref().map_or_else(Vec::new, |view| ring_targets(view, req))
    }

    /// Sends one request: by the ring to a replica of its key when the
    /// client routes by it, else to the seed. Routing by the ring moves on
    /// to the next replica when one cannot be connected to (nothing was
    /// sent), and for a read also when the connection fails; a write that
    /// may have been sent is never sent again (it could add a sibling).
    /// All of that shares one deadline, `request_timeout` from now.
    pub fn call(&mut self, req: &Request<'_>) -> Result<Reply> {
        // Refused before anything is routed: a request no node takes must
        // not open connections, or mark replicas down when it cannot
        // (found by a review; the async client checked first already).
        check_request(req)?;
        let deadline = self.deadline();
        let targets = self.targets(req);
        let (reply, stale) = if targets.is_empty() {
            self.seed.call(req, self.quorum, &self.config, deadline)
        } else {
            self.call_replicas(req, &targets, deadline)
        };
        if stale && self.config.routing == Routing::Client && Instant::now() < deadline {
            // Best effort, in what is left of the call: the reply itself
            // (an error reply too) is good either way.
            let _ = self.refresh_ring_until(deadline);
        }
        reply
    }

    fn call_replicas(&mut self, req: &Request<'_>, targets: &[MemberIdx], deadline: Instant) -> (Result<Reply>, bool) {
        let is_read = matches!(req, Request::Get { .. });
        let now = Instant::now();
        let order = up_first(targets, &self.down_until, now);
        let mut last = None;
        for (tried, &m) in order.iter().enumerate() {
            let i = m as usize;
            let addr = self.ring.as_ref().expect("targets come from the ring").ring.member(m).addr;
            if let Some(e) = last.take_if(|_| Instant::now() >= deadline) {
                // Out of time: the replicas not tried are not marked down.
                return (Err(e), false);
            }
            if self.members[i].is_none() {
                match NodeConns::connect(addr, &self.config, deadline) {
                    Ok(n) => self.members[i] = Some(n),
                    Err(e) => {
                        self.down_until[i] = Some(Instant::now() + MEMBER_RETRY_AFTER);
                        last = Some(e);
                        continue;
                    }
                }
            }
            let node = self.members[i].as_mut().expect("connected above");
            let (slot, _) = node.slot_for(req.key(), self.config.shard_aware);
            if let Err(e) = node.conn(slot, &self.config, deadline) {
                self.down_until[i] = Some(Instant::now() + MEMBER_RETRY_AFTER);
                last = Some(e);
                continue;
            }
            let until = attempt_deadline(deadline, order.len() - tried, is_read);
            let (reply, stale) = node.call(req, self.quorum, &self.config, until);
            if reply.as_ref().is_err_and(replica_unavailable) {
                // Tried last for a while, by writes too; but only a read
                // moves on (a write may have been taken). A node that is
                // stopping or overloaded counts too: a read stopped at it
                // during a rolling restart (found by a review).
                self.down_until[i] = Some(Instant::now() + MEMBER_RETRY_AFTER);
                if is_read {
                    last = reply.err();
                    continue;
                }
                return (reply, stale);
            }
            self.down_until[i] = None;
            return (reply, stale);
        }
        (Err(last.expect("at least one replica was tried")), false)
    }

    /// Every concurrent value of `key` and the context to write back with.
    pub fn get(&mut self, key: &[u8]) -> Result<Versions> {
        match self.call(&Request::Get { key })? {
            Reply::Get(v) => Ok(v),
            other => Err(self.unexpected(other)),
        }
    }

    /// Writes `value` as the successor of what `context` saw (empty: a new
    /// sibling beside whatever is there).
    pub fn put(&mut self, key: &[u8], value: &[u8], context: &Context) -> Result<Put> {
        match self.call(&Request::Put { key, context: &context.0, value })? {
            Reply::Put(p) => Ok(p),
            other => Err(self.unexpected(other)),
        }
    }

    /// Deletes the versions `context` saw; concurrent writes survive.
    pub fn delete(&mut self, key: &[u8], context: &Context) -> Result<Context> {
        match self.call(&Request::Delete { key, context: &context.0 })? {
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
    pub fn update(&mut self, key: &[u8], mut merge: impl FnMut(&[Vec<u8>]) -> Vec<u8>) -> Result<Put> {
        let mut siblings = 0;
        for _ in 0..MAX_UPDATE_ATTEMPTS {
            let read = self.get(key)?;
            let value = merge(&read.values);
            let put = self.put(key, &value, &read.context)?;
            if put.siblings <= 1 {
                return Ok(put);
            }
            siblings = put.siblings;
        }
        Err(ClientError::Conflict { attempts: MAX_UPDATE_ATTEMPTS, siblings })
    }

    /// Pipelined gets to the seed node: up to [`GET_MANY_WINDOW`] requests
    /// wait on each connection, and a reply is read before a full window
    /// takes another. One call: it ends within the request timeout. A key
    /// the protocol refuses fails the whole call before anything is sent;
    /// an error reply fails only its key. After any other error the
    /// connections that still owed replies are closed, so that no stale
    /// reply reaches a later call.
    pub fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Result<Versions>>> {
        for key in keys {
            check_request(&Request::Get { key })?;
        }
        let deadline = self.deadline();
        let res = self.get_many_until(keys, deadline);
        if res.is_err() {
            // No stale reply may reach a later call.
            for conn in &mut self.seed.conns {
                if conn.as_ref().is_some_and(|c| c.owed > 0) {
                    *conn = None;
                }
            }
        }
        res
    }

    fn get_many_until(&mut self, keys: &[&[u8]], deadline: Instant) -> Result<Vec<Result<Versions>>> {
        // Replies each connection owes: every call before this one ended
        // with none owed, or with its connection dropped.
        let owed = |conns: &[Option<Connection>], slot: usize| conns[slot].as_ref().map_or(0, |c| c.owed);
        let slots = self.seed.conns.len();
        let mut by_id = std::collections::HashMap::with_capacity(keys.len().min(GET_MANY_WINDOW * slots));
        let mut results: Vec<Option<Result<Versions>>> = (0..keys.len()).map(|_| None).collect();
        let mut sent = 0;
        for _ in 0..keys.len() {
            // Queue requests in key order until one meets a full window.
            let mut full = None;
            while let Some(key) = keys.get(sent) {
                let (slot, shard) = self.seed.slot_for(Some(key), self.config.shard_aware);
                if owed(&self.seed.conns, slot) == GET_MANY_WINDOW {
                    full = Some(slot);
                    break;
                }
                let c = self.seed.conn(slot, &self.config, deadline)?;
                let id = c.queue(&Request::Get { key }, shard, self.quorum, left(deadline))?;
                by_id.insert((slot, id), sent);
                sent += 1;
            }
            for slot in 0..slots {
                if owed(&self.seed.conns, slot) > 0 {
                    self.seed.conn(slot, &self.config, deadline)?.flush_until(deadline)?;
                }
            }
            // One reply: from the full window's connection, else from any
            // connection still owing one. Replies on one connection may
            // come in any order.
            let slot = full
                .or_else(|| (0..slots).find(|&slot| owed(&self.seed.conns, slot) > 0))
                .expect("a request is unanswered");
            let c = self.seed.conn(slot, &self.config, deadline)?;
            let (id, reply) = c.recv_until(deadline)?;
            // Removed once answered: a second reply to it is unknown.
            let Some(i) = by_id.remove(&(slot, id)) else {
                return Err(c.protocol(format!("reply to unknown request {id}")));
            };
            let addr = c.addr;
            results[i] = Some(reply.and_then(|r| match r {
                Reply::Get(v) => Ok(v),
                other => Err(ClientError::Protocol { addr, reason: format!("GET answered {other:?}") }),
            }));
        }
        Ok(results.into_iter().map(|r| r.expect("every id got a reply")).collect())
    }

    /// The seed node's identity (a PING).
    pub fn ping(&mut self) -> Result<NodeInfo> {
        let deadline = self.deadline();
        match self.seed.call(&Request::Ping, Quorum::default(), &self.config, deadline).0? {
            Reply::Pong(info) => Ok(info),
            other => Err(self.unexpected(other)),
        }
    }

    /// One shard's counters of the seed node, as JSON. A shard the node
    /// does not have is refused (it answered for its last one; found by a
    /// review); without shard-aware routing only the shard at the address
    /// given is reachable.
    pub fn stats(&mut self, shard: usize) -> Result<String> {
        let deadline = self.deadline();
        let slot = stats_slot(shard, &self.seed.info, self.config.shard_aware)?;
        let c = self.seed.conn(slot, &self.config, deadline)?;
        match c.call_until(&Request::Stats, shard as u16, Quorum::default(), deadline)? {
            Reply::Stats(s) => Ok(s),
            other => Err(self.unexpected(other)),
        }
    }

    fn unexpected(&self, r: Reply) -> ClientError {
        ClientError::Protocol { addr: self.seed.addr, reason: format!("unexpected reply {r:?}") }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;

    use super::*;

    /// An IP address is taken as it is; a name is looked up, but never
    /// past the call's deadline: the system resolver takes no timeout, and
    /// `connect_with` promised to end within `request_timeout` while its
    /// lookup could hang for as long as the resolver's retries took.
    #[test]
    fn a_name_is_resolved_within_the_deadline() {
        let later = Instant::now() + Duration::from_secs(30);
        assert_eq!(resolve("127.0.0.1:7700", Instant::now()).unwrap(), vec!["127.0.0.1:7700".parse().unwrap()]);
        let local = resolve("localhost:7700", later).unwrap();
        assert!(!local.is_empty() && local.iter().all(|a| a.ip().is_loopback() && a.port() == 7700), "{local:?}");
        let e = resolve("localhost:7700", Instant::now()).unwrap_err();
        assert!(matches!(&e, ClientError::Resolve(m) if m.contains("in time")), "{e:?}");
        let e = resolve("no port here", later).unwrap_err();
        assert!(matches!(e, ClientError::Resolve(_)), "{e:?}");
        // A lookup that takes longer than the deadline is given up on.
        let started = Instant::now();
        let hung = within(started + Duration::from_millis(50), || thread::sleep(Duration::from_secs(10)));
        assert!(hung.is_none() && started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert_eq!(within(later, || 7), Some(7));
    }

    /// Each address of a name is tried in turn: `localhost` that resolves
    /// to `::1` first reaches a node on 127.0.0.1 (the client took only the
    /// first address, so `--node localhost:7700` failed where IPv6's
    /// loopback comes first).
    #[test]
    fn each_address_is_tried_until_one_connects() {
        let refused = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let open = TcpListener::bind("127.0.0.1:0").unwrap();
        let live = open.local_addr().unwrap();
        let limit = Duration::from_secs(5);
        let connect = |a| TcpStream::connect_timeout(&a, limit).map_err(|e| connect_error(a, e, limit));
        let mut tried = Vec::new();
        let conn = first_that_connects(&[refused, live], |a| {
            tried.push(a);
            connect(a)
        })
        .unwrap();
        assert_eq!((conn.peer_addr().unwrap(), tried), (live, vec![refused, live]));
        let e = first_that_connects(&[refused], connect).unwrap_err();
        assert!(matches!(e, ClientError::Io { addr, .. } if addr == refused), "{e:?}");
    }

    #[test]
    fn a_write_may_have_landed_only_when_no_answer_came_or_its_coordinator_stored_it() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let server = |code| ClientError::Server { code, message: String::new() };
        let io = ClientError::Io { addr, source: io::ErrorKind::BrokenPipe.into() };
        for (e, landed) in [
            (ClientError::Timeout { addr, timeout: Duration::from_secs(1) }, true),
            (io, true),
            (server(ErrorCode::QuorumFailed), true),
            (server(ErrorCode::InvalidContext), false),
            (server(ErrorCode::ValueTooLarge), false),
            (ClientError::Invalid("key".into()), false),
            (ClientError::Protocol { addr, reason: "unknown flags 0x0002".into() }, true),
        ] {
            assert_eq!(e.write_may_have_landed(), landed, "{e:?}");
        }
    }

    /// A shard the node does not have is refused, not answered by its
    /// last one (found by a review: `gyre stats --shard 5` on a two-shard
    /// node printed shard 1's counters and exited 0).
    #[test]
    fn stats_of_a_shard_the_node_does_not_have_is_refused() {
        let two = NodeInfo { node_id: 1, partitions: 64, shard: 0, ports: vec![7000, 7001] };
        assert_eq!(stats_slot(1, &two, true).unwrap(), 1);
        let e = stats_slot(5, &two, true).unwrap_err().to_string();
        assert!(e.contains("shards 0 to 1"), "{e}");
        let one = NodeInfo { ports: vec![7000], ..two.clone() };
        assert!(matches!(stats_slot(1, &one, true), Err(ClientError::Invalid(_))));
        assert_eq!(stats_slot(0, &one, true).unwrap(), 0);
    }

    /// Found by a review: without shard-aware routing the one connection
    /// goes to the shard at the address given, and STATS of any other
    /// shard came back with that one's counters.
    #[test]
    fn without_shard_awareness_stats_reach_only_the_shard_at_the_address() {
        let at_1 = NodeInfo { node_id: 1, partitions: 64, shard: 1, ports: vec![7000, 7001] };
        assert_eq!(stats_slot(1, &at_1, false).unwrap(), 0, "the one connection");
        let e = stats_slot(0, &at_1, false).unwrap_err().to_string();
        assert!(e.contains("only shard 1"), "{e}");
        assert!(stats_slot(2, &at_1, false).is_err());
    }

    #[test]
    fn context_text_roundtrip() {
        let c = Context(vec![0x01, 0xab, 0x00]);
        assert_eq!(c.to_string(), "01ab00");
        assert_eq!("01AB00".parse::<Context>().unwrap(), c);
        assert_eq!("".parse::<Context>().unwrap(), Context::default());
        assert!("abc".parse::<Context>().is_err());
        assert!("zz".parse::<Context>().is_err());
    }

    #[test]
    fn context_parsing_refuses_hostile_text_without_panicking() {
        let too_long = "00".repeat(MAX_CONTEXT_LEN + 1);
        let hostile = [
            "aé1", // 4 bytes: a slice of 2 splits the 'é'
            "é",
            "éé",
            "ab€",
            "€",
            "🦀🦀",
            "0\u{301}",
            "a",
            "abc",
            "+1",
            "-1",
            "+f",
            "0x",
            "0x01",
            "zz",
            "g0",
            "\0\0",
            "a b ",
            too_long.as_str(),
        ];
        for text in hostile {
            let parsed = std::panic::catch_unwind(|| text.parse::<Context>());
            let parsed = parsed.unwrap_or_else(|_| panic!("parsing {text:?} panicked"));
            assert!(parsed.is_err(), "{text:?} parsed as {parsed:?}");
        }
        // Empty (or blank) text is the documented "no context".
        assert_eq!("".parse::<Context>(), Ok(Context::default()));
        assert_eq!(" \n".parse::<Context>(), Ok(Context::default()));
        assert_eq!(" 0aFf ".parse::<Context>(), Ok(Context(vec![0x0a, 0xff])));
        assert_eq!("00".repeat(MAX_CONTEXT_LEN).parse::<Context>(), Ok(Context(vec![0; MAX_CONTEXT_LEN])));
    }

    proptest::proptest! {
        // A fixed seed: the same cases on every run.
        #![proptest_config(proptest::test_runner::Config { rng_seed: proptest::test_runner::RngSeed::Fixed(0x6779_7265), ..Default::default() })]

        #[test]
        fn context_parsing_never_panics(text in proptest::prelude::any::<String>()) {
            let _ = text.parse::<Context>();
        }

        #[test]
        fn context_text_roundtrips(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let c = Context(bytes);
            proptest::prop_assert_eq!(c.to_string().parse::<Context>(), Ok(c));
        }
    }

    #[test]
    fn connect_timeouts_are_timeout_errors() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let limit = Duration::from_millis(250);
        for kind in [io::ErrorKind::TimedOut, io::ErrorKind::WouldBlock] {
            let e = connect_error(addr, kind.into(), limit);
            assert!(matches!(e, ClientError::Timeout { addr: a, timeout } if a == addr && timeout == limit), "{e:?}");
        }
        let e = connect_error(addr, io::ErrorKind::ConnectionRefused.into(), limit);
        assert!(matches!(e, ClientError::Io { .. }), "{e:?}");
    }

    #[test]
    fn requests_are_checked_before_sending() {
        assert!(check_request(&Request::Get { key: b"" }).is_err());
        assert!(check_request(&Request::Get { key: &[0; crate::limits::MAX_KEY_LEN + 1] }).is_err());
        let big = vec![0; MAX_CONTEXT_LEN + 1];
        assert!(check_request(&Request::Delete { key: b"k", context: &big }).is_err());
        assert!(check_request(&Request::Put { key: b"k", context: b"", value: b"v" }).is_ok());
    }
}
