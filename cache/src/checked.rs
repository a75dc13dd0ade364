//! Reads checked against the cache's digests while they happen (no second pass over the file).
//!
//! An artifact's stamp holds the sha256 of each of its files; [`Store::expect_reads`](crate::Store::expect_reads)
//! checks that those hashes combine into the artifact's name (a few hundred bytes of hashing, no
//! file content) and registers the artifact's directory here. From then on [`read`] (the `std::fs::read`
//! every model, tokenizer and config loader of the workspace uses) hashes the bytes it has just read
//! of any file under a registered directory and compares them with the expected hash: a mismatch
//! is an [`io::ErrorKind::InvalidData`] error naming the file, never the corrupt bytes. The
//! directory is remembered as corrupt ([`take_corrupt`]) so that the caller can drop the entry and
//! the next run re-creates it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

/// Relative path → (size, sha256 hex) of one artifact's files.
pub(crate) type Manifest = BTreeMap<String, (u64, String)>;

struct Registry {
    expected: Vec<(PathBuf, Arc<Manifest>)>,
    corrupt: BTreeSet<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { expected: Vec::new(), corrupt: BTreeSet::new() });

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

pub(crate) fn register(root: &Path, manifest: Manifest) {
    let root = absolute(root);
    let mut r = registry();
    r.expected.retain(|(p, _)| p != &root);
    r.expected.push((root, Arc::new(manifest)));
}

/// The registered artifact `path` lies in, and its relative path there.
fn lookup(path: &Path) -> Option<(PathBuf, String, Arc<Manifest>)> {
    let path = absolute(path);
    let r = registry();
    r.expected.iter().find_map(|(root, m)| {
        let rel = path.strip_prefix(root).ok()?;
        let rel = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/");
        Some((root.clone(), rel, m.clone()))
    })
}

/// `std::fs::read`, checked against the cache's digest when `path` is a file of an artifact
/// registered by [`Store::expect_reads`](crate::Store::expect_reads).
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let bytes = std::fs::read(path)?;
    if let Some((root, rel, manifest)) = lookup(path) {
        let actual = hex::encode(Sha256::digest(&bytes));
        let why = match manifest.get(&rel) {
            Some((size, hash)) if *size == bytes.len() as u64 && *hash == actual => None,
            Some((_, hash)) => Some(format!(
                "its content (sha256 {}) does not match the cache's digest ({})",
                &actual[..12],
                &hash[..hash.len().min(12)]
            )),
            None => Some("the cache committed no such file in this artifact".to_string()),
        };
        if let Some(why) = why {
            registry().corrupt.insert(root);
            // No path in the message: every caller's error names the file it was reading.
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("corrupt cache artifact: {why}")));
        }
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: not UTF-8 text: {e}", path.display())))
}

/// The registered artifact directories whose reads found corrupt content since the last call.
pub fn take_corrupt() -> Vec<PathBuf> {
    std::mem::take(&mut registry().corrupt).into_iter().collect()
}

/// Whether `path` is a registered artifact found corrupt (and not yet taken).
pub fn is_corrupt(path: &Path) -> bool {
    registry().corrupt.contains(&absolute(path))
}
