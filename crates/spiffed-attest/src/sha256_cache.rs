//! SHA-256 of executables, cached by file identity so a binary is hashed once, not per call.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Most executables remembered; when full, one arbitrary entry makes room for the new one.
const MAX_ENTRIES: usize = 4096;
/// Read size while hashing.
const CHUNK: usize = 64 * 1024;

/// What makes two opens the same file with the same content, as far as `fstat` can tell.
///
/// The ctime is in the key as well as the mtime: `utimensat` can set the mtime back after the file
/// is rewritten in place, but any change to the inode moves the ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A bounded map from file identity to the file's SHA-256 (64 lowercase hex digits).
#[derive(Debug, Default)]
pub(crate) struct Sha256Cache {
    map: Mutex<HashMap<FileKey, String>>,
    computed: AtomicU64,
}

impl Sha256Cache {
    /// The SHA-256 of the open file `file` (whose fstat the caller already has, as `meta`),
    /// from the cache when its identity is known.
    ///
    /// Hashes outside the lock, so one large binary does not hold up other callers' lookups.
    pub(crate) fn sha256(&self, mut file: File, meta: &Metadata) -> io::Result<String> {
        let key = FileKey::of(meta);
        if let Some(hex) = self.lock().get(&key) {
            return Ok(hex.clone());
        }
        let hex = hash(&mut file)?;
        self.computed.fetch_add(1, Ordering::Relaxed);
        let mut map = self.lock();
        if map.len() >= MAX_ENTRIES
            && !map.contains_key(&key)
            && let Some(old) = map.keys().next().copied()
        {
            map.remove(&old);
        }
        map.insert(key, hex.clone());
        Ok(hex)
    }

    /// The cached SHA-256 of the file whose fstat is `meta`, or `None` when it would have to
    /// be computed.
    pub(crate) fn cached(&self, meta: &Metadata) -> Option<String> {
        self.lock().get(&FileKey::of(meta)).cloned()
    }

    /// Number of cached hashes.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// How many files have been hashed (cache misses) since creation.
    pub(crate) fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, String>> {
        // The map is valid after any panic mid-update (each update is one insert or remove).
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// SHA-256 of everything readable from `file`, as lowercase hex.
fn hash(file: &mut File) -> io::Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => ctx.update(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let digest = ctx.finish();
    let mut hex = String::with_capacity(64);
    for b in digest.as_ref() {
        let _ = write!(hex, "{b:02x}");
    }
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Opens `path` and asks the cache, as attestation does with the running file.
    fn sha(cache: &Sha256Cache, path: &std::path::Path) -> io::Result<String> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        cache.sha256(file, &meta)
    }

    #[test]
    fn hashes_known_content_once() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"abc").unwrap();
        let cache = Sha256Cache::default();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha(&cache, f.path()).unwrap(), want);
        assert_eq!(sha(&cache, f.path()).unwrap(), want);
        assert_eq!(cache.computed(), 1);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn rewriting_the_file_misses_the_cache() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"abc").unwrap();
        let cache = Sha256Cache::default();
        sha(&cache, f.path()).unwrap();
        f.write_all(b"def").unwrap();
        f.flush().unwrap();
        let want = "bef57ec7f53a6d40beb640a780a639c83bc29ac8a9816f1fc6c5c6dcd93c4721";
        assert_eq!(sha(&cache, f.path()).unwrap(), want);
        assert_eq!(cache.computed(), 2);
    }

    #[test]
    fn hashes_more_than_one_chunk() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data = vec![7u8; CHUNK * 2 + 3];
        f.write_all(&data).unwrap();
        let want: String = ring::digest::digest(&ring::digest::SHA256, &data)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let cache = Sha256Cache::default();
        assert_eq!(sha(&cache, f.path()).unwrap(), want);
    }

    #[test]
    fn stays_bounded() {
        let cache = Sha256Cache::default();
        {
            let mut map = cache.lock();
            for i in 0..MAX_ENTRIES as u64 {
                let key = FileKey {
                    dev: 0,
                    ino: i,
                    size: 0,
                    mtime: (0, 0),
                    ctime: (0, 0),
                };
                map.insert(key, String::new());
            }
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        sha(&cache, f.path()).unwrap();
        assert_eq!(cache.len(), MAX_ENTRIES);
    }
}
