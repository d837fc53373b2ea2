//! SLA files and their verdicts: `gyre-bench sla FILE` runs the workload
//! an SLA file describes against each of its targets, checks every limit,
//! writes JSON, Markdown and SVG results, and exits 2 on a miss;
//! `gyre-bench capacity FILE` searches the highest offered rate at which
//! every limit still holds.
//!
//! An SLA file (TOML; unknown keys are errors):
//!
//! ```toml
//! name = "node-a"                  # default: the file's stem
//! description = "YCSB A on one node"
//! targets = ["gyre://127.0.0.1:7700", "redis://127.0.0.1:6379#Redis"]   # #NAME: its name in reports
//! limits = ["p99.9 < 1ms", "read.p99 <= 500us", "throughput >= 95%", "errors == 0"]
//! plot = "all"                     # all | read | write: the p99.9-over-time curve
//!
//! [workload]
//! workload = "a"                   # a b c d f, or mix = { read = 0.9, update = 0.1 }
//! distribution = "zipfian"         # uniform | zipfian | latest (default: per workload)
//! theta = 0.99                     # zipfian and latest only
//! records = 100000
//! value_size = 100                 # or { min = 50, max = 150 }
//! load = true                      # write every record first (not measured)
//!
//! [run]
//! mode = "open"                    # open | closed
//! arrival = "poisson"              # poisson | constant (open loop)
//! rate = 20000                     # offered operations per second (open loop)
//! depth = 1                        # closed loop: connections × depth outstanding in all
//! connections = 50
//! max_in_flight = 64               # per connection (open loop)
//! warmup = 2
//! duration = 10
//! interval = 1                     # seconds per point of the time series
//! threads = 1
//! seed = 1
//!
//! [capacity]                       # for `gyre-bench capacity`
//! start = 5000
//! max = 500000
//! tolerance = 0.05
//! probe_duration = 5
//! ```
//!
//! A limit is `[CLASS.]METRIC CMP VALUE`: CLASS is `all` (default),
//! `read`, `write`, `update`, `insert` or `rmw`; METRIC is `avg`, `p50`,
//! `p90`, `p99`, `p99.9`, `p99.99` or `max` (VALUE with `us`, `µs`, `ms`
//! or `s`), or `throughput` (ops/s, or `%` of the offered rate), `errors`
//! (a count) or `error_rate` (`%` of operations); CMP is `<`, `<=`, `>`,
//! `>=` or `==`. A latency limit on a class the mix has no operations of
//! is refused when the file is read; one whose class got no operations in
//! a run fails: it could not be checked.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::harness::{Mode, RunConfig, RunResult};
use crate::workload::{Arrival, KeyDist, Mix, ValueSize, Workload, DEFAULT_THETA};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaFile {
    pub name: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Which operations the plot's latency-over-time panel follows.
    #[serde(default)]
    pub plot: PlotClass,
    #[serde(default)]
    pub workload: WorkloadSection,
    #[serde(default)]
    pub run: RunSection,
    #[serde(default)]
    pub capacity: CapacitySection,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadSection {
    pub workload: Option<Workload>,
    pub mix: Option<Mix>,
    pub distribution: Option<KeyDist>,
    /// Zipfian and latest only (default `DEFAULT_THETA`): an Option so
    /// that one given with uniform keys, where it does nothing, is refused.
    pub theta: Option<f64>,
    pub records: u64,
    pub value_size: ValueSize,
    pub load: bool,
}

impl Default for WorkloadSection {
    fn default() -> Self {
        WorkloadSection {
            workload: None,
            mix: None,
            distribution: None,
            theta: None,
            records: 100_000,
            value_size: ValueSize::Fixed(100),
            load: true,
        }
    }
}

/// The operations a latency-over-time curve follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlotClass {
    #[default]
    All,
    Read,
    Write,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoopMode {
    Open,
    Closed,
}

/// `max_in_flight` when a file sets none: requests outstanding on one
/// open-loop connection before the next one due there waits in the
/// generator, still on the clock. At the files' rates (tens of thousands a
/// second over 50 connections, well under one outstanding per connection
/// at sub-millisecond latency) only a stall fills it; it is bounded
/// because a deep one with large values can block a connection's writes
/// (see the harness's module doc).
const DEFAULT_MAX_IN_FLIGHT: usize = 64;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    pub mode: LoopMode,
    /// Open loop only (default Poisson).
    pub arrival: Option<Arrival>,
    /// Open loop only.
    pub rate: Option<f64>,
    /// Closed loop only (default 1).
    pub depth: Option<usize>,
    pub connections: usize,
    /// Open loop only (default `DEFAULT_MAX_IN_FLIGHT`): an Option so that
    /// one given in a closed-loop file, where it does nothing, is refused.
    pub max_in_flight: Option<usize>,
    pub warmup: f64,
    pub duration: f64,
    pub interval: f64,
    pub threads: usize,
    pub seed: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            mode: LoopMode::Open,
            arrival: None,
            rate: None,
            depth: None,
            connections: 50,
            max_in_flight: None,
            warmup: 2.0,
            duration: 10.0,
            interval: 1.0,
            threads: 1,
            seed: 1,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacitySection {
    pub start: f64,
    pub max: f64,
    /// The search stops when the lowest failing rate is within this share
    /// of the highest passing one.
    pub tolerance: f64,
    /// Measured seconds of each probe (shorter than a full run).
    pub probe_duration: f64,
}

impl Default for CapacitySection {
    fn default() -> Self {
        CapacitySection { start: 1000.0, max: 1_000_000.0, tolerance: 0.05, probe_duration: 5.0 }
    }
}

impl SlaFile {
    pub fn load(path: &Path) -> anyhow::Result<SlaFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut f: SlaFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if f.name.is_none() {
            f.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        f.check().with_context(|| format!("checking {}", path.display()))?;
        Ok(f)
    }

    /// What no run of this file could do right.
    fn check(&self) -> anyhow::Result<()> {
        let cfg = self.config(self.run.rate.unwrap_or(1.0))?;
        // A setting of the other loop is a mistake, not ignored (found by
        // a review: `rate` on a closed-loop file ran closed-loop).
        match self.run.mode {
            LoopMode::Closed => {
                anyhow::ensure!(
                    self.run.rate.is_none() && self.run.arrival.is_none(),
                    "rate and arrival are for mode = \"open\"; a closed-loop run has no offered rate (set depth)"
                );
                // Found by a review: a closed loop sends whatever its
                // connections are given, and ignored it.
                anyhow::ensure!(
                    self.run.max_in_flight.is_none(),
                    "max_in_flight is for mode = \"open\"; a closed-loop run keeps depth per connection outstanding"
                );
            }
            LoopMode::Open => {
                anyhow::ensure!(
                    self.run.depth.is_none(),
                    "depth is for mode = \"closed\"; an open-loop run sets a rate"
                )
            }
        }
        // Found by a review: uniform keys have no skew, and ignored it.
        anyhow::ensure!(
            cfg.dist != KeyDist::Uniform || self.workload.theta.is_none(),
            "theta shapes zipfian and latest keys; distribution = \"uniform\" has none"
        );
        // Without limits every run would pass: nothing would be checked.
        anyhow::ensure!(!self.limits.is_empty(), "no limits: give at least one, e.g. limits = [\"errors == 0\"]");
        for l in &self.limits {
            if l.metric == Metric::Throughput && l.relative && self.run.mode == LoopMode::Closed {
                bail!("limit {:?}: a closed-loop run has no offered rate; give the throughput in ops/s", l.text);
            }
            if l.operations_needed(&cfg.mix).is_none() {
                bail!("limit {:?}: the workload has no operations of that class", l.text);
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("sla")
    }

    /// The run this file describes, at `rate` (open loop).
    pub fn config(&self, rate: f64) -> anyhow::Result<RunConfig> {
        let w = &self.workload;
        let mix = match (w.workload, w.mix) {
            (Some(_), Some(_)) => bail!("set either workload or mix, not both"),
            (Some(k), None) => k.mix(),
            (None, Some(m)) => m,
            (None, None) => bail!("the [workload] section needs workload = \"a\" (b, c, d, f) or a mix"),
        };
        let dist = w.distribution.unwrap_or(w.workload.map_or(KeyDist::Zipfian, Workload::default_distribution));
        let r = &self.run;
        let mode = match r.mode {
            LoopMode::Open => {
                anyhow::ensure!(r.rate.is_some() || rate > 0.0, "an open-loop run needs a rate");
                Mode::Open { arrival: r.arrival.unwrap_or(Arrival::Poisson), rate }
            }
            LoopMode::Closed => Mode::Closed { depth: r.depth.unwrap_or(1) },
        };
        let cfg = RunConfig {
            mix,
            dist,
            theta: w.theta.unwrap_or(DEFAULT_THETA),
            records: w.records,
            value_size: w.value_size,
            load: w.load,
            mode,
            connections: r.connections,
            max_in_flight: r.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            warmup: r.warmup,
            duration: r.duration,
            interval: r.interval,
            threads: r.threads,
            seed: r.seed,
            progress: true,
            inserts: Vec::new(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// A latency statistic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Avg,
    P50,
    P90,
    P99,
    P999,
    P9999,
    Max,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Metric {
    Latency {
        class: String,
        stat: Stat,
    },
    /// Completed operations per second.
    Throughput,
    Errors,
    /// Errors per operation attempted.
    ErrorRate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
}

impl Cmp {
    fn holds(self, measured: f64, limit: f64) -> bool {
        match self {
            Cmp::Lt => measured < limit,
            Cmp::Le => measured <= limit,
            Cmp::Gt => measured > limit,
            Cmp::Ge => measured >= limit,
            Cmp::Eq => measured == limit,
        }
    }
}

/// One limit of an SLA file, e.g. `p99.9 < 1ms`.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    pub text: String,
    pub metric: Metric,
    pub cmp: Cmp,
    /// Microseconds (latency), ops/s or a share of the offered rate
    /// (throughput), a count (errors) or a share (error rate).
    pub value: f64,
    /// `throughput` given in % of the offered rate.
    pub relative: bool,
}

const CLASSES: [&str; 6] = ["all", "read", "write", "update", "insert", "rmw"];

impl FromStr for Limit {
    type Err = String;

    fn from_str(text: &str) -> Result<Limit, String> {
        let bad = |why: &str| format!("limit {text:?}: {why}");
        let parts: Vec<&str> = text.split_whitespace().collect();
        // The value may have its unit apart: "1 ms".
        let (name, cmp, value) = match parts.as_slice() {
            [n, c, v] => (*n, *c, v.to_string()),
            [n, c, v, u] => (*n, *c, format!("{v}{u}")),
            _ => return Err(bad("write it as METRIC CMP VALUE, e.g. \"p99.9 < 1ms\"")),
        };
        let cmp = match cmp {
            "<" => Cmp::Lt,
            "<=" => Cmp::Le,
            ">" => Cmp::Gt,
            ">=" => Cmp::Ge,
            "==" => Cmp::Eq,
            other => return Err(bad(&format!("unknown comparison {other:?} (< <= > >= ==)"))),
        };
        let (class, stat) = match name.split_once('.') {
            Some((c, s)) if CLASSES.contains(&c) => (c, s),
            _ => ("all", name),
        };
        let stat = match stat {
            "avg" => Some(Stat::Avg),
            "p50" => Some(Stat::P50),
            "p90" => Some(Stat::P90),
            "p99" => Some(Stat::P99),
            "p99.9" => Some(Stat::P999),
            "p99.99" => Some(Stat::P9999),
            "max" => Some(Stat::Max),
            _ => None,
        };
        let number = |s: &str| s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
        let (metric, value, relative) = match (stat, name) {
            (Some(stat), _) => {
                let (digits, scale) = [("us", 1.0), ("µs", 1.0), ("ms", 1e3), ("s", 1e6)]
                    .iter()
                    .find_map(|(u, k)| value.strip_suffix(u).map(|d| (d, *k)))
                    .ok_or_else(|| bad("a latency needs a unit: us, ms or s"))?;
                let v = number(digits).ok_or_else(|| bad("not a number"))?;
                (Metric::Latency { class: class.to_string(), stat }, v * scale, false)
            }
            (None, "throughput") => match value.strip_suffix('%') {
                Some(p) => (Metric::Throughput, number(p).ok_or_else(|| bad("not a number"))? / 100.0, true),
                None => {
                    let v = value.strip_suffix("ops/s").unwrap_or(&value);
                    (Metric::Throughput, number(v).ok_or_else(|| bad("not a number"))?, false)
                }
            },
            (None, "errors") => (Metric::Errors, number(&value).ok_or_else(|| bad("not a count"))?, false),
            (None, "error_rate") => {
                let p = value.strip_suffix('%').ok_or_else(|| bad("an error rate is in %"))?;
                (Metric::ErrorRate, number(p).ok_or_else(|| bad("not a number"))? / 100.0, false)
            }
            _ => {
                return Err(bad(
                    "unknown metric (avg p50 p90 p99 p99.9 p99.99 max, optionally after read. write. ..., \
                     throughput, errors, error_rate)",
                ))
            }
        };
        Ok(Limit { text: text.to_string(), metric, cmp, value, relative })
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Limit, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The share of a mix's operations a latency class gets.
fn class_share(class: &str, m: &Mix) -> f64 {
    let total = m.read + m.update + m.insert + m.rmw;
    let part = match class {
        "read" => m.read,
        "update" => m.update,
        "insert" => m.insert,
        "write" => m.update + m.insert,
        "rmw" => m.rmw,
        _ => total,
    };
    if total > 0.0 {
        part / total
    } else {
        0.0
    }
}

/// A limit checked against a run.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub limit: String,
    /// What was measured, in the limit's terms (µs, ops/s, count, share).
    pub measured: Option<f64>,
    pub pass: bool,
    /// Why it could not be checked, or checked only roughly, if so.
    pub note: Option<String>,
    /// The percentile had fewer samples than it needs to be more than
    /// their maximum: the verdict stands, but a capacity search does not
    /// count it as a pass.
    pub too_few_samples: bool,
}

impl Stat {
    /// The quantile a percentile stands for.
    pub fn quantile(self) -> Option<f64> {
        match self {
            Stat::P50 => Some(0.5),
            Stat::P90 => Some(0.9),
            Stat::P99 => Some(0.99),
            Stat::P999 => Some(0.999),
            Stat::P9999 => Some(0.9999),
            Stat::Avg | Stat::Max => None,
        }
    }
}

impl Limit {
    fn stat_of(&self, l: &crate::harness::Latency, stat: Stat) -> f64 {
        match stat {
            Stat::Avg => l.avg_us,
            Stat::P50 => l.p50_us,
            Stat::P90 => l.p90_us,
            Stat::P99 => l.p99_us,
            Stat::P999 => l.p999_us,
            Stat::P9999 => l.p9999_us,
            Stat::Max => l.max_us,
        }
    }

    /// Operations in all a run needs for this limit's percentile to be
    /// more than the maximum of its class's samples: `2 / (1 - q)` of
    /// the class, which gets `share` of the operations. None: the
    /// class gets no operations, so no run can check the limit.
    pub fn operations_needed(&self, mix: &Mix) -> Option<u64> {
        match &self.metric {
            Metric::Latency { class, stat } => {
                // The share first: a max or an average of a class the
                // workload never runs is as unjudgeable as a percentile
                // (found by a review: accepted, then a miss on every run).
                let share = class_share(class, mix);
                if share <= 0.0 {
                    return None;
                }
                let Some(q) = stat.quantile() else { return Some(0) };
                Some((2.0 / (1.0 - q) / share).ceil() as u64)
            }
            _ => Some(0),
        }
    }

    /// The limit's latency in µs, if it is a latency limit on `of`'s
    /// operations whose statistic `stat_ok` accepts (for a plot's panel).
    pub fn latency_us(&self, of: &str, stat_ok: impl Fn(Stat) -> bool) -> Option<f64> {
        match &self.metric {
            Metric::Latency { class, stat } if class == of && stat_ok(*stat) => Some(self.value),
            _ => None,
        }
    }

    pub fn check(&self, r: &RunResult) -> Verdict {
        // Timeouts are in both `ops` (with the time they waited) and `errors`.
        let attempted = r.ops + r.errors - r.timeouts;
        let measured: Result<f64, String> = match &self.metric {
            Metric::Latency { class, stat } => match r.latency_of(class).filter(|l| l.count > 0) {
                Some(l) if stat.quantile().is_some_and(|q| (l.count as f64) < 1.0 / (1.0 - q)) => {
                    let v = self.stat_of(l, *stat);
                    let note = format!("only {} samples: {} is about their maximum", l.count, self.text);
                    return Verdict {
                        limit: self.text.clone(),
                        measured: Some(v),
                        pass: self.cmp.holds(v, self.value),
                        note: Some(note),
                        too_few_samples: true,
                    };
                }
                None => Err(format!("no {class} operations were measured")),
                Some(l) => Ok(self.stat_of(l, *stat)),
            },
            Metric::Throughput if self.relative => match r.offered_rate {
                Some(rate) => Ok(r.ops_per_sec / rate),
                None => Err("a closed-loop run has no offered rate".to_string()),
            },
            Metric::Throughput => Ok(r.ops_per_sec),
            Metric::Errors => Ok(r.errors as f64),
            Metric::ErrorRate if attempted == 0 => Err("no operations".to_string()),
            Metric::ErrorRate => Ok(r.errors as f64 / attempted as f64),
        };
        match measured {
            Ok(m) => Verdict {
                limit: self.text.clone(),
                measured: Some(m),
                pass: self.cmp.holds(m, self.value),
                note: None,
                too_few_samples: false,
            },
            Err(why) => Verdict {
                limit: self.text.clone(),
                measured: None,
                pass: false,
                note: Some(why),
                too_few_samples: false,
            },
        }
    }

    /// A measured value in the limit's own terms, for people.
    pub fn show(&self, v: Option<f64>) -> String {
        let Some(v) = v else { return "n/a".to_string() };
        match self.metric {
            Metric::Latency { .. } => fmt_us(v),
            Metric::Throughput if self.relative => format!("{:.1}% of offered", v * 100.0),
            Metric::Throughput => format!("{v:.0} ops/s"),
            Metric::Errors => format!("{v:.0}"),
            Metric::ErrorRate => format!("{:.3}%", v * 100.0),
        }
    }
}

/// Every limit checked against `r`, and whether all hold.
pub fn judge(limits: &[Limit], r: &RunResult) -> (Vec<Verdict>, bool) {
    let verdicts: Vec<Verdict> = limits.iter().map(|l| l.check(r)).collect();
    let pass = verdicts.iter().all(|v| v.pass);
    (verdicts, pass)
}

/// The limits a run is judged by: the file's, and `errors == 0` if none of
/// them says anything of errors. A failed operation's latency is in no
/// histogram, so latency limits alone passed a run in which most requests
/// failed (found by a review); a file that tolerates errors says how many
/// (`errors` or `error_rate`).
pub fn judged_limits(limits: &[Limit]) -> Vec<Limit> {
    let mut out = limits.to_vec();
    if !limits.iter().any(|l| matches!(l.metric, Metric::Errors | Metric::ErrorRate)) {
        let mut implied: Limit = "errors == 0".parse().expect("a valid limit");
        implied.text = "errors == 0 (implied: the file sets no error limit)".to_string();
        out.push(implied);
    }
    out
}

/// One line: throughput, the percentiles of all operations, errors.
pub fn summary(r: &RunResult) -> String {
    let l = r.latency_of("all").cloned().unwrap_or_default();
    format!(
        "{:.0} ops/s, p50 {}, p99 {}, p99.9 {}, p99.99 {}, max {}, errors {}",
        r.ops_per_sec,
        fmt_us(l.p50_us),
        fmt_us(l.p99_us),
        fmt_us(l.p999_us),
        fmt_us(l.p9999_us),
        fmt_us(l.max_us),
        r.errors
    )
}

pub fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// The capacity search: from `start`, double the rate while the SLA holds,
/// then bisect (geometrically) between the highest passing and the lowest
/// failing rate until they are within `tolerance`.
#[derive(Clone, Debug)]
pub struct Search {
    start: f64,
    max: f64,
    tolerance: f64,
    /// Highest rate that passed and lowest that failed so far.
    pub pass: Option<f64>,
    pub fail: Option<f64>,
}

/// Below `start / 2^MAX_HALVINGS` a search gives up: nothing passes.
const MAX_HALVINGS: i32 = 8;

/// The finest capacity tolerance: 0.1% of the rate.
const MIN_TOLERANCE: f64 = 1e-3;

impl Search {
    pub fn new(c: &CapacitySection) -> anyhow::Result<Search> {
        anyhow::ensure!(c.start > 0.0 && c.max >= c.start, "capacity needs 0 < start <= max");
        // At least MIN_TOLERANCE: below about 1e-16 `1 + tolerance` is 1,
        // the midpoint rounds to an end, and the search never ended (found
        // by a review); no run measures a rate that finely anyway.
        anyhow::ensure!(
            c.tolerance >= MIN_TOLERANCE && c.tolerance < 1.0,
            "capacity tolerance must be in [{MIN_TOLERANCE}, 1)"
        );
        anyhow::ensure!(
            c.probe_duration > 0.0 && c.probe_duration <= crate::harness::MAX_SECONDS,
            "capacity probe_duration must be positive and at most {} s (a week)",
            crate::harness::MAX_SECONDS
        );
        Ok(Search { start: c.start, max: c.max, tolerance: c.tolerance, pass: None, fail: None })
    }

    /// The next rate to probe, or `None` when the search is over.
    pub fn next(&self) -> Option<f64> {
        match (self.pass, self.fail) {
            (None, None) => Some(self.start),
            (Some(p), None) => (p < self.max).then(|| (p * 2.0).min(self.max)),
            (None, Some(f)) => (f / 2.0 >= self.start / 2f64.powi(MAX_HALVINGS)).then_some(f / 2.0),
            (Some(p), Some(f)) => (f / p > 1.0 + self.tolerance).then(|| (p * f).sqrt()),
        }
    }

    pub fn record(&mut self, rate: f64, passed: bool) {
        if passed {
            self.pass = Some(self.pass.map_or(rate, |p| p.max(rate)));
        } else {
            self.fail = Some(self.fail.map_or(rate, |f| f.min(rate)));
        }
    }
}

/// The machine a result was measured on (from /proc).
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
}

impl Machine {
    pub fn here() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
            .unwrap_or("unknown")
            .to_string();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        Machine { cpu, cpus: std::thread::available_parallelism().map_or(1, |n| n.get()), kernel }
    }
}

/// One target's result and verdicts.
#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    pub result: RunResult,
    pub verdicts: Vec<Verdict>,
    pub pass: bool,
}

/// What `gyre-bench sla` writes.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub name: String,
    pub description: String,
    pub file: String,
    pub machine: Machine,
    pub workload: String,
    pub limits: Vec<String>,
    pub plot: PlotClass,
    pub targets: Vec<TargetReport>,
    /// Targets whose run failed (unreachable, or broke off), with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedTarget>,
    pub pass: bool,
}

/// A target that gave no result.
#[derive(Clone, Debug, Serialize)]
pub struct FailedTarget {
    pub target: String,
    pub error: String,
}

/// A one-line description of the workload, for reports.
pub fn describe(cfg: &RunConfig) -> String {
    let m = &cfg.mix;
    let mut parts = Vec::new();
    for (share, name) in [(m.read, "read"), (m.update, "update"), (m.insert, "insert"), (m.rmw, "rmw")] {
        if share > 0.0 {
            parts.push(format!("{:.0}% {name}", share * 100.0));
        }
    }
    let load = match cfg.mode {
        Mode::Open { arrival, rate } => {
            format!("open loop, {} arrivals at {rate:.0} ops/s", format!("{arrival:?}").to_lowercase())
        }
        Mode::Closed { depth } => format!("closed loop, {} operations outstanding", cfg.connections * depth),
    };
    let size = match cfg.value_size {
        ValueSize::Fixed(n) => format!("{n} B"),
        ValueSize::Uniform { min, max } => format!("{min}-{max} B"),
    };
    format!(
        "{}; {} keys over {} records; {size} values; {load}; {} connections; {} s measured after {} s warm-up",
        parts.join(", "),
        format!("{:?}", cfg.dist).to_lowercase(),
        cfg.records,
        cfg.connections,
        cfg.duration,
        cfg.warmup
    )
}

/// The Markdown summary of a report whose verdicts come from `limits`.
pub fn markdown(r: &Report, limits: &[Limit]) -> String {
    let mut s = format!("# {}\n\n", r.name);
    if !r.description.is_empty() {
        s += &format!("{}\n\n", r.description);
    }
    s += &format!(
        "Workload: {}.\n\nMachine: {} ({} CPUs), Linux {}. Source: `{}`.\n\n",
        r.workload, r.machine.cpu, r.machine.cpus, r.machine.kernel, r.file
    );
    s += "| target | ops/s | p50 | p90 | p99 | p99.9 | p99.99 | max | errors | verdict |\n";
    s += "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n";
    for t in &r.targets {
        let res = &t.result;
        let l = res.latency_of("all").cloned().unwrap_or_default();
        s += &format!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            res.target,
            res.ops_per_sec,
            fmt_us(l.p50_us),
            fmt_us(l.p90_us),
            fmt_us(l.p99_us),
            fmt_us(l.p999_us),
            fmt_us(l.p9999_us),
            fmt_us(l.max_us),
            res.errors,
            if t.pass { "pass" } else { "**miss**" }
        );
    }
    for f in &r.failed {
        s += &format!("| {} | | | | | | | | | **failed**: {} |\n", f.target, f.error.replace('|', "\\|"));
    }
    for t in &r.targets {
        let res = &t.result;
        s += &format!("\n## {}\n\n", res.target);
        s += "| class | ops | avg | p50 | p99 | p99.9 | max |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
        for (class, l) in &res.latency {
            s += &format!(
                "| {class} | {} | {} | {} | {} | {} | {} |\n",
                l.count,
                fmt_us(l.avg_us),
                fmt_us(l.p50_us),
                fmt_us(l.p99_us),
                fmt_us(l.p999_us),
                fmt_us(l.max_us)
            );
        }
        let v = &res.versions;
        if v.total() > 0 {
            let pct = |n: u64| n as f64 * 100.0 / v.total() as f64;
            s += &format!(
                "\nReads by versions seen: 1: {:.4}%, 2: {:.4}%, 3: {:.4}%, 4 or more: {:.4}% (of {} reads that found the key; {} misses).\n",
                pct(v.one),
                pct(v.two),
                pct(v.three),
                pct(v.four_or_more),
                v.total(),
                res.read_misses
            );
        }
        if !t.verdicts.is_empty() {
            s += "\n| limit | measured | verdict |\n| --- | ---: | --- |\n";
            for (l, v) in limits.iter().zip(&t.verdicts) {
                let shown = match v.measured {
                    Some(_) => l.show(v.measured),
                    None => format!("n/a ({})", v.note.as_deref().unwrap_or("")),
                };
                s += &format!("| `{}` | {shown} | {} |\n", v.limit, if v.pass { "pass" } else { "**miss**" });
            }
        }
        if let Some(e) = &res.first_error {
            s += &format!("\nFirst error: `{e}`\n");
        }
    }
    s
}

/// Writes `<dir>/<name>.json`, `.md` and `.svg`; returns their paths.
pub fn write_report(dir: &Path, r: &Report, limits: &[Limit]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Not `with_extension`: a name with a dot ("run-1.5") keeps it.
    let path = |ext: &str| dir.join(format!("{}.{ext}", r.name));
    let json = path("json");
    std::fs::write(&json, serde_json::to_string_pretty(r)? + "\n")?;
    let md = path("md");
    std::fs::write(&md, markdown(r, limits))?;
    let svg = path("svg");
    std::fs::write(&svg, plot(r, limits))?;
    Ok(vec![json, md, svg])
}

/// Whether a point of the time series is of the measured span: its
/// interval began with it or after (a millisecond's slack for when the
/// sample was taken). One that ended just after the span began is
/// warm-up (found by a review: figure 5's first point was).
fn measured(p: &crate::harness::Point) -> bool {
    p.t > 0.0 && p.t - p.span >= -1e-3
}

/// Characters of a plot's title that fit its width.
const MAX_TITLE_CHARS: usize = 80;

/// The report's plot: each target's percentile curve and p99.9 over time.
pub fn plot(r: &Report, limits: &[Limit]) -> String {
    let series: Vec<crate::plot::Series> = r
        .targets
        .iter()
        .map(|t| crate::plot::Series {
            label: t.result.target.clone(),
            percentiles: t.result.curve.clone(),
            over_time: t
                .result
                .timeline
                .iter()
                .filter(|p| measured(p))
                .map(|p| {
                    let v = match r.plot {
                        PlotClass::All => p.p999_us,
                        PlotClass::Read => p.read_p999_us,
                        PlotClass::Write => p.write_p999_us,
                    };
                    (p.t, v)
                })
                .collect(),
        })
        .collect();
    // Each panel draws the limits on what it shows (found by a review:
    // every latency limit, of any class or statistic, was drawn on both):
    // by percentile, all operations' percentiles and maximum; over time,
    // the p99.9 of the class plotted.
    let lines = |of: &str, stat_ok: &dyn Fn(Stat) -> bool| -> Vec<(String, f64)> {
        limits.iter().filter_map(|l| l.latency_us(of, stat_ok).map(|us| (format!("SLA {}", l.text), us))).collect()
    };
    let by_percentile = lines("all", &|s| s != Stat::Avg);
    let plotted = match r.plot {
        PlotClass::All => "all",
        PlotClass::Read => "read",
        PlotClass::Write => "write",
    };
    let over_time = lines(plotted, &|s| s == Stat::P999);
    // A point's own span, to the hundredth of a second (the intervals
    // between sample times drift a little; `{:.1}` called 0.25 s "0.3").
    let interval = r.targets.first().and_then(|t| t.result.timeline.iter().find(|p| p.t > 0.0)).map(|p| {
        let s = format!("{:.2}", p.span);
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    });
    let class = match r.plot {
        PlotClass::All => "",
        PlotClass::Read => "read ",
        PlotClass::Write => "write ",
    };
    let label = match interval {
        Some(span) => format!("{class}p99.9 per {span} s interval"),
        None => format!("{class}p99.9 per interval"),
    };
    let title = if r.description.is_empty() { r.name.clone() } else { format!("{}: {}", r.name, r.description) };
    // The plot is 960 px wide: a long description is cut.
    let title: String = match title.char_indices().nth(MAX_TITLE_CHARS) {
        Some((i, _)) => format!("{}…", &title[..i]),
        None => title,
    };
    crate::plot::render_svg(&crate::plot::Plot {
        title: &title,
        over_time_label: &label,
        series: &series,
        percentile_limits: &by_percentile,
        over_time_limits: &over_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::Latency;
    use std::collections::BTreeMap;

    fn result(ops_per_sec: f64, p999: f64, errors: u64, offered: Option<f64>) -> RunResult {
        let mut latency = BTreeMap::new();
        let l = Latency { count: 100, p999_us: p999, p99_us: p999 / 2.0, ..Latency::default() };
        latency.insert("all".to_string(), l.clone());
        latency.insert("read".to_string(), l);
        RunResult {
            target: "t".into(),
            url: "gyre://x".into(),
            kind: "gyre",
            routing: "none",
            nodes: 1,
            shards: 1,
            mode: if offered.is_some() { "open" } else { "closed" },
            offered_rate: offered,
            ops: (ops_per_sec * 10.0) as u64,
            ops_per_sec,
            errors,
            timeouts: 0,
            first_error: None,
            read_misses: 0,
            stale_routes: 0,
            rmw_retries: 0,
            latency,
            versions: Default::default(),
            timeline: Vec::new(),
            load_seconds: None,
            generator_cpu_percent: None,
            machine_busy_percent: None,
            curve: Vec::new(),
            inserts: Vec::new(),
        }
    }

    #[test]
    fn limits_parse() {
        let l: Limit = "p99.9 < 1ms".parse().unwrap();
        assert_eq!(l.metric, Metric::Latency { class: "all".into(), stat: Stat::P999 });
        assert_eq!((l.cmp, l.value), (Cmp::Lt, 1000.0));
        let l: Limit = "read.p99 <= 500 us".parse().unwrap();
        assert_eq!(l.metric, Metric::Latency { class: "read".into(), stat: Stat::P99 });
        assert_eq!((l.cmp, l.value), (Cmp::Le, 500.0));
        assert_eq!("write.max < 2s".parse::<Limit>().unwrap().value, 2e6);
        assert_eq!("p99.99 < 750µs".parse::<Limit>().unwrap().value, 750.0);
        let t: Limit = "throughput >= 95%".parse().unwrap();
        assert_eq!((t.metric.clone(), t.value, t.relative), (Metric::Throughput, 0.95, true));
        let t: Limit = "throughput >= 40000 ops/s".parse().unwrap();
        assert_eq!((t.value, t.relative), (40000.0, false));
        assert_eq!("errors == 0".parse::<Limit>().unwrap().metric, Metric::Errors);
        assert_eq!("error_rate <= 0.1%".parse::<Limit>().unwrap().value, 0.001);
        for bad in [
            "p99.9 < 1",
            "p99.9 < 1 parsec",
            "p99.9 ~ 1ms",
            "p97 < 1ms",
            "scan.p99 < 1ms",
            "p99 < -1ms",
            "p99 < NaNms",
            "throughput",
            "error_rate < 1",
            "",
        ] {
            assert!(bad.parse::<Limit>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn verdicts() {
        let r = result(9_600.0, 800.0, 0, Some(10_000.0));
        let check = |s: &str| s.parse::<Limit>().unwrap().check(&r);
        assert!(check("p99.9 < 1ms").pass);
        assert!(!check("p99.9 < 800us").pass);
        assert!(check("p99.9 <= 800us").pass);
        assert!(check("read.p99 < 401us").pass);
        assert!(!check("read.p99 < 400us").pass);
        assert!(check("throughput >= 95%").pass);
        assert!(!check("throughput >= 97%").pass);
        assert!(check("throughput >= 9000").pass);
        assert!(check("errors == 0").pass);
        // A class with no operations cannot pass.
        let v = check("rmw.p99 < 1s");
        assert!(!v.pass && v.measured.is_none() && v.note.unwrap().contains("no rmw"));
        let closed = result(9_600.0, 800.0, 5, None);
        let v = "throughput >= 95%".parse::<Limit>().unwrap().check(&closed);
        assert!(!v.pass && v.note.is_some());
        let v = "error_rate <= 1%".parse::<Limit>().unwrap().check(&closed);
        assert!(v.pass && (v.measured.unwrap() - 5.0 / 96_005.0).abs() < 1e-9);
        assert!(!"errors == 0".parse::<Limit>().unwrap().check(&closed).pass);
        // Timeouts are counted in both `ops` and `errors`, once in the rate.
        let mut timed_out = result(9_600.0, 800.0, 5, None);
        timed_out.timeouts = 2;
        let v = "error_rate <= 1%".parse::<Limit>().unwrap().check(&timed_out);
        assert!((v.measured.unwrap() - 5.0 / 96_003.0).abs() < 1e-12);
    }

    #[test]
    fn sla_files_parse_and_reject_mistakes() {
        let text = r#"
            description = "d"
            targets = ["gyre://127.0.0.1:7700"]
            limits = ["p99.9 < 1ms", "errors == 0"]
            [workload]
            workload = "d"
            records = 1000
            value_size = { min = 10, max = 20 }
            [run]
            rate = 5000
            arrival = "constant"
        "#;
        let f: SlaFile = toml::from_str(text).unwrap();
        let c = f.config(5000.0).unwrap();
        assert_eq!(c.dist, KeyDist::Latest);
        assert_eq!(c.mix, Workload::D.mix());
        assert_eq!(c.mode, Mode::Open { arrival: Arrival::Constant, rate: 5000.0 });
        assert_eq!(c.value_size, ValueSize::Uniform { min: 10, max: 20 });
        assert_eq!(f.limits.len(), 2);
        let bad = |t: &str| {
            toml::from_str::<SlaFile>(t)
                .map_err(|e| e.to_string())
                .and_then(|f| f.config(1.0).map_err(|e| e.to_string()))
        };
        assert!(bad("[workload]\nworkload = \"a\"\nspeed = 3").is_err(), "unknown key");
        assert!(bad("limits = [\"p99 < 3 parsecs\"]\n[workload]\nworkload = \"a\"").is_err());
        assert!(bad("[workload]\nworkload = \"e\"").is_err(), "no workload E");
        assert!(bad("[run]\nrate = 1").is_err(), "no workload");
        assert!(bad("[workload]\nmix = { read = 0.5, update = 0.4 }").is_err(), "shares sum to 0.9");
        assert!(bad("[workload]\nworkload = \"a\"\n[run]\nconnections = 0").is_err());
        assert!(bad("[workload]\nworkload = \"c\"\n[run]\nmode = \"closed\"").is_ok());
        // What `load` checks beyond the run: limits that no run could judge.
        let check = |t: &str| toml::from_str::<SlaFile>(t).unwrap().check().map_err(|e| e.to_string());
        let closed = "[workload]\nworkload = \"c\"\n[run]\nmode = \"closed\"";
        assert!(check(&format!("limits = [\"errors == 0\"]\n{closed}")).is_ok());
        assert!(check(closed).unwrap_err().contains("no limits"));
        let e = check(&format!("limits = [\"throughput >= 95%\"]\n{closed}")).unwrap_err();
        assert!(e.contains("no offered rate"), "{e}");
        assert!(check(&format!("limits = [\"throughput >= 9000\"]\n{closed}")).is_ok());
        let e = check(&format!("limits = [\"update.p99 < 1ms\"]\n{closed}")).unwrap_err();
        assert!(e.contains("no operations of that class"), "{e}");
        // Found by a review: a max or an average of a class the workload
        // never runs, and settings of the other loop, were accepted.
        for stat in ["max", "avg"] {
            let e = check(&format!("limits = [\"update.{stat} < 1ms\"]\n{closed}")).unwrap_err();
            assert!(e.contains("no operations of that class"), "{stat}: {e}");
        }
        for setting in ["rate = 100", "arrival = \"constant\""] {
            let e = check(&format!("limits = [\"errors == 0\"]\n{closed}\n{setting}")).unwrap_err();
            assert!(e.contains("for mode = \"open\""), "{setting}: {e}");
        }
        let open = "limits = [\"errors == 0\"]\n[workload]\nworkload = \"c\"\n[run]\nrate = 100";
        assert!(check(open).is_ok());
        assert!(check(&format!("{open}\ndepth = 4")).unwrap_err().contains("for mode = \"closed\""));
    }

    /// Found by a review: `max_in_flight` in a closed-loop file and
    /// `theta` with uniform keys did nothing, silently; they are refused
    /// when given, and their defaults still apply where they do something.
    #[test]
    fn settings_that_would_do_nothing_are_refused() {
        let check = |t: &str| toml::from_str::<SlaFile>(t).unwrap().check().map_err(|e| e.to_string());
        let file = |workload: &str, run: &str| {
            format!("limits = [\"errors == 0\"]\n[workload]\nworkload = \"c\"\n{workload}\n[run]\n{run}")
        };
        let closed = "mode = \"closed\"";
        assert!(check(&file("", closed)).is_ok());
        let e = check(&file("", &format!("{closed}\nmax_in_flight = 8"))).unwrap_err();
        assert!(e.contains("max_in_flight is for mode = \"open\""), "{e}");
        assert!(check(&file("", "rate = 100\nmax_in_flight = 8")).is_ok());
        let e = check(&file("distribution = \"uniform\"\ntheta = 0.5", closed)).unwrap_err();
        assert!(e.contains("theta"), "{e}");
        assert!(check(&file("distribution = \"uniform\"", closed)).is_ok());
        assert!(check(&file("distribution = \"latest\"\ntheta = 0.5", closed)).is_ok());
        let f: SlaFile = toml::from_str(&file("theta = 0.5", "rate = 100\nmax_in_flight = 8")).unwrap();
        let c = f.config(100.0).unwrap();
        assert_eq!((c.theta, c.max_in_flight), (0.5, 8));
        let c = toml::from_str::<SlaFile>(&file("", "rate = 100")).unwrap().config(100.0).unwrap();
        assert_eq!((c.theta, c.max_in_flight), (DEFAULT_THETA, DEFAULT_MAX_IN_FLIGHT));
    }

    #[test]
    fn the_time_series_plots_only_intervals_of_the_measured_span() {
        let point = |t: f64, span: f64| crate::harness::Point {
            t,
            span,
            ops_per_sec: 0.0,
            errors: 0,
            p50_us: None,
            p99_us: None,
            p999_us: None,
            read_p999_us: None,
            write_p999_us: None,
        };
        assert!(!measured(&point(-0.9999, 1.0)));
        assert!(!measured(&point(0.0002, 1.0002)), "the warm-up's last second, sampled late");
        assert!(measured(&point(1.0002, 1.0)));
        assert!(measured(&point(0.5, 0.5)));
    }

    /// A run is judged by `errors == 0` too unless its file sets an error
    /// limit of its own (found by a review: latency limits alone passed a
    /// run in which most requests failed, their latency being in no
    /// histogram).
    #[test]
    fn limits_without_an_error_limit_imply_no_errors() {
        let latency: Vec<Limit> = vec!["p99.9 < 1ms".parse().unwrap()];
        let judged = judged_limits(&latency);
        assert_eq!(judged.len(), 2);
        let failing = result(9_600.0, 800.0, 56, Some(10_000.0));
        let (verdicts, pass) = judge(&judged, &failing);
        assert!(verdicts[0].pass && !verdicts[1].pass && !pass, "{verdicts:?}");
        assert!(verdicts[1].limit.contains("implied"), "{verdicts:?}");
        let tolerant: Vec<Limit> = vec!["p99.9 < 1ms".parse().unwrap(), "error_rate <= 1%".parse().unwrap()];
        assert_eq!(judged_limits(&tolerant), tolerant);
    }

    #[test]
    fn capacity_search_converges_on_the_boundary() {
        for boundary in [700.0, 3_000.0, 12_345.0, 90_000.0] {
            let c = CapacitySection { start: 1000.0, max: 200_000.0, tolerance: 0.05, probe_duration: 1.0 };
            let mut s = Search::new(&c).unwrap();
            let mut probes = 0;
            while let Some(rate) = s.next() {
                s.record(rate, rate <= boundary);
                probes += 1;
                assert!(probes < 40);
            }
            let (p, f) = (s.pass.unwrap(), s.fail.unwrap());
            assert!(p <= boundary && f > boundary && f / p <= 1.05, "{boundary}: {p} .. {f}");
        }
        // Nothing passes: the search ends with no passing rate.
        let mut s = Search::new(&CapacitySection { start: 1000.0, ..Default::default() }).unwrap();
        while let Some(rate) = s.next() {
            s.record(rate, false);
        }
        assert!(s.pass.is_none());
        // Everything passes up to the cap.
        let mut s = Search::new(&CapacitySection { start: 1000.0, max: 5000.0, ..Default::default() }).unwrap();
        while let Some(rate) = s.next() {
            s.record(rate, true);
        }
        assert_eq!((s.pass, s.fail), (Some(5000.0), None));
        // A tolerance finer than a run can measure is refused (one near
        // 1e-16 made the search repeat one rate for ever; found by a
        // review).
        let fine = CapacitySection { tolerance: 1e-17, ..Default::default() };
        assert!(Search::new(&fine).unwrap_err().to_string().contains("tolerance"));
        // A finite but huge probe is refused too (found by a review).
        let long = CapacitySection { probe_duration: 1e20, ..Default::default() };
        assert!(Search::new(&long).unwrap_err().to_string().contains("probe_duration"));
    }

    #[test]
    fn reports_render() {
        let mut res = result(9_600.0, 800.0, 0, Some(10_000.0));
        res.versions = crate::harness::VersionCounts { one: 990, two: 9, three: 1, four_or_more: 0 };
        let limits: Vec<Limit> = vec!["p99.9 < 1ms".parse().unwrap(), "rmw.p99 < 1ms".parse().unwrap()];
        let verdicts: Vec<Verdict> = limits.iter().map(|l| l.check(&res)).collect();
        let r = Report {
            name: "n".into(),
            description: "d".into(),
            file: "f.toml".into(),
            machine: Machine::here(),
            workload: "w".into(),
            limits: limits.iter().map(|l| l.text.clone()).collect(),
            plot: PlotClass::All,
            pass: false,
            targets: vec![TargetReport { result: res, pass: false, verdicts }],
            failed: vec![FailedTarget { target: "Redis".into(), error: "connecting to 127.0.0.1:1".into() }],
        };
        let md = markdown(&r, &limits);
        assert!(md.contains("| Redis | | | | | | | | | **failed**: connecting to 127.0.0.1:1 |"), "{md}");
        assert!(md.contains("| `p99.9 < 1ms` | 800 µs | pass |"), "{md}");
        assert!(md.contains("| `rmw.p99 < 1ms` | n/a (no rmw operations were measured) | **miss** |"), "{md}");
        assert!(md.contains("1: 99.0000%, 2: 0.9000%, 3: 0.1000%"), "{md}");
        let svg = plot(&r, &limits);
        assert!(svg.starts_with("<svg") && svg.contains("SLA p99.9 &lt; 1ms"));
        // A dot in the name stays in the file names (it is not an extension).
        let dir = std::env::temp_dir().join(format!("gyre-bench-report-{}", std::process::id()));
        let dotted = Report { name: "run-1.5".into(), ..r };
        let paths = write_report(&dir, &dotted, &limits).unwrap();
        let names: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["run-1.5.json", "run-1.5.md", "run-1.5.svg"]);
        assert!(paths.iter().all(|p| p.exists()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Found by a review: every latency limit (a read p99, a write max, an
    /// average) was drawn on both panels, which show all operations'
    /// percentiles and the plotted class's p99.9 over time.
    #[test]
    fn each_plot_panel_draws_only_the_limits_on_what_it_shows() {
        let texts = ["p99.9 < 1ms", "max < 9ms", "avg < 7ms", "read.p99 < 2ms", "write.p99.9 < 5ms", "errors == 0"];
        let limits: Vec<Limit> = texts.iter().map(|t| t.parse().unwrap()).collect();
        let report = |plot: PlotClass| Report {
            name: "n".into(),
            description: String::new(),
            file: "f.toml".into(),
            machine: Machine::here(),
            workload: "w".into(),
            limits: texts.iter().map(|t| t.to_string()).collect(),
            plot,
            pass: true,
            targets: vec![TargetReport {
                result: result(9_600.0, 800.0, 0, Some(10_000.0)),
                pass: true,
                verdicts: vec![],
            }],
            failed: vec![],
        };
        let drawn = |plot: PlotClass| {
            let svg = super::plot(&report(plot), &limits);
            let count = |t: &str| svg.matches(&format!(">SLA {}</text>", t.replace('<', "&lt;"))).count();
            texts.map(count)
        };
        // By percentile: all operations' p99.9 and max; over time: the p99.9
        // of the class plotted.
        assert_eq!(drawn(PlotClass::All), [2, 1, 0, 0, 0, 0]);
        assert_eq!(drawn(PlotClass::Write), [1, 1, 0, 0, 1, 0]);
        assert_eq!(drawn(PlotClass::Read), [1, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn a_class_needs_samples_in_proportion_to_its_share() {
        let mix = Mix { read: 0.9, update: 0.1, insert: 0.0, rmw: 0.0 };
        let needed = |l: &str| l.parse::<Limit>().unwrap().operations_needed(&mix);
        // p99 needs 200 samples: all of the operations, a tenth of them
        // updates, nine tenths reads.
        assert_eq!(needed("p99 < 1ms"), Some(200));
        assert_eq!(needed("update.p99 < 50ms"), Some(2000));
        assert_eq!(needed("write.p99 < 50ms"), Some(2000));
        assert_eq!(needed("read.p99.9 < 1ms"), Some(2223));
        assert_eq!(needed("max < 1ms"), Some(0));
        assert_eq!(needed("errors == 0"), Some(0));
        assert_eq!(needed("rmw.p99 < 1ms"), None, "no rmw operations in the mix");
        // Fewer samples than a percentile needs: the verdict says so.
        let mut r = result(9_600.0, 800.0, 0, Some(10_000.0));
        r.latency.get_mut("read").unwrap().count = 5000;
        let mut few = r.clone();
        few.latency.get_mut("read").unwrap().count = 150;
        let v = "read.p99.9 < 1ms".parse::<Limit>().unwrap().check(&few);
        assert!(v.pass && v.too_few_samples, "{v:?}");
        assert!(!"read.p99.9 < 1ms".parse::<Limit>().unwrap().check(&r).too_few_samples);
    }
}
