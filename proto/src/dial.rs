//! Connecting to a hub over TLS pinned to its CA fingerprint.
//!
//! An agent knows its hub only through the enrollment string: an address and
//! the SHA-256 of the hub's CA certificate, not the certificate itself. tonic's
//! `ClientTlsConfig` needs the CA certificate (or the public web PKI), so this
//! module brings its own connector: TCP, then a rustls handshake whose
//! certificate verifier looks for the pinned CA among the certificates the hub
//! presents and checks the hub's certificate chains to it.
//!
//! The crypto provider is always ring, passed explicitly, so this never depends
//! on (or panics for lack of) a process-wide default provider.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How the agent decides it is talking to the right hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubTrust {
    /// TLS, trusting exactly one CA: the one whose certificate's SHA-256 (of
    /// its DER) is `sha256` (64 hex characters, from the enrollment string).
    PinnedCa {
        /// The pinned CA fingerprint, hex.
        sha256: String,
    },
    /// Plain HTTP/2, for a hub an operator explicitly runs behind a
    /// TLS-terminating proxy on a trusted network. Never chosen implicitly.
    Plaintext,
}

/// Connection tuning for the agent's long-lived channel to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialOptions {
    /// Limit on TCP connect + TLS handshake, so an unreachable hub fails fast
    /// and the agent's reconnect loop can back off.
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 PINGs (also sent while idle), so a dead NAT mapping
    /// or a vanished hub is noticed even when no job is running.
    pub keepalive_interval: Duration,
    /// How long to wait for a PING's answer before declaring the connection dead.
    pub keepalive_timeout: Duration,
    /// Largest gRPC message the caller should accept and send. gRPC message
    /// limits belong to the generated client stubs, not to the channel, so
    /// [`connect`] does not apply it: pass it to
    /// `max_decoding_message_size` / `max_encoding_message_size` of each stub.
    pub max_message_bytes: usize,
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_message_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Why a channel to the hub could not be set up. Each message names the hub
/// address and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The address is not `host:port` / `[v6]:port`.
    #[error("invalid hub address `{addr}`: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA pin is not a SHA-256 in hex.
    #[error(
        "invalid CA fingerprint `{pin}`: {reason}; it must be the 64 hex characters of the hub's \
         CA SHA-256, as carried by the enrollment string"
    )]
    InvalidPin {
        /// The pin as given (a fingerprint is public, not a secret).
        pin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The rustls configuration could not be built (a bug, not a user error).
    #[error("could not set up TLS: {0}")]
    TlsSetup(String),
    /// The TLS handshake failed: e.g. the hub is not the pinned one, its
    /// certificate expired, or it does not speak TLS.
    #[error("TLS handshake with the hub at {addr} failed: {message}")]
    Tls {
        /// The hub address.
        addr: String,
        /// rustls' reason, made readable (for a pin mismatch: what to do).
        message: String,
    },
    /// Connecting or talking HTTP/2 failed (refused, unreachable, DNS...).
    #[error("could not connect to the hub at {addr}: {message}")]
    Connect {
        /// The hub address.
        addr: String,
        /// The underlying transport error chain, flattened.
        message: String,
    },
    /// TCP connect + handshake took longer than `connect_timeout`.
    #[error(
        "timed out after {after:?} connecting to the hub at {addr}: check the address and that \
         the hub is reachable from this machine"
    )]
    Timeout {
        /// The hub address.
        addr: String,
        /// The configured connect timeout.
        after: Duration,
    },
}

/// Connects to the hub at `addr` (`host:port`) now, so a wrong address, an
/// unreachable hub or a pin mismatch is reported before anything else runs.
pub async fn connect(
    addr: &str,
    trust: &HubTrust,
    opts: &DialOptions,
) -> Result<Channel, DialError> {
    let (endpoint, connector) = prepare(addr, trust, opts)?;
    let result = match connector {
        Some(connector) => {
            endpoint
                .connect_with_connector(connector.into_service())
                .await
        }
        None => endpoint.connect().await,
    };
    result.map_err(|e| classify(addr, opts, &e))
}

/// Like [`connect`], but connects on first use (and reconnects after a
/// failure) instead of now. Only the address and the pin are checked here;
/// connection errors surface as `UNAVAILABLE` statuses of the calls, whose
/// message carries the same explanation [`connect`] gives.
pub fn connect_lazy(
    addr: &str,
    trust: &HubTrust,
    opts: &DialOptions,
) -> Result<Channel, DialError> {
    let (endpoint, connector) = prepare(addr, trust, opts)?;
    Ok(match connector {
        Some(connector) => endpoint.connect_with_connector_lazy(connector.into_service()),
        None => endpoint.connect_lazy(),
    })
}

/// The SHA-256 of `der`, lowercase hex: the form pins are written in.
pub fn sha256_hex(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Builds the endpoint (and, for TLS, the pinned connector) shared by
/// [`connect`] and [`connect_lazy`].
fn prepare(
    addr: &str,
    trust: &HubTrust,
    opts: &DialOptions,
) -> Result<(Endpoint, Option<PinnedConnector>), DialError> {
    let target = parse_addr(addr)?;
    // The endpoint URI is always `http://`: with our own connector doing TLS,
    // tonic must not try to add its own (it refuses `https://` without a
    // `ClientTlsConfig`). The `:scheme` sent on requests is set by `origin`.
    let endpoint = Endpoint::from_shared(format!("http://{}", target.authority))
        .map_err(|e| DialError::InvalidAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout)
        .keep_alive_while_idle(true);
    match trust {
        HubTrust::Plaintext => Ok((endpoint, None)),
        HubTrust::PinnedCa { sha256 } => {
            let pin = parse_pin(sha256)?;
            let origin: Uri = format!("https://{}", target.authority).parse().map_err(
                |e: tonic::codegen::http::uri::InvalidUri| DialError::InvalidAddress {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                },
            )?;
            let config = client_config(pin)?;
            let server_name = ServerName::try_from(target.host.clone()).map_err(|e| {
                DialError::InvalidAddress {
                    addr: addr.to_string(),
                    reason: format!("`{}` is not a valid host name: {e}", target.host),
                }
            })?;
            let connector = PinnedConnector {
                addr: addr.to_string(),
                host: target.host,
                port: target.port,
                server_name,
                tls: TlsConnector::from(Arc::new(config)),
            };
            Ok((endpoint.origin(origin), Some(connector)))
        }
    }
}

/// A parsed `host:port`.
struct Target {
    /// The host without IPv6 brackets (for DNS / SNI).
    host: String,
    port: u16,
    /// `host:port` with brackets kept, for URIs.
    authority: String,
}

fn parse_addr(addr: &str) -> Result<Target, DialError> {
    let (host, port) =
        crate::addr::split_host_port(addr).map_err(|reason| DialError::InvalidAddress {
            addr: addr.to_string(),
            reason: reason.to_string(),
        })?;
    Ok(Target {
        host: host.to_string(),
        port,
        authority: addr.to_string(),
    })
}

/// Decodes a hex SHA-256 pin (either case accepted; compared as bytes).
fn parse_pin(pin: &str) -> Result<[u8; 32], DialError> {
    let bad = |reason: String| DialError::InvalidPin {
        pin: pin.to_string(),
        reason,
    };
    let trimmed = pin.trim();
    let trimmed = trimmed.strip_prefix("sha256:").unwrap_or(trimmed);
    if trimmed.len() != 64 {
        return Err(bad(format!("it has {} characters", trimmed.len())));
    }
    let mut out = [0u8; 32];
    for (i, pair) in trimmed.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => out[i] = (h * 16 + l) as u8,
            _ => return Err(bad("it contains a character that is not a hex digit".into())),
        }
    }
    Ok(out)
}

/// A rustls client config for the pinned CA, on the ring provider, ALPN h2.
fn client_config(pin: [u8; 32]) -> Result<rustls::ClientConfig, DialError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::TlsSetup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Trusts a hub whose certificate chains to the CA pinned by fingerprint.
///
/// The CA must be among the presented certificates (the hub sends its chain
/// with the CA appended). The hub's name is deliberately not checked: trust is
/// anchored in the hub's private CA, and volunteers reach hubs by names (a NAT
/// address, a tunnel) its operator may not have listed.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

/// The presented chain does not contain the pinned CA. Its `Debug` is its
/// message, because rustls shows a custom certificate error with `{:?}`.
struct PinMismatch {
    expected: String,
    got: String,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the hub's certificate is not signed by the pinned CA (expected sha256:{}, got \
             sha256:{}): this is not the hub you enrolled with, or it was re-keyed; ask its \
             operator for a new enrollment string",
            self.expected, self.got
        )
    }
}

impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl StdError for PinMismatch {}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let matches = |der: &CertificateDer<'_>| Sha256::digest(der.as_ref())[..] == self.pin[..];
        // The hub presenting the pinned certificate itself as its own proves
        // (by the handshake signature) it holds that key: an exact pin.
        if matches(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(ca) = intermediates.iter().find(|c| matches(c)) else {
            let last = intermediates.last().unwrap_or(end_entity);
            let mismatch = PinMismatch {
                expected: hex(&self.pin),
                got: sha256_hex(last.as_ref()),
            };
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(mismatch)),
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("cannot use the pinned CA: {e}")))?;
        // rustls checks the name only after the whole chain verified, so a
        // name error means the chain to the pinned CA is sound.
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TCP + pinned TLS to one hub; turned into a tower service for tonic.
#[derive(Clone)]
struct PinnedConnector {
    addr: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

type HubIo = TokioIo<TlsStream<TcpStream>>;

impl PinnedConnector {
    /// The `Service<Uri>` tonic calls for every (re)connection. The URI is
    /// ignored: the target was fixed when the connector was built.
    fn into_service(
        self,
    ) -> impl tower::Service<
        Uri,
        Response = HubIo,
        Error = ConnectorError,
        Future = impl Future<Output = Result<HubIo, ConnectorError>> + Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_: Uri| {
            let this = self.clone();
            async move { this.dial().await }
        })
    }

    async fn dial(self) -> Result<HubIo, ConnectorError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| ConnectorError::Tcp {
                addr: self.addr.clone(),
                source: e,
            })?;
        // Best effort: a socket that cannot take the option still works.
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| ConnectorError::Tls {
                addr: self.addr.clone(),
                message: tls_message(&e),
            })?;
        Ok(TokioIo::new(tls))
    }
}

/// What the connector reports to tonic. Its `Display` is complete on its own,
/// because a lazy channel turns it into a status message.
#[derive(Debug, thiserror::Error)]
enum ConnectorError {
    #[error("could not connect to the hub at {addr}: {source}")]
    Tcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with the hub at {addr} failed: {message}")]
    Tls { addr: String, message: String },
}

/// Makes tokio-rustls' `io::Error` readable: the pin-mismatch advice
/// verbatim, rustls' own description otherwise.
fn tls_message(e: &std::io::Error) -> String {
    let Some(inner) = e.get_ref() else {
        return e.to_string();
    };
    let Some(tls) = inner.downcast_ref::<rustls::Error>() else {
        return inner.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            match other.0.downcast_ref::<PinMismatch>() {
                Some(mismatch) => mismatch.to_string(),
                None => tls.to_string(),
            }
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!(
            "{tls}; the hub's operator must renew its certificate (a hub using automatic TLS \
             does so when restarted)"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::BadSignature | CertificateError::UnknownIssuer,
        ) => format!(
            "{tls}: the hub sent the pinned CA but its own certificate was not issued by it; \
             this is not the hub you enrolled with"
        ),
        rustls::Error::InvalidMessage(_) => format!(
            "{tls}: the server at this address does not speak TLS (a plaintext hub, or the \
             wrong port?)"
        ),
        other => other.to_string(),
    }
}

/// Turns tonic's transport error into a [`DialError`], keeping the most
/// specific explanation found in its source chain.
fn classify(addr: &str, opts: &DialOptions, err: &tonic::transport::Error) -> DialError {
    let mut messages: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<ConnectorError>() {
            return match c {
                ConnectorError::Tls { message, .. } => DialError::Tls {
                    addr: addr.to_string(),
                    message: message.clone(),
                },
                ConnectorError::Tcp { source, .. } => DialError::Connect {
                    addr: addr.to_string(),
                    message: source.to_string(),
                },
            };
        }
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return DialError::Timeout {
                addr: addr.to_string(),
                after: opts.connect_timeout,
            };
        }
        let text = e.to_string();
        if !messages.iter().any(|m| m.contains(&text)) {
            messages.push(text);
        }
        cur = e.source();
    }
    // tonic's outermost "transport error" says nothing the rest doesn't.
    if messages.len() > 1 && messages[0] == "transport error" {
        messages.remove(0);
    }
    DialError::Connect {
        addr: addr.to_string(),
        message: messages.join(": "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::{Identity, Server, ServerTlsConfig};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    struct TestPki {
        chain_pem: String,
        key_pem: String,
        ca_sha256: String,
    }

    /// A CA and a server certificate valid only for `sans`.
    fn pki(sans: &[&str]) -> TestPki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "dial test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "dial test hub");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        TestPki {
            chain_pem: format!("{}{}", cert.pem(), ca.pem()),
            key_pem: key.serialize_pem(),
            ca_sha256: sha256_hex(ca.der()),
        }
    }

    /// Starts a TLS tonic server serving health on 127.0.0.1; returns its port.
    async fn serve(pki: &TestPki) -> u16 {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(&pki.chain_pem, &pki.key_pem));
        let router = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(health);
        tokio::spawn(async move {
            let _ = router
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        port
    }

    async fn check(channel: Channel) -> ServingStatus {
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        resp.into_inner().status()
    }

    fn pinned(sha256: &str) -> HubTrust {
        HubTrust::PinnedCa {
            sha256: sha256.to_string(),
        }
    }

    #[tokio::test]
    async fn right_pin_connects() {
        let pki = pki(&["localhost", "127.0.0.1"]);
        let port = serve(&pki).await;
        let ch = connect(
            &format!("127.0.0.1:{port}"),
            &pinned(&pki.ca_sha256),
            &DialOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(check(ch).await, ServingStatus::Serving);
    }

    #[tokio::test]
    async fn name_not_in_sans_still_connects() {
        // Dial by IP; the certificate only names another host.
        let pki = pki(&["hub.internal.example"]);
        let port = serve(&pki).await;
        let ch = connect(
            &format!("127.0.0.1:{port}"),
            &pinned(&pki.ca_sha256),
            &DialOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(check(ch).await, ServingStatus::Serving);
        // And by a DNS name that is not listed either.
        let ch = connect(
            &format!("localhost:{port}"),
            &pinned(&pki.ca_sha256.to_uppercase()),
            &DialOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(check(ch).await, ServingStatus::Serving);
    }

    #[tokio::test]
    async fn wrong_pin_is_refused_with_advice() {
        let pki = pki(&["localhost"]);
        let other = self::pki(&["localhost"]);
        let port = serve(&pki).await;
        let err = connect(
            &format!("localhost:{port}"),
            &pinned(&other.ca_sha256),
            &DialOptions::default(),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DialError::Tls { .. }), "{err:?}");
        assert!(msg.contains("not signed by the pinned CA"), "{msg}");
        assert!(
            msg.contains(&format!("expected sha256:{}", other.ca_sha256)),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("got sha256:{}", pki.ca_sha256)),
            "{msg}"
        );
        assert!(
            msg.contains("ask its operator for a new enrollment string"),
            "{msg}"
        );
    }

    /// A server certificate signed by another CA, with the pinned CA merely
    /// appended to the chain, must be refused (the pin is not a password).
    #[tokio::test]
    async fn pinned_ca_appended_to_foreign_chain_is_refused() {
        let real = pki(&["localhost"]);
        let impostor = pki(&["localhost"]);
        let real_ca_pem = real
            .chain_pem
            .split_inclusive("-----END CERTIFICATE-----\n")
            .nth(1)
            .unwrap()
            .to_string();
        let forged = TestPki {
            chain_pem: format!("{}{real_ca_pem}", impostor.chain_pem),
            key_pem: impostor.key_pem.clone(),
            ca_sha256: real.ca_sha256.clone(),
        };
        let port = serve(&forged).await;
        let err = connect(
            &format!("127.0.0.1:{port}"),
            &pinned(&real.ca_sha256),
            &DialOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, DialError::Tls { .. }), "{err:?}");
        assert!(
            !err.to_string().contains("not signed by the pinned CA"),
            "{err}"
        );
    }

    /// An expired certificate from the pinned CA is refused.
    #[tokio::test]
    async fn expired_certificate_is_refused() {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let pki = TestPki {
            chain_pem: format!("{}{}", cert.pem(), ca.pem()),
            key_pem: key.serialize_pem(),
            ca_sha256: sha256_hex(ca.der()),
        };
        let port = serve(&pki).await;
        let err = connect(
            &format!("127.0.0.1:{port}"),
            &pinned(&pki.ca_sha256),
            &DialOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, DialError::Tls { .. }), "{err:?}");
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[tokio::test]
    async fn wrong_pin_lazy_reports_in_status() {
        let pki = pki(&["localhost"]);
        let other = self::pki(&["localhost"]);
        let port = serve(&pki).await;
        let ch = connect_lazy(
            &format!("127.0.0.1:{port}"),
            &pinned(&other.ca_sha256),
            &DialOptions::default(),
        )
        .unwrap();
        let status = HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("not signed by the pinned CA"),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn lazy_right_pin_works() {
        let pki = pki(&["localhost"]);
        let port = serve(&pki).await;
        let ch = connect_lazy(
            &format!("127.0.0.1:{port}"),
            &pinned(&pki.ca_sha256),
            &DialOptions::default(),
        )
        .unwrap();
        assert_eq!(check(ch).await, ServingStatus::Serving);
    }

    #[tokio::test]
    async fn plaintext_hub() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            Server::builder()
                .add_service(health)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let ch = connect(
            &format!("127.0.0.1:{port}"),
            &HubTrust::Plaintext,
            &DialOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(check(ch).await, ServingStatus::Serving);
    }

    #[tokio::test]
    async fn tls_to_plaintext_server_fails_clearly() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            Server::builder()
                .add_service(health)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let err = connect(
            &format!("127.0.0.1:{port}"),
            &pinned(&"ab".repeat(32)),
            &DialOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, DialError::Tls { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn refused_connection() {
        // Bind then drop to get a port nothing listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        for trust in [pinned(&"ab".repeat(32)), HubTrust::Plaintext] {
            let err = connect(
                &format!("127.0.0.1:{port}"),
                &trust,
                &DialOptions::default(),
            )
            .await
            .unwrap_err();
            assert!(matches!(err, DialError::Connect { .. }), "{err:?}");
            assert!(
                err.to_string().contains(&format!("127.0.0.1:{port}")),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        // Accepts TCP (via the backlog) but never answers the ClientHello.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let opts = DialOptions {
            connect_timeout: Duration::from_millis(300),
            ..DialOptions::default()
        };
        let err = connect(
            &format!("127.0.0.1:{port}"),
            &pinned(&"ab".repeat(32)),
            &opts,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, DialError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("timed out after 300ms"), "{err}");
        drop(listener);
    }

    #[test]
    fn bad_addresses_and_pins() {
        let opts = DialOptions::default();
        let pin = pinned(&"ab".repeat(32));
        for addr in [
            "",
            "host",
            "host:",
            "host:0",
            "host:x",
            "::1:80",
            "[::1:80",
            "https://h:1",
            ":80",
        ] {
            assert!(
                matches!(
                    connect_lazy(addr, &pin, &opts),
                    Err(DialError::InvalidAddress { .. })
                ),
                "{addr}"
            );
        }
        for bad in ["", "abc", &"zz".repeat(32), &"a".repeat(65)] {
            assert!(
                matches!(
                    connect_lazy("h:1", &pinned(bad), &opts),
                    Err(DialError::InvalidPin { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn pin_parsing() {
        let p = parse_pin(&format!("sha256:{}", "0f".repeat(32))).unwrap();
        assert_eq!(p, [0x0f; 32]);
        assert_eq!(hex(&p), "0f".repeat(32));
    }

    #[tokio::test]
    async fn ipv6_address_parses_and_lazy_builds() {
        let ch = connect_lazy(
            "[::1]:7443",
            &pinned(&"ab".repeat(32)),
            &DialOptions::default(),
        );
        assert!(ch.is_ok());
    }
}
