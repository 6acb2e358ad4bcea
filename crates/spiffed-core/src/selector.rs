//! Selectors: `TYPE:VALUE` facts about a caller, with SPIRE's names (`unix:uid:1000`).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// One selector, such as `unix:uid:1000` (type `unix`, value `uid:1000`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

/// Why a selector string is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// The string has no `TYPE:VALUE` shape.
    #[error("selector {0:?} is not of the form TYPE:KEY:VALUE, e.g. \"unix:uid:1000\"")]
    Shape(String),
    /// The type is not one this agent derives.
    #[error("selector {0:?} has unknown type; known types are \"unix\" and \"systemd\"")]
    UnknownType(String),
    /// The key within the type is unknown.
    #[error(
        "selector {0:?} has an unknown key; known keys are unix:uid, unix:user, unix:gid, \
         unix:group, unix:supplementary_gid, unix:supplementary_group, unix:path, unix:sha256 \
         and systemd:id"
    )]
    UnknownKey(String),
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

impl Selector {
    /// Builds a selector from its type (`unix`) and value (`uid:1000`), validating both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        let whole = format!("{kind}:{value}");
        let (key, v) = value
            .split_once(':')
            .ok_or_else(|| SelectorError::Shape(whole.clone()))?;
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
        if v.chars().any(char::is_control) {
            return Err(bad("the value contains control characters"));
        }
        match kind {
            "unix" => match key {
                "uid" | "gid" | "supplementary_gid" => {
                    if v.parse::<u32>().is_err() || (v.len() > 1 && v.starts_with('0')) {
                        return Err(bad("the value must be a decimal number, e.g. 1000"));
                    }
                }
                "user" | "group" | "supplementary_group" => {}
                "path" => {
                    if !v.starts_with('/') {
                        return Err(bad("the path must be absolute, e.g. /usr/bin/web"));
                    }
                }
                "sha256" => {
                    if v.len() != 64 || !v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                        return Err(bad("the value must be 64 lowercase hex digits"));
                    }
                }
                _ => return Err(SelectorError::UnknownKey(whole)),
            },
            "systemd" => match key {
                "id" => {}
                _ => return Err(SelectorError::UnknownKey(whole)),
            },
            _ => return Err(SelectorError::UnknownType(whole)),
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Builds a `unix:KEY:VALUE` selector. `key` must be one of the unix keys.
    pub fn unix(key: &str, value: impl fmt::Display) -> Result<Self, SelectorError> {
        Self::new("unix", &format!("{key}:{value}"))
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value within the type, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The type and key, e.g. `unix:uid`; attestors use it to learn which facts entries need.
    pub fn kind_key(&self) -> String {
        let key = self.value.split_once(':').map_or("", |(k, _)| k);
        format!("{}:{key}", self.kind)
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
        write!(f, "{}:{}", self.kind, self.value)
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
    }

    #[test]
    fn rejects_bad_selectors_with_reasons() {
        assert!(matches!(
            "uid".parse::<Selector>(),
            Err(SelectorError::Shape(_))
        ));
        assert!(matches!(
            "k8s:ns:default".parse::<Selector>(),
            Err(SelectorError::UnknownType(_))
        ));
        assert!(matches!(
            "unix:pid:1".parse::<Selector>(),
            Err(SelectorError::UnknownKey(_))
        ));
        for bad in [
            "unix:uid:abc",
            "unix:uid:-1",
            "unix:uid:01",
            "unix:uid:",
            "unix:path:relative/bin",
            "unix:sha256:ABCD",
            "unix:user:a\nb",
        ] {
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
