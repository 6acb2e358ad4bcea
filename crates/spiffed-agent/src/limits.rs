//! What one local user can hold on the Workload API socket: descriptors, connections, streams
//! and time.
//!
//! Every connection costs two descriptors (the socket and the caller's pidfd), and the process
//! has a fixed number of them. Without limits, one uid opening silent connections could use
//! them all and starve every other caller, the admin socket and the agent's own files
//! (`ca.json`, SQLite). So:
//!
//! - [`raise_fd_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at start.
//! - [`incoming`] wraps the accept loop: it stops accepting on the public socket while fewer
//!   than `fd_reserve` descriptors are free (the admin socket keeps its own loop), and closes at
//!   once, before any HTTP/2, a connection whose uid already holds `max_connections_per_uid`.
//!   The count is released when the connection closes ([`Tracked`] holds a guard).
//! - [`Tracked`] closes a connection that sends no request within `handshake_timeout` of
//!   being accepted, and one that has had no open stream for `idle_timeout`.
//! - [`StreamLimitLayer`] counts open streams per connection (for the idle timeout) and per
//!   uid, and answers a stream past `max_streams_per_uid` with ResourceExhausted. The limit per
//!   connection is HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS, set on the server builder.
//!
//! Refusals are logged at most once per [`LOG_EVERY`] per kind, with the number left out.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body as HttpBody, Frame, SizeHint};
use spiffed_attest::listen::PeerStream;
use spiffed_core::{LogGate, PeerCred};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;

use crate::config::{AUTO_CONNECTIONS_PER_UID, Config};
use crate::telemetry::rpc::{RpcCall, RpcMetrics};

/// How often each kind of refusal may be logged.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// How long the accept loop waits before looking again when descriptors are short.
const RESERVE_BACKOFF: Duration = Duration::from_millis(50);

/// Streams and connections closed since the last trim after which freed heap is handed back
/// to the kernel.
const TRIM_AFTER: usize = 1000;
/// How long a trim waits once due, so that a burst of closes (a 10,000-stream fan-out ending)
/// is trimmed once, not once per [`TRIM_AFTER`] closes while it is still going on.
const TRIM_DELAY: Duration = Duration::from_secs(1);

/// The soft and hard descriptor limits, before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit the process started with (`None`: unlimited).
    pub soft_before: Option<u64>,
    /// The soft limit now.
    pub soft: Option<u64>,
    /// The hard limit.
    pub hard: Option<u64>,
}

impl FdLimit {
    /// The limit the accounting works with: the soft limit, or a large number when unlimited.
    fn effective(&self) -> usize {
        self.soft
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(1 << 20)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to `/proc/sys/fs/nr_open` when the hard
/// limit is unlimited, since Linux refuses an unlimited descriptor count), and logs both.
/// A failure is logged and leaves the limit as it was.
pub fn raise_fd_limit() -> FdLimit {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let target = before.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let mut limit = FdLimit {
        soft_before: before.current,
        soft: before.current,
        hard: before.maximum,
    };
    if let Some(target) = target
        && before.current.is_some_and(|soft| soft < target)
    {
        let new = Rlimit {
            current: Some(target),
            maximum: before.maximum,
        };
        match setrlimit(Resource::Nofile, new) {
            Ok(()) => limit.soft = Some(target),
            Err(e) => tracing::warn!(
                error = %e,
                soft = ?before.current,
                hard = ?before.maximum,
                "could not raise the soft descriptor limit (RLIMIT_NOFILE) to the hard limit"
            ),
        }
    }
    let show = |n: Option<u64>| n.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    tracing::info!(
        soft_before = %show(limit.soft_before),
        soft = %show(limit.soft),
        hard = %show(limit.hard),
        "descriptor limit (RLIMIT_NOFILE)"
    );
    limit
}

/// The limits in force, resolved from the config and the descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most open connections per uid on the Workload API socket.
    pub max_connections_per_uid: usize,
    /// Most concurrent streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// Most concurrent streams per uid.
    pub max_streams_per_uid: usize,
    /// Deadline for a connection's first request.
    pub handshake_timeout: Duration,
    /// How long a connection with no open stream is kept.
    pub idle_timeout: Duration,
    /// Descriptors kept free for the admin socket and the agent's files.
    pub fd_reserve: usize,
}

impl Limits {
    /// The config's limits; `max_connections_per_uid` unset becomes a sixteenth of the
    /// descriptor limit (an eighth of the descriptors at two per connection), within
    /// [`AUTO_CONNECTIONS_PER_UID`].
    pub fn resolve(cfg: &Config, fds: &FdLimit) -> Self {
        let auto = (fds.effective() / 16).clamp(
            *AUTO_CONNECTIONS_PER_UID.start(),
            *AUTO_CONNECTIONS_PER_UID.end(),
        );
        Self {
            max_connections_per_uid: cfg.max_connections_per_uid.unwrap_or(auto),
            max_streams_per_connection: cfg.max_streams_per_connection,
            max_streams_per_uid: cfg.max_streams_per_uid,
            handshake_timeout: cfg.handshake_timeout,
            idle_timeout: cfg.idle_timeout,
            fd_reserve: cfg.fd_reserve,
        }
    }
}

/// A refusal line let through at most once per [`LOG_EVERY`], counting the ones held back.
#[derive(Debug)]
struct Throttle(LogGate);

impl Default for Throttle {
    fn default() -> Self {
        Self(LogGate::new(LOG_EVERY))
    }
}

impl Throttle {
    /// `Some(lines held back since the last one)` when this line may be logged.
    fn allow(&self) -> Option<u64> {
        self.0.admit(Instant::now().into_std())
    }
}

/// The counts shared by the accept loop, every connection and every stream.
#[derive(Debug)]
pub struct Shared {
    limits: Limits,
    /// The soft descriptor limit.
    fd_limit: usize,
    /// Descriptors open when serving started (sockets, store, log), counted once.
    fd_baseline: usize,
    /// Descriptors held by open Workload API connections.
    fds_in_use: AtomicUsize,
    connections: Mutex<HashMap<u32, usize>>,
    streams: Mutex<HashMap<u32, usize>>,
    /// Streams and connections closed since the heap was last trimmed.
    released: AtomicUsize,
    /// A trim is due and waiting [`TRIM_DELAY`]; shared with the task that runs it.
    trim_scheduled: Arc<AtomicBool>,
    refused_connection: Throttle,
    refused_stream: Throttle,
    short_of_fds: Throttle,
    /// RPC counts and latencies, when metrics are on (`[metrics]`).
    rpc: Option<Arc<RpcMetrics>>,
}

impl Shared {
    /// Counts for a server with `limits`, under the descriptor limit `fds`.
    pub fn new(limits: Limits, fds: &FdLimit) -> Arc<Self> {
        Self::observed(limits, fds, None)
    }

    /// Counts as [`Shared::new`], and every RPC into `rpc` when metrics are on.
    pub(crate) fn observed(
        limits: Limits,
        fds: &FdLimit,
        rpc: Option<Arc<RpcMetrics>>,
    ) -> Arc<Self> {
        let fd_baseline = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
        Self::with_baseline(limits, fds, fd_baseline, rpc)
    }

    fn with_baseline(
        limits: Limits,
        fds: &FdLimit,
        fd_baseline: usize,
        rpc: Option<Arc<RpcMetrics>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            limits,
            fd_limit: fds.effective(),
            fd_baseline,
            fds_in_use: AtomicUsize::new(0),
            connections: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            released: AtomicUsize::new(0),
            trim_scheduled: Arc::new(AtomicBool::new(false)),
            refused_connection: Throttle::default(),
            refused_stream: Throttle::default(),
            short_of_fds: Throttle::default(),
            rpc,
        })
    }

    /// Open connections and open streams on the public socket, over every uid (one pass
    /// under each lock: for `spiffed status` and metrics, not the request path).
    pub(crate) fn open_counts(&self) -> (usize, usize) {
        let conns = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum();
        let streams = self
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum();
        (conns, streams)
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether one more connection (two descriptors) leaves `fd_reserve` free.
    fn room_for_a_connection(&self) -> bool {
        let used = self.fd_baseline + self.fds_in_use.load(Ordering::Relaxed);
        used + 2 + self.limits.fd_reserve <= self.fd_limit
    }

    /// Counts a connection of `cred.uid`, or refuses it (logged) when the uid is at its cap.
    fn admit(self: &Arc<Self>, cred: &PeerCred) -> Option<ConnGuard> {
        let uid = cred.uid;
        let fds = 1 + usize::from(cred.pidfd.is_some());
        {
            let mut conns = self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let n = conns.entry(uid).or_insert(0);
            if *n >= self.limits.max_connections_per_uid {
                let open = *n;
                drop(conns);
                if let Some(held_back) = self.refused_connection.allow() {
                    tracing::warn!(
                        uid,
                        pid = ?cred.pid,
                        open,
                        limit = self.limits.max_connections_per_uid,
                        refused_since_last_line = held_back,
                        "refusing a connection: this uid holds max_connections_per_uid \
                         connections already; it must close some (or raise \
                         max_connections_per_uid)"
                    );
                }
                return None;
            }
            *n += 1;
        }
        self.fds_in_use.fetch_add(fds, Ordering::Relaxed);
        Some(ConnGuard {
            shared: self.clone(),
            uid,
            fds,
        })
    }

    /// Counts a stream of `uid`, or returns how many it has open when that is
    /// `max_streams_per_uid` already.
    fn open_stream(&self, uid: u32) -> Result<(), usize> {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let n = streams.entry(uid).or_insert(0);
        if *n >= self.limits.max_streams_per_uid {
            return Err(*n);
        }
        *n += 1;
        Ok(())
    }

    fn close_stream(&self, uid: u32) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = streams.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&uid);
            }
        }
        drop(streams);
        self.released();
    }

    /// After many streams or connections have closed, hands freed heap back to the kernel:
    /// glibc keeps it otherwise, and an attacker's burst would stay in the agent's RSS.
    fn released(&self) {
        if self.released.fetch_add(1, Ordering::Relaxed) + 1 < TRIM_AFTER {
            return;
        }
        // One trim at a time: whoever sets the flag schedules it; closes meanwhile only count.
        if self.trim_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        self.released.store(0, Ordering::Relaxed);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.trim_scheduled.store(false, Ordering::Release);
            return;
        };
        let scheduled = self.trim_scheduled.clone();
        drop(handle.spawn(async move {
            tokio::time::sleep(TRIM_DELAY).await;
            // Cleared first: closes during the trim schedule the next one.
            scheduled.store(false, Ordering::Release);
            let _ = tokio::task::spawn_blocking(spiffed_attest::release_free_memory).await;
        }));
    }
}

/// One counted connection; dropping it (when the connection closes) releases the count.
#[derive(Debug)]
pub struct ConnGuard {
    shared: Arc<Shared>,
    uid: u32,
    fds: usize,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        {
            let mut conns = self
                .shared
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = conns.get_mut(&self.uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    conns.remove(&self.uid);
                }
            }
        }
        self.shared
            .fds_in_use
            .fetch_sub(self.fds, Ordering::Relaxed);
        self.shared.released();
    }
}

/// Accepted Workload API connections, within the limits: none is accepted while fewer than
/// `fd_reserve` descriptors would be left, and one whose uid is at `max_connections_per_uid`
/// is closed at once. Each connection comes wrapped for the handshake and idle timeouts; `wrap`
/// puts the connection's own layers (the HTTP/2 front) between the socket and [`Tracked`].
pub fn incoming<S, IO>(
    inner: S,
    shared: Arc<Shared>,
    wrap: impl Fn(PeerStream) -> IO + Send + Unpin + 'static,
) -> impl Stream<Item = io::Result<Tracked<IO>>> + Send + 'static
where
    S: Stream<Item = io::Result<PeerStream>> + Send + Unpin + 'static,
{
    Admit {
        inner,
        shared,
        wrap,
        backoff: None,
    }
}

struct Admit<S, F> {
    inner: S,
    shared: Arc<Shared>,
    wrap: F,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl<S, F, IO> Stream for Admit<S, F>
where
    S: Stream<Item = io::Result<PeerStream>> + Unpin,
    F: Fn(PeerStream) -> IO + Unpin,
{
    type Item = io::Result<Tracked<IO>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is Unpin (the sleep is boxed).
        let this = Pin::into_inner(self);
        loop {
            if let Some(sleep) = this.backoff.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.backoff = None;
            }
            if !this.shared.room_for_a_connection() {
                if let Some(held_back) = this.shared.short_of_fds.allow() {
                    tracing::warn!(
                        fd_limit = this.shared.fd_limit,
                        in_use = this.shared.fd_baseline
                            + this.shared.fds_in_use.load(Ordering::Relaxed),
                        fd_reserve = this.shared.limits.fd_reserve,
                        warned_since_last_line = held_back,
                        "descriptors are short: not accepting on the Workload API socket until \
                         connections close (the admin socket still accepts)"
                    );
                }
                this.backoff = Some(Box::pin(tokio::time::sleep(RESERVE_BACKOFF)));
                continue;
            }
            let conn = match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(conn)) => conn,
            };
            let cred = conn.cred().clone();
            let Some(guard) = this.shared.admit(&cred) else {
                // Dropping the stream closes the connection before any HTTP/2.
                continue;
            };
            let limits = this.shared.limits;
            return Poll::Ready(Some(Ok(Tracked::new(
                (this.wrap)(conn),
                cred,
                guard,
                limits.handshake_timeout,
                limits.idle_timeout,
            ))));
        }
    }
}

/// What a connection's streams tell it: whether a request has come, how many are open, and
/// since when none has been.
#[derive(Debug)]
pub struct ConnState {
    saw_request: AtomicBool,
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn stream_opened(&self) {
        self.saw_request.store(true, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    fn stream_closed(&self) {
        if self.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        }
    }
}

/// What a Workload API connection hands the gRPC server: the caller's credentials, and the
/// connection's state for the stream layer. [`StreamLimitLayer`] puts the [`PeerCred`] into
/// each request's extensions, where the handlers look for it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The caller's credentials, taken at accept.
    pub cred: PeerCred,
    state: Arc<ConnState>,
}

pin_project_lite::pin_project! {
    /// A Workload API connection that closes itself when it sends no request within the
    /// handshake timeout, or has had no open stream for the idle timeout: its reads then
    /// report end of file, so the HTTP/2 server ends the connection, and its writes fail.
    /// Holds the guard that counts it against its uid and the descriptor reserve.
    #[project = TrackedProj]
    pub struct Tracked<IO> {
        #[pin]
        io: IO,
        info: ConnInfo,
        accepted: Instant,
        handshake_timeout: Duration,
        idle_timeout: Duration,
        timer: Pin<Box<Sleep>>,
        expired: bool,
        _guard: ConnGuard,
    }
}

impl<IO> Tracked<IO> {
    fn new(
        io: IO,
        cred: PeerCred,
        guard: ConnGuard,
        handshake_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let accepted = Instant::now();
        Self {
            io,
            info: ConnInfo {
                cred,
                state: Arc::new(ConnState {
                    saw_request: AtomicBool::new(false),
                    open: AtomicUsize::new(0),
                    idle_since: Mutex::new(accepted),
                }),
            },
            accepted,
            handshake_timeout,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep_until(accepted + handshake_timeout)),
            expired: false,
            _guard: guard,
        }
    }
}

/// Ready once the connection is past its deadline; re-arms the timer otherwise.
fn poll_deadline(
    info: &ConnInfo,
    accepted: Instant,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    timer: &mut Pin<Box<Sleep>>,
    expired: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if *expired {
        return Poll::Ready(());
    }
    loop {
        ready!(timer.as_mut().poll(cx));
        let now = Instant::now();
        let state = &info.state;
        let (deadline, why) = if !state.saw_request.load(Ordering::Relaxed) {
            (
                accepted + handshake_timeout,
                "no request within handshake_timeout",
            )
        } else if state.open.load(Ordering::Relaxed) > 0 {
            // Look again later; a stream may still close.
            (now + idle_timeout, "")
        } else {
            let since = *state
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            (since + idle_timeout, "no open stream for idle_timeout")
        };
        if deadline <= now {
            tracing::debug!(
                uid = info.cred.uid,
                pid = ?info.cred.pid,
                reason = why,
                "closing a Workload API connection"
            );
            *expired = true;
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    }
}

/// Whether the connection of `this` is past its deadline (see [`poll_deadline`]).
fn past_deadline<IO>(this: &mut TrackedProj<'_, IO>, cx: &mut Context<'_>) -> bool {
    poll_deadline(
        this.info,
        *this.accepted,
        *this.handshake_timeout,
        *this.idle_timeout,
        this.timer,
        this.expired,
        cx,
    )
    .is_ready()
}

impl<IO: AsyncRead> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if past_deadline(&mut this, cx) {
            // End of file: the server closes the connection.
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "connection closed by handshake_timeout or idle_timeout",
    )
}

/// A write that is pending: a client that does not read must not keep the connection past its
/// deadline, so a pending write fails once the deadline passed.
fn pending_within_deadline<IO>(
    this: &mut TrackedProj<'_, IO>,
    cx: &mut Context<'_>,
    polled: Poll<io::Result<usize>>,
) -> Poll<io::Result<usize>> {
    if polled.is_pending() && past_deadline(this, cx) {
        return Poll::Ready(Err(timed_out()));
    }
    polled
}

impl<IO: AsyncWrite> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        let polled = this.io.as_mut().poll_write(cx, buf);
        pending_within_deadline(&mut this, cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        let polled = this.io.as_mut().poll_write_vectored(cx, bufs);
        pending_within_deadline(&mut this, cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

impl<IO> tonic::transport::server::Connected for Tracked<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// The tower layer that counts streams (per connection, for the idle timeout; per uid, for
/// `max_streams_per_uid`) and puts the caller's [`PeerCred`] into each request.
#[derive(Debug, Clone)]
pub struct StreamLimitLayer {
    shared: Arc<Shared>,
}

impl StreamLimitLayer {
    /// A layer counting against `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl<S> tower::Layer<S> for StreamLimitLayer {
    type Service = StreamLimit<S>;

    fn layer(&self, inner: S) -> StreamLimit<S> {
        StreamLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// See [`StreamLimitLayer`].
#[derive(Debug, Clone)]
pub struct StreamLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// A boxed response future.
type ResponseFuture<E> =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for StreamLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let Some(info) = req.extensions().get::<ConnInfo>().cloned() else {
            // Not a counted connection (unit tests): serve as is.
            let fut = self.inner.call(req);
            return Box::pin(fut);
        };
        let uid = info.cred.uid;
        let mut call = self.shared.rpc.as_ref().map(|m| m.start(req.uri().path()));
        info.state.stream_opened();
        let mut guard = StreamGuard {
            conn: Some(info.state.clone()),
            uid: None,
            shared: self.shared.clone(),
        };
        if let Err(open) = self.shared.open_stream(uid) {
            let limit = self.shared.limits.max_streams_per_uid;
            if let Some(held_back) = self.shared.refused_stream.allow() {
                tracing::warn!(
                    uid,
                    pid = ?info.cred.pid,
                    open,
                    limit,
                    refused_since_last_line = held_back,
                    "refusing a stream: this uid has max_streams_per_uid streams open"
                );
            }
            drop(guard);
            if let Some(call) = &mut call {
                call.finish(tonic::Code::ResourceExhausted as i32);
            }
            let status = tonic::Status::resource_exhausted(format!(
                "too many open streams for uid {uid} (max_streams_per_uid = {limit}); close some \
                 and retry"
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        guard.uid = Some(uid);
        req.extensions_mut().insert(info.cred);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            if let Some(call) = &mut call {
                // A trailers-only response (an error before any message) has its status here.
                call.status_from(response.headers());
            }
            // The stream lasts as long as its response body: the guard goes with it.
            Ok(response.map(|body| tonic::body::Body::new(Guarded { body, guard, call })))
        })
    }
}

/// One open stream: counted on its connection and (once admitted) against its uid.
#[derive(Debug)]
struct StreamGuard {
    conn: Option<Arc<ConnState>>,
    uid: Option<u32>,
    shared: Arc<Shared>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.stream_closed();
        }
        if let Some(uid) = self.uid.take() {
            self.shared.close_stream(uid);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its stream counted until it is done or dropped, and
    /// tells the RPC's metrics (when on) of its first message and its status.
    struct Guarded<B> {
        #[pin]
        body: B,
        guard: StreamGuard,
        call: Option<RpcCall>,
    }
}

impl<B: HttpBody> HttpBody for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let (Some(call), Poll::Ready(Some(Ok(frame)))) = (this.call.as_mut(), &polled) {
            if frame.is_data() {
                call.first_message();
            } else if let Some(trailers) = frame.trailers_ref() {
                call.status_from(trailers);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections_per_uid: 2,
            max_streams_per_connection: 100,
            max_streams_per_uid: 3,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            fd_reserve: 10,
        }
    }

    fn cred(uid: u32) -> PeerCred {
        PeerCred {
            pid: Some(1),
            uid,
            gid: uid,
            pidfd: None,
        }
    }

    fn fds(n: u64) -> FdLimit {
        FdLimit {
            soft_before: Some(n),
            soft: Some(n),
            hard: Some(n),
        }
    }

    #[test]
    fn auto_connection_cap_follows_the_fd_limit_within_bounds() {
        let mut cfg = Config::with_defaults(spiffed_core::TrustDomain::new("example.org").unwrap());
        assert_eq!(
            Limits::resolve(&cfg, &fds(1024)).max_connections_per_uid,
            256
        );
        assert_eq!(
            Limits::resolve(&cfg, &fds(16_384)).max_connections_per_uid,
            1024
        );
        assert_eq!(
            Limits::resolve(&cfg, &fds(1 << 20)).max_connections_per_uid,
            4096
        );
        cfg.max_connections_per_uid = Some(7);
        assert_eq!(Limits::resolve(&cfg, &fds(1024)).max_connections_per_uid, 7);
    }

    #[tokio::test]
    async fn connections_are_capped_per_uid_and_released_on_close() {
        let shared = Shared::new(limits(), &fds(100_000));
        let a = shared.admit(&cred(1000)).unwrap();
        let _b = shared.admit(&cred(1000)).unwrap();
        assert!(shared.admit(&cred(1000)).is_none(), "one past the cap");
        // Another uid is not affected.
        let _c = shared.admit(&cred(1001)).unwrap();
        drop(a);
        assert!(shared.admit(&cred(1000)).is_some());
    }

    #[tokio::test]
    async fn the_reserve_stops_accepting_before_the_limit() {
        // 20 descriptors open already, 10 kept in reserve, a limit of 36: 6 for connections.
        let limits = Limits {
            max_connections_per_uid: 100,
            ..limits()
        };
        let shared = Shared::with_baseline(limits, &fds(36), 20, None);
        let mut held = Vec::new();
        // A connection without a pidfd holds one descriptor; room needs two more to be free.
        for uid in 0..3 {
            assert!(shared.room_for_a_connection(), "connection {uid}");
            held.push(shared.admit(&cred(uid)).unwrap());
        }
        let with_pidfd = PeerCred {
            pidfd: Some(Arc::new(std::fs::File::open("/dev/null").unwrap().into())),
            ..cred(9)
        };
        held.push(shared.admit(&with_pidfd).unwrap());
        assert!(!shared.room_for_a_connection(), "the reserve is kept");
        held.pop();
        assert!(shared.room_for_a_connection());
    }

    #[tokio::test]
    async fn streams_are_capped_per_uid() {
        let shared = Shared::new(limits(), &fds(100_000));
        for _ in 0..3 {
            shared.open_stream(5).unwrap();
        }
        assert_eq!(shared.open_stream(5), Err(3));
        assert!(shared.open_stream(6).is_ok());
        shared.close_stream(5);
        assert!(shared.open_stream(5).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn silent_and_idle_connections_are_closed() {
        use tokio::io::AsyncReadExt as _;
        let shared = Shared::new(limits(), &fds(100_000));
        // Silent: no request within the handshake timeout.
        let (_client, server) = tokio::io::duplex(64);
        let guard = shared.admit(&cred(1)).unwrap();
        let mut conn = Tracked::new(
            server,
            cred(1),
            guard,
            Duration::from_secs(1),
            Duration::from_secs(5),
        );
        let start = Instant::now();
        let mut buf = [0; 8];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
        drop(conn);
        assert!(shared.connections.lock().unwrap().is_empty());

        // A request came, and a stream stays open past the idle timeout: kept; once it
        // closes, the connection goes after the idle timeout.
        let (_client, server) = tokio::io::duplex(64);
        let guard = shared.admit(&cred(1)).unwrap();
        let mut conn = Tracked::new(
            server,
            cred(1),
            guard,
            Duration::from_secs(1),
            Duration::from_secs(5),
        );
        let state = conn.info.state.clone();
        state.stream_opened();
        let read = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut buf)).await;
        assert!(read.is_err(), "closed with a stream open");
        state.stream_closed();
        let closed_at = Instant::now();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
        assert_eq!(Instant::now() - closed_at, Duration::from_secs(5));
    }
}
