//! Starting and stopping the brokers under test: a Warren process the bench
//! runs itself (from the release binary, in a temporary data directory), and
//! the local RabbitMQ node (`rabbitmq-server -detached`, `rabbitmqctl`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::procfs;

/// How long a broker may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// The `warren-broker` binary next to this executable (both are built into
/// the same target directory), unless given.
pub fn default_warren_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("warren-broker")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("warren-broker"))
}

/// A Warren broker run by the bench. Killed when dropped.
pub struct WarrenProcess {
    bin: PathBuf,
    data_dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    pub addr: String,
}

impl WarrenProcess {
    /// Starts a broker on a free loopback port with its data in `data_dir`.
    /// Returns it and the time from spawn to the ready line.
    pub fn start(bin: &Path, data_dir: &Path, extra: &[String]) -> Result<(WarrenProcess, Duration)> {
        let mut p = WarrenProcess {
            bin: bin.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            extra: extra.to_vec(),
            child: None,
            addr: String::new(),
        };
        let took = p.spawn()?;
        Ok((p, took))
    }

    fn spawn(&mut self) -> Result<Duration> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .context("cannot open the broker log")?;
        let started = Instant::now();
        let mut child = Command::new(&self.bin)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(&self.extra)
            .env("RUST_LOG", std::env::var("WARREN_BENCH_BROKER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start {} (build it with `cargo build --release -p warren-broker`)", self.bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("warren-broker ready: grpc=")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or_default().to_string());
                }
                // Keep reading so the broker never blocks on a full pipe.
            }
        });
        self.child = Some(child);
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => {
                self.addr = format!("http://{addr}");
                Ok(started.elapsed())
            }
            Err(e) => {
                self.kill();
                let log = self.data_dir.with_extension("log");
                let tail: Vec<String> =
                    std::fs::read_to_string(&log).unwrap_or_default().lines().rev().take(5).map(str::to_string).collect::<Vec<_>>();
                let tail: Vec<&str> = tail.iter().rev().map(String::as_str).collect();
                match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        bail!("warren-broker did not print its ready line within {START_TIMEOUT:?} (log: {})", log.display())
                    }
                    mpsc::RecvTimeoutError::Disconnected => {
                        bail!("warren-broker exited before it was ready; the end of its log ({}):\n{}", log.display(), tail.join("\n"))
                    }
                }
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the broker cleanly (SIGTERM, bounded wait, then SIGKILL).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("warren-broker did not stop within 60s of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops and starts again on the same data; returns the time from spawn
    /// to ready.
    pub fn restart(&mut self) -> Result<Duration> {
        self.stop()?;
        self.spawn()
    }

    /// Starts the broker again (after [`WarrenProcess::kill`]) on the same
    /// data; returns the time from spawn to ready.
    pub fn start_again(&mut self) -> Result<Duration> {
        self.kill();
        self.spawn()
    }

    /// Kills the broker at once (SIGKILL, as `kill -9`) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for WarrenProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The default AMQP URI of a local RabbitMQ.
pub const DEFAULT_AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn run(cmd: &str, args: &[&str], timeout: Duration) -> Result<String> {
    run_command(Command::new(cmd).args(args), timeout)
}

/// Runs `command` to completion within `timeout` (killed after it);
/// returns its stdout and stderr, or an error with them when it fails.
pub fn run_command(command: &mut Command, timeout: Duration) -> Result<String> {
    let cmd = command.get_program().to_string_lossy().to_string();
    let args: Vec<String> = command.get_args().map(|a| a.to_string_lossy().to_string()).collect();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd} (install RabbitMQ: apt-get install -y rabbitmq-server, or use bench/compare.sh)"))?;
    // Read both pipes while waiting, so that a chatty command cannot block
    // on a full pipe.
    let out_reader = drain(child.stdout.take());
    let err_reader = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            // A daemon the command left behind may hold the pipes open:
            // take what arrived within a few seconds.
            let take = |rx: mpsc::Receiver<String>| rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
            let text = take(out_reader) + &take(err_reader);
            if !status.success() {
                bail!("{cmd} {} failed ({status}): {}", args.join(" "), text.trim());
            }
            return Ok(text);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd} {} did not finish within {timeout:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `pipe` to its end on a thread; the text arrives on the channel.
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        let _ = tx.send(s);
    });
    rx
}

/// The local RabbitMQ node's `beam.smp` pid: asked from the node itself
/// (other Erlang VMs, such as the bench's own 3-node cluster, may run
/// beside it), or the first `beam.smp` when `rabbitmqctl` cannot tell.
pub fn rabbitmq_pid() -> Option<u32> {
    run("rabbitmqctl", &["-q", "eval", "os:getpid()."], Duration::from_secs(30))
        .ok()
        .and_then(|out| parse_erlang_pid(&out))
        .or_else(|| procfs::find_process("beam.smp"))
}

/// The pid in `rabbitmqctl eval 'os:getpid().'`'s answer (`"1234"`).
pub fn parse_erlang_pid(out: &str) -> Option<u32> {
    out.lines().rev().map(|l| l.trim().trim_matches('"')).find_map(|l| l.parse().ok())
}

/// A command that runs `program args` with every inherited file
/// descriptor above 2 closed first (through `bash`). A broker that outlives
/// the bench (`rabbitmq-server -detached`) or may be orphaned must not keep
/// what the bench inherited: run under `flock LOCK warren-bench ...`, the
/// lock's descriptor would stay held by the Erlang VM, and every other
/// `flock` on the machine would wait for it.
pub fn without_inherited_fds(program: &Path, args: &[&str]) -> Command {
    if !Path::new("/bin/bash").exists() {
        let mut c = Command::new(program);
        c.args(args);
        return c;
    }
    let mut c = Command::new("/bin/bash");
    c.arg("-c").arg(CLOSE_FDS_THEN_EXEC).arg(program).args(args);
    c
}

/// `bash -c` script: close descriptors 3 and up, then exec `$0 "$@"`.
pub const CLOSE_FDS_THEN_EXEC: &str =
    r#"for fd in /proc/$$/fd/*; do n=${fd##*/}; if [ "$n" -gt 2 ]; then eval "exec $n>&-"; fi; done 2>/dev/null; exec "$0" "$@""#;

/// Starts the local RabbitMQ node unless it runs, and waits until it serves.
pub fn ensure_rabbitmq() -> Result<u32> {
    if rabbitmq_pid().is_none() {
        eprintln!("starting RabbitMQ (rabbitmq-server -detached)");
        run_command(&mut without_inherited_fds(Path::new("rabbitmq-server"), &["-detached"]), Duration::from_secs(60))?;
    }
    // `await_startup` fails at once while the node has not registered with
    // epmd yet: ask again until it answers (bounded).
    let deadline = Instant::now() + Duration::from_secs(200);
    loop {
        match run("rabbitmqctl", &["await_startup", "--timeout", "60"], Duration::from_secs(75)) {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
    rabbitmq_pid().ok_or_else(|| anyhow!("RabbitMQ started but no beam.smp process was found"))
}

/// Restarts the RabbitMQ application (the Erlang VM stays up, as with
/// `rabbitmqctl stop_app && rabbitmqctl start_app`); returns the time
/// `start_app` took to return, which includes recovering the queues (and
/// about a second of `rabbitmqctl`'s own start-up).
pub fn restart_rabbitmq_app() -> Result<Duration> {
    run("rabbitmqctl", &["stop_app"], Duration::from_secs(300))?;
    let started = Instant::now();
    run("rabbitmqctl", &["start_app"], Duration::from_secs(600))?;
    Ok(started.elapsed())
}

/// RabbitMQ's version, for the report.
pub fn rabbitmq_version() -> Option<String> {
    run("rabbitmqctl", &["version"], Duration::from_secs(30)).ok().map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_close_inherited_descriptors_before_exec() {
        // The test process has descriptors above 2 open (the test harness's
        // pipes and files, this file's own): none survives into the child.
        let _held = std::fs::File::open("/proc/self/status").unwrap();
        let out = run_command(&mut without_inherited_fds(Path::new("ls"), &["/proc/self/fd"]), Duration::from_secs(30)).unwrap();
        let fds: Vec<u32> = out.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        // 0-2 and the directory `ls` reads.
        assert!(fds.iter().filter(|f| **f > 2).count() <= 1, "{fds:?}");
    }

    #[test]
    fn should_parse_the_pid_rabbitmqctl_prints() {
        assert_eq!(parse_erlang_pid("\"4827\"\n"), Some(4827));
        assert_eq!(parse_erlang_pid("some warning\n\"12\""), Some(12));
        assert_eq!(parse_erlang_pid("Error: unable to perform"), None);
    }

    #[test]
    fn should_bound_a_command_and_report_its_output() {
        let out = run_command(Command::new("sh").args(["-c", "echo out; echo err >&2"]), Duration::from_secs(30)).unwrap();
        assert!(out.contains("out") && out.contains("err"), "{out}");
        let e = run_command(Command::new("sh").args(["-c", "echo nope >&2; exit 3"]), Duration::from_secs(30)).unwrap_err();
        assert!(format!("{e}").contains("nope"), "{e}");
        let e = run_command(Command::new("sleep").arg("30"), Duration::from_millis(100)).unwrap_err();
        assert!(format!("{e}").contains("did not finish"), "{e}");
    }
}
