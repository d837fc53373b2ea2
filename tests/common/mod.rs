//! Starts real `gyre node` processes for end-to-end tests: loopback only,
//! stopped on drop. A lone [`Node`] takes ephemeral ports (read back from
//! its "ready" line); a [`Cluster`] writes a cluster file and runs one node
//! per member, each on its own loopback address, which it can stop, kill
//! and restart one at a time.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const GYRE: &str = env!("CARGO_BIN_EXE_gyre");

/// How long a node may take to print its ready line before it is killed.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running node process.
pub struct Node {
    pub child: Child,
    pub addrs: Vec<String>,
    pub data_dir: PathBuf,
    /// The end of its stderr since its ready line, when not written to a
    /// log file: printed on drop if the test is failing (found by a
    /// review: it went nowhere).
    stderr_tail: std::sync::Arc<Mutex<Vec<u8>>>,
    /// The thread reading it: waited for (briefly) before the tail is
    /// printed, so the node's last lines (a panic) are in it.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    /// Starts a node on `data_dir` with ephemeral ports and waits until it serves.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Node {
        Node::try_start(data_dir, extra).unwrap_or_else(|e| panic!("node did not start: {e}"))
    }

    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Result<Node, String> {
        let mut args: Vec<OsString> =
            ["node", "--listen", "127.0.0.1:0", "--no-pin", "--data-dir"].iter().map(OsString::from).collect();
        args.push(data_dir.into());
        args.extend(extra.iter().map(OsString::from));
        Node::try_spawn(&args, data_dir, None)
    }

    /// Runs `gyre ARGS` (a `node` command line, complete) and waits until
    /// it prints its ready line. Its stderr is appended to `log` if given,
    /// else piped and returned in the error if the node does not start.
    pub fn try_spawn(args: &[OsString], data_dir: &Path, log: Option<&Path>) -> Result<Node, String> {
        Node::try_spawn_with(args, data_dir, log, |command| {
            if std::env::var_os("RUST_LOG").is_none() {
                command.env("RUST_LOG", "warn");
            }
        })
    }

    /// [`Self::try_spawn`] with `env` setting the node's environment
    /// (`try_spawn` sets `RUST_LOG=warn` unless the test has one).
    pub fn try_spawn_with(
        args: &[OsString],
        data_dir: &Path,
        log: Option<&Path>,
        env: impl FnOnce(&mut Command),
    ) -> Result<Node, String> {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display())),
            ),
            None => Stdio::piped(),
        };
        let mut command = Command::new(GYRE);
        env(&mut command);
        let mut child = command.args(args).stdout(Stdio::piped()).stderr(stderr).spawn().expect("spawning gyre node");
        let line = first_line(&mut child, START_TIMEOUT);
        let ready = line.as_deref().and_then(|l| l.split("ready:").nth(1)).map(str::to_string);
        let Some(ready) = ready else {
            let _ = child.kill();
            let out = child.wait_with_output().expect("node output");
            let stderr = match log {
                Some(path) => std::fs::read_to_string(path).unwrap_or_default(),
                None => String::from_utf8_lossy(&out.stderr).into_owned(),
            };
            return Err(match line {
                Some(line) => format!("{}: unexpected first line {line:?}: {stderr}", out.status),
                None => format!("{}: {stderr}", out.status),
            });
        };
        // Read from here on, or a node that logs more than a pipe holds
        // (RUST_LOG set by the caller, a test that makes it warn a lot)
        // would block in its next write to stderr. Its last
        // `STDERR_KEPT` bytes are kept, for a failing test to print.
        let stderr_tail = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stderr_reader = child.stderr.take().map(|mut err| {
            let tail = stderr_tail.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut chunk = [0u8; 8192];
                loop {
                    let n = match err.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    let mut tail = tail.lock().expect("stderr tail");
                    tail.extend_from_slice(&chunk[..n]);
                    let over = tail.len().saturating_sub(STDERR_KEPT);
                    tail.drain(..over);
                }
            })
        });
        let addrs = ready.split_whitespace().map(String::from).collect();
        Ok(Node { child, addrs, data_dir: data_dir.to_path_buf(), stderr_tail, stderr_reader })
    }

    /// Address of shard 0.
    pub fn addr(&self) -> &str {
        &self.addrs[0]
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no cleanup at all.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(self) -> ExitStatus {
        self.terminate_within(STOP_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// SIGTERM and wait up to `timeout` for the exit status; past that,
    /// an error with the stacks of the node's threads (and the node is
    /// killed).
    pub fn terminate_within(mut self, timeout: Duration) -> Result<ExitStatus, String> {
        signal(self.pid(), "TERM");
        wait_bounded(&mut self.child, timeout).ok_or_else(|| {
            format!(
                "node {} did not stop within {timeout:?} of SIGTERM; its threads:\n{}",
                self.pid(),
                stacks(self.pid())
            )
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            return;
        }
        // The node is gone, so its stderr ends: what it wrote last comes in.
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.stderr_reader.as_ref().is_some_and(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let tail = std::mem::take(&mut *self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner()));
        if !tail.is_empty() {
            eprintln!("node {} wrote to stderr (its last bytes):\n{}", self.child.id(), String::from_utf8_lossy(&tail));
        }
    }
}

/// How much of a lone node's stderr (one started without a log file) is
/// kept to print when its test fails.
const STDERR_KEPT: usize = 64 * 1024;

/// Every thread's stack of process `pid`, for a failure message (gdb, if
/// installed and allowed to attach; else each thread's kernel wait channel).
pub fn stacks(pid: u32) -> String {
    let gdb = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .output();
    match gdb {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            let mut out = String::new();
            for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
                let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
                out.push_str(&format!(
                    "{}: {} wchan {}\n",
                    task.file_name().to_string_lossy(),
                    read("stat").trim(),
                    read("wchan")
                ));
            }
            out
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    assert!(try_signal(pid, sig), "kill -{sig} {pid} failed: {}", std::io::Error::last_os_error());
}

/// [`signal`] for a process that may be gone already (clean-up): whether
/// it was sent.
pub fn try_signal(pid: u32, sig: &str) -> bool {
    let signo = match sig {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "KILL" => libc::SIGKILL,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        other => panic!("no signal {other} in the tests' table"),
    };
    // SAFETY: kill(2) on a process id; no memory is involved.
    unsafe { libc::kill(pid as libc::pid_t, signo) == 0 }
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `gyre` with `args`, its stderr written to `log` and its stdout
/// dropped.
pub fn spawn_logged<A: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = A>, log: &Path) -> Child {
    Command::new(GYRE)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("the log file"))
        .spawn()
        .expect("spawning gyre")
}

/// Waits up to `timeout` for `child` (started by [`spawn_logged`]) to exit:
/// its status, or `None` if it was still running (it is then killed and
/// reaped), and its log.
pub fn wait_logged(child: &mut Child, timeout: Duration, log: &Path) -> (Option<ExitStatus>, String) {
    let status = wait_bounded(child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (status, std::fs::read_to_string(log).unwrap_or_default())
}

/// The first line `child` prints on its (piped) stdout, or `None` if it
/// closes stdout first or prints nothing within `timeout` (it is then
/// killed). Its stdout is closed afterwards.
fn first_line(child: &mut Child, timeout: Duration) -> Option<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(matches!(read, Ok(n) if n > 0).then_some(line));
    });
    match rx.recv_timeout(timeout) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            None
        }
    }
}

/// A port free on every one of `ips` (checked by binding it on each),
/// outside the usual ephemeral range so outgoing connections do not take
/// it while a node is down.
pub fn free_port(ips: &[Ipv4Addr]) -> u16 {
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..32_000);
        let all_free = ips.iter().all(|ip| TcpListener::bind(SocketAddrV4::new(*ip, port)).is_ok());
        if all_free {
            return port;
        }
    }
    panic!("no free port on {ips:?}");
}

/// Loopback blocks 127.X.Y.0/24 handed out in this process.
static BLOCKS: Mutex<Option<HashSet<(u8, u8)>>> = Mutex::new(None);

/// Addresses `127.X.Y.1..=count`, all on one port, for a cluster: a block
/// no other cluster of this process uses, at a port free on all of them.
fn loopback_addrs(count: usize) -> Vec<SocketAddr> {
    assert!((1..=250).contains(&count));
    let (x, y) = {
        let mut blocks = BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
        let blocks = blocks.get_or_insert_with(HashSet::new);
        loop {
            // 127.0.0.x is left to `gyre dev` and lone nodes.
            let b = (fastrand::u8(10..=250), fastrand::u8(..));
            if blocks.insert(b) {
                break b;
            }
        }
    };
    let ips: Vec<Ipv4Addr> = (1..=count).map(|i| Ipv4Addr::new(127, x, y, i as u8)).collect();
    let port = free_port(&ips);
    ips.into_iter().map(|ip| SocketAddr::from((ip, port))).collect()
}

/// The shape of a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub partitions: u32,
    pub n: usize,
    pub r: usize,
    pub w: usize,
    /// Every node's `--fsync`.
    pub fsync: String,
    /// Every node's `--shards`.
    pub shards: usize,
    /// More arguments for every node.
    pub args: Vec<String>,
}

impl Default for ClusterSpec {
    /// Three nodes of one shard, N = 3, R = W = 2, 64 partitions, no fsync.
    fn default() -> Self {
        ClusterSpec { nodes: 3, partitions: 64, n: 3, r: 2, w: 2, fsync: "never".into(), shards: 1, args: Vec::new() }
    }
}

/// One member of a [`Cluster`].
pub struct Member {
    pub name: String,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Its stderr, across restarts.
    pub log: PathBuf,
    /// The running process (`None` while stopped).
    pub node: Option<Node>,
}

/// A cluster of `gyre node` processes (one shard each, unpinned) on
/// loopback, named `n1`, `n2`, ... in cluster-file order. Every node is
/// killed on drop; the logs of all of them are printed if the test panicked.
pub struct Cluster {
    pub spec: ClusterSpec,
    /// The cluster file.
    pub file: PathBuf,
    pub members: Vec<Member>,
    /// Holds the cluster file, the data directories and the logs.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Writes the cluster file and starts every node.
    pub fn start(spec: ClusterSpec) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("cluster.toml");
        let mut cluster = Cluster { spec, file, members: Vec::new(), dir };
        // A port found free can be taken before a node binds it: then the
        // whole cluster moves to another block and port.
        for attempt in 1.. {
            cluster.layout();
            match (0..cluster.members.len()).try_for_each(|i| cluster.try_start_member(i)) {
                Ok(()) => return cluster,
                Err(e) if attempt < 3 && e.contains("listening on") => {
                    eprintln!("cluster start attempt {attempt} lost a port race, trying another: {e}");
                    for m in &mut cluster.members {
                        drop(m.node.take());
                        let _ = std::fs::remove_dir_all(&m.data_dir);
                    }
                }
                Err(e) => panic!("cluster node did not start: {e}"),
            }
        }
        unreachable!()
    }

    /// Picks the members' addresses and writes the cluster file.
    fn layout(&mut self) {
        let spec = &self.spec;
        let addrs = loopback_addrs(spec.nodes);
        let mut toml = format!("partitions = {}\nn = {}\nr = {}\nw = {}\n", spec.partitions, spec.n, spec.r, spec.w);
        self.members.clear();
        for (i, addr) in addrs.into_iter().enumerate() {
            let name = format!("n{}", i + 1);
            toml.push_str(&format!("\n[[nodes]]\nname = \"{name}\"\naddr = \"{addr}\"\n"));
            self.members.push(Member {
                data_dir: self.dir.path().join(&name),
                log: self.dir.path().join(format!("{name}.log")),
                name,
                addr,
                node: None,
            });
        }
        std::fs::write(&self.file, toml).expect("writing the cluster file");
    }

    fn try_start_member(&mut self, i: usize) -> Result<(), String> {
        let m = &self.members[i];
        assert!(m.node.is_none(), "{} is already running", m.name);
        let mut args: Vec<OsString> = vec!["node".into(), "--cluster".into(), self.file.clone().into()];
        let shards = self.spec.shards.to_string();
        args.extend(
            ["--name", &m.name, "--shards", &shards, "--no-pin", "--fsync", &self.spec.fsync].map(OsString::from),
        );
        args.extend(["--data-dir".into(), m.data_dir.clone().into()]);
        args.extend(self.spec.args.iter().map(OsString::from));
        let node = Node::try_spawn(&args, &m.data_dir, Some(&m.log)).map_err(|e| format!("{}: {e}", m.name))?;
        assert_eq!(node.addr(), m.addr.to_string(), "{} listens where the cluster file says", m.name);
        self.members[i].node = Some(node);
        Ok(())
    }

    fn index(&self, name: &str) -> usize {
        self.members.iter().position(|m| m.name == name).unwrap_or_else(|| panic!("no member {name}"))
    }

    pub fn member(&self, name: &str) -> &Member {
        &self.members[self.index(name)]
    }

    /// The members' names, in cluster-file order.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// The address (shard 0) of a member, as the cluster file gives it.
    pub fn addr(&self, name: &str) -> String {
        self.member(name).addr.to_string()
    }

    /// SIGTERM, and the exit status (bounded wait).
    pub fn stop(&mut self, name: &str) -> ExitStatus {
        let i = self.index(name);
        let node = self.members[i].node.take().unwrap_or_else(|| panic!("{name} is not running"));
        node.terminate()
    }

    /// SIGTERM, and the exit status if it comes within `timeout` (else an
    /// error with the node's stacks; the node is killed).
    pub fn try_stop(&mut self, name: &str, timeout: Duration) -> Result<ExitStatus, String> {
        let i = self.index(name);
        let node = self.members[i].node.take().unwrap_or_else(|| panic!("{name} is not running"));
        node.terminate_within(timeout)
    }

    /// SIGKILL.
    pub fn kill9(&mut self, name: &str) {
        let i = self.index(name);
        self.members[i].node.take().unwrap_or_else(|| panic!("{name} is not running")).kill9();
    }

    /// Starts a stopped member again on its data directory (the node itself
    /// waits for a listening address its old process still holds).
    pub fn restart(&mut self, name: &str) {
        let i = self.index(name);
        if let Err(e) = self.try_start_member(i) {
            panic!("restarting {e}");
        }
    }

    /// A client of the cluster with the given routing, seeded with `name`
    /// (with [`Routing::Server`](gyre::client::Routing), every request goes
    /// to that node).
    pub fn client(&self, name: &str, routing: gyre::client::Routing) -> gyre::client::Client {
        let config = gyre::client::ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            routing,
            ..Default::default()
        };
        let addr = self.addr(name);
        gyre::client::Client::connect_with(&addr, config).unwrap_or_else(|e| panic!("connecting to {name}: {e}"))
    }

    /// A coordination counter (`proxied`, `read_repairs`, ...) of a
    /// member's STATS.
    pub fn counter(&self, name: &str, which: &str) -> u64 {
        self.counter_in(name, "coordination", which)
    }

    /// A counter of a member's STATS, in its `cluster.<section>`
    /// (`coordination`, `peers`).
    pub fn counter_in(&self, name: &str, section: &str, which: &str) -> u64 {
        let stats = self.stats(name);
        stats["cluster"][section][which].as_u64().unwrap_or_else(|| panic!("no {section} counter {which} in {stats}"))
    }

    /// A member's STATS (its only shard, or its shard 0).
    pub fn stats(&self, name: &str) -> serde_json::Value {
        self.shard_stats(name, 0)
    }

    /// The STATS of a member's shard `shard`.
    pub fn shard_stats(&self, name: &str, shard: usize) -> serde_json::Value {
        let mut c = self.client(name, gyre::client::Routing::Server);
        let text = c.stats(shard).unwrap_or_else(|e| panic!("STATS of {name}: {e}"));
        serde_json::from_str(&text).expect("STATS is JSON")
    }

    /// Every member's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(&m.log).unwrap_or_default();
            out.push_str(&format!("----- {} ({}) log -----\n{log}", m.name, m.addr));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            drop(m.node.take());
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// `v`, sorted (sibling order is not part of the contract).
pub fn sorted(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    v.sort();
    v
}

/// How long a `gyre` command a test runs to its end ([`output_bounded`])
/// may take: they take well under a second, so this is a hang.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `command` to its end with `stdin` as its input (written from a
/// thread: it may exit without reading it all) and its stdout and stderr
/// captured. One still running after `timeout` is killed and the test
/// fails with what it wrote (found by a review: `output()` let a hung
/// command, `gyre dev` with its nodes, hold a test for ever). Its
/// children may keep its pipes open after it exits: what came within a
/// second of that is kept.
pub fn output_bounded(mut command: Command, stdin: &[u8], timeout: Duration) -> std::process::Output {
    use std::io::{Read, Write};
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    let stdin = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    // Each pipe is read into a buffer shared with the test as it comes, so
    // what was written is kept even while a child holds the pipe open
    // (found by a review: a reader that handed its bytes over only at the
    // end of the stream lost them all then).
    let reader = |mut from: Box<dyn Read + Send>| {
        let bytes = std::sync::Arc::new(Mutex::new(Vec::new()));
        let (kept, (tx, rx)) = (bytes.clone(), std::sync::mpsc::channel::<()>());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match from.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => kept.lock().expect("output buffer").extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        });
        (bytes, rx)
    };
    let stdout = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = reader(Box::new(child.stderr.take().expect("piped stderr")));
    let status = wait_bounded(&mut child, timeout);
    // The end of each stream, for up to a second more (a child of the
    // command may hold it open): what came by then.
    let collect = |(bytes, end): (std::sync::Arc<Mutex<Vec<u8>>>, std::sync::mpsc::Receiver<()>)| {
        let _ = end.recv_timeout(Duration::from_secs(1));
        std::mem::take(&mut *bytes.lock().expect("output buffer"))
    };
    match status {
        Some(status) => std::process::Output { status, stdout: collect(stdout), stderr: collect(stderr) },
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&collect(stderr)).into_owned();
            panic!("{what} was still running after {timeout:?} (killed); its stderr: {err}");
        }
    }
}

/// Runs the `gyre` binary (bounded: [`output_bounded`]): whether it
/// succeeded, its stdout and stderr.
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(GYRE);
    command.args(args);
    let out = output_bounded(command, b"", COMMAND_TIMEOUT);
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// The most a TCP connection's two ends may buffer: the send buffer's
/// limit and the receive buffer's (`tcp_wmem` and `tcp_rmem`, their third
/// fields), 16 MiB if they cannot be read.
pub fn socket_buffers() -> u64 {
    let max = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse::<u64>().ok()))
            .unwrap_or(8 << 20)
    };
    max("tcp_wmem") + max("tcp_rmem")
}

/// The pids of `pid`'s child processes.
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out.sort();
    out
}

/// The state letter (`R`, `S`, `T` stopped, `Z` zombie...) in a process's
/// or thread's `stat` file (`/proc/PID/stat`, `/proc/PID/task/TID/stat`),
/// `None` once it is gone.
pub fn stat_state(stat: &Path) -> Option<char> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // pid (comm) state ...: comm may hold spaces, so parse after ')'.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()?.chars().next())
}

/// Whether process `pid` is still running (gone or a zombie: not).
pub fn running(pid: u32) -> bool {
    matches!(stat_state(Path::new(&format!("/proc/{pid}/stat"))), Some(s) if s != 'Z' && s != 'X')
}

/// Waits up to `timeout` for none of `pids` to be running.
pub fn all_exit_within(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| running(p)) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// How long `gyre dev` may take to print its ready line.
pub const DEV_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `gyre dev` process and its nodes (taken at its ready line, when all
/// have started): whatever of them still runs when it is dropped is
/// continued and killed, so no test leaks a process (one shared harness:
/// two tests files had one each, and one of them killed no node a failed
/// start had left, nor a stopped one; found by a review).
pub struct Dev {
    /// The `gyre dev` process.
    pub child: Child,
    /// Its node processes, taken at its ready line.
    pub nodes: Vec<u32>,
    /// Its stderr (and its nodes').
    pub log: PathBuf,
}

impl Dev {
    /// Starts `gyre dev --port PORT --data-dir DIR/data ARGS`, its stderr
    /// appended to `DIR/dev.log`, and waits for its ready line: the `Dev`
    /// and that line, or its log if it exited or did not get ready within
    /// [`DEV_START_TIMEOUT`] (it is then killed, its nodes too).
    pub fn start_in(dir: &Path, port: &str, args: &[&str]) -> Result<(Dev, String), String> {
        let mut dev = Dev::spawn_in(dir, port, args);
        let stdout = dev.child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("gyre dev ready:") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        let ready = rx.recv_timeout(DEV_START_TIMEOUT);
        dev.nodes = child_pids(dev.child.id());
        match ready {
            Ok(line) => Ok((dev, line)),
            Err(e) => Err(format!("gyre dev not ready ({e}): {}", dev.log())),
        }
    }

    /// `gyre dev --port PORT --data-dir DIR/data ARGS`, its stderr appended
    /// to `DIR/dev.log` and its stdout piped.
    fn spawn_in(dir: &Path, port: &str, args: &[&str]) -> Dev {
        let log = dir.join("dev.log");
        let file = std::fs::File::options().create(true).append(true).open(&log).expect("the log file");
        let child = Command::new(GYRE)
            .args(["dev", "--port", port, "--data-dir"])
            .arg(dir.join("data"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("spawning gyre dev");
        Dev { child, nodes: Vec::new(), log }
    }

    /// Runs `gyre dev` as [`Self::start_in`] does, for a test that expects
    /// a refusal: what it wrote to stderr, once it exited non-zero. The test fails if it
    /// exited 0 or still runs after [`DEV_START_TIMEOUT`] (then it and any
    /// node it started are killed: one harness for the tests of a refusal,
    /// which waited each its own way, and killed no node a wrong start
    /// left; found by a review).
    pub fn refused(dir: &Path, port: &str, args: &[&str]) -> String {
        // What this run writes: the log is appended to.
        let before = std::fs::metadata(dir.join("dev.log")).map_or(0, |m| m.len() as usize);
        let mut dev = Dev::spawn_in(dir, port, args);
        let status = wait_bounded(&mut dev.child, DEV_START_TIMEOUT);
        dev.nodes = child_pids(dev.child.id());
        let log = dev.log().get(before..).unwrap_or_default().to_string();
        let status = status.unwrap_or_else(|| panic!("gyre dev {args:?} started instead of refusing: {log}"));
        assert!(!status.success(), "gyre dev {args:?} exited 0: {log}");
        log
    }

    /// [`Self::start_in`] a fresh temporary directory at a free port of
    /// 127.0.0.1..=`ips` (another port if one is taken first): the
    /// directory, the port, the `Dev` and its ready line.
    pub fn on_free_port(ips: u8, args: &[&str]) -> (tempfile::TempDir, String, Dev, String) {
        let ips: Vec<Ipv4Addr> = (1..=ips).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
        for attempt in 1.. {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port(&ips).to_string();
            match Dev::start_in(dir.path(), &port, args) {
                Ok((dev, ready)) => return (dir, port, dev, ready),
                Err(e) if attempt < 3 && e.contains("Address already in use") => eprintln!("retrying: {e}"),
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!()
    }

    /// What `gyre dev` and its nodes have written to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and the exit status (within 15 s, else the test fails),
    /// with the log.
    pub fn stop(&mut self) -> (ExitStatus, String) {
        signal(self.child.id(), "TERM");
        let status = wait_bounded(&mut self.child, Duration::from_secs(15));
        let log = self.log();
        (status.unwrap_or_else(|| panic!("gyre dev did not exit 15 s after SIGTERM: {log}")), log)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for &pid in &self.nodes {
            if running(pid) {
                try_signal(pid, "CONT");
                try_signal(pid, "KILL");
            }
        }
    }
}

/// Calls `f` until it succeeds (every 20 ms), for at most `timeout`: its
/// value, or the test fails with `what` and `f`'s last error.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: still failing after {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Shard 0's STATS through `c`, parsed.
pub fn stats(c: &mut gyre::client::Client) -> serde_json::Value {
    serde_json::from_str(&c.stats(0).expect("STATS")).expect("STATS is JSON")
}

/// Counts the requests a node's shard 0 starts, by its STATS through a
/// client of the test's: every STATS asked is a request too, and is taken
/// off.
pub struct Started {
    /// Requests started before, the first STATS included.
    before: u64,
    /// STATS asked since.
    asked: u64,
}

impl Started {
    /// Starts counting from now (one STATS through `c`).
    pub fn new(c: &mut gyre::client::Client) -> Started {
        let stats = stats(c);
        Started { before: stats["node"]["requests"].as_u64().expect("a request count"), asked: 0 }
    }

    /// Requests started since [`Self::new`], less the STATS asked and
    /// `extra` other requests of the test's own; and the node's section
    /// of STATS.
    pub fn now(&mut self, c: &mut gyre::client::Client, extra: u64) -> (u64, serde_json::Value) {
        self.asked += 1;
        let stats = stats(c);
        let node = stats["node"].clone();
        (node["requests"].as_u64().expect("a request count") - self.before - self.asked - extra, node)
    }

    /// Waits until the node has stopped starting requests for a client
    /// that reads nothing, or has started `n`: how many it started.
    /// Stopped is its STATS saying so twice running: a reader waits for
    /// its client to read (`readers_waiting`), none of its requests still
    /// runs (`requests_running`), and no reply was written since the look
    /// before (`replies`: a writer that finishes a write lets the reader
    /// start more), so none starts until the client reads. (A count that
    /// held for 300 ms read as stopped, and a slow machine's pause ended
    /// the wait early; found by a review.)
    pub fn until_held(&mut self, c: &mut gyre::client::Client, n: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        // The replies written at the last look, if it found the node held.
        let mut held_at = None;
        loop {
            let (started, node) = self.now(c, 0);
            let replies = node["replies"].as_u64().expect("a reply count");
            let held = node["readers_waiting"].as_u64().expect("a gauge") > 0 && node["requests_running"] == 0;
            // The STATS reply itself is written between two looks.
            if (held && held_at == Some(replies - 1)) || started >= n {
                return started;
            }
            held_at = held.then_some(replies);
            assert!(Instant::now() < deadline, "the node neither stopped starting requests nor started all: {node}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends `n` pipelined GETs of `key` (request ids 0 to n-1) on a new
/// connection to `addr`, and returns it unread.
pub fn unread_gets(addr: &str, key: &[u8], n: u64) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connecting");
    let mut frames = Vec::new();
    for id in 0..n {
        gyre::wire::Request::Get { key }.encode(&mut frames, id, gyre::wire::ANY_SHARD, 0);
    }
    s.write_all(&frames).expect("sending the GETs");
    s
}

/// Sends `n` pipelined GETs of `key`, which holds `value` (its one
/// sibling), to the node at `addr` and reads nothing until the node (its
/// shard 0, asked through `c`) stops starting them; checks that it started
/// fewer than a bound the old behaviour (all of them) breaks, then reads
/// every reply. The bound: the 4 MiB of replies a connection may have
/// queued, the 64 requests it may have running, what the sockets' buffers
/// on both sides take, and 20 to spare.
pub fn check_unread_gets_are_bounded(c: &mut gyre::client::Client, addr: &str, key: &[u8], value: &[u8], n: u64) {
    let value_len = value.len();
    let mut started = Started::new(c);
    let mut s = unread_gets(addr, key, n);
    let run = started.until_held(c, n);
    assert_few_ran_unread(run, n, value_len);
    // Once the client reads, every reply comes, each once.
    read_get_replies(&mut s, n, value);
}

/// Checks that of `n` requests with replies of `reply_len` bytes sent by a
/// client that reads nothing, `run` started: at most the node's reply
/// budget (4 MiB), its 64 running, what the socket buffers took, and
/// slack; and some, or the count would mean nothing.
pub fn assert_few_ran_unread(run: u64, n: u64, reply_len: usize) {
    let bound = (4 << 20) / reply_len as u64 + 64 + socket_buffers() / reply_len as u64 + 20;
    eprintln!(
        "{run} of {n} requests with {reply_len}-byte replies started while the client read nothing (bound {bound})"
    );
    assert!(bound < n && run > 0, "bound {bound} of {n}, {run} ran: this host's socket buffers are too large");
    assert!(run < bound, "{run} requests ran for a client that reads nothing (bound {bound})");
}

/// Writes a cluster secret file, readable by its owner only (as a node
/// expects; it warns otherwise).
pub fn write_secret(path: &Path, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{secret}\n")).expect("writing a secret");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// Reads one frame off `s`: its header and body (an error for a read
/// that failed, by its timeout too, or a header that does not decode).
pub fn read_frame(s: &mut impl std::io::Read) -> Result<(gyre::wire::Header, Vec<u8>), String> {
    let (h, mut whole) = read_whole_frame(s, false)?;
    Ok((h, whole.split_off(gyre::wire::HEADER_LEN)))
}

/// Reads one frame off `s` as it came, header and body in one buffer (a
/// sealed frame is opened so), and its decoded header; `sealed`: off a
/// sealed connection (the SEALED flag taken).
pub fn read_whole_frame(s: &mut impl std::io::Read, sealed: bool) -> Result<(gyre::wire::Header, Vec<u8>), String> {
    let mut header = [0u8; gyre::wire::HEADER_LEN];
    s.read_exact(&mut header).map_err(|e| format!("reading a header: {e}"))?;
    let h = match sealed {
        true => gyre::wire::decode_sealed_header(&header),
        false => gyre::wire::decode_header(&header, gyre::wire::MAX_BODY_LEN),
    };
    let h = h.map_err(|e| format!("a header: {e}"))?;
    let mut whole = header.to_vec();
    whole.resize(gyre::wire::HEADER_LEN + h.body_len as usize, 0);
    s.read_exact(&mut whole[gyre::wire::HEADER_LEN..]).map_err(|e| format!("reading a body: {e}"))?;
    Ok((h, whole))
}

/// Whether the node closed `s`: it reads to the end (whatever came before
/// it), or the connection was reset. A read that times out is not a close:
/// a node that kept the connection open and said nothing fails this.
pub fn closed(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    match s.read_to_end(&mut Vec::new()) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Reads the replies to [`unread_gets`]' `n` GETs: each once (reads from
/// disk may end in any order), each the one value `value`.
pub fn read_get_replies(s: &mut std::net::TcpStream, n: u64, value: &[u8]) {
    use gyre::wire::Response;
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("a read timeout");
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (header, body) = read_frame(s).unwrap_or_else(|e| panic!("a reply: {e}"));
        let id = header.request_id;
        assert!(id < n && !std::mem::replace(&mut seen[id as usize], true), "reply {id} twice or unasked");
        match Response::decode(header.opcode, &body).expect("a reply") {
            Response::Get { values, .. } => assert!(values == [value], "reply {id}: not the value"),
            other => panic!("reply {id}: {other:?}"),
        }
    }
}

/// Prints how to replay a seeded run if the run it guards panics: many
/// failures deep in a run (an `expect`, an `unwrap`, an assert inside the
/// thing under test) name no seed themselves (found by reviews). Made at
/// the top of each run of one seed.
pub struct SeedGuard {
    /// What to print: the seed, and the call that runs it alone.
    pub replay: String,
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.replay);
        }
    }
}
