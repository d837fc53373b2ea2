//! One shard's connections to the shards of the other nodes of its
//! cluster: replica reads and writes, and client requests it forwards to
//! a key's coordinator.
//!
//! Owns: a connection per (peer node, peer shard), opened on first use;
//! each peer's shard ports (learned with a PING to its shard 0); the
//! requests waiting for their replies; and the batching of outgoing
//! frames.
//!
//! Batching: frames queued on one connection while the shard runs other
//! tasks leave in one write when the connection's writer task runs next,
//! so the replica messages of every request that became ready in the same
//! scheduling tick share a write. `replica_frames / replica_writes` in
//! STATS shows the ratio.
//!
//! Invariant: a call always ends by its deadline: with the reply, or with
//! an error when the peer is unreachable, the connection breaks, or the
//! deadline passes. A peer that refused a connection is not tried again
//! for [`RETRY_AFTER`], so a dead node costs its callers nothing but an
//! immediate error. Frames carry the time left as their deadline, so the
//! receiver drops work that is already too late; a frame whose deadline
//! passes while it waits in the queue is dropped unsent.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::bump;
use super::front::Front;
use crate::core::partition::shard_of;
use crate::core::ring::{Member, MemberIdx, Ring};
use crate::notify::Notify;
use crate::wire::{split_frame, Quorum, Request, Response, HEADER_LEN, MAX_BODY_LEN};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a peer whose connection failed is considered down before a
/// call tries to connect again.
pub const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Why a call to a peer got no reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("peer {0} is unreachable: {1}")]
    Unreachable(String, String),
    #[error("no reply from peer {0} before the deadline")]
    Timeout(String),
    #[error("peer {0} sent a bad reply: {1}")]
    BadReply(String, String),
}

/// Counters of a shard's peer traffic, reported by STATS.
#[derive(Default, Serialize)]
pub struct PeerCounters {
    /// Frames sent to peers, and the socket writes that carried them.
    pub replica_frames: Cell<u64>,
    pub replica_writes: Cell<u64>,
    pub connects: Cell<u64>,
    pub connect_failures: Cell<u64>,
    /// Calls that ended without a reply (unreachable, broken, deadline).
    pub call_failures: Cell<u64>,
    /// Frames dropped unsent because their deadline passed while queued.
    pub expired_unsent: Cell<u64>,
}

/// Where a call's reply frame lands.
type Slot = crate::notify::Slot<Result<Vec<u8>, PeerError>>;

/// One connection to one shard of a peer.
struct PeerConn {
    name: String,
    /// Frames waiting for the writer.
    out: RefCell<Vec<u8>>,
    /// Where each frame in `out` ends, and its deadline: a frame whose
    /// caller has stopped waiting is dropped instead of sent late.
    spans: RefCell<Vec<(usize, Instant)>>,
    pending: RefCell<HashMap<u64, Rc<Slot>>>,
    next_id: Cell<u64>,
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
        for (_, slot) in self.pending.borrow_mut().drain() {
            slot.set(Err(PeerError::Unreachable(self.name.clone(), why.to_string())));
        }
        self.queued.notify_all();
        self.died.notify_all();
    }
}

/// The frames of `batch` (ending at the offsets in `spans`) whose deadline
/// is still ahead, and how many they are. Copies only when one expired.
fn drop_expired(batch: Vec<u8>, spans: &[(usize, Instant)], now: Instant) -> (Vec<u8>, u64) {
    if spans.iter().all(|&(_, d)| d > now) {
        return (batch, spans.len() as u64);
    }
    let mut kept = Vec::with_capacity(batch.len());
    let mut start = 0;
    let mut frames = 0;
    for &(end, deadline) in spans {
        if deadline > now {
            kept.extend_from_slice(&batch[start..end]);
            frames += 1;
        }
        start = end;
    }
    (kept, frames)
}

/// A shard's view of its peers.
pub struct Peers {
    /// The ring's members (shard 0's address and the name of each).
    members: Vec<Member>,
    partitions: u32,
    /// Each peer's shard ports, learned by PING.
    ports: RefCell<HashMap<MemberIdx, Rc<Vec<u16>>>>,
    conns: RefCell<HashMap<(MemberIdx, u16), Rc<PeerConn>>>,
    /// Peers whose last connection attempt failed, until when they are
    /// not tried again.
    down_until: RefCell<HashMap<MemberIdx, Instant>>,
    /// The shard's socket readiness (peer connections are its sockets too).
    front: Rc<Front>,
    pub counters: PeerCounters,
}

impl Peers {
    pub(super) fn new(ring: &Ring, front: Rc<Front>) -> Peers {
        Peers {
            members: ring.members().to_vec(),
            partitions: ring.partitions(),
            ports: RefCell::default(),
            conns: RefCell::default(),
            down_until: RefCell::default(),
            front,
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
                let ports = self.ports(member, deadline).await?;
                shard_of(key, self.partitions, ports.len()) as u16
            }
        };
        let conn = self.conn(member, shard);
        if conn.dead.get() {
            return Err(self.fail(PeerError::Unreachable(name(), "the connection failed".into())));
        }
        let id = conn.next_id.get();
        conn.next_id.set(id + 1);
        let left = deadline.saturating_duration_since(Instant::now());
        let deadline_us = left.as_micros().clamp(1, u32::MAX as u128) as u32;
        {
            let mut out = conn.out.borrow_mut();
            req.encode_with(&mut out, id, shard, deadline_us, quorum);
            conn.spans.borrow_mut().push((out.len(), deadline));
        }
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
        if let Some(p) = self.ports.borrow().get(&member) {
            return Ok(p.clone());
        }
        let frame = Box::pin(self.call(member, &Request::Ping, Quorum::default(), deadline)).await?;
        let name = self.name(member).to_string();
        let bad = |why: String| PeerError::BadReply(name.clone(), why);
        let (h, _) =
            split_frame(&frame, MAX_BODY_LEN).ok().flatten().ok_or_else(|| bad("unframed PING reply".into()))?;
        match Response::decode(h.opcode, &frame[HEADER_LEN..]) {
            Ok(Response::Pong(info)) if !info.ports.is_empty() && info.partitions == self.partitions => {
                let ports = Rc::new(info.ports);
                self.ports.borrow_mut().insert(member, ports.clone());
                Ok(ports)
            }
            Ok(Response::Pong(info)) => {
                Err(bad(format!("it has {} partitions, this cluster {}", info.partitions, self.partitions)))
            }
            Ok(other) => Err(bad(format!("unexpected reply to PING: {other:?}"))),
            Err(e) => Err(bad(e.to_string())),
        }
    }

    /// The connection to `(member, shard)`, opened if there is none.
    fn conn(self: &Rc<Self>, member: MemberIdx, shard: u16) -> Rc<PeerConn> {
        if let Some(c) = self.conns.borrow().get(&(member, shard)) {
            if !c.dead.get() {
                return c.clone();
            }
        }
        let conn = Rc::new(PeerConn {
            name: format!("{} shard {shard}", self.name(member)),
            out: RefCell::default(),
            spans: RefCell::default(),
            pending: RefCell::default(),
            next_id: Cell::new(1),
            dead: Cell::new(false),
            queued: Notify::default(),
            died: Notify::default(),
        });
        self.conns.borrow_mut().insert((member, shard), conn.clone());
        let mut addr = self.members[member as usize].addr;
        if shard != 0 {
            if let Some(p) = self.ports.borrow().get(&member).and_then(|p| p.get(shard as usize)) {
                addr.set_port(*p);
            }
        }
        glommio::spawn_local(self.clone().run_conn(member, shard, addr, conn.clone())).detach();
        conn
    }

    /// Connects, then writes queued frames and hands replies to their
    /// callers until the connection fails.
    async fn run_conn(self: Rc<Self>, member: MemberIdx, shard: u16, addr: SocketAddr, conn: Rc<PeerConn>) {
        let sock = match self.front.connect(addr, CONNECT_TIMEOUT).await {
            Ok(s) => s,
            Err(e) => {
                bump(&self.counters.connect_failures, 1);
                tracing::debug!(peer = %conn.name, %addr, error = %e, "connecting to a peer failed");
                self.down_until.borrow_mut().insert(member, Instant::now() + RETRY_AFTER);
                // Its ports may have changed if it restarted.
                self.ports.borrow_mut().remove(&member);
                self.forget(member, shard, &conn);
                conn.kill(&e.to_string());
                return;
            }
        };
        bump(&self.counters.connects, 1);
        self.down_until.borrow_mut().remove(&member);
        let sock = Rc::new(sock);
        let writer_task = {
            let (conn, peers, writer) = (conn.clone(), self.clone(), sock.clone());
            glommio::spawn_local(async move {
                loop {
                    let g = conn.queued.generation();
                    if conn.dead.get() {
                        return;
                    }
                    let batch = std::mem::take(&mut *conn.out.borrow_mut());
                    if batch.is_empty() {
                        conn.queued.wait(g).await;
                        continue;
                    }
                    let spans = std::mem::take(&mut *conn.spans.borrow_mut());
                    let (batch, frames) = drop_expired(batch, &spans, Instant::now());
                    let dropped = spans.len() as u64 - frames;
                    bump(&peers.counters.expired_unsent, dropped);
                    if frames == 0 {
                        continue;
                    }
                    if let Err(e) = writer.write_all(&batch).await {
                        conn.kill(&format!("write failed: {e}"));
                        return;
                    }
                    bump(&peers.counters.replica_writes, 1);
                    bump(&peers.counters.replica_frames, frames);
                }
            })
        };
        let mut buf = vec![0u8; super::conn::READ_CHUNK];
        let (mut start, mut end) = (0usize, 0usize);
        let why = 'read: loop {
            loop {
                match split_frame(&buf[start..end], MAX_BODY_LEN) {
                    Ok(Some((h, total))) => {
                        if let Some(slot) = conn.pending.borrow_mut().remove(&h.request_id) {
                            slot.set(Ok(buf[start..start + total].to_vec()));
                        }
                        start += total;
                    }
                    Ok(None) => break,
                    Err(e) => break 'read format!("bad frame: {e}"),
                }
            }
            if conn.dead.get() {
                break "write failed".to_string();
            }
            super::conn::make_room(&mut buf, &mut start, &mut end);
            // Wake on a failed write too, so the reader does not wait forever.
            let read = futures_lite::future::or(async { Some(sock.read(&mut buf[end..]).await) }, async {
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
                Some(Ok(n)) => end += n,
                Some(Err(e)) => break format!("read failed: {e}"),
                None => break "write failed".to_string(),
            }
        };
        tracing::debug!(peer = %conn.name, why, "peer connection closed");
        self.forget(member, shard, &conn);
        conn.kill(&why);
        writer_task.await;
    }

    /// Drops `conn` from the table if it is still the current one.
    fn forget(&self, member: MemberIdx, shard: u16, conn: &Rc<PeerConn>) {
        let mut conns = self.conns.borrow_mut();
        if conns.get(&(member, shard)).is_some_and(|c| Rc::ptr_eq(c, conn)) {
            conns.remove(&(member, shard));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_frames_past_their_deadline_are_dropped() {
        let now = Instant::now();
        let (late, soon) = (now - Duration::from_millis(1), now + Duration::from_secs(1));
        let batch = b"aaabbbbcc".to_vec();
        let all_live = [(3, soon), (7, soon), (9, soon)];
        assert_eq!(drop_expired(batch.clone(), &all_live, now), (batch.clone(), 3));
        let middle_late = [(3, soon), (7, late), (9, soon)];
        assert_eq!(drop_expired(batch.clone(), &middle_late, now), (b"aaacc".to_vec(), 2));
        let all_late = [(3, late), (7, late), (9, late)];
        assert_eq!(drop_expired(batch, &all_late, now), (Vec::new(), 0));
    }
}
