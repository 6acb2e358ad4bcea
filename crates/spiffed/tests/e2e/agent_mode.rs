//! Agent mode against a real spire-server v1.13.3 (built and cached by tests/spire/build.sh and
//! started by `spiffed_test_support::spire`): spiffed attests as a node, syncs its entries,
//! serves SVIDs the server signs, and keeps serving through the faults spire-agent does not
//! survive. Must run as root (it switches uid with `setpriv` for a caller with no identity).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use spiffed_test_support::spire::{
    AgentAttestation, AuthorityKind, BundleFormat, EntrySpec, NodeCert, ServerOptions, SpireAgent,
    SpireServer,
};
use spiffed_test_support::{Agent, my_uid, raw_client, with_header, x509_stream};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{bin, split_der};

const TD: &str = "example.org";

fn id(path: &str) -> String {
    format!("spiffe://{TD}/{path}")
}

/// How the spiffed node attests.
pub(crate) enum Attest<'a> {
    /// `join_token` in the config file.
    Token(&'a str),
    /// No token in the file (the stored agent state, or `--join-token`, supplies it).
    NoToken,
    /// x509pop with this node certificate.
    Pop(&'a NodeCert),
}

/// A spiffed in agent mode against `server`, with the server's bundle as the bootstrap bundle
/// (written next to the config), and `extra` top-level config lines.
pub(crate) fn node(server: &SpireServer, attest: Attest<'_>, extra: &str) -> Agent {
    let boot = tempfile::Builder::new()
        .prefix("spiffed-boot-")
        .tempdir()
        .unwrap()
        .keep();
    let bundle = boot.join("bootstrap.pem");
    server.write_bundle(&bundle, BundleFormat::Pem);
    let attestation = match attest {
        Attest::Token(t) => format!("join_token = \"{t}\"\n"),
        Attest::NoToken => String::new(),
        Attest::Pop(cert) => format!(
            "[spire_server.x509pop]\ncertificate_path = \"{}\"\nprivate_key_path = \"{}\"\n",
            cert.cert_path.display(),
            cert.key_path.display()
        ),
    };
    Agent::start(
        &bin(),
        &format!(
            "{extra}\n[spire_server]\naddress = \"{}\"\ntrust_bundle_path = \"{}\"\nsync_interval = \"1s\"\n{attestation}",
            server.address(),
            bundle.display()
        ),
    )
}

/// `spiffed healthcheck --output json` against the node.
pub(crate) fn health(agent: &Agent) -> (bool, Value) {
    let out = Command::new(bin())
        .args([
            "healthcheck",
            "--output",
            "json",
            "--timeout",
            "5s",
            "--socket",
        ])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "healthcheck printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), json)
}

/// Polls `f` every 200 ms until it gives `Some`, or panics after `secs` seconds with `what`
/// and the node's log.
fn wait<T>(agent: &Agent, secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {secs}s; spiffed log:\n{}",
            tail(&agent.logs(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The readiness the node reports, with its reason.
fn readiness(agent: &Agent) -> (String, String) {
    let (_, j) = health(agent);
    (
        j["readiness"].as_str().unwrap_or_default().to_owned(),
        j["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The X.509-SVIDs the node gives this process now: (SPIFFE ID, hint, chain DER, bundle DER).
pub(crate) async fn x509(
    socket: &Path,
) -> Result<Vec<(String, String, Vec<u8>, Vec<u8>)>, tonic::Status> {
    let mut c = raw_client(socket).await;
    let mut s = c
        .fetch_x509svid(with_header(spiffed_proto::workload::X509svidRequest {}))
        .await?
        .into_inner();
    let m = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no first message within 10s"))??
        .ok_or_else(|| tonic::Status::unknown("stream ended"))?;
    Ok(m.svids
        .into_iter()
        .map(|s| (s.spiffe_id, s.hint, s.x509_svid, s.bundle))
        .collect())
}

pub(crate) fn ids_of(svids: &[(String, String, Vec<u8>, Vec<u8>)]) -> Vec<String> {
    svids.iter().map(|s| s.0.clone()).collect()
}

/// Waits until the node gives this process exactly `want` (in this order).
pub(crate) async fn wait_ids(
    agent: &Agent,
    want: &[String],
) -> Vec<(String, String, Vec<u8>, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = x509(&agent.socket).await;
        if let Ok(svids) = &got
            && ids_of(svids) == want
        {
            return got.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "node never gave {want:?}; last answer {:?}; log:\n{}",
            got.map(|s| ids_of(&s)),
            tail(&agent.logs(), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The server's X.509 authorities, DER.
fn server_roots(server: &SpireServer) -> Vec<Vec<u8>> {
    pem_certs(&server.bundle_pem())
}

pub(crate) fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    pem.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|b| {
            let body: String = b
                .split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap()
        })
        .collect()
}

/// Whether the chain's leaf is signed by one of `roots` (directly, or through the chain's
/// intermediates) and valid now.
pub(crate) fn chains_to(chain: &[u8], roots: &[Vec<u8>]) -> bool {
    let certs = split_der(chain);
    let parsed: Vec<X509Certificate<'_>> = certs
        .iter()
        .map(|c| X509Certificate::from_der(c).unwrap().1)
        .collect();
    let roots: Vec<X509Certificate<'_>> = roots
        .iter()
        .map(|c| X509Certificate::from_der(c).unwrap().1)
        .collect();
    if !parsed[0].validity().is_valid() {
        return false;
    }
    let top = parsed.last().unwrap();
    let links_ok = parsed
        .windows(2)
        .all(|w| w[0].verify_signature(Some(w[1].public_key())).is_ok());
    links_ok
        && roots
            .iter()
            .any(|r| top.verify_signature(Some(r.public_key())).is_ok())
}

pub(crate) fn serial(chain: &[u8]) -> String {
    let certs = split_der(chain);
    X509Certificate::from_der(&certs[0])
        .unwrap()
        .1
        .raw_serial_as_string()
}

/// Runs the spiffed CLI and returns (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn admin(agent: &Agent, args: &[&str]) -> (bool, String, String) {
    let sock = agent.admin_socket.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--admin-socket", &sock]);
    cli(&all)
}

/// Join token: attest, serve the server's entries for this uid (ordered by entry ID, with
/// hints), JWT-SVIDs the server signs that validate through the node, the status reported,
/// the entry admin commands read-only; a restart needs no new token.
#[tokio::test]
async fn join_token_node_serves_the_servers_entries_and_restarts_without_a_token() {
    let server = SpireServer::start(ServerOptions::default());
    let token = server.generate_token(None, None);
    let agent_id = server.join_token_agent_id(&token);
    let mut agent = node(&server, Attest::Token(&token), "");
    let uid = my_uid();
    let sel = format!("unix:uid:{uid}");
    // Entry IDs chosen so that their order differs from the creation order: the default
    // identity is the one with the smallest entry ID, as spire-agent orders them.
    let mut b = EntrySpec::workload(&agent_id, &id("web-b"), &[&sel]);
    b.entry_id = Some("bbbb-entry".into());
    b.hint = Some("backend".into());
    server.entry_create(&b);
    let mut a = EntrySpec::workload(&agent_id, &id("web-a"), &[&sel]);
    a.entry_id = Some("aaaa-entry".into());
    a.hint = Some("frontend".into());
    server.entry_create(&a);
    server.entry_create(&EntrySpec::workload(
        &agent_id,
        &id("not-me"),
        &["unix:uid:4242"],
    ));

    let svids = wait_ids(&agent, &[id("web-a"), id("web-b")]).await;
    let roots = server_roots(&server);
    for (sid, _, chain, bundle) in &svids {
        assert!(
            chains_to(chain, &roots),
            "{sid} does not chain to the server's CA"
        );
        assert_eq!(split_der(bundle), roots, "the bundle is the server's");
    }
    assert_eq!(
        svids.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
        ["frontend", "backend"]
    );

    // JWT-SVIDs: signed by the server, validated by the node against the server's keys.
    let (ok, out, err) = cli(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "db",
        "--output",
        "json",
        "--socket",
        &agent.socket.display().to_string(),
    ]);
    assert!(ok, "{out}{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    let token0 = j["svids"][0]["token"].as_str().unwrap().to_owned();
    assert_eq!(j["svids"][0]["spiffe_id"], id("web-a"));
    let (ok, out, err) = cli(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "db",
        "--socket",
        &agent.socket.display().to_string(),
        &token0,
    ]);
    assert!(ok, "{out}{err}");

    // Status: agent mode, serving, attested as the token's agent ID.
    let (ok, j) = health(&agent);
    assert!(ok, "{j}");
    assert_eq!(j["mode"], "agent");
    assert_eq!(j["readiness"], "serving", "{j}");
    assert_eq!(j["agent_id"], agent_id.as_str());

    // Entries are the server's: listed and explained here, changed there.
    let (ok, out, err) = admin(&agent, &["entry", "list", "--output", "json"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("aaaa-entry") && out.contains(&id("not-me")),
        "{out}"
    );
    let (ok, out, err) = admin(
        &agent,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &id("local"),
            "--selector",
            &sel,
        ],
    );
    assert!(!ok, "creating an entry in agent mode must fail: {out}");
    assert!(err.contains("SPIRE Server"), "{err}");
    // `explain` works on the synced entries: a process of this uid gets both identities, in
    // entry ID order, each from the spire-server source.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let (ok, out, err) = admin(
        &agent,
        &[
            "explain",
            "--pid",
            &sleeper.id().to_string(),
            "--output",
            "json",
        ],
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(ok, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["identities"],
        serde_json::json!([id("web-a"), id("web-b")])
    );
    assert_eq!(v["entries"][0]["entry"]["source"], "spire-server", "{out}");

    // A restart loads the stored agent SVID: the used token is not presented again (the
    // server would refuse it), and the server still knows one agent.
    agent.stop();
    agent.spawn();
    wait_ids(&agent, &[id("web-a"), id("web-b")]).await;
    let agents = server.agent_list();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert!(
        !agent.logs().contains("already been used"),
        "{}",
        tail(&agent.logs(), 30)
    );
}

/// Without a token and without stored state the node serves nothing and says how to attest;
/// `--join-token` then attests it.
#[tokio::test]
async fn a_node_without_a_token_says_so_and_the_flag_attests_it() {
    let server = SpireServer::start(ServerOptions::default());
    let mut agent = node(&server, Attest::NoToken, "");
    let reason = wait(&agent, 30, "not_serving without a token", || {
        let (r, why) = readiness(&agent);
        (r == "not_serving" && why.contains("--join-token")).then_some(why)
    });
    assert!(reason.contains("token generate"), "{reason}");
    let token = server.generate_token(None, None);
    let sel = format!("unix:uid:{}", my_uid());
    server.entry_create(&EntrySpec::workload(
        &server.join_token_agent_id(&token),
        &id("flagged"),
        &[&sel],
    ));
    agent.stop();
    agent.spawn_with_args(&["--join-token", &token]);
    wait_ids(&agent, &[id("flagged")]).await;
}

/// x509pop: the node certificate proves the node; entries parented to its agent ID are served.
#[tokio::test]
async fn x509pop_node_attests_and_serves() {
    let server = SpireServer::start(ServerOptions::default());
    let cert = server.x509pop_node_cert("node1.example.org");
    let agent = node(&server, Attest::Pop(&cert), "");
    let sel = format!("unix:uid:{}", my_uid());
    server.entry_create(&EntrySpec::workload(&cert.agent_id, &id("pop"), &[&sel]));
    wait_ids(&agent, &[id("pop")]).await;
    let (_, j) = health(&agent);
    assert_eq!(j["agent_id"], cert.agent_id.as_str(), "{j}");
}

/// Differential: spire-agent and spiffed on the same server, each with the same entries
/// parented to it, give this process the same SPIFFE IDs in the same order, the same hints and
/// the same bundle; each one's SVIDs verify against the other's bundle.
#[tokio::test]
async fn spiffed_and_spire_agent_answer_alike() {
    let server = SpireServer::start(ServerOptions::default());
    let t1 = server.generate_token(None, None);
    let t2 = server.generate_token(None, None);
    let ours = node(&server, Attest::Token(&t1), "");
    let theirs = SpireAgent::start(&server, AgentAttestation::JoinToken(t2.clone()));
    let sel = format!("unix:uid:{}", my_uid());
    for (parent, tag) in [
        (server.join_token_agent_id(&t1), "s"),
        (server.join_token_agent_id(&t2), "r"),
    ] {
        for (name, hint) in [("alpha", Some("h1")), ("beta", None), ("gamma", Some("h3"))] {
            let mut e = EntrySpec::workload(&parent, &id(&format!("diff/{name}")), &[&sel]);
            e.entry_id = Some(format!("{name}-{tag}"));
            e.hint = hint.map(str::to_owned);
            server.entry_create(&e);
        }
    }
    let want = [id("diff/alpha"), id("diff/beta"), id("diff/gamma")];
    let a = wait_ids(&ours, &want).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let b = loop {
        match x509(theirs.socket_path()).await {
            Ok(s) if ids_of(&s) == want => break s,
            other => assert!(
                Instant::now() < deadline,
                "spire-agent never gave {want:?}: {:?}",
                other.map(|s| ids_of(&s))
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.0, &x.1), (&y.0, &y.1), "same ID and hint");
        assert_eq!(split_der(&x.3), split_der(&y.3), "same bundle");
        assert!(
            chains_to(&x.2, &split_der(&y.3)),
            "ours verifies with theirs"
        );
        assert!(
            chains_to(&y.2, &split_der(&x.3)),
            "theirs verifies with ours"
        );
    }
}

/// Faults: the server dies while a workload holds a stream (it keeps its SVID and gets new
/// ones when the server returns); spiffed restarted while the server is down serves its cached
/// SVIDs at once and says so; an entry deleted on the server leaves the workload's stream.
#[tokio::test]
async fn server_outages_keep_workloads_served() {
    let mut server = SpireServer::start(ServerOptions::default());
    let token = server.generate_token(None, None);
    let agent_id = server.join_token_agent_id(&token);
    let mut agent = node(&server, Attest::Token(&token), "");
    let sel = format!("unix:uid:{}", my_uid());
    let mut short = EntrySpec::workload(&agent_id, &id("short"), &[&sel]);
    short.x509_svid_ttl = Some(20);
    short.entry_id = Some("a-short".into());
    server.entry_create(&short);
    let mut other = EntrySpec::workload(&agent_id, &id("other"), &[&sel]);
    other.entry_id = Some("b-other".into());
    let other_id = server.entry_create(&other);
    wait_ids(&agent, &[id("short"), id("other")]).await;

    let mut client = raw_client(&agent.socket).await;
    let mut stream = x509_stream(&mut client).await;
    let first = stream.message().await.unwrap().unwrap();
    let first_serial = serial(&first.svids[0].x509_svid);

    server.kill();
    let (r, reason) = wait(&agent, 30, "readiness serving_from_cache", || {
        let r = readiness(&agent);
        (r.0 == "serving_from_cache").then_some(r)
    });
    assert_eq!(r, "serving_from_cache");
    assert!(!reason.is_empty());
    // New connections are still served from the cache.
    assert_eq!(
        ids_of(&x509(&agent.socket).await.unwrap()),
        [id("short"), id("other")]
    );

    // Restart spiffed with the server still down: the cached SVIDs are served at once.
    agent.stop();
    agent.spawn();
    let svids = x509(&agent.socket).await.expect("served from the cache");
    assert_eq!(ids_of(&svids), [id("short"), id("other")]);
    let (ok, j) = health(&agent);
    assert!(ok, "serving from the cache is serving: {j}");
    assert_eq!(j["readiness"], "serving_from_cache", "{j}");

    // The server returns: the node syncs again, and the short-lived SVID is rotated (the
    // stream opened before the restart ended with the old process; open a new one).
    server.restart();
    wait(&agent, 30, "readiness serving", || {
        (readiness(&agent).0 == "serving").then_some(())
    });
    let mut client = raw_client(&agent.socket).await;
    let mut stream = x509_stream(&mut client).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let m = tokio::time::timeout(Duration::from_secs(40), stream.message())
            .await
            .expect("a message")
            .unwrap()
            .unwrap();
        if serial(&m.svids[0].x509_svid) != first_serial {
            break;
        }
        assert!(Instant::now() < deadline, "the SVID was never rotated");
    }

    // An entry deleted on the server leaves the stream on a following sync.
    server.entry_delete(&other_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a message")
            .unwrap()
            .unwrap();
        if m.svids.iter().all(|s| s.spiffe_id != id("other")) {
            assert_eq!(m.svids.len(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "the deleted entry stayed");
    }
}

/// Federation: a trust domain the server holds a bundle for, named in `federates_with` of one
/// entry, reaches the workload of that entry (and not another's), from `GetFederatedBundle`.
#[tokio::test]
async fn federated_bundles_reach_the_workloads_whose_entries_federate() {
    let server = SpireServer::start(ServerOptions::default());
    let partner = SpireServer::start(ServerOptions {
        trust_domain: "partner.org".into(),
        ..ServerOptions::default()
    });
    server.bundle_set("partner.org", &partner.bundle_pem(), BundleFormat::Pem);
    let token = server.generate_token(None, None);
    let agent_id = server.join_token_agent_id(&token);
    let agent = node(&server, Attest::Token(&token), "");
    let me = format!("unix:uid:{}", my_uid());
    let mut fed = EntrySpec::workload(&agent_id, &id("federating"), &[&me]);
    fed.federates_with = vec!["partner.org".into()];
    server.entry_create(&fed);
    server.entry_create(&EntrySpec::workload(
        &agent_id,
        &id("plain"),
        &["unix:uid:65534"],
    ));
    wait_ids(&agent, &[id("federating")]).await;
    let partner_roots = pem_certs(&partner.bundle_pem());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = raw_client(&agent.socket).await;
        let m = x509_stream(&mut c).await.message().await.unwrap().unwrap();
        if let Some(b) = m.federated_bundles.get("spiffe://partner.org") {
            assert_eq!(split_der(b), partner_roots);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no partner.org bundle: {:?}; log:\n{}",
            m.federated_bundles.keys().collect::<Vec<_>>(),
            tail(&agent.logs(), 30)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A caller whose entry does not federate gets no federated bundle.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .args(["api", "fetch", "x509", "--output", "json", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&id("plain")), "{text}");
    assert!(!text.contains("partner.org"), "{text}");
}

/// A banned node stops handing out identities, keeps running, and says why.
#[tokio::test]
async fn a_banned_node_stops_serving_identities_and_says_why() {
    let server = SpireServer::start(ServerOptions::default());
    let token = server.generate_token(None, None);
    let agent_id = server.join_token_agent_id(&token);
    let agent = node(&server, Attest::Token(&token), "");
    let sel = format!("unix:uid:{}", my_uid());
    server.entry_create(&EntrySpec::workload(&agent_id, &id("banned"), &[&sel]));
    wait_ids(&agent, &[id("banned")]).await;
    server.agent_ban(&agent_id);
    let reason = wait(&agent, 30, "not_serving after the ban", || {
        let (r, why) = readiness(&agent);
        (r == "not_serving").then_some(why)
    });
    assert!(reason.contains("banned"), "{reason}");
    // Unavailable, as for any identity the agent cannot hand out now: clients retry, and the
    // node serves again once the operator evicts the ban and it re-attests.
    let err = x509(&agent.socket).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("banned"), "{err:?}");
    let (ok, j) = health(&agent);
    assert!(!ok, "a banned node is not healthy: {j}");
}

/// The server's CA rotates (prepare, activate) and the old CA is tainted: the workload gets
/// SVIDs from the new CA with no moment without a valid one.
#[tokio::test]
async fn ca_rotation_and_a_tainted_authority_reach_workloads() {
    let server = SpireServer::start(ServerOptions::default());
    let token = server.generate_token(None, None);
    let agent_id = server.join_token_agent_id(&token);
    let agent = node(&server, Attest::Token(&token), "");
    let sel = format!("unix:uid:{}", my_uid());
    server.entry_create(&EntrySpec::workload(&agent_id, &id("rot"), &[&sel]));
    wait_ids(&agent, &[id("rot")]).await;
    let mut client = raw_client(&agent.socket).await;
    let mut stream = x509_stream(&mut client).await;
    let m = stream.message().await.unwrap().unwrap();
    let old_roots = split_der(&m.svids[0].bundle);
    assert_eq!(old_roots.len(), 1);

    let prepared = server.authority_prepare(AuthorityKind::X509);
    // The prepared CA reaches the bundle before it signs anything.
    let m = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the bundle with the prepared CA")
        .unwrap()
        .unwrap();
    assert_eq!(split_der(&m.svids[0].bundle).len(), 2);
    let old = server.authority_show(AuthorityKind::X509).active.unwrap();
    server.authority_activate(AuthorityKind::X509, &prepared.authority_id);
    server.authority_taint(AuthorityKind::X509, &old.authority_id);
    // Every message is valid on arrival; eventually the SVID comes from the new CA.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let m = tokio::time::timeout(Duration::from_secs(40), stream.message())
            .await
            .expect("a new SVID after the taint")
            .unwrap()
            .unwrap();
        let chain = &m.svids[0].x509_svid;
        let roots = split_der(&m.svids[0].bundle);
        assert!(chains_to(chain, &roots), "an SVID its own bundle rejects");
        if !chains_to(chain, &old_roots) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the SVID still chains to the tainted CA"
        );
    }
}

/// Bad answers from the server side are errors with a message, never a crash: a server of
/// another trust domain, a bootstrap bundle that does not verify the server, a used and an
/// expired join token.
#[tokio::test]
async fn bad_server_side_input_is_reported_not_fatal() {
    let server = SpireServer::start(ServerOptions::default());
    let other = SpireServer::start(ServerOptions::default());

    let expect_reason = |agent: &Agent, words: &[&str]| {
        let reason = wait(agent, 30, "a not_serving reason", || {
            let (r, why) = readiness(agent);
            (r == "not_serving" && words.iter().any(|w| why.contains(w))).then_some(why)
        });
        assert!(
            agent.logs().contains(words[0]) || words.iter().any(|w| agent.logs().contains(w)),
            "the log names the problem too: {}",
            tail(&agent.logs(), 20)
        );
        eprintln!("reported: {reason}");
        reason
    };

    // The server's SVID names spiffe://example.org/spire/server; this node expects other.org.
    // With the server's bundle as the bootstrap, the mistake is found at start (the bundle's CA
    // names example.org) and the start fails with the fix; with insecure_bootstrap it is found
    // at runtime, from the server's SVID, and reported.
    let token = server.generate_token(None, None);
    {
        let boot = tempfile::tempdir().unwrap();
        let bundle = boot.path().join("b.pem");
        server.write_bundle(&bundle, BundleFormat::Pem);
        let config = boot.path().join("spiffed.toml");
        std::fs::write(
            &config,
            spiffed_test_support::config_text(
                boot.path(),
                &format!(
                    "[spire_server]\naddress = \"{}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{token}\"\n",
                    server.address(),
                    bundle.display()
                ),
            )
            .replace("trust_domain = \"example.org\"", "trust_domain = \"other.org\""),
        )
        .unwrap();
        let out = std::process::Command::new(bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("belongs to trust domain example.org")
                && err.contains("spire-server bundle show"),
            "{err}"
        );
    }
    let wrong_td = start_with_td(
        &format!(
            "[spire_server]\naddress = \"{}\"\ninsecure_bootstrap = true\njoin_token = \"{token}\"\n",
            server.address(),
        ),
        "other.org",
    );
    expect_reason(&wrong_td, &["spiffe://other.org/spire/server"]);

    // The bootstrap bundle is another server's: the chain does not verify.
    let token = server.generate_token(None, None);
    let boot = tempfile::tempdir().unwrap().keep();
    let bundle = boot.join("b.pem");
    other.write_bundle(&bundle, BundleFormat::Pem);
    let bad_bundle = Agent::start(
        &bin(),
        &format!(
            "[spire_server]\naddress = \"{}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{token}\"\n",
            server.address(),
            bundle.display()
        ),
    );
    expect_reason(&bad_bundle, &["bootstrap bundle"]);

    // A token used by another node already.
    let token = server.generate_token(None, None);
    let _first = node(&server, Attest::Token(&token), "");
    wait(&_first, 30, "the first node attested", || {
        (readiness(&_first).0 != "not_serving" || health(&_first).1["agent_id"] != "").then_some(())
    });
    let second = node(&server, Attest::Token(&token), "");
    let reason = expect_reason(&second, &["already been used", "does not exist"]);
    assert!(
        reason.contains("--join-token"),
        "the fix is named: {reason}"
    );

    // An expired token.
    let token = server.generate_token(None, Some(1));
    std::thread::sleep(Duration::from_secs(2));
    let expired = node(&server, Attest::Token(&token), "");
    expect_reason(&expired, &["expired", "does not exist"]);
}

/// A node for trust domain `td` (the config's other lines from `extra`).
fn start_with_td(extra: &str, td: &str) -> Agent {
    Agent::start_raw(&bin(), |dir| {
        spiffed_test_support::config_text(dir, extra).replace(
            "trust_domain = \"example.org\"",
            &format!("trust_domain = \"{td}\""),
        )
    })
}

/// The foreign clients' interop suite (tests/interop/run.sh) against spiffed in agent mode.
#[test]
fn foreign_clients_pass_against_agent_mode() {
    let server = SpireServer::start(ServerOptions::default());
    let token = server.generate_token(None, None);
    let agent_id = server.join_token_agent_id(&token);
    let agent = node(&server, Attest::Token(&token), "");
    let mut e = EntrySpec::workload(
        &agent_id,
        "spiffe://example.org/interop",
        &[&format!("unix:uid:{}", my_uid())],
    );
    e.x509_svid_ttl = Some(6);
    e.jwt_svid_ttl = Some(6);
    server.entry_create(&e);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_ids(
        &agent,
        &["spiffe://example.org/interop".to_owned()],
    ));
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("tests/interop/run.sh"))
        .env("SPIFFED_BIN", bin())
        .env("SPIFFED_INTEROP_SOCKET", &agent.socket)
        .env("SPIFFED_INTEROP_AGENT_LOG", &agent.log)
        .env("SPIFFED_INTEROP_MODE", "agent mode, SPIRE Server v1.13.3")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::write(bin().with_file_name("interop-matrix-agent-mode.txt"), &text);
    assert!(
        out.status.success(),
        "interop suite (agent mode) failed:\n{text}"
    );
    assert!(text.contains(" 0 failed"), "{text}");
}
