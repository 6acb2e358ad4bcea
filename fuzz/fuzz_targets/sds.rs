//! Envoy SDS request handling (`StreamSecrets` and `FetchSecrets`): any sequence of
//! `DiscoveryRequest`s from a local caller, interleaved with workload updates, through the
//! stream's xDS state and the response building, against a fixed workload (two identities, the
//! own bundle, one entitled federated bundle and one that is not).
//!
//! Input: repeated `op` byte + length-delimited `DiscoveryRequest` (protobuf). `op` bit 0: a
//! workload update comes first; bit 1: the agent-wide `disable_spiffe_cert_validation`.
//!
//! Checks, for every input:
//! - nothing panics (a malformed request must never crash the agent: spire-agent v1.13.3 dies
//!   on a node `user_agent_build_version` without `version`);
//! - each response carries the version = number of updates, and a nonce of 8 hex digits that
//!   differs from the previous one; a stale request changes nothing;
//! - a built response holds exactly the requested names (or, for none, every trust domain ID
//!   and SPIFFE ID the workload holds), each a `Secret` that decodes, of the right kind; a
//!   refusal names exactly the requested names the workload holds nothing for; `ALL` is
//!   refused only in the plain-CA form.
#![no_main]

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use spiffed_core::{BundleSet, Identity, PrivateKey, X509Svid};
use spiffed_test_support::doubles::{entry, fake_ca, fake_der, trust_bundle};
use spiffed_workload_api::sds::{NodePrefs, Resources, Snapshot, Validation, XdsState, build};
use spiffed_workload_api::{ApiError, SdsConfig};

struct Fixture {
    ids: Vec<Identity>,
    bundles: BundleSet,
    cfg: SdsConfig,
    /// What an empty request gets, by name.
    everything: BTreeSet<String>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut a = entry("a", "spiffe://example.org/a", &["unix:uid:1"]);
        a.federates_with = vec!["fed.org".parse().unwrap()];
        let ids = [a, entry("b", "spiffe://example.org/b", &["unix:uid:1"])]
            .into_iter()
            .map(|e| {
                let x509 = X509Svid {
                    spiffe_id: e.spiffe_id.clone(),
                    cert_chain_der: [fake_der(b"leaf"), fake_der(b"intermediate")].concat(),
                    key: PrivateKey::new(b"key".to_vec().into()),
                    serial: vec![1],
                    not_before: SystemTime::UNIX_EPOCH,
                    not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
                };
                Identity {
                    entry: Arc::new(e),
                    x509: Arc::new(x509),
                }
            })
            .collect();
        let bundles = BundleSet::new(
            trust_bundle("example.org", vec![fake_ca("example.org", 1)], "k"),
            1,
        )
        .with(trust_bundle("fed.org", vec![fake_ca("fed.org", 1)], "f"), 2)
        .with(trust_bundle("other.org", vec![fake_ca("other.org", 1)], "o"), 3);
        let everything = [
            "spiffe://example.org",
            "spiffe://fed.org",
            "spiffe://example.org/a",
            "spiffe://example.org/b",
        ]
        .map(str::to_owned)
        .into();
        Fixture {
            ids,
            bundles,
            cfg: SdsConfig::default(),
            everything,
        }
    })
}

/// Builds the response for `names` and checks it.
fn check_build(f: &Fixture, names: &[String], validation: Validation) {
    let snap = Snapshot {
        ids: &f.ids,
        bundles: &f.bundles,
        federate_all: false,
    };
    let asked: BTreeSet<String> = names.iter().filter(|n| !n.is_empty()).cloned().collect();
    match build(names, &snap, validation, &f.cfg) {
        Ok(resources) => {
            let mut got = BTreeSet::new();
            for r in &resources {
                let s = Secret::decode(r.value.as_slice()).expect("a resource is a Secret");
                let is_cert = matches!(s.r#type, Some(secret::Type::TlsCertificate(_)));
                let want_cert = s.name == f.cfg.default_svid_name
                    || (s.name.starts_with("spiffe://example.org/"));
                assert_eq!(is_cert, want_cert, "{}", s.name);
                if !is_cert {
                    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
                        panic!("{} is neither kind", s.name)
                    };
                    assert_eq!(
                        v.trusted_ca.is_some(),
                        validation == Validation::TrustedCa,
                        "{}",
                        s.name
                    );
                }
                assert!(got.insert(s.name), "a name twice");
            }
            if asked.is_empty() {
                assert_eq!(got, f.everything);
            } else {
                assert_eq!(got, asked);
            }
        }
        Err(ApiError::SdsNotAuthorized(refused)) => {
            assert!(!refused.is_empty());
            assert!(refused.windows(2).all(|w| w[0] < w[1]), "sorted, once each");
            for n in &refused {
                assert!(asked.contains(n), "{n} was not asked for");
                assert!(!f.everything.contains(n), "{n} is held");
            }
        }
        Err(ApiError::BadRequest(_)) => {
            assert_eq!(validation, Validation::TrustedCa);
            assert!(asked.contains(&f.cfg.default_all_bundles_name));
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Sends a response for the names last requested, and checks its version and nonce.
fn respond(
    f: &Fixture,
    xds: &mut XdsState,
    disable: bool,
    updates: u64,
    last_nonce: &mut Option<String>,
) {
    let validation = xds.node().validation(disable);
    let names: Vec<String> = xds
        .names()
        .expect("a response only after a request")
        .iter()
        .cloned()
        .collect();
    check_build(f, &names, validation);
    let resp = xds.respond(Resources::default());
    assert_eq!(resp.version_info, updates.to_string());
    assert_eq!(resp.nonce.len(), 8);
    assert!(resp.nonce.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(Some(&resp.nonce), last_nonce.as_ref());
    *last_nonce = Some(resp.nonce);
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut buf = data;
    let mut xds = XdsState::new();
    let mut updates = 1u64;
    xds.on_update();
    let mut last_nonce: Option<String> = None;
    while let Some((&op, rest)) = buf.split_first() {
        buf = rest;
        let disable = op & 2 != 0;
        if op & 1 != 0 {
            updates += 1;
            if xds.on_update() {
                respond(f, &mut xds, disable, updates, &mut last_nonce);
            }
        }
        let Ok(req) = DiscoveryRequest::decode_length_delimited(&mut buf) else {
            break;
        };
        // FetchSecrets: the request on its own.
        let node = req.node.as_ref().map(NodePrefs::of).unwrap_or_default();
        check_build(f, &req.resource_names, node.validation(disable));
        let before = xds.names().cloned();
        match xds.on_request(&req) {
            // The stream ends with the error.
            Err(_) => break,
            Ok(r) => {
                if r.stale {
                    assert!(!r.send);
                    assert_eq!(xds.names().cloned(), before);
                } else if r.send {
                    respond(f, &mut xds, disable, updates, &mut last_nonce);
                }
            }
        }
    }
});
