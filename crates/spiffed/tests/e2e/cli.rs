//! The `spiffed api` client run as a subprocess against a real agent: the JWT profile
//! (`fetch jwt`, `validate jwt`) and `fetch bundles` with its JWT authorities.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::Value;
use spiffed_test_support::Agent;

use crate::{agent_for_me, bin};

/// Runs `spiffed api ARGS --socket SOCKET`.
fn api(agent: &Agent, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("api")
        .args(args)
        .arg("--socket")
        .arg(&agent.socket)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `spiffed api ARGS --socket SOCKET` with `input` on standard input.
fn api_with_stdin(agent: &Agent, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(bin())
        .arg("api")
        .args(args)
        .arg("--socket")
        .arg(&agent.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts exit 0 and returns stdout.
fn ok(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// Asserts the exit code and returns stderr.
fn fails_with(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    stderr(out)
}

/// The claims of a JWT, decoded without verification.
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a three-part JWT");
    serde_json::from_slice(&B64URL.decode(payload).unwrap()).unwrap()
}

/// Fetches one token for `audience` with `--output json`.
fn fetch_token(agent: &Agent, audience: &str) -> String {
    let out = api(
        agent,
        &["fetch", "jwt", "--audience", audience, "--output", "json"],
    );
    let json: Value = serde_json::from_str(&ok(&out)).unwrap();
    json["svids"][0]["token"].as_str().unwrap().to_owned()
}

#[test]
fn fetch_jwt_prints_token_identity_expiry_and_audience() {
    let agent = agent_for_me("");

    // JSON.
    let out = api(
        &agent,
        &[
            "fetch",
            "jwt",
            "--audience",
            "svc-a",
            "--audience",
            "svc-b",
            "--output",
            "json",
        ],
    );
    let json: Value = serde_json::from_str(&ok(&out)).unwrap();
    let svids = json["svids"].as_array().unwrap();
    assert_eq!(svids.len(), 1, "{json}");
    let svid = &svids[0];
    assert_eq!(svid["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(svid["hint"], "internal");
    assert_eq!(svid["audience"], serde_json::json!(["svc-a", "svc-b"]));
    let token = svid["token"].as_str().unwrap();
    let c = claims(token);
    assert_eq!(c["sub"], "spiffe://example.org/web");
    let aud: Vec<&str> = match &c["aud"] {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().map(|v| v.as_str().unwrap()).collect(),
        other => panic!("aud is {other}"),
    };
    assert!(aud.contains(&"svc-a") && aud.contains(&"svc-b"), "{aud:?}");
    let exp = c["exp"].as_i64().unwrap();
    let expires_at = svid["expires_at"].as_str().unwrap();
    let parsed =
        time::OffsetDateTime::parse(expires_at, &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert_eq!(parsed.unix_timestamp(), exp, "{expires_at}");

    // Text: the token on a line of its own, then the identity.
    let out = api(&agent, &["fetch", "jwt", "--audience", "svc-a"]);
    let text = ok(&out);
    let token_line = text
        .lines()
        .find(|l| l.starts_with("ey") && l.split('.').count() == 3)
        .unwrap_or_else(|| panic!("no token line in:\n{text}"));
    assert_eq!(claims(token_line)["sub"], "spiffe://example.org/web");
    for want in [
        "SPIFFE ID:     spiffe://example.org/web",
        "Hint:          internal",
        "Expires at:    ",
        "Audience:      svc-a",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // One identity by --spiffe-id.
    let out = api(
        &agent,
        &[
            "fetch",
            "jwt",
            "--audience",
            "svc-a",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--output",
            "json",
        ],
    );
    let json: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(json["svids"][0]["spiffe_id"], "spiffe://example.org/web");
}

#[test]
fn fetch_jwt_refusals_exit_with_clear_messages() {
    let agent = agent_for_me("");

    // Not entitled: exit 1, and the message says so (not "no entry matches this process").
    let out = api(
        &agent,
        &[
            "fetch",
            "jwt",
            "--audience",
            "svc-a",
            "--spiffe-id",
            "spiffe://example.org/nope",
        ],
    );
    let err = fails_with(&out, 1);
    assert!(
        err.contains("not entitled to spiffe://example.org/nope"),
        "{err}"
    );
    assert!(stdout(&out).is_empty());

    // A malformed --spiffe-id is a usage error, caught before the agent is asked.
    let out = api(
        &agent,
        &[
            "fetch",
            "jwt",
            "--audience",
            "a",
            "--spiffe-id",
            "not-an-id",
        ],
    );
    let err = fails_with(&out, 64);
    assert!(err.contains("--spiffe-id"), "{err}");

    // --audience is required, and may not be empty.
    let err = fails_with(&api(&agent, &["fetch", "jwt"]), 64);
    assert!(err.contains("--audience"), "{err}");
    fails_with(&api(&agent, &["fetch", "jwt", "--audience", ""]), 64);
}

#[test]
fn validate_jwt_accepts_the_fetched_token_and_rejects_others_with_the_reason() {
    let agent = agent_for_me("");
    let token = fetch_token(&agent, "svc-a");

    // Valid: text.
    let out = api(&agent, &["validate", "jwt", "--audience", "svc-a", &token]);
    let text = ok(&out);
    assert!(text.starts_with("Token is valid.\n"), "{text}");
    assert!(
        text.contains("SPIFFE ID:     spiffe://example.org/web"),
        "{text}"
    );
    assert!(
        text.contains("\"sub\": \"spiffe://example.org/web\""),
        "{text}"
    );
    assert!(!text.contains(&token), "the token is not echoed:\n{text}");

    // Valid: JSON, with the token on standard input.
    let out = api_with_stdin(
        &agent,
        &[
            "validate",
            "jwt",
            "--audience",
            "svc-a",
            "--output",
            "json",
            "-",
        ],
        &format!("{token}\n"),
    );
    let json: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(json["claims"]["sub"], "spiffe://example.org/web");
    assert_eq!(json["claims"]["exp"], claims(&token)["exp"]);

    // Another audience: exit 1 with the reason.
    let out = api(&agent, &["validate", "jwt", "--audience", "svc-z", &token]);
    let err = fails_with(&out, 1);
    assert!(err.contains("Token is not valid: "), "{err}");
    assert!(err.contains("audience"), "{err}");
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    assert!(!err.contains(&token), "the token is not echoed:\n{err}");

    // The same in JSON.
    let out = api(
        &agent,
        &[
            "validate",
            "jwt",
            "--audience",
            "svc-z",
            "--output",
            "json",
            &token,
        ],
    );
    fails_with(&out, 1);
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["valid"], false);
    assert!(
        json["reason"].as_str().unwrap().contains("audience"),
        "{json}"
    );

    // Garbage.
    let out = api(
        &agent,
        &["validate", "jwt", "--audience", "svc-a", "not.a.token"],
    );
    let err = fails_with(&out, 1);
    assert!(err.contains("Token is not valid: "), "{err}");

    // An empty token is a usage error.
    let out = api_with_stdin(
        &agent,
        &["validate", "jwt", "--audience", "svc-a", "-"],
        "\n",
    );
    let err = fails_with(&out, 64);
    assert!(err.contains("no token"), "{err}");
}

#[test]
fn fetch_bundles_lists_jwt_authorities_beside_x509_ones() {
    let agent = agent_for_me("");

    let out = api(&agent, &["fetch", "bundles", "--output", "json"]);
    let json: Value = serde_json::from_str(&ok(&out)).unwrap();
    let bundle = json["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["trust_domain"] == "example.org")
        .unwrap_or_else(|| panic!("no example.org bundle in {json}"));
    assert!(
        !bundle["x509_authorities"].as_array().unwrap().is_empty(),
        "{json}"
    );
    let jwt = bundle["jwt_authorities"].as_array().unwrap();
    assert!(!jwt.is_empty(), "{json}");
    for authority in jwt {
        assert!(!authority["kid"].as_str().unwrap().is_empty(), "{json}");
        assert_eq!(authority["key_type"], "EC P-256", "{json}");
    }
    // The fetched token names one of them.
    let token = fetch_token(&agent, "svc-a");
    let header: Value =
        serde_json::from_slice(&B64URL.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    assert!(
        jwt.iter().any(|a| a["kid"] == header["kid"]),
        "kid {} not in {json}",
        header["kid"]
    );

    let text = ok(&api(&agent, &["fetch", "bundles"]));
    for want in [
        "Trust domain:  example.org",
        "X.509 authorities: ",
        "JWT authorities: ",
        "Key type:    EC P-256",
        "Valid until: unknown",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

/// Runs `spiffed api ARGS --socket SOCKET` with standard output going to `stdout`.
fn api_to(agent: &Agent, args: &[&str], stdout: Stdio) -> Output {
    Command::new(bin())
        .arg("api")
        .args(args)
        .arg("--socket")
        .arg(&agent.socket)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap()
}

/// The write end of a pipe whose reader is already gone (`| head -c0`).
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

fn dev_full() -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    )
}

/// Issue 10 item 15: `spiffed api fetch x509 | head -c1` and `> /dev/full` panicked (exit 101).
/// What a command prints on standard error when standard output is a full disk: the message,
/// or its JSON form under `--output json`.
fn full_stdout_message<S: AsRef<str>>(args: &[S]) -> String {
    if args.iter().any(|a| a.as_ref() == "json") {
        "{\"error\":\"cannot write to stdout: No space left on device\",\"exit_code\":74,\"kind\":\"stdout\"}\n".to_owned()
    } else {
        "spiffed: cannot write to stdout: No space left on device\n".to_owned()
    }
}

#[test]
fn a_closed_or_full_stdout_ends_commands_without_a_panic() {
    let agent = agent_for_me("");
    let commands: &[&[&str]] = &[
        &["fetch", "x509"],
        &["fetch", "x509", "--output", "json"],
        &["fetch", "bundles"],
        &["fetch", "jwt", "--audience", "a"],
        &["watch"],
    ];
    for args in commands {
        let out = api_to(&agent, args, dev_full());
        let err = fails_with(&out, 74);
        assert_eq!(err, full_stdout_message(args), "{args:?}");
        let out = api_to(&agent, args, closed_pipe());
        let err = fails_with(&out, 141);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Issue 10 item 15: the admin commands (`spiffed entry list | head`, `> /dev/full`) panicked
/// (exit 101) the same way.
#[test]
fn a_closed_or_full_stdout_ends_admin_commands_without_a_panic() {
    let agent = agent_for_me("");
    grant_me(&agent, "spiffe://example.org/listed");
    let run = |args: &[String], stdout: Stdio| {
        Command::new(bin())
            .args(args)
            .arg("--admin-socket")
            .arg(&agent.admin_socket)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // Each create names a new uid, so that every attempt creates (and prints) an entry.
    let mut uid = 4242;
    let mut commands = move || -> Vec<Vec<String>> {
        uid += 1;
        vec![
            vec!["entry".into(), "list".into()],
            vec![
                "entry".into(),
                "list".into(),
                "--output".into(),
                "json".into(),
            ],
            vec![
                "entry".into(),
                "create".into(),
                "--spiffe-id".into(),
                "spiffe://example.org/x".into(),
                "--selector".into(),
                format!("unix:uid:{uid}"),
            ],
        ]
    };
    for args in commands() {
        let err = fails_with(&run(&args, dev_full()), 74);
        assert_eq!(err, full_stdout_message(&args), "{args:?}");
    }
    for args in commands() {
        let err = fails_with(&run(&args, closed_pipe()), 141);
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

/// `spiffed entry create` for `spiffe_id`, granted to the test's uid.
fn grant_me(agent: &Agent, spiffe_id: &str) {
    let uid = spiffed_test_support::my_uid();
    let out = Command::new(bin())
        .args(["entry", "create", "--spiffe-id", spiffe_id, "--selector"])
        .arg(format!("unix:uid:{uid}"))
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .output()
        .unwrap();
    ok(&out);
}

/// Waits up to 20 s for `path` to exist.
fn wait_for_file(
    path: &std::path::Path,
    watch: &mut std::process::Child,
    stderr: &std::path::Path,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !path.exists() {
        if let Some(status) = watch.try_wait().unwrap() {
            panic!(
                "the watch exited ({status}) before writing {}:\n{}",
                path.display(),
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} not written within 20 s:\n{}",
            path.display(),
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A running `spiffed api watch`, ended with SIGTERM (as a service manager does) on drop.
struct Watch {
    child: std::process::Child,
    stderr: std::path::PathBuf,
}

impl Watch {
    fn start(agent: &Agent, args: &[&str], stdout: Stdio) -> Self {
        let stderr = agent.dir.path().join(format!("watch-{}.err", args.len()));
        let child = Command::new(bin())
            .args(["api", "watch"])
            .args(args)
            .arg("--socket")
            .arg(&agent.socket)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self { child, stderr }
    }

    fn wait_for(&mut self, path: &std::path::Path) {
        wait_for_file(path, &mut self.child, &self.stderr);
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to 20 s for the watch to write `text` on stderr.
    fn wait_for_stderr(&self, text: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !self.stderr().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "{text:?} not written within 20 s:\n{}",
                self.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the watch ignored SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
    }
}

/// Whether a process runs with exactly this command line.
fn running(cmdline: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read(p.path().join("cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
                == cmdline.split(' ').map(str::as_bytes).collect::<Vec<_>>()
        })
    })
}

/// Whether no process runs `cmdline` within 10 s (a killed process may take a moment to go).
fn gone(cmdline: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while running(cmdline) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    true
}

/// Issue 10 item 15: a helper daemon (`api watch --write`) died when its stdout was closed.
#[test]
fn a_watch_writing_files_outlives_its_closed_stdout() {
    let agent = agent_for_me("");
    let out = agent.dir.path().join("out");
    let mut watch = Watch::start(&agent, &["--write", out.to_str().unwrap()], closed_pipe());
    watch.wait_for(&out.join("svid.0.pem"));
    watch.wait_for_stderr("no longer printing");
    // It goes on: the next update, after stdout failed, still reaches the files.
    grant_me(&agent, "spiffe://example.org/two");
    watch.wait_for(&out.join("svid.1.pem"));
    assert!(watch.stop().success(), "{}", watch.stderr());
    assert!(!watch.stderr().contains("panicked"), "{}", watch.stderr());
}

/// Issue 10 item 15: `api watch --exec` with a hanging command stopped every later update.
#[test]
fn a_hanging_exec_command_does_not_stop_later_updates() {
    let agent = Agent::start(&bin(), "");
    grant_me(&agent, "spiffe://example.org/one");
    let out = agent.dir.path().join("out");
    let hang = "sleep 987651";
    let mut watch = Watch::start(
        &agent,
        &["--write", out.to_str().unwrap(), "--exec", hang],
        Stdio::null(),
    );
    watch.wait_for(&out.join("svid.0.pem"));
    // A second identity: the agent pushes an update while the command still hangs.
    grant_me(&agent, "spiffe://example.org/two");
    watch.wait_for(&out.join("svid.1.pem"));
    // Logged after the new files are renamed into place, so wait for it too.
    watch.wait_for_stderr("is still running; killing it");
    assert!(watch.stop().success(), "{}", watch.stderr());
    assert!(gone(hang), "the command outlived the watch");

    // --exec-timeout: the command is killed with its process group, and logged.
    let out2 = agent.dir.path().join("out2");
    let hang = "sleep 987652";
    let mut watch = Watch::start(
        &agent,
        &[
            "--write",
            out2.to_str().unwrap(),
            "--exec",
            hang,
            "--exec-timeout",
            "1s",
        ],
        Stdio::null(),
    );
    watch.wait_for(&out2.join("svid.1.pem"));
    watch.wait_for_stderr("--exec-timeout");
    assert!(gone(hang), "the timed-out command is still running");
    assert!(watch.stop().success(), "{}", watch.stderr());
}

/// The public key of a PEM certificate or private key, as `openssl` prints it.
fn openssl_public_key(args: &[&str], pem: &str) -> String {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    ok(&child.wait_with_output().unwrap())
}

/// Issue 16 item 4: `api fetch x509 --output json` carries the chain and the bundles as PEM, as
/// spire-agent's `-output json` carries them, and the private key only when asked for.
#[test]
fn fetch_x509_json_carries_pem_chain_bundle_and_the_key_only_on_request() {
    let agent = agent_for_me("");
    let json: Value =
        serde_json::from_str(&ok(&api(&agent, &["fetch", "x509", "--output", "json"]))).unwrap();
    let svid = &json["svids"][0];
    assert_eq!(svid["spiffe_id"], "spiffe://example.org/web", "{json}");
    let chain = svid["chain_pem"].as_str().unwrap();
    assert_eq!(
        chain.matches("-----BEGIN CERTIFICATE-----").count(),
        svid["chain_len"].as_u64().unwrap() as usize,
        "{chain}"
    );
    let bundle = svid["bundle_pem"].as_str().unwrap();
    assert!(bundle.contains("-----BEGIN CERTIFICATE-----"), "{json}");
    assert_eq!(json["bundles"][0]["trust_domain"], "example.org");
    assert_eq!(json["bundles"][0]["pem"], bundle);
    // The chain verifies against the bundle, as a reader of the JSON would check it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("chain.pem"), chain).unwrap();
    std::fs::write(dir.path().join("bundle.pem"), bundle).unwrap();
    let verify = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "bundle.pem",
            "-partial_chain",
            "chain.pem",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    ok(&verify);
    assert!(svid.get("key_pem").is_none(), "no key unless asked: {json}");
    let text = ok(&api(&agent, &["fetch", "x509"]));
    assert!(!text.contains("PRIVATE KEY"), "{text}");

    let out = api(
        &agent,
        &["fetch", "x509", "--output", "json", "--include-key"],
    );
    let json: Value = serde_json::from_str(&ok(&out)).unwrap();
    let key = json["svids"][0]["key_pem"].as_str().unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{key}");
    let chain = json["svids"][0]["chain_pem"].as_str().unwrap();
    assert_eq!(
        openssl_public_key(&["pkey", "-pubout"], key),
        openssl_public_key(&["x509", "-pubkey", "-noout"], chain),
        "the key goes with the leaf"
    );

    // Under --output json, what else goes to standard error is JSON lines too.
    let written = dir.path().join("files");
    let out = api(
        &agent,
        &[
            "fetch",
            "x509",
            "--output",
            "json",
            "--write",
            written.to_str().unwrap(),
        ],
    );
    ok(&out);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    let note: Value = serde_json::from_str(&err).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(note["kind"], "message", "{note}");
    assert!(
        note["message"].as_str().unwrap().starts_with("wrote "),
        "{note}"
    );

    // Text output never shows the key: the flag without JSON is a usage error.
    let err = fails_with(&api(&agent, &["fetch", "x509", "--include-key"]), 64);
    assert!(err.contains("--output json"), "{err}");
}

/// Issue 16 item 4: under `--output json` an error is one JSON line on standard error, so that
/// a script reads one format on both streams; without it, the usual message.
#[test]
fn errors_under_output_json_are_json_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let missing = missing.to_str().unwrap();
    for (args, code, kind) in [
        (
            vec![
                "api", "fetch", "x509", "--socket", missing, "--output", "json",
            ],
            1,
            "failure",
        ),
        (
            vec!["entry", "list", "--admin-socket", missing, "--output=json"],
            1,
            "failure",
        ),
        (
            vec!["api", "fetch", "x509", "--output", "json", "--no-such-flag"],
            64,
            "usage",
        ),
        (
            vec![
                "api", "fetch", "x509", "--socket", "tcp://x", "--output", "json",
            ],
            64,
            "usage",
        ),
    ] {
        let out = run(&args);
        let err = fails_with(&out, code);
        assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        let json: Value = serde_json::from_str(&err)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {err}"));
        assert_eq!(json["kind"], kind, "{args:?}: {json}");
        assert_eq!(json["exit_code"], code, "{args:?}: {json}");
        assert!(!json["error"].as_str().unwrap().is_empty(), "{json}");
    }
    // The same failure in text mode is the readable message.
    let err = fails_with(&run(&["api", "fetch", "x509", "--socket", missing]), 1);
    assert!(err.starts_with("spiffed: error: "), "{err}");
    assert!(serde_json::from_str::<Value>(&err).is_err(), "{err}");
}

#[test]
fn run_without_config_reads_the_default_file_and_names_it_when_missing() {
    assert_eq!(
        spiffed_test_support::my_uid(),
        0,
        "this test hides /etc in a mount namespace (unshare -m) and must run as root"
    );
    // In a mount namespace of its own with an empty /etc, /etc/spiffed/spiffed.toml is
    // missing whatever this host has installed.
    let out = Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /etc && exec \"$0\" run",
        ])
        .arg(crate::bin())
        .output()
        .expect("unshare runs");
    let err = fails_with(&out, 64);
    assert!(
        err.contains("no --config given, and the default configuration /etc/spiffed/spiffed.toml does not exist")
            && err.contains("fix: pass --config FILE"),
        "{err}"
    );
    // With a file there, `spiffed run` reads it: a bad one is reported under its path.
    let out = Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /etc && mkdir /etc/spiffed && echo 'nonsense = 1' \
             >/etc/spiffed/spiffed.toml && exec \"$0\" run",
        ])
        .arg(crate::bin())
        .output()
        .expect("unshare runs");
    let err = fails_with(&out, 64);
    assert!(err.contains("/etc/spiffed/spiffed.toml:1"), "{err}");
}

#[test]
fn completions_and_man_pages_are_generated_from_the_command_line() {
    let run = |args: &[&str]| Command::new(crate::bin()).args(args).output().unwrap();
    for (shell, needle) in [
        ("bash", "complete -F _spiffed"),
        ("zsh", "#compdef spiffed"),
        ("fish", "complete -c spiffed"),
    ] {
        let script = ok(&run(&["completions", shell]));
        assert!(script.contains(needle), "{shell}: {script:.300}");
        assert!(script.contains("healthcheck"), "{shell}");
    }
    fails_with(&run(&["completions", "cmd.exe"]), 64);
    // `man` is hidden from the help, and writes roff.
    assert!(!ok(&run(&["--help"])).contains("\n  man "));
    assert!(ok(&run(&["man"])).starts_with(".ie \\n(.g .ds Aq"));
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["man", "--dir", &dir.path().display().to_string()]);
    ok(&out);
    for page in [
        "spiffed.1",
        "spiffed-run.1",
        "spiffed-api-fetch-x509.1",
        "spiffed-entry-create.1",
    ] {
        let path = dir.path().join(page);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o644
        );
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains(".TH spiffed")
        );
    }
    // Hidden commands get no page, and no temp file is left.
    assert!(!dir.path().join("spiffed-man.1").exists());
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.'))
    );
}
