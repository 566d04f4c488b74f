//! Writes the Warren CRDs as YAML into `crds/generated/` and
//! `charts/warren/crds/` (one file per CRD), or with `--check` fails when the
//! files on disk differ from what the Rust types generate.
//!
//! Usage: `cargo run -p warren-crds --bin crdgen [-- --check] [--root DIR]`.
//! `--root` is the repository root (default: two levels above this crate's
//! manifest, as compiled in). `--stdout` prints all CRDs as one multi-document
//! stream instead (for `kubectl apply -f -`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const OUT_DIRS: &[&str] = &["crds/generated", "charts/warren/crds"];

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let mut check = false;
    let mut stdout = false;
    let mut root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--stdout" => stdout = true,
            "--root" => root = PathBuf::from(args.next().ok_or("--root needs a directory")?),
            "-h" | "--help" => {
                println!("crdgen [--check] [--stdout] [--root DIR]");
                return Ok(ExitCode::SUCCESS);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }

    let root = root.canonicalize().map_err(|e| format!("repository root {}: {e}", root.display()))?;
    let mut files = Vec::new();
    for crd in warren_crds::crds() {
        let yaml = warren_crds::to_yaml(&crd).map_err(|e| format!("serializing a CRD: {e}"))?;
        files.push((warren_crds::file_name(&crd), yaml));
    }

    let reference = ("reference.md".to_string(), warren_crds::reference_markdown());

    if stdout {
        for (_, yaml) in &files {
            println!("---\n{}", yaml.trim_end());
        }
        return Ok(ExitCode::SUCCESS);
    }

    let mut stale = Vec::new();
    for dir in OUT_DIRS {
        let dir = root.join(dir);
        if !check {
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        for (name, yaml) in &files {
            let path = dir.join(name);
            let current = std::fs::read_to_string(&path).ok();
            if current.as_deref() == Some(yaml.as_str()) {
                continue;
            }
            if check {
                stale.push(path);
            } else {
                std::fs::write(&path, yaml).map_err(|e| format!("writing {}: {e}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
    }
    let path = root.join("crds/generated").join(&reference.0);
    if std::fs::read_to_string(&path).ok().as_deref() != Some(reference.1.as_str()) {
        if check {
            stale.push(path);
        } else {
            std::fs::write(&path, &reference.1).map_err(|e| format!("writing {}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        for path in &stale {
            eprintln!("stale: {}", path.display());
        }
        eprintln!("the CRD YAML differs from the Rust types: run `cargo run -p warren-crds --bin crdgen` and commit");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
