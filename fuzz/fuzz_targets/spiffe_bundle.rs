//! SPIFFE bundle documents (JWKS) and PEM bundles, as `spiffed bundle set` hands them to the
//! agent and as agent mode reads its bootstrap bundle: `spiffed_core::spiffe_bundle`.
//!
//! The first byte picks the reader (even: SPIFFE JSON, odd: PEM); the rest is the document.
//! Checks:
//! - parsing never panics;
//! - an accepted bundle keeps the limits (at most `MAX_BUNDLE_KEYS` authorities, JWT key ids
//!   non-empty and unique, EC P-256 points of 65 bytes);
//! - what is accepted round-trips: written back as SPIFFE JSON it parses again to the same
//!   bundle with nothing skipped, and its X.509 authorities written as PEM parse to the same
//!   authorities.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use spiffed_core::TrustDomain;
use spiffed_core::spiffe_bundle::{MAX_BUNDLE_KEYS, SpiffeBundle};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, doc)) = data.split_first() else {
        return;
    };
    let td = TrustDomain::new("example.org").expect("a valid trust domain");
    let bundle = if kind % 2 == 0 {
        match SpiffeBundle::parse(&td, doc) {
            Ok(p) => p.bundle,
            Err(_) => return,
        }
    } else {
        match SpiffeBundle::parse_pem(&td, doc) {
            Ok(b) => b,
            Err(_) => return,
        }
    };
    assert_eq!(bundle.trust_domain, td);
    assert!(bundle.x509_authorities.len() <= MAX_BUNDLE_KEYS);
    assert!(bundle.jwt_authorities.len() <= MAX_BUNDLE_KEYS);
    let mut kids = HashSet::new();
    for k in &bundle.jwt_authorities {
        assert!(!k.kid.is_empty(), "a JWT authority without a kid");
        assert!(kids.insert(k.kid.clone()), "duplicate kid {:?}", k.kid);
        assert_eq!(k.public_point.len(), 65);
        assert_eq!(k.public_point[0], 0x04);
    }
    let json = bundle.to_json();
    let again = SpiffeBundle::parse(&td, json.as_bytes()).expect("written JSON parses");
    assert!(again.skipped.is_empty(), "{:?}", again.skipped);
    assert_eq!(again.bundle, bundle, "JSON round trip");
    if !bundle.x509_authorities.is_empty() {
        let pem = SpiffeBundle::parse_pem(&td, bundle.to_pem().as_bytes()).expect("written PEM parses");
        assert_eq!(pem.x509_authorities, bundle.x509_authorities, "PEM round trip");
    }
});
