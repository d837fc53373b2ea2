//! The append path of one shard's log, as plain data: what goes into the next
//! aligned write, when a segment is sealed, which position is written.
//!
//! Owns: the records appended but not yet written, grouped in one [`Chunk`]
//! per segment. The engine asks [`LogWriter::plan_flush`] for the next write,
//! performs it, and reports back with [`LogWriter::complete_flush`]; nothing
//! here does I/O. Invariants:
//! - a chunk's `bytes[0]` lies at file offset `base`, which is block aligned,
//!   and every byte before `base` in that segment is already written;
//! - every write covers `[base, round_up(base + end))` of one segment, so the
//!   last partial block is rewritten with the bytes appended since;
//! - chunks are written strictly in order: segment `s` is sealed (complete,
//!   truncated, synced, hinted) before any byte of `s + 1` reaches its file,
//!   so after a crash only the highest segment can have a torn tail.

use std::collections::VecDeque;

use crate::limits::BLOCK_SIZE;
use crate::storage::format::{encode_record, record_len, HintBuilder, HintStream, Kind, Seed};
use crate::storage::index::Loc;

/// A log position: (segment id, byte offset). Ordered like the log.
pub type Pos = (u32, u64);

/// Round `n` up to a whole number of blocks.
pub const fn round_up(n: u64) -> u64 {
    n.div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64
}

/// Round `n` down to a block boundary.
pub const fn round_down(n: u64) -> u64 {
    n / BLOCK_SIZE as u64 * BLOCK_SIZE as u64
}

/// Appended, not yet fully written bytes of one segment.
#[derive(Debug)]
pub struct Chunk {
    pub seg: u32,
    /// File offset of `bytes[0]`; block aligned.
    pub base: u64,
    pub bytes: Vec<u8>,
    /// Prefix of `bytes` already written to the file (the partial last block
    /// of an earlier write, kept to be rewritten with what follows it).
    pub written: usize,
    /// Whether the segment file exists (the first write creates it).
    pub file_exists: bool,
    /// No more appends: the next write of this chunk is its last and the
    /// segment is then sealed.
    pub sealed: bool,
    /// Hint entries of every record appended to this segment.
    pub hint: HintBuilder,
    /// The hint file, once a seal has asked for it ([`LogWriter::hint_stream`]):
    /// kept until the seal completes, so that a seal cut short (its flush
    /// dropped) is redone with the same hint, not an empty builder.
    sealed_hint: Option<HintStream>,
}

impl Chunk {
    fn new(seg: u32) -> Chunk {
        Chunk {
            seg,
            base: 0,
            bytes: Vec::new(),
            written: 0,
            file_exists: false,
            sealed: false,
            hint: HintBuilder::default(),
            sealed_hint: None,
        }
    }

    /// End of the segment's data (file offset).
    pub fn end(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
}

/// The next write to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushPlan {
    pub seg: u32,
    /// Create (and preallocate) the segment file first.
    pub create: bool,
    /// File offset of the write (the chunk's base).
    pub base: u64,
    /// Bytes of the chunk to write; the write is `round_up(end)` long, the
    /// rest zero.
    pub end: usize,
    /// After the write: truncate the file to `base + end`, fdatasync it and
    /// write its hint file.
    pub seal: bool,
}

impl FlushPlan {
    /// Length of the aligned write.
    pub fn write_len(&self) -> usize {
        round_up(self.end as u64) as usize
    }

    /// Position up to which the log is written once this plan completes.
    pub fn written_to(&self) -> Pos {
        (self.seg, self.base + self.end as u64)
    }
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub loc: Loc,
    pub seq: u64,
    /// Segment that was sealed to make room, if any.
    pub sealed: Option<u32>,
}

impl Appended {
    /// Position just past the record: the write is durable once the synced
    /// position reaches it.
    pub fn end(&self) -> Pos {
        (self.loc.seg, self.loc.off as u64 + self.loc.len as u64)
    }
}

/// The append state of one shard's log.
#[derive(Debug)]
pub struct LogWriter {
    segment_size: u64,
    /// The shard's checksum seed: every record is encoded here.
    seed: Seed,
    next_seq: u64,
    next_seg: u32,
    /// Front: oldest chunk with unwritten bytes; back: the active segment.
    chunks: VecDeque<Chunk>,
    written: Pos,
}

impl LogWriter {
    /// A writer whose first segment is `first_seg` (empty, not yet created)
    /// and whose first record gets `next_seq`.
    pub fn new(segment_size: u64, seed: Seed, first_seg: u32, next_seq: u64) -> LogWriter {
        assert!(segment_size.is_multiple_of(BLOCK_SIZE as u64));
        let mut chunks = VecDeque::new();
        chunks.push_back(Chunk::new(first_seg));
        LogWriter { segment_size, seed, next_seq, next_seg: first_seg + 1, chunks, written: (first_seg, 0) }
    }

    /// Lowest segment id that still has bytes in memory: segments below it
    /// are complete on disk (candidates for compaction).
    pub fn first_buffered_segment(&self) -> u32 {
        self.chunks.front().expect("always an active chunk").seg
    }

    /// Sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Position written so far.
    pub fn written(&self) -> Pos {
        self.written
    }

    /// Position the log will reach once everything buffered is written.
    pub fn appended(&self) -> Pos {
        let back = self.chunks.back().expect("always an active chunk");
        (back.seg, back.end())
    }

    /// Bytes appended but not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.bytes.len() - c.written).sum()
    }

    /// Appends one record with the next sequence number.
    pub fn append(&mut self, ts: u64, kind: Kind, key: &[u8], meta: &[u8], value: &[u8]) -> Appended {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.append_with_seq(seq, ts, kind, key, meta, value)
    }

    /// Appends a record keeping its original sequence number (compaction).
    pub fn append_with_seq(
        &mut self,
        seq: u64,
        ts: u64,
        kind: Kind,
        key: &[u8],
        meta: &[u8],
        value: &[u8],
    ) -> Appended {
        let len = record_len(key.len(), meta.len(), value.len()) as u64;
        assert!(len <= self.segment_size, "record of {len} bytes exceeds the segment size");
        let mut sealed = None;
        let back = self.chunks.back_mut().expect("always an active chunk");
        if back.end() + len > self.segment_size {
            back.sealed = true;
            sealed = Some(back.seg);
            let seg = self.next_seg;
            self.next_seg += 1;
            self.chunks.push_back(Chunk::new(seg));
        }
        let back = self.chunks.back_mut().expect("always an active chunk");
        let off = back.end();
        let n = encode_record(&mut back.bytes, self.seed, seq, ts, kind, key, meta, value) as u64;
        debug_assert_eq!(n, len);
        let tombstone = kind == Kind::Tombstone;
        back.hint.push(off as u32, len as u32, tombstone, key, seq);
        Appended { loc: Loc { seg: back.seg, off: off as u32, len: len as u32, tombstone }, seq, sealed }
    }

    /// The record at `loc` if it is still in memory (not yet drained).
    pub fn read_buffered(&self, loc: Loc) -> Option<&[u8]> {
        let c = self.chunks.iter().find(|c| c.seg == loc.seg)?;
        let off = loc.off as u64;
        if off < c.base {
            return None;
        }
        let start = (off - c.base) as usize;
        c.bytes.get(start..start + loc.len as usize)
    }

    /// The next write, or `None` if everything appended is written.
    pub fn plan_flush(&self) -> Option<FlushPlan> {
        let c = self.chunks.front().expect("always an active chunk");
        if c.bytes.len() == c.written && !c.sealed {
            return None;
        }
        Some(FlushPlan { seg: c.seg, create: !c.file_exists, base: c.base, end: c.bytes.len(), seal: c.sealed })
    }

    /// The bytes a plan writes (its first `end` bytes; pad to `write_len`).
    pub fn plan_bytes(&self, plan: &FlushPlan) -> &[u8] {
        let c = self.chunks.front().expect("always an active chunk");
        assert_eq!((c.seg, c.base), (plan.seg, plan.base), "plan does not match the front chunk");
        &c.bytes[..plan.end]
    }

    /// The hint file of the chunk a sealing plan completes, to be read out
    /// a piece at a time from its start (the chunk is sealed: it gets no
    /// more entries). Asked again by a redone seal, it is the same file.
    pub fn hint_stream(&mut self, plan: &FlushPlan) -> HintStream {
        let c = self.chunks.front_mut().expect("always an active chunk");
        assert!(plan.seal && c.seg == plan.seg);
        let (seg, data_len) = (c.seg, plan.base + plan.end as u64);
        c.sealed_hint.get_or_insert_with(|| std::mem::take(&mut c.hint).into_stream(seg, data_len)).rewound()
    }

    /// Records that `plan` was written (and, for a seal, truncated, synced
    /// and hinted): drops the whole blocks it covered from memory.
    pub fn complete_flush(&mut self, plan: &FlushPlan) {
        let c = self.chunks.front_mut().expect("always an active chunk");
        assert_eq!((c.seg, c.base), (plan.seg, plan.base), "completion does not match the front chunk");
        assert!(plan.end <= c.bytes.len());
        self.written = plan.written_to();
        c.file_exists = true;
        if plan.seal {
            assert_eq!(plan.end, c.bytes.len(), "a sealed chunk cannot grow");
            self.chunks.pop_front();
            assert!(!self.chunks.is_empty(), "sealing always opens the next segment");
            return;
        }
        let drop = round_down(plan.end as u64) as usize;
        c.bytes.drain(..drop);
        c.base += drop as u64;
        c.written = plan.end - drop;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::format::decode_record;

    const SEED: Seed = Seed::format_3(0x5eed);

    fn put(w: &mut LogWriter, key: &str, val_len: usize) -> Appended {
        w.append(1, Kind::Value, key.as_bytes(), b"", &vec![b'v'; val_len])
    }

    /// Simulates a file: applies plans the way the engine does.
    fn apply(w: &mut LogWriter, files: &mut std::collections::BTreeMap<u32, Vec<u8>>) -> Option<FlushPlan> {
        let plan = w.plan_flush()?;
        let mut buf = w.plan_bytes(&plan).to_vec();
        buf.resize(plan.write_len(), 0);
        assert_eq!(plan.base % BLOCK_SIZE as u64, 0);
        let f = files.entry(plan.seg).or_default();
        if f.len() < (plan.base as usize + buf.len()) {
            f.resize(plan.base as usize + buf.len(), 0);
        }
        f[plan.base as usize..plan.base as usize + buf.len()].copy_from_slice(&buf);
        if plan.seal {
            f.truncate(plan.base as usize + plan.end);
        }
        w.complete_flush(&plan);
        Some(plan)
    }

    #[test]
    fn flushes_rewrite_the_partial_block_and_keep_records_readable() {
        let mut w = LogWriter::new(1 << 20, SEED, 1, 1);
        let mut files = Default::default();
        let mut locs: Vec<Appended> = Vec::new();
        // Reads served from memory after a flush, of records appended
        // before it (the partial block a flush keeps).
        let mut kept_hits = 0;
        for i in 0..200 {
            let a = put(&mut w, &format!("k{i}"), 37 + i);
            // Nothing has been written since it was appended: in memory.
            let b = w.read_buffered(a.loc).unwrap_or_else(|| panic!("record {i}, just appended, is not buffered"));
            assert_eq!(decode_record(b, SEED).unwrap().seq, a.seq);
            locs.push(a);
            let flushed = i % 7 == 0 && apply(&mut w, &mut files).is_some();
            for a in &locs {
                if let Some(b) = w.read_buffered(a.loc) {
                    assert_eq!(decode_record(b, SEED).unwrap().seq, a.seq);
                    kept_hits += usize::from(flushed);
                }
            }
        }
        assert!(kept_hits > 0, "no record stayed readable from memory across a flush");
        while apply(&mut w, &mut files).is_some() {}
        assert_eq!(w.pending_bytes(), 0);
        let f = &files[&1];
        for a in &locs {
            let r = decode_record(&f[a.loc.off as usize..], SEED).unwrap();
            assert_eq!(r.seq, a.seq);
        }
        assert_eq!(w.written(), w.appended());
    }

    #[test]
    fn segments_seal_at_the_size_limit_and_flush_in_order() {
        let mut w = LogWriter::new(8192, SEED, 1, 1);
        let mut files = Default::default();
        let mut sealed = Vec::new();
        for i in 0..100 {
            let a = put(&mut w, &format!("key{i}"), 200);
            assert!(a.loc.off as u64 + a.loc.len as u64 <= 8192);
            sealed.extend(a.sealed);
        }
        assert!(sealed.len() >= 2);
        let mut plans = Vec::new();
        while let Some(p) = apply(&mut w, &mut files) {
            plans.push(p);
        }
        let segs: Vec<u32> = plans.iter().map(|p| p.seg).collect();
        assert!(segs.windows(2).all(|s| s[0] <= s[1]), "segments flushed out of order: {segs:?}");
        assert!(plans.iter().filter(|p| p.seal).count() == sealed.len());
        for s in sealed {
            assert!(files[&s].len() <= 8192);
        }
    }

    #[test]
    fn plan_is_none_when_idle() {
        let mut w = LogWriter::new(8192, SEED, 1, 1);
        assert_eq!(w.plan_flush(), None);
        put(&mut w, "a", 1);
        let p = w.plan_flush().unwrap();
        assert!(p.create && !p.seal && p.end > 0 && p.write_len() == BLOCK_SIZE);
        w.complete_flush(&p);
        assert_eq!(w.plan_flush(), None);
        assert!(!w.plan_flush().is_some_and(|p| p.create));
    }
}
