//! What operators see of a running agent: the facts `spiffed status` prints ([`Facts`]), the
//! readiness `/ready` answers, Prometheus metrics (`[metrics]`), HTTP health endpoints
//! (`[health]`) and systemd notifications (`NOTIFY_SOCKET`).
//!
//! Everything here reads state the stages keep anyway (counters, the SVID caches, the agent
//! mode status) when asked; the request path only feeds [`rpc::RpcMetrics`], and only when
//! metrics are on.

pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod notify;
pub(crate) mod rpc;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use spiffed_core::{EntryFeed, TrustDomain};
use spiffed_spire::status::Readiness;
use spiffed_workload_api::WorkloadApi;

use crate::agent::Backend;
use crate::limits::Shared;

/// The agent's version, as `spiffed --version` prints it.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything the status view, the health endpoints and the metrics read. Cheap to share.
pub(crate) struct Facts {
    pub(crate) started: SystemTime,
    started_at: Instant,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) socket_path: std::path::PathBuf,
    /// The configured SPIRE Server (agent mode).
    pub(crate) server_address: Option<String>,
    backend: Backend,
    api: WorkloadApi,
    feed: EntryFeed,
    /// The public socket serves (set once the server runs).
    serving: AtomicBool,
    /// The connection and stream counts of the public socket (set when serving starts).
    shared: OnceLock<Arc<Shared>>,
    /// RPC counts and latencies (`None`: metrics are off).
    pub(crate) rpc: Option<Arc<rpc::RpcMetrics>>,
    /// The soft descriptor limit (set when serving starts).
    pub(crate) max_fds: OnceLock<Option<u64>>,
}

impl std::fmt::Debug for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Facts")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// The CA (standalone) or agent SVID (agent mode) that everything served depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Validity {
    /// `"ca"` or `"agent_svid"`.
    pub(crate) kind: &'static str,
    /// notBefore, when known (the agent SVID's is not kept).
    pub(crate) not_before: Option<SystemTime>,
    /// notAfter, when known.
    pub(crate) not_after: Option<SystemTime>,
}

/// Agent mode's link to the SPIRE Server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AgentFacts {
    /// `serving`, `serving_from_cache` or `not_serving`.
    pub(crate) readiness: &'static str,
    /// Why not `serving`, if not.
    pub(crate) reason: String,
    pub(crate) agent_id: Option<String>,
    pub(crate) last_sync: Option<SystemTime>,
    pub(crate) server_address: String,
}

/// One consistent-enough reading of everything (`spiffed status`).
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub(crate) uptime: Duration,
    pub(crate) mode: &'static str,
    pub(crate) authority: Validity,
    pub(crate) entries: usize,
    pub(crate) svids_cached: usize,
    pub(crate) svid_earliest_expiry: Option<SystemTime>,
    pub(crate) x509_mints: u64,
    pub(crate) x509_rotations: u64,
    pub(crate) last_rotation: Option<SystemTime>,
    pub(crate) connections: usize,
    pub(crate) streams: usize,
    pub(crate) ready: Ready,
    pub(crate) agent: Option<AgentFacts>,
}

/// The answer of `/ready`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ready {
    pub(crate) ready: bool,
    /// Why (or why not), for people.
    pub(crate) reason: String,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Facts {
    pub(crate) fn new(
        cfg: &crate::config::Config,
        backend: Backend,
        api: WorkloadApi,
        feed: EntryFeed,
    ) -> Arc<Self> {
        Arc::new(Self {
            started: SystemTime::now(),
            started_at: Instant::now(),
            trust_domain: cfg.trust_domain.clone(),
            socket_path: cfg.socket_path.clone(),
            server_address: cfg.spire_server.as_ref().map(|s| s.address.to_string()),
            backend,
            api,
            feed,
            serving: AtomicBool::new(false),
            shared: OnceLock::new(),
            rpc: cfg
                .metrics
                .is_some()
                .then(|| Arc::new(rpc::RpcMetrics::default())),
            max_fds: OnceLock::new(),
        })
    }

    /// The public socket serves, with these counts.
    pub(crate) fn set_serving(&self, shared: Arc<Shared>, max_fds: Option<u64>) {
        let _ = self.shared.set(shared);
        let _ = self.max_fds.set(max_fds);
        self.serving.store(true, Ordering::Release);
    }

    /// The public socket stopped serving (shutdown).
    pub(crate) fn set_stopping(&self) {
        self.serving.store(false, Ordering::Release);
    }

    pub(crate) fn mode(&self) -> &'static str {
        match self.backend {
            Backend::Standalone(_) => "standalone",
            Backend::Agent { .. } => "agent",
        }
    }

    pub(crate) fn uptime(&self) -> Duration {
        self.started_at.elapsed()
    }

    /// Open connections and streams on the public socket.
    pub(crate) fn open_counts(&self) -> (usize, usize) {
        self.shared.get().map_or((0, 0), |s| s.open_counts())
    }

    /// Callers refused an identity, by reason.
    pub(crate) fn denials(&self) -> spiffed_workload_api::Denials {
        self.api.denials()
    }

    /// Registered entries served now.
    pub(crate) fn entries(&self) -> usize {
        self.feed.read().len()
    }

    /// The CA's (standalone) or the agent SVID's (agent mode) validity.
    pub(crate) fn authority(&self) -> Validity {
        match &self.backend {
            Backend::Standalone(ca) => {
                let v = ca.ca_validity();
                Validity {
                    kind: "ca",
                    not_before: v.map(|v| v.0),
                    not_after: v.map(|v| v.1),
                }
            }
            Backend::Agent { status, .. } => Validity {
                kind: "agent_svid",
                not_before: None,
                not_after: status.borrow().agent_svid_expires,
            },
        }
    }

    /// (cached X.509-SVIDs, the earliest notAfter among them, mints, rotations, last rotation).
    pub(crate) fn svids(&self) -> (usize, Option<SystemTime>, u64, u64, Option<SystemTime>) {
        match &self.backend {
            Backend::Standalone(ca) => {
                let s = ca.svid_stats();
                let (rotations, last) = ca.x509_rotations();
                (
                    s.cached,
                    s.earliest_expiry,
                    ca.x509_mints(),
                    rotations,
                    last,
                )
            }
            Backend::Agent { issuer, .. } => {
                let s = issuer.stats();
                let (rotations, last) = issuer.x509_rotations();
                (
                    s.cached,
                    s.earliest_expiry,
                    issuer.x509_mints(),
                    rotations,
                    last,
                )
            }
        }
    }

    /// Agent mode's link, if in agent mode.
    pub(crate) fn agent(&self) -> Option<AgentFacts> {
        let Backend::Agent { status, .. } = &self.backend else {
            return None;
        };
        let s = status.borrow();
        let (readiness, reason) = match &s.readiness {
            Readiness::Serving => ("serving", String::new()),
            Readiness::ServingFromCache { since, reason } => (
                "serving_from_cache",
                format!(
                    "the SPIRE Server has been unreachable since {}: {reason}",
                    rfc3339(*since)
                ),
            ),
            Readiness::NotServing { reason } => ("not_serving", reason.clone()),
        };
        Some(AgentFacts {
            readiness,
            reason,
            agent_id: s.agent_id.clone(),
            last_sync: s.last_sync,
            server_address: self.server_address.clone().unwrap_or_default(),
        })
    }

    /// Whether the agent is ready to serve identities, and why: the public socket serves, the
    /// CA (standalone) is valid now, and in agent mode the link says identities are served,
    /// from a recent sync or from a cache that is still valid (the same judgement as
    /// `spiffed healthcheck --output json` and the gRPC health service).
    pub(crate) fn ready(&self, now: SystemTime) -> Ready {
        let no = |reason: String| Ready {
            ready: false,
            reason,
        };
        if !self.serving.load(Ordering::Acquire) {
            return no("the Workload API socket is not serving (starting or stopping)".into());
        }
        match &self.backend {
            Backend::Standalone(ca) => match ca.ca_validity() {
                None => no("no CA is active; see the agent's log".into()),
                Some((_, not_after)) if not_after <= now => no(format!(
                    "the CA expired at {}; see the agent's log for why it was not rotated",
                    rfc3339(not_after)
                )),
                Some((not_before, _)) if not_before > now => no(format!(
                    "the CA is not valid before {} (is the clock behind?)",
                    rfc3339(not_before)
                )),
                Some((_, not_after)) => Ready {
                    ready: true,
                    reason: format!("serving; the CA is valid until {}", rfc3339(not_after)),
                },
            },
            Backend::Agent { status, .. } => {
                let s = status.borrow();
                match &s.readiness {
                    Readiness::NotServing { reason } => no(reason.clone()),
                    Readiness::ServingFromCache { since, reason } => Ready {
                        ready: true,
                        reason: format!(
                            "serving from the cache (still valid): the SPIRE Server has been \
                             unreachable since {}: {reason}",
                            rfc3339(*since)
                        ),
                    },
                    Readiness::Serving => match s.agent_svid_expires {
                        Some(t) if t <= now => no(format!(
                            "the agent SVID expired at {}; the agent must attest again",
                            rfc3339(t)
                        )),
                        expires => Ready {
                            ready: true,
                            reason: format!(
                                "serving; last sync with the SPIRE Server at {}{}",
                                s.last_sync.map_or_else(|| "(none yet)".into(), rfc3339),
                                expires.map_or_else(String::new, |t| format!(
                                    "; the agent SVID is valid until {}",
                                    rfc3339(t)
                                ))
                            ),
                        },
                    },
                }
            }
        }
    }

    /// Everything at once.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let now = SystemTime::now();
        let (svids_cached, svid_earliest_expiry, x509_mints, x509_rotations, last_rotation) =
            self.svids();
        let (connections, streams) = self.open_counts();
        Snapshot {
            uptime: self.uptime(),
            mode: self.mode(),
            authority: self.authority(),
            entries: self.entries(),
            svids_cached,
            svid_earliest_expiry,
            x509_mints,
            x509_rotations,
            last_rotation,
            connections,
            streams,
            ready: self.ready(now),
            agent: self.agent(),
        }
    }
}
