//! Build (bind, open the CA, index entries), run, drain.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spiffed_authority::{AuthorityConfig, CaAuthority};
use spiffed_entries::store::Store;
use spiffed_entries::{ConfigEntries, EntrySources, Rules};
use spiffed_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use spiffed_workload_api::{SdsService, SdsStreams, WorkloadApi};
use tokio::net::UnixListener;
use tokio::sync::{Notify, watch};

use crate::admin::{AdminService, Reloader};
use crate::config::Config;
use crate::limits::{self, Limits, Shared, StreamLimitLayer};
use crate::telemetry::{self, Facts};

/// How long open streams get to finish after shutdown starts.
const GRACE: Duration = Duration::from_secs(5);

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Another agent is serving on the socket path.
    #[error(
        "another process is serving on {}; stop it first, or choose another socket_path",
        .0.display()
    )]
    SocketInUse(PathBuf),
    /// Something that is not a socket sits at the socket path.
    #[error(
        "{} exists and is not a socket; remove it or choose another socket_path",
        .0.display()
    )]
    NotASocket(PathBuf),
    /// A filesystem or socket operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The entry store could not be opened (corrupt, unreadable, too new).
    #[error(transparent)]
    Store(#[from] spiffed_entries::store::StoreError),
    /// The config file's entries break a rule, or the store could not be loaded.
    #[error(transparent)]
    Entries(#[from] spiffed_entries::SourceError),
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Authority(#[from] spiffed_authority::Error),
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Serve(String),
    /// A directory or file of the agent is unsafe, the data dir is locked by another agent, or
    /// the entry store is lost.
    #[error(transparent)]
    Files(#[from] crate::files::FilesError),
    /// Agent mode could not start: its state, its cache or a file of `[spire_server]` is
    /// unusable (the message names it and the fix).
    #[error("agent mode: {0}")]
    AgentMode(String),
    /// The address of `[metrics]` or `[health]` cannot be listened on (the message names the
    /// key and the fix).
    #[error("{0}")]
    Listen(String),
    /// Federation could not start: a bootstrap bundle, the bundle endpoint's certificate or a
    /// relationship's roots are unusable (the message names the file and the fix).
    #[error("{0}")]
    Federation(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AgentError + 'a {
    move |source| AgentError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Where identities come from.
#[derive(Clone)]
pub(crate) enum Backend {
    /// The embedded CA (standalone and dev mode).
    Standalone(CaAuthority),
    /// The SPIRE Server (agent mode).
    Agent {
        issuer: spiffed_spire::SpireIssuer,
        status: watch::Receiver<spiffed_spire::status::Status>,
    },
}

/// A built agent: CA loaded (or agent mode opened), entries indexed, socket bound; not yet
/// serving.
pub struct Bound {
    cfg: Config,
    listener: UnixListener,
    admin_listener: UnixListener,
    backend: Backend,
    /// Agent mode's tasks, not started yet.
    agent_mode: Option<crate::agent_mode::AgentMode>,
    entries: EntrySources,
    api: WorkloadApi,
    /// Envoy SDS on the same socket (`None`: `[sds] disable_sds_api = true`).
    sds: Option<SdsService>,
    /// How many SDS streams are open (zero while SDS is off).
    sds_streams: SdsStreams,
    admin: AdminService,
    /// Trust bundles on the admin socket.
    bundle_admin: crate::bundles::BundleService,
    /// `data_dir/agent.lock`, flocked while this agent lives.
    data_dir_lock: fs::File,
    /// What status, health and metrics report.
    facts: Arc<Facts>,
    /// `[metrics]` and `[health]`, bound.
    metrics_listener: Option<std::net::TcpListener>,
    health_listener: Option<std::net::TcpListener>,
    /// Federation (standalone mode), prepared.
    federation: Option<crate::federation::Prepared>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("socket_path", &self.cfg.socket_path)
            .finish_non_exhaustive()
    }
}

/// Creates the socket's directory with `dir_mode` (or checks the existing one, which is never
/// chmodded: see `files.rs`), refuses a path held by a live agent, and replaces a stale socket
/// file left by one that died. Returns whether the directory was created.
fn prepare_socket_path(path: &Path, what: &'static str, dir_mode: u32) -> Result<bool, AgentError> {
    let mut created = false;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        created = crate::files::prepare_dir(what, dir, dir_mode)?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(AgentError::NotASocket(path.to_owned())),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(AgentError::SocketInUse(path.to_owned())),
            Err(_) => {
                tracing::info!(path = %path.display(), "replacing a stale socket file");
                fs::remove_file(path).map_err(io_err("remove stale socket", path))?;
                Ok(created)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(created),
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

/// Applies the request, JWT cache and log bounds of `cfg` to the authority and the service.
fn apply_limits(cfg: &Config, backend: &Backend, api: WorkloadApi) -> WorkloadApi {
    spiffed_core::untrusted::set_max_chars(cfg.max_logged_string_length);
    if let Backend::Standalone(authority) = backend {
        authority.set_jwt_cache_limits(spiffed_authority::JwtCacheLimits {
            bytes: cfg.jwt_cache_bytes,
            entries_per_identity: cfg.jwt_cache_entries_per_identity,
        });
    }
    api.with_limits(spiffed_workload_api::RequestLimits {
        max_jwt_audiences: cfg.max_jwt_audiences,
        max_jwt_audience_length: cfg.max_jwt_audience_length,
        max_jwt_token_length: cfg.max_jwt_token_length,
        denial_log_lines_per_second: cfg.denial_log_lines_per_second,
    })
}

/// The agent's counters: what open streams cost and what the SVID cache holds.
#[derive(Clone)]
pub struct Stats {
    api: WorkloadApi,
    backend: Backend,
    feed: spiffed_core::EntryFeed,
    sds_streams: SdsStreams,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stats")
    }
}

impl Stats {
    /// How many Envoy SDS `StreamSecrets` streams are open now (zero while SDS is off).
    pub fn sds_streams_open(&self) -> usize {
        self.sds_streams.open()
    }

    /// Logs one line with every counter (`spiffed` does on SIGUSR1).
    pub fn log(&self) {
        let sds_streams = self.sds_streams.open();
        let wakeups = self.api.wakeups();
        let entries = self.feed.read().len();
        match &self.backend {
            Backend::Standalone(authority) => {
                let svids = authority.svid_stats();
                tracing::info!(
                    entries,
                    sds_streams,
                    stream_wakeups_recomputed = wakeups.recomputed,
                    stream_wakeups_filtered = wakeups.filtered,
                    x509_svids_cached = svids.cached,
                    x509_svids_held = svids.held,
                    x509_svids_preminted = svids.pinned,
                    x509_mints = authority.x509_mints(),
                    jwt_svids_cached = authority.cached_jwt_svids(),
                    "stats"
                );
            }
            Backend::Agent { issuer, status } => {
                let svids = issuer.stats();
                let readiness = match &status.borrow().readiness {
                    spiffed_spire::status::Readiness::Serving => "serving",
                    spiffed_spire::status::Readiness::ServingFromCache { .. } => {
                        "serving_from_cache"
                    }
                    spiffed_spire::status::Readiness::NotServing { .. } => "not_serving",
                };
                tracing::info!(
                    entries,
                    sds_streams,
                    readiness,
                    stream_wakeups_recomputed = wakeups.recomputed,
                    stream_wakeups_filtered = wakeups.filtered,
                    x509_svids_cached = svids.cached,
                    x509_svids_held = svids.held,
                    x509_svids_preminted = svids.pinned,
                    x509_mints = issuer.x509_mints(),
                    jwt_svids_cached = issuer.cached_jwt_svids(),
                    "stats"
                );
            }
        }
    }
}

/// Opens the CA, indexes the entries and binds the Workload API socket.
///
/// Must run inside a tokio runtime (the listener registers with it).
pub fn build(cfg: Config) -> Result<Bound, AgentError> {
    // The data dir is ours and private, locked before anything in it is read; its files are
    // checked, and a store lost next to an existing CA stops the start.
    crate::files::prepare_dir("data_dir", &cfg.data_dir, 0o700)?;
    let data_dir_lock = crate::files::lock_data_dir(&cfg.data_dir)?;
    crate::files::check_mode_files(&cfg.data_dir, cfg.spire_server.is_some())?;
    let attestor = Arc::new(spiffed_attest::builtin());
    let (backend, agent_mode, entries) = match &cfg.spire_server {
        Some(spire) => {
            let (mode, entries) = crate::agent_mode::open(&cfg, spire)?;
            let backend = Backend::Agent {
                issuer: mode.issuer.clone(),
                status: mode.status_rx.clone(),
            };
            (backend, Some(mode), entries)
        }
        None => {
            let (authority, entries) = open_standalone(&cfg, attestor.clone())?;
            (Backend::Standalone(authority), None, entries)
        }
    };
    // Federation (standalone): the endpoint bound and the bootstrap bundles stored before
    // anything serves, so a bad address or file stops the start here.
    // Bundle writes (`spiffed bundle set|delete` and the relationships' refreshes) go from
    // store to publish one at a time, so the store and the bundle set never disagree.
    let bundle_writes = Arc::new(tokio::sync::Mutex::new(()));
    let federation = match &backend {
        Backend::Standalone(ca) => {
            crate::federation::prepare(&cfg, ca, &entries, bundle_writes.clone())?
        }
        Backend::Agent { .. } => None,
    };
    let issuer: Arc<dyn spiffed_core::Issuer> = match &backend {
        Backend::Standalone(authority) => Arc::new(authority.clone()),
        Backend::Agent { issuer, .. } => Arc::new(issuer.clone()),
    };
    if let Some(warning) = spiffed_attest::exe_access_warning(&entries.feed().needs()) {
        tracing::warn!("{warning}");
    }
    let api = WorkloadApi::new(attestor.clone(), issuer, entries.feed(), cfg.synthetic_ids)
        .with_federate_all(cfg.federate_all);
    let api = apply_limits(&cfg, &backend, api);
    // The HTTP endpoints are bound first: a bad or busy address stops the start here.
    let listen = |key: &'static str, e: Option<crate::config::HttpEndpoint>| {
        e.map(|e| telemetry::http::bind(key, e.listen))
            .transpose()
            .map_err(AgentError::Listen)
    };
    let metrics_listener = listen("metrics.listen", cfg.metrics)?;
    let health_listener = listen("health.listen", cfg.health)?;
    let facts = Facts::new(&cfg, backend.clone(), api.clone(), entries.feed());
    bind(
        cfg,
        backend,
        agent_mode,
        entries,
        api,
        attestor,
        data_dir_lock,
        (facts, metrics_listener, health_listener),
        (federation, bundle_writes),
    )
}

/// The embedded CA and the entry sources of standalone mode (config file and store).
fn open_standalone(
    cfg: &Config,
    attestor: Arc<spiffed_attest::CompositeAttestor>,
) -> Result<(CaAuthority, EntrySources), AgentError> {
    crate::files::check_data_files(&cfg.data_dir, cfg.new_entry_store)?;
    let authority = CaAuthority::open(AuthorityConfig {
        trust_domain: cfg.trust_domain.clone(),
        data_dir: cfg.data_dir.clone(),
        ca_ttl: cfg.ca_ttl,
        x509_svid_ttl: cfg.x509_svid_ttl,
        jwt_svid_ttl: cfg.jwt_svid_ttl,
        new_root: cfg.new_trust_root,
        premint_entries: cfg.premint_entries,
        upstream: cfg.upstream_authority.clone(),
    })?;
    let store = Store::open(&cfg.data_dir.join("entries.sqlite"))?;
    // Every entry, from the config file or the store, is checked by the same rules
    // (`Entry::checked`), with the selector types of the configured attestor plugins.
    let rules = Rules {
        trust_domain: cfg.trust_domain.clone(),
        limits: spiffed_core::EntryLimits {
            max_selectors: cfg.max_selectors_per_entry,
            max_dns_names: cfg.max_dns_names_per_entry,
            min_svid_ttl: cfg.min_svid_ttl,
            ca_ttl: cfg.ca_ttl,
        },
        selectors: attestor,
    };
    let (entries, loaded) = EntrySources::open(
        store,
        ConfigEntries {
            entries: cfg.entries.clone(),
            file: cfg.source.as_ref().map(|p| p.display().to_string()),
        },
        rules,
    )?;
    // Federated bundles set with `spiffed bundle set` reach workloads from the first request.
    if let Some(store) = entries.store() {
        match crate::bundles::load_stored(store, &authority) {
            Ok(0) => {}
            Ok(n) => tracing::info!(bundles = n, "federated bundles loaded from the store"),
            Err(e) => tracing::warn!("federated bundles not loaded: {}", e.message()),
        }
    }
    // Loading a large store leaves parsing buffers and SQLite's page cache behind in the heap:
    // hand the free part back before serving (a few ms, once).
    spiffed_attest::release_free_memory();
    for (id, e) in &loaded.refused {
        tracing::warn!(
            entry = %id,
            field = e.field(),
            "stored entry not served: {e}; fix it with `spiffed entry update {id}` or remove it \
             with `spiffed entry delete {id}`"
        );
    }
    Ok((authority, entries))
}

/// The facts the agent reports, and its bound HTTP endpoints (metrics, health).
type Telemetry = (
    Arc<Facts>,
    Option<std::net::TcpListener>,
    Option<std::net::TcpListener>,
);

/// Binds the admin socket, then the Workload API socket.
#[allow(
    clippy::too_many_arguments,
    reason = "the parts build() made, handed on once"
)]
fn bind(
    cfg: Config,
    backend: Backend,
    agent_mode: Option<crate::agent_mode::AgentMode>,
    entries: EntrySources,
    api: WorkloadApi,
    attestor: Arc<spiffed_attest::CompositeAttestor>,
    data_dir_lock: fs::File,
    (facts, metrics_listener, health_listener): Telemetry,
    (federation, bundle_writes): (
        Option<crate::federation::Prepared>,
        Arc<tokio::sync::Mutex<()>>,
    ),
) -> Result<Bound, AgentError> {
    // An owner-only socket (mode without group/other bits) also gets an owner-only directory.
    let dir_mode = if cfg.socket_mode & 0o077 == 0 {
        0o700
    } else {
        0o755
    };
    prepare_socket_path(&cfg.socket_path, "socket directory", dir_mode)?;
    // The admin socket is owner-only unless admin_uids names other (non-root) users, who then
    // must be able to reach it; SO_PEERCRED decides either way.
    let own_uid = rustix::process::getuid().as_raw();
    let others = cfg.admin_uids.iter().any(|&u| u != 0 && u != own_uid);
    let (admin_dir_mode, admin_mode) = if others {
        (0o711, 0o666)
    } else {
        (0o700, 0o600)
    };
    let created = prepare_socket_path(
        &cfg.admin_socket_path,
        "admin socket directory",
        admin_dir_mode,
    )?;
    if let Some(parent) = cfg.admin_socket_path.parent()
        && !created
        && others
        && fs::metadata(parent).is_ok_and(|m| m.permissions().mode() & 0o001 == 0)
    {
        tracing::warn!(
            dir = %parent.display(),
            "admin_uids names other users, but they cannot enter the existing admin socket \
             directory; the agent does not change the mode of a directory it did not create: \
             `chmod 0711` it"
        );
    }
    let admin_listener = UnixListener::bind(&cfg.admin_socket_path)
        .map_err(io_err("bind", &cfg.admin_socket_path))?;
    fs::set_permissions(
        &cfg.admin_socket_path,
        fs::Permissions::from_mode(admin_mode),
    )
    .map_err(io_err("chmod", &cfg.admin_socket_path))?;
    // The public socket is bound last (its path checked first, so a live agent there is found
    // before anything is bound): once it accepts, the admin socket does too, so a script (or
    // test) that waits for the public socket can go on to `spiffed entry ...`.
    let listener =
        UnixListener::bind(&cfg.socket_path).map_err(io_err("bind", &cfg.socket_path))?;
    fs::set_permissions(
        &cfg.socket_path,
        fs::Permissions::from_mode(cfg.socket_mode),
    )
    .map_err(io_err("chmod", &cfg.socket_path))?;

    // Envoy SDS over the same attestation, entries, SVIDs, bundles and limits.
    let sds = cfg.sds.clone().map(|c| api.sds(c));
    let sds_streams = sds.as_ref().map(SdsService::streams).unwrap_or_default();
    let bundle_admin = crate::bundles::BundleService {
        sources: entries.clone(),
        backend: backend.clone(),
        td: cfg.trust_domain.clone(),
        admin_uids: cfg.admin_uids.clone(),
        own_uid,
        writes: bundle_writes,
    };
    let admin = AdminService {
        sources: entries.clone(),
        attestor,
        td: cfg.trust_domain.clone(),
        admin_uids: cfg.admin_uids.clone(),
        own_uid,
        synthetic_ids: cfg.synthetic_ids,
        facts: facts.clone(),
    };
    Ok(Bound {
        cfg,
        listener,
        admin_listener,
        backend,
        agent_mode,
        entries,
        api,
        sds,
        sds_streams,
        admin,
        bundle_admin,
        data_dir_lock,
        facts,
        metrics_listener,
        health_listener,
        federation,
    })
}

/// Keeps the gRPC health service in step with agent mode's readiness.
async fn health_follows(
    reporter: tonic_health::server::HealthReporter,
    mut status: watch::Receiver<spiffed_spire::status::Status>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let serving = !matches!(
            status.borrow_and_update().readiness,
            spiffed_spire::status::Readiness::NotServing { .. }
        );
        let state = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status("", state).await;
        reporter
            .set_service_status(
                <SpiffeWorkloadApiServer<WorkloadApi> as tonic::server::NamedService>::NAME,
                state,
            )
            .await;
        tokio::select! {
            r = status.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

impl Bound {
    /// The Workload API socket path.
    pub fn socket_path(&self) -> &Path {
        &self.cfg.socket_path
    }

    /// A handle for the agent's counters (logged on SIGUSR1).
    pub fn stats(&self) -> Stats {
        Stats {
            api: self.api.clone(),
            backend: self.backend.clone(),
            feed: self.entries.feed(),
            sds_streams: self.sds_streams.clone(),
        }
    }

    /// The count of open Envoy SDS streams (zero while SDS is off).
    pub fn sds_streams(&self) -> SdsStreams {
        self.sds_streams.clone()
    }

    /// A handle for replacing the config file's entries while the agent runs (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader(self.entries.clone())
    }

    /// The configuration the agent runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Serves until `shutdown` completes, then drains: streams end, clients get up to a grace
    /// period to go, and the socket file is removed.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let Self {
            cfg,
            listener,
            admin_listener,
            backend,
            agent_mode,
            entries,
            api,
            sds,
            sds_streams: _,
            admin,
            bundle_admin,
            data_dir_lock,
            facts,
            metrics_listener,
            health_listener,
            federation,
        } = self;
        // Connections and streams one uid may hold, and the descriptors they may use.
        let fds = limits::raise_fd_limit();
        let limits = Limits::resolve(&cfg, &fds);
        tracing::info!(
            max_connections_per_uid = limits.max_connections_per_uid,
            max_streams_per_connection = limits.max_streams_per_connection,
            max_streams_per_uid = limits.max_streams_per_uid,
            handshake_timeout = %humantime::format_duration(limits.handshake_timeout),
            idle_timeout = %humantime::format_duration(limits.idle_timeout),
            fd_reserve = limits.fd_reserve,
            "Workload API connection limits"
        );
        let shared = Shared::observed(limits, &fds, facts.rpc.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        // The HTTP endpoints: on their own tasks, stopped with the rest.
        for (listener, what, handler) in [
            (
                metrics_listener,
                "metrics",
                telemetry::metrics::handler as fn(Arc<Facts>) -> telemetry::http::Handler,
            ),
            (health_listener, "health", telemetry::health::handler),
        ] {
            let Some(listener) = listener else { continue };
            let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| {
                AgentError::Listen(format!("cannot serve {what} ({what}.listen): {e}"))
            })?;
            if let Ok(addr) = listener.local_addr() {
                let paths = if what == "metrics" {
                    "/metrics"
                } else {
                    "/live, /ready"
                };
                tracing::info!(address = %addr, paths, "serving {what} over HTTP");
                if !addr.ip().is_loopback() {
                    tracing::warn!(
                        address = %addr,
                        "{what}.listen is not a loopback address: other hosts can reach it"
                    );
                }
            }
            tasks.push(tokio::spawn(telemetry::http::serve(
                listener,
                what,
                handler(facts.clone()),
                stop_rx.clone(),
            )));
        }
        // The authority mints and rotates an SVID for every entry of the set, off the request
        // path; its receiver does not keep the set's channel open, so dropping `entries` below
        // still ends every stream.
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>()
            .await;
        let notifier = telemetry::notify::Notifier::from_env().map(Arc::new);
        if let (Some(n), Some(every)) = (&notifier, telemetry::notify::watchdog_interval()) {
            tasks.push(tokio::spawn(telemetry::notify::watchdog(
                n.clone(),
                every,
                stop_rx.clone(),
            )));
        }
        if let (Some(prepared), Backend::Standalone(ca)) = (federation, &backend) {
            tasks.extend(crate::federation::spawn(prepared, ca, &stop_rx)?);
        }
        let status_service = match (&backend, agent_mode) {
            (Backend::Standalone(authority), _) => {
                tasks.push(tokio::spawn(
                    authority.clone().run_with_entries(stop_rx, entries.feed()),
                ));
                crate::status::StatusService::Standalone
            }
            (Backend::Agent { status, .. }, mode) => {
                let address = cfg
                    .spire_server
                    .as_ref()
                    .map(|s| s.address.to_string())
                    .unwrap_or_default();
                if let Some(mode) = mode {
                    tasks.extend(mode.spawn(stop_rx.clone()));
                }
                // The health service says NOT_SERVING while no identity is served (no cache
                // and no server yet, or a ban).
                tasks.push(tokio::spawn(health_follows(
                    reporter.clone(),
                    status.clone(),
                    stop_rx,
                )));
                crate::status::StatusService::Agent {
                    status: status.clone(),
                    address,
                }
            }
        };
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(spiffed_proto::WORKLOAD_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| AgentError::Serve(e.to_string()))?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(spiffed_proto::WORKLOAD_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| AgentError::Serve(e.to_string()))?;

        let draining = Arc::new(Notify::new());
        let (admin_stop_tx, mut admin_stop_rx) = watch::channel(false);
        let signal = {
            let draining = draining.clone();
            let facts = facts.clone();
            let notifier = notifier.clone();
            async move {
                shutdown.await;
                facts.set_stopping();
                if let Some(n) = &notifier {
                    n.send("STOPPING=1");
                }
                tracing::info!("shutting down: ending streams and draining connections");
                // Closing the entry sources drops the publisher: every open stream's feed ends.
                entries.close();
                let _ = stop_tx.send(true);
                let _ = admin_stop_tx.send(true);
                draining.notify_one();
            }
        };
        let admin_server = tonic::transport::Server::builder()
            .add_service(admin.into_server())
            .add_service(bundle_admin.into_server())
            .serve_with_incoming_shutdown(
                spiffed_attest::listen::incoming(admin_listener),
                async move {
                    let _ = admin_stop_rx.wait_for(|s| *s).await;
                },
            );
        let admin_task = tokio::spawn(admin_server);
        tracing::info!(
            socket = %cfg.socket_path.display(),
            trust_domain = %cfg.trust_domain,
            sds = sds.is_some(),
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "serving the SPIFFE Workload API"
        );
        let shared_for_facts = shared.clone();
        let serve = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .layer(StreamLimitLayer::new(shared.clone()))
            .add_service(health)
            .add_service(status_service.into_server())
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(api.into_server())
            // SDS streams pass through the same per-uid stream limit layer as the Workload API.
            .add_optional_service(sds.map(SdsService::into_server))
            .serve_with_incoming_shutdown(
                // Within the per-uid and descriptor limits, each connection closed when silent
                // or idle (limits.rs). grpc-core and grpc-java send the socket path as
                // :authority, which h2 rejects; the front rewrites it (CONFORMANCE item 11).
                limits::incoming(
                    Box::pin(spiffed_attest::listen::incoming(listener)),
                    shared.clone(),
                    spiffed_h2front::AuthorityFront::new,
                ),
                signal,
            );
        // The socket is bound and the server about to poll it: connections queue until then.
        facts.set_serving(shared_for_facts, fds.soft);
        if let Some(n) = &notifier {
            n.send("READY=1\nSTATUS=serving the SPIFFE Workload API");
        }
        let result = tokio::select! {
            r = serve => r.map_err(|e| AgentError::Serve(e.to_string())),
            () = async { draining.notified().await; tokio::time::sleep(GRACE).await } => {
                tracing::warn!("grace period over; closing the remaining connections");
                Ok(())
            }
        };
        for path in [&cfg.socket_path, &cfg.admin_socket_path] {
            if let Err(e) = fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the socket");
            }
        }
        admin_task.abort();
        for task in tasks {
            task.abort();
        }
        tracing::info!("stopped");
        drop(data_dir_lock);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // A socket nobody listens on any more.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        prepare_socket_path(&path, "socket directory", 0o700).unwrap();
        assert!(!path.exists());
        // A live listener.
        let _live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(
            prepare_socket_path(&path, "socket directory", 0o700),
            Err(AgentError::SocketInUse(_))
        ));
        // A regular file.
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            prepare_socket_path(&file, "socket directory", 0o700),
            Err(AgentError::NotASocket(_))
        ));
    }
}
