//! The demo's material, embedded in the binary so `trunkfarm demo` needs no
//! checkout and no network: the source of a tiny interpreted language (the
//! upstream runtime), three downstream projects written in it, and the story
//! (`config/demo/story.toml`): which commit breaks which feature, and what
//! must turn red.

use std::path::Path;

use serde::Deserialize;

/// Embeds files under `config/demo/` by their relative path.
macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../../config/demo/", $path)))),*]
    };
}

/// Every file of the upstream (`runtime/…`) and of the projects
/// (`projects/<name>/…`). A unit test checks this list against the directory.
pub(super) const FILES: &[(&str, &str)] = embed!(
    "projects/greeter/greeter.tiny",
    "projects/greeter/run-tests.sh",
    "projects/greeter/tests/test_greet.tiny",
    "projects/greeter/tests/test_inbox.tiny",
    "projects/greeter/tests/test_shout.tiny",
    "projects/greeter/tests/test_time_of_day.tiny",
    "projects/mathkit/mathkit.tiny",
    "projects/mathkit/run-tests.sh",
    "projects/mathkit/tests/test_gcd.tiny",
    "projects/mathkit/tests/test_modulo.tiny",
    "projects/mathkit/tests/test_pow.tiny",
    "projects/mathkit/tests/test_primes.tiny",
    "projects/mathkit/tests/test_sequences.tiny",
    "projects/textkit/run-tests.sh",
    "projects/textkit/tests/test_capitalize.tiny",
    "projects/textkit/tests/test_length.tiny",
    "projects/textkit/tests/test_pad.tiny",
    "projects/textkit/tests/test_reverse.tiny",
    "projects/textkit/tests/test_search.tiny",
    "projects/textkit/tests/test_upper.tiny",
    "projects/textkit/textkit.tiny",
    "runtime/Makefile",
    "runtime/hello.tiny",
    "runtime/tiny.c",
);

/// `config/demo/story.toml`.
pub(super) const STORY_TOML: &str = include_str!("../../../config/demo/story.toml");

/// The scripted story.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Story {
    /// How the runtime is built and its first commit.
    pub(crate) upstream: UpstreamStory,
    /// The downstream projects.
    pub(crate) project: Vec<ProjectStory>,
    /// The commit that breaks a language feature.
    #[serde(rename = "break")]
    pub(crate) breaks: Change,
    /// The commit that fixes it.
    pub(crate) fix: Change,
}

/// The upstream's build and first commit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamStory {
    /// Build commands (install into `$PREFIX`).
    pub(crate) build: Vec<String>,
    /// Subject of the first commit.
    pub(crate) first_message: String,
    /// Its author, `Name <email>`.
    pub(crate) first_author: String,
}

/// One downstream project.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProjectStory {
    /// Its name (and directory under `projects/`).
    pub(crate) name: String,
    /// Its test commands.
    pub(crate) test: Vec<String>,
    /// Its JUnit files.
    pub(crate) junit: Vec<String>,
}

/// A commit that replaces one snippet of one file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Change {
    /// The file, relative to the runtime's directory.
    pub(crate) file: String,
    /// The snippet to replace (occurs exactly once).
    pub(crate) find: String,
    /// What replaces it.
    pub(crate) replace: String,
    /// The commit's subject.
    pub(crate) message: String,
    /// Its author, `Name <email>`.
    pub(crate) author: String,
    /// Projects that must be red after this commit.
    #[serde(default)]
    pub(crate) expect_red: Vec<String>,
    /// Tests (`classname.name`) that must newly fail.
    #[serde(default)]
    pub(crate) expect_newly_failing: Vec<String>,
}

impl Story {
    /// The embedded story.
    pub(crate) fn load() -> anyhow::Result<Story> {
        Ok(toml::from_str(STORY_TOML)?)
    }
}

impl Change {
    /// Applies the change to the file in `repo`; an error if the snippet is
    /// not there exactly once.
    pub(crate) fn apply(&self, repo: &Path) -> anyhow::Result<()> {
        let path = repo.join(&self.file);
        let text = std::fs::read_to_string(&path)?;
        anyhow::ensure!(
            text.matches(&self.find).count() == 1,
            "the demo story's snippet does not occur exactly once in {}",
            path.display()
        );
        std::fs::write(&path, text.replacen(&self.find, &self.replace, 1))?;
        Ok(())
    }
}

/// Writes the embedded files under `prefix` (e.g. `runtime/`) into `dir`.
pub(crate) fn write_tree(prefix: &str, dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for (path, text) in FILES {
        let Some(rel) = path.strip_prefix(prefix) else {
            continue;
        };
        let dest = dir.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&dest, text)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_demo_directory_is_embedded() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo");
        let mut on_disk = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(&root).unwrap().to_str().unwrap().to_owned();
                    if rel.starts_with("runtime/") || rel.starts_with("projects/") {
                        on_disk.push(rel);
                    }
                }
            }
        }
        on_disk.sort();
        let embedded: Vec<String> = FILES.iter().map(|(p, _)| (*p).to_owned()).collect();
        assert_eq!(embedded, on_disk, "update FILES in cli/demo/story.rs");
    }

    #[test]
    fn the_story_is_consistent() {
        let story = Story::load().unwrap();
        let tiny = FILES
            .iter()
            .find(|(p, _)| *p == format!("runtime/{}", story.breaks.file))
            .unwrap()
            .1;
        assert_eq!(tiny.matches(&story.breaks.find).count(), 1);
        assert_eq!(story.fix.find, story.breaks.replace);
        assert!(!story.breaks.expect_red.is_empty());
        for p in &story.breaks.expect_red {
            assert!(story.project.iter().any(|s| &s.name == p), "{p}");
            assert!(
                FILES
                    .iter()
                    .any(|(f, _)| f.starts_with(&format!("projects/{p}/")))
            );
        }
        assert!(
            story.project.len() > story.breaks.expect_red.len(),
            "some project must stay green"
        );
    }
}
