//! Connecting to a Workload API socket and making requests that carry the security header.

use std::path::Path;

use hyper_util::rt::TokioIo;
use spiffed_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::net::UnixStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// A Workload API client over one connection.
pub type Client = SpiffeWorkloadApiClient<Channel>;

/// Opens one HTTP/2 connection over the Unix socket at `path`.
pub async fn connect(path: &Path) -> Result<Client, tonic::transport::Error> {
    Ok(SpiffeWorkloadApiClient::new(channel(path).await?))
}

/// Opens one HTTP/2 channel over the Unix socket at `path` (any gRPC service).
pub async fn channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // "http://localhost" always parses; the URI only names the :authority.
    let endpoint = Endpoint::from_static("http://localhost");
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(channel)
}

/// Wraps `msg` in a request carrying `workload.spiffe.io: true`.
pub fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", MetadataValue::from_static("true"));
    r
}

/// The name an error is counted under: the gRPC code (`PermissionDenied`, ...).
pub fn code_name(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}
