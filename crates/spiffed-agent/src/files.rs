//! The agent's own directories and files: created with exact modes, refused when another user
//! could change them, and `data_dir` locked against a second agent.
//!
//! Rules (issue 10, items 5, 8, 9, 11, 12):
//! - A directory the agent creates gets its mode set explicitly (the umask does not apply);
//!   missing ancestors get 0755. A directory that already exists is never chmodded.
//! - A directory that already exists must be a real directory (not a symbolic link), owned by
//!   the agent's uid, and not writable by group or others (so no shared directory like /tmp):
//!   otherwise another user could swap the sockets or the CA inside it.
//! - `ca.json`, `entries.sqlite` and its `-wal`/`-shm` files, when present, must be regular files
//!   (not links), owned by the agent's uid, not writable by group or others.
//! - `data_dir/agent.lock` is `flock`ed for the life of the agent and holds its pid.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

/// The lock file in `data_dir`.
pub(crate) const LOCK_FILE: &str = "agent.lock";
/// The pid in the lock file is padded with spaces to this width (a pid has at most 10 digits).
const PID_WIDTH: usize = 10;
/// The CA file in `data_dir`.
pub(crate) const CA_FILE: &str = "ca.json";
/// The entry store in `data_dir`.
pub(crate) const STORE_FILE: &str = "entries.sqlite";

/// Why a directory or file of the agent is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesError {
    /// The path is a symbolic link, which the agent does not follow here.
    #[error(
        "{what} {} is a symbolic link; the agent does not follow links for its own files and \
         directories (whoever controls the link controls what the agent uses); fix: name the \
         real path in the configuration instead",
        .path.display()
    )]
    Symlink {
        /// What the path is for, e.g. "data_dir".
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The path exists but is not of the expected kind.
    #[error(
        "{what} {} is not a {kind}; fix: remove it or choose another path",
        .path.display()
    )]
    WrongKind {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// "directory" or "regular file".
        kind: &'static str,
    },
    /// Owned by another user, who could replace its contents.
    #[error(
        "{what} {} is owned by uid {owner}, not by the agent's uid {uid}: its owner could \
         replace what the agent reads or serves there; fix: if its content is yours, \
         `chown {uid} {}`, else choose a path the agent's user owns",
        .path.display(),
        .path.display()
    )]
    ForeignOwner {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The agent's uid.
        uid: u32,
    },
    /// Writable by group or others (a shared directory such as /tmp, or a loose mode).
    #[error(
        "{what} {} has mode {mode:04o}: group or other users can write to it and could replace \
         what the agent keeps there; fix: {fix}",
        .path.display()
    )]
    Writable {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Its permission bits (with sticky/setgid bits).
        mode: u32,
        /// How to fix it.
        fix: String,
    },
    /// Another agent holds the data directory's lock.
    #[error(
        "data_dir {} is in use by another spiffed agent{}; stop it first, or give this agent its \
         own data_dir",
        .dir.display(),
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// The pid written in the lock file by the holder, when readable.
        pid: Option<u32>,
    },
    /// The entry store is missing or empty next to an existing CA.
    #[error(
        "entry store {} is {state}, but the CA {} exists: the entries created through the admin \
         socket would be lost; restore {} from a backup, or, to continue deliberately with no \
         stored entries, start once with --new-entry-store",
        .store.display(),
        .ca.display(),
        .store.display()
    )]
    StoreLost {
        /// The store file.
        store: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// "missing" or "empty (zero bytes)".
        state: &'static str,
    },
    /// The data dir holds the other mode's state (a standalone CA in agent mode, or agent
    /// state in standalone mode): one data dir per mode, so neither is lost by mistake.
    #[error(
        "{} belongs to {other} mode, but the agent is configured for {this} mode; give this \
         mode its own data_dir (the files of {other} mode are kept), or move {} away if that \
         mode is no longer used",
        .file.display(),
        .file.display()
    )]
    OtherMode {
        /// The file of the other mode.
        file: PathBuf,
        /// The configured mode.
        this: &'static str,
        /// The mode the file belongs to.
        other: &'static str,
    },
    /// A filesystem operation failed.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FilesError + 'a {
    move |source| FilesError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Checks owner and mode of something that exists: owned by us, not writable by group/others.
fn check_owner_and_mode(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), FilesError> {
    let (uid, owner, mode) = (own_uid(), meta.uid(), meta.mode());
    if owner != uid {
        return Err(FilesError::ForeignOwner {
            what,
            path: path.to_owned(),
            owner,
            uid,
        });
    }
    if mode & 0o022 != 0 {
        // Sticky or world-writable: a directory meant for everyone, such as /tmp.
        let fix = if meta.is_dir() && mode & 0o1002 != 0 {
            format!(
                "{} is a shared directory; give the agent a directory of its own instead (it \
                 creates a missing one with the right mode), e.g. {}",
                path.display(),
                path.join("spiffed").display()
            )
        } else {
            format!("`chmod go-w {}`", path.display())
        };
        return Err(FilesError::Writable {
            what,
            path: path.to_owned(),
            mode: mode & 0o7777,
            fix,
        });
    }
    Ok(())
}

/// Checks a directory that exists: not a link, a directory, ours, not group/other-writable.
fn check_existing_dir(what: &'static str, path: &Path) -> Result<(), FilesError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if meta.file_type().is_symlink() {
        return Err(FilesError::Symlink {
            what,
            path: path.to_owned(),
        });
    }
    if !meta.is_dir() {
        return Err(FilesError::WrongKind {
            what,
            path: path.to_owned(),
            kind: "directory",
        });
    }
    check_owner_and_mode(what, path, &meta)
}

/// Creates one directory with exactly `mode` (the umask does not apply). Returns false when
/// it already existed (it is then left as it is).
fn make_dir(path: &Path, mode: u32) -> Result<bool, FilesError> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_err("create directory", path)(e)),
    }
    // Set the mode on what we created, through a descriptor that does not follow links.
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open directory", path)(e.into()))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
        .map_err(|e| io_err("chmod", path)(e.into()))?;
    Ok(true)
}

/// Makes sure directory `path` exists and is safe to use: creates it (and missing ancestors,
/// with 0755) with exactly `mode`, or checks the existing one (see the module doc) without
/// changing it. Returns whether the agent created it.
pub(crate) fn prepare_dir(what: &'static str, path: &Path, mode: u32) -> Result<bool, FilesError> {
    let mut missing = Vec::new();
    let mut cur = Some(path);
    while let Some(p) = cur {
        if p.as_os_str().is_empty() || std::fs::symlink_metadata(p).is_ok() {
            break;
        }
        missing.push(p);
        cur = p.parent();
    }
    let mut created = false;
    for p in missing.into_iter().rev() {
        let m = if p == path { mode } else { 0o755 };
        created = make_dir(p, m)?;
    }
    if !created {
        check_existing_dir(what, path)?;
    }
    Ok(created)
}

/// Checks a file of `data_dir` if it exists: a regular file (not a link), ours, not writable by
/// group or others. Returns its length, or `None` when it does not exist.
pub(crate) fn check_data_file(path: &Path) -> Result<Option<u64>, FilesError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("inspect", path)(e)),
    };
    if meta.file_type().is_symlink() {
        return Err(FilesError::Symlink {
            what: "file",
            path: path.to_owned(),
        });
    }
    if !meta.is_file() {
        return Err(FilesError::WrongKind {
            what: "file",
            path: path.to_owned(),
            kind: "regular file",
        });
    }
    check_owner_and_mode("file", path, &meta)?;
    Ok(Some(meta.len()))
}

/// Takes the data directory's lock (`agent.lock`, flock) and writes our pid into it. The lock
/// lasts as long as the returned file is open.
pub(crate) fn lock_data_dir(dir: &Path) -> Result<File, FilesError> {
    let path = dir.join(LOCK_FILE);
    let fd = rustix::fs::open(
        &path,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| {
        if e == rustix::io::Errno::LOOP {
            FilesError::Symlink {
                what: "lock file",
                path: path.clone(),
            }
        } else {
            io_err("open", &path)(e.into())
        }
    })?;
    let mut file = File::from(fd);
    let meta = file.metadata().map_err(io_err("inspect", &path))?;
    if !meta.is_file() {
        return Err(FilesError::WrongKind {
            what: "lock file",
            path,
            kind: "regular file",
        });
    }
    check_owner_and_mode("lock file", &path, &meta)?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(FilesError::Locked {
                dir: dir.to_owned(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(e) => return Err(io_err("lock", &path)(e.into())),
    }
    // The pid, padded to a fixed width and written over the old one in place: a restart
    // rewrites the same bytes and does not truncate. (An ftruncate stalled a restart for most
    // of a second on a busy filesystem, and the agent serves nothing before it has the lock.)
    let line = format!("{:<width$}\n", std::process::id(), width = PID_WIDTH);
    file.write_all_at(line.as_bytes(), 0)
        .map_err(io_err("write", &path))?;
    if meta.len() > line.len() as u64 {
        file.set_len(line.len() as u64)
            .map_err(io_err("write", &path))?;
    }
    Ok(file)
}

/// Checks `ca.json` and the entry store's files (see [`check_data_file`]), and refuses an entry
/// store that is missing or empty while the CA exists: the store has been created with the CA
/// since the first version of spiffed, so this is damage, not an old data dir. With
/// `new_entry_store` the agent goes on (with a warning) and creates an empty store.
/// The agent-mode state files in `data_dir` (written by `spiffed-spire`).
pub(crate) const AGENT_MODE_FILES: [&str; 2] = ["agent-state.json", "workload-cache.json"];

/// Refuses a data dir that holds the other mode's files: in agent mode, a standalone CA or
/// entry store; standalone, agent-mode state.
pub(crate) fn check_mode_files(data_dir: &Path, agent_mode: bool) -> Result<(), FilesError> {
    let (this, other, files): (_, _, &[&str]) = if agent_mode {
        ("agent", "standalone", &[CA_FILE, STORE_FILE])
    } else {
        ("standalone", "agent", &AGENT_MODE_FILES)
    };
    for name in files {
        let file = data_dir.join(name);
        if check_data_file(&file)?.is_some() {
            return Err(FilesError::OtherMode { file, this, other });
        }
    }
    Ok(())
}

pub(crate) fn check_data_files(data_dir: &Path, new_entry_store: bool) -> Result<(), FilesError> {
    let ca = data_dir.join(CA_FILE);
    let store = data_dir.join(STORE_FILE);
    let ca_len = check_data_file(&ca)?;
    let mut store_len = check_data_file(&store)?;
    for suffix in ["-wal", "-shm"] {
        let mut name = store.clone().into_os_string();
        name.push(suffix);
        check_data_file(Path::new(&name))?;
    }
    if ca_len.is_none() {
        return Ok(());
    }
    let state = match store_len.take() {
        None => "missing",
        Some(0) => "empty (zero bytes)",
        Some(_) => return Ok(()),
    };
    if new_entry_store {
        tracing::warn!(
            store = %store.display(),
            "entry store is {state}; starting with no stored entries as --new-entry-store asks"
        );
        return Ok(());
    }
    Err(FilesError::StoreLost { store, ca, state })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn created_directories_get_the_exact_mode_and_existing_ones_keep_theirs() {
        let tmp = tempfile::tempdir().unwrap();
        // 0775 would be 0755 under the usual umask 022 if the umask applied.
        let dir = tmp.path().join("a").join("b");
        assert!(prepare_dir("socket directory", &dir, 0o775).unwrap());
        assert_eq!((mode(&dir), mode(&tmp.path().join("a"))), (0o775, 0o755));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(!prepare_dir("socket directory", &dir, 0o700).unwrap());
        assert_eq!(mode(&dir), 0o750);
    }

    #[test]
    fn shared_and_symlinked_directories_are_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = prepare_dir("admin socket directory", &shared, 0o700).unwrap_err();
        assert!(
            matches!(e, FilesError::Writable { mode: 0o1777, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("shared directory"), "{e}");
        assert_eq!(mode(&shared), 0o1777);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        let e = prepare_dir("data_dir", &link, 0o700).unwrap_err();
        assert!(matches!(e, FilesError::Symlink { .. }), "{e}");
    }

    #[test]
    fn data_files_must_be_ours_regular_and_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join(CA_FILE);
        assert_eq!(check_data_file(&f).unwrap(), None);
        std::fs::write(&f, b"{}").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(check_data_file(&f).unwrap(), Some(2));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o660)).unwrap();
        let e = check_data_file(&f).unwrap_err();
        assert!(e.to_string().contains("chmod go-w"), "{e}");
        let link = tmp.path().join("link.json");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(matches!(
            check_data_file(&link),
            Err(FilesError::Symlink { .. })
        ));
    }

    #[test]
    fn a_lost_store_next_to_a_ca_is_refused_unless_asked_for() {
        let tmp = tempfile::tempdir().unwrap();
        // A fresh data dir is fine.
        check_data_files(tmp.path(), false).unwrap();
        std::fs::write(tmp.path().join(CA_FILE), b"{}").unwrap();
        let e = check_data_files(tmp.path(), false).unwrap_err();
        assert!(
            matches!(
                e,
                FilesError::StoreLost {
                    state: "missing",
                    ..
                }
            ),
            "{e}"
        );
        std::fs::write(tmp.path().join(STORE_FILE), b"").unwrap();
        let e = check_data_files(tmp.path(), false).unwrap_err();
        assert!(e.to_string().contains("--new-entry-store"), "{e}");
        check_data_files(tmp.path(), true).unwrap();
        std::fs::write(tmp.path().join(STORE_FILE), b"SQLite format 3\0").unwrap();
        check_data_files(tmp.path(), false).unwrap();
    }

    #[test]
    fn the_lock_is_exclusive_and_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let held = lock_data_dir(tmp.path()).unwrap();
        match lock_data_dir(tmp.path()) {
            Err(FilesError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(held);
        lock_data_dir(tmp.path()).unwrap();
    }

    #[test]
    fn the_lock_file_is_rewritten_in_place_with_this_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(LOCK_FILE);
        // A longer leftover (another tool's text, or garbage) is cut to the pid line.
        std::fs::write(&path, "4294967295 and more text left by someone\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let held = lock_data_dir(tmp.path()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.trim().parse::<u32>().ok(),
            Some(std::process::id()),
            "{text:?}"
        );
        assert_eq!(text.len(), PID_WIDTH + 1);
        drop(held);
        // A restart writes the same bytes over them: same length, same pid.
        let inode = std::fs::metadata(&path).unwrap().ino();
        let _held = lock_data_dir(tmp.path()).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.ino(), meta.len()), (inode, (PID_WIDTH + 1) as u64));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
