//! The caller as the kernel reports it, and the attestor seam.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use crate::Selectors;

/// Kernel facts about the process at the other end of an accepted Unix connection.
///
/// Taken with `SO_PEERCRED` when the connection is accepted; nothing the client sends goes in here.
#[derive(Clone, Debug)]
pub struct PeerCred {
    /// The peer's pid, or `None` when the kernel reported 0 (the peer lives in another PID
    /// namespace, so `/proc` cannot be read for it).
    pub pid: Option<u32>,
    /// The peer's effective uid at `connect(2)` time.
    pub uid: u32,
    /// The peer's effective gid at `connect(2)` time.
    pub gid: u32,
    /// A pidfd that pins the peer process (from `SO_PEERPIDFD`, else `pidfd_open` right after
    /// accept). Used to prove that the process read from `/proc` is the one that connected.
    pub pidfd: Option<Arc<OwnedFd>>,
}

/// Which facts beyond the kernel's credentials attestation gathers: the selector types that some
/// registration entry uses, so that a caller is not put through `/proc` reads, name-service
/// lookups or hashing that no entry can match on.
///
/// `unix:uid` and `unix:gid` come from `SO_PEERCRED` and are always there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Facts(u8);

impl Facts {
    /// Only `unix:uid` and `unix:gid`.
    pub const NONE: Self = Self(0);
    /// `unix:user` and `unix:group` (name-service lookups of the uid and gid).
    pub const NAMES: Self = Self(1);
    /// `unix:supplementary_gid` (`/proc/PID/status`).
    pub const SUPPLEMENTARY_GIDS: Self = Self(1 << 1);
    /// `unix:supplementary_group` (`/proc/PID/status` and a lookup per group).
    pub const SUPPLEMENTARY_GROUPS: Self = Self(1 << 2);
    /// `unix:path` (`/proc/PID/exe`); also what dev mode's synthetic IDs are named after.
    pub const PATH: Self = Self(1 << 3);
    /// `unix:sha256` (the executable's content, hashed once per file version).
    pub const SHA256: Self = Self(1 << 4);
    /// `systemd:id` (`/proc/PID/cgroup`).
    pub const SYSTEMD: Self = Self(1 << 5);
    /// Everything the attestor knows how to find out (for `explain`).
    pub const ALL: Self = Self((1 << 6) - 1);

    /// The facts a selector of `kind_key` (as [`Selector::kind_key`](crate::Selector::kind_key),
    /// e.g. `unix:path`) is matched against; [`Facts::NONE`] for the credential selectors and for
    /// types no attestor here produces.
    pub fn for_kind_key(kind_key: &str) -> Self {
        match kind_key {
            "unix:user" | "unix:group" => Self::NAMES,
            "unix:supplementary_gid" => Self::SUPPLEMENTARY_GIDS,
            "unix:supplementary_group" => Self::SUPPLEMENTARY_GROUPS,
            "unix:path" => Self::PATH,
            "unix:sha256" => Self::SHA256,
            "systemd:id" => Self::SYSTEMD,
            _ => Self::NONE,
        }
    }

    /// Both sets of facts (`|` in a `const`).
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether every fact in `other` is also in `self`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` share at least one fact.
    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether nothing beyond the credentials is asked for.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether attestation must read `/proc/PID` for these facts.
    pub fn need_proc(self) -> bool {
        self.0 & !Self::NAMES.0 != 0
    }
}

impl std::ops::BitOr for Facts {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Facts {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

/// What attestation learned about a caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attested {
    /// Every selector the caller has among the [`facts`](Self::facts) gathered.
    pub selectors: Selectors,
    /// The caller's uid (kernel fact).
    pub uid: u32,
    /// The caller's executable, when `/proc` was read for it.
    pub exe: Option<PathBuf>,
    /// Which facts were gathered; selectors of other types were not looked for, so an entry that
    /// needs them must not be judged against these selectors (attest again with more facts).
    pub facts: Facts,
    /// Selector types among [`facts`](Self::facts) that attestation looked for but could not
    /// vouch for, and why: those selectors are absent, so entries that need them do not match,
    /// while the caller keeps every identity its other selectors earn.
    pub left_out: Vec<LeftOut>,
}

/// A selector type that attestation left out for one caller, and why (for logs and `explain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftOut {
    /// The selector type, as [`Selector::kind_key`](crate::Selector::kind_key) gives it
    /// (`unix:path`).
    pub kind_key: &'static str,
    /// Why, in a short sentence that names the fix when there is one.
    pub reason: String,
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind_key, self.reason)
    }
}

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The process that opened the connection has exited (or was replaced), so the facts read
    /// from `/proc` cannot be tied to it. This is also what a process that inherited a connection
    /// from an exited parent gets.
    #[error("the process that opened this connection (pid {pid}) is gone")]
    ProcessGone {
        /// The pid that `SO_PEERCRED` reported.
        pid: u32,
    },
    /// `/proc/PID` could not be read.
    #[error("cannot read /proc/{pid}/{what}: {source}")]
    Proc {
        /// The pid.
        pid: u32,
        /// The file under `/proc/PID` that failed.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Turns kernel facts about a caller into selectors.
pub trait Attestor: Send + Sync + 'static {
    /// Attests the caller described by `peer`, gathering at least `facts`.
    ///
    /// May block (hashing an executable reads the whole file): async callers try
    /// [`attest_quick`](Self::attest_quick) first and run this off the executor.
    fn attest(&self, peer: &PeerCred, facts: Facts) -> Result<Attested, AttestError>;

    /// Attests like [`attest`](Self::attest) when that needs only quick system calls (reads of
    /// `/proc`, answers from caches), so it may run on an async worker; `None` when it would
    /// block on real work. The default always says `None`.
    fn attest_quick(&self, peer: &PeerCred, facts: Facts) -> Option<Result<Attested, AttestError>> {
        let _ = (peer, facts);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_follow_the_selector_types() {
        let mut f = Facts::NONE;
        for key in ["unix:uid", "unix:gid", "k8s:ns"] {
            f |= Facts::for_kind_key(key);
        }
        assert!(f.is_empty());
        assert!(!f.need_proc());
        f |= Facts::for_kind_key("unix:user");
        assert!(f.contains(Facts::NAMES) && !f.need_proc());
        f |= Facts::for_kind_key("unix:sha256");
        assert!(f.need_proc() && f.contains(Facts::SHA256 | Facts::NAMES));
        assert!(!f.contains(Facts::PATH));
        assert!(f.intersects(Facts::PATH | Facts::SHA256));
        assert!(!f.intersects(Facts::PATH | Facts::SYSTEMD));
        assert!(Facts::ALL.contains(f | Facts::SYSTEMD | Facts::PATH));
        for key in [
            "unix:supplementary_gid",
            "unix:supplementary_group",
            "unix:path",
            "systemd:id",
        ] {
            assert!(Facts::for_kind_key(key).need_proc(), "{key}");
        }
    }
}
