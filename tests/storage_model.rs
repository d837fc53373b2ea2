//! Model-based tests of the storage engine on the in-memory backend: random
//! put/delete/get/restart/compaction/crash sequences checked against a
//! `BTreeMap`, with tiny segments so that sealing, hint files and compaction
//! happen constantly. Every run prints its seed on failure; failing seeds
//! are pinned below as named tests.

mod common;

use std::collections::BTreeMap;

use common::SeedGuard;
use futures_lite::future::block_on;
use gyre::storage::backend::mem::MemBackend;
use gyre::storage::{Engine, EngineConfig, FsyncPolicy, StorageError};

type Model = BTreeMap<Vec<u8>, Option<(Vec<u8>, Vec<u8>)>>;

fn tiny_config(fsync: FsyncPolicy) -> EngineConfig {
    EngineConfig {
        partitions: 16,
        segment_size: 20 * 1024,
        max_value_len: 600,
        fsync,
        cache_bytes: 4096,
        flush_threshold: 2048,
        compaction_threshold: 0.3,
        tombstone_grace_ms: 50,
        // Writes never wait for compaction here: the model drives no
        // compaction loop (`Engine::handle_compaction_check`).
        write_stall_backlog: 0.0,
        // Four segments: what the small-disk runs keep free
        // (`run_model_on`); without a capacity the disk never runs low.
        disk_reserve_bytes: Some(4 * 20 * 1024),
        preallocate: true,
    }
}

/// Whether a write was refused because the disk is low on space (under
/// the reserve: the write was not taken). A disk that really filled
/// is another error, and fails the run: the reserve is there to keep
/// it from happening.
fn refused_for_space(result: &Result<u64, StorageError>) -> bool {
    matches!(result, Err(StorageError::DiskFull(why)) if why.contains("reserve kept for compaction"))
}

/// Says, if the run panics, which seed failed and the call that replays
/// it as a named test.
fn seed_guard(seed: u64, call: String) -> SeedGuard {
    SeedGuard { replay: format!("seed {seed} failed; pin it as a named test that calls `{call}`") }
}

async fn open(backend: &MemBackend, config: &EngineConfig) -> Engine<MemBackend> {
    let (engine, report) = Engine::open(backend.clone(), config.clone()).await.expect("open");
    assert!(report.corruptions.is_empty(), "unexpected corruption: {report:?}");
    assert!(report.hint_errors.is_empty(), "unexpected hint errors: {report:?}");
    engine
}

/// The engine's view of a key: `None` absent, `Some(None)` tombstone.
async fn read(engine: &Engine<MemBackend>, key: &[u8]) -> Option<Option<(Vec<u8>, Vec<u8>)>> {
    let rec = engine.get(key).await.expect("get")?;
    Some(if rec.is_tombstone() { None } else { Some((rec.meta().to_vec(), rec.value().to_vec())) })
}

async fn check_all(engine: &Engine<MemBackend>, model: &Model, seed: u64, step: usize) {
    for (k, v) in model {
        let got = read(engine, k).await;
        // A tombstone may have been dropped by compaction: absent == deleted.
        let got = got.unwrap_or(None);
        assert_eq!(&got, v, "seed {seed} step {step}: key {:?}", String::from_utf8_lossy(k));
    }
    let live_in_model = model.values().filter(|v| v.is_some()).count();
    let live_in_engine = (0..16).flat_map(|p| engine.partition_keys(p)).filter(|(_, tomb)| !tomb).count();
    assert_eq!(live_in_engine, live_in_model, "seed {seed} step {step}: live key count");
}

fn run_model(seed: u64, fsync: FsyncPolicy, steps: usize) {
    run_model_on(seed, fsync, steps, None);
}

/// [`run_model`] on a disk of `capacity` bytes if given: writes refused
/// for space leave the model as it was. Returns how many were refused,
/// and how many writes were taken after the first refusal.
fn run_model_on(seed: u64, fsync: FsyncPolicy, steps: usize, capacity: Option<u64>) -> (u64, u64) {
    let _guard = seed_guard(seed, format!("run_model_on({seed}, FsyncPolicy::{fsync:?}, {steps}, {capacity:?})"));
    let mut rng = fastrand::Rng::with_seed(seed);
    let config = tiny_config(fsync);
    let backend = MemBackend::new();
    backend.set_capacity(capacity);
    let (mut refused, mut taken_after) = (0, 0);
    block_on(async {
        let mut engine = open(&backend, &config).await;
        let mut model: Model = BTreeMap::new();
        let mut now = 0u64;
        for step in 0..steps {
            now += rng.u64(0..5);
            let key = format!("key-{}", rng.u32(0..120)).into_bytes();
            match rng.u32(0..100) {
                0..=49 => {
                    let value: Vec<u8> = (0..rng.usize(0..600)).map(|_| rng.u8(..)).collect();
                    let meta = format!("m{step}").into_bytes();
                    let put = engine.put(&key, &meta, &value, now).await;
                    if refused_for_space(&put) {
                        refused += 1;
                        continue;
                    }
                    put.unwrap_or_else(|e| panic!("seed {seed} step {step}: put: {e}"));
                    taken_after += (refused > 0) as u64;
                    model.insert(key, Some((meta, value)));
                }
                50..=64 => {
                    let meta = format!("d{step}").into_bytes();
                    let delete = engine.delete(&key, &meta, now).await;
                    if refused_for_space(&delete) {
                        refused += 1;
                        continue;
                    }
                    delete.unwrap_or_else(|e| panic!("seed {seed} step {step}: delete: {e}"));
                    model.insert(key, None);
                }
                65..=89 => {
                    let want = model.get(&key).cloned().flatten();
                    assert_eq!(read(&engine, &key).await.unwrap_or(None), want, "seed {seed} step {step}");
                }
                90..=94 => {
                    engine.compact(now).await.expect("compact");
                }
                95..=97 => {
                    engine.close().await.expect("close");
                    drop(engine);
                    engine = open(&backend, &config).await;
                    check_all(&engine, &model, seed, step).await;
                }
                _ => {
                    // Power cut. Under `always` every acknowledged write
                    // survives; the others lose what was not synced, so sync
                    // first to keep the model exact.
                    if fsync != FsyncPolicy::Always {
                        engine.sync().await.expect("sync");
                    }
                    drop(engine);
                    backend.crash(seed ^ step as u64, true);
                    engine = open(&backend, &config).await;
                    check_all(&engine, &model, seed, step).await;
                }
            }
        }
        engine.close().await.expect("close");
        drop(engine);
        let engine = open(&backend, &config).await;
        check_all(&engine, &model, seed, steps).await;
    });
    (refused, taken_after)
}

/// The model on a disk of seven segments, four kept in reserve: writes are
/// refused as it runs low, never fail for a disk that really filled, and
/// are taken again once compaction has made room; nothing refused shows
/// and nothing taken is lost, across restarts and power cuts.
#[test]
fn model_on_a_small_disk() {
    for seed in 200..206 {
        for fsync in [FsyncPolicy::Always, FsyncPolicy::Never] {
            let (refused, taken_after) = run_model_on(seed, fsync, 3000, Some(7 * 20 * 1024));
            println!("seed {seed} {fsync}: {refused} writes refused, {taken_after} taken after the first");
            assert!(refused > 0 && taken_after > 0, "seed {seed} {fsync}: {refused} refused, {taken_after} after");
        }
    }
}

#[test]
fn model_always_many_seeds() {
    for seed in 0..12 {
        run_model(seed, FsyncPolicy::Always, 1500);
    }
}

#[test]
fn model_interval_and_never() {
    for seed in 100..106 {
        run_model(seed, FsyncPolicy::Interval(5), 1500);
        run_model(seed + 1000, FsyncPolicy::Never, 1500);
    }
}

/// The workload of the model tests really exercises the hard paths.
#[test]
fn model_runs_seal_compact_and_drop_tombstones() {
    let config = tiny_config(FsyncPolicy::Always);
    let backend = MemBackend::new();
    let stats = block_on(async {
        let engine = open(&backend, &config).await;
        let mut rng = fastrand::Rng::with_seed(9);
        for step in 0..3000u64 {
            let key = format!("key-{}", rng.u32(0..50));
            if rng.u32(0..4) == 0 {
                engine.delete(key.as_bytes(), b"", step).await.unwrap();
            } else {
                engine.put(key.as_bytes(), b"", &[1u8; 300], step).await.unwrap();
            }
            if step % 200 == 0 {
                engine.compact(step + 1_000).await.unwrap();
            }
        }
        engine.stats()
    });
    assert!(stats.segments_sealed > 20, "{stats:?}");
    assert!(stats.segments_compacted > 10, "{stats:?}");
    assert!(stats.records_moved > 0, "{stats:?}");
    assert!(stats.tombstones_dropped > 0, "{stats:?}");
    assert!(stats.disk_total_bytes < 10 * 20 * 1024, "compaction keeps the log bounded: {stats:?}");
}

/// After a power cut with torn writes, the recovered state is the state
/// after some prefix of the writes that includes everything synced.
fn run_torn_prefix(seed: u64) {
    let _guard = seed_guard(seed, format!("run_torn_prefix({seed})"));
    let mut rng = fastrand::Rng::with_seed(seed);
    let config = tiny_config(FsyncPolicy::Never);
    let backend = MemBackend::new();
    block_on(async {
        let engine = open(&backend, &config).await;
        let mut model: Model = BTreeMap::new();
        let mut states = vec![model.clone()];
        let mut synced_at = 0usize;
        for step in 0..600u64 {
            let key = format!("k{}", rng.u32(0..40)).into_bytes();
            if rng.u32(0..5) == 0 {
                engine.delete(&key, b"", step).await.unwrap();
                model.insert(key, None);
            } else {
                let value = vec![rng.u8(..); rng.usize(1..400)];
                engine.put(&key, b"", &value, step).await.unwrap();
                model.insert(key, Some((Vec::new(), value)));
            }
            states.push(model.clone());
            match rng.u32(0..40) {
                0 => {
                    engine.sync().await.unwrap();
                    synced_at = states.len() - 1;
                }
                1..=4 => engine.flush().await.unwrap(),
                _ => {}
            }
        }
        drop(engine);
        backend.crash(seed, true);
        let (engine, report) = Engine::open(backend.clone(), config.clone()).await.unwrap();
        assert!(report.corruptions.is_empty(), "seed {seed}: torn tail reported as corruption: {report:?}");
        let mut recovered: Model = BTreeMap::new();
        for k in states.last().unwrap().keys() {
            if let Some(v) = read(&engine, k).await {
                recovered.insert(k.clone(), v);
            }
        }
        let matches = states[synced_at..].iter().position(|s| *s == recovered);
        assert!(
            matches.is_some(),
            "seed {seed}: recovered state is not a prefix state at or after the last sync (step {synced_at}, torn {} bytes)",
            report.torn_tail_bytes
        );
    });
}

#[test]
fn torn_writes_recover_a_prefix_including_everything_synced() {
    for seed in 0..40 {
        run_torn_prefix(seed);
    }
}

/// Many writers on one shard share synced writes (group commit: under
/// `always` a group is one O_DSYNC write), and every acknowledged write
/// is durable across a power cut.
#[test]
fn group_commit_batches_concurrent_writers() {
    let config = tiny_config(FsyncPolicy::Always);
    let backend = MemBackend::new();
    block_on(async {
        let engine = open(&backend, &config).await;
        let writers = (0..32).map(|w| {
            let engine = engine.clone();
            async move {
                for i in 0..20 {
                    let key = format!("w{w}-{i}");
                    engine.put(key.as_bytes(), b"", key.as_bytes(), 0).await.unwrap();
                }
            }
        });
        futures_util::future::join_all(writers).await;
        let stats = engine.stats();
        assert_eq!(stats.puts, 640);
        let syncs = stats.synced_writes + stats.fdatasyncs;
        assert!(stats.synced_writes > 0, "under always a group commit is a synced write: {stats:?}");
        assert!(syncs < 640 / 4, "no batching: {syncs} syncs for 640 writes");
        drop(engine);
        backend.crash(1, true);
        let engine = open(&backend, &config).await;
        for w in 0..32 {
            for i in 0..20 {
                let key = format!("w{w}-{i}");
                let rec = engine.get(key.as_bytes()).await.unwrap().expect("acknowledged write lost");
                assert_eq!(rec.value(), key.as_bytes());
            }
        }
    });
}

#[test]
fn io_error_fails_the_shard_and_nothing_more_is_acknowledged() {
    let config = tiny_config(FsyncPolicy::Always);
    let backend = MemBackend::new();
    block_on(async {
        let engine = open(&backend, &config).await;
        engine.put(b"a", b"", b"1", 0).await.unwrap();
        backend.fail_syncs(true);
        let err = engine.put(b"b", b"", b"2", 0).await.unwrap_err();
        assert!(matches!(err, StorageError::Io { .. }), "{err}");
        backend.fail_syncs(false);
        let err = engine.put(b"c", b"", b"3", 0).await.unwrap_err();
        assert!(matches!(err, StorageError::Failed(_)), "{err}");
        assert!(engine.failed().is_some());
        // Reads still work.
        assert_eq!(engine.get(b"a").await.unwrap().unwrap().value(), b"1");
        drop(engine);
        backend.crash(0, false);
        let engine = open(&backend, &config).await;
        assert_eq!(engine.get(b"a").await.unwrap().unwrap().value(), b"1");
        assert!(engine.get(b"c").await.unwrap().is_none());
    });
}

#[test]
fn write_errors_fail_the_shard_too() {
    let config = tiny_config(FsyncPolicy::Always);
    let backend = MemBackend::new();
    block_on(async {
        let engine = open(&backend, &config).await;
        backend.fail_writes(true);
        assert!(matches!(engine.put(b"x", b"", b"1", 0).await, Err(StorageError::Io { .. })));
        backend.fail_writes(false);
        assert!(matches!(engine.delete(b"x", b"", 0).await, Err(StorageError::Failed(_))));
    });
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let config = tiny_config(FsyncPolicy::Always);
    let backend = MemBackend::new();
    block_on(async {
        let engine = open(&backend, &config).await;
        assert!(matches!(engine.put(b"", b"", b"v", 0).await, Err(StorageError::KeyLength(0))));
        let long = vec![b'k'; gyre::limits::MAX_KEY_LEN + 1];
        assert!(matches!(engine.put(&long, b"", b"v", 0).await, Err(StorageError::KeyLength(_))));
        assert!(matches!(engine.get(&long).await, Err(StorageError::KeyLength(_))));
        let big = vec![0u8; 601];
        let err = engine.put(b"k", b"", &big, 0).await.unwrap_err();
        assert!(matches!(err, StorageError::ValueTooLarge { len: 601, max: 600 }), "{err}");
        let meta = vec![0u8; gyre::limits::MAX_META_LEN + 1];
        assert!(matches!(engine.put(b"k", &meta, b"", 0).await, Err(StorageError::MetaTooLarge(_))));
        // Nothing was written and the shard still works.
        assert!(engine.is_empty());
        engine.put(b"k", b"", b"v", 0).await.unwrap();
        assert_eq!(engine.get(b"k").await.unwrap().unwrap().value(), b"v");
    });
}

/// Compaction removes a segment with nothing live left in it only once what
/// superseded its records is synced. Here the newer record of a key is a
/// write still waiting for its group commit (the disk holds writes back)
/// when compaction runs, and the power fails: the key must still have a
/// value (the old one). Compaction used to remove such a segment at once.
#[test]
fn compaction_removes_a_dead_segment_only_after_syncing_what_superseded_it() {
    use futures_lite::future::poll_once;
    let config = tiny_config(FsyncPolicy::Always);
    let backend = MemBackend::new();
    block_on(async {
        let engine = open(&backend, &config).await;
        // "k" first, then enough fillers to seal its segment; rewriting
        // the fillers leaves "k" the only live record there.
        engine.put(b"k", b"old", &[1; 300], 0).await.unwrap();
        for round in 0..2u8 {
            for i in 0..80 {
                engine.put(format!("f{i}").as_bytes(), b"", &[round; 300], 0).await.unwrap();
            }
        }
        assert!(engine.stats().segments_sealed >= 2, "{:?}", engine.stats());
        backend.hold_writes(true);
        let mut put = Box::pin(engine.put(b"k", b"new", &[2; 300], 1));
        assert!(poll_once(&mut put).await.is_none(), "the new write waits for the disk");
        let mut compact = Box::pin(engine.compact(1_000));
        for _ in 0..1_000 {
            if poll_once(&mut compact).await.is_some() {
                break;
            }
        }
        drop(compact);
        drop(put);
        drop(engine);
        backend.hold_writes(false);
        backend.crash(7, false);
        let engine = open(&backend, &config).await;
        let got = read(&engine, b"k").await.flatten().map(|(meta, _)| meta);
        assert!(
            got.as_deref() == Some(&b"old"[..]) || got.as_deref() == Some(&b"new"[..]),
            "the key lost both its records: {got:?}"
        );
    });
}

/// The same, for a write that supersedes a segment's last live record
/// while compaction's sync runs: the segment was checked for live records
/// after the sync, so it went, though the sync did not cover that write,
/// and a crash before the write's own group commit lost the key's old
/// value and its new one (found by a review). The segment's last record
/// is one compaction cannot move: larger than this run's segments.
#[test]
fn a_segment_emptied_during_compactions_sync_waits_for_the_next_pass() {
    use futures_lite::future::poll_once;
    use gyre::storage::Kind;
    let config = |segment_size, max_value_len| EngineConfig {
        segment_size,
        max_value_len,
        cache_bytes: 0,
        tombstone_grace_ms: u64::MAX,
        disk_reserve_bytes: Some(0),
        preallocate: false,
        ..tiny_config(FsyncPolicy::Always)
    };
    let backend = MemBackend::new();
    // 1 MiB segments: "big" and 60 fillers in the first, the fillers
    // written again into the second: the first is mostly garbage.
    block_on(async {
        let engine = open(&backend, &config(1024 * 1024, 512 * 1024)).await;
        engine.put(b"big", b"old", &[7; 300 * 1024], 0).await.unwrap();
        for round in 0..2u8 {
            for i in 0..60 {
                engine.put(format!("f{i}").as_bytes(), b"", &[round; 10 * 1024], 0).await.unwrap();
            }
            if round == 0 {
                // Does not fit what is left of the first segment: seals it.
                engine.put(b"pad", b"", &[9; 200 * 1024], 0).await.unwrap();
            }
        }
        engine.close().await.unwrap();
    });
    // 256 KiB segments now: "big" fits none, so compaction leaves it.
    let small = config(256 * 1024, 32 * 1024);
    block_on(async {
        let engine = open(&backend, &small).await;
        let old = engine.get(b"big").await.unwrap().expect("big");
        // A write in the buffer, so that the pass's sync has one to wait for.
        let _other = engine.put_if_now(Kind::Value, b"other", b"", b"x", 1, None).unwrap().unwrap();
        backend.hold_writes(true);
        let mut compact = Box::pin(engine.compact(1));
        for _ in 0..1_000 {
            assert!(poll_once(&mut compact).await.is_none(), "the pass waits in its sync");
        }
        // Overwritten meanwhile; not acknowledged: its group commit is next.
        let _new = engine.put_if_now(Kind::Value, b"big", b"new", b"y", 1, Some(old.id())).unwrap().unwrap();
        backend.hold_writes(false);
        let stats = loop {
            if let Some(r) = poll_once(&mut compact).await {
                break r.unwrap();
            }
        };
        assert_eq!((stats.records_moved, stats.segments_removed), (0, 0), "{stats:?}");
    });
    // The power fails before the overwrite's group commit.
    backend.crash(1, false);
    block_on(async {
        let engine = open(&backend, &small).await;
        let got = engine.get(b"big").await.unwrap().map(|r| r.meta().to_vec());
        assert_eq!(got.as_deref(), Some(&b"old"[..]), "the key lost both its records");
        // Overwritten again and synced: the next pass takes the segment.
        let old = engine.get(b"big").await.unwrap().expect("big");
        let pending = engine.put_if_now(Kind::Value, b"big", b"newer", b"z", 1, Some(old.id())).unwrap().unwrap();
        engine.settle(pending).await.unwrap();
        let stats = engine.compact(1).await.unwrap();
        assert_eq!(stats.segments_removed, 1, "{stats:?}");
        let got = engine.get(b"big").await.unwrap().map(|r| r.meta().to_vec());
        assert_eq!(got.as_deref(), Some(&b"newer"[..]));
    });
}

/// A put that could not complete at once, and the keys put before it.
type Waiting<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, StorageError>> + 'a>>;

/// Puts `keys` in order, each polled once, until one has to wait (behind
/// held writes); returns that put and how many keys were put, it included.
async fn put_until_one_waits<'a>(
    engine: &'a Engine<MemBackend>,
    keys: &'a [Vec<u8>],
    value: &'a [u8],
) -> (Waiting<'a>, usize) {
    use futures_lite::future::poll_once;
    for (i, k) in keys.iter().enumerate() {
        let mut put: Waiting<'a> = Box::pin(engine.put(k, b"", value, 0));
        match poll_once(&mut put).await {
            Some(r) => {
                r.expect("put");
            }
            None => return (put, i + 1),
        }
    }
    panic!("no put of {} waited", keys.len());
}

/// The tests that hold writes back: buffered (`never`) 1 MiB segments,
/// 10,000 keys and a 100-byte value.
fn held_writes_setup() -> (EngineConfig, MemBackend, Vec<Vec<u8>>, [u8; 100]) {
    let config = EngineConfig { segment_size: 1024 * 1024, ..tiny_config(FsyncPolicy::Never) };
    let keys = (0..10_000).map(|i| format!("k{i}").into_bytes()).collect();
    (config, MemBackend::new(), keys, [7u8; 100])
}

/// Puts `keys` in order, each of which must complete at once, until the
/// buffer wants a flush (`Engine::flush_wanted`, what wakes the shell's
/// flusher); returns how many keys were put.
async fn put_until_flush_wanted(engine: &Engine<MemBackend>, keys: &[Vec<u8>], value: &[u8]) -> usize {
    use futures_lite::future::poll_once;
    for (i, k) in keys.iter().enumerate() {
        let put = poll_once(Box::pin(engine.put(k, b"", value, 0))).await;
        put.expect("a buffered put below the backlog limit does not wait").expect("put");
        if poll_once(Box::pin(engine.flush_wanted())).await.is_some() {
            return i + 1;
        }
    }
    panic!("{} puts never wanted a flush", keys.len());
}

/// A flush leader writes up to what it needs and stops: what was appended
/// while its write was in flight is the next flush's. (Draining instead kept
/// one leader writing small pieces back to back under steady load.)
#[test]
fn a_flush_leader_stops_at_its_own_target() {
    use futures_lite::future::poll_once;
    let (config, backend, keys, value) = held_writes_setup();
    block_on(async {
        let engine = open(&backend, &config).await;
        backend.hold_writes(true);
        let i = put_until_flush_wanted(&engine, &keys, &value).await;
        // What the shell's flusher does when woken.
        let mut leader = Box::pin(engine.flush());
        assert!(poll_once(&mut leader).await.is_none(), "the flush waits for the disk");
        // Appended behind the leader's write, without waiting.
        for k in &keys[i..i + 10] {
            poll_once(Box::pin(engine.put(k, b"", &value, 0))).await.expect("no wait").expect("put");
        }
        backend.hold_writes(false);
        leader.as_mut().await.expect("leader");
        assert_eq!(engine.stats().flushes, 1, "the leader wrote once, up to its own target");
        engine.flush().await.expect("flush");
        assert_eq!(engine.stats().flushes, 2, "the later appends took one more write");
        for k in &keys[..i + 10] {
            assert!(engine.get(k).await.expect("get").is_some());
        }
    });
}

/// Group commit under `always`, whose segment writes are synced as they
/// are made (`open_synced`): the leader's write covers the writer that
/// led it, and every writer that piled up behind it is covered by one
/// more write, with no fdatasync at all.
#[test]
fn the_writers_behind_a_durable_write_are_covered_by_one_more() {
    use futures_lite::future::poll_once;
    let config = tiny_config(FsyncPolicy::Always);
    let backend = MemBackend::new();
    block_on(async {
        let engine = open(&backend, &config).await;
        let before = engine.stats();
        backend.hold_writes(true);
        let keys: Vec<Vec<u8>> = (0..10).map(|i| format!("g{i}").into_bytes()).collect();
        let mut puts: Vec<Waiting<'_>> = Vec::new();
        for k in &keys {
            let mut put: Waiting<'_> = Box::pin(engine.put(k, b"", b"v", 0));
            assert!(poll_once(&mut put).await.is_none(), "a durable put waits");
            puts.push(put);
        }
        backend.hold_writes(false);
        for put in puts {
            put.await.expect("put");
        }
        let after = engine.stats();
        assert_eq!(after.flushes - before.flushes, 2, "the leader's write and one for the writers behind it");
        assert_eq!(after.fdatasyncs, before.fdatasyncs, "synced writes need no fdatasync");
        // And they are durable: a power cut now loses none of them.
        drop(engine);
        backend.crash(1, true);
        let engine = open(&backend, &config).await;
        for k in &keys {
            assert!(engine.get(k).await.expect("get").is_some(), "{k:?} lost");
        }
    });
}

/// A buffered writer does not wait for the flush a full buffer needs: the
/// write that passes the flush threshold wakes the flusher and completes,
/// and writers keep going while that flush is stuck on a slow device (up
/// to FLUSH_BACKLOG_THRESHOLDS thresholds), and only then wait. (The write
/// that passed the threshold used to lead the flush and wait for the disk:
/// 2-3 ms, a p99.9 of 2.7 ms at a 64 KiB threshold, perf/RESULTS.md.)
#[test]
fn buffered_writes_do_not_stall_behind_a_slow_flush() {
    use futures_lite::future::poll_once;
    use gyre::limits::FLUSH_BACKLOG_THRESHOLDS;
    use gyre::storage::format::record_len;
    let (config, backend, keys, value) = held_writes_setup();
    let bytes = |n: usize| keys[..n].iter().map(|k| record_len(k.len(), 0, value.len())).sum::<usize>();
    block_on(async {
        let engine = open(&backend, &config).await;
        backend.hold_writes(true);
        let first = put_until_flush_wanted(&engine, &keys, &value).await;
        assert!(
            bytes(first - 1) < config.flush_threshold && bytes(first) >= config.flush_threshold,
            "a flush was wanted at {} bytes",
            bytes(first)
        );
        let mut flusher = Box::pin(engine.flush());
        assert!(poll_once(&mut flusher).await.is_none(), "the flush waits for the disk");
        let mut wanted = Box::pin(engine.flush_wanted());
        assert!(poll_once(&mut wanted).await.is_none(), "not while a flush runs");
        // The next writers append behind the flush without waiting ...
        let (mut blocked, more) = put_until_one_waits(&engine, &keys[first..], &value).await;
        let i = first + more;
        // ... until the backlog is full. Nothing reached the device, so
        // the buffer holds every record appended: the blocked writer is
        // the first to take it to FLUSH_BACKLOG_THRESHOLDS thresholds.
        let limit = FLUSH_BACKLOG_THRESHOLDS * config.flush_threshold;
        assert!(
            bytes(i - 1) < limit && bytes(i) >= limit,
            "{} of {limit} bytes buffered when a writer waited",
            bytes(i)
        );
        backend.hold_writes(false);
        flusher.as_mut().await.expect("flusher");
        // The end of that flush wakes the flusher again: a threshold's
        // worth piled up behind it.
        assert!(poll_once(&mut wanted).await.is_some(), "the backlog wants the next flush");
        // The blocked writer leads the next flush itself.
        blocked.as_mut().await.expect("blocked writer");
        for k in &keys[..i] {
            assert!(engine.get(k).await.expect("get").is_some());
        }
    });
}

/// Compaction writes its copies out as it moves them: the buffer never
/// holds much more than a flush threshold of them, so client writes are
/// not made to wait behind one long flush of a whole segment's records.
#[test]
fn compaction_flushes_its_copies_as_it_goes() {
    let config = EngineConfig { segment_size: 64 * 1024, flush_threshold: 2048, ..tiny_config(FsyncPolicy::Never) };
    let backend = MemBackend::new();
    block_on(async {
        let engine = open(&backend, &config).await;
        let value = [3u8; 100];
        // Segments full of keys, then every other key overwritten: half of
        // each early segment is garbage, past the compaction threshold,
        // and half is live records to move.
        let keys: Vec<Vec<u8>> = (0..2_000).map(|i| format!("c{i}").into_bytes()).collect();
        for k in &keys {
            engine.put(k, b"", &value, 0).await.expect("put");
        }
        for k in keys.iter().step_by(2) {
            engine.put(k, b"", &value, 0).await.expect("overwrite");
        }
        engine.sync().await.expect("sync");
        let before = engine.stats();
        let done = engine.compact(0).await.expect("compact");
        let after = engine.stats();
        assert!(done.records_moved > 0, "nothing was compacted");
        let moved_bytes = done.records_moved as usize * (record_len_of(&keys[1_500], &value));
        let flushes = after.flushes - before.flushes;
        assert!(
            flushes as usize >= moved_bytes / config.flush_threshold,
            "{} records ({moved_bytes} bytes) moved in {flushes} writes",
            done.records_moved
        );
        for k in &keys {
            assert!(engine.get(k).await.expect("get").is_some());
        }
    });
}

/// A record that compaction moves keeps its place in the record cache (the
/// copy is the same bytes): reading it afterwards is a cache hit, not a read
/// of the copy from disk. Its entry is renamed, so the old location's id no
/// longer finds it, and a write to the key afterwards still supersedes it.
#[test]
fn a_record_moved_by_compaction_stays_cached() {
    let config = EngineConfig { segment_size: 64 * 1024, cache_bytes: 1 << 20, ..tiny_config(FsyncPolicy::Never) };
    let backend = MemBackend::new();
    block_on(async {
        let engine = open(&backend, &config).await;
        let value = [5u8; 100];
        let keys: Vec<Vec<u8>> = (0..2_000).map(|i| format!("m{i}").into_bytes()).collect();
        for k in &keys {
            engine.put(k, b"", &value, 0).await.expect("put");
        }
        for k in keys.iter().step_by(2) {
            engine.put(k, b"", &value, 0).await.expect("overwrite");
        }
        engine.sync().await.expect("sync");
        assert!(engine.compact(0).await.expect("compact").records_moved > 0, "nothing was compacted");
        engine.sync().await.expect("sync");
        let before = engine.stats();
        for k in keys.iter().skip(1).step_by(2) {
            assert_eq!(engine.get(k).await.expect("get").expect("present").value(), &value[..]);
        }
        let after = engine.stats();
        assert_eq!(after.cache_misses, before.cache_misses, "a moved record was read from disk");
        assert_eq!(after.cache_hits - before.cache_hits, 1_000);
        // The moved entries are still superseded by new writes.
        for k in keys.iter().skip(1).step_by(2) {
            engine.put(k, b"", b"new", 0).await.expect("rewrite");
            assert_eq!(engine.get(k).await.expect("get").expect("present").value(), b"new");
        }
    });
}

fn record_len_of(key: &[u8], value: &[u8]) -> usize {
    gyre::storage::format::record_len(key.len(), 0, value.len())
}

// ---------------------------------------------------------------------------
// Interleavings and cancellation.
//
// A node runs many tasks on one engine at once (writers waiting on a group
// commit, the flush ticker, compaction, the spare segment), and any of them
// can be dropped mid-way: a client hangs up, shutdown cancels the ticker.
// The test below drives random operations as hand-polled futures on the
// in-memory backend, whose I/O yields, in random order, drops some of them
// half done, holds writes back at times, and closes or crashes the engine
// in between. Its model of a key is the set of values it may hold: one,
// after an acknowledged write; more after a write that was dropped before
// its answer, which may or may not have happened. Besides the values, it
// checks that every operation finishes once it is polled whenever it has
// been woken, as an executor would: a waiter left unwoken by a dropped
// group-commit leader shows up as a hang.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use gyre::storage::Record;

/// What a key may hold as far as the model knows (`None`: absent or
/// deleted).
type Val = Option<(Vec<u8>, Vec<u8>)>;

/// A hand-polled engine call, and what it returns: the value read
/// (`Some`) for a read, `None` for everything else.
type Call<'a> = Pin<Box<dyn Future<Output = Result<Option<Val>, StorageError>> + 'a>>;

/// What a call in flight does, for the model.
enum Op {
    /// A put (`Some`) or delete (`None`) of `key`.
    Write {
        key: Vec<u8>,
        val: Val,
    },
    Read {
        key: Vec<u8>,
    },
    /// Background work: compaction, flush, sync, tick, spare segment.
    Chore(&'static str),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Read { .. } => "read",
            Op::Chore(what) => what,
        }
    }
}

/// A waker that records that it was woken.
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct InFlight<'a> {
    op: Op,
    call: Call<'a>,
    woken: Arc<Woken>,
    /// Times it was polled.
    polls: u32,
}

/// What chaos runs went through, to show the hard paths were taken.
#[derive(Default, Debug)]
struct ChaosCounts {
    /// Writes acknowledged after waiting at least once.
    waited_writes: u64,
    /// Writes dropped after they had started (been polled).
    dropped_writes: u64,
    /// Background calls dropped after they had started.
    dropped_chores: u64,
    compactions: u64,
    segments_compacted: u64,
    segments_sealed: u64,
    closes: u64,
    crashes: u64,
    /// Calls answered `DiskFull` (runs with a disk that fills).
    disk_full: u64,
    /// Opens with the small segments (runs that change the segment size).
    small_opens: u64,
    /// Segments compaction had to keep, summed at each close or crash.
    segments_kept: u64,
}

/// The chaos model: per key, the values it may hold after a crash
/// (`possible`) and, once a read has seen it or a write of it was
/// acknowledged, the one it holds in memory until the next write of it
/// starts (`seen`).
#[derive(Default)]
struct Chaos {
    possible: BTreeMap<Vec<u8>, Vec<Val>>,
    seen: BTreeMap<Vec<u8>, Val>,
    /// Keys with an operation in flight: at most one each, so the model
    /// stays exact.
    busy: std::collections::BTreeSet<Vec<u8>>,
    counts: ChaosCounts,
    /// The disk fills and empties during the run: `DiskFull` is an answer,
    /// not a failure.
    full_disk: bool,
    /// Largest value a write draws: the open engine's limit.
    max_value: usize,
}

impl Chaos {
    fn may_hold(&self, key: &[u8]) -> Vec<Val> {
        self.possible.get(key).cloned().unwrap_or_else(|| vec![None])
    }

    fn check(&mut self, key: &[u8], got: Val, seed: u64, step: usize, when: &str) {
        if let Some(seen) = self.seen.get(key) {
            assert_eq!(
                &got,
                seen,
                "seed {seed} step {step} ({when}): key {:?} changed without a write",
                String::from_utf8_lossy(key)
            );
        }
        let may = self.may_hold(key);
        assert!(
            may.contains(&got),
            "seed {seed} step {step} ({when}): key {:?} holds {:?}, the model allows {:?}",
            String::from_utf8_lossy(key),
            got.as_ref().map(|(m, v)| (String::from_utf8_lossy(m).into_owned(), v.len())),
            may.iter()
                .map(|v| v.as_ref().map(|(m, v)| (String::from_utf8_lossy(m).into_owned(), v.len())))
                .collect::<Vec<_>>()
        );
        self.seen.insert(key.to_vec(), got);
    }

    /// A write of `key` was acknowledged.
    fn acknowledged(&mut self, key: Vec<u8>, val: Val) {
        self.possible.insert(key.clone(), vec![val.clone()]);
        self.seen.insert(key, val);
    }

    /// A write of `key` was dropped before its answer: it may have happened.
    fn dropped(&mut self, key: Vec<u8>, val: Val) {
        let mut may = self.may_hold(&key);
        if !may.contains(&val) {
            may.push(val);
        }
        self.possible.insert(key, may);
    }

    /// Applies a finished call.
    fn land(&mut self, f: InFlight<'_>, out: Option<Val>, seed: u64, step: usize) {
        match f.op {
            Op::Write { key, val } => {
                self.counts.waited_writes += u64::from(f.polls > 1);
                self.busy.remove(&key);
                self.acknowledged(key, val);
            }
            Op::Read { key } => {
                self.busy.remove(&key);
                self.check(&key, out.expect("a read returns a value"), seed, step, "read");
            }
            Op::Chore(what) => self.counts.compactions += u64::from(what == "compact"),
        }
    }

    /// A call answered `DiskFull`: a write may still land (it waited for
    /// its flush) or not (it was refused at once); a read tells nothing.
    fn refused(&mut self, f: InFlight<'_>) {
        self.counts.disk_full += 1;
        self.release(f.op);
    }

    /// Drops a call half done (or not begun).
    fn cancel(&mut self, f: InFlight<'_>) {
        let started = u64::from(f.polls > 0);
        match &f.op {
            Op::Write { .. } => self.counts.dropped_writes += started,
            Op::Chore(_) => self.counts.dropped_chores += started,
            Op::Read { .. } => {}
        }
        self.release(f.op);
    }

    /// A call ended without its answer: its key is free again, and a write
    /// may or may not have happened.
    fn release(&mut self, op: Op) {
        match op {
            Op::Write { key, val } => {
                self.busy.remove(&key);
                self.dropped(key, val);
            }
            Op::Read { key } => {
                self.busy.remove(&key);
            }
            Op::Chore(_) => {}
        }
    }

    /// Reads every key the model knows from a freshly opened engine: each
    /// holds a value the model allows, and from now on exactly that one.
    async fn recheck(&mut self, engine: &Engine<MemBackend>, seed: u64, step: usize, when: &str) {
        let keys: Vec<Vec<u8>> = self.possible.keys().cloned().collect();
        for k in keys {
            let got = read(engine, &k).await.unwrap_or(None);
            self.check(&k, got.clone(), seed, step, when);
            self.possible.insert(k, vec![got]);
        }
    }
}

fn record_val(rec: Option<Record>) -> Val {
    rec.filter(|r| !r.is_tombstone()).map(|r| (r.meta().to_vec(), r.value().to_vec()))
}

/// Polls flight `i` if it was woken since its last poll, and applies it to
/// the model if it is done; returns whether it was (and left `flights`).
fn advance(model: &mut Chaos, flights: &mut Vec<InFlight<'_>>, i: usize, seed: u64, step: usize) -> bool {
    let f = &mut flights[i];
    if !f.woken.0.swap(false, Ordering::SeqCst) {
        return false;
    }
    let waker = Waker::from(f.woken.clone());
    f.polls += 1;
    let Poll::Ready(out) = f.call.as_mut().poll(&mut Context::from_waker(&waker)) else { return false };
    let f = flights.swap_remove(i);
    match out {
        Ok(out) => model.land(f, out, seed, step),
        Err(StorageError::DiskFull(_)) if model.full_disk => model.refused(f),
        // A chore that needs new space of its own (a spare segment) fails
        // with the disk's error, and the engine goes on.
        Err(StorageError::Io { source, .. })
            if model.full_disk && matches!(f.op, Op::Chore(_)) && source.kind() == std::io::ErrorKind::StorageFull =>
        {
            model.refused(f)
        }
        Err(e) => panic!("seed {seed} step {step}: {} failed: {e}", f.op.name()),
    }
    true
}

/// A background call: its result does not matter to the model.
fn chore<'a, T>(what: &'static str, call: impl Future<Output = Result<T, StorageError>> + 'a) -> (Op, Call<'a>) {
    (Op::Chore(what), Box::pin(async move { call.await.map(|_| None) }))
}

fn start<'a>(
    engine: &'a Engine<MemBackend>,
    rng: &mut fastrand::Rng,
    model: &mut Chaos,
    step: usize,
    now: u64,
) -> Option<InFlight<'a>> {
    let (op, call) = match rng.u32(0..100) {
        kind @ 0..=84 => {
            let key = format!("key-{}", rng.u32(0..60)).into_bytes();
            if !model.busy.insert(key.clone()) {
                return None;
            }
            let k = key.clone();
            if kind >= 60 {
                let call: Call<'a> = Box::pin(async move { engine.get(&k).await.map(|r| Some(record_val(r))) });
                (Op::Read { key }, call)
            } else {
                // The write may land at any poll from now on.
                model.seen.remove(&key);
                let (val, call): (Val, Call<'a>) = if rng.u32(0..5) == 0 {
                    let meta = format!("d{step}").into_bytes();
                    (None, Box::pin(async move { engine.delete(&k, &meta, now).await.map(|_| None) }))
                } else {
                    let meta = format!("m{step}").into_bytes();
                    let value: Vec<u8> = (0..rng.usize(0..=model.max_value)).map(|_| rng.u8(..)).collect();
                    let (m, v) = (meta.clone(), value.clone());
                    (Some((meta, value)), Box::pin(async move { engine.put(&k, &m, &v, now).await.map(|_| None) }))
                };
                (Op::Write { key, val }, call)
            }
        }
        85..=88 => chore("compact", engine.compact(now)),
        89..=92 => chore("flush", engine.flush()),
        93..=95 => chore("sync", engine.sync()),
        96..=97 => chore("tick", engine.tick()),
        _ => chore("prepare_spare", engine.prepare_spare()),
    };
    Some(InFlight { op, call, woken: Arc::new(Woken(AtomicBool::new(true))), polls: 0 })
}

/// One step of a chaos run.
#[derive(Clone, Copy)]
enum Event {
    Start,
    Poll,
    Cancel,
    /// Hold writes back, or let them go.
    Hold,
    Close,
    Crash,
}

/// How often each [`Event`] comes (weights), drawn anew for every seed, so
/// that seeds differ in their mix and not only in their order: some restart
/// every few dozen steps, some fill and seal segment after segment, some
/// drop much of what they start.
struct Knobs {
    weights: [(Event, u32); 6],
    /// A hold event holds writes back with odds 1 in this, else lets them go.
    hold_odds: u32,
}

impl Knobs {
    fn draw_for_run(rng: &mut fastrand::Rng) -> Knobs {
        Knobs {
            weights: [
                (Event::Start, rng.u32(250..450)),
                (Event::Poll, rng.u32(350..600)),
                (Event::Cancel, rng.u32(5..80)),
                (Event::Hold, rng.u32(5..40)),
                (Event::Close, rng.u32(1..15)),
                (Event::Crash, rng.u32(1..10)),
            ],
            hold_odds: rng.u32(2..10),
        }
    }

    fn draw(&self, rng: &mut fastrand::Rng) -> Event {
        let total: u32 = self.weights.iter().map(|(_, w)| w).sum();
        let mut r = rng.u32(0..total);
        for &(event, w) in &self.weights {
            if r < w {
                return event;
            }
            r -= w;
        }
        unreachable!("r < total")
    }
}

/// Largest value the chaos test writes.
const CHAOS_MAX_VALUE: usize = 1000;

/// What a chaos run does besides the operations, restarts and crashes.
#[derive(Clone, Copy, Debug, Default)]
struct ChaosRun {
    /// The disk fills and empties at random (under `always`: a close first
    /// gives the engine room and a tick to write what it buffered).
    full_disk: bool,
    /// Each open takes, at random, [`LARGE_SEGMENT`]s and values or the
    /// usual 20 KiB segments: the records written with the first that are
    /// larger than a small segment cannot be moved by compaction while it
    /// runs with small ones, so it keeps their segments (an operator who
    /// lowers `segment_size`).
    resize: bool,
}

/// The large segments and values of a [`ChaosRun::resize`] run: a record
/// of a value this large does not fit the usual 20 KiB segment (the
/// engine's smallest for `CHAOS_MAX_VALUE`, whose largest record also
/// holds the longest key and metadata).
const LARGE_SEGMENT: u64 = 64 * 1024;
const LARGE_MAX_VALUE: usize = 32 * 1024;

/// Operations in flight at once, at most.
const MAX_FLIGHTS: usize = 12;
/// Polls of woken flights, in rounds over all of them, allowed to drain
/// them before the test calls it a hang.
const DRAIN_ROUNDS: usize = 100_000;

/// One chaos run; what it went through is added to `counts`.
fn run_chaos(seed: u64, fsync: FsyncPolicy, steps: usize, counts: &mut ChaosCounts) {
    run_chaos_with(seed, fsync, steps, counts, ChaosRun::default());
}

/// [`run_chaos`], with what `run` adds. Without either option the random
/// draws are the same as before the options existed, so pinned seeds stay
/// what they were.
fn run_chaos_with(seed: u64, fsync: FsyncPolicy, steps: usize, counts: &mut ChaosCounts, run: ChaosRun) {
    let _guard = seed_guard(
        seed,
        format!("run_chaos_with({seed}, FsyncPolicy::{fsync:?}, {steps}, &mut ChaosCounts::default(), {run:?})"),
    );
    let ChaosRun { full_disk, resize } = run;
    let mut rng = fastrand::Rng::with_seed(seed);
    // Larger values than the other model tests' (in the same 20 KiB
    // segments): a run restarts every hundred steps or so, and each stretch
    // in between should still fill (and seal) segments.
    let config = EngineConfig { max_value_len: CHAOS_MAX_VALUE, ..tiny_config(fsync) };
    let large = EngineConfig { segment_size: LARGE_SEGMENT, max_value_len: LARGE_MAX_VALUE, ..config.clone() };
    let backend = MemBackend::new();
    let mut model = Chaos { counts: std::mem::take(counts), full_disk, max_value: CHAOS_MAX_VALUE, ..Chaos::default() };
    let knobs = Knobs::draw_for_run(&mut rng);
    let mut now = 0u64;
    let mut step = 0usize;
    block_on(async {
        while step < steps {
            let config = match (resize, resize && rng.bool()) {
                (false, _) => &config,
                (true, false) => &large,
                (true, true) => {
                    model.counts.small_opens += 1;
                    &config
                }
            };
            model.max_value = config.max_value_len;
            let engine = open(&backend, config).await;
            // After an open, what is in the engine is all there is.
            model.recheck(&engine, seed, step, "after open").await;
            let mut flights: Vec<InFlight<'_>> = Vec::new();
            let end = loop {
                step += 1;
                if step >= steps {
                    break "close";
                }
                now += rng.u64(0..5);
                if full_disk && rng.u32(0..30) == 0 {
                    backend.no_space(rng.bool());
                    continue;
                }
                match knobs.draw(&mut rng) {
                    Event::Start => {
                        if flights.len() < MAX_FLIGHTS {
                            flights.extend(start(&engine, &mut rng, &mut model, step, now));
                        }
                    }
                    Event::Poll => {
                        // One flight, or every one in a random order (as
                        // an executor's pass over its queue would).
                        let polls = if rng.bool() { 1 } else { flights.len() };
                        for _ in 0..polls {
                            if flights.is_empty() {
                                break;
                            }
                            let i = rng.usize(0..flights.len());
                            advance(&mut model, &mut flights, i, seed, step);
                        }
                    }
                    Event::Cancel => {
                        if !flights.is_empty() {
                            let i = rng.usize(0..flights.len());
                            model.cancel(flights.swap_remove(i));
                        }
                    }
                    Event::Hold => backend.hold_writes(rng.u32(0..knobs.hold_odds) == 0),
                    Event::Close => break "close",
                    Event::Crash => break "crash",
                }
            };
            backend.hold_writes(false);
            // Finish some flights and drop the rest.
            if rng.bool() {
                let mut rounds = 0;
                while !flights.is_empty() {
                    rounds += 1;
                    assert!(
                        rounds < DRAIN_ROUNDS,
                        "seed {seed} step {step}: {} operations never finish (lost wake-up?)",
                        flights.len()
                    );
                    let mut i = 0;
                    let mut woken = false;
                    while i < flights.len() {
                        woken |= flights[i].woken.0.load(Ordering::SeqCst);
                        if !advance(&mut model, &mut flights, i, seed, step) {
                            i += 1;
                        }
                    }
                    assert!(
                        woken || flights.is_empty(),
                        "seed {seed} step {step}: {} operations wait and nothing will wake them",
                        flights.len()
                    );
                }
            }
            for f in flights.drain(..) {
                model.cancel(f);
            }
            drop(flights);
            let stats = engine.stats();
            model.counts.segments_compacted += stats.segments_compacted;
            model.counts.segments_sealed += stats.segments_sealed;
            model.counts.segments_kept += stats.segments_kept as u64;
            if full_disk {
                // Room again, and a tick writes what the full disk held.
                backend.no_space(false);
                engine.tick().await.unwrap_or_else(|e| panic!("seed {seed} step {step}: tick failed: {e}"));
                assert!(engine.full().is_none(), "seed {seed} step {step}: still full with room");
            }
            if end == "close" {
                model.counts.closes += 1;
                engine.close().await.unwrap_or_else(|e| panic!("seed {seed} step {step}: close failed: {e}"));
            } else {
                // Power cut. Under `always` every acknowledged write
                // survives; otherwise sync first to keep the model exact.
                if fsync != FsyncPolicy::Always {
                    engine.sync().await.unwrap_or_else(|e| panic!("seed {seed} step {step}: sync failed: {e}"));
                }
                drop(engine);
                backend.crash(seed ^ step as u64, true);
                model.seen.clear();
                model.counts.crashes += 1;
            }
        }
        let engine = open(&backend, &config).await;
        model.recheck(&engine, seed, steps, "at the end").await;
    });
    *counts = model.counts;
}

/// Steps of one chaos run.
const CHAOS_STEPS: usize = 4000;

/// Seeds per fsync policy for the chaos test (`GYRE_CHAOS_SEEDS` runs more).
const CHAOS_SEEDS: u64 = 64;

fn chaos_seeds() -> std::ops::Range<u64> {
    0..std::env::var("GYRE_CHAOS_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(CHAOS_SEEDS)
}

#[test]
fn chaos_always() {
    let mut counts = ChaosCounts::default();
    for seed in chaos_seeds() {
        run_chaos(seed, FsyncPolicy::Always, CHAOS_STEPS, &mut counts);
    }
    // The runs went where the bugs live.
    println!("{counts:?}");
    assert!(counts.waited_writes > 500, "{counts:?}");
    assert!(counts.dropped_writes > 100, "{counts:?}");
    assert!(counts.dropped_chores > 100, "{counts:?}");
    assert!(counts.compactions > 100 && counts.segments_compacted > 100, "{counts:?}");
    assert!(counts.segments_sealed > 100, "{counts:?}");
    assert!(counts.closes > 100 && counts.crashes > 50, "{counts:?}");
}

/// The same chaos under `always` with a disk that fills and empties at
/// random: nothing acknowledged is lost, nothing unacknowledged shows up
/// as a value never written, and the engine takes writes again once there
/// is room (the disk-full state, `StorageError::DiskFull`).
#[test]
fn chaos_always_with_a_full_disk() {
    let mut counts = ChaosCounts::default();
    for seed in chaos_seeds() {
        let run = ChaosRun { full_disk: true, ..ChaosRun::default() };
        run_chaos_with(seed + 30_000, FsyncPolicy::Always, CHAOS_STEPS, &mut counts, run);
    }
    println!("{counts:?}");
    assert!(counts.disk_full > 100, "{counts:?}");
    assert!(counts.waited_writes > 500 && counts.segments_sealed > 100, "{counts:?}");
    assert!(counts.closes > 50 && counts.crashes > 20, "{counts:?}");
}

/// The same chaos under `always`, opening with large segments and values
/// or with small segments at random: records too large for the small
/// segments stay where they are, and compaction keeps their segments until
/// the keys are written again (a review found a crash window there that
/// the chaos runs could not reach: every record could be moved).
#[test]
fn chaos_always_with_segment_size_changes() {
    let mut counts = ChaosCounts::default();
    // An eighth of the other chaos tests' seeds: each run writes values up
    // to 32 KiB, and what it must reach (opens with small segments,
    // segments kept) it reaches several times over in these.
    for seed in 0..chaos_seeds().end.div_ceil(8) {
        let run = ChaosRun { resize: true, ..ChaosRun::default() };
        run_chaos_with(seed + 40_000, FsyncPolicy::Always, CHAOS_STEPS, &mut counts, run);
    }
    println!("{counts:?}");
    assert!(counts.small_opens > 100 && counts.segments_kept > 20, "{counts:?}");
    assert!(counts.segments_compacted > 100 && counts.crashes > 20, "{counts:?}");
}

#[test]
fn chaos_interval_and_never() {
    let mut counts = ChaosCounts::default();
    for seed in chaos_seeds() {
        run_chaos(seed + 10_000, FsyncPolicy::Interval(5), CHAOS_STEPS, &mut counts);
        run_chaos(seed + 20_000, FsyncPolicy::Never, CHAOS_STEPS, &mut counts);
    }
}

/// The chaos test's first find: a compaction pass dropped after moving a
/// key's record but before syncing the copy; the next pass found the old
/// segment with nothing live and removed it without a sync, and a power cut
/// then took the copy: the key was gone. Seed 46 reaches it with the run
/// as it is now (seed 32 found it first, with fixed weights).
/// `compaction_removes_a_dead_segment_only_after_syncing_what_superseded_it`
/// is the same bug without the cancellation.
#[test]
fn chaos_seed_46_a_dead_segment_went_before_what_superseded_it_was_synced() {
    run_chaos(46, FsyncPolicy::Always, CHAOS_STEPS, &mut ChaosCounts::default());
}
