//! The accept loop: Unix connections, each with its caller's [`PeerCred`] taken at accept.
//!
//! The gRPC server reads connections from [`incoming`]; each [`PeerStream`] hands tonic a
//! [`PeerCred`] that request handlers find in their request's extensions.

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use spiffed_core::PeerCred;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Sleep;
use tokio_stream::Stream;

use crate::sys;

/// How long the accept loop pauses when the process or system is out of descriptors or memory.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(50);

/// An accepted connection and the kernel's facts about the process that opened it.
#[derive(Debug)]
pub struct PeerStream {
    inner: UnixStream,
    cred: PeerCred,
}

impl PeerStream {
    /// Pairs a connection with the credentials taken from it (see [`peer_cred`]).
    pub fn new(inner: UnixStream, cred: PeerCred) -> Self {
        Self { inner, cred }
    }

    /// The caller's credentials, taken when the connection was accepted.
    pub fn cred(&self) -> &PeerCred {
        &self.cred
    }

    /// The connection.
    pub fn get_ref(&self) -> &UnixStream {
        &self.inner
    }

    /// Splits into the connection and its credentials.
    pub fn into_parts(self) -> (UnixStream, PeerCred) {
        (self.inner, self.cred)
    }
}

impl tonic::transport::server::Connected for PeerStream {
    /// Handlers find the caller's [`PeerCred`] in their request's extensions:
    /// `req.extensions().get::<PeerCred>()` (the type lives in spiffed-core, so the Workload
    /// API crate needs no dependency on this one).
    type ConnectInfo = PeerCred;

    fn connect_info(&self) -> PeerCred {
        self.cred.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
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

/// Takes the credentials of the process at the other end of `stream`.
///
/// `SO_PEERCRED` gives the pid, uid and gid recorded at `connect(2)`; a pid of 0 (the peer is in
/// another PID namespace) becomes `pid: None`. The pidfd comes from `SO_PEERPIDFD`, which names
/// exactly the connecting process. On kernels without it (before 6.5) it comes from
/// `pidfd_open(pid)`, which is only as good as taking it right after accept; if neither is
/// available (before 5.3, or a seccomp filter) `pidfd` is `None`.
///
/// Fails when the peer process is already gone (`SO_PEERPIDFD` reports `EINVAL` for a reaped
/// peer; falling back to `pidfd_open` then could pin another process that reused the pid), or
/// when the process is out of descriptors.
pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    let ucred = stream.peer_cred()?;
    let pid = ucred
        .pid()
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid != 0);
    let pidfd = match pid {
        Some(pid) => peer_pidfd(stream, pid)?.map(Arc::new),
        None => None,
    };
    Ok(PeerCred {
        pid,
        uid: ucred.uid(),
        gid: ucred.gid(),
        pidfd,
    })
}

fn peer_pidfd(stream: &UnixStream, pid: u32) -> io::Result<Option<std::os::fd::OwnedFd>> {
    let error = match sys::peer_pidfd(stream.as_fd()) {
        Ok(fd) => return Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => e,
        Err(e) => return Err(e),
    };
    tracing::debug!(pid, %error, "no SO_PEERPIDFD; falling back to pidfd_open");
    match sys::pidfd_open(pid) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(e),
        Err(e) if is_resource_error(&e) => Err(e),
        Err(error) => {
            tracing::debug!(pid, %error, "no pidfd for this connection");
            Ok(None)
        }
    }
}

/// The process or system is out of descriptors, memory or buffers: a condition that retrying
/// at once cannot fix.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    )
}

/// Connections accepted from `listener`, each with its [`PeerCred`] taken at once.
///
/// A connection whose credentials cannot be taken (its process vanished between `connect` and
/// `accept`) is dropped with a debug log. When descriptors or memory run out, the loop logs one
/// warning per burst and pauses 50 ms before each retry instead of spinning. The stream never
/// ends and yields an error only for an unexpected accept failure (after which it also pauses);
/// serving stops when the server's shutdown future completes.
pub fn incoming(
    listener: UnixListener,
) -> impl Stream<Item = io::Result<PeerStream>> + Send + 'static {
    Incoming {
        listener,
        backoff: None,
        starved: false,
    }
}

struct Incoming {
    listener: UnixListener,
    /// Set while the loop waits before accepting again.
    backoff: Option<Pin<Box<Sleep>>>,
    /// Inside a burst of resource errors (warned already); cleared by the next accept.
    starved: bool,
}

impl Incoming {
    fn pause(&mut self) {
        self.backoff = Some(Box::pin(tokio::time::sleep(RESOURCE_BACKOFF)));
    }

    fn starving(&mut self, error: &io::Error, during: &'static str) {
        if self.starved {
            tracing::debug!(%error, during, "still out of resources; pausing accept");
        } else {
            tracing::warn!(
                %error,
                during,
                pause_ms = RESOURCE_BACKOFF.as_millis(),
                "out of descriptors or memory; pausing accept until it clears"
            );
            self.starved = true;
        }
        self.pause();
    }
}

impl Stream for Incoming {
    type Item = io::Result<PeerStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(sleep) = this.backoff.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.backoff = None;
            }
            let stream = match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _addr)) => stream,
                Err(e) if is_resource_error(&e) => {
                    this.starving(&e, "accept");
                    continue;
                }
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "accept failed for one connection");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    this.pause();
                    return Poll::Ready(Some(Err(e)));
                }
            };
            match peer_cred(&stream) {
                Ok(cred) => {
                    this.starved = false;
                    return Poll::Ready(Some(Ok(PeerStream::new(stream, cred))));
                }
                Err(e) if is_resource_error(&e) => this.starving(&e, "peer credentials"),
                Err(e) => {
                    tracing::debug!(error = %e, "dropping connection whose peer is gone");
                }
            }
        }
    }
}

/// Failures of one pending connection, not of the listener: accept the next one.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_stream::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn peer_cred_of_our_own_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        assert_eq!(cred.pid, Some(std::process::id()));
        assert_eq!(cred.uid, nix::unistd::Uid::effective().as_raw());
        assert_eq!(cred.gid, nix::unistd::Gid::effective().as_raw());
        let pidfd = cred.pidfd.expect("SO_PEERPIDFD or pidfd_open works here");
        assert_eq!(
            sys::pidfd_pid(pidfd.as_fd()),
            i32::try_from(std::process::id()).ok()
        );
    }

    #[tokio::test]
    async fn incoming_yields_connections_with_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut incoming = std::pin::pin!(incoming(listener));

        let mut client = UnixStream::connect(&path).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let info = tonic::transport::server::Connected::connect_info(&conn);
        assert_eq!(info.uid, nix::unistd::Uid::effective().as_raw());
        assert_eq!(info.pid, Some(std::process::id()));
        assert!(info.pidfd.is_some());

        // Bytes flow both ways through the wrapper.
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        conn.write_all(b"pong").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");

        // A second client is accepted as well.
        let _client2 = UnixStream::connect(&path).await.unwrap();
        let conn2 = incoming.next().await.unwrap().unwrap();
        assert_eq!(conn2.cred().pid, Some(std::process::id()));
    }

    #[test]
    fn classifies_accept_errors() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ENOBUFS] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(is_resource_error(&e), "{e}");
            assert!(!is_connection_error(&e), "{e}");
        }
        for errno in [libc::ECONNABORTED, libc::EINTR, libc::EAGAIN, libc::EPROTO] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(is_connection_error(&e), "{e}");
            assert!(!is_resource_error(&e), "{e}");
        }
        let e = io::Error::from_raw_os_error(libc::EBADF);
        assert!(!is_connection_error(&e) && !is_resource_error(&e));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_pauses_then_accepts_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let mut incoming = Incoming {
            listener: UnixListener::bind(&path).unwrap(),
            backoff: None,
            starved: false,
        };
        incoming.starving(&io::Error::from_raw_os_error(libc::EMFILE), "accept");
        assert!(incoming.starved);
        let _client = UnixStream::connect(&path).await.unwrap();

        let mut incoming = std::pin::pin!(incoming);
        // Nothing is yielded while the pause runs, even with a connection waiting.
        let early = tokio::time::timeout(Duration::from_millis(40), incoming.next()).await;
        assert!(early.is_err(), "accepted during the pause");
        let conn = incoming.next().await.unwrap().unwrap();
        assert_eq!(conn.cred().pid, Some(std::process::id()));
        assert!(!incoming.starved);
    }
}
