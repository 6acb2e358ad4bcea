//! Test doubles for the seams of spiffed-core, to drive a stage (the Workload API service) with
//! no CA, no `/proc` and no real callers: [`TestIssuer`] mints stand-in SVIDs and tokens and
//! rotates them on demand; [`TestAttestor`] returns selectors scripted per uid or pid and counts
//! its calls. [`serve`] runs a gRPC service on a temporary Unix socket where each request
//! names its caller's credentials in a test header ([`as_peer`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use spiffed_core::{
    AttestError, Attested, Attestor, AuthorityError, BundleSet, Entry, EntryId, Issuer,
    JwtAuthority, JwtBundle, JwtError, JwtSvid, Needs, PeerCred, PrivateKey, Selector, SpiffeId,
    SvidWatch, TrustBundle, TrustDomain, ValidatedJwt, X509Bundle, X509Svid,
};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// A stand-in CA certificate for `td` (not DER: the bytes only have to be recognisable).
pub fn fake_ca(td: &str, n: u32) -> Vec<u8> {
    format!("ca:{td}:{n}").into_bytes()
}

/// `content` as one DER SEQUENCE (tag, definite length, bytes): the shape of a certificate,
/// so that code splitting a concatenated DER chain (SDS's PEM encoding) accepts stand-ins.
pub fn fake_der(content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![0x30];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// A trust bundle for `td` with these X.509 authorities and one JWT key `kid`.
pub fn trust_bundle(td: &str, x509_authorities: Vec<Vec<u8>>, kid: &str) -> TrustBundle {
    let trust_domain = TrustDomain::new(td).unwrap();
    let mut point = vec![4u8];
    point.extend([1u8; 64]);
    TrustBundle {
        x509: Arc::new(X509Bundle {
            trust_domain: trust_domain.clone(),
            authorities: x509_authorities,
            sequence: 1,
        }),
        jwt: Arc::new(JwtBundle {
            trust_domain,
            keys: vec![JwtAuthority {
                kid: kid.to_owned(),
                public_point: point,
                not_after: SystemTime::now() + Duration::from_secs(3600),
            }],
            sequence: 1,
        }),
    }
}

struct Minted {
    entry: Arc<Entry>,
    tx: watch::Sender<Arc<X509Svid>>,
}

#[derive(Default)]
struct IssuerState {
    serial: u64,
    svids: HashMap<EntryId, Minted>,
    /// Tokens minted: the subject and audiences each was made for.
    tokens: HashMap<String, (SpiffeId, Vec<String>)>,
    /// Scripted answers of `validate_jwt` by token.
    validations: HashMap<String, Result<ValidatedJwt, JwtError>>,
    failing: Option<String>,
}

/// An [`Issuer`] without a CA: each SVID is recognisable stand-in bytes
/// (`leaf:SPIFFE_ID:SERIAL` wrapped by [`fake_der`]) with a serial that grows, and each JWT-SVID an opaque token.
pub struct TestIssuer {
    td: TrustDomain,
    bundles: watch::Sender<Arc<BundleSet>>,
    state: Mutex<IssuerState>,
    x509_calls: AtomicUsize,
    jwt_calls: AtomicUsize,
}

impl TestIssuer {
    /// An issuer for `td` whose bundle set holds only its own bundle ([`fake_ca`]`(td, 1)`,
    /// JWT key `own-1`) at sequence 1.
    pub fn new(td: &str) -> Arc<Self> {
        let own = trust_bundle(td, vec![fake_ca(td, 1)], "own-1");
        let (bundles, _) = watch::channel(Arc::new(BundleSet::new(own, 1)));
        Arc::new(Self {
            td: TrustDomain::new(td).unwrap(),
            bundles,
            state: Mutex::new(IssuerState::default()),
            x509_calls: AtomicUsize::new(0),
            jwt_calls: AtomicUsize::new(0),
        })
    }

    fn mint(state: &mut IssuerState, entry: &Entry) -> Arc<X509Svid> {
        state.serial += 1;
        let serial = state.serial;
        let now = SystemTime::now();
        Arc::new(X509Svid {
            spiffe_id: entry.spiffe_id.clone(),
            cert_chain_der: fake_der(format!("leaf:{}:{serial}", entry.spiffe_id).as_bytes()),
            key: PrivateKey::new(Zeroizing::new(format!("key:{serial}").into_bytes())),
            serial: serial.to_be_bytes().to_vec(),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        })
    }

    /// Replaces the SVID of `entry` with a new one (a rotation); false if it was never issued.
    pub fn rotate(&self, entry: &EntryId) -> bool {
        let mut state = self.state.lock().unwrap();
        let Some(entry) = state.svids.get(entry).map(|m| m.entry.clone()) else {
            return false;
        };
        let svid = Self::mint(&mut state, &entry);
        state.svids[&entry.id].tx.send_replace(svid);
        true
    }

    /// The serial of the current SVID of `entry`, as the big-endian number it was made from.
    pub fn serial(&self, entry: &EntryId) -> Option<u64> {
        let state = self.state.lock().unwrap();
        let svid = state.svids.get(entry)?.tx.borrow().clone();
        Some(u64::from_be_bytes(svid.serial.as_slice().try_into().ok()?))
    }

    /// How many watches on `entry`'s SVID are held (the lease: streams sending it).
    pub fn holders(&self, entry: &EntryId) -> usize {
        self.state
            .lock()
            .unwrap()
            .svids
            .get(entry)
            .map_or(0, |m| m.tx.receiver_count())
    }

    /// Drops the SVID sender of `entry`, as an issuer that stops does.
    pub fn forget(&self, entry: &EntryId) {
        self.state.lock().unwrap().svids.remove(entry);
    }

    /// Publishes `set` as the bundle set.
    pub fn set_bundles(&self, set: BundleSet) {
        self.bundles.send_replace(Arc::new(set));
    }

    /// The current bundle set.
    pub fn bundle_set(&self) -> Arc<BundleSet> {
        self.bundles.borrow().clone()
    }

    /// Adds (or replaces) a federated trust domain with these X.509 authorities and one JWT
    /// key `kid`, at the next sequence.
    pub fn add_federated(&self, td: &str, x509_authorities: Vec<Vec<u8>>, kid: &str) {
        let set = (*self.bundle_set()).clone();
        let seq = set.sequence() + 1;
        self.set_bundles(set.with(trust_bundle(td, x509_authorities, kid), seq));
    }

    /// Removes a federated trust domain, at the next sequence.
    pub fn remove_federated(&self, td: &str) {
        let set = (*self.bundle_set()).clone();
        let seq = set.sequence() + 1;
        self.set_bundles(set.without(&TrustDomain::new(td).unwrap(), seq));
    }

    /// Makes `validate_jwt(token, _)` answer `answer`.
    pub fn script_validation(&self, token: &str, answer: Result<ValidatedJwt, JwtError>) {
        self.state
            .lock()
            .unwrap()
            .validations
            .insert(token.to_owned(), answer);
    }

    /// Makes every minting call fail with [`AuthorityError::Unavailable`] (`Some`) or succeed.
    pub fn fail_minting(&self, reason: Option<&str>) {
        self.state.lock().unwrap().failing = reason.map(str::to_owned);
    }

    /// Calls of [`Issuer::x509_svid`] so far.
    pub fn x509_calls(&self) -> usize {
        self.x509_calls.load(Ordering::SeqCst)
    }

    /// Calls of [`Issuer::jwt_svid`] so far.
    pub fn jwt_calls(&self) -> usize {
        self.jwt_calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Issuer for TestIssuer {
    fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    fn bundles(&self) -> watch::Receiver<Arc<BundleSet>> {
        self.bundles.subscribe()
    }

    async fn x509_svid(&self, entry: &Arc<Entry>) -> Result<SvidWatch, AuthorityError> {
        self.x509_calls.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        if let Some(reason) = &state.failing {
            return Err(AuthorityError::Unavailable(reason.clone()));
        }
        let unchanged = state
            .svids
            .get(&entry.id)
            .is_some_and(|m| m.entry == *entry);
        if !unchanged {
            // New, or changed (the SVID must carry the new entry's ID): mint, and tell holders.
            let svid = Self::mint(&mut state, entry);
            match state.svids.get_mut(&entry.id) {
                Some(m) => {
                    m.entry = entry.clone();
                    m.tx.send_replace(svid);
                }
                None => {
                    let (tx, _) = watch::channel(svid);
                    state.svids.insert(
                        entry.id.clone(),
                        Minted {
                            entry: entry.clone(),
                            tx,
                        },
                    );
                }
            }
        }
        Ok(SvidWatch::new(state.svids[&entry.id].tx.subscribe()))
    }

    async fn jwt_svid(
        &self,
        entry: &Arc<Entry>,
        audience: &[String],
    ) -> Result<Arc<JwtSvid>, AuthorityError> {
        self.jwt_calls.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        if let Some(reason) = &state.failing {
            return Err(AuthorityError::Unavailable(reason.clone()));
        }
        state.serial += 1;
        let token = format!(
            "jwt.{}.{}.{}",
            entry.spiffe_id,
            audience.join(","),
            state.serial
        );
        state
            .tokens
            .insert(token.clone(), (entry.spiffe_id.clone(), audience.to_vec()));
        let now = SystemTime::now();
        Ok(Arc::new(JwtSvid {
            spiffe_id: entry.spiffe_id.clone(),
            token: Zeroizing::new(token),
            expiry: now + Duration::from_secs(300),
            issued_at: now,
        }))
    }

    /// Scripted answers first; else a token this issuer minted validates for any of its
    /// audiences (claims `sub`, `aud`, `exp`), and anything else is malformed.
    fn validate_jwt(&self, token: &str, audience: &str) -> Result<ValidatedJwt, JwtError> {
        let state = self.state.lock().unwrap();
        if let Some(answer) = state.validations.get(token) {
            return answer.clone();
        }
        let Some((sub, aud)) = state.tokens.get(token) else {
            return Err(JwtError::Malformed("not a token of the test issuer".into()));
        };
        if !aud.iter().any(|a| a == audience) {
            return Err(JwtError::Audience {
                want: audience.to_owned(),
                got: aud.clone(),
            });
        }
        let claims = format!(
            r#"{{"sub":"{sub}","aud":{},"exp":4102444800}}"#,
            json_array(aud)
        );
        Ok(ValidatedJwt {
            spiffe_id: sub.clone(),
            claims_json: claims.into_bytes(),
        })
    }
}

/// A JSON array of plain strings (the test audiences hold no characters to escape).
fn json_array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(","))
}

#[derive(Clone, Default)]
struct Script {
    selectors: Vec<Selector>,
    exe: Option<PathBuf>,
    gone: bool,
}

/// An [`Attestor`] answering from a script: selectors per uid (or per pid, which wins), kept to
/// the `type:key`s asked for (`unix:uid` and `unix:gid` are always given, as the kernel gives
/// them), and a count of its calls with the needs of each.
#[derive(Default)]
pub struct TestAttestor {
    by_uid: Mutex<HashMap<u32, Script>>,
    by_pid: Mutex<HashMap<u32, Script>>,
    calls: Mutex<Vec<(PeerCred, Needs)>>,
}

impl TestAttestor {
    /// An attestor with no script: callers get only `unix:uid` and `unix:gid`.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn script(sels: &[&str], exe: Option<&str>) -> Script {
        Script {
            selectors: sels.iter().map(|s| s.parse().unwrap()).collect(),
            exe: exe.map(PathBuf::from),
            gone: false,
        }
    }

    /// Callers with this uid have `selectors` (besides uid and gid) and executable `exe`.
    pub fn set_uid(&self, uid: u32, selectors: &[&str], exe: Option<&str>) {
        self.by_uid
            .lock()
            .unwrap()
            .insert(uid, Self::script(selectors, exe));
    }

    /// The caller with this pid has `selectors` (besides uid and gid) and executable `exe`.
    pub fn set_pid(&self, pid: u32, selectors: &[&str], exe: Option<&str>) {
        self.by_pid
            .lock()
            .unwrap()
            .insert(pid, Self::script(selectors, exe));
    }

    /// The caller with this pid has exited: attesting it fails with
    /// [`AttestError::ProcessGone`].
    pub fn set_gone(&self, pid: u32) {
        self.by_pid.lock().unwrap().insert(
            pid,
            Script {
                gone: true,
                ..Script::default()
            },
        );
    }

    /// Attestations so far.
    pub fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    /// The needs of each attestation so far, in order.
    pub fn needs_asked(&self) -> Vec<Needs> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, n)| n.clone())
            .collect()
    }
}

#[async_trait::async_trait]
impl Attestor for TestAttestor {
    async fn attest(&self, peer: &PeerCred, needs: &Needs) -> Result<Attested, AttestError> {
        self.calls
            .lock()
            .unwrap()
            .push((peer.clone(), needs.clone()));
        let by_pid = peer
            .pid
            .and_then(|pid| self.by_pid.lock().unwrap().get(&pid).cloned());
        let script = by_pid
            .or_else(|| self.by_uid.lock().unwrap().get(&peer.uid).cloned())
            .unwrap_or_default();
        if script.gone {
            return Err(AttestError::ProcessGone {
                pid: peer.pid.unwrap_or(0),
            });
        }
        let mut selectors: spiffed_core::Selectors = script
            .selectors
            .into_iter()
            .filter(|s| needs.wants(&s.kind_key()))
            .collect();
        selectors.insert(Selector::unix("uid", peer.uid).unwrap());
        selectors.insert(Selector::unix("gid", peer.gid).unwrap());
        let mut gathered = needs.clone();
        gathered.insert("unix:uid");
        gathered.insert("unix:gid");
        Ok(Attested {
            selectors,
            uid: peer.uid,
            exe: script.exe.filter(|_| needs.wants("unix:path")),
            gathered,
            left_out: vec![],
        })
    }
}

/// A registration entry for tests (selectors sorted, no checks).
pub fn entry(id: &str, spiffe_id: &str, selectors: &[&str]) -> Entry {
    let mut selectors: Vec<Selector> = selectors.iter().map(|s| s.parse().unwrap()).collect();
    selectors.sort();
    selectors.dedup();
    Entry {
        id: EntryId::new(id),
        spiffe_id: spiffe_id.parse().unwrap(),
        selectors,
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: vec![],
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
    }
}

/// The credentials a test caller claims (uid = gid = `uid`, no pidfd).
pub fn peer(uid: u32, pid: Option<u32>) -> PeerCred {
    PeerCred {
        pid,
        uid,
        gid: uid,
        pidfd: None,
    }
}

/// The test header naming the caller's uid, read by [`serve`]'s layer.
pub const PEER_UID_HEADER: &str = "x-test-peer-uid";
/// The test header naming the caller's pid, read by [`serve`]'s layer.
pub const PEER_PID_HEADER: &str = "x-test-peer-pid";

/// A request carrying the security header and naming its caller (see [`serve`]).
pub fn as_peer<T>(uid: u32, pid: Option<u32>, msg: T) -> tonic::Request<T> {
    let mut r = crate::with_header(msg);
    r.metadata_mut()
        .insert(PEER_UID_HEADER, uid.to_string().parse().unwrap());
    if let Some(pid) = pid {
        r.metadata_mut()
            .insert(PEER_PID_HEADER, pid.to_string().parse().unwrap());
    }
    r
}

/// A request naming its caller but without the security header.
pub fn as_peer_without_header<T>(uid: u32, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(PEER_UID_HEADER, uid.to_string().parse().unwrap());
    r
}

/// Puts a [`PeerCred`] into each request's extensions, taken from the test headers, as the
/// agent's listener does from `SO_PEERCRED`. Without the uid header, none is put.
#[derive(Clone, Debug)]
pub struct PeerFromHeaders<S>(S);

impl<S, B> tower::Service<http::Request<B>> for PeerFromHeaders<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let num = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
        };
        if let Some(uid) = num(PEER_UID_HEADER) {
            let cred = peer(uid, num(PEER_PID_HEADER));
            req.extensions_mut().insert(cred);
        }
        self.0.call(req)
    }
}

/// The layer that wraps a service in [`PeerFromHeaders`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerFromHeadersLayer;

impl<S> tower::Layer<S> for PeerFromHeadersLayer {
    type Service = PeerFromHeaders<S>;

    fn layer(&self, inner: S) -> PeerFromHeaders<S> {
        PeerFromHeaders(inner)
    }
}

/// A gRPC server on a temporary Unix socket; stopped on drop.
pub struct TestServer {
    /// The socket.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// A raw Workload API client on a fresh connection.
    pub async fn client(
        &self,
    ) -> spiffed_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
        tonic::transport::Channel,
    > {
        crate::raw_client(&self.socket).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `svc` on a temporary Unix socket, each request's [`PeerCred`] taken from its test
/// headers ([`as_peer`]).
pub fn serve<S>(svc: S) -> TestServer
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(PeerFromHeadersLayer)
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    TestServer {
        socket,
        _dir: dir,
        task,
    }
}
