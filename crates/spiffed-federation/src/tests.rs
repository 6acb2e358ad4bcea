//! The endpoint and the client against each other over real TLS on loopback, and the client
//! against peers that misbehave.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{
    CurrentCert, EndpointLimits, EndpointUrl, FetchError, FetchLimits, Profile, anchors,
    certified_key_from_der, fetch, serve, server_config,
};

struct Ca {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str, uri: Option<&str>) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        if let Some(u) = uri {
            p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
        }
        let der = p.self_signed(&key).unwrap().der().to_vec();
        Self {
            der,
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf with `sans`, and its key as PKCS#8 DER.
    fn leaf(&self, sans: Vec<SanType>) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let der = p.signed_by(&key, &self.issuer).unwrap().der().to_vec();
        (der, key.serialize_der())
    }

    fn svid(&self, id: &str) -> (Vec<u8>, Vec<u8>) {
        self.leaf(vec![SanType::URI(id.try_into().unwrap())])
    }

    fn web(&self, dns: &str) -> (Vec<u8>, Vec<u8>) {
        self.leaf(vec![
            SanType::DnsName(dns.try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ])
    }
}

const ENDPOINT_ID: &str = "spiffe://peer.org/bundle-endpoint";

struct Endpoint {
    addr: SocketAddr,
    cert: Arc<CurrentCert>,
    document: watch::Sender<Bytes>,
    _stop: watch::Sender<bool>,
}

async fn endpoint(leaf: &(Vec<u8>, Vec<u8>), limits: EndpointLimits) -> Endpoint {
    let cert = Arc::new(CurrentCert::default());
    cert.set(certified_key_from_der(std::slice::from_ref(&leaf.0), &leaf.1).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (document, rx) = watch::channel(Bytes::from_static(b"{\"keys\":[]}"));
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        server_config(cert.clone()).unwrap(),
        rx,
        limits,
        stop_rx,
    ));
    Endpoint {
        addr,
        cert,
        document,
        _stop: stop,
    }
}

fn url(host: &str, addr: SocketAddr) -> EndpointUrl {
    EndpointUrl::parse(&format!("https://{host}:{}/", addr.port())).unwrap()
}

fn spiffe_profile(ca: &Ca, id: &str) -> Profile {
    Profile::HttpsSpiffe {
        trust_domain: "peer.org".into(),
        endpoint_id: id.into(),
        anchors: anchors(std::slice::from_ref(&ca.der)).unwrap(),
    }
}

fn web_profile(ca: &Ca) -> Profile {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der.clone())).unwrap();
    Profile::HttpsWeb {
        roots: Arc::new(roots),
    }
}

#[tokio::test]
async fn https_spiffe_serves_the_document_to_a_client_that_checks_the_id_and_chain() {
    let ca = Ca::new("peer CA", Some("spiffe://peer.org"));
    let ep = endpoint(&ca.svid(ENDPOINT_ID), EndpointLimits::default()).await;
    let u = url("127.0.0.1", ep.addr);
    let got = fetch(
        &u,
        &spiffe_profile(&ca, ENDPOINT_ID),
        FetchLimits::default(),
    )
    .await
    .unwrap();
    assert_eq!(got, Bytes::from_static(b"{\"keys\":[]}"));

    // A new document is served at once.
    ep.document
        .send_replace(Bytes::from_static(b"{\"keys\":[1]}"));
    let got = fetch(
        &u,
        &spiffe_profile(&ca, ENDPOINT_ID),
        FetchLimits::default(),
    )
    .await
    .unwrap();
    assert_eq!(got, Bytes::from_static(b"{\"keys\":[1]}"));

    // The host name plays no part: any name reaching the endpoint is fine.
    fetch(
        &url("localhost", ep.addr),
        &spiffe_profile(&ca, ENDPOINT_ID),
        FetchLimits::default(),
    )
    .await
    .unwrap();

    // Another ID, or another trust domain's CA: refused, saying which.
    let e = fetch(
        &u,
        &spiffe_profile(&ca, "spiffe://peer.org/other"),
        FetchLimits::default(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains(
            "has the SPIFFE ID(s) [spiffe://peer.org/bundle-endpoint], expected exactly \
             spiffe://peer.org/other"
        ),
        "{e}"
    );
    let stranger = Ca::new("stranger", Some("spiffe://peer.org"));
    let e = fetch(
        &u,
        &spiffe_profile(&stranger, ENDPOINT_ID),
        FetchLimits::default(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("does not chain to the bundle of peer.org (no authority in the bundle"),
        "{e}"
    );

    // A rotated SVID (here under a new CA) is presented at the next handshake.
    let (c, k) = stranger.svid(ENDPOINT_ID);
    ep.cert
        .set(certified_key_from_der(std::slice::from_ref(&c), &k).unwrap());
    fetch(
        &u,
        &spiffe_profile(&stranger, ENDPOINT_ID),
        FetchLimits::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn https_web_checks_the_host_name_against_web_roots() {
    let ca = Ca::new("web CA", None);
    let ep = endpoint(&ca.web("bundle.peer.test"), EndpointLimits::default()).await;
    // The certificate has 127.0.0.1 as an IP SAN and bundle.peer.test as a DNS SAN.
    fetch(
        &url("127.0.0.1", ep.addr),
        &web_profile(&ca),
        FetchLimits::default(),
    )
    .await
    .unwrap();
    let e = fetch(
        &url("localhost", ep.addr),
        &web_profile(&ca),
        FetchLimits::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FetchError::Tls { .. }), "{e}");
    assert!(
        e.to_string().contains("not valid for name \"localhost\""),
        "{e}"
    );
    let other = Ca::new("other web CA", None);
    let e = fetch(
        &url("127.0.0.1", ep.addr),
        &web_profile(&other),
        FetchLimits::default(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
}

#[tokio::test]
async fn a_body_past_the_limit_an_error_status_and_no_document_are_refused() {
    let ca = Ca::new("peer CA", Some("spiffe://peer.org"));
    let ep = endpoint(&ca.svid(ENDPOINT_ID), EndpointLimits::default()).await;
    let u = url("127.0.0.1", ep.addr);
    let p = spiffe_profile(&ca, ENDPOINT_ID);
    let limits = FetchLimits {
        max_body_bytes: 1000,
        ..FetchLimits::default()
    };
    ep.document.send_replace(Bytes::from(vec![b' '; 1000]));
    assert_eq!(fetch(&u, &p, limits).await.unwrap().len(), 1000);
    ep.document.send_replace(Bytes::from(vec![b' '; 1001]));
    let e = fetch(&u, &p, limits).await.unwrap_err();
    assert!(matches!(e, FetchError::TooLarge { limit: 1000, .. }), "{e}");
    // 10 MB, as the hostile peer.
    ep.document
        .send_replace(Bytes::from(vec![b' '; 10 * 1024 * 1024]));
    let e = fetch(&u, &p, FetchLimits::default()).await.unwrap_err();
    assert!(matches!(e, FetchError::TooLarge { .. }), "{e}");
    ep.document.send_replace(Bytes::new());
    let e = fetch(&u, &p, limits).await.unwrap_err();
    assert!(e.to_string().contains("the endpoint answered 503"), "{e}");
}

/// A body sent without a length, past the limit: cut at the limit while it streams.
#[tokio::test]
async fn a_streamed_body_past_the_limit_is_cut() {
    let ca = Ca::new("web CA", None);
    let (cert, key) = ca.web("bundle.peer.test");
    let tls = server_config({
        let c = Arc::new(CurrentCert::default());
        c.set(certified_key_from_der(&[cert], &key).unwrap());
        c
    })
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = tokio_rustls::TlsAcceptor::from(tls)
            .accept(tcp)
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        for _ in 0..100 {
            if s.write_all(b"400\r\n").await.is_err() {
                return;
            }
            if s.write_all(&[b' '; 1024]).await.is_err() || s.write_all(b"\r\n").await.is_err() {
                return;
            }
        }
    });
    let e = fetch(
        &url("127.0.0.1", addr),
        &web_profile(&ca),
        FetchLimits {
            max_body_bytes: 10_000,
            ..FetchLimits::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, FetchError::TooLarge { limit: 10_000, .. }),
        "{e}"
    );
}

#[tokio::test]
async fn a_silent_peer_times_out_and_a_garbage_peer_fails_the_handshake() {
    let ca = Ca::new("peer CA", Some("spiffe://peer.org"));
    let p = spiffe_profile(&ca, ENDPOINT_ID);
    let limits = FetchLimits {
        timeout: Duration::from_millis(300),
        ..FetchLimits::default()
    };
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let e = fetch(&url("127.0.0.1", silent_addr), &p, limits)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Timeout { .. }), "{e}");

    let garbage = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n{\"keys\":[]}").await;
        }
    });
    let e = fetch(&url("127.0.0.1", garbage_addr), &p, limits)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Tls { .. }), "{e}");

    // Nothing listening.
    drop(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let e = fetch(
        &EndpointUrl::parse("https://127.0.0.1:1/").unwrap(),
        &p,
        limits,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FetchError::Connect { .. }), "{e}");
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_and_slow_clients_let_go() {
    let ca = Ca::new("peer CA", Some("spiffe://peer.org"));
    let limits = EndpointLimits {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(500),
        connection_timeout: Duration::from_secs(5),
    };
    let ep = endpoint(&ca.svid(ENDPOINT_ID), limits).await;
    let u = url("127.0.0.1", ep.addr);
    let p = spiffe_profile(&ca, ENDPOINT_ID);
    // A client that connects and says nothing holds the only slot...
    let idle = tokio::net::TcpStream::connect(ep.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = fetch(&u, &p, FetchLimits::default()).await.unwrap_err();
    assert!(
        matches!(e, FetchError::Tls { .. } | FetchError::Http { .. }),
        "closed at accept: {e}"
    );
    // ...until its handshake deadline passes.
    tokio::time::sleep(Duration::from_millis(700)).await;
    fetch(&u, &p, FetchLimits::default()).await.unwrap();
    drop(idle);
}

#[test]
fn urls_must_be_https_with_a_host() {
    for (bad, why) in [
        ("http://peer.org/", "https://"),
        ("peer.org", "https://"),
        ("https:///x", ""),
        ("https://user@peer.org/", "user information"),
    ] {
        let e = EndpointUrl::parse(bad).unwrap_err();
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }
    let u = EndpointUrl::parse("https://peer.org:8443/bundle?x=1").unwrap();
    assert_eq!(u.authority(), "peer.org:8443");
    assert_eq!(
        EndpointUrl::parse("https://[::1]/").unwrap().authority(),
        "[::1]:443"
    );
}

// ------------------------------------------------------------------- federation relationships

mod relationships {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use spiffed_core::TrustDomain;
    use spiffed_core::spiffe_bundle::SpiffeBundle;

    use super::*;
    use crate::relationship::{
        DEFAULT_REFRESH_HINT, EndpointProfile, FederatedBundles, Refreshed, Relationship,
        next_refresh, refresh_once, run,
    };

    #[derive(Default)]
    struct Mem(Mutex<HashMap<String, SpiffeBundle>>);

    impl Mem {
        fn held(&self, td: &TrustDomain) -> Option<SpiffeBundle> {
            self.0.lock().unwrap().get(td.as_str()).cloned()
        }
        fn set(&self, bundle: SpiffeBundle) {
            self.0
                .lock()
                .unwrap()
                .insert(bundle.trust_domain.to_string(), bundle);
        }
    }

    #[async_trait::async_trait]
    impl FederatedBundles for Mem {
        async fn get(&self, td: &TrustDomain) -> Option<SpiffeBundle> {
            self.held(td)
        }
        async fn put(&self, bundle: SpiffeBundle, _url: &str) -> Result<(), String> {
            self.0
                .lock()
                .unwrap()
                .insert(bundle.trust_domain.to_string(), bundle);
            Ok(())
        }
    }

    fn td(s: &str) -> TrustDomain {
        s.parse().unwrap()
    }

    fn bundle(cas: &[&Ca], sequence: u64) -> SpiffeBundle {
        SpiffeBundle {
            x509_authorities: cas.iter().map(|c| c.der.clone()).collect(),
            sequence: Some(sequence),
            refresh_hint: Some(Duration::from_secs(60)),
            ..SpiffeBundle::new(td("peer.org"))
        }
    }

    fn doc(b: &SpiffeBundle) -> Bytes {
        Bytes::from(b.to_json())
    }

    fn rel(addr: SocketAddr) -> Relationship {
        Relationship {
            trust_domain: td("peer.org"),
            url: url("127.0.0.1", addr),
            profile: EndpointProfile::HttpsSpiffe {
                endpoint_id: ENDPOINT_ID.parse().unwrap(),
            },
            limits: FetchLimits {
                timeout: Duration::from_secs(5),
                ..FetchLimits::default()
            },
            refresh_interval: None,
        }
    }

    #[tokio::test]
    async fn a_changed_bundle_is_stored_and_a_bad_one_keeps_the_last_good() {
        let ca = Ca::new("peer CA", Some("spiffe://peer.org"));
        let ep = endpoint(&ca.svid(ENDPOINT_ID), EndpointLimits::default()).await;
        let store = Mem::default();
        let r = rel(ep.addr);

        // Without a bundle to authenticate the endpoint with, nothing is fetched.
        let Refreshed::Failed(why) = refresh_once(&r, &store).await else {
            panic!()
        };
        assert!(why.contains("no bundle of peer.org is held"), "{why}");

        // Bootstrapped: the same bundle is unchanged, a new one (the peer prepared its next
        // CA) replaces it.
        let first = bundle(&[&ca], 1);
        store.set(first.clone());
        ep.document.send_replace(doc(&first));
        assert_eq!(refresh_once(&r, &store).await, Refreshed::Unchanged);
        let next_ca = Ca::new("peer CA 2", Some("spiffe://peer.org"));
        let second = bundle(&[&ca, &next_ca], 2);
        ep.document.send_replace(doc(&second));
        assert_eq!(
            refresh_once(&r, &store).await,
            Refreshed::Updated(second.clone())
        );
        assert_eq!(store.held(&td("peer.org")), Some(second.clone()));

        // Garbage, another trust domain's bundle, a 503: refused with the reason; kept.
        let other = Ca::new("other CA", Some("spiffe://other.org"));
        for (served, reason) in [
            (
                Bytes::from_static(b"<html>hello</html>"),
                "is not a SPIFFE bundle",
            ),
            (
                doc(&bundle(&[&other], 3)),
                "belongs to trust domain other.org",
            ),
            (Bytes::new(), "the endpoint answered 503"),
        ] {
            ep.document.send_replace(served);
            let Refreshed::Failed(why) = refresh_once(&r, &store).await else {
                panic!("{reason}")
            };
            assert!(why.contains(reason), "{why}");
            assert_eq!(store.held(&td("peer.org")), Some(second.clone()));
        }

        // The endpoint's new SVID under the next CA verifies: that CA is in the bundle now.
        let (c, k) = next_ca.svid(ENDPOINT_ID);
        ep.cert
            .set(certified_key_from_der(std::slice::from_ref(&c), &k).unwrap());
        let third = bundle(&[&next_ca], 4);
        ep.document.send_replace(doc(&third));
        assert_eq!(refresh_once(&r, &store).await, Refreshed::Updated(third));
    }

    #[tokio::test]
    async fn the_task_follows_the_endpoint_until_stopped() {
        let ca = Ca::new("peer CA", Some("spiffe://peer.org"));
        let ep = endpoint(&ca.svid(ENDPOINT_ID), EndpointLimits::default()).await;
        let store = Arc::new(Mem::default());
        store.set(bundle(&[&ca], 1));
        let mut r = rel(ep.addr);
        r.refresh_interval = Some(Duration::from_millis(50));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(r, store.clone(), stop_rx));
        let second = bundle(&[&ca], 2);
        ep.document.send_replace(doc(&second));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.held(&td("peer.org")) != Some(second.clone()) {
            assert!(tokio::time::Instant::now() < deadline, "never refreshed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn the_next_refresh_is_a_quarter_of_the_hint_within_bounds() {
        let mut b = SpiffeBundle::new(td("peer.org"));
        assert_eq!(next_refresh(None, None), DEFAULT_REFRESH_HINT / 4);
        assert_eq!(next_refresh(Some(&b), None), Duration::from_secs(75));
        b.refresh_hint = Some(Duration::from_secs(3600));
        assert_eq!(next_refresh(Some(&b), None), Duration::from_secs(900));
        b.refresh_hint = Some(Duration::from_secs(5));
        assert_eq!(next_refresh(Some(&b), None), Duration::from_secs(15));
        assert_eq!(
            next_refresh(Some(&b), Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
    }
}
