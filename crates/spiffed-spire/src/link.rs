//! The link to the SPIRE Server: node attestation, the agent SVID and its rotation, the
//! persisted agent state, and the calls of [`ServerApi`] over mTLS.
//!
//! Lifecycle:
//! 1. [`ServerLink::new`] loads `data_dir/agent-state.json` and the bootstrap bundle (no
//!    network). A stored SVID that is still valid, with its key, is used as is: a restart
//!    never needs a new join token. Once the agent has attested, the stored bundle, not the
//!    bootstrap file, authenticates the server.
//! 2. [`ServerLink::run`] attests when there is no usable SVID (`AttestAgent` without a client
//!    certificate, then `GetBundle`), retrying with exponential backoff up to 30 s and never
//!    giving up for lack of a server. Then it rotates the agent SVID when half its lifetime
//!    (±10 % jitter) has passed: `RenewAgent` with a new key for join-token agents, a new
//!    `AttestAgent` for reattestable ones (x509pop). It reacts to the `PermissionDenied`
//!    reasons the calls meet as spire-agent does: re-attest on EXPIRED, NOT_ATTESTED,
//!    NOT_ACTIVE and MUST_REATTEST; on BANNED stop serving (see [`ServerLink::is_banned`]),
//!    report it, and keep running.
//! 3. The [`ServerApi`] calls use one pooled connection authenticated by the current agent
//!    SVID; a new SVID drops the pool so the next call handshakes with it. Each call has a
//!    30 s deadline, and a call that finds the connection gone is retried once on a new one.
//! 4. The server's name may resolve to several servers (an HA fleet): each agent ranks the
//!    addresses in its own random order of preference and connects to the first that answers
//!    (see `connect`). A connection that had to fall back to another address is replaced
//!    after `FALLBACK_AGE` (30 s), so the agent returns to its first choice when it is back.

mod connect;
mod entries;
pub(crate) mod rpc;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use rustls::ClientConfig;
use spiffe::TrustDomain;
use spiffed_proto::spire::agent::agent_client::AgentClient;
use spiffed_proto::spire::agent::{AgentX509svidParams, RenewAgentRequest};
use spiffed_proto::spire::bundle::bundle_client::BundleClient;
use spiffed_proto::spire::bundle::{GetBundleRequest, GetFederatedBundleRequest};
use spiffed_proto::spire::svid::svid_client::SvidClient;
use spiffed_proto::spire::svid::{
    BatchNewX509svidRequest, NewJwtsvidRequest, NewX509svidParams, batch_new_x509svid_response,
};
use spiffed_proto::spire::types;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

pub use crate::agent_state::StateError;
use crate::agent_state::{self, AgentState, STATE_FILE};
use crate::agent_svid::{AgentKey, AgentSvid};
use crate::config::{Bootstrap, SpireConfig};
use crate::node::{self, AttestError, Attestor};
use crate::server::{AuthorizedEntries, DeniedReason, EntryVersion, ServerApi, ServerError};
use crate::status::{Readiness, StatusHandle};
use crate::tls::{self, AgentCert, RootSet, RootSource, Roots, ServerVerifier};
use crate::{bootstrap, cert};
use connect::Connector;
use rpc::{CallError, RPC_TIMEOUT};

/// How often the rotation deadline is checked (as spire-agent's rotator).
const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// The first retry delay after a failure.
const BACKOFF_START: Duration = Duration::from_secs(1);
/// The longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a connection to a server other than the agent's first choice (which did not
/// answer) is used before the next call connects afresh, trying the first choice again.
/// Without this an agent would stay on the server it fell back to until that server closes
/// the connection (SPIRE Server: after 3 minutes), and every agent of the dead server would
/// pile onto the same survivor.
pub(crate) const FALLBACK_AGE: Duration = Duration::from_secs(30);

/// What an operator reads when the agent is banned.
const BANNED: &str = "the agent was banned on the SPIRE Server (spire-server agent ban); remove \
     it with `spire-server agent evict -spiffeID AGENT_ID`, then the agent re-attests (a \
     join-token agent with a new token: `spire-server token generate`, then restart spiffed \
     with --join-token)";

/// Why the link cannot start; each message says what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The persisted agent state is unusable.
    #[error(transparent)]
    State(#[from] StateError),
    /// The agent state belongs to another trust domain.
    #[error(
        "the agent state {} is for trust domain {stored}, but trust_domain is {configured}: \
         set trust_domain to the server's, or remove the file so the agent attests afresh",
        path.display()
    )]
    OtherTrustDomain {
        /// The state file.
        path: PathBuf,
        /// Its trust domain.
        stored: String,
        /// The configured one.
        configured: String,
    },
    /// The bootstrap bundle is unusable.
    #[error("{0}")]
    Bootstrap(String),
    /// The node attestor's files are unusable.
    #[error("{0}")]
    Node(String),
    /// A bundle from the server is unusable.
    #[error("the bundle from the SPIRE Server is unusable: {0}")]
    Bundle(String),
    /// TLS could not be set up.
    #[error("cannot set up TLS to the SPIRE Server: {0}")]
    Tls(String),
}

/// The agent SVID in use.
struct Current {
    svid: AgentSvid,
    /// Bumped at every new SVID; a denial met by a call made with an older one is stale.
    generation: u64,
    /// When to rotate: half the lifetime before expiry, ±10 %.
    rotate_at: SystemTime,
}

/// Something the run loop must react to.
#[derive(Debug)]
enum Event {
    /// A call was denied.
    Denied {
        generation: u64,
        reason: DeniedReason,
        message: String,
    },
    /// The agent SVID chains to a tainted authority: rotate now.
    Tainted,
}

struct Inner {
    td: TrustDomain,
    address: crate::config::ServerAddress,
    address_text: String,
    data_dir: PathBuf,
    state_path: PathBuf,
    status: StatusHandle,
    attestor: Attestor,
    roots: Arc<Roots>,
    agent_cert: Arc<AgentCert>,
    mtls: Arc<ClientConfig>,
    anon: Arc<ClientConfig>,
    /// Ranks the server's addresses for this agent (see `connect::preference_order`).
    addr_seed: u64,
    current: RwLock<Option<Arc<Current>>>,
    generation: AtomicU64,
    pool: Mutex<Option<Pooled>>,
    bundle: Mutex<Vec<Vec<u8>>>,
    reattestable: AtomicBool,
    banned: AtomicBool,
    sync_unimplemented: AtomicBool,
    attested: watch::Sender<bool>,
    events: mpsc::Sender<Event>,
    events_rx: Mutex<Option<mpsc::Receiver<Event>>>,
    /// The longest wait between retries ([`BACKOFF_MAX`]; shorter in tests).
    backoff_max: Duration,
    /// [`FALLBACK_AGE`].
    fallback_age: Duration,
}

/// The pooled mTLS channel.
struct Pooled {
    /// The SVID generation it presents.
    generation: u64,
    channel: Channel,
    /// Its connector, which says whether it fell back to another server.
    connector: Connector,
}

/// The link to the SPIRE Server. Cheap to clone; every clone is the same link. Keep one to
/// call [`ServerApi`] and give one to [`ServerLink::run`].
#[derive(Clone)]
pub struct ServerLink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ServerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLink")
            .field("address", &self.inner.address_text)
            .field("agent_id", &self.agent_id())
            .field("banned", &self.is_banned())
            .finish_non_exhaustive()
    }
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.9..=1.1))
}

/// When to rotate an SVID: when the time left is half its lifetime, ±10 %.
fn rotation_time(svid: &AgentSvid) -> SystemTime {
    let lifetime = svid
        .not_after()
        .duration_since(svid.not_before())
        .unwrap_or(Duration::ZERO);
    svid.not_after()
        .checked_sub(jittered(lifetime / 2))
        .unwrap_or(svid.not_before())
}

/// Exponential backoff, capped, jittered.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self {
            next: BACKOFF_START.min(max),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START.min(self.max);
    }

    fn next(&mut self) -> Duration {
        let d = jittered(self.next);
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// Resolves when `stop` turns true or its sender is gone.
async fn until_stop(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl ServerLink {
    /// Loads the agent state in `data_dir` and the bootstrap bundle, and checks the node
    /// attestor's files; no network. Fails on configuration or state an operator must fix.
    pub fn new(
        cfg: SpireConfig,
        td: TrustDomain,
        data_dir: PathBuf,
        status: StatusHandle,
    ) -> Result<Self, LinkError> {
        let state_path = data_dir.join(STATE_FILE);
        let stored = agent_state::load(&state_path)?;
        if let Some(s) = &stored
            && s.trust_domain != td.as_str()
        {
            return Err(LinkError::OtherTrustDomain {
                path: state_path,
                stored: s.trust_domain.clone(),
                configured: td.as_str().to_owned(),
            });
        }
        let attestor = Attestor::from_config(&cfg.attestation);
        attestor
            .load_x509pop(SystemTime::now())
            .map_err(|e| LinkError::Node(e.to_string()))?;
        let address_text = cfg.address.to_string();
        let insecure_bootstrap = matches!(cfg.bootstrap, Bootstrap::Insecure);

        let stored_bundle = stored
            .as_ref()
            .map(|s| s.bundle.clone())
            .filter(|b| !b.is_empty());
        let roots =
            match (&stored_bundle, &cfg.bootstrap) {
                (Some(b), _) => RootSet::from_ders(b, RootSource::Stored(state_path.clone()))
                    .map_err(|reason| StateError::Corrupt {
                        path: state_path.clone(),
                        reason: format!("its bundle: {reason}"),
                    })?,
                (None, Bootstrap::Bundle { path, format }) => {
                    let ders = bootstrap::read_authorities(path, *format, &td)
                        .map_err(LinkError::Bootstrap)?;
                    RootSet::from_ders(&ders, RootSource::Bootstrap(path.clone())).map_err(|e| {
                        LinkError::Bootstrap(format!("the trust bundle {}: {e}", path.display()))
                    })?
                }
                (None, Bootstrap::Insecure) => RootSet::Insecure,
            };
        if insecure_bootstrap {
            if stored_bundle.is_some() {
                tracing::warn!(
                    state = %state_path.display(),
                    "insecure_bootstrap = true is set; unused now (the bundle stored at the last \
                     attestation authenticates the server), but if the state is removed the \
                     agent trusts whatever answers at the server's address: use \
                     trust_bundle_path outside tests"
                );
            } else {
                tracing::warn!(
                    address = %address_text,
                    "INSECURE BOOTSTRAP: the SPIRE Server's certificate chain is NOT verified \
                     on the first attestation (only its ID spiffe://{}/spire/server is); \
                     anyone answering at this address can impersonate the server. For tests \
                     only: set trust_bundle_path to the output of `spire-server bundle show`",
                    td.as_str()
                );
            }
        }

        let roots = Arc::new(Roots::new(roots));
        let verifier = Arc::new(ServerVerifier::new(td.as_str(), Arc::clone(&roots)));
        let agent_cert = Arc::new(AgentCert::default());
        let mtls = tls::client_config(Arc::clone(&verifier), Some(Arc::clone(&agent_cert)))
            .map_err(|e| LinkError::Tls(e.to_string()))?;
        let anon = tls::client_config(verifier, None).map_err(|e| LinkError::Tls(e.to_string()))?;
        let (events, events_rx) = mpsc::channel(16);
        let link = Self {
            inner: Arc::new(Inner {
                td,
                address: cfg.address,
                address_text,
                data_dir,
                state_path,
                status,
                attestor,
                roots,
                agent_cert,
                mtls,
                anon,
                addr_seed: rand::thread_rng().r#gen(),
                current: RwLock::new(None),
                generation: AtomicU64::new(0),
                pool: Mutex::new(None),
                bundle: Mutex::new(stored_bundle.unwrap_or_default()),
                reattestable: AtomicBool::new(false),
                banned: AtomicBool::new(false),
                sync_unimplemented: AtomicBool::new(false),
                attested: watch::Sender::new(false),
                events,
                events_rx: Mutex::new(Some(events_rx)),
                backoff_max: BACKOFF_MAX,
                fallback_age: FALLBACK_AGE,
            }),
        };
        if let Some(s) = stored {
            link.adopt_stored(s);
        }
        Ok(link)
    }

    /// Caps retry waits at `max` (tests; only before the link is shared).
    #[cfg(test)]
    pub(crate) fn set_backoff_max(&mut self, max: Duration) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.backoff_max = max;
        }
    }

    /// Uses the stored SVID if it is still good; otherwise says why the agent attests again.
    fn adopt_stored(&self, s: AgentState) {
        let inner = &self.inner;
        let path = inner.state_path.display();
        if s.server_address != inner.address_text {
            tracing::info!(
                stored = %s.server_address,
                configured = %inner.address_text,
                "the agent state was attested through another server address; using it with \
                 the configured one"
            );
        }
        inner.reattestable.store(s.reattestable, Ordering::Relaxed);
        let svid = AgentKey::from_pkcs8(&s.key)
            .and_then(|key| AgentSvid::new(s.svid, key, &inner.td, SystemTime::now()));
        match svid {
            Ok(svid) => {
                tracing::info!(
                    agent_id = %svid.id(),
                    expires = %cert::show(svid.not_after()),
                    state = %path,
                    "agent SVID loaded; no attestation needed"
                );
                if let Err(e) = inner.install(svid) {
                    tracing::warn!(error = %e, "cannot use the stored agent SVID; attesting again");
                }
            }
            Err(e) if !s.reattestable && matches!(inner.attestor, Attestor::JoinToken(_)) => {
                tracing::warn!(
                    agent_id = %s.agent_id,
                    reason = %e,
                    state = %path,
                    "the stored agent SVID cannot be used, and a join-token agent can only \
                     attest again with a new token (the one it used is spent): {}",
                    node::NEW_TOKEN_FIX
                );
            }
            Err(e) => tracing::info!(
                agent_id = %s.agent_id,
                reason = %e,
                "the stored agent SVID cannot be used; attesting again"
            ),
        }
    }

    /// Whether the server banned this agent. Identities must not be served while it is; the
    /// link keeps running and clears it when the agent attests again (after
    /// `spire-server agent evict`).
    pub fn is_banned(&self) -> bool {
        self.inner.banned.load(Ordering::Relaxed)
    }

    /// The agent's SPIFFE ID once it has an SVID.
    pub fn agent_id(&self) -> Option<String> {
        self.inner.current().map(|c| c.svid.id().to_owned())
    }

    /// Resolves once the agent has an SVID (at once if it loaded one).
    pub async fn attested(&self) {
        let mut rx = self.inner.attested.subscribe();
        let _ = rx.wait_for(|a| *a).await;
    }

    /// A watch that turns true once the agent has an SVID (at once if it loaded one).
    pub fn attestation(&self) -> watch::Receiver<bool> {
        self.inner.attested.subscribe()
    }

    /// Takes the trust domain's bundle as the sync received it (`GetBundle`): its X.509
    /// authorities become the roots the server is verified against, and are persisted when
    /// they changed. An agent SVID that chains to a tainted authority is rotated at once.
    pub fn set_bundle(&self, bundle: &types::Bundle) -> Result<(), LinkError> {
        let inner = &self.inner;
        node::check_bundle(bundle, &inner.td).map_err(LinkError::Bundle)?;
        if let Some(cur) = inner.current() {
            let tainted = bundle
                .x509_authorities
                .iter()
                .filter(|a| a.tainted)
                .any(|a| cur.svid.issued_under(&a.asn1));
            if tainted {
                let _ = inner.events.try_send(Event::Tainted);
            }
        }
        let ders: Vec<Vec<u8>> = bundle
            .x509_authorities
            .iter()
            .map(|a| a.asn1.clone())
            .collect();
        {
            let mut stored = inner.bundle.lock().unwrap_or_else(|e| e.into_inner());
            if *stored == ders {
                return Ok(());
            }
            let set = RootSet::from_ders(&ders, RootSource::Stored(inner.state_path.clone()))
                .map_err(LinkError::Bundle)?;
            inner.roots.set(set);
            *stored = ders;
        }
        tracing::info!(
            authorities = bundle.x509_authorities.len(),
            "the trust domain's X.509 authorities changed"
        );
        if let Some(cur) = inner.current() {
            inner.persist(&cur.svid)?;
        }
        Ok(())
    }

    /// Attests when needed and keeps the agent SVID fresh until `stop` turns true (or its
    /// sender is dropped). Never returns for lack of a server.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let inner = &self.inner;
        let taken = inner
            .events_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut events) = taken else {
            tracing::error!("ServerLink::run called twice; the second call does nothing");
            return;
        };
        let mut backoff = Backoff::new(inner.backoff_max);
        // Why the agent must attest again although it holds an SVID, if it must.
        let mut reattest: Option<String> = None;
        let mut rotate_now = false;
        let mut last_problem = String::new();
        loop {
            if *stop.borrow() {
                return;
            }
            let now = SystemTime::now();
            let cur = inner.current().filter(|c| !c.svid.expired(now));
            let Some(cur) = cur.filter(|_| reattest.is_none()) else {
                let attempt = tokio::select! {
                    () = until_stop(&mut stop) => return,
                    r = inner.attest_once() => r,
                };
                match attempt {
                    Ok(()) => {
                        backoff.reset();
                        reattest = None;
                        rotate_now = false;
                        last_problem.clear();
                    }
                    Err(e) => {
                        inner.attestation_failed(&e, reattest.as_deref(), &mut last_problem);
                        let wait = if e.needs_operator() {
                            inner.backoff_max
                        } else {
                            backoff.next()
                        };
                        tokio::select! {
                            () = until_stop(&mut stop) => return,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                continue;
            };

            let due = rotate_now || now >= cur.rotate_at;
            if due {
                let rotated = tokio::select! {
                    () = until_stop(&mut stop) => return,
                    r = inner.rotate(&cur) => r,
                };
                match rotated {
                    Ok(()) => {
                        backoff.reset();
                        rotate_now = false;
                        last_problem.clear();
                    }
                    Err(e) => {
                        let msg = format!("cannot rotate the agent SVID (retrying): {e}");
                        if msg != last_problem {
                            tracing::warn!(
                                expires = %cert::show(cur.svid.not_after()),
                                "{msg}"
                            );
                            last_problem = msg;
                        }
                        let wait = backoff.next();
                        // Denials met while rotating are handled below before the retry.
                        tokio::select! {
                            () = until_stop(&mut stop) => return,
                            () = tokio::time::sleep(wait) => {}
                            Some(ev) = events.recv() => {
                                inner.handle(ev, &cur, &mut reattest, &mut rotate_now);
                            }
                        }
                    }
                }
                continue;
            }

            let wait = cur
                .rotate_at
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
                .min(CHECK_INTERVAL);
            tokio::select! {
                () = until_stop(&mut stop) => return,
                () = tokio::time::sleep(wait) => {}
                Some(ev) = events.recv() => {
                    inner.handle(ev, &cur, &mut reattest, &mut rotate_now);
                }
            }
        }
    }
}

impl Inner {
    fn current(&self) -> Option<Arc<Current>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn state_of(&self, svid: &AgentSvid) -> AgentState {
        AgentState {
            trust_domain: self.td.as_str().to_owned(),
            server_address: self.address_text.clone(),
            agent_id: svid.id().to_owned(),
            attestor: self.attestor.kind().to_owned(),
            reattestable: self.reattestable.load(Ordering::Relaxed),
            svid: svid.chain().to_vec(),
            key: zeroize::Zeroizing::new(svid.key().pkcs8().to_vec()),
            bundle: self
                .bundle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn persist(&self, svid: &AgentSvid) -> Result<(), StateError> {
        if !self.data_dir.exists() {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.data_dir)
                .map_err(|e| StateError::Io {
                    path: self.data_dir.clone(),
                    op: "create the directory of",
                    reason: e.to_string(),
                })?;
        }
        agent_state::store(&self.state_path, &self.state_of(svid))
    }

    /// Makes `svid` the one every new connection presents, and drops pooled connections.
    fn install(&self, svid: AgentSvid) -> Result<(), String> {
        let key = svid.certified_key()?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (id, expires) = (svid.id().to_owned(), svid.not_after());
        let current = Arc::new(Current {
            rotate_at: rotation_time(&svid),
            svid,
            generation,
        });
        self.agent_cert.set(key);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(current);
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.status.update(|s| {
            s.agent_id = Some(id);
            s.agent_svid_expires = Some(expires);
        });
        self.attested.send_replace(true);
        Ok(())
    }

    /// A channel authenticated by the current SVID (the pooled one, or a new one).
    fn mtls_channel(&self) -> Result<(u64, Channel), ServerError> {
        let Some(cur) = self.current() else {
            return Err(ServerError::NotAttested(
                "no agent SVID yet (attestation pending)".to_owned(),
            ));
        };
        if cur.svid.expired(SystemTime::now()) {
            return Err(ServerError::NotAttested(format!(
                "the agent SVID expired at {}; attesting again",
                cert::show(cur.svid.not_after())
            )));
        }
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = &*pool
            && p.generation == cur.generation
        {
            let fell_back = p.connector.fallback_since();
            if fell_back.is_none_or(|t| t.elapsed() < self.fallback_age) {
                return Ok((p.generation, p.channel.clone()));
            }
            // Calls in flight finish on the old connection (their clones keep it); the next
            // ones connect afresh, to the first choice if it answers again.
            tracing::debug!(
                "the connection fell back to another server a while ago; connecting afresh to \
                 try this agent's first choice again"
            );
        }
        let connector = self.connector(Arc::clone(&self.mtls));
        let channel = connector
            .clone()
            .channel()
            .map_err(|e| ServerError::Unreachable {
                address: self.address_text.clone(),
                reason: e.to_string(),
            })?;
        *pool = Some(Pooled {
            generation: cur.generation,
            channel: channel.clone(),
            connector,
        });
        Ok((cur.generation, channel))
    }

    fn connector(&self, tls: Arc<ClientConfig>) -> Connector {
        Connector::new(self.address.clone(), tls, self.addr_seed)
    }

    fn drop_pool(&self, generation: u64) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.as_ref().is_some_and(|p| p.generation == generation) {
            *pool = None;
        }
    }

    /// One call over mTLS: deadline, status judgement, denials to the run loop, one retry on
    /// a fresh connection when the connection was gone.
    async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, ServerError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let mut retried = false;
        loop {
            let (generation, channel) = self.mtls_channel()?;
            let err = match tokio::time::timeout(RPC_TIMEOUT, f(channel)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(CallError::Invalid(m))) => {
                    return Err(ServerError::Invalid(format!("{what}: {m}")));
                }
                Ok(Err(CallError::Status(s))) => rpc::server_error(&s, &self.address_text),
                Err(_) => {
                    self.drop_pool(generation);
                    return Err(ServerError::Unreachable {
                        address: self.address_text.clone(),
                        reason: format!("{what}: no answer within {}s", RPC_TIMEOUT.as_secs()),
                    });
                }
            };
            match &err {
                ServerError::PermissionDenied { reason, message } => {
                    let _ = self.events.try_send(Event::Denied {
                        generation,
                        reason: *reason,
                        message: message.clone(),
                    });
                }
                ServerError::Unreachable { .. } => {
                    self.drop_pool(generation);
                    if !retried {
                        retried = true;
                        continue;
                    }
                }
                _ => {}
            }
            return Err(err);
        }
    }

    /// One attestation: a fresh key, `AttestAgent` and `GetBundle` on a connection without a
    /// client certificate, then persist and use what came back.
    async fn attest_once(&self) -> Result<(), AttestError> {
        let key = AgentKey::generate().map_err(AttestError::Local)?;
        let channel = self
            .connector(Arc::clone(&self.anon))
            .channel()
            .map_err(|e| AttestError::Local(e.to_string()))?;
        let attested = tokio::time::timeout(
            RPC_TIMEOUT,
            node::attest(channel, &self.address_text, &self.attestor, &self.td, key),
        )
        .await
        .map_err(|_| AttestError::Unreachable {
            address: self.address_text.clone(),
            reason: format!("no attestation answer within {}s", RPC_TIMEOUT.as_secs()),
        })??;
        let ders: Vec<Vec<u8>> = attested
            .bundle
            .x509_authorities
            .iter()
            .map(|a| a.asn1.clone())
            .collect();
        let roots = RootSet::from_ders(&ders, RootSource::Stored(self.state_path.clone()))
            .map_err(AttestError::Invalid)?;
        self.roots.set(roots);
        *self.bundle.lock().unwrap_or_else(|e| e.into_inner()) = ders;
        self.reattestable
            .store(attested.reattestable, Ordering::Relaxed);
        // The server has replaced the agent's serial: the old SVID is dead whatever happens
        // to the file, so the new one is used even if it cannot be saved.
        if let Err(e) = self.persist(&attested.svid) {
            tracing::error!(
                error = %e,
                "cannot save the agent state; a restart will have to attest again (a join-token \
                 agent with a new token)"
            );
        }
        tracing::info!(
            agent_id = %attested.svid.id(),
            attestor = self.attestor.kind(),
            serial = %attested.svid.serial(),
            reattestable = attested.reattestable,
            expires = %cert::show(attested.svid.not_after()),
            "attested to the SPIRE Server"
        );
        self.install(attested.svid).map_err(AttestError::Local)?;
        if self.banned.swap(false, Ordering::Relaxed) {
            tracing::info!("the agent is no longer banned: it attested again");
            self.status.update(|s| {
                if let Readiness::NotServing { reason } = &mut s.readiness {
                    "the agent attested again after a ban; identities are served again after \
                     the next sync"
                        .clone_into(reason);
                }
            });
        }
        Ok(())
    }

    /// Rotates the agent SVID: re-attestation if reattestable, else `RenewAgent`.
    async fn rotate(&self, cur: &Current) -> Result<(), String> {
        if self.reattestable.load(Ordering::Relaxed) {
            return self.attest_once().await.map_err(|e| e.to_string());
        }
        let key = AgentKey::generate()?;
        let csr = key.csr()?;
        let resp = self
            .call("RenewAgent", |channel| {
                let csr = csr.clone();
                async move {
                    let req = RenewAgentRequest {
                        params: Some(AgentX509svidParams { csr }),
                    };
                    Ok(AgentClient::new(channel)
                        .renew_agent(req)
                        .await?
                        .into_inner())
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        let Some(svid) = resp.svid else {
            return Err("the SPIRE Server renewed the agent without an SVID".to_owned());
        };
        let svid = AgentSvid::new(svid.cert_chain, key, &self.td, SystemTime::now())
            .map_err(|e| format!("the renewed agent SVID: {e}"))?;
        if svid.id() != cur.svid.id() {
            return Err(format!(
                "the renewed agent SVID has ID {}, not {}",
                svid.id(),
                cur.svid.id()
            ));
        }
        // Saved before use: the server makes the new serial current at its first use, and a
        // restart must then find the new SVID, not the old one.
        self.persist(&svid).map_err(|e| e.to_string())?;
        tracing::info!(
            agent_id = %svid.id(),
            serial = %svid.serial(),
            expires = %cert::show(svid.not_after()),
            "agent SVID renewed"
        );
        self.install(svid)
    }

    /// Reacts to an event from the calls.
    fn handle(
        &self,
        ev: Event,
        cur: &Current,
        reattest: &mut Option<String>,
        rotate_now: &mut bool,
    ) {
        match ev {
            Event::Tainted => {
                tracing::warn!(
                    "the agent SVID chains to a tainted authority of the trust domain; \
                     rotating it now"
                );
                *rotate_now = true;
            }
            Event::Denied { generation, .. } if generation != cur.generation => {
                // Met with an SVID that has since been replaced.
            }
            Event::Denied {
                reason, message, ..
            } => match reason {
                DeniedReason::AgentBanned => {
                    if !self.banned.swap(true, Ordering::Relaxed) {
                        tracing::error!(agent_id = %cur.svid.id(), %message, "{BANNED}");
                    }
                    self.status.update(|s| {
                        s.readiness = Readiness::NotServing {
                            reason: BANNED.to_owned(),
                        };
                    });
                    // A reattestable agent tries again (refused while banned; accepted after
                    // an evict). A join-token agent waits for NOT_ATTESTED after the evict.
                    if self.reattestable.load(Ordering::Relaxed) && reattest.is_none() {
                        *reattest = Some(format!("the agent was banned ({message})"));
                    }
                }
                DeniedReason::AgentExpired
                | DeniedReason::AgentNotAttested
                | DeniedReason::AgentNotActive
                | DeniedReason::AgentMustReattest => {
                    // The server no longer says banned (an evict deletes the ban with the
                    // node): what is wrong now is this.
                    self.banned.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        agent_id = %cur.svid.id(),
                        ?reason,
                        %message,
                        "the SPIRE Server no longer accepts the agent SVID; attesting again"
                    );
                    *reattest = Some(format!(
                        "the SPIRE Server no longer accepts the agent SVID ({reason:?}: {message})"
                    ));
                }
                DeniedReason::Unknown => {
                    tracing::debug!(%message, "a call was denied without a reason");
                }
            },
        }
    }

    /// Logs (once per distinct problem) and reports a failed attestation.
    fn attestation_failed(&self, e: &AttestError, why: Option<&str>, last: &mut String) {
        let msg = match why {
            Some(why) => format!("{why}, and attesting again failed: {e}"),
            None => format!("node attestation failed: {e}"),
        };
        if msg == *last {
            tracing::debug!("{msg}");
            return;
        }
        if e.needs_operator() {
            tracing::error!("{msg}");
        } else {
            tracing::warn!("{msg} (retrying)");
        }
        *last = msg.clone();
        if let AttestError::Banned { .. } = e {
            self.banned.store(true, Ordering::Relaxed);
            self.status.update(|s| {
                s.readiness = Readiness::NotServing {
                    reason: BANNED.to_owned(),
                };
            });
            return;
        }
        if self.banned.load(Ordering::Relaxed) {
            return;
        }
        // Workloads served from a cache stay served; the reason says what is wrong.
        self.status.update(|s| match &mut s.readiness {
            Readiness::Serving => {}
            Readiness::ServingFromCache { reason, .. } | Readiness::NotServing { reason } => {
                *reason = msg;
            }
        });
    }
}

#[async_trait::async_trait]
impl ServerApi for ServerLink {
    async fn get_bundle(&self) -> Result<types::Bundle, ServerError> {
        self.inner
            .call("GetBundle", |channel| async move {
                let req = GetBundleRequest { output_mask: None };
                Ok(BundleClient::new(channel)
                    .get_bundle(req)
                    .await?
                    .into_inner())
            })
            .await
    }

    async fn get_federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<types::Bundle>, ServerError> {
        let result = self
            .inner
            .call("GetFederatedBundle", |channel| {
                let req = GetFederatedBundleRequest {
                    trust_domain: trust_domain.to_owned(),
                    output_mask: None,
                };
                async move {
                    Ok(BundleClient::new(channel)
                        .get_federated_bundle(req)
                        .await?
                        .into_inner())
                }
            })
            .await;
        match result {
            Ok(b) => Ok(Some(b)),
            Err(ServerError::Status {
                code: tonic::Code::NotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn authorized_entries(
        &self,
        cached: &HashMap<String, EntryVersion>,
    ) -> Result<AuthorizedEntries, ServerError> {
        let inner = &self.inner;
        if !inner.sync_unimplemented.load(Ordering::Relaxed) {
            let synced = inner
                .call("SyncAuthorizedEntries", |channel| {
                    entries::sync(channel, cached)
                })
                .await;
            match synced {
                Err(ServerError::Status {
                    code: tonic::Code::Unimplemented,
                    ..
                }) => {
                    tracing::info!(
                        "the SPIRE Server does not implement SyncAuthorizedEntries; using \
                         GetAuthorizedEntries"
                    );
                    inner.sync_unimplemented.store(true, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        inner
            .call("GetAuthorizedEntries", |channel| {
                entries::get_authorized(channel, cached)
            })
            .await
    }

    async fn batch_new_x509_svid(
        &self,
        params: Vec<NewX509svidParams>,
    ) -> Result<Vec<batch_new_x509svid_response::Result>, ServerError> {
        let n = params.len();
        let results = self
            .inner
            .call("BatchNewX509SVID", |channel| {
                let req = BatchNewX509svidRequest {
                    params: params.clone(),
                };
                async move {
                    Ok(SvidClient::new(channel)
                        .batch_new_x509svid(req)
                        .await?
                        .into_inner()
                        .results)
                }
            })
            .await?;
        if results.len() != n {
            return Err(ServerError::Invalid(format!(
                "BatchNewX509SVID: {} results for {n} requests",
                results.len()
            )));
        }
        Ok(results)
    }

    async fn new_jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<types::Jwtsvid, ServerError> {
        let resp = self
            .inner
            .call("NewJWTSVID", |channel| {
                let req = NewJwtsvidRequest {
                    entry_id: entry_id.to_owned(),
                    audience: audience.to_vec(),
                };
                async move {
                    Ok(SvidClient::new(channel)
                        .new_jwtsvid(req)
                        .await?
                        .into_inner())
                }
            })
            .await?;
        let svid = resp
            .svid
            .ok_or_else(|| ServerError::Invalid("NewJWTSVID: an answer without an SVID".into()))?;
        if svid.token.is_empty() || svid.expires_at == 0 {
            return Err(ServerError::Invalid(
                "NewJWTSVID: an SVID without a token or expiry".into(),
            ));
        }
        Ok(svid)
    }
}
