//! Every update of `spiffed helper` becomes visible all at once, the way Kubernetes'
//! `AtomicWriter` updates a projected volume:
//!
//! ```text
//! cert_dir/..2026_01_02_03_04_05.123456789_1/   one version: every file of one update
//! cert_dir/..data -> ..2026_01_02_03_04_05...   the current version
//! cert_dir/svid.pem -> ..data/svid.pem          the names programs open
//! ```
//!
//! An update writes a new version directory (each file created with its mode and owner before
//! any byte, fsynced), points a new `..data_tmp` link at it and renames that over `..data`: one
//! `rename(2)`, so at every instant the names resolve into one version, and a key is never
//! shown with another update's certificate. Then the user-visible links are created where
//! missing, links of files no longer configured are removed, and older versions are deleted.
//! A restart after `kill -9` removes half-written versions and a stray `..data_tmp`.
//!
//! (A program that opens the certificate, then the key, can still pair files of two versions
//! if the switch falls between its two opens; it reloads when the helper signals it, after
//! the switch, and the combined file holds both in one file.)

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::config::FilePerm;

/// The link to the current version.
const DATA: &str = "..data";
/// The link being prepared.
const DATA_TMP: &str = "..data_tmp";
/// Mode of cert_dir (when created) and of each version directory.
const DIR_MODE: u32 = 0o755;

/// One file of an update. The contents are zeroized on drop (they may be a key).
#[derive(Clone)]
pub(crate) struct FileSpec {
    /// The user-visible name in cert_dir.
    pub(crate) name: String,
    /// The bytes.
    pub(crate) contents: Zeroizing<Vec<u8>>,
    /// Mode, owner, group.
    pub(crate) perm: FilePerm,
}

impl std::fmt::Debug for FileSpec {
    /// Never the contents.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSpec")
            .field("name", &self.name)
            .field("len", &self.contents.len())
            .field("perm", &self.perm)
            .finish()
    }
}

/// Writing the files failed; the previous version stays in place.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// A file system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// chown was refused.
    #[error(
        "cannot give {} to uid {uid:?} gid {gid:?}: {source} (changing a file's owner needs \
         root or CAP_CHOWN, and a group the helper's user is not in needs it too; run the \
         helper as root or leave out the owner/group settings)",
        path.display()
    )]
    Chown {
        /// The file.
        path: PathBuf,
        /// The owner asked for.
        uid: Option<u32>,
        /// The group asked for.
        gid: Option<u32>,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A user-visible name is taken by a directory.
    #[error(
        "{} is a directory: remove it, or choose another file name",
        path.display()
    )]
    NameTaken {
        /// The path.
        path: PathBuf,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WriteError {
    let path = path.to_path_buf();
    move |source| WriteError::Io {
        action,
        path,
        source,
    }
}

/// A check run after each step of an update (tests).
#[cfg(test)]
type Observer = Box<dyn Fn(&Path) + Send>;

/// The writer of one cert_dir.
pub(crate) struct Writer {
    dir: PathBuf,
    /// Makes version names unique within a process.
    counter: u64,
    /// Called after each step of an update, to check what readers see at that moment.
    #[cfg(test)]
    observer: Option<Observer>,
}

impl Writer {
    /// Opens cert_dir (creating it, 0755, if missing) and removes what an interrupted update
    /// left: a `..data_tmp` link and versions `..data` does not point to.
    pub(crate) fn open(dir: &Path) -> Result<Self, WriteError> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io_err("use as cert_dir", dir)(std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    "not a directory",
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(dir)
                    .map_err(io_err("create directory", dir))?;
                std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
                    .map_err(io_err("set the mode of", dir))?;
            }
            Err(e) => return Err(io_err("inspect", dir)(e)),
        }
        let writer = Self {
            dir: dir.to_path_buf(),
            counter: 0,
            #[cfg(test)]
            observer: None,
        };
        writer.remove_leftovers(None)?;
        Ok(writer)
    }

    /// The version `..data` points to, if any.
    fn current(&self) -> Option<String> {
        std::fs::read_link(self.dir.join(DATA))
            .ok()
            .and_then(|t| t.to_str().map(str::to_owned))
    }

    /// Removes `..data_tmp` and every `..` version but the current one and `keep`.
    fn remove_leftovers(&self, keep: Option<&str>) -> Result<(), WriteError> {
        let current = self.current();
        let entries = std::fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !name.starts_with("..") || name == DATA {
                continue;
            }
            if Some(name.as_str()) == current.as_deref() || Some(name.as_str()) == keep {
                continue;
            }
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir {
                std::fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            } else {
                std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn step(&self) {
        if let Some(observe) = &self.observer {
            observe(&self.dir);
        }
    }

    #[cfg(not(test))]
    fn step(&self) {}

    /// Writes `files` as the new version and switches to it. On error the previous version
    /// stays current (and the half-written one is removed).
    pub(crate) fn write(&mut self, files: &[FileSpec]) -> Result<(), WriteError> {
        self.counter += 1;
        let now = time::OffsetDateTime::now_utc();
        let version = format!(
            "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}_{}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            now.nanosecond(),
            self.counter
        );
        let version_dir = self.dir.join(&version);
        let result = self.write_version(&version_dir, files);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&version_dir);
            return result;
        }
        self.step();
        self.switch(&version)?;
        self.step();
        self.link_names(files)?;
        self.remove_leftovers(Some(&version))?;
        sync_dir(&self.dir)?;
        self.step();
        Ok(())
    }

    fn write_version(&self, version_dir: &Path, files: &[FileSpec]) -> Result<(), WriteError> {
        DirBuilder::new()
            .mode(DIR_MODE)
            .create(version_dir)
            .map_err(io_err("create directory", version_dir))?;
        std::fs::set_permissions(version_dir, Permissions::from_mode(DIR_MODE))
            .map_err(io_err("set the mode of", version_dir))?;
        for f in files {
            let path = version_dir.join(&f.name);
            // Created at the mode before any byte is written: a key is never readable by
            // others, not even for a moment.
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(f.perm.mode)
                .open(&path)
                .map_err(io_err("create", &path))?;
            // The umask may have narrowed it; set it exactly.
            file.set_permissions(Permissions::from_mode(f.perm.mode))
                .map_err(io_err("set the mode of", &path))?;
            if f.perm.uid.is_some() || f.perm.gid.is_some() {
                std::os::unix::fs::fchown(&file, f.perm.uid, f.perm.gid).map_err(|source| {
                    WriteError::Chown {
                        path: path.clone(),
                        uid: f.perm.uid,
                        gid: f.perm.gid,
                        source,
                    }
                })?;
            }
            file.write_all(&f.contents)
                .map_err(io_err("write", &path))?;
            file.sync_all().map_err(io_err("fsync", &path))?;
        }
        sync_dir(version_dir)
    }

    /// `..data_tmp -> version`, renamed over `..data`.
    fn switch(&self, version: &str) -> Result<(), WriteError> {
        let tmp = self.dir.join(DATA_TMP);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &tmp)(e)),
        }
        std::os::unix::fs::symlink(version, &tmp).map_err(io_err("create link", &tmp))?;
        let data = self.dir.join(DATA);
        std::fs::rename(&tmp, &data).map_err(io_err("rename a link over", &data))?;
        sync_dir(&self.dir)
    }

    /// `name -> ..data/name` for every file, where not yet so; links of names no longer
    /// written are removed.
    fn link_names(&self, files: &[FileSpec]) -> Result<(), WriteError> {
        for f in files {
            let path = self.dir.join(&f.name);
            let target = PathBuf::from(DATA).join(&f.name);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    if std::fs::read_link(&path).ok().as_deref() == Some(target.as_path()) {
                        continue;
                    }
                }
                Ok(m) if m.is_dir() => return Err(WriteError::NameTaken { path }),
                // A regular file (left by spiffe-helper or `api watch`): replaced below.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("inspect", &path)(e)),
            }
            let tmp = self.dir.join(format!("..link_{}", f.name));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&target, &tmp).map_err(io_err("create link", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err("rename a link over", &path))?;
            self.step();
        }
        let entries = std::fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with("..") || files.iter().any(|f| f.name == name) {
                continue;
            }
            let path = entry.path();
            let ours = std::fs::read_link(&path)
                .ok()
                .is_some_and(|t| t.starts_with(DATA) && t.components().count() == 2);
            if ours {
                std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(())
    }
}

/// Fsyncs a directory, so the entries made in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn spec(name: &str, contents: &str, mode: u32) -> FileSpec {
        FileSpec {
            name: name.into(),
            contents: Zeroizing::new(contents.as_bytes().to_vec()),
            perm: FilePerm {
                mode,
                uid: None,
                gid: None,
            },
        }
    }

    fn update(n: u32) -> Vec<FileSpec> {
        vec![
            spec("svid.pem", &format!("cert {n}"), 0o644),
            spec("svid_key.pem", &format!("key {n}"), 0o600),
            spec("bundle.pem", "bundle", 0o644),
        ]
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn names_are_links_into_the_current_version_with_modes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("certs");
        let mut w = Writer::open(&dir).unwrap();
        w.write(&update(1)).unwrap();
        w.write(&update(2)).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("svid.pem")).unwrap(),
            "cert 2"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("svid_key.pem")).unwrap(),
            "key 2"
        );
        let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("svid_key.pem"), 0o600);
        assert_eq!(mode("svid.pem"), 0o644);
        assert_eq!(
            std::fs::read_link(dir.join("svid.pem")).unwrap(),
            PathBuf::from("..data/svid.pem")
        );
        // One version left, plus ..data and the three names.
        let all = names(&dir);
        assert_eq!(all.len(), 5, "{all:?}");
        assert_eq!(all.iter().filter(|n| n.starts_with("..20")).count(), 1);
    }

    /// The property the layout exists for: at every step of an update, what a reader opens
    /// through the visible names belongs to one update. Writing the files one by one (rename
    /// the key, then the certificate) fails this at the step between the two renames.
    #[test]
    fn at_every_step_the_key_and_certificate_belong_to_one_update() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("certs");
        let mut w = Writer::open(&dir).unwrap();
        w.write(&update(1)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        w.observer = Some(Box::new(move |dir: &Path| {
            let cert = std::fs::read_to_string(dir.join("svid.pem")).unwrap();
            let key = std::fs::read_to_string(dir.join("svid_key.pem")).unwrap();
            record.lock().unwrap().push((cert, key));
        }));
        for n in 2..5 {
            w.write(&update(n)).unwrap();
        }
        let seen = seen.lock().unwrap();
        assert!(seen.len() >= 9, "{seen:?}");
        for (cert, key) in seen.iter() {
            assert_eq!(cert.strip_prefix("cert "), key.strip_prefix("key "));
        }
    }

    #[test]
    fn a_restart_removes_half_written_versions_and_regular_files_become_links() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("certs");
        let mut w = Writer::open(&dir).unwrap();
        w.write(&update(1)).unwrap();
        // kill -9 in the middle of the next update: a version and a link never switched to.
        std::fs::create_dir(dir.join("..2099_01_01_00_00_00.000000000_9")).unwrap();
        std::fs::write(dir.join("..2099_01_01_00_00_00.000000000_9/svid.pem"), "x").unwrap();
        std::os::unix::fs::symlink("..2099_01_01_00_00_00.000000000_9", dir.join(DATA_TMP))
            .unwrap();
        drop(w);
        let mut w = Writer::open(&dir).unwrap();
        assert_eq!(
            names(&dir).iter().filter(|n| n.starts_with("..")).count(),
            2
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("svid.pem")).unwrap(),
            "cert 1"
        );
        // A file spiffe-helper left, and a name no longer configured.
        std::fs::remove_file(dir.join("svid.pem")).unwrap();
        std::fs::write(dir.join("svid.pem"), "old").unwrap();
        let mut two = update(2);
        two.pop();
        w.write(&two).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("svid.pem")).unwrap(),
            "cert 2"
        );
        assert!(!dir.join("bundle.pem").exists());
    }

    #[test]
    fn a_failed_update_keeps_the_previous_version() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("certs");
        let mut w = Writer::open(&dir).unwrap();
        w.write(&update(1)).unwrap();
        // Two files of the same name: the second create fails half-way through the version.
        let mut bad = update(2);
        bad.push(spec("svid.pem", "again", 0o644));
        assert!(w.write(&bad).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.join("svid.pem")).unwrap(),
            "cert 1"
        );
        assert_eq!(
            names(&dir).iter().filter(|n| n.starts_with("..20")).count(),
            1
        );
    }
}
