//! Property-based fuzzing of the JUnit parser (issue 6, "Hostile input"):
//! report files are written by whatever a project's test suite runs, so they
//! arrive truncated, mis-encoded, deeply nested, with huge attributes and
//! entity tricks.
//!
//! Properties:
//! * generated JUnit documents (nested suites, cases with outcomes, elements
//!   the parser ignores, escaped and character-referenced names, comments,
//!   CDATA, huge attributes) parse to exactly the cases they hold, or are
//!   refused as too deep when they nest past [`MAX_DEPTH`];
//! * cut anywhere and flagged as truncated, such a document keeps a prefix
//!   of its cases and reads as cut, not as broken;
//! * arbitrary bytes and mutated documents (bytes flipped, ranges dropped or
//!   repeated, hostile snippets inserted: DOCTYPEs, unknown and out-of-range
//!   entities, stray CDATA ends, invalid UTF-8, deep nesting) never panic,
//!   and every outcome respects the documented limits: at most
//!   [`MAX_CASES`] cases, names within [`MAX_NAME_BYTES`], messages within
//!   [`MAX_MESSAGE_BYTES`], a known status, and errors that name the file,
//!   point inside it and stay short.
//!
//! `cargo test` runs a bounded number of cases; a longer run by hand:
//! `TRUNKFARM_FUZZ_CASES=200000 cargo test --release -p trunkfarm --lib junit::fuzz`.

use std::fmt::Write as _;

use proptest::prelude::*;

use super::*;
use crate::config::fuzz::proptest_config;

/// The longest error line accepted for one file, beyond its path: the
/// positions, the fixed wording and the quoted names (each cut to
/// [`MAX_QUOTED_BYTES`]) fit easily.
const MAX_ERROR_BYTES: usize = 1024;

/// A node of a generated document.
#[derive(Debug, Clone)]
enum Node {
    /// `<testsuite>` (or `<testsuites>`), holding anything.
    Suite {
        plural: bool,
        children: Vec<Node>,
    },
    /// `<testcase>`.
    Case {
        name: String,
        classname: String,
        time: String,
        children: Vec<Node>,
    },
    /// `<failure>`, `<error>` or `<skipped>`.
    Outcome {
        status: TestStatus,
        message: Option<String>,
        text: String,
    },
    /// An element the parser ignores (`<properties>`, `<system-out>`, ...).
    Other {
        tag: String,
        children: Vec<Node>,
    },
    Text(String),
    CData(String),
    Comment(String),
}

/// Text escaped for XML, some characters as character references.
fn escape(s: &str, refs: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if refs && i % 3 == 0 => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c if refs && i % 3 == 1 => {
                let _ = write!(out, "&#x{:X};", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn render(node: &Node, out: &mut String, refs: bool) {
    match node {
        Node::Suite { plural, children } => {
            let tag = if *plural { "testsuites" } else { "testsuite" };
            let _ = write!(out, "<{tag} name=\"s\" tests=\"{}\">", children.len());
            for c in children {
                render(c, out, refs);
            }
            let _ = write!(out, "</{tag}>");
        }
        Node::Case {
            name,
            classname,
            time,
            children,
        } => {
            let _ = write!(
                out,
                "<testcase classname=\"{}\" name=\"{}\" time=\"{}\"",
                escape(classname, refs),
                escape(name, refs),
                escape(time, false)
            );
            if children.is_empty() {
                out.push_str("/>");
            } else {
                out.push('>');
                for c in children {
                    render(c, out, refs);
                }
                out.push_str("</testcase>");
            }
        }
        Node::Outcome {
            status,
            message,
            text,
        } => {
            let tag = match status {
                TestStatus::Failed => "failure",
                TestStatus::Error => "error",
                _ => "skipped",
            };
            let _ = write!(out, "<{tag} type=\"T\"");
            if let Some(m) = message {
                let _ = write!(out, " message=\"{}\"", escape(m, refs));
            }
            let _ = write!(out, ">{}</{tag}>", escape(text, refs));
        }
        Node::Other { tag, children } => {
            let _ = write!(out, "<{tag} k=\"v\">");
            for c in children {
                render(c, out, refs);
            }
            let _ = write!(out, "</{tag}>");
        }
        Node::Text(t) => out.push_str(&escape(t, refs)),
        Node::CData(t) => {
            let _ = write!(out, "<![CDATA[{}]]>", t.replace("]]>", "]]"));
        }
        Node::Comment(t) => {
            let _ = write!(out, "<!--{}-->", t.replace("--", "- "));
        }
    }
}

/// `s` cut to at most `max` bytes on a char boundary: the oracle, written
/// independently of the parser's `cut`.
fn keep(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// The cases the parser must find under a suite's `children`, as
/// (name, status), in document order.
fn expected(children: &[Node], out: &mut Vec<(String, TestStatus)>) {
    for child in children {
        match child {
            Node::Suite { children, .. } => expected(children, out),
            Node::Case {
                name,
                classname,
                children,
                ..
            } => {
                let name = keep(name, MAX_NAME_BYTES);
                let name = if classname.is_empty() {
                    name
                } else {
                    // Joined without doubling the class (unit-tested in
                    // `a_name_that_holds_its_class_is_not_doubled`).
                    keep(
                        &super::joined(&keep(classname, MAX_NAME_BYTES), &name),
                        MAX_NAME_BYTES,
                    )
                };
                let mut status = TestStatus::Passed;
                for c in children {
                    if let Node::Outcome { status: s, .. } = c {
                        let failing = matches!(status, TestStatus::Failed | TestStatus::Error);
                        status = match s {
                            TestStatus::Failed | TestStatus::Error if !failing => *s,
                            TestStatus::Skipped if status == TestStatus::Passed => *s,
                            _ => status,
                        };
                    }
                }
                out.push((name, status));
            }
            // Nothing inside an unknown element counts, nor loose outcomes.
            Node::Other { .. }
            | Node::Outcome { .. }
            | Node::Text(_)
            | Node::CData(_)
            | Node::Comment(_) => {}
        }
    }
}

/// Element nesting of `node` (an element is 1).
fn depth(node: &Node) -> usize {
    match node {
        Node::Suite { children, .. }
        | Node::Case { children, .. }
        | Node::Other { children, .. } => 1 + children.iter().map(depth).max().unwrap_or(0),
        Node::Outcome { .. } => 1,
        Node::Text(_) | Node::CData(_) | Node::Comment(_) => 0,
    }
}

/// Text of any valid XML characters (no control characters but tab and
/// newline), sometimes long.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[^\\p{Cc}]{0,24}",
        1 => "[a-z \n\t]{0,40}",
        1 => (0usize..600).prop_map(|n| "é".repeat(n)),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z_][a-z0-9_\\[\\]-]{0,20}",
        2 => "[^\\p{Cc}]{1,30}",
        1 => (0usize..5_000).prop_map(|n| "n".repeat(n)),
    ]
}

fn outcome() -> impl Strategy<Value = Node> {
    (
        proptest::sample::select(vec![
            TestStatus::Failed,
            TestStatus::Error,
            TestStatus::Skipped,
        ]),
        proptest::option::of(prop_oneof![
            5 => text(),
            1 => (0usize..5_000).prop_map(|n| "m".repeat(n)),
        ]),
        text(),
    )
        .prop_map(|(status, message, text)| Node::Outcome {
            status,
            message,
            text,
        })
}

fn leaf() -> impl Strategy<Value = Node> {
    prop_oneof![
        text().prop_map(Node::Text),
        text().prop_map(Node::CData),
        text().prop_map(Node::Comment),
        proptest::sample::select(vec!["properties", "system-out", "flakyFailure", "x"]).prop_map(
            |t| Node::Other {
                tag: t.to_owned(),
                children: Vec::new(),
            }
        ),
        outcome(),
    ]
}

/// A case with outcomes and ignored elements among its children.
fn case(inner: impl Strategy<Value = Node> + Clone) -> impl Strategy<Value = Node> {
    (
        name(),
        prop_oneof![Just(String::new()), name()],
        prop_oneof![
            "[0-9]{1,4}\\.[0-9]{1,3}",
            Just("nan".to_owned()),
            Just("-1".to_owned()),
            Just("1e400".to_owned())
        ],
        proptest::collection::vec(prop_oneof![3 => outcome(), 1 => inner], 0..4),
    )
        .prop_map(|(name, classname, time, children)| Node::Case {
            name,
            classname,
            time,
            children,
        })
}

/// A suite's children: cases, nested suites, ignored elements (which may
/// hold anything, cases included, all ignored), text.
fn node() -> impl Strategy<Value = Node> {
    leaf().prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            3 => case(inner.clone()),
            1 => proptest::collection::vec(inner.clone(), 0..6)
                .prop_map(|children| Node::Suite { plural: false, children }),
            1 => (
                proptest::sample::select(vec!["properties", "system-out", "rerunFailure", "y"]),
                proptest::collection::vec(inner, 0..4),
            )
                .prop_map(|(tag, children)| Node::Other { tag: tag.to_owned(), children }),
        ]
    })
}

/// A whole document: the root, optionally wrapped deep, with prolog bits.
fn document() -> impl Strategy<Value = (Node, bool, String)> {
    (
        any::<bool>(),
        proptest::collection::vec(node(), 0..6),
        prop_oneof![6 => Just(0usize), 1 => 1usize..=MAX_DEPTH + 4],
        any::<bool>(),
        proptest::sample::select(vec![
            "",
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
            "\u{feff}<?xml version=\"1.0\"?>",
            "<!-- generated -->\n",
            "<?xml version=\"1.0\"?><?pi data?>\n  ",
        ]),
    )
        .prop_map(|(plural, mut children, wrap, refs, prolog)| {
            // A suite nested `wrap` deep, to cross MAX_DEPTH now and then.
            if wrap > 0 {
                let mut inner = Node::Suite {
                    plural: false,
                    children: vec![Node::Case {
                        name: "deep".into(),
                        classname: String::new(),
                        time: "1".into(),
                        children: Vec::new(),
                    }],
                };
                for _ in 1..wrap {
                    inner = Node::Suite {
                        plural: false,
                        children: vec![inner],
                    };
                }
                children.push(inner);
            }
            let root = Node::Suite { plural, children };
            (root, refs, prolog.to_owned())
        })
}

fn status_of(case: &TestCase) -> Option<TestStatus> {
    TestStatus::try_from(case.status).ok()
}

/// The limits every outcome respects, whatever the input.
fn check_limits(
    xml: &[u8],
    result: &Result<Vec<TestCase>, JunitError>,
) -> Result<(), TestCaseError> {
    match result {
        Ok(cases) => {
            prop_assert!(cases.len() <= MAX_CASES);
            for c in cases {
                prop_assert!(
                    c.name.len() <= MAX_NAME_BYTES,
                    "name of {} bytes",
                    c.name.len()
                );
                prop_assert!(
                    c.message.len() <= MAX_MESSAGE_BYTES,
                    "message of {} bytes",
                    c.message.len()
                );
                prop_assert!(
                    matches!(
                        status_of(c),
                        Some(
                            TestStatus::Passed
                                | TestStatus::Failed
                                | TestStatus::Error
                                | TestStatus::Skipped
                        )
                    ),
                    "status {}",
                    c.status
                );
            }
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("fuzz.xml: "), "{}", msg);
            prop_assert!(msg.len() > "fuzz.xml: ".len());
            prop_assert!(
                msg.len() <= "fuzz.xml: ".len() + MAX_ERROR_BYTES,
                "an error line of {} bytes: {}…",
                msg.len(),
                keep(&msg, 300)
            );
            let at = match &e.kind {
                JunitErrorKind::Malformed { at, .. }
                | JunitErrorKind::Doctype { at }
                | JunitErrorKind::TooDeep { at }
                | JunitErrorKind::TooManyCases { at }
                | JunitErrorKind::MissingName { at } => Some(at),
                JunitErrorKind::Empty | JunitErrorKind::NotJunit { .. } => None,
            };
            if let Some(at) = at {
                prop_assert!(at.byte <= xml.len() as u64, "{} past the end", at);
                let lines = xml.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
                prop_assert!((1..=lines).contains(&at.line), "{}", at);
            }
        }
    }
    Ok(())
}

/// Checks `parse` and `parse_reports` (complete and flagged truncated) on
/// `xml`.
fn check_any(xml: &[u8]) -> Result<(), TestCaseError> {
    let result = parse("fuzz.xml", xml);
    check_limits(xml, &result)?;
    for truncated in [false, true] {
        let report = parse_reports(&[ReportFileRecord {
            path: "fuzz.xml".into(),
            data: xml.to_vec(),
            truncated,
            error: String::new(),
        }]);
        prop_assert!(report.errors.len() <= 1);
        if !truncated {
            prop_assert_eq!(report.errors.is_empty(), result.is_ok());
        }
        if truncated || result.is_ok() {
            // A truncated file keeps the cases before the cut; those of a
            // good file are all of them.
            check_limits(xml, &Ok(report.cases))?;
        }
    }
    Ok(())
}

/// A hostile edit of a document's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    DropRange(usize, usize),
    RepeatRange(usize, usize, usize),
    Insert(usize, Vec<u8>),
}

/// Snippets that attack a parser: DTDs and entity bombs, unknown and
/// out-of-range references, markup cut or stray, odd encodings, nesting.
fn snippet() -> impl Strategy<Value = Vec<u8>> {
    let fixed: Vec<&'static [u8]> = vec![
        b"<!DOCTYPE x [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;\">]>",
        b"<!DOCTYPE testsuite SYSTEM \"file:///etc/passwd\">",
        b"<!ENTITY e SYSTEM \"http://example.org/\">",
        b"&a;",
        b"&lol9;",
        b"&#0;",
        b"&#x110000;",
        b"&#xD800;",
        b"&#99999999999999999999;",
        b"&#x;",
        b"&amp",
        b"&",
        b"]]>",
        b"<![CDATA[",
        b"<!--",
        b"-->",
        b"<?xml version=\"1.0\" encoding=\"UTF-16\"?>",
        b"<?",
        b"</testsuite>",
        b"</testcase>",
        b"<testcase name=\"injected\"/>",
        b"<testcase/>",
        b"<testcase name=\"a\" name=\"b\"/>",
        b"<failure message=\"x\"/>",
        b"<skipped/>",
        b"<testsuite>",
        b"<x:testcase xmlns:x=\"urn:x\" name=\"ns\"/>",
        b"\xef\xbb\xbf",
        b"\xff\xfe",
        b"\x00",
        b"\xc3",
        b"\xed\xa0\x80",
        b"\r\n",
        b"<a b=c>",
        b"<a b='>",
        b"=\"\"",
    ];
    prop_oneof![
        6 => proptest::sample::select(fixed).prop_map(<[u8]>::to_vec),
        1 => proptest::collection::vec(any::<u8>(), 1..16),
        1 => (1usize..5_000, proptest::sample::select(vec!["a", "testsuite", "failure"]))
            .prop_map(|(n, tag)| format!("<{tag}>").repeat(n).into_bytes()),
        1 => (1usize..200_000).prop_map(|n| format!("<a v=\"{}\"/>", "v".repeat(n)).into_bytes()),
        1 => (1usize..2_000).prop_map(|n| format!("</{}>", "x".repeat(n)).into_bytes()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = any::<usize>;
    prop_oneof![
        2 => (i(), any::<u8>()).prop_map(|(at, b)| Mutation::Flip(at, b)),
        1 => i().prop_map(Mutation::Truncate),
        1 => (i(), 0usize..64).prop_map(|(at, n)| Mutation::DropRange(at, n)),
        1 => (i(), 1usize..64, 1usize..50).prop_map(|(at, n, k)| Mutation::RepeatRange(at, n, k)),
        3 => (i(), snippet()).prop_map(|(at, s)| Mutation::Insert(at, s)),
    ]
}

fn apply(xml: &mut Vec<u8>, m: &Mutation) {
    let len = xml.len();
    let at = |i: usize| i % (len + 1);
    match m {
        Mutation::Flip(i, b) => {
            if len > 0 {
                xml[i % len] = *b;
            }
        }
        Mutation::Truncate(i) => xml.truncate(at(*i)),
        Mutation::DropRange(i, n) => {
            let start = at(*i);
            let end = start.saturating_add(*n).min(len);
            xml.drain(start..end);
        }
        Mutation::RepeatRange(i, n, k) => {
            let start = at(*i);
            let end = start.saturating_add(*n).min(len);
            let piece = xml[start..end].to_vec();
            for _ in 0..*k {
                xml.splice(end..end, piece.iter().copied());
            }
        }
        Mutation::Insert(i, s) => {
            let at = at(*i);
            xml.splice(at..at, s.iter().copied());
        }
    }
}

proptest! {
    // About 2 s for the three in a debug build on two cores (3-4 s when busy).
    #![proptest_config(proptest_config(2000))]

    #[test]
    fn fuzz_generated_documents_parse_exactly(
        (root, refs, prolog) in document(),
        cuts in proptest::collection::vec(any::<usize>(), 4),
    ) {
        let mut xml = prolog;
        render(&root, &mut xml, refs);
        let mut want = Vec::new();
        if let Node::Suite { children, .. } = &root {
            expected(children, &mut want);
        }
        let result = parse("fuzz.xml", xml.as_bytes());
        check_limits(xml.as_bytes(), &result)?;
        let full = if depth(&root) > MAX_DEPTH {
            prop_assert!(
                matches!(&result, Err(JunitError { kind: JunitErrorKind::TooDeep { .. }, .. })),
                "depth {} not refused: {:?}",
                depth(&root),
                result.as_ref().map(Vec::len)
            );
            return Ok(());
        } else {
            let cases = result
                .map_err(|e| TestCaseError::fail(format!("{e}\n{}", keep(&xml, 2_000))))?;
            let got: Vec<(String, TestStatus)> = cases
                .iter()
                .map(|c| (c.name.clone(), status_of(c).unwrap_or(TestStatus::Unspecified)))
                .collect();
            prop_assert_eq!(&got, &want);
            cases
        };
        // Cut anywhere and flagged truncated: a prefix of the cases, one
        // line that reads as a cut.
        for cut in cuts {
            let cut = cut % (xml.len() + 1);
            let report = parse_reports(&[ReportFileRecord {
                path: "fuzz.xml".into(),
                data: xml.as_bytes()[..cut].to_vec(),
                truncated: true,
                error: String::new(),
            }]);
            prop_assert_eq!(report.errors.len(), 1);
            prop_assert!(
                !report.errors[0].contains("(also:"),
                "cut at {} reads as broken: {}\n{}",
                cut,
                report.errors[0],
                keep(&String::from_utf8_lossy(&xml.as_bytes()[..cut]), 2_000)
            );
            prop_assert!(report.cases.len() <= full.len());
            prop_assert_eq!(&report.cases[..], &full[..report.cases.len()]);
        }
    }

    #[test]
    fn fuzz_mutated_documents(
        (root, refs, prolog) in document(),
        mutations in proptest::collection::vec(mutation(), 1..5),
    ) {
        let mut xml = prolog;
        render(&root, &mut xml, refs);
        let mut xml = xml.into_bytes();
        for m in &mutations {
            apply(&mut xml, m);
        }
        check_any(&xml)?;
    }

    #[test]
    fn fuzz_arbitrary_bytes(
        xml in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            proptest::collection::vec(snippet(), 0..24).prop_map(|parts| parts.concat()),
            any::<String>().prop_map(String::into_bytes),
        ],
    ) {
        check_any(&xml)?;
    }
}
