//! The consistent-hash ring: which members own which partitions, and each
//! partition's preference list.
//!
//! Owns: the membership of the ring ([`Member`]s, in join order), the owner
//! of each of the Q partitions ([`crate::core::partition`] says which
//! partition a key is in), the claim algorithm that assigns partitions when a
//! member joins or leaves, the preference-list rule, and the ring's binary
//! encoding (the body of a RING reply, so that clients route by it).
//!
//! # Invariant
//!
//! - The ring is versioned: every [`Ring::add`] and [`Ring::remove`] returns a
//!   new ring whose version is one more. Two rings with the same version
//!   from the same history are equal.
//! - A ring built by [`Ring::new`], [`Ring::with_members`], [`Ring::add`] and
//!   [`Ring::remove`] is balanced: with `n` members every member owns
//!   `floor(Q/n)` or `ceil(Q/n)` partitions, so there are never more members
//!   than partitions and every member owns at least one.
//! - Claims are deterministic: the same member list, added in the same order,
//!   always gives the same ring (nodes that read the same cluster file agree
//!   without talking).
//!
//! Nothing here reads the clock, the network or a global RNG.
//!
//! # Claim (Dynamo section 6.2, strategy 3)
//!
//! The hash space is cut into Q equal partitions; members own whole
//! partitions. Movement is minimal and balance is kept within one partition:
//!
//! - **Add.** The first member owns everything. A member joining `n` others
//!   takes exactly `k = floor(Q/(n+1))` partitions, all from members above
//!   the new fair share: a member gives only while it owns more than `k + 1`,
//!   or exactly `k + 1` while more than `Q mod (n+1)` members still own
//!   `k + 1`. Every other partition stays where it is.
//! - **Remove.** Exactly the leaver's partitions move, each to a remaining
//!   member still below the new fair share (the mirror rule: it owns fewer
//!   than `k = floor(Q/(n-1))`, or exactly `k` while fewer than
//!   `Q mod (n-1)` members own `k + 1`), so the least loaded fill up first
//!   and every member ends at `k` or `k + 1`.
//!
//! Which partitions move is chosen to spread each member around the ring,
//! so that the `CLAIM_TARGET_N` consecutive partitions from any partition
//! mostly belong to distinct members (and zones): preference lists are then
//! short walks, and replica load follows partition ownership.
//!
//! - A joining member walks the ring from a start derived from its name's
//!   hash (so joins do not all start at partition 0) and takes a giver's
//!   partition only if it is at least `d` partitions away from every
//!   partition it already took. `d` starts at the ideal spacing `Q/k` and
//!   halves after each round. Each round has three walks, strictest first:
//!   (1) no partition within `CLAIM_TARGET_N - 1` of it is in the joiner's
//!   zone, and one is in the giver's zone (taking it removes a repeat);
//!   (2) only the first condition; (3) none. The last round (`d = 1`, walk 3)
//!   takes any giver's partition it meets, so the claim always completes.
//!   (A member without a zone is a zone of its own, so without zones
//!   "zone" reads "member".)
//! - A leaver's partitions, in ring order, each go to the taker whose zone,
//!   then whose self, is not within `CLAIM_TARGET_N - 1` partitions of it,
//!   then with the fewest partitions, then with the lowest index.
//!
//! Cost: an add is three walks of the ring per halving of `d`, each step
//! `O(log Q)`; a remove is `O(Q)`. Building a ring of 1024 members over 65536 partitions member by
//! member takes a few seconds; with the default 1024 partitions, milliseconds.
//!
//! # Preference list
//!
//! A partition's preference list starts with its owner and walks clockwise
//! (partitions `p+1, p+2, ...`, wrapping), skipping members already listed.
//! With zones, the walk first takes only members of zones not yet listed,
//! until every zone of the ring is used; it then walks again from `p` and
//! takes the remaining members in clockwise order. So the first `N` entries
//! cover `min(N, zones)` distinct zones. A member without a zone is a zone
//! of its own (its own failure domain); with no zones at all the list is
//! simply the first distinct members clockwise. The *extended* preference
//! list continues the same walk until every member is listed: its first `N`
//! entries are the preference list for `N` (sloppy quorum takes the first
//! `N` healthy entries of it).
//!
//! # Encoding
//!
//! All integers are little-endian; IP addresses are their octets in network
//! order (as `Ipv4Addr::octets`). Names and zones are printable ASCII
//! (`0x21..=0x7e`).
//!
//! ```text
//! size        field
//! 1           format      u8 = 1
//! 8           version     u64 LE
//! 4           partitions  u32 LE, a power of two, 1..=MAX_PARTITIONS
//! 2           members     u16 LE, 0..=min(MAX_MEMBERS, partitions)
//! members times, in member index order:
//!   1         name_len    u8, 1..=MAX_NAME_LEN
//!   name_len  name        printable ASCII, unique in the ring
//!   1         family      u8: 4 (IPv4) or 6 (IPv6)
//!   4 or 16   ip          octets (IPv6: flow info and scope id are 0)
//!   2         port        u16 LE
//!   1         zone_len    u8: 0 = no zone, else 1..=MAX_ZONE_LEN
//!   zone_len  zone        printable ASCII
//! partitions times if members > 0 (absent for the empty ring):
//!   2         owner       u16 LE member index, < members
//! ```
//!
//! Addresses are unique too. Decoding is strict: every count and length is
//! checked against its limit (and against the bytes left) before anything is
//! allocated, and trailing bytes are refused; it never panics.
//!
//! Example: version 2, Q = 4, members `a` = 127.0.0.1:7000 in zone `z` and
//! `b` = `[::1]:7001` without one, owners `[a, b, a, b]`:
//! `01 | 02 00 00 00 00 00 00 00 | 04 00 00 00 | 02 00 |
//! 01 61 04 7f 00 00 01 58 1b 01 7a |
//! 01 62 06 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 59 1b 00 |
//! 00 00 01 00 00 00 01 00`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use thiserror::Error;

use crate::core::partition::{key_hash, partition_of, validate_partitions, MAX_PARTITIONS};
use crate::wire::MAX_BODY_LEN;

/// A member's index in [`Ring::members`] (join order; removal shifts the
/// later members down by one).
pub type MemberIdx = u16;

/// Most members of one ring. A ring also never has more members than
/// partitions (each member owns at least one).
pub const MAX_MEMBERS: usize = 1024;

/// Longest member name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Longest zone name, in bytes.
pub const MAX_ZONE_LEN: usize = 64;

/// The replica count the claim spreads members for: it tries to keep any
/// `CLAIM_TARGET_N` consecutive partitions on distinct members (and zones),
/// so that the usual N = 3 preference list is the next partitions' owners.
/// Larger N still get distinct members; the walk is just longer.
pub const CLAIM_TARGET_N: usize = 3;

/// Format byte of the encoding.
const FORMAT: u8 = 1;

/// Fixed header: format, version, partitions, members.
const HEADER_LEN: usize = 1 + 8 + 4 + 2;

/// Worst-case bytes of one member: name, family, IPv6, port, zone.
const MAX_MEMBER_LEN: usize = 1 + MAX_NAME_LEN + 1 + 16 + 2 + 1 + MAX_ZONE_LEN;

/// Worst-case length of an encoded ring (about 277 KiB).
pub const MAX_ENCODED_LEN: usize = HEADER_LEN + MAX_MEMBERS * MAX_MEMBER_LEN + MAX_PARTITIONS as usize * 2;

const _: () = assert!(MAX_MEMBERS <= MemberIdx::MAX as usize + 1, "member indices must fit a MemberIdx");
const _: () = assert!(MAX_MEMBERS <= u16::MAX as usize, "the member count must fit its u16 field");
const _: () = assert!(MAX_NAME_LEN <= u8::MAX as usize, "a name length must fit its u8 field");
const _: () = assert!(MAX_ZONE_LEN <= u8::MAX as usize, "a zone length must fit its u8 field");
const _: () = assert!(MAX_NAME_LEN > 0 && MAX_ZONE_LEN > 0);
const _: () = assert!(MAX_ENCODED_LEN + 3 <= MAX_BODY_LEN, "a ring must fit a RING reply body");
const _: () = assert!(CLAIM_TARGET_N >= 1);

/// Why a ring operation or decoding failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RingError {
    /// The partition count is not a power of two within the limit.
    #[error("{0}")]
    InvalidPartitions(String),
    /// A member's name, zone or address breaks a rule of the module doc.
    #[error("invalid member {name:?}: {why}")]
    InvalidMember { name: String, why: &'static str },
    /// Another member already has this name.
    #[error("a member named {0:?} is already in the ring")]
    DuplicateName(String),
    /// Another member already has this address.
    #[error("address {0} already belongs to a member of the ring")]
    DuplicateAddr(SocketAddr),
    /// The ring has `max` members already (`min(MAX_MEMBERS, partitions)`).
    #[error("the ring is full: at most {max} members (one per partition, and MAX_MEMBERS)")]
    TooManyMembers { max: usize },
    /// No member has this name.
    #[error("no member named {0:?}")]
    UnknownMember(String),
    /// A ring keeps at least one member once it has one.
    #[error("cannot remove {0:?}, the last member of the ring")]
    LastMember(String),
    /// Bytes that no encoder here produced.
    #[error("malformed ring encoding: {0}")]
    Malformed(&'static str),
}

/// One member of the ring: a physical node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Unique name, 1..=[`MAX_NAME_LEN`] bytes of printable ASCII.
    pub name: String,
    /// Unique address (shard 0's). IPv6 addresses carry no flow info or scope id.
    pub addr: SocketAddr,
    /// Failure domain (rack, availability zone), 1..=[`MAX_ZONE_LEN`] bytes of
    /// printable ASCII. A member without one is a zone of its own.
    pub zone: Option<String>,
}

impl Member {
    /// Checks the member's own fields (not uniqueness).
    fn validate(&self) -> Result<(), RingError> {
        let bad = |why| Err(RingError::InvalidMember { name: self.name.clone(), why });
        if !valid_label(&self.name, MAX_NAME_LEN) {
            return bad("a name must be 1 to 64 bytes of printable ASCII without spaces");
        }
        if let Some(zone) = &self.zone {
            if !valid_label(zone, MAX_ZONE_LEN) {
                return bad("a zone must be 1 to 64 bytes of printable ASCII without spaces");
            }
        }
        if let SocketAddr::V6(a) = self.addr {
            if a.flowinfo() != 0 || a.scope_id() != 0 {
                return bad("IPv6 flow info and scope ids are not supported");
            }
        }
        Ok(())
    }
}

/// Whether `s` is 1..=`max` bytes of printable ASCII (no spaces or controls).
fn valid_label(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
}

/// The ring: members, and the owner of each partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    version: u64,
    partitions: u32,
    members: Vec<Member>,
    /// `owners[p]` is the member that owns partition `p`; empty iff `members` is.
    owners: Vec<MemberIdx>,
    /// Derived from `members`: each member's zone number. Members with the
    /// same zone share one; a member without a zone has one of its own.
    zone_of: Vec<u16>,
    /// Derived: the number of distinct zone numbers.
    zones: usize,
    /// Derived: whether any member has a zone.
    has_zones: bool,
}

impl Ring {
    /// Empty ring of `partitions` partitions, version 0, no members.
    pub fn new(partitions: u32) -> Result<Ring, RingError> {
        validate_partitions(partitions).map_err(RingError::InvalidPartitions)?;
        Ok(Ring::from_parts(0, partitions, Vec::new(), Vec::new()))
    }

    /// Builds the ring by adding `members` one by one in order
    /// (deterministic: the same list always gives the same ring). Its
    /// version is the number of members.
    pub fn with_members(partitions: u32, members: Vec<Member>) -> Result<Ring, RingError> {
        let mut ring = Ring::new(partitions)?;
        for member in members {
            ring = ring.add(member)?;
        }
        Ok(ring)
    }

    /// Builds a ring and its derived fields. `members` and `owners` must be
    /// consistent (checked by the callers).
    fn from_parts(version: u64, partitions: u32, members: Vec<Member>, owners: Vec<MemberIdx>) -> Ring {
        let mut zone_of = Vec::with_capacity(members.len());
        let mut named: BTreeMap<&str, u16> = BTreeMap::new();
        let mut zones = 0usize;
        for m in &members {
            let z = match &m.zone {
                Some(name) => *named.entry(name).or_insert(zones as u16),
                None => zones as u16,
            };
            if z as usize == zones {
                zones += 1;
            }
            zone_of.push(z);
        }
        let has_zones = members.iter().any(|m| m.zone.is_some());
        Ring { version, partitions, members, owners, zone_of, zones, has_zones }
    }

    /// The ring with `member` added and partitions claimed for it (module
    /// doc); version + 1. Refuses a duplicate name or address, an invalid
    /// member, and a member past `min(MAX_MEMBERS, partitions)`.
    pub fn add(&self, member: Member) -> Result<Ring, RingError> {
        member.validate()?;
        if self.members.iter().any(|m| m.name == member.name) {
            return Err(RingError::DuplicateName(member.name));
        }
        if self.members.iter().any(|m| m.addr == member.addr) {
            return Err(RingError::DuplicateAddr(member.addr));
        }
        let max = MAX_MEMBERS.min(self.partitions as usize);
        if self.members.len() >= max {
            return Err(RingError::TooManyMembers { max });
        }
        let start = partition_of(key_hash(member.name.as_bytes()), self.partitions) as usize;
        let mut members = self.members.clone();
        members.push(member);
        let new = self.members.len() as MemberIdx;
        let mut next = Ring::from_parts(self.version + 1, self.partitions, members, self.owners.clone());
        if new == 0 {
            next.owners = vec![0; self.partitions as usize];
        } else {
            next.claim_for(new, start);
        }
        Ok(next)
    }

    /// The ring without the member `name`, its partitions handed to the
    /// least loaded remaining members (module doc); version + 1. Later
    /// members' indices shift down by one.
    pub fn remove(&self, name: &str) -> Result<Ring, RingError> {
        let gone = self.index_of(name).ok_or_else(|| RingError::UnknownMember(name.to_string()))?;
        if self.members.len() == 1 {
            return Err(RingError::LastMember(name.to_string()));
        }
        let mut owners = self.owners.clone();
        self.reassign(gone, &mut owners);
        for o in &mut owners {
            debug_assert_ne!(*o, gone);
            if *o > gone {
                *o -= 1;
            }
        }
        let mut members = self.members.clone();
        members.remove(gone as usize);
        Ok(Ring::from_parts(self.version + 1, self.partitions, members, owners))
    }

    /// Claims partitions for the just-added member `new` (the last one) in
    /// `self.owners`, walking from `start` (module doc, "Claim").
    fn claim_for(&mut self, new: MemberIdx, start: usize) {
        let q = self.owners.len();
        let total = self.members.len();
        let k = q / total;
        let r = q % total;
        debug_assert!(k >= 1, "never more members than partitions");
        let mut counts = self.owned_counts();
        // Members (all old) owning k + 1 or more.
        let mut full = counts.iter().filter(|&&c| c > k).count();
        let window = (CLAIM_TARGET_N - 1).min(self.zones.saturating_sub(1));
        let my_zone = self.zone_of[new as usize];
        let mut mine = BTreeSet::new();
        let mut d = (q / k).max(1);
        loop {
            for level in [Level::Fixes, Level::Clear, Level::Any] {
                for step in 0..q {
                    if mine.len() == k {
                        return;
                    }
                    let p = (start + step) % q;
                    let o = self.owners[p] as usize;
                    let c = counts[o];
                    let gives = o != new as usize && (c > k + 1 || (c == k + 1 && full > r));
                    // Cheapest checks first.
                    if !gives
                        || (level == Level::Fixes && !self.zone_within(p, window, self.zone_of[o]))
                        || (level != Level::Any && self.zone_within(p, window, my_zone))
                        || gap(&mine, p, q) < d
                    {
                        continue;
                    }
                    if c == k + 1 {
                        full -= 1;
                    }
                    counts[o] -= 1;
                    counts[new as usize] += 1;
                    self.owners[p] = new;
                    mine.insert(p);
                }
            }
            if d == 1 {
                break;
            }
            d /= 2;
        }
        // The last walk takes every giver's partition it meets until k are
        // taken, and the givers hold at least k between them.
        debug_assert_eq!(mine.len(), k);
    }

    /// Hands the partitions of `gone` to the remaining members in `owners`
    /// (module doc, "Claim"); indices are not shifted yet.
    fn reassign(&self, gone: MemberIdx, owners: &mut [MemberIdx]) {
        let q = owners.len();
        let left = self.members.len() - 1;
        let k = q / left;
        let r = q % left;
        let mut counts = self.owned_counts();
        let gone_i = gone as usize;
        counts[gone_i] = 0;
        // Remaining members owning k + 1 or more.
        let mut full = counts.iter().filter(|&&c| c > k).count();
        // Zones after the removal: the leaver's zone number goes if it was alone in it.
        let zones_left = if self.zone_of.iter().filter(|&&z| z == self.zone_of[gone_i]).count() == 1 {
            self.zones - 1
        } else {
            self.zones
        };
        let node_window = (CLAIM_TARGET_N - 1).min(left - 1);
        let zone_window = (CLAIM_TARGET_N - 1).min(zones_left.saturating_sub(1));
        for p in 0..q {
            if owners[p] != gone {
                continue;
            }
            let mut best: Option<(bool, bool, usize, usize)> = None;
            for (i, &c) in counts.iter().enumerate() {
                let takes = i != gone_i && (c < k || (c == k && full < r));
                if !takes {
                    continue;
                }
                let zone_conflict = self.has_zones
                    && within(owners, p, zone_window, |o| o != gone && self.zone_of[o as usize] == self.zone_of[i]);
                let node_conflict = within(owners, p, node_window, |o| o as usize == i);
                let key = (zone_conflict, node_conflict, c, i);
                if best.is_none_or(|b| key < b) {
                    best = Some(key);
                }
            }
            // Only a ring that was not balanced (decoded from elsewhere) can
            // leave no taker within the rule: then the least loaded takes it.
            let to = match best {
                Some((_, _, _, i)) => i,
                None => (0..counts.len()).filter(|&i| i != gone_i).min_by_key(|&i| (counts[i], i)).unwrap_or(0),
            };
            if counts[to] == k {
                full += 1;
            }
            counts[to] += 1;
            owners[p] = to as MemberIdx;
        }
    }

    /// Whether a partition within `window` of `p` (either side, `p` itself
    /// excluded) belongs to zone `zone`.
    fn zone_within(&self, p: usize, window: usize, zone: u16) -> bool {
        within(&self.owners, p, window, |o| self.zone_of[o as usize] == zone)
    }

    /// The ring's version: bumped by every add and remove.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Q, the number of partitions.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The members, by index.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member at `idx`. Panics if there is none.
    pub fn member(&self, idx: MemberIdx) -> &Member {
        &self.members[idx as usize]
    }

    /// The index of the member named `name`.
    pub fn index_of(&self, name: &str) -> Option<MemberIdx> {
        self.members.iter().position(|m| m.name == name).map(|i| i as MemberIdx)
    }

    /// The owner of each partition, by partition (empty for the empty ring).
    pub fn owners(&self) -> &[MemberIdx] {
        &self.owners
    }

    /// The owner of `partition`. Panics on the empty ring or a partition
    /// `>= partitions()`.
    pub fn owner(&self, partition: u32) -> MemberIdx {
        self.owners[partition as usize]
    }

    /// The partition of `key` in this ring.
    pub fn partition_of_key(&self, key: &[u8]) -> u32 {
        partition_of(key_hash(key), self.partitions)
    }

    /// The first `min(n, members)` entries of the preference list of
    /// `partition` (module doc). Panics on the empty ring or a partition
    /// `>= partitions()`. For `n <= 16` it allocates only the result and
    /// walks `O(n)` partitions on a spread ring (at most two laps).
    pub fn preference_list(&self, partition: u32, n: usize) -> Vec<MemberIdx> {
        let want = n.min(self.members.len());
        if want > 16 {
            // Long lists: the bitmap walk, linear instead of quadratic.
            let mut out = self.extended_preference_list(partition);
            out.truncate(want);
            return out;
        }
        let mut out = Vec::with_capacity(want);
        let q = self.owners.len();
        let p = partition as usize;
        assert!(p < q, "partition {p} out of range (or empty ring)");
        // Pass 1: distinct zones (without zones: distinct members).
        let first = want.min(self.zones);
        for step in 0..q {
            if out.len() == first {
                break;
            }
            let o = self.owners[(p + step) & (q - 1)];
            let z = self.zone_of[o as usize];
            if !out.iter().any(|&m| self.zone_of[m as usize] == z) {
                out.push(o);
            }
        }
        // Pass 2: the remaining members, clockwise from `p` again.
        if out.len() < want {
            for step in 0..q {
                let o = self.owners[(p + step) & (q - 1)];
                if !out.contains(&o) {
                    out.push(o);
                    if out.len() == want {
                        break;
                    }
                }
            }
        }
        // Members that own no partition (never in a balanced ring), by index.
        let mut i = 0;
        while out.len() < want {
            if !out.contains(&(i as MemberIdx)) {
                out.push(i as MemberIdx);
            }
            i += 1;
        }
        out
    }

    /// The first `N` entries of every partition's preference list,
    /// computed once: the ring is immutable, and a request only looks its
    /// key's list up.
    ///
    /// One sweep, `O(partitions × members)` at worst, whatever the ring:
    /// walking each partition's list separately, as
    /// [`Self::preference_list`] does, took a lap of the ring per partition
    /// when members own long runs of partitions, or none (found by a
    /// review: a ring a node sent, 65,536 partitions all owned by one of
    /// three members, held a client's connect for seconds past its
    /// timeout). The sweep goes counterclockwise over two laps keeping the
    /// members in the order a clockwise walk from the current partition
    /// meets them (move to front), and reads each list off that order:
    /// both passes of the walk decide on a member at its first occurrence.
    pub fn preference_table(&self, n: usize) -> PreferenceTable {
        let want = n.min(self.members.len());
        let (m, q) = (self.members.len(), self.owners.len());
        let mut lists = vec![0 as MemberIdx; q * want];
        if want == 0 || q == 0 {
            return PreferenceTable { n: want, partitions: self.partitions, lists };
        }
        // The first lap puts every owner in the list, in the order a walk
        // from partition 0 meets them once past the end of the ring.
        let mut order = MoveToFront::new(m);
        for p in (0..q).rev() {
            order.touch(self.owners[p]);
        }
        // Members that own no partition (never in a balanced ring) come
        // last, as the walk takes them.
        let non_owners: Vec<MemberIdx> = (0..m as MemberIdx).filter(|&i| !order.has(i)).collect();
        let first = want.min(self.zones);
        let mut out = Vec::with_capacity(want);
        // Stamps, so that nothing is cleared per partition: `listed[i] ==
        // p + 1` when member `i` is in partition p's list, `zone_used[z]`
        // likewise for its zones.
        let (mut listed, mut zone_used) = (vec![0usize; m], vec![0usize; self.zones]);
        for p in (0..q).rev() {
            order.touch(self.owners[p]);
            let stamp = p + 1;
            out.clear();
            // Pass 1: distinct zones (without zones: distinct members).
            for o in order.iter() {
                if out.len() == first {
                    break;
                }
                let z = self.zone_of[o as usize] as usize;
                if zone_used[z] != stamp {
                    zone_used[z] = stamp;
                    listed[o as usize] = stamp;
                    out.push(o);
                }
            }
            // Pass 2: the remaining members, in the same order.
            for o in order.iter() {
                if out.len() >= want {
                    break;
                }
                if listed[o as usize] != stamp {
                    listed[o as usize] = stamp;
                    out.push(o);
                }
            }
            // Then the members that own nothing: by index, or for long
            // lists those of zones still unused first
            // (`extended_preference_list`).
            for zone_first in [want > 16, false] {
                for &i in &non_owners {
                    let z = self.zone_of[i as usize] as usize;
                    if out.len() < want && listed[i as usize] != stamp && (!zone_first || zone_used[z] != stamp) {
                        listed[i as usize] = stamp;
                        zone_used[z] = stamp;
                        out.push(i);
                    }
                }
            }
            lists[p * want..(p + 1) * want].copy_from_slice(&out);
        }
        PreferenceTable { n: want, partitions: self.partitions, lists }
    }

    /// Every member, in preference order for `partition`: on a ring where
    /// every member owns a partition (every ring a node builds), its first
    /// `N` entries are `preference_list(partition, N)` for every `N`.
    /// Members that own nothing come last, those of zones still unused
    /// first, where `preference_list` for `N <= 16` takes them by index.
    /// Panics on the empty ring or a partition `>= partitions()`.
    pub fn extended_preference_list(&self, partition: u32) -> Vec<MemberIdx> {
        let m = self.members.len();
        let q = self.owners.len();
        let p = partition as usize;
        assert!(p < q, "partition {p} out of range (or empty ring)");
        let mut out = Vec::with_capacity(m);
        let mut listed = vec![false; m];
        let mut zone_used = vec![false; self.zones];
        let mut used = 0;
        for step in 0..q {
            if used == self.zones {
                break;
            }
            let o = self.owners[(p + step) & (q - 1)];
            let z = self.zone_of[o as usize] as usize;
            if !zone_used[z] {
                zone_used[z] = true;
                used += 1;
                listed[o as usize] = true;
                out.push(o);
            }
        }
        for step in 0..q {
            if out.len() == m {
                break;
            }
            let o = self.owners[(p + step) & (q - 1)];
            if !listed[o as usize] {
                listed[o as usize] = true;
                out.push(o);
            }
        }
        if out.len() < m {
            // Members that own no partition (never in a balanced ring), by
            // index. Their zones may be unused still: take those first.
            for zone_first in [true, false] {
                for (i, seen) in listed.iter_mut().enumerate() {
                    let z = self.zone_of[i] as usize;
                    if !*seen && (!zone_first || !zone_used[z]) {
                        *seen = true;
                        zone_used[z] = true;
                        out.push(i as MemberIdx);
                    }
                }
            }
        }
        out
    }

    /// The number of partitions each member owns, by member index.
    pub fn owned_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.members.len()];
        for &o in &self.owners {
            counts[o as usize] += 1;
        }
        counts
    }

    /// The replica load: for each member, the number of partitions whose
    /// preference list for `n` includes it.
    pub fn replica_counts(&self, n: usize) -> Vec<usize> {
        let mut counts = vec![0; self.members.len()];
        if self.members.is_empty() {
            return counts;
        }
        // The table, not a walk per partition: one sweep whatever the ring.
        for &m in &self.preference_table(n).lists {
            counts[m as usize] += 1;
        }
        counts
    }

    /// Human-readable summary for `gyre ring`: version, Q, the members with
    /// address and zone, the partitions each owns and its share of the fair
    /// `Q/n`, and its replica load for `n` replicas (partitions whose first
    /// `n` preference-list entries include it, against the fair `Q*n/members`).
    pub fn describe(&self, n: usize) -> String {
        let m = self.members.len();
        let zones = if self.has_zones { format!(", {} zones", self.zones) } else { String::new() };
        let mut s = format!("ring version {}: {} partitions, {} members{zones}\n", self.version, self.partitions, m);
        if m == 0 {
            return s;
        }
        let owned = self.owned_counts();
        let replicas = self.replica_counts(n);
        let fair = f64::from(self.partitions) / m as f64;
        let fair_replicas = fair * n.min(m) as f64;
        let addrs: Vec<String> = self.members.iter().map(|x| x.addr.to_string()).collect();
        let name_w = self.members.iter().map(|x| x.name.len()).max().unwrap_or(0).max(4);
        let addr_w = addrs.iter().map(String::len).max().unwrap_or(0).max(7);
        let zone_w = self.members.iter().filter_map(|x| x.zone.as_ref().map(String::len)).max().unwrap_or(0).max(4);
        let replicas_head = format!("replicas(n={n})");
        let rep_w = replicas_head.len();
        let _ = writeln!(
            s,
            "{:<name_w$}  {:<addr_w$}  {:<zone_w$}  partitions  of fair  {replicas_head}  of fair",
            "name", "address", "zone"
        );
        for (i, x) in self.members.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:<name_w$}  {:<addr_w$}  {:<zone_w$}  {:>10}  {:>7.3}  {:>rep_w$}  {:>7.3}",
                x.name,
                addrs[i],
                x.zone.as_deref().unwrap_or("-"),
                owned[i],
                owned[i] as f64 / fair,
                replicas[i],
                replicas[i] as f64 / fair_replicas
            );
        }
        s
    }

    /// Appends the encoding (module doc).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + self.members.len() * MAX_MEMBER_LEN + self.owners.len() * 2);
        out.push(FORMAT);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.partitions.to_le_bytes());
        out.extend_from_slice(&(self.members.len() as u16).to_le_bytes());
        for m in &self.members {
            out.push(m.name.len() as u8);
            out.extend_from_slice(m.name.as_bytes());
            match m.addr.ip() {
                IpAddr::V4(ip) => {
                    out.push(4);
                    out.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    out.push(6);
                    out.extend_from_slice(&ip.octets());
                }
            }
            out.extend_from_slice(&m.addr.port().to_le_bytes());
            let zone = m.zone.as_deref().unwrap_or("");
            out.push(zone.len() as u8);
            out.extend_from_slice(zone.as_bytes());
        }
        for o in &self.owners {
            out.extend_from_slice(&o.to_le_bytes());
        }
    }

    /// The encoding as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes and validates a ring (module doc). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Ring, RingError> {
        let malformed = RingError::Malformed;
        let mut r = Reader { bytes, at: 0 };
        if r.u8()? != FORMAT {
            return Err(malformed("unknown ring format"));
        }
        let version = u64::from_le_bytes(r.array()?);
        let partitions = u32::from_le_bytes(r.array()?);
        if validate_partitions(partitions).is_err() {
            return Err(malformed("partition count is not a power of two up to MAX_PARTITIONS"));
        }
        let count = u16::from_le_bytes(r.array()?) as usize;
        if count > MAX_MEMBERS {
            return Err(malformed("more members than MAX_MEMBERS"));
        }
        if count > partitions as usize {
            return Err(malformed("more members than partitions"));
        }
        // Every member takes at least 1 + 1 + 1 + 4 + 2 + 1 bytes.
        if r.left() < count * 10 {
            return Err(malformed("truncated"));
        }
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            let name_len = r.u8()? as usize;
            if name_len == 0 || name_len > MAX_NAME_LEN {
                return Err(malformed("member name length outside 1..=MAX_NAME_LEN"));
            }
            let name = r.label(name_len, "member name is not printable ASCII")?;
            let ip = match r.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
                6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
                _ => return Err(malformed("unknown address family")),
            };
            let port = u16::from_le_bytes(r.array()?);
            let addr = match ip {
                IpAddr::V4(ip) => SocketAddr::new(IpAddr::V4(ip), port),
                IpAddr::V6(ip) => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
            };
            let zone_len = r.u8()? as usize;
            if zone_len > MAX_ZONE_LEN {
                return Err(malformed("zone length over MAX_ZONE_LEN"));
            }
            let zone = if zone_len == 0 { None } else { Some(r.label(zone_len, "zone is not printable ASCII")?) };
            members.push(Member { name, addr, zone });
        }
        let mut names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(malformed("duplicate member name"));
        }
        let mut addrs: Vec<SocketAddr> = members.iter().map(|m| m.addr).collect();
        addrs.sort_unstable();
        if addrs.windows(2).any(|w| w[0] == w[1]) {
            return Err(malformed("duplicate member address"));
        }
        let owner_count = if count == 0 { 0 } else { partitions as usize };
        if r.left() < owner_count * 2 {
            return Err(malformed("truncated"));
        }
        let mut owners = Vec::with_capacity(owner_count);
        for _ in 0..owner_count {
            let o = u16::from_le_bytes(r.array()?);
            if o as usize >= count {
                return Err(malformed("owner is not a member"));
            }
            owners.push(o);
        }
        if r.left() != 0 {
            return Err(malformed("trailing bytes after the ring"));
        }
        Ok(Ring::from_parts(version, partitions, members, owners))
    }
}

/// How strict a claim walk is about the partitions it takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// No partition near it is in the taker's zone, and the giver's zone
    /// is near it (taking it removes a repeat).
    Fixes,
    /// No partition near it is in the taker's zone.
    Clear,
    /// Any.
    Any,
}

/// Circular distance from `p` to the nearest partition in `set` (`usize::MAX`
/// if it is empty), on a ring of `q` partitions.
fn gap(set: &BTreeSet<usize>, p: usize, q: usize) -> usize {
    let after = set.range(p..).next().or_else(|| set.iter().next());
    let before = set.range(..p).next_back().or_else(|| set.iter().next_back());
    match (after, before) {
        (Some(&a), Some(&b)) => ((a + q - p) % q).min((p + q - b) % q),
        _ => usize::MAX,
    }
}

/// Whether `hit` holds for the owner of a partition within `window` of `p`
/// on either side (`p` itself excluded).
fn within(owners: &[MemberIdx], p: usize, window: usize, hit: impl Fn(MemberIdx) -> bool) -> bool {
    let q = owners.len();
    let window = window.min(q / 2);
    (1..=window).any(|d| hit(owners[(p + d) % q]) || hit(owners[(p + q - d) % q]))
}

/// A cursor over the bytes being decoded.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RingError> {
        let out = self.bytes.get(self.at..).and_then(|rest| rest.get(..n)).ok_or(RingError::Malformed("truncated"))?;
        self.at += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, RingError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RingError> {
        let mut buf = [0u8; N];
        buf.copy_from_slice(self.take(N)?);
        Ok(buf)
    }

    /// `len` bytes of printable ASCII as a string.
    fn label(&mut self, len: usize, what: &'static str) -> Result<String, RingError> {
        let bytes = self.take(len)?;
        if !bytes.iter().all(u8::is_ascii_graphic) {
            return Err(RingError::Malformed(what));
        }
        // Printable ASCII is UTF-8.
        String::from_utf8(bytes.to_vec()).map_err(|_| RingError::Malformed(what))
    }
}

/// Every partition's first `N` preference-list entries, flat (partition
/// `p`'s list is `lists[p * n .. (p + 1) * n]`): about 6 KiB for Q = 1024
/// and N = 3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceTable {
    n: usize,
    partitions: u32,
    lists: Vec<MemberIdx>,
}

impl PreferenceTable {
    /// The preference list of `partition` (`< partitions`).
    pub fn of_partition(&self, partition: u32) -> &[MemberIdx] {
        let at = partition as usize * self.n;
        &self.lists[at..at + self.n]
    }

    /// The preference list of `key`.
    pub fn of_key(&self, key: &[u8]) -> &[MemberIdx] {
        self.of_partition(partition_of(key_hash(key), self.partitions))
    }
}

/// The members in the order a clockwise walk meets them, kept as a
/// counterclockwise sweep touches each partition's owner
/// ([`Ring::preference_table`]): a doubly linked list over member indexes,
/// a touched member moved to its front.
struct MoveToFront {
    head: Option<MemberIdx>,
    prev: Vec<Option<MemberIdx>>,
    next: Vec<Option<MemberIdx>>,
    /// Touched at least once (in the list).
    touched: Vec<bool>,
}

impl MoveToFront {
    fn new(members: usize) -> MoveToFront {
        MoveToFront { head: None, prev: vec![None; members], next: vec![None; members], touched: vec![false; members] }
    }

    fn has(&self, m: MemberIdx) -> bool {
        self.touched[m as usize]
    }

    /// Moves `m` to the front (putting it there if it was not listed).
    fn touch(&mut self, m: MemberIdx) {
        if self.head == Some(m) {
            return;
        }
        let i = m as usize;
        if std::mem::replace(&mut self.touched[i], true) {
            let (p, n) = (self.prev[i], self.next[i]);
            if let Some(p) = p {
                self.next[p as usize] = n;
            }
            if let Some(n) = n {
                self.prev[n as usize] = p;
            }
        }
        self.prev[i] = None;
        self.next[i] = self.head;
        if let Some(h) = self.head {
            self.prev[h as usize] = Some(m);
        }
        self.head = Some(m);
    }

    fn iter(&self) -> impl Iterator<Item = MemberIdx> + '_ {
        std::iter::successors(self.head, |&m| self.next[m as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, addr: &str, zone: Option<&str>) -> Member {
        Member { name: name.to_string(), addr: addr.parse().unwrap(), zone: zone.map(str::to_string) }
    }

    fn nodes(n: usize) -> Vec<Member> {
        (0..n).map(|i| member(&format!("n{i}"), &format!("127.0.0.{}:7000", i + 1), None)).collect()
    }

    /// Each partition's list as the walk makes it ([`Ring::preference_list`]).
    fn walked(ring: &Ring, n: usize) -> Vec<Vec<MemberIdx>> {
        (0..ring.partitions()).map(|p| ring.preference_list(p, n)).collect()
    }

    fn tabled(ring: &Ring, n: usize) -> Vec<Vec<MemberIdx>> {
        let table = ring.preference_table(n);
        (0..ring.partitions()).map(|p| table.of_partition(p).to_vec()).collect()
    }

    proptest::proptest! {
        /// The sweep's table is the walk's lists, on any ring a node could
        /// be sent: owners in long runs or scattered, members that own
        /// nothing, zones or none, lists short and long (past 16, the
        /// walk's other path).
        #[test]
        fn the_table_is_each_partitions_walk(
            log_q in 0u32..9,
            count in 1usize..40,
            zones in 0usize..6,
            runs in proptest::collection::vec((0usize..40, 1usize..64), 1..40),
            n in 1usize..42,
        ) {
            let q = 1usize << log_q;
            let count = count.min(q);
            let members: Vec<Member> = (0..count)
                .map(|i| {
                    let zone = (zones > 0).then(|| format!("z{}", i % zones));
                    member(&format!("n{i}"), &format!("127.0.{}.{}:7000", i / 200, i % 200 + 1), zone.as_deref())
                })
                .collect();
            // Runs of partitions, each owned by one member (some members
            // may own none).
            let mut owners = Vec::with_capacity(q);
            for &(who, len) in runs.iter().cycle() {
                if owners.len() == q {
                    break;
                }
                owners.extend(std::iter::repeat_n((who % count) as MemberIdx, len.min(q - owners.len())));
            }
            let ring = Ring::from_parts(1, q as u32, members, owners);
            proptest::prop_assert_eq!(tabled(&ring, n), walked(&ring, n));
        }
    }

    /// Lists either side of 16, where the walk takes members that own
    /// nothing zone-first ([`Ring::extended_preference_list`]) instead of
    /// by index: one member owns every partition, 18 own none, two zones
    /// (a case the proptest above found against a table that took them by
    /// index for every length).
    #[test]
    fn members_that_own_nothing_are_listed_as_the_walk_lists_them() {
        let members: Vec<Member> = (0..19)
            .map(|i| member(&format!("n{i}"), &format!("127.0.0.{}:7000", i + 1), Some(["z0", "z1"][i % 2])))
            .collect();
        let ring = Ring::from_parts(1, 32, members, vec![8; 32]);
        for n in [16, 17] {
            assert_eq!(tabled(&ring, n), walked(&ring, n), "n = {n}");
        }
    }

    /// A ring whose partitions one member owns all but a few of: the walk
    /// from most partitions goes round most of the ring; the table does
    /// not (it is built in one sweep), and says what the walk says.
    #[test]
    fn a_lopsided_ring_gets_its_table() {
        let q = 1u32 << 10;
        let mut owners = vec![0 as MemberIdx; q as usize];
        owners[q as usize - 1] = 1;
        let ring = Ring::from_parts(1, q, nodes(4), owners);
        assert_eq!(tabled(&ring, 3), walked(&ring, 3));
        assert_eq!(ring.preference_table(3).of_partition(0), [0, 1, 2]);
    }

    /// The example of the module doc.
    const EXAMPLE: [u8; 56] = [
        0x01, // format
        0x02, 0, 0, 0, 0, 0, 0, 0, // version 2
        0x04, 0, 0, 0, // 4 partitions
        0x02, 0, // 2 members
        0x01, b'a', 0x04, 127, 0, 0, 1, 0x58, 0x1b, 0x01, b'z', // a, 127.0.0.1:7000, zone z
        0x01, b'b', 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x59, 0x1b, 0x00, // b, [::1]:7001
        0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, // owners a b a b
    ];

    fn example() -> Ring {
        let members = vec![member("a", "127.0.0.1:7000", Some("z")), member("b", "[::1]:7001", None)];
        Ring::from_parts(2, 4, members, vec![0, 1, 0, 1])
    }

    #[test]
    fn encoding_golden() {
        let ring = example();
        assert_eq!(ring.to_bytes(), EXAMPLE);
        let mut appended = vec![0xee];
        ring.encode(&mut appended);
        assert_eq!(appended[1..], EXAMPLE);
        assert_eq!(Ring::decode(&EXAMPLE), Ok(ring));
        // The empty ring: header only.
        let empty = Ring::new(8).unwrap();
        let bytes = empty.to_bytes();
        assert_eq!(bytes, [1, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0]);
        assert_eq!(Ring::decode(&bytes), Ok(empty));
    }

    #[test]
    fn claim_golden() {
        // Pinned: nodes that build a ring from the same cluster file must
        // agree, across versions of this code too.
        let ring = Ring::with_members(16, nodes(3)).unwrap();
        assert_eq!(ring.version(), 3);
        assert_eq!(ring.owners(), [2, 1, 0, 2, 0, 1, 2, 1, 0, 1, 2, 1, 0, 2, 0, 1]);
        assert_eq!(ring.owned_counts(), [5, 6, 5]);
        let ring = ring.remove("n1").unwrap();
        assert_eq!(ring.owners(), [1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1]);
    }

    #[test]
    fn decode_rejects() {
        let m = EXAMPLE;
        for cut in 0..m.len() {
            assert_eq!(Ring::decode(&m[..cut]), Err(RingError::Malformed("truncated")), "cut at {cut}");
        }
        let with = |at: usize, byte: u8| {
            let mut m = m.to_vec();
            m[at] = byte;
            m
        };
        let bad = |bytes: &[u8], msg: &'static str| assert_eq!(Ring::decode(bytes), Err(RingError::Malformed(msg)));
        bad(&with(0, 2), "unknown ring format");
        bad(&with(9, 3), "partition count is not a power of two up to MAX_PARTITIONS");
        bad(&with(9, 0), "partition count is not a power of two up to MAX_PARTITIONS");
        bad(&[&m[..9], &[0, 0, 2, 0], &m[13..]].concat(), "partition count is not a power of two up to MAX_PARTITIONS");
        bad(&with(13, 5), "more members than partitions");
        bad(&[&m[..13], &[0x01, 0x04]].concat(), "more members than MAX_MEMBERS");
        bad(&[&m[..13], &[0xff, 0xff]].concat(), "more members than MAX_MEMBERS");
        bad(&with(15, 0), "member name length outside 1..=MAX_NAME_LEN");
        bad(&with(15, 65), "member name length outside 1..=MAX_NAME_LEN");
        bad(&with(16, b' '), "member name is not printable ASCII");
        bad(&with(16, 0xc3), "member name is not printable ASCII");
        bad(&with(17, 5), "unknown address family");
        bad(&with(24, 65), "zone length over MAX_ZONE_LEN");
        bad(&with(25, 0x7f), "zone is not printable ASCII");
        bad(&with(27, b'a'), "duplicate member name");
        // b's address made 127.0.0.1:7000 too (an IPv4 member in place of the IPv6 one).
        let dup_addr = [&m[..28], &[0x04, 127, 0, 0, 1, 0x58, 0x1b, 0x00], &m[48..]].concat();
        bad(&dup_addr, "duplicate member address");
        bad(&with(50, 2), "owner is not a member");
        bad(&[m.as_slice(), &[0]].concat(), "trailing bytes after the ring");
        bad(&[&m[..13], &[0, 0, 0]].concat(), "trailing bytes after the ring");
    }

    #[test]
    fn add_and_remove_validate() {
        let ring = Ring::with_members(4, nodes(2)).unwrap();
        let err = |m: Member| ring.add(m).unwrap_err();
        assert_eq!(err(member("n0", "10.0.0.1:1", None)), RingError::DuplicateName("n0".into()));
        assert_eq!(
            err(member("x", "127.0.0.1:7000", None)),
            RingError::DuplicateAddr("127.0.0.1:7000".parse().unwrap())
        );
        for (name, zone) in [("", None), ("a b", None), (&*"x".repeat(65), None), ("é", None), ("x", Some(""))] {
            assert!(matches!(err(member(name, "10.0.0.1:1", zone)), RingError::InvalidMember { .. }), "{name:?}");
        }
        assert!(ring.add(member(&"x".repeat(64), "10.0.0.1:1", Some(&"z".repeat(64)))).is_ok());
        let scoped = Member {
            name: "v6".into(),
            addr: SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 1, 0, 3)),
            zone: None,
        };
        assert!(matches!(err(scoped), RingError::InvalidMember { .. }));
        let full = ring.add(member("c", "10.0.0.1:1", None)).unwrap().add(member("d", "10.0.0.2:1", None)).unwrap();
        assert_eq!(full.add(member("e", "10.0.0.3:1", None)), Err(RingError::TooManyMembers { max: 4 }));
        assert_eq!(ring.remove("zz"), Err(RingError::UnknownMember("zz".into())));
        let one = ring.remove("n0").unwrap();
        assert_eq!(one.version(), 3);
        assert_eq!(one.owners(), [0, 0, 0, 0]);
        assert_eq!(one.remove("n1"), Err(RingError::LastMember("n1".into())));
        assert!(matches!(Ring::new(12), Err(RingError::InvalidPartitions(_))));
        assert!(matches!(Ring::new(0), Err(RingError::InvalidPartitions(_))));
    }

    #[test]
    fn preference_lists_take_distinct_zones_first() {
        // Q = 8, owners a b c d a b c d; zones: a, b in z1, c in z2, d none.
        let members = vec![
            member("a", "10.0.0.1:1", Some("z1")),
            member("b", "10.0.0.2:1", Some("z1")),
            member("c", "10.0.0.3:1", Some("z2")),
            member("d", "10.0.0.4:1", None),
        ];
        let ring = Ring::from_parts(0, 8, members, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(ring.zones, 3);
        // From a: b is skipped (z1 used) until c (z2) and d (own zone) are in.
        assert_eq!(ring.preference_list(0, 1), [0]);
        assert_eq!(ring.preference_list(0, 2), [0, 2]);
        assert_eq!(ring.preference_list(0, 3), [0, 2, 3]);
        assert_eq!(ring.preference_list(0, 4), [0, 2, 3, 1]);
        assert_eq!(ring.preference_list(0, 9), [0, 2, 3, 1]);
        assert_eq!(ring.extended_preference_list(0), [0, 2, 3, 1]);
        assert_eq!(ring.preference_list(1, 3), [1, 2, 3]);
        assert_eq!(ring.preference_list(3, 3), [3, 0, 2]);
        assert_eq!(ring.extended_preference_list(3), [3, 0, 2, 1]);
        // Without zones: the next distinct members.
        let plain = Ring::from_parts(0, 8, nodes(4), vec![0, 0, 1, 0, 2, 3, 1, 2]);
        assert_eq!(plain.preference_list(0, 3), [0, 1, 2]);
        assert_eq!(plain.extended_preference_list(6), [1, 2, 0, 3]);
        // A member owning nothing (only in a decoded, unbalanced ring) still
        // comes last.
        let idle = Ring::from_parts(0, 4, nodes(3), vec![0, 1, 0, 1]);
        assert_eq!(idle.preference_list(1, 3), [1, 0, 2]);
        assert_eq!(idle.extended_preference_list(1), [1, 0, 2]);
    }

    #[test]
    fn sequential_claims_spread_members() {
        // From an empty ring, members added in order: every window of
        // CLAIM_TARGET_N consecutive partitions mostly has distinct owners, and
        // replica load stays near fair.
        let ring = Ring::with_members(1024, nodes(8)).unwrap();
        let q = ring.owners().len();
        let distinct = (0..q)
            .filter(|&p| {
                let w: Vec<_> = (0..CLAIM_TARGET_N).map(|d| ring.owners()[(p + d) % q]).collect();
                (1..w.len()).all(|i| !w[..i].contains(&w[i]))
            })
            .count();
        assert!(distinct * 10 >= q * 9, "{distinct} of {q} windows distinct");
        let fair = (q * 3) as f64 / 8.0;
        for (i, c) in ring.replica_counts(3).iter().enumerate() {
            assert!(
                (*c as f64 - fair).abs() < fair * 0.1,
                "member {i}: {c} replicas, fair {fair}\n{}",
                ring.describe(3)
            );
        }
    }

    #[test]
    fn describe_lists_every_member() {
        let ring = Ring::with_members(16, nodes(3)).unwrap();
        let text = ring.describe(2);
        assert!(text.starts_with("ring version 3: 16 partitions, 3 members\n"), "{text}");
        assert!(text.contains("127.0.0.2:7000"), "{text}");
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.lines().nth(1).unwrap().contains("replicas(n=2)"), "{text}");
        assert_eq!(Ring::new(4).unwrap().describe(3), "ring version 0: 4 partitions, 0 members\n");
    }

    #[test]
    fn bounds_are_what_the_doc_says() {
        assert_eq!(MAX_ENCODED_LEN, 15 + 1024 * 149 + 65536 * 2);
        let members: Vec<Member> = (0..MAX_MEMBERS)
            .map(|i| Member {
                name: format!("{i:0>64}"),
                addr: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(i as u128 + 1)), 1),
                zone: Some(format!("{:0>64}", i % 7)),
            })
            .collect();
        let ring = Ring::from_parts(u64::MAX, MAX_PARTITIONS, members, vec![0; MAX_PARTITIONS as usize]);
        let bytes = ring.to_bytes();
        assert_eq!(bytes.len(), MAX_ENCODED_LEN);
        assert_eq!(Ring::decode(&bytes), Ok(ring));
    }
}
