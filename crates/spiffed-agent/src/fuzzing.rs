//! Entry points for the fuzz targets in `fuzz/`: the admin service's request validation, which
//! is private to the agent otherwise. Not a stable API.

use std::time::Duration;

use spiffed_core::{Entry, TrustDomain};
use spiffed_entries::store::EntrySpec;
use spiffed_proto::admin as pb;

/// What `CreateEntries` and `UpdateEntry` do with one submitted spec: the validated spec, or
/// the `(field, message)` of the refusal the caller would see.
pub fn validate_admin_spec(
    spec: &pb::EntrySpec,
    td: &TrustDomain,
    ca_ttl: Duration,
) -> Result<EntrySpec, (String, String)> {
    // The limits of a config file that leaves them at their defaults.
    let rules = spiffed_entries::Rules {
        trust_domain: td.clone(),
        limits: spiffed_core::EntryLimits {
            max_selectors: crate::config::DEFAULT_MAX_SELECTORS_PER_ENTRY,
            max_dns_names: crate::config::DEFAULT_MAX_DNS_NAMES_PER_ENTRY,
            min_svid_ttl: crate::config::DEFAULT_MIN_SVID_TTL,
            ca_ttl,
        },
        selectors: std::sync::Arc::new(spiffed_attest::builtin()),
    };
    crate::admin::validate_spec(spec, &rules).map_err(|e| (e.field, e.message))
}

/// The spec that `ListEntries` and `GetEntry` report for `entry`.
pub fn admin_spec_of(entry: &Entry) -> pb::EntrySpec {
    crate::admin::spec_of(entry, false)
}
