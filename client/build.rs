//! Generates the gRPC types and stubs from `proto/warren/v1/*.proto`
//! with a vendored `protoc`, so nothing has to be installed by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest.join("../proto");
    let protos = [proto_root.join("warren/v1/warren.proto"), proto_root.join("warren/v1/users.proto")];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Bodies and byte values are `bytes::Bytes`: fan-out shares one buffer.
    config.bytes(["."]);
    // Maps (headers, arguments, tables) are ordered, so that a message or a
    // definition always encodes to the same bytes: replicas that apply the
    // same log store byte-identical records.
    config.btree_map(["."]);

    tonic_prost_build::configure().file_descriptor_set_path(out_dir.join("warren_descriptor.bin")).compile_with_config(
        config,
        &protos,
        &[proto_root],
    )?;
    Ok(())
}
