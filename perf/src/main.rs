//! `gyre-bench`: Gyre's benchmark harness.
//!
//! `gyre-bench storage` drives one shard's storage engine in process (no
//! network) on a pinned glommio executor and prints a JSON result.
//! `gyre-bench net` drives a Gyre node or cluster (client- or
//! server-driven routing) or a Redis server over TCP with the same
//! closed-loop generator, optionally paced to a fixed offered load.

mod net;
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
    /// A Gyre node or cluster, or a Redis server, over the network (GET/SET mix).
    Net(net::NetArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Storage(args) => storage::run(args),
        Command::Net(args) => net::run(args),
    }
}
