//! Envoy SDS against test doubles of the seams: what each resource name answers, and the
//! version, nonce, ACK and NACK behaviour of `StreamSecrets` over workload updates.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{BuildVersion, Node, node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use prost::Message as _;
use spiffed_core::{EntryId, EntryPublisher};
use spiffed_test_support::doubles::{
    PEER_UID_HEADER, TestAttestor, TestIssuer, TestServer, entry, fake_ca, serve,
};
use spiffed_workload_api::sds::{SECRET_TYPE_URL, SPIFFE_VALIDATOR};
use spiffed_workload_api::{SdsConfig, SdsService, WorkloadApi};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const TD: &str = "example.org";

fn id(e: &str) -> String {
    format!("spiffe://{TD}/{e}")
}

struct Fixture {
    issuer: Arc<TestIssuer>,
    entries: EntryPublisher,
    sds: SdsService,
    server: TestServer,
}

fn fixture(entries: Vec<spiffed_core::Entry>, cfg: SdsConfig) -> Fixture {
    let issuer = TestIssuer::new(TD);
    let attestor = TestAttestor::new();
    let entries = EntryPublisher::new(entries);
    let api = WorkloadApi::new(attestor, issuer.clone(), entries.feed(), false);
    let sds = api.sds(cfg);
    let server = serve(sds.clone().into_server());
    Fixture {
        issuer,
        entries,
        sds,
        server,
    }
}

impl Fixture {
    async fn client(&self) -> SecretDiscoveryServiceClient<Channel> {
        SecretDiscoveryServiceClient::new(spiffed_test_support::channel(&self.server.socket).await)
    }

    /// Opens `StreamSecrets` as `uid` (no security header, as Envoy).
    async fn open(&self, uid: u32) -> Sds {
        let (tx, rx) = mpsc::channel(16);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(PEER_UID_HEADER, uid.to_string().parse().unwrap());
        let rx = self
            .client()
            .await
            .stream_secrets(req)
            .await
            .unwrap()
            .into_inner();
        Sds { tx, rx }
    }
}

/// One open `StreamSecrets`.
struct Sds {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sds {
    async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn recv(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(30), self.rx.message()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => panic!("the stream ended"),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("nothing came within 30s"),
        }
    }

    /// Sends `req` and returns the response.
    async fn ask(&mut self, req: DiscoveryRequest) -> DiscoveryResponse {
        self.send(req).await;
        self.recv().await.unwrap()
    }
}

fn req(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        ..Default::default()
    }
}

/// The ACK of `resp` for `names`.
fn ack(names: &[&str], resp: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        ..req(names)
    }
}

fn with_node(mut r: DiscoveryRequest, node: Node) -> DiscoveryRequest {
    r.node = Some(node);
    r
}

fn envoy(version: Option<(u32, u32)>) -> Node {
    Node {
        user_agent_version_type: Some(node::UserAgentVersionType::UserAgentBuildVersion(
            BuildVersion {
                version: version.map(|(major_number, minor_number)| SemanticVersion {
                    major_number,
                    minor_number,
                    patch: 0,
                }),
                metadata: None,
            },
        )),
        ..Default::default()
    }
}

fn metadata_node(v: value::Kind) -> Node {
    Node {
        metadata: Some(Struct {
            fields: [(
                "disable_spiffe_cert_validation".to_owned(),
                Value { kind: Some(v) },
            )]
            .into(),
        }),
        ..Default::default()
    }
}

fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE_URL);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn names(resp: &DiscoveryResponse) -> Vec<String> {
    secrets(resp).into_iter().map(|s| s.name).collect()
}

/// What a secret holds, in short.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    /// A certificate: the PEM chain's body and the key PEM.
    Cert(Vec<u8>, String),
    /// SPIFFE validator: (trust domain, PEM CAs) in order.
    Spiffe(Vec<(String, Vec<Vec<u8>>)>),
    /// trusted_ca: the CAs.
    Ca(Vec<Vec<u8>>),
}

/// The DER items of PEM `text`, each `-----BEGIN label-----` block decoded.
fn pem_items(text: &[u8], label: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let text = std::str::from_utf8(text).unwrap();
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = vec![];
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let stop = after.find(&end).unwrap();
        let body: String = after[..stop].split_whitespace().collect();
        out.push(
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap(),
        );
        rest = &after[stop + end.len()..];
    }
    assert_eq!(
        text.matches("-----BEGIN").count(),
        out.len(),
        "only {label} blocks"
    );
    out
}

fn held(s: &Secret) -> Held {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    let bytes = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match d
        .as_ref()
        .and_then(|d| d.specifier.as_ref())
    {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        other => panic!("not inline bytes: {other:?}"),
    };
    match s.r#type.as_ref().unwrap() {
        secret::Type::TlsCertificate(t) => {
            let chain = pem_items(&bytes(&t.certificate_chain), "CERTIFICATE");
            assert_eq!(chain.len(), 1, "one PEM block per certificate");
            let key = pem_items(&bytes(&t.private_key), "PRIVATE KEY");
            assert_eq!(key.len(), 1);
            Held::Cert(chain[0].clone(), String::from_utf8(key[0].clone()).unwrap())
        }
        secret::Type::ValidationContext(v) => {
            if let Some(c) = &v.custom_validator_config {
                assert_eq!(c.name, SPIFFE_VALIDATOR);
                let typed = c.typed_config.as_ref().unwrap();
                assert!(typed.type_url.ends_with("SPIFFECertValidatorConfig"));
                let cfg = SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap();
                Held::Spiffe(
                    cfg.trust_domains
                        .iter()
                        .map(|t| {
                            (
                                t.name.clone(),
                                pem_items(&bytes(&t.trust_bundle), "CERTIFICATE"),
                            )
                        })
                        .collect(),
                )
            } else {
                Held::Ca(pem_items(&bytes(&v.trusted_ca), "CERTIFICATE"))
            }
        }
        other => panic!("unexpected secret {other:?}"),
    }
}

fn leaf(spiffe_id: &str, serial: u64) -> Vec<u8> {
    spiffed_test_support::doubles::fake_der(format!("leaf:{spiffe_id}:{serial}").as_bytes())
}

/// Two entries for uid 1000 (`b` registered first in the file but `a` has the lower entry ID),
/// `a` federating with fed.org; one for uid 2000.
fn three_entries() -> Vec<spiffed_core::Entry> {
    let mut a = entry("a", &id("a"), &["unix:uid:1000"]);
    a.federates_with = vec!["fed.org".parse().unwrap()];
    vec![
        entry("b", &id("b"), &["unix:uid:1000"]),
        a,
        entry("c", &id("c"), &["unix:uid:2000"]),
    ]
}

#[tokio::test]
async fn each_name_answers_its_resource() {
    let f = fixture(three_entries(), SdsConfig::default());
    f.issuer
        .add_federated("fed.org", vec![fake_ca("fed.org", 1)], "fed-1");
    f.issuer
        .add_federated("other.org", vec![fake_ca("other.org", 1)], "o-1");
    let own = vec![fake_ca(TD, 1)];
    let fed = vec![fake_ca("fed.org", 1)];
    let mut s = f.open(1000).await;

    // Everything: own and entitled federated bundles by trust domain ID, then each identity.
    let all = s.ask(req(&[])).await;
    assert_eq!(all.version_info, "1");
    assert_eq!(all.type_url, SECRET_TYPE_URL);
    assert_eq!(
        names(&all),
        [
            format!("spiffe://{TD}"),
            "spiffe://fed.org".into(),
            id("a"),
            id("b")
        ]
    );
    let got: Vec<Held> = secrets(&all).iter().map(held).collect();
    assert_eq!(got[0], Held::Spiffe(vec![(TD.into(), own.clone())]));
    assert_eq!(got[1], Held::Spiffe(vec![("fed.org".into(), fed.clone())]));
    let Held::Cert(chain, key) = &got[2] else {
        panic!("{:?}", got[2])
    };
    assert!(String::from_utf8_lossy(chain).contains(&format!("leaf:{}:", id("a"))));
    assert!(key.starts_with("key:"));

    // The defaults, a SPIFFE ID and a trust domain ID by name.
    let named = s
        .ask(ack(
            &["default", "ROOTCA", "ALL", &id("b"), "spiffe://fed.org"],
            &all,
        ))
        .await;
    let mut by_name: Vec<(String, Held)> = secrets(&named)
        .iter()
        .map(|x| (x.name.clone(), held(x)))
        .collect();
    by_name.sort_by(|a, b| a.0.cmp(&b.0));
    let names_only: Vec<&str> = by_name.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names_only,
        [
            "ALL",
            "ROOTCA",
            "default",
            "spiffe://example.org/b",
            "spiffe://fed.org"
        ]
    );
    assert_eq!(
        by_name[0].1,
        Held::Spiffe(vec![
            ("example.org".into(), own.clone()),
            ("fed.org".into(), fed)
        ]),
        "ALL: own and entitled federated bundles (not other.org), sorted"
    );
    assert_eq!(by_name[1].1, Held::Spiffe(vec![(TD.into(), own)]));
    // `default` is the identity of the lowest entry ID (a), not the first registered (b).
    let Held::Cert(default_chain, _) = &by_name[2].1 else {
        panic!()
    };
    assert!(String::from_utf8_lossy(default_chain).contains(&format!("leaf:{}:", id("a"))));
    let Held::Cert(b_chain, _) = &by_name[3].1 else {
        panic!()
    };
    assert!(String::from_utf8_lossy(b_chain).contains(&format!("leaf:{}:", id("b"))));
}

#[tokio::test]
async fn unauthorized_names_end_the_stream_with_invalid_argument() {
    let f = fixture(three_entries(), SdsConfig::default());
    f.issuer
        .add_federated("other.org", vec![fake_ca("other.org", 1)], "o-1");
    for names in [
        vec![id("c")],
        vec!["spiffe://other.org".to_owned()],
        vec!["default".into(), id("c"), "nope".into()],
    ] {
        let mut s = f.open(1000).await;
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        s.send(req(&refs)).await;
        let e = s.recv().await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{names:?}");
        let mut refused: Vec<&String> = names.iter().filter(|n| *n != "default").collect();
        refused.sort();
        let quoted: Vec<String> = refused.iter().map(|n| format!("{n:?}")).collect();
        assert_eq!(
            e.message(),
            format!(
                "workload is not authorized for the requested identities [{}]",
                quoted.join(" ")
            )
        );
        assert!(s.rx.message().await.unwrap().is_none(), "the stream ended");
    }
}

#[tokio::test]
async fn ack_sends_nothing_and_a_rotation_pushes_the_next_version() {
    let f = fixture(three_entries(), SdsConfig::default());
    let mut s = f.open(1000).await;
    let first = s.ask(req(&["default"])).await;
    assert_eq!(first.version_info, "1");
    assert_eq!(first.nonce.len(), 8);
    // ACK: nothing is sent (the next message is the rotation's, version 2).
    s.send(ack(&["default"], &first)).await;
    assert!(f.issuer.rotate(&EntryId::new("a")));
    let second = s.recv().await.unwrap();
    assert_eq!(second.version_info, "2");
    assert_ne!(second.nonce, first.nonce);
    let serial = f.issuer.serial(&EntryId::new("a")).unwrap();
    let Held::Cert(chain, _) = held(&secrets(&second)[0]) else {
        panic!()
    };
    assert_eq!(chain, leaf(&id("a"), serial));
    // A rotation of an entry the default does not stand for is still an update of the
    // workload: pushed with the next version (as spire-agent).
    s.send(ack(&["default"], &second)).await;
    assert!(f.issuer.rotate(&EntryId::new("b")));
    let third = s.recv().await.unwrap();
    assert_eq!(third.version_info, "3");
    // A bundle change too.
    f.issuer
        .add_federated("x.org", vec![fake_ca("x.org", 1)], "x-1");
    let fourth = s.recv().await.unwrap();
    assert_eq!(fourth.version_info, "4");
}

#[tokio::test]
async fn nack_is_processed_and_stale_nonces_are_ignored() {
    let f = fixture(three_entries(), SdsConfig::default());
    let mut s = f.open(1000).await;
    let first = s.ask(req(&["default"])).await;
    // A NACK (previous version: none) that changes the names is answered.
    let mut nack = ack(&["default", "ROOTCA"], &first);
    nack.version_info = String::new();
    nack.error_detail = Some(envoy_types::pb::google::rpc::Status {
        code: 13,
        message: "could not load the certificate".into(),
        details: vec![],
    });
    let second = s.ask(nack).await;
    assert_eq!(second.version_info, "1", "no update came: same version");
    assert_ne!(second.nonce, first.nonce);
    let mut got = names(&second);
    got.sort();
    assert_eq!(got, ["ROOTCA", "default"]);
    // A request answering the first response (stale nonce) is ignored, names and all.
    s.send(ack(&[&id("b")], &first)).await;
    assert!(f.issuer.rotate(&EntryId::new("a")));
    let third = s.recv().await.unwrap();
    assert_eq!(third.version_info, "2");
    let mut got = names(&third);
    got.sort();
    assert_eq!(
        got,
        ["ROOTCA", "default"],
        "the stale request changed nothing"
    );
}

#[tokio::test]
async fn entry_changes_are_pushed_and_a_caller_without_identity_keeps_its_stream() {
    let f = fixture(vec![], SdsConfig::default());
    let mut s = f.open(1000).await;
    // No identity: the own bundle is served; `default` would be refused.
    let first = s.ask(req(&[])).await;
    assert_eq!(names(&first), [format!("spiffe://{TD}")]);
    s.send(ack(&[], &first)).await;
    // An entry registered for the caller is pushed.
    f.entries
        .apply([entry("n", &id("new"), &["unix:uid:1000"])], [])
        .unwrap();
    let second = s.recv().await.unwrap();
    assert_eq!(second.version_info, "2");
    assert_eq!(names(&second), [format!("spiffe://{TD}"), id("new")]);
    // An entry for someone else wakes the stream but changes nothing: nothing is sent, so the
    // next message is the one for the caller's removed entry.
    s.send(ack(&[], &second)).await;
    f.entries
        .apply([entry("z", &id("z"), &["unix:uid:3000"])], [])
        .unwrap();
    f.entries.apply([], [EntryId::new("n")]).unwrap();
    let third = s.recv().await.unwrap();
    assert_eq!(third.version_info, "3");
    assert_eq!(names(&third), [format!("spiffe://{TD}")]);
}

#[tokio::test]
async fn node_metadata_and_old_envoys_get_plain_trusted_ca() {
    let f = fixture(three_entries(), SdsConfig::default());
    let ca = Held::Ca(vec![fake_ca(TD, 1)]);
    for (node, want_ca) in [
        (metadata_node(value::Kind::BoolValue(true)), true),
        (metadata_node(value::Kind::StringValue("true".into())), true),
        (
            metadata_node(value::Kind::StringValue("false".into())),
            false,
        ),
        (envoy(Some((1, 17))), true),
        (envoy(Some((1, 18))), false),
        // A build version without `version` (spire-agent v1.13.3 crashes): the validator.
        (envoy(None), false),
    ] {
        let mut s = f.open(1000).await;
        let r = s.ask(with_node(req(&["ROOTCA"]), node.clone())).await;
        let h = held(&secrets(&r)[0]);
        assert_eq!(h == ca, want_ca, "{node:?}: {h:?}");
        // Later requests omit the node: what it said is kept.
        s.send(ack(&["ROOTCA"], &r)).await;
        f.issuer.rotate(&EntryId::new("a"));
        let r = s.recv().await.unwrap();
        assert_eq!(held(&secrets(&r)[0]) == ca, want_ca, "{node:?} (kept)");
        if want_ca {
            // ALL needs the SPIFFE validator.
            s.send(ack(&["ALL"], &r)).await;
            let e = s.recv().await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().contains("SPIFFE validator"), "{e:?}");
        }
    }
    // The agent-wide setting, overridden by a node.
    let f = fixture(
        three_entries(),
        SdsConfig {
            disable_spiffe_cert_validation: true,
            ..SdsConfig::default()
        },
    );
    let mut s = f.open(1000).await;
    let r = s.ask(req(&["ROOTCA"])).await;
    assert_eq!(held(&secrets(&r)[0]), ca);
    let mut s = f.open(1000).await;
    let r = s
        .ask(with_node(
            req(&["ROOTCA"]),
            metadata_node(value::Kind::BoolValue(false)),
        ))
        .await;
    assert!(matches!(held(&secrets(&r)[0]), Held::Spiffe(_)));
}

#[tokio::test]
async fn configured_names_replace_the_defaults() {
    let f = fixture(
        three_entries(),
        SdsConfig {
            default_svid_name: "svid".into(),
            default_bundle_name: "ca".into(),
            default_all_bundles_name: "every".into(),
            disable_spiffe_cert_validation: false,
        },
    );
    let mut s = f.open(1000).await;
    let r = s.ask(req(&["svid", "ca", "every"])).await;
    let mut got = names(&r);
    got.sort();
    assert_eq!(got, ["ca", "every", "svid"]);
    s.send(ack(&["default"], &r)).await;
    let e = s.recv().await.unwrap_err();
    assert!(e.message().ends_with("[\"default\"]"), "{e:?}");
}

#[tokio::test]
async fn fetch_secrets_has_no_version_and_no_nonce() {
    let f = fixture(three_entries(), SdsConfig::default());
    let mut c = f.client().await;
    let mut r = tonic::Request::new(req(&["default", "ROOTCA"]));
    r.metadata_mut()
        .insert(PEER_UID_HEADER, "1000".parse().unwrap());
    let resp = c.fetch_secrets(r).await.unwrap().into_inner();
    assert_eq!(resp.version_info, "");
    assert_eq!(resp.nonce, "");
    assert_eq!(names(&resp), ["ROOTCA", "default"]);
    let mut r = tonic::Request::new(req(&[&id("c")]));
    r.metadata_mut()
        .insert(PEER_UID_HEADER, "1000".parse().unwrap());
    let e = c.fetch_secrets(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Without peer credentials (not accepted through the agent's listener): refused.
    let e = c.fetch_secrets(req(&[])).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    // Delta xDS is not served.
    let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let e = c.delta_secrets(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
}

#[tokio::test]
async fn open_streams_are_counted_and_hold_their_svids() {
    let f = fixture(three_entries(), SdsConfig::default());
    let count = f.sds.streams();
    assert_eq!(count.open(), 0);
    let mut a = f.open(1000).await;
    let _ = a.ask(req(&["default"])).await;
    let mut b = f.open(1000).await;
    let _ = b.ask(req(&["default"])).await;
    assert_eq!(count.open(), 2);
    assert_eq!(f.issuer.holders(&EntryId::new("a")), 2);
    drop(a);
    // The server notices the client went away when the stream is reset.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count.open() != 1 {
        assert!(std::time::Instant::now() < deadline, "stream never closed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(f.issuer.holders(&EntryId::new("a")), 1);
    drop(b);
}

/// Answers are built once per snapshot, names and validation form and shared by the streams
/// that send them: streams of one workload get the same secrets (each with its own version and
/// nonce), another workload never gets them, and a rotation reaches every holder.
#[tokio::test]
async fn streams_share_answers_only_with_the_same_workload_and_form() {
    let f = fixture(three_entries(), SdsConfig::default());
    let names = ["default", "ROOTCA"];
    let mut one = f.open(1000).await;
    let mut two = f.open(1000).await;
    let mut other = f.open(2000).await;
    let mut plain = f.open(1000).await;
    let r1 = one.ask(req(&names)).await;
    let r2 = two.ask(req(&names)).await;
    let ro = other.ask(req(&names)).await;
    let rp = plain
        .ask(with_node(
            req(&names),
            metadata_node(value::Kind::BoolValue(true)),
        ))
        .await;
    assert_eq!(r1.resources, r2.resources, "one workload, one answer");
    assert_ne!(r1.nonce, r2.nonce);
    let cert = |r: &DiscoveryResponse| {
        secrets(r)
            .iter()
            .map(held)
            .find_map(|h| match h {
                Held::Cert(chain, _) => Some(chain),
                _ => None,
            })
            .unwrap()
    };
    let serial = |e: &str| f.issuer.serial(&EntryId::new(e)).unwrap();
    assert_eq!(cert(&r1), leaf(&id("a"), serial("a")));
    assert_eq!(
        cert(&ro),
        leaf(&id("c"), serial("c")),
        "uid 2000 holds c only"
    );
    let roots = |r: &DiscoveryResponse| held(&secrets(r)[0]);
    assert!(matches!(roots(&r1), Held::Spiffe(_)));
    assert!(
        matches!(roots(&rp), Held::Ca(_)),
        "the node's form is its own, not the shared answer of the others"
    );
    assert_eq!(cert(&rp), cert(&r1));

    for (s, r) in [(&one, &r1), (&two, &r2), (&other, &ro), (&plain, &rp)] {
        s.send(ack(&names, r)).await;
    }
    assert!(f.issuer.rotate(&EntryId::new("a")));
    let (n1, n2, np) = (
        one.recv().await.unwrap(),
        two.recv().await.unwrap(),
        plain.recv().await.unwrap(),
    );
    for r in [&n1, &n2, &np] {
        assert_eq!(r.version_info, "2");
        assert_eq!(cert(r), leaf(&id("a"), serial("a")));
    }
    assert_eq!(n1.resources, n2.resources);
    // uid 2000's stream saw no update: its next message is the one a rotation of c causes.
    assert!(f.issuer.rotate(&EntryId::new("c")));
    let no = other.recv().await.unwrap();
    assert_eq!(no.version_info, "2");
    assert_eq!(cert(&no), leaf(&id("c"), serial("c")));
}

/// `req` with node metadata padded so that the encoded request is exactly `size` bytes.
fn padded_to(mut r: DiscoveryRequest, size: usize) -> DiscoveryRequest {
    let mut pad = 0;
    loop {
        r.node = Some(metadata_node(value::Kind::StringValue("p".repeat(pad))));
        let len = r.encoded_len();
        if len == size {
            return r;
        }
        // The length prefixes grow by a byte now and then: approach from below.
        pad = if len < size {
            pad + (size - len).div_ceil(2)
        } else {
            pad - 1
        };
    }
}

/// A request at each limit is served; one byte past it ends the stream with a status that
/// names the limit, and other streams carry on.
#[tokio::test]
async fn requests_one_past_the_size_limits_are_refused() {
    use spiffed_workload_api::sds::{MAX_SDS_REQUEST_BYTES, MAX_TYPE_URL_BYTES};
    let f = fixture(three_entries(), SdsConfig::default());
    let mut bystander = f.open(1000).await;
    let first = bystander.ask(req(&["default"])).await;

    let mut s = f.open(1000).await;
    let r = s
        .ask(padded_to(req(&["default"]), MAX_SDS_REQUEST_BYTES))
        .await;
    assert_eq!(r.version_info, "1");
    let mut s = f.open(1000).await;
    s.send(padded_to(req(&["default"]), MAX_SDS_REQUEST_BYTES + 1))
        .await;
    let e = s.recv().await.unwrap_err();
    assert!(
        e.message().contains(&MAX_SDS_REQUEST_BYTES.to_string()),
        "{e:?}"
    );

    let url = |n: usize| {
        let mut u = SECRET_TYPE_URL.to_owned();
        u.push_str(&"x".repeat(n - u.len()));
        u
    };
    let mut s = f.open(1000).await;
    let r = s
        .ask(DiscoveryRequest {
            type_url: url(MAX_TYPE_URL_BYTES),
            ..req(&["default"])
        })
        .await;
    assert_eq!(r.type_url.len(), MAX_TYPE_URL_BYTES);
    let mut s = f.open(1000).await;
    s.send(DiscoveryRequest {
        type_url: url(MAX_TYPE_URL_BYTES + 1),
        ..req(&["default"])
    })
    .await;
    let e = s.recv().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains(&format!("at most {MAX_TYPE_URL_BYTES} are accepted")),
        "{e:?}"
    );

    // The first stream was not disturbed.
    bystander.send(ack(&["default"], &first)).await;
    assert!(f.issuer.rotate(&EntryId::new("a")));
    assert_eq!(bystander.recv().await.unwrap().version_info, "2");
}
