//! What the agent reports about its link to the SPIRE Server.
//!
//! One [`Status`] on a watch, updated by the server link and the sync; logged on every change
//! and served to `spiffed healthcheck`.

use std::time::SystemTime;

use tokio::sync::watch;

/// Whether workloads are served, and from what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Identities are served, and the last sync with the server succeeded.
    Serving,
    /// Identities are served from the cache (what the last successful sync, or the persisted
    /// workload cache, holds) because the server has been unreachable since `since`.
    ServingFromCache {
        /// When the server was last reached (or when the agent started, if never).
        since: SystemTime,
        /// The last error.
        reason: String,
    },
    /// No identities are served; `reason` says why and what to do (no cache and no server
    /// yet, the agent was banned, its join token was refused...).
    NotServing {
        /// Why, with the fix.
        reason: String,
    },
}

/// The agent-mode status: readiness plus the facts an operator asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Whether workloads are served.
    pub readiness: Readiness,
    /// The agent's SPIFFE ID once attested.
    pub agent_id: Option<String>,
    /// When the agent SVID expires.
    pub agent_svid_expires: Option<SystemTime>,
    /// When the last sync with the server succeeded.
    pub last_sync: Option<SystemTime>,
}

impl Status {
    /// The status before anything is known.
    pub fn starting() -> Self {
        Self {
            readiness: Readiness::NotServing {
                reason: "starting: not attested to the SPIRE Server yet".to_owned(),
            },
            agent_id: None,
            agent_svid_expires: None,
            last_sync: None,
        }
    }
}

/// The writing end, shared by the server link and the sync.
#[derive(Clone, Debug)]
pub struct StatusHandle {
    tx: watch::Sender<Status>,
}

impl StatusHandle {
    /// A handle and a receiver of the status.
    pub fn new() -> (Self, watch::Receiver<Status>) {
        let (tx, rx) = watch::channel(Status::starting());
        (Self { tx }, rx)
    }

    /// Changes the status with `f`, logging a readiness change at info (serving) or warn.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        self.tx.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            if s.readiness != before.readiness {
                match &s.readiness {
                    Readiness::Serving => tracing::info!("agent mode: serving identities"),
                    Readiness::ServingFromCache { reason, .. } => tracing::warn!(
                        %reason,
                        "agent mode: the SPIRE Server is unreachable; serving identities from \
                         the cache until they expire, retrying the server"
                    ),
                    Readiness::NotServing { reason } => {
                        tracing::warn!(%reason, "agent mode: not serving identities");
                    }
                }
            }
            *s != before
        });
    }

    /// A receiver of the status.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.tx.subscribe()
    }

    /// The status now.
    pub fn get(&self) -> Status {
        self.tx.borrow().clone()
    }
}
