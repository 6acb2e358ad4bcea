//! `[health]`: HTTP `GET /live` (200 while the agent's runtime answers) and `GET /ready` (200
//! when [`Facts::ready`] says so, else 503), each with a JSON body that says why.

use std::sync::Arc;
use std::time::SystemTime;

use http::StatusCode;
use serde_json::json;

use super::Facts;
use super::http::{Answer, Handler};

/// The handler of the health endpoints.
pub(crate) fn handler(facts: Arc<Facts>) -> Handler {
    Arc::new(move |path| match path {
        "/live" => Some(Answer::json(
            StatusCode::OK,
            &json!({
                "status": "live",
                "version": super::VERSION,
                "uptime_seconds": facts.uptime().as_secs(),
            }),
        )),
        "/ready" => {
            let ready = facts.ready(SystemTime::now());
            let status = if ready.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = json!({
                "status": if ready.ready { "ready" } else { "not_ready" },
                "reason": ready.reason,
                "mode": facts.mode(),
            });
            if let Some(agent) = facts.agent() {
                body["readiness"] = json!(agent.readiness);
            }
            Some(Answer::json(status, &body))
        }
        _ => None,
    })
}
