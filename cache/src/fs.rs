//! Atomic file writes: the one implementation every crate uses for files that must appear whole
//! or not at all (cache entries and stamps, checkpoints, reports, safetensors / GGUF / PNG
//! artifacts, datasets).
//!
//! The protocol ([`AtomicFile`]): create the parent directory; create a temp file with a unique
//! name in the *same* directory (`.<name>.<pid>.<counter>.tmp`, opened with `create_new`, so two
//! writers — threads or processes — never share one); write; flush and fsync the file; rename it
//! over the target; fsync the directory (Unix) so the rename survives a power loss. Any failure
//! before the rename removes the temp file and leaves the old target untouched. Two concurrent
//! writers of one path both succeed and the target holds one of them in full (the last rename).
//!
//! Temp names start with `.` and end with `.tmp`, so directory listings that skip hidden files
//! ignore them and the cache's `clean_tmp` removes those left by a killed process.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Write `bytes` to `path` atomically (see the module docs). Creates the parent directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Stream a file to `path` atomically: `write` gets the temp file (buffered) and the file is
/// committed only when it returns `Ok`. An error from `write` (wrap foreign errors with
/// [`io::Error::other`]) removes the temp file and leaves `path` as it was.
pub fn write_atomic_with<T>(path: &Path, write: impl FnOnce(&mut AtomicFile) -> io::Result<T>) -> io::Result<T> {
    let mut file = AtomicFile::create(path)?;
    let value = write(&mut file)?;
    file.commit()?;
    Ok(value)
}

/// A file being written to a temp name beside its target; [`AtomicFile::commit`] renames it into
/// place. Dropped without a commit, the temp file is removed.
#[derive(Debug)]
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Open a fresh temp file for `path` (creating `path`'s parent directory).
    pub fn create(path: &Path) -> io::Result<AtomicFile> {
        let dir = parent(path);
        fs::create_dir_all(dir)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
        loop {
            let tmp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), unique()));
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => {
                    return Ok(AtomicFile {
                        dest: path.to_path_buf(),
                        tmp,
                        file: Some(BufWriter::with_capacity(1 << 16, f)),
                    })
                }
                // A stale temp file of an earlier process that had our pid: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The target path.
    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// The temp file's path (for diagnostics).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// A second handle on the temp file, for a writer that must own its sink (polars'
    /// `BatchedWriter` never gives its writer back). Bytes written through it are part of the
    /// file that [`AtomicFile::commit`] renames; flush any buffer around it before committing,
    /// and do not interleave it with writes through `self`.
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.inner().get_ref().try_clone()
    }

    /// Flush, fsync, rename over the target, fsync the directory. On an error before the rename
    /// the temp file is removed and the target is untouched.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("an AtomicFile is committed once");
        let renamed = (|| {
            let file = file.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&self.tmp, &self.dest)
        })();
        if let Err(e) = renamed {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        sync_dir(parent(&self.dest))
    }

    fn inner(&self) -> &BufWriter<File> {
        self.file.as_ref().expect("not committed")
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().expect("not committed").write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.as_mut().expect("not committed").write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            // Not committed: discard the buffer (no flush) and the temp file.
            let _ = f.into_parts();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    // Directories cannot be opened for fsync on Windows; the rename is durable once it returns.
    Ok(())
}

/// A process-wide counter for unique temp names.
pub(crate) fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn writes_creates_parent_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/dir/out.json");
        write_atomic(&p, b"one").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"two, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two, longer");
        assert!(leftovers(p.parent().unwrap()).is_empty());
    }

    #[test]
    fn relative_path_without_parent_is_written_in_the_current_directory() {
        assert_eq!(parent(Path::new("x.json")), Path::new("."));
        assert_eq!(parent(Path::new("a/x.json")), Path::new("a"));
    }

    /// Regression: two writers used a fixed temp name (`.<name>.tmp`) and one's rename failed or
    /// published the other's half-written file.
    #[test]
    fn concurrent_writers_of_one_path_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("report.json");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 200_000 + usize::from(i) * 1000]).collect();
        for _round in 0..5 {
            std::thread::scope(|s| {
                let handles: Vec<_> = contents
                    .iter()
                    .map(|c| {
                        let p = &p;
                        s.spawn(move || {
                            write_atomic_with(p, |w| {
                                // Several writes, so the writers really interleave.
                                for chunk in c.chunks(7_000) {
                                    w.write_all(chunk)?;
                                    std::thread::yield_now();
                                }
                                Ok(())
                            })
                        })
                    })
                    .collect();
                for h in handles {
                    h.join().unwrap().expect("every concurrent writer succeeds");
                }
            });
            let got = fs::read(&p).unwrap();
            assert!(contents.contains(&got), "the file is one writer's full content ({} bytes)", got.len());
            assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));
        }
    }

    #[test]
    fn failed_write_leaves_old_content_and_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.gguf");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |w| {
            w.write_all(&[7u8; 100_000])?;
            Err::<(), _>(io::Error::other("encoder failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "encoder failed");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));

        // Dropped without commit (a panic or an early return in a streaming writer).
        let f = AtomicFile::create(&p).unwrap();
        let tmp = f.temp_path().to_path_buf();
        assert!(tmp.exists());
        drop(f);
        assert!(!tmp.exists());
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn rename_failure_removes_the_temp_file() {
        let d = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: the rename fails.
        let p = d.path().join("taken");
        fs::create_dir_all(p.join("inner")).unwrap();
        assert!(write_atomic(&p, b"x").is_err());
        assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));
        assert!(p.join("inner").is_dir());
    }

    #[test]
    fn cloned_handle_writes_into_the_committed_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data.parquet");
        let f = AtomicFile::create(&p).unwrap();
        {
            let mut w = BufWriter::new(f.try_clone_file().unwrap());
            w.write_all(b"through the clone").unwrap();
            w.flush().unwrap();
        }
        assert!(!p.exists(), "nothing appears before the commit");
        f.commit().unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"through the clone");
        assert!(leftovers(d.path()).is_empty());
    }
}
