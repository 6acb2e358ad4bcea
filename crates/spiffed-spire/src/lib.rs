//! Agent mode: spiffed as the node agent of an existing SPIRE Server, in place of spire-agent.
//!
//! The server is the trust domain's CA and its registry. This crate talks to it
//! (`../shared/SPIRE-AGENT.md` maps the protocol) and plugs what it gets into the agent's seams:
//! - [`config`]: the `[spire_server]` block, parsed and checked by `spiffed-agent`.
//! - [`server`]: the [`ServerApi`](server::ServerApi) seam, the calls an attested agent makes
//!   (bundles, authorized entries, SVIDs). The real one dials the server over mTLS with the
//!   agent SVID; the sync and the issuer are tested against a double of it.
//! - [`status`]: what the agent reports about its server link (serving, serving from cache,
//!   not serving and why), for logs and `spiffed healthcheck`.
//! - [`link`]: the real [`ServerApi`](server::ServerApi), [`ServerLink`]: node attestation
//!   (join_token, x509pop), the agent SVID and its rotation, the persisted agent state, and
//!   the calls over mTLS with failover between the server's addresses.
//! - [`issuer`]: [`SpireIssuer`], the agent's [`Issuer`](spiffed_core::Issuer) in agent mode:
//!   workload X.509-SVIDs signed by the server (a fresh key and CSR per entry, batched,
//!   pre-minted, rotated), JWT-SVIDs from the server (cached), the bundle set.
//! - [`sync`]: [`EntrySync`], entries and bundles synced from the server into the entry source
//!   and the issuer.
//! - [`cache`]: the persisted workload cache (`data_dir/workload-cache.json`), so a restart
//!   while the server is down serves the cached SVIDs at once.
//!
//! Wiring, in order: [`SpireIssuer::open`] (loads the cache), [`SpireIssuer::publish_cached`]
//! into the `SourceHandle` of `EntrySources::synced`, spawn [`SpireIssuer::run`] and
//! [`EntrySync::run`], then open the Workload API socket with the issuer behind it.
#![forbid(unsafe_code)]

mod bundle;
pub mod cache;
pub mod config;
pub mod issuer;
mod jwt;
pub mod link;
pub mod server;
pub mod status;
mod svids;
pub mod sync;
mod x509;

mod agent_state;
mod agent_svid;
mod bootstrap;
mod cert;
mod node;
mod tls;

pub use cache::{CACHE_FILE, CacheError};
pub use issuer::{
    BundleError, DEFAULT_JWT_CACHE_MAX, DEFAULT_PREFETCH_MAX, IssuerConfig, SpireIssuer,
};
pub use link::{LinkError, ServerLink, StateError};
pub use svids::SvidStats;
pub use sync::{BundleHook, EntrySync, SyncError, SyncReport, convert_entry};

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
