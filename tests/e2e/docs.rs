//! The documentation's commands, run: the README's tour and every shell
//! block of `README.md` and `docs/*.md` whose commands talk to a broker
//! (`./dev ctl`, `warrenctl`, `curl`, `grpcurl`), so that none of them rots.
//!
//! * Each block runs in `bash`, line by line as a reader pastes it, against
//!   a fresh broker. `./dev ctl` and `warrenctl` run the `warrenctl` under
//!   test (a stand-in `dev` in the working directory, a `warrenctl` on
//!   `PATH`); the default addresses (`127.0.0.1:5680`, `127.0.0.1:15680`)
//!   are replaced by the test broker's.
//! * A line `#   text` (three spaces) after a command is its expected
//!   output: when a page shows any, the command's stdout lines must be
//!   exactly those (spaces collapsed, trailing blank lines ignored); a
//!   line ending in `...` matches any
//!   line it begins, and the lines after it.
//! * Every command must succeed. A block that mixes in other commands
//!   (`kubectl`, `cargo`, ...) is not run; a block whose tool is not
//!   installed (`grpcurl`) is skipped with a note. A `./dev ctl` or
//!   `warrenctl` command outside a runnable block fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use warren_tests::{TestBroker, warrenctl_bin};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The markdown files: README.md and docs/*.md.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// One command of a block and the output the page shows for it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// A fenced `sh` block: where it is and its commands.
#[derive(Debug)]
struct Block {
    page: String,
    line: usize,
    steps: Vec<Step>,
}

/// The `sh` blocks of a markdown page.
fn blocks(page: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
    let name = page.strip_prefix(repo()).unwrap_or(page).display().to_string();
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    let mut continued = String::new();
    for (i, line) in text.lines().enumerate() {
        let Some(block) = current.as_mut() else {
            if line.trim() == "```sh" || line.trim() == "```bash" || line.trim() == "```shell" {
                current = Some(Block { page: name.clone(), line: i + 1, steps: Vec::new() });
            }
            continue;
        };
        if line.trim() == "```" {
            out.extend(current.take());
            continue;
        }
        if let Some(output) = line.strip_prefix("#   ") {
            let step = block.steps.last_mut().unwrap_or_else(|| panic!("{name}:{}: output before any command", i + 1));
            step.expected.push(output.trim().to_string());
            continue;
        }
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        // A trailing backslash continues the command on the next line.
        if let Some(head) = line.strip_suffix('\\') {
            continued.push_str(head);
            continue;
        }
        continued.push_str(line);
        block.steps.push(Step { command: std::mem::take(&mut continued).trim().to_string(), expected: Vec::new() });
    }
    out
}

/// The programs a command runs (each part of a pipeline).
fn programs(command: &str) -> Vec<String> {
    command
        .split('|')
        .map(|part| {
            let words: Vec<&str> = part.split_whitespace().collect();
            match words.as_slice() {
                ["./dev", sub, ..] => format!("./dev {sub}"),
                [program, ..] => program.to_string(),
                [] => String::new(),
            }
        })
        .collect()
}

const RUNNABLE: [&str; 5] = ["./dev ctl", "warrenctl", "curl", "grpcurl", "echo"];

fn talks_to_a_broker(program: &str) -> bool {
    matches!(program, "./dev ctl" | "warrenctl")
}

fn installed(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Runs one command in `bash` in `dir`, bounded: (exit code, stdout, stderr).
fn run(dir: &Path, b: &TestBroker, command: &str) -> (i32, String, String) {
    let command = command.replace("127.0.0.1:15680", &b.http_addr).replace("127.0.0.1:5680", &b.addr);
    let mut path = std::ffi::OsString::from(dir.join("bin"));
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let child = Command::new("bash")
        .args(["-c", &format!("set -o pipefail; {command}")])
        .current_dir(dir)
        .env("PATH", path)
        .env("WARREN_SERVER", b.url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash runs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("bash finishes"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("{command:?} did not finish within 60s");
        }
    };
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Whether `actual` (stdout) shows the `expected` lines (anything does
/// when the page shows no output).
fn shows(expected: &[String], actual: &str) -> bool {
    if expected.is_empty() {
        return true;
    }
    let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut actual: Vec<String> = actual.lines().map(squeeze).collect();
    // A body that ends in a line feed (`echo ... |`) prints a blank line after it.
    while actual.last().is_some_and(String::is_empty) {
        actual.pop();
    }
    for (i, want) in expected.iter().enumerate() {
        let want = squeeze(want);
        if let Some(prefix) = want.strip_suffix("...") {
            return actual.get(i).is_some_and(|l| l.starts_with(prefix.trim_end()));
        }
        if actual.get(i) != Some(&want) {
            return false;
        }
    }
    actual.len() == expected.len()
}

/// A working directory with stand-ins for `./dev ctl` and `warrenctl` that
/// run the binary under test.
fn workdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("warren-docs-").tempdir().unwrap();
    let ctl = warrenctl_bin().unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    let dev = format!(
        "#!/bin/sh\n# Stands in for ./dev: `ctl` runs the warrenctl under test.\n[ \"$1\" = ctl ] || {{ echo \"the docs test runs only ./dev ctl, not ./dev $1\" >&2; exit 97; }}\nshift\nexec '{}' \"$@\"\n",
        ctl.display()
    );
    std::fs::write(dir.path().join("dev"), dev).unwrap();
    std::fs::set_permissions(dir.path().join("dev"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&ctl, dir.path().join("bin/warrenctl")).unwrap();
    dir
}

/// Every runnable block of every page, each against a fresh broker, and the
/// README's tour among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_run_every_command_of_the_readme_and_docs() {
    let all: Vec<Block> = pages().iter().flat_map(|p| blocks(p)).collect();
    let tour = all
        .iter()
        .find(|b| b.page == "README.md" && b.steps.iter().any(|s| s.command.starts_with("./dev ctl exchange declare")))
        .expect("README.md has a tour block of ./dev ctl commands");
    assert!(tour.steps.len() >= 8, "the tour is {} commands", tour.steps.len());
    assert!(tour.steps.iter().filter(|s| !s.expected.is_empty()).count() >= 4, "the tour shows outputs");

    let (mut ran, mut commands) = (0, 0);
    for block in &all {
        let where_ = format!("{}:{}", block.page, block.line);
        let progs: Vec<String> = block.steps.iter().flat_map(|s| programs(&s.command)).collect();
        let runnable = !progs.is_empty() && progs.iter().all(|p| RUNNABLE.contains(&p.as_str()));
        if !runnable {
            let stray = block.steps.iter().find(|s| programs(&s.command).iter().any(|p| talks_to_a_broker(p)));
            assert!(stray.is_none(), "{where_}: {stray:?} is in a block mixed with commands this test cannot run; give it its own block");
            continue;
        }
        if let Some(missing) = progs.iter().find(|p| !talks_to_a_broker(p) && !installed(p)) {
            eprintln!("=== SKIPPED {where_}: {missing} is not installed");
            continue;
        }
        let b = TestBroker::start().await.unwrap();
        let dir = workdir();
        for step in &block.steps {
            let (code, stdout, stderr) = run(dir.path(), &b, &step.command);
            assert_eq!(code, 0, "{where_}: {:?} failed ({code}):\nstdout: {stdout}\nstderr: {stderr}", step.command);
            assert!(
                shows(&step.expected, &stdout),
                "{where_}: {:?} printed\n{stdout}\nwhere the page shows\n{}",
                step.command,
                step.expected.join("\n")
            );
            commands += 1;
        }
        ran += 1;
    }
    eprintln!("ran {commands} commands of {ran} blocks from {} pages", pages().len());
    assert!(ran >= 2 && commands >= 10, "ran {commands} commands of {ran} blocks");
}

/// The real `./dev ctl`: warrenctl from the build, stdin passed on, the
/// caller's working directory kept (for `--file`), the exit code kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_run_warrenctl_through_dev_ctl() {
    let b = TestBroker::start().await.unwrap();
    // The target directory this test was built in: `<target>/debug/warrenctl`.
    let bin = warrenctl_bin().unwrap();
    let target = bin.parent().and_then(Path::parent).unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("body.txt"), "from a file").unwrap();
    let dev = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new(repo().join("dev"))
            .args(args)
            .current_dir(dir.path())
            .env("CARGO_TARGET_DIR", &target)
            .env("WARREN_SERVER", b.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, _, stderr) = dev(&["ctl", "queue", "declare", "q"], None);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = dev(&["ctl", "publish", "--routing-key", "q"], Some("from stdin"));
    assert_eq!((code, stdout.trim()), (Some(0), "routed to 1 queue(s)"), "{stderr}");
    let (code, _, stderr) = dev(&["ctl", "publish", "--routing-key", "q", "--file", "body.txt"], None);
    assert_eq!(code, Some(0), "--file relative to the caller's directory: {stderr}");
    let (code, stdout, stderr) = dev(&["ctl", "get", "--queue", "q", "--ack", "--count", "2"], None);
    assert_eq!((code, stdout.as_str()), (Some(0), "from stdin\nfrom a file\n"), "{stderr}");
    assert_eq!(stderr, "", "nothing but warrenctl's own output once it is built");
    let (code, _, stderr) = dev(&["ctl", "queue", "delete", "missing"], None);
    assert_eq!(code, Some(1), "warrenctl's exit code: {stderr}");
    assert!(stderr.contains("NOT_FOUND"), "{stderr}");
}

/// The block parser reads commands, continuations and expected output.
#[test]
fn should_read_commands_and_expected_output_from_a_block() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("page.md");
    std::fs::write(
        &page,
        "text\n```sh\n# prose\n./dev ctl queue list   # a comment\n#   NAME  READY\n#   q     1\necho x | ./dev ctl publish \\\n    --routing-key q\n```\n```\nnot sh\n```\n",
    )
    .unwrap();
    let blocks = blocks(&page);
    assert_eq!(blocks.len(), 1);
    let steps = &blocks[0].steps;
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert_eq!(steps[0].expected, vec!["NAME  READY", "q     1"]);
    assert_eq!(programs(&steps[1].command), vec!["echo", "./dev ctl"]);
    assert!(shows(&steps[0].expected, "NAME READY\nq 1\n"));
    assert!(!shows(&steps[0].expected, "NAME READY\nq 2\n"));
    assert!(shows(&["[{\"a\":1,...".to_string()], "[{\"a\":1,\"b\":2}]\nmore\n"));
}
