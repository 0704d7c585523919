//! The hubs this machine is enrolled with, as the state directory holds them.
//!
//! One agent may serve several hubs (issue 15 item 4), each with its own
//! credential (and pinned CA) and its own undelivered results. Layout:
//!
//! ```text
//! <state>/credential.json, results/     the hub enrolled first (the layout from
//!                                       before several hubs, so an existing
//!                                       state directory needs no migration)
//! <state>/hubs/<name>/credential.json,  each hub enrolled after it
//!                     results/
//! ```
//!
//! Everything else — the lock, the control socket, the pause, the job
//! history, the artifact cache and the work directory — is the machine's and
//! shared. A hub's name is the `--hub-name` given at enrollment, or made from
//! its address (`hub.example.org:7443` → `hub.example.org-7443`); it is kept
//! in the credential (`hub_name`; an older credential without one gets the
//! name from its address) and is what `[hubs.NAME]` in agent.toml,
//! `trunkfarm-agent hubs` and `unenroll --hub` use.

use std::path::{Path, PathBuf};

use crate::credential::{Credential, CredentialError};

/// The directory holding the hubs enrolled after the first.
pub(crate) const HUBS_DIR: &str = "hubs";

/// One enrolled hub.
#[derive(Debug, Clone)]
pub(crate) struct EnrolledHub {
    /// Its name on this machine (unique).
    pub name: String,
    /// The directory holding its credential and results.
    pub dir: PathBuf,
    /// Its credential.
    pub credential: Credential,
}

impl EnrolledHub {
    /// True for the hub kept at the state directory's top (enrolled first).
    pub fn is_root(&self, state_dir: &Path) -> bool {
        self.dir == state_dir
    }

    /// Where this hub's jobs run: the work root itself for the first hub
    /// (as before several hubs), `<work_root>/hub-<name>` for the others, so
    /// two hubs' jobs with the same id never share a directory.
    pub fn work_root(&self, state_dir: &Path, work_root: &Path) -> PathBuf {
        if self.is_root(state_dir) {
            work_root.to_path_buf()
        } else {
            work_root.join(format!("hub-{}", self.name))
        }
    }
}

/// The name a hub gets from its address: `host:port` with every run of
/// characters but letters, digits, `.`, `_` and `-` turned into one `-`.
pub(crate) fn default_name(address: &str) -> String {
    let mut name = String::new();
    for c in address.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name = name.trim_matches(|c| c == '-' || c == '.').to_owned();
    if name.is_empty() {
        "hub".to_owned()
    } else {
        name.chars().take(64).collect()
    }
}

/// Checks a hub name given by the donor: 1 to 64 letters, digits, `.`, `_`
/// or `-`, not starting with `.` (it names a directory).
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a usable hub name; expected 1 to 64 letters, digits, '.', '_' or \
             '-', not starting with '.', e.g. \"ci-example\""
        ))
    }
}

/// The hub's name as its credential says (or its address makes it).
pub(crate) fn name_of(credential: &Credential) -> String {
    credential
        .hub_name
        .clone()
        .unwrap_or_else(|| default_name(&credential.hub))
}

/// The enrolled hubs, the first-enrolled one (at the top) first, then by
/// name. `Err` when a credential is damaged; an empty list when none is
/// enrolled.
pub(crate) fn list(state_dir: &Path) -> Result<Vec<EnrolledHub>, CredentialError> {
    let mut hubs = Vec::new();
    if std::fs::symlink_metadata(Credential::path(state_dir)).is_ok() {
        let credential = Credential::load(state_dir)?;
        hubs.push(EnrolledHub {
            name: name_of(&credential),
            dir: state_dir.to_path_buf(),
            credential,
        });
    }
    let mut others = Vec::new();
    if let Ok(entries) = std::fs::read_dir(state_dir.join(HUBS_DIR)) {
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.is_dir() || std::fs::symlink_metadata(Credential::path(&dir)).is_err() {
                // A hub removed half-way (its credential goes first): nothing left to use.
                continue;
            }
            let credential = Credential::load(&dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            others.push(EnrolledHub {
                name,
                dir,
                credential,
            });
        }
    }
    others.sort_by(|a, b| a.name.cmp(&b.name));
    hubs.extend(others);
    Ok(hubs)
}

/// The enrolled hubs, or the "not enrolled" error when there is none.
pub(crate) fn enrolled(state_dir: &Path) -> Result<Vec<EnrolledHub>, CredentialError> {
    let hubs = list(state_dir)?;
    if hubs.is_empty() {
        return Err(CredentialError::NotEnrolled {
            dir: state_dir.to_path_buf(),
        });
    }
    Ok(hubs)
}

/// Picks the hub `name` names among `hubs`; without a name, the only hub.
/// `Err` says what to pass instead.
pub(crate) fn choose<'a>(
    hubs: &'a [EnrolledHub],
    name: Option<&str>,
) -> Result<&'a EnrolledHub, String> {
    let names = || {
        hubs.iter()
            .map(|h| format!("`{}` ({})", h.name, h.credential.hub))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(name) => hubs
            .iter()
            .find(|h| h.name == name || h.credential.hub == name)
            .ok_or_else(|| {
                format!(
                    "no hub named `{name}` is enrolled; the enrolled hubs are {}",
                    names()
                )
            }),
        None if hubs.len() == 1 => Ok(&hubs[0]),
        None => Err(format!(
            "this machine is enrolled with {} hubs: say which with --hub NAME (the enrolled hubs \
             are {})",
            hubs.len(),
            names()
        )),
    }
}

/// Deletes one hub's own files (credential first, so a removal killed
/// half-way leaves no hub that looks enrolled): at the top, its credential
/// and results; under `hubs/`, its whole directory.
pub(crate) fn remove(state_dir: &Path, hub: &EnrolledHub) -> std::io::Result<()> {
    match std::fs::remove_file(Credential::path(&hub.dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    if hub.is_root(state_dir) {
        let results = state_dir.join("results");
        if results.exists() {
            crate::fsutil::remove_tree(&results)?;
        }
        Ok(())
    } else {
        crate::fsutil::remove_tree(&hub.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(hub: &str, name: Option<&str>) -> Credential {
        Credential {
            hub: hub.into(),
            agent_id: format!("ag_{}", hub.len()),
            secret: "s3cr3t-Value_0123456789abcdefghijklmnopqrstu".into(),
            ca_sha256: None,
            enrolled_at: "2025-01-02T03:04:05Z".into(),
            name: None,
            labels: Vec::new(),
            hub_name: name.map(str::to_owned),
        }
    }

    #[test]
    fn names_from_addresses_are_readable_and_usable() {
        assert_eq!(default_name("hub.example.org:7443"), "hub.example.org-7443");
        assert_eq!(default_name("127.0.0.1:40001"), "127.0.0.1-40001");
        assert_eq!(default_name("[::1]:7443"), "1-7443");
        assert_eq!(default_name("::"), "hub");
        for addr in ["hub.example.org:7443", "[::1]:7443", "::"] {
            check_name(&default_name(addr)).unwrap();
        }
        assert!(check_name("ci-example").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_first_hub_is_at_the_top_the_others_under_hubs_and_each_goes_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        assert!(list(state).unwrap().is_empty());
        assert!(matches!(
            enrolled(state).unwrap_err(),
            CredentialError::NotEnrolled { .. }
        ));
        cred("a.example:1", None).save(state).unwrap();
        std::fs::create_dir_all(state.join("results")).unwrap();
        for (name, addr) in [("zed", "z.example:1"), ("beta", "b.example:2")] {
            let dir = state.join(HUBS_DIR).join(name);
            std::fs::create_dir_all(dir.join("results")).unwrap();
            cred(addr, Some(name)).save(&dir).unwrap();
        }
        // A directory without a credential is no hub.
        std::fs::create_dir_all(state.join(HUBS_DIR).join("gone")).unwrap();
        let hubs = list(state).unwrap();
        let names: Vec<&str> = hubs.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["a.example-1", "beta", "zed"]);
        assert!(hubs[0].is_root(state));
        assert_eq!(hubs[0].work_root(state, Path::new("/w")), Path::new("/w"));
        assert_eq!(
            hubs[1].work_root(state, Path::new("/w")),
            Path::new("/w/hub-beta")
        );

        assert_eq!(choose(&hubs, Some("beta")).unwrap().name, "beta");
        assert_eq!(choose(&hubs, Some("z.example:1")).unwrap().name, "zed");
        let e = choose(&hubs, None).unwrap_err();
        assert!(
            e.contains("--hub NAME") && e.contains("`beta` (b.example:2)"),
            "{e}"
        );
        let e = choose(&hubs, Some("nope")).unwrap_err();
        assert!(e.contains("no hub named `nope`"), "{e}");

        // Removing the first hub keeps the machine's files and the others.
        std::fs::write(state.join("history.jsonl"), b"").unwrap();
        remove(state, &hubs[0]).unwrap();
        assert!(!state.join("results").exists());
        assert!(state.join("history.jsonl").exists());
        let names: Vec<String> = list(state).unwrap().into_iter().map(|h| h.name).collect();
        assert_eq!(names, ["beta", "zed"]);
        let hubs = list(state).unwrap();
        remove(state, &hubs[0]).unwrap();
        assert!(!state.join(HUBS_DIR).join("beta").exists());
        assert_eq!(choose(&list(state).unwrap(), None).unwrap().name, "zed");
    }
}
