//! The `x509pop` node attestor, agent side (SPIRE's `pkg/common/plugin/x509pop`): the node
//! proves it holds the key of a certificate that chains to a CA the server trusts.
//!
//! - Payload (JSON): `{"certificates": [base64 DER, ...]}`, the leaf first, then the other
//!   certificates of the certificate file, then those of `intermediates_path`.
//! - Challenge (JSON): `{"rsa_signature": {"nonce": b64} | null, "ecdsa_signature": ... }`
//!   with a 32-byte nonce, matching the leaf's key type.
//! - Response (JSON): with our own 32-byte nonce `n2` and `d = SHA-256(nonce ‖ n2)`:
//!   ECDSA `{"ecdsa_signature": {"nonce": b64(n2), "r": b64(R), "s": b64(S)}}` signing `d` as
//!   the digest (Go's `ecdsa.Sign(priv, d)`); RSA `{"rsa_signature": {"nonce": b64(n2),
//!   "signature": b64(RSASSA-PSS-SHA256 over d as the digest)}}`.
//!
//! The files are read at every attestation, as spire-agent does, so a renewed node
//! certificate is used at the next re-attestation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::hazmat::PrehashSigner;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::DecodePrivateKey;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::cert;

/// The nonce length both sides use.
const NONCE_LEN: usize = 32;

/// The node's key (zeroized on drop by the key types themselves).
enum PopKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl PopKey {
    fn kind(&self) -> &'static str {
        match self {
            Self::P256(_) => "ECDSA P-256",
            Self::P384(_) => "ECDSA P-384",
            Self::Rsa(_) => "RSA",
        }
    }

    /// The public key bits as a certificate's subjectPublicKey holds them.
    fn public_bits(&self) -> Result<Vec<u8>, String> {
        Ok(match self {
            Self::P256(k) => k
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec(),
            Self::P384(k) => k
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec(),
            Self::Rsa(k) => k
                .to_public_key()
                .to_pkcs1_der()
                .map_err(|e| e.to_string())?
                .as_bytes()
                .to_vec(),
        })
    }
}

/// The node's certificate chain and key, loaded from the configured files.
pub(crate) struct X509Pop {
    chain: Vec<Vec<u8>>,
    key: PopKey,
}

impl fmt::Debug for X509Pop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Pop")
            .field("certificates", &self.chain.len())
            .field("key", &self.key.kind())
            .finish()
    }
}

#[derive(Serialize)]
struct AttestationData {
    certificates: Vec<String>,
}

#[derive(Deserialize)]
struct Challenge {
    rsa_signature: Option<NonceChallenge>,
    ecdsa_signature: Option<NonceChallenge>,
}

#[derive(Deserialize)]
struct NonceChallenge {
    nonce: String,
}

#[derive(Serialize)]
struct Response {
    rsa_signature: Option<RsaResponse>,
    ecdsa_signature: Option<EcdsaResponse>,
}

#[derive(Serialize)]
struct RsaResponse {
    nonce: String,
    signature: String,
}

#[derive(Serialize)]
struct EcdsaResponse {
    nonce: String,
    r: String,
    s: String,
}

fn read(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| format!("cannot read the x509pop {what} {}: {e}", path.display()))
}

fn pem_certs(path: &Path, what: &str) -> Result<Vec<Vec<u8>>, String> {
    let pem = read(path, what)?;
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("the x509pop {what} {} is not PEM: {e}", path.display()))?;
        out.push(c.to_vec());
    }
    if out.is_empty() {
        return Err(format!(
            "the x509pop {what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(out)
}

fn load_key(path: &Path) -> Result<PopKey, String> {
    let pem = read(path, "private key")?;
    let bad = |e: String| format!("the x509pop private key {} {e}", path.display());
    let der = Zeroizing::new(PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        bad(format!(
            "is not a PEM private key (PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or \
             SEC1 \"EC PRIVATE KEY\"): {e}"
        ))
    })?);
    let unsupported =
        || bad("is of a type x509pop cannot use here: use ECDSA P-256, P-384 or RSA".to_owned());
    match &*der {
        PrivateKeyDer::Pkcs8(k) => {
            let k = k.secret_pkcs8_der();
            if let Ok(s) = p256::SecretKey::from_pkcs8_der(k) {
                Ok(PopKey::P256(s.into()))
            } else if let Ok(s) = p384::SecretKey::from_pkcs8_der(k) {
                Ok(PopKey::P384(s.into()))
            } else if let Ok(r) = rsa::RsaPrivateKey::from_pkcs8_der(k) {
                Ok(PopKey::Rsa(Box::new(r)))
            } else {
                Err(unsupported())
            }
        }
        PrivateKeyDer::Pkcs1(k) => rsa::RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der())
            .map(|r| PopKey::Rsa(Box::new(r)))
            .map_err(|e| bad(format!("is not a valid PKCS#1 RSA key: {e}"))),
        PrivateKeyDer::Sec1(k) => {
            let k = k.secret_sec1_der();
            if let Ok(s) = p256::SecretKey::from_sec1_der(k) {
                Ok(PopKey::P256(s.into()))
            } else if let Ok(s) = p384::SecretKey::from_sec1_der(k) {
                Ok(PopKey::P384(s.into()))
            } else {
                Err(unsupported())
            }
        }
        _ => Err(unsupported()),
    }
}

impl X509Pop {
    /// Reads and checks the node's files: the certificate file (leaf first, then any
    /// intermediates), the key (it must be the leaf's), and the optional intermediates.
    pub(crate) fn load(
        certificate_path: &Path,
        private_key_path: &Path,
        intermediates_path: Option<&PathBuf>,
        now: SystemTime,
    ) -> Result<Self, String> {
        let mut chain = pem_certs(certificate_path, "certificate")?;
        if let Some(p) = intermediates_path {
            chain.extend(pem_certs(p, "intermediates file")?);
        }
        let leaf = cert::facts(&chain[0]).map_err(|e| {
            format!(
                "the x509pop certificate {} does not parse: {e}",
                certificate_path.display()
            )
        })?;
        let key = load_key(private_key_path)?;
        if key.public_bits()? != leaf.public_key {
            return Err(format!(
                "the x509pop private key {} is not the key of the certificate {} (the first \
                 certificate in that file must be the node's own)",
                private_key_path.display(),
                certificate_path.display()
            ));
        }
        if leaf.digital_signature != Some(true) {
            return Err(format!(
                "the x509pop certificate {} lacks KeyUsage digitalSignature, which the server's \
                 x509pop attestor requires: issue it with keyUsage = digitalSignature",
                certificate_path.display()
            ));
        }
        if leaf.not_after <= now {
            return Err(format!(
                "the x509pop certificate {} expired at {}: renew it",
                certificate_path.display(),
                cert::show(leaf.not_after)
            ));
        }
        Ok(Self { chain, key })
    }

    /// The agent ID the server gives this node by default
    /// (`spiffe://TD/spire/agent/x509pop/<SHA-1 of the leaf DER, hex>`).
    pub(crate) fn default_agent_id(&self, td: &str) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &self.chain[0]);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("spiffe://{td}/spire/agent/x509pop/{hex}")
    }

    /// The attestation payload.
    pub(crate) fn payload(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(&AttestationData {
            certificates: self.chain.iter().map(|c| B64.encode(c)).collect(),
        })
        .map_err(|e| e.to_string())
    }

    /// The answer to a challenge from the server.
    pub(crate) fn respond(&self, challenge: &[u8]) -> Result<Vec<u8>, String> {
        let c: Challenge = serde_json::from_slice(challenge)
            .map_err(|e| format!("the server's x509pop challenge is not valid JSON: {e}"))?;
        let wanted = match (&self.key, &c.rsa_signature, &c.ecdsa_signature) {
            (PopKey::Rsa(_), Some(n), _) => n,
            (PopKey::P256(_) | PopKey::P384(_), _, Some(n)) => n,
            (k, _, _) => {
                return Err(format!(
                    "the server's x509pop challenge is not for a {} key (rsa_signature: {}, \
                     ecdsa_signature: {})",
                    k.kind(),
                    c.rsa_signature.is_some(),
                    c.ecdsa_signature.is_some()
                ));
            }
        };
        let nonce = B64
            .decode(&wanted.nonce)
            .map_err(|e| format!("the server's x509pop nonce is not base64: {e}"))?;
        if nonce.len() != NONCE_LEN {
            return Err(format!(
                "the server's x509pop nonce has {} bytes, expected {NONCE_LEN}",
                nonce.len()
            ));
        }
        let mut ours = [0u8; NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut ours)
            .map_err(|_| "no randomness for the x509pop nonce".to_owned())?;
        let digest: [u8; 32] = Sha256::new()
            .chain_update(&nonce)
            .chain_update(ours)
            .finalize()
            .into();
        let sign_err = |e: &dyn fmt::Display| format!("cannot sign the x509pop challenge: {e}");
        let response = match &self.key {
            PopKey::P256(k) => {
                let sig: p256::ecdsa::Signature =
                    k.sign_prehash(&digest).map_err(|e| sign_err(&e))?;
                let (r, s) = sig.split_bytes();
                ecdsa_response(&ours, &r, &s)
            }
            PopKey::P384(k) => {
                let sig: p384::ecdsa::Signature =
                    k.sign_prehash(&digest).map_err(|e| sign_err(&e))?;
                let (r, s) = sig.split_bytes();
                ecdsa_response(&ours, &r, &s)
            }
            PopKey::Rsa(k) => {
                let sig = k
                    .sign_with_rng(&mut rand::thread_rng(), rsa::Pss::new::<Sha256>(), &digest)
                    .map_err(|e| sign_err(&e))?;
                Response {
                    rsa_signature: Some(RsaResponse {
                        nonce: B64.encode(ours),
                        signature: B64.encode(sig),
                    }),
                    ecdsa_signature: None,
                }
            }
        };
        serde_json::to_vec(&response).map_err(|e| e.to_string())
    }
}

fn ecdsa_response(nonce: &[u8], r: &[u8], s: &[u8]) -> Response {
    Response {
        rsa_signature: None,
        ecdsa_signature: Some(EcdsaResponse {
            nonce: B64.encode(nonce),
            r: B64.encode(r),
            s: B64.encode(s),
        }),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Node certificates for tests.

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    use std::path::{Path, PathBuf};

    /// A node CA and what it signs.
    pub(crate) struct NodeCa {
        issuer: Issuer<'static, KeyPair>,
    }

    impl NodeCa {
        pub(crate) fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name
                .push(DnType::CommonName, "x509pop test CA");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            Self {
                issuer: Issuer::new(p, key),
            }
        }

        /// Writes `node.pem` for the key in PKCS#8 DER `key_pkcs8` (and `node.key` as
        /// `key_pem`), returning both paths.
        pub(crate) fn node(
            &self,
            dir: &Path,
            key_pkcs8: &[u8],
            key_pem: &str,
            usages: Vec<KeyUsagePurpose>,
        ) -> (PathBuf, PathBuf) {
            let subject = KeyPair::try_from(key_pkcs8).unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name
                .push(DnType::CommonName, "node1.example.org");
            p.key_usages = usages;
            let cert = p.signed_by(&subject, &self.issuer).unwrap();
            let (c, k) = (dir.join("node.pem"), dir.join("node.key"));
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key_pem).unwrap();
            (c, k)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::NodeCa;
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    use rcgen::KeyUsagePurpose;
    use rsa::pkcs1::EncodeRsaPrivateKey;

    fn challenge(kind: &str, nonce: &[u8]) -> Vec<u8> {
        let other = if kind == "rsa_signature" {
            "ecdsa_signature"
        } else {
            "rsa_signature"
        };
        format!(
            r#"{{"{kind}":{{"nonce":"{}"}},"{other}":null}}"#,
            B64.encode(nonce)
        )
        .into_bytes()
    }

    fn digest(challenge_nonce: &[u8], response: &serde_json::Value) -> [u8; 32] {
        let ours = B64.decode(response["nonce"].as_str().unwrap()).unwrap();
        assert_eq!(ours.len(), 32);
        Sha256::new()
            .chain_update(challenge_nonce)
            .chain_update(&ours)
            .finalize()
            .into()
    }

    #[test]
    fn ecdsa_p256_sec1_key_answers_a_challenge_the_server_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ca = NodeCa::new();
        let secret = p256::SecretKey::random(&mut rand::thread_rng());
        let pkcs8 = secret.to_pkcs8_der().unwrap();
        let sec1_pem = secret.to_sec1_pem(LineEnding::LF).unwrap();
        let (c, k) = ca.node(
            dir.path(),
            pkcs8.as_bytes(),
            &sec1_pem,
            vec![KeyUsagePurpose::DigitalSignature],
        );
        let node = X509Pop::load(&c, &k, None, SystemTime::now()).unwrap();

        let payload: serde_json::Value = serde_json::from_slice(&node.payload().unwrap()).unwrap();
        let certs = payload["certificates"].as_array().unwrap();
        assert_eq!(certs.len(), 1);
        let leaf = B64.decode(certs[0].as_str().unwrap()).unwrap();
        assert_eq!(leaf, node.chain[0]);
        let id = node.default_agent_id("example.org");
        assert!(id.starts_with("spiffe://example.org/spire/agent/x509pop/"));
        assert_eq!(
            id.len(),
            "spiffe://example.org/spire/agent/x509pop/".len() + 40
        );

        let nonce = [7u8; 32];
        let resp = node.respond(&challenge("ecdsa_signature", &nonce)).unwrap();
        let resp: serde_json::Value = serde_json::from_slice(&resp).unwrap();
        assert!(resp["rsa_signature"].is_null());
        let e = &resp["ecdsa_signature"];
        let d = digest(&nonce, e);
        let r = B64.decode(e["r"].as_str().unwrap()).unwrap();
        let s = B64.decode(e["s"].as_str().unwrap()).unwrap();
        let sig = p256::ecdsa::Signature::from_slice(&[r, s].concat()).unwrap();
        let vk = p256::ecdsa::VerifyingKey::from(secret.public_key());
        vk.verify_prehash(&d, &sig).unwrap();
        // A different digest does not verify: the check can fail.
        assert!(vk.verify_prehash(&[0u8; 32], &sig).is_err());
    }

    #[test]
    fn ecdsa_p384_pkcs8_key_answers_too() {
        let dir = tempfile::tempdir().unwrap();
        let ca = NodeCa::new();
        let secret = p384::SecretKey::random(&mut rand::thread_rng());
        let pkcs8 = secret.to_pkcs8_der().unwrap();
        let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        let (c, k) = ca.node(
            dir.path(),
            pkcs8.as_bytes(),
            &pem,
            vec![KeyUsagePurpose::DigitalSignature],
        );
        let node = X509Pop::load(&c, &k, None, SystemTime::now()).unwrap();
        let nonce = [9u8; 32];
        let resp: serde_json::Value =
            serde_json::from_slice(&node.respond(&challenge("ecdsa_signature", &nonce)).unwrap())
                .unwrap();
        let e = &resp["ecdsa_signature"];
        let d = digest(&nonce, e);
        let r = B64.decode(e["r"].as_str().unwrap()).unwrap();
        let s = B64.decode(e["s"].as_str().unwrap()).unwrap();
        let sig = p384::ecdsa::Signature::from_slice(&[r, s].concat()).unwrap();
        p384::ecdsa::VerifyingKey::from(secret.public_key())
            .verify_prehash(&d, &sig)
            .unwrap();
    }

    #[test]
    fn rsa_pkcs1_key_answers_with_pss_over_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let ca = NodeCa::new();
        let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let pkcs8 = rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&key).unwrap();
        let pem = key.to_pkcs1_pem(LineEnding::LF).unwrap();
        let (c, k) = ca.node(
            dir.path(),
            pkcs8.as_bytes(),
            &pem,
            vec![KeyUsagePurpose::DigitalSignature],
        );
        let node = X509Pop::load(&c, &k, None, SystemTime::now()).unwrap();
        let nonce = [3u8; 32];
        let resp: serde_json::Value =
            serde_json::from_slice(&node.respond(&challenge("rsa_signature", &nonce)).unwrap())
                .unwrap();
        assert!(resp["ecdsa_signature"].is_null());
        let r = &resp["rsa_signature"];
        let d = digest(&nonce, r);
        let sig = B64.decode(r["signature"].as_str().unwrap()).unwrap();
        key.to_public_key()
            .verify(rsa::Pss::new::<Sha256>(), &d, &sig)
            .unwrap();
        assert!(
            key.to_public_key()
                .verify(rsa::Pss::new::<Sha256>(), &[1u8; 32], &sig)
                .is_err()
        );
        // An ECDSA challenge for an RSA key is refused with the reason.
        let e = node
            .respond(&challenge("ecdsa_signature", &nonce))
            .unwrap_err();
        assert!(e.contains("not for a RSA key"), "{e}");
    }

    #[test]
    fn bad_node_files_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let ca = NodeCa::new();
        let secret = p256::SecretKey::random(&mut rand::thread_rng());
        let pkcs8 = secret.to_pkcs8_der().unwrap();
        let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        // No digitalSignature.
        let (c, k) = ca.node(
            dir.path(),
            pkcs8.as_bytes(),
            &pem,
            vec![KeyUsagePurpose::KeyEncipherment],
        );
        let e = X509Pop::load(&c, &k, None, SystemTime::now()).unwrap_err();
        assert!(e.contains("lacks KeyUsage digitalSignature"), "{e}");
        // A key that is not the certificate's.
        let (c, _) = ca.node(
            dir.path(),
            pkcs8.as_bytes(),
            &pem,
            vec![KeyUsagePurpose::DigitalSignature],
        );
        let other = p256::SecretKey::random(&mut rand::thread_rng())
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap();
        std::fs::write(&k, other.as_bytes()).unwrap();
        let e = X509Pop::load(&c, &k, None, SystemTime::now()).unwrap_err();
        assert!(e.contains("is not the key of the certificate"), "{e}");
        // Not PEM, missing files.
        std::fs::write(&k, "hello").unwrap();
        let e = X509Pop::load(&c, &k, None, SystemTime::now()).unwrap_err();
        assert!(e.contains("is not a PEM private key"), "{e}");
        let e =
            X509Pop::load(&dir.path().join("nope.pem"), &k, None, SystemTime::now()).unwrap_err();
        assert!(e.contains("cannot read the x509pop certificate"), "{e}");
        std::fs::write(&k, pem.as_bytes()).unwrap();
        let node = X509Pop::load(&c, &k, None, SystemTime::now()).unwrap();
        // Challenges that are not what the protocol says are errors, not panics.
        for bad in [
            &b"{"[..],
            br#"{"ecdsa_signature":{"nonce":"AAAA"}}"#,
            br#"{"ecdsa_signature":{"nonce":"!!"}}"#,
            br#"{"rsa_signature":null,"ecdsa_signature":null}"#,
        ] {
            assert!(node.respond(bad).is_err());
        }
    }
}
