//! Entries as a SPIRE Server sends them (agent mode): any bytes decoded as a
//! `SyncAuthorizedEntriesResponse`, each entry converted as the sync converts it.
//!
//! Checks, for every input:
//! - decoding and converting never panic (a hostile or broken server is an error, not a crash);
//! - a converted entry keeps what the server said: the id verbatim, the SPIFFE ID's trust
//!   domain and path, the hint, the flags, every federated trust domain, and exactly the
//!   server's selectors (sorted, without duplicates), each `type:value`;
//! - checking a converted entry against the agent-mode rules never panics (an entry that
//!   fails them is left out by the sync, with a warning).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use spiffed_core::{EntryLimits, EntryRules, Selector, SelectorCheck, SelectorError};
use spiffed_proto::spire::entry::SyncAuthorizedEntriesResponse;

/// Agent mode keeps any well-formed selector (the server's business).
struct Any;

impl SelectorCheck for Any {
    fn check(&self, _: &Selector) -> Result<(), SelectorError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(resp) = SyncAuthorizedEntriesResponse::decode(data) else {
        return;
    };
    for e in &resp.entries {
        let Ok(entry) = spiffed_spire::convert_entry(e) else {
            continue;
        };
        assert_eq!(entry.id.as_str(), e.id);
        let id = e.spiffe_id.as_ref().expect("converted without a SPIFFE ID");
        assert_eq!(entry.spiffe_id.trust_domain().as_str(), id.trust_domain);
        assert_eq!(entry.spiffe_id.path(), id.path);
        assert_eq!(entry.hint.as_deref().unwrap_or(""), e.hint);
        assert_eq!((entry.admin, entry.downstream), (e.admin, e.downstream));
        let mut want: Vec<String> = e
            .selectors
            .iter()
            .map(|s| format!("{}:{}", s.r#type, s.value))
            .collect();
        want.sort();
        want.dedup();
        let mut got: Vec<String> = entry.selectors.iter().map(ToString::to_string).collect();
        got.sort();
        assert_eq!(got, want, "selectors changed in conversion");
        assert_eq!(entry.federates_with.len(), e.federates_with.len());
        let rules = EntryRules {
            trust_domain: entry.spiffe_id.trust_domain(),
            limits: EntryLimits {
                max_selectors: usize::MAX,
                max_dns_names: usize::MAX,
                ..EntryLimits::default()
            },
            selectors: &Any,
        };
        let _ = entry.check(&rules);
    }
});
