//! Envoy's Secret Discovery Service (SDS v3) on the Workload API socket, as spire-agent serves
//! it (SDS.md): `StreamSecrets` and `FetchSecrets` of `envoy.service.secret.v3`;
//! `DeltaSecrets` answers Unimplemented.
//!
//! Each stream attests its caller exactly as a Workload API call does (the connection's pinned
//! peer credentials; no `workload.spiffe.io` header) and then follows the same per-workload
//! machinery as `FetchX509SVID`: the caller's SVID watches, the bundle set and the entry feed.
//! Every rotation, bundle change and entry change that alters what the workload holds is one
//! update: the version grows and, once the client has asked, the resources of its last request
//! are pushed with a fresh nonce. A caller without an identity keeps its stream: it may still
//! ask for bundles, and an entry registered later is pushed.
//!
//! Names: `default` (the SVID of the lowest entry ID), `ROOTCA` (the own trust domain's
//! bundle), `ALL` (own plus entitled federated bundles, SPIFFE validator only), a SPIFFE ID, a
//! trust domain ID, or none (everything); the first three are configurable ([`SdsConfig`]).

mod cache;
mod protocol;
mod resources;
mod wire;

/// The generated SDS server over spiffed's codec (see `build.rs`).
#[allow(missing_docs, unreachable_pub, clippy::all, reason = "generated code")]
mod server {
    include!(concat!(
        env!("OUT_DIR"),
        "/envoy.service.secret.v3.SecretDiscoveryService.rs"
    ));
}

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use futures::Stream;
use spiffed_core::untrusted::{Untrusted, UntrustedList};
use tonic::{Request, Response, Status, Streaming};

use crate::gate::Gate;
use crate::limits::Denial;
use crate::service::{Shared, Wake, X509Stream, log_issued};
use crate::{ApiError, WorkloadApi};
pub use server::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
pub use wire::{Resources, SdsResponse};

pub use protocol::{
    MAX_RESOURCE_NAME_BYTES, MAX_RESOURCE_NAMES, MAX_TYPE_URL_BYTES, Received, XdsState,
    check_request, fetch_response,
};
pub use resources::{
    DISABLE_VALIDATION_KEY, NodePrefs, SECRET_TYPE_URL, SPIFFE_VALIDATOR, Snapshot, Validation,
    build, split_der,
};

/// Largest `DiscoveryRequest` accepted. Envoy's node metadata can be a few KiB (Istio's more);
/// the stream keeps only the names and two facts about the node.
pub const MAX_SDS_REQUEST_BYTES: usize = 1024 * 1024;

/// The `[sds]` settings: the names of the default resources and the validation form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SdsConfig {
    /// The name of the workload's default X.509-SVID (`default`).
    pub default_svid_name: String,
    /// The name of the own trust domain's bundle (`ROOTCA`).
    pub default_bundle_name: String,
    /// The name of the bundle of every trust domain the workload trusts (`ALL`).
    pub default_all_bundles_name: String,
    /// Plain `trusted_ca` validation contexts instead of the SPIFFE validator, for Envoys
    /// that lack it; a node's metadata key `disable_spiffe_cert_validation` overrides it.
    pub disable_spiffe_cert_validation: bool,
}

/// Default `default_svid_name`.
pub const DEFAULT_SVID_NAME: &str = "default";
/// Default `default_bundle_name`.
pub const DEFAULT_BUNDLE_NAME: &str = "ROOTCA";
/// Default `default_all_bundles_name`.
pub const DEFAULT_ALL_BUNDLES_NAME: &str = "ALL";

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            default_svid_name: DEFAULT_SVID_NAME.to_owned(),
            default_bundle_name: DEFAULT_BUNDLE_NAME.to_owned(),
            default_all_bundles_name: DEFAULT_ALL_BUNDLES_NAME.to_owned(),
            disable_spiffe_cert_validation: false,
        }
    }
}

/// How many `StreamSecrets` streams are open now (for metrics and the stats line). Cheap to
/// clone; every clone reads the same count.
#[derive(Clone, Debug, Default)]
pub struct SdsStreams(Arc<AtomicUsize>);

impl SdsStreams {
    /// The number of open `StreamSecrets` streams.
    pub fn open(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn opened(&self) -> StreamCount {
        self.0.fetch_add(1, Ordering::Relaxed);
        StreamCount(self.0.clone())
    }
}

/// One open stream, counted until dropped.
struct StreamCount(Arc<AtomicUsize>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The SDS service, sharing the Workload API's state. Cheap to clone.
#[derive(Clone)]
pub struct SdsService {
    shared: Arc<Shared>,
    cfg: Arc<SdsConfig>,
    streams: SdsStreams,
    cache: Arc<cache::Cache>,
}

impl std::fmt::Debug for SdsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdsService")
            .field("cfg", &self.cfg)
            .field("open_streams", &self.streams.open())
            .finish_non_exhaustive()
    }
}

impl WorkloadApi {
    /// The SDS service over the same attestor, issuer, entries and limits as this service
    /// (call it after [`with_limits`](Self::with_limits)).
    pub fn sds(&self, cfg: SdsConfig) -> SdsService {
        SdsService {
            shared: self.shared().clone(),
            cfg: Arc::new(cfg),
            streams: SdsStreams::default(),
            cache: Arc::default(),
        }
    }
}

impl SdsService {
    /// The count of open `StreamSecrets` streams.
    pub fn streams(&self) -> SdsStreams {
        self.streams.clone()
    }

    /// The tonic service, with the request size limit set.
    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_SDS_REQUEST_BYTES)
    }

    /// Attests the caller and takes its identities and bundles.
    async fn subscribe<T>(&self, req: &Request<T>) -> Result<X509Stream, ApiError> {
        let caller = self.shared.attested_caller(req).await?;
        let mut stream = X509Stream::new(&self.shared, caller, true);
        stream.rematch().await?;
        Ok(stream)
    }
}

/// The workload's identities and bundles right after [`SdsService::subscribe`].
fn first_snapshot(
    workload: &mut X509Stream,
) -> Result<(Vec<spiffed_core::Identity>, Arc<spiffed_core::BundleSet>), ApiError> {
    workload
        .next_snapshot()
        .ok_or_else(|| ApiError::Internal("the first SDS snapshot was not taken".into()))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A `StreamSecrets` stream: the client's requests, the workload's updates, the xDS state.
struct SecretStream {
    svc: SdsService,
    requests: Streaming<DiscoveryRequest>,
    /// `requests` is polled only when it has news (see [`Gate`]): the task is also polled for
    /// every response it sends.
    requests_gate: Gate,
    workload: X509Stream,
    /// The caller, for logs.
    who: Who,
    /// The workload's identities and bundles as of the last update.
    ids: Vec<spiffed_core::Identity>,
    bundles: Arc<spiffed_core::BundleSet>,
    xds: XdsState,
    _count: StreamCount,
}

/// The caller of a stream, as logs name it.
struct Who {
    pid: Option<u32>,
    uid: u32,
}

/// What a stream's wait ended with.
enum Event {
    /// A request asked for a response (new names).
    Respond,
    /// The workload's identities, bundles or entries moved.
    Wake(Wake),
}

impl SecretStream {
    /// The next response to send; `None` when the stream ends quietly (the client closed its
    /// side, or the agent stops); an error ends it with that status.
    ///
    /// The wait on the workload outlives the client's requests: an ACK (every response gets
    /// one) is taken in without dropping and re-registering the stream's waits on the
    /// agent-wide entry feed, bundle watch and SVID watch. Each of those is a list of every
    /// open stream under a lock, so re-registering on each ACK made 10,000 streams contend
    /// for those locks while a rotation was being pushed to them.
    async fn next(&mut self) -> Option<Result<SdsResponse, ApiError>> {
        loop {
            let event = {
                let Self {
                    svc,
                    requests,
                    requests_gate,
                    workload,
                    who,
                    xds,
                    ..
                } = self;
                let wait = workload.wait();
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        req = requests_gate.next(requests) => {
                            let req = match req? {
                                Ok(r) => r,
                                // A malformed message (or a broken connection): the stream ends.
                                Err(status) => {
                                    let e = ApiError::BadRequest(format!(
                                        "unreadable DiscoveryRequest: {}",
                                        status.message()
                                    ));
                                    log_rejected(svc, who, &e.to_string());
                                    return Some(Err(e));
                                }
                            };
                            match on_request(svc, xds, who, &req) {
                                Ok(true) => break Event::Respond,
                                Ok(false) => {}
                                Err(e) => return Some(Err(e)),
                            }
                        }
                        wake = &mut wait => break Event::Wake(wake),
                    }
                }
            };
            match event {
                Event::Respond => return Some(self.respond()),
                Event::Wake(wake) => {
                    if let Err(e) = self.workload.handle(wake).await? {
                        return Some(Err(e));
                    }
                    if let Some((ids, bundles)) = self.workload.next_snapshot() {
                        self.ids = ids;
                        self.bundles = bundles;
                        if self.xds.on_update() {
                            return Some(self.respond());
                        }
                    }
                }
            }
        }
    }

    /// The response for the names last requested, from the last update.
    fn respond(&mut self) -> Result<SdsResponse, ApiError> {
        let none = BTreeSet::new();
        let names = self.xds.names().unwrap_or(&none);
        let validation = self
            .xds
            .node()
            .validation(self.svc.cfg.disable_spiffe_cert_validation);
        let built = self
            .svc
            .resources(&self.workload, names, validation, &self.ids, &self.bundles)
            .inspect_err(|e| self.svc.log_refused(self.workload.caller().cred(), e))?;
        let resp = self.xds.respond(built);
        let cred = self.workload.caller().cred();
        tracing::debug!(
            pid = ?cred.pid,
            uid = cred.uid,
            version = %resp.version_info,
            resources = resp.resources.len(),
            "sending SDS response"
        );
        Ok(resp)
    }
}

/// Takes a request into the xDS state; `true` when a response must go out.
fn on_request(
    svc: &SdsService,
    xds: &mut XdsState,
    who: &Who,
    req: &DiscoveryRequest,
) -> Result<bool, ApiError> {
    let got = xds.on_request(req).inspect_err(|e| {
        log_rejected(svc, who, &e.to_string());
    })?;
    if let Some(detail) = &got.error_detail
        && svc.shared.log_allowed(Denial::SdsRejected)
    {
        tracing::warn!(
            pid = ?who.pid,
            uid = who.uid,
            names = %UntrustedList(&req.resource_names),
            error = %Untrusted(detail),
            "Envoy reported errors applying SDS secrets"
        );
    }
    if got.stale {
        tracing::debug!(
            pid = ?who.pid,
            uid = who.uid,
            nonce = %Untrusted(&req.response_nonce),
            "ignoring an SDS request with a stale nonce"
        );
    } else if let Some(version) = &got.nack
        && svc.shared.log_allowed(Denial::SdsRejected)
    {
        tracing::warn!(
            pid = ?who.pid,
            uid = who.uid,
            version = %Untrusted(version),
            expected = %xds.version(),
            "SDS client rejected the expected version and rolled back"
        );
    }
    Ok(got.send)
}

/// Logs (throttled) why a stream ended.
fn log_rejected(svc: &SdsService, who: &Who, what: &str) {
    if svc.shared.log_allowed(Denial::SdsRejected) {
        tracing::info!(pid = ?who.pid, uid = who.uid, reason = %Untrusted(what), "SDS stream ended");
    }
}

impl SdsService {
    /// The resources for `names` from the workload's last snapshot (`ids` and `bundles`), built
    /// once for every stream with the same snapshot, names and form.
    fn resources(
        &self,
        workload: &X509Stream,
        names: &BTreeSet<String>,
        validation: Validation,
        ids: &[spiffed_core::Identity],
        bundles: &spiffed_core::BundleSet,
    ) -> Result<Resources, ApiError> {
        let fp = workload.fingerprint().ok_or_else(|| {
            ApiError::Internal("an SDS response before the first snapshot".into())
        })?;
        self.cache.get_or_build(fp, names, validation, || {
            let names: Vec<String> = names.iter().cloned().collect();
            let snap = Snapshot {
                ids,
                bundles,
                federate_all: self.shared.federate_all(),
            };
            build(&names, &snap, validation, &self.cfg)
        })
    }

    /// Logs (throttled) a request refused for its names.
    fn log_refused(&self, cred: &spiffed_core::PeerCred, e: &ApiError) {
        if self.shared.log_allowed(Denial::SdsNotAuthorized) {
            tracing::info!(pid = ?cred.pid, uid = cred.uid, reason = %Untrusted(&e.to_string()), "SDS request refused");
        }
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = BoxStream<SdsResponse>;
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut workload = self.subscribe(&request).await?;
        let (ids, bundles) = first_snapshot(&mut workload)?;
        log_issued(workload.caller(), &ids, "X.509-SVID (SDS stream)");
        let mut xds = XdsState::new();
        // The first update: the workload's state now.
        xds.on_update();
        let cred = workload.caller().cred();
        let who = Who {
            pid: cred.pid,
            uid: cred.uid,
        };
        let stream = SecretStream {
            svc: self.clone(),
            requests: request.into_inner(),
            requests_gate: Gate::default(),
            workload,
            who,
            ids,
            bundles,
            xds,
            _count: self.streams.opened(),
        };
        // State: (stream, ended).
        let out = futures::stream::unfold((stream, false), |(mut s, ended)| async move {
            if ended {
                return None;
            }
            match s.next().await? {
                Ok(resp) => Some((Ok(resp), (s, false))),
                Err(e) => Some((Err(e.into()), (s, true))),
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(ApiError::Unimplemented(
            "DeltaSecrets is not implemented; use StreamSecrets (state of the world)",
        )
        .into())
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<SdsResponse>, Status> {
        check_request(request.get_ref())?;
        let mut workload = self.subscribe(&request).await?;
        let (ids, bundles) = first_snapshot(&mut workload)?;
        let req = request.into_inner();
        let validation = req
            .node
            .as_ref()
            .map(NodePrefs::of)
            .unwrap_or_default()
            .validation(self.cfg.disable_spiffe_cert_validation);
        let names: BTreeSet<String> = req
            .resource_names
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect();
        let resources = self
            .resources(&workload, &names, validation, &ids, &bundles)
            .inspect_err(|e| self.log_refused(workload.caller().cred(), e))?;
        log_issued(workload.caller(), &ids, "X.509-SVID (SDS fetch)");
        Ok(Response::new(fetch_response(&req, resources)))
    }
}
