//! Registration entries: Selectors -> matching Entries.
//!
//! [`EntrySources`] merges every source of entries (the config file, the SQLite [`store`], later
//! a SPIRE Server sync) into one index that open Workload API streams read through an
//! [`EntryFeed`](spiffed_core::EntryFeed). Every change is applied by what changed: an admin
//! write updates one entry of the index and publishes it, it never re-lists the store.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use spiffed_core::{EntryLimits, Selector, SelectorCheck, SelectorError};
//! use spiffed_entries::store::{EntrySpec, Filter, Store};
//! use spiffed_entries::{ConfigEntries, EntrySources, Rules};
//!
//! struct AnySelector;
//! impl SelectorCheck for AnySelector {
//!     fn check(&self, _: &Selector) -> Result<(), SelectorError> { Ok(()) }
//! }
//! # let dir = tempfile::tempdir()?;
//! let store = Store::open(&dir.path().join("entries.db"))?;
//! let rules = Rules {
//!     trust_domain: spiffed_core::TrustDomain::new("example.org")?,
//!     limits: EntryLimits::default(),
//!     selectors: Arc::new(AnySelector),
//! };
//! let (sources, loaded) = EntrySources::open(store, ConfigEntries::default(), rules)?;
//! assert_eq!(loaded.entries, 0);
//! let feed = sources.feed();
//! let created = sources.create(vec![EntrySpec {
//!     spiffe_id: "spiffe://example.org/web".parse()?,
//!     selectors: vec!["unix:uid:1000".parse()?],
//!     x509_svid_ttl: None,
//!     jwt_svid_ttl: None,
//!     hint: None,
//!     dns_names: vec![],
//!     admin: false,
//!     federates_with: vec![],
//! }])?;
//! assert!(created[0].is_ok());
//! assert_eq!(feed.read().len(), 1);
//! let page = sources.list(None, 100, &Filter::default())?;
//! assert_eq!(page.entries.len(), 1);
//! assert!(page.next.is_none());
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod sources;
pub mod store;

pub use sources::{
    ConfigEntries, EntrySources, Listed, Loaded, Owner, Page, Rules, SourceError, SourceHandle,
    config_entry_id,
};
