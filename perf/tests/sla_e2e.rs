//! One short end-to-end run of the SLA harness: a node started in this
//! process on an ephemeral loopback port, `gyre-bench sla` and
//! `gyre-bench capacity` run against it as a user would.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use gyre::node::config::NodeConfig;
use gyre::storage::config::FsyncPolicy;

/// A lone node on 127.0.0.1 (ephemeral ports), stopped on drop.
struct Node {
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse().unwrap(),
            shards: Some(2),
            fsync: FsyncPolicy::Never,
            pin: false,
            ..NodeConfig::default()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || gyre::node::run(config, flag, move |s| tx.send(s.addrs[0]).unwrap()));
        let addr = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the node started");
        Node { addr, stop, thread: Some(thread), _dir: dir }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Bounded: a node that does not stop fails the test instead of
            // holding CI until its time limit.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if !t.is_finished() {
                assert!(std::thread::panicking(), "the node did not stop within 30 s");
                return;
            }
            let r = t.join().expect("the node thread panicked");
            if !std::thread::panicking() {
                r.expect("the node stopped cleanly");
            }
        }
    }
}

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gyre-bench")).args(args).output().expect("running gyre-bench")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn an_sla_run_measures_checks_and_reports() {
    let node = Node::start();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("results");
    let target = format!("gyre://{}", node.addr);
    // Workload F (read-modify-write through get, merge, put) over few,
    // zipfian keys: every operation class the helper has, and siblings.
    let file = write(
        tmp.path(),
        "f.toml",
        r#"
        description = "e2e"
        limits = ["errors == 0", "rmw.p99 < 5s", "read.max < 5s"]
        [workload]
        workload = "f"
        records = 200
        [run]
        rate = 400
        connections = 4
        warmup = 0.2
        duration = 1.0
        interval = 0.25
        "#,
    );
    let o = bench(&["sla", &file, "--target", &target, "--out", out.to_str().unwrap(), "--quiet"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("PASS"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("f.json")).unwrap()).unwrap();
    let r = &report["targets"][0]["result"];
    let ops = r["ops"].as_u64().unwrap();
    // 400/s for 1 s, Poisson: well within 300..500.
    assert!((300..500).contains(&ops), "{ops} operations");
    let rmw = r["latency"]["rmw"]["count"].as_u64().unwrap();
    let read = r["latency"]["read"]["count"].as_u64().unwrap();
    assert_eq!(rmw + read, ops);
    assert!(rmw > 100 && read > 100, "rmw {rmw}, read {read}");
    assert!(r["latency"]["all"]["p999_us"].as_f64().unwrap() > 0.0);
    let v = &r["versions"];
    let seen: u64 = ["one", "two", "three", "four_or_more"].iter().map(|k| v[k].as_u64().unwrap()).sum();
    assert_eq!(seen + r["read_misses"].as_u64().unwrap(), read);
    // Points every 0.25 s through warm-up and run.
    let points = r["timeline"].as_array().unwrap();
    assert!(points.len() >= 4, "{points:?}");
    // No limit on throughput or speed here: a debug build on a loaded CI
    // machine is no place to assert either (the verdicts' logic has unit
    // tests in sla.rs).
    assert_eq!(report["targets"][0]["verdicts"].as_array().unwrap().len(), 3);
    let md = std::fs::read_to_string(out.join("f.md")).unwrap();
    assert!(md.contains("| `rmw.p99 < 5s` |"), "{md}");
    let svg = std::fs::read_to_string(out.join("f.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));

    // A limit no server meets: the verdict is a miss and the exit code 2.
    let miss = write(
        tmp.path(),
        "miss.toml",
        "limits = [\"p50 < 1us\"]\n[workload]\nworkload = \"c\"\nrecords = 50\n[run]\nrate = 200\nconnections = 2\nwarmup = 0\nduration = 0.3\n",
    );
    let o = bench(&["sla", &miss, "--target", &target, "--out", out.to_str().unwrap(), "--quiet"]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("MISS p50 < 1us"));

    // Capacity: two short probes, both passing (a limit every healthy run
    // meets: the search's mechanics, not the node's speed, are tested).
    let cap = write(
        tmp.path(),
        "cap.toml",
        "limits = [\"errors == 0\"]\n[workload]\nworkload = \"b\"\nrecords = 50\n\
         [run]\nconnections = 2\nwarmup = 0\n[capacity]\nstart = 100\nmax = 200\nprobe_duration = 0.3\n",
    );
    let o = bench(&["capacity", &cap, "--target", &target, "--out", out.to_str().unwrap(), "--quiet"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("capacity 200 ops/s"), "{stdout}");
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("cap.capacity.json")).unwrap()).unwrap();
    assert_eq!(c[0]["probes"].as_array().unwrap().len(), 2);

    // A bad file is an error (exit 1) that says what is wrong.
    let bad = write(tmp.path(), "bad.toml", "limits = [\"p99 < 3 m\"]\n[workload]\nworkload = \"a\"\n");
    let o = bench(&["sla", &bad, "--target", &target, "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("a latency needs a unit"));

    // So is a mistyped option: 2 is kept for a missed limit.
    let o = bench(&["sla", &miss, "--bogus"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));

    // A target that is not there, beside one that is: the run reports the
    // good one's result and the other's failure, and exits 1.
    let nowhere = closed_port();
    let closed = format!("gyre://{nowhere}");
    let o = bench(&["sla", &cap_sla(&tmp), "--target", &target, "--target", &closed, "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("two.json")).unwrap()).unwrap();
    assert_eq!(report["targets"].as_array().unwrap().len(), 1);
    assert_eq!(report["failed"][0]["target"].as_str().unwrap(), format!("gyre {nowhere}"));
    assert!(report["failed"][0]["error"].as_str().unwrap().contains("connecting"), "{report}");
    assert_eq!(report["pass"], false);

    // Capacity against a target that is not there is an error, not a
    // capacity of nothing; and a capacity search takes no --rate.
    let o = bench(&["capacity", &cap, "--target", &closed, "--out", out.to_str().unwrap(), "--quiet"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("cap.capacity.json")).unwrap()).unwrap();
    assert!(c[0]["error"].as_str().unwrap().contains("connecting"), "{c}");
    assert_eq!(c[0]["probes"].as_array().unwrap().len(), 0);
    let o = bench(&["capacity", &cap, "--target", &target, "--rate", "100", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--rate is for sla"));
}

/// A loopback address where nothing listens (bound, then closed).
fn closed_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A short SLA file named `two` under `tmp`.
fn cap_sla(tmp: &tempfile::TempDir) -> String {
    write(
        tmp.path(),
        "two.toml",
        "limits = [\"errors == 0\"]\n[workload]\nworkload = \"c\"\nrecords = 50\n[run]\nrate = 100\n\
         connections = 2\nwarmup = 0\nduration = 0.3\n",
    )
}
