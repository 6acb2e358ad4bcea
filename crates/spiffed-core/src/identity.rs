//! What the authority hands out (SVIDs and bundles) and the authority seam.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::Entry;

/// A private key as unencrypted PKCS#8 DER.
///
/// The bytes are zeroized when the key is dropped, and `Debug` shows only the length.
pub struct PrivateKey(Zeroizing<Vec<u8>>);

impl PrivateKey {
    /// Wraps PKCS#8 DER bytes.
    pub fn new(pkcs8_der: Zeroizing<Vec<u8>>) -> Self {
        Self(pkcs8_der)
    }

    /// The PKCS#8 DER bytes.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({} bytes, redacted)", self.0.len())
    }
}

/// An X.509-SVID: a certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct X509Svid {
    /// The SPIFFE ID in the leaf's URI SAN.
    pub spiffe_id: SpiffeId,
    /// The chain as concatenated DER, leaf first.
    pub cert_chain_der: Vec<u8>,
    /// The leaf's private key.
    pub key: PrivateKey,
    /// The leaf's serial number (big-endian bytes).
    pub serial: Vec<u8>,
    /// The leaf's notBefore.
    pub not_before: SystemTime,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
}

/// The X.509 authorities of the trust domain: every CA certificate a workload must trust now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Bundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// CA certificates, DER, oldest first.
    pub authorities: Vec<Vec<u8>>,
    /// A number that grows whenever the set of authorities changes (`spiffe_sequence`).
    pub sequence: u64,
}

impl X509Bundle {
    /// The authorities as concatenated DER (the Workload API's bundle encoding).
    pub fn concatenated_der(&self) -> Vec<u8> {
        self.authorities.concat()
    }
}

/// A JWT-SVID: a signed token (JWS compact serialization) and when it expires.
pub struct JwtSvid {
    /// The `sub` claim.
    pub spiffe_id: SpiffeId,
    /// The token; zeroized on drop, never printed by `Debug`.
    pub token: Zeroizing<String>,
    /// The `exp` claim.
    pub expiry: SystemTime,
    /// The `iat` claim.
    pub issued_at: SystemTime,
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

/// One JWT signing key as published in the JWT bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// The key id (`kid`), set in every token it signs.
    pub kid: String,
    /// The EC P-256 public key as an uncompressed point (0x04 || X || Y).
    pub public_point: Vec<u8>,
    /// When the key stops being published.
    pub not_after: SystemTime,
}

/// The JWT signing keys of a trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The published keys, oldest first.
    pub keys: Vec<JwtAuthority>,
    /// A number that grows whenever the key set changes.
    pub sequence: u64,
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedJwt {
    /// The `sub` claim.
    pub spiffe_id: SpiffeId,
    /// Every claim of the payload, as a JSON object.
    pub claims_json: Vec<u8>,
}

/// Why a JWT-SVID was rejected. Each message names the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three unpadded base64url parts of JSON objects.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The `alg` header is not in the allow-list (none, HS*, EdDSA, lower case...).
    #[error("token algorithm {0:?} is not allowed")]
    Algorithm(String),
    /// The `alg` does not fit the key that `kid` names.
    #[error("token algorithm {alg:?} does not match the {key} key {kid:?}")]
    AlgorithmMismatch {
        /// The header's alg.
        alg: String,
        /// The key's type.
        key: &'static str,
        /// The key id.
        kid: String,
    },
    /// The header has no `kid`.
    #[error("token header has no kid")]
    MissingKid,
    /// The header has a member a JWT-SVID must not have, or a bad `typ`.
    #[error("token header is not allowed: {0}")]
    Header(String),
    /// A required claim is missing or has the wrong type.
    #[error("token claim {0}")]
    Claim(String),
    /// `sub` is not a valid SPIFFE ID.
    #[error("token subject {0:?} is not a valid SPIFFE ID")]
    Subject(String),
    /// There are no JWT authorities for the subject's trust domain.
    #[error("no JWT authorities for trust domain {0:?}")]
    NoBundle(String),
    /// The `kid` is not among the trust domain's JWT authorities.
    #[error("token key id {0:?} is not a JWT authority of the trust domain")]
    UnknownKid(String),
    /// The signature does not verify.
    #[error("token signature does not verify")]
    Signature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token is not yet valid")]
    NotYetValid,
    /// The requested audience is not in `aud`.
    #[error("token audience {got:?} does not contain {want:?}")]
    Audience {
        /// The requested audience.
        want: String,
        /// The token's audiences.
        got: Vec<String>,
    },
}

/// One identity granted to a caller: the entry and its current SVID.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The registration entry that granted it.
    pub entry: Arc<Entry>,
    /// The current X.509-SVID for that entry.
    pub x509: Arc<X509Svid>,
}

/// A subscription to one entry's X.509-SVID: the current SVID now, and a wake-up whenever the
/// issuer replaces it (rotation, a changed entry). Only the streams holding that entry wake.
///
/// Holding it keeps the SVID alive and rotated (the issuer counts the receivers); once every
/// watch on an entry that is not registered any more is dropped, the issuer may forget it.
#[derive(Debug, Clone)]
pub struct SvidWatch {
    rx: watch::Receiver<Arc<X509Svid>>,
}

impl SvidWatch {
    /// Wraps a receiver of the entry's SVIDs (the issuer keeps the sender).
    pub fn new(rx: watch::Receiver<Arc<X509Svid>>) -> Self {
        Self { rx }
    }

    /// The current SVID, marking it seen.
    pub fn current(&mut self) -> Arc<X509Svid> {
        self.rx.borrow_and_update().clone()
    }

    /// The current SVID, without marking it seen.
    pub fn peek(&self) -> Arc<X509Svid> {
        self.rx.borrow().clone()
    }

    /// Waits until the SVID is replaced; false when the issuer dropped the entry (stopping).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Whether a replacement arrived that [`current`](Self::current) has not returned yet.
    pub fn has_changed(&self) -> bool {
        self.rx.has_changed().unwrap_or(false)
    }
}

/// The bundles of one trust domain: its X.509 authorities and its JWT authorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    /// The X.509 authorities.
    pub x509: Arc<X509Bundle>,
    /// The JWT authorities.
    pub jwt: Arc<JwtBundle>,
}

impl TrustBundle {
    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.x509.trust_domain
    }
}

/// Every trust bundle the agent hands out: its own trust domain's, plus federated ones, keyed by
/// trust domain. Published on a watch; `sequence` grows whenever any bundle changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSet {
    own: TrustDomain,
    bundles: BTreeMap<TrustDomain, TrustBundle>,
    sequence: u64,
}

impl BundleSet {
    /// A set with the own trust domain's bundle only.
    pub fn new(own: TrustBundle, sequence: u64) -> Self {
        let td = own.trust_domain().clone();
        Self {
            bundles: BTreeMap::from([(td.clone(), own)]),
            own: td,
            sequence,
        }
    }

    /// The same set with `bundle` added or replaced (a federated trust domain), and `sequence`.
    /// The own trust domain's bundle is replaced the same way.
    #[must_use]
    pub fn with(mut self, bundle: TrustBundle, sequence: u64) -> Self {
        self.bundles.insert(bundle.trust_domain().clone(), bundle);
        self.sequence = sequence;
        self
    }

    /// The same set without a federated trust domain (the own one stays).
    #[must_use]
    pub fn without(mut self, td: &TrustDomain, sequence: u64) -> Self {
        if td != &self.own {
            self.bundles.remove(td);
        }
        self.sequence = sequence;
        self
    }

    /// The own trust domain.
    pub fn own_trust_domain(&self) -> &TrustDomain {
        &self.own
    }

    /// The own trust domain's bundle.
    pub fn own(&self) -> &TrustBundle {
        // `new` puts it in and `without` never takes it out.
        self.bundles
            .get(&self.own)
            .unwrap_or_else(|| unreachable!("the own bundle is always in the set"))
    }

    /// The bundle of `td`, own or federated.
    pub fn get(&self, td: &TrustDomain) -> Option<&TrustBundle> {
        self.bundles.get(td)
    }

    /// Every bundle, the own one included, ordered by trust domain.
    pub fn all(&self) -> impl Iterator<Item = &TrustBundle> {
        self.bundles.values()
    }

    /// The federated bundles (every one but the own), ordered by trust domain.
    pub fn federated(&self) -> impl Iterator<Item = &TrustBundle> {
        self.bundles
            .iter()
            .filter(|(td, _)| **td != self.own)
            .map(|(_, b)| b)
    }

    /// Grows whenever any bundle in the set changes.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
}

/// Why the authority could not produce an identity.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// Signing or key generation failed.
    #[error("minting an SVID for {spiffe_id} failed: {reason}")]
    Mint {
        /// The identity being minted.
        spiffe_id: String,
        /// What failed.
        reason: String,
    },
    /// The authority has no usable CA right now.
    #[error("no identity can be issued now: {0}")]
    Unavailable(String),
}

/// Where SVIDs and bundles come from: the embedded CA today, a SPIRE Server next.
///
/// Async, so that an implementation may call a server. Signing, key generation and file I/O
/// must never run under a lock that these calls take on the request path.
#[async_trait::async_trait]
pub trait Issuer: Send + Sync + 'static {
    /// The trust domain SVIDs are issued in.
    fn trust_domain(&self) -> &TrustDomain;

    /// The bundle set (own and federated trust domains), published whenever it changes.
    fn bundles(&self) -> watch::Receiver<Arc<BundleSet>>;

    /// The entry's current X.509-SVID and a subscription to its replacements, minting (or
    /// fetching) one if there is none yet. An SVID handed out is valid at the moment.
    async fn x509_svid(&self, entry: &Arc<Entry>) -> Result<SvidWatch, AuthorityError>;

    /// A JWT-SVID for the entry with these audiences (cached behind the seam per entry and
    /// audience set, renewed before it expires).
    async fn jwt_svid(
        &self,
        entry: &Arc<Entry>,
        audience: &[String],
    ) -> Result<Arc<JwtSvid>, AuthorityError>;

    /// Validates a JWT-SVID for `audience` against the JWT authorities of the bundle set.
    fn validate_jwt(&self, token: &str, audience: &str) -> Result<ValidatedJwt, JwtError>;
}
