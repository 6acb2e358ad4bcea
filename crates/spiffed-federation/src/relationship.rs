//! Federation relationships: keeping a foreign trust domain's bundle fresh from its bundle
//! endpoint, as SPIRE Server's bundle client does.
//!
//! One task per `[[federation.trust_domains]]`: fetch, parse as that trust domain's SPIFFE
//! bundle, and when it differs from the bundle held, store it (which publishes it to every
//! workload at once). The last good bundle is kept whatever goes wrong: an unreachable or slow
//! peer, garbage, another trust domain's bundle, a body past the limit, a certificate that does
//! not verify. Each failure is logged with its reason.
//!
//! When: a quarter of the bundle's refresh hint (at least [`MINIMUM_REFRESH_HINT`]), or of
//! [`DEFAULT_REFRESH_HINT`] for a bundle without one, so that a peer's rotation is seen several
//! times within the period it announced (SPIRE's rule); a relationship may set a fixed
//! `refresh_interval` instead.

use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use spiffed_core::TrustDomain;
use spiffed_core::spiffe_bundle::SpiffeBundle;
use tokio::sync::watch;

use crate::fetch::{EndpointUrl, FetchLimits, Profile, fetch};
use crate::tls::anchors;

/// The smallest refresh hint honoured (SPIRE's `MinimumRefreshHint`).
pub const MINIMUM_REFRESH_HINT: Duration = Duration::from_secs(60);
/// The refresh hint assumed for a bundle that has none (SPIRE's `defaultRefreshInterval`).
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);
/// Fetches per refresh hint period (SPIRE's `attemptsPerRefreshHint`).
pub const ATTEMPTS_PER_REFRESH_HINT: u32 = 4;

/// How the peer's endpoint authenticates.
#[derive(Clone, Debug)]
pub enum EndpointProfile {
    /// `https_spiffe`: the endpoint's SVID must have exactly this ID and chain to the bundle
    /// held for the ID's trust domain.
    HttpsSpiffe {
        /// `endpoint_spiffe_id`.
        endpoint_id: spiffed_core::SpiffeId,
    },
    /// `https_web`: Web PKI.
    HttpsWeb {
        /// The host's roots plus any configured.
        roots: Arc<RootCertStore>,
    },
}

/// One federation relationship.
#[derive(Clone, Debug)]
pub struct Relationship {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint.
    pub url: EndpointUrl,
    /// How the endpoint authenticates.
    pub profile: EndpointProfile,
    /// Deadline and body limit of each fetch.
    pub limits: FetchLimits,
    /// A fixed interval between fetches instead of the refresh hint's rule.
    pub refresh_interval: Option<Duration>,
}

/// Where federated bundles are kept and published (the agent's bundle store).
#[async_trait::async_trait]
pub trait FederatedBundles: Send + Sync + 'static {
    /// The bundle held for `td`, if any.
    async fn get(&self, td: &TrustDomain) -> Option<SpiffeBundle>;
    /// Stores `bundle` (fetched from `url`) and publishes it to workloads. An error keeps the
    /// previous one.
    async fn put(&self, bundle: SpiffeBundle, url: &str) -> Result<(), String>;
}

/// What one refresh did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// A new bundle was stored and published.
    Updated(SpiffeBundle),
    /// The endpoint served the bundle already held.
    Unchanged,
    /// Nothing changed; why.
    Failed(String),
}

/// When to fetch again after holding `held` (SPIRE's rule, or the fixed interval).
pub fn next_refresh(held: Option<&SpiffeBundle>, fixed: Option<Duration>) -> Duration {
    if let Some(f) = fixed {
        return f;
    }
    let hint = held
        .and_then(|b| b.refresh_hint)
        .filter(|h| !h.is_zero())
        .unwrap_or(DEFAULT_REFRESH_HINT)
        .max(MINIMUM_REFRESH_HINT);
    hint / ATTEMPTS_PER_REFRESH_HINT
}

/// The client profile for `rel` now: for `https_spiffe`, the X.509 authorities of the bundle
/// held for the endpoint ID's trust domain (`held`, the relationship's own, when it is that).
async fn profile(
    rel: &Relationship,
    held: Option<&SpiffeBundle>,
    store: &dyn FederatedBundles,
) -> Result<Profile, String> {
    match &rel.profile {
        EndpointProfile::HttpsWeb { roots } => Ok(Profile::HttpsWeb {
            roots: roots.clone(),
        }),
        EndpointProfile::HttpsSpiffe { endpoint_id } => {
            let td = endpoint_id.trust_domain();
            let other;
            let held = if td == &rel.trust_domain {
                held
            } else {
                other = store.get(td).await;
                other.as_ref()
            };
            let held = held.ok_or_else(|| {
                format!(
                    "no bundle of {td} is held to authenticate the endpoint {endpoint_id} \
                     (https_spiffe): give the relationship a bootstrap bundle \
                     (bundle_path) or set one with `spiffed bundle set --trust-domain {td}`"
                )
            })?;
            let anchors = anchors(&held.x509_authorities).map_err(|e| {
                format!("the bundle held for {td} cannot authenticate the endpoint: {e}")
            })?;
            Ok(Profile::HttpsSpiffe {
                trust_domain: td.to_string(),
                endpoint_id: endpoint_id.to_string(),
                anchors,
            })
        }
    }
}

/// Fetches the peer's bundle once and stores it if it changed.
pub async fn refresh_once(rel: &Relationship, store: &dyn FederatedBundles) -> Refreshed {
    refresh(rel, store).await.0
}

/// [`refresh_once`], with the bundle held afterwards (the store is read once per refresh).
async fn refresh(
    rel: &Relationship,
    store: &dyn FederatedBundles,
) -> (Refreshed, Option<SpiffeBundle>) {
    let held = store.get(&rel.trust_domain).await;
    let failed = |why: String, held| (Refreshed::Failed(why), held);
    let profile = match profile(rel, held.as_ref(), store).await {
        Ok(p) => p,
        Err(e) => return failed(e, held),
    };
    let body = match fetch(&rel.url, &profile, rel.limits).await {
        Ok(b) => b,
        Err(e) => return failed(e.to_string(), held),
    };
    let parsed = match SpiffeBundle::parse(&rel.trust_domain, &body) {
        Ok(p) => p,
        Err(e) => return failed(format!("the document served by {} {e}", rel.url), held),
    };
    for skipped in &parsed.skipped {
        tracing::info!(trust_domain = %rel.trust_domain, url = %rel.url, "federated bundle: ignored {skipped}");
    }
    let fetched = parsed.bundle;
    if held.as_ref() == Some(&fetched) {
        return (Refreshed::Unchanged, held);
    }
    if fetched.x509_authorities.is_empty() && fetched.jwt_authorities.is_empty() {
        tracing::warn!(
            trust_domain = %rel.trust_domain,
            url = %rel.url,
            "the peer's bundle has no authorities: no identity of that trust domain will be \
             trusted until it publishes some"
        );
    }
    match store.put(fetched.clone(), &rel.url.to_string()).await {
        Ok(()) => (Refreshed::Updated(fetched.clone()), Some(fetched)),
        Err(e) => failed(format!("the fetched bundle could not be stored: {e}"), held),
    }
}

/// Keeps `rel`'s bundle fresh until `stop` turns true.
pub async fn run(
    rel: Relationship,
    store: Arc<dyn FederatedBundles>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        let (refreshed, held) = refresh(&rel, &*store).await;
        match refreshed {
            Refreshed::Updated(b) => {
                failing = false;
                tracing::info!(
                    trust_domain = %rel.trust_domain,
                    url = %rel.url,
                    sequence = ?b.sequence,
                    x509_authorities = b.x509_authorities.len(),
                    jwt_authorities = b.jwt_authorities.len(),
                    "federated bundle refreshed"
                );
            }
            Refreshed::Unchanged => {
                if failing {
                    tracing::info!(trust_domain = %rel.trust_domain, url = %rel.url, "bundle endpoint reachable again");
                }
                failing = false;
                tracing::debug!(trust_domain = %rel.trust_domain, "federated bundle unchanged");
            }
            Refreshed::Failed(why) => {
                failing = true;
                tracing::warn!(
                    trust_domain = %rel.trust_domain,
                    url = %rel.url,
                    reason = %why,
                    "cannot refresh the federated bundle; keeping the last good one"
                );
            }
        }
        let wait = if held.is_none() && rel.refresh_interval.is_none() {
            // Nothing held yet: try again soon, as SPIRE does.
            MINIMUM_REFRESH_HINT / ATTEMPTS_PER_REFRESH_HINT
        } else {
            next_refresh(held.as_ref(), rel.refresh_interval)
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
