//! One attestation of a live caller for each kind of selector entries can ask for: kernel
//! credentials only, name lookups, /proc reads, the executable's sha256 from the cache or
//! computed, and the composite of the built-in plugins.
//!
//! `cargo bench -p spiffed-attest --bench attest`
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark"
)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use spiffed_attest::listen::peer_cred;
use spiffed_attest::{CompositeAttestor, SystemdPlugin, UnixPlugin, builtin};
use spiffed_core::{Attestor, AttestorPlugin, Needs};

fn needs(kinds: &[&str]) -> Needs {
    kinds.iter().copied().collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A connected pair: the peer is this very process, alive for the whole run.
    let (a, _b) = rt.block_on(async { tokio::net::UnixStream::pair().unwrap() });
    let cred = peer_cred(&a).unwrap();

    // What each kind of entry set costs: the needs are the kinds the configured selectors use.
    let everything_but_sha256 = [
        "unix:user",
        "unix:group",
        "unix:supplementary_gid",
        "unix:supplementary_group",
        "unix:path",
        "systemd:id",
    ];
    let cases: [(&str, &[&str]); 6] = [
        ("attest_uid_gid", &[]),
        ("attest_user_group_names", &["unix:user", "unix:group"]),
        ("attest_path", &["unix:path"]),
        ("attest_supplementary_groups", &["unix:supplementary_group"]),
        ("attest_systemd", &["systemd:id"]),
        ("attest_everything_but_sha256", &everything_but_sha256),
    ];
    let composite = builtin();
    for (name, kinds) in cases {
        let needs = needs(kinds);
        c.bench_function(name, |b| {
            b.iter(|| {
                black_box(
                    rt.block_on(composite.attest(black_box(&cred), &needs))
                        .unwrap(),
                )
            });
        });
    }

    let path_sha256 = needs(&["unix:path", "unix:sha256"]);
    rt.block_on(composite.attest(&cred, &path_sha256)).unwrap(); // fills the cache
    c.bench_function("attest_path_sha256_cached", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(composite.attest(black_box(&cred), &path_sha256))
                    .unwrap(),
            )
        });
    });
    c.bench_function("attest_path_sha256_uncached", |b| {
        b.iter(|| {
            // A fresh plugin each time: the executable is hashed again (on the blocking pool).
            let cold = UnixPlugin::new();
            black_box(
                rt.block_on(cold.attest(black_box(&cred), &path_sha256))
                    .unwrap(),
            )
        });
    });
    // The composite's own cost over calling the unix plugin alone.
    let unix = UnixPlugin::new();
    let names = needs(&["unix:user", "unix:group"]);
    c.bench_function("unix_plugin_alone_names", |b| {
        b.iter(|| black_box(rt.block_on(unix.attest(black_box(&cred), &names)).unwrap()));
    });
    let composed = CompositeAttestor::new(vec![
        Arc::new(UnixPlugin::new()),
        Arc::new(SystemdPlugin::new()),
    ])
    .unwrap();
    c.bench_function("composite_names", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(composed.attest(black_box(&cred), &names))
                    .unwrap(),
            )
        });
    });
    c.bench_function("peer_cred_at_accept", |b| {
        b.iter(|| black_box(peer_cred(black_box(&a)).unwrap()));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
