//! The SPIFFE bundle format: reading and writing a trust domain's bundle as a JWK Set
//! (SPIFFE Trust Domain and Bundle, §4), and X.509 authorities as PEM.
//!
//! A SPIFFE bundle is a JSON object with a `keys` array (RFC 7517) and the optional members
//! `spiffe_sequence` and `spiffe_refresh_hint`. Each key has a `use`:
//! - `x509-svid`: an X.509 authority; `x5c` holds exactly one CA certificate, standard base64
//!   DER (X509-SVID §6).
//! - `jwt-svid`: a JWT authority; `kid` is required (JWT-SVID §6).
//!
//! What [`SpiffeBundle::parse`] does with what it reads, and why:
//! - A key with a missing or unknown `use`, or a missing `kty`, is **ignored** and reported in
//!   [`Parsed::skipped`] (the spec says consumers MUST ignore such elements).
//! - A `jwt-svid` key that spiffed cannot verify with (anything but EC P-256, i.e. RSA, P-384,
//!   Ed25519) is ignored and reported the same way: tokens it signs will not validate here.
//! - An `x509-svid` key whose `x5c` is not exactly one certificate, that is not base64, not a
//!   DER certificate, or not a CA certificate, and a `jwt-svid` key without a `kid` or with the
//!   `kid` of an earlier key, **refuse the whole bundle** (as go-spiffe's `spiffebundle.Parse`
//!   does for the first, and because a JWT authority cannot be picked without a unique `kid`).
//! - An X.509 authority whose URI SAN names a SPIFFE trust domain other than the bundle's
//!   refuses the bundle: the file is another trust domain's.
//! - `keys` must be present; an empty array is valid and means every authority is revoked.
//!
//! Limits (constants, checked before anything else): at most [`MAX_BUNDLE_BYTES`] bytes and
//! [`MAX_BUNDLE_KEYS`] keys in one document.
//!
//! [`SpiffeBundle::to_json`] writes what the spec asks of a producer: `kty` and `use` on every
//! key, the X.509 authority's public key parameters next to its `x5c`, `kid` on JWT
//! authorities only, and the sequence and refresh hint when known.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use serde_json::{Map, Value, json};
use spiffe::TrustDomain;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::{JwtAuthority, JwtBundle, TrustBundle, X509Bundle};

/// Largest bundle document accepted (JSON or PEM), in bytes.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// Most keys (or PEM certificates) accepted in one bundle document.
pub const MAX_BUNDLE_KEYS: usize = 1024;

/// When a JWT authority read from a SPIFFE bundle stops being published: never (9999-12-31); a
/// SPIFFE bundle carries no expiry, the next bundle replaces it.
const NEVER: Duration = Duration::from_secs(253_402_300_799);

/// The `use` of an X.509 authority.
const USE_X509: &str = "x509-svid";
/// The `use` of a JWT authority.
const USE_JWT: &str = "jwt-svid";

/// A trust domain's bundle as the SPIFFE bundle format carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeBundle {
    /// The trust domain (a SPIFFE bundle does not name it: the caller knows it).
    pub trust_domain: TrustDomain,
    /// The X.509 authorities, DER, in document order.
    pub x509_authorities: Vec<Vec<u8>>,
    /// The JWT authorities (EC P-256), in document order.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`, if set.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, if set.
    pub refresh_hint: Option<Duration>,
}

/// A bundle read from a document, with the keys that were ignored and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The bundle.
    pub bundle: SpiffeBundle,
    /// One line per ignored key ("key #3: ..."), for the operator.
    pub skipped: Vec<String>,
}

/// Why a bundle document was refused. Each message names the problem; callers add the fix
/// that fits where the document came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The document is larger than [`MAX_BUNDLE_BYTES`].
    #[error("is {size} bytes, more than the {max} a bundle may have")]
    TooLarge {
        /// The document's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The document has more keys (or certificates) than [`MAX_BUNDLE_KEYS`].
    #[error("has {count} keys, more than the {max} a bundle may have")]
    TooManyKeys {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON, or not a JSON object.
    #[error("is not a SPIFFE bundle (a JSON object with a \"keys\" array): {0}")]
    NotJson(String),
    /// No `keys` array.
    #[error("is not a SPIFFE bundle: it has no \"keys\" array")]
    NoKeys,
    /// `spiffe_sequence` or `spiffe_refresh_hint` is not a non-negative integer.
    #[error("has a {member} that is not a non-negative integer: {value}")]
    Member {
        /// The member's name.
        member: &'static str,
        /// Its value, clipped.
        value: String,
    },
    /// A key breaks a rule that refuses the whole bundle.
    #[error("key #{index}: {reason}")]
    Key {
        /// The key's position, from 1.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An X.509 authority names another trust domain in its URI SAN.
    #[error(
        "X.509 authority #{index} belongs to trust domain {found} (its URI SAN), not {want}: \
         this is another trust domain's bundle"
    )]
    TrustDomainMismatch {
        /// The authority's position, from 1.
        index: usize,
        /// The trust domain its URI SAN names.
        found: String,
        /// The bundle's trust domain.
        want: String,
    },
    /// A PEM document that holds no certificate, a block other than a certificate, or a
    /// certificate that does not decode.
    #[error("{0}")]
    Pem(String),
}

impl SpiffeBundle {
    /// An empty bundle of `trust_domain` (no authorities, no sequence, no hint).
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: None,
            refresh_hint: None,
        }
    }

    /// Reads a SPIFFE bundle (JWKS) of `trust_domain` (see the module docs for the rules).
    pub fn parse(trust_domain: &TrustDomain, doc: &[u8]) -> Result<Parsed, BundleError> {
        check_size(doc)?;
        let value: Value =
            serde_json::from_slice(doc).map_err(|e| BundleError::NotJson(e.to_string()))?;
        let Value::Object(top) = value else {
            return Err(BundleError::NotJson(
                "the document is not a JSON object".into(),
            ));
        };
        let Some(Value::Array(keys)) = top.get("keys") else {
            return Err(BundleError::NoKeys);
        };
        if keys.len() > MAX_BUNDLE_KEYS {
            return Err(BundleError::TooManyKeys {
                count: keys.len(),
                max: MAX_BUNDLE_KEYS,
            });
        }
        let mut bundle = Self::new(trust_domain.clone());
        bundle.sequence = uint_member(&top, "spiffe_sequence")?;
        bundle.refresh_hint = uint_member(&top, "spiffe_refresh_hint")?.map(Duration::from_secs);
        let mut skipped = Vec::new();
        let mut kids = HashSet::new();
        for (i, key) in keys.iter().enumerate() {
            let index = i + 1;
            let key_err = |reason: String| BundleError::Key { index, reason };
            let Value::Object(key) = key else {
                return Err(key_err("is not a JSON object".into()));
            };
            let use_ = key.get("use").and_then(Value::as_str);
            if key.get("kty").and_then(Value::as_str).is_none() {
                skipped.push(format!("key #{index}: has no \"kty\"; ignored"));
                continue;
            }
            match use_ {
                Some(USE_X509) => {
                    let der = x5c_cert(key).map_err(key_err)?;
                    check_authority(&der, trust_domain, bundle.x509_authorities.len() + 1)
                        .map_err(|e| match e {
                            AuthorityFault::Other(reason) => key_err(reason),
                            AuthorityFault::Mismatch(e) => e,
                        })?;
                    bundle.x509_authorities.push(der);
                }
                Some(USE_JWT) => {
                    let kid = match key.get("kid") {
                        Some(Value::String(k)) if !k.is_empty() => k.clone(),
                        _ => {
                            return Err(key_err(
                                "a jwt-svid key must have a non-empty \"kid\"".into(),
                            ));
                        }
                    };
                    if !kids.insert(kid.clone()) {
                        return Err(key_err(format!(
                            "kid {:?} is used by an earlier jwt-svid key; each must be unique",
                            crate::untrusted::clip(&kid)
                        )));
                    }
                    match p256_point(key) {
                        Ok(point) => bundle.jwt_authorities.push(JwtAuthority {
                            kid,
                            public_point: point,
                            not_after: SystemTime::UNIX_EPOCH + NEVER,
                        }),
                        Err(why) => skipped.push(format!(
                            "key #{index} (kid {:?}): {why}; ignored: spiffed validates EC \
                             P-256 (ES256) JWT-SVIDs only",
                            crate::untrusted::clip(&kid)
                        )),
                    }
                }
                Some(other) => skipped.push(format!(
                    "key #{index}: use {:?} is neither x509-svid nor jwt-svid; ignored",
                    crate::untrusted::clip(other)
                )),
                None => skipped.push(format!("key #{index}: has no \"use\"; ignored")),
            }
        }
        Ok(Parsed { bundle, skipped })
    }

    /// Reads X.509 authorities of `trust_domain` from PEM (`CERTIFICATE` blocks only; text
    /// around the blocks is allowed, any other block is refused).
    pub fn parse_pem(trust_domain: &TrustDomain, doc: &[u8]) -> Result<Self, BundleError> {
        check_size(doc)?;
        let text = std::str::from_utf8(doc)
            .map_err(|_| BundleError::Pem("is not PEM text (not UTF-8)".into()))?;
        let mut bundle = Self::new(trust_domain.clone());
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let line = line.trim();
            let Some(label) = line
                .strip_prefix("-----BEGIN ")
                .and_then(|l| l.strip_suffix("-----"))
            else {
                continue;
            };
            if label != "CERTIFICATE" {
                return Err(BundleError::Pem(format!(
                    "holds a {label:?} PEM block; a bundle holds CERTIFICATE blocks only",
                    label = crate::untrusted::clip(label)
                )));
            }
            let index = bundle.x509_authorities.len() + 1;
            if index > MAX_BUNDLE_KEYS {
                return Err(BundleError::TooManyKeys {
                    count: index,
                    max: MAX_BUNDLE_KEYS,
                });
            }
            let mut b64 = String::new();
            let mut ended = false;
            for l in lines.by_ref() {
                let l = l.trim();
                if l == "-----END CERTIFICATE-----" {
                    ended = true;
                    break;
                }
                b64.push_str(l);
            }
            if !ended {
                return Err(BundleError::Pem(format!(
                    "certificate #{index} has no -----END CERTIFICATE----- line"
                )));
            }
            let der = B64.decode(b64.as_bytes()).map_err(|e| {
                BundleError::Pem(format!("certificate #{index} is not base64 ({e})"))
            })?;
            check_authority(&der, trust_domain, index).map_err(|e| match e {
                AuthorityFault::Other(reason) => {
                    BundleError::Pem(format!("certificate #{index}: {reason}"))
                }
                AuthorityFault::Mismatch(e) => e,
            })?;
            bundle.x509_authorities.push(der);
        }
        if bundle.x509_authorities.is_empty() {
            return Err(BundleError::Pem(
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        Ok(bundle)
    }

    /// The bundle as a SPIFFE bundle document (JWKS), compact JSON. An X.509 authority whose
    /// key type the JWK cannot describe (anything but EC P-256/P-384/P-521 and RSA) is left out.
    pub fn to_json(&self) -> String {
        let mut keys: Vec<Value> = Vec::new();
        for der in &self.x509_authorities {
            let Some(mut jwk) = cert_jwk(der) else {
                continue;
            };
            jwk.insert("use".into(), USE_X509.into());
            jwk.insert("x5c".into(), json!([B64.encode(der)]));
            keys.push(Value::Object(jwk));
        }
        for k in &self.jwt_authorities {
            let (Some(x), Some(y)) = (k.public_point.get(1..33), k.public_point.get(33..65)) else {
                continue;
            };
            keys.push(json!({
                "use": USE_JWT,
                "kty": "EC",
                "crv": "P-256",
                "kid": k.kid,
                "x": B64URL.encode(x),
                "y": B64URL.encode(y),
            }));
        }
        let mut top = Map::new();
        top.insert("keys".into(), Value::Array(keys));
        if let Some(seq) = self.sequence {
            top.insert("spiffe_sequence".into(), seq.into());
        }
        if let Some(hint) = self.refresh_hint {
            top.insert("spiffe_refresh_hint".into(), hint.as_secs().into());
        }
        Value::Object(top).to_string()
    }

    /// The X.509 authorities as PEM `CERTIFICATE` blocks (64-character lines).
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for der in &self.x509_authorities {
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            let b64 = B64.encode(der);
            for chunk in b64.as_bytes().chunks(64) {
                out.push_str(&String::from_utf8_lossy(chunk));
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
    }

    /// The bundle as the issuer publishes it (the sequence defaults to 0).
    pub fn to_trust_bundle(&self) -> TrustBundle {
        let sequence = self.sequence.unwrap_or(0);
        TrustBundle {
            x509: Arc::new(X509Bundle {
                trust_domain: self.trust_domain.clone(),
                authorities: self.x509_authorities.clone(),
                sequence,
            }),
            jwt: Arc::new(JwtBundle {
                trust_domain: self.trust_domain.clone(),
                keys: self.jwt_authorities.clone(),
                sequence,
            }),
        }
    }

    /// A published bundle in this format, with the X.509 bundle's sequence and `refresh_hint`.
    pub fn from_trust_bundle(bundle: &TrustBundle, refresh_hint: Option<Duration>) -> Self {
        Self {
            trust_domain: bundle.trust_domain().clone(),
            x509_authorities: bundle.x509.authorities.clone(),
            jwt_authorities: bundle.jwt.keys.clone(),
            sequence: Some(bundle.x509.sequence.max(bundle.jwt.sequence)),
            refresh_hint,
        }
    }
}

fn check_size(doc: &[u8]) -> Result<(), BundleError> {
    if doc.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge {
            size: doc.len(),
            max: MAX_BUNDLE_BYTES,
        });
    }
    Ok(())
}

/// An optional top-level member that must be a non-negative integer.
fn uint_member(top: &Map<String, Value>, member: &'static str) -> Result<Option<u64>, BundleError> {
    match top.get(member) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| BundleError::Member {
            member,
            value: crate::untrusted::clip(&v.to_string()),
        }),
    }
}

/// The one certificate of an `x509-svid` key's `x5c`.
fn x5c_cert(key: &Map<String, Value>) -> Result<Vec<u8>, String> {
    let certs = match key.get("x5c") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err("\"x5c\" is not an array".into()),
        None => return Err("an x509-svid key must have an \"x5c\"".into()),
    };
    if certs.len() != 1 {
        return Err(format!(
            "an x509-svid key must hold exactly one certificate in \"x5c\", not {}",
            certs.len()
        ));
    }
    let Some(b64) = certs[0].as_str() else {
        return Err("\"x5c\" holds a value that is not a string".into());
    };
    B64.decode(b64)
        .map_err(|e| format!("\"x5c\" is not standard base64 ({e})"))
}

/// Why an X.509 authority is refused.
enum AuthorityFault {
    Mismatch(BundleError),
    Other(String),
}

/// Checks that `der` is one CA certificate, and that a SPIFFE URI SAN it carries names `td`.
fn check_authority(der: &[u8], td: &TrustDomain, index: usize) -> Result<(), AuthorityFault> {
    let cert = match X509Certificate::from_der(der) {
        Ok(([], cert)) => cert,
        Ok(_) => {
            return Err(AuthorityFault::Other(
                "the certificate has trailing bytes after its DER".into(),
            ));
        }
        Err(e) => {
            return Err(AuthorityFault::Other(format!(
                "the certificate is not DER X.509 ({e})"
            )));
        }
    };
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !is_ca {
        return Err(AuthorityFault::Other(
            "the certificate is not a CA certificate (basicConstraints cA is not true)".into(),
        ));
    }
    // What cannot be written back as a JWK would be lost when the bundle is stored.
    if cert_jwk(der).is_none() {
        return Err(AuthorityFault::Other(
            "the CA's public key is not EC P-256, P-384, P-521 (uncompressed) or RSA, the key \
             types a SPIFFE bundle carries"
                .into(),
        ));
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            let GeneralName::URI(uri) = name else {
                continue;
            };
            if !uri.to_ascii_lowercase().starts_with("spiffe://") {
                continue;
            }
            let found = TrustDomain::new(uri)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| crate::untrusted::clip(uri));
            if found != td.as_str() {
                return Err(AuthorityFault::Mismatch(BundleError::TrustDomainMismatch {
                    index,
                    found,
                    want: td.to_string(),
                }));
            }
        }
    }
    Ok(())
}

/// The uncompressed point (0x04 || X || Y) of an EC P-256 JWK, or why the key is not one.
fn p256_point(key: &Map<String, Value>) -> Result<Vec<u8>, String> {
    let kty = key.get("kty").and_then(Value::as_str).unwrap_or_default();
    if kty != "EC" {
        return Err(format!(
            "kty {:?} is not supported",
            crate::untrusted::clip(kty)
        ));
    }
    let crv = key.get("crv").and_then(Value::as_str).unwrap_or_default();
    if crv != "P-256" {
        return Err(format!(
            "curve {:?} is not supported",
            crate::untrusted::clip(crv)
        ));
    }
    let coord = |name: &str| -> Result<Vec<u8>, String> {
        let s = key
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("\"{name}\" is missing"))?;
        let b = B64URL
            .decode(s.trim_end_matches('='))
            .map_err(|e| format!("\"{name}\" is not base64url ({e})"))?;
        if b.len() != 32 {
            return Err(format!("\"{name}\" is {} bytes, not 32", b.len()));
        }
        Ok(b)
    };
    let mut point = vec![0x04];
    point.extend(coord("x")?);
    point.extend(coord("y")?);
    Ok(point)
}

/// The JWK public key members (`kty` and its parameters) of a certificate's key.
fn cert_jwk(der: &[u8]) -> Option<Map<String, Value>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let spki = cert.public_key();
    let mut jwk = Map::new();
    match spki.parsed().ok()? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())?;
            let (crv, len) = if curve == x509_parser::oid_registry::OID_EC_P256 {
                ("P-256", 32)
            } else if curve == x509_parser::oid_registry::OID_NIST_EC_P384 {
                ("P-384", 48)
            } else if curve == x509_parser::oid_registry::OID_NIST_EC_P521 {
                ("P-521", 66)
            } else {
                return None;
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data.first() != Some(&0x04) {
                return None;
            }
            jwk.insert("kty".into(), "EC".into());
            jwk.insert("crv".into(), crv.into());
            jwk.insert("x".into(), B64URL.encode(&data[1..=len]).into());
            jwk.insert("y".into(), B64URL.encode(&data[1 + len..]).into());
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| -> Vec<u8> {
                let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
                b[start..].to_vec()
            };
            jwk.insert("kty".into(), "RSA".into());
            jwk.insert("n".into(), B64URL.encode(strip(rsa.modulus)).into());
            jwk.insert("e".into(), B64URL.encode(strip(rsa.exponent)).into());
        }
        _ => return None,
    }
    Some(jwk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    /// A self-signed CA certificate (DER), with `spiffe://uri_td` in its URI SAN if given.
    fn ca(alg: &'static rcgen::SignatureAlgorithm, uri_td: Option<&str>) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        if let Some(t) = uri_td {
            params.subject_alt_names =
                vec![SanType::URI(format!("spiffe://{t}").try_into().unwrap())];
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn leaf() -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        CertificateParams::new(vec!["leaf.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    fn jwt_key(kid: &str) -> JwtAuthority {
        let mut point = vec![0x04];
        point.extend([7u8; 32]);
        point.extend([9u8; 32]);
        JwtAuthority {
            kid: kid.into(),
            public_point: point,
            not_after: SystemTime::UNIX_EPOCH + NEVER,
        }
    }

    fn sample() -> SpiffeBundle {
        SpiffeBundle {
            trust_domain: td("other.org"),
            x509_authorities: vec![
                ca(&rcgen::PKCS_ECDSA_P256_SHA256, Some("other.org")),
                ca(&rcgen::PKCS_ECDSA_P384_SHA384, None),
            ],
            jwt_authorities: vec![jwt_key("a"), jwt_key("b")],
            sequence: Some(42),
            refresh_hint: Some(Duration::from_secs(300)),
        }
    }

    #[test]
    fn json_round_trips_every_member() {
        let b = sample();
        let json = b.to_json();
        let back = SpiffeBundle::parse(&td("other.org"), json.as_bytes()).unwrap();
        assert_eq!(back.skipped, Vec::<String>::new());
        assert_eq!(back.bundle, b);
        // Written as the spec asks: kty and use everywhere, kid on JWT keys only, key
        // parameters next to x5c.
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["spiffe_sequence"], 42);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        let keys = v["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 4);
        assert_eq!(keys[0]["use"], "x509-svid");
        assert_eq!(keys[0]["crv"], "P-256");
        assert!(keys[0].get("kid").is_none());
        assert_eq!(keys[1]["crv"], "P-384");
        assert_eq!(keys[1]["x"].as_str().unwrap().len(), 64);
        assert_eq!(keys[2]["use"], "jwt-svid");
        assert_eq!(keys[2]["kid"], "a");
        for k in keys {
            assert!(k["kty"].is_string(), "{k}");
        }
    }

    #[test]
    fn without_sequence_or_hint_the_members_are_absent() {
        let mut b = sample();
        b.sequence = None;
        b.refresh_hint = None;
        let json = b.to_json();
        assert!(!json.contains("spiffe_sequence") && !json.contains("spiffe_refresh_hint"));
        let back = SpiffeBundle::parse(&td("other.org"), json.as_bytes()).unwrap();
        assert_eq!(back.bundle, b);
    }

    #[test]
    fn pem_round_trips_and_matches_json() {
        let b = sample();
        let pem = b.to_pem();
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        let back = SpiffeBundle::parse_pem(&td("other.org"), pem.as_bytes()).unwrap();
        assert_eq!(back.x509_authorities, b.x509_authorities);
        assert!(back.jwt_authorities.is_empty());
        // Text around the blocks (as `openssl x509 -text` leaves) is fine.
        let noisy = format!("Subject: x\n{pem}\ntrailing words\n");
        assert!(SpiffeBundle::parse_pem(&td("other.org"), noisy.as_bytes()).is_ok());
    }

    #[test]
    fn unknown_uses_and_key_types_are_ignored_with_a_reason() {
        let cert = B64.encode(ca(&rcgen::PKCS_ECDSA_P256_SHA256, None));
        let doc = json!({
            "keys": [
                {"use": "x509-svid", "kty": "EC", "x5c": [cert]},
                {"use": "wit-svid", "kty": "EC", "kid": "w"},
                {"kty": "OKP", "crv": "X25519", "x": "abc"},
                {"use": "jwt-svid", "kid": "nokty"},
                {"use": "jwt-svid", "kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
                {"use": "jwt-svid", "kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            ],
            "unknown_top_level": true,
        });
        let p = SpiffeBundle::parse(&td("x.org"), doc.to_string().as_bytes()).unwrap();
        assert_eq!(p.bundle.x509_authorities.len(), 1);
        assert!(p.bundle.jwt_authorities.is_empty());
        assert_eq!(p.skipped.len(), 5, "{:?}", p.skipped);
        assert!(p.skipped[0].contains("\"wit-svid\""), "{}", p.skipped[0]);
        assert!(p.skipped[1].contains("no \"use\""), "{}", p.skipped[1]);
        assert!(p.skipped[2].contains("no \"kty\""), "{}", p.skipped[2]);
        assert!(p.skipped[3].contains("\"RSA\"") && p.skipped[3].contains("ES256"));
        assert!(p.skipped[4].contains("\"P-384\""), "{}", p.skipped[4]);
    }

    #[test]
    fn empty_keys_is_a_valid_bundle_that_trusts_nothing() {
        let p = SpiffeBundle::parse(&td("x.org"), br#"{"keys":[]}"#).unwrap();
        assert!(p.bundle.x509_authorities.is_empty() && p.bundle.jwt_authorities.is_empty());
    }

    fn refused(doc: &str) -> String {
        SpiffeBundle::parse(&td("x.org"), doc.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn malformed_documents_are_refused_naming_the_problem() {
        let cert = B64.encode(ca(&rcgen::PKCS_ECDSA_P256_SHA256, None));
        let leaf = B64.encode(leaf());
        let point = B64URL.encode([1u8; 32]);
        let cases: Vec<(String, &str)> = vec![
            ("garbage".into(), "is not a SPIFFE bundle"),
            ("[1,2]".into(), "not a JSON object"),
            ("{}".into(), "no \"keys\" array"),
            (r#"{"keys":{}}"#.into(), "no \"keys\" array"),
            (r#"{"keys":[1]}"#.into(), "key #1: is not a JSON object"),
            (r#"{"keys":[],"spiffe_sequence":-1}"#.into(), "spiffe_sequence"),
            (r#"{"keys":[],"spiffe_refresh_hint":"5m"}"#.into(), "spiffe_refresh_hint"),
            (
                json!({"keys":[{"use":"x509-svid","kty":"EC"}]}).to_string(),
                "must have an \"x5c\"",
            ),
            (
                json!({"keys":[{"use":"x509-svid","kty":"EC","x5c":[cert, cert]}]}).to_string(),
                "exactly one certificate",
            ),
            (
                json!({"keys":[{"use":"x509-svid","kty":"EC","x5c":[]}]}).to_string(),
                "exactly one certificate",
            ),
            (
                json!({"keys":[{"use":"x509-svid","kty":"EC","x5c":["%%%"]}]}).to_string(),
                "not standard base64",
            ),
            (
                json!({"keys":[{"use":"x509-svid","kty":"EC","x5c":["aGVsbG8="]}]}).to_string(),
                "not DER X.509",
            ),
            (
                json!({"keys":[{"use":"x509-svid","kty":"EC","x5c":[leaf]}]}).to_string(),
                "not a CA certificate",
            ),
            (
                json!({"keys":[{"use":"jwt-svid","kty":"EC","crv":"P-256","x":point,"y":point}]})
                    .to_string(),
                "non-empty \"kid\"",
            ),
            (
                json!({"keys":[{"use":"jwt-svid","kty":"EC","kid":"","crv":"P-256","x":point,"y":point}]})
                    .to_string(),
                "non-empty \"kid\"",
            ),
            (
                json!({"keys":[
                    {"use":"jwt-svid","kty":"EC","kid":"k","crv":"P-256","x":point,"y":point},
                    {"use":"jwt-svid","kty":"EC","kid":"k","crv":"P-256","x":point,"y":point},
                ]})
                .to_string(),
                "key #2: kid \"k\" is used by an earlier",
            ),
        ];
        for (doc, want) in cases {
            let e = refused(&doc);
            assert!(e.contains(want), "{doc}: {e}");
        }
    }

    #[test]
    fn a_bundle_of_another_trust_domain_is_refused() {
        let b = sample();
        let e = SpiffeBundle::parse(&td("third.org"), b.to_json().as_bytes()).unwrap_err();
        assert_eq!(
            e,
            BundleError::TrustDomainMismatch {
                index: 1,
                found: "other.org".into(),
                want: "third.org".into()
            }
        );
        let e = SpiffeBundle::parse_pem(&td("third.org"), b.to_pem().as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("belongs to trust domain other.org"),
            "{e}"
        );
    }

    #[test]
    fn limits_are_checked_one_past_them() {
        let big = format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(MAX_BUNDLE_BYTES));
        assert!(matches!(
            SpiffeBundle::parse(&td("x.org"), big.as_bytes()),
            Err(BundleError::TooLarge { .. })
        ));
        assert!(matches!(
            SpiffeBundle::parse_pem(&td("x.org"), big.as_bytes()),
            Err(BundleError::TooLarge { .. })
        ));
        let exact = format!(
            r#"{{"keys":[],"p":"{}"}}"#,
            "x".repeat(MAX_BUNDLE_BYTES - 18)
        );
        assert_eq!(exact.len(), MAX_BUNDLE_BYTES);
        assert!(SpiffeBundle::parse(&td("x.org"), exact.as_bytes()).is_ok());
        let keys = |n: usize| {
            let k = vec![json!({"use": "other", "kty": "EC"}); n];
            json!({ "keys": k }).to_string()
        };
        assert!(SpiffeBundle::parse(&td("x.org"), keys(MAX_BUNDLE_KEYS).as_bytes()).is_ok());
        assert!(matches!(
            SpiffeBundle::parse(&td("x.org"), keys(MAX_BUNDLE_KEYS + 1).as_bytes()),
            Err(BundleError::TooManyKeys { .. })
        ));
    }

    #[test]
    fn bad_pem_is_refused_naming_the_problem() {
        let t = td("x.org");
        let e = |doc: &str| {
            SpiffeBundle::parse_pem(&t, doc.as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert!(e("nothing").contains("holds no PEM certificate"));
        assert!(
            e("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .contains("\"PRIVATE KEY\" PEM block")
        );
        assert!(e("-----BEGIN CERTIFICATE-----\naGVsbG8=\n").contains("no -----END"));
        assert!(
            e("-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n")
                .contains("not base64")
        );
        assert!(
            e("-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n")
                .contains("certificate #1: the certificate is not DER")
        );
    }

    #[test]
    fn a_ca_key_a_jwk_cannot_carry_is_refused() {
        let ed = B64.encode(ca(&rcgen::PKCS_ED25519, None));
        let doc = json!({"keys":[{"use":"x509-svid","kty":"OKP","x5c":[ed]}]}).to_string();
        assert!(refused(&doc).contains("not EC P-256"), "{}", refused(&doc));
        let p384 = SpiffeBundle {
            x509_authorities: vec![ca(&rcgen::PKCS_ECDSA_P384_SHA384, None)],
            ..SpiffeBundle::new(td("x.org"))
        };
        let back = SpiffeBundle::parse(&td("x.org"), p384.to_json().as_bytes()).unwrap();
        assert_eq!(back.bundle, p384);
    }

    #[test]
    fn trust_bundle_conversions_keep_the_authorities() {
        let b = sample();
        let tb = b.to_trust_bundle();
        assert_eq!(tb.x509.sequence, 42);
        assert_eq!(tb.jwt.keys, b.jwt_authorities);
        let back = SpiffeBundle::from_trust_bundle(&tb, b.refresh_hint);
        assert_eq!(back, b);
    }
}
