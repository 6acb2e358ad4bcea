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

/// What `spiffed.status.v1.AgentStatus/GetStatus` said; `None` from an agent without it.
pub(crate) type AgentReport = Option<spiffed_proto::status::GetStatusResponse>;

/// Asks the agent's status service for its mode and readiness (agent mode: serving from the
/// SPIRE Server, from the cache, or not serving and why). An agent without the service (an
/// older spiffed, another Workload API server) gives `None`.
pub(crate) async fn agent_report(addr: &SocketAddress) -> AgentReport {
    let mut client = spiffed_proto::status::agent_status_client::AgentStatusClient::new(
        connect_channel(addr).await.ok()?,
    );
    client
        .get_status(api_request(spiffed_proto::status::GetStatusRequest {}))
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// Whether the report says identities are not served (agent mode, with the reason).
pub(crate) fn report_blocks(report: &AgentReport) -> Option<&str> {
    report
        .as_ref()
        .filter(|r| r.readiness == "not_serving")
        .map(|r| r.reason.as_str())
}

/// A sentence about the report, if it says more than "serving".
pub(crate) fn describe_report(report: &AgentReport) -> Option<String> {
    let r = report.as_ref()?;
    match r.readiness.as_str() {
        "serving_from_cache" => Some(format!(
            "serving identities from its cache: the SPIRE Server {} has been unreachable since \
             {} ({})",
            r.server_address,
            unix_time(r.unreachable_since),
            r.reason
        )),
        "not_serving" => Some(format!("not serving identities: {}", r.reason)),
        _ => None,
    }
}

fn unix_time(secs: i64) -> String {
    u64::try_from(secs)
        .ok()
        .filter(|&s| s > 0)
        .map(|s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        })
        .unwrap_or_else(|| "start-up".to_owned())
}

/// The report's fields for `--output json` (added to the health JSON).
pub(crate) fn report_json(report: &AgentReport, json: &mut serde_json::Value) {
    let (Some(r), Some(obj)) = (report, json.as_object_mut()) else {
        return;
    };
    obj.insert("mode".into(), r.mode.clone().into());
    obj.insert("readiness".into(), r.readiness.clone().into());
    if !r.reason.is_empty() {
        obj.insert("reason".into(), r.reason.clone().into());
    }
    if r.mode == "agent" {
        obj.insert("server_address".into(), r.server_address.clone().into());
        obj.insert("agent_id".into(), r.agent_id.clone().into());
        for (key, secs) in [
            ("unreachable_since", r.unreachable_since),
            ("last_sync", r.last_sync),
            ("agent_svid_expires_at", r.agent_svid_expires_at),
        ] {
            if secs > 0 {
                obj.insert(key.into(), unix_time(secs).into());
            }
        }
    }
    if report_blocks(report).is_some() {
        obj.insert("serving".into(), false.into());
    }
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
