//! `gyre node`: one glommio executor per shard, each pinned to a core,
//! each serving its own port and owning its partitions' storage.
//!
//! Owns: starting and stopping shards, the cross-shard channel mesh, the
//! routing rule, and turning decoded requests into replies.
//!
//! Routing rule (also in ARCHITECTURE.md): a key's partition is
//! `partition_of(xxh3(key), Q)`, and partition `p` belongs to shard
//! `p * S / Q` (contiguous ranges). Shard `i` listens on port `listen.port + i` (or an ephemeral
//! port each when `listen.port` is 0); a PING reply lists every shard's
//! port so a client can connect straight to the owner. A request that
//! lands on another shard is forwarded as its raw frame through the
//! glommio channel mesh and the owner's encoded reply comes back the same
//! way: no locks, no shared state between shards.
//!
//! Invariant: only the owning shard touches a key's storage; a shard
//! thread never blocks (all waiting is async), and after a shutdown
//! request a shard finishes every request it has read, flushes and syncs
//! its log, and only then exits.

pub mod cluster;
pub mod config;
mod conn;
mod coordinate;
mod front;
pub mod memory;
mod peer;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use glommio::channels::channel_mesh::{MeshBuilder, Senders};
use glommio::channels::shared_channel::ConnectedReceiver;
use serde::Serialize;

use crate::auth::ClusterKeys;
use crate::core::partition::{key_hash, shard_of_hash};
use crate::core::version::VersionSet;
use crate::notify::Notify;
use crate::shell::{now_ms, open_shard, run_executor_with, spawn_background, DiskEngine, Stop};
use crate::storage::backend::glommio::GlommioBackend;
use crate::storage::{PendingWrite, StorageError};
use crate::store::{Store, StoreError};
use crate::wire::{ErrorCode, Header, NodeInfo, Request, Response, WireError, HEADER_LEN};
pub use config::{open_data_dir, DataDir, NodeConfig};

/// Queue depth of each shard-to-shard channel; a full channel makes the
/// forwarding task wait (backpressure) rather than grow memory.
const MESH_CHANNEL_SIZE: usize = 1024;
/// How often a shard checks the process-wide shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(20);
/// How long a failed start waits for the other shards to stop.
const STARTUP_FAILURE_GRACE: Duration = Duration::from_secs(5);
/// How long a shutdown waits for connections to take their last replies.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a node start waits for a listening address still held by a
/// process that just exited.
const BIND_RETRY: Duration = Duration::from_secs(1);
/// The longest gap between two compaction passes; a pass comes sooner
/// when compaction falls behind (`shell::spawn_background`).
const COMPACT_EVERY: Duration = Duration::from_secs(5);
/// How long a shard waits before accepting again after `accept` failed
/// (out of descriptors, say): the listener stays readable, so retrying at
/// once would spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Raises the process's soft limit on open descriptors to its hard
/// limit (as Redis does for its `maxclients`): every client connection is
/// a descriptor, and the usual soft limit of 1,024 would refuse clients
/// long before memory or CPU run short. Returns the limit now in force.
fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain system calls on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

/// A message between shards.
enum Cross {
    /// A whole request frame (with its header, already validated) for the
    /// receiving shard to execute.
    Request { from: usize, tag: u64, header: Header, frame: Vec<u8>, deadline: Option<Instant> },
    /// The encoded reply frame to request `tag`.
    Reply { tag: u64, frame: Vec<u8> },
}

/// Adds one to a counter; whether it was the first (a warning logged once
/// a shard, the counter saying how many followed).
pub(crate) fn bump_first(c: &Cell<u64>) -> bool {
    bump(c, 1);
    c.get() == 1
}

/// Adds `n` to a counter.
pub(crate) fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// One count in a shard's gauge (a counter that goes down too), taken when
/// made and given back when dropped, however its task or wait ends. It
/// holds the shard, so it can be taken before a task is spawned and moved
/// into it: a task not yet polled is running work too (found by reviews:
/// a coordinator's end, or a reader, read as idle with a task spawned and
/// not yet polled).
pub(crate) struct Gauged {
    shard: Rc<Shard>,
    gauge: fn(&Shard) -> &Cell<u64>,
}

impl Gauged {
    pub(crate) fn new(shard: &Rc<Shard>, gauge: fn(&Shard) -> &Cell<u64>) -> Gauged {
        bump(gauge(shard), 1);
        Gauged { shard: shard.clone(), gauge }
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        let gauge = (self.gauge)(&self.shard);
        gauge.set(gauge.get() - 1);
    }
}

impl ShardCounters {
    /// Places of the members' reserve taken: connections that named a
    /// member, and those admitted past the limit that must name one.
    pub(crate) fn reserve_used(&self) -> u64 {
        self.member_connections.get() + self.provisional_connections.get()
    }
}

/// Counters of one shard, reported by STATS.
#[derive(Default, Serialize)]
pub struct ShardCounters {
    pub connections_accepted: Cell<u64>,
    pub connections_open: Cell<u64>,
    /// Connections refused at the configured `max_connections`.
    pub connections_refused: Cell<u64>,
    /// Open connections that named a member of the cluster (HELLO) while
    /// the members' reserve had room: they do not count against
    /// `max_connections`.
    pub member_connections: Cell<u64>,
    /// Open connections admitted past `max_connections` into the members'
    /// reserve that have not named a member yet (`conn::Standing`).
    pub provisional_connections: Cell<u64>,
    pub requests: Cell<u64>,
    /// Requests this shard received for keys another shard owns.
    pub forwarded_out: Cell<u64>,
    /// Requests other shards handed to this one.
    pub forwarded_in: Cell<u64>,
    /// Frames refused as malformed (their connection closed); an
    /// oversized one within the protocol's limit is skipped and the
    /// connection goes on.
    pub malformed_frames: Cell<u64>,
    /// Connections closed because a frame they began stayed unfinished,
    /// nothing sent, for `frame_timeout_ms`.
    pub stalled_frames: Cell<u64>,
    /// Replica messages refused (Unauthenticated) on connections that had
    /// not proved the cluster secret (AUTH).
    pub unauthenticated: Cell<u64>,
    /// AUTHs refused (their connection closed): a wrong proof, or one that
    /// answered no challenge of its connection.
    pub auth_failures: Cell<u64>,
    /// With `accept_unauthenticated`: replica messages taken from
    /// connections that proved nothing. Once it stops growing after every
    /// member has the secret, the cluster can drop the setting.
    pub unauthenticated_taken: Cell<u64>,
    /// Member connections closed for a frame that failed its seal: sent
    /// unsealed after the AUTH (a member of an older build), or whose tag
    /// did not match (changed, replayed, reordered or injected on the
    /// way).
    pub seal_failures: Cell<u64>,
    pub error_replies: Cell<u64>,
    pub deadline_exceeded: Cell<u64>,
    /// Socket writes of replies and replies written: their ratio is how
    /// many replies share one write.
    pub reply_writes: Cell<u64>,
    pub replies: Cell<u64>,
    /// Gauge: requests running in tasks of their own (reads from disk, a
    /// cluster's coordination), their replies still to come.
    pub requests_running: Cell<u64>,
    /// Gauge: connections whose reader waits, reading nothing more, until
    /// their client reads its replies or their running requests end (the
    /// bounds of `conn::Outbox::full`).
    pub readers_waiting: Cell<u64>,
    /// Requests whose lookups were prefetched in stages with the other
    /// connections of their batch (`conn::prefetch`): how often the shard
    /// was busy enough to overlap its cache misses.
    pub prefetched: Cell<u64>,
}

/// One shard's state, shared by its tasks (one thread).
pub struct Shard {
    id: usize,
    shards: usize,
    partitions: u32,
    node_id: u64,
    ports: Vec<u16>,
    store: Store<GlommioBackend>,
    /// Largest request body this shard reads (checked from the header)
    /// of a client's request: a PUT of the largest value.
    max_body: usize,
    /// The same for a replica write, which carries a key's whole stored
    /// set: larger on a cluster member (elsewhere it is refused anyway).
    max_replica_body: usize,
    /// How long a connection may leave a frame it began unfinished, sending
    /// nothing (`frame_timeout_ms`; `None`: no limit).
    frame_timeout: Option<Duration>,
    senders: Senders<Cross>,
    /// Mesh peer index of each shard (the mesh numbers executors in the
    /// order they joined, not by shard id).
    peer_of: Vec<usize>,
    /// Forwarded requests waiting for their reply, by tag.
    pending: RefCell<HashMap<u64, Rc<ReplySlot>>>,
    next_tag: Cell<u64>,
    pub counters: ShardCounters,
    shutting_down: Cell<bool>,
    /// Fires once, when `shutting_down` is set (every connection reader
    /// waits on it beside its socket).
    shutdown: Notify,
    /// Fires when a connection closes (only the shutdown drain waits on
    /// it, so a close does not wake every reader).
    closed: Notify,
    /// The cluster this node belongs to (`None`: a lone node, which
    /// serves every key itself).
    cluster: Option<coordinate::ClusterState>,
    /// Writes of this shard's connections waiting to settle, in log order,
    /// and GETs of versions not yet durable.
    settling: conn::Settling,
}

/// What [`Shard::answer_now`] did with a request.
enum Answer {
    /// Nothing: the request goes through `dispatch`.
    No,
    /// Its reply is appended to the connection's replies.
    Now,
    /// A write appended but not yet settled, or a GET of a version not yet
    /// durable: its reply, to send once that settles.
    Settle(PendingWrite, conn::HeldReply),
}

/// Where a forwarded request's reply frame lands.
type ReplySlot = crate::notify::Slot<Vec<u8>>;

impl Shard {
    /// The shard that owns `key`.
    fn owner(&self, key: &[u8]) -> usize {
        self.owner_of_hash(key_hash(key))
    }

    /// The shard that owns the key with hash `hash`.
    fn owner_of_hash(&self, hash: u64) -> usize {
        shard_of_hash(hash, self.partitions, self.shards)
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// Completes once shutdown has begun.
    async fn shutdown_requested(&self) {
        self.shutdown.wait_until(|| self.shutting_down.get()).await
    }

    fn error_frame(&self, request_id: u64, code: ErrorCode, message: &str) -> Vec<u8> {
        bump(&self.counters.error_replies, 1);
        let mut out = Vec::with_capacity(HEADER_LEN + 4 + message.len());
        Response::Error { code, message }.encode(&mut out, request_id, self.id as u16);
        out
    }

    /// The reply to request `id`, whose deadline passed before it ran.
    fn deadline_exceeded(&self, id: u64) -> Vec<u8> {
        bump(&self.counters.deadline_exceeded, 1);
        self.error_frame(id, ErrorCode::DeadlineExceeded, "the request's deadline passed before it ran")
    }

    /// Runs one validated request (`frame` = header + body), which
    /// `arrived` (its last byte read), here or on its `owner` shard and
    /// returns the encoded reply frame. Its deadline counts from its
    /// arrival, not from now: a request that waited in the connection's
    /// buffer behind replies its client did not read has used that time.
    async fn dispatch(self: Rc<Self>, header: Header, frame: Vec<u8>, owner: usize, arrived: Instant) -> Vec<u8> {
        let deadline = header.deadline().map(|budget| arrived + budget);
        if owner == self.id {
            return self.execute(header, &frame, deadline).await;
        }
        // Boxed, like the rarer branches of `execute`: every request's
        // future is as large as its largest branch, and one under 1 KiB
        // comes from the allocator's per-thread cache.
        Box::pin(self.forward(header, frame, owner, deadline)).await
    }

    /// Sends a request to its owner shard through the mesh and waits for
    /// the reply frame.
    async fn forward(&self, header: Header, frame: Vec<u8>, owner: usize, deadline: Option<Instant>) -> Vec<u8> {
        bump(&self.counters.forwarded_out, 1);
        let tag = self.next_tag.get();
        self.next_tag.set(tag + 1);
        let slot = Rc::new(ReplySlot::default());
        self.pending.borrow_mut().insert(tag, slot.clone());
        let msg = Cross::Request { from: self.id, tag, header, frame, deadline };
        if self.senders.send_to(self.peer_of[owner], msg).await.is_err() {
            self.pending.borrow_mut().remove(&tag);
            return self.error_frame(header.request_id, ErrorCode::ShuttingDown, "the owning shard is gone");
        }
        slot.take().await
    }

    /// Executes a request this shard owns.
    async fn execute(self: &Rc<Self>, header: Header, frame: &[u8], deadline: Option<Instant>) -> Vec<u8> {
        let id = header.request_id;
        bump(&self.counters.requests, 1);
        if deadline.is_some_and(|d| Instant::now() > d) {
            return self.deadline_exceeded(id);
        }
        let (req, quorum) = match Request::decode_with(&header, &frame[HEADER_LEN..]) {
            Ok(r) => r,
            Err(e) => return self.error_frame(id, e.code(), &e.to_string()),
        };
        if self.cluster.is_some() && req.is_quorum_op() {
            return Box::pin(self.coordinate(&header, req, quorum, deadline)).await;
        }
        let shard = self.id as u16;
        let mut out = Vec::new();
        let result: Result<Vec<u8>, StoreError> = async {
            match req {
                Request::Ping => Response::Pong(self.info()).encode(&mut out, id, shard),
                Request::Stats => Response::Stats(&self.stats_json()).encode(&mut out, id, shard),
                Request::Get { key } => {
                    let set = self.store.get(key).await?;
                    out = self.store.with_context_of(set.clock(), key, None, |c| self.get_reply(id, &set, c));
                }
                Request::Put { key, context, value } => {
                    let w = self.store.put(key, context, Some(value), now_ms()).await?;
                    out = self
                        .store
                        .with_context_of(w.context(), key, None, |c| self.write_reply(id, true, c, w.siblings()));
                }
                Request::Delete { key, context } => {
                    let w = self.store.put(key, context, None, now_ms()).await?;
                    out = self
                        .store
                        .with_context_of(w.context(), key, None, |c| self.write_reply(id, false, c, w.siblings()));
                }
                Request::Ring => match &self.cluster {
                    Some(c) => {
                        let [n, r, w] = c.info.quorum_bytes();
                        Response::Ring { n, r, w, ring: &c.info.ring_bytes }.encode(&mut out, id, shard)
                    }
                    None => {
                        return Ok(self.error_frame(id, ErrorCode::NotClustered, "this node is not part of a cluster"))
                    }
                },
                // A connection answers every HELLO and AUTH it reads
                // (`conn::Standing`): none is dispatched. Were one to be,
                // there is no connection here to hold a challenge or a proof.
                Request::Hello { .. } | Request::Auth { .. } => {
                    let why = "a HELLO or an AUTH is answered by the connection that reads it";
                    return Ok(self.error_frame(id, ErrorCode::Internal, why));
                }
                Request::ReplicaGet { .. } | Request::ReplicaPut { .. } => {
                    if self.cluster.is_none() {
                        return Ok(self.error_frame(id, ErrorCode::NotClustered, "this node is not part of a cluster"));
                    }
                    out = Box::pin(self.serve_replica(id, req)).await?;
                }
            }
            Ok(out)
        }
        .await;
        result.unwrap_or_else(|e| self.store_error_frame(id, &e))
    }

    /// The key hash of a request whose key this shard owns: a lookup in
    /// its store is coming (on a lone node at once, in a cluster as the
    /// coordinator's local read or write, or a replica's), so it is worth
    /// prefetching. (In a cluster the key may not be stored on this node;
    /// that prefetch only fetches a useless line.)
    fn local_key_hash(&self, req: &Request<'_>) -> Option<u64> {
        let hash = key_hash(req.key()?);
        (self.owner_of_hash(hash) == self.id).then_some(hash)
    }

    /// Runs `req` at once when that needs no waiting: a lone node's GET,
    /// PUT or DELETE of a key this shard owns whose record is in memory
    /// (the deadline cannot have passed: it was set when the request was
    /// read). Spares the common request its copy and a future.
    ///
    /// A reply that may go out at once is appended to `out`. A write that
    /// must still settle (a durable write waiting for its group commit, or
    /// a full write buffer), or a GET of a version not yet durable, comes
    /// back as [`Answer::Settle`] with its reply apart: it may be sent only
    /// once that has settled.
    fn answer_now(&self, header: &Header, req: &Request<'_>, owner: usize, out: &mut Vec<u8>) -> Answer {
        if owner != self.id || self.cluster.is_some() {
            return Answer::No;
        }
        let (id, shard) = (header.request_id, self.id as u16);
        let start = out.len();
        // What the reply must wait for, if anything: a write appended but
        // not yet settled, or a GET of a version not yet durable.
        let result = match *req {
            Request::Get { key } => self
                .store
                .get_now(key, |context, values| Response::Get { context, values }.encode(out, id, shard))
                .map(|r| r.map(|((), unsettled)| unsettled)),
            Request::Put { key, context, value } => self.write_now(out, id, true, key, context, Some(value)),
            Request::Delete { key, context } => self.write_now(out, id, false, key, context, None),
            _ => return Answer::No,
        };
        let Some(result) = result else { return Answer::No };
        bump(&self.counters.requests, 1);
        match result {
            Err(e) => {
                out.extend_from_slice(&self.store_error_frame(id, &e));
                Answer::Now
            }
            Ok(None) => Answer::Now,
            Ok(Some(pending)) => {
                let reply = conn::HeldReply::from_slice(&out[start..]);
                out.truncate(start);
                Answer::Settle(pending, reply)
            }
        }
    }

    /// [`Self::answer_now`]'s PUT (`is_put`) or DELETE: its reply appended
    /// to `out`, and what it must wait for before it may go (`None`:
    /// settled already); `None` when it cannot be done at once.
    fn write_now(
        &self,
        out: &mut Vec<u8>,
        id: u64,
        is_put: bool,
        key: &[u8],
        context: &[u8],
        value: Option<&[u8]>,
    ) -> Option<Result<Option<PendingWrite>, StoreError>> {
        let reply = |context: &[u8], siblings| self.encode_write_reply(out, id, is_put, context, siblings);
        let result = self.store.put_now(key, context, value, now_ms(), reply)?;
        Some(result.map(|((), pending)| self.store.engine().settle_now(pending).err()))
    }

    /// The error reply of a failed key-value operation; failures of the
    /// node itself are logged, but not each request a failed or full
    /// shard refuses: the engine logged that state once as it began, and
    /// a line per refused request was over a million lines in 15 s of a
    /// full disk under load.
    fn store_error_frame(&self, request_id: u64, e: &StoreError) -> Vec<u8> {
        let code = error_code(e);
        let refused = matches!(
            e,
            StoreError::Storage(StorageError::Failed(_) | StorageError::DiskFull(_) | StorageError::Closed)
        );
        if refused {
            tracing::debug!(shard = self.id, error = %e, "request refused");
        } else if code == ErrorCode::StorageFailed || code == ErrorCode::Internal {
            tracing::error!(shard = self.id, error = %e, "request failed");
        }
        self.error_frame(request_id, code, &e.to_string())
    }

    /// A GET reply: the set's live values and `context` (its clock bound
    /// to the key, with a coordinator hint in a cluster).
    fn get_reply(&self, id: u64, set: &VersionSet, context: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let values: Vec<&[u8]> = set.live_values().collect();
        Response::Get { context, values }.encode(&mut out, id, self.id as u16);
        out
    }

    /// A PUT (`is_put`) or DELETE reply with the new version's `context`.
    fn write_reply(&self, id: u64, is_put: bool, context: &[u8], siblings: usize) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_write_reply(&mut out, id, is_put, context, siblings);
        out
    }

    /// [`Self::write_reply`] appended to `out`.
    fn encode_write_reply(&self, out: &mut Vec<u8>, id: u64, is_put: bool, context: &[u8], siblings: usize) {
        let shard = self.id as u16;
        if is_put {
            let siblings = siblings.min(u16::MAX as usize) as u16;
            Response::Put { context, siblings }.encode(out, id, shard)
        } else {
            Response::Delete { context }.encode(out, id, shard)
        }
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self.node_id,
            partitions: self.partitions,
            shard: self.id as u16,
            ports: self.ports.clone(),
        }
    }

    fn stats_json(&self) -> String {
        serde_json::json!({
            "node_id": format!("{:016x}", self.node_id),
            "shard": self.id,
            "shards": self.shards,
            "partitions": self.partitions,
            "node": &self.counters,
            "cluster_secret": self.keys().map(|k| serde_json::json!({
                "secrets": k.secrets(),
                "accept_unauthenticated": k.accepts_unauthenticated(),
            })),
            "cluster": self.cluster.as_ref().map(|c| serde_json::json!({
                "member": c.info.ring.member(c.info.me).name,
                "ring_version": c.info.ring.version(),
                "coordination": &c.counters,
                "peers": &c.peers.counters,
            })),
            "storage": self.store.engine().stats(),
            // What `storage.cache_bytes` may grow to on this shard.
            "cache_budget_bytes": self.store.engine().cache_budget(),
            "storage_failed": self.store.engine().failed(),
            "storage_full": self.store.engine().full(),
        })
        .to_string()
    }

    /// Serves the mesh channel from shard `peer`: requests from it are
    /// executed here, replies to our forwarded requests are handed over.
    async fn serve_peer(self: Rc<Self>, receiver: ConnectedReceiver<Cross>) {
        while let Some(msg) = receiver.recv().await {
            match msg {
                Cross::Request { from, tag, header, frame, deadline } => {
                    bump(&self.counters.forwarded_in, 1);
                    let me = self.clone();
                    glommio::spawn_local(async move {
                        let reply = me.execute(header, &frame, deadline).await;
                        // The origin is gone only if it is shutting down.
                        let _ = me.senders.send_to(me.peer_of[from], Cross::Reply { tag, frame: reply }).await;
                    })
                    .detach();
                }
                Cross::Reply { tag, frame } => {
                    if let Some(slot) = self.pending.borrow_mut().remove(&tag) {
                        slot.set(frame);
                    }
                }
            }
        }
    }
}

/// The error code a failed key-value operation is reported with.
fn error_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::InvalidContext(_) => ErrorCode::InvalidContext,
        StoreError::ValueTooLarge { .. } | StoreError::ObjectTooLarge { .. } => ErrorCode::ValueTooLarge,
        StoreError::TooManySiblings(_) => ErrorCode::TooManySiblings,
        StoreError::Contended => ErrorCode::Overloaded,
        StoreError::CorruptVersions(_) => ErrorCode::Internal,
        StoreError::Storage(s) => match s {
            StorageError::KeyLength(_) => ErrorCode::InvalidKey,
            StorageError::ValueTooLarge { .. } | StorageError::MetaTooLarge(_) => ErrorCode::ValueTooLarge,
            StorageError::Io { .. } | StorageError::Failed(_) | StorageError::DiskFull(_) => ErrorCode::StorageFailed,
            StorageError::Closed => ErrorCode::ShuttingDown,
            _ => ErrorCode::Internal,
        },
    }
}

/// What `run` reports once every shard is up.
#[derive(Clone, Debug)]
pub struct Started {
    pub node_id: u64,
    pub addrs: Vec<SocketAddr>,
}

/// The CPUs this process may run on, in increasing order: its affinity
/// mask (`sched_getaffinity`), which `taskset` and a container's cpuset
/// set; CPUs `0..available_parallelism` if it cannot be read. Never empty.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // writes at most `size_of::<cpu_set_t>()` bytes into it, and CPU_ISSET
    // reads it within CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    let cpus: Vec<usize> = if rc == 0 {
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    } else {
        cpus
    }
}

/// Runs a node until `shutdown` is set; returns once every shard has
/// drained, flushed and stopped. `on_start` is called once all shards
/// serve.
pub fn run(mut config: NodeConfig, shutdown: Arc<AtomicBool>, on_start: impl FnOnce(Started)) -> anyhow::Result<()> {
    // The CPUs this process may run on (taskset, a cgroup's cpuset): shard
    // `i` is pinned to the `i`-th of them, never to a CPU outside them.
    let cpus = allowed_cpus();
    let cores = cpus.len();
    let cluster = match &config.cluster {
        None => None,
        Some(path) => {
            let (file, ring) = cluster::ClusterFile::load(path)?;
            let name = match &config.name {
                Some(n) => n.clone(),
                None => match file.nodes.iter().find(|n| n.addr == config.listen) {
                    Some(n) => n.name.clone(),
                    None => anyhow::bail!(
                        "no node of {} has the address {}; say which node this is with --name",
                        path.display(),
                        config.listen
                    ),
                },
            };
            let cluster = cluster::Cluster::new(&file, ring, &name)
                .with_context(|| format!("joining the cluster of {}", path.display()))?;
            // A cluster member listens where the cluster file says; a
            // listen address set to another is a mistake, not ignored.
            let addr = cluster.ring.member(cluster.me).addr;
            if config.listen != addr && config.listen != NodeConfig::default().listen {
                anyhow::bail!(
                    "listen = {}, but {} gives node {name:?} the address {addr}: a cluster member listens where the \
                     cluster file says (drop the setting)",
                    config.listen,
                    path.display()
                );
            }
            config.listen = addr;
            // What its data directory records it serves (`NodeFile::serves`).
            config.name = Some(name);
            // The cluster file's partition count is the cluster's; a node
            // configured for another one is refused rather than silently
            // changed (the default gives way).
            let own = config.storage.partitions;
            if own != file.partitions && own != crate::core::partition::DEFAULT_PARTITIONS {
                anyhow::bail!(
                    "[storage] partitions = {own}, but {} has {}: a cluster member takes the cluster file's \
                     (remove the setting)",
                    path.display(),
                    file.partitions
                );
            }
            config.storage.partitions = file.partitions;
            Some(cluster)
        }
    };
    // `lock_data_dir` checks every setting before it creates or writes
    // anything in the data directory: a refused start must not fix its
    // shape.
    let mut data = config::lock_data_dir(&config, cores, fastrand::u64(1..))?;
    let shards = data.node.shards;
    let memory = memory::available();
    let disk = match crate::storage::backend::glommio::fs_space(&config.data_dir) {
        Ok(space) => Some(space),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the data directory's file system size; the default disk reserve is not capped");
            None
        }
    };
    let engine_config = config.shard_engine_config(shards, memory, disk.map(|d| d.total))?;
    let keys = match &config.cluster_secret_file {
        Some(current) => Some(
            ClusterKeys::load_all(current, &config.accept_cluster_secret_files)?
                .with_unauthenticated(config.accept_unauthenticated),
        ),
        // `NodeConfig::validate` refused the settings that need one.
        None => None,
    };
    match (&keys, &cluster) {
        (Some(k), _) if k.accepts_unauthenticated() => tracing::warn!(
            "cluster secret set, and accept_unauthenticated: unsigned contexts and members that prove nothing are \
             taken too, as without a secret (while the cluster turns its secret on or off)"
        ),
        (Some(_), _) => tracing::info!(
            accepted = config.accept_cluster_secret_files.len(),
            "cluster secret set: contexts are signed, and members prove the secret at connect"
        ),
        (None, Some(_)) => tracing::warn!(
            "no cluster secret (cluster_secret_file): any client of this port can send replica messages and forge \
             contexts, which can drop acknowledged writes; serve it to trusted clients only"
        ),
        (None, None) => {}
    }
    tracing::info!(
        disk_reserve_bytes = engine_config.disk_reserve(),
        disk_free_bytes = disk.map(|d| d.free),
        set = config.disk_reserve_bytes.is_some(),
        "writes are refused while the file system has less free space than the disk reserve"
    );
    if let Some(d) = disk.filter(|d| engine_config.disk_reserve() > d.total / 2) {
        tracing::warn!(
            disk_reserve_bytes = engine_config.disk_reserve(),
            disk_total_bytes = d.total,
            "the disk reserve is over half of the file system: writes will be refused with much of it unused \
             (set a smaller disk_reserve_bytes, or give it a larger disk or fewer shards)"
        );
    }
    tracing::info!(
        cache_bytes_per_shard = engine_config.cache_bytes,
        memory_available = memory,
        set = config.cache_bytes.is_some(),
        "record cache"
    );
    if let (Some(set), Some(memory)) = (config.cache_bytes, memory) {
        if set > memory {
            tracing::warn!(cache_bytes = set, memory, "cache_bytes is more than the memory this process may use");
        }
    }
    if (1..1 << 20).contains(&engine_config.cache_bytes) {
        tracing::warn!(
            cache_bytes_per_shard = engine_config.cache_bytes,
            "each shard's record cache is under 1 MiB: few records fit (a record may take an eighth of it at most)"
        );
    }
    match raise_fd_limit() {
        Ok(limit) if limit < (shards as u64).saturating_mul(config.max_connections) => tracing::info!(
            limit,
            max_connections = config.max_connections,
            "the descriptor limit caps client connections below max_connections per shard"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the descriptor limit"),
    }
    // Bind every listener here so that a taken port fails the start with
    // a clear error before any shard runs.
    let mut listeners = Vec::with_capacity(shards);
    for i in 0..shards {
        let mut addr = config.listen;
        if addr.port() != 0 {
            let port = addr.port() as usize + i;
            let port = u16::try_from(port).with_context(|| format!("no port for shard {i} after {}", config.listen))?;
            addr.set_port(port);
        }
        let l = bind_listener(addr).with_context(|| format!("listening on {addr} for shard {i}"))?;
        listeners.push(l);
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
    // Every port is ours: a new directory's shape is fixed now, before
    // any shard opens its storage.
    let fresh_actor = data.begin_run(fastrand::u64(1..))?;
    data.persist()?;
    if fresh_actor {
        tracing::warn!(
            actor = format!("{:016x}", data.node.actor()),
            "the last run did not stop cleanly (or a shard directory is gone): new versions carry a new actor id, so none can reuse a lost write's"
        );
    }
    let ports: Vec<u16> = addrs.iter().map(SocketAddr::port).collect();
    let mesh = MeshBuilder::<Cross, _>::full(shards, MESH_CHANNEL_SIZE);
    let ready = Arc::new(AtomicUsize::new(0));
    let peer_ids: Arc<Vec<AtomicUsize>> = Arc::new((0..shards).map(|_| AtomicUsize::new(usize::MAX)).collect());
    let members = cluster.as_ref().map_or(0, |c| c.ring.members().len());
    let ring_asked: Arc<[AtomicBool]> = (0..members).map(|_| AtomicBool::new(false)).collect();
    let gate = Arc::new(ActorGate::new(shards, data.clean_seqs()));
    let drained = Arc::new(AtomicUsize::new(0));
    // A client request is at most a PUT of the largest value; a clustered
    // node also takes replica writes, which carry a key's whole stored set.
    // Each is held to its own limit (a cluster member once read a client's
    // oversized PUT whole, up to the replica limit, before refusing it).
    let max_body = crate::wire::max_request_body(config.max_value_len);
    let max_replica_body = match cluster {
        Some(_) => crate::wire::MAX_BODY_LEN,
        None => max_body,
    };
    let (err_tx, err_rx) = std::sync::mpsc::channel::<anyhow::Error>();
    let mut threads = Vec::with_capacity(shards);
    for (i, listener) in listeners.into_iter().enumerate() {
        let setup = ShardSetup {
            id: i,
            shards,
            partitions: data.node.partitions,
            node_id: data.node.node_id,
            actor: gate.clone(),
            ports: ports.clone(),
            dir: data.shard_dir(i),
            engine_config: engine_config.clone(),
            max_value_len: config.max_value_len,
            accept_unbound_contexts: config.accept_unbound_contexts,
            keys: keys.clone(),
            max_connections: config.max_connections,
            tcp_keepalive_s: config.tcp_keepalive as u32,
            max_body,
            max_replica_body,
            frame_timeout: (config.frame_timeout_ms > 0).then(|| Duration::from_millis(config.frame_timeout_ms)),
            listener_fd: listener.into_raw_fd(),
            mesh: mesh.clone(),
            shutdown: shutdown.clone(),
            ready: ready.clone(),
            drained: drained.clone(),
            peer_ids: peer_ids.clone(),
            ring_asked: ring_asked.clone(),
            cluster: cluster.clone(),
        };
        let cpu = config.pin.then(|| cpus[i % cores]);
        let spin = Duration::from_micros(config.spin_before_park_us);
        let err_tx = err_tx.clone();
        let t = std::thread::Builder::new().name(format!("gyre-shard-{i}")).spawn(move || {
            let res = run_executor_with(&format!("shard-{i}"), cpu, spin, run_shard(setup)).and_then(|r| r);
            if let Err(e) = res {
                let _ = err_tx.send(e.context(format!("shard {i}")));
            }
        })?;
        threads.push(t);
    }
    drop(err_tx);
    // A start that fails stops the shards already running: they stop on
    // the flag; one stuck waiting for another (say, in the mesh join, or
    // for the actor) must not hang the process, so they get a bounded
    // time before we return anyway.
    let fail = |e: anyhow::Error| {
        shutdown.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + STARTUP_FAILURE_GRACE;
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(e)
    };
    // Wait until every shard serves (or one fails).
    loop {
        if let Ok(e) = err_rx.try_recv() {
            return fail(e);
        }
        // A shard ended before all serve, and not on a stop: it failed
        // (its error is sent before it ends) or panicked. The others
        // waited for it for ever (a review's reading).
        if !shutdown.load(Ordering::SeqCst)
            && ready.load(Ordering::SeqCst) < shards
            && threads.iter().any(|t| t.is_finished())
        {
            let e = err_rx.try_recv().unwrap_or_else(|_| anyhow::anyhow!("a shard panicked while the node started"));
            return fail(e);
        }
        if gate.opened.load(Ordering::SeqCst) == shards && gate.actor.load(Ordering::SeqCst) == 0 {
            // Every shard recovered its storage; none takes a write before
            // this. Recovery that lost records (damage, a torn write)
            // after a clean stop needs a new actor as much as a crash does:
            // the lost records' dots may live on in replicas.
            let gone_back = data.shards_gone_back(&ActorGate::seqs(&gate.recovered));
            for &(shard, had, now) in &gone_back {
                tracing::warn!(
                    shard,
                    last_seq_at_clean_stop = had,
                    last_seq_now = now,
                    "a shard holds fewer records than at its clean stop (its directory emptied, or segments removed): \
                     they are lost"
                );
            }
            if (gate.damaged.load(Ordering::SeqCst) || !gone_back.is_empty()) && !fresh_actor {
                if let Err(e) = data.renew_actor(fastrand::u64(1..)) {
                    return fail(e);
                }
                tracing::warn!(
                    actor = format!("{:016x}", data.node.actor()),
                    "recovery lost records: new versions carry a new actor id, so none can reuse a lost write's"
                );
            }
            gate.actor.store(data.node.actor(), Ordering::SeqCst);
        }
        if ready.load(Ordering::SeqCst) == shards {
            break;
        }
        // Stopped while starting: every shard has ended (serving or not).
        if shutdown.load(Ordering::SeqCst) && threads.iter().all(|t| t.is_finished()) {
            tracing::info!("stopped while starting");
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if ready.load(Ordering::SeqCst) == shards {
        on_start(Started { node_id: data.node.node_id, addrs });
    }
    let mut panicked = false;
    for t in threads {
        panicked |= t.join().is_err();
    }
    // Keep the mesh builder (and the directory lock) alive until every
    // shard has exited.
    drop(mesh);
    let res = match err_rx.try_recv() {
        Ok(e) => Err(e),
        Err(_) if panicked => Err(anyhow::anyhow!("a shard thread panicked")),
        // Stopped before the actor was settled: no write was taken, but a
        // recovery that lost records may not have renewed it yet, so the
        // next start renews it, as after a crash.
        Err(_) if gate.actor.load(Ordering::SeqCst) == 0 => Ok(()),
        // Every shard drained, flushed and synced: the next start may keep
        // this run's actor.
        Err(_) => data.end_run_cleanly(ActorGate::seqs(&gate.closed)),
    };
    drop(data);
    res
}

/// Corruptions a shard's start lists one by one in its log; past them, a
/// count (a badly damaged segment could have thousands).
const CORRUPTIONS_LOGGED: usize = 20;

/// What recovery found beyond the ordinary, where an operator sees it:
/// each damaged region (segment, offset, length, why), rejected hints, and
/// the bytes cut from the log's end as a torn write.
fn log_recovery(shard: usize, report: &crate::storage::RecoveryReport) {
    for c in report.corruptions.iter().take(CORRUPTIONS_LOGGED) {
        tracing::warn!(shard, segment = c.seg, offset = c.off, len = c.len, reason = %c.reason, "recovery skipped a damaged region");
    }
    if report.corruptions.len() > CORRUPTIONS_LOGGED {
        let more = report.corruptions.len() - CORRUPTIONS_LOGGED;
        tracing::warn!(shard, more, "recovery skipped more damaged regions");
    }
    for h in &report.hint_errors {
        tracing::warn!(shard, hint = %h, "recovery rejected a hint file and scanned its segment instead");
    }
    if report.torn_tail_bytes > 0 {
        tracing::warn!(shard, bytes = report.torn_tail_bytes, "recovery cut a torn write from the end of the log");
    }
}

/// Binds a listener, retrying for [`BIND_RETRY`] while the address is in
/// use: the sockets of a node that just exited can stay bound for a few
/// milliseconds (glommio's rings are torn down after the process's last
/// close), and a supervisor that restarts a node at once must not fail.
fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let deadline = Instant::now() + BIND_RETRY;
    loop {
        match std::net::TcpListener::bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

struct ShardSetup {
    id: usize,
    shards: usize,
    partitions: u32,
    node_id: u64,
    /// Where this shard reports what its recovery found and learns the
    /// dot actor of its versions (see [`ActorGate`]).
    actor: Arc<ActorGate>,
    ports: Vec<u16>,
    dir: std::path::PathBuf,
    engine_config: crate::storage::EngineConfig,
    max_value_len: usize,
    accept_unbound_contexts: bool,
    /// The cluster secret's keys (`crate::auth`), if the node has one.
    keys: Option<ClusterKeys>,
    max_connections: u64,
    /// TCP keepalive idle seconds of client and peer connections (0: off).
    tcp_keepalive_s: u32,
    max_body: usize,
    max_replica_body: usize,
    frame_timeout: Option<Duration>,
    listener_fd: std::os::fd::RawFd,
    mesh: MeshBuilder<Cross, glommio::channels::channel_mesh::Full>,
    shutdown: Arc<AtomicBool>,
    ready: Arc<AtomicUsize>,
    drained: Arc<AtomicUsize>,
    /// Each shard's mesh peer index, published after joining.
    peer_ids: Arc<Vec<AtomicUsize>>,
    /// By member: whether one of this node's shards has asked it for its
    /// ring (or is asking), until the ask fails or a connection to it does
    /// (`node::peer`). One flag for the whole node, shared by its shards:
    /// an ask per shard made a node of S shards ask each member S times,
    /// and log a differing ring S times. Read on every keyed peer call (a
    /// relaxed load), written once per ask.
    ring_asked: Arc<[AtomicBool]>,
    /// The cluster this node belongs to.
    cluster: Option<cluster::Cluster>,
}

/// The start's rendezvous between the shards' recoveries and the choice
/// of the node's dot actor: every shard opens its storage, says whether
/// recovery lost records, and waits for the actor before it builds its
/// store (so before it takes any write).
struct ActorGate {
    /// Shards whose storage is open.
    opened: AtomicUsize,
    /// Some shard's recovery skipped damage or cut a torn write.
    damaged: std::sync::atomic::AtomicBool,
    /// Each shard's last log sequence number once its storage is open
    /// (compared with what `CLEAN` says it had: `DataDir::shards_gone_back`).
    recovered: Vec<std::sync::atomic::AtomicU64>,
    /// Each shard's last log sequence number once its storage is closed
    /// (what `CLEAN` records).
    closed: Vec<std::sync::atomic::AtomicU64>,
    /// The actor, once chosen (0: not yet; actors are never 0).
    actor: std::sync::atomic::AtomicU64,
}

impl ActorGate {
    /// `prior`: each shard's last sequence number at the last clean stop,
    /// if known. A shard that stops before it opens its storage leaves its
    /// data as it was, and `CLEAN` records that number again for it (found
    /// by a review: a stop while starting recorded 0, and a shard emptied
    /// after it went unnoticed).
    fn new(shards: usize, prior: Option<&[u64]>) -> ActorGate {
        let seqs = |from: Option<&[u64]>| {
            (0..shards).map(|i| std::sync::atomic::AtomicU64::new(from.map_or(0, |p| p[i]))).collect()
        };
        ActorGate {
            opened: AtomicUsize::new(0),
            damaged: Default::default(),
            recovered: seqs(None),
            closed: seqs(prior),
            actor: Default::default(),
        }
    }

    fn seqs(seqs: &[std::sync::atomic::AtomicU64]) -> Vec<u64> {
        seqs.iter().map(|s| s.load(Ordering::SeqCst)).collect()
    }
}

/// Counts a shard as drained however it exits, so that the others never
/// wait for a shard that failed to start.
struct DrainedGuard(Arc<AtomicUsize>);

impl Drop for DrainedGuard {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

async fn run_shard(s: ShardSetup) -> anyhow::Result<()> {
    // SAFETY: the fd came from a std listener this thread now owns alone.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(s.listener_fd) };
    listener.set_nonblocking(true).context("making the listener non-blocking")?;
    // Every connection accepted from it inherits the options.
    front::keep_alive(&listener, s.tcp_keepalive_s);
    let front = front::Front::new(s.tcp_keepalive_s).context("creating the shard's epoll instance")?;
    let listener = front.register(listener.into()).context("registering the listener")?;
    let drained = DrainedGuard(s.drained.clone());
    // Join the mesh first: every shard must join or the others wait forever.
    let (senders, mut receivers) = s.mesh.join().await.map_err(|e| anyhow::anyhow!("joining the shard mesh: {e}"))?;
    s.peer_ids[s.id].store(senders.peer_id(), Ordering::SeqCst);
    while s.peer_ids.iter().any(|p| p.load(Ordering::SeqCst) == usize::MAX) {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    let peer_of: Vec<usize> = s.peer_ids.iter().map(|p| p.load(Ordering::SeqCst)).collect();
    let (engine, report): (DiskEngine, _) = open_shard(&s.dir, s.engine_config.clone()).await?;
    log_recovery(s.id, &report);
    if report.lost_records() {
        s.actor.damaged.store(true, Ordering::SeqCst);
    }
    s.actor.recovered[s.id].store(engine.last_seq(), Ordering::SeqCst);
    s.actor.opened.fetch_add(1, Ordering::SeqCst);
    let actor = loop {
        match s.actor.actor.load(Ordering::SeqCst) {
            // A stop while the node starts (SIGTERM during recovery, say)
            // is a stop, not a failure: nothing was taken yet.
            0 if s.shutdown.load(Ordering::SeqCst) => {
                tracing::info!(shard = s.id, "stopped while the node was starting");
                engine.close().await.context("closing the shard's storage")?;
                s.actor.closed[s.id].store(engine.last_seq(), Ordering::SeqCst);
                return Ok(());
            }
            0 => glommio::timer::sleep(Duration::from_millis(1)).await,
            actor => break actor,
        }
    };
    tracing::info!(shard = s.id, keys = engine.len(), "shard storage open");
    let stop = Stop::default();
    spawn_background(&engine, &stop, COMPACT_EVERY);
    let keys = s.keys.map(Rc::new);
    let cluster = s.cluster.map(|c| coordinate::ClusterState::new(c, front.clone(), keys.clone(), s.ring_asked));
    let shard = Rc::new(Shard {
        id: s.id,
        shards: s.shards,
        partitions: s.partitions,
        node_id: s.node_id,
        ports: s.ports,
        store: Store::new(engine.clone(), actor, s.max_value_len)
            .with_unbound_contexts(s.accept_unbound_contexts)
            .with_keys(keys.clone()),
        max_body: s.max_body,
        frame_timeout: s.frame_timeout,
        max_replica_body: s.max_replica_body,
        senders,
        peer_of,
        pending: RefCell::new(HashMap::new()),
        next_tag: Cell::new(0),
        counters: ShardCounters::default(),
        shutting_down: Cell::new(false),
        shutdown: Notify::default(),
        closed: Notify::default(),
        settling: conn::Settling::default(),
        cluster,
    });
    let mesh_tasks: Vec<_> =
        receivers.streams().into_iter().map(|(_, r)| glommio::spawn_local(shard.clone().serve_peer(r))).collect();
    // Watch the process-wide flag.
    let watcher = {
        let (shard, flag) = (shard.clone(), s.shutdown.clone());
        glommio::spawn_local(async move {
            while !flag.load(Ordering::SeqCst) {
                glommio::timer::sleep(SHUTDOWN_POLL).await;
            }
            shard.shutting_down.set(true);
            shard.shutdown.notify_all();
        })
    };
    let front_task = glommio::spawn_local(front.clone().run());
    s.ready.fetch_add(1, Ordering::SeqCst);
    // Accept until shutdown.
    let mut accept_failing = false;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.shutdown_requested().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(fd)) => {
                accept_failing = false;
                bump(&shard.counters.connections_accepted, 1);
                // Members' connections (HELLO) do not count against the
                // limit; past it, a cluster node admits a connection into
                // a reserve for members, where its first frame must name
                // one (found by a review: idle clients at the limit locked
                // the members out of each other).
                let c = &shard.counters;
                let members = c.reserve_used();
                let clients = c.connections_open.get().saturating_sub(members);
                let provisional = clients >= s.max_connections;
                if provisional && (shard.cluster.is_none() || members >= conn::MEMBER_RESERVE) {
                    bump(&shard.counters.connections_refused, 1);
                    refuse_connection(&shard, fd, s.max_connections);
                    continue;
                }
                match front.register(fd) {
                    Ok(sock) => {
                        let standing = conn::Standing::new(shard.clone(), provisional);
                        glommio::spawn_local(conn::serve(shard.clone(), sock, standing)).detach();
                    }
                    Err(e) => tracing::warn!(shard = s.id, error = %e, "registering a connection failed"),
                }
            }
            Some(Err(e)) => {
                // Said once per run of failures (out of descriptors fails
                // every try until a connection closes).
                if !std::mem::replace(&mut accept_failing, true) {
                    tracing::warn!(shard = s.id, error = %e, "accept failed; retrying every {ACCEPT_RETRY:?}");
                }
                glommio::timer::sleep(ACCEPT_RETRY).await;
            }
        }
    }
    drop(listener);
    watcher.await;
    // Drain: every connection finishes what it has read and writes its
    // replies; a client that stops reading its socket is given up on after
    // a grace period instead of holding the shutdown forever.
    let drain = async {
        shard.closed.wait_until(|| shard.counters.connections_open.get() == 0).await;
        true
    };
    let grace = async {
        glommio::timer::sleep(SHUTDOWN_GRACE).await;
        false
    };
    if !futures_lite::future::or(drain, grace).await {
        let open = shard.counters.connections_open.get();
        tracing::warn!(shard = s.id, open, "connections still open after the shutdown grace period; dropping them");
    }
    // Keep serving forwarded requests until every shard has drained.
    drop(drained);
    while s.drained.load(Ordering::SeqCst) < s.shards {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    shard.senders.close();
    for t in mesh_tasks {
        t.await;
    }
    front.stop();
    front_task.await;
    engine.begin_close();
    stop.stop().await;
    engine.close().await.context("flushing the log at shutdown")?;
    s.actor.closed[s.id].store(engine.last_seq(), Ordering::SeqCst);
    tracing::info!(shard = s.id, "shard stopped");
    Ok(())
}

/// Tells a client over the connection limit why, then closes its socket:
/// one `Overloaded` error frame (request id 0, as no request was read),
/// sent without waiting (a new socket's buffer takes it).
fn refuse_connection(shard: &Shard, fd: std::os::fd::OwnedFd, max: u64) {
    let frame = shard.connection_refusal(&format!("too many connections: this shard serves at most {max}"));
    let stream = std::net::TcpStream::from(fd);
    let _ = std::io::Write::write(&mut &stream, &frame);
}

impl Shard {
    /// The refusal of a whole connection: an Overloaded ERROR with request
    /// id 0, which both clients and a peer (`peer::refused_at_accept`)
    /// read as "this connection is not served".
    pub(super) fn connection_refusal(&self, message: &str) -> Vec<u8> {
        self.error_frame(0, ErrorCode::Overloaded, message)
    }
}

/// The reply to a frame whose header is unreadable (named by its request
/// id when the magic at least matched).
fn decode_error_frame(shard: &Shard, header: &[u8; HEADER_LEN], e: &WireError) -> Vec<u8> {
    bump(&shard.counters.malformed_frames, 1);
    shard.error_frame(crate::wire::peek_request_id(header).unwrap_or(0), e.code(), &e.to_string())
}

impl Shard {
    /// Whether `name` is a member of this node's cluster (a lone node has
    /// none).
    pub(super) fn is_member(&self, name: &[u8]) -> bool {
        self.member_of(name).is_some()
    }

    /// The index of the member named `name`, if it is one.
    pub(super) fn member_of(&self, name: &[u8]) -> Option<crate::core::ring::MemberIdx> {
        let name = std::str::from_utf8(name).ok()?;
        self.cluster.as_ref()?.info.ring.index_of(name)
    }

    /// The name of member `idx` (`None` on a lone node).
    pub(super) fn member_name(&self, idx: crate::core::ring::MemberIdx) -> Option<&[u8]> {
        Some(self.cluster.as_ref()?.info.ring.member(idx).name.as_bytes())
    }

    /// This node's own member name (`None` on a lone node).
    pub(super) fn own_name(&self) -> Option<&[u8]> {
        self.member_name(self.cluster.as_ref()?.info.me)
    }

    /// The cluster secret's keys, if the node has one.
    pub(super) fn keys(&self) -> Option<&ClusterKeys> {
        self.store.keys()
    }

    /// The reply to a HELLO: taken if it named a `member` of this cluster
    /// (with the `challenge` its AUTH must answer, if the node has a
    /// cluster secret), refused otherwise.
    pub(super) fn hello_reply(
        &self,
        id: u64,
        member: bool,
        challenge: Option<[u8; crate::wire::CHALLENGE_LEN]>,
    ) -> Vec<u8> {
        match (member, &self.cluster) {
            (true, _) => {
                let mut out = Vec::with_capacity(HEADER_LEN + crate::wire::CHALLENGE_LEN);
                Response::Hello { challenge }.encode(&mut out, id, self.id as u16);
                out
            }
            (false, Some(_)) => self.error_frame(id, ErrorCode::Malformed, "HELLO names no member of this cluster"),
            (false, None) => self.error_frame(id, ErrorCode::NotClustered, "this node is not part of a cluster"),
        }
    }

    /// The largest body this shard reads of the frame whose header
    /// starts `buf` (a replica write's limit, or a client request's).
    fn max_body(&self, buf: &[u8]) -> usize {
        match buf.first_chunk::<HEADER_LEN>().and_then(crate::wire::peek_opcode) {
            Some(crate::wire::op::REPLICA_PUT) => self.max_replica_body,
            _ => self.max_body,
        }
    }

    /// The reply to a frame of `len` body bytes over this node's `max`: a
    /// PUT's value is too large for this node (`ValueTooLarge`, as the
    /// store answers a value just over the limit), anything else is a
    /// frame too large.
    fn oversized_frame_reply(&self, header: &[u8; HEADER_LEN], len: usize, max: usize) -> Vec<u8> {
        let id = crate::wire::peek_request_id(header).unwrap_or(0);
        if crate::wire::peek_opcode(header) == Some(crate::wire::op::PUT) {
            let limit = self.store.max_value_len();
            let message = format!("a PUT of {len} bytes is over this node's value limit of {limit} bytes");
            return self.error_frame(id, ErrorCode::ValueTooLarge, &message);
        }
        let e = WireError::FrameTooLarge { len, max };
        self.error_frame(id, e.code(), &e.to_string())
    }

    /// The reply to a well-framed request whose body does not decode.
    fn request_error_frame(&self, request_id: u64, e: &WireError) -> Vec<u8> {
        if !e.keeps_connection() {
            bump(&self.counters.malformed_frames, 1);
        }
        self.error_frame(request_id, e.code(), &e.to_string())
    }
}
