//! The scale scenarios against the floor (made to rotate) and a fake admin service, in process
//! and through the real binary's child modes (`fetch-once`, `hold`), without switching uid.

use std::path::{Path, PathBuf};
use std::time::Duration;

use spiffed_loadgen::floor::{self, Floor};
use spiffed_loadgen::scale::{self, HoldCommand, HoldEvent, StreamGroup, UidRange};
use spiffed_loadgen::scenarios;
use spiffed_proto::admin::entry_admin_server::{EntryAdmin, EntryAdminServer};
use spiffed_proto::admin::{
    CreateEntriesRequest, CreateEntriesResponse, DeleteEntriesRequest, DeleteEntriesResponse,
    Entry, EntryError, EntryResult, ExplainRequest, ExplainResponse, GetEntryRequest,
    GetStatusRequest, ListEntriesRequest, ListEntriesResponse, StatusResponse, UpdateEntryRequest,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

const EXE: &str = env!("CARGO_BIN_EXE_spiffed-loadgen");

fn rotating_floor(
    dir: &Path,
    every: Duration,
) -> anyhow::Result<(PathBuf, tokio::task::JoinHandle<()>)> {
    let socket = dir.join("floor.sock");
    let listener = floor::bind(&socket)?;
    let f = Floor::new()?.rotating(every);
    let task = tokio::spawn(async move {
        let _ = floor::serve_floor(listener, f).await;
    });
    Ok((socket, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_counts_rotations_per_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = rotating_floor(dir.path(), Duration::from_millis(100)).unwrap();
    let (cmd_tx, cmd_rx) = mpsc::channel(1);
    let (ev_tx, mut ev_rx) = mpsc::channel(1);
    let held = tokio::spawn({
        let socket = socket.clone();
        async move { scale::hold(&socket, 10, 2, Duration::from_secs(10), cmd_rx, ev_tx).await }
    });
    match ev_rx.recv().await.unwrap() {
        HoldEvent::Ready {
            streams,
            ready,
            failed,
            ..
        } => assert_eq!((streams, ready, failed), (10, 10, 0)),
        other => panic!("expected ready, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    cmd_tx.send(HoldCommand::Mark).await.unwrap();
    match ev_rx.recv().await.unwrap() {
        HoldEvent::Mark {
            updates_total,
            min_per_stream,
            max_per_stream,
            failed,
        } => {
            assert_eq!(failed, 0);
            // About 7 resends per stream in 700 ms; every stream saw some.
            assert!(min_per_stream >= 2, "min {min_per_stream}");
            assert!(max_per_stream <= 9, "max {max_per_stream}");
            assert!(updates_total >= 10 * min_per_stream);
        }
        other => panic!("expected mark, got {other:?}"),
    }
    cmd_tx.send(HoldCommand::Stop).await.unwrap();
    held.await.unwrap().unwrap();
    server.abort();
}

#[tokio::test]
async fn hold_refuses_a_socket_nobody_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (_cmd_tx, cmd_rx) = mpsc::channel(1);
    let (ev_tx, _ev_rx) = mpsc::channel(1);
    let err = scale::hold(
        &dir.path().join("absent.sock"),
        3,
        1,
        Duration::from_secs(1),
        cmd_rx,
        ev_tx,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("could not connect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_rotation_measures_rotations_and_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = rotating_floor(dir.path(), Duration::from_millis(100)).unwrap();
    let report = scale::partial_rotation(&scale::PartialRotationOptions {
        socket,
        exe: EXE.into(),
        // The floor runs in this process.
        agent_pid: std::process::id(),
        rotating: StreamGroup {
            uid: None,
            streams: 5,
            connections: 1,
        },
        idle: Some(StreamGroup {
            uid: None,
            streams: 20,
            connections: 2,
        }),
        window: Duration::from_millis(800),
        settle: Duration::from_millis(100),
        ready_timeout: Duration::from_secs(10),
    })
    .await
    .unwrap();
    eprintln!("{}", report.summary());
    assert_eq!(report.rotating_ready, 5);
    assert_eq!(report.idle_ready, 20);
    assert_eq!(report.failed, 0);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // 800 ms at one resend per 100 ms.
    assert!(
        report.rotations >= 4.0 && report.rotations <= 10.0,
        "{}",
        report.rotations
    );
    // The floor resends on every stream, so the "idle" group saw them too.
    assert!(report.idle_updates > 0);
    assert!(report.agent_cpu_ms.is_some());
    let line = serde_json::to_value(&report).unwrap();
    for key in [
        "scenario",
        "rotations",
        "agent_cpu_ms",
        "cpu_per_rotation_ms",
        "idle_updates",
        "window_s",
    ] {
        assert!(line.get(key).is_some(), "missing {key} in {line}");
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_rotation_without_idle_streams_starts_one_child() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = rotating_floor(dir.path(), Duration::from_millis(100)).unwrap();
    let report = scale::partial_rotation(&scale::PartialRotationOptions {
        socket,
        exe: EXE.into(),
        agent_pid: std::process::id(),
        rotating: StreamGroup {
            uid: None,
            streams: 3,
            connections: 1,
        },
        idle: Some(StreamGroup {
            uid: None,
            streams: 0,
            connections: 1,
        }),
        window: Duration::from_millis(400),
        settle: Duration::from_millis(50),
        ready_timeout: Duration::from_secs(10),
    })
    .await
    .unwrap();
    assert_eq!(report.rotating_ready, 3);
    assert!(report.idle.is_none());
    assert_eq!((report.idle_ready, report.idle_updates), (0, 0));
    assert!(report.rotations > 0.0);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_fetch_runs_one_child_per_uid() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = rotating_floor(dir.path(), Duration::from_secs(60)).unwrap();
    let report = scale::first_fetch(&scale::FirstFetchOptions {
        socket,
        exe: EXE.into(),
        uids: "1000-1009".parse::<UidRange>().unwrap(),
        samples: 4,
        concurrency: 2,
        gid: None,
        // Children keep this test's uid (switching needs root).
        switch_uid: false,
        backdate: Duration::from_secs(10),
    })
    .await
    .unwrap();
    eprintln!("{}", report.summary());
    assert_eq!(report.samples, 4);
    assert_eq!(report.ok, 4, "{:?}", report.errors);
    assert!(report.latency.p50_us > 0);
    assert!(report.child_wall_p50_us >= report.latency.p50_us);
    // The floor's certificate dates from 1975: "minted" long before the call.
    assert_eq!((report.preminted, report.minted_for_call), (4, 0));
    server.abort();
}

#[tokio::test]
async fn first_fetch_counts_children_that_get_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let report = scale::first_fetch(&scale::FirstFetchOptions {
        socket: dir.path().join("absent.sock"),
        exe: EXE.into(),
        uids: "5-6".parse::<UidRange>().unwrap(),
        samples: 2,
        concurrency: 1,
        gid: None,
        switch_uid: false,
        backdate: Duration::from_secs(10),
    })
    .await
    .unwrap();
    assert_eq!(report.ok, 0);
    assert_eq!(report.errors.get("Connect").copied(), Some(2), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reports_cpu_per_updated_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = rotating_floor(dir.path(), Duration::from_millis(300)).unwrap();
    let r = scenarios::fanout(
        &socket,
        50,
        2,
        Some(std::process::id()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!((r.ready, r.updated), (50, 50), "{}", r.summary());
    assert!(!r.timed_out);
    assert!(r.agent_cpu_rotation_ms.is_some());
    assert!(r.agent_cpu_per_stream_us.is_some());
    server.abort();
}

/// An admin service that creates entries for uids below 500 and refuses the others.
struct FakeAdmin;

#[tonic::async_trait]
impl EntryAdmin for FakeAdmin {
    async fn create_entries(
        &self,
        request: Request<CreateEntriesRequest>,
    ) -> Result<Response<CreateEntriesResponse>, Status> {
        let results = request
            .into_inner()
            .entries
            .into_iter()
            .map(|spec| {
                let uid: u32 = spec
                    .selectors
                    .first()
                    .and_then(|s| s.strip_prefix("unix:uid:"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(u32::MAX);
                if uid < 500 {
                    EntryResult {
                        entry: Some(Entry {
                            id: format!("e{uid}"),
                            spec: Some(spec),
                            source: "store".into(),
                            revision: 1,
                            created_at: 1,
                            updated_at: 1,
                        }),
                        error: None,
                    }
                } else {
                    EntryResult {
                        entry: None,
                        error: Some(EntryError {
                            field: "selectors[0]".into(),
                            message: "uid too large".into(),
                        }),
                    }
                }
            })
            .collect();
        Ok(Response::new(CreateEntriesResponse {
            results,
            warnings: vec![],
        }))
    }

    async fn list_entries(
        &self,
        _: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_entry(&self, _: Request<GetEntryRequest>) -> Result<Response<Entry>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn update_entry(
        &self,
        _: Request<UpdateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn delete_entries(
        &self,
        _: Request<DeleteEntriesRequest>,
    ) -> Result<Response<DeleteEntriesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn explain(
        &self,
        _: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tokio::test]
async fn admin_create_times_created_entries_and_counts_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EntryAdminServer::new(FakeAdmin))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    // Uids 498..=502: two created, three refused.
    let r = scale::admin_create(&socket, 5, 498, "example.org", 0)
        .await
        .unwrap();
    eprintln!("{}", r.summary());
    assert_eq!(r.ok, 2);
    assert_eq!(r.errors.get("Refused").copied(), Some(3));
    assert!(r.first_error.as_deref().unwrap().contains("uid too large"));
    assert!(r.rpc.p50_us > 0 && r.with_connect.p50_us >= r.rpc.p50_us);

    // Nobody listening: every call fails to connect.
    let none = scale::admin_create(&dir.path().join("absent.sock"), 2, 1, "example.org", 0)
        .await
        .unwrap();
    assert_eq!(none.ok, 0);
    assert_eq!(none.errors.get("Connect").copied(), Some(2));
    server.abort();
}
