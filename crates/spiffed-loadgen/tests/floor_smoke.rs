//! Runs `cold` and `warm` for about a second each against the floor server, in process.

use std::time::Duration;

use spiffed_loadgen::{floor, scenarios};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_and_warm_against_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("floor.sock");
    let listener = floor::bind(&socket).unwrap();
    let server = tokio::spawn(floor::serve(listener));

    let d = Duration::from_millis(1000);
    let cold = scenarios::cold(&socket, 2, d).await.unwrap();
    eprintln!("{}", cold.summary());
    assert!(cold.ok > 0, "{cold:?}");
    assert!(cold.errors.is_empty(), "{cold:?}");
    assert!(cold.latency.p50_us > 0 && cold.latency.p50_us <= cold.latency.max_us);

    for rpc in [scenarios::WarmRpc::Jwt, scenarios::WarmRpc::X509] {
        let warm = scenarios::warm(&socket, 2, d, rpc).await.unwrap();
        eprintln!("{}", warm.summary());
        assert!(warm.ok > 0, "{warm:?}");
        assert!(warm.errors.is_empty(), "{warm:?}");
    }

    // JSON lines carry the fields CI greps for.
    let line = serde_json::to_value(&cold).unwrap();
    for key in [
        "scenario",
        "concurrency",
        "ok",
        "rate_per_s",
        "p50_us",
        "p99_us",
        "errors",
    ] {
        assert!(line.get(key).is_some(), "missing {key} in {line}");
    }
    server.abort();
}

#[tokio::test]
async fn floor_rejects_requests_without_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("floor.sock");
    let server = tokio::spawn(floor::serve(floor::bind(&socket).unwrap()));
    let mut client = spiffed_loadgen::client::connect(&socket).await.unwrap();
    let err = client
        .fetch_x509svid(spiffed_proto::workload::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    server.abort();
}

#[tokio::test]
async fn fanout_reports_ready_streams_on_timeout() {
    // The floor never rotates, so the update phase times out with every stream ready.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("floor.sock");
    let server = tokio::spawn(floor::serve(floor::bind(&socket).unwrap()));
    let r = scenarios::fanout(
        &socket,
        20,
        3,
        Some(std::process::id()),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    assert_eq!(r.ready, 20);
    assert_eq!(r.updated, 0);
    assert!(r.timed_out);
    assert!(r.agent_ready.unwrap().fds.unwrap() > 0);
    server.abort();
}

#[tokio::test]
async fn churn_samples_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("floor.sock");
    let server = tokio::spawn(floor::serve(floor::bind(&socket).unwrap()));
    let mut samples = 0;
    let r = scenarios::churn(
        &socket,
        50.0,
        Duration::from_millis(600),
        std::process::id(),
        Duration::from_millis(200),
        |_| samples += 1,
    )
    .await
    .unwrap();
    assert!(r.ok > 0, "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(samples >= 2);
    server.abort();
}

#[tokio::test]
async fn errors_are_counted_by_cause() {
    // Nobody listens: every cold iteration fails to connect.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let r = scenarios::cold(&socket, 2, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(r.ok, 0);
    assert!(r.errors.get("Connect").copied().unwrap_or(0) > 0, "{r:?}");
}
