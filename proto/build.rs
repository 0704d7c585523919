//! Compiles `proto/trunkfarm/v1/*.proto` with the pure-Rust `protox` compiler
//! (no system `protoc`), writes the descriptor set for gRPC reflection, and
//! generates tonic clients and servers. The servers are generated always but
//! compiled only with the crate's `server` feature (the hub's), so the agent
//! builds without tonic's server stack.

use std::path::PathBuf;

use prost::Message;

/// Messages stored as they are: the agent keeps a finished job's result on
/// disk until the hub acknowledges it. The hub stores its own types (each
/// owner's `records`), so the wire is not its database schema.
const PERSISTED: &[&str] = &["JobResult", "ReportFile", "JobRef"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/trunkfarm/v1/trunkfarm.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("trunkfarm_v1_descriptor.bin"), fds.encode_to_vec())?;
    let mut config = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .server_mod_attribute(".", "#[cfg(feature = \"server\")]")
        // Small per-stream buffers: an idle agent session costs the hub little.
        .codec_path("crate::codec::LeanCodec");
    // Stored as JSON; `default` lets records written by an older agent load
    // after fields are added.
    for persisted in PERSISTED {
        let path = format!(".trunkfarm.v1.{persisted}");
        config = config
            .message_attribute(&path, "#[derive(serde::Serialize, serde::Deserialize)]")
            .message_attribute(&path, "#[serde(default)]");
    }
    // Report files can be megabytes: base64 in JSON, not an array of numbers.
    config = config.field_attribute(
        ".trunkfarm.v1.ReportFile.data",
        "#[serde(with = \"crate::serde_base64\")]",
    );
    config.compile_fds(fds)?;
    Ok(())
}
