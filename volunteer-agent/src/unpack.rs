//! Unpacking a runtime artifact (tar + zstd) into a fresh directory, the
//! "prefix", so that nothing is ever written outside it.
//!
//! An artifact comes from the hub, which got it from another volunteer's
//! machine: it is input, not trusted. The tar crate's own `unpack_in` is not
//! relied upon; every entry is checked here and written with `std::fs`:
//!
//! * paths must be relative with normal components only (no `..`, no root);
//! * every directory on the way to an entry is checked with
//!   `symlink_metadata` and must be a real directory, not a symlink (this
//!   defeats "symlink to `.`, then write through it");
//! * nothing is written over an existing entry: files are created with
//!   `O_EXCL | O_NOFOLLOW`, so an existing symlink is never followed;
//! * symlinks may not be absolute nor point outside the prefix, lexically
//!   when they are met and, once everything is unpacked, following the
//!   chain of symlinks as the kernel would;
//! * hard links may only point at a regular file unpacked before them;
//! * devices, FIFOs, sparse files and any other type are refused;
//! * the entry count and the unpacked size (header sizes and bytes actually
//!   written) are capped, and so are the GNU long-name and PAX headers that
//!   the tar crate would otherwise read whole into memory; a directory or
//!   link that claims data is refused (the tar crate would skip it, uncapped);
//! * setuid, setgid and sticky bits are dropped; executable bits are kept.
//!
//! Any refusal refuses the whole archive and removes the partial prefix.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Read, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tar::EntryType;
use trunkfarm_proto::settings::fmt_bytes;

use crate::fsutil;

/// Entries (tar headers) an archive may have.
pub(crate) const MAX_ENTRIES: u64 = 1_000_000;

/// Largest GNU long name or long link target accepted (the tar crate reads
/// these into memory whole).
const MAX_LONG_NAME_BYTES: u64 = 64 * 1024;

/// Largest PAX extended header accepted (read into memory whole).
const MAX_PAX_HEADER_BYTES: u64 = 1024 * 1024;

/// Symlinks followed while checking where one resolves (the kernel's own
/// limit is 40).
const MAX_SYMLINK_HOPS: usize = 40;

/// Longest entry name quoted in a message.
const SHOWN_NAME_CHARS: usize = 200;

/// Copy buffer, also how often a long file's copy checks for cancellation.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// What one archive may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnpackLimits {
    /// Total bytes of file data written (`[cache] max_unpacked_size`).
    pub max_bytes: u64,
    /// Tar headers read.
    pub max_entries: u64,
}

/// What was unpacked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnpackStats {
    /// Regular files written.
    pub files: u64,
    /// Directories created (listed in the archive).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hard links created.
    pub hard_links: u64,
    /// Bytes of file data written.
    pub bytes: u64,
}

/// Why an archive was not unpacked. The partial prefix is gone either way.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UnpackError {
    /// An entry is unsafe or over a limit: the whole archive is refused.
    #[error("refused the archive: entry `{entry}` {reason}")]
    Refused {
        /// The entry's name as written in the archive (shortened).
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The archive cannot be read: not zstd, not tar, or cut short.
    #[error("the archive is damaged: {0}")]
    Damaged(String),
    /// Writing the prefix failed (disk full, permissions).
    #[error("cannot {what} {}: {source}", .path.display())]
    Io {
        /// What the agent was doing.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The job was cancelled or timed out meanwhile.
    #[error("unpacking was interrupted: the job was stopped")]
    Cancelled,
}

/// Unpacks the tar + zstd `archive` into `prefix`, which must not exist yet
/// (its parent must). Checks `cancel` between entries and while copying.
/// On any error the partial `prefix` is removed.
pub(crate) fn unpack<R: Read>(
    archive: R,
    prefix: &Path,
    limits: &UnpackLimits,
    cancel: &AtomicBool,
) -> Result<UnpackStats, UnpackError> {
    DirBuilder::new()
        .mode(0o755)
        .create(prefix)
        .map_err(|source| UnpackError::Io {
            what: "create the directory",
            path: prefix.to_path_buf(),
            source,
        })?;
    let mut unpacker = Unpacker {
        prefix,
        limits,
        cancel,
        files: HashSet::new(),
        dirs: Vec::new(),
        symlinks: Vec::new(),
        stats: UnpackStats::default(),
        made: std::cell::Cell::new(0),
        overhead: std::cell::Cell::new(0),
    };
    let result = unpacker.run(archive);
    if result.is_err()
        && let Err(e) = fsutil::remove_tree(prefix)
    {
        tracing::warn!(path = %prefix.display(), "cannot remove a refused runtime: {e}");
    }
    result
}

/// A damaged-archive error from a read error.
fn damaged(e: io::Error) -> UnpackError {
    UnpackError::Damaged(e.to_string())
}

/// An entry name for messages: lossy UTF-8, shortened.
fn shown(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    match text.char_indices().nth(SHOWN_NAME_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}

/// Extension headers waiting for the entry they describe.
#[derive(Debug, Default)]
struct Pending {
    /// GNU long name.
    long_name: Option<Vec<u8>>,
    /// GNU long link target.
    long_link: Option<Vec<u8>>,
    /// PAX `path`.
    pax_path: Option<Vec<u8>>,
    /// PAX `linkpath`.
    pax_link: Option<Vec<u8>>,
    /// PAX `size`.
    pax_size: Option<u64>,
}

impl Pending {
    /// True if an extension header waits for its entry.
    fn is_empty(&self) -> bool {
        self.long_name.is_none()
            && self.long_link.is_none()
            && self.pax_path.is_none()
            && self.pax_link.is_none()
            && self.pax_size.is_none()
    }
}

/// One unpacking in progress.
struct Unpacker<'a> {
    /// The directory everything goes into.
    prefix: &'a Path,
    /// The caps.
    limits: &'a UnpackLimits,
    /// Set to stop.
    cancel: &'a AtomicBool,
    /// Regular files written (relative paths): valid hard link targets.
    files: HashSet<PathBuf>,
    /// Directories listed in the archive, with their modes (applied last,
    /// so a read-only directory does not stop its own contents).
    dirs: Vec<(PathBuf, u32)>,
    /// Symlinks created, checked again once everything is there.
    symlinks: Vec<PathBuf>,
    /// Counts.
    stats: UnpackStats,
    /// File-system objects created so far (entries and the directories made
    /// on the way to them): each costs an inode, so each counts against the
    /// entry cap and [`INODE_COST_BYTES`] against the size cap.
    made: std::cell::Cell<u64>,
    /// Bytes charged for directories and links created.
    overhead: std::cell::Cell<u64>,
}

/// What one created directory or link is charged against the size cap (a
/// block and an inode; a file is charged its bytes), so a small archive of a
/// million empty directories cannot exhaust the donor's disk.
pub(crate) const INODE_COST_BYTES: u64 = 4096;

impl Unpacker<'_> {
    /// Counts one more created object; the reason to refuse if it passes a cap.
    /// `costs_space`: a directory or link (a file's cost is its bytes).
    fn charge(&self, costs_space: bool) -> Result<(), String> {
        let made = self.made.get() + 1;
        self.made.set(made);
        if made > self.limits.max_entries {
            return Err(format!(
                "creates more than {} files and directories (directories on the way count too)",
                self.limits.max_entries
            ));
        }
        if costs_space {
            self.overhead
                .set(self.overhead.get().saturating_add(INODE_COST_BYTES));
        }
        let used = self.stats.bytes.saturating_add(self.overhead.get());
        if costs_space && used > self.limits.max_bytes {
            return Err(format!(
                "takes the unpacked size past the {} cap ([cache] max_unpacked_size), counting {} per directory and link",
                fmt_bytes(self.limits.max_bytes),
                fmt_bytes(INODE_COST_BYTES)
            ));
        }
        Ok(())
    }

    /// Reads every entry and writes it, then checks the symlinks as a whole
    /// and applies the directories' modes.
    fn run<R: Read>(&mut self, archive: R) -> Result<UnpackStats, UnpackError> {
        let decoder = zstd::stream::read::Decoder::new(archive).map_err(damaged)?;
        let mut archive = tar::Archive::new(decoder);
        // Raw: long names and PAX headers are read here, with caps.
        let entries = archive.entries().map_err(damaged)?.raw(true);
        let mut pending = Pending::default();
        let mut headers = 0u64;
        for entry in entries {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(UnpackError::Cancelled);
            }
            let mut entry = entry.map_err(damaged)?;
            headers += 1;
            let kind = entry.header().entry_type();
            if headers > self.limits.max_entries {
                return Err(UnpackError::Refused {
                    entry: shown(&entry.path_bytes()),
                    reason: format!(
                        "is past the limit of {} entries per archive",
                        self.limits.max_entries
                    ),
                });
            }
            match kind {
                EntryType::GNULongName => {
                    pending.long_name = Some(read_extension(&mut entry, MAX_LONG_NAME_BYTES)?);
                    continue;
                }
                EntryType::GNULongLink => {
                    pending.long_link = Some(read_extension(&mut entry, MAX_LONG_NAME_BYTES)?);
                    continue;
                }
                EntryType::XHeader => {
                    let data = read_extension(&mut entry, MAX_PAX_HEADER_BYTES)?;
                    read_pax(&data, &mut pending)?;
                    continue;
                }
                EntryType::XGlobalHeader => {
                    // Archive-wide comments and defaults: nothing to apply.
                    read_extension(&mut entry, MAX_PAX_HEADER_BYTES)?;
                    continue;
                }
                _ => {}
            }
            let raw_path = pending
                .pax_path
                .take()
                .or(pending.long_name.take())
                .unwrap_or_else(|| entry.path_bytes().into_owned());
            let raw_link = pending
                .pax_link
                .take()
                .or(pending.long_link.take())
                .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()));
            if let Some(size) = pending.pax_size.take()
                && Some(size) != entry.header().size().ok()
            {
                return Err(UnpackError::Refused {
                    entry: shown(&raw_path),
                    reason: "has a PAX size record that differs from its header (files over \
                             8 GiB), which this agent does not unpack"
                        .to_owned(),
                });
            }
            self.entry(&mut entry, kind, &raw_path, raw_link.as_deref())?;
        }
        if !pending.is_empty() {
            return Err(UnpackError::Damaged(
                "it ends with an extension header that describes no entry".to_owned(),
            ));
        }
        for link in std::mem::take(&mut self.symlinks) {
            self.check_resolution(&link)?;
        }
        self.apply_dir_modes()?;
        Ok(self.stats)
    }

    /// Checks and writes one entry.
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: EntryType,
        raw_path: &[u8],
        raw_link: Option<&[u8]>,
    ) -> Result<(), UnpackError> {
        let name = shown(raw_path);
        let refuse = |reason: String| UnpackError::Refused {
            entry: name.clone(),
            reason,
        };
        // The type first: a device is refused whatever its name.
        match kind {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link => {}
            EntryType::Char => {
                return Err(refuse(
                    "is a character device, which a runtime must not contain".to_owned(),
                ));
            }
            EntryType::Block => {
                return Err(refuse(
                    "is a block device, which a runtime must not contain".to_owned(),
                ));
            }
            EntryType::Fifo => {
                return Err(refuse(
                    "is a FIFO, which a runtime must not contain".to_owned(),
                ));
            }
            EntryType::GNUSparse => {
                return Err(refuse(
                    "is a sparse file, which this agent does not unpack".to_owned(),
                ));
            }
            other => {
                return Err(refuse(format!(
                    "has an entry type this agent does not unpack ({:?}, byte {:?})",
                    other,
                    char::from(other.as_byte())
                )));
            }
        }
        // Only a file has data. The tar reader skips whatever size another
        // entry's header claims, uncapped and without checking `cancel`: a
        // directory "holding" a zstd bomb of zeros would keep the agent
        // decompressing for hours.
        if !matches!(kind, EntryType::Regular | EntryType::Continuous) {
            let size = entry.header().size().map_err(damaged)?;
            if size != 0 {
                return Err(refuse(format!(
                    "is a directory or link that claims {} of data, which it cannot have",
                    fmt_bytes(size)
                )));
            }
        }
        let rel = relative(raw_path).map_err(refuse)?;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let mtime = entry.header().mtime().ok().and_then(mtime_of);
        if rel.as_os_str().is_empty() {
            // `./` itself: the prefix already exists.
            return if kind == EntryType::Directory {
                Ok(())
            } else {
                Err(refuse("names the archive's root as a file".to_owned()))
            };
        }
        self.make_parents(&rel).map_err(|e| match e {
            Parent::Refused(reason) => refuse(reason),
            Parent::Io(e) => e,
        })?;
        let target = self.prefix.join(&rel);
        let existing = match std::fs::symlink_metadata(&target) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(UnpackError::Io {
                    what: "inspect",
                    path: target,
                    source,
                });
            }
        };
        if existing.is_none() {
            let costs_space = !matches!(kind, EntryType::Regular | EntryType::Continuous);
            self.charge(costs_space).map_err(refuse)?;
        }
        if let Some(meta) = &existing {
            if meta.file_type().is_symlink() {
                return Err(refuse("would write over an existing symlink".to_owned()));
            }
            // Repeated directory entries are harmless (and common).
            if !(meta.is_dir() && kind == EntryType::Directory) {
                return Err(refuse(
                    "appears twice in the archive (it would replace an entry already unpacked)"
                        .to_owned(),
                ));
            }
        }
        match kind {
            EntryType::Directory => {
                if existing.is_none() {
                    create_dir(&target)?;
                }
                self.dirs.push((rel, mode));
                self.stats.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.header().size().map_err(damaged)?;
                if self.stats.bytes.saturating_add(size) > self.limits.max_bytes {
                    return Err(refuse(format!(
                        "is {}: unpacking it would pass the {} cap on the unpacked size \
                         ([cache] max_unpacked_size)",
                        fmt_bytes(size),
                        fmt_bytes(self.limits.max_bytes)
                    )));
                }
                let written = self.write_file(entry, &target, mode, mtime, &name)?;
                if written != size {
                    return Err(UnpackError::Damaged(format!(
                        "entry `{name}` holds {written} bytes but its header says {size}"
                    )));
                }
                self.files.insert(rel);
                self.stats.files += 1;
            }
            EntryType::Symlink => {
                let link = raw_link
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| refuse("is a symlink without a target".to_owned()))?;
                let link_path = Path::new(OsStr::from_bytes(link));
                if link.contains(&0) {
                    return Err(refuse(
                        "is a symlink whose target has a NUL byte".to_owned(),
                    ));
                }
                if link_path.has_root() {
                    return Err(refuse(format!(
                        "is a symlink to an absolute path (`{}`)",
                        shown(link)
                    )));
                }
                if !lexically_inside(&rel, link_path) {
                    return Err(refuse(format!(
                        "is a symlink that points outside the directory (`{}`)",
                        shown(link)
                    )));
                }
                std::os::unix::fs::symlink(link_path, &target).map_err(|source| {
                    UnpackError::Io {
                        what: "create the symlink",
                        path: target.clone(),
                        source,
                    }
                })?;
                self.symlinks.push(rel);
                self.stats.symlinks += 1;
            }
            EntryType::Link => {
                let link = raw_link
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| refuse("is a hard link without a target".to_owned()))?;
                let source_rel = relative(link).map_err(|why| {
                    refuse(format!(
                        "is a hard link to `{}`, outside the directory ({why})",
                        shown(link)
                    ))
                })?;
                let source = self.prefix.join(&source_rel);
                let is_file = std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file());
                if !self.files.contains(&source_rel) || !is_file {
                    return Err(refuse(format!(
                        "is a hard link to `{}`, which is not a regular file unpacked before it",
                        shown(link)
                    )));
                }
                // linkat(2) without AT_SYMLINK_FOLLOW: never follows.
                std::fs::hard_link(&source, &target).map_err(|source| UnpackError::Io {
                    what: "create the hard link",
                    path: target.clone(),
                    source,
                })?;
                self.files.insert(rel);
                self.stats.hard_links += 1;
            }
            // Every other type was refused above.
            _ => {}
        }
        Ok(())
    }

    /// Creates the missing directories leading to `rel`, refusing a path
    /// that passes through a symlink or a file.
    fn make_parents(&self, rel: &Path) -> Result<(), Parent> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut dir = self.prefix.to_path_buf();
        let mut shown_dir = PathBuf::new();
        for component in parent.components() {
            dir.push(component);
            shown_dir.push(component);
            match std::fs::symlink_metadata(&dir) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(Parent::Refused(format!(
                        "passes through `{}`, a symlink (writing through it could leave the \
                         directory)",
                        shown_dir.display()
                    )));
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(Parent::Refused(format!(
                        "passes through `{}`, which is not a directory",
                        shown_dir.display()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.charge(true).map_err(Parent::Refused)?;
                    create_dir(&dir).map_err(Parent::Io)?;
                }
                Err(source) => {
                    return Err(Parent::Io(UnpackError::Io {
                        what: "inspect",
                        path: dir,
                        source,
                    }));
                }
            }
        }
        Ok(())
    }

    /// Writes a regular file's data to `target` (which does not exist),
    /// counting bytes against the cap; returns the bytes written.
    fn write_file<R: Read>(
        &mut self,
        entry: &mut R,
        target: &Path,
        mode: u32,
        mtime: Option<SystemTime>,
        name: &str,
    ) -> Result<u64, UnpackError> {
        let io_err = |what: &'static str| {
            let path = target.to_path_buf();
            move |source| UnpackError::Io { what, path, source }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(target)
            .map_err(io_err("create"))?;
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        let mut written = 0u64;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(UnpackError::Cancelled);
            }
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(damaged(e)),
            };
            written += n as u64;
            self.stats.bytes += n as u64;
            if self.stats.bytes > self.limits.max_bytes {
                return Err(UnpackError::Refused {
                    entry: name.to_owned(),
                    reason: format!(
                        "takes the unpacked size past the {} cap ([cache] max_unpacked_size)",
                        fmt_bytes(self.limits.max_bytes)
                    ),
                });
            }
            file.write_all(&buf[..n]).map_err(io_err("write"))?;
        }
        // Permission bits only: setuid, setgid and sticky are dropped.
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
            .map_err(io_err("set the mode of"))?;
        if let Some(mtime) = mtime {
            // Best effort: build tools compare timestamps, nothing depends on it.
            let _ = file.set_modified(mtime);
        }
        Ok(written)
    }

    /// Follows the symlink `rel` (and any symlink its target passes through)
    /// as the kernel would, refusing it if that leaves the prefix.
    fn check_resolution(&self, rel: &Path) -> Result<(), UnpackError> {
        let refuse = |reason: String| UnpackError::Refused {
            entry: rel.display().to_string(),
            reason,
        };
        let read_link = |path: &Path| {
            std::fs::read_link(path).map_err(|source| UnpackError::Io {
                what: "read the symlink",
                path: path.to_path_buf(),
                source,
            })
        };
        // Where resolution stands, as real (non-symlink) directory names.
        let mut at: Vec<OsString> = rel
            .parent()
            .map(|p| p.iter().map(OsStr::to_os_string).collect())
            .unwrap_or_default();
        let first = read_link(&self.prefix.join(rel))?;
        let mut todo: VecDeque<Step> = steps(&first);
        let mut hops = 1;
        while let Some(step) = todo.pop_front() {
            match step {
                Step::Root => {
                    return Err(refuse(
                        "is a symlink that resolves to an absolute path through other symlinks"
                            .to_owned(),
                    ));
                }
                Step::Up => {
                    if at.pop().is_none() {
                        return Err(refuse(format!(
                            "is a symlink that resolves outside the directory through other \
                             symlinks (`{}`)",
                            first.display()
                        )));
                    }
                }
                Step::Name(name) => {
                    let mut path = self.prefix.to_path_buf();
                    path.extend(&at);
                    path.push(&name);
                    match std::fs::symlink_metadata(&path) {
                        Ok(meta) if meta.file_type().is_symlink() => {
                            hops += 1;
                            if hops > MAX_SYMLINK_HOPS {
                                return Err(refuse(
                                    "is part of a symlink loop or a chain of more than 40 \
                                     symlinks"
                                        .to_owned(),
                                ));
                            }
                            let next = read_link(&path)?;
                            for step in steps(&next).into_iter().rev() {
                                todo.push_front(step);
                            }
                        }
                        // A directory, a file, or nothing (a dangling link:
                        // the kernel would stop there).
                        _ => at.push(name),
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives the directories listed in the archive their modes (owner access
    /// kept, so the agent can always clean up), deepest first.
    fn apply_dir_modes(&mut self) -> Result<(), UnpackError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, mode) in dirs {
            let path = self.prefix.join(rel);
            // Only ever a real directory: nothing unpacked replaces one.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o700))
                    .map_err(|source| UnpackError::Io {
                        what: "set the mode of",
                        path,
                        source,
                    })?;
            }
        }
        Ok(())
    }
}

/// Why the way to an entry cannot be made.
enum Parent {
    /// It passes through a symlink or a file.
    Refused(String),
    /// Creating a directory failed.
    Io(UnpackError),
}

/// Creates one directory (mode 0755 before the umask).
fn create_dir(path: &Path) -> Result<(), UnpackError> {
    DirBuilder::new()
        .mode(0o755)
        .create(path)
        .map_err(|source| UnpackError::Io {
            what: "create the directory",
            path: path.to_path_buf(),
            source,
        })
}

/// Reads an extension header's data, refusing one larger than `cap`.
fn read_extension<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    cap: u64,
) -> Result<Vec<u8>, UnpackError> {
    let size = entry.header().size().map_err(damaged)?;
    if size > cap {
        return Err(UnpackError::Refused {
            entry: shown(&entry.path_bytes()),
            reason: format!(
                "is an extension header of {}, more than the {} this agent reads",
                fmt_bytes(size),
                fmt_bytes(cap)
            ),
        });
    }
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    entry
        .take(cap + 1)
        .read_to_end(&mut data)
        .map_err(damaged)?;
    // A GNU long name ends with a NUL.
    while data.last() == Some(&0) {
        data.pop();
    }
    Ok(data)
}

/// Takes the records that matter (`path`, `linkpath`, `size`) from a PAX
/// extended header.
fn read_pax(data: &[u8], pending: &mut Pending) -> Result<(), UnpackError> {
    for record in tar::PaxExtensions::new(data) {
        let record = record.map_err(|e| UnpackError::Damaged(format!("bad PAX header: {e}")))?;
        match record.key_bytes() {
            b"path" => pending.pax_path = Some(record.value_bytes().to_vec()),
            b"linkpath" => pending.pax_link = Some(record.value_bytes().to_vec()),
            b"size" => {
                let size = record
                    .value()
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| UnpackError::Damaged("bad PAX size record".to_owned()))?;
                pending.pax_size = Some(size);
            }
            _ => {}
        }
    }
    Ok(())
}

/// An entry's path made relative to the prefix (`./` dropped); `Err` says
/// why it cannot be (absolute, `..`, empty, NUL).
fn relative(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("has an empty name".to_owned());
    }
    if raw.contains(&0) {
        return Err("has a NUL byte in its name".to_owned());
    }
    let mut out = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err("has a `..` component, which would leave the directory".to_owned());
            }
            Component::RootDir => return Err("has an absolute path".to_owned()),
            Component::Prefix(_) => return Err("has a path prefix".to_owned()),
        }
    }
    Ok(out)
}

/// True if the symlink at `link` (relative to the prefix) with relative
/// target `target` stays inside the prefix, reading `..` lexically.
fn lexically_inside(link: &Path, target: &Path) -> bool {
    let mut depth = link
        .parent()
        .map_or(0, |parent| parent.components().count());
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// One step of a symlink's target.
#[derive(Debug)]
enum Step {
    /// `/`.
    Root,
    /// `..`.
    Up,
    /// A name.
    Name(OsString),
}

/// The steps of a symlink target (`.` dropped).
fn steps(target: &Path) -> VecDeque<Step> {
    target
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Step::Name(n.to_os_string())),
            Component::ParentDir => Some(Step::Up),
            Component::RootDir | Component::Prefix(_) => Some(Step::Root),
            Component::CurDir => None,
        })
        .collect()
}

/// A tar header's modification time as a `SystemTime` (`None` if absurd).
fn mtime_of(seconds: u64) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use tar::Header;

    use super::*;

    /// Generous limits.
    const LIMITS: UnpackLimits = UnpackLimits {
        max_bytes: 1 << 30,
        max_entries: 1000,
    };

    /// One entry of a hand-made archive.
    struct Raw {
        /// Its type.
        kind: EntryType,
        /// Its name, raw (may be hostile).
        path: Vec<u8>,
        /// Its link target, raw.
        link: Option<Vec<u8>>,
        /// Its mode.
        mode: u32,
        /// Its data (also its header size, unless `size` says otherwise).
        data: Vec<u8>,
        /// A header size different from the data's length.
        size: Option<u64>,
    }

    fn raw(kind: EntryType, path: &str) -> Raw {
        Raw {
            kind,
            path: path.as_bytes().to_vec(),
            link: None,
            mode: if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            },
            data: Vec::new(),
            size: None,
        }
    }

    fn file(path: &str, data: &str) -> Raw {
        Raw {
            data: data.as_bytes().to_vec(),
            ..raw(EntryType::Regular, path)
        }
    }

    fn dir(path: &str) -> Raw {
        raw(EntryType::Directory, path)
    }

    fn symlink(path: &str, target: &str) -> Raw {
        Raw {
            link: Some(target.as_bytes().to_vec()),
            mode: 0o777,
            ..raw(EntryType::Symlink, path)
        }
    }

    fn hard_link(path: &str, target: &str) -> Raw {
        Raw {
            link: Some(target.as_bytes().to_vec()),
            ..raw(EntryType::Link, path)
        }
    }

    /// A tar + zstd archive of `entries`, names and link targets written as
    /// raw bytes into the header (so nothing refuses `..` or `/` on the way).
    fn archive(entries: &[Raw]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = Header::new_gnu();
            h.set_entry_type(e.kind);
            h.set_mode(e.mode);
            h.set_size(e.size.unwrap_or(e.data.len() as u64));
            h.set_mtime(1_700_000_000);
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..e.path.len()].copy_from_slice(&e.path);
            if let Some(link) = &e.link {
                let field = &mut h.as_old_mut().linkname;
                field.fill(0);
                field[..link.len()].copy_from_slice(link);
            }
            h.set_cksum();
            builder.append(&h, &e.data[..]).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        zstd::encode_all(&tar[..], 3).unwrap()
    }

    /// A sentinel directory holding the (future) prefix: anything written
    /// outside the prefix would land in it.
    struct Sandbox {
        /// Keeps the directory alive.
        _tmp: tempfile::TempDir,
        /// The sentinel parent.
        sentinel: PathBuf,
        /// The prefix, inside it.
        prefix: PathBuf,
    }

    fn sandbox() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let sentinel = tmp.path().join("sentinel");
        std::fs::create_dir(&sentinel).unwrap();
        let prefix = sentinel.join("prefix");
        Sandbox {
            _tmp: tmp,
            sentinel,
            prefix,
        }
    }

    /// Everything under `dir`, relative, sorted.
    fn tree(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    /// Unpacks hostile `entries` with `limits` into a sandbox; asserts the
    /// refusal and that the sentinel directory is left empty (nothing
    /// written outside the prefix, the partial prefix removed). Returns the
    /// message.
    fn refused_with(entries: &[Raw], limits: &UnpackLimits) -> String {
        let sb = sandbox();
        let data = archive(entries);
        let e = unpack(&data[..], &sb.prefix, limits, &AtomicBool::new(false))
            .expect_err("the archive must be refused");
        assert_eq!(tree(&sb.sentinel), Vec::<String>::new(), "{e}");
        e.to_string()
    }

    fn refused(entries: &[Raw]) -> String {
        refused_with(entries, &LIMITS)
    }

    #[test]
    fn absolute_path_is_refused() {
        let sb = sandbox();
        let target = sb.sentinel.join("pwned");
        let e = refused(&[file(&target.display().to_string(), "x")]);
        assert_eq!(
            e,
            format!(
                "refused the archive: entry `{}` has an absolute path",
                target.display()
            )
        );
        assert!(!target.exists());
    }

    #[test]
    fn dot_dot_component_is_refused() {
        let e = refused(&[dir("bin"), file("bin/../../pwned", "x")]);
        assert_eq!(
            e,
            "refused the archive: entry `bin/../../pwned` has a `..` component, which would \
             leave the directory"
        );
    }

    #[test]
    fn dot_dot_in_a_gnu_long_name_is_refused() {
        let long = format!("{}/../../../pwned", "d/".repeat(60));
        let mut name = long.as_bytes().to_vec();
        name.push(0);
        let e = refused(&[
            Raw {
                data: name,
                ..raw(EntryType::GNULongName, "././@LongLink")
            },
            file("innocent", "x"),
        ]);
        assert!(e.contains("has a `..` component"), "{e}");
        assert!(e.contains("d/d/d/"), "{e}");
    }

    #[test]
    fn dot_dot_in_a_pax_path_is_refused() {
        let record = "../pwned";
        let line_len = format!(" path={record}\n").len();
        let mut len = line_len + 2;
        if len.to_string().len() != 2 {
            len = line_len + len.to_string().len();
        }
        let pax = format!("{len} path={record}\n");
        let e = refused(&[
            Raw {
                data: pax.into_bytes(),
                ..raw(EntryType::XHeader, "PaxHeaders/innocent")
            },
            file("innocent", "x"),
        ]);
        assert_eq!(
            e,
            "refused the archive: entry `../pwned` has a `..` component, which would leave the \
             directory"
        );
    }

    #[test]
    fn oversized_long_name_header_is_refused_before_reading() {
        // A zstd bomb of a long name would otherwise be read into memory.
        let e = refused(&[Raw {
            size: Some(1 << 40),
            ..raw(EntryType::GNULongName, "././@LongLink")
        }]);
        assert!(e.contains("is an extension header of 1.0 TiB"), "{e}");
    }

    #[test]
    fn absolute_symlink_is_refused() {
        let sb = sandbox();
        let outside = sb.sentinel.display().to_string();
        let e = refused(&[symlink("escape", &outside), file("escape/pwned", "x")]);
        assert_eq!(
            e,
            format!(
                "refused the archive: entry `escape` is a symlink to an absolute path (`{outside}`)"
            )
        );
    }

    #[test]
    fn symlink_pointing_outside_is_refused() {
        let e = refused(&[
            dir("lib"),
            symlink("lib/escape", "../.."),
            file("lib/escape/pwned", "x"),
        ]);
        assert_eq!(
            e,
            "refused the archive: entry `lib/escape` is a symlink that points outside the \
             directory (`../..`)"
        );
    }

    #[test]
    fn writing_through_a_symlink_to_dot_is_refused() {
        // `a -> .` is harmless alone; `a/b -> ..` looks lexically inside
        // (`a/..` is the root) but, written through `a`, would land at the
        // root and point above it.
        let e = refused(&[
            symlink("a", "."),
            symlink("a/b", ".."),
            file("a/b/pwned", "x"),
        ]);
        assert_eq!(
            e,
            "refused the archive: entry `a/b` passes through `a`, a symlink (writing through it \
             could leave the directory)"
        );
    }

    #[test]
    fn writing_through_an_inside_symlink_is_refused() {
        let e = refused(&[dir("real"), symlink("alias", "real"), file("alias/f", "x")]);
        assert!(
            e.contains("entry `alias/f` passes through `alias`, a symlink"),
            "{e}"
        );
    }

    #[test]
    fn symlink_chain_resolving_outside_is_refused() {
        // Each link looks inside on its own; together `d/x` -> `d/y/..` ->
        // `<root>/..`.
        let e = refused(&[dir("d"), symlink("d/y", ".."), symlink("d/x", "y/..")]);
        assert_eq!(
            e,
            "refused the archive: entry `d/x` is a symlink that resolves outside the directory \
             through other symlinks (`y/..`)"
        );
    }

    #[test]
    fn symlink_loop_is_refused() {
        let e = refused(&[symlink("a", "b"), symlink("b", "a")]);
        assert!(e.contains("symlink loop"), "{e}");
    }

    #[test]
    fn writing_over_an_existing_symlink_is_refused() {
        let e = refused(&[file("target", "t"), symlink("f", "target"), file("f", "x")]);
        assert_eq!(
            e,
            "refused the archive: entry `f` would write over an existing symlink"
        );
    }

    #[test]
    fn a_file_twice_is_refused() {
        let e = refused(&[file("f", "one"), file("f", "two")]);
        assert!(e.contains("entry `f` appears twice"), "{e}");
    }

    #[test]
    fn hard_link_outside_is_refused() {
        let e = refused(&[hard_link("h", "../pwned")]);
        assert_eq!(
            e,
            "refused the archive: entry `h` is a hard link to `../pwned`, outside the directory \
             (has a `..` component, which would leave the directory)"
        );
        let e = refused(&[hard_link("h", "/etc/passwd")]);
        assert!(
            e.contains("is a hard link to `/etc/passwd`, outside"),
            "{e}"
        );
    }

    #[test]
    fn hard_link_to_something_not_unpacked_is_refused() {
        let e = refused(&[hard_link("h", "later"), file("later", "x")]);
        assert_eq!(
            e,
            "refused the archive: entry `h` is a hard link to `later`, which is not a regular \
             file unpacked before it"
        );
    }

    #[test]
    fn hard_link_to_a_symlink_is_refused() {
        let e = refused(&[file("f", "x"), symlink("s", "f"), hard_link("h", "s")]);
        assert!(
            e.contains("which is not a regular file unpacked before it"),
            "{e}"
        );
    }

    #[test]
    fn character_device_is_refused() {
        let e = refused(&[raw(EntryType::Char, "dev/null")]);
        assert_eq!(
            e,
            "refused the archive: entry `dev/null` is a character device, which a runtime must \
             not contain"
        );
    }

    #[test]
    fn block_device_is_refused() {
        let e = refused(&[raw(EntryType::Block, "sda")]);
        assert!(e.contains("entry `sda` is a block device"), "{e}");
    }

    #[test]
    fn fifo_is_refused() {
        let e = refused(&[raw(EntryType::Fifo, "pipe")]);
        assert!(e.contains("entry `pipe` is a FIFO"), "{e}");
    }

    #[test]
    fn sparse_and_unknown_types_are_refused() {
        let e = refused(&[raw(EntryType::GNUSparse, "sparse")]);
        assert!(e.contains("is a sparse file"), "{e}");
        let e = refused(&[raw(EntryType::new(b'Z'), "odd")]);
        assert!(
            e.contains("has an entry type this agent does not unpack"),
            "{e}"
        );
    }

    #[test]
    fn a_file_over_the_size_cap_is_refused() {
        let limits = UnpackLimits {
            max_bytes: 1000,
            ..LIMITS
        };
        let e = refused_with(&[file("big", &"x".repeat(2000))], &limits);
        assert_eq!(
            e,
            "refused the archive: entry `big` is 2.0 KiB: unpacking it would pass the 1000 B cap \
             on the unpacked size ([cache] max_unpacked_size)"
        );
    }

    #[test]
    fn many_files_over_the_size_cap_are_refused() {
        let limits = UnpackLimits {
            max_bytes: 1000,
            ..LIMITS
        };
        let entries: Vec<Raw> = (0..5)
            .map(|i| file(&format!("f{i}"), &"x".repeat(300)))
            .collect();
        let e = refused_with(&entries, &limits);
        assert!(
            e.contains("entry `f3` is 300 B: unpacking it would pass"),
            "{e}"
        );
    }

    #[test]
    fn a_header_smaller_than_its_data_cannot_smuggle_bytes() {
        // The header says 10 bytes: the rest is read as the next header,
        // which is garbage, so the archive is damaged.
        let sb = sandbox();
        let data = archive(&[Raw {
            size: Some(10),
            ..file("f", &"x".repeat(5000))
        }]);
        let e = unpack(&data[..], &sb.prefix, &LIMITS, &AtomicBool::new(false)).unwrap_err();
        assert!(matches!(e, UnpackError::Damaged(_)), "{e}");
        assert_eq!(tree(&sb.sentinel), Vec::<String>::new());
    }

    #[test]
    fn a_directory_or_link_claiming_data_is_refused() {
        // Found by the fuzz tests: the tar reader skipped a directory's
        // claimed data uncapped and without checking `cancel`, so 4 MiB of
        // zeros here (a few hundred bytes compressed; 32 KiB per byte at
        // zstd's best) unpacked "fine" past a 1 MiB cap.
        let limits = UnpackLimits {
            max_bytes: 1 << 20,
            ..LIMITS
        };
        let e = refused_with(
            &[Raw {
                data: vec![0; 4 << 20],
                ..dir("d")
            }],
            &limits,
        );
        assert_eq!(
            e,
            "refused the archive: entry `d` is a directory or link that claims 4.0 MiB of data, \
             which it cannot have"
        );
        let e = refused(&[
            file("f", "x"),
            Raw {
                data: b"data".to_vec(),
                ..symlink("s", "f")
            },
        ]);
        assert!(
            e.contains("entry `s` is a directory or link that claims 4 B"),
            "{e}"
        );
        let e = refused(&[
            file("f", "x"),
            Raw {
                size: Some(1 << 40),
                ..hard_link("h", "f")
            },
        ]);
        assert!(
            e.contains("entry `h` is a directory or link that claims 1.0 TiB"),
            "{e}"
        );
    }

    #[test]
    fn too_many_entries_are_refused() {
        let limits = UnpackLimits {
            max_entries: 3,
            ..LIMITS
        };
        let entries: Vec<Raw> = (0..5).map(|i| dir(&format!("d{i}"))).collect();
        let e = refused_with(&entries, &limits);
        assert_eq!(
            e,
            "refused the archive: entry `d3` is past the limit of 3 entries per archive"
        );
    }

    #[test]
    fn garbage_is_damaged_and_leaves_nothing() {
        let sb = sandbox();
        let e = unpack(
            &b"not zstd at all"[..],
            &sb.prefix,
            &LIMITS,
            &AtomicBool::new(false),
        )
        .unwrap_err();
        assert!(matches!(e, UnpackError::Damaged(_)), "{e}");
        assert_eq!(tree(&sb.sentinel), Vec::<String>::new());
    }

    #[test]
    fn cancel_stops_and_cleans_up() {
        let sb = sandbox();
        let data = archive(&[file("f", "x")]);
        let e = unpack(&data[..], &sb.prefix, &LIMITS, &AtomicBool::new(true)).unwrap_err();
        assert!(matches!(e, UnpackError::Cancelled));
        assert!(!sb.prefix.exists());
    }

    #[test]
    fn an_existing_prefix_is_not_reused() {
        let sb = sandbox();
        std::fs::create_dir(&sb.prefix).unwrap();
        let data = archive(&[file("f", "x")]);
        let e = unpack(&data[..], &sb.prefix, &LIMITS, &AtomicBool::new(false)).unwrap_err();
        assert!(matches!(e, UnpackError::Io { .. }), "{e}");
    }

    #[test]
    fn a_runtime_like_archive_unpacks() {
        let sb = sandbox();
        let long = format!("lib/{}/deep.txt", "long-directory-name".repeat(8));
        // Built the ordinary way, plus a long name and hostile-looking modes.
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |kind: EntryType, path: &str, mode: u32, data: &[u8], link: Option<&str>| {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_600_000_000);
            match link {
                Some(target) => builder.append_link(&mut h, path, target).unwrap(),
                None => builder.append_data(&mut h, path, data).unwrap(),
            }
        };
        add(EntryType::Directory, "./bin", 0o755, b"", None);
        add(
            EntryType::Regular,
            "./bin/tool",
            0o755,
            b"#!/bin/sh\necho hi\n",
            None,
        );
        add(EntryType::Regular, "./bin/suid", 0o4755, b"x", None);
        add(EntryType::Symlink, "./bin/alias", 0o777, b"", Some("tool"));
        add(
            EntryType::Link,
            "./bin/tool2",
            0o755,
            b"",
            Some("./bin/tool"),
        );
        add(EntryType::Directory, "./lib", 0o2755, b"", None);
        add(EntryType::Regular, "./lib/data", 0o644, b"data", None);
        add(
            EntryType::Symlink,
            "./lib/up",
            0o777,
            b"",
            Some("../bin/tool"),
        );
        add(
            EntryType::Symlink,
            "./lib/dangling",
            0o777,
            b"",
            Some("nowhere"),
        );
        add(EntryType::Regular, &long, 0o600, b"deep", None);
        add(EntryType::Directory, "./share/ro", 0o555, b"", None);
        let data = zstd::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap();

        let stats = unpack(&data[..], &sb.prefix, &LIMITS, &AtomicBool::new(false)).unwrap();
        assert_eq!(
            stats,
            UnpackStats {
                files: 4,
                dirs: 3,
                symlinks: 3,
                hard_links: 1,
                bytes: 18 + 1 + 4 + 4,
            }
        );
        let p = &sb.prefix;
        assert_eq!(
            std::fs::read_to_string(p.join("bin/tool")).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        let mode = |rel: &str| std::fs::symlink_metadata(p.join(rel)).unwrap().mode() & 0o7777;
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("bin/suid"), 0o755, "setuid must be dropped");
        assert_eq!(mode("lib"), 0o755, "setgid must be dropped");
        assert_eq!(mode("lib/data"), 0o644);
        assert_eq!(mode("share/ro"), 0o755, "the owner keeps access");
        assert_eq!(
            std::fs::read_link(p.join("bin/alias")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(
            std::fs::read_to_string(p.join("lib/up")).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        assert!(std::fs::symlink_metadata(p.join("lib/dangling")).is_ok());
        let ino = |rel: &str| std::fs::metadata(p.join(rel)).unwrap().ino();
        assert_eq!(ino("bin/tool"), ino("bin/tool2"));
        assert_eq!(std::fs::read_to_string(p.join(&long)).unwrap(), "deep");
        let out = std::process::Command::new(p.join("bin/alias"))
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"hi\n");
        // Nothing but the prefix in the sentinel.
        assert_eq!(
            std::fs::read_dir(&sb.sentinel).unwrap().count(),
            1,
            "{:?}",
            tree(&sb.sentinel)
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(relative(b"./a/./b/").unwrap(), Path::new("a/b"));
        assert_eq!(relative(b"./").unwrap(), Path::new(""));
        assert!(relative(b"").is_err());
        assert!(relative(b"a\0b").is_err());
        assert!(lexically_inside(Path::new("a/b/l"), Path::new("../../x")));
        assert!(!lexically_inside(
            Path::new("a/b/l"),
            Path::new("../../../x")
        ));
        assert!(!lexically_inside(Path::new("l"), Path::new("/x")));
        assert!(lexically_inside(Path::new("l"), Path::new("a/../b")));
        assert_eq!(shown(&[b'x'; 300]).chars().count(), SHOWN_NAME_CHARS + 1);
    }

    #[test]
    fn directories_made_on_the_way_count_against_the_caps() {
        // Few entries, but each makes a deep chain of new directories.
        let entries: Vec<Raw> = (0..20)
            .map(|i| {
                let deep: Vec<String> = (0..12).map(|d| format!("{i}{d}")).collect();
                file(&format!("{}/f", deep.join("/")), "x")
            })
            .collect();
        let limits = UnpackLimits {
            max_entries: 100,
            ..LIMITS
        };
        let e = refused_with(&entries, &limits);
        assert!(
            e.contains("creates more than 100 files and directories"),
            "{e}"
        );
        let limits = UnpackLimits {
            max_bytes: 64 * INODE_COST_BYTES,
            ..LIMITS
        };
        let e = refused_with(&entries, &limits);
        assert!(e.contains("counting 4.0 KiB per directory and link"), "{e}");
    }
}

/// Property-based fuzzing of the unpacker; see the module.
#[cfg(test)]
mod fuzz;
