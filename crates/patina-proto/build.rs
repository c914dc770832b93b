//! Compiles `proto/patina/v1/*.proto` with protox (a pure-Rust protobuf compiler: no system
//! `protoc`), then generates prost types and tonic services from the descriptor set. The
//! descriptor set is also written to OUT_DIR for gRPC server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "patina/v1/machine.proto",
    "patina/v1/view.proto",
    "patina/v1/region.proto",
    "patina/v1/cluster.proto",
    "patina/v1/global.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in with env!: a build script compiled in one checkout is
    // reused from a shared target directory by another (CI clones into a new folder).
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("patina_descriptor.bin"),
        protox::prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
