//! The SLA harness's load generator: runs one workload (`workload.rs`)
//! against one target (a Gyre node, a Gyre cluster driven client- or
//! server-side, or Redis) and measures what a user would feel.
//!
//! Design. `threads` OS threads (default 1: on a small machine the
//! generator competes with the server for cores), each a tokio
//! current-thread runtime with its share of the connections. On every
//! thread one *dispatcher* decides what is sent and when; connections only
//! carry requests:
//!
//! - open loop: requests arrive on a schedule (`Schedule`, constant or
//!   Poisson, `rate / threads` per thread), whatever the replies do. The
//!   dispatcher sleeps on a timerfd (microsecond precision; tokio's own
//!   timer has millisecond ticks, too coarse for sub-millisecond SLAs) and
//!   sends what is due. A request's latency counts from its *intended*
//!   send time, so a stall of the server, the network or the generator is
//!   charged to every request it delayed (no coordinated omission). A
//!   request due while its connection has `max_in_flight` outstanding
//!   waits in that connection's queue, still on the clock.
//! - closed loop: `connections × depth` operations are outstanding at all
//!   times, split exactly between the threads (at most `connections` of
//!   them); each completion dispatches the next one at once. This measures
//!   peak throughput, and its latency is not a user's.
//!
//! Each operation draws its key from the whole key space (so a zipfian
//! workload's hot keys are as hot as the law says; with several threads,
//! see below), and goes to a
//! connection of the endpoint that serves the key, the one with the least
//! outstanding: on a lone node the shard owning the key; on a cluster with
//! client routing the key's coordinator (first of its preference list), on
//! its owning shard; with server routing the owning shard of a node chosen
//! uniformly (it coordinates or forwards); on Redis its one address.
//!
//! Versions (Gyre): an update carries the newest context this thread has
//! seen for the key (from any reply), an insert none. Two updates of one
//! key in flight at once are concurrent, and both survive as siblings
//! until a later write, whose context covers them, collapses them: reads
//! report how many versions they saw (the paper's section 6.3). A
//! read-modify-write does what the client's `update` helper does: GET,
//! PUT with the GET's context, and again while the PUT reports siblings
//! (up to `MAX_UPDATE_ATTEMPTS`). With several threads, a thread redraws
//! until its key is one of `k ≡ thread (mod threads)` (up to 64 times,
//! then takes the key drawn), so contexts are rarely split between threads;
//! the redraw weights each thread's share of keys equally, which flattens a
//! zipfian law slightly. The SLA files all use one thread.
//!
//! Load phase: every record is written once (a Gyre record already there
//! gets a second PUT with the context that covers its siblings, so a store
//! loaded before ends with one version per record). Without a load, a Gyre
//! target's records are read once instead, so that updates carry their
//! contexts from the start (a blind write would add a sibling per run).
//! A run can continue an earlier one's inserts (`RunConfig::inserts`, for
//! a capacity search's probes): it inserts past them, reads them as records
//! that exist, and primes them with the loaded ones.
//!
//! A connection writes its queued requests and then reads replies: it
//! does not read while a write is blocked, which with large values and a
//! deep `max_in_flight` could stall it until the drain times out (the
//! requests then count as timeouts, not as lost).
//!
//! Time series: every completion (and every timeout after the run) also
//! lands in its thread's current *window* (a mutex the monitor swaps every
//! `interval`), which gives the live progress line and the latency-over-
//! time curves. The run's own
//! histograms count requests by intended send time within the measured
//! span, including those whose replies come after it ends.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use gyre::client::MAX_UPDATE_ATTEMPTS;
use gyre::wire::Request;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::net::{self, decode, resp_bulk, Contexts, Kind, Routing, Topology};
use crate::workload::{key_of, Arrival, InsertFrontier, KeyChooser, KeyDist, Mix, Op, Schedule, ValueSize};

/// Where a run sends its load: `gyre://HOST:PORT` (`?routing=server` for
/// server-driven coordination of a cluster) or `redis://HOST:PORT`, with
/// an optional `#NAME` that names it in reports.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    name: Option<String>,
    kind: Kind,
    addr: SocketAddr,
    routing: Routing,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let (rest, name) = match url.split_once('#') {
            Some((rest, name)) if !name.trim().is_empty() => (rest, Some(name.trim().to_string())),
            Some(_) => bail!("an empty #name in {url}"),
            None => (url, None),
        };
        let (base, routing) = match rest.split_once('?') {
            None => (rest, Routing::Client),
            Some((base, "routing=client")) => (base, Routing::Client),
            Some((base, "routing=server")) => (base, Routing::Server),
            Some((_, q)) => bail!("unknown target option {q:?} in {url} (only routing=client|server)"),
        };
        let (kind, addr) = net::parse_target(base)?;
        anyhow::ensure!(
            kind == Kind::Gyre || routing == Routing::Client,
            "routing=server only applies to gyre targets: {url}"
        );
        Ok(Target { url: url.to_string(), name, kind, addr, routing })
    }

    /// A short name for tables and plots: `gyre`, `gyre (server-driven)`, `redis`.
    pub fn label(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match (self.kind, self.routing) {
            (Kind::Gyre, Routing::Server) => format!("gyre {} server-driven", self.addr),
            _ => format!("{} {}", self.kind.name(), self.addr),
        }
    }
}

/// How requests are paced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Open { arrival: Arrival, rate: f64 },
    Closed { depth: usize },
}

/// Everything a run needs besides its target.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub mix: Mix,
    pub dist: KeyDist,
    pub theta: f64,
    /// Records written by the load phase: record numbers `0..records`.
    pub records: u64,
    pub value_size: ValueSize,
    /// Write every record before the run (not measured).
    pub load: bool,
    pub mode: Mode,
    pub connections: usize,
    /// Open loop: most requests outstanding on one connection.
    pub max_in_flight: usize,
    pub warmup: f64,
    pub duration: f64,
    /// Seconds per point of the time series and progress line.
    pub interval: f64,
    /// Generator threads; a closed loop uses at most `connections`.
    pub threads: usize,
    pub seed: u64,
    /// Print a progress line to stderr every interval.
    pub progress: bool,
    /// Where each generator thread's inserts start, by thread (empty: just
    /// past `records`): a capacity search's later probes continue where
    /// the one before stopped (`RunResult::inserts`). Restarted at
    /// `records`, they rewrote the records an earlier probe had inserted
    /// (on Gyre a PUT that makes siblings, then a second to collapse
    /// them), so that probes measured different things (found by a review).
    pub inserts: Vec<InsertState>,
}

/// Where one generator thread's inserts stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InsertState {
    /// The next record it inserts (in its residue class, see `Gen`).
    pub next: u64,
    /// The newest record its reads may draw: every insert of its own up to
    /// there has finished (`InsertFrontier`).
    pub newest: u64,
}

impl RunConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.mix.validate().map_err(anyhow::Error::msg)?;
        self.value_size.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.records >= 1 && self.records < u32::MAX as u64, "records must be in 1..2^32-1");
        anyhow::ensure!(self.theta > 0.0 && self.theta < 1.0, "theta must be between 0 and 1 (exclusive)");
        anyhow::ensure!(self.connections >= 1 && self.threads >= 1, "connections and threads must be positive");
        anyhow::ensure!(self.max_in_flight >= 1, "max_in_flight must be positive");
        let threads = self.threads as u64;
        anyhow::ensure!(
            self.inserts.is_empty()
                || self.inserts.len() == self.threads
                    && (0..)
                        .zip(&self.inserts)
                        .all(|(t, s)| s.next >= self.records && s.next % threads == t && s.newest < s.next),
            "inserts must continue a run of as many threads, each in its own residue class past the records"
        );
        anyhow::ensure!(
            self.duration > 0.0 && self.duration <= MAX_SECONDS && (0.0..=MAX_SECONDS).contains(&self.warmup),
            "duration must be positive and warmup not negative, both at most {MAX_SECONDS} s (a week)"
        );
        anyhow::ensure!(
            (0.05..=MAX_SECONDS).contains(&self.interval),
            "interval must be between 0.05 s and {MAX_SECONDS} s (a week)"
        );
        match self.mode {
            // Each thread's stream gets `rate / threads`, and its gaps must
            // fit a Duration too (a tiny rate panicked in the open loop).
            Mode::Open { rate, .. } => anyhow::ensure!(
                rate.is_finite() && rate / self.threads as f64 >= 1.0 / MAX_SECONDS,
                "rate must be finite and at least one per week per generator thread ({} threads)",
                self.threads
            ),
            Mode::Closed { depth } => anyhow::ensure!(
                depth >= 1 && self.connections.saturating_mul(depth) <= MAX_QUEUED,
                "depth must be positive, and connections × depth at most {MAX_QUEUED}"
            ),
        }
        Ok(())
    }
}

/// Latency summary of one class of operations, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub avg_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
}

impl Latency {
    /// From a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let q = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Latency {
            count: h.len(),
            avg_us: h.mean() / 1e3,
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            p9999_us: q(0.9999),
            max_us: h.max() as f64 / 1e3,
        }
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is valid")
}

/// Reads by the number of values they returned (section 6.3 of the paper).
#[derive(Clone, Debug, Default, Serialize)]
pub struct VersionCounts {
    pub one: u64,
    pub two: u64,
    pub three: u64,
    pub four_or_more: u64,
}

impl VersionCounts {
    fn add_read(&mut self, values: u64) {
        match values {
            0 => {}
            1 => self.one += 1,
            2 => self.two += 1,
            3 => self.three += 1,
            _ => self.four_or_more += 1,
        }
    }

    fn add(&mut self, o: &VersionCounts) {
        self.one += o.one;
        self.two += o.two;
        self.three += o.three;
        self.four_or_more += o.four_or_more;
    }

    pub fn total(&self) -> u64 {
        self.one + self.two + self.three + self.four_or_more
    }
}

/// One point of the time series (completions during one interval).
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// End of the interval, seconds since the measured span began
    /// (negative during the warm-up).
    pub t: f64,
    /// The interval's length in seconds: it began at `t - span`. (A
    /// sample is taken a little after its time, so an interval that ends
    /// just after the measured span began is warm-up: plots leave out
    /// intervals that began before it; found by a review.)
    pub span: f64,
    pub ops_per_sec: f64,
    pub errors: u64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub read_p999_us: Option<f64>,
    pub write_p999_us: Option<f64>,
}

/// The outcome of one run against one target.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub target: String,
    pub url: String,
    pub kind: &'static str,
    /// `client`, `server` (a cluster) or `none`.
    pub routing: &'static str,
    pub nodes: usize,
    pub shards: usize,
    pub mode: &'static str,
    pub offered_rate: Option<f64>,
    /// Operations whose intended send time fell in the measured span and
    /// that completed or timed out (the latency histograms count these).
    pub ops: u64,
    /// Operations that *completed* within the measured span, per second:
    /// an overloaded target's backlog, answered after the span, does not
    /// count.
    pub ops_per_sec: f64,
    /// Failed operations (error replies, timeouts at the end of the run,
    /// overflowed generator queues), within the measured span. Timeouts
    /// also go into the latency histograms at the time they waited.
    pub errors: u64,
    pub timeouts: u64,
    pub first_error: Option<String>,
    /// Reads that found no value.
    pub read_misses: u64,
    /// Replies a cluster node forwarded (it was not a replica of the key).
    pub stale_routes: u64,
    /// Read-modify-writes that had to start over (the PUT made siblings).
    pub rmw_retries: u64,
    /// By class: `all`, `read`, `write` (updates and inserts), `update`,
    /// `insert`, `rmw` (classes with no operations are left out).
    pub latency: BTreeMap<String, Latency>,
    pub versions: VersionCounts,
    pub timeline: Vec<Point>,
    pub load_seconds: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
    pub machine_busy_percent: Option<f64>,
    /// (quantile, µs) of all operations, for the plot.
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
    /// Where each thread's inserts stopped, by thread: a next run against
    /// the same store continues there (`RunConfig::inserts`).
    #[serde(skip)]
    pub inserts: Vec<InsertState>,
}

impl RunResult {
    pub fn latency_of(&self, class: &str) -> Option<&Latency> {
        self.latency.get(class)
    }
}

/// The longest warm-up, measured span or interval a run takes, and the
/// longest mean gap between a thread's arrivals, in seconds: a week. More
/// is a typo, and `Duration::from_secs_f64` (or adding the result to an
/// `Instant`) panics on finite values far past it (found by a review:
/// `warmup = 1e20` and a tiny `rate` did); a week keeps every instant a run
/// computes far inside the clock's range.
pub const MAX_SECONDS: f64 = 7.0 * 86_400.0;

/// Requests a connection may have queued (beyond those in flight) before
/// the generator counts new ones as failed: it is overloaded itself.
const MAX_QUEUED: usize = 100_000;

/// How much earlier than due an open-loop request may leave (it then
/// counts from when it left): waking for every single arrival would cost
/// more than this.
const EARLY: Duration = Duration::from_micros(20);

/// How long replies are awaited after the run before the rest count as
/// timeouts.
const DRAIN: Duration = Duration::from_secs(5);

/// A request waiting or in flight.
#[derive(Clone, Debug)]
struct Req {
    op: Op,
    record: u64,
    /// The value size of its PUTs, drawn when the operation is generated
    /// (in `dispatch`, like its key): drawn when a connection sent it, the
    /// draw took the generator's RNG at a time set by the network, and a
    /// seed no longer fixed the sequence (found by a review).
    size: usize,
    /// When it should have been sent (latency counts from here).
    intended: Instant,
    /// `None`: the first request of the operation. `Some(ctx)`: the PUT
    /// that follows a read-modify-write's GET, or a load write's second
    /// PUT that collapses siblings left by an earlier run.
    follow: Option<Vec<u8>>,
    attempt: u8,
    load: bool,
}

/// Counts of one thread, merged at the end.
struct Stats {
    by_op: [Histogram<u64>; 4],
    /// Operations that completed (successfully) inside the measured span.
    completed_in_span: u64,
    errors: u64,
    timeouts: u64,
    first_error: Option<String>,
    read_misses: u64,
    stale_routes: u64,
    rmw_retries: u64,
    versions: VersionCounts,
    load_errors: u64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            by_op: std::array::from_fn(|_| histogram()),
            completed_in_span: 0,
            errors: 0,
            timeouts: 0,
            first_error: None,
            read_misses: 0,
            stale_routes: 0,
            rmw_retries: 0,
            versions: VersionCounts::default(),
            load_errors: 0,
        }
    }

    fn fail(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    fn add(&mut self, o: &Stats) {
        for (a, b) in self.by_op.iter_mut().zip(&o.by_op) {
            a.add(b).expect("same bounds");
        }
        self.completed_in_span += o.completed_in_span;
        self.errors += o.errors;
        self.timeouts += o.timeouts;
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
        self.read_misses += o.read_misses;
        self.stale_routes += o.stale_routes;
        self.rmw_retries += o.rmw_retries;
        self.versions.add(&o.versions);
        self.load_errors += o.load_errors;
    }
}

/// Completions of one thread since the monitor last looked.
pub struct Window {
    pub all: Histogram<u64>,
    pub read: Histogram<u64>,
    pub write: Histogram<u64>,
    pub errors: u64,
    /// Of the operations in `all`, those that got no reply (timed out
    /// after the run): their wait is latency to plot, but they are not
    /// throughput (a review found a server that hung at the end shown as
    /// a spike of every timeout as completed operations).
    pub timed_out: u64,
}

impl Window {
    pub fn new() -> Window {
        Window { all: histogram(), read: histogram(), write: histogram(), errors: 0, timed_out: 0 }
    }

    /// An operation of `op` that took `ns`: in `all`, and in `read` or
    /// `write` if it is one.
    fn record(&mut self, op: Op, ns: u64) {
        let _ = self.all.record(ns.max(1));
        match op {
            Op::Read => drop(self.read.record(ns.max(1))),
            Op::Update | Op::Insert => drop(self.write.record(ns.max(1))),
            Op::Rmw => {}
        }
    }

    pub fn add(&mut self, o: &Window) {
        self.all.add(&o.all).expect("same bounds");
        self.read.add(&o.read).expect("same bounds");
        self.write.add(&o.write).expect("same bounds");
        self.errors += o.errors;
        self.timed_out += o.timed_out;
    }
}

impl Default for Window {
    fn default() -> Self {
        Window::new()
    }
}

/// One connection's queue, shared by the dispatcher and its task.
struct Slot {
    endpoint: usize,
    queue: RefCell<VecDeque<Req>>,
    /// Sent and not yet answered (here, not in the task, so that what is
    /// left unanswered at the end can be counted).
    in_flight: RefCell<VecDeque<InFlight>>,
    wake: Notify,
}

impl Slot {
    /// Queued plus in flight (the dispatcher picks the smallest).
    fn busy(&self) -> usize {
        self.queue.borrow().len() + self.in_flight.borrow().len()
    }
}

/// What the dispatcher draws from.
enum Source {
    /// Load phase: records `next, next + step, ...` below `end`, each
    /// written (`prime` false) or read (`prime` true: a store loaded by an
    /// earlier run, whose contexts this run must learn before it updates,
    /// or its first update of every key would be a new sibling).
    Load {
        next: u64,
        step: u64,
        end: u64,
        prime: bool,
    },
    Mix,
}

/// One thread's generator state.
struct Gen {
    kind: Kind,
    topo: Arc<Topology>,
    cfg: Arc<RunConfig>,
    thread: u64,
    threads: u64,
    rng: RefCell<fastrand::Rng>,
    keys: RefCell<KeyChooser>,
    source: RefCell<Source>,
    /// The newest record whose insert (and every earlier one of this
    /// thread's) has finished: `latest` reads at or below it.
    inserts: RefCell<InsertFrontier>,
    /// The next record this thread inserts.
    next_insert: Cell<u64>,
    contexts: RefCell<Contexts>,
    /// Scratch for the key being routed (no allocation per dispatch).
    key: RefCell<Vec<u8>>,
    slots: Vec<Rc<Slot>>,
    by_endpoint: Vec<Vec<usize>>,
    stats: RefCell<Stats>,
    window: Arc<Mutex<Window>>,
    /// Intended times in `[from, to)` are measured; `None`: nothing is (load).
    measure: Cell<Option<(Instant, Instant)>>,
    /// Operations dispatched and not finished.
    outstanding: Cell<usize>,
    /// Operations finished (the load phase watches it for progress).
    done: Cell<u64>,
    /// Closed loop: dispatch a new operation on every completion.
    refill: Cell<bool>,
    /// Set when nothing more is dispatched; tasks exit once drained.
    stop: Cell<bool>,
    /// Woken when `outstanding` reaches zero.
    idle: Notify,
    value: Vec<u8>,
}

impl Gen {
    /// Thread `thread`'s generator, with a slot per connection (to
    /// `endpoints[i]`), at the start of its load phase; no I/O.
    fn new(
        kind: Kind,
        topo: Arc<Topology>,
        cfg: Arc<RunConfig>,
        thread: usize,
        endpoints: &[usize],
        window: Arc<Mutex<Window>>,
    ) -> Gen {
        let threads = cfg.threads as u64;
        let mut by_endpoint = vec![Vec::new(); topo.endpoints.len()];
        let slots: Vec<Rc<Slot>> = endpoints
            .iter()
            .enumerate()
            .map(|(i, &e)| {
                by_endpoint[e].push(i);
                Rc::new(Slot {
                    endpoint: e,
                    queue: RefCell::new(VecDeque::new()),
                    in_flight: RefCell::new(VecDeque::new()),
                    wake: Notify::new(),
                })
            })
            .collect();
        let seed = thread_seed(&cfg, thread);
        // The first record past the loaded ones in this thread's residue
        // class, or where an earlier run's inserts stopped.
        let first_insert = cfg.records + (thread as u64 + threads - cfg.records % threads) % threads;
        let at =
            cfg.inserts.get(thread).copied().unwrap_or(InsertState { next: first_insert, newest: cfg.records - 1 });
        Gen {
            kind,
            topo,
            rng: RefCell::new(fastrand::Rng::with_seed(seed)),
            keys: RefCell::new(KeyChooser::new(cfg.dist, cfg.records, cfg.theta)),
            // Without a load, Gyre's records (with those this thread
            // inserted in earlier runs) are read once to learn their
            // contexts (see `Source::Load`); Redis needs nothing.
            source: RefCell::new(Source::Load {
                next: thread as u64,
                step: threads,
                end: match (cfg.load, kind) {
                    (true, _) => cfg.records,
                    (false, Kind::Gyre) => at.next,
                    (false, Kind::Redis) => 0,
                },
                prime: !cfg.load,
            }),
            inserts: RefCell::new(InsertFrontier::new(at.newest, at.next, threads)),
            next_insert: Cell::new(at.next),
            contexts: RefCell::new(Contexts::new()),
            key: RefCell::new(Vec::with_capacity(24)),
            slots,
            by_endpoint,
            stats: RefCell::new(Stats::new()),
            window,
            measure: Cell::new(None),
            outstanding: Cell::new(0),
            done: Cell::new(0),
            refill: Cell::new(true),
            stop: Cell::new(false),
            idle: Notify::new(),
            value: vec![b'x'; cfg.value_size.max()],
            thread: thread as u64,
            threads,
            cfg,
        }
    }

    /// Queues one operation (or a load write); false if the source is dry.
    fn dispatch(&self, intended: Instant) -> bool {
        let mut rng = self.rng.borrow_mut();
        let (op, record, load) = match &mut *self.source.borrow_mut() {
            Source::Load { next, step, end, prime } => {
                if *next >= *end {
                    return false;
                }
                let r = *next;
                *next += *step;
                (if *prime { Op::Read } else { Op::Insert }, r, true)
            }
            Source::Mix => {
                let op = self.cfg.mix.draw(&mut rng);
                let record = if op == Op::Insert {
                    let r = self.next_insert.get();
                    self.next_insert.set(r + self.threads);
                    r
                } else {
                    let mut keys = self.keys.borrow_mut();
                    let newest = self.inserts.borrow().newest();
                    let mut r = keys.next(&mut rng, newest);
                    // A thread keeps to its own residue class of keys
                    // (a draw that misses it 64 times in a row, with many
                    // threads, takes another thread's key).
                    for _ in 0..64 {
                        if r % self.threads == self.thread {
                            break;
                        }
                        r = keys.next(&mut rng, newest);
                    }
                    r
                };
                (op, record, false)
            }
        };
        // Every request draws one (a priming read may become a PUT).
        let size = self.cfg.value_size.draw(&mut rng);
        let endpoint = {
            let mut key = self.key.borrow_mut();
            key_of(record, &mut key);
            self.topo.route(&key, &mut rng)
        };
        drop(rng);
        let req = Req { op, record, size, intended, follow: None, attempt: 0, load };
        let Some(&best) = self.by_endpoint[endpoint].iter().min_by_key(|&&i| self.slots[i].busy()) else {
            // Planning gives every endpoint a connection on every thread.
            unreachable!("no connection to endpoint {endpoint}");
        };
        let slot = &self.slots[best];
        self.outstanding.set(self.outstanding.get() + 1);
        if slot.busy() >= MAX_QUEUED + self.cfg.max_in_flight {
            self.finish(&req, Instant::now(), Err("the generator's queue overflowed: the target is too slow".into()));
            return true;
        }
        slot.queue.borrow_mut().push_back(req);
        slot.wake.notify_one();
        true
    }

    fn measured(&self, t: Instant) -> bool {
        self.measure.get().is_some_and(|(from, to)| t >= from && t < to)
    }

    /// An operation ended at `now`.
    fn finish(&self, req: &Req, now: Instant, result: Result<(), String>) {
        let ns = now.saturating_duration_since(req.intended).as_nanos() as u64;
        if req.op == Op::Insert && !req.load {
            self.inserts.borrow_mut().finish(req.record);
        }
        if !req.load {
            let mut w = self.window.lock().expect("window lock");
            match &result {
                Ok(()) => w.record(req.op, ns),
                Err(_) => w.errors += 1,
            }
        }
        let mut stats = self.stats.borrow_mut();
        if req.load {
            if let Err(e) = result {
                stats.load_errors += 1;
                if stats.first_error.is_none() {
                    stats.first_error = Some(format!("load: {e}"));
                }
            }
        } else {
            if result.is_ok() && self.measured(now) {
                stats.completed_in_span += 1;
            }
            if self.measured(req.intended) {
                match result {
                    Ok(()) => {
                        let _ = stats.by_op[req.op.index()].record(ns.max(1));
                    }
                    Err(e) => stats.fail(e),
                }
            }
        }
        drop(stats);
        self.done.set(self.done.get() + 1);
        self.outstanding.set(self.outstanding.get() - 1);
        if self.refill.get() && !self.stop.get() && self.dispatch(now) {
            return;
        }
        if self.outstanding.get() == 0 {
            self.idle.notify_one();
        }
    }

    /// The run is over and replies stopped coming: every operation still
    /// queued or in flight that was due in the measured span counts as a
    /// timeout, an error whose latency is at least what it waited. Every
    /// one (measured or not) also goes into the time series, in the window
    /// it timed out in (the run's last point), so that a server that hangs
    /// at the end shows there (found by a review: it showed nothing).
    fn time_out_the_rest(&self, now: Instant) {
        let mut stats = self.stats.borrow_mut();
        let mut w = self.window.lock().expect("window lock");
        for slot in &self.slots {
            let queued = slot.queue.borrow();
            let in_flight = slot.in_flight.borrow();
            for req in queued.iter().chain(in_flight.iter().map(|f| &f.req)) {
                if req.load {
                    continue;
                }
                let ns = now.saturating_duration_since(req.intended).as_nanos() as u64;
                w.record(req.op, ns);
                w.errors += 1;
                w.timed_out += 1;
                if !self.measured(req.intended) {
                    continue;
                }
                let _ = stats.by_op[req.op.index()].record(ns.max(1));
                stats.timeouts += 1;
                stats.fail(format!("no reply {DRAIN:?} after the run"));
            }
        }
    }

    /// Encodes `req` as a frame for `shard` with id `id`.
    fn encode(&self, out: &mut Vec<u8>, key: &[u8], req: &Req, id: u64, shard: u16) {
        let get = matches!(req.op, Op::Read | Op::Rmw) && req.follow.is_none();
        let value = &self.value[..if get { 0 } else { req.size }];
        match (self.kind, get) {
            (Kind::Gyre, true) => Request::Get { key }.encode(out, id, shard, 0),
            (Kind::Gyre, false) => {
                let held = self.contexts.borrow();
                let context = match (&req.follow, req.op) {
                    (Some(ctx), _) => &ctx[..],
                    (None, Op::Update) => held.get(req.record).unwrap_or(&[]),
                    _ => &[],
                };
                Request::Put { key, context, value }.encode(out, id, shard, 0)
            }
            (Kind::Redis, true) => {
                out.extend_from_slice(b"*2\r\n$3\r\nGET\r\n");
                resp_bulk(out, key);
            }
            (Kind::Redis, false) => {
                out.extend_from_slice(b"*3\r\n$3\r\nSET\r\n");
                resp_bulk(out, key);
                resp_bulk(out, value);
            }
        }
    }

    /// A reply to `req` arrived at `now`: finish the operation or queue its
    /// next step on `slot`.
    fn on_reply(&self, slot: &Slot, mut req: Req, d: net::Decoded<'_>, now: Instant) {
        if self.kind == Kind::Gyre {
            self.contexts.borrow_mut().learn(req.record, d.ctx);
        }
        if let Some(e) = d.error {
            return self.finish(&req, now, Err(e));
        }
        if self.measured(req.intended) {
            self.stats.borrow_mut().stale_routes += u64::from(d.stale);
        }
        let again = |req: Req| slot.queue.borrow_mut().push_front(req);
        match (req.op, req.follow.is_some()) {
            // Priming: a key with siblings left by an earlier run is
            // collapsed with one PUT of the context that covers them.
            (Op::Read, false) if req.load => {
                if self.kind == Kind::Gyre && d.values > 1 {
                    req.op = Op::Insert;
                    req.follow = Some(d.ctx.to_vec());
                    return again(req);
                }
                self.finish(&req, now, Ok(()))
            }
            (Op::Read, _) => {
                if self.measured(req.intended) {
                    let mut s = self.stats.borrow_mut();
                    s.versions.add_read(d.values);
                    s.read_misses += u64::from(d.values == 0);
                }
                self.finish(&req, now, Ok(()))
            }
            // An insert (or load write) that found siblings: the record
            // was written by an earlier run. One more PUT with the reply's
            // context, which covers them all, leaves one version; the
            // insert's latency includes it.
            (Op::Insert, false) if self.kind == Kind::Gyre && d.values > 1 => {
                req.follow = Some(d.ctx.to_vec());
                again(req)
            }
            (Op::Rmw, false) => {
                req.follow = Some(d.ctx.to_vec());
                again(req)
            }
            (Op::Rmw, true) if self.kind == Kind::Gyre && d.values > 1 => {
                if (req.attempt as usize) + 1 >= MAX_UPDATE_ATTEMPTS {
                    return self.finish(&req, now, Err(format!("read-modify-write still has {} siblings", d.values)));
                }
                if self.measured(req.intended) {
                    self.stats.borrow_mut().rmw_retries += 1;
                }
                req.follow = None;
                req.attempt += 1;
                again(req)
            }
            _ => self.finish(&req, now, Ok(())),
        }
    }
}

struct InFlight {
    id: u64,
    req: Req,
}

/// One connection: sends what its slot queues, matches replies.
async fn conn_task(gen: Rc<Gen>, index: usize, mut stream: tokio::net::TcpStream, shard: u16) -> anyhow::Result<()> {
    let slot = gen.slots[index].clone();
    let cap = match gen.cfg.mode {
        Mode::Open { .. } => gen.cfg.max_in_flight,
        // Closed loop: whatever the dispatcher gave this connection.
        Mode::Closed { .. } => usize::MAX,
    };
    let mut wbuf = Vec::with_capacity(16 * 1024);
    let (mut rbuf, mut rstart, mut rend) = (vec![0u8; 64 * 1024], 0usize, 0usize);
    let mut next_id = 0u64;
    let mut key = Vec::with_capacity(24);
    loop {
        while slot.in_flight.borrow().len() < cap {
            let Some(req) = slot.queue.borrow_mut().pop_front() else { break };
            key_of(req.record, &mut key);
            gen.encode(&mut wbuf, &key, &req, next_id, shard);
            slot.in_flight.borrow_mut().push_back(InFlight { id: next_id, req });
            next_id += 1;
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        let idle = slot.in_flight.borrow().is_empty();
        if idle && gen.stop.get() && slot.queue.borrow().is_empty() {
            return Ok(());
        }
        if rend == rbuf.len() {
            if rstart > 0 {
                rbuf.copy_within(rstart..rend, 0);
                (rstart, rend) = (0, rend - rstart);
            } else {
                rbuf.resize(rbuf.len() * 2, 0);
            }
        }
        tokio::select! {
            n = stream.read(&mut rbuf[rend..]), if !idle => {
                let n = n?;
                if n == 0 {
                    bail!("the server closed the connection");
                }
                rend += n;
                let now = Instant::now();
                while let Some(d) = decode(gen.kind, &rbuf[rstart..rend])? {
                    rstart += d.len;
                    let f = {
                        let mut in_flight = slot.in_flight.borrow_mut();
                        let pos = match d.id {
                            Some(id) => in_flight.iter().position(|f| f.id == id),
                            None => (!in_flight.is_empty()).then_some(0),
                        };
                        pos.and_then(|p| in_flight.remove(p))
                    };
                    let Some(f) = f else {
                        bail!("a reply to no request in flight (id {:?})", d.id);
                    };
                    gen.on_reply(&slot, f.req, d, now);
                }
                if rstart == rend {
                    (rstart, rend) = (0, 0);
                }
            }
            () = slot.wake.notified() => {}
        }
    }
}

/// A timerfd: sleeps with microsecond precision inside tokio.
struct Timer {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl Timer {
    fn new() -> anyhow::Result<Timer> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        anyhow::ensure!(fd >= 0, "timerfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor this owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the descriptor and closes it on drop;
        // nothing else replaces or closes it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(owned) }.map_err(std::io::Error::from)?;
        Ok(Timer { fd })
    }

    async fn sleep(&self, d: Duration) -> anyhow::Result<()> {
        let d = d.max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long },
        };
        // SAFETY: valid fd and a valid itimerspec; relative time.
        let rc = unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        anyhow::ensure!(rc == 0, "timerfd_settime: {}", std::io::Error::last_os_error());
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads 8 bytes into a buffer of 8.
            let got = guard.try_io(|fd| {
                let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match got {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The open-loop dispatcher of one thread: sends on `schedule` from
/// `origin` until `end`.
async fn open_loop(gen: Rc<Gen>, mut schedule: Schedule, origin: Instant, end: Instant) -> anyhow::Result<()> {
    let timer = Timer::new()?;
    loop {
        let due = origin + Duration::from_secs_f64(schedule.peek());
        let now = Instant::now();
        if due >= end {
            // Stay until the end, so that the run lasts what it says.
            if end > now {
                timer.sleep(end - now).await?;
            }
            return Ok(());
        }
        if due > now + EARLY {
            timer.sleep(due - now).await?;
            continue;
        }
        schedule.next(&mut gen.rng.borrow_mut());
        gen.dispatch(due.min(now));
    }
}

/// The times every thread works to.
struct Timeline {
    run_from: Instant,
    measure_from: Instant,
    measure_to: Instant,
}

struct ThreadOut {
    stats: Stats,
    load_done: Option<Instant>,
    inserts: InsertState,
}

/// Connections per thread and endpoint: connection `c` goes to endpoint
/// `c % endpoints` on thread `(c / endpoints) % threads`; every endpoint
/// gets at least one connection on every thread.
fn plan(endpoints: usize, connections: usize, threads: usize) -> Vec<Vec<usize>> {
    let total = connections.max(endpoints * threads);
    let mut per: Vec<Vec<usize>> = vec![Vec::new(); threads];
    for c in 0..total {
        per[(c / endpoints) % threads].push(c % endpoints);
    }
    per
}

/// Each thread's share of a closed loop's `connections × depth`
/// outstanding operations, for the connections `plans` gives the threads:
/// `depth` for each of its connections when they are `connections` in all,
/// so every connection keeps `depth` outstanding (a review found 2 threads
/// splitting 3 connections' 6 operations 3 and 3, over 2 connections and
/// 1). When the plan opens more (each thread needs a connection to every
/// endpoint), the total is split evenly, the first threads taking one more.
/// (Each thread once took `total / threads` rounded up, so that 2 threads
/// kept 2 operations outstanding for 1 connection × depth 1; found by a
/// review.)
fn closed_shares(plans: &[Vec<usize>], connections: usize, depth: usize) -> Vec<usize> {
    let threads = plans.len();
    if plans.iter().map(Vec::len).sum::<usize>() == connections {
        return plans.iter().map(|p| p.len() * depth).collect();
    }
    let total = connections * depth;
    (0..threads).map(|t| total / threads + usize::from(t < total % threads)).collect()
}

/// Thread `thread`'s RNG seed.
fn thread_seed(cfg: &RunConfig, thread: usize) -> u64 {
    cfg.seed.wrapping_mul(0x9E37_79B9).wrapping_add(thread as u64)
}

/// A thread's runtime and generator, connected and loaded.
fn prepare_thread(spec: ThreadSpec<'_>) -> anyhow::Result<ThreadReady> {
    let ThreadSpec { target, topo, cfg, thread, endpoints, window, .. } = spec;
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    let local = tokio::task::LocalSet::new();
    let gen = Rc::new(Gen::new(target.kind, topo.clone(), cfg, thread, &endpoints, window));
    let tasks = local.block_on(&rt, async {
        let mut tasks = Vec::new();
        for (i, slot) in gen.slots.iter().enumerate() {
            let ep = &topo.endpoints[slot.endpoint];
            let stream =
                tokio::net::TcpStream::connect(ep.addr).await.with_context(|| format!("connecting to {}", ep.addr))?;
            stream.set_nodelay(true)?;
            tasks.push(tokio::task::spawn_local(conn_task(gen.clone(), i, stream, ep.shard)));
        }
        // The load (or priming) phase, closed loop.
        for _ in 0..16 * gen.slots.len() {
            if !gen.dispatch(Instant::now()) {
                break;
            }
        }
        let (mut seen, mut progress) = (gen.done.get(), Instant::now());
        while gen.outstanding.get() > 0 {
            tokio::select! {
                () = gen.idle.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    // A connection that failed, or a server that stopped
                    // answering, ends the load.
                    if let Some(t) = tasks.iter().position(|t| t.is_finished()) {
                        tasks.swap_remove(t).await??;
                        bail!("a connection ended during the load");
                    }
                    if gen.done.get() != seen {
                        (seen, progress) = (gen.done.get(), Instant::now());
                    } else if progress.elapsed() > DRAIN {
                        bail!("the load made no progress for {DRAIN:?}");
                    }
                }
            }
        }
        anyhow::Ok(tasks)
    })?;
    Ok(ThreadReady { rt, local, gen, tasks, load_done: Instant::now() })
}

/// A thread after its connections and load, ready to run.
struct ThreadReady {
    rt: tokio::runtime::Runtime,
    local: tokio::task::LocalSet,
    gen: Rc<Gen>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    load_done: Instant,
}

/// What one generator thread is given.
struct ThreadSpec<'a> {
    target: &'a Target,
    topo: Arc<Topology>,
    cfg: Arc<RunConfig>,
    thread: usize,
    /// The endpoint of each of its connections.
    endpoints: Vec<usize>,
    window: Arc<Mutex<Window>>,
    /// Operations it keeps outstanding in a closed loop ([`closed_shares`]).
    closed_share: usize,
}

/// Runs one generator thread: set up, wait for every thread, run, drain.
fn thread_main(spec: ThreadSpec<'_>, barrier: &Barrier, timeline: &OnceLock<Timeline>) -> anyhow::Result<ThreadOut> {
    let (cfg, thread, closed_share) = (spec.cfg.clone(), spec.thread, spec.closed_share);
    let ready = prepare_thread(spec);
    // Every thread reaches the barrier and the timeline, failed or not, so
    // that none waits forever; the first one there sets the timeline.
    barrier.wait();
    let tl = timeline.get_or_init(|| {
        let run_from = Instant::now() + Duration::from_millis(10);
        let measure_from = run_from + Duration::from_secs_f64(cfg.warmup);
        let measure_to = measure_from + Duration::from_secs_f64(cfg.duration);
        Timeline { run_from, measure_from, measure_to }
    });
    let ThreadReady { rt, local, gen, tasks, load_done } = ready?;
    *gen.source.borrow_mut() = Source::Mix;
    gen.measure.set(Some((tl.measure_from, tl.measure_to)));
    let seed = thread_seed(&cfg, thread);
    let drained = local.block_on(&rt, async {
        tokio::time::sleep_until(tl.run_from.into()).await;
        match cfg.mode {
            Mode::Closed { .. } => {
                gen.refill.set(true);
                for _ in 0..closed_share {
                    gen.dispatch(Instant::now());
                }
                tokio::time::sleep_until(tl.measure_to.into()).await;
            }
            Mode::Open { arrival, rate } => {
                gen.refill.set(false);
                let mut rng = fastrand::Rng::with_seed(seed ^ 0x5EED);
                let phase = thread as f64 / cfg.threads as f64;
                let schedule = Schedule::new(arrival, rate / cfg.threads as f64, phase, &mut rng);
                open_loop(gen.clone(), schedule, tl.run_from, tl.measure_to).await?;
            }
        }
        gen.stop.set(true);
        for s in &gen.slots {
            s.wake.notify_one();
        }
        let deadline = tokio::time::Instant::now() + DRAIN;
        for t in tasks {
            match tokio::time::timeout_at(deadline, t).await {
                Ok(r) => r??,
                Err(_) => return anyhow::Ok(false),
            }
        }
        anyhow::Ok(true)
    })?;
    if !drained {
        gen.time_out_the_rest(Instant::now());
    }
    let stats = gen.stats.take();
    let inserts = InsertState { next: gen.next_insert.get(), newest: gen.inserts.borrow().newest() };
    Ok(ThreadOut { stats, load_done: cfg.load.then_some(load_done), inserts })
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// Runs `cfg` against `target` and returns what it measured.
pub fn run(target: &Target, cfg: &RunConfig) -> anyhow::Result<RunResult> {
    let mut cfg = cfg.clone();
    // A closed loop's operations are split exactly between its threads
    // (`closed_share`); a thread beyond `connections` would make a
    // connection of its own (see `plan`) for a share of at most `depth`.
    if let Mode::Closed { .. } = cfg.mode {
        cfg.threads = cfg.threads.min(cfg.connections);
    }
    // After the cap: `inserts` has one entry per thread that runs.
    cfg.validate()?;
    let topo = Arc::new(net::discover(target.kind, target.addr, target.routing)?);
    let plans = plan(topo.endpoints.len(), cfg.connections, cfg.threads);
    let depth = match cfg.mode {
        Mode::Closed { depth } => depth,
        Mode::Open { .. } => 0,
    };
    let shares = closed_shares(&plans, cfg.connections, depth);
    let cfg = Arc::new(cfg);
    let windows: Vec<Arc<Mutex<Window>>> = (0..cfg.threads).map(|_| Arc::new(Mutex::new(Window::new()))).collect();
    let barrier = Barrier::new(cfg.threads);
    let timeline = OnceLock::new();
    let started = Instant::now();
    let label = target.label();
    let (outs, points, cpu) = std::thread::scope(|scope| {
        let handles: Vec<_> = plans
            .into_iter()
            .enumerate()
            .map(|(t, endpoints)| {
                let spec = ThreadSpec {
                    target,
                    topo: topo.clone(),
                    cfg: cfg.clone(),
                    thread: t,
                    endpoints,
                    window: windows[t].clone(),
                    closed_share: shares[t],
                };
                let (barrier, timeline) = (&barrier, &timeline);
                std::thread::Builder::new()
                    .name(format!("gyre-bench-{t}"))
                    .spawn_scoped(scope, move || thread_main(spec, barrier, timeline))
                    .expect("spawning a generator thread")
            })
            .collect();
        let running = |hs: &[std::thread::ScopedJoinHandle<'_, _>]| !hs.iter().all(|h| h.is_finished());
        while timeline.get().is_none() && running(&handles) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (points, cpu) = match timeline.get() {
            Some(tl) => monitor(&label, &cfg, tl, &windows, || running(&handles)),
            None => (Vec::new(), [None, None]),
        };
        let outs: Vec<anyhow::Result<ThreadOut>> =
            handles.into_iter().map(|h| h.join().expect("generator thread panicked")).collect();
        (outs, points, cpu)
    });
    let mut stats = Stats::new();
    let mut load_done: Option<Instant> = None;
    let mut inserts = Vec::new();
    for o in outs {
        let o = o?;
        stats.add(&o.stats);
        load_done = load_done.max(o.load_done);
        inserts.push(o.inserts);
    }
    anyhow::ensure!(stats.load_errors == 0, "{} load writes failed: {:?}", stats.load_errors, stats.first_error);
    let mut r = summarize(target, &topo, &cfg, stats, points, cpu, load_done.map(|d| (d - started).as_secs_f64()));
    r.inserts = inserts;
    Ok(r)
}

/// Samples the threads' windows every interval until they finish: the
/// time series, and the progress line. Returns the points and the CPU use
/// (generator, whole machine) over the measured span.
fn monitor(
    label: &str,
    cfg: &RunConfig,
    tl: &Timeline,
    windows: &[Arc<Mutex<Window>>],
    running: impl Fn() -> bool,
) -> (Vec<Point>, [Option<f64>; 2]) {
    let interval = Duration::from_secs_f64(cfg.interval);
    let mut points = Vec::new();
    let mut last = tl.run_from;
    let mut cpu_from = None;
    let mut cpu = [None, None];
    let sample = || (net::cpu_seconds(None), net::machine_seconds().map(|m| m.0));
    let mut stderr = std::io::stderr();
    loop {
        let alive = running();
        let now = Instant::now();
        if cpu_from.is_none() && now >= tl.measure_from {
            cpu_from = Some((sample(), now));
        }
        // CPU over the measured span: sampled at its end, or when the
        // threads finish if that comes first.
        if let Some(((g0, m0), t0)) = cpu_from.filter(|_| cpu == [None, None] && (now >= tl.measure_to || !alive)) {
            let (g1, m1) = sample();
            let wall = t0.elapsed().as_secs_f64().max(1e-9);
            let pct = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (b - a) / wall * 100.0);
            cpu = [pct(g0, g1), pct(m0, m1)];
        }
        if alive && now < last + interval {
            std::thread::sleep((last + interval - now).min(Duration::from_millis(20)));
            continue;
        }
        // Swap every thread's window out (a short lock each).
        let mut merged = Window::new();
        for w in windows {
            let taken = std::mem::take(&mut *w.lock().expect("window lock"));
            merged.add(&taken);
        }
        let span = now.saturating_duration_since(last).as_secs_f64().max(1e-9);
        last = now;
        let t = now.saturating_duration_since(tl.measure_from).as_secs_f64()
            - tl.measure_from.saturating_duration_since(now).as_secs_f64();
        let q = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1e3);
        let p = Point {
            t,
            span,
            ops_per_sec: (merged.all.len() - merged.timed_out) as f64 / span,
            errors: merged.errors,
            p50_us: q(&merged.all, 0.5),
            p99_us: q(&merged.all, 0.99),
            p999_us: q(&merged.all, 0.999),
            read_p999_us: q(&merged.read, 0.999),
            write_p999_us: q(&merged.write, 0.999),
        };
        if cfg.progress {
            let phase = if t <= 0.0 { "warm-up" } else { "measure" };
            let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}us"));
            let _ = write!(
                stderr,
                "\r{label} [{phase} {t:6.1}s] {:8.0} ops/s  p99 {:>8}  p99.9 {:>8}  errors {:<6}",
                p.ops_per_sec,
                us(p.p99_us),
                us(p.p999_us),
                p.errors
            );
            let _ = stderr.flush();
        }
        // The drain after the run adds no points unless it has completions.
        if now <= tl.measure_to + interval || merged.all.len() + merged.errors > 0 {
            points.push(p);
        }
        if !alive {
            break;
        }
    }
    if cfg.progress {
        let _ = writeln!(stderr);
    }
    (points, cpu)
}

fn summarize(
    target: &Target,
    topo: &Topology,
    cfg: &RunConfig,
    stats: Stats,
    timeline: Vec<Point>,
    cpu: [Option<f64>; 2],
    load_seconds: Option<f64>,
) -> RunResult {
    let mut latency = BTreeMap::new();
    let (mut all, mut write) = (histogram(), histogram());
    for op in Op::ALL {
        let h = &stats.by_op[op.index()];
        all.add(h).expect("same bounds");
        if matches!(op, Op::Update | Op::Insert) {
            write.add(h).expect("same bounds");
        }
        if !h.is_empty() {
            latency.insert(op.name().to_string(), Latency::of(h));
        }
    }
    if !write.is_empty() {
        latency.insert("write".to_string(), Latency::of(&write));
    }
    latency.insert("all".to_string(), Latency::of(&all));
    let curve = if all.is_empty() {
        Vec::new()
    } else {
        crate::plot::percentile_points().into_iter().map(|q| (q, all.value_at_quantile(q) as f64 / 1e3)).collect()
    };
    let ops = all.len();
    let (mode, offered_rate) = match cfg.mode {
        Mode::Open { rate, .. } => ("open", Some(rate)),
        Mode::Closed { .. } => ("closed", None),
    };
    RunResult {
        target: target.label(),
        url: target.url.clone(),
        kind: target.kind.name(),
        routing: topo.routing_name(),
        nodes: topo.nodes(),
        shards: topo.endpoints.len(),
        mode,
        offered_rate,
        ops,
        ops_per_sec: stats.completed_in_span as f64 / cfg.duration,
        errors: stats.errors,
        timeouts: stats.timeouts,
        first_error: stats.first_error,
        read_misses: stats.read_misses,
        stale_routes: stats.stale_routes,
        rmw_retries: stats.rmw_retries,
        latency,
        versions: stats.versions,
        timeline,
        load_seconds,
        generator_cpu_percent: cpu[0],
        machine_busy_percent: cpu[1],
        curve,
        inserts: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = Target::parse("gyre://127.0.0.1:7700").unwrap();
        assert_eq!((t.kind, t.routing), (Kind::Gyre, Routing::Client));
        let t = Target::parse("gyre://127.0.0.1:7700?routing=server").unwrap();
        assert_eq!(t.routing, Routing::Server);
        assert!(t.label().contains("server-driven"));
        assert_eq!(Target::parse("redis://127.0.0.1:6379").unwrap().kind, Kind::Redis);
        assert!(Target::parse("redis://127.0.0.1:6379?routing=server").is_err());
        assert!(Target::parse("gyre://127.0.0.1:7700?fast=yes").is_err());
        assert!(Target::parse("http://127.0.0.1:80").is_err());
        let t = Target::parse("gyre://127.0.0.1:7700?routing=server#server-driven").unwrap();
        assert_eq!((t.routing, t.label()), (Routing::Server, "server-driven".to_string()));
        assert_eq!(Target::parse("redis://127.0.0.1:6379#Redis 7").unwrap().label(), "Redis 7");
        assert!(Target::parse("redis://127.0.0.1:6379#").is_err());
    }

    /// Found by reviews: `?routing=server` against a lone node ran as a
    /// plain run (routing `none`) labelled server-driven, then under the
    /// plain target's label. It is refused; a plain target is not.
    #[test]
    fn server_routing_is_refused_on_a_lone_node() {
        let t = Target::parse("gyre://127.0.0.1:7700?routing=server").unwrap();
        let lone = |routing| net::single_routed(Kind::Gyre, t.addr, &[7700, 7701], 64, routing);
        let err = lone(t.routing).err().expect("refused").to_string();
        assert!(err.contains("needs a cluster"), "{err}");
        assert_eq!(lone(Routing::Client).unwrap().routing_name(), "none");
    }

    /// A valid open-loop configuration for tests to vary.
    fn config() -> RunConfig {
        RunConfig {
            mix: crate::workload::Workload::A.mix(),
            dist: KeyDist::Zipfian,
            theta: crate::workload::DEFAULT_THETA,
            records: 100,
            value_size: ValueSize::Fixed(10),
            load: true,
            mode: Mode::Open { arrival: Arrival::Poisson, rate: 100.0 },
            connections: 2,
            max_in_flight: 64,
            warmup: 1.0,
            duration: 1.0,
            interval: 1.0,
            threads: 1,
            seed: 1,
            progress: false,
            inserts: Vec::new(),
        }
    }

    /// Found by a review: finite but huge times, and a rate so low that
    /// its gaps overflow a Duration, passed validation and then panicked
    /// in `Duration::from_secs_f64`.
    #[test]
    fn huge_times_and_tiny_rates_are_refused() {
        config().validate().unwrap();
        let refused = |f: &dyn Fn(&mut RunConfig), what: &str| {
            let mut c = config();
            f(&mut c);
            let e = c.validate().expect_err(what).to_string();
            assert!(e.contains(what), "{what}: {e}");
        };
        refused(&|c| c.warmup = 1e20, "warmup");
        refused(&|c| c.duration = 1e20, "duration");
        refused(&|c| c.duration = f64::INFINITY, "duration");
        refused(&|c| c.interval = 1e20, "interval");
        refused(&|c| c.mode = Mode::Open { arrival: Arrival::Poisson, rate: 1e-300 }, "rate");
        // The bound is per generator thread: 1/s is fine on one thread.
        refused(
            &|c| {
                c.mode = Mode::Open { arrival: Arrival::Constant, rate: 1.0 };
                c.threads = 1_000_000;
            },
            "rate",
        );
        let mut week = config();
        (week.warmup, week.duration, week.interval) = (MAX_SECONDS, MAX_SECONDS, MAX_SECONDS);
        week.mode = Mode::Open { arrival: Arrival::Poisson, rate: 1.0 / MAX_SECONDS };
        week.validate().unwrap();
    }

    /// A generator of thread 0 over a lone two-shard Gyre node, connected
    /// to nothing: what it dispatches stays in its slots' queues. It starts
    /// in its load phase; `mix` skips that.
    fn offline(cfg: RunConfig, mix: bool) -> Gen {
        let addr = "127.0.0.1:7700".parse().unwrap();
        let topo = Arc::new(Topology::single(Kind::Gyre, addr, &[7700, 7701], 64));
        let gen = Gen::new(Kind::Gyre, topo, Arc::new(cfg), 0, &[0, 1], Arc::new(Mutex::new(Window::new())));
        if mix {
            *gen.source.borrow_mut() = Source::Mix;
        }
        gen
    }

    /// The value size of an encoded request (0 for a GET).
    fn encoded_size(gen: &Gen, req: &Req) -> usize {
        let mut out = Vec::new();
        gen.encode(&mut out, b"user1", req, 0, 0);
        let (h, total) = gyre::wire::split_frame(&out, gyre::wire::MAX_BODY_LEN).unwrap().unwrap();
        match Request::decode(h.opcode, &out[gyre::wire::HEADER_LEN..total]).unwrap() {
            Request::Put { value, .. } => value.len(),
            _ => 0,
        }
    }

    /// Found by a review: the value size was drawn when a connection sent
    /// a request, from the RNG the arrivals and keys are drawn from, so
    /// when requests were sent (set by the network) changed every later
    /// draw. Two generators of one seed, sending at different times and in
    /// another order, must generate the same operations.
    #[test]
    fn a_seed_fixes_the_sequence_whenever_requests_are_sent() {
        let mut cfg = config();
        cfg.mix = Mix { read: 0.4, update: 0.3, insert: 0.0, rmw: 0.3 };
        cfg.value_size = ValueSize::Uniform { min: 1, max: 1000 };
        let origin = Instant::now();
        // Sends what is queued after every `every`-th arrival, the slots
        // in order or reversed; returns (op, record, PUT size, due time)
        // in generation (due) order.
        let run = |every: usize, reversed: bool| {
            let gen = offline(cfg.clone(), true);
            let mut schedule = Schedule::new(Arrival::Poisson, 1000.0, 0.0, &mut fastrand::Rng::with_seed(9));
            let mut sent = Vec::new();
            let send = |sent: &mut Vec<(Op, u64, usize, Instant)>| {
                let order: Vec<&Rc<Slot>> =
                    if reversed { gen.slots.iter().rev().collect() } else { gen.slots.iter().collect() };
                for slot in order {
                    while let Some(mut req) = slot.queue.borrow_mut().pop_front() {
                        let mut size = encoded_size(&gen, &req);
                        if req.op == Op::Rmw {
                            // The PUT after the GET's reply (see `on_reply`).
                            req.follow = Some(Vec::new());
                            size = encoded_size(&gen, &req);
                        }
                        sent.push((req.op, req.record, size, req.intended));
                    }
                }
            };
            for i in 0..2000 {
                let due = schedule.next(&mut gen.rng.borrow_mut());
                gen.dispatch(origin + Duration::from_secs_f64(due));
                if i % every == 0 {
                    send(&mut sent);
                }
            }
            send(&mut sent);
            sent.sort_by_key(|s| s.3);
            sent
        };
        let a = run(1, false);
        let b = run(7, true);
        assert_eq!(a.len(), 2000);
        let sizes: std::collections::BTreeSet<usize> = a.iter().map(|s| s.2).collect();
        assert!(sizes.len() > 100, "sizes are drawn: {sizes:?}");
        assert!(a == b, "the sequences differ from operation {:?}", a.iter().zip(&b).position(|(x, y)| x != y));
    }

    /// The length of the first whole RESP command (an array of bulk
    /// strings) in `buf`, and its arguments.
    fn resp_command(buf: &[u8]) -> Option<(usize, Vec<Vec<u8>>)> {
        // A `*N` or `$N` header at `at`: N, and where what follows starts.
        let header = |at: usize| -> Option<(usize, usize)> {
            let eol = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
            Some((std::str::from_utf8(buf.get(at + 1..eol)?).ok()?.parse().ok()?, eol + 2))
        };
        let (n, mut at) = header(0)?;
        let mut args = Vec::new();
        for _ in 0..n {
            let (len, from) = header(at)?;
            args.push(buf.get(from..from + len + 2)?[..len].to_vec());
            at = from + len + 2;
        }
        Some((at, args))
    }

    /// A Redis stand-in that answers each connection's commands in order,
    /// one per `delay`. A GET finds a key if it was SET before or is one of
    /// the first `loaded` records (as if loaded).
    struct FakeRedis {
        addr: SocketAddr,
        loaded: u64,
        /// Commands held unanswered now, and the most at once, over all
        /// connections (counted down before a reply is written, so never
        /// more than the generator had outstanding).
        now: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
        /// Keys SET so far, and SETs of a key already set.
        set: Mutex<std::collections::HashSet<Vec<u8>>>,
        set_again: std::sync::atomic::AtomicU64,
    }

    impl FakeRedis {
        fn start(delay: Duration, loaded: u64) -> Arc<FakeRedis> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let fake = Arc::new(FakeRedis {
                addr: listener.local_addr().unwrap(),
                loaded,
                now: Default::default(),
                most: Default::default(),
                set: Default::default(),
                set_again: Default::default(),
            });
            let f = fake.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    f.serve(stream, delay);
                }
            });
            fake
        }

        /// One connection: a reader that answers each command as it comes
        /// in, and a writer that sends the answers one per `delay`.
        fn serve(self: &Arc<Self>, mut stream: std::net::TcpStream, delay: Duration) {
            use std::io::{Read, Write};
            use std::sync::atomic::Ordering::SeqCst;
            let Ok(mut out) = stream.try_clone() else { return };
            let (tx, rx) = std::sync::mpsc::channel::<&'static [u8]>();
            let (f, g) = (self.clone(), self.clone());
            std::thread::spawn(move || {
                for reply in rx {
                    std::thread::sleep(delay);
                    g.now.fetch_sub(1, SeqCst);
                    if out.write_all(reply).is_err() {
                        return;
                    }
                }
            });
            std::thread::spawn(move || {
                let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
                while let Ok(n @ 1..) = stream.read(&mut chunk) {
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some((len, args)) = resp_command(&buf) {
                        buf.drain(..len);
                        f.most.fetch_max(f.now.fetch_add(1, SeqCst) + 1, SeqCst);
                        if tx.send(f.answer(&args)).is_err() {
                            return;
                        }
                    }
                }
            });
        }

        fn answer(&self, args: &[Vec<u8>]) -> &'static [u8] {
            let mut set = self.set.lock().unwrap();
            match args {
                [cmd, key, _] if cmd == b"SET" => {
                    if !set.insert(key.clone()) {
                        self.set_again.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    b"+OK\r\n"
                }
                [cmd, key] if cmd == b"GET" => {
                    let record = key.strip_prefix(b"user").and_then(|n| std::str::from_utf8(n).ok()?.parse().ok());
                    if set.contains(key) || record.is_some_and(|r: u64| r < self.loaded) {
                        b"$1\r\nx\r\n"
                    } else {
                        b"$-1\r\n"
                    }
                }
                _ => b"-ERR unknown command\r\n",
            }
        }
    }

    /// Found by a review: with several threads a closed loop kept more
    /// than `connections × depth` operations outstanding (each thread
    /// took its share rounded up, and had a connection of its own), so
    /// 1 connection × depth 1 on 2 threads kept 2.
    #[test]
    fn a_closed_loop_keeps_exactly_connections_times_depth_outstanding() {
        for (threads, total) in [(1, 1), (2, 1), (2, 3), (3, 7), (4, 4), (5, 64)] {
            // More endpoints than connections per thread: split evenly.
            let shares = closed_shares(&plan(total + 1, total, threads), total, 1);
            assert_eq!(shares.iter().sum::<usize>(), total, "{threads} threads: {shares:?}");
            assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1, "{shares:?}");
        }
        // One endpoint: depth per connection, whatever the split.
        for (connections, threads, depth) in [(3, 2, 2), (5, 3, 4), (50, 2, 1)] {
            let plans = plan(1, connections, threads);
            let shares = closed_shares(&plans, connections, depth);
            let per: Vec<usize> = plans.iter().map(|p| p.len() * depth).collect();
            assert_eq!((shares.iter().sum::<usize>(), &shares), (connections * depth, &per), "{plans:?}");
        }
        for (connections, depth) in [(1, 1), (3, 1)] {
            let fake = FakeRedis::start(Duration::from_millis(50), 0);
            let mut cfg = config();
            cfg.mode = Mode::Closed { depth };
            (cfg.connections, cfg.threads, cfg.load) = (connections, 2, false);
            (cfg.warmup, cfg.duration, cfg.interval) = (0.0, 0.5, 0.25);
            let r = run(&Target::parse(&format!("redis://{}", fake.addr)).unwrap(), &cfg).unwrap();
            assert!(r.ops > 0, "{r:?}");
            let most = fake.most.load(std::sync::atomic::Ordering::SeqCst);
            assert!((1..=connections * depth).contains(&most), "{connections} × {depth}: {most} outstanding");
        }
    }

    /// Found by a review: every run's inserts started at `records`, so a
    /// capacity search's later probes (no load phase) inserted the records
    /// an earlier probe had inserted. Runs that continue where the one
    /// before stopped write only new records, and `latest` reads only
    /// records that exist.
    #[test]
    fn inserts_continue_where_the_run_before_stopped() {
        let fake = FakeRedis::start(Duration::ZERO, 100);
        let target = Target::parse(&format!("redis://{}", fake.addr)).unwrap();
        let mut cfg = config();
        cfg.mix = Mix { read: 0.5, update: 0.0, insert: 0.5, rmw: 0.0 };
        (cfg.dist, cfg.load, cfg.threads, cfg.connections) = (KeyDist::Latest, false, 2, 4);
        cfg.mode = Mode::Open { arrival: Arrival::Poisson, rate: 1000.0 };
        (cfg.warmup, cfg.duration, cfg.interval) = (0.0, 0.3, 0.1);
        let mut inserted = 0;
        for probe in 0..3 {
            let r = run(&target, &cfg).unwrap();
            assert_eq!(r.inserts.len(), 2);
            let set = fake.set.lock().unwrap().len();
            assert!(set > inserted, "probe {probe} inserted nothing");
            inserted = set;
            assert_eq!(fake.set_again.load(std::sync::atomic::Ordering::SeqCst), 0, "probe {probe} rewrote records");
            assert_eq!((r.errors, r.read_misses), (0, 0), "probe {probe} read records that are not there");
            cfg.inserts = r.inserts;
        }
        // On Gyre, a run without a load reads every record once first to
        // learn its context: the ones its thread inserted before too.
        let mut primed = config();
        primed.load = false;
        primed.inserts = vec![InsertState { next: 150, newest: 149 }];
        let gen = offline(primed, false);
        while gen.dispatch(Instant::now()) {}
        let mut read: Vec<u64> = gen.slots.iter().flat_map(|s| s.queue.take()).map(|r| r.record).collect();
        read.sort_unstable();
        assert_eq!(read, (0..150).collect::<Vec<u64>>());
        // What does not continue a run of these threads is refused.
        cfg.threads = 3;
        assert!(cfg.validate().unwrap_err().to_string().contains("inserts"));
    }

    /// Found by a review: operations timed out after the run went into
    /// the run's histograms only, so a server that hung at the end showed
    /// nothing on the latency-over-time plot.
    #[test]
    fn timeouts_reach_the_time_series() {
        let gen = offline(config(), true);
        let start = Instant::now();
        gen.measure.set(Some((start, start + Duration::from_secs(1))));
        let req = |op, intended| Req { op, record: 1, size: 10, intended, follow: None, attempt: 0, load: false };
        gen.slots[0].queue.borrow_mut().push_back(req(Op::Read, start));
        gen.slots[1].in_flight.borrow_mut().push_back(InFlight { id: 0, req: req(Op::Update, start) });
        // Due before the measured span: in the time series, not the run's counts.
        let before = start.checked_sub(Duration::from_millis(1)).unwrap();
        gen.slots[1].in_flight.borrow_mut().push_back(InFlight { id: 1, req: req(Op::Update, before) });
        gen.time_out_the_rest(start + DRAIN);
        let w = gen.window.lock().unwrap();
        assert_eq!((w.all.len(), w.read.len(), w.write.len(), w.errors), (3, 1, 2, 3));
        assert!(w.all.min() >= DRAIN.as_nanos() as u64 * 999 / 1000, "recorded with what they waited");
        drop(w);
        let stats = gen.stats.borrow();
        assert_eq!((stats.timeouts, stats.errors), (2, 2));
        // Their point shows their wait and their errors, and no throughput
        // (found by a review: all three counted as completed operations).
        let tl = Timeline { run_from: start, measure_from: start, measure_to: start };
        let (points, _) = monitor("t", &config(), &tl, std::slice::from_ref(&gen.window), || false);
        let last = points.last().expect("a point for the timeouts");
        assert_eq!((last.ops_per_sec, last.errors), (0.0, 3), "{last:?}");
        assert!(last.p999_us.is_some_and(|us| us >= DRAIN.as_micros() as f64 * 0.999), "{last:?}");
    }

    #[test]
    fn plans_give_every_endpoint_a_connection_on_every_thread() {
        for (e, c, t) in [(1, 50, 1), (6, 50, 2), (6, 4, 2), (3, 3, 3)] {
            let p = plan(e, c, t);
            assert_eq!(p.len(), t);
            assert_eq!(p.iter().map(Vec::len).sum::<usize>(), c.max(e * t));
            for per in &p {
                for ep in 0..e {
                    assert!(per.contains(&ep), "{e} endpoints, {c} connections, {t} threads: {p:?}");
                }
            }
        }
    }

    #[test]
    fn version_counts_bucket_reads() {
        let mut v = VersionCounts::default();
        for n in [0, 1, 1, 2, 3, 4, 9] {
            v.add_read(n);
        }
        assert_eq!((v.one, v.two, v.three, v.four_or_more, v.total()), (2, 1, 1, 2, 6));
    }

    #[test]
    fn latency_summary_and_window_merging() {
        let mut a = Window::new();
        let mut b = Window::new();
        for us in 1..=1000u64 {
            a.all.record(us * 1000).unwrap();
        }
        b.all.record(50_000_000).unwrap();
        b.errors = 2;
        let mut m = Window::new();
        m.add(&a);
        m.add(&b);
        assert_eq!(m.all.len(), 1001);
        assert_eq!(m.errors, 2);
        let l = Latency::of(&m.all);
        assert_eq!(l.count, 1001);
        // Three significant figures: within 0.3% of the exact order statistics.
        assert!((l.p50_us - 500.0).abs() / 500.0 < 0.003, "{l:?}");
        assert!((l.p99_us - 990.0).abs() / 990.0 < 0.003, "{l:?}");
        assert!((l.max_us - 50_000.0).abs() / 50_000.0 < 0.001, "{l:?}");
        // An empty window summarizes to zeros, not a panic.
        assert_eq!(Latency::of(&Window::new().all).count, 0);
    }
}
