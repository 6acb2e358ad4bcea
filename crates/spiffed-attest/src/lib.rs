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
//! - [`UnixAttestor`]: the [`Attestor`] that turns a [`PeerCred`] into `unix:*` and `systemd:id`
//!   selectors by reading `/proc/PID`, then proves with the pidfd that the process it read is
//!   still the one that connected (CONFORMANCE item 96).
//!
//! It is the only crate in the workspace with `unsafe` code, all of it in the private `sys`
//! module (reading `SO_PEERPIDFD`, which has no safe wrapper yet).
//!
//! [`Selectors`]: spiffed_core::Selectors
//! [`PeerCred`]: spiffed_core::PeerCred
//! [`Attestor`]: spiffed_core::Attestor
#![deny(unsafe_code)]

pub mod listen;
mod procfs;
mod sha256_cache;
#[allow(unsafe_code)]
mod sys;
mod systemd;
mod unix;

pub use systemd::systemd_unit_from_cgroup;
pub use unix::{UnixAttestor, exe_access_warning, peer_cred_of_pid};

/// Hands heap memory that the C allocator keeps after it was freed back to the kernel
/// (glibc's `malloc_trim`; nothing elsewhere). The agent calls it after many connections or
/// streams have closed, so that a burst does not stay in its RSS. Blocks for as long as the
/// allocator takes to walk its heap: call it off the async threads.
pub fn release_free_memory() {
    let released = sys::malloc_trim();
    tracing::debug!(released, "returned free heap memory to the kernel");
}
