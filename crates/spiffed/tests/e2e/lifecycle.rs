//! Start-up, restart, shutdown and configuration errors of the real binary.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use spiffed_proto::workload::X509BundlesRequest;
use spiffed_test_support::{Agent, with_header, x509_stream};

use crate::{agent_for_me, bin};

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

#[tokio::test]
async fn restart_keeps_the_bundle_and_the_ca_key_is_private() {
    let mut agent = agent_for_me("");
    let before = bundle(&agent).await;
    let ca = agent.data_dir.join("ca.json");
    assert_eq!(
        std::fs::metadata(&ca).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(agent.stop().success());
    assert!(!agent.socket.exists(), "socket removed at shutdown");
    agent.spawn();
    assert_eq!(bundle(&agent).await, before);
    // Key material never reaches the log.
    let logs = agent.logs();
    assert!(
        !logs.contains("PRIVATE KEY") && !logs.contains("\"key\""),
        "{logs}"
    );
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

#[test]
fn config_errors_name_the_line_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "trust_domain = \"example.org\"\n\n[[entries]]\nspiffe_id = \"spiffe://other.org/web\"\nselectors = [\"unix:uid:1\"]\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:4"), "{err}");
    assert!(err.contains("spiffe_id"), "{err}");
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
