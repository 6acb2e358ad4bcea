//! Start-up, restart, shutdown and configuration errors of the real binary.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{
    STANDARD as B64, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
};
use spiffed_proto::workload::{X509BundlesRequest, X509svidRequest};

use spiffed_test_support::{Agent, with_header, x509_stream};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{agent_for_me, bin, split_der};

async fn bundle(agent: &Agent) -> Vec<u8> {
    let mut c = agent.client().await;
    let mut s = c
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = s.message().await.unwrap().unwrap();
    m.bundles.get("spiffe://example.org").unwrap().clone()
}

/// The private keys the agent holds: the X.509-SVID key it serves to us, and every CA and JWT
/// signing key in `ca.json` (PKCS#8 DER each), with a name for messages.
async fn private_keys(agent: &Agent) -> Vec<(String, Vec<u8>)> {
    let mut c = agent.client().await;
    let svid = x509_stream(&mut c).await.message().await.unwrap().unwrap();
    let mut keys = vec![(
        "the X.509-SVID key".to_owned(),
        svid.svids[0].x509_svid_key.clone(),
    )];
    let ca: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.data_dir.join("ca.json")).unwrap()).unwrap();
    for (list, what) in [("authorities", "CA key"), ("jwt_keys", "JWT signing key")] {
        for (i, k) in ca[list].as_array().unwrap().iter().enumerate() {
            let der = B64.decode(k["key"].as_str().unwrap()).unwrap();
            keys.push((format!("{what} {i} of ca.json"), der));
        }
    }
    assert!(keys.len() >= 3, "an SVID key, a CA key and a JWT key");
    keys
}

/// Where `log` shows `der` (a PKCS#8 P-256 key) in any encoding a careless log line would
/// use: the raw bytes, standard and URL-safe base64 (of the whole key, padded or not, and of
/// the secret scalar at each of the three byte alignments, which is how it shows inside the
/// base64 of a larger buffer), the PEM body lines, lower- and upper-case hex (also
/// colon-separated), and Rust's `Debug` of the bytes. `None` when it shows nowhere.
fn key_in_log(log: &[u8], der: &[u8]) -> Option<String> {
    // The secret scalar: `04 20` then 32 bytes, after the fixed PKCS#8 and ECPrivateKey headers.
    let at = der
        .windows(2)
        .position(|w| w == [0x04, 0x20])
        .expect("a PKCS#8 EC key holds an OCTET STRING of 32 bytes");
    let secret = &der[at + 2..at + 34];
    assert!(secret.len() >= 24, "a distinctive window");
    if log.windows(secret.len()).any(|w| w == secret) {
        return Some("the raw DER bytes".into());
    }
    let text = String::from_utf8_lossy(log);
    let mut needles: Vec<(String, String)> = vec![];
    for (name, engine) in [
        ("base64", &B64),
        ("base64 without padding", &STANDARD_NO_PAD),
        ("base64url", &URL_SAFE),
        ("base64url without padding", &URL_SAFE_NO_PAD),
    ] {
        needles.push((format!("{name} of the key"), engine.encode(der)));
        for shift in 0..3 {
            let sub = &secret[shift..];
            let sub = &sub[..sub.len() / 3 * 3];
            needles.push((format!("{name} at offset {shift}"), engine.encode(sub)));
        }
    }
    for line in B64.encode(der).as_bytes().chunks(64) {
        needles.push((
            "a PEM body line".into(),
            String::from_utf8(line.to_vec()).unwrap(),
        ));
    }
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let colons: Vec<String> = secret.iter().map(|b| format!("{b:02x}")).collect();
    needles.push(("upper-case hex".into(), hex.to_uppercase()));
    needles.push(("hex".into(), hex));
    needles.push(("colon-separated hex".into(), colons.join(":")));
    let debug: Vec<String> = secret.iter().map(u8::to_string).collect();
    needles.push(("the Debug of its bytes".into(), debug.join(", ")));
    needles
        .into_iter()
        .find(|(_, n)| text.contains(n.as_str()))
        .map(|(what, _)| what)
}

#[tokio::test]
async fn restart_keeps_the_bundle_and_the_ca_key_is_private() {
    let mut agent = agent_for_me("");
    let before = bundle(&agent).await;
    let ca = agent.data_dir.join("ca.json");
    assert_eq!(
        std::fs::metadata(&ca).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut keys = private_keys(&agent).await;
    assert!(agent.stop().success());
    assert!(!agent.socket.exists(), "socket removed at shutdown");
    agent.spawn();
    assert_eq!(bundle(&agent).await, before);
    keys.extend(private_keys(&agent).await);
    // Key material never reaches the log (the agent logs at debug here), in any encoding.
    let logs = agent.logs();
    assert!(
        !logs.contains("PRIVATE KEY") && !logs.contains("\"key\""),
        "{logs}"
    );
    let raw = std::fs::read(&agent.log).unwrap();
    for (name, der) in &keys {
        if let Some(how) = key_in_log(&raw, der) {
            panic!("{name} is in the agent's log, as {how}:\n{logs}");
        }
    }
}

#[tokio::test]
async fn sigterm_ends_open_streams_and_removes_the_socket() {
    let mut agent = agent_for_me("");
    let mut c = agent.client().await;
    let mut stream = x509_stream(&mut c).await;
    stream.message().await.unwrap().unwrap();
    let status = agent.stop();
    assert!(status.success(), "exit status {status}:\n{}", agent.logs());
    // The stream ended (cleanly or with an error), it did not hang.
    let end = tokio::time::timeout(Duration::from_secs(2), stream.message()).await;
    assert!(
        !matches!(end, Ok(Ok(Some(_)))),
        "stream still delivering after shutdown"
    );
    assert!(!agent.socket.exists());
}

#[tokio::test]
async fn stale_socket_is_replaced_and_a_live_one_is_refused() {
    let mut agent = agent_for_me("");
    // A second agent on the same socket (with its own data dir, which is locked) is refused
    // while the first lives.
    let second = agent.dir.path().join("second.toml");
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let text = text
        .replace(
            &format!("\"{}\"", agent.data_dir.display()),
            &format!("\"{}\"", agent.dir.path().join("data2").display()),
        )
        .replace("/admin/admin.sock", "/admin2/admin.sock");
    std::fs::write(&second, text).unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&second)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another process is serving on"), "{err}");
    // kill -9 leaves the socket file behind; the next start replaces it.
    agent.signal("KILL");
    std::thread::sleep(Duration::from_millis(200));
    assert!(agent.socket.exists());
    agent.spawn();
    assert!(!bundle(&agent).await.is_empty());
}

/// `spiffed run --config cfg` on a file it must refuse: asserts exit status 64 and returns what
/// it printed on standard error.
fn run_refused(cfg: &Path) -> String {
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_errors_name_the_line_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "trust_domain = \"example.org\"\n\n[[entries]]\nspiffe_id = \"spiffe://other.org/web\"\nselectors = [\"unix:uid:1\"]\n",
    )
    .unwrap();
    let err = run_refused(&cfg);
    assert!(err.contains("bad.toml:4"), "{err}");
    assert!(err.contains("spiffe_id"), "{err}");
}

/// `worker_threads` sizes the async runtime before it starts: one thread by default, the
/// configured number otherwise (the serving log line says which), and either serves many
/// concurrent callers; a value out of range is a configuration error (exit 64).
#[tokio::test]
async fn worker_threads_size_the_runtime() {
    for (extra, n) in [("", 1), ("worker_threads = 3", 3)] {
        let agent = agent_for_me(extra);
        let fetches = (0..32).map(|_| async {
            let mut c = agent.client().await;
            let mut s = x509_stream(&mut c).await;
            let first = s.message().await.unwrap().unwrap();
            first.svids[0].spiffe_id.clone()
        });
        let ids = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(fetches))
            .await
            .expect("32 concurrent fetches did not finish in 30 s");
        assert!(
            ids.iter().all(|id| id == "spiffe://example.org/web"),
            "{ids:?}"
        );
        let logs = agent.logs();
        let line = logs
            .lines()
            .find(|l| l.contains("serving the SPIFFE Workload API"))
            .unwrap_or_else(|| panic!("no serving line:\n{logs}"));
        assert!(line.contains(&format!("worker_threads={n}")), "{line}");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("spiffed.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}worker_threads = 0\n",
            spiffed_test_support::config_text(dir.path(), "")
        ),
    )
    .unwrap();
    let err = run_refused(&cfg);
    assert!(
        err.contains("spiffed.toml:7") && err.contains("worker_threads 0 is out of range"),
        "{err}"
    );
    assert!(!dir.path().join("api.sock").exists());
}

#[tokio::test]
async fn reflection_is_served_without_the_security_header() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let agent = agent_for_me("");
    let mut client =
        ServerReflectionClient::new(spiffed_test_support::channel(&agent.socket).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"SpiffeWorkloadAPI"), "{names:?}");
}

#[tokio::test]
async fn sighup_reloads_config_entries_and_keeps_stored_ones() {
    let uid = spiffed_test_support::my_uid();
    let agent = agent_for_me("");
    // A stored entry that must survive the reload.
    let mut admin = spiffed_test_support::admin_client(&agent.admin_socket).await;
    let created = admin
        .create_entries(spiffed_proto::admin::CreateEntriesRequest {
            entries: vec![spiffed_proto::admin::EntrySpec {
                spiffe_id: "spiffe://example.org/stored".into(),
                selectors: vec![format!("unix:uid:{uid}")],
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.results[0].entry.is_some(), "{created:?}");

    let mut c = agent.client().await;
    let mut stream = x509_stream(&mut c).await;
    assert_eq!(stream.message().await.unwrap().unwrap().svids.len(), 2);

    // Add a config entry and reload.
    let text = std::fs::read_to_string(&agent.config).unwrap()
        + &format!(
            "\n[[entries]]\nspiffe_id = \"spiffe://example.org/reloaded\"\nselectors = [\"unix:uid:{uid}\"]\n"
        );
    std::fs::write(&agent.config, text).unwrap();
    agent.signal("HUP");
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("no update after SIGHUP")
        .unwrap()
        .unwrap();
    let mut ids: Vec<_> = msg.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "spiffe://example.org/reloaded",
            "spiffe://example.org/stored",
            "spiffe://example.org/web"
        ]
    );

    // A broken file keeps the running entries and says why in the log.
    std::fs::write(&agent.config, "trust_domain = \"example.org\"\nbogus = 1\n").unwrap();
    agent.signal("HUP");
    let quiet = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(quiet.is_err(), "a failed reload changed the entries");
    assert!(agent.logs().contains("reload failed"), "{}", agent.logs());
}

#[test]
fn dev_mode_needs_no_config_and_proves_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("dev.sock");
    let out = Command::new(bin())
        .args(["dev", "--once", "--socket"])
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "export SPIFFE_ENDPOINT_SOCKET=unix://{}",
            socket.display()
        )),
        "{stdout}"
    );
    let uid = spiffed_test_support::my_uid();
    assert!(
        stdout.contains(&format!("spiffe://dev.local/uid-{uid}/spiffed")),
        "{stdout}"
    );
    // Owner-only socket directory; the CA persisted for the next start.
    let mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(dir.path().join("state").join("ca.json").exists());
    assert!(!socket.exists(), "--once removes the socket when it stops");
}

/// Issue 10 item 15: `spiffed dev | head -1` panicked in its banner task, and the agent stopped
/// serving. A dev agent whose stdout is gone keeps serving; `--once` (whose report went
/// nowhere) exits 1; neither panics.
#[test]
fn dev_mode_outlives_a_closed_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("dev.sock");
    let dev = |extra: &[&str], stdout: std::process::Stdio| {
        Command::new(bin())
            .arg("dev")
            .args(extra)
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(dir.path().join("state"))
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let full = || {
        std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
    };
    let once = dev(&["--once"], full()).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&once.stderr);
    assert_eq!(once.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("cannot print to stdout"), "{err}");

    // Serving, with stdout a closed pipe and stderr in a file we can watch.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let log = dir.path().join("dev.stderr");
    let mut agent = Command::new(bin())
        .arg("dev")
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path().join("state"))
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let err = || std::fs::read_to_string(&log).unwrap_or_default();
    // First the failed print (the banner), so what follows is checked after it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !err().contains("cannot print to stdout") {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!(
                "the dev agent stopped ({status}) when its stdout closed:\n{}",
                err()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed print within 10 s:\n{}",
            err()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(bin())
        .args(["api", "fetch", "x509", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "no SVID after the failed print:\n{}",
        err()
    );
    // The self-check's verdict comes right after its (failed) report: still serving after it.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the dev agent stopped:\n{}",
            err()
        );
    }
    let _ = Command::new("kill").arg(agent.id().to_string()).status();
    let _ = agent.wait();
    assert!(!err().contains("panicked"), "{}", err());
}

/// SHA-256 of a DER certificate as `openssl x509 -noout -fingerprint -sha256` writes it.
fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `spiffed run` with `args` on `agent`'s config and returns its exit status and stderr,
/// or `None` (the process killed) if it is still running after 15 s.
fn run_to_exit(agent: &Agent, args: &[&str]) -> Option<(std::process::ExitStatus, String)> {
    let err = agent.dir.path().join("run.stderr");
    let mut child = Command::new(bin())
        .arg("run")
        .arg("--config")
        .arg(&agent.config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status, std::fs::read_to_string(&err).unwrap()));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `spiffed run` with `args` and `env` on `agent`'s config (stderr to its log) and
/// waits until it serves.
fn start_run(agent: &Agent, args: &[&str], env: &[(&str, &Path)]) -> std::process::Child {
    let mut child = Command::new(bin())
        .arg("run")
        .arg("--config")
        .arg(&agent.config)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&agent.log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(&agent.socket).is_err() {
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("spiffed did not serve:\n{}", agent.logs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[tokio::test]
async fn run_refuses_a_silent_new_trust_root_and_creates_one_when_told() {
    let mut agent = agent_for_me("");
    let before = bundle(&agent).await;
    assert!(agent.stop().success());
    let ca = agent.data_dir.join("ca.json");
    std::fs::remove_file(&ca).unwrap();

    // Without the flag: start-up refuses, naming the file, what is wrong and the flag.
    let (status, stderr) = run_to_exit(&agent, &[])
        .expect("spiffed run started with ca.json gone: a silent new trust root");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&ca.display().to_string()), "{stderr}");
    assert!(stderr.contains("is missing"), "{stderr}");
    assert!(stderr.contains("--new-trust-root"), "{stderr}");
    assert!(!ca.exists(), "nothing was created");

    // With it: a new CA, served, and a warning that names its fingerprint.
    let mut child = start_run(&agent, &["--new-trust-root"], &[]);
    let after = bundle(&agent).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_ne!(after, before, "a new trust root");
    let certs = split_der(&after);
    assert_eq!(certs.len(), 1);
    let fp = fingerprint(&certs[0]);
    let logs = agent.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("NEW CA") && l.contains(&fp)),
        "{logs}"
    );

    // The new CA is now the data dir's own: a plain restart keeps it.
    agent.spawn();
    assert_eq!(bundle(&agent).await, after);
}

/// The status a FetchX509SVID call ends with, or the first message's SVID validity.
async fn fetch_x509(agent: &Agent) -> Result<(i64, i64), tonic::Status> {
    let mut c = agent.client().await;
    let mut s = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await?
        .into_inner();
    let m = s.message().await?.expect("a first message");
    let chain = &m.svids[0].x509_svid;
    let certs = split_der(chain);
    let (_, leaf) = X509Certificate::from_der(&certs[0]).unwrap();
    let v = leaf.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

#[tokio::test]
async fn a_clock_jump_past_the_ca_is_refused_never_served_expired() {
    // libfaketime (Debian's `faketime`) moves the agent's clock, and only the agent's: the
    // offset is read from a file at every call, so the test can jump it while the agent runs.
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1");
    assert!(
        lib.exists(),
        "install Debian's faketime package (apt-get install faketime)"
    );
    let mut agent = agent_for_me("");
    assert!(agent.stop().success());
    let offset = agent.dir.path().join("faketime");
    std::fs::write(&offset, "+0d").unwrap();
    let env = [
        ("LD_PRELOAD", lib),
        ("FAKETIME_TIMESTAMP_FILE", offset.as_path()),
        ("FAKETIME_NO_CACHE", Path::new("1")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", Path::new("1")),
    ];
    let mut child = start_run(&agent, &[], &env);
    let (nb, na) = fetch_x509(&agent).await.unwrap();
    assert!(nb < na);
    let before = bundle(&agent).await;

    // The agent's clock jumps past the CA's expiry (ca_ttl is 24h): a VM restored from an old
    // snapshot, a laptop resumed days later.
    std::fs::write(&offset, "+3d").unwrap();
    let status = fetch_x509(&agent)
        .await
        .map(|(nb, na)| format!("notBefore {nb}, notAfter {na}"))
        .expect_err("an SVID was served after the clock jumped past every CA");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("every CA expired"), "{status:?}");
    assert!(status.message().contains("--new-trust-root"), "{status:?}");
    // No silent new trust root; a loud line in the log.
    assert_eq!(bundle(&agent).await, before);
    let logs = agent.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("ERROR") && l.contains("no CA is valid")),
        "{logs}"
    );

    // The clock behind the CA's notBefore: refused too.
    std::fs::write(&offset, "-3d").unwrap();
    let status = fetch_x509(&agent)
        .await
        .expect_err("served under a CA not yet valid");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("clock is behind"), "{status:?}");

    // Back to the right time: served again, valid.
    std::fs::write(&offset, "+0d").unwrap();
    let (nb, na) = fetch_x509(&agent).await.unwrap();
    assert!(nb < na);
    let _ = child.kill();
    let _ = child.wait();
}

/// A running agent on a data dir mounted as a small tmpfs: on drop, the agent is killed and the
/// tmpfs unmounted (also when the test fails).
struct OnTmpfs {
    child: Option<std::process::Child>,
    mount: std::path::PathBuf,
}

impl Drop for OnTmpfs {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

#[tokio::test]
async fn a_full_disk_at_rotation_backs_off_logs_once_and_recovers() {
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1");
    assert!(
        lib.exists(),
        "install Debian's faketime package (apt-get install faketime)"
    );
    let mut agent = agent_for_me("");
    assert!(agent.stop().success());
    // The data dir moves onto a 256 KiB tmpfs (we are root), as it was.
    let saved = tempfile::tempdir().unwrap();
    let files: Vec<_> = std::fs::read_dir(&agent.data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    for f in &files {
        std::fs::copy(agent.data_dir.join(f), saved.path().join(f)).unwrap();
    }
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
        .arg(&agent.data_dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs on {}", agent.data_dir.display());
    let mut run = OnTmpfs {
        child: None,
        mount: agent.data_dir.clone(),
    };
    for f in &files {
        std::fs::copy(saved.path().join(f), agent.data_dir.join(f)).unwrap();
    }
    let offset = agent.dir.path().join("faketime");
    std::fs::write(&offset, "+0d").unwrap();
    let env = [
        ("LD_PRELOAD", lib),
        ("FAKETIME_TIMESTAMP_FILE", offset.as_path()),
        ("FAKETIME_NO_CACHE", Path::new("1")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", Path::new("1")),
    ];
    run.child = Some(start_run(&agent, &[], &env));
    fetch_x509(&agent).await.unwrap();

    // The disk fills up.
    let filler = agent.data_dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while std::io::Write::write_all(&mut f, &[0u8; 4096]).is_ok() {}
    drop(f);
    // Half-way through the CA's life (ca_ttl is 24h) the next CA is due, and ca.json cannot be
    // written. The fetch (its SVID expired) wakes the rotation at once.
    std::fs::write(&offset, "+13h").unwrap();
    let (nb, na) = fetch_x509(&agent).await.unwrap();
    assert!(nb < na, "a valid SVID from the CA still valid");
    std::thread::sleep(Duration::from_secs(4));
    let logs = agent.logs();
    let failures: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("CA rotation failed"))
        .collect();
    let errors = failures.iter().filter(|l| l.contains("ERROR")).count();
    assert_eq!(
        errors,
        1,
        "one ERROR line per burst:\n{}",
        failures.join("\n")
    );
    // Attempts at 0, 1, 3 (and 7) seconds: backoff, not a spin.
    assert!(
        (1..=4).contains(&failures.len()),
        "{} attempts in 4 s:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(failures[0].contains("No space left"), "{}", failures[0]);

    // Space again: the next attempt succeeds (within the 8 s backoff) and says so.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !agent.logs().contains("CA rotation works again") {
        assert!(std::time::Instant::now() < deadline, "{}", agent.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let certs = split_der(&bundle(&agent).await);
    assert_eq!(certs.len(), 2, "the next CA is published");
    drop(run);
}

/// The last `stats` line of the agent's log, after a SIGUSR1.
fn stats_after_usr1(agent: &Agent, lines_before: usize) -> String {
    agent.signal("USR1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = agent.logs();
        let found = logs
            .lines()
            .filter(|l| l.contains(" stats") || l.contains("\"stats\""))
            .nth(lines_before)
            .map(str::to_owned);
        if let Some(line) = found {
            return line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stats line:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `field=N` in a log line.
fn counter(line: &str, field: &str) -> u64 {
    let at = line
        .find(&format!("{field}="))
        .unwrap_or_else(|| panic!("{field} missing in {line}"));
    line[at + field.len() + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("{field} is not a number in {line}"))
}

#[tokio::test]
async fn sigusr1_logs_what_streams_hold_and_how_often_they_woke() {
    let uid = spiffed_test_support::my_uid();
    // Two entries: "web" rotates every second, "other" (another uid) nobody fetches.
    let agent = Agent::start(
        &bin(),
        &format!(
            "min_svid_ttl = \"1s\"\n[[entries]]\nspiffe_id = \"spiffe://example.org/web\"\n\
             selectors = [\"unix:uid:{uid}\"]\nx509_svid_ttl = \"2s\"\n\
             [[entries]]\nspiffe_id = \"spiffe://example.org/other\"\n\
             selectors = [\"unix:uid:{}\"]\n",
            uid + 1
        ),
    );
    let before = stats_after_usr1(&agent, 0);
    assert_eq!(counter(&before, "entries"), 2, "{before}");
    assert_eq!(counter(&before, "x509_svids_held"), 0, "{before}");
    let mut c = agent.client().await;
    let mut stream = x509_stream(&mut c).await;
    stream.message().await.unwrap().unwrap();
    // The next message is the rotated SVID: the stream woke for its own entry.
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    assert!(matches!(next, Ok(Ok(Some(_)))), "no rotation pushed");
    let after = stats_after_usr1(&agent, 1);
    assert_eq!(counter(&after, "x509_svids_held"), 1, "{after}");
    assert!(counter(&after, "stream_wakeups_recomputed") >= 1, "{after}");
    assert!(counter(&after, "x509_mints") >= 2, "{after}");
}

/// Issue 16 item 4: `spiffed run --check` lists every problem of the file (not only the first)
/// and exits 64; a good file gets a summary and 0; neither starts the agent.
#[test]
fn run_check_reports_every_problem_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let socket = dir.path().join("public/api.sock");
    let header = format!(
        "trust_domain = \"example.org\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\ndata_dir = \"{}\"\n",
        socket.display(),
        dir.path().join("private/admin.sock").display(),
        data.display()
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "{header}x509_svid_tl = \"1h\"\nca_ttl = \"soon\"\n\n[[entries]]\nspiffe_id = \"spiffe://other.org/web\"\nselectors = [\"unix:uid:1\"]\n"
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("invalid configuration: 3 problems"), "{err}");
    for (line, key) in [
        (5, "x509_svid_tl"),
        (6, "ca_ttl"),
        (9, "entries[0].spiffe_id"),
    ] {
        assert!(
            err.contains(&format!("bad.toml:{line}:")),
            "line {line}: {err}"
        );
        assert!(err.contains(key), "{key}: {err}");
    }
    assert!(err.contains("did you mean `x509_svid_ttl`"), "{err}");
    // Without --check, the first problem only, as before.
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("bad.toml:5:"), "{err}");
    assert!(!err.contains("bad.toml:6:"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!("{header}\n[[entries]]\nspiffe_id = \"spiffe://example.org/web\"\nselectors = [\"unix:uid:1\"]\n"),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--check", "-c"])
        .arg(&good)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(
            "the configuration is valid: standalone mode, trust domain example.org, 1 entry"
        ),
        "{text}"
    );
    assert!(!data.exists(), "--check created data_dir");
    assert!(!socket.exists(), "--check opened the socket");
}
