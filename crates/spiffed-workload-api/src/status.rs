//! The one place where domain errors become gRPC statuses (CONFORMANCE.md §3).
//!
//! Clients match on these texts: the Rust `spiffe` crate reports `NoIdentityIssued` only for a
//! PermissionDenied whose message contains "no identity issued".

use spiffed_core::{AttestError, AuthorityError, JwtError};
use tonic::Status;

/// Why a Workload API call was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The `workload.spiffe.io: true` metadata is missing, repeated, or has another value.
    #[error("security header missing from request")]
    MissingSecurityHeader,
    /// The caller matches no entry.
    #[error("no identity issued")]
    NoIdentity,
    /// The caller could not be attested.
    #[error("workload attestation failed: {0}")]
    Attestation(#[from] AttestError),
    /// The authority could not mint.
    #[error("{0}")]
    Authority(#[from] AuthorityError),
    /// The connection carries no kernel credentials (not accepted through our listener).
    #[error("the connection carries no peer credentials")]
    NoPeerCred,
    /// A required request field is empty or malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The caller asked for a SPIFFE ID it is not entitled to.
    #[error("no identity issued: the caller is not entitled to {0}")]
    NotEntitled(String),
    /// A JWT-SVID failed validation.
    #[error("invalid JWT-SVID: {0}")]
    InvalidJwt(#[from] JwtError),
    /// An SDS request named resources the workload holds no identity or bundle for (the
    /// names, sorted). The message is spire-agent's.
    #[error("workload is not authorized for the requested identities [{}]", quoted(.0))]
    SdsNotAuthorized(Vec<String>),
    /// The profile or method is not served.
    #[error("{0}")]
    Unimplemented(&'static str),
    /// A background task failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::MissingSecurityHeader => Self::invalid_argument(msg),
            ApiError::NoIdentity | ApiError::NotEntitled(_) => Self::permission_denied(msg),
            ApiError::BadRequest(_) | ApiError::InvalidJwt(_) | ApiError::SdsNotAuthorized(_) => {
                Self::invalid_argument(msg)
            }
            ApiError::Attestation(_) => Self::unavailable(msg),
            ApiError::Authority(_) => Self::unavailable(msg),
            ApiError::NoPeerCred | ApiError::Internal(_) => Self::internal(msg),
            ApiError::Unimplemented(_) => Self::unimplemented(msg),
        }
    }
}

/// Each name in double quotes, separated by spaces (as Go's `%q` prints a list of strings).
fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes_follow_the_spec_and_spire() {
        assert_eq!(
            Status::from(ApiError::MissingSecurityHeader).code(),
            Code::InvalidArgument
        );
        let s = Status::from(ApiError::NoIdentity);
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "no identity issued");
        let s = Status::from(ApiError::Attestation(AttestError::ProcessGone { pid: 7 }));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().starts_with("workload attestation failed"));
        let s = Status::from(ApiError::SdsNotAuthorized(vec![
            "a".into(),
            "spiffe://x/y".into(),
        ]));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            r#"workload is not authorized for the requested identities ["a" "spiffe://x/y"]"#
        );
    }
}
