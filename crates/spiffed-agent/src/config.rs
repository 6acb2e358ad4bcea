//! The agent's configuration file (DESIGN.md §2): TOML text in, a validated [`Config`] out.
//!
//! The text is parsed into raw structs that refuse unknown keys and keep every value's position;
//! then a single validation step builds the typed [`Config`]. A problem comes back as a
//! [`ConfigError`] naming the file, line, column and key, with a fix:
//!
//! ```text
//! spiffed.toml:12:13: entries[1].spiffe_id: spiffe_id "spiffe://other.org/x" is outside the trust domain "example.org"
//!   fix: use an ID of the form spiffe://example.org/...
//! ```
//!
//! ```
//! use std::path::Path;
//! use spiffed_agent::config::Config;
//!
//! let cfg = Config::from_toml(
//!     r#"
//! trust_domain = "example.org"
//!
//! [[entries]]
//! spiffe_id = "spiffe://example.org/web"
//! selectors = ["unix:uid:1000"]
//! "#,
//!     Path::new("spiffed.toml"),
//! )?;
//! assert_eq!(cfg.entries.len(), 1);
//! # Ok::<(), spiffed_agent::config::ConfigError>(())
//! ```

mod error;
mod keys;
mod raw;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use spiffed_core::{Entry, TrustDomain};

pub use error::{ConfigError, ConfigErrorKind};
pub use spiffed_authority::NewRootPolicy;
pub use validate::MAX_REPORTED_PROBLEMS;

/// Default Workload API socket for `spiffed run`.
pub const DEFAULT_SOCKET_PATH: &str = "/run/spiffed/public/api.sock";
/// Default admin socket, in its own owner-only directory.
pub const DEFAULT_ADMIN_SOCKET_PATH: &str = "/run/spiffed/private/admin.sock";
/// Default directory for CA keys and the entry store.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/spiffed";
/// Default mode of the Workload API socket: anyone may connect; attestation decides who gets what.
pub const DEFAULT_SOCKET_MODE: u32 = 0o777;
/// Default X.509-SVID lifetime.
pub const DEFAULT_X509_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default JWT-SVID lifetime.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(300);
/// Default CA certificate lifetime.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// Most `[[entries]]` a file may hold (larger sets belong in the entry store).
pub const MAX_ENTRIES: usize = 10_000;
/// Default of `max_selectors_per_entry`: most selectors one entry may have (file and admin API).
pub const DEFAULT_MAX_SELECTORS_PER_ENTRY: usize = 64;
/// Default of `max_dns_names_per_entry`: most DNS names one entry may put in its X.509-SVID.
pub const DEFAULT_MAX_DNS_NAMES_PER_ENTRY: usize = 64;
/// Default of `min_svid_ttl`: the shortest `x509_svid_ttl` or `jwt_svid_ttl` accepted. SVIDs
/// are re-minted at half their lifetime, for every entry.
pub const DEFAULT_MIN_SVID_TTL: Duration = Duration::from_secs(10);
/// Default of `min_ca_ttl`: the shortest `ca_ttl` accepted. Every CA rotation rewrites
/// `ca.json` (fsynced) about three times per `ca_ttl`.
pub const DEFAULT_MIN_CA_TTL: Duration = Duration::from_secs(60);

/// The bounds of the automatic `max_connections_per_uid` (a sixteenth of the descriptor
/// limit): at least the load generator's 100 fan-out connections with room to spare, at most
/// what one uid plausibly needs.
pub const AUTO_CONNECTIONS_PER_UID: std::ops::RangeInclusive<usize> = 256..=4096;
/// Default `max_streams_per_connection`: h2's recommended minimum for
/// SETTINGS_MAX_CONCURRENT_STREAMS.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Default `max_streams_per_uid`: room for the fan-out benchmark's 10,000 streams from one uid.
pub const DEFAULT_MAX_STREAMS_PER_UID: usize = 16_384;
/// Default `handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `fd_reserve`.
pub const DEFAULT_FD_RESERVE: usize = 64;
/// Default `worker_threads`: one thread runs every connection, stream and background task
/// (tokio's current-thread scheduler; more use the multi-thread one, crates/spiffed/src/main.rs).
/// A second one costs more than it gives on a node's loads: each connection's work then
/// crosses threads (a wake-up, a steal, heap memory freed on the thread that did not allocate
/// it), which took a fifth of the agent's CPU per cold fetch (bench/ANALYSIS.md).
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// The most `worker_threads` the file may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;
/// Default `premint_entries`: registered entries whose X.509-SVIDs are minted ahead of use.
pub const DEFAULT_PREMINT_ENTRIES: usize = spiffed_authority::DEFAULT_PREMINT_ENTRIES;

/// An HTTP endpoint of the agent: `[metrics]` (Prometheus, `GET /metrics`) or `[health]`
/// (`GET /live`, `GET /ready`). Off unless its table is in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpEndpoint {
    /// The TCP address it listens on, IP and port (e.g. `127.0.0.1:9988`); only there.
    pub listen: std::net::SocketAddr,
}

/// Default `[federation.bundle_endpoint] refresh_hint`: how often peers are told to fetch
/// the bundle again (SPIRE Server's default).
pub const DEFAULT_BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(300);
/// Default `[federation.bundle_endpoint] max_connections`.
pub const DEFAULT_BUNDLE_ENDPOINT_CONNECTIONS: usize = 64;
/// Default `[[federation.trust_domains]] fetch_timeout`.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `[[federation.trust_domains]] max_bundle_bytes` (the bundle parser's limit too).
pub const DEFAULT_MAX_BUNDLE_BYTES: usize = spiffed_core::spiffe_bundle::MAX_BUNDLE_BYTES;

/// `[federation.bundle_endpoint]`: the own trust domain's bundle served to federated peers,
/// in the SPIFFE bundle format over HTTPS (standalone mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleEndpointConfig {
    /// The TCP address it listens on (peers on other hosts must reach it).
    pub listen: std::net::SocketAddr,
    /// How it authenticates to peers.
    pub profile: EndpointServing,
    /// The `spiffe_refresh_hint` it publishes (default [`DEFAULT_BUNDLE_REFRESH_HINT`]).
    pub refresh_hint: Duration,
    /// Most connections served at once (default [`DEFAULT_BUNDLE_ENDPOINT_CONNECTIONS`]).
    pub max_connections: usize,
}

/// How the bundle endpoint authenticates to peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointServing {
    /// `https_spiffe` (the default): an X.509-SVID with this ID, minted and rotated by the
    /// agent's CA (default `spiffe://TD/spiffed/bundle-endpoint`).
    HttpsSpiffe {
        /// The endpoint's SPIFFE ID, which peers configure as `endpoint_spiffe_id`.
        endpoint_spiffe_id: spiffed_core::SpiffeId,
    },
    /// `https_web`: a Web PKI certificate and key from files.
    HttpsWeb {
        /// PEM certificate chain, leaf first.
        certificate_path: PathBuf,
        /// PEM private key.
        private_key_path: PathBuf,
    },
}

/// How a foreign bundle endpoint authenticates (`bundle_endpoint_profile`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelationshipProfile {
    /// `https_spiffe`: the endpoint's SVID has exactly this ID and chains to the bundle held for
    /// its trust domain (bootstrapped from `bundle_path` or `spiffed bundle set`).
    HttpsSpiffe {
        /// `endpoint_spiffe_id`.
        endpoint_spiffe_id: spiffed_core::SpiffeId,
    },
    /// `https_web`: a Web PKI certificate for the URL's host, chaining to the host's roots or
    /// to those of `root_certificates_path`.
    HttpsWeb {
        /// Extra PEM roots.
        root_certificates_path: Option<PathBuf>,
    },
}

/// The format of a bootstrap bundle file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BundleFileFormat {
    /// A SPIFFE bundle (JWKS), as `spire-server bundle show -format spiffe` writes it.
    #[default]
    Spiffe,
    /// PEM certificates (X.509 authorities only).
    Pem,
}

/// One `[[federation.trust_domains]]`: a foreign trust domain whose bundle is fetched from
/// its bundle endpoint and kept fresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FederationRelationship {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint (`https://...`).
    pub bundle_endpoint_url: spiffed_federation::EndpointUrl,
    /// How the endpoint authenticates.
    pub profile: RelationshipProfile,
    /// A bootstrap bundle of the trust domain, used when none is stored yet.
    pub bundle_path: Option<PathBuf>,
    /// The format of `bundle_path`.
    pub bundle_format: BundleFileFormat,
    /// A fixed interval between fetches instead of a quarter of the peer's refresh hint.
    pub refresh_interval: Option<Duration>,
    /// The deadline of one fetch (default [`DEFAULT_FETCH_TIMEOUT`]).
    pub fetch_timeout: Duration,
    /// The largest bundle accepted (default [`DEFAULT_MAX_BUNDLE_BYTES`]).
    pub max_bundle_bytes: usize,
}

/// How much the agent logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LogLevel {
    /// Everything, including per-message detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Issuances, denials, start and stop (the default).
    #[default]
    Info,
    /// Problems the agent works around.
    Warn,
    /// Failures only.
    Error,
}

impl LogLevel {
    /// The name used in the file and in tracing filters: `trace`, `debug`, `info`, `warn`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name used in the file: `text` or `json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The validated agent configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from (`None` for dev defaults).
    pub source: Option<PathBuf>,
    /// The trust domain every identity belongs to.
    pub trust_domain: TrustDomain,
    /// The Workload API socket (default [`DEFAULT_SOCKET_PATH`]).
    pub socket_path: PathBuf,
    /// Permission bits of the Workload API socket (default `0o777`; `"0777"` in the file).
    pub socket_mode: u32,
    /// The admin socket (default [`DEFAULT_ADMIN_SOCKET_PATH`]).
    pub admin_socket_path: PathBuf,
    /// Uids allowed on the admin socket, besides the agent's own (default `[0]`; sorted, no
    /// duplicates).
    pub admin_uids: Vec<u32>,
    /// CA keys and the entry store (default [`DEFAULT_DATA_DIR`]).
    pub data_dir: PathBuf,
    /// X.509-SVID lifetime unless an entry overrides it (default 1h; never above `ca_ttl`).
    pub x509_svid_ttl: Duration,
    /// JWT-SVID lifetime unless an entry overrides it (default 5m).
    pub jwt_svid_ttl: Duration,
    /// CA certificate lifetime (default 24h).
    pub ca_ttl: Duration,
    /// How much to log (default info).
    pub log_level: LogLevel,
    /// How to write logs (default text).
    pub log_format: LogFormat,
    /// Whether callers that match no entry get `spiffe://TD/uid-UID/EXE_NAME` (default false).
    pub synthetic_ids: bool,
    /// The file's `[[entries]]`, validated, in file order. Their ids are `config-` and 16 hex
    /// digits of a SHA-256 over the SPIFFE ID and the sorted selectors, so an id keeps its
    /// meaning when entries are added, removed or reordered around it.
    pub entries: Vec<Entry>,
    /// When a new CA may replace the trust root of a data dir that held one before. Not a key
    /// of the file: `spiffed run --new-trust-root` sets [`NewRootPolicy::AtStart`] for one
    /// start, and `spiffed dev` sets [`NewRootPolicy::Always`] (default `Refuse`).
    pub new_trust_root: NewRootPolicy,
    /// Most connections one uid may hold open on the Workload API socket; more are closed at
    /// accept. `None` (the default): a sixteenth of the descriptor limit, within
    /// [`AUTO_CONNECTIONS_PER_UID`].
    pub max_connections_per_uid: Option<usize>,
    /// Most concurrent streams (RPCs) on one connection, advertised as HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS (default [`DEFAULT_MAX_STREAMS_PER_CONNECTION`]).
    pub max_streams_per_connection: u32,
    /// Most concurrent streams of one uid over all its connections; more are answered
    /// ResourceExhausted (default [`DEFAULT_MAX_STREAMS_PER_UID`]).
    pub max_streams_per_uid: usize,
    /// How long a new connection has to send the HTTP/2 preface and its first request
    /// (default [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// How long a connection with no open stream is kept (default [`DEFAULT_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// Descriptors kept free for the admin socket and the agent's own files: the Workload API
    /// socket stops accepting while fewer are free (default [`DEFAULT_FD_RESERVE`]).
    pub fd_reserve: usize,
    /// Most audiences in one FetchJWTSVID request (default 16).
    pub max_jwt_audiences: usize,
    /// Longest JWT audience, in bytes (default 1024).
    pub max_jwt_audience_length: usize,
    /// Longest token ValidateJWTSVID accepts, in bytes (default 32768).
    pub max_jwt_token_length: usize,
    /// Most bytes the JWT-SVID cache holds (default 4 MiB).
    pub jwt_cache_bytes: usize,
    /// Most cached JWT-SVIDs (audience sets) per entry (default 64).
    pub jwt_cache_entries_per_identity: usize,
    /// Characters of a client-supplied string kept in log lines and errors (default 128).
    pub max_logged_string_length: usize,
    /// Denial log lines per second and kind; the rest are summarized (default 10).
    pub denial_log_lines_per_second: u32,
    /// Registered entries whose X.509-SVIDs are minted before any workload asks (default
    /// [`DEFAULT_PREMINT_ENTRIES`]); the others are minted on first use and dropped when unused.
    pub premint_entries: usize,
    /// Threads of the async runtime that serve the sockets and run the agent's tasks (default
    /// [`DEFAULT_WORKER_THREADS`]). Blocking work (SQLite, hashing executables, file writes)
    /// has its own threads besides. The binary reads it before it starts the runtime, so a
    /// change needs a restart.
    pub worker_threads: usize,
    /// Most selectors one entry may have, in the file and through the admin API (default
    /// [`DEFAULT_MAX_SELECTORS_PER_ENTRY`]).
    pub max_selectors_per_entry: usize,
    /// Most DNS names one entry may have (default [`DEFAULT_MAX_DNS_NAMES_PER_ENTRY`]).
    pub max_dns_names_per_entry: usize,
    /// Shortest X.509-SVID or JWT-SVID lifetime accepted anywhere (default
    /// [`DEFAULT_MIN_SVID_TTL`]).
    pub min_svid_ttl: Duration,
    /// Shortest `ca_ttl` accepted (default [`DEFAULT_MIN_CA_TTL`]).
    pub min_ca_ttl: Duration,
    /// Start with an empty entry store even though `data_dir` has a CA and its store is missing
    /// or empty (`spiffed run --new-entry-store`; never set by the file). Default false: such a
    /// data dir is refused as damaged.
    pub new_entry_store: bool,
    /// Agent mode: the `[spire_server]` table. `None`: standalone (the agent is its trust
    /// domain's CA). With it, the server is the CA and holds the entries: no local CA is
    /// created, `[[entries]]` are refused and the admin API only reads the synced entries.
    pub spire_server: Option<spiffed_spire::config::SpireConfig>,
    /// Envoy SDS on the Workload API socket: the `[sds]` table (default names `default`,
    /// `ROOTCA`, `ALL`; the SPIFFE validator). `None`: `disable_sds_api = true`, SDS is not
    /// served.
    pub sds: Option<spiffed_workload_api::SdsConfig>,
    /// `[metrics] listen = "127.0.0.1:PORT"`: the Prometheus endpoint (default off).
    pub metrics: Option<HttpEndpoint>,
    /// `[health] listen = "127.0.0.1:PORT"`: `/live` and `/ready` over HTTP (default off).
    pub health: Option<HttpEndpoint>,
    /// Standalone mode: `[upstream_authority.disk]`, an upstream CA from files that signs the
    /// agent's CAs (`None`: self-signed CAs). Its files are read again at each CA rotation, so a
    /// renewed upstream needs no restart; changing the paths does.
    pub upstream_authority: Option<spiffed_authority::UpstreamConfig>,
    /// `[federation] federate_all = true`: every workload receives every federated bundle (as
    /// if each entry's `federates_with` named every federated trust domain). Default false:
    /// a workload receives the federated bundles its entries' `federates_with` name.
    pub federate_all: bool,
    /// `[federation.bundle_endpoint]` (default off).
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// `[[federation.trust_domains]]`, in file order (trust domains unique).
    pub federation: Vec<FederationRelationship>,
}

impl Config {
    /// Reads and validates the file at `path`.
    ///
    /// A file that cannot be read gives a [`ConfigError`] of kind [`ConfigErrorKind::Read`]
    /// naming the file and the OS error.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::read(path, &e))?;
        Self::from_toml(&text, path)
    }

    /// Reads and validates the file at `path`, and returns every problem in it, in file order
    /// (at most [`MAX_REPORTED_PROBLEMS`]): what `spiffed run --check` prints. A TOML syntax
    /// error ends the check at that error.
    pub fn load_all(path: &Path) -> Result<Self, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![ConfigError::read(path, &e)])?;
        validate::parse_all(&text, path)
    }

    /// Parses and validates `text`; `path` names the file in errors and in [`Config::source`].
    ///
    /// Returns the problem that comes first in the file.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        validate::parse(text, path)
    }

    /// Every default, no entries and no source file; dev mode starts from this and overrides
    /// paths.
    pub fn with_defaults(trust_domain: TrustDomain) -> Self {
        Self {
            source: None,
            trust_domain,
            socket_path: PathBuf::from(DEFAULT_SOCKET_PATH),
            socket_mode: DEFAULT_SOCKET_MODE,
            admin_socket_path: PathBuf::from(DEFAULT_ADMIN_SOCKET_PATH),
            admin_uids: vec![0],
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            x509_svid_ttl: DEFAULT_X509_SVID_TTL,
            jwt_svid_ttl: DEFAULT_JWT_SVID_TTL,
            ca_ttl: DEFAULT_CA_TTL,
            log_level: LogLevel::default(),
            log_format: LogFormat::default(),
            synthetic_ids: false,
            entries: Vec::new(),
            new_trust_root: NewRootPolicy::default(),
            max_connections_per_uid: None,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_streams_per_uid: DEFAULT_MAX_STREAMS_PER_UID,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            fd_reserve: DEFAULT_FD_RESERVE,
            max_jwt_audiences: spiffed_workload_api::DEFAULT_MAX_JWT_AUDIENCES,
            max_jwt_audience_length: spiffed_workload_api::DEFAULT_MAX_JWT_AUDIENCE_LENGTH,
            max_jwt_token_length: spiffed_workload_api::DEFAULT_MAX_JWT_TOKEN_LENGTH,
            jwt_cache_bytes: spiffed_authority::DEFAULT_JWT_CACHE_BYTES,
            jwt_cache_entries_per_identity:
                spiffed_authority::DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY,
            max_logged_string_length: spiffed_core::untrusted::DEFAULT_MAX_CHARS,
            denial_log_lines_per_second: spiffed_workload_api::DEFAULT_DENIAL_LOG_LINES_PER_SECOND,
            premint_entries: DEFAULT_PREMINT_ENTRIES,
            worker_threads: DEFAULT_WORKER_THREADS,
            max_selectors_per_entry: DEFAULT_MAX_SELECTORS_PER_ENTRY,
            max_dns_names_per_entry: DEFAULT_MAX_DNS_NAMES_PER_ENTRY,
            min_svid_ttl: DEFAULT_MIN_SVID_TTL,
            min_ca_ttl: DEFAULT_MIN_CA_TTL,
            new_entry_store: false,
            spire_server: None,
            sds: Some(spiffed_workload_api::SdsConfig::default()),
            metrics: None,
            health: None,
            upstream_authority: None,
            federate_all: false,
            bundle_endpoint: None,
            federation: Vec::new(),
        }
    }

    /// The settings of `new` that differ from `self` and that a running agent cannot apply, by
    /// key name, for the SIGHUP reload to warn about. Entries and `log_level` are applied on
    /// reload, so they are never listed.
    pub fn changes_needing_restart(&self, new: &Config) -> Vec<&'static str> {
        // Destructured without `..`: a new field must be sorted here, or this does not compile.
        let Config {
            source: _,
            trust_domain,
            socket_path,
            socket_mode,
            admin_socket_path,
            admin_uids,
            data_dir,
            x509_svid_ttl,
            jwt_svid_ttl,
            ca_ttl,
            log_level: _,
            log_format,
            synthetic_ids,
            entries: _,
            max_selectors_per_entry,
            max_dns_names_per_entry,
            min_svid_ttl,
            min_ca_ttl,
            new_entry_store: _,
            new_trust_root: _,
            max_connections_per_uid,
            max_streams_per_connection,
            max_streams_per_uid,
            handshake_timeout,
            idle_timeout,
            fd_reserve,
            max_jwt_audiences,
            max_jwt_audience_length,
            max_jwt_token_length,
            jwt_cache_bytes,
            jwt_cache_entries_per_identity,
            max_logged_string_length,
            denial_log_lines_per_second,
            premint_entries,
            worker_threads,
            spire_server,
            sds,
            metrics,
            health,
            upstream_authority,
            federate_all,
            bundle_endpoint,
            federation,
        } = self;
        let mut changed = Vec::new();
        let mut check = |key: &'static str, differs: bool| {
            if differs {
                changed.push(key);
            }
        };
        check("trust_domain", *trust_domain != new.trust_domain);
        check("socket_path", *socket_path != new.socket_path);
        check("socket_mode", *socket_mode != new.socket_mode);
        check(
            "admin_socket_path",
            *admin_socket_path != new.admin_socket_path,
        );
        check("admin_uids", *admin_uids != new.admin_uids);
        check("data_dir", *data_dir != new.data_dir);
        check("x509_svid_ttl", *x509_svid_ttl != new.x509_svid_ttl);
        check("jwt_svid_ttl", *jwt_svid_ttl != new.jwt_svid_ttl);
        check("ca_ttl", *ca_ttl != new.ca_ttl);
        check("log_format", *log_format != new.log_format);
        check("synthetic_ids", *synthetic_ids != new.synthetic_ids);
        check("spire_server", *spire_server != new.spire_server);
        check("sds", *sds != new.sds);
        check("metrics", *metrics != new.metrics);
        check("health", *health != new.health);
        check("federation.federate_all", *federate_all != new.federate_all);
        check(
            "federation.bundle_endpoint",
            *bundle_endpoint != new.bundle_endpoint,
        );
        check("federation.trust_domains", *federation != new.federation);
        check(
            "upstream_authority",
            *upstream_authority != new.upstream_authority,
        );
        check(
            "max_selectors_per_entry",
            *max_selectors_per_entry != new.max_selectors_per_entry,
        );
        check(
            "max_dns_names_per_entry",
            *max_dns_names_per_entry != new.max_dns_names_per_entry,
        );
        check("min_svid_ttl", *min_svid_ttl != new.min_svid_ttl);
        check("min_ca_ttl", *min_ca_ttl != new.min_ca_ttl);
        check(
            "max_connections_per_uid",
            *max_connections_per_uid != new.max_connections_per_uid,
        );
        check(
            "max_streams_per_connection",
            *max_streams_per_connection != new.max_streams_per_connection,
        );
        check(
            "max_streams_per_uid",
            *max_streams_per_uid != new.max_streams_per_uid,
        );
        check(
            "handshake_timeout",
            *handshake_timeout != new.handshake_timeout,
        );
        check("idle_timeout", *idle_timeout != new.idle_timeout);
        check("fd_reserve", *fd_reserve != new.fd_reserve);
        check(
            "max_jwt_audiences",
            *max_jwt_audiences != new.max_jwt_audiences,
        );
        check(
            "max_jwt_audience_length",
            *max_jwt_audience_length != new.max_jwt_audience_length,
        );
        check(
            "max_jwt_token_length",
            *max_jwt_token_length != new.max_jwt_token_length,
        );
        check("jwt_cache_bytes", *jwt_cache_bytes != new.jwt_cache_bytes);
        check(
            "jwt_cache_entries_per_identity",
            *jwt_cache_entries_per_identity != new.jwt_cache_entries_per_identity,
        );
        check(
            "max_logged_string_length",
            *max_logged_string_length != new.max_logged_string_length,
        );
        check(
            "denial_log_lines_per_second",
            *denial_log_lines_per_second != new.denial_log_lines_per_second,
        );
        check("premint_entries", *premint_entries != new.premint_entries);
        check("worker_threads", *worker_threads != new.worker_threads);
        changed
    }

    /// A one-line summary for the start-up log: trust domain, sockets, data dir, TTLs and the
    /// number of entries (their IDs and selectors are left out).
    pub fn summary(&self) -> String {
        let source = self
            .source
            .as_ref()
            .map_or_else(|| "defaults".to_owned(), |p| p.display().to_string());
        format!(
            "source={source} trust_domain={} socket={} socket_mode={:04o} admin_socket={} \
             admin_uids={:?} data_dir={} x509_svid_ttl={} jwt_svid_ttl={} ca_ttl={} \
             log_level={} log_format={} synthetic_ids={} entries={} \
             max_connections_per_uid={} max_streams_per_connection={} max_streams_per_uid={} \
             handshake_timeout={} idle_timeout={} fd_reserve={} max_jwt_audiences={} \
             max_jwt_audience_length={} max_jwt_token_length={} jwt_cache_bytes={} \
             jwt_cache_entries_per_identity={} max_logged_string_length={} \
             denial_log_lines_per_second={} max_selectors_per_entry={} \
             max_dns_names_per_entry={} min_svid_ttl={} min_ca_ttl={} premint_entries={} \
             worker_threads={} \
             upstream_authority={} federate_all={} bundle_endpoint={} federation={:?} metrics={} health={} sds={}",
            self.trust_domain,
            self.socket_path.display(),
            self.socket_mode,
            self.admin_socket_path.display(),
            self.admin_uids,
            self.data_dir.display(),
            humantime::format_duration(self.x509_svid_ttl),
            humantime::format_duration(self.jwt_svid_ttl),
            humantime::format_duration(self.ca_ttl),
            self.log_level,
            self.log_format,
            self.synthetic_ids,
            self.entries.len(),
            self.max_connections_per_uid
                .map_or_else(|| "auto".to_owned(), |n| n.to_string()),
            self.max_streams_per_connection,
            self.max_streams_per_uid,
            humantime::format_duration(self.handshake_timeout),
            humantime::format_duration(self.idle_timeout),
            self.fd_reserve,
            self.max_jwt_audiences,
            self.max_jwt_audience_length,
            self.max_jwt_token_length,
            self.jwt_cache_bytes,
            self.jwt_cache_entries_per_identity,
            self.max_logged_string_length,
            self.denial_log_lines_per_second,
            self.max_selectors_per_entry,
            self.max_dns_names_per_entry,
            humantime::format_duration(self.min_svid_ttl),
            humantime::format_duration(self.min_ca_ttl),
            self.premint_entries,
            self.worker_threads,
            self.upstream_authority.as_ref().map_or_else(
                || "off".to_owned(),
                |u| format!("disk(cert_file_path={})", u.cert_file_path.display())
            ),
            self.federate_all,
            self.bundle_endpoint
                .as_ref()
                .map_or_else(|| "off".to_owned(), |b| b.listen.to_string()),
            self.federation
                .iter()
                .map(|f| f.trust_domain.to_string())
                .collect::<Vec<_>>(),
            self.metrics
                .map_or_else(|| "off".to_owned(), |m| m.listen.to_string()),
            self.health
                .map_or_else(|| "off".to_owned(), |h| h.listen.to_string()),
            match &self.sds {
                None => "off".to_owned(),
                Some(s) => format!(
                    "on(default_svid_name={:?} default_bundle_name={:?} \
                     default_all_bundles_name={:?} disable_spiffe_cert_validation={})",
                    s.default_svid_name,
                    s.default_bundle_name,
                    s.default_all_bundles_name,
                    s.disable_spiffe_cert_validation
                ),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiffed_core::Selector;
    use spiffed_spire::config::{
        Bootstrap, BundleFormat, DEFAULT_SYNC_INTERVAL, JoinToken, NodeAttestation,
    };

    /// Joins lines, so that line N of the file is `lines[N - 1]`.
    fn doc(lines: &[&str]) -> String {
        let mut s = lines.join("\n");
        s.push('\n');
        s
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("spiffed.toml"))
    }

    /// Asserts that `lines` fail at `line` under `key`, with a message naming the key.
    #[track_caller]
    fn fails_at(lines: &[&str], line: usize, key: &str) -> ConfigError {
        let e = match parse(&doc(lines)) {
            Ok(cfg) => panic!("expected an error at line {line} ({key}), got {cfg:?}"),
            Err(e) => e,
        };
        assert_eq!((e.line, e.key.as_str()), (line, key), "{e}");
        let leaf = key
            .rsplit('.')
            .next()
            .and_then(|k| k.split('[').next())
            .unwrap_or_default();
        assert!(
            e.message.contains(leaf),
            "message does not name {leaf}: {e}"
        );
        assert!(!e.fix.is_empty(), "{e}");
        assert_eq!(e.file, Path::new("spiffed.toml"));
        assert!(e.column >= 1, "{e}");
        e
    }

    const TD: &str = "trust_domain = \"example.org\"";

    const DESIGN_EXAMPLE: &str = r#"trust_domain = "example.org"
socket_path = "/run/spiffed/public/api.sock"   # default for run; dev uses a per-user runtime dir
socket_mode = "0777"          # who may connect; attestation decides who gets what
admin_socket_path = "/run/spiffed/private/admin.sock"  # its own owner-only directory
admin_uids = [0]              # plus the agent's own uid
data_dir = "/var/lib/spiffed" # CA keys, entry store
x509_svid_ttl = "1h"
jwt_svid_ttl = "5m"
ca_ttl = "24h"
log_level = "info"
log_format = "text"           # or "json"
synthetic_ids = false         # dev mode turns this on

[[entries]]
spiffe_id = "spiffe://example.org/web"
selectors = ["unix:uid:1000", "unix:path:/usr/bin/web"]
x509_svid_ttl = "10m"         # optional overrides
hint = "internal"             # optional
dns_names = ["web.internal"]  # optional, go into the X.509 SAN
"#;

    /// The Debian package's default configuration (packaging/build-deb.sh installs it as
    /// /etc/spiffed/spiffed.toml): a standalone agent on the default paths.
    #[test]
    fn the_packaged_default_config_parses() {
        let text = include_str!("../../../packaging/spiffed.toml");
        let cfg = Config::from_toml(text, Path::new("/etc/spiffed/spiffed.toml")).unwrap();
        assert_eq!(cfg.socket_path, Path::new(DEFAULT_SOCKET_PATH));
        assert_eq!(cfg.socket_mode, 0o777);
        assert_eq!(cfg.admin_socket_path, Path::new(DEFAULT_ADMIN_SOCKET_PATH));
        assert_eq!(cfg.admin_uids, [0]);
        assert_eq!(cfg.data_dir, Path::new("/var/lib/spiffed"));
        assert!(cfg.spire_server.is_none() && !cfg.synthetic_ids);
    }

    #[test]
    fn design_example_parses() {
        let cfg =
            Config::from_toml(DESIGN_EXAMPLE, Path::new("/etc/spiffed/spiffed.toml")).unwrap();
        assert_eq!(
            cfg.source.as_deref(),
            Some(Path::new("/etc/spiffed/spiffed.toml"))
        );
        assert_eq!(cfg.trust_domain.as_str(), "example.org");
        assert_eq!(cfg.socket_path, Path::new("/run/spiffed/public/api.sock"));
        assert_eq!(cfg.socket_mode, 0o777);
        assert_eq!(
            cfg.admin_socket_path,
            Path::new("/run/spiffed/private/admin.sock")
        );
        assert_eq!(cfg.admin_uids, [0]);
        assert_eq!(cfg.data_dir, Path::new("/var/lib/spiffed"));
        assert_eq!(cfg.x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(cfg.jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(cfg.ca_ttl, Duration::from_secs(86400));
        assert_eq!(cfg.log_level, LogLevel::Info);
        assert_eq!(cfg.log_format, LogFormat::Text);
        assert!(!cfg.synthetic_ids);
        assert_eq!(cfg.entries.len(), 1);
        let e = &cfg.entries[0];
        assert!(e.id.as_str().starts_with("config-"), "{}", e.id);
        assert_eq!(e.id.as_str().len(), "config-".len() + 16, "{}", e.id);
        assert_eq!(e.spiffe_id.to_string(), "spiffe://example.org/web");
        let sels: Vec<String> = e.selectors.iter().map(ToString::to_string).collect();
        assert_eq!(sels, ["unix:path:/usr/bin/web", "unix:uid:1000"]);
        assert_eq!(e.x509_svid_ttl, Some(Duration::from_secs(600)));
        assert_eq!(e.jwt_svid_ttl, None);
        assert_eq!(e.hint.as_deref(), Some("internal"));
        assert_eq!(e.dns_names, ["web.internal"]);
    }

    #[test]
    fn minimal_file_takes_every_default() {
        let cfg = parse(&doc(&[TD])).unwrap();
        let def = Config::with_defaults(cfg.trust_domain.clone());
        assert_eq!(def.source, None);
        assert_eq!(cfg.socket_path, def.socket_path);
        assert_eq!(cfg.socket_mode, def.socket_mode);
        assert_eq!(cfg.admin_socket_path, def.admin_socket_path);
        assert_eq!(cfg.admin_uids, def.admin_uids);
        assert_eq!(cfg.data_dir, def.data_dir);
        assert_eq!(
            (cfg.x509_svid_ttl, cfg.jwt_svid_ttl, cfg.ca_ttl),
            (def.x509_svid_ttl, def.jwt_svid_ttl, def.ca_ttl)
        );
        assert_eq!(
            (cfg.log_level, cfg.log_format),
            (def.log_level, def.log_format)
        );
        assert_eq!(cfg.synthetic_ids, def.synthetic_ids);
        assert!(cfg.entries.is_empty() && def.entries.is_empty());
        assert_eq!(def.socket_mode, 0o777);
        assert_eq!(def.admin_uids, [0]);
    }

    #[test]
    fn other_values_parse() {
        let cfg = parse(&doc(&[
            TD,
            "socket_mode = \"660\"",
            "admin_uids = [1000, 0, 1000]",
            "x509_svid_ttl = \"1h30m\"",
            "jwt_svid_ttl = \"90s\"",
            "log_level = \"debug\"",
            "log_format = \"json\"",
            "synthetic_ids = true",
            "[[entries]]",
            "spiffe_id = \"spiffe://example.org/a\"",
            "selectors = [\"unix:uid:1\", \"unix:gid:2\", \"unix:uid:1\"]",
            "jwt_svid_ttl = \"1m\"",
            "[[entries]]",
            "spiffe_id = \"spiffe://example.org/b\"",
            "selectors = [\"systemd:id:b.service\"]",
        ]))
        .unwrap();
        assert_eq!(cfg.socket_mode, 0o660);
        assert_eq!(cfg.admin_uids, [0, 1000]);
        assert_eq!(cfg.x509_svid_ttl, Duration::from_secs(5400));
        assert_eq!(cfg.jwt_svid_ttl, Duration::from_secs(90));
        assert_eq!(cfg.log_level, LogLevel::Debug);
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert!(cfg.synthetic_ids);
        let ids: Vec<&str> = cfg.entries.iter().map(|e| e.id.as_str()).collect();
        assert!(ids.iter().all(|id| id.starts_with("config-")), "{ids:?}");
        assert_ne!(ids[0], ids[1]);
        let a = &cfg.entries[0];
        let want: Vec<Selector> =
            vec!["unix:gid:2".parse().unwrap(), "unix:uid:1".parse().unwrap()];
        assert_eq!(a.selectors, want);
        assert_eq!(a.jwt_svid_ttl, Some(Duration::from_secs(60)));
    }

    #[test]
    fn display_names_file_line_key_and_fix() {
        let e = fails_at(
            &[
                TD,
                "",
                "[[entries]]",
                "spiffe_id = \"spiffe://example.org/a\"",
                "selectors = [\"unix:uid:1\"]",
                "[[entries]]",
                "spiffe_id =   \"spiffe://other.org/x\"",
                "selectors = [\"unix:uid:1\"]",
            ],
            7,
            "entries[1].spiffe_id",
        );
        assert_eq!(e.kind, ConfigErrorKind::Invalid);
        assert_eq!(
            e.to_string(),
            "spiffed.toml:7:15: entries[1].spiffe_id: spiffe_id \"spiffe://other.org/x\" is \
             outside the trust domain \"example.org\"\n  fix: use an ID of the form \
             spiffe://example.org/..."
        );
    }

    #[test]
    fn unknown_top_level_key() {
        let e = fails_at(
            &[TD, "socket_mode = \"0777\"", "socket_pth = \"/x\""],
            3,
            "socket_pth",
        );
        assert_eq!(e.kind, ConfigErrorKind::UnknownKey);
        assert!(e.fix.contains("did you mean `socket_path`"), "{e}");
        assert!(e.fix.contains("admin_uids"), "lists the known keys: {e}");
        let e = fails_at(&[TD, "colour = \"blue\""], 2, "colour");
        assert!(e.fix.contains("trust_domain, socket_path"), "{e}");
    }

    #[test]
    fn unknown_entry_key() {
        let e = fails_at(
            &[
                TD,
                "[[entries]]",
                "spiffe_id = \"spiffe://example.org/a\"",
                "selectors = [\"unix:uid:1\"]",
                "hints = \"x\"",
            ],
            5,
            "entries[0].hints",
        );
        assert_eq!(e.kind, ConfigErrorKind::UnknownKey);
        assert!(e.fix.contains("did you mean `hint`"), "{e}");
        assert!(e.fix.contains("dns_names"), "{e}");
        // A top-level key written after [[entries]] lands in the entry.
        let e = fails_at(
            &[
                TD,
                "[[entries]]",
                "spiffe_id = \"spiffe://example.org/a\"",
                "selectors = [\"unix:uid:1\"]",
                "log_level = \"debug\"",
            ],
            5,
            "entries[0].log_level",
        );
        assert!(e.fix.contains("move it above the first [[entries]]"), "{e}");
    }

    #[test]
    fn bad_toml_syntax() {
        let e = parse(&doc(&[TD, "socket_path = /run/x.sock"])).unwrap_err();
        assert_eq!(
            (e.kind, e.line, e.key.as_str()),
            (ConfigErrorKind::Syntax, 2, ""),
            "{e}"
        );
        assert!(e.message.starts_with("invalid TOML: "), "{e}");
        let e = parse(&doc(&[TD, "log_level = \"info", "data_dir = \"/x\""])).unwrap_err();
        assert_eq!((e.kind, e.line), (ConfigErrorKind::Syntax, 2), "{e}");
        let e = parse(&doc(&[TD, "", TD])).unwrap_err();
        assert_eq!((e.kind, e.line), (ConfigErrorKind::Syntax, 3), "{e}");
        assert!(e.message.contains("duplicate key"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = fails_at(&[TD, "socket_mode = 777"], 2, "socket_mode");
        assert_eq!(e.kind, ConfigErrorKind::WrongType);
        assert!(e.fix.contains("\"0777\""), "{e}");
        let e = fails_at(
            &[TD, "[entries]", "spiffe_id = \"spiffe://example.org/a\""],
            2,
            "entries",
        );
        assert!(e.fix.contains("[[entries]]"), "{e}");
        fails_at(
            &[
                TD,
                "[[entries]]",
                "spiffe_id = \"spiffe://example.org/a\"",
                "selectors = \"unix:uid:1\"",
            ],
            4,
            "entries[0].selectors",
        );
    }

    #[test]
    fn missing_trust_domain() {
        let e = fails_at(&["", "socket_mode = \"0777\""], 1, "trust_domain");
        assert_eq!(e.kind, ConfigErrorKind::Missing);
        assert!(e.fix.contains("trust_domain = \"example.org\""), "{e}");
        fails_at(&["# nothing here"], 1, "trust_domain");
    }

    #[test]
    fn trust_domain_with_spiffe_prefix() {
        let e = fails_at(
            &["", "trust_domain = \"spiffe://example.org\""],
            2,
            "trust_domain",
        );
        assert!(e.fix.contains("without the spiffe:// prefix"), "{e}");
        assert!(e.fix.contains("trust_domain = \"example.org\""), "{e}");
    }

    #[test]
    fn trust_domain_dots_that_go_rejects() {
        for (td, what) in [
            ("example.org.", "trailing dot"),
            (".example.org", "leading dot"),
            ("example..org", "empty label"),
        ] {
            let line = format!("trust_domain = \"{td}\"");
            let e = fails_at(&["# spiffed", &line], 2, "trust_domain");
            assert!(e.message.contains(what), "{e}");
            assert!(e.fix.contains("Go's X.509 parser"), "{e}");
            assert!(e.fix.contains("\"example.org\""), "{e}");
        }
    }

    #[test]
    fn other_bad_trust_domains() {
        let e = fails_at(&["trust_domain = \"Example.org\""], 1, "trust_domain");
        assert!(e.fix.contains("\"example.org\""), "{e}");
        fails_at(&["trust_domain = \"example.org:8080\""], 1, "trust_domain");
        fails_at(&["trust_domain = \"\""], 1, "trust_domain");
        fails_at(
            &["trust_domain = \"https://example.org\""],
            1,
            "trust_domain",
        );
        let long = format!("trust_domain = \"{}\"", "a".repeat(256));
        let e = fails_at(&[&long], 1, "trust_domain");
        assert!(e.message.contains("255"), "{e}");
        let max = format!("trust_domain = \"{}\"", "a".repeat(255));
        assert!(parse(&doc(&[&max])).is_ok());
    }

    fn entry(spiffe_id: &str, selectors: &str) -> [String; 3] {
        [
            "[[entries]]".to_owned(),
            format!("spiffe_id = \"{spiffe_id}\""),
            format!("selectors = {selectors}"),
        ]
    }

    fn with_entry<'a>(e: &'a [String; 3], extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![TD, "", e[0].as_str(), e[1].as_str(), e[2].as_str()];
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn invalid_spiffe_id_in_entry() {
        let e = entry("spiffe://example.org/a b", "[\"unix:uid:1\"]");
        let err = fails_at(&with_entry(&e, &[]), 4, "entries[0].spiffe_id");
        assert!(err.message.contains("is not a valid SPIFFE ID"), "{err}");
        // The spiffe crate's reason is shown.
        assert!(err.message.contains("path segment"), "{err}");
        let e = entry("http://example.org/a", "[\"unix:uid:1\"]");
        let err = fails_at(&with_entry(&e, &[]), 4, "entries[0].spiffe_id");
        assert!(err.fix.contains("spiffe://"), "{err}");
        let e = entry("spiffe://EXAMPLE.org/a", "[\"unix:uid:1\"]");
        let err = fails_at(&with_entry(&e, &[]), 4, "entries[0].spiffe_id");
        assert!(err.fix.contains("\"spiffe://example.org/a\""), "{err}");
    }

    #[test]
    fn entry_missing_keys_point_at_its_header() {
        let lines = [TD, "", "[[entries]]", "selectors = [\"unix:uid:1\"]"];
        let e = fails_at(&lines, 3, "entries[0].spiffe_id");
        assert_eq!(e.kind, ConfigErrorKind::Missing);
        let lines = [
            TD,
            "",
            "[[entries]]",
            "spiffe_id = \"spiffe://example.org/a\"",
        ];
        fails_at(&lines, 3, "entries[0].selectors");
        let e = entry("spiffe://example.org/a", "[]");
        fails_at(&with_entry(&e, &[]), 5, "entries[0].selectors");
    }

    #[test]
    fn entry_outside_trust_domain() {
        let e = entry("spiffe://other.org/web", "[\"unix:uid:1\"]");
        let err = fails_at(&with_entry(&e, &[]), 4, "entries[0].spiffe_id");
        assert!(err.message.contains("outside the trust domain"), "{err}");
        assert_eq!(err.fix, "use an ID of the form spiffe://example.org/...");
    }

    #[test]
    fn entry_without_path() {
        let e = entry("spiffe://example.org", "[\"unix:uid:1\"]");
        let err = fails_at(&with_entry(&e, &[]), 4, "entries[0].spiffe_id");
        assert!(err.message.contains("has no path"), "{err}");
        assert!(err.fix.contains("spiffe://example.org/web"), "{err}");
    }

    #[test]
    fn unknown_selector_type() {
        let e = entry(
            "spiffe://example.org/a",
            "[\"unix:uid:1\",\n  \"k8s:ns:default\"]",
        );
        let err = fails_at(&with_entry(&e, &[]), 6, "entries[0].selectors[1]");
        assert!(err.message.contains("unknown type \"k8s\""), "{err}");
        assert!(err.fix.contains("unix:uid"), "{err}");
        let e = entry("spiffe://example.org/a", "[\"unix:pid:1\"]");
        fails_at(&with_entry(&e, &[]), 5, "entries[0].selectors[0]");
    }

    #[test]
    fn bad_uid_values() {
        let e = fails_at(&[TD, "admin_uids = [0, -1]"], 2, "admin_uids[1]");
        assert!(e.fix.contains("id -u"), "{e}");
        fails_at(&[TD, "admin_uids = [4294967296]"], 2, "admin_uids[0]");
        fails_at(&[TD, "admin_uids = [4294967295]"], 2, "admin_uids[0]");
        let e = fails_at(&[TD, "admin_uids = [\"root\"]"], 2, "admin_uids[0]");
        assert_eq!(e.kind, ConfigErrorKind::WrongType);
        let e = entry("spiffe://example.org/a", "[\"unix:uid:abc\"]");
        let err = fails_at(&with_entry(&e, &[]), 5, "entries[0].selectors[0]");
        assert!(err.fix.contains("decimal number"), "{err}");
    }

    #[test]
    fn zero_ttls() {
        let e = fails_at(&[TD, "jwt_svid_ttl = \"0s\""], 2, "jwt_svid_ttl");
        assert!(e.message.contains("must be greater than zero"), "{e}");
        fails_at(&[TD, "x509_svid_ttl = \"0m\""], 2, "x509_svid_ttl");
        fails_at(&[TD, "ca_ttl = \"0h\""], 2, "ca_ttl");
        let e = entry("spiffe://example.org/a", "[\"unix:uid:1\"]");
        let err = fails_at(
            &with_entry(&e, &["x509_svid_ttl = \"0s\""]),
            6,
            "entries[0].x509_svid_ttl",
        );
        assert!(err.message.contains("must be greater than zero"), "{err}");
        fails_at(
            &with_entry(&e, &["jwt_svid_ttl = \"0s\""]),
            6,
            "entries[0].jwt_svid_ttl",
        );
    }

    #[test]
    fn bad_durations() {
        let e = fails_at(&[TD, "x509_svid_ttl = \"10 parsecs\""], 2, "x509_svid_ttl");
        assert!(
            e.message.contains("\"10 parsecs\" is not a duration"),
            "{e}"
        );
        assert!(e.fix.contains("\"90s\""), "{e}");
        fails_at(&[TD, "ca_ttl = \"10\""], 2, "ca_ttl");
        fails_at(&[TD, "ca_ttl = \"500ms\""], 2, "ca_ttl");
        fails_at(&[TD, "ca_ttl = \"20years\""], 2, "ca_ttl");
        let e = entry("spiffe://example.org/a", "[\"unix:uid:1\"]");
        fails_at(
            &with_entry(&e, &["jwt_svid_ttl = \"soon\""]),
            6,
            "entries[0].jwt_svid_ttl",
        );
    }

    #[test]
    fn paths_must_be_absolute() {
        let e = fails_at(&[TD, "socket_path = \"run/api.sock\""], 2, "socket_path");
        assert!(e.message.contains("not an absolute path"), "{e}");
        fails_at(&[TD, "data_dir = \"./data\""], 2, "data_dir");
        fails_at(&[TD, "admin_socket_path = \"\""], 2, "admin_socket_path");
        let long = format!("socket_path = \"/{}\"", "s".repeat(107));
        let e = fails_at(&[TD, &long], 2, "socket_path");
        assert!(e.message.contains("107"), "{e}");
    }

    #[test]
    fn admin_socket_needs_its_own_directory() {
        let same = "admin_socket_path = \"/run/spiffed/public/api.sock\"";
        fails_at(&[TD, same], 2, "admin_socket_path");
        let same_dir = "admin_socket_path = \"/run/spiffed/public/admin.sock\"";
        fails_at(&[TD, same_dir], 2, "admin_socket_path");
        let public_in_private = "socket_path = \"/run/spiffed/private/api.sock\"";
        fails_at(&[TD, public_in_private], 2, "socket_path");
    }

    #[test]
    fn socket_modes() {
        let e = fails_at(&[TD, "socket_mode = \"999\""], 2, "socket_mode");
        assert!(e.message.contains("not an octal file mode"), "{e}");
        fails_at(&[TD, "socket_mode = \"1777\""], 2, "socket_mode");
        fails_at(&[TD, "socket_mode = \"77\""], 2, "socket_mode");
        fails_at(&[TD, "socket_mode = \"0o777\""], 2, "socket_mode");
        fails_at(&[TD, "socket_mode = \"+777\""], 2, "socket_mode");
        assert_eq!(
            parse(&doc(&[TD, "socket_mode = \"0600\""]))
                .unwrap()
                .socket_mode,
            0o600
        );
    }

    #[test]
    fn log_choices() {
        let e = fails_at(&[TD, "log_level = \"verbose\""], 2, "log_level");
        assert!(
            e.fix
                .contains("\"trace\", \"debug\", \"info\", \"warn\", \"error\""),
            "{e}"
        );
        let e = fails_at(&[TD, "log_format = \"JSON\""], 2, "log_format");
        assert!(e.fix.contains("lowercase"), "{e}");
    }

    #[test]
    fn hint_too_long() {
        let hint = format!("hint = \"{}\"", "h".repeat(1025));
        let e = entry("spiffe://example.org/a", "[\"unix:uid:1\"]");
        let err = fails_at(&with_entry(&e, &["", &hint]), 7, "entries[0].hint");
        assert!(err.message.contains("1025 bytes"), "{err}");
        let ok = format!("hint = \"{}\"", "h".repeat(1024));
        assert!(parse(&doc(&with_entry(&e, &[&ok]))).is_ok());
    }

    #[test]
    fn bad_dns_name() {
        let e = entry("spiffe://example.org/a", "[\"unix:uid:1\"]");
        let err = fails_at(
            &with_entry(
                &e,
                &[
                    "dns_names = [",
                    "  \"web.internal\",",
                    "  \"bad_name\",",
                    "]",
                ],
            ),
            8,
            "entries[0].dns_names[1]",
        );
        assert!(err.message.contains("\"bad_name\""), "{err}");
    }

    #[test]
    fn duplicate_entry_names_both_lines() {
        let a = entry("spiffe://example.org/a", "[\"unix:uid:1\", \"unix:gid:1\"]");
        let b = entry(
            "spiffe://example.org/a",
            "[\"unix:gid:1\", \"unix:uid:1\", \"unix:uid:1\"]",
        );
        let lines = with_entry(&a, &[b[0].as_str(), b[1].as_str(), b[2].as_str()]);
        let e = fails_at(&lines, 7, "entries[1].spiffe_id");
        assert!(e.message.contains("duplicates entries[0] (line 4)"), "{e}");
        // Same ID with other selectors, or other ID with the same selectors: both fine.
        let c = entry("spiffe://example.org/a", "[\"unix:uid:2\"]");
        let d = entry("spiffe://example.org/d", "[\"unix:uid:1\", \"unix:gid:1\"]");
        let mut lines = with_entry(&a, &[]);
        lines.extend(c.iter().map(String::as_str));
        lines.extend(d.iter().map(String::as_str));
        assert_eq!(parse(&doc(&lines)).unwrap().entries.len(), 3);
    }

    #[test]
    fn svid_ttl_above_ca_ttl() {
        let e = fails_at(
            &[TD, "ca_ttl = \"1h\"", "x509_svid_ttl = \"2h\""],
            3,
            "x509_svid_ttl",
        );
        assert_eq!(
            e.fix,
            "an SVID never outlives its CA: raise ca_ttl or lower x509_svid_ttl"
        );
        // The default x509_svid_ttl (1h) against a shorter ca_ttl: the error sits on ca_ttl.
        fails_at(&[TD, "ca_ttl = \"30m\""], 2, "ca_ttl");
        let e = entry("spiffe://example.org/a", "[\"unix:uid:1\"]");
        fails_at(
            &with_entry(&e, &["x509_svid_ttl = \"48h\""]),
            6,
            "entries[0].x509_svid_ttl",
        );
    }

    #[test]
    fn first_problem_in_file_order_wins() {
        let e = entry("spiffe://other.org/a", "[\"unix:uid:1\"]");
        let lines = with_entry(&e, &[]);
        let mut lines: Vec<&str> = lines;
        lines.insert(1, "socket_mode = \"999\"");
        fails_at(&lines, 2, "socket_mode");
    }

    #[test]
    fn load_reads_a_file_and_names_it_when_it_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spiffed.toml");
        std::fs::write(&path, DESIGN_EXAMPLE).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.source.as_deref(), Some(path.as_path()));
        let missing = dir.path().join("missing.toml");
        let e = Config::load(&missing).unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::Read);
        assert_eq!(e.file, missing);
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("{}: cannot read", missing.display())),
            "{shown}"
        );
        assert!(shown.contains("No such file"), "{shown}");
    }

    #[test]
    fn summary_is_one_line() {
        let cfg = parse(DESIGN_EXAMPLE).unwrap();
        let s = cfg.summary();
        assert!(!s.contains('\n'), "{s}");
        for part in [
            "source=spiffed.toml",
            "trust_domain=example.org",
            "socket=/run/spiffed/public/api.sock",
            "socket_mode=0777",
            "data_dir=/var/lib/spiffed",
            "x509_svid_ttl=1h",
            "jwt_svid_ttl=5m",
            "entries=1",
            "max_connections_per_uid=auto",
            "max_jwt_audiences=16",
            "jwt_cache_bytes=4194304",
            "max_selectors_per_entry=64",
            "min_svid_ttl=10s",
            "min_ca_ttl=1m",
        ] {
            assert!(s.contains(part), "{part} missing from {s}");
        }
        assert!(!s.contains("internal"), "entry details stay out: {s}");
        let def = Config::with_defaults(cfg.trust_domain).summary();
        assert!(def.contains("source=defaults"), "{def}");
    }

    #[test]
    fn request_cache_and_log_limits_are_read_and_bounded() {
        let cfg = parse(&doc(&[TD])).unwrap();
        assert_eq!(
            (cfg.max_jwt_audiences, cfg.max_jwt_audience_length),
            (16, 1024)
        );
        assert_eq!(cfg.max_jwt_token_length, 32 * 1024);
        assert_eq!(cfg.jwt_cache_bytes, 4 * 1024 * 1024);
        assert_eq!(cfg.jwt_cache_entries_per_identity, 64);
        assert_eq!(cfg.max_logged_string_length, 128);
        assert_eq!(cfg.denial_log_lines_per_second, 10);
        assert_eq!(cfg.premint_entries, 1000);
        let cfg = parse(&doc(&[
            TD,
            "max_jwt_audiences = 2",
            "jwt_cache_bytes = 0",
            "denial_log_lines_per_second = 1",
            "premint_entries = 0",
        ]))
        .unwrap();
        assert_eq!(cfg.premint_entries, 0);
        assert_eq!(cfg.max_jwt_audiences, 2);
        assert_eq!(cfg.jwt_cache_bytes, 0);
        assert_eq!(cfg.denial_log_lines_per_second, 1);
        // One past each end.
        for (line, key) in [
            ("max_jwt_audiences = 0", "max_jwt_audiences"),
            ("max_jwt_audiences = 1001", "max_jwt_audiences"),
            ("max_jwt_token_length = 61441", "max_jwt_token_length"),
            ("max_jwt_audience_length = -1", "max_jwt_audience_length"),
            ("max_logged_string_length = 15", "max_logged_string_length"),
            (
                "denial_log_lines_per_second = 0",
                "denial_log_lines_per_second",
            ),
            ("premint_entries = -1", "premint_entries"),
            ("premint_entries = 10000001", "premint_entries"),
        ] {
            let e = fails_at(&[TD, line], 2, key);
            assert!(e.fix.contains("(the default)"), "{e}");
        }
    }

    #[test]
    fn config_entry_ids_survive_inserting_an_entry_above() {
        let web = entry(
            "spiffe://example.org/web",
            "[\"unix:uid:1\", \"unix:gid:2\"]",
        );
        let db = entry("spiffe://example.org/db", "[\"unix:uid:5432\"]");
        let alone = parse(&doc(&with_entry(&web, &[]))).unwrap();
        let mut lines = with_entry(&db, &[]);
        lines.extend(web.iter().map(String::as_str));
        let both = parse(&doc(&lines)).unwrap();
        let web_id = |cfg: &Config| {
            cfg.entries
                .iter()
                .find(|e| e.spiffe_id.to_string() == "spiffe://example.org/web")
                .map(|e| e.id.clone())
                .unwrap()
        };
        assert_eq!(web_id(&alone), web_id(&both));
        // Selector order in the file does not matter; a different selector set is another id.
        let swapped = entry(
            "spiffe://example.org/web",
            "[\"unix:gid:2\", \"unix:uid:1\"]",
        );
        let other = entry("spiffe://example.org/web", "[\"unix:uid:1\"]");
        let id = |e: &[String; 3]| {
            parse(&doc(&with_entry(e, &[]))).unwrap().entries[0]
                .id
                .clone()
        };
        assert_eq!(id(&swapped), web_id(&alone));
        assert_ne!(id(&other), web_id(&alone));
    }

    #[test]
    fn too_many_selectors_or_dns_names() {
        let many: Vec<String> = (0..100_000).map(|i| format!("\"unix:gid:{i}\"")).collect();
        let e = entry("spiffe://example.org/a", &format!("[{}]", many.join(", ")));
        let err = fails_at(&with_entry(&e, &[]), 5, "entries[0].selectors");
        assert!(
            err.message.contains("100000 items; the limit is 64"),
            "{err}"
        );
        assert!(err.fix.contains("max_selectors_per_entry"), "{err}");
        let names: Vec<String> = (0..100_000).map(|i| format!("\"h{i}.internal\"")).collect();
        let dns = format!("dns_names = [{}]", names.join(", "));
        let e = entry("spiffe://example.org/a", "[\"unix:uid:1\"]");
        let err = fails_at(&with_entry(&e, &[&dns]), 6, "entries[0].dns_names");
        assert!(err.message.contains("the limit is 64"), "{err}");
        // The limits are settings.
        let few: Vec<String> = (0..3).map(|i| format!("\"unix:gid:{i}\"")).collect();
        let e = entry("spiffe://example.org/a", &format!("[{}]", few.join(", ")));
        let mut lines = with_entry(&e, &[]);
        lines.insert(1, "max_selectors_per_entry = 2");
        fails_at(&lines, 6, "entries[0].selectors");
        lines[1] = "max_selectors_per_entry = 3";
        assert_eq!(parse(&doc(&lines)).unwrap().max_selectors_per_entry, 3);
        fails_at(
            &[TD, "max_selectors_per_entry = 0"],
            2,
            "max_selectors_per_entry",
        );
        fails_at(
            &[TD, "max_dns_names_per_entry = 100000"],
            2,
            "max_dns_names_per_entry",
        );
        let cfg = parse(&doc(&[TD])).unwrap();
        assert_eq!(
            (cfg.max_selectors_per_entry, cfg.max_dns_names_per_entry),
            (64, 64)
        );
    }

    /// Each entry and lifetime bound at its default: the value at the limit is accepted, one
    /// past it is refused.
    #[test]
    fn entry_and_lifetime_bounds_hold_exactly_at_their_defaults() {
        let list =
            |n: usize, f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<Vec<_>>().join(", ");
        let gid = |i: usize| format!("\"unix:gid:{i}\"");
        let e = entry("spiffe://example.org/a", &format!("[{}]", list(64, &gid)));
        parse(&doc(&with_entry(&e, &[]))).unwrap();
        let e = entry("spiffe://example.org/a", &format!("[{}]", list(65, &gid)));
        fails_at(&with_entry(&e, &[]), 5, "entries[0].selectors");

        let host = |i: usize| format!("\"h{i}.internal\"");
        let e = entry("spiffe://example.org/a", "[\"unix:uid:1\"]");
        let dns = format!("dns_names = [{}]", list(64, &host));
        parse(&doc(&with_entry(&e, &[&dns]))).unwrap();
        let dns = format!("dns_names = [{}]", list(65, &host));
        fails_at(&with_entry(&e, &[&dns]), 6, "entries[0].dns_names");

        let cfg = parse(&doc(&[
            TD,
            "x509_svid_ttl = \"10s\"",
            "jwt_svid_ttl = \"10s\"",
        ]))
        .unwrap();
        assert_eq!(cfg.x509_svid_ttl, Duration::from_secs(10));
        fails_at(&[TD, "x509_svid_ttl = \"9s\""], 2, "x509_svid_ttl");

        let cfg = parse(&doc(&[
            TD,
            "ca_ttl = \"1m\"",
            "x509_svid_ttl = \"10s\"",
            "jwt_svid_ttl = \"10s\"",
        ]))
        .unwrap();
        assert_eq!(cfg.ca_ttl, Duration::from_secs(60));
        fails_at(
            &[
                TD,
                "ca_ttl = \"59s\"",
                "x509_svid_ttl = \"10s\"",
                "jwt_svid_ttl = \"10s\"",
            ],
            2,
            "ca_ttl",
        );
    }

    #[test]
    fn hints_with_control_characters() {
        let e = entry("spiffe://example.org/a", "[\"unix:uid:1\"]");
        for hint in [
            "hint = \"a\\nb\"",
            "hint = \"\\u001b[31mred\"",
            "hint = \"a\\tb\"",
        ] {
            let err = fails_at(&with_entry(&e, &[hint]), 6, "entries[0].hint");
            assert!(err.message.contains("control character"), "{err}");
        }
    }

    #[test]
    fn sockets_inside_data_dir() {
        let e = fails_at(
            &[
                TD,
                "data_dir = \"/var/lib/spiffed\"",
                "socket_path = \"/var/lib/spiffed/api.sock\"",
            ],
            3,
            "socket_path",
        );
        assert!(e.message.contains("inside data_dir"), "{e}");
        fails_at(
            &[
                TD,
                "admin_socket_path = \"/srv/s/admin/admin.sock\"",
                "data_dir = \"/srv/s\"",
            ],
            2,
            "admin_socket_path",
        );
        // The default socket with a data_dir around it: the error sits on data_dir.
        fails_at(&[TD, "data_dir = \"/run/spiffed\""], 2, "data_dir");
        // A sibling whose name only starts the same is fine.
        assert!(parse(&doc(&[TD, "data_dir = \"/run/spiffed-data\""])).is_ok());
    }

    #[test]
    fn lifetimes_too_short_or_jwt_outliving_the_ca() {
        let e = fails_at(&[TD, "ca_ttl = \"1s\""], 2, "ca_ttl");
        assert!(e.message.contains("min_ca_ttl"), "{e}");
        let e = fails_at(&[TD, "x509_svid_ttl = \"1s\""], 2, "x509_svid_ttl");
        assert!(e.message.contains("shorter than min_svid_ttl (10s)"), "{e}");
        fails_at(&[TD, "jwt_svid_ttl = \"9s\""], 2, "jwt_svid_ttl");
        let en = entry("spiffe://example.org/a", "[\"unix:uid:1\"]");
        fails_at(
            &with_entry(&en, &["x509_svid_ttl = \"1s\""]),
            6,
            "entries[0].x509_svid_ttl",
        );
        fails_at(
            &with_entry(&en, &["jwt_svid_ttl = \"1s\""]),
            6,
            "entries[0].jwt_svid_ttl",
        );
        // jwt_svid_ttl longer than ca_ttl: an error naming both keys, not a silent cap.
        let e = fails_at(
            &[
                TD,
                "ca_ttl = \"1h\"",
                "x509_svid_ttl = \"10m\"",
                "jwt_svid_ttl = \"2h\"",
            ],
            4,
            "jwt_svid_ttl",
        );
        assert!(
            e.message.contains("ca_ttl") && e.fix.contains("ca_ttl"),
            "{e}"
        );
        fails_at(
            &[TD, "ca_ttl = \"2m\"", "x509_svid_ttl = \"1m\""],
            2,
            "ca_ttl",
        );
        fails_at(
            &with_entry(&en, &["jwt_svid_ttl = \"48h\""]),
            6,
            "entries[0].jwt_svid_ttl",
        );
        // Lower floors are an explicit choice (tests watching rotations).
        let cfg = parse(&doc(&[
            TD,
            "min_svid_ttl = \"1s\"",
            "min_ca_ttl = \"1s\"",
            "x509_svid_ttl = \"2s\"",
            "jwt_svid_ttl = \"2s\"",
            "ca_ttl = \"4s\"",
        ]))
        .unwrap();
        assert_eq!(cfg.ca_ttl, Duration::from_secs(4));
        assert_eq!(cfg.min_svid_ttl, Duration::from_secs(1));
        fails_at(&[TD, "min_svid_ttl = \"1h\""], 2, "min_svid_ttl");
        fails_at(&[TD, "min_ca_ttl = \"48h\""], 2, "min_ca_ttl");
        let cfg = parse(&doc(&[TD])).unwrap();
        assert_eq!(cfg.min_svid_ttl, DEFAULT_MIN_SVID_TTL);
        assert_eq!(cfg.min_ca_ttl, DEFAULT_MIN_CA_TTL);
    }

    #[test]
    fn changes_needing_restart_name_each_key() {
        let a = parse(&doc(&[TD])).unwrap();
        let b = parse(&doc(&[
            TD,
            "socket_mode = \"0770\"",
            "ca_ttl = \"48h\"",
            "log_level = \"debug\"",
            "max_dns_names_per_entry = 3",
            "worker_threads = 2",
        ]))
        .unwrap();
        assert_eq!(
            a.changes_needing_restart(&b),
            [
                "socket_mode",
                "ca_ttl",
                "max_dns_names_per_entry",
                "worker_threads"
            ]
        );
        assert!(a.changes_needing_restart(&a.clone()).is_empty());
    }

    #[test]
    fn every_documented_key_is_accepted() {
        // keys.rs lists the keys for error messages; they must match the raw structs.
        let mut lines: Vec<String> = keys::names(keys::Table::Top)
            .into_iter()
            .filter(|k| *k != "entries")
            .map(|k| {
                keys::example(keys::Table::Top, k)
                    .unwrap()
                    .split(" (")
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        lines.push("[[entries]]".to_owned());
        lines.extend(
            keys::names(keys::Table::Entry)
                .into_iter()
                .map(|k| keys::example(keys::Table::Entry, k).unwrap().to_owned()),
        );
        lines.push("[sds]".to_owned());
        lines.extend(
            keys::names(keys::Table::Sds)
                .into_iter()
                .map(|k| keys::example(keys::Table::Sds, k).unwrap().to_owned()),
        );
        lines.push("[federation]".to_owned());
        lines.extend(
            keys::names(keys::Table::Federation)
                .into_iter()
                .filter(|k| !matches!(*k, "bundle_endpoint" | "trust_domains"))
                .map(|k| {
                    keys::example(keys::Table::Federation, k)
                        .unwrap()
                        .to_owned()
                }),
        );
        // The profile-specific keys are exclusive: the endpoint in https_spiffe form, the
        // relationship in https_web form, and the other form's keys checked apart below.
        lines.push("[federation.bundle_endpoint]".to_owned());
        lines.extend(
            keys::names(keys::Table::BundleEndpoint)
                .into_iter()
                .filter(|k| !matches!(*k, "certificate_path" | "private_key_path"))
                .map(|k| {
                    keys::example(keys::Table::BundleEndpoint, k)
                        .unwrap()
                        .to_owned()
                }),
        );
        lines.push("[[federation.trust_domains]]".to_owned());
        lines.extend(
            keys::names(keys::Table::Relationship)
                .into_iter()
                .filter(|k| *k != "endpoint_spiffe_id" && *k != "bundle_endpoint_profile")
                .map(|k| {
                    keys::example(keys::Table::Relationship, k)
                        .unwrap()
                        .to_owned()
                }),
        );
        lines.push("bundle_endpoint_profile = \"https_web\"".to_owned());
        let text = lines.join("\n");
        let cfg = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(cfg.entries.len(), 1);
        assert_eq!(cfg.sds, Some(spiffed_workload_api::SdsConfig::default()));
    }

    #[test]
    fn bundle_endpoint_and_relationships() {
        let cfg = parse(&doc(&[
            TD,
            "[federation.bundle_endpoint]",
            "listen = \"127.0.0.1:8443\"",
            "[[federation.trust_domains]]",
            "trust_domain = \"partner.example\"",
            "bundle_endpoint_url = \"https://127.0.0.1:9443\"",
            "endpoint_spiffe_id = \"spiffe://partner.example/spire/server\"",
            "bundle_path = \"/etc/spiffed/partner.json\"",
            "[[federation.trust_domains]]",
            "trust_domain = \"web.example\"",
            "bundle_endpoint_url = \"https://bundle.web.example/\"",
            "bundle_endpoint_profile = \"https_web\"",
            "refresh_interval = \"30s\"",
        ]))
        .unwrap();
        let ep = cfg.bundle_endpoint.clone().unwrap();
        assert_eq!(ep.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(ep.refresh_hint, DEFAULT_BUNDLE_REFRESH_HINT);
        assert_eq!(
            ep.profile,
            EndpointServing::HttpsSpiffe {
                endpoint_spiffe_id: "spiffe://example.org/spiffed/bundle-endpoint"
                    .parse()
                    .unwrap()
            }
        );
        assert_eq!(cfg.federation.len(), 2);
        assert_eq!(cfg.federation[0].bundle_format, BundleFileFormat::Spiffe);
        assert_eq!(
            cfg.federation[1].profile,
            RelationshipProfile::HttpsWeb {
                root_certificates_path: None
            }
        );
        assert_eq!(
            cfg.federation[1].refresh_interval,
            Some(Duration::from_secs(30))
        );
        assert!(cfg.summary().contains("bundle_endpoint=127.0.0.1:8443"));

        // https_web endpoint needs its files; each mistake is named with its key.
        for (lines, key, says) in [
            (
                vec![
                    "[federation.bundle_endpoint]",
                    "profile = \"https_web\"",
                    "listen = \"127.0.0.1:1\"",
                ],
                "federation.bundle_endpoint.certificate_path",
                "needs certificate_path",
            ),
            (
                vec![
                    "[federation.bundle_endpoint]",
                    "listen = \"localhost:8443\"",
                ],
                "federation.bundle_endpoint.listen",
                "not an IP address",
            ),
            (
                vec![
                    "[federation.bundle_endpoint]",
                    "listen = \"127.0.0.1:1\"",
                    "certificate_path = \"/x\"",
                ],
                "federation.bundle_endpoint.certificate_path",
                "is for profile = \"https_web\"",
            ),
            (
                vec![
                    "[[federation.trust_domains]]",
                    "trust_domain = \"p.example\"",
                    "bundle_endpoint_url = \"http://p.example/\"",
                    "endpoint_spiffe_id = \"spiffe://p.example/x\"",
                ],
                "federation.trust_domains[0].bundle_endpoint_url",
                "must start with https://",
            ),
            (
                vec![
                    "[[federation.trust_domains]]",
                    "trust_domain = \"p.example\"",
                    "bundle_endpoint_url = \"https://p.example/\"",
                ],
                "federation.trust_domains[0].endpoint_spiffe_id",
                "needs endpoint_spiffe_id",
            ),
            (
                vec![
                    "[[federation.trust_domains]]",
                    "trust_domain = \"example.org\"",
                    "bundle_endpoint_url = \"https://p.example/\"",
                    "bundle_endpoint_profile = \"https_web\"",
                ],
                "federation.trust_domains[0].trust_domain",
                "own trust domain",
            ),
            (
                vec![
                    "[[federation.trust_domains]]",
                    "trust_domain = \"p.example\"",
                    "bundle_endpoint_url = \"https://p.example/\"",
                    "bundle_endpoint_profile = \"https_web\"",
                    "max_bundle_bytes = 10485760",
                ],
                "federation.trust_domains[0].max_bundle_bytes",
                "out of range",
            ),
            (
                vec![
                    "[[federation.trust_domains]]",
                    "trust_domain = \"p.example\"",
                    "bundle_endpoint_url = \"https://p.example/\"",
                    "bundle_endpoint_profile = \"https_web\"",
                    "bundle_endpoint = 1",
                ],
                "bundle_endpoint",
                "keys of [[federation.trust_domains]]",
            ),
        ] {
            let mut all = vec![TD];
            all.extend(lines.iter().copied());
            let e = parse(&doc(&all)).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
            assert!(e.to_string().contains(says), "{says}: {e}");
        }
        // Two relationships for one trust domain.
        let rel = [
            "[[federation.trust_domains]]",
            "trust_domain = \"p.example\"",
            "bundle_endpoint_url = \"https://p.example/\"",
            "bundle_endpoint_profile = \"https_web\"",
        ];
        let mut twice = vec![TD];
        twice.extend(rel);
        twice.extend(rel);
        let e = parse(&doc(&twice)).unwrap_err();
        assert!(
            e.to_string()
                .contains("has two [[federation.trust_domains]]"),
            "{e}"
        );
        // Agent mode refuses both: the server federates.
        let e = parse(&doc(&[
            TD,
            "[spire_server]",
            "address = \"127.0.0.1:8081\"",
            "insecure_bootstrap = true",
            "join_token = \"t\"",
            "[federation.bundle_endpoint]",
            "listen = \"127.0.0.1:1\"",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("no effect in agent mode"), "{e}");
    }

    #[test]
    fn federation_settings_and_federates_with() {
        let cfg = parse(&doc(&[TD])).unwrap();
        assert!(!cfg.federate_all);
        let cfg = parse(&doc(&[TD, "[federation]", "federate_all = true"])).unwrap();
        assert!(cfg.federate_all);
        assert!(
            cfg.summary().contains("federate_all=true"),
            "{}",
            cfg.summary()
        );
        let e = parse(&doc(&[TD, "[federation]", "federate_al = true"])).unwrap_err();
        assert!(e.to_string().contains("federate_all"), "{e}");
        let entry = |line: &str| {
            doc(&[
                TD,
                "[[entries]]",
                "spiffe_id = \"spiffe://example.org/web\"",
                "selectors = [\"unix:uid:1000\"]",
                line,
            ])
        };
        let cfg = parse(&entry("federates_with = [\"b.org\", \"a.org\", \"b.org\"]")).unwrap();
        let tds: Vec<&str> = cfg.entries[0]
            .federates_with
            .iter()
            .map(|t| t.as_str())
            .collect();
        assert_eq!(tds, ["b.org", "a.org"]);
        let e = parse(&entry("federates_with = [\"a.org\", \"Not A TD\"]")).unwrap_err();
        assert!(
            e.to_string().contains("entries[0].federates_with[1]"),
            "{e}"
        );
        assert!(e.to_string().contains("not a valid trust domain"), "{e}");
        let e = parse(&entry("federates_with = [\"example.org\"]")).unwrap_err();
        assert!(e.to_string().contains("own trust domain"), "{e}");
    }

    #[test]
    fn sds_table_sets_names_and_can_disable_sds() {
        let cfg = parse(&doc(&[TD])).unwrap();
        assert_eq!(cfg.sds, Some(spiffed_workload_api::SdsConfig::default()));
        assert!(cfg.summary().contains("sds=on("), "{}", cfg.summary());
        let cfg = parse(&doc(&[
            TD,
            "[sds]",
            "default_svid_name = \"svid\"",
            "default_bundle_name = \"ca\"",
            "default_all_bundles_name = \"everything\"",
            "disable_spiffe_cert_validation = true",
        ]))
        .unwrap();
        let sds = cfg.sds.clone().unwrap();
        assert_eq!(
            (
                sds.default_svid_name.as_str(),
                sds.default_bundle_name.as_str(),
                sds.default_all_bundles_name.as_str(),
                sds.disable_spiffe_cert_validation
            ),
            ("svid", "ca", "everything", true)
        );
        let off = parse(&doc(&[TD, "[sds]", "disable_sds_api = true"])).unwrap();
        assert_eq!(off.sds, None);
        assert!(off.summary().ends_with("sds=off"), "{}", off.summary());
        assert_eq!(cfg.changes_needing_restart(&off), ["sds"]);
        for (line, key, says) in [
            (
                "default_svid_name = \"\"",
                "sds.default_svid_name",
                "is empty",
            ),
            (
                "default_bundle_name = \"spiffe://example.org\"",
                "sds.default_bundle_name",
                "starts with spiffe://",
            ),
            (
                "default_all_bundles_name = \"ROOTCA\"",
                "sds.default_all_bundles_name",
                "also the name of default_bundle_name",
            ),
        ] {
            let e = parse(&doc(&[TD, "[sds]", line])).unwrap_err();
            assert_eq!(e.key, key, "{line}: {e}");
            assert!(e.to_string().contains(says), "{line}: {e}");
        }
        let e = parse(&doc(&[TD, "[sds]", "default_svid_nam = \"x\""])).unwrap_err();
        assert!(
            e.to_string().contains("did you mean `default_svid_name`"),
            "{e}"
        );
    }

    #[test]
    fn metrics_and_health_listen_where_configured_and_bad_addresses_name_the_key() {
        let cfg = parse(&doc(&[TD])).unwrap();
        assert_eq!((cfg.metrics, cfg.health), (None, None), "off by default");
        let cfg = parse(&doc(&[
            TD,
            "[metrics]",
            "listen = \"127.0.0.1:9988\"",
            "[health]",
            "listen = \"[::1]:9989\"",
        ]))
        .unwrap();
        assert_eq!(
            cfg.metrics.unwrap().listen,
            "127.0.0.1:9988".parse().unwrap()
        );
        assert_eq!(cfg.health.unwrap().listen, "[::1]:9989".parse().unwrap());
        for (lines, key, says) in [
            (
                vec!["[metrics]", "listen = \"localhost:9988\""],
                "metrics.listen",
                "not an IP address and port",
            ),
            (
                vec!["[health]", "listen = \"127.0.0.1:0\""],
                "health.listen",
                "port 0",
            ),
            (vec!["[metrics]"], "metrics.listen", "needs listen"),
            (
                vec![
                    "[metrics]",
                    "listen = \"127.0.0.1:9988\"",
                    "[health]",
                    "listen = \"127.0.0.1:9988\"",
                ],
                "health.listen",
                "both 127.0.0.1:9988",
            ),
        ] {
            let mut all = vec![TD];
            all.extend(lines);
            let e = parse(&doc(&all)).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(key) && text.contains(says), "{text}");
            assert!(text.contains("fix:"), "{text}");
        }
        let e = parse(&doc(&[TD, "[metrics]", "port = 9988"])).unwrap_err();
        assert!(e.to_string().contains("unknown key `port`"), "{e}");
    }

    #[test]
    fn worker_threads_default_to_one_and_are_bounded() {
        let cfg = parse(&doc(&[TD])).unwrap();
        assert_eq!(cfg.worker_threads, 1);
        assert_eq!(
            Config::with_defaults(cfg.trust_domain.clone()).worker_threads,
            1
        );
        assert!(
            cfg.summary().contains(" worker_threads=1 "),
            "{}",
            cfg.summary()
        );
        let cfg = parse(&doc(&[TD, "worker_threads = 4"])).unwrap();
        assert_eq!(cfg.worker_threads, 4);
        assert_eq!(
            parse(&doc(&[TD, "worker_threads = 1024"]))
                .unwrap()
                .worker_threads,
            1024
        );
        for bad in [
            "worker_threads = 0",
            "worker_threads = 1025",
            "worker_threads = -1",
        ] {
            let e = fails_at(&[TD, bad], 2, "worker_threads");
            assert!(e.message.contains("from 1 to 1024"), "{e}");
            assert!(e.fix.contains("worker_threads = 1"), "{e}");
        }
        let e = parse(&doc(&[TD, "worker_threads = \"4\""])).unwrap_err();
        assert!(e.to_string().contains("worker_threads"), "{e}");
    }

    #[test]
    fn connection_limits_parse_and_are_bounded() {
        let cfg = parse(&doc(&[TD])).unwrap();
        assert_eq!(cfg.max_connections_per_uid, None);
        assert_eq!(cfg.max_streams_per_connection, 100);
        assert_eq!(cfg.max_streams_per_uid, 16_384);
        assert_eq!(cfg.handshake_timeout, Duration::from_secs(10));
        assert_eq!(cfg.idle_timeout, Duration::from_secs(300));
        assert_eq!(cfg.fd_reserve, 64);
        assert!(
            cfg.summary()
                .contains("max_connections_per_uid=auto max_streams_per_connection=100"),
            "{}",
            cfg.summary()
        );
        let cfg = parse(&doc(&[
            TD,
            "max_connections_per_uid = 20",
            "max_streams_per_connection = 10",
            "max_streams_per_uid = 50",
            "handshake_timeout = \"1s\"",
            "idle_timeout = \"500ms\"",
            "fd_reserve = 0",
        ]))
        .unwrap();
        assert_eq!(cfg.max_connections_per_uid, Some(20));
        assert_eq!(cfg.max_streams_per_connection, 10);
        assert_eq!(cfg.max_streams_per_uid, 50);
        assert_eq!(cfg.handshake_timeout, Duration::from_secs(1));
        assert_eq!(cfg.idle_timeout, Duration::from_millis(500));
        assert_eq!(cfg.fd_reserve, 0);

        let e = fails_at(
            &[TD, "max_connections_per_uid = 0"],
            2,
            "max_connections_per_uid",
        );
        assert!(e.fix.contains("max_connections_per_uid = 256"), "{e}");
        fails_at(
            &[TD, "max_streams_per_connection = -1"],
            2,
            "max_streams_per_connection",
        );
        fails_at(&[TD, "max_streams_per_uid = 0"], 2, "max_streams_per_uid");
        fails_at(&[TD, "fd_reserve = -5"], 2, "fd_reserve");
        let e = fails_at(&[TD, "handshake_timeout = \"0s\""], 2, "handshake_timeout");
        assert!(e.message.contains("shorter than 100 ms"), "{e}");
        fails_at(&[TD, "idle_timeout = \"2d\""], 2, "idle_timeout");
        fails_at(&[TD, "idle_timeout = \"soon\""], 2, "idle_timeout");
    }

    const SPIRE: &str = "[spire_server]";

    #[test]
    fn agent_mode_parses_the_public_contract() {
        let cfg = parse(&doc(&[
            TD,
            "socket_path = \"/run/spiffed/public/api.sock\"",
            "data_dir = \"/var/lib/spiffed\"",
            SPIRE,
            "address = \"spire-server.example.org:8081\"",
            "trust_bundle_path = \"/etc/spiffed/bootstrap.pem\"",
            "join_token = \" abc-123 \"",
        ]))
        .unwrap();
        let spire = cfg.spire_server.unwrap();
        assert_eq!(spire.address.to_string(), "spire-server.example.org:8081");
        assert_eq!(
            spire.bootstrap,
            Bootstrap::Bundle {
                path: PathBuf::from("/etc/spiffed/bootstrap.pem"),
                format: BundleFormat::Pem
            }
        );
        assert_eq!(
            spire.attestation,
            NodeAttestation::JoinToken(Some(JoinToken::new("abc-123")))
        );
        assert_eq!(spire.sync_interval, DEFAULT_SYNC_INTERVAL);

        let cfg = parse(&doc(&[
            TD,
            SPIRE,
            "address = \"127.0.0.1:18081\"",
            "insecure_bootstrap = true",
            "sync_interval = \"2s\"",
            "[spire_server.x509pop]",
            "certificate_path = \"/etc/spiffed/node.pem\"",
            "private_key_path = \"/etc/spiffed/node.key\"",
        ]))
        .unwrap();
        let spire = cfg.spire_server.unwrap();
        assert_eq!(spire.bootstrap, Bootstrap::Insecure);
        assert_eq!(spire.sync_interval, Duration::from_secs(2));
        assert_eq!(
            spire.attestation,
            NodeAttestation::X509Pop {
                certificate_path: PathBuf::from("/etc/spiffed/node.pem"),
                private_key_path: PathBuf::from("/etc/spiffed/node.key"),
                intermediates_path: None,
            }
        );
        // No token in the file: --join-token, or the stored agent state, supplies it.
        let cfg = parse(&doc(&[
            TD,
            SPIRE,
            "address = \"[::1]:8081\"",
            "trust_bundle_path = \"/b.json\"",
            "trust_bundle_format = \"spiffe\"",
        ]))
        .unwrap();
        let spire = cfg.spire_server.unwrap();
        assert_eq!(spire.attestation, NodeAttestation::JoinToken(None));
        assert_eq!(
            spire.bootstrap,
            Bootstrap::Bundle {
                path: PathBuf::from("/b.json"),
                format: BundleFormat::Spiffe
            }
        );
        assert!(parse(&doc(&[TD])).unwrap().spire_server.is_none());
    }

    #[test]
    fn agent_mode_refuses_what_it_cannot_honour() {
        let ok = [TD, SPIRE, "address = \"h:1\"", "insecure_bootstrap = true"];
        let with = |extra: &[&'static str]| -> Vec<&'static str> {
            let mut v = ok.to_vec();
            v.extend_from_slice(extra);
            v
        };
        let e = fails_at(
            &with(&[
                "[[entries]]",
                "spiffe_id = \"spiffe://example.org/a\"",
                "selectors = [\"unix:uid:1\"]",
            ]),
            5,
            "entries",
        );
        assert!(e.fix.contains("spire-server entry create"), "{e}");
        let mut lines = vec![TD, "x509_svid_ttl = \"1h\""];
        lines.extend_from_slice(&ok[1..]);
        let e = fails_at(&lines, 2, "x509_svid_ttl");
        assert!(e.message.contains("agent mode"), "{e}");
        let mut lines = vec![TD, "synthetic_ids = true"];
        lines.extend_from_slice(&ok[1..]);
        fails_at(&lines, 2, "synthetic_ids");
    }

    #[test]
    fn sync_interval_bounds_are_1s_and_1h_inclusive() {
        let with = |v: &str| {
            parse(&doc(&[
                TD,
                SPIRE,
                "address = \"h:1\"",
                "insecure_bootstrap = true",
                &format!("sync_interval = \"{v}\""),
            ]))
        };
        for ok in ["1s", "1h"] {
            assert!(with(ok).is_ok(), "{ok}");
        }
        for bad in ["999ms", "3601s"] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.key, "spire_server.sync_interval", "{bad}: {e}");
        }
    }

    #[test]
    fn spire_server_table_errors_name_the_key_and_the_fix() {
        let e = fails_at(
            &[TD, SPIRE, "insecure_bootstrap = true"],
            2,
            "spire_server.address",
        );
        assert!(e.fix.contains("8081"), "{e}");
        fails_at(
            &[
                TD,
                SPIRE,
                "address = \"nohost\"",
                "insecure_bootstrap = true",
            ],
            3,
            "spire_server.address",
        );
        let e = fails_at(
            &[TD, SPIRE, "address = \"h:1\""],
            2,
            "spire_server.trust_bundle_path",
        );
        assert!(e.fix.contains("bundle show"), "{e}");
        fails_at(
            &[
                TD,
                SPIRE,
                "address = \"h:1\"",
                "trust_bundle_path = \"/b.pem\"",
                "insecure_bootstrap = true",
            ],
            4,
            "spire_server.trust_bundle_path",
        );
        fails_at(
            &[
                TD,
                SPIRE,
                "address = \"h:1\"",
                "trust_bundle_path = \"relative.pem\"",
            ],
            4,
            "spire_server.trust_bundle_path",
        );
        fails_at(
            &[
                TD,
                SPIRE,
                "address = \"h:1\"",
                "insecure_bootstrap = true",
                "join_token = \"t\"",
                "[spire_server.x509pop]",
                "certificate_path = \"/c.pem\"",
                "private_key_path = \"/k.pem\"",
            ],
            5,
            "spire_server.join_token",
        );
        fails_at(
            &[
                TD,
                SPIRE,
                "address = \"h:1\"",
                "insecure_bootstrap = true",
                "[spire_server.x509pop]",
                "certificate_path = \"/c.pem\"",
            ],
            5,
            "spire_server.x509pop.private_key_path",
        );
        fails_at(
            &[
                TD,
                SPIRE,
                "address = \"h:1\"",
                "insecure_bootstrap = true",
                "sync_interval = \"2h\"",
            ],
            5,
            "spire_server.sync_interval",
        );
        fails_at(
            &[
                TD,
                SPIRE,
                "address = \"h:1\"",
                "insecure_bootstrap = true",
                "server_port = 8081",
            ],
            5,
            "spire_server.server_port",
        );
    }

    const UPSTREAM: &str = "[upstream_authority.disk]";

    #[test]
    fn upstream_authority_disk_table() {
        let cfg = parse(&doc(&[TD])).unwrap();
        assert_eq!(cfg.upstream_authority, None);
        assert!(cfg.summary().contains("upstream_authority=off"));
        let cfg = parse(&doc(&[
            TD,
            UPSTREAM,
            "cert_file_path = \"/etc/up/ca.crt\"",
            "key_file_path = \"/etc/up/ca.key\"",
            "bundle_file_path = \"/etc/up/root.crt\"",
        ]))
        .unwrap();
        assert_eq!(
            cfg.upstream_authority,
            Some(spiffed_authority::UpstreamConfig {
                cert_file_path: "/etc/up/ca.crt".into(),
                key_file_path: "/etc/up/ca.key".into(),
                bundle_file_path: Some("/etc/up/root.crt".into()),
            })
        );
        assert!(
            cfg.summary()
                .contains("upstream_authority=disk(cert_file_path=/etc/up/ca.crt)"),
            "{}",
            cfg.summary()
        );
        // A change of the paths needs a restart (the files' contents do not).
        let plain = parse(&doc(&[TD])).unwrap();
        assert_eq!(plain.changes_needing_restart(&cfg), ["upstream_authority"]);
        // The bundle is optional.
        let cfg = parse(&doc(&[
            TD,
            UPSTREAM,
            "cert_file_path = \"/etc/up/ca.crt\"",
            "key_file_path = \"/etc/up/ca.key\"",
        ]))
        .unwrap();
        assert_eq!(cfg.upstream_authority.unwrap().bundle_file_path, None);
    }

    #[test]
    fn upstream_authority_errors_name_the_key_and_the_fix() {
        let e = fails_at(
            &[TD, UPSTREAM, "cert_file_path = \"/etc/up/ca.crt\""],
            2,
            "upstream_authority.disk.key_file_path",
        );
        assert!(e.fix.contains("PKCS#8"), "{e}");
        let e = fails_at(
            &[
                TD,
                UPSTREAM,
                "cert_file_path = \"ca.crt\"",
                "key_file_path = \"/etc/up/ca.key\"",
            ],
            3,
            "upstream_authority.disk.cert_file_path",
        );
        assert!(e.message.contains("not an absolute path"), "{e}");
        let e = fails_at(
            &[
                TD,
                UPSTREAM,
                "cert_file_path = \"/etc/up/ca.crt\"",
                "key_file = \"/etc/up/ca.key\"",
            ],
            4,
            "upstream_authority.disk.key_file",
        );
        assert!(e.fix.contains("key_file_path"), "{e}");
        let e = parse(&doc(&[TD, "[upstream_authority]"])).unwrap_err();
        assert!(e.fix.contains("[upstream_authority.disk]"), "{e}");
        let e = parse(&doc(&[
            TD,
            SPIRE,
            "address = \"h:1\"",
            "insecure_bootstrap = true",
            "join_token = \"t\"",
            UPSTREAM,
            "cert_file_path = \"/etc/up/ca.crt\"",
            "key_file_path = \"/etc/up/ca.key\"",
        ]))
        .unwrap_err();
        assert!(e.message.contains("agent mode"), "{e}");
    }

    fn check(text: &str) -> Result<Config, Vec<ConfigError>> {
        validate::parse_all(text, Path::new("spiffed.toml"))
    }

    /// `run --check` lists every problem, in file order: unknown keys, wrong types and bad
    /// values alike, each once.
    #[test]
    fn check_reports_every_problem_in_file_order() {
        let text = doc(&[
            "trust_domain = \"example.org\"",
            "socket_pth = \"/run/x.sock\"",
            "x509_svid_ttl = 5",
            "ca_ttl = \"forever\"",
            "[[entries]]",
            "spiffe_id = \"spiffe://other.org/web\"",
            "selectors = [\"unix:uid:1000\"]",
            "[[entries]]",
            "spiffe_id = \"spiffe://example.org/db\"",
            "selectors = [\"unix:uid:1000\", 7]",
            "colour = \"red\"",
        ]);
        let errors = check(&text).unwrap_err();
        let found: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            [
                (2, "socket_pth"),
                (3, "x509_svid_ttl"),
                (4, "ca_ttl"),
                (6, "entries[0].spiffe_id"),
                (10, "entries[1].selectors[1]"),
                (11, "entries[1].colour"),
            ],
            "{errors:#?}"
        );
        // The wrong-typed selectors list is reported for its item, not again as missing.
        assert!(
            !errors.iter().any(|e| e.key == "entries[1].selectors"),
            "{errors:#?}"
        );
        // The first problem is the one `run` (and Config::from_toml) reports.
        let first = parse(&text).unwrap_err();
        assert_eq!((first.line, first.key.as_str()), (2, "socket_pth"));
    }

    #[test]
    fn check_of_a_good_file_is_the_config_and_a_syntax_error_stops_it() {
        let cfg = check(DESIGN_EXAMPLE).unwrap();
        assert_eq!(
            format!("{cfg:?}"),
            format!("{:?}", parse(DESIGN_EXAMPLE).unwrap())
        );
        let errors = check(&doc(&[TD, "socket_path = /x", "ca_ttl = 5"])).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].kind, ConfigErrorKind::Syntax);
        assert_eq!(errors[0].line, 2);
    }

    #[test]
    fn check_stops_at_the_reporting_limit() {
        let mut lines = vec![TD.to_owned()];
        for i in 0..(MAX_REPORTED_PROBLEMS + 50) {
            lines.push(format!("unknown_{i} = 1"));
        }
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let errors = check(&doc(&lines)).unwrap_err();
        assert_eq!(errors.len(), MAX_REPORTED_PROBLEMS);
        assert_eq!(errors[0].line, 2);
    }
}
