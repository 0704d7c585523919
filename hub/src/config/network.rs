//! `[network]`: the limits that keep one unauthenticated client from taking
//! the hub's gRPC listener down (too many sockets, slow TLS handshakes,
//! many unfinished HTTP/2 streams, enrollment guessing). The web endpoint's
//! own limits are in `[web]`.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use trunkfarm_proto::settings::{Problem, fmt_bytes, fmt_duration};

use super::de as units;

/// `network.max_connections`: a number, or derived from the open-files limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ConnectionCap {
    /// `"auto"`: derived at start from the open-files limit (after raising it
    /// to its hard limit), leaving room for the web endpoint, the database,
    /// logs, artifact files and child processes.
    #[default]
    Auto,
    /// This many connections at most.
    Fixed(u32),
}

impl<'de> Deserialize<'de> for ConnectionCap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "\"auto\" or a whole number of connections such as 1000";
        impl Visitor<'_> for V {
            type Value = ConnectionCap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ConnectionCap, E> {
                match v.trim() {
                    "auto" => Ok(ConnectionCap::Auto),
                    _ => Err(E::custom(format_args!(
                        "{v:?} is not a connection limit; expected {EXPECTED}"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ConnectionCap, E> {
                u32::try_from(v).map(ConnectionCap::Fixed).map_err(|_| {
                    E::custom(format_args!("{v} is out of range; expected {EXPECTED}"))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `[network]`: limits of the gRPC listener (agents, the CLI).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [network] table")]
pub(crate) struct NetworkSection {
    /// Connections the gRPC listener holds open at once, TLS handshakes
    /// included. At the cap, a new connection pushes out the oldest one that
    /// has not authenticated yet; when every connection has, it is closed.
    pub(crate) max_connections: ConnectionCap,
    /// How long a client may take to complete its TLS handshake.
    #[serde(deserialize_with = "units::duration")]
    pub(crate) tls_handshake_timeout: Duration,
    /// How long a connection may stay open without one call that presented
    /// a valid agent credential or admin token (enrolling does not count:
    /// `trunkfarm-agent enroll` disconnects after it).
    #[serde(deserialize_with = "units::duration")]
    pub(crate) unauthenticated_timeout: Duration,
    /// HTTP/2 streams (calls) one connection may have open at once.
    #[serde(deserialize_with = "units::count")]
    pub(crate) max_concurrent_streams: u32,
    /// The most a call may send before the hub has checked a credential:
    /// `Enroll`, `DownloadArtifact`'s request, health and reflection.
    #[serde(deserialize_with = "units::byte_size")]
    pub(crate) max_unauthenticated_message_size: u64,
    /// Failed enrollments one address may make in a burst (an IPv6 address
    /// counts as its /64); beyond it, enrollments from there are refused
    /// until the allowance refills. Successful enrollments cost nothing.
    #[serde(deserialize_with = "units::count")]
    pub(crate) enroll_failures: u32,
    /// How long an exhausted allowance takes to refill completely (it
    /// refills evenly: one failure per `enroll_failure_window /
    /// enroll_failures`).
    #[serde(deserialize_with = "units::duration")]
    pub(crate) enroll_failure_window: Duration,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            max_connections: ConnectionCap::Auto,
            tls_handshake_timeout: Duration::from_secs(10),
            unauthenticated_timeout: Duration::from_secs(30),
            max_concurrent_streams: 100,
            max_unauthenticated_message_size: 16 * 1024,
            enroll_failures: 10,
            enroll_failure_window: Duration::from_secs(10 * 60),
        }
    }
}

/// The fewest streams an agent needs: its session, an upload, downloads for
/// concurrent jobs, and room to spare.
const MIN_STREAMS: u32 = 8;

/// Checks the `[network]` rules; `max_message_size` is `limits.max_message_size`.
pub(super) fn problems(n: &NetworkSection, max_message_size: u64) -> Result<(), Problem> {
    if n.max_connections == ConnectionCap::Fixed(0) {
        return Err(Problem::new(
            "network.max_connections",
            "must be at least 1, or \"auto\" (derived from the open-files limit)",
        ));
    }
    for (key, d) in [
        ("network.tls_handshake_timeout", n.tls_handshake_timeout),
        ("network.unauthenticated_timeout", n.unauthenticated_timeout),
        ("network.enroll_failure_window", n.enroll_failure_window),
    ] {
        if d.is_zero() {
            return Err(Problem::new(key, "must be greater than zero, e.g. \"10s\""));
        }
    }
    if n.unauthenticated_timeout < n.tls_handshake_timeout {
        return Err(Problem::new(
            "network.unauthenticated_timeout",
            format!(
                "{} is shorter than `network.tls_handshake_timeout` ({}); a connection's time to authenticate includes its handshake, so expected at least {}",
                fmt_duration(n.unauthenticated_timeout),
                fmt_duration(n.tls_handshake_timeout),
                fmt_duration(n.tls_handshake_timeout),
            ),
        ));
    }
    if n.max_concurrent_streams < MIN_STREAMS {
        return Err(Problem::new(
            "network.max_concurrent_streams",
            format!(
                "{} is too few; expected at least {MIN_STREAMS} (an agent holds its session and transfers at once)",
                n.max_concurrent_streams
            ),
        ));
    }
    if n.max_unauthenticated_message_size < 1024
        || n.max_unauthenticated_message_size > max_message_size
    {
        return Err(Problem::new(
            "network.max_unauthenticated_message_size",
            format!(
                "{} is out of range; expected between 1 KiB and `limits.max_message_size` ({}), e.g. \"16 KiB\" (an enrollment is a few hundred bytes)",
                fmt_bytes(n.max_unauthenticated_message_size),
                fmt_bytes(max_message_size),
            ),
        ));
    }
    if n.enroll_failures == 0 {
        return Err(Problem::new(
            "network.enroll_failures",
            "must be at least 1 (a volunteer may mistype once)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HubConfig;

    fn parse(text: &str) -> Result<NetworkSection, String> {
        HubConfig::from_toml(text, Some(std::path::Path::new("/etc/trunkfarm/hub.toml")))
            .map(|c| c.network)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn keys_parse_with_units_and_auto() {
        assert_eq!(parse("").unwrap(), NetworkSection::default());
        let n = parse(
            "[network]\nmax_connections = 500\ntls_handshake_timeout = \"5s\"\nunauthenticated_timeout = \"1m\"\nmax_concurrent_streams = 32\nmax_unauthenticated_message_size = \"8 KiB\"\nenroll_failures = 3\nenroll_failure_window = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(n.max_connections, ConnectionCap::Fixed(500));
        assert_eq!(n.tls_handshake_timeout, Duration::from_secs(5));
        assert_eq!(n.unauthenticated_timeout, Duration::from_secs(60));
        assert_eq!(n.max_concurrent_streams, 32);
        assert_eq!(n.max_unauthenticated_message_size, 8 * 1024);
        assert_eq!(n.enroll_failures, 3);
        assert_eq!(n.enroll_failure_window, Duration::from_secs(3600));
        assert_eq!(
            parse("[network]\nmax_connections = \"auto\"\n")
                .unwrap()
                .max_connections,
            ConnectionCap::Auto
        );
    }

    #[test]
    fn bad_values_name_the_key_and_say_what_is_expected() {
        for (text, needle) in [
            (
                "[network]\nmax_connections = \"lots\"\n",
                "\"lots\" is not a connection limit; expected \"auto\" or a whole number",
            ),
            (
                "[network]\nmax_connections = 0\n",
                "network.max_connections",
            ),
            (
                "[network]\nmax_concurrent_streams = 2\n",
                "2 is too few; expected at least 8",
            ),
            (
                "[network]\ntls_handshake_timeout = \"0s\"\n",
                "network.tls_handshake_timeout",
            ),
            (
                "[network]\ntls_handshake_timeout = \"1m\"\n",
                "shorter than `network.tls_handshake_timeout`",
            ),
            (
                "[network]\nmax_unauthenticated_message_size = \"8 MiB\"\n",
                "expected between 1 KiB and `limits.max_message_size`",
            ),
            (
                "[network]\nenroll_failures = 0\n",
                "network.enroll_failures",
            ),
            (
                "[web]\nheader_read_timeout = \"0s\"\n",
                "web.header_read_timeout",
            ),
            ("[web]\nmax_connections = 0\n", "web.max_connections"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
