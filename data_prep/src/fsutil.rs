//! File helpers: crash-safe writes (temporary name, fsync, rename) and SHA-256 hashing.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};

/// The temporary name an output is written under before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A file being written under a temporary name; [`AtomicFile::commit`] fsyncs and renames it.
///
/// Dropping it without committing removes the temporary file, so an interrupted write never
/// leaves something at the final path that looks complete.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Creates `<dest>.tmp` (truncating any leftover).
    pub fn create(dest: &Path) -> Result<Self> {
        let tmp = tmp_path(dest);
        let file = File::create(&tmp).ctx(|| format!("cannot create {}", tmp.display()))?;
        Ok(AtomicFile {
            tmp,
            dest: dest.to_path_buf(),
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Appends bytes.
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let tmp = &self.tmp;
        self.writer
            .as_mut()
            .expect("AtomicFile used after commit")
            .write_all(bytes)
            .ctx(|| format!("cannot write {}", tmp.display()))
    }

    /// Flushes, fsyncs, renames to the final path and fsyncs the folder.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("AtomicFile committed twice");
        let file = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx(|| format!("cannot write {}", self.tmp.display()))?;
        file.sync_all()
            .ctx(|| format!("cannot fsync {}", self.tmp.display()))?;
        drop(file);
        rename_into_place(&self.tmp, &self.dest)
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer
            .as_mut()
            .expect("AtomicFile used after commit")
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer
            .as_mut()
            .expect("AtomicFile used after commit")
            .flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Renames `tmp` onto `dest` and fsyncs the containing folder so the rename is durable.
pub fn rename_into_place(tmp: &Path, dest: &Path) -> Result<()> {
    fs::rename(tmp, dest)
        .ctx(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    sync_dir(dest.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// Fsyncs a folder (best effort: not every platform or file system supports it).
pub fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `dest` crash-safely (temporary name, fsync, rename).
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(dest)?;
    f.append(bytes)?;
    f.commit()
}

/// Lower-case hex SHA-256 of a whole file, read in a streaming way.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
    let mut reader = HashingReader::new(file);
    io::copy(&mut reader, &mut io::sink()).ctx(|| format!("cannot read {}", path.display()))?;
    Ok(reader.finish().0)
}

/// A reader that hashes (SHA-256) and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Returns the lower-case hex digest and the byte count.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Opens (creating it if needed, never truncating) a lock file: the one way the workspace opens the files
/// it takes `flock` locks on (build folders, run dirs, GPUs).
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Try to take an exclusive lock on the file at `path` without waiting: `Ok(Some(file))` holds it until
/// the file is dropped, `Ok(None)` means another process holds it.
pub fn try_lock_file(path: &Path) -> io::Result<Option<File>> {
    let file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// An exclusive lock on a folder, held until dropped (see [`lock_dir`]).
pub struct DirLock {
    /// `None` where no lock could be taken (see [`lock_dir`]).
    _file: Option<File>,
    /// Whether another process held the lock first: what it wrote may have changed the folder.
    pub waited: bool,
}

/// An exclusive lock on `dir/name`, held until the returned guard is dropped; waits (saying so) while
/// another process holds it. A folder this user cannot write to, or a filesystem without file locks
/// (some network mounts), gives no lock and a warning rather than an error.
pub fn lock_dir(dir: &Path, name: &str) -> Result<DirLock> {
    let unlocked = DirLock {
        _file: None,
        waited: false,
    };
    let path = dir.join(name);
    let file = match open_lock_file(&path) {
        Ok(f) => f,
        // A folder this user may not write to: whatever happens next reports it; no lock to take.
        Err(e)
            if e.kind() == std::io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(30) =>
        {
            tracing::warn!(
                "cannot create lock file {} ({e}); going on without a lock",
                path.display()
            );
            return Ok(unlocked);
        }
        Err(e) => return Err(e).ctx(|| format!("cannot open lock file {}", path.display())),
    };
    match file.try_lock() {
        Ok(()) => Ok(DirLock {
            _file: Some(file),
            waited: false,
        }),
        Err(std::fs::TryLockError::WouldBlock) => {
            tracing::info!(
                "another process is writing {}; waiting for it",
                dir.display()
            );
            file.lock()
                .ctx(|| format!("cannot lock {}", path.display()))?;
            Ok(DirLock {
                _file: Some(file),
                waited: true,
            })
        }
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(
                "cannot lock {} ({e}); going on without a lock",
                path.display()
            );
            Ok(unlocked)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_tmp_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.bin");
        write_atomic(&dest, b"hello").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"hello");
        assert!(!tmp_path(&dest).exists());

        let other = dir.path().join("b.bin");
        {
            let mut f = AtomicFile::create(&other).unwrap();
            f.append(b"partial").unwrap();
            assert!(tmp_path(&other).exists());
        }
        assert!(!tmp_path(&other).exists());
        assert!(!other.exists());
    }

    #[test]
    fn sha256_matches_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
