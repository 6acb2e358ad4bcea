//! Registration entries and the matching index over a set of them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use spiffe::{SpiffeId, TrustDomain};

use crate::{Selector, SelectorCheck, SelectorError};

/// Longest hint accepted, in bytes (the Workload API spec's SHOULD NOT, as SPIRE enforces).
pub const MAX_HINT_LEN: usize = 1024;
/// Longest SPIFFE ID accepted, in bytes ([ID §2.3]).
const MAX_SPIFFE_ID_LEN: usize = 2048;

/// The stable id of a registration entry.
///
/// Shared, not copied: the index keys its id map with the entry's own id, and every event and
/// feed that names an entry holds the same allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(Arc<str>);

impl EntryId {
    /// Wraps an id string.
    pub fn new(id: impl Into<String>) -> Self {
        Self(Arc::from(id.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A registration entry: callers with all of `selectors` get the identity `spiffe_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Stable id; SVIDs are cached per entry id.
    pub id: EntryId,
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// All of these must be among the caller's selectors (sorted, no duplicates).
    pub selectors: Vec<Selector>,
    /// Per-entry X.509-SVID lifetime, overriding the agent default.
    pub x509_svid_ttl: Option<Duration>,
    /// Per-entry JWT-SVID lifetime, overriding the agent default.
    pub jwt_svid_ttl: Option<Duration>,
    /// Optional hint sent with the SVID.
    pub hint: Option<String>,
    /// DNS names to put in the X.509-SVID's SAN.
    pub dns_names: Vec<String>,
    /// Trust domains whose bundles the entry's workloads receive (SPIRE's `federates_with`).
    pub federates_with: Vec<TrustDomain>,
    /// SPIRE's `admin` flag: the SVID may call the SPIRE Server's admin APIs. Kept as synced.
    pub admin: bool,
    /// SPIRE's `downstream` flag: the SVID may sign a downstream SPIRE Server. Kept as synced.
    pub downstream: bool,
}

/// Why an entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The SPIFFE ID belongs to another trust domain.
    #[error(
        "spiffe_id {id:?} is outside the trust domain {td:?}; use an ID of the form spiffe://{td}/..."
    )]
    OutsideTrustDomain {
        /// The entry's ID.
        id: String,
        /// The agent's trust domain.
        td: String,
    },
    /// The SPIFFE ID has no path (it names the trust domain itself).
    #[error("spiffe_id {0:?} has no path; workload IDs need one, e.g. {0}/web")]
    NoPath(String),
    /// The SPIFFE ID is too long.
    #[error("spiffe_id is {0} bytes long; the limit is 2048")]
    IdTooLong(usize),
    /// No selectors: the entry would match every caller.
    #[error("the entry has no selectors; add at least one, e.g. \"unix:uid:1000\"")]
    NoSelectors,
    /// Hint too long.
    #[error("hint is {0} bytes long; the limit is 1024")]
    HintTooLong(usize),
    /// A TTL of zero.
    #[error("{0} must be greater than zero, e.g. \"10m\"")]
    ZeroTtl(&'static str),
    /// A DNS name is not a valid host name.
    #[error(
        "dns name {0:?} is not a valid DNS name (letters, digits, '-' and '.', labels of 1-63 \
         bytes, an optional leading '*.')"
    )]
    DnsName(String),
    /// The hint holds a control character (a newline, an escape, ...), which would reach
    /// clients, terminals and log lines as is.
    #[error("hint contains the control character {0:?}; use printable text, e.g. \"internal\"")]
    HintControl(char),
    /// A selector that no configured attestor accepts.
    #[error(transparent)]
    Selector(#[from] SelectorError),
    /// `federates_with` names the agent's own trust domain, whose bundle every workload gets
    /// anyway (checked for entries an operator writes, not for synced ones).
    #[error(
        "federates_with names {0:?}, the agent's own trust domain; list foreign trust domains \
         only"
    )]
    FederatesWithOwn(String),
    /// More selectors than `max_selectors_per_entry`.
    #[error("the entry has {count} selectors; the limit is {max} (max_selectors_per_entry)")]
    TooManySelectors {
        /// Selectors in the entry.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More DNS names than `max_dns_names_per_entry`.
    #[error("the entry has {count} dns names; the limit is {max} (max_dns_names_per_entry)")]
    TooManyDnsNames {
        /// DNS names in the entry.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A TTL below `min_svid_ttl`.
    #[error(
        "{field} is shorter than the agent's min_svid_ttl ({}s): SVIDs are re-minted at half \
         their lifetime; use at least {}s", .min.as_secs(), .min.as_secs()
    )]
    TtlTooShort {
        /// `x509_svid_ttl` or `jwt_svid_ttl`.
        field: &'static str,
        /// The limit.
        min: Duration,
    },
    /// A TTL above the longest allowed (10 years, and never longer than the CA's lifetime).
    #[error("{field} is longer than {}s; {why}", .max.as_secs())]
    TtlTooLong {
        /// `x509_svid_ttl` or `jwt_svid_ttl`.
        field: &'static str,
        /// The limit.
        max: Duration,
        /// Where the limit comes from.
        why: &'static str,
    },
}

impl EntryError {
    /// The entry field the problem is in: `spiffe_id`, `selectors`, `hint`, `dns_names`,
    /// `x509_svid_ttl` or `jwt_svid_ttl` (front ends point at it: the admin API's
    /// `EntryError.field`, the config file's `entries[i].FIELD` key and line).
    pub fn field(&self) -> &'static str {
        match self {
            Self::OutsideTrustDomain { .. } | Self::NoPath(_) | Self::IdTooLong(_) => "spiffe_id",
            Self::NoSelectors | Self::Selector(_) | Self::TooManySelectors { .. } => "selectors",
            Self::HintTooLong(_) | Self::HintControl(_) => "hint",
            Self::DnsName(_) | Self::TooManyDnsNames { .. } => "dns_names",
            Self::FederatesWithOwn(_) => "federates_with",
            Self::ZeroTtl(field)
            | Self::TtlTooShort { field, .. }
            | Self::TtlTooLong { field, .. } => field,
        }
    }

    /// The list item at fault, as written, when the problem is one selector or one DNS name:
    /// a front end finds its position in what the user submitted (`selectors[1]`,
    /// `dns_names[0]`), since the entry's own selectors are sorted.
    pub fn item(&self) -> Option<&str> {
        match self {
            Self::DnsName(name) | Self::FederatesWithOwn(name) => Some(name),
            Self::Selector(
                SelectorError::Shape(selector)
                | SelectorError::UnknownType { selector, .. }
                | SelectorError::UnknownKey { selector, .. }
                | SelectorError::Value { selector, .. },
            ) => Some(selector),
            _ => None,
        }
    }

    /// The message for a front end that shows [`field`](Self::field) next to it (the admin
    /// API's `{field, message}`): the limits read relative to the field ("has 65 items; the
    /// agent's limit is 64 (max_selectors_per_entry)"); every other problem is its full text.
    pub fn message(&self) -> String {
        match self {
            Self::TooManySelectors { count, max } => {
                format!("has {count} items; the agent's limit is {max} (max_selectors_per_entry)")
            }
            Self::TooManyDnsNames { count, max } => {
                format!("has {count} items; the agent's limit is {max} (max_dns_names_per_entry)")
            }
            Self::NoSelectors => "at least one selector is required, e.g. unix:uid:1000".to_owned(),
            Self::HintTooLong(_) => format!("is longer than {MAX_HINT_LEN} bytes"),
            Self::TtlTooShort { min, .. } => format!(
                "is shorter than the agent's min_svid_ttl ({}s): SVIDs are re-minted at half \
                 their lifetime; use at least {}s",
                min.as_secs(),
                min.as_secs()
            ),
            Self::TtlTooLong { max, .. } if *max == MAX_TTL => {
                "is longer than 10 years; use e.g. 1h".to_owned()
            }
            Self::TtlTooLong { max, why, .. } => {
                format!("is longer than the CA lifetime ({}s): {why}", max.as_secs())
            }
            other => other.to_string(),
        }
    }
}

/// Longest TTL an entry may ask for: 10 years.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Bounds every entry must keep, from the agent's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLimits {
    /// `max_selectors_per_entry`.
    pub max_selectors: usize,
    /// `max_dns_names_per_entry`.
    pub max_dns_names: usize,
    /// `min_svid_ttl`: shortest per-entry TTL.
    pub min_svid_ttl: Duration,
    /// The CA's lifetime (`ca_ttl`): no SVID outlives its CA.
    pub ca_ttl: Duration,
}

impl Default for EntryLimits {
    fn default() -> Self {
        Self {
            max_selectors: 64,
            max_dns_names: 64,
            min_svid_ttl: Duration::from_secs(10),
            ca_ttl: MAX_TTL,
        }
    }
}

/// Everything an entry is checked against: the trust domain, the limits, and the attestors that
/// own the selector types.
#[derive(Clone, Copy)]
pub struct EntryRules<'a> {
    /// The agent's trust domain.
    pub trust_domain: &'a TrustDomain,
    /// The limits.
    pub limits: EntryLimits,
    /// Checks selectors by type (the configured attestor plugins).
    pub selectors: &'a dyn SelectorCheck,
}

impl fmt::Debug for EntryRules<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryRules")
            .field("trust_domain", &self.trust_domain)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// The one validating constructor: sorts and de-duplicates the selectors of `self`, then
    /// checks every rule an entry must meet (the config file, the admin API and every other
    /// entry source build entries through it).
    pub fn checked(mut self, rules: &EntryRules<'_>) -> Result<Self, EntryError> {
        self.selectors.sort();
        self.selectors.dedup();
        self.check(rules)?;
        Ok(self)
    }

    /// Checks every rule an entry must meet under `rules`.
    pub fn check(&self, rules: &EntryRules<'_>) -> Result<(), EntryError> {
        self.validate(rules.trust_domain)?;
        let l = &rules.limits;
        if self.selectors.len() > l.max_selectors {
            return Err(EntryError::TooManySelectors {
                count: self.selectors.len(),
                max: l.max_selectors,
            });
        }
        for sel in &self.selectors {
            rules.selectors.check(sel)?;
        }
        if self.dns_names.len() > l.max_dns_names {
            return Err(EntryError::TooManyDnsNames {
                count: self.dns_names.len(),
                max: l.max_dns_names,
            });
        }
        for (field, ttl) in [
            ("x509_svid_ttl", self.x509_svid_ttl),
            ("jwt_svid_ttl", self.jwt_svid_ttl),
        ] {
            let Some(ttl) = ttl else { continue };
            if ttl > MAX_TTL {
                return Err(EntryError::TtlTooLong {
                    field,
                    max: MAX_TTL,
                    why: "use e.g. 1h",
                });
            }
            if ttl < l.min_svid_ttl {
                return Err(EntryError::TtlTooShort {
                    field,
                    min: l.min_svid_ttl,
                });
            }
            if ttl > l.ca_ttl {
                return Err(EntryError::TtlTooLong {
                    field,
                    max: l.ca_ttl,
                    why: "an SVID never outlives its CA (or, for JWT-SVIDs, its signing key)",
                });
            }
        }
        Ok(())
    }

    /// Checks the rules that need only the trust domain.
    fn validate(&self, td: &TrustDomain) -> Result<(), EntryError> {
        let id = self.spiffe_id.to_string();
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(EntryError::IdTooLong(id.len()));
        }
        if !self.spiffe_id.is_member_of(td) {
            return Err(EntryError::OutsideTrustDomain {
                id,
                td: td.to_string(),
            });
        }
        if self.spiffe_id.path().is_empty() {
            return Err(EntryError::NoPath(id));
        }
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        if let Some(h) = &self.hint
            && h.len() > MAX_HINT_LEN
        {
            return Err(EntryError::HintTooLong(h.len()));
        }
        if let Some(c) = self
            .hint
            .as_deref()
            .and_then(|h| h.chars().find(|c| c.is_control()))
        {
            return Err(EntryError::HintControl(c));
        }
        if self.x509_svid_ttl == Some(Duration::ZERO) {
            return Err(EntryError::ZeroTtl("x509_svid_ttl"));
        }
        if self.jwt_svid_ttl == Some(Duration::ZERO) {
            return Err(EntryError::ZeroTtl("jwt_svid_ttl"));
        }
        for d in &self.dns_names {
            if !valid_dns_name(d) {
                return Err(EntryError::DnsName(d.clone()));
            }
        }
        Ok(())
    }
}

fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, spiffe: &str, sels: &[&str], hint: Option<&str>) -> Arc<Entry> {
        let mut selectors: Vec<Selector> = sels.iter().map(|s| s.parse().unwrap()).collect();
        selectors.sort();
        selectors.dedup();
        Arc::new(Entry {
            id: EntryId::new(id),
            spiffe_id: spiffe.parse().unwrap(),
            selectors,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: hint.map(str::to_owned),
            dns_names: vec![],
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
        })
    }

    struct AnySelector;
    impl SelectorCheck for AnySelector {
        fn check(&self, _: &Selector) -> Result<(), SelectorError> {
            Ok(())
        }
    }

    fn rules(td: &TrustDomain) -> EntryRules<'_> {
        EntryRules {
            trust_domain: td,
            limits: EntryLimits::default(),
            selectors: &AnySelector,
        }
    }

    #[test]
    fn limits_are_checked_in_one_place() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut r = rules(&td);
        r.limits.max_selectors = 1;
        let two = entry(
            "1",
            "spiffe://example.org/w",
            &["unix:uid:1", "unix:gid:1"],
            None,
        );
        assert_eq!(
            (*two).clone().checked(&r),
            Err(EntryError::TooManySelectors { count: 2, max: 1 })
        );
        let mut short = (*entry("1", "spiffe://example.org/w", &["unix:uid:1"], None)).clone();
        short.x509_svid_ttl = Some(Duration::from_secs(1));
        assert!(matches!(
            short.check(&rules(&td)),
            Err(EntryError::TtlTooShort {
                field: "x509_svid_ttl",
                ..
            })
        ));
        short.x509_svid_ttl = None;
        short.jwt_svid_ttl = Some(MAX_TTL + Duration::from_secs(1));
        assert!(matches!(
            short.check(&rules(&td)),
            Err(EntryError::TtlTooLong {
                field: "jwt_svid_ttl",
                ..
            })
        ));
        let mut r = rules(&td);
        r.limits.ca_ttl = Duration::from_secs(3600);
        short.jwt_svid_ttl = Some(Duration::from_secs(7200));
        assert!(matches!(
            short.check(&r),
            Err(EntryError::TtlTooLong { .. })
        ));
    }

    #[test]
    fn errors_name_their_field_and_item_for_front_ends() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut r = rules(&td);
        r.limits.max_selectors = 1;
        r.limits.ca_ttl = Duration::from_secs(3600);
        let base = (*entry("1", "spiffe://example.org/w", &["unix:uid:1"], None)).clone();
        let err = |e: Entry| e.checked(&r).unwrap_err();

        let mut two = base.clone();
        two.selectors.push("unix:gid:1".parse().unwrap());
        let e = err(two);
        assert_eq!(e.field(), "selectors");
        assert_eq!(
            e.message(),
            "has 2 items; the agent's limit is 1 (max_selectors_per_entry)"
        );
        let mut ttl = base.clone();
        ttl.jwt_svid_ttl = Some(Duration::from_secs(7200));
        let e = err(ttl.clone());
        assert_eq!(e.field(), "jwt_svid_ttl");
        assert_eq!(
            e.message(),
            "is longer than the CA lifetime (3600s): an SVID never outlives its CA (or, for \
             JWT-SVIDs, its signing key)"
        );
        ttl.jwt_svid_ttl = Some(MAX_TTL + Duration::from_secs(1));
        assert_eq!(err(ttl).message(), "is longer than 10 years; use e.g. 1h");
        let mut dns = base.clone();
        dns.dns_names = vec!["ok.internal".into(), "bad name".into()];
        let e = err(dns);
        assert_eq!((e.field(), e.item()), ("dns_names", Some("bad name")));
        let mut hint = base.clone();
        hint.hint = Some("a\nb".into());
        assert_eq!(err(hint).field(), "hint");
        let mut outside = base;
        outside.spiffe_id = "spiffe://other.org/w".parse().unwrap();
        let e = err(outside);
        assert_eq!(e.field(), "spiffe_id");
        assert_eq!(e.message(), e.to_string());
    }

    #[test]
    fn validation_names_the_problem() {
        let td = TrustDomain::new("example.org").unwrap();
        let ok = entry("1", "spiffe://example.org/web", &["unix:uid:1"], None);
        assert_eq!(ok.check(&rules(&td)), Ok(()));
        let other = entry("1", "spiffe://other.org/web", &["unix:uid:1"], None);
        assert!(matches!(
            other.check(&rules(&td)),
            Err(EntryError::OutsideTrustDomain { .. })
        ));
        let root = entry("1", "spiffe://example.org", &["unix:uid:1"], None);
        assert!(matches!(
            root.check(&rules(&td)),
            Err(EntryError::NoPath(_))
        ));
        let none = entry("1", "spiffe://example.org/web", &[], None);
        assert_eq!(none.check(&rules(&td)), Err(EntryError::NoSelectors));
        let long_hint = "h".repeat(1025);
        let hint = entry(
            "1",
            "spiffe://example.org/web",
            &["unix:uid:1"],
            Some(&long_hint),
        );
        assert_eq!(hint.check(&rules(&td)), Err(EntryError::HintTooLong(1025)));
        let mut dns = (*ok).clone();
        dns.dns_names = vec!["bad_name".into()];
        assert!(matches!(
            dns.check(&rules(&td)),
            Err(EntryError::DnsName(_))
        ));
        dns.dns_names = vec!["web.internal".into(), "*.svc.local".into()];
        assert_eq!(dns.check(&rules(&td)), Ok(()));
    }
}
