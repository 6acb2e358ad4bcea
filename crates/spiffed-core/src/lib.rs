//! Shared types and the traits at the seams of spiffed's data flow.
//!
//! ```text
//! accept -> PeerCred -> Selectors -> matching Entries -> SVIDs + bundles -> responses
//!           (Attestor: plugins)      (EntryFeed)         (Issuer)           (workload api)
//! ```
//!
//! This crate does no I/O. Every stage crate depends on it and on nothing else of spiffed's, so
//! an attestor plugin, an entry source or an issuer can be swapped without touching the others.
#![forbid(unsafe_code)]

mod entry;
mod identity;
mod index;
mod log_gate;
mod peer;
mod selector;
pub mod spiffe_bundle;
pub mod untrusted;

pub use entry::{Entry, EntryError, EntryId, EntryLimits, EntryRules, MAX_HINT_LEN, MAX_TTL};
pub use identity::{
    AuthorityError, BundleSet, Identity, Issuer, JwtAuthority, JwtBundle, JwtError, JwtSvid,
    PrivateKey, SvidWatch, TrustBundle, ValidatedJwt, X509Bundle, X509Svid,
};
pub use index::{EntryChange, EntryEvent, EntryFeed, EntryIndex, EntryPublisher};
pub use log_gate::{LOG_INTERVAL, LogGate};
pub use peer::{
    AttestError, Attested, Attestor, AttestorPlugin, LeftOut, Needs, PeerCred, PluginAttested,
};
pub use selector::{Selector, SelectorCheck, SelectorError, Selectors, known_list};
pub use spiffe::{SpiffeId, TrustDomain};
