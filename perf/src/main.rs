//! `gyre-bench`: Gyre's benchmark harness.
//!
//! - `gyre-bench sla FILE` runs an SLA file (`perf/sla/*.toml`: a YCSB-style
//!   workload, an offered load, latency and throughput limits) against
//!   each of its targets (Gyre node, Gyre cluster client- or server-driven,
//!   Redis) with one open-loop generator, prints a verdict per limit,
//!   writes JSON, Markdown and an SVG plot under `perf/results/`, and
//!   exits 2 if any limit is missed (1 on an error).
//! - `gyre-bench capacity FILE` finds the highest offered rate at which
//!   the file's limits still hold, per target.
//! - `gyre-bench net` is the simple closed-loop (or paced) GET/SET
//!   generator the node's Redis comparison was first measured with.
//! - `gyre-bench storage` drives one shard's storage engine in process (no
//!   network) on a pinned glommio executor and prints a JSON result.

mod harness;
mod net;
mod plot;
mod sla;
mod storage;
mod workload;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Run an SLA file against its targets and check its limits.
    Sla(SlaArgs),
    /// Search the highest offered rate at which an SLA file's limits hold.
    Capacity(SlaArgs),
    /// A Gyre node or cluster, or a Redis server, over the network (GET/SET mix).
    Net(net::NetArgs),
    /// One shard's storage engine, in process.
    Storage(storage::StorageArgs),
}

#[derive(Args)]
struct SlaArgs {
    /// The SLA file (TOML; see perf/README.md).
    file: PathBuf,
    /// Targets instead of the file's (repeat for several): gyre://HOST:PORT,
    /// gyre://HOST:PORT?routing=server, redis://HOST:PORT.
    #[arg(long)]
    target: Vec<String>,
    /// Offered rate instead of the file's (sla only).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds instead of the file's (for capacity: per probe).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds instead of the file's.
    #[arg(long)]
    warmup: Option<f64>,
    /// Skip the load phase (the records are already there).
    #[arg(long)]
    no_load: bool,
    /// Where results go.
    #[arg(long, default_value = "perf/results")]
    out: PathBuf,
    /// Name of the results instead of the file's (to keep several runs).
    #[arg(long)]
    name: Option<String>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    let outcome = match Cli::parse().command {
        Command::Sla(args) => run_sla(args),
        Command::Capacity(args) => run_capacity(args).map(|()| true),
        Command::Net(args) => net::run(args).map(|()| true),
        Command::Storage(args) => storage::run(args).map(|()| true),
    };
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The file, with the command line's overrides, and its targets.
fn prepare(args: &SlaArgs) -> anyhow::Result<(sla::SlaFile, Vec<harness::Target>)> {
    let mut file = sla::SlaFile::load(&args.file)?;
    if let Some(n) = &args.name {
        file.name = Some(n.clone());
    }
    if let Some(r) = args.rate {
        file.run.rate = Some(r);
    }
    if let Some(d) = args.duration {
        file.run.duration = d;
        file.capacity.probe_duration = d;
    }
    if let Some(w) = args.warmup {
        file.run.warmup = w;
    }
    if args.no_load {
        file.workload.load = false;
    }
    let urls = if args.target.is_empty() { file.targets.clone() } else { args.target.clone() };
    let urls = if urls.is_empty() { vec!["gyre://127.0.0.1:7700".to_string()] } else { urls };
    let targets = urls.iter().map(|u| harness::Target::parse(u)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok((file, targets))
}

fn run_sla(args: SlaArgs) -> anyhow::Result<bool> {
    let (file, targets) = prepare(&args)?;
    let mut cfg = file.config(file.run.rate.unwrap_or(0.0))?;
    cfg.progress = !args.quiet;
    let workload = sla::describe(&cfg);
    eprintln!("{}: {workload}", file.name());
    let mut reports = Vec::new();
    for t in &targets {
        let result = harness::run(t, &cfg)?;
        let (verdicts, pass) = sla::judge(&file.limits, &result);
        print_target(&result, &file.limits, &verdicts);
        reports.push(sla::TargetReport { result, verdicts, pass });
    }
    let report = sla::Report {
        name: file.name().to_string(),
        description: file.description.clone(),
        file: args.file.display().to_string(),
        machine: sla::Machine::here(),
        workload,
        limits: file.limits.iter().map(|l| l.text.clone()).collect(),
        plot: file.plot,
        pass: reports.iter().all(|r| r.pass),
        targets: reports,
    };
    for p in sla::write_report(&args.out, &report, &file.limits)? {
        eprintln!("wrote {}", p.display());
    }
    println!("{}", if report.pass { "PASS" } else { "MISS" });
    Ok(report.pass)
}

fn print_target(r: &harness::RunResult, limits: &[sla::Limit], verdicts: &[sla::Verdict]) {
    println!("{}: {}", r.target, sla::summary(r));
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
    for (limit, v) in limits.iter().zip(verdicts) {
        let why = v.note.as_deref().map_or(String::new(), |n| format!(" ({n})"));
        println!("  {:4} {}: {}{why}", if v.pass { "pass" } else { "MISS" }, limit.text, limit.show(v.measured));
    }
}

/// One probe of a capacity search.
#[derive(serde::Serialize)]
struct Probe {
    rate: f64,
    pass: bool,
    ops_per_sec: f64,
    p99_us: f64,
    p999_us: f64,
    verdicts: Vec<sla::Verdict>,
}

#[derive(serde::Serialize)]
struct Capacity {
    target: String,
    /// Highest offered rate at which every limit held (none: not even the lowest).
    capacity: Option<f64>,
    /// Lowest rate that missed (none: the search's cap held).
    first_miss: Option<f64>,
    probes: Vec<Probe>,
}

fn run_capacity(args: SlaArgs) -> anyhow::Result<()> {
    let (file, targets) = prepare(&args)?;
    anyhow::ensure!(file.run.mode == sla::LoopMode::Open, "capacity searches an open-loop rate: set mode = \"open\"");
    anyhow::ensure!(!file.limits.is_empty(), "the SLA file has no limits to hold");
    let mut out = Vec::new();
    for t in &targets {
        let mut search = sla::Search::new(&file.capacity)?;
        let mut probes = Vec::new();
        let mut load = file.workload.load;
        // A probe lasts long enough for the strictest percentile limit to
        // be more than a maximum (up to MAX_PROBE_SECONDS).
        let needed = file.limits.iter().map(sla::Limit::samples_needed).max().unwrap_or(0) as f64;
        while let Some(rate) = search.next() {
            let mut cfg = file.config(rate)?;
            cfg.duration = file.capacity.probe_duration.max((needed / rate).min(MAX_PROBE_SECONDS));
            cfg.progress = !args.quiet;
            // Load once; later probes find the records there.
            cfg.load = load;
            load = false;
            let r = match harness::run(t, &cfg) {
                Ok(r) => r,
                // A target that fails under a rate misses it.
                Err(e) => {
                    println!("{} at {rate:.0}/s: error: {e:#}", t.label());
                    search.record(rate, false);
                    let verdicts = vec![sla::Verdict {
                        limit: "run".into(),
                        measured: None,
                        pass: false,
                        note: Some(format!("{e:#}")),
                    }];
                    probes.push(Probe { rate, pass: false, ops_per_sec: 0.0, p99_us: 0.0, p999_us: 0.0, verdicts });
                    continue;
                }
            };
            let (verdicts, pass) = sla::judge(&file.limits, &r);
            let l = r.latency_of("all").cloned().unwrap_or_default();
            println!("{} at {rate:.0}/s: {}: {}", r.target, sla::summary(&r), if pass { "pass" } else { "miss" });
            search.record(rate, pass);
            probes.push(Probe {
                rate,
                pass,
                ops_per_sec: r.ops_per_sec,
                p99_us: l.p99_us,
                p999_us: l.p999_us,
                verdicts,
            });
        }
        match search.pass {
            Some(c) => println!("{}: capacity {c:.0} ops/s (limits: {})", t.label(), limit_list(&file.limits)),
            None => println!("{}: no probed rate held the limits", t.label()),
        }
        out.push(Capacity { target: t.label(), capacity: search.pass, first_miss: search.fail, probes });
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join(format!("{}.capacity.json", file.name()));
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The longest a capacity probe is stretched to for enough samples.
const MAX_PROBE_SECONDS: f64 = 30.0;

fn limit_list(limits: &[sla::Limit]) -> String {
    limits.iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join(", ")
}
