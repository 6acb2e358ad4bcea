//! `sds_fanout` against an in-process SDS server that holds every stream to the xDS protocol:
//! the first request must carry a node and the names, each response must be acknowledged with
//! its version and nonce before the next one (the "rotation") is sent; any deviation ends the
//! stream with an error, which the scenario counts.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use spiffed_loadgen::scenarios;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

type Out = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

/// Sends version 1 on the first request, version 2 once that is acknowledged; counts the
/// acknowledgements it saw.
struct StrictSds {
    names: Vec<String>,
    acks: Arc<AtomicUsize>,
    /// When set, the rotation is never sent (the update phase times out).
    never_rotate: bool,
}

fn response(version: &str, nonce: &str, names: &[String]) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.to_owned(),
        nonce: nonce.to_owned(),
        type_url: scenarios::SDS_SECRET_TYPE.to_owned(),
        resources: names
            .iter()
            .map(|n| Any {
                type_url: scenarios::SDS_SECRET_TYPE.to_owned(),
                value: n.as_bytes().to_vec(),
            })
            .collect(),
        ..DiscoveryResponse::default()
    }
}

/// The client's next request; its closing its side is an error here.
async fn next(input: &mut Streaming<DiscoveryRequest>) -> Result<DiscoveryRequest, Status> {
    input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the client closed its side"))
}

async fn drive(
    mut input: Streaming<DiscoveryRequest>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    names: Vec<String>,
    acks: Arc<AtomicUsize>,
    never_rotate: bool,
) -> Result<(), Status> {
    let first = next(&mut input).await?;
    if first.node.is_none() || first.resource_names != names || !first.response_nonce.is_empty() {
        return Err(Status::invalid_argument(format!(
            "bad first request {first:?}"
        )));
    }
    for (version, nonce) in [("1", "0000000a"), ("2", "0000000b")] {
        if version == "2" && never_rotate {
            std::future::pending::<()>().await;
        }
        out.send(Ok(response(version, nonce, &names)))
            .await
            .map_err(|_| Status::cancelled("gone"))?;
        let ack = next(&mut input).await?;
        if ack.version_info != version || ack.response_nonce != nonce || ack.resource_names != names
        {
            return Err(Status::invalid_argument(format!(
                "not an ACK of {version}: {ack:?}"
            )));
        }
        acks.fetch_add(1, Ordering::Relaxed);
    }
    // The client keeps its side open until the run ends.
    match input.message().await {
        Ok(Some(m)) => Err(Status::invalid_argument(format!("unexpected {m:?}"))),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for StrictSds {
    type DeltaSecretsStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
    type StreamSecretsStream = Out;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("delta"))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Out>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let (names, acks, never) = (self.names.clone(), self.acks.clone(), self.never_rotate);
        let input = request.into_inner();
        tokio::spawn(async move {
            let errors = tx.clone();
            if let Err(s) = drive(input, tx, names, acks, never).await {
                let _ = errors.send(Err(s)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("fetch"))
    }
}

fn serve(dir: &tempfile::TempDir, sds: StrictSds) -> std::path::PathBuf {
    let socket = dir.path().join("sds.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(sds))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_is_acknowledged_and_sees_the_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let names = vec!["default".to_owned(), "ROOTCA".to_owned()];
    let acks = Arc::new(AtomicUsize::new(0));
    let socket = serve(
        &dir,
        StrictSds {
            names: names.clone(),
            acks: acks.clone(),
            never_rotate: false,
        },
    );
    let r = scenarios::sds_fanout(&socket, names.clone(), 50, 3, None, Duration::from_secs(20))
        .await
        .unwrap();
    eprintln!("{}", r.summary());
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(!r.timed_out, "{r:?}");
    assert_eq!((r.ready, r.updated, r.connections), (50, 50, 3), "{r:?}");
    assert_eq!(r.scenario, "sds_fanout");
    assert_eq!(r.sds_names.as_deref(), Some(&names[..]));
    // The server sends the rotation only after a valid ACK of the first response, so every
    // updated stream had acknowledged it with its version and nonce (the ACK of the rotation
    // may still be in flight when the run ends its streams).
    assert!(acks.load(Ordering::Relaxed) >= 50, "{acks:?}");
    let line = serde_json::to_value(&r).unwrap();
    assert_eq!(line["scenario"], "sds_fanout");
    assert!(line.get("first_to_last_update_ms").is_some(), "{line}");
}

#[tokio::test]
async fn a_server_that_never_rotates_times_out_with_every_stream_ready() {
    let dir = tempfile::tempdir().unwrap();
    let names = vec!["default".to_owned()];
    let socket = serve(
        &dir,
        StrictSds {
            names: names.clone(),
            acks: Arc::new(AtomicUsize::new(0)),
            never_rotate: true,
        },
    );
    let r = scenarios::sds_fanout(&socket, names, 10, 2, None, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(r.timed_out, "{r:?}");
    assert_eq!((r.ready, r.updated), (10, 0), "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");
}

#[tokio::test]
async fn names_the_server_refuses_are_counted_as_errors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = serve(
        &dir,
        StrictSds {
            names: vec!["default".to_owned()],
            acks: Arc::new(AtomicUsize::new(0)),
            never_rotate: false,
        },
    );
    let r = scenarios::sds_fanout(
        &socket,
        vec!["spiffe://example.org/not-mine".to_owned()],
        5,
        1,
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.ready, 0, "{r:?}");
    assert_eq!(r.errors.get("InvalidArgument"), Some(&5), "{r:?}");
}

#[tokio::test]
async fn streams_and_connections_are_split_over_the_client_threads_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let names = vec!["default".to_owned()];
    let socket = serve(
        &dir,
        StrictSds {
            names: names.clone(),
            acks: Arc::new(AtomicUsize::new(0)),
            never_rotate: false,
        },
    );
    let api = scenarios::FanoutApi::Sds { names };
    // Three threads over four connections; then one thread more than there are connections,
    // which gets none (a thread per connection at most).
    for (threads, conns, want_threads) in [(3, 4, 3), (5, 4, 4)] {
        let r = scenarios::fanout_api(
            &socket,
            api.clone(),
            31,
            conns,
            None,
            Duration::from_secs(20),
            threads,
        )
        .await
        .unwrap();
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(
            (r.ready, r.updated, r.connections, r.client_threads),
            (31, 31, conns, want_threads),
            "{r:?}"
        );
    }
}
