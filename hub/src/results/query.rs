//! The read side: what the admin API shows (the status grid, breakage,
//! transitions), what the notifier reminds of, and what garbage collection
//! keeps. Nothing here writes.

use std::collections::HashSet;

use trunkfarm_proto::v1::{
    BuildInfo, Commit, GetBreakageResponse, GetStatusResponse, RunInfo, StatusCell, Transition,
    TransitionKind, UpstreamInfo,
};

use super::keys::{self, Pointer};
use super::{Results, RunRecord, SeriesState};
use crate::store::StoreError;

/// One series of runs the status grid shows.
#[derive(Clone, Debug)]
pub(crate) struct GridSeries<'a> {
    /// The project tested.
    pub(crate) project: &'a str,
    /// The platform tested on (the upstream is the row's).
    pub(crate) platform: &'a str,
    /// Whether a run of it is queued or running.
    pub(crate) pending: bool,
}

impl Results {
    /// The status grid: for each upstream (in order, as the caller describes
    /// it), its newest and newest passed build per platform, then the newest
    /// run of each of its series with the went-red transition the series is
    /// red since.
    pub(crate) fn status(
        &self,
        rows: Vec<(UpstreamInfo, Vec<GridSeries<'_>>)>,
    ) -> Result<GetStatusResponse, StoreError> {
        let mut out = GetStatusResponse::default();
        for (mut info, series) in rows {
            for platform in &info.platforms {
                if let Some(b) = self.latest_build(&info.name, platform)? {
                    info.latest_builds.push(b);
                }
                if let Some(b) = self.good_build(&info.name, platform)? {
                    info.good_builds.push(b);
                }
            }
            for s in series {
                out.cells.push(self.cell(s, &info.name)?);
            }
            out.upstreams.push(info);
        }
        Ok(out)
    }

    fn cell(&self, s: GridSeries<'_>, upstream: &str) -> Result<StatusCell, StoreError> {
        let latest = self.latest_run(s.project, upstream, s.platform)?;
        let state = self.series(&keys::run_series(s.project, upstream, s.platform))?;
        let red_since = match state.red_now() {
            Some(id) => self.transition(id)?,
            None => None,
        };
        Ok(StatusCell {
            latest: Some(latest.map(|r| r.info).unwrap_or_else(|| RunInfo {
                project: s.project.to_owned(),
                upstream: upstream.to_owned(),
                platform: s.platform.to_owned(),
                ..Default::default()
            })),
            red_since,
            pending: s.pending,
        })
    }

    /// Which series of `upstream` went red at one of `commits` (or with one
    /// of them among the culprits).
    pub(crate) fn breakage(
        &self,
        upstream: &str,
        commits: Vec<Commit>,
    ) -> Result<GetBreakageResponse, StoreError> {
        let wanted: HashSet<&str> = commits.iter().map(|c| c.sha.as_str()).collect();
        let went_red = self.transitions(usize::MAX, |t| {
            t.upstream == upstream
                && t.kind == TransitionKind::WentRed as i32
                && (wanted.contains(t.upstream_commit.as_str())
                    || t.culprits.iter().any(|c| wanted.contains(c.sha.as_str())))
        })?;
        Ok(GetBreakageResponse { commits, went_red })
    }

    /// Stored transitions of `upstream` and `project` (empty: any), newest
    /// first, at most `limit`; only went red and fixed unless `all`.
    pub(crate) fn transitions_of(
        &self,
        upstream: &str,
        project: &str,
        limit: usize,
        all: bool,
    ) -> Result<Vec<Transition>, StoreError> {
        self.transitions(limit, |t| {
            (upstream.is_empty() || t.upstream == upstream)
                && (project.is_empty() || t.project == project)
                && (all
                    || t.kind == TransitionKind::WentRed as i32
                    || t.kind == TransitionKind::Fixed as i32)
        })
    }

    /// Transitions, newest first, that pass `keep`, at most `limit`.
    pub(crate) fn transitions(
        &self,
        limit: usize,
        mut keep: impl FnMut(&Transition) -> bool,
    ) -> Result<Vec<Transition>, StoreError> {
        let mut out = Vec::new();
        for item in self.table.scan::<Transition>(keys::TRANSITIONS).rev() {
            let (_, t) = item?;
            if keep(&t) {
                out.push(t);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Series that are red now, with the went-red transition each began with.
    pub(crate) fn red_series(&self) -> Result<Vec<(String, Transition)>, StoreError> {
        let mut out = Vec::new();
        for item in self.table.scan::<SeriesState>(keys::SERIES) {
            let (k, state) = item?;
            if let Some(id) = state.red_now()
                && let Some(t) = self.transition(id)?
            {
                let key = String::from_utf8_lossy(&k);
                out.push((key.trim_start_matches(keys::SERIES).to_owned(), t));
            }
        }
        Ok(out)
    }

    /// Artifacts a last known result still refers to (the good and newest
    /// builds, and the builds every series' newest run tested): garbage
    /// collection keeps them.
    pub(crate) fn referenced_artifacts(&self) -> Result<HashSet<String>, StoreError> {
        let mut keep = HashSet::new();
        for pointer in [Pointer::Latest, Pointer::Good] {
            for item in self.table.scan::<BuildInfo>(pointer.prefix()) {
                let (_, b) = item?;
                if !b.artifact_sha256.is_empty() {
                    keep.insert(b.artifact_sha256);
                }
            }
        }
        for item in self.table.scan::<RunRecord>(keys::LATEST_RUNS) {
            let (_, run) = item?;
            let i = &run.info;
            if let Some(b) = self.build(&i.upstream, &i.platform, &i.upstream_commit)?
                && !b.artifact_sha256.is_empty()
            {
                keep.insert(b.artifact_sha256);
            }
        }
        Ok(keep)
    }
}
