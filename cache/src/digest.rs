//! Tree digests: the content address of a file or directory.
//!
//! The digest of a tree is sha256 over its entries in byte order of their relative paths, each
//! entry being `D\0<rel>\n` for a directory or `F\0<rel>\0<size>\0<sha256 of content>\n` for a
//! file (symlinks are followed). Names, sizes and contents enter; mtimes, permissions and the
//! root's own path do not.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

/// One file of a tree, as found on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeFile {
    /// Path relative to the tree root, `/`-separated (empty when the root is a file).
    pub rel: String,
    pub size: u64,
    /// Local modification time (ns since the epoch); used only in stamps, never in digests.
    pub mtime_ns: u128,
}

/// A digested tree.
#[derive(Debug, Clone)]
pub struct Tree {
    /// `sha256` hex.
    pub digest: String,
    pub files: Vec<TreeFile>,
    pub dirs: Vec<String>,
    /// Total size of the files.
    pub bytes: u64,
    /// sha256 hex of each file's content, in the order of `files`.
    pub hashes: Vec<String>,
}

pub(crate) fn mtime_ns(meta: &fs::Metadata) -> u128 {
    meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0)
}

pub(crate) fn hash_file(path: &Path) -> io::Result<[u8; 32]> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Walk `root` (a file or a directory), sorted, without hashing: relative files and dirs.
/// Files (with their paths) and directories of a tree, sorted.
pub(crate) type Walk = (Vec<(TreeFile, PathBuf)>, Vec<String>);

pub(crate) fn walk(root: &Path) -> io::Result<Walk> {
    let meta = fs::metadata(root)?;
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    if meta.is_file() {
        files.push((TreeFile { rel: String::new(), size: meta.len(), mtime_ns: mtime_ns(&meta) }, root.to_path_buf()));
        return Ok((files, dirs));
    }
    fn rec(dir: &Path, prefix: &str, files: &mut Vec<(TreeFile, PathBuf)>, dirs: &mut Vec<String>) -> io::Result<()> {
        let mut names: Vec<(String, PathBuf)> = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            names.push((name, e.path()));
        }
        names.sort();
        for (name, path) in names {
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let meta = fs::metadata(&path)?;
            if meta.is_dir() {
                dirs.push(rel.clone());
                rec(&path, &rel, files, dirs)?;
            } else {
                files.push((TreeFile { rel, size: meta.len(), mtime_ns: mtime_ns(&meta) }, path));
            }
        }
        Ok(())
    }
    rec(root, "", &mut files, &mut dirs)?;
    Ok((files, dirs))
}

/// Digest a file or directory by content (see the module doc for the exact encoding).
pub fn digest_tree(root: &Path) -> io::Result<Tree> {
    let (files, dirs) = walk(root)?;
    let mut hashes = Vec::with_capacity(files.len());
    for (_, path) in &files {
        hashes.push(hex::encode(hash_file(path)?));
    }
    let files: Vec<TreeFile> = files.into_iter().map(|(f, _)| f).collect();
    let listed: Vec<(&str, u64, &str)> =
        files.iter().zip(&hashes).map(|(f, h)| (f.rel.as_str(), f.size, h.as_str())).collect();
    let digest = combine(&dirs, &listed);
    let bytes = files.iter().map(|f| f.size).sum();
    Ok(Tree { digest, files, dirs, bytes, hashes })
}

/// The tree digest of directories `dirs` and files `(rel, size, sha256 hex)`: what
/// [`digest_tree`] computes once the files are hashed (so a manifest of per-file hashes can be
/// checked against an artifact's name without reading the files).
pub(crate) fn combine(dirs: &[String], files: &[(&str, u64, &str)]) -> String {
    // Entries in byte order of their relative path (dirs and files interleaved).
    let mut entries: BTreeMap<&str, Option<(u64, &str)>> = BTreeMap::new();
    for d in dirs {
        entries.insert(d, None);
    }
    for (rel, size, hash) in files {
        entries.insert(rel, Some((*size, hash)));
    }
    let mut h = Sha256::new();
    for (rel, e) in entries {
        match e {
            None => {
                h.update(b"D\0");
                h.update(rel.as_bytes());
                h.update(b"\n");
            }
            Some((size, hash)) => {
                h.update(b"F\0");
                h.update(rel.as_bytes());
                h.update(format!("\0{size}\0").as_bytes());
                h.update(hash.as_bytes());
                h.update(b"\n");
            }
        }
    }
    hex::encode(h.finalize())
}

/// A memo of local-file digests keyed by (absolute path, size, mtime), so that a recipe's data
/// files are not re-read on every warm run. Only a memo: keys hold content digests. A record is
/// trusted only when the file's mtime was at least 2 s older than the moment it was hashed (a file
/// modified within the timestamp granularity right after hashing would otherwise look unchanged).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FileMemo {
    records: BTreeMap<String, MemoRecord>,
    #[serde(skip)]
    dirty: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct MemoRecord {
    files: Vec<TreeFile>,
    dirs: Vec<String>,
    hashed_at_ns: u128,
    digest: String,
}

const RACY_NS: u128 = 2_000_000_000;

impl FileMemo {
    pub fn load(path: &Path) -> FileMemo {
        fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }
    pub fn save(&self, path: &Path) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        crate::write_atomic(path, &serde_json::to_vec(self).map_err(io::Error::other)?)
    }
    /// Content digest of a local file or directory, reusing the memo when its stat is unchanged.
    pub fn digest(&mut self, path: &Path) -> io::Result<String> {
        let key = path.to_string_lossy().into_owned();
        let (files, dirs) = walk(path)?;
        let files: Vec<TreeFile> = files.into_iter().map(|(f, _)| f).collect();
        if let Some(r) = self.records.get(&key) {
            let not_racy = files.iter().all(|f| f.mtime_ns + RACY_NS < r.hashed_at_ns);
            if r.files == files && r.dirs == dirs && not_racy {
                return Ok(r.digest.clone());
            }
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tree = digest_tree(path)?;
        self.records.insert(
            key,
            MemoRecord { files: tree.files, dirs: tree.dirs, hashed_at_ns: now, digest: tree.digest.clone() },
        );
        self.dirty = true;
        Ok(tree.digest)
    }
}

/// [`FileMemo::digest`] with the memo stored at `memo_path` (loaded and saved around the call).
pub fn digest_file_memo(memo_path: &Path, path: &Path) -> io::Result<String> {
    let mut memo = FileMemo::load(memo_path);
    let d = memo.digest(path)?;
    memo.save(memo_path)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_names_and_content_not_location() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            fs::create_dir_all(d.join("sub")).unwrap();
            fs::write(d.join("sub/x.txt"), "hello").unwrap();
            fs::write(d.join("y.txt"), "world").unwrap();
        }
        let da = digest_tree(a.path()).unwrap();
        assert_eq!(da.digest, digest_tree(b.path()).unwrap().digest);
        assert_eq!(da.bytes, 10);
        fs::write(b.path().join("y.txt"), "World").unwrap();
        assert_ne!(da.digest, digest_tree(b.path()).unwrap().digest);
        fs::write(b.path().join("y.txt"), "world").unwrap();
        fs::rename(b.path().join("y.txt"), b.path().join("z.txt")).unwrap();
        assert_ne!(da.digest, digest_tree(b.path()).unwrap().digest);
    }

    #[test]
    fn empty_dir_is_not_a_file() {
        let a = tempfile::tempdir().unwrap();
        fs::create_dir(a.path().join("e")).unwrap();
        fs::write(a.path().join("f"), "").unwrap();
        assert_ne!(digest_tree(&a.path().join("e")).unwrap().digest, digest_tree(&a.path().join("f")).unwrap().digest);
    }

    #[test]
    fn memo_sees_edits() {
        let a = tempfile::tempdir().unwrap();
        let f = a.path().join("d.txt");
        fs::write(&f, "one").unwrap();
        let mut m = FileMemo::default();
        let d1 = m.digest(&f).unwrap();
        fs::write(&f, "two").unwrap();
        let d2 = m.digest(&f).unwrap();
        assert_ne!(d1, d2);
        assert_eq!(d2, digest_tree(&f).unwrap().digest);
    }
}
