//! Reads checked against the cache's digests while they happen (no second pass over the file).
//!
//! An artifact's stamp holds the sha256 of each of its files; [`Store::expect_reads`](crate::Store::expect_reads)
//! checks that those hashes combine into the artifact's name (a few hundred bytes of hashing, no
//! file content) and registers the artifact's directory here. From then on [`read`] (the `std::fs::read`
//! every model, tokenizer and config loader of the workspace uses) hashes the bytes it has just read
//! of any file under a registered directory and compares them with the expected hash; a loader
//! that gets its bytes another way (a memory map: the Parquet dataset reader, GGUF files) hands
//! them to [`check_bytes`] before parsing them. A mismatch is an [`io::ErrorKind::InvalidData`]
//! error naming the file, never the corrupt bytes. The directory is remembered as corrupt
//! ([`take_corrupt`], [`take_corrupt_file`]) so that the caller can drop the entry and the next run
//! re-creates it.
//!
//! Each registered artifact also remembers which of its files were checked this way since it was
//! armed, so that [`Store::finish_reads`](crate::Store::finish_reads) hashes only the files that no
//! checked read covered (read by other means, or not at all) — never a file twice.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

/// Relative path → (size, sha256 hex) of one artifact's files.
pub(crate) type Manifest = BTreeMap<String, (u64, String)>;

struct Armed {
    root: PathBuf,
    manifest: Arc<Manifest>,
    /// Files whose content a checked read found equal to the manifest.
    checked: BTreeSet<String>,
}

struct Registry {
    armed: Vec<Armed>,
    /// Artifact directory → the first of its files found corrupt.
    corrupt: BTreeMap<PathBuf, String>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { armed: Vec::new(), corrupt: BTreeMap::new() });

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Arm the checked reads of the artifact in `root`, with no file checked yet (arming again, as a
/// new run does, starts over: what an earlier run checked is no proof for this one).
pub(crate) fn register(root: &Path, manifest: Manifest) {
    let root = absolute(root);
    let mut r = registry();
    r.armed.retain(|a| a.root != root);
    r.armed.push(Armed { root, manifest: Arc::new(manifest), checked: BTreeSet::new() });
}

/// The registered artifact `path` lies in, and its relative path there.
fn lookup(path: &Path) -> Option<(PathBuf, String, Arc<Manifest>)> {
    let path = absolute(path);
    let r = registry();
    r.armed.iter().find_map(|a| {
        let rel = path.strip_prefix(&a.root).ok()?;
        let rel = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/");
        Some((a.root.clone(), rel, a.manifest.clone()))
    })
}

/// Check `bytes`, just read from `path` by whatever means, against the cache's digest when `path`
/// is a file of an artifact registered by [`Store::expect_reads`](crate::Store::expect_reads);
/// nothing to do (and no hashing) for any other path. Hash and compare are one pass over the bytes
/// the caller then parses. `Ok(true)` when the bytes were checked, `Ok(false)` when `path` is no
/// armed artifact's file.
pub fn check_bytes(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let Some((root, rel, manifest)) = lookup(path) else {
        return Ok(false);
    };
    let actual = hex::encode(Sha256::digest(bytes));
    let why = match manifest.get(&rel) {
        Some((size, hash)) if *size == bytes.len() as u64 && *hash == actual => None,
        Some((_, hash)) => Some(format!(
            "its content (sha256 {}) does not match the cache's digest ({})",
            &actual[..12],
            &hash[..hash.len().min(12)]
        )),
        None => Some("the cache committed no such file in this artifact".to_string()),
    };
    let mut r = registry();
    match why {
        None => {
            if let Some(a) = r.armed.iter_mut().find(|a| a.root == root) {
                a.checked.insert(rel);
            }
            Ok(true)
        }
        Some(why) => {
            r.corrupt.entry(root).or_insert(rel);
            // No path in the message: every caller's error names the file it was reading.
            Err(io::Error::new(io::ErrorKind::InvalidData, format!("corrupt cache artifact: {why}")))
        }
    }
}

/// `std::fs::read`, checked against the cache's digest when `path` is a file of an artifact
/// registered by [`Store::expect_reads`](crate::Store::expect_reads).
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let bytes = std::fs::read(path)?;
    check_bytes(path, &bytes)?;
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: not UTF-8 text: {e}", path.display())))
}

/// The registered artifact directories whose reads found corrupt content since the last call.
pub fn take_corrupt() -> Vec<PathBuf> {
    std::mem::take(&mut registry().corrupt).into_keys().collect()
}

/// The file (relative path) of the artifact in `root` that a checked read found corrupt, if any;
/// forgets it, leaving other artifacts' records to their own callers (stages run in parallel).
pub fn take_corrupt_file(root: &Path) -> Option<String> {
    registry().corrupt.remove(&absolute(root))
}

/// Whether `path` is a registered artifact found corrupt (and not yet taken).
pub fn is_corrupt(path: &Path) -> bool {
    registry().corrupt.contains_key(&absolute(path))
}

/// The files of the armed artifact in `root` that no checked read has covered: (relative path,
/// size, sha256 hex). `None` when `root` is not armed.
pub(crate) fn unchecked(root: &Path) -> Option<Vec<(String, u64, String)>> {
    let root = absolute(root);
    let r = registry();
    let a = r.armed.iter().find(|a| a.root == root)?;
    Some(
        a.manifest
            .iter()
            .filter(|(rel, _)| !a.checked.contains(*rel))
            .map(|(rel, (size, hash))| (rel.clone(), *size, hash.clone()))
            .collect(),
    )
}

/// Record that file `rel` of the armed artifact in `root` was found equal to its manifest.
pub(crate) fn mark_checked(root: &Path, rel: &str) {
    let root = absolute(root);
    if let Some(a) = registry().armed.iter_mut().find(|a| a.root == root) {
        a.checked.insert(rel.to_string());
    }
}

/// Forget that the artifact in `root` was checked (it was found corrupt and is being re-created).
pub(crate) fn forget(root: &Path) {
    let root = absolute(root);
    let mut r = registry();
    r.armed.retain(|a| a.root != root);
    r.corrupt.remove(&root);
}
