//! The on-disk store: entries, artifacts, stamps, scratch, staging, pointers and the lock.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::digest::{digest_tree, walk, Tree, TreeFile};
use crate::write_atomic;

/// Layout version: the name of the directory under the cache dir.
pub const LAYOUT: &str = "v1";
const ENTRY_FORMAT: u32 = 1;

/// An error of the store. The I/O error is part of the message (not a `source()`), so that a
/// chain printer (`anyhow`'s `{:#}`) shows it once.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("cache entry {} is unreadable ({defect}); treating it as a miss", path.display())]
    CorruptEntry { path: PathBuf, defect: EntryDefect },
}

/// What is wrong with an unreadable entry file.
#[derive(Debug, thiserror::Error)]
pub enum EntryDefect {
    #[error("{0}")]
    Json(serde_json::Error),
    #[error("it is the entry of key {found}")]
    KeyMismatch { found: String },
    #[error("entry format {found}, expected {ENTRY_FORMAT}")]
    Format { found: u32 },
    #[error("it disappeared while being read")]
    Vanished,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |error| CacheError::Io { path: path.to_path_buf(), error }
}

/// One output artifact of an entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EntryOutput {
    pub digest: String,
    pub bytes: u64,
    pub files: u64,
}

/// A committed cache entry: a stage that succeeded, its key, outputs and report.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub format: u32,
    pub key: String,
    /// The key struct as JSON (what `explain` compares).
    pub key_fields: serde_json::Value,
    pub recipe: String,
    pub stage: String,
    pub kind: String,
    pub outputs: BTreeMap<String, EntryOutput>,
    #[serde(default)]
    pub report: Option<serde_json::Value>,
    pub duration_ms: u64,
    pub created_unix: u64,
}

impl Entry {
    pub fn new(key: &str, key_fields: serde_json::Value, recipe: &str, stage: &str, kind: &str) -> Entry {
        Entry {
            format: ENTRY_FORMAT,
            key: key.to_string(),
            key_fields,
            recipe: recipe.to_string(),
            stage: stage.to_string(),
            kind: kind.to_string(),
            outputs: BTreeMap::new(),
            report: None,
            duration_ms: 0,
            created_unix: now_unix(),
        }
    }
    pub fn output_bytes(&self) -> u64 {
        self.outputs.values().map(|o| o.bytes).sum()
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Result of checking an artifact against its name.
#[derive(Debug, Clone)]
pub enum ArtifactCheck {
    Ok,
    Missing,
    Corrupt(Corruption),
}

impl ArtifactCheck {
    pub fn is_ok(&self) -> bool {
        matches!(self, ArtifactCheck::Ok)
    }
}

/// Why an artifact does not match its name.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Corruption {
    #[error("content digest is {} (expected {})", short(actual), short(expected))]
    DigestMismatch { expected: String, actual: String },
    /// Its files could not be read back to digest them.
    #[error("{} is unreadable: {error}", path.display())]
    Unreadable { path: PathBuf, error: Arc<io::Error> },
    /// One of its files does not match the hash the cache recorded for it.
    #[error("`{file}` does not match the cache's digest")]
    FileMismatch { file: String },
    /// One of its files did not match the cache's hash when a checked read read it.
    #[error("`{file}` did not match the cache's digest when it was read")]
    ReadMismatch { file: String },
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct Stamp {
    files: Vec<TreeFile>,
    dirs: Vec<String>,
    /// Relative path → sha256 hex of each file (what [`Store::expect_reads`] checks reads
    /// against); absent in stamps written before it existed.
    #[serde(default)]
    hashes: BTreeMap<String, String>,
}

/// Held while a process writes to the store; released on drop.
pub struct LockGuard {
    _file: fs::File,
}

/// A running stage's output directories, under `tmp/`.
pub struct Staging {
    root: PathBuf,
    outputs: BTreeMap<String, PathBuf>,
}

impl Staging {
    pub fn outputs(&self) -> &BTreeMap<String, PathBuf> {
        &self.outputs
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Remove the staged outputs (a failed or cancelled stage).
    pub fn discard(self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A cache directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    base: PathBuf,
}

fn safe_name(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

/// The store's directories a run writes into ([`Store::check_writable`]).
const WRITTEN: [&str; 5] = ["tmp", "scratch", "artifacts", "entries", "last"];
/// Name prefix of [`Store::check_writable`]'s probe files.
const PROBE: &str = ".write-probe.";

impl Store {
    /// Open (creating if needed) the store under `root` (the `--cache-dir`).
    pub fn open(root: &Path) -> Result<Store, CacheError> {
        let base = root.join(LAYOUT);
        for sub in ["artifacts", "entries", "last", "scratch", "tmp"] {
            let d = base.join(sub);
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok(Store { root: root.to_path_buf(), base })
    }
    /// Open an existing store without creating anything (`None` when there is none).
    pub fn open_existing(root: &Path) -> Option<Store> {
        let base = root.join(LAYOUT);
        base.join("entries").is_dir().then(|| Store { root: root.to_path_buf(), base })
    }
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Take the store's exclusive lock, calling `on_wait` first if another process holds it.
    pub fn lock(&self, on_wait: impl FnOnce()) -> Result<LockGuard, CacheError> {
        let path = self.base.join("lock");
        let file =
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                on_wait();
                file.lock().map_err(io_err(&path))?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        }
        Ok(LockGuard { _file: file })
    }

    /// Check that a run can write this store: a probe file is created and removed in each
    /// directory a run writes. A read-only cache is then one error naming the directory, before
    /// any stage runs, instead of a failed stage and a failed run report saying the same OS error
    /// (issue 14, defect 9). Call while holding the lock.
    pub fn check_writable(&self) -> Result<(), CacheError> {
        for sub in WRITTEN {
            let d = self.base.join(sub);
            let probe = d.join(format!("{PROBE}{}", std::process::id()));
            fs::write(&probe, b"").map_err(io_err(&d))?;
            fs::remove_file(&probe).map_err(io_err(&probe))?;
        }
        Ok(())
    }

    /// Remove leftovers of interrupted runs from `tmp/` (call while holding the lock).
    pub fn clean_tmp(&self) -> Result<usize, CacheError> {
        let tmp = self.base.join("tmp");
        let mut n = 0;
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            let p = e.path();
            let r = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            r.map_err(io_err(&p))?;
            n += 1;
        }
        // Half-written temp files of atomic writes elsewhere, and write probes of a killed run.
        for sub in WRITTEN.into_iter().filter(|s| *s != "tmp") {
            let d = self.base.join(sub);
            for e in fs::read_dir(&d).map_err(io_err(&d))?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if (name.ends_with(".tmp") && sub != "scratch") || name.starts_with(PROBE) {
                    let _ = fs::remove_file(e.path());
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn entry_path(&self, key: &str) -> PathBuf {
        self.base.join("entries").join(format!("{key}.json"))
    }
    pub fn artifact_path(&self, digest: &str) -> PathBuf {
        self.base.join("artifacts").join(digest)
    }
    fn stamp_path(&self, digest: &str) -> PathBuf {
        self.base.join("artifacts").join(format!("{digest}.stamp"))
    }

    /// The committed entry for `key`, if any. An unreadable entry is an error the caller reports as
    /// a warning (and may [`remove_entry`](Self::remove_entry)).
    pub fn entry(&self, key: &str) -> Result<Option<Entry>, CacheError> {
        let path = self.entry_path(key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        match serde_json::from_slice::<Entry>(&bytes) {
            Ok(e) if e.format != ENTRY_FORMAT => {
                Err(CacheError::CorruptEntry { path, defect: EntryDefect::Format { found: e.format } })
            }
            Ok(e) if e.key != key => {
                Err(CacheError::CorruptEntry { path, defect: EntryDefect::KeyMismatch { found: e.key } })
            }
            Ok(e) => Ok(Some(e)),
            Err(e) => Err(CacheError::CorruptEntry { path, defect: EntryDefect::Json(e) }),
        }
    }

    /// Every entry (unreadable ones as errors).
    pub fn entries(&self) -> Result<Vec<Result<Entry, CacheError>>, CacheError> {
        let dir = self.base.join("entries");
        let mut names: Vec<String> = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names
            .into_iter()
            .map(|n| {
                let key = n.trim_end_matches(".json");
                self.entry(key).and_then(|e| {
                    e.ok_or_else(|| CacheError::CorruptEntry {
                        path: self.entry_path(key),
                        defect: EntryDefect::Vanished,
                    })
                })
            })
            .collect())
    }

    /// Last-use time of an entry (creation, or the last time it was a cache hit).
    pub fn entry_last_used(&self, key: &str) -> Option<SystemTime> {
        fs::metadata(self.entry_path(key)).ok()?.modified().ok()
    }

    /// Record that an entry was used now (for `cache gc --older-than`).
    pub fn touch_entry(&self, key: &str) {
        if let Ok(f) = fs::OpenOptions::new().write(true).open(self.entry_path(key)) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    pub fn remove_entry(&self, key: &str) -> Result<(), CacheError> {
        let p = self.entry_path(key);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&p)(e)),
            _ => Ok(()),
        }
    }

    pub fn remove_artifact(&self, digest: &str) -> Result<(), CacheError> {
        let p = self.artifact_path(digest);
        crate::checked::forget(&p);
        let _ = fs::remove_file(self.stamp_path(digest));
        match fs::remove_dir_all(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&p)(e)),
            _ => Ok(()),
        }
    }

    /// Cheap check (stat against the stamp); falls back to [`verify_artifact`](Self::verify_artifact)
    /// when the stamp is missing or differs.
    pub fn check_artifact(&self, digest: &str) -> ArtifactCheck {
        let path = self.artifact_path(digest);
        let Ok((files, dirs)) = walk(&path) else {
            return ArtifactCheck::Missing;
        };
        let files: Vec<TreeFile> = files.into_iter().map(|(f, _)| f).collect();
        let stamp: Option<Stamp> = fs::read(self.stamp_path(digest)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if stamp.is_some_and(|s| s.files == files && s.dirs == dirs) {
            return ArtifactCheck::Ok;
        }
        self.verify_artifact(digest)
    }

    /// Full check: recompute the tree digest and compare it with the artifact's name; refresh the
    /// stamp when it matches.
    pub fn verify_artifact(&self, digest: &str) -> ArtifactCheck {
        match self.verify_tree(digest) {
            Ok(_) => ArtifactCheck::Ok,
            Err(bad) => bad,
        }
    }

    /// [`verify_artifact`](Self::verify_artifact), giving the tree (with every file's hash) when it matches.
    fn verify_tree(&self, digest: &str) -> Result<Tree, ArtifactCheck> {
        let path = self.artifact_path(digest);
        if !path.is_dir() {
            return Err(ArtifactCheck::Missing);
        }
        match digest_tree(&path) {
            Ok(t) if t.digest == digest => {
                let hashes = t.files.iter().map(|f| f.rel.clone()).zip(t.hashes.clone()).collect();
                self.write_stamp(digest, t.files.clone(), t.dirs.clone(), hashes);
                Ok(t)
            }
            Ok(t) => Err(ArtifactCheck::Corrupt(Corruption::DigestMismatch {
                expected: digest.to_string(),
                actual: t.digest,
            })),
            Err(e) => Err(ArtifactCheck::Corrupt(Corruption::Unreadable { path, error: Arc::new(e) })),
        }
    }

    /// Arm the checked reads of artifact `digest` ([`crate::checked::read`]): every file a loader
    /// reads from it through that function is compared with the hash its stamp records while it
    /// is read. The stamp's hashes are first checked to combine into `digest` (no file content is
    /// read); a stamp without them, or whose files changed size, falls back to the full check.
    pub fn expect_reads(&self, digest: &str) -> ArtifactCheck {
        let path = self.artifact_path(digest);
        let Ok((files, dirs)) = walk(&path) else {
            return ArtifactCheck::Missing;
        };
        let stamp: Option<Stamp> = fs::read(self.stamp_path(digest)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let manifest = stamp.and_then(|s| {
            let same_files = s.dirs == dirs
                && s.files.len() == files.len()
                && s.files.iter().zip(&files).all(|(a, (b, _))| a.rel == b.rel && a.size == b.size);
            if !same_files || s.hashes.len() != s.files.len() {
                return None;
            }
            let listed: Option<Vec<(&str, u64, &str)>> =
                s.files.iter().map(|f| Some((f.rel.as_str(), f.size, s.hashes.get(&f.rel)?.as_str()))).collect();
            (crate::digest::combine(&s.dirs, &listed?) == digest)
                .then(|| s.files.iter().map(|f| (f.rel.clone(), (f.size, s.hashes[&f.rel].clone()))).collect())
        });
        match manifest {
            Some(m) => {
                crate::checked::register(&path, m);
                ArtifactCheck::Ok
            }
            // No usable stamp: the full check, whose hashes then arm the reads (every file is
            // checked already, so `finish_reads` hashes none again).
            None => match self.verify_tree(digest) {
                Ok(t) => {
                    let m = t.files.iter().zip(&t.hashes).map(|(f, h)| (f.rel.clone(), (f.size, h.clone()))).collect();
                    crate::checked::register(&path, m);
                    for f in &t.files {
                        crate::checked::mark_checked(&path, &f.rel);
                    }
                    ArtifactCheck::Ok
                }
                Err(bad) => bad,
            },
        }
    }

    /// After a command has read artifact `digest` (armed by [`expect_reads`](Self::expect_reads)):
    /// `Corrupt` when one of its checked reads found a mismatch; otherwise the files that no
    /// checked read covered (read some other way, or not read at all) are hashed now, each file of
    /// the artifact being hashed once per process, never twice. An artifact that was not armed
    /// gets the full check. A caller that finds it corrupt discards what it made from it.
    pub fn finish_reads(&self, digest: &str) -> ArtifactCheck {
        let path = self.artifact_path(digest);
        if let Some(file) = crate::checked::take_corrupt_file(&path) {
            return ArtifactCheck::Corrupt(Corruption::ReadMismatch { file });
        }
        let Some(rest) = crate::checked::unchecked(&path) else {
            return self.verify_artifact(digest);
        };
        for (rel, size, hash) in rest {
            let file = path.join(&rel);
            match crate::digest::hash_file(&file) {
                Ok(h) if hex::encode(h) == hash && fs::metadata(&file).is_ok_and(|m| m.len() == size) => {
                    crate::checked::mark_checked(&path, &rel)
                }
                Ok(_) => return ArtifactCheck::Corrupt(Corruption::FileMismatch { file: rel }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return ArtifactCheck::Missing,
                Err(e) => return ArtifactCheck::Corrupt(Corruption::Unreadable { path: file, error: Arc::new(e) }),
            }
        }
        ArtifactCheck::Ok
    }

    /// Remove artifact `digest` and every entry whose outputs include it (a corrupt artifact: the
    /// stages that produced it re-run next time). Returns the removed entries.
    pub fn invalidate(&self, digest: &str) -> Result<Vec<Entry>, CacheError> {
        let mut removed = Vec::new();
        for e in self.entries()?.into_iter().flatten() {
            if e.outputs.values().any(|o| o.digest == digest) {
                self.remove_entry(&e.key)?;
                removed.push(e);
            }
        }
        self.remove_artifact(digest)?;
        Ok(removed)
    }

    /// The artifact digest whose directory is `path` (as [`Store::artifact_path`] gives it).
    pub fn artifact_of(&self, path: &Path) -> Option<String> {
        let dir = std::path::absolute(self.base.join("artifacts")).ok()?;
        let p = std::path::absolute(path).ok()?;
        p.strip_prefix(&dir).ok()?.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned())
    }

    fn write_stamp(&self, digest: &str, files: Vec<TreeFile>, dirs: Vec<String>, hashes: BTreeMap<String, String>) {
        if let Ok(b) = serde_json::to_vec(&Stamp { files, dirs, hashes }) {
            let _ = write_atomic(&self.stamp_path(digest), &b);
        }
    }

    /// Every artifact digest present.
    pub fn artifacts(&self) -> Result<Vec<String>, CacheError> {
        let dir = self.base.join("artifacts");
        let mut v: Vec<String> = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    }

    /// Fresh empty output directories for a stage about to run.
    pub fn staging(&self, key: &str, outputs: &[String]) -> Result<Staging, CacheError> {
        let root = self.base.join("tmp").join(format!("{}.{}.{}", short(key), std::process::id(), crate::fs::unique()));
        let mut map = BTreeMap::new();
        for name in outputs {
            let d = root.join("out").join(safe_name(name));
            fs::create_dir_all(&d).map_err(io_err(&d))?;
            map.insert(name.clone(), d);
        }
        Ok(Staging { root, outputs: map })
    }

    /// Digest the staged outputs, move them into `artifacts/`, then write `entry` (the commit point).
    pub fn commit(&self, staging: Staging, mut entry: Entry) -> Result<Entry, CacheError> {
        for (name, dir) in &staging.outputs {
            let tree = digest_tree(dir).map_err(io_err(dir))?;
            let target = self.artifact_path(&tree.digest);
            let out = EntryOutput { digest: tree.digest.clone(), bytes: tree.bytes, files: tree.files.len() as u64 };
            let reuse = target.is_dir() && self.check_artifact(&tree.digest).is_ok();
            if !reuse {
                if target.exists() {
                    self.remove_artifact(&tree.digest)?;
                }
                if let Err(e) = fs::rename(dir, &target) {
                    // Another stage of this process committed the same content meanwhile.
                    if !target.is_dir() {
                        return Err(io_err(&target)(e));
                    }
                }
                // The stamp must describe the files at their final place (rename keeps mtimes).
                if let Ok((files, dirs)) = walk(&target) {
                    let hashes = tree.files.iter().map(|f| f.rel.clone()).zip(tree.hashes.iter().cloned()).collect();
                    self.write_stamp(&tree.digest, files.into_iter().map(|(f, _)| f).collect(), dirs, hashes);
                }
            }
            entry.outputs.insert(name.clone(), out);
        }
        let path = self.entry_path(&entry.key);
        let bytes = serde_json::to_vec_pretty(&entry).map_err(|e| io_err(&path)(io::Error::other(e)))?;
        write_atomic(&path, &bytes).map_err(io_err(&path))?;
        staging.discard();
        Ok(entry)
    }

    /// The scratch directory of `key` (created; survives interrupted runs).
    pub fn scratch_dir(&self, key: &str) -> Result<PathBuf, CacheError> {
        let d = self.base.join("scratch").join(key);
        fs::create_dir_all(&d).map_err(io_err(&d))?;
        Ok(d)
    }
    /// Where `key`'s scratch directory is (it may not exist).
    pub fn scratch_path(&self, key: &str) -> PathBuf {
        self.base.join("scratch").join(key)
    }
    pub fn remove_scratch(&self, key: &str) {
        let _ = fs::remove_dir_all(self.base.join("scratch").join(key));
    }
    /// Size in bytes and newest modification time of the files of `key`'s scratch directory
    /// (an interrupted run's checkpoints), `None` when there is none.
    pub fn scratch_usage(&self, key: &str) -> Option<(u64, SystemTime)> {
        let (files, _) = walk(&self.base.join("scratch").join(key)).ok()?;
        let bytes = files.iter().map(|(f, _)| f.size).sum();
        let newest = files.iter().map(|(f, _)| f.mtime_ns).max().unwrap_or(0);
        let newest = UNIX_EPOCH + std::time::Duration::from_nanos(u64::try_from(newest).unwrap_or(u64::MAX));
        Some((bytes, newest))
    }
    /// Scratch directories present, with their keys.
    pub fn scratch_keys(&self) -> Vec<String> {
        fs::read_dir(self.base.join("scratch"))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    fn last_path(&self, recipe: &str, stage: &str) -> PathBuf {
        self.base.join("last").join(safe_name(recipe)).join(safe_name(stage))
    }
    /// The key of the latest entry of `stage` in recipe `recipe`.
    pub fn last(&self, recipe: &str, stage: &str) -> Option<String> {
        fs::read_to_string(self.last_path(recipe, stage)).ok().map(|s| s.trim().to_string())
    }
    pub fn set_last(&self, recipe: &str, stage: &str, key: &str) -> Result<(), CacheError> {
        if self.last(recipe, stage).as_deref() == Some(key) {
            return Ok(());
        }
        let p = self.last_path(recipe, stage);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        write_atomic(&p, key.as_bytes()).map_err(io_err(&p))
    }
    /// Every (recipe, stage, key) pointer.
    pub fn all_last(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(self.base.join("last")) else { return out };
        for r in rd.flatten() {
            let Ok(st) = fs::read_dir(r.path()) else { continue };
            for s in st.flatten() {
                let name = s.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                if let Ok(k) = fs::read_to_string(s.path()) {
                    out.push((r.file_name().to_string_lossy().into_owned(), name, k.trim().to_string()));
                }
            }
        }
        out.sort();
        out
    }
    /// Drop pointers whose target entry no longer exists.
    pub fn prune_last(&self) {
        for (r, s, k) in self.all_last() {
            if !self.entry_path(&k).exists() {
                let _ = fs::remove_file(self.base.join("last").join(&r).join(&s));
            }
        }
    }

    /// Remove artifacts that no entry references; returns (count, bytes).
    pub fn sweep_artifacts(&self) -> Result<(usize, u64), CacheError> {
        let mut live = BTreeSet::new();
        for e in self.entries()?.into_iter().flatten() {
            live.extend(e.outputs.values().map(|o| o.digest.clone()));
        }
        let (mut n, mut bytes) = (0, 0);
        for d in self.artifacts()? {
            if !live.contains(&d) {
                bytes += walk(&self.artifact_path(&d)).map(|(f, _)| f.iter().map(|f| f.0.size).sum()).unwrap_or(0);
                self.remove_artifact(&d)?;
                n += 1;
            }
        }
        // Stamps whose artifact is gone.
        let dir = self.base.join("artifacts");
        for e in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(d) = name.strip_suffix(".stamp") {
                if !self.artifact_path(d).is_dir() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok((n, bytes))
    }

    /// Path of the local-file digest memo.
    pub fn file_memo_path(&self) -> PathBuf {
        self.base.join("files.json")
    }
}

/// The first 12 hex digits of a digest, for messages.
pub fn short(d: &str) -> &str {
    &d[..d.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(store: &Store, key: &str, content: &str) -> Entry {
        let st = store.staging(key, &["data".to_string()]).unwrap();
        fs::write(st.outputs()["data"].join("a.txt"), content).unwrap();
        store.commit(st, Entry::new(key, serde_json::json!({}), "r", "s", "k")).unwrap()
    }

    /// Regression (issue 14, defect 9): a read-only cache failed the first stage and then the
    /// run report with the same OS error. `check_writable` finds it first, naming the directory,
    /// and leaves no probe behind; a killed run's probe is swept by `clean_tmp`.
    #[test]
    fn read_only_cache_is_one_error_naming_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        store.check_writable().unwrap();
        for sub in WRITTEN {
            let left: Vec<_> = fs::read_dir(d.path().join("v1").join(sub)).unwrap().flatten().collect();
            assert!(left.is_empty(), "{sub}: {left:?}");
        }
        fs::write(d.path().join("v1/last").join(format!("{PROBE}1")), b"").unwrap();
        assert_eq!(store.clean_tmp().unwrap(), 1);
        // Permission bits do not stop root (the CI user): a directory that cannot hold files.
        let scratch = d.path().join("v1/scratch");
        fs::remove_dir(&scratch).unwrap();
        fs::write(&scratch, b"not a directory").unwrap();
        let e = store.check_writable().unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", scratch.display())), "{e}");
    }

    #[test]
    fn commit_then_hit_then_corruption_detected() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        assert!(store.entry("k1").unwrap().is_none());
        let e = staged(&store, "k1", "hello");
        let got = store.entry("k1").unwrap().unwrap();
        assert_eq!(got.outputs, e.outputs);
        let digest = &e.outputs["data"].digest;
        assert!(store.check_artifact(digest).is_ok());
        // Same size, different bytes, later mtime: the stamp check falls back to the digest.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(store.artifact_path(digest).join("a.txt"), "jello").unwrap();
        let check = store.check_artifact(digest);
        assert!(matches!(check, ArtifactCheck::Corrupt(Corruption::DigestMismatch { .. })), "{check:?}");
        let ArtifactCheck::Corrupt(why) = check else { unreachable!() };
        assert_eq!(
            why.to_string(),
            format!(
                "content digest is {} (expected {})",
                short(&digest_tree(&store.artifact_path(digest)).unwrap().digest),
                short(digest)
            )
        );
        store.remove_artifact(digest).unwrap();
        assert!(matches!(store.check_artifact(digest), ArtifactCheck::Missing));
        assert!(fs::read_dir(d.path().join("v1/tmp")).unwrap().next().is_none());
    }

    #[test]
    fn identical_outputs_share_one_artifact_and_sweep_keeps_live_ones() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let a = staged(&store, "k1", "same");
        let b = staged(&store, "k2", "same");
        assert_eq!(a.outputs, b.outputs);
        staged(&store, "k3", "other");
        assert_eq!(store.artifacts().unwrap().len(), 2);
        store.remove_entry("k3").unwrap();
        assert_eq!(store.sweep_artifacts().unwrap().0, 1);
        assert_eq!(store.artifacts().unwrap(), vec![a.outputs["data"].digest.clone()]);
    }

    #[test]
    fn truncated_entry_is_reported_not_used() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        staged(&store, "k1", "x");
        let p = d.path().join("v1/entries/k1.json");
        let b = fs::read(&p).unwrap();
        fs::write(&p, &b[..b.len() / 2]).unwrap();
        let err = store.entry("k1").unwrap_err();
        assert!(matches!(err, CacheError::CorruptEntry { defect: EntryDefect::Json(_), .. }), "{err}");
        assert!(err.to_string().starts_with(&format!("cache entry {} is unreadable (", p.display())), "{err}");
        // An entry file holding another key's entry is not used for this key either.
        staged(&store, "k2", "y");
        fs::copy(d.path().join("v1/entries/k2.json"), &p).unwrap();
        let err = store.entry("k1").unwrap_err();
        assert!(
            matches!(&err, CacheError::CorruptEntry { defect: EntryDefect::KeyMismatch { found }, .. } if found == "k2"),
            "{err}"
        );
    }

    /// Regression (issue 14, defect 1): 4 KiB overwritten in the middle of a committed artifact
    /// with its mtime restored passed the stamp check, and the loader used the corrupt bytes.
    /// Reads through `checked::read` now fail on the mismatch, in the same pass as the read.
    #[test]
    fn corrupt_artifact_with_restored_mtime_is_an_error_when_read() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let st = store.staging("k1", &["model".to_string()]).unwrap();
        let big: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        fs::write(st.outputs()["model"].join("model.safetensors"), &big).unwrap();
        fs::write(st.outputs()["model"].join("config.json"), "{}").unwrap();
        let e = store.commit(st, Entry::new("k1", serde_json::json!({}), "r", "s", "k")).unwrap();
        let digest = &e.outputs["model"].digest;
        let file = store.artifact_path(digest).join("model.safetensors");
        assert!(store.expect_reads(digest).is_ok());
        assert_eq!(crate::checked::read(&file).unwrap(), big);

        let mtime = fs::metadata(&file).unwrap().modified().unwrap();
        let mut bad = big.clone();
        bad[30_000..30_000 + 4096].fill(0xAA);
        fs::write(&file, &bad).unwrap();
        fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
        // The cheap check cannot see it (same size, same mtime) ...
        assert!(store.check_artifact(digest).is_ok());
        // ... the checked read does.
        assert!(store.expect_reads(digest).is_ok());
        let err = crate::checked::read(&file).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corrupt cache artifact"), "{err}");
        // (Taken for this artifact only: the other tests of this binary arm theirs in parallel.)
        assert!(crate::checked::is_corrupt(&store.artifact_path(digest)));
        assert_eq!(
            crate::checked::take_corrupt_file(&store.artifact_path(digest)).as_deref(),
            Some("model.safetensors")
        );
        // Other files of the artifact still read.
        assert_eq!(crate::checked::read(&store.artifact_path(digest).join("config.json")).unwrap(), b"{}");
    }

    /// Overwrite `file` with `bytes` of the same length and put its mtime back (what the stamp
    /// check cannot see).
    fn overwrite_keeping_mtime(file: &Path, bytes: &[u8]) {
        let mtime = fs::metadata(file).unwrap().modified().unwrap();
        fs::write(file, bytes).unwrap();
        fs::File::options().write(true).open(file).unwrap().set_modified(mtime).unwrap();
    }

    /// Issue 14, defect 1 (no second pass over the file): after the reads of an armed artifact,
    /// `finish_reads` hashes only the files that no checked read covered, and finds those corrupt.
    #[test]
    fn finish_reads_hashes_only_the_files_no_checked_read_covered() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let st = store.staging("k1", &["data".to_string()]).unwrap();
        fs::write(st.outputs()["data"].join("data.parquet"), "PAR1 rows PAR1").unwrap();
        fs::write(st.outputs()["data"].join("side.json"), "{\"a\": 1}").unwrap();
        let e = store.commit(st, Entry::new("k1", serde_json::json!({}), "r", "s", "k")).unwrap();
        let digest = &e.outputs["data"].digest;
        let dir = store.artifact_path(digest);
        assert!(store.expect_reads(digest).is_ok());
        // Read by a memory-mapping loader, checked in the same pass.
        let bytes = fs::read(dir.join("data.parquet")).unwrap();
        assert!(crate::checked::check_bytes(&dir.join("data.parquet"), &bytes).unwrap());
        // Changed after its checked read: not hashed a second time ...
        overwrite_keeping_mtime(&dir.join("data.parquet"), b"PAR1 ROWS PAR1");
        let side = fs::read(dir.join("side.json")).unwrap();
        // ... and a file read some other way (or not at all) is hashed by `finish_reads`: once.
        assert!(store.finish_reads(digest).is_ok());
        assert!(store.finish_reads(digest).is_ok());
        store.remove_artifact(digest).unwrap();
        let e = store.commit(
            {
                let st = store.staging("k1", &["data".to_string()]).unwrap();
                fs::write(st.outputs()["data"].join("data.parquet"), "PAR1 rows PAR1").unwrap();
                fs::write(st.outputs()["data"].join("side.json"), &side).unwrap();
                st
            },
            Entry::new("k1", serde_json::json!({}), "r", "s", "k"),
        );
        assert_eq!(&e.unwrap().outputs["data"].digest, digest);
        assert!(store.expect_reads(digest).is_ok());
        overwrite_keeping_mtime(&dir.join("side.json"), b"{\"a\": 2}");
        let check = store.finish_reads(digest);
        assert!(
            matches!(&check, ArtifactCheck::Corrupt(Corruption::FileMismatch { file }) if file == "side.json"),
            "{check:?}"
        );
        assert_eq!(
            Corruption::FileMismatch { file: "side.json".into() }.to_string(),
            "`side.json` does not match the cache's digest"
        );
        // Not armed (removed and re-created): the full check.
        store.remove_artifact(digest).unwrap();
        assert!(matches!(store.finish_reads(digest), ArtifactCheck::Missing));
    }

    /// Issue 14, defect 1: bytes a loader got by other means than `checked::read` (a memory map)
    /// are checked by `check_bytes`; a mismatch is an error, and the artifact is marked corrupt with
    /// the file named, for `finish_reads` to report.
    #[test]
    fn check_bytes_of_a_corrupt_mapped_file_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let st = store.staging("k1", &["data".to_string()]).unwrap();
        fs::write(st.outputs()["data"].join("data.parquet"), vec![7u8; 10_000]).unwrap();
        let e = store.commit(st, Entry::new("k1", serde_json::json!({}), "r", "s", "k")).unwrap();
        let digest = &e.outputs["data"].digest;
        let file = store.artifact_path(digest).join("data.parquet");
        let mut bad = vec![7u8; 10_000];
        bad[5000] = 8;
        overwrite_keeping_mtime(&file, &bad);
        // Unarmed: nothing is checked (a user's own file, a scratch file).
        assert!(!crate::checked::check_bytes(&file, &bad).unwrap());
        assert!(store.expect_reads(digest).is_ok());
        let err = crate::checked::check_bytes(&file, &fs::read(&file).unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().starts_with("corrupt cache artifact: its content (sha256 "), "{err}");
        let check = store.finish_reads(digest);
        assert!(
            matches!(&check, ArtifactCheck::Corrupt(Corruption::ReadMismatch { file }) if file == "data.parquet"),
            "{check:?}"
        );
    }

    /// Regression (issue 14, defect 1): `cache verify` reported a corrupt artifact but left its
    /// entry valid, so the next run trusted it. `invalidate` drops the artifact and its entries.
    #[test]
    fn cache_verify_invalidates_corrupt_entries() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let a = staged(&store, "k1", "hello");
        staged(&store, "k2", "hello");
        let keep = staged(&store, "k3", "other");
        let digest = &a.outputs["data"].digest;
        fs::write(store.artifact_path(digest).join("a.txt"), "jello").unwrap();
        assert!(matches!(store.verify_artifact(digest), ArtifactCheck::Corrupt(_)));
        let removed: Vec<String> = store.invalidate(digest).unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(removed, vec!["k1", "k2"]);
        assert!(store.entry("k1").unwrap().is_none() && store.entry("k2").unwrap().is_none());
        assert!(store.entry("k3").unwrap().is_some());
        assert!(matches!(store.check_artifact(digest), ArtifactCheck::Missing));
        assert!(store.check_artifact(&keep.outputs["data"].digest).is_ok());
    }
}
