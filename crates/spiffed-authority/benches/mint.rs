//! Minting and validation costs of the authority: X.509-SVIDs, JWT-SVIDs, JWT validation.
//!
//! `cargo bench -p spiffed-authority --bench mint`
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use spiffed_authority::{AuthorityConfig, CaAuthority};
use spiffed_core::{Authority, Entry, EntryId, TrustDomain};

fn entry(path: &str) -> Arc<Entry> {
    Arc::new(Entry {
        id: EntryId::new("bench"),
        spiffe_id: format!("spiffe://example.org/{path}").parse().unwrap(),
        selectors: vec!["unix:uid:1000".parse().unwrap()],
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: vec![],
    })
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let a = CaAuthority::open(AuthorityConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        data_dir: dir.path().to_owned(),
        ca_ttl: Duration::from_secs(24 * 3600),
        x509_svid_ttl: Duration::from_secs(3600),
        jwt_svid_ttl: Duration::from_secs(300),
        new_root: spiffed_authority::NewRootPolicy::Refuse,
    })
    .unwrap();
    // Alternating the SPIFFE ID of one entry id forces a fresh mint on every call.
    let (e1, e2) = (entry("a"), entry("b"));
    let mut flip = false;
    c.bench_function("x509_svid_mint", |b| {
        b.iter(|| {
            flip = !flip;
            let e = if flip { &e1 } else { &e2 };
            black_box(a.identities(std::slice::from_ref(e)).unwrap());
        });
    });
    let mut n = 0u64;
    c.bench_function("jwt_svid_mint", |b| {
        b.iter(|| {
            // A new audience set each time: a cache miss, so a real signature.
            n += 1;
            black_box(
                a.jwt_svids(std::slice::from_ref(&e1), &[n.to_string()])
                    .unwrap(),
            );
        });
    });
    c.bench_function("jwt_svid_cached", |b| {
        b.iter(|| {
            black_box(
                a.jwt_svids(std::slice::from_ref(&e1), &["aud".into()])
                    .unwrap(),
            )
        });
    });
    let token = a
        .jwt_svids(std::slice::from_ref(&e1), &["aud".into()])
        .unwrap()[0]
        .token
        .to_string();
    c.bench_function("jwt_svid_validate", |b| {
        b.iter(|| black_box(a.validate_jwt(&token, "aud").unwrap()));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
