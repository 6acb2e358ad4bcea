//! The keys each table of the configuration file accepts, with an example of each, for error
//! messages. Must agree with the raw structs in `raw.rs` (a test checks it).

/// A table of the configuration file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Table {
    /// The top level.
    Top,
    /// One `[[entries]]` table.
    Entry,
    /// The `[sds]` table.
    Sds,
    /// The `[upstream_authority.disk]` table.
    UpstreamDisk,
    /// The `[federation]` table.
    Federation,
    /// The `[federation.bundle_endpoint]` table.
    BundleEndpoint,
    /// One `[[federation.trust_domains]]` table.
    Relationship,
}

const TOP: &[(&str, &str)] = &[
    ("trust_domain", "trust_domain = \"example.org\""),
    (
        "socket_path",
        "socket_path = \"/run/spiffed/public/api.sock\"",
    ),
    (
        "socket_mode",
        "socket_mode = \"0777\" (a quoted octal string)",
    ),
    (
        "admin_socket_path",
        "admin_socket_path = \"/run/spiffed/private/admin.sock\"",
    ),
    ("admin_uids", "admin_uids = [0, 1000] (numeric uids)"),
    ("data_dir", "data_dir = \"/var/lib/spiffed\""),
    ("x509_svid_ttl", "x509_svid_ttl = \"1h\""),
    ("jwt_svid_ttl", "jwt_svid_ttl = \"5m\""),
    ("ca_ttl", "ca_ttl = \"24h\""),
    ("log_level", "log_level = \"info\""),
    ("log_format", "log_format = \"text\" (or \"json\")"),
    ("synthetic_ids", "synthetic_ids = false"),
    (
        "entries",
        "[[entries]] (double brackets, one table per entry) followed by spiffe_id = \"spiffe://example.org/web\" and selectors = [\"unix:uid:1000\"]",
    ),
    ("max_connections_per_uid", "max_connections_per_uid = 256"),
    (
        "max_streams_per_connection",
        "max_streams_per_connection = 100",
    ),
    ("max_streams_per_uid", "max_streams_per_uid = 16384"),
    ("handshake_timeout", "handshake_timeout = \"10s\""),
    ("idle_timeout", "idle_timeout = \"5m\""),
    ("fd_reserve", "fd_reserve = 64"),
    ("max_jwt_audiences", "max_jwt_audiences = 16"),
    (
        "max_jwt_audience_length",
        "max_jwt_audience_length = 1024 (bytes)",
    ),
    (
        "max_jwt_token_length",
        "max_jwt_token_length = 32768 (bytes)",
    ),
    ("jwt_cache_bytes", "jwt_cache_bytes = 4194304"),
    (
        "jwt_cache_entries_per_identity",
        "jwt_cache_entries_per_identity = 64",
    ),
    ("max_logged_string_length", "max_logged_string_length = 128"),
    ("premint_entries", "premint_entries = 1000"),
    ("worker_threads", "worker_threads = 1"),
    (
        "denial_log_lines_per_second",
        "denial_log_lines_per_second = 10",
    ),
    ("max_selectors_per_entry", "max_selectors_per_entry = 64"),
    ("max_dns_names_per_entry", "max_dns_names_per_entry = 64"),
    ("min_svid_ttl", "min_svid_ttl = \"10s\""),
    ("min_ca_ttl", "min_ca_ttl = \"1m\""),
];

const ENTRY: &[(&str, &str)] = &[
    ("spiffe_id", "spiffe_id = \"spiffe://example.org/web\""),
    (
        "selectors",
        "selectors = [\"unix:uid:1000\", \"unix:path:/usr/bin/web\"]",
    ),
    ("x509_svid_ttl", "x509_svid_ttl = \"10m\""),
    ("jwt_svid_ttl", "jwt_svid_ttl = \"5m\""),
    ("hint", "hint = \"internal\""),
    ("dns_names", "dns_names = [\"web.internal\"]"),
    ("federates_with", "federates_with = [\"partner.example\"]"),
];

const FEDERATION: &[(&str, &str)] = &[
    ("federate_all", "federate_all = false"),
    (
        "bundle_endpoint",
        "[federation.bundle_endpoint] followed by listen = \"0.0.0.0:8443\"",
    ),
    (
        "trust_domains",
        "[[federation.trust_domains]] (one table per foreign trust domain) followed by trust_domain = \"partner.example\"",
    ),
];

const BUNDLE_ENDPOINT: &[(&str, &str)] = &[
    ("listen", "listen = \"0.0.0.0:8443\""),
    ("profile", "profile = \"https_spiffe\""),
    (
        "endpoint_spiffe_id",
        "endpoint_spiffe_id = \"spiffe://example.org/spiffed/bundle-endpoint\"",
    ),
    (
        "certificate_path",
        "certificate_path = \"/etc/spiffed/bundle-endpoint.pem\"",
    ),
    (
        "private_key_path",
        "private_key_path = \"/etc/spiffed/bundle-endpoint.key\"",
    ),
    ("refresh_hint", "refresh_hint = \"5m\""),
    ("max_connections", "max_connections = 64"),
];

const RELATIONSHIP: &[(&str, &str)] = &[
    ("trust_domain", "trust_domain = \"partner.example\""),
    (
        "bundle_endpoint_url",
        "bundle_endpoint_url = \"https://spire.partner.example:8443\"",
    ),
    (
        "bundle_endpoint_profile",
        "bundle_endpoint_profile = \"https_spiffe\"",
    ),
    (
        "endpoint_spiffe_id",
        "endpoint_spiffe_id = \"spiffe://partner.example/spire/server\"",
    ),
    ("bundle_path", "bundle_path = \"/etc/spiffed/partner.json\""),
    ("bundle_format", "bundle_format = \"spiffe\""),
    (
        "root_certificates_path",
        "root_certificates_path = \"/etc/spiffed/partner-roots.pem\"",
    ),
    ("refresh_interval", "refresh_interval = \"1m\""),
    ("fetch_timeout", "fetch_timeout = \"30s\""),
    ("max_bundle_bytes", "max_bundle_bytes = 1048576"),
];

const SDS: &[(&str, &str)] = &[
    ("default_svid_name", "default_svid_name = \"default\""),
    ("default_bundle_name", "default_bundle_name = \"ROOTCA\""),
    (
        "default_all_bundles_name",
        "default_all_bundles_name = \"ALL\"",
    ),
    (
        "disable_spiffe_cert_validation",
        "disable_spiffe_cert_validation = false",
    ),
    ("disable_sds_api", "disable_sds_api = false"),
];

const UPSTREAM_DISK: &[(&str, &str)] = &[
    (
        "cert_file_path",
        "cert_file_path = \"/etc/spiffed/upstream/ca.crt\"",
    ),
    (
        "key_file_path",
        "key_file_path = \"/etc/spiffed/upstream/ca.key\"",
    ),
    (
        "bundle_file_path",
        "bundle_file_path = \"/etc/spiffed/upstream/root.crt\"",
    ),
];

fn table(t: Table) -> &'static [(&'static str, &'static str)] {
    match t {
        Table::Top => TOP,
        Table::Entry => ENTRY,
        Table::Sds => SDS,
        Table::UpstreamDisk => UPSTREAM_DISK,
        Table::Federation => FEDERATION,
        Table::BundleEndpoint => BUNDLE_ENDPOINT,
        Table::Relationship => RELATIONSHIP,
    }
}

/// The keys of table `t`, in documentation order.
pub(crate) fn names(t: Table) -> Vec<&'static str> {
    table(t).iter().map(|&(k, _)| k).collect()
}

/// An example line for `key` in table `t`.
pub(crate) fn example(t: Table, key: &str) -> Option<&'static str> {
    table(t).iter().find(|&&(k, _)| k == key).map(|&(_, e)| e)
}
