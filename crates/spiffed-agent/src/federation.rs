//! SPIFFE federation in standalone mode: the bundle endpoint (`[federation.bundle_endpoint]`)
//! and the relationships (`[[federation.trust_domains]]`), on spiffed-federation's transport.
//!
//! - The endpoint serves the own trust domain's bundle in the SPIFFE format, re-rendered at
//!   every change of the bundle set (a prepared CA appears in it before it signs anything),
//!   with the configured refresh hint. With `https_spiffe` it presents an X.509-SVID the CA
//!   mints for `endpoint_spiffe_id` and rotates like any other; with `https_web`, a
//!   certificate and key from files, read at start.
//! - Each relationship keeps its trust domain's bundle fresh from the peer's endpoint and
//!   stores it like `spiffed bundle set` does (the entry store, then the CA's bundle set), so
//!   a restart serves the last good bundle before the peer answers. A bootstrap bundle file
//!   is stored at start when the store holds none for that trust domain.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use spiffed_authority::CaAuthority;
use spiffed_core::spiffe_bundle::SpiffeBundle;
use spiffed_core::{Entry, EntryId, Issuer as _, TrustDomain};
use spiffed_entries::EntrySources;
use spiffed_federation::relationship::{self, EndpointProfile, FederatedBundles, Relationship};
use spiffed_federation::{CurrentCert, EndpointLimits, FetchLimits};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::AgentError;
use crate::config::{
    BundleEndpointConfig, BundleFileFormat, Config, EndpointServing, FederationRelationship,
    RelationshipProfile,
};

/// The entry ID under which the CA mints the endpoint's SVID (never published: no workload
/// can match it).
const ENDPOINT_ENTRY_ID: &str = "spiffed-bundle-endpoint";

/// Federation, prepared at start: the endpoint bound and its certificate loaded, the
/// relationships checked and their bootstrap bundles stored.
pub(crate) struct Prepared {
    endpoint: Option<Endpoint>,
    relationships: Vec<Relationship>,
    store: Arc<StoreBundles>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("endpoint", &self.endpoint.as_ref().map(|e| e.cfg.listen))
            .field("relationships", &self.relationships.len())
            .finish()
    }
}

struct Endpoint {
    cfg: BundleEndpointConfig,
    listener: std::net::TcpListener,
    cert: Arc<CurrentCert>,
}

fn fail(what: String) -> AgentError {
    AgentError::Federation(what)
}

/// Binds the endpoint, loads its certificate, builds the relationships and stores their
/// bootstrap bundles. `None` when nothing of federation is configured.
pub(crate) fn prepare(
    cfg: &Config,
    ca: &CaAuthority,
    sources: &EntrySources,
    writes: Arc<tokio::sync::Mutex<()>>,
) -> Result<Option<Prepared>, AgentError> {
    if cfg.bundle_endpoint.is_none() && cfg.federation.is_empty() {
        return Ok(None);
    }
    let store = Arc::new(StoreBundles {
        sources: sources.clone(),
        ca: ca.clone(),
        writes,
    });
    let endpoint = cfg
        .bundle_endpoint
        .as_ref()
        .map(|e| {
            let listener = std::net::TcpListener::bind(e.listen)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|err| {
                    AgentError::Listen(format!(
                        "cannot listen on {} (federation.bundle_endpoint.listen): {err}; choose \
                         a free port or another address",
                        e.listen
                    ))
                })?;
            let cert = Arc::new(CurrentCert::default());
            if let EndpointServing::HttpsWeb {
                certificate_path,
                private_key_path,
            } = &e.profile
            {
                let key = spiffed_federation::certified_key_from_files(
                    certificate_path,
                    private_key_path,
                )
                .map_err(|err| {
                    fail(format!(
                        "[federation.bundle_endpoint] https_web: {err} (certificate_path and \
                         private_key_path must be the PEM certificate chain and its key)"
                    ))
                })?;
                cert.set(key);
            }
            Ok::<_, AgentError>(Endpoint {
                cfg: e.clone(),
                listener,
                cert,
            })
        })
        .transpose()?;
    let mut relationships = Vec::with_capacity(cfg.federation.len());
    for rel in &cfg.federation {
        relationships.push(relationship(rel)?);
        if let Some(path) = &rel.bundle_path {
            bootstrap(&store, rel, path)?;
        } else if matches!(rel.profile, RelationshipProfile::HttpsSpiffe { .. })
            && stored(sources, &rel.trust_domain).is_none()
        {
            tracing::warn!(
                trust_domain = %rel.trust_domain,
                "no bundle of {} is held to authenticate its https_spiffe endpoint: give the \
                 relationship a bundle_path, or `spiffed bundle set --trust-domain {}`",
                rel.trust_domain,
                rel.trust_domain
            );
        }
    }
    Ok(Some(Prepared {
        endpoint,
        relationships,
        store,
    }))
}

fn relationship(rel: &FederationRelationship) -> Result<Relationship, AgentError> {
    let profile = match &rel.profile {
        RelationshipProfile::HttpsSpiffe { endpoint_spiffe_id } => EndpointProfile::HttpsSpiffe {
            endpoint_id: endpoint_spiffe_id.clone(),
        },
        RelationshipProfile::HttpsWeb {
            root_certificates_path,
        } => {
            let extra: Vec<_> = root_certificates_path.iter().cloned().collect();
            let roots = spiffed_federation::web_roots(None, &extra).map_err(|e| {
                fail(format!(
                    "federation with {}: https_web roots: {e}",
                    rel.trust_domain
                ))
            })?;
            EndpointProfile::HttpsWeb {
                roots: Arc::new(roots),
            }
        }
    };
    Ok(Relationship {
        trust_domain: rel.trust_domain.clone(),
        url: rel.bundle_endpoint_url.clone(),
        profile,
        limits: FetchLimits {
            timeout: rel.fetch_timeout,
            max_body_bytes: rel.max_bundle_bytes,
        },
        refresh_interval: rel.refresh_interval,
    })
}

/// The stored bundle of `td`, parsed.
fn stored(sources: &EntrySources, td: &TrustDomain) -> Option<SpiffeBundle> {
    let store = sources.store()?;
    let found = store
        .bundles()
        .ok()?
        .into_iter()
        .find(|b| &b.trust_domain == td)?;
    SpiffeBundle::parse(td, found.document.as_bytes())
        .ok()
        .map(|p| p.bundle)
}

/// Stores the bootstrap bundle of `rel` unless the store holds one for its trust domain (it is
/// newer: fetched, or set by hand).
fn bootstrap(
    store: &StoreBundles,
    rel: &FederationRelationship,
    path: &Path,
) -> Result<(), AgentError> {
    let td = &rel.trust_domain;
    if stored(&store.sources, td).is_some() {
        tracing::info!(
            trust_domain = %td,
            "a bundle of {td} is stored: bundle_path {} is not read (it only bootstraps)",
            path.display()
        );
        return Ok(());
    }
    let bad = |why: String| {
        fail(format!(
            "federation with {td}: bundle_path {}: {why}",
            path.display()
        ))
    };
    let doc = read_limited(path, spiffed_core::spiffe_bundle::MAX_BUNDLE_BYTES)
        .map_err(|e| bad(e.to_string()))?;
    let bundle = match rel.bundle_format {
        BundleFileFormat::Spiffe => SpiffeBundle::parse(td, &doc).map(|p| p.bundle),
        BundleFileFormat::Pem => SpiffeBundle::parse_pem(td, &doc),
    }
    .map_err(|e| {
        bad(format!(
            "the file {e}; write {td}'s bundle there (`spire-server bundle show -format spiffe` \
             or `spiffed bundle show --format spiffe` on a host of {td}), or set bundle_format"
        ))
    })?;
    store
        .put_now(&bundle, &format!("bootstrap {}", path.display()))
        .map_err(bad)?;
    tracing::info!(trust_domain = %td, path = %path.display(), "bootstrap bundle stored");
    Ok(())
}

/// Reads at most `max` bytes of `path`; a larger file is refused.
fn read_limited(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let f = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    f.take(max as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > max {
        return Err(std::io::Error::other(format!(
            "it is larger than {max} bytes, which no bundle is"
        )));
    }
    Ok(buf)
}

/// Starts the endpoint and the relationships; they stop when `stop` turns true.
pub(crate) fn spawn(
    prepared: Prepared,
    ca: &CaAuthority,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, AgentError> {
    let mut tasks = Vec::new();
    if let Some(ep) = prepared.endpoint {
        let listener = tokio::net::TcpListener::from_std(ep.listener).map_err(|e| {
            AgentError::Listen(format!(
                "cannot serve the bundle endpoint (federation.bundle_endpoint.listen): {e}"
            ))
        })?;
        let tls = spiffed_federation::server_config(ep.cert.clone())
            .map_err(|e| fail(format!("the bundle endpoint's TLS: {e}")))?;
        let (doc_tx, doc_rx) = watch::channel(Bytes::new());
        tasks.push(tokio::spawn(follow_bundle(
            ca.clone(),
            ep.cfg.refresh_hint,
            doc_tx,
            stop.clone(),
        )));
        let profile = match &ep.cfg.profile {
            EndpointServing::HttpsSpiffe { endpoint_spiffe_id } => {
                tasks.push(tokio::spawn(follow_svid(
                    ca.clone(),
                    endpoint_spiffe_id.clone(),
                    ep.cert.clone(),
                    stop.clone(),
                )));
                format!("https_spiffe as {endpoint_spiffe_id}")
            }
            EndpointServing::HttpsWeb { .. } => "https_web".to_owned(),
        };
        tracing::info!(
            address = %ep.cfg.listen,
            profile,
            refresh_hint = %humantime::format_duration(ep.cfg.refresh_hint),
            "serving the trust bundle to federated peers"
        );
        tasks.push(tokio::spawn(spiffed_federation::serve(
            listener,
            tls,
            doc_rx,
            EndpointLimits {
                max_connections: ep.cfg.max_connections,
                ..EndpointLimits::default()
            },
            stop.clone(),
        )));
    }
    for rel in prepared.relationships {
        tracing::info!(
            trust_domain = %rel.trust_domain,
            url = %rel.url,
            "federating: following the peer's bundle endpoint"
        );
        let store: Arc<dyn FederatedBundles> = prepared.store.clone();
        tasks.push(tokio::spawn(relationship::run(rel, store, stop.clone())));
    }
    Ok(tasks)
}

/// Renders the own bundle into `doc` at every change of the bundle set.
async fn follow_bundle(
    ca: CaAuthority,
    refresh_hint: Duration,
    doc: watch::Sender<Bytes>,
    mut stop: watch::Receiver<bool>,
) {
    let mut bundles = ca.bundles();
    loop {
        let own = bundles.borrow_and_update().own().clone();
        let json = SpiffeBundle::from_trust_bundle(&own, Some(refresh_hint)).to_json();
        doc.send_replace(Bytes::from(json));
        tokio::select! {
            changed = bundles.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Keeps the endpoint's certificate the current X.509-SVID of `id`, minted by the CA.
async fn follow_svid(
    ca: CaAuthority,
    id: spiffed_core::SpiffeId,
    cert: Arc<CurrentCert>,
    mut stop: watch::Receiver<bool>,
) {
    let entry = Arc::new(Entry {
        id: EntryId::new(ENDPOINT_ENTRY_ID),
        spiffe_id: id,
        selectors: Vec::new(),
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: Vec::new(),
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
    });
    loop {
        let mut watch = match ca.x509_svid(&entry).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("the bundle endpoint's SVID cannot be minted: {e}; trying again");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        loop {
            let svid = watch.current();
            let chain: Vec<Vec<u8>> = spiffed_workload_api::sds::split_der(&svid.cert_chain_der)
                .unwrap_or_default()
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect();
            match spiffed_federation::certified_key_from_der(&chain, svid.key.pkcs8_der()) {
                Ok(k) => cert.set(k),
                Err(e) => tracing::warn!("the bundle endpoint's SVID cannot be used: {e}"),
            }
            tokio::select! {
                alive = watch.changed() => if !alive { break },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Federated bundles in the entry store, published into the CA's bundle set.
pub(crate) struct StoreBundles {
    sources: EntrySources,
    ca: CaAuthority,
    /// Shared with `spiffed bundle set|delete`: one write at a time, store then publish.
    writes: Arc<tokio::sync::Mutex<()>>,
}

impl StoreBundles {
    /// Stores and publishes `bundle` (blocking: SQLite).
    fn put_now(&self, bundle: &SpiffeBundle, source: &str) -> Result<(), String> {
        let store = self
            .sources
            .store()
            .ok_or_else(|| "no entry store to keep federated bundles in".to_owned())?;
        store
            .put_bundle(&bundle.trust_domain, &bundle.to_json(), source)
            .map_err(|e| e.to_string())?;
        self.ca
            .set_federated(bundle.to_trust_bundle())
            .map_err(|e| e.to_string())
    }
}

#[async_trait::async_trait]
impl FederatedBundles for StoreBundles {
    async fn get(&self, td: &TrustDomain) -> Option<SpiffeBundle> {
        let (sources, td) = (self.sources.clone(), td.clone());
        tokio::task::spawn_blocking(move || stored(&sources, &td))
            .await
            .ok()
            .flatten()
    }

    async fn put(&self, bundle: SpiffeBundle, url: &str) -> Result<(), String> {
        let _write = self.writes.lock().await;
        let this = StoreBundles {
            sources: self.sources.clone(),
            ca: self.ca.clone(),
            writes: self.writes.clone(),
        };
        let source = url.to_owned();
        tokio::task::spawn_blocking(move || this.put_now(&bundle, &source))
            .await
            .map_err(|e| e.to_string())?
    }
}
