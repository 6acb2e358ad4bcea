//! The entry and bundle sync with the SPIRE Server ([`EntrySync`]).
//!
//! Every `interval` (±10 % jitter; at once at start), one round:
//! 1. `GetBundle`: the trust domain's bundle goes to the issuer (and to the optional hook, so
//!    the server link trusts the new authorities too);
//! 2. the authorized entries, diffed against the versions held (`ServerApi::authorized_entries`):
//!    each new or changed entry is converted and checked against the agent's rules (one that
//!    fails is left out with a warning, once per entry version, never the whole sync), and the
//!    difference is published through the entry source; entries no longer authorized are
//!    removed;
//! 3. `GetFederatedBundle` for every trust domain a synced entry federates with (`NotFound` is a
//!    warning); bundles no longer referenced are dropped;
//! 4. the issuer re-mints what became stale.
//!
//! A failed round backs off ×1.5 up to min(8 min, 48 × interval), but never waits longer than
//! the interval while no cached SVID is valid. The status says Serving after a good round,
//! ServingFromCache while cached SVIDs are still valid, NotServing when nothing is.
//! [`ServerError::NotAttested`] (the link has not attested yet) keeps the status and retries at
//! the interval, or as soon as the link says it attested ([`EntrySync::wake_on_attestation`]),
//! so a freshly attested agent does not wait a whole interval for its first entries.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffed_authority::{Clock, SystemClock};
use spiffed_core::{Entry, EntryId, Selector, SpiffeId, TrustDomain};
use spiffed_entries::{Rules, SourceError, SourceHandle};
use spiffed_proto::spire::types;
use tokio::sync::watch;

use crate::issuer::{BundleError, SpireIssuer, jittered};
use crate::server::{EntryVersion, ServerApi, ServerError};
use crate::status::{Readiness, StatusHandle};

/// Longest wait between rounds after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(8 * 60);
/// Federated bundles fetched at once.
const FEDERATED_WORKERS: usize = 10;

/// Called with the trust domain's bundle after every successful `GetBundle`.
pub type BundleHook = Box<dyn Fn(&types::Bundle) + Send + Sync>;

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// A call to the server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The server's bundle is not usable.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The entries could not be published (the agent is stopping).
    #[error("publishing the synced entries failed: {0}")]
    Entries(#[from] SourceError),
}

/// What one successful round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries added or changed (accepted).
    pub changed: usize,
    /// Entries removed (deleted on the server, or no longer accepted).
    pub removed: usize,
    /// Entries left out because they break a rule of the agent.
    pub refused: usize,
    /// Federated bundles held after the round.
    pub federated: usize,
}

/// A SPIRE Server entry as the agent's [`Entry`]: the id verbatim, selectors `type:value`, the
/// hint, `federates_with`, `admin` and `downstream` kept; TTLs and DNS names are left empty
/// (the server applies them when it signs).
pub fn convert_entry(e: &types::Entry) -> Result<Entry, String> {
    if e.id.is_empty() {
        return Err("the entry has no id".into());
    }
    let sid = e.spiffe_id.as_ref().ok_or("the entry has no SPIFFE ID")?;
    // A path must start with `/`: "example.org" + "x" would read as trust domain example.orgx.
    if !sid.path.is_empty() && !sid.path.starts_with('/') {
        return Err(format!(
            "its SPIFFE ID path {:?} does not start with /",
            spiffed_core::untrusted::clip(&sid.path)
        ));
    }
    let id = format!("spiffe://{}{}", sid.trust_domain, sid.path);
    let spiffe_id = SpiffeId::new(&id).map_err(|err| {
        format!(
            "its SPIFFE ID {:?} is not valid: {err}",
            spiffed_core::untrusted::clip(&id)
        )
    })?;
    // The two parts must read back as themselves ("example/org" + "" is not example.org/...).
    if spiffe_id.trust_domain().as_str() != sid.trust_domain.to_ascii_lowercase()
        || spiffe_id.path() != sid.path
    {
        return Err(format!(
            "its SPIFFE ID parts (trust domain {:?}, path {:?}) do not form a SPIFFE ID",
            spiffed_core::untrusted::clip(&sid.trust_domain),
            spiffed_core::untrusted::clip(&sid.path)
        ));
    }
    let mut selectors = e
        .selectors
        .iter()
        .map(|s| Selector::new(&s.r#type, &s.value).map_err(|err| err.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    selectors.sort();
    selectors.dedup();
    let federates_with = e
        .federates_with
        .iter()
        .map(|t| {
            TrustDomain::new(t).map_err(|err| {
                format!(
                    "federates_with {:?} is not a trust domain: {err}",
                    spiffed_core::untrusted::clip(t)
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Entry {
        id: EntryId::new(&e.id),
        spiffe_id,
        selectors,
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: (!e.hint.is_empty()).then(|| e.hint.clone()),
        dns_names: Vec::new(),
        federates_with,
        admin: e.admin,
        downstream: e.downstream,
    })
}

/// The entry and bundle sync (see the module docs).
pub struct EntrySync {
    api: Arc<dyn ServerApi>,
    issuer: SpireIssuer,
    entries: SourceHandle,
    rules: Rules,
    status: StatusHandle,
    interval: Duration,
    on_bundle: Option<BundleHook>,
    clock: Arc<dyn Clock>,
    /// The version of every entry the server sent, accepted or not (what the next diff is
    /// against).
    versions: HashMap<String, EntryVersion>,
    /// Entries left out, at the version that was warned about.
    refused: HashMap<String, EntryVersion>,
    /// Federated trust domains the server had no bundle for (warned once).
    missing: HashSet<TrustDomain>,
    started: SystemTime,
    /// True once the server link has an agent SVID.
    attested: Option<watch::Receiver<bool>>,
}

impl std::fmt::Debug for EntrySync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntrySync")
            .field("interval", &self.interval)
            .field("entries", &self.versions.len())
            .finish_non_exhaustive()
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl EntrySync {
    /// A sync of `api` into `issuer` and `entries` (the agent-mode entry source of
    /// `spiffed_entries::EntrySources::synced`), checking entries with `rules`, reporting in
    /// `status`, every `interval`.
    pub fn new(
        api: Arc<dyn ServerApi>,
        issuer: SpireIssuer,
        entries: SourceHandle,
        rules: Rules,
        status: StatusHandle,
        interval: Duration,
    ) -> Self {
        Self::with_clock(
            api,
            issuer,
            entries,
            rules,
            status,
            interval,
            Arc::new(SystemClock),
        )
    }

    /// [`EntrySync::new`] with the time read from `clock`.
    pub fn with_clock(
        api: Arc<dyn ServerApi>,
        issuer: SpireIssuer,
        entries: SourceHandle,
        rules: Rules,
        status: StatusHandle,
        interval: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let started = clock.now();
        Self {
            api,
            issuer,
            entries,
            rules,
            status,
            interval: interval.max(Duration::from_millis(100)),
            on_bundle: None,
            clock,
            versions: HashMap::new(),
            refused: HashMap::new(),
            missing: HashSet::new(),
            started,
            attested: None,
        }
    }

    /// Calls `hook` with the trust domain's bundle after every successful `GetBundle` (the
    /// server link trusts its new authorities).
    #[must_use]
    pub fn on_bundle(mut self, hook: BundleHook) -> Self {
        self.on_bundle = Some(hook);
        self
    }

    /// A round refused because the agent is not attested yet is retried as soon as `attested`
    /// announces an agent SVID (the server link sends `true` on every SVID it installs), not
    /// an interval later.
    #[must_use]
    pub fn wake_on_attestation(mut self, attested: watch::Receiver<bool>) -> Self {
        self.attested = Some(attested);
        self
    }

    /// Syncs every interval until `stop` becomes true (or its sender is dropped).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let cap = MAX_BACKOFF.min(self.interval.saturating_mul(48));
        let mut delay = self.interval;
        let mut attested = self.attested.take();
        loop {
            if *stop.borrow() || stop.has_changed().is_err() {
                return;
            }
            let mut awaiting_attestation = false;
            if let Some(rx) = attested.as_mut() {
                // What the link announced so far is seen: only a new SVID installed after
                // this point wakes a round that was refused for want of one.
                rx.borrow_and_update();
            }
            let round = tokio::select! {
                r = self.sync_once() => r,
                () = stopped(&mut stop) => return,
            };
            match round {
                Ok(report) => {
                    tracing::debug!(?report, "synced with the SPIRE Server");
                    self.succeeded();
                    delay = self.interval;
                }
                Err(SyncError::Server(ServerError::NotAttested(why))) => {
                    tracing::debug!(%why, "not syncing yet: the agent is not attested");
                    delay = self.interval;
                    awaiting_attestation = true;
                }
                Err(e) => {
                    delay = delay.mul_f64(1.5).min(cap);
                    if !self.issuer.has_valid_svids() {
                        delay = delay.min(self.interval);
                    }
                    self.failed(&e, delay);
                }
            }
            let attestation = async {
                match attested.as_mut() {
                    Some(rx) if awaiting_attestation => loop {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                        if *rx.borrow_and_update() {
                            break;
                        }
                    },
                    _ => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(jittered(delay)) => {}
                () = attestation => {}
                () = stopped(&mut stop) => return,
            }
        }
    }

    fn succeeded(&self) {
        let now = self.clock.now();
        let cleared = self.issuer.cleared().is_some();
        self.status.update(|s| {
            s.last_sync = Some(now);
            if !cleared {
                s.readiness = Readiness::Serving;
            }
        });
    }

    fn failed(&self, e: &SyncError, retry_in: Duration) {
        if self.issuer.cleared().is_some() {
            return;
        }
        let valid = self.issuer.has_valid_svids();
        let started = self.started;
        self.status.update(|s| {
            let since = match &s.readiness {
                Readiness::ServingFromCache { since, .. } => *since,
                _ => s.last_sync.unwrap_or(started),
            };
            s.readiness = if valid {
                Readiness::ServingFromCache {
                    since,
                    reason: e.to_string(),
                }
            } else {
                Readiness::NotServing {
                    reason: format!(
                        "{e}; no cached identity is valid; retrying the SPIRE Server every {}s",
                        retry_in.as_secs().max(1)
                    ),
                }
            };
        });
    }

    /// One round (see the module docs).
    pub async fn sync_once(&mut self) -> Result<SyncReport, SyncError> {
        let bundle = self.api.get_bundle().await?;
        self.issuer.set_own_bundle(&bundle)?;
        if let Some(hook) = &self.on_bundle {
            hook(&bundle);
        }
        let mut report = SyncReport::default();
        self.entries(&mut report).await?;
        self.federated(&mut report).await;
        Ok(report)
    }

    async fn entries(&mut self, report: &mut SyncReport) -> Result<(), SyncError> {
        let got = self.api.authorized_entries(&self.versions).await?;
        let mut authorized: HashSet<String> = got.authorized.into_iter().collect();
        authorized.extend(got.changed.iter().map(|e| e.id.clone()));
        let mut upserts = Vec::new();
        let mut removes = Vec::new();
        for e in got.changed {
            if e.id.is_empty() {
                tracing::warn!("the SPIRE Server sent an entry without an id; leaving it out");
                continue;
            }
            let version = EntryVersion::of(&e);
            self.versions.insert(e.id.clone(), version);
            if e.store_svid {
                // For SVIDStore plugins, not for workloads (as spire-agent).
                tracing::debug!(entry = %e.id, "leaving out an entry with store_svid");
                removes.push(EntryId::new(&e.id));
                continue;
            }
            let checked = convert_entry(&e)
                .and_then(|entry| self.rules.check(entry).map_err(|err| err.to_string()));
            match checked {
                Ok(entry) => {
                    self.refused.remove(&e.id);
                    upserts.push((entry, version));
                }
                Err(why) => {
                    report.refused += 1;
                    if self.refused.insert(e.id.clone(), version) != Some(version) {
                        tracing::warn!(
                            entry = %spiffed_core::untrusted::clip(&e.id),
                            %why,
                            "leaving an entry of the SPIRE Server out: workloads do not get \
                             it until it is fixed on the server (or the agent serves its \
                             selector type)"
                        );
                    }
                    removes.push(EntryId::new(&e.id));
                }
            }
        }
        self.versions.retain(|id, _| authorized.contains(id));
        self.refused.retain(|id, _| authorized.contains(id));
        let gone: Vec<EntryId> = self
            .issuer
            .entry_ids()
            .into_iter()
            .filter(|id| !authorized.contains(id.as_str()))
            .collect();
        report.removed = gone.len();
        removes.extend(gone);
        report.changed = upserts.len();
        self.issuer.apply_entries(&self.entries, upserts, removes)?;
        Ok(())
    }

    async fn federated(&mut self, report: &mut SyncReport) {
        let wanted = self.issuer.federated_domains();
        let mut keep: BTreeSet<TrustDomain> = BTreeSet::new();
        let mut pending = wanted.clone().into_iter();
        let mut set = tokio::task::JoinSet::new();
        loop {
            while set.len() < FEDERATED_WORKERS {
                let Some(td) = pending.next() else { break };
                let api = self.api.clone();
                set.spawn(async move {
                    let r = api.get_federated_bundle(td.as_str()).await;
                    (td, r)
                });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let Ok((td, r)) = joined else { continue };
            match r {
                Ok(Some(b)) => {
                    self.missing.remove(&td);
                    match self.issuer.set_federated(&td, &b) {
                        Ok(()) => {
                            keep.insert(td);
                        }
                        Err(e) => {
                            tracing::warn!(trust_domain = %td, error = %e, "keeping the previous federated bundle");
                            keep.insert(td);
                        }
                    }
                }
                Ok(None) => {
                    if self.missing.insert(td.clone()) {
                        tracing::warn!(
                            trust_domain = %td,
                            "the SPIRE Server has no bundle for a trust domain that entries \
                             federate with; workloads get none until it is set on the server"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(trust_domain = %td, error = %e, "fetching a federated bundle failed; keeping the one held");
                    keep.insert(td);
                }
            }
        }
        for td in self.issuer.retain_federated(&keep) {
            tracing::info!(trust_domain = %td, "dropped a federated bundle no entry needs");
        }
        self.missing.retain(|td| wanted.contains(td));
        report.federated = self.issuer.federated_now().len();
    }
}
