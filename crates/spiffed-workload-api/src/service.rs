//! The `SpiffeWorkloadAPI` service implementation.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::Stream;
use spiffed_core::{
    Attested, Attestor, Authority, Entry, EntryId, EntrySet, Facts, Identity, Lease, PeerCred,
    Selector, SpiffeId, TrustDomain, X509Bundle,
};
use spiffed_proto::shared::Encoded;
use spiffed_proto::shared::server::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use spiffed_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use zeroize::Zeroize as _;

use crate::ApiError;
use crate::limits::{Denial, RequestLimits, Throttle};
use spiffed_core::untrusted::{Untrusted, UntrustedList};

/// The security header every Workload API request must carry ([WEP §3]).
const SECURITY_HEADER: &str = "workload.spiffe.io";
/// Largest request accepted; Workload API requests are tiny.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

struct Shared {
    attestor: Arc<dyn Attestor>,
    authority: Arc<dyn Authority>,
    entries: watch::Receiver<Arc<EntrySet>>,
    synthetic_ids: bool,
    responses: Responses,
    /// What one request may carry.
    limits: RequestLimits,
    /// Denial lines per kind per second.
    throttle: Throttle,
}

/// Most X.509-SVID responses kept; the cache starts afresh when full.
const MAX_SHARED_RESPONSES: usize = 256;

/// Responses encoded once and shared by every stream that sends the same message.
#[derive(Default)]
struct Responses {
    /// X.509-SVID responses of the current bundle sequence, by the stream fingerprint that
    /// determines them completely.
    x509: Mutex<HashMap<X509Fingerprint, Encoded<X509svidResponse>>>,
    x509_bundles: Mutex<Option<(u64, Encoded<X509BundlesResponse>)>>,
    jwt_bundles: Mutex<Option<(u64, Encoded<JwtBundlesResponse>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each guarded value is a cache that is valid after any panic mid-update.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The cached message for bundle `sequence`, or a fresh one made by `make`.
fn shared_bundle<T: prost::Message>(
    slot: &Mutex<Option<(u64, Encoded<T>)>>,
    sequence: u64,
    make: impl FnOnce() -> T,
) -> Encoded<T> {
    if let Some((seq, enc)) = &*lock(slot)
        && *seq == sequence
    {
        return enc.clone();
    }
    let enc = Encoded::new(&make());
    *lock(slot) = Some((sequence, enc.clone()));
    enc
}

/// The Workload API service. Cheap to clone.
#[derive(Clone)]
pub struct WorkloadApi {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi")
            .field("synthetic_ids", &self.shared.synthetic_ids)
            .finish_non_exhaustive()
    }
}

/// Who is calling: kernel facts plus what attestation derived.
#[derive(Clone)]
struct Caller {
    cred: PeerCred,
    attested: Attested,
}

/// Checks the security header: exactly one value, exactly `true`.
fn check_header<T>(req: &Request<T>) -> Result<(), ApiError> {
    let mut values = req.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(ApiError::MissingSecurityHeader),
    }
}

/// The synthetic identity dev mode gives a caller that matches no entry:
/// `spiffe://TD/uid-UID/EXE_NAME`.
pub fn synthetic_entry(td: &TrustDomain, attested: &Attested) -> Option<Arc<Entry>> {
    let uid = attested.uid;
    let exe = attested
        .exe
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| id_segment(&n.to_string_lossy()))
        .unwrap_or_else(|| "unknown".to_owned());
    let spiffe_id = SpiffeId::new(format!("spiffe://{td}/uid-{uid}/{exe}")).ok()?;
    Some(Arc::new(Entry {
        id: EntryId::new(format!("synthetic/uid-{uid}/{exe}")),
        spiffe_id,
        selectors: Selector::unix("uid", uid).into_iter().collect(),
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: vec![],
    }))
}

/// A path segment made of the characters SPIFFE IDs allow.
fn id_segment(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out == "." || out == ".." {
        out = format!("_{out}");
    }
    out
}

impl Shared {
    /// The facts to gather about callers judged against `set`: what its selectors need, and
    /// the executable's path for dev mode's synthetic IDs.
    fn facts(&self, set: &EntrySet) -> Facts {
        if self.synthetic_ids {
            set.facts() | Facts::PATH
        } else {
            set.facts()
        }
    }

    /// The facts the current entries need.
    fn current_facts(&self) -> Facts {
        self.facts(&self.entries.borrow())
    }

    /// Attests on this task when that needs only quick reads, else (hashing an executable the
    /// cache does not know) on the blocking pool.
    async fn attest(&self, cred: &PeerCred, facts: Facts) -> Result<Attested, ApiError> {
        let result = match self.attestor.attest_quick(cred, facts) {
            Some(result) => result,
            None => {
                let attestor = self.attestor.clone();
                let c = cred.clone();
                tokio::task::spawn_blocking(move || attestor.attest(&c, facts))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
            }
        };
        result.map_err(|e| {
            if self.throttle.allow(Denial::Attestation) {
                tracing::info!(pid = ?cred.pid, uid = cred.uid, error = %e, "attestation failed");
            }
            e.into()
        })
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, ApiError> {
        check_header(req)?;
        let cred = req
            .extensions()
            .get::<PeerCred>()
            .cloned()
            .ok_or(ApiError::NoPeerCred)?;
        let attested = self.attest(&cred, self.current_facts()).await?;
        Ok(Caller { cred, attested })
    }

    /// The entries that grant `caller` an identity now (or its synthetic one).
    fn entitled(&self, caller: &Caller, set: &EntrySet) -> Vec<Arc<Entry>> {
        let matched = set.matching(&caller.attested.selectors);
        if !matched.is_empty() || !self.synthetic_ids {
            return matched;
        }
        self.synthetic(caller).into_iter().collect()
    }

    fn synthetic(&self, caller: &Caller) -> Option<Arc<Entry>> {
        synthetic_entry(self.authority.trust_domain(), &caller.attested)
    }

    /// The caller's identities now; `NoIdentity` when there are none.
    fn identities(&self, caller: &Caller) -> Result<(Vec<Identity>, Lease), ApiError> {
        let set = self.entries.borrow().clone();
        let entries = self.entitled(caller, &set);
        if entries.is_empty() {
            return Err(ApiError::NoIdentity);
        }
        Ok(self.authority.identities(&entries)?)
    }

    /// The response for `ids`, each SVID with `bundle` (taken once by the caller, so `fp`, their
    /// fingerprint, and the message agree), encoded once for every stream that sends it: the
    /// fingerprint (entry, serial and hint of each SVID, and the bundle's sequence) determines
    /// the message completely, so it is the cache key.
    fn x509_response(
        &self,
        fp: &X509Fingerprint,
        ids: &[Identity],
        bundle: &X509Bundle,
    ) -> Encoded<X509svidResponse> {
        if let Some(enc) = lock(&self.responses.x509).get(fp) {
            return enc.clone();
        }
        let enc = x509_svid_response(ids, bundle);
        let mut cache = lock(&self.responses.x509);
        let stale = cache.keys().next().is_some_and(|(_, seq)| *seq != fp.1);
        if stale || cache.len() >= MAX_SHARED_RESPONSES {
            cache.clear();
        }
        cache.insert(fp.clone(), enc.clone());
        enc
    }

    fn x509_bundles_response(&self) -> Encoded<X509BundlesResponse> {
        let b = self.authority.x509_bundle();
        shared_bundle(&self.responses.x509_bundles, b.sequence, || {
            X509BundlesResponse {
                crl: vec![],
                bundles: HashMap::from([(b.trust_domain.id_string(), b.concatenated_der())]),
            }
        })
    }

    fn jwt_bundles_response(&self) -> Encoded<JwtBundlesResponse> {
        let b = self.authority.jwt_bundle();
        shared_bundle(&self.responses.jwt_bundles, b.sequence, || {
            JwtBundlesResponse {
                bundles: HashMap::from([(b.trust_domain.id_string(), crate::jwt::jwks(&b))]),
            }
        })
    }
}

/// The `FetchX509SVID` message for `ids`, each SVID with `bundle`, encoded.
///
/// The agent encodes each distinct message once per change and shares it between the streams
/// that send it; public for the encoding benchmark.
pub fn x509_svid_response(ids: &[Identity], bundle: &X509Bundle) -> Encoded<X509svidResponse> {
    let der = bundle.concatenated_der();
    let msg = X509svidResponse {
        svids: ids
            .iter()
            .map(|i| X509svid {
                spiffe_id: i.x509.spiffe_id.to_string(),
                x509_svid: i.x509.cert_chain_der.clone(),
                x509_svid_key: i.x509.key.pkcs8_der().to_vec(),
                bundle: der.clone(),
                hint: i.entry.hint.clone().unwrap_or_default(),
            })
            .collect(),
        crl: vec![],
        federated_bundles: HashMap::new(),
    };
    let enc = Encoded::new(&msg);
    // `msg` holds a copy of each private key: wipe it now that the bytes are encoded.
    for mut svid in msg.svids {
        svid.x509_svid_key.zeroize();
    }
    enc
}

/// What a stream last sent, to send only real changes: each SVID by entry and serial with its
/// hint (an entry's hint can change without a new SVID), and the bundle's sequence.
type X509Fingerprint = (Vec<(EntryId, Vec<u8>, Option<String>)>, u64);

fn x509_fingerprint(ids: &[Identity], bundle_seq: u64) -> X509Fingerprint {
    (
        ids.iter()
            .map(|i| {
                (
                    i.entry.id.clone(),
                    i.x509.serial.clone(),
                    i.entry.hint.clone(),
                )
            })
            .collect(),
        bundle_seq,
    )
}

/// The state a watch-driven stream carries between messages.
struct Watch {
    shared: Arc<Shared>,
    caller: Caller,
    entries: watch::Receiver<Arc<EntrySet>>,
    changes: watch::Receiver<u64>,
}

impl Watch {
    fn new(shared: &Arc<Shared>, caller: Caller) -> Self {
        let mut entries = shared.entries.clone();
        let mut changes = shared.authority.changes();
        entries.borrow_and_update();
        changes.borrow_and_update();
        Self {
            shared: shared.clone(),
            caller,
            entries,
            changes,
        }
    }

    /// Waits for the next change of entries or of the authority; false when the agent stops.
    async fn changed(&mut self) -> bool {
        tokio::select! {
            r = self.entries.changed() => r.is_ok(),
            r = self.changes.changed() => r.is_ok(),
        }
    }

    /// Attests the caller again when the entries now need facts that its attestation did not
    /// gather (an entry with a selector type new to the set, such as `unix:path`, was added
    /// while the stream was open), so such an entry is judged on real facts.
    async fn refresh(&mut self) -> Result<(), ApiError> {
        let want = self.shared.current_facts();
        let have = self.caller.attested.facts;
        if !have.contains(want) {
            self.caller.attested = self.shared.attest(&self.caller.cred, have | want).await?;
        }
        Ok(())
    }
}

impl WorkloadApi {
    /// Builds the service. `synthetic_ids` gives callers that match no entry the identity
    /// `spiffe://TD/uid-UID/EXE_NAME` (dev mode).
    pub fn new(
        attestor: Arc<dyn Attestor>,
        authority: Arc<dyn Authority>,
        entries: watch::Receiver<Arc<EntrySet>>,
        synthetic_ids: bool,
    ) -> Self {
        Self::build(
            attestor,
            authority,
            entries,
            synthetic_ids,
            RequestLimits::default(),
        )
    }

    /// The same service with other request limits (default [`RequestLimits::default`]).
    pub fn with_limits(self, limits: RequestLimits) -> Self {
        let s = &self.shared;
        Self::build(
            s.attestor.clone(),
            s.authority.clone(),
            s.entries.clone(),
            s.synthetic_ids,
            limits,
        )
    }

    /// The one place the shared state is made, so a new field is set once.
    fn build(
        attestor: Arc<dyn Attestor>,
        authority: Arc<dyn Authority>,
        entries: watch::Receiver<Arc<EntrySet>>,
        synthetic_ids: bool,
        limits: RequestLimits,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                attestor,
                authority,
                entries,
                synthetic_ids,
                responses: Responses::default(),
                limits,
                throttle: Throttle::new(limits.denial_log_lines_per_second),
            }),
        }
    }

    /// The tonic service, with request size limits set.
    pub fn into_server(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

impl WorkloadApi {
    /// Attests the caller of a bundle stream, which needs an identity (as in SPIRE).
    async fn bundle_watch<T>(&self, request: &Request<T>) -> Result<Watch, Status> {
        let shared = &self.shared;
        let caller = shared.caller(request).await?;
        let set = shared.entries.borrow().clone();
        if shared.entitled(&caller, &set).is_empty() {
            shared.log_denied(&caller);
            return Err(ApiError::NoIdentity.into());
        }
        Ok(Watch::new(shared, caller))
    }
}

/// A bundle stream: the first message at once, then one whenever the bundle's content changes
/// (equal messages are suppressed, as SPIRE does: a CA activation, for one, bumps the sequence
/// without changing the set); it ends with PermissionDenied once the caller has no identity left.
fn bundle_stream<T: PartialEq + Clone + Send + 'static>(
    watch: Watch,
    current: fn(&Shared) -> T,
) -> BoxStream<T> {
    let first = current(&watch.shared);
    let state = (watch, first.clone(), Some(first), false);
    Box::pin(futures::stream::unfold(
        state,
        move |(mut w, mut last, first, ended)| async move {
            if let Some(msg) = first {
                return Some((Ok(msg), (w, last, None, false)));
            }
            if ended {
                return None;
            }
            loop {
                if !w.changed().await {
                    return None;
                }
                if let Err(e) = w.refresh().await {
                    return Some((Err(e.into()), (w, last, None, true)));
                }
                let entries = w.shared.entries.borrow().clone();
                if w.shared.entitled(&w.caller, &entries).is_empty() {
                    w.shared.log_denied(&w.caller);
                    let e: Status = ApiError::NoIdentity.into();
                    return Some((Err(e), (w, last, None, true)));
                }
                let msg = current(&w.shared);
                if msg == last {
                    continue;
                }
                last = msg.clone();
                return Some((Ok(msg), (w, last, None, false)));
            }
        },
    ))
}

impl Shared {
    /// Logs (throttled) that `caller` matches no entry, with its selectors: a selector holds
    /// caller-controlled text (the executable's path), so each is bounded.
    fn log_denied(&self, caller: &Caller) {
        if !self.throttle.allow(Denial::NoIdentity) {
            return;
        }
        let selectors: Vec<String> = caller
            .attested
            .selectors
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(
            pid = ?caller.cred.pid,
            uid = caller.cred.uid,
            selectors = %UntrustedList(&selectors),
            "no identity issued: no registration entry matches the caller"
        );
    }

    /// Logs (throttled) a refused request, with the reason.
    fn log_bad_request(&self, caller: &Caller, e: &ApiError) {
        if self.throttle.allow(Denial::BadRequest) {
            tracing::info!(pid = ?caller.cred.pid, uid = caller.cred.uid, reason = %e, "request refused");
        }
    }
}

fn log_issued(caller: &Caller, ids: &[Identity], what: &str) {
    for i in ids {
        tracing::info!(
            spiffe_id = %i.entry.spiffe_id,
            entry = %i.entry.id,
            pid = ?caller.cred.pid,
            uid = caller.cred.uid,
            serial = %hex(&i.x509.serial),
            "issued {what}"
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<Encoded<X509svidResponse>>;
    type FetchX509BundlesStream = BoxStream<Encoded<X509BundlesResponse>>;
    type FetchJWTBundlesStream = BoxStream<Encoded<JwtBundlesResponse>>;
    type FetchWITSVIDStream = BoxStream<WitsvidResponse>;
    type FetchWITBundlesStream = BoxStream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let shared = &self.shared;
        let caller = shared.caller(&request).await?;
        let watch = Watch::new(shared, caller);
        let (ids, lease) = shared.identities(&watch.caller).inspect_err(|e| {
            if matches!(e, ApiError::NoIdentity) {
                shared.log_denied(&watch.caller);
            }
        })?;
        log_issued(&watch.caller, &ids, "X.509-SVID");
        let bundle = shared.authority.x509_bundle();
        let last = x509_fingerprint(&ids, bundle.sequence);
        let first = shared.x509_response(&last, &ids, &bundle);

        // State: (watch, last fingerprint, lease held while streaming, first message, ended).
        let state = (watch, last, lease, Some(first), false);
        let stream = futures::stream::unfold(
            state,
            |(mut w, mut last, mut lease, first, ended)| async move {
                if let Some(msg) = first {
                    return Some((Ok(msg), (w, last, lease, None, false)));
                }
                if ended {
                    return None;
                }
                loop {
                    if !w.changed().await {
                        return None;
                    }
                    if let Err(e) = w.refresh().await {
                        return Some((Err(e.into()), (w, last, lease, None, true)));
                    }
                    match w.shared.identities(&w.caller) {
                        Ok((ids, new_lease)) => {
                            let bundle = w.shared.authority.x509_bundle();
                            let fp = x509_fingerprint(&ids, bundle.sequence);
                            if fp == last {
                                continue;
                            }
                            lease = new_lease;
                            tracing::debug!(pid = ?w.caller.cred.pid, uid = w.caller.cred.uid, svids = ids.len(), "pushing X.509-SVID update");
                            let msg = w.shared.x509_response(&fp, &ids, &bundle);
                            last = fp;
                            return Some((Ok(msg), (w, last, lease, None, false)));
                        }
                        Err(e) => {
                            // Losing every identity ends the stream with PermissionDenied
                            // (CONFORMANCE item 27), never an empty message.
                            if matches!(e, ApiError::NoIdentity) {
                                w.shared.log_denied(&w.caller);
                            }
                            return Some((Err(e.into()), (w, last, lease, None, true)));
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let watch = self.bundle_watch(&request).await?;
        Ok(Response::new(bundle_stream(
            watch,
            Shared::x509_bundles_response,
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let shared = &self.shared;
        let caller = shared.caller(&request).await?;
        let req = request.into_inner();
        if let Err(e) = shared.limits.check_fetch_audiences(&req.audience) {
            shared.log_bad_request(&caller, &e);
            return Err(e.into());
        }
        let wanted = if req.spiffe_id.is_empty() {
            None
        } else {
            match SpiffeId::new(&req.spiffe_id) {
                Ok(id) => Some(id),
                Err(e) => {
                    let e = ApiError::BadRequest(format!("invalid requested SPIFFE ID: {e}"));
                    shared.log_bad_request(&caller, &e);
                    return Err(e.into());
                }
            }
        };
        let set = shared.entries.borrow().clone();
        let mut entries = shared.entitled(&caller, &set);
        if entries.is_empty() {
            shared.log_denied(&caller);
            return Err(ApiError::NoIdentity.into());
        }
        if let Some(id) = &wanted {
            entries.retain(|e| &e.spiffe_id == id);
            if entries.is_empty() {
                if shared.throttle.allow(Denial::NotEntitled) {
                    tracing::info!(pid = ?caller.cred.pid, uid = caller.cred.uid, requested = %Untrusted(&id.to_string()), "JWT-SVID denied: not entitled");
                }
                return Err(ApiError::NotEntitled(id.to_string()).into());
            }
        }
        let svids = shared
            .authority
            .jwt_svids(&entries, &req.audience)
            .map_err(ApiError::from)?;
        for e in &entries {
            tracing::info!(spiffe_id = %e.spiffe_id, entry = %e.id, pid = ?caller.cred.pid, uid = caller.cred.uid, audience = %UntrustedList(&req.audience), "issued JWT-SVID");
        }
        Ok(Response::new(JwtsvidResponse {
            svids: entries
                .iter()
                .zip(svids)
                .map(|(e, s)| Jwtsvid {
                    spiffe_id: s.spiffe_id.to_string(),
                    svid: s.token.to_string(),
                    hint: e.hint.clone().unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let watch = self.bundle_watch(&request).await?;
        Ok(Response::new(bundle_stream(
            watch,
            Shared::jwt_bundles_response,
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let shared = &self.shared;
        // Any attested caller may validate, with or without an identity (as SPIRE does).
        let caller = shared.caller(&request).await?;
        let req = request.into_inner();
        let checked = if req.audience.is_empty() {
            Err(ApiError::BadRequest("audience must be specified".into()))
        } else if req.svid.is_empty() {
            Err(ApiError::BadRequest("svid must be specified".into()))
        } else {
            shared.limits.check_validate(&req.svid, &req.audience)
        };
        if let Err(e) = checked {
            shared.log_bad_request(&caller, &e);
            return Err(e.into());
        }
        let v = shared
            .authority
            .validate_jwt(&req.svid, &req.audience)
            .inspect_err(|e| {
                // The error holds caller-supplied text (kid, alg, audiences), bounded where
                // the authority builds it; the line itself is throttled.
                if shared.throttle.allow(Denial::JwtRejected) {
                    tracing::info!(pid = ?caller.cred.pid, uid = caller.cred.uid, reason = %e, "JWT-SVID rejected");
                }
            })
            .map_err(ApiError::from)?;
        let Ok(serde_json::Value::Object(claims)) =
            serde_json::from_slice::<serde_json::Value>(&v.claims_json)
        else {
            return Err(ApiError::Internal("validated claims are not an object".into()).into());
        };
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(crate::jwt::claims_struct(claims)),
        }))
    }

    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        check_header(&request)?;
        Err(ApiError::Unimplemented("the WIT-SVID profile is not supported").into())
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_header(&request)?;
        Err(ApiError::Unimplemented("the WIT-SVID profile is not supported").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_must_be_exactly_one_true() {
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_header(&ok).is_ok());
        for bad in ["True", "TRUE", "1", "yes", ""] {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert(SECURITY_HEADER, bad.parse().unwrap());
            assert!(check_header(&r).is_err(), "{bad:?} must be refused");
        }
        assert!(check_header(&Request::new(())).is_err());
        let mut twice = Request::new(());
        twice
            .metadata_mut()
            .append(SECURITY_HEADER, "true".parse().unwrap());
        twice
            .metadata_mut()
            .append(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_header(&twice).is_err());
    }

    #[test]
    fn synthetic_segments_are_valid_id_paths() {
        assert_eq!(id_segment("python3.11"), "python3.11");
        assert_eq!(id_segment("my app"), "my_app");
        assert_eq!(id_segment(".."), "_..");
        assert_eq!(id_segment(""), "_");
        assert!(SpiffeId::new(format!("spiffe://td/uid-1/{}", id_segment("ü?x"))).is_ok());
    }
}
