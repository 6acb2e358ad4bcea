//! Attestation from kernel facts: other uids, inherited connections.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use spiffed_test_support::Agent;

use crate::{agent_for_me, bin, peer_bin};

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

/// A uid that is neither root nor any agent's (setpriv tests).
const OTHER_UID: u32 = 65534;

/// `setpriv` to `uid` (same gid, no supplementary groups), ready for the program to run.
fn as_uid(uid: u32) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups");
    c
}

/// Runs `command` to the end and returns its stdout, trimmed.
fn stdout_of(command: &mut Command) -> String {
    let out = command.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A directory others may enter, holding a copy of `from` named `name`, mode 0755, owned by
/// `owner` (and the directory by root), with `extra` appended (a different file content).
fn copy_program(from: &Path, name: &str, owner: u32, extra: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let to = dir.path().join(name);
    fs::copy(from, &to).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(&to)
        .unwrap()
        .write_all(extra)
        .unwrap();
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&to, Some(owner), Some(owner)).unwrap();
    (dir, to)
}

fn sha256_hex(path: &Path) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, &fs::read(path).unwrap());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Issue 10 item 1: an unprivileged uid makes a user and mount namespace of its own
/// (`unshare -Urm`), bind-mounts its own program over a root-owned path P and runs P. The
/// kernel names its executable P, but the agent must not give it the identity of an entry
/// `unix:path:P`, nor of an entry for the digest of the real P; the real P run by the same uid
/// gets both.
#[test]
fn a_program_bind_mounted_over_a_registered_path_gets_no_identity() {
    assert_eq!(
        spiffed_test_support::my_uid(),
        0,
        "this test switches uid with setpriv and must run as root"
    );
    let (_real_dir, real) = copy_program(&peer_bin(), "webapp-rt", 0, b"");
    // The attacker's own program: the same peer tool, one byte longer (its own inode and digest).
    let (_own_dir, own) = copy_program(&peer_bin(), "mine", OTHER_UID, b"\n");
    let agent = Agent::start(
        &bin(),
        &format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/webapp\"\nselectors = [\"unix:path:{}\"]\n\
             [[entries]]\nspiffe_id = \"spiffe://example.org/webapp-sha\"\nselectors = [\"unix:sha256:{}\"]\n",
            real.display(),
            sha256_hex(&real)
        ),
    );
    let socket = agent.socket.display().to_string();

    // Control: the real program, run by the same uid, gets both identities.
    let got = stdout_of(
        as_uid(OTHER_UID)
            .arg(&real)
            .args(["inherit", &socket, "stay"]),
    );
    // Both, in entry-id order; config ids hash the selectors, which name a temp path here, so
    // the order is not fixed across runs.
    let mut ids: Vec<&str> = got.split(' ').collect();
    ids[1..].sort_unstable();
    assert_eq!(
        ids,
        [
            "OK",
            "spiffe://example.org/webapp",
            "spiffe://example.org/webapp-sha"
        ],
        "{}",
        agent.logs()
    );

    // The attack: inside its own namespaces the uid appears as root and may bind-mount.
    let script = format!(
        "mount --bind {own} {real} && exec {real} inherit {socket} stay",
        own = own.display(),
        real = real.display()
    );
    let got = stdout_of(as_uid(OTHER_UID).args(["unshare", "-Urm", "sh", "-c", &script]));
    assert_eq!(
        got,
        "ERR PermissionDenied no identity issued",
        "{}",
        agent.logs()
    );
    let logs = agent.logs();
    assert!(
        logs.contains("unix:path left out") && logs.contains("is not the file the process runs"),
        "{logs}"
    );

    // `explain` says why the path selector is missing. The agent sees the real uid, not the
    // namespace's root.
    let (_sleep_dir, sleep) = copy_program(Path::new("/bin/sleep"), "sleep", OTHER_UID, b"");
    let script = format!(
        "mount --bind {sleep} {real} && exec {real} 30",
        sleep = sleep.display(),
        real = real.display()
    );
    let mut spoof = as_uid(OTHER_UID)
        .args(["unshare", "-Urm", "sh", "-c", &script])
        .spawn()
        .unwrap();
    // setpriv, unshare and sh all exec: the pid ends up running `real` (as the namespace names it).
    let pid = spoof.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/exe")).ok().as_deref() != Some(real.as_path()) {
        assert!(
            Instant::now() < deadline,
            "the spoofed program did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = Command::new(bin())
        .args(["explain", "--pid", &pid.to_string(), "--output", "json"])
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .output()
        .unwrap();
    let _ = spoof.kill();
    let _ = spoof.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let explained: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(explained["uid"], OTHER_UID, "{explained}");
    assert_eq!(
        explained["identities"],
        serde_json::json!([]),
        "{explained}"
    );
    let left_out = explained["left_out"][0].as_str().unwrap_or_default();
    assert!(
        left_out.starts_with("unix:path: ")
            && left_out.contains("is not the file the process runs"),
        "{explained}"
    );
}

/// Issue 10 item 15: an agent that is not root cannot read `/proc/PID/exe` of other uids. An
/// entry with a `unix:path` selector must not cost callers of other uids the identities their
/// other entries give them; the agent warns at start-up that such entries cannot match them.
#[test]
fn a_non_root_agent_serves_uid_entries_next_to_path_entries() {
    const AGENT_UID: u32 = 65533;
    assert_eq!(
        spiffed_test_support::my_uid(),
        0,
        "this test switches uid with setpriv and must run as root"
    );
    let agent = Agent::start_as(
        &bin(),
        &format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/by-uid\"\nselectors = [\"unix:uid:{OTHER_UID}\"]\n\
             [[entries]]\nspiffe_id = \"spiffe://example.org/by-path\"\nselectors = [\"unix:path:{}\"]\n",
            bin().display()
        ),
        AGENT_UID,
    );
    let socket = agent.socket.display().to_string();
    for _ in 0..2 {
        let out = as_uid(OTHER_UID)
            .arg(bin())
            .args([
                "api", "fetch", "x509", "--output", "json", "--socket", &socket,
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.logs()
        );
        assert!(stdout.contains("spiffe://example.org/by-uid"), "{stdout}");
        // The path cannot be vouched for: that entry does not match.
        assert!(!stdout.contains("spiffe://example.org/by-path"), "{stdout}");
    }
    let logs = agent.logs();
    assert!(logs.contains("lacks CAP_SYS_PTRACE"), "{logs}");
    // Why the path was left out is logged once for the burst, not per call.
    assert_eq!(logs.matches("may not read /proc/").count(), 1, "{logs}");

    // An operator who adds such an entry over the admin socket is told as well.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let response = rt.block_on(async {
        let mut admin = spiffed_test_support::admin_client(&agent.admin_socket).await;
        let spec = |id: &str, selector: String| spiffed_proto::admin::EntrySpec {
            spiffe_id: format!("spiffe://example.org/{id}"),
            selectors: vec![selector],
            ..Default::default()
        };
        let by_uid = spec("uid-2", format!("unix:uid:{OTHER_UID}"));
        let by_sha = spec("sha", format!("unix:sha256:{}", "0".repeat(64)));
        let mut warnings = vec![];
        for entry in [by_uid, by_sha] {
            let request = spiffed_proto::admin::CreateEntriesRequest {
                entries: vec![entry],
            };
            let r = admin.create_entries(request).await.unwrap().into_inner();
            assert!(r.results[0].error.is_none(), "{r:?}");
            warnings.push(r.warnings);
        }
        warnings
    });
    assert!(response[0].is_empty(), "{response:?}");
    assert_eq!(response[1].len(), 1, "{response:?}");
    assert!(response[1][0].contains("CAP_SYS_PTRACE"), "{response:?}");
}
