//! Job cgroups: a memory and a process limit over all of a job's processes
//! together, where the agent may create cgroups.
//!
//! Hosts differ: cgroup v1 controllers each on their own mount
//! (`/sys/fs/cgroup/memory`, `/sys/fs/cgroup/pids`), a unified cgroup2
//! mount, or both side by side with the controllers split between them. Each
//! controller is looked up on its own: the v1 hierarchy that carries it, else
//! the v2 one if it is enabled for the agent's children there. A job cgroup
//! is a child of the agent's own cgroup (so an operator's limits on the agent
//! still hold over its jobs), named after the agent's pid and the job, so
//! two agents on one machine never share one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The prefix of every cgroup the agent creates.
const PREFIX: &str = "trunkfarm-";

/// Numbers this process's job cgroups.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// How long the agent keeps killing what is left in a job's cgroup before
/// it gives up removing it.
const KILL_BOUND: Duration = Duration::from_secs(5);

/// Where one controller's job cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Parent {
    /// The agent's own cgroup directory in that hierarchy.
    pub dir: PathBuf,
    /// A cgroup2 (unified) hierarchy rather than a v1 one.
    pub v2: bool,
}

/// The controllers the agent can use for job limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Controllers {
    /// For `job_memory`.
    pub memory: Option<Parent>,
    /// For `job_processes`.
    pub pids: Option<Parent>,
}

impl Controllers {
    /// Finds this process's cgroups and keeps the controllers under which it
    /// can create a child with the limit file in place. Also removes empty
    /// job cgroups that agents which died left behind.
    pub fn detect() -> Controllers {
        let (Ok(cgroup), Ok(mountinfo)) = (
            fs::read_to_string("/proc/self/cgroup"),
            fs::read_to_string("/proc/self/mountinfo"),
        ) else {
            return Controllers::default();
        };
        let found = locate(&cgroup, &mountinfo);
        Controllers {
            memory: found.memory.filter(|p| usable(p, "memory")),
            pids: found.pids.filter(|p| usable(p, "pids")),
        }
    }

    /// How the limits are enforced, for the start-up line.
    pub fn describe(&self) -> String {
        let one = |p: &Option<Parent>| match p {
            Some(Parent { v2: true, .. }) => "cgroup v2",
            Some(Parent { v2: false, .. }) => "cgroup v1",
            None => "rlimit",
        };
        format!(
            "memory by {}, processes by {}",
            one(&self.memory),
            one(&self.pids)
        )
    }
}

/// The agent's cgroup directory for `memory` and `pids`, from the text of
/// `/proc/self/cgroup` and `/proc/self/mountinfo` (no check that they are
/// usable).
pub(super) fn locate(cgroup: &str, mountinfo: &str) -> Controllers {
    // Mount points: v1 hierarchies by controller, and the v2 one.
    let mut v1_mounts: Vec<(Vec<String>, PathBuf, String)> = Vec::new();
    let mut v2_mount: Option<(PathBuf, String)> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let point = PathBuf::from(unescape(point));
        match *fstype {
            "cgroup" => {
                let opts = right.get(2).copied().unwrap_or("");
                let controllers = opts.split(',').map(str::to_owned).collect();
                v1_mounts.push((controllers, point, unescape(root)));
            }
            "cgroup2" => v2_mount = Some((point, unescape(root))),
            _ => {}
        }
    }
    let mut found = Controllers::default();
    let mut v2_path: Option<String> = None;
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            v2_path = Some(path.to_owned());
            continue;
        }
        for controller in controllers.split(',') {
            let slot = match controller {
                "memory" => &mut found.memory,
                "pids" => &mut found.pids,
                _ => continue,
            };
            if let Some((_, point, root)) = v1_mounts
                .iter()
                .find(|(names, _, _)| names.iter().any(|n| n == controller))
            {
                *slot = Some(Parent {
                    dir: join_cgroup(point, root, path),
                    v2: false,
                });
            }
        }
    }
    if let (Some(path), Some((point, root))) = (v2_path, v2_mount) {
        let dir = join_cgroup(&point, &root, &path);
        for slot in [&mut found.memory, &mut found.pids] {
            if slot.is_none() {
                *slot = Some(Parent {
                    dir: dir.clone(),
                    v2: true,
                });
            }
        }
    }
    found
}

/// The directory of cgroup `path` in a hierarchy mounted at `point` whose
/// mount shows the hierarchy from `root` down.
fn join_cgroup(point: &Path, root: &str, path: &str) -> PathBuf {
    let rel = match path.strip_prefix(root) {
        Some(rest) if root != "/" => rest,
        _ => path,
    };
    point.join(rel.trim_start_matches('/'))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && let Ok(digits) = std::str::from_utf8(digits)
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file that holds a controller's limit.
fn limit_file(controller: &str, v2: bool) -> &'static str {
    match (controller, v2) {
        ("memory", false) => "memory.limit_in_bytes",
        ("memory", true) => "memory.max",
        _ => "pids.max",
    }
}

/// True if a job cgroup with `controller`'s limit can be made under
/// `parent` (tried with a probe cgroup, removed again).
fn usable(parent: &Parent, controller: &str) -> bool {
    remove_stale(&parent.dir);
    if parent.v2 {
        let control = parent.dir.join("cgroup.subtree_control");
        let enabled = |text: &str| text.split_whitespace().any(|c| c == controller);
        let on = fs::read_to_string(&control).is_ok_and(|t| enabled(&t))
            || (fs::write(&control, format!("+{controller}")).is_ok()
                && fs::read_to_string(&control).is_ok_and(|t| enabled(&t)));
        if !on {
            return false;
        }
    }
    let probe = parent
        .dir
        .join(format!("{PREFIX}{}-probe", std::process::id()));
    if fs::create_dir(&probe).is_err() {
        return false;
    }
    let ok = probe.join(limit_file(controller, parent.v2)).exists();
    if let Err(e) = fs::remove_dir(&probe) {
        tracing::debug!(path = %probe.display(), error = %e, "cannot remove the probe cgroup");
    }
    ok
}

/// Removes the empty job cgroups of agents that are no longer running.
fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            // Fails (and stays) while something still runs in it.
            if fs::remove_dir(entry.path()).is_ok() {
                tracing::debug!(path = %entry.path().display(), "removed a stale job cgroup");
            }
        }
    }
}

/// Counters a job's cgroups keep of the limits it hit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Hits {
    /// Processes the kernel killed for want of memory.
    pub oom_kills: u64,
    /// Forks refused at the process limit.
    pub fork_refusals: u64,
}

/// One job's cgroups (one per hierarchy), removed when dropped.
#[derive(Debug)]
pub(super) struct JobCgroup {
    /// The memory controller's job cgroup.
    memory: Option<(PathBuf, bool)>,
    /// The pids controller's job cgroup.
    pids: Option<(PathBuf, bool)>,
}

impl JobCgroup {
    /// Creates `name` under each usable controller with the limits set.
    pub fn create(
        controllers: &Controllers,
        name: &str,
        memory: u64,
        processes: u32,
    ) -> io::Result<JobCgroup> {
        let mut job = JobCgroup {
            memory: None,
            pids: None,
        };
        // Unique per agent process and confinement, whatever `name` is.
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir_of = |p: &Parent| {
            p.dir
                .join(format!("{PREFIX}{}-{seq}-{name}", std::process::id()))
        };
        if let Some(parent) = &controllers.memory {
            let dir = dir_of(parent);
            make(&dir)?;
            job.memory = Some((dir.clone(), parent.v2));
            fs::write(
                dir.join(limit_file("memory", parent.v2)),
                memory.to_string(),
            )?;
            // No swap beyond the limit, where the kernel accounts it (best
            // effort: absent without swap accounting).
            let swap = if parent.v2 {
                ("memory.swap.max", "0".to_owned())
            } else {
                ("memory.memsw.limit_in_bytes", memory.to_string())
            };
            if dir.join(swap.0).exists()
                && let Err(e) = fs::write(dir.join(swap.0), swap.1)
            {
                tracing::debug!(error = %e, "cannot limit a job's swap");
            }
        }
        if let Some(parent) = &controllers.pids {
            let dir = dir_of(parent);
            if job.memory.as_ref().is_none_or(|(m, _)| *m != dir) {
                make(&dir)?;
            }
            job.pids = Some((dir.clone(), parent.v2));
            fs::write(dir.join("pids.max"), processes.to_string())?;
        }
        Ok(job)
    }

    /// The `cgroup.procs` files a process writes `0` into to join the job.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The limits hit so far.
    pub fn hits(&self) -> Hits {
        let counter = |file: PathBuf, key: &str| {
            fs::read_to_string(file)
                .ok()
                .and_then(|text| {
                    text.lines().find_map(|l| {
                        let (k, v) = l.split_once(' ')?;
                        (k == key).then(|| v.trim().parse().ok()).flatten()
                    })
                })
                .unwrap_or(0)
        };
        Hits {
            oom_kills: self.memory.as_ref().map_or(0, |(dir, v2)| {
                let file = if *v2 {
                    "memory.events"
                } else {
                    "memory.oom_control"
                };
                counter(dir.join(file), "oom_kill")
            }),
            fork_refusals: self
                .pids
                .as_ref()
                .map_or(0, |(dir, _)| counter(dir.join("pids.events"), "max")),
        }
    }

    /// Every distinct directory.
    fn dirs(&self) -> impl Iterator<Item = &Path> {
        let memory = self.memory.as_ref().map(|(d, _)| d.as_path());
        let pids = self
            .pids
            .as_ref()
            .map(|(d, _)| d.as_path())
            .filter(|p| Some(*p) != memory);
        memory.into_iter().chain(pids)
    }

    /// Kills whatever still runs in the job's cgroups (a process that left
    /// the job's process group, when there is no PID namespace to end it)
    /// and removes them.
    fn kill_and_remove(&self) {
        let deadline = Instant::now() + KILL_BOUND;
        for dir in self.dirs() {
            loop {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<libc::pid_t> = procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .filter(|&p| p > 1)
                    .collect();
                for pid in &pids {
                    // SAFETY: kill(2) takes plain integers; the pid is a
                    // member of this job's own cgroup.
                    unsafe {
                        libc::kill(*pid, libc::SIGKILL);
                    }
                }
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        tracing::warn!(
                            path = %dir.display(),
                            error = %e,
                            "cannot remove a job's cgroup; processes of the job may still run"
                        );
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        self.kill_and_remove();
    }
}

/// Creates a cgroup directory, reusing a leftover (an earlier agent with the
/// same pid, in a PID namespace, that died).
fn make(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine kind: v1 controllers each mounted on their own, a v2
    /// mount beside them with none of them.
    const HYBRID_CGROUP: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/0489\n2:cpu,cpuacct:/x\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 30 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 30 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
36 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
37 30 0:32 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_controllers_are_found_on_their_own_mounts() {
        let c = locate(HYBRID_CGROUP, HYBRID_MOUNTS);
        assert_eq!(
            c.memory,
            Some(Parent {
                dir: "/sys/fs/cgroup/memory/process_api/0489".into(),
                v2: false
            })
        );
        assert_eq!(
            c.pids,
            Some(Parent {
                dir: "/sys/fs/cgroup/pids".into(),
                v2: false
            })
        );
    }

    #[test]
    fn a_pure_v2_host_uses_the_unified_hierarchy_for_both() {
        let c = locate(
            "0::/system.slice/trunkfarm-agent.service\n",
            "25 20 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        let dir = PathBuf::from("/sys/fs/cgroup/system.slice/trunkfarm-agent.service");
        assert_eq!(
            c.memory,
            Some(Parent {
                dir: dir.clone(),
                v2: true
            })
        );
        assert_eq!(c.pids, Some(Parent { dir, v2: true }));
    }

    #[test]
    fn a_mount_of_a_subtree_is_joined_below_its_root() {
        // A container that sees its own part of the hierarchy mounted.
        let c = locate(
            "5:memory:/docker/abc/job\n",
            "40 30 0:40 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n",
        );
        assert_eq!(
            c.memory.map(|p| p.dir),
            Some(PathBuf::from("/sys/fs/cgroup/memory/job"))
        );
        assert_eq!(c.pids, None);
    }

    #[test]
    fn no_cgroup_mounts_means_no_controllers() {
        assert_eq!(
            locate(HYBRID_CGROUP, "22 27 0:21 / /proc rw - proc proc rw\n"),
            Controllers::default()
        );
        assert_eq!(
            Controllers::default().describe(),
            "memory by rlimit, processes by rlimit"
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/my\040cgroups"), "/mnt/my cgroups");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/odd\04"), r"/odd\04");
    }
}
