//! What the `:authority` front costs per connection and per later request, for a client that
//! needs no rewriting (grpc-go, tonic: pass-through) and for two that do (grpc C core, as under
//! py-spiffe, and grpc-java).
//!
//! `cargo bench -p spiffed-h2front --bench front`
//!
//! - `connection/*`: a fresh rewriter over the preface, SETTINGS, the first request's HEADERS
//!   and its DATA frame ([`spiffed_h2front::rewrite_all`]).
//! - `later_request/*`: one more request (HEADERS + DATA) through the [`AuthorityFront`] of a
//!   connection that has already carried its first request, polled the way the server polls it.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark"
)]

use std::cell::RefCell;
use std::hint::black_box;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use spiffed_h2front::{AuthorityFront, rewrite_all};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// grpc-go's first `FetchX509SVID` on a connection (`:authority: localhost`): every string
/// Huffman-coded, every new field added to the dynamic table (golang.org/x/net/http2/hpack's
/// strategy; produced with the Python `hpack` encoder, which follows the same one).
const GRPC_GO_FIRST: &str = concat!(
    "838644996375669652f23d9d6838e4875e463095249ff1b03fbb8e4bff4186a0e41d139d095f8b1d75d0620d",
    "263d4c4d65647a8a9acac8b4c7602bba15c14082497f864d833505b11f408df07b3ad071c8ba2b34b295731f",
    "834d9697",
);
/// The same client's later requests: nothing but indexed references.
const GRPC_GO_LATER: &str = "8386c3c2c1c0bfbe";

/// The first call of the grpc C core recording in the crate's tests (grpcio 1.85.3):
/// SETTINGS, WINDOW_UPDATE, SETTINGS ACK, HEADERS with `:authority: tmp%2Fx%2Fapi.sock`
/// (raw strings, incremental indexing), WINDOW_UPDATE, DATA.
const GRPC_CORE_FIRST_CALL: &str = concat!(
    "000024040000000000000200000000000300000000000400400000000500400000000600004000fe0300000001",
    "000004080000000000003f0001",
    "000000040100000000",
    "0001080104000000014005",
    "3a706174681c2f677270632e6865616c74682e76312e4865616c74682f436865636b400a3a617574686f7269",
    "747912746d70253246782532466170692e736f636b8386400c636f6e74656e742d74797065106170706c6963",
    "6174696f6e2f677270634002746508747261696c6572734014677270632d6163636570742d656e636f64696e",
    "67176964656e746974792c206465666c6174652c20677a6970400c677270632d74696d656f7574043939356d",
    "400a757365722d6167656e7430677270632d707974686f6e2f312e38352e3320677270632d632f35382e302e",
    "3020286c696e75783b20636874747032290012776f726b6c6f61642e7370696666652e696f0474727565",
    "00000408000000000100000005",
    "0000050001000000010000000000",
);
/// The recording's second request block, with `grpc-timeout` sent without indexing so that the
/// block can be repeated on one connection (the recorded one adds it to the dynamic table,
/// which shifts every later index): `:authority` is index 67 in the client's dynamic table.
const GRPC_CORE_LATER: &str = concat!(
    "c4c38386c2c1c0000c677270632d74696d656f757405313031306dbe0012776f726b6c6f61642e7370696666",
    "652e696f0474727565",
);

/// grpc-java's first request (`:authority: /tmp/x/api.sock`, Huffman, incremental indexing)
/// and its later ones (indexed references), as in the crate's tests.
const GRPC_JAVA_FIRST: &str = concat!(
    "83864495626b2b22f394742675fb857c651d099d8bd3949d7f418b6134d6c79607599741c9d75f8b1d75d062",
    "0d263d4c4d65644082497f864d833505b11f7a909acac8b741f71ad51529f4c057740b83408e9acac8b0c842",
    "d6958b510f21aa9b839bd9ab408df07b3ad071c8ba2b34b295731f834d9697",
);
const GRPC_JAVA_LATER: &str = "8386c4c3c2c1c0bfbe";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A unary request: HEADERS (END_HEADERS) and a DATA frame with an empty gRPC message.
fn request(stream: u32, block: &[u8]) -> Vec<u8> {
    let mut out = frame(0x1, 0x4, stream, block);
    out.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
    out
}

/// Preface, an empty SETTINGS frame and the first request.
fn first_call(block: &[u8]) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(request(1, block));
    out
}

/// A connection's client side: whatever the bench pushes, then `Pending` (no waker needed,
/// the bench polls again itself).
#[derive(Clone, Default)]
struct Feed(Rc<RefCell<Vec<u8>>>);

impl AsyncRead for Feed {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut pending = self.0.borrow_mut();
        if pending.is_empty() {
            return Poll::Pending;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        pending.drain(..n);
        Poll::Ready(Ok(()))
    }
}

/// The server's output goes nowhere (the front writes only a GOAWAY, on a bad block).
impl AsyncWrite for Feed {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// An `AuthorityFront` that has passed on the first call, and its feed.
struct Warm {
    feed: Feed,
    front: AuthorityFront<Feed>,
    buf: Vec<u8>,
}

impl Warm {
    fn new(first: &[u8]) -> Self {
        let feed = Feed::default();
        let mut warm = Self {
            front: AuthorityFront::new_pinned(feed.clone()),
            feed,
            buf: vec![0; 16 * 1024],
        };
        let out = warm.send(first);
        assert!(out >= first.len() - 64, "first call not passed on: {out}");
        warm
    }

    /// Pushes `bytes` and reads until the front has nothing more; returns how many came out.
    fn send(&mut self, bytes: &[u8]) -> usize {
        self.feed.0.borrow_mut().extend_from_slice(bytes);
        let mut cx = Context::from_waker(Waker::noop());
        let mut total = 0;
        loop {
            let mut read = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut self.front).poll_read(&mut cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                    total += read.filled().len();
                    black_box(read.filled());
                }
                Poll::Pending => return total,
                other => panic!("front stopped: {other:?}"),
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let clients = [
        (
            "grpc_go",
            first_call(&hex(GRPC_GO_FIRST)),
            hex(GRPC_GO_LATER),
        ),
        (
            "grpc_core",
            [PREFACE, &hex(GRPC_CORE_FIRST_CALL)].concat(),
            hex(GRPC_CORE_LATER),
        ),
        (
            "grpc_java",
            first_call(&hex(GRPC_JAVA_FIRST)),
            hex(GRPC_JAVA_LATER),
        ),
    ];
    for (name, first, _) in &clients {
        c.bench_function(&format!("connection/{name}"), |b| {
            b.iter(|| black_box(rewrite_all(black_box(first)).unwrap()));
        });
    }
    for (name, first, later) in &clients {
        let mut warm = Warm::new(first);
        let later = request(3, later);
        c.bench_function(&format!("later_request/{name}"), |b| {
            b.iter(|| black_box(warm.send(black_box(&later))));
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
