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
    std::fs::write(
        &a_bundle,
        cli(&[
            "bundle",
            "show",
            "--format",
            "spiffe",
            "--admin-socket",
            a.admin_socket.to_str().unwrap(),
        ]),
    )
    .unwrap();

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

/// A peer that answers with garbage, or not at all: refused with a logged reason, the last
/// good bundle is kept, and the agent keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_peer_keeps_the_last_good_bundle_and_the_agent_serving() {
    let work = tempfile::tempdir().unwrap();
    let pki = web_pki(work.path());
    // The "peer": a TLS listener with a valid certificate that serves whatever the test says.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let served = body.clone();
    let tls = {
        let certs = vec![rustls::pki_types::CertificateDer::from(x509_der(
            &std::fs::read_to_string(&pki.cert).unwrap(),
        ))];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            key_der(&std::fs::read_to_string(&pki.key).unwrap()).into(),
        );
        std::sync::Arc::new(
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        )
    };
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut tcp) = stream else { continue };
            let mut conn = rustls::ServerConnection::new(tls.clone()).unwrap();
            let mut s = rustls::Stream::new(&mut conn, &mut tcp);
            let mut buf = [0u8; 2048];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let b = served.lock().unwrap().clone();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                b.len()
            );
            let _ = s.write_all(&b);
            let _ = s.flush();
        }
    });
    let peer = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://peer.test".try_into().unwrap(),
    )];
    let peer_ca = p.self_signed(&peer).unwrap();
    let good = format!(
        "{{\"keys\":[{{\"use\":\"x509-svid\",\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"{}\",\"y\":\"{}\",\"x5c\":[\"{}\"]}}],\"spiffe_sequence\":1}}",
        b64url(&peer.public_key_raw()[1..33]),
        b64url(&peer.public_key_raw()[33..]),
        b64(peer_ca.der())
    );
    *body.lock().unwrap() = good.into_bytes();
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
                pki.root.display()
            ),
        )
    });
    let good_cas = wait_bundle(
        &agent,
        "spiffe://peer.test",
        |cas| cas.len() == 1,
        "the good bundle never arrived",
    )
    .await;
    for (served, reason) in [
        (b"<html>garbage</html>".to_vec(), "is not a SPIFFE bundle"),
        (
            format!(
                "{{\"keys\":[],\"pad\":\"{}\"}}",
                "x".repeat(10 * 1024 * 1024)
            )
            .into_bytes(),
            "larger than 4096 bytes",
        ),
    ] {
        *body.lock().unwrap() = served;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.logs().contains(reason) {
            assert!(
                Instant::now() < deadline,
                "no log line with {reason:?}:\n{}",
                agent.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Kept, and served.
        let now = x509_bundles(&agent).await;
        assert_eq!(now.len(), 2, "own and peer.test");
        assert_eq!(now[1], ("spiffe://peer.test".to_owned(), good_cas.clone()));
    }
}

fn pem_body(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b).unwrap()
}

fn x509_der(pem: &str) -> Vec<u8> {
    pem_body(pem)
}

fn key_der(pem: &str) -> Vec<u8> {
    pem_body(pem)
}

fn b64(d: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(d)
}

fn b64url(d: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
}
