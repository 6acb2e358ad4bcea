//! One attestation of a live caller for each kind of fact entries can ask for: kernel credentials
//! only, name lookups, /proc reads, and the executable's sha256 from the cache or computed.
//!
//! `cargo bench -p spiffed-attest --bench attest`
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark"
)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use spiffed_attest::UnixAttestor;
use spiffed_attest::listen::peer_cred;
use spiffed_core::{Attestor, Facts};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A connected pair: the peer is this very process, alive for the whole run.
    let (a, _b) = rt.block_on(async { tokio::net::UnixStream::pair().unwrap() });
    let cred = peer_cred(&a).unwrap();

    let attestor = UnixAttestor::new();
    // What each kind of entry set costs: the facts are those the configured selectors need.
    let cases = [
        ("attest_uid_gid", Facts::NONE),
        ("attest_user_group_names", Facts::NAMES),
        ("attest_path", Facts::PATH),
        ("attest_supplementary_groups", Facts::SUPPLEMENTARY_GROUPS),
        ("attest_systemd", Facts::SYSTEMD),
        (
            "attest_everything_but_sha256",
            Facts::NAMES
                .union(Facts::SUPPLEMENTARY_GIDS)
                .union(Facts::SUPPLEMENTARY_GROUPS)
                .union(Facts::PATH)
                .union(Facts::SYSTEMD),
        ),
    ];
    for (name, facts) in cases {
        c.bench_function(name, |b| {
            b.iter(|| black_box(attestor.attest(black_box(&cred), facts).unwrap()));
        });
    }
    let path_sha256 = Facts::PATH.union(Facts::SHA256);
    attestor.attest(&cred, path_sha256).unwrap(); // fills the cache
    c.bench_function("attest_path_sha256_cached", |b| {
        b.iter(|| black_box(attestor.attest(black_box(&cred), path_sha256).unwrap()));
    });
    c.bench_function("attest_path_sha256_uncached", |b| {
        b.iter(|| {
            // A fresh attestor each time: the executable is hashed again.
            let cold = UnixAttestor::new();
            black_box(cold.attest(black_box(&cred), path_sha256).unwrap())
        });
    });
    c.bench_function("peer_cred_at_accept", |b| {
        b.iter(|| black_box(peer_cred(black_box(&a)).unwrap()));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
