//! Entries managed live through the admin socket: store, CLI, streams, explain, durability.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use spiffed_proto::admin::{CreateEntriesRequest, EntrySpec, ListEntriesRequest};
use spiffed_test_support::{Agent, admin_client, my_uid, x509_stream};
use tonic::Code;

use crate::bin;

/// `spiffed entry ...` against the agent's admin socket; returns (exit code, stdout, stderr).
fn entry(agent: &Agent, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("entry")
        .args(args)
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn create(agent: &Agent, spiffe_id: &str, selectors: &[&str]) -> serde_json::Value {
    let mut args = vec!["create", "--output", "json", "--spiffe-id", spiffe_id];
    for s in selectors {
        args.extend(["--selector", s]);
    }
    let (code, out, err) = entry(agent, &args);
    assert_eq!(code, 0, "entry create failed: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn id_of(v: &serde_json::Value) -> String {
    v.get("id")
        .or_else(|| v.pointer("/0/id"))
        .and_then(|x| x.as_str())
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_owned()
}

#[tokio::test]
async fn entries_created_and_deleted_live_reach_the_open_stream() {
    // No config entries at all: the caller's identities come from the store only.
    let agent = Agent::start(&bin(), "");
    let me = format!("unix:uid:{}", my_uid());
    let first = create(&agent, "spiffe://example.org/live", &[&me]);

    let mut c = agent.client().await;
    let mut stream = x509_stream(&mut c).await;
    let msg = stream.message().await.unwrap().unwrap();
    assert_eq!(msg.svids.len(), 1);

    let second = create(&agent, "spiffe://example.org/second", &[&me]);
    let msg = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("the new SVID did not arrive")
        .unwrap()
        .unwrap();
    let ids: Vec<_> = msg.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert!(
        ids.contains(&"spiffe://example.org/live") && ids.contains(&"spiffe://example.org/second"),
        "{ids:?}"
    );

    let (code, _, err) = entry(&agent, &["delete", &id_of(&first), &id_of(&second)]);
    assert_eq!(code, 0, "{err}");
    // The last identity is gone: the stream ends with PermissionDenied, not an empty message.
    let end = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("the stream did not end");
    let status = end.expect_err("expected PermissionDenied, got a message");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_new_hint_reaches_the_open_stream() {
    let agent = Agent::start(&bin(), "");
    let me = format!("unix:uid:{}", my_uid());
    let (code, out, err) = entry(
        &agent,
        &[
            "create",
            "--output",
            "json",
            "--spiffe-id",
            "spiffe://example.org/hinted",
            "--selector",
            &me,
            "--hint",
            "internal",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id = id_of(&serde_json::from_str(&out).unwrap());
    let mut c = agent.client().await;
    let mut stream = x509_stream(&mut c).await;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids[0].hint, "internal");

    // Only the hint changes: the SVID stays, but the workload must learn the new hint.
    let (code, _, err) = entry(&agent, &["update", &id, "--hint", "external"]);
    assert_eq!(code, 0, "{err}");
    let msg = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("the new hint did not arrive")
        .unwrap()
        .unwrap();
    assert_eq!(msg.svids[0].hint, "external");
    assert_eq!(msg.svids[0].x509_svid, first.svids[0].x509_svid);
}

#[tokio::test]
async fn an_entry_needing_new_facts_reaches_a_stream_attested_without_them() {
    // Only a uid entry at first: the stream's caller is attested from its credentials alone.
    let agent = Agent::start(&bin(), "");
    let me = format!("unix:uid:{}", my_uid());
    create(&agent, "spiffe://example.org/by-uid", &[&me]);
    let mut c = agent.client().await;
    let mut stream = x509_stream(&mut c).await;
    assert_eq!(stream.message().await.unwrap().unwrap().svids.len(), 1);

    // An entry on this process's executable and its hash: the agent must now read /proc and
    // hash the binary for the open stream's caller.
    let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    let out = Command::new("sha256sum").arg(&exe).output().unwrap();
    assert!(out.status.success());
    let sha = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    create(
        &agent,
        "spiffe://example.org/by-exe",
        &[
            &format!("unix:path:{}", exe.display()),
            &format!("unix:sha256:{sha}"),
        ],
    );
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the SVID for the executable's entry did not arrive")
        .unwrap()
        .unwrap();
    let ids: Vec<_> = msg.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        2,
        "want both the uid and the executable identities: {ids:?}"
    );
    assert!(ids.contains(&"spiffe://example.org/by-exe"), "{ids:?}");
}

#[test]
fn non_admin_uid_is_refused_on_the_admin_socket() {
    assert_eq!(
        my_uid(),
        0,
        "this test switches uid with setpriv and must run as root"
    );
    // admin_uids names another user, so the socket is reachable; uid 65534 is not an admin.
    let agent = Agent::start(&bin(), "admin_uids = [0, 65533]\n");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .args(["entry", "list", "--admin-socket"])
        .arg(&agent.admin_socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("uid 65534 may not administer"), "{err}");
    // The agent's own uid may.
    let (code, _, err) = entry(&agent, &["list"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn update_with_a_stale_revision_is_refused() {
    let agent = Agent::start(&bin(), "");
    let created = create(&agent, "spiffe://example.org/rev", &["unix:uid:4242"]);
    let id = id_of(&created);
    let (code, out, err) = entry(
        &agent,
        &[
            "update",
            &id,
            "--revision",
            "1",
            "--hint",
            "first",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(
        out.contains("\"revision\": 2") || out.contains("\"revision\":2"),
        "{out}"
    );
    // Someone else's view, still at revision 1.
    let (code, _, err) = entry(
        &agent,
        &["update", &id, "--revision", "1", "--hint", "second"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("revision"), "{err}");
    let (code, out, _) = entry(&agent, &["show", &id, "--output", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["hint"], "first", "{out}");
}

#[test]
fn invalid_entries_are_refused_with_the_field_named() {
    let agent = Agent::start(&bin(), "");
    let (code, _, err) = entry(
        &agent,
        &[
            "create",
            "--spiffe-id",
            "spiffe://other.org/x",
            "--selector",
            "unix:uid:1",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("spiffe_id") && err.contains("trust domain"),
        "{err}"
    );
    let (code, _, err) = entry(
        &agent,
        &[
            "create",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--selector",
            "k8s:ns:a",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("selectors"), "{err}");
    create(&agent, "spiffe://example.org/dup", &["unix:uid:7"]);
    let (code, _, err) = entry(
        &agent,
        &[
            "create",
            "--spiffe-id",
            "spiffe://example.org/dup",
            "--selector",
            "unix:uid:7",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("already"), "{err}");
}

#[test]
fn explain_shows_matches_near_misses_and_identities() {
    let uid = my_uid();
    let agent = Agent::start(
        &bin(),
        &format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/web\"\nselectors = [\"unix:uid:{uid}\"]\n\
             [[entries]]\nspiffe_id = \"spiffe://example.org/db\"\nselectors = [\"unix:uid:{uid}\", \"unix:gid:54321\"]\n"
        ),
    );
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let out = Command::new(bin())
        .args([
            "explain",
            "--pid",
            &sleeper.id().to_string(),
            "--output",
            "json",
            "--admin-socket",
        ])
        .arg(&agent.admin_socket)
        .output()
        .unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let selectors = v["selectors"].to_string();
    assert!(
        selectors.contains(&format!("unix:uid:{uid}")),
        "{selectors}"
    );
    assert!(selectors.contains("unix:path:"), "{selectors}");
    assert_eq!(
        v["identities"],
        serde_json::json!(["spiffe://example.org/web"])
    );
    let db = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e.to_string().contains("spiffe://example.org/db"))
        .expect("near miss listed");
    assert!(db.to_string().contains("unix:gid:54321"), "{db}");
}

#[test]
fn corrupt_store_stops_start_up_naming_the_file() {
    let mut agent = Agent::start(&bin(), "");
    agent.stop();
    let store = agent.data_dir.join("entries.sqlite");
    std::fs::write(
        &store,
        b"this is not a database, just 64 bytes of garbage for the test!!",
    )
    .unwrap();
    let _ = std::fs::remove_file(agent.data_dir.join("entries.sqlite-wal"));
    let _ = std::fs::remove_file(agent.data_dir.join("entries.sqlite-shm"));
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("entries.sqlite"), "{err}");
}

/// kill -9 at random moments while writes are in flight: every acknowledged write survives,
/// and anything present is whole.
#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    let mut agent = Agent::start(&bin(), "");
    let mut acked: HashMap<String, u32> = HashMap::new();
    let mut n = 0u32;
    // A cheap deterministic "random" schedule, different each round.
    let delays = [37u64, 113, 7, 251, 61, 173, 19, 89];
    for delay in &delays {
        let socket = agent.admin_socket.clone();
        let writer = tokio::spawn(async move {
            let mut done = vec![];
            let mut client = admin_client(&socket).await;
            let mut i = n;
            loop {
                i += 1;
                let req = CreateEntriesRequest {
                    entries: vec![EntrySpec {
                        spiffe_id: format!("spiffe://example.org/w{i}"),
                        selectors: vec![format!("unix:uid:{}", 10_000 + i)],
                        hint: format!("h{i}"),
                        ..Default::default()
                    }],
                };
                match client.create_entries(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if let Some(e) = r.results.first().and_then(|r| r.entry.clone()) {
                            done.push((e.id, i));
                        }
                    }
                    Err(_) => break,
                }
            }
            (done, i)
        });
        tokio::time::sleep(Duration::from_millis(*delay)).await;
        agent.kill9();
        let (done, last) = writer.await.unwrap();
        acked.extend(done);
        n = last;
        agent.spawn();
    }
    assert!(
        acked.len() > 10,
        "too few writes acknowledged ({}) to mean anything",
        acked.len()
    );
    let mut client = admin_client(&agent.admin_socket).await;
    let mut listed = HashMap::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_entries(ListEntriesRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for e in page.entries {
            let spec = e.spec.unwrap();
            // Whole: the fields written together are all there and agree.
            let i: u32 = spec
                .spiffe_id
                .trim_start_matches("spiffe://example.org/w")
                .parse()
                .unwrap();
            assert_eq!(spec.hint, format!("h{i}"));
            assert_eq!(spec.selectors, vec![format!("unix:uid:{}", 10_000 + i)]);
            listed.insert(e.id, i);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    for (id, i) in &acked {
        assert_eq!(
            listed.get(id),
            Some(i),
            "acknowledged entry {id} (w{i}) lost after kill -9"
        );
    }
}
