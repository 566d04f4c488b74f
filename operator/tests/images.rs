//! The images' build steps and run-time settings against the real
//! binaries: every binary a Dockerfile builds and copies exists, every
//! environment variable a Dockerfile, the chart or the operator's
//! StatefulSet sets is one the binary reads (`--help` lists them), and the
//! ports agree. No container engine runs here, so the images themselves
//! are built only where `docker info` works.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(|d| d.parent()).unwrap().join(name);
    assert!(path.exists(), "{} does not exist: run `cargo build --workspace --bins` first (same CARGO_TARGET_DIR)", path.display());
    path
}

fn help(name: &str) -> String {
    let out = Command::new(binary(name)).arg("--help").output().unwrap();
    assert!(out.status.success(), "{name} --help failed");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `WARREN_*` / `POD_*` names in a text (`NAME=` or `name: NAME`).
fn env_names(text: &str, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with(prefix) && w.len() > prefix.len())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The `[[bin]]` names a package builds (explicit or `src/main.rs`).
fn bins(package_dir: &str) -> Vec<String> {
    let manifest: toml::Value = toml::from_str(&read(&format!("{package_dir}/Cargo.toml"))).unwrap();
    let mut out: Vec<String> = manifest
        .get("bin")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
        .filter_map(|b| b.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .collect();
    if repo().join(package_dir).join("src/main.rs").exists() {
        out.push(manifest["package"]["name"].as_str().unwrap().to_string());
    }
    out
}

#[test]
fn should_build_and_copy_binaries_that_exist() {
    let broker = read("docker/broker.Dockerfile");
    let operator = read("docker/operator.Dockerfile");
    assert!(broker.contains("-p warren-broker -p warren-client --bins"), "the broker image builds the broker and warrenctl");
    let built: Vec<String> = [bins("broker"), bins("client")].concat();
    for bin in ["warren-broker", "warrenctl"] {
        assert!(built.contains(&bin.to_string()), "{bin} is a binary of the packages built: {built:?}");
        assert!(broker.contains(&format!("target/release/{bin}")), "{bin} is copied out of the build");
    }
    assert!(broker.contains(r#"ENTRYPOINT ["/usr/local/bin/warren-broker"]"#));
    assert!(operator.contains("-p warren-operator --bin warren-operator"));
    assert!(bins("operator").contains(&"warren-operator".to_string()));
    assert!(operator.contains(r#"ENTRYPOINT ["/usr/local/bin/warren-operator"]"#));
}

#[test]
fn should_set_only_variables_the_binaries_read() {
    let broker_help = help("warren-broker");
    let operator_help = help("warren-operator");
    // The broker image's defaults and the operator's StatefulSet.
    let mut broker_vars = env_names(&read("docker/broker.Dockerfile"), "WARREN_");
    broker_vars.extend(env_names(&read("operator/src/broker/build.rs"), "WARREN_"));
    assert!(broker_vars.len() >= 5, "{broker_vars:?}");
    for var in &broker_vars {
        assert!(broker_help.contains(&format!("env: {var}=")), "warren-broker does not read {var} (its --help lists no such variable)");
    }
    // The chart's operator Deployment.
    let deployment = read("charts/warren/templates/deployment.yaml");
    let operator_vars = env_names(&deployment, "WARREN_OPERATOR_");
    assert!(operator_vars.len() >= 5, "{operator_vars:?}");
    for var in operator_vars.iter().chain(["POD_NAME".to_string()].iter()) {
        assert!(operator_help.contains(&format!("env: {var}=")), "warren-operator does not read {var}");
    }
    // Ports: the image exposes what the binaries and the chart use.
    assert!(read("docker/operator.Dockerfile").contains("EXPOSE 8080"));
    assert!(operator_help.contains(":8080"), "the operator's default HTTP port is 8080");
    assert!(deployment.contains("containerPort: 8080"));
    assert!(read("docker/broker.Dockerfile").contains("EXPOSE 5680 5681 15680"), "gRPC, the cluster port, HTTP");
}

#[test]
fn should_build_the_images_where_a_container_engine_runs() {
    let engine = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
    match engine {
        Ok(out) if out.status.success() => {
            for (file, tag) in [("docker/broker.Dockerfile", "warren-broker:test"), ("docker/operator.Dockerfile", "warren-operator:test")]
            {
                let status = Command::new("docker").args(["build", "-f", file, "-t", tag, "."]).current_dir(repo()).status().unwrap();
                assert!(status.success(), "docker build -f {file}");
            }
        }
        _ => eprintln!(
            "images: no container engine answers `docker info` here; the Dockerfiles' steps are checked against the binaries instead"
        ),
    }
}
