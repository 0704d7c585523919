//! Signed one-click unsubscribe tokens, and signed subscription
//! confirmation tokens (self-service double opt-in).
//!
//! A token carries what it removes ([`Unsub`]) or adds ([`Confirm`]) and when
//! it stops working, and is signed with HMAC-SHA256 under a key only the hub
//! knows (a 0600 file in the data dir). Nothing is stored per mail: the hub
//! checks the signature and the expiry, then acts on what the token says. The
//! two kinds share the wire form and the key but not the MAC's domain
//! prefix, so an unsubscribe token is never a valid confirmation token nor
//! the other way round.
//!
//! Wire form: base64url (no padding) of
//! `version (1) | expires_at_ms (u64 BE) | digest (1) | 3 × (len u32 BE | UTF-8)
//! (email, project, upstream) | HMAC-SHA256 (32)`, the MAC taken over a domain
//! prefix and everything before it. About 170 characters for a typical address.
//! Confirmation tokens are version 2: `issued_at_ms (u64 BE)` follows the
//! expiry, so a link mailed before the address unsubscribed can be told
//! from one mailed after.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// What an unsubscribe link removes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Unsub {
    /// The address that stops receiving mail.
    pub(crate) email: String,
    /// The project whose mail it stops.
    pub(crate) project: String,
    /// The upstream (runtime) the subscription is about.
    pub(crate) upstream: String,
    /// Whether the link is for the digest rather than per-event mail.
    pub(crate) digest: bool,
}

/// Why a token was refused, or the key could not be loaded. The messages are
/// meant for the person who clicked the link (or the operator, for the key).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    /// Not a token at all: bad characters, cut off, or an unknown version.
    #[error(
        "this unsubscribe link is invalid (it was altered or cut off); use the link in a newer mail, or ask the hub's operator"
    )]
    Malformed,
    /// Well-formed, but not signed by this hub's key (altered, or the key changed).
    #[error(
        "this unsubscribe link is invalid (it was altered or cut off, or the hub's key changed); use the link in a newer mail, or ask the hub's operator"
    )]
    BadSignature,
    /// Genuine, but past its expiry.
    #[error("this unsubscribe link expired on {}; use the link in a newer mail, or ask the hub's operator", format_date(*.expired_at_ms))]
    Expired {
        /// When it expired (Unix milliseconds).
        expired_at_ms: u64,
    },
    /// The key file could not be read or written.
    #[error("unsubscribe key file {}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The key file exists but does not hold a key.
    #[error("unsubscribe key file {} is corrupt (expected 64 hexadecimal digits): delete it to have the hub create a new key (unsubscribe links in mail already sent will then stop working)", path.display())]
    CorruptKey {
        /// The key file.
        path: PathBuf,
    },
}

/// What a confirmation link subscribes: per-event mail about a project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Confirm {
    /// The address that asked (and that the link was mailed to).
    pub(crate) email: String,
    /// The project it wants mail about.
    pub(crate) project: String,
    /// When the link was mailed (Unix milliseconds); 0 for a version-1
    /// link, mailed before links carried it (it then counts as older than
    /// any unsubscribe).
    pub(crate) issued_at_ms: u64,
    /// When the link stops working (Unix milliseconds).
    pub(crate) expires_at_ms: u64,
}

/// Why a confirmation token was refused; the page says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConfirmError {
    /// Altered, cut off, not this hub's (or its key changed), or an
    /// unsubscribe token.
    #[error(
        "this confirmation link is invalid (it was altered or cut off, or the hub's key changed); subscribe again on the project's page"
    )]
    Invalid,
    /// Genuine but past its expiry.
    #[error("this link expired on {}; subscribe again on {project}'s page", format_date(*.expired_at_ms))]
    Expired {
        /// The project it was for.
        project: String,
        /// When it expired (Unix milliseconds).
        expired_at_ms: u64,
    },
}

/// The key unsubscribe tokens are signed with: 32 random bytes.
#[derive(Clone)]
pub(crate) struct UnsubscribeKey {
    bytes: [u8; 32],
}

impl std::fmt::Debug for UnsubscribeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnsubscribeKey(<redacted>)")
    }
}

const VERSION: u8 = 1;
/// Confirmation tokens carrying their issue time.
const VERSION_ISSUED: u8 = 2;
const MAC_LEN: usize = 32;
/// Fixed part of the payload: version, expiry, digest flag.
const HEADER_LEN: usize = 1 + 8 + 1;
/// Keeps these MACs distinct from anything else the key might ever sign.
const DOMAIN: &[u8] = b"trunkfarm-unsubscribe\0";
/// The same for subscription confirmation tokens.
const CONFIRM_DOMAIN: &[u8] = b"trunkfarm-confirm-subscription\0";
/// Tokens longer than this are refused before decoding.
const MAX_TOKEN_CHARS: usize = 4096;

impl UnsubscribeKey {
    /// Loads `<path>` or creates it (32 random bytes, hex, mode 0600).
    pub(crate) fn load_or_create(path: &Path) -> Result<UnsubscribeKey, TokenError> {
        let io = |source: std::io::Error| TokenError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut bytes = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| {
                    TokenError::CorruptKey {
                        path: path.to_path_buf(),
                    }
                })?;
                Ok(UnsubscribeKey { bytes })
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(TokenError::CorruptKey {
                path: path.to_path_buf(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let mut bytes = [0u8; 32];
                rand::rng().fill_bytes(&mut bytes);
                crate::auth::secret::write_private(
                    path,
                    format!("{}\n", hex::encode(bytes)).as_bytes(),
                )
                .map_err(io)?;
                Ok(UnsubscribeKey { bytes })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A key from known bytes (tests).
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> UnsubscribeKey {
        UnsubscribeKey { bytes }
    }

    fn mac(&self, domain: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes).expect("HMAC takes any key length");
        mac.update(domain);
        mac
    }

    /// A URL-safe token (base64url, no padding) carrying `unsub` and
    /// `expires_at_ms`, signed with HMAC-SHA256.
    pub(crate) fn sign(&self, unsub: &Unsub, expires_at_ms: u64) -> String {
        self.sign_in(DOMAIN, unsub, expires_at_ms, None)
    }

    /// Checks the signature (in constant time) and the expiry, and returns what
    /// the token removes.
    pub(crate) fn verify(&self, token: &str, now_ms: u64) -> Result<Unsub, TokenError> {
        let (unsub, expires_at_ms, _) = self.open(DOMAIN, token)?;
        if now_ms >= expires_at_ms {
            return Err(TokenError::Expired {
                expired_at_ms: expires_at_ms,
            });
        }
        Ok(unsub)
    }

    /// A confirmation token: `confirm`'s address, project and issue time,
    /// signed like an unsubscribe token under the confirmation domain.
    pub(crate) fn sign_confirm(&self, confirm: &Confirm) -> String {
        let as_fields = Unsub {
            email: confirm.email.clone(),
            project: confirm.project.clone(),
            upstream: String::new(),
            digest: false,
        };
        self.sign_in(
            CONFIRM_DOMAIN,
            &as_fields,
            confirm.expires_at_ms,
            Some(confirm.issued_at_ms),
        )
    }

    /// What a confirmation token asks for, if this hub signed it and it has
    /// not expired. An expired one still says its project (it is genuine),
    /// so the page can point at where to subscribe again.
    pub(crate) fn verify_confirm(&self, token: &str, now_ms: u64) -> Result<Confirm, ConfirmError> {
        let (fields, expires_at_ms, issued_at_ms) = self
            .open(CONFIRM_DOMAIN, token)
            .map_err(|_| ConfirmError::Invalid)?;
        if now_ms >= expires_at_ms {
            return Err(ConfirmError::Expired {
                project: fields.project,
                expired_at_ms: expires_at_ms,
            });
        }
        Ok(Confirm {
            email: fields.email,
            project: fields.project,
            issued_at_ms: issued_at_ms.unwrap_or(0),
            expires_at_ms,
        })
    }

    /// Signs `unsub` and `expires_at_ms`, and `issued_at_ms` if given
    /// (then as version 2).
    fn sign_in(
        &self,
        domain: &[u8],
        unsub: &Unsub,
        expires_at_ms: u64,
        issued_at_ms: Option<u64>,
    ) -> String {
        let fields = [&unsub.email, &unsub.project, &unsub.upstream];
        let len = HEADER_LEN + 8 + fields.iter().map(|f| 4 + f.len()).sum::<usize>() + MAC_LEN;
        let mut buf = Vec::with_capacity(len);
        buf.push(if issued_at_ms.is_some() {
            VERSION_ISSUED
        } else {
            VERSION
        });
        buf.extend_from_slice(&expires_at_ms.to_be_bytes());
        if let Some(issued) = issued_at_ms {
            buf.extend_from_slice(&issued.to_be_bytes());
        }
        buf.push(u8::from(unsub.digest));
        for field in fields {
            // Names and addresses are far below 4 GiB; saturating keeps this
            // total (a token that long would fail to parse, not mis-parse).
            let n = u32::try_from(field.len()).unwrap_or(u32::MAX);
            buf.extend_from_slice(&n.to_be_bytes());
            buf.extend_from_slice(field.as_bytes());
        }
        let mut mac = self.mac(domain);
        mac.update(&buf);
        buf.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(buf)
    }

    /// Checks the signature (in constant time) under `domain` and returns
    /// the fields, the expiry (not checked here) and the issue time if the
    /// token carries one.
    fn open(&self, domain: &[u8], token: &str) -> Result<(Unsub, u64, Option<u64>), TokenError> {
        let token = token.trim();
        if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        if raw.len() < HEADER_LEN + 3 * 4 + MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, tag) = raw.split_at(raw.len() - MAC_LEN);
        let mut mac = self.mac(domain);
        mac.update(payload);
        mac.verify_slice(tag)
            .map_err(|_| TokenError::BadSignature)?;
        decode_payload(payload).ok_or(TokenError::Malformed)
    }
}

/// Parses a signed payload (expiry, issue time when version 2); `None` if
/// it is not one this version wrote.
fn decode_payload(payload: &[u8]) -> Option<(Unsub, u64, Option<u64>)> {
    let (&version, rest) = payload.split_first()?;
    let (expiry, rest) = rest.split_first_chunk::<8>()?;
    let (issued, rest) = match version {
        VERSION => (None, rest),
        VERSION_ISSUED => {
            let (issued, rest) = rest.split_first_chunk::<8>()?;
            (Some(u64::from_be_bytes(*issued)), rest)
        }
        _ => return None,
    };
    let (&digest, mut rest) = rest.split_first()?;
    let digest = match digest {
        0 => false,
        1 => true,
        _ => return None,
    };
    let mut next = || -> Option<String> {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if len > tail.len() {
            return None;
        }
        let (field, tail) = tail.split_at(len);
        rest = tail;
        String::from_utf8(field.to_vec()).ok()
    };
    let email = next()?;
    let project = next()?;
    let upstream = next()?;
    if !rest.is_empty() {
        return None;
    }
    Some((
        Unsub {
            email,
            project,
            upstream,
            digest,
        },
        u64::from_be_bytes(*expiry),
        issued,
    ))
}

/// `2025-06-01 12:00 UTC` for a Unix-milliseconds instant.
pub(crate) fn format_date(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let text = humantime::format_rfc3339_seconds(at).to_string();
    // "YYYY-MM-DDTHH:MM:SSZ" → "YYYY-MM-DD HH:MM UTC"
    match (text.get(..10), text.get(11..16)) {
        (Some(date), Some(time)) => format!("{date} {time} UTC"),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Unsub {
        Unsub {
            email: "alice.maintainer@example.org".into(),
            project: "attrs".into(),
            upstream: "cpython-main".into(),
            digest: false,
        }
    }

    fn key(seed: u8) -> UnsubscribeKey {
        UnsubscribeKey::from_bytes([seed; 32])
    }

    const NOW: u64 = 1_750_000_000_000;
    const LATER: u64 = NOW + 90 * 24 * 3600 * 1000;

    #[test]
    fn round_trip() {
        let k = key(7);
        for digest in [false, true] {
            let u = Unsub { digest, ..sample() };
            let t = k.sign(&u, LATER);
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{t}"
            );
            assert_eq!(k.verify(&t, NOW).unwrap(), u);
        }
        // Empty and non-ASCII fields survive too.
        let odd = Unsub {
            email: "ünïcode@exämple.org".into(),
            project: String::new(),
            upstream: "x".into(),
            digest: true,
        };
        assert_eq!(k.verify(&k.sign(&odd, LATER), NOW).unwrap(), odd);
    }

    #[test]
    fn tokens_are_short_enough_for_a_url() {
        let u = Unsub {
            email: "a.rather.long.address+farm-notifications@mail.example-university.edu".into(),
            project: "some-longer-project-name".into(),
            upstream: "cpython-3.14-freethreading".into(),
            digest: true,
        };
        let t = key(1).sign(&u, LATER);
        assert!(t.len() < 400, "{} chars", t.len());
        assert!(key(1).sign(&sample(), LATER).len() < 200);
    }

    #[test]
    fn any_altered_character_is_refused() {
        let k = key(3);
        let t = k.sign(&sample(), LATER);
        for i in 0..t.len() {
            for replacement in ['A', 'z', '-', '%', '='] {
                let mut bytes = t.clone().into_bytes();
                if bytes[i] == replacement as u8 {
                    continue;
                }
                bytes[i] = replacement as u8;
                let altered = String::from_utf8(bytes).unwrap();
                match k.verify(&altered, NOW) {
                    Err(TokenError::BadSignature | TokenError::Malformed) => {}
                    other => panic!("position {i} → {replacement:?}: {other:?}"),
                }
            }
        }
        // Cut off anywhere, or extended.
        for n in 0..t.len() {
            assert!(
                matches!(
                    k.verify(&t[..n], NOW),
                    Err(TokenError::BadSignature | TokenError::Malformed)
                ),
                "cut at {n}"
            );
        }
        assert!(k.verify(&format!("{t}AA"), NOW).is_err());
    }

    #[test]
    fn another_key_is_refused() {
        let t = key(1).sign(&sample(), LATER);
        assert!(matches!(
            key(2).verify(&t, NOW),
            Err(TokenError::BadSignature)
        ));
    }

    #[test]
    fn expired_tokens_are_refused_with_the_date() {
        let k = key(4);
        let t = k.sign(&sample(), NOW);
        match k.verify(&t, NOW) {
            Err(e @ TokenError::Expired { expired_at_ms }) => {
                assert_eq!(expired_at_ms, NOW);
                let msg = e.to_string();
                assert!(msg.contains("expired on 2025-06-15 15:06 UTC"), "{msg}");
                assert!(msg.contains("newer mail"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert!(k.verify(&t, NOW - 1).is_ok());
    }

    #[test]
    fn garbage_is_malformed() {
        let k = key(5);
        let long = "A".repeat(10_000);
        for g in [
            "",
            " ",
            "x",
            "not a token",
            "!!!!",
            "AAAA",
            "ÿÿÿÿ",
            "\0",
            long.as_str(),
        ] {
            assert!(
                matches!(k.verify(g, NOW), Err(TokenError::Malformed)),
                "{g:?}"
            );
        }
        // Long enough to carry a MAC but not signed: bad signature.
        let fake = URL_SAFE_NO_PAD.encode([0u8; 80]);
        assert!(matches!(
            k.verify(&fake, NOW),
            Err(TokenError::BadSignature)
        ));
        let msg = TokenError::Malformed.to_string();
        assert!(msg.contains("invalid (it was altered or cut off)"), "{msg}");
    }

    #[test]
    fn load_or_create_makes_a_private_file_and_reloads_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("unsubscribe.key");
        let k1 = UnsubscribeKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        let k2 = UnsubscribeKey::load_or_create(&path).unwrap();
        assert_eq!(k1.bytes, k2.bytes);
        let t = k1.sign(&sample(), LATER);
        assert_eq!(k2.verify(&t, NOW).unwrap(), sample());
        assert_eq!(format!("{k1:?}"), "UnsubscribeKey(<redacted>)");
        // A fresh file gets a different key.
        let other = UnsubscribeKey::load_or_create(&dir.path().join("k2")).unwrap();
        assert_ne!(other.bytes, k1.bytes);
    }

    #[test]
    fn a_corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in [
            ("short", b"abcd\n".as_slice()),
            ("nothex", &[b'z'; 64]),
            ("empty", b""),
            ("binary", &[0xff, 0xfe, 0x00]),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            let err = UnsubscribeKey::load_or_create(&path).unwrap_err();
            assert!(
                matches!(err, TokenError::CorruptKey { .. }),
                "{name}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("corrupt"), "{msg}");
            // Never replaced behind the operator's back.
            assert_eq!(std::fs::read(&path).unwrap(), contents);
        }
        // A directory where the file should be: an I/O error naming it.
        let err = UnsubscribeKey::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, TokenError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    fn confirm() -> Confirm {
        Confirm {
            email: "alice.maintainer@example.org".into(),
            project: "attrs".into(),
            issued_at_ms: NOW - 1000,
            expires_at_ms: LATER,
        }
    }

    #[test]
    fn confirmation_tokens_round_trip_and_expire_naming_their_project() {
        let k = key(8);
        let t = k.sign_confirm(&confirm());
        assert_eq!(k.verify_confirm(&t, NOW).unwrap(), confirm());
        assert!(t.len() < 200, "{} chars", t.len());
        match k.verify_confirm(&t, LATER) {
            Err(e @ ConfirmError::Expired { .. }) => {
                assert_eq!(
                    e,
                    ConfirmError::Expired {
                        project: "attrs".into(),
                        expired_at_ms: LATER
                    }
                );
                let msg = e.to_string();
                assert!(msg.starts_with("this link expired on "), "{msg}");
                assert!(msg.contains("subscribe again on attrs's page"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert!(k.verify_confirm(&t, LATER - 1).is_ok());
    }

    #[test]
    fn a_confirmation_token_carries_its_issue_time_and_an_old_one_counts_as_oldest() {
        let k = key(8);
        let t = k.sign_confirm(&confirm());
        assert_eq!(k.verify_confirm(&t, NOW).unwrap().issued_at_ms, NOW - 1000);
        // A version-1 link (no issue time) from before: still genuine, and
        // issued at 0, so any unsubscribe recorded since refuses it.
        let as_fields = Unsub {
            email: confirm().email,
            project: confirm().project,
            upstream: String::new(),
            digest: false,
        };
        let old = k.sign_in(CONFIRM_DOMAIN, &as_fields, LATER, None);
        let c = k.verify_confirm(&old, NOW).unwrap();
        assert_eq!(
            c,
            Confirm {
                issued_at_ms: 0,
                ..confirm()
            }
        );
    }

    #[test]
    fn a_forged_or_foreign_confirmation_token_is_invalid() {
        let k = key(9);
        let t = k.sign_confirm(&confirm());
        // One character changed anywhere.
        for i in 0..t.len() {
            let mut bytes = t.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).unwrap();
            assert_eq!(
                k.verify_confirm(&altered, NOW),
                Err(ConfirmError::Invalid),
                "position {i}"
            );
        }
        // Another hub's key.
        assert_eq!(key(10).verify_confirm(&t, NOW), Err(ConfirmError::Invalid));
        // The two kinds are not interchangeable, though their fields match.
        let unsub = Unsub {
            email: confirm().email,
            project: confirm().project,
            upstream: String::new(),
            digest: false,
        };
        let u = k.sign(&unsub, LATER);
        assert_eq!(k.verify_confirm(&u, NOW), Err(ConfirmError::Invalid));
        assert!(matches!(k.verify(&t, NOW), Err(TokenError::BadSignature)));
        for g in ["", "x", "!!!!"] {
            assert_eq!(k.verify_confirm(g, NOW), Err(ConfirmError::Invalid));
        }
    }
}
