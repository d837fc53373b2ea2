//! The `gyre` binary. Today: inspect and verify a shard's data directory,
//! and a crash-test writer. The node, the dev cluster and the client
//! commands come with the next pieces of work.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use gyre::shell::{now_ms, open_shard, run_executor};
use gyre::storage::{EngineConfig, FsyncPolicy};

#[derive(Parser)]
#[command(name = "gyre", version, about = "Gyre: a Dynamo-style key-value store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Recover a shard data directory, scrub every segment, print a JSON report.
    /// Exits 1 if corruption is found.
    Check {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Crash-test helper: writes unique keys from concurrent writers and prints
    /// each key on stdout once its write is acknowledged.
    #[command(hide = true)]
    StorageWriter {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "always")]
        fsync: FsyncPolicy,
        #[arg(long, default_value_t = 8)]
        writers: usize,
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        #[arg(long, default_value_t = 1 << 20)]
        segment_size: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Check { data_dir } => check(data_dir),
        Command::StorageWriter { data_dir, fsync, writers, value_size, segment_size } => {
            let config = EngineConfig { fsync, segment_size, max_value_len: 64 * 1024, ..Default::default() };
            storage_writer(data_dir, config, writers, value_size)
        }
    }
}

fn check(dir: PathBuf) -> anyhow::Result<()> {
    if !dir.join(gyre::storage::format::FORMAT_FILE).exists() {
        bail!("{} is not a Gyre data directory (no {} file)", dir.display(), gyre::storage::format::FORMAT_FILE);
    }
    let corrupt = run_executor("gyre-check", None, async move {
        let started = std::time::Instant::now();
        let (engine, report) = open_shard(&dir, EngineConfig::default()).await?;
        let recovery_ms = started.elapsed().as_secs_f64() * 1e3;
        let scrub = engine.verify().await?;
        let out = serde_json::json!({
            "data_dir": dir,
            "recovery_ms": recovery_ms,
            "recovery": report,
            "scrub_corruptions": scrub,
            "stats": engine.stats(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        anyhow::Ok(!report.corruptions.is_empty() || !scrub.is_empty())
    })??;
    if corrupt {
        std::process::exit(1);
    }
    Ok(())
}

fn storage_writer(dir: PathBuf, config: EngineConfig, writers: usize, value_size: usize) -> anyhow::Result<()> {
    run_executor("gyre-writer", None, async move {
        let (engine, _) = open_shard(&dir, config).await.context("opening the shard")?;
        let stop = gyre::shell::Stop::default();
        gyre::shell::spawn_background(&engine, &stop, std::time::Duration::from_millis(50));
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let engine = engine.clone();
                glommio::spawn_local(async move {
                    for i in 0u64.. {
                        let key = format!("w{w}-{i}");
                        let value = value_for(&key, value_size);
                        engine.put(key.as_bytes(), b"", &value, now_ms()).await?;
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "{key}")?;
                        out.flush()?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
        anyhow::Ok(())
    })?
}

/// The value the crash-test writer stores for a key (the checker recomputes it).
fn value_for(key: &str, size: usize) -> Vec<u8> {
    key.bytes().cycle().take(size).collect()
}
