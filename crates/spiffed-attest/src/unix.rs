//! The unix attestor plugin: `unix:*` selectors from a [`PeerCred`] and `/proc/PID`.

use std::fmt;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nix::unistd::{Gid, Group, Uid, User};
use spiffed_core::{
    AttestError, AttestorPlugin, LeftOut, LogGate, Needs, PeerCred, PluginAttested, Selector,
    SelectorError, known_list,
};

use crate::pinned::{Pinned, push_left_out};
use crate::sha256_cache::Sha256Cache;
use crate::{keys_sentence, procfs, sys};

/// The selector type the unix plugin owns.
const TYPE: &str = "unix";
/// Its keys, in the order error messages list them.
const KEYS: &[&str] = &[
    "uid",
    "user",
    "gid",
    "group",
    "supplementary_gid",
    "supplementary_group",
    "path",
    "sha256",
];

/// Which unix facts beyond the kernel's credentials to gather, from the `unix:*` kinds a
/// [`Needs`] asks for. Facts, not kinds: `unix:user` and `unix:group` cost the same lookups and
/// are gathered together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Facts(u8);

impl Facts {
    /// Only `unix:uid` and `unix:gid`.
    const NONE: Self = Self(0);
    /// `unix:user` and `unix:group` (name-service lookups of the uid and gid).
    const NAMES: Self = Self(1);
    /// `unix:supplementary_gid` (`/proc/PID/status`).
    const SUPPLEMENTARY_GIDS: Self = Self(1 << 1);
    /// `unix:supplementary_group` (`/proc/PID/status` and a lookup per group).
    const SUPPLEMENTARY_GROUPS: Self = Self(1 << 2);
    /// `unix:path` (`/proc/PID/exe`); also what dev mode's synthetic IDs are named after.
    const PATH: Self = Self(1 << 3);
    /// `unix:sha256` (the executable's content, hashed once per file version).
    const SHA256: Self = Self(1 << 4);
    /// Everything the plugin knows how to find out (for `explain`).
    const ALL: Self = Self((1 << 5) - 1);

    /// The facts `needs` asks of this plugin.
    fn from_needs(needs: &Needs) -> Self {
        if needs.is_everything() {
            return Self::ALL;
        }
        needs
            .kind_keys()
            .fold(Self::NONE, |f, k| f.union(Self::for_kind_key(k)))
    }

    /// The facts a selector of `kind_key` (`unix:path`) is matched against; [`Facts::NONE`] for
    /// the credential selectors and for other types.
    fn for_kind_key(kind_key: &str) -> Self {
        match kind_key {
            "unix:user" | "unix:group" => Self::NAMES,
            "unix:supplementary_gid" => Self::SUPPLEMENTARY_GIDS,
            "unix:supplementary_group" => Self::SUPPLEMENTARY_GROUPS,
            "unix:path" => Self::PATH,
            "unix:sha256" => Self::SHA256,
            _ => Self::NONE,
        }
    }

    const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether every fact in `other` is also in `self`.
    fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether attestation must read `/proc/PID` for these facts.
    fn need_proc(self) -> bool {
        self.0 & !Self::NAMES.0 != 0
    }

    /// The selector kinds among `candidates` whose facts are in `self`.
    fn kinds(self, candidates: &[(Self, &'static str)]) -> Vec<&'static str> {
        candidates
            .iter()
            .filter(|(f, _)| self.contains(*f))
            .map(|&(_, k)| k)
            .collect()
    }
}

/// The [`AttestorPlugin`] for `unix:*` selectors of local callers on Linux.
///
/// Every caller gets `unix:uid` and `unix:gid` from the credentials the kernel recorded at
/// `connect(2)`. The rest is gathered only when the [`Needs`] ask for it: `unix:user` and
/// `unix:group` by name lookup, and, for a caller whose pid we can see (same PID namespace),
/// `unix:supplementary_gid`/`_group`, `unix:path` and `unix:sha256` from `/proc/PID`. Whatever
/// was asked for, the connection's pidfd must show that the process that connected still runs
/// (and, after `/proc` was read, still as PID); otherwise the caller is
/// [`AttestError::ProcessGone`], so a process that inherited a connection never gets its exited
/// parent's identity.
///
/// `unix:path` and `unix:sha256` describe the file that runs, opened through `/proc/PID/exe`:
/// the digest is of that open file, and the path (which the kernel renders in the caller's mount
/// namespace, one the caller may have built itself) is issued only when it names that same file
/// (device and inode) in the agent's namespace. A fact the agent cannot vouch for, may not read
/// (see [`exe_access_warning`]) or fails to read is left out and said why in
/// [`PluginAttested::left_out`]; the caller keeps `unix:uid`, `unix:gid` and every other fact.
///
/// Hashing an executable the cache does not know reads the whole file: `attest` does that on
/// tokio's blocking pool and everything else (quick `/proc` reads and cache hits) inline.
#[derive(Default)]
pub struct UnixPlugin {
    sha256: Arc<Sha256Cache>,
    /// Gates the log line for a `unix:path` that names another file than the one running.
    path_log: LogGate,
    /// Gates the log line for facts the agent may not (or could not) read.
    denied_log: LogGate,
}

/// What the quick part of an attestation found, and the executable to hash if the cache does
/// not know it.
struct Gathered {
    attested: PluginAttested,
    hash: Option<(File, Metadata)>,
}

impl UnixPlugin {
    /// A plugin with an empty executable-hash cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of executables whose SHA-256 is cached.
    pub fn sha256_cache_len(&self) -> usize {
        self.sha256.len()
    }

    /// How many times an executable has been hashed (cache misses) by this plugin.
    pub fn hashes_computed(&self) -> u64 {
        self.sha256.computed()
    }

    /// Everything but hashing an executable the cache does not know: that is handed back.
    fn gather(&self, peer: &PeerCred, facts: Facts) -> Result<Gathered, AttestError> {
        let mut selectors = vec![];
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
        let done = |selectors| Gathered {
            attested: PluginAttested {
                selectors,
                exe: None,
                left_out: vec![],
            },
            hash: None,
        };
        let Some(pid) = peer.pid else {
            // Another PID namespace: its /proc/PID (if any) is some other process.
            return Ok(done(selectors));
        };
        let proc = Pinned {
            pid,
            uid: peer.uid,
            pidfd: peer.pidfd.as_deref(),
            denied_log: &self.denied_log,
        };
        if !facts.need_proc() {
            // Nothing read from /proc: the credentials are the kernel's record of the process
            // that connected, which only has to be still running.
            proc.still_running()?;
            return Ok(done(selectors));
        }

        let mut left_out = vec![];
        let supplementary = facts.kinds(&[
            (Facts::SUPPLEMENTARY_GIDS, "unix:supplementary_gid"),
            (Facts::SUPPLEMENTARY_GROUPS, "unix:supplementary_group"),
        ]);
        if !supplementary.is_empty() {
            let read = proc.read_or_leave_out("status", &supplementary, &mut left_out);
            if let Some(text) = or_leave_out(&proc, read, &supplementary, &mut left_out)? {
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
        }

        let mut exe = None;
        let mut hash = None;
        let exe_kinds = facts.kinds(&[(Facts::PATH, "unix:path"), (Facts::SHA256, "unix:sha256")]);
        if !exe_kinds.is_empty() {
            let opened = running_exe(&proc, &exe_kinds, &mut left_out);
            if let Some((file, running, path)) =
                or_leave_out(&proc, opened, &exe_kinds, &mut left_out)?
            {
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
                                    "unix:path left out: the path the caller ran does not name, \
                                     for the agent, the file it runs (held_back: similar lines \
                                     not logged since the last one)"
                                );
                            }
                            left_out.push(LeftOut {
                                kind_key: "unix:path".to_owned(),
                                reason,
                            });
                        }
                    }
                }
                exe = Some(path);
                if facts.contains(Facts::SHA256) {
                    // The digest of the open file, so of what runs, cached by the open file's
                    // identity (the fstat taken above), never by a path.
                    match self.sha256.cached(&running) {
                        Some(hex) => add(&mut selectors, Selector::unix("sha256", hex)),
                        None => hash = Some((file, running)),
                    }
                }
            }
        }

        // Everything above was read from /proc/PID; it describes the caller only if the process
        // that connected is still the one running as PID. (The executable to hash is an open
        // file: what it holds no longer depends on the process.)
        proc.still_the_caller()?;
        Ok(Gathered {
            attested: PluginAttested {
                selectors,
                exe,
                left_out,
            },
            hash,
        })
    }

    /// The SHA-256 of an open executable, on the blocking pool (inline outside a tokio runtime).
    async fn hash(&self, file: File, meta: Metadata) -> io::Result<String> {
        let cache = Arc::clone(&self.sha256);
        let work = move || cache.sha256(file, &meta);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt
                .spawn_blocking(work)
                .await
                .map_err(|e| io::Error::other(format!("the hashing task failed: {e}")))?,
            Err(_) => work(),
        }
    }
}

impl fmt::Debug for UnixPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixPlugin")
            .field("sha256_cache_len", &self.sha256_cache_len())
            .finish()
    }
}

#[async_trait::async_trait]
impl AttestorPlugin for UnixPlugin {
    fn name(&self) -> &'static str {
        TYPE
    }

    fn selector_types(&self) -> &'static [&'static str] {
        &[TYPE]
    }

    fn check(&self, selector: &Selector) -> Result<(), SelectorError> {
        check(selector)
    }

    async fn attest(&self, peer: &PeerCred, needs: &Needs) -> Result<PluginAttested, AttestError> {
        let Gathered { mut attested, hash } = self.gather(peer, Facts::from_needs(needs))?;
        if let Some((file, meta)) = hash {
            match self.hash(file, meta).await {
                Ok(hex) => add(&mut attested.selectors, Selector::unix("sha256", hex)),
                Err(error) => {
                    let pid = peer.pid.unwrap_or_default();
                    let reason =
                        format!("cannot read the executable of pid {pid} to hash it: {error}");
                    if let Some(held_back) = self.denied_log.admit(Instant::now()) {
                        tracing::info!(
                            pid,
                            uid = peer.uid,
                            %reason,
                            held_back,
                            "unix:sha256 left out: entries that need it do not match this \
                             caller (held_back: similar lines not logged since the last one)"
                        );
                    }
                    push_left_out(&mut attested.left_out, &["unix:sha256"], &reason);
                }
            }
        }
        Ok(attested)
    }
}

/// Checks a `unix:*` selector: a known key, and a value that fits it (a uid or gid in decimal
/// without leading zeros, an absolute path, a SHA-256 in lowercase hex).
fn check(selector: &Selector) -> Result<(), SelectorError> {
    if selector.kind() != TYPE {
        return Err(SelectorError::UnknownType {
            selector: selector.to_string(),
            known: known_list([TYPE]),
        });
    }
    let v = selector.key_value();
    let bad = |why| {
        Err(SelectorError::Value {
            selector: selector.to_string(),
            why,
        })
    };
    match selector.key() {
        "uid" | "gid" | "supplementary_gid" => {
            if v.parse::<u32>().is_err() || (v.len() > 1 && v.starts_with('0')) {
                return bad("the value must be a decimal number, e.g. 1000");
            }
        }
        "user" | "group" | "supplementary_group" => {}
        "path" => {
            if !v.starts_with('/') {
                return bad("the path must be absolute, e.g. /usr/bin/web");
            }
        }
        "sha256" => {
            if v.len() != 64 || !v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return bad("the value must be 64 lowercase hex digits");
            }
        }
        _ => {
            return Err(SelectorError::UnknownKey {
                selector: selector.to_string(),
                known: keys_sentence(TYPE, KEYS),
            });
        }
    }
    Ok(())
}

/// Opens the file the caller runs and reads its fstat and the path it was started as; `None`
/// when the agent may not (left out with the reason).
fn running_exe(
    proc: &Pinned<'_>,
    kinds: &[&str],
    left_out: &mut Vec<LeftOut>,
) -> Result<Option<(File, Metadata, std::path::PathBuf)>, AttestError> {
    let Some(file) = proc.open_exe_or_leave_out(kinds, left_out)? else {
        return Ok(None);
    };
    // The file that runs, whatever mount namespace it was found in, and the path it was
    // started from as that namespace names it.
    let running = file.metadata().map_err(|e| proc.error("exe", e))?;
    let path = procfs::exe_path(proc.pid).map_err(|e| proc.error("exe", e))?;
    Ok(Some((file, running, path)))
}

/// A read of `/proc/PID` that failed without the process being gone (an I/O error of `/proc`
/// itself) costs only the selector `kinds` that needed it: they are left out with the error as
/// the reason, and the caller keeps `unix:uid`, `unix:gid` and every other fact.
fn or_leave_out<T>(
    proc: &Pinned<'_>,
    read: Result<Option<T>, AttestError>,
    kinds: &[&str],
    left_out: &mut Vec<LeftOut>,
) -> Result<Option<T>, AttestError> {
    match read {
        Err(e) if !e.is_fatal() => {
            let reason = e.to_string();
            proc.log_left_out(kinds, &reason);
            push_left_out(left_out, kinds, &reason);
            Ok(None)
        }
        other => other,
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

/// A warning for an agent that cannot gather every selector kind `needs` asks for, or `None`.
///
/// Reading `/proc/PID/exe` of a process with other credentials is a ptrace access check
/// (`PTRACE_MODE_READ_FSCREDS`) that only `CAP_SYS_PTRACE` passes; root has it. Without it,
/// `unix:path` and `unix:sha256` are left out for callers of other uids (and for non-dumpable
/// ones), so entries that use them match only callers of the agent's own uid.
pub fn exe_access_warning(needs: &Needs) -> Option<String> {
    if !(needs.wants("unix:path") || needs.wants("unix:sha256")) {
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
/// character, say): a strange fact about a caller is not a reason to refuse the caller, and a
/// selector no entry could name could not match one either.
fn add(selectors: &mut Vec<Selector>, selector: Result<Selector, SelectorError>) {
    match selector.and_then(|s| check(&s).map(|()| s)) {
        Ok(s) => selectors.push(s),
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

    /// Every unix kind but the executable's hash.
    fn no_hash() -> Needs {
        [
            "unix:user",
            "unix:group",
            "unix:supplementary_gid",
            "unix:supplementary_group",
            "unix:path",
        ]
        .into_iter()
        .collect()
    }

    fn needs(kinds: &[&str]) -> Needs {
        kinds.iter().copied().collect()
    }

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

    /// The distinct `type:key`s of `got`'s selectors, in order.
    fn kinds(got: &PluginAttested) -> Vec<String> {
        let mut k: Vec<String> = got.selectors.iter().map(Selector::kind_key).collect();
        k.sort();
        k.dedup();
        k
    }

    fn cred_of_child(child: &std::process::Child) -> PeerCred {
        let (uid, gid) = own_ids();
        PeerCred {
            pid: Some(child.id()),
            uid,
            gid,
            pidfd: Some(Arc::new(sys::pidfd_open(child.id()).unwrap())),
        }
    }

    #[test]
    fn facts_follow_the_needs() {
        assert_eq!(Facts::from_needs(&Needs::none()), Facts::NONE);
        assert_eq!(Facts::from_needs(&Needs::everything()), Facts::ALL);
        let creds = needs(&["unix:uid", "unix:gid", "systemd:id", "k8s:ns"]);
        assert_eq!(Facts::from_needs(&creds), Facts::NONE);
        assert!(!Facts::from_needs(&creds).need_proc());
        let names = Facts::from_needs(&needs(&["unix:user"]));
        assert_eq!(names, Facts::NAMES);
        assert!(!names.need_proc());
        let exe = Facts::from_needs(&needs(&["unix:sha256", "unix:group"]));
        assert!(exe.need_proc() && exe.contains(Facts::SHA256.union(Facts::NAMES)));
        assert!(!exe.contains(Facts::PATH));
        for kind in [
            "unix:supplementary_gid",
            "unix:supplementary_group",
            "unix:path",
        ] {
            assert!(Facts::from_needs(&needs(&[kind])).need_proc(), "{kind}");
        }
        assert_eq!(
            Facts::from_needs(&no_hash()).union(Facts::SHA256),
            Facts::ALL
        );
    }

    #[tokio::test]
    async fn attests_our_own_connection() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        let plugin = UnixPlugin::new();
        let got = plugin.attest(&cred, &no_hash()).await.unwrap();

        let (uid, gid) = own_ids();
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
        assert!(got.selectors.iter().all(|s| s.kind() == "unix"));
        assert_eq!(plugin.hashes_computed(), 0);

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
        let plugin = UnixPlugin::new();
        let want = hex_sha256(&std::fs::read(std::env::current_exe().unwrap()).unwrap());
        let want = sel(&format!("unix:sha256:{want}"));

        let first = plugin.attest(&cred, &Needs::everything()).await.unwrap();
        assert!(first.selectors.contains(&want));
        assert!(first.left_out.is_empty(), "{:?}", first.left_out);
        assert_eq!(plugin.hashes_computed(), 1);
        assert_eq!(plugin.sha256_cache_len(), 1);

        let second = plugin.attest(&cred, &Needs::everything()).await.unwrap();
        assert_eq!(second.selectors, first.selectors);
        let only = plugin
            .attest(&cred, &needs(&["unix:sha256"]))
            .await
            .unwrap();
        assert_eq!(kinds(&only), ["unix:gid", "unix:sha256", "unix:uid"]);
        assert!(only.selectors.contains(&want));
        assert_eq!(plugin.hashes_computed(), 1);
        assert_eq!(plugin.sha256_cache_len(), 1);
    }

    /// Outside a tokio runtime there is no blocking pool: the hash is computed inline.
    #[test]
    fn hashes_outside_a_tokio_runtime() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = {
            let _inside = rt.enter();
            UnixStream::from_std(a).unwrap()
        };
        let cred = peer_cred(&a).unwrap();
        assert!(tokio::runtime::Handle::try_current().is_err());
        let plugin = UnixPlugin::new();
        let got =
            futures::executor::block_on(plugin.attest(&cred, &needs(&["unix:sha256"]))).unwrap();
        let want = hex_sha256(&std::fs::read(std::env::current_exe().unwrap()).unwrap());
        assert!(got.selectors.contains(&sel(&format!("unix:sha256:{want}"))));
        assert_eq!(plugin.hashes_computed(), 1);
    }

    #[tokio::test]
    async fn gathers_only_the_facts_asked_for() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        let (uid, gid) = own_ids();
        let plugin = UnixPlugin::new();

        let bare = plugin.attest(&cred, &Needs::none()).await.unwrap();
        assert_eq!(
            bare.selectors,
            [
                sel(&format!("unix:uid:{uid}")),
                sel(&format!("unix:gid:{gid}"))
            ]
        );
        assert_eq!(bare.exe, None);

        // Other types are not this plugin's business.
        let other = plugin
            .attest(&cred, &needs(&["systemd:id", "k8s:ns"]))
            .await
            .unwrap();
        assert_eq!(other, bare);

        let names = plugin.attest(&cred, &needs(&["unix:user"])).await.unwrap();
        assert_eq!(
            kinds(&names),
            ["unix:gid", "unix:group", "unix:uid", "unix:user"]
        );

        let path = plugin.attest(&cred, &needs(&["unix:path"])).await.unwrap();
        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        assert_eq!(path.exe.as_deref(), Some(exe.as_path()));
        assert_eq!(kinds(&path), ["unix:gid", "unix:path", "unix:uid"]);
        assert_eq!(plugin.hashes_computed(), 0);
    }

    #[tokio::test]
    async fn no_pid_gives_only_credential_selectors() {
        let (uid, gid) = own_ids();
        let cred = PeerCred {
            pid: None,
            uid,
            gid,
            pidfd: None,
        };
        let got = UnixPlugin::new()
            .attest(&cred, &Needs::everything())
            .await
            .unwrap();
        assert_eq!(got.exe, None);
        for key in kinds(&got) {
            assert!(
                ["unix:uid", "unix:gid", "unix:user", "unix:group"].contains(&key.as_str()),
                "unexpected {key}"
            );
        }
        assert!(got.selectors.contains(&sel(&format!("unix:uid:{uid}"))));
        assert!(got.selectors.contains(&sel(&format!("unix:gid:{gid}"))));
    }

    #[tokio::test]
    async fn unnamed_ids_get_only_numbers() {
        // Ids far above anything /etc/passwd or NSS hands out.
        let cred = PeerCred {
            pid: None,
            uid: 3_999_999_001,
            gid: 3_999_999_002,
            pidfd: None,
        };
        let got = UnixPlugin::new().attest(&cred, &no_hash()).await.unwrap();
        assert_eq!(
            got.selectors,
            [sel("unix:uid:3999999001"), sel("unix:gid:3999999002")]
        );
    }

    #[tokio::test]
    async fn a_process_that_exits_is_gone() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let cred = cred_of_child(&child);
        let plugin = UnixPlugin::new();
        let alive = plugin.attest(&cred, &no_hash()).await.unwrap();
        let sleep = alive.exe.unwrap();
        assert!(
            sleep.ends_with("sleep") || sleep.ends_with("coreutils"),
            "{sleep:?}"
        );

        assert!(plugin.attest(&cred, &Needs::none()).await.is_ok());

        child.kill().unwrap();
        child.wait().unwrap();
        match plugin.attest(&cred, &no_hash()).await {
            Err(e @ AttestError::ProcessGone { pid: p }) => {
                assert_eq!(p, pid);
                assert!(e.is_fatal());
            }
            other => panic!("expected ProcessGone, got {other:?}"),
        }
        // Credentials alone are not enough once the process that connected is gone.
        match plugin.attest(&cred, &Needs::none()).await {
            Err(AttestError::ProcessGone { pid: p }) => assert_eq!(p, pid),
            other => panic!("expected ProcessGone, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_zombie_is_gone() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let cred = cred_of_child(&child);
        let plugin = UnixPlugin::new();
        plugin.attest(&cred, &no_hash()).await.unwrap();
        child.kill().unwrap();
        // Not reaped: /proc/PID stays, and fdinfo keeps naming it, until we wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match plugin.attest(&cred, &no_hash()).await {
                Err(AttestError::ProcessGone { pid: p }) => {
                    assert_eq!(p, pid);
                    break;
                }
                Ok(_) => {
                    assert!(std::time::Instant::now() < deadline, "kill did not land");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(other) => panic!("expected ProcessGone, got {other:?}"),
            }
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
    }

    /// The pid was reused: `/proc/PID` reads fine (here it is our own), but the pidfd pins a
    /// different process. Only the check after the reads can catch this.
    #[tokio::test]
    async fn a_reused_pid_is_gone() {
        let me = std::process::id();
        let (uid, gid) = own_ids();
        let plugin = UnixPlugin::new();

        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        let live_other = Arc::new(sys::pidfd_open(other.id()).unwrap());
        let cred = PeerCred {
            pid: Some(me),
            uid,
            gid,
            pidfd: Some(Arc::clone(&live_other)),
        };
        assert!(matches!(
            plugin.attest(&cred, &no_hash()).await,
            Err(AttestError::ProcessGone { pid }) if pid == me
        ));
        // The hash of an executable read through the wrong process is not computed either.
        assert!(matches!(
            plugin.attest(&cred, &Needs::everything()).await,
            Err(AttestError::ProcessGone { pid }) if pid == me
        ));
        assert_eq!(plugin.hashes_computed(), 0);

        other.kill().unwrap();
        other.wait().unwrap();
        let cred = PeerCred {
            pidfd: Some(live_other),
            ..cred
        };
        assert!(matches!(
            plugin.attest(&cred, &no_hash()).await,
            Err(AttestError::ProcessGone { pid }) if pid == me
        ));
    }

    /// A read of `/proc` that fails for another reason than the process being gone costs only
    /// the kinds that needed it.
    #[test]
    fn a_failed_proc_read_leaves_out_only_its_kinds() {
        let gate = LogGate::default();
        let proc = Pinned {
            pid: std::process::id(),
            uid: 0,
            pidfd: None,
            denied_log: &gate,
        };
        let mut left_out = vec![];
        let failed: Result<Option<String>, AttestError> = Err(AttestError::Proc {
            pid: proc.pid,
            what: "status",
            source: io::Error::from_raw_os_error(libc::EIO),
        });
        let kinds = ["unix:supplementary_gid", "unix:supplementary_group"];
        assert!(matches!(
            or_leave_out(&proc, failed, &kinds, &mut left_out),
            Ok(None)
        ));
        let got: Vec<&str> = left_out.iter().map(|l| l.kind_key.as_str()).collect();
        assert_eq!(got, kinds);
        assert!(
            left_out[0].reason.contains("cannot read /proc/")
                && left_out[0].reason.contains("status"),
            "{}",
            left_out[0]
        );

        let gone: Result<Option<String>, AttestError> =
            Err(AttestError::ProcessGone { pid: proc.pid });
        let mut left_out = vec![];
        assert!(matches!(
            or_leave_out(&proc, gone, &kinds, &mut left_out),
            Err(AttestError::ProcessGone { .. })
        ));
        assert!(left_out.is_empty());
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
    #[tokio::test]
    async fn a_path_from_another_mount_namespace_is_left_out() {
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
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let cred = cred_of_child(&child);
        let got = UnixPlugin::new()
            .attest(&cred, &Needs::everything())
            .await
            .unwrap();
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
        assert_eq!(
            exe_access_warning(&needs(&["unix:user", "unix:group", "systemd:id"])),
            None
        );
        assert_eq!(exe_access_warning(&Needs::none()), None);
        if own_ids().0 == 0 {
            assert_eq!(
                exe_access_warning(&needs(&["unix:path", "unix:sha256"])),
                None
            );
            assert_eq!(exe_access_warning(&Needs::everything()), None);
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

        let plugin = UnixPlugin::new();
        let while_alive = plugin.attest(&cred, &no_hash()).await.unwrap();
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
            match plugin.attest(&cred, &no_hash()).await {
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
            plugin.attest(&cred, &no_hash()).await,
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
