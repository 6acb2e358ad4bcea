//! A small HTTP/1.1 server for the metrics and health endpoints, built so that it cannot be
//! turned against the agent: it listens only on the configured address, holds at most
//! [`MAX_CONNECTIONS`] connections (more are closed at accept), answers one request per
//! connection, gives a client [`HEADER_TIMEOUT`] to send its request head (at most
//! [`MAX_HEAD_BYTES`]) and [`CONNECTION_TIMEOUT`] for the whole exchange, never reads a
//! request body, and serves only `GET` (and `HEAD`) on the paths its handler knows.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Most connections served at once; more are closed at accept.
pub(crate) const MAX_CONNECTIONS: usize = 32;
/// How long a client has to send its request head.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last, request and response.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest request head read (hyper's smallest read buffer).
pub(crate) const MAX_HEAD_BYTES: usize = 8192;

/// An answer: status, content type and body.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) content_type: &'static str,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: format!("{body}\n"),
        }
    }
}

/// What a server answers for a `GET` of a path (`None`: 404).
pub(crate) type Handler = Arc<dyn Fn(&str) -> Option<Answer> + Send + Sync>;

fn respond(req: &Request<Incoming>, handler: &Handler) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    let answer = if req.method() != Method::GET && !head {
        Answer::text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n")
    } else {
        handler(req.uri().path())
            .unwrap_or_else(|| Answer::text(StatusCode::NOT_FOUND, "not found\n"))
    };
    let len = answer.body.len();
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(answer.body)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(answer.content_type),
    );
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if answer.status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// Serves `handler` on `listener` until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    what: &'static str,
    handler: Handler,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let shed = spiffed_core::LogGate::new(Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::debug!(what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Some(held_back) = shed.admit(std::time::Instant::now()) {
                tracing::warn!(
                    what,
                    %peer,
                    limit = MAX_CONNECTIONS,
                    shed_since_last_line = held_back,
                    "closing an HTTP connection: too many open"
                );
            }
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = respond(&req, &handler);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(what, %peer, error = %e, "HTTP connection failed"),
                Err(_) => tracing::debug!(what, %peer, "HTTP connection timed out"),
            }
        });
    }
}

/// Binds `addr` for `key` (a std listener, so that a bad address fails at start-up, before
/// anything serves).
pub(crate) fn bind(key: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        format!("cannot listen on {addr} ({key}): {e}; choose a free port or another address")
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {addr} ({key}): {e}"))?;
    Ok(listener)
}
