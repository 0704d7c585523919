//! What the donor sees and decides: one plain sentence per job start and end
//! on stdout, the jobs of the last day (`history.jsonl`), and the donor's
//! pause (`paused.json`), both in the state directory so that `status`
//! shows them with no agent running and a pause outlives a restart.
//!
//! The tracing lines on stderr are the detail behind them (`-v`); a
//! runtime download shows a progress bar when stderr is a terminal.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{self, BufRead as _, IsTerminal as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trunkfarm_proto::settings::fmt_duration;
use trunkfarm_proto::v1::{JobRef, JobResult, JobSpec, Outcome};

use crate::lock::{now_ms, utc};
use crate::state::write_atomic;

/// The finished jobs' journal in the state directory.
pub(crate) const HISTORY_FILE: &str = "history.jsonl";
/// The donor's pause in the state directory (absent: not paused).
pub(crate) const PAUSE_FILE: &str = "paused.json";
/// How far back `status` looks, and what the journal keeps.
pub(crate) const HISTORY_SPAN: Duration = Duration::from_secs(24 * 3600);
/// Hex digits of a commit shown to the donor (the hub's short length).
const SHORT_COMMIT: usize = 10;

/// A job as the donor reads about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct JobInfo {
    pub job_id: u64,
    pub attempt: u32,
    /// "build" (it makes a runtime) or "test".
    pub kind: String,
    pub project: String,
    /// The upstream it builds or tests against, and its commit (short),
    /// when the hub's pipeline says (`TRUNKFARM_UPSTREAM*`).
    pub upstream: String,
    pub commit: String,
    /// Unix ms it started.
    pub started_ms: u64,
    /// Once finished: how it ended ("passed", "failed", …), when, and
    /// how long it ran.
    pub outcome: String,
    pub ended_ms: u64,
    pub duration_ms: u64,
    /// The hub it came from, by its name here, when the agent serves
    /// several (empty with one).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hub: String,
}

impl JobInfo {
    /// A job starting now.
    pub fn starting(job: JobRef, spec: &JobSpec) -> JobInfo {
        let env = |k: &str| spec.env.get(k).cloned().unwrap_or_default();
        let mut commit = env("TRUNKFARM_UPSTREAM_COMMIT");
        commit.truncate(SHORT_COMMIT);
        JobInfo {
            job_id: job.job_id,
            attempt: job.attempt,
            kind: if spec.upload_prefix.is_empty() {
                "test"
            } else {
                "build"
            }
            .to_owned(),
            project: spec.project.clone(),
            upstream: env("TRUNKFARM_UPSTREAM"),
            commit,
            started_ms: now_ms(),
            ..JobInfo::default()
        }
    }

    /// The job ended with `result`.
    pub fn finish(&mut self, result: &JobResult) {
        self.outcome = outcome_word(result).to_owned();
        self.ended_ms = now_ms();
        self.duration_ms = if result.duration_ms > 0 {
            result.duration_ms
        } else {
            self.ended_ms.saturating_sub(self.started_ms)
        };
    }

    /// "test of alpha against cpython 1a2b3c4d5e" (what is known of it).
    pub fn what(&self) -> String {
        let mut what = if self.project.is_empty() {
            format!("job {}", self.job_id)
        } else if self.kind == "build" && self.project == self.upstream {
            format!("build of {}", self.project)
        } else {
            format!("{} of {}", self.kind, self.project)
        };
        if !self.upstream.is_empty() {
            let word = if self.kind == "build" {
                "at"
            } else {
                "against"
            };
            if self.kind == "build" && self.project == self.upstream {
                what.push_str(&format!(" {word} {}", self.commit));
            } else {
                what.push_str(&format!(" {word} {} {}", self.upstream, self.commit));
            }
        }
        what.trim_end().to_owned()
    }

    /// The line said when it starts.
    pub fn started_line(&self) -> String {
        format!(
            "Started job {} (attempt {}){}: {}.",
            self.job_id,
            self.attempt,
            self.of_hub(),
            self.what()
        )
    }

    /// " of hub `ci`" when the agent serves several hubs.
    pub fn of_hub(&self) -> String {
        if self.hub.is_empty() {
            String::new()
        } else {
            format!(" of hub `{}`", self.hub)
        }
    }

    /// The line said when it ends.
    pub fn finished_line(&self) -> String {
        format!(
            "Finished job {}{}: {}: {} after {}.",
            self.job_id,
            self.of_hub(),
            self.what(),
            self.outcome,
            seconds(self.duration_ms)
        )
    }
}

/// A duration in ms as people say it, to the second ("2m 3s"; "0s").
pub(crate) fn seconds(ms: u64) -> String {
    fmt_duration(Duration::from_secs(ms.div_ceil(1000)))
}

/// How a result ended, in one word.
pub(crate) fn outcome_word(result: &JobResult) -> &'static str {
    if result.handed_back {
        return "handed back";
    }
    match Outcome::try_from(result.outcome).unwrap_or(Outcome::Unspecified) {
        Outcome::Passed => "passed",
        Outcome::Failed => "failed",
        Outcome::TimedOut => "timed out",
        Outcome::Error => "error",
        Outcome::Cancelled => "cancelled",
        Outcome::Unspecified => "unknown",
    }
}

/// Says `line` to the donor (stdout; a closed stdout is not an error worth
/// stopping jobs for).
pub(crate) fn say(line: &str) {
    let mut out = io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        tracing::debug!("stdout is closed: {line}");
    }
}

/// Says hub `hub`'s notice to the donor ("The hub says: a job of project
/// `alpha` waits that your allowed_projects (beta) refuse."; "Hub oss says:
/// …" when it serves `several`, and where to find that hub's own terms when
/// it has some): its words without control characters, capped.
pub(crate) fn hub_notice(hub: &str, several: bool, own_terms: bool, text: &str) {
    let text: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    if text.trim().is_empty() {
        return;
    }
    let mut line = if several {
        format!("Hub {hub} says: {}", text.trim())
    } else {
        format!("The hub says: {}", text.trim())
    };
    if own_terms {
        line.push_str(&format!(
            " (the terms for this hub are in [hubs.{hub}] of agent.toml)"
        ));
    }
    say(&line);
}

/// One runtime download as the donor sees it: a progress bar on stderr
/// when it is a terminal, plain lines on stdout otherwise; the line saying
/// it is done either way.
pub(crate) struct Download {
    what: String,
    bar: Option<indicatif::ProgressBar>,
}

impl Download {
    /// A download of `size` bytes of runtime `sha12` begins.
    pub fn start(sha12: &str, size: u64) -> Download {
        let what = format!(
            "runtime {sha12} ({})",
            trunkfarm_proto::settings::fmt_bytes(size)
        );
        let bar = io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(size);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "Downloading {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(format!("runtime {sha12}"));
            bar
        });
        if bar.is_none() {
            say(&format!("Downloading {what} from the hub."));
        }
        Download { what, bar }
    }

    /// `bytes` more arrived.
    pub fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    /// It is stored and verified, after `took`.
    pub fn done(self, took: Duration) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        say(&format!("Downloaded {} in {}.", self.what, seconds(ms)));
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Appends a finished job to the journal; once in a while (the file past
/// 64 KiB) rewrites it with only the last [`HISTORY_SPAN`].
pub(crate) fn record(dir: &Path, job: &JobInfo) -> io::Result<()> {
    let path = dir.join(HISTORY_FILE);
    let line = serde_json::to_string(job).map_err(io::Error::other)?;
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)?;
    writeln!(file, "{line}")?;
    if file.metadata()?.len() > 64 * 1024 {
        let kept = recent(dir)?;
        let mut text = String::new();
        for job in &kept {
            text.push_str(&serde_json::to_string(job).map_err(io::Error::other)?);
            text.push('\n');
        }
        write_atomic(&path, text.as_bytes(), 0o600)?;
    }
    Ok(())
}

/// The jobs that ended within the last [`HISTORY_SPAN`], oldest first
/// (unreadable lines skipped; no journal: none).
pub(crate) fn recent(dir: &Path) -> io::Result<Vec<JobInfo>> {
    let file = match std::fs::File::open(dir.join(HISTORY_FILE)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let since = now_ms().saturating_sub(HISTORY_SPAN.as_millis() as u64);
    let mut jobs = VecDeque::new();
    for line in io::BufReader::new(file).lines() {
        if let Ok(job) = serde_json::from_str::<JobInfo>(&line?)
            && job.ended_ms >= since
        {
            jobs.push_back(job);
        }
    }
    Ok(jobs.into())
}

/// The donor's pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pause {
    /// Unix ms it began.
    pub since_ms: u64,
    /// Unix ms it ends by itself; `None`: until `resume`.
    pub until_ms: Option<u64>,
}

impl Pause {
    /// Its words for the hub and the donor: "paused by its donor[ until …]".
    pub fn reason(&self) -> &'static str {
        "paused by its donor"
    }

    /// "paused by its donor since … until …".
    pub fn describe(&self) -> String {
        let mut text = format!("{} since {}", self.reason(), utc(self.since_ms));
        if let Some(until) = self.until_ms {
            text.push_str(&format!(" until {}", utc(until)));
        }
        text
    }

    /// Over (its time came).
    pub fn over(&self, now_ms: u64) -> bool {
        self.until_ms.is_some_and(|u| u <= now_ms)
    }
}

/// The pause kept in the state directory; `None` if not paused (or it ran
/// out).
pub(crate) fn load_pause(dir: &Path) -> io::Result<Option<Pause>> {
    match std::fs::read(dir.join(PAUSE_FILE)) {
        Ok(bytes) => {
            let pause: Pause = serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::other(format!("{}: {e}", dir.join(PAUSE_FILE).display()))
            })?;
            Ok((!pause.over(now_ms())).then_some(pause))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Keeps `pause` (or removes it: `None`).
pub(crate) fn save_pause(dir: &Path, pause: Option<&Pause>) -> io::Result<()> {
    let path = dir.join(PAUSE_FILE);
    match pause {
        Some(p) => write_atomic(
            &path,
            serde_json::to_string(p)
                .map_err(io::Error::other)?
                .as_bytes(),
            0o600,
        ),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec(upload: &str) -> JobSpec {
        JobSpec {
            project: "alpha".into(),
            upload_prefix: upload.into(),
            env: HashMap::from([
                ("TRUNKFARM_UPSTREAM".into(), "cpython".into()),
                (
                    "TRUNKFARM_UPSTREAM_COMMIT".into(),
                    "0123456789abcdef0123".into(),
                ),
            ]),
            ..JobSpec::default()
        }
    }

    #[test]
    fn a_job_is_told_in_one_sentence_at_each_end() {
        let job = JobRef {
            job_id: 7,
            attempt: 1,
        };
        let mut info = JobInfo::starting(job, &spec(""));
        assert_eq!(
            info.started_line(),
            "Started job 7 (attempt 1): test of alpha against cpython 0123456789."
        );
        info.finish(&JobResult {
            outcome: Outcome::Failed as i32,
            duration_ms: 123_400,
            ..JobResult::default()
        });
        assert_eq!(
            info.finished_line(),
            "Finished job 7: test of alpha against cpython 0123456789: failed after 2m 4s."
        );
        let mut build = spec("prefix");
        build.project = "cpython".into();
        let info = JobInfo::starting(job, &build);
        assert_eq!(info.what(), "build of cpython at 0123456789");
        // A job submitted by hand: what is known.
        let info = JobInfo::starting(job, &JobSpec::default());
        assert_eq!(info.what(), "job 7");
    }

    #[test]
    fn the_journal_keeps_the_last_day_and_the_pause_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(recent(tmp.path()).unwrap().is_empty());
        let mut old = JobInfo::starting(JobRef::default(), &spec(""));
        old.ended_ms = 1;
        record(tmp.path(), &old).unwrap();
        let mut new = old.clone();
        new.finish(&JobResult::default());
        record(tmp.path(), &new).unwrap();
        assert_eq!(recent(tmp.path()).unwrap(), [new]);

        assert_eq!(load_pause(tmp.path()).unwrap(), None);
        let pause = Pause {
            since_ms: now_ms(),
            until_ms: Some(now_ms() + 60_000),
        };
        save_pause(tmp.path(), Some(&pause)).unwrap();
        assert_eq!(load_pause(tmp.path()).unwrap(), Some(pause));
        // One that ran out is no pause.
        let over = Pause {
            since_ms: 1,
            until_ms: Some(2),
        };
        save_pause(tmp.path(), Some(&over)).unwrap();
        assert_eq!(load_pause(tmp.path()).unwrap(), None);
        save_pause(tmp.path(), None).unwrap();
        save_pause(tmp.path(), None).unwrap();
    }
}
