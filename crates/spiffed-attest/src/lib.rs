//! Caller attestation from kernel facts: the first stage of spiffed's data flow.
//!
//! ```text
//! accept -> PeerCred -> Selectors -> matching Entries -> Identities -> responses
//! \_________ this crate _________/
//! ```
//!
//! This crate owns everything between `accept(2)` and a caller's [`Selectors`]:
//!
//! - [`listen`]: the accept loop the gRPC server reads connections from. It takes each
//!   connection's [`PeerCred`] (`SO_PEERCRED` plus a pidfd) the moment it is accepted, and backs
//!   off instead of spinning when the process runs out of descriptors.
//! - [`CompositeAttestor`] (the [`Attestor`] and [`SelectorCheck`] the agent uses; [`builtin`]
//!   composes the built-in plugins): runs the [`AttestorPlugin`]s whose selector types the
//!   entries need, concurrently, and merges their selectors; a plugin that fails for a caller
//!   costs only its own selectors. Each plugin checks the selectors of its types.
//! - [`UnixPlugin`] (`unix:*`) and [`SystemdPlugin`] (`systemd:id`): turn a [`PeerCred`] into
//!   selectors by reading `/proc/PID`, then prove with the pidfd that the process they read is
//!   still the one that connected (CONFORMANCE item 96).
//!
//! It is the only crate in the workspace with `unsafe` code, all of it in the private `sys`
//! module (reading `SO_PEERPIDFD`, which has no safe wrapper yet).
//!
//! [`Selectors`]: spiffed_core::Selectors
//! [`PeerCred`]: spiffed_core::PeerCred
//! [`Attestor`]: spiffed_core::Attestor
//! [`AttestorPlugin`]: spiffed_core::AttestorPlugin
//! [`SelectorCheck`]: spiffed_core::SelectorCheck
#![deny(unsafe_code)]

// spiffed is Linux-only; stop a build for any other OS at once, with the reason, instead of
// with hundreds of errors from the syscalls below (and from the crates they come from).
#[cfg(not(target_os = "linux"))]
compile_error!(
    "spiffed is Linux-only: spiffed-attest identifies a Workload API caller with Linux's \
     SO_PEERCRED (pid, uid, gid of the peer), a pidfd that pins the process (SO_PEERPIDFD or \
     pidfd_open) and /proc/PID (exe, status, cgroup), none of which this target has. A port \
     would need its own `sys` and `procfs` modules: getpeereid(3) plus LOCAL_PEERPID and \
     proc_pidpath on macOS, getpeereid(3) or LOCAL_PEERCRED plus kinfo_proc/procstat on the \
     BSDs, getpeerucred(3C) on illumos, and named pipes with GetNamedPipeClientProcessId \
     instead of Unix sockets on Windows."
);

mod composite;
pub mod listen;
mod pinned;
mod procfs;
mod sha256_cache;
#[allow(unsafe_code)]
mod sys;
mod systemd;
mod unix;

pub use composite::{CompositeAttestor, CompositeError, builtin};
pub use systemd::{SystemdPlugin, systemd_unit_from_cgroup};
pub use unix::{UnixPlugin, exe_access_warning, peer_cred_of_pid};

/// A type's keys for an error message: `unix:uid, unix:gid and unix:path`.
fn keys_sentence(kind: &str, keys: &[&str]) -> String {
    let kinds: Vec<String> = keys.iter().map(|k| format!("{kind}:{k}")).collect();
    match kinds.split_last() {
        None => "none".to_owned(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// Hands heap memory that the C allocator keeps after it was freed back to the kernel
/// (glibc's `malloc_trim`; nothing elsewhere). The agent calls it after many connections or
/// streams have closed, so that a burst does not stay in its RSS. Blocks for as long as the
/// allocator takes to walk its heap: call it off the async threads.
pub fn release_free_memory() {
    let released = sys::malloc_trim();
    tracing::debug!(released, "returned free heap memory to the kernel");
}
