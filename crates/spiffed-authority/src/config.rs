//! The authority's errors and configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use spiffed_core::TrustDomain;

/// Errors of the authority.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The CA file exists but cannot be understood. It is never replaced silently: a new CA
    /// would break trust with every workload holding the old bundle.
    #[error(
        "the CA file {} is corrupt ({why}); restore it from backup, or move it away and start \
         with --new-trust-root to create a new CA (workloads must then fetch the new bundle)",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The CA file belongs to another trust domain.
    #[error(
        "the CA file {} belongs to trust domain {found:?}, not {wanted:?}; use another data_dir",
        path.display()
    )]
    OtherTrustDomain {
        /// The file.
        path: PathBuf,
        /// Its trust domain.
        found: String,
        /// The configured one.
        wanted: String,
    },
    /// Key generation, signing or certificate encoding failed.
    #[error("crypto failure: {0}")]
    Crypto(String),
    /// A CA would have to be created that no earlier CA announced in the bundle: a new trust
    /// root for every workload and peer, which needs the operator's consent
    /// ([`NewRootPolicy`]).
    #[error(
        "the CA file {} {why}; creating a new CA would silently replace the trust root of every \
         workload and peer. Restore the file from a backup, or, to accept a new trust root, start \
         once with `spiffed run --new-trust-root` (workloads and peers must then fetch the new \
         bundle)",
        path.display()
    )]
    NewTrustRoot {
        /// The CA file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// No CA (or JWT key) is valid at this moment, so nothing may be signed.
    #[error("no CA is valid now: {0}")]
    NoValidCa(String),
    /// The upstream authority's files cannot be used (at start, or when a rotation reads
    /// them again).
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// A federated bundle was given for the agent's own trust domain, whose bundle only the
    /// embedded CA sets.
    #[error(
        "a federated bundle for {0:?} was refused: that is the agent's own trust domain, whose \
         bundle comes from its CA; remove it from the federation list"
    )]
    FederatedOwnTrustDomain(String),
}

impl Error {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }
}

/// When the authority may create a CA that no earlier CA announced in the bundle (a new trust
/// root): on a data dir that held a CA or an entry store before, that CA was deleted, emptied,
/// retired or let expire, and a new one silently breaks trust with every workload and peer.
/// A CA created on a fresh data dir, and the scheduled rotation (prepared, published, then
/// activated), are always allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NewRootPolicy {
    /// Never: start-up fails with [`Error::NewTrustRoot`]; while running (every CA expired, as
    /// after a forward clock jump) nothing is signed until the operator acts. `spiffed run`.
    #[default]
    Refuse,
    /// At start-up, with a warning naming the new CA's fingerprint; while running, as
    /// [`NewRootPolicy::Refuse`]. `spiffed run --new-trust-root`.
    AtStart,
    /// Whenever no CA can sign, at start-up or while running, with a warning naming the new CA's
    /// fingerprint. `spiffed dev`, which is zero-config.
    Always,
}

/// Default for [`AuthorityConfig::premint_entries`].
pub const DEFAULT_PREMINT_ENTRIES: usize = 1_000;

/// What the authority needs to know.
#[derive(Clone, Debug)]
pub struct AuthorityConfig {
    /// The trust domain signed for.
    pub trust_domain: TrustDomain,
    /// Where `ca.json` lives (created 0700 if missing).
    pub data_dir: PathBuf,
    /// Lifetime of each CA certificate.
    pub ca_ttl: Duration,
    /// Default X.509-SVID lifetime (entries may override).
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime (entries may override).
    pub jwt_svid_ttl: Duration,
    /// When a new trust root may be created.
    pub new_root: NewRootPolicy,
    /// How many registered entries get an X.509-SVID minted ahead, in the background, before
    /// anyone asks (default [`DEFAULT_PREMINT_ENTRIES`]); they are kept and rotated even when
    /// unused, so their first fetch costs no signature. Every other entry is minted on its
    /// first fetch and kept while a stream holds it or it was used within the last minute.
    /// Memory grows with this budget plus what workloads use, not with the number of entries
    /// (about 2 KiB per SVID). 0 pre-mints nothing.
    pub premint_entries: usize,
    /// An upstream CA from files: the CAs become intermediates it signs, and the X.509
    /// bundle holds its roots (`None`: self-signed CAs, each its own root).
    pub upstream: Option<crate::UpstreamConfig>,
}

/// The entry store's file in `data_dir`: its presence shows the data dir was used before.
pub(crate) const STORE_FILE: &str = "entries.sqlite";

/// The first wait after a failed CA rotation step (e.g. `ca.json` cannot be written: the disk is
/// full, or no file descriptor is left); it doubles with each failure in a row, up to
/// [`ROTATION_BACKOFF_MAX`].
pub(crate) const ROTATION_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two attempts of a failing CA rotation step.
pub(crate) const ROTATION_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// While a failure repeats (rotation, or no CA valid), a summary line is logged this often; the
/// first occurrence and the recovery are logged at once.
pub(crate) const ALARM_REPEAT: Duration = Duration::from_secs(300);
