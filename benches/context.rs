//! What binding a context to its key costs a lone node's request: the
//! reply's context built from the stored clock's encoding, and a write's
//! context decoded and checked against its key. Each beside what the node
//! did before contexts were bound (the stored encoding copied as it is,
//! and a format 1 context decoded), in the same run. And what a cluster
//! secret adds to both: the reply's context signed (format 4), and a
//! write's MAC checked. And what the secret adds to each frame of a member
//! connection: sealing a replica write of a 100-byte value and its
//! acknowledgement, and opening them.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gyre::auth::ClusterKeys;
use gyre::core::version::{bind_encoded_clock, decode_context, encode_context, Clock, VersionSet};

/// A YCSB-style key, as gyre-bench sends them.
const KEY: &[u8] = b"user000000012345";

fn bench(c: &mut Criterion) {
    // A key written once through a lone node: one actor, a counter in the
    // millions (counters are shard sequence numbers).
    let mut set = VersionSet::new();
    set.update_after(&Clock::new(), 0x1234_5678_9abc_def0, Some(b"v".to_vec()), 3_000_000).unwrap();
    let stored = set.clock().to_bytes();
    let bound = encode_context(set.clock(), KEY, None);
    let mut out = Vec::with_capacity(64);
    let mut g = c.benchmark_group("context");
    g.bench_function("reply/stored_copied", |b| {
        b.iter(|| {
            out.clear();
            out.extend_from_slice(black_box(&stored));
            out.len()
        })
    });
    g.bench_function("reply/bound", |b| {
        b.iter(|| {
            out.clear();
            bind_encoded_clock(&mut out, black_box(&stored), black_box(KEY), None);
            out.len()
        })
    });
    g.bench_function("write/decode_unbound", |b| b.iter(|| decode_context(black_box(&stored)).unwrap().clock.len()));
    g.bench_function("write/decode_bound_and_check", |b| {
        b.iter(|| {
            let ctx = decode_context(black_box(&bound)).unwrap();
            ctx.check_key(black_box(KEY)).unwrap();
            ctx.clock.len()
        })
    });
    let keys = ClusterKeys::from_secret(b"a benchmark's cluster secret");
    let mut signed = bound.clone();
    keys.sign(&mut signed, KEY);
    g.bench_function("reply/bound_signed", |b| {
        b.iter(|| {
            out.clear();
            bind_encoded_clock(&mut out, black_box(&stored), black_box(KEY), None);
            keys.sign(&mut out, black_box(KEY));
            out.len()
        })
    });
    g.bench_function("write/decode_signed_and_check", |b| {
        b.iter(|| {
            let ctx = decode_context(black_box(&signed)).unwrap();
            ctx.check_key(black_box(KEY)).unwrap();
            keys.check(black_box(KEY), &signed, &ctx).unwrap();
            ctx.clock.len()
        })
    });
    g.finish();
    seal(c, &set);
}

fn seal(c: &mut Criterion, set: &VersionSet) {
    use gyre::auth::Exchange;
    use gyre::wire::{Request, Response, ANY_SHARD};
    let keys = ClusterKeys::from_secret(b"a benchmark's cluster secret");
    let ex = Exchange { challenge: &[1; 16], nonce: &[2; 16], dialer: b"n1", responder: b"n2" };
    let (meta, _) = set.encode();
    let mut put = Vec::new();
    Request::ReplicaPut { key: KEY, meta: &meta, value: &[7u8; 100] }.encode(&mut put, 1, ANY_SHARD, 1000);
    let mut ack = Vec::new();
    Response::ReplicaPut.encode(&mut ack, 1, 0);
    let mut g = c.benchmark_group("seal");
    for (name, frame) in [("replica_put", &put), ("ack", &ack)] {
        // Sealing: one sealer, its count moving on each iteration as a
        // sequence's would. Opening: a fresh opener each iteration (set up
        // untimed), which opens its first frame.
        let (mut sealer, _) = keys.session(&ex).dialer();
        let mut out = Vec::with_capacity(frame.len() + 16);
        g.bench_function(format!("{name}/{}_bytes/seal", frame.len()), |b| {
            b.iter(|| {
                out.clear();
                out.extend_from_slice(black_box(frame));
                sealer.seal(&mut out, 0);
                out.len()
            })
        });
        let mut sealed = frame.clone();
        keys.session(&ex).dialer().0.seal(&mut sealed, 0);
        g.bench_function(format!("{name}/{}_bytes/open", frame.len()), |b| {
            b.iter_batched_ref(
                || (keys.session(&ex).responder().1, sealed.clone()),
                |(opener, f)| opener.open(black_box(f)).unwrap(),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
