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
