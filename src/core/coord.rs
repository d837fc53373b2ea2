//! Quorum coordination of one request: the sans-IO state machines that fan a
//! put or a get out to a key's preference list, count the answers against W
//! or R, and repair stale replicas after a read; plus the replica side of a
//! replicated put ([`apply_replica_put`]), shared by the node and the
//! simulator.
//!
//! Owns: what a coordinator sends to which replica ([`Transmit`] of a
//! [`ReplicaMsg`]), when a request is decided and how ([`PutOutcome`], the
//! merged [`VersionSet`] of a read, [`QuorumError`]), and which replicas a
//! read repairs.
//!
//! A coordinator serves one request for one key; the driver (the glommio
//! shell, or the simulator in `tests/cluster_sim.rs`) holds the key, carries
//! the messages, serves the coordinator's own replica like a remote one, and
//! feeds back what happened: `handle_*` for inputs, `poll_*` for outputs,
//! quinn-proto style. After every `handle_*` the driver drains
//! `poll_transmit`, takes `poll_outcome`, and (re)arms its timer at
//! `poll_timeout`; it drops the coordinator once `is_done`.
//!
//! # Semantics
//!
//! - **Put** ([`PutCoordinator`]): the coordinating node has already applied
//!   the client's update to its own replica and stored it, which counts as the
//!   first ack; the resulting whole set goes to the other N-1 replicas, which
//!   merge it in ([`apply_replica_put`]). The put succeeds once W replicas
//!   (the coordinator's included) have it, and fails as soon as too many
//!   replicas failed for W to be reachable, or at the deadline. A failure
//!   in which a replica refused the set for a limit (merged with its own
//!   versions, too many siblings or too many value bytes) is reported as
//!   that limit, not as a quorum failure: a retry fails the same way. The
//!   coordinator's own write stays, as after any failed put.
//! - **Get** ([`GetCoordinator`]): asks all N replicas; succeeds with the
//!   merge of the answers once R replicas answered ("not found" is an
//!   answer: the empty set), fails as soon as R is out of reach, or at the
//!   deadline.
//! - **Read repair**: as soon as a get is decided, the merge of the answers
//!   so far goes to every replica that answered something that differs from
//!   it: a stale replica (it answered a set that lacks something) or a
//!   missing one (it answered "not found" while the merge is not empty). The
//!   repair does not wait for the replicas still pending: a hung replica
//!   would otherwise hold it back to the request's deadline, when the
//!   driver can no longer deliver anything sent with that deadline. The get
//!   then keeps listening until every replica answered or failed, or until
//!   the request's deadline (so a coordinator never outlives its request);
//!   an answer that comes meanwhile is merged in, and the new merge goes to
//!   every answered replica that may not hold it yet (what a replica is
//!   known to hold is its answer, then the last repair sent to it), so
//!   each replica gets at most one repair per answer that changed the
//!   merge. A replica that never answered, or failed, gets no repair:
//!   nothing says what it holds, and anti-entropy and hinted handoff cover
//!   it. Repair also runs after a failed read (whatever did answer is made
//!   consistent), and stops once the merge exceeds [`MAX_SIBLINGS`] or the
//!   stored-object limit in value bytes (`check_limits`), since replicas
//!   would refuse it; the get then fails (too many siblings, too large). A repair is a [`ReplicaMsg::Put`] of a get
//!   coordinator; the driver gives it a delivery budget of its own (it may
//!   leave close to the request's deadline), and it is not waited for.
//!
//! # Invariants
//!
//! - The outcome is given exactly once, by the first `poll_outcome` after
//!   the request is decided; a decided request stays decided.
//! - Only the first answer of each replica counts (ack, reply or failure).
//!   Duplicates, answers after a failure, answers from members outside the
//!   request, and anything after the outcome that the request no longer
//!   needs change nothing, so a network that duplicates or reorders is safe.
//! - An input that arrives at or after the deadline is applied before the
//!   deadline is checked: an ack that completes the quorum wins over a
//!   deadline that the driver has not reported yet.
//! - Nothing here reads the clock, the network or a global RNG; `now` is an
//!   argument (microseconds from an arbitrary epoch, as the driver chooses).

use std::collections::VecDeque;
use std::fmt;

use std::sync::Arc;

use thiserror::Error;

pub use crate::core::ring::MemberIdx;
use crate::core::version::{context_hint, VersionError, VersionSet, MAX_SIBLINGS};

/// What a coordinator asks of one replica. The key is the driver's: a
/// coordinator serves one request for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaMsg {
    /// Reply with the key's stored versions, or "not found".
    Get,
    /// Merge `set` into the stored versions ([`apply_replica_put`]) and ack.
    /// Shared: every replica of one put (or one read repair) gets the
    /// same set, so the driver can encode it once.
    Put { set: Arc<VersionSet> },
}

/// One message for the driver to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The replica it goes to (possibly the coordinator's own node: the
    /// driver serves it like a remote one).
    pub to: MemberIdx,
    pub msg: ReplicaMsg,
}

/// Why a replica gave no useful answer, as the driver reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaFailure {
    /// The replica answered with an error (it could not store, or refused).
    Refused,
    /// The replica could not be reached: the connection failed or the node
    /// is known to be down.
    Unreachable,
    /// The replica refused a set that, merged with its own versions, would
    /// pass a limit: a retry fails the same way until the key's siblings
    /// are resolved.
    OverLimit(Limit),
}

/// A bound on a key's stored versions ([`crate::core::version`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// [`MAX_SIBLINGS`] siblings.
    Siblings,
    /// The stored-object limit on the siblings' value bytes.
    Size,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuorumFailure {
    /// The deadline passed before enough replicas answered.
    Deadline,
    /// So many replicas failed that the quorum can no longer be reached.
    Failures { refused: usize, unreachable: usize },
    /// (Get only) R replicas answered, but their versions merge to more
    /// siblings than a stored set may hold; nothing is returned.
    TooManySiblings { siblings: usize, max: usize },
    /// (Get only) R replicas answered, but their versions merge to more
    /// value bytes than a stored set (and a reply frame) may hold; nothing
    /// is returned.
    TooLarge { len: usize, max: usize },
    /// (Put only) Too few replicas took the write for W, and at least one
    /// refused it for `limit` ([`ReplicaFailure::OverLimit`]): reported as
    /// the limit (found by a review: it was a plain quorum failure, which
    /// reads as worth retrying), since a retry fails alike while the
    /// replicas hold what they hold. Unlike the same limit on a lone node,
    /// the coordinator's own write was stored.
    OverLimit { limit: Limit, refused: usize, unreachable: usize },
}

/// A request that did not reach its quorum (or, for a get, whose answers
/// cannot be merged within the limits: [`QuorumFailure::TooManySiblings`]).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub struct QuorumError {
    /// W or R.
    pub needed: usize,
    /// Replicas that acked (put, the coordinator's own write included) or
    /// answered (get) when the request was decided.
    pub answered: usize,
    /// N: the replicas asked.
    pub of: usize,
    pub reason: QuorumFailure,
}

impl fmt::Display for QuorumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let QuorumError { needed, answered, of, reason } = *self;
        match reason {
            QuorumFailure::Deadline => write!(
                f,
                "quorum not reached: {answered} of {of} replicas answered before the deadline, {needed} needed"
            ),
            QuorumFailure::Failures { refused, unreachable } => write!(
                f,
                "quorum not reached: {answered} of {of} replicas answered, {refused} refused and {unreachable} \
                 unreachable, {needed} needed"
            ),
            QuorumFailure::TooManySiblings { siblings, max } => write!(
                f,
                "{answered} of {of} replicas answered, but their versions merge to {siblings} siblings, over the \
                 limit of {max}"
            ),
            QuorumFailure::TooLarge { len, max } => write!(
                f,
                "{answered} of {of} replicas answered, but their versions merge to {len} bytes of values, over \
                 the stored-object limit of {max}; read with R = 1 and write back with that context to resolve \
                 them"
            ),
            QuorumFailure::OverLimit { limit, refused, unreachable } => {
                let what = match limit {
                    Limit::Siblings => format!("more than {MAX_SIBLINGS} siblings"),
                    Limit::Size => "siblings over the stored-object limit".to_string(),
                };
                write!(
                    f,
                    "quorum not reached: {answered} of {of} replicas took the write, {refused} refused it \
                     ({unreachable} unreachable), {needed} needed; merged with their versions the key would \
                     have {what}: read the key and write back with its context to resolve them"
                )
            }
        }
    }
}

/// Which quorum parameter an invalid request named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuorumKind {
    R,
    W,
}

impl fmt::Display for QuorumKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuorumKind::R => "R",
            QuorumKind::W => "W",
        })
    }
}

/// Invalid coordinator arguments (R and W can come from a client request).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QuorumArgError {
    #[error("{kind} = {got} is outside 1..={n} for {n} replicas")]
    OutOfRange { kind: QuorumKind, got: usize, n: usize },
    #[error("member {0} appears more than once among the replicas")]
    DuplicateReplica(MemberIdx),
}

/// A successful put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutOutcome {
    /// Replicas that had the write when it was decided (W), the
    /// coordinator's own included.
    pub acks: usize,
    /// N.
    pub of: usize,
}

/// What one replica has answered so far.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer<T> {
    Pending,
    /// It answered with success: `T` is what it said (for a read, what it
    /// holds: what it said, or the last repair sent to it since).
    Answered(T),
    Failed,
}

/// The request's decision, given once.
#[derive(Clone, Debug)]
enum Decision<T> {
    Undecided,
    /// Decided, not yet taken by `poll_outcome`.
    Ready(Result<T, QuorumError>),
    /// Taken.
    Given,
}

impl<T> Decision<T> {
    fn is_undecided(&self) -> bool {
        matches!(self, Decision::Undecided)
    }

    fn poll(&mut self) -> Option<Result<T, QuorumError>> {
        match std::mem::replace(self, Decision::Given) {
            Decision::Ready(outcome) => Some(outcome),
            other => {
                *self = other;
                None
            }
        }
    }
}

/// Checks a quorum size against N and the member list for duplicates.
fn validate(kind: QuorumKind, quorum: usize, members: &[MemberIdx]) -> Result<(), QuorumArgError> {
    let n = members.len();
    if quorum == 0 || quorum > n {
        return Err(QuorumArgError::OutOfRange { kind, got: quorum, n });
    }
    for (i, m) in members.iter().enumerate() {
        if members[..i].contains(m) {
            return Err(QuorumArgError::DuplicateReplica(*m));
        }
    }
    Ok(())
}

/// Counts of replica states, for the quorum arithmetic.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    pending: usize,
    refused: usize,
    unreachable: usize,
    /// The first limit a refusal named: what a failure is reported as.
    over_limit: Option<Limit>,
}

impl Tally {
    fn fail(&mut self, reason: ReplicaFailure) {
        self.pending -= 1;
        match reason {
            ReplicaFailure::Refused => self.refused += 1,
            ReplicaFailure::Unreachable => self.unreachable += 1,
            ReplicaFailure::OverLimit(limit) => {
                self.refused += 1;
                self.over_limit.get_or_insert(limit);
            }
        }
    }

    fn failures(&self) -> QuorumFailure {
        let (refused, unreachable) = (self.refused, self.unreachable);
        match self.over_limit {
            Some(limit) => QuorumFailure::OverLimit { limit, refused, unreachable },
            None => QuorumFailure::Failures { refused, unreachable },
        }
    }
}

/// The coordinator of one put: replicates the coordinator's freshly updated
/// set to the other replicas and decides on W acks (module doc).
#[derive(Debug)]
pub struct PutCoordinator {
    /// The other N-1 replicas and their answers (the coordinator's own write
    /// is already counted in `acks`).
    replicas: Vec<(MemberIdx, Answer<()>)>,
    /// W.
    w: usize,
    /// Replicas that have the write, the coordinator's own included.
    acks: usize,
    tally: Tally,
    /// When an undecided put fails with [`QuorumFailure::Deadline`].
    deadline: u64,
    /// Messages not yet taken by `poll_transmit`.
    transmits: VecDeque<Transmit>,
    decision: Decision<PutOutcome>,
}

impl PutCoordinator {
    /// Starts the put of `set`, the whole set that node `local` stored after
    /// applying the client's update, to `replicas` (the other N-1 members of
    /// the preference list). Fails on W outside `1..=N` or a member listed
    /// twice (`local` among `replicas` included). With W = 1 the put is
    /// decided at once (and still replicated).
    pub fn new(
        set: VersionSet,
        local: MemberIdx,
        replicas: &[MemberIdx],
        w: usize,
        now: u64,
        deadline: u64,
    ) -> Result<PutCoordinator, QuorumArgError> {
        let members: Vec<MemberIdx> = std::iter::once(local).chain(replicas.iter().copied()).collect();
        validate(QuorumKind::W, w, &members)?;
        let set = Arc::new(set);
        let transmits = replicas.iter().map(|&to| Transmit { to, msg: ReplicaMsg::Put { set: set.clone() } }).collect();
        let mut coord = PutCoordinator {
            replicas: replicas.iter().map(|&m| (m, Answer::Pending)).collect(),
            w,
            acks: 1,
            tally: Tally { pending: replicas.len(), ..Tally::default() },
            deadline,
            transmits,
            decision: Decision::Undecided,
        };
        coord.decide(now);
        Ok(coord)
    }

    /// Replica `from` stored the set.
    pub fn handle_ack(&mut self, from: MemberIdx, now: u64) {
        if let Some(answer @ Answer::Pending) = answer_of(&mut self.replicas, from) {
            *answer = Answer::Answered(());
            self.acks += 1;
            self.tally.pending -= 1;
        }
        self.decide(now);
    }

    /// Replica `from` refused the set or could not be reached.
    pub fn handle_failure(&mut self, from: MemberIdx, reason: ReplicaFailure, now: u64) {
        if let Some(answer @ Answer::Pending) = answer_of(&mut self.replicas, from) {
            *answer = Answer::Failed;
            self.tally.fail(reason);
        }
        self.decide(now);
    }

    /// The driver's timer fired (at or after [`Self::poll_timeout`]; earlier
    /// calls change nothing).
    pub fn handle_timeout(&mut self, now: u64) {
        self.decide(now);
    }

    fn decide(&mut self, now: u64) {
        if !self.decision.is_undecided() {
            return;
        }
        let n = self.replicas.len() + 1;
        let error = |reason| QuorumError { needed: self.w, answered: self.acks, of: n, reason };
        if self.acks >= self.w {
            self.decision = Decision::Ready(Ok(PutOutcome { acks: self.acks, of: n }));
        } else if self.acks + self.tally.pending < self.w {
            self.decision = Decision::Ready(Err(error(self.tally.failures())));
        } else if now >= self.deadline {
            self.decision = Decision::Ready(Err(error(QuorumFailure::Deadline)));
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The outcome, exactly once, as soon as the put is decided.
    pub fn poll_outcome(&mut self) -> Option<Result<PutOutcome, QuorumError>> {
        self.decision.poll()
    }

    /// When the driver must call [`Self::handle_timeout`]: the deadline while
    /// the put is undecided.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.decision.is_undecided().then_some(self.deadline)
    }

    /// Whether the outcome was taken and nothing more will be sent; late acks
    /// may still be fed in, and change nothing.
    pub fn is_done(&self) -> bool {
        matches!(self.decision, Decision::Given) && self.transmits.is_empty()
    }

    /// Replicas that have the write so far, the coordinator's own included.
    pub fn acks(&self) -> usize {
        self.acks
    }
}

/// The coordinator of one get: asks every replica, decides on R answers,
/// then repairs the stale and missing replicas among those that answered
/// (module doc).
#[derive(Debug)]
pub struct GetCoordinator {
    /// All N replicas and what each is known to hold: its answer ("not
    /// found" is the empty set), replaced by each repair sent to it.
    replicas: Vec<(MemberIdx, Answer<Arc<VersionSet>>)>,
    /// R.
    r: usize,
    /// Replicas that answered (found or not).
    answered: usize,
    tally: Tally,
    /// The merge of every answer so far.
    merged: VersionSet,
    /// When an undecided get fails with [`QuorumFailure::Deadline`], and
    /// when read repair stops waiting for the replicas still pending.
    deadline: u64,
    /// Messages not yet taken by `poll_transmit`.
    transmits: VecDeque<Transmit>,
    decision: Decision<VersionSet>,
    /// Whether answers are still awaited: before the decision, and after it
    /// (for read repair) until every replica answered or failed, or the
    /// deadline passed.
    listening: bool,
    /// Repair puts queued for the driver.
    repairs: usize,
    /// The first replica that answered.
    fastest: Option<MemberIdx>,
}

impl GetCoordinator {
    /// Starts a get from `replicas` (all N members of the preference list,
    /// the coordinator's own node included if it is one). Fails on R outside
    /// `1..=N` or a member listed twice.
    pub fn new(replicas: &[MemberIdx], r: usize, now: u64, deadline: u64) -> Result<GetCoordinator, QuorumArgError> {
        validate(QuorumKind::R, r, replicas)?;
        let mut coord = GetCoordinator {
            replicas: replicas.iter().map(|&m| (m, Answer::Pending)).collect(),
            r,
            answered: 0,
            tally: Tally { pending: replicas.len(), ..Tally::default() },
            merged: VersionSet::new(),
            deadline,
            transmits: replicas.iter().map(|&to| Transmit { to, msg: ReplicaMsg::Get }).collect(),
            decision: Decision::Undecided,
            listening: true,
            repairs: 0,
            fastest: None,
        };
        coord.advance(now);
        Ok(coord)
    }

    /// Replica `from` answered with its stored versions (`None`: not found).
    /// An answer after the get stopped listening is ignored.
    pub fn handle_reply(&mut self, from: MemberIdx, set: Option<VersionSet>, now: u64) {
        if !self.listening {
            return;
        }
        if let Some(answer @ Answer::Pending) = answer_of(&mut self.replicas, from) {
            let set = set.unwrap_or_default();
            self.merged.merge(&set);
            *answer = Answer::Answered(Arc::new(set));
            self.answered += 1;
            self.tally.pending -= 1;
            self.fastest.get_or_insert(from);
        }
        self.advance(now);
    }

    /// Replica `from` refused the get or could not be reached.
    pub fn handle_failure(&mut self, from: MemberIdx, reason: ReplicaFailure, now: u64) {
        if !self.listening {
            return;
        }
        if let Some(answer @ Answer::Pending) = answer_of(&mut self.replicas, from) {
            *answer = Answer::Failed;
            self.tally.fail(reason);
        }
        self.advance(now);
    }

    /// The driver's timer fired (at or after [`Self::poll_timeout`]; earlier
    /// calls change nothing).
    pub fn handle_timeout(&mut self, now: u64) {
        if self.listening {
            self.advance(now);
        }
    }

    fn advance(&mut self, now: u64) {
        if self.decision.is_undecided() {
            let error =
                |reason| QuorumError { needed: self.r, answered: self.answered, of: self.replicas.len(), reason };
            if self.answered >= self.r {
                self.decision = Decision::Ready(match self.merged.check_limits() {
                    Ok(()) => Ok(self.merged.clone()),
                    Err(VersionError::TooLarge { len, max }) => Err(error(QuorumFailure::TooLarge { len, max })),
                    Err(_) => Err(error(QuorumFailure::TooManySiblings {
                        siblings: self.merged.siblings().len(),
                        max: MAX_SIBLINGS,
                    })),
                });
            } else if self.answered + self.tally.pending < self.r {
                self.decision = Decision::Ready(Err(error(self.tally.failures())));
            } else if now >= self.deadline {
                self.decision = Decision::Ready(Err(error(QuorumFailure::Deadline)));
            }
        }
        if self.decision.is_undecided() {
            return;
        }
        // Decided: repair now with what is known, without waiting for the
        // replicas still pending (module doc).
        self.repair();
        if self.tally.pending == 0 || now >= self.deadline {
            self.listening = false;
        }
    }

    /// Sends the merge of the answers so far to every answered replica not
    /// known to hold it, and records that it now does.
    fn repair(&mut self) {
        if self.merged.check_limits().is_err() {
            return;
        }
        let mut shared: Option<Arc<VersionSet>> = None;
        for (to, answer) in &mut self.replicas {
            if let Answer::Answered(held) = answer {
                if **held != self.merged {
                    let set = shared.get_or_insert_with(|| Arc::new(self.merged.clone())).clone();
                    self.transmits.push_back(Transmit { to: *to, msg: ReplicaMsg::Put { set: set.clone() } });
                    *held = set;
                    self.repairs += 1;
                }
            }
        }
    }

    /// The next message to send: the gets, then (from the outcome on)
    /// repairs.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The outcome, exactly once, as soon as the get is decided: the merge
    /// of the answers in so far (at least R).
    pub fn poll_outcome(&mut self) -> Option<Result<VersionSet, QuorumError>> {
        self.decision.poll()
    }

    /// When the driver must call [`Self::handle_timeout`]: the deadline while
    /// the get is still listening (undecided, or awaiting answers to repair).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.listening.then_some(self.deadline)
    }

    /// Whether the outcome was taken, the get stopped listening and every
    /// message was taken; later replies change nothing.
    pub fn is_done(&self) -> bool {
        matches!(self.decision, Decision::Given) && !self.listening && self.transmits.is_empty()
    }

    /// Whether the get still takes answers (and may still queue repairs).
    pub fn is_listening(&self) -> bool {
        self.listening
    }

    /// Repair puts queued so far (whether the driver delivered them is the
    /// driver's to count).
    pub fn repairs(&self) -> usize {
        self.repairs
    }

    /// The first replica that answered: Dynamo's choice of coordinator for a
    /// put that follows this read.
    pub fn fastest(&self) -> Option<MemberIdx> {
        self.fastest
    }
}

/// Replica `from`'s answer slot, if it is one of `replicas`.
fn answer_of<T>(replicas: &mut [(MemberIdx, Answer<T>)], from: MemberIdx) -> Option<&mut Answer<T>> {
    replicas.iter_mut().find(|(m, _)| *m == from).map(|(_, a)| a)
}

/// The members to send a client's request on a key with preference list
/// `replicas` to, best first. A write whose `context` names a coordinator
/// (Dynamo section 6.4: the replica that answered the read before it
/// fastest) goes to that one first if it is a replica; then the list in
/// preference order. A read (`context: None`) takes the list as it is.
pub fn coordinator_order(replicas: &[MemberIdx], context: Option<&[u8]>) -> Vec<MemberIdx> {
    let hint = context.and_then(context_hint).filter(|h| replicas.contains(h));
    hint.into_iter().chain(replicas.iter().copied().filter(|&m| Some(m) != hint)).collect()
}

/// The replica side of a [`ReplicaMsg::Put`] (a put's replication or a read
/// repair): merges `incoming` into the stored set `local` (`None`: not
/// found). Returns `Some(merged)` when the stored set must change, `None`
/// when `incoming` brings nothing new (no write needed). Fails with
/// [`VersionError::TooManySiblings`] or [`VersionError::TooLarge`] when the
/// merge would exceed the sibling or the object limit; the replica then
/// refuses and keeps what it has. The driver still checks the merged set's
/// value size against its own storage limit, as `Store::put` does.
pub fn apply_replica_put(local: Option<VersionSet>, incoming: &VersionSet) -> Result<Option<VersionSet>, VersionError> {
    let local = local.unwrap_or_default();
    let mut merged = local.clone();
    merged.merge(incoming);
    if merged == local {
        return Ok(None);
    }
    merged.check_limits()?;
    Ok(Some(merged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::version::{Clock, Dot};

    const DEADLINE: u64 = 1_000;

    #[test]
    fn a_hinted_write_goes_to_its_coordinator_first() {
        let hinted = |h| crate::core::version::encode_context(&Clock::new(), b"k", Some(h));
        assert_eq!(coordinator_order(&[4, 2, 7], None), [4, 2, 7]);
        assert_eq!(coordinator_order(&[4, 2, 7], Some(&hinted(7))), [7, 4, 2]);
        assert_eq!(coordinator_order(&[4, 2, 7], Some(&hinted(9))), [4, 2, 7], "not a replica: ignored");
        assert_eq!(coordinator_order(&[4, 2, 7], Some(b"junk")), [4, 2, 7]);
        assert_eq!(coordinator_order(&[4, 2, 7], Some(&[])), [4, 2, 7], "no context, no hint");
    }

    /// A set with one write per actor in `actors`, all concurrent.
    fn concurrent(actors: &[u64]) -> VersionSet {
        let mut s = VersionSet::new();
        for &a in actors {
            s.update(&Clock::new(), a, Some(vec![a as u8])).unwrap();
        }
        s
    }

    fn drain<F: FnMut() -> Option<Transmit>>(mut poll: F) -> Vec<Transmit> {
        std::iter::from_fn(&mut poll).collect()
    }

    fn put(w: usize) -> PutCoordinator {
        PutCoordinator::new(concurrent(&[1]), 0, &[1, 2], w, 0, DEADLINE).unwrap()
    }

    #[test]
    fn put_sends_the_set_to_the_others_and_succeeds_on_w_acks() {
        let set = concurrent(&[1]);
        let mut p = PutCoordinator::new(set.clone(), 0, &[1, 2], 2, 0, DEADLINE).unwrap();
        let sent = drain(|| p.poll_transmit());
        assert_eq!(sent, [1, 2].map(|to| Transmit { to, msg: ReplicaMsg::Put { set: Arc::new(set.clone()) } }));
        assert_eq!(p.poll_outcome(), None);
        assert_eq!(p.poll_timeout(), Some(DEADLINE));
        p.handle_ack(2, 10);
        assert_eq!(p.poll_outcome(), Some(Ok(PutOutcome { acks: 2, of: 3 })));
        assert_eq!(p.poll_outcome(), None, "exactly once");
        assert_eq!(p.poll_timeout(), None);
        assert!(p.is_done());
        // A late ack is accepted silently.
        p.handle_ack(1, 20);
        assert_eq!(p.acks(), 3);
        assert_eq!(p.poll_outcome(), None);
        assert!(p.is_done());
    }

    #[test]
    fn put_with_w_1_is_decided_by_the_local_write_and_still_replicates() {
        let mut p = put(1);
        assert_eq!(p.poll_outcome(), Some(Ok(PutOutcome { acks: 1, of: 3 })));
        assert!(!p.is_done(), "transmits still to take");
        assert_eq!(drain(|| p.poll_transmit()).len(), 2);
        assert!(p.is_done());
    }

    #[test]
    fn put_fails_as_soon_as_failures_make_w_unreachable() {
        let mut p = put(3);
        p.handle_ack(1, 5);
        assert_eq!(p.poll_outcome(), None);
        p.handle_failure(2, ReplicaFailure::Unreachable, 6);
        let err = p.poll_outcome().unwrap().unwrap_err();
        assert_eq!(
            err,
            QuorumError {
                needed: 3,
                answered: 2,
                of: 3,
                reason: QuorumFailure::Failures { refused: 0, unreachable: 1 }
            }
        );
        assert_eq!(
            err.to_string(),
            "quorum not reached: 2 of 3 replicas answered, 0 refused and 1 unreachable, 3 needed"
        );
        // A reply after the failure, and the timer, change nothing.
        p.handle_ack(2, 7);
        p.handle_timeout(DEADLINE);
        assert_eq!(p.poll_outcome(), None);
        assert_eq!(p.acks(), 2);
    }

    /// Found by a review: a put that replicas refused because merged with
    /// their versions the key would pass a limit failed as a plain quorum
    /// failure, which reads as worth retrying; it names the limit now.
    /// A put that succeeds anyway is a success.
    #[test]
    fn a_put_refused_for_a_limit_fails_as_that_limit() {
        let mut p = put(2);
        p.handle_failure(1, ReplicaFailure::Unreachable, 5);
        assert_eq!(p.poll_outcome(), None);
        p.handle_failure(2, ReplicaFailure::OverLimit(Limit::Siblings), 6);
        let err = p.poll_outcome().unwrap().unwrap_err();
        let reason = QuorumFailure::OverLimit { limit: Limit::Siblings, refused: 1, unreachable: 1 };
        assert_eq!(err, QuorumError { needed: 2, answered: 1, of: 3, reason });
        assert!(err.to_string().contains("more than 64 siblings"), "{err}");
        let mut p = put(2);
        p.handle_failure(1, ReplicaFailure::OverLimit(Limit::Size), 5);
        p.handle_failure(2, ReplicaFailure::OverLimit(Limit::Siblings), 6);
        let reason = p.poll_outcome().unwrap().unwrap_err().reason;
        assert_eq!(reason, QuorumFailure::OverLimit { limit: Limit::Size, refused: 2, unreachable: 0 }, "the first");
        let mut p = put(2);
        p.handle_failure(1, ReplicaFailure::OverLimit(Limit::Size), 5);
        p.handle_ack(2, 6);
        assert_eq!(p.poll_outcome(), Some(Ok(PutOutcome { acks: 2, of: 3 })));
    }

    #[test]
    fn put_fails_at_the_deadline_and_not_before() {
        let mut p = put(2);
        p.handle_timeout(DEADLINE - 1);
        assert_eq!(p.poll_outcome(), None);
        p.handle_timeout(DEADLINE);
        let err = p.poll_outcome().unwrap().unwrap_err();
        assert_eq!(err, QuorumError { needed: 2, answered: 1, of: 3, reason: QuorumFailure::Deadline });
        assert_eq!(err.to_string(), "quorum not reached: 1 of 3 replicas answered before the deadline, 2 needed");
        drain(|| p.poll_transmit());
        assert!(p.is_done());
    }

    #[test]
    fn put_ack_at_the_deadline_wins_over_the_unreported_deadline() {
        let mut p = put(2);
        p.handle_ack(1, DEADLINE + 5);
        assert_eq!(p.poll_outcome(), Some(Ok(PutOutcome { acks: 2, of: 3 })));
    }

    #[test]
    fn put_ignores_duplicate_and_unexpected_acks() {
        let mut p = put(3);
        p.handle_ack(1, 1);
        p.handle_ack(1, 2);
        p.handle_ack(0, 3); // the coordinator itself: already counted
        p.handle_ack(9, 4); // not a replica of this request
        assert_eq!(p.acks(), 2);
        assert_eq!(p.poll_outcome(), None);
        p.handle_failure(1, ReplicaFailure::Refused, 5); // after its ack
        assert_eq!(p.poll_outcome(), None);
        p.handle_ack(2, 6);
        assert_eq!(p.poll_outcome(), Some(Ok(PutOutcome { acks: 3, of: 3 })));
    }

    #[test]
    fn arguments_are_validated() {
        let set = VersionSet::new();
        let range = |kind, got, n| Some(QuorumArgError::OutOfRange { kind, got, n });
        assert_eq!(PutCoordinator::new(set.clone(), 0, &[1, 2], 0, 0, 1).err(), range(QuorumKind::W, 0, 3));
        assert_eq!(PutCoordinator::new(set.clone(), 0, &[1, 2], 4, 0, 1).err(), range(QuorumKind::W, 4, 3));
        assert_eq!(
            PutCoordinator::new(set.clone(), 1, &[1, 2], 2, 0, 1).err(),
            Some(QuorumArgError::DuplicateReplica(1))
        );
        assert_eq!(GetCoordinator::new(&[], 1, 0, 1).err(), range(QuorumKind::R, 1, 0));
        assert_eq!(GetCoordinator::new(&[0, 1, 2], 0, 0, 1).err(), range(QuorumKind::R, 0, 3));
        assert_eq!(GetCoordinator::new(&[0, 1, 0], 2, 0, 1).err(), Some(QuorumArgError::DuplicateReplica(0)));
        assert_eq!(
            GetCoordinator::new(&[0, 1, 2], 4, 0, 1).unwrap_err().to_string(),
            "R = 4 is outside 1..=3 for 3 replicas"
        );
        // N = 1: the local write alone is the quorum.
        let mut p = PutCoordinator::new(set, 0, &[], 1, 0, 1).unwrap();
        assert!(p.poll_outcome().unwrap().is_ok());
        assert!(p.is_done());
    }

    fn get(r: usize) -> GetCoordinator {
        let mut g = GetCoordinator::new(&[0, 1, 2], r, 0, DEADLINE).unwrap();
        let sent = drain(|| g.poll_transmit());
        assert_eq!(sent, [0, 1, 2].map(|to| Transmit { to, msg: ReplicaMsg::Get }));
        g
    }

    fn dots(set: &VersionSet) -> Vec<Dot> {
        set.siblings().iter().map(|s| s.dot).collect()
    }

    #[test]
    fn get_returns_the_merge_of_r_answers_with_concurrent_siblings() {
        let mut g = get(2);
        g.handle_reply(1, Some(concurrent(&[10])), 1);
        assert_eq!(g.poll_outcome(), None);
        assert_eq!(g.fastest(), Some(1));
        g.handle_reply(1, Some(concurrent(&[99])), 2); // duplicate: ignored
        g.handle_reply(0, Some(concurrent(&[11])), 3);
        let got = g.poll_outcome().unwrap().unwrap();
        assert_eq!(dots(&got), [Dot { actor: 10, counter: 1 }, Dot { actor: 11, counter: 1 }]);
        assert_eq!(got, concurrent(&[10, 11]));
        assert_eq!(g.poll_outcome(), None, "exactly once");
        // Still waiting for replica 2, for read repair.
        assert_eq!(g.poll_timeout(), Some(DEADLINE));
        assert!(!g.is_done());
    }

    #[test]
    fn read_repair_sends_the_full_merge_to_stale_and_missing_replicas() {
        let mut g = get(2);
        let old = concurrent(&[10]);
        let mut new = old.clone();
        new.update(old.clock(), 11, Some(b"new".to_vec())).unwrap();
        g.handle_reply(0, Some(new.clone()), 1);
        g.handle_reply(1, Some(old), 2);
        assert_eq!(g.poll_outcome(), Some(Ok(new.clone())));
        let repair = |to| Transmit { to, msg: ReplicaMsg::Put { set: Arc::new(new.clone()) } };
        assert_eq!(drain(|| g.poll_transmit()), [repair(1)], "the stale replica, at once");
        g.handle_reply(2, None, 3);
        assert_eq!(drain(|| g.poll_transmit()), [repair(2)], "the missing one when it answers; 1 has it now");
        assert_eq!(g.repairs(), 2);
        assert_eq!(g.poll_timeout(), None);
        assert!(g.is_done());
    }

    /// Regression: the repair was decided only once every replica had
    /// answered or at the deadline, so one hung replica held it back to
    /// the deadline, and the node's peer layer then dropped the repair
    /// (sent with that deadline, already passed) unsent.
    #[test]
    fn read_repair_goes_out_at_the_outcome_without_waiting_for_a_hung_replica() {
        let mut g = get(2);
        let value = concurrent(&[10]);
        g.handle_reply(0, Some(value.clone()), 1);
        g.handle_reply(2, None, 2); // replica 2 missed the write; replica 1 hangs
        assert_eq!(g.poll_outcome(), Some(Ok(value.clone())));
        assert_eq!(
            drain(|| g.poll_transmit()),
            [Transmit { to: 2, msg: ReplicaMsg::Put { set: Arc::new(value.clone()) } }],
            "repaired long before the deadline"
        );
        assert_eq!(g.repairs(), 1);
        assert!(g.is_listening() && !g.is_done(), "still waiting for replica 1");
        assert_eq!(g.poll_timeout(), Some(DEADLINE));
        // Replica 1 never answers: the deadline sends nothing more.
        g.handle_timeout(DEADLINE);
        assert_eq!(g.poll_transmit(), None);
        assert_eq!(g.repairs(), 1);
        assert!(g.is_done());
    }

    #[test]
    fn a_late_answer_with_more_sends_the_new_merge_to_every_replica_without_it() {
        let mut g = get(2);
        g.handle_reply(0, Some(concurrent(&[10])), 1);
        g.handle_reply(1, None, 2);
        assert!(g.poll_outcome().unwrap().is_ok());
        let first = drain(|| g.poll_transmit());
        assert_eq!(first, [Transmit { to: 1, msg: ReplicaMsg::Put { set: Arc::new(concurrent(&[10])) } }]);
        // Replica 2 has a concurrent write: all three need the new merge
        // (0 and 1 lack 11, 2 lacks 10).
        g.handle_reply(2, Some(concurrent(&[11])), 3);
        let full = concurrent(&[10, 11]);
        assert_eq!(
            drain(|| g.poll_transmit()),
            [0, 1, 2].map(|to| Transmit { to, msg: ReplicaMsg::Put { set: Arc::new(full.clone()) } })
        );
        assert_eq!(g.repairs(), 4);
        assert!(g.is_done());
        // Nothing after the get stopped listening.
        g.handle_reply(2, Some(concurrent(&[12])), 4);
        g.handle_timeout(DEADLINE);
        assert_eq!((g.poll_transmit(), g.repairs()), (None, 4));
    }

    #[test]
    fn read_repair_merges_answers_that_came_after_the_outcome() {
        let mut g = get(1);
        g.handle_reply(0, Some(concurrent(&[10])), 1);
        assert_eq!(g.poll_outcome(), Some(Ok(concurrent(&[10]))));
        g.handle_reply(1, Some(concurrent(&[11])), 2);
        g.handle_reply(2, Some(concurrent(&[10, 11])), 3);
        let full = concurrent(&[10, 11]);
        let repairs = drain(|| g.poll_transmit());
        assert_eq!(repairs, [0, 1].map(|to| Transmit { to, msg: ReplicaMsg::Put { set: Arc::new(full.clone()) } }));
    }

    #[test]
    fn no_repair_when_all_agree() {
        let mut g = get(2);
        for m in 0..3 {
            g.handle_reply(m, Some(concurrent(&[10, 11])), 1);
        }
        assert!(g.poll_outcome().unwrap().is_ok());
        assert_eq!(g.poll_transmit(), None);
        assert_eq!(g.repairs(), 0);
        assert!(g.is_done());
        // All "not found": no repair either.
        let mut g = get(3);
        for m in 0..3 {
            g.handle_reply(m, None, 1);
        }
        assert_eq!(g.poll_outcome(), Some(Ok(VersionSet::new())));
        assert_eq!((g.poll_transmit(), g.repairs()), (None, 0));
    }

    #[test]
    fn no_repair_to_a_replica_that_never_answered_or_failed() {
        let mut g = get(1);
        g.handle_reply(0, Some(concurrent(&[10])), 1);
        assert!(g.poll_outcome().unwrap().is_ok());
        g.handle_failure(1, ReplicaFailure::Refused, 2);
        g.handle_timeout(DEADLINE - 1);
        assert_eq!(g.poll_transmit(), None);
        assert!(!g.is_done());
        g.handle_timeout(DEADLINE);
        assert_eq!(g.poll_transmit(), None, "replica 0 is the merge; 1 failed; 2 never answered");
        assert_eq!(g.repairs(), 0);
        assert!(g.is_done());
        g.handle_reply(2, None, DEADLINE + 1);
        assert_eq!(g.poll_transmit(), None, "too late");
    }

    #[test]
    fn get_fails_when_r_is_out_of_reach_or_at_the_deadline() {
        let mut g = get(2);
        g.handle_reply(0, Some(concurrent(&[10])), 1);
        g.handle_failure(1, ReplicaFailure::Refused, 2);
        assert_eq!(g.poll_outcome(), None);
        g.handle_failure(2, ReplicaFailure::Unreachable, 3);
        assert_eq!(
            g.poll_outcome(),
            Some(Err(QuorumError {
                needed: 2,
                answered: 1,
                of: 3,
                reason: QuorumFailure::Failures { refused: 1, unreachable: 1 }
            }))
        );
        assert!(g.is_done());

        let mut g = get(3);
        g.handle_reply(0, Some(concurrent(&[10])), 1);
        g.handle_reply(1, None, 2);
        g.handle_timeout(DEADLINE);
        assert_eq!(
            g.poll_outcome(),
            Some(Err(QuorumError { needed: 3, answered: 2, of: 3, reason: QuorumFailure::Deadline }))
        );
        // Whatever answered is repaired even though the read failed.
        assert_eq!(
            drain(|| g.poll_transmit()),
            [Transmit { to: 1, msg: ReplicaMsg::Put { set: Arc::new(concurrent(&[10])) } }]
        );
        assert!(g.is_done());
    }

    #[test]
    fn get_whose_answers_merge_past_the_sibling_limit_fails_and_repairs_nothing() {
        let half = MAX_SIBLINGS as u64 / 2 + 1;
        let a: Vec<u64> = (0..half).collect();
        let b: Vec<u64> = (half..2 * half).collect();
        let mut g = get(2);
        g.handle_reply(0, Some(concurrent(&a)), 1);
        g.handle_reply(1, Some(concurrent(&b)), 2);
        let err = g.poll_outcome().unwrap().unwrap_err();
        let reason = QuorumFailure::TooManySiblings { siblings: 2 * half as usize, max: MAX_SIBLINGS };
        assert_eq!(err, QuorumError { needed: 2, answered: 2, of: 3, reason });
        assert_eq!(
            err.to_string(),
            "2 of 3 replicas answered, but their versions merge to 66 siblings, over the limit of 64"
        );
        g.handle_reply(2, None, 3);
        assert_eq!((g.poll_transmit(), g.repairs()), (None, 0));
        assert!(g.is_done());
    }

    /// Regression (found by reviews): each replica holds its set to the
    /// object limit, but two diverged replicas' union can be twice that.
    /// Returned, it made a reply over the wire's frame limit (a debug
    /// build panicked encoding it, clients refused it), and so did the
    /// repair sent to the replicas. It now fails with its own reason, and
    /// nothing is repaired; a replica refuses such a merge too.
    #[test]
    fn get_whose_answers_merge_past_the_object_limit_fails_and_repairs_nothing() {
        use crate::limits::VALUE_LEN_HARD_CAP;
        let big = |actors: std::ops::Range<u64>| {
            let mut s = VersionSet::new();
            for a in actors {
                s.update(&Clock::new(), a, Some(vec![a as u8; 1024 * 1024])).unwrap();
            }
            s
        };
        let (a, b) = (big(1..8), big(11..18));
        assert!(a.check_limits().is_ok() && b.check_limits().is_ok(), "each replica's set is within the limits");
        let mut g = get(2);
        g.handle_reply(0, Some(a.clone()), 1);
        g.handle_reply(1, Some(b.clone()), 2);
        let err = g.poll_outcome().unwrap().unwrap_err();
        let reason = QuorumFailure::TooLarge { len: 14 * 1024 * 1024, max: VALUE_LEN_HARD_CAP };
        assert_eq!(err, QuorumError { needed: 2, answered: 2, of: 3, reason });
        assert_eq!((g.poll_transmit(), g.repairs()), (None, 0));
        assert_eq!(
            apply_replica_put(Some(a), &b),
            Err(VersionError::TooLarge { len: 14 * 1024 * 1024, max: VALUE_LEN_HARD_CAP })
        );
    }

    #[test]
    fn apply_replica_put_merges_and_reports_changes() {
        let a = concurrent(&[1]);
        // Nothing stored: store the incoming set.
        assert_eq!(apply_replica_put(None, &a), Ok(Some(a.clone())));
        // The same again, or an older one: nothing to write.
        assert_eq!(apply_replica_put(Some(a.clone()), &a), Ok(None));
        assert_eq!(apply_replica_put(None, &VersionSet::new()), Ok(None));
        let mut newer = a.clone();
        newer.update(a.clock(), 2, Some(b"n".to_vec())).unwrap();
        assert_eq!(apply_replica_put(Some(newer.clone()), &a), Ok(None));
        // A newer one replaces, a concurrent one joins.
        assert_eq!(apply_replica_put(Some(a.clone()), &newer), Ok(Some(newer.clone())));
        assert_eq!(apply_replica_put(Some(concurrent(&[1])), &concurrent(&[3])), Ok(Some(concurrent(&[1, 3]))));
        // Past the sibling limit: refused.
        let half = MAX_SIBLINGS as u64 / 2 + 1;
        let many = concurrent(&(0..half).collect::<Vec<_>>());
        let others = concurrent(&(half..2 * half).collect::<Vec<_>>());
        assert_eq!(
            apply_replica_put(Some(many), &others),
            Err(VersionError::TooManySiblings { siblings: 2 * half as usize, max: MAX_SIBLINGS })
        );
    }
}
