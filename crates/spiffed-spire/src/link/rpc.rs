//! gRPC statuses from the server, as [`ServerError`]s: the one place they are judged.
//!
//! `PermissionDenied` carries a `spire.api.types.PermissionDeniedDetails` in the status details
//! (`grpc-status-details-bin`: a `google.rpc.Status` whose `details` hold an `Any`).

use std::error::Error as _;
use std::time::Duration;

use prost::Message as _;
use spiffed_proto::spire::types;
use tonic::{Code, Status};

use crate::server::{DeniedReason, ServerError};

/// Every call to the server has this deadline (as spire-agent's `rpcTimeout`).
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The `Any` type URL of the details of a `PermissionDenied`.
pub(crate) const DENIED_DETAILS_TYPE: &str =
    "type.googleapis.com/spire.api.types.PermissionDeniedDetails";

/// Why a call failed, before it is judged as a [`ServerError`].
#[derive(Debug)]
pub(crate) enum CallError {
    /// A gRPC status (from the server or the transport).
    Status(Status),
    /// The server broke the protocol.
    Invalid(String),
}

impl From<Status> for CallError {
    fn from(s: Status) -> Self {
        Self::Status(s)
    }
}

/// `google.rpc.Status`, as carried in `grpc-status-details-bin`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RpcStatus {
    /// The status code.
    #[prost(int32, tag = "1")]
    pub(crate) code: i32,
    /// The message.
    #[prost(string, tag = "2")]
    pub(crate) message: String,
    /// Typed details.
    #[prost(message, repeated, tag = "3")]
    pub(crate) details: Vec<prost_types::Any>,
}

/// The reason in a `PermissionDenied` status's details; `Unknown` when there is none.
pub(crate) fn denied_reason(status: &Status) -> DeniedReason {
    let Ok(rpc) = RpcStatus::decode(status.details()) else {
        return DeniedReason::Unknown;
    };
    rpc.details
        .iter()
        .filter(|any| any.type_url == DENIED_DETAILS_TYPE)
        .find_map(|any| types::PermissionDeniedDetails::decode(any.value.as_slice()).ok())
        .map_or(DeniedReason::Unknown, |d| DeniedReason::from_i32(d.reason))
}

/// A status's message with the causes under it (a transport error's source chain), so a
/// failed connection says what failed (`connection refused`, the server's certificate...).
pub(crate) fn describe(status: &Status) -> String {
    let mut out = status.message().to_owned();
    let mut source = status.source();
    while let Some(e) = source {
        let s = e.to_string();
        // tonic's wrapper of a connector error adds nothing to it.
        if s != "transport error" && !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        source = e.source();
    }
    if out.is_empty() {
        out = format!("{:?}", status.code());
    }
    out
}

/// A status as the error of a call to the server at `address`.
pub(crate) fn server_error(status: &Status, address: &str) -> ServerError {
    match status.code() {
        Code::PermissionDenied => ServerError::PermissionDenied {
            reason: denied_reason(status),
            message: status.message().to_owned(),
        },
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ServerError::Unreachable {
            address: address.to_owned(),
            reason: describe(status),
        },
        // A transport failure without a status from the server (tonic reports those as
        // Unknown with the error as the source).
        Code::Unknown if status.source().is_some() => ServerError::Unreachable {
            address: address.to_owned(),
            reason: describe(status),
        },
        code => ServerError::Status {
            code,
            message: status.message().to_owned(),
        },
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A `PermissionDenied` as SPIRE sends it, with details.
    pub(crate) fn denied(reason: types::permission_denied_details::Reason, msg: &str) -> Status {
        let details = types::PermissionDeniedDetails {
            reason: reason as i32,
        };
        let rpc = RpcStatus {
            code: Code::PermissionDenied as i32,
            message: msg.to_owned(),
            details: vec![prost_types::Any {
                type_url: DENIED_DETAILS_TYPE.to_owned(),
                value: details.encode_to_vec(),
            }],
        };
        Status::with_details(Code::PermissionDenied, msg, rpc.encode_to_vec().into())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::denied;
    use super::*;
    use types::permission_denied_details::Reason;

    #[test]
    fn permission_denied_details_are_decoded() {
        for (r, want) in [
            (Reason::AgentExpired, DeniedReason::AgentExpired),
            (Reason::AgentNotAttested, DeniedReason::AgentNotAttested),
            (Reason::AgentNotActive, DeniedReason::AgentNotActive),
            (Reason::AgentBanned, DeniedReason::AgentBanned),
            (Reason::AgentMustReattest, DeniedReason::AgentMustReattest),
        ] {
            let s = denied(r, "agent is not authorized");
            assert_eq!(denied_reason(&s), want);
            match server_error(&s, "a:1") {
                ServerError::PermissionDenied { reason, message } => {
                    assert_eq!(reason, want);
                    assert_eq!(message, "agent is not authorized");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn statuses_without_or_with_bad_details_are_unknown() {
        assert_eq!(
            denied_reason(&Status::permission_denied("no")),
            DeniedReason::Unknown
        );
        let junk = Status::with_details(Code::PermissionDenied, "no", vec![0xff, 0xff].into());
        assert_eq!(denied_reason(&junk), DeniedReason::Unknown);
        // Another detail type is not read as ours.
        let rpc = RpcStatus {
            code: 7,
            message: "no".into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.DebugInfo".into(),
                value: types::PermissionDeniedDetails { reason: 4 }.encode_to_vec(),
            }],
        };
        let other = Status::with_details(Code::PermissionDenied, "no", rpc.encode_to_vec().into());
        assert_eq!(denied_reason(&other), DeniedReason::Unknown);
    }

    #[test]
    fn transport_failures_are_unreachable_and_other_codes_kept() {
        assert!(matches!(
            server_error(&Status::unavailable("connection refused"), "a:1"),
            ServerError::Unreachable { reason, .. } if reason.contains("connection refused")
        ));
        assert!(matches!(
            server_error(&Status::invalid_argument("bad"), "a:1"),
            ServerError::Status {
                code: Code::InvalidArgument,
                ..
            }
        ));
    }
}
