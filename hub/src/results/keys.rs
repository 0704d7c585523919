//! The `results` tree's key layout, in one place (the whole database's
//! layout is listed in [`crate::store::trees::RESULTS`]). Names never
//! contain `/` (the config allows `[A-Za-z0-9._-]`), so every prefix below
//! selects exactly its records.

use crate::store::id_key;

/// The prefix of every build (not the pointers: `bl/`, `bg/`).
pub(super) const BUILDS: &str = "b/";

/// `b/<upstream>/<platform>/<commit>` → the newest build of that commit.
pub(super) fn build(upstream: &str, platform: &str, commit: &str) -> String {
    format!("b/{upstream}/{platform}/{commit}")
}

/// The two build pointers per (upstream, platform).
#[derive(Clone, Copy, Debug)]
pub(super) enum Pointer {
    /// `bl/<upstream>/<platform>` → the newest build.
    Latest,
    /// `bg/<upstream>/<platform>` → the newest passed build.
    Good,
}

impl Pointer {
    /// The prefix all of this pointer's keys share.
    pub(super) fn prefix(self) -> &'static str {
        match self {
            Pointer::Latest => "bl/",
            Pointer::Good => "bg/",
        }
    }

    /// The pointer's key for one (upstream, platform).
    pub(super) fn key(self, upstream: &str, platform: &str) -> String {
        format!("{}{upstream}/{platform}", self.prefix())
    }
}

/// The prefix of every run.
pub(super) const RUNS: &str = "r/";

/// `r/<project>/<upstream>/<platform>/` → the runs of a series.
pub(super) fn runs(project: &str, upstream: &str, platform: &str) -> String {
    format!("r/{project}/{upstream}/{platform}/")
}

/// `r/<project>/<upstream>/<platform>/<job id>` → one run.
pub(super) fn run(project: &str, upstream: &str, platform: &str, job_id: u64) -> String {
    format!("{}{}", runs(project, upstream, platform), id_key(job_id))
}

/// The prefix of every series' newest run.
pub(super) const LATEST_RUNS: &str = "rl/";

/// `rl/<project>/<upstream>/<platform>` → the newest run's summary.
pub(super) fn latest_run(project: &str, upstream: &str, platform: &str) -> String {
    format!("{LATEST_RUNS}{project}/{upstream}/{platform}")
}

/// The prefix of every series' state.
pub(super) const SERIES: &str = "s/";

/// A run series' name: `<project>/<upstream>/<platform>`.
pub(super) fn run_series(project: &str, upstream: &str, platform: &str) -> String {
    format!("{project}/{upstream}/{platform}")
}

/// A build series' name: `/<upstream>/<platform>` (no project).
pub(super) fn build_series(upstream: &str, platform: &str) -> String {
    format!("/{upstream}/{platform}")
}

/// `s/<series>` → the series' state.
pub(super) fn series(name: &str) -> String {
    format!("{SERIES}{name}")
}

/// The prefix of every transition.
pub(super) const TRANSITIONS: &str = "t/";

/// `t/<id>` → one transition (ids increase: key order is id order).
pub(super) fn transition(id: u64) -> String {
    format!("{TRANSITIONS}{}", id_key(id))
}

/// `p/<job id>` → marker: this finished job is recorded.
pub(super) fn recorded(job_id: u64) -> String {
    format!("p/{}", id_key(job_id))
}

/// The prefix of every held verdict's confirmation.
pub(super) const CONFIRMATIONS: &str = "c/";

/// `c/<job id>` → the confirmation of that job's held verdict.
pub(super) fn confirmation(job_id: u64) -> String {
    format!("c/{}", id_key(job_id))
}

/// `n/<project>` → how often the project's results and tests flipped on
/// identical re-runs (`noise.rs`).
pub(super) fn noise(project: &str) -> String {
    format!("{NOISE}{project}")
}

/// The prefix of every project's noise record.
pub(super) const NOISE: &str = "n/";

/// `nx/<re-run job id>` → marker: that re-run is counted in its project's
/// noise record (so it is counted once).
pub(super) fn noise_counted(job_id: u64) -> String {
    format!("nx/{}", id_key(job_id))
}

/// `k/<job id>/` → the calibration runs of that job.
pub(super) fn calibration_runs(job_id: u64) -> String {
    format!("k/{}/", id_key(job_id))
}

/// `k/<job id>/<n>` → calibration run `n` of that job (with every case).
pub(super) fn calibration_run(job_id: u64, n: u32) -> String {
    format!("{}{}", calibration_runs(job_id), id_key(u64::from(n)))
}

/// The prefix of every bisection.
pub(super) const BISECTIONS: &str = "x/";

/// `x/<upstream>/<platform>/<last good>/<bad>` → the bisection of that
/// culprit range (see `bisection.rs`).
pub(super) fn bisection(upstream: &str, platform: &str, good: &str, bad: &str) -> String {
    format!("{BISECTIONS}{upstream}/{platform}/{good}/{bad}")
}

/// `tb/<upstream>/<commit>/` → the transitions that may blame `commit`
/// (went red, or a suspicious green, naming it as the commit of their
/// result or in their culprit range): `breakage`'s index.
pub(super) fn blamable_at(upstream: &str, commit: &str) -> String {
    format!("tb/{upstream}/{commit}/")
}

/// `tb/<upstream>/<commit>/<id>` → empty: transition `id` may blame
/// `commit`.
pub(super) fn blamable(upstream: &str, commit: &str, id: u64) -> String {
    format!("{}{}", blamable_at(upstream, commit), id_key(id))
}

/// The prefix of the commit index of hubs before `tb/`: every transition
/// (a still-green too) under each commit it names, `tc/<upstream>/<commit>/<id>`;
/// removed when `tb/` is built.
pub(super) const COMMIT_INDEX_BEFORE_BLAMABLE: &str = "tc/";

/// `tp/<project>/` → the transitions of a project's series: the listing's
/// index.
pub(super) fn transitions_of(project: &str) -> String {
    format!("tp/{project}/")
}

/// `tp/<project>/<id>` → empty: transition `id` is of `project`.
pub(super) fn transition_of(project: &str, id: u64) -> String {
    format!("{}{}", transitions_of(project), id_key(id))
}

/// `tu/<upstream>/` → the transitions of an upstream's series: the
/// listing's index when no project is named.
pub(super) fn transitions_in(upstream: &str) -> String {
    format!("tu/{upstream}/")
}

/// `tu/<upstream>/<id>` → empty: transition `id` is of `upstream`.
pub(super) fn transition_in(upstream: &str, id: u64) -> String {
    format!("{}{}", transitions_in(upstream), id_key(id))
}

/// `tib` → marker: the `tb/`, `tp/` and `tu/` indexes are complete
/// (written once they were built for a database from before them).
pub(super) const INDEXED: &str = "tib";

/// The markers of hubs before `tb/`: `tiu` (`tc/`, `tp/` and `tu/` built)
/// and `ti` (before `tu/`: `tc/` and `tp/`); removed once `tb/` is built.
pub(super) const INDEXED_BEFORE: [&str; 2] = ["tiu", "ti"];

/// The id at the end of an index key (`…/<id>`).
pub(super) fn id_at_end(key: &[u8]) -> Option<u64> {
    let tail = key.rsplit(|b| *b == b'/').next()?;
    std::str::from_utf8(tail).ok()?.parse().ok()
}
