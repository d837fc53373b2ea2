//! The glommio driver of the quorum coordinators in `core::coord`: one
//! shard's part in a cluster.
//!
//! Owns: turning a client GET, PUT or DELETE on a key this node replicates
//! into a coordinator run (its messages to the local store and to peers,
//! their answers, its timer), forwarding a request this node does not
//! replicate to one that does, and serving the replica messages of other
//! coordinators.
//!
//! Invariant: the decisions (when a quorum is reached, what is merged,
//! which replica is repaired) are all made by the sans-IO coordinators;
//! this module only moves messages and times. A coordinator runs in its
//! own task, so a read's repair goes on after the client has its reply,
//! and every run ends by the request's deadline.
//!
//! Read repair: a get coordinator queues its repairs as soon as the read
//! is decided, and again when a later answer changes the merge (possibly
//! right at the request's deadline). Each repair is sent with a budget of
//! its own, [`REPAIR_TIMEOUT`] from when it leaves, not with the request's
//! deadline, which may have passed by then (the peer layer drops a frame
//! whose deadline passed unsent). `read_repairs` in STATS counts the repairs
//! a replica acknowledged; `read_repair_failures` those that got no ack
//! (the replica refused, was unreachable, or the budget ran out).
//!
//! A put that fails its quorum is not acknowledged, but it is not undone
//! either: the coordinator and any replica that acked keep the new
//! version, and a later read may return it (Dynamo's semantics; the
//! client's retry with the read's context supersedes it cleanly).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cluster::Cluster;
use super::peer::{PeerError, Peers};
use super::{bump, error_code, Gauged, Shard};
use crate::core::coord::{
    coordinator_order, GetCoordinator, Limit, PutCoordinator, QuorumError, QuorumFailure, ReplicaFailure, ReplicaMsg,
    Transmit,
};
use crate::core::ring::MemberIdx;
use crate::core::version::VersionSet;
use crate::notify::{Notify, Slot};
use crate::shell::now_ms;
use crate::wire::{decode_reply_frame, flags, patch_reply, ErrorCode, Header, Quorum, Request, Response, HEADER_LEN};

/// Time a quorum operation may take when the client set no deadline.
pub const DEFAULT_QUORUM_TIMEOUT: Duration = Duration::from_secs(2);

/// Time one read-repair write may take, from when it is sent. A repair is
/// background work that no client waits for, so it does not inherit the
/// read's deadline (a repair decided by an answer that came at the
/// deadline would be dropped unsent); it gets what a quorum write gets by
/// default, so a replica that takes writes in time takes repairs in time.
pub const REPAIR_TIMEOUT: Duration = DEFAULT_QUORUM_TIMEOUT;

/// Counters of a shard's cluster work, reported by STATS.
#[derive(Default, Serialize)]
pub struct ClusterCounters {
    pub coordinated_gets: Cell<u64>,
    pub coordinated_puts: Cell<u64>,
    /// Client requests sent on to a replica because this node is not one.
    pub proxied: Cell<u64>,
    /// Requests a member relayed here for keys this node does not
    /// replicate, refused with RingMismatch ([`Shard::misrouted_relay`]).
    pub misrouted_relays: Cell<u64>,
    pub quorum_failures: Cell<u64>,
    /// Repair writes (after reads that found stale or missing replicas)
    /// that the replica acknowledged.
    pub read_repairs: Cell<u64>,
    /// Repair writes that got no acknowledgement: refused, unreachable, or
    /// not answered within [`REPAIR_TIMEOUT`].
    pub read_repair_failures: Cell<u64>,
    /// Replica messages served for other coordinators.
    pub replica_gets: Cell<u64>,
    pub replica_puts: Cell<u64>,
    /// Gauge: coordinators still running (one lives past its client's reply
    /// until every replica answered or its deadline passed) and read
    /// repairs still waiting for their acknowledgement. 0 when the node's
    /// cluster work is all done.
    pub tasks_running: Cell<u64>,
}

/// A shard's cluster state.
pub struct ClusterState {
    pub info: Cluster,
    pub peers: Rc<Peers>,
    pub counters: ClusterCounters,
    /// Time zero of the coordinators' microsecond clock.
    epoch: Instant,
}

impl ClusterState {
    pub(super) fn new(
        info: Cluster,
        front: Rc<super::front::Front>,
        keys: Option<Rc<crate::auth::ClusterKeys>>,
        ring_asked: std::sync::Arc<[std::sync::atomic::AtomicBool]>,
    ) -> ClusterState {
        ClusterState {
            peers: Rc::new(Peers::new(&info, front, keys, ring_asked)),
            info,
            counters: ClusterCounters::default(),
            epoch: Instant::now(),
        }
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }
}

/// A replica's answer to one message: its set for a get (`None`: not
/// found), nothing for a put.
type Answer = Result<Option<VersionSet>, ReplicaFailure>;

/// The two coordinators, seen alike by the driver loop.
trait Coordinator {
    type Out;
    fn handle(&mut self, from: MemberIdx, answer: Answer, now: u64);
    fn handle_timeout(&mut self, now: u64);
    fn poll_transmit(&mut self) -> Option<Transmit>;
    fn poll_outcome(&mut self) -> Option<Result<Self::Out, QuorumError>>;
    fn poll_timeout(&self) -> Option<u64>;
    fn is_done(&self) -> bool;
    /// Whether `t` is a read-repair write (sent with its own budget, and
    /// answered to nobody).
    fn is_repair(&self, _t: &Transmit) -> bool {
        false
    }
}

impl Coordinator for PutCoordinator {
    type Out = ();
    fn handle(&mut self, from: MemberIdx, answer: Answer, now: u64) {
        match answer {
            Ok(_) => self.handle_ack(from, now),
            Err(why) => self.handle_failure(from, why, now),
        }
    }
    fn handle_timeout(&mut self, now: u64) {
        PutCoordinator::handle_timeout(self, now)
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        PutCoordinator::poll_transmit(self)
    }
    fn poll_outcome(&mut self) -> Option<Result<(), QuorumError>> {
        PutCoordinator::poll_outcome(self).map(|r| r.map(|_| ()))
    }
    fn poll_timeout(&self) -> Option<u64> {
        PutCoordinator::poll_timeout(self)
    }
    fn is_done(&self) -> bool {
        PutCoordinator::is_done(self)
    }
}

impl Coordinator for GetCoordinator {
    /// The merged set and the replica that answered first.
    type Out = (VersionSet, Option<MemberIdx>);
    fn handle(&mut self, from: MemberIdx, answer: Answer, now: u64) {
        match answer {
            Ok(set) => self.handle_reply(from, set, now),
            Err(why) => self.handle_failure(from, why, now),
        }
    }
    fn handle_timeout(&mut self, now: u64) {
        GetCoordinator::handle_timeout(self, now)
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        GetCoordinator::poll_transmit(self)
    }
    fn poll_outcome(&mut self) -> Option<Result<Self::Out, QuorumError>> {
        let fastest = self.fastest();
        GetCoordinator::poll_outcome(self).map(|r| r.map(|set| (set, fastest)))
    }
    fn poll_timeout(&self) -> Option<u64> {
        GetCoordinator::poll_timeout(self)
    }
    fn is_done(&self) -> bool {
        GetCoordinator::is_done(self)
    }
    fn is_repair(&self, t: &Transmit) -> bool {
        matches!(t.msg, ReplicaMsg::Put { .. })
    }
}

/// A version set as stored and sent: `(meta, value)`.
type Encoded = (Vec<u8>, Vec<u8>);

/// A coordinator's message as the driver sends it: a put carries its set
/// (for the local store) and the set's encoding (for peers).
enum Outgoing {
    Get,
    Put { set: Arc<VersionSet>, bytes: Rc<Encoded> },
}

/// Answers arriving for one coordinator run.
#[derive(Default)]
struct Inbox {
    answers: RefCell<VecDeque<(MemberIdx, Answer)>>,
    changed: Notify,
}

impl Shard {
    fn cluster(&self) -> &ClusterState {
        self.cluster.as_ref().expect("called only on a clustered node")
    }

    /// Runs a client GET, PUT or DELETE in the cluster: coordinates it if
    /// this node replicates the key, forwards it to a replica otherwise.
    /// Returns the reply frame.
    pub(super) async fn coordinate(
        self: &Rc<Self>,
        header: &Header,
        req: Request<'_>,
        quorum: Quorum,
        deadline: Option<Instant>,
    ) -> Vec<u8> {
        let id = header.request_id;
        let cs = self.cluster();
        let key = req.key().expect("quorum operations have a key");
        let deadline = deadline.unwrap_or_else(|| Instant::now() + DEFAULT_QUORUM_TIMEOUT);
        let (r, w) = match cs.info.quorum(key, quorum) {
            Ok(rw) => rw,
            Err(e) => return self.error_frame(id, ErrorCode::InvalidQuorum, &e),
        };
        let replicas = cs.info.replicas(key);
        if !replicas.contains(&cs.info.me) {
            return self.proxy(header, &req, quorum, replicas, deadline).await;
        }
        match req {
            Request::Get { key } => {
                bump(&cs.counters.coordinated_gets, 1);
                let coord = match GetCoordinator::new(replicas, r, cs.micros(Instant::now()), cs.micros(deadline)) {
                    Ok(c) => c,
                    Err(e) => return self.error_frame(id, ErrorCode::InvalidQuorum, &e.to_string()),
                };
                match self.clone().run_coordinator(key, coord, deadline).await {
                    Ok((set, fastest)) => {
                        let hint = Some(fastest.unwrap_or(cs.info.me));
                        self.store.with_context_of(set.clock(), key, hint, |c| self.get_reply(id, &set, c))
                    }
                    Err(e) => self.quorum_error(id, &e),
                }
            }
            Request::Put { key, context, value } => {
                self.coordinate_put(id, key, context, Some(value), replicas, w, deadline).await
            }
            Request::Delete { key, context } => {
                self.coordinate_put(id, key, context, None, replicas, w, deadline).await
            }
            _ => unreachable!("only quorum operations are coordinated"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn coordinate_put(
        self: &Rc<Self>,
        id: u64,
        key: &[u8],
        context: &[u8],
        value: Option<&[u8]>,
        replicas: &[MemberIdx],
        w: usize,
        deadline: Instant,
    ) -> Vec<u8> {
        let cs = self.cluster();
        bump(&cs.counters.coordinated_puts, 1);
        let me = cs.info.me;
        // The new version is made here, from this replica's versions and
        // the client's context; the others merge it in.
        let written = match self.store.put(key, context, value, now_ms()).await {
            Ok(wr) => wr,
            Err(e) => return self.error_frame(id, error_code(&e), &e.to_string()),
        };
        let others: Vec<MemberIdx> = replicas.iter().copied().filter(|&m| m != me).collect();
        // Owned: the reply is built once the replicas answered.
        let context = self.store.with_context_of(written.context(), key, Some(me), <[u8]>::to_vec);
        let siblings = written.siblings();
        let now = cs.micros(Instant::now());
        let coord = match PutCoordinator::new(written.set, me, &others, w, now, cs.micros(deadline)) {
            Ok(c) => c,
            Err(e) => return self.error_frame(id, ErrorCode::InvalidQuorum, &e.to_string()),
        };
        match self.clone().run_coordinator(key, coord, deadline).await {
            Ok(()) => self.write_reply(id, value.is_some(), &context, siblings),
            Err(e) => self.quorum_error(id, &e),
        }
    }

    /// A request that did not reach its quorum, or a get whose answers
    /// merge past a limit, or a put that replicas refused for one: that is
    /// not a quorum failure (a retry fails the same way; the client must
    /// resolve the siblings), and gets the code that says so (found by
    /// reviews).
    fn quorum_error(&self, id: u64, e: &QuorumError) -> Vec<u8> {
        let code = match e.reason {
            QuorumFailure::TooManySiblings { .. } | QuorumFailure::OverLimit { limit: Limit::Siblings, .. } => {
                ErrorCode::TooManySiblings
            }
            QuorumFailure::TooLarge { .. } | QuorumFailure::OverLimit { limit: Limit::Size, .. } => {
                ErrorCode::ValueTooLarge
            }
            QuorumFailure::Deadline | QuorumFailure::Failures { .. } => {
                bump(&self.cluster().counters.quorum_failures, 1);
                ErrorCode::QuorumFailed
            }
        };
        self.error_frame(id, code, &e.to_string())
    }

    /// Starts `coord` in its own task and waits for its outcome; the task
    /// goes on with whatever the coordinator still sends (read repair).
    async fn run_coordinator<C: Coordinator + 'static>(
        self: Rc<Self>,
        key: &[u8],
        mut coord: C,
        deadline: Instant,
    ) -> Result<C::Out, QuorumError>
    where
        C::Out: 'static,
    {
        let outcome: Rc<Slot<Result<C::Out, QuorumError>>> = Rc::new(Slot::default());
        // Decided at once (W = 1 with nothing else to send)?
        if let Some(o) = coord.poll_outcome() {
            if coord.is_done() {
                return o;
            }
            outcome.set(o);
        }
        let key: Rc<[u8]> = key.into();
        let slot = outcome.clone();
        let running = Gauged::new(&self, tasks_running);
        glommio::spawn_local(async move {
            let _running = running;
            let inbox = Rc::new(Inbox::default());
            let cs = self.cluster();
            // The encoding of the last set sent: every replica of a put (and
            // of a read repair) gets the same set, encoded once.
            let mut encoded: Option<(Arc<VersionSet>, Rc<Encoded>)> = None;
            loop {
                while let Some(t) = coord.poll_transmit() {
                    let repair = coord.is_repair(&t);
                    let msg = match t.msg {
                        ReplicaMsg::Get => Outgoing::Get,
                        ReplicaMsg::Put { set } => {
                            let bytes = match &encoded {
                                Some((last, bytes)) if Arc::ptr_eq(last, &set) => bytes.clone(),
                                _ => {
                                    let bytes = Rc::new(set.encode());
                                    encoded = Some((set.clone(), bytes.clone()));
                                    bytes
                                }
                            };
                            Outgoing::Put { set, bytes }
                        }
                    };
                    let (me, key, inbox) = (self.clone(), key.clone(), inbox.clone());
                    let running = repair.then(|| Gauged::new(&self, tasks_running));
                    glommio::spawn_local(async move {
                        let _running = running;
                        if repair {
                            // Its own budget: the read's deadline may be
                            // (nearly) over (module doc).
                            let budget = Instant::now() + REPAIR_TIMEOUT;
                            let acked = me.send_replica(&key, t.to, msg, budget).await.is_ok();
                            let counters = &me.cluster().counters;
                            bump(if acked { &counters.read_repairs } else { &counters.read_repair_failures }, 1);
                            return;
                        }
                        let answer = me.send_replica(&key, t.to, msg, deadline).await;
                        inbox.answers.borrow_mut().push_back((t.to, answer));
                        inbox.changed.notify_all();
                    })
                    .detach();
                }
                if let Some(o) = coord.poll_outcome() {
                    slot.set(o);
                }
                if coord.is_done() {
                    break;
                }
                let g = inbox.changed.generation();
                let queued: Vec<_> = inbox.answers.borrow_mut().drain(..).collect();
                if !queued.is_empty() {
                    let now = cs.micros(Instant::now());
                    for (from, answer) in queued {
                        coord.handle(from, answer, now);
                    }
                    continue;
                }
                match coord.poll_timeout() {
                    Some(t) => {
                        let at = cs.epoch + Duration::from_micros(t);
                        let timer = async {
                            glommio::timer::sleep(at.saturating_duration_since(Instant::now())).await;
                            true
                        };
                        let woke = async {
                            inbox.changed.wait(g).await;
                            false
                        };
                        if futures_lite::future::or(woke, timer).await {
                            coord.handle_timeout(cs.micros(Instant::now()).max(t));
                        }
                    }
                    None => inbox.changed.wait(g).await,
                }
            }
        })
        .detach();
        outcome.take().await
    }

    /// Sends one coordinator message to replica `to` (this node's own
    /// store when `to` is this node) and returns its answer.
    async fn send_replica(self: &Rc<Self>, key: &[u8], to: MemberIdx, msg: Outgoing, deadline: Instant) -> Answer {
        let cs = self.cluster();
        if to == cs.info.me {
            return match msg {
                Outgoing::Get => match self.store.get(key).await {
                    Ok(set) => Ok((!set.is_empty()).then_some(set)),
                    Err(e) => {
                        tracing::warn!(error = %e, "local replica read failed");
                        Err(ReplicaFailure::Refused)
                    }
                },
                Outgoing::Put { set, .. } => match self.store.merge(key, &set, now_ms()).await {
                    Ok(_) => Ok(None),
                    Err(e) => {
                        tracing::warn!(error = %e, "local replica write failed");
                        Err(refusal(error_code(&e)))
                    }
                },
            };
        }
        let reply = match &msg {
            Outgoing::Get => cs.peers.call(to, &Request::ReplicaGet { key }, Quorum::default(), deadline).await,
            Outgoing::Put { bytes, .. } => {
                let req = Request::ReplicaPut { key, meta: &bytes.0, value: &bytes.1 };
                cs.peers.call(to, &req, Quorum::default(), deadline).await
            }
        };
        let frame = match reply {
            Ok(f) => f,
            Err(PeerError::BadReply(..)) => return Err(ReplicaFailure::Refused),
            Err(_) => return Err(ReplicaFailure::Unreachable),
        };
        // A reply counts only as the answer to the call it came for: a
        // REPLICA_PUT reply to a read is no "not found", and a REPLICA_GET
        // reply to a write is no acknowledgement (ids make such a mix-up
        // a peer's bug, which must not count toward W or R).
        match (decode_reply_frame(&frame), &msg) {
            (Ok(Response::ReplicaGet { set: None }), Outgoing::Get) => Ok(None),
            (Ok(Response::ReplicaGet { set: Some((meta, value)) }), Outgoing::Get) => {
                match VersionSet::decode(meta, value) {
                    Ok(set) => Ok(Some(set)),
                    Err(e) => {
                        tracing::warn!(peer = cs.peers.name(to), error = %e, "a replica sent unreadable versions");
                        Err(ReplicaFailure::Refused)
                    }
                }
            }
            (Ok(Response::ReplicaPut), Outgoing::Put { .. }) => Ok(None),
            (Ok(Response::Error { code, message }), _) => {
                tracing::debug!(peer = cs.peers.name(to), ?code, message, "a replica refused");
                // Only a write's refusal can be for a limit (a merge).
                Err(match msg {
                    Outgoing::Put { .. } => refusal(code),
                    Outgoing::Get => ReplicaFailure::Refused,
                })
            }
            _ => Err(ReplicaFailure::Refused),
        }
    }

    /// The refusal of a request that a member relayed (it came on a
    /// connection that named a member) for a key this node does not
    /// replicate; `None` for any other. A member relays only to a replica
    /// of the key by its own ring ([`Self::proxy`]), so such a request shows
    /// that the two members' rings differ (their cluster files do). Relayed
    /// again, it could go back to the sender: two members whose files list
    /// each other in another order sent some keys' requests back and forth
    /// until their deadline (found by a read-through), a running request
    /// on each at every hop. A client that names a member on its
    /// connection only gets these refusals for keys this node does not
    /// replicate, which it would have had relayed.
    pub(super) fn misrouted_relay(&self, request_id: u64, req: &Request<'_>) -> Option<Vec<u8>> {
        let cs = self.cluster.as_ref()?;
        let key = req.key().filter(|_| req.is_quorum_op())?;
        if cs.info.replicas(key).contains(&cs.info.me) {
            return None;
        }
        bump(&cs.counters.misrouted_relays, 1);
        let message = "a member relayed this request here, but this node does not replicate its key: the members' \
                       rings differ (check that every member has the same cluster file, members in the same order)";
        Some(self.error_frame(request_id, ErrorCode::RingMismatch, message))
    }

    /// Forwards a client request to a replica of its key (the put's hinted
    /// coordinator first, then the preference list in order, skipping
    /// unreachable ones and moving on past a replica's RingMismatch) and
    /// relays the reply, flagged STALE_ROUTE. The RingMismatch is the
    /// answer only if every replica tried refused so; with one
    /// unreachable besides, it is QuorumFailed naming both.
    async fn proxy(
        self: &Rc<Self>,
        header: &Header,
        req: &Request<'_>,
        quorum: Quorum,
        replicas: &[MemberIdx],
        deadline: Instant,
    ) -> Vec<u8> {
        let cs = self.cluster();
        bump(&cs.counters.proxied, 1);
        let context = match req {
            Request::Put { context, .. } | Request::Delete { context, .. } => Some(*context),
            _ => None,
        };
        let order = coordinator_order(replicas, context);
        // Why each replica tried did not serve it.
        let mut why = Vec::new();
        // A replica's RingMismatch: it did nothing, so the next replica is
        // tried (found by a review: one member with another cluster file
        // failed requests the others could serve); the refusal is the
        // answer only if every replica refused so. One unreachable besides
        // makes it a quorum failure, which names both (found by a review:
        // a node being down read as a lasting configuration error).
        let mut mismatch = None;
        let mut unreachable = false;
        for to in order {
            match cs.peers.call(to, req, quorum, deadline).await {
                Ok(frame) if is_ring_mismatch(&frame) => {
                    mismatch = Some(frame);
                    let refused = format!("{} does not replicate the key by its own ring", cs.peers.name(to));
                    why.push(refused);
                }
                Ok(mut frame) => {
                    // Answer as if it were ours: the client's request id, and
                    // the flag that tells a ring-routing client to refresh.
                    patch_reply(&mut frame, header.request_id, flags::STALE_ROUTE);
                    return frame;
                }
                // The replica may have taken the write: sent to the next
                // one too, it would be a second version of it. And the
                // client is told it may have been stored (QuorumFailed),
                // when no answer came in time as when the connection
                // failed under it: DeadlineExceeded says "not run" (found
                // by a review: the CLI then said nothing of a write that
                // may have been stored, and running it again added a
                // sibling).
                Err(e @ (PeerError::Lost(..) | PeerError::Timeout(_))) if !req.is_idempotent() => {
                    bump(&cs.counters.quorum_failures, 1);
                    return self.error_frame(
                        header.request_id,
                        ErrorCode::QuorumFailed,
                        &format!("{e}; the write may have been taken: read the key before writing it again"),
                    );
                }
                Err(e @ PeerError::Timeout(_)) => {
                    return self.error_frame(header.request_id, ErrorCode::DeadlineExceeded, &e.to_string())
                }
                Err(e) => {
                    unreachable = true;
                    why.push(e.to_string());
                }
            }
        }
        if let Some(mut frame) = mismatch.filter(|_| !unreachable) {
            patch_reply(&mut frame, header.request_id, flags::STALE_ROUTE);
            return frame;
        }
        bump(&cs.counters.quorum_failures, 1);
        self.error_frame(
            header.request_id,
            ErrorCode::QuorumFailed,
            &format!("no replica of the key is reachable: {}", why.join("; ")),
        )
    }

    /// Serves another coordinator's replica message.
    pub(super) async fn serve_replica(&self, id: u64, req: Request<'_>) -> Result<Vec<u8>, crate::store::StoreError> {
        let shard = self.id as u16;
        let mut out = Vec::new();
        let cs = self.cluster();
        match req {
            Request::ReplicaGet { key } => {
                bump(&cs.counters.replica_gets, 1);
                // The stored bytes are the wire's encoding: no decode and
                // re-encode here (the coordinator decodes and checks them).
                // Not shown before it is durable, as a client's GET.
                let rec = self.store.engine().get_settled(key).await?;
                let set = rec.as_ref().map(|r| (r.meta(), r.value()));
                Response::ReplicaGet { set }.encode(&mut out, id, shard);
            }
            Request::ReplicaPut { key, meta, value } => {
                bump(&cs.counters.replica_puts, 1);
                // Bytes off the wire, not off this node's disk: a set that
                // does not decode is the sender's malformed request.
                let set = match VersionSet::decode(meta, value) {
                    Ok(set) => set,
                    Err(e) => {
                        bump(&self.counters.malformed_frames, 1);
                        let message = format!("replica versions that do not decode: {e}");
                        return Ok(self.error_frame(id, ErrorCode::Malformed, &message));
                    }
                };
                self.store.merge(key, &set, now_ms()).await?;
                Response::ReplicaPut.encode(&mut out, id, shard);
            }
            _ => unreachable!("only replica messages are served here"),
        }
        Ok(out)
    }
}

/// How a coordinator counts a replica's refusal with `code`: one for a
/// limit is reported as that limit if the write fails ([`Limit`]).
fn refusal(code: ErrorCode) -> ReplicaFailure {
    match code {
        ErrorCode::TooManySiblings => ReplicaFailure::OverLimit(Limit::Siblings),
        ErrorCode::ValueTooLarge => ReplicaFailure::OverLimit(Limit::Size),
        _ => ReplicaFailure::Refused,
    }
}

/// The gauge of a coordinator's and a read repair's tasks.
fn tasks_running(shard: &Shard) -> &Cell<u64> {
    &shard.cluster().counters.tasks_running
}

/// Whether `frame` is an ERROR reply with code RingMismatch.
/// (The opcode first: every relayed reply passes here, and only an ERROR
/// is worth decoding.)
fn is_ring_mismatch(frame: &[u8]) -> bool {
    frame.first_chunk::<HEADER_LEN>().and_then(crate::wire::peek_opcode) == Some(crate::wire::op::ERROR)
        && matches!(decode_reply_frame(frame), Ok(Response::Error { code: ErrorCode::RingMismatch, .. }))
}
