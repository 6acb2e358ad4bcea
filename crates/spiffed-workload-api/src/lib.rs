//! The SPIFFE Workload API service: identities -> gRPC responses and streams.
//!
//! Serves the official `SpiffeWorkloadAPI` (no proto package) over whatever connections the
//! agent accepts. Each RPC checks the security header first, then attests the caller from the
//! kernel credentials that the listener attached to the connection ([`PeerCred`] as the request
//! extension), matches entries, and answers with the issuer's SVIDs and bundle set. Streams
//! send their first message at once and a full new state whenever the caller's identities or
//! the bundles change; they end as soon as the client goes away.
//!
//! A stream wakes only for what can change its answer: the SVID watch of each identity it
//! sends, the bundle set, and entry changes, which it judges against its caller's selectors
//! before doing any work ([`WorkloadApi::wakeups`] counts both kinds of wake-up).
//!
//! ```no_run
//! # fn demo(
//! #   attestor: std::sync::Arc<dyn spiffed_core::Attestor>,
//! #   issuer: std::sync::Arc<dyn spiffed_core::Issuer>,
//! #   publisher: &spiffed_core::EntryPublisher,
//! # ) {
//! let api = spiffed_workload_api::WorkloadApi::new(attestor, issuer, publisher.feed(), false);
//! let svc = api.into_server(); // add to a tonic Router
//! # }
//! ```
//!
//! The same service also serves Envoy's Secret Discovery Service ([`sds`]) from the same
//! per-workload updates: `api.sds(SdsConfig::default()).into_server()`.
//!
//! [`PeerCred`]: spiffed_core::PeerCred
#![forbid(unsafe_code)]

mod gate;
mod jwt;
mod limits;
pub mod sds;
mod service;
mod status;

pub use limits::{
    DEFAULT_DENIAL_LOG_LINES_PER_SECOND, DEFAULT_MAX_JWT_AUDIENCE_LENGTH,
    DEFAULT_MAX_JWT_AUDIENCES, DEFAULT_MAX_JWT_TOKEN_LENGTH, RequestLimits,
};
pub use sds::{SdsConfig, SdsService, SdsStreams};
pub use service::{
    Denials, Wakeups, WorkloadApi, synthetic_entry, x509_svid_response, x509_svid_response_for,
};
pub use status::ApiError;
