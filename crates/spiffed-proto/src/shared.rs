//! The Workload API server as spiffed serves it: streamed responses encoded once and shared.
//!
//! When an SVID rotates, every open stream of every caller with the same identities must get
//! the same message. [`Encoded`] holds such a message already encoded, so the agent encodes it
//! once per change and each stream only copies the bytes into its frame. [`SharedCodec`] is
//! prost's codec with small per-call buffers: tonic keeps one encode buffer per open stream
//! for the stream's life, and its default (8 KiB) would dominate the memory of an agent
//! holding thousands of streams; a buffer grows to the largest message it has carried.

use std::fmt;
use std::marker::PhantomData;

use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};
use zeroize::Zeroizing;

/// Initial size of the encode and decode buffers of each call (tonic's default is 8 KiB).
pub const CALL_BUFFER: usize = 1024;
/// Encoded bytes gathered before a stream yields them to the transport (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// A message of type `T`, encoded. Cloning shares the bytes, which are wiped when the last
/// clone is dropped (an `X509SVIDResponse` carries private keys). Copies made from them by
/// the transport (tonic's per-call encode buffer, the kernel's socket buffer) are not.
///
/// It encodes as the bytes it holds. Decoding one (never needed by the server) keeps nothing:
/// decode a `T` from [`Encoded::as_bytes`] instead.
pub struct Encoded<T> {
    bytes: Bytes,
    _message: PhantomData<fn() -> T>,
}

impl<T: Message> Encoded<T> {
    /// Encodes `message`.
    pub fn new(message: &T) -> Self {
        Self {
            bytes: Bytes::from_owner(Zeroizing::new(message.encode_to_vec())),
            _message: PhantomData,
        }
    }
}

impl<T> Encoded<T> {
    /// The encoded message.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl<T> Clone for Encoded<T> {
    fn clone(&self) -> Self {
        Self {
            bytes: self.bytes.clone(),
            _message: PhantomData,
        }
    }
}

impl<T> Default for Encoded<T> {
    fn default() -> Self {
        Self {
            bytes: Bytes::new(),
            _message: PhantomData,
        }
    }
}

impl<T> PartialEq for Encoded<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<T> Eq for Encoded<T> {}

impl<T> fmt::Debug for Encoded<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes may hold a private key: show only their size.
        f.debug_struct("Encoded")
            .field("message", &std::any::type_name::<T>())
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl<T> Message for Encoded<T> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        self.bytes = Bytes::new();
    }
}

/// prost's codec with [`CALL_BUFFER`]-sized buffers.
pub struct SharedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SharedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> fmt::Debug for SharedCodec<T, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedCodec")
    }
}

impl<T, U> Codec for SharedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(CALL_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(CALL_BUFFER, YIELD_THRESHOLD))
    }
}

/// The `SpiffeWorkloadAPI` server with `FetchX509SVID`, `FetchX509Bundles` and
/// `FetchJWTBundles` streaming [`Encoded`] messages, over [`SharedCodec`].
#[allow(missing_docs, unreachable_pub, clippy::all, reason = "generated code")]
pub mod server {
    include!(concat!(env!("OUT_DIR"), "/shared/_.rs"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{X509svid, X509svidResponse};

    #[test]
    fn encoded_messages_encode_as_the_message_itself() {
        let msg = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://example.org/a".into(),
                x509_svid: vec![1, 2, 3],
                x509_svid_key: vec![4, 5],
                bundle: vec![6],
                hint: "h".into(),
            }],
            ..Default::default()
        };
        let enc = Encoded::new(&msg);
        assert_eq!(enc.encoded_len(), msg.encoded_len());
        let framed = enc.encode_to_vec();
        assert_eq!(framed, msg.encode_to_vec());
        assert_eq!(X509svidResponse::decode(framed.as_slice()).unwrap(), msg);
        assert_eq!(enc.clone(), enc);
        assert!(!format!("{enc:?}").contains("spiffe://"));
    }
}
