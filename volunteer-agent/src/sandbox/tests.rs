//! The sandbox: bubblewrap's argument list (pure), and real jobs run by the
//! executor under a real bubblewrap (these need `bwrap` installed and fail
//! saying so otherwise; `.ci/run` installs it).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1::{JobRef, JobSpec, LogStream, Outcome};

use super::*;
use crate::cache::ArtifactCache;
use crate::executor::{Artifacts, ExecOutcome, JobLimits, run_job};
use crate::transfer::fake::FakeHub;

fn plan<'a>(read_only: &'a [PathBuf], network: bool) -> Plan<'a> {
    Plan {
        workdir: Path::new("/w/job-1-1"),
        tmp: Path::new("/w/job-1-1.tmp"),
        read_only,
        cwd: Path::new("/w/job-1-1/src"),
        network,
        shm_bytes: 1 << 20,
        modern: true,
    }
}

/// The arguments as one string, for readable asserts.
fn joined(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_command_line_confines_the_job() {
    let system = vec![
        Mount::ReadOnly("/usr".into()),
        Mount::Link {
            target: "usr/bin".into(),
            path: "/bin".into(),
        },
        Mount::HideFile("/etc/shadow".into()),
        Mount::HideDir("/usr/local/agent-state".into()),
    ];
    let runtime = [PathBuf::from("/w/job-1-1/runtime")];
    let args = joined(&bwrap_args(&system, &[], &plan(&runtime, false)));
    assert_eq!(
        args,
        "--unshare-all --unshare-user --disable-userns --cap-drop ALL --die-with-parent \
         --new-session --hostname trunkfarm-job \
         --ro-bind /usr /usr --symlink usr/bin /bin --ro-bind /dev/null /etc/shadow \
         --tmpfs /usr/local/agent-state --remount-ro /usr/local/agent-state \
         --proc /proc --dev /dev --size 1048576 --tmpfs /dev/shm \
         --bind /w/job-1-1.tmp /tmp --bind /w/job-1-1.tmp /var/tmp \
         --bind /w/job-1-1 /w/job-1-1 --ro-bind /w/job-1-1/runtime /w/job-1-1/runtime \
         --remount-ro / --chdir /w/job-1-1/src --"
    );
}

#[test]
fn network_only_when_granted_and_older_bwrap_without_new_flags() {
    let resolver = [Mount::ReadOnly(
        "/run/systemd/resolve/stub-resolv.conf".into(),
    )];
    let without = joined(&bwrap_args(&[], &resolver, &plan(&[], false)));
    assert!(!without.contains("--share-net"), "{without}");
    assert!(!without.contains("resolve"), "{without}");
    let with = joined(&bwrap_args(&[], &resolver, &plan(&[], true)));
    assert!(
        with.starts_with("--unshare-all --share-net --unshare-user"),
        "{with}"
    );
    assert!(
        with.contains(
            "--ro-bind /run/systemd/resolve/stub-resolv.conf /run/systemd/resolve/stub-resolv.conf"
        ),
        "{with}"
    );
    let old = Plan {
        modern: false,
        ..plan(&[], false)
    };
    let old = joined(&bwrap_args(&[], &[], &old));
    assert!(
        !old.contains("--disable-userns") && !old.contains("--size"),
        "{old}"
    );
    assert!(old.contains("--cap-drop ALL"), "{old}");
}

#[test]
fn system_mounts_expose_the_system_and_hide_private_paths_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    // A private path outside the system directories is simply not there;
    // inside them (here /etc/hostname and /usr/share) it is covered.
    let mounts = system_mounts(&[
        dir.path().to_path_buf(),
        PathBuf::from("/etc/hostname"),
        PathBuf::from("/usr/share"),
    ]);
    assert!(
        mounts.contains(&Mount::ReadOnly("/usr".into())),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&Mount::ReadOnly("/etc".into())),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&Mount::HideFile("/etc/hostname".into())),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&Mount::HideDir("/usr/share".into())),
        "{mounts:?}"
    );
    if Path::new("/etc/shadow").exists() {
        assert!(
            mounts.contains(&Mount::HideFile("/etc/shadow".into())),
            "{mounts:?}"
        );
    }
    for m in &mounts {
        let path = match m {
            Mount::ReadOnly(p) | Mount::HideDir(p) | Mount::HideFile(p) => p,
            Mount::Link { path, .. } => path,
        };
        assert!(!path.starts_with(dir.path()), "{m:?}");
        assert!(
            !path.starts_with("/home") && !path.starts_with("/root"),
            "{m:?}"
        );
        assert!(
            !path.starts_with("/tmp") && !path.starts_with("/run"),
            "{m:?}"
        );
    }
    // Hides come after what they cover.
    let usr = mounts
        .iter()
        .position(|m| *m == Mount::ReadOnly("/usr".into()));
    let share = mounts
        .iter()
        .position(|m| *m == Mount::HideDir("/usr/share".into()));
    assert!(usr < share);
}

#[test]
fn only_the_allowlisted_variables_pass() {
    let vars = [
        ("PATH", "/usr/bin"),
        ("LANG", "C.UTF-8"),
        ("LC_ALL", "C"),
        ("TZ", "UTC"),
        ("AWS_SECRET_ACCESS_KEY", "hunter2"),
        ("SSH_AUTH_SOCK", "/run/user/0/ssh"),
        ("HOME", "/root"),
        ("PATHX", "no"),
    ]
    .map(|(k, v)| (OsString::from(k), OsString::from(v)));
    let kept: Vec<String> = passed_env(vars.into_iter())
        .into_iter()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept, ["PATH", "LANG", "LC_ALL", "TZ"]);
}

#[test]
fn disk_usage_counts_blocks_once_and_skips() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    std::fs::write(&a, vec![7u8; 1 << 20]).unwrap();
    std::fs::hard_link(&a, dir.path().join("a-again")).unwrap();
    let skipped = dir.path().join("runtime");
    std::fs::create_dir(&skipped).unwrap();
    std::fs::write(skipped.join("big"), vec![7u8; 4 << 20]).unwrap();
    let used = disk_usage(&[dir.path().to_path_buf()], std::slice::from_ref(&skipped));
    assert!((1 << 20..2 << 20).contains(&used), "{used}");
    let all = disk_usage(&[dir.path().to_path_buf()], &[]);
    assert!(all >= 5 << 20, "{all}");
}

// ---------------------------------------------------------------------------
// Real jobs under bubblewrap
// ---------------------------------------------------------------------------

const JOB: JobRef = JobRef {
    job_id: 11,
    attempt: 1,
};

/// Small limits, so that hitting them is quick.
fn small() -> Limits {
    Limits {
        memory: 128 << 20,
        processes: 64,
        disk: 32 << 20,
        open_files: 256,
    }
}

/// Runs `spec` under bubblewrap with `limits`, hiding `private`; returns
/// the outcome and the whole log as text.
async fn run_sandboxed(
    spec: &JobSpec,
    root: &Path,
    limits: Limits,
    private: &[&Path],
) -> (ExecOutcome, String) {
    run_in(spec, root, Sandbox::bwrap_for_tests(limits, private)).await
}

/// Runs `spec` in `sandbox`; returns the outcome and the whole log as text.
async fn run_in(spec: &JobSpec, root: &Path, sandbox: Sandbox) -> (ExecOutcome, String) {
    let side = tempfile::tempdir().unwrap();
    let artifacts = Artifacts {
        cache: ArtifactCache::open(side.path().join("cache"), 1 << 30).unwrap(),
        hub: Arc::new(FakeHub::default()),
        max_unpacked_bytes: 1 << 30,
        sandbox: Arc::new(sandbox),
    };
    let (tx, mut rx) = mpsc::channel::<(LogStream, Vec<u8>)>(4);
    let collector = tokio::spawn(async move {
        let mut text = Vec::new();
        while let Some((stream, data)) = rx.recv().await {
            if stream != LogStream::Unspecified {
                text.extend_from_slice(&data);
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let job_limits = JobLimits {
        timeout: Duration::from_secs(60),
        output_cap_bytes: 0,
    };
    let out = run_job(
        &JOB,
        spec,
        root,
        job_limits,
        tx,
        CancellationToken::new(),
        &artifacts,
    )
    .await;
    (out, collector.await.unwrap())
}

fn spec(commands: &[&str]) -> JobSpec {
    JobSpec {
        commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        ..JobSpec::default()
    }
}

/// True while some process's command line contains `marker`.
fn marker_alive(marker: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
    })
}

#[tokio::test]
async fn a_job_sees_only_its_own_directory_and_the_system() {
    let root = tempfile::tempdir().unwrap();
    let secret_dir = tempfile::tempdir().unwrap();
    std::fs::write(secret_dir.path().join("credential.json"), "SECRET-TOKEN").unwrap();
    let other = root.path().join("job-99-1");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("theirs"), "OTHER-JOB").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "cat {secret}/credential.json; cat {other}/theirs; ls $TRUNKFARM_WORK_DIR/..; \
         echo home=$HOME; env | sort; \
         python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 2)' 2>&1 | tail -1; \
         echo x > /usr/bin/evil 2>&1; echo written > $TRUNKFARM_WORK_DIR/mine; cat $TRUNKFARM_WORK_DIR/mine",
        secret = secret_dir.path().display(),
        other = other.display(),
    );
    let (out, log) = run_sandboxed(
        &spec(&[&script]),
        root.path(),
        small(),
        &[secret_dir.path()],
    )
    .await;
    assert_eq!(out.outcome, Outcome::Passed, "{out:?}\n{log}");
    assert!(
        log.contains("[trunkfarm: sandbox: bubblewrap, no network"),
        "{log}"
    );
    assert!(
        !log.contains("SECRET-TOKEN") && !log.contains("OTHER-JOB"),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l == "job-99-1"),
        "another job's directory is listed:\n{log}"
    );
    assert!(log.contains("written"), "{log}");
    assert!(log.contains("Read-only file system"), "{log}");
    assert!(
        log.contains("Connection refused") || log.contains("Network is unreachable"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "home={}/job-11-1/{HOME_DIR}",
            root.path().display()
        )),
        "{log}"
    );
    // The test runner's own variables (cargo sets these) stay out.
    assert!(!log.contains("CARGO_PKG_NAME"), "{log}");
    assert!(log.contains("TRUNKFARM_JOB_ID=11"), "{log}");
    assert!(!root.path().join("job-11-1.tmp").exists());
    drop(listener);
}

#[tokio::test]
async fn no_process_of_a_job_outlives_it() {
    let root = tempfile::tempdir().unwrap();
    let marker = format!("tf-sandbox-leak-{}", std::process::id());
    let script = format!(
        "setsid sh -c 'sleep 30; : {marker}-a' & (setsid sh -c 'sleep 30; : {marker}-b' &) ; \
         nohup sh -c 'sleep 30; : {marker}-c' >/dev/null 2>&1 & sleep 0.3; echo started"
    );
    let (out, log) = run_sandboxed(&spec(&[&script]), root.path(), small(), &[]).await;
    assert_eq!(out.outcome, Outcome::Passed, "{out:?}\n{log}");
    let mut alive = true;
    for _ in 0..50 {
        alive = marker_alive(&marker);
        if !alive {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!alive, "a process of the job outlived it:\n{log}");
}

#[tokio::test]
async fn limits_stop_a_fork_bomb_a_memory_hog_and_a_disk_filler() {
    let root = tempfile::tempdir().unwrap();
    let cgroups = Controllers::detect();
    // A bounded bomb: counts the forks it managed.
    let bomb = "( n=0; while [ $n -lt 500 ]; do sleep 20 & n=$((n+1)); echo $n > count; done ); \
                read n < count; echo forks=$n";
    let (out, log) = run_sandboxed(&spec(&[bomb]), root.path(), small(), &[]).await;
    let forks: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("forks="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fork count: {out:?}\n{log}"));
    assert!(
        forks < 64,
        "{forks} forks under a limit of 64 processes:\n{log}"
    );
    if cgroups.pids.is_some() {
        assert!(log.contains("process limit reached"), "{log}");
    }

    let hog = "python3 -c 'x = bytearray(512 << 20); print(\"alloc\" + \"ated\")'";
    let (out, log) = run_sandboxed(&spec(&[hog]), root.path(), small(), &[]).await;
    assert_eq!(out.outcome, Outcome::Failed, "{out:?}\n{log}");
    assert!(!log.contains("allocated\n"), "{log}");
    if cgroups.memory.is_some() {
        assert!(out.detail.contains("out of memory"), "{out:?}");
    }

    let filler = "for i in 1 2 3; do head -c 16777216 /dev/zero > f$i; done; echo filled";
    let (out, log) = run_sandboxed(&spec(&[filler, "echo next"]), root.path(), small(), &[]).await;
    assert_eq!(out.outcome, Outcome::Failed, "{out:?}\n{log}");
    assert!(
        out.detail
            .contains("more than this donor's job_disk = 32.0 MiB"),
        "{out:?}"
    );
    assert!(!log.contains("next\n"), "{log}");

    // A file larger than job_disk is cut off at once (RLIMIT_FSIZE).
    let big = "head -c 40000000 /dev/zero > big";
    let (out, log) = run_sandboxed(&spec(&[big]), root.path(), small(), &[]).await;
    assert_eq!(out.outcome, Outcome::Failed, "{out:?}\n{log}");

    // The agent runs the next job fine.
    let (out, log) = run_sandboxed(&spec(&["echo fine"]), root.path(), small(), &[]).await;
    assert_eq!(out.outcome, Outcome::Passed, "{out:?}\n{log}");
}

#[tokio::test]
async fn a_sandbox_that_cannot_start_is_the_agents_error_not_the_jobs_failure() {
    let root = tempfile::tempdir().unwrap();
    // The checkout dir does not exist: bubblewrap cannot chdir there.
    let mut s = spec(&["echo never"]);
    s.env.insert("X".into(), "y".into());
    let side = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::bwrap_for_tests(small(), &[]);
    let workdir = root.path().join("job-5-1");
    std::fs::create_dir(&workdir).unwrap();
    // A read-only directory that is not there: bubblewrap cannot bind it.
    let missing = vec![side.path().join("missing")];
    let broken = sandbox.confine("job-5-1", &workdir, missing).unwrap();
    let mut launch = broken
        .command(
            "/bin/sh",
            &[OsStr::new("-c"), OsStr::new("echo never")],
            &workdir,
            false,
        )
        .unwrap();
    let out = launch.cmd.output().await.unwrap();
    assert!(!out.status.success());
    assert!(!launch.probe.sandbox_started(), "{out:?}");
    broken.close().await;
    let confinement = sandbox.confine("job-5-1", &workdir, Vec::new()).unwrap();
    let mut launch = confinement
        .command(
            "/bin/sh",
            &[OsStr::new("-c"), OsStr::new("exit 3")],
            &workdir,
            false,
        )
        .unwrap();
    let out = launch.cmd.output().await.unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(launch.probe.sandbox_started());
    confinement.close().await;
}

#[tokio::test]
async fn a_donors_cores_hold_the_jobs_cpu_affinity() {
    assert!(offered_cpus(None).is_none(), "no `cores`: every CPU");
    assert!(
        offered_cpus(Some(u32::MAX)).is_none(),
        "more cores than there are: nothing to hold"
    );
    let root = tempfile::tempdir().unwrap();
    let sandbox = Sandbox {
        cpus: offered_cpus(Some(1)),
        ..Sandbox::unconfined()
    };
    // `nproc` counts the CPUs its affinity allows; what the job starts inherits it.
    let (out, log) = run_in(&spec(&["nproc", "sh -c nproc"]), root.path(), sandbox).await;
    assert_eq!(out.outcome, Outcome::Passed, "{out:?}\n{log}");
    let counts: Vec<&str> = log.lines().filter(|l| !l.starts_with('$')).collect();
    assert_eq!(counts, ["1", "1"], "{log}");
}
