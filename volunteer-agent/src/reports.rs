//! Report files (JUnit XML) a job names in `JobSpec.report_paths`, read
//! after its commands ran and sent back in its `JobResult`.
//!
//! The result travels to the hub as one gRPC message (the hub's default
//! limit is 4 MiB) and waits on disk until acknowledged, so what is read is
//! capped: each file at [`MAX_REPORT_BYTES`], all of them together at
//! [`MAX_REPORTS_TOTAL_BYTES`], and at most [`MAX_REPORT_FILES`] paths. A
//! path is read relative to the checkout and must stay inside it, symlinks
//! included. A report that cannot be read is sent with an error; it never
//! changes the run's outcome.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path};

use trunkfarm_proto::settings::fmt_bytes;
use trunkfarm_proto::v1::ReportFile;

/// Bytes kept of one report file (its start; the rest is cut and the report
/// marked truncated).
pub(crate) const MAX_REPORT_BYTES: u64 = 2 * 1024 * 1024;

/// Bytes of report data in one result, all files together: with the paths
/// (at most [`MAX_REPORT_FILES`] × [`MAX_REPORT_PATH_BYTES`] = 256 KiB) and
/// the rest of the result, it stays under the hub's default 4 MiB message
/// limit.
pub(crate) const MAX_REPORTS_TOTAL_BYTES: u64 = 3 * 1024 * 1024;

/// Report paths read per job; later ones are ignored.
pub(crate) const MAX_REPORT_FILES: usize = 64;

/// Longest report path read.
const MAX_REPORT_PATH_BYTES: usize = 4096;

/// Reads the reports named by `paths` under `base` (the checkout), within
/// the caps. Blocking: run it off the async threads.
pub(crate) fn collect(base: &Path, paths: &[String]) -> Vec<ReportFile> {
    let base = match base.canonicalize() {
        Ok(base) => base,
        Err(e) => {
            return paths
                .iter()
                .take(MAX_REPORT_FILES)
                .map(|p| failed(p, format!("cannot read: the checkout is gone ({e})")))
                .collect();
        }
    };
    let mut budget = MAX_REPORTS_TOTAL_BYTES;
    let mut reports = Vec::new();
    for path in paths.iter().take(MAX_REPORT_FILES) {
        let report = match read_one(&base, path, budget) {
            Ok((data, truncated)) => ReportFile {
                path: path.clone(),
                data,
                truncated,
                error: String::new(),
            },
            Err(error) => failed(path, error),
        };
        budget = budget.saturating_sub(report.data.len() as u64);
        reports.push(report);
    }
    reports
}

/// A report that could not be read.
fn failed(path: &str, error: String) -> ReportFile {
    ReportFile {
        path: path.to_owned(),
        data: Vec::new(),
        truncated: false,
        error,
    }
}

/// Reads one report (at most `budget` bytes, and at most
/// [`MAX_REPORT_BYTES`]); `Err` is the report's error.
fn read_one(base: &Path, path: &str, budget: u64) -> Result<(Vec<u8>, bool), String> {
    if path.len() > MAX_REPORT_PATH_BYTES {
        return Err(format!(
            "refused: the path is longer than {MAX_REPORT_PATH_BYTES} bytes"
        ));
    }
    let rel = Path::new(path);
    if path.is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(
            "refused: a report path must be relative to the checkout, without `..`".to_owned(),
        );
    }
    let real = match base.join(rel).canonicalize() {
        Ok(real) => real,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("not found".to_owned()),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    if !real.starts_with(base) {
        return Err("refused: it resolves outside the checkout (through a symlink)".to_owned());
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    let limit = MAX_REPORT_BYTES.min(budget);
    if limit == 0 && meta.len() > 0 {
        return Err(format!(
            "not sent: the job's reports already fill the {} the agent sends per job",
            fmt_bytes(MAX_REPORTS_TOTAL_BYTES)
        ));
    }
    let file = File::open(&real).map_err(|e| format!("cannot read: {e}"))?;
    let mut data = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read: {e}"))?;
    let truncated = data.len() as u64 > limit;
    data.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok((data, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(list: &[&str]) -> Vec<String> {
        list.iter().map(|p| (*p).to_owned()).collect()
    }

    #[test]
    fn reads_reports_and_marks_missing_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("out")).unwrap();
        std::fs::write(src.join("out/junit.xml"), "<testsuite/>").unwrap();
        let r = collect(
            &src,
            &paths(&["out/junit.xml", "./out/junit.xml", "missing.xml", "out"]),
        );
        assert_eq!(r[0].data, b"<testsuite/>");
        assert_eq!((r[0].truncated, r[0].error.as_str()), (false, ""));
        assert_eq!(r[1].path, "./out/junit.xml");
        assert_eq!(r[1].data, b"<testsuite/>");
        assert_eq!(r[2].error, "not found");
        assert!(r[2].data.is_empty());
        assert_eq!(r[3].error, "not a regular file");
    }

    #[test]
    fn large_reports_are_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let big = MAX_REPORT_BYTES as usize + 10;
        std::fs::write(tmp.path().join("a.xml"), vec![b'a'; big]).unwrap();
        std::fs::write(tmp.path().join("b.xml"), vec![b'b'; big]).unwrap();
        std::fs::write(tmp.path().join("c.xml"), b"c").unwrap();
        std::fs::write(tmp.path().join("e.xml"), b"").unwrap();
        let r = collect(tmp.path(), &paths(&["a.xml", "b.xml", "c.xml", "e.xml"]));
        assert_eq!(r[0].data.len() as u64, MAX_REPORT_BYTES);
        assert!(r[0].truncated);
        // The total cap leaves b the rest, and c nothing.
        assert_eq!(
            r[1].data.len() as u64,
            MAX_REPORTS_TOTAL_BYTES - MAX_REPORT_BYTES
        );
        assert!(r[1].truncated);
        assert!(r[2].error.starts_with("not sent: "), "{}", r[2].error);
        assert_eq!((r[3].data.len(), r[3].error.as_str()), (0, ""));
        let total: usize = r.iter().map(|f| f.data.len()).sum();
        assert_eq!(total as u64, MAX_REPORTS_TOTAL_BYTES);
    }

    #[test]
    fn escaping_paths_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(tmp.path().join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink("../secret", src.join("link.xml")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), src.join("up")).unwrap();
        std::fs::write(src.join("inside"), "ok").unwrap();
        std::os::unix::fs::symlink("inside", src.join("ok-link.xml")).unwrap();
        let r = collect(
            &src,
            &paths(&[
                "../secret",
                "/etc/passwd",
                "link.xml",
                "up/secret",
                "",
                "ok-link.xml",
            ]),
        );
        for bad in &r[..2] {
            assert_eq!(
                bad.error,
                "refused: a report path must be relative to the checkout, without `..`"
            );
        }
        for bad in &r[2..4] {
            assert_eq!(
                bad.error,
                "refused: it resolves outside the checkout (through a symlink)"
            );
            assert!(bad.data.is_empty());
        }
        assert!(r[4].error.starts_with("refused"));
        assert_eq!(r[5].data, b"ok");
    }

    #[test]
    fn only_the_first_paths_are_read() {
        let tmp = tempfile::tempdir().unwrap();
        let many: Vec<String> = (0..MAX_REPORT_FILES + 5)
            .map(|i| format!("r{i}.xml"))
            .collect();
        assert_eq!(collect(tmp.path(), &many).len(), MAX_REPORT_FILES);
        let long = "a/".repeat(3000);
        assert!(
            collect(tmp.path(), &[long])[0]
                .error
                .contains("longer than")
        );
    }
}
