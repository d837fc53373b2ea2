//! `gyre-tools`: offline operator tools that read Gyre's files directly
//! (memory-mapped, read-only, no glommio). Run it on a stopped node's files
//! or on copies: a live node truncates and deletes segments, and a mapped
//! page past a truncated end faults.
//!
//! `gyre-tools dump-segment FILE` lists every record of a segment with its
//! offset, and reports regions that fail their checksums.
//! `gyre-tools dump-hint FILE` lists a hint file's entries.

use std::fs::File;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use gyre::storage::format::{decode_hint, parse_file_name, FileKind, Kind};
use gyre::storage::scan::scan_segment;
use memmap2::Mmap;

#[derive(Parser)]
#[command(name = "gyre-tools", about = "Offline tools for Gyre data files")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the records of a segment file (seg-NNNNNNNN.log).
    DumpSegment {
        file: PathBuf,
        /// Treat the segment as the active one (a bad tail is a torn write).
        #[arg(long)]
        active: bool,
    },
    /// List the entries of a hint file (seg-NNNNNNNN.hint).
    DumpHint { file: PathBuf },
}

fn map(path: &PathBuf) -> anyhow::Result<Option<Mmap>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if f.metadata()?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: read-only mapping of a file Gyre only appends to or replaces
    // by rename; a concurrent truncation by a live node could fault, which
    // is why this is an offline tool.
    Ok(Some(unsafe { Mmap::map(&f)? }))
}

fn file_id(path: &std::path::Path) -> Option<FileKind> {
    parse_file_name(path.file_name()?.to_str()?)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::DumpSegment { file, active } => {
            let Some(FileKind::Segment(id)) = file_id(&file) else {
                bail!("{} is not a segment file name", file.display())
            };
            let data = map(&file)?;
            let bytes = data.as_deref().unwrap_or(&[]);
            let mut n = 0;
            let out = scan_segment(id, bytes, !active, |off, r| {
                n += 1;
                let kind = if r.kind == Kind::Tombstone { "tombstone" } else { "value" };
                println!(
                    "{off:>10} len={:<7} seq={:<10} ts={} {kind} key={:?} meta={}B value={}B",
                    r.encoded_len(),
                    r.seq,
                    r.timestamp_ms,
                    String::from_utf8_lossy(r.key),
                    r.meta.len(),
                    r.value.len()
                );
            });
            println!("records={n} valid_end={} torn_tail={}", out.valid_end, out.torn_tail);
            for c in &out.corruptions {
                println!("CORRUPT seg={} off={} len={} {}", c.seg, c.off, c.len, c.reason);
            }
            if !out.corruptions.is_empty() {
                std::process::exit(1);
            }
        }
        Command::DumpHint { file } => {
            let Some(FileKind::Hint(id)) = file_id(&file) else { bail!("{} is not a hint file name", file.display()) };
            let data = map(&file)?;
            let hint = decode_hint(data.as_deref().unwrap_or(&[]), id)?;
            println!(
                "segment={} data_len={} max_seq={} entries={}",
                hint.segment, hint.data_len, hint.max_seq, hint.count
            );
            hint.for_each(|e| {
                println!(
                    "{:>10} len={:<7} tombstone={} key={:?}",
                    e.off,
                    e.len,
                    e.tombstone,
                    String::from_utf8_lossy(e.key)
                )
            })?;
        }
    }
    Ok(())
}
