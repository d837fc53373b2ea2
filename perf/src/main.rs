//! `gyre-bench`: Gyre's benchmark harness.
//!
//! - `gyre-bench sla FILE` runs an SLA file (`perf/sla/*.toml`: a YCSB-style
//!   workload, an offered load, latency and throughput limits) against
//!   each of its targets (Gyre node, Gyre cluster client- or server-driven,
//!   Redis) with one open-loop generator, prints a verdict per limit,
//!   writes JSON, Markdown and an SVG plot under `perf/results/`, and
//!   exits 2 if any limit is missed (1 on an error).
//! - `gyre-bench capacity FILE` finds the highest offered rate at which
//!   the file's limits still hold, per target (exits 2 if a target holds
//!   them at no probed rate, 1 if one cannot be searched).
//! - `gyre-bench net` is the simple closed-loop (or paced) GET/SET
//!   generator the node's Redis comparison was first measured with.
//! - `gyre-bench storage` drives one shard's storage engine in process (no
//!   network) on a pinned glommio executor and prints a JSON result.
//! - `gyre-bench compaction` times one compaction pass in process (wall
//!   and the shard thread's CPU) and prints a JSON result.

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
    /// One compaction pass of a shard's storage engine, in process, timed.
    Compaction(storage::CompactionArgs),
}

#[derive(Args)]
struct SlaArgs {
    /// The SLA file (TOML; see perf/README.md).
    file: PathBuf,
    /// Targets instead of the file's (repeat for several): gyre://HOST:PORT,
    /// gyre://HOST:PORT?routing=server, redis://HOST:PORT.
    #[arg(long)]
    target: Vec<String>,
    /// Offered rate instead of the file's (sla only; capacity refuses it).
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
    // A usage error exits 1, like every other error: 2 means a missed limit.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            std::process::exit(1);
        }
        Err(e) => e.exit(),
    };
    let outcome = match cli.command {
        Command::Sla(args) => run_sla(args),
        Command::Capacity(args) => run_capacity(args),
        Command::Net(args) => net::run(args).map(|()| true),
        Command::Storage(args) => storage::run(args).map(|()| true),
        Command::Compaction(args) => storage::run_compaction(args).map(|()| true),
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
    // What runs are judged by: the file's limits, and `errors == 0` if none
    // of them is an error limit.
    file.limits = sla::judged_limits(&file.limits);
    if let Some(n) = &args.name {
        file.name = Some(n.clone());
    }
    if let Some(r) = args.rate {
        anyhow::ensure!(
            file.run.mode == sla::LoopMode::Open,
            "--rate is for an open-loop file; {} runs closed-loop",
            args.file.display()
        );
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
    // A target that fails is reported with the others' results, not
    // instead of them.
    let mut failed = Vec::new();
    for t in &targets {
        let result = match harness::run(t, &cfg) {
            Ok(r) => r,
            Err(e) => {
                println!("{}: failed: {e:#}", t.label());
                failed.push(sla::FailedTarget { target: t.label(), error: format!("{e:#}") });
                continue;
            }
        };
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
        pass: failed.is_empty() && reports.iter().all(|r| r.pass),
        targets: reports,
        failed,
    };
    for p in sla::write_report(&args.out, &report, &file.limits)? {
        eprintln!("wrote {}", p.display());
    }
    if !report.failed.is_empty() {
        let names: Vec<&str> = report.failed.iter().map(|f| f.target.as_str()).collect();
        anyhow::bail!("no result from {}", names.join(", "));
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
    /// Why the search of this target stopped short, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    probes: Vec<Probe>,
}

/// Exits 2 if some target held the limits at no probed rate, 1 (an
/// error) if some target could not be searched at all.
fn run_capacity(args: SlaArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.rate.is_none(),
        "capacity searches the rate: --rate is for sla (set [capacity] start and max)"
    );
    let (file, targets) = prepare(&args)?;
    anyhow::ensure!(file.run.mode == sla::LoopMode::Open, "capacity searches an open-loop rate: set mode = \"open\"");
    let cfg0 = file.config(file.capacity.start)?;
    // A probe lasts long enough for the strictest percentile limit to be
    // more than the maximum of its class's samples (up to
    // MAX_PROBE_SECONDS; a probe still short of them misses).
    let needed = file.limits.iter().filter_map(|l| l.operations_needed(&cfg0.mix)).max().unwrap_or(0) as f64;
    let mut out = Vec::new();
    for t in &targets {
        let mut search = sla::Search::new(&file.capacity)?;
        let mut probes = Vec::new();
        let mut error = None;
        // Load once; later probes find the records there.
        let mut load = file.workload.load;
        // Each probe inserts past the records the ones before inserted (a
        // probe that failed leaves no word of where its inserts got).
        let mut inserts = Vec::new();
        while let Some(rate) = search.next() {
            // Too low a rate to collect the samples within the longest
            // probe: no verdict is possible there, and a miss would only
            // halve the rate again (found by a review: the search then
            // reported that no rate held the limits, never having
            // measured one).
            if needed / rate > MAX_PROBE_SECONDS {
                let least = (needed / MAX_PROBE_SECONDS).ceil();
                let why = if let Some(fail) = search.fail {
                    format!(
                        "the limits were missed down to {:.0}/s, and below {least:.0}/s no probe of at most \
                         {MAX_PROBE_SECONDS} s can collect the {needed:.0} operations the strictest limit needs: \
                         the capacity is below what this file can measure",
                        fail
                    )
                } else {
                    format!(
                        "at {rate:.0}/s a probe of at most {MAX_PROBE_SECONDS} s cannot collect the {needed:.0} \
                         operations the strictest limit needs; raise [capacity] start to at least {least:.0}/s"
                    )
                };
                println!("{}: {why}", t.label());
                error = Some(why);
                break;
            }
            let mut cfg = file.config(rate)?;
            cfg.duration = file.capacity.probe_duration.max((needed / rate).min(MAX_PROBE_SECONDS));
            cfg.progress = !args.quiet;
            cfg.load = load;
            cfg.inserts.clone_from(&inserts);
            let r = match harness::run(t, &cfg) {
                Ok(r) => r,
                // Before any probe ran the target is not there (or not
                // what it says): an error, not a capacity of nothing.
                Err(e) if probes.is_empty() => {
                    println!("{}: error: {e:#}", t.label());
                    error = Some(format!("{e:#}"));
                    break;
                }
                // One that fails under a rate after serving lower ones
                // misses it.
                Err(e) => {
                    println!("{} at {rate:.0}/s: error: {e:#}", t.label());
                    search.record(rate, false);
                    let verdicts = vec![sla::Verdict {
                        limit: "run".into(),
                        measured: None,
                        pass: false,
                        note: Some(format!("{e:#}")),
                        too_few_samples: false,
                    }];
                    probes.push(Probe { rate, pass: false, ops_per_sec: 0.0, p99_us: 0.0, p999_us: 0.0, verdicts });
                    continue;
                }
            };
            load = false;
            inserts.clone_from(&r.inserts);
            let (verdicts, held) = sla::judge(&file.limits, &r);
            let pass = held && !verdicts.iter().any(|v| v.too_few_samples);
            let l = r.latency_of("all").cloned().unwrap_or_default();
            let verdict = match (held, pass) {
                (true, false) => "miss (too few samples to tell)",
                (_, true) => "pass",
                (false, _) => "miss",
            };
            println!("{} at {rate:.0}/s: {}: {verdict}", r.target, sla::summary(&r));
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
        match (search.pass, &error) {
            (_, Some(_)) => {}
            (Some(c), None) => println!("{}: capacity {c:.0} ops/s (limits: {})", t.label(), limit_list(&file.limits)),
            (None, None) => println!("{}: no probed rate held the limits", t.label()),
        }
        out.push(Capacity { target: t.label(), capacity: search.pass, first_miss: search.fail, error, probes });
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join(format!("{}.capacity.json", file.name()));
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
    eprintln!("wrote {}", path.display());
    let failed: Vec<&str> = out.iter().filter(|c| c.error.is_some()).map(|c| c.target.as_str()).collect();
    anyhow::ensure!(failed.is_empty(), "could not search {}", failed.join(", "));
    Ok(out.iter().all(|c| c.capacity.is_some()))
}

/// The longest a capacity probe is stretched to for enough samples.
const MAX_PROBE_SECONDS: f64 = 30.0;

fn limit_list(limits: &[sla::Limit]) -> String {
    limits.iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join(", ")
}
