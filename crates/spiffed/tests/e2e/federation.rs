//! Federated bundles in standalone mode: `spiffed bundle set|list|delete|show` over the admin
//! socket, and what workloads then receive on every Workload API path (FetchX509SVID's
//! `federated_bundles`, FetchX509Bundles, FetchJWTBundles, ValidateJWTSVID), through
//! `federates_with` or `[federation] federate_all`.
//!
//! The foreign trust domain is made here with real crypto: a self-signed CA and an EC P-256
//! JWT signing key whose private half only the test holds.

use std::process::Command;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};
use spiffed_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, ValidateJwtsvidRequest, X509BundlesRequest,
    X509BundlesResponse, X509svidResponse,
};
use spiffed_test_support::{Agent, my_uid, with_header, x509_stream};
use tonic::{Code, Streaming};

use crate::bin;

const FOREIGN: &str = "spiffe://other.org";
const AUDIENCE: &str = "spiffed-test";

/// A foreign trust domain whose keys the test holds.
pub(crate) struct Foreign {
    /// Its CA certificate, DER.
    pub(crate) ca_der: Vec<u8>,
    /// Its JWT signing key and key id.
    jwt: EcdsaKeyPair,
    kid: String,
    /// Its SPIFFE bundle (JWKS).
    pub(crate) doc: String,
}

pub(crate) fn foreign(td: &str) -> Foreign {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{td}").try_into().unwrap(),
    )];
    let ca_der = params.self_signed(&key).unwrap().der().to_vec();
    let ca_point = key.public_key_raw().to_vec();
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let jwt =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = jwt.public_key().as_ref().to_vec();
    let kid = format!("{td}-key-1");
    let doc = json!({
        "keys": [
            {
                "use": "x509-svid", "kty": "EC", "crv": "P-256",
                "x": B64URL.encode(&ca_point[1..33]), "y": B64URL.encode(&ca_point[33..]),
                "x5c": [B64.encode(&ca_der)],
            },
            {
                "use": "jwt-svid", "kty": "EC", "crv": "P-256", "kid": kid,
                "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..]),
            },
        ],
        "spiffe_sequence": 3,
        "spiffe_refresh_hint": 60,
    })
    .to_string();
    Foreign {
        ca_der,
        jwt,
        kid,
        doc,
    }
}

impl Foreign {
    /// A JWT-SVID of `sub` signed by this trust domain's key, with header `kid`.
    fn token(&self, sub: &str, kid: &str) -> String {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        let claims = json!({"sub": sub, "aud": [AUDIENCE], "exp": now + 300, "iat": now});
        let msg = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let sig = self.jwt.sign(&SystemRandom::new(), msg.as_bytes()).unwrap();
        format!("{msg}.{}", B64URL.encode(sig.as_ref()))
    }
}

/// `spiffed ARGS --admin-socket ...`; returns (exit code, stdout, stderr).
fn cli(agent: &Agent, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `doc` to a file in the agent's directory and runs `bundle set` on it.
fn set(agent: &Agent, td: &str, format: &str, doc: &[u8]) -> (i32, String, String) {
    let file = agent.dir.path().join(format!("{td}.{format}"));
    std::fs::write(&file, doc).unwrap();
    cli(
        agent,
        &[
            "bundle",
            "set",
            "--trust-domain",
            td,
            "--format",
            format,
            file.to_str().unwrap(),
        ],
    )
}

pub(crate) fn set_ok(agent: &Agent, td: &str, doc: &str) {
    let (code, out, err) = set(agent, td, "spiffe", doc.as_bytes());
    assert_eq!(code, 0, "bundle set failed: {err}\n{out}\n{}", agent.logs());
    assert!(out.contains("1 X.509 authority, 1 JWT key"), "{out}");
}

fn list(agent: &Agent) -> Value {
    let (code, out, err) = cli(agent, &["bundle", "list", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

async fn next<T>(stream: &mut Streaming<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(3), stream.message())
        .await
        .unwrap_or_else(|_| panic!("no new {what} message"))
        .unwrap()
        .unwrap()
}

/// The three streams a workload watches bundles on.
struct Streams {
    svid: Streaming<X509svidResponse>,
    x509: Streaming<X509BundlesResponse>,
    jwt: Streaming<JwtBundlesResponse>,
}

impl Streams {
    async fn open(agent: &Agent) -> Self {
        let mut c = agent.client().await;
        let svid = x509_stream(&mut c).await;
        let x509 = c
            .fetch_x509_bundles(with_header(X509BundlesRequest {}))
            .await
            .unwrap()
            .into_inner();
        let jwt = c
            .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await
            .unwrap()
            .into_inner();
        Self { svid, x509, jwt }
    }

    /// The next message of each stream: the X.509 federated bundles of FetchX509SVID, and
    /// the bundles of FetchX509Bundles and FetchJWTBundles.
    async fn next(&mut self) -> (X509svidResponse, X509BundlesResponse, JwtBundlesResponse) {
        (
            next(&mut self.svid, "FetchX509SVID").await,
            next(&mut self.x509, "FetchX509Bundles").await,
            next(&mut self.jwt, "FetchJWTBundles").await,
        )
    }
}

/// Asserts that the messages carry the foreign bundle `f` (or lack it).
fn assert_foreign(
    (svid, x509, jwt): &(X509svidResponse, X509BundlesResponse, JwtBundlesResponse),
    f: Option<&Foreign>,
) {
    assert!(x509.bundles.contains_key("spiffe://example.org"));
    assert!(jwt.bundles.contains_key("spiffe://example.org"));
    match f {
        Some(f) => {
            assert_eq!(svid.federated_bundles.get(FOREIGN), Some(&f.ca_der));
            assert_eq!(x509.bundles.get(FOREIGN), Some(&f.ca_der));
            let jwks: Value = serde_json::from_slice(&jwt.bundles[FOREIGN]).unwrap();
            assert_eq!(jwks["keys"][0]["kid"], f.kid.as_str(), "{jwks}");
        }
        None => {
            assert!(
                svid.federated_bundles.is_empty(),
                "{:?}",
                svid.federated_bundles.keys()
            );
            assert!(!x509.bundles.contains_key(FOREIGN));
            assert!(!jwt.bundles.contains_key(FOREIGN));
        }
    }
}

async fn validate(agent: &Agent, token: &str) -> Result<String, tonic::Status> {
    agent
        .client()
        .await
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: AUDIENCE.into(),
            svid: token.into(),
        }))
        .await
        .map(|r| r.into_inner().spiffe_id)
}

/// The trust domains `spiffed api fetch bundles --output json` (the Rust `spiffe` crate's
/// client) shows, run as `uid` (through setpriv when it is not ours).
fn fetched_trust_domains(agent: &Agent, uid: u32) -> Vec<String> {
    let mut c = if uid == my_uid() {
        Command::new(bin())
    } else {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ])
        .arg(bin());
        c
    };
    let out = c
        .args(["api", "fetch", "bundles", "--output", "json", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut tds: Vec<String> = v["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["trust_domain"].as_str().unwrap().to_owned())
        .collect();
    tds.sort();
    tds.dedup();
    tds
}

#[tokio::test]
async fn a_federated_bundle_reaches_the_workloads_that_federate_with_it_at_once() {
    assert_eq!(
        my_uid(),
        0,
        "this test switches uid with setpriv and must run as root"
    );
    // uid 65534 has an identity from the config file, without federates_with; ours comes from
    // the store, created with --federates-with.
    let agent = Agent::start(
        &bin(),
        "[[entries]]\nspiffe_id = \"spiffe://example.org/nobody\"\nselectors = [\"unix:uid:65534\"]\n",
    );
    let me = format!("unix:uid:{}", my_uid());
    let (code, out, err) = cli(
        &agent,
        &[
            "entry",
            "create",
            "--output",
            "json",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--selector",
            &me,
            "--federates-with",
            "other.org",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["federates_with"], json!(["other.org"]));

    let f = foreign("other.org");
    let mut streams = Streams::open(&agent).await;
    assert_foreign(&streams.next().await, None);
    // Before the bundle is set, a token of other.org has no bundle to verify against.
    let token = f.token("spiffe://other.org/svc", &f.kid);
    assert_eq!(
        validate(&agent, &token).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    set_ok(&agent, "other.org", &f.doc);
    // Every open stream gets it at once.
    assert_foreign(&streams.next().await, Some(&f));
    // The `spiffe` crate's client sees it too; the workload without federates_with does not.
    assert_eq!(
        fetched_trust_domains(&agent, my_uid()),
        ["example.org", "other.org"]
    );
    assert_eq!(fetched_trust_domains(&agent, 65534), ["example.org"]);

    // A token signed by the federated key validates; an unknown kid, or the right kid with a
    // signature of another key, does not.
    assert_eq!(
        validate(&agent, &token).await.unwrap(),
        "spiffe://other.org/svc"
    );
    let unknown = f.token("spiffe://other.org/svc", "no-such-kid");
    let e = validate(&agent, &unknown).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("no-such-kid"), "{}", e.message());
    let impostor = foreign("other.org").token("spiffe://other.org/svc", &f.kid);
    assert_eq!(
        validate(&agent, &impostor).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let listed = list(&agent);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let b = &listed[0];
    assert_eq!(b["trust_domain"], "other.org");
    assert_eq!(b["x509_authorities"], 1);
    assert_eq!(b["jwt_authorities"], 1);
    assert_eq!(b["sequence"], 3);
    assert_eq!(b["refresh_hint_seconds"], 60);
    assert!(
        b["source"].as_str().unwrap().ends_with("other.org.spiffe"),
        "{b}"
    );
    let (code, text, _) = cli(&agent, &["bundle", "list"]);
    assert_eq!(code, 0);
    assert!(text.contains("other.org") && text.contains("1m"), "{text}");

    // Deleted: gone from every open stream at once, and tokens of other.org fail again.
    let (code, out, err) = cli(&agent, &["bundle", "delete", "--trust-domain", "other.org"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Deleted the federated bundle of other.org"),
        "{out}"
    );
    assert_foreign(&streams.next().await, None);
    assert_eq!(
        validate(&agent, &token).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(list(&agent), json!([]));
    let (code, _, err) = cli(&agent, &["bundle", "delete", "--trust-domain", "other.org"]);
    assert_eq!(code, 1);
    assert!(err.contains("no federated bundle for other.org"), "{err}");
}

#[tokio::test]
async fn federate_all_gives_every_workload_every_federated_bundle() {
    // The entry names no federated trust domain.
    let agent = crate::agent_for_me("[federation]\nfederate_all = true\n");
    let f = foreign("other.org");
    let mut streams = Streams::open(&agent).await;
    assert_foreign(&streams.next().await, None);
    set_ok(&agent, "other.org", &f.doc);
    assert_foreign(&streams.next().await, Some(&f));
    let token = f.token("spiffe://other.org/svc", &f.kid);
    assert_eq!(
        validate(&agent, &token).await.unwrap(),
        "spiffe://other.org/svc"
    );
}

#[tokio::test]
async fn a_stored_bundle_survives_a_restart() {
    // federates_with from the config file.
    let uid = my_uid();
    let mut agent = Agent::start(
        &bin(),
        &format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/web\"\nselectors = [\"unix:uid:{uid}\"]\nfederates_with = [\"other.org\"]\n"
        ),
    );
    let f = foreign("other.org");
    set_ok(&agent, "other.org", &f.doc);
    let before = list(&agent);
    assert!(agent.stop().success());
    agent.spawn();
    assert_eq!(list(&agent), before);
    let mut streams = Streams::open(&agent).await;
    assert_foreign(&streams.next().await, Some(&f));
    let token = f.token("spiffe://other.org/svc", &f.kid);
    assert_eq!(
        validate(&agent, &token).await.unwrap(),
        "spiffe://other.org/svc"
    );
}

#[tokio::test]
async fn bad_bundles_are_refused_with_a_clear_error_and_change_nothing() {
    let agent = crate::agent_for_me("");
    let f = foreign("other.org");
    set_ok(&agent, "other.org", &f.doc);
    let before = list(&agent);
    let third = foreign("third.org");
    let own = foreign("example.org");
    let big = format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(2 * 1024 * 1024));
    let pem_key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    let cases: [(&str, &str, &[u8], &str); 7] = [
        ("other.org", "spiffe", b"garbage", "is not a SPIFFE bundle"),
        (
            "other.org",
            "spiffe",
            br#"{"keys":[{"use":"jwt-svid","kty":"EC"}]}"#,
            "non-empty \"kid\"",
        ),
        // The file is third.org's (its CA says so), the flag says other.org.
        (
            "other.org",
            "spiffe",
            third.doc.as_bytes(),
            "belongs to trust domain third.org",
        ),
        (
            "example.org",
            "spiffe",
            own.doc.as_bytes(),
            "own trust domain",
        ),
        (
            "other.org",
            "spiffe",
            big.as_bytes(),
            "the most a bundle may have",
        ),
        (
            "other.org",
            "pem",
            pem_key.as_bytes(),
            "CERTIFICATE blocks only",
        ),
        (
            "Not A TD",
            "spiffe",
            f.doc.as_bytes(),
            "not a valid trust domain",
        ),
    ];
    for (td, format, doc, says) in cases {
        let (code, out, err) = set(&agent, td, format, doc);
        assert_ne!(code, 0, "{td} {says}: accepted: {out}");
        assert!(err.contains(says), "{td} {says}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(list(&agent), before);
    // The agent still serves, with the good bundle.
    assert!(agent.logs().contains("federated bundle refused"));
    let (code, _, err) = cli(
        &agent,
        &["bundle", "set", "--trust-domain", "x.org", "/no/such/file"],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("cannot read /no/such/file"), "{err}");
}

#[tokio::test]
async fn bundle_show_prints_the_own_bundle_as_pem_and_spiffe() {
    let agent = crate::agent_for_me("");
    let mut c = agent.client().await;
    let own = c
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap()
        .bundles["spiffe://example.org"]
        .clone();
    let (code, pem, err) = cli(&agent, &["bundle", "show"]);
    assert_eq!(code, 0, "{err}");
    let td = spiffed_core::TrustDomain::new("example.org").unwrap();
    let from_pem =
        spiffed_core::spiffe_bundle::SpiffeBundle::parse_pem(&td, pem.as_bytes()).unwrap();
    assert_eq!(from_pem.x509_authorities.concat(), own);

    let (code, doc, err) = cli(&agent, &["bundle", "show", "--format", "spiffe"]);
    assert_eq!(code, 0, "{err}");
    let parsed = spiffed_core::spiffe_bundle::SpiffeBundle::parse(&td, doc.as_bytes()).unwrap();
    assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
    assert_eq!(parsed.bundle.x509_authorities.concat(), own);
    assert_eq!(parsed.bundle.jwt_authorities.len(), 1);
    assert!(parsed.bundle.sequence.is_some());
    // What `show` prints, another agent accepts as a federated bundle of example.org.
    let peer = Agent::start_raw(&bin(), |dir| {
        spiffed_test_support::config_text(dir, "").replace("example.org", "peer.org")
    });
    let file = peer.dir.path().join("example.json");
    std::fs::write(&file, &doc).unwrap();
    let (code, out, err) = cli(
        &peer,
        &[
            "bundle",
            "set",
            "--trust-domain",
            "example.org",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}\n{}", peer.logs());
    assert!(out.contains("1 X.509 authority, 1 JWT key"), "{out}");
    let (code, json, _) = cli(&agent, &["bundle", "show", "--output", "json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["trust_domain"], "example.org");
    assert_eq!(v["format"], "pem");
    assert!(
        v["bundle"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
}

#[tokio::test]
async fn a_pem_bundle_is_read_from_stdin() {
    use std::io::Write as _;
    let agent = crate::agent_for_me("[federation]\nfederate_all = true\n");
    let f = foreign("pem.org");
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        B64.encode(&f.ca_der)
    );
    let mut child = Command::new(bin())
        .args([
            "bundle",
            "set",
            "--trust-domain",
            "pem.org",
            "--format",
            "pem",
            "-",
        ])
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = list(&agent);
    assert_eq!(listed[0]["trust_domain"], "pem.org");
    assert_eq!(listed[0]["source"], "stdin");
    assert_eq!(listed[0]["x509_authorities"], 1);
    assert_eq!(listed[0]["jwt_authorities"], 0);
    let mut c = agent.client().await;
    let m = c
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.bundles.get("spiffe://pem.org"), Some(&f.ca_der));
    // A trust domain with X.509 authorities only has no JWT bundle to send.
    let jwt = c
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let keys: Value = serde_json::from_slice(
        jwt.bundles
            .get("spiffe://pem.org")
            .map_or(&b"{\"keys\":[]}"[..], Vec::as_slice),
    )
    .unwrap();
    assert_eq!(keys["keys"], json!([]));
}
