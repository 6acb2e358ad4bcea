//! The link against a SPIRE Server double: a tonic server over rustls on 127.0.0.1 that
//! attests (join_token, x509pop), signs CSRs with a test CA, authorizes callers by their
//! client certificate's ID and serial as SPIRE does, pages entries as SPIRE does, and can deny,
//! ban, and close connections. The real spire-server is exercised by the harness tests.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest as _, Sha256};
use spiffed_proto::spire::agent::agent_server::{Agent, AgentServer};
use spiffed_proto::spire::agent::*;
use spiffed_proto::spire::bundle::bundle_server::{Bundle, BundleServer};
use spiffed_proto::spire::bundle::*;
use spiffed_proto::spire::entry::entry_server::{Entry, EntryServer};
use spiffed_proto::spire::entry::*;
use spiffed_proto::spire::svid::svid_server::{Svid, SvidServer};
use spiffed_proto::spire::svid::*;
use spiffed_proto::spire::types;
use spiffed_proto::spire::types::permission_denied_details::Reason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::config::{BundleFormat, JoinToken, NodeAttestation, ServerAddress};
use crate::link::rpc::testing::denied;
use crate::status::Status as LinkStatus;
use crate::tls::testing::TestCa;

const TD: &str = "example.org";

// === The server double ===

#[derive(Default)]
struct Record {
    /// The agent's current serial, and the one issued by RenewAgent (current at first use).
    current: String,
    new: Option<String>,
}

#[derive(Default)]
struct State {
    tokens: HashSet<String>,
    agents: HashMap<String, Record>,
    banned: HashSet<String>,
    deny_next: Option<Reason>,
    entries: Vec<types::Entry>,
    page_size: usize,
    sync_unimplemented: bool,
    /// The ids of each `ids` request of a sync.
    id_requests: Vec<Vec<String>>,
    attests: usize,
    renews: usize,
    connections: usize,
    /// The serials of the client certificates calls were made with.
    seen_serials: Vec<String>,
}

struct Mock {
    ca: TestCa,
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Clone)]
struct Peer(Option<Vec<CertificateDer<'static>>>);

struct Conn(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        Peer(
            self.0
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
        )
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Mock {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn bundle(&self) -> types::Bundle {
        types::Bundle {
            trust_domain: TD.into(),
            x509_authorities: vec![types::X509Certificate {
                asn1: self.ca.cert_der.clone(),
                tainted: false,
            }],
            jwt_authorities: vec![],
            refresh_hint: 0,
            sequence_number: 1,
        }
    }

    /// Signs `csr` for `id` with the mock's TTL; returns the chain and the serial.
    fn sign(&self, csr: &[u8], id: &str) -> Result<(Vec<u8>, String), Status> {
        let mut params = rcgen::CertificateSigningRequestParams::from_der(&csr.to_vec().into())
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        params.params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        params.params.not_before = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
        params.params.not_after = time::OffsetDateTime::now_utc()
            + time::Duration::milliseconds(self.ttl.as_millis() as i64);
        params.params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let der = params.signed_by(&self.ca.issuer).unwrap().der().to_vec();
        let serial = cert::facts(&der).unwrap().serial;
        Ok((der, serial))
    }

    fn svid(&self, der: Vec<u8>, id: &str) -> types::X509svid {
        let facts = cert::facts(&der).unwrap();
        types::X509svid {
            cert_chain: vec![der],
            id: Some(types::Spiffeid {
                trust_domain: TD.into(),
                path: id.trim_start_matches("spiffe://example.org").into(),
            }),
            expires_at: cert::secs(facts.not_after),
            hint: String::new(),
        }
    }

    /// Authorizes an mTLS caller as SPIRE does: by ID and serial; returns the agent ID.
    fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let Some(Peer(Some(certs))) = req.extensions().get::<Peer>() else {
            return Err(Status::permission_denied(
                "authorization denied: no client certificate",
            ));
        };
        let facts = cert::facts(&certs[0]).unwrap();
        let id = facts.uris[0].clone();
        let mut st = self.state();
        st.seen_serials.push(facts.serial.clone());
        if st.banned.contains(&id) {
            return Err(denied(Reason::AgentBanned, "agent is banned"));
        }
        if let Some(r) = st.deny_next.take() {
            return Err(denied(r, "denied by the test"));
        }
        let Some(rec) = st.agents.get_mut(&id) else {
            return Err(denied(Reason::AgentNotAttested, "agent is not attested"));
        };
        if rec.new.as_deref() == Some(facts.serial.as_str()) {
            rec.current = rec.new.take().unwrap();
        }
        if rec.current != facts.serial {
            return Err(denied(Reason::AgentNotActive, "agent is not active"));
        }
        Ok(id)
    }

    async fn attest(
        self: Arc<Self>,
        mut requests: Streaming<AttestAgentRequest>,
        tx: tokio::sync::mpsc::Sender<Result<AttestAgentResponse, Status>>,
    ) -> Result<(), Status> {
        let Some(first) = requests.message().await? else {
            return Err(Status::invalid_argument("no params"));
        };
        let Some(attest_agent_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument("expected params"));
        };
        let data = params.data.unwrap();
        let csr = params.params.unwrap().csr;
        let (id, reattestable) = match data.r#type.as_str() {
            "join_token" => {
                let token = String::from_utf8(data.payload).unwrap();
                if !self.state().tokens.remove(&token) {
                    return Err(Status::invalid_argument(
                        "failed to attest: join token does not exist or has already been used",
                    ));
                }
                (
                    format!("spiffe://{TD}/spire/agent/join_token/{token}"),
                    false,
                )
            }
            "x509pop" => {
                let payload: serde_json::Value = serde_json::from_slice(&data.payload).unwrap();
                let leaf = B64
                    .decode(payload["certificates"][0].as_str().unwrap())
                    .unwrap();
                let nonce = [5u8; 32];
                let challenge = serde_json::json!({
                    "rsa_signature": null,
                    "ecdsa_signature": {"nonce": B64.encode(nonce)},
                });
                let step = attest_agent_response::Step::Challenge(challenge.to_string().into());
                tx.send(Ok(AttestAgentResponse { step: Some(step) }))
                    .await
                    .unwrap();
                let Some(resp) = requests.message().await? else {
                    return Err(Status::invalid_argument("no challenge response"));
                };
                let Some(attest_agent_request::Step::ChallengeResponse(resp)) = resp.step else {
                    return Err(Status::invalid_argument("expected a challenge response"));
                };
                let resp: serde_json::Value = serde_json::from_slice(&resp).unwrap();
                let e = &resp["ecdsa_signature"];
                let theirs = B64.decode(e["nonce"].as_str().unwrap()).unwrap();
                let d: [u8; 32] = Sha256::new()
                    .chain_update(nonce)
                    .chain_update(&theirs)
                    .finalize()
                    .into();
                let r = B64.decode(e["r"].as_str().unwrap()).unwrap();
                let s = B64.decode(e["s"].as_str().unwrap()).unwrap();
                let sig = p256::ecdsa::Signature::from_slice(&[r, s].concat()).unwrap();
                let key = cert::facts(&leaf).unwrap().public_key;
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&key)
                    .unwrap()
                    .verify_prehash(&d, &sig)
                    .map_err(|_| Status::permission_denied("x509pop: signature verify failed"))?;
                let fp = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &leaf);
                let hex: String = fp.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                (format!("spiffe://{TD}/spire/agent/x509pop/{hex}"), true)
            }
            other => return Err(Status::invalid_argument(format!("unknown type {other}"))),
        };
        if self.state().banned.contains(&id) {
            return Err(Status::permission_denied(
                "failed to attest: agent is banned",
            ));
        }
        let (der, serial) = self.sign(&csr, &id)?;
        {
            let mut st = self.state();
            st.attests += 1;
            st.agents.insert(
                id.clone(),
                Record {
                    current: serial,
                    new: None,
                },
            );
        }
        let result = attest_agent_response::Result {
            svid: Some(self.svid(der, &id)),
            reattestable,
        };
        let step = attest_agent_response::Step::Result(result);
        let _ = tx.send(Ok(AttestAgentResponse { step: Some(step) })).await;
        Ok(())
    }
}

/// The RPCs the agent never calls. Written as `async_trait` expands its methods, since an
/// attribute macro does not see into a macro call.
macro_rules! unimplemented_rpcs {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {
        $(
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                _: Request<$req>,
            ) -> Pin<Box<dyn std::future::Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async { Err(Status::unimplemented(stringify!($name))) })
            }
        )*
    };
}

#[derive(Clone)]
struct Svc(Arc<Mock>);

#[tonic::async_trait]
impl Agent for Svc {
    unimplemented_rpcs! {
        count_agents(CountAgentsRequest) -> CountAgentsResponse;
        list_agents(ListAgentsRequest) -> ListAgentsResponse;
        get_agent(GetAgentRequest) -> types::Agent;
        delete_agent(DeleteAgentRequest) -> ();
        ban_agent(BanAgentRequest) -> ();
        create_join_token(CreateJoinTokenRequest) -> types::JoinToken;
        post_status(PostStatusRequest) -> PostStatusResponse;
    }

    type AttestAgentStream = ReceiverStream<Result<AttestAgentResponse, Status>>;

    async fn attest_agent(
        &self,
        req: Request<Streaming<AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mock = Arc::clone(&self.0);
        tokio::spawn(async move {
            if let Err(s) = mock.attest(req.into_inner(), tx.clone()).await {
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew_agent(
        &self,
        req: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let id = self.0.caller(&req)?;
        let csr = req.into_inner().params.unwrap().csr;
        let (der, serial) = self.0.sign(&csr, &id)?;
        let mut st = self.0.state();
        st.renews += 1;
        st.agents.get_mut(&id).unwrap().new = Some(serial);
        drop(st);
        Ok(Response::new(RenewAgentResponse {
            svid: Some(self.0.svid(der, &id)),
        }))
    }
}

#[tonic::async_trait]
impl Bundle for Svc {
    unimplemented_rpcs! {
        count_bundles(CountBundlesRequest) -> CountBundlesResponse;
        append_bundle(AppendBundleRequest) -> types::Bundle;
        publish_jwt_authority(PublishJwtAuthorityRequest) -> PublishJwtAuthorityResponse;
        list_federated_bundles(ListFederatedBundlesRequest) -> ListFederatedBundlesResponse;
        batch_create_federated_bundle(BatchCreateFederatedBundleRequest) -> BatchCreateFederatedBundleResponse;
        batch_update_federated_bundle(BatchUpdateFederatedBundleRequest) -> BatchUpdateFederatedBundleResponse;
        batch_set_federated_bundle(BatchSetFederatedBundleRequest) -> BatchSetFederatedBundleResponse;
        batch_delete_federated_bundle(BatchDeleteFederatedBundleRequest) -> BatchDeleteFederatedBundleResponse;
    }

    async fn get_bundle(
        &self,
        _: Request<GetBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        Ok(Response::new(self.0.bundle()))
    }

    async fn get_federated_bundle(
        &self,
        req: Request<GetFederatedBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        self.0.caller(&req)?;
        if req.get_ref().trust_domain == "partner.org" {
            let mut b = self.0.bundle();
            b.trust_domain = "partner.org".into();
            Ok(Response::new(b))
        } else {
            Err(Status::not_found("bundle not found"))
        }
    }
}

#[tonic::async_trait]
impl Entry for Svc {
    unimplemented_rpcs! {
        count_entries(CountEntriesRequest) -> CountEntriesResponse;
        list_entries(ListEntriesRequest) -> ListEntriesResponse;
        get_entry(GetEntryRequest) -> types::Entry;
        batch_create_entry(BatchCreateEntryRequest) -> BatchCreateEntryResponse;
        batch_update_entry(BatchUpdateEntryRequest) -> BatchUpdateEntryResponse;
        batch_delete_entry(BatchDeleteEntryRequest) -> BatchDeleteEntryResponse;
    }

    async fn get_authorized_entries(
        &self,
        req: Request<GetAuthorizedEntriesRequest>,
    ) -> Result<Response<GetAuthorizedEntriesResponse>, Status> {
        self.0.caller(&req)?;
        Ok(Response::new(GetAuthorizedEntriesResponse {
            entries: self.0.state().entries.clone(),
        }))
    }

    type SyncAuthorizedEntriesStream =
        ReceiverStream<Result<SyncAuthorizedEntriesResponse, Status>>;

    async fn sync_authorized_entries(
        &self,
        req: Request<Streaming<SyncAuthorizedEntriesRequest>>,
    ) -> Result<Response<Self::SyncAuthorizedEntriesStream>, Status> {
        self.0.caller(&req)?;
        if self.0.state().sync_unimplemented {
            return Err(Status::unimplemented("SyncAuthorizedEntries"));
        }
        let mut requests = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mock = Arc::clone(&self.0);
        tokio::spawn(async move {
            let first = requests.message().await.unwrap().unwrap();
            assert!(first.output_mask.unwrap().revision_number);
            let (entries, page) = {
                let st = mock.state();
                (st.entries.clone(), st.page_size)
            };
            let send = |r| tx.send(Ok(r));
            if entries.len() <= page {
                let _ = send(SyncAuthorizedEntriesResponse {
                    entries,
                    ..Default::default()
                })
                .await;
                return;
            }
            let chunks: Vec<_> = entries.chunks(page).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                let revs = chunk
                    .iter()
                    .map(|e| EntryRevision {
                        id: e.id.clone(),
                        revision_number: e.revision_number,
                        created_at: e.created_at,
                    })
                    .collect();
                let _ = send(SyncAuthorizedEntriesResponse {
                    entry_revisions: revs,
                    entries: vec![],
                    more: i + 1 < chunks.len(),
                })
                .await;
            }
            while let Ok(Some(req)) = requests.message().await {
                mock.state().id_requests.push(req.ids.clone());
                let found: Vec<_> = entries
                    .iter()
                    .filter(|e| req.ids.contains(&e.id))
                    .cloned()
                    .collect();
                // Two pages per request, to exercise `more` in this phase too.
                let half = found.len().div_ceil(2);
                let (a, b) = found.split_at(half);
                let _ = send(SyncAuthorizedEntriesResponse {
                    entries: a.to_vec(),
                    more: true,
                    ..Default::default()
                })
                .await;
                let _ = send(SyncAuthorizedEntriesResponse {
                    entries: b.to_vec(),
                    more: false,
                    ..Default::default()
                })
                .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl Svid for Svc {
    unimplemented_rpcs! {
        mint_x509svid(MintX509svidRequest) -> MintX509svidResponse;
        mint_jwtsvid(MintJwtsvidRequest) -> MintJwtsvidResponse;
        new_downstream_x509ca(NewDownstreamX509caRequest) -> NewDownstreamX509caResponse;
    }

    async fn batch_new_x509svid(
        &self,
        req: Request<BatchNewX509svidRequest>,
    ) -> Result<Response<BatchNewX509svidResponse>, Status> {
        self.0.caller(&req)?;
        let entries = self.0.state().entries.clone();
        let mut results = Vec::new();
        for p in req.into_inner().params {
            let entry = entries.iter().find(|e| e.id == p.entry_id);
            results.push(match entry {
                Some(e) => {
                    let id = format!("spiffe://{TD}{}", e.spiffe_id.as_ref().unwrap().path);
                    let (der, _) = self.0.sign(&p.csr, &id)?;
                    batch_new_x509svid_response::Result {
                        status: Some(types::Status {
                            code: 0,
                            message: "OK".into(),
                        }),
                        svid: Some(self.0.svid(der, &id)),
                    }
                }
                None => batch_new_x509svid_response::Result {
                    status: Some(types::Status {
                        code: tonic::Code::NotFound as i32,
                        message: "entry not found or not authorized".into(),
                    }),
                    svid: None,
                },
            });
        }
        Ok(Response::new(BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        req: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        self.0.caller(&req)?;
        let now = cert::secs(SystemTime::now());
        Ok(Response::new(NewJwtsvidResponse {
            svid: Some(types::Jwtsvid {
                token: format!("header.{}.sig", req.get_ref().audience.join(",")),
                id: Some(types::Spiffeid {
                    trust_domain: TD.into(),
                    path: "/w".into(),
                }),
                expires_at: now + 300,
                issued_at: now,
                hint: String::new(),
            }),
        }))
    }
}

struct Server {
    mock: Arc<Mock>,
    addr: SocketAddr,
}

/// Starts the double on 127.0.0.1 (connections closed after `max_age`, if given).
async fn server(ttl: Duration, max_age: Option<Duration>) -> Server {
    let ca = TestCa::new("spire test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let server_svid = ca.svid(
        &["spiffe://example.org/spire/server"],
        &key,
        time::Duration::minutes(-1),
        time::Duration::hours(1),
    );
    let provider = Arc::new(tls::provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der.clone()))
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(server_svid)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let mock = Arc::new(Mock {
        ca,
        ttl,
        state: Mutex::new(State {
            page_size: 500,
            ..Default::default()
        }),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Conn, std::io::Error>>(16);
    let counter = Arc::clone(&mock);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    counter.state().connections += 1;
                    let _ = tx.send(Ok(Conn(tls))).await;
                }
            });
        }
    });
    let svc = Svc(Arc::clone(&mock));
    let mut builder = tonic::transport::Server::builder();
    if let Some(age) = max_age {
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(Duration::from_millis(100));
    }
    let router = builder
        .add_service(AgentServer::new(svc.clone()))
        .add_service(BundleServer::new(svc.clone()))
        .add_service(EntryServer::new(svc.clone()))
        .add_service(SvidServer::new(svc));
    tokio::spawn(router.serve_with_incoming(ReceiverStream::new(rx)));
    Server { mock, addr }
}

// === Helpers ===

fn write_bootstrap(dir: &Path, ca: &TestCa) -> std::path::PathBuf {
    let p = dir.join("bootstrap.pem");
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        B64.encode(&ca.cert_der)
    );
    std::fs::write(&p, pem).unwrap();
    p
}

fn config(server: &Server, dir: &Path, attestation: NodeAttestation) -> SpireConfig {
    SpireConfig {
        address: ServerAddress {
            host: "127.0.0.1".into(),
            port: server.addr.port(),
        },
        bootstrap: Bootstrap::Bundle {
            path: write_bootstrap(dir, &server.mock.ca),
            format: BundleFormat::Pem,
        },
        attestation,
        sync_interval: Duration::from_secs(5),
    }
}

fn token(t: &str) -> NodeAttestation {
    NodeAttestation::JoinToken(Some(JoinToken::new(t)))
}

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

struct Running {
    link: ServerLink,
    status: watch::Receiver<LinkStatus>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start(cfg: SpireConfig, dir: &Path) -> Running {
    let (handle, status) = StatusHandle::new();
    let mut link = ServerLink::new(cfg, td(), dir.join("data"), handle).unwrap();
    link.set_backoff_max(Duration::from_secs(1));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(link.clone().run(stop_rx));
    Running {
        link,
        status,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run stops when asked")
            .unwrap();
    }

    async fn attested(&self) {
        tokio::time::timeout(Duration::from_secs(20), self.link.attested())
            .await
            .expect("the link attests");
    }
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

fn entry(id: &str, path: &str, revision: i64, created_at: i64) -> types::Entry {
    types::Entry {
        id: id.into(),
        spiffe_id: Some(types::Spiffeid {
            trust_domain: TD.into(),
            path: path.into(),
        }),
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        revision_number: revision,
        created_at,
        ..Default::default()
    }
}

// === Tests ===

#[tokio::test]
async fn join_token_attestation_is_persisted_and_a_restart_does_not_attest_again() {
    let server = server(Duration::from_secs(3600), None).await;
    server.mock.state().tokens.insert("tok1".into());
    let dir = tempfile::tempdir().unwrap();

    let (handle, _status) = StatusHandle::new();
    let link = ServerLink::new(
        config(&server, dir.path(), token("tok1")),
        td(),
        dir.path().join("data"),
        handle,
    )
    .unwrap();
    // Calls before attestation say so.
    assert!(matches!(
        link.get_bundle().await,
        Err(ServerError::NotAttested(_))
    ));
    let r = start(config(&server, dir.path(), token("tok1")), dir.path());
    r.attested().await;
    let id = r.link.agent_id().unwrap();
    assert_eq!(id, "spiffe://example.org/spire/agent/join_token/tok1");
    assert_eq!(r.status.borrow().agent_id.as_deref(), Some(id.as_str()));
    assert!(r.status.borrow().agent_svid_expires.is_some());
    let bundle = r.link.get_bundle().await.unwrap();
    assert_eq!(bundle.trust_domain, TD);
    r.stop().await;

    let state = dir.path().join("data").join(STATE_FILE);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A restart with the same (spent) token: the stored SVID is used, no new attestation.
    let r = start(config(&server, dir.path(), token("tok1")), dir.path());
    r.attested().await;
    assert_eq!(r.link.agent_id().as_deref(), Some(id.as_str()));
    r.link.get_bundle().await.unwrap();
    assert_eq!(server.mock.state().attests, 1);
    r.stop().await;
}

#[tokio::test]
async fn a_refused_join_token_is_reported_with_the_fix_and_the_link_keeps_running() {
    let server = server(Duration::from_secs(3600), None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut r = start(config(&server, dir.path(), token("spent")), dir.path());
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        r.status.wait_for(|s| match &s.readiness {
            Readiness::NotServing { reason } => reason.contains("refused the join token"),
            _ => false,
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let Readiness::NotServing { reason } = status.readiness else {
        unreachable!()
    };
    assert!(
        reason.contains("join token does not exist or has already been used"),
        "{reason}"
    );
    assert!(reason.contains("spire-server token generate"), "{reason}");
    assert!(reason.contains("--join-token"), "{reason}");
    assert!(!r.task.is_finished());
    assert!(r.link.agent_id().is_none());
    r.stop().await;
}

#[tokio::test]
async fn join_token_agents_renew_and_the_next_call_presents_the_new_svid() {
    // 4 s SVIDs: renewed after about 2 s.
    let server = server(Duration::from_secs(4), None).await;
    server.mock.state().tokens.insert("tok".into());
    let dir = tempfile::tempdir().unwrap();
    let r = start(config(&server, dir.path(), token("tok")), dir.path());
    r.attested().await;
    r.link.get_federated_bundle("partner.org").await.unwrap();
    let first = server.mock.state().seen_serials.last().cloned().unwrap();
    eventually("the agent SVID is renewed", || {
        server.mock.state().renews >= 1
    })
    .await;
    eventually("a call presents the renewed SVID", || {
        let serials = server.mock.state().seen_serials.clone();
        serials.last().is_some_and(|s| *s != first)
    })
    .await;
    // Calls keep working with the new certificate (the server promoted its serial).
    r.link
        .get_federated_bundle("partner.org")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.mock.state().attests, 1, "renewed, not re-attested");
    // The state on disk holds the renewed SVID.
    let stored = agent_state::load(&dir.path().join("data").join(STATE_FILE))
        .unwrap()
        .unwrap();
    let serial = cert::facts(&stored.svid[0]).unwrap().serial;
    assert_ne!(serial, first);
    r.stop().await;
}

fn x509pop_files(dir: &Path) -> NodeAttestation {
    use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
    let ca = crate::node::x509pop_testing::NodeCa::new();
    let secret = p256::SecretKey::random(&mut rand::thread_rng());
    let pkcs8 = secret.to_pkcs8_der().unwrap();
    let pem = secret.to_sec1_pem(LineEnding::LF).unwrap();
    let (c, k) = ca.node(
        dir,
        pkcs8.as_bytes(),
        &pem,
        vec![rcgen::KeyUsagePurpose::DigitalSignature],
    );
    NodeAttestation::X509Pop {
        certificate_path: c,
        private_key_path: k,
        intermediates_path: None,
    }
}

#[tokio::test]
async fn x509pop_agents_attest_with_a_challenge_and_reattest_to_rotate() {
    let server = server(Duration::from_secs(4), None).await;
    let dir = tempfile::tempdir().unwrap();
    let r = start(
        config(&server, dir.path(), x509pop_files(dir.path())),
        dir.path(),
    );
    r.attested().await;
    let id = r.link.agent_id().unwrap();
    assert!(
        id.starts_with("spiffe://example.org/spire/agent/x509pop/"),
        "{id}"
    );
    eventually("the agent re-attests to rotate", || {
        server.mock.state().attests >= 2
    })
    .await;
    assert_eq!(server.mock.state().renews, 0);
    r.link.get_bundle().await.unwrap();
    r.stop().await;
}

#[tokio::test]
async fn a_ban_stops_serving_and_an_evict_lets_a_reattestable_agent_back() {
    let server = server(Duration::from_secs(3600), None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut r = start(
        config(&server, dir.path(), x509pop_files(dir.path())),
        dir.path(),
    );
    r.attested().await;
    let id = r.link.agent_id().unwrap();
    server.mock.state().banned.insert(id.clone());
    let e = r
        .link
        .get_federated_bundle("partner.org")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ServerError::PermissionDenied {
                reason: DeniedReason::AgentBanned,
                ..
            }
        ),
        "{e:?}"
    );
    eventually("the link reports the ban", || r.link.is_banned()).await;
    let s = r.status.borrow_and_update().clone();
    let Readiness::NotServing { reason } = s.readiness else {
        panic!("{s:?}")
    };
    assert!(reason.contains("banned"), "{reason}");
    assert!(reason.contains("spire-server agent evict"), "{reason}");
    assert!(!r.task.is_finished(), "the link keeps running");

    // `spire-server agent evict`: the ban is lifted and the node record deleted.
    {
        let mut st = server.mock.state();
        st.banned.clear();
        st.agents.clear();
    }
    eventually("the agent attests again and is no longer banned", || {
        !r.link.is_banned()
    })
    .await;
    r.link.get_bundle().await.unwrap();
    r.stop().await;
}

#[tokio::test]
async fn a_denial_says_reattest_and_a_stale_one_is_ignored() {
    let server = server(Duration::from_secs(3600), None).await;
    let dir = tempfile::tempdir().unwrap();
    let r = start(
        config(&server, dir.path(), x509pop_files(dir.path())),
        dir.path(),
    );
    r.attested().await;
    server.mock.state().deny_next = Some(Reason::AgentNotActive);
    let e = r
        .link
        .get_federated_bundle("partner.org")
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        ServerError::PermissionDenied {
            reason: DeniedReason::AgentNotActive,
            ..
        }
    ));
    eventually("the agent re-attests", || server.mock.state().attests >= 2).await;
    r.link.get_bundle().await.unwrap();
    r.stop().await;
}

#[tokio::test]
async fn a_join_token_agent_that_must_reattest_asks_for_a_new_token() {
    let server = server(Duration::from_secs(3600), None).await;
    server.mock.state().tokens.insert("once".into());
    let dir = tempfile::tempdir().unwrap();
    let mut r = start(config(&server, dir.path(), token("once")), dir.path());
    r.attested().await;
    // `spire-server agent evict`: the node record is gone.
    server.mock.state().agents.clear();
    assert!(r.link.get_federated_bundle("partner.org").await.is_err());
    let s = tokio::time::timeout(
        Duration::from_secs(20),
        r.status.wait_for(|s| {
            matches!(&s.readiness, Readiness::NotServing { reason } if reason.contains("new one"))
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let Readiness::NotServing { reason } = s.readiness else {
        unreachable!()
    };
    assert!(reason.contains("AgentNotAttested"), "{reason}");
    assert!(reason.contains("spire-server token generate"), "{reason}");
    r.stop().await;
}

#[tokio::test]
async fn entries_sync_by_revision_in_sorted_pages() {
    let server = server(Duration::from_secs(3600), None).await;
    server.mock.state().tokens.insert("t".into());
    let dir = tempfile::tempdir().unwrap();
    let r = start(config(&server, dir.path(), token("t")), dir.path());
    r.attested().await;
    {
        let mut st = server.mock.state();
        st.page_size = 2;
        st.entries = vec![
            entry("e5", "/five", 1, 10),
            entry("e1", "/one", 1, 10),
            entry("e3", "/three", 2, 10),
            entry("e2", "/two", 1, 10),
            entry("e4", "/four", 1, 11),
        ];
    }
    // The agent holds e1 (current), e3 (old revision), e4 (re-created), e9 (deleted).
    let cached: HashMap<String, EntryVersion> =
        [("e1", 1, 10), ("e3", 1, 10), ("e4", 1, 10), ("e9", 1, 10)]
            .into_iter()
            .map(|(id, revision, created_at)| {
                (
                    id.to_owned(),
                    EntryVersion {
                        revision,
                        created_at,
                    },
                )
            })
            .collect();
    let got = r.link.authorized_entries(&cached).await.unwrap();
    let mut authorized = got.authorized.clone();
    authorized.sort();
    assert_eq!(authorized, ["e1", "e2", "e3", "e4", "e5"]);
    let mut changed: Vec<_> = got.changed.iter().map(|e| e.id.as_str()).collect();
    changed.sort_unstable();
    assert_eq!(changed, ["e2", "e3", "e4", "e5"]);
    // Requested sorted, in chunks of the server's page size.
    assert_eq!(
        server.mock.state().id_requests,
        vec![
            vec!["e2".to_owned(), "e3".into()],
            vec!["e4".into(), "e5".into()]
        ]
    );

    // Small sets come in full in one answer; only what changed is returned as changed.
    server.mock.state().page_size = 500;
    let got = r.link.authorized_entries(&cached).await.unwrap();
    let mut changed: Vec<_> = got.changed.iter().map(|e| e.id.as_str()).collect();
    changed.sort_unstable();
    assert_eq!(changed, ["e2", "e3", "e4", "e5"]);
    assert_eq!(got.authorized.len(), 5);

    // A server without SyncAuthorizedEntries: GetAuthorizedEntries.
    server.mock.state().sync_unimplemented = true;
    let got = r.link.authorized_entries(&HashMap::new()).await.unwrap();
    assert_eq!(got.changed.len(), 5);
    r.stop().await;
}

#[tokio::test]
async fn svids_are_minted_in_request_order_with_per_entry_failures() {
    let server = server(Duration::from_secs(3600), None).await;
    server.mock.state().tokens.insert("t".into());
    server.mock.state().entries = vec![entry("e1", "/web", 1, 1)];
    let dir = tempfile::tempdir().unwrap();
    let r = start(config(&server, dir.path(), token("t")), dir.path());
    r.attested().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let results = r
        .link
        .batch_new_x509_svid(vec![
            NewX509svidParams {
                entry_id: "nope".into(),
                csr: csr.clone(),
            },
            NewX509svidParams {
                entry_id: "e1".into(),
                csr,
            },
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(
        results[0].status.as_ref().unwrap().code,
        tonic::Code::NotFound as i32
    );
    let svid = results[1].svid.as_ref().unwrap();
    assert_eq!(
        cert::facts(&svid.cert_chain[0]).unwrap().uris,
        ["spiffe://example.org/web"]
    );
    let jwt = r
        .link
        .new_jwt_svid("e1", &["a".to_owned(), "b".to_owned()])
        .await
        .unwrap();
    assert_eq!(jwt.token, "header.a,b.sig");
    assert_eq!(
        r.link.get_federated_bundle("nowhere.org").await.unwrap(),
        None
    );
    r.stop().await;
}

#[tokio::test]
async fn calls_reconnect_after_the_server_closes_connections() {
    let server = server(Duration::from_secs(3600), Some(Duration::from_millis(300))).await;
    server.mock.state().tokens.insert("t".into());
    let dir = tempfile::tempdir().unwrap();
    let r = start(config(&server, dir.path(), token("t")), dir.path());
    r.attested().await;
    r.link.get_bundle().await.unwrap();
    let before = server.mock.state().connections;
    for _ in 0..3 {
        // Longer than the server's connection age: each call finds its connection closed.
        tokio::time::sleep(Duration::from_millis(800)).await;
        r.link.get_bundle().await.unwrap();
    }
    assert!(server.mock.state().connections >= before + 3);
    r.stop().await;
}

#[tokio::test]
async fn connections_fail_over_to_an_address_that_answers() {
    let server = server(Duration::from_secs(3600), None).await;
    // An address where nothing listens: the connection is refused.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let roots = RootSet::from_ders(
        std::slice::from_ref(&server.mock.ca.cert_der),
        RootSource::Bootstrap("b.pem".into()),
    )
    .unwrap();
    let verifier = Arc::new(ServerVerifier::new(TD, Arc::new(Roots::new(roots))));
    let anon = tls::client_config(verifier, None).unwrap();
    let address = ServerAddress {
        host: "spire.example.org".into(),
        port: server.addr.port(),
    };
    // Whichever address an agent prefers, every new connection reaches the server; an agent
    // that prefers the dead address says it fell back, one that prefers the live one does not.
    for seed in 0..4 {
        let connector = Connector::new(address.clone(), Arc::clone(&anon), seed)
            .with_addrs(vec![refused, server.addr]);
        assert_eq!(connector.fallback_since(), None, "not connected yet");
        let channel = connector.clone().channel().unwrap();
        BundleClient::new(channel)
            .get_bundle(GetBundleRequest { output_mask: None })
            .await
            .unwrap();
        let mut order = vec![refused, server.addr];
        connect::preference_order(seed, &mut order);
        let prefers_dead = order[0] == refused;
        assert_eq!(
            connector.fallback_since().is_some(),
            prefers_dead,
            "seed {seed}"
        );
    }
    assert_eq!(server.mock.state().connections, 4);

    // With no address answering, the error names each address and why.
    let connector = Connector::new(address, anon, 0).with_addrs(vec![refused]);
    let status = BundleClient::new(connector.channel().unwrap())
        .get_bundle(GetBundleRequest { output_mask: None })
        .await
        .unwrap_err();
    let e = rpc::server_error(&status, "spire.example.org:1");
    let ServerError::Unreachable { reason, .. } = e else {
        panic!("{e:?}")
    };
    assert!(reason.contains(&refused.to_string()), "{reason}");
    assert!(reason.to_lowercase().contains("refused"), "{reason}");
}

/// Agents spread evenly over a fleet's addresses, each keeps its own order whatever the other
/// addresses, and a server that joins takes agents only from the others, evenly.
#[test]
fn agents_rank_the_servers_evenly_and_stably() {
    let a: SocketAddr = "127.0.0.2:8081".parse().unwrap();
    let b: SocketAddr = "127.0.0.3:8081".parse().unwrap();
    let c: SocketAddr = "127.0.0.4:8081".parse().unwrap();
    let agents = 3000_u64;
    let mut first = HashMap::new();
    let mut moved_to_c = 0;
    for seed in 0..agents {
        let mut two = vec![b, a];
        connect::preference_order(seed, &mut two);
        let mut again = vec![a, b];
        connect::preference_order(seed, &mut again);
        assert_eq!(
            two, again,
            "the order does not depend on the resolver's order"
        );
        *first.entry(two[0]).or_insert(0_u64) += 1;
        let mut three = vec![a, b, c];
        connect::preference_order(seed, &mut three);
        // Among the old addresses, the order is unchanged: nobody moves from a to b.
        let old: Vec<SocketAddr> = three.iter().copied().filter(|x| *x != c).collect();
        assert_eq!(old, two, "seed {seed}");
        if three[0] == c {
            moved_to_c += 1;
        }
    }
    // Even within a few percent (the ranking is a fixed function of the seeds used here).
    for addr in [a, b] {
        let n = first[&addr];
        assert!(
            n * 100 > agents * 45 && n * 100 < agents * 55,
            "{addr}: {n} of {agents}"
        );
    }
    assert!(
        moved_to_c * 100 > agents * 28 && moved_to_c * 100 < agents * 38,
        "a third server takes about a third: {moved_to_c} of {agents}"
    );
}

#[tokio::test]
async fn a_server_with_the_wrong_id_or_an_untrusted_ca_is_refused_clearly() {
    let server = server(Duration::from_secs(3600), None).await;
    server.mock.state().tokens.insert("t".into());
    let dir = tempfile::tempdir().unwrap();
    // A bootstrap bundle that is not the server's CA.
    let mut cfg = config(&server, dir.path(), token("t"));
    let other = TestCa::new("other");
    cfg.bootstrap = Bootstrap::Bundle {
        path: write_bootstrap(dir.path(), &other),
        format: BundleFormat::Pem,
    };
    let mut r = start(cfg, dir.path());
    let s = tokio::time::timeout(
        Duration::from_secs(20),
        r.status.wait_for(|s| {
            matches!(&s.readiness, Readiness::NotServing { reason } if reason.contains("does not chain"))
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let Readiness::NotServing { reason } = s.readiness else {
        unreachable!()
    };
    assert!(reason.contains("spire-server bundle show"), "{reason}");
    r.stop().await;

    // A trust domain whose server ID the server does not have.
    let dir = tempfile::tempdir().unwrap();
    let (handle, mut status) = StatusHandle::new();
    let link = ServerLink::new(
        config(&server, dir.path(), token("t")),
        TrustDomain::new("other.org").unwrap(),
        dir.path().join("data"),
        handle,
    )
    .unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(link.run(stop_rx));
    let s = tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| {
            matches!(&s.readiness, Readiness::NotServing { reason } if reason.contains("has ID"))
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let Readiness::NotServing { reason } = s.readiness else {
        unreachable!()
    };
    assert!(
        reason.contains(
            "has ID spiffe://example.org/spire/server, expected spiffe://other.org/spire/server"
        ),
        "{reason}"
    );
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn a_bundle_from_the_sync_replaces_the_roots_and_is_persisted() {
    let server = server(Duration::from_secs(3600), None).await;
    server.mock.state().tokens.insert("t".into());
    let dir = tempfile::tempdir().unwrap();
    let r = start(config(&server, dir.path(), token("t")), dir.path());
    r.attested().await;
    let mut bundle = r.link.get_bundle().await.unwrap();
    let extra = TestCa::new("next");
    bundle.x509_authorities.push(types::X509Certificate {
        asn1: extra.cert_der.clone(),
        tainted: false,
    });
    r.link.set_bundle(&bundle).unwrap();
    let stored = agent_state::load(&dir.path().join("data").join(STATE_FILE))
        .unwrap()
        .unwrap();
    assert_eq!(stored.bundle.len(), 2);
    assert_eq!(stored.bundle[1], extra.cert_der);
    // A bundle of another trust domain is refused.
    let mut wrong = bundle.clone();
    wrong.trust_domain = "other.org".into();
    assert!(matches!(
        r.link.set_bundle(&wrong),
        Err(LinkError::Bundle(_))
    ));
    // A tainted authority that issued the agent SVID forces a rotation.
    bundle.x509_authorities[0].tainted = true;
    r.link.set_bundle(&bundle).unwrap();
    eventually("the agent SVID is rotated", || {
        server.mock.state().renews >= 1
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn a_state_file_others_can_read_stops_the_start_with_the_fix() {
    let server = server(Duration::from_secs(3600), None).await;
    server.mock.state().tokens.insert("t".into());
    let dir = tempfile::tempdir().unwrap();
    let r = start(config(&server, dir.path(), token("t")), dir.path());
    r.attested().await;
    r.stop().await;
    let state = dir.path().join("data").join(STATE_FILE);
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (handle, _) = StatusHandle::new();
    let e = ServerLink::new(
        config(&server, dir.path(), token("t")),
        td(),
        dir.path().join("data"),
        handle,
    )
    .unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    // Another trust domain's state is refused too.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (handle, _) = StatusHandle::new();
    let e = ServerLink::new(
        config(&server, dir.path(), token("t")),
        TrustDomain::new("other.org").unwrap(),
        dir.path().join("data"),
        handle,
    )
    .unwrap_err();
    assert!(matches!(e, LinkError::OtherTrustDomain { .. }), "{e}");
}
