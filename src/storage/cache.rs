//! The record cache: the bytes of recently written or read records, in a
//! slab evicted by CLOCK (second chance), found through the index.
//!
//! Owns: the cached records and the byte count they hold. Invariant: after
//! every `insert`, `bytes <= budget`, and `bytes` is the sum of the
//! [`charge`]s of the occupied entries: a record's length plus what
//! holding it costs in memory besides ([`ENTRY_OVERHEAD`]), so that the
//! budget is, approximately, the memory the cache takes, not only the
//! records' bytes (the slab's spare capacity and its free list are not
//! counted). The number of entries never exceeds what a tag can name
//! ([`MAX_BUDGET`]). Every record it holds was checksum-verified as
//! it was read from disk, or encoded by this process (the engine's
//! write-through), so a hit is not hashed again.
//!
//! # Found through the index, not through a map of its own
//!
//! A lookup used to probe the index for the key's location and then a hash
//! map from location to bytes: two tables, each a cache miss or two on a
//! shard whose keys do not fit in the CPU caches (a profile of a shard
//! under SET load put 15% of its time in the two probes). Now `insert`
//! returns a [`CacheTag`], the index keeps it in the key's slot, and `get`
//! goes straight to the entry. The index also compares a lookup's key
//! against the cached record's own key (`key_of`) instead of its key arena,
//! one miss fewer again: the record has to be read anyway.
//!
//! A tag is a hint, not a reference: an entry may be evicted and reused
//! for another record while a slot still holds its tag. Every entry keeps
//! the id of the record it holds (its location, never reused), and every
//! access names the id it expects, so a stale tag reads as a miss; an
//! index slot never needs updating when its entry goes.
//!
//! Why CLOCK and not a linked-list LRU: a hit is on every GET's path. An LRU
//! hit relinks list nodes, several cache misses on records nobody else
//! touches (11% of a shard serving GETs, profiled). A CLOCK hit sets one
//! flag. Eviction approximates LRU: an entry read since the hand last
//! passed gets a second chance.
//!
//! Does no I/O and never reads the clock.

use std::rc::Rc;

use crate::storage::format::{record_key, RECORD_HEADER_LEN};
use crate::storage::index::{prefetch_line, CacheTag};

/// How much of a record a prefetch fetches: a small record whole (header,
/// key, versions and value: about 190 bytes for a 100-byte value); of a big
/// one, the header, key and versions that every lookup reads first.
pub(crate) const PREFETCH_RECORD_BYTES: usize = 256;

/// The strong and weak counts an `Rc<[u8]>` keeps just before its bytes.
const RC_HEADER: usize = 2 * std::mem::size_of::<usize>();

/// What a cached record costs in memory besides its own bytes: its entry
/// in the slab, the `Rc`'s counts, and the allocator's share of its block
/// (glibc's malloc keeps an 8-byte header and rounds a block up to 16
/// bytes: 16 on average). A 100-byte value's record is about 190 bytes,
/// so without this the cache would take a third more memory than its
/// budget says.
pub(crate) const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>() + RC_HEADER + 16;

/// What a record of `len` bytes counts against the budget.
pub(crate) const fn charge(len: usize) -> usize {
    len + ENTRY_OVERHEAD
}

/// Most records the slab holds at once: a [`CacheTag`] is a `u32`, and 0
/// means "none".
const MAX_ENTRIES: usize = u32::MAX as usize - 1;

/// The largest budget the cache takes: more would let records of the
/// smallest charge (a header and a one-byte key) outnumber the tags (about
/// 416 GB on a 64-bit machine). A larger budget is cut to this.
pub(crate) const MAX_BUDGET: usize = MAX_ENTRIES.saturating_mul(charge(RECORD_HEADER_LEN + 1));

struct Entry {
    /// The record held (its location's id); meaningless while `raw` is `None`.
    id: u64,
    /// `None`: the entry is free (on `free`).
    raw: Option<Rc<[u8]>>,
    /// Set by a hit; the hand clears it once instead of evicting.
    referenced: bool,
}

pub(crate) struct RecordCache {
    entries: Vec<Entry>,
    /// Free entries, reused before `entries` grows: its length stays the
    /// largest number of records ever cached at once.
    free: Vec<u32>,
    /// The clock hand: the next entry it looks at.
    hand: usize,
    pub(crate) bytes: usize,
    budget: usize,
}

impl RecordCache {
    pub(crate) fn new(budget: usize) -> RecordCache {
        RecordCache { entries: Vec::new(), free: Vec::new(), hand: 0, bytes: 0, budget: budget.min(MAX_BUDGET) }
    }

    /// What `bytes` may grow to: the budget given, cut to [`MAX_BUDGET`].
    pub(crate) fn budget(&self) -> usize {
        self.budget
    }

    /// The entry `tag` points at, if it still holds record `id`.
    fn entry(&self, tag: CacheTag, id: u64) -> Option<(usize, &Rc<[u8]>)> {
        let i = (tag.0 as usize).checked_sub(1)?;
        let e = self.entries.get(i)?;
        match &e.raw {
            Some(raw) if e.id == id => Some((i, raw)),
            _ => None,
        }
    }

    /// The bytes of record `id`, if `tag` still holds them; marks a hit.
    pub(crate) fn get(&mut self, tag: CacheTag, id: u64) -> Option<Rc<[u8]>> {
        let (i, raw) = self.entry(tag, id)?;
        let raw = raw.clone();
        let e = &mut self.entries[i];
        // Written only when it changes: a hit on a hot record leaves its
        // cache line clean.
        if !e.referenced {
            e.referenced = true;
        }
        Some(raw)
    }

    /// Asks the CPU to fetch the entry `tag` points at.
    #[inline]
    pub(crate) fn prefetch_entry(&self, tag: CacheTag) {
        if let Some(i) = (tag.0 as usize).checked_sub(1) {
            if i < self.entries.len() {
                // An entry may straddle two lines: fetch both ends.
                let at = self.entries.as_ptr().wrapping_add(i) as usize;
                prefetch_line(at);
                prefetch_line(at + std::mem::size_of::<Entry>() - 1);
            }
        }
    }

    /// Asks the CPU to fetch the record entry `tag` holds, whichever
    /// record that is, up to [`PREFETCH_RECORD_BYTES`].
    #[inline]
    pub(crate) fn prefetch_record(&self, tag: CacheTag) {
        let Some(i) = (tag.0 as usize).checked_sub(1) else { return };
        if let Some(Entry { raw: Some(raw), .. }) = self.entries.get(i) {
            // From the `Rc`'s counts (a hit clones it) to the end of the
            // bytes wanted; every line they touch.
            let at = raw.as_ptr() as usize;
            let (from, to) = (at.saturating_sub(RC_HEADER), at + raw.len().min(PREFETCH_RECORD_BYTES));
            for line in (from & !63..to).step_by(64) {
                prefetch_line(line);
            }
        }
    }

    /// The key of record `id`, if `tag` still holds it (no hit is marked:
    /// the index asks while it probes).
    pub(crate) fn key_of(&self, tag: CacheTag, id: u64) -> Option<&[u8]> {
        self.entry(tag, id).and_then(|(_, raw)| record_key(raw))
    }

    /// Whether a record of `len` bytes may be cached: one record may take
    /// at most an eighth of the budget.
    pub(crate) fn admits(&self, len: usize) -> bool {
        self.budget > 0 && charge(len) <= self.budget / 8
    }

    /// Caches the bytes of record `id` (an id not cached already), evicting
    /// others to stay within the budget; the tag to find them by, or
    /// [`CacheTag::NONE`] if the record is too large to cache.
    pub(crate) fn insert(&mut self, id: u64, raw: Rc<[u8]>) -> CacheTag {
        if !self.admits(raw.len()) {
            return CacheTag::NONE;
        }
        self.bytes += charge(raw.len());
        while self.bytes > self.budget {
            if !self.evict_one() {
                break;
            }
        }
        let entry = Entry { id, raw: Some(raw), referenced: false };
        let i = match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = entry;
                i as usize
            }
            None => {
                self.entries.push(entry);
                self.entries.len() - 1
            }
        };
        debug_assert!(self.bytes <= self.budget);
        CacheTag(u32::try_from(i + 1).expect("fewer cache entries than u32::MAX"))
    }

    /// Drops record `id` if `tag` still holds it (it can never be read
    /// again: superseded, or its segment is gone).
    pub(crate) fn forget(&mut self, tag: CacheTag, id: u64) {
        if let Some((i, _)) = self.entry(tag, id) {
            self.release(i);
        }
    }

    /// Record `from` was copied, byte for byte, to `to` (compaction): the
    /// entry now holds `to`, found by the same tag. Returns whether it did.
    pub(crate) fn rename(&mut self, tag: CacheTag, from: u64, to: u64) -> bool {
        match self.entry(tag, from) {
            Some((i, _)) => {
                self.entries[i].id = to;
                true
            }
            None => false,
        }
    }

    fn release(&mut self, i: usize) {
        let e = &mut self.entries[i];
        if let Some(raw) = e.raw.take() {
            self.bytes -= charge(raw.len());
            self.free.push(i as u32);
        }
    }

    /// Moves the hand until it evicts one entry; false when nothing is
    /// cached. Ends within two turns: the first clears every flag it passes.
    fn evict_one(&mut self) -> bool {
        for _ in 0..2 * self.entries.len() + 1 {
            if self.hand >= self.entries.len() {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            let Some(e) = self.entries.get_mut(i) else { return false };
            if e.raw.is_none() {
                continue;
            }
            if e.referenced {
                e.referenced = false;
                continue;
            }
            self.release(i);
            return true;
        }
        false
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::format::{encode_record, Kind, Seed};

    fn rec(len: usize) -> Rc<[u8]> {
        vec![7u8; len].into()
    }

    /// Inserts records 0..n of `len` bytes; their tags by id.
    fn fill(c: &mut RecordCache, n: u64, len: usize) -> Vec<CacheTag> {
        (0..n).map(|id| c.insert(id, rec(len))).collect()
    }

    fn occupied_bytes(c: &RecordCache) -> usize {
        c.entries.iter().filter_map(|e| e.raw.as_ref()).map(|r| charge(r.len())).sum()
    }

    /// The records of most tests, eight of which fill a budget of `EIGHT`.
    const LEN: usize = 100;
    const EIGHT: usize = 8 * charge(LEN);

    #[test]
    fn stays_within_its_budget_and_counts_exactly() {
        let mut c = RecordCache::new(2000);
        let mut last = CacheTag::NONE;
        for id in 0..100u64 {
            last = c.insert(id, rec(10 + (id as usize % 50)));
            assert!(c.bytes <= 2000);
            assert_eq!(c.bytes, occupied_bytes(&c));
        }
        assert!(c.get(last, 99).is_some(), "the newest entry is kept");
    }

    #[test]
    fn a_record_read_since_the_hand_passed_survives_one_eviction() {
        let mut c = RecordCache::new(EIGHT);
        let mut tags = fill(&mut c, 8, LEN);
        assert!(c.get(tags[0], 0).is_some());
        tags.push(c.insert(8, rec(LEN)));
        assert!(c.get(tags[0], 0).is_some(), "0 was read: second chance");
        assert!(c.get(tags[1], 1).is_none(), "1 is the oldest unread entry");
        assert!((2..9).all(|id| c.get(tags[id], id as u64).is_some()));
        assert_eq!(c.bytes, EIGHT);
    }

    #[test]
    fn a_budget_past_what_the_tags_can_name_is_cut() {
        assert_eq!(RecordCache::new(usize::MAX).budget(), MAX_BUDGET);
        assert!((MAX_BUDGET / charge(RECORD_HEADER_LEN + 1)) <= MAX_ENTRIES);
        assert_eq!(RecordCache::new(1 << 30).budget(), 1 << 30);
    }

    #[test]
    fn a_record_larger_than_an_eighth_of_the_budget_is_not_cached() {
        let mut c = RecordCache::new(EIGHT);
        assert_eq!(c.insert(1, rec(LEN + 1)), CacheTag::NONE);
        assert_eq!(c.bytes, 0);
        let t = c.insert(2, rec(LEN));
        assert!(c.get(t, 2).is_some());
        assert!(!RecordCache::new(0).admits(1));
    }

    #[test]
    fn forgetting_frees_the_bytes_and_the_entries_are_reused() {
        let mut c = RecordCache::new(1 << 20);
        let mut tags = Vec::new();
        for id in 0..10_000u64 {
            tags.push(c.insert(id, rec(10)));
            if id >= 5 {
                c.forget(tags[id as usize - 5], id - 5);
            }
            assert!(c.entries.len() <= 6, "{} entries for 5 records", c.entries.len());
        }
        assert_eq!(c.len(), 5);
        assert_eq!(c.bytes, 5 * charge(10));
        assert!(c.get(tags[9_995], 9_995).is_some() && c.get(tags[9_994], 9_994).is_none());
    }

    #[test]
    fn a_stale_tag_misses_and_cannot_drop_the_record_now_in_its_entry() {
        let mut c = RecordCache::new(EIGHT);
        let old = c.insert(1, rec(LEN));
        c.forget(old, 1);
        let new = c.insert(2, rec(LEN));
        assert_eq!(old, new, "the free entry is reused");
        assert!(c.get(old, 1).is_none());
        c.forget(old, 1);
        assert!(!c.rename(old, 1, 3));
        assert!(c.get(new, 2).is_some());
        assert_eq!(c.bytes, charge(LEN));
        assert!(c.get(CacheTag::NONE, 2).is_none());
        assert!(c.get(CacheTag(99), 2).is_none());
    }

    #[test]
    fn a_renamed_record_is_found_under_its_new_id_only() {
        let mut c = RecordCache::new(EIGHT);
        let t = c.insert(1, rec(LEN));
        assert!(c.rename(t, 1, 2));
        assert!(c.get(t, 1).is_none());
        assert_eq!(c.get(t, 2).map(|r| r.len()), Some(LEN));
        assert_eq!(c.bytes, charge(LEN));
    }

    #[test]
    fn key_of_reads_the_key_out_of_the_cached_record() {
        let mut c = RecordCache::new(1 << 20);
        let mut raw = Vec::new();
        encode_record(&mut raw, Seed::format_3(1), 1, 0, Kind::Value, b"the-key", b"meta", b"value");
        let t = c.insert(5, raw.into());
        assert_eq!(c.key_of(t, 5), Some(&b"the-key"[..]));
        assert_eq!(c.key_of(t, 6), None);
        assert_eq!(record_key(&[0u8; 31]), None);
    }
}
