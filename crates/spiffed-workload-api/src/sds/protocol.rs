//! The xDS state of one `StreamSecrets` stream (SDS.md §3): version, nonce, ACK and NACK.
//!
//! Pure: the stream feeds it requests and workload updates and sends what it says to send.
//!
//! - Every workload update (rotation, bundle change, entry change) increments the version;
//!   the first is `"1"`.
//! - A response goes out on the first request (the stream takes its first update before
//!   reading any), whenever the requested names change (compared as a set), and on every
//!   later update. An ACK with the same names sends nothing.
//! - Each response carries a fresh random nonce of 8 hex digits. Once one was sent, a request
//!   with another `response_nonce` is stale and ignored; one with the right nonce but another
//!   `version_info` (or none) is a NACK, logged, and still processed (it may change the names).
//! - A request may omit the node: what the last one said is kept.

use std::collections::BTreeSet;
use std::hash::{BuildHasher as _, Hasher as _};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use super::resources::NodePrefs;
use super::wire::{Resources, SdsResponse};
use crate::ApiError;

/// Most resource names one request may carry.
pub const MAX_RESOURCE_NAMES: usize = 1024;
/// Most bytes the resource names of one request may hold together.
pub const MAX_RESOURCE_NAME_BYTES: usize = 64 * 1024;
/// Longest `type_url` kept (it is echoed in every response).
pub const MAX_TYPE_URL_BYTES: usize = 1024;

/// What a request means for the stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Send a response now (for the names now requested).
    pub send: bool,
    /// The request answered an older response and was ignored.
    pub stale: bool,
    /// The client rejected the last response (NACK): the version it says it has.
    pub nack: Option<String>,
    /// The client's `error_detail.message`, if any (logged).
    pub error_detail: Option<String>,
}

/// The xDS state of one stream.
#[derive(Debug)]
pub struct XdsState {
    /// Workload updates seen (the version of the next response).
    version: u64,
    /// `version` as text, compared with every ACK's `version_info`.
    version_text: String,
    /// The nonce of the last response sent.
    nonce: Option<String>,
    /// The names of the last request (empty strings left out), or `None` before the first.
    names: Option<BTreeSet<String>>,
    /// The last request's `type_url`, echoed in responses.
    type_url: String,
    /// What the last node seen said.
    node: NodePrefs,
    /// Responses made, mixed into nonces.
    sent: u64,
    /// This stream's random keys for its nonces.
    nonce_keys: std::hash::RandomState,
}

impl Default for XdsState {
    fn default() -> Self {
        Self {
            version: 0,
            version_text: "0".to_owned(),
            nonce: None,
            names: None,
            type_url: String::new(),
            node: NodePrefs::default(),
            sent: 0,
            nonce_keys: std::hash::RandomState::new(),
        }
    }
}

impl XdsState {
    /// A stream that has seen no update and no request.
    pub fn new() -> Self {
        Self::default()
    }

    /// The version a response made now carries (`"0"` before any update).
    pub fn version(&self) -> &str {
        &self.version_text
    }

    /// The names last requested, empty strings left out (empty: everything); `None` before
    /// the first request.
    pub fn names(&self) -> Option<&BTreeSet<String>> {
        self.names.as_ref()
    }

    /// What the client's node said (from the last request that carried one).
    pub fn node(&self) -> NodePrefs {
        self.node
    }

    /// A workload update: the version grows; `true` when a response must go out (a request
    /// came before).
    pub fn on_update(&mut self) -> bool {
        self.version += 1;
        self.version_text = self.version.to_string();
        self.names.is_some()
    }

    /// A request from the client. An error (too many names, an oversized request) ends the
    /// stream.
    pub fn on_request(&mut self, req: &DiscoveryRequest) -> Result<Received, ApiError> {
        check_request(req)?;
        let mut out = Received {
            error_detail: req
                .error_detail
                .as_ref()
                .map(|d| d.message.clone())
                .filter(|m| !m.is_empty()),
            ..Received::default()
        };
        if let Some(last) = &self.nonce {
            if *last != req.response_nonce {
                out.stale = true;
                return Ok(out);
            }
            if req.version_info.is_empty() || req.version_info != self.version() {
                out.nack = Some(req.version_info.clone());
            }
        }
        if let Some(node) = &req.node {
            self.node = NodePrefs::of(node);
        }
        // An ACK repeats the names: compared in place, the set is kept.
        out.send = !self
            .names
            .as_ref()
            .is_some_and(|kept| same_names(kept, &req.resource_names));
        if out.send {
            self.names = Some(
                req.resource_names
                    .iter()
                    .filter(|n| !n.is_empty())
                    .cloned()
                    .collect(),
            );
        }
        if self.type_url != req.type_url {
            self.type_url.clone_from(&req.type_url);
        }
        Ok(out)
    }

    /// The response carrying `resources`, with the current version and a fresh nonce (which
    /// the next request must echo).
    pub fn respond(&mut self, resources: Resources) -> SdsResponse {
        self.sent += 1;
        let mut nonce = new_nonce(&self.nonce_keys, self.sent);
        while self.nonce.as_ref() == Some(&nonce) {
            self.sent += 1;
            nonce = new_nonce(&self.nonce_keys, self.sent);
        }
        self.nonce = Some(nonce.clone());
        SdsResponse {
            version_info: self.version_text.clone(),
            resources,
            type_url: self.type_url.clone(),
            nonce,
        }
    }
}

/// The one-off response of `FetchSecrets`: no version and no nonce (as spire-agent).
pub fn fetch_response(req: &DiscoveryRequest, resources: Resources) -> SdsResponse {
    SdsResponse {
        resources,
        type_url: req.type_url.clone(),
        ..Default::default()
    }
}

/// Refuses a request whose names or type URL exceed the limits.
pub fn check_request(req: &DiscoveryRequest) -> Result<(), ApiError> {
    if req.resource_names.len() > MAX_RESOURCE_NAMES {
        return Err(ApiError::BadRequest(format!(
            "the request names {} resources; at most {MAX_RESOURCE_NAMES} are accepted",
            req.resource_names.len()
        )));
    }
    let bytes: usize = req.resource_names.iter().map(String::len).sum();
    if bytes > MAX_RESOURCE_NAME_BYTES {
        return Err(ApiError::BadRequest(format!(
            "the request's resource names hold {bytes} bytes; at most \
             {MAX_RESOURCE_NAME_BYTES} are accepted"
        )));
    }
    if req.type_url.len() > MAX_TYPE_URL_BYTES {
        return Err(ApiError::BadRequest(format!(
            "the request's type_url is {} bytes long; at most {MAX_TYPE_URL_BYTES} are accepted",
            req.type_url.len()
        )));
    }
    Ok(())
}

/// Whether the non-empty names of a request are the set `kept` (duplicates allowed), without
/// building a set: an ACK repeats its names, and every stream takes one per response.
fn same_names(kept: &BTreeSet<String>, names: &[String]) -> bool {
    // Beyond a few names the quadratic duplicate check costs more than a set.
    const IN_PLACE: usize = 16;
    if names.len() > IN_PLACE {
        let asked: BTreeSet<&String> = names.iter().filter(|n| !n.is_empty()).collect();
        return asked.into_iter().eq(kept.iter());
    }
    let mut distinct = 0;
    for (i, n) in names.iter().enumerate() {
        if n.is_empty() {
            continue;
        }
        if !kept.contains(n) {
            return false;
        }
        if !names[..i].contains(n) {
            distinct += 1;
        }
    }
    distinct == kept.len()
}

/// 8 random hex digits: SipHash with the stream's random keys over its response counter. A
/// nonce only has to differ from the last one and be hard to guess, not be a secret.
fn new_nonce(keys: &std::hash::RandomState, counter: u64) -> String {
    let mut h = keys.build_hasher();
    h.write_u64(counter);
    crate::service::hex(&(h.finish() as u32).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    fn req(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            version_info: version.to_owned(),
            response_nonce: nonce.to_owned(),
            type_url: crate::sds::resources::SECRET_TYPE_URL.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn first_request_then_ack_then_update() {
        let mut s = XdsState::new();
        // The stream's first update comes before any request: nothing to send yet.
        assert!(!s.on_update());
        let r = s.on_request(&req(&["default"], "", "")).unwrap();
        assert!(r.send && !r.stale && r.nack.is_none());
        let first = s.respond(Resources::default());
        assert_eq!(first.version_info, "1");
        assert_eq!(first.nonce.len(), 8);
        assert!(first.nonce.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(first.type_url, crate::sds::resources::SECRET_TYPE_URL);
        // ACK: same names, nothing sent.
        let r = s.on_request(&req(&["default"], "1", &first.nonce)).unwrap();
        assert_eq!(r, Received::default());
        // A rotation: version 2 with a new nonce.
        assert!(s.on_update());
        let second = s.respond(Resources::default());
        assert_eq!(second.version_info, "2");
        assert_ne!(second.nonce, first.nonce);
        // The ACK of the first response is now stale and ignored, even with new names.
        let r = s.on_request(&req(&["ROOTCA"], "1", &first.nonce)).unwrap();
        assert!(r.stale && !r.send);
        assert_eq!(s.names().unwrap().iter().collect::<Vec<_>>(), ["default"]);
    }

    #[test]
    fn names_are_compared_as_a_set() {
        let mut s = XdsState::new();
        s.on_update();
        assert!(s.on_request(&req(&["a", "b"], "", "")).unwrap().send);
        let n = s.respond(Resources::default()).nonce;
        let r = s.on_request(&req(&["b", "a", "a"], "1", &n)).unwrap();
        assert!(!r.send);
        let r = s.on_request(&req(&["b"], "1", &n)).unwrap();
        assert!(r.send, "a changed set of names is answered");
        let n = s.respond(Resources::default()).nonce;
        // An empty name means nothing: [""] is the same as [] (everything).
        assert!(s.on_request(&req(&[""], "1", &n)).unwrap().send);
        let n = s.respond(Resources::default()).nonce;
        assert!(!s.on_request(&req(&[], "1", &n)).unwrap().send);
    }

    #[test]
    fn names_in_place_match_the_set_comparison() {
        let set = |ns: &[&str]| -> BTreeSet<String> {
            ns.iter()
                .filter(|n| !n.is_empty())
                .map(|n| (*n).to_owned())
                .collect()
        };
        let many: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let cases: &[(&[&str], &[&str])] = &[
            (&[], &[]),
            (&[], &[""]),
            (&["a"], &["a"]),
            (&["a"], &["a", "a", ""]),
            (&["a", "b"], &["b", "a"]),
            (&["a", "b"], &["a", "a"]),
            (&["a"], &["a", "b"]),
            (&["a", "b"], &["a", "c"]),
            (&["a"], &[]),
            (&many, &many),
            (&many, &many[1..]),
            (&many[1..], &many),
            (&many[..20], &[&many[..20], &many[..20]].concat()),
        ];
        for (kept, asked) in cases {
            let kept = set(kept);
            let owned: Vec<String> = asked.iter().map(|n| (*n).to_owned()).collect();
            assert_eq!(
                same_names(&kept, &owned),
                kept == set(asked),
                "{kept:?} against {asked:?}"
            );
        }
    }

    #[test]
    fn nack_is_reported_and_still_processed() {
        let mut s = XdsState::new();
        s.on_update();
        s.on_request(&req(&["default"], "", "")).unwrap();
        let n = s.respond(Resources::default()).nonce;
        let mut nack = req(&["default", "ROOTCA"], "", &n);
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad cert".into(),
            details: vec![],
        });
        let r = s.on_request(&nack).unwrap();
        assert_eq!(r.nack.as_deref(), Some(""));
        assert_eq!(r.error_detail.as_deref(), Some("bad cert"));
        assert!(r.send, "the NACK changed the names, so they are answered");
        let n = s.respond(Resources::default()).nonce;
        // A NACK naming an older version, same names: logged, nothing sent.
        let r = s.on_request(&req(&["default", "ROOTCA"], "0", &n)).unwrap();
        assert_eq!(r.nack.as_deref(), Some("0"));
        assert!(!r.send);
    }

    #[test]
    fn the_node_is_kept_when_later_requests_omit_it() {
        use crate::sds::resources::{DISABLE_VALIDATION_KEY, Validation};
        use envoy_types::pb::envoy::config::core::v3::Node;
        use envoy_types::pb::google::protobuf::{Struct, Value, value};
        let mut s = XdsState::new();
        s.on_update();
        let mut first = req(&["ROOTCA"], "", "");
        first.node = Some(Node {
            metadata: Some(Struct {
                fields: [(
                    DISABLE_VALIDATION_KEY.to_owned(),
                    Value {
                        kind: Some(value::Kind::StringValue("true".into())),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        });
        s.on_request(&first).unwrap();
        let n = s.respond(Resources::default()).nonce;
        s.on_request(&req(&["ROOTCA"], "1", &n)).unwrap();
        assert_eq!(s.node().validation(false), Validation::TrustedCa);
    }

    #[test]
    fn oversized_requests_are_refused_with_the_limit() {
        let mut s = XdsState::new();
        let many: Vec<String> = (0..=MAX_RESOURCE_NAMES).map(|i| i.to_string()).collect();
        let mut r = req(&[], "", "");
        r.resource_names = many;
        let e = s.on_request(&r).unwrap_err();
        assert!(e.to_string().contains("at most 1024"), "{e}");
        r.resource_names = vec!["x".repeat(MAX_RESOURCE_NAME_BYTES + 1)];
        assert!(s.on_request(&r).is_err());
        assert!(s.names().is_none(), "a refused request changes nothing");
    }

    #[test]
    fn nonces_differ_between_responses() {
        let mut s = XdsState::new();
        let mut seen = BTreeSet::new();
        for _ in 0..1000 {
            let n = s.respond(Resources::default()).nonce;
            assert_eq!(n.len(), 8);
            seen.insert(n);
        }
        // 1000 draws of 32 bits: a repeat is possible, but not consecutive ones.
        assert!(seen.len() > 990);
    }
}
