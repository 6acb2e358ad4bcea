//! The file as written: every key optional and spanned, unknown keys refused. `validate.rs`
//! turns it into a [`Config`](super::Config).

use serde::Deserialize;
use toml::Spanned;

/// A spanned string value.
pub(crate) type Str = Spanned<String>;
/// A spanned list of spanned strings.
pub(crate) type StrList = Spanned<Vec<Spanned<String>>>;

/// The top-level table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) trust_domain: Option<Str>,
    pub(crate) socket_path: Option<Str>,
    pub(crate) socket_mode: Option<Str>,
    pub(crate) admin_socket_path: Option<Str>,
    /// Integers are checked by hand, so that `-1` or `4294967296` get a fix, not a serde message.
    pub(crate) admin_uids: Option<Spanned<Vec<Spanned<i64>>>>,
    pub(crate) data_dir: Option<Str>,
    pub(crate) x509_svid_ttl: Option<Str>,
    pub(crate) jwt_svid_ttl: Option<Str>,
    pub(crate) ca_ttl: Option<Str>,
    pub(crate) log_level: Option<Str>,
    pub(crate) log_format: Option<Str>,
    pub(crate) synthetic_ids: Option<Spanned<bool>>,
    #[serde(default)]
    pub(crate) entries: Vec<Spanned<RawEntry>>,
    // Connection and stream limits of the Workload API socket (integers checked by hand).
    pub(crate) max_connections_per_uid: Option<Spanned<i64>>,
    pub(crate) max_streams_per_connection: Option<Spanned<i64>>,
    pub(crate) max_streams_per_uid: Option<Spanned<i64>>,
    pub(crate) handshake_timeout: Option<Str>,
    pub(crate) idle_timeout: Option<Str>,
    pub(crate) fd_reserve: Option<Spanned<i64>>,
    // Request, JWT cache and log bounds (integers are checked by hand, as admin_uids).
    pub(crate) max_jwt_audiences: Option<Spanned<i64>>,
    pub(crate) max_jwt_audience_length: Option<Spanned<i64>>,
    pub(crate) max_jwt_token_length: Option<Spanned<i64>>,
    pub(crate) jwt_cache_bytes: Option<Spanned<i64>>,
    pub(crate) jwt_cache_entries_per_identity: Option<Spanned<i64>>,
    pub(crate) max_logged_string_length: Option<Spanned<i64>>,
    pub(crate) denial_log_lines_per_second: Option<Spanned<i64>>,
    pub(crate) premint_entries: Option<Spanned<i64>>,
    pub(crate) worker_threads: Option<Spanned<i64>>,
    // Bounds on entries and lifetimes (issue 10, item 14).
    pub(crate) max_selectors_per_entry: Option<Spanned<i64>>,
    pub(crate) max_dns_names_per_entry: Option<Spanned<i64>>,
    pub(crate) min_svid_ttl: Option<Str>,
    pub(crate) min_ca_ttl: Option<Str>,
    /// Agent mode: the SPIRE Server this agent is a node agent of.
    pub(crate) spire_server: Option<Spanned<RawSpireServer>>,
    /// Envoy SDS on the Workload API socket.
    pub(crate) sds: Option<Spanned<RawSds>>,
    /// The Prometheus endpoint (off when absent).
    pub(crate) metrics: Option<Spanned<RawListen>>,
    /// The HTTP health endpoints (off when absent).
    pub(crate) health: Option<Spanned<RawListen>>,
    /// Standalone mode: an upstream CA that signs the agent's CAs.
    pub(crate) upstream_authority: Option<Spanned<RawUpstreamAuthority>>,
    /// Federation with other trust domains.
    pub(crate) federation: Option<Spanned<RawFederation>>,
}

/// The `[upstream_authority]` table: one kind of upstream, as SPIRE's UpstreamAuthority plugins.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamAuthority {
    pub(crate) disk: Option<Spanned<RawUpstreamDisk>>,
}

/// The `[upstream_authority.disk]` table (SPIRE's `disk` UpstreamAuthority names).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamDisk {
    pub(crate) cert_file_path: Option<Str>,
    pub(crate) key_file_path: Option<Str>,
    pub(crate) bundle_file_path: Option<Str>,
}

/// The `[federation]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFederation {
    pub(crate) federate_all: Option<Spanned<bool>>,
    /// The own bundle served to peers.
    pub(crate) bundle_endpoint: Option<Spanned<RawBundleEndpoint>>,
    /// Relationships: foreign trust domains whose bundles are fetched from their endpoints.
    #[serde(default)]
    pub(crate) trust_domains: Vec<Spanned<RawRelationship>>,
}

/// The `[federation.bundle_endpoint]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBundleEndpoint {
    pub(crate) listen: Option<Str>,
    pub(crate) profile: Option<Str>,
    pub(crate) endpoint_spiffe_id: Option<Str>,
    pub(crate) certificate_path: Option<Str>,
    pub(crate) private_key_path: Option<Str>,
    pub(crate) refresh_hint: Option<Str>,
    pub(crate) max_connections: Option<Spanned<i64>>,
}

/// One `[[federation.trust_domains]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRelationship {
    pub(crate) trust_domain: Option<Str>,
    pub(crate) bundle_endpoint_url: Option<Str>,
    pub(crate) bundle_endpoint_profile: Option<Str>,
    pub(crate) endpoint_spiffe_id: Option<Str>,
    pub(crate) bundle_path: Option<Str>,
    pub(crate) bundle_format: Option<Str>,
    pub(crate) root_certificates_path: Option<Str>,
    pub(crate) refresh_interval: Option<Str>,
    pub(crate) fetch_timeout: Option<Str>,
    pub(crate) max_bundle_bytes: Option<Spanned<i64>>,
}

/// The `[sds]` table (Envoy SDS; spire-agent's names).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSds {
    pub(crate) default_svid_name: Option<Str>,
    pub(crate) default_bundle_name: Option<Str>,
    pub(crate) default_all_bundles_name: Option<Str>,
    pub(crate) disable_spiffe_cert_validation: Option<Spanned<bool>>,
    pub(crate) disable_sds_api: Option<Spanned<bool>>,
}

/// The `[metrics]` and `[health]` tables: where an HTTP endpoint listens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListen {
    pub(crate) listen: Option<Str>,
}

/// The `[spire_server]` table (agent mode).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpireServer {
    pub(crate) address: Option<Str>,
    pub(crate) trust_bundle_path: Option<Str>,
    pub(crate) trust_bundle_format: Option<Str>,
    pub(crate) insecure_bootstrap: Option<Spanned<bool>>,
    pub(crate) join_token: Option<Str>,
    pub(crate) x509pop: Option<Spanned<RawX509Pop>>,
    pub(crate) sync_interval: Option<Str>,
}

/// The `[spire_server.x509pop]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawX509Pop {
    pub(crate) certificate_path: Option<Str>,
    pub(crate) private_key_path: Option<Str>,
    pub(crate) intermediates_path: Option<Str>,
}

/// One `[[entries]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEntry {
    pub(crate) spiffe_id: Option<Str>,
    pub(crate) selectors: Option<StrList>,
    pub(crate) x509_svid_ttl: Option<Str>,
    pub(crate) jwt_svid_ttl: Option<Str>,
    pub(crate) hint: Option<Str>,
    pub(crate) dns_names: Option<StrList>,
    pub(crate) federates_with: Option<StrList>,
}
