//! Metrics (`[metrics]`), health endpoints (`[health]`), systemd notifications and
//! `spiffed status`, on the real binary: the metrics are scraped over HTTP and parsed with a
//! Prometheus text-format parser (the `prometheus-parse` crate), as Prometheus would.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use spiffed_proto::workload::JwtsvidRequest;
use spiffed_test_support::spire::{free_port, poll_until};
use spiffed_test_support::{config_text, with_header, x509_stream};

use super::agent_mode::{Attest, node, tail, wait_ids};
use super::sds::{Sds, req};
use super::{SHORT_TTLS, agent_for_me, bin};

/// `GET path` (or another method) on 127.0.0.1:port: (status, content type, body).
fn http(port: u16, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// One scrape of `/metrics`, parsed.
fn scrape(port: u16) -> Scrape {
    let (status, content_type, body) = http(port, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels` (counter, gauge or untyped).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .find(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a number: {other:?}"),
        })
}

/// The observation count of a histogram sample.
fn histogram_count(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name || x.metric == format!("{name}_bucket"))
        .find(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .and_then(|x| match &x.value {
            // The +Inf bucket counts every observation.
            Value::Histogram(buckets) => buckets.iter().map(|b| b.count).reduce(f64::max),
            _ => None,
        })
}

const X509: &str = "SpiffeWorkloadAPI/FetchX509SVID";
const JWT: &str = "SpiffeWorkloadAPI/FetchJWTSVID";

// Multi-threaded: the blocking scrapes below must not starve the client's connection task
// (which sends the stream's cancellation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_rpcs_denials_and_rotations() {
    let port = free_port();
    let agent = agent_for_me(&format!(
        "{SHORT_TTLS}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    ));
    // The socket accepts a moment before the server runs on it: ready follows at once.
    let before = poll_until(Duration::from_secs(10), "ready", || {
        let s = scrape(port);
        (value(&s, "spiffed_ready", &[]) == Some(1.0)).then_some(s)
    });
    assert_eq!(
        value(&before, "spiffed_rpc_started_total", &[("method", X509)]),
        Some(0.0)
    );
    assert_eq!(value(&before, "spiffed_entries", &[]), Some(1.0));
    assert_eq!(value(&before, "spiffed_ready", &[]), Some(1.0));
    assert!(value(&before, "process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(value(&before, "process_open_fds", &[]).unwrap() >= 3.0);
    assert!(value(&before, "spiffed_ca_expiry_remaining_seconds", &[]).unwrap() > 0.0);
    assert_eq!(
        value(&before, "spiffed_build", &[("mode", "standalone")]),
        Some(1.0)
    );

    // A stream that gets its first SVID: started, open, timed.
    let mut client = agent.client().await;
    let mut stream = x509_stream(&mut client).await;
    stream.message().await.unwrap().unwrap();
    let during = scrape(port);
    assert_eq!(
        value(&during, "spiffed_rpc_started_total", &[("method", X509)]),
        Some(1.0)
    );
    assert_eq!(
        value(&during, "spiffed_streams_open", &[("api", "workload")]),
        Some(1.0)
    );
    assert_eq!(value(&during, "spiffed_connections_open", &[]), Some(1.0));
    assert_eq!(
        histogram_count(
            &during,
            "spiffed_rpc_latency_seconds",
            &[("method", X509), ("code", "OK")]
        ),
        Some(1.0)
    );
    assert!(value(&during, "spiffed_x509_svids_cached", &[]).unwrap() >= 1.0);
    assert!(
        value(
            &during,
            "spiffed_x509_svid_earliest_expiry_remaining_seconds",
            &[]
        )
        .is_some()
    );

    // A JWT-SVID for an ID the caller does not hold: refused, and counted as such.
    let refused = client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: "spiffe://example.org/not-mine".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // The stream closes: counted as canceled by the client.
    drop(stream);
    let after = poll_until(Duration::from_secs(10), "the stream to close", || {
        let s = scrape(port);
        (value(&s, "spiffed_streams_open", &[("api", "workload")]) == Some(0.0)).then_some(s)
    });
    assert_eq!(
        value(
            &after,
            "spiffed_rpc_handled_total",
            &[("method", X509), ("code", "Canceled")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &after,
            "spiffed_rpc_handled_total",
            &[("method", JWT), ("code", "PermissionDenied")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &after,
            "spiffed_attestation_failures_total",
            &[("reason", "not_entitled")]
        ),
        Some(1.0)
    );

    // SVIDs of 2s rotate every second or so: the counter and the timestamp move.
    let first = poll_until(Duration::from_secs(20), "a rotation", || {
        let s = scrape(port);
        value(&s, "spiffed_x509_svid_last_rotation_timestamp_seconds", &[]).zip(value(
            &s,
            "spiffed_x509_svid_rotations_total",
            &[],
        ))
    });
    assert!(first.1 >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((first.0 - now).abs() < 60.0, "{} vs {now}", first.0);
    poll_until(Duration::from_secs(20), "another rotation", || {
        let s = scrape(port);
        value(&s, "spiffed_x509_svid_last_rotation_timestamp_seconds", &[]).filter(|t| *t > first.0)
    });
    assert!(
        agent.logs().contains("rotated X.509-SVIDs"),
        "a rotation batch is logged at info:\n{}",
        agent.logs()
    );
}

#[tokio::test]
async fn health_endpoints_answer_live_and_ready_with_reasons() {
    let port = free_port();
    let agent = agent_for_me(&format!("[health]\nlisten = \"127.0.0.1:{port}\"\n"));
    let (status, content_type, body) = http(port, "GET", "/live");
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "application/json");
    let live: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(live["status"], "live");
    let (status, _, body) = poll_until(Duration::from_secs(10), "ready", || {
        let r = http(port, "GET", "/ready");
        (r.0 == 200).then_some(r)
    });
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "ready");
    assert!(
        ready["reason"]
            .as_str()
            .unwrap()
            .contains("the CA is valid until"),
        "{ready}"
    );
    assert_eq!(http(port, "GET", "/metrics").0, 404, "metrics are off");
    assert_eq!(http(port, "POST", "/ready").0, 405);
    drop(agent);
}

#[tokio::test]
async fn not_ready_in_agent_mode_until_the_server_is_reached() {
    // No SPIRE Server listens there: the socket serves, but no identity can be.
    let server_port = free_port();
    let port = free_port();
    let agent = spiffed_test_support::Agent::start_raw(&bin(), |dir| {
        config_text(
            dir,
            &format!(
                "[health]\nlisten = \"127.0.0.1:{port}\"\n[spire_server]\naddress = \
                 \"127.0.0.1:{server_port}\"\ninsecure_bootstrap = true\njoin_token = \"t\"\n"
            ),
        )
    });
    let (status, _, body) = http(port, "GET", "/ready");
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(ready["mode"], "agent");
    assert_eq!(ready["readiness"], "not_serving");
    assert!(!ready["reason"].as_str().unwrap().is_empty(), "{ready}");
    assert_eq!(http(port, "GET", "/live").0, 200);
    drop(agent);
}

const STREAM_SECRETS: &str = "envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";

/// Scrapes until `f` accepts the scrape (30 s at most).
fn scrape_until(port: u16, what: &str, f: impl Fn(&Scrape) -> bool) -> Scrape {
    poll_until(Duration::from_secs(30), what, || {
        let s = scrape(port);
        f(&s).then_some(s)
    })
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Agent mode against a real spire-server: the sync and reachability gauges follow the server
/// going away, and SDS streams are counted under `api="sds"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_mode_metrics_follow_the_server_and_count_sds_streams() {
    use spiffed_test_support::spire::{EntrySpec, ServerOptions, SpireServer};
    let mut server = SpireServer::start(ServerOptions::default());
    let token = server.generate_token(None, None);
    let agent_id = server.join_token_agent_id(&token);
    let port = free_port();
    let agent = node(
        &server,
        Attest::Token(&token),
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let sel = format!("unix:uid:{}", spiffed_test_support::my_uid());
    let web = "spiffe://example.org/metrics/web";
    server.entry_create(&EntrySpec::workload(&agent_id, web, &[&sel]));
    wait_ids(&agent, &[web.to_owned()]).await;

    let synced = scrape_until(port, "reachable after a sync", |s| {
        value(s, "spiffed_spire_server_reachable", &[]) == Some(1.0)
            && value(s, "spiffed_spire_last_sync_timestamp_seconds", &[]).is_some()
    });
    assert_eq!(
        value(&synced, "spiffed_build", &[("mode", "agent")]),
        Some(1.0)
    );
    assert_eq!(
        value(&synced, "spiffed_spire_serving_from_cache", &[]),
        Some(0.0)
    );
    assert_eq!(value(&synced, "spiffed_ready", &[]), Some(1.0));
    let last = value(&synced, "spiffed_spire_last_sync_timestamp_seconds", &[]).unwrap();
    assert!(
        (now_secs() - last).abs() < 30.0,
        "last sync {last}, now {}",
        now_secs()
    );
    assert!(value(&synced, "spiffed_agent_svid_expiry_remaining_seconds", &[]).unwrap() > 0.0);
    assert!(value(&synced, "spiffed_entries", &[]).unwrap() >= 1.0);

    // An SDS stream (Envoy's) is counted apart from the Workload API's.
    let mut sds = Sds::open(&agent).await.unwrap();
    let first = sds.ask(req(&["default"])).await;
    assert_eq!(first.resources.len(), 1);
    let during = scrape(port);
    assert_eq!(
        value(&during, "spiffed_streams_open", &[("api", "sds")]),
        Some(1.0),
        "{}",
        tail(&agent.logs(), 20)
    );
    assert_eq!(
        value(
            &during,
            "spiffed_rpc_started_total",
            &[("method", STREAM_SECRETS)]
        ),
        Some(1.0)
    );
    assert_eq!(
        histogram_count(
            &during,
            "spiffed_rpc_latency_seconds",
            &[("method", STREAM_SECRETS), ("code", "OK")]
        ),
        Some(1.0)
    );
    drop(sds);
    scrape_until(port, "the SDS stream closed", |s| {
        value(s, "spiffed_streams_open", &[("api", "sds")]) == Some(0.0)
    });

    // The server goes away: unreachable, served from the cache, the last sync stays put.
    server.kill();
    let away = scrape_until(port, "unreachable", |s| {
        value(s, "spiffed_spire_server_reachable", &[]) == Some(0.0)
    });
    assert_eq!(
        value(&away, "spiffed_spire_serving_from_cache", &[]),
        Some(1.0)
    );
    let last_away = value(&away, "spiffed_spire_last_sync_timestamp_seconds", &[]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        value(
            &scrape(port),
            "spiffed_spire_last_sync_timestamp_seconds",
            &[]
        ),
        Some(last_away),
        "no sync succeeds while the server is down"
    );
    drop(agent);
}

/// A spawned `spiffed run`, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts spiffed with `NOTIFY_SOCKET=notify_socket` and `WATCHDOG_USEC=200000`, and returns
/// the first two datagrams it sends there.
fn notifications(
    dir: &std::path::Path,
    notify_socket: &str,
    listener: &UnixDatagram,
) -> Vec<String> {
    let config = dir.join("spiffed.toml");
    std::fs::write(&config, config_text(dir, "")).unwrap();
    let _agent = Running(
        Command::new(bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", notify_socket)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    for _ in 0..2 {
        let n = listener
            .recv(&mut buf)
            .expect("a notification from spiffed");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // READY=1 comes once the socket serves.
    assert!(
        std::os::unix::net::UnixStream::connect(dir.join("api.sock")).is_ok(),
        "READY=1 before the socket serves"
    );
    got
}

#[test]
fn systemd_gets_ready_and_watchdog_notifications() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&path).unwrap();
    let got = notifications(dir.path(), path.to_str().unwrap(), &listener);
    assert!(got[0].lines().any(|l| l == "READY=1"), "{got:?}");
    assert_eq!(got[1], "WATCHDOG=1", "{got:?}");

    // An abstract socket (`@name`), as systemd may pass.
    use std::os::linux::net::SocketAddrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("spiffed-e2e-notify-{}", std::process::id());
    let listener = UnixDatagram::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap(),
    )
    .unwrap();
    let got = notifications(dir.path(), &format!("@{name}"), &listener);
    assert!(got[0].lines().any(|l| l == "READY=1"), "{got:?}");
    assert_eq!(got[1], "WATCHDOG=1", "{got:?}");
}

#[tokio::test]
async fn status_shows_the_agent_at_a_glance() {
    let agent = agent_for_me("");
    let mut client = agent.client().await;
    let mut stream = x509_stream(&mut client).await;
    stream.message().await.unwrap().unwrap();
    let status = |output: &str| {
        let out = Command::new(bin())
            .args(["status", "--admin-socket"])
            .arg(&agent.admin_socket)
            .args(["--output", output])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&status("json")).unwrap();
    assert_eq!(json["mode"], "standalone");
    assert_eq!(json["trust_domain"], "example.org");
    assert_eq!(json["entries"], 1);
    assert_eq!(json["ready"], true);
    assert_eq!(json["connections"], 1);
    assert_eq!(json["streams"], 1);
    assert_eq!(json["authority"]["kind"], "ca");
    assert!(json["authority"]["not_after"].is_string(), "{json}");
    assert!(
        json["x509_svids"]["cached"].as_u64().unwrap() >= 1,
        "{json}"
    );
    assert!(
        json["version"]
            .as_str()
            .unwrap()
            .starts_with(env!("CARGO_PKG_VERSION"))
    );
    let text = status("text");
    for line in [
        "mode:           standalone",
        "trust domain:   example.org",
        "CA:             valid from",
        "open:           1 connections, 1 streams",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    drop(stream);
}
