//! The agent's own SVID: its key (EC P-256, made here, zeroized), the CSR the server signs, and
//! the checks on what the server sent back.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use spiffe::{SpiffeId, TrustDomain};
use zeroize::Zeroizing;

use crate::cert::{self, CertFacts};

/// The agent SVID's private key: EC P-256. Zeroized on drop (rcgen's copy too); `Debug` shows
/// only the kind.
pub(crate) struct AgentKey {
    pair: KeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentKey(P-256, redacted)")
    }
}

impl AgentKey {
    /// A fresh key.
    pub(crate) fn generate() -> Result<Self, String> {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("cannot generate a key: {e}"))?;
        let pkcs8 = Zeroizing::new(pair.serialize_der());
        Ok(Self { pair, pkcs8 })
    }

    /// A stored key (PKCS#8 DER).
    pub(crate) fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let pair = KeyPair::try_from(der).map_err(|e| format!("not a usable key: {e}"))?;
        Ok(Self {
            pair,
            pkcs8: Zeroizing::new(der.to_vec()),
        })
    }

    /// The PKCS#8 DER, to persist.
    pub(crate) fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key bits (the SEC1 point), as in a certificate's subjectPublicKey.
    pub(crate) fn public_key(&self) -> &[u8] {
        self.pair.public_key_raw()
    }

    /// A self-signed PKCS#10 request for this key. The server takes only its public key; the
    /// subject is empty, as spire-agent's.
    pub(crate) fn csr(&self) -> Result<Vec<u8>, String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&self.pair)
            .map_err(|e| format!("cannot make a CSR: {e}"))?;
        Ok(csr.der().to_vec())
    }
}

/// An agent SVID with its key, checked.
pub(crate) struct AgentSvid {
    chain: Vec<Vec<u8>>,
    key: AgentKey,
    id: String,
    leaf: CertFacts,
}

impl fmt::Debug for AgentSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSvid")
            .field("id", &self.id)
            .field("serial", &self.leaf.serial)
            .field("not_after", &cert::show(self.leaf.not_after))
            .finish_non_exhaustive()
    }
}

impl AgentSvid {
    /// Checks a chain from the server (or from disk) against the key it is for: it parses, its
    /// leaf's only URI SAN is a SPIFFE ID in `td`, the leaf carries our public key, and it has
    /// not expired at `now`.
    pub(crate) fn new(
        chain: Vec<Vec<u8>>,
        key: AgentKey,
        td: &TrustDomain,
        now: SystemTime,
    ) -> Result<Self, String> {
        let Some(leaf_der) = chain.first() else {
            return Err("the SVID has no certificate".to_owned());
        };
        let leaf = cert::facts(leaf_der).map_err(|e| format!("the SVID does not parse: {e}"))?;
        for (i, c) in chain.iter().enumerate().skip(1) {
            cert::facts(c).map_err(|e| {
                format!(
                    "certificate #{} of the SVID chain does not parse: {e}",
                    i + 1
                )
            })?;
        }
        let id = match leaf.uris.as_slice() {
            [one] => one.clone(),
            [] => return Err("the SVID has no SPIFFE ID (no URI SAN)".to_owned()),
            many => {
                return Err(format!(
                    "the SVID has {} URI SANs ({}); an SVID has exactly one",
                    many.len(),
                    many.join(", ")
                ));
            }
        };
        let parsed =
            SpiffeId::new(&id).map_err(|e| format!("the SVID's ID {id:?} is not valid: {e}"))?;
        if !parsed.is_member_of(td) {
            return Err(format!(
                "the SVID's ID {id} is not in trust domain {} (is trust_domain the server's?)",
                td.as_str()
            ));
        }
        if leaf.public_key != key.public_key() {
            return Err("the SVID is not for the agent's key".to_owned());
        }
        if leaf.not_after <= now {
            return Err(format!(
                "the SVID expired at {}",
                cert::show(leaf.not_after)
            ));
        }
        Ok(Self {
            chain,
            key,
            id,
            leaf,
        })
    }

    /// The agent's SPIFFE ID.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The chain, leaf first (DER).
    pub(crate) fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// The key.
    pub(crate) fn key(&self) -> &AgentKey {
        &self.key
    }

    /// The leaf's serial number (hex).
    pub(crate) fn serial(&self) -> &str {
        &self.leaf.serial
    }

    /// Start of validity.
    pub(crate) fn not_before(&self) -> SystemTime {
        self.leaf.not_before
    }

    /// End of validity.
    pub(crate) fn not_after(&self) -> SystemTime {
        self.leaf.not_after
    }

    /// Whether it has expired at `now`.
    pub(crate) fn expired(&self, now: SystemTime) -> bool {
        self.leaf.not_after <= now
    }

    /// Whether a certificate of the chain was issued by `authority` (a CA certificate, DER):
    /// its issuer name is the authority's subject. Used to find an SVID that chains to a
    /// tainted authority.
    pub(crate) fn issued_under(&self, authority: &[u8]) -> bool {
        let Ok(a) = cert::facts(authority) else {
            return false;
        };
        self.chain.iter().any(|c| {
            c.as_slice() == authority || cert::facts(c).is_ok_and(|f| f.issuer == a.subject)
        })
    }

    /// The chain and key as rustls presents them.
    pub(crate) fn certified_key(&self) -> Result<Arc<CertifiedKey>, String> {
        let key = Zeroizing::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            self.key.pkcs8().to_vec(),
        )));
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key)
            .map_err(|e| format!("the agent key cannot sign: {e}"))?;
        let chain = self
            .chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        Ok(Arc::new(CertifiedKey::new(chain, signer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testing::TestCa;
    use time::Duration;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn an_svid_for_our_key_in_our_trust_domain_is_accepted() {
        let ca = TestCa::new("ca");
        let key = AgentKey::generate().unwrap();
        let pair = KeyPair::try_from(key.pkcs8()).unwrap();
        let leaf = ca.svid(
            &["spiffe://example.org/spire/agent/join_token/abc"],
            &pair,
            Duration::minutes(-1),
            Duration::hours(1),
        );
        let svid = AgentSvid::new(
            vec![leaf, ca.cert_der.clone()],
            key,
            &td(),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(svid.id(), "spiffe://example.org/spire/agent/join_token/abc");
        assert!(!svid.expired(SystemTime::now()));
        assert!(svid.issued_under(&ca.cert_der));
        assert!(!svid.issued_under(&TestCa::new("other").cert_der));
        svid.certified_key().unwrap();
        assert!(!format!("{svid:?}").contains("pkcs8"));
    }

    #[test]
    fn bad_svids_are_refused_with_reasons() {
        let ca = TestCa::new("ca");
        let key = AgentKey::generate().unwrap();
        let pair = KeyPair::try_from(key.pkcs8()).unwrap();
        let other_pair = KeyPair::generate().unwrap();
        let now = SystemTime::now();
        let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
            (vec![], "no certificate"),
            (vec![b"junk".to_vec()], "does not parse"),
            (
                vec![ca.svid(
                    &["spiffe://other.org/spire/agent/x"],
                    &pair,
                    Duration::minutes(-1),
                    Duration::hours(1),
                )],
                "not in trust domain example.org",
            ),
            (
                vec![ca.svid(
                    &["spiffe://example.org/a"],
                    &other_pair,
                    Duration::minutes(-1),
                    Duration::hours(1),
                )],
                "not for the agent's key",
            ),
            (
                vec![ca.svid(
                    &["spiffe://example.org/a"],
                    &pair,
                    Duration::hours(-2),
                    Duration::hours(-1),
                )],
                "expired",
            ),
            (
                vec![ca.svid(&[], &pair, Duration::minutes(-1), Duration::hours(1))],
                "no SPIFFE ID",
            ),
        ];
        for (chain, want) in cases {
            let key = AgentKey::from_pkcs8(key.pkcs8()).unwrap();
            let e = AgentSvid::new(chain, key, &td(), now).unwrap_err();
            assert!(e.contains(want), "{e} should say {want}");
        }
    }

    #[test]
    fn csrs_carry_the_key() {
        let key = AgentKey::generate().unwrap();
        let csr = key.csr().unwrap();
        use rcgen::PublicKeyData as _;
        let params = rcgen::CertificateSigningRequestParams::from_der(&csr.into()).unwrap();
        assert_eq!(params.public_key.der_bytes(), key.public_key());
        assert!(!format!("{key:?}").contains(&format!("{:?}", key.pkcs8())));
    }
}
