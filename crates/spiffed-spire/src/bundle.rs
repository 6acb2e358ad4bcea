//! Bundles as the server sends them (`spire.api.types.Bundle`) turned into what workloads get.
//!
//! X.509 authorities are DER certificates and pass through as they are. JWT authorities come as
//! PKIX (SubjectPublicKeyInfo) public keys; spiffed's JWT bundles and validator hold EC P-256
//! keys only (an uncompressed point), so EC P-256 keys are converted and any other key type
//! (RSA, P-384, Ed25519) is left out with a warning, once per key id.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffed_core::{JwtAuthority, JwtBundle, TrustBundle, TrustDomain, X509Bundle};
use spiffed_proto::spire::types;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::x509::{Authority, to_system_time};

/// Most authorities of either kind accepted in one bundle.
const MAX_AUTHORITIES: usize = 1024;

/// When a JWT key with `expires_at = 0` ("does not expire") stops being published: never
/// (9999-12-31).
const NEVER: Duration = Duration::from_secs(253_402_300_799);

/// A bundle from the server, checked and converted.
#[derive(Debug, Clone)]
pub(crate) struct Converted {
    /// What workloads get.
    pub(crate) bundle: TrustBundle,
    /// The X.509 authorities with their taint.
    pub(crate) authorities: Vec<Authority>,
    /// Key ids of tainted JWT authorities.
    pub(crate) tainted_kids: Vec<String>,
}

/// The trust domain a bundle names (`example.org` or `spiffe://example.org`).
pub(crate) fn trust_domain_of(b: &types::Bundle) -> Result<TrustDomain, String> {
    TrustDomain::new(&b.trust_domain).map_err(|e| {
        format!(
            "the bundle names trust domain {:?}, which is not valid: {e}",
            spiffed_core::untrusted::clip(&b.trust_domain)
        )
    })
}

/// Converts `b`, which must be the bundle of `want`. `warned` holds the key ids already
/// warned about (unsupported key types are logged once each).
pub(crate) fn convert(
    b: &types::Bundle,
    want: &TrustDomain,
    warned: &mut HashSet<String>,
) -> Result<Converted, String> {
    let td = trust_domain_of(b)?;
    if &td != want {
        return Err(format!("the bundle is for trust domain {td}, not {want}"));
    }
    if b.x509_authorities.len() > MAX_AUTHORITIES || b.jwt_authorities.len() > MAX_AUTHORITIES {
        return Err(format!(
            "the bundle of {td} has more than {MAX_AUTHORITIES} authorities"
        ));
    }
    let mut authorities = Vec::with_capacity(b.x509_authorities.len());
    for (i, a) in b.x509_authorities.iter().enumerate() {
        match X509Certificate::from_der(&a.asn1) {
            Ok(([], _)) => {}
            _ => {
                return Err(format!(
                    "X.509 authority {i} of the bundle of {td} is not a DER certificate"
                ));
            }
        }
        authorities.push(Authority {
            der: a.asn1.clone(),
            tainted: a.tainted,
        });
    }
    let mut keys = Vec::with_capacity(b.jwt_authorities.len());
    let mut tainted_kids = Vec::new();
    for k in &b.jwt_authorities {
        if k.key_id.is_empty() {
            return Err(format!(
                "a JWT authority of the bundle of {td} has no key id"
            ));
        }
        if k.tainted {
            tainted_kids.push(k.key_id.clone());
        }
        match p256_point(&k.public_key) {
            Ok(point) => keys.push(JwtAuthority {
                kid: k.key_id.clone(),
                public_point: point,
                not_after: if k.expires_at == 0 {
                    SystemTime::UNIX_EPOCH + NEVER
                } else {
                    to_system_time(k.expires_at)
                },
            }),
            Err(why) => {
                if warned.insert(format!("{td}/{}", k.key_id)) {
                    tracing::warn!(
                        trust_domain = %td,
                        kid = %spiffed_core::untrusted::clip(&k.key_id),
                        %why,
                        "leaving a JWT authority out of the bundle: spiffed validates and \
                         publishes EC P-256 (ES256) keys only; JWT-SVIDs it signs will not \
                         validate here"
                    );
                }
            }
        }
    }
    let sequence = b.sequence_number;
    Ok(Converted {
        bundle: TrustBundle {
            x509: Arc::new(X509Bundle {
                trust_domain: td.clone(),
                authorities: authorities.iter().map(|a| a.der.clone()).collect(),
                sequence,
            }),
            jwt: Arc::new(JwtBundle {
                trust_domain: td,
                keys,
                sequence,
            }),
        },
        authorities,
        tainted_kids,
    })
}

/// The uncompressed point of a PKIX EC P-256 public key, or why it is not one.
pub(crate) fn p256_point(pkix: &[u8]) -> Result<Vec<u8>, String> {
    let Ok(([], spki)) = SubjectPublicKeyInfo::from_der(pkix) else {
        return Err("the public key is not a PKIX (SubjectPublicKeyInfo) key".into());
    };
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(format!(
            "the key type is {} (not EC)",
            spki.algorithm.algorithm.to_id_string()
        ));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        return Err(format!(
            "the EC curve is {} (not P-256)",
            curve.map_or_else(|| "missing".to_owned(), |c| c.to_id_string())
        ));
    }
    let point = spki.subject_public_key.data.as_ref();
    if point.len() != 65 || point.first() != Some(&4) {
        return Err("the P-256 point is not in uncompressed form".into());
    }
    Ok(point.to_vec())
}

/// An empty bundle for `td`, before the server sent one.
pub(crate) fn empty(td: &TrustDomain) -> TrustBundle {
    TrustBundle {
        x509: Arc::new(X509Bundle {
            trust_domain: td.clone(),
            authorities: Vec::new(),
            sequence: 0,
        }),
        jwt: Arc::new(JwtBundle {
            trust_domain: td.clone(),
            keys: Vec::new(),
            sequence: 0,
        }),
    }
}
