//! `spiffed helper` against the real agent: the identity chosen by SPIFFE ID, every update
//! switched in at once, hooks that never hold up rotation, JWT files, modes, --once.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use spiffed_test_support::{Agent, my_uid};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::{SHORT_TTLS, agent_for_me, bin};

/// A running `spiffed helper`, ended with SIGTERM on drop.
struct Helper {
    child: Child,
    stderr: PathBuf,
}

impl Helper {
    fn start(socket: &Path, dir: &Path, args: &[&str]) -> Self {
        let stderr = dir.join(format!(
            "helper-{}.err",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(bin())
            .arg("helper")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self { child, stderr }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to `secs` for `check`, failing with the helper's log.
    #[track_caller]
    fn wait(&mut self, secs: u64, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !check() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the helper exited ({status}) before {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs}s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_log(&mut self, secs: u64, text: &str) {
        let stderr = self.stderr.clone();
        self.wait(secs, &format!("{text:?} in the log"), || {
            fs::read_to_string(&stderr)
                .unwrap_or_default()
                .contains(text)
        });
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the helper ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The DER blocks of a PEM text.
fn pem_blocks(pem: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut body = String::new();
    let mut inside = false;
    for line in pem.lines() {
        if line.starts_with("-----BEGIN") {
            inside = true;
            body.clear();
        } else if line.starts_with("-----END") {
            inside = false;
            out.push(
                base64::engine::general_purpose::STANDARD
                    .decode(&body)
                    .unwrap(),
            );
        } else if inside {
            body.push_str(line.trim());
        }
    }
    out
}

/// The URI SAN and serial of the first certificate in a PEM file.
fn leaf_of(pem: &str) -> (String, String) {
    let der = pem_blocks(pem).into_iter().next().expect("a certificate");
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .unwrap();
    (uri, cert.raw_serial_as_string())
}

/// Whether the PKCS#8 P-256 key in `key_pem` is the key of the leaf in `cert_pem`.
fn key_matches(key_pem: &str, cert_pem: &str) -> bool {
    let key = pem_blocks(key_pem).into_iter().next().expect("a key");
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &key,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let der = pem_blocks(cert_pem)
        .into_iter()
        .next()
        .expect("a certificate");
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    use ring::signature::KeyPair as _;
    cert.public_key().subject_public_key.data.as_ref() == pair.public_key().as_ref()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// The X.509 files, under spiffe-helper's names.
const X509_FILES: &[&str] = &[
    "--svid-file-name",
    "svid.pem",
    "--svid-key-file-name",
    "svid_key.pem",
    "--svid-bundle-file-name",
    "svid_bundle.pem",
];

fn helper_args<'a>(out: &'a Path, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--cert-dir", out.to_str().unwrap()];
    args.extend_from_slice(X509_FILES);
    args.extend_from_slice(more);
    args
}

/// Whether a process runs with exactly this command line.
fn running(cmdline: &str) -> bool {
    fs::read_dir("/proc").unwrap().flatten().any(|p| {
        fs::read(p.path().join("cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
                == cmdline.split(' ').map(str::as_bytes).collect::<Vec<_>>()
        })
    })
}

/// A hook that hangs stopped every later rotation (spiffe-helper waits; `api watch` killed it
/// on each update). Here: rotations keep reaching disk while it hangs, and it is killed at
/// cmd_timeout, logged.
#[test]
fn a_hung_hook_neither_stops_rotation_nor_outlives_its_timeout() {
    let agent = agent_for_me(SHORT_TTLS);
    let out = agent.dir.path().join("certs");
    let hang = "sleep 987661";
    let mut helper = Helper::start(
        &agent.socket,
        agent.dir.path(),
        &helper_args(
            &out,
            &[
                "--cmd",
                "sleep",
                "--cmd-args",
                "987661",
                "--cmd-timeout",
                "4s",
            ],
        ),
    );
    let cert = out.join("svid.pem");
    helper.wait(20, "the first files", || cert.exists());
    helper.wait(10, "the hook runs", || running(hang));
    let (_, first) = leaf_of(&read(&cert));
    // While the hook hangs, two rotations (SVIDs of 2 s, renewed each second) reach disk.
    let mut serials = vec![first];
    helper.wait(3, "two rotations while the hook hangs", || {
        let (_, s) = leaf_of(&read(&cert));
        if !serials.contains(&s) {
            serials.push(s);
        }
        serials.len() >= 3
    });
    assert!(running(hang), "the hook was killed before its timeout");
    helper.wait_log(10, "cmd still running after 4s (cmd_timeout); killed it");
    // Updates came meanwhile: it runs once more, for the newest files.
    helper.wait(5, "the coalesced run", || running(hang));
    assert!(helper.log().contains("coalesced"), "{}", helper.log());
    assert!(helper.stop().success(), "{}", helper.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(hang) {
        assert!(Instant::now() < deadline, "the hook outlived the helper");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `api watch --write` names files by position: an entry added above the chosen one made
/// svid.0.pem another identity. The helper writes the identity it was given, whatever the
/// order; the default (no --spiffe-id) follows the first SVID, as documented.
#[test]
fn an_entry_added_above_does_not_change_the_identity_in_the_files() {
    let agent = Agent::start(&bin(), "");
    let uid = my_uid();
    let created = Command::new(bin())
        .args(["entry", "create", "--spiffe-id", "spiffe://example.org/web"])
        .arg("--selector")
        .arg(format!("unix:uid:{uid}"))
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let pinned = agent.dir.path().join("pinned");
    let default = agent.dir.path().join("default");
    let mut by_id = Helper::start(
        &agent.socket,
        agent.dir.path(),
        &helper_args(&pinned, &["--spiffe-id", "spiffe://example.org/web"]),
    );
    let mut first = Helper::start(&agent.socket, agent.dir.path(), &helper_args(&default, &[]));
    by_id.wait(20, "the pinned files", || pinned.join("svid.pem").exists());
    first.wait(20, "the default files", || {
        default.join("svid.pem").exists()
    });

    // A config entry (id config-0000) sorts before store entries (entry-...): it comes first.
    let mut config = fs::read_to_string(&agent.config).unwrap();
    config.push_str(&format!(
        "\n[[entries]]\nspiffe_id = \"spiffe://example.org/aaa\"\nselectors = [\"unix:uid:{uid}\"]\n"
    ));
    fs::write(&agent.config, config).unwrap();
    agent.signal("HUP");
    let fetched = Command::new(bin())
        .args(["api", "fetch", "x509", "--output", "json", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&fetched.stdout).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut json = json;
    while json["svids"][0]["spiffe_id"] != "spiffe://example.org/aaa" {
        assert!(
            Instant::now() < deadline,
            "the new entry is not first: {json}"
        );
        std::thread::sleep(Duration::from_millis(100));
        let fetched = Command::new(bin())
            .args(["api", "fetch", "x509", "--output", "json", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        json = serde_json::from_slice(&fetched.stdout).unwrap_or_default();
    }
    // The default identity moves to the new first SVID (documented); the pinned one stays.
    first.wait(10, "the default files follow the first SVID", || {
        leaf_of(&read(&default.join("svid.pem"))).0 == "spiffe://example.org/aaa"
    });
    // The pinned helper saw the same update, and left its files as they were.
    by_id.wait_log(
        10,
        "left the X.509 files of spiffe://example.org/web unchanged",
    );
    assert_eq!(
        leaf_of(&read(&pinned.join("svid.pem"))).0,
        "spiffe://example.org/web"
    );
    assert!(key_matches(
        &read(&pinned.join("svid_key.pem")),
        &read(&pinned.join("svid.pem"))
    ));

    // An ID this process does not get: nothing is written, and the log says why.
    let absent = agent.dir.path().join("absent");
    let mut missing = Helper::start(
        &agent.socket,
        agent.dir.path(),
        &helper_args(&absent, &["--spiffe-id", "spiffe://example.org/nope"]),
    );
    missing.wait_log(
        20,
        "spiffe://example.org/nope is not among the identities the agent sends this process",
    );
    assert!(!absent.join("svid.pem").exists());
}

/// The files of one update were renamed one at a time, so a reader could pair a new key with
/// an old certificate. A reader that checks what it read was on disk at one instant (the key
/// did not change while it read the certificate) must always find them matching.
#[test]
fn a_reader_racing_the_writer_never_sees_a_key_with_another_certificate() {
    let agent = agent_for_me(SHORT_TTLS);
    let out = agent.dir.path().join("certs");
    let mut helper = Helper::start(&agent.socket, agent.dir.path(), &helper_args(&out, &[]));
    let cert = out.join("svid.pem");
    let key = out.join("svid_key.pem");
    helper.wait(20, "the first files", || cert.exists());
    let stop = Instant::now() + Duration::from_secs(8);
    let (mut checked, mut torn_reads) = (0u64, 0u64);
    let mut serials = std::collections::BTreeSet::new();
    while Instant::now() < stop {
        let Ok(before) = fs::metadata(&key) else {
            continue;
        };
        let cert_pem = read(&cert);
        let Ok(key_pem) = fs::read_to_string(&key) else {
            continue;
        };
        let Ok(after) = fs::metadata(&key) else {
            continue;
        };
        if before.ino() != after.ino() {
            // The switch fell between the reads: what was read is not one instant.
            torn_reads += 1;
            continue;
        }
        checked += 1;
        serials.insert(leaf_of(&cert_pem).1);
        assert!(
            key_matches(&key_pem, &cert_pem),
            "a key with another update's certificate, after {checked} reads:\n{}",
            helper.log()
        );
    }
    assert!(serials.len() >= 5, "only {} rotations seen", serials.len());
    assert!(checked > 100 * torn_reads.max(1), "{checked} {torn_reads}");
    // Old versions are removed: one version directory is left.
    let versions = fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_str().unwrap();
            n.starts_with("..") && n != "..data"
        })
        .count();
    assert!(versions <= 2, "{versions} versions left");
}

/// JWT-SVID files for an audience, refreshed at half their lifetime, and the JWT bundle file
/// as spiffe-helper writes it: {"example.org": base64(JWKS)} holding the token's key.
#[test]
fn jwt_svid_files_refresh_and_the_jwks_file_holds_their_key() {
    let agent = agent_for_me(SHORT_TTLS);
    let out = agent.dir.path().join("jwt");
    let config = agent.dir.path().join("helper.toml");
    fs::write(
        &config,
        format!(
            "cert_dir = {:?}\njwt_bundle_file_name = \"bundle.json\"\n\
             jwt_svids = [{{jwt_audience = \"db\", jwt_extra_audiences = [\"cache\"], \
             jwt_svid_file_name = \"db.token\"}}]\n",
            out.display()
        ),
    )
    .unwrap();
    let mut helper = Helper::start(
        &agent.socket,
        agent.dir.path(),
        &["--config", config.to_str().unwrap()],
    );
    let token_path = out.join("db.token");
    helper.wait(20, "the token and the bundle", || {
        token_path.exists() && out.join("bundle.json").exists()
    });
    let token = read(&token_path);
    let part = |i: usize| -> serde_json::Value {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(i).unwrap())
            .unwrap();
        serde_json::from_slice(&b).unwrap()
    };
    let (header, claims) = (part(0), part(1));
    assert_eq!(claims["sub"], "spiffe://example.org/web");
    let aud = claims["aud"].to_string();
    assert!(
        aud.contains("\"db\"") && aud.contains("\"cache\""),
        "{claims}"
    );
    let bundle: serde_json::Value = serde_json::from_str(&read(&out.join("bundle.json"))).unwrap();
    let jwks: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(bundle["example.org"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(kids.contains(&header["kid"].as_str().unwrap()), "{jwks}");
    // The agent accepts the token from the file.
    let valid = Command::new(bin())
        .args(["api", "validate", "jwt", "--audience", "db", "--socket"])
        .arg(&agent.socket)
        .arg(&token)
        .output()
        .unwrap();
    assert!(valid.status.success(), "{valid:?}");
    // Tokens of 2 s are fetched again after about 1 s.
    helper.wait(5, "a new token", || {
        let t = read(&token_path);
        !t.is_empty() && t != token
    });
    assert_eq!(
        fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// File modes per kind, re-applied on every version, and owners (the tests run as root).
#[test]
fn files_get_their_modes_and_owners() {
    let agent = agent_for_me("");
    let out = agent.dir.path().join("modes");
    let mut more = vec![
        "--cert-file-mode",
        "0640",
        "--key-file-mode",
        "0400",
        "--svid-combined-file-name",
        "combined.pem",
        "--jwt-svid",
        "db=db.token",
        "--jwt-svid-file-mode",
        "0440",
    ];
    let root = my_uid() == 0;
    if root {
        more.extend(["--file-owner", "1000", "--key-file-group", "1001"]);
    }
    let mut helper = Helper::start(&agent.socket, agent.dir.path(), &helper_args(&out, &more));
    helper.wait(20, "the files", || {
        out.join("combined.pem").exists() && out.join("db.token").exists()
    });
    let meta = |n: &str| fs::metadata(out.join(n)).unwrap();
    let mode = |n: &str| meta(n).permissions().mode() & 0o7777;
    assert_eq!(mode("svid.pem"), 0o640);
    assert_eq!(mode("svid_bundle.pem"), 0o640);
    assert_eq!(mode("svid_key.pem"), 0o400);
    assert_eq!(mode("combined.pem"), 0o400);
    assert_eq!(mode("db.token"), 0o440);
    if root {
        assert_eq!(meta("svid.pem").uid(), 1000);
        assert_eq!(meta("svid_key.pem").uid(), 1000);
        assert_eq!(meta("svid_key.pem").gid(), 1001);
        assert_eq!(meta("combined.pem").gid(), 1001);
    }
    // The combined file: the chain, then its key.
    let combined = read(&out.join("combined.pem"));
    assert!(combined.contains("-----BEGIN PRIVATE KEY-----"));
    assert!(key_matches(
        &combined[combined.find("-----BEGIN PRIVATE KEY").unwrap()..],
        &combined
    ));
}

/// chown needs privilege: a helper that may not give its files away says so and, with
/// --once, exits 1 at once instead of waiting for its timeout.
#[test]
fn a_chown_without_privilege_fails_with_the_reason() {
    let agent = Agent::start(
        &bin(),
        "[[entries]]\nspiffe_id = \"spiffe://example.org/other\"\nselectors = [\"unix:uid:1000\"]\n",
    );
    let out = agent.dir.path().join("theirs");
    fs::create_dir(&out).unwrap();
    std::os::unix::fs::chown(&out, Some(1000), Some(1000)).unwrap();
    let started = Instant::now();
    let done = Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups"])
        .arg(bin())
        .arg("helper")
        .arg("--socket")
        .arg(&agent.socket)
        .args(helper_args(
            &out,
            &["--once", "--timeout", "20s", "--file-owner", "0"],
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(1), "{log}");
    assert!(log.contains("needs root or CAP_CHOWN"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(15), "{log}");
    assert!(!out.join("svid.pem").exists());
}

/// renew_signal + pid_file_name: the pid in the file is signalled after every update.
#[test]
fn the_pid_in_the_pid_file_is_signalled_after_updates() {
    let agent = agent_for_me(SHORT_TTLS);
    let dir = agent.dir.path();
    let out = dir.join("certs");
    let pid_file = dir.join("server.pid");
    let hups = dir.join("hups");
    // A non-interactive shell cannot trap a signal that was ignored when it started (POSIX),
    // and a test run under nohup ignores SIGHUP: reset it to the default first.
    // Killed when the test ends, failed or not (a leftover would hold the test's output pipe
    // open, and the test run would never end); its output goes nowhere for the same reason.
    let server = KillOnDrop(
        Command::new("env")
            .args(["--default-signal=HUP", "sh", "-c"])
            .arg("trap 'echo hup >> \"$1\"' HUP; echo $$ > \"$0\"; while :; do sleep 0.05; done")
            .arg(&pid_file)
            .arg(&hups)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while read(&pid_file).trim().is_empty() {
        assert!(Instant::now() < deadline, "the server wrote no pid file");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut helper = Helper::start(
        &agent.socket,
        dir,
        &helper_args(
            &out,
            &[
                "--renew-signal",
                "SIGHUP",
                "--pid-file-name",
                pid_file.to_str().unwrap(),
            ],
        ),
    );
    helper.wait(20, "two signals (first files, a rotation)", || {
        read(&hups).lines().count() >= 2
    });
    assert!(
        helper
            .log()
            .contains(&format!("sent SIGHUP to pid {}", server.0.id())),
        "{}",
        helper.log()
    );
}

/// A child process killed (and reaped) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// --once: waits for a socket that is not there yet, writes, exits 0; exits 1 after --timeout
/// when the agent never comes.
#[test]
fn once_waits_for_a_late_socket_and_fails_after_its_timeout() {
    let mut agent = agent_for_me("");
    agent.stop();
    let _ = fs::remove_file(&agent.socket);
    let out = agent.dir.path().join("once");
    let mut args = helper_args(&out, &["--once", "--timeout", "20s"]);
    args.extend([
        "--jwt-svid",
        "db=db.token",
        "--jwt-bundle-file-name",
        "jwks.json",
    ]);
    let started = Instant::now();
    let child = Command::new(bin())
        .arg("helper")
        .arg("--socket")
        .arg(&agent.socket)
        .args(&args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    agent.spawn();
    let done = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{log}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    for f in [
        "svid.pem",
        "svid_key.pem",
        "svid_bundle.pem",
        "db.token",
        "jwks.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing: {log}");
    }
    // All in one version: once written, the helper is gone (no hook, no daemon).
    assert_eq!(log.matches(": wrote ").count(), 1, "{log}");

    let never = agent.dir.path().join("never.sock");
    let started = Instant::now();
    let failed = Command::new(bin())
        .arg("helper")
        .arg("--socket")
        .arg(&never)
        .args(helper_args(
            &agent.dir.path().join("never"),
            &["--daemon-mode=false", "--timeout", "2s"],
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{log}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(log.contains("within 2s (--timeout)"), "{log}");
    assert!(log.contains(never.to_str().unwrap()), "{log}");
}

/// Updates that arrive while the command runs coalesce: it never runs twice at once, runs
/// far fewer times than there are updates, and runs once more after the last of them.
#[test]
fn updates_while_the_command_runs_coalesce_into_one_more_run() {
    let agent = agent_for_me(SHORT_TTLS);
    let dir = agent.dir.path();
    let out = dir.join("certs");
    let runs = dir.join("runs");
    let lock = dir.join("lock");
    let script = format!(
        "mkdir {lock} || echo overlap >> {runs}; echo run >> {runs}; sleep 2.5; rmdir {lock}",
        lock = lock.display(),
        runs = runs.display()
    );
    let cmd_args = format!("-c \"{script}\"");
    let mut helper = Helper::start(
        &agent.socket,
        dir,
        &helper_args(&out, &["--cmd", "sh", "--cmd-args", &cmd_args]),
    );
    helper.wait(20, "the first run", || read(&runs).contains("run"));
    std::thread::sleep(Duration::from_secs(8));
    helper.stop();
    let log = helper.log();
    let updates = log.matches(": wrote ").count();
    let ran = read(&runs).matches("run").count();
    assert!(!read(&runs).contains("overlap"), "two runs at once:\n{log}");
    assert!(updates >= 6, "{updates} updates:\n{log}");
    assert!(
        ran >= 3 && ran * 2 <= updates + 2,
        "{ran} runs for {updates} updates:\n{log}"
    );
    assert!(log.contains("coalesced"), "{log}");
}

/// Files within 10% of their lifetime of expiry, with no newer SVID: a warning in the log,
/// and spiffed_helper_file_near_expiry turns 1 on --metrics-listen.
#[test]
fn files_near_expiry_are_logged_and_measured() {
    // SVIDs of 20 s: the agent backdates notBefore by 10 s, so the certificate says 30 s, and
    // its last 10% (3 s) starts 7 s after the rotation at half-life would have come.
    let mut agent = agent_for_me("x509_svid_ttl = \"20s\"\n");
    let out = agent.dir.path().join("certs");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut helper = Helper::start(
        &agent.socket,
        agent.dir.path(),
        &helper_args(&out, &["--metrics-listen", &listen]),
    );
    helper.wait(20, "the files", || out.join("svid.pem").exists());
    let scrape = |path: &str| -> String {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let metrics = scrape("/metrics");
    assert!(
        metrics.contains("spiffed_helper_file_near_expiry{file=\"svid.pem\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("spiffed_helper_ready 1"), "{metrics}");
    assert!(scrape("/ready").starts_with("HTTP/1.1 200"));
    // The agent goes away: no rotation comes.
    agent.kill9();
    helper.wait_log(25, "within 10% of their lifetime of expiry");
    let metrics = scrape("/metrics");
    assert!(
        metrics.contains("spiffed_helper_file_near_expiry{file=\"svid.pem\"} 1"),
        "{metrics}"
    );
    helper.wait(10, "expired files make /ready 503", || {
        scrape("/ready").starts_with("HTTP/1.1 503")
    });
}

/// Under an upstream CA the chain has intermediates: they follow the leaf in the chain file,
/// or go into the bundle file with add_intermediates_to_bundle (spiffe-helper's option).
#[test]
fn intermediates_follow_the_leaf_or_go_to_the_bundle_on_request() {
    let up = tempfile::tempdir().unwrap();
    let _pki = crate::upstream::upstream_pki(up.path());
    let agent = crate::upstream::host_with(up.path(), "");
    let plain = agent.dir.path().join("plain");
    let moved = agent.dir.path().join("moved");
    let mut a = Helper::start(&agent.socket, agent.dir.path(), &helper_args(&plain, &[]));
    let mut b = Helper::start(
        &agent.socket,
        agent.dir.path(),
        &helper_args(&moved, &["--add-intermediates-to-bundle"]),
    );
    a.wait(20, "the files", || plain.join("svid_bundle.pem").exists());
    b.wait(20, "the files", || moved.join("svid_bundle.pem").exists());
    let count = |p: &Path| pem_blocks(&read(p)).len();
    let chain = count(&plain.join("svid.pem"));
    let roots = count(&plain.join("svid_bundle.pem"));
    assert!(chain >= 2, "leaf and intermediates: {chain}");
    assert_eq!(count(&moved.join("svid.pem")), 1);
    assert_eq!(count(&moved.join("svid_bundle.pem")), roots + chain - 1);
    // The leaf is the same in both.
    assert_eq!(
        leaf_of(&read(&plain.join("svid.pem"))),
        leaf_of(&read(&moved.join("svid.pem")))
    );
}

/// kill -9 at any moment leaves files a restart can use: the names still resolve to one
/// complete version, and the restart removes what an interrupted update left.
#[test]
fn kill_9_during_rotations_and_a_restart_leave_one_complete_version() {
    let agent = agent_for_me(SHORT_TTLS);
    let out = agent.dir.path().join("certs");
    for round in 0..5u64 {
        let mut helper = Helper::start(&agent.socket, agent.dir.path(), &helper_args(&out, &[]));
        helper.wait(20, "the files", || out.join("svid.pem").exists());
        std::thread::sleep(Duration::from_millis(150 * round + 100));
        helper.child.kill().unwrap();
        helper.child.wait().unwrap();
        // What is on disk after the kill is one update's files.
        assert!(key_matches(
            &read(&out.join("svid_key.pem")),
            &read(&out.join("svid.pem"))
        ));
    }
    // An update cut short before its switch: a version and a link nobody points to.
    let half = out.join("..2000_01_01_00_00_00.000000000_1");
    fs::create_dir(&half).unwrap();
    fs::write(half.join("svid_key.pem"), "half").unwrap();
    std::os::unix::fs::symlink("..2000_01_01_00_00_00.000000000_1", out.join("..data_tmp"))
        .unwrap();
    let mut helper = Helper::start(&agent.socket, agent.dir.path(), &helper_args(&out, &[]));
    helper.wait_log(20, "update #1: wrote");
    assert!(!half.exists(), "the half-written version is still there");
    assert!(!out.join("..data_tmp").exists());
    let versions = fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_str().unwrap().starts_with("..20"))
        .count();
    assert!(versions <= 2, "{versions} versions");
    assert!(key_matches(
        &read(&out.join("svid_key.pem")),
        &read(&out.join("svid.pem"))
    ));
}

/// include_federated_domains adds the CAs of the trust domains the entry federates with to the
/// bundle file; without it the bundle file holds the own trust domain only. The JWT bundle
/// file has a member per trust domain.
#[test]
fn federated_cas_join_the_bundle_file_on_request() {
    let uid = my_uid();
    let agent = Agent::start(
        &bin(),
        &format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/web\"\nselectors = [\"unix:uid:{uid}\"]\nfederates_with = [\"other.org\"]\n"
        ),
    );
    let other = crate::federation::foreign("other.org");
    crate::federation::set_ok(&agent, "other.org", &other.doc);
    let with = agent.dir.path().join("with");
    let without = agent.dir.path().join("without");
    let mut a = Helper::start(
        &agent.socket,
        agent.dir.path(),
        &helper_args(
            &with,
            &[
                "--include-federated-domains",
                "--jwt-bundle-file-name",
                "jwt_bundle.json",
            ],
        ),
    );
    let mut b = Helper::start(&agent.socket, agent.dir.path(), &helper_args(&without, &[]));
    a.wait(20, "the files", || with.join("jwt_bundle.json").exists());
    b.wait(20, "the files", || without.join("svid_bundle.pem").exists());
    let with_cas = pem_blocks(&read(&with.join("svid_bundle.pem")));
    let without_cas = pem_blocks(&read(&without.join("svid_bundle.pem")));
    assert!(with_cas.contains(&other.ca_der));
    assert!(!without_cas.contains(&other.ca_der));
    assert_eq!(with_cas.len(), without_cas.len() + 1);
    let jwt: serde_json::Value =
        serde_json::from_str(&read(&with.join("jwt_bundle.json"))).unwrap();
    assert!(
        jwt["example.org"].is_string() && jwt["other.org"].is_string(),
        "{jwt}"
    );
}

/// The files of one version, read through `..data` at one moment (retried if an update
/// removes the version while it is read).
fn snapshot(out: &Path, names: &[&str]) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let version = fs::read_link(out.join("..data")).unwrap();
        let read: Result<Vec<Vec<u8>>, _> = names
            .iter()
            .map(|n| fs::read(out.join(&version).join(n)))
            .collect();
        if let Ok(files) = read
            && fs::read_link(out.join("..data")).unwrap() == version
        {
            return files;
        }
        assert!(Instant::now() < deadline, "no stable version to read");
    }
}

/// `openssl pkcs12 -in F -passin file:PW -nodes`: (its output, success).
fn openssl_pkcs12(p12: &Path, passin: &str) -> (String, String, bool) {
    let out = Command::new("openssl")
        .args(["pkcs12", "-nodes", "-in"])
        .arg(p12)
        .args(["-passin", passin])
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// `keytool -list -v` of a PKCS#12 file: its output, after checking it succeeded.
fn keytool_list(p12: &Path, password_file: &Path) -> String {
    let out = Command::new("keytool")
        .args(["-list", "-v", "-storetype", "PKCS12", "-keystore"])
        .arg(p12)
        .arg("-storepass:file")
        .arg(password_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "keytool: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A serial as keytool prints it: lower-case hex, no colons, no leading zeros.
fn keytool_serial(colon_hex: &str) -> String {
    let hex: String = colon_hex.replace(':', "").to_ascii_lowercase();
    hex.trim_start_matches('0').to_owned()
}

/// The PKCS#12 keystore and truststore for Java, checked by implementations we did not
/// write: OpenSSL extracts the key of the leaf (and refuses a wrong password at the MAC),
/// keytool lists one PrivateKeyEntry with the chain and the CA as trustedCertEntry, and after
/// a rotation the keystore holds the new certificate and still opens.
#[test]
fn the_pkcs12_files_open_in_openssl_and_keytool_and_follow_rotations() {
    let agent = agent_for_me(SHORT_TTLS);
    let dir = agent.dir.path();
    let out = dir.join("java");
    let password = dir.join("p12.pass");
    fs::write(&password, "it's a s3cret\n").unwrap();
    fs::set_permissions(&password, fs::Permissions::from_mode(0o600)).unwrap();
    let mut helper = Helper::start(
        &agent.socket,
        dir,
        &helper_args(
            &out,
            &[
                "--svid-pkcs12-file-name",
                "keystore.p12",
                "--svid-bundle-pkcs12-file-name",
                "truststore.p12",
                "--pkcs12-password-file",
                password.to_str().unwrap(),
            ],
        ),
    );
    helper.wait(20, "the PKCS#12 files", || {
        out.join("keystore.p12").exists() && out.join("truststore.p12").exists()
    });
    let mode = |n: &str| fs::metadata(out.join(n)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("keystore.p12"), 0o600);
    assert_eq!(mode("truststore.p12"), 0o644);

    // One version's keystore, chain file and bundle file, copied out of the way of rotations.
    let copy = |files: &[Vec<u8>]| {
        fs::write(dir.join("keystore.p12"), &files[0]).unwrap();
        fs::write(dir.join("truststore.p12"), &files[3]).unwrap();
        (
            String::from_utf8(files[1].clone()).unwrap(),
            String::from_utf8(files[2].clone()).unwrap(),
        )
    };
    let names = [
        "keystore.p12",
        "svid.pem",
        "svid_bundle.pem",
        "truststore.p12",
    ];
    let (chain_pem, bundle_pem) = copy(&snapshot(&out, &names));
    let keystore = dir.join("keystore.p12");
    let passin = format!("file:{}", password.display());

    // OpenSSL: the key is the leaf's, the leaf is this version's SVID.
    let (text, err, ok) = openssl_pkcs12(&keystore, &passin);
    assert!(ok, "openssl pkcs12: {err}");
    let at = text.find("-----BEGIN PRIVATE KEY-----").expect("a key");
    let (certs, key) = text.split_at(at);
    assert!(key_matches(key, certs), "{text}");
    let (id, serial) = leaf_of(certs);
    assert_eq!(id, "spiffe://example.org/web");
    assert_eq!(serial, leaf_of(&chain_pem).1);
    assert!(
        text.contains("friendlyName: spiffe://example.org/web"),
        "{text}"
    );
    // A wrong password fails at the MAC.
    let (_, err, ok) = openssl_pkcs12(&keystore, "pass:it's a s3cret!");
    assert!(!ok);
    assert!(err.contains("Mac verify error"), "{err}");

    // keytool: one PrivateKeyEntry under the SPIFFE ID, its chain ending in the leaf's CA.
    let listed = keytool_list(&keystore, &password);
    assert!(
        listed.contains("Your keystore contains 1 entry"),
        "{listed}"
    );
    assert!(
        listed.contains("Alias name: spiffe://example.org/web"),
        "{listed}"
    );
    assert!(listed.contains("Entry type: PrivateKeyEntry"), "{listed}");
    assert!(listed.contains("Certificate chain length: 1"), "{listed}");
    assert!(
        listed.contains(&format!("Serial number: {}", keytool_serial(&serial))),
        "{listed}"
    );
    // The truststore: the bundle file's CA, trusted.
    let trusted = keytool_list(&dir.join("truststore.p12"), &password);
    let cas = pem_blocks(&bundle_pem);
    assert!(
        trusted.contains(&format!("Your keystore contains {} entr", cas.len())),
        "{trusted}"
    );
    assert!(trusted.contains("Alias name: example.org-1"), "{trusted}");
    assert_eq!(
        trusted.matches("Entry type: trustedCertEntry").count(),
        cas.len(),
        "{trusted}"
    );

    // A rotation: the keystore holds the new certificate, with its key, and still opens.
    let mut rotated = None;
    helper.wait(10, "a rotation in the keystore", || {
        let (chain_pem, _) = copy(&snapshot(&out, &names));
        let (text, _, ok) = openssl_pkcs12(&keystore, &passin);
        let new = leaf_of(&chain_pem).1;
        if ok && new != serial {
            rotated = Some((text, new));
        }
        rotated.is_some()
    });
    let (text, new) = rotated.unwrap();
    let at = text.find("-----BEGIN PRIVATE KEY-----").expect("a key");
    let (certs, key) = text.split_at(at);
    assert_eq!(leaf_of(certs).1, new);
    assert!(key_matches(key, certs));
    assert!(keytool_list(&keystore, &password).contains("Entry type: PrivateKeyEntry"));
}

/// Under an upstream CA the keystore carries the intermediates after the leaf (a Java server
/// sends them), whatever add_intermediates_to_bundle does with the PEM files.
#[test]
fn the_pkcs12_keystore_carries_the_intermediates() {
    let up = tempfile::tempdir().unwrap();
    let _pki = crate::upstream::upstream_pki(up.path());
    let agent = crate::upstream::host_with(up.path(), "");
    let out = agent.dir.path().join("java");
    let password = agent.dir.path().join("p12.pass");
    fs::write(&password, "pw\n").unwrap();
    let mut helper = Helper::start(
        &agent.socket,
        agent.dir.path(),
        &helper_args(
            &out,
            &[
                "--add-intermediates-to-bundle",
                "--svid-pkcs12-file-name",
                "keystore.p12",
                "--pkcs12-password-file",
                password.to_str().unwrap(),
            ],
        ),
    );
    helper.wait(20, "the keystore", || out.join("keystore.p12").exists());
    let files = snapshot(&out, &["keystore.p12", "svid_bundle.pem", "svid.pem"]);
    let keystore = agent.dir.path().join("keystore.p12");
    fs::write(&keystore, &files[0]).unwrap();
    let roots_and_intermediates = pem_blocks(&String::from_utf8(files[1].clone()).unwrap());
    assert_eq!(
        pem_blocks(&String::from_utf8(files[2].clone()).unwrap()).len(),
        1
    );
    let listed = keytool_list(&keystore, &password);
    assert!(listed.contains("Entry type: PrivateKeyEntry"), "{listed}");
    let length: usize = listed
        .lines()
        .find_map(|l| l.strip_prefix("Certificate chain length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The leaf, and at least one intermediate that the bundle file got instead.
    assert!(length >= 2, "{listed}");
    assert!(roots_and_intermediates.len() >= 2);
    let (text, err, ok) = openssl_pkcs12(&keystore, "pass:pw");
    assert!(ok, "{err}");
    let certs = &text[..text.find("-----BEGIN PRIVATE KEY-----").unwrap()];
    assert_eq!(pem_blocks(certs).len(), length);
}
