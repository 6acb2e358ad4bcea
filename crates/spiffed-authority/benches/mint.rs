//! Minting and validation costs of the authority: X.509-SVIDs (a fresh mint, a cached fetch,
//! a first fetch among 100,000 registered entries), JWT-SVIDs, JWT validation.
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
use spiffed_authority::{AuthorityConfig, CaAuthority, DEFAULT_PREMINT_ENTRIES};
use spiffed_core::{Entry, EntryId, EntryPublisher, Issuer, TrustDomain};

fn entry(id: &str, path: &str) -> Entry {
    Entry {
        id: EntryId::new(id),
        spiffe_id: format!("spiffe://example.org/{path}").parse().unwrap(),
        selectors: vec!["unix:uid:1000".parse().unwrap()],
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: vec![],
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
    }
}

fn open(dir: &std::path::Path, premint_entries: usize) -> CaAuthority {
    CaAuthority::open(AuthorityConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        data_dir: dir.to_owned(),
        ca_ttl: Duration::from_secs(24 * 3600),
        x509_svid_ttl: Duration::from_secs(3600),
        jwt_svid_ttl: Duration::from_secs(300),
        new_root: spiffed_authority::NewRootPolicy::Refuse,
        premint_entries,
        upstream: None,
    })
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), DEFAULT_PREMINT_ENTRIES);
    // Alternating the SPIFFE ID of one entry id forces a fresh mint on every call.
    let (e1, e2) = (Arc::new(entry("bench", "a")), Arc::new(entry("bench", "b")));
    let mut flip = false;
    c.bench_function("x509_svid_mint", |b| {
        b.iter(|| {
            flip = !flip;
            let e = if flip { &e1 } else { &e2 };
            black_box(rt.block_on(a.x509_svid(e)).unwrap());
        });
    });
    c.bench_function("x509_svid_cached", |b| {
        b.iter(|| black_box(rt.block_on(a.x509_svid(&e1)).unwrap()));
    });
    let mut n = 0u64;
    c.bench_function("jwt_svid_mint", |b| {
        b.iter(|| {
            // A new audience set each time: a cache miss, so a real signature.
            n += 1;
            black_box(rt.block_on(a.jwt_svid(&e1, &[n.to_string()])).unwrap());
        });
    });
    c.bench_function("jwt_svid_cached", |b| {
        b.iter(|| black_box(rt.block_on(a.jwt_svid(&e1, &["aud".into()])).unwrap()));
    });
    let token = rt
        .block_on(a.jwt_svid(&e1, &["aud".into()]))
        .unwrap()
        .token
        .to_string();
    c.bench_function("jwt_svid_validate", |b| {
        b.iter(|| black_box(a.validate_jwt(&token, "aud").unwrap()));
    });

    // A first fetch of an entry nobody fetched before, among 100,000 registered entries, with
    // the rotation task following them (no pre-minting, so every entry is un-minted; past
    // 100,000 iterations the fetches cycle and hit the cache).
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), 0);
    let all: Vec<Arc<Entry>> = (0..100_000)
        .map(|i| Arc::new(entry(&format!("e{i}"), &format!("w{i}"))))
        .collect();
    let registry = EntryPublisher::new(all.iter().map(|e| (**e).clone()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = rt.spawn(a.clone().run_with_entries(stopped, registry.feed()));
    let mut i = 0;
    c.bench_function("x509_svid_first_fetch_of_100k", |b| {
        b.iter(|| {
            i = (i + 1) % all.len();
            black_box(rt.block_on(a.x509_svid(&all[i])).unwrap());
        });
    });
    stop.send(true).unwrap();
    rt.block_on(task).unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
