//! The storage size limits of Gyre, named once, with their reasoning.
//! (Limits of one module's own format live with it: the wire's frame
//! limits in `wire`, sibling and clock limits in `core::version`, member
//! limits in `core::ring`, context and replica counter bounds in `store`,
//! a client connection's in `node::conn`, a peer connection's in
//! `node::peer`.)
//!
//! Invariant: no module but those writes a size limit as a literal; the
//! relations between limits (a record fits in a segment, a length fits in its
//! on-disk field) are checked at compile time at the bottom of this file, so
//! raising one limit cannot silently overflow another.

use crate::storage::format::RECORD_HEADER_LEN;

/// Alignment and granularity of every O_DIRECT write: the page size and the
/// logical block size of every disk we target. Writes are whole blocks at
/// block-aligned offsets; the last partial block of the log is rewritten.
pub const BLOCK_SIZE: usize = 4096;

/// Longest key. Keys live in memory for every stored object (the index keeps
/// them), so they must stay small; 2 KiB is DynamoDB's partition-key limit.
pub const MAX_KEY_LEN: usize = 2048;

/// Longest causal metadata blob (the encoded version vector of an object).
/// Versions are bounded by the versioning layer's pruning policy to far less;
/// this is the backstop that keeps a corrupt length from allocating.
pub const MAX_META_LEN: usize = 16 * 1024;

/// Default longest value: Dynamo targets objects under 1 MiB.
pub const DEFAULT_MAX_VALUE_LEN: usize = 1024 * 1024;

/// The configurable value limit can be raised up to this hard cap and no
/// further: one value is one in-memory buffer, one read and one frame.
pub const VALUE_LEN_HARD_CAP: usize = 8 * 1024 * 1024;

/// The largest record the log can ever hold.
pub const MAX_RECORD_LEN: usize = RECORD_HEADER_LEN + MAX_KEY_LEN + MAX_META_LEN + VALUE_LEN_HARD_CAP;

/// Segment offsets and record lengths are `u32` in the index (to keep an
/// index slot at 20 bytes: `storage::index`), so a segment can hold at most
/// 4 GiB - 1.
pub const MAX_SEGMENT_SIZE: u64 = u32::MAX as u64;

/// Default size at which the active segment is sealed: large enough that
/// sealing (truncate, fdatasync, hint file) is rare, small enough that
/// compaction of one segment is a bounded unit of background work.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;

/// Smallest segment the configuration accepts (tests use tiny ones to force
/// sealing and compaction constantly).
pub const MIN_SEGMENT_SIZE: u64 = BLOCK_SIZE as u64;

/// Buffered bytes that start a flush of the log under the `interval` and
/// `never` policies, between timer flushes: the shard's flusher task writes
/// them out (`Engine::flush_wanted`) while writers go on appending, up to
/// `FLUSH_BACKLOG_THRESHOLDS` of these. Bounds the memory and the data at
/// risk. (An engine driven without the flusher writes only at ticks, or
/// when a writer finds the backlog full.) No writer waits at one
/// threshold: the one that passed it used to lead the flush and wait 2-3 ms
/// for the disk, and a 64 KiB threshold then made a p99.9 of 2.7 ms
/// (perf/RESULTS.md, twelfth session).
pub const DEFAULT_FLUSH_THRESHOLD: usize = 1024 * 1024;

/// Appends under `interval` and `never` go on buffering up to this many
/// flush thresholds before a writer waits (and, if no flush is running,
/// leads one). A flush that seals a segment waits for an fdatasync that
/// took up to ~170 ms on this project's disk; at 100k buffered writes a
/// second (~15 MB/s) one threshold fills in ~70 ms, so waiting at one
/// threshold stalled every writer behind the seal. Eight bounds the
/// memory (8 MiB per shard by default) and the data at risk.
pub const FLUSH_BACKLOG_THRESHOLDS: usize = 8;

const _: () = assert!(MAX_KEY_LEN <= u16::MAX as usize, "key length is a u16 on disk");
const _: () = assert!(MAX_META_LEN <= u16::MAX as usize, "meta length is a u16 on disk");
const _: () = assert!(
    VALUE_LEN_HARD_CAP <= u32::MAX as usize,
    "value length is a u32 in formats 1 and 2 (a u24 in format 3: storage::format checks that)"
);
const _: () = assert!(DEFAULT_MAX_VALUE_LEN <= VALUE_LEN_HARD_CAP);
const _: () = assert!((MAX_RECORD_LEN as u64) < (1 << 31), "index keeps the record length in 31 bits");
const _: () = assert!((MAX_RECORD_LEN as u64) <= MAX_SEGMENT_SIZE, "a record must fit in a segment");
const _: () = assert!(DEFAULT_SEGMENT_SIZE >= MAX_RECORD_LEN as u64);
const _: () = assert!(DEFAULT_SEGMENT_SIZE <= MAX_SEGMENT_SIZE);
const _: () = assert!(DEFAULT_SEGMENT_SIZE.is_multiple_of(BLOCK_SIZE as u64));
const _: () = assert!(MIN_SEGMENT_SIZE.is_multiple_of(BLOCK_SIZE as u64));
const _: () = assert!(BLOCK_SIZE.is_power_of_two());
