//! Shared types and the traits at the seams of spiffed's data flow.
//!
//! ```text
//! accept -> PeerCred -> Selectors -> matching Entries -> Identities -> responses
//!           (attest)    (attest)     (entries)          (authority)   (workload api)
//! ```
//!
//! This crate does no I/O. Every stage crate depends on it and on nothing else of spiffed's, so
//! an attestor, an entry source or an authority can be swapped without touching the others.
#![forbid(unsafe_code)]

mod entry;
mod identity;
mod log_gate;
mod peer;
mod selector;
pub mod untrusted;

pub use entry::{Entry, EntryError, EntryId, EntrySet, MAX_HINT_LEN};
pub use identity::{
    Authority, AuthorityError, Identity, JwtAuthority, JwtBundle, JwtError, JwtSvid, Lease,
    PrivateKey, ValidatedJwt, X509Bundle, X509Svid,
};
pub use log_gate::{LOG_INTERVAL, LogGate};
pub use peer::{AttestError, Attested, Attestor, Facts, LeftOut, PeerCred};
pub use selector::{Selector, SelectorError, Selectors};
pub use spiffe::{SpiffeId, TrustDomain};
