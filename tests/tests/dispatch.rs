//! Dispatch at scale: many concurrent jobs over several agents, each run once,
//! each with its own log, spread over every agent.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use trunkfarm_e2e::proto::v1::{
    GetJobRequest, JobSpec, JobState, ListAgentsRequest, ListJobsRequest, LogStream, Outcome,
    SubmitJobRequest, WatchJobRequest, watch_job_event,
};
use trunkfarm_e2e::{AdminClient, Agent, Hub, lines_with};

const JOBS: u64 = 100;

/// Reads a finished job's log through WatchJob: (stdout, stderr) text.
async fn watch_log(mut admin: AdminClient, job_id: u64) -> Result<(String, String), String> {
    let fut = async move {
        let mut stream = admin
            .watch_job(WatchJobRequest { job_id })
            .await
            .map_err(|s| format!("WatchJob({job_id}): {s}"))?
            .into_inner();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match stream.message().await {
                Ok(Some(ev)) => match ev.event {
                    Some(watch_job_event::Event::Log(chunk)) => {
                        match LogStream::try_from(chunk.stream) {
                            Ok(LogStream::Stdout) => out.extend_from_slice(&chunk.data),
                            Ok(LogStream::Stderr) => err.extend_from_slice(&chunk.data),
                            _ => {}
                        }
                    }
                    Some(watch_job_event::Event::Finished(_)) => break,
                    None => {}
                },
                Ok(None) => {
                    return Err(format!(
                        "WatchJob({job_id}) ended without a `finished` event"
                    ));
                }
                Err(s) => return Err(format!("WatchJob({job_id}) stream error: {s}")),
            }
        }
        Ok((
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .unwrap_or_else(|_| Err(format!("WatchJob({job_id}) took longer than 15 s")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_jobs_run_once_each_and_spread_over_all_agents() {
    let hub = Hub::start();
    let mut agents: Vec<Agent> = ["d-one", "d-two", "d-three"]
        .iter()
        .map(|n| Agent::enroll(&hub, n, &[]))
        .collect();
    for a in &mut agents {
        a.start(&["--max-parallel-jobs", "2"]);
    }
    hub.wait_agents_connected(3);
    let names: HashMap<String, String> = agents
        .iter()
        .map(|a| (a.id(&hub), a.name.clone()))
        .collect();
    assert_eq!(names.len(), 3, "agents must have distinct ids: {names:?}");

    let admin = hub.admin().await;

    // Submit all jobs at once.
    let mut set = tokio::task::JoinSet::new();
    for n in 0..JOBS {
        let mut client = admin.clone();
        set.spawn(async move {
            let spec = JobSpec {
                commands: vec!["echo job-$N; echo err-$N >&2".to_string()],
                env: HashMap::from([("N".to_string(), n.to_string())]),
                timeout_secs: 60,
                ..Default::default()
            };
            let r = tokio::time::timeout(
                Duration::from_secs(20),
                client.submit_job(SubmitJobRequest {
                    spec: Some(spec),
                    max_attempts: 0,
                    ..Default::default()
                }),
            )
            .await;
            (n, r)
        });
    }
    let mut job_of: HashMap<u64, u64> = HashMap::new(); // job id -> N
    while let Some(r) = set.join_next().await {
        let (n, r) = r.expect("submit task panicked");
        let resp = r
            .unwrap_or_else(|_| panic!("SubmitJob for N={n} took longer than 20 s"))
            .unwrap_or_else(|s| panic!("SubmitJob for N={n} failed: {s}"));
        let id = resp.into_inner().job_id;
        assert!(
            job_of.insert(id, n).is_none(),
            "job id {id} was returned for two submissions"
        );
    }
    assert_eq!(job_of.len() as u64, JOBS);

    // Wait until every job is finished.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let finished = admin
            .clone()
            .list_jobs(ListJobsRequest {
                state: JobState::Finished as i32,
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("ListJobs")
            .into_inner()
            .jobs;
        let done = finished
            .iter()
            .filter(|j| job_of.contains_key(&j.job_id))
            .count();
        if done == job_of.len() {
            break;
        }
        if Instant::now() >= deadline {
            let all = admin
                .clone()
                .list_jobs(ListJobsRequest {
                    state: 0,
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .expect("ListJobs")
                .into_inner()
                .jobs;
            let mut states: HashMap<i32, usize> = HashMap::new();
            for j in &all {
                *states.entry(j.state).or_default() += 1;
            }
            panic!("only {done} of {JOBS} jobs finished after 60 s; jobs by state: {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("{JOBS} jobs finished in {:?}", started.elapsed());

    // No job was created twice (e.g. by a retried submission).
    let all = admin
        .clone()
        .list_jobs(ListJobsRequest {
            state: 0,
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("ListJobs")
        .into_inner()
        .jobs;
    let listed: HashSet<u64> = all.iter().map(|j| j.job_id).collect();
    assert_eq!(
        all.len(),
        job_of.len(),
        "the hub lists {} jobs, {} were submitted",
        all.len(),
        job_of.len()
    );
    assert_eq!(listed, job_of.keys().copied().collect::<HashSet<_>>());

    // Every job: finished, passed, attempt 1, one attempt, one result.
    let mut per_agent: HashMap<String, usize> = HashMap::new();
    let mut problems = Vec::new();
    for (&id, &n) in &job_of {
        let j = admin
            .clone()
            .get_job(GetJobRequest { job_id: id })
            .await
            .unwrap_or_else(|s| panic!("GetJob({id}): {s}"))
            .into_inner();
        let outcome = j.result.as_ref().map(|r| r.outcome);
        if j.state != JobState::Finished as i32
            || outcome != Some(Outcome::Passed as i32)
            || j.attempt != 1
            || j.attempts.len() != 1
            || !j.attempts[0].lost_reason.is_empty()
            || j.result
                .as_ref()
                .and_then(|r| r.job.as_ref())
                .map(|r| (r.job_id, r.attempt))
                != Some((id, 1))
            || j.result.as_ref().and_then(|r| r.exit_code) != Some(0)
        {
            problems.push(format!("job {id} (N={n}): {j:?}"));
        }
        *per_agent.entry(j.agent_id.clone()).or_default() += 1;
    }
    assert!(
        problems.is_empty(),
        "{} jobs are not `finished, passed, attempt 1, one attempt, exit 0`:\n{}",
        problems.len(),
        problems.join("\n")
    );

    // Each log holds exactly its own lines, on the right stream.
    let mut set = tokio::task::JoinSet::new();
    for (&id, &n) in &job_of {
        let client = admin.clone();
        set.spawn(async move { (id, n, watch_log(client, id).await) });
    }
    let mut bad_logs = Vec::new();
    while let Some(r) = set.join_next().await {
        let (id, n, r) = r.expect("watch task panicked");
        match r {
            Err(e) => bad_logs.push(e),
            Ok((out, err)) => {
                let want_out = format!("job-{n}");
                let want_err = format!("err-{n}");
                let got_out = lines_with(&out, "job-");
                let got_err = lines_with(&err, "err-");
                let misplaced: Vec<&str> = lines_with(&out, "err-")
                    .into_iter()
                    .chain(lines_with(&err, "job-"))
                    .collect();
                if got_out != [want_out.as_str()]
                    || got_err != [want_err.as_str()]
                    || !misplaced.is_empty()
                {
                    bad_logs.push(format!("job {id} (N={n}): stdout {out:?}, stderr {err:?}"));
                }
            }
        }
    }
    assert!(
        bad_logs.is_empty(),
        "{} jobs have a wrong log (want exactly `job-N` on stdout and `err-N` on stderr):\n{}",
        bad_logs.len(),
        bad_logs.join("\n")
    );

    // `trunkfarm job log` agrees, for a sample.
    let mut ids: Vec<(u64, u64)> = job_of.iter().map(|(a, b)| (*a, *b)).collect();
    ids.sort();
    for &(id, n) in ids.iter().step_by(20) {
        let log = hub.job_log(id);
        assert_eq!(
            lines_with(&log, "job-"),
            [format!("job-{n}").as_str()],
            "`job log {id}`:\n{log}"
        );
        assert_eq!(
            lines_with(&log, "err-"),
            [format!("err-{n}").as_str()],
            "`job log {id}`:\n{log}"
        );
    }

    // Fairness: every agent ran a fair share.
    let readable: HashMap<String, usize> = per_agent
        .iter()
        .map(|(id, c)| (names.get(id).cloned().unwrap_or_else(|| id.clone()), *c))
        .collect();
    eprintln!("jobs per agent: {readable:?}");
    for (id, name) in &names {
        let c = per_agent.get(id).copied().unwrap_or(0);
        assert!(
            c >= 10,
            "agent {name} ({id}) ran only {c} of {JOBS} jobs: {readable:?}"
        );
    }
    assert_eq!(
        per_agent.values().sum::<usize>() as u64,
        JOBS,
        "results name unknown agents: {readable:?}"
    );

    // The hub's view of the agents: all still connected, nothing running.
    let listed = admin
        .clone()
        .list_agents(ListAgentsRequest {})
        .await
        .expect("ListAgents")
        .into_inner()
        .agents;
    for a in &listed {
        assert!(a.connected, "agent {} disconnected: {a:?}", a.name);
        assert!(
            a.running.is_empty(),
            "agent {} still runs jobs: {a:?}",
            a.name
        );
    }

    // A job none of them can take says why it waits.
    let gpu = hub.submit(&["--labels", "gpu", "--", "true"]);
    let job = hub.job(gpu);
    assert_eq!(job["state"], "queued", "{job:#}");
    assert_eq!(
        job["waiting"], "no connected agent has label `gpu`",
        "{job:#}"
    );
    drop(agents);
}

/// A submit retried with its idempotency key returns the first job; a
/// malformed key is refused with what to use instead.
#[test]
fn a_retried_submit_with_its_idempotency_key_queues_one_job() {
    let hub = Hub::start();
    let first = hub.submit(&["--idempotency-key", "nightly-42", "--", "true"]);
    let again = hub.submit(&["--idempotency-key", "nightly-42", "--", "true"]);
    assert_eq!(first, again, "the retry names the first job");
    let other = hub.submit(&["--idempotency-key", "nightly-43", "--", "true"]);
    assert_ne!(other, first);
    let jobs = hub.cli_json(&["job", "list", "--json"]);
    assert_eq!(
        jobs.as_array().map(Vec::len),
        Some(2),
        "two keys, two jobs: {jobs:#}"
    );
    let out = hub.cli(&[
        "job",
        "submit",
        "--idempotency-key",
        "has space",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("use printable characters"), "{err}");
}

/// Runs `trunkfarm <args>` whose reader has gone before it writes a byte,
/// as `trunkfarm status | head -1` once head has its line: stdout is a
/// pipe with its read end closed.
fn cli_to_a_gone_reader(hub: &Hub, args: &[&str]) -> std::process::Output {
    use std::io::Read;
    let mut child = std::process::Command::new(&trunkfarm_e2e::bins().hub)
        .arg("--config")
        .arg(&hub.config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn trunkfarm");
    drop(child.stdout.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().expect("kill a hung trunkfarm");
            panic!("`trunkfarm {}` hung on a closed stdout", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = Vec::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_end(&mut stderr).expect("read stderr");
    }
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr,
    }
}

/// The CLI as an operator meets it: jobs name their project and can be
/// listed by it; a revoked token says which one it was and an expired one
/// is marked; a listing piped into `head` ends with exit 0, not a panic;
/// completion scripts are printed for bash, zsh and fish.
#[test]
fn the_cli_names_projects_marks_tokens_and_ends_quietly_when_its_reader_goes() {
    let hub = Hub::start();
    let lib = hub.submit(&["--project", "libfoo", "--", "true"]);
    let other = hub.submit(&["--project", "barapp", "--", "true"]);
    let bare = hub.submit(&["--", "true"]);

    let only = hub.cli_json(&["job", "list", "--json", "--project", "libfoo"]);
    let ids: Vec<u64> = only
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|j| j["job_id"].as_u64().expect("job_id"))
        .collect();
    assert_eq!(ids, [lib], "--project keeps that project's jobs: {only:#}");
    assert_eq!(only[0]["project"], "libfoo", "{only:#}");
    let table = hub.cli_ok(&["job", "list"]);
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains("PROJECT"), "{table}");
    let row = |id: u64| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("job {id} not listed:\n{table}"))
            .to_owned()
    };
    assert!(row(other).contains("barapp"), "{table}");
    assert!(
        !row(bare).contains("libfoo") && !row(bare).contains("barapp"),
        "{table}"
    );
    let shown = hub.cli_ok(&["job", "show", &lib.to_string()]);
    assert!(shown.contains("project  libfoo"), "{shown}");

    // Tokens: what `revoke` revoked; `list` marks expired ones.
    hub.create_token(&["--note", "for-ada"]);
    hub.create_token(&["--note", "short-lived", "--ttl", "1s"]);
    let tokens = hub.cli_json(&["token", "list", "--json"]);
    let id_of = |note: &str| {
        tokens
            .as_array()
            .and_then(|a| a.iter().find(|t| t["note"] == note))
            .and_then(|t| t["token_id"].as_str())
            .unwrap_or_else(|| panic!("no token {note}: {tokens:#}"))
            .to_owned()
    };
    let ada = id_of("for-ada");
    let said = hub.cli_ok(&["token", "revoke", &ada]);
    assert!(
        said.contains(&format!("revoked token {ada}")) && said.contains("for-ada"),
        "{said}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let listed = hub.cli_ok(&["token", "list"]);
    let line = |id: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("token {id} not listed:\n{listed}"))
            .to_owned()
    };
    assert!(line(&ada).contains("revoked"), "{listed}");
    assert!(line(&id_of("short-lived")).contains("expired"), "{listed}");
    let as_json = hub.cli_json(&["token", "list", "--json"]);
    let states: HashSet<&str> = as_json
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["state"].as_str())
        .collect();
    assert_eq!(
        states,
        ["revoked", "expired"].into_iter().collect(),
        "{as_json:#}"
    );

    // Durations as people write them, not in humantime's months.
    let long = hub.cli(&["token", "create", "--ttl", "90d"]);
    let said = String::from_utf8_lossy(&long.stderr);
    assert!(
        !long.status.success() && said.contains("at most 30d") && said.contains("asked for 90d"),
        "{said}"
    );
    let two_days = hub.cli(&["token", "create", "--ttl", "2d"]);
    let said = String::from_utf8_lossy(&two_days.stderr);
    assert!(said.contains("valid for 2d (until "), "{said}");

    // `trunkfarm status | head -1`, `trunkfarm job list --json | head -c 10`.
    for args in [
        &["status"][..],
        &["job", "list", "--json"],
        &["job", "list"],
        &["completions", "bash"],
    ] {
        let out = cli_to_a_gone_reader(&hub, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked"),
            "`trunkfarm {}` to a reader that is gone: {}\n{stderr}",
            args.join(" "),
            out.status
        );
    }

    // `status --watch` into a pipe: one picture after the other, each dated.
    let mut watch = std::process::Command::new(&trunkfarm_e2e::bins().hub)
        .arg("--config")
        .arg(&hub.config)
        .args(["status", "--watch", "1s"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn status --watch");
    let pipe = watch.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut pictures = 0;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pictures < 2 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            pictures += usize::from(line.starts_with("status at "));
            seen.push(line);
        }
    }
    watch.kill().expect("kill status --watch");
    watch.wait().expect("reap status --watch");
    assert_eq!(pictures, 2, "two dated pictures:\n{}", seen.join("\n"));
    assert!(
        !seen.iter().any(|l| l.contains('\x1b')),
        "no escape codes into a pipe: {seen:?}"
    );

    for (shell, mark) in [
        ("bash", "complete"),
        ("zsh", "#compdef"),
        ("fish", "complete -c"),
    ] {
        let script = hub.cli_ok(&["completions", shell]);
        assert!(
            script.contains(mark) && script.contains("breakage") && script.contains("completions"),
            "{shell}:\n{script}"
        );
    }

    // `job wait` (and `job run`) of a queued job say why it waits, once
    // per reason, on stderr; they used to say nothing until it ended.
    let queued = hub.submit(&["--labels", "gpu", "--", "true"]);
    let waited = hub.cli(&["job", "wait", &queued.to_string(), "--timeout", "3s"]);
    let said = String::from_utf8_lossy(&waited.stderr);
    assert_eq!(
        said.matches("[trunkfarm: queued: no agent connected]")
            .count(),
        1,
        "{said}"
    );
    assert!(said.contains("did not finish within 3s"), "{said}");

    // `trunkfarm job run … | head -1`: the reader goes after the job's
    // first line; `job run` ends quietly with 0.
    let mut agent = Agent::enroll(&hub, "runner", &[]);
    agent.start(&[]);
    hub.wait_agents_connected(1);
    let out = cli_to_a_gone_reader(
        &hub,
        &[
            "job",
            "run",
            "--",
            "echo one; sleep 1; echo two; echo three",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "`trunkfarm job run` to a reader that is gone: {}\n{stderr}",
        out.status
    );
}
