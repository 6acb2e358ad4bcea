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

/// What attestation learned about a caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attested {
    /// Every selector the caller has.
    pub selectors: Selectors,
    /// The caller's uid (kernel fact).
    pub uid: u32,
    /// The caller's executable, when `/proc` could be read.
    pub exe: Option<PathBuf>,
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
///
/// Implementations may block (they read `/proc` and may hash an executable); the caller runs them
/// off the async executor.
pub trait Attestor: Send + Sync + 'static {
    /// Attests the caller described by `peer`.
    fn attest(&self, peer: &PeerCred) -> Result<Attested, AttestError>;
}
