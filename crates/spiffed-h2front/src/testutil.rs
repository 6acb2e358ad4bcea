//! Test helpers: recorded client byte streams, frame builders and an independent checker.

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Everything grpc C core (grpcio 1.85.3, grpc-c/58.0.0, the core under py-spiffe) sent on one
/// connection to `unix:///tmp/x/api.sock`, recorded at a Unix socket that only answered with
/// SETTINGS and a SETTINGS ACK: two unary calls to `/grpc.health.v1.Health/Check` with
/// `workload.spiffe.io: true`, each cancelled (RST_STREAM CANCEL) when its deadline passed.
///
/// Frames after the preface: SETTINGS (with grpc's private setting 0xfe03), WINDOW_UPDATE,
/// SETTINGS ACK, HEADERS stream 1 (`:authority: tmp%2Fx%2Fapi.sock`, every field but the
/// security header "literal with incremental indexing"), WINDOW_UPDATE, DATA, WINDOW_UPDATE,
/// RST_STREAM, HEADERS stream 3 (mostly indexed references into the dynamic table, the
/// authority too: index 63), WINDOW_UPDATE, DATA, RST_STREAM.
pub(crate) const GRPC_CORE_RECORDING: &str = concat!(
    "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a",
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
    "00000408000000000000000005",
    "00000403000000000100000008",
    "000035010400000003",
    "c4c38386c2c1c0400c677270632d74696d656f757405313031306dbf0012776f726b6c6f61642e7370696666",
    "652e696f0474727565",
    "00000408000000000300000005",
    "0000050001000000030000000000",
    "00000403000000000300000008",
);

/// Two request header blocks the way grpc-java's Netty HPACK encoder writes them on a Unix
/// socket: `:authority` is the raw socket path, strings are Huffman-coded when that is shorter,
/// new fields are added to the dynamic table, and the second request on the connection is
/// nothing but indexed references. Produced with the Python `hpack` 4.2 encoder (same
/// strategy) from the fields in [`GRPC_JAVA_FIELDS`].
pub(crate) const GRPC_JAVA_BLOCK_1: &str = concat!(
    "83864495626b2b22f394742675fb857c651d099d8bd3949d7f418b6134d6c79607599741c9d75f8b1d75d062",
    "0d263d4c4d65644082497f864d833505b11f7a909acac8b741f71ad51529f4c057740b83408e9acac8b0c842",
    "d6958b510f21aa9b839bd9ab408df07b3ad071c8ba2b34b295731f834d9697",
);
/// The second request's block from the same encoder (see [`GRPC_JAVA_BLOCK_1`]).
pub(crate) const GRPC_JAVA_BLOCK_2: &str = "8386c4c3c2c1c0bfbe";

/// grpc-go's first request header block on a connection (`FetchX509SVID`, `:authority:
/// localhost`): every string Huffman-coded and every new field added to the dynamic table, as
/// golang.org/x/net/http2/hpack does. Produced with the Python `hpack` 4.1 encoder (same
/// strategy) from [`GRPC_GO_FIELDS`].
pub(crate) const GRPC_GO_BLOCK_1: &str = concat!(
    "838644996375669652f23d9d6838e4875e463095249ff1b03fbb8e4bff4186a0e41d139d095f8b1d75d0620d",
    "263d4c4d65647a8a9acac8b4c7602bba15c14082497f864d833505b11f408df07b3ad071c8ba2b34b295731f",
    "834d9697",
);
/// The second request's block from the same encoder: indexed references into the dynamic
/// table that [`GRPC_GO_BLOCK_1`] filled.
pub(crate) const GRPC_GO_BLOCK_2: &str = "8386c3c2c1c0bfbe";

/// What [`GRPC_GO_BLOCK_1`] and [`GRPC_GO_BLOCK_2`] encode.
pub(crate) const GRPC_GO_FIELDS: &[(&str, &str)] = &[
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-go/1.71.0"),
    ("te", "trailers"),
    ("workload.spiffe.io", "true"),
];

/// What [`GRPC_JAVA_BLOCK_1`] and [`GRPC_JAVA_BLOCK_2`] encode.
pub(crate) const GRPC_JAVA_FIELDS: &[(&str, &str)] = &[
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/grpc.health.v1.Health/Check"),
    (":authority", "/tmp/x/api.sock"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("user-agent", "grpc-java-netty/1.70.0"),
    ("grpc-accept-encoding", "gzip"),
    ("workload.spiffe.io", "true"),
];

pub(crate) fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// One frame: 9-byte header and payload.
pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24);
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Preface plus an empty SETTINGS frame.
pub(crate) fn preface_and_settings() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out
}

/// Literal header field without indexing, new name, raw strings (RFC 7541 §6.2.2).
pub(crate) fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x00];
    for s in [name, value] {
        assert!(s.len() < 127);
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    out
}

/// Literal header field with incremental indexing, new name, raw strings (RFC 7541 §6.2.1).
pub(crate) fn literal_indexed(name: &str, value: &str) -> Vec<u8> {
    let mut out = literal(name, value);
    out[0] = 0x40;
    out
}

/// A parsed output frame.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
    pub(crate) payload: Vec<u8>,
}

/// Splits a frame stream (no preface) into frames; a trailing partial frame is returned apart.
pub(crate) fn split_frames(mut bytes: &[u8]) -> (Vec<Frame>, &[u8]) {
    let mut frames = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes.len() < 9 + len {
            break;
        }
        frames.push(Frame {
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
            payload: bytes[9..9 + len].to_vec(),
        });
        bytes = &bytes[9 + len..];
    }
    (frames, bytes)
}

/// A header block as the server will see it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DecodedBlock {
    pub(crate) stream: u32,
    /// The HEADERS frame's flags.
    pub(crate) flags: u8,
    pub(crate) priority: Option<[u8; 5]>,
    pub(crate) fields: Vec<(String, String)>,
}

impl DecodedBlock {
    pub(crate) fn get(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Collects HEADERS (+ CONTINUATION) blocks from rewriter output (after the preface), checking
/// the frame rules on the way, and decodes each with a FRESH decoder whose dynamic table has
/// size 0: that only works if the block uses no dynamic table at all.
pub(crate) fn decode_output(output: &[u8]) -> Vec<DecodedBlock> {
    decode_blocks(output, true)
}

/// [`decode_output`] for output of arbitrary input: a frame passed through may be cut off at
/// the end, and a CONTINUATION frame with no open block (passed through) is skipped.
pub(crate) fn decode_output_lenient(output: &[u8]) -> Vec<DecodedBlock> {
    decode_blocks(output, false)
}

fn decode_blocks(output: &[u8], strict: bool) -> Vec<DecodedBlock> {
    assert!(output.starts_with(PREFACE), "output lost the preface");
    let (frames, rest) = split_frames(&output[PREFACE.len()..]);
    assert!(!strict || rest.is_empty(), "output ends in a partial frame");
    let mut blocks = Vec::new();
    let mut open: Option<(DecodedBlock, Vec<u8>)> = None;
    for f in frames {
        if let Some((block, mut fragment)) = open.take() {
            assert_eq!(f.kind, 0x9, "continuation expected");
            assert_eq!(f.stream, block.stream);
            assert!(f.payload.len() <= 16_384);
            fragment.extend_from_slice(&f.payload);
            if f.flags & 0x4 != 0 {
                blocks.push(finish(block, &fragment));
            } else {
                open = Some((block, fragment));
            }
            continue;
        }
        if f.kind != 0x1 {
            continue;
        }
        assert!(
            f.payload.len() <= 16_384,
            "frame larger than the default max"
        );
        assert_eq!(f.flags & 0x8, 0, "PADDED is dropped");
        let (priority, fragment) = if f.flags & 0x20 != 0 {
            (
                Some(f.payload[..5].try_into().unwrap()),
                f.payload[5..].to_vec(),
            )
        } else {
            (None, f.payload.clone())
        };
        let block = DecodedBlock {
            stream: f.stream,
            flags: f.flags,
            priority,
            fields: Vec::new(),
        };
        if f.flags & 0x4 != 0 {
            blocks.push(finish(block, &fragment));
        } else {
            open = Some((block, fragment));
        }
    }
    assert!(open.is_none(), "header block left open");
    blocks
}

fn finish(mut block: DecodedBlock, fragment: &[u8]) -> DecodedBlock {
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_table_size(0);
    let fields = decoder
        .decode(fragment)
        .unwrap_or_else(|e| panic!("output block does not decode statelessly: {e:?}"));
    block.fields = fields
        .into_iter()
        .map(|(n, v)| {
            (
                String::from_utf8_lossy(&n).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect();
    block
}

/// Where a connection's first complete header block sits in a client byte stream (preface
/// included), and its HPACK bytes.
#[derive(Debug)]
pub(crate) struct FirstBlock {
    /// Offset of its HEADERS frame.
    pub(crate) start: usize,
    /// Offset just after its last frame.
    pub(crate) end: usize,
    pub(crate) fragment: Vec<u8>,
}

/// Finds the first complete header block after the preface the way the rewriter reads the
/// stream: frames before it pass, a CONTINUATION with no block open included. `None` when the
/// stream ends (or breaks off) before one is complete.
pub(crate) fn first_block(bytes: &[u8]) -> Option<FirstBlock> {
    let mut pos = PREFACE.len();
    let mut open: Option<(usize, Vec<u8>)> = None;
    while let Some(head) = bytes.get(pos..pos + 9) {
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let payload = bytes.get(pos + 9..pos + 9 + len)?;
        let start = pos;
        pos += 9 + len;
        let (block_start, mut fragment) = match (kind, open.take()) {
            (0x9, Some((block_start, mut fragment))) => {
                fragment.extend_from_slice(payload);
                (block_start, fragment)
            }
            (0x1, None) => {
                let mut p = payload;
                let mut pad = 0;
                if flags & 0x8 != 0 {
                    pad = usize::from(*p.first()?);
                    p = &p[1..];
                }
                if flags & 0x20 != 0 {
                    p = p.get(5..)?;
                }
                (start, p.get(..p.len().checked_sub(pad)?)?.to_vec())
            }
            (_, Some(_)) => return None,
            _ => continue,
        };
        if flags & 0x4 != 0 {
            return Some(FirstBlock {
                start: block_start,
                end: pos,
                fragment: std::mem::take(&mut fragment),
            });
        }
        open = Some((block_start, fragment));
    }
    None
}

/// Checks what the rewriter promises about `output`, the accepted rewrite of `input` (which
/// starts with the preface), and returns how many header blocks it checked:
///
/// - everything before the first complete header block is unchanged;
/// - pass-through (the first block kept its HPACK bytes): every `:authority` in that block is
///   plain, and every byte after it is unchanged;
/// - rewrite: the first block had an `:authority` that is not plain, and every header block of
///   the output decodes without the dynamic table and has only plain authorities.
pub(crate) fn check_rewrite_invariants(input: &[u8], output: &[u8]) -> usize {
    use crate::rewrite::is_plain_authority;
    let authorities = |fields: &[(Vec<u8>, Vec<u8>)]| -> Vec<Vec<u8>> {
        fields
            .iter()
            .filter(|(n, _)| n == b":authority")
            .map(|(_, v)| v.clone())
            .collect()
    };
    let (first_in, first_out) = match (first_block(input), first_block(output)) {
        (None, None) => {
            assert!(input.starts_with(output), "output before any header block");
            return 0;
        }
        (Some(i), Some(o)) => (i, o),
        (i, o) => panic!("first header block: input {i:?}, output {o:?}"),
    };
    assert_eq!(output[..first_out.start], input[..first_in.start]);
    // An independent decoder, in the state a connection starts in.
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(64 * 1024);
    let first_fields = decoder
        .decode(&first_in.fragment)
        .unwrap_or_else(|e| panic!("accepted first block does not decode: {e:?}"));
    let first_plain = authorities(&first_fields)
        .iter()
        .all(|a| is_plain_authority(a));
    if first_out.fragment == first_in.fragment {
        assert!(first_plain, "first block passed with {first_fields:?}");
        assert_eq!(
            output[first_out.end..],
            input[first_in.end..],
            "bytes after a plain first block changed"
        );
        return 1;
    }
    assert!(
        !first_plain,
        "plain first block re-encoded: {first_fields:?}"
    );
    let blocks = decode_output_lenient(output);
    for block in &blocks {
        for v in block.get(":authority") {
            assert!(is_plain_authority(v.as_bytes()), "{v:?}");
        }
    }
    blocks.len()
}

/// Deterministic pseudo-random numbers (xorshift64*), for the bulk robustness tests.
pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
