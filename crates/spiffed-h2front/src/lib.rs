//! An HTTP/2 front for accepted Workload API connections that makes the `:authority` of every
//! request acceptable to the `h2` crate under tonic.
//!
//! On a Unix socket, gRPC clients disagree about `:authority`: grpc-go sends `localhost`, grpc C
//! core (and so py-spiffe) sends the percent-encoded socket path (`tmp%2Fx%2Fapi.sock`), and
//! grpc-java sends the raw path (`/tmp/x/api.sock`). `h2` rejects the last two as a malformed
//! authority and resets the stream with PROTOCOL_ERROR (hyperium/h2#487). [`AuthorityFront`]
//! sits between the socket and the server and looks at the client's header blocks; everything
//! else passes through unchanged, and the server-to-client direction is not touched at all.
//!
//! The connection's first header block decides how much work the rest of it costs:
//!
//! - **Pass-through.** When every `:authority` in the first block is a plain `host[:port]`
//!   (grpc-go, tonic and the `spiffe` crate, our CLI and load generator), or the block has
//!   none, that block goes out with its HPACK bytes unchanged and every later byte of the
//!   connection is copied as it is, with no more parsing. The server's HPACK decoder then sees
//!   exactly the client's encoder stream, so its dynamic table stays in step with the client's
//!   by itself. A client's authority belongs to its channel and does not change from request to
//!   request; should a pass-through client later send an odd one anyway, h2 rejects that
//!   request just as it would without the front, which is no worse than having no front.
//! - **Rewrite.** Otherwise every header block of the connection, the first included, is
//!   decoded with HPACK (following the client's dynamic table), has each `:authority` that is
//!   not a plain `host[:port]` replaced with `localhost`, and is re-encoded without the dynamic
//!   table, so the server's decoder stays in step without us tracking its state.
//!
//! Either way the first block is decoded and held to the same limits (block size, header list
//! size, Huffman-coded strings, valid HPACK: see [`FrontError`]). The decoder is the crate's
//! own (RFC 7541, with a Huffman decoding table built at compile time), so that a block costs
//! a walk over its bytes and nothing is set up per string.
//!
//! The `:authority` value is not used for anything on a Unix socket, so nothing is lost.
//! One nuance is lost in re-encoding: a field the client sent as "never indexed" (RFC 7541
//! §6.2.3) reaches the server as a plain literal without indexing; the server is the last hop,
//! so no later intermediary can be told to treat it differently.
//!
//! ```
//! // grpc-core style request: `:authority` is the percent-encoded socket path.
//! let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
//! let block = [
//!     &[0x83, 0x86, 0x41, 0x12][..], // :method POST, :scheme http, :authority (indexed name)
//!     b"tmp%2Fx%2Fapi.sock",
//! ]
//! .concat();
//! input.extend_from_slice(&[0, 0, block.len() as u8, 0x1, 0x4, 0, 0, 0, 1]);
//! input.extend_from_slice(&block);
//! let output = spiffed_h2front::rewrite_all(&input)?;
//! assert!(output.windows(9).any(|w| w == b"localhost"));
//! # Ok::<(), spiffed_h2front::FrontError>(())
//! ```
#![forbid(unsafe_code)]

mod encode;
mod front;
mod hpack;
mod rewrite;
#[cfg(test)]
mod testutil;

pub use front::AuthorityFront;
pub use hpack::HpackError;
pub use rewrite::{
    COMPRESSION_ERROR, ENHANCE_YOUR_CALM, FrontError, MAX_CONTINUATION_FRAMES, MAX_HEADER_BLOCK,
    MAX_HEADER_LIST, MAX_HUFFMAN_STRINGS, PROTOCOL_ERROR, REPLACEMENT_AUTHORITY, rewrite_all,
};
