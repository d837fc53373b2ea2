//! The `gyre` binary: run a node (`gyre node`), talk to one (`put`, `get`,
//! `delete`, `ping`, `stats`), verify a shard directory (`check`), and a
//! hidden crash-test writer.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use gyre::client::{Client, ClientConfig, Context as VersionContext};
use gyre::limits::VALUE_LEN_HARD_CAP;
use gyre::node::config::DEFAULT_LISTEN;
use gyre::node::NodeConfig;
use gyre::shell::{now_ms, open_shard, run_executor};
use gyre::storage::{EngineConfig, FsyncPolicy};

#[derive(Parser)]
#[command(name = "gyre", version, about = "Gyre: a Dynamo-style key-value store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the client commands connect, and how they print.
#[derive(clap::Args)]
struct ClientArgs {
    /// Address of any shard of the node.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    node: String,
    /// Print JSON instead of plain text.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the connection and for each reply (0.001 to 86400).
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
        /// Read the ring from this cluster file instead of asking a node.
        #[arg(long)]
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
    match cli.command {
        Command::Node(args) => node(args),
        Command::Put { key, value, value_file, context, client } => {
            let value = match (value, value_file) {
                (_, Some(path)) => read_value(&path)?,
                (Some(value), None) => std::os::unix::ffi::OsStringExt::into_vec(value),
                (None, None) => unreachable!("clap requires VALUE or --value-file"),
            };
            let put = connect(&client)?.put(key.as_bytes(), &value, &context)?;
            if client.json {
                println!("{}", serde_json::json!({ "context": put.context.to_string(), "siblings": put.siblings }));
            } else {
                println!("{}", put.context);
                if put.siblings > 1 {
                    eprintln!("note: {KEY} now has {} siblings (a concurrent write)", put.siblings, KEY = key);
                }
            }
            Ok(())
        }
        Command::Get { key, raw, sibling, client } => {
            let got = connect(&client)?.get(key.as_bytes())?;
            if raw {
                let value = pick_sibling(&key, &got.values, sibling)?;
                let mut out = std::io::stdout().lock();
                out.write_all(value).and_then(|()| out.flush()).context("writing the value to stdout")?;
                eprintln!("context: {}", got.context);
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
                println!("{out}");
            } else {
                if values.is_empty() {
                    eprintln!("(not found)");
                }
                for v in &values {
                    println!("{v}");
                }
                for i in binary {
                    eprintln!(
                        "note: value {i} is not UTF-8 (shown with replacement characters); \
                         `--raw --sibling {i}` writes its exact bytes"
                    );
                }
                eprintln!("context: {}", got.context);
            }
            Ok(())
        }
        Command::Delete { key, context, client } => {
            let mut c = connect(&client)?;
            let (ctx, found) = match context {
                Some(context) => (c.delete(key.as_bytes(), &context)?, None),
                None => {
                    let got = c.get(key.as_bytes())?;
                    if got.values.is_empty() {
                        (got.context, Some(false))
                    } else {
                        (c.delete(key.as_bytes(), &got.context)?, Some(true))
                    }
                }
            };
            if client.json {
                let mut out = serde_json::json!({ "context": ctx.to_string() });
                if let Some(found) = found {
                    out["found"] = serde_json::json!(found);
                }
                println!("{out}");
            } else if found == Some(false) {
                eprintln!("{key}: not found, nothing deleted");
            } else {
                println!("{ctx}");
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
            println!("{out}");
            Ok(())
        }
        Command::Stats { shard, client } => {
            let stats = connect(&client)?.stats(shard)?;
            let v: serde_json::Value = serde_json::from_str(&stats)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
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
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", ring.describe(n));
            }
            Ok(())
        }
        Command::Check { data_dir } => check(data_dir),
        Command::StorageWriter { data_dir, fsync, writers, value_size, segment_size } => {
            let config = EngineConfig { fsync, segment_size, max_value_len: 64 * 1024, ..Default::default() };
            storage_writer(data_dir, config, writers, value_size)
        }
    }
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
    /// Client connections each shard serves at once; the next is refused
    /// (Overloaded) [default: 10000].
    #[arg(long)]
    max_connections: Option<u64>,
    /// Do not pin shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Microseconds an idle shard spins before it sleeps [default: 0].
    #[arg(long)]
    spin_us: Option<u64>,
    /// Cluster file: run as a member of that cluster (see `gyre dev`).
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// This node's name in the cluster file [default: the node whose address is --listen].
    #[arg(long)]
    name: Option<String>,
}

#[derive(clap::Args)]
struct DevArgs {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Directory of the cluster file and of each node's data (DIR/n1, ...).
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Port of every node (each has its own loopback address).
    #[arg(long, default_value_t = 7700)]
    port: u16,
    /// Shards per node [default: cores / nodes, at least 1].
    #[arg(long)]
    shards: Option<usize>,
    /// Replicas per key, and the default read and write quorums.
    #[arg(short = 'n', long, default_value_t = 3)]
    replicas: usize,
    #[arg(short = 'r', long, default_value_t = 2)]
    read_quorum: usize,
    #[arg(short = 'w', long, default_value_t = 2)]
    write_quorum: usize,
    /// Durability of each node: always | interval(MS) | never.
    #[arg(long, default_value = "always")]
    fsync: FsyncPolicy,
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
    config.max_connections = args.max_connections.unwrap_or(config.max_connections);
    config.pin &= !args.no_pin;
    config.spin_before_park_us = args.spin_us.unwrap_or(config.spin_before_park_us);
    config.cluster = args.cluster.or(config.cluster);
    config.name = args.name.or(config.name);
    let shutdown = shutdown_flag()?;
    let data_dir = config.data_dir.clone();
    gyre::node::run(config, shutdown, |started| {
        let addrs: Vec<String> = started.addrs.iter().map(ToString::to_string).collect();
        tracing::info!(node_id = format!("{:016x}", started.node_id), ?addrs, data_dir = %data_dir.display(), "node ready");
        println!("gyre node {:016x} ready: {}", started.node_id, addrs.join(" "));
        let _ = std::io::stdout().flush();
    })?;
    eprintln!("gyre node stopped cleanly");
    Ok(())
}

/// `gyre dev`: writes (or reuses) `DIR/cluster.toml`, starts one node
/// process per member, prints where they are, and stops them all on
/// SIGINT or SIGTERM.
fn dev(args: DevArgs) -> anyhow::Result<()> {
    use gyre::node::cluster::{ClusterFile, NodeEntry};
    if args.nodes == 0 || args.nodes > 250 {
        bail!("--nodes must be between 1 and 250 (one loopback address each)");
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let path = args.data_dir.join("cluster.toml");
    let file = if path.exists() {
        let (file, _) = ClusterFile::load(&path)?;
        // Its port, N, R and W stand; the flags shape only a new cluster.
        eprintln!("gyre dev: reusing {} (remove {} for a new cluster)", path.display(), args.data_dir.display());
        if file.nodes.len() != args.nodes {
            bail!(
                "{} describes a {}-node cluster, not {}; use another --data-dir or remove it",
                path.display(),
                file.nodes.len(),
                args.nodes
            );
        }
        file
    } else {
        let nodes = (1..=args.nodes)
            .map(|i| NodeEntry {
                name: format!("n{i}"),
                addr: std::net::SocketAddr::from(([127, 0, 0, i as u8], args.port)),
                zone: None,
            })
            .collect();
        let file = ClusterFile {
            partitions: gyre::core::partition::DEFAULT_PARTITIONS,
            n: args.replicas.min(args.nodes),
            r: args.read_quorum.min(args.nodes),
            w: args.write_quorum.min(args.nodes),
            nodes,
            namespaces: Vec::new(),
        };
        file.validate()?;
        std::fs::write(&path, file.to_toml()).with_context(|| format!("writing {}", path.display()))?;
        file
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = args.shards.unwrap_or((cores / args.nodes).max(1));
    let shutdown = shutdown_flag()?;
    let exe = std::env::current_exe().context("finding the gyre executable")?;
    let mut children: Vec<(String, std::process::Child)> = Vec::new();
    let stop_all = |children: &mut Vec<(String, std::process::Child)>| {
        for (_, c) in children.iter() {
            // SAFETY: kill(2) on a child we started; no memory is involved.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        for (name, c) in children.iter_mut() {
            match c.wait() {
                Ok(s) if s.success() => eprintln!("gyre dev: {name} stopped"),
                Ok(s) => eprintln!("gyre dev: {name} exited with {s}"),
                Err(e) => eprintln!("gyre dev: waiting for {name}: {e}"),
            }
        }
    };
    for node in &file.nodes {
        let data = args.data_dir.join(&node.name);
        let mut child = std::process::Command::new(&exe)
            .args(["node", "--cluster"])
            .arg(&path)
            .args(["--name", &node.name, "--data-dir"])
            .arg(&data)
            .args(["--shards", &shards.to_string(), "--fsync", &args.fsync.to_string(), "--no-pin"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting node {}", node.name))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let ready = lines.next().and_then(Result::ok).filter(|l| l.contains(" ready: "));
        children.push((node.name.clone(), child));
        let Some(ready) = ready else {
            stop_all(&mut children);
            bail!("node {} did not start (its log is above)", node.name);
        };
        std::thread::spawn(move || lines.for_each(drop));
        eprintln!("gyre dev: {} {ready}", node.name);
    }
    let addrs: Vec<String> = file.nodes.iter().map(|n| n.addr.to_string()).collect();
    println!("gyre dev ready: {}", addrs.join(" "));
    println!(
        "{} nodes, N={} R={} W={}, cluster file {}; try: gyre put hello world --node {}",
        file.nodes.len(),
        file.n,
        file.r,
        file.w,
        path.display(),
        addrs[0]
    );
    let _ = std::io::stdout().flush();
    while !shutdown.load(std::sync::atomic::Ordering::SeqCst) {
        children.retain_mut(|(name, c)| match c.try_wait() {
            Ok(Some(status)) => {
                eprintln!("gyre dev: node {name} exited ({status}); the others keep running");
                false
            }
            _ => true,
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("gyre dev: stopping {} nodes", children.len());
    stop_all(&mut children);
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

fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    // A connection (and its first PING) gets at most the client's default
    // connect timeout, and never the whole call: a stopped node must leave
    // time for the next replica.
    let connect_timeout = ClientConfig::default().connect_timeout.min(args.timeout / 2);
    let config = ClientConfig { request_timeout: args.timeout, connect_timeout, ..Default::default() };
    Client::connect_with(&args.node, config).with_context(|| format!("connecting to {}", args.node))
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
