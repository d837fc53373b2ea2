//! How much memory this process may use: the machine's, or less where a
//! control group limits it (a container, a systemd unit's `MemoryMax`).
//! A node sizes its record caches from it (`NodeConfig::shard_engine_config`).
//!
//! Owns: reading `/proc/meminfo`, `/proc/self/cgroup` and the cgroup limit
//! files, and parsing them (pure functions over their text, tested on
//! samples). Invariant: a figure that cannot be read or parsed is `None`,
//! never a guess; "no limit" is `None` too.

use std::path::{Path, PathBuf};

/// Where cgroup v2's unified hierarchy is mounted, and v1's memory
/// controller. Containers mount the process's own group at the root.
const CGROUP_V2_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_V1_MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";

/// A cgroup v1 limit at or above this is "unlimited": v1 writes the
/// largest page-aligned `i64` (9223372036854771712) for no limit.
const CGROUP_V1_UNLIMITED: u64 = 1 << 60;

/// Bytes of memory this process may use: the smaller of the machine's
/// memory and the tightest limit of its control group and the groups
/// above it. `None` if neither can be read.
pub fn available() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| mem_total(&t));
    let limit = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| {
        limit_files(&t).iter().filter_map(|f| std::fs::read_to_string(f).ok().and_then(|v| parse_limit(&v))).min()
    });
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
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

/// The limit files that bound this process, from `/proc/self/cgroup`: for
/// each hierarchy with memory control, its group's file and those of the
/// groups above it (a parent's limit bounds its children). A group whose
/// path is not under the mount (a container that mounts only its own
/// group) is covered by the mount's root file, also listed.
fn limit_files(proc_self_cgroup: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for line in proc_self_cgroup.lines() {
        // hierarchy-id:controllers:path; v2 is "0::path".
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (root, file) = if id == "0" && controllers.is_empty() {
            (CGROUP_V2_ROOT, "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (CGROUP_V1_MEMORY_ROOT, "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = Some(Path::new(path));
        while let Some(d) = dir {
            let relative = d.strip_prefix("/").unwrap_or(d);
            files.push(Path::new(root).join(relative).join(file));
            dir = d.parent();
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
    fn limit_files_cover_the_group_and_every_group_above_it() {
        let v2 = "0::/system.slice/gyre.service\n";
        assert_eq!(
            limit_files(v2),
            [
                "/sys/fs/cgroup/system.slice/gyre.service/memory.max",
                "/sys/fs/cgroup/system.slice/memory.max",
                "/sys/fs/cgroup/memory.max",
            ]
            .map(PathBuf::from)
        );
        // A container's namespace shows its own group as the root.
        assert_eq!(limit_files("0::/\n"), [PathBuf::from("/sys/fs/cgroup/memory.max")]);
        // v1: only the hierarchy with the memory controller counts.
        let v1 = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n";
        assert_eq!(
            limit_files(v1),
            [
                "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/docker/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            ]
            .map(PathBuf::from)
        );
        assert!(limit_files("garbage\n\n").is_empty());
    }

    #[test]
    fn this_machine_has_some_memory() {
        // Linux always has /proc/meminfo; the figure is the machine's or
        // a limit below it, and never zero.
        let have = available().expect("readable on Linux");
        assert!(have > 0);
        let total = mem_total(&std::fs::read_to_string("/proc/meminfo").unwrap()).unwrap();
        assert!(have <= total);
    }
}
