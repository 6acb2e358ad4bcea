//! Selectors: `TYPE:VALUE` facts about a caller, with SPIRE's names (`unix:uid:1000`).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// One selector, such as `unix:uid:1000` (type `unix`, value `uid:1000`).
///
/// Core checks only the shape every selector shares (`TYPE:KEY:VALUE`, bounded, printable); what a
/// type's keys and values mean is checked by the attestor plugin that owns the type, through
/// [`SelectorCheck`]. Stored as one shared string, so an index of 100,000 entries stays small:
/// the index keys on the same text its entries hold, and entries that share a selector (a uid)
/// share its text (see `EntryIndex`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// `TYPE:VALUE`.
    text: Arc<str>,
    /// Where the `:` after the type is.
    split: u32,
}

/// Why a selector string is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// The string has no `TYPE:KEY:VALUE` shape.
    #[error("selector {0:?} is not of the form TYPE:KEY:VALUE, e.g. \"unix:uid:1000\"")]
    Shape(String),
    /// No configured attestor derives this type.
    #[error("selector {selector:?} has unknown type; known types are {known}")]
    UnknownType {
        /// The selector as written.
        selector: String,
        /// The known types, quoted and joined for a sentence (`"unix" and "systemd"`).
        known: String,
    },
    /// The key within the type is unknown to the attestor that owns the type.
    #[error("selector {selector:?} has an unknown key; known keys are {known}")]
    UnknownKey {
        /// The selector as written.
        selector: String,
        /// The type's keys, as `type:key`, joined for a sentence.
        known: String,
    },
    /// The value does not fit the key.
    #[error("selector {selector:?}: {why}")]
    Value {
        /// The selector as written.
        selector: String,
        /// What is wrong with the value.
        why: &'static str,
    },
}

/// Longest selector value accepted, in bytes.
const MAX_VALUE_LEN: usize = 4096;
/// Longest selector type accepted, in bytes.
const MAX_TYPE_LEN: usize = 64;

/// Checks what selectors of each type mean: the attestor plugins own their types (`unix`,
/// `systemd`, later `docker` or `k8s`), and everything that accepts selectors from users (the
/// config file, the admin API) asks them through this.
pub trait SelectorCheck: Send + Sync {
    /// Accepts `selector` if a configured attestor derives its type and its key and value make
    /// sense there; the error names the problem and what is known.
    fn check(&self, selector: &Selector) -> Result<(), SelectorError>;
}

/// Joins quoted words for a sentence: `"a"`, `"a" and "b"`, `"a", "b" and "c"`.
pub fn known_list<'a>(words: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = words.into_iter().map(|w| format!("{w:?}")).collect();
    match quoted.split_last() {
        None => "none".to_owned(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

impl Selector {
    /// Builds a selector from its type (`unix`) and value (`uid:1000`), checking the shape every
    /// selector shares: a type of lowercase letters, digits, `_` or `-`, and a value `KEY:VALUE`
    /// with both parts non-empty, at most 4096 bytes, without control characters.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        let whole = format!("{kind}:{value}");
        let type_ok = !kind.is_empty()
            && kind.len() <= MAX_TYPE_LEN
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !type_ok {
            return Err(SelectorError::Shape(whole));
        }
        let (key, v) = value
            .split_once(':')
            .ok_or_else(|| SelectorError::Shape(whole.clone()))?;
        if key.is_empty() {
            return Err(SelectorError::Shape(whole));
        }
        let bad = |why| SelectorError::Value {
            selector: whole.clone(),
            why,
        };
        if v.is_empty() {
            return Err(bad("the value is empty"));
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(bad("the value is longer than 4096 bytes"));
        }
        if value.chars().any(char::is_control) {
            return Err(bad("the value contains control characters"));
        }
        let split = u32::try_from(kind.len()).map_err(|_| SelectorError::Shape(whole.clone()))?;
        Ok(Self {
            text: Arc::from(whole),
            split,
        })
    }

    /// Builds a `unix:KEY:VALUE` selector (shape checked; the unix attestor checks the key).
    pub fn unix(key: &str, value: impl fmt::Display) -> Result<Self, SelectorError> {
        Self::new("unix", &format!("{key}:{value}"))
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        self.text.get(..self.split as usize).unwrap_or_default()
    }

    /// The value within the type, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        self.text.get(self.split as usize + 1..).unwrap_or_default()
    }

    /// The key within the type, e.g. `uid`.
    pub fn key(&self) -> &str {
        self.value().split_once(':').map_or("", |(k, _)| k)
    }

    /// The part after the key, e.g. `1000`.
    pub fn key_value(&self) -> &str {
        self.value().split_once(':').map_or("", |(_, v)| v)
    }

    /// The type and key, e.g. `unix:uid`; attestors use it to learn which facts entries need.
    pub fn kind_key(&self) -> String {
        format!("{}:{}", self.kind(), self.key())
    }

    /// The whole selector, e.g. `unix:uid:1000`.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::Shape(s.to_owned()))?;
        Self::new(kind, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A set of selectors (ordered, without duplicates).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selectors(BTreeSet<Selector>);

impl Selectors {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one selector.
    pub fn insert(&mut self, s: Selector) {
        self.0.insert(s);
    }

    /// Whether `s` is in the set.
    pub fn contains(&self, s: &Selector) -> bool {
        self.0.contains(s)
    }

    /// Whether every selector of `needed` is in the set (subset matching).
    pub fn contains_all<'a>(&self, needed: impl IntoIterator<Item = &'a Selector>) -> bool {
        needed.into_iter().all(|s| self.0.contains(s))
    }

    /// Iterates in order.
    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter()
    }

    /// Number of selectors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Selector> for Selectors {
    fn from_iter<T: IntoIterator<Item = Selector>>(iter: T) -> Self {
        Self(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_round_trip() {
        for s in [
            "unix:uid:1000",
            "unix:gid:0",
            "unix:user:alice",
            "unix:path:/usr/bin/web",
            "unix:supplementary_group:wheel",
            "systemd:id:web.service",
        ] {
            let sel: Selector = s.parse().unwrap();
            assert_eq!(sel.to_string(), s);
        }
        let sel: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!(sel.kind(), "unix");
        assert_eq!(sel.value(), "uid:1000");
        assert_eq!(sel.kind_key(), "unix:uid");
        assert_eq!(sel.key(), "uid");
        assert_eq!(sel.key_value(), "1000");
        assert_eq!(known_list(["unix", "systemd"]), "\"unix\" and \"systemd\"");
        assert_eq!(known_list(["a", "b", "c"]), "\"a\", \"b\" and \"c\"");
    }

    #[test]
    fn rejects_bad_selectors_with_reasons() {
        assert!(matches!(
            "uid".parse::<Selector>(),
            Err(SelectorError::Shape(_))
        ));
        // Types and keys belong to the attestor plugins: core accepts any well-shaped selector.
        assert!("k8s:ns:default".parse::<Selector>().is_ok());
        assert!("unix:pid:1".parse::<Selector>().is_ok());
        for shape in ["Unix:uid:1", ":uid:1", "unix::1", "unix:uid", "un ix:uid:1"] {
            assert!(
                matches!(shape.parse::<Selector>(), Err(SelectorError::Shape(_))),
                "{shape} should be refused"
            );
        }
        for bad in ["unix:uid:", "unix:user:a\nb"] {
            assert!(
                matches!(bad.parse::<Selector>(), Err(SelectorError::Value { .. })),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn subset_matching() {
        let have: Selectors = ["unix:uid:1000", "unix:gid:1000", "unix:user:a"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let need: Vec<Selector> = vec![
            "unix:uid:1000".parse().unwrap(),
            "unix:gid:1000".parse().unwrap(),
        ];
        assert!(have.contains_all(&need));
        let other: Vec<Selector> = vec![
            "unix:uid:1000".parse().unwrap(),
            "unix:gid:5".parse().unwrap(),
        ];
        assert!(!have.contains_all(&other));
    }
}
