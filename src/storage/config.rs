//! Configuration of one shard's storage engine.
//!
//! Invariant: an [`EngineConfig`] that passed [`EngineConfig::validate`] can
//! store any record its limits admit (a largest record fits in a segment).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::core::partition::{validate_partitions, DEFAULT_PARTITIONS};
use crate::limits::{
    BLOCK_SIZE, DEFAULT_FLUSH_THRESHOLD, DEFAULT_MAX_VALUE_LEN, DEFAULT_SEGMENT_SIZE, MAX_KEY_LEN, MAX_META_LEN,
    MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, VALUE_LEN_HARD_CAP,
};
use crate::storage::format::record_len;
use crate::storage::scan::{DEFAULT_DISK_RESERVE_SEGMENTS, DEFAULT_WRITE_STALL_BACKLOG};

/// [`EngineConfig::tombstone_grace_ms`] that keeps every tombstone: the
/// age a tombstone would need is never reached (`may_drop_tombstone`
/// compares it with `now - timestamp`, which cannot exceed `now`).
pub const KEEP_TOMBSTONES: u64 = u64::MAX;

/// When a write is acknowledged relative to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Once durable: segments are opened `O_DSYNC`, and group commit
    /// batches concurrent writers into one synced write.
    Always,
    /// At once; the log is written and fdatasynced every so many
    /// milliseconds, so a power cut loses at most that much.
    Interval(u64),
    /// At once; the log is written when the buffer fills or on the flush
    /// timer and never fdatasynced (Dynamo's buffered writes). A process
    /// crash loses what was still buffered.
    Never,
}

impl FsyncPolicy {
    /// How often the shell should call `Engine::tick`.
    pub fn tick_ms(&self) -> u64 {
        match self {
            FsyncPolicy::Always => 10,
            FsyncPolicy::Interval(ms) => (*ms).max(1),
            FsyncPolicy::Never => 10,
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval(ms) => write!(f, "interval({ms})"),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// Accepts `always`, `never`, `interval(MS)`, `interval:MS` or `MSms`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "always" => return Ok(FsyncPolicy::Always),
            "never" => return Ok(FsyncPolicy::Never),
            _ => {}
        }
        let ms = s
            .strip_prefix("interval(")
            .and_then(|r| r.strip_suffix(')'))
            .or_else(|| s.strip_prefix("interval:"))
            .or_else(|| s.strip_suffix("ms"))
            .map(|n| n.trim().trim_end_matches("ms"));
        match ms.and_then(|n| n.parse::<u64>().ok()) {
            Some(ms) if ms > 0 => Ok(FsyncPolicy::Interval(ms)),
            _ => Err(format!("unknown fsync policy {s:?}: expected always, never or interval(MS) with MS > 0")),
        }
    }
}

impl Serialize for FsyncPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Settings of one shard's engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Partitions of the ring (power of two); the index is kept per partition.
    pub partitions: u32,
    /// Size at which the active segment is sealed (multiple of 4 KiB).
    pub segment_size: u64,
    /// Largest value accepted (up to `VALUE_LEN_HARD_CAP`).
    pub max_value_len: usize,
    pub fsync: FsyncPolicy,
    /// Memory the record cache may take, in bytes: the records it holds
    /// and what each costs besides (0 disables it). Reads are O_DIRECT, so
    /// no page cache stands between a miss and the disk. A node sets it
    /// from the memory it has (`NodeConfig::shard_engine_config`).
    pub cache_bytes: usize,
    /// Buffered bytes that start a flush under `interval`/`never`
    /// (see `DEFAULT_FLUSH_THRESHOLD` and `FLUSH_BACKLOG_THRESHOLDS`).
    pub flush_threshold: usize,
    /// Garbage ratio from which a sealed segment is compacted.
    pub compaction_threshold: f64,
    /// Age after which compaction may drop a tombstone ([`KEEP_TOMBSTONES`]:
    /// never, what a node of a cluster sets).
    pub tombstone_grace_ms: u64,
    /// How far compaction may fall behind before writes wait for it: the
    /// garbage it could reclaim against the live data (at least a
    /// segment's worth; `scan::compaction_backlog`). From here a write
    /// waits before it is taken until compaction has brought that down by
    /// a quarter, or by 256 MiB of garbage where that is less
    /// (`scan::write_stall`), which bounds the disk a shard takes to about
    /// `write_stall_backlog + 2` times its live data. 0: writes never
    /// wait, and the disk may fill.
    pub write_stall_backlog: f64,
    /// Free space on the data directory's file system under which writes
    /// are refused ([`StorageError::DiskFull`](crate::storage::StorageError::DiskFull)) while compaction goes on in it
    /// and reclaims what it can (`scan::low_space`); 0: none, and writes
    /// that outrun compaction fill the disk, which compaction then cannot
    /// empty. Default: [`DEFAULT_DISK_RESERVE_SEGMENTS`] segments (one
    /// shard's; a node sets it for all its shards, which share the file
    /// system: `NodeConfig::shard_engine_config`).
    pub disk_reserve_bytes: Option<u64>,
    /// Reserve each new segment's full size on disk when it is created;
    /// under a policy that syncs (`always`, `interval`), keep the next
    /// segment ready ahead as a zero-filled spare instead, so that syncs
    /// commit no file metadata (`Engine::prepare_spare`; one segment of
    /// disk held in reserve per shard).
    pub preallocate: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            partitions: DEFAULT_PARTITIONS,
            segment_size: DEFAULT_SEGMENT_SIZE,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            fsync: FsyncPolicy::Always,
            cache_bytes: 64 * 1024 * 1024,
            flush_threshold: DEFAULT_FLUSH_THRESHOLD,
            compaction_threshold: 0.5,
            tombstone_grace_ms: 24 * 3600 * 1000,
            write_stall_backlog: DEFAULT_WRITE_STALL_BACKLOG,
            disk_reserve_bytes: None,
            preallocate: true,
        }
    }
}

impl EngineConfig {
    /// Whether writes are acknowledged only once durable (`always`): the
    /// log's segments are then opened `O_DSYNC`, every segment write is
    /// synced as it is made, and no writer waits for a buffered flush's
    /// threshold (there is none to wait for).
    pub fn synced_writes(&self) -> bool {
        self.fsync == FsyncPolicy::Always
    }

    /// Whether the engine keeps a zero-filled spare segment ready
    /// (`Engine::prepare_spare`): with preallocation, under a policy that
    /// waits on syncs. Under `never` nothing waits on one, and the zeros
    /// would only double the disk writes (measured: no gain).
    pub fn keeps_spare(&self) -> bool {
        self.preallocate && self.fsync != FsyncPolicy::Never
    }

    /// Whether an open with this configuration keeps a spare segment of
    /// `size` bytes (a previous run filled it), or removes it.
    pub fn keeps_spare_of(&self, size: u64) -> bool {
        self.keeps_spare() && size == self.segment_size
    }

    /// The free space under which writes are refused (see
    /// [`Self::disk_reserve_bytes`]).
    pub fn disk_reserve(&self) -> u64 {
        self.disk_reserve_bytes.unwrap_or(DEFAULT_DISK_RESERVE_SEGMENTS * self.segment_size)
    }

    /// Largest record this configuration admits.
    pub fn max_record_len(&self) -> u64 {
        record_len(MAX_KEY_LEN, MAX_META_LEN, self.max_value_len) as u64
    }

    pub fn validate(&self) -> Result<(), String> {
        validate_partitions(self.partitions)?;
        if self.max_value_len > VALUE_LEN_HARD_CAP {
            return Err(format!("max_value_len {} exceeds the hard cap {VALUE_LEN_HARD_CAP}", self.max_value_len));
        }
        if !self.segment_size.is_multiple_of(BLOCK_SIZE as u64)
            || !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&self.segment_size)
        {
            return Err(format!(
                "segment_size {} must be a multiple of {BLOCK_SIZE} between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE}",
                self.segment_size
            ));
        }
        if self.segment_size < self.max_record_len() {
            return Err(format!(
                "segment_size {} is smaller than the largest record ({} bytes with max_value_len {})",
                self.segment_size,
                self.max_record_len(),
                self.max_value_len
            ));
        }
        // 0 would make every sealed segment due, a segment of live data
        // included: every pass would copy all the data again, forever.
        if !(self.compaction_threshold > 0.0 && self.compaction_threshold <= 1.0) {
            return Err("compaction_threshold must be over 0 and at most 1".into());
        }
        if !(self.write_stall_backlog.is_finite() && self.write_stall_backlog >= 0.0) {
            return Err(format!(
                "write_stall_backlog {} must be 0 (writes never wait for compaction) or a positive number",
                self.write_stall_backlog
            ));
        }
        if self.flush_threshold == 0 {
            return Err("flush_threshold must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        assert_eq!("interval(5)".parse(), Ok(FsyncPolicy::Interval(5)));
        assert_eq!("interval:7".parse(), Ok(FsyncPolicy::Interval(7)));
        assert_eq!("interval(3ms)".parse(), Ok(FsyncPolicy::Interval(3)));
        assert_eq!("20ms".parse(), Ok(FsyncPolicy::Interval(20)));
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
        assert!("interval(0)".parse::<FsyncPolicy>().is_err());
        assert_eq!(FsyncPolicy::Interval(5).to_string().parse(), Ok(FsyncPolicy::Interval(5)));
    }

    #[test]
    fn validation() {
        assert!(EngineConfig::default().validate().is_ok());
        let tiny = EngineConfig { segment_size: 4096, max_value_len: 100, ..Default::default() };
        assert!(tiny.validate().is_err(), "max key + max meta do not fit in 4 KiB");
        let ok = EngineConfig { segment_size: 32 * 1024, max_value_len: 100, ..Default::default() };
        assert!(ok.validate().is_ok());
        assert!(EngineConfig { max_value_len: VALUE_LEN_HARD_CAP + 1, ..Default::default() }.validate().is_err());
        assert!(EngineConfig { partitions: 3, ..Default::default() }.validate().is_err());
        assert!(EngineConfig { write_stall_backlog: -1.0, ..Default::default() }.validate().is_err());
        assert!(EngineConfig { write_stall_backlog: f64::NAN, ..Default::default() }.validate().is_err());
        assert!(EngineConfig { write_stall_backlog: 0.0, ..Default::default() }.validate().is_ok());
        // A threshold of 0 would recopy live segments forever (found by a
        // review); NaN and past 1 mean nothing.
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            let err = EngineConfig { compaction_threshold: bad, ..Default::default() }.validate().unwrap_err();
            assert!(err.contains("compaction_threshold"), "{bad}: {err}");
        }
        assert!(EngineConfig { compaction_threshold: 1.0, ..Default::default() }.validate().is_ok());
    }
}
