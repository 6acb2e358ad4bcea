//! Standalone hosts that share an upstream CA (`[upstream_authority.disk]`) share a trust
//! domain: two real `spiffed run` processes with their own data dirs verify each other's
//! X.509-SVIDs, with rustls-webpki and `openssl verify`, at every update across two CA
//! rotations.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffed_test_support::{Agent, my_uid, x509_stream};
use tokio::sync::mpsc;

use crate::{bin, split_der};

/// An upstream root and an intermediate under it, with the intermediate's files written to
/// `dir` as the agent reads them: the intermediate certificate, its key (0600), the root.
pub(crate) struct UpstreamPki {
    root_der: Vec<u8>,
    intermediate_der: Vec<u8>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "spiffed e2e");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(1);
    p
}

pub(crate) fn upstream_pki(dir: &Path) -> UpstreamPki {
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("e2e upstream root");
    let root = root_params.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate().unwrap();
    let int = ca_params("e2e upstream intermediate")
        .signed_by(&int_key, &Issuer::from_params(&root_params, &root_key))
        .unwrap();
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("ca.crt"), int.pem()).unwrap();
    fs::write(dir.join("ca.key"), int_key.serialize_pem()).unwrap();
    fs::set_permissions(dir.join("ca.key"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dir.join("root.crt"), root.pem()).unwrap();
    UpstreamPki {
        root_der: root.der().to_vec(),
        intermediate_der: int.der().to_vec(),
    }
}

/// Verifies `chain` (leaf first) up to a root of `bundle` now, for client authentication, as
/// a peer's rustls would.
fn webpki_verify(chain: &[u8], bundle: &[u8]) -> Result<(), String> {
    let certs = split_der(chain);
    let roots = split_der(bundle);
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                .unwrap()
                .to_owned()
        })
        .collect();
    let inter: Vec<CertificateDer<'_>> = certs[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf = CertificateDer::from(certs[0].as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| format!("{e:?}"))?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        UnixTime::since_unix_epoch(now),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("{e:?}"))
}

fn pem(ders: &[Vec<u8>]) -> String {
    use base64::Engine;
    let mut out = String::new();
    for d in ders {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(d);
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// `openssl verify` of `chain` against `bundle`, when openssl is installed (`None` if not).
fn openssl_verify(chain: &[u8], bundle: &[u8], dir: &Path) -> Option<Result<(), String>> {
    let certs = split_der(chain);
    fs::write(dir.join("leaf.pem"), pem(&certs[..1])).unwrap();
    fs::write(dir.join("untrusted.pem"), pem(&certs[1..])).unwrap();
    fs::write(dir.join("bundle.pem"), pem(&split_der(bundle))).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .args(["-purpose", "sslclient", "-CAfile"])
        .arg(dir.join("bundle.pem"))
        .arg("-untrusted")
        .arg(dir.join("untrusted.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .ok()?;
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

/// A host with 6s CAs (rotating within seconds) and the upstream files in `upstream`.
fn host(upstream: &Path) -> Agent {
    host_with(
        upstream,
        "x509_svid_ttl = \"2s\"\njwt_svid_ttl = \"2s\"\nca_ttl = \"6s\"\nmin_svid_ttl = \"1s\"\n\
         min_ca_ttl = \"1s\"\n",
    )
}

pub(crate) fn host_with(upstream: &Path, ttls: &str) -> Agent {
    let uid = my_uid();
    Agent::start(
        &bin(),
        &format!(
            "{ttls}\
             [[entries]]\nspiffe_id = \"spiffe://example.org/web\"\nselectors = [\"unix:uid:{uid}\"]\n\
             [upstream_authority.disk]\ncert_file_path = \"{0}/ca.crt\"\n\
             key_file_path = \"{0}/ca.key\"\nbundle_file_path = \"{0}/root.crt\"\n",
            upstream.display()
        ),
    )
}

/// The first X.509-SVID message of `agent`: (chain, bundle).
async fn first_svid(agent: &Agent) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut client = agent.client().await;
    let mut stream = x509_stream(&mut client).await;
    let m = stream.message().await.unwrap().unwrap();
    (
        split_der(&m.svids[0].x509_svid),
        split_der(&m.svids[0].bundle),
    )
}

#[tokio::test]
async fn kill_9_and_restart_serve_the_same_chain_whatever_the_files_say_now() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("upstream");
    let pki = upstream_pki(&dir);
    let mut agent = host_with(&dir, "");
    let (chain, bundle) = first_svid(&agent).await;
    assert_eq!(chain.len(), 3);
    assert_eq!(bundle, vec![pki.root_der.clone()]);
    // The upstream is renewed (another intermediate under another root) while the agent is
    // killed: the restarted agent serves the CA and chain recorded in ca.json, not a CA
    // signed again; the renewed files only sign the next CA.
    upstream_pki(&dir);
    agent.kill9();
    agent.spawn();
    let (again, bundle_again) = first_svid(&agent).await;
    assert_eq!(
        again[1..],
        chain[1..],
        "the same CA and upstream chain after kill -9"
    );
    assert_eq!(bundle_again, bundle);
    webpki_verify(&again.concat(), &bundle_again.concat()).unwrap();
}

/// What a host last sent: its SVID chain and its bundle.
#[derive(Clone, Default)]
struct Latest {
    chain: Vec<u8>,
    bundle: Vec<u8>,
}

#[tokio::test]
async fn two_hosts_sharing_an_upstream_verify_each_other_across_ca_rotations() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = upstream_pki(&scratch.path().join("upstream"));
    let hosts = [
        host(&scratch.path().join("upstream")),
        host(&scratch.path().join("upstream")),
    ];
    for h in &hosts {
        let logs = h.logs();
        assert!(
            logs.contains("upstream authority"),
            "the upstream is announced at start:\n{logs}"
        );
    }
    // Every update of either host's X.509 stream goes into one channel.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = vec![];
    for (i, h) in hosts.iter().enumerate() {
        let mut client = h.client().await;
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = x509_stream(&mut client).await;
            while let Ok(Some(m)) = stream.message().await {
                let svid = &m.svids[0];
                let latest = Latest {
                    chain: svid.x509_svid.clone(),
                    bundle: svid.bundle.clone(),
                };
                if tx.send((i, latest)).is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let mut latest = [None::<Latest>, None];
    // The agent CAs each host signed with (the second certificate of its chains).
    let mut cas: [Vec<Vec<u8>>; 2] = [vec![], vec![]];
    let mut checks = 0;
    let mut openssl_checks = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cas.iter().any(|c| c.len() < 3) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((i, l))) = tokio::time::timeout(left, rx.recv()).await else {
            panic!(
                "no two CA rotations on both hosts within 30s (CAs seen: {}, {}):\nA:\n{}\nB:\n{}",
                cas[0].len(),
                cas[1].len(),
                hosts[0].logs(),
                hosts[1].logs()
            );
        };
        let certs = split_der(&l.chain);
        assert_eq!(
            certs.len(),
            3,
            "host {i}: the chain is leaf, agent CA, upstream intermediate"
        );
        assert_eq!(certs[2], pki.intermediate_der, "host {i}");
        assert_eq!(
            split_der(&l.bundle),
            vec![pki.root_der.clone()],
            "host {i}: the bundle is the upstream root"
        );
        if !cas[i].contains(&certs[1]) {
            cas[i].push(certs[1].clone());
        }
        latest[i] = Some(l);
        // Whoever just changed: each host's current SVID verifies under the other's bundle.
        if let [Some(a), Some(b)] = &latest {
            for (who, svid, by) in [("A", a, b), ("B", b, a)] {
                webpki_verify(&svid.chain, &by.bundle).unwrap_or_else(|e| {
                    panic!("{who}'s SVID does not verify under the other host's bundle: {e}")
                });
                if let Some(r) = openssl_verify(&svid.chain, &by.bundle, scratch.path()) {
                    r.unwrap_or_else(|e| panic!("openssl verify of {who}'s SVID: {e}"));
                    openssl_checks += 1;
                }
                checks += 1;
            }
        }
    }
    // The hosts' CAs are their own: the data dirs do not share keys.
    assert!(cas[0].iter().all(|c| !cas[1].contains(c)));
    assert!(checks >= 6, "only {checks} cross checks");
    eprintln!("{checks} cross-host verifications ({openssl_checks} also with openssl)");
    for t in tasks {
        t.abort();
    }
}

#[tokio::test]
async fn a_bad_upstream_stops_the_start_with_the_file_and_the_fix() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("upstream");
    upstream_pki(&dir);
    // The key of another CA.
    let other = KeyPair::generate().unwrap();
    fs::write(dir.join("ca.key"), other.serialize_pem()).unwrap();
    let agent_dir = scratch.path().join("agent");
    fs::create_dir_all(&agent_dir).unwrap();
    let config = agent_dir.join("spiffed.toml");
    fs::write(
        &config,
        spiffed_test_support::config_text(
            &agent_dir,
            &format!(
                "[upstream_authority.disk]\ncert_file_path = \"{0}/ca.crt\"\n\
                 key_file_path = \"{0}/ca.key\"\nbundle_file_path = \"{0}/root.crt\"\n",
                dir.display()
            ),
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstream_authority.disk.key_file_path")
            && err.contains("does not belong to the certificate"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Waits up to 5s for `agent`'s log to contain `what`.
fn log_shows(agent: &Agent, what: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if agent.logs().contains(what) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn sighup_checks_renewed_upstream_files() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("upstream");
    upstream_pki(&dir);
    let agent = host(&dir);
    // A botched renewal: the key of another CA. SIGHUP says so, naming the file and the fix.
    let good_key = fs::read(dir.join("ca.key")).unwrap();
    fs::write(
        dir.join("ca.key"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    agent.signal("HUP");
    assert!(
        log_shows(&agent, "the upstream authority files cannot be used"),
        "{}",
        agent.logs()
    );
    let logs = agent.logs();
    assert!(
        logs.contains("upstream_authority.disk.key_file_path")
            && logs.contains("does not belong to the certificate"),
        "{logs}"
    );
    // Fixed: the next SIGHUP confirms the next CA will be signed by them.
    fs::write(dir.join("ca.key"), good_key).unwrap();
    agent.signal("HUP");
    assert!(
        log_shows(&agent, "upstream authority files checked"),
        "{}",
        agent.logs()
    );
    assert!(!agent.logs().contains("panicked"));
}
