//! [`AuthorityFront`]: the connection wrapper that runs client bytes through the rewriter.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::rewrite::{FrontError, Rewriter};

/// How much client input is read from the connection at a time.
const READ_CHUNK: usize = 16 * 1024;

pin_project! {
    /// Wraps a server-side connection: bytes the client sends pass through a rewriter that
    /// fixes `:authority`; bytes the server sends pass through untouched.
    ///
    /// The client's first header block decides what the server reads (see the crate docs).
    /// When its `:authority` is a plain `host[:port]` or absent, the server reads the client's
    /// bytes unchanged: the first block is checked and re-framed at most, and from then on the
    /// connection is read straight into the server's buffer. Otherwise the server reads the
    /// client's HTTP/2 stream with every header block decoded (HPACK, with the client's dynamic
    /// table) and re-encoded without the dynamic table, and with an `:authority` that is not a
    /// plain `host[:port]` (a percent-encoded or raw socket path) replaced by `localhost`; all
    /// other frames are passed on unchanged as they arrive. Input that does not start with the
    /// HTTP/2 client preface is passed on unchanged, so the server reports its own error for
    /// it.
    ///
    /// A header block that cannot be decoded or is past a limit (see [`FrontError`]) ends the
    /// connection: the client is sent a GOAWAY frame with the error's code
    /// ([`FrontError::reason`]: COMPRESSION_ERROR, ENHANCE_YOUR_CALM or PROTOCOL_ERROR) and
    /// the error as debug data, then the read that met the block returns an
    /// [`io::ErrorKind::InvalidData`] error, and so does every read after it; the server's
    /// writes fail from then on. The GOAWAY goes in between two of the server's frames; when
    /// the server is in the middle of one (its client is not reading), or the connection
    /// cannot take the GOAWAY at once, the connection ends without it.
    ///
    /// ```no_run
    /// # async fn demo(listener: tokio::net::UnixListener) -> std::io::Result<()> {
    /// let (stream, _) = listener.accept().await?;
    /// let stream = spiffed_h2front::AuthorityFront::new(stream);
    /// // hand `stream` to the HTTP/2 server (tonic's `serve_with_incoming`)
    /// # drop(stream);
    /// # Ok(())
    /// # }
    /// ```
    pub struct AuthorityFront<IO> {
        #[pin]
        io: IO,
        rewriter: Rewriter,
        // Rewritten bytes not yet handed to the reader, from `out_pos` on.
        out: Vec<u8>,
        out_pos: usize,
        // Where raw client bytes land before the rewriter sees them.
        scratch: Box<[u8]>,
        eof: bool,
        failed: Option<FrontError>,
        // Where the server's output is in its frames, until nothing can fail any more.
        server: ServerFrames,
        // The GOAWAY frame to send after a failure, and how much of it is sent.
        goaway: Option<(Vec<u8>, usize)>,
    }
}

/// Follows the frame boundaries of the server's output, so that a GOAWAY of ours can go in
/// between two frames.
#[derive(Debug, Default)]
struct ServerFrames {
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    remaining: usize,
}

impl ServerFrames {
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (self.head.len() - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len == self.head.len() {
                let [a, b, c, ..] = self.head;
                self.remaining = (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c);
                self.head_len = 0;
            }
        }
    }

    fn advance_vectored(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        for buf in bufs {
            let k = n.min(buf.len());
            self.advance(&buf[..k]);
            n -= k;
            if n == 0 {
                break;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.remaining == 0
    }
}

/// Longest debug data we put in a GOAWAY (the error's message, cut).
const MAX_GOAWAY_DEBUG: usize = 128;

/// A GOAWAY frame (RFC 9113 §6.8) for `err`, saying the server saw streams up to `last`.
fn goaway_frame(last: u32, err: &FrontError) -> Vec<u8> {
    let message = err.to_string();
    let debug = &message.as_bytes()[..message.len().min(MAX_GOAWAY_DEBUG)];
    let len = 8 + debug.len();
    let [.., l2, l1, l0] = len.to_be_bytes();
    let mut frame = vec![l2, l1, l0, 0x7, 0, 0, 0, 0, 0];
    frame.extend_from_slice(&(last & 0x7fff_ffff).to_be_bytes());
    frame.extend_from_slice(&err.reason().to_be_bytes());
    frame.extend_from_slice(debug);
    frame
}

/// Sends what is left of the GOAWAY, if any, then flushes. Gives up on it (the connection is
/// ending anyway) when the connection fails or cannot take its first byte at once.
fn poll_goaway<IO: AsyncWrite>(
    mut io: Pin<&mut IO>,
    goaway: &mut Option<(Vec<u8>, usize)>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let Some((frame, sent)) = goaway.as_mut() else {
        return Poll::Ready(());
    };
    while *sent < frame.len() {
        match io.as_mut().poll_write(cx, &frame[*sent..]) {
            Poll::Ready(Ok(n)) if n > 0 => *sent += n,
            Poll::Pending if *sent > 0 => return Poll::Pending,
            Poll::Ready(_) | Poll::Pending => {
                *goaway = None;
                return Poll::Ready(());
            }
        }
    }
    if io.as_mut().poll_flush(cx).is_pending() {
        return Poll::Pending;
    }
    *goaway = None;
    Poll::Ready(())
}

/// What the server's writes get once the connection has failed.
fn closed(err: &FrontError) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, err.clone())
}

impl<IO: std::fmt::Debug> std::fmt::Debug for AuthorityFront<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFront")
            .field("io", &self.io)
            .field("rewriter", &self.rewriter)
            .field("buffered", &(self.out.len() - self.out_pos))
            .field("eof", &self.eof)
            .field("failed", &self.failed)
            .finish()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AuthorityFront<IO> {
    /// Wraps a freshly accepted connection, before any byte has been read from it.
    pub fn new(io: IO) -> Self {
        Self::new_pinned(io)
    }
}

impl<IO> AuthorityFront<IO> {
    /// [`AuthorityFront::new`] without the `Unpin` bound, for connections that must be pinned.
    pub fn new_pinned(io: IO) -> Self {
        Self {
            io,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            eof: false,
            failed: None,
            server: ServerFrames::default(),
            goaway: None,
        }
    }

    /// The wrapped connection.
    ///
    /// There is deliberately no `get_mut`: reading from the connection directly would take bytes
    /// out from under the rewriter.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + AsyncWrite> AsyncRead for AuthorityFront<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        loop {
            if *this.out_pos < this.out.len() {
                let pending = &this.out[*this.out_pos..];
                let n = pending.len().min(buf.remaining());
                buf.put_slice(&pending[..n]);
                *this.out_pos += n;
                if *this.out_pos == this.out.len() {
                    this.out.clear();
                    // A large header block grew it; an idle connection need not keep that.
                    this.out.shrink_to(2 * READ_CHUNK);
                    *this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(err) = this.failed.as_ref() {
                ready!(poll_goaway(this.io.as_mut(), this.goaway, cx));
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, err.clone())));
            }
            if *this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.is_passthrough() {
                // Nothing left to rewrite (not HTTP/2, or a client whose first header block
                // needed nothing): read straight into the caller's buffer, ours are not needed.
                if !this.scratch.is_empty() {
                    *this.scratch = Box::default();
                    *this.out = Vec::new();
                }
                return this.io.poll_read(cx, buf);
            }
            let mut raw = ReadBuf::new(&mut this.scratch[..]);
            ready!(this.io.as_mut().poll_read(cx, &mut raw))?;
            let raw = raw.filled();
            if raw.is_empty() {
                *this.eof = true;
                continue;
            }
            if let Err(err) = this.rewriter.feed(raw, this.out) {
                // Whatever was rewritten before the error still goes out first; the server's
                // output stops here, with our GOAWAY if it is between two frames.
                if this.server.at_boundary() {
                    *this.goaway = Some((goaway_frame(this.rewriter.last_stream(), &err), 0));
                }
                *this.failed = Some(err);
            }
        }
    }
}

impl<IO: AsyncWrite> AsyncWrite for AuthorityFront<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        if let Some(err) = this.failed.as_ref() {
            ready!(poll_goaway(this.io.as_mut(), this.goaway, cx));
            return Poll::Ready(Err(closed(err)));
        }
        let n = ready!(this.io.poll_write(cx, buf))?;
        if !this.rewriter.is_passthrough() {
            this.server.advance(&buf[..n]);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        if let Some(err) = this.failed.as_ref() {
            ready!(poll_goaway(this.io.as_mut(), this.goaway, cx));
            return Poll::Ready(Err(closed(err)));
        }
        let n = ready!(this.io.poll_write_vectored(cx, bufs))?;
        if !this.rewriter.is_passthrough() {
            this.server.advance_vectored(bufs, n);
        }
        Poll::Ready(Ok(n))
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

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFront<IO>
{
    /// Whatever the wrapped connection reports (for spiffed, the caller's `PeerCred`).
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};
    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::UnixListenerStream;

    use super::*;
    use crate::rewrite_all;
    use crate::testutil::*;

    /// Writes `input` into one end of a small duplex pipe in pieces of `piece` bytes, and reads
    /// everything the server side of an `AuthorityFront` yields, in reads of `read_size`.
    async fn through_front(
        input: Vec<u8>,
        piece: usize,
        read_size: usize,
    ) -> (Vec<u8>, io::Result<()>) {
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for chunk in input.chunks(piece) {
                if client.write_all(chunk).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            // Dropping `client` ends the server's input.
        });
        let mut front = AuthorityFront::new(server);
        let mut out = Vec::new();
        let mut buf = vec![0; read_size];
        let result = loop {
            match front.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        drop(front);
        writer.await.unwrap();
        (out, result)
    }

    #[tokio::test]
    async fn front_matches_the_synchronous_rewriter_for_any_chunking() {
        let input = hex(GRPC_CORE_RECORDING);
        let want = rewrite_all(&input).unwrap();
        for (piece, read_size) in [(1, 1), (1, 4096), (7, 3), (64, 8192), (4096, 10)] {
            let (out, result) = through_front(input.clone(), piece, read_size).await;
            result.unwrap();
            assert_eq!(out, want, "pieces of {piece}, reads of {read_size}");
        }
        let blocks = decode_output(&want);
        assert!(blocks.iter().all(|b| b.get(":authority") == ["localhost"]));

        // A client with a plain authority gets its bytes through unchanged, however they come.
        let mut input = preface_and_settings();
        for (stream, block) in [(1, GRPC_GO_BLOCK_1), (3, GRPC_GO_BLOCK_2)] {
            input.extend(frame(0x1, 0x4, stream, &hex(block)));
            input.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
        }
        for (piece, read_size) in [(1, 1), (7, 3), (64, 8192), (4096, 10)] {
            let (out, result) = through_front(input.clone(), piece, read_size).await;
            result.unwrap();
            assert_eq!(out, input, "pieces of {piece}, reads of {read_size}");
        }
    }

    #[tokio::test]
    async fn front_reports_bad_hpack_as_invalid_data_after_earlier_output() {
        let mut good = preface_and_settings();
        good.extend(frame(0x8, 0, 0, &[0, 0, 0, 1])); // WINDOW_UPDATE goes out first
        let mut input = good.clone();
        input.extend(frame(0x1, 0x4, 1, &[0xbe])); // index into an empty dynamic table
        input.extend(frame(0x8, 0, 0, &[0, 0, 0, 1])); // never reached
        let (out, result) = through_front(input, 5, 100).await;
        let err = result.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("hpack"), "{err}");
        assert_eq!(out, good);
    }

    #[tokio::test]
    async fn front_passes_non_http2_and_the_server_direction_unchanged() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(50);
        let (out, result) = through_front(input.clone(), 3, 17).await;
        result.unwrap();
        assert_eq!(out, input);

        let (mut client, server) = tokio::io::duplex(1024);
        let mut front = AuthorityFront::new(server);
        front
            .write_all(b"server bytes, not rewritten: %2F")
            .await
            .unwrap();
        front.flush().await.unwrap();
        front.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"server bytes, not rewritten: %2F");
    }

    // --- a real tonic server -------------------------------------------------------------

    /// Starts tonic's health service on a Unix socket, each connection wrapped in an
    /// `AuthorityFront` when `front` is set.
    async fn serve(dir: &Path, front: bool) -> PathBuf {
        let path = dir.join(if front { "front.sock" } else { "plain.sock" });
        let listener = UnixListener::bind(&path).unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let server = tonic::transport::Server::builder().add_service(health);
        let incoming = UnixListenerStream::new(listener);
        if front {
            let incoming = incoming.map(|conn| conn.map(AuthorityFront::new));
            tokio::spawn(server.serve_with_incoming(incoming));
        } else {
            tokio::spawn(server.serve_with_incoming(incoming));
        }
        path
    }

    /// What the server did with one stream.
    #[derive(Debug, Default, Clone, PartialEq)]
    struct Outcome {
        status: Option<String>,
        grpc_status: Option<String>,
        /// RST_STREAM error code.
        reset: Option<u32>,
        ended: bool,
    }

    /// Sends raw client bytes (preface included) and reads the server's frames until every
    /// stream in `streams` has ended (trailers with END_STREAM, or RST_STREAM).
    async fn exchange(path: &Path, bytes: &[u8], streams: &[u32]) -> HashMap<u32, Outcome> {
        let mut conn = UnixStream::connect(path).await.unwrap();
        conn.write_all(bytes).await.unwrap();
        let mut decoder = loona_hpack::Decoder::new();
        let mut outcomes: HashMap<u32, Outcome> = HashMap::new();
        let mut buf = Vec::new();
        let read_all = async {
            loop {
                let (frames, rest) = split_frames(&buf);
                let consumed = buf.len() - rest.len();
                for f in frames {
                    let o = outcomes.entry(f.stream).or_default();
                    match f.kind {
                        0x1 => {
                            assert_ne!(f.flags & 0x4, 0, "test server sends whole blocks");
                            for (n, v) in decoder.decode(&f.payload).unwrap() {
                                let v = String::from_utf8(v).unwrap();
                                match n.as_slice() {
                                    b":status" => o.status = Some(v),
                                    b"grpc-status" => o.grpc_status = Some(v),
                                    _ => {}
                                }
                            }
                            o.ended |= f.flags & 0x1 != 0;
                        }
                        0x3 => {
                            let code = f.payload[..4].try_into().unwrap();
                            o.reset = Some(u32::from_be_bytes(code));
                            o.ended = true;
                        }
                        0x7 => panic!("GOAWAY: {:?}", f.payload),
                        _ => {}
                    }
                }
                buf.drain(..consumed);
                if streams
                    .iter()
                    .all(|s| outcomes.get(s).is_some_and(|o| o.ended))
                {
                    return;
                }
                let mut chunk = [0; 4096];
                let n = conn.read(&mut chunk).await.unwrap();
                assert_ne!(n, 0, "server closed the connection");
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read_all)
            .await
            .unwrap();
        outcomes
    }

    /// A unary `Health/Check` request for the overall status ("" service) on `stream`, with a
    /// raw-literal header block carrying `authority`.
    fn health_check(stream: u32, authority: &str) -> Vec<u8> {
        let block = [
            vec![0x83, 0x86], // :method POST, :scheme http
            literal(":path", "/grpc.health.v1.Health/Check"),
            literal(":authority", authority),
            literal("content-type", "application/grpc"),
            literal("te", "trailers"),
            literal("workload.spiffe.io", "true"),
        ]
        .concat();
        let mut out = frame(0x1, 0x4, stream, &block);
        out.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0])); // empty HealthCheckRequest
        out
    }

    fn connection(requests: &[Vec<u8>]) -> Vec<u8> {
        let mut out = preface_and_settings();
        out.extend(frame(0x4, 0x1, 0, &[])); // ACK the server's SETTINGS up front
        for r in requests {
            out.extend_from_slice(r);
        }
        out
    }

    fn served(o: &Outcome) -> bool {
        o.status.as_deref() == Some("200")
            && o.grpc_status.as_deref() == Some("0")
            && o.reset.is_none()
    }

    /// The grpc-core recording up to and including stream 1's DATA frame: exactly what
    /// py-spiffe's core sends for its first call.
    fn grpc_core_first_call() -> Vec<u8> {
        let recording = hex(GRPC_CORE_RECORDING);
        recording[..391].to_vec()
    }

    fn grpc_java_two_calls() -> Vec<u8> {
        let mut out = connection(&[]);
        for (stream, block) in [(1, GRPC_JAVA_BLOCK_1), (3, GRPC_JAVA_BLOCK_2)] {
            out.extend(frame(0x1, 0x4, stream, &hex(block)));
            out.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
        }
        out
    }

    #[tokio::test]
    async fn tonic_without_the_front_resets_path_authorities() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(dir.path(), false).await;
        // grpc-go style works on a stock server...
        let o = exchange(&path, &connection(&[health_check(1, "localhost")]), &[1]).await;
        assert!(served(&o[&1]), "{o:?}");
        // ...but the other clients' authorities get RST_STREAM PROTOCOL_ERROR (0x1): the bug.
        let o = exchange(&path, &grpc_core_first_call(), &[1]).await;
        assert_eq!(o[&1].reset, Some(0x1), "{o:?}");
        let o = exchange(&path, &grpc_java_two_calls(), &[1, 3]).await;
        assert_eq!(o[&1].reset, Some(0x1), "{o:?}");
        assert_eq!(o[&3].reset, Some(0x1), "{o:?}");
        for authority in ["%2Ftmp%2Fx%2Fapi.sock", "/tmp/x/api.sock"] {
            let o = exchange(&path, &connection(&[health_check(1, authority)]), &[1]).await;
            assert_eq!(o[&1].reset, Some(0x1), "{authority}: {o:?}");
        }
    }

    #[tokio::test]
    async fn tonic_with_the_front_answers_every_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(dir.path(), true).await;
        let o = exchange(&path, &grpc_core_first_call(), &[1]).await;
        assert!(served(&o[&1]), "grpc-core: {o:?}");
        let o = exchange(&path, &grpc_java_two_calls(), &[1, 3]).await;
        assert!(served(&o[&1]) && served(&o[&3]), "grpc-java: {o:?}");
        // All three authorities on one connection, an odd one first: every block is rewritten.
        let requests = [
            health_check(1, "%2Ftmp%2Fx%2Fapi.sock"),
            health_check(3, "localhost"),
            health_check(5, "/tmp/x/api.sock"),
        ];
        let o = exchange(&path, &connection(&requests), &[1, 3, 5]).await;
        for stream in [1, 3, 5] {
            assert!(served(&o[&stream]), "stream {stream}: {o:?}");
        }
        // A plain one first: the connection passes through from then on, so a later odd
        // authority meets h2 as it would without the front (no client mixes them).
        let requests = [
            health_check(1, "localhost"),
            health_check(3, "%2Ftmp%2Fx%2Fapi.sock"),
            health_check(5, "localhost:1"),
        ];
        let o = exchange(&path, &connection(&requests), &[1, 3, 5]).await;
        assert!(served(&o[&1]) && served(&o[&5]), "{o:?}");
        assert_eq!(o[&3].reset, Some(0x1), "{o:?}");
    }

    /// Sends raw client bytes and reads the server's frames until it closes the connection;
    /// returns the GOAWAY it sent, as (last stream id, error code, debug data), if any.
    async fn goaway_after(path: &Path, bytes: &[u8]) -> Option<(u32, u32, String)> {
        let mut conn = UnixStream::connect(path).await.unwrap();
        // The server may close before it has read everything: a failed write is fine.
        let _ = conn.write_all(bytes).await;
        let mut got = Vec::new();
        let read_all = async {
            let mut chunk = [0; 4096];
            loop {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read_all)
            .await
            .expect("the server closes the connection");
        let (frames, _) = split_frames(&got);
        frames.into_iter().find(|f| f.kind == 0x7).map(|f| {
            let last = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
            let code = u32::from_be_bytes(f.payload[4..8].try_into().unwrap());
            let debug = String::from_utf8_lossy(&f.payload[8..]).into_owned();
            (last, code, debug)
        })
    }

    #[tokio::test]
    async fn a_bad_block_on_a_rewritten_connection_ends_it_with_goaway() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(dir.path(), true).await;
        // A socket-path authority makes the connection a rewritten one; stream 1 is served.
        let first = health_check(1, "/tmp/x/api.sock");

        // Not HPACK (index 0 into the tables): COMPRESSION_ERROR, after stream 1.
        let bad = connection(&[first.clone(), frame(0x1, 0x4, 3, &[0x80])]);
        let (last, code, debug) = goaway_after(&path, &bad).await.expect("a GOAWAY frame");
        assert_eq!(code, crate::COMPRESSION_ERROR, "{debug}");
        assert_eq!(last, 1);
        assert!(debug.contains("hpack"), "{debug}");

        // A CONTINUATION flood (empty frames never close the block): ENHANCE_YOUR_CALM long
        // before the flood ends.
        let mut flood = connection(&[first.clone(), frame(0x1, 0, 3, &[0x83])]);
        for _ in 0..100_000 {
            flood.extend(frame(0x9, 0, 3, &[]));
        }
        let (last, code, debug) = goaway_after(&path, &flood).await.expect("a GOAWAY frame");
        assert_eq!(code, crate::ENHANCE_YOUR_CALM, "{debug}");
        assert_eq!(last, 1);
        assert!(debug.contains("continuation"), "{debug}");

        // The same flood on the connection's first block.
        let mut flood = connection(&[frame(0x1, 0, 1, &[0x83])]);
        for _ in 0..100_000 {
            flood.extend(frame(0x9, 0, 1, &[]));
        }
        let (last, code, _) = goaway_after(&path, &flood).await.expect("a GOAWAY frame");
        assert_eq!((last, code), (0, crate::ENHANCE_YOUR_CALM));
    }

    #[tokio::test]
    async fn connect_info_is_the_wrapped_connections() {
        use tonic::transport::server::Connected;
        let (a, _b) = UnixStream::pair().unwrap();
        let want = a.connect_info();
        let front = AuthorityFront::new(a);
        let got = front.connect_info();
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
        assert!(format!("{front:?}").starts_with("AuthorityFront"));
    }
}
