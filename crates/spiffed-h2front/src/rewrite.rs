//! The client-to-server byte rewriter: a push parser over the HTTP/2 frame stream.
//!
//! Bytes go in as they arrive, in pieces of any size; rewritten bytes come out as soon as they
//! can. Only HEADERS frames and their CONTINUATION frames are held back, until the header block
//! is complete (END_HEADERS); every other frame is copied through as it streams past, so no
//! more than one header block (capped at [`MAX_HEADER_BLOCK`]) is ever buffered.
//!
//! The connection's first header block decides what happens to the rest (see the crate docs).
//! If every `:authority` in it is plain, the block goes out with its HPACK bytes as they came
//! and the rewriter steps aside: every later byte passes unchanged, unparsed. Otherwise every
//! header block of the connection, the first included, is decoded and re-encoded.

use std::ops::ControlFlow;

use crate::encode::encode_field;
use crate::hpack::{Decoder, HpackError};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Largest header block (the HPACK bytes, padding and priority fields removed) we accept from a
/// client, summed over a HEADERS frame and its CONTINUATION frames.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// Largest decoded header list we accept, counted as RFC 7541 §4.1 counts table entries (name
/// and value lengths plus 32 per field). It bounds what indexed references to a large dynamic
/// table entry can expand a small block into.
pub const MAX_HEADER_LIST: usize = 256 * 1024;

/// Most Huffman-coded strings we decode in one header block; real requests carry a few dozen.
/// Decoding one sets nothing up (the decoding table is built at compile time), so this bounds
/// the shape of a block (thousands of one-byte strings) rather than its cost.
pub const MAX_HUFFMAN_STRINGS: usize = 256;

/// Most CONTINUATION frames we accept after a HEADERS frame, per header block. A block of
/// [`MAX_HEADER_BLOCK`] bytes needs four full frames; h2 allows the frames its own header list
/// limit needs plus a quarter. Without a count, empty CONTINUATION frames (which add nothing to
/// the block's size) could keep a connection busy forever.
pub const MAX_CONTINUATION_FRAMES: usize = 16;

/// HTTP/2 error code PROTOCOL_ERROR (RFC 9113 §7), sent in the GOAWAY that ends a connection.
pub const PROTOCOL_ERROR: u32 = 0x1;
/// HTTP/2 error code COMPRESSION_ERROR: a header block that is not valid HPACK.
pub const COMPRESSION_ERROR: u32 = 0x9;
/// HTTP/2 error code ENHANCE_YOUR_CALM: a header block past one of the front's limits.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Largest dynamic table a client's encoder may ask for in a size update. The server (h2)
/// advertises 4096 unless configured otherwise; this allows more and still bounds memory.
pub(crate) const MAX_DYNAMIC_TABLE: usize = 64 * 1024;

/// Largest frame payload we emit: the initial SETTINGS_MAX_FRAME_SIZE, always allowed.
const MAX_OUT_FRAME: usize = 16_384;

/// Capacity a connection's block buffers keep after a block that grew them.
const KEEP_CAPACITY: usize = 16 * 1024;

/// What an unacceptable `:authority` becomes (what grpc-go sends on a Unix socket).
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// Why the rewriter stopped; the connection then ends with an [`std::io::ErrorKind::InvalidData`]
/// error on the server's read side.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FrontError {
    /// A header block (one HEADERS frame and its CONTINUATION frames) is larger than
    /// [`MAX_HEADER_BLOCK`].
    #[error("header block on stream {stream} larger than {limit} bytes")]
    HeaderBlockTooLarge {
        /// The stream the block was for.
        stream: u32,
        /// The limit, [`MAX_HEADER_BLOCK`].
        limit: usize,
    },
    /// A header block decodes to a header list larger than [`MAX_HEADER_LIST`].
    #[error("header list on stream {stream} larger than {limit} bytes")]
    HeaderListTooLarge {
        /// The stream the block was for.
        stream: u32,
        /// The limit, [`MAX_HEADER_LIST`].
        limit: usize,
    },
    /// A header block is not valid HPACK, or it changes the dynamic table size beyond the limit
    /// or away from the start of the block.
    #[error("hpack decoding failed on stream {stream}: {source}")]
    Hpack {
        /// The stream the block was for.
        stream: u32,
        /// What is wrong with the block.
        #[source]
        source: HpackError,
    },
    /// A header block holds more than [`MAX_HUFFMAN_STRINGS`] Huffman-coded strings.
    #[error("header block on stream {stream} has more than {limit} huffman-coded strings")]
    TooManyHuffmanStrings {
        /// The stream the block was for.
        stream: u32,
        /// The limit, [`MAX_HUFFMAN_STRINGS`].
        limit: usize,
    },
    /// A HEADERS frame's padding or priority fields do not fit in its payload.
    #[error("malformed headers frame on stream {stream}")]
    MalformedHeaders {
        /// The stream the frame was for.
        stream: u32,
    },
    /// A header block spans more than [`MAX_CONTINUATION_FRAMES`] CONTINUATION frames (a
    /// CONTINUATION flood).
    #[error("header block on stream {stream} spans more than {limit} continuation frames")]
    TooManyContinuations {
        /// The stream the block was for.
        stream: u32,
        /// The limit, [`MAX_CONTINUATION_FRAMES`].
        limit: usize,
    },
    /// A header block was left open (no END_HEADERS) and the next frame is not its
    /// CONTINUATION (RFC 9113 §6.10).
    #[error(
        "expected a continuation frame for stream {stream}, got frame type {frame_type:#x} on stream {got_stream}"
    )]
    ExpectedContinuation {
        /// The stream whose header block is open.
        stream: u32,
        /// The type of the frame that came instead.
        frame_type: u8,
        /// The stream of the frame that came instead.
        got_stream: u32,
    },
}

impl FrontError {
    /// The HTTP/2 error code of the GOAWAY frame that ends the connection for this error:
    /// [`COMPRESSION_ERROR`] for a block that is not valid HPACK (RFC 9113 §4.3),
    /// [`ENHANCE_YOUR_CALM`] for a block past one of the limits, [`PROTOCOL_ERROR`] for
    /// frames out of place.
    pub fn reason(&self) -> u32 {
        match self {
            Self::Hpack { .. } => COMPRESSION_ERROR,
            Self::HeaderBlockTooLarge { .. }
            | Self::HeaderListTooLarge { .. }
            | Self::TooManyHuffmanStrings { .. }
            | Self::TooManyContinuations { .. } => ENHANCE_YOUR_CALM,
            Self::MalformedHeaders { .. } | Self::ExpectedContinuation { .. } => PROTOCOL_ERROR,
        }
    }
}

/// A frame's 9-byte header, parsed.
#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(raw: &[u8; FRAME_HEADER_LEN]) -> Self {
        let len = (usize::from(raw[0]) << 16) | (usize::from(raw[1]) << 8) | usize::from(raw[2]);
        let stream = u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) & 0x7fff_ffff;
        Self {
            len,
            kind: raw[3],
            flags: raw[4],
            stream,
        }
    }
}

/// A header block being collected, HEADERS first, then CONTINUATION frames; its HPACK bytes
/// are in [`Rewriter::fragment`].
#[derive(Debug)]
struct Block {
    stream: u32,
    /// END_STREAM and PRIORITY from the HEADERS frame; PADDED and END_HEADERS are ours to set.
    flags: u8,
    priority: Option<[u8; 5]>,
    /// CONTINUATION frames received for this block so far.
    continuations: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Matching the client preface; `matched` bytes of it have been seen (and passed on).
    Preface { matched: usize },
    /// Parsing frames.
    Frames,
    /// Nothing left to rewrite: every byte passes unchanged. Either the input is not HTTP/2
    /// with prior knowledge (h2 reports the error), or the first header block showed a client
    /// whose `:authority` needs no rewriting.
    Passthrough,
}

/// The client-to-server rewriter of one connection.
pub(crate) struct Rewriter {
    phase: Phase,
    /// A frame header being read.
    head: [u8; FRAME_HEADER_LEN],
    head_len: usize,
    /// A HEADERS or CONTINUATION frame whose payload is being read into `payload`.
    collecting: Option<FrameHead>,
    payload: Vec<u8>,
    /// Payload bytes of a frame that is being copied through.
    pass_remaining: usize,
    /// The header block that is open (no END_HEADERS seen yet).
    block: Option<Block>,
    /// The open block's HPACK bytes so far (padding and priority removed).
    fragment: Vec<u8>,
    /// False until the first header block turns out to need its `:authority` replaced; from
    /// then on every block is decoded and re-encoded.
    rewriting: bool,
    /// Follows the client's encoder: one per connection, dynamic table and all.
    decoder: Decoder,
    /// A re-encoded block, reused from block to block.
    encoded: Vec<u8>,
    /// The highest stream id of a header block passed on to the server (0 before the first).
    last_stream: u32,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("phase", &self.phase)
            .field("rewriting", &self.rewriting)
            .field("block", &self.block.as_ref().map(|b| b.stream))
            .finish_non_exhaustive()
    }
}

/// A decoder in the state a connection starts in, with the front's limits.
fn new_decoder() -> Decoder {
    Decoder::new(MAX_DYNAMIC_TABLE, MAX_HUFFMAN_STRINGS)
}

impl Rewriter {
    pub(crate) fn new() -> Self {
        Self {
            phase: Phase::Preface { matched: 0 },
            head: [0; FRAME_HEADER_LEN],
            head_len: 0,
            collecting: None,
            payload: Vec::new(),
            pass_remaining: 0,
            block: None,
            fragment: Vec::new(),
            rewriting: false,
            decoder: new_decoder(),
            encoded: Vec::new(),
            last_stream: 0,
        }
    }

    /// The highest stream id of a header block passed on to the server, the last stream a
    /// GOAWAY may say the server has seen (0 before the first block).
    pub(crate) fn last_stream(&self) -> u32 {
        self.last_stream
    }

    /// True once nothing is left to rewrite (the input is not HTTP/2, or the first header block
    /// needed no rewriting): every later byte passes unchanged.
    pub(crate) fn is_passthrough(&self) -> bool {
        self.phase == Phase::Passthrough
    }

    /// Takes the next piece of client input and appends whatever can be emitted to `out`.
    ///
    /// After an error the connection is broken: the caller must not feed more.
    pub(crate) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), FrontError> {
        while !input.is_empty() {
            match self.phase {
                Phase::Passthrough => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                Phase::Preface { matched } => {
                    let want = &PREFACE[matched..];
                    let n = want.len().min(input.len());
                    if input[..n] != want[..n] {
                        // The matched part went out already, unchanged; so does the rest.
                        self.phase = Phase::Passthrough;
                        continue;
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.phase = if matched + n == PREFACE.len() {
                        Phase::Frames
                    } else {
                        Phase::Preface {
                            matched: matched + n,
                        }
                    };
                }
                Phase::Frames => input = self.feed_frames(input, out)?,
            }
        }
        Ok(())
    }

    /// Consumes a prefix of `input` (at least one byte when it is not empty); returns the rest.
    fn feed_frames<'a>(
        &mut self,
        input: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<&'a [u8], FrontError> {
        if self.pass_remaining > 0 {
            let n = self.pass_remaining.min(input.len());
            out.extend_from_slice(&input[..n]);
            self.pass_remaining -= n;
            return Ok(&input[n..]);
        }
        if let Some(head) = self.collecting {
            let n = (head.len - self.payload.len()).min(input.len());
            self.payload.extend_from_slice(&input[..n]);
            if self.payload.len() == head.len {
                self.collecting = None;
                self.on_header_frame(head, out)?;
            }
            return Ok(&input[n..]);
        }
        let n = (FRAME_HEADER_LEN - self.head_len).min(input.len());
        self.head[self.head_len..self.head_len + n].copy_from_slice(&input[..n]);
        self.head_len += n;
        if self.head_len == FRAME_HEADER_LEN {
            self.head_len = 0;
            self.on_frame_head(out)?;
        }
        Ok(&input[n..])
    }

    /// A whole frame header is in `self.head`.
    fn on_frame_head(&mut self, out: &mut Vec<u8>) -> Result<(), FrontError> {
        let head = FrameHead::parse(&self.head);
        if let Some(block) = &self.block
            && (head.kind != TYPE_CONTINUATION || head.stream != block.stream)
        {
            return Err(FrontError::ExpectedContinuation {
                stream: block.stream,
                frame_type: head.kind,
                got_stream: head.stream,
            });
        }
        if let Some(block) = &mut self.block {
            block.continuations += 1;
            if block.continuations > MAX_CONTINUATION_FRAMES {
                return Err(FrontError::TooManyContinuations {
                    stream: block.stream,
                    limit: MAX_CONTINUATION_FRAMES,
                });
            }
        }
        // A CONTINUATION with no open block is a protocol error h2 reports itself: pass it.
        let collect = head.kind == TYPE_HEADERS || self.block.is_some();
        if !collect {
            out.extend_from_slice(&self.head);
            self.pass_remaining = head.len;
            return Ok(());
        }
        // Padding (1 + up to 255 bytes) and priority (5) come on top of the block itself.
        let collected = if self.block.is_some() {
            self.fragment.len()
        } else {
            0
        };
        if collected + head.len > MAX_HEADER_BLOCK + 256 + 5 {
            return Err(FrontError::HeaderBlockTooLarge {
                stream: head.stream,
                limit: MAX_HEADER_BLOCK,
            });
        }
        self.payload.clear();
        if head.len == 0 {
            self.on_header_frame(head, out)
        } else {
            self.collecting = Some(head);
            Ok(())
        }
    }

    /// A whole HEADERS or CONTINUATION frame payload is in `self.payload`.
    fn on_header_frame(&mut self, head: FrameHead, out: &mut Vec<u8>) -> Result<(), FrontError> {
        let malformed = FrontError::MalformedHeaders {
            stream: head.stream,
        };
        let payload = self.payload.as_slice();
        let stream = match self.block.as_ref().map(|b| b.stream) {
            Some(stream) => {
                // CONTINUATION frames carry no padding or priority (RFC 9113 §6.10).
                self.fragment.extend_from_slice(payload);
                stream
            }
            None => {
                let mut rest = payload;
                let mut pad = 0;
                if head.flags & FLAG_PADDED != 0 {
                    let (&len, after) = rest.split_first().ok_or(malformed.clone())?;
                    pad = usize::from(len);
                    rest = after;
                }
                let mut priority = None;
                if head.flags & FLAG_PRIORITY != 0 {
                    let (fields, after) = rest.split_first_chunk::<5>().ok_or(malformed.clone())?;
                    priority = Some(*fields);
                    rest = after;
                }
                let fragment_len = rest.len().checked_sub(pad).ok_or(malformed)?;
                self.fragment.clear();
                self.fragment.extend_from_slice(&rest[..fragment_len]);
                self.block = Some(Block {
                    stream: head.stream,
                    flags: head.flags & (FLAG_END_STREAM | FLAG_PRIORITY),
                    priority,
                    continuations: 0,
                });
                head.stream
            }
        };
        if self.fragment.len() > MAX_HEADER_BLOCK {
            return Err(FrontError::HeaderBlockTooLarge {
                stream,
                limit: MAX_HEADER_BLOCK,
            });
        }
        if head.flags & FLAG_END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.finish(&block, out)?;
        }
        Ok(())
    }

    /// A complete header block is in `self.fragment`: emits it, decided by the first block's
    /// `:authority` either as it came or re-encoded with `:authority` fixed.
    fn finish(&mut self, block: &Block, out: &mut Vec<u8>) -> Result<(), FrontError> {
        if !self.rewriting {
            // The connection's first block: decoded for the limits and for its `:authority`.
            if decode_block(
                &mut self.decoder,
                &self.fragment,
                block.stream,
                Fields::Check,
            )? {
                // The server's decoder sees the client's encoder stream from the start and so
                // stays in step with it without us; nothing more to parse.
                emit_block(block, &self.fragment, out);
                self.last_stream = self.last_stream.max(block.stream);
                self.phase = Phase::Passthrough;
                self.payload = Vec::new();
                self.fragment = Vec::new();
                self.decoder = new_decoder();
                return Ok(());
            }
            // Decoded again from the state every connection starts in (the check stopped at
            // the odd `:authority`), re-encoding this time.
            self.rewriting = true;
            self.decoder = new_decoder();
        }
        self.encoded.clear();
        decode_block(
            &mut self.decoder,
            &self.fragment,
            block.stream,
            Fields::Encode(&mut self.encoded),
        )?;
        emit_block(block, &self.encoded, out);
        self.last_stream = self.last_stream.max(block.stream);
        for buf in [&mut self.payload, &mut self.fragment, &mut self.encoded] {
            if buf.capacity() > KEEP_CAPACITY {
                buf.clear();
                buf.shrink_to(KEEP_CAPACITY);
            }
        }
        self.decoder.shrink_buffers(KEEP_CAPACITY);
        Ok(())
    }
}

/// What [`decode_block`] does with the fields it decodes.
enum Fields<'a> {
    /// Looks at `:authority` only, and stops at the first that is not plain.
    Check,
    /// Re-encodes them into the buffer, every `:authority` that is not plain replaced.
    Encode(&'a mut Vec<u8>),
}

/// Decodes one complete header block with the connection's decoder, within the limits, and
/// does `fields` with its fields. Returns whether every `:authority` in the block was plain
/// (true when it has none).
fn decode_block(
    decoder: &mut Decoder,
    fragment: &[u8],
    stream: u32,
    mut fields: Fields<'_>,
) -> Result<bool, FrontError> {
    let mut list_size = 0usize;
    let mut too_large = false;
    let mut plain = true;
    decoder
        .decode(fragment, |name, value| {
            list_size += name.len() + value.len() + 32;
            if list_size > MAX_HEADER_LIST {
                too_large = true;
                return ControlFlow::Break(());
            }
            let value = if name == b":authority" && !is_plain_authority(value) {
                plain = false;
                REPLACEMENT_AUTHORITY
            } else {
                value
            };
            match &mut fields {
                Fields::Check if !plain => return ControlFlow::Break(()),
                Fields::Check => {}
                Fields::Encode(encoded) => encode_field(encoded, name, value),
            }
            ControlFlow::Continue(())
        })
        .map_err(|source| match source {
            HpackError::TooManyHuffmanStrings { limit } => {
                FrontError::TooManyHuffmanStrings { stream, limit }
            }
            source => FrontError::Hpack { stream, source },
        })?;
    if too_large {
        return Err(FrontError::HeaderListTooLarge {
            stream,
            limit: MAX_HEADER_LIST,
        });
    }
    Ok(plain)
}

/// Writes a header block as a HEADERS frame and as many CONTINUATION frames as needed.
fn emit_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let priority: &[u8] = block.priority.as_ref().map_or(&[], |p| p.as_slice());
    let first_len = encoded.len().min(MAX_OUT_FRAME - priority.len());
    let (first, mut rest) = encoded.split_at(first_len);
    let end = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
    write_frame_head(
        out,
        priority.len() + first.len(),
        TYPE_HEADERS,
        block.flags | end,
        block.stream,
    );
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_OUT_FRAME));
        let end = if after.is_empty() {
            FLAG_END_HEADERS
        } else {
            0
        };
        write_frame_head(out, chunk.len(), TYPE_CONTINUATION, end, block.stream);
        out.extend_from_slice(chunk);
        rest = after;
    }
}

/// `len` is at most [`MAX_OUT_FRAME`], so it fits the 24-bit length field.
fn write_frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = len.to_be_bytes();
    let [.., l2, l1, l0] = len;
    out.extend_from_slice(&[l2, l1, l0, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// True when `value` is a plain `host[:port]` that h2's authority parser accepts: a non-empty
/// reg-name of `A-Z a-z 0-9 - . _ ~` or a bracketed IPv6 literal, then optionally `:` and a
/// decimal port up to 65535. Everything else (socket paths, percent-encoding, userinfo, empty)
/// is replaced.
pub(crate) fn is_plain_authority(value: &[u8]) -> bool {
    let (host_ok, rest) = if let Some(after) = value.strip_prefix(b"[") {
        match after.iter().position(|&b| b == b']') {
            Some(end) => {
                let inner = &after[..end];
                let ok = !inner.is_empty()
                    && inner
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
                (ok, &after[end + 1..])
            }
            None => (false, &[][..]),
        }
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        let host = &value[..end];
        let ok = !host.is_empty()
            && host
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
        (ok, &value[end..])
    };
    let port_ok = match rest.strip_prefix(b":") {
        None => rest.is_empty(),
        Some(port) => {
            (1..=5).contains(&port.len())
                && port.iter().all(u8::is_ascii_digit)
                && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))
                    <= u32::from(u16::MAX)
        }
    };
    host_ok && port_ok
}

/// Runs a whole client byte stream (starting with the preface) through a fresh rewriter, as
/// [`AuthorityFront`](crate::AuthorityFront) does piece by piece; the synchronous entry point
/// for fuzzing and tests.
///
/// When every `:authority` in the first header block is plain (or it has none), that block
/// keeps its HPACK bytes (re-framed: without padding, in frames of at most 16 KiB) and
/// everything after it comes back unchanged. Otherwise every complete header block in the
/// output is encoded without the dynamic table and carries no `:authority` that h2 rejects.
/// Input that does not start with the preface comes back unchanged.
pub fn rewrite_all(input: &[u8]) -> Result<Vec<u8>, FrontError> {
    let mut rewriter = Rewriter::new();
    let mut out = Vec::with_capacity(input.len());
    rewriter.feed(input, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::PREFACE;
    use crate::testutil::*;

    const SECURITY: (&str, &str) = ("workload.spiffe.io", "true");

    /// Decodes the header blocks of an INPUT stream the way h2 would (one decoder for the
    /// connection), to compare with what the rewriter emits.
    fn decode_input(input: &[u8]) -> Vec<Vec<(String, String)>> {
        let (frames, rest) = split_frames(&input[PREFACE.len()..]);
        assert!(rest.is_empty());
        let mut decoder = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut fragment = Vec::new();
        for f in frames {
            match f.kind {
                0x1 => {
                    let mut p = f.payload.as_slice();
                    let mut pad = 0;
                    if f.flags & 0x8 != 0 {
                        pad = usize::from(p[0]);
                        p = &p[1..];
                    }
                    if f.flags & 0x20 != 0 {
                        p = &p[5..];
                    }
                    fragment = p[..p.len() - pad].to_vec();
                }
                0x9 => fragment.extend_from_slice(&f.payload),
                _ => continue,
            }
            if f.flags & 0x4 != 0 {
                let fields = decoder.decode(&fragment).unwrap();
                blocks.push(
                    fields
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect(),
                );
            }
        }
        blocks
    }

    /// The output's fields equal the input's, except `:authority`, which is `want_authority`.
    fn assert_same_but_authority(input: &[u8], output: &[u8], want_authority: &str) {
        let before = decode_input(input);
        let after = decode_output(output);
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            let expected: Vec<(String, String)> = b
                .iter()
                .map(|(n, v)| {
                    if n == ":authority" {
                        (n.clone(), want_authority.to_owned())
                    } else {
                        (n.clone(), v.clone())
                    }
                })
                .collect();
            assert_eq!(a.fields, expected);
        }
    }

    fn non_header_frames(stream: &[u8]) -> Vec<Frame> {
        let (frames, _) = split_frames(&stream[PREFACE.len()..]);
        frames
            .into_iter()
            .filter(|f| f.kind != 0x1 && f.kind != 0x9)
            .collect()
    }

    fn request(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
        let mut input = preface_and_settings();
        input.extend(frame(0x1, flags, stream, block));
        input
    }

    /// Feeds `input` in pieces (sizes from `pieces`, cycled) and returns the output.
    fn feed_in_pieces(input: &[u8], pieces: &[usize]) -> Result<Vec<u8>, FrontError> {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        let mut rest = input;
        for &n in pieces.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, after) = rest.split_at(n.min(rest.len()));
            rewriter.feed(piece, &mut out)?;
            rest = after;
        }
        Ok(out)
    }

    #[test]
    fn grpc_core_recording_gets_localhost_in_both_requests() {
        let input = hex(GRPC_CORE_RECORDING);
        let output = rewrite_all(&input).unwrap();
        let blocks = decode_output(&output);
        assert_eq!(blocks.len(), 2);
        for (block, stream) in blocks.iter().zip([1, 3]) {
            assert_eq!(block.stream, stream);
            assert_eq!(block.flags, 0x4);
            assert_eq!(block.get(":authority"), ["localhost"]);
            assert_eq!(block.get(":path"), ["/grpc.health.v1.Health/Check"]);
            assert_eq!(block.get(":method"), ["POST"]);
            assert_eq!(block.get("content-type"), ["application/grpc"]);
            assert_eq!(block.get("te"), ["trailers"]);
            assert_eq!(block.get(SECURITY.0), [SECURITY.1]);
        }
        // The second request is mostly references into the client's dynamic table.
        assert_eq!(blocks[1].get("grpc-timeout"), ["1010m"]);
        assert_same_but_authority(&input, &output, "localhost");
        // Every other frame (grpc's private SETTINGS id, WINDOW_UPDATE, DATA, RST_STREAM)
        // comes through byte for byte, in order.
        assert_eq!(non_header_frames(&input), non_header_frames(&output));
        assert_eq!(non_header_frames(&input).len(), 10);
    }

    #[test]
    fn grpc_java_raw_path_with_huffman_and_indexing() {
        let mut input = preface_and_settings();
        input.extend(frame(0x1, 0x4, 1, &hex(GRPC_JAVA_BLOCK_1)));
        input.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
        input.extend(frame(0x1, 0x4, 3, &hex(GRPC_JAVA_BLOCK_2)));
        let output = rewrite_all(&input).unwrap();
        let blocks = decode_output(&output);
        assert_eq!(blocks.len(), 2);
        for block in &blocks {
            let want: Vec<(String, String)> = GRPC_JAVA_FIELDS
                .iter()
                .map(|&(n, v)| {
                    let v = if n == ":authority" { "localhost" } else { v };
                    (n.to_owned(), v.to_owned())
                })
                .collect();
            assert_eq!(block.fields, want);
        }
        assert_same_but_authority(&input, &output, "localhost");
    }

    #[test]
    fn plain_authorities_pass_through_unchanged() {
        for authority in [
            "localhost",
            "localhost:50051",
            "spire-agent.example_1~x",
            "[::1]:443",
        ] {
            let block = [
                vec![0x83, 0x86],
                literal_indexed(":path", "/SpiffeWorkloadAPI/FetchJWTBundles"),
                literal_indexed(":authority", authority),
                literal_indexed("content-type", "application/grpc"),
                literal(SECURITY.0, SECURITY.1),
            ]
            .concat();
            let mut input = request(1, 0x5, &block);
            // A second request made of references into the dynamic table the first one filled.
            input.extend(frame(0x1, 0x5, 3, &[0x83, 0x86, 0xc0, 0xbf, 0xbe]));
            let output = rewrite_all(&input).unwrap();
            // Not re-encoded: the server's decoder follows the client's own encoder.
            assert_eq!(output, input, "{authority}");
            let blocks = decode_input(&output);
            assert_eq!(blocks[0].len(), 6);
            assert_eq!(blocks[1][2..5], blocks[0][2..5]);
            assert!(blocks[1].contains(&(":authority".to_owned(), authority.to_owned())));
        }
    }

    /// grpc-go's connection: two requests, the second made of references into the dynamic
    /// table the first filled, with the other frames a unary call brings.
    fn grpc_go_two_calls() -> Vec<u8> {
        let mut input = preface_and_settings();
        input.extend(frame(0x8, 0, 0, &[0, 0x0e, 0, 0x01]));
        input.extend(frame(0x1, 0x4, 1, &hex(GRPC_GO_BLOCK_1)));
        input.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
        input.extend(frame(0x4, 0x1, 0, &[]));
        input.extend(frame(0x1, 0x4, 3, &hex(GRPC_GO_BLOCK_2)));
        input.extend(frame(0x0, 0x1, 3, &[0, 0, 0, 0, 0]));
        input
    }

    #[test]
    fn a_plain_first_block_passes_the_connection_through_byte_for_byte() {
        let input = grpc_go_two_calls();
        let output = rewrite_all(&input).unwrap();
        assert_eq!(output, input);
        let want: Vec<(String, String)> = GRPC_GO_FIELDS
            .iter()
            .map(|&(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(decode_input(&output), [want.clone(), want]);

        // Nothing after the first block is parsed any more: the rewriter steps aside as soon as
        // that block is complete, whatever follows.
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        let first_end = first_block(&input).unwrap().end;
        rewriter.feed(&input[..first_end - 1], &mut out).unwrap();
        assert!(!rewriter.is_passthrough());
        rewriter
            .feed(&input[first_end - 1..first_end], &mut out)
            .unwrap();
        assert!(rewriter.is_passthrough());
        let later = [
            frame(0x1, 0x4, 5, &literal(":authority", "/tmp/api.sock")),
            frame(0x1, 0x4, 7, &[0x80]), // not HPACK: the server reports it
            frame(0x9, 0x4, 7, &[0xff; 40]),
        ]
        .concat();
        rewriter.feed(&input[first_end..], &mut out).unwrap();
        rewriter.feed(&later, &mut out).unwrap();
        assert_eq!(out, [&input[..], &later].concat());
    }

    #[test]
    fn a_plain_first_block_is_only_re_framed() {
        // Padded, with priority, split over CONTINUATION frames: the HPACK bytes go out as they
        // came in one HEADERS frame, and every later byte as it came.
        let block = hex(GRPC_GO_BLOCK_1);
        let mut input = preface_and_settings();
        let mut payload = vec![3]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 0, 15]); // depends on 0, weight 16
        payload.extend_from_slice(&block[..30]);
        payload.extend_from_slice(&[0; 3]);
        input.extend(frame(0x1, 0x8 | 0x20 | 0x1 | 0x40, 1, &payload));
        input.extend(frame(0x9, 0x4, 1, &block[30..]));
        let rest_start = input.len();
        input.extend(frame(0x1, 0x8 | 0x4, 3, &[2, 0x83, 0x86, 0xc3, 0, 0]));
        input.extend(frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]));
        let output = rewrite_all(&input).unwrap();
        let want_first = frame(
            0x1,
            0x20 | 0x4 | 0x1,
            1,
            &[&[0, 0, 0, 0, 15][..], &block].concat(),
        );
        assert_eq!(
            output[PREFACE.len() + 9..],
            [&want_first[..], &input[rest_start..]].concat()
        );
    }

    #[test]
    fn a_rewritten_first_block_keeps_every_later_block_rewritten() {
        let b1 = [
            vec![0x83, 0x86],
            literal_indexed(":authority", "/tmp/api.sock"), // 63 after b1
            literal_indexed(":path", "/SpiffeWorkloadAPI/FetchX509SVID"), // 62 after b1
        ]
        .concat();
        // References to the odd authority the first block put in the dynamic table.
        let b2 = vec![0x83, 0x86, 0xbe, 0xbf];
        // A plain authority later on is kept; a new odd one replaced.
        let b3 = [
            vec![0x83, 0x86, 0xbe],
            literal_indexed(":authority", "localhost:7"),
        ]
        .concat();
        let b4 = [
            vec![0x3f, 0xe1, 0x0f], // size update to 2048, at the start
            vec![0x83, 0x86, 0xbf, 0xbe],
            literal(":authority", "%2Ftmp%2Fapi.sock"),
        ]
        .concat();
        let mut input = preface_and_settings();
        for (stream, block) in [(1, &b1), (3, &b2), (5, &b3), (7, &b4)] {
            input.extend(frame(0x1, 0x4, stream, block));
            input.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
        }
        let output = rewrite_all(&input).unwrap();
        let blocks = decode_output(&output);
        let authorities: Vec<Vec<&str>> = blocks.iter().map(|b| b.get(":authority")).collect();
        assert_eq!(
            authorities,
            [
                vec!["localhost"],
                vec!["localhost"],
                vec!["localhost:7"],
                vec!["localhost:7", "localhost"],
            ]
        );
        for block in &blocks {
            assert_eq!(block.get(":path"), ["/SpiffeWorkloadAPI/FetchX509SVID"]);
        }
        assert_eq!(non_header_frames(&input), non_header_frames(&output));
        assert_eq!(check_rewrite_invariants(&input, &output), 4);
        for pieces in [&[1][..], &[2, 3, 5, 7, 11]] {
            assert_eq!(
                feed_in_pieces(&input, pieces).unwrap(),
                output,
                "{pieces:?}"
            );
        }
    }

    #[test]
    fn limits_hold_on_the_first_block_of_a_plain_client() {
        let plain = literal(":authority", "localhost");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            ([&plain[..], &[0x00, 0x81, 0x1e, 0x00]].concat(), "hpack"),
            ([&plain[..], &[0x83, 0x20]].concat(), "hpack"),
            (
                [&plain[..], &[0x00, 0x81, 0x1f, 0x81, 0x1f].repeat(129)].concat(),
                "huffman",
            ),
            (
                [
                    &plain[..],
                    &[0x40, 1, b'x', 0x7f, 0x81, 0x1e],
                    &[b'b'; 3968],
                    &[0xbe; 100],
                ]
                .concat(),
                "header list",
            ),
        ];
        for (block, what) in cases {
            let err = rewrite_all(&request(1, 0x4, &block)).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn odd_authorities_are_replaced() {
        for authority in [
            "%2Ftmp%2Fapi.sock",
            "tmp%2Fx%2Fapi.sock",
            "/tmp/api.sock",
            "",
            "user@host",
            "host:",
            "host:99999",
            "host:80:80",
            "[::1",
            "[]",
            "a b",
            "unix:/tmp/api.sock",
        ] {
            assert!(!is_plain_authority(authority.as_bytes()), "{authority:?}");
            let block = [
                vec![0x83, 0x86, 0x84],
                literal_indexed(":authority", authority),
            ]
            .concat();
            let output = rewrite_all(&request(1, 0x4, &block)).unwrap();
            assert_eq!(decode_output(&output)[0].get(":authority"), ["localhost"]);
        }
        // A header block without `:authority` gets none added: it passes as it came.
        let input = request(1, 0x4, &[0x83, 0x86, 0x84]);
        assert_eq!(rewrite_all(&input).unwrap(), input);
    }

    /// HEADERS with PADDED and PRIORITY, the block split over two CONTINUATION frames.
    fn split_padded_input() -> Vec<u8> {
        let block = hex(GRPC_JAVA_BLOCK_1);
        let mut input = preface_and_settings();
        let mut payload = vec![7]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 0x0b, 200]); // exclusive, depends on 11, weight
        payload.extend_from_slice(&block[..20]);
        payload.extend_from_slice(&[0; 7]);
        input.extend(frame(0x1, 0x8 | 0x20 | 0x1, 5, &payload));
        input.extend(frame(0x9, 0, 5, &block[20..50]));
        input.extend(frame(0x9, 0x4, 5, &block[50..]));
        input.extend(frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8])); // PING
        input
    }

    #[test]
    fn continuation_padding_and_priority() {
        let input = split_padded_input();
        let output = rewrite_all(&input).unwrap();
        let (frames, _) = split_frames(&output[PREFACE.len()..]);
        let kinds: Vec<u8> = frames.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [0x4, 0x1, 0x6],
            "one HEADERS frame, no CONTINUATION left"
        );
        let blocks = decode_output(&output);
        assert_eq!(blocks[0].stream, 5);
        assert_eq!(
            blocks[0].flags,
            0x20 | 0x4 | 0x1,
            "PADDED dropped, END_HEADERS set"
        );
        assert_eq!(blocks[0].priority, Some([0x80, 0, 0, 0x0b, 200]));
        assert_eq!(blocks[0].get(":authority"), ["localhost"]);
        assert_same_but_authority(&input, &output, "localhost");
    }

    #[test]
    fn large_blocks_are_split_at_16k() {
        let big = "v".repeat(40_000);
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"/tmp/api.sock"),
            (b"x-big", big.as_bytes()),
        ]);
        // The client split its 40 KB block in three frames too.
        let mut input = preface_and_settings();
        input.extend(frame(0x1, 0x1, 1, &block[..16_000]));
        input.extend(frame(0x9, 0, 1, &block[16_000..32_000]));
        input.extend(frame(0x9, 0x4, 1, &block[32_000..]));
        let output = rewrite_all(&input).unwrap();
        let (frames, _) = split_frames(&output[PREFACE.len()..]);
        assert_eq!(frames.len(), 4, "SETTINGS, HEADERS and two CONTINUATION");
        assert_eq!((frames[1].kind, frames[1].flags), (0x1, 0x1));
        assert_eq!(frames[1].payload.len(), 16_384);
        assert_eq!((frames[2].kind, frames[2].flags), (0x9, 0));
        assert_eq!((frames[3].kind, frames[3].flags), (0x9, 0x4));
        let blocks = decode_output(&output);
        assert_eq!(blocks[0].get("x-big"), [big.as_str()]);
        assert_eq!(blocks[0].get(":authority"), ["localhost"]);
    }

    #[test]
    fn byte_at_a_time_gives_the_same_output() {
        let mut java = preface_and_settings();
        java.extend(frame(0x1, 0x4, 1, &hex(GRPC_JAVA_BLOCK_1)));
        java.extend(frame(0x1, 0x4, 3, &hex(GRPC_JAVA_BLOCK_2)));
        for input in [
            hex(GRPC_CORE_RECORDING),
            split_padded_input(),
            java,
            grpc_go_two_calls(),
        ] {
            let whole = rewrite_all(&input).unwrap();
            for pieces in [&[1][..], &[2, 3, 5, 7, 11], &[9], &[24, 9, 1000]] {
                assert_eq!(feed_in_pieces(&input, pieces).unwrap(), whole, "{pieces:?}");
            }
        }
    }

    #[test]
    fn output_comes_before_the_block_is_complete() {
        // Non-header frames go out as they stream past; a header block waits for END_HEADERS.
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        rewriter.feed(&preface_and_settings(), &mut out).unwrap();
        assert_eq!(out, preface_and_settings());
        let data = frame(0x0, 0, 1, &[9; 100]);
        rewriter.feed(&data[..50], &mut out).unwrap();
        assert_eq!(out.len(), preface_and_settings().len() + 50);
        rewriter.feed(&data[50..], &mut out).unwrap();
        let headers = frame(0x1, 0, 3, &[0x83]);
        let before = out.len();
        rewriter.feed(&headers, &mut out).unwrap();
        assert_eq!(out.len(), before, "held until END_HEADERS");
        rewriter
            .feed(&frame(0x9, 0x4, 3, &[0x86]), &mut out)
            .unwrap();
        assert!(out.len() > before);
    }

    #[test]
    fn garbage_after_the_preface_is_an_error() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (request(1, 0x4, &[0x80]), "index 0"),
            (request(1, 0x4, &[0xbe]), "empty dynamic table"),
            (
                request(1, 0x4, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
                "integer too long",
            ),
            (
                request(1, 0x4, &[0x00, 0x85, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]),
                "bad huffman",
            ),
            (request(1, 0x4, &[0x00, 0x7f]), "truncated string length"),
            (request(1, 0x4, &[0x00, 0x10, b'a']), "string past the end"),
            (
                request(1, 0x4, &[0x3f, 0xe1, 0xff, 0x04, 0x83]),
                "table size over 64 KiB",
            ),
            (request(1, 0x4, &[0x83, 0x20]), "size update at the end"),
            (
                request(1, 0x4 | 0x8, &[9, 0x83]),
                "padding longer than payload",
            ),
            (request(1, 0x4 | 0x8, &[]), "padded with no pad length"),
            (request(1, 0x4 | 0x20, &[0, 0, 0]), "priority cut short"),
            (
                [request(1, 0, &[0x83]), frame(0x0, 0, 1, &[])].concat(),
                "data inside an open header block",
            ),
            (
                [request(1, 0, &[0x83]), frame(0x9, 0x4, 3, &[0x86])].concat(),
                "continuation for another stream",
            ),
            (
                [request(1, 0, &[0x83]), frame(0x1, 0x4, 3, &[0x86])].concat(),
                "headers inside an open header block",
            ),
        ];
        for (input, what) in cases {
            assert!(rewrite_all(&input).is_err(), "{what}");
            assert!(
                feed_in_pieces(&input, &[1]).is_err(),
                "{what} (byte at a time)"
            );
        }
    }

    #[test]
    fn oversized_blocks_are_refused() {
        // One frame too large for any header block we accept: refused from its frame header.
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        let mut input = preface_and_settings();
        input.extend_from_slice(&[0xff, 0xff, 0xff, 0x1, 0x4, 0, 0, 0, 1]);
        let err = rewriter.feed(&input, &mut out).unwrap_err();
        assert!(
            matches!(err, FrontError::HeaderBlockTooLarge { stream: 1, .. }),
            "{err}"
        );
        // Many CONTINUATION frames adding up past the limit.
        let mut input = request(1, 0, &[0x83]);
        for _ in 0..5 {
            input.extend(frame(0x9, 0, 1, &[0x83; 16_000]));
        }
        let err = rewrite_all(&input).unwrap_err();
        assert!(
            matches!(err, FrontError::HeaderBlockTooLarge { .. }),
            "{err}"
        );
    }

    #[test]
    fn continuation_floods_are_refused() {
        // Empty CONTINUATION frames add nothing to the block, so the byte limit never trips:
        // the count of frames per block does, on the first block and on later rewritten ones.
        let mut input = request(1, 0, &[0x83]);
        for _ in 0..10_000 {
            input.extend(frame(0x9, 0, 1, &[]));
        }
        let err = rewrite_all(&input).unwrap_err();
        assert_eq!(
            err,
            FrontError::TooManyContinuations {
                stream: 1,
                limit: MAX_CONTINUATION_FRAMES
            }
        );
        assert_eq!(err.reason(), ENHANCE_YOUR_CALM);
        let mut input = request(1, 0x4, &literal(":authority", "/tmp/api.sock"));
        input.extend(frame(0x1, 0, 3, &[0x83]));
        for _ in 0..=MAX_CONTINUATION_FRAMES {
            input.extend(frame(0x9, 0, 3, &[0x86]));
        }
        let err = rewrite_all(&input).unwrap_err();
        assert!(
            matches!(err, FrontError::TooManyContinuations { stream: 3, .. }),
            "{err}"
        );
        // Exactly the limit, then END_HEADERS: a legal (if odd) block still goes through.
        let mut input = request(1, 0, &[0x83]);
        for i in 0..MAX_CONTINUATION_FRAMES {
            let end = if i + 1 == MAX_CONTINUATION_FRAMES {
                0x4
            } else {
                0
            };
            input.extend(frame(0x9, end, 1, &[0x86]));
        }
        let output = rewrite_all(&input).unwrap();
        assert_eq!(decode_output(&output)[0].get(":method"), ["POST"]);
    }

    #[test]
    fn every_error_names_a_goaway_reason() {
        let hpack = FrontError::Hpack {
            stream: 1,
            source: HpackError::BadIndex { index: 0 },
        };
        assert_eq!(hpack.reason(), COMPRESSION_ERROR);
        let big = FrontError::HeaderBlockTooLarge {
            stream: 1,
            limit: MAX_HEADER_BLOCK,
        };
        assert_eq!(big.reason(), ENHANCE_YOUR_CALM);
        assert_eq!(
            FrontError::MalformedHeaders { stream: 1 }.reason(),
            PROTOCOL_ERROR
        );
    }

    #[test]
    fn hpack_bomb_is_refused() {
        // A 4 KB dynamic table entry referenced 60,000 times: 60 KB of input, 240 MB of headers.
        let mut block = vec![0x40, 1, b'x'];
        block.extend_from_slice(&[0x7f, 0x81, 0x1e]); // value length 127 + 3841 = 3968
        block.extend(std::iter::repeat_n(b'b', 3968));
        block.extend(std::iter::repeat_n(0xbe, 60_000));
        let input = [request(1, 0, &block[..16_000]), {
            let mut rest = Vec::new();
            for chunk in block[16_000..].chunks(16_000) {
                rest.extend(frame(0x9, 0, 1, chunk));
            }
            rest.extend(frame(0x9, 0x4, 1, &[]));
            rest
        }]
        .concat();
        let err = rewrite_all(&input).unwrap_err();
        assert!(
            matches!(err, FrontError::HeaderListTooLarge { .. }),
            "{err}"
        );
    }

    #[test]
    fn blocks_of_many_huffman_strings_are_refused() {
        // `a` is the 5-bit Huffman code 00011, padded with ones: 0x1f.
        let field = [0x00, 0x81, 0x1f, 0x81, 0x1f]; // new name, both strings Huffman-coded
        let input = request(1, 0x4, &field.repeat(128));
        let ok = rewrite_all(&input).unwrap();
        assert_eq!(ok, input, "no authority: passed through");
        assert_eq!(decode_output(&ok)[0].fields.len(), 128);
        let err = rewrite_all(&request(1, 0x4, &[&field[..]; 129].concat())).unwrap_err();
        assert!(
            matches!(err, FrontError::TooManyHuffmanStrings { .. }),
            "{err}"
        );
        // The limit holds on a pass-through connection's first block, and on every block of a
        // connection that is rewritten.
        let odd = literal(":authority", "/tmp/api.sock");
        let err = rewrite_all(&request(1, 0x4, &[&odd[..], &field.repeat(129)].concat()));
        assert!(
            matches!(
                err,
                Err(FrontError::TooManyHuffmanStrings { stream: 1, .. })
            ),
            "{err:?}"
        );
        let mut input = request(1, 0x4, &odd);
        input.extend(frame(0x1, 0x4, 3, &field.repeat(128)));
        input.extend(frame(0x1, 0x4, 5, &field.repeat(129)));
        let err = rewrite_all(&input).unwrap_err();
        assert!(
            matches!(err, FrontError::TooManyHuffmanStrings { stream: 5, .. }),
            "{err}"
        );
    }

    #[test]
    fn dynamic_table_size_updates_are_followed() {
        // Block 1 shrinks the table to 0 and adds an entry (evicted at once); block 2 raises it
        // to 8192 and adds one; block 3 references it. A decoder that ignored the updates
        // would see index 62 in block 3 as the first block's entry.
        let b1 = [
            vec![0x20],
            literal_indexed(":authority", "/first.sock"),
            vec![0x83],
        ]
        .concat();
        let b2 = [
            vec![0x3f, 0xe1, 0x3f], // size update: 31 + 8161 = 8192
            literal_indexed(":authority", "localhost:1"),
            vec![0x83],
        ]
        .concat();
        let b3 = vec![0xbe, 0x83];
        let mut input = preface_and_settings();
        input.extend(frame(0x1, 0x4, 1, &b1));
        input.extend(frame(0x1, 0x4, 3, &b2));
        input.extend(frame(0x1, 0x4, 5, &b3));
        let blocks = decode_output(&rewrite_all(&input).unwrap());
        assert_eq!(blocks[0].get(":authority"), ["localhost"]);
        assert_eq!(blocks[1].get(":authority"), ["localhost:1"]);
        assert_eq!(blocks[2].get(":authority"), ["localhost:1"]);
    }

    #[test]
    fn non_http2_input_passes_unchanged() {
        let cases: [&[u8]; 5] = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n\x00\x00\x00\x01",
            b"",
            b"P",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ];
        for input in cases {
            assert_eq!(rewrite_all(input).unwrap(), input);
            assert_eq!(feed_in_pieces(input, &[1]).unwrap(), input);
        }
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        rewriter
            .feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\nXX", &mut out)
            .unwrap();
        assert!(rewriter.is_passthrough());
        rewriter.feed(&[0x80; 100], &mut out).unwrap();
        assert_eq!(out.len(), 24 + 100);
    }

    /// Builds a random, mostly well-formed client stream: random frames, header blocks made of
    /// random mixes of valid and broken HPACK representations with awkward authorities.
    fn random_input(rng: &mut XorShift) -> Vec<u8> {
        const AUTHORITIES: [&str; 6] = [
            "%2Ftmp%2Fapi.sock",
            "/tmp/api.sock",
            "localhost",
            "",
            "a%",
            "[::1]:1",
        ];
        let mut input = PREFACE.to_vec();
        for _ in 0..rng.below(8) {
            let kind = [0x0, 0x1, 0x1, 0x1, 0x9, 0x4, 0x8, 0x3, 0x5, 0xfe][rng.below(10)];
            let flags = (rng.next_u64() & 0xff) as u8;
            let flags = if rng.below(3) == 0 {
                flags
            } else {
                flags & !0x28 | 0x4
            };
            let stream = rng.below(4) as u32;
            let mut payload = Vec::new();
            for _ in 0..rng.below(6) {
                match rng.below(8) {
                    0 => payload.push(0x80 | rng.below(70) as u8),
                    1 => payload.extend(literal_indexed(
                        ":authority",
                        AUTHORITIES[rng.below(AUTHORITIES.len())],
                    )),
                    2 => payload.extend(literal(
                        ":authority",
                        AUTHORITIES[rng.below(AUTHORITIES.len())],
                    )),
                    3 => payload.push(0x41 + rng.below(2) as u8 * 0x3f),
                    4 => payload.extend(hex(GRPC_JAVA_BLOCK_1)),
                    5 => payload.push(0x20 | rng.below(32) as u8),
                    6 => payload.extend(literal_indexed("x", "y")),
                    _ => {
                        for _ in 0..rng.below(12) {
                            payload.push((rng.next_u64() & 0xff) as u8);
                        }
                    }
                }
            }
            let mut f = frame(kind, flags, stream, &payload);
            if rng.below(20) == 0 {
                f.truncate(rng.below(f.len() + 1));
            }
            if rng.below(50) == 0 {
                // Raw garbage, sometimes a huge length field.
                f = (0..rng.below(20))
                    .map(|_| (rng.next_u64() & 0xff) as u8)
                    .collect();
            }
            input.extend(f);
        }
        input
    }

    #[test]
    fn random_inputs_never_panic_and_keep_the_invariants() {
        let mut rng = XorShift(0x5eed_5eed_1234_5678);
        let (mut ok, mut passed, mut rewritten) = (0, 0, 0);
        for _ in 0..10_000 {
            let input = random_input(&mut rng);
            let whole = rewrite_all(&input);
            let pieces = feed_in_pieces(&input, &[1 + rng.below(16)]);
            if let Ok(output) = &whole {
                ok += 1;
                // The same invariants as the fuzz target's.
                if check_rewrite_invariants(&input, output) > 0 {
                    match first_block(output) {
                        Some(b)
                            if Some(&b.fragment)
                                == first_block(&input).map(|b| b.fragment).as_ref() =>
                        {
                            passed += 1
                        }
                        _ => rewritten += 1,
                    }
                }
                assert_eq!(
                    pieces.as_ref().ok(),
                    Some(output),
                    "chunking changed the output"
                );
            } else {
                assert!(pieces.is_err(), "chunking changed the outcome");
            }
        }
        // The generator exercises every path.
        assert!(ok > 1_000, "{ok}");
        assert!(passed > 300, "{passed}");
        assert!(rewritten > 300, "{rewritten}");
    }
}
