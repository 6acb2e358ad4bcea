//! Agent mode's part of the agent: the SPIRE Server link, the issuer and the entry sync
//! (`spiffed-spire`) wired to the seams the Workload API and the admin API use.
//!
//! Order at start: load the agent state and the workload cache, publish the cached entries,
//! then the socket opens (the caller binds it) and the tasks start: the link attests (or uses
//! the stored agent SVID) and keeps it rotated, the sync pulls bundles and entries, the issuer
//! mints and rotates workload SVIDs. A server that cannot be reached never stops the agent: the
//! cached identities are served until they expire, and the status says so.

use std::sync::Arc;
use std::time::SystemTime;

use spiffed_core::{EntryLimits, Selector, SelectorCheck, SelectorError};
use spiffed_entries::{EntrySources, Rules, SourceHandle};
use spiffed_spire::config::SpireConfig;
use spiffed_spire::status::{Readiness, Status, StatusHandle};
use spiffed_spire::{EntrySync, IssuerConfig, ServerLink, SpireIssuer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::AgentError;
use crate::config::Config;

/// The name of the entry source (shown by `spiffed entry list`).
const SOURCE: &str = "spire-server";

/// Selectors of entries synced from the server are the server's business: any well-formed
/// `type:key:value` is kept (an entry with a type no local attestor derives, e.g. `k8s:` or a
/// node's `spiffe_id:`, simply never matches a workload here, as with spire-agent).
struct ServerSelectors;

impl SelectorCheck for ServerSelectors {
    fn check(&self, _selector: &Selector) -> Result<(), SelectorError> {
        Ok(())
    }
}

/// Agent mode, opened and not yet running.
pub(crate) struct AgentMode {
    pub(crate) spire: SpireConfig,
    pub(crate) link: ServerLink,
    pub(crate) issuer: SpireIssuer,
    source: SourceHandle,
    rules: Rules,
    pub(crate) status: StatusHandle,
    pub(crate) status_rx: watch::Receiver<Status>,
}

/// Opens agent mode: the link (agent state, bootstrap bundle, node attestor files), the issuer
/// (the workload cache) and the entry sources (no store; the server's entries only), and
/// publishes the cached entries so that the socket serves them as soon as it opens.
pub(crate) fn open(
    cfg: &Config,
    spire: &SpireConfig,
) -> Result<(AgentMode, EntrySources), AgentError> {
    let rules = Rules {
        trust_domain: cfg.trust_domain.clone(),
        // The server checked its entries; the local limits are for entries written here.
        limits: EntryLimits {
            max_selectors: usize::MAX,
            max_dns_names: usize::MAX,
            min_svid_ttl: std::time::Duration::ZERO,
            ca_ttl: spiffed_core::MAX_TTL,
        },
        selectors: Arc::new(ServerSelectors),
    };
    let (sources, source) = EntrySources::synced(
        rules.clone(),
        SOURCE,
        format!("the SPIRE Server at {}", spire.address),
        "entries are managed on the SPIRE Server: change them there with `spire-server entry \
         create|update|delete` (this agent syncs them every sync_interval)",
    );
    let (status, status_rx) = StatusHandle::new();
    let link = ServerLink::new(
        spire.clone(),
        cfg.trust_domain.clone(),
        cfg.data_dir.clone(),
        status.clone(),
    )
    .map_err(|e| AgentError::AgentMode(e.to_string()))?;
    let mut issuer_cfg = IssuerConfig::new(cfg.trust_domain.clone(), cfg.data_dir.clone());
    issuer_cfg.prefetch_max = cfg.premint_entries;
    let issuer = SpireIssuer::open(Arc::new(link.clone()), issuer_cfg)
        .map_err(|e| AgentError::AgentMode(e.to_string()))?;
    let cached = issuer
        .publish_cached(&source, &rules)
        .map_err(|e| AgentError::AgentMode(e.to_string()))?;
    if issuer.has_valid_svids() {
        tracing::info!(
            entries = cached,
            cache = %issuer.cache_file().display(),
            "serving the cached identities while the SPIRE Server is contacted"
        );
        status.update(|s| {
            s.readiness = Readiness::ServingFromCache {
                since: SystemTime::now(),
                reason: "starting: the SPIRE Server has not answered yet".to_owned(),
            };
        });
    }
    Ok((
        AgentMode {
            spire: spire.clone(),
            link,
            issuer,
            source,
            rules,
            status,
            status_rx,
        },
        sources,
    ))
}

impl AgentMode {
    /// Starts the link, the issuer, the sync and the ban watch; they end when `stop` turns
    /// true.
    pub(crate) fn spawn(self, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let Self {
            spire,
            link,
            issuer,
            source,
            rules,
            status,
            status_rx,
        } = self;
        let trusting = link.clone();
        let sync = EntrySync::new(
            Arc::new(link.clone()),
            issuer.clone(),
            source,
            rules,
            status,
            spire.sync_interval,
        )
        .wake_on_attestation(link.attestation())
        .on_bundle(Box::new(move |bundle| {
            if let Err(e) = trusting.set_bundle(bundle) {
                tracing::warn!(error = %e, "the server link keeps its previous trust bundle");
            }
        }));
        let bans = {
            let link = link.clone();
            let issuer = issuer.clone();
            let mut rx = status_rx;
            let mut stop = stop.clone();
            async move {
                loop {
                    let banned = link.is_banned();
                    match (banned, issuer.cleared().is_some()) {
                        (true, false) => {
                            let reason = match &rx.borrow().readiness {
                                Readiness::NotServing { reason } => reason.clone(),
                                _ => "the agent was banned on the SPIRE Server".to_owned(),
                            };
                            issuer.clear(reason);
                        }
                        (false, true) => issuer.resume(),
                        _ => {}
                    }
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { return },
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        };
        vec![
            tokio::spawn(link.run(stop.clone())),
            tokio::spawn(issuer.run(stop.clone())),
            tokio::spawn(sync.run(stop)),
            tokio::spawn(bans),
        ]
    }
}
