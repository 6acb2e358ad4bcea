//! Registration entries and the matching index over a set of them.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use spiffe::{SpiffeId, TrustDomain};

use crate::{Facts, Selector, Selectors};

/// Longest hint accepted, in bytes (the Workload API spec's SHOULD NOT, as SPIRE enforces).
pub const MAX_HINT_LEN: usize = 1024;
/// Longest SPIFFE ID accepted, in bytes ([ID §2.3]).
const MAX_SPIFFE_ID_LEN: usize = 2048;

/// The stable id of a registration entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(String);

impl EntryId {
    /// Wraps an id string.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
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
}

impl Entry {
    /// Checks the rules that every entry must meet for trust domain `td`.
    pub fn validate(&self, td: &TrustDomain) -> Result<(), EntryError> {
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

/// An immutable snapshot of all entries, indexed for "all selectors present" matching.
///
/// Matching walks only the entries that share at least one selector with the caller, so its cost
/// grows with the caller's selectors and their posting lists, not with the number of entries.
#[derive(Debug, Default)]
pub struct EntrySet {
    entries: Vec<Arc<Entry>>,
    by_selector: HashMap<Selector, Vec<usize>>,
    kind_keys: HashSet<String>,
    facts: Facts,
    revision: u64,
}

impl EntrySet {
    /// Builds the index. Entries are ordered by id, so the default identity (`svids[0]`) is
    /// stable across calls.
    pub fn new(mut entries: Vec<Arc<Entry>>, revision: u64) -> Self {
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        let mut by_selector: HashMap<Selector, Vec<usize>> = HashMap::new();
        let mut kind_keys = HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            for s in &e.selectors {
                by_selector.entry(s.clone()).or_default().push(i);
                kind_keys.insert(s.kind_key());
            }
        }
        let facts = kind_keys
            .iter()
            .fold(Facts::NONE, |f, k| f | Facts::for_kind_key(k));
        Self {
            entries,
            by_selector,
            kind_keys,
            facts,
            revision,
        }
    }

    /// All entries, ordered by id.
    pub fn entries(&self) -> &[Arc<Entry>] {
        &self.entries
    }

    /// A number that grows with every change to the set.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether any entry uses a selector of this `type:key` (e.g. `unix:sha256`), so attestors
    /// can skip facts nobody asks for.
    pub fn uses_kind_key(&self, kind_key: &str) -> bool {
        self.kind_keys.contains(kind_key)
    }

    /// The facts attestation must gather so that every entry can be matched.
    pub fn facts(&self) -> Facts {
        self.facts
    }

    /// Every entry whose selectors are all among `selectors`, ordered by entry id, with duplicate
    /// non-empty hints removed (the first entry by id keeps its hint's identity).
    pub fn matching(&self, selectors: &Selectors) -> Vec<Arc<Entry>> {
        let mut hits: HashMap<usize, usize> = HashMap::new();
        for s in selectors.iter() {
            if let Some(idxs) = self.by_selector.get(s) {
                for &i in idxs {
                    *hits.entry(i).or_default() += 1;
                }
            }
        }
        let mut matched: Vec<usize> = hits
            .into_iter()
            .filter(|&(i, n)| {
                // An entry's selectors are unique, so n counts distinct matches.
                self.entries.get(i).is_some_and(|e| e.selectors.len() == n)
            })
            .map(|(i, _)| i)
            .collect();
        matched.sort_unstable();
        let mut seen_hints = HashSet::new();
        matched
            .into_iter()
            .filter_map(|i| self.entries.get(i).cloned())
            .filter(|e| match e.hint.as_deref() {
                Some(h) if !h.is_empty() => seen_hints.insert(h.to_owned()),
                _ => true,
            })
            .collect()
    }
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
        })
    }

    fn sels(s: &[&str]) -> Selectors {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn matches_subsets_in_id_order() {
        let set = EntrySet::new(
            vec![
                entry("b", "spiffe://td/b", &["unix:uid:1", "unix:gid:1"], None),
                entry("a", "spiffe://td/a", &["unix:uid:1"], None),
                entry("c", "spiffe://td/c", &["unix:uid:2"], None),
            ],
            1,
        );
        let got: Vec<_> = set
            .matching(&sels(&["unix:uid:1", "unix:gid:1"]))
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(got, ["a", "b"]);
        let got: Vec<_> = set
            .matching(&sels(&["unix:uid:1", "unix:gid:2"]))
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(got, ["a"]);
        assert!(set.matching(&sels(&["unix:uid:3"])).is_empty());
        assert!(set.uses_kind_key("unix:gid"));
        assert!(!set.uses_kind_key("unix:sha256"));
        assert_eq!(set.facts(), Facts::NONE);
    }

    #[test]
    fn duplicate_hints_keep_first_by_id() {
        let set = EntrySet::new(
            vec![
                entry("2", "spiffe://td/two", &["unix:uid:1"], Some("internal")),
                entry("1", "spiffe://td/one", &["unix:uid:1"], Some("internal")),
                entry("3", "spiffe://td/three", &["unix:uid:1"], Some("")),
                entry("4", "spiffe://td/four", &["unix:uid:1"], Some("")),
            ],
            1,
        );
        let got: Vec<_> = set
            .matching(&sels(&["unix:uid:1"]))
            .iter()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        assert_eq!(
            got,
            ["spiffe://td/one", "spiffe://td/three", "spiffe://td/four"]
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let td = TrustDomain::new("example.org").unwrap();
        let ok = entry("1", "spiffe://example.org/web", &["unix:uid:1"], None);
        assert_eq!(ok.validate(&td), Ok(()));
        let other = entry("1", "spiffe://other.org/web", &["unix:uid:1"], None);
        assert!(matches!(
            other.validate(&td),
            Err(EntryError::OutsideTrustDomain { .. })
        ));
        let root = entry("1", "spiffe://example.org", &["unix:uid:1"], None);
        assert!(matches!(root.validate(&td), Err(EntryError::NoPath(_))));
        let none = entry("1", "spiffe://example.org/web", &[], None);
        assert_eq!(none.validate(&td), Err(EntryError::NoSelectors));
        let long_hint = "h".repeat(1025);
        let hint = entry(
            "1",
            "spiffe://example.org/web",
            &["unix:uid:1"],
            Some(&long_hint),
        );
        assert_eq!(hint.validate(&td), Err(EntryError::HintTooLong(1025)));
        let mut dns = (*ok).clone();
        dns.dns_names = vec!["bad_name".into()];
        assert!(matches!(dns.validate(&td), Err(EntryError::DnsName(_))));
        dns.dns_names = vec!["web.internal".into(), "*.svc.local".into()];
        assert_eq!(dns.validate(&td), Ok(()));
    }
}
