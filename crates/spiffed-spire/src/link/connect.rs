//! Connections to the server: every address of its name, with failover, then TLS.
//!
//! A tonic `Channel` calls the [`Connector`] whenever it needs a connection: at the first
//! call, and again after the server closed the last one (SPIRE Server closes every connection
//! after 3 minutes, `MaxConnectionAge`). Each connect resolves the name again, so a changed
//! DNS record is followed, and tries the addresses starting at a rotating offset (seeded at
//! random per agent) so agents spread over an HA server fleet; an address that does not
//! answer within [`CONNECT_TIMEOUT`], or fails the TLS handshake, is skipped for the next.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use crate::config::ServerAddress;
use crate::link::rpc::RPC_TIMEOUT;

/// How long a TCP connect to one address may take before the next address is tried.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the TLS handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no address gave a connection.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConnectError(String);

/// Connects to the server's addresses in turn; cheap to clone.
#[derive(Clone)]
pub(crate) struct Connector {
    inner: Arc<Inner>,
}

struct Inner {
    address: ServerAddress,
    tls: TlsConnector,
    next: Arc<AtomicUsize>,
    /// Addresses used instead of resolving the name (tests of failover).
    fixed: Option<Vec<SocketAddr>>,
}

impl Connector {
    /// A connector to `address` with `tls`; `next` is the rotating start offset, shared by
    /// every connector of the agent.
    pub(crate) fn new(
        address: ServerAddress,
        tls: Arc<ClientConfig>,
        next: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                address,
                tls: TlsConnector::from(tls),
                next,
                fixed: None,
            }),
        }
    }

    /// The same connector, trying exactly `addrs` (tests of failover).
    #[cfg(test)]
    pub(crate) fn with_addrs(self, addrs: Vec<SocketAddr>) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                address: inner.address.clone(),
                tls: inner.tls.clone(),
                next: Arc::clone(&inner.next),
                fixed: Some(addrs),
            }),
        }
    }

    /// A channel that connects through this connector when first used, and again whenever
    /// its connection is gone. Calls time out after [`RPC_TIMEOUT`].
    pub(crate) fn channel(self) -> Result<Channel, ConnectError> {
        let uri = format!("https://{}", self.inner.address);
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| ConnectError(format!("{uri} is not a usable address: {e}")))?
            .timeout(RPC_TIMEOUT);
        Ok(endpoint.connect_with_connector_lazy(self))
    }
}

impl Inner {
    async fn resolve(&self) -> Result<Vec<SocketAddr>, ConnectError> {
        if let Some(addrs) = &self.fixed {
            return Ok(addrs.clone());
        }
        let ServerAddress { host, port } = &self.address;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, *port)]);
        }
        let found = tokio::net::lookup_host((host.as_str(), *port))
            .await
            .map_err(|e| ConnectError(format!("cannot resolve {host}: {e}")))?;
        let mut addrs: Vec<SocketAddr> = found.collect();
        // A stable order, so the rotating offset walks every address in turn.
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(ConnectError(format!("{host} resolves to no address")));
        }
        Ok(addrs)
    }

    async fn connect_one(&self, addr: SocketAddr) -> Result<TlsStream<TcpStream>, String> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("no TCP connection within {}s", CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())?;
        // Small requests and answers: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        // The name is only for SNI (an IP literal sends none): the server is authenticated by
        // its SPIFFE ID, not by a hostname.
        let name = ServerName::try_from(self.address.host.clone())
            .unwrap_or(ServerName::IpAddress(addr.ip().into()));
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.connect(name, tcp))
            .await
            .map_err(|_| format!("no TLS handshake within {}s", HANDSHAKE_TIMEOUT.as_secs()))?
            .map_err(|e| crate::tls::describe_handshake_error(&e))
    }

    async fn connect(&self) -> Result<TokioIo<TlsStream<TcpStream>>, ConnectError> {
        let addrs = self.resolve().await?;
        let start = self.next.fetch_add(1, Ordering::Relaxed) % addrs.len();
        let mut failures = Vec::new();
        for i in 0..addrs.len() {
            let addr = addrs[(start + i) % addrs.len()];
            match self.connect_one(addr).await {
                Ok(stream) => {
                    tracing::debug!(%addr, "connected to the SPIRE Server");
                    if !failures.is_empty() {
                        tracing::info!(
                            %addr,
                            failed = %failures.join("; "),
                            "connected to the SPIRE Server at another of its addresses"
                        );
                    }
                    return Ok(TokioIo::new(stream));
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "cannot connect to the SPIRE Server");
                    failures.push(format!("{addr}: {e}"));
                }
            }
        }
        Err(ConnectError(failures.join("; ")))
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.connect().await })
    }
}
