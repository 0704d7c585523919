//! Strict TOML settings shared by the hub's `hub.toml` and the agent's
//! `agent.toml`: errors that name the file, the line and the full dotted key,
//! and human-readable durations and sizes.
//!
//! Each binary keeps its own settings structs and its own semantic rules; this
//! module only turns text into those structs ([`document`], [`deserialize`])
//! and places errors in the file ([`ConfigError`], [`Problem`], [`key_line`]).
//! The `deserialize_with` helpers in [`de`] read the units: durations written
//! as human strings (`"90s"`, `"10m"`, `"1h 30m"`), byte sizes as human
//! strings (`"4 MiB"`, `"512 KiB"`) or a bare integer number of bytes.
//!
//! The wording of every message is user-facing and documented; both binaries'
//! tests assert on it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

/// What went wrong loading a configuration. Every message names the file (or
/// `<inline config>` for text that came from no file, or the command line for
/// an override) and, for a bad key, the full dotted key and the line when TOML
/// reports one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read: missing (when it must exist), unreadable,
    /// not UTF-8.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file we tried to read.
        path: PathBuf,
        /// Why reading failed.
        error: std::io::Error,
    },
    /// The text is not valid TOML.
    #[error("{}: TOML syntax error: {message}", at(.file, *.line))]
    Syntax {
        /// The file, if the text came from one.
        file: Option<PathBuf>,
        /// 1-based line of the error, when TOML reports one.
        line: Option<usize>,
        /// TOML's description of the problem.
        message: String,
    },
    /// A key this version does not know (usually a typo, or a setting from
    /// another version).
    #[error("{}: unknown key `{key}`, {expected}", at(.file, *.line))]
    UnknownKey {
        /// The file, if the text came from one.
        file: Option<PathBuf>,
        /// 1-based line of the key, when TOML reports one.
        line: Option<usize>,
        /// The full dotted key, e.g. `dispatch.lease_timout`.
        key: String,
        /// The keys allowed at that place, e.g. "expected one of `a`, `b`".
        expected: String,
    },
    /// A value of the wrong type or format, e.g. `"90 parsecs"` for a duration.
    #[error("{}: invalid value for `{key}`: {message}", at(.file, *.line))]
    BadValue {
        /// The file, if the text came from one.
        file: Option<PathBuf>,
        /// 1-based line of the value, when TOML reports one.
        line: Option<usize>,
        /// The full dotted key.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// Values that parse but make no sense, alone or together.
    #[error("{}: invalid `{key}`: {message}", at(.file, *.line))]
    Invalid {
        /// The file, if the configuration came from one.
        file: Option<PathBuf>,
        /// 1-based line of the key, when it is written in the file.
        line: Option<usize>,
        /// The full dotted key at fault.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A command-line override that makes no sense.
    #[error("invalid `{key}` from the command line: {message}")]
    Override {
        /// The setting the option overrides.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ConfigError {
    /// The full dotted key the error is about, if it is about one; lets callers
    /// (and tests) react to a specific setting without parsing the message.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::UnknownKey { key, .. }
            | Self::BadValue { key, .. }
            | Self::Invalid { key, .. }
            | Self::Override { key, .. } => Some(key),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// The 1-based line the error points at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Syntax { line, .. }
            | Self::UnknownKey { line, .. }
            | Self::BadValue { line, .. }
            | Self::Invalid { line, .. } => *line,
            Self::Read { .. } | Self::Override { .. } => None,
        }
    }
}

/// Renders the "where" prefix of a message: `file:line`, `file`, or a stand-in
/// for configuration text that came from no file.
fn at(file: &Option<PathBuf>, line: Option<usize>) -> String {
    let mut out = match file {
        Some(path) => path.display().to_string(),
        None => "<inline config>".to_owned(),
    };
    if let Some(line) = line {
        let _ = write!(out, ":{line}");
    }
    out
}

/// One broken semantic rule, before it is placed in a file (or blamed on the
/// command line).
#[derive(Debug)]
pub struct Problem {
    /// The full dotted key at fault; an entry of an array of tables is
    /// written `name[index]`, e.g. `project[2].timeout`.
    pub key: std::borrow::Cow<'static, str>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl Problem {
    /// A broken rule about `key`.
    pub fn new(key: impl Into<std::borrow::Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The error for this problem in `text` (parsed as `doc`), pointing at the
    /// line where the key is written, if it is.
    pub fn into_error(self, file: &Option<PathBuf>, text: &str, doc: &Document<'_>) -> ConfigError {
        ConfigError::Invalid {
            file: file.clone(),
            line: key_line(text, doc, &self.key),
            key: self.key.into_owned(),
            message: self.message,
        }
    }
}

/// The rules every configured path follows: not empty, and no `~` (which
/// nothing here expands).
pub fn check_path(key: &'static str, path: &Path) -> Result<(), Problem> {
    if path.as_os_str().is_empty() {
        return Err(Problem::new(key, "must not be empty; give a path"));
    }
    if path.starts_with("~") {
        return Err(Problem::new(
            key,
            format!(
                "{} starts with `~`, which is not expanded here; write the full path",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A duration as messages show it, as people write it: `1m 20s`, `90d`,
/// `2d 3h`. Whole days stay days: humantime alone would print 90 days as
/// `2months 29days 2h 52m 48s` (its month is 30.44 days).
pub fn fmt_duration(d: Duration) -> String {
    const DAY: u64 = 86_400;
    let days = d.as_secs() / DAY;
    if days == 0 {
        return humantime::format_duration(d).to_string();
    }
    let rest = d - Duration::from_secs(days * DAY);
    if rest.is_zero() {
        format!("{days}d")
    } else {
        format!("{days}d {}", humantime::format_duration(rest))
    }
}

/// A byte count as messages show it, e.g. `32.0 KiB`.
pub fn fmt_bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// The parsed document with spans, kept to find a key's line for semantic
/// errors.
pub type Document<'i> = toml::Spanned<DeTable<'i>>;

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parses `text` as TOML, keeping spans; a syntax error names `file` and the
/// line.
pub fn document<'i>(text: &'i str, file: &Option<PathBuf>) -> Result<Document<'i>, ConfigError> {
    DeTable::parse(text).map_err(|e| ConfigError::Syntax {
        file: file.clone(),
        line: e.span().map(|s| line_of(text, s.start)),
        message: e.message().trim_end().to_owned(),
    })
}

/// Deserializes the parsed `doc` of `text` into `T`; an unknown key or a bad
/// value names `file`, the full dotted key and the line.
pub fn deserialize<T: DeserializeOwned>(
    text: &str,
    doc: &Document<'_>,
    file: &Option<PathBuf>,
) -> Result<T, ConfigError> {
    let de = toml::Deserializer::from(doc.clone());
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.span().map(|s| line_of(text, s.start));
        let message = inner.message().trim_end().to_owned();
        classify(file.clone(), line, key, message)
    })
}

/// Sorts a deserialization error into an unknown key or a bad value, and
/// rewrites serde's wording ("unknown field") into the config's ("key").
fn classify(
    file: Option<PathBuf>,
    line: Option<usize>,
    key: String,
    message: String,
) -> ConfigError {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((_name, expected)) = rest.split_once("`, ")
    {
        let expected = if expected == "there are no fields" {
            "this table takes no keys".to_owned()
        } else {
            expected.to_owned()
        };
        return ConfigError::UnknownKey {
            file,
            line,
            key,
            expected,
        };
    }
    let key = if key == "." {
        "(top level)".to_owned()
    } else {
        key
    };
    ConfigError::BadValue {
        file,
        line,
        key,
        message,
    }
}

/// The line where the dotted `key` is written, if it is. A part written
/// `name[index]` steps into an array (of tables) by position.
pub fn key_line(text: &str, doc: &Document<'_>, key: &str) -> Option<usize> {
    let mut table = doc.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, index) = match part.strip_suffix(']').and_then(|p| p.split_once('[')) {
            Some((name, index)) => (name, Some(index.parse::<usize>().ok()?)),
            None => (part, None),
        };
        let (k, mut v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
        if let Some(index) = index {
            match v.get_ref() {
                DeValue::Array(items) => v = items.get(index)?,
                _ => return None,
            }
        }
        if parts.peek().is_none() {
            let span = if index.is_some() { v.span() } else { k.span() };
            return Some(line_of(text, span.start));
        }
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            _ => return None,
        }
    }
    None
}

/// `deserialize_with` helpers for human-readable units.
pub mod de {
    use std::fmt;
    use std::time::Duration;

    use serde::Deserializer;
    use serde::de::{self, Visitor};

    const DURATION: &str = "a duration such as \"90s\", \"10m\" or \"1h 30m\"";
    const BYTES: &str = "a size such as \"4 MiB\", \"512 KiB\" or a whole number of bytes";
    const COUNT: &str = "a whole number such as 3";

    /// A duration written as a human string: `"90s"`, `"10m"`, `"1h 30m"`.
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(DURATION)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v.trim()).map_err(|e| {
                    E::custom(format_args!(
                        "{v:?} is not a duration ({e}); expected {DURATION}"
                    ))
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(E::custom(format_args!(
                    "a bare number ({v}) has no unit; write it as a string with a unit, e.g. \"{v}s\" (expected {DURATION})"
                )))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Err(E::custom(format_args!(
                    "a bare number ({v}) has no unit; expected {DURATION}"
                )))
            }
        }
        d.deserialize_any(V)
    }

    /// [`duration`] for a setting that may be left out.
    pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        duration(d).map(Some)
    }

    /// A byte count written as a human string (`"4 MiB"`, `"512 KiB"`,
    /// `"2MB"`) or a bare integer number of bytes.
    pub fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(BYTES)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                let t = v.trim();
                let starts_ok = t.starts_with(|c: char| c.is_ascii_digit());
                match t.parse::<bytesize::ByteSize>() {
                    Ok(b) if starts_ok && b.as_u64() != u64::MAX => Ok(b.as_u64()),
                    _ => Err(E::custom(format_args!(
                        "{v:?} is not a byte size; expected {BYTES} (units: B, KiB, MiB, GiB, or KB, MB, GB for powers of 1000)"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format_args!("{v} is negative; expected {BYTES}")))
            }
        }
        d.deserialize_any(V)
    }

    /// An optional [`count`] (the key may be left out).
    pub fn opt_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        count(d).map(Some)
    }

    /// A non-negative whole number that fits a `u32`.
    pub fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u32;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(COUNT)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
                u32::try_from(v)
                    .map_err(|_| E::custom(format_args!("{v} is out of range; expected {COUNT}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_people_write_them() {
        let d = |s: &str| humantime::parse_duration(s).unwrap();
        assert_eq!(fmt_duration(d("90d")), "90d");
        assert_eq!(fmt_duration(d("1d")), "1d");
        assert_eq!(fmt_duration(d("2d 3h")), "2d 3h");
        assert_eq!(fmt_duration(d("1h 30m")), "1h 30m");
        assert_eq!(fmt_duration(d("45s")), "45s");
        // What it prints parses back to the same duration.
        for text in ["90d", "400d 1m", "7d 12h 30m 5s"] {
            assert_eq!(d(&fmt_duration(d(text))), d(text));
        }
    }

    #[test]
    fn line_of_counts_newlines_before_the_offset() {
        let text = "a = 1\nb = 2\n\nc = 3";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 6), 2);
        assert_eq!(line_of(text, text.find('c').unwrap()), 4);
        assert_eq!(line_of(text, 999), 4);
    }

    #[test]
    fn key_line_finds_nested_and_missing_keys() {
        let text = "# c\n[a]\nx = 1\n\n[b]\ny = { z = 2 }\n";
        let doc = document(text, &None).unwrap();
        assert_eq!(key_line(text, &doc, "a"), Some(2));
        assert_eq!(key_line(text, &doc, "a.x"), Some(3));
        assert_eq!(key_line(text, &doc, "b.y.z"), Some(6));
        assert_eq!(key_line(text, &doc, "a.nope"), None);
        assert_eq!(key_line(text, &doc, "a.x.deeper"), None);
    }

    #[test]
    fn messages_name_the_place() {
        let e = ConfigError::Invalid {
            file: Some("/etc/f.toml".into()),
            line: None,
            key: "k".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "/etc/f.toml: invalid `k`: bad");
        assert_eq!((e.key(), e.line()), (Some("k"), None));
        let e = ConfigError::Override {
            key: "k".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "invalid `k` from the command line: bad");
        assert_eq!((e.key(), e.line()), (Some("k"), None));
        let e = document("x = \n", &None).unwrap_err();
        assert_eq!((e.key(), e.line()), (None, Some(1)));
        assert!(
            e.to_string()
                .starts_with("<inline config>:1: TOML syntax error: ")
        );
    }

    #[test]
    fn units() {
        assert_eq!(fmt_duration(Duration::from_secs(80)), "1m 20s");
        assert_eq!(fmt_bytes(32 * 1024), "32.0 KiB");
        assert_eq!(fmt_bytes(100), "100 B");
    }
}
