//! The single validation step: raw, spanned TOML values in, a typed [`Config`] or the first
//! problem in file order out.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use spiffe::SpiffeIdError;
use spiffed_core::{
    Entry, EntryError, EntryId, EntryLimits, EntryRules, MAX_HINT_LEN, MAX_TTL, Selector,
    SelectorCheck, SelectorError, SpiffeId, TrustDomain,
};
use spiffed_entries::config_entry_id;
use toml::Spanned;
use toml::de::DeTable;

use super::NewRootPolicy;
use super::error::{ConfigError, ConfigErrorKind, line_column, prune};
use super::keys;
use super::raw::{
    RawBundleEndpoint, RawConfig, RawEntry, RawListen, RawRelationship, RawSds, RawX509Pop, Str,
    StrList,
};
use super::{
    BundleEndpointConfig, BundleFileFormat, DEFAULT_BUNDLE_ENDPOINT_CONNECTIONS,
    DEFAULT_BUNDLE_REFRESH_HINT, DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_BUNDLE_BYTES, EndpointServing,
    FederationRelationship, RelationshipProfile,
};
use super::{
    Config, DEFAULT_ADMIN_SOCKET_PATH, DEFAULT_CA_TTL, DEFAULT_DATA_DIR, DEFAULT_JWT_SVID_TTL,
    DEFAULT_MAX_DNS_NAMES_PER_ENTRY, DEFAULT_MAX_SELECTORS_PER_ENTRY, DEFAULT_MIN_CA_TTL,
    DEFAULT_MIN_SVID_TTL, DEFAULT_SOCKET_MODE, DEFAULT_SOCKET_PATH, DEFAULT_X509_SVID_TTL,
    HttpEndpoint, LogFormat, LogLevel, MAX_ENTRIES,
};
use super::{
    DEFAULT_FD_RESERVE, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_STREAMS_PER_CONNECTION, DEFAULT_MAX_STREAMS_PER_UID,
};
use spiffed_authority::UpstreamConfig;
use spiffed_spire::config::{
    Bootstrap, BundleFormat, DEFAULT_SYNC_INTERVAL, JoinToken, NodeAttestation, ServerAddress,
    SpireConfig,
};
use spiffed_workload_api::SdsConfig;

/// Longest trust domain name, in bytes ([ID §2.3]).
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest Unix socket path: `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH_LEN: usize = 107;
/// Largest value of `max_selectors_per_entry` and `max_dns_names_per_entry`.
const MAX_PER_ENTRY_LIMIT: i64 = 1024;
/// Largest value of `min_svid_ttl` (the default `jwt_svid_ttl`).
const MAX_MIN_SVID_TTL: Duration = DEFAULT_JWT_SVID_TTL;
/// Largest value of `min_ca_ttl` (the default `ca_ttl`).
const MAX_MIN_CA_TTL: Duration = DEFAULT_CA_TTL;

/// Bounds every entry and lifetime must keep (`max_selectors_per_entry`,
/// `max_dns_names_per_entry`, `min_svid_ttl`).
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_selectors: usize,
    max_dns_names: usize,
    min_svid_ttl: Duration,
}

/// Parses and validates `text`, read from `file`: of the problems [`parse_all`] finds, the
/// first unknown key or wrong type in the file if there is one (a misspelt key is the likely
/// cause of a required key found missing), else the first problem in the file.
pub(crate) fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    parse_all(text, file).map_err(|errors| first(errors, text, file))
}

/// The problem [`parse`] reports.
fn first(errors: Vec<ConfigError>, text: &str, file: &Path) -> ConfigError {
    errors
        .into_iter()
        .min_by_key(|e| {
            let structural = matches!(
                e.kind,
                ConfigErrorKind::Syntax | ConfigErrorKind::UnknownKey | ConfigErrorKind::WrongType
            );
            (!structural, e.line, e.column)
        })
        .unwrap_or_else(|| {
            ConfigError::at(
                ConfigErrorKind::Invalid,
                file,
                text,
                &(0..0),
                "",
                "the configuration is invalid",
                "run `spiffed run --check --config FILE` to list the problems",
            )
        })
}

/// How many problems `parse_all` reports at most (a file of another program would otherwise
/// give one per line).
pub const MAX_REPORTED_PROBLEMS: usize = 100;

/// Parses and validates `text`, read from `file`, and returns every problem found, in file
/// order (`spiffed run --check`).
///
/// A TOML syntax error ends the check (the rest of the text cannot be read reliably). An unknown
/// key or a value of the wrong type is reported and taken out of the document, which is read
/// again, so the problems after it are found too; then every value is checked. A problem caused
/// only by a key already reported (a required key taken out because its type was wrong) is not
/// reported twice.
pub(crate) fn parse_all(text: &str, file: &Path) -> Result<Config, Vec<ConfigError>> {
    let mut doc = DeTable::parse(text).map_err(|e| vec![ConfigError::syntax(file, text, &e)])?;
    let mut errors = Vec::new();
    let raw = loop {
        match RawConfig::deserialize(toml::de::Deserializer::from(doc.clone())) {
            Ok(raw) => break Some(raw),
            Err(e) => {
                errors.push(ConfigError::from_serde(file, text, &doc, &e));
                let pruned = e
                    .span()
                    .is_some_and(|span| prune(doc.get_mut(), span.start));
                if !pruned || errors.len() >= MAX_REPORTED_PROBLEMS {
                    break None;
                }
            }
        }
    };
    if let Some(raw) = raw {
        // The built-in attestor plugins' checks, so that the file's entries pass exactly the
        // check admin writes pass.
        let selectors = spiffed_attest::builtin();
        match validate_all(raw, text, file, &selectors) {
            Ok(config) if errors.is_empty() => return Ok(config),
            Ok(_) => {}
            Err(more) => {
                let reported: Vec<String> = errors
                    .iter()
                    .map(|e| without_index(&e.key).to_owned())
                    .collect();
                errors.extend(
                    more.into_iter()
                        .filter(|e| !reported.iter().any(|r| r == without_index(&e.key))),
                );
            }
        }
    }
    errors.sort_by_key(|e| (e.line, e.column));
    errors.truncate(MAX_REPORTED_PROBLEMS);
    Err(errors)
}

/// `key` without a trailing list index: `entries[0].selectors[1]` is `entries[0].selectors`.
fn without_index(key: &str) -> &str {
    match key
        .strip_suffix(']')
        .and_then(|k| k.rfind('[').map(|i| &key[..i]))
    {
        Some(k) if !k.is_empty() => k,
        _ => key,
    }
}

/// Builds the typed config from the raw one, or returns every problem found (unsorted).
fn validate_all(
    mut raw: RawConfig,
    text: &str,
    file: &Path,
    selectors: &dyn SelectorCheck,
) -> Result<Config, Vec<ConfigError>> {
    let mut cx = Cx {
        text,
        file,
        selectors,
        errors: Vec::new(),
        limits: Limits {
            max_selectors: DEFAULT_MAX_SELECTORS_PER_ENTRY,
            max_dns_names: DEFAULT_MAX_DNS_NAMES_PER_ENTRY,
            min_svid_ttl: DEFAULT_MIN_SVID_TTL,
        },
    };
    // Read first: later steps move fields out of `raw`.
    let caller = cx.caller_limits(&raw);
    let trust_domain = cx.trust_domain(raw.trust_domain.take());
    let socket_path = cx.path(
        "socket_path",
        raw.socket_path.as_ref(),
        DEFAULT_SOCKET_PATH,
        true,
    );
    let socket_mode = cx.socket_mode(raw.socket_mode.as_ref());
    let admin_socket_path = cx.path(
        "admin_socket_path",
        raw.admin_socket_path.as_ref(),
        DEFAULT_ADMIN_SOCKET_PATH,
        true,
    );
    // Blame admin_socket_path when written, else socket_path (both defaults never clash).
    let blame = match (&raw.admin_socket_path, &raw.socket_path) {
        (Some(a), _) => Some(("admin_socket_path", a.span())),
        (None, Some(s)) => Some(("socket_path", s.span())),
        (None, None) => None,
    };
    if let Some((key, span)) = blame {
        if admin_socket_path == socket_path {
            cx.invalid(
                span,
                key,
                format!("{key}: admin_socket_path and socket_path are the same"),
                format!(
                    "give the admin socket its own path in an owner-only directory, e.g. \
                     admin_socket_path = \"{DEFAULT_ADMIN_SOCKET_PATH}\""
                ),
            );
        } else if admin_socket_path.parent() == socket_path.parent() {
            cx.invalid(
                span,
                key,
                format!("{key}: admin_socket_path and socket_path are in the same directory"),
                format!(
                    "the admin socket's directory is made owner-only, which would lock workloads \
                     out of socket_path; put them in different directories, e.g. \
                     socket_path = \"{DEFAULT_SOCKET_PATH}\" and admin_socket_path = \
                     \"{DEFAULT_ADMIN_SOCKET_PATH}\""
                ),
            );
        }
    }
    let admin_uids = cx.admin_uids(raw.admin_uids.take());
    let data_dir = cx.path("data_dir", raw.data_dir.as_ref(), DEFAULT_DATA_DIR, false);
    cx.sockets_outside_data_dir(&raw, &data_dir, [&socket_path, &admin_socket_path]);
    cx.limits = cx.limits(&raw);
    let min_ca_ttl = cx
        .ttl("min_ca_ttl", "min_ca_ttl", raw.min_ca_ttl.as_ref())
        .filter(|_| {
            raw.min_ca_ttl
                .as_ref()
                .is_none_or(|r| cx.at_most(r, "min_ca_ttl", MAX_MIN_CA_TTL))
        })
        .unwrap_or(DEFAULT_MIN_CA_TTL);
    let x509 = cx.svid_ttl("x509_svid_ttl", "x509_svid_ttl", raw.x509_svid_ttl.as_ref());
    let jwt = cx.svid_ttl("jwt_svid_ttl", "jwt_svid_ttl", raw.jwt_svid_ttl.as_ref());
    let ca = cx
        .ttl("ca_ttl", "ca_ttl", raw.ca_ttl.as_ref())
        .filter(|&d| {
            let Some(r) = raw.ca_ttl.as_ref().filter(|_| d < min_ca_ttl) else {
                return true;
            };
            cx.invalid(
            r.span(),
            "ca_ttl",
            format!(
                "ca_ttl {:?} is shorter than min_ca_ttl ({})",
                r.get_ref(),
                humantime::format_duration(min_ca_ttl)
            ),
            format!(
                "use at least ca_ttl = \"{}\": every CA rotation rewrites ca.json (fsynced) and \
                 re-signs every SVID; the default is \"24h\" (for tests only, lower min_ca_ttl)",
                humantime::format_duration(min_ca_ttl)
            ),
        );
            false
        });
    let x509_svid_ttl = x509.unwrap_or(DEFAULT_X509_SVID_TTL);
    let ca_ttl = ca.unwrap_or(DEFAULT_CA_TTL);
    let x509_ok = raw.x509_svid_ttl.is_none() || x509.is_some();
    let ca_ok = raw.ca_ttl.is_none() || ca.is_some();
    if x509_ok && ca_ok && x509_svid_ttl > ca_ttl {
        let (key, span) = match (&raw.x509_svid_ttl, &raw.ca_ttl) {
            (Some(x), _) => ("x509_svid_ttl", x.span()),
            (None, Some(c)) => ("ca_ttl", c.span()),
            (None, None) => ("x509_svid_ttl", 0..0),
        };
        cx.invalid(
            span,
            key,
            format!(
                "x509_svid_ttl ({}) is longer than ca_ttl ({})",
                humantime::format_duration(x509_svid_ttl),
                humantime::format_duration(ca_ttl)
            ),
            "an SVID never outlives its CA: raise ca_ttl or lower x509_svid_ttl",
        );
    }
    let jwt_svid_ttl = jwt.unwrap_or(DEFAULT_JWT_SVID_TTL);
    let jwt_ok = raw.jwt_svid_ttl.is_none() || jwt.is_some();
    if jwt_ok && ca_ok && jwt_svid_ttl > ca_ttl {
        let (key, span) = match (&raw.jwt_svid_ttl, &raw.ca_ttl) {
            (Some(j), _) => ("jwt_svid_ttl", j.span()),
            (None, Some(c)) => ("ca_ttl", c.span()),
            (None, None) => ("jwt_svid_ttl", 0..0),
        };
        cx.invalid(
            span,
            key,
            format!(
                "jwt_svid_ttl ({}) is longer than ca_ttl ({})",
                humantime::format_duration(jwt_svid_ttl),
                humantime::format_duration(ca_ttl)
            ),
            "a JWT-SVID never outlives its signing key, which lives as long as the CA: raise \
             ca_ttl or lower jwt_svid_ttl",
        );
    }
    let log_level = cx.choice(
        "log_level",
        raw.log_level.as_ref(),
        &[
            ("trace", LogLevel::Trace),
            ("debug", LogLevel::Debug),
            ("info", LogLevel::Info),
            ("warn", LogLevel::Warn),
            ("error", LogLevel::Error),
        ],
        LogLevel::default(),
    );
    let log_format = cx.choice(
        "log_format",
        raw.log_format.as_ref(),
        &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        LogFormat::default(),
    );
    let spire_server = cx.spire_server(&raw);
    let upstream_authority = cx.upstream_authority(&raw);
    let sds = cx.sds(raw.sds.as_ref());
    let metrics = cx.endpoint("metrics", raw.metrics.as_ref(), 9988);
    let health = cx.endpoint("health", raw.health.as_ref(), 9989);
    if let (Some(m), Some(h), Some(raw_h)) = (metrics, health, raw.health.as_ref())
        && m.listen == h.listen
    {
        let span = raw_h
            .get_ref()
            .listen
            .as_ref()
            .map_or(raw_h.span(), |l| l.span());
        cx.invalid(
            span,
            "health.listen",
            format!(
                "health.listen and metrics.listen are both {}",
                m.listen
            ),
            "give each endpoint its own port, e.g. [metrics] listen = \"127.0.0.1:9988\" and [health] listen = \"127.0.0.1:9989\"",
        );
    }
    let (bundle_endpoint, federation) = cx.federation(&raw, trust_domain.as_ref());
    let synthetic_ids = raw.synthetic_ids.is_some_and(|s| *s.get_ref());
    let federate_all = raw
        .federation
        .as_ref()
        .and_then(|f| f.get_ref().federate_all.as_ref())
        .is_some_and(|b| *b.get_ref());
    let entries = cx.entries(raw.entries, trust_domain.as_ref(), ca_ok.then_some(ca_ttl));
    let max_connections_per_uid = cx.count(
        "max_connections_per_uid",
        raw.max_connections_per_uid.as_ref(),
        1..=1_000_000,
        "connections",
    );
    let max_streams_per_connection = cx
        .count(
            "max_streams_per_connection",
            raw.max_streams_per_connection.as_ref(),
            1..=1_000_000,
            "streams",
        )
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(DEFAULT_MAX_STREAMS_PER_CONNECTION);
    let max_streams_per_uid = cx
        .count(
            "max_streams_per_uid",
            raw.max_streams_per_uid.as_ref(),
            1..=10_000_000,
            "streams",
        )
        .unwrap_or(DEFAULT_MAX_STREAMS_PER_UID);
    let handshake_timeout = cx
        .timeout("handshake_timeout", raw.handshake_timeout.as_ref())
        .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
    let idle_timeout = cx
        .timeout("idle_timeout", raw.idle_timeout.as_ref())
        .unwrap_or(DEFAULT_IDLE_TIMEOUT);
    let fd_reserve = cx
        .count(
            "fd_reserve",
            raw.fd_reserve.as_ref(),
            0..=1_000_000,
            "descriptors",
        )
        .unwrap_or(DEFAULT_FD_RESERVE);
    let worker_threads = cx
        .count(
            "worker_threads",
            raw.worker_threads.as_ref(),
            1..=crate::config::MAX_WORKER_THREADS,
            "threads",
        )
        .unwrap_or(crate::config::DEFAULT_WORKER_THREADS);

    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    let Some(trust_domain) = trust_domain else {
        // Unreachable: a missing or bad trust domain records an error above.
        return Err(vec![ConfigError::at(
            ConfigErrorKind::Missing,
            file,
            text,
            &(0..0),
            "trust_domain",
            "trust_domain is required",
            "add trust_domain = \"example.org\" at the top of the file",
        )]);
    };
    Ok(Config {
        source: Some(file.to_owned()),
        trust_domain,
        socket_path,
        socket_mode,
        admin_socket_path,
        admin_uids,
        data_dir,
        x509_svid_ttl,
        jwt_svid_ttl,
        ca_ttl,
        log_level,
        log_format,
        synthetic_ids,
        entries,
        new_trust_root: NewRootPolicy::default(),
        max_connections_per_uid,
        max_streams_per_connection,
        max_streams_per_uid,
        handshake_timeout,
        idle_timeout,
        fd_reserve,
        max_jwt_audiences: caller.max_jwt_audiences,
        max_jwt_audience_length: caller.max_jwt_audience_length,
        max_jwt_token_length: caller.max_jwt_token_length,
        jwt_cache_bytes: caller.jwt_cache_bytes,
        jwt_cache_entries_per_identity: caller.jwt_cache_entries_per_identity,
        max_logged_string_length: caller.max_logged_string_length,
        denial_log_lines_per_second: caller.denial_log_lines_per_second,
        premint_entries: caller.premint_entries,
        worker_threads,
        max_selectors_per_entry: cx.limits.max_selectors,
        max_dns_names_per_entry: cx.limits.max_dns_names,
        min_svid_ttl: cx.limits.min_svid_ttl,
        min_ca_ttl,
        new_entry_store: false,
        spire_server,
        sds,
        metrics,
        health,
        upstream_authority,
        federate_all,
        bundle_endpoint,
        federation,
    })
}

/// The request, JWT cache and log bounds of a file.
struct CallerLimits {
    max_jwt_audiences: usize,
    max_jwt_audience_length: usize,
    max_jwt_token_length: usize,
    jwt_cache_bytes: usize,
    jwt_cache_entries_per_identity: usize,
    max_logged_string_length: usize,
    denial_log_lines_per_second: u32,
    premint_entries: usize,
}

/// What `max_jwt_token_length` may be: a token must fit a Workload API request (64 KiB).
const TOKEN_LENGTH_RANGE: (i64, i64) = (1024, 60 * 1024);

impl Cx<'_> {
    /// Reads the request, JWT cache and log bounds, each within its range.
    fn caller_limits(&mut self, raw: &RawConfig) -> CallerLimits {
        use spiffed_authority::{DEFAULT_JWT_CACHE_BYTES, DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY};
        use spiffed_core::untrusted::{DEFAULT_MAX_CHARS, MIN_MAX_CHARS};
        use spiffed_workload_api::{
            DEFAULT_DENIAL_LOG_LINES_PER_SECOND, DEFAULT_MAX_JWT_AUDIENCE_LENGTH,
            DEFAULT_MAX_JWT_AUDIENCES, DEFAULT_MAX_JWT_TOKEN_LENGTH,
        };
        CallerLimits {
            max_jwt_audiences: self.bounded(
                "max_jwt_audiences",
                raw.max_jwt_audiences.as_ref(),
                (1, 1000),
                DEFAULT_MAX_JWT_AUDIENCES,
                "the most audiences one FetchJWTSVID request may name",
            ),
            max_jwt_audience_length: self.bounded(
                "max_jwt_audience_length",
                raw.max_jwt_audience_length.as_ref(),
                (1, 16 * 1024),
                DEFAULT_MAX_JWT_AUDIENCE_LENGTH,
                "the longest audience in bytes",
            ),
            max_jwt_token_length: self.bounded(
                "max_jwt_token_length",
                raw.max_jwt_token_length.as_ref(),
                TOKEN_LENGTH_RANGE,
                DEFAULT_MAX_JWT_TOKEN_LENGTH,
                "the longest token ValidateJWTSVID accepts, in bytes",
            ),
            jwt_cache_bytes: self.bounded(
                "jwt_cache_bytes",
                raw.jwt_cache_bytes.as_ref(),
                (0, 1 << 30),
                DEFAULT_JWT_CACHE_BYTES,
                "the bytes the JWT-SVID cache may hold (0 turns caching off)",
            ),
            jwt_cache_entries_per_identity: self.bounded(
                "jwt_cache_entries_per_identity",
                raw.jwt_cache_entries_per_identity.as_ref(),
                (0, 100_000),
                DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY,
                "the cached JWT-SVIDs (audience sets) per identity (0 turns caching off)",
            ),
            max_logged_string_length: self.bounded(
                "max_logged_string_length",
                raw.max_logged_string_length.as_ref(),
                (i64::try_from(MIN_MAX_CHARS).unwrap_or(16), 64 * 1024),
                DEFAULT_MAX_CHARS,
                "the characters of a client-supplied string kept in log lines",
            ),
            denial_log_lines_per_second: self.bounded(
                "denial_log_lines_per_second",
                raw.denial_log_lines_per_second.as_ref(),
                (1, 1_000_000),
                DEFAULT_DENIAL_LOG_LINES_PER_SECOND,
                "the denial lines of each kind logged per second",
            ),
            premint_entries: self.bounded(
                "premint_entries",
                raw.premint_entries.as_ref(),
                (0, 10_000_000),
                crate::config::DEFAULT_PREMINT_ENTRIES,
                "how many registered entries get an X.509-SVID before any workload asks (0: mint \
                 every SVID on first use)",
            ),
        }
    }

    /// A whole number within `range` (inclusive), or `default` when absent or invalid (the
    /// error is recorded).
    fn bounded<T: TryFrom<i64> + std::fmt::Display + Copy>(
        &mut self,
        key: &str,
        raw: Option<&Spanned<i64>>,
        (min, max): (i64, i64),
        default: T,
        what: &str,
    ) -> T {
        let Some(raw) = raw else {
            return default;
        };
        let n = *raw.get_ref();
        if (min..=max).contains(&n)
            && let Ok(v) = T::try_from(n)
        {
            return v;
        }
        self.invalid(
            raw.span(),
            key,
            format!("{key} = {n} is outside {min}..={max}"),
            format!("{key} is {what}: write a whole number from {min} to {max}, e.g. {key} = {default} (the default)"),
        );
        default
    }
}

/// Validation context: where the text came from, and the problems found so far.
struct Cx<'a> {
    text: &'a str,
    file: &'a Path,
    errors: Vec<ConfigError>,
    limits: Limits,
    /// What the configured attestor plugins accept (entries are checked by `Entry::checked`).
    selectors: &'a dyn SelectorCheck,
}

/// Shortest and longest `sync_interval`.
const SYNC_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));

impl Cx<'_> {
    /// The `[spire_server]` table (agent mode), and the keys that have no meaning next to it.
    fn spire_server(&mut self, raw: &RawConfig) -> Option<SpireConfig> {
        let table = raw.spire_server.as_ref()?;
        let span = table.span();
        let t = table.get_ref();
        // Keys of standalone mode that agent mode cannot honour: refused, so that nobody
        // believes they apply.
        let server_sets = |key: &str, how: &str| {
            (
                format!("{key} has no effect in agent mode: the SPIRE Server {how}"),
                format!("remove {key}, or remove [spire_server] to run standalone"),
            )
        };
        if let Some(e) = raw.entries.first() {
            self.invalid(
                e.span(),
                "entries",
                "[[entries]] are not used in agent mode: the SPIRE Server holds the registration                  entries",
                "register them on the server, e.g. `spire-server entry create -parentID                  <this agent's SPIFFE ID> -spiffeID spiffe://TD/web -selector unix:uid:1000`, and                  remove the [[entries]] tables",
            );
        }
        for (key, raw_ttl, how) in [
            (
                "x509_svid_ttl",
                &raw.x509_svid_ttl,
                "sets X.509-SVID lifetimes (default_x509_svid_ttl in its config, or                  -x509SVIDTTL per entry)",
            ),
            (
                "jwt_svid_ttl",
                &raw.jwt_svid_ttl,
                "sets JWT-SVID lifetimes (default_jwt_svid_ttl in its config, or -jwtSVIDTTL                  per entry)",
            ),
            ("ca_ttl", &raw.ca_ttl, "is the CA (ca_ttl in its config)"),
        ] {
            if let Some(r) = raw_ttl {
                let (message, fix) = server_sets(key, how);
                self.invalid(r.span(), key, message, fix);
            }
        }
        if let Some(s) = raw.synthetic_ids.as_ref().filter(|s| *s.get_ref()) {
            self.invalid(
                s.span(),
                "synthetic_ids",
                "synthetic_ids cannot be used in agent mode: every identity comes from an entry                  on the SPIRE Server",
                "remove synthetic_ids (it is for standalone and dev mode)",
            );
        }
        let address = match &t.address {
            None => {
                self.push(
                    ConfigErrorKind::Missing,
                    span.clone(),
                    "spire_server.address",
                    "[spire_server] needs the server's address",
                    "add address = \"spire-server.example.org:8081\" (HOST:PORT; 8081 is the \
                     server's default bind_port)",
                );
                None
            }
            Some(a) => match a.get_ref().parse::<ServerAddress>() {
                Ok(addr) => Some(addr),
                Err(e) => {
                    self.invalid(
                        a.span(),
                        "spire_server.address",
                        e.to_string(),
                        "the address is where spire-server listens (bind_address:bind_port)",
                    );
                    None
                }
            },
        };
        let insecure = t.insecure_bootstrap.as_ref().is_some_and(|b| *b.get_ref());
        let format = self.choice(
            "spire_server.trust_bundle_format",
            t.trust_bundle_format.as_ref(),
            &[("pem", BundleFormat::Pem), ("spiffe", BundleFormat::Spiffe)],
            BundleFormat::Pem,
        );
        let bootstrap = match (&t.trust_bundle_path, insecure) {
            (Some(p), true) => {
                self.invalid(
                    p.span(),
                    "spire_server.trust_bundle_path",
                    "trust_bundle_path and insecure_bootstrap = true are both set",
                    "keep trust_bundle_path (insecure_bootstrap skips verifying the server and \
                     is for tests only)",
                );
                None
            }
            (Some(_), false) => Some(Bootstrap::Bundle {
                path: self.path(
                    "spire_server.trust_bundle_path",
                    t.trust_bundle_path.as_ref(),
                    "/etc/spiffed/bootstrap.pem",
                    false,
                ),
                format,
            }),
            (None, true) => {
                if let Some(f) = &t.trust_bundle_format {
                    self.invalid(
                        f.span(),
                        "spire_server.trust_bundle_format",
                        "trust_bundle_format is set, but there is no trust_bundle_path",
                        "remove trust_bundle_format, or set trust_bundle_path",
                    );
                }
                Some(Bootstrap::Insecure)
            }
            (None, false) => {
                self.push(
                    ConfigErrorKind::Missing,
                    span,
                    "spire_server.trust_bundle_path",
                    "[spire_server] needs trust_bundle_path (or insecure_bootstrap = true) to \
                     authenticate the server on first contact",
                    "add trust_bundle_path = \"/etc/spiffed/bootstrap.pem\" with the output of \
                     `spire-server bundle show` (or insecure_bootstrap = true, for tests only)",
                );
                None
            }
        };
        let attestation = match (&t.join_token, &t.x509pop) {
            (Some(tok), Some(_)) => {
                self.invalid(
                    tok.span(),
                    "spire_server.join_token",
                    "join_token and [spire_server.x509pop] are both set",
                    "choose one node attestor: remove join_token or the x509pop table",
                );
                None
            }
            (Some(tok), None) if tok.get_ref().trim().is_empty() => {
                self.invalid(
                    tok.span(),
                    "spire_server.join_token",
                    "join_token is empty",
                    "paste the token printed by `spire-server token generate`, or remove the \
                     key and pass --join-token",
                );
                None
            }
            (Some(tok), None) => Some(NodeAttestation::JoinToken(Some(JoinToken::new(
                tok.get_ref().trim(),
            )))),
            (None, Some(pop)) => self.x509pop(pop),
            (None, None) => Some(NodeAttestation::JoinToken(None)),
        };
        let sync_interval = match &t.sync_interval {
            None => Some(DEFAULT_SYNC_INTERVAL),
            Some(r) => self
                .ttl("spire_server.sync_interval", "sync_interval", Some(r))
                .filter(|d| {
                    let (lo, hi) = SYNC_INTERVAL_RANGE;
                    if (lo..=hi).contains(d) {
                        return true;
                    }
                    self.invalid(
                        r.span(),
                        "spire_server.sync_interval",
                        format!("sync_interval {:?} is outside 1s..1h", r.get_ref()),
                        "use e.g. \"5s\" (the default, as spire-agent); a shorter interval \
                         costs the server CPU per agent",
                    );
                    false
                }),
        };
        Some(SpireConfig {
            address: address?,
            bootstrap: bootstrap?,
            attestation: attestation?,
            sync_interval: sync_interval?,
        })
    }

    /// The `[metrics]` or `[health]` table: `listen` must be an IP address and a port (not 0).
    fn endpoint(
        &mut self,
        table: &str,
        raw: Option<&Spanned<RawListen>>,
        example_port: u16,
    ) -> Option<HttpEndpoint> {
        let raw = raw?;
        let key = format!("{table}.listen");
        let example = format!("[{table}] listen = \"127.0.0.1:{example_port}\"");
        let Some(listen) = &raw.get_ref().listen else {
            self.push(
                ConfigErrorKind::Missing,
                raw.span(),
                key,
                format!("[{table}] needs listen, the address to serve on"),
                format!(
                    "add {example} (loopback: only this host can reach it), or remove [{table}] \
                     to turn it off"
                ),
            );
            return None;
        };
        let text = listen.get_ref().trim();
        let problem = match text.parse::<std::net::SocketAddr>() {
            Ok(addr) if addr.port() == 0 => {
                format!("{key} {text:?} has port 0, which picks a random port nobody can find")
            }
            Ok(addr) => return Some(HttpEndpoint { listen: addr }),
            Err(_) => format!(
                "{key} {text:?} is not an IP address and port (host names are not resolved)"
            ),
        };
        self.invalid(
            listen.span(),
            key,
            problem,
            format!(
                "write {example} (IPv6: \"[::1]:{example_port}\"); 0.0.0.0 serves every \
                 interface, which exposes it to the network"
            ),
        );
        None
    }

    /// `[federation.bundle_endpoint]` and `[[federation.trust_domains]]` (standalone mode only).
    fn federation(
        &mut self,
        raw: &RawConfig,
        td: Option<&TrustDomain>,
    ) -> (Option<BundleEndpointConfig>, Vec<FederationRelationship>) {
        let Some(fed) = raw.federation.as_ref() else {
            return (None, Vec::new());
        };
        let f = fed.get_ref();
        if raw.spire_server.is_some() {
            if let Some(e) = &f.bundle_endpoint {
                self.invalid(
                    e.span(),
                    "federation.bundle_endpoint",
                    "[federation.bundle_endpoint] has no effect in agent mode: the SPIRE Server \
                     serves the trust domain's bundle",
                    "configure federation { bundle_endpoint { ... } } on the SPIRE Server, and \
                     remove [federation.bundle_endpoint]",
                );
            }
            if let Some(r) = f.trust_domains.first() {
                self.invalid(
                    r.span(),
                    "federation.trust_domains",
                    "[[federation.trust_domains]] have no effect in agent mode: the SPIRE Server \
                     fetches federated bundles and this agent receives them from it",
                    "create the relationship on the server (`spire-server federation create`), \
                     and remove the [[federation.trust_domains]] tables",
                );
            }
            return (None, Vec::new());
        }
        let endpoint = f
            .bundle_endpoint
            .as_ref()
            .and_then(|e| self.bundle_endpoint(e, td));
        let mut relationships: Vec<FederationRelationship> = Vec::new();
        for (i, r) in f.trust_domains.iter().enumerate() {
            if let Some(rel) = self.relationship(i, r, td) {
                if relationships
                    .iter()
                    .any(|o| o.trust_domain == rel.trust_domain)
                {
                    self.invalid(
                        r.span(),
                        format!("federation.trust_domains[{i}].trust_domain"),
                        format!(
                            "trust domain {} has two [[federation.trust_domains]] tables",
                            rel.trust_domain
                        ),
                        "keep one relationship per trust domain",
                    );
                    continue;
                }
                relationships.push(rel);
            }
        }
        (endpoint, relationships)
    }

    fn bundle_endpoint(
        &mut self,
        raw: &Spanned<RawBundleEndpoint>,
        td: Option<&TrustDomain>,
    ) -> Option<BundleEndpointConfig> {
        let e = raw.get_ref();
        let key = "federation.bundle_endpoint.listen";
        let listen = match &e.listen {
            None => {
                self.push(
                    ConfigErrorKind::Missing,
                    raw.span(),
                    key,
                    "[federation.bundle_endpoint] needs listen, the address peers fetch the \
                     bundle from",
                    "add listen = \"0.0.0.0:8443\" (every interface: peers are on other hosts), \
                     or remove [federation.bundle_endpoint]",
                );
                None
            }
            Some(l) => match l.get_ref().trim().parse::<std::net::SocketAddr>() {
                Ok(a) if a.port() != 0 => Some(a),
                _ => {
                    self.invalid(
                        l.span(),
                        key,
                        format!(
                            "{key} {:?} is not an IP address and a port (not 0)",
                            l.get_ref()
                        ),
                        "write listen = \"0.0.0.0:8443\" (IPv6: \"[::]:8443\"); host names are \
                         not resolved",
                    );
                    None
                }
            },
        };
        #[derive(Clone, Copy, PartialEq)]
        enum P {
            Spiffe,
            Web,
        }
        let profile = self.choice(
            "federation.bundle_endpoint.profile",
            e.profile.as_ref(),
            &[("https_spiffe", P::Spiffe), ("https_web", P::Web)],
            P::Spiffe,
        );
        let profile = match profile {
            P::Spiffe => {
                for (k, v) in [
                    ("certificate_path", &e.certificate_path),
                    ("private_key_path", &e.private_key_path),
                ] {
                    if let Some(v) = v {
                        self.invalid(
                            v.span(),
                            format!("federation.bundle_endpoint.{k}"),
                            format!(
                                "{k} is for profile = \"https_web\"; with https_spiffe the \
                                 endpoint presents an X.509-SVID the agent mints"
                            ),
                            format!("remove {k}, or set profile = \"https_web\""),
                        );
                    }
                }
                let td = td?;
                let id = match &e.endpoint_spiffe_id {
                    None => SpiffeId::from_str(&format!("spiffe://{td}/spiffed/bundle-endpoint"))
                        .ok()?,
                    Some(r) => match parse_spiffe_id(r.get_ref(), td.as_str()) {
                        Ok(id) => id,
                        Err((message, fix)) => {
                            self.invalid(
                                r.span(),
                                "federation.bundle_endpoint.endpoint_spiffe_id",
                                message,
                                fix,
                            );
                            return None;
                        }
                    },
                };
                EndpointServing::HttpsSpiffe {
                    endpoint_spiffe_id: id,
                }
            }
            P::Web => {
                if let Some(v) = &e.endpoint_spiffe_id {
                    self.invalid(
                        v.span(),
                        "federation.bundle_endpoint.endpoint_spiffe_id",
                        "endpoint_spiffe_id is for profile = \"https_spiffe\"; with https_web the \
                         endpoint presents the certificate of certificate_path",
                        "remove endpoint_spiffe_id, or set profile = \"https_spiffe\"",
                    );
                }
                let need = |cx: &mut Self, k: &str, v: &Option<Str>, example: &str| match v {
                    Some(_) => Some(cx.path(
                        &format!("federation.bundle_endpoint.{k}"),
                        v.as_ref(),
                        example,
                        false,
                    )),
                    None => {
                        cx.push(
                            ConfigErrorKind::Missing,
                            raw.span(),
                            format!("federation.bundle_endpoint.{k}"),
                            format!("profile = \"https_web\" needs {k}"),
                            "add certificate_path and private_key_path: PEM files of a Web PKI \
                             certificate for the host name peers use, and its key",
                        );
                        None
                    }
                };
                let cert = need(
                    self,
                    "certificate_path",
                    &e.certificate_path,
                    "/etc/spiffed/bundle-endpoint.pem",
                );
                let key = need(
                    self,
                    "private_key_path",
                    &e.private_key_path,
                    "/etc/spiffed/bundle-endpoint.key",
                );
                EndpointServing::HttpsWeb {
                    certificate_path: cert?,
                    private_key_path: key?,
                }
            }
        };
        let refresh_hint = match &e.refresh_hint {
            None => Some(DEFAULT_BUNDLE_REFRESH_HINT),
            Some(r) => match humantime::parse_duration(r.get_ref()) {
                Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(7 * 24 * 3600) => {
                    Some(d)
                }
                _ => {
                    self.invalid(
                        r.span(),
                        "federation.bundle_endpoint.refresh_hint",
                        format!(
                            "refresh_hint {:?} is not a duration from 1s to 7 days",
                            r.get_ref()
                        ),
                        "write e.g. refresh_hint = \"5m\" (peers fetch again every quarter of it, \
                         at least every 15 s)",
                    );
                    None
                }
            },
        };
        let max_connections = self
            .count(
                "federation.bundle_endpoint.max_connections",
                e.max_connections.as_ref(),
                1..=100_000,
                "connections",
            )
            .unwrap_or(DEFAULT_BUNDLE_ENDPOINT_CONNECTIONS);
        Some(BundleEndpointConfig {
            listen: listen?,
            profile,
            refresh_hint: refresh_hint?,
            max_connections,
        })
    }

    fn relationship(
        &mut self,
        i: usize,
        raw: &Spanned<RawRelationship>,
        own: Option<&TrustDomain>,
    ) -> Option<FederationRelationship> {
        let r = raw.get_ref();
        let key = |k: &str| format!("federation.trust_domains[{i}].{k}");
        let missing = |cx: &mut Self, k: &str, fix: &str| {
            cx.push(
                ConfigErrorKind::Missing,
                raw.span(),
                key(k),
                format!("[[federation.trust_domains]] #{} needs {k}", i + 1),
                fix,
            );
        };
        let trust_domain = match &r.trust_domain {
            None => {
                missing(
                    self,
                    "trust_domain",
                    "add trust_domain = \"partner.example\"",
                );
                None
            }
            Some(t) => match check_trust_domain(t.get_ref()) {
                Ok(td) if Some(&td) == own => {
                    self.invalid(
                        t.span(),
                        key("trust_domain"),
                        format!("{td} is this agent's own trust domain"),
                        "a relationship is with another trust domain",
                    );
                    None
                }
                Ok(td) => Some(td),
                Err((message, fix)) => {
                    self.invalid(t.span(), key("trust_domain"), message, fix);
                    None
                }
            },
        };
        let url = match &r.bundle_endpoint_url {
            None => {
                missing(
                    self,
                    "bundle_endpoint_url",
                    "add bundle_endpoint_url = \"https://HOST:PORT\", the peer's bundle endpoint",
                );
                None
            }
            Some(u) => match spiffed_federation::EndpointUrl::parse(u.get_ref()) {
                Ok(url) => Some(url),
                Err(e) => {
                    self.invalid(
                        u.span(),
                        key("bundle_endpoint_url"),
                        e.to_string(),
                        "write the endpoint's https:// URL, e.g. https://spire.partner.example:8443",
                    );
                    None
                }
            },
        };
        #[derive(Clone, Copy, PartialEq)]
        enum P {
            Spiffe,
            Web,
        }
        let p = self.choice(
            &key("bundle_endpoint_profile"),
            r.bundle_endpoint_profile.as_ref(),
            &[("https_spiffe", P::Spiffe), ("https_web", P::Web)],
            P::Spiffe,
        );
        let profile = match p {
            P::Spiffe => {
                if let Some(v) = &r.root_certificates_path {
                    self.invalid(
                        v.span(),
                        key("root_certificates_path"),
                        "root_certificates_path is for bundle_endpoint_profile = \"https_web\"",
                        "remove it: an https_spiffe endpoint is checked against the trust \
                         domain's bundle",
                    );
                }
                match &r.endpoint_spiffe_id {
                    None => {
                        missing(
                            self,
                            "endpoint_spiffe_id",
                            "add endpoint_spiffe_id, the SPIFFE ID the endpoint presents (a SPIRE \
                             Server's is spiffe://TD/spire/server), or set \
                             bundle_endpoint_profile = \"https_web\"",
                        );
                        None
                    }
                    Some(v) => match SpiffeId::from_str(v.get_ref()) {
                        Ok(id) => Some(RelationshipProfile::HttpsSpiffe {
                            endpoint_spiffe_id: id,
                        }),
                        Err(e) => {
                            self.invalid(
                                v.span(),
                                key("endpoint_spiffe_id"),
                                format!("{:?} is not a SPIFFE ID: {e}", v.get_ref()),
                                "write it as spiffe://TRUST_DOMAIN/PATH",
                            );
                            None
                        }
                    },
                }
            }
            P::Web => {
                if let Some(v) = &r.endpoint_spiffe_id {
                    self.invalid(
                        v.span(),
                        key("endpoint_spiffe_id"),
                        "endpoint_spiffe_id is for bundle_endpoint_profile = \"https_spiffe\"",
                        "remove it: an https_web endpoint is checked by its host name",
                    );
                }
                let roots = r.root_certificates_path.as_ref().map(|v| {
                    self.path(
                        &key("root_certificates_path"),
                        Some(v),
                        "/etc/spiffed/partner-roots.pem",
                        false,
                    )
                });
                Some(RelationshipProfile::HttpsWeb {
                    root_certificates_path: roots,
                })
            }
        };
        let bundle_path = r.bundle_path.as_ref().map(|v| {
            self.path(
                &key("bundle_path"),
                Some(v),
                "/etc/spiffed/partner.json",
                false,
            )
        });
        let bundle_format = self.choice(
            &key("bundle_format"),
            r.bundle_format.as_ref(),
            &[
                ("spiffe", BundleFileFormat::Spiffe),
                ("pem", BundleFileFormat::Pem),
            ],
            BundleFileFormat::Spiffe,
        );
        let refresh_interval = match &r.refresh_interval {
            None => None,
            Some(v) => match humantime::parse_duration(v.get_ref()) {
                Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(24 * 3600) => {
                    Some(d)
                }
                _ => {
                    self.invalid(
                        v.span(),
                        key("refresh_interval"),
                        format!(
                            "refresh_interval {:?} is not a duration from 1s to 1 day",
                            v.get_ref()
                        ),
                        "write e.g. refresh_interval = \"1m\", or leave it out to follow the \
                         peer's refresh hint",
                    );
                    None
                }
            },
        };
        let fetch_timeout = self
            .timeout(&key("fetch_timeout"), r.fetch_timeout.as_ref())
            .unwrap_or(DEFAULT_FETCH_TIMEOUT);
        let max_bundle_bytes = self
            .count(
                &key("max_bundle_bytes"),
                r.max_bundle_bytes.as_ref(),
                1024..=DEFAULT_MAX_BUNDLE_BYTES,
                "bytes",
            )
            .unwrap_or(DEFAULT_MAX_BUNDLE_BYTES);
        Some(FederationRelationship {
            trust_domain: trust_domain?,
            bundle_endpoint_url: url?,
            profile: profile?,
            bundle_path,
            bundle_format,
            refresh_interval,
            fetch_timeout,
            max_bundle_bytes,
        })
    }

    fn x509pop(&mut self, pop: &Spanned<RawX509Pop>) -> Option<NodeAttestation> {
        let p = pop.get_ref();
        let required = |cx: &mut Self, key: &str, raw: &Option<Str>| match raw {
            Some(_) => Some(cx.path(
                &format!("spire_server.x509pop.{key}"),
                raw.as_ref(),
                "/etc/spiffed/node.pem",
                false,
            )),
            None => {
                cx.push(
                    ConfigErrorKind::Missing,
                    pop.span(),
                    format!("spire_server.x509pop.{key}"),
                    format!("[spire_server.x509pop] needs {key}"),
                    "add certificate_path and private_key_path (PEM files of the node \
                     certificate, signed by a CA in the server's x509pop ca_bundle_path, and its \
                     key)",
                );
                None
            }
        };
        let certificate_path = required(self, "certificate_path", &p.certificate_path);
        let private_key_path = required(self, "private_key_path", &p.private_key_path);
        let intermediates_path = p.intermediates_path.as_ref().map(|r| {
            self.path(
                "spire_server.x509pop.intermediates_path",
                Some(r),
                "/etc/spiffed/intermediates.pem",
                false,
            )
        });
        Some(NodeAttestation::X509Pop {
            certificate_path: certificate_path?,
            private_key_path: private_key_path?,
            intermediates_path,
        })
    }

    /// The `[upstream_authority.disk]` table (standalone mode only): the files of an upstream CA
    /// that signs the agent's CAs. The files themselves are read and checked when the CA opens
    /// (and at every rotation), where their errors name them.
    fn upstream_authority(&mut self, raw: &RawConfig) -> Option<UpstreamConfig> {
        let table = raw.upstream_authority.as_ref()?;
        if raw.spire_server.is_some() {
            self.invalid(
                table.span(),
                "upstream_authority",
                "[upstream_authority] has no effect in agent mode: the SPIRE Server is the CA \
                 (configure an UpstreamAuthority plugin on the server instead)",
                "remove [upstream_authority.disk], or remove [spire_server] to run standalone",
            );
            return None;
        }
        let Some(disk) = table.get_ref().disk.as_ref() else {
            self.push(
                ConfigErrorKind::Missing,
                table.span(),
                "upstream_authority.disk",
                "[upstream_authority] names no upstream",
                "add an [upstream_authority.disk] table with cert_file_path and key_file_path \
                 (and bundle_file_path when the certificate is not self-signed)",
            );
            return None;
        };
        let d = disk.get_ref();
        let file = |cx: &mut Self, key: &str, raw: Option<&Str>, required: bool| {
            let full = format!("upstream_authority.disk.{key}");
            let default = keys::example(keys::Table::UpstreamDisk, key)
                .and_then(|e| e.split('"').nth(1))
                .unwrap_or("/etc/spiffed/upstream/ca.crt");
            match raw {
                Some(r) => Some(cx.path(&full, Some(r), default, false)),
                None if required => {
                    cx.push(
                        ConfigErrorKind::Missing,
                        disk.span(),
                        full,
                        format!("[upstream_authority.disk] needs {key}"),
                        "add cert_file_path and key_file_path: the PEM upstream CA certificate \
                         and its PKCS#8 private key",
                    );
                    None
                }
                None => None,
            }
        };
        let cert = file(self, "cert_file_path", d.cert_file_path.as_ref(), true);
        let key = file(self, "key_file_path", d.key_file_path.as_ref(), true);
        let bundle = file(self, "bundle_file_path", d.bundle_file_path.as_ref(), false);
        Some(UpstreamConfig {
            cert_file_path: cert?,
            key_file_path: key?,
            bundle_file_path: bundle,
        })
    }

    /// The `[sds]` table: `None` when `disable_sds_api = true`.
    fn sds(&mut self, raw: Option<&Spanned<RawSds>>) -> Option<SdsConfig> {
        let mut cfg = SdsConfig::default();
        let Some(raw) = raw.map(Spanned::get_ref) else {
            return Some(cfg);
        };
        let names = [
            (
                "default_svid_name",
                &raw.default_svid_name,
                &mut cfg.default_svid_name,
            ),
            (
                "default_bundle_name",
                &raw.default_bundle_name,
                &mut cfg.default_bundle_name,
            ),
            (
                "default_all_bundles_name",
                &raw.default_all_bundles_name,
                &mut cfg.default_all_bundles_name,
            ),
        ];
        let mut seen: Vec<(&str, String)> = Vec::new();
        for (key, value, slot) in names {
            let key_path = format!("sds.{key}");
            if let Some(v) = value {
                let s = v.get_ref();
                let problem = if s.is_empty() {
                    Some("is empty".to_owned())
                } else if s.len() > 256 {
                    Some(format!("is {} bytes long (at most 256)", s.len()))
                } else if s.starts_with("spiffe://") {
                    Some(
                        "starts with spiffe://, which SPIFFE IDs and trust domain IDs use"
                            .to_owned(),
                    )
                } else if s.chars().any(char::is_control) {
                    Some("holds a control character".to_owned())
                } else {
                    None
                };
                if let Some(problem) = problem {
                    let example = keys::example(keys::Table::Sds, key).unwrap_or(key);
                    self.invalid(
                        v.span(),
                        key_path,
                        format!("{key} {s:?} {problem}"),
                        format!("use a plain resource name, e.g. {example}"),
                    );
                    continue;
                }
                if let Some((other, _)) = seen.iter().find(|(_, n)| n == s) {
                    self.invalid(
                        v.span(),
                        key_path,
                        format!("{key} {s:?} is also the name of {other}"),
                        "give each default resource its own name (default, ROOTCA and ALL \
                         unless changed)",
                    );
                    continue;
                }
                slot.clone_from(s);
            }
            seen.push((key, slot.clone()));
        }
        cfg.disable_spiffe_cert_validation = raw
            .disable_spiffe_cert_validation
            .as_ref()
            .is_some_and(|b| *b.get_ref());
        let disabled = raw.disable_sds_api.as_ref().is_some_and(|b| *b.get_ref());
        (!disabled).then_some(cfg)
    }

    fn push(
        &mut self,
        kind: ConfigErrorKind,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.errors.push(ConfigError::at(
            kind, self.file, self.text, &span, key, message, fix,
        ));
    }

    fn invalid(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(ConfigErrorKind::Invalid, span, key, message, fix);
    }

    fn trust_domain(&mut self, raw: Option<Str>) -> Option<TrustDomain> {
        let Some(raw) = raw else {
            self.push(
                ConfigErrorKind::Missing,
                0..0,
                "trust_domain",
                "trust_domain is required",
                "add a line such as trust_domain = \"example.org\" at the top of the file, before \
                 any [[entries]]",
            );
            return None;
        };
        match check_trust_domain(raw.get_ref()) {
            Ok(td) => Some(td),
            Err((message, fix)) => {
                self.invalid(raw.span(), "trust_domain", message, fix);
                None
            }
        }
    }

    /// An absolute path, or `default` when absent.
    fn path(&mut self, key: &str, raw: Option<&Str>, default: &str, socket: bool) -> PathBuf {
        let Some(raw) = raw else {
            return PathBuf::from(default);
        };
        let p = raw.get_ref();
        let problem = if p.is_empty() {
            Some((
                format!("{key} is empty"),
                format!("write an absolute path, e.g. {key} = \"{default}\""),
            ))
        } else if p.contains('\0') {
            Some((
                format!("{key} contains a NUL character"),
                format!("write an absolute path, e.g. {key} = \"{default}\""),
            ))
        } else if !p.starts_with('/') {
            Some((
                format!("{key} {p:?} is not an absolute path"),
                format!(
                    "write the full path starting with /, e.g. {key} = \"{default}\" (relative \
                     paths would depend on the directory the agent starts in)"
                ),
            ))
        } else if socket && p.len() > MAX_SOCKET_PATH_LEN {
            Some((
                format!(
                    "{key} is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH_LEN}",
                    p.len()
                ),
                format!("choose a shorter path, e.g. {key} = \"{default}\""),
            ))
        } else {
            None
        };
        match problem {
            Some((message, fix)) => {
                self.invalid(raw.span(), key, message, fix);
                PathBuf::from(default)
            }
            None => PathBuf::from(p),
        }
    }

    fn socket_mode(&mut self, raw: Option<&Str>) -> u32 {
        let Some(raw) = raw else {
            return DEFAULT_SOCKET_MODE;
        };
        let s = raw.get_ref();
        let octal = (3..=4).contains(&s.len()) && s.bytes().all(|b| (b'0'..=b'7').contains(&b));
        match u32::from_str_radix(s, 8) {
            Ok(mode) if octal && mode <= 0o777 => mode,
            Ok(_) if octal => {
                self.invalid(
                    raw.span(),
                    "socket_mode",
                    format!("socket_mode {s:?} sets setuid, setgid or sticky bits"),
                    "use permission bits only, at most \"0777\"; e.g. \"0777\" (anyone may \
                     connect; attestation decides who gets what) or \"0770\" (owner and group)",
                );
                DEFAULT_SOCKET_MODE
            }
            _ => {
                self.invalid(
                    raw.span(),
                    "socket_mode",
                    format!("socket_mode {s:?} is not an octal file mode"),
                    "write 3 or 4 octal digits (0-7) in quotes, e.g. \"0777\" (anyone may connect; \
                     attestation decides who gets what) or \"0770\" (owner and group)",
                );
                DEFAULT_SOCKET_MODE
            }
        }
    }

    fn admin_uids(&mut self, raw: Option<Spanned<Vec<Spanned<i64>>>>) -> Vec<u32> {
        let Some(raw) = raw else {
            return vec![0];
        };
        let mut uids = Vec::new();
        for (i, v) in raw.into_inner().into_iter().enumerate() {
            let n = *v.get_ref();
            // (uid_t)-1 means "no uid" to the kernel, so it is not a uid either.
            match u32::try_from(n) {
                Ok(uid) if uid != u32::MAX => uids.push(uid),
                _ => self.invalid(
                    v.span(),
                    format!("admin_uids[{i}]"),
                    format!("admin_uids item {n} is not a valid uid"),
                    "uids are whole numbers from 0 to 4294967294, e.g. admin_uids = [0, 1000]; \
                     look one up with `id -u NAME`",
                ),
            }
        }
        uids.sort_unstable();
        uids.dedup();
        uids
    }

    /// A duration; `None` when absent or invalid (the error is recorded).
    fn ttl(&mut self, key: &str, leaf: &str, raw: Option<&Str>) -> Option<Duration> {
        let raw = raw?;
        let s = raw.get_ref();
        let example = "write a number and a unit, e.g. \"90s\", \"10m\", \"1h\" or \"1h30m\"";
        let (message, fix) = match humantime::parse_duration(s) {
            Ok(d) if d.is_zero() => (
                format!("{leaf} must be greater than zero"),
                format!(
                    "{example}; a zero lifetime would issue credentials that are already expired"
                ),
            ),
            Ok(d) if d < Duration::from_secs(1) => (
                format!("{leaf} {s:?} is shorter than one second"),
                "certificates and tokens count time in whole seconds; use at least \"1s\""
                    .to_owned(),
            ),
            Ok(d) if d > MAX_TTL => (
                format!("{leaf} {s:?} is longer than ten years"),
                "use a shorter lifetime; short-lived credentials are the point of rotation"
                    .to_owned(),
            ),
            Ok(d) => return Some(d),
            Err(e) => (
                format!("{leaf} {s:?} is not a duration: {e}"),
                example.to_owned(),
            ),
        };
        self.invalid(raw.span(), key, message, fix);
        None
    }

    /// A whole number within `range`; `None` when absent or invalid (the error is recorded).
    fn count(
        &mut self,
        key: &str,
        raw: Option<&Spanned<i64>>,
        range: std::ops::RangeInclusive<usize>,
        what: &str,
    ) -> Option<usize> {
        let raw = raw?;
        let n = *raw.get_ref();
        match usize::try_from(n) {
            Ok(v) if range.contains(&v) => return Some(v),
            _ => {}
        }
        let default = super::keys::example(super::keys::Table::Top, key).unwrap_or(key);
        self.invalid(
            raw.span(),
            key,
            format!(
                "{key} {n} is out of range: it counts {what}, from {} to {}",
                range.start(),
                range.end()
            ),
            format!("write a whole number in that range, e.g. {default}; leave the key out for the default"),
        );
        None
    }

    /// A duration from 100 ms to one day; `None` when absent or invalid (the error is recorded).
    fn timeout(&mut self, key: &str, raw: Option<&Str>) -> Option<Duration> {
        let raw = raw?;
        let s = raw.get_ref();
        let example = "write a number and a unit, e.g. \"10s\" or \"5m\"";
        let (message, fix) = match humantime::parse_duration(s) {
            Ok(d) if d < Duration::from_millis(100) => (
                format!("{key} {s:?} is shorter than 100 ms"),
                format!("{example}; clients need time to connect and send a request"),
            ),
            Ok(d) if d > Duration::from_secs(24 * 3600) => (
                format!("{key} {s:?} is longer than a day"),
                format!("{example}; a long timeout lets idle connections pile up"),
            ),
            Ok(d) => return Some(d),
            Err(e) => (
                format!("{key} {s:?} is not a duration: {e}"),
                example.to_owned(),
            ),
        };
        self.invalid(raw.span(), key, message, fix);
        None
    }

    /// An SVID lifetime: a duration of at least `min_svid_ttl`.
    fn svid_ttl(&mut self, key: &str, leaf: &str, raw: Option<&Str>) -> Option<Duration> {
        let d = self.ttl(key, leaf, raw)?;
        let min = self.limits.min_svid_ttl;
        if d < min {
            let min = humantime::format_duration(min);
            self.invalid(
                raw.map_or(0..0, Spanned::span),
                key,
                format!(
                    "{leaf} ({}) is shorter than min_svid_ttl ({min})",
                    humantime::format_duration(d)
                ),
                format!(
                    "use at least {leaf} = \"{min}\": SVIDs are re-minted at half their \
                     lifetime, for every entry, so very short ones cost CPU and log lines all \
                     the time (for tests only, lower min_svid_ttl)"
                ),
            );
            return None;
        }
        Some(d)
    }

    /// Whether the duration in `raw` is at most `max`; records an error when it is not.
    fn at_most(&mut self, raw: &Str, key: &str, max: Duration) -> bool {
        match humantime::parse_duration(raw.get_ref()) {
            Ok(d) if d > max => {
                let max = humantime::format_duration(max);
                self.invalid(
                    raw.span(),
                    key,
                    format!("{key} {:?} is longer than {max}", raw.get_ref()),
                    format!("{key} is a floor for lifetimes whose defaults are {max} or more; use at most \"{max}\""),
                );
                false
            }
            _ => true,
        }
    }

    /// `max_selectors_per_entry`, `max_dns_names_per_entry` and `min_svid_ttl`.
    fn limits(&mut self, raw: &RawConfig) -> Limits {
        let mut count = |key: &str, raw: Option<&Spanned<i64>>, default: usize, min: i64| {
            let Some(raw) = raw else {
                return default;
            };
            let n = *raw.get_ref();
            match usize::try_from(n) {
                Ok(v) if (min..=MAX_PER_ENTRY_LIMIT).contains(&n) => v,
                _ => {
                    self.invalid(
                        raw.span(),
                        key,
                        format!("{key} {n} is out of range"),
                        format!(
                            "use a whole number from {min} to {MAX_PER_ENTRY_LIMIT}, e.g. \
                             {key} = {default} (the default)"
                        ),
                    );
                    default
                }
            }
        };
        let max_selectors = count(
            "max_selectors_per_entry",
            raw.max_selectors_per_entry.as_ref(),
            DEFAULT_MAX_SELECTORS_PER_ENTRY,
            1,
        );
        let max_dns_names = count(
            "max_dns_names_per_entry",
            raw.max_dns_names_per_entry.as_ref(),
            DEFAULT_MAX_DNS_NAMES_PER_ENTRY,
            0,
        );
        let min_svid_ttl = self
            .ttl("min_svid_ttl", "min_svid_ttl", raw.min_svid_ttl.as_ref())
            .filter(|_| {
                raw.min_svid_ttl
                    .as_ref()
                    .is_none_or(|r| self.at_most(r, "min_svid_ttl", MAX_MIN_SVID_TTL))
            })
            .unwrap_or(DEFAULT_MIN_SVID_TTL);
        Limits {
            max_selectors,
            max_dns_names,
            min_svid_ttl,
        }
    }

    /// Refuses a socket inside `data_dir`: the data dir is private (0700) and holds the CA key.
    fn sockets_outside_data_dir(
        &mut self,
        raw: &RawConfig,
        data_dir: &Path,
        sockets: [&PathBuf; 2],
    ) {
        for (key, path, raw_path) in [
            ("socket_path", sockets[0], &raw.socket_path),
            ("admin_socket_path", sockets[1], &raw.admin_socket_path),
        ] {
            if !path.starts_with(data_dir) {
                continue;
            }
            let (blame, span) = match (raw_path, &raw.data_dir) {
                (Some(p), _) => (key, p.span()),
                (None, Some(d)) => ("data_dir", d.span()),
                (None, None) => (key, 0..0),
            };
            self.invalid(
                span,
                blame,
                format!(
                    "{key} {} is inside data_dir {}",
                    path.display(),
                    data_dir.display()
                ),
                format!(
                    "keep sockets out of data_dir, which holds the CA key and is private to the \
                     agent: e.g. {key} = \"{}\" and data_dir = \"{DEFAULT_DATA_DIR}\"",
                    if key == "socket_path" {
                        DEFAULT_SOCKET_PATH
                    } else {
                        DEFAULT_ADMIN_SOCKET_PATH
                    }
                ),
            );
        }
    }

    fn choice<T: Copy>(
        &mut self,
        key: &str,
        raw: Option<&Str>,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(raw) = raw else {
            return default;
        };
        let s = raw.get_ref();
        if let Some(&(_, v)) = options.iter().find(|(name, _)| *name == s.as_str()) {
            return v;
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
        let lower = s.to_ascii_lowercase();
        let fix = if options.iter().any(|(n, _)| *n == lower) {
            format!("write it in lowercase: {key} = {lower:?}")
        } else {
            format!("use one of {}", names.join(", "))
        };
        self.invalid(
            raw.span(),
            key,
            format!("{key} {s:?} is not one of {}", names.join(", ")),
            fix,
        );
        default
    }

    fn entries(
        &mut self,
        raw: Vec<Spanned<RawEntry>>,
        td: Option<&TrustDomain>,
        ca_ttl: Option<Duration>,
    ) -> Vec<Entry> {
        // An invalid ca_ttl is reported already; do not blame every entry for it too.
        let limits = EntryLimits {
            max_selectors: self.limits.max_selectors,
            max_dns_names: self.limits.max_dns_names,
            min_svid_ttl: self.limits.min_svid_ttl,
            ca_ttl: ca_ttl.unwrap_or(MAX_TTL),
        };
        let mut entries = Vec::new();
        // (SPIFFE ID, selectors) -> (index, line) of the first entry with them.
        let mut seen: HashMap<(String, Vec<Selector>), (usize, usize)> = HashMap::new();
        let mut ids: HashMap<EntryId, (usize, usize)> = HashMap::new();
        for (i, raw) in raw.into_iter().enumerate() {
            if i >= MAX_ENTRIES {
                self.invalid(
                    raw.span(),
                    format!("entries[{i}]"),
                    format!("too many entries: the file may hold at most {MAX_ENTRIES}"),
                    "keep large sets of entries in the entry store (spiffed entry create)",
                );
                break;
            }
            let span = raw.span();
            let Some((entry, id_span)) = self.entry(i, span, raw.into_inner(), td, limits) else {
                continue;
            };
            let key = (entry.spiffe_id.to_string(), entry.selectors.clone());
            let (line, _) = line_column(self.text, id_span.start);
            if let Some(&(j, first_line)) = seen.get(&key) {
                self.invalid(
                    id_span,
                    format!("entries[{i}].spiffe_id"),
                    format!(
                        "entries[{i}] duplicates entries[{j}] (line {first_line}): same spiffe_id \
                         {:?} and the same selectors",
                        key.0
                    ),
                    "remove one of the two entries, or give them different selectors",
                );
                continue;
            }
            if let Some(&(j, first_line)) = ids.get(&entry.id) {
                // Two different entries whose ids collide in 64 bits: never expected.
                self.invalid(
                    id_span,
                    format!("entries[{i}].spiffe_id"),
                    format!(
                        "entries[{i}] gets the same id {} as entries[{j}] (line {first_line})",
                        entry.id
                    ),
                    "change either entry slightly (e.g. add a selector) and report this",
                );
                continue;
            }
            ids.insert(entry.id.clone(), (i, line));
            seen.insert(key, (i, line));
            entries.push(entry);
        }
        entries
    }

    /// One entry; `None` when it has a problem (recorded). Parses what the file holds, then
    /// checks the entry with `Entry::checked`, the one check every entry source uses, and
    /// points each refusal at its key and line ([`entry_problem`]).
    fn entry(
        &mut self,
        i: usize,
        span: Range<usize>,
        raw: RawEntry,
        td: Option<&TrustDomain>,
        limits: EntryLimits,
    ) -> Option<(Entry, Range<usize>)> {
        let key = |k: &str| format!("entries[{i}].{k}");
        let td_name = td.map_or_else(|| "example.org".to_owned(), ToString::to_string);
        let mut ok = true;

        let spiffe_id = match &raw.spiffe_id {
            None => {
                self.push(
                    ConfigErrorKind::Missing,
                    span.clone(),
                    key("spiffe_id"),
                    format!("entries[{i}] has no spiffe_id"),
                    format!("add spiffe_id = \"spiffe://{td_name}/web\" to this [[entries]] table"),
                );
                None
            }
            Some(s) => match parse_spiffe_id(s.get_ref(), &td_name) {
                Ok(id) => Some(id),
                Err((message, fix)) => {
                    self.invalid(s.span(), key("spiffe_id"), message, fix);
                    None
                }
            },
        };

        let selectors = self.selectors(i, span.clone(), raw.selectors.as_ref());
        // Parsed only (zero, under a second, over ten years); the bounds that depend on the
        // agent (min_svid_ttl, ca_ttl) are Entry::checked's.
        let x509_svid_ttl = raw
            .x509_svid_ttl
            .as_ref()
            .and_then(|t| self.ttl(&key("x509_svid_ttl"), "x509_svid_ttl", Some(t)));
        ok &= raw.x509_svid_ttl.is_none() || x509_svid_ttl.is_some();
        let jwt_svid_ttl = raw
            .jwt_svid_ttl
            .as_ref()
            .and_then(|t| self.ttl(&key("jwt_svid_ttl"), "jwt_svid_ttl", Some(t)));
        ok &= raw.jwt_svid_ttl.is_none() || jwt_svid_ttl.is_some();

        let mut federates_with = Vec::new();
        for (j, name) in raw
            .federates_with
            .iter()
            .flat_map(|l| l.get_ref().iter().enumerate())
        {
            match TrustDomain::new(name.get_ref()) {
                Ok(t) if td.is_some_and(|own| *own == t) => {
                    self.invalid(
                        name.span(),
                        key(&format!("federates_with[{j}]")),
                        format!(
                            "federates_with item {:?} is the agent's own trust domain",
                            name.get_ref()
                        ),
                        "list foreign trust domains only: every workload gets its own trust \
                         domain's bundle anyway",
                    );
                    ok = false;
                }
                Ok(t) => {
                    if !federates_with.contains(&t) {
                        federates_with.push(t);
                    }
                }
                Err(e) => {
                    self.invalid(
                        name.span(),
                        key(&format!("federates_with[{j}]")),
                        format!(
                            "federates_with item {:?} is not a valid trust domain: {e}",
                            name.get_ref()
                        ),
                        "write a trust domain name, e.g. federates_with = [\"partner.example\"]",
                    );
                    ok = false;
                }
            }
        }
        let (Some(spiffe_id), Some(selectors), Some(td), true) = (spiffe_id, selectors, td, ok)
        else {
            return None;
        };
        let id_span = raw.spiffe_id.as_ref().map_or(span.clone(), Spanned::span);
        let entry = Entry {
            id: config_entry_id(&spiffe_id, &selectors),
            spiffe_id,
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            hint: raw.hint.as_ref().map(|h| h.get_ref().clone()),
            dns_names: raw
                .dns_names
                .as_ref()
                .map(|d| d.get_ref().iter().map(|n| n.get_ref().clone()).collect())
                .unwrap_or_default(),
            federates_with,
            admin: false,
            downstream: false,
        };
        let rules = EntryRules {
            trust_domain: td,
            limits,
            selectors: self.selectors,
        };
        match entry.checked(&rules) {
            Ok(entry) => Some((entry, id_span)),
            Err(e) => {
                let (span, key, message, fix) = entry_problem(i, &e, &raw, span, &td_name);
                self.invalid(span, key, message, fix);
                None
            }
        }
    }

    /// Parses, sorts and dedups an entry's selectors; `None` when absent, empty or invalid.
    fn selectors(
        &mut self,
        i: usize,
        entry_span: Range<usize>,
        raw: Option<&StrList>,
    ) -> Option<Vec<Selector>> {
        let Some(raw) = raw else {
            self.push(
                ConfigErrorKind::Missing,
                entry_span,
                format!("entries[{i}].selectors"),
                format!("entries[{i}] has no selectors"),
                "add selectors = [\"unix:uid:1000\"] (all must match the caller) to this \
                 [[entries]] table",
            );
            return None;
        };
        // Empty and too many: Entry::checked refuses them (NoSelectors, TooManySelectors).
        let mut out = Vec::new();
        let mut ok = true;
        for (j, s) in raw.get_ref().iter().enumerate() {
            match Selector::from_str(s.get_ref()) {
                Ok(sel) => out.push(sel),
                Err(e) => {
                    let (message, fix) = selector_problem(&e);
                    self.invalid(
                        s.span(),
                        format!("entries[{i}].selectors[{j}]"),
                        message,
                        fix,
                    );
                    ok = false;
                }
            }
        }
        out.sort();
        out.dedup();
        ok.then_some(out)
    }
}

/// Checks a trust domain name; on failure, the message and the fix.
fn check_trust_domain(name: &str) -> Result<TrustDomain, (String, String)> {
    const CHARS: &str = "lowercase letters, digits, '.', '-' and '_'";
    if name.is_empty() {
        return Err((
            "trust_domain is empty".to_owned(),
            "write the trust domain name, e.g. trust_domain = \"example.org\"".to_owned(),
        ));
    }
    if name
        .get(..9)
        .is_some_and(|p| p.eq_ignore_ascii_case("spiffe://"))
    {
        let bare = name
            .get(9..)
            .and_then(|r| r.split('/').next())
            .filter(|b| !b.is_empty())
            .unwrap_or("example.org")
            .to_ascii_lowercase();
        return Err((
            format!("trust_domain {name:?} is a SPIFFE ID, not a trust domain name"),
            format!(
                "write the trust domain name without the spiffe:// prefix: trust_domain = \"{bare}\""
            ),
        ));
    }
    if name.contains(":/") {
        return Err((
            format!("trust_domain {name:?} is a URI, not a trust domain name"),
            format!("write a bare name such as \"example.org\" ({CHARS}; no scheme, port or path)"),
        ));
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err((
            format!(
                "trust_domain is {} bytes long; the limit is {MAX_TRUST_DOMAIN_LEN}",
                name.len()
            ),
            "use a shorter name".to_owned(),
        ));
    }
    let td = TrustDomain::new(name).map_err(|e| {
        (
            format!("trust_domain {name:?} is not a valid trust domain name: {e}"),
            format!("use only {CHARS}, e.g. \"example.org\" (no port, user or path)"),
        )
    })?;
    if td.as_str() != name {
        return Err((
            format!("trust_domain {name:?} has uppercase letters"),
            format!(
                "write it in lowercase: trust_domain = \"{td}\" (SPIFFE trust domains are \
                 lowercase, and SPIRE refuses uppercase)"
            ),
        ));
    }
    if name.split('.').any(str::is_empty) {
        let what = if name.starts_with('.') {
            "a leading dot"
        } else if name.ends_with('.') {
            "a trailing dot"
        } else {
            "an empty label (\"..\")"
        };
        let cleaned: Vec<&str> = name.split('.').filter(|l| !l.is_empty()).collect();
        let suggestion = if cleaned.is_empty() {
            "example.org".to_owned()
        } else {
            cleaned.join(".")
        };
        return Err((
            format!("trust_domain {name:?} has {what}"),
            format!(
                "write it as \"{suggestion}\": Go's X.509 parser (go-spiffe, SPIRE) rejects \
                 certificates whose SPIFFE ID host has an empty label or a leading or trailing \
                 dot, so Go workloads could not read their SVIDs"
            ),
        ));
    }
    Ok(td)
}

/// Parses an entry's SPIFFE ID; on failure, the message and the fix.
fn parse_spiffe_id(s: &str, td: &str) -> Result<SpiffeId, (String, String)> {
    let id = SpiffeId::new(s).map_err(|e| {
        let fix = match e {
            SpiffeIdError::Empty => {
                format!("write spiffe://TRUST_DOMAIN/PATH, e.g. \"spiffe://{td}/web\"")
            }
            SpiffeIdError::WrongScheme => {
                format!("start it with spiffe://, e.g. \"spiffe://{td}/web\"")
            }
            SpiffeIdError::MissingTrustDomain => {
                format!("put the trust domain after spiffe://, e.g. \"spiffe://{td}/web\"")
            }
            SpiffeIdError::BadTrustDomainChar => format!(
                "the trust domain part takes only lowercase letters, digits, '.', '-' and '_' \
                 (no port or user), e.g. \"spiffe://{td}/web\""
            ),
            SpiffeIdError::BadPathSegmentChar => "path segments take only letters, digits, '.', \
                 '-' and '_' (no spaces, percent-encoding, query or fragment)"
                .to_owned(),
            SpiffeIdError::EmptySegment => "remove the doubled '/' from the path".to_owned(),
            SpiffeIdError::DotSegment => {
                "remove the '.' and '..' segments from the path".to_owned()
            }
            SpiffeIdError::TrailingSlash => "remove the trailing '/'".to_owned(),
            _ => format!(
                "write spiffe://TRUST_DOMAIN/PATH of at most 2048 bytes, e.g. \"spiffe://{td}/web\""
            ),
        };
        (
            format!("spiffe_id {s:?} is not a valid SPIFFE ID: {e}"),
            fix,
        )
    })?;
    let canonical = id.to_string();
    if canonical != s {
        return Err((
            format!("spiffe_id {s:?} has uppercase letters in its scheme or trust domain"),
            format!(
                "write it as \"{canonical}\" (the scheme and trust domain are lowercase; SPIRE \
                 refuses uppercase)"
            ),
        ));
    }
    Ok(id)
}

/// The message and fix for a selector that does not parse.
fn selector_problem(e: &SelectorError) -> (String, String) {
    const KEYS: &str = "unix:uid, unix:user, unix:gid, unix:group, unix:supplementary_gid, \
                        unix:supplementary_group, unix:path, unix:sha256 and systemd:id";
    match e {
        SelectorError::Shape(s) => (
            format!("selectors item {s:?} is not of the form TYPE:KEY:VALUE"),
            "write e.g. \"unix:uid:1000\" or \"unix:path:/usr/bin/web\"".to_owned(),
        ),
        SelectorError::UnknownType { selector, known } => {
            let kind = selector.split(':').next().unwrap_or_default();
            (
                format!("selectors item {selector:?} has an unknown type {kind:?}"),
                format!("this agent derives selectors of type {known} only: {KEYS}"),
            )
        }
        SelectorError::UnknownKey { selector, known } => (
            format!("selectors item {selector:?} has an unknown key"),
            format!("known keys are {known}"),
        ),
        SelectorError::Value { selector, why } => (
            format!("selectors item {selector:?} has an invalid value"),
            (*why).to_owned(),
        ),
        other => (other.to_string(), format!("known keys are {KEYS}")),
    }
}

/// Where an [`EntryError`] points, under which key, with what message and fix.
fn entry_problem(
    i: usize,
    e: &EntryError,
    raw: &RawEntry,
    entry_span: Range<usize>,
    td: &str,
) -> (Range<usize>, String, String, String) {
    let span_of = |s: &Option<Str>| s.as_ref().map_or(entry_span.clone(), Spanned::span);
    let key = |k: &str| format!("entries[{i}].{k}");
    match e {
        EntryError::OutsideTrustDomain { id, td } => (
            span_of(&raw.spiffe_id),
            key("spiffe_id"),
            format!("spiffe_id {id:?} is outside the trust domain {td:?}"),
            format!("use an ID of the form spiffe://{td}/..."),
        ),
        EntryError::NoPath(id) => (
            span_of(&raw.spiffe_id),
            key("spiffe_id"),
            format!("spiffe_id {id:?} has no path; workload IDs need one"),
            format!("add a path naming the workload, e.g. \"{id}/web\""),
        ),
        EntryError::IdTooLong(n) => (
            span_of(&raw.spiffe_id),
            key("spiffe_id"),
            format!("spiffe_id is {n} bytes long; the limit is 2048"),
            "shorten the path".to_owned(),
        ),
        EntryError::NoSelectors => (
            raw.selectors.as_ref().map_or(entry_span, Spanned::span),
            key("selectors"),
            "selectors is empty: the entry would match every caller".to_owned(),
            "add at least one selector, e.g. selectors = [\"unix:uid:1000\"]".to_owned(),
        ),
        EntryError::HintTooLong(n) => (
            span_of(&raw.hint),
            key("hint"),
            format!("hint is {n} bytes long; the limit is {MAX_HINT_LEN}"),
            format!(
                "shorten the hint to at most {MAX_HINT_LEN} bytes (the Workload API's limit); a \
                 short label such as \"internal\" is enough"
            ),
        ),
        EntryError::HintControl(c) => (
            span_of(&raw.hint),
            key("hint"),
            format!("hint contains the control character {c:?}"),
            "use printable text without newlines, tabs or escapes, e.g. hint = \"internal\""
                .to_owned(),
        ),
        EntryError::ZeroTtl(which) => {
            let raw_ttl = if *which == "jwt_svid_ttl" {
                &raw.jwt_svid_ttl
            } else {
                &raw.x509_svid_ttl
            };
            (
                span_of(raw_ttl),
                key(which),
                format!("{which} must be greater than zero"),
                format!("write e.g. {which} = \"10m\""),
            )
        }
        EntryError::DnsName(name) => {
            let found = raw.dns_names.as_ref().and_then(|list| {
                list.get_ref()
                    .iter()
                    .enumerate()
                    .find(|(_, n)| n.get_ref() == name)
                    .map(|(j, n)| (n.span(), key(&format!("dns_names[{j}]"))))
            });
            let (span, k) = found.unwrap_or_else(|| {
                (
                    raw.dns_names.as_ref().map_or(entry_span, Spanned::span),
                    key("dns_names"),
                )
            });
            (
                span,
                k,
                format!("dns_names item {name:?} is not a valid DNS name"),
                "use letters, digits, '-' and '.', labels of 1-63 bytes, optionally starting with \
                 '*.', e.g. \"web.internal\""
                    .to_owned(),
            )
        }
        EntryError::TooManySelectors { count, max } => (
            raw.selectors.as_ref().map_or(entry_span, Spanned::span),
            key("selectors"),
            format!("selectors has {count} items; the limit is {max}"),
            format!(
                "an entry needs a few selectors (all must match the caller); keep at most \
                 {max}, or raise max_selectors_per_entry"
            ),
        ),
        EntryError::TooManyDnsNames { count, max } => (
            raw.dns_names.as_ref().map_or(entry_span, Spanned::span),
            key("dns_names"),
            format!("dns_names has {count} items; the limit is {max}"),
            format!(
                "keep at most {max} DNS names per entry (each goes into every X.509-SVID of \
                 the entry), or raise max_dns_names_per_entry"
            ),
        ),
        EntryError::TtlTooShort { field, min } => {
            let raw_ttl = ttl_of(raw, field);
            let min = humantime::format_duration(*min);
            (
                span_of(raw_ttl),
                key(field),
                format!(
                    "{field} ({}) is shorter than min_svid_ttl ({min})",
                    shown_ttl(raw_ttl)
                ),
                format!(
                    "use at least {field} = \"{min}\": SVIDs are re-minted at half their \
                     lifetime, for every entry, so very short ones cost CPU and log lines all \
                     the time (for tests only, lower min_svid_ttl)"
                ),
            )
        }
        EntryError::TtlTooLong { field, max, .. } => {
            let raw_ttl = ttl_of(raw, field);
            let fix = if *field == "jwt_svid_ttl" {
                "a JWT-SVID never outlives its signing key, which lives as long as the CA: raise \
                 ca_ttl or lower this entry's jwt_svid_ttl"
            } else {
                "an SVID never outlives its CA: raise ca_ttl or lower this entry's x509_svid_ttl"
            };
            (
                span_of(raw_ttl),
                key(field),
                format!(
                    "{field} ({}) is longer than ca_ttl ({})",
                    shown_ttl(raw_ttl),
                    humantime::format_duration(*max)
                ),
                fix.to_owned(),
            )
        }
        EntryError::Selector(se) => {
            // Point at the item as written: the entry's own selectors are sorted.
            let found = e.item().and_then(|item| {
                raw.selectors.as_ref().and_then(|list| {
                    list.get_ref()
                        .iter()
                        .enumerate()
                        .find(|(_, s)| s.get_ref() == item)
                        .map(|(j, s)| (s.span(), key(&format!("selectors[{j}]"))))
                })
            });
            let (span, k) = found.unwrap_or_else(|| {
                (
                    raw.selectors.as_ref().map_or(entry_span, Spanned::span),
                    key("selectors"),
                )
            });
            let (message, fix) = selector_problem(se);
            (span, k, message, fix)
        }
        other => (
            span_of(&raw.spiffe_id),
            key("spiffe_id"),
            other.to_string(),
            format!("check this entry against the rules for spiffe://{td}/... entries"),
        ),
    }
}

/// A TTL as the messages show it (`1h 30m`), from its raw value.
fn shown_ttl(raw: &Option<Str>) -> String {
    raw.as_ref()
        .and_then(|t| humantime::parse_duration(t.get_ref()).ok())
        .map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_default()
}

/// The raw value of an entry's `x509_svid_ttl` or `jwt_svid_ttl`.
fn ttl_of<'r>(raw: &'r RawEntry, field: &str) -> &'r Option<Str> {
    if field == "jwt_svid_ttl" {
        &raw.jwt_svid_ttl
    } else {
        &raw.x509_svid_ttl
    }
}
