//! The real `warren-broker` binary, spawned on a free port in a temporary
//! directory and killed on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct RealBroker {
    child: Child,
    /// `host:port` of its gRPC server.
    pub addr: String,
    /// What it printed on stdout up to its `ready` line (the effective
    /// configuration).
    pub banner: String,
    _dir: tempfile::TempDir,
}

/// Where the broker binary is: `WARREN_BROKER_BIN`, else next to this test
/// binary's target directory (`target/debug/warren-broker`).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WARREN_BROKER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/<test> -> target/debug/warren-broker
    exe.parent().and_then(|d| d.parent()).map(|d| d.join("warren-broker")).unwrap()
}

impl RealBroker {
    /// Starts the broker and waits for its `ready` line. Panics with the
    /// command to run when the binary is missing: this tier must not pass
    /// silently.
    pub fn start() -> RealBroker {
        Self::start_with(&[])
    }

    /// Starts the broker with extra command-line arguments (such as
    /// `--config FILE`). Panics with the broker's output when it exits
    /// instead of becoming ready.
    pub fn start_with(extra: &[&str]) -> RealBroker {
        let bin = binary();
        assert!(
            bin.exists(),
            "the broker binary {} does not exist: run `cargo build -p warren-broker` first (same CARGO_TARGET_DIR), \
             or point WARREN_BROKER_BIN at it",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        // A free port unless `extra` names the address.
        let grpc_addr: &[&str] = if extra.contains(&"--grpc-addr") { &[] } else { &["--grpc-addr", "127.0.0.1:0"] };
        let mut child = Command::new(&bin)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(grpc_addr)
            .env("WARREN_HTTP_ADDR", "127.0.0.1:0")
            .env_remove("WARREN_CONFIG")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut banner = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("warren-broker ready: grpc=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
                    let _ = tx.send((addr, std::mem::take(&mut banner)));
                } else {
                    banner.push_str(&line);
                    banner.push('\n');
                }
            }
        });
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((addr, banner)) => RealBroker { child, addr, banner, _dir: dir },
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let stderr = errors.join().unwrap_or_default();
                panic!("{} did not print `warren-broker ready: grpc=ADDR` within 60 s (exit {status:?}):\n{stderr}", bin.display());
            }
        }
    }
}

impl Drop for RealBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
