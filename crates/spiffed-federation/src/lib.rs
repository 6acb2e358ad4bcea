//! SPIFFE federation's transport (SPIFFE Federation spec): the bundle endpoint server that
//! serves the own trust domain's bundle to peers, and the client that fetches a peer's, over
//! HTTPS with either profile, `https_spiffe` or `https_web`.
//!
//! The bundle documents themselves (SPIFFE bundle format) are parsed and written elsewhere;
//! this crate moves bytes and authenticates the two ends. Both ends face other hosts, so each
//! has limits: connections, deadlines, body size.
#![forbid(unsafe_code)]

pub mod endpoint;
pub mod fetch;
pub mod relationship;
pub mod tls;

#[cfg(test)]
mod tests;

pub use endpoint::{Document, EndpointLimits, serve, server_config};
pub use fetch::{EndpointUrl, FetchError, FetchLimits, Profile, fetch, web_roots};
pub use relationship::{EndpointProfile, FederatedBundles, Refreshed, Relationship};
pub use tls::{
    CurrentCert, EndpointCertError, SpiffeEndpointVerifier, TlsError, anchors,
    certified_key_from_der, certified_key_from_files,
};
