//! Registration entries: Selectors -> matching Entries.
//!
//! Holds the current [`EntrySet`] (entries from the config file today; the SQLite store joins
//! them later) and publishes every new set on a `watch` channel, so open Workload API streams
//! re-match their caller as soon as entries change.
//!
//! ```
//! use spiffed_entries::EntrySource;
//! let source = EntrySource::new(vec![]);
//! let rx = source.subscribe();
//! assert!(rx.borrow().entries().is_empty());
//! ```
#![forbid(unsafe_code)]

pub mod store;

use std::sync::{Arc, Weak};

use spiffed_core::{Entry, EntrySet};
use tokio::sync::watch;

/// The live set of entries, published to subscribers on every change.
///
/// Dropping it ends every subscriber's stream: that is how the agent ends open Workload API
/// streams at shutdown. [`EntryHandle`]s do not keep it alive.
#[derive(Debug)]
pub struct EntrySource {
    tx: Arc<watch::Sender<Arc<EntrySet>>>,
}

/// A weak handle for changing entries (e.g. a config reload) while the agent runs.
#[derive(Debug, Clone)]
pub struct EntryHandle {
    tx: Weak<watch::Sender<Arc<EntrySet>>>,
}

impl EntryHandle {
    /// Replaces every entry and returns the published set; `None` when the agent has stopped.
    pub fn replace(&self, entries: Vec<Entry>) -> Option<Arc<EntrySet>> {
        self.tx.upgrade().map(|tx| replace(&tx, entries))
    }
}

fn replace(tx: &watch::Sender<Arc<EntrySet>>, entries: Vec<Entry>) -> Arc<EntrySet> {
    let revision = tx.borrow().revision() + 1;
    let set = Arc::new(EntrySet::new(
        entries.into_iter().map(Arc::new).collect(),
        revision,
    ));
    tx.send_replace(set.clone());
    set
}

impl EntrySource {
    /// Starts with `entries` (already validated) as revision 1.
    pub fn new(entries: Vec<Entry>) -> Self {
        let set = EntrySet::new(entries.into_iter().map(Arc::new).collect(), 1);
        let (tx, _) = watch::channel(Arc::new(set));
        Self { tx: Arc::new(tx) }
    }

    /// A receiver of the current set and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<EntrySet>> {
        self.tx.subscribe()
    }

    /// The current set.
    pub fn current(&self) -> Arc<EntrySet> {
        self.tx.borrow().clone()
    }

    /// Replaces every entry (a config reload) and notifies subscribers.
    pub fn replace(&self, entries: Vec<Entry>) {
        replace(&self.tx, entries);
    }

    /// A weak handle for later changes.
    pub fn handle(&self) -> EntryHandle {
        EntryHandle {
            tx: Arc::downgrade(&self.tx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiffed_core::EntryId;

    #[tokio::test]
    async fn replace_bumps_revision_and_notifies() {
        let src = EntrySource::new(vec![]);
        let mut rx = src.subscribe();
        rx.borrow_and_update();
        src.replace(vec![Entry {
            id: EntryId::new("config-0000"),
            spiffe_id: "spiffe://td/a".parse().unwrap(),
            selectors: vec!["unix:uid:1".parse().unwrap()],
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
        }]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow().revision(), 2);
        assert_eq!(src.current().entries().len(), 1);
        let handle = src.handle();
        assert!(handle.replace(vec![]).is_some());
        rx.borrow_and_update();
        drop(src);
        assert!(handle.replace(vec![]).is_none());
        // Subscribers learn that the source is gone: open streams end.
        assert!(rx.changed().await.is_err());
    }
}
