//! Envoy SDS v3 on the Workload API socket, with the `envoy-types` client: every resource name,
//! version and nonce over ACK, NACK, stale nonces, rotations and entry changes, the plain-CA
//! form, malformed nodes, and the per-uid stream limit. No security header is sent (Envoy sends
//! none).

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::core::v3::{BuildVersion, DataSource, Node, node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use prost::Message as _;
use spiffed_test_support::Agent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::{Mode, SHORT_TTLS, TestEntry, agent_for_me, bin, node_with, verify_chain};

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const WEB: &str = "spiffe://example.org/web";

async fn client(agent: &Agent) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(spiffed_test_support::channel(&agent.socket).await)
}

/// One open `StreamSecrets`.
pub(crate) struct Sds {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sds {
    pub(crate) async fn open(agent: &Agent) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let rx = client(agent)
            .await
            .stream_secrets(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { tx, rx })
    }

    async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn recv(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(60), self.rx.message()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => panic!("the stream ended"),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("nothing came within 60s"),
        }
    }

    pub(crate) async fn ask(&mut self, req: DiscoveryRequest) -> DiscoveryResponse {
        self.send(req).await;
        self.recv().await.unwrap()
    }
}

pub(crate) fn req(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: SECRET.to_owned(),
        node: Some(Node {
            id: "envoy-test".into(),
            cluster: "test".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ack(names: &[&str], resp: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        node: None,
        ..req(names)
    }
}

fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn names(resp: &DiscoveryResponse) -> Vec<String> {
    let mut n: Vec<String> = secrets(resp).into_iter().map(|s| s.name).collect();
    n.sort();
    n
}

fn find(resp: &DiscoveryResponse, name: &str) -> Secret {
    secrets(resp)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no secret {name} in {:?}", names(resp)))
}

fn inline(d: &Option<DataSource>) -> &[u8] {
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b,
        other => panic!("not inline bytes: {other:?}"),
    }
}

/// The DER of each `label` PEM block of `text` (which holds nothing else).
fn pem(text: &[u8], label: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let text = std::str::from_utf8(text).unwrap();
    let (begin, end) = (
        format!("-----BEGIN {label}-----"),
        format!("-----END {label}-----"),
    );
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
    assert_eq!(text.matches("-----BEGIN").count(), out.len(), "{text}");
    out
}

/// A `tls_certificate`: the chain (DER, one per PEM block) and the PKCS#8 key, checked to
/// belong together.
fn certificate(s: &Secret) -> (Vec<Vec<u8>>, Vec<u8>) {
    let Some(secret::Type::TlsCertificate(t)) = &s.r#type else {
        panic!("{} is not a tls_certificate", s.name)
    };
    let chain = pem(inline(&t.certificate_chain), "CERTIFICATE");
    let key = pem(inline(&t.private_key), "PRIVATE KEY");
    assert_eq!(key.len(), 1);
    assert!(!chain.is_empty());
    // Parses the chain and checks that the key is the leaf's.
    spiffe::X509Svid::parse_from_der(&chain.concat(), &key[0]).unwrap();
    (chain, key.into_iter().next().unwrap())
}

/// A SPIFFE validator `validation_context`: (trust domain, CAs) per entry.
fn spiffe_validator(s: &Secret) -> Vec<(String, Vec<Vec<u8>>)> {
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{} is not a validation_context", s.name)
    };
    let c = v
        .custom_validator_config
        .as_ref()
        .unwrap_or_else(|| panic!("{} has no SPIFFE validator: {v:?}", s.name));
    assert_eq!(c.name, "envoy.tls.cert_validator.spiffe");
    let cfg = SpiffeCertValidatorConfig::decode(c.typed_config.as_ref().unwrap().value.as_slice())
        .unwrap();
    cfg.trust_domains
        .iter()
        .map(|t| (t.name.clone(), pem(inline(&t.trust_bundle), "CERTIFICATE")))
        .collect()
}

/// A plain `trusted_ca` validation context, or `None` for the SPIFFE validator.
fn trusted_ca(s: &Secret) -> Option<Vec<Vec<u8>>> {
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{} is not a validation_context", s.name)
    };
    v.trusted_ca
        .as_ref()
        .map(|_| pem(inline(&v.trusted_ca), "CERTIFICATE"))
}

fn serial(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der)
        .unwrap()
        .1
        .raw_serial_as_string()
}

/// In both modes (standalone, and agent mode on a real spire-server): every name, with real
/// certificates and keys.
#[tokio::test]
async fn every_resource_name_answers_real_certificates_and_bundles() {
    for mode in Mode::ALL {
        every_resource_name_in(mode).await;
    }
}

async fn every_resource_name_in(mode: Mode) {
    let uid = spiffed_test_support::my_uid();
    let me = [format!("unix:uid:{uid}")];
    let node = node_with(
        mode,
        &[
            TestEntry::new(WEB, &me),
            TestEntry::new("spiffe://example.org/db", &me),
            TestEntry::new(
                "spiffe://example.org/other",
                &[format!("unix:uid:{}", uid + 4242)],
            ),
        ],
    );
    let agent = &node.agent;
    let mut s = Sds::open(agent).await.unwrap();
    let all = s.ask(req(&[])).await;
    assert_eq!(all.version_info, "1", "{mode:?}");
    assert_eq!(all.nonce.len(), 8);
    assert_eq!(all.type_url, SECRET);
    assert_eq!(
        names(&all),
        [
            "spiffe://example.org",
            "spiffe://example.org/db",
            "spiffe://example.org/web"
        ],
        "{mode:?}"
    );
    let td = spiffe_validator(&find(&all, "spiffe://example.org"));
    assert_eq!(td.len(), 1);
    assert_eq!(td[0].0, "example.org");
    let roots = td[0].1.concat();
    for id in [WEB, "spiffe://example.org/db"] {
        let (chain, _) = certificate(&find(&all, id));
        verify_chain(&chain.concat(), &roots);
    }

    let named = s
        .ask(ack(
            &["default", "ROOTCA", "ALL", WEB, "spiffe://example.org"],
            &all,
        ))
        .await;
    assert_eq!(named.version_info, "1", "new names, no update");
    assert_ne!(named.nonce, all.nonce);
    assert_eq!(
        names(&named),
        [
            "ALL",
            "ROOTCA",
            "default",
            "spiffe://example.org",
            "spiffe://example.org/web"
        ]
    );
    assert_eq!(spiffe_validator(&find(&named, "ROOTCA")), td);
    assert_eq!(spiffe_validator(&find(&named, "ALL")), td, "no federation");
    // `default` is the identity of the lowest entry ID: one of the two, and the same one a
    // SPIFFE-ID request for it gets.
    let (default_chain, _) = certificate(&find(&named, "default"));
    let default_id = spiffe::X509Svid::parse_from_der(
        &default_chain.concat(),
        &certificate(&find(&named, "default")).1,
    )
    .unwrap()
    .spiffe_id()
    .to_string();
    let (same, _) = certificate(&find(&all, &default_id));
    assert_eq!(same, default_chain);

    // FetchSecrets: the same resources once, without version or nonce.
    let fetched = client(agent)
        .await
        .fetch_secrets(req(&["default", "ROOTCA"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (fetched.version_info.as_str(), fetched.nonce.as_str()),
        ("", "")
    );
    assert_eq!(names(&fetched), ["ROOTCA", "default"]);
    assert_eq!(certificate(&find(&fetched, "default")).0, default_chain);

    // Another workload's identity is refused, and the stream ends.
    s.send(ack(&["spiffe://example.org/other"], &named)).await;
    let e = s.recv().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "workload is not authorized for the requested identities [\"spiffe://example.org/other\"]"
    );
    assert!(s.rx.message().await.unwrap().is_none());
}

/// Standalone with the default (1h) lifetimes, so that nothing rotates during the test: every
/// message below is caused by the test.
#[tokio::test]
async fn ack_nack_stale_nonce_and_an_entry_change() {
    let agent = agent_for_me("");
    let mut s = Sds::open(&agent).await.unwrap();
    let first = s.ask(req(&["default"])).await;
    assert_eq!(
        (first.version_info.as_str(), names(&first)),
        ("1", vec!["default".into()])
    );
    // ACK: nothing is sent (checked below: the next message is version 2, not a resend of 1).
    s.send(ack(&["default"], &first)).await;
    // NACK (empty version, error detail) that adds a name: processed and answered.
    let mut nack = ack(&["default", "ROOTCA"], &first);
    nack.version_info = String::new();
    nack.error_detail = Some(envoy_types::pb::google::rpc::Status {
        code: 13,
        message: "Failed to load certificate chain".into(),
        details: vec![],
    });
    let second = s.ask(nack).await;
    assert_eq!(second.version_info, "1");
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(names(&second), ["ROOTCA", "default"]);
    // A stale nonce: ignored, with its names.
    s.send(ack(&["ROOTCA"], &first)).await;
    // An entry change: a second identity for this uid, pushed as version 2.
    let out = std::process::Command::new(bin())
        .args([
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/extra",
        ])
        .arg("--selector")
        .arg(format!("unix:uid:{}", spiffed_test_support::my_uid()))
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let third = s.recv().await.unwrap();
    assert_eq!(third.version_info, "2");
    assert_ne!(third.nonce, second.nonce);
    assert_eq!(
        names(&third),
        ["ROOTCA", "default"],
        "the stale request changed nothing"
    );
    // Everything now holds the new identity.
    let fourth = s.ask(ack(&[], &third)).await;
    assert_eq!(fourth.version_info, "2");
    assert!(names(&fourth).contains(&"spiffe://example.org/extra".to_owned()));
    assert!(
        agent
            .logs()
            .contains("Envoy reported errors applying SDS secrets")
    );
    assert!(!agent.logs().contains("PRIVATE KEY"));
}

/// SVIDs of 2s: each rotation is pushed with the next version, a fresh nonce and a new leaf.
#[tokio::test]
async fn rotations_push_the_next_version_with_a_new_nonce() {
    let agent = agent_for_me(SHORT_TTLS);
    let mut s = Sds::open(&agent)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.logs()));
    let mut last = s.ask(req(&["default", "ROOTCA"])).await;
    let mut leaf = serial(&certificate(&find(&last, "default")).0[0]);
    let mut rotated = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rotated < 2 {
        assert!(Instant::now() < deadline, "no rotation reached the stream");
        s.send(ack(&["default", "ROOTCA"], &last)).await;
        let next = s.recv().await.unwrap();
        let v: u64 = next.version_info.parse().unwrap();
        assert_eq!(v, last.version_info.parse::<u64>().unwrap() + 1);
        assert_ne!(next.nonce, last.nonce);
        let (chain, _) = certificate(&find(&next, "default"));
        let roots: Vec<u8> = spiffe_validator(&find(&next, "ROOTCA"))[0].1.concat();
        verify_chain(&chain.concat(), &roots);
        let now = serial(&chain[0]);
        if now != leaf {
            rotated += 1;
            leaf = now;
        }
        last = next;
    }
}

fn build_version(version: Option<(u32, u32)>) -> Node {
    Node {
        user_agent_name: "envoy".into(),
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

/// Node metadata and old Envoys get plain `trusted_ca`; a build version without `version`
/// (which kills spire-agent v1.13.3) gets the SPIFFE validator and the agent keeps serving.
#[tokio::test]
async fn plain_ca_by_node_and_a_node_without_version() {
    let agent = agent_for_me("");
    let with_node = |names: &[&str], node: Node| DiscoveryRequest {
        node: Some(node),
        ..req(names)
    };
    let meta = Node {
        metadata: Some(Struct {
            fields: [(
                "disable_spiffe_cert_validation".to_owned(),
                Value {
                    kind: Some(value::Kind::StringValue("true".into())),
                },
            )]
            .into(),
        }),
        ..Default::default()
    };
    for (node, plain) in [
        (meta, true),
        (build_version(Some((1, 17))), true),
        (build_version(None), false),
        (build_version(Some((1, 30))), false),
    ] {
        let mut s = Sds::open(&agent).await.unwrap();
        let r = s.ask(with_node(&["ROOTCA"], node.clone())).await;
        let rootca = find(&r, "ROOTCA");
        match trusted_ca(&rootca) {
            Some(cas) => {
                assert!(plain, "{node:?}");
                assert_eq!(cas.len(), 1);
                // ALL needs the SPIFFE validator.
                s.send(ack(&["ALL"], &r)).await;
                let e = s.recv().await.unwrap_err();
                assert_eq!(e.code(), Code::InvalidArgument);
            }
            None => {
                assert!(!plain, "{node:?}");
                assert_eq!(spiffe_validator(&rootca).len(), 1);
            }
        }
        // FetchSecrets reads the node the same way.
        let f = client(&agent)
            .await
            .fetch_secrets(with_node(&["ROOTCA"], node.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(trusted_ca(&find(&f, "ROOTCA")).is_some(), plain);
    }
    // Still serving the Workload API.
    let mut c = agent.client().await;
    let mut x = spiffed_test_support::x509_stream(&mut c).await;
    assert!(x.message().await.unwrap().is_some());
}

/// SDS streams count under the per-uid stream limit, with the Workload API's.
#[tokio::test]
async fn sds_streams_count_under_the_per_uid_stream_limit() {
    let agent = agent_for_me("max_streams_per_uid = 2");
    let mut a = Sds::open(&agent).await.unwrap();
    let _ = a.ask(req(&["default"])).await;
    let mut b = Sds::open(&agent).await.unwrap();
    let _ = b.ask(req(&["default"])).await;
    let refused = match Sds::open(&agent).await {
        Err(e) => e,
        Ok(mut c) => {
            c.send(req(&["default"])).await;
            c.recv().await.unwrap_err()
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_streams_per_uid"));
    // Closing one makes room again.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Sds::open(&agent).await {
            Ok(mut c) => {
                c.send(req(&["default"])).await;
                match c.recv().await {
                    Ok(r) => {
                        assert_eq!(names(&r), ["default"]);
                        break;
                    }
                    Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
                }
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        assert!(
            Instant::now() < deadline,
            "the closed stream was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `[sds] disable_sds_api = true`: the service is not there.
#[tokio::test]
async fn disable_sds_api_turns_sds_off() {
    let agent = agent_for_me("[sds]\ndisable_sds_api = true");
    let e = client(&agent)
        .await
        .fetch_secrets(req(&[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
}
