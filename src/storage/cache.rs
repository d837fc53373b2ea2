//! The record cache: a bounded map from record id (a location, never
//! reused) to the record's bytes, evicting by CLOCK (second chance).
//!
//! Owns: the cached records and the byte count they hold. Invariant: after
//! every `insert`, `bytes <= budget`, and `bytes` is the sum of the lengths
//! of the entries in the map.
//!
//! Why CLOCK and not a linked-list LRU: a hit is on every GET's path. An LRU
//! hit follows the map's pointer to its list node and relinks it with its
//! neighbours, several cache misses on records nobody else touches; a
//! profile of one shard serving GETs put 11% of its time there. A CLOCK hit
//! is one probe of an inline table and one flag. Eviction approximates LRU:
//! an entry read since the hand last passed gets a second chance.
//!
//! Does no I/O and never reads the clock.

use std::collections::VecDeque;
use std::rc::Rc;

use hashbrown::HashMap;

/// How many ids of forgotten entries the hand's queue may hold beyond twice
/// the live entries before it is compacted. Compaction walks the queue once,
/// so it runs at most once per this many forgets plus the live count:
/// amortised O(1) per forget.
const STALE_SLACK: usize = 64;

struct Entry {
    raw: Rc<[u8]>,
    /// Set by a hit; the hand clears it once instead of evicting.
    referenced: bool,
}

pub(crate) struct RecordCache {
    /// foldhash (hashbrown's default): ids need no DoS resistance.
    map: HashMap<u64, Entry>,
    /// The clock: ids in the order the hand visits them (front first). It
    /// may hold ids no longer in `map` (forgotten or evicted twice over);
    /// the hand skips them, and `compact` drops them when they pile up.
    hand: VecDeque<u64>,
    pub(crate) bytes: usize,
    budget: usize,
}

impl RecordCache {
    pub(crate) fn new(budget: usize) -> RecordCache {
        RecordCache { map: HashMap::new(), hand: VecDeque::new(), bytes: 0, budget }
    }

    pub(crate) fn get(&mut self, id: u64) -> Option<Rc<[u8]>> {
        let e = self.map.get_mut(&id)?;
        // Written only when it changes: a hit on a hot record leaves its
        // cache line clean.
        if !e.referenced {
            e.referenced = true;
        }
        Some(e.raw.clone())
    }

    /// Whether a record of `len` bytes may be cached: one record may take
    /// at most an eighth of the budget.
    pub(crate) fn admits(&self, len: usize) -> bool {
        self.budget > 0 && len <= self.budget / 8
    }

    pub(crate) fn insert(&mut self, id: u64, raw: Rc<[u8]>) {
        if !self.admits(raw.len()) {
            return;
        }
        self.bytes += raw.len();
        match self.map.insert(id, Entry { raw, referenced: false }) {
            Some(old) => self.bytes -= old.raw.len(),
            None => self.hand.push_back(id),
        }
        while self.bytes > self.budget {
            if !self.evict_one() {
                break;
            }
        }
        debug_assert!(self.bytes <= self.budget);
    }

    /// Drops the entry of a record that is no longer reachable.
    pub(crate) fn forget(&mut self, id: u64) {
        if let Some(old) = self.map.remove(&id) {
            self.bytes -= old.raw.len();
            if self.hand.len() > 2 * self.map.len() + STALE_SLACK {
                self.compact();
            }
        }
    }

    /// Moves the hand until it evicts one entry; false when the cache is
    /// empty. Ends within two turns: the first clears every flag it passes.
    fn evict_one(&mut self) -> bool {
        while let Some(id) = self.hand.pop_front() {
            match self.map.get_mut(&id) {
                None => {}
                Some(e) if e.referenced => {
                    e.referenced = false;
                    self.hand.push_back(id);
                }
                Some(_) => {
                    if let Some(old) = self.map.remove(&id) {
                        self.bytes -= old.raw.len();
                    }
                    return true;
                }
            }
        }
        false
    }

    /// Drops the ids of forgotten entries from the hand's queue, keeping the
    /// order of the rest.
    fn compact(&mut self) {
        let map = &self.map;
        self.hand.retain(|id| map.contains_key(id));
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        self.hand.len()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(len: usize) -> Rc<[u8]> {
        vec![7u8; len].into()
    }

    #[test]
    fn stays_within_its_budget_and_counts_exactly() {
        let mut c = RecordCache::new(1000);
        for id in 0..100u64 {
            c.insert(id, rec(10 + (id as usize % 50)));
            assert!(c.bytes <= 1000);
            let sum: usize = c.map.values().map(|e| e.raw.len()).sum();
            assert_eq!(c.bytes, sum);
        }
        assert!(c.get(99).is_some(), "the newest entry is kept");
    }

    #[test]
    fn a_record_read_since_the_hand_passed_survives_one_eviction() {
        let mut c = RecordCache::new(800);
        for id in 0..8 {
            c.insert(id, rec(100));
        }
        assert!(c.get(0).is_some());
        c.insert(8, rec(100));
        assert!(c.get(0).is_some(), "0 was read: second chance");
        assert!(c.get(1).is_none(), "1 is the oldest unread entry");
        assert!((2..9).all(|id| c.get(id).is_some()));
        assert_eq!(c.bytes, 800);
    }

    #[test]
    fn a_record_larger_than_an_eighth_of_the_budget_is_not_cached() {
        let mut c = RecordCache::new(800);
        c.insert(1, rec(101));
        assert!(c.get(1).is_none());
        assert_eq!(c.bytes, 0);
        c.insert(2, rec(100));
        assert!(c.get(2).is_some());
        assert!(!RecordCache::new(0).admits(1));
    }

    #[test]
    fn forgetting_frees_the_bytes_and_the_queue_stays_bounded() {
        let mut c = RecordCache::new(1 << 20);
        for id in 0..10_000u64 {
            c.insert(id, rec(10));
            if id >= 5 {
                c.forget(id - 5);
            }
            assert!(c.queued() <= 2 * c.len() + STALE_SLACK + 1, "queue {} for {} entries", c.queued(), c.len());
        }
        assert_eq!(c.len(), 5);
        assert_eq!(c.bytes, 50);
        assert!(c.get(9_995).is_some() && c.get(9_994).is_none());
    }

    #[test]
    fn replacing_an_entry_counts_only_the_new_bytes() {
        let mut c = RecordCache::new(1000);
        c.insert(1, rec(50));
        c.insert(1, rec(80));
        assert_eq!(c.bytes, 80);
        assert_eq!(c.get(1).map(|r| r.len()), Some(80));
        assert_eq!(c.queued(), 1);
    }
}
