//! Corruption tests: flipped bytes in a sealed segment and in a hint file are
//! detected and reported, and the rest of the data stays readable.

use futures_lite::future::block_on;
use gyre::storage::backend::mem::MemBackend;
use gyre::storage::format::{hint_file_name, segment_file_name};
use gyre::storage::{Engine, EngineConfig, FsyncPolicy, StorageError};

fn config() -> EngineConfig {
    EngineConfig {
        partitions: 8,
        segment_size: 20 * 1024,
        max_value_len: 200,
        fsync: FsyncPolicy::Always,
        ..Default::default()
    }
}

/// Writes 300 keys (several sealed segments), closes, returns the backend.
fn populated() -> MemBackend {
    let backend = MemBackend::new();
    block_on(async {
        let (engine, _) = Engine::open(backend.clone(), config()).await.unwrap();
        for i in 0..300u32 {
            engine.put(format!("key{i}").as_bytes(), b"", &[i as u8; 150], 0).await.unwrap();
        }
        engine.close().await.unwrap();
    });
    backend
}

#[test]
fn flipped_byte_in_sealed_segment_is_reported_and_others_stay_readable() {
    let backend = populated();
    // Corrupt a byte inside the value of some record in segment 1.
    backend.corrupt(&segment_file_name(1), 1000, 0x5A).unwrap();
    block_on(async {
        let (engine, report) = Engine::open(backend.clone(), config()).await.unwrap();
        assert!(report.hints_used >= 2, "{report:?}");
        let mut corrupt = 0;
        for i in 0..300u32 {
            match engine.get(format!("key{i}").as_bytes()).await {
                Ok(Some(r)) => assert_eq!(r.value(), &[i as u8; 150]),
                Err(StorageError::Corrupt { seg: 1, .. }) => corrupt += 1,
                other => panic!("key{i}: unexpected {other:?}"),
            }
        }
        assert_eq!(corrupt, 1, "exactly the damaged record is reported");
        let found = engine.verify().await.unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].seg, 1);
        assert!(found[0].off <= 1000 && 1000 < found[0].off + found[0].len);
    });
    // Without hints, recovery itself scans and reports the region.
    block_on(async {
        for (name, _) in backend.files() {
            if name.ends_with(".hint") {
                gyre::storage::backend::Backend::remove(&backend, &name).await.unwrap();
            }
        }
        let (engine, report) = Engine::open(backend.clone(), config()).await.unwrap();
        assert_eq!(report.corruptions.len(), 1, "{report:?}");
        assert_eq!(engine.len(), 299, "the damaged record's key is the only one missing");
    });
}

#[test]
fn flipped_byte_in_hint_file_falls_back_to_scanning() {
    let backend = populated();
    backend.corrupt(&hint_file_name(1), 50, 0x01).unwrap();
    block_on(async {
        let (engine, report) = Engine::open(backend.clone(), config()).await.unwrap();
        assert_eq!(report.hint_errors.len(), 1, "{report:?}");
        assert!(report.hint_errors[0].contains("segment 1"), "{report:?}");
        assert!(report.corruptions.is_empty());
        for i in 0..300u32 {
            let r = engine.get(format!("key{i}").as_bytes()).await.unwrap().unwrap();
            assert_eq!(r.value(), &[i as u8; 150]);
        }
    });
    // The scan rewrote the hint: the next open uses it again.
    block_on(async {
        let (_, report) = Engine::open(backend.clone(), config()).await.unwrap();
        assert!(report.hint_errors.is_empty(), "{report:?}");
    });
}

#[test]
fn incompatible_format_version_is_refused() {
    let backend = populated();
    block_on(async {
        let mut text = b"gyre storage format 99\n".to_vec();
        text.resize(4096, b'\n');
        gyre::storage::backend::Backend::write_file(&backend, "GYRE_FORMAT", &text).await.unwrap();
        let err = Engine::open(backend.clone(), config()).await.err().expect("must refuse");
        assert!(matches!(err, StorageError::FormatVersion { .. }), "{err}");
    });
}

/// A client's value may hold the bytes of a whole record, for any key and
/// sequence number. When the record around it is damaged, recovery resyncs
/// through that value, and must not adopt the bytes as a record: they do
/// not verify under the directory's own checksum seed. (Had the client
/// known the seed, they would be adopted: the second case shows the test
/// can see an adoption.)
#[test]
fn a_record_stored_in_a_value_is_not_adopted_when_its_container_is_damaged() {
    use gyre::storage::backend::Backend;
    use gyre::storage::format::{encode_record, parse_format_file, record_len, Kind, Seed};
    for forged_with_the_shards_seed in [false, true] {
        let backend = MemBackend::new();
        block_on(async {
            let (engine, _) = Engine::open(backend.clone(), config()).await.unwrap();
            let seed = parse_format_file(&backend.read_file("GYRE_FORMAT").await.unwrap()).unwrap();
            assert_ne!(seed, Seed::FORMAT_1, "a new directory draws its seed");
            let forged_seed = if forged_with_the_shards_seed { seed } else { Seed::FORMAT_1 };
            let mut value = vec![9u8; 20];
            encode_record(&mut value, forged_seed, 1 << 40, 0, Kind::Value, b"victim", b"", b"forged");
            value.extend_from_slice(&[9u8; 20]);
            engine.put(b"a", b"", b"1", 0).await.unwrap();
            engine.put(b"b", b"", &value, 0).await.unwrap();
            engine.put(b"c", b"", b"3", 0).await.unwrap();
            engine.close().await.unwrap();
            // The key byte of "b", the second record of segment 1.
            let b_at = record_len(1, 0, 1);
            backend.corrupt(&segment_file_name(1), b_at + 32, 0x01).unwrap();
            let (engine, report) = Engine::open(backend.clone(), config()).await.unwrap();
            assert_eq!(report.corruptions[0].off, b_at as u64, "{report:?}");
            if !forged_with_the_shards_seed {
                let whole = record_len(1, 0, value.len()) as u64;
                assert_eq!((report.corruptions.len(), report.corruptions[0].len), (1, whole), "{report:?}");
            }
            let victim = engine.get(b"victim").await.unwrap();
            assert_eq!(victim.is_some(), forged_with_the_shards_seed, "{victim:?}");
            assert!(engine.get(b"b").await.unwrap().is_none(), "the damaged record is lost");
            for (k, v) in [(&b"a"[..], &b"1"[..]), (b"c", b"3")] {
                assert_eq!(engine.get(k).await.unwrap().unwrap().value(), v);
            }
        });
    }
}

/// A format 1 directory (checksums with seed 0, before the format file
/// carried a seed) opens as it is: its records read back, new ones are
/// written with seed 0 too, and the format file is left alone, so that
/// the builds that wrote it can still read it. A format 2 directory (a
/// seed, no header checks) likewise.
#[test]
fn a_format_1_or_2_directory_opens_and_keeps_its_format() {
    use gyre::storage::format::{format_file_contents, Seed};
    let mut one = b"gyre storage format 1\n".to_vec();
    one.resize(4096, b'\n');
    let two = Seed::format_2(0x5eed_0002);
    for (seed, format) in [(Seed::FORMAT_1, one), (two, format_file_contents(two))] {
        opens_and_keeps_its_format(seed, format);
    }
}

fn opens_and_keeps_its_format(seed: gyre::storage::format::Seed, format: Vec<u8>) {
    use gyre::storage::backend::Backend;
    use gyre::storage::format::{encode_record, Kind};
    let backend = MemBackend::new();
    let mut segment = Vec::new();
    encode_record(&mut segment, seed, 1, 0, Kind::Value, b"old", b"", b"from before");
    segment.resize(4096, 0);
    block_on(async {
        backend.write_file("GYRE_FORMAT", &format).await.unwrap();
        backend.write_file(&segment_file_name(1), &segment).await.unwrap();
        let (engine, report) = Engine::open(backend.clone(), config()).await.unwrap();
        assert!(report.corruptions.is_empty(), "{seed:?}: {report:?}");
        assert_eq!(engine.get(b"old").await.unwrap().unwrap().value(), b"from before");
        engine.put(b"new", b"", b"written now", 0).await.unwrap();
        engine.close().await.unwrap();
        drop(engine);
        let (engine, report) = Engine::open(backend.clone(), config()).await.unwrap();
        assert!(report.corruptions.is_empty(), "{seed:?}: {report:?}");
        assert_eq!(engine.get(b"old").await.unwrap().unwrap().value(), b"from before");
        assert_eq!(engine.get(b"new").await.unwrap().unwrap().value(), b"written now");
        assert_eq!(backend.read_file("GYRE_FORMAT").await.unwrap(), format);
        // The new record is in the directory's own format.
        let seg = backend.read_file(&segment_file_name(2)).await.unwrap();
        let r = gyre::storage::format::decode_record(&seg, seed).expect("a record of the directory's format");
        assert_eq!(r.key, b"new");
    });
}

/// Compaction of a segment holding a damaged live record: the damaged
/// record is reported and its segment kept (so reads keep reporting it,
/// not losing the key), and every other live record of the segment is
/// moved and stays readable.
#[test]
fn compaction_reports_a_damaged_record_and_moves_the_others() {
    let backend = populated();
    backend.corrupt(&segment_file_name(1), 1000, 0x5A).unwrap();
    block_on(async {
        let config = EngineConfig { compaction_threshold: 0.3, ..config() };
        let (engine, _) = Engine::open(backend.clone(), config).await.unwrap();
        // Overwrite every other key: the early segments become half
        // garbage, past the threshold.
        for i in (0..300u32).step_by(2) {
            engine.put(format!("key{i}").as_bytes(), b"", &[i as u8; 150], 0).await.unwrap();
        }
        let done = engine.compact(0).await.unwrap();
        assert_eq!(done.corrupt_regions, 1, "{done:?}");
        assert!(done.records_moved > 0, "{done:?}");
        let files: Vec<String> = backend.files().into_iter().map(|(n, _)| n).collect();
        assert!(files.contains(&segment_file_name(1)), "the damaged segment is kept: {files:?}");
        let mut corrupt = 0;
        for i in 0..300u32 {
            match engine.get(format!("key{i}").as_bytes()).await {
                Ok(Some(r)) => assert_eq!(r.value(), &[i as u8; 150]),
                Err(StorageError::Corrupt { seg: 1, .. }) => corrupt += 1,
                other => panic!("key{i}: unexpected {other:?}"),
            }
        }
        // The damaged record is live (its segment could not be emptied):
        // still reported, never silently lost, never another key's value.
        assert_eq!(corrupt, 1);
    });
}

/// Damage a start finds by scanning a segment (a sealed one whose hint is
/// lost, or the last one) is reported once: that open writes the
/// segment's hint, of the records that verified and at the size the
/// segment keeps, so the next open replays it and reports no new loss (a
/// node renews its actor at each reported loss). Wherever the damage
/// lies: inside a sealed segment, in its last record (then the records
/// that verify end before the file does), or in the last segment.
#[test]
fn damage_found_by_a_scan_is_reported_once_wherever_it_lies() {
    for place in ["inside", "at the end", "in the last segment"] {
        let backend = populated();
        let segs: Vec<(String, usize)> = backend.files().into_iter().filter(|(n, _)| n.ends_with(".log")).collect();
        let (name, size) = segs.iter().max().unwrap();
        assert!(segs.len() >= 3 && !backend.files().iter().any(|(n, _)| *n == hint_file_name(segs.len() as u32)));
        let (seg, off) = match place {
            "inside" => (segment_file_name(1), 1000),
            "at the end" => {
                (segment_file_name(1), segs.iter().find(|(n, _)| *n == segment_file_name(1)).unwrap().1 - 10)
            }
            _ => (name.clone(), size / 2),
        };
        backend.corrupt(&seg, off, 0x5A).unwrap();
        if seg == segment_file_name(1) {
            block_on(gyre::storage::backend::Backend::remove(&backend, &hint_file_name(1))).unwrap();
        }
        block_on(async {
            let (engine, report) = Engine::open(backend.clone(), config()).await.unwrap();
            assert_eq!(report.corruptions.len(), 1, "{place}: {report:?}");
            let keys = engine.len();
            assert!(keys < 300, "{place}");
            let (engine, report) = Engine::open(backend.clone(), config()).await.unwrap();
            assert!(!report.lost_records() && report.hint_errors.is_empty(), "{place}: {report:?}");
            assert_eq!(report.segments_scanned, 0, "every segment has its hint: {report:?}");
            assert_eq!(engine.len(), keys, "{place}");
            assert_eq!(engine.verify().await.unwrap().len(), 1, "a scrub still finds the damage");
        });
    }
}

/// A last segment none of whose records verifies (its only record
/// damaged) is removed as holding no record, and its bytes count as lost:
/// a torn tail, never a silent cut.
#[test]
fn a_last_segment_with_no_record_that_verifies_is_reported_lost() {
    let backend = MemBackend::new();
    block_on(async {
        let (engine, _) = Engine::open(backend.clone(), config()).await.unwrap();
        engine.put(b"only", b"", &[7u8; 150], 0).await.unwrap();
        engine.close().await.unwrap();
    });
    backend.corrupt(&segment_file_name(1), 60, 0x5A).unwrap();
    block_on(async {
        let (engine, report) = Engine::open(backend.clone(), config()).await.unwrap();
        assert!(report.torn_tail_bytes > 0 && report.corruptions.is_empty(), "{report:?}");
        assert!(engine.get(b"only").await.unwrap().is_none());
    });
}

/// A victim with few live records has them read one by one, found from
/// its hint file, and its dead records are not read at all: a damaged
/// dead record is neither reported nor an obstacle, and the segment goes.
/// A damaged live record read that way sends compaction back to streaming
/// the segment, which reports it and keeps the segment, as before.
#[test]
fn compaction_reads_only_the_live_records_of_a_sparse_segment() {
    // Segment 1 holds key0 to about key106 (186-187 bytes a record in
    // 20 KiB); key5's record spans byte 1000, key10's byte 1900.
    for (damaged_at, damaged_key) in [(1000, 5u32), (1900, 10)] {
        let backend = populated();
        backend.corrupt(&segment_file_name(1), damaged_at, 0x5A).unwrap();
        block_on(async {
            let (engine, _) = Engine::open(backend.clone(), config()).await.unwrap();
            let damaged = format!("key{damaged_key}");
            assert!(matches!(engine.get(damaged.as_bytes()).await, Err(StorageError::Corrupt { seg: 1, .. })));
            // Overwrite segment 1's keys but key10 and key20 (and those
            // past key100): a few live records among many dead.
            for i in (0..=100u32).filter(|&i| i != 10 && i != 20) {
                engine.put(format!("key{i}").as_bytes(), b"", &[(i + 1) as u8; 150], 0).await.unwrap();
            }
            let done = engine.compact(0).await.unwrap();
            let files: Vec<String> = backend.files().into_iter().map(|(n, _)| n).collect();
            if damaged_key == 5 {
                assert_eq!(done.corrupt_regions, 0, "a dead record is not read: {done:?}");
                assert!(!files.contains(&segment_file_name(1)), "segment 1 is removed: {files:?}");
            } else {
                assert_eq!(done.corrupt_regions, 1, "the streamed segment reports it: {done:?}");
                assert!(files.contains(&segment_file_name(1)), "segment 1 is kept: {files:?}");
            }
            assert!(done.records_moved >= 1, "{done:?}");
            for i in 0..300u32 {
                let want = if i <= 100 && i != 10 && i != 20 { (i + 1) as u8 } else { i as u8 };
                match engine.get(format!("key{i}").as_bytes()).await {
                    Ok(Some(r)) => assert_eq!(r.value(), &[want; 150], "key{i}"),
                    Err(StorageError::Corrupt { seg: 1, .. }) if i == damaged_key => {}
                    other => panic!("key{i}: unexpected {other:?}"),
                }
            }
            engine.close().await.unwrap();
        });
    }
}

/// Writes never wait for garbage compaction cannot reclaim: once a pass
/// finds that a segment keeps a damaged live record, that segment's
/// garbage no longer counts as compaction's backlog, writes that waited
/// for it go on (they would otherwise wait for good), and it does not make
/// them wait again after passes that reclaim other segments.
#[test]
fn writes_stop_waiting_for_compaction_that_reclaims_nothing() {
    let backend = populated();
    backend.corrupt(&segment_file_name(1), 1000, 0x5A).unwrap();
    block_on(async {
        // Any garbage to reclaim makes writes wait.
        let config = EngineConfig { compaction_threshold: 0.3, write_stall_backlog: 0.01, ..config() };
        let (engine, _) = Engine::open(backend.clone(), config).await.unwrap();
        // Overwrite every other key of the first segment only: it alone is
        // past the threshold.
        for i in (0..80u32).step_by(2) {
            engine.put(format!("key{i}").as_bytes(), b"", &[i as u8; 150], 0).await.unwrap();
        }
        engine.handle_compaction_check();
        assert!(engine.write_stalled(), "{:?}", engine.stats());
        let done = engine.compact(0).await.unwrap();
        assert_eq!((done.segments_removed, done.corrupt_regions), (0, 1), "{done:?}");
        assert!(!engine.write_stalled(), "compaction cannot help: writes go on");
        let st = engine.stats();
        assert!(st.disk_total_bytes > st.disk_live_bytes, "the garbage is still there: {st:?}");
        assert_eq!(engine.compaction_backlog(), 0.0, "but no longer counts");
        engine.handle_compaction_check();
        assert!(!engine.write_stalled(), "and writes stay going");
        engine.put(b"after", b"", b"v", 0).await.unwrap();
        // Garbage in segments compaction can remove: writes wait, the next
        // pass reclaims it, and they go on; the damaged segment's garbage
        // does not hold them.
        for i in (120..300u32).step_by(2) {
            engine.put(format!("key{i}").as_bytes(), b"", &[i as u8; 150], 0).await.unwrap();
        }
        engine.handle_compaction_check();
        assert!(engine.write_stalled(), "{:?}", engine.stats());
        let done = engine.compact(0).await.unwrap();
        assert!(done.segments_removed > 0, "{done:?}");
        assert!(!engine.write_stalled(), "{:?}", engine.stats());
        engine.handle_compaction_check();
        assert!(!engine.write_stalled());
        engine.put(b"after", b"", b"w", 0).await.unwrap();
        assert_eq!(engine.stats().compaction_stalls, 2);
    });
}
