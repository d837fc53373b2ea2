//! The node's settings (TOML file and command-line flags) and its data
//! directory's identity file.
//!
//! Owns: every default of `gyre node`, the `NODE` file that pins a data
//! directory's node id, shard count, partition count and what it serves
//! (a cluster member, or a lone node), the `CLEAN` mark with each shard's
//! last sequence number, and the directory lock.
//!
//! Invariant: a data directory is never served with a shard or partition
//! count other than the one it was created with (keys would be looked up
//! on the wrong shard), nor as anything other than what `serves` records
//! (its dots would be another node's), never by two processes at once;
//! and a new node is never created over other Gyre data.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::limits::{DEFAULT_MAX_VALUE_LEN, VALUE_LEN_HARD_CAP};
use crate::storage::config::KEEP_TOMBSTONES;
use crate::storage::scan::{DEFAULT_DISK_RESERVE_SEGMENTS, MIN_DISK_RESERVE_SEGMENTS};
use crate::storage::{EngineConfig, FsyncPolicy};

/// Port of shard 0 when nothing else is said; shard `i` listens on
/// `DEFAULT_PORT + i`.
pub const DEFAULT_PORT: u16 = 7700;
/// The default listen address: loopback only, so a node started with no
/// configuration is not exposed to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Version of the `NODE` file layout. 2: shards own contiguous partition
/// ranges (version 1 directories were laid out by `p mod shards`, so their
/// keys would be looked for on the wrong shard: refused).
pub const NODE_FILE_VERSION: u32 = 2;
/// Client connections a shard serves at once by default. Redis's default
/// `maxclients` is the same figure for a whole server: past it a client
/// does better to hear no at once than to wait on a node out of
/// descriptors or memory. (A node raises its descriptor limit at start.)
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// Seconds a connection may be silent before TCP keepalive probes it, by
/// default: Redis's `tcp-keepalive` default. A dead client is closed about
/// twice this after its last word (3 probes, a third of it apart).
pub const DEFAULT_TCP_KEEPALIVE_S: u64 = 300;
/// Largest keepalive idle time Linux takes (`TCP_KEEPIDLE`, `MAX_TCP_KEEPIDLE`).
pub const MAX_TCP_KEEPALIVE_S: u64 = 32_767;
/// Most shards a node runs (shard ids are a `u16` on the wire, and
/// 0xFFFF means "any").
pub const MAX_SHARDS: usize = 1024;
/// The node's record caches take one part in this many of the memory the
/// process may use (`node::memory::available`) when `cache_bytes` is not
/// set: a quarter. Reads are O_DIRECT, so the kernel's page cache holds
/// none of Gyre's records, and a read that misses this cache waits for
/// the disk: with the engine's fixed 64 MiB a shard, a node serving a
/// million 100-byte values answered GETs at half of Redis's rate
/// (perf/RESULTS.md, sixteenth session). The rest is left for the index
/// (about 38 bytes per key plus the key), the write buffers and
/// connections, and whatever else runs on the machine; the caches fill
/// only as records are written and read.
pub const DEFAULT_CACHE_SHARE_DIVISOR: u64 = 4;

/// The default `frame_timeout_ms`: long enough for any client that is
/// sending, on any link (a byte of the frame resets it), short enough that
/// a stalled partial frame does not hold its memory for the life of the
/// connection.
pub const DEFAULT_FRAME_TIMEOUT_MS: u64 = 30_000;

/// The default memory of one node's record caches, from the `memory` the
/// process may use (`None`: unknown, the engine's default applies).
pub fn default_node_cache_bytes(memory: Option<u64>) -> Option<u64> {
    memory.map(|m| m / DEFAULT_CACHE_SHARE_DIVISOR)
}

/// A node's default disk reserve takes at most one part in this many of
/// its file system (a tenth) where that leaves each shard at least
/// [`MIN_DISK_RESERVE_SEGMENTS`]: [`DEFAULT_DISK_RESERVE_SEGMENTS`]
/// segments a shard is 4 GiB for 16 shards, most of a small disk.
pub const DISK_RESERVE_MAX_SHARE_DIVISOR: u64 = 10;

/// The default disk reserve (`disk_reserve_bytes`) of a node of `shards`
/// shards with segments of `segment` bytes on a file system of `disk`
/// bytes (`None`: unknown): [`DEFAULT_DISK_RESERVE_SEGMENTS`] segments a
/// shard, no more than a tenth of the file system, but never under
/// [`MIN_DISK_RESERVE_SEGMENTS`] a shard (under it compaction may have
/// no room to reclaim space in once writes have outrun it).
pub fn default_node_disk_reserve(shards: usize, segment: u64, disk: Option<u64>) -> u64 {
    let per_shard = |segments: u64| (shards as u64).saturating_mul(segments).saturating_mul(segment);
    let want = per_shard(DEFAULT_DISK_RESERVE_SEGMENTS);
    let capped = disk.map_or(want, |d| want.min(d / DISK_RESERVE_MAX_SHARE_DIVISOR));
    capped.max(per_shard(MIN_DISK_RESERVE_SEGMENTS))
}

/// Everything `gyre node` can be told. Every field has a default, so an
/// empty file (or none) is a working configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// Address of shard 0; shard `i` listens on the next ports. Port 0
    /// gives every shard an ephemeral port (they are printed at start).
    pub listen: SocketAddr,
    /// Executors (one per core, pinned); default: every available core.
    /// Fixed when the data directory is created.
    pub shards: Option<usize>,
    /// Largest value a client may write.
    pub max_value_len: usize,
    /// Client connections each shard serves at once; the next is answered
    /// `Overloaded` and closed.
    pub max_connections: u64,
    /// Seconds a client or peer connection may be silent before TCP
    /// keepalive probes it (dead ones are closed); 0 turns it off.
    pub tcp_keepalive: u64,
    /// Durability of acknowledged writes: "always", "interval(ms)", "never".
    pub fsync: FsyncPolicy,
    /// Memory the node's record caches may take, in bytes, split evenly
    /// across its shards (0: no cache). Default: a quarter of the memory
    /// the process may use ([`DEFAULT_CACHE_SHARE_DIVISOR`]), or the
    /// engine's 64 MiB a shard if that cannot be read.
    pub cache_bytes: Option<u64>,
    /// Free space on the data directory's file system under which the
    /// node refuses writes (with a "disk is full" error) while compaction
    /// goes on and reclaims what it can; they are taken again once there
    /// is room above it (`scan::low_space_gap`). 0: no reserve (writes that outrun
    /// compaction then fill the disk, which compaction cannot empty).
    /// Default: [`default_node_disk_reserve`], four segments a shard, at
    /// most a tenth of the file system but never under three.
    pub disk_reserve_bytes: Option<u64>,
    /// Per-shard storage settings. Its `fsync`, `max_value_len`,
    /// `cache_bytes` and `disk_reserve_bytes` come from the top-level ones above: a `[storage]`
    /// table that sets any of them is refused (one place for each
    /// setting), and they are not written out.
    #[serde(deserialize_with = "storage_table", serialize_with = "storage_table_out")]
    pub storage: EngineConfig,
    /// Pin shard `i` to the `i mod n`-th of the `n` CPUs the process may
    /// run on (its affinity mask: under `taskset -c 4-7`, shard 0 runs on
    /// CPU 4).
    pub pin: bool,
    /// Microseconds a shard with no work spins before it parks (0: park
    /// at once). Spinning saves the sleep and wake-up of each request
    /// under steady load, at the price of a busy core.
    pub spin_before_park_us: u64,
    /// The cluster file (see `node::cluster`); none: a lone node.
    pub cluster: Option<PathBuf>,
    /// This node's name in the cluster file (default: the node whose
    /// address is `listen`).
    pub name: Option<String>,
    /// Whether writes may bring a context in a format older nodes handed
    /// out, not bound to its key (`Store::with_unbound_contexts`). Taken by
    /// default, so that clients keep the contexts they hold across an
    /// upgrade; once every client has read again, refusing them closes
    /// the last honest way a context of another key can drop a write.
    pub accept_unbound_contexts: bool,
    /// Milliseconds a client may leave a frame it began unfinished without
    /// sending a byte of it before the node answers "frame not finished"
    /// (request id 0) and closes the connection, freeing what the frame
    /// held; 0: never. TCP keepalive closes a dead client, not a live one
    /// that stalls (found by a review).
    pub frame_timeout_ms: u64,
    /// A file holding the cluster secret (`crate::auth`): with one, the
    /// node signs the contexts it hands out and takes only signed ones,
    /// and takes replica messages only from a connection that proved it
    /// holds the same secret. Every member of a cluster needs the same.
    /// None: contexts are not signed, and every connection's replica
    /// messages are taken (serve the port to trusted clients only).
    pub cluster_secret_file: Option<PathBuf>,
    /// More secret files whose contexts and proofs are accepted too (the
    /// one above signs and proves): moving a cluster to a new secret one
    /// member at a time (ARCHITECTURE.md, "Cluster secret").
    pub accept_cluster_secret_files: Vec<PathBuf>,
    /// With a secret, also take what proves nothing: unsigned contexts,
    /// replica messages from members that did not prove the secret, members
    /// that send no challenge. Only while a cluster turns its secret on
    /// (or off) one member at a time; as unsafe as no secret.
    pub accept_unauthenticated: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("./data"),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            shards: None,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tcp_keepalive: DEFAULT_TCP_KEEPALIVE_S,
            fsync: FsyncPolicy::Always,
            cache_bytes: None,
            disk_reserve_bytes: None,
            storage: EngineConfig::default(),
            pin: true,
            spin_before_park_us: 0,
            cluster: None,
            name: None,
            accept_unbound_contexts: true,
            frame_timeout_ms: DEFAULT_FRAME_TIMEOUT_MS,
            cluster_secret_file: None,
            accept_cluster_secret_files: Vec::new(),
            accept_unauthenticated: false,
        }
    }
}

impl NodeConfig {
    /// Reads a TOML file; unknown keys are errors, not silently ignored.
    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Checks every setting that can be checked without the data
    /// directory: the value limit, the storage settings, the shard count
    /// and, if that is given, that every shard has a port. `lock_data_dir`
    /// calls this before it creates or writes anything, so that a refused start
    /// leaves no trace (a data directory's shard count is fixed by its
    /// first start).
    pub fn validate(&self) -> anyhow::Result<()> {
        self.engine_config()?;
        if self.name.is_some() && self.cluster.is_none() {
            bail!("a node name names a member of a cluster: give the cluster file too (--cluster), or drop the name");
        }
        if self.max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        if self.cluster_secret_file.is_none()
            && (!self.accept_cluster_secret_files.is_empty() || self.accept_unauthenticated)
        {
            bail!(
                "accept_cluster_secret_files and accept_unauthenticated need a cluster_secret_file (the secret that signs)"
            );
        }
        // The flag refuses an empty path; the config file did not, and a
        // node then locked the current directory (found by a review).
        if self.data_dir.as_os_str().is_empty() {
            bail!("data_dir is empty: name a directory");
        }
        if self.tcp_keepalive > MAX_TCP_KEEPALIVE_S {
            bail!(
                "tcp_keepalive {} s is over Linux's limit of {MAX_TCP_KEEPALIVE_S} s (0 turns it off)",
                self.tcp_keepalive
            );
        }
        if let Some(shards) = self.shards {
            if !(1..=MAX_SHARDS).contains(&shards) {
                bail!("shards {shards} must be between 1 and {MAX_SHARDS}");
            }
            check_ports(self.listen, shards)?;
        }
        Ok(())
    }

    /// The engine settings each of `shards` shards opens with, its record
    /// cache its share of `cache_bytes`, or by default of the `memory`
    /// the process may use (`node::memory::available`), and the node's
    /// disk reserve (the file system is shared: each shard refuses writes
    /// under the whole reserve), by default sized from the `disk`'s size
    /// (`None`: unknown).
    pub fn shard_engine_config(
        &self,
        shards: usize,
        memory: Option<u64>,
        disk: Option<u64>,
    ) -> anyhow::Result<EngineConfig> {
        let node_cache = self.cache_bytes.or_else(|| default_node_cache_bytes(memory));
        let mut config = self.engine_config()?;
        if let Some(bytes) = node_cache {
            config.cache_bytes = usize::try_from(bytes / shards.max(1) as u64).unwrap_or(usize::MAX);
        }
        config.disk_reserve_bytes = Some(
            self.disk_reserve_bytes
                .unwrap_or_else(|| default_node_disk_reserve(shards.max(1), config.segment_size, disk)),
        );
        Ok(config)
    }

    /// The engine settings every shard opens with, but for the record
    /// cache's share ([`Self::shard_engine_config`]): the stored-object limit
    /// is the hard cap (siblings of one key share a record), the per-value
    /// limit is enforced by the key-value layer.
    pub fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        if self.max_value_len == 0 || self.max_value_len > VALUE_LEN_HARD_CAP {
            bail!("max_value_len {} must be between 1 and {VALUE_LEN_HARD_CAP}", self.max_value_len);
        }
        let mut config = EngineConfig { fsync: self.fsync, max_value_len: VALUE_LEN_HARD_CAP, ..self.storage.clone() };
        // A replica that dropped a tombstone while another replica missed
        // the delete would get the value back through read repair, and
        // nothing yet tells a node that every replica has the tombstone
        // (anti-entropy). So a node of a cluster keeps its tombstones, and
        // refuses a setting that asks otherwise. A lone node drops them
        // after `tombstone_grace_ms`: the one other thing a tombstone held,
        // the node's dots for the key, no longer needs it, since a key
        // written again from nothing takes dots above any it had
        // (`Store::update`). Found by reviews.
        if self.cluster.is_some() {
            if config.tombstone_grace_ms != EngineConfig::default().tombstone_grace_ms {
                bail!(
                    "tombstone_grace_ms cannot be set on a node of a cluster: its tombstones are kept, since a \
                     replica that drops one while another missed the delete gets the value back through read \
                     repair"
                );
            }
            config.tombstone_grace_ms = KEEP_TOMBSTONES;
        }
        // Said in the node's terms: the engine's own message names its
        // internal limit, which no node setting shows.
        if config.segment_size < config.max_record_len() {
            bail!(
                "invalid storage settings: segment_size {} is too small: a segment must hold the largest record a \
                 shard stores, {} bytes (a key's siblings share one record, whose value may hold up to \
                 {VALUE_LEN_HARD_CAP} bytes whatever max_value_len is)",
                config.segment_size,
                config.max_record_len()
            );
        }
        config.validate().map_err(|e| anyhow::anyhow!("invalid storage settings: {e}"))?;
        Ok(config)
    }
}

/// Checks that `shards` shards listening from `listen` (shard `i` on its
/// port + `i`; port 0: ephemeral ports) all have a port.
fn check_ports(listen: SocketAddr, shards: usize) -> anyhow::Result<()> {
    let last = listen.port() as usize + shards.saturating_sub(1);
    if listen.port() != 0 && last > u16::MAX as usize {
        bail!("{shards} shards listening from {listen} need ports up to {last}, past {}", u16::MAX);
    }
    Ok(())
}

/// Fields of `EngineConfig` that a node takes from its top-level settings
/// of the same name, never from `[storage]`, each with what to say to a
/// `[storage]` table that sets it.
const STORAGE_KEYS_AT_TOP: [(&str, &str); 4] = [
    ("fsync", ""),
    ("max_value_len", ""),
    ("cache_bytes", " (it is the whole node's, split across its shards)"),
    ("disk_reserve_bytes", " (it is the whole node's: its shards share the file system)"),
];

/// Reads the `[storage]` table, refusing the keys that are set at the top
/// level (they used to be accepted here and silently overridden).
fn storage_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<EngineConfig, D::Error> {
    use serde::de::Error;
    let table = toml::Table::deserialize(d)?;
    for (key, note) in STORAGE_KEYS_AT_TOP {
        if table.contains_key(key) {
            return Err(D::Error::custom(format!(
                "`{key}` is not a `[storage]` setting: set the top-level `{key}` (before any table) instead{note}"
            )));
        }
    }
    EngineConfig::deserialize(toml::Value::Table(table)).map_err(D::Error::custom)
}

/// Writes the `[storage]` table without the keys `storage_table` refuses,
/// so that a written configuration reads back.
fn storage_table_out<S: serde::Serializer>(storage: &EngineConfig, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::Error;
    let mut table = toml::Table::try_from(storage).map_err(S::Error::custom)?;
    for (key, _) in STORAGE_KEYS_AT_TOP {
        table.remove(key);
    }
    table.serialize(s)
}

/// The identity of a data directory, written at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub version: u32,
    /// The node's identity (reported by PING and STATS), and the dot
    /// actor of its versions until its first unclean stop.
    pub node_id: u64,
    pub shards: usize,
    pub partitions: u32,
    /// The dot actor of this node's new versions, when it is not
    /// `node_id`: each start after an unclean stop takes a new one
    /// ([`DataDir::begin_run`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<u64>,
    /// What the directory serves: a cluster member's name, or "" for a
    /// lone node (member names are never empty). Absent in a directory
    /// from before it was recorded: the next start records its own. A
    /// start as anything else is refused: a member's directory served as
    /// another member (a copy, say) would issue the same dots as the
    /// first, and merging takes equal dots for one write (found by a
    /// review: an acknowledged write vanished that way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serves: Option<String>,
}

impl NodeFile {
    /// The dot actor of the versions this node makes.
    pub fn actor(&self) -> u64 {
        self.actor.unwrap_or(self.node_id)
    }
}

pub const NODE_FILE: &str = "NODE";

/// Makes the directory `dir`'s entries durable (a file created, renamed or
/// removed in it).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes the `CLEAN` mark of the node data directory `dir`, durably, if
/// it is there; returns whether it was. Before anything in the directory
/// may lose or take a write: a start (`DataDir::begin_run`), and a
/// `gyre check --repair` whose recovery will lose records (the next start
/// must then give the node a new actor, as after a crash, and only a
/// missing mark tells it so once the repair has hinted the damage).
pub fn forget_clean_stop(dir: &Path) -> anyhow::Result<bool> {
    let clean = dir.join(CLEAN_FILE);
    match std::fs::remove_file(&clean) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("removing {}", clean.display())),
    }
    sync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(true)
}

/// Reads and checks the `NODE` file of the data directory `dir`: one of
/// this build's layout version, or an error saying why not.
pub fn read_node_file(dir: &Path) -> anyhow::Result<NodeFile> {
    let node_path = dir.join(NODE_FILE);
    let text = std::fs::read_to_string(&node_path).with_context(|| format!("reading {}", node_path.display()))?;
    let node: NodeFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid NODE file of this Gyre version", node_path.display()))?;
    if node.version != NODE_FILE_VERSION {
        bail!(
            "{} has layout version {}, this build reads version {NODE_FILE_VERSION}; refusing to serve it",
            dir.display(),
            node.version
        );
    }
    if node.shards == 0 || node.shards > MAX_SHARDS {
        bail!("{} says the node has {} shards: a node has 1 to {MAX_SHARDS}", node_path.display(), node.shards);
    }
    // Ids are drawn from 1 up: 0 is no node's, and a start waited forever
    // for an actor of 0, which it reads as "not chosen yet" (found by a
    // review; `gyre check` passed such a file).
    if node.node_id == 0 || node.actor == Some(0) {
        bail!("{} names node id or actor 0, which no node has; refusing to serve it", node_path.display());
    }
    Ok(node)
}

/// What a node started with `config` serves, as `NodeFile::serves` records
/// it: its member name in a cluster (set once the cluster file is read),
/// "" alone.
fn role_of(config: &NodeConfig) -> String {
    match &config.cluster {
        Some(_) => config.name.clone().unwrap_or_default(),
        None => String::new(),
    }
}

/// How a role reads in a message.
fn role_words(role: &str) -> String {
    if role.is_empty() {
        "a lone node".to_string()
    } else {
        format!("cluster member {role:?}")
    }
}

/// What the name of every shard directory starts with.
pub const SHARD_DIR_PREFIX: &str = "shard-";

/// The directory of shard `i` in a node's data directory.
pub fn shard_dir_name(i: usize) -> String {
    format!("{SHARD_DIR_PREFIX}{i:03}")
}

/// The entries of a node's data directory `dir` named `shard-*`, sorted by
/// name: its shard directories, and anything else under such a name. A
/// start refuses all of them without a `NODE` file (shard data, or
/// something in its place); `gyre check` checks those that are directories.
pub fn shard_entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with(SHARD_DIR_PREFIX) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// How a directory holds a node's data: the one rule a start, `gyre dev`
/// and `gyre check` go by (they had one each, and disagreed: `gyre dev`
/// made a cluster over shard directories that had lost their `NODE` file).
#[derive(Debug, PartialEq, Eq)]
pub enum NodeData {
    /// Its `NODE` file is there (readable or not: a start reads it).
    Node,
    /// `shard-*` entries without a `NODE` file, named here: a node's data
    /// that lost it (or a copy made without it). A start refuses them, and
    /// `gyre check` fails them.
    Orphaned(Vec<String>),
}

impl NodeData {
    /// What it is, for a message.
    pub fn describe(&self) -> String {
        match self {
            NodeData::Node => format!("a node's data (its {NODE_FILE} file)"),
            NodeData::Orphaned(names) => format!("shard data ({}) without a {NODE_FILE} file", names.join(", ")),
        }
    }
}

/// Whether `dir` holds a node's data, and how (`None` for anything but a
/// directory).
pub fn node_data(dir: &Path) -> anyhow::Result<Option<NodeData>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    if dir.join(NODE_FILE).exists() {
        return Ok(Some(NodeData::Node));
    }
    let orphans: Vec<String> =
        shard_entries(dir)?.iter().filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    Ok((!orphans.is_empty()).then_some(NodeData::Orphaned(orphans)))
}

/// What in `dir`, a directory without a node's data, is Gyre data that a
/// new node must not be created over (found by a review: `gyre node` on a
/// shard's directory or on a `gyre dev` directory, both `./data` by
/// default, started an empty node inside it, and `gyre check` then
/// checked only that): a shard's files, a cluster file, or a directory
/// holding a node.
pub fn other_gyre_data(dir: &Path) -> anyhow::Result<Option<String>> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let shard_file =
            name == crate::storage::format::FORMAT_FILE || crate::storage::format::parse_file_name(&name).is_some();
        if shard_file {
            return Ok(Some(format!("a shard's storage ({name})")));
        }
        if name == "cluster.toml" {
            return Ok(Some("a cluster file (cluster.toml: a `gyre dev` directory?)".to_string()));
        }
        // A subdirectory this process cannot read (a mounted disk's
        // `lost+found`) holds no node's data it could serve: not an
        // error (found by a review: a first start on such a disk failed).
        if node_data(&entry.path()).ok().flatten().is_some() {
            return Ok(Some(format!("a node's data directory ({name})")));
        }
    }
    Ok(None)
}

/// The shards, of the `shards` a node has, whose directories are not in
/// its data directory `dir` (a start recreates them empty: whatever they
/// held is lost). A start and `gyre check` judge them alike.
pub fn missing_shard_dirs(dir: &Path, shards: usize) -> Vec<usize> {
    (0..shards).filter(|&i| !dir.join(shard_dir_name(i)).is_dir()).collect()
}
/// Written, durably, once a node stopped cleanly (every shard flushed and
/// synced its log), and removed, durably, before the next start takes any
/// write: its absence at a start means the last run may have lost writes.
/// It holds a `CleanMark` (an empty one, from an older build, says only
/// that the stop was clean).
pub const CLEAN_FILE: &str = "CLEAN";

/// Each shard's last sequence number at the clean stop of the node data
/// directory `dir`, if its `CLEAN` mark says (one number per shard of its
/// `shards`); `None` without a mark, or an older build's empty one. A
/// start compares them with what its shards recover
/// (`DataDir::shards_gone_back`), and so does `gyre check`.
pub fn read_clean_seqs(dir: &Path, shards: usize) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(dir.join(CLEAN_FILE)).ok()?;
    serde_json::from_str::<CleanMark>(&text).ok().map(|m| m.last_seq).filter(|seqs| seqs.len() == shards)
}

/// The shards whose last sequence number now (`recovered[i]`) is below the
/// one at the clean stop (`clean[i]`), with both: `(shard, clean, now)`.
/// A start and `gyre check` judge them alike.
pub fn shards_gone_back(clean: &[u64], recovered: &[u64]) -> Vec<(usize, u64, u64)> {
    clean.iter().zip(recovered).enumerate().filter(|(_, (c, r))| r < c).map(|(i, (&c, &r))| (i, c, r)).collect()
}

/// What `CLEAN` holds: JSON `{"last_seq": [n0, n1, ...]}`, each shard's
/// last log sequence number at the clean stop. A shard's number never
/// goes back while its records are there (`Engine::last_seq`), so a start
/// that recovers less lost records without damage to show for it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CleanMark {
    last_seq: Vec<u64>,
}
pub const LOCK_FILE: &str = "LOCK";

/// An open, locked data directory. The lock is held until this is dropped.
#[derive(Debug)]
pub struct DataDir {
    pub path: PathBuf,
    pub node: NodeFile,
    /// A new directory: `node` is its planned identity, not yet written
    /// (see [`DataDir::persist`]).
    planned: bool,
    /// What this start serves (`NodeFile::serves`).
    role: String,
    /// Each shard's last log sequence number at the last clean stop, as
    /// its `CLEAN` mark said (`begin_run`); `None` without one, or from a
    /// build that did not record them.
    clean_seqs: Option<Vec<u64>>,
    /// Held open for its `flock`; the kernel drops the lock if we die.
    _lock: File,
}

/// Locks `config.data_dir` (creating it if needed) and reads or creates its
/// `NODE` file. `random_id` is used only for a new directory.
pub fn open_data_dir(config: &NodeConfig, available_cores: usize, random_id: u64) -> anyhow::Result<DataDir> {
    let mut dir = lock_data_dir(config, available_cores, random_id)?;
    dir.persist()?;
    Ok(dir)
}

/// Validates `config`, then locks `config.data_dir` (creating it and its
/// `LOCK` file if needed) and reads its `NODE` file, refusing a shape
/// other than the configured one. A new directory gets a planned identity
/// (`random_id`, the configured shards or `available_cores`), written only
/// by [`DataDir::persist`]: a start that fails before that leaves the
/// shape free for the next one.
pub fn lock_data_dir(config: &NodeConfig, available_cores: usize, random_id: u64) -> anyhow::Result<DataDir> {
    config.validate()?;
    let path = config.data_dir.clone();
    std::fs::create_dir_all(&path).with_context(|| format!("creating data directory {}", path.display()))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join(LOCK_FILE))
        .with_context(|| format!("opening {}", path.join(LOCK_FILE).display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            bail!("data directory {} is in use by another gyre node (its LOCK file is held)", path.display())
        }
        Err(TryLockError::Error(e)) => return Err(e).context("locking the data directory"),
    }
    let partitions = config.storage.partitions;
    let role = role_of(config);
    let found = node_data(&path)?;
    if found == Some(NodeData::Node) {
        let node = read_node_file(&path)?;
        if let Some(s) = config.shards {
            if s != node.shards {
                bail!(
                    "{} was created with {} shards; it cannot be served with {s} (drop --shards to use {})",
                    path.display(),
                    node.shards,
                    node.shards
                );
            }
        }
        if node.partitions != partitions {
            bail!("{} was created with {} partitions, not {partitions}", path.display(), node.partitions);
        }
        if let Some(serves) = node.serves.as_ref().filter(|&s| *s != role) {
            bail!(
                "{} holds the data of {}; it cannot be served as {} (its versions would reuse that node's dots). \
                 Start it as {}, or move it away to start a new node",
                path.display(),
                role_words(serves),
                role_words(&role),
                role_words(serves)
            );
        }
        Ok(DataDir { path, node, planned: false, role, clean_seqs: None, _lock: lock })
    } else {
        // Shard data without its NODE file is damage (or a copy made
        // without it), not a new directory: starting over would give the
        // data a new identity and perhaps another shard count, and serve
        // its keys as missing.
        if let Some(NodeData::Orphaned(orphans)) = found {
            bail!(
                "{} holds shard data ({}) but no {NODE_FILE} file: restore {NODE_FILE}, or move the data away to start \
                 a new node",
                path.display(),
                orphans.join(", ")
            );
        }
        if let Some(what) = other_gyre_data(&path)? {
            bail!(
                "{} is not a node's data directory but holds {what}: give the node a directory of its own (a new \
                 or an empty one)",
                path.display()
            );
        }
        let shards = config.shards.unwrap_or(available_cores).max(1);
        if shards > MAX_SHARDS {
            bail!("{shards} shards is more than the limit of {MAX_SHARDS}");
        }
        let node = NodeFile {
            version: NODE_FILE_VERSION,
            node_id: random_id,
            shards,
            partitions,
            actor: None,
            serves: Some(role.clone()),
        };
        Ok(DataDir { path, node, planned: true, role, clean_seqs: None, _lock: lock })
    }
}

impl DataDir {
    /// Whether the directory's `NODE` file is not written yet.
    pub fn is_new(&self) -> bool {
        self.planned
    }

    /// Writes a new directory's `NODE` file (durably), fixing its shape;
    /// nothing for a directory that has one. No shard may be opened
    /// before this.
    pub fn persist(&mut self) -> anyhow::Result<()> {
        if !self.planned {
            return Ok(());
        }
        self.write_node_file()?;
        self.planned = false;
        Ok(())
    }

    /// Writes `NODE` from `self.node`, durably (a rename over the old one).
    fn write_node_file(&self) -> anyhow::Result<()> {
        let node_path = self.path.join(NODE_FILE);
        let tmp = self.path.join("NODE.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(serde_json::to_string_pretty(&self.node)?.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &node_path)?;
            sync_dir(&self.path)
        };
        write().with_context(|| format!("writing {}", node_path.display()))
    }

    /// Starts a run on the data directory (a new one, not yet persisted,
    /// included), before any shard takes a write: removes the `CLEAN` mark
    /// durably, or, if it was not there (the last run was killed, crashed
    /// or failed), gives this node a new dot actor (`fresh`, unless it
    /// happens to be one in use) and writes it to `NODE`. Returns whether
    /// the actor changed.
    ///
    /// Why: a node makes a key's next dot from the counters it has for
    /// that key. A run that stopped uncleanly may have lost writes that
    /// other replicas (or clients) already hold (under `never` or
    /// `interval`, or a replica write sent before the local sync); with
    /// the same actor, the next write would reuse a lost write's dot, and
    /// merging treats equal dots as one write: an acknowledged write
    /// would silently vanish. A new actor's dots are new everywhere. The
    /// cost is one more entry in the version vectors of keys written
    /// after each unclean stop (the pruning policy bounds them).
    ///
    /// A shard directory the node had and that is gone (its start would
    /// recreate it empty, losing every record in it with no recovery to
    /// report it) counts as a loss too, after a clean stop as well.
    pub fn begin_run(&mut self, fresh: u64) -> anyhow::Result<bool> {
        // Read before it goes: the sequence numbers the shards had reached.
        // Not in a new directory: a mark left there (an operator removed
        // NODE and the shards but kept the directory) is another node's,
        // and its numbers read as records this one lost (found by a
        // review).
        self.clean_seqs = if self.planned { None } else { read_clean_seqs(&self.path, self.node.shards) };
        let was_clean = forget_clean_stop(&self.path)?;
        if self.planned {
            // A new directory has lost nothing.
            return Ok(false);
        }
        // A directory from before the role was recorded takes this start's.
        if self.node.serves.is_none() {
            self.node.serves = Some(self.role.clone());
            self.write_node_file()?;
        }
        let missing = missing_shard_dirs(&self.path, self.node.shards);
        if !missing.is_empty() {
            tracing::warn!(?missing, "shard directories of this node are gone: their records are lost");
        }
        if was_clean && missing.is_empty() {
            return Ok(false);
        }
        self.renew_actor(fresh)?;
        Ok(true)
    }

    /// Gives the node a new dot actor (`fresh`, unless it is one in use,
    /// or 0) and writes it to `NODE`, durably: for a start that finds the
    /// last run may have lost writes (no `CLEAN`), or whose recovery lost
    /// records.
    pub fn renew_actor(&mut self, fresh: u64) -> anyhow::Result<()> {
        let mut fresh = fresh.max(1);
        while fresh == self.node.node_id || Some(fresh) == self.node.actor {
            fresh = fresh.wrapping_add(1).max(1);
        }
        self.node.actor = Some(fresh);
        self.write_node_file()
    }

    /// Marks a clean stop: every shard flushed and synced its log, and
    /// `last_seq[i]` is the last sequence number shard `i` gave a record.
    pub fn end_run_cleanly(&self, last_seq: Vec<u64>) -> anyhow::Result<()> {
        let clean = self.path.join(CLEAN_FILE);
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&clean)?;
            f.write_all(serde_json::to_string(&CleanMark { last_seq })?.as_bytes())?;
            f.sync_all()?;
            sync_dir(&self.path)
        };
        write().with_context(|| format!("writing {}", clean.display()))
    }

    /// Each shard's last sequence number at the last clean stop, if its
    /// `CLEAN` mark said (read by [`Self::begin_run`]).
    pub fn clean_seqs(&self) -> Option<&[u64]> {
        self.clean_seqs.as_deref()
    }

    /// The shards whose storage recovered less than they held at the last
    /// clean stop (`recovered[i]`: shard `i`'s last sequence number now),
    /// with what they held: records lost with no damage to report (a
    /// shard directory emptied, segments removed; found by a review). A
    /// start treats it as a loss, and gives the node a new actor: the
    /// shard would otherwise number records, and draw dots, from where
    /// it had been, reusing dots replicas and clients hold.
    pub fn shards_gone_back(&self, recovered: &[u64]) -> Vec<(usize, u64, u64)> {
        self.clean_seqs.as_deref().map_or_else(Vec::new, |clean| shards_gone_back(clean, recovered))
    }

    /// Directory of shard `i`'s storage engine.
    pub fn shard_dir(&self, shard: usize) -> PathBuf {
        self.path.join(shard_dir_name(shard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_data_without_a_node_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
        // As `node::run` starts a new directory.
        let mut data = lock_data_dir(&config, 2, 7).unwrap();
        assert!(!data.begin_run(9).unwrap(), "a new directory keeps its actor");
        data.persist().unwrap();
        assert_eq!(data.node.actor(), 7);
        std::fs::create_dir(data.shard_dir(0)).unwrap();
        drop(data);
        std::fs::remove_file(dir.path().join(NODE_FILE)).unwrap();
        let e = open_data_dir(&config, 2, 8).unwrap_err().to_string();
        assert!(e.contains("shard-000") && e.contains("no NODE file"), "{e}");
        assert!(!dir.path().join(NODE_FILE).exists(), "nothing was written");
        // Something else under a shard directory's name is refused alike:
        // a start would write its NODE file and then fail to make the
        // shard's directory, on every start after.
        std::fs::remove_dir(dir.path().join("shard-000")).unwrap();
        std::fs::write(dir.path().join("shard-000"), b"not a directory").unwrap();
        let e = open_data_dir(&config, 2, 8).unwrap_err().to_string();
        assert!(e.contains("shard-000") && e.contains("no NODE file"), "{e}");
        assert!(!dir.path().join(NODE_FILE).exists(), "nothing was written");
    }

    /// Found by a review: a NODE file naming actor 0 (or node id 0, the
    /// actor when none is named) made a start wait forever, and `gyre
    /// check` passed it; a config file's empty `data_dir` locked the
    /// current directory. Both are refused.
    #[test]
    fn a_node_file_naming_id_0_and_an_empty_data_dir_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
        let mut data = lock_data_dir(&config, 2, 7).unwrap();
        data.begin_run(9).unwrap();
        data.persist().unwrap();
        drop(data);
        let path = dir.path().join(NODE_FILE);
        let good: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (field, zero) in [("actor", 0), ("node_id", 0)] {
            let mut bad = good.clone();
            bad[field] = zero.into();
            if field == "node_id" {
                bad.as_object_mut().unwrap().remove("actor");
            }
            std::fs::write(&path, bad.to_string()).unwrap();
            let e = open_data_dir(&config, 2, 8).unwrap_err().to_string();
            assert!(e.contains("actor 0"), "{field}: {e}");
        }
        let empty = NodeConfig { data_dir: PathBuf::new(), ..Default::default() };
        assert!(empty.validate().unwrap_err().to_string().contains("data_dir is empty"));
    }

    /// A data directory records what it serves, and refuses to be served as
    /// anything else (found by a review: a member's directory copied and
    /// started as another member issued the same dots as the first). One
    /// from before the record takes its next start's.
    #[test]
    fn a_data_directory_serves_only_what_it_was_made_for() {
        let dir = tempfile::tempdir().unwrap();
        let member = |name: &str| NodeConfig {
            data_dir: dir.path().to_path_buf(),
            cluster: Some(PathBuf::from("cluster.toml")),
            name: Some(name.to_string()),
            ..Default::default()
        };
        let mut data = open_data_dir(&member("n1"), 2, 7).unwrap();
        data.begin_run(9).unwrap();
        assert_eq!(data.node.serves.as_deref(), Some("n1"));
        drop(data);
        let e = open_data_dir(&member("n2"), 2, 8).unwrap_err().to_string();
        assert!(e.contains("cluster member \"n1\"") && e.contains("cannot be served as cluster member \"n2\""), "{e}");
        let lone = NodeConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
        let e = open_data_dir(&lone, 2, 8).unwrap_err().to_string();
        assert!(e.contains("cannot be served as a lone node"), "{e}");
        open_data_dir(&member("n1"), 2, 8).unwrap();
        // An older NODE file, without the record.
        let mut node = read_node_file(dir.path()).unwrap();
        node.serves = None;
        std::fs::write(dir.path().join(NODE_FILE), serde_json::to_string(&node).unwrap()).unwrap();
        let mut data = open_data_dir(&lone, 2, 8).unwrap();
        data.begin_run(9).unwrap();
        drop(data);
        assert_eq!(read_node_file(dir.path()).unwrap().serves.as_deref(), Some(""), "a lone node's now");
        assert!(open_data_dir(&member("n1"), 2, 8).is_err());
        // A name without a cluster is a mistake, not ignored.
        let e = NodeConfig { name: Some("n1".into()), ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("--cluster"), "{e}");
    }

    /// A new node of two shards that ran once and stopped cleanly, its
    /// shards at `last_seq`: its directory and its config.
    fn stopped_cleanly(last_seq: Vec<u64>) -> (tempfile::TempDir, NodeConfig) {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig { data_dir: dir.path().to_path_buf(), shards: Some(2), ..Default::default() };
        let mut data = open_data_dir(&config, 2, 7).unwrap();
        data.begin_run(9).unwrap();
        for i in 0..2 {
            std::fs::create_dir(data.shard_dir(i)).unwrap();
        }
        data.end_run_cleanly(last_seq).unwrap();
        (dir, config)
    }

    /// A clean stop records each shard's last sequence number; a start
    /// whose shards recovered less lost records with no damage to show
    /// (an emptied shard directory, removed segments; found by a review),
    /// which renews the actor like any loss. A NODE file's shard count is
    /// checked like the flag's.
    #[test]
    fn a_shard_that_went_back_since_its_clean_stop_is_found() {
        let (dir, config) = stopped_cleanly(vec![10, 0]);
        let mut data = open_data_dir(&config, 2, 7).unwrap();
        assert!(!data.begin_run(9).unwrap(), "a clean stop");
        assert_eq!(data.shards_gone_back(&[10, 0]), vec![]);
        assert_eq!(data.shards_gone_back(&[12, 3]), vec![]);
        assert_eq!(data.shards_gone_back(&[0, 0]), vec![(0, 10, 0)]);
        drop(data);
        // An empty mark, as older builds wrote it: no numbers to compare.
        std::fs::write(dir.path().join(CLEAN_FILE), b"").unwrap();
        let mut data = open_data_dir(&config, 2, 7).unwrap();
        assert!(!data.begin_run(9).unwrap(), "still a clean stop");
        assert_eq!(data.shards_gone_back(&[0, 0]), vec![]);
        drop(data);
        let mut node = read_node_file(dir.path()).unwrap();
        node.shards = 0;
        std::fs::write(dir.path().join(NODE_FILE), serde_json::to_string(&node).unwrap()).unwrap();
        let e = read_node_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("0 shards"), "{e}");
    }

    /// A CLEAN mark left in a directory whose NODE and shards were removed
    /// is another node's: a new node there lost nothing (found by a review:
    /// it warned of lost records and renewed its actor at once).
    #[test]
    fn a_clean_mark_left_in_a_new_directory_is_not_the_new_nodes() {
        let (dir, config) = stopped_cleanly(vec![10, 5]);
        std::fs::remove_file(dir.path().join(NODE_FILE)).unwrap();
        for i in 0..2 {
            std::fs::remove_dir(dir.path().join(shard_dir_name(i))).unwrap();
        }
        let mut data = lock_data_dir(&config, 2, 11).unwrap();
        assert!(data.is_new());
        assert!(!data.begin_run(12).unwrap(), "a new directory keeps its actor");
        assert_eq!(data.shards_gone_back(&[0, 0]), vec![], "a new node lost nothing");
        assert!(!dir.path().join(CLEAN_FILE).exists(), "the old mark is gone");
    }

    /// A new node is not created over other Gyre data (found by a review:
    /// `gyre node` on a shard's directory or on a `gyre dev` directory, both
    /// `./data` by default, started an empty node inside it).
    #[test]
    fn a_node_is_not_created_over_other_gyre_data() {
        for (what, make) in [
            ("a shard's storage", &(|d: &Path| std::fs::write(d.join("GYRE_FORMAT"), b"2").unwrap()) as &dyn Fn(&Path)),
            ("a cluster file", &|d: &Path| std::fs::write(d.join("cluster.toml"), b"").unwrap()),
            ("a node's data directory", &|d: &Path| {
                std::fs::create_dir(d.join("n1")).unwrap();
                std::fs::write(d.join("n1").join(NODE_FILE), b"{}").unwrap();
            }),
        ] {
            let dir = tempfile::tempdir().unwrap();
            make(dir.path());
            let config = NodeConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
            let e = open_data_dir(&config, 2, 7).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
            assert!(!dir.path().join(NODE_FILE).exists(), "{what}: nothing written");
        }
    }

    /// A segment too small for a shard's largest record is refused in the
    /// node's terms, not with the engine's internal value limit.
    #[test]
    fn a_segment_smaller_than_the_largest_stored_record_is_refused_clearly() {
        let mut config = NodeConfig::default();
        config.storage.segment_size = 8 * 1024 * 1024;
        let e = config.engine_config().unwrap_err().to_string();
        assert!(e.contains("segment_size 8388608 is too small") && e.contains("siblings"), "{e}");
        assert!(!e.contains("max_value_len 8388608"), "{e}");
        config.storage.segment_size = 16 * 1024 * 1024;
        assert_eq!(config.engine_config().unwrap().segment_size, 16 * 1024 * 1024);
    }

    /// A node of a cluster never drops a tombstone (a replica that missed
    /// the delete would bring the value back through read repair), and
    /// refuses a configuration that asks it to; a lone node drops them after
    /// the grace period (its own, or the default).
    #[test]
    fn a_cluster_node_keeps_its_tombstones() {
        let lone: NodeConfig = toml::from_str("").unwrap();
        assert_eq!(lone.engine_config().unwrap().tombstone_grace_ms, EngineConfig::default().tombstone_grace_ms);
        let member = NodeConfig { cluster: Some(PathBuf::from("cluster.toml")), ..lone };
        assert_eq!(member.engine_config().unwrap().tombstone_grace_ms, KEEP_TOMBSTONES);
        assert_eq!(member.shard_engine_config(2, None, None).unwrap().tombstone_grace_ms, KEEP_TOMBSTONES);
        let mut asks: NodeConfig = toml::from_str("[storage]\ntombstone_grace_ms = 1000\n").unwrap();
        assert_eq!(asks.engine_config().unwrap().tombstone_grace_ms, 1000, "a lone node takes it");
        asks.cluster = Some(PathBuf::from("cluster.toml"));
        let err = asks.engine_config().unwrap_err().to_string();
        assert!(err.contains("tombstone_grace_ms cannot be set on a node of a cluster"), "{err}");
    }

    #[test]
    fn empty_config_is_the_defaults_and_unknown_keys_fail() {
        let c: NodeConfig = toml::from_str("").unwrap();
        assert_eq!(c.listen.port(), DEFAULT_PORT);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert!(c.accept_unbound_contexts, "taken by default: clients hold them across an upgrade");
        assert_eq!(c.frame_timeout_ms, 30_000, "an empty file's frame timeout");
        let c: NodeConfig = toml::from_str("accept_unbound_contexts = false").unwrap();
        assert!(!c.accept_unbound_contexts);
        let c: NodeConfig = toml::from_str("frame_timeout_ms = 0").unwrap();
        assert_eq!(c.frame_timeout_ms, 0, "0 turns it off");
        assert_eq!(NodeConfig::default().cluster_secret_file, None, "no secret by default");
        let c: NodeConfig = toml::from_str("cluster_secret_file = \"/etc/gyre/secret\"").unwrap();
        assert_eq!(c.cluster_secret_file, Some(PathBuf::from("/etc/gyre/secret")));
        let c: NodeConfig =
            toml::from_str("accept_cluster_secret_files = [\"a\", \"b\"]\naccept_unauthenticated = true").unwrap();
        assert_eq!(c.accept_cluster_secret_files, vec![PathBuf::from("a"), PathBuf::from("b")]);
        assert!(c.accept_unauthenticated && !NodeConfig::default().accept_unauthenticated);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("need a cluster_secret_file"), "{e}");
        let with_secret = NodeConfig { cluster_secret_file: Some("s".into()), ..c };
        assert!(with_secret.validate().is_ok());
        let c: NodeConfig =
            toml::from_str("fsync = \"never\"\nshards = 2\n[storage]\nsegment_size = 1048576\n").unwrap();
        assert_eq!((c.fsync, c.shards, c.storage.segment_size), (FsyncPolicy::Never, Some(2), 1 << 20));
        assert!(toml::from_str::<NodeConfig>("fsnyc = \"never\"").is_err());
    }

    #[test]
    fn data_dir_pins_its_shape_and_is_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let config = NodeConfig { data_dir: tmp.path().join("d"), shards: Some(2), ..Default::default() };
        let d = open_data_dir(&config, 8, 42).unwrap();
        assert_eq!((d.node.shards, d.node.node_id), (2, 42));
        let again = open_data_dir(&config, 8, 43).unwrap_err().to_string();
        assert!(again.contains("in use"), "{again}");
        drop(d);
        let other = NodeConfig { shards: Some(3), ..config.clone() };
        assert!(open_data_dir(&other, 8, 1).unwrap_err().to_string().contains("created with 2 shards"));
        let any = NodeConfig { shards: None, ..config };
        let d = open_data_dir(&any, 8, 44).unwrap();
        assert_eq!((d.node.shards, d.node.node_id), (2, 42), "identity comes from the directory");
    }

    #[test]
    fn storage_settings_of_the_top_level_are_refused_in_the_storage_table() {
        for (key, value) in
            [("max_value_len", "100"), ("fsync", "\"never\""), ("cache_bytes", "0"), ("disk_reserve_bytes", "0")]
        {
            let text = format!("[storage]\n{key} = {value}\n");
            let err = toml::from_str::<NodeConfig>(&text).unwrap_err().to_string();
            assert!(err.contains(&format!("set the top-level `{key}`")), "{err}");
        }
        // The rest of the table is read as before, unknown keys still fail.
        let c: NodeConfig =
            toml::from_str("max_value_len = 100\ncache_bytes = 0\n[storage]\npreallocate = false\n").unwrap();
        assert_eq!((c.max_value_len, c.cache_bytes, c.storage.preallocate), (100, Some(0), false));
        assert!(toml::from_str::<NodeConfig>("[storage]\nsegment_sise = 1\n").is_err());
        // A written configuration reads back.
        let c =
            NodeConfig { max_value_len: 100, fsync: FsyncPolicy::Never, cache_bytes: Some(5), ..Default::default() };
        let back: NodeConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(
            (back.max_value_len, back.fsync, back.cache_bytes, back.storage),
            (100, FsyncPolicy::Never, Some(5), c.storage)
        );
    }

    /// The disk reserve is the node's, and every shard refuses writes under
    /// all of it (they share the file system): four segments a shard by
    /// default, at most a tenth of the file system, or what
    /// `disk_reserve_bytes` says.
    #[test]
    fn the_disk_reserve_is_the_nodes_and_every_shard_keeps_all_of_it() {
        let seg = EngineConfig::default().segment_size;
        let reserve = |c: &NodeConfig, shards, disk| c.shard_engine_config(shards, None, disk).unwrap().disk_reserve();
        let auto = NodeConfig::default();
        assert_eq!(reserve(&auto, 2, None), 2 * DEFAULT_DISK_RESERVE_SEGMENTS * seg);
        assert_eq!(reserve(&auto, 2, Some(1 << 40)), 2 * DEFAULT_DISK_RESERVE_SEGMENTS * seg);
        assert_eq!(reserve(&auto, 16, Some(20 << 30)), 3 << 30, "three segments a shard, over a tenth");
        assert_eq!(reserve(&auto, 16, Some(35 << 30)), (35 << 30) / 10, "a tenth of a 35 GiB disk");
        let big = NodeConfig { storage: EngineConfig { segment_size: 1 << 30, ..Default::default() }, ..auto };
        assert_eq!(reserve(&big, 3, None), (3 * DEFAULT_DISK_RESERVE_SEGMENTS) << 30, "in the node's segments");
        let set = NodeConfig { disk_reserve_bytes: Some(12_345), ..Default::default() };
        assert_eq!(reserve(&set, 16, Some(10 << 30)), 12_345);
        let off = NodeConfig { disk_reserve_bytes: Some(0), ..Default::default() };
        assert_eq!(reserve(&off, 4, Some(1 << 40)), 0);
        let c: NodeConfig = toml::from_str("disk_reserve_bytes = 1048576\n").unwrap();
        assert_eq!(c.disk_reserve_bytes, Some(1 << 20));
    }

    /// The record caches take a quarter of the memory the process may use
    /// unless `cache_bytes` says how much; either way the shards share it.
    #[test]
    fn the_record_cache_is_the_nodes_share_of_memory_split_across_shards() {
        let gib = 1u64 << 30;
        let auto = NodeConfig::default();
        let cache =
            |c: &NodeConfig, shards, memory| c.shard_engine_config(shards, memory, None).unwrap().cache_bytes as u64;
        assert_eq!(cache(&auto, 1, Some(16 * gib)), 4 * gib);
        assert_eq!(cache(&auto, 4, Some(16 * gib)), gib);
        // Memory unknown: the engine's own default, per shard.
        assert_eq!(cache(&auto, 4, None), EngineConfig::default().cache_bytes as u64);
        let set = NodeConfig { cache_bytes: Some(3 * gib), ..Default::default() };
        assert_eq!(cache(&set, 3, Some(16 * gib)), gib);
        assert_eq!(cache(&set, 3, None), gib);
        let off = NodeConfig { cache_bytes: Some(0), ..Default::default() };
        assert_eq!(cache(&off, 2, Some(16 * gib)), 0);
        // Everything else is the engine configuration the node checks.
        let plain = auto.engine_config().unwrap();
        let reserve = Some(default_node_disk_reserve(1, plain.segment_size, None));
        let other = EngineConfig { cache_bytes: 0, disk_reserve_bytes: reserve, ..plain };
        assert_eq!(EngineConfig { cache_bytes: 0, ..auto.shard_engine_config(1, Some(gib), None).unwrap() }, other);
    }

    #[test]
    fn a_refused_configuration_leaves_the_data_directory_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let ok = NodeConfig { data_dir: dir.clone(), shards: Some(2), ..Default::default() };
        let bad = [
            NodeConfig { max_value_len: 0, ..ok.clone() },
            NodeConfig { max_value_len: VALUE_LEN_HARD_CAP + 1, ..ok.clone() },
            NodeConfig { shards: Some(0), ..ok.clone() },
            NodeConfig { shards: Some(MAX_SHARDS + 1), ..ok.clone() },
            NodeConfig { listen: "127.0.0.1:65535".parse().unwrap(), ..ok.clone() },
            NodeConfig { storage: EngineConfig { segment_size: 4097, ..Default::default() }, ..ok.clone() },
            NodeConfig { tcp_keepalive: MAX_TCP_KEEPALIVE_S + 1, ..ok.clone() },
        ];
        for config in &bad {
            assert!(config.validate().is_err(), "{config:?}");
            assert!(open_data_dir(config, 8, 42).is_err(), "{config:?}");
            assert!(!dir.exists(), "a refused start created {}", dir.display());
        }
        ok.validate().unwrap();
        // Locked but not persisted: the shape is still free.
        let d = lock_data_dir(&ok, 8, 42).unwrap();
        assert!(d.is_new() && !dir.join(NODE_FILE).exists());
        drop(d);
        let one = NodeConfig { shards: Some(1), ..ok };
        let d = open_data_dir(&one, 8, 43).unwrap();
        assert!(!d.is_new());
        assert_eq!((d.node.shards, d.node.node_id), (1, 43));
    }
}
