//! The binary wire protocol shared by the node and the client.
//!
//! Owns: the frame header, the opcodes, the body layouts of every request
//! and reply, the error codes, and the decode-side limits. It is pure
//! (no I/O, no clock) and builds on every platform.
//!
//! Invariant: a length read off the wire is checked against a named limit
//! before anything is allocated for it, and decoding never panics on any
//! input (the `fuzz/` target and a property test feed it arbitrary bytes).
//!
//! # Frames
//!
//! A connection carries a stream of frames in both directions; several
//! frames may share one write. Every frame is a fixed 24-byte header
//! followed by `body_len` bytes of body. All integers are little-endian.
//!
//! ```text
//! offset size field
//!      0    2 magic        b"GY" (0x47 0x59)
//!      2    1 version      protocol version, 1
//!      3    1 opcode       see below; a reply is the request's opcode | 0x80
//!      4    2 flags        request: 0x0001 QUORUM; reply: 0x0001 STALE_ROUTE;
//!                          either: 0x8000 SEALED (a member connection that
//!                          proved the cluster secret: the body is
//!                          encrypted, its last 16 bytes the frame's tag);
//!                          any other bit is refused
//!      6    2 shard        target shard of the node, 0xFFFF = any (the node routes)
//!      8    8 request_id   chosen by the client, echoed in the reply
//!     16    4 body_len     bytes after the header, <= MAX_BODY_LEN
//!     20    4 deadline_us  time budget from receipt in microseconds, 0 = none
//! ```
//!
//! Request ids let a client keep many requests in flight on one connection
//! (up to [`MAX_IN_FLIGHT`]); the node may reply out of order.
//!
//! # Opcodes and bodies
//!
//! `bytes(u16)` is a `u16` length then that many bytes, likewise `bytes(u32)`.
//!
//! ```text
//! 0x01 PING    req: (empty)
//!              rep: u64 node_id, u32 partitions, u16 shard (the replying one),
//!                   u16 shards, shards x u16 port (shard i listens on port[i])
//! 0x02 STATS   req: (empty)             rep: UTF-8 JSON object
//! 0x10 GET     req: bytes(u16) key
//!              rep: bytes(u32) context, u16 n, n x bytes(u32) value
//!                   (n = 0: not found; the context may still be non-empty)
//! 0x11 PUT     req: u16 key_len, u32 context_len, u32 value_len, key, context, value
//!              rep: bytes(u32) context (what the writer has seen: the
//!                   key's whole clock when its value is the only live one,
//!                   else never more than the request's context and the new
//!                   version, so it covers no value the writer was not
//!                   given), u16 siblings (live values the key has after
//!                   this write: more than 1 means a concurrent write
//!                   happened; a GET shows them)
//! 0x12 DELETE  req: u16 key_len, u32 context_len, key, context
//!              rep: bytes(u32) context (as PUT's)
//! 0xFF ERROR   rep: u16 code, bytes(u16) UTF-8 message
//!
//! Between nodes of a cluster:
//! 0x20 REPLICA_GET  req: bytes(u16) key
//!                   rep: u8 found (0 or 1), bytes(u32) meta, bytes(u32) value
//!                        (the replica's stored version set, encoded as in
//!                        storage; both empty when found = 0)
//! 0x21 REPLICA_PUT  req: u16 key_len, u32 meta_len, u32 value_len, key, meta, value
//!                        (a version set to merge into the replica's own)
//!                   rep: (empty): merged and stored as the replica's fsync
//!                        policy says
//! 0x22 HELLO        req: bytes(u16) member name (1 to MAX_NAME_LEN bytes)
//!                   rep: (empty), or, from a node with a cluster secret,
//!                        CHALLENGE_LEN (16) random bytes: the challenge
//!                        the AUTH that follows answers. A member sends it
//!                        first on every connection to another member: the
//!                        receiver takes the connection as a member's
//!                        (counted apart from clients, and admitted past
//!                        --max-connections into a reserve, where it must
//!                        be the first frame; with a cluster secret, only
//!                        once the AUTH proved it, unless the node takes the
//!                        unauthenticated too). A GET, PUT or DELETE on such
//!                        a connection is a member's relay: for a key the
//!                        receiver does not replicate it gets RingMismatch,
//!                        not relayed again
//! 0x23 AUTH         req: CHALLENGE_LEN (16) random bytes, the member's
//!                        nonce, then PROOF_LEN (32) bytes, its proof that
//!                        it holds the cluster secret: bound to the HELLO
//!                        reply's challenge, the nonce, the name the HELLO
//!                        gave and the name of the member it meant to
//!                        reach (`crate::auth`)
//!                   rep: PROOF_LEN (32) bytes: the node's own proof, over
//!                        the same, which the member checks before it
//!                        sends anything else. The connection is then a
//!                        member's, and its replica messages are taken. A
//!                        node with a cluster secret answers REPLICA_GET and
//!                        REPLICA_PUT on a connection without one with
//!                        Unauthenticated (unless it has
//!                        accept_unauthenticated); a wrong proof gets
//!                        Unauthenticated and the connection is closed
//! 0x30 RING         req: (empty)
//!                   rep: u8 n, u8 r, u8 w (the cluster's default quorum),
//!                        then the ring state (`core::ring` documents it)
//! ```
//!
//! Reserved for the next pieces of work (a node answers them with
//! `UnknownOpcode`): 0x24-0x2F more replica messages, 0x31-0x3F ring
//! changes, 0x40-0x4F gossip, 0x50-0x5F anti-entropy, 0x60-0x6F hinted
//! handoff.
//!
//! # Flags
//!
//! ```text
//! request 0x0001 QUORUM       GET, PUT, DELETE: the body starts with two
//!                             extra bytes, u8 r, u8 w, overriding the
//!                             namespace's read and write quorum for this
//!                             request (0 = keep the default; sent only
//!                             with one of them non-zero, and only on
//!                             those three: otherwise Malformed)
//! reply   0x0001 STALE_ROUTE  the node that answered is not in the key's
//!                             preference list (it forwarded the request):
//!                             a client routing by the ring should fetch it
//!                             again
//! ```
//!
//! The context is opaque to clients: it is the causal context of
//! [`crate::core::version::Clock`] bound to its key
//! ([`crate::core::version::encode_context`], and signed by a node with a
//! cluster secret, `crate::auth`; a node hands one out for a key never
//! written too); a request's empty context means "never read".
//!
//! # Errors
//!
//! A frame that cannot be parsed gets an ERROR reply (with the request id
//! when the header was readable) and the connection is closed; a request
//! that parses but fails (a key too long, a full disk) gets an ERROR reply
//! and the connection stays open.

use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::core::version::{MAX_CONTEXT_LEN, MAX_ENCODED_META};
use crate::limits::{MAX_KEY_LEN, VALUE_LEN_HARD_CAP};

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"GY";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 24;
/// `shard` value meaning "whichever shard owns the key".
pub const ANY_SHARD: u16 = u16::MAX;
/// Set on a reply opcode.
pub const REPLY_BIT: u8 = 0x80;

/// Largest body of any frame: a PUT of the largest value with the largest
/// key and context, or a GET reply carrying a stored object of up to the
/// hard value cap with its sibling framing. Checked before allocating.
pub const MAX_BODY_LEN: usize = VALUE_LEN_HARD_CAP + 64 * 1024;
/// Requests one connection may have in flight; past it the node stops
/// reading that connection until replies drain (backpressure, not errors).
pub const MAX_IN_FLIGHT: usize = 1024;

/// Bytes of the challenge in a HELLO reply from a node with a cluster
/// secret: 128 random bits, so that no proof seen on one connection ever
/// answers another's.
pub const CHALLENGE_LEN: usize = 16;

/// Bytes of an AUTH's proof: a whole blake3 output (`crate::auth`).
pub const PROOF_LEN: usize = 32;
/// Longest error message (longer ones are cut at a character boundary).
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Most values in one GET reply.
pub const MAX_REPLY_VALUES: usize = crate::core::version::MAX_SIBLINGS;

const PUT_FIXED: usize = 2 + 4 + 4;
// Each of these may go on a member connection (a relayed request or
// reply, a replica message), sealed: its tag must fit too.
const _: () =
    assert!(MAX_BODY_LEN >= max_request_body(VALUE_LEN_HARD_CAP) + SEAL_TAG_LEN, "a PUT with QUORUM overrides");
const _: () =
    assert!(MAX_BODY_LEN >= 4 + MAX_CONTEXT_LEN + 2 + 4 * MAX_REPLY_VALUES + VALUE_LEN_HARD_CAP + SEAL_TAG_LEN);
const _: () = assert!(
    MAX_BODY_LEN >= PUT_FIXED + MAX_KEY_LEN + MAX_ENCODED_META + VALUE_LEN_HARD_CAP + SEAL_TAG_LEN,
    "REPLICA_PUT"
);
const _: () =
    assert!(MAX_BODY_LEN >= 1 + 4 + MAX_ENCODED_META + 4 + VALUE_LEN_HARD_CAP + SEAL_TAG_LEN, "REPLICA_GET reply");
const _: () = assert!(MAX_BODY_LEN <= u32::MAX as usize, "body_len is a u32");
const _: () = assert!(MAX_KEY_LEN <= u16::MAX as usize, "key length is a u16 on the wire");
const _: () = assert!(MAX_REPLY_VALUES <= u16::MAX as usize, "value count is a u16 on the wire");
const _: () = assert!(MAX_ERROR_MESSAGE <= u16::MAX as usize);

/// The fixed frame header, exactly as on the wire.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RawHeader {
    pub magic: [u8; 2],
    pub version: u8,
    pub opcode: u8,
    pub flags: U16,
    pub shard: U16,
    pub request_id: U64,
    pub body_len: U32,
    pub deadline_us: U32,
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_LEN);

/// A validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub opcode: u8,
    pub flags: u16,
    pub shard: u16,
    pub request_id: u64,
    pub body_len: u32,
    pub deadline_us: u32,
}

/// Operation codes.
pub mod op {
    pub const PING: u8 = 0x01;
    pub const STATS: u8 = 0x02;
    pub const GET: u8 = 0x10;
    pub const PUT: u8 = 0x11;
    pub const DELETE: u8 = 0x12;
    pub const REPLICA_GET: u8 = 0x20;
    pub const REPLICA_PUT: u8 = 0x21;
    pub const HELLO: u8 = 0x22;
    pub const AUTH: u8 = 0x23;
    pub const RING: u8 = 0x30;
    pub const ERROR: u8 = 0xFF;
}

/// Header flag bits.
pub mod flags {
    /// Request: the body starts with `u8 r, u8 w` quorum overrides.
    pub const QUORUM: u16 = 0x0001;
    /// Reply: the answering node is not a replica of the key; refresh the
    /// ring.
    pub const STALE_ROUTE: u16 = 0x0001;
    /// Either way, on a member connection that proved the cluster secret:
    /// the body is encrypted and ends with the frame's
    /// [`super::SEAL_TAG_LEN`]-byte tag ([`super::seal_frame`]).
    pub const SEALED: u16 = 0x8000;
    /// Every flag a request may carry (SEALED only on a sealed connection:
    /// [`super::split_sealed_frame`]).
    pub const REQUEST_MASK: u16 = QUORUM;
    /// Every flag a reply may carry (likewise).
    pub const REPLY_MASK: u16 = STALE_ROUTE;
}

/// Bytes of a sealed frame's tag, at the end of its body (`crate::auth`
/// computes it: AES-256-GCM's): 128 bits.
pub const SEAL_TAG_LEN: usize = 16;

/// Why a frame on a sealed connection was refused ([`open_frame`]).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error("a frame without the SEALED flag on a sealed member connection (is the member of an older build?)")]
    NotSealed,
    #[error("a sealed frame too short to hold its tag")]
    TooShort,
    #[error("a sealed frame that does not open (changed, replayed, reordered, or not the member's)")]
    BadTag,
}

/// Seals the whole frame at `buf[at..]` for a sealed connection: sets its
/// SEALED flag, counts [`SEAL_TAG_LEN`] more bytes in its `body_len`, lets
/// `seal(header, body)` encrypt the body in place under the header so
/// patched (authenticated, sent in the clear: a receiver frames by it),
/// and appends the tag it returns. The frame must be one this side
/// encoded (well formed, unsealed).
pub fn seal_frame(buf: &mut Vec<u8>, at: usize, seal: impl FnOnce(&[u8; HEADER_LEN], &mut [u8]) -> [u8; SEAL_TAG_LEN]) {
    let whole = buf.len() - at;
    let raw = RawHeader::mut_from_prefix(&mut buf[at..]).expect("a whole frame to seal").0;
    debug_assert_eq!(raw.flags.get() & flags::SEALED, 0, "sealed twice");
    debug_assert_eq!(HEADER_LEN + raw.body_len.get() as usize, whole, "one whole frame");
    raw.flags = U16::new(raw.flags.get() | flags::SEALED);
    raw.body_len = U32::new(raw.body_len.get() + SEAL_TAG_LEN as u32);
    let (header, body) = buf[at..].split_at_mut(HEADER_LEN);
    let tag = seal(header.first_chunk().expect("HEADER_LEN bytes"), body);
    buf.extend_from_slice(&tag);
}

/// Opens `frame`, one whole frame off a sealed connection (its header
/// checked by [`split_frame`]): it must carry the SEALED flag, and
/// `open(header, body, tag)` must decrypt its body in place and take its
/// tag; its header is then rewritten as unsealed (the flag cleared,
/// `body_len` less the tag), and the unsealed frame's length returned:
/// `frame[..len]` is the frame as its sender encoded it. A frame that
/// fails is left in no state to read.
pub fn open_frame(
    frame: &mut [u8],
    open: impl FnOnce(&[u8; HEADER_LEN], &mut [u8], &[u8; SEAL_TAG_LEN]) -> bool,
) -> Result<usize, SealError> {
    let (raw, _) = RawHeader::mut_from_prefix(frame).map_err(|_| SealError::TooShort)?;
    if raw.flags.get() & flags::SEALED == 0 {
        return Err(SealError::NotSealed);
    }
    let body_len = raw.body_len.get() as usize;
    if body_len < SEAL_TAG_LEN || frame.len() != HEADER_LEN + body_len {
        return Err(SealError::TooShort);
    }
    let len = frame.len() - SEAL_TAG_LEN;
    let (sealed, tag) = frame.split_at_mut(len);
    let (header, body) = sealed.split_at_mut(HEADER_LEN);
    let tag: &[u8; SEAL_TAG_LEN] = (&*tag).try_into().expect("SEAL_TAG_LEN bytes");
    if !open(header.first_chunk().expect("HEADER_LEN bytes"), body, tag) {
        return Err(SealError::BadTag);
    }
    let (raw, _) = RawHeader::mut_from_prefix(frame).map_err(|_| SealError::TooShort)?;
    raw.flags = U16::new(raw.flags.get() & !flags::SEALED);
    raw.body_len = U32::new((body_len - SEAL_TAG_LEN) as u32);
    Ok(len)
}

/// Per-request quorum overrides (the QUORUM flag); 0 keeps the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quorum {
    pub r: u8,
    pub w: u8,
}

impl Quorum {
    /// Whether nothing is overridden (the flag is not sent).
    pub fn is_default(&self) -> bool {
        self.r == 0 && self.w == 0
    }
}

/// Machine-readable error codes carried by ERROR replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame could not be parsed; the connection is closed. (Also
    /// the answer to a HELLO naming no member, whose connection goes on.)
    Malformed,
    UnsupportedVersion,
    /// The body is longer than this node accepts. Within the protocol's
    /// `MAX_BODY_LEN` the node skips the body and the connection goes on
    /// (a PUT over the node's value limit gets `ValueTooLarge`); past it
    /// the frame's end cannot be trusted and the connection is closed.
    FrameTooLarge,
    UnknownOpcode,
    /// Empty or longer than `MAX_KEY_LEN`.
    InvalidKey,
    ValueTooLarge,
    /// The context is not one this node issued.
    InvalidContext,
    /// The key has too many concurrent versions; read it and write back
    /// with the context to resolve them.
    TooManySiblings,
    DeadlineExceeded,
    /// The shard cannot take more work right now.
    Overloaded,
    /// The shard's storage failed (a disk error); it refuses writes.
    StorageFailed,
    /// The node is shutting down.
    ShuttingDown,
    Internal,
    /// Fewer replicas than the read or write quorum answered in time (the
    /// message says how many), or a write relayed to a replica got no answer
    /// from it: either way a write may have been stored.
    QuorumFailed,
    /// The node is not part of a cluster (a RING request to a lone node).
    NotClustered,
    /// An R or W override outside 1..=N.
    InvalidQuorum,
    /// A member relayed the request to a node that, by its own ring, does
    /// not replicate the key: the members' rings differ (their cluster
    /// files do). It is not relayed again.
    RingMismatch,
    /// A replica message on a connection that has not proved it holds the
    /// cluster secret (AUTH); or an AUTH whose proof is wrong, that answers
    /// no challenge of its connection (none asked, or a second AUTH), or
    /// sent to a node with no secret (those close the connection).
    Unauthenticated,
    /// A code from a newer protocol version.
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::UnknownOpcode => 4,
            ErrorCode::InvalidKey => 5,
            ErrorCode::ValueTooLarge => 6,
            ErrorCode::InvalidContext => 7,
            ErrorCode::TooManySiblings => 8,
            ErrorCode::DeadlineExceeded => 9,
            ErrorCode::Overloaded => 10,
            ErrorCode::StorageFailed => 11,
            ErrorCode::ShuttingDown => 12,
            ErrorCode::Internal => 13,
            ErrorCode::QuorumFailed => 14,
            ErrorCode::NotClustered => 15,
            ErrorCode::InvalidQuorum => 16,
            ErrorCode::RingMismatch => 17,
            ErrorCode::Unauthenticated => 18,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_u16(c: u16) -> ErrorCode {
        match c {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::FrameTooLarge,
            4 => ErrorCode::UnknownOpcode,
            5 => ErrorCode::InvalidKey,
            6 => ErrorCode::ValueTooLarge,
            7 => ErrorCode::InvalidContext,
            8 => ErrorCode::TooManySiblings,
            9 => ErrorCode::DeadlineExceeded,
            10 => ErrorCode::Overloaded,
            11 => ErrorCode::StorageFailed,
            12 => ErrorCode::ShuttingDown,
            13 => ErrorCode::Internal,
            14 => ErrorCode::QuorumFailed,
            15 => ErrorCode::NotClustered,
            16 => ErrorCode::InvalidQuorum,
            17 => ErrorCode::RingMismatch,
            18 => ErrorCode::Unauthenticated,
            c => ErrorCode::Other(c),
        }
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:02x?}: not a Gyre frame")]
    BadMagic([u8; 2]),
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("unknown flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("key length {0} is outside 1..={MAX_KEY_LEN}")]
    KeyLength(usize),
    #[error("context of {0} bytes exceeds {MAX_CONTEXT_LEN}")]
    ContextLength(usize),
}

impl WireError {
    /// The error code an ERROR reply to this carries.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::BadMagic(_) | WireError::UnknownFlags(_) | WireError::Malformed { .. } => ErrorCode::Malformed,
            WireError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::UnknownOpcode(_) => ErrorCode::UnknownOpcode,
            WireError::KeyLength(_) => ErrorCode::InvalidKey,
            WireError::ContextLength(_) => ErrorCode::InvalidContext,
        }
    }

    /// Whether the connection can go on after this error: only when the
    /// frame boundaries are still known and the body was well formed.
    pub fn keeps_connection(&self) -> bool {
        matches!(self, WireError::UnknownOpcode(_) | WireError::KeyLength(_) | WireError::ContextLength(_))
    }
}

fn malformed(what: &'static str) -> WireError {
    WireError::Malformed { what }
}

/// Validates a header. `max_body` is the receiver's own limit (at most
/// [`MAX_BODY_LEN`]); the body length is checked here, before the caller
/// allocates for it.
pub fn decode_header(bytes: &[u8; HEADER_LEN], max_body: usize) -> Result<Header, WireError> {
    decode_header_with(bytes, max_body, 0)
}

/// [`decode_header`] on a sealed connection: the SEALED flag is taken, and
/// the body may be as long as the protocol allows ([`split_sealed_frame`]).
pub fn decode_sealed_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    decode_header_with(bytes, MAX_BODY_LEN, flags::SEALED)
}

/// [`decode_header`], also taking the flags of `extra`.
fn decode_header_with(bytes: &[u8; HEADER_LEN], max_body: usize, extra: u16) -> Result<Header, WireError> {
    let raw = RawHeader::read_from_bytes(bytes).map_err(|_| malformed("header"))?;
    if raw.magic != MAGIC {
        return Err(WireError::BadMagic(raw.magic));
    }
    if raw.version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(raw.version));
    }
    let len = raw.body_len.get() as usize;
    let max = max_body.min(MAX_BODY_LEN);
    if len > max {
        return Err(WireError::FrameTooLarge { len, max });
    }
    let mask = extra | if raw.opcode & REPLY_BIT != 0 { flags::REPLY_MASK } else { flags::REQUEST_MASK };
    if raw.flags.get() & !mask != 0 {
        return Err(WireError::UnknownFlags(raw.flags.get()));
    }
    Ok(Header {
        opcode: raw.opcode,
        flags: raw.flags.get(),
        shard: raw.shard.get(),
        request_id: raw.request_id.get(),
        body_len: raw.body_len.get(),
        deadline_us: raw.deadline_us.get(),
    })
}

/// Reads the request id of a header even if the rest is invalid, so an
/// error reply can still name the request.
pub fn peek_request_id(bytes: &[u8; HEADER_LEN]) -> Option<u64> {
    let raw = RawHeader::ref_from_bytes(bytes).ok()?;
    (raw.magic == MAGIC).then(|| raw.request_id.get())
}

/// Reads the opcode of a header even if the rest is invalid (a frame
/// too large for the receiver, say), so an error reply can say why.
pub fn peek_opcode(bytes: &[u8; HEADER_LEN]) -> Option<u8> {
    let raw = RawHeader::ref_from_bytes(bytes).ok()?;
    (raw.magic == MAGIC).then_some(raw.opcode)
}

/// The total length (header + body) a frame's header declares, read
/// without validating anything else: how much a reader must buffer for
/// a frame [`split_frame`] has already accepted the header of.
pub fn declared_frame_len(bytes: &[u8; HEADER_LEN]) -> usize {
    RawHeader::ref_from_bytes(bytes).map_or(HEADER_LEN, |raw| HEADER_LEN + raw.body_len.get() as usize)
}

/// Rewrites a reply frame's request id and adds `flags` to it: how a
/// node relays another node's reply as its own. Frames shorter than a
/// header are left alone.
pub fn patch_reply(frame: &mut [u8], request_id: u64, flags: u16) {
    if let Some(h) = frame.first_chunk_mut::<HEADER_LEN>() {
        if let Ok(raw) = RawHeader::mut_from_bytes(h) {
            raw.request_id = U64::new(request_id);
            raw.flags = U16::new(raw.flags.get() | flags);
        }
    }
}

/// The largest request body a node whose values are limited to
/// `max_value_len` must read: a PUT of such a value with the largest key
/// and context, and the QUORUM overrides.
pub const fn max_request_body(max_value_len: usize) -> usize {
    2 + PUT_FIXED + MAX_KEY_LEN + MAX_CONTEXT_LEN + max_value_len
}

/// Checks a key's length against [`MAX_KEY_LEN`].
pub fn check_key_len(len: usize) -> Result<(), WireError> {
    if len == 0 || len > MAX_KEY_LEN {
        return Err(WireError::KeyLength(len));
    }
    Ok(())
}

/// Checks a context's length against [`MAX_CONTEXT_LEN`].
pub fn check_context_len(len: usize) -> Result<(), WireError> {
    if len > MAX_CONTEXT_LEN {
        return Err(WireError::ContextLength(len));
    }
    Ok(())
}

/// If `buf` starts with a whole frame, its header and total length.
pub fn split_frame(buf: &[u8], max_body: usize) -> Result<Option<(Header, usize)>, WireError> {
    split_with(buf, max_body, 0)
}

fn split_with(buf: &[u8], max_body: usize, extra_flags: u16) -> Result<Option<(Header, usize)>, WireError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else { return Ok(None) };
    let header = decode_header_with(h, max_body, extra_flags)?;
    let total = HEADER_LEN + header.body_len as usize;
    Ok((buf.len() >= total).then_some((header, total)))
}

/// [`split_frame`] on a sealed connection: the SEALED flag is taken (and
/// must be there for the frame to open), and every frame is read whole up
/// to the protocol's [`MAX_BODY_LEN`]. The header is the sealed one;
/// [`Header::opened`] is the frame's once it opens.
pub fn split_sealed_frame(buf: &[u8]) -> Result<Option<(Header, usize)>, WireError> {
    split_with(buf, MAX_BODY_LEN, flags::SEALED)
}

/// Decodes `frame`, one whole reply frame (as a node's call to another
/// returns it), into its response.
pub fn decode_reply_frame(frame: &[u8]) -> Result<Response<'_>, WireError> {
    let (h, total) = split_frame(frame, MAX_BODY_LEN)?.ok_or(malformed("a reply frame cut short"))?;
    Response::decode(h.opcode, &frame[HEADER_LEN..total])
}

/// A frame's `deadline_us` for a caller with `left` to wait: whole
/// microseconds, at least 1 (0 means "no deadline") and at most
/// `u32::MAX` (about 71 minutes).
pub fn deadline_us_for(left: std::time::Duration) -> u32 {
    left.as_micros().clamp(1, u32::MAX as u128) as u32
}

/// Stamps the frame at the start of `frame` with `left`, the time its
/// caller still waits ([`deadline_us_for`]): clients and peers stamp each
/// request's budget as it leaves, not as it is queued. A frame sent
/// without a deadline (0: a peer's HELLO) keeps none, and one shorter
/// than a header is left alone.
pub fn stamp_deadline(frame: &mut [u8], left: std::time::Duration) {
    if let Ok((raw, _)) = RawHeader::mut_from_prefix(frame) {
        if raw.deadline_us.get() != 0 {
            raw.deadline_us = U32::new(deadline_us_for(left));
        }
    }
}

/// Bytes of frames a writer stamps together and then writes, at most (a
/// larger frame is a run of its own): each frame's budget is stamped just
/// before its run is written, so a frame behind a large one goes out with
/// what is left of its caller's time then (found by a review: stamped a
/// whole batch at a time, a frame behind an 8 MiB one left a second later
/// with its old budget). The async client's writer and a node's peer
/// writer both write in runs ([`StampedRun`]).
pub const WRITE_RUN: usize = 64 * 1024;

/// The run of queued frames a writer is about to write: each frame taken
/// into it is stamped with what its caller has left ([`stamp_deadline`])
/// or, with nothing left, left out, until the run holds [`WRITE_RUN`]
/// bytes. The writer then writes `ranges`.
#[derive(Default)]
pub struct StampedRun {
    /// Bytes of the frames taken so far, those left out included.
    bytes: usize,
    /// The byte ranges of the writer's buffer to write, in order:
    /// consecutive frames kept are one range.
    pub ranges: Vec<(usize, usize)>,
}

impl StampedRun {
    /// Starts a new run (the ranges of the last one are dropped, their
    /// room kept).
    pub fn start(&mut self) {
        self.bytes = 0;
        self.ranges.clear();
    }

    /// Whether a frame of `len` bytes goes in this run (the first frame of
    /// a run always does).
    pub fn fits(&self, len: usize) -> bool {
        self.bytes == 0 || self.bytes + len <= WRITE_RUN
    }

    /// Takes the frame `buf[at..end]`, whose caller has `left` to wait,
    /// into the run: stamped, or left out if nothing is left (false).
    pub fn take(&mut self, buf: &mut [u8], at: usize, end: usize, left: std::time::Duration) -> bool {
        self.bytes += end - at;
        if left.is_zero() {
            return false;
        }
        stamp_deadline(&mut buf[at..end], left);
        match self.ranges.last_mut() {
            Some((_, e)) if *e == at => *e = end,
            _ => self.ranges.push((at, end)),
        }
        true
    }
}

impl Header {
    /// A sealed frame's header as [`open_frame`] rewrites it once the frame
    /// opens: the SEALED flag cleared, the tag off `body_len`.
    pub fn opened(self) -> Header {
        Header {
            flags: self.flags & !flags::SEALED,
            body_len: self.body_len.saturating_sub(SEAL_TAG_LEN as u32),
            ..self
        }
    }

    /// The time the sender gives the request (`deadline_us`), if any.
    pub fn deadline(&self) -> Option<std::time::Duration> {
        (self.deadline_us > 0).then(|| std::time::Duration::from_micros(self.deadline_us as u64))
    }
}

/// Header fields that differ per frame.
struct HeaderFields {
    opcode: u8,
    flags: u16,
    shard: u16,
    request_id: u64,
    deadline_us: u32,
}

fn put_header(out: &mut Vec<u8>, h: HeaderFields, body_len: usize) {
    debug_assert!(body_len <= MAX_BODY_LEN);
    let HeaderFields { opcode, flags, shard, request_id, deadline_us } = h;
    let raw = RawHeader {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        opcode,
        flags: U16::new(flags),
        shard: U16::new(shard),
        request_id: U64::new(request_id),
        body_len: U32::new(body_len as u32),
        deadline_us: U32::new(deadline_us),
    };
    out.extend_from_slice(raw.as_bytes());
}

/// A request, borrowing its bytes from the frame it was decoded from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Ping,
    Stats,
    Get {
        key: &'a [u8],
    },
    Put {
        key: &'a [u8],
        context: &'a [u8],
        value: &'a [u8],
    },
    Delete {
        key: &'a [u8],
        context: &'a [u8],
    },
    ReplicaGet {
        key: &'a [u8],
    },
    /// `meta` and `value` are a version set as stored (`VersionSet::encode`).
    ReplicaPut {
        key: &'a [u8],
        meta: &'a [u8],
        value: &'a [u8],
    },
    /// A member names itself on a connection it opened (module docs).
    Hello {
        member: &'a [u8],
    },
    /// A member's nonce and proof that it holds the cluster secret
    /// (module docs).
    Auth {
        nonce: &'a [u8; CHALLENGE_LEN],
        proof: &'a [u8; PROOF_LEN],
    },
    Ring,
}

impl Request<'_> {
    pub fn opcode(&self) -> u8 {
        match self {
            Request::Ping => op::PING,
            Request::Stats => op::STATS,
            Request::Get { .. } => op::GET,
            Request::Put { .. } => op::PUT,
            Request::Delete { .. } => op::DELETE,
            Request::ReplicaGet { .. } => op::REPLICA_GET,
            Request::ReplicaPut { .. } => op::REPLICA_PUT,
            Request::Hello { .. } => op::HELLO,
            Request::Auth { .. } => op::AUTH,
            Request::Ring => op::RING,
        }
    }

    /// The key the request is about, if any.
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            Request::Get { key }
            | Request::Put { key, .. }
            | Request::Delete { key, .. }
            | Request::ReplicaGet { key }
            | Request::ReplicaPut { key, .. } => Some(key),
            Request::Ping | Request::Stats | Request::Ring | Request::Hello { .. } | Request::Auth { .. } => None,
        }
    }

    /// Whether sending the request twice does no harm (a read), so a
    /// client may resend it after a broken connection.
    pub fn is_idempotent(&self) -> bool {
        matches!(self, Request::Get { .. } | Request::Ping | Request::Stats | Request::Ring | Request::Hello { .. })
    }

    /// Whether the request is a client's quorum operation (GET, PUT,
    /// DELETE), the only ones that may carry the QUORUM flag.
    pub fn is_quorum_op(&self) -> bool {
        matches!(self, Request::Get { .. } | Request::Put { .. } | Request::Delete { .. })
    }

    fn body_len(&self) -> usize {
        match self {
            Request::Ping | Request::Stats | Request::Ring => 0,
            Request::Auth { .. } => CHALLENGE_LEN + PROOF_LEN,
            Request::Get { key } | Request::ReplicaGet { key } | Request::Hello { member: key } => 2 + key.len(),
            Request::Put { key, context, value } => PUT_FIXED + key.len() + context.len() + value.len(),
            Request::Delete { key, context } => 6 + key.len() + context.len(),
            Request::ReplicaPut { key, meta, value } => PUT_FIXED + key.len() + meta.len() + value.len(),
        }
    }

    /// Appends this request as one frame. The caller checks lengths
    /// against the limits first (the client does); oversized fields are a
    /// programming error here.
    pub fn encode(&self, out: &mut Vec<u8>, request_id: u64, shard: u16, deadline_us: u32) {
        self.encode_with(out, request_id, shard, deadline_us, Quorum::default())
    }

    /// [`Self::encode`] with quorum overrides (sent with the QUORUM flag
    /// when not default; only a quorum operation carries them).
    pub fn encode_with(&self, out: &mut Vec<u8>, request_id: u64, shard: u16, deadline_us: u32, quorum: Quorum) {
        let with_quorum = !quorum.is_default() && self.is_quorum_op();
        let (flags, extra) = if with_quorum { (flags::QUORUM, 2) } else { (0, 0) };
        let h = HeaderFields { opcode: self.opcode(), flags, shard, request_id, deadline_us };
        put_header(out, h, self.body_len() + extra);
        if with_quorum {
            out.extend_from_slice(&[quorum.r, quorum.w]);
        }
        match self {
            Request::Ping | Request::Stats | Request::Ring => {}
            Request::Auth { nonce, proof } => {
                out.extend_from_slice(*nonce);
                out.extend_from_slice(*proof);
            }
            Request::Get { key } | Request::ReplicaGet { key } | Request::Hello { member: key } => {
                put_bytes16(out, key)
            }
            Request::Put { key, context: middle, value } | Request::ReplicaPut { key, meta: middle, value } => {
                out.extend_from_slice(&(key.len() as u16).to_le_bytes());
                out.extend_from_slice(&(middle.len() as u32).to_le_bytes());
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
                out.extend_from_slice(middle);
                out.extend_from_slice(value);
            }
            Request::Delete { key, context } => {
                out.extend_from_slice(&(key.len() as u16).to_le_bytes());
                out.extend_from_slice(&(context.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
                out.extend_from_slice(context);
            }
        }
    }

    /// Decodes a request frame's body with its header's flags: the
    /// request and its quorum overrides.
    pub fn decode_with<'a>(header: &Header, body: &'a [u8]) -> Result<(Request<'a>, Quorum), WireError> {
        if header.flags & flags::QUORUM == 0 {
            return Ok((Request::decode(header.opcode, body)?, Quorum::default()));
        }
        let (q, rest) = body.split_first_chunk::<2>().ok_or(malformed("quorum overrides"))?;
        let req = Request::decode(header.opcode, rest)?;
        let quorum = Quorum { r: q[0], w: q[1] };
        if !req.is_quorum_op() || quorum.is_default() {
            return Err(malformed("QUORUM flag on a request that takes no quorum, or with nothing overridden"));
        }
        Ok((req, quorum))
    }

    /// Decodes a request body (of a frame without flags). Every length is
    /// checked against the body and the limits; the slices borrow from
    /// `body`.
    pub fn decode(opcode: u8, body: &[u8]) -> Result<Request<'_>, WireError> {
        let mut r = Reader::new(body);
        let req = match opcode {
            op::PING => Request::Ping,
            op::STATS => Request::Stats,
            op::RING => Request::Ring,
            op::REPLICA_GET => {
                let key = r.bytes16("REPLICA_GET key")?;
                Request::ReplicaGet { key: check_key(key)? }
            }
            op::HELLO => {
                let member = r.bytes16("HELLO member")?;
                if member.is_empty() || member.len() > crate::core::ring::MAX_NAME_LEN {
                    return Err(malformed("HELLO member name length"));
                }
                Request::Hello { member }
            }
            op::AUTH => Request::Auth { nonce: r.array_ref("AUTH nonce")?, proof: r.array_ref("AUTH proof")? },
            op::REPLICA_PUT => {
                let meta_ok =
                    |len| if len > MAX_ENCODED_META { Err(malformed("REPLICA_PUT meta length")) } else { Ok(()) };
                let (key, meta, value) = r.put_body("REPLICA_PUT", meta_ok)?;
                Request::ReplicaPut { key, meta, value }
            }
            op::GET => {
                let key = r.bytes16("GET key")?;
                Request::Get { key: check_key(key)? }
            }
            op::PUT => {
                let (key, context, value) = r.put_body("PUT", check_context_len)?;
                Request::Put { key, context, value }
            }
            op::DELETE => {
                let key_len = r.u16("DELETE header")? as usize;
                let ctx_len = r.u32("DELETE header")? as usize;
                check_key_len(key_len)?;
                check_context_len(ctx_len)?;
                let key = r.take(key_len, "DELETE key")?;
                let context = r.take(ctx_len, "DELETE context")?;
                Request::Delete { key, context }
            }
            other => return Err(WireError::UnknownOpcode(other)),
        };
        r.finish("request body")?;
        Ok(req)
    }
}

fn check_key(key: &[u8]) -> Result<&[u8], WireError> {
    check_key_len(key.len()).map(|()| key)
}

/// Identity of a node and the ports of its shards (the PING reply).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: u64,
    pub partitions: u32,
    /// The shard that answered.
    pub shard: u16,
    /// Port of each shard, by shard id.
    pub ports: Vec<u16>,
}

/// A reply, borrowing from its frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response<'a> {
    Pong(NodeInfo),
    Stats(&'a str),
    Get {
        context: &'a [u8],
        values: Vec<&'a [u8]>,
    },
    Put {
        context: &'a [u8],
        siblings: u16,
    },
    Delete {
        context: &'a [u8],
    },
    /// A replica's stored version set (`meta`, `value` as in storage), or
    /// `None`: the replica has nothing for the key.
    ReplicaGet {
        set: Option<(&'a [u8], &'a [u8])>,
    },
    ReplicaPut,
    /// `challenge`: from a node with a cluster secret, what the AUTH that
    /// follows must answer.
    Hello {
        challenge: Option<[u8; CHALLENGE_LEN]>,
    },
    /// The AUTH's proof was right; the node's own proof.
    Auth {
        proof: [u8; PROOF_LEN],
    },
    /// The cluster's default quorum and its encoded ring.
    Ring {
        n: u8,
        r: u8,
        w: u8,
        ring: &'a [u8],
    },
    Error {
        code: ErrorCode,
        message: &'a str,
    },
}

impl Response<'_> {
    pub fn opcode(&self) -> u8 {
        match self {
            Response::Pong(_) => op::PING | REPLY_BIT,
            Response::Stats(_) => op::STATS | REPLY_BIT,
            Response::Get { .. } => op::GET | REPLY_BIT,
            Response::Put { .. } => op::PUT | REPLY_BIT,
            Response::Delete { .. } => op::DELETE | REPLY_BIT,
            Response::ReplicaGet { .. } => op::REPLICA_GET | REPLY_BIT,
            Response::ReplicaPut => op::REPLICA_PUT | REPLY_BIT,
            Response::Hello { .. } => op::HELLO | REPLY_BIT,
            Response::Auth { .. } => op::AUTH | REPLY_BIT,
            Response::Ring { .. } => op::RING | REPLY_BIT,
            Response::Error { .. } => op::ERROR,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Response::Pong(info) => 8 + 4 + 2 + 2 + 2 * info.ports.len(),
            Response::Stats(s) => s.len(),
            Response::Get { context, values } => {
                4 + context.len() + 2 + values.iter().map(|v| 4 + v.len()).sum::<usize>()
            }
            Response::Put { context, .. } => 4 + context.len() + 2,
            Response::Delete { context } => 4 + context.len(),
            Response::ReplicaGet { set } => 1 + 8 + set.map_or(0, |(m, v)| m.len() + v.len()),
            Response::ReplicaPut => 0,
            Response::Auth { .. } => PROOF_LEN,
            Response::Hello { challenge } => challenge.map_or(0, |_| CHALLENGE_LEN),
            Response::Ring { ring, .. } => 3 + ring.len(),
            Response::Error { message, .. } => 4 + error_message(message).len(),
        }
    }

    /// Appends this reply as one frame.
    pub fn encode(&self, out: &mut Vec<u8>, request_id: u64, shard: u16) {
        self.encode_flagged(out, request_id, shard, 0)
    }

    /// [`Self::encode`] with reply flags (see [`flags`]).
    pub fn encode_flagged(&self, out: &mut Vec<u8>, request_id: u64, shard: u16, flags: u16) {
        debug_assert_eq!(flags & !flags::REPLY_MASK, 0);
        put_header(
            out,
            HeaderFields { opcode: self.opcode(), flags, shard, request_id, deadline_us: 0 },
            self.body_len(),
        );
        match self {
            Response::Pong(info) => {
                out.extend_from_slice(&info.node_id.to_le_bytes());
                out.extend_from_slice(&info.partitions.to_le_bytes());
                out.extend_from_slice(&info.shard.to_le_bytes());
                out.extend_from_slice(&(info.ports.len() as u16).to_le_bytes());
                for p in &info.ports {
                    out.extend_from_slice(&p.to_le_bytes());
                }
            }
            Response::Stats(s) => out.extend_from_slice(s.as_bytes()),
            Response::Get { context, values } => {
                put_bytes32(out, context);
                out.extend_from_slice(&(values.len() as u16).to_le_bytes());
                for v in values {
                    put_bytes32(out, v);
                }
            }
            Response::Put { context, siblings } => {
                put_bytes32(out, context);
                out.extend_from_slice(&siblings.to_le_bytes());
            }
            Response::Delete { context } => put_bytes32(out, context),
            Response::ReplicaGet { set } => {
                out.push(set.is_some() as u8);
                let (meta, value) = set.unwrap_or((&[], &[]));
                put_bytes32(out, meta);
                put_bytes32(out, value);
            }
            Response::ReplicaPut => {}
            Response::Auth { proof } => out.extend_from_slice(proof),
            Response::Hello { challenge } => {
                if let Some(c) = challenge {
                    out.extend_from_slice(c);
                }
            }
            Response::Ring { n, r, w, ring } => {
                out.extend_from_slice(&[*n, *r, *w]);
                out.extend_from_slice(ring);
            }
            Response::Error { code, message } => {
                out.extend_from_slice(&code.to_u16().to_le_bytes());
                put_bytes16(out, error_message(message).as_bytes());
            }
        }
    }

    /// Decodes a reply body for `opcode`.
    pub fn decode(opcode: u8, body: &[u8]) -> Result<Response<'_>, WireError> {
        let mut r = Reader::new(body);
        let resp = match opcode {
            o if o == op::PING | REPLY_BIT => {
                let node_id = r.u64("PONG")?;
                let partitions = r.u32("PONG")?;
                let shard = r.u16("PONG")?;
                let n = r.u16("PONG")? as usize;
                let raw = r.take(2 * n, "PONG ports")?;
                let ports = raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                Response::Pong(NodeInfo { node_id, partitions, shard, ports })
            }
            o if o == op::STATS | REPLY_BIT => {
                Response::Stats(std::str::from_utf8(r.rest()).map_err(|_| malformed("STATS text"))?)
            }
            o if o == op::GET | REPLY_BIT => {
                let context = r.bytes32("GET context")?;
                let n = r.u16("GET value count")? as usize;
                if n > MAX_REPLY_VALUES {
                    return Err(malformed("GET value count"));
                }
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    values.push(r.bytes32("GET value")?);
                }
                Response::Get { context, values }
            }
            o if o == op::PUT | REPLY_BIT => {
                Response::Put { context: r.bytes32("PUT context")?, siblings: r.u16("PUT siblings")? }
            }
            o if o == op::DELETE | REPLY_BIT => Response::Delete { context: r.bytes32("DELETE context")? },
            o if o == op::REPLICA_GET | REPLY_BIT => {
                let found = r.u8("REPLICA_GET found")?;
                let meta = r.bytes32("REPLICA_GET meta")?;
                let value = r.bytes32("REPLICA_GET value")?;
                match found {
                    1 => Response::ReplicaGet { set: Some((meta, value)) },
                    0 if meta.is_empty() && value.is_empty() => Response::ReplicaGet { set: None },
                    _ => return Err(malformed("REPLICA_GET found flag")),
                }
            }
            o if o == op::REPLICA_PUT | REPLY_BIT => Response::ReplicaPut,
            o if o == op::HELLO | REPLY_BIT => match r.rest() {
                [] => Response::Hello { challenge: None },
                c => Response::Hello { challenge: Some(c.try_into().map_err(|_| malformed("HELLO challenge"))?) },
            },
            o if o == op::AUTH | REPLY_BIT => Response::Auth { proof: r.array("AUTH reply proof")? },
            o if o == op::RING | REPLY_BIT => {
                let [n, rq, w] = r.array("RING quorum")?;
                Response::Ring { n, r: rq, w, ring: r.rest() }
            }
            op::ERROR => {
                let code = ErrorCode::from_u16(r.u16("ERROR code")?);
                let msg = r.bytes16("ERROR message")?;
                if msg.len() > MAX_ERROR_MESSAGE {
                    return Err(malformed("ERROR message length"));
                }
                Response::Error { code, message: std::str::from_utf8(msg).map_err(|_| malformed("ERROR text"))? }
            }
            other => return Err(WireError::UnknownOpcode(other)),
        };
        r.finish("reply body")?;
        Ok(resp)
    }
}

/// `message` cut to [`MAX_ERROR_MESSAGE`] bytes at a character boundary.
fn error_message(message: &str) -> &str {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Key, middle (context or meta) and value of a PUT-shaped body.
type PutFields<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// Bounds-checked little-endian reader over a body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        self.array_ref(what).copied()
    }

    fn array_ref<const N: usize>(&mut self, what: &'static str) -> Result<&'a [u8; N], WireError> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn bytes16(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }

    fn bytes32(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    /// `u16 key_len, u32 mid_len, u32 value_len, key, mid, value` (PUT's
    /// context or REPLICA_PUT's meta in the middle, checked by `check_mid`).
    fn put_body(
        &mut self,
        what: &'static str,
        check_mid: impl Fn(usize) -> Result<(), WireError>,
    ) -> Result<PutFields<'a>, WireError> {
        let key_len = self.u16(what)? as usize;
        let mid_len = self.u32(what)? as usize;
        let value_len = self.u32(what)? as usize;
        check_key_len(key_len)?;
        check_mid(mid_len)?;
        Ok((self.take(key_len, what)?, self.take(mid_len, what)?, self.take(value_len, what)?))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(what))
        }
    }
}

/// The checks the decoder must pass on any input, shared by the cargo-fuzz
/// target (`fuzz/`) and the property tests (`tests/wire_fuzz.rs`): frames
/// are split off `data` one by one; every request that decodes re-encodes
/// to exactly its bytes, every reply to its length. Panics on a violation.
#[doc(hidden)]
pub fn check_decoder(data: &[u8]) {
    let mut at = 0;
    while let Ok(Some((header, total))) = split_frame(&data[at..], MAX_BODY_LEN) {
        let body = &data[at + HEADER_LEN..at + total];
        if let Ok((req, quorum)) = Request::decode_with(&header, body) {
            let mut out = Vec::new();
            req.encode_with(&mut out, header.request_id, header.shard, header.deadline_us, quorum);
            assert_eq!(&out[..], &data[at..at + total], "a request re-encodes to its bytes");
        }
        if let Ok(resp) = Response::decode(header.opcode, body) {
            let mut out = Vec::new();
            resp.encode_flagged(&mut out, header.request_id, header.shard, header.flags & flags::REPLY_MASK);
            assert_eq!(out.len(), total, "a reply re-encodes to its length");
        }
        at += total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(req: &Request<'_>, id: u64) -> Vec<u8> {
        let mut out = Vec::new();
        req.encode(&mut out, id, ANY_SHARD, 0);
        out
    }

    #[test]
    fn a_whole_reply_frame_decodes_and_a_cut_one_does_not() {
        let mut out = Vec::new();
        Response::Error { code: ErrorCode::RingMismatch, message: "m" }.encode(&mut out, 3, 0);
        let decoded = decode_reply_frame(&out);
        assert_eq!(decoded, Ok(Response::Error { code: ErrorCode::RingMismatch, message: "m" }));
        assert!(decode_reply_frame(&out[..out.len() - 1]).is_err());
    }

    #[test]
    fn golden_get_request() {
        let bytes = frame_of(&Request::Get { key: b"k1" }, 7);
        #[rustfmt::skip]
        let expected = [
            b'G', b'Y', 1, 0x10, 0, 0, 0xFF, 0xFF,
            7, 0, 0, 0, 0, 0, 0, 0,
            4, 0, 0, 0, 0, 0, 0, 0,
            2, 0, b'k', b'1',
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn golden_put_request() {
        let mut out = Vec::new();
        Request::Put { key: b"a", context: &[1, 0], value: b"xyz" }.encode(&mut out, 0x0102, 3, 1500);
        #[rustfmt::skip]
        let expected = [
            b'G', b'Y', 1, 0x11, 0, 0, 3, 0,
            0x02, 0x01, 0, 0, 0, 0, 0, 0,
            16, 0, 0, 0, 0xDC, 0x05, 0, 0,
            1, 0, 2, 0, 0, 0, 3, 0, 0, 0,
            b'a', 1, 0, b'x', b'y', b'z',
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn golden_get_reply_and_error() {
        let mut out = Vec::new();
        Response::Get { context: &[9], values: vec![b"v", b""] }.encode(&mut out, 5, 1);
        #[rustfmt::skip]
        let expected = [
            b'G', b'Y', 1, 0x90, 0, 0, 1, 0,
            5, 0, 0, 0, 0, 0, 0, 0,
            16, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 0, 0, 9, 2, 0, 1, 0, 0, 0, b'v', 0, 0, 0, 0,
        ];
        assert_eq!(out, expected);
        let mut out = Vec::new();
        Response::Error { code: ErrorCode::InvalidKey, message: "no" }.encode(&mut out, 1, 0);
        assert_eq!(&out[HEADER_LEN..], &[5, 0, 2, 0, b'n', b'o']);
        assert_eq!(out[3], 0xFF);
    }

    #[test]
    fn requests_roundtrip() {
        let reqs = [
            Request::Ping,
            Request::Stats,
            Request::Get { key: b"key" },
            Request::Put { key: b"key", context: b"ctx", value: &[0u8; 300] },
            Request::Put { key: b"k", context: b"", value: b"" },
            Request::Delete { key: b"key", context: b"c" },
            Request::ReplicaGet { key: b"key" },
            Request::ReplicaPut { key: b"key", meta: b"m", value: b"vv" },
            Request::Hello { member: b"n1" },
            Request::Auth { nonce: &[6; CHALLENGE_LEN], proof: &[7; PROOF_LEN] },
            Request::Ring,
        ];
        let mut stream = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            r.encode(&mut stream, i as u64, ANY_SHARD, 0);
        }
        let mut at = 0;
        for (i, r) in reqs.iter().enumerate() {
            let (h, total) = split_frame(&stream[at..], MAX_BODY_LEN).unwrap().unwrap();
            assert_eq!(h.request_id, i as u64);
            let decoded = Request::decode(h.opcode, &stream[at + HEADER_LEN..at + total]).unwrap();
            assert_eq!(&decoded, r);
            at += total;
        }
        assert_eq!(at, stream.len());
    }

    #[test]
    fn responses_roundtrip() {
        let info = NodeInfo { node_id: 42, partitions: 1024, shard: 1, ports: vec![7700, 7701] };
        let resps = [
            Response::Pong(info),
            Response::Stats("{\"a\":1}"),
            Response::Get { context: b"c", values: vec![b"one", b"two"] },
            Response::Put { context: b"p", siblings: 2 },
            Response::Delete { context: b"" },
            Response::ReplicaGet { set: None },
            Response::ReplicaGet { set: Some((b"m", b"")) },
            Response::ReplicaPut,
            Response::Hello { challenge: None },
            Response::Hello { challenge: Some([3; CHALLENGE_LEN]) },
            Response::Auth { proof: [5; PROOF_LEN] },
            Response::Ring { n: 3, r: 2, w: 1, ring: b"ring" },
            Response::Error { code: ErrorCode::QuorumFailed, message: "1 of 3" },
            Response::Error { code: ErrorCode::Other(999), message: "later" },
        ];
        for r in &resps {
            let mut out = Vec::new();
            r.encode(&mut out, 9, 0);
            let (h, total) = split_frame(&out, MAX_BODY_LEN).unwrap().unwrap();
            assert_eq!(total, out.len());
            assert_eq!(&Response::decode(h.opcode, &out[HEADER_LEN..]).unwrap(), r);
        }
    }

    #[test]
    fn header_rejections() {
        let good = frame_of(&Request::Ping, 1);
        let hdr = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            decode_header(b[..HEADER_LEN].try_into().unwrap(), MAX_BODY_LEN)
        };
        assert!(matches!(hdr(&|b| b[0] = b'X'), Err(WireError::BadMagic(_))));
        assert_eq!(hdr(&|b| b[2] = 2), Err(WireError::UnsupportedVersion(2)));
        assert_eq!(hdr(&|b| b[4] = 2), Err(WireError::UnknownFlags(2)));
        // SEALED only on a sealed connection (found by a read-through: in
        // the shared masks, a client's frame with it was served, and did
        // not re-encode to its bytes).
        let mut sealed = good.clone();
        sealed[5] |= (flags::SEALED >> 8) as u8;
        assert_eq!(split_frame(&sealed, MAX_BODY_LEN), Err(WireError::UnknownFlags(flags::SEALED)));
        let (h, total) = split_sealed_frame(&sealed).unwrap().unwrap();
        assert_eq!((h.flags, total), (flags::SEALED, sealed.len()));
        assert_eq!(h.opened().flags, 0, "opened: the flag cleared");
        let too_big = hdr(&|b| b[16..20].copy_from_slice(&u32::MAX.to_le_bytes()));
        assert!(matches!(too_big, Err(WireError::FrameTooLarge { .. })));
        // The receiver's own limit applies before the global one.
        let mut b = good.clone();
        b[16..20].copy_from_slice(&100u32.to_le_bytes());
        let h: &[u8; HEADER_LEN] = b[..HEADER_LEN].try_into().unwrap();
        assert_eq!(decode_header(h, 99), Err(WireError::FrameTooLarge { len: 100, max: 99 }));
        assert_eq!(peek_request_id(h), Some(1));
        assert_eq!(split_frame(&good[..10], MAX_BODY_LEN), Ok(None));
    }

    #[test]
    fn body_rejections() {
        assert_eq!(Request::decode(0x24, &[]), Err(WireError::UnknownOpcode(0x24)));
        assert_eq!(Request::decode(op::GET, &[0, 0]), Err(WireError::KeyLength(0)));
        assert!(matches!(Request::decode(op::GET, &[5, 0, b'a']), Err(WireError::Malformed { .. })));
        assert!(matches!(Request::decode(op::PING, &[1]), Err(WireError::Malformed { .. })));
        let mut put = Vec::new();
        put.extend_from_slice(&1u16.to_le_bytes());
        put.extend_from_slice(&(MAX_CONTEXT_LEN as u32 + 1).to_le_bytes());
        put.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(Request::decode(op::PUT, &put), Err(WireError::ContextLength(MAX_CONTEXT_LEN + 1)));
        // A value length beyond the body is malformed, not an allocation.
        let mut put = Vec::new();
        put.extend_from_slice(&1u16.to_le_bytes());
        put.extend_from_slice(&0u32.to_le_bytes());
        put.extend_from_slice(&u32::MAX.to_le_bytes());
        put.push(b'k');
        assert!(matches!(Request::decode(op::PUT, &put), Err(WireError::Malformed { .. })));
        let mut long = vec![0u8; 2];
        long[..2].copy_from_slice(&((MAX_KEY_LEN + 1) as u16).to_le_bytes());
        long.resize(2 + MAX_KEY_LEN + 1, b'k');
        assert_eq!(Request::decode(op::GET, &long), Err(WireError::KeyLength(MAX_KEY_LEN + 1)));
    }

    #[test]
    fn golden_quorum_flag_and_replica_frames() {
        let mut out = Vec::new();
        Request::Get { key: b"k" }.encode_with(&mut out, 1, 0, 0, Quorum { r: 1, w: 0 });
        #[rustfmt::skip]
        let expected = [
            b'G', b'Y', 1, 0x10, 1, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0,
            5, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 1, 0, b'k',
        ];
        assert_eq!(out, expected);
        let (h, _) = split_frame(&out, MAX_BODY_LEN).unwrap().unwrap();
        let (req, q) = Request::decode_with(&h, &out[HEADER_LEN..]).unwrap();
        assert_eq!((req, q), (Request::Get { key: b"k" }, Quorum { r: 1, w: 0 }));
        // Default overrides send no flag; PING never carries one.
        let mut plain = Vec::new();
        Request::Ping.encode_with(&mut plain, 1, 0, 0, Quorum { r: 2, w: 2 });
        assert_eq!(&plain[4..6], &[0, 0]);
        // A QUORUM flag on PING, or with nothing overridden, is malformed.
        let mut bad = plain.clone();
        bad[4] = 1;
        bad[16] = 2;
        bad.extend_from_slice(&[1, 1]);
        let (h, _) = split_frame(&bad, MAX_BODY_LEN).unwrap().unwrap();
        assert!(matches!(Request::decode_with(&h, &bad[HEADER_LEN..]), Err(WireError::Malformed { .. })));

        let mut out = Vec::new();
        Request::ReplicaPut { key: b"k", meta: &[1, 2], value: b"v" }.encode(&mut out, 2, 1, 0);
        #[rustfmt::skip]
        let expected = [
            b'G', b'Y', 1, 0x21, 0, 0, 1, 0,
            2, 0, 0, 0, 0, 0, 0, 0,
            14, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 2, 0, 0, 0, 1, 0, 0, 0, b'k', 1, 2, b'v',
        ];
        assert_eq!(out, expected);
        let mut out = Vec::new();
        Response::ReplicaGet { set: Some((&[7], b"ab")) }.encode_flagged(&mut out, 3, 0, flags::STALE_ROUTE);
        assert_eq!(&out[3..6], &[0xA0, 1, 0]);
        assert_eq!(&out[HEADER_LEN..], &[1, 1, 0, 0, 0, 7, 2, 0, 0, 0, b'a', b'b']);
        let mut out = Vec::new();
        Response::Ring { n: 3, r: 2, w: 2, ring: &[9, 9] }.encode(&mut out, 4, 0);
        assert_eq!(&out[HEADER_LEN..], &[3, 2, 2, 9, 9]);
        // Not found is both lengths zero; anything else is malformed.
        assert_eq!(Response::decode(0xA0, &[0, 0, 0, 0, 0, 0, 0, 0, 0]), Ok(Response::ReplicaGet { set: None }));
        assert!(Response::decode(0xA0, &[2, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Response::decode(0xA0, &[0, 1, 0, 0, 0, 5, 0, 0, 0, 0]).is_err());
        // HELLO: a member's name, 1 to MAX_NAME_LEN bytes; its reply is empty.
        let mut out = Vec::new();
        Request::Hello { member: b"n1" }.encode(&mut out, 1, 0, 0);
        #[rustfmt::skip]
        let expected = [
            b'G', b'Y', 1, 0x22, 0, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0,
            4, 0, 0, 0, 0, 0, 0, 0,
            2, 0, b'n', b'1',
        ];
        assert_eq!(out, expected);
        let mut out = Vec::new();
        Response::Hello { challenge: None }.encode(&mut out, 1, 0);
        assert_eq!((out[3], out.len()), (0xA2, HEADER_LEN));
        assert_eq!(Response::decode(0xA2, &[]), Ok(Response::Hello { challenge: None }));
        // With a cluster secret, the reply is the 16-byte challenge; the
        // AUTH that follows, a 16-byte nonce and a 32-byte proof; its reply,
        // a 32-byte proof.
        let challenge: [u8; CHALLENGE_LEN] = std::array::from_fn(|i| i as u8);
        let mut out = Vec::new();
        Response::Hello { challenge: Some(challenge) }.encode(&mut out, 1, 0);
        #[rustfmt::skip]
        let expected = [
            b'G', b'Y', 1, 0xA2, 0, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0,
            16, 0, 0, 0, 0, 0, 0, 0,
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
        ];
        assert_eq!(out, expected);
        assert_eq!(Response::decode(0xA2, &out[HEADER_LEN..]), Ok(Response::Hello { challenge: Some(challenge) }));
        assert!(Response::decode(0xA2, &out[HEADER_LEN..HEADER_LEN + 15]).is_err(), "a challenge cut short");
        let mut out = Vec::new();
        Request::Auth { nonce: &[0xCD; CHALLENGE_LEN], proof: &[0xAB; PROOF_LEN] }.encode(&mut out, 2, 0, 0);
        assert_eq!(
            &out[..HEADER_LEN],
            &[b'G', b'Y', 1, 0x23, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 48, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&out[HEADER_LEN..], [[0xCD; CHALLENGE_LEN].as_slice(), &[0xAB; PROOF_LEN]].concat());
        assert!(Request::decode(op::AUTH, &out[HEADER_LEN..out.len() - 1]).is_err(), "a proof cut short");
        assert!(Request::decode(op::AUTH, &[&out[HEADER_LEN..], &[0]].concat()).is_err(), "a trailing byte");
        let mut out = Vec::new();
        Response::Auth { proof: [0xEF; PROOF_LEN] }.encode(&mut out, 2, 0);
        assert_eq!((out[3], out.len()), (0xA3, HEADER_LEN + PROOF_LEN));
        assert_eq!(Response::decode(0xA3, &out[HEADER_LEN..]), Ok(Response::Auth { proof: [0xEF; PROOF_LEN] }));
        assert!(Response::decode(0xA3, &[]).is_err(), "an AUTH reply without its proof");
        assert_eq!(ErrorCode::from_u16(18), ErrorCode::Unauthenticated);
        assert_eq!(ErrorCode::Unauthenticated.to_u16(), 18);
        assert!(matches!(Request::decode(op::HELLO, &[0, 0]), Err(WireError::Malformed { .. })), "no name");
        let mut long = vec![65, 0];
        long.resize(2 + 65, b'x');
        assert!(matches!(Request::decode(op::HELLO, &long), Err(WireError::Malformed { .. })), "past MAX_NAME_LEN");
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        // "é" is 2 bytes: after the leading "a" the limit falls inside one.
        let msg = format!("a{}", "é".repeat(MAX_ERROR_MESSAGE));
        let mut out = Vec::new();
        Response::Error { code: ErrorCode::Internal, message: &msg }.encode(&mut out, 1, 0);
        let Response::Error { message, .. } = Response::decode(op::ERROR, &out[HEADER_LEN..]).unwrap() else {
            panic!("not an error")
        };
        assert_eq!(message.len(), MAX_ERROR_MESSAGE - 1);
    }

    #[test]
    fn a_frames_deadline_can_be_stamped_again() {
        let mut frame = Vec::new();
        Request::Get { key: b"k" }.encode(&mut frame, 9, 2, 5);
        let before = frame.clone();
        stamp_deadline(&mut frame, std::time::Duration::from_micros(70_000));
        assert_eq!(frame[20..24], 70_000u32.to_le_bytes(), "bytes 20..24, little-endian");
        assert_eq!((&frame[..20], &frame[24..]), (&before[..20], &before[24..]), "nothing else changes");
        let header: &[u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
        assert_eq!(decode_header(header, MAX_BODY_LEN).unwrap().deadline_us, 70_000);
        let mut short = frame[..HEADER_LEN - 1].to_vec();
        stamp_deadline(&mut short, std::time::Duration::from_micros(1));
        assert_eq!(short, frame[..HEADER_LEN - 1], "shorter than a header: untouched");
        // No deadline (a peer's HELLO): none is stamped on it.
        let mut hello = Vec::new();
        Request::Hello { member: b"n1" }.encode(&mut hello, 1, 0, 0);
        let unstamped = hello.clone();
        stamp_deadline(&mut hello, std::time::Duration::from_secs(2));
        assert_eq!(hello, unstamped);
    }
}
