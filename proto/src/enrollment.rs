//! The enrollment string: the one thing a volunteer copies from the hub's
//! operator and pastes into `trunkfarm-agent enroll`.
//!
//! It carries everything an agent needs to reach a hub safely the first time:
//! the address to dial, a one-time enrollment token, and the SHA-256
//! fingerprint of the hub's CA certificate (so the agent can pin TLS without
//! being handed a CA file).
//!
//! Format: `tf1_` followed by the unpadded base64url encoding of a compact JSON
//! object `{"h":"host:port","t":"<token-id>.<secret>","f":"<64 hex>"}` (`f` is
//! omitted for an explicitly plaintext hub). The alphabet is `[A-Za-z0-9_-]`,
//! so the string survives shells, chat clients and double-click selection.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// The prefix (and format version) of every enrollment string this build makes.
pub const PREFIX: &str = "tf1_";

/// Hint appended to errors caused by an incomplete or edited string.
const COPY_AGAIN: &str = "looks truncated or altered; copy it again, whole, from the output of \
                          `trunkfarm token create`";

/// Everything an agent needs to enroll with a hub, decoded from the string a
/// volunteer pastes.
///
/// `Debug` shows only the token id: the token's secret must never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// The `host:port` the agent dials (a bracketed IPv6 literal is allowed:
    /// `[::1]:7443`).
    pub hub: String,
    /// The one-time enrollment token, `<token-id>.<secret>`.
    pub token: String,
    /// The SHA-256 of the hub's CA certificate (DER), 64 lowercase hex
    /// characters. `None` only for a hub the operator explicitly runs in
    /// plaintext (behind a TLS-terminating proxy).
    pub ca_sha256: Option<String>,
}

/// Why a pasted enrollment string was refused. Every message says how to fix
/// it, and none ever repeats the string (it carries a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollmentError {
    /// Nothing (or only whitespace) was given.
    #[error(
        "the enrollment string is empty; paste the whole string printed by `trunkfarm token create`"
    )]
    Empty,
    /// The input does not start with `tf1_` (nor any other `tfN_`).
    #[error(
        "not a trunkfarm enrollment string: it should start with `tf1_`; copy the whole string \
         printed by `trunkfarm token create`"
    )]
    WrongPrefix,
    /// The string comes from a newer hub using a format this build cannot read.
    #[error(
        "this enrollment string (prefix `{prefix}`) was made by a newer hub; upgrade \
         trunkfarm-agent and try again"
    )]
    NewerVersion {
        /// The version prefix found, e.g. `tf2_`.
        prefix: String,
    },
    /// The body is not valid base64url or not the expected JSON.
    #[error("the enrollment string {COPY_AGAIN} ({detail})")]
    Corrupted {
        /// What exactly failed to decode (never includes the input itself).
        detail: String,
    },
    /// The hub address is not `host:port`.
    #[error("the enrollment string's hub address is invalid ({reason}); {COPY_AGAIN}")]
    BadHub {
        /// Why the address was refused.
        reason: String,
    },
    /// The token is not `<token-id>.<secret>`.
    #[error("the enrollment string's token is malformed ({reason}); {COPY_AGAIN}")]
    BadToken {
        /// Why the token was refused (never includes the token).
        reason: String,
    },
    /// The CA fingerprint is not 64 lowercase hex characters.
    #[error(
        "the enrollment string's CA fingerprint is invalid ({reason}): it must be 64 lowercase \
         hex characters (a SHA-256); {COPY_AGAIN}"
    )]
    BadFingerprint {
        /// What is wrong with it (length or character).
        reason: String,
    },
}

/// The JSON body, with short keys so the pasted string stays short.
#[derive(Serialize, Deserialize)]
struct Wire {
    h: String,
    t: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    f: Option<String>,
}

impl Enrollment {
    /// Encodes this enrollment as the `tf1_...` string the hub prints for the
    /// operator to hand to a volunteer.
    pub fn encode(&self) -> String {
        let wire = Wire {
            h: self.hub.clone(),
            t: self.token.clone(),
            f: self.ca_sha256.clone(),
        };
        // Serializing a struct of strings into memory cannot fail; fall back
        // to an empty object rather than panicking anyway.
        let json = serde_json::to_vec(&wire).unwrap_or_else(|_| b"{}".to_vec());
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses (and validates) a pasted enrollment string.
    ///
    /// Leading and trailing whitespace is ignored, and so is whitespace inside
    /// the string (terminals and mail clients wrap long lines; whitespace is
    /// never part of the alphabet, so this is unambiguous).
    pub fn parse(s: &str) -> Result<Enrollment, EnrollmentError> {
        let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        if compact.is_empty() {
            return Err(EnrollmentError::Empty);
        }
        let body = match compact.strip_prefix(PREFIX) {
            Some(body) => body,
            None => return Err(classify_prefix(&compact)),
        };
        if body.is_empty() {
            return Err(EnrollmentError::Corrupted {
                detail: "nothing follows `tf1_`".into(),
            });
        }
        if let Some(bad) = body
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(EnrollmentError::Corrupted {
                detail: format!("unexpected character {bad:?}"),
            });
        }
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| EnrollmentError::Corrupted {
                detail: format!("invalid base64url: {e}"),
            })?;
        let wire: Wire = serde_json::from_slice(&json).map_err(|e| EnrollmentError::Corrupted {
            // serde_json's messages name the field or the position, never
            // the value, so they cannot leak the secret.
            detail: format!("invalid content: {e}"),
        })?;
        validate_hub(&wire.h)?;
        validate_token(&wire.t)?;
        if let Some(f) = &wire.f {
            validate_fingerprint(f)?;
        }
        Ok(Enrollment {
            hub: wire.h,
            token: wire.t,
            ca_sha256: wire.f,
        })
    }

    /// The token's public id (the part before the `.`), safe to log and show:
    /// it lets an operator find the token without exposing its secret.
    pub fn token_id(&self) -> &str {
        token_id_of(&self.token)
    }
}

impl fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrollment")
            .field("hub", &self.hub)
            .field("token", &format_args!("{}.<redacted>", self.token_id()))
            .field("ca_sha256", &self.ca_sha256)
            .finish()
    }
}

/// The part of a token before its first `.` (the whole token if it has none).
fn token_id_of(token: &str) -> &str {
    token.split_once('.').map_or(token, |(id, _)| id)
}

/// Tells a future format (`tf2_`, `tf10_`...) apart from a foreign string.
fn classify_prefix(s: &str) -> EnrollmentError {
    let Some(rest) = s.strip_prefix("tf") else {
        return EnrollmentError::WrongPrefix;
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('_') {
        return EnrollmentError::WrongPrefix;
    }
    // Any number of digits > 1 (compared as text so a huge one cannot overflow).
    let significant = digits.trim_start_matches('0');
    if significant.len() > 1 || significant.as_bytes().first().is_some_and(|d| *d > b'1') {
        EnrollmentError::NewerVersion {
            prefix: format!("tf{digits}_"),
        }
    } else {
        EnrollmentError::WrongPrefix
    }
}

/// Checks `host:port` (or `[v6]:port`) without resolving anything.
fn validate_hub(hub: &str) -> Result<(), EnrollmentError> {
    crate::addr::split_host_port(hub)
        .map(|_| ())
        .map_err(|reason| EnrollmentError::BadHub {
            reason: reason.to_string(),
        })
}

/// Checks `<token-id>.<secret>` without ever echoing either part.
fn validate_token(token: &str) -> Result<(), EnrollmentError> {
    let bad = |reason: &str| EnrollmentError::BadToken {
        reason: reason.to_string(),
    };
    let (id, secret) = token
        .split_once('.')
        .ok_or_else(|| bad("expected <token-id>.<secret>"))?;
    if id.is_empty() {
        return Err(bad("the token id is empty"));
    }
    if secret.is_empty() {
        return Err(bad("the secret is empty"));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains whitespace or control characters"));
    }
    Ok(())
}

/// Checks a SHA-256 fingerprint: 64 lowercase hex characters.
fn validate_fingerprint(f: &str) -> Result<(), EnrollmentError> {
    let len = f.chars().count();
    if len != 64 {
        return Err(EnrollmentError::BadFingerprint {
            reason: format!("it has {len} characters instead of 64"),
        });
    }
    if let Some(c) = f.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(EnrollmentError::BadFingerprint {
            reason: format!("{c:?} is not a lowercase hex digit"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn sample() -> Enrollment {
        Enrollment {
            hub: "hub.example.org:7443".into(),
            token: "tok_4f2a.S3cr3t-v4lue_xyz".into(),
            ca_sha256: Some(FP.into()),
        }
    }

    /// Encodes an arbitrary JSON body the way a hub would.
    fn raw(json: &str) -> String {
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    #[test]
    fn round_trip() {
        let e = sample();
        let s = e.encode();
        assert!(s.starts_with("tf1_"));
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "{s}"
        );
        assert_eq!(Enrollment::parse(&s).unwrap(), e);
        assert_eq!(e.token_id(), "tok_4f2a");
    }

    #[test]
    fn round_trip_plaintext_and_ipv6() {
        let e = Enrollment {
            hub: "[::1]:8080".into(),
            token: "id.secret".into(),
            ca_sha256: None,
        };
        let s = e.encode();
        assert_eq!(Enrollment::parse(&s).unwrap(), e);
    }

    #[test]
    fn whitespace_is_ignored() {
        let s = sample().encode();
        let (a, b) = s.split_at(20);
        let pasted = format!("  \n{a}\n  {b}\t\r\n");
        assert_eq!(Enrollment::parse(&pasted).unwrap(), sample());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let s = raw(&format!(r#"{{"h":"a:1","t":"i.s","f":"{FP}","x":1}}"#));
        assert_eq!(Enrollment::parse(&s).unwrap().hub, "a:1");
    }

    #[test]
    fn debug_redacts_secret() {
        let dbg = format!("{:?}", sample());
        assert!(!dbg.contains("S3cr3t"), "{dbg}");
        assert!(dbg.contains("tok_4f2a.<redacted>"), "{dbg}");
        assert!(dbg.contains("hub.example.org:7443"), "{dbg}");
    }

    #[test]
    fn empty() {
        assert_eq!(Enrollment::parse("  \n"), Err(EnrollmentError::Empty));
        assert!(
            Enrollment::parse("")
                .unwrap_err()
                .to_string()
                .contains("trunkfarm token create")
        );
    }

    #[test]
    fn wrong_prefix() {
        for s in [
            "hello", "tf_abc", "TF1_abc", "tfx_abc", "tf1abc", "tf0_abc", "tf01_abc",
        ] {
            let err = Enrollment::parse(s).unwrap_err();
            assert_eq!(err, EnrollmentError::WrongPrefix, "{s}");
            let msg = err.to_string();
            assert!(msg.contains("should start with `tf1_`"), "{msg}");
            assert!(msg.contains("trunkfarm token create"), "{msg}");
        }
    }

    #[test]
    fn newer_version() {
        for (s, p) in [
            ("tf2_abc", "tf2_"),
            ("tf10_abc", "tf10_"),
            ("tf002_x", "tf002_"),
            ("tf99999999999999999999999_x", "tf99999999999999999999999_"),
        ] {
            let err = Enrollment::parse(s).unwrap_err();
            assert_eq!(
                err,
                EnrollmentError::NewerVersion { prefix: p.into() },
                "{s}"
            );
            assert!(err.to_string().contains("upgrade trunkfarm-agent"));
        }
    }

    #[test]
    fn truncated_or_altered() {
        let s = sample().encode();
        // Every truncation is refused, and with a "copy it again" message.
        for cut in PREFIX.len()..s.len() {
            let err = Enrollment::parse(&s[..cut]).unwrap_err();
            assert!(
                matches!(err, EnrollmentError::Corrupted { .. }),
                "cut at {cut}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains("truncated or altered"), "{msg}");
            assert!(msg.contains("copy it again"), "{msg}");
            assert!(!msg.contains("S3cr3t"), "{msg}");
        }
        // A character outside the alphabet.
        let altered = format!("{}+{}", &s[..10], &s[11..]);
        assert!(matches!(
            Enrollment::parse(&altered),
            Err(EnrollmentError::Corrupted { .. })
        ));
        // Valid base64, not JSON.
        assert!(matches!(
            Enrollment::parse(&raw("not json")),
            Err(EnrollmentError::Corrupted { .. })
        ));
        // JSON missing a key.
        assert!(matches!(
            Enrollment::parse(&raw(r#"{"h":"a:1"}"#)),
            Err(EnrollmentError::Corrupted { .. })
        ));
    }

    #[test]
    fn bad_fingerprint() {
        let short = raw(r#"{"h":"a:1","t":"i.s","f":"abcd"}"#);
        let err = Enrollment::parse(&short).unwrap_err();
        assert!(matches!(err, EnrollmentError::BadFingerprint { .. }));
        assert!(
            err.to_string().contains("4 characters instead of 64"),
            "{err}"
        );

        let upper = raw(&format!(
            r#"{{"h":"a:1","t":"i.s","f":"{}"}}"#,
            FP.to_uppercase()
        ));
        let err = Enrollment::parse(&upper).unwrap_err();
        assert!(
            err.to_string().contains("'A' is not a lowercase hex digit"),
            "{err}"
        );

        let non_hex = raw(&format!(r#"{{"h":"a:1","t":"i.s","f":"{}g"}}"#, &FP[..63]));
        assert!(matches!(
            Enrollment::parse(&non_hex),
            Err(EnrollmentError::BadFingerprint { .. })
        ));
    }

    #[test]
    fn bad_hub() {
        for h in [
            "",
            "host",
            "host:",
            ":80",
            "host:0",
            "host:99999",
            "::1:80",
            "[::1:80",
            "[zz]:1",
            "a b:1",
        ] {
            let s = raw(&format!(r#"{{"h":"{h}","t":"i.s"}}"#));
            assert!(
                matches!(Enrollment::parse(&s), Err(EnrollmentError::BadHub { .. })),
                "{h}"
            );
        }
    }

    #[test]
    fn bad_token_never_echoed() {
        for t in ["nodot-s3cr3t", ".s3cr3t", "id.", "id.s3cr3t with space"] {
            let s = raw(&format!(r#"{{"h":"a:1","t":"{t}"}}"#));
            let err = Enrollment::parse(&s).unwrap_err();
            assert!(matches!(err, EnrollmentError::BadToken { .. }), "{t}");
            assert!(!err.to_string().contains("s3cr3t"), "{err}");
        }
    }

    /// A tiny deterministic generator (xorshift) so the test needs no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid = sample().encode();
        let alphabet: Vec<char> =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_ .+/=\n{}\"é€\u{0}"
                .chars()
                .collect();
        for i in 0..20_000 {
            let input: String = match i % 4 {
                // Pure noise.
                0 => (0..rng.below(80))
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect(),
                // Noise after a valid prefix.
                1 => {
                    let tail: String = (0..rng.below(120))
                        .map(|_| alphabet[rng.below(alphabet.len())])
                        .collect();
                    format!("tf1_{tail}")
                }
                // A valid string with one character replaced.
                2 => {
                    let mut chars: Vec<char> = valid.chars().collect();
                    let at = rng.below(chars.len());
                    chars[at] = alphabet[rng.below(alphabet.len())];
                    chars.into_iter().collect()
                }
                // Random JSON-ish bodies, properly encoded.
                _ => {
                    let body: String = (0..rng.below(60))
                        .map(|_| alphabet[rng.below(alphabet.len())])
                        .collect();
                    raw(&format!(r#"{{"h":"{body}","t":"{body}","f":"{body}"}}"#))
                }
            };
            if let Ok(e) = Enrollment::parse(&input) {
                // Whatever parses must re-encode to something that parses the same.
                assert_eq!(Enrollment::parse(&e.encode()).unwrap(), e);
                let _ = format!("{e:?}");
            }
        }
    }
}

/// Property-based fuzzing of the parser; see the module.
#[cfg(test)]
mod fuzz;
