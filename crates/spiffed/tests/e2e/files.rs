//! The agent's directories and files, seen from the real binary: who owns them and their modes
//! (a foreign data dir or CA, shared or symlinked socket directories, the umask), a lost entry
//! store, two agents on one data dir; and the config bounds and SIGHUP warnings.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spiffed_test_support::{admin_client, my_uid, x509_stream};

use crate::{agent_for_me, bin};

/// A uid that owns nothing here: the "other user".
const OTHER: u32 = 1000;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn mkdir(p: &Path, m: u32) {
    fs::create_dir_all(p).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
}

/// A temp dir that other uids may traverse.
fn tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Writes a config with these paths (plus `extra` top-level lines) into `dir`.
fn config(dir: &Path, socket: &Path, admin: &Path, data: &Path, extra: &str) -> PathBuf {
    let path = dir.join("spiffed.toml");
    fs::write(
        &path,
        format!(
            "trust_domain = \"example.org\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\n\
             data_dir = \"{}\"\n{extra}\n[[entries]]\nspiffe_id = \"spiffe://example.org/web\"\n\
             selectors = [\"unix:uid:{}\"]\n",
            socket.display(),
            admin.display(),
            data.display(),
            my_uid(),
        ),
    )
    .unwrap();
    path
}

/// Runs `spiffed run --config FILE ARGS` (through `sh -c` with `prefix`, e.g. a umask) and
/// expects it to exit at start-up; returns the exit code and stderr. An agent that is still
/// running after 5 s has accepted what it should have refused: it is killed and the test fails.
fn start_exits(config: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the agent started instead of refusing:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`start_exits`], expecting exit code 1 and `needles` in the message.
#[track_caller]
fn refused(config: &Path, args: &[&str], needles: &[&str]) -> String {
    let (code, err) = start_exits(config, args);
    assert_eq!(code, Some(1), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from:\n{err}");
    }
    err
}

#[test]
fn a_data_dir_another_user_owns_or_can_write_is_refused_and_left_alone() {
    let d = tempdir();
    let data = d.path().join("data");
    mkdir(&data, 0o755);
    chown(&data, Some(OTHER), Some(OTHER)).unwrap();
    // Its owner could have put its own CA there.
    fs::write(data.join("ca.json"), "{}").unwrap();
    chown(data.join("ca.json"), Some(OTHER), Some(OTHER)).unwrap();
    let cfg = config(
        d.path(),
        &d.path().join("api.sock"),
        &d.path().join("admin/admin.sock"),
        &data,
        "",
    );
    let shown = data.display().to_string();
    refused(
        &cfg,
        &[],
        &[&shown, "owned by uid 1000", &format!("chown {}", my_uid())],
    );
    assert_eq!(mode(&data), 0o755, "the data dir was chmodded");
    assert_eq!(fs::metadata(&data).unwrap().uid(), OTHER);

    // Ours, but group-writable.
    chown(&data, Some(my_uid()), None).unwrap();
    fs::remove_file(data.join("ca.json")).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o775)).unwrap();
    refused(&cfg, &[], &[&shown, "mode 0775", "chmod go-w"]);
    assert_eq!(mode(&data), 0o775);
}

#[tokio::test]
async fn a_ca_or_store_file_that_is_foreign_loose_or_a_symlink_is_refused() {
    let mut agent = agent_for_me("");
    assert!(agent.stop().success());
    let ca = agent.data_dir.join("ca.json");
    let store = agent.data_dir.join("entries.sqlite");
    let ca_shown = ca.display().to_string();

    chown(&ca, Some(OTHER), None).unwrap();
    refused(&agent.config, &[], &[&ca_shown, "owned by uid 1000"]);
    chown(&ca, Some(my_uid()), None).unwrap();

    fs::set_permissions(&ca, fs::Permissions::from_mode(0o622)).unwrap();
    refused(&agent.config, &[], &[&ca_shown, "chmod go-w"]);
    fs::set_permissions(&ca, fs::Permissions::from_mode(0o600)).unwrap();

    // A CA kept elsewhere and linked in: the link is refused (someone else may control it).
    let elsewhere = agent.dir.path().join("elsewhere.json");
    fs::rename(&ca, &elsewhere).unwrap();
    symlink(&elsewhere, &ca).unwrap();
    refused(&agent.config, &[], &[&ca_shown, "symbolic link"]);
    fs::remove_file(&ca).unwrap();
    fs::rename(&elsewhere, &ca).unwrap();

    chown(&store, Some(OTHER), None).unwrap();
    refused(
        &agent.config,
        &[],
        &[&store.display().to_string(), "owned by uid 1000"],
    );
    chown(&store, Some(my_uid()), None).unwrap();

    agent.spawn();
    let mut c = agent.client().await;
    x509_stream(&mut c).await.message().await.unwrap().unwrap();
}

#[test]
fn directories_the_agent_did_not_create_are_never_chmodded() {
    let d = tempdir();
    let data = d.path().join("data");
    let socket = d.path().join("api.sock");

    // The admin socket straight in a shared, sticky directory such as /tmp.
    let shared = d.path().join("shared");
    mkdir(&shared, 0o1777);
    let cfg = config(d.path(), &socket, &shared.join("admin.sock"), &data, "");
    refused(
        &cfg,
        &[],
        &[&shared.display().to_string(), "shared directory"],
    );
    assert_eq!(mode(&shared), 0o1777, "the sticky bit was lost");

    // Through a symlinked parent: refused, and the link's target keeps its mode.
    let target = d.path().join("target");
    mkdir(&target, 0o755);
    let link = d.path().join("link");
    symlink(&target, &link).unwrap();
    let cfg = config(d.path(), &socket, &link.join("admin.sock"), &data, "");
    refused(&cfg, &[], &[&link.display().to_string(), "symbolic link"]);
    assert_eq!(mode(&target), 0o755, "the symlink's target was chmodded");

    // A parent another user owns.
    let theirs = d.path().join("theirs");
    mkdir(&theirs, 0o755);
    chown(&theirs, Some(OTHER), Some(OTHER)).unwrap();
    let cfg = config(d.path(), &socket, &theirs.join("admin.sock"), &data, "");
    refused(
        &cfg,
        &[],
        &[&theirs.display().to_string(), "owned by uid 1000"],
    );
    assert_eq!(mode(&theirs), 0o755);

    // Our own existing directories are used as they are, not chmodded.
    let admin_dir = d.path().join("admin");
    mkdir(&admin_dir, 0o755);
    mkdir(&data, 0o750);
    let cfg = config(d.path(), &socket, &admin_dir.join("admin.sock"), &data, "");
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the agent exited");
        assert!(Instant::now() < deadline, "the agent did not serve");
        std::thread::sleep(Duration::from_millis(20));
    }
    let modes = (mode(&admin_dir), mode(&data));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(modes, (0o755, 0o750));
}

#[test]
fn the_socket_directory_ignores_the_umask_and_must_not_be_writable_by_others() {
    let d = tempdir();
    let socket = d.path().join("pub").join("api.sock");
    let admin = d.path().join("priv").join("admin.sock");
    let data = d.path().join("data");
    let cfg = config(d.path(), &socket, &admin, &data, "");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" run --config \"$1\"")
        .arg(bin())
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the agent exited");
        assert!(Instant::now() < deadline, "the agent did not serve");
        std::thread::sleep(Duration::from_millis(20));
    }
    let modes = (
        mode(socket.parent().unwrap()),
        mode(admin.parent().unwrap()),
        mode(&data),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        modes,
        (0o755, 0o700, 0o700),
        "umask 000 leaked into the modes"
    );

    // An existing socket directory others can write to: anyone could replace api.sock.
    let open = d.path().join("open");
    mkdir(&open, 0o777);
    let cfg = config(d.path(), &open.join("api.sock"), &admin, &data, "");
    refused(&cfg, &[], &[&open.display().to_string(), "mode 0777"]);
    assert_eq!(mode(&open), 0o777);
    // One another user owns.
    let theirs = d.path().join("theirs");
    mkdir(&theirs, 0o755);
    chown(&theirs, Some(OTHER), Some(OTHER)).unwrap();
    let cfg = config(d.path(), &theirs.join("api.sock"), &admin, &data, "");
    refused(
        &cfg,
        &[],
        &[&theirs.display().to_string(), "owned by uid 1000"],
    );
}

#[tokio::test]
async fn a_lost_entry_store_next_to_the_ca_stops_the_start() {
    let uid = my_uid();
    let mut agent = agent_for_me("");
    let mut admin = admin_client(&agent.admin_socket).await;
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
    drop(admin);
    assert!(agent.stop().success());

    let store = agent.data_dir.join("entries.sqlite");
    let shown = store.display().to_string();
    for f in ["entries.sqlite-wal", "entries.sqlite-shm"] {
        let _ = fs::remove_file(agent.data_dir.join(f));
    }
    fs::File::create(&store).unwrap(); // truncated to zero bytes
    refused(
        &agent.config,
        &[],
        &[&shown, "empty", "ca.json", "--new-entry-store"],
    );
    fs::remove_file(&store).unwrap();
    refused(
        &agent.config,
        &[],
        &[&shown, "missing", "--new-entry-store"],
    );

    // A deliberate fresh start: only the config entry remains.
    agent.spawn_with_args(&["--new-entry-store"]);
    let mut c = agent.client().await;
    let first = x509_stream(&mut c).await.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    assert!(
        agent.logs().contains("--new-entry-store"),
        "{}",
        agent.logs()
    );
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused_naming_the_first_pid() {
    let agent = agent_for_me("");
    let d = tempdir();
    let cfg = config(
        d.path(),
        &d.path().join("api.sock"),
        &d.path().join("admin/admin.sock"),
        &agent.data_dir,
        "",
    );
    refused(
        &cfg,
        &[],
        &[
            &agent.data_dir.display().to_string(),
            "in use by another spiffed agent",
            &format!("pid {}", agent.pid()),
        ],
    );
    assert_eq!(
        fs::read_to_string(agent.data_dir.join("agent.lock"))
            .unwrap()
            .trim(),
        agent.pid().to_string()
    );
}

#[tokio::test]
async fn oversized_entries_and_bad_lifetimes_are_refused() {
    // In the file: exit 64 naming the key.
    let d = tempdir();
    let many: Vec<String> = (0..100_000).map(|i| format!("\"unix:gid:{i}\"")).collect();
    let cases = [
        (
            format!(
                "[[entries]]\nspiffe_id = \"spiffe://example.org/many\"\nselectors = [{}]\n",
                many.join(",")
            ),
            "selectors",
        ),
        (
            "[[entries]]\nspiffe_id = \"spiffe://example.org/h\"\nselectors = [\"unix:uid:7\"]\nhint = \"a\\u0007b\"\n".to_owned(),
            "hint",
        ),
        ("ca_ttl = \"1s\"\n".to_owned(), "ca_ttl"),
        ("x509_svid_ttl = \"1s\"\n".to_owned(), "x509_svid_ttl"),
        ("jwt_svid_ttl = \"1s\"\n".to_owned(), "jwt_svid_ttl"),
        (
            "ca_ttl = \"30m\"\nx509_svid_ttl = \"10m\"\njwt_svid_ttl = \"1h\"\n".to_owned(),
            "jwt_svid_ttl",
        ),
    ];
    for (extra, key) in cases {
        let text = spiffed_test_support::config_text(d.path(), &extra);
        let cfg = d.path().join("bad.toml");
        fs::write(&cfg, text).unwrap();
        let (code, err) = start_exits(&cfg, &[]);
        assert_eq!(code, Some(64), "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
    let cfg = config(
        d.path(),
        &d.path().join("data/api.sock"),
        &d.path().join("admin/admin.sock"),
        &d.path().join("data"),
        "",
    );
    let (code, err) = start_exits(&cfg, &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("inside data_dir"), "{err}");

    // Through the admin API.
    let agent = agent_for_me("");
    let mut admin = admin_client(&agent.admin_socket).await;
    let spec = |f: &dyn Fn(&mut spiffed_proto::admin::EntrySpec)| {
        let mut s = spiffed_proto::admin::EntrySpec {
            spiffe_id: "spiffe://example.org/big".into(),
            selectors: vec!["unix:uid:7".into()],
            ..Default::default()
        };
        f(&mut s);
        s
    };
    let specs = vec![
        spec(&|s| s.selectors = (0..100_000).map(|i| format!("unix:gid:{i}")).collect()),
        spec(&|s| s.dns_names = (0..100_000).map(|i| format!("h{i}.internal")).collect()),
        spec(&|s| s.hint = "a\nb".into()),
        spec(&|s| s.x509_svid_ttl_seconds = 1),
    ];
    let results = admin
        .create_entries(spiffed_proto::admin::CreateEntriesRequest { entries: specs })
        .await
        .unwrap()
        .into_inner()
        .results;
    let fields: Vec<String> = results
        .iter()
        .map(|r| {
            r.error
                .as_ref()
                .map(|e| e.field.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(fields, ["selectors", "dns_names", "hint", "x509_svid_ttl"]);
}

#[tokio::test]
async fn sighup_applies_the_log_level_and_names_each_setting_needing_a_restart() {
    let agent = agent_for_me("");
    let mut c = agent.client().await;
    x509_stream(&mut c).await.message().await.unwrap().unwrap();
    assert!(agent.logs().contains("issued"), "{}", agent.logs());

    let uid = my_uid();
    let text = spiffed_test_support::config_text(
        agent.dir.path(),
        &format!(
            "socket_mode = \"0700\"\nca_ttl = \"48h\"\n[[entries]]\nspiffe_id = \"spiffe://example.org/web\"\nselectors = [\"unix:uid:{uid}\"]\n"
        ),
    )
    .replace("log_level = \"debug\"", "log_level = \"error\"");
    fs::write(&agent.config, text).unwrap();
    agent.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = agent.logs();
        if logs.contains("changed socket_mode requires a restart")
            && logs.contains("changed ca_ttl requires a restart")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no warning after SIGHUP:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the reload a moment to finish, then an issuance is no longer logged at info.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = agent.logs().len();
    let mut c = agent.client().await;
    x509_stream(&mut c).await.message().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = agent.logs();
    assert!(
        !after[before..].contains("issued"),
        "log_level = \"error\" was not applied:\n{}",
        &after[before..]
    );
}

#[tokio::test]
async fn config_entry_ids_stay_when_an_entry_is_inserted_above() {
    let agent = agent_for_me("");
    let mut admin = admin_client(&agent.admin_socket).await;
    let web_id = |list: &spiffed_proto::admin::ListEntriesResponse| {
        list.entries
            .iter()
            .find(|e| {
                e.spec
                    .as_ref()
                    .is_some_and(|s| s.spiffe_id == "spiffe://example.org/web")
            })
            .map(|e| e.id.clone())
            .unwrap()
    };
    let list = || spiffed_proto::admin::ListEntriesRequest::default();
    let before = web_id(&admin.list_entries(list()).await.unwrap().into_inner());

    // An entry inserted above the one the test agent has.
    let uid = my_uid();
    let text = fs::read_to_string(&agent.config).unwrap().replacen(
        "[[entries]]",
        &format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/db\"\nselectors = [\"unix:uid:{uid}\", \"unix:gid:0\"]\n\n[[entries]]"
        ),
        1,
    );
    fs::write(&agent.config, text).unwrap();
    agent.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let l = admin.list_entries(list()).await.unwrap().into_inner();
        if l.entries.len() == 2 {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "reload not seen:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(web_id(&after), before, "the web entry's id changed meaning");
}
