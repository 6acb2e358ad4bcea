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
}
