//! Fault injection on the hub's disk: its data dir fills up, then turns
//! read-only. The hub must refuse new work with a clear error, keep what it
//! has, record what was running, and take work again once the disk does.
//!
//! The data dir is a small tmpfs mounted in a private mount namespace made by
//! the test's own thread (`unshare(CLONE_NEWNS)`), so the hub and the test see
//! it and nothing else on the machine does. Needs CAP_SYS_ADMIN (CI runs as
//! root).

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::*;

/// The tmpfs under the data dir.
const DISK_MIB: u64 = 64;

/// `hub.min_free_space` of the test hub.
const RESERVE: &str = "16 MiB";

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// Moves this thread into a private mount namespace and mounts a tmpfs of
/// `mib` MiB on `dir`.
fn private_tmpfs(dir: &Path, mib: u64) {
    // SAFETY: plain system calls with valid NUL-terminated strings.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNS),
            0,
            "unshare(CLONE_NEWNS) failed ({}): this test needs CAP_SYS_ADMIN (run as root, as CI does)",
            std::io::Error::last_os_error()
        );
        // Mounts made here must not propagate back to the machine.
        let root = cstr("/");
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0,
            "making / private failed: {}",
            std::io::Error::last_os_error()
        );
    }
    fs::create_dir_all(dir).unwrap();
    remount(dir, mib, false, false);
}

/// Mounts (or remounts) the tmpfs on `dir`, read-only or not.
fn remount(dir: &Path, mib: u64, again: bool, read_only: bool) {
    let target = cstr(&dir.display().to_string());
    let (fs_type, opts) = (cstr("tmpfs"), cstr(&format!("size={mib}m")));
    let mut flags = 0;
    if again {
        flags |= libc::MS_REMOUNT;
    }
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: valid NUL-terminated strings; `opts` outlives the call.
    let rc = unsafe {
        libc::mount(
            fs_type.as_ptr(),
            target.as_ptr(),
            fs_type.as_ptr(),
            flags,
            opts.as_ptr().cast(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount tmpfs on {} (remount={again}, ro={read_only}) failed: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
}

/// Mounts `dir` over itself, read-only.
fn bind_read_only(dir: &Path) {
    let target = cstr(&dir.display().to_string());
    // SAFETY: valid NUL-terminated strings.
    unsafe {
        assert_eq!(
            libc::mount(
                target.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null()
            ),
            0,
            "bind mount failed: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null()
            ),
            0,
            "read-only remount of the bind mount failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Unmounts the topmost mount on `dir`.
fn unmount(dir: &Path) {
    let target = cstr(&dir.display().to_string());
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::umount2(target.as_ptr(), 0) };
    assert_eq!(rc, 0, "umount failed: {}", std::io::Error::last_os_error());
}

/// Free bytes on the file system holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let c = cstr(&dir.display().to_string());
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid path and buffer; read only after success.
    unsafe {
        assert_eq!(libc::statvfs(c.as_ptr(), st.as_mut_ptr()), 0);
        let st = st.assume_init();
        st.f_bavail * st.f_frsize
    }
}

/// Writes zeros to `path` until the file system has at most `leave` bytes free.
fn fill(path: &Path, leave: u64) {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0u8; 256 * 1024];
    let dir = path.parent().unwrap();
    while free_bytes(dir) > leave {
        if f.write_all(&chunk).is_err() {
            break;
        }
        f.flush().unwrap();
    }
}

/// Waits for the hub to write `<data>/hub.json`; returns its address.
fn hub_address(data: &Path) -> String {
    let info = data.join("hub.json");
    wait_for(Duration::from_secs(20), "the hub writes hub.json", || {
        let v: Value = serde_json::from_str(&fs::read_to_string(&info).ok()?).ok()?;
        v["address"].as_str().map(str::to_string)
    })
}

/// A hub whose data dir lives on the test thread's tmpfs.
struct DiskHub {
    dir: TempDir,
    config: PathBuf,
    proc: Proc,
    /// `127.0.0.1:PORT`, kept across restarts (agents dial it).
    address: String,
}

use tempfile::TempDir;

impl DiskHub {
    fn start(data: &Path) -> DiskHub {
        let dir = temp_dir("trunkfarm-e2e-disk-");
        let config = dir.path().join("hub.toml");
        fs::write(
            &config,
            format!(
                "[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmin_free_space = \"{RESERVE}\"\n\n[web]\nlisten = \"127.0.0.1:0\"\n\n[dispatch]\nheartbeat_interval = \"1s\"\nlease_timeout = \"20s\"\nmax_attempts = 3\n",
                data.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(&bins().hub);
        cmd.arg("--config").arg(&config).arg("serve");
        let proc = Proc::spawn("hub", cmd, &dir.path().join("hub"));
        let address = hub_address(data);
        DiskHub {
            dir,
            config,
            proc,
            address,
        }
    }

    /// SIGTERM, and wait for the exit.
    fn stop(&mut self) {
        self.proc.signal(libc::SIGTERM);
        assert!(
            self.proc.wait_exit(Duration::from_secs(20)).is_some(),
            "the hub did not stop on SIGTERM\n{}",
            self.logs()
        );
    }

    /// Runs `serve` in the foreground (for a start that must fail).
    fn serve_once(&self) -> Output {
        let mut cmd = Command::new(&bins().hub);
        cmd.arg("--config").arg(&self.config).arg("serve");
        run_with_timeout(cmd, Duration::from_secs(20))
    }

    /// Starts the hub again with the same config and data.
    fn restart(old: DiskHub, data: &Path) -> DiskHub {
        let DiskHub {
            dir,
            config,
            address,
            ..
        } = old;
        let _ = fs::remove_file(data.join("hub.json"));
        let text = fs::read_to_string(&config).unwrap().replace(
            "listen = \"127.0.0.1:0\"\ndata_dir",
            &format!("listen = \"{address}\"\ndata_dir"),
        );
        fs::write(&config, text).unwrap();
        let mut cmd = Command::new(&bins().hub);
        cmd.arg("--config").arg(&config).arg("serve");
        let proc = Proc::spawn("hub (restarted)", cmd, &dir.path().join("hub2"));
        assert_eq!(
            hub_address(data),
            address,
            "the restarted hub listens elsewhere"
        );
        DiskHub {
            dir,
            config,
            proc,
            address,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&bins().hub);
        cmd.arg("--config").arg(&self.config).args(args);
        run_with_timeout(cmd, CLI_TIMEOUT)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`trunkfarm {}` failed:\n{}\n{}",
            args.join(" "),
            describe(&out),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn submit(&self, command: &str) -> Result<u64, String> {
        let out = self.cli(&["job", "submit", "--", command]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
        } else {
            Err(combined(&out))
        }
    }

    fn job(&self, id: u64) -> Value {
        serde_json::from_str(&self.cli_ok(&["job", "show", &id.to_string(), "--json"])).unwrap()
    }

    /// Polls until job `id` passed. The hub may be restarting in place
    /// meanwhile, so a failed `job show` is retried until the deadline.
    fn wait_passed(&self, id: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.cli(&["job", "show", &id.to_string(), "--json"]);
            if !out.status.success() {
                assert!(
                    Instant::now() < deadline,
                    "job {id}: `job show` kept failing for {timeout:?}:\n{}\n{}",
                    describe(&out),
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let j: Value = serde_json::from_slice(&out.stdout).unwrap();
            if j["state"] == "finished" {
                assert_eq!(
                    s(&j, "outcome"),
                    "passed",
                    "job {id}: {j:#}\n{}",
                    self.logs()
                );
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} not finished after {timeout:?}: {j:#}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        let p = self.dir.path().join("hub");
        format!(
            "---- hub stderr ----\n{}",
            tail(&read_lossy(&p.with_extension("stderr.log")), 40)
        )
    }
}

#[test]
fn a_full_then_read_only_data_dir_refuses_new_work_keeps_the_rest_and_recovers() {
    let base = temp_dir("trunkfarm-e2e-disk-data-");
    let data = base.path().join("data");
    private_tmpfs(&data, DISK_MIB);
    let hub = DiskHub::start(&data);
    let hub_pid = hub.proc.pid();
    let enrollment = hub.cli_ok(&["token", "create"]).trim().to_string();
    let mut agent = Agent::enroll_with(&enrollment, "disk-agent", &[]);
    agent.start(&["--max-parallel-jobs", "2"]);

    let first = hub.submit("echo one").expect("submit on an empty disk");
    hub.wait_passed(first, Duration::from_secs(30));

    // --- The disk fills up while a job runs. ---
    let running = hub.submit("sleep 3; echo two").unwrap();
    let filler = data.join("filler");
    fill(&filler, 8 * 1024 * 1024);
    let refused = hub
        .submit("echo three")
        .expect_err("a submit with the reserve cut into must be refused");
    assert!(
        refused.contains("below hub.min_free_space") && refused.contains("takes no new jobs"),
        "the refusal must say why and what to do: {refused}"
    );
    // What was running still reports, and what was stored is still there.
    hub.wait_passed(running, Duration::from_secs(30));
    hub.wait_passed(first, Duration::from_secs(1));
    fs::remove_file(&filler).unwrap();
    let after = hub
        .submit("echo four")
        .expect("space is back: submits work");
    hub.wait_passed(after, Duration::from_secs(30));

    // --- The disk fills up completely while a job runs: the hub cannot
    // store its result (its database refuses writes after a failed flush). ---
    // Megabytes of output: the database must grow while the disk is full.
    let during = hub
        .submit("sleep 2; echo five; head -c 3000000 /dev/zero | tr '\\0' x")
        .unwrap();
    let ran = wait_for(Duration::from_secs(20), "job five runs", || {
        let j = hub.job(during);
        (j["state"] == "running").then_some(j)
    });
    fill(&filler, 0);
    std::thread::sleep(Duration::from_secs(4));
    let refused = hub
        .submit("echo six")
        .expect_err("a full disk takes no new job");
    assert!(
        refused.contains("free"),
        "the refusal must say why: {refused}"
    );
    fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let done = hub.wait_passed(during, Duration::from_secs(60));
    eprintln!(
        "disk: job {during}'s result recorded {:.1} s after space was freed",
        freed.elapsed().as_secs_f64()
    );
    if hub.logs().contains("restarting the hub") {
        eprintln!("disk: the hub's database had failed; it restarted in place");
    }
    assert_eq!(
        done["attempt"], ran["attempt"],
        "the attempt that ran must be the one recorded: {done:#}"
    );
    // The same process (a restart in place keeps the pid), serving again.
    assert_eq!(hub.proc.pid(), hub_pid, "{}", hub.logs());
    let seventh = hub
        .submit("echo seven")
        .expect("space is back: submits work");
    hub.wait_passed(seventh, Duration::from_secs(30));

    // --- The data dir turns read-only under the running hub: a read-only
    // bind mount over it (the files the hub holds open stay writable, so
    // this checks the refusal, not a failing database). ---
    bind_read_only(&data);
    let refused = hub
        .submit("echo read-only")
        .expect_err("a read-only data dir takes no new job");
    assert!(
        refused.contains("read-only file system") && refused.contains("takes no new jobs"),
        "the refusal must say the data dir is read-only: {refused}"
    );
    unmount(&data);
    let eighth = hub
        .submit("echo eight")
        .expect("writable again: submits work");
    hub.wait_passed(eighth, Duration::from_secs(30));

    // --- A read-only data dir at start: the hub will not start, says why,
    // and starts with everything once the disk is writable again. ---
    let mut hub = hub;
    hub.stop();
    remount(&data, DISK_MIB, true, true);
    let out = hub.serve_once();
    assert!(
        !out.status.success() && combined(&out).contains("Read-only file system"),
        "a hub on a read-only data dir must refuse to start and say why:\n{}",
        describe(&out)
    );
    remount(&data, DISK_MIB, true, false);
    let hub = DiskHub::restart(hub, &data);
    for id in [first, running, after, during, seventh, eighth] {
        hub.wait_passed(id, Duration::from_secs(1));
    }
    let listed: Value =
        serde_json::from_str(&hub.cli_ok(&["job", "list", "--json", "--limit", "100"])).unwrap();
    let ids: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| u(j, "job_id"))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "a job is listed twice: {listed:#}");
    assert_eq!(
        sorted,
        [first, running, after, during, seventh, eighth],
        "exactly the accepted jobs exist (refused ones left nothing): {listed:#}"
    );
}
