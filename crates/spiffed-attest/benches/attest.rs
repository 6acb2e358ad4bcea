//! One attestation of a live caller: kernel credentials plus /proc reads, with and without the
//! executable's sha256 (served from the cache after the first call).
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
use spiffed_attest::listen::peer_cred;
use spiffed_attest::{AttestOptions, UnixAttestor};
use spiffed_core::Attestor;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A connected pair: the peer is this very process, alive for the whole run.
    let (a, _b) = rt.block_on(async { tokio::net::UnixStream::pair().unwrap() });
    let cred = peer_cred(&a).unwrap();

    let plain = UnixAttestor::new(AttestOptions::default());
    c.bench_function("attest_uid_gid_path", |b| {
        b.iter(|| black_box(plain.attest(black_box(&cred)).unwrap()));
    });
    let hashing = UnixAttestor::new(AttestOptions {
        hash_executables: true,
    });
    hashing.attest(&cred).unwrap(); // fills the cache
    c.bench_function("attest_with_sha256_cached", |b| {
        b.iter(|| black_box(hashing.attest(black_box(&cred)).unwrap()));
    });
    c.bench_function("attest_with_sha256_uncached", |b| {
        b.iter(|| {
            // A fresh attestor each time: the executable is hashed again.
            let cold = UnixAttestor::new(AttestOptions {
                hash_executables: true,
            });
            black_box(cold.attest(black_box(&cred)).unwrap())
        });
    });
    c.bench_function("peer_cred_at_accept", |b| {
        b.iter(|| black_box(peer_cred(black_box(&a)).unwrap()));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
