//! The contract between the trunkfarm hub, its agents and its admin clients.
//!
//! * [`v1`]: the generated gRPC types and clients (`trunkfarm.v1`); the
//!   servers (`*_server`) only with the `server` feature (the hub's).
//! * [`enrollment`]: the one string a volunteer pastes to enroll a machine.
//! * [`codec`]: prost with small per-stream buffers (idle sessions are cheap).
//! * [`dial`]: connecting to a hub over TLS pinned to its CA fingerprint.
//! * [`gitauth`]: credentials in git URLs handed to git through the
//!   environment, never its command line; URL redaction.
//! * [`settings`]: strict TOML settings shared by hub and agent — errors that
//!   name the file, line and dotted key; human durations and sizes.
//!
//! Both binaries depend on this crate, so what crosses the wire is defined once.

pub mod addr;
pub mod codec;
pub mod dial;
pub mod enrollment;
pub mod gitauth;
pub mod platform;
pub mod settings;
pub mod shell;

/// Generated from `proto/trunkfarm/v1/trunkfarm.proto`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("trunkfarm.v1");

    /// The encoded descriptor set, served by gRPC reflection so `grpcurl` works.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("trunkfarm_v1_descriptor");
}

/// Serde for `bytes` fields persisted as JSON: one base64 string instead of
/// an array of numbers (four times smaller, and readable in a dump).
pub mod serde_base64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the bytes as standard base64.
    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(data))
    }

    /// Reads standard base64 back into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// The protocol version hub and agent exchange at hello. Bumped only for an
/// incompatible change (which also moves the package to `trunkfarm.v2`).
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest agent protocol version this build of the hub still serves.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Metadata key carrying credentials (`Bearer <secret>`).
pub const AUTHORIZATION: &str = "authorization";
