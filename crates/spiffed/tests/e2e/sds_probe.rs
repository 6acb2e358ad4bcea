//! SDS side by side: spire-agent v1.13.3 and spiffed attached to the same real spire-server,
//! each with the same entries for this uid, asked the same things by a foreign SDS client (the
//! go-control-plane probe in tests/interop/sds, built by its run.sh into the interop cache); the
//! normalised answers must be the same line for line. Must run as root, like the other
//! agent-mode tests; fails (never skips) when Go is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use spiffed_test_support::my_uid;
use spiffed_test_support::spire::{
    AgentAttestation, EntrySpec, ServerOptions, SpireAgent, SpireServer, fetch_x509_ids,
};

use crate::agent_mode::{Attest, node, tail, wait_ids};
use crate::bin;

/// The rotation phase's identity lives this long (seconds): both agents renew it at about half
/// of that, so the probe sees two rotations in well under its minute per rotation.
const ROTATING_TTL: u64 = 10;

fn sds_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/sds/run.sh")
}

/// Builds the probe into `dir` (as `sds-probe` and `sds-probe-rotate`); panics with the
/// script's output when it cannot (no Go, no module proxy on a cold cache).
fn build_probe(dir: &Path) {
    let out = Command::new("bash")
        .arg(sds_script())
        .arg("build")
        .arg(dir)
        .output()
        .expect("bash runs tests/interop/sds/run.sh");
    assert!(
        out.status.success(),
        "building the SDS probe failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sds_answers_match_spire_agent() {
    let probes = tempfile::Builder::new()
        .prefix("spiffed-sds-probe-")
        .tempdir()
        .unwrap();
    let dir = probes.path().canonicalize().unwrap();
    build_probe(&dir);
    let rotate_path = dir.join("sds-probe-rotate");

    let server = SpireServer::start(ServerOptions::default());
    let t1 = server.generate_token(None, None);
    let t2 = server.generate_token(None, None);
    let ours = node(&server, Attest::Token(&t1), "");
    let theirs = SpireAgent::start(&server, AgentAttestation::JoinToken(t2.clone()));
    let uid = format!("unix:uid:{}", my_uid());
    let path = format!("unix:path:{}", rotate_path.display());
    for (parent, tag) in [
        (server.join_token_agent_id(&t1), "spiffed"),
        (server.join_token_agent_id(&t2), "spire"),
    ] {
        // Entry IDs order the identities: the rotating one is the default identity of the
        // probe's second copy; `sds/a` is the default of the first, `sds/b` its second.
        let mut rot = EntrySpec::workload(&parent, "spiffe://example.org/sds/rot", &[&uid, &path]);
        rot.entry_id = Some(format!("sds-1-rot-{tag}"));
        rot.x509_svid_ttl = Some(ROTATING_TTL);
        server.entry_create(&rot);
        for name in ["a", "b"] {
            let mut e = EntrySpec::workload(
                &parent,
                &format!("spiffe://example.org/sds/{name}"),
                &[&uid],
            );
            e.entry_id = Some(format!("sds-2-{name}-{tag}"));
            server.entry_create(&e);
        }
    }
    let want = [
        "spiffe://example.org/sds/a".to_owned(),
        "spiffe://example.org/sds/b".to_owned(),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_ids(&ours, &want));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = fetch_x509_ids(theirs.socket_path());
        if matches!(&got, Ok(ids) if ids == &want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spire-agent never gave {want:?}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let out = Command::new("bash")
        .arg(sds_script())
        .arg("compare")
        .arg(&dir)
        .arg("spire-agent v1.13.3")
        .arg(theirs.socket_path())
        .arg("spiffed")
        .arg(&ours.socket)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::write(bin().with_file_name("interop-sds.txt"), &text);
    assert!(
        out.status.success() && text.contains("sds: 2 passed, 0 failed"),
        "spiffed's SDS answers differ from spire-agent's:\n{text}\n--- spiffed log\n{}\n--- spire-agent log\n{}",
        tail(&ours.logs(), 40),
        tail(&theirs.logs(), 40)
    );
}
