//! Property-based fuzzing of [`Enrollment::parse`] (issue 6, "Hostile
//! input"): the string is pasted by a person from a chat or a mail, so it
//! arrives cut, wrapped, altered or replaced by something else entirely.
//!
//! Properties:
//! * a valid enrollment encodes to the `tf1_` alphabet and parses back to
//!   itself, also with whitespace wrapped into it;
//! * a mutated string (characters replaced, dropped, inserted, truncated,
//!   extended) is refused with an error that says how to fix it and never
//!   repeats the secret, or, when the mutation happens to produce a valid
//!   string, what it parses to round-trips;
//! * arbitrary strings and arbitrary JSON bodies (wrong types, huge and
//!   unicode values, missing and extra keys) never panic, and whatever parses
//!   passes the same validation as a hub-made string.
//!
//! `cargo test` runs a bounded number of cases; a longer run by hand:
//! `TRUNKFARM_FUZZ_CASES=200000 cargo test --release -p trunkfarm-proto fuzz`
//! (`PROPTEST_CASES` works too). Failures are not persisted to files: a
//! finding becomes a named regression test in `enrollment.rs`.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use super::*;

/// Cases per property in a plain `cargo test`: about 2 s for the four in a
/// debug build on two cores (3-4 s when busy).
const CI_CASES: u32 = 2_000;

/// The run's configuration: `TRUNKFARM_FUZZ_CASES`, else `PROPTEST_CASES`,
/// else [`CI_CASES`]; no failure files written into the source tree.
fn config() -> ProptestConfig {
    let base = ProptestConfig::default();
    let cases = std::env::var("TRUNKFARM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| std::env::var_os("PROPTEST_CASES").map(|_| base.cases))
        .unwrap_or(CI_CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..base
    }
}

/// A `host:port` the parser must accept: names, IPv4, bracketed IPv6.
fn hub() -> impl Strategy<Value = String> {
    let port = 1u16..=u16::MAX;
    prop_oneof![
        ("[A-Za-z0-9._-]{1,40}", port.clone()).prop_map(|(h, p)| format!("{h}:{p}")),
        (any::<std::net::Ipv4Addr>(), port.clone()).prop_map(|(h, p)| format!("{h}:{p}")),
        (any::<std::net::Ipv6Addr>(), port).prop_map(|(h, p)| format!("[{h}]:{p}")),
    ]
}

/// `<token-id>.<secret>`, any non-blank, non-control unicode. The secret is
/// at least 12 characters, so finding it in a message is never a
/// coincidence.
fn token() -> impl Strategy<Value = (String, String)> {
    ("[^.\\s\\p{Cc}]{1,20}", "[^\\s\\p{Cc}]{12,48}").prop_filter(
        "no whitespace or control characters",
        |(id, secret)| {
            !format!("{id}{secret}")
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        },
    )
}

/// A valid enrollment and its secret.
fn enrollment() -> impl Strategy<Value = (Enrollment, String)> {
    (hub(), token(), proptest::option::of("[0-9a-f]{64}")).prop_map(|(hub, (id, secret), f)| {
        let e = Enrollment {
            hub,
            token: format!("{id}.{secret}"),
            ca_sha256: f,
        };
        (e, secret)
    })
}

/// Characters a mutation writes: the string's own alphabet, its neighbours
/// in base64 (`+/=`), whitespace, and anything else.
fn mutation_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                .chars()
                .collect::<Vec<_>>()
        ),
        1 => proptest::sample::select(vec![
            '+', '/', '=', '.', ' ', '\n', '\u{a0}', '\0', 'é', '€',
        ]),
        1 => any::<char>(),
    ]
}

/// One edit of a pasted string.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the character at (index mod length).
    Replace(usize, char),
    /// Drop the character at (index mod length).
    Delete(usize),
    /// Insert before (index mod length + 1).
    Insert(usize, char),
    /// Keep the first (index mod length) characters.
    Truncate(usize),
    /// Append characters.
    Extend(String),
    /// Swap two characters.
    Swap(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), mutation_char()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        2 => any::<usize>().prop_map(Mutation::Delete),
        2 => (any::<usize>(), mutation_char()).prop_map(|(i, c)| Mutation::Insert(i, c)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => proptest::collection::vec(mutation_char(), 1..8)
            .prop_map(|cs| Mutation::Extend(cs.into_iter().collect())),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Mutation::Swap(i, j)),
    ]
}

fn apply(s: &str, mutations: &[Mutation]) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    for m in mutations {
        let n = chars.len().max(1);
        match m {
            Mutation::Replace(i, c) => {
                if let Some(slot) = chars.get_mut(i % n) {
                    *slot = *c;
                }
            }
            Mutation::Delete(i) => {
                if i % n < chars.len() {
                    chars.remove(i % n);
                }
            }
            Mutation::Insert(i, c) => chars.insert(i % (chars.len() + 1), *c),
            Mutation::Truncate(i) => chars.truncate(i % n),
            Mutation::Extend(tail) => chars.extend(tail.chars()),
            Mutation::Swap(i, j) => {
                if !chars.is_empty() {
                    chars.swap(i % n, j % n);
                }
            }
        }
    }
    chars.into_iter().collect()
}

/// What every outcome of `parse` must satisfy: a parsed enrollment passes
/// the validation and round-trips; an error is non-empty and says how to fix
/// it (copy again or upgrade).
fn check_outcome(
    input: &str,
    result: &Result<Enrollment, EnrollmentError>,
) -> Result<(), TestCaseError> {
    match result {
        Ok(e) => {
            prop_assert!(
                crate::addr::split_host_port(&e.hub).is_ok(),
                "accepted hub {:?} from {:?}",
                e.hub,
                input
            );
            prop_assert!(
                validate_token(&e.token).is_ok(),
                "accepted a bad token from {:?}",
                input
            );
            if let Some(f) = &e.ca_sha256 {
                prop_assert!(
                    f.len() == 64 && f.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                    "accepted fingerprint {:?}",
                    f
                );
            }
            let again = e.encode();
            prop_assert_eq!(
                &Enrollment::parse(&again),
                &Ok(e.clone()),
                "{:?} parsed, but its re-encoding {:?} does not round-trip",
                input,
                again
            );
        }
        Err(err) => {
            let msg = err.to_string();
            prop_assert!(
                msg.contains("trunkfarm token create") || msg.contains("upgrade trunkfarm-agent"),
                "the message for {:?} does not say how to fix it: {}",
                input,
                msg
            );
        }
    }
    Ok(())
}

/// A JSON value of any kind, for the body's fields: right and wrong types,
/// huge, negative, unicode.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,80}".prop_map(Value::String),
        "[0-9a-fA-F]{60,68}".prop_map(Value::String),
        "[a-z.]{1,20}:[0-9]{1,6}".prop_map(Value::String),
        "[^.]{1,10}\\.[^\\s]{1,20}".prop_map(Value::String),
        (0usize..100_000).prop_map(|n| Value::String("x".repeat(n))),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map("[a-z]{1,2}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What happens to one of the body's fields.
#[derive(Debug, Clone)]
enum FieldEdit {
    Keep,
    Drop,
    /// Characters of the value edited.
    Edit(Vec<Mutation>),
    /// A value of any type instead.
    Replace(serde_json::Value),
}

fn field_edit() -> impl Strategy<Value = FieldEdit> {
    prop_oneof![
        3 => Just(FieldEdit::Keep),
        1 => Just(FieldEdit::Drop),
        3 => proptest::collection::vec(mutation(), 1..3).prop_map(FieldEdit::Edit),
        2 => json_value().prop_map(FieldEdit::Replace),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_valid_strings_round_trip(
        (e, _secret) in enrollment(),
        wraps in proptest::collection::vec(
            (
                any::<usize>(),
                proptest::sample::select(vec![
                    " ", "\n", "\r\n", "\t", "  \n  ", "\u{a0}", "\u{2028}",
                ]),
            ),
            0..5,
        ),
    ) {
        let s = e.encode();
        prop_assert!(s.starts_with(PREFIX));
        prop_assert!(
            s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "{s}"
        );
        prop_assert_eq!(Enrollment::parse(&s), Ok(e.clone()));
        // Wrapped by a terminal or a mail client: still the same enrollment.
        let mut wrapped = s.clone();
        for (at, ws) in wraps {
            let mut at = at % (wrapped.len() + 1);
            while !wrapped.is_char_boundary(at) {
                at -= 1;
            }
            wrapped.insert_str(at, ws);
        }
        prop_assert_eq!(Enrollment::parse(&wrapped), Ok(e));
    }

    #[test]
    fn fuzz_mutated_strings_are_refused_or_round_trip(
        (e, secret) in enrollment(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let original = e.encode();
        let mutated = apply(&original, &mutations);
        let result = Enrollment::parse(&mutated);
        check_outcome(&mutated, &result)?;
        // Whitespace edits only (wrapping): still exactly the original.
        let compact: String = mutated.chars().filter(|c| !c.is_whitespace()).collect();
        if compact == original {
            prop_assert_eq!(&result, &Ok(e));
        }
        if let Err(err) = &result {
            let msg = err.to_string();
            prop_assert!(!msg.contains(&secret), "the secret leaked: {}", msg);
        }
    }

    #[test]
    fn fuzz_arbitrary_strings_never_panic(
        s in prop_oneof![
            any::<String>(),
            ".{0,200}",
            "tf[0-9]{0,30}_?[A-Za-z0-9_+/= -]{0,200}",
            "tf1_[A-Za-z0-9_-]{0,300}",
            proptest::collection::vec(any::<u8>(), 0..200)
                .prop_map(|b| format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(b))),
        ],
    ) {
        let result = Enrollment::parse(&s);
        check_outcome(&s, &result)?;
    }

    #[test]
    fn fuzz_arbitrary_json_bodies(
        (valid, _secret) in enrollment(),
        edits in proptest::collection::vec(field_edit(), 3),
        extra in proptest::collection::btree_map("[a-z]{1,3}", json_value(), 0..3),
        raw_text in prop_oneof![4 => Just(None), 1 => ".{0,120}".prop_map(Some)],
    ) {
        // A hub-made body whose fields are kept, dropped, edited or replaced
        // by values of any type, plus keys of any kind.
        let mut fields = serde_json::Map::new();
        let values = [Some(valid.hub), Some(valid.token), valid.ca_sha256];
        for ((key, value), edit) in ["h", "t", "f"].into_iter().zip(values).zip(edits) {
            let value = match (edit, value) {
                (FieldEdit::Keep, Some(v)) => serde_json::Value::String(v),
                (FieldEdit::Edit(m), Some(v)) => serde_json::Value::String(apply(&v, &m)),
                (FieldEdit::Replace(v), _) => v,
                (FieldEdit::Keep | FieldEdit::Edit(_), None) | (FieldEdit::Drop, _) => continue,
            };
            fields.insert(key.into(), value);
        }
        for (key, value) in extra {
            fields.entry(key).or_insert(value);
        }
        let body = match raw_text {
            // Not even JSON, or JSON of the wrong shape.
            Some(text) => text.into_bytes(),
            None => serde_json::to_vec(&fields).unwrap_or_default(),
        };
        let s = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&body));
        let result = Enrollment::parse(&s);
        check_outcome(&s, &result)?;
        // A body with the right types and values parses to exactly those.
        if let Ok(parsed) = &result
            && let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body)
        {
            prop_assert_eq!(value.get("h").and_then(|v| v.as_str()), Some(parsed.hub.as_str()));
            prop_assert_eq!(value.get("t").and_then(|v| v.as_str()), Some(parsed.token.as_str()));
            prop_assert_eq!(
                value.get("f").and_then(|v| v.as_str()),
                parsed.ca_sha256.as_deref()
            );
        }
    }
}
