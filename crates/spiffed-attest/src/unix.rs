//! The Unix attestor: `unix:*` and `systemd:id` selectors from a [`PeerCred`] and `/proc/PID`.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::unistd::{Gid, Group, Uid, User};
use spiffed_core::{
    AttestError, Attested, Attestor, Facts, PeerCred, Selector, SelectorError, Selectors,
};

use crate::sha256_cache::Sha256Cache;
use crate::{procfs, sys, systemd};

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
#[derive(Default)]
pub struct UnixAttestor {
    sha256: Sha256Cache,
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
            }));
        };
        let proc = Proc {
            pid,
            pidfd: peer.pidfd.as_deref(),
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
            }));
        }

        if facts.contains(Facts::SUPPLEMENTARY_GIDS) || facts.contains(Facts::SUPPLEMENTARY_GROUPS)
        {
            let status = procfs::Status::parse(&proc.read("status")?);
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
        if facts.contains(Facts::PATH) || facts.contains(Facts::SHA256) {
            let path = procfs::exe_path(pid).map_err(|e| proc.error("exe", e))?;
            if facts.contains(Facts::PATH) {
                match path.to_str() {
                    Some(p) => add(&mut selectors, Selector::unix("path", p)),
                    None => {
                        tracing::debug!(pid, exe = %path.display(), "executable path is not UTF-8");
                    }
                }
            }
            exe = Some(path);
        }

        if facts.contains(Facts::SHA256) {
            let file = procfs::open_exe(pid).map_err(|e| proc.error("exe", e))?;
            let sha256 = if may_hash {
                Some(self.sha256.sha256(file))
            } else {
                self.sha256.cached(&file).transpose()
            };
            let Some(sha256) = sha256 else {
                return Ok(None);
            };
            let sha256 = sha256.map_err(|e| proc.error("exe", e))?;
            add(&mut selectors, Selector::unix("sha256", sha256));
        }

        if facts.contains(Facts::SYSTEMD)
            && let Some(unit) = systemd::systemd_unit_from_cgroup(&proc.read("cgroup")?)
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
    pidfd: Option<&'a OwnedFd>,
}

impl Proc<'_> {
    fn read(&self, what: &'static str) -> Result<String, AttestError> {
        procfs::read(self.pid, what).map_err(|e| self.error(what, e))
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
