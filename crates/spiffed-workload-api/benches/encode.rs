//! Response encoding: building and encoding a `FetchX509SVID` message (done once per change and
//! shared), what each stream then pays to send it, and the unary JWT-SVID response.
//!
//! The certificates are real (a P-256 CA and leaves made with rcgen), so message sizes are
//! those a workload receives; no issuer is involved.
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
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message as _;
use prost::bytes::BytesMut;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use spiffed_core::{
    BundleSet, Entry, EntryId, Identity, JwtBundle, PrivateKey, TrustBundle, TrustDomain,
    X509Bundle, X509Svid,
};
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
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
    })
}

/// A CA, and leaves it signs.
struct Pki {
    ca_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        let ca_der = params.self_signed(&key).unwrap().der().to_vec();
        Self {
            ca_der,
            issuer: Issuer::new(params, key),
        }
    }

    fn identity(&self, entry: Arc<Entry>) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(
            entry.spiffe_id.to_string().try_into().unwrap(),
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let mut chain = params.signed_by(&key, &self.issuer).unwrap().der().to_vec();
        chain.extend_from_slice(&self.ca_der);
        let now = SystemTime::now();
        Identity {
            x509: Arc::new(X509Svid {
                spiffe_id: entry.spiffe_id.clone(),
                cert_chain_der: chain,
                key: PrivateKey::new(key.serialize_der().into()),
                serial: vec![1; 16],
                not_before: now,
                not_after: now + Duration::from_secs(3600),
            }),
            entry,
        }
    }

    fn bundle_set(&self) -> BundleSet {
        let td = TrustDomain::new("example.org").unwrap();
        BundleSet::new(
            TrustBundle {
                x509: Arc::new(X509Bundle {
                    trust_domain: td.clone(),
                    authorities: vec![self.ca_der.clone()],
                    sequence: 1,
                }),
                jwt: Arc::new(JwtBundle {
                    trust_domain: td,
                    keys: vec![],
                    sequence: 1,
                }),
            },
            1,
        )
    }
}

fn bench(c: &mut Criterion) {
    let pki = Pki::new();
    let set = pki.bundle_set();
    let ids = [pki.identity(entry("a"))];

    c.bench_function("x509_response_build_and_encode_1_svid", |b| {
        b.iter(|| black_box(x509_svid_response(black_box(&ids), &set)));
    });
    let ids3: Vec<Identity> = ["a", "b", "c"]
        .into_iter()
        .map(|id| pki.identity(entry(id)))
        .collect();
    c.bench_function("x509_response_build_and_encode_3_svids", |b| {
        b.iter(|| black_box(x509_svid_response(black_box(&ids3), &set)));
    });

    // Per stream, with the message shared: clone the bytes and copy them into the call's
    // buffer, as tonic's encoder does.
    let shared = x509_svid_response(&ids, &set);
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
            let msg = x509_svid_response(black_box(&ids), &set);
            let mut buf = BytesMut::with_capacity(CALL_BUFFER);
            msg.encode(&mut buf).unwrap();
            black_box(buf)
        });
    });

    // A token of an ES256 JWT-SVID's usual size: header, claims with one audience, signature.
    let token = format!("{}.{}.{}", "h".repeat(100), "p".repeat(220), "s".repeat(86));
    let one = [entry("a")];
    c.bench_function("jwt_response_build_and_encode", |b| {
        b.iter(|| {
            let msg = JwtsvidResponse {
                svids: one
                    .iter()
                    .map(|e| Jwtsvid {
                        spiffe_id: e.spiffe_id.to_string(),
                        svid: black_box(&token).clone(),
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
