//! An HTTP/2 front for accepted Workload API connections that makes the `:authority` of every
//! request acceptable to the `h2` crate under tonic.
//!
//! On a Unix socket, gRPC clients disagree about `:authority`: grpc-go sends `localhost`, grpc C
//! core (and so py-spiffe) sends the percent-encoded socket path (`tmp%2Fx%2Fapi.sock`), and
//! grpc-java sends the raw path (`/tmp/x/api.sock`). `h2` rejects the last two as a malformed
//! authority and resets the stream with PROTOCOL_ERROR (hyperium/h2#487). [`AuthorityFront`]
//! sits between the socket and the server: it decodes each client header block with HPACK
//! (following the client's dynamic table), replaces an `:authority` that is not a plain
//! `host[:port]` with `localhost`, and re-encodes the block without the dynamic table, so the
//! server's decoder stays in step without us tracking its state. Everything else passes
//! through unchanged, and the server-to-client direction is not touched at all.
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
mod rewrite;
#[cfg(test)]
mod testutil;

pub use front::AuthorityFront;
pub use rewrite::{
    FrontError, MAX_HEADER_BLOCK, MAX_HEADER_LIST, MAX_HUFFMAN_STRINGS, REPLACEMENT_AUTHORITY,
    rewrite_all,
};
