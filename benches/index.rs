//! Index micro-benchmarks: insert, lookup hit and miss on a shard index.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use gyre::core::partition::key_hash;
use gyre::storage::index::{Loc, ShardIndex};

fn keys(n: u32) -> Vec<(u64, Vec<u8>)> {
    (0..n).map(|i| format!("key{i:012}").into_bytes()).map(|k| (key_hash(&k), k)).collect()
}

fn bench(c: &mut Criterion) {
    let ks = keys(1_000_000);
    let loc = |i: usize| Loc { seg: 1, off: i as u32, len: 150, tombstone: false };
    let mut full = ShardIndex::new(1024);
    for (i, (h, k)) in ks.iter().enumerate() {
        full.insert(*h, k, loc(i));
    }
    let mut g = c.benchmark_group("index");
    g.bench_function("insert_100k_fresh", |b| {
        b.iter_batched(
            || ShardIndex::new(1024),
            |mut idx| {
                for (i, (h, k)) in ks[..100_000].iter().enumerate() {
                    idx.insert(*h, k, loc(i));
                }
                idx
            },
            BatchSize::LargeInput,
        )
    });
    let mut i = 0usize;
    g.bench_function("get_hit_1m", |b| {
        b.iter(|| {
            i = (i + 7919) % ks.len();
            let (h, k) = &ks[i];
            black_box(full.get(*h, k))
        })
    });
    // A batch of lookups as a busy shard's batch of connections makes
    // them: one after another, and with every lookup's slots prefetched
    // first (the first stage of `Engine::prefetch`; the index alone has no
    // cache entry or record to fetch). Per batch of 16.
    const BATCH: usize = 16;
    g.bench_function("get_hit_1m_batch16", |b| {
        b.iter(|| {
            let at = i;
            i = (i + BATCH * 7919) % ks.len();
            for j in 0..BATCH {
                let (h, k) = &ks[(at + j * 7919) % ks.len()];
                black_box(full.get(*h, k));
            }
        })
    });
    g.bench_function("get_hit_1m_batch16_prefetched", |b| {
        b.iter(|| {
            let at = i;
            i = (i + BATCH * 7919) % ks.len();
            for j in 0..BATCH {
                full.prefetch(ks[(at + j * 7919) % ks.len()].0);
            }
            for j in 0..BATCH {
                let (h, k) = &ks[(at + j * 7919) % ks.len()];
                black_box(full.get(*h, k));
            }
        })
    });
    let miss = keys(1000).into_iter().map(|(_, mut k)| {
        k.push(b'x');
        (key_hash(&k), k)
    });
    let miss: Vec<_> = miss.collect();
    g.bench_function("get_miss_1m", |b| {
        b.iter(|| {
            i = (i + 1) % miss.len();
            let (h, k) = &miss[i];
            black_box(full.get(*h, k))
        })
    });
    g.finish();
    println!("index bytes per key at 1M keys: {:.1}", full.memory_bytes() as f64 / ks.len() as f64);
}

criterion_group!(benches, bench);
criterion_main!(benches);
