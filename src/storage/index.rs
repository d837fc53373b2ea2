//! The in-memory index of one shard: key -> location of its latest record.
//!
//! Owns: one [`PartitionIndex`] per partition (virtual node), so that a
//! partition's keys can be listed, streamed or handed to another core without
//! touching the others. Invariant: for every key with a record in the log,
//! the index holds exactly the location of the record written last (in log
//! position order); tombstones stay in the index until compaction drops them.
//!
//! # Memory layout (the per-key cost is a headline figure)
//!
//! A partition is a `hashbrown::HashTable<Slot>` of 20-byte slots plus a key
//! arena. A slot is `key_ref: u32` (offset of the key in the arena),
//! `seg: u32`, `off: u32`, `len_flags: u32` (record length, bit 31 =
//! tombstone): everything a read needs to issue exactly one I/O of exactly
//! the record's size; and `cache: u32`, the [`CacheTag`] of the record's
//! bytes in the record cache, so that a read served from memory goes from
//! the slot straight to the bytes (see `cache.rs` for why). Keys sit in the
//! arena as `len u16 | bytes`. The table costs 21 bytes per bucket (slot +
//! control byte) at a load factor between 7/16 and 7/8; the arena costs the
//! key plus 2 bytes, plus garbage from deleted keys that is reclaimed by
//! rewriting the arena once it passes half. Bitcask's keydir costs ~91
//! bytes + key.
//!
//! # Prefetching a lookup
//!
//! A partition also keeps the address of its table's control bytes (16
//! bytes per partition, refreshed when the table resizes), so that
//! [`PartitionIndex::prefetch`] can compute where a probe for a hash starts
//! and fetch those lines before the lookup runs; `guess_tag` then reads the
//! first matching slot's cache tag without comparing keys, for the next
//! stage (see `Engine::prefetch`). Both only read, and an address they get
//! wrong only costs a useless fetch.

use hashbrown::HashTable;

use crate::core::partition::{key_hash, partition_of};

/// Location of a record in the shard's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loc {
    pub seg: u32,
    pub off: u32,
    /// Encoded record length.
    pub len: u32,
    pub tombstone: bool,
}

impl Loc {
    /// Cache key: segment ids are never reused, so a location names one
    /// immutable record forever.
    pub fn id(&self) -> u64 {
        ((self.seg as u64) << 32) | self.off as u64
    }
}

const TOMBSTONE_BIT: u32 = 1 << 31;

/// Where a record's bytes may be in the record cache: its entry's number
/// plus one, so that [`CacheTag::NONE`] is zero. Opaque to the index, which
/// only keeps it with the key's location; the cache hands it out and checks
/// it (a tag may be stale: the cache verifies the record id on every use).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheTag(pub u32);

impl CacheTag {
    pub const NONE: CacheTag = CacheTag(0);
}

#[derive(Clone, Copy)]
struct Slot {
    key_ref: u32,
    seg: u32,
    off: u32,
    len_flags: u32,
    cache: CacheTag,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 20);

impl Slot {
    fn loc(&self) -> Loc {
        Loc {
            seg: self.seg,
            off: self.off,
            len: self.len_flags & !TOMBSTONE_BIT,
            tombstone: self.len_flags & TOMBSTONE_BIT != 0,
        }
    }

    fn set_loc(&mut self, loc: Loc) {
        debug_assert!(loc.len & TOMBSTONE_BIT == 0);
        self.seg = loc.seg;
        self.off = loc.off;
        self.len_flags = loc.len | if loc.tombstone { TOMBSTONE_BIT } else { 0 };
    }
}

/// Table hash from the ring hash. Keys of one partition share their top
/// bits (that is what makes them one partition), and hashbrown takes its
/// 7-bit tag from the top bits; multiplying by an odd constant spreads the
/// varying low bits over the whole word.
#[inline]
fn table_hash(ring_hash: u64) -> u64 {
    ring_hash.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The index of one partition.
#[derive(Default)]
pub struct PartitionIndex {
    table: HashTable<Slot>,
    /// Where the table's control bytes start (an address, never
    /// dereferenced), for [`PartitionIndex::prefetch`]; valid while the
    /// table has `anchor_buckets` buckets (it moves only when it resizes).
    /// Zero: unknown.
    anchor: usize,
    anchor_buckets: usize,
    /// Keys, each as `len u16 | bytes`, referenced by `Slot::key_ref`.
    arena: Vec<u8>,
    /// Bytes of `arena` that belong to removed keys.
    garbage: usize,
}

fn arena_key(arena: &[u8], key_ref: u32) -> &[u8] {
    let at = key_ref as usize;
    let len = u16::from_le_bytes([arena[at], arena[at + 1]]) as usize;
    &arena[at + 2..at + 2 + len]
}

/// Whether `slot` is `key`'s: compared against the key in the slot's cached
/// record when `cached_key` has it (those bytes are about to be read
/// anyway), else against the arena.
#[inline]
fn slot_is<'c>(arena: &[u8], slot: &Slot, key: &[u8], cached_key: &impl Fn(CacheTag, Loc) -> Option<&'c [u8]>) -> bool {
    match cached_key(slot.cache, slot.loc()) {
        Some(k) => k == key,
        None => arena_key(arena, slot.key_ref) == key,
    }
}

impl PartitionIndex {
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Location of `key`'s latest record.
    pub fn get(&self, hash: u64, key: &[u8]) -> Option<Loc> {
        let arena = &self.arena;
        self.table.find(table_hash(hash), |s| arena_key(arena, s.key_ref) == key).map(Slot::loc)
    }

    /// Location and cache tag of `key`'s latest record. `cached_key` gives
    /// the key of a slot's record from the cache when it is there (tag and
    /// location in, key out); candidates are compared against that instead
    /// of the arena, one memory access fewer on a cached read.
    pub fn find<'c>(
        &self,
        hash: u64,
        key: &[u8],
        cached_key: impl Fn(CacheTag, Loc) -> Option<&'c [u8]>,
    ) -> Option<(Loc, CacheTag)> {
        let arena = &self.arena;
        self.table.find(table_hash(hash), |s| slot_is(arena, s, key, &cached_key)).map(|s| (s.loc(), s.cache))
    }

    /// Points `key` at `loc`, with no cached bytes; returns the location it
    /// replaced.
    pub fn insert(&mut self, hash: u64, key: &[u8], loc: Loc) -> Option<Loc> {
        self.insert_tagged(hash, key, loc, CacheTag::NONE, |_, _| None).map(|(old, _)| old)
    }

    /// Points `key` at `loc`, whose bytes the cache holds under `tag`;
    /// returns the location and tag it replaced. `cached_key` as in `find`.
    pub fn insert_tagged<'c>(
        &mut self,
        hash: u64,
        key: &[u8],
        loc: Loc,
        tag: CacheTag,
        cached_key: impl Fn(CacheTag, Loc) -> Option<&'c [u8]>,
    ) -> Option<(Loc, CacheTag)> {
        let arena = &self.arena;
        if let Some(slot) = self.table.find_mut(table_hash(hash), |s| slot_is(arena, s, key, &cached_key)) {
            let old = (slot.loc(), slot.cache);
            slot.set_loc(loc);
            slot.cache = tag;
            return Some(old);
        }
        let key_ref = u32::try_from(self.arena.len()).expect("partition key arena exceeds 4 GiB");
        let need = 2 + key.len();
        if self.arena.capacity() - self.arena.len() < need {
            // Grow by a quarter, not the doubling of Vec: the arena is most
            // of the per-key memory, and a doubled one wastes up to half.
            self.arena.reserve_exact(need.max(self.arena.capacity() / 4).max(256));
        }
        self.arena.extend_from_slice(&(key.len() as u16).to_le_bytes());
        self.arena.extend_from_slice(key);
        let mut slot = Slot { key_ref, seg: 0, off: 0, len_flags: 0, cache: tag };
        slot.set_loc(loc);
        let arena = &self.arena;
        self.table.insert_unique(table_hash(hash), slot, |s| table_hash(key_hash(arena_key(arena, s.key_ref))));
        if self.anchor_buckets != self.table.num_buckets() {
            self.set_anchor();
        }
        None
    }

    /// Finds where the control bytes start, from any full bucket: hashbrown
    /// keeps the slot of bucket `i` at `ctrl - (i + 1) * size_of::<Slot>()`
    /// and its control byte at `ctrl + i` (its `RawTable` layout; the test
    /// `prefetch_addresses_follow_the_table` fails if that changes).
    fn set_anchor(&mut self) {
        let found = self.table.iter_buckets().next().and_then(|i| Some((i, self.table.get_bucket(i)?)));
        (self.anchor, self.anchor_buckets) = match found {
            Some((i, slot)) => {
                (slot as *const Slot as usize + (i + 1) * std::mem::size_of::<Slot>(), self.table.num_buckets())
            }
            None => (0, 0),
        };
    }

    /// The addresses of the control byte and the slot of the bucket where
    /// a probe for `hash` starts; `None` while the anchor is unknown.
    fn probe_start(&self, hash: u64) -> Option<(usize, usize)> {
        let buckets = self.table.num_buckets();
        if self.anchor == 0 || self.anchor_buckets != buckets {
            return None;
        }
        let pos = table_hash(hash) as usize & (buckets - 1);
        Some((self.anchor.wrapping_add(pos), self.anchor.wrapping_sub((pos + 1) * std::mem::size_of::<Slot>())))
    }

    /// Asks the CPU to fetch the control group and the first slots a probe
    /// for `hash` reads: two of a lookup's misses, both known from the hash
    /// alone, so fetched together. Each may straddle two lines (a 16-byte
    /// group, a 20-byte slot), so both ends are fetched. The key's slot is
    /// the probe's first in most lookups and a few further (at lower
    /// addresses) in most others, hence the line below too.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if let Some((ctrl, slot)) = self.probe_start(hash) {
            prefetch_line(ctrl);
            prefetch_line(ctrl.wrapping_add(15));
            prefetch_line(slot.wrapping_add(std::mem::size_of::<Slot>() - 1));
            prefetch_line(slot);
            prefetch_line(slot.wrapping_sub(64));
        }
    }

    /// The cache tag of the first slot `hash` may be in, without comparing
    /// keys (for prefetching: a wrong guess costs a useless fetch).
    #[inline]
    pub fn guess_tag(&self, hash: u64) -> CacheTag {
        self.table.find(table_hash(hash), |_| true).map_or(CacheTag::NONE, |s| s.cache)
    }

    /// The slot of `key` if it points at `loc`. Slots are matched by
    /// location, not by key: a location names one record forever, so at
    /// most one slot can hold it, and that slot is its key's. Compaction
    /// asks this once per record it reads, and comparing keys would fetch
    /// each candidate's key from the arena (a cache miss per record on a
    /// shard whose keys do not fit in the CPU caches).
    fn slot_at(&mut self, hash: u64, key: &[u8], loc: Loc) -> Option<&mut Slot> {
        let slot = self.table.find_mut(table_hash(hash), |s| s.loc() == loc)?;
        debug_assert!(arena_key(&self.arena, slot.key_ref) == key, "a location is held by another key");
        Some(slot)
    }

    /// Whether `key` points at `loc` (its latest record is the one there);
    /// matched by location, as in `slot_at`.
    pub fn points_at(&self, hash: u64, key: &[u8], loc: Loc) -> bool {
        let Some(slot) = self.table.find(table_hash(hash), |s| s.loc() == loc) else { return false };
        debug_assert!(arena_key(&self.arena, slot.key_ref) == key, "a location is held by another key");
        true
    }

    /// Points `key` at `loc` only if it currently points at `expected`
    /// (compaction moving a record must not undo a newer write), keeping
    /// its cache tag (the bytes are the same); returns the tag if it did.
    pub fn relocate(&mut self, hash: u64, key: &[u8], expected: Loc, loc: Loc) -> Option<CacheTag> {
        let slot = self.slot_at(hash, key, expected)?;
        slot.set_loc(loc);
        Some(slot.cache)
    }

    /// Records that the bytes of `key`'s record at `loc` are cached under
    /// `tag`; false (and nothing changes) if `key` no longer points at `loc`.
    pub fn set_tag(&mut self, hash: u64, key: &[u8], loc: Loc, tag: CacheTag) -> bool {
        self.slot_at(hash, key, loc).map(|s| s.cache = tag).is_some()
    }

    /// Removes `key`; returns its location and cache tag.
    pub fn remove(&mut self, hash: u64, key: &[u8]) -> Option<(Loc, CacheTag)> {
        let arena = &self.arena;
        let Ok(entry) = self.table.find_entry(table_hash(hash), |s| arena_key(arena, s.key_ref) == key) else {
            return None;
        };
        let (slot, _) = entry.remove();
        self.garbage += 2 + key.len();
        if self.garbage > 4096 && self.garbage * 2 > self.arena.len() {
            self.rewrite_arena();
        }
        Some((slot.loc(), slot.cache))
    }

    /// Compacts the arena: copies live keys into a fresh one.
    fn rewrite_arena(&mut self) {
        let mut fresh = Vec::with_capacity(self.arena.len() - self.garbage);
        for slot in self.table.iter_mut() {
            let key = arena_key(&self.arena, slot.key_ref);
            slot.key_ref = fresh.len() as u32;
            fresh.extend_from_slice(&(key.len() as u16).to_le_bytes());
            fresh.extend_from_slice(key);
        }
        self.arena = fresh;
        self.garbage = 0;
    }

    /// Releases spare capacity (after recovery, when no growth is expected soon).
    pub fn shrink_to_fit(&mut self) {
        self.arena.shrink_to_fit();
        self.set_anchor();
    }

    /// Every key with its location, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Loc)> + '_ {
        self.table.iter().map(|s| (arena_key(&self.arena, s.key_ref), s.loc()))
    }

    /// Heap bytes held by this partition's index.
    pub fn memory_bytes(&self) -> usize {
        self.table.allocation_size() + self.arena.capacity()
    }
}

/// The index of one shard: a partition index per partition it holds keys of.
pub struct ShardIndex {
    partitions: u32,
    /// Indexed by partition number; `None` until the partition gets a key.
    parts: Vec<Option<Box<PartitionIndex>>>,
    len: usize,
}

impl ShardIndex {
    /// An empty index for a ring of `partitions` partitions (a power of two).
    pub fn new(partitions: u32) -> ShardIndex {
        ShardIndex { partitions, parts: (0..partitions).map(|_| None).collect(), len: 0 }
    }

    /// Number of keys (tombstones included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn part_of(&self, hash: u64) -> usize {
        partition_of(hash, self.partitions) as usize
    }

    pub fn get(&self, hash: u64, key: &[u8]) -> Option<Loc> {
        self.parts[self.part_of(hash)].as_ref()?.get(hash, key)
    }

    /// See [`PartitionIndex::prefetch`].
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if let Some(p) = &self.parts[self.part_of(hash)] {
            p.prefetch(hash);
        }
    }

    /// See [`PartitionIndex::guess_tag`].
    #[inline]
    pub fn guess_tag(&self, hash: u64) -> CacheTag {
        self.parts[self.part_of(hash)].as_ref().map_or(CacheTag::NONE, |p| p.guess_tag(hash))
    }

    /// See [`PartitionIndex::find`].
    pub fn find<'c>(
        &self,
        hash: u64,
        key: &[u8],
        cached_key: impl Fn(CacheTag, Loc) -> Option<&'c [u8]>,
    ) -> Option<(Loc, CacheTag)> {
        self.parts[self.part_of(hash)].as_ref()?.find(hash, key, cached_key)
    }

    pub fn insert(&mut self, hash: u64, key: &[u8], loc: Loc) -> Option<Loc> {
        self.insert_tagged(hash, key, loc, CacheTag::NONE, |_, _| None).map(|(old, _)| old)
    }

    pub fn insert_tagged<'c>(
        &mut self,
        hash: u64,
        key: &[u8],
        loc: Loc,
        tag: CacheTag,
        cached_key: impl Fn(CacheTag, Loc) -> Option<&'c [u8]>,
    ) -> Option<(Loc, CacheTag)> {
        let p = self.part_of(hash);
        let old = self.parts[p].get_or_insert_with(Default::default).insert_tagged(hash, key, loc, tag, cached_key);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// See [`PartitionIndex::points_at`].
    pub fn points_at(&self, hash: u64, key: &[u8], loc: Loc) -> bool {
        self.parts[self.part_of(hash)].as_ref().is_some_and(|part| part.points_at(hash, key, loc))
    }

    pub fn relocate(&mut self, hash: u64, key: &[u8], expected: Loc, loc: Loc) -> Option<CacheTag> {
        let p = self.part_of(hash);
        self.parts[p].as_mut()?.relocate(hash, key, expected, loc)
    }

    pub fn set_tag(&mut self, hash: u64, key: &[u8], loc: Loc, tag: CacheTag) -> bool {
        let p = self.part_of(hash);
        self.parts[p].as_mut().is_some_and(|part| part.set_tag(hash, key, loc, tag))
    }

    pub fn remove(&mut self, hash: u64, key: &[u8]) -> Option<(Loc, CacheTag)> {
        let p = self.part_of(hash);
        let old = self.parts[p].as_mut()?.remove(hash, key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The index of one partition, if it holds any key.
    pub fn partition(&self, partition: u32) -> Option<&PartitionIndex> {
        self.parts.get(partition as usize)?.as_deref()
    }

    /// Releases spare arena capacity in every partition.
    pub fn shrink_to_fit(&mut self) {
        self.parts.iter_mut().flatten().for_each(|p| p.shrink_to_fit());
    }

    /// Every key of the shard with its location.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Loc)> + '_ {
        self.parts.iter().flatten().flat_map(|p| p.iter())
    }

    /// Heap bytes held by the whole index, partition tables included.
    pub fn memory_bytes(&self) -> usize {
        self.parts.capacity() * std::mem::size_of::<Option<Box<PartitionIndex>>>()
            + self
                .parts
                .iter()
                .flatten()
                .map(|p| std::mem::size_of::<PartitionIndex>() + p.memory_bytes())
                .sum::<usize>()
    }
}

/// Asks the CPU to bring the cache line holding `addr` into its caches. A
/// hint: never faults, whatever the address.
#[inline(always)]
pub(crate) fn prefetch_line(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is not a memory access; any address is allowed.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn loc(seg: u32, off: u32, tomb: bool) -> Loc {
        Loc { seg, off, len: 40 + off % 100, tombstone: tomb }
    }

    #[test]
    fn behaves_like_a_map() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut idx = ShardIndex::new(16);
        let mut model: BTreeMap<Vec<u8>, Loc> = BTreeMap::new();
        for i in 0..50_000u32 {
            let key = format!("k{}", rng.u32(0..3000)).into_bytes();
            let h = key_hash(&key);
            match rng.u8(0..10) {
                0..=5 => {
                    let l = loc(i, i, rng.bool());
                    assert_eq!(idx.insert(h, &key, l), model.insert(key, l));
                }
                6..=7 => assert_eq!(idx.remove(h, &key).map(|(l, _)| l), model.remove(&key)),
                _ => assert_eq!(idx.get(h, &key), model.get(&key).copied()),
            }
            assert_eq!(idx.len(), model.len());
        }
        let mut all: Vec<(Vec<u8>, Loc)> = idx.iter().map(|(k, l)| (k.to_vec(), l)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
    }

    /// The prefetch computes hashbrown's addresses itself; they must be the
    /// ones its lookups read, through growth, removals, the arena's shrink
    /// and an in-place rehash.
    #[test]
    fn prefetch_addresses_follow_the_table() {
        let mut part = PartitionIndex::default();
        let size = std::mem::size_of::<Slot>();
        let check = |part: &PartitionIndex, keys: &[Vec<u8>]| {
            let buckets = part.table.num_buckets();
            let mut near = 0;
            for key in keys {
                let h = key_hash(key);
                let (ctrl, start) = part.probe_start(h).expect("a table with keys has an anchor");
                let found = part.table.find(table_hash(h), |s| arena_key(&part.arena, s.key_ref) == key.as_slice());
                let at = found.expect("the key is there") as *const Slot as usize;
                // The found slot is one of the table's, counted down from
                // the control bytes, and the probe start is its neighbour.
                assert_eq!((part.anchor - at) % size, 0);
                let bucket = (part.anchor - at) / size - 1;
                assert!(bucket < buckets, "slot {bucket} outside {buckets} buckets");
                let pos = (part.anchor - start) / size - 1;
                assert_eq!(ctrl - part.anchor, pos);
                if bucket.wrapping_sub(pos) & (buckets - 1) < 16 {
                    near += 1;
                }
            }
            // Almost every key sits in the group its probe starts with.
            assert!(near * 10 >= keys.len() * 9, "{near} of {} keys near their probe start", keys.len());
        };
        let keys: Vec<Vec<u8>> = (0..5000).map(|i| format!("key:{i}").into_bytes()).collect();
        for (i, key) in keys.iter().enumerate() {
            part.insert_tagged(key_hash(key), key, loc(1, i as u32, false), CacheTag::NONE, |_, _| None);
            if i % 997 == 0 {
                check(&part, &keys[..=i]);
            }
        }
        check(&part, &keys);
        for key in &keys[..4000] {
            part.remove(key_hash(key), key);
        }
        part.shrink_to_fit();
        check(&part, &keys[4000..]);
        // Inserts into a table full of deleted buckets rehash it in place
        // (same allocation, same bucket count) before it would grow.
        let more: Vec<Vec<u8>> = (0..4000).map(|i| format!("more:{i}").into_bytes()).collect();
        for (i, key) in more.iter().enumerate() {
            part.insert_tagged(key_hash(key), key, loc(2, i as u32, false), CacheTag::NONE, |_, _| None);
        }
        let mut live = keys[4000..].to_vec();
        live.extend(more);
        check(&part, &live);
        // A wrong guess only fetches a useless line: an absent key and an
        // empty table are fine too.
        part.prefetch(key_hash(b"absent"));
        PartitionIndex::default().prefetch(key_hash(b"absent"));
        assert_eq!(PartitionIndex::default().guess_tag(1), CacheTag::NONE);
    }

    #[test]
    fn relocate_only_moves_the_expected_version_and_keeps_its_tag() {
        let mut idx = ShardIndex::new(4);
        let h = key_hash(b"a");
        idx.insert_tagged(h, b"a", loc(1, 0, false), CacheTag(3), |_, _| None);
        assert_eq!(idx.relocate(h, b"a", loc(1, 8, false), loc(9, 0, false)), None);
        assert_eq!(idx.relocate(h, b"a", loc(1, 0, false), loc(9, 0, false)), Some(CacheTag(3)));
        assert_eq!(idx.find(h, b"a", |_, _| None), Some((loc(9, 0, false), CacheTag(3))));
        assert!(idx.points_at(h, b"a", loc(9, 0, false)));
        assert!(!idx.points_at(h, b"a", loc(1, 0, false)), "moved away");
        assert!(!idx.points_at(key_hash(b"zz"), b"zz", loc(1, 0, false)), "no such key");
        assert_eq!(idx.relocate(key_hash(b"zz"), b"zz", loc(1, 0, false), loc(2, 0, false)), None);
    }

    #[test]
    fn tags_follow_the_location_they_were_set_for() {
        let mut idx = ShardIndex::new(4);
        let h = key_hash(b"a");
        idx.insert(h, b"a", loc(1, 0, false));
        assert!(!idx.set_tag(h, b"a", loc(1, 8, false), CacheTag(5)), "not the current location");
        assert!(idx.set_tag(h, b"a", loc(1, 0, false), CacheTag(5)));
        assert_eq!(
            idx.insert_tagged(h, b"a", loc(2, 0, false), CacheTag(6), |_, _| None),
            Some((loc(1, 0, false), CacheTag(5)))
        );
        assert_eq!(idx.insert(h, b"a", loc(3, 0, false)), Some(loc(2, 0, false)));
        assert_eq!(idx.remove(h, b"a"), Some((loc(3, 0, false), CacheTag::NONE)));
        assert!(!idx.set_tag(h, b"a", loc(3, 0, false), CacheTag(7)), "removed");
    }

    #[test]
    fn find_compares_against_the_cached_key_when_there_is_one() {
        let mut idx = ShardIndex::new(4);
        let h = key_hash(b"a");
        idx.insert_tagged(h, b"a", loc(1, 0, false), CacheTag(1), |_, _| None);
        // A cache that holds the record under tag 1 answers with its key.
        let found = |key: &[u8], cached: &'static [u8]| idx.find(h, key, |t, _| (t == CacheTag(1)).then_some(cached));
        assert_eq!(found(b"a", b"a"), Some((loc(1, 0, false), CacheTag(1))));
        // The cached key decides: a different one means another key.
        assert_eq!(found(b"a", b"b"), None);
        // No cached bytes (a stale tag): the arena decides.
        assert_eq!(idx.find(h, b"a", |_, _| None), Some((loc(1, 0, false), CacheTag(1))));
    }

    #[test]
    fn keys_are_grouped_by_partition() {
        let mut idx = ShardIndex::new(8);
        for i in 0..1000u32 {
            let k = i.to_le_bytes();
            idx.insert(key_hash(&k), &k, loc(0, i, false));
        }
        let mut total = 0;
        for p in 0..8 {
            if let Some(part) = idx.partition(p) {
                for (k, _) in part.iter() {
                    assert_eq!(partition_of(key_hash(k), 8), p);
                    total += 1;
                }
            }
        }
        assert_eq!(total, 1000);
    }

    #[test]
    fn arena_is_reclaimed_after_mass_deletes() {
        let mut p = PartitionIndex::default();
        for i in 0..10_000u32 {
            let k = format!("key-{i:08}");
            p.insert(key_hash(k.as_bytes()), k.as_bytes(), loc(0, i, false));
        }
        let full = p.arena.len();
        for i in 0..9_000u32 {
            let k = format!("key-{i:08}");
            assert!(p.remove(key_hash(k.as_bytes()), k.as_bytes()).is_some());
        }
        assert!(p.arena.len() < full / 2, "arena {} of {}", p.arena.len(), full);
        for i in 9_000..10_000u32 {
            let k = format!("key-{i:08}");
            assert_eq!(p.get(key_hash(k.as_bytes()), k.as_bytes()), Some(loc(0, i, false)));
        }
    }
}
