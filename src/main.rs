//! The `gyre` binary: run a node (`gyre node`) or a local cluster (`gyre
//! dev`), talk to one (`put`, `get`, `delete`, `ping`, `stats`, `ring`),
//! check a data directory (`check`, read-only unless `--repair`), and a
//! hidden crash-test writer.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use gyre::client::{Client, ClientConfig, ClientError, Context as VersionContext};
use gyre::limits::VALUE_LEN_HARD_CAP;
use gyre::node::config::DEFAULT_LISTEN;
use gyre::node::NodeConfig;
use gyre::shell::{now_ms, open_shard, run_executor};
use gyre::storage::{EngineConfig, FsyncPolicy, SPARE_SEGMENT};

#[derive(Parser)]
#[command(name = "gyre", version, about = "Gyre: a Dynamo-style key-value store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the client commands connect, and how they print.
#[derive(clap::Args)]
struct ClientArgs {
    /// Address of any shard of the node, or of several nodes of a cluster
    /// separated by commas: the first that answers is the seed.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    node: String,
    /// Print JSON instead of plain text.
    #[arg(long)]
    json: bool,
    /// Seconds that connecting, and each request the command sends, may
    /// take (0.001 to 86400): a put sends one, a delete without --context
    /// two. A connection attempt gets at most half of it, and no more
    /// than 2 s.
    #[arg(long, default_value = "5", value_parser = parse_timeout, allow_negative_numbers = true)]
    timeout: Duration,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: one pinned executor per shard, each on its own port.
    Node(NodeArgs),
    /// Store VALUE (or the bytes of --value-file) under KEY as the successor
    /// of what CONTEXT saw.
    Put {
        key: String,
        /// The value, as the shell passes it (for binary or large values,
        /// use --value-file).
        #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
        value: Option<OsString>,
        /// Read the value from this file instead, byte for byte (`-`:
        /// standard input; `./-` for a file named `-`).
        #[arg(long, value_name = "PATH")]
        value_file: Option<PathBuf>,
        /// The context printed by `get` (omit to add a sibling).
        #[arg(long, default_value = "")]
        context: VersionContext,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print every concurrent value of KEY and the context to write back with.
    ///
    /// Values are printed one per line (and in --json as `values`, strings);
    /// a value that is not UTF-8 is shown there with replacement characters,
    /// and --json then adds `values_hex`: every value, in the same order, as
    /// hex of its exact bytes. --raw writes one value's exact bytes instead.
    Get {
        key: String,
        /// Write the value's exact bytes to stdout (no newline) and the
        /// context to stderr. Fails (exit 1) if KEY is not found, or if it
        /// has siblings and --sibling does not pick one.
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        /// With --raw: the sibling to write, from 0, in the order `get`
        /// prints them.
        #[arg(long, value_name = "N", requires = "raw")]
        sibling: Option<usize>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete KEY: without --context, what a read of KEY finds now; with
    /// --context, the versions of KEY that CONTEXT saw.
    ///
    /// Without --context, KEY is read first and deleted with the context of
    /// that read (a write that lands in between survives, as a sibling). If
    /// KEY is not found, nothing is written, "not found" goes to stderr and
    /// the exit status is 0; --json then prints `"found": false`.
    Delete {
        key: String,
        /// The context printed by `get` (omit to delete what is there now).
        #[arg(long)]
        context: Option<VersionContext>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the node's identity and shard ports.
    Ping {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Start a local cluster: one `gyre node` process per node on 127.0.0.1,
    /// 127.0.0.2, ... (port 7700), all stopped on Ctrl-C or SIGTERM.
    Dev(DevArgs),
    /// Print a cluster's ring: members, partitions owned, replica load.
    Ring {
        /// Read the ring from this cluster file instead of asking a node
        /// (no --node or --timeout then: nothing is asked).
        #[arg(long, conflicts_with_all = ["node", "timeout"])]
        cluster: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print one shard's counters (JSON).
    Stats {
        #[arg(long, default_value_t = 0)]
        shard: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check a data directory, changing nothing: replay what a start would
    /// (hints, segment scans), scrub every segment, and print a JSON report
    /// with the repairs --repair would make (a start makes the same, but
    /// may keep or drop a spare segment differently: its own segment size
    /// and fsync policy decide). Exits 1 if corruption is found, a shard
    /// cannot be checked, a node's shard directory is missing
    /// (`missing_shards`), a shard holds fewer records than at the node's
    /// clean stop (`shards_gone_back`), shard data has no NODE file
    /// (`node_file_missing`), or a repair could not remove the CLEAN mark
    /// (`clean_mark_error`).
    ///
    /// DATA_DIR is a node's data directory (each of its shard-NNN
    /// directories is checked), one shard's directory, or a `gyre dev`
    /// directory (each node's).
    Check {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Make the repairs: recover each shard as a node's start does
        /// (cut a torn tail, write hints, remove temporary files). Refused
        /// while a node uses the directory. A spare segment of a size a
        /// segment can have is kept. A repair that loses records removes
        /// the node's CLEAN mark first, so its next start takes a new actor.
        #[arg(long)]
        repair: bool,
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
    let cli = Cli::parse();
    // Logs go to stderr. RUST_LOG, when set, says what is logged; else a
    // node (and the other server-side commands) logs from `info` up, so
    // that its start and any corruption recovery finds are seen, and a
    // client command only warnings and errors.
    let default_level = match cli.command {
        Command::Node(_) | Command::Dev(_) | Command::Check { .. } | Command::StorageWriter { .. } => {
            tracing_subscriber::filter::LevelFilter::INFO
        }
        _ => tracing_subscriber::filter::LevelFilter::WARN,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::builder().with_default_directive(default_level.into()).from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli.command) {
        // The reader of stdout is gone (`gyre stats | head -1`): nothing
        // failed that anyone could be told about.
        Err(e) if e.is::<StdoutClosed>() => std::process::exit(STDOUT_CLOSED_EXIT),
        res => res,
    }
}

/// Exit status of a command whose standard output was closed before it had
/// written everything (`gyre stats | head -1`, `gyre get k --raw | head -c
/// 10`): 141, what a shell reports for a process killed by SIGPIPE (128 +
/// 13), as `cat` or `grep` end in the same pipeline. Not 0: the output was
/// cut short, and a script under `set -o pipefail` sees that as it does
/// for those tools. No message: the reader left on purpose.
///
/// Rust ignores SIGPIPE, so such a write fails with `BrokenPipe` (and
/// `println!` would panic on it); every command writes its output through
/// `outln!` and `out!`, which turn that error into [`StdoutClosed`],
/// and `main` into this exit. SIGPIPE itself stays ignored in every
/// command, `gyre node` and `gyre dev` included: a peer that closes a
/// socket must give its writer EPIPE, never kill the process.
const STDOUT_CLOSED_EXIT: i32 = 128 + libc::SIGPIPE;

/// Standard output was closed by its reader (see [`STDOUT_CLOSED_EXIT`]).
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes to stdout and flushes: `Err(StdoutClosed)` if its reader is gone,
/// another error (a full disk under `> file`) with what was being written.
fn write_stdout(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    write_bytes_stdout(|out| out.write_fmt(args))
}

/// [`write_stdout`] for whatever `write` writes to the locked stdout.
fn write_bytes_stdout(
    write: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// Writes a message to stderr, ignoring failure (a closed stderr must not
/// panic the command, as `eprintln!` would, nor stop `gyre dev` from
/// stopping its nodes).
fn write_stderr(args: std::fmt::Arguments<'_>) {
    // One write for the whole message: stderr is unbuffered, so
    // `write_fmt` writes each piece apart, and `gyre dev`'s nodes write to
    // the same file: "gyre dev: " and "n2 stopped" came out with a node's
    // line between them.
    let _ = std::io::stderr().lock().write_all(args.to_string().as_bytes());
}

/// `println!` that returns `Err(StdoutClosed)` instead of panicking when
/// stdout's reader is gone (see [`STDOUT_CLOSED_EXIT`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!`, as `outln!`.
macro_rules! out {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics (see [`write_stderr`]).
macro_rules! note {
    ($($arg:tt)*) => {
        write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Node(args) => node(args),
        Command::Put { key, value, value_file, context, client } => {
            let value = match (value, value_file) {
                (_, Some(path)) => read_value(&path)?,
                (Some(value), None) => std::os::unix::ffi::OsStringExt::into_vec(value),
                (None, None) => unreachable!("clap requires VALUE or --value-file"),
            };
            let put = written(&key, connect(&client)?.put(key.as_bytes(), &value, &context))?;
            if client.json {
                outln!("{}", serde_json::json!({ "context": put.context.to_string(), "siblings": put.siblings }))?;
            } else {
                outln!("{}", put.context)?;
                if put.siblings > 1 {
                    note!("note: {KEY} now has {} siblings (a concurrent write)", put.siblings, KEY = key);
                }
            }
            Ok(())
        }
        Command::Get { key, raw, sibling, client } => {
            let got = connect(&client)?.get(key.as_bytes())?;
            if raw {
                let value = pick_sibling(&key, &got.values, sibling)?;
                write_bytes_stdout(|out| out.write_all(value))?;
                note!("context: {}", got.context);
                return Ok(());
            }
            let values: Vec<String> = got.values.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect();
            let binary: Vec<usize> =
                (0..got.values.len()).filter(|&i| std::str::from_utf8(&got.values[i]).is_err()).collect();
            if client.json {
                let mut out = serde_json::json!({ "values": values, "context": got.context.to_string() });
                if !binary.is_empty() {
                    let hex: Vec<String> = got.values.iter().map(|v| VersionContext(v.clone()).to_string()).collect();
                    out["values_hex"] = serde_json::json!(hex);
                }
                outln!("{out}")?;
            } else {
                if values.is_empty() {
                    note!("(not found)");
                }
                for v in &values {
                    outln!("{v}")?;
                }
                for i in binary {
                    note!(
                        "note: value {i} is not UTF-8 (shown with replacement characters); \
                         `--raw --sibling {i}` writes its exact bytes"
                    );
                }
                note!("context: {}", got.context);
            }
            Ok(())
        }
        Command::Delete { key, context, client } => {
            let mut c = connect(&client)?;
            let (ctx, found) = match context {
                Some(context) => (written(&key, c.delete(key.as_bytes(), &context))?, None),
                None => {
                    let got = c.get(key.as_bytes())?;
                    if got.values.is_empty() {
                        (got.context, Some(false))
                    } else {
                        (written(&key, c.delete(key.as_bytes(), &got.context))?, Some(true))
                    }
                }
            };
            if client.json {
                let mut out = serde_json::json!({ "context": ctx.to_string() });
                if let Some(found) = found {
                    out["found"] = serde_json::json!(found);
                }
                outln!("{out}")?;
            } else if found == Some(false) {
                note!("{key}: not found, nothing deleted");
            } else {
                outln!("{ctx}")?;
            }
            Ok(())
        }
        Command::Ping { client } => {
            let info = connect(&client)?.ping()?;
            let out = serde_json::json!({
                "node_id": format!("{:016x}", info.node_id),
                "partitions": info.partitions,
                "shard": info.shard,
                "ports": info.ports,
            });
            outln!("{out}")?;
            Ok(())
        }
        Command::Stats { shard, client } => {
            let stats = connect(&client)?.stats(shard)?;
            let v: serde_json::Value = serde_json::from_str(&stats)?;
            outln!("{}", serde_json::to_string_pretty(&v)?)?;
            Ok(())
        }
        Command::Dev(args) => dev(args),
        Command::Ring { cluster, client } => {
            let (ring, n) = match cluster {
                Some(path) => {
                    let (file, ring) = gyre::node::cluster::ClusterFile::load(&path)?;
                    (ring, file.n)
                }
                None => {
                    let view = connect(&client)?.fetch_ring()?;
                    (view.ring, view.n as usize)
                }
            };
            if client.json {
                let members: Vec<_> = ring
                    .members()
                    .iter()
                    .zip(ring.owned_counts())
                    .zip(ring.replica_counts(n))
                    .map(|((m, owned), replicas)| {
                        serde_json::json!({
                            "name": m.name, "addr": m.addr.to_string(), "zone": m.zone,
                            "partitions": owned, "replica_partitions": replicas,
                        })
                    })
                    .collect();
                let out = serde_json::json!({
                    "version": ring.version(), "partitions": ring.partitions(), "n": n, "members": members,
                });
                outln!("{}", serde_json::to_string_pretty(&out)?)?;
            } else {
                out!("{}", ring.describe(n))?;
            }
            Ok(())
        }
        Command::Check { data_dir, repair } => check(&data_dir, repair),
        Command::StorageWriter { data_dir, fsync, writers, value_size, segment_size } => {
            let config = EngineConfig { fsync, segment_size, max_value_len: 64 * 1024, ..Default::default() };
            storage_writer(data_dir, config, writers, value_size)
        }
    }
}

/// A write's outcome, where a failure that may have left the write stored
/// says so ([`ClientError::write_may_have_landed`]): running the command
/// again can add a sibling (found by a review: a timeout said only that no
/// reply came).
fn written<T>(key: &str, outcome: Result<T, ClientError>) -> anyhow::Result<T> {
    outcome.map_err(|e| {
        let landed = e.write_may_have_landed();
        let e = anyhow::Error::new(e);
        if landed {
            e.context(format!("the write of {key} may have been stored: read it before writing again"))
        } else {
            e
        }
    })
}

#[derive(clap::Args)]
struct NodeArgs {
    /// TOML configuration file (every setting has a default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address of shard 0; shard i listens on port + i [default: 127.0.0.1:7700].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Shards (pinned executors) [default: every available core; fixed at creation].
    #[arg(long)]
    shards: Option<usize>,
    /// When writes are acknowledged: always | interval(MS) | never [default: always].
    #[arg(long)]
    fsync: Option<FsyncPolicy>,
    /// Largest value accepted, in bytes [default: 1048576].
    #[arg(long)]
    max_value_len: Option<usize>,
    /// Memory the record caches may take, in bytes, split across the
    /// shards (0: none) [default: a quarter of the memory available].
    #[arg(long)]
    cache_bytes: Option<u64>,
    /// Free space under which writes are refused while compaction reclaims
    /// space, in bytes (0: none) [default: 4 segments a shard, at most a
    /// tenth of the file system but never under 3 segments a shard].
    #[arg(long)]
    disk_reserve_bytes: Option<u64>,
    /// Client connections each shard serves at once; the next is refused
    /// (Overloaded) [default: 10000].
    #[arg(long)]
    max_connections: Option<u64>,
    /// Seconds a connection may be silent before TCP keepalive probes it;
    /// dead clients are closed (0: off) [default: 300].
    #[arg(long)]
    tcp_keepalive: Option<u64>,
    /// Do not pin shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Microseconds an idle shard spins before it sleeps [default: 0].
    #[arg(long)]
    spin_us: Option<u64>,
    /// Refuse writes whose context is in an older node's format (not bound
    /// to its key), once no client holds one from before an upgrade.
    #[arg(long)]
    refuse_unbound_contexts: bool,
    /// Milliseconds a client may leave a frame it began unfinished, sending
    /// nothing, before its connection is closed (0: never) [default: 30000].
    #[arg(long)]
    frame_timeout_ms: Option<u64>,
    /// Cluster file: run as a member of that cluster (see `gyre dev`).
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// This node's name in the cluster file [default: the node whose address is --listen].
    #[arg(long)]
    name: Option<String>,
    /// File holding the cluster secret (at least 16 bytes; every member the
    /// same): contexts are signed, and replica messages are taken only from
    /// members that prove they hold it.
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
    /// Another secret file whose contexts and proofs are accepted too
    /// (repeat for more; added to the config file's list): moving a
    /// cluster to a new secret member by member.
    #[arg(long, value_name = "FILE")]
    accept_cluster_secret_file: Vec<PathBuf>,
    /// With a secret, also take unsigned contexts and members that prove
    /// nothing: only while turning a cluster's secret on, member by member.
    #[arg(long)]
    accept_unauthenticated: bool,
}

#[derive(clap::Args)]
struct DevArgs {
    /// Nodes in a new cluster [default: 3]; an existing one keeps its own
    /// (one given that differs is refused).
    #[arg(long)]
    nodes: Option<usize>,
    /// Directory of the cluster file and of each node's data (DIR/n1, ...).
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Port of every node (each has its own loopback address).
    #[arg(long, default_value_t = 7700)]
    port: u16,
    /// Shards per node [default: a new node, the CPUs / nodes, at least 1;
    /// a node whose directory exists, the count it was made with].
    #[arg(long)]
    shards: Option<usize>,
    /// Replicas per key, and the default read and write quorums, of a new
    /// cluster [default: N=3, R=2, W=2, each at most the nodes (and R and
    /// W at most N); one given is taken as it is, and a cluster it does
    /// not fit is refused].
    #[arg(short = 'n', long)]
    replicas: Option<usize>,
    #[arg(short = 'r', long)]
    read_quorum: Option<usize>,
    #[arg(short = 'w', long)]
    write_quorum: Option<usize>,
    /// Durability of each node: always | interval(MS) | never.
    #[arg(long, default_value = "always")]
    fsync: FsyncPolicy,
    /// Seconds the nodes get to stop after SIGTERM before they are killed
    /// [default: DEV_STOP_GRACE, 15]. Hidden: the tests shorten it.
    #[arg(long, hide = true, value_name = "SECONDS", value_parser = parse_timeout)]
    stop_grace: Option<Duration>,
    /// Run the nodes without the cluster secret (`DIR/cluster.secret`):
    /// contexts unsigned, replica messages taken from anyone. For
    /// measuring what the secret costs; not for a cluster others can reach.
    #[arg(long)]
    no_secret: bool,
}

fn node(args: NodeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::default(),
    };
    config.data_dir = args.data_dir.unwrap_or(config.data_dir);
    config.listen = args.listen.unwrap_or(config.listen);
    config.shards = args.shards.or(config.shards);
    config.fsync = args.fsync.unwrap_or(config.fsync);
    config.max_value_len = args.max_value_len.unwrap_or(config.max_value_len);
    config.cache_bytes = args.cache_bytes.or(config.cache_bytes);
    config.disk_reserve_bytes = args.disk_reserve_bytes.or(config.disk_reserve_bytes);
    config.max_connections = args.max_connections.unwrap_or(config.max_connections);
    config.tcp_keepalive = args.tcp_keepalive.unwrap_or(config.tcp_keepalive);
    config.pin &= !args.no_pin;
    config.spin_before_park_us = args.spin_us.unwrap_or(config.spin_before_park_us);
    config.accept_unbound_contexts &= !args.refuse_unbound_contexts;
    config.frame_timeout_ms = args.frame_timeout_ms.unwrap_or(config.frame_timeout_ms);
    config.cluster = args.cluster.or(config.cluster);
    config.name = args.name.or(config.name);
    config.cluster_secret_file = args.cluster_secret_file.or(config.cluster_secret_file);
    config.accept_cluster_secret_files.extend(args.accept_cluster_secret_file);
    config.accept_unauthenticated |= args.accept_unauthenticated;
    let shutdown = shutdown_flag()?;
    let data_dir = config.data_dir.clone();
    gyre::node::run(config, shutdown, |started| {
        let addrs: Vec<String> = started.addrs.iter().map(ToString::to_string).collect();
        tracing::info!(node_id = format!("{:016x}", started.node_id), ?addrs, data_dir = %data_dir.display(), "node ready");
        // A node's stdout may be a pipe nobody reads any more (`gyre dev`
        // killed): the node goes on serving all the same.
        let _ = outln!("gyre node {:016x} ready: {}", started.node_id, addrs.join(" "));
    })?;
    note!("gyre node stopped cleanly");
    Ok(())
}

/// How long `gyre dev` waits for its nodes to exit after SIGTERM before it
/// kills them (SIGKILL): a node's own shutdown grace (`SHUTDOWN_GRACE` in
/// src/node/mod.rs, 10 s, for its connections to take their last replies)
/// and 5 s more to flush and sync its log and exit. A node that has not
/// exited by then is hung (stopped, or stuck), not slow. `--stop-grace`
/// (hidden) overrides it.
const DEV_STOP_GRACE: Duration = Duration::from_secs(15);

/// How long `gyre dev` waits for a node it killed to be reaped before it
/// gives up on it (a process in an uninterruptible sleep dies only once
/// the kernel lets it).
const DEV_KILL_WAIT: Duration = Duration::from_secs(5);

/// What in `dir` (with no `cluster.toml`) is a node's or a shard's data.
fn lone_node_data(dir: &Path) -> anyhow::Result<Option<String>> {
    if let Some(data) = gyre::node::config::node_data(dir)? {
        return Ok(Some(data.describe()));
    }
    gyre::node::config::other_gyre_data(dir)
}

/// Nodes of a new `gyre dev` cluster unless `--nodes` says.
const DEV_NODES: usize = 3;

/// The cluster secret of a `gyre dev` cluster, beside its `cluster.toml`:
/// made with the directory (or for one from before it), kept across
/// restarts, owner-only.
const DEV_SECRET: &str = "cluster.secret";

/// `gyre dev`: writes (or reuses) `DIR/cluster.toml`, starts one node
/// process per member, prints where they are, and stops them all on
/// SIGINT or SIGTERM: SIGTERM to each node, then [`DEV_STOP_GRACE`] for
/// them to exit; a node still running after that, or when a second SIGINT
/// or SIGTERM arrives, is killed, and `gyre dev` exits 1. On Linux each
/// node also gets SIGTERM if `gyre dev` dies without stopping it
/// (`kill -9`): see [`die_with_parent`].
fn dev(args: DevArgs) -> anyhow::Result<()> {
    use gyre::node::cluster::{ClusterFile, NodeEntry};
    if args.nodes.is_some_and(|n| n == 0 || n > 250) {
        bail!("--nodes must be between 1 and 250 (one loopback address each)");
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let path = args.data_dir.join("cluster.toml");
    let file = if path.exists() {
        let (file, _) = ClusterFile::load(&path)?;
        // Its port, N, R and W stand; the flags shape only a new cluster.
        note!("gyre dev: reusing {} (remove {} for a new cluster)", path.display(), args.data_dir.display());
        // Only a count given that differs is refused: the default is for a
        // new cluster (a review found it refused every reuse of a cluster
        // of another size, the README saying it is reused as it is).
        if let Some(nodes) = args.nodes.filter(|&n| n != file.nodes.len()) {
            bail!(
                "{} describes a {}-node cluster, not {nodes}; use another --data-dir or remove it",
                path.display(),
                file.nodes.len(),
            );
        }
        file
    } else {
        // A lone node's directory (`gyre node` and `gyre dev` both default
        // to ./data) is not a cluster's: the members would live beside its
        // data, and `gyre check` would see only the node.
        if let Some(what) = lone_node_data(&args.data_dir)? {
            bail!(
                "{} holds {what}, not a `gyre dev` cluster: give the cluster another --data-dir, or move that away",
                args.data_dir.display()
            );
        }
        let count = args.nodes.unwrap_or(DEV_NODES);
        // Defaults fit the cluster; a value given is not quietly changed
        // (`-n 5` on three nodes made N=3; found by a review).
        let n = args.replicas.unwrap_or(3.min(count));
        let nodes = (1..=count)
            .map(|i| NodeEntry {
                name: format!("n{i}"),
                addr: std::net::SocketAddr::from(([127, 0, 0, i as u8], args.port)),
                zone: None,
            })
            .collect();
        let file = ClusterFile {
            partitions: gyre::core::partition::DEFAULT_PARTITIONS,
            n,
            r: args.read_quorum.unwrap_or(2.min(n)),
            w: args.write_quorum.unwrap_or(2.min(n)),
            nodes,
            namespaces: Vec::new(),
        };
        file.validate()?;
        std::fs::write(&path, file.to_toml()).with_context(|| format!("writing {}", path.display()))?;
        file
    };
    // Members prove this secret to each other and sign their contexts.
    let secret = args.data_dir.join(DEV_SECRET);
    if !args.no_secret {
        gyre::auth::create_secret_file(&secret)?;
    }
    let cores = gyre::node::allowed_cpus().len();
    let default_shards = (cores / file.nodes.len()).max(1);
    // The nodes share the machine's memory as they share its cores: each
    // takes its part of the one node's default cache.
    let cache = gyre::node::config::default_node_cache_bytes(gyre::node::memory::available())
        .map(|b| b / file.nodes.len() as u64);
    let grace = args.stop_grace.unwrap_or(DEV_STOP_GRACE);
    let signals = signal_counter()?;
    let exe = std::env::current_exe().context("finding the gyre executable")?;
    let me = std::process::id() as libc::pid_t;
    let mut children: Vec<(String, std::process::Child)> = Vec::new();
    // A stop asked for while the nodes start (SIGTERM to `gyre dev` alone)
    // is taken between nodes and while one starts: it waited for every
    // node to be up, or for ever if a start hung (found by a review).
    let stopped_while_starting = |children: &mut Vec<(String, std::process::Child)>| {
        note!("gyre dev: stopping {} nodes before all started", children.len());
        let failed = stop_nodes(children, grace, &signals, 1);
        match failed.is_empty() {
            true => Ok(()),
            false => Err(anyhow::anyhow!("not every node stopped cleanly: {}", failed.join("; "))),
        }
    };
    for node in &file.nodes {
        if signals.load(Ordering::SeqCst) > 0 {
            return stopped_while_starting(&mut children);
        }
        let data = args.data_dir.join(&node.name);
        let mut command = std::process::Command::new(&exe);
        command
            .args(["node", "--cluster"])
            .arg(&path)
            .args(["--name", &node.name, "--data-dir"])
            .arg(&data)
            .args(["--fsync", &args.fsync.to_string(), "--no-pin"])
            .stdout(std::process::Stdio::piped());
        if !args.no_secret {
            command.arg("--cluster-secret-file").arg(&secret);
        }
        // A node's directory keeps the shard count it was made with: a
        // restart passes one only if asked (a different one is refused).
        let made = data.join(gyre::node::config::NODE_FILE).exists();
        if let Some(shards) = args.shards.or((!made).then_some(default_shards)) {
            command.args(["--shards", &shards.to_string()]);
        }
        if let Some(bytes) = cache {
            command.args(["--cache-bytes", &bytes.to_string()]);
        }
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe system calls (see die_with_parent).
        unsafe { std::os::unix::process::CommandExt::pre_exec(&mut command, move || die_with_parent(me)) };
        let spawned = command.spawn().with_context(|| format!("starting node {}", node.name));
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let now = signals.load(Ordering::SeqCst);
                stop_nodes(&mut children, grace, &signals, now);
                return Err(e);
            }
        };
        // The node's first line says it is ready; the rest is drained.
        let stdout = child.stdout.take().expect("piped");
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            let _ = first_tx.send(lines.next().and_then(Result::ok));
            lines.for_each(drop);
        });
        children.push((node.name.clone(), child));
        let ready = loop {
            match first_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => break line.filter(|l| l.contains(" ready: ")),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break None,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if signals.load(Ordering::SeqCst) > 0 => {
                    return stopped_while_starting(&mut children);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
        };
        let Some(ready) = ready else {
            let now = signals.load(Ordering::SeqCst);
            stop_nodes(&mut children, grace, &signals, now);
            bail!("node {} did not start (its log is above)", node.name);
        };
        note!("gyre dev: {} {ready}", node.name);
    }
    let addrs: Vec<String> = file.nodes.iter().map(|n| n.addr.to_string()).collect();
    // Nobody may be reading stdout (`gyre dev | head -1`): the cluster
    // runs on regardless, and stops on a signal as ever.
    let _ = outln!("gyre dev ready: {}", addrs.join(" "));
    let _ = outln!(
        "{} nodes, N={} R={} W={}, cluster file {}; try: gyre put hello world --node {}",
        file.nodes.len(),
        file.n,
        file.r,
        file.w,
        path.display(),
        addrs[0]
    );
    // Nodes that ended other than by a clean stop: they make `gyre dev`
    // fail, once the others are stopped.
    let mut failed = Vec::new();
    // Failures already said.
    let mut said = 0;
    while signals.load(Ordering::SeqCst) == 0 {
        children.retain_mut(|(name, c)| match c.try_wait() {
            Ok(Some(status)) => {
                failed.push(format!("{name} exited while running ({status})"));
                false
            }
            _ => true,
        });
        if failed.len() > said {
            // Nothing left to run: it stayed up with no node (found by a
            // review).
            if children.is_empty() {
                bail!("every node has exited: {}", failed.join("; "));
            }
            for f in &failed[said..] {
                note!("gyre dev: node {f}; {} keep running", children.len());
            }
            said = failed.len();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    note!("gyre dev: stopping {} nodes", children.len());
    // The stop's own signal is the first: any later one is a second,
    // even if it came before this looked (found by a review: two signals
    // close together were taken for one).
    failed.extend(stop_nodes(&mut children, grace, &signals, 1));
    if !failed.is_empty() {
        bail!("not every node stopped cleanly: {}", failed.join("; "));
    }
    Ok(())
}

/// Stops `gyre dev`'s nodes: SIGTERM to each, then up to `grace` for them
/// to exit. Those still running past it, or once `signals` counts more
/// than `seen` SIGINTs and SIGTERMs, are killed (SIGKILL), said on
/// stderr, and reaped (each for up to [`DEV_KILL_WAIT`]). Returns what
/// went wrong with each node that did not exit 0 on SIGTERM (it failed, or
/// was killed); `children` is left empty.
fn stop_nodes(
    children: &mut Vec<(String, std::process::Child)>,
    grace: Duration,
    signals: &AtomicUsize,
    seen: usize,
) -> Vec<String> {
    for (_, c) in children.iter() {
        // SAFETY: kill(2) on a child we started and have not reaped (its
        // pid cannot have been reused); no memory is involved.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    let mut failed = Vec::new();
    let why = loop {
        reap(children, |name, status| match status {
            Ok(s) if s.success() => note!("gyre dev: {name} stopped"),
            Ok(s) => {
                note!("gyre dev: {name} exited with {s}");
                failed.push(format!("{name} exited with {s}"));
            }
            Err(e) => {
                note!("gyre dev: waiting for {name}: {e}");
                failed.push(format!("{name}: {e}"));
            }
        });
        if children.is_empty() {
            return failed;
        }
        if signals.load(Ordering::SeqCst) > seen {
            break "a second signal: not waiting".to_string();
        }
        if Instant::now() >= deadline {
            break format!("not stopped {:.1} s after SIGTERM", grace.as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for (name, c) in children.iter_mut() {
        note!("gyre dev: {name} (pid {}) {why}; killing it", c.id());
        let _ = c.kill();
        failed.push(format!("{name} killed: {why}"));
    }
    let deadline = Instant::now() + DEV_KILL_WAIT;
    loop {
        reap(children, |name, status| match status {
            Ok(s) => note!("gyre dev: {name} killed ({s})"),
            Err(e) => note!("gyre dev: waiting for {name}: {e}"),
        });
        if children.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for (name, c) in children.drain(..) {
                note!("gyre dev: {name} (pid {}) has not exited {DEV_KILL_WAIT:?} after SIGKILL; leaving it", c.id());
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    failed
}

/// Removes from `children` each one that has exited (or cannot be waited
/// for), telling `report` how it ended.
fn reap(
    children: &mut Vec<(String, std::process::Child)>,
    mut report: impl FnMut(&str, std::io::Result<std::process::ExitStatus>),
) {
    children.retain_mut(|(name, c)| match c.try_wait() {
        Ok(None) => true,
        Ok(Some(status)) => {
            report(name, Ok(status));
            false
        }
        Err(e) => {
            report(name, Err(e));
            false
        }
    });
}

/// Runs in a `gyre dev` node between fork and exec: asks the kernel for
/// SIGTERM when `gyre dev` dies (`PR_SET_PDEATHSIG`), so that a `kill -9`
/// of `gyre dev` stops its nodes (cleanly: SIGTERM) instead of leaving
/// them running. If `gyre dev` died before the request was made, the
/// signal would never come: the node is then not started (its parent is
/// no longer `parent`). The signal comes when the thread that started the
/// node exits; `gyre dev` starts its nodes from its main thread, which
/// lives as long as the process.
///
/// Only async-signal-safe calls here (the child of a multi-threaded
/// process): prctl, getppid, and no allocation.
fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl(2) with integer arguments; no memory is involved.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: getppid(2) cannot fail and touches no memory.
    if unsafe { libc::getppid() } != parent {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// A flag that SIGTERM and SIGINT set.
fn shutdown_flag() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, flag.clone()).context("installing signal handlers")?;
    }
    Ok(flag)
}

/// How many SIGTERM and SIGINT signals have arrived (`gyre dev` stops its
/// nodes on the first, and kills them on the next).
fn signal_counter() -> anyhow::Result<Arc<AtomicUsize>> {
    let count = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let count = count.clone();
        // SAFETY: the handler only increments an atomic, which is
        // async-signal-safe (no allocation, no lock).
        unsafe {
            signal_hook::low_level::register(sig, move || {
                count.fetch_add(1, Ordering::SeqCst);
            })
        }
        .context("installing signal handlers")?;
    }
    Ok(count)
}

fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    // A connection (and its first PING) gets at most the client's default
    // connect timeout, and never the whole call: a stopped node must leave
    // time for the next replica.
    let connect_timeout = ClientConfig::default().connect_timeout.min(args.timeout / 2);
    let config = ClientConfig { request_timeout: args.timeout, connect_timeout, ..Default::default() };
    // Each address in turn: with the default alone, a cluster whose
    // 127.0.0.1:7700 was stopped could not be reached at all, though its
    // other members serve every key (found by a review).
    let addrs: Vec<&str> = args.node.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    let mut failed = Vec::new();
    for &addr in &addrs {
        match Client::connect_with(addr, config.clone()) {
            Ok(client) => return Ok(client),
            // One address: its error as it is, with its cause.
            Err(e) if addrs.len() == 1 => return Err(e).with_context(|| format!("connecting to {addr}")),
            Err(e) => failed.push(format!("{addr}: {e}")),
        }
    }
    match failed.len() {
        0 => bail!("--node names no address"),
        _ => bail!("connecting to each of --node failed:\n  {}", failed.join("\n  ")),
    }
}

/// The shortest and the longest `--timeout`, in seconds.
const TIMEOUT_RANGE: std::ops::RangeInclusive<f64> = 0.001..=86_400.0;

/// Parses `--timeout`: seconds, finite, within `TIMEOUT_RANGE` (0 would
/// wait for nothing, and a deadline far away overflows the clock).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !TIMEOUT_RANGE.contains(&secs) {
        return Err(format!(
            "{s} is not a timeout: give seconds from {} to {}",
            TIMEOUT_RANGE.start(),
            TIMEOUT_RANGE.end()
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s} is not a timeout: {e}"))
}

/// The value `put --value-file PATH` stores: the file's bytes (`-`:
/// standard input's), at most the protocol's cap.
fn read_value(path: &Path) -> anyhow::Result<Vec<u8>> {
    let (what, source): (String, Box<dyn Read>) = if path == Path::new("-") {
        ("standard input".into(), Box::new(std::io::stdin().lock()))
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        (path.display().to_string(), Box::new(file))
    };
    let mut value = Vec::new();
    source.take(VALUE_LEN_HARD_CAP as u64 + 1).read_to_end(&mut value).with_context(|| format!("reading {what}"))?;
    if value.len() > VALUE_LEN_HARD_CAP {
        bail!("{what} holds more than {VALUE_LEN_HARD_CAP} bytes, the largest value Gyre stores");
    }
    Ok(value)
}

/// The value `get --raw` writes: the only one, or sibling `sibling`.
fn pick_sibling<'a>(key: &str, values: &'a [Vec<u8>], sibling: Option<usize>) -> anyhow::Result<&'a [u8]> {
    match (values.len(), sibling) {
        (0, _) => bail!("{key}: not found"),
        (n, Some(i)) => match values.get(i) {
            Some(v) => Ok(v),
            None => bail!("{key} has {n} value(s): --sibling {i} is not one of 0 to {}", n - 1),
        },
        (1, None) => Ok(&values[0]),
        (n, None) => bail!(
            "{key} has {n} siblings (concurrent writes): pick one with --sibling 0 to {}, or see them all with --json",
            n - 1
        ),
    }
}

/// What `gyre check` reads: a `gyre dev` directory (`cluster.toml` and a
/// node directory per member), a node's data directory (`NODE` and a
/// `shard-NNN` directory per shard), or one shard's directory
/// (`GYRE_FORMAT`, segments and hints).
enum CheckTarget {
    /// Its members' directories, in order.
    Cluster(Vec<(PathBuf, NodeDirInfo)>),
    Node(NodeDirInfo),
    Shard,
}

/// A node data directory as `gyre check` sees it.
struct NodeDirInfo {
    /// Partitions and shards, from its `NODE` file (absent: unknown).
    partitions: Option<u32>,
    shards: Option<usize>,
    /// Its `shard-NNN` directories, in order.
    shard_dirs: Vec<PathBuf>,
}

/// Whether `dir` has a `NODE` file (of any kind, as a start sees it: one
/// that is not a readable file then fails to read).
fn is_node_dir(dir: &Path) -> bool {
    gyre::node::config::node_data(dir).ok().flatten() == Some(gyre::node::config::NodeData::Node)
}

/// The `shard-*` directories of a node's data directory `dir`, sorted.
fn shard_dirs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(gyre::node::config::shard_entries(dir)?.into_iter().filter(|p| p.is_dir()).collect())
}

/// `dir`, found to hold `data`, as `gyre check` sees it.
fn node_dir_info(dir: &Path, data: &gyre::node::config::NodeData) -> anyhow::Result<NodeDirInfo> {
    // A NODE file that is there must be one a start would take: its
    // partition count decides how a repair opens the shards.
    let has_node_file = *data == gyre::node::config::NodeData::Node;
    let node = has_node_file.then(|| gyre::node::config::read_node_file(dir)).transpose()?;
    Ok(NodeDirInfo {
        partitions: node.as_ref().map(|n| n.partitions),
        shards: node.as_ref().map(|n| n.shards),
        shard_dirs: shard_dirs(dir)?,
    })
}

fn check_target(dir: &Path) -> anyhow::Result<CheckTarget> {
    use gyre::storage::format::FORMAT_FILE;
    if dir.join(FORMAT_FILE).exists() {
        return Ok(CheckTarget::Shard);
    }
    if let Some(data) = gyre::node::config::node_data(dir)? {
        return Ok(CheckTarget::Node(node_dir_info(dir, &data)?));
    }
    if dir.join("cluster.toml").is_file() {
        // The members the file names (all, if it cannot be read): one of
        // them that cannot be read is an error, anything else unreadable
        // (a mounted disk's `lost+found`) is no member's (found by a
        // review: an unreadable member was left out, and the check passed).
        let named: Option<Vec<String>> = gyre::node::cluster::ClusterFile::load(&dir.join("cluster.toml"))
            .ok()
            .map(|(file, _)| file.nodes.into_iter().map(|n| n.name).collect());
        let mut nodes = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let member = named.as_ref().is_none_or(|named| named.contains(&name));
            match gyre::node::config::node_data(&path) {
                Ok(Some(data)) => {
                    let info = node_dir_info(&path, &data)?;
                    nodes.push((path, info));
                }
                Ok(None) => {}
                Err(e) if member => return Err(e),
                Err(_) => {}
            }
        }
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(CheckTarget::Cluster(nodes));
    }
    bail!(
        "{} is not a Gyre data directory (no {FORMAT_FILE} file of a shard, no {} file or shard-NNN directories of a \
         node, no cluster.toml of `gyre dev`)",
        dir.display(),
        gyre::node::config::NODE_FILE
    )
}

/// `gyre check`: read-only unless `repair`. Prints one JSON report and
/// exits 1 if a shard holds corruption (or could not be checked or
/// repaired), a shard is missing or went back since the clean stop, shard
/// data has no `NODE` file, or a repair left the node's `CLEAN` mark it
/// had to remove.
fn check(dir: &Path, repair: bool) -> anyhow::Result<()> {
    let mode = if repair { "repair" } else { "check" };
    let mut failed = false;
    let out = match check_target(dir)? {
        CheckTarget::Shard => {
            // A shard directory inside a node's: that node's partitions.
            // (From the canonical path: `.` or `shard-000` has no parent
            // to find the node by.)
            let canonical = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
            let node = canonical.parent().filter(|p| is_node_dir(p));
            let partitions = node.map(gyre::node::config::read_node_file).transpose()?.map(|n| n.partitions);
            let _lock = match node {
                Some(node) if repair => lock_node_dir(node)?,
                _ => None,
            };
            let (mut report, clean_removed) =
                check_shards(&[dir.to_path_buf()], partitions, repair, node, &mut failed)?;
            let mut report = report.pop().expect("one shard");
            report["mode"] = mode.into();
            report["clean_mark_removed"] = clean_removed.into();
            report
        }
        CheckTarget::Node(info) => {
            let mut report = check_node(dir, info, repair, &mut failed)?;
            report["mode"] = mode.into();
            report
        }
        CheckTarget::Cluster(nodes) => {
            let mut reports = Vec::new();
            for (node, info) in nodes {
                reports.push(check_node(&node, info, repair, &mut failed)?);
            }
            serde_json::json!({ "data_dir": dir, "mode": mode, "nodes": reports })
        }
    };
    outln!("{}", serde_json::to_string_pretty(&out)?)?;
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

/// Checks (or repairs) every shard of the node directory `dir`. A repair
/// holds the node's LOCK throughout: no node may start on it meanwhile.
fn check_node(dir: &Path, info: NodeDirInfo, repair: bool, failed: &mut bool) -> anyhow::Result<serde_json::Value> {
    let _lock = if repair { Some(lock_node_dir(dir)?) } else { None };
    // Read before the shards' check, which under --repair may remove it
    // (found by a read-through: shards that went back were then missed).
    let clean = info.shards.and_then(|n| gyre::node::config::read_clean_seqs(dir, n));
    let (shards, clean_removed) = check_shards(&info.shard_dirs, info.partitions, repair, Some(dir), failed)?;
    // Shard directories the NODE file promises but that are not there (a
    // node creates them at its start; their data, if any, is gone).
    let missing: Vec<String> = gyre::node::config::missing_shard_dirs(dir, info.shards.unwrap_or(0))
        .into_iter()
        .map(gyre::node::config::shard_dir_name)
        .collect();
    // A start takes this for lost data (and a new actor): so does the check.
    *failed |= !missing.is_empty();
    // Shard data without its NODE file: a start refuses it, and so does
    // the check (found by a review: it passed, and a `gyre dev`
    // directory's member without one was left out of the report).
    let node_file_missing = info.shards.is_none();
    *failed |= node_file_missing;
    // Shards holding fewer records than at the clean stop (an emptied
    // directory, removed segments): a start takes that for lost data, and
    // renews the actor; so the check fails on it (a review found it
    // passed).
    let gone_back: Vec<serde_json::Value> = clean.map_or_else(Vec::new, |clean| {
        // Each shard's last sequence number as its check recovered it (one
        // not checked, missing or unreadable, is reported elsewhere).
        let recovered: Vec<u64> = (0..clean.len())
            .map(|i| {
                let path = dir.join(gyre::node::config::shard_dir_name(i));
                shards
                    .iter()
                    .find(|r| r["data_dir"].as_str() == path.to_str())
                    .and_then(|r| r["recovery"]["next_seq"].as_u64())
                    .map_or(u64::MAX, |next| next.saturating_sub(1))
            })
            .collect();
        gyre::node::config::shards_gone_back(&clean, &recovered)
            .into_iter()
            .map(|(i, had, now)| {
                let shard = gyre::node::config::shard_dir_name(i);
                serde_json::json!({ "shard": shard, "last_seq_at_clean_stop": had, "last_seq_now": now })
            })
            .collect()
    });
    *failed |= !gone_back.is_empty();
    Ok(serde_json::json!({
        "data_dir": dir,
        "node": { "shards": info.shards, "partitions": info.partitions },
        "node_file_missing": node_file_missing,
        "shards_gone_back": gone_back,
        "missing_shards": missing,
        "shards": shards,
        "clean_mark_removed": clean_removed,
    }))
}

/// Locks a node directory as a starting node does (its LOCK file,
/// exclusively), or fails if a node holds it.
fn lock_node_dir(dir: &Path) -> anyhow::Result<Option<std::fs::File>> {
    let path = dir.join(gyre::node::config::LOCK_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("{} is in use by a running gyre node: stop it before --repair", dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Whether a process (a node's shard) holds the LOCK of shard directory
/// `dir`. Only probed (a shared lock, released at once): nothing is
/// created or written.
fn shard_in_use(dir: &Path) -> bool {
    let Ok(file) = std::fs::File::open(dir.join(gyre::storage::backend::glommio::LOCK_FILE)) else {
        return false;
    };
    matches!(file.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock))
}

/// The engine settings a repair opens a shard with: the node's partitions,
/// and, when the shard has a spare segment of a size a segment can have,
/// that size with a policy that keeps a spare. The directory records
/// neither the segment size nor the fsync policy it was written with, and
/// `Engine::open` removes a spare that does not match its settings: the
/// defaults would delete the spare of a node run with another
/// `segment_size`, or under `fsync = never` (which keeps none). Nothing
/// else in these settings changes what an open does to the directory; the
/// repair stores nothing, so the largest value is 0 (any segment size a
/// segment can have passes the check that a largest record fits).
fn repair_config(partitions: Option<u32>, spare: Option<u64>) -> EngineConfig {
    let base = EngineConfig {
        partitions: partitions.unwrap_or(gyre::core::partition::DEFAULT_PARTITIONS),
        ..EngineConfig::default()
    };
    let Some(size) = spare else { return base };
    let config = EngineConfig {
        segment_size: size,
        max_value_len: 0,
        fsync: FsyncPolicy::Always,
        preallocate: true,
        ..base.clone()
    };
    if config.validate().is_ok() {
        config
    } else {
        base
    }
}

/// Checks each shard directory: read-only (see [`check_shard`]), then, with
/// `repair`, opened as a node's start opens it. One JSON report per shard;
/// `failed` is set for corruption, a shard that could not be checked or
/// repaired, or a `CLEAN` mark a repair could not remove.
///
/// A repair whose recovery loses records (damage, a torn write) first
/// removes the `CLEAN` mark of the shards' node directory `node`, as a
/// start does before it opens them: the repair hints the damage and cuts
/// the torn tail, so the next start finds nothing lost, and only the
/// missing mark makes it give the node a new actor (no new write may reuse
/// a lost record's dot). Returns the reports, and whether the mark was
/// removed.
fn check_shards(
    dirs: &[PathBuf],
    partitions: Option<u32>,
    repair: bool,
    node: Option<&Path>,
    failed: &mut bool,
) -> anyhow::Result<(Vec<serde_json::Value>, bool)> {
    let mut reports = Vec::new();
    let mut to_repair = Vec::new();
    let mut loses = false;
    for dir in dirs {
        match check_shard(dir, partitions) {
            Ok(c) => {
                *failed |= !c.report.corruptions.is_empty() || !c.scrub.is_empty();
                loses |= c.report.lost_records();
                if c.in_use {
                    note!(
                        "gyre check: {} is in use by a running node: what it reads may be changing under it",
                        dir.display()
                    );
                }
                let mut r = serde_json::json!({
                    "data_dir": dir,
                    "in_use": c.in_use,
                    "recovery": c.report,
                    "scrub_corruptions": c.scrub,
                    "spare_segment_bytes": c.spare,
                    "repairs": c.repairs,
                });
                if repair {
                    if c.in_use {
                        bail!("{} is in use by a running gyre node: stop it before --repair", dir.display());
                    }
                    to_repair.push((reports.len(), dir.clone(), c.repair_config));
                    r["repaired"] = false.into();
                }
                reports.push(r);
            }
            Err(e) => {
                *failed = true;
                reports.push(serde_json::json!({ "data_dir": dir, "error": format!("{e:#}") }));
            }
        }
    }
    if to_repair.is_empty() {
        return Ok((reports, false));
    }
    let forget_clean = || node.map_or(Ok(false), gyre::node::config::forget_clean_stop);
    let mut clean_removed = loses && forget_clean()?;
    let mut clean_errors = Vec::new();
    let repaired = run_executor("gyre-check", None, async move {
        let mut out = Vec::new();
        for (i, dir, config) in to_repair {
            let started = Instant::now();
            let res = async {
                let (engine, report) = open_shard(&dir, config).await?;
                let recovery_ms = started.elapsed().as_secs_f64() * 1e3;
                let scrub = engine.verify().await?;
                engine.close().await?;
                anyhow::Ok((report, recovery_ms, scrub, engine.stats()))
            }
            .await;
            out.push((i, res));
        }
        out
    })?;
    for (i, res) in repaired {
        // A loss the check did not foresee (the files changed since), or
        // a repair that failed after it may have hinted damage or cut a
        // tail: late, but the next start still learns of it.
        // Reported with this shard's result (below), not in its place: the
        // repairs made so far are the report's point.
        if res.as_ref().map_or(true, |(report, ..)| report.lost_records()) {
            match forget_clean() {
                Ok(removed) => clean_removed |= removed,
                Err(e) => clean_errors.push((i, format!("{e:#}"))),
            }
        }
        let r = &mut reports[i];
        match res {
            Ok((report, recovery_ms, scrub, stats)) => {
                *failed |= !report.corruptions.is_empty() || !scrub.is_empty();
                r["repaired"] = true.into();
                r["recovery"] = serde_json::json!(report);
                r["recovery_ms"] = recovery_ms.into();
                r["scrub_corruptions"] = serde_json::json!(scrub);
                r["stats"] = serde_json::json!(stats);
            }
            Err(e) => {
                *failed = true;
                r["error"] = format!("repairing: {e:#}").into();
            }
        }
    }
    // A mark that a later attempt removed is gone, whatever failed before.
    if !clean_removed && !clean_errors.is_empty() {
        *failed = true;
        note!("gyre check: a repair that may have lost records could not remove the node's CLEAN mark: remove it before the node's next start");
        for (i, e) in clean_errors {
            reports[i]["clean_mark_error"] = e.into();
        }
    }
    Ok((reports, clean_removed))
}

/// What a shard directory holds, and what opening it would change.
struct ShardCheck {
    /// What `Engine::open` would report.
    report: gyre::storage::RecoveryReport,
    /// What a scrub (`Engine::verify`) after that open would find.
    scrub: Vec<gyre::storage::scan::Corruption>,
    /// The changes that open would make, in its order.
    repairs: Vec<String>,
    /// The spare segment's size, if there is one.
    spare: Option<u64>,
    /// A node's shard holds the directory's LOCK.
    in_use: bool,
    /// The settings a repair opens the shard with ([`repair_config`]),
    /// which the check's prediction of that open used too.
    repair_config: EngineConfig,
}

/// Checks a shard directory without changing it: does what `Engine::open`
/// and `Engine::verify` do (replay valid hints, scan the other segments,
/// scrub every segment), with the storage format's own read-only scan
/// functions on the files' bytes, and lists the writes the open would make
/// instead of making them. The engine cannot open a directory read-only
/// (it cuts torn tails, writes hints and removes files as it recovers),
/// hence this second, read-only path; the tests hold the two to the same
/// report.
fn check_shard(dir: &Path, partitions: Option<u32>) -> anyhow::Result<ShardCheck> {
    use gyre::storage::format::{hint_file_name, parse_format_file, replay_hint, segment_file_name, Seed, FORMAT_FILE};
    use gyre::storage::scan::{scan_segment, LastSegment};
    use std::collections::HashSet;

    let in_use = shard_in_use(dir);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    let files = gyre::storage::ShardFiles::sort(&names);
    let (segs, hints) = (&files.segs, &files.hints);
    let mut repairs = Vec::new();
    let spare = if files.spare {
        Some(std::fs::metadata(dir.join(SPARE_SEGMENT)).context("sizing the spare segment")?.len())
    } else {
        None
    };
    // Without a format file there is no segment to scan (or the start
    // refuses), so the seed there is never used.
    let seed = if names.iter().any(|n| n == FORMAT_FILE) {
        let path = dir.join(FORMAT_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        match parse_format_file(&bytes) {
            Ok(seed) => seed,
            Err(e) => bail!("{} is {e}: a start refuses this directory", path.display()),
        }
    } else if !segs.is_empty() {
        bail!("segments without a {FORMAT_FILE} file: a start refuses this directory");
    } else {
        repairs.push(format!("write {FORMAT_FILE}"));
        Seed::FORMAT_1
    };
    if let Some(e) = gyre::storage::orphan_hint(segs, hints) {
        bail!("{e}: a start refuses this directory");
    }
    repairs.extend(files.temps.iter().map(|name| format!("remove {name} (a temporary file)")));

    let mut report = gyre::storage::RecoveryReport { segments: segs.len(), ..Default::default() };
    let mut scrub = Vec::new();
    let mut keys: HashSet<Vec<u8>> = HashSet::new();
    let mut max_seq = 0u64;
    let last = segs.last().copied();
    for &seg in segs {
        let name = segment_file_name(seg);
        let data = std::fs::read(dir.join(&name)).with_context(|| format!("reading {name}"))?;
        let size = data.len() as u64;
        let is_last = Some(seg) == last;
        let hinted = hints.contains(&seg) && {
            let read = std::fs::read(dir.join(hint_file_name(seg)));
            let replay = replay_hint(read.as_deref(), seg, size, |e| {
                keys.insert(e.key.to_vec());
            });
            report.take_hint(replay, &mut max_seq)
        };
        if hinted {
            scrub.extend(scan_segment(seg, &data, true, seed, |_, _| {}).corruptions);
            continue;
        }
        report.segments_scanned += 1;
        let out = scan_segment(seg, &data, !is_last, seed, |_, r| {
            keys.insert(r.key.to_vec());
            max_seq = max_seq.max(r.seq);
        });
        report.corruptions.extend(out.corruptions.iter().cloned());
        let mut kept = size;
        if is_last {
            report.torn_tail_bytes = out.torn_tail;
            match out.last_segment() {
                LastSegment::Remove => {
                    repairs.push(format!("remove {name} (the last segment, holding no record)"));
                    continue;
                }
                LastSegment::Keep { len } if len != size => {
                    let what = match report.torn_tail_bytes {
                        0 => "zeros past the last record, not a torn write".to_string(),
                        n => format!("a torn write of {n} bytes"),
                    };
                    repairs.push(format!("truncate {name} from {size} to {len} bytes ({what})"));
                    kept = len;
                }
                LastSegment::Keep { .. } => {}
            }
        }
        let hint_name = hint_file_name(seg);
        let verb = if hints.contains(&seg) { "rewrite" } else { "write" };
        repairs.push(format!("{verb} {hint_name} (the index of {name})"));
        // The scrub after the open reads every segment as sealed, the last
        // one as the open left it.
        if is_last {
            scrub.extend(scan_segment(seg, &data[..kept as usize], true, seed, |_, _| {}).corruptions);
        } else {
            scrub.extend(out.corruptions);
        }
    }
    scrub.sort_by_key(|c| (c.seg, c.off));
    report.keys = keys.len();
    report.next_seq = max_seq + 1;
    let repair_config = repair_config(partitions, spare);
    if let Some(size) = spare.filter(|&size| !repair_config.keeps_spare_of(size)) {
        repairs.push(format!("remove {SPARE_SEGMENT} ({size} bytes: not a size a segment can have)"));
    }
    Ok(ShardCheck { report, scrub, repairs, spare, in_use, repair_config })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_finite_positive_seconds() {
        assert_eq!(parse_timeout("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout("0.001"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_timeout("86400"), Ok(Duration::from_secs(86_400)));
        // These used to panic in `Duration::from_secs_f64`, or to be
        // turned into a millisecond.
        for bad in ["inf", "-inf", "infinity", "NaN", "1e20", "1e300", "-1", "0", "-0", "0.0001", "86401", "", "five"] {
            let err = parse_timeout(bad).expect_err(bad);
            assert!(err.contains("timeout") || err.contains("seconds"), "{bad}: {err}");
        }
        let cli = Cli::try_parse_from(["gyre", "get", "k", "--timeout", "inf"]);
        assert!(cli.is_err(), "clap refuses --timeout inf");
    }

    #[test]
    fn raw_get_picks_one_value() {
        let one = vec![vec![0xff, 0xfe, 0x00, 0x41, 0x80]];
        assert_eq!(pick_sibling("k", &one, None).unwrap(), &one[0][..]);
        assert_eq!(pick_sibling("k", &one, Some(0)).unwrap(), &one[0][..]);
        assert!(pick_sibling("k", &one, Some(1)).unwrap_err().to_string().contains("--sibling 1"));
        assert!(pick_sibling("k", &[], None).unwrap_err().to_string().contains("not found"));
        let two = vec![b"a".to_vec(), b"b".to_vec()];
        assert!(pick_sibling("k", &two, None).unwrap_err().to_string().contains("2 siblings"));
        assert_eq!(pick_sibling("k", &two, Some(1)).unwrap(), b"b");
    }

    #[test]
    fn put_takes_exactly_one_of_value_and_value_file() {
        assert!(Cli::try_parse_from(["gyre", "put", "k", "v"]).is_ok());
        assert!(Cli::try_parse_from(["gyre", "put", "k", "--value-file", "-"]).is_ok());
        assert!(Cli::try_parse_from(["gyre", "put", "k"]).is_err());
        assert!(Cli::try_parse_from(["gyre", "put", "k", "v", "--value-file", "f"]).is_err());
        assert!(Cli::try_parse_from(["gyre", "get", "k", "--sibling", "1"]).is_err(), "--sibling needs --raw");
        assert!(Cli::try_parse_from(["gyre", "get", "k", "--raw", "--json"]).is_err());
    }

    #[test]
    fn value_files_are_read_byte_for_byte_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let bytes: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_value(&path).unwrap(), bytes);
        std::fs::write(&path, vec![1u8; VALUE_LEN_HARD_CAP + 1]).unwrap();
        assert!(read_value(&path).unwrap_err().to_string().contains("more than"));
        assert!(read_value(&dir.path().join("missing")).is_err());
    }
}
