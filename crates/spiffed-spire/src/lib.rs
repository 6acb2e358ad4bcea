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
#![forbid(unsafe_code)]

pub mod config;
pub mod link;
pub mod server;
pub mod status;

mod agent_state;
mod agent_svid;
mod bootstrap;
mod cert;
mod node;
mod tls;

pub use link::{LinkError, ServerLink, StateError};
