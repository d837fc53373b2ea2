//! The network benchmark: a closed-loop load generator that drives a Gyre
//! node or cluster (binary frames) or a Redis server (RESP `GET`/`SET`)
//! with the same connections, the same key choice and the same timing;
//! only the codec differs.
//!
//! Design: `--threads` OS threads (default 1), each running a tokio
//! current-thread runtime (epoll) with its share of the connections as
//! local tasks; no thread per connection. Each connection keeps `--depth`
//! requests in flight: it encodes every request it may send into one
//! buffer, writes it with one `write`, then reads and parses every reply
//! that has arrived and sends as many new requests as it got replies.
//! Latency is the time from just before the write of a request to the
//! read that completed its reply, in an hdrhistogram per connection,
//! merged at the end. With `--rate` every connection sends on a fixed
//! schedule instead (rate / connections each, evenly spaced) and latency
//! counts from the scheduled time, so a stall of the server (or of the
//! generator) is charged to the requests it delayed. A paced request
//! counts when its scheduled time falls in the measured window, whenever
//! its reply comes: every request due before the window's end is sent,
//! and one still unanswered [`DRAIN`] after it is recorded with what it
//! waited, as an error. Closed loop, a reply counts when it is read within
//! the window. Errors are counted by the same rule as latencies.
//!
//! Routing for Gyre: a RING request tells a lone node (`NotClustered`)
//! from a cluster member, and a PING of every node gives its shard ports
//! and partition count. An endpoint is one shard of one node; each
//! connection is bound to one endpoint and draws its keys uniformly from
//! those the endpoint may serve:
//!
//! - lone node: the keys its shard owns (`shard_of(key, Q, shards)`), so
//!   nothing is forwarded between shards;
//! - cluster, `--routing client`: the keys whose preference list starts
//!   with the endpoint's node and that its shard owns there, so every
//!   request reaches the key's coordinator, on the owning shard;
//! - cluster, `--routing server`: every key the shard owns on its node
//!   (the connections are spread over all nodes, as behind a load
//!   balancer): the node coordinates if it is a replica of the key and
//!   forwards the request otherwise (its reply is then flagged
//!   STALE_ROUTE, counted as `stale_routes`).
//!
//! Redis is a lone node with one "shard" owning every key.
//!
//! Versions for Gyre: a write carries the newest context the thread has
//! seen for its key (from a PUT or GET reply, or the load), or an empty
//! one if none. Keys are split between threads, and a thread never has
//! two writes of one key in flight (a drawn key that has one is drawn
//! again, for both targets), so every write of a key goes out with the
//! context of the previous acknowledged write of it and no siblings
//! form; `max_siblings_seen` (values in GET replies), `max_put_siblings`
//! and the post-run check of sampled keys show it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use crate::harness::{Latency, MAX_SECONDS};
use crate::workload::push_decimal;
use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use gyre::core::partition::shard_of;
use gyre::core::ring::Ring;
use gyre::core::version::decode_context;
use gyre::wire::{flags, split_frame, ErrorCode, NodeInfo, Request, Response, HEADER_LEN, MAX_BODY_LEN};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Args)]
pub struct NetArgs {
    /// gyre://HOST:PORT (any shard of a node, or of any node of a
    /// cluster) or redis://HOST:PORT.
    #[arg(long)]
    pub target: String,
    /// How a Gyre cluster is driven: `client` sends each key straight to
    /// the owning shard of its coordinator (the first node of its
    /// preference list); `server` spreads the keys over every node, which
    /// coordinates or forwards. `server` is refused on a lone node or
    /// Redis (there is nothing to route).
    #[arg(long, value_enum, default_value_t = Routing::Client)]
    pub routing: Routing,
    /// TCP connections in all (spread evenly over the shards of every node).
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Requests each connection keeps in flight (1 = unpipelined).
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Share of GETs (0.0 to 1.0); the rest are SETs / PUTs.
    #[arg(long, default_value_t = 0.5)]
    pub read_ratio: f64,
    /// Key space: keys "key:0" .. "key:<keys-1>", chosen uniformly.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Requests per second in all: pace the connections (rate / connections
    /// each, evenly spaced) and measure latency from each request's
    /// scheduled send time. Unset: closed loop, as fast as replies come.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds run before the measurement starts (not measured).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Write every key once before the run (not measured). On Gyre the load
    /// writes with an empty context, so load a fresh node only.
    #[arg(long)]
    pub load: bool,
    /// Generator threads, each an event loop over its share of the connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Keys read back after the run to check their sibling count.
    #[arg(long, default_value_t = 200)]
    pub verify_keys: usize,
    /// Seed of the key and operation choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also report these processes' CPU use during the run (the server's
    /// pid; repeat it, or separate with commas, for every node of a cluster).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// How requests reach a cluster (`--routing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// To the key's coordinator, on its owning shard.
    Client,
    /// To any node, on the shard that owns the key there.
    Server,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Gyre,
    Redis,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Gyre => "gyre",
            Kind::Redis => "redis",
        }
    }
}

#[derive(Serialize)]
struct Output {
    target: String,
    /// `client` or `server` against a cluster, `none` against a lone node
    /// or Redis.
    routing: String,
    /// Members of the cluster's ring (1 for a lone node or Redis), and its
    /// default N, R and W (absent unless clustered).
    cluster_nodes: usize,
    n: Option<u8>,
    r: Option<u8>,
    w: Option<u8>,
    connections: usize,
    depth: usize,
    read_ratio: f64,
    /// The offered load of `--rate` (absent: closed loop).
    rate: Option<f64>,
    ops_per_sec: f64,
    get_ops_per_sec: f64,
    set_ops_per_sec: f64,
    avg_us: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    /// Operations slower than each of [`TAIL_THRESHOLDS_US`] (µs, count):
    /// how a tail is made, which a percentile alone does not say (one
    /// stall of every connection at once, or many smaller ones).
    slower_than: Vec<(u64, u64)>,
    /// GET and PUT latency apart (the `get` and `set` objects have more).
    read_avg_us: f64,
    read_p999_us: f64,
    write_avg_us: f64,
    write_p999_us: f64,
    errors: u64,
    /// Measured replies flagged STALE_ROUTE: the node that got the request
    /// was not a replica of its key and forwarded it (a part of `ops`).
    stale_routes: u64,
    /// Largest number of values in any GET reply during the run.
    max_siblings_seen: u64,
    /// Largest sibling count in any PUT reply (Gyre; 1 for Redis).
    max_put_siblings: u64,
    /// GETs that found no value.
    get_misses: u64,
    ops: u64,
    get: Latency,
    set: Latency,
    /// Sampled keys read back after the run, and the most values one had.
    verify_keys: usize,
    verify_max_values: u64,
    verify_keys_with_siblings: usize,
    first_error: Option<String>,
    server: String,
    /// Shards in all (of every node of a cluster).
    shards: usize,
    threads: usize,
    keys: u64,
    value_size: usize,
    duration_s: f64,
    warmup_s: f64,
    load_seconds: Option<f64>,
    load_ops_per_sec: Option<f64>,
    /// CPU time of this generator and of the `--server-pid`s during the
    /// measured window, in percent of one core, and per operation.
    generator_cpu_percent: Option<f64>,
    server_cpu_percent: Option<f64>,
    generator_cpu_us_per_op: Option<f64>,
    server_cpu_us_per_op: Option<f64>,
    /// Busy CPU time of the whole machine over the same span (all
    /// processes and the kernel), in percent of one core; the rest of it
    /// beyond generator and server is other load on the machine.
    machine_busy_percent: Option<f64>,
    /// Steal time over the same span (VM), in percent of one core.
    machine_steal_percent: Option<f64>,
}

/// One place connections go to: a shard of a node.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    pub(crate) shard: u16,
    /// Ring member index (0 on a lone node or Redis); the key choice's
    /// tests check by it.
    #[cfg_attr(not(test), allow(dead_code))]
    member: usize,
}

/// A cluster as the generator routes in it.
struct ClusterView {
    ring: Ring,
    n: u8,
    r: u8,
    w: u8,
    /// Per member: the index of its shard 0 in `Topology::endpoints`.
    first: Vec<usize>,
    /// Per member: its shard count.
    shards: Vec<usize>,
}

/// Where the requests go: every endpoint, and which of them serve a key.
pub(crate) struct Topology {
    kind: Kind,
    routing: Routing,
    partitions: u32,
    /// Grouped by member, each member's shards in shard order.
    pub(crate) endpoints: Vec<Endpoint>,
    cluster: Option<ClusterView>,
}

impl Topology {
    /// A lone node (or Redis) with one endpoint per shard.
    pub(crate) fn single(kind: Kind, addr: SocketAddr, ports: &[u16], partitions: u32) -> Topology {
        let endpoints = ports.iter().enumerate().map(|(i, &p)| Endpoint {
            addr: SocketAddr::new(addr.ip(), p),
            shard: i as u16,
            member: 0,
        });
        Topology { kind, routing: Routing::Client, partitions, endpoints: endpoints.collect(), cluster: None }
    }

    /// A cluster: `infos[m]` is member `m`'s PING reply.
    fn cluster(ring: Ring, n: u8, r: u8, w: u8, infos: &[NodeInfo], routing: Routing) -> anyhow::Result<Topology> {
        let members = ring.members();
        anyhow::ensure!(!members.is_empty() && infos.len() == members.len(), "one PING reply per ring member");
        anyhow::ensure!(n >= 1 && n as usize <= members.len(), "the cluster's N = {n} does not fit its ring");
        let partitions = ring.partitions();
        let mut endpoints = Vec::new();
        let (mut first, mut shards) = (Vec::new(), Vec::new());
        for (m, (member, info)) in members.iter().zip(infos).enumerate() {
            anyhow::ensure!(!info.ports.is_empty(), "member {} reports no shards", member.name);
            anyhow::ensure!(
                info.partitions == partitions,
                "member {} has {} partitions, the ring {partitions}",
                member.name,
                info.partitions
            );
            first.push(endpoints.len());
            shards.push(info.ports.len());
            for (i, &p) in info.ports.iter().enumerate() {
                endpoints.push(Endpoint { addr: SocketAddr::new(member.addr.ip(), p), shard: i as u16, member: m });
            }
        }
        let cluster = ClusterView { ring, n, r, w, first, shards };
        Ok(Topology { kind: Kind::Gyre, routing, partitions, endpoints, cluster: Some(cluster) })
    }

    /// The endpoint of member `m` that owns `key` there.
    fn on_member(&self, m: usize, key: &[u8]) -> usize {
        match &self.cluster {
            Some(c) => c.first[m] + shard_of(key, self.partitions, c.shards[m]),
            None => shard_of(key, self.partitions, self.endpoints.len()),
        }
    }

    /// The endpoint a key's load write and verification GET go to: its
    /// owning shard (on a cluster, on the key's coordinator).
    fn home(&self, key: &[u8]) -> usize {
        match (self.kind, &self.cluster) {
            (Kind::Redis, _) => 0,
            (Kind::Gyre, None) => self.on_member(0, key),
            (Kind::Gyre, Some(c)) => {
                let p = c.ring.partition_of_key(key);
                // A key's coordinator, first of its preference list, is
                // its partition's owner.
                self.on_member(c.ring.owner(p) as usize, key)
            }
        }
    }

    /// Calls `f` with every endpoint whose connections draw `key` in the run.
    fn drawn_by(&self, key: &[u8], mut f: impl FnMut(usize)) {
        match &self.cluster {
            Some(c) if self.routing == Routing::Server => (0..c.shards.len()).for_each(|m| f(self.on_member(m, key))),
            _ => f(self.home(key)),
        }
    }

    /// The endpoint one request for `key` goes to: its home, or with
    /// server routing the owning shard of a node drawn uniformly.
    pub(crate) fn route(&self, key: &[u8], rng: &mut fastrand::Rng) -> usize {
        match &self.cluster {
            Some(c) if self.routing == Routing::Server => self.on_member(rng.usize(..c.shards.len()), key),
            _ => self.home(key),
        }
    }

    /// Ring members (1 for a lone node or Redis).
    pub(crate) fn nodes(&self) -> usize {
        self.cluster.as_ref().map_or(1, |c| c.ring.members().len())
    }

    /// The routing mode as reported: `none` on a lone node or Redis.
    pub(crate) fn routing_name(&self) -> &'static str {
        match (&self.cluster, self.routing) {
            (None, _) => "none",
            (Some(_), Routing::Client) => "client",
            (Some(_), Routing::Server) => "server",
        }
    }
}

pub(crate) fn parse_target(t: &str) -> anyhow::Result<(Kind, SocketAddr)> {
    let (kind, rest) = if let Some(r) = t.strip_prefix("gyre://") {
        (Kind::Gyre, r)
    } else if let Some(r) = t.strip_prefix("redis://") {
        (Kind::Redis, r)
    } else {
        bail!("--target must be gyre://HOST:PORT or redis://HOST:PORT, got {t}");
    };
    let addr = rest
        .trim_end_matches('/')
        .to_socket_addrs()
        .with_context(|| format!("resolving {rest}"))?
        .next()
        .with_context(|| format!("{rest} resolves to no address"))?;
    Ok((kind, addr))
}

/// Sends one request to `addr` on a fresh connection and hands its reply
/// to `f`.
fn roundtrip<T>(
    addr: SocketAddr,
    req: &Request<'_>,
    f: impl FnOnce(Response<'_>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(DISCOVERY_TIMEOUT))?;
    let mut out = Vec::new();
    req.encode(&mut out, 0, gyre::wire::ANY_SHARD, 0);
    s.write_all(&out).with_context(|| format!("sending to {addr}"))?;
    let not_gyre = || format!("is {addr} a Gyre node?");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((h, total)) = split_frame(&buf, MAX_BODY_LEN).with_context(not_gyre)? {
            return f(Response::decode(h.opcode, &buf[HEADER_LEN..total]).with_context(not_gyre)?);
        }
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                bail!("no reply from {addr} within {DISCOVERY_TIMEOUT:?}: {}", not_gyre())
            }
            Err(e) => return Err(e).with_context(|| format!("reading from {addr}")),
        };
        anyhow::ensure!(n > 0, "{addr} closed the connection: {}", not_gyre());
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Latencies (µs) the output counts the operations slower than.
const TAIL_THRESHOLDS_US: [u64; 4] = [500, 1_000, 2_000, 5_000];

/// How long discovery waits for a node's reply to RING or PING.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A node's shard ports and partition count (one PING).
fn ping(addr: SocketAddr) -> anyhow::Result<NodeInfo> {
    roundtrip(addr, &Request::Ping, |r| match r {
        Response::Pong(info) => Ok(info),
        other => bail!("unexpected reply to PING from {addr}: {other:?}"),
    })
}

/// A lone node's (or Redis's) topology, for a run asked to route by
/// `routing`: server routing needs a cluster's nodes to coordinate, and is
/// refused (found by reviews: it ran as a plain run under a server-driven
/// label).
pub(crate) fn single_routed(
    kind: Kind,
    addr: SocketAddr,
    ports: &[u16],
    partitions: u32,
    routing: Routing,
) -> anyhow::Result<Topology> {
    anyhow::ensure!(
        routing == Routing::Client,
        "server routing needs a cluster, and {addr} is a lone node or Redis (route by client)"
    );
    Ok(Topology::single(kind, addr, ports, partitions))
}

/// Learns where to send: a RING request tells a cluster member (its ring
/// and quorums) from a lone node (`NotClustered`), and a PING of every
/// node its shard ports.
pub(crate) fn discover(kind: Kind, addr: SocketAddr, routing: Routing) -> anyhow::Result<Topology> {
    if kind == Kind::Redis {
        return single_routed(kind, addr, &[addr.port()], 1, routing);
    }
    let ring = roundtrip(addr, &Request::Ring, |r| match r {
        Response::Ring { n, r, w, ring } => {
            Ok(Some((n, r, w, Ring::decode(ring).map_err(|e| anyhow::anyhow!("bad ring from {addr}: {e}"))?)))
        }
        // A node that predates RING is a lone node too.
        Response::Error { code: ErrorCode::NotClustered | ErrorCode::UnknownOpcode, .. } => Ok(None),
        other => bail!("unexpected reply to RING from {addr}: {other:?}"),
    })?;
    match ring {
        None => {
            let info = ping(addr)?;
            anyhow::ensure!(!info.ports.is_empty(), "the node reports no shards");
            single_routed(kind, addr, &info.ports, info.partitions, routing)
        }
        Some((n, r, w, ring)) => {
            let infos = ring.members().iter().map(|m| ping(m.addr)).collect::<anyhow::Result<Vec<_>>>()?;
            Topology::cluster(ring, n, r, w, &infos, routing)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Get,
    Set,
}

/// Data every connection of a thread reads.
struct Shared {
    keys: Arc<Vec<Vec<u8>>>,
    value: Vec<u8>,
    /// Gyre only: per key, the newest context seen.
    contexts: RefCell<Contexts>,
    /// Per key, whether a write of it is in flight on this thread.
    writing: RefCell<Vec<bool>>,
}

/// A context and the sum of its counters (its age).
struct Held {
    sum: u64,
    bytes: Vec<u8>,
}

/// The newest context a generator thread has seen per key (by key number).
#[derive(Default)]
pub(crate) struct Contexts {
    /// foldhash (hashbrown's default), not SipHash: one lookup per reply is
    /// generator time, which a co-located run takes from the server.
    held: hashbrown::HashMap<u64, Held>,
}

impl Contexts {
    pub(crate) fn new() -> Contexts {
        Contexts::default()
    }

    pub(crate) fn get(&self, key: u64) -> Option<&[u8]> {
        self.held.get(&key).map(|h| &h.bytes[..])
    }

    /// Keeps `ctx` for `key` if it is newer than the one held. A context
    /// in a reply covers every version the replica held (siblings
    /// included), so of two contexts of one key the later covers the
    /// earlier unless they come from concurrent writes; the larger counter
    /// sum is taken as the later. A context also carries its key's tag and
    /// a cluster's a coordinator hint (`decode_context` reads every
    /// format); the bytes are passed back whole.
    pub(crate) fn learn(&mut self, key: u64, ctx: &[u8]) {
        if ctx.is_empty() {
            return;
        }
        let held = self.held.get_mut(&key);
        // The common case under reads: the context held already (nothing
        // written since); no need to decode it again.
        if held.as_ref().is_some_and(|h| h.bytes == ctx) {
            return;
        }
        let Ok(decoded) = decode_context(ctx) else { return };
        let sum: u64 = decoded.clock.iter().map(|(_, n)| n).sum();
        match held {
            Some(held) if held.sum < sum => {
                held.sum = sum;
                held.bytes.clear();
                held.bytes.extend_from_slice(ctx);
            }
            Some(_) => {}
            None => {
                self.held.insert(key, Held { sum, bytes: ctx.to_vec() });
            }
        }
    }
}

/// Draws before a write goes ahead on a key that already has one in flight
/// (only a key space not much larger than the requests in flight gets there).
const MAX_REDRAWS: usize = 64;

impl Shared {
    fn new(keys: Arc<Vec<Vec<u8>>>, value_size: usize) -> Shared {
        let n = keys.len();
        Shared {
            contexts: RefCell::new(Contexts::new()),
            writing: RefCell::new(vec![false; n]),
            keys,
            value: vec![b'x'; value_size],
        }
    }

    /// Marks a write of `key` in flight; false if one already is.
    fn begin_write(&self, key: u32) -> bool {
        !std::mem::replace(&mut self.writing.borrow_mut()[key as usize], true)
    }

    fn end_write(&self, key: u32) {
        self.writing.borrow_mut()[key as usize] = false;
    }

    /// The writes of a key form one chain here (each carries the context
    /// of the one before), so every context a reply brings covers or is
    /// covered by the one held.
    fn learn(&self, key: u32, ctx: &[u8]) {
        self.contexts.borrow_mut().learn(u64::from(key), ctx);
    }
}

/// A parsed reply.
pub(crate) struct Decoded<'a> {
    /// Request id (Gyre), or `None`: replies come in request order (Redis).
    pub(crate) id: Option<u64>,
    pub(crate) len: usize,
    pub(crate) error: Option<String>,
    /// Values of a GET reply, or siblings of a PUT reply.
    pub(crate) values: u64,
    /// Context of a Gyre reply (empty for Redis).
    pub(crate) ctx: &'a [u8],
    /// The reply was flagged STALE_ROUTE (Gyre: the node forwarded it).
    pub(crate) stale: bool,
}

/// The only part that differs between the targets.
fn encode(kind: Kind, shared: &Shared, out: &mut Vec<u8>, id: u64, shard: u16, op: Op, key: u32) {
    let k = &shared.keys[key as usize];
    match (kind, op) {
        (Kind::Gyre, Op::Get) => Request::Get { key: k }.encode(out, id, shard, 0),
        (Kind::Gyre, Op::Set) => {
            let ctxs = shared.contexts.borrow();
            let context = ctxs.get(u64::from(key)).unwrap_or(&[]);
            Request::Put { key: k, context, value: &shared.value }.encode(out, id, shard, 0)
        }
        (Kind::Redis, Op::Get) => {
            out.extend_from_slice(b"*2\r\n$3\r\nGET\r\n");
            resp_bulk(out, k);
        }
        (Kind::Redis, Op::Set) => {
            out.extend_from_slice(b"*3\r\n$3\r\nSET\r\n");
            resp_bulk(out, k);
            resp_bulk(out, &shared.value);
        }
    }
}

pub(crate) fn resp_bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b'$');
    push_decimal(out, b.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn decode(kind: Kind, buf: &[u8]) -> anyhow::Result<Option<Decoded<'_>>> {
    match kind {
        Kind::Gyre => decode_gyre(buf),
        Kind::Redis => decode_resp(buf),
    }
}

fn decode_gyre(buf: &[u8]) -> anyhow::Result<Option<Decoded<'_>>> {
    let Some((h, total)) = split_frame(buf, MAX_BODY_LEN)? else { return Ok(None) };
    let stale = h.flags & flags::STALE_ROUTE != 0;
    let mut d = Decoded { id: Some(h.request_id), len: total, error: None, values: 0, ctx: &[], stale };
    match Response::decode(h.opcode, &buf[HEADER_LEN..total])? {
        Response::Get { context, values } => {
            d.values = values.len() as u64;
            d.ctx = context;
        }
        Response::Put { context, siblings } => {
            d.values = siblings as u64;
            d.ctx = context;
        }
        Response::Error { code, message } => d.error = Some(format!("{code:?}: {message}")),
        other => bail!("unexpected reply {other:?}"),
    }
    Ok(Some(d))
}

/// One RESP reply: `+simple`, `-error`, `:int` or `$len bulk` / `$-1`.
fn decode_resp(buf: &[u8]) -> anyhow::Result<Option<Decoded<'_>>> {
    // The type byte first: a reply that starts with the CRLF has none, and
    // slicing the line after it panicked (found by a review).
    let Some(&kind) = buf.first() else { return Ok(None) };
    if !matches!(kind, b'+' | b'-' | b':' | b'$') {
        bail!("unexpected RESP reply type {:?}", kind as char);
    }
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    let line = &buf[1..eol];
    let mut d = Decoded { id: None, len: eol + 2, error: None, values: 1, ctx: &[], stale: false };
    match kind {
        b'+' | b':' => {}
        b'-' => d.error = Some(String::from_utf8_lossy(line).into_owned()),
        b'$' => {
            let n: i64 = std::str::from_utf8(line).ok().and_then(|s| s.parse().ok()).context("bad RESP bulk length")?;
            if n < 0 {
                d.values = 0;
            } else {
                d.len += n as usize + 2;
                if buf.len() < d.len {
                    return Ok(None);
                }
            }
        }
        other => bail!("unexpected RESP reply type {:?}", other as char),
    }
    Ok(Some(d))
}

/// Counts of one connection (merged per thread, then overall).
struct Tally {
    all: Histogram<u64>,
    get: Histogram<u64>,
    set: Histogram<u64>,
    gets: u64,
    sets: u64,
    get_misses: u64,
    errors: u64,
    stale_routes: u64,
    max_get_values: u64,
    max_put_siblings: u64,
    first_error: Option<String>,
}

impl Tally {
    /// One operation's latency, in the histogram of all and of its kind.
    fn record(&mut self, op: Op, latency: Duration) -> anyhow::Result<()> {
        let ns = (latency.as_nanos() as u64).max(1);
        self.all.record(ns)?;
        match op {
            Op::Get => self.get.record(ns)?,
            Op::Set => self.set.record(ns)?,
        }
        Ok(())
    }

    /// One operation done (throughput).
    fn complete(&mut self, op: Op) {
        match op {
            Op::Get => self.gets += 1,
            Op::Set => self.sets += 1,
        }
    }

    /// One failed operation (the first error is kept to be shown).
    fn fail(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    fn new() -> Tally {
        let h = crate::harness::histogram;
        Tally {
            all: h(),
            get: h(),
            set: h(),
            gets: 0,
            sets: 0,
            get_misses: 0,
            errors: 0,
            stale_routes: 0,
            max_get_values: 0,
            max_put_siblings: 0,
            first_error: None,
        }
    }

    fn add(&mut self, o: &Tally) {
        self.all.add(&o.all).expect("same histogram bounds");
        self.get.add(&o.get).expect("same histogram bounds");
        self.set.add(&o.set).expect("same histogram bounds");
        self.gets += o.gets;
        self.sets += o.sets;
        self.get_misses += o.get_misses;
        self.errors += o.errors;
        self.stale_routes += o.stale_routes;
        self.max_get_values = self.max_get_values.max(o.max_get_values);
        self.max_put_siblings = self.max_put_siblings.max(o.max_put_siblings);
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
    }
}

/// What a connection sends next.
enum Source<'a> {
    /// Each key of the slice once, as a SET.
    Load(std::slice::Iter<'a, u32>),
    /// Uniform keys of `keys`, GET with probability `read_ratio`, until `end`.
    Mix { rng: fastrand::Rng, read_ratio: f64, keys: &'a [u32], end: Instant },
}

impl Source<'_> {
    fn next(&mut self, now: Instant) -> Option<(Op, u32)> {
        match self {
            Source::Load(it) => it.next().map(|&k| (Op::Set, k)),
            Source::Mix { rng, read_ratio, keys, end } => {
                if now >= *end || keys.is_empty() {
                    return None;
                }
                let op = if rng.f64() < *read_ratio { Op::Get } else { Op::Set };
                Some((op, keys[rng.usize(..keys.len())]))
            }
        }
    }
}

struct InFlight {
    id: u64,
    op: Op,
    key: u32,
    sent: Instant,
}

/// One connection and its buffers.
struct Conn {
    kind: Kind,
    shard: u16,
    stream: tokio::net::TcpStream,
    shared: Rc<Shared>,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    in_flight: VecDeque<InFlight>,
    next_id: u64,
    /// How long after the window a paced run goes on sending, and the
    /// last replies are waited for ([`DRAIN`]; shorter in tests).
    drain: Duration,
}

impl Conn {
    async fn open(kind: Kind, addr: SocketAddr, shard: u16, shared: Rc<Shared>) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            kind,
            shard,
            stream,
            shared,
            wbuf: Vec::with_capacity(16 * 1024),
            rbuf: vec![0; 64 * 1024],
            rstart: 0,
            rend: 0,
            in_flight: VecDeque::new(),
            next_id: 0,
            drain: DRAIN,
        })
    }

    /// Runs `source` dry with up to `depth` requests in flight, each sent
    /// as soon as a slot is free or, with `pace`, at its scheduled time.
    /// What counts in `tally`: without a window (the load phase), every
    /// reply's errors; with one, the replies read within it, or with
    /// `pace` the requests scheduled within it (see the module doc).
    async fn drive(
        &mut self,
        mut source: Source<'_>,
        depth: usize,
        window: Option<(Instant, Instant)>,
        mut pace: Option<Pace>,
        tally: &mut Tally,
    ) -> anyhow::Result<()> {
        let mut more = true;
        // When the last request went (`more` turned false): the replies
        // still owed get until DRAIN after it.
        let mut all_sent_at: Option<Instant> = None;
        let mut read_at = Instant::now();
        loop {
            if more {
                let now = Instant::now();
                // Paced and still DRAIN behind the window's end (a server far
                // slower than the rate): what is left of the schedule is
                // never sent, and counts as waited for and failed.
                if let (Some(p), Some((_, to))) = (&pace, window) {
                    if now >= to + self.drain {
                        self.give_up_unsent(tally, p, to, now)?;
                        more = false;
                    }
                }
                'fill: while more && self.in_flight.len() < depth {
                    // Paced: a request goes once it is due (up to a timer
                    // tick early), and its latency counts from the earlier
                    // of its scheduled time and now: late sends count
                    // their wait, early ones are not credited.
                    let (sent, scheduled) = match &pace {
                        None => (now, now),
                        Some(p) if p.next <= now + TIMER_SLACK => (p.next.min(now), p.next),
                        Some(_) => break,
                    };
                    // One write per key in flight, so that every write
                    // carries the context of the previous one of its key.
                    // Paced, the source ends by the schedule, not the
                    // clock: a request due in the window goes, however late.
                    let mut draws = 0;
                    let (op, key) = loop {
                        let Some((op, key)) = source.next(scheduled) else {
                            more = false;
                            break 'fill;
                        };
                        draws += 1;
                        if op == Op::Get || self.shared.begin_write(key) || draws > MAX_REDRAWS {
                            break (op, key);
                        }
                    };
                    if let Some(p) = &mut pace {
                        p.next += p.interval;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    encode(self.kind, &self.shared, &mut self.wbuf, id, self.shard, op, key);
                    self.in_flight.push_back(InFlight { id, op, key, sent });
                }
                if !self.wbuf.is_empty() {
                    self.stream.write_all(&self.wbuf).await?;
                    self.wbuf.clear();
                }
                if !more {
                    all_sent_at = Some(Instant::now());
                }
            }
            // While paced with a free slot, reading waits only until the
            // next request is due.
            let due = pace.as_ref().filter(|_| more && self.in_flight.len() < depth).map(Pace::wake);
            if self.in_flight.is_empty() {
                match due {
                    None => return Ok(()),
                    Some(t) => {
                        tokio::time::sleep_until(t.into()).await;
                        continue;
                    }
                }
            }
            // Take every whole reply in the buffer; read until there is one.
            let mut got = 0;
            loop {
                while let Some(d) = decode(self.kind, &self.rbuf[self.rstart..self.rend])? {
                    self.rstart += d.len;
                    got += 1;
                    let pos = match d.id {
                        Some(id) => self.in_flight.iter().position(|f| f.id == id),
                        None => (!self.in_flight.is_empty()).then_some(0),
                    };
                    let Some(f) = pos.and_then(|p| self.in_flight.remove(p)) else {
                        bail!("a reply to no request in flight (id {:?})", d.id);
                    };
                    if self.kind == Kind::Gyre {
                        self.shared.learn(f.key, d.ctx);
                    }
                    if f.op == Op::Set {
                        self.shared.end_write(f.key);
                    }
                    // Latency and errors: by schedule when paced, else by
                    // when read. Throughput: by when read, always.
                    let read_in_window = within(window, read_at);
                    let counts = match window {
                        None => true,
                        Some(_) if pace.is_some() => within(window, f.sent),
                        Some(_) => read_in_window,
                    };
                    if let Some(e) = d.error {
                        if counts {
                            tally.fail(e);
                        }
                        continue;
                    }
                    match f.op {
                        Op::Get => {
                            tally.max_get_values = tally.max_get_values.max(d.values);
                            tally.get_misses += u64::from(d.values == 0 && counts);
                        }
                        Op::Set => tally.max_put_siblings = tally.max_put_siblings.max(d.values),
                    }
                    if read_in_window {
                        tally.complete(f.op);
                    }
                    if counts && window.is_some() {
                        tally.stale_routes += u64::from(d.stale);
                        tally.record(f.op, read_at.saturating_duration_since(f.sent))?;
                    }
                }
                if got > 0 {
                    break;
                }
                if self.rstart == self.rend {
                    (self.rstart, self.rend) = (0, 0);
                } else if self.rend == self.rbuf.len() {
                    if self.rstart > 0 {
                        self.rbuf.copy_within(self.rstart..self.rend, 0);
                        (self.rstart, self.rend) = (0, self.rend - self.rstart);
                    } else {
                        self.rbuf.resize(self.rbuf.len() * 2, 0);
                    }
                }
                let read = self.stream.read(&mut self.rbuf[self.rend..]);
                // All sent: the last replies get until DRAIN after the
                // last request went (and the window's end).
                let drain = window.filter(|_| !more).map(|(_, to)| to.max(all_sent_at.unwrap_or(to)) + self.drain);
                // Still sending, every slot taken by a server that does not
                // answer: look again when the sending ends (the window's
                // end; paced, the cut-off after it), or this read would
                // wait for good.
                let cutoff = window.filter(|_| more).map(|(_, to)| if pace.is_some() { to + self.drain } else { to });
                let n = match due.or(drain).or(cutoff) {
                    None => read.await?,
                    Some(t) => match tokio::time::timeout_at(t.into(), read).await {
                        Ok(n) => n?,
                        // The next request is due, or the sending ends:
                        // look again, then read on.
                        Err(_) if drain.is_none() => break,
                        Err(_) => {
                            self.give_up(tally, window, pace.is_some())?;
                            return Ok(());
                        }
                    },
                };
                if n == 0 {
                    bail!("the server closed the connection");
                }
                self.rend += n;
                read_at = Instant::now();
            }
        }
    }

    /// The replies still owed [`DRAIN`] after the last send: a paced
    /// request scheduled in the window is recorded with what it has waited,
    /// as an error (a closed-loop one read now would be past the window
    /// anyway).
    fn give_up(&mut self, tally: &mut Tally, window: Option<(Instant, Instant)>, paced: bool) -> anyhow::Result<()> {
        let now = Instant::now();
        for f in self.in_flight.drain(..) {
            if paced && within(window, f.sent) {
                tally.record(f.op, now.saturating_duration_since(f.sent))?;
                tally.fail(format!("no reply {:?} after the run", self.drain));
            }
        }
        Ok(())
    }

    /// What is left of a paced schedule [`DRAIN`] after the window's end
    /// `to` (a server far slower than the rate): never sent, each slot
    /// recorded with what it has waited, as an error (in the histogram of
    /// all only: no operation was drawn for it).
    fn give_up_unsent(&self, tally: &mut Tally, pace: &Pace, to: Instant, now: Instant) -> anyhow::Result<()> {
        let mut at = pace.next;
        while at < to {
            tally.all.record((now.saturating_duration_since(at).as_nanos() as u64).max(1))?;
            tally.fail(format!("not sent by {:?} after the run: the server fell behind the rate", self.drain));
            at += pace.interval;
        }
        Ok(())
    }
}

/// Whether `at` falls in the measured `window`.
fn within(window: Option<(Instant, Instant)>, at: Instant) -> bool {
    window.is_some_and(|(from, to)| at >= from && at < to)
}

/// How long a run waits for its last replies after the measured window.
const DRAIN: Duration = Duration::from_secs(5);

/// How early a paced request may go: tokio's timer fires on whole
/// milliseconds, at or after the deadline, so a connection wakes up to
/// this much before a send is due and sends then (not a tick late).
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// A connection's send schedule under `--rate`.
struct Pace {
    /// When the next request is due.
    next: Instant,
    /// Time between two requests of this connection.
    interval: Duration,
}

impl Pace {
    /// When to wake for the next request.
    fn wake(&self) -> Instant {
        self.next.checked_sub(TIMER_SLACK).unwrap_or(self.next)
    }
}

/// One connection's assignment.
struct ConnPlan {
    /// Its number among all connections (its place in the `--rate` schedule).
    index: usize,
    addr: SocketAddr,
    shard: u16,
    /// Keys it draws from in the run (shared by the connections of its
    /// thread and endpoint).
    keys: Arc<Vec<u32>>,
    /// Keys it writes in the load phase.
    load: Vec<u32>,
}

/// The times every thread works to.
struct Timeline {
    /// The run (warm-up and measurement) starts: the `--rate` schedule's origin.
    run_from: Instant,
    measure_from: Instant,
    measure_to: Instant,
}

struct ThreadResult {
    tally: Tally,
    load_errors: u64,
    load_first_error: Option<String>,
}

#[allow(clippy::too_many_arguments)]
fn thread_main(
    kind: Kind,
    plans: Vec<ConnPlan>,
    keys: Arc<Vec<Vec<u8>>>,
    args: &NetArgs,
    thread: usize,
    barrier: &Barrier,
    timeline: &OnceLock<Timeline>,
    load_done: &OnceLock<Instant>,
) -> anyhow::Result<ThreadResult> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    let local = tokio::task::LocalSet::new();
    let shared = Rc::new(Shared::new(keys, args.value_size));
    let setup = local.block_on(&rt, async {
        let mut conns = Vec::with_capacity(plans.len());
        for p in &plans {
            conns.push(Conn::open(kind, p.addr, p.shard, shared.clone()).await?);
        }
        anyhow::Ok(conns)
    });
    // Every thread reaches the barriers even when its setup failed, so
    // that the others do not wait forever.
    let mut conns = match setup {
        Ok(c) => Some(c),
        Err(e) => {
            barrier.wait();
            barrier.wait();
            return Err(e);
        }
    };
    let mut load_tally = Tally::new();
    if args.load {
        let depth = args.depth.max(16);
        let done = local.block_on(&rt, async {
            let mut tasks = Vec::new();
            for (mut c, p) in conns.take().expect("connected").into_iter().zip(&plans) {
                let load = p.load.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let mut t = Tally::new();
                    c.drive(Source::Load(load.iter()), depth, None, None, &mut t).await.map(|()| (c, t))
                }));
            }
            let mut back = Vec::new();
            for t in tasks {
                let (c, t) = t.await??;
                load_tally.add(&t);
                back.push(c);
            }
            anyhow::Ok(back)
        });
        match done {
            Ok(c) => conns = Some(c),
            Err(e) => {
                barrier.wait();
                barrier.wait();
                return Err(e);
            }
        }
    }
    // All loads are done: the first thread through sets the timeline.
    if barrier.wait().is_leader() {
        let now = Instant::now();
        let _ = load_done.set(now);
        let from = now + Duration::from_secs_f64(args.warmup);
        let measure_to = from + Duration::from_secs_f64(args.duration);
        let _ = timeline.set(Timeline { run_from: now, measure_from: from, measure_to });
    }
    barrier.wait();
    let tl = timeline.get().expect("set by the leader");
    let window = (tl.measure_from, tl.measure_to);
    let tally = local.block_on(&rt, async {
        let mut tasks = Vec::new();
        for (i, (mut c, p)) in conns.take().expect("connected").into_iter().zip(plans).enumerate() {
            let seed = args.seed.wrapping_mul(1_000_003).wrapping_add((thread * 100_000 + i) as u64);
            let (read_ratio, depth) = (args.read_ratio, args.depth);
            // Connection c of C sends at run_from + (c + k C) / rate, k = 0, 1, ...
            let pace = args.rate.map(|rate| Pace {
                next: tl.run_from + Duration::from_secs_f64(p.index as f64 / rate),
                interval: Duration::from_secs_f64(args.connections as f64 / rate),
            });
            tasks.push(tokio::task::spawn_local(async move {
                let mut t = Tally::new();
                let src = Source::Mix { rng: fastrand::Rng::with_seed(seed), read_ratio, keys: &p.keys, end: window.1 };
                c.drive(src, depth, Some(window), pace, &mut t).await?;
                anyhow::Ok(t)
            }));
        }
        let mut all = Tally::new();
        for t in tasks {
            all.add(&t.await??);
        }
        anyhow::Ok(all)
    })?;
    Ok(ThreadResult { tally, load_errors: load_tally.errors, load_first_error: load_tally.first_error })
}

/// utime + stime of the given processes in seconds, summed
/// (`/proc/PID/stat`, 100 ticks/s).
fn cpu_seconds_of(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|&p| cpu_seconds(Some(p))).sum()
}

/// utime + stime of a process in seconds (`/proc/PID/stat`, 100 ticks/s).
pub(crate) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Busy and steal time of the whole machine in seconds (`/proc/stat`).
pub(crate) fn machine_seconds() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = text.lines().next()?.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4)?;
    Some(((total - idle) as f64 / 100.0, *f.get(7)? as f64 / 100.0))
}

/// GETs `n` sampled keys one at a time and returns (checked, most values,
/// keys with more than one value).
fn verify(kind: Kind, topo: &Topology, keys: &Arc<Vec<Vec<u8>>>, n: usize) -> anyhow::Result<(usize, u64, usize)> {
    let n = n.min(keys.len());
    if n == 0 {
        return Ok((0, 0, 0));
    }
    let shared = Shared::new(keys.clone(), 0);
    let mut streams: Vec<Option<std::net::TcpStream>> = (0..topo.endpoints.len()).map(|_| None).collect();
    let (mut most, mut multi) = (0u64, 0usize);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    for i in 0..n {
        let key = (i as u64 * keys.len() as u64 / n as u64) as u32;
        let e = topo.home(&keys[key as usize]);
        let s = match &mut streams[e] {
            Some(s) => s,
            slot => {
                let s = std::net::TcpStream::connect(topo.endpoints[e].addr)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                slot.insert(s)
            }
        };
        let mut req = Vec::new();
        encode(kind, &shared, &mut req, i as u64, topo.endpoints[e].shard, Op::Get, key);
        s.write_all(&req)?;
        buf.clear();
        let values = loop {
            if let Some(d) = decode(kind, &buf)? {
                if let Some(e) = d.error {
                    bail!("verification GET failed: {e}");
                }
                break d.values;
            }
            let r = s.read(&mut chunk)?;
            anyhow::ensure!(r > 0, "the server closed the connection during verification");
            buf.extend_from_slice(&chunk[..r]);
        };
        most = most.max(values);
        multi += usize::from(values > 1);
    }
    Ok((n, most, multi))
}

/// Key lists per (thread, endpoint). A thread owns the keys k with
/// k % threads == thread, so one thread's context map sees every write of
/// its keys.
struct KeyGroups {
    /// The keys the thread's connections to the endpoint draw in the run.
    draw: Vec<Vec<Vec<u32>>>,
    /// The keys they write in the load phase: each key once, at its home.
    home: Vec<Vec<Vec<u32>>>,
}

fn key_groups(topo: &Topology, keys: &[Vec<u8>], threads: usize) -> KeyGroups {
    let e = topo.endpoints.len();
    let mut draw = vec![vec![Vec::new(); e]; threads];
    let mut home = vec![vec![Vec::new(); e]; threads];
    for (i, k) in keys.iter().enumerate() {
        let t = i % threads;
        topo.drawn_by(k, |e| draw[t][e].push(i as u32));
        home[t][topo.home(k)].push(i as u32);
    }
    KeyGroups { draw, home }
}

/// Every connection's assignment, by thread. Connection c goes to
/// endpoint c % endpoints (so consecutive connections go to different
/// nodes of a cluster) and runs on thread (c / endpoints) % threads.
fn plan(
    topo: &Topology,
    keys: &[Vec<u8>],
    connections: usize,
    threads: usize,
    load: bool,
) -> anyhow::Result<Vec<Vec<ConnPlan>>> {
    let mut groups = key_groups(topo, keys, threads);
    let e = topo.endpoints.len();
    let mut conns: Vec<Vec<Vec<usize>>> = vec![vec![Vec::new(); e]; threads];
    for c in 0..connections {
        conns[(c / e) % threads][c % e].push(c);
    }
    let mut plans: Vec<Vec<ConnPlan>> = (0..threads).map(|_| Vec::new()).collect();
    for t in 0..threads {
        for (s, ep) in topo.endpoints.iter().enumerate() {
            let (mine, home) = (&conns[t][s], &groups.home[t][s]);
            if mine.is_empty() {
                anyhow::ensure!(
                    !load || home.is_empty(),
                    "no connection of thread {t} goes to {} (shard {}) to load its keys: use more --connections",
                    ep.addr,
                    ep.shard
                );
                continue;
            }
            let group = Arc::new(std::mem::take(&mut groups.draw[t][s]));
            for (j, &c) in mine.iter().enumerate() {
                let load = home.iter().copied().skip(j).step_by(mine.len()).collect();
                plans[t].push(ConnPlan { index: c, addr: ep.addr, shard: ep.shard, keys: group.clone(), load });
            }
        }
    }
    Ok(plans)
}

pub fn run(args: NetArgs) -> anyhow::Result<()> {
    anyhow::ensure!((0.0..=1.0).contains(&args.read_ratio), "--read-ratio must be between 0 and 1");
    anyhow::ensure!(args.connections > 0 && args.depth > 0 && args.threads > 0, "counts must be positive");
    anyhow::ensure!(args.keys > 0 && args.keys <= u32::MAX as u64, "--keys must be between 1 and 2^32-1");
    // Bounded, as the SLA harness's are: `inf` or a tiny rate (a connection's
    // gap, connections / rate) panicked in Duration::from_secs_f64.
    anyhow::ensure!(
        args.duration > 0.0 && args.duration <= MAX_SECONDS && (0.0..=MAX_SECONDS).contains(&args.warmup),
        "--duration must be positive and --warmup not negative, both at most {MAX_SECONDS} s (a week)"
    );
    anyhow::ensure!(
        args.rate.is_none_or(|r| r > 0.0 && r.is_finite() && args.connections as f64 / r <= MAX_SECONDS),
        "--rate must be positive, finite, and at least one request a week per connection"
    );
    let (kind, addr) = parse_target(&args.target)?;
    let topo = discover(kind, addr, args.routing)?;
    let threads = args.threads.min(args.connections);
    let keys: Arc<Vec<Vec<u8>>> = Arc::new((0..args.keys).map(|i| format!("key:{i}").into_bytes()).collect());
    let plans = plan(&topo, &keys, args.connections, threads, args.load)?;
    let barrier = Barrier::new(threads);
    let timeline = OnceLock::new();
    let load_done = OnceLock::new();
    let load_started = Instant::now();
    let (results, cpu) = std::thread::scope(|scope| {
        let handles: Vec<_> = plans
            .into_iter()
            .enumerate()
            .map(|(t, p)| {
                let (keys, args, barrier, timeline, load_done) = (keys.clone(), &args, &barrier, &timeline, &load_done);
                std::thread::Builder::new()
                    .name(format!("gyre-bench-{t}"))
                    .spawn_scoped(scope, move || thread_main(kind, p, keys, args, t, barrier, timeline, load_done))
                    .expect("spawning a generator thread")
            })
            .collect();
        // CPU use over the measured window.
        let running = |hs: &[std::thread::ScopedJoinHandle<'_, _>]| !hs.iter().all(|h| h.is_finished());
        while timeline.get().is_none() && running(&handles) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let server = || (!args.server_pid.is_empty()).then(|| cpu_seconds_of(&args.server_pid)).flatten();
        let sample = || (cpu_seconds(None), server(), machine_seconds());
        let mut cpu = [None; 4];
        if let Some(tl) = timeline.get() {
            let wait_until = |t: Instant| {
                while Instant::now() < t && running(&handles) {
                    std::thread::sleep((t - Instant::now()).min(Duration::from_millis(10)));
                }
            };
            wait_until(tl.measure_from);
            let (before, from) = (sample(), Instant::now());
            wait_until(tl.measure_to);
            let (after, wall) = (sample(), from.elapsed().as_secs_f64());
            let percent = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (b - a) / wall * 100.0);
            cpu = [
                percent(before.0, after.0),
                percent(before.1, after.1),
                percent(before.2.map(|m| m.0), after.2.map(|m| m.0)),
                percent(before.2.map(|m| m.1), after.2.map(|m| m.1)),
            ];
        }
        let results: Vec<anyhow::Result<ThreadResult>> =
            handles.into_iter().map(|h| h.join().expect("generator thread panicked")).collect();
        (results, cpu)
    });
    let mut tally = Tally::new();
    let (mut load_errors, mut load_first_error) = (0, None);
    for r in results {
        let r = r?;
        tally.add(&r.tally);
        load_errors += r.load_errors;
        if load_first_error.is_none() {
            load_first_error = r.load_first_error;
        }
    }
    anyhow::ensure!(load_errors == 0, "{load_errors} load writes failed, first: {load_first_error:?}");
    let load_seconds =
        args.load.then(|| load_done.get().map_or(0.0, |d| d.saturating_duration_since(load_started).as_secs_f64()));
    let (verify_keys, verify_max_values, verify_keys_with_siblings) = verify(kind, &topo, &keys, args.verify_keys)?;
    let [generator_cpu_percent, server_cpu_percent, machine_busy_percent, machine_steal_percent] = cpu;

    let ops = tally.gets + tally.sets;
    let secs = args.duration;
    let (all, get, set) = (Latency::of(&tally.all), Latency::of(&tally.get), Latency::of(&tally.set));
    let c = topo.cluster.as_ref();
    let out = Output {
        target: kind.name().to_string(),
        routing: topo.routing_name().to_string(),
        cluster_nodes: topo.nodes(),
        n: c.map(|c| c.n),
        r: c.map(|c| c.r),
        w: c.map(|c| c.w),
        connections: args.connections,
        depth: args.depth,
        read_ratio: args.read_ratio,
        rate: args.rate,
        ops_per_sec: ops as f64 / secs,
        get_ops_per_sec: tally.gets as f64 / secs,
        set_ops_per_sec: tally.sets as f64 / secs,
        avg_us: all.avg_us,
        p50_us: all.p50_us,
        p99_us: all.p99_us,
        p999_us: all.p999_us,
        max_us: all.max_us,
        slower_than: TAIL_THRESHOLDS_US
            .iter()
            .map(|&us| (us, tally.all.count_between(us * 1000 + 1, u64::MAX)))
            .collect(),
        read_avg_us: get.avg_us,
        read_p999_us: get.p999_us,
        write_avg_us: set.avg_us,
        write_p999_us: set.p999_us,
        errors: tally.errors,
        stale_routes: tally.stale_routes,
        max_siblings_seen: tally.max_get_values,
        max_put_siblings: tally.max_put_siblings,
        get_misses: tally.get_misses,
        ops,
        get,
        set,
        verify_keys,
        verify_max_values,
        verify_keys_with_siblings,
        first_error: tally.first_error,
        server: args.target.clone(),
        shards: topo.endpoints.len(),
        threads,
        keys: args.keys,
        value_size: args.value_size,
        duration_s: args.duration,
        warmup_s: args.warmup,
        load_seconds,
        load_ops_per_sec: load_seconds.map(|s| args.keys as f64 / s.max(1e-9)),
        generator_cpu_percent,
        server_cpu_percent,
        generator_cpu_us_per_op: generator_cpu_percent.filter(|_| ops > 0).map(|p| p / 100.0 * secs * 1e6 / ops as f64),
        server_cpu_us_per_op: server_cpu_percent.filter(|_| ops > 0).map(|p| p / 100.0 * secs * 1e6 / ops as f64),
        machine_busy_percent,
        machine_steal_percent,
    };
    let text = serde_json::to_string(&out)?;
    println!("{text}");
    let rate = args.rate.map_or(String::new(), |r| format!(" rate={r:.0}"));
    eprintln!(
        "{} routing={} nodes={} c={} d={} r={}{rate}: {:.0} ops/s (get {:.0}, set {:.0}), avg {:.0} us, \
         p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us; read avg {:.0} p99.9 {:.0} us, \
         write avg {:.0} p99.9 {:.0} us; errors {}, stale routes {}, max siblings {}",
        out.target,
        out.routing,
        out.cluster_nodes,
        out.connections,
        out.depth,
        out.read_ratio,
        out.ops_per_sec,
        out.get_ops_per_sec,
        out.set_ops_per_sec,
        out.avg_us,
        out.p50_us,
        out.p99_us,
        out.p999_us,
        out.max_us,
        out.read_avg_us,
        out.read_p999_us,
        out.write_avg_us,
        out.write_p999_us,
        out.errors,
        out.stale_routes,
        out.max_siblings_seen.max(out.verify_max_values),
    );
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{text}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-connection Redis stand-in that answers every GET with a nil,
    /// except between `stall_from` and `stall_to` seconds after it accepts,
    /// when it answers nothing (and then everything it owes at once).
    fn stalling_server(stall_from: f64, stall_to: f64) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let t0 = Instant::now();
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            let (mut owed, mut buf) = (0usize, [0u8; 4096]);
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => owed += buf[..n].windows(3).filter(|w| w == b"GET").count(),
                    Err(_) => {}
                }
                let t = t0.elapsed().as_secs_f64();
                if owed > 0 && !(stall_from..stall_to).contains(&t) {
                    if s.write_all(&b"$-1\r\n".repeat(owed)).is_err() {
                        return;
                    }
                    owed = 0;
                }
                if t > stall_to + 2.0 {
                    return;
                }
            }
        });
        addr
    }

    /// One connection to `addr` paced at 1,000 GETs a second, depth 1, a
    /// 1 s window from the start, `drain` after it: what it counted.
    fn paced_second(addr: SocketAddr, drain: Duration) -> Tally {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let mut c = Conn::open(Kind::Redis, addr, 0, Rc::new(shared(100))).await.unwrap();
            c.drain = drain;
            let keys: Vec<u32> = (0..100).collect();
            let from = Instant::now();
            let to = from + Duration::from_secs(1);
            let src = Source::Mix { rng: fastrand::Rng::with_seed(1), read_ratio: 1.0, keys: &keys, end: to };
            let pace = Some(Pace { next: from, interval: Duration::from_millis(1) });
            let mut t = Tally::new();
            c.drive(src, 1, Some((from, to)), pace, &mut t).await.unwrap();
            t
        })
    }

    /// Regression (found by a review): a paced run stopped sending when the
    /// clock passed the window's end and recorded only replies read inside
    /// it, so a stall that ran past the end vanished from the percentiles
    /// (half the requests and the whole stall were missing). Now every
    /// request scheduled in the window counts, whenever its reply comes.
    #[test]
    fn a_paced_run_counts_a_stall_that_runs_past_the_window() {
        let addr = stalling_server(0.5, 1.5);
        let tally = paced_second(addr, DRAIN);
        let l = Latency::of(&tally.all);
        // 1,000 scheduled at 1 ms in the window, all answered by 1.5 s; those
        // due from 0.5 s on waited for the stall's end.
        assert!((990..=1000).contains(&l.count), "{l:?}");
        assert!(l.max_us > 400_000.0, "the stall is not in the tail: {l:?}");
        // Throughput counts the replies read within the window: those due
        // before the stall.
        assert!((450..=560).contains(&tally.gets), "{} replies in the window", tally.gets);
        assert_eq!(tally.errors, 0);
    }

    /// A server that stops answering for good: the schedule is sent up to
    /// the drain time after the window, the rest counts as never sent, and
    /// the run ends (a drain after the last send) with every request of the
    /// window in the histogram, its wait included, as an error.
    #[test]
    fn a_paced_run_against_a_dead_server_ends_and_counts_what_it_never_sent() {
        let addr = stalling_server(0.3, 1000.0);
        let started = Instant::now();
        let tally = paced_second(addr, Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(10), "the run did not end: {:?}", started.elapsed());
        let l = Latency::of(&tally.all);
        assert!((990..=1000).contains(&l.count), "{l:?}");
        assert!(l.max_us > 1_000_000.0, "the wait of the last ones: {l:?}");
        assert!(tally.gets < 400, "{} replies", tally.gets);
        assert_eq!(tally.errors + tally.gets, l.count, "every request answered or failed");
        assert!(tally.first_error.as_deref().is_some_and(|e| e.contains("after the run")), "{:?}", tally.first_error);
    }

    /// Found by a review: `--duration inf` (or 1e20) and a rate whose
    /// per-connection gap overflows a Duration panicked; they are refused
    /// before anything connects.
    #[test]
    fn huge_times_and_tiny_rates_are_refused() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: NetArgs,
        }
        let refused = |extra: &[&str], what: &str| {
            let mut argv = vec!["net", "--target", "redis://127.0.0.1:1"];
            argv.extend_from_slice(extra);
            let args = <Cli as clap::Parser>::try_parse_from(argv).unwrap().args;
            let e = run(args).expect_err(what).to_string();
            assert!(e.contains(what), "{extra:?}: {e}");
        };
        refused(&["--duration", "inf"], "--duration");
        refused(&["--duration", "1e20"], "--duration");
        refused(&["--warmup", "1e20"], "--warmup");
        refused(&["--rate", "1e-300"], "--rate");
        refused(&["--rate=-1"], "--rate");
    }

    fn shared(keys: u64) -> Shared {
        Shared::new(Arc::new((0..keys).map(|i| format!("key:{i}").into_bytes()).collect()), 3)
    }

    #[test]
    fn resp_requests_and_replies() {
        let s = shared(12);
        let mut out = Vec::new();
        encode(Kind::Redis, &s, &mut out, 0, 0, Op::Set, 11);
        encode(Kind::Redis, &s, &mut out, 1, 0, Op::Get, 0);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$6\r\nkey:11\r\n$3\r\nxxx\r\n*2\r\n$3\r\nGET\r\n$5\r\nkey:0\r\n");
        let d = decode_resp(b"+OK\r\n$3\r\nab").unwrap().unwrap();
        assert_eq!((d.len, d.values, d.error.is_none()), (5, 1, true));
        // A bulk reply is whole only with its payload and CRLF.
        assert!(decode_resp(b"$3\r\nab").unwrap().is_none());
        assert!(decode_resp(b"$3\r\nabc\r").unwrap().is_none());
        let d = decode_resp(b"$3\r\nabc\r\n").unwrap().unwrap();
        assert_eq!((d.len, d.values), (9, 1));
        let d = decode_resp(b"$-1\r\n").unwrap().unwrap();
        assert_eq!((d.len, d.values), (5, 0));
        let d = decode_resp(b"-ERR no\r\n").unwrap().unwrap();
        assert_eq!(d.error.as_deref(), Some("ERR no"));
        assert!(decode_resp(b"?\r\n").is_err());
    }

    /// Found by a review: a reply that starts with its CRLF (no type byte)
    /// panicked, killing the generator; it is a protocol error.
    #[test]
    fn a_resp_reply_without_a_type_is_an_error_not_a_panic() {
        for bad in [&b"\r\n+OK\r\n"[..], b"\r\n", b"\r", b"OK\r\n"] {
            let e = decode_resp(bad).err().map(|e| e.to_string());
            assert!(e.as_deref().is_some_and(|e| e.contains("unexpected RESP reply type")), "{bad:?}: {e:?}");
        }
        assert!(decode_resp(b"").unwrap().is_none(), "nothing read yet");
    }

    #[test]
    fn gyre_replies_are_matched_by_id_and_carry_contexts() {
        let mut out = Vec::new();
        Response::Get { context: &[1, 1, 7, 0, 0, 0, 0, 0, 0, 0, 3], values: vec![b"a", b"b"] }.encode(&mut out, 42, 1);
        let d = decode_gyre(&out).unwrap().unwrap();
        assert_eq!((d.id, d.len, d.values), (Some(42), out.len(), 2));
        assert_eq!(d.ctx.len(), 11);
        assert!(decode_gyre(&out[..out.len() - 1]).unwrap().is_none());
    }

    #[test]
    fn the_newest_context_wins() {
        let s = shared(2);
        let clock = |n: u64| {
            // A context of one actor (7) at counter n: format, count, actor, varint.
            let mut ctx = vec![1, 1];
            ctx.extend_from_slice(&7u64.to_le_bytes());
            ctx.push(n as u8);
            ctx
        };
        s.learn(0, &clock(3));
        s.learn(0, &clock(2));
        assert_eq!(s.contexts.borrow().get(0).unwrap(), clock(3));
        s.learn(0, &clock(4));
        assert_eq!(s.contexts.borrow().get(0).unwrap(), clock(4));
        assert!(s.contexts.borrow().get(1).is_none());
        let mut out = Vec::new();
        encode(Kind::Gyre, &s, &mut out, 5, 1, Op::Set, 0);
        let (h, total) = split_frame(&out, MAX_BODY_LEN).unwrap().unwrap();
        assert_eq!((h.request_id, h.shard, total), (5, 1, out.len()));
        let Request::Put { key, context, value } = Request::decode(h.opcode, &out[HEADER_LEN..]).unwrap() else {
            panic!("not a PUT")
        };
        assert_eq!((key, context, value), (&b"key:0"[..], &clock(4)[..], &b"xxx"[..]));
    }

    /// A 3-node ring of 64 partitions whose nodes have 1, 2 and 3 shards.
    fn cluster(routing: Routing) -> Topology {
        use gyre::core::ring::Member;
        let members = (1..=3u8)
            .map(|i| Member { name: format!("n{i}"), addr: SocketAddr::from(([127, 0, 0, i], 7800)), zone: None })
            .collect();
        let ring = Ring::with_members(64, members).unwrap();
        let infos: Vec<NodeInfo> = (1..=3u16)
            .map(|s| NodeInfo {
                node_id: s as u64,
                partitions: 64,
                shard: 0,
                ports: (0..s).map(|i| 7800 + i).collect(),
            })
            .collect();
        Topology::cluster(ring, 2, 1, 1, &infos, routing).unwrap()
    }

    fn key_list(n: u64) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("key:{i}").into_bytes()).collect()
    }

    #[test]
    fn client_routing_draws_only_keys_the_endpoint_coordinates() {
        let topo = cluster(Routing::Client);
        assert_eq!(topo.endpoints.len(), 6);
        assert_eq!(topo.routing_name(), "client");
        let keys = key_list(3000);
        let groups = key_groups(&topo, &keys, 2);
        let ring = &topo.cluster.as_ref().unwrap().ring;
        let mut seen = vec![0usize; keys.len()];
        for t in 0..2 {
            for (e, ep) in topo.endpoints.iter().enumerate() {
                let shards = topo.endpoints.iter().filter(|x| x.member == ep.member).count();
                assert_eq!(ep.addr, SocketAddr::new(ring.members()[ep.member].addr.ip(), 7800 + ep.shard));
                let (draw, home) = (&groups.draw[t][e], &groups.home[t][e]);
                assert_eq!(draw, home, "client routing loads and draws the same keys");
                for &k in draw {
                    let key = &keys[k as usize];
                    assert_eq!(k as usize % 2, t, "keys are split between threads");
                    let prefs = ring.preference_list(ring.partition_of_key(key), 2);
                    assert_eq!(prefs[0] as usize, ep.member, "key {k} goes to its coordinator");
                    assert_eq!(shard_of(key, 64, shards), ep.shard as usize, "key {k} goes to its shard");
                    seen[k as usize] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "every key is drawn by exactly one endpoint");
        // Every node coordinates some keys (not every shard does: the claim
        // spaces a node's partitions out, and with 64 partitions a shard may
        // hold few of them).
        for m in 0..3 {
            let of_m = topo.endpoints.iter().enumerate().filter(|(_, ep)| ep.member == m);
            assert!(of_m.map(|(e, _)| groups.draw[0][e].len()).sum::<usize>() > 0);
        }
    }

    #[test]
    fn server_routing_spreads_every_key_over_every_node() {
        let topo = cluster(Routing::Server);
        assert_eq!(topo.routing_name(), "server");
        let keys = key_list(3000);
        let groups = key_groups(&topo, &keys, 1);
        let ring = &topo.cluster.as_ref().unwrap().ring;
        let mut drawn = vec![Vec::new(); keys.len()];
        let mut loaded = vec![0usize; keys.len()];
        for (e, ep) in topo.endpoints.iter().enumerate() {
            let shards = topo.endpoints.iter().filter(|x| x.member == ep.member).count();
            for &k in &groups.draw[0][e] {
                assert_eq!(shard_of(&keys[k as usize], 64, shards), ep.shard as usize);
                drawn[k as usize].push(ep.member);
            }
            for &k in &groups.home[0][e] {
                let key = &keys[k as usize];
                assert_eq!(ring.preference_list(ring.partition_of_key(key), 2)[0] as usize, ep.member);
                loaded[k as usize] += 1;
            }
        }
        assert!(drawn.iter().all(|m| m == &[0, 1, 2]), "each key is drawn on every node, by its owning shard");
        assert!(loaded.iter().all(|&n| n == 1), "each key is loaded once");
    }

    #[test]
    fn plans_cover_every_endpoint_and_number_the_connections() {
        let topo = cluster(Routing::Client);
        let keys = key_list(600);
        let plans = plan(&topo, &keys, 13, 2, true).unwrap();
        let mut index: Vec<usize> = plans.iter().flatten().map(|p| p.index).collect();
        index.sort_unstable();
        assert_eq!(index, (0..13).collect::<Vec<_>>());
        let loaded: usize = plans.iter().flatten().map(|p| p.load.len()).sum();
        assert_eq!(loaded, keys.len(), "the load writes each key once");
        // Too few connections to reach every endpoint from every thread.
        assert!(plan(&topo, &keys, 7, 2, true).is_err());
        assert!(plan(&topo, &keys, 7, 2, false).is_ok());
        // A lone node: one endpoint per shard, keys by shard.
        let lone = Topology::single(Kind::Gyre, "127.0.0.1:7700".parse().unwrap(), &[7700, 7701], 64);
        let g = key_groups(&lone, &keys, 1);
        for s in 0..2 {
            assert!(g.draw[0][s].iter().all(|&k| shard_of(&keys[k as usize], 64, 2) == s));
        }
        assert_eq!(lone.routing_name(), "none");
    }

    #[test]
    fn hinted_contexts_are_learned() {
        use gyre::core::version::{encode_context, Clock};
        let s = shared(1);
        let clock = |n: u64| {
            let mut bytes = vec![1, 1];
            bytes.extend_from_slice(&7u64.to_le_bytes());
            bytes.push(n as u8);
            Clock::decode(&bytes).unwrap()
        };
        s.learn(0, &encode_context(&clock(2), b"k", Some(1)));
        s.learn(0, &encode_context(&clock(1), b"k", Some(2)));
        assert_eq!(s.contexts.borrow().get(0).unwrap(), encode_context(&clock(2), b"k", Some(1)));
        s.learn(0, &encode_context(&clock(3), b"k", Some(0)));
        assert_eq!(s.contexts.borrow().get(0).unwrap(), encode_context(&clock(3), b"k", Some(0)));
    }

    #[test]
    fn stale_route_flag_is_read() {
        let mut out = Vec::new();
        Response::Put { context: &[], siblings: 1 }.encode_flagged(&mut out, 9, 0, flags::STALE_ROUTE);
        assert!(decode_gyre(&out).unwrap().unwrap().stale);
        out.clear();
        Response::Put { context: &[], siblings: 1 }.encode(&mut out, 9, 0);
        assert!(!decode_gyre(&out).unwrap().unwrap().stale);
    }

    #[test]
    fn one_write_per_key_in_flight() {
        let s = shared(1);
        assert!(s.begin_write(0));
        assert!(!s.begin_write(0));
        s.end_write(0);
        assert!(s.begin_write(0));
    }
}
