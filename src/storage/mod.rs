//! The per-shard storage engine: a Bitcask-like append-only log with an
//! in-memory index, written through io_uring.
//!
//! Code map: `format` (bytes on disk), `index` (key -> location and cache
//! tag), `cache` (tag -> record bytes, CLOCK), `log` (what the next write
//! is), `scan` (what recovery and compaction keep), `engine` (the async
//! driver), `backend` (the I/O trait and its glommio and in-memory
//! implementations), `config`.
//!
//! Invariant: `format`, `index`, `cache`, `log`, `scan` and `config` do no
//! I/O and never read the clock; all I/O goes through `backend::Backend`.

pub mod backend;
mod cache;
pub mod config;
pub mod engine;
pub mod format;
pub mod index;
pub mod log;
pub mod scan;

pub use config::{EngineConfig, FsyncPolicy};
pub use engine::{
    orphan_hint, CompactionCheck, CompactionStats, Engine, EngineStats, PendingWrite, Prefetch, Record, RecordId,
    RecoveryReport, ShardFiles, StorageError, SPARE_SEGMENT,
};
pub use format::Kind;
