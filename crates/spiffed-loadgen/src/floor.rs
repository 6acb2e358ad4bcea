//! The floor baseline: a minimal tonic Workload API server on a Unix socket that does only the
//! attestation syscalls spiffed does (`SO_PEERCRED`, `readlink /proc/PID/exe`) and returns
//! prebuilt responses. What the load generator measures against it is what this stack (tokio,
//! hyper, h2, tonic, prost, Unix sockets) can do on this machine; spiffed's figures are reported
//! as a fraction of it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use spiffed_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use spiffed_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::{Request, Response, Status};

/// The SPIFFE ID the floor hands out.
pub const FLOOR_ID: &str = "spiffe://floor.test/loadgen";

/// What the floor learned about a caller, carried from accept to every request.
#[derive(Debug, Clone)]
pub struct FloorPeer {
    /// A duplicate of the connection's descriptor, so each request can ask the kernel again.
    fd: Arc<OwnedFd>,
    /// The pid `SO_PEERCRED` gave at accept.
    pub pid: i32,
    /// The executable `/proc/PID/exe` named at accept.
    pub exe: Option<PathBuf>,
}

/// `SO_PEERCRED` on `fd`, then `readlink /proc/PID/exe`: the syscalls spiffed's unix attestor makes.
fn attest(fd: impl AsFd) -> io::Result<(i32, Option<PathBuf>)> {
    let cred = rustix::net::sockopt::socket_peercred(fd)?;
    let pid = cred.pid.as_raw_pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    Ok((pid, exe))
}

/// An accepted connection with its [`FloorPeer`].
#[derive(Debug)]
pub struct FloorStream {
    inner: UnixStream,
    peer: FloorPeer,
}

impl FloorStream {
    /// Attests the peer of a freshly accepted connection.
    pub fn accept(inner: UnixStream) -> io::Result<Self> {
        let (pid, exe) = attest(&inner)?;
        let fd = Arc::new(inner.as_fd().try_clone_to_owned()?);
        Ok(Self {
            inner,
            peer: FloorPeer { fd, pid, exe },
        })
    }
}

impl tonic::transport::server::Connected for FloorStream {
    type ConnectInfo = FloorPeer;

    fn connect_info(&self) -> FloorPeer {
        self.peer.clone()
    }
}

impl AsyncRead for FloorStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FloorStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The floor service: prebuilt responses, per-request attestation syscalls, nothing else.
#[derive(Debug, Clone)]
pub struct Floor {
    x509: X509svidResponse,
    jwt: JwtsvidResponse,
    /// Resend the X.509 response on every open stream this often (a stand-in for rotations).
    rotate_every: Option<Duration>,
}

impl Floor {
    /// Builds the responses once: a self-signed certificate and key (rcgen) and a dummy JWT.
    pub fn new() -> anyhow::Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let cert = ck.cert.der().to_vec();
        let key = ck.signing_key.serialize_der();
        let x509 = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: FLOOR_ID.to_owned(),
                x509_svid: cert.clone(),
                x509_svid_key: key,
                bundle: cert,
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: Default::default(),
        };
        // A JWT-shaped string of typical size; nobody validates it.
        let jwt = JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: FLOOR_ID.to_owned(),
                svid: format!("{}.{}.{}", "e".repeat(60), "p".repeat(200), "s".repeat(86)),
                hint: String::new(),
            }],
        };
        Ok(Self {
            x509,
            jwt,
            rotate_every: None,
        })
    }

    /// Resends the X.509 response on every open `FetchX509SVID` stream every `every`, as an
    /// agent does on rotation (for testing the scenarios that count rotations).
    pub fn rotating(mut self, every: Duration) -> Self {
        self.rotate_every = Some(every);
        self
    }

    /// Does the per-request attestation work and checks the security header.
    fn check<T>(req: &Request<T>) -> Result<(), Status> {
        if req
            .metadata()
            .get("workload.spiffe.io")
            .map(|v| v.as_bytes())
            != Some(b"true")
        {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let peer = req
            .extensions()
            .get::<FloorPeer>()
            .ok_or_else(|| Status::internal("no peer credentials"))?;
        let (pid, exe) =
            attest(peer.fd.as_fd()).map_err(|e| Status::permission_denied(e.to_string()))?;
        if pid != peer.pid || exe.is_none() && peer.exe.is_some() {
            return Err(Status::permission_denied("peer changed"));
        }
        Ok(())
    }
}

/// A stream that yields one message and then stays open (like a Workload API watch).
type OneThenPending<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn one_then_pending<T: Send + 'static>(msg: T) -> OneThenPending<T> {
    Box::pin(futures::stream::once(async move { Ok(msg) }).chain(futures::stream::pending()))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Floor {
    type FetchX509SVIDStream = OneThenPending<X509svidResponse>;
    type FetchX509BundlesStream = OneThenPending<X509BundlesResponse>;
    type FetchJWTBundlesStream = OneThenPending<JwtBundlesResponse>;
    type FetchWITSVIDStream = OneThenPending<WitsvidResponse>;
    type FetchWITBundlesStream = OneThenPending<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Self::check(&request)?;
        let msg = self.x509.clone();
        let Some(every) = self.rotate_every else {
            return Ok(Response::new(one_then_pending(msg)));
        };
        let start = tokio::time::Instant::now() + every;
        let again =
            tokio_stream::wrappers::IntervalStream::new(tokio::time::interval_at(start, every))
                .map(move |_| Ok(msg.clone()));
        let first = futures::stream::once(futures::future::ready(Ok(self.x509.clone())));
        Ok(Response::new(Box::pin(first.chain(again))))
    }

    async fn fetch_x509_bundles(
        &self,
        _request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented(
            "floor serves FetchX509SVID and FetchJWTSVID only",
        ))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Self::check(&request)?;
        Ok(Response::new(self.jwt.clone()))
    }

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented(
            "floor serves FetchX509SVID and FetchJWTSVID only",
        ))
    }

    async fn validate_jwtsvid(
        &self,
        _request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented(
            "floor serves FetchX509SVID and FetchJWTSVID only",
        ))
    }

    async fn fetch_witsvid(
        &self,
        _request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented(
            "floor serves FetchX509SVID and FetchJWTSVID only",
        ))
    }

    async fn fetch_wit_bundles(
        &self,
        _request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented(
            "floor serves FetchX509SVID and FetchJWTSVID only",
        ))
    }
}

/// Accepted and attested connections from `listener`; accept errors pause briefly and retry.
fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<FloorStream>> {
    futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let item = FloorStream::accept(stream);
                    return Some((item, listener));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
}

/// Binds `path` (replacing a stale socket file) for [`serve`].
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path)
}

/// Serves the floor on `listener` until the task is dropped or the server fails.
pub async fn serve(listener: UnixListener) -> anyhow::Result<()> {
    serve_floor(listener, Floor::new()?).await
}

/// Serves `floor` (e.g. a [`Floor::rotating`] one) on `listener`.
pub async fn serve_floor(listener: UnixListener, floor: Floor) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(floor))
        .serve_with_incoming(incoming(listener))
        .await?;
    Ok(())
}
