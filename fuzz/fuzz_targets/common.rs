//! Helpers shared by the fuzz targets (included with `#[path]`, not a target itself).
#![allow(dead_code)]

use std::time::Duration;

use spiffed_core::{Entry, EntryId, TrustDomain};
use spiffed_entries::store::EntrySpec;
use spiffed_proto::admin as pb;

/// The trust domain every target uses.
pub fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// The CA lifetime the admin service checks TTLs against (the config default).
pub const CA_TTL: Duration = Duration::from_secs(24 * 3600);

/// `s` as a TOML basic string that means exactly `s`: everything but letters, digits and a few
/// safe characters is written as a `\u` escape.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || ":/._-+@ ".contains(c) {
            out.push(c);
        } else if u32::from(c) <= 0xffff {
            out.push_str(&format!("\\u{:04X}", u32::from(c)));
        } else {
            out.push_str(&format!("\\U{:08X}", u32::from(c)));
        }
    }
    out.push('"');
    out
}

/// The fields an admin refusal may name (a list field may carry an index: `selectors[2]`).
const SPEC_FIELDS: &[&str] = &[
    "spiffe_id",
    "selectors",
    "x509_svid_ttl",
    "jwt_svid_ttl",
    "hint",
    "dns_names",
    "admin",
    "federates_with",
];

/// Runs one submitted spec through the admin service's validation and checks what it promises:
/// a refusal names a field of the spec (and an index within the list it names); an accepted
/// spec is an entry of the trust domain that `Entry::validate` accepts, with the submitted ID,
/// the submitted selectors (sorted, without duplicates), and it survives the round trip
/// through what `GetEntry` reports and back through validation unchanged.
pub fn check_spec(p: &pb::EntrySpec, td: &TrustDomain) -> Option<EntrySpec> {
    let spec = match spiffed_agent::fuzzing::validate_admin_spec(p, td, CA_TTL) {
        Ok(spec) => spec,
        Err((field, message)) => {
            assert!(!message.is_empty(), "refusal of {field} without a message");
            let (name, index) = match field.split_once('[') {
                Some((name, rest)) => {
                    let i: usize = rest
                        .strip_suffix(']')
                        .and_then(|i| i.parse().ok())
                        .unwrap_or_else(|| panic!("odd field {field:?}"));
                    (name, Some(i))
                }
                None => (field.as_str(), None),
            };
            assert!(
                SPEC_FIELDS.contains(&name),
                "refusal names {field:?}: {message}"
            );
            if let Some(i) = index {
                let len = match name {
                    "selectors" => p.selectors.len(),
                    "dns_names" => p.dns_names.len(),
                    "federates_with" => p.federates_with.len(),
                    _ => panic!("index on a field that is not a list: {field:?}"),
                };
                assert!(i < len, "{field:?} but the spec has {len}");
            }
            return None;
        }
    };
    // The ID as parsed; the spiffe crate lowercases the trust domain ("example.Org"), nothing
    // else may change.
    let id = spec.spiffe_id.to_string();
    assert!(
        id.eq_ignore_ascii_case(&p.spiffe_id) && p.spiffe_id.ends_with(spec.spiffe_id.path()),
        "the ID changed: {:?} -> {id:?}",
        p.spiffe_id
    );
    assert!(spec.spiffe_id.is_member_of(td));
    assert!(!spec.admin);
    assert!(!spec.selectors.is_empty());
    assert!(
        spec.selectors.windows(2).all(|w| w[0] < w[1]),
        "selectors not sorted and unique: {:?}",
        spec.selectors
    );
    for s in &spec.selectors {
        assert!(
            p.selectors.contains(&s.to_string()),
            "{s} was not submitted"
        );
    }
    for s in &p.selectors {
        assert!(
            spec.selectors.iter().any(|x| x.to_string() == *s),
            "submitted {s:?} went missing"
        );
    }
    let entry = Entry {
        id: EntryId::new("fuzz"),
        spiffe_id: spec.spiffe_id.clone(),
        selectors: spec.selectors.clone(),
        x509_svid_ttl: spec.x509_svid_ttl,
        jwt_svid_ttl: spec.jwt_svid_ttl,
        hint: spec.hint.clone(),
        dns_names: spec.dns_names.clone(),
        federates_with: spec.federates_with.clone(),
        admin: false,
        downstream: false,
    };
    let rules = spiffed_core::EntryRules {
        trust_domain: td,
        limits: spiffed_core::EntryLimits {
            ca_ttl: CA_TTL,
            ..Default::default()
        },
        selectors: &spiffed_attest::builtin(),
    };
    entry
        .check(&rules)
        .unwrap_or_else(|e| panic!("accepted spec makes an invalid entry: {e}"));
    if let Some(ttl) = spec.x509_svid_ttl {
        assert!(ttl <= CA_TTL, "x509_svid_ttl {ttl:?} outlives the CA");
    }
    let reported = spiffed_agent::fuzzing::admin_spec_of(&entry);
    let again = spiffed_agent::fuzzing::validate_admin_spec(&reported, td, CA_TTL)
        .unwrap_or_else(|(f, m)| panic!("reported spec refused: {f}: {m}"));
    assert_eq!(again, spec, "spec changed on the round trip");
    Some(spec)
}
