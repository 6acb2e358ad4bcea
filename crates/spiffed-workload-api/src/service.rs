//! The `SpiffeWorkloadAPI` service implementation.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::Stream;
use spiffed_core::{
    Attested, Attestor, BundleSet, Entry, EntryEvent, EntryFeed, EntryId, Identity, Issuer,
    JwtError, Needs, PeerCred, Selector, SpiffeId, SvidWatch, TrustDomain,
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
use crate::gate::Gate;
use crate::limits::{Denial, RequestLimits, Throttle};
use spiffed_core::untrusted::{Untrusted, UntrustedList};

/// The security header every Workload API request must carry ([WEP §3]).
const SECURITY_HEADER: &str = "workload.spiffe.io";
/// Largest request accepted; Workload API requests are tiny.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The selector type dev mode's synthetic identities are named after (the executable).
const SYNTHETIC_NEEDS: &str = "unix:path";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub(crate) struct Shared {
    attestor: Arc<dyn Attestor>,
    issuer: Arc<dyn Issuer>,
    entries: EntryFeed,
    synthetic_ids: bool,
    /// Every caller receives every federated bundle (`[federation] federate_all`), not only
    /// those its entries' `federates_with` name.
    federate_all: bool,
    responses: Responses,
    /// What one request may carry.
    limits: RequestLimits,
    /// Denial lines per kind per second.
    throttle: Throttle,
    wakeups: WakeupCounters,
    denials: DenialCounters,
}

/// Callers refused an identity since the service was built, by reason (see
/// [`WorkloadApi::denials`]). Counted on the refusal path only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Denials {
    /// Attestation failed: the process that opened the connection is gone (or was replaced).
    pub process_gone: u64,
    /// Attestation failed: `/proc/PID` could not be read.
    pub proc_unreadable: u64,
    /// Attestation failed in an attestor plugin.
    pub plugin_failed: u64,
    /// The caller matches no entry ("no identity issued").
    pub no_identity: u64,
    /// The caller asked for a SPIFFE ID it does not hold.
    pub not_entitled: u64,
}

#[derive(Default)]
struct DenialCounters {
    process_gone: AtomicU64,
    proc_unreadable: AtomicU64,
    plugin_failed: AtomicU64,
    no_identity: AtomicU64,
    not_entitled: AtomicU64,
}

impl DenialCounters {
    fn attestation(&self, e: &spiffed_core::AttestError) {
        let counter = match e {
            spiffed_core::AttestError::ProcessGone { .. } => &self.process_gone,
            spiffed_core::AttestError::Proc { .. } => &self.proc_unreadable,
            _ => &self.plugin_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How often open streams woke up, and what each wake-up cost (see [`WorkloadApi::wakeups`]).
///
/// An entry change wakes every open stream, each of which first checks, from the change alone,
/// whether it can concern its caller; an SVID rotation wakes only the streams holding that
/// entry's SVID; a bundle change wakes every stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wakeups {
    /// Wake-ups that recomputed a stream's response: matched entries again, or read new SVIDs
    /// or bundles (a message is sent only when it differs from the last one).
    pub recomputed: u64,
    /// Wake-ups on an entry change that concerned none of the caller's entries (nor needed
    /// more facts about it): the stream went back to sleep without matching or asking the
    /// issuer anything.
    pub filtered: u64,
}

#[derive(Default)]
struct WakeupCounters {
    recomputed: AtomicU64,
    filtered: AtomicU64,
}

impl WakeupCounters {
    fn recomputed(&self) {
        self.recomputed.fetch_add(1, Ordering::Relaxed);
    }

    fn filtered(&self) {
        self.filtered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Most entry changes in one event that a stream judges one by one; it matches again past this.
const MAX_CHANGES_JUDGED: usize = 256;

/// Most X.509-SVID responses kept; the cache starts afresh when full.
const MAX_SHARED_RESPONSES: usize = 256;

/// Responses encoded once and shared by every stream that sends the same message.
#[derive(Default)]
struct Responses {
    /// X.509-SVID responses of the current bundle set sequence, by the stream fingerprint that
    /// determines them completely.
    x509: Mutex<HashMap<X509Fingerprint, Encoded<X509svidResponse>>>,
    x509_bundles: Mutex<Option<(u64, Encoded<X509BundlesResponse>)>>,
    jwt_bundles: Mutex<Option<(u64, Encoded<JwtBundlesResponse>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each guarded value is a cache that is valid after any panic mid-update.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The cached message for bundle set `sequence`, or a fresh one made by `make`.
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
            .field("wakeups", &self.wakeups())
            .finish_non_exhaustive()
    }
}

/// Who is calling: kernel facts plus what attestation derived.
#[derive(Clone)]
pub(crate) struct Caller {
    cred: PeerCred,
    attested: Attested,
    /// Every selector type asked for or gathered: selectors of other types were not looked
    /// for, so an entry that uses one needs the caller attested again.
    covered: Needs,
}

impl Caller {
    /// The caller's kernel credentials.
    pub(crate) fn cred(&self) -> &PeerCred {
        &self.cred
    }

    /// Whether `event` can alter what this caller is entitled to: a change's entry matched the
    /// caller before or matches it now, or the entries now use a selector type that was not
    /// looked for (`needs`, what the entries need after the event: the caller must be attested
    /// again to judge them). Runs for every open stream on every event, so it allocates nothing.
    fn concerned_by(&self, event: &EntryEvent, needs: &Needs) -> bool {
        !self.covered.covers(needs)
            || event
                .changes
                .iter()
                .any(|c| c.concerns(&self.attested.selectors))
    }
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
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
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
    /// The selector types to gather about callers: what the entries' selectors use, and the
    /// executable's path for dev mode's synthetic IDs.
    fn needs(&self) -> Needs {
        let mut needs = self.entries.needs();
        if self.synthetic_ids {
            needs.insert(SYNTHETIC_NEEDS);
        }
        needs
    }

    async fn attest(&self, cred: &PeerCred, needs: &Needs) -> Result<Attested, ApiError> {
        self.attestor.attest(cred, needs).await.map_err(|e| {
            self.denials.attestation(&e);
            if self.throttle.allow(Denial::Attestation) {
                tracing::info!(pid = ?cred.pid, uid = cred.uid, error = %e, "attestation failed");
            }
            e.into()
        })
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, ApiError> {
        check_header(req)?;
        self.attested_caller(req).await
    }

    /// The caller of `req`, attested from the connection's kernel credentials, without the
    /// security header check (Envoy SDS sends no such header).
    pub(crate) async fn attested_caller<T>(&self, req: &Request<T>) -> Result<Caller, ApiError> {
        let cred = req
            .extensions()
            .get::<PeerCred>()
            .cloned()
            .ok_or(ApiError::NoPeerCred)?;
        let needs = self.needs();
        let attested = self.attest(&cred, &needs).await?;
        let covered = needs.union(&attested.gathered);
        Ok(Caller {
            cred,
            attested,
            covered,
        })
    }

    /// Attests `caller` again when the entries now use selector types that its attestation did
    /// not look for (an entry with a type new to the set, such as `unix:path`, was added while
    /// its stream was open), so that such an entry is judged on real facts.
    async fn refresh(&self, caller: &mut Caller) -> Result<(), ApiError> {
        let want = self.needs();
        if !caller.covered.covers(&want) {
            let ask = caller.covered.union(&want);
            caller.attested = self.attest(&caller.cred, &ask).await?;
            caller.covered = ask.union(&caller.attested.gathered);
        }
        Ok(())
    }

    /// The entries that grant `caller` an identity now (or its synthetic one).
    fn entitled(&self, caller: &Caller) -> Vec<Arc<Entry>> {
        let matched = self.entries.matching(&caller.attested.selectors);
        if !matched.is_empty() || !self.synthetic_ids {
            return matched;
        }
        synthetic_entry(self.issuer.trust_domain(), &caller.attested)
            .into_iter()
            .collect()
    }

    /// Like [`entitled`](Self::entitled), but `NoIdentity` (logged) when there are none.
    fn entitled_or_denied(&self, caller: &Caller) -> Result<Vec<Arc<Entry>>, ApiError> {
        let entries = self.entitled(caller);
        if entries.is_empty() {
            self.denials.no_identity.fetch_add(1, Ordering::Relaxed);
            self.log_denied(caller);
            return Err(ApiError::NoIdentity);
        }
        Ok(entries)
    }

    /// The response for `ids` with the bundles of `set` (taken once by the caller, so `fp`,
    /// their fingerprint, and the message agree), encoded once for every stream that sends it:
    /// the fingerprint (entry, serial and hint of each SVID, and the bundle set's sequence)
    /// determines the message completely, so it is the cache key.
    fn x509_response(
        &self,
        fp: &X509Fingerprint,
        ids: &[Identity],
        set: &BundleSet,
    ) -> Encoded<X509svidResponse> {
        if let Some(enc) = lock(&self.responses.x509).get(fp) {
            return enc.clone();
        }
        let enc = x509_svid_response_for(ids, set, self.federate_all);
        let mut cache = lock(&self.responses.x509);
        let stale = cache.keys().next().is_some_and(|(_, seq)| *seq != fp.1);
        if stale || cache.len() >= MAX_SHARED_RESPONSES {
            cache.clear();
        }
        cache.insert(fp.clone(), enc.clone());
        enc
    }

    /// The X.509 bundles a caller whose entries federate with `federates` receives: the own
    /// trust domain's, and each federated one its entries name (as spire-agent). The answer
    /// for callers that receive the own bundle only is encoded once and shared.
    fn x509_bundles_response(
        &self,
        set: &BundleSet,
        federates: &[TrustDomain],
    ) -> Encoded<X509BundlesResponse> {
        let make = || X509BundlesResponse {
            crl: vec![],
            bundles: x509_bundle_map(visible(set, federates)),
        };
        if visible(set, federates).nth(1).is_none() {
            shared_bundle(&self.responses.x509_bundles, set.sequence(), make)
        } else {
            Encoded::new(&make())
        }
    }

    /// The JWT bundles a caller whose entries federate with `federates` receives (as
    /// [`x509_bundles_response`](Self::x509_bundles_response)).
    fn jwt_bundles_response(
        &self,
        set: &BundleSet,
        federates: &[TrustDomain],
    ) -> Encoded<JwtBundlesResponse> {
        let make = || JwtBundlesResponse {
            bundles: visible(set, federates)
                .map(|b| (b.trust_domain().id_string(), crate::jwt::jwks(&b.jwt)))
                .collect(),
        };
        if visible(set, federates).nth(1).is_none() {
            shared_bundle(&self.responses.jwt_bundles, set.sequence(), make)
        } else {
            Encoded::new(&make())
        }
    }
}

/// The bundles of `set` that a caller receives: the own trust domain's first, then the
/// federated ones named in `federates` (the `federates_with` of the caller's entries).
fn visible<'a>(
    set: &'a BundleSet,
    federates: &'a [TrustDomain],
) -> impl Iterator<Item = &'a spiffed_core::TrustBundle> {
    std::iter::once(set.own()).chain(
        set.federated()
            .filter(move |b| federates.contains(b.trust_domain())),
    )
}

impl Shared {
    /// The federated trust domains a caller holding `entries` receives the bundles of: those
    /// the entries federate with, or every one in `set` with `federate_all`.
    pub(crate) fn federates(&self, set: &BundleSet, entries: &[Arc<Entry>]) -> Vec<TrustDomain> {
        if self.federate_all {
            set.federated().map(|b| b.trust_domain().clone()).collect()
        } else {
            federates_of(entries.iter())
        }
    }

    /// Whether every caller receives every federated bundle.
    pub(crate) fn federate_all(&self) -> bool {
        self.federate_all
    }
}

/// The trust domains the entries federate with, sorted, without duplicates.
fn federates_of<'a>(entries: impl Iterator<Item = &'a Arc<Entry>>) -> Vec<TrustDomain> {
    let mut tds: Vec<TrustDomain> = entries
        .flat_map(|e| e.federates_with.iter().cloned())
        .collect();
    tds.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    tds.dedup();
    tds
}

/// X.509 bundles keyed by trust domain ID (`spiffe://td`), each as concatenated DER. A trust
/// domain without X.509 authorities is left out: clients unload a bundle that is absent.
fn x509_bundle_map<'a>(
    bundles: impl Iterator<Item = &'a spiffed_core::TrustBundle>,
) -> HashMap<String, Vec<u8>> {
    bundles
        .filter(|b| !b.x509.authorities.is_empty())
        .map(|b| (b.trust_domain().id_string(), b.x509.concatenated_der()))
        .collect()
}

/// The `FetchX509SVID` message for `ids`: each SVID with the own trust domain's X.509 bundle,
/// and in `federated_bundles` the X.509 authorities of every federated trust domain that one of
/// the identities' entries federates with (as spire-agent: a workload receives only the
/// federated bundles its entries name). Encoded.
///
/// The agent encodes each distinct message once per change and shares it between the streams
/// that send it; public for the encoding benchmark.
pub fn x509_svid_response(ids: &[Identity], set: &BundleSet) -> Encoded<X509svidResponse> {
    x509_svid_response_for(ids, set, false)
}

/// [`x509_svid_response`], with every federated bundle of `set` when `federate_all`.
pub fn x509_svid_response_for(
    ids: &[Identity],
    set: &BundleSet,
    federate_all: bool,
) -> Encoded<X509svidResponse> {
    let der = set.own().x509.concatenated_der();
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
        federated_bundles: x509_bundle_map(set.federated().filter(|b| {
            federate_all
                || ids
                    .iter()
                    .any(|i| i.entry.federates_with.contains(b.trust_domain()))
        })),
    };
    let enc = Encoded::new(&msg);
    // `msg` holds a copy of each private key: wipe it now that the bytes are encoded.
    for mut svid in msg.svids {
        svid.x509_svid_key.zeroize();
    }
    enc
}

/// What a stream last sent, to send only real changes: each SVID by entry and serial with its
/// hint and the trust domains it federates with (an entry's hint or federation can change
/// without a new SVID), and the bundle set's sequence.
pub(crate) type X509Fingerprint = (
    Vec<(EntryId, Vec<u8>, Option<String>, Vec<TrustDomain>)>,
    u64,
);

fn x509_fingerprint(ids: &[Identity], bundle_seq: u64) -> X509Fingerprint {
    (
        ids.iter()
            .map(|i| {
                (
                    i.entry.id.clone(),
                    i.x509.serial.clone(),
                    i.entry.hint.clone(),
                    i.entry.federates_with.clone(),
                )
            })
            .collect(),
        bundle_seq,
    )
}

/// Why a stream woke up.
pub(crate) enum Wake {
    /// An entry change was published.
    Entries(Arc<EntryEvent>),
    /// The bundle set changed.
    Bundles,
    /// The SVID held at this index was replaced (`true`) or its issuer let go of it (`false`).
    Svid(usize, bool),
    /// The agent is stopping (the entry publisher or the issuer is gone).
    Stopped,
}

/// What every stream waits on: the entry feed (with the last revision it judged) and the bundle
/// set.
struct Subscription {
    shared: Arc<Shared>,
    caller: Caller,
    entries: EntryFeed,
    seen: u64,
    bundles: watch::Receiver<Arc<BundleSet>>,
}

impl Subscription {
    /// Subscribes before the caller's first answer is computed, so that no change after it is
    /// missed.
    fn new(shared: &Arc<Shared>, caller: Caller) -> Self {
        let mut entries = shared.entries.clone();
        let seen = entries.latest().revision;
        let bundles = shared.issuer.bundles();
        Self {
            shared: shared.clone(),
            caller,
            entries,
            seen,
            bundles,
        }
    }

    /// The bundle set now, marking it seen.
    fn bundle_set(&mut self) -> Arc<BundleSet> {
        self.bundles.borrow_and_update().clone()
    }

    /// Whether `event` needs the caller's entries matched again: it concerns them, or it does
    /// not directly follow the last event judged (events were missed). Counts the wake-up.
    fn must_rematch(&mut self, event: &EntryEvent) -> bool {
        let follows = event.follows(self.seen);
        self.seen = self.seen.max(event.revision);
        // A huge event (a reload replacing many entries) costs each stream more to judge change
        // by change than to match its caller against the index again.
        let rematch = !follows
            || event.changes.len() > MAX_CHANGES_JUDGED
            || self.caller.concerned_by(event, &self.shared.needs());
        if rematch {
            self.shared.wakeups.recomputed();
        } else {
            self.shared.wakeups.filtered();
        }
        rematch
    }

    /// Waits for the next entry event, bundle change, or replacement of a `held` SVID.
    async fn wait(&mut self, held: &mut [Held]) -> Wake {
        // Entry events first: when one arrives with an SVID replacement it caused (a changed
        // entry re-minted), the re-match takes both in one wake-up.
        tokio::select! {
            biased;
            event = self.entries.changed() => event.map_or(Wake::Stopped, Wake::Entries),
            r = self.bundles.changed() => if r.is_ok() { Wake::Bundles } else { Wake::Stopped },
            (i, open) = svid_changed(held) => Wake::Svid(i, open),
        }
    }
}

/// Waits until one of `held`'s SVIDs is replaced; never, if there are none.
async fn svid_changed(held: &mut [Held]) -> (usize, bool) {
    match held {
        [] => std::future::pending().await,
        // Most streams hold one identity: wait on it without allocating.
        [one] => (0, one.svid.changed().await),
        many => {
            let waits = many.iter_mut().map(|h| Box::pin(h.svid.changed()));
            let (open, i, _) = futures::future::select_all(waits).await;
            (i, open)
        }
    }
}

/// One identity a stream sends: its entry, and the watch on the entry's SVID (holding it keeps
/// the SVID issued and rotated).
struct Held {
    entry: Arc<Entry>,
    svid: SvidWatch,
}

/// The state of a `FetchX509SVID` stream, and of an SDS stream (which sends the same
/// identities and bundles in Envoy's form).
pub(crate) struct X509Stream {
    sub: Subscription,
    held: Vec<Held>,
    last: Option<X509Fingerprint>,
    /// SVID watches closed in a row (the issuer let go of an entry the caller still holds).
    closed_in_a_row: u32,
    /// Whether a caller with no identity keeps its stream (SDS: bundles are still served, and
    /// an entry registered later is pushed); the Workload API ends it with PermissionDenied.
    keep_without_identity: bool,
    /// The wait is polled only when one of its watches fired (see [`Gate`]).
    gate: Gate,
}

impl X509Stream {
    /// A stream for `caller`, subscribed to every change before its first answer is made;
    /// [`rematch`](Self::rematch) must run before the first message.
    pub(crate) fn new(shared: &Arc<Shared>, caller: Caller, keep_without_identity: bool) -> Self {
        Self {
            sub: Subscription::new(shared, caller),
            held: Vec::new(),
            last: None,
            closed_in_a_row: 0,
            keep_without_identity,
            gate: Gate::default(),
        }
    }

    /// The attested caller.
    pub(crate) fn caller(&self) -> &Caller {
        &self.sub.caller
    }

    /// Matches the caller's entries again and brings the SVID watches in line: entries kept
    /// unchanged keep their watch, new or changed entries are asked of the issuer, and watches
    /// of entries no longer granted are dropped. `NoIdentity` when nothing is left.
    pub(crate) async fn rematch(&mut self) -> Result<(), ApiError> {
        let shared = self.sub.shared.clone();
        shared.refresh(&mut self.sub.caller).await?;
        let entries = if self.keep_without_identity {
            shared.entitled(&self.sub.caller)
        } else {
            shared.entitled_or_denied(&self.sub.caller)?
        };
        let mut old: HashMap<EntryId, Held> = self
            .held
            .drain(..)
            .map(|h| (h.entry.id.clone(), h))
            .collect();
        let mut held = Vec::with_capacity(entries.len());
        for entry in entries {
            let svid = match old.remove(&entry.id) {
                Some(h) if h.entry == entry => h.svid,
                // A changed entry is asked for again (while the old watch is still held), so
                // the issuer learns of the change.
                _ => shared.issuer.x509_svid(&entry).await?,
            };
            held.push(Held { entry, svid });
        }
        self.held = held;
        Ok(())
    }

    /// The current SVIDs (in the caller's entry order) and bundles, and `None` when they are
    /// what was last taken (same SVIDs, hints, federation and bundle set sequence).
    pub(crate) fn next_snapshot(&mut self) -> Option<(Vec<Identity>, Arc<BundleSet>)> {
        let set = self.sub.bundle_set();
        let ids: Vec<Identity> = self
            .held
            .iter_mut()
            .map(|h| Identity {
                entry: h.entry.clone(),
                x509: h.svid.current(),
            })
            .collect();
        let fp = x509_fingerprint(&ids, set.sequence());
        if self.last.as_ref() == Some(&fp) {
            return None;
        }
        self.last = Some(fp);
        Some((ids, set))
    }

    /// The fingerprint of the snapshot last taken (entry, serial, hint and federation of each
    /// SVID, and the bundle set sequence): it determines what the workload holds completely.
    pub(crate) fn fingerprint(&self) -> Option<&X509Fingerprint> {
        self.last.as_ref()
    }

    /// The message for the current SVIDs and bundles, and `None` when it is what was last sent.
    fn next_message(&mut self) -> Option<(Vec<Identity>, Encoded<X509svidResponse>)> {
        let (ids, set) = self.next_snapshot()?;
        let fp = self.last.as_ref()?;
        let msg = self.sub.shared.x509_response(fp, &ids, &set);
        Some((ids, msg))
    }

    /// Waits for the next message to send; `None` when the agent stops, an error when the
    /// stream must end with it (the caller lost every identity: PermissionDenied, CONFORMANCE
    /// item 27, never an empty message).
    async fn next(&mut self) -> Option<Result<Encoded<X509svidResponse>, ApiError>> {
        loop {
            let wake = self.wait().await;
            if let Err(e) = self.handle(wake).await? {
                return Some(Err(e));
            }
            if let Some((ids, msg)) = self.next_message() {
                let c = &self.sub.caller.cred;
                tracing::debug!(pid = ?c.pid, uid = c.uid, svids = ids.len(), "pushing X.509-SVID update");
                return Some(Ok(msg));
            }
        }
    }

    /// Waits for the next change that may alter the stream's answer. Cancel-safe: nothing
    /// changes until the wake-up is [handled](Self::handle).
    pub(crate) async fn wait(&mut self) -> Wake {
        let Self {
            sub, held, gate, ..
        } = self;
        gate.run(sub.wait(held)).await
    }

    /// Brings the stream in line with `wake`: matches the caller again when entries changed in
    /// a way that concerns it (or an SVID watch closed). `None` when the agent stops; an error
    /// when the stream must end with it. Not cancel-safe: run it to completion.
    pub(crate) async fn handle(&mut self, wake: Wake) -> Option<Result<(), ApiError>> {
        if matches!(wake, Wake::Svid(_, false)) {
            // The issuer let go of an entry this stream holds: it is stopping, or the entry
            // went away. Ask again (or learn that it is gone); twice in a row means the
            // issuer is stopping.
            self.closed_in_a_row += 1;
            if self.closed_in_a_row > 1 {
                return None;
            }
        } else {
            self.closed_in_a_row = 0;
        }
        let rematch = match wake {
            Wake::Stopped => return None,
            Wake::Entries(event) => self.sub.must_rematch(&event),
            Wake::Bundles => {
                self.sub.shared.wakeups.recomputed();
                false
            }
            Wake::Svid(i, true) => {
                self.sub.shared.wakeups.recomputed();
                if let Some(h) = self.held.get(i) {
                    tracing::debug!(entry = %h.entry.id, pid = ?self.sub.caller.cred.pid, "SVID replaced");
                }
                false
            }
            Wake::Svid(i, false) => {
                self.sub.shared.wakeups.recomputed();
                self.held.remove(i);
                true
            }
        };
        if rematch && let Err(e) = self.rematch().await {
            return Some(Err(e));
        }
        Some(Ok(()))
    }
}

impl WorkloadApi {
    /// Builds the service.
    ///
    /// - `attestor` turns each caller's kernel credentials into selectors, gathering what
    ///   `entries` needs (plus `unix:path` when `synthetic_ids`).
    /// - `issuer` mints SVIDs per entry (streams hold one [`SvidWatch`] per identity they send)
    ///   and publishes the bundle set (own and federated trust domains).
    /// - `entries` is the live entry index and its change feed; dropping its publisher ends
    ///   every open stream.
    /// - `synthetic_ids` gives callers that match no entry the identity
    ///   `spiffe://TD/uid-UID/EXE_NAME` (dev mode).
    pub fn new(
        attestor: Arc<dyn Attestor>,
        issuer: Arc<dyn Issuer>,
        entries: EntryFeed,
        synthetic_ids: bool,
    ) -> Self {
        Self::build(
            attestor,
            issuer,
            entries,
            (synthetic_ids, false),
            RequestLimits::default(),
        )
    }

    /// The same service with other request limits (default [`RequestLimits::default`]).
    /// Call it before serving: the wake-up counters start again from zero.
    pub fn with_limits(self, limits: RequestLimits) -> Self {
        let s = &self.shared;
        Self::build(
            s.attestor.clone(),
            s.issuer.clone(),
            s.entries.clone(),
            (s.synthetic_ids, s.federate_all),
            limits,
        )
    }

    /// The same service giving every caller every federated bundle when `federate_all` (the
    /// agent's `[federation] federate_all`), instead of those its entries' `federates_with`
    /// name (the default). Call it before serving: the counters start again from zero.
    pub fn with_federate_all(self, federate_all: bool) -> Self {
        let s = &self.shared;
        Self::build(
            s.attestor.clone(),
            s.issuer.clone(),
            s.entries.clone(),
            (s.synthetic_ids, federate_all),
            s.limits,
        )
    }

    /// The one place the shared state is made, so a new field is set once.
    fn build(
        attestor: Arc<dyn Attestor>,
        issuer: Arc<dyn Issuer>,
        entries: EntryFeed,
        (synthetic_ids, federate_all): (bool, bool),
        limits: RequestLimits,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                attestor,
                issuer,
                entries,
                synthetic_ids,
                federate_all,
                responses: Responses::default(),
                limits,
                throttle: Throttle::new(limits.denial_log_lines_per_second),
                wakeups: WakeupCounters::default(),
                denials: DenialCounters::default(),
            }),
        }
    }

    /// How often open streams have woken up since the service was built, by what it cost.
    pub fn wakeups(&self) -> Wakeups {
        let w = &self.shared.wakeups;
        Wakeups {
            recomputed: w.recomputed.load(Ordering::Relaxed),
            filtered: w.filtered.load(Ordering::Relaxed),
        }
    }

    /// How many callers were refused an identity since the service was built, by reason.
    pub fn denials(&self) -> Denials {
        let d = &self.shared.denials;
        Denials {
            process_gone: d.process_gone.load(Ordering::Relaxed),
            proc_unreadable: d.proc_unreadable.load(Ordering::Relaxed),
            plugin_failed: d.plugin_failed.load(Ordering::Relaxed),
            no_identity: d.no_identity.load(Ordering::Relaxed),
            not_entitled: d.not_entitled.load(Ordering::Relaxed),
        }
    }

    /// The tonic service, with request size limits set.
    pub fn into_server(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

impl WorkloadApi {
    /// The state every front end on this service shares (the SDS service uses it).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Attests the caller of a bundle stream, which needs an identity (as in SPIRE).
    async fn bundle_subscription<T>(&self, request: &Request<T>) -> Result<Subscription, Status> {
        let shared = &self.shared;
        let caller = shared.caller(request).await?;
        let sub = Subscription::new(shared, caller);
        shared.entitled_or_denied(&sub.caller)?;
        Ok(sub)
    }
}

/// A bundle stream: the first message at once, then one whenever the bundle set's content
/// changes (equal messages are suppressed, as SPIRE does: a CA activation, for one, bumps the
/// sequence without changing what this stream sends); it ends with PermissionDenied once the
/// caller has no identity left.
fn bundle_stream<T: Send + 'static>(
    mut sub: Subscription,
    make: fn(&Shared, &BundleSet, &[TrustDomain]) -> Encoded<T>,
) -> BoxStream<Encoded<T>> {
    let set = sub.bundle_set();
    let federates = sub
        .shared
        .federates(&set, &sub.shared.entitled(&sub.caller));
    let first = make(&sub.shared, &set, &federates);
    let state = (sub, first.clone(), Some(first), false);
    Box::pin(futures::stream::unfold(
        state,
        move |(mut sub, mut last, first, ended)| async move {
            if let Some(msg) = first {
                return Some((Ok(msg), (sub, last, None, false)));
            }
            if ended {
                return None;
            }
            loop {
                match sub.wait(&mut []).await {
                    Wake::Stopped => return None,
                    Wake::Entries(event) => {
                        if !sub.must_rematch(&event) {
                            continue;
                        }
                        let shared = sub.shared.clone();
                        let checked = match shared.refresh(&mut sub.caller).await {
                            Ok(()) => shared.entitled_or_denied(&sub.caller).map(drop),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = checked {
                            return Some((Err(e.into()), (sub, last, None, true)));
                        }
                    }
                    Wake::Bundles => sub.shared.wakeups.recomputed(),
                    Wake::Svid(..) => continue,
                }
                let set = sub.bundle_set();
                let federates = sub
                    .shared
                    .federates(&set, &sub.shared.entitled(&sub.caller));
                let msg = make(&sub.shared, &set, &federates);
                if msg == last {
                    continue;
                }
                last = msg.clone();
                return Some((Ok(msg), (sub, last, None, false)));
            }
        },
    ))
}

impl Shared {
    /// Logs (throttled) that `caller` matches no entry, with its selectors: a selector holds
    /// caller-controlled text (the executable's path), so each is bounded.
    pub(crate) fn log_denied(&self, caller: &Caller) {
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

    /// Whether a log line of kind `what` may be written now (denial_log_lines_per_second).
    pub(crate) fn log_allowed(&self, what: Denial) -> bool {
        self.throttle.allow(what)
    }

    /// Logs (throttled) a refused request, with the reason.
    fn log_bad_request(&self, caller: &Caller, e: &ApiError) {
        if self.throttle.allow(Denial::BadRequest) {
            tracing::info!(pid = ?caller.cred.pid, uid = caller.cred.uid, reason = %e, "request refused");
        }
    }
}

pub(crate) fn log_issued(caller: &Caller, ids: &[Identity], what: &str) {
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

pub(crate) fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    b.iter()
        .flat_map(|x| [x >> 4, x & 0xf])
        .map(|d| char::from(DIGITS[usize::from(d)]))
        .collect()
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
        let mut stream = X509Stream::new(shared, caller, false);
        stream.rematch().await?;
        let Some((ids, first)) = stream.next_message() else {
            return Err(ApiError::Internal("the first message was not made".into()).into());
        };
        log_issued(&stream.sub.caller, &ids, "X.509-SVID");

        // State: (stream, first message, ended).
        let state = (stream, Some(first), false);
        let out = futures::stream::unfold(state, |(mut s, first, ended)| async move {
            if let Some(msg) = first {
                return Some((Ok(msg), (s, None, false)));
            }
            if ended {
                return None;
            }
            match s.next().await? {
                Ok(msg) => Some((Ok(msg), (s, None, false))),
                Err(e) => Some((Err(e.into()), (s, None, true))),
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let sub = self.bundle_subscription(&request).await?;
        Ok(Response::new(bundle_stream(
            sub,
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
        let mut entries = shared.entitled_or_denied(&caller)?;
        if let Some(id) = &wanted {
            entries.retain(|e| &e.spiffe_id == id);
            if entries.is_empty() {
                shared.denials.not_entitled.fetch_add(1, Ordering::Relaxed);
                if shared.throttle.allow(Denial::NotEntitled) {
                    tracing::info!(pid = ?caller.cred.pid, uid = caller.cred.uid, requested = %Untrusted(&id.to_string()), "JWT-SVID denied: not entitled");
                }
                return Err(ApiError::NotEntitled(id.to_string()).into());
            }
        }
        let svids = futures::future::try_join_all(
            entries
                .iter()
                .map(|e| shared.issuer.jwt_svid(e, &req.audience)),
        )
        .await
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
        let sub = self.bundle_subscription(&request).await?;
        Ok(Response::new(bundle_stream(
            sub,
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
        // A token of a federated trust domain is checked only against a bundle the caller's
        // entries federate with (as spire-agent: the caller's own view of the bundles), or
        // any federated bundle with `federate_all`.
        let v = crate::jwt::subject_trust_domain(&req.svid)
            .filter(|td| td != shared.issuer.trust_domain())
            .filter(|td| {
                !shared.federate_all && !federates_of(shared.entitled(&caller).iter()).contains(td)
            })
            .map_or_else(
                || shared.issuer.validate_jwt(&req.svid, &req.audience),
                |td| Err(JwtError::NoBundle(td.as_str().to_owned())),
            )
            .inspect_err(|e| {
                // The error holds caller-supplied text (kid, alg, audiences), bounded where
                // the issuer builds it; the line itself is throttled.
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
    fn hex_is_two_lowercase_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
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
