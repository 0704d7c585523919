//! What this machine is, as the hub needs to know it to route jobs: operating
//! system, CPU architecture, core count and memory. Sent in the agent's
//! capabilities and turned into the platform labels jobs select on.

/// The facts about this machine the agent reports to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Machine {
    /// Operating system as Rust names it (`"linux"`, `"macos"`, ...).
    pub os: String,
    /// CPU architecture as Rust names it (`"x86_64"`, `"aarch64"`, ...).
    pub arch: String,
    /// CPUs this process may use (honours affinity masks and cgroup quotas).
    pub cores: u32,
    /// Physical memory in bytes; 0 when it cannot be determined.
    pub memory_bytes: u64,
}

/// Detects the machine the agent runs on. Never fails: what cannot be found
/// out is reported as 1 core or 0 bytes of memory.
pub(crate) fn detect() -> Machine {
    let cores = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    Machine {
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        cores,
        memory_bytes: memory_bytes(),
    }
}

/// Total physical memory: `MemTotal` from `/proc/meminfo` on Linux, 0 elsewhere
/// or when it cannot be read.
fn memory_bytes() -> u64 {
    if cfg!(target_os = "linux") {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| parse_meminfo_total(&text))
            .unwrap_or(0)
    } else {
        0
    }
}

/// Extracts `MemTotal` (in bytes) from the text of `/proc/meminfo`, whose
/// line reads `MemTotal:       16318412 kB` (the kernel's "kB" is KiB).
fn parse_meminfo_total(text: &str) -> Option<u64> {
    let rest = text
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?;
    let mut fields = rest.split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | Some("KB") | Some("KiB") => value.checked_mul(1024),
        None | Some("B") => Some(value),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_machine() {
        let m = detect();
        assert_eq!(m.os, std::env::consts::OS);
        assert_eq!(m.arch, std::env::consts::ARCH);
        assert!(m.cores >= 1);
        if cfg!(target_os = "linux") {
            assert!(m.memory_bytes > 64 * 1024 * 1024, "{m:?}");
        }
    }

    #[test]
    fn parses_meminfo() {
        let text = "MemFree:         1000 kB\nMemTotal:       16318412 kB\nSwapTotal: 0 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(16318412 * 1024));
        assert_eq!(parse_meminfo_total("MemTotal: 12\n"), Some(12));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: lots kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: 5 furlongs\n"), None);
        assert_eq!(parse_meminfo_total(""), None);
        assert_eq!(
            parse_meminfo_total(&format!("MemTotal: {} kB\n", u64::MAX)),
            None,
            "overflow is unknown, not a panic"
        );
    }
}
