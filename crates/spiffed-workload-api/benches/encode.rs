//! Response encoding: building and encoding a `FetchX509SVID` message (done once per change and
//! shared), what each stream then pays to send it, and the unary JWT-SVID response.
//!
//! `cargo bench -p spiffed-workload-api --bench encode`
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
use prost::Message as _;
use prost::bytes::BytesMut;
use spiffed_authority::{AuthorityConfig, CaAuthority};
use spiffed_core::{Authority, Entry, EntryId, TrustDomain};
use spiffed_proto::shared::CALL_BUFFER;
use spiffed_proto::workload::{Jwtsvid, JwtsvidResponse};
use spiffed_workload_api::x509_svid_response;

fn entry(id: &str) -> Arc<Entry> {
    Arc::new(Entry {
        id: EntryId::new(id),
        spiffe_id: format!("spiffe://example.org/bench/{id}").parse().unwrap(),
        selectors: vec!["unix:uid:1000".parse().unwrap()],
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: Some("internal".into()),
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
    let one = [entry("a")];
    let (ids, _lease) = a.identities(&one).unwrap();
    let bundle = a.x509_bundle();

    c.bench_function("x509_response_build_and_encode_1_svid", |b| {
        b.iter(|| black_box(x509_svid_response(black_box(&ids), &bundle)));
    });
    let three = [entry("a"), entry("b"), entry("c")];
    let (ids3, _lease3) = a.identities(&three).unwrap();
    c.bench_function("x509_response_build_and_encode_3_svids", |b| {
        b.iter(|| black_box(x509_svid_response(black_box(&ids3), &bundle)));
    });

    // Per stream, with the message shared: clone the bytes and copy them into the call's
    // buffer, as tonic's encoder does.
    let shared = x509_svid_response(&ids, &bundle);
    c.bench_function("x509_response_per_stream_shared", |b| {
        b.iter(|| {
            let msg = black_box(&shared).clone();
            let mut buf = BytesMut::with_capacity(CALL_BUFFER);
            msg.encode(&mut buf).unwrap();
            black_box(buf)
        });
    });
    // Per stream, each building and encoding its own message (before sharing).
    c.bench_function("x509_response_per_stream_unshared", |b| {
        b.iter(|| {
            let msg = x509_svid_response(black_box(&ids), &bundle);
            let mut buf = BytesMut::with_capacity(CALL_BUFFER);
            msg.encode(&mut buf).unwrap();
            black_box(buf)
        });
    });

    let audience = ["bench".to_owned()];
    let jwts = a.jwt_svids(&one, &audience).unwrap();
    c.bench_function("jwt_response_build_and_encode", |b| {
        b.iter(|| {
            let msg = JwtsvidResponse {
                svids: one
                    .iter()
                    .zip(black_box(&jwts))
                    .map(|(e, s)| Jwtsvid {
                        spiffe_id: s.spiffe_id.to_string(),
                        svid: s.token.to_string(),
                        hint: e.hint.clone().unwrap_or_default(),
                    })
                    .collect(),
            };
            black_box(msg.encode_to_vec())
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
