//! A run's output, read for what it says: a project's `fail_pattern` /
//! `pass_pattern` (regular expressions over the job's stored log, for suites
//! whose exit code lies), and the lines of a log a mail quotes — around the
//! first matches of the fail pattern or of common failure markers, rather
//! than a blind tail.
//!
//! Intake judges a run with [`judge`]; the notifier quotes with [`excerpt`].
//! Both read the same log ([`log_text`]), bounded by the output caps.

use std::fmt;
use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::logs::{JobLogs, LogsError};

/// The compiled size a pattern may reach (a hostile or careless pattern
/// must not cost the hub megabytes per project).
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// Bytes of a matching line quoted in a run's detail.
const QUOTED_LINE_BYTES: usize = 200;

/// Lines quoted before a match in an [`excerpt`].
const BEFORE: usize = 3;

/// Lines quoted after a match in an [`excerpt`].
const AFTER: usize = 6;

/// Separate matches an [`excerpt`] quotes at most.
const MATCHES: usize = 3;

/// Failure markers common to test runners, looked for when a project has no
/// `fail_pattern` (pytest's `FAILED`/`Error`, unittest's `FAIL:`, Python's
/// `Traceback`, Rust's `panicked`, C/TAP's `assert`/`not ok`, …).
static MARKERS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"FAIL|Error|ERROR|Traceback|panicked|[Aa]ssert|^not ok\b|\[fail\]")
        .unwrap_or_else(|e| unreachable!("the marker pattern is valid: {e}"))
});

/// A regular expression over a run's output (`[[project]] fail_pattern` /
/// `pass_pattern`): `^` and `$` match at line ends; checked when the config
/// is read.
#[derive(Clone)]
pub(crate) struct Pattern(Regex);

impl Pattern {
    /// Compiles `text`, or says what is wrong with it.
    pub(crate) fn new(text: &str) -> Result<Pattern, String> {
        RegexBuilder::new(text)
            .multi_line(true)
            .size_limit(PATTERN_SIZE_LIMIT)
            .build()
            .map(Pattern)
            .map_err(|e| {
                format!(
                    "{text:?} is not a regular expression ({e}); expected e.g. '\\[fail\\]' (single quotes in TOML keep the backslashes)"
                )
            })
    }

    /// The pattern as written.
    pub(crate) fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The first line of `text` it matches: (1-based line number, line).
    fn first_line<'t>(&self, text: &'t str) -> Option<(usize, &'t str)> {
        let m = self.0.find(text)?;
        let start = text[..m.start()].rfind('\n').map_or(0, |i| i + 1);
        let end = text[m.start()..]
            .find('\n')
            .map_or(text.len(), |i| m.start() + i);
        let number = text[..start].matches('\n').count() + 1;
        Some((number, &text[start..end]))
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.as_str())
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Pattern {}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Pattern, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Pattern;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a regular expression such as '\\[fail\\]'")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Pattern, E> {
                Pattern::new(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Why a run whose exit code said it passed is red by its output, if it is:
/// `fail` matches somewhere, or `pass` is given and matches nowhere. The
/// words name the pattern that decided (and the line it matched), for the
/// run's detail.
pub(crate) fn judge(log: &str, fail: Option<&Pattern>, pass: Option<&Pattern>) -> Option<String> {
    if let Some(fail) = fail
        && let Some((number, line)) = fail.first_line(log)
    {
        return Some(format!(
            "red by fail_pattern '{}', which matched line {number}: {:?}",
            fail.as_str(),
            cut(line.trim_end(), QUOTED_LINE_BYTES)
        ));
    }
    if let Some(pass) = pass
        && pass.first_line(log).is_none()
    {
        return Some(format!(
            "red by pass_pattern '{}', which matched nothing in the output",
            pass.as_str()
        ));
    }
    None
}

/// The lines of `log` around the first matches of `fail` (or, without it
/// or when it matches nothing, of common failure markers), at most
/// `max_lines` in all, windows that touch merged and gaps shown as `...`;
/// `None` when nothing matches (quote a tail instead).
pub(crate) fn excerpt(log: &str, fail: Option<&Pattern>, max_lines: usize) -> Option<String> {
    let lines: Vec<&str> = log.lines().collect();
    let hits = |re: &Regex| -> Vec<usize> {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| re.is_match(l))
            .map(|(i, _)| i)
            .collect()
    };
    let mut matched = fail.map(|p| hits(&p.0)).unwrap_or_default();
    if matched.is_empty() {
        matched = hits(&MARKERS);
    }
    if matched.is_empty() || max_lines == 0 {
        return None;
    }
    // Windows around the first matches, merged where they touch.
    let mut windows: Vec<(usize, usize)> = Vec::new();
    for &i in &matched {
        let (from, to) = (i.saturating_sub(BEFORE), (i + AFTER).min(lines.len() - 1));
        let full = windows.len() >= MATCHES;
        match windows.last_mut() {
            Some(last) if from <= last.1 + 1 => last.1 = last.1.max(to),
            _ if full => break,
            _ => windows.push((from, to)),
        }
    }
    let mut out = Vec::new();
    for (n, (from, to)) in windows.into_iter().enumerate() {
        if n > 0 || from > 0 {
            out.push("...");
        }
        for line in &lines[from..=to] {
            out.push(line);
        }
    }
    if out.len() > max_lines {
        out.truncate(max_lines);
    }
    Some(out.join("\n"))
}

/// A job's log as text, every stream in the order it was written; only
/// `attempt`'s if given. A compacted log is read from the object store,
/// blocking this thread meanwhile (its callers are synchronous).
pub(crate) fn log_text(
    logs: &JobLogs,
    job_id: u64,
    attempt: Option<u32>,
) -> Result<String, LogsError> {
    text_of(logs.read_blocking(job_id, attempt)?)
}

/// [`log_text`], waiting for the object store at most `limit` (a caller
/// that holds a lock).
pub(crate) fn log_text_within(
    logs: &JobLogs,
    job_id: u64,
    attempt: Option<u32>,
    limit: std::time::Duration,
) -> Result<String, LogsError> {
    text_of(logs.read_blocking_within(job_id, attempt, limit)?)
}

/// The chunks' bytes as text.
fn text_of(chunks: Vec<trunkfarm_proto::v1::LogChunk>) -> Result<String, LogsError> {
    let mut bytes = Vec::new();
    for chunk in chunks {
        bytes.extend_from_slice(&chunk.data);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `s` cut to at most `max` bytes, on a char boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(p: &str) -> Pattern {
        Pattern::new(p).unwrap()
    }

    #[test]
    fn a_fail_pattern_that_matches_makes_a_run_red_and_says_where() {
        let log = "collecting\n[ok] test_a\n[fail] test_b: expected 2\n[ok] test_c\n";
        let why = judge(log, Some(&pattern(r"\[fail\]")), None).unwrap();
        assert_eq!(
            why,
            r#"red by fail_pattern '\[fail\]', which matched line 3: "[fail] test_b: expected 2""#
        );
        assert_eq!(judge(log, Some(&pattern(r"\[error\]")), None), None);
        assert_eq!(judge(log, None, None), None);
    }

    #[test]
    fn a_pass_pattern_that_matches_nothing_makes_a_run_red() {
        let log = "3 passed\n";
        assert_eq!(judge(log, None, Some(&pattern(r"^\d+ passed$"))), None);
        let why = judge(
            "3 passed, 1 failed\n",
            None,
            Some(&pattern(r"^\d+ passed$")),
        )
        .unwrap();
        assert!(why.contains("pass_pattern '^\\d+ passed$'"), "{why}");
        // A fail pattern that matches decides first.
        let why = judge(
            "FAIL x\n3 passed\n",
            Some(&pattern("FAIL")),
            Some(&pattern("passed")),
        );
        assert!(why.unwrap().starts_with("red by fail_pattern"));
    }

    #[test]
    fn a_bad_pattern_says_what_is_wrong() {
        let e = Pattern::new("[fail").unwrap_err();
        assert!(e.contains("\"[fail\" is not a regular expression"), "{e}");
        assert!(e.contains("e.g. '\\[fail\\]'"), "{e}");
    }

    #[test]
    fn an_excerpt_quotes_the_lines_around_the_first_failures() {
        let mut log: Vec<String> = (1..=100).map(|i| format!("Starting test {i}")).collect();
        log[9] = "[fail] test_10: boom".into();
        log[79] = "[fail] test_80: bang".into();
        let log = log.join("\n");
        let quoted = excerpt(&log, Some(&pattern(r"\[fail\]")), 40).unwrap();
        let lines: Vec<&str> = quoted.lines().collect();
        assert_eq!(lines[0], "...");
        assert_eq!(lines[1], "Starting test 7");
        assert_eq!(lines[4], "[fail] test_10: boom");
        assert!(quoted.contains("[fail] test_80: bang"), "{quoted}");
        assert!(!quoted.contains("Starting test 50\n"), "{quoted}");
        assert!(!quoted.contains("Starting test 100"), "not a blind tail");
        // Without a fail pattern, common markers.
        let log = "a\nb\nthread 'main' panicked at src/lib.rs:3\nc\n";
        let quoted = excerpt(log, None, 40).unwrap();
        assert!(
            quoted.starts_with("a\nb\nthread 'main' panicked"),
            "{quoted}"
        );
        assert_eq!(excerpt("all good\n", None, 40), None);
        // Bounded.
        assert_eq!(
            excerpt(&"FAIL\n".repeat(100), None, 5)
                .unwrap()
                .lines()
                .count(),
            5
        );
    }
}
