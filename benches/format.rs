//! Record encode/decode micro-benchmarks.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use gyre::storage::format::{decode_record, encode_record, Kind, Seed};

/// A format 3 directory's seed (any non-zero one costs the same).
const SEED: Seed = Seed::format_3(0x0123_4567_89ab_cdef);

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    for size in [100usize, 4096] {
        let value = vec![7u8; size];
        let mut buf = Vec::with_capacity(8192);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("encode/{size}"), |b| {
            b.iter(|| {
                buf.clear();
                encode_record(
                    &mut buf,
                    SEED,
                    1,
                    2,
                    Kind::Value,
                    black_box(b"key000000001234"),
                    b"ctx",
                    black_box(&value),
                )
            })
        });
        buf.clear();
        encode_record(&mut buf, SEED, 1, 2, Kind::Value, b"key000000001234", b"ctx", &value);
        g.bench_function(format!("decode_verify/{size}"), |b| {
            b.iter(|| decode_record(black_box(&buf), SEED).unwrap().seq)
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
