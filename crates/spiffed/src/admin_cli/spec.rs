//! Entry specs from the command line and from `--from-file`: TTL parsing, building a spec for
//! `entry create`, and overlaying `entry update`'s flags on the current spec.
//!
//! Everything here is pure, so the rules (which flag replaces what, what "0" means) are unit
//! tested without an agent.

use serde::Deserialize;
use serde::de::IgnoredAny;
use spiffed_proto::admin::EntrySpec;

/// Parses a TTL flag (`90s`, `10m`, `1h`, `0s` for the agent default) into whole seconds.
pub(crate) fn parse_ttl(text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{e} (use a duration such as 90s, 10m or 1h)"))?;
    if duration.subsec_nanos() != 0 {
        return Err(format!(
            "{text} is not a whole number of seconds (use a duration such as 90s, 10m or 1h)"
        ));
    }
    Ok(duration.as_secs())
}

/// The spec fields an `entry create` or `entry update` command line gives. `None` (or, for the
/// lists, `None`) means "not given".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SpecChanges {
    /// `--spiffe-id`.
    pub(crate) spiffe_id: Option<String>,
    /// `--selector`, repeated: replaces the whole set.
    pub(crate) selectors: Option<Vec<String>>,
    /// `--x509-svid-ttl`, in seconds; 0 is the agent default.
    pub(crate) x509_svid_ttl_seconds: Option<u64>,
    /// `--jwt-svid-ttl`, in seconds; 0 is the agent default.
    pub(crate) jwt_svid_ttl_seconds: Option<u64>,
    /// `--hint`; the empty string removes the hint.
    pub(crate) hint: Option<String>,
    /// `--dns-name`, repeated (or `--clear-dns-names`: an empty list): replaces the whole list.
    pub(crate) dns_names: Option<Vec<String>>,
    /// `--federates-with`, repeated (or `--clear-federates-with`: an empty list): replaces the
    /// whole list.
    pub(crate) federates_with: Option<Vec<String>>,
}

impl SpecChanges {
    /// Builds the changes from flag values; empty repeated flags count as not given, unless
    /// `clear_dns_names`.
    pub(crate) fn from_flags(
        spiffe_id: Option<String>,
        selectors: Vec<String>,
        x509_svid_ttl_seconds: Option<u64>,
        jwt_svid_ttl_seconds: Option<u64>,
        hint: Option<String>,
        dns_names: Vec<String>,
        clear_dns_names: bool,
    ) -> Self {
        Self {
            spiffe_id,
            selectors: (!selectors.is_empty()).then_some(selectors),
            x509_svid_ttl_seconds,
            jwt_svid_ttl_seconds,
            hint,
            dns_names: (clear_dns_names || !dns_names.is_empty()).then_some(dns_names),
            federates_with: None,
        }
    }

    /// The same changes with `--federates-with` (replacing the list when given, or emptying
    /// it with `clear`).
    pub(crate) fn with_federates_with(mut self, federates_with: Vec<String>, clear: bool) -> Self {
        self.federates_with = (clear || !federates_with.is_empty()).then_some(federates_with);
        self
    }

    /// Whether no field is given.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The spec `entry update` sends: `current` with every given field replaced. Fields not given
/// keep their current values; `admin` (reserved) is kept as it is.
pub(crate) fn overlay(current: &EntrySpec, changes: &SpecChanges) -> EntrySpec {
    let mut spec = current.clone();
    if let Some(id) = &changes.spiffe_id {
        spec.spiffe_id.clone_from(id);
    }
    if let Some(selectors) = &changes.selectors {
        spec.selectors.clone_from(selectors);
    }
    if let Some(ttl) = changes.x509_svid_ttl_seconds {
        spec.x509_svid_ttl_seconds = ttl;
    }
    if let Some(ttl) = changes.jwt_svid_ttl_seconds {
        spec.jwt_svid_ttl_seconds = ttl;
    }
    if let Some(hint) = &changes.hint {
        spec.hint.clone_from(hint);
    }
    if let Some(names) = &changes.dns_names {
        spec.dns_names.clone_from(names);
    }
    if let Some(tds) = &changes.federates_with {
        spec.federates_with.clone_from(tds);
    }
    spec
}

/// One spec in a `--from-file` JSON array. The field names are those of `entry list --output
/// json`, whose other fields (`id`, `source`, `revision`, `created_at`, `updated_at`) are
/// accepted and ignored, so that listed entries can be fed back; any other field is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    /// The SPIFFE ID.
    spiffe_id: String,
    /// The selectors.
    #[serde(default)]
    selectors: Vec<String>,
    /// The X.509-SVID TTL; null or 0 for the agent default.
    #[serde(default)]
    x509_svid_ttl_seconds: Option<u64>,
    /// The JWT-SVID TTL; null or 0 for the agent default.
    #[serde(default)]
    jwt_svid_ttl_seconds: Option<u64>,
    /// The hint; null or "" for none.
    #[serde(default)]
    hint: Option<String>,
    /// DNS names for the X.509 SAN.
    #[serde(default)]
    dns_names: Vec<String>,
    /// Foreign trust domains whose federated bundles the entry's workloads receive.
    #[serde(default)]
    federates_with: Vec<String>,
    /// Ignored (set by the agent).
    #[serde(default, rename = "id")]
    _id: IgnoredAny,
    /// Ignored (set by the agent).
    #[serde(default, rename = "source")]
    _source: IgnoredAny,
    /// Ignored (set by the agent).
    #[serde(default, rename = "revision")]
    _revision: IgnoredAny,
    /// Ignored (set by the agent).
    #[serde(default, rename = "created_at")]
    _created_at: IgnoredAny,
    /// Ignored (set by the agent).
    #[serde(default, rename = "updated_at")]
    _updated_at: IgnoredAny,
}

impl From<FileSpec> for EntrySpec {
    fn from(f: FileSpec) -> Self {
        Self {
            spiffe_id: f.spiffe_id,
            selectors: f.selectors,
            x509_svid_ttl_seconds: f.x509_svid_ttl_seconds.unwrap_or(0),
            jwt_svid_ttl_seconds: f.jwt_svid_ttl_seconds.unwrap_or(0),
            hint: f.hint.unwrap_or_default(),
            dns_names: f.dns_names,
            admin: false,
            federates_with: f.federates_with,
        }
    }
}

/// Parses a `--from-file` document: a non-empty JSON array of specs. The agent validates the
/// specs themselves (and answers per entry).
pub(crate) fn parse_spec_file(text: &str) -> Result<Vec<EntrySpec>, String> {
    let specs: Vec<FileSpec> = serde_json::from_str(text).map_err(|e| {
        format!(
            "{e} (expected a JSON array of objects with spiffe_id, selectors and optionally \
             x509_svid_ttl_seconds, jwt_svid_ttl_seconds, hint, dns_names, federates_with)"
        )
    })?;
    if specs.is_empty() {
        return Err("the array holds no entries".to_owned());
    }
    Ok(specs.into_iter().map(EntrySpec::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> EntrySpec {
        EntrySpec {
            spiffe_id: "spiffe://example.org/web".to_owned(),
            selectors: vec!["unix:uid:1000".to_owned(), "unix:gid:1000".to_owned()],
            x509_svid_ttl_seconds: 600,
            jwt_svid_ttl_seconds: 0,
            hint: "internal".to_owned(),
            dns_names: vec!["web.internal".to_owned()],
            admin: false,
            federates_with: vec!["partner.example".to_owned()],
        }
    }

    #[test]
    fn ttl_accepts_humantime_and_zero() {
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("10m"), Ok(600));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("1h 30m"), Ok(5400));
        assert_eq!(parse_ttl("0s"), Ok(0));
    }

    #[test]
    fn ttl_rejects_fractions_and_garbage() {
        assert!(parse_ttl("1500ms").is_err_and(|e| e.contains("whole number of seconds")));
        assert!(parse_ttl("ten minutes").is_err());
        assert!(parse_ttl("600").is_err_and(|e| e.contains("90s")));
    }

    #[test]
    fn no_flags_change_nothing() {
        let changes = SpecChanges::from_flags(None, vec![], None, None, None, vec![], false);
        assert!(changes.is_empty());
        assert_eq!(overlay(&current(), &changes), current());
    }

    #[test]
    fn given_fields_replace_and_others_stay() {
        let changes = SpecChanges::from_flags(
            None,
            vec!["unix:uid:2000".to_owned()],
            Some(3600),
            None,
            None,
            vec![],
            false,
        );
        assert!(!changes.is_empty());
        let spec = overlay(&current(), &changes);
        assert_eq!(spec.selectors, ["unix:uid:2000"]);
        assert_eq!(spec.x509_svid_ttl_seconds, 3600);
        // Untouched.
        assert_eq!(spec.spiffe_id, "spiffe://example.org/web");
        assert_eq!(spec.jwt_svid_ttl_seconds, 0);
        assert_eq!(spec.hint, "internal");
        assert_eq!(spec.dns_names, ["web.internal"]);
    }

    #[test]
    fn every_field_can_be_replaced() {
        let changes = SpecChanges::from_flags(
            Some("spiffe://example.org/api".to_owned()),
            vec!["unix:uid:1".to_owned(), "unix:path:/bin/api".to_owned()],
            Some(0),
            Some(120),
            Some("external".to_owned()),
            vec!["a.example".to_owned(), "b.example".to_owned()],
            false,
        );
        let spec = overlay(&current(), &changes);
        assert_eq!(
            spec,
            EntrySpec {
                spiffe_id: "spiffe://example.org/api".to_owned(),
                selectors: vec!["unix:uid:1".to_owned(), "unix:path:/bin/api".to_owned()],
                x509_svid_ttl_seconds: 0,
                jwt_svid_ttl_seconds: 120,
                hint: "external".to_owned(),
                dns_names: vec!["a.example".to_owned(), "b.example".to_owned()],
                admin: false,
                federates_with: vec!["partner.example".to_owned()],
            }
        );
        // --federates-with replaces the list; --clear-federates-with empties it.
        let changes = SpecChanges::default().with_federates_with(vec!["x.org".into()], false);
        assert_eq!(overlay(&current(), &changes).federates_with, ["x.org"]);
        let changes = SpecChanges::default().with_federates_with(vec![], true);
        assert!(overlay(&current(), &changes).federates_with.is_empty());
        assert!(
            SpecChanges::default()
                .with_federates_with(vec![], false)
                .is_empty()
        );
    }

    #[test]
    fn empty_hint_and_clear_dns_names_remove() {
        let changes =
            SpecChanges::from_flags(None, vec![], None, None, Some(String::new()), vec![], true);
        assert!(!changes.is_empty());
        let spec = overlay(&current(), &changes);
        assert_eq!(spec.hint, "");
        assert!(spec.dns_names.is_empty());
        assert_eq!(spec.selectors.len(), 2);
    }

    #[test]
    fn overlay_keeps_the_reserved_admin_flag() {
        let mut base = current();
        base.admin = true;
        let changes = SpecChanges {
            hint: Some("x".to_owned()),
            ..SpecChanges::default()
        };
        assert!(overlay(&base, &changes).admin);
    }

    #[test]
    fn spec_file_takes_list_output_back() {
        let text = r#"[
            {"spiffe_id": "spiffe://example.org/web", "selectors": ["unix:uid:1000"]},
            {"id": "config-0000", "spiffe_id": "spiffe://example.org/db",
             "selectors": ["unix:uid:5432"], "x509_svid_ttl_seconds": 600,
             "jwt_svid_ttl_seconds": null, "hint": null, "dns_names": ["db.internal"],
             "source": "config", "revision": 1, "created_at": null, "updated_at": null}
        ]"#;
        let specs = parse_spec_file(text).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].spiffe_id, "spiffe://example.org/web");
        assert_eq!(specs[0].x509_svid_ttl_seconds, 0);
        assert_eq!(specs[1].x509_svid_ttl_seconds, 600);
        assert_eq!(specs[1].jwt_svid_ttl_seconds, 0);
        assert_eq!(specs[1].hint, "");
        assert_eq!(specs[1].dns_names, ["db.internal"]);
    }

    #[test]
    fn spec_file_rejects_typos_empty_arrays_and_non_arrays() {
        let typo = r#"[{"spiffe_id": "spiffe://example.org/web", "selector": ["unix:uid:1"]}]"#;
        assert!(parse_spec_file(typo).is_err_and(|e| e.contains("selector")));
        assert!(parse_spec_file("[]").is_err_and(|e| e.contains("no entries")));
        assert!(parse_spec_file(r#"{"spiffe_id": "x"}"#).is_err());
    }
}
