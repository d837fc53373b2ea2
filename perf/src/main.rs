//! `gyre-bench`: Gyre's benchmark harness.
//!
//! `gyre-bench storage` drives one shard's storage engine in process (no
//! network) on a pinned glommio executor and prints a JSON result. The
//! network, cluster and SLA modes come with the node.

mod storage;

use clap::{Parser, Subcommand};

/// Counts live heap bytes so the harness can report memory per key.
#[global_allocator]
static ALLOC: storage::CountingAlloc = storage::CountingAlloc;

#[derive(Parser)]
#[command(name = "gyre-bench", about = "Gyre benchmark harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One shard's storage engine, in process.
    Storage(storage::StorageArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Storage(args) => storage::run(args),
    }
}
