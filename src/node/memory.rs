//! How much memory this process may use: the machine's, or less where a
//! control group limits it (a container, a systemd unit's `MemoryMax`).
//! A node sizes its record caches from it (`NodeConfig::shard_engine_config`).
//!
//! Owns: reading `/proc/meminfo`, `/proc/self/cgroup`,
//! `/proc/self/mountinfo` and the cgroup limit files, and parsing them
//! (pure functions over their text, tested on samples). Invariant: a
//! figure that cannot be read or parsed is `None`, never a guess; "no
//! limit" is `None` too.
//!
//! The limit files are found where the cgroup file systems are mounted
//! (`mountinfo`), not at an assumed `/sys/fs/cgroup`: v1 may mount the
//! memory controller with others (`/sys/fs/cgroup/cpu,memory`), v2 may sit
//! at `/sys/fs/cgroup/unified` beside v1, and a container may see its own
//! group mounted as the root. A mount shows the group at its root; the
//! process's group must lie under it, or its files are not visible here.

use std::path::{Path, PathBuf};

/// A cgroup v1 limit at or above this is "unlimited": v1 writes the
/// largest page-aligned `i64` (9223372036854771712) for no limit.
const CGROUP_V1_UNLIMITED: u64 = 1 << 60;

/// Bytes of memory this process may use: the smaller of the machine's
/// memory and the tightest limit of its control group and the groups
/// above it that are visible. `None` if neither can be read.
pub fn available() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let total = read("/proc/meminfo").and_then(|t| mem_total(&t));
    let files = match (read("/proc/self/cgroup"), read("/proc/self/mountinfo")) {
        (Some(groups), Some(mounts)) => limit_files(&groups, &mounts),
        _ => Vec::new(),
    };
    let limits = files.iter().filter_map(|f| std::fs::read_to_string(f).ok().and_then(|v| parse_limit(&v)));
    combine(total, limits)
}

/// The machine's memory bounded by every limit found.
fn combine(total: Option<u64>, limits: impl IntoIterator<Item = u64>) -> Option<u64> {
    limits.into_iter().fold(total, |have, limit| Some(have.map_or(limit, |h| h.min(limit))))
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

/// A limit file's value in bytes: cgroup v2's `memory.max` ("max": none)
/// or v1's `memory.limit_in_bytes` (a huge number: none).
fn parse_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse::<u64>().ok().filter(|&b| b < CGROUP_V1_UNLIMITED)
}

/// Which cgroup hierarchy a mount or a `/proc/self/cgroup` line is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hierarchy {
    /// v2, the unified hierarchy: `memory.max`.
    V2,
    /// v1 with the memory controller: `memory.limit_in_bytes`.
    V1Memory,
}

impl Hierarchy {
    fn limit_file(self) -> &'static str {
        match self {
            Hierarchy::V2 => "memory.max",
            Hierarchy::V1Memory => "memory.limit_in_bytes",
        }
    }
}

/// The cgroup mounts of `mountinfo` that can limit memory: (hierarchy,
/// the group shown at the mount's root, the mount point).
fn cgroup_mounts(mountinfo: &str) -> Vec<(Hierarchy, PathBuf, PathBuf)> {
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let Some((before, after)) = line.split_once(" - ") else { continue };
        let fields: Vec<&str> = before.split(' ').collect();
        let after: Vec<&str> = after.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (fields.get(3), fields.get(4), after.first()) else {
            continue;
        };
        let hierarchy = match *fstype {
            "cgroup2" => Hierarchy::V2,
            "cgroup" if after.get(2).is_some_and(|o| o.split(',').any(|o| o == "memory")) => Hierarchy::V1Memory,
            _ => continue,
        };
        mounts.push((hierarchy, unescape(root), unescape(point)));
    }
    mounts
}

/// A `mountinfo` path with its octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from(String::from_utf8_lossy(&out).into_owned()))
}

/// The limit files that bound this process: for each hierarchy with
/// memory control in `/proc/self/cgroup`, and each mount of it, the file of
/// the process's group and those of the groups above it up to the mount's
/// root (a parent's limit bounds its children). A group outside what a
/// mount shows (a path with `..` in a namespace, or not under the mount's
/// root) has no file here.
fn limit_files(proc_self_cgroup: &str, mountinfo: &str) -> Vec<PathBuf> {
    let mounts = cgroup_mounts(mountinfo);
    let mut files = Vec::new();
    for line in proc_self_cgroup.lines() {
        // hierarchy-id:controllers:path; v2 is "0::path". The path may
        // hold ':' itself.
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let hierarchy = if id == "0" && controllers.is_empty() {
            Hierarchy::V2
        } else if controllers.split(',').any(|c| c == "memory") {
            Hierarchy::V1Memory
        } else {
            continue;
        };
        let group = Path::new(path);
        if group.components().any(|c| c == std::path::Component::ParentDir) {
            continue;
        }
        for (_, root, point) in mounts.iter().filter(|(h, _, _)| *h == hierarchy) {
            let Ok(below) = group.strip_prefix(root) else { continue };
            let mut dir = point.join(below);
            loop {
                files.push(dir.join(hierarchy.limit_file()));
                if dir == *point || !dir.pop() {
                    break;
                }
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_reads_kib_from_meminfo() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:        20000000 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_576_000 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(mem_total("MemTotal: 12\n"), None, "no unit: not a figure to trust");
    }

    #[test]
    fn limits_read_max_and_v1_unlimited_as_none() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("536870912\n"), Some(512 << 20));
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit(""), None);
        assert_eq!(parse_limit("-1"), None);
    }

    #[test]
    fn the_tightest_limit_bounds_the_machines_memory() {
        assert_eq!(combine(Some(100), [300, 50, 70]), Some(50));
        assert_eq!(combine(Some(100), []), Some(100));
        assert_eq!(combine(None, [300, 70]), Some(70), "a limit alone still counts");
        assert_eq!(combine(None, []), None);
    }

    const V2_MOUNT: &str =
        "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n";

    fn paths<const N: usize>(p: [&str; N]) -> Vec<PathBuf> {
        p.map(PathBuf::from).to_vec()
    }

    #[test]
    fn limit_files_cover_the_group_and_every_group_above_it() {
        let files = limit_files("0::/system.slice/gyre.service\n", V2_MOUNT);
        assert_eq!(
            files,
            paths([
                "/sys/fs/cgroup/system.slice/gyre.service/memory.max",
                "/sys/fs/cgroup/system.slice/memory.max",
                "/sys/fs/cgroup/memory.max",
            ])
        );
        // A container's namespace shows its own group as the root.
        assert_eq!(limit_files("0::/\n", V2_MOUNT), paths(["/sys/fs/cgroup/memory.max"]));
        // A path may hold ':'.
        assert_eq!(
            limit_files("0::/a:b\n", V2_MOUNT),
            paths(["/sys/fs/cgroup/a:b/memory.max", "/sys/fs/cgroup/memory.max"])
        );
        // Outside the namespace: nothing this process can read for it.
        assert!(limit_files("0::/../../x\n", V2_MOUNT).is_empty());
        assert!(limit_files("garbage\n\n", V2_MOUNT).is_empty());
    }

    #[test]
    fn limit_files_are_found_where_the_hierarchies_are_mounted() {
        // A hybrid machine (this project's VM): v1 controllers, memory
        // mounted alone, v2 beside them at `unified`.
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let cgroup = "4:memory:/process_api/2c22\n1:cpu:/\n0::/\n";
        assert_eq!(
            limit_files(cgroup, mountinfo),
            paths([
                "/sys/fs/cgroup/memory/process_api/2c22/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "/sys/fs/cgroup/unified/memory.max",
            ])
        );
        // v1 with memory mounted together with other controllers.
        let joint = "40 31 0:40 / /sys/fs/cgroup/cpu,memory rw - cgroup cgroup rw,cpu,memory\n";
        assert_eq!(
            limit_files("7:cpu,memory:/k\n", joint),
            paths([
                "/sys/fs/cgroup/cpu,memory/k/memory.limit_in_bytes",
                "/sys/fs/cgroup/cpu,memory/memory.limit_in_bytes"
            ])
        );
        // A container that sees the host's hierarchy but has only its own
        // group mounted: the mount's root is that group, so its limit is
        // the mount point's file, and the groups above are not visible.
        let own = "50 40 0:26 /docker/abc /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(limit_files("0::/docker/abc\n", own), paths(["/sys/fs/cgroup/memory.max"]));
        assert!(limit_files("0::/other\n", own).is_empty(), "a group the mount does not show");
        // Escaped characters in a mount point.
        let spaced = "30 23 0:26 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(limit_files("0::/\n", spaced), paths(["/mnt/cg two/memory.max"]));
        // No cgroup mounts at all: no files, and the machine's memory stands.
        assert!(limit_files("0::/x\n", "22 1 0:21 / /proc rw - proc proc rw\n").is_empty());
    }

    #[test]
    fn this_machine_has_some_memory() {
        // Linux always has /proc/meminfo; the figure is never zero.
        assert!(available().expect("readable on Linux") > 0);
    }
}
