//! The bundle endpoint server: the own trust domain's bundle in SPIFFE format over HTTPS, for
//! federated peers (SPIFFE Federation spec §4). Any path answers with the bundle, as SPIRE
//! Server's endpoint does; only `GET` and `HEAD` are served.
//!
//! It listens on a TCP address reachable from other hosts, so it is built not to be turned
//! against the agent: at most [`EndpointLimits::max_connections`] connections (more are closed
//! at accept), a deadline for the TLS handshake and for the whole exchange, one request per
//! connection, no request body read, a small request head.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::tls::{CurrentCert, provider};

/// The largest request head read (hyper's smallest read buffer).
const MAX_HEAD_BYTES: usize = 8192;

/// The endpoint's limits (`[federation.bundle_endpoint]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Most connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// How long a client has for the TLS handshake and its request head.
    pub handshake_timeout: Duration,
    /// How long one connection may last, handshake to response.
    pub connection_timeout: Duration,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// The TLS server side: the current certificate at each handshake, TLS 1.2 or 1.3, no client
/// certificate, ALPN `http/1.1`, no session resumption state kept per client.
pub fn server_config(cert: Arc<CurrentCert>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// What the endpoint serves: the SPIFFE bundle document (JSON), replaced on every change of
/// the own bundle; empty before the first (answered 503).
pub type Document = watch::Receiver<Bytes>;

fn respond(req: &Request<Incoming>, document: &Document) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    let (status, content_type, body) = if req.method() != Method::GET && !head {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"only GET is served\n"),
        )
    } else {
        let doc = document.borrow().clone();
        if doc.is_empty() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                Bytes::from_static(b"the bundle is not ready yet\n"),
            )
        } else {
            (StatusCode::OK, "application/json", doc)
        }
    };
    let len = body.len();
    let mut response = Response::new(Full::new(if head { Bytes::new() } else { body }));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// Serves `document` on `listener` with `tls` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    document: Document,
    limits: EndpointLimits,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let shed = spiffed_core::LogGate::new(Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::debug!(error = %e, "bundle endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Some(held_back) = shed.admit(Instant::now()) {
                tracing::warn!(
                    %peer,
                    limit = limits.max_connections,
                    shed_since_last_line = held_back,
                    "bundle endpoint: closing a connection, too many open"
                );
            }
            drop(stream);
            continue;
        };
        let acceptor = acceptor.clone();
        let document = document.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let exchange = async {
                let tls = match tokio::time::timeout(
                    limits.handshake_timeout,
                    acceptor.accept(stream),
                )
                .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "bundle endpoint: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "bundle endpoint: TLS handshake timed out");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let response = respond(&req, &document);
                    async move { Ok::<_, Infallible>(response) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.handshake_timeout)
                    .max_buf_size(MAX_HEAD_BYTES)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tls), service);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "bundle endpoint: HTTP exchange failed");
                }
            };
            if tokio::time::timeout(limits.connection_timeout, exchange)
                .await
                .is_err()
            {
                tracing::debug!(%peer, "bundle endpoint: connection timed out");
            }
        });
    }
}
