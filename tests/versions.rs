//! Causal versions of a key (`gyre::core::version`): the merge laws, the
//! superseding of ancestors, encoding roundtrips and no-lost-update, checked
//! on states produced by random histories (several replicas, each the only
//! coordinator of its own actor id; client contexts taken from random earlier
//! reads; random replica merges), plus the client-visible scenarios.

use std::collections::BTreeMap;

use gyre::core::version::{
    Actor, Clock, Dot, VersionError, VersionSet, MAX_CLOCK_ENTRIES, MAX_CONTEXT_LEN, MAX_ENCODED_META, MAX_SIBLINGS,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// Replica `i` is node `ACTORS[i]`; the ids are spread out so that the
/// encodings exercise every byte of the actor field.
const ACTORS: [Actor; 4] = [3, 1 << 40, 0x0102_0304_0506_0708, u64::MAX - 1];
const REPLICAS: usize = ACTORS.len();

#[derive(Clone, Debug)]
enum Op {
    /// A client reads one replica's context.
    Read { replica: usize },
    /// A client reads two replicas and merges the contexts (a quorum read).
    ReadTwo { a: usize, b: usize },
    /// A client writes (or deletes) through `replica` with an earlier context.
    Put { replica: usize, read: Index, delete: bool },
    /// Anti-entropy / read repair: `to` merges `from`'s state.
    Merge { from: usize, to: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..REPLICAS).prop_map(|replica| Op::Read { replica }),
        1 => (0..REPLICAS, 0..REPLICAS).prop_map(|(a, b)| Op::ReadTwo { a, b }),
        4 => (0..REPLICAS, any::<Index>(), prop::bool::weighted(0.2))
            .prop_map(|(replica, read, delete)| Op::Put { replica, read, delete }),
        3 => (0..REPLICAS, 0..REPLICAS).prop_map(|(from, to)| Op::Merge { from, to }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 0..48)
}

/// What a history produced.
struct History {
    replicas: Vec<VersionSet>,
    /// Every state any replica passed through, the empty one included.
    states: Vec<VersionSet>,
    /// Every write: its dot and value.
    writes: BTreeMap<Dot, Option<Vec<u8>>>,
    /// Every context a successful write was made with.
    used_contexts: Vec<Clock>,
}

fn run(ops: &[Op]) -> History {
    let mut replicas = vec![VersionSet::new(); REPLICAS];
    let mut reads = vec![Clock::new()];
    let mut h = History {
        replicas: Vec::new(),
        states: vec![VersionSet::new()],
        writes: BTreeMap::new(),
        used_contexts: Vec::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Read { replica } => reads.push(replicas[*replica].clock().clone()),
            Op::ReadTwo { a, b } => {
                let mut ctx = replicas[*a].clock().clone();
                ctx.merge(replicas[*b].clock());
                reads.push(ctx);
            }
            Op::Put { replica, read, delete } => {
                let ctx = reads[read.index(reads.len())].clone();
                let value = (!delete).then(|| format!("r{replica}s{step}").into_bytes());
                // Fewer writes than MAX_SIBLINGS, so the limit is never hit.
                let dot = replicas[*replica].update(&ctx, ACTORS[*replica], value.clone()).expect("update");
                assert_eq!(dot.actor, ACTORS[*replica]);
                assert!(h.writes.insert(dot, value).is_none(), "dot {dot:?} issued twice");
                h.used_contexts.push(ctx);
                h.states.push(replicas[*replica].clone());
            }
            Op::Merge { from, to } => {
                let other = replicas[*from].clone();
                replicas[*to].merge(&other);
                h.states.push(replicas[*to].clone());
            }
        }
    }
    h.replicas = replicas;
    h
}

fn merged(a: &VersionSet, b: &VersionSet) -> VersionSet {
    let mut out = a.clone();
    out.merge(b);
    out
}

/// Checks the invariant every state must satisfy, through the public API.
fn check_invariant(s: &VersionSet) {
    let dots: Vec<Dot> = s.siblings().iter().map(|x| x.dot).collect();
    assert!(dots.windows(2).all(|w| w[0] < w[1]), "siblings not sorted and unique: {dots:?}");
    assert!(dots.iter().all(|&d| s.clock().covers(d)), "uncovered sibling in {s:?}");
    assert!(s.clock().len() <= MAX_CLOCK_ENTRIES);
    assert!(s.siblings().len() <= MAX_SIBLINGS);
}

proptest! {
    // A fixed seed: the same cases on every run.
    #![proptest_config(ProptestConfig { rng_seed: proptest::test_runner::RngSeed::Fixed(0x6779_7265), ..ProptestConfig::default() })]

    #[test]
    fn merge_is_commutative_associative_idempotent(
        ops in ops(), i in any::<Index>(), j in any::<Index>(), k in any::<Index>(),
    ) {
        let h = run(&ops);
        let (a, b, c) = (&h.states[i.index(h.states.len())], &h.states[j.index(h.states.len())], &h.states[k.index(h.states.len())]);
        for s in [a, b, c] {
            check_invariant(s);
        }
        prop_assert_eq!(merged(a, b), merged(b, a));
        prop_assert_eq!(merged(&merged(a, b), c), merged(a, &merged(b, c)));
        prop_assert_eq!(&merged(a, a), a);
        prop_assert_eq!(&merged(a, &VersionSet::new()), a);
        prop_assert_eq!(&merged(&VersionSet::new(), a), a);
        check_invariant(&merged(a, b));
    }

    #[test]
    fn a_descendant_supersedes_its_ancestor(
        ops in ops(), i in any::<Index>(), replica in 0..REPLICAS, delete in any::<bool>(),
    ) {
        let h = run(&ops);
        let s = &h.states[i.index(h.states.len())];
        let mut d = s.clone();
        let value = (!delete).then(|| b"descendant".to_vec());
        let dot = d.update(s.clock(), ACTORS[replica], value.clone()).expect("update");
        prop_assert_eq!(d.siblings().len(), 1);
        prop_assert_eq!(&d.siblings()[0].value, &value);
        prop_assert_eq!(d.siblings()[0].dot, dot);
        prop_assert!(!s.clock().covers(dot));
        prop_assert_eq!(&merged(s, &d), &d);
        prop_assert_eq!(&merged(&d, s), &d);
    }

    #[test]
    fn full_anti_entropy_keeps_exactly_the_unsuperseded_writes(ops in ops()) {
        let h = run(&ops);
        let mut all = VersionSet::new();
        for r in &h.replicas {
            all.merge(r);
        }
        // Converged: every replica that merges everything ends in the same state.
        for r in &h.replicas {
            prop_assert_eq!(&merged(r, &all), &all);
        }
        // No update lost, none resurrected: a value survives iff no context
        // that a later write was made with had seen it. A tombstone never
        // survives a context that saw it, but may also be folded into a
        // later delete's (`VersionSet::update`): it shows nothing to a read,
        // and what it superseded stays superseded through the clock.
        let unseen: Vec<(Dot, Option<Vec<u8>>)> = h
            .writes
            .iter()
            .filter(|(dot, _)| !h.used_contexts.iter().any(|ctx| ctx.covers(**dot)))
            .map(|(dot, value)| (*dot, value.clone()))
            .collect();
        let got: Vec<(Dot, Option<Vec<u8>>)> = all.siblings().iter().map(|s| (s.dot, s.value.clone())).collect();
        let live = |v: &[(Dot, Option<Vec<u8>>)]| v.iter().filter(|(_, x)| x.is_some()).cloned().collect::<Vec<_>>();
        prop_assert_eq!(live(&got), live(&unseen));
        for tomb in got.iter().filter(|(_, x)| x.is_none()) {
            prop_assert!(unseen.contains(tomb), "a tombstone a later write saw came back: {:?}", tomb);
        }
        for (dot, _) in unseen.iter().filter(|(_, x)| x.is_none()) {
            prop_assert!(all.clock().covers(*dot), "a tombstone's dot left the clock: {:?}", dot);
            // Gone only if folded: a later delete of the same node's.
            let kept = got.iter().any(|(d, _)| d == dot);
            let folded = h.writes.iter().any(|(d, v)| v.is_none() && d.actor == dot.actor && d.counter > dot.counter);
            prop_assert!(kept || folded, "a tombstone no write saw is gone, folded by no later delete of its node: {:?}", dot);
        }
    }

    #[test]
    fn every_state_roundtrips_through_both_encodings(ops in ops()) {
        let h = run(&ops);
        for s in &h.states {
            check_invariant(s);
            let (meta, value) = s.encode();
            prop_assert!(meta.len() <= MAX_ENCODED_META);
            prop_assert_eq!(value.len(), s.encoded_value_len());
            prop_assert_eq!(s.live_values().map(<[u8]>::len).sum::<usize>(), value.len());
            prop_assert_eq!(&VersionSet::decode(&meta, &value).expect("decode"), s);
            decode_live_agrees(&meta, &value)?;
            let ctx = s.clock().to_bytes();
            prop_assert!(ctx.len() <= MAX_CONTEXT_LEN);
            prop_assert_eq!(ctx.is_empty(), s.clock().is_empty());
            prop_assert_eq!(&Clock::decode(&ctx).expect("decode context"), s.clock());
        }
    }

    #[test]
    fn corrupted_encodings_never_panic_and_decode_is_canonical(
        ops in ops(), i in any::<Index>(), flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        cut in any::<Index>(),
    ) {
        let h = run(&ops);
        let s = &h.states[i.index(h.states.len())];
        let (original_meta, value) = s.encode();
        let mut meta = original_meta.clone();
        let mut ctx = s.clock().to_bytes();
        if !meta.is_empty() {
            for (at, byte) in &flips {
                let at = at.index(meta.len());
                meta[at] ^= byte;
                let at = at % ctx.len();
                ctx[at] ^= byte;
            }
        }
        // Whatever decode accepts is a valid state that encodes back to the very same bytes.
        if let Ok(d) = VersionSet::decode(&meta, &value) {
            check_invariant(&d);
            prop_assert_eq!(d.encode(), (meta.clone(), value.clone()));
        }
        decode_live_agrees(&meta, &value)?;
        if let Ok(c) = Clock::decode(&ctx) {
            prop_assert_eq!(c.to_bytes(), ctx.clone());
        }
        let cut_value = &value[..cut.index(value.len() + 1)];
        if cut_value.len() < value.len() {
            prop_assert!(VersionSet::decode(&original_meta, cut_value).is_err());
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        meta in prop::collection::vec(any::<u8>(), 0..256),
        value in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        if let Ok(d) = VersionSet::decode(&meta, &value) {
            check_invariant(&d);
            prop_assert_eq!(d.encode(), (meta.clone(), value.clone()));
        }
        decode_live_agrees(&meta, &value)?;
        if let Ok(c) = Clock::decode(&meta) {
            prop_assert_eq!(c.to_bytes(), meta.clone());
        }
    }

    /// Random bytes rarely get past the format byte; these start with a valid header.
    #[test]
    fn decoding_plausible_bytes_never_panics(
        n in 0u8..4, body in prop::collection::vec(prop_oneof![0u8..4, any::<u8>()], 0..96),
        value in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let meta: Vec<u8> = [1, n].into_iter().chain(body).collect();
        if let Ok(d) = VersionSet::decode(&meta, &value) {
            check_invariant(&d);
            prop_assert_eq!(d.encode(), (meta.clone(), value.clone()));
        }
        decode_live_agrees(&meta, &value)?;
        if let Ok(c) = Clock::decode(&meta) {
            prop_assert_eq!(c.to_bytes(), meta.clone());
        }
    }
}

/// The in-place reader a GET reply uses accepts exactly what `decode`
/// accepts, and yields the same context and live values.
fn decode_live_agrees(meta: &[u8], value: &[u8]) -> Result<(), TestCaseError> {
    let mut live = Vec::new();
    match (VersionSet::decode(meta, value), VersionSet::decode_live(meta, value, &mut live)) {
        (Ok(set), Ok(ctx)) => {
            prop_assert_eq!(ctx, &set.clock().to_bytes()[..]);
            prop_assert_eq!(live, set.live_values().collect::<Vec<_>>());
        }
        (Err(a), Err(b)) => prop_assert_eq!(a, b),
        (a, b) => prop_assert!(false, "decode {:?} but decode_live {:?}", a.map(|_| ()), b.map(|_| ())),
    }
    Ok(())
}

// ---- Scenarios ----

const A: Actor = 1;
const B: Actor = 2;

fn put(s: &mut VersionSet, ctx: &Clock, actor: Actor, value: &str) -> Dot {
    s.update(ctx, actor, Some(value.as_bytes().to_vec())).expect("put")
}

fn live(s: &VersionSet) -> Vec<String> {
    s.live_values().map(|v| String::from_utf8(v.to_vec()).expect("utf-8")).collect()
}

/// The context a client gets, as the opaque bytes it would carry.
fn read(s: &VersionSet) -> Clock {
    Clock::decode(&s.clock().to_bytes()).expect("context")
}

#[test]
fn two_clients_with_the_same_context_make_two_siblings_and_a_later_put_collapses_them() {
    let mut s = VersionSet::new();
    put(&mut s, &Clock::new(), A, "v0");
    let ctx = read(&s);
    // Same coordinator.
    let mut one = s.clone();
    put(&mut one, &ctx, A, "x");
    put(&mut one, &ctx, A, "y");
    assert_eq!(live(&one), ["x", "y"]);
    // Different coordinators on different replicas, then anti-entropy.
    let (mut ra, mut rb) = (s.clone(), s.clone());
    put(&mut ra, &ctx, A, "x");
    put(&mut rb, &ctx, B, "y");
    ra.merge(&rb);
    assert_eq!(live(&ra), ["x", "y"]);
    // A put with the context that saw both collapses them.
    for mut both in [one, ra] {
        let ctx = read(&both);
        put(&mut both, &ctx, B, "z");
        assert_eq!(live(&both), ["z"]);
        assert_eq!(both.siblings().len(), 1);
    }
}

#[test]
fn a_put_without_context_on_an_existing_key_adds_a_sibling() {
    let mut s = VersionSet::new();
    put(&mut s, &Clock::new(), A, "a");
    put(&mut s, &Clock::new(), A, "b");
    assert_eq!(live(&s), ["a", "b"]);
    assert_eq!(s.clock().get(A), 2);
}

#[test]
fn n_concurrent_writers_from_one_context_give_n_siblings_plus_the_unseen_ones() {
    const N: usize = 5;
    let mut s = VersionSet::new();
    put(&mut s, &Clock::new(), A, "base");
    let ctx = read(&s);
    // A write the readers did not see.
    put(&mut s, &Clock::new(), B, "unseen");
    // All through one replica, coordinated by assorted nodes.
    let mut one = s.clone();
    for w in 0..N {
        put(&mut one, &ctx, 10 + (w % 2) as Actor, &format!("w{w}"));
    }
    assert_eq!(one.siblings().len(), N + 1);
    assert!(one.live_values().any(|v| v == b"unseen"));
    assert!(!one.live_values().any(|v| v == b"base"));
    // Each through its own replica copy and coordinator, then merged.
    let mut all = s.clone();
    for w in 0..N {
        let mut r = s.clone();
        put(&mut r, &ctx, 10 + w as Actor, &format!("w{w}"));
        all.merge(&r);
    }
    assert_eq!(all.siblings().len(), N + 1);
    assert!(all.live_values().any(|v| v == b"unseen"));
    assert!(!all.live_values().any(|v| v == b"base"));
}

#[test]
fn a_delete_removes_what_it_saw_and_a_concurrent_put_survives() {
    let mut ra = VersionSet::new();
    put(&mut ra, &Clock::new(), A, "a");
    let mut rb = ra.clone();
    let ctx = read(&ra);
    // Client X deletes what it read, through A; client Y concurrently puts through B.
    let tomb = ra.update(&ctx, A, None).expect("delete");
    let b = put(&mut rb, &ctx, B, "b");
    ra.merge(&rb);
    assert_eq!(live(&ra), ["b"]);
    assert!(!ra.all_tombstones());
    let dots: Vec<Dot> = ra.siblings().iter().map(|s| s.dot).collect();
    assert_eq!(dots, [tomb, b]);
    // A delete that saw everything leaves only a tombstone.
    let ctx = read(&ra);
    ra.update(&ctx, B, None).expect("delete");
    assert!(ra.all_tombstones());
    assert!(!ra.is_empty());
    assert_eq!(ra.siblings().len(), 1);
    assert_eq!(ra.encoded_value_len(), 0);
}

#[test]
fn shopping_cart_concurrent_adds_are_unioned_by_the_client() {
    fn set(items: &str) -> std::collections::BTreeSet<String> {
        items.split(',').filter(|i| !i.is_empty()).map(str::to_owned).collect()
    }
    fn join(items: &std::collections::BTreeSet<String>) -> String {
        items.iter().cloned().collect::<Vec<_>>().join(",")
    }
    let mut ra = VersionSet::new();
    put(&mut ra, &Clock::new(), A, "milk");
    let mut rb = ra.clone();
    let ctx = read(&ra);
    // Two shoppers read the same cart and each add an item.
    put(&mut ra, &ctx, A, "eggs,milk");
    put(&mut rb, &ctx, B, "bread,milk");
    let (old_a, old_b) = (ra.clone(), rb.clone());
    ra.merge(&rb);
    assert_eq!(live(&ra), ["eggs,milk", "bread,milk"]);
    // The next client unions the siblings and writes back with the merged context.
    let ctx = read(&ra);
    let union = live(&ra).iter().flat_map(|v| set(v)).collect();
    put(&mut ra, &ctx, B, &join(&union));
    assert_eq!(live(&ra), ["bread,eggs,milk"]);
    // Stale replicas catch up without reviving the old carts.
    for old in [old_a, old_b] {
        assert_eq!(merged(&old, &ra), ra);
        assert_eq!(merged(&ra, &old), ra);
    }
}

#[test]
fn update_past_max_siblings_fails_and_changes_nothing() {
    let mut s = VersionSet::new();
    for i in 0..MAX_SIBLINGS {
        put(&mut s, &Clock::new(), (i % 3) as Actor, &format!("v{i}"));
    }
    assert_eq!(s.siblings().len(), MAX_SIBLINGS);
    let before = s.clone();
    let too_many = Err(VersionError::TooManySiblings { siblings: MAX_SIBLINGS + 1, max: MAX_SIBLINGS });
    assert_eq!(s.update(&Clock::new(), A, Some(b"one more".to_vec())), too_many);
    assert_eq!(s.update(&Clock::new(), 99, None), too_many);
    assert_eq!(s, before);
    // A write that saw one of them replaces it, so it fits.
    let first = Clock::decode(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]).expect("context {0: 1}");
    put(&mut s, &first, 0, "replaces v0");
    assert_eq!(s.siblings().len(), MAX_SIBLINGS);
    // A write that saw them all collapses them.
    let ctx = read(&s);
    put(&mut s, &ctx, A, "resolved");
    assert_eq!(live(&s), ["resolved"]);
    assert!(s.check_limits().is_ok());
}

/// `(A,1)` written, then deleted as `(A,2)`: clock `{A:2}`, one tombstone.
fn written_then_deleted(a: Actor) -> VersionSet {
    let mut s = VersionSet::new();
    s.update(&Clock::new(), a, Some(b"v1".to_vec())).unwrap();
    let ctx = s.clock().clone();
    s.update(&ctx, a, None).unwrap();
    s
}

/// Why a node of a cluster keeps its tombstones (`KEEP_TOMBSTONES`, found
/// by a review): a replica's tombstone holds its dots for the key. Kept, a
/// later write through that replica (blind, or with a context read before
/// the delete) takes a new dot, which another replica still holding the
/// tombstone stores, and a quorum read of the two returns it. Had the
/// replica dropped the tombstone, the same write would reuse a dot the other
/// holds: that replica would acknowledge it without storing it (it has that
/// dot), and the read would return the tombstone alone, losing the write.
#[test]
fn a_write_after_a_delete_takes_a_dot_the_other_replicas_have_not_seen() {
    let a_id = ACTORS[0];
    let b = written_then_deleted(a_id);
    let before_delete = {
        let mut s = VersionSet::new();
        s.update(&Clock::new(), a_id, Some(b"v1".to_vec())).unwrap();
        s.clock().clone()
    };
    for (what, ctx) in [("blind", Clock::new()), ("with a context from before the delete", before_delete)] {
        let mut kept = written_then_deleted(a_id);
        let dot = kept.update(&ctx, a_id, Some(b"v2".to_vec())).unwrap();
        assert_eq!(dot, Dot { actor: a_id, counter: 3 }, "{what}");
        let stored = gyre::core::coord::apply_replica_put(Some(b.clone()), &kept).unwrap();
        let stored = stored.unwrap_or_else(|| panic!("{what}: the other replica took it for a write it has"));
        let mut read = kept.clone();
        read.merge(&stored);
        assert_eq!(read.live_values().collect::<Vec<_>>(), vec![&b"v2"[..]], "{what}");

        // The hazard the kept tombstone prevents.
        let mut forgot = VersionSet::new();
        let reused = forgot.update(&ctx, a_id, Some(b"v2".to_vec())).unwrap();
        assert!(reused.counter <= 2, "{what}: {reused:?} is one of the delete's dots or under it");
        assert_eq!(gyre::core::coord::apply_replica_put(Some(b.clone()), &forgot).unwrap(), None, "{what}");
        let mut read = forgot;
        read.merge(&b);
        assert_eq!(read.live_values().count(), 0, "{what}: the write is lost");

        // What the store does instead: a dot above every sequence number
        // the shard has issued (here 2: the write and the delete), so
        // above every dot of the key it forgot.
        let mut forgot = VersionSet::new();
        let fresh = forgot.update_after(&ctx, a_id, Some(b"v2".to_vec()), 2).unwrap();
        assert_eq!(fresh, Dot { actor: a_id, counter: 3 }, "{what}");
        let stored = gyre::core::coord::apply_replica_put(Some(b.clone()), &forgot).unwrap();
        let stored = stored.unwrap_or_else(|| panic!("{what}: the other replica took it for a write it has"));
        let mut read = forgot.clone();
        read.merge(&stored);
        assert_eq!(read.live_values().collect::<Vec<_>>(), vec![&b"v2"[..]], "{what}");
    }
}

/// A forged context wide enough to push real nodes' entries out of the
/// clock's bound (found by a review): node B's entry was dropped at A,
/// then at B itself when it merged A's set, and B's next write reissued its
/// first dot, which replica C (which had seen it) took for a write it had:
/// an acknowledged write lost. Dots drawn above the shard's sequence
/// numbers (`update_after`, as the store does) are never reissued, so C
/// keeps the write. The forged actors cost false siblings at most.
#[test]
fn a_forged_wide_context_cannot_make_a_node_reissue_a_dot() {
    let (a, b) = (1 as Actor, 2 as Actor);
    // Each node's shard numbers its records; a dot is drawn above them.
    let (mut seq_a, mut seq_b) = (0u64, 0u64);
    let mut put_at = |s: &mut VersionSet, ctx: &Clock, actor: Actor, value: &str| {
        let seq = if actor == a { &mut seq_a } else { &mut seq_b };
        let dot = s.update_after(ctx, actor, Some(value.as_bytes().to_vec()), *seq).unwrap();
        *seq = dot.counter;
        dot
    };
    let mut rb = VersionSet::new();
    let first = put_at(&mut rb, &Clock::new(), b, "v1");
    let (mut ra, mut rc) = (rb.clone(), rb.clone());
    let stale = read(&ra);
    put_at(&mut ra, &stale, a, "v2");
    rb.merge(&ra);
    rc.merge(&ra);
    // {B:1} and 63 made-up actors with large counters.
    let mut forged = VersionSet::<Vec<u8>>::new();
    forged.update_after(&Clock::new(), b, Some(vec![]), 0).unwrap();
    for i in 0..63 {
        forged.update_after(&Clock::new(), 1000 + i, Some(vec![]), 999_999).unwrap();
    }
    put_at(&mut ra, forged.clock(), a, "v3");
    assert_eq!(ra.clock().get(b), 0, "B's entry dropped at A");
    rb.merge(&ra);
    assert_eq!(rb.clock().get(b), 0, "B's own entry dropped at B");
    let new = put_at(&mut rb, &Clock::new(), b, "new");
    assert_ne!(new, first, "B reissued a dot");
    rc.merge(&rb);
    assert!(live(&rc).contains(&"new".to_string()), "C dropped the acknowledged write: {:?}", live(&rc));
}
