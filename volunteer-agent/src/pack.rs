//! Packing a runtime build's install prefix (tar + zstd) and uploading it.
//!
//! A build job installs into `$PREFIX`; once every command passed, the agent
//! packs that directory into one `.tar.zst` file, hashing the compressed
//! bytes (SHA-256) as they are written, and streams the file to the hub with
//! `UploadArtifact`. Entries are stored in sorted order (the same tree packs
//! to the same bytes): directories, regular files, and
//! symlinks as symlinks (never followed). Hard links are stored as separate
//! files. Sockets, FIFOs and devices are skipped and reported. Ownership is
//! not stored; setuid, setgid and sticky bits are dropped. File times newer
//! than a build's `SOURCE_DATE_EPOCH` are stored as it (like tar's
//! `--clamp-mtime`), so two honest builds of one commit pack to the same
//! bytes when the build itself is reproducible.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};
use tonic::Code;
use trunkfarm_proto::settings::fmt_bytes;
use trunkfarm_proto::v1::{ArtifactMeta, JobRef, UploadArtifactResponse};

use crate::cache::short;
use crate::transfer::ArtifactHub;

/// zstd level: fast to pack on a volunteer's machine, and still several
/// times smaller than the tree.
const ZSTD_LEVEL: i32 = 3;

/// Buffer between the compressor and the file.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// A packed artifact, ready to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Packed {
    /// The `.tar.zst` file.
    pub path: PathBuf,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// Its size.
    pub size_bytes: u64,
    /// Regular files stored.
    pub files: u64,
    /// Directories stored.
    pub dirs: u64,
    /// Symlinks stored.
    pub symlinks: u64,
    /// Entries skipped (neither file, directory nor symlink), relative.
    pub skipped: Vec<PathBuf>,
}

/// Why a directory could not be packed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PackError {
    /// The directory to pack is missing or not a directory (the build
    /// removed or replaced it).
    #[error("{} is not a directory (the build removed or replaced it)", .0.display())]
    NotADirectory(PathBuf),
    /// Reading the tree or writing the archive failed.
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
    #[error("packing was interrupted: the job was stopped")]
    Cancelled,
    /// A symbolic link leads outside the tree: the runtime is unpacked
    /// elsewhere for tests (and unpacking refuses such links), so it would break.
    #[error(
        "$PREFIX/{} is a symbolic link to {}, outside $PREFIX: the runtime is unpacked elsewhere for tests, so make the link relative (e.g. `ln -sr`) or copy the file",
        .link.display(),
        .target.display()
    )]
    LinkOutside {
        /// The link, relative to the tree.
        link: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
}

/// Where a symlink at `rel` (relative to the packed tree `dir`) pointing at
/// `target` should point in the archive: absolute targets inside the tree
/// become relative; anything leading outside is an error.
fn link_target(dir: &Path, rel: &Path, target: &Path) -> Result<PathBuf, PackError> {
    use std::path::Component;
    let outside = || PackError::LinkOutside {
        link: rel.to_path_buf(),
        target: target.to_path_buf(),
    };
    let parent = rel.parent().unwrap_or(Path::new(""));
    // The target as a path inside the tree, resolved lexically.
    let inside: PathBuf = if target.is_absolute() {
        target
            .strip_prefix(dir)
            .map_err(|_| outside())?
            .to_path_buf()
    } else {
        parent.join(target)
    };
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    for c in inside.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop().ok_or_else(outside)?;
            }
            Component::RootDir | Component::Prefix(_) => return Err(outside()),
        }
    }
    if !target.is_absolute() {
        return Ok(target.to_path_buf());
    }
    // Relative from the link's directory to the resolved target.
    let mut out = PathBuf::new();
    for _ in parent.components() {
        out.push("..");
    }
    for p in parts {
        out.push(p);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Ok(out)
}

/// Packs the tree under `dir` into a new file `out` (which must not exist),
/// checking `cancel` between entries and while reading files. File times
/// later than `clamp_mtime` (seconds since the epoch) are stored as it.
pub(crate) fn pack(
    dir: &Path,
    out: &Path,
    clamp_mtime: Option<u64>,
    cancel: &AtomicBool,
) -> Result<Packed, PackError> {
    if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Err(PackError::NotADirectory(dir.to_path_buf()));
    }
    let out_err = |what: &'static str| {
        let path = out.to_path_buf();
        move |source| PackError::Io { what, path, source }
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(out_err("create"))?;
    let hashing = HashingWriter {
        inner: BufWriter::with_capacity(WRITE_BUFFER_BYTES, file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let encoder =
        zstd::stream::write::Encoder::new(hashing, ZSTD_LEVEL).map_err(out_err("compress into"))?;
    let mut builder = tar::Builder::new(encoder);
    let mut packed = Packed {
        path: out.to_path_buf(),
        sha256: String::new(),
        size_bytes: 0,
        files: 0,
        dirs: 0,
        symlinks: 0,
        skipped: Vec::new(),
    };
    // Depth first, names sorted in each directory; an explicit stack so a
    // deep tree cannot overflow the thread's stack.
    let mut stack: Vec<PathBuf> = children(dir, Path::new(""))?;
    stack.reverse();
    while let Some(rel) = stack.pop() {
        if cancel.load(Ordering::Relaxed) {
            return Err(PackError::Cancelled);
        }
        let full = dir.join(&rel);
        let in_err = |what: &'static str| {
            let path = full.clone();
            move |source| PackError::Io { what, path, source }
        };
        let meta = std::fs::symlink_metadata(&full).map_err(in_err("inspect"))?;
        let kind = meta.file_type();
        let mut header = Header::new_gnu();
        header.set_mode(meta.mode() & 0o777);
        let mtime = u64::try_from(meta.mtime()).unwrap_or(0);
        header.set_mtime(clamp_mtime.map_or(mtime, |newest| mtime.min(newest)));
        header.set_uid(0);
        header.set_gid(0);
        if kind.is_dir() {
            header.set_entry_type(EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, &rel, io::empty())
                .map_err(in_err("pack"))?;
            packed.dirs += 1;
            let mut below = children(dir, &rel)?;
            below.reverse();
            stack.extend(below);
        } else if kind.is_file() {
            let file = File::open(&full).map_err(in_err("read"))?;
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            let reader = ExactReader {
                inner: file,
                remaining: meta.len(),
                cancel,
            };
            builder
                .append_data(&mut header, &rel, reader)
                .map_err(|e| {
                    if cancel.load(Ordering::Relaxed) {
                        PackError::Cancelled
                    } else {
                        PackError::Io {
                            what: "pack",
                            path: full.clone(),
                            source: e,
                        }
                    }
                })?;
            packed.files += 1;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&full).map_err(in_err("read the symlink"))?;
            let target = link_target(dir, &rel, &target)?;
            header.set_entry_type(EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            builder
                .append_link(&mut header, &rel, &target)
                .map_err(in_err("pack"))?;
            packed.symlinks += 1;
        } else {
            tracing::warn!(path = %full.display(), "not packing a special file (socket, FIFO or device)");
            packed.skipped.push(rel);
        }
    }
    let encoder = builder.into_inner().map_err(out_err("write"))?;
    let hashing = encoder.finish().map_err(out_err("write"))?;
    let HashingWriter {
        inner,
        hasher,
        bytes,
    } = hashing;
    let file = inner.into_inner().map_err(|e| PackError::Io {
        what: "write",
        path: out.to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(out_err("sync"))?;
    packed.sha256 = hex::encode(hasher.finalize());
    packed.size_bytes = bytes;
    Ok(packed)
}

/// The entries of `dir/rel`, as paths relative to `dir`, sorted by name.
fn children(dir: &Path, rel: &Path) -> Result<Vec<PathBuf>, PackError> {
    let full = dir.join(rel);
    let err = |source| PackError::Io {
        what: "list",
        path: full.clone(),
        source,
    };
    let mut names: Vec<OsString> = Vec::new();
    for entry in std::fs::read_dir(&full).map_err(err)? {
        names.push(entry.map_err(err)?.file_name());
    }
    names.sort();
    Ok(names.into_iter().map(|n| rel.join(n)).collect())
}

/// Hashes and counts what passes through to the file.
struct HashingWriter<W> {
    /// The file.
    inner: W,
    /// SHA-256 so far.
    hasher: Sha256,
    /// Bytes so far.
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A file's contents, exactly as long as its header says: a file that
/// shrank while being packed is an error rather than a corrupt archive (one
/// that grew is cut). Stops when `cancel` is set.
struct ExactReader<'a> {
    /// The file.
    inner: File,
    /// Bytes still owed.
    remaining: u64,
    /// Set to stop.
    cancel: &'a AtomicBool,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("cancelled"));
        }
        let max = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Why an upload failed: the detail of the job's infrastructure error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    /// The hub's size limit.
    #[error(
        "the hub refused the runtime artifact {sha12} ({}): it is larger than the hub accepts \
         (the hub's [artifacts] max_size): {message}",
        fmt_bytes(*.size_bytes)
    )]
    TooLarge {
        /// The hash, shortened.
        sha12: String,
        /// The artifact's size.
        size_bytes: u64,
        /// The hub's message.
        message: String,
    },
    /// Any other failure of the call.
    #[error(
        "the upload of the runtime artifact {sha12} ({}) failed: {code:?}: {message}",
        fmt_bytes(*.size_bytes)
    )]
    Failed {
        /// The hash, shortened.
        sha12: String,
        /// The artifact's size.
        size_bytes: u64,
        /// The status code.
        code: Code,
        /// The hub could not be reached ([`crate::transfer::hub_unreachable`]).
        unreachable: bool,
        /// The hub's (or transport's) message.
        message: String,
    },
    /// The hub stored something else than what was sent.
    #[error("the hub answered the upload of {sent} with the hash {stored}")]
    WrongHash {
        /// What the agent sent.
        sent: String,
        /// What the hub says it stored.
        stored: String,
    },
}

impl UploadError {
    /// Whether the hub could not be reached (it restarts, or the network
    /// is down): worth sending again once it is back.
    pub(crate) fn hub_unreachable(&self) -> bool {
        matches!(
            self,
            UploadError::Failed {
                unreachable: true,
                ..
            }
        )
    }
}

/// Uploads `packed` as the artifact built by `job`.
pub(crate) async fn upload(
    hub: &dyn ArtifactHub,
    job: JobRef,
    packed: &Packed,
) -> Result<UploadArtifactResponse, UploadError> {
    let meta = ArtifactMeta {
        sha256: packed.sha256.clone(),
        size: packed.size_bytes,
        job: Some(job),
        ..Default::default()
    };
    let sha12 = short(&packed.sha256).to_owned();
    let response = hub
        .upload(meta, packed.path.clone())
        .await
        .map_err(|status| {
            let message = if status.message().is_empty() {
                status.code().description().to_owned()
            } else {
                status.message().to_owned()
            };
            if status.code() == Code::ResourceExhausted {
                UploadError::TooLarge {
                    sha12: sha12.clone(),
                    size_bytes: packed.size_bytes,
                    message,
                }
            } else {
                UploadError::Failed {
                    sha12: sha12.clone(),
                    size_bytes: packed.size_bytes,
                    code: status.code(),
                    unreachable: crate::transfer::hub_unreachable(&status),
                    message,
                }
            }
        })?;
    if !response.sha256.is_empty() && !response.sha256.eq_ignore_ascii_case(&packed.sha256) {
        return Err(UploadError::WrongHash {
            sent: packed.sha256.clone(),
            stored: response.sha256,
        });
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::atomic::Ordering::SeqCst;

    use tonic::Status;

    use super::*;
    use crate::transfer::fake::FakeHub;
    use crate::unpack::{UnpackLimits, unpack};

    /// A tree with directories, an executable, a read-only file, relative and
    /// absolute symlinks, a hard link and a FIFO.
    fn sample_tree(root: &Path) {
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("lib/python3/site")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("bin/python"), "#!/bin/sh\necho py\n").unwrap();
        std::fs::set_permissions(
            root.join("bin/python"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(root.join("lib/python3/os.py"), "x = 1\n".repeat(10_000)).unwrap();
        std::fs::write(root.join("lib/ro.txt"), "read only").unwrap();
        std::fs::set_permissions(
            root.join("lib/ro.txt"),
            std::fs::Permissions::from_mode(0o444),
        )
        .unwrap();
        std::os::unix::fs::symlink("python", root.join("bin/python3")).unwrap();
        std::os::unix::fs::symlink("../../bin/python", root.join("lib/python3/py")).unwrap();
        std::fs::hard_link(root.join("bin/python"), root.join("bin/python-hl")).unwrap();
    }

    /// Every entry under `root`: (relative path, kind, mode, content or
    /// link target).
    fn listing(root: &Path) -> Vec<(String, char, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for e in std::fs::read_dir(root.join(&rel)).unwrap() {
                let e = e.unwrap();
                let rel = rel.join(e.file_name());
                let meta = std::fs::symlink_metadata(root.join(&rel)).unwrap();
                let (kind, data) = if meta.is_dir() {
                    stack.push(rel.clone());
                    ('d', Vec::new())
                } else if meta.file_type().is_symlink() {
                    let t = std::fs::read_link(root.join(&rel)).unwrap();
                    ('l', t.into_os_string().into_encoded_bytes())
                } else {
                    ('f', std::fs::read(root.join(&rel)).unwrap())
                };
                let mode = if kind == 'l' { 0 } else { meta.mode() & 0o7777 };
                out.push((rel.display().to_string(), kind, mode, data));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn pack_then_unpack_gives_the_same_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("prefix");
        sample_tree(&src);
        let out = tmp.path().join("a.tar.zst");
        let packed = pack(&src, &out, None, &AtomicBool::new(false)).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(packed.sha256, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(packed.size_bytes, bytes.len() as u64);
        assert_eq!((packed.files, packed.dirs, packed.symlinks), (4, 5, 2));
        assert!(packed.skipped.is_empty());

        let dst = tmp.path().join("unpacked");
        let limits = UnpackLimits {
            max_bytes: 1 << 30,
            max_entries: 1000,
        };
        unpack(&bytes[..], &dst, &limits, &AtomicBool::new(false)).unwrap();
        assert_eq!(listing(&dst), listing(&src));
        let mtime = |p: &Path| std::fs::metadata(p.join("bin/python")).unwrap().mtime();
        assert_eq!(mtime(&dst), mtime(&src));
    }

    #[test]
    fn packing_is_deterministic_for_the_same_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("prefix");
        sample_tree(&src);
        let a = pack(&src, &tmp.path().join("a"), None, &AtomicBool::new(false)).unwrap();
        let b = pack(&src, &tmp.path().join("b"), None, &AtomicBool::new(false)).unwrap();
        assert_eq!(a.sha256, b.sha256);
    }

    #[test]
    fn file_times_past_the_clamp_pack_to_the_same_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        sample_tree(&a);
        sample_tree(&b);
        // The same tree built at another time: every mtime later.
        let set_times = |root: &Path, secs: i64| {
            for (rel, ..) in listing(root) {
                let c =
                    std::ffi::CString::new(root.join(rel).as_os_str().as_encoded_bytes()).unwrap();
                let t = libc::timespec {
                    tv_sec: secs,
                    tv_nsec: 0,
                };
                // SAFETY: a valid NUL-terminated path and two timespecs;
                // AT_SYMLINK_NOFOLLOW sets a link's own time.
                let rc = unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        c.as_ptr(),
                        [t, t].as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            }
        };
        set_times(&a, 1_700_000_000);
        set_times(&b, 1_800_000_000);
        let no = AtomicBool::new(false);
        let pa = pack(&a, &tmp.path().join("a.tar.zst"), None, &no).unwrap();
        let pb = pack(&b, &tmp.path().join("b.tar.zst"), None, &no).unwrap();
        assert_ne!(pa.sha256, pb.sha256, "the times are in the archive");
        let clamp = Some(1_600_000_000);
        let ca = pack(&a, &tmp.path().join("ca.tar.zst"), clamp, &no).unwrap();
        let cb = pack(&b, &tmp.path().join("cb.tar.zst"), clamp, &no).unwrap();
        assert_eq!(ca.sha256, cb.sha256);
        // An older time than the clamp is kept.
        let dst = tmp.path().join("unpacked");
        let bytes = std::fs::read(tmp.path().join("a.tar.zst")).unwrap();
        let late = pack(
            &a,
            &tmp.path().join("late.tar.zst"),
            Some(1_900_000_000),
            &no,
        )
        .unwrap();
        assert_eq!(late.sha256, pa.sha256);
        let limits = UnpackLimits {
            max_bytes: 1 << 30,
            max_entries: 1000,
        };
        unpack(&bytes[..], &dst, &limits, &no).unwrap();
        let mtime = std::fs::metadata(dst.join("bin/python")).unwrap().mtime();
        assert_eq!(mtime, 1_700_000_000);
    }

    #[test]
    fn special_files_are_skipped_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("prefix");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        let fifo = src.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo takes a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let packed = pack(&src, &tmp.path().join("a"), None, &AtomicBool::new(false)).unwrap();
        assert_eq!(packed.skipped, [PathBuf::from("fifo")]);
        assert_eq!(packed.files, 1);
    }

    #[test]
    fn a_missing_prefix_and_an_existing_output_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let e = pack(
            &tmp.path().join("nope"),
            &tmp.path().join("a"),
            None,
            &AtomicBool::new(false),
        )
        .unwrap_err();
        assert!(matches!(e, PackError::NotADirectory(_)), "{e}");
        let src = tmp.path().join("prefix");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(tmp.path().join("a"), "taken").unwrap();
        let e = pack(&src, &tmp.path().join("a"), None, &AtomicBool::new(false)).unwrap_err();
        assert!(e.to_string().starts_with("cannot create"), "{e}");
        let e = pack(&src, &tmp.path().join("b"), None, &AtomicBool::new(true)).map(|p| p.files);
        // An empty tree has nothing to interrupt.
        assert_eq!(e.unwrap(), 0);
    }

    #[tokio::test]
    async fn upload_sends_the_file_and_reports_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("prefix");
        sample_tree(&src);
        let packed = pack(&src, &tmp.path().join("a"), None, &AtomicBool::new(false)).unwrap();
        let hub = FakeHub::default();
        let job = JobRef {
            job_id: 5,
            attempt: 1,
        };
        let response = upload(&hub, job, &packed).await.unwrap();
        assert_eq!(response.sha256, packed.sha256);
        assert!(!response.already_present);
        assert_eq!(
            hub.lock().get(&packed.sha256).unwrap(),
            &std::fs::read(&packed.path).unwrap()
        );
        assert!(upload(&hub, job, &packed).await.unwrap().already_present);

        *hub.refuse_uploads.lock().unwrap() = Some(Status::resource_exhausted(
            "artifact is 9 GiB, the limit is 4 GiB",
        ));
        let e = upload(&hub, job, &packed).await.unwrap_err();
        assert!(matches!(e, UploadError::TooLarge { .. }));
        assert!(
            e.to_string().contains(
                "it is larger than the hub accepts (the hub's [artifacts] max_size): artifact is \
                 9 GiB, the limit is 4 GiB"
            ),
            "{e}"
        );
        *hub.refuse_uploads.lock().unwrap() = Some(Status::unavailable("hub restarting"));
        let e = upload(&hub, job, &packed).await.unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "the upload of the runtime artifact {} (",
                &packed.sha256[..12]
            )),
            "{e}"
        );
        assert!(
            e.to_string()
                .ends_with("failed: Unavailable: hub restarting"),
            "{e}"
        );
        assert_eq!(hub.uploads.load(SeqCst), 4);
    }

    #[test]
    fn links_are_kept_inside_or_refused() {
        let dir = Path::new("/job/prefix");
        let t = |rel: &str, target: &str| link_target(dir, Path::new(rel), Path::new(target));
        assert_eq!(t("bin/python3", "python").unwrap(), Path::new("python"));
        assert_eq!(
            t("lib/x/py", "../../bin/python").unwrap(),
            Path::new("../../bin/python")
        );
        // Absolute into the tree: made relative.
        assert_eq!(
            t("lib/x/py", "/job/prefix/bin/python").unwrap(),
            Path::new("../../bin/python")
        );
        assert_eq!(
            t("python", "/job/prefix/bin/python").unwrap(),
            Path::new("bin/python")
        );
        for (rel, target) in [("bin/sh", "/bin/sh"), ("bin/up", "../../etc"), ("x", "..")] {
            let e = t(rel, target).unwrap_err().to_string();
            assert!(e.contains("outside $PREFIX") && e.contains(rel), "{e}");
        }
    }
}
