//! The embedded CA: entries -> identities.
//!
//! Owns the trust domain's X.509 CA (ECDSA P-256, persisted in `data_dir/ca.json`, rotated with
//! overlap), mints X.509-SVIDs per entry (shared by every caller matching that entry), re-mints
//! each at half its lifetime and sends it on that entry's watch, so only the streams holding it
//! wake. Bundles go out as a [`BundleSet`](spiffed_core::BundleSet) (own trust domain, plus
//! federated ones given to [`CaAuthority::set_federated`]).
//!
//! Memory follows use, not the number of registered entries: the rotation task
//! ([`CaAuthority::run_with_entries`]) pre-mints up to [`AuthorityConfig::premint_entries`]
//! registered entries in the background and keeps them rotated; every other entry is minted on
//! its first fetch ([`Issuer::x509_svid`](spiffed_core::Issuer::x509_svid)) and kept while a
//! stream holds it or it was fetched within the last minute.
//!
//! The parts, one concern each: `config` (errors and configuration), `keys` (the CA key
//! state), `svid_cache` (which entry has which SVID: a pure state machine over `now`),
//! `jwt_cache`, `rotation` (the task), `issuer` (the request path).
//!
//! ```no_run
//! # async fn demo() -> Result<(), spiffed_authority::Error> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use spiffed_authority::{AuthorityConfig, CaAuthority, DEFAULT_PREMINT_ENTRIES};
//! use spiffed_core::{EntryPublisher, Issuer};
//! let cfg = AuthorityConfig {
//!     trust_domain: "example.org".parse().map_err(|_| spiffed_authority::Error::Crypto("td".into()))?,
//!     data_dir: "/var/lib/spiffed".into(),
//!     ca_ttl: Duration::from_secs(24 * 3600),
//!     x509_svid_ttl: Duration::from_secs(3600),
//!     jwt_svid_ttl: Duration::from_secs(300),
//!     new_root: spiffed_authority::NewRootPolicy::Refuse,
//!     premint_entries: DEFAULT_PREMINT_ENTRIES,
//!     upstream: None,
//! };
//! let authority = CaAuthority::open(cfg)?;
//! let (_stop, stopped) = tokio::sync::watch::channel(false);
//! // The registered entries; in the agent they come from the entry sources.
//! let entries = EntryPublisher::new([]);
//! tokio::spawn(authority.clone().run_with_entries(stopped, entries.feed()));
//! let issuer: Arc<dyn Issuer> = Arc::new(authority);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod ca;
mod clock;
mod config;
mod issuer;
mod jwt;
mod jwt_cache;
mod keys;
mod rotation;
mod svid_cache;
mod upstream;
mod x509;

pub use crate::clock::{Clock, SystemClock};
pub use crate::config::{AuthorityConfig, DEFAULT_PREMINT_ENTRIES, Error, NewRootPolicy};
pub use crate::issuer::CaAuthority;
pub use crate::jwt_cache::{
    DEFAULT_JWT_CACHE_BYTES, DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY, JwtCacheLimits,
};
pub use crate::svid_cache::SvidStats;
pub use crate::upstream::{UpstreamConfig, UpstreamError, check_upstream};

/// Validates a JWT-SVID `token` for `audience` at `now` against the JWT authorities that
/// `authorities` gives for the subject's trust domain (`None`: no bundle for it): the same
/// validator the embedded CA's [`Issuer::validate_jwt`](spiffed_core::Issuer::validate_jwt)
/// uses (algorithm allow-list first, `kid` lookup, ES256 signature, expiry with 60 s leeway,
/// audience), for issuers whose JWT authorities come from elsewhere (a SPIRE Server).
pub fn validate_jwt(
    token: &str,
    audience: &str,
    now: std::time::SystemTime,
    authorities: impl Fn(&spiffed_core::TrustDomain) -> Option<Vec<spiffed_core::JwtAuthority>>,
) -> Result<spiffed_core::ValidatedJwt, spiffed_core::JwtError> {
    jwt::validate(token, audience, now, authorities)
}

#[cfg(test)]
mod tests;
