//! A node's place in a static cluster: the cluster file every node is
//! given, the ring built from it, this node's member index, and the
//! quorum defaults of each namespace.
//!
//! Owns: the cluster file format (TOML, below) and the rule that picks a
//! request's R and W.
//!
//! Invariant: every node of a cluster builds the same ring from the same
//! file (the claim adds the members in file order, deterministically), so
//! all nodes and every client that fetched the ring agree on each key's
//! preference list without talking to each other. R and W are always
//! between 1 and N.
//!
//! ```toml
//! partitions = 1024          # Q, a power of two; every node's data dir must match
//! n = 3                      # replicas of each key
//! r = 2                      # default read quorum
//! w = 2                      # default write quorum
//!
//! [[nodes]]                  # in claim order; names and addresses unique
//! name = "n1"
//! addr = "127.0.0.1:7700"    # shard 0's address; shard i listens on port + i
//! zone = "a"                 # optional
//!
//! [[namespaces]]             # optional: keys starting with `prefix` use
//! prefix = "session:"        # their own defaults (longest prefix wins)
//! r = 1
//! w = 1
//! ```
//!
//! A namespace is a key prefix rather than a request field so that every
//! client, including one that knows nothing of namespaces, gets the same
//! quorum for the same key; a request can still override R and W (the
//! wire's QUORUM flag).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::core::partition::{validate_partitions, DEFAULT_PARTITIONS};
use crate::core::ring::{Member, MemberIdx, PreferenceTable, Ring};
use crate::wire::Quorum;

/// Largest replica count: quorum sizes travel as a `u8`, and a preference
/// list longer than this would make every write a broadcast.
pub const MAX_REPLICAS: usize = 16;

fn default_partitions() -> u32 {
    DEFAULT_PARTITIONS
}
fn default_n() -> usize {
    3
}
fn default_quorum() -> usize {
    2
}

/// The cluster file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    #[serde(default = "default_n")]
    pub n: usize,
    #[serde(default = "default_quorum")]
    pub r: usize,
    #[serde(default = "default_quorum")]
    pub w: usize,
    pub nodes: Vec<NodeEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Namespace>,
}

/// One node of the cluster file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub name: String,
    pub addr: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// Quorum defaults of the keys that start with `prefix`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub prefix: String,
    pub r: Option<usize>,
    pub w: Option<usize>,
}

impl ClusterFile {
    /// Reads and validates a cluster file; also returns its ring.
    pub fn load(path: &Path) -> anyhow::Result<(ClusterFile, Ring)> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: ClusterFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let ring = file.validate().with_context(|| format!("invalid cluster file {}", path.display()))?;
        Ok((file, ring))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a cluster file serializes")
    }

    /// Checks every rule the file must follow; the ring (built to check
    /// the members) is returned.
    pub fn validate(&self) -> anyhow::Result<Ring> {
        validate_partitions(self.partitions).map_err(anyhow::Error::msg)?;
        if self.nodes.is_empty() {
            bail!("the cluster has no nodes");
        }
        if self.n == 0 || self.n > MAX_REPLICAS {
            bail!("n = {} must be between 1 and {MAX_REPLICAS}", self.n);
        }
        if self.n > self.nodes.len() {
            bail!("n = {} is more than the {} nodes of the cluster", self.n, self.nodes.len());
        }
        check_quorum("r", self.r, self.n)?;
        check_quorum("w", self.w, self.n)?;
        for ns in &self.namespaces {
            if ns.prefix.is_empty() {
                bail!("a namespace prefix is empty (set the cluster's r and w instead)");
            }
            for (what, v) in [("r", ns.r), ("w", ns.w)] {
                if let Some(v) = v {
                    check_quorum(what, v, self.n).with_context(|| format!("namespace {:?}", ns.prefix))?;
                }
            }
        }
        if self.namespaces.iter().enumerate().any(|(i, a)| self.namespaces[..i].iter().any(|b| a.prefix == b.prefix)) {
            bail!("two namespaces have the same prefix");
        }
        // A node's address is where it listens and what its peers and the
        // clients dial: port 0 or a wildcard address cannot be dialled.
        for node in &self.nodes {
            if node.addr.port() == 0 || node.addr.ip().is_unspecified() {
                bail!(
                    "node {:?} has address {}: a node's address is the one its peers and clients dial, so it needs \
                     a port and a host address (not 0 or a wildcard)",
                    node.name,
                    node.addr
                );
            }
        }
        // The ring checks the rest (unique names and addresses, lengths).
        self.ring()
    }

    /// The ring: the members claimed in file order.
    pub fn ring(&self) -> anyhow::Result<Ring> {
        let members =
            self.nodes.iter().map(|n| Member { name: n.name.clone(), addr: n.addr, zone: n.zone.clone() }).collect();
        Ring::with_members(self.partitions, members).map_err(|e| anyhow::anyhow!("building the ring: {e}"))
    }
}

fn check_quorum(what: &str, v: usize, n: usize) -> anyhow::Result<()> {
    if v == 0 || v > n {
        bail!("{what} = {v} must be between 1 and n = {n}");
    }
    Ok(())
}

/// What a running node knows of its cluster.
#[derive(Clone)]
pub struct Cluster {
    pub ring: Ring,
    /// This node's index in the ring.
    pub me: MemberIdx,
    pub n: usize,
    pub r: usize,
    pub w: usize,
    /// `(prefix, r, w)`, longest prefix first.
    namespaces: Vec<(Vec<u8>, Option<usize>, Option<usize>)>,
    /// The encoded ring, ready for RING replies.
    pub ring_bytes: Vec<u8>,
    /// Every partition's first N replicas, computed once.
    prefs: PreferenceTable,
}

impl Cluster {
    /// The cluster of a validated `file` and its `ring`, as seen by the
    /// node named `name`.
    pub fn new(file: &ClusterFile, ring: Ring, name: &str) -> anyhow::Result<Cluster> {
        let Some(me) = ring.index_of(name) else {
            bail!("this node's name {name:?} is not in the cluster file");
        };
        let mut namespaces: Vec<_> =
            file.namespaces.iter().map(|ns| (ns.prefix.as_bytes().to_vec(), ns.r, ns.w)).collect();
        namespaces.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.len()));
        let ring_bytes = ring.to_bytes();
        let prefs = ring.preference_table(file.n);
        Ok(Cluster { ring, me, n: file.n, r: file.r, w: file.w, namespaces, ring_bytes, prefs })
    }

    /// N, R and W as a RING reply carries them (a byte each: the cluster
    /// file's validation bounds them by `MAX_REPLICAS`).
    pub fn quorum_bytes(&self) -> [u8; 3] {
        [self.n, self.r, self.w].map(|v| v as u8)
    }

    /// The read and write quorum of a request on `key`: its overrides,
    /// else its namespace's defaults, else the cluster's.
    pub fn quorum(&self, key: &[u8], over: Quorum) -> Result<(usize, usize), String> {
        let ns = self.namespaces.iter().find(|(p, _, _)| key.starts_with(p));
        let r = ns.and_then(|n| n.1).unwrap_or(self.r);
        let w = ns.and_then(|n| n.2).unwrap_or(self.w);
        let r = if over.r == 0 { r } else { over.r as usize };
        let w = if over.w == 0 { w } else { over.w as usize };
        if r > self.n || w > self.n {
            return Err(format!("r = {r} and w = {w} must be at most n = {}", self.n));
        }
        Ok((r, w))
    }

    /// The key's N replicas, in preference order.
    pub fn replicas(&self, key: &[u8]) -> &[MemberIdx] {
        self.prefs.of_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
partitions = 64
n = 3
r = 2
w = 2
[[nodes]]
name = "a"
addr = "127.0.0.1:7700"
[[nodes]]
name = "b"
addr = "127.0.0.2:7700"
[[nodes]]
name = "c"
addr = "127.0.0.3:7700"
[[namespaces]]
prefix = "s:"
r = 1
[[namespaces]]
prefix = "s:x"
w = 3
"#;

    #[test]
    fn parses_validates_and_picks_quorums() {
        let file: ClusterFile = toml::from_str(FILE).unwrap();
        let ring = file.validate().unwrap();
        let back: ClusterFile = toml::from_str(&file.to_toml()).unwrap();
        assert_eq!(back, file);
        let c = Cluster::new(&file, ring.clone(), "b").unwrap();
        assert_eq!(c.me, 1);
        assert_eq!(c.quorum(b"k", Quorum::default()), Ok((2, 2)));
        assert_eq!(c.quorum(b"s:1", Quorum::default()), Ok((1, 2)));
        assert_eq!(c.quorum(b"s:x1", Quorum::default()), Ok((2, 3)), "the longest prefix wins alone");
        assert_eq!(c.quorum(b"k", Quorum { r: 3, w: 0 }), Ok((3, 2)));
        assert!(c.quorum(b"k", Quorum { r: 4, w: 0 }).is_err());
        let replicas = c.replicas(b"k");
        assert_eq!(replicas, ring.preference_list(ring.partition_of_key(b"k"), 3));
        assert!(Cluster::new(&file, ring, "zz").is_err());
    }

    #[test]
    fn bad_files_are_refused() {
        let bad = |edit: &dyn Fn(&mut ClusterFile)| {
            let mut f: ClusterFile = toml::from_str(FILE).unwrap();
            edit(&mut f);
            f.validate().is_err()
        };
        assert!(bad(&|f| f.n = 4));
        assert!(bad(&|f| f.r = 0));
        assert!(bad(&|f| f.w = 4));
        assert!(bad(&|f| f.partitions = 100));
        assert!(bad(&|f| f.nodes[1].name = "a".into()));
        // Addresses nobody can dial (found by a review: they validated, and
        // that node's peers and clients dialled port 0 or themselves).
        assert!(bad(&|f| f.nodes[0].addr.set_port(0)));
        assert!(bad(&|f| f.nodes[0].addr = "0.0.0.0:7700".parse().unwrap()));
        assert!(bad(&|f| f.nodes[0].addr = "[::]:7700".parse().unwrap()));
        assert!(bad(&|f| f.namespaces[0].r = Some(5)));
        assert!(bad(&|f| f.namespaces[1].prefix = "s:".into()));
        assert!(bad(&|f| f.nodes.clear()));
        assert!(toml::from_str::<ClusterFile>("nodes = []\nfoo = 1").is_err(), "unknown keys are errors");
    }
}
