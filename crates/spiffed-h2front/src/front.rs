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
    /// A header block that cannot be decoded or is too large (see [`FrontError`]) ends the
    /// connection: the read that meets it returns an [`io::ErrorKind::InvalidData`] error, and
    /// so does every read after it.
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
    }
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

impl<IO: AsyncRead> AsyncRead for AuthorityFront<IO> {
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
                // Whatever was rewritten before the error still goes out first.
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
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
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
