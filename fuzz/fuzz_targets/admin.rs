//! `spiffed.admin.v1` requests as a client on the admin socket sends them: protobuf bytes,
//! decoded with prost as tonic does, then through the admin service's own validation.
//!
//! The first byte picks the request type; the rest is the encoded message. Checks:
//! - decoding never panics, and a decoded message re-encodes to bytes that decode to the same
//!   message (prost round trip);
//! - every `EntrySpec` of `CreateEntries` and `UpdateEntry` goes through the service's
//!   `validate_spec` (see `common::check_spec` for what an accepted or refused spec promises).
//!
//! The other requests (Get, Delete, Explain, the List filter) carry only ids and a selector
//! string; decoding them would fuzz prost, and selector strings have their own target.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use spiffed_proto::admin as pb;

/// Most specs checked per input (the service takes up to 1000 per call; each costs the same).
const MAX_SPECS: usize = 64;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
    assert_eq!(again, m, "prost round trip");
    Some(m)
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let td = common::td();
    if kind % 2 == 0 {
        if let Some(req) = round_trip::<pb::CreateEntriesRequest>(bytes) {
            for spec in req.entries.iter().take(MAX_SPECS) {
                common::check_spec(spec, &td);
            }
        }
    } else if let Some(req) = round_trip::<pb::UpdateEntryRequest>(bytes)
        && let Some(spec) = &req.spec
    {
        common::check_spec(spec, &td);
    }
});
