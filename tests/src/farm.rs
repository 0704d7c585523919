//! A small trunk to test against, shared by the pipeline and fault tests:
//! an upstream "runtime" (`rt`, a shell script the build installs into
//! `$PREFIX`) and downstream projects whose tests use it, each a real local
//! git repository, plus the hub config that polls them fast.

use std::fs;
use std::path::PathBuf;

use serde_json::Value;
use tempfile::TempDir;

use crate::smtp::SmtpSink;
use crate::{git, s, temp_dir};

/// The transition kinds as the CLI's `--json` prints them.
pub const WENT_RED: &str = "went_red";
pub const STILL_RED: &str = "still_red";
pub const FIXED: &str = "fixed";
pub const STILL_GREEN: &str = "still_green";

/// `rt`: a toy runtime with two "language features".
pub const RUNTIME: &str = r#"#!/bin/sh
# rt: a toy runtime with two "language features".
case "$1" in
  add) echo $(($2 + $3)) ;;
  upper) printf '%s\n' "$2" | tr a-z A-Z ;;
  *) echo "rt: unknown operation $1" >&2; exit 2 ;;
esac
"#;

/// `adder` uses only `add` (and checks it runs the runtime under test).
pub const ADDER_TESTS: &str = r#"#!/bin/sh
set -e
test "$(rt add 2 3)" = 5
test "$(command -v rt)" = "$TRUNKFARM_RUNTIME_PREFIX/bin/rt"
echo "adder: all tests pass"
"#;

/// `shouter` tests `upper` and `add`, with a JUnit report.
pub const SHOUTER_TESTS: &str = r#"#!/bin/sh
fail=0
cases=""
check() {
  name=$1; expected=$2; shift 2
  got=$("$@" 2>&1)
  if [ "$got" = "$expected" ]; then
    cases="$cases<testcase classname=\"shouter\" name=\"$name\" time=\"0.01\"/>"
  else
    cases="$cases<testcase classname=\"shouter\" name=\"$name\"><failure message=\"expected $expected, got $got\"/></testcase>"
    fail=1
  fi
}
check test_upper ABC rt upper abc
check test_add 4 rt add 2 2
printf '<testsuites><testsuite name="shouter">%s</testsuite></testsuites>\n' "$cases" > junit.xml
exit $fail
"#;

/// shouter's configured maintainer.
pub const SHOUTER_MAINTAINER: &str = "shouter-dev@example.org";

/// The runtime with `upper` broken (it no longer upper-cases): only
/// shouter's `test_upper` fails.
pub fn broken_runtime() -> String {
    RUNTIME.replace("| tr a-z A-Z", "")
}

/// Local repositories for the upstream `rt` and some of its downstream
/// projects (`adder`, `shouter`).
pub struct Repos {
    dir: TempDir,
    projects: Vec<&'static str>,
}

impl Repos {
    /// `rt` with both downstream projects.
    pub fn new() -> Repos {
        Repos::with(&["adder", "shouter"])
    }

    /// `rt` with the named downstream projects only.
    pub fn with(projects: &[&'static str]) -> Repos {
        let r = Repos {
            dir: temp_dir("trunkfarm-e2e-repos-"),
            projects: projects.to_vec(),
        };
        r.create("rt", &[("rt.sh", RUNTIME)], "rt: initial import");
        for p in projects {
            let tests = match *p {
                "adder" => ADDER_TESTS,
                "shouter" => SHOUTER_TESTS,
                other => panic!("no test suite for project {other} (adder or shouter)"),
            };
            r.create(p, &[("test.sh", tests)], p);
        }
        r
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory holding every repository (what a server serves).
    pub fn root(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A new repository `name` with `files`, in one commit.
    pub fn create(&self, name: &str, files: &[(&str, &str)], message: &str) {
        let dir = self.path(name);
        fs::create_dir_all(&dir).unwrap();
        git(&dir, &["init", "--quiet", "-b", "main"]);
        for (file, text) in files {
            fs::write(dir.join(file), text).unwrap();
        }
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "--quiet", "-m", message]);
    }

    /// Commits a change to `file` by `author`; returns the new commit.
    pub fn commit(
        &self,
        name: &str,
        file: &str,
        text: &str,
        message: &str,
        author: &str,
    ) -> String {
        let dir = self.path(name);
        fs::write(dir.join(file), text).unwrap();
        git(&dir, &["add", "-A"]);
        git(
            &dir,
            &["commit", "--quiet", "--author", author, "-m", message],
        );
        self.head(name)
    }

    pub fn head(&self, name: &str) -> String {
        git(&self.path(name), &["rev-parse", "HEAD"])
    }

    /// Lands the commit that breaks `upper` (which only shouter uses);
    /// returns it.
    pub fn break_upper(&self, author: &str) -> String {
        self.commit(
            "rt",
            "rt.sh",
            &broken_runtime(),
            "rt: speed up upper",
            author,
        )
    }

    /// The hub config polling these repositories every 200 ms (plus
    /// `extra`, appended as it is).
    pub fn config(&self, extra: &str) -> String {
        self.config_with(|name| self.path(name).display().to_string(), extra)
    }

    /// [`Repos::config`] with the repositories reached at
    /// `<base_url>/<name>` (a server serving [`Repos::root`]).
    pub fn config_served(&self, base_url: &str, extra: &str) -> String {
        self.config_with(|name| format!("{base_url}/{name}"), extra)
    }

    fn config_with(&self, url: impl Fn(&str) -> String, extra: &str) -> String {
        let mut toml = format!(
            r#"
[pipeline]
git_timeout = "30s"

[[upstream]]
name = "rt"
url = "{rt}"
poll_interval = "200ms"
build = ["mkdir -p \"$PREFIX/bin\"", "cp rt.sh \"$PREFIX/bin/rt\"", "chmod +x \"$PREFIX/bin/rt\""]
build_timeout = "1m"
"#,
            rt = url("rt"),
        );
        for p in &self.projects {
            toml.push_str(&format!(
                r#"
[[project]]
name = "{p}"
url = "{url}"
poll_interval = "200ms"
test = ["sh test.sh"]
timeout = "1m"
"#,
                url = url(p),
            ));
            if *p == "shouter" {
                toml.push_str(&format!(
                    "junit = [\"junit.xml\"]\nmaintainers = [\"{SHOUTER_MAINTAINER}\"]\n"
                ));
            }
        }
        toml.push_str(extra);
        toml
    }
}

impl Default for Repos {
    fn default() -> Repos {
        Repos::new()
    }
}

/// The `[smtp]` and `[notify]` sections sending to `sink`, retrying fast.
pub fn smtp_toml(sink: &SmtpSink) -> String {
    format!(
        r#"
[smtp]
host = "127.0.0.1"
port = {}
security = "plain"
from = "trunkfarm <farm@example.org>"
timeout = "5s"

[notify]
retry_first = "200ms"
retry_max = "1s"
"#,
        sink.port()
    )
}

/// The cell of `project` in `status --json` output.
pub fn cell(status: &Value, project: &str) -> Value {
    status["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| s(c, "project") == project)
        .unwrap_or_else(|| panic!("no cell for {project} in {status:#}"))
        .clone()
}
