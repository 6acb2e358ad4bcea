//! Attestation from kernel facts: other uids, inherited connections.

use std::process::Command;

use crate::{agent_for_me, peer_bin};

/// Runs `spiffed api fetch x509` as uid/gid 65534 (needs root, as CI has).
#[test]
fn another_uid_gets_no_identity_through_the_cli() {
    assert_eq!(
        spiffed_test_support::my_uid(),
        0,
        "this test switches uid with setpriv and must run as root"
    );
    let agent = agent_for_me("");
    let socket = agent.socket.display().to_string();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(crate::bin())
        .args(["api", "fetch", "x509", "--socket", &socket])
        .output()
        .expect("setpriv (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("no identity issued"), "stderr: {stderr}");
    // The same command as ourselves succeeds.
    let out = Command::new(crate::bin())
        .args(["api", "fetch", "x509", "--socket", &socket])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/web"));
}

fn run_peer(socket: &str, mode: &str) -> String {
    use std::io::Read;
    let mut parent = Command::new(peer_bin())
        .args(["inherit", socket, mode])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = parent.stdout.take().unwrap();
    // Reap the parent first: in `exit` mode the child waits until the parent's pid is gone
    // before it uses the inherited connection.
    assert!(parent.wait().unwrap().success());
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    out.trim().to_owned()
}

#[test]
fn inherited_connection_gets_no_identity_once_its_opener_exits() {
    let agent = agent_for_me("");
    let socket = agent.socket.display().to_string();
    // Control: while the process that connected is alive, its connection is attested to it.
    assert_eq!(run_peer(&socket, "stay"), "OK spiffe://example.org/web");
    // The opener exits; the child that inherited the connection must not get its identity.
    let got = run_peer(&socket, "exit");
    assert!(
        got.starts_with("ERR Unavailable workload attestation failed"),
        "got {got:?}\n{}",
        agent.logs()
    );
    assert!(got.contains("is gone"), "{got}");
}
