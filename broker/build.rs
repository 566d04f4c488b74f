//! Generates the node-to-node gRPC types and stubs from
//! `proto/warren/cluster/v1/cluster.proto` with a vendored `protoc`. (The
//! client API lives in `warren-client`; this one is internal to the broker.)

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest.join("../proto");
    let proto = proto_root.join("warren/cluster/v1/cluster.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    tonic_prost_build::configure().compile_with_config(config, &[proto], &[proto_root])?;
    Ok(())
}
