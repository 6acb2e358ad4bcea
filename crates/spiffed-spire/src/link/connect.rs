//! Connections to the server: every address of its name, with failover, then TLS.
//!
//! A tonic `Channel` calls the [`Connector`] whenever it needs a connection: at the first
//! call, and again after the server closed the last one (SPIRE Server closes every connection
//! after 3 minutes, `MaxConnectionAge`). Each connect resolves the name again, so a changed
//! DNS record is followed, and tries the addresses in this agent's order of preference; an
//! address that does not answer within [`CONNECT_TIMEOUT`], or fails the TLS handshake, is
//! skipped for the next.
//!
//! The order of preference is rendezvous hashing: every address is ranked by a hash of the
//! agent's random seed (drawn once per process) and the address. So agents spread evenly over
//! an HA server fleet, each agent keeps going back to the same server (its first choice) as
//! long as that one answers, and a server that joins or leaves moves only the agents that
//! prefer it. An agent that had to fall back to another address (its first choice was down)
//! says so in [`Connector::fallback_since`]; the link then replaces the connection after a
//! while, so that agents return to their first choice once it is back, instead of all staying
//! on the survivor (a herd) until something else moves them.

use std::future::Future;
use std::hash::{Hash as _, Hasher as _};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
    /// The agent's seed of the address ranking (the same for every connector of the agent).
    seed: u64,
    /// Since when the last connection is to an address other than the first choice (`None`
    /// when it is to the first choice, or there was none yet).
    fallback_since: Mutex<Option<Instant>>,
    /// Addresses used instead of resolving the name (tests of failover).
    fixed: Option<Vec<SocketAddr>>,
}

/// `addrs` in the order of preference of the agent with `seed` (rendezvous hashing: the
/// highest hash of (seed, address) first). The order of one address pair does not depend on
/// the other addresses, so a server that joins or leaves the name moves only the agents that
/// prefer it.
pub(crate) fn preference_order(seed: u64, addrs: &mut [SocketAddr]) {
    addrs.sort_by_cached_key(|a| {
        // SipHash with fixed keys: the same ranking in every process for the same seed.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        a.hash(&mut h);
        std::cmp::Reverse((h.finish(), *a))
    });
}

impl Connector {
    /// A connector to `address` with `tls`; `seed` ranks the addresses (see
    /// [`preference_order`]), the same for every connector of the agent.
    pub(crate) fn new(address: ServerAddress, tls: Arc<ClientConfig>, seed: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                address,
                tls: TlsConnector::from(tls),
                seed,
                fallback_since: Mutex::new(None),
                fixed: None,
            }),
        }
    }

    /// Since when this connector's connection is to an address other than its first choice,
    /// because the first choice did not answer; `None` when it is to the first choice.
    pub(crate) fn fallback_since(&self) -> Option<Instant> {
        *self
            .inner
            .fallback_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The same connector, trying exactly `addrs` (tests of failover).
    #[cfg(test)]
    pub(crate) fn with_addrs(self, addrs: Vec<SocketAddr>) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                address: inner.address.clone(),
                tls: inner.tls.clone(),
                seed: inner.seed,
                fallback_since: Mutex::new(None),
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
        let mut addrs = self.resolve().await?;
        preference_order(self.seed, &mut addrs);
        let mut failures = Vec::new();
        for addr in addrs {
            match self.connect_one(addr).await {
                Ok(stream) => {
                    tracing::debug!(%addr, "connected to the SPIRE Server");
                    let mut since = self
                        .fallback_since
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if failures.is_empty() {
                        *since = None;
                    } else {
                        since.get_or_insert_with(Instant::now);
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
