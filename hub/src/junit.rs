//! JUnit XML reports: the files a downstream project's test run writes
//! (pytest, Maven surefire, Ant, jest-junit, go-junit-report, ...), as sent by
//! the agent in `JobResult.reports`, turned into per-test outcomes.
//!
//! The input is hostile by assumption: it comes from whatever a project's test
//! suite wrote. The parser never panics, refuses DOCTYPEs (so no entity
//! declarations and no expansion bombs), treats unknown entities as errors,
//! and bounds the nesting depth, the number of test cases and the length of
//! every string it keeps.
//!
//! Accepted shapes: a `<testsuites>` root holding `<testsuite>`s (which may
//! nest), or a bare `<testsuite>` root. Every `<testcase>` under the suites
//! becomes one [`TestCase`]; elements the parser does not know about
//! (`<properties>`, `<system-out>`, surefire's `<flakyFailure>`, ...) are
//! checked for well-formedness and otherwise ignored.

use std::borrow::Cow;
use std::fmt;

use quick_xml::Reader;
use quick_xml::escape::EscapeError;
use quick_xml::events::attributes::AttrError;
use quick_xml::events::{BytesRef, BytesStart, Event};
use trunkfarm_proto::v1::{TestCase, TestStatus};

use crate::dispatch::ReportFileRecord;

/// Test cases one file may hold; beyond it the file is refused.
pub(crate) const MAX_CASES: usize = 100_000;
/// Element nesting the parser accepts (the root is depth 1).
pub(crate) const MAX_DEPTH: usize = 64;
/// Bytes kept of a test case's name.
pub(crate) const MAX_NAME_BYTES: usize = 500;
/// Bytes kept of a failure's message.
pub(crate) const MAX_MESSAGE_BYTES: usize = 300;
/// Bytes of a failure's text read for its message (a trace's first lines).
const MAX_TEXT_BYTES: usize = 4096;
/// Bytes of an unexpected root element's name quoted in an error.
const MAX_QUOTED_BYTES: usize = 100;
/// Bytes kept of the description of malformed XML: quick-xml's messages
/// quote names from the input (a mismatched end tag's, whole), and the
/// error line is kept and mailed.
const MAX_DETAIL_BYTES: usize = 300;

/// What a set of JUnit files says.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Report {
    /// Cases from every usable file, in file order then document order.
    pub(crate) cases: Vec<TestCase>,
    /// One human-readable line per file that could not be used (fully).
    pub(crate) errors: Vec<String>,
}

/// Where in a file something went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    /// Byte offset from the start of the file.
    pub(crate) byte: u64,
    /// 1-based line number.
    pub(crate) line: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "byte {} (line {})", self.byte, self.line)
    }
}

/// Why a file is not a usable JUnit report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum JunitErrorKind {
    /// No bytes (or only whitespace).
    Empty,
    /// Not well-formed XML (including invalid UTF-8 and unknown entities).
    Malformed { at: Position, what: String },
    /// Well-formed so far, but the root is not a JUnit element.
    NotJunit { found: String },
    /// The file has a `<!DOCTYPE ...>`, which is refused.
    Doctype { at: Position },
    /// Elements nest deeper than [`MAX_DEPTH`].
    TooDeep { at: Position },
    /// More than [`MAX_CASES`] test cases.
    TooManyCases { at: Position },
    /// A `<testcase>` without a `name` attribute.
    MissingName { at: Position },
}

impl fmt::Display for JunitErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JunitErrorKind::Empty => write!(f, "empty file"),
            JunitErrorKind::Malformed { at, what } => {
                write!(f, "malformed XML at {at}: {what}")
            }
            JunitErrorKind::NotJunit { found } => write!(
                f,
                "not JUnit XML: expected <testsuites> or <testsuite> at the root, found {found}"
            ),
            JunitErrorKind::Doctype { at } => write!(
                f,
                "refused <!DOCTYPE> at {at}: DTDs and entity declarations are not accepted"
            ),
            JunitErrorKind::TooDeep { at } => {
                write!(f, "elements nested deeper than {MAX_DEPTH} levels at {at}")
            }
            JunitErrorKind::TooManyCases { at } => {
                write!(f, "too many test cases (more than {MAX_CASES}) at {at}")
            }
            JunitErrorKind::MissingName { at } => {
                write!(f, "<testcase> without a name attribute at {at}")
            }
        }
    }
}

/// A file that is not a usable JUnit report; displays as `path: what`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {kind}")]
#[cfg(test)]
pub(crate) struct JunitError {
    /// The file's path, as given to [`parse`].
    pub(crate) path: String,
    pub(crate) kind: JunitErrorKind,
}

/// Parses one file's bytes; `path` is only used in error messages.
#[cfg(test)]
pub(crate) fn parse(path: &str, xml: &[u8]) -> Result<Vec<TestCase>, JunitError> {
    let (cases, error) = parse_partial(xml);
    match error {
        None => Ok(cases),
        Some(kind) => Err(JunitError {
            path: path.to_owned(),
            kind,
        }),
    }
}

/// Parses every file, collecting cases from the good ones and one error line
/// per bad one: files the agent could not read (`error` set), malformed files
/// (whose cases are dropped), and truncated files (whose cases before the cut
/// are kept, but which are flagged). One bad file never hides the others.
pub(crate) fn parse_reports(files: &[ReportFileRecord]) -> Report {
    let mut report = Report::default();
    for file in files {
        let path = if file.path.is_empty() {
            "(unnamed report)"
        } else {
            file.path.as_str()
        };
        if !file.error.is_empty() {
            report
                .errors
                .push(format!("{path}: agent could not read it: {}", file.error));
            continue;
        }
        let (cases, error) = parse_partial(&file.data);
        if file.truncated {
            let n = cases.len();
            report.cases.extend(cases);
            let mut line = format!(
                "{path}: truncated by the agent after {} bytes; kept the {n} test case{} before the cut",
                file.data.len(),
                if n == 1 { "" } else { "s" },
            );
            // An error at the cut is expected; one before it is worth saying.
            if let Some(kind) = error.filter(|kind| !is_at_end(kind, file.data.len())) {
                line.push_str(&format!(" (also: {kind})"));
            }
            report.errors.push(line);
            continue;
        }
        match error {
            None => report.cases.extend(cases),
            Some(kind) => report.errors.push(format!("{path}: {kind}")),
        }
    }
    report
}

/// A test case's name and status (a `TestStatus` number), whichever type
/// holds it: the parser's [`TestCase`], or the record results store.
pub(crate) trait Case {
    /// "classname.name".
    fn name(&self) -> &str;
    /// A `TestStatus` number.
    fn status(&self) -> i32;
}

impl Case for TestCase {
    fn name(&self) -> &str {
        &self.name
    }

    fn status(&self) -> i32 {
        self.status
    }
}

/// The names of failing (failed or error) cases, sorted, deduplicated.
pub(crate) fn failing<C: Case>(cases: &[C]) -> Vec<String> {
    let mut names: Vec<String> = cases
        .iter()
        .filter(|case| {
            matches!(
                TestStatus::try_from(case.status()),
                Ok(TestStatus::Failed | TestStatus::Error)
            )
        })
        .map(|case| case.name().to_owned())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Whether an error sits at the very end of a `len`-byte input, as a cut file's
/// does (an unexpected end of file, or a character cut in half).
fn is_at_end(kind: &JunitErrorKind, len: usize) -> bool {
    match kind {
        JunitErrorKind::Malformed { at, what } => {
            what.starts_with(EOF_PREFIX) || what.starts_with(CUT_CHAR) || at.byte >= len as u64
        }
        JunitErrorKind::NotJunit { found } => found == NO_ROOT,
        JunitErrorKind::Empty => true,
        _ => false,
    }
}

const EOF_PREFIX: &str = "unexpected end of file";
const CUT_CHAR: &str = "incomplete UTF-8 sequence at the end";
const NO_ROOT: &str = "no element";
const BARE_AMP: &str = "`&` that does not start an entity or character reference (write `&amp;`)";

/// Parses as far as the input allows: the cases completed before the first
/// error, and that error.
fn parse_partial(xml: &[u8]) -> (Vec<TestCase>, Option<JunitErrorKind>) {
    let unmarked = xml.strip_prefix(b"\xef\xbb\xbf").unwrap_or(xml);
    if unmarked.iter().all(u8::is_ascii_whitespace) {
        return (Vec::new(), Some(JunitErrorKind::Empty));
    }
    if xml.starts_with(&[0xFF, 0xFE])
        || xml.starts_with(&[0xFE, 0xFF])
        || xml.starts_with(b"<\0")
        || xml.starts_with(b"\0<")
    {
        let at = position(xml, 0);
        let what = "UTF-16 is not supported; write the report as UTF-8".to_owned();
        return (Vec::new(), Some(JunitErrorKind::Malformed { at, what }));
    }
    // Parse the valid UTF-8 prefix; an invalid byte is reported once the
    // parser gets there (unless the document is broken before it).
    let (text, cut) = match std::str::from_utf8(xml) {
        Ok(text) => (text, None),
        Err(e) => {
            let valid = e.valid_up_to();
            let what = match e.error_len() {
                None => CUT_CHAR.to_owned(),
                Some(_) => format!("invalid UTF-8 (byte 0x{:02x})", xml[valid]),
            };
            let cut = JunitErrorKind::Malformed {
                at: position(xml, valid as u64),
                what,
            };
            (std::str::from_utf8(&xml[..valid]).unwrap_or(""), Some(cut))
        }
    };
    // quick-xml skips a byte order mark and counts positions after it;
    // the parser gets the text without it and adds it back to positions.
    let (bom, text) = match text.strip_prefix('\u{feff}') {
        Some(rest) => ('\u{feff}'.len_utf8(), rest),
        None => (0, text),
    };
    let mut parser = Parser::new(text, bom);
    let result = parser.run();
    let error = match (result, cut) {
        (Ok(()), None) => None,
        (Ok(()), Some(cut)) => Some(cut),
        (Err(kind), Some(cut)) if parser.stopped_at_end(&kind) => Some(cut),
        (Err(kind), _) => Some(kind),
    };
    (parser.cases, error)
}

/// 1-based line of byte `pos` in `xml`.
fn position(xml: &[u8], byte: u64) -> Position {
    let end = usize::try_from(byte).unwrap_or(usize::MAX).min(xml.len());
    let line = xml[..end].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    Position { byte, line }
}

/// What an open element is to the parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// `<testsuites>` or `<testsuite>`.
    Suite,
    /// The `<testcase>` being built.
    Case,
    /// `<failure>`, `<error>` or `<skipped>` of the current case; `collect`
    /// when its text is the case's message.
    Outcome { collect: bool },
    /// Anything else; checked for well-formedness, otherwise ignored.
    Other,
}

/// The `<testcase>` being read.
struct CaseBuilder {
    name: String,
    time_ms: u64,
    status: TestStatus,
    /// From the deciding failure/error's `message` attribute.
    message: Option<String>,
    /// The deciding failure/error's `type` attribute: some runners put the
    /// message there (busted-style `type="spec.lua:3: expected 2"`), most an
    /// exception class (`AssertionError`).
    kind: Option<String>,
    /// The deciding failure/error's text, trimmed at the start, its first
    /// [`MAX_TEXT_BYTES`] kept (where the message is looked for).
    text: String,
}

impl CaseBuilder {
    fn push_text(&mut self, chunk: &str) {
        if self.text.len() >= MAX_TEXT_BYTES {
            return;
        }
        let chunk = if self.text.is_empty() {
            chunk.trim_start()
        } else {
            chunk
        };
        let room = MAX_TEXT_BYTES - self.text.len();
        self.text.push_str(cut(chunk, room));
    }

    /// The case's message: the `message` attribute; else a `type` that reads
    /// as a message (it has a space: not a bare class name); else the
    /// element text's first line that says something (not a bare
    /// "stack traceback:" header); else a bare `type`.
    fn finish(self) -> TestCase {
        let is_message = |kind: &&String| kind.contains(char::is_whitespace);
        let message = match (self.message, self.kind) {
            (Some(message), _) => message,
            (None, Some(kind)) if is_message(&&kind) => kind,
            (None, kind) => {
                let lines = || self.text.lines().map(str::trim);
                // `ValueError` + a Python trace: its "ValueError: bad" line.
                let of_kind = kind.as_deref().and_then(|k| {
                    lines().find(|l| l.strip_prefix(k).is_some_and(|r| r.starts_with(':')))
                });
                let line = of_kind
                    .or_else(|| lines().find(|l| !l.is_empty() && !is_trace_header(l)))
                    .unwrap_or("");
                match (line, kind) {
                    ("", Some(kind)) => kind,
                    (line, _) => cut(line, MAX_MESSAGE_BYTES).to_owned(),
                }
            }
        };
        TestCase {
            name: self.name,
            status: self.status as i32,
            time_ms: self.time_ms,
            message,
        }
    }
}

/// An attribute: local name, unescaped value.
type Attr<'e> = (&'e [u8], Cow<'e, str>);

struct Parser<'a> {
    /// The text after the byte order mark, if there is one.
    input: &'a str,
    /// Bytes before `input` in the file (the byte order mark): added to
    /// every position so errors point into the file as written.
    offset: usize,
    reader: Reader<&'a [u8]>,
    stack: Vec<Frame>,
    case: Option<CaseBuilder>,
    cases: Vec<TestCase>,
    /// The root element was opened (and maybe closed).
    seen_root: bool,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str, offset: usize) -> Self {
        let mut reader = Reader::from_str(input);
        let config = reader.config_mut();
        config.check_end_names = true;
        config.allow_unmatched_ends = false;
        config.allow_dangling_amp = false;
        config.check_comments = false;
        config.expand_empty_elements = false;
        config.trim_text(false);
        Parser {
            input,
            offset,
            reader,
            stack: Vec::new(),
            case: None,
            cases: Vec::new(),
            seen_root: false,
        }
    }

    /// The position in the file of byte `byte` of `input`.
    fn at(&self, byte: u64) -> Position {
        let Position { byte, line } = position(self.input.as_bytes(), byte);
        Position {
            byte: byte.saturating_add(self.offset as u64),
            line,
        }
    }

    fn malformed(&self, byte: u64, what: impl Into<String>) -> JunitErrorKind {
        let mut what = what.into();
        if what.len() > MAX_DETAIL_BYTES {
            what = format!("{}…", cut(&what, MAX_DETAIL_BYTES));
        }
        JunitErrorKind::Malformed {
            at: self.at(byte),
            what,
        }
    }

    /// Whether `kind` came from running out of input rather than from
    /// something wrong before the end.
    fn stopped_at_end(&self, kind: &JunitErrorKind) -> bool {
        is_at_end(kind, self.offset + self.input.len())
    }

    fn run(&mut self) -> Result<(), JunitErrorKind> {
        loop {
            let start = self.reader.buffer_position();
            let event = match self.reader.read_event() {
                Ok(event) => event,
                Err(e) => {
                    let at = self.reader.error_position();
                    let rest = usize::try_from(at)
                        .ok()
                        .and_then(|at| self.input.get(at..))
                        .unwrap_or("");
                    return Err(self.malformed(at, describe(&e, rest)));
                }
            };
            match event {
                Event::Start(e) => self.open(&e, start, false)?,
                Event::Empty(e) => self.open(&e, start, true)?,
                Event::End(_) => self.close(),
                Event::Text(t) => {
                    let text = t
                        .decode()
                        .map_err(|e| self.malformed(start, e.to_string()))?;
                    self.text(&text, start)?;
                }
                Event::CData(t) => {
                    let text = t
                        .decode()
                        .map_err(|e| self.malformed(start, e.to_string()))?;
                    self.text(&text, start)?;
                }
                Event::GeneralRef(r) => {
                    let resolved = self.resolve(&r, start)?;
                    self.text(&resolved, start)?;
                }
                Event::DocType(_) => {
                    return Err(JunitErrorKind::Doctype { at: self.at(start) });
                }
                Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
                Event::Eof => return self.eof(),
            }
        }
    }

    fn eof(&self) -> Result<(), JunitErrorKind> {
        let end = self.input.len() as u64;
        if let Some(frame) = self.stack.last() {
            let inside = match frame {
                Frame::Suite => "a test suite",
                Frame::Case => "a <testcase>",
                Frame::Outcome { .. } => "a test case's outcome",
                Frame::Other => "an element",
            };
            let open = self.stack.len();
            return Err(self.malformed(
                end,
                format!(
                    "{EOF_PREFIX} inside {inside} ({open} element{} not closed)",
                    if open == 1 { "" } else { "s" }
                ),
            ));
        }
        if !self.seen_root {
            return Err(JunitErrorKind::NotJunit {
                found: NO_ROOT.to_owned(),
            });
        }
        Ok(())
    }

    fn open(&mut self, e: &BytesStart<'_>, start: u64, empty: bool) -> Result<(), JunitErrorKind> {
        let local = e.local_name();
        let name = local.as_ref();
        if self.stack.is_empty() {
            if self.seen_root {
                return Err(self.malformed(
                    start,
                    format!(
                        "a second root element <{}> after the document's root",
                        quote(e.name().as_ref())
                    ),
                ));
            }
            if name != b"testsuites" && name != b"testsuite" {
                return Err(JunitErrorKind::NotJunit {
                    found: format!("<{}>", quote(e.name().as_ref())),
                });
            }
        } else if self.stack.len() >= MAX_DEPTH {
            return Err(JunitErrorKind::TooDeep { at: self.at(start) });
        }
        // Every element's attributes are checked, known or not.
        let attrs = self.attributes(e, start)?;
        let frame = match self.stack.last().copied() {
            None => {
                self.seen_root = true;
                Frame::Suite
            }
            Some(Frame::Suite) => match name {
                b"testsuite" | b"testsuites" => Frame::Suite,
                b"testcase" => {
                    self.open_case(&attrs, start)?;
                    Frame::Case
                }
                _ => Frame::Other,
            },
            Some(Frame::Case) => match name {
                b"failure" => self.open_outcome(&attrs, TestStatus::Failed),
                b"error" => self.open_outcome(&attrs, TestStatus::Error),
                b"skipped" => self.open_outcome(&attrs, TestStatus::Skipped),
                _ => Frame::Other,
            },
            Some(Frame::Outcome { .. } | Frame::Other) => Frame::Other,
        };
        self.stack.push(frame);
        if empty {
            self.close();
        }
        Ok(())
    }

    fn open_case(&mut self, attrs: &[Attr<'_>], start: u64) -> Result<(), JunitErrorKind> {
        if self.cases.len() >= MAX_CASES {
            return Err(JunitErrorKind::TooManyCases { at: self.at(start) });
        }
        let mut name = None;
        let mut classname = "";
        let mut time_ms = 0;
        for (key, value) in attrs {
            match *key {
                b"name" => name = Some(cut(value, MAX_NAME_BYTES).to_owned()),
                b"classname" => classname = cut(value, MAX_NAME_BYTES),
                b"time" => time_ms = seconds_to_ms(value),
                _ => {}
            }
        }
        let Some(name) = name else {
            return Err(JunitErrorKind::MissingName { at: self.at(start) });
        };
        let name = cut(&joined(classname, &name), MAX_NAME_BYTES).to_owned();
        self.case = Some(CaseBuilder {
            name,
            time_ms,
            status: TestStatus::Passed,
            message: None,
            kind: None,
            text: String::new(),
        });
        Ok(())
    }

    fn open_outcome(&mut self, attrs: &[Attr<'_>], status: TestStatus) -> Frame {
        let current = match &self.case {
            Some(case) => case.status,
            None => return Frame::Other,
        };
        let decides = match status {
            // The first failure or error decides; skipped only beats passed
            // (pytest writes <skipped> next to <failure> for xfail cases).
            TestStatus::Failed | TestStatus::Error => {
                !matches!(current, TestStatus::Failed | TestStatus::Error)
            }
            _ => current == TestStatus::Passed,
        };
        if !decides {
            return Frame::Outcome { collect: false };
        }
        let attr = |name: &[u8]| match status {
            TestStatus::Skipped => None,
            _ => attrs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| first_lines(value))
                .filter(|value| !value.is_empty()),
        };
        let message = attr(b"message");
        let kind = attr(b"type");
        let collect = status != TestStatus::Skipped && message.is_none();
        if let Some(case) = &mut self.case {
            case.status = status;
            case.message = message;
            case.kind = kind;
            case.text.clear();
        }
        Frame::Outcome { collect }
    }

    /// An element's attributes as (local name, unescaped value); any
    /// malformed attribute or unknown entity is an error.
    fn attributes<'e>(
        &self,
        e: &'e BytesStart<'_>,
        start: u64,
    ) -> Result<Vec<Attr<'e>>, JunitErrorKind> {
        let mut attrs = Vec::new();
        for attr in e.attributes() {
            let attr = attr.map_err(|err| {
                let (offset, what) = describe_attr(&err);
                // Offsets count from just after the tag's `<`.
                self.malformed(start.saturating_add(1).saturating_add(offset), what)
            })?;
            let value = attr.unescape_value().map_err(|err| {
                let what = match &err {
                    quick_xml::Error::Escape(EscapeError::UnrecognizedEntity(_, entity)) => {
                        format!("unknown entity &{};", cut(entity, MAX_QUOTED_BYTES))
                    }
                    quick_xml::Error::Escape(EscapeError::UnterminatedEntity(_)) => {
                        BARE_AMP.to_owned()
                    }
                    other => other.to_string(),
                };
                let key = quote(attr.key.as_ref());
                self.malformed(start, format!("in attribute `{key}`: {what}"))
            })?;
            attrs.push((attr.key.local_name().into_inner(), value));
        }
        Ok(attrs)
    }

    fn close(&mut self) {
        // quick-xml checks that end tags match their start tags.
        if self.stack.pop() == Some(Frame::Case) {
            if let Some(case) = self.case.take() {
                self.cases.push(case.finish());
            }
        }
    }

    fn text(&mut self, text: &str, start: u64) -> Result<(), JunitErrorKind> {
        match self.stack.last() {
            None => {
                if !text.trim().is_empty() {
                    let where_ = if self.seen_root { "after" } else { "before" };
                    return Err(self.malformed(start, format!("text {where_} the root element")));
                }
            }
            Some(Frame::Outcome { collect: true }) => {
                if let Some(case) = &mut self.case {
                    case.push_text(text);
                }
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Resolves `&name;` in text: character references and the five
    /// predefined entities; anything else is an error.
    fn resolve(&self, r: &BytesRef<'_>, start: u64) -> Result<String, JunitErrorKind> {
        match r.resolve_char_ref() {
            Ok(Some(ch)) => return Ok(ch.to_string()),
            Ok(None) => {}
            Err(e) => return Err(self.malformed(start, describe(&e, ""))),
        }
        let name = r
            .decode()
            .map_err(|e| self.malformed(start, e.to_string()))?;
        match quick_xml::escape::resolve_predefined_entity(&name) {
            Some(value) => Ok(value.to_owned()),
            None => Err(self.malformed(
                start,
                format!("unknown entity &{};", cut(&name, MAX_QUOTED_BYTES)),
            )),
        }
    }
}

/// A quick-xml error in words, with its position left to the caller; `rest`
/// is the input from the error's position on.
fn describe(e: &quick_xml::Error, rest: &str) -> String {
    use quick_xml::Error as E;
    use quick_xml::errors::{IllFormedError as I, SyntaxError as S};
    match e {
        E::Syntax(
            s @ (S::UnclosedTag
            | S::UnclosedComment
            | S::UnclosedCData
            | S::UnclosedDoctype
            | S::UnclosedPIOrXmlDecl),
        ) => format!("{EOF_PREFIX}: {s}"),
        // `<!` or `<!-` or `<![CDA` cut by the end of the input.
        E::Syntax(S::InvalidBangMarkup)
            if ["<!--", "<![CDATA[", "<!DOCTYPE"].iter().any(|full| {
                full.len() > rest.len()
                    && full.as_bytes()[..rest.len()].eq_ignore_ascii_case(rest.as_bytes())
            }) =>
        {
            format!("{EOF_PREFIX} inside `<!` markup")
        }
        E::IllFormed(I::UnclosedReference) => {
            // `&lt` cut by the end of the input, or a bare `&` in the text.
            let cut_short = rest.bytes().skip(1).all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'#' | b'_' | b'-' | b'.' | b':')
            });
            if cut_short {
                format!("{EOF_PREFIX} inside an entity reference")
            } else {
                BARE_AMP.to_owned()
            }
        }
        other => other.to_string(),
    }
}

/// An attribute error as (offset from just after the tag's `<`, words).
fn describe_attr(e: &AttrError) -> (u64, String) {
    let (offset, what) = match e {
        AttrError::ExpectedEq(at) => (*at, "attribute name not followed by `=`".to_owned()),
        AttrError::ExpectedValue(at) => (*at, "`=` not followed by an attribute value".to_owned()),
        AttrError::UnquotedValue(at) => (*at, "attribute value not in quotes".to_owned()),
        AttrError::ExpectedQuote(at, quote) => (
            *at,
            format!(
                "attribute value without its closing `{}`",
                char::from(*quote)
            ),
        ),
        AttrError::Duplicated(at, _) => (*at, "duplicated attribute".to_owned()),
    };
    (offset as u64, what)
}

/// An element name for an error message: lossy, bounded.
fn quote(name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    cut(&name, MAX_QUOTED_BYTES).to_owned()
}

/// `s` cut to at most `max` bytes, on a char boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A case's full name, `classname.name`, without saying a suite twice: a
/// runner whose `name` already starts with the class name (or with its last
/// parts: `tests.TestX` + `TestX.test_a`) gives `tests.TestX.test_a`, not
/// `tests.TestX.TestX.test_a`.
fn joined(classname: &str, name: &str) -> String {
    if classname.is_empty() {
        return name.to_owned();
    }
    let class: Vec<&str> = classname.split('.').collect();
    let parts: Vec<&str> = name.split('.').collect();
    // The longest tail of the class name that the name starts with (the
    // name keeps at least one part of its own).
    let overlap = (1..=class.len().min(parts.len().saturating_sub(1)))
        .rev()
        .find(|&k| {
            class[class.len() - k..] == parts[..k] && parts[..k].iter().all(|p| !p.is_empty())
        })
        .unwrap_or(0);
    let mut full = class;
    full.extend_from_slice(&parts[overlap..]);
    full.join(".")
}

/// Whether a line only announces a trace to come (Lua's "stack traceback:",
/// Python's "Traceback (most recent call last):"): not a message.
fn is_trace_header(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    lower == "stack traceback:" || lower.starts_with("traceback (most recent call last)")
}

/// An attribute's text as a message: trimmed, its first non-empty line (the
/// rest of a multi-line attribute is a trace), cut to the message cap.
fn first_lines(value: &str) -> String {
    let line = value.lines().map(str::trim).find(|l| !l.is_empty());
    cut(line.unwrap_or(""), MAX_MESSAGE_BYTES).to_owned()
}

/// A JUnit `time` attribute (seconds, fractional) in milliseconds; anything
/// unusable (missing, garbage, negative, NaN) is 0.
fn seconds_to_ms(value: &str) -> u64 {
    match value.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => {
            // `as` saturates at u64::MAX for absurd values.
            (secs * 1000.0).round() as u64
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, status: TestStatus) -> TestCase {
        TestCase {
            name: name.to_owned(),
            status: status as i32,
            time_ms: 0,
            message: String::new(),
        }
    }

    fn status(c: &TestCase) -> TestStatus {
        TestStatus::try_from(c.status).unwrap()
    }

    fn err(xml: &[u8]) -> String {
        parse("junit.xml", xml).unwrap_err().to_string()
    }

    fn file(path: &str, data: &[u8]) -> ReportFileRecord {
        ReportFileRecord {
            path: path.to_owned(),
            data: data.to_vec(),
            truncated: false,
            error: String::new(),
        }
    }

    const PYTEST: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests">
  <testsuite name="pytest" errors="1" failures="2" skipped="2" tests="6" time="1.234" timestamp="2025-01-01T00:00:00" hostname="ci">
    <properties><property name="x" value="y"/></properties>
    <testcase classname="tests.test_math" name="test_add" time="0.001" />
    <testcase classname="tests.test_math" name="test_div" time="0.250">
      <failure message="ZeroDivisionError: division by zero">def test_div():
&gt;       1 / 0
E       ZeroDivisionError: division by zero</failure>
      <system-out>some output &amp; more</system-out>
    </testcase>
    <testcase classname="tests.test_math" name="test_skip" time="0.000">
      <skipped type="pytest.skip" message="not on linux">tests/test_math.py:10: not on linux</skipped>
    </testcase>
    <testcase classname="tests.test_math" name="test_xfail_strict" time="0.002">
      <skipped type="pytest.xfail" message="xfail"/>
      <failure message="[XPASS(strict)] reason"/>
    </testcase>
    <testcase classname="tests.test_io" name="test_fixture" time="0.003">
      <error message="failed on setup with &quot;OSError: boom&quot;">fixture trace</error>
    </testcase>
    <testcase classname="" name="test_param[1-2]" time="1e-3">
      <system-err>warn</system-err>
    </testcase>
  </testsuite>
</testsuites>
"#;

    #[test]
    fn pytest_output() {
        let cases = parse("junit.xml", PYTEST.as_bytes()).unwrap();
        let got: Vec<(&str, TestStatus, u64, &str)> = cases
            .iter()
            .map(|c| (c.name.as_str(), status(c), c.time_ms, c.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("tests.test_math.test_add", TestStatus::Passed, 1, ""),
                (
                    "tests.test_math.test_div",
                    TestStatus::Failed,
                    250,
                    "ZeroDivisionError: division by zero"
                ),
                ("tests.test_math.test_skip", TestStatus::Skipped, 0, ""),
                (
                    "tests.test_math.test_xfail_strict",
                    TestStatus::Failed,
                    2,
                    "[XPASS(strict)] reason"
                ),
                (
                    "tests.test_io.test_fixture",
                    TestStatus::Error,
                    3,
                    "failed on setup with \"OSError: boom\""
                ),
                ("test_param[1-2]", TestStatus::Passed, 1, ""),
            ]
        );
        assert_eq!(
            failing(&cases),
            vec![
                "tests.test_io.test_fixture",
                "tests.test_math.test_div",
                "tests.test_math.test_xfail_strict"
            ]
        );
    }

    #[test]
    fn bare_testsuite_root_surefire() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<testsuite xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" name="com.example.AppTest" time="0.05" tests="3" errors="0" skipped="1" failures="1">
  <properties>
    <property name="java.version" value="21"/>
  </properties>
  <testcase name="works" classname="com.example.AppTest" time="0.01"/>
  <testcase name="flaky" classname="com.example.AppTest" time="0.02">
    <flakyFailure message="first try" type="java.lang.AssertionError"><stackTrace>at x</stackTrace></flakyFailure>
  </testcase>
  <testcase name="breaks" classname="com.example.AppTest" time="0.015">
    <failure message="expected: &lt;1&gt; but was: &lt;2&gt;" type="org.opentest4j.AssertionFailedError">stack</failure>
  </testcase>
  <testcase name="ignored" classname="com.example.AppTest" time="0">
    <skipped/>
  </testcase>
</testsuite>"#;
        let cases = parse("TEST-com.example.AppTest.xml", xml).unwrap();
        assert_eq!(cases.len(), 4);
        assert_eq!(status(&cases[0]), TestStatus::Passed);
        assert_eq!(cases[0].time_ms, 10);
        assert_eq!(status(&cases[1]), TestStatus::Passed, "flaky passes");
        assert_eq!(status(&cases[2]), TestStatus::Failed);
        assert_eq!(cases[2].message, "expected: <1> but was: <2>");
        assert_eq!(cases[2].time_ms, 15);
        assert_eq!(status(&cases[3]), TestStatus::Skipped);
        assert_eq!(cases[3].name, "com.example.AppTest.ignored");
    }

    #[test]
    fn ant_style_bare_suite_with_error() {
        let xml = br#"<testsuite name="FooTest" tests="2"><testcase classname="FooTest" name="a" time="0.5"><error type="java.lang.NullPointerException">java.lang.NullPointerException
	at FooTest.a(FooTest.java:10)</error></testcase><testcase classname="FooTest" name="b"/></testsuite>"#;
        let cases = parse("TEST-FooTest.xml", xml).unwrap();
        assert_eq!(status(&cases[0]), TestStatus::Error);
        assert_eq!(cases[0].message, "java.lang.NullPointerException");
        assert_eq!(cases[0].time_ms, 500);
        assert_eq!(status(&cases[1]), TestStatus::Passed);
    }

    #[test]
    fn nested_suites() {
        let xml = br#"<testsuites>
  <testsuite name="outer">
    <testcase name="top"/>
    <testsuite name="inner">
      <testcase name="deep" classname="pkg.Inner"><failure message="no"/></testcase>
      <testsuite name="innermost"><testcase name="deepest"/></testsuite>
    </testsuite>
  </testsuite>
  <testsuite name="second"><testcase name="other"/></testsuite>
</testsuites>"#;
        let cases = parse("nested.xml", xml).unwrap();
        let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["top", "pkg.Inner.deep", "deepest", "other"]);
        assert_eq!(status(&cases[1]), TestStatus::Failed);
    }

    #[test]
    fn missing_and_garbage_time() {
        let xml = br#"<testsuite>
  <testcase name="none"/>
  <testcase name="garbage" time="abc"/>
  <testcase name="comma" time="1,5"/>
  <testcase name="negative" time="-3"/>
  <testcase name="nan" time="NaN"/>
  <testcase name="inf" time="inf"/>
  <testcase name="spaces" time=" 2.5 "/>
  <testcase name="huge" time="1e300"/>
</testsuite>"#;
        let cases = parse("t.xml", xml).unwrap();
        let times: Vec<u64> = cases.iter().map(|c| c.time_ms).collect();
        assert_eq!(times, vec![0, 0, 0, 0, 0, 0, 2500, u64::MAX]);
    }

    #[test]
    fn failure_with_text_but_no_message() {
        let xml = b"<testsuite><testcase name=\"t\"><failure type=\"AssertionError\">\n\n   assert 1 == 2  \n  where 1 = f()\n</failure></testcase></testsuite>";
        let cases = parse("t.xml", xml).unwrap();
        assert_eq!(cases[0].message, "assert 1 == 2");
        // An empty message attribute falls back to the text too.
        let xml = b"<testsuite><testcase name=\"t\"><failure message=\"\">first\nsecond</failure></testcase></testsuite>";
        assert_eq!(parse("t.xml", xml).unwrap()[0].message, "first");
    }

    #[test]
    fn a_message_in_the_type_attribute_is_the_message() {
        // A runner (busted-style) that puts the message in `type` and a
        // Lua traceback in the text: the message, not "stack traceback:".
        let xml = br#"<testsuite><testcase classname="spec" name="adds"><failure type="spec/add_spec.lua:3: Expected objects to be the same.&#10;Passed in: (number) 5">stack traceback:
	spec/add_spec.lua:3: in function &lt;spec/add_spec.lua:2&gt;</failure></testcase></testsuite>"#;
        let cases = parse("t.xml", xml).unwrap();
        assert_eq!(
            cases[0].message,
            "spec/add_spec.lua:3: Expected objects to be the same."
        );
        // A bare class name in `type` is not a message: the text says more.
        let xml = b"<testsuite><testcase name=\"t\"><error type=\"ValueError\">Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad</error></testcase></testsuite>";
        assert_eq!(parse("t.xml", xml).unwrap()[0].message, "ValueError: bad");
        // With nothing else, the bare type still says something.
        let xml = b"<testsuite><testcase name=\"t\"><failure type=\"AssertionError\"/></testcase></testsuite>";
        assert_eq!(parse("t.xml", xml).unwrap()[0].message, "AssertionError");
        // A header-only text is skipped for the next line.
        let xml = b"<testsuite><testcase name=\"t\"><failure>stack traceback:\n  boom.lua:1: oops</failure></testcase></testsuite>";
        assert_eq!(parse("t.xml", xml).unwrap()[0].message, "boom.lua:1: oops");
        // A multi-line message attribute is cut to its first line.
        let xml = b"<testsuite><testcase name=\"t\"><failure message=\"assert 1 == 2&#10;  where 1 = f()\"/></testcase></testsuite>";
        assert_eq!(parse("t.xml", xml).unwrap()[0].message, "assert 1 == 2");
    }

    #[test]
    fn a_name_that_holds_its_class_is_not_doubled() {
        let xml = br#"<testsuite name="TestParser">
  <testcase classname="TestParser" name="TestParser.test_x"/>
  <testcase classname="tests.test_parse.TestParser" name="TestParser.test_y"/>
  <testcase classname="tests.TestParser" name="test_z"/>
  <testcase classname="TestParser" name="TestParser"/>
  <testcase classname="a.b" name="b.c.d"/>
</testsuite>"#;
        let names: Vec<String> = parse("t.xml", xml)
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(
            names,
            [
                "TestParser.test_x",
                "tests.test_parse.TestParser.test_y",
                "tests.TestParser.test_z",
                "TestParser.TestParser",
                "a.b.c.d",
            ]
        );
    }

    #[test]
    fn message_is_cut_on_a_char_boundary() {
        let long = "é".repeat(400); // 800 bytes
        let xml = format!(
            "<testsuite><testcase name=\"a\"><failure message=\"{long}\"/></testcase><testcase name=\"b\"><failure>{long}</failure></testcase></testsuite>"
        );
        let cases = parse("t.xml", xml.as_bytes()).unwrap();
        for c in &cases {
            assert_eq!(c.message.len(), MAX_MESSAGE_BYTES);
            assert!(c.message.chars().all(|ch| ch == 'é'));
        }
    }

    #[test]
    fn cdata_content() {
        let xml = br#"<testsuite><testcase name="t"><failure><![CDATA[Expected <a> & got <b>
more]]></failure><system-out><![CDATA[ignored ]]> </system-out></testcase></testsuite>"#;
        let cases = parse("t.xml", xml).unwrap();
        assert_eq!(cases[0].message, "Expected <a> & got <b>");
        assert_eq!(status(&cases[0]), TestStatus::Failed);
    }

    #[test]
    fn entities_in_names_and_text() {
        let xml = br#"<testsuite><testcase classname="a&amp;b" name="test[&lt;x&gt;-&#233;-&#x41;]"><failure>x &lt; y &#8364;</failure></testcase></testsuite>"#;
        let cases = parse("t.xml", xml).unwrap();
        assert_eq!(cases[0].name, "a&b.test[<x>-é-A]");
        assert_eq!(cases[0].message, "x < y €");
    }

    #[test]
    fn unknown_entities_are_errors() {
        let e = err(br#"<testsuite><testcase name="a&foo;"/></testsuite>"#);
        assert!(
            e.starts_with("junit.xml: malformed XML at byte 11 (line 1)"),
            "{e}"
        );
        let e = err(
            b"<testsuite><testcase name=\"a\"><failure>&nbsp;</failure></testcase></testsuite>",
        );
        assert!(e.contains("unknown entity &nbsp;"), "{e}");
        // Even in ignored elements.
        let e = err(b"<testsuite><system-out>&bogus;</system-out></testsuite>");
        assert!(e.contains("unknown entity &bogus;"), "{e}");
        let e = err(b"<testsuite><system-out>&#xFFFFFFFF;</system-out></testsuite>");
        assert!(e.contains("malformed XML"), "{e}");
    }

    #[test]
    fn names_are_cut() {
        let long = "n".repeat(2000);
        let xml = format!("<testsuite><testcase classname=\"c\" name=\"{long}\"/></testsuite>");
        let cases = parse("t.xml", xml.as_bytes()).unwrap();
        assert_eq!(cases[0].name.len(), MAX_NAME_BYTES);
        assert!(cases[0].name.starts_with("c.nnn"));
    }

    #[test]
    fn missing_name_names_the_position() {
        let xml =
            b"<testsuite>\n  <testcase name=\"ok\"/>\n  <testcase classname=\"x\"/>\n</testsuite>";
        assert_eq!(
            err(xml),
            "junit.xml: <testcase> without a name attribute at byte 38 (line 3)"
        );
    }

    #[test]
    fn malformed_xml() {
        // Unclosed tag.
        let e = err(b"<testsuite><testcase name=\"a\">");
        assert!(e.starts_with("junit.xml: malformed XML at byte 30"), "{e}");
        assert!(e.contains("unexpected end of file"), "{e}");
        // Mismatched end tag.
        let e = err(b"<testsuite><testcase name=\"a\"></testsuite></testcase>");
        assert!(e.starts_with("junit.xml: malformed XML at byte"), "{e}");
        // Unclosed markup.
        let e = err(b"<testsuite><testcase name=\"a");
        assert!(e.contains("unexpected end of file"), "{e}");
        // Garbage bytes.
        let e = err(b"\x01\x02garbage<<<>>>");
        assert!(e.starts_with("junit.xml: malformed XML at byte 0"), "{e}");
        let e = err(b"<testsuite><<<>>></testsuite>");
        assert!(e.starts_with("junit.xml: malformed XML at byte"), "{e}");
        // Invalid UTF-8 in the middle.
        let e = err(b"<testsuite><testcase name=\"\xff\xfe\"/></testsuite>");
        assert_eq!(
            e,
            "junit.xml: malformed XML at byte 27 (line 1): invalid UTF-8 (byte 0xff)"
        );
        // Invalid UTF-8 after an earlier error: the earlier one wins.
        let e = err(b"<testsuite></testcase>\xff</testsuite>");
        assert!(!e.contains("UTF-8"), "{e}");
        // A second root, text outside the root, duplicate attributes.
        let e = err(b"<testsuite/><testsuite/>");
        assert!(e.contains("second root element"), "{e}");
        let e = err(b"<testsuite/>trailing");
        assert!(e.contains("text after the root element"), "{e}");
        let e = err(b"<testcase name=\"a\" name=\"b\"/>");
        assert!(e.contains("not JUnit XML"), "{e}");
        let e = err(b"<testsuite><testcase name=\"a\" name=\"b\"/></testsuite>");
        assert_eq!(
            e,
            "junit.xml: malformed XML at byte 30 (line 1): duplicated attribute"
        );
        let e = err(b"<testsuite>\n<x a=b/></testsuite>");
        assert_eq!(
            e,
            "junit.xml: malformed XML at byte 17 (line 2): attribute value not in quotes"
        );
        let e = err(b"<testsuite>a & b</testsuite>");
        assert!(e.contains("`&` that does not start"), "{e}");
        // UTF-16.
        let e = err(b"\xff\xfe<\0t\0");
        assert!(e.contains("UTF-16"), "{e}");
    }

    #[test]
    fn wrong_root() {
        assert_eq!(
            err(b"<!-- hi --><html><body/></html>"),
            "junit.xml: not JUnit XML: expected <testsuites> or <testsuite> at the root, found <html>"
        );
        assert_eq!(
            err(b"<?xml version=\"1.0\"?>\n<!-- only a comment -->\n"),
            "junit.xml: not JUnit XML: expected <testsuites> or <testsuite> at the root, found no element"
        );
        let e = err(b"{\"json\": true}");
        assert!(e.contains("text before the root element"), "{e}");
    }

    #[test]
    fn positions_count_the_byte_order_mark() {
        // Found by the fuzz tests: quick-xml counts positions after a BOM,
        // so errors pointed 3 bytes early, and a file cut in an entity
        // reference read as a bare `&` (broken) instead of as cut.
        let e = err(b"\xef\xbb\xbf<testsuite></x>");
        assert!(
            e.starts_with("junit.xml: malformed XML at byte 14 (line 1)"),
            "{e}"
        );
        let e = err(b"\xef\xbb\xbf<testsuite>\n<testcase/>");
        assert_eq!(
            e,
            "junit.xml: <testcase> without a name attribute at byte 15 (line 2)"
        );
        let xml =
            "\u{feff}<testsuite><testcase name=\"a\"/><testcase name=\"b&#233;\"/></testsuite>";
        let cut = xml.find("&#233;").unwrap() + 3;
        let mut f = file("bom.xml", &xml.as_bytes()[..cut]);
        f.truncated = true;
        let report = parse_reports(&[f]);
        assert_eq!(report.cases.len(), 1);
        assert!(!report.errors[0].contains("(also:"), "{:?}", report.errors);
    }

    #[test]
    fn error_details_are_bounded() {
        // Found by the fuzz tests: quick-xml quotes a mismatched end tag
        // whole, so a long name made an error line as long as the file.
        let long = "x".repeat(100_000);
        let e = err(format!("<testsuite></{long}>").as_bytes());
        assert!(e.len() < 500, "{} bytes", e.len());
        assert!(e.contains("ill-formed document") && e.ends_with('…'), "{e}");
    }

    #[test]
    fn empty() {
        assert_eq!(err(b""), "junit.xml: empty file");
        assert_eq!(err(b" \n\t "), "junit.xml: empty file");
    }

    #[test]
    fn bom_is_accepted() {
        let cases = parse(
            "t.xml",
            b"\xef\xbb\xbf<testsuite><testcase name=\"a\"/></testsuite>",
        )
        .unwrap();
        assert_eq!(cases.len(), 1);
    }

    #[test]
    fn doctype_refused() {
        let bomb = br#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
]>
<testsuite><testcase name="&lol2;"/></testsuite>"#;
        assert_eq!(
            err(bomb),
            "junit.xml: refused <!DOCTYPE> at byte 22 (line 2): DTDs and entity declarations are not accepted"
        );
        let e = err(b"<testsuite><!DOCTYPE x></testsuite>");
        assert!(e.contains("malformed XML") || e.contains("DOCTYPE"), "{e}");
    }

    #[test]
    fn too_deep() {
        let mut xml = String::from("<testsuites>");
        for _ in 0..MAX_DEPTH - 1 {
            xml.push_str("<testsuite>");
        }
        let ok = format!("{xml}{}</testsuites>", "</testsuite>".repeat(MAX_DEPTH - 1));
        parse("ok.xml", ok.as_bytes()).unwrap();
        let deep = format!(
            "{xml}<testsuite>{}</testsuites>",
            "</testsuite>".repeat(MAX_DEPTH)
        );
        let e = err(deep.as_bytes());
        assert!(e.contains("nested deeper than 64 levels"), "{e}");
        // Deeply nested garbage inside an ignored element counts too.
        let deep = format!("<testsuite>{}", "<a>".repeat(100_000));
        assert!(err(deep.as_bytes()).contains("nested deeper"));
    }

    #[test]
    fn too_many_cases() {
        let mut xml = String::from("<testsuite>");
        for _ in 0..MAX_CASES {
            xml.push_str("<testcase name=\"t\"/>");
        }
        let ok = format!("{xml}</testsuite>");
        assert_eq!(parse("t.xml", ok.as_bytes()).unwrap().len(), MAX_CASES);
        let bad = format!("{xml}<testcase name=\"one too many\"/></testsuite>");
        let e = err(bad.as_bytes());
        assert!(e.starts_with("junit.xml: too many test cases"), "{e}");
    }

    #[test]
    fn parse_reports_keeps_good_files() {
        let good = file("a/junit.xml", PYTEST.as_bytes());
        let bad = file("b/junit.xml", b"<testsuite><testcase name=\"x\">");
        let html = file("c/report.html", b"<html></html>");
        let report = parse_reports(&[good, bad, html]);
        assert_eq!(report.cases.len(), 6);
        assert_eq!(report.errors.len(), 2);
        assert!(
            report.errors[0].starts_with("b/junit.xml: malformed XML"),
            "{:?}",
            report.errors
        );
        assert!(
            report.errors[1].starts_with("c/report.html: not JUnit XML"),
            "{:?}",
            report.errors
        );
    }

    #[test]
    fn parse_reports_truncated() {
        let cut = PYTEST.find("test_skip").unwrap();
        let mut f = file("junit.xml", &PYTEST.as_bytes()[..cut]);
        f.truncated = true;
        let report = parse_reports(&[f]);
        assert_eq!(report.cases.len(), 2, "the cases before the cut");
        assert_eq!(report.errors.len(), 1);
        assert_eq!(
            report.errors[0],
            format!(
                "junit.xml: truncated by the agent after {cut} bytes; kept the 2 test cases before the cut"
            )
        );
        // Cut in the middle of a multi-byte character.
        let xml = "<testsuite><testcase name=\"a\"/><testcase name=\"é\"/></testsuite>";
        let cut = xml.find('é').unwrap() + 1;
        let mut f = file("j.xml", &xml.as_bytes()[..cut]);
        f.truncated = true;
        let report = parse_reports(&[f]);
        assert_eq!(report.cases.len(), 1);
        assert!(!report.errors[0].contains("also"), "{:?}", report.errors);
        // A whole file flagged as truncated is still flagged.
        let mut f = file("whole.xml", xml.as_bytes());
        f.truncated = true;
        let report = parse_reports(&[f]);
        assert_eq!(report.cases.len(), 2);
        assert_eq!(report.errors.len(), 1);
        // A truncated file broken before the cut says so.
        let mut f = file(
            "broken.xml",
            b"<testsuite><testcase name=\"a\"/></x><testcase",
        );
        f.truncated = true;
        let report = parse_reports(&[f]);
        assert_eq!(report.cases.len(), 1);
        assert!(
            report.errors[0].contains("(also: malformed XML"),
            "{:?}",
            report.errors
        );
    }

    #[test]
    fn parse_reports_agent_error() {
        let mut missing = file("out/junit.xml", b"");
        missing.error = "not found".to_owned();
        let good = file("ok.xml", b"<testsuite><testcase name=\"a\"/></testsuite>");
        let report = parse_reports(&[missing, good]);
        assert_eq!(report.cases.len(), 1);
        assert_eq!(
            report.errors,
            vec!["out/junit.xml: agent could not read it: not found".to_owned()]
        );
        assert_eq!(parse_reports(&[]), Report::default());
    }

    #[test]
    fn failing_names_are_sorted_and_deduplicated() {
        let cases = vec![
            case("b", TestStatus::Failed),
            case("a", TestStatus::Error),
            case("c", TestStatus::Passed),
            case("d", TestStatus::Skipped),
            case("b", TestStatus::Failed),
            TestCase {
                status: 99,
                ..case("weird", TestStatus::Passed)
            },
        ];
        assert_eq!(failing(&cases), vec!["a", "b"]);
        assert!(failing::<TestCase>(&[]).is_empty());
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn fuzz_no_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // Bytes biased towards XML punctuation so the parser gets past byte 0.
        let alphabet: &[u8] = b"<>/=\"'&;!?[]-# \n\txtesuicamnlfro\xc3\xa9\xff\x00";
        let pieces: [&[u8]; 10] = [
            b"<testsuite>",
            b"</testsuite>",
            b"<testcase name=\"a\" time=\"1\">",
            b"</testcase>",
            b"<failure message=\"m\">",
            b"</failure>",
            b"<skipped/>",
            b"<![CDATA[x]]>",
            b"&lt;",
            b"<!DOCTYPE x>",
        ];
        for i in 0..2_000 {
            let len = (rng.next() % 200) as usize;
            let mut data = Vec::with_capacity(len);
            for _ in 0..len {
                let r = rng.next();
                if i % 2 == 0 {
                    data.push(r as u8);
                } else if r % 4 == 0 {
                    data.extend_from_slice(pieces[(r >> 8) as usize % pieces.len()]);
                } else {
                    data.push(alphabet[(r >> 8) as usize % alphabet.len()]);
                }
            }
            let _ = parse("fuzz.xml", &data);
            let mut f = file("fuzz.xml", &data);
            f.truncated = i % 3 == 0;
            let _ = parse_reports(&[f]);
        }
        let other = "<?xml version=\"1.0\"?>\n<!-- comment -->\n<testsuite name=\"é\">\
            <testcase name=\"t&#233;st&amp;\"><failure><![CDATA[a <b> ]]>x&#x20AC;</failure></testcase>\
            <?pi data?></testsuite>\n";
        for full in [PYTEST.as_bytes(), other.as_bytes()] {
            prefixes(full);
        }
    }

    fn prefixes(full: &[u8]) {
        for n in 0..=full.len() {
            let result = parse("prefix.xml", &full[..n]);
            if n == full.len() {
                assert!(result.is_ok());
            } else if full[..n].iter().all(u8::is_ascii_whitespace) {
                assert!(result.is_err());
            }
            let mut f = file("prefix.xml", &full[..n]);
            f.truncated = true;
            let report = parse_reports(&[f]);
            assert_eq!(report.errors.len(), 1);
            // Wherever the cut falls, it reads as a cut, not as a broken file.
            assert!(
                !report.errors[0].contains("(also:"),
                "{n}: {:?}",
                report.errors
            );
        }
    }
}

/// Property-based fuzzing of the parser; see the module.
#[cfg(test)]
mod fuzz;
