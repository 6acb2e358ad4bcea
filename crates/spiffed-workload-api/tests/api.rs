//! The Workload API service against test doubles of its seams (no CA, no `/proc`): what each
//! RPC answers, and which changes reach which open streams, at what cost.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use prost::Message as _;
use spiffed_core::{EntryId, EntryPublisher, JwtError};
use spiffed_proto::shared::server::spiffe_workload_api_server::SpiffeWorkloadApi as _;
use spiffed_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, WitsvidRequest, X509BundlesRequest,
    X509svidRequest, X509svidResponse,
};
use spiffed_test_support::doubles::{
    TestAttestor, TestIssuer, TestServer, as_peer, as_peer_without_header, entry, fake_ca,
    fake_der, peer, serve,
};
use spiffed_test_support::with_header;
use spiffed_workload_api::{Wakeups, WorkloadApi};
use tonic::{Code, Request};

const TD: &str = "example.org";

struct Fixture {
    issuer: Arc<TestIssuer>,
    attestor: Arc<TestAttestor>,
    entries: EntryPublisher,
    api: WorkloadApi,
}

fn fixture(entries: Vec<spiffed_core::Entry>, synthetic_ids: bool) -> Fixture {
    let issuer = TestIssuer::new(TD);
    let attestor = TestAttestor::new();
    let entries = EntryPublisher::new(entries);
    let api = WorkloadApi::new(
        attestor.clone(),
        issuer.clone(),
        entries.feed(),
        synthetic_ids,
    );
    Fixture {
        issuer,
        attestor,
        entries,
        api,
    }
}

impl Fixture {
    fn serve(&self) -> TestServer {
        serve(self.api.clone().into_server())
    }
}

/// A direct request (no server) from a caller with this uid.
fn direct<T>(uid: u32, msg: T) -> Request<T> {
    let mut r = with_header(msg);
    r.extensions_mut().insert(peer(uid, None));
    r
}

fn id(e: &str) -> String {
    format!("spiffe://{TD}/{e}")
}

fn ids(m: &X509svidResponse) -> Vec<&str> {
    m.svids.iter().map(|s| s.spiffe_id.as_str()).collect()
}

/// `fut`'s output; a test that waits for a message that never comes fails instead of hanging
/// (the bound is generous, so a slow machine does not fail).
async fn within<F: std::future::Future>(fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(out) => out,
        Err(_) => panic!("nothing came within 30s"),
    }
}

/// Waits (up to a generous bound, so a slow machine does not fail) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn first_x509_message_has_each_identity_with_the_own_bundle() {
    let mut b = entry("b", &id("b"), &["unix:uid:1000"]);
    b.hint = Some("internal".into());
    let f = fixture(
        vec![
            entry("a", &id("a"), &["unix:uid:1000"]),
            b,
            entry("c", &id("c"), &["unix:uid:2000"]),
        ],
        false,
    );
    let server = f.serve();
    let mut client = server.client().await;
    let mut s = client
        .fetch_x509svid(as_peer(1000, None, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = within(s.message()).await.unwrap().unwrap();
    assert_eq!(ids(&m), [id("a"), id("b")]);
    for svid in &m.svids {
        let leaf = format!("leaf:{}:", svid.spiffe_id);
        assert!(svid.x509_svid[2..].starts_with(leaf.as_bytes()));
        assert!(!svid.x509_svid_key.is_empty());
        assert_eq!(svid.bundle, fake_ca(TD, 1));
    }
    assert_eq!(m.svids[0].hint, "");
    assert_eq!(m.svids[1].hint, "internal");
    assert!(m.federated_bundles.is_empty());
    assert_eq!(f.issuer.holders(&EntryId::new("a")), 1);
    assert_eq!(f.issuer.holders(&EntryId::new("c")), 0, "not issued");
}

#[tokio::test]
async fn refusals_map_to_their_status_codes() {
    let f = fixture(vec![entry("a", &id("a"), &["unix:uid:1000"])], false);
    let server = f.serve();
    let mut c = server.client().await;

    // The security header is checked before anything else, even for a caller with no identity.
    let e = c
        .fetch_x509svid(as_peer_without_header(3000, X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .fetch_jwtsvid(as_peer_without_header(
            1000,
            JwtsvidRequest {
                audience: vec!["x".into()],
                spiffe_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(f.attestor.calls(), 0, "no attestation without the header");

    // No identity: PermissionDenied "no identity issued" on the four RPCs that need one.
    let e = c
        .fetch_x509svid(as_peer(3000, None, X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::PermissionDenied, "no identity issued")
    );
    let e = c
        .fetch_x509_bundles(as_peer(3000, None, X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .fetch_jwt_bundles(as_peer(3000, None, JwtBundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .fetch_jwtsvid(as_peer(
            3000,
            None,
            JwtsvidRequest {
                audience: vec!["x".into()],
                spiffe_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A caller that is gone cannot be attested: Unavailable.
    f.attestor.set_gone(77);
    let e = c
        .fetch_x509svid(as_peer(1000, Some(77), X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().starts_with("workload attestation failed"),
        "{e}"
    );

    // The issuer cannot mint: Unavailable.
    f.issuer.fail_minting(Some("CA store offline"));
    let e = c
        .fetch_x509svid(as_peer(1000, None, X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("CA store offline"), "{e}");
    f.issuer.fail_minting(None);

    // A connection that did not come through the agent's listener has no credentials.
    let e = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);

    let e = c
        .fetch_witsvid(as_peer(1000, None, WitsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
}

/// 1,000 open streams, 10 per caller, each caller with its own entry: rotating one entry's
/// SVID wakes only the 10 streams that send it; an entry change wakes every stream, but only
/// those it concerns do any work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_wakes_only_the_streams_holding_the_entry() {
    let callers: Vec<u32> = (1..=100).collect();
    let f = fixture(
        callers
            .iter()
            .map(|u| {
                entry(
                    &format!("e{u}"),
                    &id(&format!("w{u}")),
                    &[&format!("unix:uid:{u}")],
                )
            })
            .collect(),
        false,
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for &uid in &callers {
        for _ in 0..10 {
            let (api, tx) = (f.api.clone(), tx.clone());
            tokio::spawn(async move {
                let mut s = api
                    .fetch_x509svid(direct(uid, X509svidRequest {}))
                    .await
                    .unwrap()
                    .into_inner();
                while let Some(Ok(m)) = within(s.next()).await {
                    let m = X509svidResponse::decode(m.as_bytes()).unwrap();
                    if tx.send((uid, m)).is_err() {
                        return;
                    }
                }
            });
        }
    }
    for _ in 0..1000 {
        within(rx.recv()).await.unwrap();
    }
    let before = f.api.wakeups();
    let calls = f.issuer.x509_calls();
    assert_eq!(
        calls, 1000,
        "each stream asks for its SVID once, at its start"
    );

    let e1 = EntryId::new("e1");
    assert!(f.issuer.rotate(&e1));
    let serial = f.issuer.serial(&e1).unwrap();
    for _ in 0..10 {
        let (uid, m) = within(rx.recv()).await.unwrap();
        assert_eq!(uid, 1, "only callers holding e1 get a message");
        assert_eq!(m.svids.len(), 1);
        assert_eq!(
            m.svids[0].x509_svid,
            fake_der(format!("leaf:{}:{serial}", id("w1")).as_bytes())
        );
    }
    let after = f.api.wakeups();
    assert_eq!(
        after,
        Wakeups {
            recomputed: before.recomputed + 10,
            filtered: before.filtered,
        }
    );
    assert_eq!(
        f.issuer.x509_calls(),
        calls,
        "a rotation asks the issuer nothing"
    );

    // An entry for nobody here: every stream wakes and goes back to sleep.
    f.entries
        .apply([entry("z", &id("z"), &["unix:uid:5000"])], [])
        .unwrap();
    let api = f.api.clone();
    eventually("1,000 streams filtered the change", || {
        api.wakeups().filtered == after.filtered + 1000
    })
    .await;
    assert_eq!(f.api.wakeups().recomputed, after.recomputed);
    assert!(
        rx.try_recv().is_err(),
        "no message for a change that concerns nobody"
    );
    assert_eq!(f.issuer.x509_calls(), calls);

    // A change to e1 (its hint): only its 10 streams re-match, and each sends it.
    let after = f.api.wakeups();
    let mut e1_hinted = entry("e1", &id("w1"), &["unix:uid:1"]);
    e1_hinted.hint = Some("internal".into());
    f.entries.apply([e1_hinted], []).unwrap();
    for _ in 0..10 {
        let (uid, m) = within(rx.recv()).await.unwrap();
        assert_eq!((uid, m.svids[0].hint.as_str()), (1, "internal"));
    }
    let api = f.api.clone();
    eventually("990 streams filtered the change", || {
        api.wakeups().filtered == after.filtered + 990
    })
    .await;
    assert_eq!(f.api.wakeups().recomputed, after.recomputed + 10);
}

#[tokio::test]
async fn losing_every_identity_ends_the_stream_with_permission_denied() {
    let f = fixture(vec![entry("a", &id("a"), &["unix:uid:1000"])], false);
    let server = f.serve();
    let mut c = server.client().await;
    let mut s = c
        .fetch_x509svid(as_peer(1000, None, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&within(s.message()).await.unwrap().unwrap()), [id("a")]);
    f.entries.apply([], [EntryId::new("a")]).unwrap();
    let e = within(s.message()).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::PermissionDenied, "no identity issued")
    );
    let issuer = f.issuer.clone();
    eventually("the stream let go of the SVID", || {
        issuer.holders(&EntryId::new("a")) == 0
    })
    .await;
}

#[tokio::test]
async fn an_entry_added_for_the_caller_is_pushed_with_the_others() {
    let f = fixture(vec![entry("a", &id("a"), &["unix:uid:1000"])], false);
    let server = f.serve();
    let mut c = server.client().await;
    let mut s = c
        .fetch_x509svid(as_peer(1000, None, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    within(s.message()).await.unwrap().unwrap();
    // One for another caller (no message), then one for this caller.
    f.entries
        .apply([entry("x", &id("x"), &["unix:uid:2000"])], [])
        .unwrap();
    f.entries
        .apply(
            [entry("b", &id("b"), &["unix:uid:1000", "unix:gid:1000"])],
            [],
        )
        .unwrap();
    let m = within(s.message()).await.unwrap().unwrap();
    assert_eq!(ids(&m), [id("a"), id("b")]);
}

#[tokio::test]
async fn bundle_set_changes_reach_svid_and_bundle_streams() {
    let mut a = entry("a", &id("a"), &["unix:uid:1000"]);
    a.federates_with = vec!["fed.org".parse().unwrap()];
    let f = fixture(vec![a], false);
    let server = f.serve();
    let mut c = server.client().await;
    let mut svids = c
        .fetch_x509svid(as_peer(1000, None, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut x509 = c
        .fetch_x509_bundles(as_peer(1000, None, X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut jwt = c
        .fetch_jwt_bundles(as_peer(1000, None, JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let own = format!("spiffe://{TD}");
    assert!(
        svids
            .message()
            .await
            .unwrap()
            .unwrap()
            .federated_bundles
            .is_empty()
    );
    let m = within(x509.message()).await.unwrap().unwrap();
    assert_eq!(m.bundles, HashMap::from([(own.clone(), fake_ca(TD, 1))]));
    let m = within(jwt.message()).await.unwrap().unwrap();
    assert_eq!(m.bundles.keys().collect::<Vec<_>>(), [&own]);

    f.issuer.add_federated(
        "fed.org",
        vec![fake_ca("fed.org", 1), fake_ca("fed.org", 2)],
        "fed-1",
    );
    let fed = "spiffe://fed.org".to_owned();
    let both = [fake_ca("fed.org", 1), fake_ca("fed.org", 2)].concat();
    let m = within(svids.message()).await.unwrap().unwrap();
    assert_eq!(
        m.federated_bundles,
        HashMap::from([(fed.clone(), both.clone())])
    );
    assert_eq!(
        m.svids[0].bundle,
        fake_ca(TD, 1),
        "the own bundle stays in each SVID"
    );
    let m = within(x509.message()).await.unwrap().unwrap();
    assert_eq!(
        m.bundles,
        HashMap::from([(own.clone(), fake_ca(TD, 1)), (fed.clone(), both)])
    );
    let m = within(jwt.message()).await.unwrap().unwrap();
    let jwks: serde_json::Value = serde_json::from_slice(&m.bundles[&fed]).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "fed-1");
    assert!(m.bundles.contains_key(&own));

    // A rotation sends a new SVID message but no bundle message: the next bundle messages are
    // those of the removal.
    assert!(f.issuer.rotate(&EntryId::new("a")));
    let m = within(svids.message()).await.unwrap().unwrap();
    assert_eq!(m.federated_bundles.len(), 1);
    f.issuer.remove_federated("fed.org");
    let m = within(x509.message()).await.unwrap().unwrap();
    assert_eq!(m.bundles.keys().collect::<Vec<_>>(), [&own]);
    let m = within(jwt.message()).await.unwrap().unwrap();
    assert_eq!(m.bundles.keys().collect::<Vec<_>>(), [&own]);
    let m = within(svids.message()).await.unwrap().unwrap();
    assert!(m.federated_bundles.is_empty(), "a removed bundle is absent");
}

/// As spire-agent: a workload receives a federated bundle only when one of its own entries
/// federates with that trust domain, on every RPC that hands out bundles, and a federated
/// JWT-SVID is validated only for such a caller.
#[tokio::test]
async fn federated_bundles_go_only_to_workloads_whose_entries_federate_with_them() {
    let mut fed_entry = entry("a", &id("a"), &["unix:uid:1000"]);
    fed_entry.federates_with = vec!["fed.org".parse().unwrap()];
    let f = fixture(
        vec![fed_entry, entry("b", &id("b"), &["unix:uid:1001"])],
        false,
    );
    f.issuer
        .add_federated("fed.org", vec![fake_ca("fed.org", 1)], "fed-1");
    f.issuer
        .add_federated("other.org", vec![fake_ca("other.org", 1)], "other-1");
    let server = f.serve();
    let mut c = server.client().await;
    let own = format!("spiffe://{TD}");
    let fed = "spiffe://fed.org".to_owned();
    for (uid, expect_fed) in [(1000, true), (1001, false)] {
        let m = within(async {
            c.fetch_x509svid(as_peer(uid, None, X509svidRequest {}))
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
        })
        .await
        .unwrap()
        .unwrap();
        let want: Vec<&String> = if expect_fed { vec![&fed] } else { vec![] };
        assert_eq!(
            m.federated_bundles.keys().collect::<Vec<_>>(),
            want,
            "uid {uid}"
        );
        let m = within(async {
            c.fetch_x509_bundles(as_peer(uid, None, X509BundlesRequest {}))
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
        })
        .await
        .unwrap()
        .unwrap();
        let mut keys: Vec<&String> = m.bundles.keys().collect();
        keys.sort();
        let want: Vec<&String> = if expect_fed {
            vec![&own, &fed]
        } else {
            vec![&own]
        };
        assert_eq!(keys, want, "uid {uid}: x509 bundles");
        let m = within(async {
            c.fetch_jwt_bundles(as_peer(uid, None, JwtBundlesRequest {}))
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
        })
        .await
        .unwrap()
        .unwrap();
        let mut keys: Vec<&String> = m.bundles.keys().collect();
        keys.sort();
        assert_eq!(keys, want, "uid {uid}: jwt bundles");
    }
    // A token whose subject is in fed.org: validated (here: answered by the issuer double)
    // for the federating caller, refused without asking the issuer for the other one.
    use base64::Engine as _;
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let token = format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"ES256","kid":"fed-1","typ":"JWT"}"#),
        b64(r#"{"sub":"spiffe://fed.org/x","aud":["a"],"exp":9999999999}"#)
    );
    f.issuer.script_validation(
        &token,
        Ok(spiffed_core::ValidatedJwt {
            spiffe_id: "spiffe://fed.org/x".parse().unwrap(),
            claims_json: br#"{"sub":"spiffe://fed.org/x"}"#.to_vec(),
        }),
    );
    let req = |uid| {
        as_peer(
            uid,
            None,
            ValidateJwtsvidRequest {
                audience: "a".into(),
                svid: token.clone(),
            },
        )
    };
    let ok = c.validate_jwtsvid(req(1000)).await.unwrap().into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://fed.org/x");
    let e = c.validate_jwtsvid(req(1001)).await.unwrap_err();
    assert!(
        e.message()
            .contains("no JWT authorities for trust domain \"fed.org\""),
        "{e:?}"
    );
}

/// `[federation] federate_all`: a workload without any `federates_with` receives every
/// federated bundle on every RPC that hands out bundles, and may validate their tokens.
#[tokio::test]
async fn federate_all_gives_every_workload_every_federated_bundle() {
    let mut f = fixture(vec![entry("b", &id("b"), &["unix:uid:1001"])], false);
    f.api = f.api.clone().with_federate_all(true);
    f.issuer
        .add_federated("fed.org", vec![fake_ca("fed.org", 1)], "fed-1");
    f.issuer
        .add_federated("other.org", vec![fake_ca("other.org", 1)], "other-1");
    let server = f.serve();
    let mut c = server.client().await;
    let all = [
        format!("spiffe://{TD}"),
        "spiffe://fed.org".to_owned(),
        "spiffe://other.org".to_owned(),
    ];
    let m = within(async {
        c.fetch_x509svid(as_peer(1001, None, X509svidRequest {}))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
    })
    .await
    .unwrap()
    .unwrap();
    let mut keys: Vec<&String> = m.federated_bundles.keys().collect();
    keys.sort();
    assert_eq!(keys, all[1..].iter().collect::<Vec<_>>());
    let m = within(async {
        c.fetch_x509_bundles(as_peer(1001, None, X509BundlesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
    })
    .await
    .unwrap()
    .unwrap();
    let mut keys: Vec<&String> = m.bundles.keys().collect();
    keys.sort();
    assert_eq!(keys, all.iter().collect::<Vec<_>>());
    let m = within(async {
        c.fetch_jwt_bundles(as_peer(1001, None, JwtBundlesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
    })
    .await
    .unwrap()
    .unwrap();
    let mut keys: Vec<&String> = m.bundles.keys().collect();
    keys.sort();
    assert_eq!(keys, all.iter().collect::<Vec<_>>());
    use base64::Engine as _;
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let token = format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"ES256","kid":"fed-1","typ":"JWT"}"#),
        b64(r#"{"sub":"spiffe://fed.org/x","aud":["a"],"exp":9999999999}"#)
    );
    f.issuer.script_validation(
        &token,
        Ok(spiffed_core::ValidatedJwt {
            spiffe_id: "spiffe://fed.org/x".parse().unwrap(),
            claims_json: br#"{"sub":"spiffe://fed.org/x"}"#.to_vec(),
        }),
    );
    let ok = c
        .validate_jwtsvid(as_peer(
            1001,
            None,
            ValidateJwtsvidRequest {
                audience: "a".into(),
                svid: token.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://fed.org/x");
}

#[tokio::test]
async fn jwt_svids_follow_entitlement_and_validate() {
    let mut b = entry("b", &id("b"), &["unix:uid:1000"]);
    b.hint = Some("internal".into());
    let f = fixture(
        vec![
            entry("a", &id("a"), &["unix:uid:1000"]),
            b,
            entry("c", &id("c"), &["unix:uid:2000"]),
        ],
        false,
    );
    let server = f.serve();
    let mut c = server.client().await;
    let fetch = |spiffe_id: &str, audience: &[&str]| {
        as_peer(
            1000,
            None,
            JwtsvidRequest {
                audience: audience.iter().map(|a| (*a).to_owned()).collect(),
                spiffe_id: spiffe_id.to_owned(),
            },
        )
    };
    let all = c
        .fetch_jwtsvid(fetch("", &["x", "y"]))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = all.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(got, [id("a"), id("b")]);
    assert_eq!(all.svids[1].hint, "internal");
    let one = c
        .fetch_jwtsvid(fetch(&id("b"), &["x"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.svids.len(), 1);
    assert_eq!(one.svids[0].spiffe_id, id("b"));

    let e = c.fetch_jwtsvid(fetch(&id("c"), &["x"])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "c is another caller's");
    let e = c.fetch_jwtsvid(fetch("", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .fetch_jwtsvid(fetch(&format!("{}/", id("a")), &["x"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("invalid requested SPIFFE ID"), "{e}");

    // Validation, also by a caller without an identity.
    let token = all.svids[0].svid.clone();
    let validate = |uid: u32, svid: &str, audience: &str| {
        as_peer(
            uid,
            None,
            ValidateJwtsvidRequest {
                audience: audience.to_owned(),
                svid: svid.to_owned(),
            },
        )
    };
    let v = c
        .validate_jwtsvid(validate(3000, &token, "y"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, id("a"));
    let claims = v.claims.unwrap().fields;
    assert!(matches!(
        &claims["sub"].kind,
        Some(prost_types::value::Kind::StringValue(s)) if *s == id("a")
    ));
    assert!(matches!(
        &claims["exp"].kind,
        Some(prost_types::value::Kind::NumberValue(_))
    ));
    let e = c
        .validate_jwtsvid(validate(1000, &token, "z"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .validate_jwtsvid(validate(1000, "", "x"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "svid must be specified")
    );
    f.issuer.script_validation("old", Err(JwtError::Expired));
    let e = c
        .validate_jwtsvid(validate(1000, "old", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("expired"), "{e}");

    f.issuer.fail_minting(Some("signing key gone"));
    let e = c.fetch_jwtsvid(fetch("", &["x"])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
}

#[tokio::test]
async fn an_entry_needing_new_facts_attests_the_caller_again() {
    let f = fixture(vec![entry("a", &id("a"), &["unix:uid:1000"])], false);
    f.attestor
        .set_uid(1000, &["unix:path:/bin/web"], Some("/bin/web"));
    let server = f.serve();
    let mut c = server.client().await;
    let mut s = c
        .fetch_x509svid(as_peer(1000, None, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    within(s.message()).await.unwrap().unwrap();
    assert_eq!(f.attestor.calls(), 1);
    assert!(
        !f.attestor.needs_asked()[0].wants("unix:path"),
        "no entry used it"
    );

    // The first entry to use `unix:path` matches this caller only with facts not yet gathered.
    f.entries
        .apply(
            [entry(
                "b",
                &id("b"),
                &["unix:uid:1000", "unix:path:/bin/web"],
            )],
            [],
        )
        .unwrap();
    let m = within(s.message()).await.unwrap().unwrap();
    assert_eq!(ids(&m), [id("a"), id("b")]);
    assert_eq!(f.attestor.calls(), 2);
    assert!(f.attestor.needs_asked()[1].wants("unix:path"));
}

#[tokio::test]
async fn a_stream_that_missed_events_matches_again() {
    let f = fixture(vec![entry("a", &id("a"), &["unix:uid:1000"])], false);
    let mut s = f
        .api
        .fetch_x509svid(direct(1000, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    within(s.next()).await.unwrap().unwrap();
    // Two events while the stream is not polled: the latest alone (for another caller) would
    // not concern it, but it does not follow the last one the stream judged.
    f.entries
        .apply([entry("b", &id("b"), &["unix:uid:1000"])], [])
        .unwrap();
    f.entries
        .apply([entry("x", &id("x"), &["unix:uid:2000"])], [])
        .unwrap();
    let before = f.api.wakeups();
    let m = X509svidResponse::decode(within(s.next()).await.unwrap().unwrap().as_bytes()).unwrap();
    assert_eq!(ids(&m), [id("a"), id("b")]);
    assert_eq!(f.api.wakeups().recomputed, before.recomputed + 1);
}

#[tokio::test]
async fn dev_mode_gives_unmatched_callers_a_synthetic_identity() {
    let f = fixture(vec![], true);
    f.attestor.set_uid(1000, &[], Some("/usr/bin/my app"));
    let mut s = f
        .api
        .fetch_x509svid(direct(1000, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = X509svidResponse::decode(within(s.next()).await.unwrap().unwrap().as_bytes()).unwrap();
    assert_eq!(ids(&m), [format!("spiffe://{TD}/uid-1000/my_app")]);
    assert!(f.attestor.needs_asked()[0].wants("unix:path"));
    // A real entry for the caller replaces the synthetic identity.
    f.entries
        .apply([entry("a", &id("a"), &["unix:uid:1000"])], [])
        .unwrap();
    let m = X509svidResponse::decode(within(s.next()).await.unwrap().unwrap().as_bytes()).unwrap();
    assert_eq!(ids(&m), [id("a")]);
}

#[tokio::test]
async fn an_svid_the_issuer_lets_go_of_is_asked_for_again() {
    let f = fixture(vec![entry("a", &id("a"), &["unix:uid:1000"])], false);
    let a = EntryId::new("a");
    let mut s = f
        .api
        .fetch_x509svid(direct(1000, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    within(s.next()).await.unwrap().unwrap();
    let first = f.issuer.serial(&a).unwrap();
    f.issuer.forget(&a);
    let m = X509svidResponse::decode(within(s.next()).await.unwrap().unwrap().as_bytes()).unwrap();
    assert_eq!(ids(&m), [id("a")]);
    assert!(f.issuer.serial(&a).unwrap() > first);
    assert_eq!(f.issuer.holders(&a), 1);
}

#[tokio::test]
async fn streams_end_when_the_entry_publisher_goes() {
    let f = fixture(vec![entry("a", &id("a"), &["unix:uid:1000"])], false);
    let mut s = f
        .api
        .fetch_x509svid(direct(1000, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    within(s.next()).await.unwrap().unwrap();
    let Fixture {
        entries, issuer, ..
    } = f;
    drop(entries);
    assert!(
        within(s.next()).await.is_none(),
        "the stream ends without an error"
    );
    assert_eq!(issuer.holders(&EntryId::new("a")), 0);
}

#[tokio::test]
async fn a_huge_entry_event_is_matched_again_not_judged_change_by_change() {
    let f = fixture(vec![entry("a", &id("a"), &["unix:uid:1000"])], false);
    let mut s = f
        .api
        .fetch_x509svid(direct(1000, X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    within(s.next()).await.unwrap().unwrap();
    let before = f.api.wakeups();
    // A reload adding 1,001 entries, none for this caller: judged change by change it would be
    // filtered; past the limit the stream matches its caller again instead (and sends nothing,
    // as its answer did not change).
    let many: Vec<_> = (0..1001)
        .map(|i| entry(&format!("o{i}"), &id(&format!("o{i}")), &["unix:uid:2000"]))
        .collect();
    f.entries.apply(many, []).unwrap();
    // The stream runs only while polled: poll it while waiting for the counter.
    tokio::select! {
        m = s.next() => panic!("no message expected (the answer did not change): {}", m.is_some()),
        () = eventually("the stream re-matched", || {
            f.api.wakeups().recomputed == before.recomputed + 1
        }) => {}
    }
    assert_eq!(f.api.wakeups().filtered, before.filtered);
    // Then an entry for this caller: pushed as usual.
    f.entries
        .apply([entry("b", &id("b"), &["unix:uid:1000"])], [])
        .unwrap();
    let m = X509svidResponse::decode(within(s.next()).await.unwrap().unwrap().as_bytes()).unwrap();
    assert_eq!(ids(&m), [id("a"), id("b")]);
}
