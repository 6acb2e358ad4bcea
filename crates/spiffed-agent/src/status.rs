//! `spiffed.status.v1.AgentStatus` on the Workload API socket: the agent's mode and whether it
//! serves identities (in agent mode: from the SPIRE Server, from its cache, or not at all and
//! why), for `spiffed healthcheck`. Public information only: it attests nothing.

use std::time::SystemTime;

use spiffed_proto::status::agent_status_server::{AgentStatus, AgentStatusServer};
use spiffed_proto::status::{GetStatusRequest, GetStatusResponse};
use spiffed_spire::status::{Readiness, Status as SpireStatus};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Where the answer comes from.
#[derive(Clone)]
pub(crate) enum StatusService {
    /// The agent is its own CA: it serves whenever it runs.
    Standalone,
    /// Agent mode: the server link's status.
    Agent {
        /// The link's status.
        status: watch::Receiver<SpireStatus>,
        /// The configured server address.
        address: String,
    },
}

impl StatusService {
    pub(crate) fn into_server(self) -> AgentStatusServer<Self> {
        AgentStatusServer::new(self)
    }
}

fn secs(t: Option<SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The response for a status.
pub(crate) fn response(status: &SpireStatus, address: &str) -> GetStatusResponse {
    let (readiness, reason, since) = match &status.readiness {
        Readiness::Serving => ("serving", String::new(), None),
        Readiness::ServingFromCache { since, reason } => {
            ("serving_from_cache", reason.clone(), Some(*since))
        }
        Readiness::NotServing { reason } => ("not_serving", reason.clone(), None),
    };
    GetStatusResponse {
        mode: "agent".to_owned(),
        readiness: readiness.to_owned(),
        reason,
        unreachable_since: secs(since),
        agent_id: status.agent_id.clone().unwrap_or_default(),
        agent_svid_expires_at: secs(status.agent_svid_expires),
        last_sync: secs(status.last_sync),
        server_address: address.to_owned(),
    }
}

#[tonic::async_trait]
impl AgentStatus for StatusService {
    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        Ok(Response::new(match self {
            Self::Standalone => GetStatusResponse {
                mode: "standalone".to_owned(),
                readiness: "serving".to_owned(),
                ..Default::default()
            },
            Self::Agent { status, address } => response(&status.borrow(), address),
        }))
    }
}
