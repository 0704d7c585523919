//! Property-based fuzzing of [`unpack`] (issue 6, "Hostile input"): a
//! runtime artifact is built on another volunteer's machine, so every byte
//! of it may be chosen to escape the prefix, exhaust the disk or wedge the
//! agent.
//!
//! Archives are generated with hostile entries (names with `..`, absolute
//! names into a sentinel directory beside the prefix, long names as GNU or
//! PAX extensions, ustar prefixes, symlinks and hard links pointing anywhere,
//! any entry type, sizes that lie, setuid modes), written as raw tar headers
//! so nothing on the way refuses them, mutated as bytes (flipped, cut,
//! dropped, garbage added), then zstd-compressed as the hub serves them and
//! sometimes mutated again. Arbitrary bytes, compressed or not, are fed too.
//!
//! Properties, for every input:
//! * `unpack` never panics and returns;
//! * nothing outside the prefix is created, changed or linked to: a snapshot
//!   of the sentinel directory and of the prefix's parent is the same after
//!   (contents, modes, link counts, symlink targets);
//! * a refusal leaves no prefix behind;
//! * an accepted archive holds only directories, files and symlinks under
//!   the prefix, every one resolving inside it (symlinks followed as the
//!   kernel would, dangling ones included), no setuid/setgid/sticky bit, no
//!   file linked from outside, counts and bytes that match the returned
//!   stats and the caps, and data claimed by its headers within the size cap
//!   (bounded work).
//!
//! `cargo test` runs a bounded number of cases; a longer run by hand:
//! `TRUNKFARM_FUZZ_CASES=200000 cargo test --release -p trunkfarm-agent --bin
//! trunkfarm-agent unpack::fuzz`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::fs::MetadataExt as _;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use tar::Header;

use super::*;

/// Cases per property in a plain `cargo test`: about 2 s for the two in a
/// debug build on two cores (3-4 s when busy).
const CI_CASES: u32 = 4_000;

/// The run's configuration: `TRUNKFARM_FUZZ_CASES`, else `PROPTEST_CASES`,
/// else [`CI_CASES`]; no failure files written into the source tree (a
/// finding becomes a named regression test in `unpack.rs`).
fn config() -> ProptestConfig {
    let base = ProptestConfig::default();
    let cases = std::env::var("TRUNKFARM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| std::env::var_os("PROPTEST_CASES").map(|_| base.cases))
        .unwrap_or(CI_CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..base
    }
}

/// Small caps, so archives cross them often.
const LIMITS: UnpackLimits = UnpackLimits {
    max_bytes: 64 * 1024,
    max_entries: 48,
};

/// Stands for the sentinel directory's absolute path in generated names
/// (the path is only known once the sandbox exists).
const SENTINEL: &[u8] = b"@SENTINEL@";

/// One generated entry, before it is written as tar headers.
#[derive(Debug, Clone)]
struct Spec {
    kind: EntryType,
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    mode: u32,
    data: Vec<u8>,
    /// A header size other than the data's length.
    claimed: Option<u64>,
    /// How a name or link target over 100 bytes is carried.
    long: Long,
    /// A ustar header (with a `prefix` field) rather than a GNU one.
    ustar: Option<Vec<u8>>,
    mtime: u64,
}

#[derive(Debug, Clone, Copy)]
enum Long {
    Gnu,
    Pax,
    /// Cut to the header's 100 bytes.
    Cut,
}

/// A raw extension header on its own (not tied to a name of ours).
#[derive(Debug, Clone)]
enum Item {
    Entry(Spec),
    Pax { global: bool, records: Vec<u8> },
    GnuLong { link: bool, data: Vec<u8> },
}

fn component() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => proptest::sample::select(vec![
            "a", "b", "c", "bin", "lib", ".", "..", "sentinel", "victim", "prefix", "",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => (60usize..130).prop_map(|n| vec![b'x'; n]),
        1 => proptest::collection::vec(any::<u8>(), 1..6),
    ]
}

/// An entry name or link target: mostly a few components from a small
/// vocabulary (so entries meet: a symlink, then a write through it), some
/// absolute, some into the sentinel, some raw bytes.
fn path() -> impl Strategy<Value = Vec<u8>> {
    let joined = (
        proptest::sample::select(vec!["", "", "", "./", "/", "../", "@SENTINEL@/"]),
        proptest::collection::vec(component(), 1..5),
        proptest::sample::select(vec!["", "", "/", "/."]),
    )
        .prop_map(|(lead, parts, trail)| {
            let mut out = lead.as_bytes().to_vec();
            out.extend(parts.join(&b'/'));
            out.extend_from_slice(trail.as_bytes());
            out
        });
    prop_oneof![
        8 => joined,
        2 => proptest::sample::select(vec![
            "@SENTINEL@", "@SENTINEL@/pwned", "@SENTINEL@/victim", "../sentinel",
            "../sentinel/victim", "../sentinel/pwned", "..", ".", "./", "/", "//",
            "a/../../sentinel/pwned", "/etc/passwd",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

fn kind() -> impl Strategy<Value = EntryType> {
    prop_oneof![
        5 => Just(EntryType::Regular),
        3 => Just(EntryType::Directory),
        3 => Just(EntryType::Symlink),
        2 => Just(EntryType::Link),
        1 => Just(EntryType::Continuous),
        1 => any::<u8>().prop_map(EntryType::new),
    ]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..64),
        2 => (0usize..4096).prop_map(|n| vec![b'd'; n]),
        1 => (LIMITS.max_bytes as usize / 2..LIMITS.max_bytes as usize * 2)
            .prop_map(|n| vec![0; n]),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        kind(),
        path(),
        prop_oneof![2 => Just(None), 3 => path().prop_map(Some)],
        prop_oneof![
            4 => Just(0o644u32),
            2 => Just(0o755),
            2 => any::<u32>().prop_map(|m| m & 0o7777),
        ],
        data(),
        prop_oneof![
            8 => Just(None),
            1 => any::<u64>().prop_map(Some),
            1 => (0u64..5000).prop_map(Some),
        ],
        proptest::sample::select(vec![Long::Gnu, Long::Pax, Long::Cut]),
        prop_oneof![
            5 => Just(None),
            1 => path().prop_map(Some),
        ],
        prop_oneof![Just(1_700_000_000u64), any::<u64>()],
    )
        .prop_map(
            |(kind, path, link, mode, data, claimed, long, ustar, mtime)| {
                // Entries that hold no data are mostly written with none.
                let data = if matches!(kind, EntryType::Regular | EntryType::Continuous)
                    || data.len() % 5 == 0
                {
                    data
                } else {
                    Vec::new()
                };
                Spec {
                    kind,
                    path,
                    link,
                    mode,
                    data,
                    claimed,
                    long,
                    ustar,
                    mtime,
                }
            },
        )
}

/// A PAX record, `<len> <key>=<value>\n`, its length counting itself.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut out = format!("{len} ").into_bytes();
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

fn pax_records() -> impl Strategy<Value = Vec<u8>> {
    let record = prop_oneof![
        (proptest::sample::select(vec!["path", "linkpath"]), path())
            .prop_map(|(k, v)| pax_record(k.as_bytes(), &v)),
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            Just("-1".to_owned()),
            Just("99999999999999999999999".to_owned()),
            Just("x".to_owned()),
        ]
        .prop_map(|v| pax_record(b"size", v.as_bytes())),
        Just(pax_record(b"comment", b"hello")),
        proptest::collection::vec(any::<u8>(), 0..24),
        Just(b"99999999999999999999 path=x\n".to_vec()),
        Just(b"5 a=\n".to_vec()),
    ];
    proptest::collection::vec(record, 0..4).prop_map(|r| r.concat())
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        12 => spec().prop_map(Item::Entry),
        1 => (any::<bool>(), pax_records())
            .prop_map(|(global, records)| Item::Pax { global, records }),
        1 => (any::<bool>(), path()).prop_map(|(link, data)| Item::GnuLong { link, data }),
    ]
}

/// Replaces the [`SENTINEL`] marker by the sentinel's absolute path.
fn resolve_marker(raw: &[u8], sentinel: &Path) -> Vec<u8> {
    let abs = sentinel.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while !rest.is_empty() {
        if rest.starts_with(SENTINEL) {
            out.extend_from_slice(abs);
            rest = &rest[SENTINEL.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// Appends one header block (checksummed) and `data` padded to 512.
fn push(out: &mut Vec<u8>, header: &mut Header, data: &[u8]) {
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// An extension header (`L`, `K`, `x`, `g`) carrying `data`.
fn push_extension(out: &mut Vec<u8>, kind: EntryType, data: &[u8]) {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    let name = b"././@LongLink";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    push(out, &mut h, data);
}

/// Writes a long name or link target the way the spec says; returns what
/// goes in the 100-byte header field.
fn long_field(out: &mut Vec<u8>, value: &[u8], link: bool, long: Long) -> Vec<u8> {
    if value.len() <= 100 {
        return value.to_vec();
    }
    match long {
        Long::Gnu => {
            let mut data = value.to_vec();
            data.push(0);
            let kind = if link {
                EntryType::GNULongLink
            } else {
                EntryType::GNULongName
            };
            push_extension(out, kind, &data);
        }
        Long::Pax => {
            let key: &[u8] = if link { b"linkpath" } else { b"path" };
            push_extension(out, EntryType::XHeader, &pax_record(key, value));
        }
        Long::Cut => {}
    }
    value[..100].to_vec()
}

/// The tar stream of `items` (without the end-of-archive blocks).
fn write_tar(items: &[Item], sentinel: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        match item {
            Item::Pax { global, records } => {
                let kind = if *global {
                    EntryType::XGlobalHeader
                } else {
                    EntryType::XHeader
                };
                push_extension(&mut out, kind, &resolve_marker(records, sentinel));
            }
            Item::GnuLong { link, data } => {
                let kind = if *link {
                    EntryType::GNULongLink
                } else {
                    EntryType::GNULongName
                };
                push_extension(&mut out, kind, &resolve_marker(data, sentinel));
            }
            Item::Entry(spec) => {
                let path = resolve_marker(&spec.path, sentinel);
                let link = spec.link.as_ref().map(|l| resolve_marker(l, sentinel));
                let name = long_field(&mut out, &path, false, spec.long);
                let link = link.map(|l| long_field(&mut out, &l, true, spec.long));
                let mut h = if spec.ustar.is_some() {
                    Header::new_ustar()
                } else {
                    Header::new_gnu()
                };
                h.set_entry_type(spec.kind);
                h.set_mode(spec.mode);
                h.set_mtime(spec.mtime);
                h.set_size(spec.claimed.unwrap_or(spec.data.len() as u64));
                h.as_old_mut().name[..name.len()].copy_from_slice(&name);
                if let Some(link) = link {
                    h.as_old_mut().linkname[..link.len()].copy_from_slice(&link);
                }
                if let (Some(prefix), Some(ustar)) = (&spec.ustar, h.as_ustar_mut()) {
                    let prefix = resolve_marker(prefix, sentinel);
                    let n = prefix.len().min(ustar.prefix.len());
                    ustar.prefix[..n].copy_from_slice(&prefix[..n]);
                }
                push(&mut out, &mut h, &spec.data);
            }
        }
    }
    out
}

/// A byte-level edit, of the tar stream or of the compressed one.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    DropRange(usize, usize),
    Insert(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = any::<usize>;
    prop_oneof![
        3 => (i(), any::<u8>()).prop_map(|(at, b)| Mutation::Flip(at, b)),
        1 => i().prop_map(Mutation::Truncate),
        1 => (i(), 1usize..600).prop_map(|(at, n)| Mutation::DropRange(at, n)),
        1 => (i(), proptest::collection::vec(any::<u8>(), 1..600))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    let at = |i: usize| i % (len + 1);
    match m {
        Mutation::Flip(i, b) => {
            if len > 0 {
                bytes[i % len] ^= b | 1;
            }
        }
        Mutation::Truncate(i) => bytes.truncate(at(*i)),
        Mutation::DropRange(i, n) => {
            let start = at(*i);
            bytes.drain(start..start.saturating_add(*n).min(len));
        }
        Mutation::Insert(i, b) => {
            let at = at(*i);
            bytes.splice(at..at, b.iter().copied());
        }
    }
}

/// A generated archive: entries, then optional damage before and after
/// compression.
#[derive(Debug, Clone)]
struct Archive {
    items: Vec<Item>,
    end_marker: bool,
    tar_mutations: Vec<Mutation>,
    zstd_mutations: Vec<Mutation>,
}

/// A runtime-like archive most of whose entries are fine: directories from
/// a small vocabulary, files and symlinks with unique names, hard links to
/// files written before them, symlinks that stay inside or just leave it.
fn plausible_items() -> impl Strategy<Value = Vec<Item>> {
    let dir = proptest::collection::vec(
        proptest::sample::select(vec!["a", "b", "bin", "lib", "share"]),
        0..3,
    );
    let target = (
        0usize..3,
        proptest::collection::vec(
            proptest::sample::select(vec!["a", "b", "f0", "f1", "f2", "."]),
            0..3,
        ),
    )
        .prop_map(|(ups, names)| {
            let mut t = "../".repeat(ups);
            t.push_str(&names.join("/"));
            if t.is_empty() { ".".to_owned() } else { t }
        });
    let entry = (
        prop_oneof![
            4 => Just(EntryType::Regular),
            2 => Just(EntryType::Directory),
            2 => Just(EntryType::Symlink),
            1 => Just(EntryType::Link),
        ],
        dir,
        target,
        any::<usize>(),
        prop_oneof![Just(0o644u32), Just(0o755), Just(0o4755), Just(0o555)],
        prop_oneof![
            4 => proptest::collection::vec(any::<u8>(), 0..64),
            1 => (0usize..8192).prop_map(|n| vec![b'd'; n]),
        ],
        any::<bool>(),
        // Data a directory or link should not have (zeros: a bomb in small).
        prop_oneof![
            8 => Just(0usize),
            1 => 1usize..2 * LIMITS.max_bytes as usize,
        ],
    );
    proptest::collection::vec(entry, 0..14).prop_map(|entries| {
        let mut files: Vec<Vec<u8>> = Vec::new();
        let mut items = Vec::new();
        for (i, (kind, dirs, target, pick, mode, data, dot, odd)) in entries.into_iter().enumerate()
        {
            let mut path = if dot { "./".to_owned() } else { String::new() };
            for d in &dirs {
                path.push_str(d);
                path.push('/');
            }
            let mut link = None;
            match kind {
                EntryType::Directory => path.push('d'),
                EntryType::Link => {
                    if files.is_empty() {
                        continue;
                    }
                    link = Some(files[pick % files.len()].clone());
                    path.push_str(&format!("h{i}"));
                }
                EntryType::Symlink => {
                    link = Some(target.into_bytes());
                    path.push_str(&format!("s{i}"));
                }
                _ => path.push_str(&format!("f{i}")),
            }
            let path = path.into_bytes();
            if kind == EntryType::Regular {
                files.push(path.clone());
            }
            let data = if kind == EntryType::Regular {
                data
            } else {
                vec![0; odd]
            };
            items.push(Item::Entry(Spec {
                kind,
                path,
                link,
                mode,
                data,
                claimed: None,
                long: Long::Gnu,
                ustar: None,
                mtime: 1_700_000_000,
            }));
        }
        items
    })
}

fn archive() -> impl Strategy<Value = Archive> {
    let hostile = proptest::collection::vec(item(), 0..14);
    // Plausible entries with a hostile one slipped in now and then.
    let plausible = (
        plausible_items(),
        prop_oneof![2 => Just(None), 1 => (any::<usize>(), item()).prop_map(Some)],
    )
        .prop_map(|(mut items, extra)| {
            if let Some((at, item)) = extra {
                items.insert(at % (items.len() + 1), item);
            }
            items
        });
    (
        prop_oneof![2 => plausible, 1 => hostile],
        prop_oneof![5 => Just(true), 1 => Just(false)],
        prop_oneof![
            4 => Just(Vec::new()),
            1 => proptest::collection::vec(mutation(), 1..4),
        ],
        prop_oneof![
            10 => Just(Vec::new()),
            1 => proptest::collection::vec(mutation(), 1..3),
        ],
    )
        .prop_map(
            |(items, end_marker, tar_mutations, zstd_mutations)| Archive {
                items,
                end_marker,
                tar_mutations,
                zstd_mutations,
            },
        )
}

impl Archive {
    /// The compressed bytes, as the agent downloads them.
    fn build(&self, sentinel: &Path) -> Vec<u8> {
        let mut tar = write_tar(&self.items, sentinel);
        if self.end_marker {
            tar.resize(tar.len() + 1024, 0);
        }
        for m in &self.tar_mutations {
            mutate(&mut tar, m);
        }
        let mut compressed = zstd::encode_all(&tar[..], 1).unwrap_or_default();
        for m in &self.zstd_mutations {
            mutate(&mut compressed, m);
        }
        compressed
    }
}

/// The sentinel beside the prefix, with things worth attacking in it.
struct Sandbox {
    _tmp: tempfile::TempDir,
    /// Holds `sentinel/` and (during a case) `prefix/`.
    root: PathBuf,
    sentinel: PathBuf,
    prefix: PathBuf,
}

/// A fresh sandbox, in memory (`/dev/shm`) when the machine has it: every
/// case creates and removes a dozen files, which on a busy disk costs more
/// than the unpacking itself.
fn sandbox() -> Sandbox {
    let tmp = tempfile::Builder::new()
        .prefix("unpack-fuzz")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary directory");
    let root = tmp.path().to_path_buf();
    let sentinel = root.join("sentinel");
    std::fs::create_dir_all(sentinel.join("dir")).expect("the sentinel");
    std::fs::write(sentinel.join("victim"), b"precious").expect("the victim");
    std::fs::write(sentinel.join("dir/inner"), b"inner").expect("a file");
    std::os::unix::fs::symlink("victim", sentinel.join("link")).expect("a symlink");
    std::fs::write(root.join("neighbour"), b"next door").expect("a neighbour");
    let prefix = root.join("prefix");
    Sandbox {
        _tmp: tmp,
        root,
        sentinel,
        prefix,
    }
}

/// What a path outside the prefix looks like.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    /// Type and permission bits.
    mode: u32,
    len: u64,
    /// Hard links: one more if the archive linked to it.
    nlink: u64,
    /// Changed by writes (and, for a directory, by an entry added or removed).
    mtime_ns: i128,
    /// Changed by a chmod, a link, a write.
    ctime_ns: i128,
    /// A file's contents or a symlink's target.
    content: Vec<u8>,
}

/// Everything under the sandbox's root except the prefix, without following
/// symlinks.
fn snapshot(sb: &Sandbox) -> BTreeMap<PathBuf, Seen> {
    let mut out = BTreeMap::new();
    let mut stack = vec![sb.root.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p == sb.prefix {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let content = if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .map(|t| t.into_os_string().into_vec())
                    .unwrap_or_default()
            } else if m.is_file() {
                std::fs::read(&p).unwrap_or_default()
            } else {
                stack.push(p.clone());
                Vec::new()
            };
            let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
            let seen = Seen {
                mode: m.mode(),
                len: m.len(),
                nlink: m.nlink(),
                mtime_ns: ns(m.mtime(), m.mtime_nsec()),
                ctime_ns: ns(m.ctime(), m.ctime_nsec()),
                content,
            };
            out.insert(p, seen);
        }
    }
    out
}

/// One step of a path being resolved (the oracle's own, independent of
/// the unpacker's).
enum Hop {
    Up,
    Name(OsString),
    Absolute,
}

fn hops_of(path: &Path) -> Vec<Hop> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Hop::Name(n.to_os_string())),
            Component::ParentDir => Some(Hop::Up),
            Component::CurDir => None,
            Component::RootDir | Component::Prefix(_) => Some(Hop::Absolute),
        })
        .collect()
}

/// Follows `rel` (relative to `prefix`) as the kernel would, names that do
/// not exist (yet) taken as plain names, and checks that no step leaves
/// `prefix`. `Err` says how it left.
fn stays_inside(prefix: &Path, rel: &Path) -> Result<(), String> {
    let mut at: Vec<OsString> = Vec::new();
    let mut todo: VecDeque<Hop> = hops_of(rel).into();
    let mut links = 0;
    while let Some(hop) = todo.pop_front() {
        match hop {
            Hop::Name(name) => {
                let mut here = prefix.to_path_buf();
                here.extend(&at);
                here.push(&name);
                match std::fs::read_link(&here) {
                    Ok(target) => {
                        links += 1;
                        if links > MAX_SYMLINK_HOPS {
                            return Err(format!("{} loops", rel.display()));
                        }
                        for hop in hops_of(&target).into_iter().rev() {
                            todo.push_front(hop);
                        }
                    }
                    // Not a symlink (or nothing there): a plain name.
                    Err(_) => at.push(name),
                }
            }
            Hop::Up => {
                if at.pop().is_none() {
                    return Err(format!("{} resolves above the prefix", rel.display()));
                }
            }
            Hop::Absolute => {
                return Err(format!("{} resolves to an absolute path", rel.display()));
            }
        }
    }
    Ok(())
}

/// The tar stream inside `compressed`, if it decompresses whole.
fn tar_of(compressed: &[u8]) -> Option<Vec<u8>> {
    zstd::stream::decode_all(compressed).ok()
}

/// Bytes of data the headers of non-extension entries claim, read by the
/// tar crate on its own (the work `unpack` does reading the archive).
fn claimed_bytes(tar: &[u8]) -> u64 {
    let mut archive = tar::Archive::new(tar);
    let Ok(entries) = archive.entries() else {
        return 0;
    };
    let mut total = 0u64;
    for entry in entries.raw(true) {
        let Ok(entry) = entry else { break };
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            EntryType::GNULongName
                | EntryType::GNULongLink
                | EntryType::XHeader
                | EntryType::XGlobalHeader
        ) {
            total = total.saturating_add(entry.header().size().unwrap_or(0));
        }
    }
    total
}

/// Unpacks `compressed` into the sandbox's prefix and checks every property;
/// removes the prefix afterwards.
fn check(sb: &Sandbox, compressed: &[u8]) -> Result<(), TestCaseError> {
    let before = snapshot(sb);
    let result = unpack(compressed, &sb.prefix, &LIMITS, &AtomicBool::new(false));
    let after = snapshot(sb);
    let leftover = sb.prefix.exists();
    let outcome = check_prefix(sb, compressed, &result);
    if std::fs::symlink_metadata(&sb.prefix).is_ok() {
        std::fs::remove_dir_all(&sb.prefix)
            .map_err(|e| TestCaseError::fail(format!("cannot remove the prefix: {e}")))?;
    }
    prop_assert!(
        before == after,
        "something outside the prefix changed ({:?}): {:?}",
        result,
        before
            .iter()
            .filter(|(k, v)| after.get(*k) != Some(v))
            .map(|(k, _)| k)
            .chain(after.keys().filter(|k| !before.contains_key(*k)))
            .collect::<Vec<_>>()
    );
    if let Err(e) = &result {
        prop_assert!(!e.to_string().is_empty());
        prop_assert!(!leftover, "a refused archive left the prefix behind: {}", e);
    }
    outcome
}

/// The checks of an accepted archive's prefix.
fn check_prefix(
    sb: &Sandbox,
    compressed: &[u8],
    result: &Result<UnpackStats, UnpackError>,
) -> Result<(), TestCaseError> {
    let Ok(stats) = result else {
        return Ok(());
    };
    let prefix = sb
        .prefix
        .canonicalize()
        .map_err(|e| TestCaseError::fail(format!("the prefix: {e}")))?;
    let (mut files, mut symlinks, mut objects) = (0u64, 0u64, 0u64);
    // Inode -> (size, links seen under the prefix, link count).
    let mut inodes: HashMap<u64, (u64, u64, u64)> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = prefix.join(&rel);
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", dir.display())))?;
        for e in entries {
            let e = e.map_err(|e| TestCaseError::fail(e.to_string()))?;
            let rel = rel.join(e.file_name());
            let full = prefix.join(&rel);
            let m =
                std::fs::symlink_metadata(&full).map_err(|e| TestCaseError::fail(e.to_string()))?;
            objects += 1;
            let kind = m.file_type();
            prop_assert!(
                m.mode() & 0o7000 == 0,
                "{} has mode {:o}",
                rel.display(),
                m.mode()
            );
            if kind.is_dir() {
                stack.push(rel.clone());
            } else if kind.is_file() {
                files += 1;
                let slot = inodes.entry(m.ino()).or_insert((m.len(), 0, m.nlink()));
                slot.1 += 1;
            } else if kind.is_symlink() {
                symlinks += 1;
            } else {
                prop_assert!(false, "{} is a {:?}", rel.display(), kind);
            }
            if let Err(why) = stays_inside(&prefix, &rel) {
                prop_assert!(false, "{}", why);
            }
            if let Ok(real) = full.canonicalize() {
                prop_assert!(
                    real.starts_with(&prefix),
                    "{} resolves to {}",
                    rel.display(),
                    real.display()
                );
            }
        }
    }
    for (ino, (_, seen, nlink)) in &inodes {
        prop_assert!(
            seen == nlink,
            "inode {} has {} links, {} of them under the prefix",
            ino,
            nlink,
            seen
        );
    }
    let bytes: u64 = inodes.values().map(|(size, _, _)| size).sum();
    prop_assert_eq!(files, stats.files + stats.hard_links);
    prop_assert_eq!(symlinks, stats.symlinks);
    prop_assert_eq!(bytes, stats.bytes);
    prop_assert!(stats.bytes <= LIMITS.max_bytes);
    prop_assert!(objects <= LIMITS.max_entries, "{} objects", objects);
    if let Some(tar) = tar_of(compressed) {
        let claimed = claimed_bytes(&tar);
        prop_assert!(
            claimed <= LIMITS.max_bytes,
            "accepted an archive whose headers claim {} bytes of data",
            claimed
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_generated_archives(archive in archive()) {
        let sb = sandbox();
        let compressed = archive.build(&sb.sentinel);
        check(&sb, &compressed)?;
    }

    #[test]
    fn fuzz_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        compress in any::<bool>(),
        tar_magic in any::<bool>(),
    ) {
        let sb = sandbox();
        let mut bytes = bytes;
        if tar_magic && bytes.len() >= 512 {
            // A valid magic and checksum now and then: a plausible header
            // of random fields, past the reader's first checks.
            bytes[257..263].copy_from_slice(b"ustar\0");
            let mut h = Header::new_old();
            h.as_mut_bytes().copy_from_slice(&bytes[..512]);
            h.set_cksum();
            bytes[..512].copy_from_slice(h.as_bytes());
        }
        let input = if compress {
            zstd::encode_all(&bytes[..], 1).unwrap_or_default()
        } else {
            bytes
        };
        check(&sb, &input)?;
    }
}
