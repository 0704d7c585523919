//! `trunkfarm job …`: ad-hoc jobs for operators and benchmarks, and looking
//! at any job's state, result and log.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use trunkfarm_proto::v1::{
    CancelJobRequest, GetJobRequest, JobInfo, JobSpec, JobState, ListJobsRequest, LogStream,
    Outcome, Repository, SubmitJobRequest, WatchJobRequest, watch_job_event,
};

use super::client::{self, AdminClient};
use super::output::{self, Column, Table};
use super::{EXIT_USAGE, status_error, view, when};
use crate::config::HubConfig;

#[derive(Subcommand)]
pub(super) enum JobCommand {
    /// Submit a job and follow it: its log on stdout, a summary on stderr.
    /// Exit code: 0 passed, 1 failed, 3 timed out, 4 infrastructure error,
    /// 5 cancelled, 2 usage or connection error.
    Run(JobArgs),
    /// Submit a job; prints its id.
    Submit(JobArgs),
    /// Show a job's state and result.
    Show {
        /// The job id.
        id: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the log of a job's last attempt (following it if it still runs).
    Log {
        /// The job id.
        id: u64,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in this state: queued, leased, running, finished.
        #[arg(long)]
        state: Option<String>,
        /// Only jobs of this project (the job spec's project).
        #[arg(long)]
        project: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a job has finished, then show it.
    Wait {
        /// The job id.
        id: u64,
        /// Give up after this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        timeout: Duration,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job (a running one is killed on its agent).
    Cancel {
        /// The job id.
        id: u64,
    },
}

/// What to run. The words after `--` form one shell command (joined with
/// spaces, like ssh); each `--command` adds another. Commands run in order
/// with `sh -c`, stopping at the first failure.
#[derive(Args)]
pub(super) struct JobArgs {
    /// Labels an agent must have, comma-separated (e.g. linux-x86_64,gpu).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Kill the job after this long (default: dispatch.default_job_timeout).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// A git repository to check out first; commands run inside it.
    #[arg(long)]
    repo: Option<String>,
    /// The commit, tag or branch of --repo (default: its default branch).
    #[arg(long, requires = "repo")]
    rev: Option<String>,
    /// An environment variable for the job, NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// The project the job belongs to (donors may accept only some projects).
    #[arg(long)]
    project: Option<String>,
    /// Attempts before the job counts as an infrastructure failure.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Only a trusted agent may run it (see `token create --trusted`).
    #[arg(long)]
    trusted_only: bool,
    /// Let the job reach the network (it gets one only on agents whose donor
    /// allows it, `allow_network = true`; otherwise it has none).
    #[arg(long)]
    network: bool,
    /// Submitting again with the same key returns the first job instead of
    /// queuing another (for scripts that retry a submit whose answer they
    /// did not get).
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// A command to run (repeatable; runs before the words after `--`).
    #[arg(long = "command", value_name = "CMD")]
    commands: Vec<String>,
    /// The command to run.
    #[arg(last = true, value_name = "CMD")]
    words: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

impl JobArgs {
    fn request(self) -> anyhow::Result<SubmitJobRequest> {
        let mut commands = self.commands;
        if !self.words.is_empty() {
            commands.push(self.words.join(" "));
        }
        if commands.is_empty() {
            anyhow::bail!(
                "no command given: e.g. `trunkfarm job run -- make test` or `--command 'make test'`"
            );
        }
        Ok(SubmitJobRequest {
            spec: Some(JobSpec {
                commands,
                env: self.env.into_iter().collect(),
                labels: self.labels,
                project: self.project.unwrap_or_default(),
                repository: self.repo.map(|url| Repository {
                    url,
                    rev: self.rev.unwrap_or_default(),
                }),
                timeout_secs: self.timeout.map(|t| t.as_secs().max(1)).unwrap_or(0),
                trusted_only: self.trusted_only,
                network: self.network,
                ..Default::default()
            }),
            max_attempts: self.max_attempts.unwrap_or(0),
            idempotency_key: self.idempotency_key.unwrap_or_default(),
        })
    }
}

/// Runs a `job` subcommand.
pub(super) async fn run(cfg: &HubConfig, command: JobCommand) -> anyhow::Result<ExitCode> {
    let mut client = client::connect(cfg).await?;
    match command {
        JobCommand::Submit(args) => {
            let id = submit(&mut client, args).await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Run(args) => {
            let id = submit(&mut client, args).await?;
            eprintln!("job {id} submitted");
            let info = follow(&mut client, id).await?;
            eprintln!("{}", summary(&info));
            Ok(ExitCode::from(exit_code(&info)))
        }
        JobCommand::Show { id, json } => {
            let info = get(&mut client, id).await?;
            print_job(&info, json)?;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Log { id } => {
            let info = get(&mut client, id).await?;
            if info.state() != JobState::Finished {
                // Still going: follow it live, like `job run`.
                follow(&mut client, id).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut stream = client
                .watch_job(WatchJobRequest { job_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(ev) = stream.message().await.map_err(status_error)? {
                if let Some(watch_job_event::Event::Log(c)) = ev.event
                    && c.job.is_some_and(|j| j.attempt == info.attempt)
                {
                    out.write_all(&c.data)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::List {
            state,
            project,
            limit,
            json,
        } => {
            let state = match state.as_deref() {
                None => JobState::Unspecified,
                Some(s) => JobState::from_str_name(&format!("JOB_STATE_{}", s.to_uppercase()))
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "unknown state {s:?}: use queued, leased, running or finished"
                        )
                    })?,
            };
            let jobs = client
                .list_jobs(ListJobsRequest {
                    state: state.into(),
                    limit,
                    project: project.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .jobs;
            if json {
                output::json_list::<_, view::Job>(&jobs)?;
                return Ok(ExitCode::SUCCESS);
            }
            const COLUMNS: &[Column] = &[
                Column::left("JOB", 8),
                Column::left("STATE", 9),
                Column::left("OUTCOME", 10),
                Column::left("ATTEMPT", 8),
                Column::left("PROJECT", 16),
                Column::left("AGENT", 16),
                Column::last("COMMAND"),
            ];
            let table = Table::new(COLUMNS);
            for j in &jobs {
                let v = view::Job::from(j);
                table.row(&[
                    &j.job_id,
                    &v.state,
                    &v.outcome.unwrap_or("-"),
                    &j.attempt,
                    &or_dash(v.project),
                    &or_dash(&j.agent_id),
                    &j.spec
                        .as_ref()
                        .map(|s| s.commands.join(" && "))
                        .unwrap_or_default(),
                ]);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Wait { id, timeout, json } => {
            let info = match tokio::time::timeout(timeout, wait(&mut client, id)).await {
                Ok(info) => info?,
                Err(_) => {
                    eprintln!(
                        "job {id} did not finish within {}",
                        trunkfarm_proto::settings::fmt_duration(timeout)
                    );
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            print_job(&info, json)?;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel { id } => {
            client
                .cancel_job(CancelJobRequest { job_id: id })
                .await
                .map_err(status_error)?;
            eprintln!("job {id}: cancel requested");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn submit(client: &mut AdminClient, args: JobArgs) -> anyhow::Result<u64> {
    Ok(client
        .submit_job(args.request()?)
        .await
        .map_err(status_error)?
        .into_inner()
        .job_id)
}

async fn get(client: &mut AdminClient, id: u64) -> anyhow::Result<JobInfo> {
    Ok(client
        .get_job(GetJobRequest { job_id: id })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// Waits for the job's final record without printing its log.
pub(super) async fn wait(client: &mut AdminClient, id: u64) -> anyhow::Result<JobInfo> {
    watch(client, id, false).await
}

/// Prints a job's log as it arrives; returns its final record.
async fn follow(client: &mut AdminClient, id: u64) -> anyhow::Result<JobInfo> {
    watch(client, id, true).await
}

/// How often a job that has not started is asked why it waits.
const WAITING_POLL: Duration = Duration::from_secs(1);

/// Watches job `id` until its final record, printing its log (`log`), and,
/// while it is queued, why it waits on stderr, once per reason.
async fn watch(client: &mut AdminClient, id: u64, log: bool) -> anyhow::Result<JobInfo> {
    let mut stream = client
        .watch_job(WatchJobRequest { job_id: id })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut attempt = 0;
    let mut out = std::io::stdout();
    let mut waiting = Waiting::default();
    let mut tick = tokio::time::interval(WAITING_POLL);
    loop {
        let ev = tokio::select! {
            // Cancel-safe: a message half received stays in the stream.
            ev = stream.message() => ev.map_err(status_error)?,
            _ = tick.tick(), if !waiting.started => {
                waiting.ask(client, id).await;
                continue;
            }
        };
        let Some(ev) = ev else {
            anyhow::bail!("the hub ended the watch of job {id} without a result")
        };
        match ev.event {
            Some(watch_job_event::Event::Log(chunk)) if log => {
                waiting.started = true;
                let a = chunk.job.map(|j| j.attempt).unwrap_or(0);
                if a != attempt {
                    if attempt != 0 {
                        eprintln!("[trunkfarm: attempt {attempt} was lost; attempt {a} follows]");
                    }
                    attempt = a;
                }
                if chunk.stream == LogStream::Stderr as i32 {
                    std::io::stderr().write_all(&chunk.data)?;
                } else {
                    out.write_all(&chunk.data)?;
                    out.flush()?;
                }
            }
            Some(watch_job_event::Event::Finished(info)) => return Ok(info),
            _ => {}
        }
    }
}

/// What was said of a queued job's wait, so that each reason is said once.
#[derive(Default)]
struct Waiting {
    /// The reason last said (empty: none yet).
    said: String,
    /// An agent took it: nothing more to ask.
    started: bool,
}

impl Waiting {
    /// Asks the hub about job `id`; says on stderr why it waits when that
    /// changed. A failed ask says nothing (the watch itself reports a hub
    /// that is gone).
    async fn ask(&mut self, client: &mut AdminClient, id: u64) {
        let info = match get(client, id).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!("cannot ask why job {id} waits: {e:#}");
                return;
            }
        };
        if info.state() != JobState::Queued {
            self.started = true;
            return;
        }
        if let Some(line) = self.next(&info.waiting) {
            eprintln!("{line}");
        }
    }

    /// The line to say for a queued job waiting for `reason`, if it is new.
    fn next(&mut self, reason: &str) -> Option<String> {
        if reason.is_empty() || reason == self.said {
            return None;
        }
        reason.clone_into(&mut self.said);
        Some(format!("[trunkfarm: queued: {reason}]"))
    }
}

/// An empty cell as people read it: `-`.
pub(super) fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

fn outcome(info: &JobInfo) -> Option<Outcome> {
    info.result.as_ref().map(|r| r.outcome())
}

/// The process exit code `job run` returns for a finished job.
fn exit_code(info: &JobInfo) -> u8 {
    match outcome(info) {
        Some(Outcome::Passed) => 0,
        Some(Outcome::Failed) => 1,
        Some(Outcome::TimedOut) => 3,
        Some(Outcome::Cancelled) => 5,
        _ => 4,
    }
}

fn summary(info: &JobInfo) -> String {
    let Some(r) = &info.result else {
        return format!("job {} has no result", info.job_id);
    };
    let mut s = format!("job {} {}", info.job_id, view::outcome(r.outcome()));
    if let Some(code) = r.exit_code {
        s.push_str(&format!(" (exit {code})"));
    }
    s.push_str(&format!(
        " in {:.1}s on {}, attempt {}",
        r.duration_ms as f64 / 1000.0,
        or_dash(&info.agent_id),
        info.attempt
    ));
    if !r.detail.is_empty() {
        s.push_str(&format!(": {}", r.detail));
    }
    s
}

fn print_job(info: &JobInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(&view::Job::from(info));
    }
    print!("{}", job_text(info));
    Ok(())
}

/// What `job show` prints for people.
fn job_text(info: &JobInfo) -> String {
    let mut lines = vec![format!(
        "job {}: {}",
        info.job_id,
        view::job_state(info.state())
    )];
    if !info.waiting.is_empty() {
        lines.push(format!("  waiting: {}", info.waiting));
    }
    if let Some(spec) = &info.spec {
        lines.push(format!("  project  {}", or_dash(&spec.project)));
        for c in &spec.commands {
            lines.push(format!("  $ {c}"));
        }
    }
    lines.push(format!("  created  {}", when(info.created_at_ms)));
    for a in &info.attempts {
        let lost = if a.lost_reason.is_empty() {
            String::new()
        } else {
            format!(" — lost: {}", a.lost_reason)
        };
        lines.push(format!(
            "  attempt {} on {} at {}{lost}",
            a.attempt,
            a.agent_id,
            when(a.leased_at_ms)
        ));
    }
    if info.result.is_some() {
        lines.push(format!("  {}", summary(info)));
    }
    lines.push(String::new());
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_reason_is_said_once_per_change() {
        let mut w = Waiting::default();
        assert_eq!(w.next(""), None, "no reason known yet");
        assert_eq!(
            w.next("no agent connected").as_deref(),
            Some("[trunkfarm: queued: no agent connected]")
        );
        assert_eq!(w.next("no agent connected"), None, "said already");
        assert_eq!(
            w.next("no connected agent has label `gpu`").as_deref(),
            Some("[trunkfarm: queued: no connected agent has label `gpu`]")
        );
    }

    #[test]
    fn job_show_names_the_project_or_a_dash() {
        let mut info = JobInfo {
            job_id: 7,
            spec: Some(JobSpec {
                project: "libfoo".into(),
                commands: vec!["make test".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = job_text(&info);
        assert!(text.starts_with("job 7: "), "{text}");
        assert!(
            text.contains("\n  project  libfoo\n  $ make test\n"),
            "{text}"
        );
        info.spec = Some(JobSpec::default());
        assert!(job_text(&info).contains("\n  project  -\n"));
    }
}
