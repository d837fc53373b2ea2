//! Causal versions of one key: dotted version vector sets (DVVSet style, as in
//! Riak 2.0).
//!
//! Owns: the causal state of a key ([`VersionSet`]: a version vector [`Clock`]
//! plus the concurrent [`Sibling`]s, each tagged with the [`Dot`] that created
//! it), the two operations on it (a client [`VersionSet::update`] through a
//! coordinating node, and the replica [`VersionSet::merge`]), and the byte
//! layouts of the client context and of the stored metadata. Storage and the
//! wire treat both encodings as opaque bytes.
//!
//! A dot `(actor, counter)` names one write that node `actor` coordinated for
//! this key; a node's counters for a key only grow (each write one above the
//! last it knows of, or above a floor it passes: [`VersionSet::update_after`]).
//! A clock maps actors to counters and stands for every dot `(a, c)` with
//! `1 <= c <= clock[a]`: "these writes were seen" (a counter the node skipped
//! names no write, so covering it costs nothing).
//!
//! # Invariant
//!
//! - Every sibling's dot is covered by the set's clock, and no two siblings
//!   share a dot (one dot names one write, so one value).
//! - Siblings are kept sorted by dot and clock entries by actor, so equal
//!   states are equal as Rust values and encode to equal bytes.
//! - A set's siblings are exactly the writes it knows of that no write it knows
//!   of has seen: a sibling is dropped only when a context that covers its dot
//!   is applied (update), or when the other side of a merge has seen the dot
//!   and no longer holds it.
//! - [`VersionSet::update`] keeps at most [`MAX_SIBLINGS`] siblings and
//!   [`MAX_CLOCK_ENTRIES`] clock entries. [`VersionSet::merge`] never fails,
//!   but it cannot drop a concurrent write, so the union of two full replicas
//!   can hold more siblings (and then, as sibling actors are never dropped,
//!   more clock entries; with at most [`MAX_SIBLINGS`] siblings the clock is
//!   within its bound too): the node checks
//!   [`VersionSet::check_limits`] before storing (as it checks
//!   [`VersionSet::encoded_value_len`] against the value limit), because
//!   [`VersionSet::decode`] rejects more than [`MAX_SIBLINGS`].
//!
//! Nothing here reads the clock, the network or a global RNG.
//!
//! # Encodings
//!
//! All fixed-width integers are little-endian. `varint` is unsigned LEB128 of
//! a `u64`: 7 bits per byte, least significant group first, high bit set on
//! every byte but the last; at most 10 bytes. Decoding rejects a truncated
//! varint, an overlong one (a final byte of 0 after the first: every value has
//! exactly one encoding) and one that overflows `u64` (a 10th byte above 1).
//!
//! ## Clock encoding (stored, and context format 1)
//!
//! The empty clock ("no context") is the empty byte string. Otherwise:
//!
//! ```text
//! size     field
//! 1        format     u8 = 1
//! 1..=10   n          varint, 1..=MAX_CLOCK_ENTRIES
//! n times:
//!   8      actor      u64 LE, strictly ascending
//!   1..=10 counter    varint, >= 1
//! ```
//!
//! Example: `{1: 1, 300: 300}` is `01 02 | 01 00 00 00 00 00 00 00 01 |
//! 2c 01 00 00 00 00 00 00 ac 02`.
//!
//! That is the stored clock's encoding, and the context format 1 that
//! older nodes handed out. A node hands out format 3: the clock bound to
//! its key, with a coordinator hint (Dynamo section 6.4: in a cluster, the
//! replica that answered the read fastest coordinates the write that
//! follows it; a write's own coordinator, the next):
//!
//! ```text
//! size     field
//! 1        format     u8 = 3
//! 8        key tag    u64 LE, xxh3-64 of the key with seed KEY_TAG_SEED
//! 2        hint       u16 LE, a ring member index; 0xffff (NO_HINT): none,
//!                     a lone node's
//! 1..=10   n          varint, 0..=MAX_CLOCK_ENTRIES (0: nothing seen yet)
//! n times: actor, counter as above
//! ```
//!
//! A write whose context's key tag is not its key's is refused
//! ([`DecodedContext::check_key`]): counters are shards' sequence numbers, so a
//! context of another key names writes this key never had, and taking them
//! would drop this key's siblings unseen, and in a cluster make a replica
//! drop a later write of the node they name. The tag guards against a
//! mistake, not an attacker: it is not signed (ARCHITECTURE.md, "Data
//! directory of a node").
//!
//! Example: `{1: 1}` for key `k`, hinted at member 3, is `03 | a7 23 11 1e
//! 67 d1 e4 fa | 03 00 | 01 | 01 00 00 00 00 00 00 00 01`.
//!
//! A node given a cluster secret hands out format 4 instead: format 3 with
//! the format byte 4 and a MAC after the clock, so that a client cannot
//! forge one (ARCHITECTURE.md, "Cluster secret"):
//!
//! ```text
//! size     field
//! 1        format     u8 = 4
//! 8        key tag    as in format 3
//! 2        hint       as in format 3
//! 1..=10   n          as in format 3
//! n times: actor, counter as above
//! 16       mac        CONTEXT_MAC_LEN bytes: the node's keyed MAC of the key
//!                     and of every byte of the context before it
//! ```
//!
//! This module reads and lays out the format ([`sign_context`] takes the
//! MAC as a function); the node computes and checks the MAC
//! (`crate::auth`), so nothing here holds a secret.
//!
//! [`decode_context`] also reads the two unbound formats older nodes
//! handed out (a client may hold one across an upgrade; nothing binds it,
//! so it is taken as before): format 1 above, and format 2, a cluster's
//! hinted context:
//!
//! ```text
//! size     field
//! 1        format     u8 = 2
//! 2        hint       u16 LE, a ring member index
//! 1..=10   n          varint, 0..=MAX_CLOCK_ENTRIES
//! n times: actor, counter as above
//! ```
//!
//! Example: `{1: 1}` hinted at member 3 is `02 03 00 01 | 01 00 00 00 00 00
//! 00 00 01`.
//!
//! ## Stored version set: `(meta, value)`
//!
//! The empty set is an empty `meta` and an empty `value`. Otherwise `meta` is:
//!
//! ```text
//! size     field
//! 1        format       u8 = 1
//! 1..=10   n            varint, 1..=MAX_CLOCK_ENTRIES
//! n times (the clock, as in the context):
//!   8      actor        u64 LE, strictly ascending
//!   1..=10 counter      varint, >= 1
//! 1..=10   s            varint, 0..=MAX_SIBLINGS
//! s times, strictly ascending by (actor_index, counter), i.e. by dot:
//!   1..=10 actor_index  varint, < n: the sibling's actor is clock entry actor_index
//!   1..=10 counter      varint, 1..=that entry's counter (the clock covers the dot)
//!   1      kind         u8: 0 = live value, 1 = tombstone (a delete)
//!   1..=10 value_len    varint, 0 for a tombstone
//! ```
//!
//! and `value` is the live siblings' values concatenated in table order, so
//! the `value_len`s sum to exactly `value.len()`. Decoding is strict: format,
//! sortedness, coverage, kinds, lengths and the absence of trailing bytes are
//! all checked, and `n` and `s` are checked against their limits before
//! anything is allocated. Decoding accepts exactly the bytes that encoding
//! produces: decode-then-encode is the identity.
//!
//! Example: clock `{7: 2, 9: 1}`, siblings `(7,2) = "hi"` and `(9,1)` deleted:
//! meta `01 02 | 07 00 00 00 00 00 00 00 02 | 09 00 00 00 00 00 00 00 01 | 02 |
//! 00 02 00 02 | 01 01 01 00`, value `68 69`.
//!
//! # Metadata bound policy
//!
//! Actors are the server nodes that coordinate writes, never clients, so a
//! key's clock has at most one entry per node that ever coordinated a write to
//! it: bounded by the cluster's size. That makes [`MAX_ENCODED_META`] (about
//! 2.5 KiB) and [`MAX_CONTEXT_LEN`] (about 1.1 KiB) true worst cases, checked
//! at compile time against [`crate::limits::MAX_META_LEN`].
//!
//! Backstop, for clusters where more than [`MAX_CLOCK_ENTRIES`] nodes have
//! written one key: when an update (or a merge) would leave more entries,
//! entries whose actor has no current sibling are dropped, smallest counter
//! first (ties: smallest actor), until the clock is within the limit. Entries
//! of sibling actors are never dropped, so every sibling stays covered; with
//! at most [`MAX_SIBLINGS`] siblings they alone fit, and an update never drops
//! the coordinator's own entry (its new sibling needs it).
//!
//! Cost: the dropped entry is forgotten history. A later merge with a replica
//! that still holds an old sibling of a dropped actor no longer sees that the
//! sibling was superseded, and resurrects it as a false sibling: the client
//! sees a stale value next to the current one and resolves it again. This
//! costs a redundant sibling, never an update. One further caveat applies
//! only to truncation inside a merge: if it drops the entry of the very node
//! that merges, and that node then coordinates a write whose context lacks its
//! entry too, [`VersionSet::update`] would reissue one of its old dots; a
//! stale context covering that dot would then supersede the new write. The
//! node never does: its store passes a floor above every dot it issued
//! ([`VersionSet::update_after`], `Store::update`), since a forged
//! context with more than [`MAX_CLOCK_ENTRIES`] made-up actors can bring the
//! truncation about (found by a review). Below that many actors the clock is
//! never truncated and merge is an exact join (commutative, associative,
//! idempotent).

use std::cmp::Ordering;

use smallvec::SmallVec;
use thiserror::Error;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::limits::{MAX_META_LEN, VALUE_LEN_HARD_CAP};

/// The node id of the server that coordinated a write.
pub type Actor = u64;

/// Most concurrent siblings one key may hold; an update past it fails. Riak's
/// hard limit is 100; 64 concurrent unresolved writes already mean a client is
/// not resolving siblings, and every read returns all of them.
pub const MAX_SIBLINGS: usize = 64;

/// Most entries of one key's clock (one per coordinating node); the backstop
/// in the module doc keeps clocks within it.
pub const MAX_CLOCK_ENTRIES: usize = 64;

/// Longest varint (a `u64` in 7-bit groups).
const MAX_VARINT_LEN: usize = 10;

/// Format byte of both encodings.
const FORMAT: u8 = 1;
/// Format byte of an unbound context that carries a coordinator hint
/// (older nodes'; read, never written).
const FORMAT_HINTED: u8 = 2;
/// Format byte of a context bound to its key.
const FORMAT_BOUND: u8 = 3;
/// Format 4: a bound context with a MAC (module doc).
const FORMAT_SIGNED: u8 = 4;

/// Bytes of a signed context's MAC: 128 bits, so that a client guessing
/// one online has no chance in any number of requests it can send.
pub const CONTEXT_MAC_LEN: usize = 16;

/// The hint of a bound context that names no coordinator (a lone node's).
/// No member has this index.
pub const NO_HINT: u16 = u16::MAX;
const _: () = assert!(crate::core::ring::MAX_MEMBERS <= NO_HINT as usize, "NO_HINT must name no member");

/// Seed of the key tag ([`key_tag`]): not the partition hash's (seed 0),
/// so a context's tag says nothing of where its key lives.
pub const KEY_TAG_SEED: u64 = 0x6779_7265_2d63_7478; // "gyre-ctx"

/// Sibling kind bytes in the stored sibling table.
const KIND_LIVE: u8 = 0;
const KIND_TOMBSTONE: u8 = 1;

/// Bytes of the varint encoding of `v`.
const fn varint_len(v: u64) -> usize {
    let mut len = 1;
    let mut rest = v >> 7;
    while rest != 0 {
        len += 1;
        rest >>= 7;
    }
    len
}

/// Worst-case bytes of one clock entry: actor, largest counter.
const MAX_CLOCK_ENTRY_LEN: usize = 8 + MAX_VARINT_LEN;

/// Worst-case bytes of a clock body (`varint n` + entries).
const MAX_CLOCK_BODY_LEN: usize = varint_len(MAX_CLOCK_ENTRIES as u64) + MAX_CLOCK_ENTRIES * MAX_CLOCK_ENTRY_LEN;

/// Worst-case bytes of one sibling table row: actor index, counter, kind,
/// value length.
const MAX_SIBLING_ROW_LEN: usize = varint_len(MAX_CLOCK_ENTRIES as u64 - 1) + MAX_VARINT_LEN + 1 + MAX_VARINT_LEN;

/// Worst-case length of a context encoding (a [`Clock`] bound to its key,
/// with a hint and a MAC).
pub const MAX_CONTEXT_LEN: usize = 1 + 8 + 2 + MAX_CLOCK_BODY_LEN + CONTEXT_MAC_LEN;

/// Worst-case length of the stored metadata of a [`VersionSet`] within the
/// limits.
pub const MAX_ENCODED_META: usize =
    1 + MAX_CLOCK_BODY_LEN + varint_len(MAX_SIBLINGS as u64) + MAX_SIBLINGS * MAX_SIBLING_ROW_LEN;

const _: () = assert!(MAX_ENCODED_META <= MAX_META_LEN, "stored version metadata must fit a record's meta");
// No encoding needs this since contexts are bound (a context is no longer
// a prefix of the stored metadata); it keeps what a client sends within
// the size of what a record holds.
const _: () = assert!(MAX_CONTEXT_LEN <= MAX_META_LEN, "a context must fit the metadata limit");
const _: () = assert!(MAX_CONTEXT_LEN <= MAX_ENCODED_META);
const _: () = assert!(MAX_SIBLINGS <= MAX_CLOCK_ENTRIES, "the actors of the siblings alone must fit the clock");

/// Why a version operation or decoding failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VersionError {
    /// Bytes that no encoder here produced (or a context that would overflow
    /// a dot counter).
    #[error("malformed version data: {0}")]
    Malformed(&'static str),
    /// A write brought a context bound to another key.
    #[error("the context was read from another key; pass a key's own context back with its writes")]
    OtherKey,
    /// A write brought an unbound context (an older node's format) where
    /// the node refuses them.
    #[error("the context is in an older format, not bound to its key, which this node refuses; read the key again")]
    Unbound,
    /// A write brought an unsigned context to a node with a cluster secret.
    #[error("the context is not signed, and this node takes only signed contexts (it has a cluster secret); read the key again")]
    Unsigned,
    /// A write brought a signed context whose MAC does not match: forged,
    /// changed, or signed with another secret.
    #[error(
        "the context's signature does not match (not one this cluster handed out for this key); read the key again"
    )]
    BadSignature,
    /// The operation would leave more than `max` siblings.
    #[error("{siblings} siblings exceed the limit of {max}")]
    TooManySiblings { siblings: usize, max: usize },
    /// The live siblings' values would total more than a stored object may
    /// (`max`: [`VALUE_LEN_HARD_CAP`]).
    #[error("the siblings' values would total {len} bytes, over the stored-object limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// One write that node `actor` coordinated for a key (counters of one actor
/// for one key only grow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// A clock's entries, inline up to two: a write decodes two clocks (the
/// stored one and the client's context) and merges them, and for a key
/// written through one or two coordinators none of that allocates. Not
/// more: sets travel by value through the coordinators.
type ClockEntries = SmallVec<[(Actor, u64); 2]>;

/// A key's siblings, inline up to one (the common key has one): a write
/// that reconciles it in place allocates no list for it.
type Siblings<V> = SmallVec<[Sibling<V>; 1]>;

/// A version vector: the causal context handed to clients (opaque bytes to
/// them). Entries are sorted by actor, with counters >= 1.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    entries: ClockEntries,
}

impl Clock {
    /// The empty clock: nothing seen.
    pub fn new() -> Clock {
        Clock { entries: ClockEntries::new() }
    }

    fn position(&self, actor: Actor) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&actor, |&(a, _)| a)
    }

    /// The counter of `actor`, 0 if absent.
    pub fn get(&self, actor: Actor) -> u64 {
        self.position(actor).map_or(0, |i| self.entries[i].1)
    }

    /// Whether this clock has seen the write `dot`.
    pub fn covers(&self, dot: Dot) -> bool {
        self.get(dot.actor) >= dot.counter
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &Clock) {
        if other.entries.is_empty() {
            return;
        }
        if self.entries.is_empty() {
            self.entries.clone_from(&other.entries);
            return;
        }
        let mut out = ClockEntries::with_capacity(self.entries.len() + other.entries.len());
        let (mut a, mut b) = (self.entries.iter().peekable(), other.entries.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (Some(&&(x, cx)), Some(&&(y, cy))) => match x.cmp(&y) {
                    Ordering::Less => a.next(),
                    Ordering::Greater => b.next(),
                    Ordering::Equal => {
                        a.next();
                        b.next();
                        out.push((x, cx.max(cy)));
                        continue;
                    }
                },
            };
            out.extend(next.copied());
        }
        self.entries = out;
    }

    /// Raises `dot.actor`'s counter to at least `dot.counter`.
    fn raise(&mut self, dot: Dot) {
        match self.position(dot.actor) {
            Ok(i) => self.entries[i].1 = self.entries[i].1.max(dot.counter),
            Err(i) => self.entries.insert(i, (dot.actor, dot.counter)),
        }
    }

    /// Number of actors with an entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing has been seen.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries `(actor, counter)` in ascending actor order.
    pub fn iter(&self) -> impl Iterator<Item = (Actor, u64)> + '_ {
        self.entries.iter().copied()
    }

    /// Appends the context encoding (module doc); nothing for the empty clock.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if self.entries.is_empty() {
            return;
        }
        out.push(FORMAT);
        self.encode_body(out);
    }

    /// The context encoding as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + varint_len(self.len() as u64) + self.len() * MAX_CLOCK_ENTRY_LEN);
        self.encode(&mut out);
        out
    }

    /// Decodes a clock's encoding ([`Self::encode`]: format 1, the context
    /// older nodes handed out); the empty slice is the empty clock.
    /// [`decode_context`] reads every context format.
    pub fn decode(bytes: &[u8]) -> Result<Clock, VersionError> {
        if bytes.is_empty() {
            return Ok(Clock::new());
        }
        let mut r = Reader::new(bytes);
        let clock = Clock::decode_encoded(&mut r, "unknown context format", "empty context must be zero bytes")?;
        r.finish("trailing bytes after context")?;
        Ok(clock)
    }

    /// What [`Self::encode`] wrote at `r` (a context, or the start of a
    /// stored set): the format byte, then a clock that is not empty (the
    /// empty one is encoded as nothing at all). `unknown` and `empty` say
    /// which encoding failed.
    fn decode_encoded(r: &mut Reader<'_>, unknown: &'static str, empty: &'static str) -> Result<Clock, VersionError> {
        if r.u8()? != FORMAT {
            return Err(VersionError::Malformed(unknown));
        }
        let clock = Clock::decode_body(r)?;
        if clock.is_empty() {
            return Err(VersionError::Malformed(empty));
        }
        Ok(clock)
    }

    /// `varint n` + n entries.
    fn encode_body(&self, out: &mut Vec<u8>) {
        put_varint(out, self.entries.len() as u64);
        for &(actor, counter) in &self.entries {
            out.extend_from_slice(&actor.to_le_bytes());
            put_varint(out, counter);
        }
    }

    fn decode_body(r: &mut Reader<'_>) -> Result<Clock, VersionError> {
        let n = r.varint()?;
        if n > MAX_CLOCK_ENTRIES as u64 {
            return Err(VersionError::Malformed("more clock entries than MAX_CLOCK_ENTRIES"));
        }
        let mut entries = ClockEntries::with_capacity(n as usize);
        for _ in 0..n {
            let actor = r.u64_le()?;
            let counter = r.varint()?;
            if counter == 0 {
                return Err(VersionError::Malformed("clock counter is zero"));
            }
            if entries.last().is_some_and(|&(prev, _)| prev >= actor) {
                return Err(VersionError::Malformed("clock actors not strictly ascending"));
            }
            entries.push((actor, counter));
        }
        Ok(Clock { entries })
    }
}

/// The tag that binds a context to `key` (module doc, format 3).
pub fn key_tag(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, KEY_TAG_SEED)
}

/// A decoded client context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedContext {
    pub clock: Clock,
    /// The coordinator the context names, if any.
    pub hint: Option<u16>,
    /// [`key_tag`] of the key it was read from; `None` for an unbound
    /// context (an older node's, or no context at all).
    pub key_tag: Option<u64>,
    /// A signed context's MAC (format 4): it covers the key and every byte
    /// of the context before it ([`signed_part`]).
    pub mac: Option<[u8; CONTEXT_MAC_LEN]>,
}

impl DecodedContext {
    /// Refuses a context bound to another key than `key`.
    pub fn check_key(&self, key: &[u8]) -> Result<(), VersionError> {
        match self.key_tag {
            Some(tag) if tag != key_tag(key) => Err(VersionError::OtherKey),
            _ => Ok(()),
        }
    }
}

/// The context of `clock` for `key` (module doc, format 3); `hint`:
/// the coordinator it names, `None` for none.
pub fn encode_context(clock: &Clock, key: &[u8], hint: Option<u16>) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(BOUND_PREFIX_LEN + varint_len(clock.len() as u64) + clock.len() * MAX_CLOCK_ENTRY_LEN);
    encode_context_into(&mut out, clock, key, hint);
    out
}

/// [`encode_context`] appended to `out`.
pub fn encode_context_into(out: &mut Vec<u8>, clock: &Clock, key: &[u8], hint: Option<u16>) {
    bound_prefix(out, key, hint);
    clock.encode_body(out);
}

/// [`encode_context`] of a clock given as its encoding ([`Clock::encode`]:
/// the front of a stored set's metadata), appended to `out`: a node
/// answers a lone key from its stored record without decoding the clock.
/// `clock` must be such an encoding; it is not checked here.
pub fn bind_encoded_clock(out: &mut Vec<u8>, clock: &[u8], key: &[u8], hint: Option<u16>) {
    bound_prefix(out, key, hint);
    match clock.split_first() {
        // Format 1 is the format byte and the body.
        Some((_, body)) => out.extend_from_slice(body),
        // The empty clock: a body with no entries.
        None => put_varint(out, 0),
    }
}

/// Bytes of a bound context before its clock body: format, tag, hint.
const BOUND_PREFIX_LEN: usize = 1 + 8 + 2;

fn bound_prefix(out: &mut Vec<u8>, key: &[u8], hint: Option<u16>) {
    tagged_prefix(out, FORMAT_BOUND, key_tag(key), hint);
}

/// Format byte, key tag and hint: the front of a format 3 or 4 context.
fn tagged_prefix(out: &mut Vec<u8>, format: u8, tag: u64, hint: Option<u16>) {
    out.push(format);
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&hint.unwrap_or(NO_HINT).to_le_bytes());
}

/// Signs `context`, a bound context (format 3): makes it format 4 and
/// appends `mac` of its bytes (module doc).
pub fn sign_context(context: &mut Vec<u8>, mac: impl FnOnce(&[u8]) -> [u8; CONTEXT_MAC_LEN]) {
    assert_eq!(context.first(), Some(&FORMAT_BOUND), "only a bound context is signed");
    context[0] = FORMAT_SIGNED;
    let mac = mac(context);
    context.extend_from_slice(&mac);
}

/// The bytes of a signed context (format 4) its MAC covers: all but the
/// MAC at its end (`None` if it is not that long).
pub fn signed_part(bytes: &[u8]) -> Option<&[u8]> {
    bytes.len().checked_sub(CONTEXT_MAC_LEN).filter(|&n| n > 0).map(|n| &bytes[..n])
}

/// Decodes a client context of any format (module doc). A signed
/// context's MAC is returned, not checked.
pub fn decode_context(bytes: &[u8]) -> Result<DecodedContext, VersionError> {
    let (mut bytes, mut mac) = (bytes, None);
    if bytes.first() == Some(&FORMAT_SIGNED) {
        let signed = signed_part(bytes).ok_or(VersionError::Malformed("a signed context shorter than its MAC"))?;
        mac = Some(bytes[signed.len()..].try_into().expect("CONTEXT_MAC_LEN bytes"));
        bytes = signed;
    }
    let (key_tag, hint, body) = match bytes.first() {
        Some(&FORMAT_BOUND) | Some(&FORMAT_SIGNED) => {
            let mut r = Reader::new(&bytes[1..]);
            let tag = r.u64_le()?;
            let hint = u16::from_le_bytes([r.u8()?, r.u8()?]);
            (Some(tag), (hint != NO_HINT).then_some(hint), r)
        }
        Some(&FORMAT_HINTED) => {
            let mut r = Reader::new(&bytes[1..]);
            let hint = u16::from_le_bytes([r.u8()?, r.u8()?]);
            (None, Some(hint), r)
        }
        _ => return Ok(DecodedContext { clock: Clock::decode(bytes)?, hint: None, key_tag: None, mac: None }),
    };
    let mut r = body;
    let clock = Clock::decode_body(&mut r)?;
    r.finish("trailing bytes after context")?;
    Ok(DecodedContext { clock, hint, key_tag, mac })
}

/// The coordinator a context names (formats 2 to 4), read without
/// decoding the rest: where a write goes first, decided before any node
/// decodes (and checks) the whole context.
/// It is the hint [`decode_context`] gives, when that decodes.
pub fn context_hint(bytes: &[u8]) -> Option<u16> {
    let read = |at: usize| bytes.get(at..at + 2).map(|h| u16::from_le_bytes([h[0], h[1]]));
    match *bytes.first()? {
        FORMAT_HINTED => read(1),
        FORMAT_BOUND | FORMAT_SIGNED => read(1 + 8).filter(|&h| h != NO_HINT),
        _ => None,
    }
}

/// Checks [`decode_context`] on arbitrary `bytes` (the fuzz target's and
/// the tests' check): it never panics, and a context it decodes encodes
/// back to exactly its bytes in its own format (the MAC of format 4 as it
/// came: only the node can check it).
#[doc(hidden)]
pub fn check_context_decoder(bytes: &[u8]) {
    let Ok(ctx) = decode_context(bytes) else { return };
    assert_eq!(context_hint(bytes), ctx.hint, "the hint read alone is the decoded one");
    let mut out = Vec::with_capacity(bytes.len());
    match (bytes.first().copied(), ctx.key_tag) {
        (None, _) => assert!(ctx.clock.is_empty() && ctx.hint.is_none()),
        (Some(FORMAT_HINTED), None) => {
            out.push(FORMAT_HINTED);
            out.extend_from_slice(&ctx.hint.expect("format 2 has a hint").to_le_bytes());
            ctx.clock.encode_body(&mut out);
        }
        (Some(format @ (FORMAT_BOUND | FORMAT_SIGNED)), Some(tag)) => {
            tagged_prefix(&mut out, format, tag, ctx.hint);
            ctx.clock.encode_body(&mut out);
            if let Some(mac) = ctx.mac {
                out.extend_from_slice(&mac);
            }
            assert_eq!(ctx.mac.is_some(), format == FORMAT_SIGNED);
        }
        (_, None) => ctx.clock.encode(&mut out),
        (first, tag) => panic!("format {first:?} decoded with key tag {tag:?}"),
    }
    assert_eq!(out, bytes, "a context re-encodes to its bytes");
}

/// One concurrent version of a key: the value a write put, or `None` for a
/// delete (a tombstone, kept so that the delete supersedes what it saw).
/// `V` holds the value: owned bytes (the default), or bytes borrowed from
/// a stored record while a write reconciles in place
/// ([`VersionSet::decode_borrowed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sibling<V = Vec<u8>> {
    pub dot: Dot,
    pub value: Option<V>,
}

/// The causal versions of one key: a clock of every write seen, and the
/// siblings (writes seen but not superseded), sorted by dot. `V` as in
/// [`Sibling`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionSet<V = Vec<u8>> {
    clock: Clock,
    siblings: Siblings<V>,
}

impl<V> Default for VersionSet<V> {
    fn default() -> Self {
        VersionSet { clock: Clock::new(), siblings: Siblings::new() }
    }
}

impl VersionSet {
    /// The set of a key never written.
    pub fn new() -> VersionSet {
        VersionSet::default()
    }

    /// Strictly decodes a stored set; empty meta and empty value are the
    /// empty set.
    pub fn decode(meta: &[u8], value: &[u8]) -> Result<VersionSet, VersionError> {
        let mut siblings = Siblings::new();
        let (clock, _) =
            walk_stored(meta, value, |dot, v| siblings.push(Sibling { dot, value: v.map(<[u8]>::to_vec) }))?;
        Ok(VersionSet { clock, siblings })
    }

    /// Reads a stored set in place, for a GET reply: pushes its live values
    /// (borrowed, in dot order) onto `live` and returns the clock's
    /// encoding, a prefix of `meta` ([`Clock::encode`]: what
    /// [`bind_encoded_clock`] binds into the context a get hands out).
    /// Validates exactly what [`Self::decode`] validates;
    /// copies no value.
    pub fn decode_live<'a>(
        meta: &'a [u8],
        value: &'a [u8],
        live: &mut Vec<&'a [u8]>,
    ) -> Result<&'a [u8], VersionError> {
        let (_, clock_end) = walk_stored(meta, value, |_, v| live.extend(v))?;
        Ok(&meta[..clock_end])
    }
}

impl<'a> VersionSet<&'a [u8]> {
    /// [`VersionSet::decode`] with the values borrowed from `value`: a
    /// write that reconciles and appends at once copies no stored value.
    pub fn decode_borrowed(meta: &'a [u8], value: &'a [u8]) -> Result<VersionSet<&'a [u8]>, VersionError> {
        let mut siblings = Siblings::new();
        let (clock, _) = walk_stored(meta, value, |dot, value| siblings.push(Sibling { dot, value }))?;
        Ok(VersionSet { clock, siblings })
    }
}

impl<V: AsRef<[u8]>> VersionSet<V> {
    /// Every write the set has seen: what a get's context holds.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Every sibling, live or tombstone, in dot order.
    pub fn siblings(&self) -> &[Sibling<V>] {
        &self.siblings
    }

    /// The values of the live siblings, in dot order.
    pub fn live_values(&self) -> impl Iterator<Item = &[u8]> {
        self.siblings.iter().filter_map(|s| s.value.as_ref().map(AsRef::as_ref))
    }

    /// Whether there are no siblings at all.
    pub fn is_empty(&self) -> bool {
        self.siblings.is_empty()
    }

    /// Whether no sibling is live (every one is a delete, or there are none).
    pub fn all_tombstones(&self) -> bool {
        self.siblings.iter().all(|s| s.value.is_none())
    }

    /// A put (`value` Some) or delete (`value` None) from a client that read
    /// `ctx`, coordinated by node `actor`.
    ///
    /// Drops the siblings whose dot `ctx` covers, adds one sibling with the
    /// fresh dot `(actor, max(clock[actor], ctx[actor]) + 1)`, and sets the
    /// clock to `clock ∪ ctx ∪ {new dot}` (then bounded, module doc). A
    /// delete also folds the tombstones of its own node (`actor`) into its
    /// own: their dots stay in the clock, which is what keeps what they
    /// deleted superseded, and a tombstone shows nothing to a read (found by
    /// a review: blind deletes piled up tombstones until a key that read as
    /// absent refused a blind put with too many siblings). Only its own
    /// node's: the new tombstone then still holds that node's clock entry
    /// against truncation (module doc), which another node's tombstone
    /// would not (a review showed a superseded value coming back through
    /// a merge once the entry was dropped). So a key keeps at most one
    /// tombstone per coordinating node. Returns the new dot. Fails, leaving
    /// `self` unchanged, with [`VersionError::TooManySiblings`] if more than
    /// [`MAX_SIBLINGS`] would remain, or `Malformed` if the counter would
    /// overflow (only a forged context can get there).
    pub fn update(&mut self, ctx: &Clock, actor: Actor, value: Option<V>) -> Result<Dot, VersionError> {
        self.update_after(ctx, actor, value, 0)
    }

    /// [`Self::update`] whose new dot's counter is also above `after`.
    /// [`crate::store`] passes its shard's last log sequence number on
    /// every write, which is at least every dot it has issued for the key:
    /// so the new dot is none that a client's old context or another
    /// replica holds, even where the node forgot the key (dropped its
    /// tombstone) or its clock lost the node's entry to the bound.
    pub fn update_after(
        &mut self,
        ctx: &Clock,
        actor: Actor,
        value: Option<V>,
        after: u64,
    ) -> Result<Dot, VersionError> {
        let delete = value.is_none();
        // Gone: what `ctx` saw, and for a delete, its node's tombstones.
        let gone = |s: &Sibling<V>| ctx.covers(s.dot) || (delete && s.value.is_none() && s.dot.actor == actor);
        let kept = |s: &Sibling<V>| !gone(s);
        let siblings = self.siblings.iter().filter(|s| kept(s)).count() + 1;
        if siblings > MAX_SIBLINGS {
            return Err(VersionError::TooManySiblings { siblings, max: MAX_SIBLINGS });
        }
        let counter = self
            .clock
            .get(actor)
            .max(ctx.get(actor))
            .max(after)
            .checked_add(1)
            .ok_or(VersionError::Malformed("dot counter overflows u64"))?;
        let dot = Dot { actor, counter };
        self.siblings.retain(|s| kept(s));
        let at = self.siblings.partition_point(|s| s.dot < dot);
        self.siblings.insert(at, Sibling { dot, value });
        self.clock.merge(ctx);
        self.clock.raise(dot);
        self.bound_clock();
        Ok(dot)
    }

    /// The context to hand the writer of `dot` (made by an update from
    /// `ctx`): what that writer has seen. `None` when it is the set's whole
    /// clock: no live sibling but the new one is left. Otherwise the
    /// whole clock would cover values the writer never received (the reply
    /// carries no values), and its next write with that context would drop
    /// them unseen (found by a review). Then `ctx` plus the new dot, when
    /// that names nothing else live (no other live sibling of the same
    /// actor: a clock entry covers every counter below it), or else `ctx`
    /// alone: the writer's next write then keeps its own earlier value as
    /// a sibling, which costs a sibling and loses nothing.
    pub fn writer_context(&self, ctx: &Clock, dot: Dot) -> Option<Clock> {
        let mut others = self.siblings.iter().filter(|s| s.dot != dot && s.value.is_some()).peekable();
        others.peek()?;
        let mut seen = ctx.clone();
        let same_actor = others.any(|s| s.dot.actor == dot.actor);
        if !same_actor && (seen.get(dot.actor) > 0 || seen.len() < MAX_CLOCK_ENTRIES) {
            seen.raise(dot);
        }
        Some(seen)
    }

    /// Replica sync: the join of two replicas' states. Keeps a sibling of
    /// either side unless the other side's clock covers its dot and the other
    /// side does not hold that dot (it saw the write and superseded it); the
    /// clock becomes the pointwise max (bounded, module doc). Never fails;
    /// the result may exceed [`MAX_SIBLINGS`] (see [`Self::check_limits`]).
    pub fn merge(&mut self, other: &VersionSet<V>)
    where
        V: Clone + Ord,
    {
        let mut out = Siblings::with_capacity(self.siblings.len() + other.siblings.len());
        let (mut a, mut b) = (self.siblings.iter().peekable(), other.siblings.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(&x), None) => {
                    a.next();
                    if !other.clock.covers(x.dot) {
                        out.push(x.clone());
                    }
                }
                (None, Some(&y)) => {
                    b.next();
                    if !self.clock.covers(y.dot) {
                        out.push(y.clone());
                    }
                }
                (Some(&x), Some(&y)) => match x.dot.cmp(&y.dot) {
                    Ordering::Less => {
                        a.next();
                        if !other.clock.covers(x.dot) {
                            out.push(x.clone());
                        }
                    }
                    Ordering::Greater => {
                        b.next();
                        if !self.clock.covers(y.dot) {
                            out.push(y.clone());
                        }
                    }
                    Ordering::Equal => {
                        a.next();
                        b.next();
                        // One dot is one write, so the values are equal; the
                        // smaller wins anyway so that merge stays commutative.
                        out.push(if y.value < x.value { y.clone() } else { x.clone() });
                    }
                },
            }
        }
        self.siblings = out;
        self.clock.merge(&other.clock);
        self.bound_clock();
    }

    /// Whether the set is within the limits that [`Self::decode`] enforces,
    /// so that its encoding can be read back. Only a merge can break them.
    pub fn check_limits(&self) -> Result<(), VersionError> {
        if self.siblings.len() > MAX_SIBLINGS {
            return Err(VersionError::TooManySiblings { siblings: self.siblings.len(), max: MAX_SIBLINGS });
        }
        // Each replica holds its set to the object limit, but the union of
        // two diverged replicas can be twice that: returned or sent as a
        // repair, it made a frame over the wire's limit (a debug build
        // panicked, a client refused the reply; found by reviews).
        let len = self.encoded_value_len();
        if len > VALUE_LEN_HARD_CAP {
            return Err(VersionError::TooLarge { len, max: VALUE_LEN_HARD_CAP });
        }
        // With at most MAX_SIBLINGS siblings the bound always reaches the limit.
        debug_assert!(self.clock.len() <= MAX_CLOCK_ENTRIES);
        Ok(())
    }

    /// The metadata-bound backstop (module doc): drops clock entries of actors
    /// without a sibling, smallest counter first, while the clock is too long.
    fn bound_clock(&mut self) {
        let excess = self.clock.len().saturating_sub(MAX_CLOCK_ENTRIES);
        if excess == 0 {
            return;
        }
        // Siblings are sorted by dot, hence by actor.
        let has_sibling = |actor: Actor| self.siblings.binary_search_by_key(&actor, |s| s.dot.actor).is_ok();
        let mut victims: Vec<(u64, Actor)> =
            self.clock.entries.iter().filter(|&&(a, _)| !has_sibling(a)).map(|&(a, c)| (c, a)).collect();
        victims.sort_unstable();
        victims.truncate(excess);
        let mut dropped: Vec<Actor> = victims.into_iter().map(|(_, a)| a).collect();
        dropped.sort_unstable();
        self.clock.entries.retain(|&mut (a, _)| dropped.binary_search(&a).is_err());
    }

    /// The storage encoding `(meta, value)` (module doc).
    pub fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        let mut meta = Vec::with_capacity(
            1 + varint_len(self.clock.len() as u64)
                + self.clock.len() * MAX_CLOCK_ENTRY_LEN
                + varint_len(self.siblings.len() as u64)
                + self.siblings.len() * MAX_SIBLING_ROW_LEN,
        );
        let mut value = Vec::with_capacity(self.encoded_value_len());
        self.encode_into(&mut meta, &mut value);
        (meta, value)
    }

    /// [`Self::encode`] appended to `meta` and `value` (buffers a caller
    /// reuses); returns how many of the bytes appended to `meta` are the
    /// clock's encoding ([`Clock::encode`]), which a write's reply binds
    /// into its context ([`bind_encoded_clock`]) without decoding it.
    pub fn encode_into(&self, meta: &mut Vec<u8>, value: &mut Vec<u8>) -> usize {
        if self.clock.is_empty() && self.siblings.is_empty() {
            return 0;
        }
        let start = meta.len();
        meta.push(FORMAT);
        self.clock.encode_body(meta);
        let context_len = meta.len() - start;
        put_varint(meta, self.siblings.len() as u64);
        for s in &self.siblings {
            // Invariant: every sibling's actor has a clock entry.
            let index = self.clock.position(s.dot.actor).unwrap_or_default();
            put_varint(meta, index as u64);
            put_varint(meta, s.dot.counter);
            match &s.value {
                Some(v) => {
                    let v = v.as_ref();
                    meta.push(KIND_LIVE);
                    put_varint(meta, v.len() as u64);
                    value.extend_from_slice(v);
                }
                None => {
                    meta.push(KIND_TOMBSTONE);
                    put_varint(meta, 0);
                }
            }
        }
        context_len
    }

    /// The number of value bytes [`Self::encode`] would produce.
    pub fn encoded_value_len(&self) -> usize {
        self.live_values().map(<[u8]>::len).sum()
    }
}

/// The one decoder of the storage encoding: validates `meta` and `value`,
/// hands every sibling to `sibling` in dot order, and returns the clock
/// with the length of its encoding at the start of `meta`.
fn walk_stored<'a>(
    meta: &'a [u8],
    value: &'a [u8],
    mut sibling: impl FnMut(Dot, Option<&'a [u8]>),
) -> Result<(Clock, usize), VersionError> {
    if meta.is_empty() {
        if !value.is_empty() {
            return Err(VersionError::Malformed("value bytes without version metadata"));
        }
        return Ok((Clock::new(), 0));
    }
    let mut r = Reader::new(meta);
    let clock =
        Clock::decode_encoded(&mut r, "unknown version metadata format", "empty version set must be zero bytes")?;
    let clock_end = r.at;
    let s = r.varint()?;
    if s > MAX_SIBLINGS as u64 {
        return Err(VersionError::Malformed("more siblings than MAX_SIBLINGS"));
    }
    let mut value_at = 0usize;
    let mut prev: Option<(u64, u64)> = None;
    for _ in 0..s {
        let index = r.varint()?;
        let counter = r.varint()?;
        let &(actor, seen) = usize::try_from(index)
            .ok()
            .and_then(|i| clock.entries.get(i))
            .ok_or(VersionError::Malformed("sibling actor index outside the clock"))?;
        if counter == 0 {
            return Err(VersionError::Malformed("sibling counter is zero"));
        }
        if counter > seen {
            return Err(VersionError::Malformed("sibling dot not covered by the clock"));
        }
        if prev.is_some_and(|p| p >= (index, counter)) {
            return Err(VersionError::Malformed("sibling dots not strictly ascending"));
        }
        prev = Some((index, counter));
        let kind = r.u8()?;
        let len = r.varint()?;
        let dot = Dot { actor, counter };
        match kind {
            KIND_LIVE => {
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|len| value_at.checked_add(len))
                    .filter(|&end| end <= value.len())
                    .ok_or(VersionError::Malformed("sibling lengths exceed the value"))?;
                sibling(dot, Some(&value[value_at..end]));
                value_at = end;
            }
            KIND_TOMBSTONE => {
                if len != 0 {
                    return Err(VersionError::Malformed("tombstone with a value length"));
                }
                sibling(dot, None);
            }
            _ => return Err(VersionError::Malformed("unknown sibling kind")),
        }
    }
    r.finish("trailing bytes after version metadata")?;
    if value_at != value.len() {
        return Err(VersionError::Malformed("sibling lengths do not sum to the value length"));
    }
    Ok((clock, clock_end))
}

/// Appends `v` as an unsigned LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A bounds-checked cursor over bytes being decoded.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], VersionError> {
        let out =
            self.bytes.get(self.at..).and_then(|rest| rest.get(..n)).ok_or(VersionError::Malformed("truncated"))?;
        self.at += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, VersionError> {
        Ok(self.take(1)?[0])
    }

    fn u64_le(&mut self) -> Result<u64, VersionError> {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(buf))
    }

    fn varint(&mut self) -> Result<u64, VersionError> {
        let mut v = 0u64;
        for i in 0..MAX_VARINT_LEN {
            let byte = self.u8()?;
            let group = u64::from(byte & 0x7f);
            if i == MAX_VARINT_LEN - 1 && group > 1 {
                return Err(VersionError::Malformed("varint overflows u64"));
            }
            v |= group << (7 * i);
            if byte & 0x80 == 0 {
                if i > 0 && byte == 0 {
                    return Err(VersionError::Malformed("overlong varint"));
                }
                return Ok(v);
            }
        }
        Err(VersionError::Malformed("varint longer than 10 bytes"))
    }

    fn finish(&self, what: &'static str) -> Result<(), VersionError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(VersionError::Malformed(what))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(entries: &[(Actor, u64)]) -> Clock {
        Clock { entries: entries.into() }
    }

    fn sib(actor: Actor, counter: u64, value: Option<&[u8]>) -> Sibling {
        Sibling { dot: Dot { actor, counter }, value: value.map(<[u8]>::to_vec) }
    }

    fn malformed(msg: &'static str) -> Result<VersionSet, VersionError> {
        Err(VersionError::Malformed(msg))
    }

    /// The example of the module doc: clock {7: 2, 9: 1}, (7,2) = "hi", (9,1) deleted.
    fn example() -> VersionSet {
        let mut s = VersionSet::new();
        s.update(&Clock::new(), 7, Some(b"a".to_vec())).unwrap();
        s.update(&Clock::new(), 9, None).unwrap();
        let ctx = clock(&[(7, 1)]);
        assert_eq!(s.update(&ctx, 7, Some(b"hi".to_vec())), Ok(Dot { actor: 7, counter: 2 }));
        s
    }

    const EXAMPLE_META: [u8; 29] = [
        0x01, 0x02, // format, n
        0x07, 0, 0, 0, 0, 0, 0, 0, 0x02, // actor 7, counter 2
        0x09, 0, 0, 0, 0, 0, 0, 0, 0x01, // actor 9, counter 1
        0x02, // s
        0x00, 0x02, 0x00, 0x02, // clock[0] counter 2, live, 2 bytes
        0x01, 0x01, 0x01, 0x00, // clock[1] counter 1, tombstone, 0 bytes
    ];

    #[test]
    fn varint_golden_and_limits() {
        for (v, bytes) in [
            (0u64, &[0x00][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (u64::MAX, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out, bytes, "{v}");
            assert_eq!(varint_len(v), bytes.len());
            let mut r = Reader::new(bytes);
            assert_eq!(r.varint(), Ok(v));
            assert!(r.finish("").is_ok());
        }
        let err = |bytes: &[u8]| Reader::new(bytes).varint().unwrap_err();
        assert_eq!(err(&[0x80, 0x00]), VersionError::Malformed("overlong varint"));
        assert_eq!(err(&[0xff, 0x80, 0x00]), VersionError::Malformed("overlong varint"));
        assert_eq!(
            err(&[0xff; 9].iter().copied().chain([0x02]).collect::<Vec<_>>()),
            VersionError::Malformed("varint overflows u64")
        );
        assert_eq!(err(&[0x80; 10]), VersionError::Malformed("varint longer than 10 bytes"));
        assert_eq!(
            err(&[0xff; 9].iter().copied().chain([0x81, 0x00]).collect::<Vec<_>>()),
            VersionError::Malformed("varint longer than 10 bytes")
        );
        assert_eq!(err(&[0x80]), VersionError::Malformed("truncated"));
        assert_eq!(err(&[]), VersionError::Malformed("truncated"));
    }

    #[test]
    fn context_golden() {
        assert_eq!(Clock::new().to_bytes(), Vec::<u8>::new());
        assert_eq!(Clock::decode(&[]), Ok(Clock::new()));
        let c = clock(&[(1, 1), (300, 300)]);
        let golden = [0x01, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x2c, 0x01, 0, 0, 0, 0, 0, 0, 0xac, 0x02];
        assert_eq!(c.to_bytes(), golden);
        let mut appended = vec![0xee];
        c.encode(&mut appended);
        assert_eq!(appended[1..], golden);
        assert_eq!(Clock::decode(&golden), Ok(c));
    }

    #[test]
    fn bound_context_golden() {
        let c = clock(&[(1, 1)]);
        let tag = [0xa7, 0x23, 0x11, 0x1e, 0x67, 0xd1, 0xe4, 0xfa];
        assert_eq!(key_tag(b"k").to_le_bytes(), tag);
        let golden = [&[0x03][..], &tag, &[0x03, 0x00, 0x01, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x01]].concat();
        assert_eq!(encode_context(&c, b"k", Some(3)), golden);
        let decoded = DecodedContext { clock: c.clone(), hint: Some(3), key_tag: Some(key_tag(b"k")), mac: None };
        assert_eq!(decode_context(&golden), Ok(decoded.clone()));
        assert!(Clock::decode(&golden).is_err(), "a plain clock decoder refuses a bound context");
        // From the clock's encoding, as a node answers from a stored record.
        let mut bound = vec![0xee];
        bind_encoded_clock(&mut bound, &c.to_bytes(), b"k", Some(3));
        assert_eq!(bound[1..], golden);
        // No hint; the empty clock (a key never written).
        let empty = [&[0x03][..], &tag, &[0xff, 0xff, 0x00]].concat();
        assert_eq!(encode_context(&Clock::new(), b"k", None), empty);
        let mut bound = Vec::new();
        bind_encoded_clock(&mut bound, &[], b"k", None);
        assert_eq!(bound, empty);
        let unhinted = DecodedContext { clock: Clock::new(), hint: None, key_tag: Some(key_tag(b"k")), mac: None };
        assert_eq!(decode_context(&empty), Ok(unhinted));
        // Bound to its key: refused for another.
        assert_eq!(decoded.check_key(b"k"), Ok(()));
        assert_eq!(decoded.check_key(b"j"), Err(VersionError::OtherKey));
        for cut in 1..golden.len() {
            assert!(decode_context(&golden[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_context(&[golden.as_slice(), &[0]].concat()).is_err());
        let big = Clock { entries: (1..=MAX_CLOCK_ENTRIES as u64).map(|a| (a, u64::MAX)).collect() };
        let mut signed = encode_context(&big, b"k", Some(7));
        sign_context(&mut signed, |_| [0; CONTEXT_MAC_LEN]);
        assert_eq!(signed.len(), MAX_CONTEXT_LEN);
    }

    /// Format 4: format 3 with its format byte 4 and the MAC of what
    /// precedes it appended; decoding hands back the MAC and what it
    /// covers, unchecked.
    #[test]
    fn signed_context_golden() {
        let c = clock(&[(1, 1)]);
        let tag = [0xa7, 0x23, 0x11, 0x1e, 0x67, 0xd1, 0xe4, 0xfa];
        let body = [&[0x04][..], &tag, &[0x03, 0x00, 0x01, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x01]].concat();
        let mac: [u8; CONTEXT_MAC_LEN] = std::array::from_fn(|i| 0xa0 + i as u8);
        let golden = [&body[..], &mac].concat();
        let mut signed = encode_context(&c, b"k", Some(3));
        sign_context(&mut signed, |covered| {
            assert_eq!(covered, body, "the MAC covers the context before it, format byte 4 included");
            mac
        });
        assert_eq!(signed, golden);
        let decoded = decode_context(&golden).unwrap();
        let want = DecodedContext { clock: c, hint: Some(3), key_tag: Some(key_tag(b"k")), mac: Some(mac) };
        assert_eq!(signed_part(&golden), Some(&body[..]), "the MAC covers the context before it");
        assert_eq!(context_hint(&golden), Some(3));
        assert_eq!(decoded, want);
        assert_eq!(decoded.check_key(b"j"), Err(VersionError::OtherKey));
        for cut in 1..golden.len() {
            assert!(decode_context(&golden[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_context(&[golden.as_slice(), &[0]].concat()).is_err(), "a trailing byte");
    }

    /// Contexts older nodes handed out are read, and bind nothing.
    #[test]
    fn unbound_contexts_are_read() {
        let c = clock(&[(1, 1)]);
        let unbound = |hint| DecodedContext { clock: c.clone(), hint, key_tag: None, mac: None };
        let hinted = [0x02, 0x03, 0x00, 0x01, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x01];
        assert_eq!(decode_context(&hinted), Ok(unbound(Some(3))));
        assert!(Clock::decode(&hinted).is_err(), "a plain clock decoder refuses a hint");
        assert_eq!(decode_context(&c.to_bytes()), Ok(unbound(None)));
        assert_eq!(unbound(None).check_key(b"any key"), Ok(()));
        let empty = DecodedContext { clock: Clock::new(), hint: Some(1), key_tag: None, mac: None };
        assert_eq!(decode_context(&[0x02, 0x01, 0x00, 0x00]), Ok(empty));
        let none = DecodedContext { clock: Clock::new(), hint: None, key_tag: None, mac: None };
        assert_eq!(decode_context(&[]), Ok(none));
        assert!(decode_context(&[0x02, 0x01]).is_err());
        assert!(decode_context(&[0x02, 0x01, 0x00, 0x00, 0x00]).is_err());
    }

    #[test]
    fn context_decode_rejects() {
        let bad = |bytes: &[u8], msg: &'static str| assert_eq!(Clock::decode(bytes), Err(VersionError::Malformed(msg)));
        let good = clock(&[(1, 1), (2, 5)]).to_bytes();
        for cut in 1..good.len() {
            bad(&good[..cut], "truncated");
        }
        bad(&[0x02, 0x01, 1, 0, 0, 0, 0, 0, 0, 0, 1], "unknown context format");
        bad(&[0x01, 0x00], "empty context must be zero bytes");
        bad(&[0x01, 0x01, 1, 0, 0, 0, 0, 0, 0, 0, 0x00], "clock counter is zero");
        bad(&[0x01, 0x01, 1, 0, 0, 0, 0, 0, 0, 0, 0x81, 0x00], "overlong varint");
        bad(&[0x01, 0x02, 2, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1], "clock actors not strictly ascending");
        bad(&[0x01, 0x02, 2, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 1], "clock actors not strictly ascending");
        bad(&[good.as_slice(), &[0]].concat(), "trailing bytes after context");
        // A huge count is refused before anything is allocated or read.
        bad(&[0x01, 0xff, 0xff, 0xff, 0xff, 0x0f], "more clock entries than MAX_CLOCK_ENTRIES");
        bad(&[0x01, MAX_CLOCK_ENTRIES as u8 + 1], "more clock entries than MAX_CLOCK_ENTRIES");
    }

    #[test]
    fn version_set_golden() {
        let s = example();
        assert_eq!(s.clock(), &clock(&[(7, 2), (9, 1)]));
        assert_eq!(s.siblings(), [sib(7, 2, Some(b"hi")), sib(9, 1, None)]);
        let (meta, value) = s.encode();
        assert_eq!(meta, EXAMPLE_META);
        assert_eq!(value, b"hi");
        assert_eq!(s.encoded_value_len(), 2);
        assert_eq!(VersionSet::decode(&EXAMPLE_META, b"hi"), Ok(s));
        assert_eq!(VersionSet::new().encode(), (Vec::new(), Vec::new()));
        assert_eq!(VersionSet::decode(&[], &[]), Ok(VersionSet::new()));
    }

    #[test]
    fn version_set_decode_rejects() {
        let m = EXAMPLE_META;
        for cut in 1..m.len() {
            assert_eq!(VersionSet::decode(&m[..cut], b"hi"), malformed("truncated"), "cut at {cut}");
        }
        let with = |at: usize, byte: u8| {
            let mut m = m.to_vec();
            m[at] = byte;
            m
        };
        let bad =
            |meta: &[u8], value: &[u8], msg: &'static str| assert_eq!(VersionSet::decode(meta, value), malformed(msg));
        bad(&[], b"x", "value bytes without version metadata");
        bad(&with(0, 2), b"hi", "unknown version metadata format");
        bad(&[0x01, 0x00, 0x00], b"", "empty version set must be zero bytes");
        bad(&with(2, 9), b"hi", "clock actors not strictly ascending");
        bad(&with(10, 0), b"hi", "clock counter is zero");
        bad(&with(21, 2), b"hi", "sibling actor index outside the clock");
        bad(&with(22, 3), b"hi", "sibling dot not covered by the clock");
        bad(&with(22, 0), b"hi", "sibling counter is zero");
        bad(&with(28, 1), b"hi", "tombstone with a value length");
        bad(&with(23, 2), b"hi", "unknown sibling kind");
        bad(&with(24, 3), b"hi", "sibling lengths exceed the value");
        bad(&with(24, 1), b"hi", "sibling lengths do not sum to the value length");
        bad(&m, b"hi!", "sibling lengths do not sum to the value length");
        bad(&[m.as_slice(), &[0]].concat(), b"hi", "trailing bytes after version metadata");
        // Overlong sibling counter: 0x82 0x00 in place of 0x02.
        let overlong = [&m[..22], &[0x82, 0x00], &m[23..]].concat();
        bad(&overlong, b"hi", "overlong varint");
        // Siblings out of order: swap the two rows (the tombstone first is still covered).
        let swapped = [&m[..21], &m[25..29], &m[21..25]].concat();
        bad(&swapped, b"hi", "sibling dots not strictly ascending");
        // Duplicate dot.
        let dup = [&m[..20], &[0x02], &m[25..29], &m[25..29]].concat();
        bad(&dup, b"", "sibling dots not strictly ascending");
        // Counts over the limits are refused before anything is allocated.
        bad(&[0x01, 0xff, 0xff, 0xff, 0xff, 0x0f], b"", "more clock entries than MAX_CLOCK_ENTRIES");
        bad(&[&m[..20], &[0xff, 0xff, 0xff, 0xff, 0x0f]].concat(), b"hi", "more siblings than MAX_SIBLINGS");
        bad(&[&m[..20], &[MAX_SIBLINGS as u8 + 1]].concat(), b"hi", "more siblings than MAX_SIBLINGS");
    }

    /// A delete folds its own node's earlier tombstones into its new one,
    /// never another node's (whose clock entry that tombstone holds against
    /// truncation).
    #[test]
    fn a_delete_folds_only_its_own_nodes_tombstones() {
        let mut s: VersionSet = VersionSet::new();
        let none = Clock::new();
        s.update(&none, 1, Some(b"v".to_vec())).unwrap();
        let d1 = s.update(&none, 1, None).unwrap();
        let d2 = s.update(&none, 2, None).unwrap();
        let dots = |s: &VersionSet| s.siblings().iter().map(|x| x.dot).collect::<Vec<_>>();
        assert_eq!(dots(&s), vec![Dot { actor: 1, counter: 1 }, d1, d2], "node 2 folds none of node 1's");
        let d3 = s.update(&none, 1, None).unwrap();
        assert_eq!(dots(&s), vec![Dot { actor: 1, counter: 1 }, d3, d2], "node 1 folds its own");
        assert!(s.clock().covers(d1), "the folded dot stays in the clock");
        assert_eq!(s.live_values().collect::<Vec<_>>(), vec![&b"v"[..]], "a blind delete sees nothing");
    }

    #[test]
    fn roundtrip_of_a_full_set_stays_within_the_bounds() {
        // Worst case: MAX_CLOCK_ENTRIES actors with huge ids and counters and
        // MAX_SIBLINGS siblings with huge counters.
        // (Merged from one set per actor: a delete folds the tombstones
        // already there into its own, replicas' merges do not.)
        let mut s = VersionSet::new();
        for i in 0..MAX_SIBLINGS as u64 {
            let actor = u64::MAX - i;
            let ctx = clock(&[(actor, u64::MAX - 2)]);
            let mut one = VersionSet::new();
            one.update(&ctx, actor, if i % 2 == 0 { Some(vec![i as u8; i as usize]) } else { None }).unwrap();
            s.merge(&one);
        }
        assert_eq!(s.siblings().len(), MAX_SIBLINGS);
        assert_eq!(s.clock().len(), MAX_CLOCK_ENTRIES);
        let (meta, value) = s.encode();
        assert!(meta.len() <= MAX_ENCODED_META, "{} > {MAX_ENCODED_META}", meta.len());
        assert_eq!(value.len(), s.encoded_value_len());
        assert_eq!(VersionSet::decode(&meta, &value).as_ref(), Ok(&s));
        let ctx = s.clock().to_bytes();
        assert!(ctx.len() <= MAX_CONTEXT_LEN);
        assert_eq!(Clock::decode(&ctx).as_ref(), Ok(s.clock()));
        assert!(s.check_limits().is_ok());
        // Every prefix of the encoding is rejected, never accepted or a panic.
        for cut in 1..meta.len() {
            assert!(VersionSet::decode(&meta[..cut], &value).is_err());
        }
    }

    #[test]
    fn update_truncates_the_clock_to_the_limit() {
        // 64 entries: actor a has counter a + 10, except the sibling actors 1 and 40
        // (small counters, yet never dropped).
        let mut entries: Vec<(Actor, u64)> = (1..=MAX_CLOCK_ENTRIES as u64).map(|a| (a, a + 10)).collect();
        entries[0].1 = 1;
        entries[39].1 = 2;
        let mut s = VersionSet {
            clock: clock(&entries),
            siblings: [sib(1, 1, Some(b"x")), sib(40, 2, None)].into_iter().collect(),
        };
        let before = s.clone();
        // A write by a 65th node with an empty context: actor 2 (counter 12),
        // the smallest counter without a sibling, goes.
        assert_eq!(s.update(&Clock::new(), 1000, Some(b"y".to_vec())), Ok(Dot { actor: 1000, counter: 1 }));
        assert_eq!(s.clock().len(), MAX_CLOCK_ENTRIES);
        assert_eq!(s.clock().get(2), 0);
        assert_eq!((s.clock().get(1), s.clock().get(3), s.clock().get(40), s.clock().get(1000)), (1, 13, 2, 1));
        assert_eq!(s.siblings().len(), 3);
        // A context from another replica with two more new actors: two more go,
        // smallest counters first: 3 (13), then 4 (14), which ties with 2000
        // (14) and wins as the smaller actor.
        let ctx = clock(&[(2000, 14), (3000, 100)]);
        s.update(&ctx, 1000, Some(b"z".to_vec())).unwrap();
        assert_eq!(s.clock().len(), MAX_CLOCK_ENTRIES);
        assert_eq!((s.clock().get(3), s.clock().get(4), s.clock().get(5)), (0, 0, 15));
        assert_eq!((s.clock().get(2000), s.clock().get(3000)), (14, 100));
        assert!(s.siblings().iter().all(|x| s.clock().covers(x.dot)));
        // The cost: a replica still holding a sibling by a dropped actor (here
        // the state before actor 2's entry went, plus its old write (2, 12))
        // resurrects it as a false sibling on merge. Nothing is lost.
        let mut old = before;
        old.siblings.insert(1, sib(2, 12, Some(b"old")));
        let mut merged = s.clone();
        merged.merge(&old);
        assert!(merged.siblings().iter().any(|x| x.dot == Dot { actor: 2, counter: 12 }));
        for x in s.siblings() {
            assert!(merged.siblings().contains(x));
        }
        assert!(merged.clock().len() <= MAX_CLOCK_ENTRIES);
        assert!(merged.check_limits().is_ok());
    }

    #[test]
    fn merge_bounds_the_clock_and_reports_too_many_siblings() {
        // Two replicas, each with MAX_SIBLINGS concurrent writes by distinct nodes.
        let half = |base: u64| {
            let mut s = VersionSet::new();
            for a in base..base + MAX_SIBLINGS as u64 {
                s.update(&Clock::new(), a, Some(vec![1])).unwrap();
            }
            s
        };
        let mut a = half(0);
        a.merge(&half(1000));
        assert_eq!(a.siblings().len(), 2 * MAX_SIBLINGS);
        assert_eq!(
            a.check_limits(),
            Err(VersionError::TooManySiblings { siblings: 2 * MAX_SIBLINGS, max: MAX_SIBLINGS })
        );
        let (meta, value) = a.encode();
        assert_eq!(VersionSet::decode(&meta, &value), malformed("more clock entries than MAX_CLOCK_ENTRIES"));
        // A write that saw them all brings the set back within the limits.
        let ctx = a.clock().clone();
        a.update(&ctx, 5, Some(vec![2])).unwrap();
        assert_eq!(a.siblings().len(), 1);
        assert!(a.check_limits().is_ok());
        assert!(a.clock().len() <= MAX_CLOCK_ENTRIES);
    }

    #[test]
    fn update_rejects_counter_overflow_unchanged() {
        let mut s = example();
        let before = s.clone();
        let forged = clock(&[(7, u64::MAX)]);
        assert_eq!(s.update(&forged, 7, None), Err(VersionError::Malformed("dot counter overflows u64")));
        assert_eq!(s, before);
    }

    #[test]
    fn bounds_are_what_the_doc_says() {
        assert_eq!(MAX_CONTEXT_LEN, 1 + 8 + 2 + 1 + 64 * 18 + 16, "format, key tag, hint, n, entries, MAC");
        assert_eq!(MAX_ENCODED_META, 1 + 1 + 64 * 18 + 1 + 64 * 22);
    }

    /// A writer's context ([`VersionSet::writer_context`]) names its own
    /// new dot when no other live sibling shares its actor: its next write
    /// replaces its own value and keeps the one it never saw.
    #[test]
    fn a_writer_context_names_its_own_dot_and_no_unseen_sibling() {
        let mut s: VersionSet = VersionSet::new();
        s.update(&Clock::new(), 1, Some(b"v0".to_vec())).unwrap();
        let c0 = s.clock().clone();
        s.update(&c0, 1, Some(b"other".to_vec())).unwrap();
        let mine = s.update(&c0, 2, Some(b"mine".to_vec())).unwrap();
        let seen = s.writer_context(&c0, mine).expect("a sibling it was not given");
        assert_eq!(seen.iter().collect::<Vec<_>>(), vec![(1, 1), (2, 1)]);
        s.update(&seen, 2, Some(b"mine2".to_vec())).unwrap();
        let mut live: Vec<&[u8]> = s.live_values().collect();
        live.sort();
        assert_eq!(live, vec![&b"mine2"[..], &b"other"[..]]);
        // Alone, the whole clock; with another live sibling of its actor,
        // only what it read.
        let mut one: VersionSet = VersionSet::new();
        let d = one.update(&Clock::new(), 1, Some(b"a".to_vec())).unwrap();
        assert_eq!(one.writer_context(&Clock::new(), d), None);
        let d2 = one.update(&Clock::new(), 1, Some(b"b".to_vec())).unwrap();
        assert_eq!(one.writer_context(&Clock::new(), d2), Some(Clock::new()), "same actor: the read context alone");
    }
}
