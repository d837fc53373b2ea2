//! One shard's storage engine: the async driver that executes the log's
//! decisions against a [`Backend`].
//!
//! Owns: the shard's index, log writer, segment files, record cache and
//! counters, behind one `RefCell` (a shard is one thread; no borrow is held
//! across an `.await`). Invariants:
//! - a write is acknowledged only when its durability policy is met: under
//!   `always`, once a synced write (`O_DSYNC`) or an fdatasync covering its
//!   bytes returned `Ok`;
//! - after any write or sync error the engine is *failed*: every later write
//!   is refused with that error and nothing more is acknowledged; the one
//!   exception is a disk out of space before any sync failed
//!   ([`StorageError::DiskFull`]): the engine refuses new writes, keeps what
//!   it had buffered, and retries on its ticks (and once more at `close`,
//!   since a shutdown stops the ticker first) until the write goes
//!   through (nothing had reached the disk in a way a retry could not
//!   redo: a flush cut short is planned again from the same state);
//! - while the file system's free space, less what the shard has
//!   buffered, is under the disk reserve (`EngineConfig::disk_reserve_bytes`,
//!   [`low_space`]) new writes are refused ([`StorageError::DiskFull`], but
//!   tombstones while [`tombstone_fits`]) and compaction's copies are not:
//!   the reserve is compaction's room to reclaim space in; the free space
//!   is read again at each new segment, so the log cannot pass the
//!   reserve by more than the segment it just took;
//! - every record returned by `get` passed its checksum and names its key;
//! - a segment is deleted by compaction only after copies of all its live
//!   records are durable.
//!
//! Group commit is leader/follower and needs no background task: a writer
//! that needs its bytes on disk and finds no flush in progress becomes the
//! leader, writes everything buffered in one aligned write (synced as it
//! is made under `always`; followed by one fdatasync under `interval`'s
//! ticks), and wakes the others; the ones still not covered elect the
//! next leader. Any single-threaded executor can drive it. Under `never`
//! and `interval`, a buffer past the flush threshold is written by
//! whoever answers [`Engine::flush_wanted`] (the shell's flusher task);
//! without one, nothing is written until `FLUSH_BACKLOG_THRESHOLDS` are
//! buffered (or a tick), and then the writer that finds it so leads.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::rc::Rc;

use serde::Serialize;
use thiserror::Error;

use crate::core::partition::key_hash;
use crate::limits::FLUSH_BACKLOG_THRESHOLDS;
use crate::limits::MAX_KEY_LEN;
use crate::limits::MAX_META_LEN;
use crate::notify::Notify;
use crate::storage::backend::{write_file_in_pieces, Backend};
use crate::storage::cache::RecordCache;
use crate::storage::config::{EngineConfig, FsyncPolicy};
use crate::storage::format::{
    decode_header, decode_hint, decode_record, decode_record_with, format_file_contents, hint_file_name,
    parse_file_name, parse_format_file, replay_hint, segment_file_name, DecodeError, FileKind, FormatFileError,
    HintBuilder, HintStream, Kind, RecordRef, Seed, FORMAT_FILE, KIND_OFFSET, RECORD_HEADER_LEN,
    STORAGE_FORMAT_VERSION,
};
use crate::storage::index::{CacheTag, Loc, ShardIndex};
use crate::storage::log::{Appended, LogWriter, Pos};
use crate::storage::scan::{
    compaction_backlog, compaction_shares, low_space, may_drop_tombstone, pick_compaction, scan_segment,
    tombstone_fits, write_stall, Backlog, Corruption, Kept, LastSegment, SegmentScan, SegmentUsage,
    COMPACTION_SHARES_MAX, LOW_SPACE_COMPACTION_THRESHOLD,
};

/// Errors of the storage engine.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("I/O error during {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
        /// The step was a sync (made with `sync_err`): a failure there is
        /// never retried, not even for lack of space.
        sync: bool,
    },
    /// An earlier write or sync failed; the shard accepts no more writes.
    #[error("shard refuses writes after an earlier I/O error: {0}")]
    Failed(String),
    /// The disk is out of space: writes are refused until it has room
    /// again (the engine retries on its ticks). A write that got this
    /// error while it waited for its flush may still be written then.
    #[error("the disk is full ({0}); writes are refused until there is space again (a write taken before may still be written then)")]
    DiskFull(String),
    #[error("key length {0} is outside 1..={MAX_KEY_LEN}")]
    KeyLength(usize),
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("causal metadata of {0} bytes exceeds the limit of {MAX_META_LEN}")]
    MetaTooLarge(usize),
    #[error("corrupt record in segment {seg} at offset {off}: {reason}")]
    Corrupt { seg: u32, off: u64, reason: String },
    #[error("data directory has storage format {found}, this build reads formats 1 to {expected}")]
    FormatVersion { found: String, expected: u32 },
    /// The format file cannot be read as one, or its record seed is
    /// damaged: the directory is refused, never opened with a guess.
    #[error("the data directory's format file {FORMAT_FILE} is {0}; the directory is refused")]
    FormatFile(FormatFileError),
    #[error("invalid storage configuration: {0}")]
    Config(String),
    /// [`Engine::close`] has begun: what was taken before is being made
    /// durable, and nothing more is taken.
    #[error("the shard's storage is closing: it takes no more writes")]
    Closed,
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> StorageError {
    move |source| StorageError::Io { op, source, sync: false }
}

/// [`io_err`] for a step that makes written bytes durable (an fdatasync,
/// a directory sync). A failure there is never retried: after a failed
/// fdatasync the kernel may have dropped what it could not write, and a
/// second fdatasync can then succeed with the data gone. (Under `always`
/// writing the log is itself a sync, `O_DSYNC`, but reported with
/// `io_err`: its lack of space is refused before it reaches the device,
/// with `O_DIRECT` there is no page cache to lose, and the retry sends
/// every byte not yet acknowledged again with a fresh device flush. Its
/// other errors fail the engine.)
fn sync_err(op: &'static str) -> impl FnOnce(io::Error) -> StorageError {
    move |source| StorageError::Io { op, source, sync: true }
}

/// A shard directory's files, as an open sorts them by name. Recovery
/// (`Engine::open`) and `gyre check` share it.
#[derive(Debug, Default)]
pub struct ShardFiles<'a> {
    pub segs: BTreeSet<u32>,
    pub hints: BTreeSet<u32>,
    /// A filled spare segment (`SPARE_SEGMENT`) is there.
    pub spare: bool,
    /// Temporary files (`*.tmp`, a spare being filled included): an open
    /// removes them.
    pub temps: Vec<&'a str>,
}

impl<'a> ShardFiles<'a> {
    pub fn sort(names: &'a [String]) -> ShardFiles<'a> {
        let mut files = ShardFiles::default();
        for name in names {
            match parse_file_name(name) {
                Some(FileKind::Segment(id)) => {
                    files.segs.insert(id);
                }
                Some(FileKind::Hint(id)) => {
                    files.hints.insert(id);
                }
                None if name == SPARE_SEGMENT => files.spare = true,
                None if name.ends_with(".tmp") => files.temps.push(name),
                None => {}
            }
        }
        files
    }
}

/// A hint file whose segment is missing, as the error `Engine::open`
/// refuses the directory with (`gyre check` reports the same). Compaction
/// removes a segment's hint (durably) before the segment, so such a hint
/// means the segment was lost: starting would serve its keys as missing,
/// or as older values.
pub fn orphan_hint(segs: &BTreeSet<u32>, hints: &BTreeSet<u32>) -> Option<StorageError> {
    let &seg = hints.iter().find(|h| !segs.contains(h))?;
    Some(StorageError::Corrupt {
        seg,
        off: 0,
        reason: format!(
            "{} is missing but its hint file is there: its records are lost (restore the segment, or remove {} \
             to start without them)",
            segment_file_name(seg),
            hint_file_name(seg)
        ),
    })
}

impl StorageError {
    /// A disk out of space (or quota) at a step before any sync: the flush
    /// can be run again from the same state once there is room.
    fn is_out_of_space_before_sync(&self) -> bool {
        match self {
            StorageError::Io { source, sync, .. } => !sync && out_of_space(source),
            _ => false,
        }
    }
}

/// ENOSPC or EDQUOT, as the standard library names them.
fn out_of_space(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

/// A record read back: the verified bytes plus where its parts lie.
#[derive(Clone, Debug)]
pub struct Record {
    raw: Rc<[u8]>,
    /// Where it was read from: a write in between changes the key's
    /// location, which is how [`Engine::put_if_now`] detects it.
    loc: Loc,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub kind: Kind,
    key_len: usize,
    meta_len: usize,
}

impl Record {
    /// The record `raw` read from `loc` for `key`, checksum verified.
    fn decode(raw: Rc<[u8]>, loc: Loc, key: &[u8], seed: Seed) -> Result<Record, StorageError> {
        Record::decode_with(raw, loc, key, Some(seed))
    }

    /// [`Self::decode`] of the record cache's bytes, verified when they
    /// entered it (see [`crate::storage::format::decode_record_with`]).
    fn decode_cached(raw: Rc<[u8]>, loc: Loc, key: &[u8]) -> Result<Record, StorageError> {
        Record::decode_with(raw, loc, key, None)
    }

    /// `verify`: the seed to check the checksum against, `None` for bytes
    /// verified already.
    fn decode_with(raw: Rc<[u8]>, loc: Loc, key: &[u8], verify: Option<Seed>) -> Result<Record, StorageError> {
        let corrupt = |reason: String| StorageError::Corrupt { seg: loc.seg, off: loc.off as u64, reason };
        if raw.len() != loc.len as usize {
            return Err(corrupt(format!("short read: {} of {} bytes", raw.len(), loc.len)));
        }
        let r = decode_record_with(&raw, verify).map_err(|e| corrupt(e.to_string()))?;
        if r.key != key {
            return Err(corrupt("record belongs to another key".into()));
        }
        let (seq, timestamp_ms, kind, meta_len) = (r.seq, r.timestamp_ms, r.kind, r.meta.len());
        Ok(Record { raw, loc, seq, timestamp_ms, kind, key_len: key.len(), meta_len })
    }

    pub fn is_tombstone(&self) -> bool {
        self.kind == Kind::Tombstone
    }

    /// Names this stored record for a conditional write.
    pub fn id(&self) -> RecordId {
        RecordId::of(self.loc)
    }

    /// The opaque causal metadata stored with the record.
    pub fn meta(&self) -> &[u8] {
        let at = RECORD_HEADER_LEN + self.key_len;
        &self.raw[at..at + self.meta_len]
    }

    /// The value (empty for a tombstone).
    pub fn value(&self) -> &[u8] {
        &self.raw[RECORD_HEADER_LEN + self.key_len + self.meta_len..]
    }
}

/// The identity of one stored record (locations are never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordId {
    id: u64,
    /// Log position just past the record ([`Engine::settle_record`]); the
    /// same for every `RecordId` of one record, so equality is by `id`.
    end: Pos,
}

impl RecordId {
    fn of(loc: Loc) -> RecordId {
        RecordId { id: loc.id(), end: (loc.seg, loc.off as u64 + loc.len as u64) }
    }
}

/// The levels a lookup walks, each a cache miss on a shard whose records
/// do not fit in the CPU caches, and each found only through the one
/// before: the index's control bytes and slots, then the record cache's
/// entry the slot names, then the record's bytes. [`Engine::prefetch`]
/// fetches one level per call; a caller that runs the stages of several
/// lookups in turn (a stage of each, then the next stage of each) has the
/// misses of one lookup in flight while it works on the others, instead of
/// waiting for four in a row per lookup (`ShardIndex::find` was 16% of a
/// shard serving SETs, almost all of it those waits; perf/RESULTS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// The index's control bytes and the first slots the key probes.
    Slots,
    /// The cache entry named by the first slot whose hashbrown control tag
    /// (7 bits of the hash) matches: usually the key's, but unchecked.
    Entry,
    /// The first cache lines of that entry's record.
    Record,
}

impl Prefetch {
    /// Every stage, in the order each depends on the last.
    pub const STAGES: [Prefetch; 3] = [Prefetch::Slots, Prefetch::Entry, Prefetch::Record];
}

/// A write that is in the log buffer and visible to reads but may not yet
/// meet the durability policy: [`Engine::settle`] waits for that. Not
/// acknowledged until then.
#[must_use = "a write is not durable until it is settled"]
#[derive(Debug)]
pub struct PendingWrite {
    /// Log position just past the record.
    end: Pos,
    seq: u64,
    /// The buffer holds `FLUSH_BACKLOG_THRESHOLDS` flush thresholds: even
    /// `never` waits for the write to reach the disk (bounds the memory and
    /// the data at risk when flushes fall behind).
    over_limit: bool,
}

impl PendingWrite {
    /// Whether this write's record ends no later in the log than
    /// `other`'s: it is durable no later, under every policy.
    pub fn no_later_than(&self, other: &PendingWrite) -> bool {
        self.end <= other.end
    }

    /// A pending write whose record ends at `end`, for tests of what
    /// orders pending writes.
    #[cfg(test)]
    pub(crate) fn ending_at(end: Pos) -> PendingWrite {
        PendingWrite { end, seq: 0, over_limit: false }
    }
}

/// What opening a shard found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RecoveryReport {
    pub segments: usize,
    pub hints_used: usize,
    pub segments_scanned: usize,
    pub keys: usize,
    /// Bytes cut from the end of the last segment as a torn write.
    pub torn_tail_bytes: u64,
    /// Regions holding no valid record (reported, skipped).
    pub corruptions: Vec<Corruption>,
    /// Hint files that were rejected (their segments were scanned instead).
    pub hint_errors: Vec<String>,
    pub next_seq: u64,
}

impl RecoveryReport {
    /// Whether recovery lost records: damage it skipped, or a torn write it
    /// cut. The dots of lost records may live on in replicas and clients,
    /// so the node must make its next versions under a new actor.
    pub fn lost_records(&self) -> bool {
        !self.corruptions.is_empty() || self.torn_tail_bytes > 0
    }

    /// Counts the outcome of a hint's replay ([`replay_hint`]): used (its
    /// highest sequence number raises `max_seq`), or rejected with why.
    /// Whether it was used. Recovery and `gyre check` share it.
    pub fn take_hint(&mut self, replay: Result<u64, String>, max_seq: &mut u64) -> bool {
        match replay {
            Ok(seq) => {
                self.hints_used += 1;
                *max_seq = (*max_seq).max(seq);
                true
            }
            Err(why) => {
                self.hint_errors.push(why);
                false
            }
        }
    }
}

/// Counters of one engine.
#[derive(Debug, Default, Clone, Serialize)]
pub struct EngineStats {
    pub puts: u64,
    pub deletes: u64,
    pub gets: u64,
    pub get_not_found: u64,
    /// Conditional writes refused because the key changed since the read.
    pub write_conflicts: u64,
    pub reads_from_buffer: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Memory the record cache holds: its records and what holding each
    /// costs besides (counted against `EngineConfig::cache_bytes`).
    pub cache_bytes: usize,
    /// Aligned writes issued (one per group-commit batch).
    pub flushes: u64,
    pub fdatasyncs: u64,
    /// Writes durable as they were made (`always`: segments opened with
    /// `O_DSYNC`); each is a group commit with no fdatasync. Derived by
    /// [`Engine::stats`]: under `always` it is every flush.
    pub synced_writes: u64,
    pub bytes_written: u64,
    pub segments_sealed: u64,
    pub segments_compacted: u64,
    pub records_moved: u64,
    pub tombstones_dropped: u64,
    /// Times writes began to wait for compaction (`write_stall_backlog`).
    pub compaction_stalls: u64,
    /// Writes that waited for compaction before they were taken.
    pub compaction_stalled_writes: u64,
    /// Whether writes wait for compaction now.
    pub compaction_stalled: bool,
    /// The file system's free space when the engine last looked (at each
    /// new segment and on the compaction driver's looks); `None` before
    /// the first look, or if it could not be read.
    pub disk_free_bytes: Option<u64>,
    /// The free space under which writes are refused
    /// (`EngineConfig::disk_reserve_bytes`).
    pub disk_reserve_bytes: u64,
    /// Whether writes are refused now for lack of space (under the reserve).
    pub low_space: bool,
    /// Writes refused because the free space was under the reserve.
    pub low_space_refusals: u64,
    /// Times the disk ran low on space (under the reserve).
    pub low_space_episodes: u64,
    pub keys: usize,
    pub segments: usize,
    /// Segments compaction left in place because records in them could
    /// not be moved (damaged, or larger than this run's segment size):
    /// they hold their space until those keys are written again.
    pub segments_kept: usize,
    pub index_bytes: usize,
    pub disk_live_bytes: u64,
    pub disk_total_bytes: u64,
}

/// What the compaction driver's look found ([`Engine::handle_compaction_check`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactionCheck {
    /// How far compaction is behind ([`Engine::compaction_backlog`]).
    pub backlog: f64,
    /// Writes wait for compaction: the next pass is due now.
    pub stalled: bool,
    /// `EngineStats::compaction_stalls` so far.
    pub stalls: u64,
    /// The disk is low on space ([`low_space`]): writes are refused until
    /// compaction reclaims some.
    pub low_space: bool,
    /// While low on space: the garbage a pass would reclaim now (at the
    /// lower threshold it then has); a pass is due while there is some
    /// (deletes make it while writes are refused). 0 otherwise, and while
    /// compaction is stuck.
    pub low_reclaimable: u64,
    /// `EngineStats::low_space_episodes` so far.
    pub low_space_episodes: u64,
}

impl CompactionCheck {
    /// The CPU shares compaction's task queue should have now: as its
    /// backlog says ([`compaction_shares`]), and the most while the disk
    /// is low on space. Writes are refused then, and compaction alone can
    /// end that: on a disk too small for the backlog to grow, the least
    /// shares left the shard refusing writes for 6 s at a time
    /// (perf/RESULTS.md, eighteenth session).
    pub fn shares(&self) -> usize {
        if self.low_space {
            COMPACTION_SHARES_MAX
        } else {
            compaction_shares(self.backlog)
        }
    }
}

/// What one compaction pass did.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CompactionStats {
    pub segments_removed: u64,
    pub records_moved: u64,
    pub tombstones_dropped: u64,
    pub bytes_reclaimed: u64,
    pub corrupt_regions: u64,
}

/// The spare segment's file name (see [`Engine::prepare_spare`]) once it
/// is filled and synced: an open keeps it (a restart rewrites no zeros).
pub const SPARE_SEGMENT: &str = "spare-segment";
/// Its name while it is filled: a temporary file, so that an open removes
/// one a crash left half filled.
const SPARE_FILLING: &str = "spare-segment.tmp";

/// What [`Engine::lookup`] found.
enum Lookup<F> {
    /// Answered from memory: the verified record, or `None` (no such key).
    InMemory(Option<Record>),
    /// To be read from this segment file at `Loc`.
    OnDisk(Loc, F),
}

struct State<F> {
    writer: LogWriter,
    index: ShardIndex,
    usage: BTreeMap<u32, SegmentUsage>,
    files: HashMap<u32, F>,
    cache: RecordCache,
    /// A segment-sized file of written zeros (`SPARE_SEGMENT`), taken as
    /// the next segment (see `Engine::prepare_spare`).
    spare: Option<F>,
    /// `prepare_spare` is filling one.
    preparing_spare: bool,
    /// A leader is writing; others wait for `Notify`.
    flushing: bool,
    /// Everything before this position is written and durable (synced
    /// writes under `always`, an fdatasync otherwise).
    synced: Pos,
    /// Set by the first write or sync error; refuses all later writes.
    failed: Option<String>,
    /// Set when a flush ran out of space before any sync failed: new
    /// writes are refused, what is buffered stays, and `tick` retries.
    full: Option<String>,
    compacting: bool,
    /// Writes wait for compaction before they are taken ([`write_stall`]);
    /// [`Engine::wait_for_compaction`] waits on `caught_up`.
    stalled: bool,
    /// Something runs compaction passes for as long as they are due (the
    /// shell's loop, through [`Engine::handle_compaction_check`]). Only
    /// then may writes wait for compaction: an engine nobody compacts
    /// (tests, tools) would keep them waiting for good.
    compaction_driven: bool,
    /// The last pass failed: waiting for compaction could last for good.
    compaction_stuck: bool,
    /// Segments a pass could not empty (damaged records it cannot move),
    /// with their live bytes then: left out of passes and of the backlog
    /// (which they would otherwise hold up for good) until one of their
    /// records is superseded. With these left out, a pass that does not
    /// fail brings the backlog down: each victim is removed or kept.
    kept: Kept,
    /// The file system's free space is under the disk reserve
    /// ([`low_space`]): new writes are refused, compaction's copies are
    /// not, and compaction takes what it can (a lower threshold, one
    /// victim at a time) until the space is back.
    low_space: bool,
    /// Compaction's copies not written yet, by where they are (segment,
    /// offset), with where their record still is on disk: a failed or full
    /// engine shows no record it has not written (`lookup`), but a copy's
    /// record was written, and is read from there instead. Pruned as the
    /// log is written (`prune_moved`).
    moved: BTreeMap<(u32, u32), Loc>,
    /// [`Engine::begin_close`] (or `close`) has been called: new writes are
    /// refused, so that none is taken (and acknowledged, under a buffered
    /// policy) after the final sync's target is fixed; compaction passes end
    /// after their batch under way, and no spare is made.
    closing: bool,
    /// The free space the engine last found ([`Engine::refresh_free_space`];
    /// `None`: it could not be read): what `low_space` is decided from,
    /// less what is buffered, at every write ([`State::space_left`]).
    free_space: Option<u64>,
    stats: EngineStats,
}

impl<F> State<F> {
    /// The location of `key`'s latest record and the tag of its cached
    /// bytes, comparing keys against the cache where it can.
    fn find(&self, hash: u64, key: &[u8]) -> Option<(Loc, CacheTag)> {
        self.index.find(hash, key, |tag, loc| self.cache.key_of(tag, loc.id()))
    }

    /// Index and space accounting for a record just appended (its bytes
    /// cached under `tag`).
    fn account(&mut self, a: &Appended, hash: u64, key: &[u8], tag: CacheTag) {
        let cache = &self.cache;
        let old = self.index.insert_tagged(hash, key, a.loc, tag, |t, l| cache.key_of(t, l.id()));
        if let Some((old, old_tag)) = old {
            self.drop_live(old, old_tag);
        }
        self.count_appended(a);
    }

    /// Index and space accounting for compaction's copy `a` of the live
    /// record at `from`: the key moves to the copy, and so do its cached
    /// bytes (they are the same bytes), so a hot record stays cached.
    fn account_move(&mut self, a: &Appended, hash: u64, key: &[u8], from: Loc) {
        self.moved.insert((a.loc.seg, a.loc.off), from);
        let tag = self.index.relocate(hash, key, from, a.loc).expect("the caller checked the record is live");
        self.cache.rename(tag, from.id(), a.loc.id());
        self.usage.get_mut(&from.seg).expect("a live record's segment is accounted").live -= from.len as u64;
        self.count_appended(a);
    }

    /// Drops the entries of [`State::moved`] whose copy has begun to be
    /// written (one cut by the write's end is then refused as before).
    fn prune_moved(&mut self) {
        let (seg, off) = self.writer.written();
        let split = (seg, u32::try_from(off).unwrap_or(u32::MAX));
        self.moved = self.moved.split_off(&split);
    }

    fn count_appended(&mut self, a: &Appended) {
        let u = self.usage.entry(a.loc.seg).or_default();
        u.total += a.loc.len as u64;
        u.live += a.loc.len as u64;
        if a.sealed.is_some() {
            self.stats.segments_sealed += 1;
        }
    }

    /// The free space at the last look less what the log has buffered and
    /// not yet written, which may need new space (`None`: not known).
    fn space_left(&self) -> Option<u64> {
        self.free_space.map(|f| f.saturating_sub(self.writer.pending_bytes() as u64))
    }

    /// Starts or ends the low-space state from [`Self::space_left`] now
    /// ([`low_space`]); returns whether the disk is low. Not known: as it
    /// was.
    fn update_low_space(&mut self, config: &EngineConfig) -> bool {
        let Some(free) = self.space_left() else { return self.low_space };
        let reserve = config.disk_reserve();
        let low = low_space(self.low_space, free, reserve, config.segment_size);
        // At debug: under writes that outrun compaction on a small disk
        // this comes and goes every second or two; the shell reports it
        // at most every so often (`low_space_episodes`).
        if low != std::mem::replace(&mut self.low_space, low) {
            if low {
                self.stats.low_space_episodes += 1;
                tracing::debug!(free, reserve, "the disk is low on space: writes are refused");
            } else {
                tracing::debug!(free, reserve, "the disk has room again: writes are taken again");
            }
        }
        low
    }

    fn drop_live(&mut self, old: Loc, tag: CacheTag) {
        let u = self.usage.get_mut(&old.seg).expect("a live record's segment is accounted");
        u.live -= old.len as u64;
        // Superseded or dropped: its cache entry can never be read again.
        self.cache.forget(tag, old.id());
    }
}

struct Inner<B: Backend> {
    backend: B,
    config: EngineConfig,
    st: RefCell<State<B::File>>,
    /// The seed of this shard's record checksums, from its format file.
    seed: Seed,
    notify: Notify,
    /// Wakes the shell's background flusher ([`Engine::flush_wanted`]):
    /// under `interval` and `never` a write that fills the buffer past the
    /// flush threshold does not lead that flush and wait for it (one
    /// client in each threshold's worth used to wait for a whole write
    /// to reach the disk); it rings this and goes on.
    flush_wanted: Notify,
    /// Wakes the writes waiting for compaction when the stall ends.
    caught_up: Notify,
}

/// Clears the group-commit leader flag and wakes the followers when the
/// leader's flush ends, however it ends.
struct LeaderGuard<'a, B: Backend>(&'a Inner<B>);

impl<B: Backend> Drop for LeaderGuard<'_, B> {
    fn drop(&mut self) {
        self.0.st.borrow_mut().flushing = false;
        self.0.notify.notify_all();
        // Appends that passed the threshold during this flush found it
        // running and rang nobody: the flusher looks again.
        self.0.flush_wanted.notify_all();
    }
}

/// One shard's storage engine. Clones share the engine (one thread).
pub struct Engine<B: Backend> {
    inner: Rc<Inner<B>>,
}

impl<B: Backend> Clone for Engine<B> {
    fn clone(&self) -> Self {
        Engine { inner: self.inner.clone() }
    }
}

/// Clears a "background work in progress" flag of the state (`compacting`,
/// `preparing_spare`) however the work ends: returning, failing, or its
/// future dropped half way (a task cancelled at shutdown). A flag left set
/// would turn that work off for the rest of the engine's life.
struct ClearOnDrop<'a, F> {
    st: &'a RefCell<State<F>>,
    flag: fn(&mut State<F>) -> &mut bool,
}

impl<F> Drop for ClearOnDrop<'_, F> {
    fn drop(&mut self) {
        *(self.flag)(&mut self.st.borrow_mut()) = false;
    }
}

impl<B: Backend> Engine<B> {
    /// Opens a shard directory: checks its format, replays hint files or
    /// scans segments, cuts a torn tail, and reports what it found.
    pub async fn open(backend: B, config: EngineConfig) -> Result<(Engine<B>, RecoveryReport), StorageError> {
        config.validate().map_err(StorageError::Config)?;
        let names = backend.list().await.map_err(io_err("listing the data directory"))?;
        let ShardFiles { segs, hints, spare: spare_found, temps } = ShardFiles::sort(&names);
        // Refused before anything in the directory is touched.
        let seed = check_format(&backend, names.iter().any(|n| n == FORMAT_FILE), !segs.is_empty()).await?;
        if let Some(e) = orphan_hint(&segs, &hints) {
            return Err(e);
        }
        for name in temps {
            backend.remove(name).await.map_err(io_err("removing a temporary file"))?;
        }

        let mut report = RecoveryReport { segments: segs.len(), ..Default::default() };
        let mut index = ShardIndex::new(config.partitions);
        let mut usage: BTreeMap<u32, SegmentUsage> = BTreeMap::new();
        let mut files = HashMap::new();
        let mut max_seq = 0u64;
        let last = segs.last().copied();
        for &seg in &segs {
            let name = segment_file_name(seg);
            let file = open_segment(&backend, &config, &name, false).await.map_err(io_err("opening a segment"))?;
            let size = backend.size(&file).await.map_err(io_err("sizing a segment"))?;
            let is_last = Some(seg) == last;
            let mut total = 0u64;
            // A segment with a hint is never written again (a seal writes
            // it after its sync; recovery, after its cut, and the writer
            // goes on in a new segment), the last one included.
            let hinted = hints.contains(&seg) && {
                let read = backend.read_file(&hint_file_name(seg)).await;
                let replay = replay_hint(read.as_deref(), seg, size, |e| {
                    let loc = Loc { seg, off: e.off, len: e.len, tombstone: e.tombstone };
                    index.insert(key_hash(e.key), e.key, loc);
                    total += e.len as u64;
                });
                report.take_hint(replay, &mut max_seq)
            };
            if !hinted {
                report.segments_scanned += 1;
                total = 0;
                let data = backend.read_at(&file, 0, size as usize).await.map_err(io_err("reading a segment"))?;
                let mut hb = HintBuilder::default();
                let out = scan_segment(seg, data.as_ref(), !is_last, seed, |off, r| {
                    let len = r.encoded_len() as u32;
                    let tombstone = r.kind == Kind::Tombstone;
                    index.insert(key_hash(r.key), r.key, Loc { seg, off: off as u32, len, tombstone });
                    hb.push(off as u32, len, tombstone, r.key, r.seq);
                    total += len as u64;
                });
                max_seq = max_seq.max(hb.max_seq());
                report.corruptions.extend(out.corruptions.iter().cloned());
                let kept = if is_last {
                    report.torn_tail_bytes = out.torn_tail;
                    match out.last_segment() {
                        LastSegment::Remove => {
                            drop(file);
                            // Its hint (rejected, or it would not have been
                            // scanned) first: a hint without its segment is
                            // damage the next open refuses.
                            if hints.contains(&seg) {
                                remove_if_present(&backend, &hint_file_name(seg), "removing a rejected hint").await?;
                                backend.sync_dir().await.map_err(sync_err("syncing the directory"))?;
                            }
                            backend.remove(&name).await.map_err(io_err("removing an empty segment"))?;
                            backend.sync_dir().await.map_err(sync_err("syncing the directory"))?;
                            continue;
                        }
                        LastSegment::Keep { len } => {
                            if len != size {
                                backend.truncate(&file, len).await.map_err(io_err("truncating a torn tail"))?;
                            }
                            backend.sync(&file).await.map_err(sync_err("syncing a recovered segment"))?;
                            len
                        }
                    }
                } else {
                    size
                };
                // Seal the recovered segment (or repair its hint) so the next
                // open replays the hint instead of scanning. A damaged
                // segment gets one too, of the records that verified: the
                // damage is reported (and the node's actor renewed) by the
                // open that found it, and a scrub still finds it, but a
                // later open must not report it again as new loss (each
                // such report renews the actor, one more entry in the
                // version vectors of every key written afterwards). A
                // sealed segment keeps its size (`replay_hint` checks it),
                // damage at its end included; the last one was cut above.
                let hint = hb.into_stream(seg, kept);
                write_hint(&backend, seg, hint).await.map_err(io_err("writing a hint file"))?;
            }
            usage.insert(seg, SegmentUsage { total, live: 0 });
            files.insert(seg, file);
        }
        for (_, loc) in index.iter() {
            usage.get_mut(&loc.seg).expect("indexed segment exists").live += loc.len as u64;
        }
        index.shrink_to_fit();
        let first_seg = last.map_or(1, |l| l + 1);
        // A spare a previous run filled stays, if this configuration uses
        // one of its size; otherwise it would only hold disk space.
        let mut spare = None;
        if spare_found {
            // Through the policy's handle: it becomes a segment as it is.
            let f = open_segment(&backend, &config, SPARE_SEGMENT, false)
                .await
                .map_err(io_err("opening the spare segment"))?;
            let size = backend.size(&f).await.map_err(io_err("sizing the spare segment"))?;
            if config.keeps_spare_of(size) {
                spare = Some(f);
            } else {
                drop(f);
                backend.remove(SPARE_SEGMENT).await.map_err(io_err("removing an unused spare segment"))?;
            }
        }
        let writer = LogWriter::new(config.segment_size, seed, first_seg, max_seq + 1);
        report.keys = index.len();
        report.next_seq = writer.next_seq();
        let st = State {
            synced: writer.written(),
            writer,
            index,
            usage,
            files,
            cache: RecordCache::new(config.cache_bytes),
            spare,
            preparing_spare: false,
            flushing: false,
            failed: None,
            full: None,
            compacting: false,
            stalled: false,
            compaction_driven: false,
            compaction_stuck: false,
            kept: Kept::new(),
            low_space: false,
            closing: false,
            moved: BTreeMap::new(),
            free_space: None,
            stats: EngineStats::default(),
        };
        let inner = Inner {
            backend,
            config,
            st: RefCell::new(st),
            notify: Notify::default(),
            flush_wanted: Notify::default(),
            caught_up: Notify::default(),
            seed,
        };
        let engine = Engine { inner: Rc::new(inner) };
        // A shard opened on a disk already short of space refuses writes
        // from the first.
        engine.refresh_free_space();
        Ok((engine, report))
    }

    /// Makes a spare segment ready if there is none: a segment-sized file
    /// of zeros, written and synced ([`Backend::zero_fill`]), that the
    /// next segment takes by a rename. Appends into written blocks change
    /// no file metadata, so the sync of a durable write has no
    /// journal commit to wait for (a segment created when needed, with
    /// its size or blocks still to be set, makes every sync commit one:
    /// perf/RESULTS.md, eighth session). The cost: each segment's blocks
    /// are written twice (zeros, then records), ahead of time, and one
    /// segment of disk is held in reserve (and kept across restarts).
    /// Background work: the shell calls it as it starts and after each
    /// compaction pass. An error here fails no write (a part-filled spare
    /// is removed); the next segment is then created when needed.
    ///
    /// Does nothing unless [`EngineConfig::keeps_spare`].
    pub async fn prepare_spare(&self) -> Result<(), StorageError> {
        if !self.inner.config.keeps_spare() {
            return Ok(());
        }
        {
            let mut st = self.inner.st.borrow_mut();
            // Not while low on space: a spare would take a segment of the
            // reserve for writes that are refused; compaction's segments
            // are made as it needs them.
            if st.spare.is_some()
                || st.preparing_spare
                || st.failed.is_some()
                || st.full.is_some()
                || st.low_space
                || st.closing
            {
                return Ok(());
            }
            st.preparing_spare = true;
        }
        // Held to the end, the clean-up of a failed fill included: another
        // preparation must not start (and have its file removed) before.
        let _preparing = ClearOnDrop { st: &self.inner.st, flag: |st| &mut st.preparing_spare };
        let backend = &self.inner.backend;
        let made = async {
            let file = backend.open(SPARE_FILLING, true).await?;
            backend.zero_fill(&file, self.inner.config.segment_size).await?;
            // Filled and synced: from now on an open may keep it.
            backend.rename(SPARE_FILLING, SPARE_SEGMENT).await?;
            // Filled through a plain handle; written, once it is a
            // segment, through the policy's (`open_segment`). Opened here,
            // in the background, not by the flush that takes it.
            drop(file);
            open_segment(backend, &self.inner.config, SPARE_SEGMENT, false).await
        }
        .await;
        match made {
            Ok(file) => {
                self.inner.st.borrow_mut().spare = Some(file);
                // A segment's worth less room: writes stop before the
                // reserve is gone, not after.
                self.refresh_free_space();
                Ok(())
            }
            Err(e) => {
                // A part-filled spare would only hold disk space (the
                // likely error is a full disk) until the next open.
                let _ = backend.remove(SPARE_FILLING).await;
                Err(io_err("preparing a spare segment")(e))
            }
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    fn check(&self, key: &[u8], meta: &[u8], value: &[u8]) -> Result<(), StorageError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(StorageError::KeyLength(key.len()));
        }
        if meta.len() > MAX_META_LEN {
            return Err(StorageError::MetaTooLarge(meta.len()));
        }
        let max = self.inner.config.max_value_len;
        if value.len() > max {
            return Err(StorageError::ValueTooLarge { len: value.len(), max });
        }
        Ok(())
    }

    /// Stores `value` for `key` with its causal metadata; returns the
    /// record's sequence number once the durability policy is met.
    pub async fn put(&self, key: &[u8], meta: &[u8], value: &[u8], now_ms: u64) -> Result<u64, StorageError> {
        self.append(Kind::Value, key, meta, value, now_ms).await
    }

    /// Writes a tombstone for `key` carrying `meta`.
    pub async fn delete(&self, key: &[u8], meta: &[u8], now_ms: u64) -> Result<u64, StorageError> {
        self.append(Kind::Tombstone, key, meta, &[], now_ms).await
    }

    /// An unconditional write.
    async fn append(
        &self,
        kind: Kind,
        key: &[u8],
        meta: &[u8],
        value: &[u8],
        now_ms: u64,
    ) -> Result<u64, StorageError> {
        self.wait_for_compaction().await;
        let pending = self.write_now(kind, key, meta, value, now_ms, None)?;
        self.settle(pending.expect("an unconditional write always appends")).await
    }

    /// Appends a record of `kind` only if `key` still holds the record
    /// `expect` (`None`: the key is absent), as read by [`Engine::get`].
    /// The check and the append happen together, now, so a
    /// read-modify-write through this cannot lose an interleaved write.
    /// Returns `Ok(None)` if the key changed (read again and retry; a
    /// compaction that moved the record also counts), else the pending
    /// write, which is acknowledged only once [`Engine::settle`] returns.
    /// A caller can free what it encoded the record from in between: under
    /// `fsync = always` a shard holds every waiting write's buffers until
    /// the group commit, and dozens of each size outran glibc's per-size
    /// cache (perf/RESULTS.md, "Durable writes and the allocator").
    pub fn put_if_now(
        &self,
        kind: Kind,
        key: &[u8],
        meta: &[u8],
        value: &[u8],
        now_ms: u64,
        expect: Option<RecordId>,
    ) -> Result<Option<PendingWrite>, StorageError> {
        self.write_now(kind, key, meta, value, now_ms, Some(expect))
    }

    /// Waits until the write `pending` names meets the durability policy;
    /// returns its sequence number.
    pub async fn settle(&self, pending: PendingWrite) -> Result<u64, StorageError> {
        match self.settle_now(pending) {
            Ok(seq) => Ok(seq),
            Err(PendingWrite { end, seq, .. }) => {
                self.wait_until(end, self.inner.config.synced_writes()).await?;
                Ok(seq)
            }
        }
    }

    /// Waits until the record `id` names meets the durability policy, as a
    /// write of it must before it is acknowledged: for one read, not
    /// written, by a caller that acknowledges what it read as stored (a
    /// replica sent a version it already holds). A write is readable
    /// before its group commit; acknowledged then, it could be lost to a
    /// power cut (found by a review: a replica acknowledged a version it
    /// had taken from a read repair moments before, and the coordinator
    /// counted it toward W). A buffered policy acknowledges before the
    /// disk anyway: returns at once.
    pub async fn settle_record(&self, id: RecordId) -> Result<(), StorageError> {
        if let Some(pending) = self.unsettled_read(id) {
            self.settle(pending).await?;
        }
        Ok(())
    }

    /// [`Self::get`], once the record it found meets the durability
    /// policy ([`Self::settle_record`]): what a read may show a client or
    /// another replica. One place, so that no read path forgets the wait
    /// (found by a review: a replica's read had).
    pub async fn get_settled(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        let rec = self.get(key).await?;
        if let Some(rec) = &rec {
            self.settle_record(rec.id()).await?;
        }
        Ok(rec)
    }

    /// What a read of record `id` must wait for before its value is shown:
    /// under a durable policy, a record past the last group commit (`None`:
    /// show it now). A write is readable before its group commit; a read
    /// that showed it at once could show a value that a power cut then
    /// loses, or whose commit fails (found by a review). Settled as a
    /// write's ([`Self::settle`], [`Self::settle_now`]); its sequence number
    /// is 0, a read's. [`Self::settle_record`] is the same wait as one
    /// future.
    pub fn unsettled_read(&self, id: RecordId) -> Option<PendingWrite> {
        let waits = self.inner.config.synced_writes() && self.inner.st.borrow().synced < id.end;
        waits.then_some(PendingWrite { end: id.end, seq: 0, over_limit: false })
    }

    /// Completes once writes no longer wait for compaction (at once if
    /// they do not): every write waits here before it is taken
    /// ([`Engine::put`] and [`Engine::delete`] do; a caller of
    /// [`Engine::put_if_now`] does it first, as `Store` does).
    pub async fn wait_for_compaction(&self) {
        let mut counted = false;
        loop {
            let seen = self.inner.caught_up.generation();
            {
                let mut st = self.inner.st.borrow_mut();
                if !st.stalled {
                    return;
                }
                if !std::mem::replace(&mut counted, true) {
                    st.stats.compaction_stalled_writes += 1;
                }
            }
            self.inner.caught_up.wait(seen).await;
        }
    }

    /// The highest sequence number this shard has given a record (0 before
    /// its first). It never goes back, across clean restarts too: the
    /// record that has it is never dropped by compaction
    /// ([`may_drop_tombstone`]), so recovery finds it again. (After a crash
    /// it can go back to the last durable record; the node then writes
    /// under a new actor.)
    pub fn last_seq(&self) -> u64 {
        self.inner.st.borrow().writer.next_seq() - 1
    }

    /// Whether writes wait for compaction now ([`Self::wait_for_compaction`]).
    pub fn write_stalled(&self) -> bool {
        self.inner.st.borrow().stalled
    }

    /// [`Self::settle`] without waiting: the write's sequence number if it
    /// meets the durability policy already (a buffered write under `never`
    /// or `interval` whose buffer is below the backlog limit, or a write
    /// already synced), or the write back if it has to wait.
    pub fn settle_now(&self, pending: PendingWrite) -> Result<u64, PendingWrite> {
        let waits = match self.inner.config.fsync {
            FsyncPolicy::Always => self.inner.st.borrow().synced < pending.end,
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => pending.over_limit,
        };
        if waits {
            Err(pending)
        } else {
            Ok(pending.seq)
        }
    }

    fn write_now(
        &self,
        kind: Kind,
        key: &[u8],
        meta: &[u8],
        value: &[u8],
        now_ms: u64,
        expect: Option<Option<RecordId>>,
    ) -> Result<Option<PendingWrite>, StorageError> {
        if kind == Kind::Tombstone && !value.is_empty() {
            return Err(StorageError::Config("a tombstone carries no value".into()));
        }
        self.check(key, meta, value)?;
        let hash = key_hash(key);
        let ring;
        let (end, seq, over_limit) = {
            let mut st = self.inner.st.borrow_mut();
            if st.closing {
                return Err(StorageError::Closed);
            }
            if let Some(e) = &st.failed {
                return Err(StorageError::Failed(e.clone()));
            }
            if let Some(e) = &st.full {
                return Err(StorageError::DiskFull(e.clone()));
            }
            // What it has buffered counts against the space at the last
            // look: writes taken between two looks cannot pass the
            // reserve, however many arrive while a flush is under way.
            if st.update_low_space(&self.inner.config) && !self.may_use_reserve(kind, st.space_left()) {
                st.stats.low_space_refusals += 1;
                return Err(self.low_space_error(&st));
            }
            if let Some(expect) = expect {
                if st.find(hash, key).map(|(l, _)| RecordId::of(l)) != expect {
                    st.stats.write_conflicts += 1;
                    return Ok(None);
                }
            }
            let a = st.writer.append(now_ms, kind, key, meta, value);
            // Write-through: with O_DIRECT there is no page cache, so a
            // record just written would otherwise be read back from disk
            // once its buffer is flushed. Keep it (within the budget).
            let mut tag = CacheTag::NONE;
            if st.cache.admits(a.loc.len as usize) {
                if let Some(raw) = st.writer.read_buffered(a.loc).map(Rc::<[u8]>::from) {
                    // Cache hits skip the checksum: check the pair here.
                    debug_assert!(
                        decode_record(&raw, self.inner.seed).is_ok_and(|r| r.key == key),
                        "the cache gets a verified record"
                    );
                    tag = st.cache.insert(a.loc.id(), raw);
                }
            }
            st.account(&a, hash, key, tag);
            match kind {
                Kind::Value => st.stats.puts += 1,
                Kind::Tombstone => st.stats.deletes += 1,
            }
            // Past one threshold the background flusher writes the buffer
            // out; appends pile up behind it (bounded) rather than wait for
            // the disk, whether or not it has started yet.
            let (pending, threshold) = (st.writer.pending_bytes(), self.inner.config.flush_threshold);
            ring = pending >= threshold && !st.flushing && !self.inner.config.synced_writes();
            (a.end(), a.seq, pending >= threshold * FLUSH_BACKLOG_THRESHOLDS)
        };
        if ring {
            self.inner.flush_wanted.notify_all();
        }
        Ok(Some(PendingWrite { end, seq, over_limit }))
    }

    /// Whether a write of `kind` is taken while the disk is low on space
    /// (`left`: [`State::space_left`]): a tombstone, while
    /// [`tombstone_fits`].
    fn may_use_reserve(&self, kind: Kind, left: Option<u64>) -> bool {
        let config = &self.inner.config;
        kind == Kind::Tombstone && left.is_some_and(|f| tombstone_fits(f, config.disk_reserve(), config.segment_size))
    }

    /// The refusal of a write while the disk is low on space.
    #[cold]
    fn low_space_error(&self, st: &State<B::File>) -> StorageError {
        let free = st.free_space.map_or_else(|| "unknown".to_string(), |f| format!("{f} bytes"));
        StorageError::DiskFull(format!(
            "{free} free on the data directory's file system, under the {}-byte reserve kept for compaction",
            self.inner.config.disk_reserve()
        ))
    }

    /// Waits until `target` is written (and synced if `sync`), leading
    /// flushes while nobody else is.
    async fn wait_until(&self, target: Pos, sync: bool) -> Result<(), StorageError> {
        loop {
            let seen = self.inner.notify.generation();
            let lead = {
                let mut st = self.inner.st.borrow_mut();
                let reached = if sync { st.synced } else { st.writer.written() };
                if reached >= target {
                    return Ok(());
                }
                if let Some(e) = &st.failed {
                    return Err(StorageError::Failed(e.clone()));
                }
                // Only `tick` retries a flush that ran out of space: a
                // writer waiting meanwhile hears why it is not durable.
                if let Some(e) = &st.full {
                    return Err(StorageError::DiskFull(e.clone()));
                }
                !std::mem::replace(&mut st.flushing, true)
            };
            if lead {
                self.lead_flush(target, sync).await?;
            } else {
                self.inner.notify.wait(seen).await;
            }
        }
    }

    /// Runs one flush as its leader: the caller has set `flushing`. The
    /// error is recorded (the engine failed, or full).
    async fn lead_flush(&self, target: Pos, sync: bool) -> Result<(), StorageError> {
        // Hands leadership back even if this future is dropped mid-flush
        // (a cancelled task): otherwise every later writer would wait for
        // a leader that is gone. A flush cut short is planned again from
        // the same state. A log write it had issued still runs to its end,
        // before the next write to that file ([`Backend::write_at`]), so
        // it cannot land over the next flush's write of the same block.
        let _guard = LeaderGuard(&self.inner);
        // Boxed: a flush's future is large and runs once per flush, while
        // every write's future would carry its size.
        Box::pin(self.flush_as_leader(target, sync)).await.map_err(|e| self.record_flush_error(e))
    }

    /// Marks the engine failed, or full if `e` is a lack of space a later
    /// flush can retry, and returns the error the caller reports.
    fn record_flush_error(&self, e: StorageError) -> StorageError {
        let mut st = self.inner.st.borrow_mut();
        if e.is_out_of_space_before_sync() && st.failed.is_none() {
            if st.full.is_none() {
                tracing::error!(error = %e, "the disk is full: writes are refused until there is space again");
            }
            let why = e.to_string();
            st.full = Some(why.clone());
            drop(st);
            self.update_write_stall();
            return StorageError::DiskFull(why);
        }
        if st.failed.is_none() {
            tracing::error!(error = %e, "storage write failed; the shard now refuses writes");
            st.failed = Some(e.to_string());
        }
        drop(st);
        self.update_write_stall();
        e
    }

    /// After the disk ran out of space: writes (and syncs, if the policy
    /// syncs) everything buffered, and takes writes again once that
    /// worked. Still no space: stays full, quietly (the next tick tries
    /// again). Any other error fails the engine.
    async fn retry_full(&self) -> Result<(), StorageError> {
        let target = {
            let mut st = self.inner.st.borrow_mut();
            if st.full.is_none() || st.failed.is_some() || std::mem::replace(&mut st.flushing, true) {
                return Ok(());
            }
            st.writer.appended()
        };
        let sync = self.inner.config.fsync != FsyncPolicy::Never;
        match self.lead_flush(target, sync).await {
            Ok(()) => {
                self.inner.st.borrow_mut().full = None;
                self.inner.flush_wanted.notify_all();
                tracing::info!("the disk has space again: writes are taken again");
                Ok(())
            }
            // Still no room: the next tick tries again.
            Err(StorageError::DiskFull(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes the log up to `target` (sealing full segments on the way)
    /// and, if `sync`, makes it durable: under `always` its writes are
    /// synced as they are made (it stops at `target`, as a buffered flush
    /// does); otherwise it fdatasyncs the last segment written.
    ///
    /// Without `sync` it stops at `target`, not when the buffer is empty:
    /// appends arriving while a write is in flight are the next flush's.
    /// Draining there kept a leader writing back to back under steady
    /// load, a few kilobytes per write (what arrived during the last one),
    /// each paying a submission and rewriting the partial block before it.
    /// With `sync` and plain writes (`interval`) it writes what was
    /// appended when it began, `target` or more: one more write is cheap
    /// next to the fdatasync that then covers every writer waiting then
    /// (group commit). Not until the buffer is empty: under steady writes
    /// it never was, and the sync never came (found by a review: no
    /// fdatasync but the seals' for as long as writes went on).
    async fn flush_as_leader(&self, target: Pos, sync: bool) -> Result<(), StorageError> {
        let backend = &self.inner.backend;
        let synced_writes = self.inner.config.synced_writes();
        let stop = if sync && !synced_writes { target.max(self.inner.st.borrow().writer.appended()) } else { target };
        loop {
            let plan = {
                let st = self.inner.st.borrow();
                // With writes synced as they are made, what piled up
                // behind this flush's write is the next group's: a write
                // more here would be a device flush more, not one saved.
                if st.writer.written() >= stop {
                    break;
                }
                st.writer.plan_flush()
            };
            let Some(plan) = plan else { break };
            let name = segment_file_name(plan.seg);
            // A flush cut short after it made the segment (a dropped
            // leader) left its handle here: the segment is made, and its
            // write may still be in flight, which a write through the same
            // file waits for (`Backend::write_at`).
            let made = self.inner.st.borrow().files.get(&plan.seg).cloned();
            let file = if let Some(f) = made {
                f
            } else {
                // Only a segment not made yet has no handle.
                assert!(plan.create, "written segment {} is open", plan.seg);
                let spare = self.inner.st.borrow_mut().spare.take();
                let (f, zeroed) = match spare {
                    Some(f) => match backend.rename(SPARE_SEGMENT, &name).await {
                        Ok(()) => (f, true),
                        Err(e) => {
                            // Still the spare: a retry (after a full disk)
                            // takes it again rather than needing new space.
                            self.inner.st.borrow_mut().spare = Some(f);
                            return Err(io_err("renaming the spare segment")(e));
                        }
                    },
                    None => {
                        let f = open_segment(backend, &self.inner.config, &name, true).await;
                        (f.map_err(io_err("creating a segment"))?, false)
                    }
                };
                if self.inner.config.preallocate && !zeroed {
                    match backend.preallocate(&f, self.inner.config.segment_size).await {
                        Ok(()) => {}
                        // No room for a whole segment ahead of time: the
                        // segment grows as it is written instead (its syncs
                        // then commit its size as well). A disk truly full
                        // fails at the write.
                        Err(e) if out_of_space(&e) => {
                            tracing::warn!(segment = plan.seg, error = %e, "no room to preallocate a segment; it grows as written");
                        }
                        Err(e) => return Err(io_err("preallocating a segment")(e)),
                    }
                }
                backend.sync_dir().await.map_err(sync_err("syncing the directory"))?;
                self.inner.st.borrow_mut().files.insert(plan.seg, f.clone());
                // Where the log takes new space (without a spare): writes
                // stop before the reserve is gone, not after.
                if !zeroed {
                    self.refresh_free_space();
                }
                f
            };
            // A seal right after a flush that ended on a block's end has
            // nothing to write (a zero-length DMA buffer can panic
            // glommio's allocator; found by a review).
            if plan.write_len() > 0 {
                let buf = backend.alloc_with(&file, plan.write_len(), self.inner.st.borrow().writer.plan_bytes(&plan));
                backend.write_at(&file, buf, plan.base).await.map_err(io_err("writing the log"))?;
            }
            if plan.seal {
                backend.truncate(&file, plan.base + plan.end as u64).await.map_err(io_err("sealing a segment"))?;
                backend.sync(&file).await.map_err(sync_err("syncing a sealed segment"))?;
                let hint = self.inner.st.borrow_mut().writer.hint_stream(&plan);
                write_hint(backend, plan.seg, hint).await.map_err(io_err("writing a hint file"))?;
            }
            let mut st = self.inner.st.borrow_mut();
            st.writer.complete_flush(&plan);
            st.prune_moved();
            st.stats.flushes += 1;
            st.stats.bytes_written += plan.write_len() as u64;
            if plan.seal {
                st.stats.fdatasyncs += 1;
            }
            if plan.seal || synced_writes {
                st.synced = st.synced.max(plan.written_to());
            }
        }
        if sync {
            let (written, file) = {
                let st = self.inner.st.borrow();
                let w = st.writer.written();
                if st.synced >= w {
                    return Ok(());
                }
                (w, st.files.get(&w.0).expect("written segment is open").clone())
            };
            backend.sync(&file).await.map_err(sync_err("fdatasync of the log"))?;
            let mut st = self.inner.st.borrow_mut();
            st.stats.fdatasyncs += 1;
            st.synced = st.synced.max(written);
        }
        Ok(())
    }

    /// Completes when the write buffer holds a flush threshold's worth
    /// and no flush is running: the shell's flusher then calls
    /// [`Engine::flush`]. Under `interval` and `never` no writer leads that
    /// flush (a writer waits only once `FLUSH_BACKLOG_THRESHOLDS` are
    /// buffered). Not while the engine has failed or the disk is full:
    /// ticks retry a full disk.
    pub async fn flush_wanted(&self) {
        loop {
            let seen = self.inner.flush_wanted.generation();
            {
                let st = self.inner.st.borrow();
                if st.failed.is_none()
                    && st.full.is_none()
                    && !st.flushing
                    && st.writer.pending_bytes() >= self.inner.config.flush_threshold
                {
                    return;
                }
            }
            self.inner.flush_wanted.wait(seen).await;
        }
    }

    /// Writes everything appended so far to the log files (no fdatasync;
    /// under `always` the writes are synced as they are made anyway).
    pub async fn flush(&self) -> Result<(), StorageError> {
        let target = self.inner.st.borrow().writer.appended();
        self.wait_until(target, false).await
    }

    /// Writes everything appended so far and makes it durable.
    pub async fn sync(&self) -> Result<(), StorageError> {
        let target = self.inner.st.borrow().writer.appended();
        self.wait_until(target, true).await
    }

    /// The periodic work of the durability policy; the shell calls it every
    /// `config().fsync.tick_ms()` milliseconds.
    pub async fn tick(&self) -> Result<(), StorageError> {
        if self.inner.st.borrow().full.is_some() {
            return self.retry_full().await;
        }
        let res = match self.inner.config.fsync {
            FsyncPolicy::Always => Ok(()),
            FsyncPolicy::Interval(_) => self.sync().await,
            FsyncPolicy::Never => self.flush().await,
        };
        match res {
            // Out of space: the next ticks retry (`retry_full`).
            Err(StorageError::DiskFull(_)) => Ok(()),
            other => other,
        }
    }

    /// The latest record of `key` (a tombstone included), verified.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        let (loc, file) = match self.lookup(key)? {
            Lookup::InMemory(rec) => return Ok(rec),
            Lookup::OnDisk(loc, file) => (loc, file),
        };
        {
            let stats = &mut self.inner.st.borrow_mut().stats;
            stats.gets += 1;
            stats.cache_misses += 1;
        }
        // Boxed: the read's future is large and only a cache miss needs it.
        let data = Box::pin(self.inner.backend.read_at(&file, loc.off as u64, loc.len as usize))
            .await
            .map_err(io_err("reading a record"))?;
        let raw: Rc<[u8]> = data.as_ref().into();
        let rec = Record::decode(raw.clone(), loc, key, self.inner.seed)?;
        let st = &mut *self.inner.st.borrow_mut();
        let tag = st.cache.insert(loc.id(), raw);
        // The key may have moved on during the read: then nothing can find
        // these bytes, and they would only take the place of others.
        if tag != CacheTag::NONE && !st.index.set_tag(key_hash(key), key, loc, tag) {
            st.cache.forget(tag, loc.id());
        }
        Ok(Some(rec))
    }

    /// One stage of fetching, ahead of time, what a lookup of the key with
    /// hash `hash` will touch: see [`Prefetch`]. Changes nothing and never
    /// awaits (its own loads of the slot and entry may stall the CPU, which
    /// is why a stage comes after the one that fetched them); a stage that
    /// cannot tell where to look does nothing.
    pub fn prefetch(&self, hash: u64, stage: Prefetch) {
        // Only a caller between two synchronous steps gets here, but a
        // hint must never be the thing that panics.
        let Ok(st) = self.inner.st.try_borrow() else { return };
        match stage {
            Prefetch::Slots => st.index.prefetch(hash),
            Prefetch::Entry => st.cache.prefetch_entry(st.index.guess_tag(hash)),
            Prefetch::Record => st.cache.prefetch_record(st.index.guess_tag(hash)),
        }
    }

    /// [`Self::get`] without waiting: `None` when the record has to be
    /// read from disk (then `get` reads it). Lets a caller answer from
    /// memory without allocating a future.
    pub fn get_now(&self, key: &[u8]) -> Option<Result<Option<Record>, StorageError>> {
        match self.lookup(key) {
            Ok(Lookup::InMemory(rec)) => Some(Ok(rec)),
            Ok(Lookup::OnDisk(..)) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Where `key`'s latest record is: in memory (or nowhere), or on disk.
    /// Counts a get answered from memory; one that goes to disk is counted
    /// by `get`, so a `get_now` that gives up counts nothing.
    fn lookup(&self, key: &[u8]) -> Result<Lookup<B::File>, StorageError> {
        self.check(key, &[], &[])?;
        let hash = key_hash(key);
        let st = &mut *self.inner.st.borrow_mut();
        let Some((loc, tag)) = st.find(hash, key) else {
            st.stats.gets += 1;
            st.stats.get_not_found += 1;
            return Ok(Lookup::InMemory(None));
        };
        // A failed engine writes nothing more: a record it had not written
        // when it failed was never acknowledged and is gone at the next
        // open. Showing it would show a value a restart takes back, and
        // the key's earlier record is no longer indexed: say so instead.
        let unwritable = match (&st.failed, &st.full) {
            (Some(e), _) => Some(StorageError::Failed(e.clone())),
            // Out of space: what is not written yet is written once there
            // is room, or lost if the node stops first. It was not
            // acknowledged, so it is not shown either (a read repair would
            // copy it to replicas that keep it).
            (None, Some(e)) => Some(StorageError::DiskFull(e.clone())),
            (None, None) => None,
        };
        if let Some(err) = unwritable {
            if (loc.seg, loc.off as u64 + loc.len as u64) > st.writer.written() {
                // A compaction copy: its record is still where it was.
                let from = st.moved.get(&(loc.seg, loc.off)).and_then(|&f| Some((f, st.files.get(&f.seg)?.clone())));
                return from.map(|(f, file)| Lookup::OnDisk(f, file)).ok_or(err);
            }
        }
        // The cache first: a record just written is usually there
        // (write-through) and needs no copy out of the write buffer.
        if let Some(raw) = st.cache.get(tag, loc.id()) {
            st.stats.gets += 1;
            st.stats.cache_hits += 1;
            return Record::decode_cached(raw, loc, key).map(|r| Lookup::InMemory(Some(r)));
        }
        if let Some(bytes) = st.writer.read_buffered(loc) {
            let raw: Rc<[u8]> = bytes.into();
            st.stats.gets += 1;
            st.stats.reads_from_buffer += 1;
            return Record::decode(raw, loc, key, self.inner.seed).map(|r| Lookup::InMemory(Some(r)));
        }
        Ok(Lookup::OnDisk(loc, st.files.get(&loc.seg).expect("indexed segment is open").clone()))
    }

    /// The keys of one partition with whether each is a tombstone.
    pub fn partition_keys(&self, partition: u32) -> Vec<(Vec<u8>, bool)> {
        let st = self.inner.st.borrow();
        st.index
            .partition(partition)
            .map(|p| p.iter().map(|(k, l)| (k.to_vec(), l.tombstone)).collect())
            .unwrap_or_default()
    }

    /// Number of keys (tombstones included).
    pub fn len(&self) -> usize {
        self.inner.st.borrow().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes of the index.
    pub fn index_memory_bytes(&self) -> usize {
        self.inner.st.borrow().index.memory_bytes()
    }

    /// What the record cache may hold (`EngineStats::cache_bytes` at
    /// most): `EngineConfig::cache_bytes`, cut to what its tags can name.
    pub fn cache_budget(&self) -> usize {
        self.inner.st.borrow().cache.budget()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EngineStats {
        let st = self.inner.st.borrow();
        let mut s = st.stats.clone();
        // Under `always` every segment write is a synced one.
        s.synced_writes = if self.inner.config.synced_writes() { s.flushes } else { 0 };
        s.compaction_stalled = st.stalled;
        s.disk_free_bytes = st.free_space;
        s.disk_reserve_bytes = self.inner.config.disk_reserve();
        s.low_space = st.low_space;
        s.cache_bytes = st.cache.bytes;
        s.keys = st.index.len();
        s.segments = st.usage.len();
        s.segments_kept = st.kept.len();
        s.index_bytes = st.index.memory_bytes();
        s.disk_live_bytes = st.usage.values().map(|u| u.live).sum();
        s.disk_total_bytes = st.usage.values().map(|u| u.total).sum();
        s
    }

    /// Whether the engine refuses writes after an I/O error.
    pub fn failed(&self) -> Option<String> {
        self.inner.st.borrow().failed.clone()
    }

    /// Whether the engine refuses writes for lack of space (until a tick
    /// finds room again).
    pub fn full(&self) -> Option<String> {
        self.inner.st.borrow().full.clone()
    }

    /// How far compaction is behind ([`compaction_backlog`]; its floor is
    /// one segment of live data), as [`Self::handle_compaction_check`]
    /// finds it, without its effect on the write stall.
    pub fn compaction_backlog(&self) -> f64 {
        self.backlog().ratio()
    }

    fn backlog(&self) -> Backlog {
        self.backlog_at(self.inner.config.compaction_threshold)
    }

    /// [`compaction_backlog`] of segments past the garbage ratio `threshold`.
    fn backlog_at(&self, threshold: f64) -> Backlog {
        let st = self.inner.st.borrow();
        compaction_backlog(
            &st.usage,
            st.writer.first_buffered_segment(),
            threshold,
            self.inner.config.segment_size,
            &st.kept,
        )
    }

    /// The garbage ratio from which a pass takes a segment: the configured
    /// one, or [`LOW_SPACE_COMPACTION_THRESHOLD`] while the disk is `low`
    /// on space (garbage under the threshold is still space, and with
    /// writes refused compaction is the only way to get it back).
    fn compaction_threshold(&self, low: bool) -> f64 {
        let threshold = self.inner.config.compaction_threshold;
        if low {
            threshold.min(LOW_SPACE_COMPACTION_THRESHOLD)
        } else {
            threshold
        }
    }

    /// The compaction driver's periodic look (the shell's loop, every
    /// `COMPACTION_CHECK`): from the first call on, writes may wait for
    /// compaction when it falls behind ([`write_stall`]); the caller must
    /// then run passes back to back while they wait
    /// ([`CompactionCheck::stalled`]).
    pub fn handle_compaction_check(&self) -> CompactionCheck {
        self.inner.st.borrow_mut().compaction_driven = true;
        let backlog = self.update_write_stall();
        let low_space = self.refresh_free_space();
        // Only while low (a walk over the segments), and not while the
        // last pass failed: the next would fail as well, and a pass due
        // every look would only repeat the failure.
        let low_reclaimable = if low_space && !self.inner.st.borrow().compaction_stuck {
            self.backlog_at(self.compaction_threshold(true)).reclaimable
        } else {
            0
        };
        let st = self.inner.st.borrow();
        CompactionCheck {
            backlog,
            stalled: st.stalled,
            stalls: st.stats.compaction_stalls,
            low_space,
            low_reclaimable,
            low_space_episodes: st.stats.low_space_episodes,
        }
    }

    /// Reads the file system's free space ([`Backend::free_space`]):
    /// from under the disk reserve new writes are refused, until
    /// compaction (or the operator) has made room again ([`low_space`]).
    /// Returns whether they are. The engine calls it at open, as it takes
    /// each new segment and after each batch of compaction; the compaction
    /// driver through [`Self::handle_compaction_check`]. A free space that
    /// cannot be read changes nothing (logged).
    pub fn refresh_free_space(&self) -> bool {
        let free = self.inner.backend.free_space();
        let mut st = self.inner.st.borrow_mut();
        match free {
            Ok(free) => st.free_space = Some(free),
            Err(e) => {
                if st.free_space.take().is_some() {
                    tracing::warn!(error = %e, "cannot read the file system's free space");
                }
            }
        }
        st.update_low_space(&self.inner.config)
    }

    /// The compaction driver stopped (its task ended or was cancelled):
    /// writes no longer wait for compaction.
    pub fn handle_compaction_stopped(&self) {
        self.inner.st.borrow_mut().compaction_driven = false;
        self.update_write_stall();
    }

    /// Starts or ends the write stall from the backlog now; returns it.
    fn update_write_stall(&self) -> f64 {
        let figures = self.backlog();
        let backlog = figures.ratio();
        let stall_at = self.inner.config.write_stall_backlog;
        let ended = {
            let mut st = self.inner.st.borrow_mut();
            let stall = st.compaction_driven
                && st.failed.is_none()
                && st.full.is_none()
                && write_stall(st.stalled, figures, stall_at, st.compaction_stuck);
            if stall == st.stalled {
                return backlog;
            }
            st.stalled = stall;
            // At debug: under writes that outrun compaction this comes and
            // goes several times a second; the shell reports it at most
            // every so often.
            if stall {
                st.stats.compaction_stalls += 1;
                tracing::debug!(backlog, stall_at, "compaction is behind: writes wait for it to catch up");
            } else {
                tracing::debug!(backlog, stuck = st.compaction_stuck, "writes no longer wait for compaction");
            }
            !stall
        };
        if ended {
            self.inner.caught_up.notify_all();
        }
        backlog
    }

    /// One compaction pass: every sealed segment whose garbage ratio passed
    /// the threshold has its live records copied to the head of the log
    /// (expired tombstones dropped when allowed), the copies are synced, and
    /// the segment is removed. Call it from a background task: it yields
    /// between records.
    pub async fn compact(&self, now_ms: u64) -> Result<CompactionStats, StorageError> {
        let mut stats = CompactionStats::default();
        let victims = {
            let mut st = self.inner.st.borrow_mut();
            if st.compacting || st.failed.is_some() || st.full.is_some() {
                return Ok(stats);
            }
            st.compacting = true;
            let threshold = self.compaction_threshold(st.low_space);
            pick_compaction(&st.usage, st.writer.first_buffered_segment(), threshold, &st.kept)
        };
        let _guard = ClearOnDrop { st: &self.inner.st, flag: |st| &mut st.compacting };
        let mut result = Ok(());
        // The files of the batch before, freed while this batch is
        // compacted: freeing a segment's space takes longer than removing
        // it (`Backend::release`), and would otherwise hold up the pass.
        let mut removed = Vec::new();
        let mut rest = &victims[..];
        // A closing engine ends the pass after the batch under way: the
        // shutdown waits for it (its writes must not be cut short).
        while !rest.is_empty() && !self.inner.st.borrow().closing {
            // Low on space, one victim at a time: a batch's copies are all
            // written before any of its victims goes, the reserve holds
            // one victim's, and the writes refused meanwhile wait for the
            // batch. Looked at for each batch: a pass that began with room
            // (8 victims a batch, about 5 s of them on a shard refusing
            // writes: perf/RESULTS.md, eighteenth session) may run out.
            let size = if self.inner.st.borrow().low_space { 1 } else { COMPACTION_BATCH };
            let batch = &rest[..size.min(rest.len())];
            let release = self.release_all(std::mem::take(&mut removed));
            let (done, ()) = futures_lite::future::zip(self.compact_batch(batch, now_ms, &mut stats), release).await;
            match done {
                Ok((files, taken)) => {
                    removed = files;
                    rest = &rest[taken..];
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            // Writes waiting for compaction go on as soon as it has caught
            // up, and writes refused for space are taken as soon as there
            // is room, not at the end of the pass.
            self.update_write_stall();
            self.refresh_free_space();
        }
        self.release_all(removed).await;
        // The last batch's space is free only now that its files are.
        self.refresh_free_space();
        // A pass that failed gives no reason to expect the next to do
        // better: writes stop waiting for compaction until one does not.
        self.inner.st.borrow_mut().compaction_stuck = result.is_err();
        self.update_write_stall();
        result.map(|()| stats)
    }

    /// Compaction's step for one record of the pass's segment at `off`:
    /// copies it to the head of the log if the index still points at it (or
    /// drops it, if it is a tombstone past its grace). Returns whether the
    /// copies the pass buffered since it last flushed (`pass.unflushed`,
    /// which it counts) should be written out now.
    fn move_if_live(&self, pass: &mut SegmentPass<'_>, off: u64, r: &RecordRef<'_>) -> Result<bool, StorageError> {
        let (seg, now_ms) = (pass.seg, pass.now_ms);
        let hash = key_hash(r.key);
        let len = r.encoded_len() as u32;
        let loc = Loc { seg, off: off as u32, len, tombstone: r.kind == Kind::Tombstone };
        let mut st = self.inner.st.borrow_mut();
        if let Some(e) = &st.failed {
            return Err(StorageError::Failed(e.clone()));
        }
        if !st.index.points_at(hash, r.key, loc) {
            return Ok(false);
        }
        let oldest = *st.usage.keys().next().expect("segment being compacted exists");
        let grace = self.inner.config.tombstone_grace_ms;
        let newest = r.seq + 1 == st.writer.next_seq();
        if loc.tombstone && may_drop_tombstone(r.timestamp_ms, now_ms, grace, seg, oldest, newest) {
            let (_, tag) = st.index.remove(hash, r.key).expect("checked live above");
            st.drop_live(loc, tag);
            pass.stats.tombstones_dropped += 1;
            st.stats.tombstones_dropped += 1;
            return Ok(false);
        }
        // A record written under a larger `segment_size` than this run's
        // fits no segment now: it stays where it is, and its segment is
        // kept (the log writer asserts a record fits, and the shard
        // panicked on every pass; found by a review).
        if u64::from(len) > self.inner.config.segment_size {
            tracing::warn!(
                seg,
                len,
                segment_size = self.inner.config.segment_size,
                "a record larger than the segment size stays in its segment"
            );
            return Ok(false);
        }
        let a = st.writer.append_with_seq(r.seq, r.timestamp_ms, r.kind, r.key, r.meta, r.value);
        st.account_move(&a, hash, r.key, loc);
        pass.stats.records_moved += 1;
        st.stats.records_moved += 1;
        // Compaction writes out its own copies as it goes: left to pile up,
        // a segment's live records filled the buffer past the backlog limit
        // and made every client write wait for one long flush (a 100-150 ms
        // stall per compaction). Its own copies, not the buffer's total: on
        // a shard busy with writes the buffer is always near the
        // threshold, and a flush awaited for every record moved held a
        // segment of 4 KiB values with a few live ones for 1-3 s (the
        // flusher writes the clients' records anyway).
        pass.unflushed += len as usize;
        if pass.unflushed >= self.inner.config.flush_threshold {
            pass.unflushed = 0;
            return Ok(true);
        }
        Ok(false)
    }

    /// One record of a compaction pass, whichever way it was read: gives
    /// way when `pace` says so, then moves the record if it is live and
    /// writes the pass's copies out when `move_if_live` asks.
    async fn compact_record(
        &self,
        pass: &mut SegmentPass<'_>,
        pace: &mut Pace,
        off: u64,
        r: &RecordRef<'_>,
    ) -> Result<(), StorageError> {
        if pace.record(r.encoded_len()) {
            self.inner.backend.yield_now().await;
        }
        if self.move_if_live(pass, off, r)? {
            self.flush().await?;
        }
        Ok(())
    }

    /// The records of segment `seg` the index still points at, found from
    /// its hint file without reading the segment: `(offset, length)` in log
    /// order. `None` (the caller streams the segment) when the hint cannot
    /// be read or used, or names more than [`COMPACTION_SPARSE_RECORDS`].
    /// A record dead now stays dead (an index slot only ever moves to a
    /// newer record or to compaction's copy), so the list is all that can
    /// need moving; `move_if_live` checks each again when it moves it.
    async fn sparse_live_records(&self, seg: u32) -> Option<Vec<(u32, u32)>> {
        let bytes = self.inner.backend.read_file(&hint_file_name(seg)).await.ok()?;
        let hint = decode_hint(&bytes, seg).ok()?;
        if hint.count as usize > COMPACTION_SPARSE_HINT_ENTRIES {
            return None;
        }
        let mut entries = Vec::with_capacity(hint.count as usize);
        hint.for_each(|e| entries.push(e)).ok()?;
        let mut live = Vec::new();
        for chunk in entries.chunks(COMPACTION_YIELD_RECORDS as usize) {
            {
                let st = self.inner.st.borrow();
                for e in chunk {
                    let loc = Loc { seg, off: e.off, len: e.len, tombstone: e.tombstone };
                    if st.index.points_at(key_hash(e.key), e.key, loc) {
                        if live.len() == COMPACTION_SPARSE_RECORDS {
                            return None;
                        }
                        live.push((e.off, e.len));
                    }
                }
            }
            self.inner.backend.yield_now().await;
        }
        Some(live)
    }

    /// Moves the records `records` of segment `seg` (from
    /// [`Self::sparse_live_records`]), reading each on its own. Returns
    /// false, having moved what it could, at the first that does not read
    /// back whole and verified: the caller then streams the segment, which
    /// judges and reports the damage (what was moved is skipped there).
    async fn move_sparse(
        &self,
        pass: &mut SegmentPass<'_>,
        file: &B::File,
        records: &[(u32, u32)],
    ) -> Result<bool, StorageError> {
        let mut pace = Pace::default();
        for &(off, len) in records {
            let bytes =
                self.inner.backend.read_at(file, off as u64, len as usize).await.map_err(io_err("reading a record"))?;
            let r = match decode_record(bytes.as_ref(), self.inner.seed) {
                Ok(r) if r.encoded_len() == len as usize => r,
                _ => return Ok(false),
            };
            self.compact_record(pass, &mut pace, off as u64, &r).await?;
        }
        Ok(true)
    }

    /// Moves the live records of segment `seg` to the head of the log
    /// (the copies are not synced yet: see [`Self::remove_segments`]).
    /// `unflushed`: the bytes of copies the batch has buffered since it
    /// last flushed (`SegmentPass::unflushed`), returned updated.
    async fn evacuate(
        &self,
        seg: u32,
        now_ms: u64,
        stats: &mut CompactionStats,
        unflushed: usize,
    ) -> Result<usize, StorageError> {
        let backend = &self.inner.backend;
        let (file, live) = {
            let st = self.inner.st.borrow();
            (st.files.get(&seg).expect("accounted segment is open").clone(), st.usage[&seg].live)
        };
        let mut pass = SegmentPass { seg, now_ms, stats, unflushed };
        let mut sparse_done = false;
        if live > 0 && live <= COMPACTION_SPARSE_BYTES {
            if let Some(records) = self.sparse_live_records(seg).await {
                sparse_done = self.move_sparse(&mut pass, &file, &records).await?;
                // Anything still live here was not on the hint's list.
                // Every record of a sealed segment is on its hint, so this
                // should not happen; if it does, streaming finds it rather
                // than the segment staying for good.
                sparse_done &= self.inner.st.borrow().usage[&seg].live == 0;
            }
        }
        if live > 0 && !sparse_done {
            // Streamed a piece at a time (see `SegmentReader`), and yielding
            // every so often ([`Pace`]): a whole segment's checksums in one
            // go stalled every request on the shard for tens of milliseconds.
            let mut reader = SegmentReader::new(backend, &file, COMPACTION_READ, self.inner.seed).await?;
            let mut pace = Pace::default();
            let regular = loop {
                reader.keys_ahead(COMPACTION_PREFETCH, |key| self.prefetch(key_hash(key), Prefetch::Slots));
                let (off, r) = match reader.next().await? {
                    Step::Record(off, r) => (off, r),
                    Step::End => break true,
                    Step::Irregular => break false,
                };
                self.compact_record(&mut pass, &mut pace, off, &r).await?;
            };
            drop(reader);
            if !regular {
                // Something other than whole valid records up to the end:
                // the whole-segment scan judges it (and reports corruption).
                // What the stream already moved is skipped there: the index
                // no longer points into this segment for those keys.
                let data = read_segment(backend, &file).await?;
                let mut scan = SegmentScan::new(seg, data.as_ref(), true, self.inner.seed);
                let mut pace = Pace::default();
                while let Some((off, r)) = scan.next_record() {
                    self.compact_record(&mut pass, &mut pace, off, &r).await?;
                }
                let out = scan.finish();
                for c in &out.corruptions {
                    tracing::error!(seg, off = c.off, len = c.len, reason = %c.reason, "corruption found by compaction");
                }
                pass.stats.corrupt_regions += out.corruptions.len() as u64;
            }
        }
        Ok(pass.unflushed)
    }

    /// Compacts the segments `segs` together: moves their live records,
    /// then removes those left with none ([`Self::remove_segments`]).
    /// Stops early if the disk runs low on space on the way: the
    /// segments evacuated so far go at once (writes are refused until
    /// they do). Returns the removed files, for [`Self::release_all`],
    /// and how many of `segs` it took.
    async fn compact_batch(
        &self,
        segs: &[u32],
        now_ms: u64,
        stats: &mut CompactionStats,
    ) -> Result<(Vec<B::File>, usize), StorageError> {
        let mut unflushed = 0;
        let mut taken = 0;
        for &seg in segs {
            unflushed = match self.evacuate(seg, now_ms, stats, unflushed).await {
                Ok(unflushed) => unflushed,
                // A victim that cannot be read (a bad sector) is kept, and
                // the pass goes on to the next: failing the pass stopped
                // every later one at the same victim, and the segments
                // after it were never compacted again (found by a
                // review). The copies made from it so far stand; its
                // remaining live records stay where they are, readable or
                // reported as they were (`remove_segments` keeps a segment
                // with live records). A failed or full engine still ends
                // the pass.
                Err(e) if self.inner.st.borrow().failed.is_none() && self.inner.st.borrow().full.is_none() => {
                    tracing::error!(seg, error = %e, "compaction could not read a segment; keeping what it holds");
                    0
                }
                Err(e) => return Err(e),
            };
            taken += 1;
            if self.inner.st.borrow().low_space {
                break;
            }
        }
        Ok((self.remove_segments(&segs[..taken], stats).await?, taken))
    }

    /// Removes the segments of `segs` that have nothing live left, with
    /// their hints; returns their files, whose space is freed once
    /// [`Self::release_all`] has them.
    async fn remove_segments(&self, segs: &[u32], stats: &mut CompactionStats) -> Result<Vec<B::File>, StorageError> {
        let backend = &self.inner.backend;
        // Whatever superseded these segments' records must be on disk
        // before they go: the pass's copies, and also any other records
        // appended since (writes still waiting for their group commit, the
        // copies of a pass that was dropped before its sync). A segment
        // that had nothing live left was once removed without this, so a
        // crash right after lost keys whose newer record was not yet
        // synced: the old record with the segment, the new one with the
        // power. One sync covers the whole batch, and so only what was
        // appended when it began: a segment still live then, whose last
        // records a write superseded while the sync ran, waits for the next
        // pass, whose sync covers that write (found by a review: a record
        // too large to move, overwritten during the sync, went with its
        // segment while its successor was still in the buffer).
        let empty_before: Vec<bool> = {
            let st = self.inner.st.borrow();
            segs.iter().map(|seg| st.usage[seg].live == 0).collect()
        };
        self.sync().await?;
        let mut doomed = Vec::with_capacity(segs.len());
        for (&seg, empty_before) in segs.iter().zip(empty_before) {
            let mut st = self.inner.st.borrow_mut();
            let live = st.usage[&seg].live;
            if live == 0 && !empty_before {
                continue;
            }
            if live > 0 {
                // Only corrupt records (and ones too large for this run's
                // segment size) can still be referenced: keep the segment
                // so reads keep serving or reporting them instead of
                // losing the keys.
                tracing::error!(seg, live, "segment keeps records that could not be moved; not removed");
                st.kept.insert(seg, live);
            } else {
                doomed.push(seg);
            }
        }
        if doomed.is_empty() {
            return Ok(Vec::new());
        }
        let mut freed = Vec::with_capacity(2 * doomed.len());
        for &seg in &doomed {
            // Opened before it goes, so that its space is freed by
            // `release` a piece at a time, as the segment's is, rather
            // than all at once.
            let hint_name = hint_file_name(seg);
            match backend.open(&hint_name, false).await {
                Ok(f) => freed.push(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Not worth failing the removal for (out of descriptors,
                // say): the unlink below then frees the hint at once.
                Err(e) => tracing::warn!(seg, error = %e, "opening a hint file to free it gently failed"),
            }
            remove_if_present(backend, &hint_name, "removing a hint file").await?;
        }
        // The hints' removal is durable before the segments': a hint whose
        // segment is gone is then always damage, which `open` refuses.
        backend.sync_dir().await.map_err(sync_err("syncing the directory"))?;
        for &seg in &doomed {
            remove_if_present(backend, &segment_file_name(seg), "removing a segment").await?;
        }
        backend.sync_dir().await.map_err(sync_err("syncing the directory"))?;
        let mut st = self.inner.st.borrow_mut();
        for seg in doomed {
            st.kept.remove(&seg);
            let total = st.usage.remove(&seg).map_or(0, |u| u.total);
            st.stats.segments_compacted += 1;
            freed.extend(st.files.remove(&seg));
            stats.segments_removed += 1;
            stats.bytes_reclaimed += total;
        }
        Ok(freed)
    }

    /// Frees the space of removed files a piece at a time
    /// ([`Backend::release`]). They are gone for good: a failure here only
    /// leaves their space to be freed when the last handle closes.
    async fn release_all(&self, files: Vec<B::File>) {
        for f in files {
            if let Err(e) = self.inner.backend.release(f).await {
                tracing::warn!(error = %e, "freeing a removed file's space a piece at a time failed");
            }
        }
    }

    /// Reads every record of every segment on disk and reports the regions
    /// that fail their checksums (a scrub).
    pub async fn verify(&self) -> Result<Vec<Corruption>, StorageError> {
        let segs: Vec<(u32, B::File)> = {
            let st = self.inner.st.borrow();
            let first_buffered = st.writer.first_buffered_segment();
            st.files.iter().filter(|(&s, _)| s < first_buffered).map(|(&s, f)| (s, f.clone())).collect()
        };
        let mut found = Vec::new();
        for (seg, file) in segs {
            let data = read_segment(&self.inner.backend, &file).await?;
            found.extend(scan_segment(seg, data.as_ref(), true, self.inner.seed, |_, _| {}).corruptions);
            self.inner.backend.yield_now().await;
        }
        found.sort_by_key(|c| (c.seg, c.off));
        Ok(found)
    }

    /// Flushes and syncs everything buffered (whatever the policy): call
    /// before dropping the engine on a clean shutdown. From the call on,
    /// writes are refused ([`StorageError::Closed`]): one taken while the
    /// sync runs would be past its target, acknowledged and never written.
    pub fn close(&self) -> impl std::future::Future<Output = Result<(), StorageError>> + '_ {
        // Set now, not at the first poll: a write that runs between the
        // call and the first poll is refused too.
        self.begin_close();
        async move {
            // A full disk is retried first: only the ticker retried it,
            // and the shutdown stops the ticker before it closes, so a
            // close after space came back failed without trying, losing
            // buffered writes already acknowledged (found by a review).
            // A flush in flight at the call can run out of space after
            // that check, while the sync waits for it: a sync that finds
            // the disk full is retried once the same way.
            let mut retried = false;
            loop {
                if self.full().is_some() {
                    self.retry_full().await?;
                }
                match self.sync().await {
                    Err(StorageError::DiskFull(_)) if !retried => retried = true,
                    done => return done,
                }
            }
        }
    }

    /// The first half of [`Engine::close`]: from now on writes are refused,
    /// a compaction pass ends after its batch under way, and no spare is
    /// made; what was taken is still to be synced (`close`). A shutdown
    /// calls it before it stops the background tasks, so that they end
    /// soon without being cut short.
    pub fn begin_close(&self) {
        self.inner.st.borrow_mut().closing = true;
    }
}

/// How much of a segment compaction reads at once. Reading a whole 64 MiB
/// segment in one request made the kernel fault in and pin a fresh 64 MiB
/// buffer, and freeing it was a 5-6 ms `munmap` on the shard thread
/// (`perf trace`); buffered SET's p99.9 doubled while compaction ran. A
/// MiB keeps each read large enough to stream the disk.
const COMPACTION_READ: usize = 1 << 20;

/// Segments a compaction pass compacts and removes together: one sync
/// makes what superseded their records durable, and one directory sync
/// each their hints' and their own removal. One at a time, those syncs
/// and the freeing of each file's space took 150-370 ms for a segment
/// with nothing live left on a shard saturated by 4 KiB writes: about 3
/// segments reclaimed a second while the writes filled 6
/// (perf/RESULTS.md, seventeenth session). Eight: the copies of
/// up to eight segments wait for one sync, and their space is reclaimed
/// a batch at a time.
const COMPACTION_BATCH: usize = 8;

/// What [`SegmentReader::next`] found.
enum Step<'a> {
    /// A whole record that passed its checksum, and its offset.
    Record(u64, RecordRef<'a>),
    /// The end of the file, right after a record.
    End,
    /// Anything else (a bad header or checksum, zeros, a short read): not
    /// this reader's to judge; the caller scans the whole segment instead.
    Irregular,
}

/// A sealed segment's records in order, read a piece (`piece` bytes, or
/// one record if larger) at a time. Each piece is read straight from the
/// offset of the first record it must hold, so a record cut by a piece's
/// end is read again whole with the next piece (at most one record's bytes
/// per piece) and nothing is copied: copying each MiB into a buffer of its
/// own took 0.1-0.4 ms of the shard's time at once.
struct SegmentReader<'e, B: Backend> {
    backend: &'e B,
    file: &'e B::File,
    size: u64,
    piece: usize,
    /// File offset of `data`'s first byte.
    base: u64,
    /// The piece being walked; `None` before the first read.
    data: Option<B::Read>,
    /// Where the next record starts in `data`.
    at: usize,
    /// Where the first record not yet offered by [`Self::keys_ahead`]
    /// starts in `data` (0 after a new piece is read: then `at` counts).
    ahead: usize,
    /// Records offered by [`Self::keys_ahead`] that [`Self::next`] has not
    /// returned yet.
    offered: usize,
    seed: Seed,
}

impl<'e, B: Backend> SegmentReader<'e, B> {
    async fn new(backend: &'e B, file: &'e B::File, piece: usize, seed: Seed) -> Result<Self, StorageError> {
        let size = backend.size(file).await.map_err(io_err("sizing a segment"))?;
        Ok(SegmentReader { backend, file, size, piece, base: 0, data: None, at: 0, ahead: 0, offered: 0, seed })
    }

    async fn next(&mut self) -> Result<Step<'_>, StorageError> {
        loop {
            let data = self.data.as_ref().map_or(&[][..], |d| d.as_ref());
            let avail = &data[self.at..];
            let read_all = self.base + data.len() as u64 >= self.size;
            let need = match decode_header(avail, self.seed) {
                Ok((_, len)) if avail.len() >= len => break,
                Ok((_, len)) if !read_all => len,
                Err(DecodeError::Truncated { .. }) if !read_all => RECORD_HEADER_LEN,
                Err(DecodeError::End) if avail.is_empty() && read_all => return Ok(Step::End),
                // Zeros too few to hold the kind byte may be the start of a
                // record (its checksum's low bytes) cut by the piece's end:
                // read on (found by a review: an undamaged segment fell
                // back to the whole-segment scan).
                Err(DecodeError::End) if avail.len() <= KIND_OFFSET && !read_all => RECORD_HEADER_LEN,
                _ => return Ok(Step::Irregular),
            };
            let start = self.base + self.at as u64;
            let n = (need.max(self.piece) as u64).min(self.size - start) as usize;
            // Dropped first: one piece's buffer alive at a time.
            self.data = None;
            let piece = self.backend.read_at(self.file, start, n).await.map_err(io_err("reading a segment"))?;
            if piece.as_ref().len() != n {
                return Ok(Step::Irregular);
            }
            self.data = Some(piece);
            self.base = start;
            self.at = 0;
            (self.ahead, self.offered) = (0, 0);
        }
        let at = self.at;
        let data = self.data.as_ref().expect("a record was found in the piece").as_ref();
        // The loop above verified its header.
        match crate::storage::format::decode_record_after_header(&data[at..], self.seed) {
            Ok(r) => {
                self.at += r.encoded_len();
                if at < self.ahead {
                    self.offered = self.offered.saturating_sub(1);
                }
                Ok(Step::Record(self.base + at as u64, r))
            }
            Err(_) => Ok(Step::Irregular),
        }
    }
}

impl<B: Backend> SegmentReader<'_, B> {
    /// Offers `f` the keys of the records that [`Self::next`] returns next,
    /// each once, until `n` offered ones are still to be returned, within
    /// the piece in memory. Only the headers are parsed (nothing verified:
    /// a key offered here only picks which memory to prefetch).
    fn keys_ahead(&mut self, n: usize, mut f: impl FnMut(&[u8])) {
        let Some(data) = self.data.as_ref().map(|d| d.as_ref()) else { return };
        let mut at = self.ahead.max(self.at);
        while self.offered < n {
            let Ok((h, len)) = crate::storage::format::decode_verified_header(&data[at..]) else { break };
            let Some(key) = data.get(at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + h.key_len.get() as usize) else {
                break;
            };
            if at + len > data.len() {
                break;
            }
            f(key);
            at += len;
            self.offered += 1;
        }
        self.ahead = at;
    }
}

/// When compaction gives way to the shard's requests: after this many
/// records, or this many bytes of them, whichever comes first. A give-way
/// (`Backend::yield_now`) costs the shard about 13 µs of CPU (a timer, a
/// poll of its rings; on an idle shard a sleep and a wake-up): every 64
/// records, about 16 µs of work, it was more than half of compaction's CPU
/// (`gyre-bench compaction`, a pass over three 64 MiB segments: 438-440 ms
/// of the shard's CPU, against 143-158 ms now, the index prefetch below
/// included; perf/RESULTS.md, fifteenth session). 256 records of 100-byte
/// values are about 65 µs of work; the byte bound keeps records with
/// large values (checksummed whole) to as much.
const COMPACTION_YIELD_RECORDS: u32 = 256;
const COMPACTION_YIELD_BYTES: usize = 256 * 1024;

/// One segment's share of a compaction pass: what each record's step
/// needs besides the record.
struct SegmentPass<'s> {
    seg: u32,
    now_ms: u64,
    stats: &'s mut CompactionStats,
    /// Bytes the batch's copies (this segment's and those of the segments
    /// before it in the batch) added to the buffer since the last flush
    /// they asked for (see `Engine::move_if_live`).
    unflushed: usize,
}

/// Counts compaction's work since it last gave way (see
/// [`COMPACTION_YIELD_RECORDS`]).
#[derive(Default)]
struct Pace {
    records: u32,
    bytes: usize,
}

impl Pace {
    /// Counts a record of `len` bytes; true when it is time to give way
    /// (and the count starts again).
    fn record(&mut self, len: usize) -> bool {
        self.records += 1;
        self.bytes += len;
        let due = self.records >= COMPACTION_YIELD_RECORDS || self.bytes >= COMPACTION_YIELD_BYTES;
        if due {
            *self = Pace::default();
        }
        due
    }
}

/// Records ahead of the one being compacted whose index slots compaction
/// prefetches ([`SegmentReader::keys_ahead`]): each record's liveness check
/// is a probe of the index at a random place, a cache miss on a shard whose
/// index does not fit in the CPU caches; a few in flight together overlap.
const COMPACTION_PREFETCH: usize = 8;

/// A victim with at most this many bytes of live records has them read one
/// by one, found from its hint file ([`Engine::sparse_live_records`]),
/// rather than the whole segment streamed: a segment of 4 KiB values with
/// a few live ones took 0.6-1.1 s to stream on a shard saturated by
/// writes, a read of a MiB at a time waiting its turn (perf/RESULTS.md,
/// sixteenth session). A MiB: no more than one streamed piece's worth.
const COMPACTION_SPARSE_BYTES: u64 = COMPACTION_READ as u64;

/// At most this many live records are read one by one; more, and the
/// segment is streamed (many small reads cost more than a few large).
const COMPACTION_SPARSE_RECORDS: usize = 1024;

/// The sparse path takes hints of at most this many entries: their entries
/// are parsed in one go, before the first chance to give way (about half a
/// millisecond at this size); a segment of more, smaller records is
/// streamed, which gives way as it goes.
const COMPACTION_SPARSE_HINT_ENTRIES: usize = 65_536;

/// How much of a hint file [`write_hint`] writes at a time.
const HINT_PIECE: usize = 1 << 20;

/// Writes segment `seg`'s hint file (at a seal, and at recovery) a piece at
/// a time ([`write_file_in_pieces`]).
async fn write_hint<B: Backend>(backend: &B, seg: u32, mut hint: HintStream) -> io::Result<()> {
    write_file_in_pieces(backend, &hint_file_name(seg), hint.file_len(), HINT_PIECE, |_, piece| {
        let n = hint.read(piece);
        debug_assert_eq!(n, piece.len(), "a hint reads out its whole length");
    })
    .await
}

/// Opens a segment the way its policy writes it: under `always` every write
/// is durable as it is made (`O_DSYNC`), so a group commit is one request
/// to the disk, which the kernel completes after the device's cache flush,
/// instead of a write, a wake-up of the shard, an fdatasync and another
/// wake-up (perf/RESULTS.md, twelfth session: 18-22% more durable writes a
/// second). Sealed segments are opened so as well; they are never written.
async fn open_segment<B: Backend>(backend: &B, config: &EngineConfig, name: &str, create: bool) -> io::Result<B::File> {
    if config.synced_writes() {
        backend.open_synced(name, create).await
    } else {
        backend.open(name, create).await
    }
}

/// Reads a whole segment file (compaction and scrub work segment by segment).
/// Removes file `name` of a segment compaction removes: gone already is
/// no error. A batch that failed after removing some of its files (at a
/// later removal or the directory sync) leaves their segments accounted,
/// so the next pass takes them first, and would fail on them for good
/// were their absence an error.
async fn remove_if_present<B: Backend>(backend: &B, name: &str, op: &'static str) -> Result<(), StorageError> {
    match backend.remove(name).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(op)(e)),
    }
}

async fn read_segment<B: Backend>(backend: &B, file: &B::File) -> Result<B::Read, StorageError> {
    let size = backend.size(file).await.map_err(io_err("sizing a segment"))?;
    backend.read_at(file, 0, size as usize).await.map_err(io_err("reading a segment"))
}

/// Checks (or, in a new directory, writes) the storage format file, and
/// returns the seed of the directory's record checksums (a new directory's
/// is drawn from the operating system's randomness: it must be one no
/// client can know or guess).
async fn check_format<B: Backend>(backend: &B, exists: bool, has_segments: bool) -> Result<Seed, StorageError> {
    if !exists {
        if has_segments {
            return Err(StorageError::FormatVersion {
                found: "none (segments without a format file)".into(),
                expected: STORAGE_FORMAT_VERSION,
            });
        }
        // From the operating system: `fastrand`'s generator is seeded from
        // the clock and the thread id, which a client could guess.
        let mut bytes = [0u8; 8];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| io_err("drawing the record seed")(io::Error::other(e.to_string())))?;
        let seed = Seed::new_directory(u64::from_le_bytes(bytes));
        backend
            .write_file(FORMAT_FILE, &format_file_contents(seed))
            .await
            .map_err(io_err("writing the format file"))?;
        return Ok(seed);
    }
    let bytes = backend.read_file(FORMAT_FILE).await.map_err(io_err("reading the format file"))?;
    parse_format_file(&bytes).map_err(|e| match e {
        FormatFileError::Version(v) => {
            StorageError::FormatVersion { found: v.to_string(), expected: STORAGE_FORMAT_VERSION }
        }
        e => StorageError::FormatFile(e),
    })
}

#[cfg(test)]
mod tests {
    use futures_lite::future::block_on;

    use super::*;
    use crate::storage::backend::mem::MemBackend;
    use crate::storage::format::encode_record;

    const SEED: Seed = Seed::format_3(0x5eed);

    /// Small segments (32 KiB), values up to 1 KiB, the default policy.
    fn small() -> EngineConfig {
        EngineConfig { segment_size: 32 * 1024, max_value_len: 1024, ..Default::default() }
    }

    /// [`small`] with buffered writes.
    fn small_buffered() -> EngineConfig {
        EngineConfig { fsync: FsyncPolicy::Never, ..small() }
    }

    /// Writes keys 0..20 with 1000 bytes of `round` once per round, then
    /// writes the buffer out: under [`small_buffered`], a segment's worth
    /// of live data, and as many segments of garbage as rounds but one.
    async fn overwrite_rounds(engine: &Engine<MemBackend>, rounds: std::ops::Range<u8>) {
        for round in rounds {
            for i in 0..20u32 {
                engine.put(&i.to_le_bytes(), b"", &[round; 1000], 0).await.unwrap();
            }
        }
        engine.flush().await.unwrap();
    }

    /// Key "stable" (100 bytes of 5) in segment 1, then nine segments of
    /// garbage and one of live data (`overwrite_rounds`), all synced.
    async fn stable_among_garbage(engine: &Engine<MemBackend>) {
        engine.put(b"stable", b"", &[5; 100], 0).await.unwrap();
        overwrite_rounds(engine, 0..10).await;
        engine.sync().await.unwrap();
    }

    /// A fresh in-memory directory and an engine opened on it.
    async fn open_mem(config: &EngineConfig) -> (MemBackend, Engine<MemBackend>) {
        let backend = MemBackend::new();
        let (engine, _) = Engine::open(backend.clone(), config.clone()).await.unwrap();
        (backend, engine)
    }

    /// The shard's newest record keeps its sequence number across clean
    /// restarts even when it is a tombstone past its grace: compaction
    /// keeps it (the store draws a forgotten key's next dot above
    /// `last_seq`, which must not go back). Once a newer record exists,
    /// the tombstone goes, and the newer record holds the number.
    #[test]
    fn the_newest_record_is_never_dropped_so_last_seq_never_goes_back() {
        block_on(async {
            let config = EngineConfig { tombstone_grace_ms: 0, compaction_threshold: 0.3, ..small_buffered() };
            let (backend, engine) = open_mem(&config).await;
            engine.put(b"k", b"", &[1; 100], 0).await.unwrap();
            engine.delete(b"k", b"", 0).await.unwrap();
            assert_eq!(engine.last_seq(), 2);
            engine.close().await.unwrap();
            drop(engine);
            // Reopened, the tombstone's segment is sealed: compaction may
            // pick it, and the tombstone is past its grace.
            let (engine, _) = Engine::open(backend.clone(), config.clone()).await.unwrap();
            assert_eq!(engine.last_seq(), 2);
            let stats = engine.compact(1_000).await.unwrap();
            assert_eq!(stats.segments_removed, 1, "{stats:?}");
            assert_eq!(stats.tombstones_dropped, 0, "the newest record stays: {stats:?}");
            // The tombstone's copy shares its segment with j's versions.
            for i in 0..4 {
                engine.put(b"j", b"", &[i; 100], 0).await.unwrap();
            }
            engine.close().await.unwrap();
            drop(engine);
            let (engine, _) = Engine::open(backend.clone(), config.clone()).await.unwrap();
            assert_eq!(engine.last_seq(), 6);
            let stats = engine.compact(1_000).await.unwrap();
            assert_eq!(stats.tombstones_dropped, 1, "no longer the newest: {stats:?}");
            assert!(engine.get(b"k").await.unwrap().is_none());
            engine.close().await.unwrap();
            drop(engine);
            let (engine, _) = Engine::open(backend, config).await.unwrap();
            assert_eq!(engine.last_seq(), 6, "held by j's record");
        });
    }

    /// Found by a review: a segment compaction cannot read (a bad sector)
    /// failed every pass at the same victim, so the segments after it were
    /// never compacted again. It is kept now, and the pass goes on.
    #[test]
    fn an_unreadable_segment_is_kept_and_the_others_are_compacted() {
        block_on(async {
            let config = EngineConfig { compaction_threshold: 0.3, ..small_buffered() };
            let (backend, engine) = open_mem(&config).await;
            stable_among_garbage(&engine).await;
            backend.fail_reads_of(Some("seg-00000001.log"));
            let stats = engine.compact(0).await.expect("the pass goes on past the unreadable segment");
            assert!(stats.segments_removed >= 1, "{stats:?}");
            assert!(engine.inner.st.borrow().usage.contains_key(&1), "the unreadable segment is kept");
            backend.fail_reads_of(None);
            assert_eq!(engine.get(b"stable").await.unwrap().unwrap().value(), &[5; 100]);
        });
    }

    /// Found by a review: a record written under a larger segment size
    /// than this run's panicked the shard when compaction moved it (the
    /// log writer asserts a record fits a segment), on every restart. It
    /// stays in its segment, which is kept.
    #[test]
    fn a_record_larger_than_this_runs_segments_stays_where_it_is() {
        block_on(async {
            let big = EngineConfig {
                segment_size: 256 * 1024,
                max_value_len: 64 * 1024,
                compaction_threshold: 0.3,
                fsync: FsyncPolicy::Never,
                ..Default::default()
            };
            let (backend, engine) = open_mem(&big).await;
            engine.put(b"big", b"", &[9; 60 * 1024], 0).await.unwrap();
            for i in 0..100u32 {
                engine.put(b"g", b"", &[i as u8; 1000], 0).await.unwrap();
            }
            engine.close().await.unwrap();
            drop(engine);
            let small = EngineConfig { segment_size: 32 * 1024, max_value_len: 1024, ..big };
            let (engine, _) = Engine::open(backend, small).await.unwrap();
            engine.compact(0).await.expect("no panic, no error");
            assert!(engine.inner.st.borrow().usage.contains_key(&1), "the big record's segment is kept");
            assert_eq!(engine.get(b"big").await.unwrap().unwrap().value(), &[9; 60 * 1024]);
            assert_eq!(engine.get(b"g").await.unwrap().unwrap().value(), &[99; 1000]);
        });
    }

    /// Found by a review: a close after the disk filled and then had room
    /// again failed without trying (only the ticker retried a full disk,
    /// and a shutdown stops it first), losing buffered writes already
    /// acknowledged.
    #[test]
    fn close_retries_a_full_disk_that_has_room_again() {
        close_after_the_disk_filled(|engine, backend| {
            Box::pin(async move {
                backend.no_space(true);
                assert!(matches!(engine.flush().await, Err(StorageError::DiskFull(_))));
                assert!(engine.full().is_some());
                backend.no_space(false);
                engine.close().await.expect("a close with room again writes what it holds");
            })
        });
    }

    /// The same, for a flush already in flight when `close` is called
    /// that runs out of space after close's own check: close waited for
    /// it, then failed with its error without trying again.
    #[test]
    fn close_retries_a_flush_in_flight_that_ran_out_of_space() {
        close_after_the_disk_filled(|engine, backend| {
            Box::pin(async move {
                backend.hold_writes(true);
                let mut flush = Box::pin(engine.flush());
                assert!(futures_lite::future::poll_once(&mut flush).await.is_none(), "the flush waits on the disk");
                let mut close = Box::pin(engine.close());
                assert!(futures_lite::future::poll_once(&mut close).await.is_none(), "close waits for that flush");
                assert!(engine.full().is_none(), "close found the disk with room");
                backend.no_space(true);
                backend.hold_writes(false);
                assert!(matches!(flush.await, Err(StorageError::DiskFull(_))));
                backend.no_space(false);
                close.await.expect("a close with room again writes what it holds");
            })
        });
    }

    /// Ten buffered writes, then `fill_and_close` (the disk fills, and has
    /// room again by the time the engine closes), a power cut, and a check
    /// that every write is there.
    fn close_after_the_disk_filled(
        fill_and_close: impl for<'a> FnOnce(
            &'a Engine<MemBackend>,
            &'a MemBackend,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>,
    ) {
        block_on(async {
            let config = EngineConfig { fsync: FsyncPolicy::Interval(5), ..small() };
            let (backend, engine) = open_mem(&config).await;
            for i in 0..10u32 {
                engine.put(&i.to_le_bytes(), b"", &[1; 100], 0).await.unwrap();
            }
            fill_and_close(&engine, &backend).await;
            drop(engine);
            backend.crash(3, true);
            let (engine, _) = Engine::open(backend, config).await.unwrap();
            assert_eq!(engine.len(), 10, "every acknowledged write is there");
        });
    }

    /// Found by a review: a seal right after a flush that ended on a
    /// block's end issued a write of no bytes (a zero-length DMA buffer
    /// can panic glommio's allocator). Both backends now assert a write
    /// has bytes; 1 KiB records fill blocks exactly.
    #[test]
    fn a_seal_after_a_flush_that_ended_on_a_block_writes_nothing_empty() {
        block_on(async {
            let config = small();
            assert_eq!(config.fsync, FsyncPolicy::Always);
            let (_backend, engine) = open_mem(&config).await;
            let value = vec![3u8; 1024 - crate::storage::format::record_len(4, 0, 0)];
            for i in 0..100u32 {
                engine.put(&i.to_le_bytes(), b"", &value, 0).await.unwrap();
            }
            assert_eq!(engine.get(&99u32.to_le_bytes()).await.unwrap().unwrap().value(), &value[..]);
        });
    }

    /// Compaction gives way after a count of records or of their bytes,
    /// whichever comes first, and counts afresh after each.
    #[test]
    fn compaction_gives_way_by_records_or_by_bytes() {
        let mut pace = Pace::default();
        let small = (1..=3 * COMPACTION_YIELD_RECORDS).filter(|_| pace.record(100)).count();
        assert_eq!(small, 3, "small records: every {COMPACTION_YIELD_RECORDS}");
        let big = COMPACTION_YIELD_BYTES / 4;
        let due: Vec<bool> = (0..8).map(|_| pace.record(big)).collect();
        assert_eq!(due, [false, false, false, true, false, false, false, true], "large records: by their bytes");
    }

    /// Regression (found by a review): after a write error, every key a
    /// compaction pass had copied read as failed (its copy not written),
    /// though its record was durable all along where it was. (A failed
    /// engine still shows no client write it never wrote:
    /// `a_failed_engine_shows_no_record_it_never_wrote`.)
    #[test]
    fn a_failed_engine_still_reads_what_compaction_had_copied() {
        block_on(async {
            let config = small_buffered();
            let (backend, engine) = open_mem(&config).await;
            stable_among_garbage(&engine).await;
            backend.fail_writes(true);
            assert!(engine.compact(0).await.is_err(), "the pass's write fails");
            assert!(engine.failed().is_some());
            assert_eq!(engine.get(b"stable").await.unwrap().unwrap().value(), &[5; 100]);
            backend.fail_writes(false);
            drop(engine);
            let (reopened, _) = Engine::open(backend, config).await.unwrap();
            assert_eq!(reopened.get(b"stable").await.unwrap().unwrap().value(), &[5; 100]);
        })
    }

    /// Regression (found by a review): under `interval` a sync wrote until
    /// the buffer was empty, which under steady writes it never was: no
    /// fdatasync came (but the seals') for as long as writes went on.
    #[test]
    fn an_interval_sync_ends_under_steady_writes() {
        block_on(async {
            let config = EngineConfig { fsync: FsyncPolicy::Interval(100), ..small_buffered() };
            let (_backend, engine) = open_mem(&config).await;
            engine.put(b"first", b"", b"v", 0).await.unwrap();
            let (done, puts) = (std::cell::Cell::new(false), std::cell::Cell::new(0u32));
            let sync = async {
                engine.sync().await.unwrap();
                done.set(true)
            };
            let writer = async {
                while !done.get() && puts.get() < 2000 {
                    engine.put(&puts.get().to_le_bytes(), b"", &[1; 100], 0).await.unwrap();
                    puts.set(puts.get() + 1);
                    futures_lite::future::yield_now().await;
                }
            };
            futures_lite::future::zip(sync, writer).await;
            assert!(puts.get() < 50, "the sync ended only after {} more puts", puts.get());
            assert!(engine.get(b"first").await.unwrap().is_some());
        })
    }

    /// A closing engine starts no compaction batch (the shutdown waits for
    /// the background tasks, which are no longer cut short), while the
    /// same pass on an open engine reclaims the garbage.
    #[test]
    fn a_closing_engine_starts_no_compaction_batch() {
        block_on(async {
            let config = small_buffered();
            for closing in [true, false] {
                let (_backend, engine) = open_mem(&config).await;
                overwrite_rounds(&engine, 0..10).await;
                engine.sync().await.unwrap();
                assert!(engine.compaction_backlog() > 0.0);
                if closing {
                    engine.begin_close();
                }
                let pass = engine.compact(0).await.unwrap();
                assert_eq!(pass.segments_removed == 0, closing, "{pass:?}");
                engine.close().await.unwrap();
            }
        })
    }

    /// Regression (found by a review): a segment a pass could not empty
    /// (a damaged live record) was taken again by every pass, read in full
    /// and its damage reported again. Now it waits until one of its live
    /// records is superseded; then a pass takes it, and removes it once
    /// nothing live is left in it.
    #[test]
    fn a_kept_segment_waits_until_its_live_records_change() {
        block_on(async {
            let config = small_buffered();
            let (backend, engine) = open_mem(&config).await;
            stable_among_garbage(&engine).await;
            backend.corrupt(&segment_file_name(1), 40, 0xff).unwrap();
            let first = engine.compact(0).await.unwrap();
            assert!(first.corrupt_regions > 0, "{first:?}");
            for _ in 0..2 {
                let again = engine.compact(0).await.unwrap();
                assert_eq!((again.corrupt_regions, again.segments_removed), (0, 0), "{again:?}");
            }
            assert!(backend.list().await.unwrap().contains(&segment_file_name(1)), "kept");
            // The damaged record superseded: the segment holds nothing live.
            engine.put(b"stable", b"", &[6; 100], 0).await.unwrap();
            engine.sync().await.unwrap();
            let after = engine.compact(0).await.unwrap();
            assert!(after.segments_removed > 0, "{after:?}");
            assert!(!backend.list().await.unwrap().contains(&segment_file_name(1)));
            assert_eq!(engine.get(b"stable").await.unwrap().unwrap().value(), &[6; 100]);
        })
    }

    /// Regression (found by a review): recovery removed a last segment in
    /// which no record verified but kept its (rejected) hint, and the next
    /// open refused the directory for a hint without its segment.
    #[test]
    fn a_removed_last_segment_takes_its_rejected_hint_with_it() {
        block_on(async {
            let config = small();
            let (backend, engine) = open_mem(&config).await;
            engine.put(b"a", b"", b"1", 0).await.unwrap();
            engine.close().await.unwrap();
            drop(engine);
            // This open scans segment 1 and writes its hint.
            drop(Engine::open(backend.clone(), config.clone()).await.unwrap());
            assert!(backend.list().await.unwrap().contains(&hint_file_name(1)));
            backend.corrupt(&hint_file_name(1), 40, 0xff).unwrap();
            backend.corrupt(&segment_file_name(1), 22, 0xff).unwrap(); // the record's kind
            let (engine, report) = Engine::open(backend.clone(), config.clone()).await.unwrap();
            assert!(report.lost_records(), "{report:?}");
            drop(engine);
            let files = backend.list().await.unwrap();
            assert!(!files.contains(&hint_file_name(1)) && !files.contains(&segment_file_name(1)), "{files:?}");
            let (engine, _) = Engine::open(backend, config).await.expect("the next open");
            assert!(engine.get(b"a").await.unwrap().is_none());
        })
    }

    /// Regression (found by a review): a write taken while `close` synced
    /// (a shutdown's writes released from a compaction stall, say) was past
    /// the sync's target: under a buffered policy acknowledged, never
    /// written, and the node still stopped "cleanly". `close` now refuses
    /// writes from the call on, and everything taken before is durable.
    #[test]
    fn close_takes_no_write_and_makes_every_earlier_one_durable() {
        block_on(async {
            let config = small_buffered();
            let (backend, engine) = open_mem(&config).await;
            for i in 0..10u32 {
                engine.put(&i.to_le_bytes(), b"", &[1; 100], 0).await.unwrap();
            }
            let mut closing = Box::pin(engine.close());
            // Before the close has run at all, and while it runs.
            assert!(matches!(engine.put(b"late", b"", b"v", 0).await, Err(StorageError::Closed)));
            let _ = futures_lite::future::poll_once(&mut closing).await;
            assert!(matches!(engine.delete(b"late", b"", 0).await, Err(StorageError::Closed)));
            closing.await.unwrap();
            assert!(matches!(engine.put(b"late", b"", b"v", 0).await, Err(StorageError::Closed)));
            drop(engine);
            backend.crash(7, true);
            let (engine, _) = Engine::open(backend.clone(), config).await.unwrap();
            assert_eq!(engine.len(), 10, "every write taken before the close is there after a power cut");
            assert!(engine.get(b"late").await.unwrap().is_none());
        })
    }

    /// A flush dropped while it writes a sealed segment's hint (its task
    /// cancelled) leaves the seal to the next flush, which must write the
    /// same hint: an open replays it instead of scanning the segment.
    #[test]
    fn a_seal_cut_short_in_its_hint_is_redone_with_the_whole_hint() {
        block_on(async {
            let config = small_buffered();
            let (backend, engine) = open_mem(&config).await;
            // More than a segment, all still in the write buffer.
            for i in 0..40u32 {
                engine.put(&i.to_le_bytes(), b"", &[7; 1000], 0).await.unwrap();
            }
            let hint_tmp = format!("{}.tmp", hint_file_name(1));
            let mut flush = Box::pin(engine.sync());
            loop {
                assert!(futures_lite::future::poll_once(&mut flush).await.is_none(), "done before the hint");
                if backend.list().await.unwrap().contains(&hint_tmp) {
                    break;
                }
            }
            drop(flush);
            engine.sync().await.unwrap();
            drop(engine);
            let (engine, report) = Engine::open(backend.clone(), config).await.unwrap();
            assert_eq!(report.keys, 40, "{report:?}");
            for i in 0..40u32 {
                assert_eq!(engine.get(&i.to_le_bytes()).await.unwrap().unwrap().value(), &[7; 1000], "key {i}");
            }
        })
    }

    /// An engine under `fsync = always` that wrote `kept` and `lost` (v1,
    /// durable) and then failed writing `lost` v2: its config, its backend
    /// (writes failing), and the failed engine.
    async fn failed_after_kept_and_lost() -> (EngineConfig, MemBackend, Engine<MemBackend>) {
        let config = EngineConfig { max_value_len: 1024, ..Default::default() };
        assert_eq!(config.fsync, FsyncPolicy::Always);
        let (backend, engine) = open_mem(&config).await;
        engine.put(b"kept", b"", b"v1", 0).await.unwrap();
        engine.put(b"lost", b"", b"v1", 0).await.unwrap();
        backend.fail_writes(true);
        assert!(engine.put(b"lost", b"", b"v2", 0).await.is_err(), "the write fails");
        assert!(engine.failed().is_some());
        (config, backend, engine)
    }

    /// After a failed write the engine shows none of the records it never
    /// wrote (a full disk, say): they were not acknowledged, and a restart
    /// would take them back. What it had written stays readable.
    #[test]
    fn a_failed_engine_shows_no_record_it_never_wrote() {
        block_on(async {
            let (config, backend, engine) = failed_after_kept_and_lost().await;
            assert!(matches!(engine.get(b"lost").await, Err(StorageError::Failed(_))), "v2 was never written");
            assert_eq!(engine.get(b"kept").await.unwrap().unwrap().value(), b"v1");
            backend.fail_writes(false);
            drop(engine);
            // What a restart reads back: v1, which the failed engine did not
            // contradict.
            let (engine, _) = Engine::open(backend.clone(), config).await.unwrap();
            assert_eq!(engine.get(b"lost").await.unwrap().unwrap().value(), b"v1");
        })
    }

    /// Found by a review: `settle_record` (a replica's GET, and
    /// `Store::get`, wait in it) checked `failed` before whether the record
    /// was already durable, so a failed engine, which keeps what it wrote
    /// readable (above), refused every read of a durable key that way.
    #[test]
    fn a_failed_engine_settles_a_record_that_was_durable_before_it_failed() {
        block_on(async {
            let (_, _backend, engine) = failed_after_kept_and_lost().await;
            let rec = engine.get(b"kept").await.unwrap().unwrap();
            assert!(engine.unsettled_read(rec.id()).is_none(), "durable: a read need not wait");
            engine.settle_record(rec.id()).await.expect("a durable record settles at once, failed engine or not");
        })
    }

    /// No room to preallocate a whole segment is not a full disk: the
    /// segment grows as it is written, and writes go on.
    #[test]
    fn a_segment_that_cannot_be_preallocated_grows_as_written() {
        block_on(async {
            let config = small();
            assert!(config.preallocate);
            let (backend, engine) = open_mem(&config).await;
            backend.no_room_to_preallocate(true);
            for i in 0..100u32 {
                engine.put(&i.to_le_bytes(), b"", &[4; 1000], 0).await.unwrap();
            }
            assert!(engine.stats().segments_sealed >= 2, "new segments were made");
            assert!(engine.full().is_none() && engine.failed().is_none());
            drop(engine);
            let (engine, _) = Engine::open(backend, config).await.unwrap();
            assert_eq!(engine.get(&99u32.to_le_bytes()).await.unwrap().unwrap().value(), &[4; 1000]);
        })
    }

    /// Writes wait for compaction once its backlog reaches the stall
    /// backlog, but only while something drives compaction: a write then
    /// waits before it is taken (nothing of it is in the log or readable)
    /// until a pass has brought the backlog back, and the end of the
    /// driver lets waiting writes go.
    #[test]
    fn writes_wait_for_compaction_only_while_it_is_behind_and_driven() {
        block_on(async {
            let config = EngineConfig { write_stall_backlog: 2.0, ..small_buffered() };
            let (_backend, engine) = open_mem(&config).await;
            // One segment's worth of live data (the backlog's floor) and
            // about nine segments of garbage.
            overwrite_rounds(&engine, 0..10).await;
            let backlog = engine.compaction_backlog();
            assert!(backlog >= 2.0, "{backlog}");
            // Nobody drives compaction yet: writes do not wait.
            engine.put(b"free", b"", b"v", 0).await.unwrap();
            assert!(!engine.write_stalled());
            let check = engine.handle_compaction_check();
            assert!(check.stalled && check.stalls == 1 && check.backlog >= 2.0, "{check:?}");
            let mut put = std::pin::pin!(engine.put(b"held", b"", b"v", 0));
            assert!(futures_lite::future::poll_once(&mut put).await.is_none(), "it waits for compaction");
            assert!(engine.get(b"held").await.unwrap().is_none(), "and is not taken meanwhile");
            let done = engine.compact(0).await.unwrap();
            assert!(done.segments_removed > 0, "{done:?}");
            assert!(!engine.write_stalled());
            assert!(futures_lite::future::poll_once(&mut put).await.is_some_and(|r| r.is_ok()), "taken");
            assert_eq!(engine.get(b"held").await.unwrap().unwrap().value(), b"v");
            let st = engine.stats();
            assert!(!st.compaction_stalled && st.compaction_stalled_writes == 1, "{st:?}");
            // Behind again, then the driver stops: writes go on.
            overwrite_rounds(&engine, 10..20).await;
            assert!(engine.handle_compaction_check().stalled);
            engine.handle_compaction_stopped();
            assert!(!engine.write_stalled());
            engine.put(b"free", b"", b"w", 0).await.unwrap();
            assert_eq!(engine.stats().compaction_stalls, 2);
        })
    }

    /// A segment already gone when compaction removes it (a batch that
    /// failed after unlinking it, at a later removal or the directory
    /// sync, left it accounted) is removed from the books, not an error
    /// that every later pass, taking it first, would hit again.
    #[test]
    fn compaction_removes_a_segment_an_earlier_failed_batch_unlinked() {
        block_on(async {
            let config = small_buffered();
            let (backend, engine) = open_mem(&config).await;
            overwrite_rounds(&engine, 0..10).await;
            let segments = engine.stats().segments;
            backend.remove(&segment_file_name(1)).await.unwrap();
            let done = engine.compact(0).await.expect("the missing segment is no error");
            assert!(done.segments_removed >= 2, "{done:?}");
            assert!(engine.stats().segments <= segments - 2);
            assert!(!backend.list().await.unwrap().contains(&hint_file_name(1)));
            for i in 0..20u32 {
                assert_eq!(engine.get(&i.to_le_bytes()).await.unwrap().unwrap().value(), &[9; 1000]);
            }
        })
    }

    /// A segment lost while its hint file remains is refused at open, not
    /// skipped (its keys would read as missing, or as older values).
    #[test]
    fn a_hint_without_its_segment_is_refused_at_open() {
        block_on(async {
            let config = small();
            let (backend, engine) = open_mem(&config).await;
            for i in 0..100u32 {
                engine.put(&i.to_le_bytes(), b"", &[3; 1000], 0).await.unwrap();
            }
            assert!(engine.stats().segments_sealed >= 2);
            drop(engine);
            assert!(backend.list().await.unwrap().contains(&hint_file_name(1)));
            backend.remove(&segment_file_name(1)).await.unwrap();
            let e = Engine::open(backend.clone(), config.clone()).await.err().expect("refused");
            assert!(e.to_string().contains("seg-00000001.log is missing"), "{e}");
            // Removing the hint too is the way to start without them.
            backend.remove(&hint_file_name(1)).await.unwrap();
            Engine::open(backend, config).await.unwrap();
        })
    }

    /// A disk of `segments` small segments (`small_buffered`'s) holding
    /// an engine under `fsync` whose disk reserve is four of them and
    /// whose writes never wait for compaction.
    async fn open_small_disk(segments: u64, fsync: FsyncPolicy) -> (MemBackend, Engine<MemBackend>) {
        let seg = small_buffered().segment_size;
        let config =
            EngineConfig { write_stall_backlog: 0.0, disk_reserve_bytes: Some(4 * seg), fsync, ..small_buffered() };
        let backend = MemBackend::new();
        backend.set_capacity(Some(segments * seg));
        let (engine, _) = Engine::open(backend.clone(), config).await.unwrap();
        (backend, engine)
    }

    /// Puts `value` under each key of `keys` in turn, writing the buffer
    /// out after every 20 (as the shell's flusher would), until one is
    /// refused for lack of space; records what was taken in `model`.
    /// Returns the refusal's message.
    async fn put_until_refused(
        engine: &Engine<MemBackend>,
        keys: impl Iterator<Item = (u32, u8)>,
        model: &mut BTreeMap<u32, u8>,
    ) -> String {
        for (n, (key, value)) in keys.enumerate() {
            match engine.put(&key.to_le_bytes(), b"", &[value; 1000], 0).await {
                Ok(_) => model.insert(key, value),
                Err(StorageError::DiskFull(why)) => return why,
                Err(e) => panic!("put {key}: {e}"),
            };
            if n % 20 == 19 {
                engine.flush().await.unwrap();
            }
        }
        panic!("no write was refused");
    }

    /// Every key of `model` reads back with its value.
    async fn check_model(engine: &Engine<MemBackend>, model: &BTreeMap<u32, u8>) {
        for (key, value) in model {
            let got = engine.get(&key.to_le_bytes()).await.unwrap().expect("taken, so there");
            assert_eq!(got.value(), &[*value; 1000], "key {key}");
        }
    }

    /// Under the disk reserve, new writes are refused before the disk
    /// fills: nothing fails, nothing taken is lost, reads go on, and the
    /// compaction pass that makes room lets writes in again.
    #[test]
    fn a_disk_low_on_space_refuses_writes_until_compaction_makes_room() {
        block_on(async {
            let (backend, engine) = open_small_disk(12, FsyncPolicy::Never).await;
            let reserve = engine.config().disk_reserve();
            let mut model = BTreeMap::new();
            let overwrites = (0..100u8).flat_map(|round| (0..20u32).map(move |key| (key, round)));
            let why = put_until_refused(&engine, overwrites, &mut model).await;
            assert!(why.contains("reserve kept for compaction"), "{why}");
            let free = backend.free_space().unwrap();
            assert!(free < reserve && free > reserve / 2, "refused in time: {free} of {reserve}");
            assert!(engine.full().is_none() && engine.failed().is_none(), "the disk never filled");
            let st = engine.stats();
            assert!(st.low_space && st.low_space_refusals == 1 && st.disk_free_bytes == Some(free), "{st:?}");
            assert_eq!(st.low_space_episodes, 1);
            assert!(matches!(engine.put(b"new", b"", b"v", 0).await, Err(StorageError::DiskFull(_))));
            check_model(&engine, &model).await;
            let done = engine.compact(0).await.unwrap();
            assert!(done.segments_removed > 0, "{done:?}");
            assert!(!engine.stats().low_space, "room again: {:?}", backend.free_space());
            engine.put(b"new", b"", b"v", 0).await.unwrap();
            check_model(&engine, &model).await;
            // What compaction moved is on disk for good.
            engine.sync().await.unwrap();
            drop(engine);
            backend.crash(7, false);
            let (engine, _) = Engine::open(backend.clone(), small_buffered()).await.unwrap();
            check_model(&engine, &model).await;
        })
    }

    /// Writes taken between two looks at the free space count against it:
    /// however many are appended while nothing is written (a flush under
    /// way, the `never` buffer), they cannot pass the reserve, and the
    /// flush that writes them finds room.
    #[test]
    fn writes_buffered_between_looks_count_against_the_reserve() {
        block_on(async {
            let (_backend, engine) = open_small_disk(7, FsyncPolicy::Never).await;
            let mut taken = 0u32;
            let why = loop {
                match engine.put_if_now(Kind::Value, &taken.to_le_bytes(), b"", &[1; 1000], 0, None) {
                    Ok(Some(_)) => taken += 1,
                    Ok(None) => panic!("{taken}: no conflict can happen here"),
                    Err(StorageError::DiskFull(why)) => break why,
                    Err(e) => panic!("{taken}: {e}"),
                }
                assert!(taken < 1000, "nothing was refused");
            };
            assert!(why.contains("reserve kept for compaction") && taken > 50, "{taken}: {why}");
            engine.flush().await.unwrap();
            assert!(engine.full().is_none() && engine.failed().is_none());
            for key in 0..taken {
                assert_eq!(engine.get(&key.to_le_bytes()).await.unwrap().unwrap().value(), &[1; 1000]);
            }
        })
    }

    /// Under `always`, where a spare segment is kept ready, none is made
    /// while the disk is low on space (it would take a segment of the
    /// reserve for writes that are refused); once there is room, one is.
    #[test]
    fn no_spare_is_made_while_low_on_space() {
        block_on(async {
            let (backend, engine) = open_small_disk(12, FsyncPolicy::Always).await;
            assert!(engine.config().keeps_spare());
            let mut model = BTreeMap::new();
            let overwrites = (0..100u8).flat_map(|round| (0..20u32).map(move |key| (key, round)));
            put_until_refused(&engine, overwrites, &mut model).await;
            // Nothing here has made a spare yet (the shell's loop does).
            let spare = || async { backend.list().await.unwrap().iter().any(|n| n == SPARE_SEGMENT) };
            assert!(engine.stats().low_space && !spare().await);
            engine.prepare_spare().await.unwrap();
            assert!(!spare().await, "no spare while low on space");
            assert!(engine.compact(0).await.unwrap().segments_removed > 0);
            assert!(!engine.stats().low_space);
            engine.prepare_spare().await.unwrap();
            assert!(spare().await, "a spare once there is room");
            check_model(&engine, &model).await;
        })
    }

    /// A disk low on space and full of live data: compaction finds nothing
    /// to reclaim (and no pass is due), new values stay refused, but
    /// deletes are taken (while half the reserve and a segment are free),
    /// a pass is due for their garbage, and it takes garbage it would
    /// leave under its usual threshold, until writes are taken again.
    #[test]
    fn low_on_space_deletes_are_taken_and_compaction_takes_less_garbage() {
        block_on(async {
            let (backend, engine) = open_small_disk(12, FsyncPolicy::Never).await;
            let mut model = BTreeMap::new();
            put_until_refused(&engine, (0..10_000u32).map(|key| (key, 1)), &mut model).await;
            let check = engine.handle_compaction_check();
            assert!(check.low_space && check.low_reclaimable == 0, "nothing a pass could take: none due {check:?}");
            assert_eq!(engine.compact(0).await.unwrap().segments_removed, 0, "all live");
            assert!(matches!(engine.put(b"new", b"", b"v", 0).await, Err(StorageError::DiskFull(_))));
            // A third of the keys deleted: a third of each segment garbage,
            // under the threshold of one half.
            let deleted: Vec<u32> = model.keys().copied().filter(|k| k % 3 == 0).collect();
            for key in &deleted {
                engine.delete(&key.to_le_bytes(), b"", 0).await.unwrap();
                model.remove(key);
            }
            engine.flush().await.unwrap();
            let check = engine.handle_compaction_check();
            assert!(check.low_space && check.low_reclaimable > 0, "the deletes' garbage: a pass is due {check:?}");
            assert_eq!(check.shares(), COMPACTION_SHARES_MAX);
            let done = engine.compact(0).await.unwrap();
            assert!(done.segments_removed > 0, "{done:?}");
            assert!(!engine.stats().low_space, "room again: {:?}", backend.free_space());
            engine.put(b"new", b"", b"v", 0).await.unwrap();
            check_model(&engine, &model).await;
            for key in deleted {
                assert!(engine.get(&key.to_le_bytes()).await.unwrap().is_none_or(|r| r.is_tombstone()), "{key}");
            }
        })
    }

    /// A full disk stops writes without failing the engine: a write that
    /// was waiting for its flush hears `DiskFull` (and is written once
    /// there is room), new writes are refused, reads go on, and a tick
    /// after space came back writes what was buffered and takes writes
    /// again. A failed sync is still fatal.
    #[test]
    fn a_full_disk_refuses_writes_until_there_is_room_again() {
        block_on(async {
            // Small segments: the next write needs a new one (created and
            // preallocated: where a real disk runs out).
            let config = small();
            assert_eq!(config.fsync, FsyncPolicy::Always);
            let (backend, engine) = open_mem(&config).await;
            for i in 0..20u32 {
                engine.put(&i.to_le_bytes(), b"", &[1; 1000], 0).await.unwrap();
            }
            backend.no_space(true);
            let mut waited = None;
            for i in 20..200u32 {
                match engine.put(&i.to_le_bytes(), b"", &[2; 1000], 0).await {
                    Ok(_) => {}
                    Err(StorageError::DiskFull(_)) => {
                        waited = Some(i);
                        break;
                    }
                    Err(e) => panic!("put {i}: {e}"),
                }
            }
            let waited = waited.expect("some write ran out of space");
            assert!(engine.failed().is_none() && engine.full().is_some());
            // Refused at once, not appended: it will never be written.
            let refused = 1000u32.to_le_bytes();
            assert!(matches!(engine.put(&refused, b"", b"x", 0).await, Err(StorageError::DiskFull(_))));
            assert!(engine.get(&refused).await.unwrap().is_none());
            // Reads of what is written go on; the write that waited is not
            // shown until it is written.
            assert_eq!(engine.get(&0u32.to_le_bytes()).await.unwrap().unwrap().value(), &[1; 1000]);
            assert!(matches!(engine.get(&waited.to_le_bytes()).await, Err(StorageError::DiskFull(_))));
            // Ticks while there is no room change nothing.
            engine.tick().await.unwrap();
            assert!(engine.full().is_some());
            // Room again: the next tick writes and syncs what was buffered.
            backend.no_space(false);
            engine.tick().await.unwrap();
            assert!(engine.full().is_none() && engine.failed().is_none());
            assert_eq!(engine.get(&waited.to_le_bytes()).await.unwrap().unwrap().value(), &[2; 1000]);
            engine.put(b"after", b"", b"v", 0).await.unwrap();
            // A power cut keeps everything but the refused write.
            drop(engine);
            backend.crash(1, false);
            let (engine, _) = Engine::open(backend.clone(), config.clone()).await.unwrap();
            for i in 0..=waited {
                let want = if i < 20 { [1u8; 1000] } else { [2; 1000] };
                assert_eq!(engine.get(&i.to_le_bytes()).await.unwrap().unwrap().value(), &want, "key {i}");
            }
            assert_eq!(engine.get(b"after").await.unwrap().unwrap().value(), b"v");
            assert!(engine.get(&refused).await.unwrap().is_none());
            // Out of space at a sync is another matter: fatal, as any
            // failed sync.
            backend.fail_syncs(true);
            assert!(engine.put(b"s", b"", b"v", 0).await.is_err());
            assert!(engine.failed().is_some());
        })
    }

    /// Each new segment takes the spare when there is one (by a rename),
    /// and is created as before when there is none; an open keeps a spare
    /// that was filled, and removes one left half filled or of no use to
    /// its configuration.
    #[test]
    fn segments_take_the_spare_when_one_is_ready() {
        block_on(async {
            let config = small();
            assert_eq!(config.fsync, FsyncPolicy::Always);
            let (backend, engine) = open_mem(&config).await;
            let has = |name: &'static str| {
                let backend = backend.clone();
                async move { backend.list().await.unwrap().iter().any(|n| n == name) }
            };
            engine.prepare_spare().await.unwrap();
            assert!(has(SPARE_SEGMENT).await && !has(SPARE_FILLING).await);
            engine.put(b"a", b"", &[1; 1000], 0).await.unwrap();
            assert!(!has(SPARE_SEGMENT).await, "taken by the first segment");
            // The next segments find no spare and are created.
            for i in 0..100u32 {
                engine.put(&i.to_le_bytes(), b"", &[2; 1000], 0).await.unwrap();
            }
            assert!(engine.stats().segments_sealed >= 2);
            engine.prepare_spare().await.unwrap();
            drop(engine);
            // A restart keeps the filled spare: the first segment takes it.
            let (engine, report) = Engine::open(backend.clone(), config.clone()).await.unwrap();
            assert_eq!(report.torn_tail_bytes, 0, "the spare's zeros past the records: {report:?}");
            assert!(has(SPARE_SEGMENT).await, "kept at open");
            engine.put(b"b", b"", b"v", 0).await.unwrap();
            assert!(!has(SPARE_SEGMENT).await, "taken by the reopened engine's first segment");
            assert_eq!(engine.get(b"a").await.unwrap().unwrap().value(), &[1; 1000]);
            assert_eq!(engine.get(&99u32.to_le_bytes()).await.unwrap().unwrap().value(), &[2; 1000]);
            // A spare that cannot be made (a full disk) leaves no file and
            // fails no write.
            backend.fail_writes(true);
            assert!(engine.prepare_spare().await.is_err());
            assert!(!has(SPARE_FILLING).await && !has(SPARE_SEGMENT).await, "a failed spare is removed");
            backend.fail_writes(false);
            assert!(engine.failed().is_none());
            engine.put(b"c", b"", b"v", 0).await.unwrap();
            // A preparation dropped half way (its task cancelled) leaves
            // the next one free to start.
            assert!(!has(SPARE_SEGMENT).await);
            backend.hold_writes(true);
            {
                let mut half = Box::pin(engine.prepare_spare());
                for _ in 0..3 {
                    assert!(futures_lite::future::poll_once(&mut half).await.is_none(), "the fill waits on the disk");
                }
            }
            backend.hold_writes(false);
            engine.prepare_spare().await.unwrap();
            assert!(has(SPARE_SEGMENT).await && !has(SPARE_FILLING).await, "made after a dropped one");
            // One left half filled is removed at open.
            backend.write_file(SPARE_FILLING, &[0; 4096]).await.unwrap();
            drop(engine);
            let (engine, _) = Engine::open(backend.clone(), config.clone()).await.unwrap();
            assert!(!has(SPARE_FILLING).await, "a half-filled spare is removed at open");
            engine.prepare_spare().await.unwrap();
            drop(engine);
            // A configuration that keeps none (or another segment size)
            // removes a spare at open.
            for other in [
                EngineConfig { preallocate: false, ..config.clone() },
                EngineConfig { fsync: FsyncPolicy::Never, ..config.clone() },
                EngineConfig { segment_size: 64 * 1024, ..config.clone() },
            ] {
                let (engine, _) = Engine::open(backend.clone(), config.clone()).await.unwrap();
                engine.prepare_spare().await.unwrap();
                assert!(has(SPARE_SEGMENT).await);
                drop(engine);
                let (engine, _) = Engine::open(backend.clone(), other.clone()).await.unwrap();
                assert!(!has(SPARE_SEGMENT).await, "removed at open: {other:?}");
                engine.prepare_spare().await.unwrap();
                assert_eq!(has(SPARE_SEGMENT).await, other.keeps_spare(), "{other:?}");
            }
        })
    }

    /// The two halves of a conditional write: the append is visible to
    /// reads at once and checks its expectation then; only `settle` makes
    /// it durable under `fsync = always` (a power cut in between loses it,
    /// and that is why a write is acknowledged only after `settle`).
    #[test]
    fn a_write_appended_now_is_durable_only_once_settled() {
        block_on(async {
            let config = EngineConfig {
                segment_size: 64 * 1024,
                max_value_len: 4096,
                fsync: FsyncPolicy::Always,
                ..Default::default()
            };
            let (backend, engine) = open_mem(&config).await;
            let first = engine.put_if_now(Kind::Value, b"k", b"", b"v1", 1, None).unwrap().expect("key absent");
            let seen = engine.get(b"k").await.unwrap().expect("visible before it settles");
            assert_eq!(seen.value(), b"v1");
            assert!(
                engine.put_if_now(Kind::Value, b"k", b"", b"v2", 2, None).unwrap().is_none(),
                "the key is no longer absent"
            );
            let seq = engine.settle(first).await.unwrap();
            let second = engine.put_if_now(Kind::Value, b"k", b"", b"v2", 3, Some(seen.id())).unwrap().unwrap();
            assert!(engine.settle(second).await.unwrap() > seq);
            let third = engine.put_if_now(Kind::Value, b"k", b"", b"v3", 4, None).unwrap();
            assert!(third.is_none(), "stale expectation");
            let _never_settled = engine.put_if_now(Kind::Value, b"lost", b"", b"x", 6, None).unwrap().unwrap();
            drop(engine);
            backend.crash(7, false);
            let (engine, _) = Engine::open(backend, config).await.unwrap();
            assert_eq!(engine.get(b"k").await.unwrap().unwrap().value(), b"v2", "settled writes survive");
            assert!(engine.get(b"lost").await.unwrap().is_none(), "an unsettled write is not durable");
        })
    }

    /// A segment of records of assorted sizes; each record's offset and key.
    fn segment() -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
        let mut rng = fastrand::Rng::with_seed(11);
        let (mut data, mut want) = (Vec::new(), Vec::new());
        for i in 0..200u64 {
            let key = format!("key-{i}").into_bytes();
            let value = vec![i as u8; rng.usize(0..3000)];
            want.push((data.len() as u64, key.clone()));
            encode_record(&mut data, SEED, i, 0, Kind::Value, &key, b"m", &value);
        }
        (data, want)
    }

    /// Every record the reader gives, and how it ended; the same whether or
    /// not keys are asked for ahead, as compaction asks for them (up to 0,
    /// 1 and 8 ahead). The keys offered ahead are those of the records it
    /// then gives, in order, each once, and never more than asked ahead;
    /// where it stops at damage, also of records past it (only headers are
    /// read ahead, unverified).
    fn read(data: &[u8], piece: usize) -> (Vec<(u64, Vec<u8>)>, bool) {
        let runs: Vec<_> = [0, 1, 8].into_iter().map(|ahead| read_ahead(data, piece, ahead)).collect();
        for (ahead, (got, ended, offered)) in [0, 1, 8].into_iter().zip(&runs) {
            assert_eq!((got, ended), (&runs[0].0, &runs[0].1), "piece {piece}, {ahead} ahead: other records");
            let mut keys = got.iter().map(|(_, k)| k);
            let given = offered.iter().take_while(|k| keys.any(|g| g == *k)).count();
            assert!(
                given == offered.len() || !ended,
                "piece {piece}, {ahead} ahead: {:?} offered out of order or not given",
                offered[given]
            );
        }
        let (got, ended, _) = runs.into_iter().next().expect("three runs");
        (got, ended)
    }

    /// Records a reader gave, how it ended, and the keys offered ahead.
    type ReadAhead = (Vec<(u64, Vec<u8>)>, bool, Vec<Vec<u8>>);

    /// [`read`] with the keys `keys_ahead(ahead)` offers before each record.
    fn read_ahead(data: &[u8], piece: usize, ahead: usize) -> ReadAhead {
        let backend = MemBackend::new();
        block_on(async {
            backend.write_file("seg", data).await.unwrap();
            let file = backend.open("seg", false).await.unwrap();
            let mut reader = SegmentReader::new(&backend, &file, piece, SEED).await.unwrap();
            let (mut got, mut offered) = (Vec::new(), Vec::new());
            loop {
                reader.keys_ahead(ahead, |k| offered.push(k.to_vec()));
                assert!(reader.offered <= ahead, "{} offered with {ahead} asked", reader.offered);
                match reader.next().await.unwrap() {
                    Step::Record(off, r) => got.push((off, r.key.to_vec())),
                    Step::End => return (got, true, offered),
                    Step::Irregular => return (got, false, offered),
                }
            }
        })
    }

    #[test]
    fn the_segment_reader_gives_every_record_whatever_its_piece_size() {
        let (data, want) = segment();
        for piece in [1, 31, 100, 4096, COMPACTION_READ] {
            assert_eq!(read(&data, piece), (want.clone(), true), "piece {piece}");
        }
        assert_eq!(read(&[], 64), (vec![], true));
        // In one piece, every record but the first is offered ahead.
        let (_, _, offered) = read_ahead(&data, COMPACTION_READ, COMPACTION_PREFETCH);
        assert_eq!(offered.len(), want.len() - 1);
    }

    /// Regression (found by a review): a piece that ended up to 22 bytes
    /// into a record whose first bytes are zeros (the low bytes of its
    /// checksum) looked like the zeros after the last record, and an
    /// undamaged segment fell back to the whole-segment scan.
    #[test]
    fn a_piece_ending_in_a_record_that_starts_with_zeros_reads_on() {
        let mut first = Vec::new();
        encode_record(&mut first, SEED, 1, 0, Kind::Value, b"first", b"", b"v");
        // A record whose checksum's low two bytes are zero.
        let second = (0u64..)
            .map(|i| {
                let mut r = Vec::new();
                encode_record(&mut r, SEED, 2, 0, Kind::Value, b"second", b"", &i.to_le_bytes());
                r
            })
            .find(|r| r[0] == 0 && r[1] == 0)
            .expect("one in 65,536");
        let data = [first.clone(), second].concat();
        let want = vec![(0, b"first".to_vec()), (first.len() as u64, b"second".to_vec())];
        for into in [1, 2] {
            assert_eq!(read(&data, first.len() + into), (want.clone(), true), "{into} bytes into the record");
        }
    }

    #[test]
    fn the_segment_reader_leaves_damage_to_the_whole_segment_scan() {
        let (data, want) = segment();
        // A flipped byte in record 5: the records before it, then irregular.
        let mut flipped = data.clone();
        flipped[want[5].0 as usize + 40] ^= 0x5A;
        // A record cut short by the end of the file.
        let cut = &data[..data.len() - 10];
        // Zeros after the last record (a sealed segment has none).
        let mut zeros = data.clone();
        zeros.extend_from_slice(&[0u8; 100]);
        for piece in [7, 4096] {
            assert_eq!(read(&flipped, piece), (want[..5].to_vec(), false), "piece {piece}");
            assert_eq!(read(cut, piece), (want[..199].to_vec(), false), "piece {piece}");
            assert_eq!(read(&zeros, piece), (want.clone(), false), "piece {piece}");
        }
    }
}
