//! Two spiffed agents of two trust domains federate both ways through their bundle endpoints:
//! `a.test` serves its bundle with https_spiffe (an SVID its CA mints), `b.test` with https_web
//! (a Web PKI certificate made here). Each follows the other's endpoint (`[[federation.
//! trust_domains]]`), bootstrapped for https_spiffe by `spiffed bundle show --format spiffe`.
//! Then clients we did not write do mTLS across the trust domains, each side holding what its
//! own agent gave it: go-spiffe (`tlsconfig.MTLSServerConfig`/`MTLSClientConfig` with the
//! agent's bundle set) and the Rust `spiffe` crate with `spiffe-rustls`; and a JWT-SVID of one
//! trust domain validates through the other agent's ValidateJWTSVID. A CA rotation of `a.test`
//! reaches `b.test`'s workloads; a peer that serves garbage leaves the last good bundle.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use spiffed_proto::workload::{X509BundlesRequest, X509BundlesResponse};
use spiffed_test_support::spire::{
    AgentAttestation, AuthorityKind, BundleFormat, EntrySpec, ServerOptions, SpireAgent,
    SpireServer, fetch_x509,
};
use spiffed_test_support::{Agent, my_uid, with_header};

use crate::bin;

/// A port nobody listens on now (bound then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Web PKI for `b.test`'s https_web endpoint: a root, and a leaf for 127.0.0.1.
struct WebPki {
    root: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn web_pki(dir: &Path) -> WebPki {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::new(vec![]).unwrap();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "test web root");
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root, root_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["bundle.b.test".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let pki = WebPki {
        root: dir.join("web-root.pem"),
        cert: dir.join("web-cert.pem"),
        key: dir.join("web-key.pem"),
    };
    std::fs::write(&pki.root, root_cert.pem()).unwrap();
    std::fs::write(&pki.cert, leaf_cert.pem()).unwrap();
    std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
    pki
}

/// The config of an agent of `td` in `dir` that grants this uid `spiffe://TD/wl`.
fn config(dir: &Path, td: &str, extra: &str) -> String {
    format!(
        "trust_domain = \"{td}\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\n\
         data_dir = \"{}\"\nlog_level = \"debug\"\n\
         x509_svid_ttl = \"20s\"\njwt_svid_ttl = \"20s\"\nca_ttl = \"40s\"\nmin_svid_ttl = \"1s\"\nmin_ca_ttl = \"1s\"\n\
         [[entries]]\nspiffe_id = \"spiffe://{td}/wl\"\nselectors = [\"unix:uid:{}\"]\n{extra}\n",
        dir.join("api.sock").display(),
        dir.join("admin").join("admin.sock").display(),
        dir.join("data").display(),
        my_uid(),
    )
}

/// The X.509 authorities (DER) of a concatenation of DER certificates.
fn certs(mut der: &[u8]) -> Vec<Vec<u8>> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der).unwrap();
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    out
}

/// The X.509 bundles `agent` hands this uid's FetchX509Bundles, by trust domain ID.
async fn x509_bundles(agent: &Agent) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut stream = agent
        .client()
        .await
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first: X509BundlesResponse =
        tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    let mut out: Vec<(String, Vec<Vec<u8>>)> = first
        .bundles
        .iter()
        .map(|(td, der)| (td.clone(), certs(der)))
        .collect();
    out.sort();
    out
}

/// Waits until `agent` hands out a bundle of `td` whose authorities satisfy `ok`; returns them.
async fn wait_bundle(
    agent: &Agent,
    td: &str,
    ok: impl Fn(&[Vec<u8>]) -> bool,
    what: &str,
) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = x509_bundles(agent).await;
        if let Some((_, cas)) = got.iter().find(|(t, cas)| t == td && ok(cas)) {
            return cas.clone();
        }
        let shown: Vec<(&String, usize)> = got.iter().map(|(t, c)| (t, c.len())).collect();
        assert!(
            Instant::now() < deadline,
            "{what}: bundles now {shown:?}\n--- log ---\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn cli(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "spiffed {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Writes `agent`'s own bundle in the SPIFFE format (`spiffed bundle show --format spiffe`) to
/// `path`, as an operator hands it to a peer.
fn write_own_bundle(agent: &Agent, path: &Path) {
    let doc = cli(&[
        "bundle",
        "show",
        "--format",
        "spiffe",
        "--admin-socket",
        agent.admin_socket.to_str().unwrap(),
    ]);
    std::fs::write(path, doc).unwrap();
}

/// Runs the go-spiffe checker's federated checks with `own` as -socket and `peer` as
/// -peer-socket.
fn go_checks(checker: &Path, own: (&Agent, &str), peer: (&Agent, &str)) -> String {
    let out = Command::new(checker)
        .arg("-socket")
        .arg(format!("unix://{}", own.0.socket.display()))
        .arg("-expect-id")
        .arg(own.1)
        .arg("-peer-socket")
        .arg(format!("unix://{}", peer.0.socket.display()))
        .arg("-peer-id")
        .arg(peer.1)
        .args(["-check", "federated-mtls,federated-jwt", "-audience", "fed"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.matches("PASS").count() == 2,
        "go-spiffe federated checks ({} -> {}):\n{text}{}",
        own.1,
        peer.1,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// mTLS with the Rust `spiffe` crate and `spiffe-rustls`: a server holding `server`'s SVID and
/// bundle set that admits only `client_id`, and a client holding `client`'s that admits only
/// `server_id`.
async fn rust_mtls(server: &Agent, server_id: &str, client: &Agent, client_id: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let source = |a: &Agent| {
        let endpoint = format!("unix://{}", a.socket.display());
        async move {
            spiffe::X509Source::builder()
                .endpoint(&endpoint)
                .build()
                .await
                .unwrap()
        }
    };
    let server_cfg = spiffe_rustls::mtls_server(source(server).await)
        .authorize(spiffe_rustls::authorizer::exact([client_id]).unwrap())
        .build()
        .unwrap();
    let client_cfg = spiffe_rustls::mtls_client(source(client).await)
        .authorize(spiffe_rustls::authorizer::exact([server_id]).unwrap())
        .build()
        .unwrap();
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_cfg));
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_cfg));
    let served = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.flush().await?;
        Ok::<_, std::io::Error>(buf)
    });
    let name = rustls::pki_types::ServerName::try_from("spiffe").unwrap();
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, c))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("spiffe-rustls client {client_id} -> {server_id}: {e}"));
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(&served.await.unwrap().unwrap(), b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_federate_both_ways_through_bundle_endpoints() {
    let work = tempfile::tempdir().unwrap();
    let checker_dir = work.path().join("go");
    let build =
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/go/build.sh"))
            .arg(&checker_dir)
            .output()
            .unwrap();
    assert!(
        build.status.success(),
        "building the go-spiffe checker failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let checker = checker_dir.join("interop-go");
    let pki = web_pki(work.path());
    let (port_a, port_b) = (free_port(), free_port());
    let (id_a, id_b) = ("spiffe://a.test/wl", "spiffe://b.test/wl");

    // a.test: https_spiffe endpoint; follows b.test's https_web endpoint.
    let a = Agent::start_raw(&bin(), |dir| {
        config(
            dir,
            "a.test",
            &format!(
                "[federation]\nfederate_all = true\n\
                 [federation.bundle_endpoint]\nlisten = \"127.0.0.1:{port_a}\"\nrefresh_hint = \"1m\"\n\
                 [[federation.trust_domains]]\ntrust_domain = \"b.test\"\n\
                 bundle_endpoint_url = \"https://127.0.0.1:{port_b}\"\n\
                 bundle_endpoint_profile = \"https_web\"\nroot_certificates_path = \"{}\"\n\
                 refresh_interval = \"1s\"\n",
                pki.root.display()
            ),
        )
    });
    let a_bundle = work.path().join("a.json");
    write_own_bundle(&a, &a_bundle);

    // b.test: https_web endpoint; follows a.test's https_spiffe endpoint, bootstrapped.
    let b = Agent::start_raw(&bin(), |dir| {
        config(
            dir,
            "b.test",
            &format!(
                "[federation]\nfederate_all = true\n\
                 [federation.bundle_endpoint]\nlisten = \"127.0.0.1:{port_b}\"\nprofile = \"https_web\"\n\
                 certificate_path = \"{}\"\nprivate_key_path = \"{}\"\nrefresh_hint = \"1m\"\n\
                 [[federation.trust_domains]]\ntrust_domain = \"a.test\"\n\
                 bundle_endpoint_url = \"https://127.0.0.1:{port_a}\"\n\
                 endpoint_spiffe_id = \"spiffe://a.test/spiffed/bundle-endpoint\"\n\
                 bundle_path = \"{}\"\nrefresh_interval = \"1s\"\n",
                pki.cert.display(),
                pki.key.display(),
                a_bundle.display()
            ),
        )
    });

    // Each agent's workloads receive the other's bundle.
    let some = |cas: &[Vec<u8>]| !cas.is_empty();
    wait_bundle(
        &a,
        "spiffe://b.test",
        some,
        "a.test never got b.test's bundle",
    )
    .await;
    wait_bundle(
        &b,
        "spiffe://a.test",
        some,
        "b.test never got a.test's bundle",
    )
    .await;
    let listed = cli(&[
        "bundle",
        "list",
        "--admin-socket",
        a.admin_socket.to_str().unwrap(),
    ]);
    assert!(listed.contains("b.test"), "{listed}");

    // Clients we did not write, across the trust domains, both ways.
    go_checks(&checker, (&a, id_a), (&b, id_b));
    go_checks(&checker, (&b, id_b), (&a, id_a));
    rust_mtls(&a, id_a, &b, id_b).await;
    rust_mtls(&b, id_b, &a, id_a).await;

    // a.test's CA rotates (ca_ttl 40s: the next CA is prepared at half of it and published
    // before it signs): b.test's workloads receive the new authority through the endpoint.
    let before = wait_bundle(&b, "spiffe://a.test", some, "").await;
    wait_bundle(
        &b,
        "spiffe://a.test",
        |cas| cas.iter().any(|c| !before.contains(c)),
        "a.test's next CA never reached b.test's workloads",
    )
    .await;
    // And mTLS across the trust domains still works after the change.
    go_checks(&checker, (&b, id_b), (&a, id_a));

    // A restart of b.test with a.test's endpoint gone serves the last good bundle at once.
    let (mut a, mut b) = (a, b);
    a.stop();
    b.stop();
    let logged = b.logs().len();
    b.spawn();
    let held = wait_bundle(
        &b,
        "spiffe://a.test",
        some,
        "the stored bundle was not served",
    )
    .await;
    assert!(
        held.iter().any(|c| !before.contains(c)),
        "the newest bundle is the one kept"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.logs()[logged..]
        .contains("cannot refresh the federated bundle; keeping the last good one")
    {
        assert!(
            Instant::now() < deadline,
            "no failed refresh logged:\n{}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the misbehaving peer does on its next connection.
#[derive(Clone)]
enum PeerMode {
    /// Serve these bytes (a valid certificate, HTTP 200).
    Serve(Vec<u8>),
    /// Complete TLS, then say nothing.
    Hang,
    /// Present this certificate chain and key instead (DER, PKCS#8).
    Cert(Vec<u8>, Vec<u8>),
}

/// A leaf for 127.0.0.1 under `issuer`, valid from `from` to `until` (seconds from now); DER
/// certificate and PKCS#8 key.
fn web_leaf(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    from: i64,
    until: i64,
) -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::seconds(from);
    p.not_after = now + time::Duration::seconds(until);
    (
        p.signed_by(&key, issuer).unwrap().der().to_vec(),
        key.serialize_der(),
    )
}

fn tls_with(cert: &[u8], key: &[u8]) -> std::sync::Arc<rustls::ServerConfig> {
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(cert.to_vec())],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.to_vec().into()),
        )
        .unwrap(),
    )
}

/// A SPIFFE bundle document with one X.509 authority: a new CA for `td`.
fn one_ca_bundle(td: &str) -> (String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{td}").try_into().unwrap(),
    )];
    let ca = p.self_signed(&key).unwrap().der().to_vec();
    let doc = spiffed_core::spiffe_bundle::SpiffeBundle {
        x509_authorities: vec![ca.clone()],
        sequence: Some(1),
        ..spiffed_core::spiffe_bundle::SpiffeBundle::new(td.parse().unwrap())
    }
    .to_json();
    (doc, ca)
}

/// A peer that misbehaves in every way the issue lists (garbage, another trust domain's
/// bundle, a 10 MB body, a certificate from another root, an expired certificate, no answer):
/// each is refused with its reason in the log, the last good bundle stays served, and the
/// agent keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_peer_keeps_the_last_good_bundle_and_the_agent_serving() {
    let work = tempfile::tempdir().unwrap();
    // The peer's Web PKI: a root the agent trusts, and another it does not.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::new(vec![]).unwrap();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "peer web root");
    let root_pem = root.self_signed(&root_key).unwrap().pem();
    let root_path = work.path().join("root.pem");
    std::fs::write(&root_path, root_pem).unwrap();
    let trusted = rcgen::Issuer::new(root, root_key);
    let stranger = {
        let k = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "a stranger's root");
        rcgen::Issuer::new(p, k)
    };
    let (good_cert, good_key) = web_leaf(&trusted, -60, 3600);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (good_doc, good_ca) = one_ca_bundle("peer.test");
    let mode = std::sync::Arc::new(std::sync::Mutex::new(PeerMode::Serve(
        good_doc.into_bytes(),
    )));
    let peer_mode = mode.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut tcp) = stream else { continue };
            let m = peer_mode.lock().unwrap().clone();
            let tls = match &m {
                PeerMode::Cert(c, k) => tls_with(c, k),
                _ => tls_with(&good_cert, &good_key),
            };
            let mut conn = rustls::ServerConnection::new(tls).unwrap();
            let mut s = rustls::Stream::new(&mut conn, &mut tcp);
            let mut buf = [0u8; 2048];
            let _ = std::io::Read::read(&mut s, &mut buf);
            match m {
                PeerMode::Serve(b) => {
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        b.len()
                    );
                    let _ = s.write_all(&b);
                    let _ = s.flush();
                }
                PeerMode::Hang => {
                    std::thread::sleep(Duration::from_secs(10));
                }
                PeerMode::Cert(..) => {}
            }
        }
    });
    let agent = Agent::start_raw(&bin(), |dir| {
        config(
            dir,
            "example.org",
            &format!(
                "[federation]\nfederate_all = true\n\
                 [[federation.trust_domains]]\ntrust_domain = \"peer.test\"\n\
                 bundle_endpoint_url = \"https://127.0.0.1:{port}\"\n\
                 bundle_endpoint_profile = \"https_web\"\nroot_certificates_path = \"{}\"\n\
                 refresh_interval = \"1s\"\nfetch_timeout = \"2s\"\nmax_bundle_bytes = 4096\n",
                root_path.display()
            ),
        )
    });
    let served = wait_bundle(
        &agent,
        "spiffe://peer.test",
        |cas| cas.len() == 1,
        "the good bundle never arrived",
    )
    .await;
    assert_eq!(served, std::slice::from_ref(&good_ca));
    let (expired_cert, expired_key) = web_leaf(&trusted, -7200, -3600);
    let (stranger_cert, stranger_key) = web_leaf(&stranger, -60, 3600);
    for (m, reason) in [
        (
            PeerMode::Serve(b"<html>garbage</html>".to_vec()),
            "is not a SPIFFE bundle",
        ),
        (
            PeerMode::Serve(one_ca_bundle("other.test").0.into_bytes()),
            "belongs to trust domain other.test",
        ),
        (
            PeerMode::Serve(
                format!(
                    "{{\"keys\":[],\"pad\":\"{}\"}}",
                    "x".repeat(10 * 1024 * 1024)
                )
                .into_bytes(),
            ),
            "larger than 4096 bytes",
        ),
        (PeerMode::Cert(stranger_cert, stranger_key), "UnknownIssuer"),
        (PeerMode::Cert(expired_cert, expired_key), "expired"),
        (PeerMode::Hang, "no complete answer within 2s"),
    ] {
        let logged = agent.logs().len();
        *mode.lock().unwrap() = m;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.logs()[logged..].contains(reason) {
            assert!(
                Instant::now() < deadline,
                "no log line with {reason:?}:\n{}",
                &agent.logs()[logged..]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(agent.logs()[logged..].contains("keeping the last good one"));
        // Kept, and served.
        let now = x509_bundles(&agent).await;
        assert_eq!(now.len(), 2, "own and peer.test");
        assert_eq!(
            now[1],
            ("spiffe://peer.test".to_owned(), vec![good_ca.clone()])
        );
    }
}

/// The X.509 authorities of `td` in spire-server's `bundle list` (base64 DER `asn1`).
fn spire_federated(server: &SpireServer, td: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    server
        .bundle_list()
        .iter()
        .filter(|b| b["trust_domain"].as_str() == Some(td))
        .flat_map(|b| {
            b["x509_authorities"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|a| {
            base64::engine::general_purpose::STANDARD
                .decode(a["asn1"].as_str().unwrap_or_default())
                .ok()
        })
        .collect()
}

/// Against a real peer: spire-server v1.13.3 serves its bundle endpoint (`federation {
/// bundle_endpoint { ... } }`) and follows spiffed's (`spire-server federation create`);
/// spiffed follows the server's. A CA rotation on either side reaches the other's workloads:
/// spire-agent's (an entry federating with spiffed.test) and spiffed's.
#[test]
fn spiffed_and_spire_server_federate_through_their_bundle_endpoints() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (spire_port, our_port) = (free_port(), free_port());
    let server = SpireServer::start(ServerOptions {
        extra_server_config: vec![
            "federation {".into(),
            "  bundle_endpoint {".into(),
            "    address = \"127.0.0.1\"".into(),
            format!("    port = {spire_port}"),
            "    refresh_hint = \"1m\"".into(),
            "  }".into(),
            "}".into(),
        ],
        ..ServerOptions::default()
    });
    let spire_bundle = work.path().join("example.org.json");
    server.write_bundle(&spire_bundle, BundleFormat::Spiffe);

    // spiffed.test: serves https_spiffe, follows the server's endpoint (its SVID is
    // spiffe://example.org/spire/server), bootstrapped from `bundle show -format spiffe`.
    let ours = Agent::start_raw(&bin(), |dir| {
        config(
            dir,
            "spiffed.test",
            &format!(
                "[federation]\nfederate_all = true\n\
                 [federation.bundle_endpoint]\nlisten = \"127.0.0.1:{our_port}\"\nrefresh_hint = \"1m\"\n\
                 [[federation.trust_domains]]\ntrust_domain = \"example.org\"\n\
                 bundle_endpoint_url = \"https://127.0.0.1:{spire_port}\"\n\
                 endpoint_spiffe_id = \"spiffe://example.org/spire/server\"\n\
                 bundle_path = \"{}\"\nrefresh_interval = \"1s\"\n",
                spire_bundle.display()
            ),
        )
    });
    let our_bundle = work.path().join("spiffed.test.json");
    write_own_bundle(&ours, &our_bundle);
    server.cli_ok(&[
        "federation",
        "create",
        "-trustDomain",
        "spiffed.test",
        "-bundleEndpointURL",
        &format!("https://127.0.0.1:{our_port}"),
        "-bundleEndpointProfile",
        "https_spiffe",
        "-endpointSpiffeID",
        "spiffe://spiffed.test/spiffed/bundle-endpoint",
        "-trustDomainBundlePath",
        our_bundle.to_str().unwrap(),
        "-trustDomainBundleFormat",
        "spiffe",
    ]);

    // A spire-agent workload whose entry federates with spiffed.test.
    let token = server.generate_token(None, None);
    let theirs = SpireAgent::start(&server, AgentAttestation::JoinToken(token.clone()));
    let mut e = EntrySpec::workload(
        &server.join_token_agent_id(&token),
        "spiffe://example.org/fed",
        &[&format!("unix:uid:{}", my_uid())],
    );
    e.federates_with = vec!["spiffed.test".into()];
    server.entry_create(&e);
    let theirs_federated = || {
        fetch_x509(theirs.socket_path())
            .ok()
            .and_then(|f| f.federated_bundles.get("spiffe://spiffed.test").cloned())
            .unwrap_or_default()
    };
    let wait = |what: &str, secs: u64, mut ok: Box<dyn FnMut() -> bool + '_>| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "{what}\n--- spiffed ---\n{}\n--- spire-server ---\n{}",
                ours.logs(),
                server.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    // spiffed.test's CA, in spire-agent's workload's federated bundles.
    let ours_now: Vec<Vec<u8>> = rt
        .block_on(x509_bundles(&ours))
        .into_iter()
        .find(|(td, _)| td == "spiffe://spiffed.test")
        .map(|(_, c)| c)
        .unwrap();
    wait(
        "spire-agent's workload never received spiffed.test's bundle",
        60,
        Box::new(|| {
            let held = theirs_federated();
            ours_now.iter().all(|c| held.contains(c))
        }),
    );
    // The server's CA, in spiffed's workloads' bundles.
    let spire_now = rt.block_on(wait_bundle(
        &ours,
        "spiffe://example.org",
        |c| !c.is_empty(),
        "spiffed never served example.org's bundle",
    ));

    // spire-server prepares its next X.509 authority: it is published in the server's bundle,
    // served by its endpoint, and reaches spiffed's workloads (spiffed polls every second).
    server.authority_prepare(AuthorityKind::X509);
    rt.block_on(wait_bundle(
        &ours,
        "spiffe://example.org",
        |c| c.iter().any(|a| !spire_now.contains(a)),
        "spire-server's prepared authority never reached spiffed's workloads",
    ));

    // spiffed.test's next CA (prepared at half of ca_ttl = 40s) reaches the server (which
    // polls a quarter of the 1m refresh hint, 15 s) and spire-agent's workload.
    wait(
        "spiffed.test's next CA never reached spire-server",
        120,
        Box::new(|| {
            spire_federated(&server, "spiffed.test")
                .iter()
                .any(|c| !ours_now.contains(c))
        }),
    );
    wait(
        "spiffed.test's next CA never reached spire-agent's workload",
        60,
        Box::new(|| theirs_federated().iter().any(|c| !ours_now.contains(c))),
    );
}
