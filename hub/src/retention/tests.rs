//! Retention over a real pipeline (`pipeline::tests::Farm`: fake git, a
//! dispatcher driven directly, a temporary store): a series goes red and
//! stays red while another takes a steady load of runs with test cases and
//! logs; pruning after every round, with cutoffs at the times earlier
//! rounds ended (the injected clock), removes what expired and keeps the
//! latest results, the open went-red, the grid's runs, the indexes'
//! answers — and the database stops growing.

use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1::{JobRef, LogChunk, LogStream, Outcome, ReportFile, TransitionKind};

use super::{Cutoffs, Retention};
use crate::config::RetentionSection;
use crate::job_key::JobKey;
use crate::pipeline::tests::{ADDER, Farm, RT, green_trunk, passed, regressed_farm};
use crate::results::{Cursor, PAGE_RUNS, Policy};
use crate::store::now_ms;

/// A passing JUnit report with `n` cases.
fn many_cases(n: usize) -> Vec<ReportFile> {
    let cases: String = (0..n)
        .map(|i| format!(r#"<testcase classname="adder.suite" name="adds_case_number_{i}"/>"#))
        .collect();
    vec![ReportFile {
        path: "junit.xml".into(),
        data: format!(r#"<testsuite name="s">{cases}</testsuite>"#).into_bytes(),
        ..Default::default()
    }]
}

/// Lands an adder commit and runs what it sets off (each job logging 4 KiB
/// and reporting 20 passing cases); returns the jobs run.
async fn adder_round(f: &mut Farm) -> Vec<u64> {
    f.git.commit(ADDER);
    f.poll_project(0).await;
    let mut jobs = Vec::new();
    for (job, _, key) in f.assigned() {
        assert!(matches!(key.base(), JobKey::Test { project, .. } if project == "adder"));
        f.logs.append(log(job, 1)).unwrap();
        f.finish(job, &key, Outcome::Passed, many_cases(20)).await;
        jobs.push(job.job_id);
    }
    f.take_in().await;
    jobs
}

fn log(job: JobRef, seq: u64) -> LogChunk {
    LogChunk {
        job: Some(job),
        seq,
        stream: LogStream::Stdout.into(),
        data: vec![b'x'; 4096],
    }
}

/// A time strictly after everything recorded so far, and strictly before
/// anything recorded after it returns.
async fn mark() -> u64 {
    tokio::time::sleep(Duration::from_millis(2)).await;
    let t = now_ms();
    tokio::time::sleep(Duration::from_millis(2)).await;
    t
}

fn retention(f: &Farm, keep_last: u32) -> Retention {
    Retention::new(
        f.results.clone(),
        f.dispatch.clone(),
        f.logs.clone(),
        f.pipeline.clone(),
        f.notifier.clone(),
        RetentionSection {
            keep_last,
            ..RetentionSection::default()
        },
    )
}

#[tokio::test]
async fn old_runs_logs_and_cases_go_the_latest_open_red_and_grid_stay_and_the_database_stops_growing()
 {
    let mut f = regressed_farm().await;
    let went_red = f
        .results
        .transitions_of("rt", "shouter", 10, false)
        .unwrap()
        .into_iter()
        .find(|t| t.kind == TransitionKind::WentRed as i32)
        .unwrap();
    let red_job = went_red.job_id;
    f.logs
        .append(log(
            JobRef {
                job_id: red_job,
                attempt: 1,
            },
            1,
        ))
        .unwrap();

    // keep_last 1: the pages' floor (PAGE_RUNS) is what keeps runs.
    let r = retention(&f, 1);
    let stop = CancellationToken::new();
    const ROUNDS: usize = 80;
    let mut ends = Vec::new();
    let mut jobs = Vec::new();
    let mut sizes = Vec::new();
    let mut pruned = super::Report::default();
    for round in 0..ROUNDS {
        jobs.push(adder_round(&mut f).await);
        ends.push(mark().await);
        // The clock: runs and job records expire 6 rounds later, test
        // cases and logs 3 rounds later.
        if round >= 6 {
            let cut = Cutoffs {
                runs: ends[round - 6],
                test_cases: ends[round - 3],
                logs: ends[round - 3],
                jobs: ends[round - 6],
            };
            let report = r.prune(cut, Duration::ZERO, &stop).await.unwrap();
            pruned.results.add(report.results);
            pruned.logs += report.logs;
            pruned.jobs += report.jobs;
        }
        sizes.push(f.store.live_bytes().unwrap());
    }
    assert!(
        jobs.iter().all(|j| j.len() == 2),
        "adder runs on linux and mac"
    );
    assert!(pruned.results.runs > 0 && pruned.results.cases > 0 && pruned.logs > 0);
    assert!(
        pruned.results.transitions > 0 && pruned.jobs > 0,
        "{pruned:?}"
    );

    // The newest PAGE_RUNS runs of each adder series stay, older ones are
    // gone with their job records, transitions and logs.
    let last = ROUNDS - 1;
    for platform in ["linux", "mac"] {
        let runs = f
            .results
            .recent_runs("adder", "rt", platform, usize::MAX)
            .unwrap();
        assert_eq!(runs.len(), PAGE_RUNS, "{platform}");
    }
    let kept_jobs: HashSet<u64> = jobs[ROUNDS - PAGE_RUNS..]
        .iter()
        .flatten()
        .copied()
        .collect();
    for (round, round_jobs) in jobs.iter().enumerate() {
        for &job in round_jobs {
            let rec = f.dispatch.get(job).unwrap();
            let run = ["linux", "mac"]
                .iter()
                .find_map(|p| f.results.run("adder", "rt", p, job).unwrap());
            let has_log = f.logs.size(job, 1).await.unwrap() > 0;
            assert_eq!(
                run.is_some(),
                kept_jobs.contains(&job),
                "round {round}'s run"
            );
            // The last prune cut job records at the end of round last - 6,
            // logs and cases at the end of round last - 3.
            assert_eq!(
                rec.is_some(),
                round + 6 > last,
                "round {round}'s job record"
            );
            assert_eq!(has_log, round + 3 > last, "round {round}'s log");
            if let Some(run) = run {
                let newest = round == last;
                assert_eq!(
                    !run.cases.is_empty(),
                    round + 3 > last || newest,
                    "round {round}'s cases"
                );
            }
        }
    }

    // Transitions only of runs still stored: a project's listing through
    // its index finds no pruned one.
    let listed = f
        .results
        .transitions_of("", "adder", usize::MAX, true)
        .unwrap();
    assert!(!listed.is_empty());
    for t in &listed {
        assert!(
            kept_jobs.contains(&t.job_id),
            "{t:?} {:?}",
            f.results
                .run("adder", "rt", &t.platform, t.job_id)
                .unwrap()
                .map(|r| r.info)
        );
    }

    // No index entry outlives its transition.
    let tree = f.store.table(crate::store::trees::RESULTS);
    let mut entries = 0;
    for prefix in ["tb/", "tp/", "tu/"] {
        for k in tree.keys(prefix) {
            let k = String::from_utf8(k.unwrap().to_vec()).unwrap();
            let id: u64 = k.rsplit('/').next().unwrap().parse().unwrap();
            assert!(
                f.results.transition(id).unwrap().is_some(),
                "{k} names a pruned transition"
            );
            entries += 1;
        }
    }
    assert!(entries >= listed.len(), "{entries} index entries");

    // The open went-red, its run (with its cases), its log and its job
    // record stay, and breakage still finds it through the commit index.
    assert_eq!(
        f.results.transition(went_red.id).unwrap(),
        Some(went_red.clone())
    );
    let red_run = f
        .results
        .run("shouter", "rt", "linux", red_job)
        .unwrap()
        .expect("the red run");
    assert!(!red_run.cases.is_empty());
    assert!(f.logs.size(red_job, 1).await.unwrap() > 0);
    assert!(f.dispatch.get(red_job).unwrap().is_some());
    let b = f
        .pipeline
        .breakage("rt", &went_red.upstream_commit)
        .await
        .unwrap();
    assert_eq!(
        b.went_red.iter().map(|t| t.id).collect::<Vec<_>>(),
        [went_red.id]
    );

    // The grid: every series' latest result, shouter red since its went-red;
    // the history the dashboard draws holds its runs.
    let grid = f.pipeline.status("").unwrap();
    assert_eq!(grid.cells.len(), 3);
    for cell in &grid.cells {
        assert!(cell.latest.job_id != 0, "{cell:?}");
    }
    let shouter = grid
        .cells
        .iter()
        .find(|c| c.latest.project == "shouter")
        .unwrap();
    assert_eq!(shouter.latest.job_id, red_job);
    assert_eq!(shouter.red_since.as_ref().map(|t| t.id), Some(went_red.id));
    let history = f.pipeline.history(8).unwrap();
    for s in &history[0].series {
        assert!(!s.runs.is_empty(), "{} {}", s.project, s.platform);
    }
    assert!(
        !f.pipeline
            .transitions("rt", "shouter", 10, false)
            .unwrap()
            .is_empty()
    );

    // The once-only markers go with their job's record: no `k<key>` names
    // a pruned job, no `p/<job>` "recorded" marker stays of one, and the
    // head order keeps only commits seen since the jobs' cutoff.
    let tree = |name| f.store.table(name);
    let jobs_tree = tree(crate::store::trees::JOBS);
    let mut markers = 0;
    for item in jobs_tree.scan_raw(b"k") {
        let (k, v) = item.unwrap();
        let id = u64::from_be_bytes(v.as_ref().try_into().unwrap());
        assert!(
            f.dispatch.get(id).unwrap().is_some(),
            "{} names pruned job {id}",
            String::from_utf8_lossy(&k)
        );
        markers += 1;
    }
    assert!(markers > 0);
    for item in tree(crate::store::trees::RESULTS).scan_raw(b"p/") {
        let (k, _) = item.unwrap();
        let id: u64 = String::from_utf8_lossy(&k[2..]).parse().unwrap();
        assert!(
            f.dispatch.get(id).unwrap().is_some(),
            "p/{id} of a pruned job"
        );
    }
    let heads = tree(crate::store::trees::PIPELINE)
        .scan_raw(b"hh/p/adder/")
        .count();
    assert!(heads <= 10, "{heads} adder head sequences stay");

    // The size stops growing: once runs are pruned (after PAGE_RUNS
    // rounds), the next 39 rounds together add under a tenth of what one
    // unpruned round adds (its runs' cases, two logs, job records,
    // transitions, markers: about 16 KB here). Only numbers growing a
    // digit may add a few bytes.
    let unpruned_round = sizes[5].saturating_sub(sizes[4]);
    let steady = sizes[last].saturating_sub(sizes[PAGE_RUNS + 8]);
    let steady_rounds = (last - PAGE_RUNS - 8) as u64;
    println!(
        "{steady} bytes over {steady_rounds} steady rounds; an unpruned round adds {unpruned_round}"
    );
    assert!(
        steady < unpruned_round / 10,
        "{steady} bytes over {steady_rounds} steady rounds; an unpruned round adds {unpruned_round}"
    );

    // Ten more rounds unpruned, then everything expires: a pass goes in
    // steps of at most max_ops (small atomic writes), and still keeps the
    // latest, the open went-red and the pages' runs.
    for _ in 0..10 {
        adder_round(&mut f).await;
    }
    let now = mark().await;
    let kept = f.results.kept().unwrap();
    assert!(kept.jobs.contains(&red_job) && kept.transitions.contains(&went_red.id));
    let policy = Policy {
        runs_before_ms: now,
        cases_before_ms: now,
        keep_last: PAGE_RUNS,
    };
    let mut cursor = Cursor::default();
    let mut steps = 0;
    let mut total = 0;
    let mut last_runs_key: Option<String> = None;
    while !matches!(cursor, Cursor::Done) {
        let p = f
            .results
            .prune_step(policy, &kept, &mut cursor, 5)
            .await
            .unwrap();
        let ops = p.runs + p.cases + p.transitions;
        assert!(ops <= 5, "{p:?}");
        total += ops;
        steps += 1;
        // Each step goes on where the last stopped, never back to the start
        // of a series it went through part of (a series of a hundred
        // thousand runs); only its newest runs, at most keep_last, are
        // looked at again.
        if let Cursor::Runs(key) = &cursor {
            if let Some(last) = &last_runs_key {
                assert!(key >= last, "{key} after {last}");
                assert!(
                    key != last || !key.ends_with('/'),
                    "back to the start of {key}"
                );
            }
            last_runs_key = Some(key.clone());
        }
    }
    // Per adder series: the 10 runs pushed beyond the newest PAGE_RUNS and
    // their transitions, and the cases of the 13 runs that still had them
    // (the 10 new ones, the 3 the last prune left) but the latest.
    assert_eq!(total, 2 * (10 + 10 + 12), "{total} in {steps} steps");
    assert!(steps >= total / 5, "{total} in {steps} steps");
    for platform in ["linux", "mac"] {
        let runs = f
            .results
            .recent_runs("adder", "rt", platform, usize::MAX)
            .unwrap();
        assert_eq!(runs.len(), PAGE_RUNS);
        let newest = f
            .results
            .run("adder", "rt", platform, runs[0].job_id)
            .unwrap()
            .unwrap();
        assert!(!newest.cases.is_empty(), "the latest run keeps its cases");
    }
    assert!(
        !f.results
            .run("shouter", "rt", "linux", red_job)
            .unwrap()
            .unwrap()
            .cases
            .is_empty()
    );
    assert_eq!(f.results.transition(went_red.id).unwrap(), Some(went_red));
}

/// The keys the pipeline could still submit: the upstream head's build,
/// the project head's test against the newest passed build; not an older
/// commit's, a test of an older project commit, a hand submit's
/// idempotency key; an unknown key is kept.
#[tokio::test]
async fn only_keys_the_pipeline_could_submit_again_are_live() {
    let mut f = regressed_farm().await;
    adder_round(&mut f).await;
    let kept = f.results.kept().unwrap();
    let live = f.pipeline.live_keys(&kept).unwrap();
    let key_of = |job: u64| f.dispatch.get(job).unwrap().unwrap().key;

    let good = f.results.good_build("rt", "linux").unwrap().unwrap();
    let build = key_of(good.job_id);
    assert!(live.submittable(&build), "{build}");
    let older = build.replace(&good.commit, &"0".repeat(40));
    assert!(!live.submittable(&older), "{older}");

    let run = f
        .results
        .latest_run("adder", "rt", "linux")
        .unwrap()
        .unwrap();
    let test = key_of(run.info.job_id);
    assert!(live.submittable(&test), "{test}");
    let Some(JobKey::Test { project_commit, .. }) = JobKey::parse(&test) else {
        panic!("{test}")
    };
    let older_project = test.replace(&project_commit, &"1".repeat(40));
    assert!(!live.submittable(&older_project), "{older_project}");
    let other_build = format!(
        "{}/{}",
        test.rsplit_once('/').unwrap().0,
        good.job_id + 1000
    );
    assert!(!live.submittable(&other_build), "{other_build}");

    assert!(!live.submittable("submit/8d1c2f"));
    assert!(live.submittable("something/else/entirely"));
}

/// Everything expired and pruned (every job whose key is not live, with its
/// `k<key>` marker): polling every upstream and project again, and taking
/// in, submits nothing — no job runs twice. The head's first build, no
/// longer the newest once a forced rebuild replaced it (nothing else keeps
/// it), stays with its marker: a poll would build the head again.
#[tokio::test]
async fn after_pruning_everything_expired_a_re_poll_submits_nothing_again() {
    let mut f = regressed_farm().await;
    let first = f.results.good_build("rt", "linux").unwrap().unwrap();
    let head = first.commit.clone();
    f.pipeline.build("rt", &head, true).await.unwrap();
    // The rebuild and what it fans out, until nothing more is queued.
    while !f.run_jobs(passed).await.is_empty() {
        f.take_in().await;
    }
    let rebuilt = f.results.good_build("rt", "linux").unwrap().unwrap();
    assert_eq!(rebuilt.commit, head);
    assert_ne!(
        rebuilt.job_id, first.job_id,
        "the forced rebuild is the newest"
    );
    for _ in 0..3 {
        adder_round(&mut f).await;
    }
    assert!(!f.results.kept().unwrap().jobs.contains(&first.job_id));
    let before = f.dispatch.open_keys("").len();
    let now = mark().await;
    let r = retention(&f, 1);
    let cut = Cutoffs {
        runs: now,
        test_cases: now,
        logs: now,
        jobs: now,
    };
    let report = r
        .prune(cut, Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    assert!(report.jobs > 0 && report.job_marks > 0, "{report:?}");
    for i in 0..2 {
        f.poll_upstream(0).await;
        f.poll_project(i).await;
    }
    f.take_in().await;
    assert!(f.assigned().is_empty(), "a pruned key was submitted again");
    assert_eq!(f.dispatch.open_keys("").len(), before);
    assert!(
        f.dispatch.get(first.job_id).unwrap().is_some(),
        "the head's build"
    );
}

/// An upstream that moves on, all green: once older than `retention.runs`,
/// the builds of commits beyond the dashboard's columns (and no series'
/// last or last green) go, with the head order of commits seen before the
/// jobs' cutoff; the columns' builds, the newest and newest passed stay.
#[tokio::test]
async fn old_builds_and_head_order_go_beyond_the_dashboards_columns() {
    let mut f = Farm::new().await;
    let first = green_trunk(&mut f).await;
    const COMMITS: usize = PAGE_RUNS + 6;
    let mut commits = vec![first];
    for _ in 1..COMMITS {
        commits.push(f.git.commit(RT));
        f.poll_upstream(0).await;
        while !f.run_jobs(passed).await.is_empty() {
            f.take_in().await;
        }
    }
    let now = mark().await;
    let r = retention(&f, 1);
    let cut = Cutoffs {
        runs: now,
        test_cases: now,
        logs: now,
        jobs: now,
    };
    let report = r
        .prune(cut, Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    let built = |c: &str| {
        ["linux", "mac"]
            .iter()
            .filter(|p| f.results.build("rt", p, c).unwrap().is_some())
            .count()
    };
    let gone = COMMITS - PAGE_RUNS;
    assert_eq!(report.results.builds, 2 * gone, "{report:?}");
    for (i, c) in commits.iter().enumerate() {
        let expected = if i < gone { 0 } else { 2 };
        assert_eq!(built(c), expected, "commit {i}'s builds");
    }
    assert_eq!(report.heads, gone, "{report:?}");
    let heads = f.pipeline.recent_heads("rt", usize::MAX).unwrap();
    assert_eq!(heads.len(), PAGE_RUNS);
    assert_eq!(heads[0].commit, *commits.last().unwrap());
    // The grid still has every column's builds and every series' latest.
    let grid = f.pipeline.status("").unwrap();
    assert!(grid.cells.iter().all(|c| c.latest.job_id != 0), "{grid:?}");
    // A second pass finds nothing more.
    let again = r
        .prune(cut, Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((again.results.builds, again.heads), (0, 0), "{again:?}");
}

/// A backlog of expired logs, more than one step's worth, goes in one pass
/// (the logs of up to [`super::STEP`] jobs per write, the rest in later
/// writes); the latest result's log stays.
#[tokio::test]
async fn a_backlog_of_expired_logs_goes_in_one_pass_a_step_of_jobs_per_write() {
    let mut f = regressed_farm().await;
    let mut jobs = Vec::new();
    while jobs.len() <= 2 * super::STEP {
        jobs.extend(adder_round(&mut f).await);
    }
    let now = mark().await;
    let kept = f.results.kept().unwrap().jobs;
    let expired = jobs.iter().filter(|j| !kept.contains(j)).count();
    assert!(expired > 2 * super::STEP - 1, "{expired} expired logs");
    assert!(expired < jobs.len(), "the latest result's log is kept");

    // Only logs expire.
    let cut = Cutoffs {
        runs: 0,
        test_cases: 0,
        logs: now,
        jobs: 0,
    };
    let report = retention(&f, 1)
        .prune(cut, Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    assert!(report.logs >= expired, "{report:?}");
    assert_eq!(report.results, Default::default(), "{report:?}");
    assert_eq!(report.jobs, 0, "{report:?}");
    for job in &jobs {
        let size = f.logs.size(*job, 1).await.unwrap();
        if kept.contains(job) {
            assert!(size > 0, "kept job {job}'s log went");
        } else {
            assert_eq!(size, 0, "job {job}'s log stayed");
        }
    }
}
