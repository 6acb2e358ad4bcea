//! The caller as the kernel reports it, and the attestor seam.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use std::collections::BTreeSet;

use crate::{Selector, SelectorError, Selectors};

/// Kernel facts about the process at the other end of an accepted Unix connection.
///
/// Taken with `SO_PEERCRED` when the connection is accepted; nothing the client sends goes in here.
#[derive(Clone, Debug)]
pub struct PeerCred {
    /// The peer's pid, or `None` when the kernel reported 0 (the peer lives in another PID
    /// namespace, so `/proc` cannot be read for it).
    pub pid: Option<u32>,
    /// The peer's effective uid at `connect(2)` time.
    pub uid: u32,
    /// The peer's effective gid at `connect(2)` time.
    pub gid: u32,
    /// A pidfd that pins the peer process (from `SO_PEERPIDFD`, else `pidfd_open` right after
    /// accept). Used to prove that the process read from `/proc` is the one that connected.
    pub pidfd: Option<Arc<OwnedFd>>,
}

/// Which selector types (`type:key`, e.g. `unix:path`) attestation must gather for a caller:
/// those that some registration entry uses, so that a caller is not put through `/proc` reads,
/// name-service lookups, hashing or container runtime calls that no entry can match on.
///
/// An open set: attestor plugins define their own types. `unix:uid` and `unix:gid` come from
/// `SO_PEERCRED` and are always gathered.
///
/// Cheap to clone: the set is shared, so the many streams of one agent hold one copy of what
/// the entries need rather than one each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Everything every plugin knows how to find out (`explain`).
    everything: bool,
    kind_keys: Arc<BTreeSet<String>>,
}

impl Needs {
    /// Nothing beyond the kernel's credentials.
    pub fn none() -> Self {
        Self::default()
    }

    /// Everything every plugin can gather (for `explain`).
    pub fn everything() -> Self {
        Self {
            everything: true,
            kind_keys: Arc::default(),
        }
    }

    /// Adds a `type:key` (e.g. `unix:path`); a set that has it already is left as it is (and
    /// stays shared).
    pub fn insert(&mut self, kind_key: impl Into<String> + AsRef<str>) {
        if !self.wants(kind_key.as_ref()) {
            Arc::make_mut(&mut self.kind_keys).insert(kind_key.into());
        }
    }

    /// Whether selectors of `kind_key` must be gathered.
    pub fn wants(&self, kind_key: &str) -> bool {
        self.everything || self.kind_keys.contains(kind_key)
    }

    /// Whether any `type:key` of selector type `kind` (e.g. `systemd`) must be gathered.
    pub fn wants_type(&self, kind: &str) -> bool {
        self.everything
            || self
                .kind_keys
                .iter()
                .any(|k| k.split_once(':').is_some_and(|(t, _)| t == kind))
    }

    /// Whether everything `other` asks for is asked for here too.
    pub fn covers(&self, other: &Self) -> bool {
        self.everything
            || (!other.everything
                && (Arc::ptr_eq(&self.kind_keys, &other.kind_keys)
                    || other.kind_keys.iter().all(|k| self.kind_keys.contains(k))))
    }

    /// Both sets (sharing one of them when it holds the other).
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        if self.covers(other) {
            return self.clone();
        }
        if other.covers(self) {
            return other.clone();
        }
        Self {
            everything: false,
            kind_keys: Arc::new(self.kind_keys.union(&other.kind_keys).cloned().collect()),
        }
    }

    /// Whether this is [`Needs::everything`].
    pub fn is_everything(&self) -> bool {
        self.everything
    }

    /// The `type:key`s asked for, in order (empty for [`Needs::everything`]).
    pub fn kind_keys(&self) -> impl Iterator<Item = &str> {
        self.kind_keys.iter().map(String::as_str)
    }
}

impl<S: Into<String>> FromIterator<S> for Needs {
    fn from_iter<T: IntoIterator<Item = S>>(iter: T) -> Self {
        Self {
            everything: false,
            kind_keys: Arc::new(iter.into_iter().map(Into::into).collect()),
        }
    }
}

/// What attestation learned about a caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attested {
    /// Every selector the caller has among the types [`gathered`](Self::gathered).
    pub selectors: Selectors,
    /// The caller's uid (kernel fact).
    pub uid: u32,
    /// The caller's executable, when `/proc` was read for it.
    pub exe: Option<PathBuf>,
    /// Which selector types were gathered; selectors of other types were not looked for, so an
    /// entry that needs them must not be judged against these selectors (attest again).
    pub gathered: Needs,
    /// Selector types among [`gathered`](Self::gathered) that attestation looked for but could not
    /// vouch for, and why: those selectors are absent, so entries that need them do not match,
    /// while the caller keeps every identity its other selectors earn.
    pub left_out: Vec<LeftOut>,
}

/// A selector type that attestation left out for one caller, and why (for logs and `explain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftOut {
    /// The selector type, as [`Selector::kind_key`](crate::Selector::kind_key) gives it
    /// (`unix:path`).
    pub kind_key: String,
    /// Why, in a short sentence that names the fix when there is one.
    pub reason: String,
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind_key, self.reason)
    }
}

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The process that opened the connection has exited (or was replaced), so the facts read
    /// from `/proc` cannot be tied to it. This is also what a process that inherited a connection
    /// from an exited parent gets.
    #[error("the process that opened this connection (pid {pid}) is gone")]
    ProcessGone {
        /// The pid that `SO_PEERCRED` reported.
        pid: u32,
    },
    /// An attestor plugin failed for this caller (its selectors are left out).
    #[error("the {plugin} attestor failed: {reason}")]
    Plugin {
        /// The plugin's name.
        plugin: &'static str,
        /// What failed.
        reason: String,
    },
    /// `/proc/PID` could not be read.
    #[error("cannot read /proc/{pid}/{what}: {source}")]
    Proc {
        /// The pid.
        pid: u32,
        /// The file under `/proc/PID` that failed.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl AttestError {
    /// Whether the whole attestation must fail: the caller that connected is gone, so nothing
    /// read about it can be trusted. Other failures only cost the failing plugin's selectors.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::ProcessGone { .. })
    }
}

/// What one attestor plugin learned about a caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginAttested {
    /// Selectors of the plugin's own types.
    pub selectors: Vec<Selector>,
    /// The caller's executable, if the plugin read it (dev mode names synthetic IDs after it).
    pub exe: Option<PathBuf>,
    /// Types the plugin looked for but could not vouch for, and why.
    pub left_out: Vec<LeftOut>,
}

/// One source of selectors (`unix`, `systemd`; later `docker`, `k8s`): it owns its selector
/// types, checks selectors of those types, and attests callers for them.
#[async_trait::async_trait]
pub trait AttestorPlugin: Send + Sync + 'static {
    /// The plugin's name, for logs (`unix`).
    fn name(&self) -> &'static str;

    /// The selector types it derives (`["unix"]`).
    fn selector_types(&self) -> &'static [&'static str];

    /// Checks a selector of one of its types: the key is known and the value fits it.
    fn check(&self, selector: &Selector) -> Result<(), SelectorError>;

    /// Gathers the caller's selectors of the `type:key`s in `needs` that are its own. May do
    /// slow work (hashing an executable) but must not block the async executor doing it.
    async fn attest(&self, peer: &PeerCred, needs: &Needs) -> Result<PluginAttested, AttestError>;
}

/// Turns kernel facts about a caller into selectors (in the agent: the composite of the
/// configured [`AttestorPlugin`]s).
#[async_trait::async_trait]
pub trait Attestor: Send + Sync + 'static {
    /// Attests the caller described by `peer`, gathering at least `needs`.
    async fn attest(&self, peer: &PeerCred, needs: &Needs) -> Result<Attested, AttestError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_is_an_open_set_of_type_keys() {
        let mut n = Needs::none();
        assert!(!n.wants("unix:path"));
        n.insert("unix:path");
        n.insert("k8s:ns");
        assert!(n.wants("unix:path") && n.wants("k8s:ns") && !n.wants("unix:sha256"));
        assert!(n.wants_type("k8s") && !n.wants_type("systemd"));
        let small: Needs = ["unix:path"].into_iter().collect();
        assert!(n.covers(&small) && !small.covers(&n));
        assert!(Needs::everything().covers(&n) && !n.covers(&Needs::everything()));
        assert!(n.union(&Needs::everything()).is_everything());
        assert_eq!(
            small.union(&["systemd:id"].into_iter().collect()),
            ["systemd:id", "unix:path"].into_iter().collect()
        );
    }
}
