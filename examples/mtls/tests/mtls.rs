//! End to end: spiffed issues SVIDs to a server (uid 1001), a client (uid 1002) and an intruder
//! (uid 1003); the client talks mTLS to the server across several SVID rotations, the intruder is
//! refused. Must run as root (it switches uid with `setpriv`), as CI does.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SERVER_ID: &str = "spiffe://example.org/server";
const CLIENT_ID: &str = "spiffe://example.org/client";
const INTRUDER_ID: &str = "spiffe://example.org/intruder";

/// Kills (SIGKILL) and reaps a child when dropped, so a failing assertion leaves nothing behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The spiffed binary: `SPIFFED_BIN`, else the one `cargo test --workspace` built next to this
/// test (`<target>/debug/deps/mtls-*` -> `<target>/debug/spiffed`), else
/// `$CARGO_TARGET_DIR/debug/spiffed`, else the workspace's `target/debug/spiffed`.
fn spiffed_bin() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates: Vec<PathBuf> = if let Some(bin) = std::env::var_os("SPIFFED_BIN") {
        vec![bin.into()]
    } else {
        let mut c = Vec::new();
        if let Some(debug) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent()?.parent().map(Path::to_path_buf))
        {
            c.push(debug.join("spiffed"));
        }
        if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
            c.push(manifest.join(dir).join("debug/spiffed"));
        }
        c.push(manifest.join("../../target/debug/spiffed"));
        c
    };
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "spiffed binary not found (looked at {candidates:?}): build it first with \
             `cargo build -p spiffed` in the repository root, or set SPIFFED_BIN"
            )
        })
}

/// Whether a process of another uid can execute `path`: every directory on the way must be
/// searchable by others, and the file readable and executable by others.
fn others_can_run(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    let file_ok = fs::metadata(&path).is_ok_and(|m| m.mode() & 0o005 == 0o005);
    file_ok
        && path
            .ancestors()
            .skip(1)
            .all(|dir| fs::metadata(dir).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// A binary the workload uids can run: in place when they can reach it, else a copy in `dir`.
fn runnable_by_others(bin: &Path, dir: &Path) -> PathBuf {
    if others_can_run(bin) {
        return bin.to_owned();
    }
    let copy = dir.join(bin.file_name().expect("binary has a name"));
    fs::copy(bin, &copy).expect("copy binary");
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod binary");
    eprintln!(
        "{} is not reachable by other uids; using a copy at {}",
        bin.display(),
        copy.display()
    );
    copy
}

/// `setpriv` to `uid` (gid = uid, no supplementary groups), then `bin args...`.
fn as_uid(uid: u32, bin: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(bin)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .stdin(Stdio::null());
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Everything lives in one temp dir that other uids may traverse (the socket is 0777).
fn workdir() -> tempfile::TempDir {
    assert_eq!(
        fs::metadata("/proc/self").expect("procfs").uid(),
        0,
        "this test switches uid with setpriv and must run as root"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
    dir
}

/// Starts `spiffed run --config CONFIG [args]` logging to `log`, and waits for its socket.
fn start_spiffed(config: &Path, args: &[&str], socket: &Path, log: &Path) -> Reaped {
    let agent = Reaped(
        Command::new(spiffed_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).expect("log file"))
            .spawn()
            .expect("start spiffed"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "spiffed did not serve within 15s:\n{}",
            read(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent
}

#[test]
fn mtls_between_two_uids_survives_rotation_and_refuses_a_third() {
    let started = Instant::now();
    let dir = workdir();
    let socket = dir.path().join("api.sock");
    let config = dir.path().join("spiffed.toml");
    fs::write(
        &config,
        format!(
            r#"trust_domain = "example.org"
socket_path = "{socket}"
socket_mode = "0777"
admin_socket_path = "{admin}"
data_dir = "{data}"
x509_svid_ttl = "4s"
min_svid_ttl = "1s"
ca_ttl = "1h"
log_level = "debug"

[[entries]]
spiffe_id = "{SERVER_ID}"
selectors = ["unix:uid:1001"]

[[entries]]
spiffe_id = "{CLIENT_ID}"
selectors = ["unix:uid:1002"]

[[entries]]
spiffe_id = "{INTRUDER_ID}"
selectors = ["unix:uid:1003"]
"#,
            socket = socket.display(),
            admin = dir.path().join("admin/admin.sock").display(),
            data = dir.path().join("data").display(),
        ),
    )
    .expect("write config");

    let agent_log = dir.path().join("spiffed.log");
    let agent = start_spiffed(&config, &[], &socket, &agent_log);
    exercise(dir.path(), &socket, &agent_log);
    eprintln!("mtls test took {:.1}s", started.elapsed().as_secs_f64());
    drop(agent);
}

/// The same in agent mode: spiffed attached to a real spire-server (v1.13.3, started by
/// spiffed-test-support's harness), the three entries registered on the server, SVIDs of 4 s
/// signed by it.
#[test]
fn mtls_with_svids_from_a_spire_server_in_agent_mode() {
    use spiffed_test_support::spire::{BundleFormat, EntrySpec, ServerOptions, SpireServer};
    let started = Instant::now();
    let dir = workdir();
    let spire = SpireServer::start(ServerOptions::default());
    let token = spire.generate_token(None, None);
    let agent_id = spire.join_token_agent_id(&token);
    for (id, uid) in [(SERVER_ID, 1001), (CLIENT_ID, 1002), (INTRUDER_ID, 1003)] {
        let mut e = EntrySpec::workload(&agent_id, id, &[&format!("unix:uid:{uid}")]);
        e.x509_svid_ttl = Some(4);
        spire.entry_create(&e);
    }
    let bundle = dir.path().join("bootstrap.pem");
    spire.write_bundle(&bundle, BundleFormat::Pem);
    let socket = dir.path().join("api.sock");
    let config = dir.path().join("spiffed.toml");
    fs::write(
        &config,
        format!(
            r#"trust_domain = "example.org"
socket_path = "{socket}"
socket_mode = "0777"
admin_socket_path = "{admin}"
data_dir = "{data}"
log_level = "debug"

[spire_server]
address = "{address}"
trust_bundle_path = "{bundle}"
sync_interval = "1s"
"#,
            socket = socket.display(),
            admin = dir.path().join("admin/admin.sock").display(),
            data = dir.path().join("data").display(),
            address = spire.address(),
            bundle = bundle.display(),
        ),
    )
    .expect("write config");
    let agent_log = dir.path().join("spiffed.log");
    let agent = start_spiffed(&config, &["--join-token", &token], &socket, &agent_log);
    // The node serves once it has attested and synced the three entries.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(spiffed_bin())
            .args(["entry", "list", "--output", "json", "--admin-socket"])
            .arg(dir.path().join("admin/admin.sock"))
            .output()
            .expect("spiffed entry list");
        let listed = String::from_utf8_lossy(&out.stdout);
        if [SERVER_ID, CLIENT_ID, INTRUDER_ID]
            .iter()
            .all(|id| listed.contains(id))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never synced the entries:\n{}",
            read(&agent_log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    exercise(dir.path(), &socket, &agent_log);
    eprintln!(
        "mtls test (agent mode) took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    drop(agent);
}

/// The server (uid 1001), the client (uid 1002) across rotations, and the intruder (uid 1003),
/// against the agent serving on `socket`.
fn exercise(dir: &Path, socket: &Path, agent_log: &Path) {
    let server_bin = runnable_by_others(Path::new(env!("CARGO_BIN_EXE_mtls-server")), dir);
    let client_bin = runnable_by_others(Path::new(env!("CARGO_BIN_EXE_mtls-client")), dir);
    // The server, as uid 1001: wait for `LISTENING <port>`.
    let server_log = dir.join("server.log");
    let mut server = Reaped(
        as_uid(1001, &server_bin, socket)
            .args(["--listen", "127.0.0.1:0", "--allow", CLIENT_ID])
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&server_log).expect("log file"))
            .spawn()
            .expect("setpriv (util-linux) runs"),
    );
    let stdout = server.0.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let port: u16 = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line
            .strip_prefix("LISTENING ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected server output {line:?}")),
        Err(_) => panic!(
            "server did not listen within 30s:\n{}\n--- spiffed\n{}",
            read(&server_log),
            read(agent_log)
        ),
    };
    let connect = format!("127.0.0.1:{port}");
    let context = || {
        format!(
            "--- server\n{}--- spiffed\n{}",
            read(&server_log),
            read(agent_log)
        )
    };

    // The client, as uid 1002: 12 lines at 700ms (8.4s) over one connection, while its 4s SVID
    // is re-minted every 2s.
    let out = as_uid(1002, &client_bin, socket)
        .args(["--connect", &connect, "--server-id", SERVER_ID])
        .args(["--count", "12", "--interval", "700ms"])
        .output()
        .expect("run client");
    let client_out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client failed:\n{}\n{}",
        text(&out),
        context()
    );
    let echoes = client_out
        .lines()
        .filter(|l| l.starts_with("connection 1: echo: spiffe://example.org/client: line "))
        .count();
    assert_eq!(echoes, 12, "{}", text(&out));
    assert!(
        client_out.contains(
            "connection 2: echo: spiffe://example.org/client: hello over a new handshake"
        ),
        "{}",
        text(&out)
    );
    assert!(
        client_out.contains("connection 1 outlived its client SVID"),
        "{}",
        text(&out)
    );
    let rotations = client_out
        .lines()
        .filter(|l| l.starts_with("rotation: "))
        .count();
    assert!(
        rotations >= 2,
        "connection 1 should span more than one rotation:\n{}",
        text(&out)
    );
    // The serial printed for each handshake comes from the client's X509Source.
    let serials: BTreeSet<&str> = client_out
        .lines()
        .filter(|l| l.contains(": client SVID spiffe://example.org/client serial "))
        .filter_map(|l| l.split(" serial ").nth(1)?.split_whitespace().next())
        .collect();
    assert!(
        serials.len() >= 2,
        "expected two client SVID serials:\n{}",
        text(&out)
    );
    // ... and the server saw exactly those certificates on the wire.
    let server_text = read(&server_log);
    for serial in &serials {
        assert!(
            server_text.contains(&format!("as {CLIENT_ID} (client SVID serial {serial})")),
            "server did not see client serial {serial}:\n{}",
            context()
        );
    }

    // The intruder, as uid 1003: a valid SVID of the same trust domain, but not the allowed ID.
    let out = as_uid(1003, &client_bin, socket)
        .args(["--connect", &connect, "--server-id", SERVER_ID])
        .args(["--count", "2", "--interval", "100ms"])
        .output()
        .expect("run intruder");
    let intruder_out = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "intruder was not refused:\n{}\n{}",
        text(&out),
        context()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("client SVID {INTRUDER_ID} serial")),
        "the intruder should have had its own SVID:\n{}",
        text(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("echo:"),
        "{}",
        text(&out)
    );
    // The server logs the refusal with the intruder's ID (after the client has seen the alert).
    let deadline = Instant::now() + Duration::from_secs(5);
    let refusal = format!("peer SPIFFE ID is not authorized: {INTRUDER_ID}");
    while !read(&server_log).contains(&refusal) {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The refusal did not take the server down.
    assert!(
        server.0.try_wait().expect("wait").is_none(),
        "server exited:\n{}",
        context()
    );
    eprintln!(
        "--- client\n{client_out}--- intruder\n{intruder_out}\n--- server\n{}",
        read(&server_log)
    );
    drop(server);
}
