//! The seam between the server link and what uses it: the calls an attested agent makes.
//!
//! The real implementation dials the SPIRE Server over mTLS with the agent SVID, fails over
//! between the addresses of its name, and handles `PermissionDenied` details itself
//! (re-attestation; a ban is reported in [`status`](crate::status)). The entry and bundle sync
//! and the issuer only see this trait, so they are unit-tested against a double.

use std::collections::HashMap;

use spiffed_proto::spire::{svid, types};

/// What the server said about an entry's version: a cached copy is current when both match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryVersion {
    /// The entry's `revision_number`.
    pub revision: i64,
    /// The entry's `created_at` (catches an entry deleted and re-created with the same id).
    pub created_at: i64,
}

impl EntryVersion {
    /// The version of a full entry as the server sent it.
    pub fn of(entry: &types::Entry) -> Self {
        Self {
            revision: entry.revision_number,
            created_at: entry.created_at,
        }
    }
}

/// The outcome of one entry sync.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthorizedEntries {
    /// Entries new or changed since the versions the caller holds, in full.
    pub changed: Vec<types::Entry>,
    /// The ids of every entry the agent is authorized for now (changed or not). A cached entry
    /// whose id is not here was deleted (or is no longer the agent's).
    pub authorized: Vec<String>,
}

/// Why a permission was denied (`spire.api.types.PermissionDeniedDetails.Reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeniedReason {
    /// No reason given.
    Unknown,
    /// The agent SVID expired.
    AgentExpired,
    /// The caller is not an attested agent.
    AgentNotAttested,
    /// The SVID is not the agent's active one.
    AgentNotActive,
    /// The agent was banned (`spire-server agent ban`).
    AgentBanned,
    /// The agent must re-attest rather than renew.
    AgentMustReattest,
}

impl DeniedReason {
    /// From the proto enum's number.
    pub fn from_i32(n: i32) -> Self {
        match n {
            1 => Self::AgentExpired,
            2 => Self::AgentNotAttested,
            3 => Self::AgentNotActive,
            4 => Self::AgentBanned,
            5 => Self::AgentMustReattest,
            _ => Self::Unknown,
        }
    }
}

/// Why a call to the server failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// No address of the server answered, or the connection broke (retry later).
    #[error("the SPIRE Server at {address} is unreachable: {reason}")]
    Unreachable {
        /// The configured address.
        address: String,
        /// What failed (resolution, connect, TLS, a timeout).
        reason: String,
    },
    /// The agent has no usable SVID yet (not attested, or re-attesting).
    #[error("the agent is not attested to the SPIRE Server: {0}")]
    NotAttested(String),
    /// The server refused the agent.
    #[error("the SPIRE Server denied the agent ({reason:?}): {message}")]
    PermissionDenied {
        /// The reason in the status details.
        reason: DeniedReason,
        /// The server's message.
        message: String,
    },
    /// Any other gRPC status.
    #[error("the SPIRE Server answered {code:?}: {message}")]
    Status {
        /// The status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The server's answer breaks the protocol (a missing field, a bad certificate).
    #[error("the SPIRE Server sent an invalid answer: {0}")]
    Invalid(String),
}

/// The calls an attested agent makes. Implementations are cheap to share (`Arc<dyn
/// ServerApi>`); every call has its own deadline (30 s in the real one).
#[async_trait::async_trait]
pub trait ServerApi: Send + Sync + 'static {
    /// `Bundle/GetBundle`: the trust domain's bundle.
    async fn get_bundle(&self) -> Result<types::Bundle, ServerError>;

    /// `Bundle/GetFederatedBundle` for one trust domain (its name, e.g. `partner.org`);
    /// `Ok(None)` when the server has no bundle for it (`NotFound`).
    async fn get_federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<types::Bundle>, ServerError>;

    /// The agent's authorized entries, given the versions of the entries it holds:
    /// `Entry/SyncAuthorizedEntries` (revision diff, paged), or `GetAuthorizedEntries` when the
    /// server does not implement the former. Entries are fetched with the mask spire-agent
    /// asks for (`spiffe_id, selectors, federates_with, admin, downstream, revision_number,
    /// store_svid, hint, created_at`).
    async fn authorized_entries(
        &self,
        cached: &HashMap<String, EntryVersion>,
    ) -> Result<AuthorizedEntries, ServerError>;

    /// `SVID/BatchNewX509SVID`: one result per parameter, in order (a per-entry failure is a
    /// non-OK status in its result, not an error of the call). At most 500 per call.
    async fn batch_new_x509_svid(
        &self,
        params: Vec<svid::NewX509svidParams>,
    ) -> Result<Vec<svid::batch_new_x509svid_response::Result>, ServerError>;

    /// `SVID/NewJWTSVID` for one entry and audience.
    async fn new_jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<types::Jwtsvid, ServerError>;
}
