//! The hub's TLS identity.
//!
//! Agents pin the hub by the SHA-256 of its CA certificate (carried in the
//! enrollment string), so what matters is that the CA stays the same for the
//! hub's whole life. Two modes:
//!
//! * **Automatic** ([`load_or_create`]): on first start the hub creates its own
//!   private CA in the TLS directory (`ca.pem`, `ca.key`) and, on every start,
//!   issues itself a fresh one-year server certificate from it (`server.pem`,
//!   `server.key`). Restarting is thus also how the server certificate is
//!   renewed. The CA is never regenerated behind the operator's back: a missing
//!   or damaged CA file is an error that says what to do.
//! * **Configured** ([`load_configured`]): the operator's own certificate and
//!   key; the chain file must end with the issuing CA, whose fingerprint
//!   agents pin.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, RootCertStore};

/// File name of the automatic CA's certificate inside the TLS directory.
pub(crate) const CA_CERT_FILE: &str = "ca.pem";
/// File name of the automatic CA's private key inside the TLS directory.
pub(crate) const CA_KEY_FILE: &str = "ca.key";
/// File name of the current server certificate chain (server, then CA).
pub(crate) const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the current server certificate's private key.
pub(crate) const SERVER_KEY_FILE: &str = "server.key";

/// How long the automatic CA is valid: agents pin it, so it must outlive any
/// reasonable hub deployment.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an automatically issued server certificate is valid (it is
/// re-issued on every start).
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Back-dating of `notBefore`, so an agent whose clock is a little behind
/// still accepts a certificate issued a moment ago.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// Names every automatic server certificate is valid for, besides the
/// operator's `hostnames`.
const ALWAYS_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// What the gRPC server needs to serve TLS, plus the fingerprint agents pin.
///
/// `Debug` shows only the fingerprint: the key must never reach a log.
#[derive(Clone)]
pub(crate) struct HubIdentity {
    /// PEM certificates: the server certificate first, the CA certificate last.
    pub(crate) cert_chain_pem: String,
    /// PEM private key of the server certificate.
    pub(crate) key_pem: String,
    /// SHA-256 (lowercase hex) of the CA certificate's DER: the pin that goes
    /// into enrollment strings.
    pub(crate) ca_sha256: String,
}

impl fmt::Debug for HubIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubIdentity")
            .field("ca_sha256", &self.ca_sha256)
            .field(
                "cert_chain_pem",
                &format_args!("<{} bytes>", self.cert_chain_pem.len()),
            )
            .field("key_pem", &format_args!("<redacted>"))
            .finish()
    }
}

/// Why the hub's TLS identity could not be loaded or created. Each message
/// names the file concerned and what the operator can do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A file or directory could not be read, written or created.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "create directory"...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// `ca.pem` exists but `ca.key` does not (or the reverse).
    #[error(
        "{} exists but {} is missing. The hub will not silently create a new CA, because \
         every enrolled agent pins the current one. Restore {} from a backup; or, to start \
         over with a new CA, move the directory {} away (every agent must then be re-enrolled \
         with a new enrollment string)",
        present.display(), missing.display(), missing.display(), dir.display()
    )]
    CaIncomplete {
        /// The CA file that exists.
        present: PathBuf,
        /// The CA file that is missing.
        missing: PathBuf,
        /// The TLS directory.
        dir: PathBuf,
    },
    /// A CA file exists but cannot be parsed, or the two do not belong together.
    #[error(
        "{} is unusable: {reason}. The hub will not silently create a new CA, because every \
         enrolled agent pins the current one. Restore the original ca.pem and ca.key from a \
         backup; or, to start over with a new CA, move the directory {} away (every agent must \
         then be re-enrolled with a new enrollment string)",
        path.display(), dir.display()
    )]
    CaUnusable {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// The TLS directory.
        dir: PathBuf,
    },
    /// A configured host name is neither a DNS name nor an IP address.
    #[error(
        "`{name}` cannot be put in the hub's certificate: it is neither a valid DNS name nor an \
         IP address"
    )]
    InvalidHostname {
        /// The name as configured.
        name: String,
    },
    /// rcgen failed to generate a key or sign a certificate.
    #[error("could not generate the hub's {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// The configured certificate file contains no certificate.
    #[error("{} contains no PEM certificate (`-----BEGIN CERTIFICATE-----`)", path.display())]
    NoCertificate {
        /// The configured certificate file.
        path: PathBuf,
    },
    /// The configured certificate file is not valid PEM.
    #[error("{} is not a valid PEM certificate file: {reason}", path.display())]
    BadCertificate {
        /// The configured certificate file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
    /// The configured chain has a single certificate: agents need the CA.
    #[error(
        "{} holds only one certificate; append the certificate of the CA that issued it \
         (`cat server.pem ca.pem > chain.pem`): agents pin that CA's fingerprint, so the hub \
         must present it",
        path.display()
    )]
    ChainWithoutCa {
        /// The configured certificate file.
        path: PathBuf,
    },
    /// The configured chain does not verify against its own last certificate.
    #[error(
        "the certificate chain in {} does not verify against its last certificate (the CA \
         agents will pin): {reason}. Put the server certificate first, any intermediates next \
         and the issuing CA last",
        path.display()
    )]
    ChainInvalid {
        /// The configured certificate file.
        path: PathBuf,
        /// The verifier's reason.
        reason: String,
    },
    /// The configured private key cannot be used.
    #[error("{} is not a usable private key: {reason}", path.display())]
    BadKey {
        /// The configured key file.
        path: PathBuf,
        /// What is wrong with it (never the key itself).
        reason: String,
    },
    /// The configured key is not the key of the configured certificate.
    #[error(
        "the private key in {} does not belong to the first certificate of {}",
        key.display(), cert.display()
    )]
    KeyMismatch {
        /// The configured certificate file.
        cert: PathBuf,
        /// The configured key file.
        key: PathBuf,
    },
}

/// The SHA-256 (lowercase hex) of a certificate's DER encoding: the form in
/// which agents pin a CA.
pub(crate) fn fingerprint(der: &[u8]) -> String {
    trunkfarm_proto::dial::sha256_hex(der)
}

/// Automatic mode: loads the hub's CA from `tls_dir` (creating it on first
/// start), issues a fresh server certificate for `localhost`, `127.0.0.1`,
/// `::1` and `hostnames` (DNS names or IP literals), writes it to the
/// directory, and returns the identity to serve.
pub(crate) fn load_or_create(
    tls_dir: &Path,
    hostnames: &[String],
) -> Result<HubIdentity, TlsError> {
    // Validate the configuration before touching the disk.
    let sans = subject_alt_names(hostnames)?;
    create_private_dir(tls_dir)?;
    let ca = load_or_create_ca(tls_dir)?;

    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| TlsError::Generate {
            what: "server key",
            source,
        })?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "trunkfarm hub");
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + SERVER_VALIDITY;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|source| TlsError::Generate {
            what: "server certificate",
            source,
        })?;

    // Prove the pair on disk still works before serving with it: a `ca.key`
    // that is not the key of `ca.pem` would otherwise only show up as every
    // agent failing its handshake.
    verify_chain(cert.der(), &[], &ca.der).map_err(|reason| TlsError::CaUnusable {
        path: tls_dir.join(CA_KEY_FILE),
        reason: format!(
            "a certificate it signed does not verify against {CA_CERT_FILE} ({reason}); \
             {CA_KEY_FILE} is probably not the key of {CA_CERT_FILE}, or the CA expired"
        ),
        dir: tls_dir.to_path_buf(),
    })?;

    let identity = HubIdentity {
        cert_chain_pem: format!("{}{}", cert.pem(), ca.pem),
        key_pem: key.serialize_pem(),
        ca_sha256: fingerprint(&ca.der),
    };
    write_atomic(
        &tls_dir.join(SERVER_KEY_FILE),
        identity.key_pem.as_bytes(),
        0o600,
    )?;
    write_atomic(
        &tls_dir.join(SERVER_CERT_FILE),
        identity.cert_chain_pem.as_bytes(),
        // Public, yet the hub's like all of its data dir (nothing under it
        // is open to other users).
        0o600,
    )?;
    Ok(identity)
}

/// Configured mode: the operator's own certificate chain (server certificate
/// first, issuing CA last) and private key. Agents pin the last certificate.
pub(crate) fn load_configured(cert_path: &Path, key_path: &Path) -> Result<HubIdentity, TlsError> {
    let cert_bytes = read(cert_path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let (Some(leaf), Some(ca)) = (certs.first(), certs.last()) else {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    };
    if certs.len() == 1 {
        return Err(TlsError::ChainWithoutCa {
            path: cert_path.to_path_buf(),
        });
    }

    let key_bytes = read(key_path)?;
    let bad_key = |reason: String| TlsError::BadKey {
        path: key_path.to_path_buf(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        bad_key(format!(
            "{e} (expected a PEM `PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE KEY`)"
        ))
    })?;
    let key_pem = String::from_utf8(key_bytes.clone())
        .map_err(|_| bad_key("the file is not text (PEM)".into()))?;
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(certs.clone(), key, &provider) {
        Ok(_) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        Err(e) => return Err(bad_key(e.to_string())),
    }

    verify_chain(leaf, &certs[1..certs.len() - 1], ca).map_err(|reason| {
        TlsError::ChainInvalid {
            path: cert_path.to_path_buf(),
            reason,
        }
    })?;

    Ok(HubIdentity {
        cert_chain_pem: certs.iter().map(|c| cert_pem(c)).collect(),
        key_pem,
        ca_sha256: fingerprint(ca),
    })
}

/// The automatic CA, loaded or just created.
struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn load_or_create_ca(dir: &Path) -> Result<Ca, TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => load_ca(dir, &cert_path, &key_path),
        (false, false) => create_ca(&cert_path, &key_path),
        (true, false) => Err(TlsError::CaIncomplete {
            present: cert_path,
            missing: key_path,
            dir: dir.to_path_buf(),
        }),
        (false, true) => Err(TlsError::CaIncomplete {
            present: key_path,
            missing: cert_path,
            dir: dir.to_path_buf(),
        }),
    }
}

fn load_ca(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Ca, TlsError> {
    let unusable = |path: &Path, reason: String| TlsError::CaUnusable {
        path: path.to_path_buf(),
        reason,
        dir: dir.to_path_buf(),
    };
    let cert_bytes = read(cert_path)?;
    let der = CertificateDer::from_pem_slice(&cert_bytes)
        .map_err(|e| unusable(cert_path, format!("no PEM certificate in it ({e})")))?;
    let key_text = String::from_utf8(read(key_path)?).map_err(|_| {
        unusable(
            key_path,
            "not a PEM private key (the file is not text)".into(),
        )
    })?;
    let key = KeyPair::from_pem(&key_text)
        .map_err(|e| unusable(key_path, format!("not a PEM private key ({e})")))?;
    let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| {
        unusable(
            cert_path,
            format!("not a CA certificate rcgen can read ({e})"),
        )
    })?;
    Ok(Ca {
        pem: cert_pem(&der),
        der,
        issuer,
    })
}

fn create_ca(cert_path: &Path, key_path: &Path) -> Result<Ca, TlsError> {
    let generate = |what| move |source| TlsError::Generate { what, source };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("CA key"))?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("trunkfarm hub CA {:08x}", rand::random::<u32>()),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "trunkfarm");
    // Path length 0: this CA signs server certificates, never other CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    let cert = params
        .self_signed(&key)
        .map_err(generate("CA certificate"))?;
    let pem = cert.pem();
    // Key first: `ca.pem` appearing is what marks the CA as existing.
    write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(cert_path, pem.as_bytes(), 0o600)?;
    Ok(Ca {
        pem,
        der: cert.der().clone(),
        issuer: Issuer::new(params, key),
    })
}

/// Turns configured names into SANs (always including the local names),
/// without duplicates.
fn subject_alt_names(hostnames: &[String]) -> Result<Vec<SanType>, TlsError> {
    let mut sans: Vec<SanType> = Vec::new();
    let names = ALWAYS_NAMES
        .iter()
        .map(|s| s.to_string())
        .chain(hostnames.iter().map(|h| h.trim().to_string()));
    for name in names {
        let invalid = || TlsError::InvalidHostname { name: name.clone() };
        let unbracketed = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(&name);
        let san = if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            SanType::IpAddress(ip)
        } else {
            let dns = name.to_ascii_lowercase();
            let plain = dns.strip_prefix("*.").unwrap_or(&dns);
            if rustls::pki_types::DnsName::try_from(plain).is_err() {
                return Err(invalid());
            }
            SanType::DnsName(dns.try_into().map_err(|_| invalid())?)
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

/// Verifies `leaf` (with `intermediates`) chains to `ca`, ignoring names.
fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    ca: &CertificateDer<'_>,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone().into_owned())
        .map_err(|e| format!("the CA certificate cannot be a trust anchor: {e}"))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    match verifier.verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now()) {
        Ok(_)
        | Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Time since the Unix epoch. rcgen takes `time::OffsetDateTime` but does not
/// re-export `time`; `rcgen::date_time_ymd(1970, 1, 1) + since_epoch()` builds
/// "now" without a direct dependency on that crate.
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// A random positive 128-bit serial number (RFC 5280 wants them unpredictable).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// PEM-encodes one certificate.
fn cert_pem(der: &CertificateDer<'_>) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| TlsError::Io {
        action: "check",
        path: path.to_path_buf(),
        source,
    })
}

/// Creates the TLS directory (and parents), readable by the hub's user only.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| TlsError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `path` so that it either keeps its old content or has the whole new
/// one, even if the hub is killed mid-write: temp file in the same directory,
/// fsync, rename, fsync the directory.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    super::secret::write_atomic(path, contents, mode).map_err(|source| TlsError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["hub.example.org".into(), "10.1.2.3".into()]
    }

    fn chain(identity: &HubIdentity) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(identity.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn create_then_reload_keeps_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let first = load_or_create(&dir, &names()).unwrap();
        let second = load_or_create(&dir, &names()).unwrap();
        assert_eq!(first.ca_sha256, second.ca_sha256);
        assert_eq!(first.ca_sha256.len(), 64);
        // A fresh server certificate every start, from the same CA.
        assert_ne!(first.key_pem, second.key_pem);
        let c1 = chain(&first);
        let c2 = chain(&second);
        assert_ne!(c1[0], c2[0]);
        assert_eq!(c1[1], c2[1]);
        assert_eq!(fingerprint(&c2[1]), second.ca_sha256);

        for f in [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        assert_eq!(
            fs::read_to_string(dir.join(SERVER_CERT_FILE)).unwrap(),
            second.cert_chain_pem
        );
        // No temp file left behind.
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        load_or_create(&dir, &[]).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(SERVER_KEY_FILE)), 0o600);
    }

    #[test]
    fn server_chain_verifies_against_the_ca_for_every_name() {
        let tmp = tempfile::tempdir().unwrap();
        let id = load_or_create(tmp.path(), &names()).unwrap();
        let certs = chain(&id);
        assert_eq!(certs.len(), 2);
        let mut roots = RootCertStore::empty();
        roots.add(certs[1].clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        for name in [
            "localhost",
            "127.0.0.1",
            "::1",
            "hub.example.org",
            "10.1.2.3",
        ] {
            let sn = ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&certs[0], &[], &sn, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // Names that were not asked for are not in the certificate.
        let other = ServerName::try_from("elsewhere.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(&certs[0], &[], &other, &[], UnixTime::now())
                .is_err()
        );
        // The key is the key of the leaf certificate.
        let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
        rustls::sign::CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
            .unwrap();
    }

    #[test]
    fn identity_serves_with_tonic() {
        let tmp = tempfile::tempdir().unwrap();
        let id = load_or_create(tmp.path(), &[]).unwrap();
        let identity = tonic::transport::Identity::from_pem(&id.cert_chain_pem, &id.key_pem);
        tonic::transport::ServerTlsConfig::new().identity(identity);
    }

    #[test]
    fn missing_ca_key_is_an_error_not_a_new_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        load_or_create(dir, &[]).unwrap();
        let ca_before = fs::read(dir.join(CA_CERT_FILE)).unwrap();
        fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        let err = load_or_create(dir, &[]).unwrap_err();
        assert!(matches!(err, TlsError::CaIncomplete { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("ca.key is missing"), "{msg}");
        assert!(msg.contains("Restore"), "{msg}");
        assert!(msg.contains("move the directory"), "{msg}");
        assert!(msg.contains("re-enrolled"), "{msg}");
        // Nothing was regenerated.
        assert_eq!(fs::read(dir.join(CA_CERT_FILE)).unwrap(), ca_before);
        assert!(!dir.join(CA_KEY_FILE).exists());

        // The reverse: the key without the certificate.
        let tmp = tempfile::tempdir().unwrap();
        load_or_create(tmp.path(), &[]).unwrap();
        fs::remove_file(tmp.path().join(CA_CERT_FILE)).unwrap();
        let err = load_or_create(tmp.path(), &[]).unwrap_err();
        assert!(err.to_string().contains("ca.pem is missing"), "{err}");
    }

    #[test]
    fn garbage_ca_files_are_errors() {
        for (file, expect) in [
            (CA_CERT_FILE, "no PEM certificate"),
            (CA_KEY_FILE, "not a PEM private key"),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            load_or_create(dir, &[]).unwrap();
            let ca_before = fs::read(dir.join(CA_CERT_FILE)).unwrap();
            for garbage in [&b"\x00garbage\xff"[..], b"some text", b""] {
                fs::write(dir.join(file), garbage).unwrap();
                let err = load_or_create(dir, &[]).unwrap_err();
                assert!(matches!(err, TlsError::CaUnusable { .. }), "{err:?}");
                let msg = err.to_string();
                assert!(msg.contains(file), "{msg}");
                assert!(msg.contains(expect), "{msg}");
                assert!(msg.contains("Restore"), "{msg}");
            }
            if file == CA_KEY_FILE {
                assert_eq!(fs::read(dir.join(CA_CERT_FILE)).unwrap(), ca_before);
            }
        }
    }

    #[test]
    fn ca_key_from_another_ca_is_an_error() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        load_or_create(a.path(), &[]).unwrap();
        load_or_create(b.path(), &[]).unwrap();
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let err = load_or_create(a.path(), &[]).unwrap_err();
        assert!(matches!(err, TlsError::CaUnusable { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("is probably not the key of ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn invalid_hostname_is_refused_before_touching_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        for bad in ["not a name", "", "exa mple.org", "-x-.", "a..b"] {
            let err = load_or_create(&dir, &[bad.to_string()]).unwrap_err();
            assert!(
                matches!(err, TlsError::InvalidHostname { .. }),
                "{bad}: {err:?}"
            );
        }
        assert!(!dir.exists());
        // IPv6, bracketed IPv6, wildcard and duplicates are fine.
        let ok = [
            "::1",
            "[fd00::1]",
            "*.farm.example",
            "localhost",
            "Hub.Example.org",
        ];
        load_or_create(&dir, &ok.map(String::from)).unwrap();
    }

    #[test]
    fn debug_redacts_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let id = load_or_create(tmp.path(), &[]).unwrap();
        let dbg = format!("{id:?}");
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
        assert!(dbg.contains(&id.ca_sha256), "{dbg}");
    }

    /// Writes the auto-mode server files somewhere else as "the operator's".
    fn operator_files(dir: &Path) -> (PathBuf, PathBuf, HubIdentity) {
        let id = load_or_create(&dir.join("auto"), &["hub.example.org".into()]).unwrap();
        let cert = dir.join("chain.pem");
        let key = dir.join("key.pem");
        fs::write(&cert, &id.cert_chain_pem).unwrap();
        fs::write(&key, &id.key_pem).unwrap();
        (cert, key, id)
    }

    #[test]
    fn configured_mode_pins_the_last_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let (cert, key, auto) = operator_files(tmp.path());
        let id = load_configured(&cert, &key).unwrap();
        assert_eq!(id.ca_sha256, auto.ca_sha256);
        assert_eq!(chain(&id), chain(&auto));
        assert_eq!(id.key_pem, auto.key_pem);
    }

    #[test]
    fn configured_mode_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let (cert, key, auto) = operator_files(tmp.path());
        let certs = chain(&auto);

        // No certificate at all.
        let empty = tmp.path().join("empty.pem");
        fs::write(&empty, "just some text\n").unwrap();
        let err = load_configured(&empty, &key).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
        assert!(err.to_string().contains("empty.pem"), "{err}");

        // Only the server certificate: the CA must be appended.
        let single = tmp.path().join("single.pem");
        fs::write(&single, cert_pem(&certs[0])).unwrap();
        let err = load_configured(&single, &key).unwrap_err();
        assert!(matches!(err, TlsError::ChainWithoutCa { .. }), "{err:?}");
        assert!(
            err.to_string().contains("append the certificate of the CA"),
            "{err}"
        );

        // A key that does not parse.
        let garbage = tmp.path().join("garbage.key");
        fs::write(
            &garbage,
            "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = load_configured(&cert, &garbage).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { .. }), "{err:?}");
        assert!(err.to_string().contains("garbage.key"), "{err}");
        let err = load_configured(&cert, &empty).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { .. }), "{err:?}");

        // The key of another certificate.
        let other = load_or_create(&tmp.path().join("other"), &[]).unwrap();
        let other_key = tmp.path().join("other.key");
        fs::write(&other_key, &other.key_pem).unwrap();
        let err = load_configured(&cert, &other_key).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");

        // The wrong CA appended.
        let wrong = tmp.path().join("wrong.pem");
        let other_ca = chain(&other).pop().unwrap();
        fs::write(
            &wrong,
            format!("{}{}", cert_pem(&certs[0]), cert_pem(&other_ca)),
        )
        .unwrap();
        let err = load_configured(&wrong, &key).unwrap_err();
        assert!(matches!(err, TlsError::ChainInvalid { .. }), "{err:?}");

        // A missing file names itself.
        let err = load_configured(&tmp.path().join("nope.pem"), &key).unwrap_err();
        assert!(matches!(err, TlsError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }
}
