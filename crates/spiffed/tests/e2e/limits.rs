//! What one local user can hold: descriptors, connections, streams and time (issue 10, items 2
//! and 4).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use spiffed_test_support::{Agent, raw_client, with_header, x509_stream};

use crate::{bin, peer_bin};

/// The uid that opens the silent connections.
const ATTACKER: u32 = 65534;

/// A script that starts spiffed with the descriptor limits `soft:hard`, as a service manager
/// with a low default would.
fn limited_bin(dir: &Path, soft: u32, hard: u32) -> PathBuf {
    let script = dir.join("spiffed-limited");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nulimit -Sn {soft} && ulimit -Hn {hard} && exec {} \"$@\"\n",
            bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// Starts an agent under `ulimit -Sn soft -Hn hard` whose entries grant our uid an identity.
fn limited_agent(wrappers: &Path, soft: u32, hard: u32, extra: &str) -> Agent {
    let uid = spiffed_test_support::my_uid();
    Agent::start(
        &limited_bin(wrappers, soft, hard),
        &format!(
            "{extra}\n[[entries]]\nspiffe_id = \"spiffe://example.org/web\"\nselectors = [\"unix:uid:{uid}\"]\n"
        ),
    )
}

/// The agent's `Max open files` soft and hard limits from /proc.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

/// Runs `cmd`, killing it (and failing) after `secs` seconds: the hang guard.
fn run_within(mut cmd: Command, secs: u64) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} did not finish within {secs}s; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Our own fetch through the CLI, as a second uid next to the attacker.
fn fetch(agent: &Agent) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["api", "fetch", "x509", "--socket"])
        .arg(&agent.socket);
    run_within(cmd, 20)
}

/// The root admin CLI.
fn entry_list(agent: &Agent) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["entry", "list", "--admin-socket"])
        .arg(&agent.admin_socket);
    run_within(cmd, 20)
}

/// `spiffed-test-peer hold` as the attacker uid: opens `n` silent connections.
struct Holder {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    opened: usize,
}

impl Holder {
    fn start(agent: &Agent, n: usize, seconds: u64) -> Self {
        let mut child = Command::new("setpriv")
            .args([
                format!("--reuid={ATTACKER}"),
                format!("--regid={ATTACKER}"),
                "--clear-groups".to_owned(),
            ])
            .arg(peer_bin())
            .arg("hold")
            .arg(&agent.socket)
            .args([n.to_string(), seconds.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv (util-linux) runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let opened = first
            .strip_prefix("OPEN ")
            .unwrap_or_else(|| panic!("{first}"))
            .parse()
            .unwrap();
        Self {
            child,
            lines,
            opened,
        }
    }

    /// Reads status lines until one says at least `want` connections are closed; returns
    /// that count, or the last count if the holder ended first.
    fn wait_closed(&mut self, want: usize) -> usize {
        let mut last = 0;
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("CLOSED ") {
                last = n.parse().unwrap();
                if last >= want {
                    return last;
                }
            } else if let Some(n) = line.strip_prefix("END ") {
                return n.parse().unwrap();
            }
        }
        last
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn silent_connections_of_one_uid_starve_no_one() {
    assert_eq!(
        spiffed_test_support::my_uid(),
        0,
        "this test switches uid with setpriv and must run as root"
    );
    let wrappers = tempfile::tempdir().unwrap();
    // A soft limit of 256, as a low service default; room to raise it to 4096.
    let agent = limited_agent(
        wrappers.path(),
        256,
        4096,
        "max_connections_per_uid = 40\nhandshake_timeout = \"3s\"\nidle_timeout = \"2s\"",
    );
    assert_eq!(
        open_files_limits(agent.pid()),
        ("4096".to_owned(), "4096".to_owned()),
        "the soft limit is raised to the hard limit"
    );
    let logs = agent.logs();
    assert!(
        logs.contains("soft_before=256") && logs.contains("hard=4096"),
        "{logs}"
    );

    // 300 silent connections from one uid: more than the soft limit it started with, and
    // far more than its cap of 40.
    let mut holder = Holder::start(&agent, 300, 15);
    assert!(holder.opened > 200, "opened {}", holder.opened);
    // Everything past the cap is closed at once, before any HTTP/2; exactly 40 stay open until
    // their handshake_timeout (3 s), so the first count that reaches the cap is exact.
    let closed = holder.wait_closed(holder.opened - 40);
    assert_eq!(closed, holder.opened - 40, "{}", agent.logs());

    // Meanwhile, another uid and the root admin CLI are served.
    let out = fetch(&agent);
    assert_success(&out, "the fetch of another uid");
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/web"));
    assert_success(&entry_list(&agent), "entry list");

    // The 40 it kept send nothing: closed after handshake_timeout.
    let opened = holder.opened;
    assert_eq!(holder.wait_closed(opened), opened, "{}", agent.logs());
    let logs = agent.logs();
    assert!(
        logs.contains("refusing a connection") && logs.contains(&format!("uid={ATTACKER}")),
        "{logs}"
    );
    // Refusals are logged a line per burst, not a line each.
    assert!(logs.matches("refusing a connection").count() < 10, "{logs}");
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A literal header field without indexing, new name (RFC 7541 §6.2.2), short strings.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0, u8::try_from(name.len()).unwrap()];
    out.extend_from_slice(name.as_bytes());
    out.push(u8::try_from(value.len()).unwrap());
    out.extend_from_slice(value.as_bytes());
    out
}

#[test]
fn a_connection_without_streams_is_closed_after_idle_timeout() {
    let agent = crate::agent_for_me("handshake_timeout = \"1s\"\nidle_timeout = \"2s\"");
    // One unary health check by hand, then silence: the server answers, then closes the
    // connection once it has had no stream for idle_timeout.
    let mut conn = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    let block = [
        vec![0x83, 0x86], // :method POST, :scheme http
        literal(":path", "/grpc.health.v1.Health/Check"),
        literal(":authority", "localhost"),
        literal("content-type", "application/grpc"),
        literal("te", "trailers"),
    ]
    .concat();
    bytes.extend(frame(0x1, 0x4, 1, &block));
    bytes.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    conn.write_all(&bytes).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut got = Vec::new();
    // Hang guard: the read times out with an error if the agent never closes.
    conn.read_to_end(&mut got)
        .expect("the agent closes the idle connection");
    // The answer came before the close: a HEADERS frame on stream 1.
    let mut rest = got.as_slice();
    let mut answered = false;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        answered |= rest[3] == 0x1 && rest[5..9] == [0, 0, 0, 1];
        rest = &rest[(9 + len).min(rest.len())..];
    }
    assert!(answered, "no response on stream 1: {got:?}");
}

#[tokio::test]
async fn an_open_stream_keeps_its_connection_past_idle_timeout() {
    let agent = crate::agent_for_me("handshake_timeout = \"1s\"\nidle_timeout = \"1s\"");
    let mut client = agent.client().await;
    let mut stream = x509_stream(&mut client).await;
    assert!(stream.message().await.unwrap().is_some());
    // Three idle timeouts later, the stream is still open (no message, no end).
    let quiet = tokio::time::timeout(Duration::from_secs(3), stream.message()).await;
    assert!(quiet.is_err(), "the stream ended: {quiet:?}");
}

#[tokio::test]
async fn streams_are_limited_per_connection_and_per_uid() {
    let agent = crate::agent_for_me("max_streams_per_connection = 4\nmax_streams_per_uid = 6");
    // Per connection: the client is told 4 and queues the fifth stream until one ends.
    let mut client = agent.client().await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut s = x509_stream(&mut client).await;
        assert!(s.message().await.unwrap().is_some());
        open.push(s);
    }
    let mut fifth_client = client.clone();
    let fifth = tokio::spawn(async move {
        let mut s = x509_stream(&mut fifth_client).await;
        let first = s.message().await;
        (s, first)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !fifth.is_finished(),
        "a fifth stream opened on one connection"
    );
    open.pop();
    let (s, first) = tokio::time::timeout(Duration::from_secs(10), fifth)
        .await
        .expect("the fifth stream opens once one ends")
        .unwrap();
    assert!(first.unwrap().is_some());
    open.push(s);

    // Per uid: 4 open on the first connection, 2 more on a second; the next is refused.
    let mut other = raw_client(&agent.socket).await;
    for _ in 0..2 {
        let mut s = x509_stream(&mut other).await;
        assert!(s.message().await.unwrap().is_some());
        open.push(s);
    }
    let refused = other
        .fetch_x509svid(with_header(spiffed_proto::workload::X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("max_streams_per_uid"),
        "{refused:?}"
    );
    // The agent stays responsive, and a closed stream makes room again.
    open.pop();
    // The count drops when the agent sees the stream end: retry until then, within 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match other
            .fetch_x509svid(with_header(spiffed_proto::workload::X509svidRequest {}))
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no room after a stream closed: {e:?}"),
        }
    };
    assert!(s.message().await.unwrap().is_some());
}

#[test]
fn the_admin_socket_and_the_store_work_when_descriptors_run_out() {
    assert_eq!(
        spiffed_test_support::my_uid(),
        0,
        "this test switches uid with setpriv and must run as root"
    );
    let wrappers = tempfile::tempdir().unwrap();
    // A hard limit of 200 that cannot be raised, no effective per-uid cap, long deadlines:
    // the attacker's connections stay, and only the reserve keeps descriptors free.
    let agent = limited_agent(
        wrappers.path(),
        200,
        200,
        "max_connections_per_uid = 10000\nhandshake_timeout = \"60s\"",
    );
    let holder = Holder::start(&agent, 400, 30);
    assert!(holder.opened >= 200, "opened {}", holder.opened);
    // The admin checks start only once the agent is short of descriptors.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !agent.logs().contains("descriptors are short") {
        assert!(
            std::time::Instant::now() < deadline,
            "never short of descriptors:\n{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_success(&entry_list(&agent), "entry list");
    // A write to the store (SQLite) needs descriptors of its own.
    let mut cmd = Command::new(bin());
    cmd.args(["entry", "create", "--admin-socket"])
        .arg(&agent.admin_socket)
        .args([
            "--spiffe-id",
            "spiffe://example.org/other",
            "--selector",
            "unix:uid:4242",
        ]);
    assert_success(&run_within(cmd, 20), "entry create");
    drop(holder);
}
