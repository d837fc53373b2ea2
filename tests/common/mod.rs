//! Starts real `gyre node` processes for end-to-end tests: loopback only,
//! ephemeral ports (read back from the node's "ready" line), stopped on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const GYRE: &str = env!("CARGO_BIN_EXE_gyre");

/// A running node process.
pub struct Node {
    pub child: Child,
    pub addrs: Vec<String>,
    pub data_dir: PathBuf,
}

impl Node {
    /// Starts a node on `data_dir` with ephemeral ports and waits until it serves.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Node {
        Node::try_start(data_dir, extra).unwrap_or_else(|e| panic!("node did not start: {e}"))
    }

    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Result<Node, String> {
        let mut child = Command::new(GYRE)
            .args(["node", "--listen", "127.0.0.1:0", "--no-pin", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning gyre node");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        if !matches!(read, Ok(n) if n > 0) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("node output");
            return Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
        }
        let Some(ready) = line.split("ready:").nth(1) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("unexpected first line {line:?}"));
        };
        let addrs = ready.split_whitespace().map(String::from).collect();
        Ok(Node { child, addrs, data_dir: data_dir.to_path_buf() })
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
    pub fn terminate(mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the node") {
                return status;
            }
            assert!(Instant::now() < deadline, "node did not stop within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("running kill");
    assert!(ok.success(), "kill -{sig} {pid} failed");
}
