//! `spiffed healthcheck`: the standard gRPC health service (`grpc.health.v1.Health/Check`,
//! service `""`) over the Workload API socket.
//!
//! The check attests nothing and fetches no identity, so it leaves no "no identity issued" in
//! the agent's logs.

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{ClientError, SocketAddress, api_request, connect_channel};

/// What the health service said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HealthOutcome {
    /// `SERVING`.
    Serving,
    /// Any other status, by its name (`NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN`).
    NotServing(&'static str),
    /// The server does not offer the health service: it is not spiffed, or too old.
    NoHealthService,
    /// The health call failed with another gRPC status.
    CallFailed(String),
}

impl HealthOutcome {
    /// Whether the agent serves.
    pub(crate) fn is_serving(&self) -> bool {
        *self == Self::Serving
    }

    /// A sentence for stderr when the agent does not serve.
    pub(crate) fn describe(&self, addr: &SocketAddress) -> String {
        let path = addr.path.display();
        match self {
            Self::Serving => format!("spiffed is serving on {path}"),
            Self::NotServing(status) => format!("the agent on {path} reports {status}"),
            Self::NoHealthService => format!(
                "the server on {path} does not offer the gRPC health service \
                 (grpc.health.v1.Health): is it spiffed?"
            ),
            Self::CallFailed(why) => format!("health check on {path} failed: {why}"),
        }
    }

    /// `{"serving":bool,"socket":PATH,"status":...}`.
    pub(crate) fn to_json(&self, addr: &SocketAddress) -> serde_json::Value {
        let status = match self {
            Self::Serving => "SERVING".to_owned(),
            Self::NotServing(status) => (*status).to_owned(),
            Self::NoHealthService => "UNIMPLEMENTED".to_owned(),
            Self::CallFailed(why) => why.clone(),
        };
        serde_json::json!({
            "serving": self.is_serving(),
            "socket": addr.path.display().to_string(),
            "status": status,
        })
    }
}

/// The JSON for a check that could not run at all.
pub(crate) fn failure_json(addr: &SocketAddress, err: &ClientError) -> serde_json::Value {
    serde_json::json!({
        "serving": false,
        "socket": addr.path.display().to_string(),
        "status": err.to_string(),
    })
}

/// Calls `grpc.health.v1.Health/Check` for the whole server on the socket. The caller bounds
/// the time it takes.
pub(crate) async fn check(addr: &SocketAddress) -> Result<HealthOutcome, ClientError> {
    let mut client = HealthClient::new(connect_channel(addr).await?);
    let request = api_request(HealthCheckRequest {
        service: String::new(),
    });
    match client.check(request).await {
        Ok(response) => Ok(
            match ServingStatus::try_from(response.into_inner().status) {
                Ok(ServingStatus::Serving) => HealthOutcome::Serving,
                Ok(other) => HealthOutcome::NotServing(other.as_str_name()),
                Err(_) => HealthOutcome::NotServing("UNKNOWN"),
            },
        ),
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            Ok(HealthOutcome::NoHealthService)
        }
        Err(status) => Ok(HealthOutcome::CallFailed(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}
