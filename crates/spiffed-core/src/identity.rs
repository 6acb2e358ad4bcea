//! What the authority hands out (SVIDs and bundles) and the authority seam.

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

/// Keeps SVIDs of on-demand entries (synthetic identities) alive while held.
///
/// Streams hold the lease for as long as they serve those identities; once every lease is
/// dropped the authority may stop rotating them.
#[derive(Debug, Clone, Default)]
pub struct Lease(pub Vec<Arc<dyn std::any::Any + Send + Sync>>);

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
    #[error("the CA is not available: {0}")]
    Unavailable(String),
}

/// Mints and caches SVIDs per entry and publishes the trust bundle.
pub trait Authority: Send + Sync + 'static {
    /// The trust domain this authority signs for.
    fn trust_domain(&self) -> &TrustDomain;

    /// A receiver whose value changes whenever any SVID is re-minted or the bundle changes.
    /// Streams wait on it and then recompute what their caller should see.
    fn changes(&self) -> watch::Receiver<u64>;

    /// The current X.509 bundle of the trust domain.
    fn x509_bundle(&self) -> Arc<X509Bundle>;

    /// The current identity for each entry, in the given order, minting what is missing.
    fn identities(&self, entries: &[Arc<Entry>]) -> Result<(Vec<Identity>, Lease), AuthorityError>;

    /// The current JWT bundle of the trust domain.
    fn jwt_bundle(&self) -> Arc<JwtBundle>;

    /// A JWT-SVID for each entry with the given audiences (cached per entry and audience set,
    /// re-minted at half its lifetime).
    fn jwt_svids(
        &self,
        entries: &[Arc<Entry>],
        audience: &[String],
    ) -> Result<Vec<Arc<JwtSvid>>, AuthorityError>;

    /// Validates a JWT-SVID for `audience` against the JWT authorities the agent trusts.
    fn validate_jwt(&self, token: &str, audience: &str) -> Result<ValidatedJwt, JwtError>;
}
