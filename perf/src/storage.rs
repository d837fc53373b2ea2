//! The storage benchmark: load keys, then run a timed read/write mix with
//! many concurrent writers on one shard, optionally reopen and time recovery.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use gyre::shell::{now_ms, open_shard, run_executor, spawn_background, Stop};
use gyre::storage::{EngineConfig, FsyncPolicy};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::harness::MAX_SECONDS;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// System allocator that tracks live heap bytes.
pub struct CountingAlloc;

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct StorageArgs {
    /// Data directory (emptied first).
    #[arg(long, default_value = "./data/bench-storage")]
    pub dir: PathBuf,
    /// always | never | interval(MS)
    #[arg(long, default_value = "always")]
    #[serde(serialize_with = "as_string")]
    pub fsync: FsyncPolicy,
    /// Concurrent writer tasks on the shard.
    #[arg(long, default_value_t = 64)]
    pub writers: usize,
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Key space; all keys are written in a load phase before the timed run.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Share of reads in the timed run (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub read_ratio: f64,
    /// Seconds of the timed run (0 skips it).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Close and reopen after the run and report the recovery time.
    #[arg(long)]
    pub reopen: bool,
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub segment_size: u64,
    /// The shard's record cache, counting each record's memory, not only
    /// its bytes (since the sixteenth session; runs before it at the same
    /// figure cached more records).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub cache_bytes: usize,
    /// CPU to pin the shard's executor to.
    #[arg(long, default_value_t = 0)]
    pub cpu: usize,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn as_string<S: serde::Serializer>(p: &FsyncPolicy, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(p)
}

#[derive(Serialize, Default)]
struct Output {
    options: Option<StorageArgs>,
    load_ops_per_sec: f64,
    load_seconds: f64,
    ops: u64,
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    index_bytes_per_key: f64,
    heap_bytes_per_key: f64,
    records_per_fdatasync: f64,
    recovery_ms: Option<f64>,
    recovered_keys: Option<usize>,
    index_bytes_per_key_after_reopen: Option<f64>,
    engine: serde_json::Value,
}

pub fn run(args: StorageArgs) -> anyhow::Result<()> {
    anyhow::ensure!((0.0..=1.0).contains(&args.read_ratio), "--read-ratio must be between 0 and 1");
    anyhow::ensure!(args.writers > 0, "--writers must be positive");
    // Checked before the directory is emptied (`inf` panicked in
    // Duration::from_secs_f64; found by a review).
    anyhow::ensure!(
        (0.0..=MAX_SECONDS).contains(&args.duration),
        "--duration must be between 0 and {MAX_SECONDS} s (a week)"
    );
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir).with_context(|| format!("emptying {}", args.dir.display()))?;
    }
    let config = EngineConfig {
        fsync: args.fsync,
        segment_size: args.segment_size,
        cache_bytes: args.cache_bytes,
        max_value_len: args.value_size.max(gyre::limits::DEFAULT_MAX_VALUE_LEN),
        ..Default::default()
    };
    let a = args.clone();
    let out = run_executor("gyre-bench", Some(args.cpu), async move { bench(a, config).await })??;
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn key(i: u64) -> Vec<u8> {
    format!("key{i:012}").into_bytes()
}

async fn bench(args: StorageArgs, config: EngineConfig) -> anyhow::Result<Output> {
    let mut out = Output::default();
    let heap_before = LIVE.load(Ordering::Relaxed);
    let (engine, _) = open_shard(&args.dir, config.clone()).await?;
    let stop = Stop::default();
    spawn_background(&engine, &stop, Duration::from_secs(1));
    let value = vec![b'x'; args.value_size];

    // Load phase: every key once, `writers` tasks in parallel.
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.writers as u64)
        .map(|w| {
            let (engine, value, n, keys) = (engine.clone(), value.clone(), args.writers as u64, args.keys);
            glommio::spawn_local(async move {
                let mut i = w;
                while i < keys {
                    engine.put(&key(i), b"", &value, now_ms()).await?;
                    i += n;
                    glommio::yield_if_needed().await;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    engine.sync().await?;
    out.load_seconds = started.elapsed().as_secs_f64();
    out.load_ops_per_sec = args.keys as f64 / out.load_seconds;
    if args.keys > 0 {
        out.index_bytes_per_key = engine.index_memory_bytes() as f64 / args.keys as f64;
        out.heap_bytes_per_key = LIVE.load(Ordering::Relaxed).saturating_sub(heap_before) as f64 / args.keys as f64;
    }
    let loaded = engine.stats();

    // Timed phase.
    if args.duration > 0.0 {
        let hist = Rc::new(RefCell::new(Histogram::<u64>::new(3)?));
        let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
        let started = Instant::now();
        let tasks: Vec<_> = (0..args.writers as u64)
            .map(|w| {
                let (engine, value, hist, a) = (engine.clone(), value.clone(), hist.clone(), args.clone());
                glommio::spawn_local(async move {
                    let mut rng = fastrand::Rng::with_seed(w);
                    let mut local = Histogram::<u64>::new(3)?;
                    let mut ops = 0u64;
                    while Instant::now() < deadline {
                        let k = key(rng.u64(0..a.keys.max(1)));
                        let t0 = Instant::now();
                        if rng.f64() < a.read_ratio {
                            engine.get(&k).await?;
                        } else {
                            engine.put(&k, b"", &value, now_ms()).await?;
                        }
                        local.record(t0.elapsed().as_nanos() as u64)?;
                        ops += 1;
                        glommio::yield_if_needed().await;
                    }
                    hist.borrow_mut().add(&local)?;
                    anyhow::Ok(ops)
                })
            })
            .collect();
        let mut ops = 0;
        for t in tasks {
            ops += t.await?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let h = hist.borrow();
        out.ops = ops;
        out.ops_per_sec = ops as f64 / elapsed;
        out.p50_us = h.value_at_quantile(0.50) as f64 / 1e3;
        out.p99_us = h.value_at_quantile(0.99) as f64 / 1e3;
        out.p999_us = h.value_at_quantile(0.999) as f64 / 1e3;
        out.max_us = h.max() as f64 / 1e3;
    }
    engine.close().await?;
    stop.stop().await;
    let stats = engine.stats();
    let writes = (stats.puts + stats.deletes).saturating_sub(loaded.puts + loaded.deletes);
    // Under `always` a group commit is one synced write, not an fdatasync
    // (its fdatasyncs are only the seals, whose writes count already).
    let syncs = match config.synced_writes() {
        true => stats.synced_writes.saturating_sub(loaded.synced_writes),
        false => stats.fdatasyncs.saturating_sub(loaded.fdatasyncs),
    };
    if syncs > 0 {
        out.records_per_fdatasync = writes as f64 / syncs as f64;
    }
    out.engine = serde_json::to_value(&stats)?;
    drop(engine);

    if args.reopen {
        let started = Instant::now();
        let (engine, report) = open_shard(&args.dir, config).await?;
        out.recovery_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        out.recovered_keys = Some(report.keys);
        if args.keys > 0 {
            out.index_bytes_per_key_after_reopen = Some(engine.index_memory_bytes() as f64 / args.keys as f64);
        }
        anyhow::ensure!(report.corruptions.is_empty(), "recovery found corruption: {report:?}");
        anyhow::ensure!(report.keys as u64 == args.keys, "recovered {} keys, expected {}", report.keys, args.keys);
        drop(engine);
    }
    out.options = Some(args);
    Ok(out)
}

/// `gyre-bench compaction`: one compaction pass, timed, over segments
/// filled by overwriting a key space (no other work on the shard).
#[derive(Args, Debug, Clone, Serialize)]
pub struct CompactionArgs {
    /// Data directory (emptied first).
    #[arg(long, default_value = "./data/bench-compaction")]
    pub dir: PathBuf,
    /// Key space the writes overwrite, in a scattered order.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Segments sealed before the pass (each then holds mostly overwritten
    /// records; a pass compacts those at least half overwritten, so keep
    /// `--keys` well below a segment's worth of records).
    #[arg(long, default_value_t = 3)]
    pub segments: u64,
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub segment_size: u64,
    /// CPU to pin the shard's executor to.
    #[arg(long, default_value_t = 0)]
    pub cpu: usize,
}

#[derive(Serialize)]
struct CompactionOutput {
    options: CompactionArgs,
    records_written: u64,
    wall_ms: f64,
    /// CPU time of the shard's thread during the pass (its own work and
    /// its give-ways; not glommio's blocking thread nor the kernel's I/O
    /// threads).
    shard_cpu_ms: f64,
    stats: serde_json::Value,
}

/// CPU time of the calling thread, in milliseconds.
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

pub fn run_compaction(args: CompactionArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.keys > 0 && args.segments > 0, "--keys and --segments must be positive");
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir).with_context(|| format!("emptying {}", args.dir.display()))?;
    }
    // Buffered writes (the pass syncs its copies itself), no record cache
    // (a pass does not read through it), and the default threshold: only
    // segments at least half overwritten are compacted.
    let config = EngineConfig {
        fsync: FsyncPolicy::Never,
        segment_size: args.segment_size,
        cache_bytes: 0,
        compaction_threshold: EngineConfig::default().compaction_threshold,
        max_value_len: args.value_size.max(gyre::limits::DEFAULT_MAX_VALUE_LEN),
        ..Default::default()
    };
    let a = args.clone();
    let out = run_executor("gyre-bench", Some(args.cpu), async move {
        let (engine, _) = open_shard(&a.dir, config).await?;
        let value = vec![b'x'; a.value_size];
        let mut written = 0u64;
        while engine.stats().segments_sealed < a.segments {
            // A multiplicative hash scatters the keys over the index.
            engine.put(&key(written.wrapping_mul(2_654_435_761) % a.keys), b"", &value, now_ms()).await?;
            written += 1;
        }
        engine.sync().await?;
        let (cpu, started) = (thread_cpu_ms(), Instant::now());
        let stats = engine.compact(now_ms()).await?;
        let (wall_ms, shard_cpu_ms) = (started.elapsed().as_secs_f64() * 1e3, thread_cpu_ms() - cpu);
        anyhow::ensure!(stats.segments_removed > 0, "the pass removed no segment: {stats:?}");
        anyhow::Ok(CompactionOutput {
            options: a,
            records_written: written,
            wall_ms,
            shard_cpu_ms,
            stats: serde_json::to_value(stats)?,
        })
    })??;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by a review: `--duration inf` panicked in
    /// `Duration::from_secs_f64`; it is refused before the directory is
    /// emptied.
    #[test]
    fn a_huge_duration_is_refused_before_the_directory_is_touched() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: StorageArgs,
        }
        let dir = std::env::temp_dir().join(format!("gyre-bench-storage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kept = dir.join("kept");
        std::fs::write(&kept, b"x").unwrap();
        for d in ["inf", "1e20", "-1", "NaN"] {
            let duration = format!("--duration={d}");
            let argv = ["storage", "--dir", dir.to_str().unwrap(), &duration];
            let args = <Cli as clap::Parser>::try_parse_from(argv).unwrap().args;
            let e = run(args).expect_err(d).to_string();
            assert!(e.contains("--duration"), "{d}: {e}");
        }
        assert!(kept.exists(), "the directory was emptied");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
