//! The key-value layer of one shard: Dynamo's `get`/`put`/`delete` with
//! causal versions, over that shard's storage engine.
//!
//! Owns: how a key's [`VersionSet`] is stored (its encoded clock and
//! sibling table in the record's causal-metadata field, the live sibling
//! values concatenated in the record's value), and the read-reconcile-append
//! cycle of a write.
//!
//! Invariant: a write never loses a version it has not seen. The cycle
//! reads the stored set, applies the update, and appends with
//! [`Engine::put_if_now`], which refuses if any other write to the key landed
//! in between; the cycle then starts again from a fresh read. A key whose
//! every sibling is a delete is stored as a storage tombstone that still
//! carries the clock, so a later write with an old context does not
//! resurrect what was deleted; compaction forgets it after the engine's
//! tombstone grace period (a lone node's; a cluster's are kept). Every new
//! dot is drawn above the shard's last sequence number (`Store::update`), so a
//! key forgotten that way never has a dot reissued; a client context bound
//! to another key is refused, and so is one
//! naming a counter the key has not seen if it is over
//! [`MAX_CONTEXT_COUNTER`], or is this node's own past its last sequence
//! number (`Store::update`); a replica's set naming one over
//! [`MAX_REPLICA_COUNTER`] is refused (`Store::merge`).

use std::cell::RefCell;
use std::rc::Rc;

use thiserror::Error;

use crate::auth::ClusterKeys;
use crate::core::coord::apply_replica_put;
use crate::core::version::{
    bind_encoded_clock, decode_context, encode_context_into, Actor, Clock, Dot, VersionError, VersionSet,
};
use crate::storage::backend::Backend;
use crate::storage::{Engine, Kind, PendingWrite, Record, RecordId, StorageError};

/// The largest counter a client's context may hold. Counters are shards'
/// sequence numbers ([`Store`]'s `Store::update`), and 2^53 is about 285 years
/// of a million writes a second on one shard; a larger one can only be
/// forged, and is refused, so no stored counter gets near `u64::MAX`
/// (where the next dot would overflow).
pub const MAX_CONTEXT_COUNTER: u64 = 1 << 53;

/// The largest counter a replica's set may bring that the key does not
/// hold yet. Above [`MAX_CONTEXT_COUNTER`]: a counter a client could still
/// bring (at the bound) grows by one with each write of the key after
/// that, and replicas must take those writes; 2^62 leaves 2^62 - 2^53
/// writes of one key for that, and as far again to `u64::MAX`.
pub const MAX_REPLICA_COUNTER: u64 = 1 << 62;
const _: () = assert!(MAX_CONTEXT_COUNTER < MAX_REPLICA_COUNTER / 2);

/// Conflicting writes on one key that make a write start over this many
/// times give up with [`StoreError::Contended`] rather than spin.
pub const MAX_WRITE_ATTEMPTS: usize = 64;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("invalid context: {0}")]
    InvalidContext(VersionError),
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("the key's siblings would total {len} bytes, over the stored-object limit of {max}; read the key and write back with its context to resolve them")]
    ObjectTooLarge { len: usize, max: usize },
    #[error("{0}; read the key and write back with its context to resolve them")]
    TooManySiblings(VersionError),
    #[error("stored versions of the key are unreadable: {0}")]
    CorruptVersions(VersionError),
    #[error("the key was rewritten concurrently {MAX_WRITE_ATTEMPTS} times in a row")]
    Contended,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The result of a write: the key's whole stored set after it (what a
/// coordinator sends to the other replicas), and what its writer has seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub set: VersionSet,
    /// The writer's context when it is not the set's whole clock (other
    /// live siblings it never received: [`VersionSet::writer_context`]).
    seen: Option<Clock>,
}

impl Written {
    /// The context of the new version: what its writer has seen, to pass
    /// with its next write of the key. Covers no value the writer was not
    /// given.
    pub fn context(&self) -> &Clock {
        self.seen.as_ref().unwrap_or(self.set.clock())
    }

    /// Live values the key has now (more than one: a concurrent write).
    pub fn siblings(&self) -> usize {
        self.set.live_values().count()
    }
}

/// One shard's key-value store.
pub struct Store<B: Backend> {
    engine: Engine<B>,
    /// The dot actor of this node: every version this node creates is
    /// named `(actor, n)`.
    actor: Actor,
    /// Largest single value a client may write; the engine's own value
    /// limit bounds the whole stored object (all siblings together).
    max_value_len: usize,
    /// The encoding `(meta, value)` of the set a write appends, reused:
    /// the engine copies it into the log at once, so no write needs
    /// buffers of its own (and none holds any through a durability wait).
    scratch: RefCell<(Vec<u8>, Vec<u8>)>,
    /// The context a GET or a write answered at once hands out (bound to
    /// its key), reused as `scratch` is: built per reply, copied into it.
    context: RefCell<Vec<u8>>,
    /// Whether a write may bring a context not bound to its key (formats
    /// older nodes handed out, which clients may hold across an upgrade);
    /// nothing can tell such a context from another key's.
    accept_unbound: bool,
    /// The cluster secret's keys, if the node has one: every context it
    /// hands out is signed (format 4), and a write's context with a clock
    /// must carry a valid signature, so that no client can forge one
    /// (unless the keys also take the unauthenticated, while a cluster
    /// turns its secret on).
    keys: Option<Rc<ClusterKeys>>,
}

impl<B: Backend> Store<B> {
    pub fn new(engine: Engine<B>, actor: Actor, max_value_len: usize) -> Self {
        Store {
            engine,
            actor,
            max_value_len,
            scratch: RefCell::default(),
            context: RefCell::default(),
            accept_unbound: true,
            keys: None,
        }
    }

    /// Signs the contexts this store hands out with `keys`, and takes only
    /// contexts so signed (or with nothing seen) with a write.
    pub fn with_keys(mut self, keys: Option<Rc<ClusterKeys>>) -> Self {
        self.keys = keys;
        self
    }

    /// The cluster secret's keys this store signs with, if any.
    pub fn keys(&self) -> Option<&ClusterKeys> {
        self.keys.as_deref()
    }

    /// Runs `reply` on the context of `clock` for `key`, naming coordinator
    /// `hint`: bound to the key, signed if the node has a cluster secret,
    /// and built in the store's reused buffer (`Self::with_context`).
    pub fn with_context_of<R>(
        &self,
        clock: &Clock,
        key: &[u8],
        hint: Option<u16>,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> R {
        self.with_context(key, |out| encode_context_into(out, clock, key, hint), reply)
    }

    /// Refuses (`accept: false`) or takes a write's context that is not
    /// bound to a key, one that is not empty (what older nodes handed out).
    /// Taken by default: a client may hold one across an upgrade, and only
    /// a node that takes them keeps it writable. Refused, another key's
    /// unbound context can no longer drop this key's writes
    /// (`Self::update`'s known hole).
    pub fn with_unbound_contexts(mut self, accept: bool) -> Self {
        self.accept_unbound = accept;
        self
    }

    /// The largest value a put may store.
    pub fn max_value_len(&self) -> usize {
        self.max_value_len
    }

    pub fn engine(&self) -> &Engine<B> {
        &self.engine
    }

    /// The key's versions (empty if it was never written or is forgotten),
    /// once they meet the durability policy: under `always`, a version
    /// written but not yet committed is not shown before it is
    /// ([`Engine::unsettled_read`]).
    pub async fn get(&self, key: &[u8]) -> Result<VersionSet, StoreError> {
        Ok(decode_record(self.engine.get_settled(key).await?)?.0)
    }

    /// A lone node's GET answered from memory without waiting: `reply` gets
    /// the context (bound to `key`, with no hint) and the live values,
    /// borrowed from the stored record (no value is copied). `None` when
    /// the record must be read from disk; [`Self::get`] does that. With the
    /// reply, what it must wait for before it is shown, as a write's reply
    /// does: a version not yet durable under `always`
    /// ([`Engine::unsettled_read`]).
    pub fn get_now<R>(
        &self,
        key: &[u8],
        reply: impl FnOnce(&[u8], Vec<&[u8]>) -> R,
    ) -> Option<Result<(R, Option<PendingWrite>), StoreError>> {
        let rec = match self.engine.get_now(key)? {
            Ok(rec) => rec,
            Err(e) => return Some(Err(e.into())),
        };
        let mut live = Vec::new();
        let context = match &rec {
            None => &[][..],
            Some(rec) => match VersionSet::decode_live(rec.meta(), rec.value(), &mut live) {
                Ok(context) => context,
                Err(e) => return Some(Err(StoreError::CorruptVersions(e))),
            },
        };
        let unsettled = rec.as_ref().and_then(|rec| self.engine.unsettled_read(rec.id()));
        let bind = |out: &mut Vec<u8>| bind_encoded_clock(out, context, key, None);
        Some(Ok((self.with_context(key, bind, |context| reply(context, live)), unsettled)))
    }

    /// Runs `reply` on a context of `key` that `build` writes into the
    /// reused buffer (signed here if the node has a cluster secret). The
    /// buffer is out of the store meanwhile: a `reply` that called back
    /// into the store would find it empty (and allocate one), not
    /// borrowed.
    fn with_context<R>(&self, key: &[u8], build: impl FnOnce(&mut Vec<u8>), reply: impl FnOnce(&[u8]) -> R) -> R {
        let mut context = self.context.take();
        context.clear();
        build(&mut context);
        if let Some(k) = &self.keys {
            k.sign(&mut context, key);
        }
        let r = reply(&context);
        self.context.replace(context);
        r
    }

    /// The key's stored versions and their record, as they stand (a write
    /// reads them to apply itself, durable yet or not).
    async fn read(&self, key: &[u8]) -> Result<(VersionSet, Option<RecordId>), StoreError> {
        decode_record(self.engine.get(key).await?)
    }

    /// Writes `value` (`None`: a delete) as the successor of the versions
    /// `context` has seen. `context` is what a get returned (empty: none).
    pub async fn put(
        &self,
        key: &[u8],
        context: &[u8],
        value: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<Written, StoreError> {
        let ctx = self.check_write(key, context, value)?;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            self.engine.wait_for_compaction().await;
            let (mut set, id) = self.read(key).await?;
            let dot = self.update(&mut set, &ctx, value.map(<[u8]>::to_vec))?;
            if self.write_if(key, &set, id, now_ms).await? {
                let seen = set.writer_context(&ctx, dot);
                return Ok(Written { set, seen });
            }
        }
        Err(StoreError::Contended)
    }

    /// [`Self::put`] without waiting, when the key's record is in memory
    /// (or it has none), on a lone node: reads the stored versions borrowed
    /// from the record, applies the update and appends the result in one
    /// step, so no other write of the key can come between, and no value is
    /// copied but the new one into the log. `reply` gets the new context
    /// (what the writer has seen, bound to `key` with no hint: the stored
    /// clock, or [`VersionSet::writer_context`] when other live siblings
    /// remain) and the number of live siblings. `None`, having done nothing, when the record must
    /// first be read from disk, or while writes wait for compaction
    /// ([`Engine::wait_for_compaction`]): then [`Self::put`] does the whole
    /// cycle.
    ///
    /// The write is visible at once, but may be acknowledged only once the
    /// returned [`PendingWrite`] has settled ([`Engine::settle`]).
    pub fn put_now<R>(
        &self,
        key: &[u8],
        context: &[u8],
        value: Option<&[u8]>,
        now_ms: u64,
        reply: impl FnOnce(&[u8], usize) -> R,
    ) -> Option<Result<(R, PendingWrite), StoreError>> {
        let ctx = match self.check_write(key, context, value) {
            Ok(ctx) => ctx,
            Err(e) => return Some(Err(e)),
        };
        // Writes wait for compaction before they are taken: `put` does
        // (after the same check, so a bad request is refused at once).
        if self.engine.write_stalled() {
            return None;
        }
        let rec = match self.engine.get_now(key)? {
            Ok(rec) => rec,
            Err(e) => return Some(Err(e.into())),
        };
        let mut set = match &rec {
            None => VersionSet::default(),
            Some(rec) => match VersionSet::decode_borrowed(rec.meta(), rec.value()) {
                Ok(set) => set,
                Err(e) => return Some(Err(StoreError::CorruptVersions(e))),
            },
        };
        let dot = match self.update(&mut set, &ctx, value) {
            Ok(dot) => dot,
            Err(e) => return Some(Err(e)),
        };
        let (pending, context_len) = match self.append_now(key, &set, rec.as_ref().map(|r| r.id()), now_ms) {
            Ok(Some(appended)) => appended,
            Err(e) => return Some(Err(e)),
            // Nothing ran between the read and the append, so no other
            // write can have come first; were one to, the whole cycle
            // starts again where it can wait.
            Ok(None) => return None,
        };
        let siblings = set.live_values().count();
        let bind = |out: &mut Vec<u8>| match set.writer_context(&ctx, dot) {
            // The common case: the prefix of the stored encoding.
            None => bind_encoded_clock(out, &self.scratch.borrow().0[..context_len], key, None),
            Some(seen) => encode_context_into(out, &seen, key, None),
        };
        let reply = self.with_context(key, bind, |context| reply(context, siblings));
        Some(Ok((reply, pending)))
    }

    /// Applies a client's write to the stored `set` (both paths, `put` and
    /// `put_now`, go through here): checks `ctx` against the stored clock,
    /// then updates with a new dot drawn above the shard's last sequence
    /// number.
    ///
    /// The dot: every dot this node issues on the shard is above that
    /// number and at most the sequence number of the record that stores it
    /// (its counter is the number plus one, or one above the key's counter,
    /// itself at most the last record's number), so a dot is never one the
    /// node issued before, whatever the key's record still says. That holds
    /// when the node forgot the key (compaction dropped its tombstone): a
    /// client's context from before the delete, or a replica's copy, would
    /// otherwise cover the next write there and drop it (found by reviews).
    /// And when the key's clock lost this node's entry to the bound (a merge
    /// with more than `MAX_CLOCK_ENTRIES` writers, which a forged context
    /// can bring about: found by a review). Costs a few bytes a clock entry
    /// and a dot: counters are sequence numbers.
    ///
    /// The check: the context is untrusted. An entry the key's clock
    /// already holds is one the key has seen, and is taken whatever it is
    /// (a forged counter another replica took becomes the key's own: found
    /// by a review, refusing it then left the key unwritable with any
    /// context). Past that, refused: a counter over [`MAX_CONTEXT_COUNTER`]
    /// (one near `u64::MAX` made every later write of the key overflow its
    /// dot; found by a review), and one of this node's own past its last
    /// sequence number (a write it never made, which would cover its next
    /// ones). So a stored counter grows past the bound only one a write.
    ///
    /// Known hole: another node's counter past anything it wrote is taken
    /// (only that node could judge it), and a replica that stores it drops
    /// as seen every write of that node's to the key made without that
    /// entry, up to the counter, until repair gives the node the entry
    /// (ARCHITECTURE.md, "Data directory of a node"). An honest client's
    /// context of another key did that; contexts are bound to their key
    /// now, and `check_write` refuses another key's. A forged context still
    /// can on a node without a cluster secret (or one that takes the
    /// unauthenticated while a secret is turned on): with one, only the
    /// contexts the cluster signed are taken. So can an unbound one (an
    /// older node's format) while the node takes those.
    fn update<V: AsRef<[u8]>>(
        &self,
        set: &mut VersionSet<V>,
        ctx: &Clock,
        value: Option<V>,
    ) -> Result<Dot, StoreError> {
        let last_seq = self.engine.last_seq();
        if unseen_past(set.clock(), ctx, MAX_CONTEXT_COUNTER) {
            let why = "a context counter beyond any real history";
            return Err(StoreError::InvalidContext(VersionError::Malformed(why)));
        }
        let own = ctx.get(self.actor);
        if own > set.clock().get(self.actor) && own > last_seq {
            let why = "the context names a write this node never made";
            return Err(StoreError::InvalidContext(VersionError::Malformed(why)));
        }
        set.update_after(ctx, self.actor, value, last_seq).map_err(update_error)
    }

    /// The context of a write of `key`, once the write is known to be
    /// within the client limits and the context is not another key's.
    fn check_write(&self, key: &[u8], context: &[u8], value: Option<&[u8]>) -> Result<Clock, StoreError> {
        let ctx = decode_context(context).map_err(StoreError::InvalidContext)?;
        ctx.check_key(key).map_err(StoreError::InvalidContext)?;
        if let Some(k) = &self.keys {
            k.check(key, context, &ctx).map_err(StoreError::InvalidContext)?;
        }
        if ctx.key_tag.is_none() && !ctx.clock.is_empty() && !self.accept_unbound {
            return Err(StoreError::InvalidContext(VersionError::Unbound));
        }
        if let Some(v) = value {
            if v.len() > self.max_value_len {
                return Err(StoreError::ValueTooLarge { len: v.len(), max: self.max_value_len });
            }
        }
        Ok(ctx.clock)
    }

    /// Appends `set` if the key still holds record `id` (the one it was
    /// read from): the write to settle and the length of the new context
    /// at the front of the encoding left in `scratch`; `None` if another
    /// write came first.
    fn append_now<V: AsRef<[u8]>>(
        &self,
        key: &[u8],
        set: &VersionSet<V>,
        id: Option<RecordId>,
        now_ms: u64,
    ) -> Result<Option<(PendingWrite, usize)>, StoreError> {
        let max = self.engine.config().max_value_len;
        let len = set.encoded_value_len();
        if len > max {
            return Err(StoreError::ObjectTooLarge { len, max });
        }
        let mut scratch = self.scratch.borrow_mut();
        let (meta, bytes) = &mut *scratch;
        meta.clear();
        bytes.clear();
        let context_len = set.encode_into(meta, bytes);
        let kind = if set.all_tombstones() { Kind::Tombstone } else { Kind::Value };
        let pending = self.engine.put_if_now(kind, key, meta, bytes, now_ms, id)?;
        Ok(pending.map(|p| (p, context_len)))
    }

    /// Stores `set` if the key still holds record `id` (the one it was
    /// read from) and waits for it to settle; false if another write came
    /// first.
    async fn write_if(
        &self,
        key: &[u8],
        set: &VersionSet,
        id: Option<RecordId>,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let pending = self.append_now(key, set, id, now_ms)?.map(|(p, _)| p);
        match pending {
            None => Ok(false),
            Some(pending) => {
                self.engine.settle(pending).await?;
                Ok(true)
            }
        }
    }

    /// Replica sync: merges `incoming` (another replica's set) into the
    /// stored one, with the same read-check-append cycle as [`Self::put`].
    /// Returns whether anything changed (nothing is written otherwise).
    ///
    /// A counter `incoming` holds past [`MAX_REPLICA_COUNTER`] that the
    /// stored clock does not is refused, as a client's context's past
    /// [`MAX_CONTEXT_COUNTER`] is: replica
    /// messages come in on the client port, and a forged one near
    /// `u64::MAX` would make every later write of the key overflow its dot,
    /// for good on a cluster (found by a review). A counter of this node's
    /// own past its last sequence number is taken (unlike a client's): a
    /// node that lost writes must still receive them back, and new dots
    /// are drawn above the clock. That alone does not make a node
    /// restored from a backup safe under its old identity: a write through
    /// it before repair reaches it can reuse a dot it lost. Such a node
    /// needs a new actor, which removing its `CLEAN` mark gives it
    /// (README).
    pub async fn merge(&self, key: &[u8], incoming: &VersionSet, now_ms: u64) -> Result<bool, StoreError> {
        for _ in 0..MAX_WRITE_ATTEMPTS {
            self.engine.wait_for_compaction().await;
            let (set, id) = self.read(key).await?;
            // The clock covers every sibling's dot (`VersionSet::decode`).
            let held = set.clock();
            if unseen_past(held, incoming.clock(), MAX_REPLICA_COUNTER) {
                let why = "a replica's counter beyond any real history";
                return Err(StoreError::InvalidContext(VersionError::Malformed(why)));
            }
            let local = id.map(|_| set);
            let merged = match apply_replica_put(local, incoming) {
                Ok(Some(m)) => m,
                // Nothing new: what it holds covers `incoming`. Answered
                // as stored, so only once what it holds is durable.
                Ok(None) => {
                    if let Some(id) = id {
                        self.engine.settle_record(id).await?;
                    }
                    return Ok(false);
                }
                Err(e) => return Err(update_error(e)),
            };
            if self.write_if(key, &merged, id, now_ms).await? {
                return Ok(true);
            }
        }
        Err(StoreError::Contended)
    }
}

/// A stored record's versions and its id (none: the empty set).
fn decode_record(rec: Option<Record>) -> Result<(VersionSet, Option<RecordId>), StoreError> {
    match rec {
        None => Ok((VersionSet::new(), None)),
        Some(rec) => {
            let set = VersionSet::decode(rec.meta(), rec.value()).map_err(StoreError::CorruptVersions)?;
            Ok((set, Some(rec.id())))
        }
    }
}

/// Whether `incoming` names a write past `bound` that the key's clock
/// `held` does not hold (one it holds is the key's own, whatever it is).
fn unseen_past(held: &Clock, incoming: &Clock, bound: u64) -> bool {
    incoming.iter().any(|(actor, counter)| counter > held.get(actor) && counter > bound)
}

/// A client update the versions refuse.
fn update_error(e: VersionError) -> StoreError {
    match e {
        e @ VersionError::TooManySiblings { .. } => StoreError::TooManySiblings(e),
        VersionError::TooLarge { len, max } => StoreError::ObjectTooLarge { len, max },
        e => StoreError::InvalidContext(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::version::encode_context;
    use crate::storage::backend::mem::MemBackend;
    use crate::storage::EngineConfig;
    use futures_lite::future::block_on;

    fn store() -> Store<MemBackend> {
        store_as(7)
    }

    /// A store whose node is `actor`, on a fresh in-memory directory.
    fn store_as(actor: Actor) -> Store<MemBackend> {
        store_on(MemBackend::new(), actor)
    }

    /// A store whose node is `actor`, on `backend`, with [`config`].
    fn store_on(backend: MemBackend, actor: Actor) -> Store<MemBackend> {
        let (engine, _) = block_on(Engine::open(backend, config())).unwrap();
        Store::new(engine, actor, 1024)
    }

    /// The engine of the store tests: small segments, and writes
    /// acknowledged once durable (`always`, which some tests rely on).
    fn config() -> EngineConfig {
        EngineConfig {
            segment_size: 64 * 1024,
            max_value_len: 4096,
            fsync: crate::storage::FsyncPolicy::Always,
            ..Default::default()
        }
    }

    fn values(set: &VersionSet) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = set.live_values().map(<[u8]>::to_vec).collect();
        v.sort();
        v
    }

    /// Regression (found by a review): every delete with an empty context
    /// added a tombstone sibling, until a key that read as absent refused
    /// a blind put with too many siblings. A delete folds the tombstones
    /// there into its own; the values a delete did not see stay.
    #[test]
    fn blind_deletes_leave_one_tombstone_and_never_block_a_put() {
        block_on(async {
            let s = store();
            s.put(b"k", &[], Some(b"v"), 0).await.unwrap();
            for i in 0..2 * crate::core::version::MAX_SIBLINGS as u64 {
                s.put(b"k", &[], None, 1 + i).await.unwrap();
            }
            let got = s.get(b"k").await.unwrap();
            assert_eq!(values(&got), vec![b"v".to_vec()], "a blind delete saw nothing: the value stays");
            assert_eq!(got.siblings().len(), 2, "the value and one tombstone");
            let put = s.put(b"k", &[], Some(b"w"), 1000).await.expect("a blind put beside them");
            assert_eq!(put.siblings(), 2, "the two values");
            // A delete that saw everything leaves only its tombstone.
            let ctx = s.get(b"k").await.unwrap().clock().to_bytes();
            s.put(b"k", &ctx, None, 1001).await.unwrap();
            let after = s.get(b"k").await.unwrap();
            assert_eq!((values(&after).len(), after.siblings().len()), (0, 1));
        })
    }

    #[test]
    fn concurrent_writers_make_siblings_and_a_merge_collapses_them() {
        block_on(async {
            let s = store();
            let w0 = s.put(b"k", &[], Some(b"v0"), 1).await.unwrap();
            assert_eq!(w0.siblings(), 1);
            let ctx = w0.context().to_bytes();
            let a = s.put(b"k", &ctx, Some(b"a"), 2).await.unwrap();
            let b = s.put(b"k", &ctx, Some(b"b"), 3).await.unwrap();
            assert_eq!((a.siblings(), b.siblings()), (1, 2));
            let got = s.get(b"k").await.unwrap();
            assert_eq!(values(&got), vec![b"a".to_vec(), b"b".to_vec()]);
            let merged = s.put(b"k", &got.clock().to_bytes(), Some(b"ab"), 4).await.unwrap();
            assert_eq!(merged.siblings(), 1);
            assert_eq!(values(&s.get(b"k").await.unwrap()), vec![b"ab".to_vec()]);
        })
    }

    #[test]
    fn delete_keeps_the_clock_and_a_concurrent_put_survives() {
        block_on(async {
            let s = store();
            let ctx = s.put(b"k", &[], Some(b"v"), 1).await.unwrap().context().to_bytes();
            s.put(b"k", &ctx, Some(b"new"), 2).await.unwrap();
            // A delete that saw only "v" leaves the concurrent "new".
            s.put(b"k", &ctx, None, 3).await.unwrap();
            let got = s.get(b"k").await.unwrap();
            assert_eq!(values(&got), vec![b"new".to_vec()]);
            // Deleting with the full context removes the key; the clock stays.
            s.put(b"k", &got.clock().to_bytes(), None, 4).await.unwrap();
            let rec = s.engine().get(b"k").await.unwrap().unwrap();
            assert!(rec.is_tombstone(), "an all-deleted key is a storage tombstone");
            let gone = s.get(b"k").await.unwrap();
            assert_eq!(gone.live_values().count(), 0);
            assert!(!gone.clock().is_empty());
            // A write with the stale first context is concurrent with the
            // delete: it comes back as the only live value.
            let w = s.put(b"k", &ctx, Some(b"late"), 5).await.unwrap();
            assert_eq!(w.siblings(), 1);
        })
    }

    #[test]
    fn a_write_done_at_once_matches_the_waiting_cycle() {
        // The same writes (fresh keys, seen and stale contexts, another
        // key's, deletes, too many siblings) through `put` on one store and
        // `put_now` on another leave equal versions and hand out equal
        // contexts.
        block_on(async {
            let (waiting, at_once) = (store(), store());
            let mut rng = fastrand::Rng::with_seed(11);
            // Contexts handed out, per key (the key's last byte).
            let mut contexts: Vec<Vec<Vec<u8>>> = vec![vec![Vec::new()]; 4];
            let (mut written, mut other_keys) = (0, 0);
            for i in 0..2_000u64 {
                let key = [b'k', rng.u8(0..4)];
                // One write in ten brings a context of a key picked at
                // random, another's or its own.
                let of = if rng.u8(0..10) == 0 { rng.usize(0..4) } else { key[1] as usize };
                let ctx = contexts[of][rng.usize(..contexts[of].len())].clone();
                let value = (rng.u8(0..5) != 0).then(|| vec![i as u8; rng.usize(0..8)]);
                let w = waiting.put(&key, &ctx, value.as_deref(), i).await;
                let n = at_once.put_now(&key, &ctx, value.as_deref(), i, |c, n| (c.to_vec(), n)).expect("in memory");
                match (w, n) {
                    (Ok(w), Ok(((context, siblings), pending))) => {
                        at_once.engine().settle(pending).await.unwrap();
                        let bound = encode_context(w.context(), &key, None);
                        assert_eq!((bound, w.siblings()), (context.clone(), siblings), "write {i}");
                        contexts[key[1] as usize].push(context);
                        written += 1;
                    }
                    (Err(a), Err(b)) => {
                        assert_eq!(a.to_string(), b.to_string(), "write {i}");
                        if matches!(a, StoreError::InvalidContext(VersionError::OtherKey)) {
                            assert!(of != key[1] as usize && !ctx.is_empty(), "write {i}: its own context refused");
                            other_keys += 1;
                        }
                    }
                    (a, b) => panic!("write {i}: {a:?} against {:?}", b.map(|(r, _)| r)),
                }
                let read = waiting.get(&key).await.unwrap();
                assert_eq!(read, at_once.get(&key).await.unwrap(), "write {i}");
                // Readers' contexts too: a write's own covers no sibling
                // its writer was not given, so writes with those alone
                // would pile up siblings.
                if rng.bool() {
                    let (context, _) = at_once.get_now(&key, |c, _| c.to_vec()).expect("in memory").unwrap();
                    assert_eq!(context, encode_context(read.clock(), &key, None), "write {i}");
                    contexts[key[1] as usize].push(context);
                }
            }
            assert!(written > 1_000, "most writes succeed: {written}");
            assert!(other_keys > 50, "another key's contexts are refused: {other_keys}");
        })
    }

    #[test]
    fn a_write_of_a_record_on_disk_is_left_to_the_waiting_cycle() {
        block_on(async {
            let config =
                EngineConfig { segment_size: 64 * 1024, max_value_len: 4096, cache_bytes: 0, ..Default::default() };
            let (engine, _) = Engine::open(MemBackend::new(), config).await.unwrap();
            let s = Store::new(engine, 7, 1024);
            let ctx = s.put(b"k", &[], Some(b"v0"), 1).await.unwrap().context().to_bytes();
            // Fill the segment past its end so that it is sealed and
            // written out: the record is then in neither buffer nor cache.
            for i in 0..100u32 {
                s.put(&i.to_le_bytes(), &[], Some(&[0; 1000]), 1).await.unwrap();
            }
            s.engine().flush().await.unwrap();
            assert!(s.put_now(b"k", &ctx, Some(b"v1"), 2, |_, _| ()).is_none(), "the record is only on disk");
            assert_eq!(values(&s.get(b"k").await.unwrap()), vec![b"v0".to_vec()], "and nothing was written");
            // A key never written needs no read: done at once.
            let (_, pending) = s.put_now(b"new", &[], Some(b"n"), 3, |_, _| ()).unwrap().unwrap();
            s.engine().settle(pending).await.unwrap();
            assert_eq!(values(&s.get(b"new").await.unwrap()), vec![b"n".to_vec()]);
        })
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        block_on(async {
            let s = store();
            assert!(matches!(s.put(b"k", &[], Some(&[0; 1025]), 1).await, Err(StoreError::ValueTooLarge { .. })));
            assert!(matches!(s.put(b"k", &[9, 9, 9], Some(b"v"), 1).await, Err(StoreError::InvalidContext(_))));
            assert!(s.engine().is_empty());
            // Siblings that together outgrow the stored-object limit.
            for _ in 0..4 {
                s.put(b"big", &[], Some(&[1; 1000]), 1).await.unwrap();
            }
            let err = s.put(b"big", &[], Some(&[1; 1000]), 1).await.unwrap_err();
            assert!(matches!(err, StoreError::ObjectTooLarge { .. }), "{err}");
            assert_eq!(s.get(b"big").await.unwrap().live_values().count(), 4);
        })
    }
    /// A context of `(actor, counter)` entries, as a client would send it.
    fn context_of(entries: &[(Actor, u64)]) -> Vec<u8> {
        let mut set = VersionSet::<Vec<u8>>::new();
        for &(actor, counter) in entries {
            set.update_after(&Clock::new(), actor, Some(vec![]), counter - 1).unwrap();
        }
        set.clock().to_bytes()
    }

    /// Regression (found by reviews): a lone node that dropped a key's
    /// tombstone forgot its dots there, and its next write of the key
    /// reissued one; a client whose context was read before the delete
    /// covered it, and its write dropped that value unseen. A key's dots
    /// are now drawn above the shard's last sequence number.
    #[test]
    fn a_key_written_again_after_its_tombstone_went_takes_a_dot_no_old_context_covers() {
        block_on(async {
            let config = EngineConfig {
                segment_size: 32 * 1024,
                max_value_len: 2048,
                tombstone_grace_ms: 0,
                compaction_threshold: 0.3,
                ..Default::default()
            };
            let (engine, _) = Engine::open(MemBackend::new(), config).await.unwrap();
            let s = Store::new(engine, 7, 1024);
            let before_delete = s.put(b"k", &[], Some(b"v1"), 1).await.unwrap().context().to_bytes();
            s.put(b"k", &before_delete, None, 2).await.unwrap();
            // Fill segments so that the tombstone's is sealed and mostly
            // garbage, then compact it away.
            let mut ctx = Vec::new();
            for i in 0..40u32 {
                ctx = s.put(b"filler", &ctx, Some(&[i as u8; 1000]), 3).await.unwrap().context().to_bytes();
            }
            let stats = s.engine().compact(10_000).await.unwrap();
            assert!(stats.tombstones_dropped >= 1, "{stats:?}");
            assert!(s.engine().get(b"k").await.unwrap().is_none(), "the node forgot the key");

            s.put(b"k", &[], Some(b"v2"), 4).await.unwrap();
            s.put(b"k", &before_delete, Some(b"v3"), 5).await.unwrap();
            let got = s.get(b"k").await.unwrap();
            assert_eq!(values(&got), vec![b"v2".to_vec(), b"v3".to_vec()], "v2 was never seen by the v3 writer");
        })
    }

    /// Contexts are untrusted (found by a review): a counter near
    /// `u64::MAX` made every later write of the key fail (the next dot
    /// overflowed), and a counter of this node's past its last sequence
    /// number names a write it never made. Both are refused, and a key
    /// written with a large but possible counter of another node's stays
    /// writable.
    #[test]
    fn contexts_with_impossible_counters_are_refused() {
        block_on(async {
            let s = store();
            s.put(b"k", &[], Some(b"v"), 1).await.unwrap();
            let last = s.engine().last_seq();
            // Another node's counters (8, 9), so that the bound is what
            // refuses them, and this node's (7).
            for (what, forged, why) in [
                ("near u64::MAX", context_of(&[(8, u64::MAX - 1)]), "beyond any real history"),
                ("past the bound", context_of(&[(9, MAX_CONTEXT_COUNTER + 1)]), "beyond any real history"),
                ("this node's, never made", context_of(&[(7, last + 1)]), "never made"),
            ] {
                let err = s.put(b"k", &forged, Some(b"evil"), 2).await.unwrap_err();
                assert!(matches!(err, StoreError::InvalidContext(_)) && err.to_string().contains(why), "{what}: {err}");
            }
            let other = context_of(&[(9, MAX_CONTEXT_COUNTER)]);
            s.put(b"k", &other, Some(b"w"), 3).await.unwrap();
            let ctx = s.get(b"k").await.unwrap().clock().to_bytes();
            s.put(b"k", &ctx, Some(b"fixed"), 4).await.unwrap();
            s.put(b"k", &[], Some(b"blind"), 5).await.unwrap();
            assert_eq!(values(&s.get(b"k").await.unwrap()), vec![b"blind".to_vec(), b"fixed".to_vec()]);
        })
    }
    /// Regression (found by a review): a replica sent a version it already
    /// held (read repair had brought it moments before, its group commit
    /// still to come) acknowledged it at once, and the coordinator counted
    /// that toward W; a power cut then lost the acknowledged write. It now
    /// answers once what it read is durable.
    #[test]
    fn a_replica_holding_what_it_is_sent_answers_once_that_is_durable() {
        use futures_lite::future::poll_once;
        let backend = MemBackend::new();
        let s = store_on(backend.clone(), 7);
        block_on(async {
            let mut set = VersionSet::new();
            set.update(&Clock::new(), 1, Some(b"v".to_vec())).unwrap();
            backend.hold_writes(true);
            // The read repair's copy: appended, waiting for its commit.
            let mut first = Box::pin(s.merge(b"k", &set, 0));
            assert!(poll_once(&mut first).await.is_none(), "the first merge waits for the disk");
            // The same version again (the write's own replication).
            let mut second = Box::pin(s.merge(b"k", &set, 0));
            assert!(poll_once(&mut second).await.is_none(), "not answered before it is durable");
            backend.hold_writes(false);
            assert!(first.await.unwrap(), "the first stored it");
            assert!(!second.await.unwrap(), "the second found it there");
            drop(s);
            backend.crash(1, false);
            let (engine, _) = Engine::open(backend.clone(), config()).await.unwrap();
            let after = engine.get(b"k").await.unwrap();
            assert_eq!(after.map(|r| r.value().to_vec()), Some(b"v".to_vec()), "durable once answered");
        });
    }

    /// Regression (found by a review): a write's reply handed out the
    /// key's whole clock, which covered concurrent siblings the writer was
    /// never given (the reply carries a count, not values); its next write
    /// with that context dropped them unseen. Now the reply's context is
    /// what the writer has seen. Here every sibling comes from one node,
    /// so the new dot cannot be named apart from the others: the writer's
    /// own value stays as a sibling of its next write, and nothing is lost.
    #[test]
    fn a_write_reply_context_covers_no_sibling_its_writer_was_not_given() {
        block_on(async {
            let s = store();
            let c0 = s.put(b"k", &[], Some(b"v0"), 1).await.unwrap().context().to_bytes();
            let x = s.put(b"k", &c0, Some(b"x"), 2).await.unwrap();
            assert_eq!(x.siblings(), 1);
            assert_eq!(x.context(), s.get(b"k").await.unwrap().clock(), "alone: the whole clock");
            let y = s.put(b"k", &c0, Some(b"y"), 3).await.unwrap();
            assert_eq!(y.siblings(), 2);
            s.put(b"k", &y.context().to_bytes(), Some(b"y2"), 4).await.unwrap();
            let got = s.get(b"k").await.unwrap();
            assert_eq!(values(&got), vec![b"x".to_vec(), b"y".to_vec(), b"y2".to_vec()], "x survives");
            // A delete's reply too: it did not see "x" or "y2".
            let d = s.put(b"k", &y.context().to_bytes(), None, 5).await.unwrap();
            s.put(b"k", &d.context().to_bytes(), Some(b"z"), 6).await.unwrap();
            let got = s.get(b"k").await.unwrap();
            assert!(values(&got).contains(&b"x".to_vec()) && values(&got).contains(&b"y2".to_vec()), "{got:?}");
            // A reader's context collapses them all.
            let done = s.put(b"k", &got.clock().to_bytes(), Some(b"all"), 7).await.unwrap();
            assert_eq!((done.siblings(), values(&s.get(b"k").await.unwrap())), (1, vec![b"all".to_vec()]));
        })
    }

    /// A forged counter of another replica's that one replica took (it
    /// cannot know the other's numbers) becomes part of the key; the other
    /// replica, having merged it, takes the contexts it hands out itself
    /// (found by a review: it refused them as naming writes it never made,
    /// or past the bound, and the key could no longer be written).
    #[test]
    fn a_forged_counter_one_replica_took_leaves_the_key_writable_everywhere() {
        block_on(async {
            let (x, y) = (store_as(1), store_as(2));
            for (key, forged) in [(&b"k"[..], 1_000_000), (&b"j"[..], MAX_CONTEXT_COUNTER)] {
                let w = x.put(key, &context_of(&[(2, forged)]), Some(b"v"), 2).await.unwrap();
                y.merge(key, &w.set, 3).await.unwrap();
                let ctx = y.get(key).await.unwrap().clock().to_bytes();
                let own = y.put(key, &ctx, Some(b"w"), 4).await.unwrap();
                let again = y.put(key, &own.context().to_bytes(), Some(b"w2"), 5).await.unwrap();
                assert_eq!(again.siblings(), 1, "{key:?}");
                x.merge(key, &again.set, 6).await.unwrap();
                let ctx = x.get(key).await.unwrap().clock().to_bytes();
                assert_eq!(x.put(key, &ctx, Some(b"x"), 7).await.unwrap().siblings(), 1, "{key:?}");
            }
        })
    }

    /// Found by a review: under `always`, a GET showed a write before its
    /// group commit, and one whose commit then failed (or that a power cut
    /// lost) was shown all the same. A read of a version not yet durable
    /// now waits for it, on both paths; one of a durable version does not.
    #[test]
    fn a_read_waits_for_what_it_shows_to_be_durable() {
        use futures_lite::future::poll_once;
        let backend = MemBackend::new();
        let s = store_on(backend.clone(), 7);
        block_on(async {
            s.put(b"k", &[], Some(b"durable"), 0).await.unwrap();
            let (_, wait) = s.get_now(b"k", |_, _| ()).expect("in memory").unwrap();
            assert!(wait.is_none(), "a durable version is shown at once");
            backend.hold_writes(true);
            let mut write = Box::pin(s.put(b"k", &[], Some(b"pending"), 1));
            assert!(poll_once(&mut write).await.is_none(), "the write waits for the disk");
            let (values, wait) = s.get_now(b"k", |_, v| v.len()).expect("in memory").unwrap();
            assert_eq!(values, 2, "read as it stands");
            let wait = wait.expect("but not to be shown before its commit");
            let mut read = Box::pin(s.get(b"k"));
            assert!(poll_once(&mut read).await.is_none(), "the waiting path waits too");
            backend.hold_writes(false);
            write.await.unwrap();
            s.engine().settle(wait).await.unwrap();
            assert_eq!(read.await.unwrap().live_values().count(), 2);
            let (_, wait) = s.get_now(b"k", |_, _| ()).expect("in memory").unwrap();
            assert!(wait.is_none());
        });
    }

    /// The known hole's honest path (a review of the causal versions): a
    /// client passed key j's context with a write of key k. Counters are
    /// shard sequence numbers, so j's context named node y's writes far
    /// past y's write of k; node x took that into k's clock and then
    /// dropped y's write of k as seen when it arrived. Contexts are bound
    /// to their key now, and another key's is refused.
    #[test]
    fn a_context_of_another_key_is_refused_and_drops_nothing() {
        block_on(async {
            let (x, y) = (store_as(1), store_as(2));
            let of_k = y.put(b"k", &[], Some(b"y's k"), 1).await.unwrap();
            let mut j_ctx = Vec::new();
            for i in 0..20 {
                let w = y.put(b"j", &j_ctx, Some(b"j"), 2 + i).await.unwrap();
                j_ctx = encode_context(w.context(), b"j", None);
            }
            let err = x.put(b"k", &j_ctx, Some(b"mistake"), 30).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidContext(VersionError::OtherKey)), "{err}");
            assert!(x.get(b"k").await.unwrap().is_empty(), "nothing was stored");
            assert!(x.merge(b"k", &of_k.set, 31).await.unwrap(), "y's write of k is new to x");
            assert_eq!(values(&x.get(b"k").await.unwrap()), vec![b"y's k".to_vec()]);
            // With the key's own context, bound or as older nodes handed
            // it out (unbound, taken as before), the write goes ahead.
            let read = x.get(b"k").await.unwrap();
            let w = x.put(b"k", &encode_context(read.clock(), b"k", None), Some(b"x's k"), 32).await.unwrap();
            assert_eq!(w.siblings(), 1);
            let w = x.put(b"k", &w.context().to_bytes(), Some(b"x's k again"), 33).await.unwrap();
            assert_eq!(w.siblings(), 1);
        })
    }

    /// Unbound contexts (formats older nodes handed out) cannot be told
    /// from another key's, and are taken by default (a client may hold one
    /// across an upgrade): one of another key's still drops a write there
    /// (found by a review). A node told to refuse them does, and takes
    /// the empty context and bound ones as before.
    #[test]
    fn unbound_contexts_are_refused_when_the_node_says_so() {
        block_on(async {
            let y = store_as(2);
            let of_k = y.put(b"k", &[], Some(b"y's k"), 1).await.unwrap();
            let mut j = Vec::new();
            for i in 0..20 {
                j = y.put(b"j", &j, Some(b"j"), 2 + i).await.unwrap().context().to_bytes();
            }
            // Taken: the hole the option closes.
            let x = store_as(1);
            x.put(b"k", &j, Some(b"mistake"), 30).await.unwrap();
            x.merge(b"k", &of_k.set, 31).await.unwrap();
            assert_eq!(values(&x.get(b"k").await.unwrap()), vec![b"mistake".to_vec()], "y's write was dropped");
            // Refused.
            let x = store_as(1).with_unbound_contexts(false);
            let err = x.put(b"k", &j, Some(b"mistake"), 30).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidContext(VersionError::Unbound)), "{err}");
            let err = x.put_now(b"k", &j, Some(b"mistake"), 30, |_, _| ()).expect("answered at once").unwrap_err();
            assert!(matches!(err, StoreError::InvalidContext(VersionError::Unbound)), "{err}");
            x.merge(b"k", &of_k.set, 31).await.unwrap();
            assert_eq!(values(&x.get(b"k").await.unwrap()), vec![b"y's k".to_vec()]);
            // No context, an empty hinted one, and a bound one.
            let w = x.put(b"k", &[], Some(b"blind"), 32).await.unwrap();
            assert_eq!(w.siblings(), 2);
            x.put(b"k", &[0x02, 0x01, 0x00, 0x00], Some(b"blind again"), 33).await.unwrap();
            let read = x.get(b"k").await.unwrap();
            let w = x.put(b"k", &encode_context(read.clock(), b"k", None), Some(b"one"), 34).await.unwrap();
            assert_eq!(w.siblings(), 1);
        })
    }

    /// With a cluster secret's keys, every context the store hands out
    /// (a GET's and a write's, on both paths) is signed for its key, and a
    /// write takes only such a context, or one that has seen nothing.
    /// The attack it closes: a context forged with another node's counter
    /// far ahead made a replica drop that node's later writes unseen.
    #[test]
    fn with_a_secret_contexts_are_signed_and_only_signed_ones_are_taken() {
        block_on(async {
            let keys = Rc::new(ClusterKeys::from_secret(b"a cluster secret for the test"));
            let x = store_as(1).with_keys(Some(keys.clone()));
            let signed = |ctx: &[u8], key: &[u8]| {
                let d = decode_context(ctx).unwrap();
                d.check_key(key).and_then(|()| keys.check(key, ctx, &d)).is_ok() && d.mac.is_some()
            };
            let (ctx, _) = x.put_now(b"k", &[], Some(b"v1"), 1, |c, _| c.to_vec()).expect("at once").unwrap();
            assert!(signed(&ctx, b"k"), "put_now's reply");
            let (ctx, _) = x.get_now(b"k", |c, _| c.to_vec()).expect("in memory").unwrap();
            assert!(signed(&ctx, b"k"), "get_now's reply");
            let read = x.get(b"k").await.unwrap();
            assert!(x.with_context_of(read.clock(), b"k", Some(3), |c| signed(c, b"k")), "with_context_of");
            // Taken with its own signed context: one version.
            let w = x.put(b"k", &ctx, Some(b"v2"), 2).await.unwrap();
            assert_eq!(w.siblings(), 1);
            // A forged context naming node 2's counter far ahead (what a
            // replica then takes as seen): refused unsigned, refused with
            // a MAC of another secret, on both paths.
            let mut forged = read.clock().clone();
            forged.merge(&Clock::decode(&[0x01, 0x01, 2, 0, 0, 0, 0, 0, 0, 0, 0x7f]).unwrap());
            let unsigned = encode_context(&forged, b"k", None);
            let err = x.put(b"k", &unsigned, Some(b"forged"), 3).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidContext(VersionError::Unsigned)), "{err}");
            let err = x.put_now(b"k", &unsigned, Some(b"forged"), 3, |_, _| ()).expect("at once").unwrap_err();
            assert!(matches!(err, StoreError::InvalidContext(VersionError::Unsigned)), "{err}");
            let other = store_as(1).with_keys(Some(Rc::new(ClusterKeys::from_secret(b"another cluster's secret"))));
            let wrong = other.with_context_of(&forged, b"k", None, <[u8]>::to_vec);
            let err = x.put(b"k", &wrong, None, 4).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidContext(VersionError::BadSignature)), "{err}");
            assert_eq!(values(&x.get(b"k").await.unwrap()), vec![b"v2".to_vec()], "nothing forged was stored");
            // Nothing seen needs no signature: a blind write adds a sibling.
            let w = x.put(b"k", &encode_context(&Clock::new(), b"k", None), Some(b"blind"), 5).await.unwrap();
            assert_eq!(w.siblings(), 2);
            // A node without the secret takes a signed context (its tag is
            // still checked).
            let plain = store_as(1);
            plain.put(b"k", &[], Some(b"v"), 1).await.unwrap();
            let read = plain.get(b"k").await.unwrap();
            let theirs = x.with_context_of(read.clock(), b"k", None, <[u8]>::to_vec);
            let w = plain.put(b"k", &theirs, Some(b"v'"), 2).await.unwrap();
            assert_eq!(w.siblings(), 1);
        })
    }

    /// A reply that reads the store again while it runs (none does today)
    /// finds the reused context buffer free, not borrowed (found by a
    /// review: it panicked).
    #[test]
    fn a_reply_may_call_back_into_the_store() {
        block_on(async {
            let s = store();
            s.put(b"k", &[], Some(b"v"), 1).await.unwrap();
            let inner = s.get_now(b"k", |outer, _| {
                let (inner, _) = s.get_now(b"k", |c, _| c.to_vec()).expect("in memory").unwrap();
                assert_eq!(outer, &inner[..]);
                inner
            });
            assert!(inner.expect("in memory").is_ok());
            let seen = |_: &[u8], values: Vec<&[u8]>| values.iter().map(|v| v.to_vec()).collect::<Vec<_>>();
            let (read, pending) =
                s.put_now(b"k", &[], Some(b"w"), 2, |_, _| s.get_now(b"k", seen)).expect("in memory").unwrap();
            s.engine().settle(pending).await.unwrap();
            let (read, _) = read.expect("in memory").unwrap();
            assert_eq!(read, vec![b"v".to_vec(), b"w".to_vec()], "the write is visible at once");
        })
    }

    /// Found by a review: a replica message (which any client can send to
    /// a cluster node's port) was merged with any counter, and one near
    /// `u64::MAX` made every later write of the key overflow its dot. Past
    /// the bound it is refused now, as in a client's context; a counter of
    /// this node's own past its last sequence number is taken (a node
    /// restored under its old identity must get its lost writes back), and
    /// the next write's dot is drawn above it.
    #[test]
    fn a_replica_set_with_a_counter_past_any_history_is_refused() {
        block_on(async {
            let y = store_as(2);
            let mut forged = VersionSet::<Vec<u8>>::new();
            forged.update_after(&Clock::new(), 9, Some(b"f".to_vec()), u64::MAX - 1).unwrap();
            let err = y.merge(b"k", &forged, 1).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidContext(_)), "{err}");
            assert!(y.get(b"k").await.unwrap().is_empty(), "nothing was stored");
            let own_ahead = MAX_REPLICA_COUNTER - 1;
            let mut ahead = VersionSet::<Vec<u8>>::new();
            ahead.update_after(&Clock::new(), 2, Some(b"a".to_vec()), own_ahead).unwrap();
            assert!(y.merge(b"k", &ahead, 2).await.unwrap(), "taken");
            let ctx = y.get(b"k").await.unwrap().clock().to_bytes();
            let w = y.put(b"k", &ctx, Some(b"w"), 3).await.unwrap();
            assert_eq!(w.siblings(), 1);
            assert_eq!(w.set.siblings()[0].dot.counter, own_ahead + 2, "drawn above the clock");
            // The bound applies only to what the key does not hold yet.
            let held = y.get(b"k").await.unwrap();
            assert!(!y.merge(b"k", &held, 4).await.unwrap(), "its own set again: nothing new");
        })
    }
}
