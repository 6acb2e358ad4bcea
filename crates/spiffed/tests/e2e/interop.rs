//! Clients we did not write, against the real binary: go-spiffe, py-spiffe, the `spire-agent`
//! CLI and java-spiffe (tests/interop/run.sh installs each from its package registry into a
//! cache outside the checkout and prints a client x check matrix).

use std::path::Path;
use std::process::Command;

use crate::bin;

#[test]
fn foreign_clients_pass_every_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("tests/interop/run.sh"))
        .env("SPIFFED_BIN", bin())
        .output()
        .expect("bash runs tests/interop/run.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Kept beside the binaries so CI can print the matrix after the test run.
    let _ = std::fs::write(bin().with_file_name("interop-matrix.txt"), &text);
    assert!(out.status.success(), "interop suite failed:\n{text}");
    assert!(
        text.contains("interop: ") && text.contains(" 0 failed"),
        "{text}"
    );
}

/// The Rust `spiffe` crate's sources follow rotations: `X509Source` gets new SVIDs pushed on
/// its stream, `JwtSource` learns new signing keys and its tokens validate locally.
#[tokio::test]
async fn rust_spiffe_sources_see_rotations() {
    use std::collections::HashSet;
    use std::time::Duration;

    // Lifetimes of a few seconds: rotations within the test, with seconds of margin before an
    // SVID or token expires, so that a loaded machine (CI runs the interop matrix meanwhile)
    // does not make the client hold an expired SVID between two rotations.
    let agent = crate::agent_for_me(
        "x509_svid_ttl = \"6s\"\njwt_svid_ttl = \"6s\"\nca_ttl = \"12s\"\nmin_svid_ttl = \"1s\"\nmin_ca_ttl = \"1s\"\n",
    );
    let endpoint = format!("unix://{}", agent.socket.display());
    let x509 = spiffe::X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    let jwt = spiffe::JwtSource::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let mut updates = x509.updated();
    let mut serials = HashSet::new();
    let mut kids = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(16);
    while tokio::time::Instant::now() < deadline {
        serials.insert(x509.svid().unwrap().leaf().as_ref().to_vec());
        let token = jwt.fetch_jwt_svid(["rust"]).await.unwrap();
        let bundles = jwt.bundle_set().unwrap();
        let v = spiffe::JwtSvid::parse_and_validate(token.token(), &*bundles, &["rust"]).unwrap();
        assert_eq!(v.spiffe_id().to_string(), "spiffe://example.org/web");
        for k in jwt
            .try_bundle_for_trust_domain(&td)
            .unwrap()
            .jwt_authorities()
        {
            kids.insert(k.key_id().to_owned());
        }
        let _ = tokio::time::timeout(Duration::from_millis(700), updates.changed()).await;
    }
    assert!(serials.len() >= 3, "X509Source saw {} SVIDs", serials.len());
    assert!(kids.len() >= 2, "JwtSource saw {} signing keys", kids.len());
    x509.shutdown().await;
    jwt.shutdown().await;
}
