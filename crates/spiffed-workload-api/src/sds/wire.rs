//! The SDS response as it goes on the wire: a `DiscoveryResponse` whose resources were encoded
//! once and are shared by every stream that sends them.
//!
//! A rotation sends the same secrets to every stream of a workload; only the version and the
//! nonce are each stream's own. [`Resources`] holds the resources already encoded as
//! `DiscoveryResponse` field 2 records, and [`SdsResponse`] writes its own fields around them,
//! so a stream's message costs a copy of those bytes into the call's buffer and no encoding.
//! The encoding is the one prost gives the equivalent `DiscoveryResponse` (tested below).

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint};
use zeroize::Zeroizing;

/// `DiscoveryResponse.version_info`.
const VERSION_INFO: u32 = 1;
/// `DiscoveryResponse.resources`.
const RESOURCES: u32 = 2;
/// `DiscoveryResponse.type_url`.
const TYPE_URL: u32 = 4;
/// `DiscoveryResponse.nonce`.
const NONCE: u32 = 5;

/// Encoded resources (each an `Any` in a field 2 record), shared by the responses that carry
/// them. The bytes hold private keys: they are zeroized when the last holder drops them. The
/// copies the transport makes (the call's buffer, the socket's) are not.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Resources {
    bytes: Bytes,
    count: usize,
}

impl Resources {
    /// Encodes `resources`; their own copies are zeroized.
    pub fn new(mut resources: Vec<Any>) -> Self {
        let len: usize = resources
            .iter()
            .map(|r| prost::encoding::message::encoded_len(RESOURCES, r))
            .sum();
        let mut buf = Zeroizing::new(Vec::with_capacity(len));
        for r in &resources {
            prost::encoding::message::encode(RESOURCES, r, &mut *buf);
        }
        for r in &mut resources {
            zeroize::Zeroize::zeroize(&mut r.value);
        }
        Self {
            count: resources.len(),
            bytes: Bytes::from_owner(buf),
        }
    }

    /// How many resources there are.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bytes may hold private keys: show only their size.
        f.debug_struct("Resources")
            .field("count", &self.count)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// A `DiscoveryResponse` with shared [`Resources`]: what `StreamSecrets` and `FetchSecrets`
/// send. Encodes exactly as the `DiscoveryResponse` with the same fields.
#[derive(Clone, Debug, Default)]
pub struct SdsResponse {
    /// The version of the workload's state it carries (empty for `FetchSecrets`).
    pub version_info: String,
    /// The secrets.
    pub resources: Resources,
    /// The request's type URL, echoed.
    pub type_url: String,
    /// The nonce the next request must echo (empty for `FetchSecrets`).
    pub nonce: String,
}

fn string_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        prost::encoding::key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
    }
}

fn put_string(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.put_slice(s.as_bytes());
    }
}

impl Message for SdsResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        put_string(VERSION_INFO, &self.version_info, buf);
        buf.put_slice(&self.resources.bytes);
        put_string(TYPE_URL, &self.type_url, buf);
        put_string(NONCE, &self.nonce, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded by the server: decode a `DiscoveryResponse` instead.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        string_len(VERSION_INFO, &self.version_info)
            + self.resources.bytes.len()
            + string_len(TYPE_URL, &self.type_url)
            + string_len(NONCE, &self.nonce)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;

    use super::*;

    fn any(name: &str, size: usize) -> Any {
        Any {
            type_url: format!("type.googleapis.com/{name}"),
            value: vec![7; size],
        }
    }

    #[test]
    fn encodes_as_the_discovery_response_with_the_same_fields() {
        for (version, resources, type_url, nonce) in [
            ("", vec![], "", ""),
            ("1", vec![any("a", 3)], "t", "0123abcd"),
            ("12", vec![any("a", 300), any("b", 70_000)], "", "ffffffff"),
            ("", vec![any("a", 1)], "type.googleapis.com/x", ""),
        ] {
            let ours = SdsResponse {
                version_info: version.into(),
                resources: Resources::new(resources.clone()),
                type_url: type_url.into(),
                nonce: nonce.into(),
            };
            let theirs = DiscoveryResponse {
                version_info: version.into(),
                resources,
                type_url: type_url.into(),
                nonce: nonce.into(),
                ..Default::default()
            };
            assert_eq!(ours.encoded_len(), theirs.encoded_len());
            assert_eq!(ours.encode_to_vec(), theirs.encode_to_vec());
            assert_eq!(
                DiscoveryResponse::decode(ours.encode_to_vec().as_slice()).unwrap(),
                theirs
            );
            assert_eq!(ours.resources.len(), theirs.resources.len());
        }
    }

    #[test]
    fn debug_shows_no_bytes() {
        let r = Resources::new(vec![any("key", 5)]);
        let shown = format!(
            "{:?}",
            SdsResponse {
                resources: r,
                ..Default::default()
            }
        );
        assert!(!shown.contains("7, 7"), "{shown}");
    }
}
