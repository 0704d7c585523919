//! Property-based fuzzing of [`HubConfig::from_toml`] (issue 6, "Hostile
//! input"): the operator's `hub.toml` is hand-written, copied from examples
//! and edited under pressure, so it arrives with keys dropped or repeated,
//! values of the wrong type, absurd numbers and stray unicode.
//!
//! Properties, for arbitrary text and for valid configurations mutated in
//! structure (keys dropped, duplicated, renamed; values swapped for other
//! types, huge, negative, unicode; sections repeated; lines swapped or cut):
//! * parsing never panics and ends (deeply nested values included);
//! * it is `Ok` or an error whose message is non-empty and names the file
//!   (or `<inline config>`), with a line inside the text and the key it
//!   blames when it gives them;
//! * an accepted configuration passes [`HubConfig::validate`], and where the
//!   file lives never decides whether the text is valid;
//! * an unmutated valid configuration is accepted with the values written.
//!
//! `cargo test` runs a bounded number of cases; a longer run by hand:
//! `TRUNKFARM_FUZZ_CASES=200000 cargo test --release -p trunkfarm --lib config::fuzz`
//! (`--lib fuzz` runs the JUnit parser's too).

use std::fmt::Write as _;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use super::*;

/// The configuration of every property test in the hub: cases from
/// `TRUNKFARM_FUZZ_CASES`, else `PROPTEST_CASES`, else `ci_cases` (sized for a
/// debug `cargo test` of a few seconds); no failure files written into the
/// source tree (a finding becomes a named regression test instead).
pub(crate) fn proptest_config(ci_cases: u32) -> ProptestConfig {
    let base = ProptestConfig::default();
    let cases = std::env::var("TRUNKFARM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| std::env::var_os("PROPTEST_CASES").map(|_| base.cases))
        .unwrap_or(ci_cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..base
    }
}

const FILE: &str = "/etc/trunkfarm/hub.toml";

/// One `[section]` or `[[array]]` entry of a configuration, as written.
#[derive(Debug, Clone)]
struct Section {
    /// `hub`, `pool.ec2`, ...
    name: String,
    /// `[[name]]` rather than `[name]`.
    array: bool,
    /// `key = value` pairs, the value as TOML text.
    keys: Vec<(String, String)>,
}

impl Section {
    fn new(name: &str, array: bool, keys: Vec<(&str, String)>) -> Self {
        Section {
            name: name.to_owned(),
            array,
            keys: keys.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }
}

fn render(sections: &[Section]) -> String {
    let mut out = String::new();
    for s in sections {
        if s.array {
            let _ = writeln!(out, "[[{}]]", s.name);
        } else {
            let _ = writeln!(out, "[{}]", s.name);
        }
        for (k, v) in &s.keys {
            let _ = writeln!(out, "{k} = {v}");
        }
        out.push('\n');
    }
    out
}

/// A TOML basic string holding `s` exactly.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What the generator chose, to compare with what was parsed.
#[derive(Debug, Clone)]
struct Expected {
    max_attempts: u32,
    upstreams: usize,
    projects: usize,
    pools: usize,
    max_log_size: u64,
}

/// A configuration every rule accepts: all sections, with values drawn from
/// valid ranges, one to three upstreams, projects and pools.
fn valid_config() -> impl Strategy<Value = (Vec<Section>, Expected)> {
    let hub = (
        1u16..=u16::MAX,
        any::<bool>(),
        "[a-z0-9-]{1,32}",
        "[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\\.[a-z]([a-z0-9-]{0,18}[a-z0-9])?){0,3}",
    )
        .prop_map(|(port, v6, id, host)| {
            let listen = if v6 {
                format!("[::1]:{port}")
            } else {
                format!("127.0.0.1:{port}")
            };
            Section::new(
                "hub",
                false,
                vec![
                    ("listen", quoted(&listen)),
                    ("public_address", quoted(&format!("{host}:{port}"))),
                    ("data_dir", quoted("data")),
                    ("hub_id", quoted(&id)),
                ],
            )
        });
    let tls = prop_oneof![
        Just(vec![("plaintext", "true".to_owned())]),
        Just(vec![(
            "hostnames",
            "[\"farm.example.org\", \"192.0.2.10\", \"*.example.org\"]".to_owned()
        )]),
        Just(vec![
            ("cert", quoted("certs/hub.pem")),
            ("key", quoted("/secret/hub.key"))
        ]),
    ]
    .prop_map(|keys| Section::new("tls", false, keys));
    let dispatch = (
        1u64..60,
        0u64..600,
        1u32..10,
        1u64..=60,
        1u64..=48,
        0u64..3600,
    )
        .prop_map(|(hb, extra, attempts, default_min, max_h, grace)| {
            (
                Section::new(
                    "dispatch",
                    false,
                    vec![
                        ("heartbeat_interval", quoted(&format!("{hb}s"))),
                        ("lease_timeout", quoted(&format!("{}s", 2 * hb + extra))),
                        ("max_attempts", attempts.to_string()),
                        ("default_job_timeout", quoted(&format!("{default_min}m"))),
                        ("max_job_timeout", quoted(&format!("{max_h}h"))),
                        ("drain_grace", quoted(&format!("{grace}s"))),
                        ("timeout_grace", quoted(&format!("{}s", grace + 1))),
                    ],
                ),
                attempts,
            )
        });
    let limits = (4u64..64, 1u64..1_000_000_000).prop_map(|(mib, log)| {
        (
            Section::new(
                "limits",
                false,
                vec![
                    ("max_message_size", quoted(&format!("{mib} MiB"))),
                    ("max_log_size", log.to_string()),
                ],
            ),
            log,
        )
    });
    let rest = (1u64..24, 1u64..30, 1u32..10, 1u64..16, 1u64..600).prop_map(
        |(ttl_h, max_d, keep, gib, git)| {
            vec![
                Section::new("admin", false, vec![("token_file", quoted("admin.token"))]),
                Section::new(
                    "enrollment",
                    false,
                    vec![
                        ("default_token_ttl", quoted(&format!("{ttl_h}h"))),
                        ("max_token_ttl", quoted(&format!("{max_d}d"))),
                        ("default_max_parallel_jobs", keep.to_string()),
                    ],
                ),
                Section::new(
                    "artifacts",
                    false,
                    vec![
                        ("keep", keep.to_string()),
                        ("max_size", quoted(&format!("{gib} GiB"))),
                    ],
                ),
                Section::new(
                    "pipeline",
                    false,
                    vec![("git_timeout", quoted(&format!("{git}s")))],
                ),
            ]
        },
    );
    let mail = (
        proptest::sample::select(vec!["tls", "starttls", "plain"]),
        1u16..=u16::MAX,
        1u32..8,
        any::<bool>(),
    )
        .prop_map(|(security, port, conns, login)| {
            let mut smtp = vec![
                ("host", quoted("smtp.example.org")),
                ("port", port.to_string()),
                ("security", quoted(security)),
                ("from", quoted("trunkfarm <farm@example.org>")),
                ("timeout", quoted("30s")),
                ("max_connections", conns.to_string()),
            ];
            if login {
                smtp.push(("username", quoted("farm")));
                smtp.push(("password_file", quoted("smtp.password")));
            }
            vec![
                Section::new("smtp", false, smtp),
                Section::new(
                    "notify",
                    false,
                    vec![
                        ("public_url", quoted("https://farm.example.org")),
                        ("reminder_after", quoted("7d")),
                        ("reminder_every", quoted("1d")),
                        ("digest_every", quoted("24h")),
                        ("retry_first", quoted("10s")),
                        ("retry_max", quoted("1h")),
                        ("log_tail_lines", "40".to_owned()),
                        ("link_ttl", quoted("180d")),
                        ("self_subscribe", "true".to_owned()),
                        ("subscribe_link_ttl", quoted("24h")),
                        ("subscribe_per_address", "3".to_owned()),
                        ("subscribe_per_client", "10".to_owned()),
                    ],
                ),
                Section::new(
                    "web",
                    false,
                    vec![
                        ("listen", quoted("127.0.0.1:7480")),
                        ("header_read_timeout", quoted("10s")),
                        ("request_timeout", quoted("30s")),
                        ("max_connections", "128".to_owned()),
                    ],
                ),
            ]
        });
    // Every rule of `[network]` holds: the handshake fits in the time to
    // authenticate, enough streams, a pre-auth cap between 1 KiB and 4 MiB
    // (the smallest `limits.max_message_size` drawn above).
    let network = (
        prop_oneof![
            Just("\"auto\"".to_owned()),
            (1u32..100_000).prop_map(|n| n.to_string())
        ],
        1u64..60,
        0u64..600,
        8u32..1000,
        1u64..=4096,
        1u32..100,
        1u64..120,
    )
        .prop_map(
            |(conns, handshake, extra, streams, kib, failures, window)| {
                Section::new(
                    "network",
                    false,
                    vec![
                        ("max_connections", conns),
                        ("tls_handshake_timeout", quoted(&format!("{handshake}s"))),
                        (
                            "unauthenticated_timeout",
                            quoted(&format!("{}s", handshake + extra)),
                        ),
                        ("max_concurrent_streams", streams.to_string()),
                        (
                            "max_unauthenticated_message_size",
                            quoted(&format!("{kib} KiB")),
                        ),
                        ("enroll_failures", failures.to_string()),
                        ("enroll_failure_window", quoted(&format!("{window}m"))),
                    ],
                )
            },
        );
    let pipeline = (1usize..=3, 0usize..=3).prop_map(|(ups, projects)| {
        let mut out = Vec::new();
        for i in 0..ups {
            out.push(Section::new(
                "upstream",
                true,
                vec![
                    ("name", quoted(&format!("up{i}"))),
                    ("url", quoted("https://example.org/runtime.git")),
                    ("branch", quoted("main")),
                    ("poll_interval", quoted("60s")),
                    (
                        "platforms",
                        "[\"linux-x86_64\", \"linux-aarch64\"]".to_owned(),
                    ),
                    ("build", "[\"make install PREFIX=$PREFIX\"]".to_owned()),
                    ("build_timeout", quoted("30m")),
                    ("env", "{ CFLAGS = \"-O2\" }".to_owned()),
                    ("labels", "[\"big-memory\"]".to_owned()),
                    ("contacts", "[\"core@example.org\"]".to_owned()),
                ],
            ));
        }
        for i in 0..projects {
            out.push(Section::new(
                "project",
                true,
                vec![
                    ("name", quoted(&format!("proj{i}"))),
                    ("url", quoted("https://example.org/proj.git")),
                    ("upstreams", "[\"up0\"]".to_owned()),
                    ("test", "[\"make test\"]".to_owned()),
                    ("timeout", quoted("20m")),
                    ("junit", "[\"out/junit.xml\"]".to_owned()),
                    ("maintainers", "[\"dev@example.org\"]".to_owned()),
                ],
            ));
        }
        (out, ups, projects)
    });
    let pools = proptest::collection::vec(
        (
            proptest::sample::select(vec!["local", "command", "ec2"]),
            0u32..4,
        ),
        0..=3,
    )
    .prop_map(|kinds| {
        let mut out = Vec::new();
        for (i, (kind, min)) in kinds.iter().enumerate() {
            let mut keys = vec![
                ("name", quoted(&format!("pool{i}"))),
                ("provisioner", quoted(kind)),
                ("min_instances", min.to_string()),
                ("max_instances", (min + 2).to_string()),
                ("idle_timeout", quoted("10m")),
            ];
            if *kind == "command" {
                keys.push(("start_command", quoted("/usr/local/bin/start")));
                keys.push(("stop_command", quoted("/usr/local/bin/stop")));
            }
            out.push(Section::new("pool", true, keys));
            if *kind == "ec2" {
                out.push(Section::new(
                    "pool.ec2",
                    false,
                    vec![
                        ("region", quoted("eu-west-1")),
                        ("ami", quoted("ami-123")),
                        ("instance_type", quoted("c6i.large")),
                        ("endpoint", quoted("http://127.0.0.1:5000")),
                    ],
                ));
            }
        }
        let n = kinds.len();
        (out, n)
    });
    (
        hub, tls, dispatch, limits, rest, mail, network, pipeline, pools,
    )
        .prop_map(
            |(
                hub,
                tls,
                (dispatch, max_attempts),
                (limits, max_log_size),
                rest,
                mail,
                network,
                pipeline,
                pools,
            )| {
                let (pipeline, upstreams, projects) = pipeline;
                let (pools, npools) = pools;
                let mut sections = vec![hub, tls, dispatch, limits, network];
                sections.extend(rest);
                sections.extend(mail);
                sections.extend(pipeline);
                sections.extend(pools);
                let expected = Expected {
                    max_attempts,
                    upstreams,
                    projects,
                    pools: npools,
                    max_log_size,
                };
                (sections, expected)
            },
        )
}

/// A TOML value of any type, for a key that expects another: numbers at the
/// edges, durations and sizes that overflow, unicode, huge and deeply
/// nested values, dates.
fn hostile_value() -> impl Strategy<Value = String> {
    let fixed: Vec<&'static str> = vec![
        "0",
        "-1",
        "1",
        "65536",
        "4294967296",
        "9223372036854775807",
        "-9223372036854775808",
        "99999999999999999999",
        "0x7fffffff",
        "1_000",
        "nan",
        "-inf",
        "1e308",
        "-0.0",
        "true",
        "false",
        "\"\"",
        "\" \"",
        "\"0s\"",
        "\"-1s\"",
        "\"1ns\"",
        "\"18446744073709551615s\"",
        "\"99999999999999999999999h\"",
        "\"584942417355y\"",
        "\"1e400 KiB\"",
        "\"18446744073709551615 B\"",
        "\"16 EiB\"",
        "\"17179869184 GiB\"",
        "\"-4 MiB\"",
        "\"4 parsecs\"",
        "\"~/x\"",
        "\"../..\"",
        "\"[::1]:0\"",
        "\"a:b:c\"",
        "\"http://\"",
        "\"\\u0000\"",
        "[]",
        "[1, \"a\", true]",
        "[[[]]]",
        "{}",
        "{ a = 1 }",
        "{ listen = \"127.0.0.1:1\" }",
        "1979-05-27T07:32:00Z",
        "07:32:00",
        "'literal'",
        "\"\"\"multi\nline\"\"\"",
    ];
    prop_oneof![
        4 => proptest::sample::select(fixed).prop_map(str::to_owned),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
        2 => ".{0,40}".prop_map(|s| quoted(&s)),
        1 => (any::<u64>(), proptest::sample::select(vec![
            "s", "m", "h", "d", "w", "y", "ms", " B", " KiB", " MiB", " GiB", " TiB", " PB",
        ]))
            .prop_map(|(n, unit)| quoted(&format!("{n}{unit}"))),
        1 => (0usize..200_000).prop_map(|n| quoted(&"x".repeat(n))),
        1 => (1usize..20_000).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n))),
        1 => (1usize..20_000).prop_map(|n| format!("{}{}", "{ a = ".repeat(n), " 1 }".repeat(n))),
    ]
}

/// A key that may not exist: typos, unicode, quoted and dotted keys.
fn hostile_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{1,16}",
        "[a-z]{1,8}\\.[a-z]{1,8}",
        ".{1,12}".prop_map(|s| quoted(&s)),
        Just("listen".to_owned()),
        Just("name".to_owned()),
        Just("\"\"".to_owned()),
    ]
}

/// A structural edit of a configuration.
#[derive(Debug, Clone)]
enum Edit {
    DropKey(usize, usize),
    DuplicateKey(usize, usize),
    RenameKey(usize, usize, String),
    ReplaceValue(usize, usize, String),
    AddKey(usize, String, String),
    DropSection(usize),
    DuplicateSection(usize),
    SwapSections(usize, usize),
    /// A section header turned from `[x]` into `[[x]]` or back.
    FlipArray(usize),
    RenameSection(usize, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    let i = any::<usize>;
    prop_oneof![
        2 => (i(), i()).prop_map(|(s, k)| Edit::DropKey(s, k)),
        1 => (i(), i()).prop_map(|(s, k)| Edit::DuplicateKey(s, k)),
        1 => (i(), i(), hostile_key()).prop_map(|(s, k, n)| Edit::RenameKey(s, k, n)),
        4 => (i(), i(), hostile_value()).prop_map(|(s, k, v)| Edit::ReplaceValue(s, k, v)),
        1 => (i(), hostile_key(), hostile_value()).prop_map(|(s, k, v)| Edit::AddKey(s, k, v)),
        1 => i().prop_map(Edit::DropSection),
        1 => i().prop_map(Edit::DuplicateSection),
        1 => (i(), i()).prop_map(|(a, b)| Edit::SwapSections(a, b)),
        1 => i().prop_map(Edit::FlipArray),
        1 => (i(), prop_oneof![
            "[a-z]{1,10}",
            Just("pool.ec2".to_owned()),
            Just("upstream".to_owned()),
            Just("hub.hub".to_owned()),
        ]).prop_map(|(s, n)| Edit::RenameSection(s, n)),
    ]
}

fn apply(sections: &mut Vec<Section>, edit: &Edit) {
    if sections.is_empty() {
        return;
    }
    let n = sections.len();
    let pick = |s: &Section, k: usize| (!s.keys.is_empty()).then(|| k % s.keys.len());
    match edit {
        Edit::DropKey(s, k) => {
            let s = &mut sections[s % n];
            if let Some(k) = pick(s, *k) {
                s.keys.remove(k);
            }
        }
        Edit::DuplicateKey(s, k) => {
            let s = &mut sections[s % n];
            if let Some(k) = pick(s, *k) {
                let pair = s.keys[k].clone();
                s.keys.push(pair);
            }
        }
        Edit::RenameKey(s, k, name) => {
            let s = &mut sections[s % n];
            if let Some(k) = pick(s, *k) {
                s.keys[k].0 = name.clone();
            }
        }
        Edit::ReplaceValue(s, k, value) => {
            let s = &mut sections[s % n];
            if let Some(k) = pick(s, *k) {
                s.keys[k].1 = value.clone();
            }
        }
        Edit::AddKey(s, k, v) => sections[s % n].keys.push((k.clone(), v.clone())),
        Edit::DropSection(s) => {
            sections.remove(s % n);
        }
        Edit::DuplicateSection(s) => {
            let copy = sections[s % n].clone();
            sections.insert(s % n, copy);
        }
        Edit::SwapSections(a, b) => sections.swap(a % n, b % n),
        Edit::FlipArray(s) => sections[s % n].array ^= true,
        Edit::RenameSection(s, name) => sections[s % n].name = name.clone(),
    }
}

/// A text-level edit after rendering: cut, or a line swapped or dropped.
#[derive(Debug, Clone)]
enum TextEdit {
    None,
    Truncate(usize),
    SwapLines(usize, usize),
    DropLine(usize),
    InsertLine(usize, String),
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        6 => Just(TextEdit::None),
        1 => any::<usize>().prop_map(TextEdit::Truncate),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| TextEdit::SwapLines(a, b)),
        1 => any::<usize>().prop_map(TextEdit::DropLine),
        1 => (any::<usize>(), toml_soup()).prop_map(|(a, l)| TextEdit::InsertLine(a, l)),
    ]
}

fn apply_text(text: &str, edit: &TextEdit) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    let n = lines.len().max(1);
    match edit {
        TextEdit::None => return text.to_owned(),
        TextEdit::Truncate(at) => {
            let mut at = at % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            return text[..at].to_owned();
        }
        TextEdit::SwapLines(a, b) => {
            if !lines.is_empty() {
                lines.swap(a % n, b % n);
            }
        }
        TextEdit::DropLine(a) => {
            if !lines.is_empty() {
                lines.remove(a % n);
            }
        }
        TextEdit::InsertLine(a, line) => lines.insert(a % (lines.len() + 1), line),
    }
    lines.join("\n")
}

/// TOML-looking noise: the punctuation and words of a hub.toml in any order.
fn toml_soup() -> impl Strategy<Value = String> {
    let pieces = vec![
        "[",
        "]",
        "[[",
        "]]",
        "=",
        " = ",
        "\"",
        "'",
        "\"\"\"",
        "'''",
        "\n",
        " ",
        "#",
        ",",
        "{",
        "}",
        ".",
        "\\",
        "\\u",
        "hub",
        "listen",
        "upstream",
        "project",
        "pool",
        "ec2",
        "name",
        "dispatch",
        "lease_timeout",
        "\"10s\"",
        "\"4 MiB\"",
        "1",
        "-",
        "+",
        "e",
        "inf",
        "nan",
        "true",
        "1979-05-27",
        "T",
        ":",
        "Z",
        "é",
        "\u{0}",
        "\r",
        "\t",
    ];
    proptest::collection::vec(proptest::sample::select(pieces), 0..60).prop_map(|p| p.concat())
}

/// What every parse must satisfy; `text` came from `FILE` or from no file.
fn check(text: &str) -> Result<(), TestCaseError> {
    let lines = text.matches('\n').count() + 1;
    let with_file = HubConfig::from_toml(text, Some(Path::new(FILE)));
    let inline = HubConfig::from_toml(text, None);
    for (result, origin) in [(&with_file, FILE), (&inline, "<inline config>")] {
        match result {
            Ok(config) => {
                prop_assert!(
                    config.validate().is_ok(),
                    "accepted, but validate() refuses it: {:?}",
                    config.validate()
                );
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    msg.starts_with(origin),
                    "the message does not name {}: {}",
                    origin,
                    msg
                );
                prop_assert!(msg.len() > origin.len() + 2, "empty message: {}", msg);
                if let Some(line) = e.line() {
                    prop_assert!(
                        (1..=lines).contains(&line),
                        "line {} outside the {}-line text: {}",
                        line,
                        lines,
                        msg
                    );
                }
                // The message names the key it blames (which TOML allows to
                // be empty: `"" = 1` is reported as unknown key ``).
                if let Some(key) = e.key() {
                    prop_assert!(
                        msg.contains(&format!("`{key}`")),
                        "the message does not name the key {:?}: {}",
                        key,
                        msg
                    );
                }
            }
        }
    }
    prop_assert_eq!(
        with_file.is_ok(),
        inline.is_ok(),
        "where the file lives decided validity: {:?} vs {:?}",
        with_file.as_ref().err().map(ToString::to_string),
        inline.as_ref().err().map(ToString::to_string)
    );
    Ok(())
}

proptest! {
    // About 2 s for the three in a debug build on two cores (3-4 s when busy).
    #![proptest_config(proptest_config(2500))]

    #[test]
    fn fuzz_valid_configs_parse((sections, expected) in valid_config()) {
        let text = render(&sections);
        let config = HubConfig::from_toml(&text, Some(Path::new(FILE)));
        let config = config.map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(config.dispatch.max_attempts, expected.max_attempts);
        prop_assert_eq!(config.limits.max_log_size, expected.max_log_size);
        prop_assert_eq!(config.upstreams.len(), expected.upstreams);
        prop_assert_eq!(config.projects.len(), expected.projects);
        prop_assert_eq!(config.pools.len(), expected.pools);
        prop_assert_eq!(config.data_dir(), Path::new("/etc/trunkfarm/data"));
        check(&text)?;
    }

    #[test]
    fn fuzz_mutated_configs(
        (sections, _) in valid_config(),
        edits in proptest::collection::vec(edit(), 1..5),
        text_edit in text_edit(),
    ) {
        let mut sections = sections;
        for e in &edits {
            apply(&mut sections, e);
        }
        let text = apply_text(&render(&sections), &text_edit);
        check(&text)?;
    }

    #[test]
    fn fuzz_arbitrary_text(text in prop_oneof![any::<String>(), toml_soup()]) {
        check(&text)?;
    }
}
