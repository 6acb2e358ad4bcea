//! FetchX509SVID and FetchX509Bundles through the raw client and the `spiffe` crate.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use spiffed_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, WitBundlesRequest, WitsvidRequest,
    X509BundlesRequest, X509svidRequest,
};
use spiffed_test_support::{with_header, x509_stream};
use tonic::Code;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{Mode, TestEntry, agent_for_me, node_with, split_der, verify_chain};

/// In both modes (standalone, and agent mode on a real spire-server).
#[tokio::test]
async fn raw_client_gets_svids_per_entry_and_matching_bundle() {
    for mode in Mode::ALL {
        raw_client_gets_svids_per_entry_and_matching_bundle_in(mode).await;
    }
}

async fn raw_client_gets_svids_per_entry_and_matching_bundle_in(mode: Mode) {
    let uid = spiffed_test_support::my_uid();
    let mut web = TestEntry::new("spiffe://example.org/web", &[format!("unix:uid:{uid}")]);
    web.hint = Some("internal");
    web.dns_names = &["web.internal"];
    let node = node_with(
        mode,
        &[
            web,
            TestEntry::new(
                "spiffe://example.org/db",
                &[
                    format!("unix:uid:{uid}"),
                    format!("unix:gid:{}", rustix::process::getgid().as_raw()),
                ],
            ),
            TestEntry::new(
                "spiffe://example.org/other",
                &[format!("unix:uid:{}", uid + 4242)],
            ),
        ],
    );
    let agent = &node.agent;
    let mut client = agent.client().await;
    let mut stream = x509_stream(&mut client).await;
    let msg = stream.message().await.unwrap().unwrap();
    // Two matching entries (ordered by entry id); the third is for another uid.
    let mut ids: Vec<_> = msg.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["spiffe://example.org/db", "spiffe://example.org/web"]);
    assert!(msg.federated_bundles.is_empty());
    for svid in &msg.svids {
        assert!(
            !svid.x509_svid.is_empty() && !svid.x509_svid_key.is_empty() && !svid.bundle.is_empty()
        );
        let parsed =
            spiffe::X509Svid::parse_from_der(&svid.x509_svid, &svid.x509_svid_key).unwrap();
        assert_eq!(parsed.spiffe_id().to_string(), svid.spiffe_id);
        verify_chain(&svid.x509_svid, &svid.bundle);
    }
    let web = msg
        .svids
        .iter()
        .find(|s| s.spiffe_id == "spiffe://example.org/web")
        .unwrap();
    assert_eq!(web.hint, "internal");
    let web_certs = split_der(&web.x509_svid);
    let (_, leaf) = X509Certificate::from_der(&web_certs[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.value.general_names.iter().any(|g| matches!(
        g,
        x509_parser::extensions::GeneralName::DNSName("web.internal")
    )));

    let mut bundles = client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let b = bundles.message().await.unwrap().unwrap();
    assert_eq!(b.bundles.len(), 1);
    assert_eq!(
        b.bundles.get("spiffe://example.org"),
        Some(&msg.svids[0].bundle)
    );
}

/// In both modes.
#[tokio::test]
async fn spiffe_crate_client_and_x509_source_fetch_and_validate() {
    for mode in Mode::ALL {
        spiffe_crate_client_and_x509_source_fetch_and_validate_in(mode).await;
    }
}

fn web_for_me() -> TestEntry<'static> {
    TestEntry::new(
        "spiffe://example.org/web",
        &[format!("unix:uid:{}", spiffed_test_support::my_uid())],
    )
}

async fn spiffe_crate_client_and_x509_source_fetch_and_validate_in(mode: Mode) {
    let node = node_with(mode, &[web_for_me()]);
    let agent = &node.agent;
    let endpoint = format!("unix://{}", agent.socket.display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let ctx = client.fetch_x509_context().await.unwrap();
    let svid = ctx.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = ctx.bundle_set().get(&td).unwrap();
    assert!(!bundle.authorities().is_empty());
    let chain: Vec<u8> = svid
        .cert_chain()
        .iter()
        .flat_map(|c| c.as_ref().to_vec())
        .collect();
    let roots: Vec<u8> = bundle
        .authorities()
        .iter()
        .flat_map(|c| c.as_ref().to_vec())
        .collect();
    verify_chain(&chain, &roots);

    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td).is_some());

    let source = spiffe::X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    assert!(source.try_bundle_for_trust_domain(&td).is_some());
    source.shutdown().await;
}

/// In both modes.
#[tokio::test]
async fn missing_or_wrong_security_header_is_invalid_argument() {
    for mode in Mode::ALL {
        missing_or_wrong_security_header_is_invalid_argument_in(mode).await;
    }
}

async fn missing_or_wrong_security_header_is_invalid_argument_in(mode: Mode) {
    let node = node_with(mode, &[web_for_me()]);
    let agent = &node.agent;
    let mut c = agent.client().await;
    fn code(r: Result<(), tonic::Status>) -> Code {
        r.err().map_or(Code::Ok, |s| s.code())
    }
    assert_eq!(
        code(c.fetch_x509svid(X509svidRequest {}).await.map(|_| ())),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.fetch_x509_bundles(X509BundlesRequest {})
                .await
                .map(|_| ())
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.fetch_jwtsvid(JwtsvidRequest {
                audience: vec!["a".into()],
                spiffe_id: String::new()
            })
            .await
            .map(|_| ())
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.fetch_jwt_bundles(JwtBundlesRequest {}).await.map(|_| ())),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_jwtsvid(ValidateJwtsvidRequest {
                audience: "a".into(),
                svid: "x".into()
            })
            .await
            .map(|_| ())
        ),
        Code::InvalidArgument
    );
    for bad in ["True", "1", ""] {
        let mut req = tonic::Request::new(X509svidRequest {});
        req.metadata_mut()
            .insert("workload.spiffe.io", bad.parse().unwrap());
        assert_eq!(
            code(c.fetch_x509svid(req).await.map(|_| ())),
            Code::InvalidArgument,
            "{bad:?}"
        );
    }
    // WIT is not served: Unimplemented once the header is right.
    assert_eq!(
        code(
            c.fetch_witsvid(with_header(WitsvidRequest {
                spiffe_id: String::new()
            }))
            .await
            .map(|_| ())
        ),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            c.fetch_wit_bundles(with_header(WitBundlesRequest {}))
                .await
                .map(|_| ())
        ),
        Code::Unimplemented
    );
}

/// In both modes.
#[tokio::test]
async fn caller_without_entry_gets_permission_denied() {
    for mode in Mode::ALL {
        caller_without_entry_gets_permission_denied_in(mode).await;
    }
}

async fn caller_without_entry_gets_permission_denied_in(mode: Mode) {
    // Entries only for another uid: this process matches none.
    let other = spiffed_test_support::my_uid() + 4242;
    let node = node_with(
        mode,
        &[TestEntry::new(
            "spiffe://example.org/x",
            &[format!("unix:uid:{other}")],
        )],
    );
    let agent = &node.agent;
    let mut c = agent.client().await;
    let err = match c.fetch_x509svid(with_header(X509svidRequest {})).await {
        Ok(r) => r.into_inner().message().await.unwrap_err(),
        Err(s) => s,
    };
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "no identity issued");
    let err = match c
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
    {
        Ok(r) => r.into_inner().message().await.unwrap_err(),
        Err(s) => s,
    };
    assert_eq!(err.code(), Code::PermissionDenied);
    // The Rust client maps it to its own NoIdentityIssued error.
    let client =
        spiffe::WorkloadApiClient::connect_to(format!("unix://{}", agent.socket.display()))
            .await
            .unwrap();
    let e = client.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(e, spiffe::WorkloadApiError::NoIdentityIssued),
        "{e:?}"
    );
    assert!(
        agent.logs().contains("no identity issued"),
        "denial is logged with its reason"
    );
}

#[tokio::test]
async fn stream_lives_through_svid_and_ca_rotations() {
    // SVIDs of 2s (re-minted every ~1s), a CA of 6s: within 8s the stream must see several
    // SVID rotations and the CA handover, every SVID verifying against the bundle sent with it.
    let agent = agent_for_me(
        "x509_svid_ttl = \"2s\"\njwt_svid_ttl = \"2s\"\nca_ttl = \"6s\"\nmin_svid_ttl = \"1s\"\nmin_ca_ttl = \"1s\"\n",
    );
    let mut c = agent.client().await;
    let mut stream = x509_stream(&mut c).await;
    // A bundle stream on the side must be told about the CA changes too.
    let mut bundles = c
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let bundle_watcher = tokio::spawn(async move {
        let mut seen = vec![];
        while let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_secs(9), bundles.message()).await
        {
            seen.push(m.bundles["spiffe://example.org"].clone());
            if seen.len() >= 3 {
                break;
            }
        }
        seen
    });
    let first = stream.message().await.unwrap().unwrap();
    let first_issuer = {
        let certs = split_der(&first.svids[0].x509_svid);
        X509Certificate::from_der(&certs[0])
            .unwrap()
            .1
            .issuer()
            .as_raw()
            .to_vec()
    };
    let mut serials = HashSet::new();
    let mut issuers = HashSet::new();
    let mut bundle_sizes = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut msg = first;
    loop {
        assert_eq!(msg.svids.len(), 1);
        let svid = &msg.svids[0];
        verify_chain(&svid.x509_svid, &svid.bundle);
        let certs = split_der(&svid.x509_svid);
        let (_, leaf) = X509Certificate::from_der(&certs[0]).unwrap();
        // A message may repeat the SVID when only the bundle changed.
        serials.insert(leaf.raw_serial().to_vec());
        issuers.insert(leaf.issuer().as_raw().to_vec());
        bundle_sizes.insert(split_der(&svid.bundle).len());
        if Instant::now() > deadline {
            break;
        }
        msg = match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
            Ok(m) => m.unwrap().expect("stream ended"),
            Err(_) => panic!("no rotation within 3s:\n{}", agent.logs()),
        };
    }
    assert!(serials.len() >= 4, "only {} SVIDs seen", serials.len());
    assert!(issuers.len() >= 2, "no CA handover seen:\n{}", agent.logs());
    assert!(issuers.contains(&first_issuer));
    assert!(
        bundle_sizes.iter().any(|&n| n >= 2),
        "the bundle never held two CAs (overlap)"
    );
    let seen = bundle_watcher.await.unwrap();
    assert!(
        seen.len() >= 3,
        "the bundle stream got {} messages",
        seen.len()
    );
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "duplicate bundle messages"
    );
}
