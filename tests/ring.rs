//! The consistent-hash ring (`gyre::core::ring`) under random histories of
//! joins and leaves: balance within one partition of the fair share, minimal
//! movement on every add and remove, preference lists of distinct members
//! (and distinct zones first), determinism, and an encoding that roundtrips
//! and whose decoder never panics.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use gyre::core::ring::{Member, MemberIdx, Ring, RingError, MAX_MEMBERS};
use proptest::prelude::*;
use proptest::sample::Index;

/// Most members a history grows to (keeps every case fast in debug builds).
const MAX_TEST_MEMBERS: usize = 20;

#[derive(Clone, Debug)]
enum Op {
    /// A member joins, in zone `zone` (none if `None`), with an IPv6 address if `v6`.
    Add { zone: Option<u8>, v6: bool },
    /// A member leaves.
    Remove(Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (prop::option::weighted(0.6, 0u8..4), any::<bool>()).prop_map(|(zone, v6)| Op::Add { zone, v6 }),
        1 => any::<Index>().prop_map(Op::Remove),
    ]
}

/// Q = 1 to 1024 partitions and a history of up to 40 operations.
fn history() -> impl Strategy<Value = (u32, Vec<Op>)> {
    (0u32..=10, prop::collection::vec(op(), 1..40)).prop_map(|(bits, ops)| (1 << bits, ops))
}

/// The `i`-th member ever added: unique name and address.
fn member(i: usize, zone: Option<u8>, v6: bool) -> Member {
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16 + 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8))
    };
    Member {
        name: format!("node-{i}"),
        addr: SocketAddr::new(ip, 7000 + i as u16),
        zone: zone.map(|z| format!("zone-{z}")),
    }
}

/// Owner names by partition (indices shift on removal; names do not).
fn owner_names(ring: &Ring) -> Vec<&str> {
    ring.owners().iter().map(|&o| ring.member(o).name.as_str()).collect()
}

/// Every member owns floor(Q/n) or ceil(Q/n) partitions.
fn check_balance(ring: &Ring) {
    let q = ring.partitions() as usize;
    let n = ring.members().len();
    let counts = ring.owned_counts();
    assert_eq!(counts.iter().sum::<usize>(), q);
    for (i, &c) in counts.iter().enumerate() {
        assert!(c == q / n || c == q.div_ceil(n), "member {i} owns {c} of {q} partitions with {n} members: {counts:?}");
    }
}

/// Applies a history, checking every step; returns the rings it went through.
fn run(q: u32, ops: &[Op]) -> Vec<Ring> {
    let mut ring = Ring::new(q).expect("valid partition count");
    let mut rings = vec![ring.clone()];
    let mut added = 0;
    for op in ops {
        let n = ring.members().len();
        let next = match op {
            Op::Add { zone, v6 } => {
                let m = member(added, *zone, *v6);
                added += 1;
                if n >= q as usize {
                    assert_eq!(ring.add(m), Err(RingError::TooManyMembers { max: q as usize }));
                    continue;
                }
                if n >= MAX_TEST_MEMBERS {
                    continue;
                }
                let name = m.name.clone();
                let next = ring.add(m).expect("add");
                if n > 0 {
                    // Exactly the new member's floor(Q/(n+1)) partitions moved,
                    // all to it, all from members above the new fair share.
                    let k = q as usize / (n + 1);
                    let (before, after) = (owner_names(&ring), owner_names(&next));
                    let moved: Vec<usize> = (0..before.len()).filter(|&p| before[p] != after[p]).collect();
                    assert_eq!(moved.len(), k, "add moved {} partitions, the minimum is {k}", moved.len());
                    assert!(moved.iter().all(|&p| after[p] == name));
                    let old = ring.owned_counts();
                    for &p in &moved {
                        let giver = ring.owner(p as u32) as usize;
                        assert!(old[giver] > k, "member {giver} with {} partitions gave one", old[giver]);
                    }
                } else {
                    assert!(next.owners().iter().all(|&o| o == 0));
                }
                next
            }
            Op::Remove(i) => {
                if n == 0 {
                    continue;
                }
                let name = ring.member(i.index(n) as MemberIdx).name.clone();
                if n == 1 {
                    assert_eq!(ring.remove(&name), Err(RingError::LastMember(name)));
                    continue;
                }
                let next = ring.remove(&name).expect("remove");
                // Exactly the leaver's partitions moved, to the least loaded.
                let (before, after) = (owner_names(&ring), owner_names(&next));
                let moved: BTreeSet<usize> = (0..before.len()).filter(|&p| before[p] != after[p]).collect();
                let its: BTreeSet<usize> = (0..before.len()).filter(|&p| before[p] == name).collect();
                assert_eq!(moved, its);
                assert!(next.index_of(&name).is_none());
                next
            }
        };
        assert_eq!(next.version(), ring.version() + 1);
        assert_eq!(next.partitions(), q);
        check_balance(&next);
        ring = next;
        rings.push(ring.clone());
    }
    rings
}

/// Zone of each member as the preference list counts them: members without
/// a zone are zones of their own.
fn zone_keys(ring: &Ring) -> Vec<String> {
    ring.members().iter().map(|m| m.zone.clone().unwrap_or_else(|| format!("no zone: {}", m.name))).collect()
}

fn check_preference_lists(ring: &Ring) {
    let m = ring.members().len();
    if m == 0 {
        return;
    }
    let zones = zone_keys(ring);
    let distinct_zones = zones.iter().collect::<BTreeSet<_>>().len();
    let table = ring.preference_table(3);
    for p in 0..ring.partitions() {
        assert_eq!(table.of_partition(p), ring.preference_list(p, 3), "the table is the lists, partition {p}");
        let ext = ring.extended_preference_list(p);
        // A permutation of all members, starting with the owner.
        assert_eq!(ext.len(), m);
        assert_eq!(ext.iter().collect::<BTreeSet<_>>().len(), m, "{ext:?}");
        assert!(ext.iter().all(|&i| (i as usize) < m));
        assert_eq!(ext[0], ring.owner(p));
        for n in 1..=m + 1 {
            let list = ring.preference_list(p, n);
            assert_eq!(list, ext[..n.min(m)], "partition {p}, n = {n}");
            // The first n entries take min(n, zones) distinct zones.
            let used: BTreeSet<&String> = list.iter().map(|&i| &zones[i as usize]).collect();
            assert_eq!(used.len(), n.min(m).min(distinct_zones), "partition {p}, n = {n}: {list:?}");
        }
    }
}

proptest! {
    // A fixed seed: the same cases on every run.
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(0x6779_7265), ..ProptestConfig::default() })]

    #[test]
    fn claims_stay_balanced_and_move_the_minimum((q, ops) in history()) {
        run(q, &ops);
    }

    #[test]
    fn preference_lists_take_distinct_members_and_zones((q, ops) in history()) {
        let rings = run(q, &ops);
        check_preference_lists(rings.last().expect("at least the empty ring"));
    }

    #[test]
    fn encoding_roundtrips((q, ops) in history()) {
        for ring in run(q, &ops) {
            let bytes = ring.to_bytes();
            let decoded = Ring::decode(&bytes).expect("decode");
            prop_assert_eq!(&decoded, &ring);
            prop_assert_eq!(decoded.to_bytes(), bytes);
        }
    }

    #[test]
    fn the_same_members_give_the_same_ring((q, ops) in history()) {
        // The surviving members, re-added in join order from scratch, twice.
        let last = run(q, &ops).pop().expect("at least the empty ring");
        let members = last.members().to_vec();
        let a = Ring::with_members(q, members.clone()).expect("with_members");
        let b = Ring::with_members(q, members.clone()).expect("with_members");
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a.version(), members.len() as u64);
        let mut c = Ring::new(q).expect("new");
        for m in members {
            c = c.add(m).expect("add");
        }
        prop_assert_eq!(&a, &c);
        check_balance_if_any(&a);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
        check_decode(&data);
    }

    #[test]
    fn decoding_mutated_rings_never_panics(
        (q, ops) in history(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..6),
        cut in any::<Index>(),
    ) {
        let mut bytes = run(q, &ops).pop().expect("at least the empty ring").to_bytes();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        check_decode(&bytes);
        check_decode(&bytes[..cut.index(bytes.len() + 1)]);
    }
}

fn check_balance_if_any(ring: &Ring) {
    if !ring.members().is_empty() {
        check_balance(ring);
    }
}

/// Decoding never panics; whatever decodes is consistent and re-encodes to
/// the same bytes.
fn check_decode(bytes: &[u8]) {
    if let Ok(ring) = Ring::decode(bytes) {
        assert_eq!(ring.to_bytes(), bytes);
        let m = ring.members().len();
        assert!(m <= MAX_MEMBERS && m <= ring.partitions() as usize);
        if m > 0 {
            assert_eq!(ring.owners().len(), ring.partitions() as usize);
            assert!(ring.owners().iter().all(|&o| (o as usize) < m));
            // Lists work even on rings no claim produced.
            assert_eq!(ring.extended_preference_list(0).len(), m);
            assert_eq!(ring.preference_list(ring.partitions() - 1, 3).len(), m.min(3));
        }
    }
}

#[test]
fn sequential_joins_in_zones_get_distinct_zones() {
    // Six members in three zones joined in order: every N = 3 list spans
    // the three zones, and no member carries more than 1.25x its fair load.
    let members: Vec<Member> = (0..6).map(|i| member(i, Some((i % 3) as u8), false)).collect();
    let ring = Ring::with_members(1024, members).unwrap();
    check_balance(&ring);
    check_preference_lists(&ring);
    let fair = 1024.0 * 3.0 / 6.0;
    for (i, &c) in ring.replica_counts(3).iter().enumerate() {
        assert!((c as f64) < fair * 1.25 && (c as f64) > fair * 0.75, "member {i}: {c}\n{}", ring.describe(3));
    }
}
