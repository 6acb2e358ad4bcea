//! The Unix attestor: `unix:*` and `systemd:id` selectors from a [`PeerCred`] and `/proc/PID`.

use std::fmt;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nix::unistd::{Gid, Group, Uid, User};
use spiffed_core::{
    AttestError, Attested, Attestor, Facts, LeftOut, PeerCred, Selector, SelectorError, Selectors,
};

use crate::sha256_cache::Sha256Cache;
use crate::{procfs, sys, systemd};
use spiffed_core::LogGate;

/// The [`Attestor`] for local callers on Linux.
///
/// Every caller gets `unix:uid` and `unix:gid` from the credentials the kernel recorded at
/// `connect(2)`. The rest is gathered only when asked for (see [`Facts`]): `unix:user` and
/// `unix:group` by name lookup, and, for a caller whose pid we can see (same PID namespace),
/// `unix:supplementary_gid`/`_group`, `unix:path`, `unix:sha256` and `systemd:id` from
/// `/proc/PID`. Whatever was asked for, the connection's pidfd must show that the process that
/// connected still runs (and, after `/proc` was read, still as PID); otherwise the caller is
/// [`AttestError::ProcessGone`], so a process that inherited a connection never gets its exited
/// parent's identity.
///
/// `unix:path` and `unix:sha256` describe the file that runs, opened through `/proc/PID/exe`:
/// the digest is of that open file, and the path (which the kernel renders in the caller's mount
/// namespace, one the caller may have built itself) is issued only when it names that same file
/// (device and inode) in the agent's namespace. A fact the agent cannot vouch for, or may not
/// read (see [`exe_access_warning`]), is left out and said why in [`Attested::left_out`]; the
/// caller keeps every identity its other selectors earn.
#[derive(Default)]
pub struct UnixAttestor {
    sha256: Sha256Cache,
    /// Gates the log line for a `unix:path` that names another file than the one running.
    path_log: LogGate,
    /// Gates the log line for facts the agent may not read.
    denied_log: LogGate,
}

impl UnixAttestor {
    /// An attestor with an empty executable-hash cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of executables whose SHA-256 is cached.
    pub fn sha256_cache_len(&self) -> usize {
        self.sha256.len()
    }

    /// How many times an executable has been hashed (cache misses) by this attestor.
    pub fn hashes_computed(&self) -> u64 {
        self.sha256.computed()
    }

    /// Attests; with `may_hash` false, returns `Ok(None)` instead of hashing an executable that
    /// is not in the cache.
    fn gather(
        &self,
        peer: &PeerCred,
        facts: Facts,
        may_hash: bool,
    ) -> Result<Option<Attested>, AttestError> {
        let mut selectors = Selectors::new();
        add(&mut selectors, Selector::unix("uid", peer.uid));
        add(&mut selectors, Selector::unix("gid", peer.gid));
        if facts.contains(Facts::NAMES) {
            if let Some(name) = user_name(peer.uid) {
                add(&mut selectors, Selector::unix("user", name));
            }
            if let Some(name) = group_name(peer.gid) {
                add(&mut selectors, Selector::unix("group", name));
            }
        }
        let Some(pid) = peer.pid else {
            // Another PID namespace: its /proc/PID (if any) is some other process.
            return Ok(Some(Attested {
                selectors,
                uid: peer.uid,
                exe: None,
                facts,
                left_out: vec![],
            }));
        };
        let proc = Proc {
            pid,
            uid: peer.uid,
            pidfd: peer.pidfd.as_deref(),
            denied_log: &self.denied_log,
        };
        if !facts.need_proc() {
            // Nothing read from /proc: the credentials are the kernel's record of the process
            // that connected, which only has to be still running.
            proc.still_running()?;
            return Ok(Some(Attested {
                selectors,
                uid: peer.uid,
                exe: None,
                facts,
                left_out: vec![],
            }));
        }

        let mut left_out = vec![];
        if facts.intersects(Facts::SUPPLEMENTARY_GIDS | Facts::SUPPLEMENTARY_GROUPS)
            && let Some(text) = proc.read_or_leave_out(
                "status",
                kinds(
                    facts,
                    &[
                        (Facts::SUPPLEMENTARY_GIDS, "unix:supplementary_gid"),
                        (Facts::SUPPLEMENTARY_GROUPS, "unix:supplementary_group"),
                    ],
                ),
                &mut left_out,
            )?
        {
            let status = procfs::Status::parse(&text);
            if status.exited {
                return Err(AttestError::ProcessGone { pid });
            }
            for gid in status.groups {
                if facts.contains(Facts::SUPPLEMENTARY_GIDS) {
                    add(&mut selectors, Selector::unix("supplementary_gid", gid));
                }
                if facts.contains(Facts::SUPPLEMENTARY_GROUPS)
                    && let Some(name) = group_name(gid)
                {
                    add(&mut selectors, Selector::unix("supplementary_group", name));
                }
            }
        }

        let mut exe = None;
        if facts.intersects(Facts::PATH | Facts::SHA256)
            && let Some(file) = proc.open_exe_or_leave_out(
                kinds(
                    facts,
                    &[(Facts::PATH, "unix:path"), (Facts::SHA256, "unix:sha256")],
                ),
                &mut left_out,
            )?
        {
            // The file that runs, whatever mount namespace it was found in, and the path it was
            // started from as that namespace names it.
            let running = file.metadata().map_err(|e| proc.error("exe", e))?;
            let path = procfs::exe_path(pid).map_err(|e| proc.error("exe", e))?;
            if facts.contains(Facts::PATH) {
                match path_of_running_file(&path, &running) {
                    Ok(p) => add(&mut selectors, Selector::unix("path", p)),
                    Err(reason) => {
                        if let Some(held_back) = self.path_log.admit(Instant::now()) {
                            tracing::info!(
                                pid,
                                uid = peer.uid,
                                %reason,
                                held_back,
                                "unix:path left out: the path the caller ran does not name, for \
                                 the agent, the file it runs (held_back: similar lines not \
                                 logged since the last one)"
                            );
                        }
                        left_out.push(LeftOut {
                            kind_key: "unix:path",
                            reason,
                        });
                    }
                }
            }
            exe = Some(path);
            if facts.contains(Facts::SHA256) {
                // Hashes the open file, so the digest is of what runs, and caches it by the
                // open file's identity (fstat), never by a path.
                // `running` is the fstat taken above: the cache key needs no second one.
                let sha256 = if may_hash {
                    Some(self.sha256.sha256(file, &running))
                } else {
                    self.sha256.cached(&running).map(Ok)
                };
                let Some(sha256) = sha256 else {
                    return Ok(None);
                };
                let sha256 = sha256.map_err(|e| proc.error("exe", e))?;
                add(&mut selectors, Selector::unix("sha256", sha256));
            }
        }

        if facts.contains(Facts::SYSTEMD)
            && let Some(text) =
                proc.read_or_leave_out("cgroup", vec!["systemd:id"], &mut left_out)?
            && let Some(unit) = systemd::systemd_unit_from_cgroup(&text)
        {
            add(
                &mut selectors,
                Selector::new("systemd", &format!("id:{unit}")),
            );
        }

        // Everything above was read from /proc/PID; it describes the caller only if the process
        // that connected is still the one running as PID.
        proc.still_the_caller()?;
        Ok(Some(Attested {
            selectors,
            uid: peer.uid,
            exe,
            facts,
            left_out,
        }))
    }
}

impl fmt::Debug for UnixAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixAttestor")
            .field("sha256_cache_len", &self.sha256_cache_len())
            .finish()
    }
}

/// Credentials for a process named by pid, as `SO_PEERCRED` would give them had it connected:
/// effective uid and gid from `/proc/PID/status`, and a pidfd pinning it. For `explain`.
pub fn peer_cred_of_pid(pid: u32) -> io::Result<PeerCred> {
    let pidfd = sys::pidfd_open(pid)?;
    let status = procfs::read(pid, "status")?;
    let field = |name: &str| -> io::Result<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status has no {name} line")))
    };
    Ok(PeerCred {
        pid: Some(pid),
        uid: field("Uid:")?,
        gid: field("Gid:")?,
        pidfd: Some(Arc::new(pidfd)),
    })
}

impl Attestor for UnixAttestor {
    fn attest(&self, peer: &PeerCred, facts: Facts) -> Result<Attested, AttestError> {
        self.gather(peer, facts, true)?
            .ok_or(AttestError::ProcessGone {
                pid: peer.pid.unwrap_or_default(),
            })
    }

    fn attest_quick(&self, peer: &PeerCred, facts: Facts) -> Option<Result<Attested, AttestError>> {
        self.gather(peer, facts, false).transpose()
    }
}

/// `/proc/PID` of one caller, with the pidfd that pins the process that connected.
struct Proc<'a> {
    pid: u32,
    /// The caller's uid, for log lines.
    uid: u32,
    pidfd: Option<&'a OwnedFd>,
    /// Gates the log line for files of `/proc/PID` the agent may not read.
    denied_log: &'a LogGate,
}

impl Proc<'_> {
    /// Reads `/proc/PID/what`; `None` when the agent may not read it (see
    /// [`leave_out`](Self::leave_out)).
    fn read_or_leave_out(
        &self,
        what: &'static str,
        kinds: Vec<&'static str>,
        left_out: &mut Vec<LeftOut>,
    ) -> Result<Option<String>, AttestError> {
        match procfs::read(self.pid, what) {
            Ok(text) => Ok(Some(text)),
            Err(e) => self.leave_out(what, e, kinds, left_out).map(|()| None),
        }
    }

    /// Opens the file the process runs (`/proc/PID/exe`); `None` when the agent may not (see
    /// [`leave_out`](Self::leave_out)).
    fn open_exe_or_leave_out(
        &self,
        kinds: Vec<&'static str>,
        left_out: &mut Vec<LeftOut>,
    ) -> Result<Option<File>, AttestError> {
        match procfs::open_exe(self.pid) {
            Ok(file) => Ok(Some(file)),
            Err(e) => self.leave_out("exe", e, kinds, left_out).map(|()| None),
        }
    }

    /// A failed read of `/proc/PID/what`. A refusal (the agent lacks the privilege, see
    /// [`exe_access_warning`]) leaves out only the selector types `kinds` that need the file,
    /// so the caller keeps the identities its other selectors earn; anything else fails the
    /// attestation as [`error`](Self::error) says. Whether the process still runs is checked
    /// after every read, as for a successful one.
    fn leave_out(
        &self,
        what: &'static str,
        source: io::Error,
        kinds: Vec<&'static str>,
        left_out: &mut Vec<LeftOut>,
    ) -> Result<(), AttestError> {
        if !matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
            return Err(self.error(what, source));
        }
        let pid = self.pid;
        let agent_uid = rustix::process::geteuid().as_raw();
        let reason = if what == "exe" {
            format!(
                "the agent (uid {agent_uid}) may not read /proc/{pid}/exe ({source}); reading \
                 the executable of another uid's process needs root or CAP_SYS_PTRACE"
            )
        } else {
            format!(
                "the agent (uid {agent_uid}) may not read /proc/{pid}/{what} ({source}); with \
                 /proc mounted hidepid, run the agent as root or in /proc's gid= group"
            )
        };
        if let Some(held_back) = self.denied_log.admit(Instant::now()) {
            tracing::info!(
                pid,
                uid = self.uid,
                left_out = %kinds.join(", "),
                %reason,
                held_back,
                "selectors left out: entries that need them do not match this caller \
                 (held_back: similar lines not logged since the last one)"
            );
        }
        left_out.extend(kinds.into_iter().map(|kind_key| LeftOut {
            kind_key,
            reason: reason.clone(),
        }));
        Ok(())
    }

    /// A failed read of `/proc/PID/what`: the process is gone, or `/proc` failed us.
    ///
    /// A file that every live user process has being missing means the process is gone or going:
    /// an exiting process loses `/proc/PID/exe` when it drops its memory, before its pidfd
    /// reports the exit.
    fn error(&self, what: &'static str, source: io::Error) -> AttestError {
        let pid = self.pid;
        let vanished =
            source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH);
        let gone = vanished
            || self
                .pidfd
                .is_some_and(|fd| !sys::pidfd_is_running(fd.as_fd(), pid));
        if gone {
            AttestError::ProcessGone { pid }
        } else {
            AttestError::Proc { pid, what, source }
        }
    }

    /// Checks that the connecting process has not exited (no `/proc` facts to tie to it).
    fn still_running(&self) -> Result<(), AttestError> {
        match self.pidfd {
            Some(fd) if sys::pidfd_exited(fd.as_fd()) => {
                Err(AttestError::ProcessGone { pid: self.pid })
            }
            _ => Ok(()),
        }
    }

    /// Checks, after `/proc/PID` was read, that the connecting process still runs as PID.
    fn still_the_caller(&self) -> Result<(), AttestError> {
        let pid = self.pid;
        match self.pidfd {
            Some(fd) if sys::pidfd_is_running(fd.as_fd(), pid) => Ok(()),
            Some(_) => Err(AttestError::ProcessGone { pid }),
            None => {
                tracing::debug!(
                    pid,
                    "no pidfd for this connection; cannot prove /proc/PID is the caller"
                );
                Ok(())
            }
        }
    }
}

/// The selector types among `candidates` whose facts are in `facts`.
fn kinds(facts: Facts, candidates: &[(Facts, &'static str)]) -> Vec<&'static str> {
    candidates
        .iter()
        .filter(|(f, _)| facts.contains(*f))
        .map(|&(_, k)| k)
        .collect()
}

/// Longest rendering of a caller-chosen path in a reason (logs, `explain`).
const MAX_SHOWN_PATH: usize = 256;

/// A caller-chosen path for a log line or `explain`: control characters escaped, and cut at
/// [`MAX_SHOWN_PATH`] characters.
fn shown(path: &Path) -> String {
    let quoted = format!("{path:?}");
    if quoted.chars().count() <= MAX_SHOWN_PATH {
        return quoted;
    }
    let mut cut: String = quoted.chars().take(MAX_SHOWN_PATH).collect();
    cut.push_str("...");
    cut
}

/// The `unix:path` value for a process that runs the open file `running` and was started as
/// `path` (the target of `/proc/PID/exe`), or why there is none.
///
/// The kernel renders `path` in the caller's mount namespace, which the caller may have made
/// itself (`unshare -Urm`, then a bind mount of its own binary over a root-owned path). The
/// selector is issued only when `path`, looked up in the agent's own namespace, is the very file
/// that runs (same device and inode).
fn path_of_running_file<'p>(path: &'p Path, running: &Metadata) -> Result<&'p str, String> {
    let Some(text) = path.to_str() else {
        return Err(format!(
            "the executable's path {} is not UTF-8",
            shown(path)
        ));
    };
    let here = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(_) if text.ends_with(DELETED) => {
            return Err(format!(
                "the executable {} was deleted or replaced since the process started",
                shown(path)
            ));
        }
        Err(e) => {
            return Err(format!(
                "the executable's path {} names no file for the agent ({e}): the process runs in \
                 another mount namespace",
                shown(path)
            ));
        }
    };
    if (here.dev(), here.ino()) == (running.dev(), running.ino()) {
        Ok(text)
    } else {
        Err(format!(
            "{} is not the file the process runs (for the agent it is device {} inode {}; the \
             process runs device {} inode {}): the process runs in another mount namespace, or \
             the file was replaced since it started",
            shown(path),
            here.dev(),
            here.ino(),
            running.dev(),
            running.ino()
        ))
    }
}

/// What the kernel appends to the target of `/proc/PID/exe` once the file is unlinked.
const DELETED: &str = " (deleted)";

/// A warning for an agent that cannot gather every fact `facts` asks for, or `None`.
///
/// Reading `/proc/PID/exe` of a process with other credentials is a ptrace access check
/// (`PTRACE_MODE_READ_FSCREDS`) that only `CAP_SYS_PTRACE` passes; root has it. Without it,
/// `unix:path` and `unix:sha256` are left out for callers of other uids (and for non-dumpable
/// ones), so entries that use them match only callers of the agent's own uid.
pub fn exe_access_warning(facts: Facts) -> Option<String> {
    if !facts.intersects(Facts::PATH | Facts::SHA256) {
        return None;
    }
    let caps = match procfs::own_effective_caps() {
        Ok(caps) => caps,
        Err(error) => {
            tracing::debug!(%error, "cannot read the agent's own capabilities");
            0
        }
    };
    if caps & (1 << procfs::CAP_SYS_PTRACE) != 0 {
        return None;
    }
    let uid = rustix::process::geteuid().as_raw();
    Some(format!(
        "entries use unix:path or unix:sha256 selectors, but the agent (uid {uid}) lacks \
         CAP_SYS_PTRACE, so it cannot read /proc/PID/exe of other uids' processes: those \
         selectors are left out for such callers and entries that need them will not match \
         them; run the agent as root or grant it CAP_SYS_PTRACE (systemd: \
         AmbientCapabilities=CAP_SYS_PTRACE)"
    ))
}

/// Adds a selector, or skips one whose value the selector rules refuse (a name with a control
/// character, say): a strange fact about a caller is not a reason to refuse the caller.
fn add(selectors: &mut Selectors, selector: Result<Selector, SelectorError>) {
    match selector {
        Ok(s) => selectors.insert(s),
        Err(error) => tracing::debug!(%error, "skipping selector"),
    }
}

fn user_name(uid: u32) -> Option<String> {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(user) => user.map(|u| u.name),
        Err(error) => {
            tracing::debug!(uid, %error, "cannot look up user name");
            None
        }
    }
}

fn group_name(gid: u32) -> Option<String> {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(group) => group.map(|g| g.name),
        Err(error) => {
            tracing::debug!(gid, %error, "cannot look up group name");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::process::{Command, Stdio};
    use std::sync::Arc;

    use tokio::io::AsyncReadExt as _;
    use tokio::net::{UnixListener, UnixStream};

    use super::*;
    use crate::listen::peer_cred;

    /// Everything but the executable's hash.
    const NO_HASH: Facts = Facts::NAMES
        .union(Facts::SUPPLEMENTARY_GIDS)
        .union(Facts::SUPPLEMENTARY_GROUPS)
        .union(Facts::PATH)
        .union(Facts::SYSTEMD);

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    fn own_ids() -> (u32, u32) {
        (Uid::effective().as_raw(), Gid::effective().as_raw())
    }

    fn hex_sha256(bytes: &[u8]) -> String {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[tokio::test]
    async fn attests_our_own_connection() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        let attestor = UnixAttestor::new();
        let got = attestor.attest(&cred, NO_HASH).unwrap();

        let (uid, gid) = own_ids();
        assert_eq!(got.uid, uid);
        for s in [format!("unix:uid:{uid}"), format!("unix:gid:{gid}")] {
            assert!(got.selectors.contains(&sel(&s)), "missing {s}");
        }
        let user = User::from_uid(Uid::from_raw(uid)).unwrap().unwrap().name;
        let group = Group::from_gid(Gid::from_raw(gid)).unwrap().unwrap().name;
        assert!(got.selectors.contains(&sel(&format!("unix:user:{user}"))));
        assert!(got.selectors.contains(&sel(&format!("unix:group:{group}"))));

        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        assert_eq!(got.exe.as_deref(), Some(exe.as_path()));
        let path = format!("unix:path:{}", exe.display());
        assert!(got.selectors.contains(&sel(&path)));
        assert!(got.left_out.is_empty(), "{:?}", got.left_out);
        assert!(!got.selectors.iter().any(|s| s.kind_key() == "unix:sha256"));
        assert_eq!(attestor.hashes_computed(), 0);

        let status = procfs::Status::parse(&procfs::read(std::process::id(), "status").unwrap());
        for g in status.groups {
            let s = sel(&format!("unix:supplementary_gid:{g}"));
            assert!(got.selectors.contains(&s), "missing {s}");
        }
    }

    #[tokio::test]
    async fn hashes_the_executable_once() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        let attestor = UnixAttestor::new();
        let want = hex_sha256(&std::fs::read(std::env::current_exe().unwrap()).unwrap());
        let want = sel(&format!("unix:sha256:{want}"));

        // Hashing is the one thing that may not run on an async worker.
        assert!(attestor.attest_quick(&cred, Facts::ALL).is_none());
        assert_eq!(attestor.hashes_computed(), 0);

        let first = attestor.attest(&cred, Facts::ALL).unwrap();
        assert!(first.selectors.contains(&want));
        assert_eq!(first.facts, Facts::ALL);
        assert_eq!(attestor.hashes_computed(), 1);
        assert_eq!(attestor.sha256_cache_len(), 1);

        let second = attestor.attest(&cred, Facts::ALL).unwrap();
        assert_eq!(second.selectors, first.selectors);
        // Once cached, the quick path answers with the same selectors.
        let quick = attestor.attest_quick(&cred, Facts::ALL).unwrap().unwrap();
        assert_eq!(quick.selectors, first.selectors);
        assert_eq!(attestor.hashes_computed(), 1);
        assert_eq!(attestor.sha256_cache_len(), 1);
    }

    #[tokio::test]
    async fn gathers_only_the_facts_asked_for() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        let (uid, gid) = own_ids();
        let attestor = UnixAttestor::new();
        let kinds = |a: &Attested| {
            let mut k: Vec<String> = a.selectors.iter().map(Selector::kind_key).collect();
            k.dedup();
            k
        };

        let bare = attestor.attest_quick(&cred, Facts::NONE).unwrap().unwrap();
        let want: Selectors = [
            sel(&format!("unix:uid:{uid}")),
            sel(&format!("unix:gid:{gid}")),
        ]
        .into_iter()
        .collect();
        assert_eq!(bare.selectors, want);
        assert_eq!(bare.exe, None);

        let names = attestor.attest(&cred, Facts::NAMES).unwrap();
        assert_eq!(
            kinds(&names),
            ["unix:gid", "unix:group", "unix:uid", "unix:user"]
        );

        let path = attestor.attest_quick(&cred, Facts::PATH).unwrap().unwrap();
        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        assert_eq!(path.exe.as_deref(), Some(exe.as_path()));
        assert_eq!(kinds(&path), ["unix:gid", "unix:path", "unix:uid"]);
        assert_eq!(attestor.hashes_computed(), 0);
    }

    #[test]
    fn no_pid_gives_only_credential_selectors() {
        let (uid, gid) = own_ids();
        let cred = PeerCred {
            pid: None,
            uid,
            gid,
            pidfd: None,
        };
        let got = UnixAttestor::new().attest(&cred, Facts::ALL).unwrap();
        assert_eq!(got.exe, None);
        assert_eq!(got.uid, uid);
        let keys: Vec<String> = got.selectors.iter().map(Selector::kind_key).collect();
        for key in &keys {
            assert!(
                ["unix:uid", "unix:gid", "unix:user", "unix:group"].contains(&key.as_str()),
                "unexpected {key}"
            );
        }
        assert!(got.selectors.contains(&sel(&format!("unix:uid:{uid}"))));
        assert!(got.selectors.contains(&sel(&format!("unix:gid:{gid}"))));
    }

    #[test]
    fn unnamed_ids_get_only_numbers() {
        // Ids far above anything /etc/passwd or NSS hands out.
        let cred = PeerCred {
            pid: None,
            uid: 3_999_999_001,
            gid: 3_999_999_002,
            pidfd: None,
        };
        let got = UnixAttestor::new().attest(&cred, NO_HASH).unwrap();
        let want: Selectors = [sel("unix:uid:3999999001"), sel("unix:gid:3999999002")]
            .into_iter()
            .collect();
        assert_eq!(got.selectors, want);
    }

    #[test]
    fn a_process_that_exits_is_gone() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let (uid, gid) = own_ids();
        let cred = PeerCred {
            pid: Some(pid),
            uid,
            gid,
            pidfd: Some(Arc::new(sys::pidfd_open(pid).unwrap())),
        };
        let attestor = UnixAttestor::new();
        let alive = attestor.attest(&cred, NO_HASH).unwrap();
        let sleep = alive.exe.unwrap();
        assert!(
            sleep.ends_with("sleep") || sleep.ends_with("coreutils"),
            "{sleep:?}"
        );

        assert!(attestor.attest(&cred, Facts::NONE).is_ok());

        child.kill().unwrap();
        child.wait().unwrap();
        match attestor.attest(&cred, NO_HASH) {
            Err(AttestError::ProcessGone { pid: p }) => assert_eq!(p, pid),
            other => panic!("expected ProcessGone, got {other:?}"),
        }
        // Credentials alone are not enough once the process that connected is gone.
        match attestor.attest(&cred, Facts::NONE) {
            Err(AttestError::ProcessGone { pid: p }) => assert_eq!(p, pid),
            other => panic!("expected ProcessGone, got {other:?}"),
        }
    }

    #[test]
    fn a_zombie_is_gone() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let (uid, gid) = own_ids();
        let cred = PeerCred {
            pid: Some(pid),
            uid,
            gid,
            pidfd: Some(Arc::new(sys::pidfd_open(pid).unwrap())),
        };
        let attestor = UnixAttestor::new();
        attestor.attest(&cred, NO_HASH).unwrap();
        child.kill().unwrap();
        // Not reaped: /proc/PID stays, and fdinfo keeps naming it, until we wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match attestor.attest(&cred, NO_HASH) {
                Err(AttestError::ProcessGone { pid: p }) => {
                    assert_eq!(p, pid);
                    break;
                }
                Ok(_) => {
                    assert!(std::time::Instant::now() < deadline, "kill did not land");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(other) => panic!("expected ProcessGone, got {other:?}"),
            }
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
    }

    /// The pid was reused: `/proc/PID` reads fine (here it is our own), but the pidfd pins a
    /// different process. Only the check after the reads can catch this.
    #[test]
    fn a_reused_pid_is_gone() {
        let me = std::process::id();
        let (uid, gid) = own_ids();
        let attestor = UnixAttestor::new();

        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        let live_other = Arc::new(sys::pidfd_open(other.id()).unwrap());
        let cred = PeerCred {
            pid: Some(me),
            uid,
            gid,
            pidfd: Some(Arc::clone(&live_other)),
        };
        assert!(matches!(
            attestor.attest(&cred, NO_HASH),
            Err(AttestError::ProcessGone { pid }) if pid == me
        ));

        other.kill().unwrap();
        other.wait().unwrap();
        let cred = PeerCred {
            pidfd: Some(live_other),
            ..cred
        };
        assert!(matches!(
            attestor.attest(&cred, NO_HASH),
            Err(AttestError::ProcessGone { pid }) if pid == me
        ));
    }

    #[test]
    fn a_path_is_issued_only_for_the_file_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let running = std::fs::metadata(&a).unwrap();
        assert_eq!(path_of_running_file(&a, &running), Ok(a.to_str().unwrap()));

        let other = path_of_running_file(&b, &running).unwrap_err();
        assert!(
            other.contains("is not the file the process runs"),
            "{other}"
        );
        let missing = path_of_running_file(&dir.path().join("c"), &running).unwrap_err();
        assert!(missing.contains("names no file for the agent"), "{missing}");
        let deleted = format!("{} (deleted)", a.display());
        let deleted = path_of_running_file(Path::new(&deleted), &running).unwrap_err();
        assert!(deleted.contains("was deleted or replaced"), "{deleted}");

        // A caller chooses the path: what a reason shows of it is escaped and bounded.
        let long = format!("/{}\n", "x".repeat(5000));
        let reason = path_of_running_file(Path::new(&long), &running).unwrap_err();
        assert!(reason.len() < 600, "{}", reason.len());
        assert!(!reason.contains('\n'));
    }

    /// Issue 10 item 1: a process started from a path it bind-mounted its own binary over, in a
    /// mount namespace of its own, does not get that path as `unix:path`; its `unix:sha256` is
    /// the digest of what it runs. Needs root (for `unshare -m`), as CI has.
    #[test]
    fn a_path_from_another_mount_namespace_is_left_out() {
        assert_eq!(
            own_ids().0,
            0,
            "this test uses unshare -m and must run as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        let other = dir.path().join("other");
        // The path that entries would name: not even an executable, for the agent.
        std::fs::write(&real, b"not a program").unwrap();
        std::fs::copy("/bin/sleep", &other).unwrap();
        let script = format!(
            "mount --bind {} {} && exec {} 30",
            other.display(),
            real.display(),
            real.display()
        );
        let mut child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while procfs::exe_path(pid).ok().as_deref() != Some(real.as_path()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the exec did not happen"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (uid, gid) = own_ids();
        let cred = PeerCred {
            pid: Some(pid),
            uid,
            gid,
            pidfd: Some(Arc::new(sys::pidfd_open(pid).unwrap())),
        };
        let got = UnixAttestor::new().attest(&cred, Facts::ALL).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();

        assert_eq!(got.exe.as_deref(), Some(real.as_path()));
        assert!(
            !got.selectors.iter().any(|s| s.kind_key() == "unix:path"),
            "{:?}",
            got.selectors
        );
        let want = hex_sha256(&std::fs::read(&other).unwrap());
        assert!(got.selectors.contains(&sel(&format!("unix:sha256:{want}"))));
        assert_eq!(got.left_out.len(), 1, "{:?}", got.left_out);
        assert_eq!(got.left_out[0].kind_key, "unix:path");
        assert!(
            got.left_out[0]
                .reason
                .contains("is not the file the process runs"),
            "{}",
            got.left_out[0]
        );
    }

    #[test]
    fn root_is_not_warned_about_exe_selectors() {
        assert_eq!(exe_access_warning(Facts::NAMES | Facts::SYSTEMD), None);
        if own_ids().0 == 0 {
            assert_eq!(exe_access_warning(Facts::PATH | Facts::SHA256), None);
        }
    }

    /// CONFORMANCE item 96: P connects and forks C, which inherits the socket; P exits. Requests
    /// on the connection now come from C and must not get P's identity.
    #[tokio::test]
    async fn an_inherited_connection_does_not_get_the_exited_parents_identity() {
        const SCRIPT: &str = "
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
if os.fork() == 0:
    s.sendall(b'%d\\n' % os.getpid())
    s.recv(1)
    os._exit(0)
sys.stdin.read()
os._exit(0)
";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut parent = Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .arg(&path)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let (mut conn, _) = listener.accept().await.unwrap();
        let cred = peer_cred(&conn).unwrap();
        assert_eq!(cred.pid, Some(parent.id()), "the parent connected");
        assert!(cred.pidfd.is_some());

        let attestor = UnixAttestor::new();
        let while_alive = attestor.attest(&cred, NO_HASH).unwrap();
        let exe = while_alive.exe.unwrap();
        assert!(
            exe.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("python"),
            "{exe:?}"
        );

        // The child holds the connection; learn its pid from it.
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            let mut byte = [0u8; 1];
            assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "child hung up");
            line.push(byte[0]);
        }
        let child_pid: u32 = std::str::from_utf8(&line).unwrap().trim().parse().unwrap();
        assert_ne!(child_pid, parent.id());

        // Let the parent exit; it stays a zombie until we reap it.
        drop(parent.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match attestor.attest(&cred, NO_HASH) {
                Err(AttestError::ProcessGone { pid }) => {
                    assert_eq!(pid, parent.id());
                    break;
                }
                Ok(_) => {
                    assert!(std::time::Instant::now() < deadline, "parent did not exit");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(other) => panic!("expected ProcessGone, got {other:?}"),
            }
        }
        assert!(parent.wait().unwrap().success());
        assert!(matches!(
            attestor.attest(&cred, NO_HASH),
            Err(AttestError::ProcessGone { .. })
        ));

        // The connection is still open, held by the child, which is still running.
        assert!(std::path::Path::new(&format!("/proc/{child_pid}")).exists());
        let mut std_conn = conn.into_std().unwrap();
        std_conn.set_nonblocking(false).unwrap();
        std_conn.write_all(b"x").unwrap();
        let mut rest = Vec::new();
        std_conn.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
