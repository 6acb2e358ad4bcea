//! The live entries: an index updated by what changed, and a feed of those changes.
//!
//! An entry source (the config file, the SQLite store, later a SPIRE Server sync) applies changes
//! through the [`EntryPublisher`]; it updates the [`EntryIndex`] in place (cost grows with the
//! change, not with the number of entries) and publishes an [`EntryEvent`] naming the changed
//! entries. Readers ([`EntryFeed`]) match callers against the index under a short read lock and
//! learn from each event whether their caller's entries can have changed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::watch;

use crate::{Entry, EntryId, Needs, Selector, Selectors};

/// Every entry, indexed for "all selectors present" matching; updated in place.
///
/// Matching walks only the entries that share at least one selector with the caller, so its cost
/// grows with the caller's selectors and their posting lists, not with the number of entries.
#[derive(Debug)]
pub struct EntryIndex {
    /// Entries by slot; `None` slots are free (listed in `free`).
    slots: Vec<Option<Arc<Entry>>>,
    free: Vec<u32>,
    /// Keyed by the entry's own id (an `Arc<str>` clone: no second copy of the text).
    by_id: HashMap<EntryId, u32>,
    /// The slots of the entries holding each selector. Most selectors (a path, a unit) belong
    /// to one entry, which needs no list of its own.
    by_selector: HashMap<Selector, Posting>,
    /// How many entries use each `type:key`.
    kind_keys: HashMap<String, usize>,
    /// What attestation must gather, kept up to date as `type:key`s come and go, so that every
    /// stream shares one copy.
    needs: Needs,
    revision: u64,
}

/// The slots of the entries that hold one selector.
#[derive(Debug)]
enum Posting {
    One(u32),
    /// Boxed so that the common `One` keeps the map's values at 16 bytes, not 32: with
    /// 100,000 entries most selectors are in this map once, shared ones are few.
    #[allow(clippy::box_collection, reason = "keeps the common variant small")]
    Many(Box<Vec<u32>>),
}

impl Posting {
    fn slots(&self) -> &[u32] {
        match self {
            Self::One(slot) => std::slice::from_ref(slot),
            Self::Many(slots) => slots,
        }
    }

    fn push(&mut self, slot: u32) {
        match self {
            Self::One(first) => *self = Self::Many(Box::new(vec![*first, slot])),
            Self::Many(slots) => slots.push(slot),
        }
    }

    /// Removes `slot`; returns whether the list is now empty.
    fn remove(&mut self, slot: u32) -> bool {
        match self {
            Self::One(only) => *only == slot,
            Self::Many(slots) => {
                if let Some(pos) = slots.iter().position(|&x| x == slot) {
                    slots.swap_remove(pos);
                }
                if let [last] = slots.as_slice() {
                    *self = Self::One(*last);
                }
                false
            }
        }
    }
}

impl EntryIndex {
    /// An empty index at revision 0.
    pub fn new() -> Self {
        let kind_keys = HashMap::new();
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            by_selector: HashMap::new(),
            needs: Self::needs_of(&kind_keys),
            kind_keys,
            revision: 0,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The entry with this id.
    pub fn get(&self, id: &EntryId) -> Option<&Arc<Entry>> {
        let slot = *self.by_id.get(id)?;
        self.slots.get(slot as usize)?.as_ref()
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.slots.iter().flatten()
    }

    /// A number that grows with every published change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The selector types attestation must gather so that every entry can be matched.
    ///
    /// Always includes `unix:uid` and `unix:gid`, which come with every caller's credentials.
    pub fn needs(&self) -> Needs {
        self.needs.clone()
    }

    fn needs_of(kind_keys: &HashMap<String, usize>) -> Needs {
        kind_keys
            .keys()
            .map(String::as_str)
            .chain(["unix:uid", "unix:gid"])
            .map(str::to_owned)
            .collect()
    }

    /// Whether any entry uses a selector of this `type:key` (e.g. `unix:sha256`).
    pub fn uses_kind_key(&self, kind_key: &str) -> bool {
        self.kind_keys.contains_key(kind_key)
    }

    /// Adds `entry`, or replaces the entry with its id; returns the one replaced.
    pub fn upsert(&mut self, entry: Arc<Entry>) -> Option<Arc<Entry>> {
        let old = self.remove(&entry.id);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        for s in &entry.selectors {
            match self.by_selector.get_mut(s) {
                Some(posting) => posting.push(slot),
                None => {
                    self.by_selector.insert(s.clone(), Posting::One(slot));
                }
            }
            self.count_kind_key(s);
        }
        self.by_id.insert(entry.id.clone(), slot);
        if let Some(place) = self.slots.get_mut(slot as usize) {
            *place = Some(entry);
        }
        old
    }

    /// Removes the entry with this id; returns it.
    pub fn remove(&mut self, id: &EntryId) -> Option<Arc<Entry>> {
        let slot = self.by_id.remove(id)?;
        let entry = self.slots.get_mut(slot as usize)?.take()?;
        for s in &entry.selectors {
            if self.by_selector.get_mut(s).is_some_and(|p| p.remove(slot)) {
                self.by_selector.remove(s);
            }
            if let Some(n) = self.kind_key_count(s) {
                *n -= 1;
                if *n == 0 {
                    self.kind_keys.remove(&s.kind_key());
                    self.needs = Self::needs_of(&self.kind_keys);
                }
            }
        }
        self.free.push(slot);
        Some(entry)
    }

    /// Makes `entry`'s selectors share the text of equal selectors already indexed, so that
    /// 100,000 entries keyed on a few hundred uids hold a few hundred selector strings.
    pub fn intern(&self, entry: &mut Entry) {
        for s in &mut entry.selectors {
            if let Some((shared, _)) = self.by_selector.get_key_value(s) {
                *s = shared.clone();
            }
        }
    }

    /// Counts one more use of the selector's `type:key`, allocating its key only the first time.
    fn count_kind_key(&mut self, s: &Selector) {
        match self.kind_key_count(s) {
            Some(n) => *n += 1,
            None => {
                self.kind_keys.insert(s.kind_key(), 1);
                self.needs = Self::needs_of(&self.kind_keys);
            }
        }
    }

    /// The use count of the selector's `type:key`, found without building the key: there are
    /// only a handful (one per selector kind the entries use), and this runs per selector of
    /// every upsert and removal.
    fn kind_key_count(&mut self, s: &Selector) -> Option<&mut usize> {
        let (kind, key) = (s.kind(), s.key());
        self.kind_keys
            .iter_mut()
            .find(|(k, _)| {
                k.len() == kind.len() + 1 + key.len()
                    && k.starts_with(kind)
                    && k.ends_with(key)
                    && k.as_bytes().get(kind.len()) == Some(&b':')
            })
            .map(|(_, n)| n)
    }

    /// Every entry whose selectors are all among `selectors`, ordered by entry id, with duplicate
    /// non-empty hints removed (the first entry by id keeps its hint's identity).
    pub fn matching(&self, selectors: &Selectors) -> Vec<Arc<Entry>> {
        let mut hits: HashMap<u32, usize> = HashMap::new();
        for s in selectors.iter() {
            if let Some(posting) = self.by_selector.get(s) {
                for &i in posting.slots() {
                    *hits.entry(i).or_default() += 1;
                }
            }
        }
        let mut matched: Vec<&Arc<Entry>> = hits
            .into_iter()
            .filter_map(|(i, n)| {
                // An entry's selectors are unique, so n counts distinct matches.
                let e = self.slots.get(i as usize)?.as_ref()?;
                (e.selectors.len() == n).then_some(e)
            })
            .collect();
        matched.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        // Hints are borrowed from the index: matching runs per request and allocates no copy.
        let mut seen_hints: HashSet<&str> = HashSet::new();
        matched
            .into_iter()
            .filter(|e| match e.hint.as_deref() {
                Some(h) if !h.is_empty() => seen_hints.insert(h),
                _ => true,
            })
            .cloned()
            .collect()
    }
}

impl Default for EntryIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// One changed entry: what was there before and what is there now.
#[derive(Debug, Clone)]
pub struct EntryChange {
    /// The entry before (`None`: added).
    pub old: Option<Arc<Entry>>,
    /// The entry now (`None`: removed).
    pub new: Option<Arc<Entry>>,
}

impl EntryChange {
    /// Whether a caller with `selectors` matched the entry before or matches it now: only such
    /// callers can see a different answer because of this change.
    pub fn concerns(&self, selectors: &Selectors) -> bool {
        [&self.old, &self.new]
            .into_iter()
            .flatten()
            .any(|e| selectors.contains_all(&e.selectors))
    }

    /// The entry's id.
    pub fn id(&self) -> Option<&EntryId> {
        self.new.as_ref().or(self.old.as_ref()).map(|e| &e.id)
    }
}

/// What one publish changed, at `revision` (the index's revision after it).
#[derive(Debug, Clone, Default)]
pub struct EntryEvent {
    /// The index revision after this change.
    pub revision: u64,
    /// The entries changed, added or removed.
    pub changes: Vec<EntryChange>,
}

impl EntryEvent {
    /// Whether a reader that saw `seen` can judge by this event alone (it follows directly);
    /// otherwise it missed events and must re-match from the index.
    pub fn follows(&self, seen: u64) -> bool {
        self.revision == seen + 1
    }
}

#[derive(Debug)]
struct Live {
    index: RwLock<EntryIndex>,
}

impl Live {
    fn read(&self) -> RwLockReadGuard<'_, EntryIndex> {
        // Every update leaves the index consistent before it can panic (it only allocates).
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, EntryIndex> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writing end: applies changes to the index and publishes them. Dropping it ends every
/// feed (open Workload API streams end: that is how the agent stops them).
#[derive(Debug)]
pub struct EntryPublisher {
    live: Arc<Live>,
    tx: watch::Sender<Arc<EntryEvent>>,
}

impl EntryPublisher {
    /// Starts with `entries` (already checked) at revision 1.
    pub fn new(entries: impl IntoIterator<Item = Entry>) -> Self {
        let mut index = EntryIndex::new();
        for mut e in entries {
            index.intern(&mut e);
            index.upsert(Arc::new(e));
        }
        index.revision = 1;
        let (tx, _) = watch::channel(Arc::new(EntryEvent {
            revision: 1,
            changes: vec![],
        }));
        Self {
            live: Arc::new(Live {
                index: RwLock::new(index),
            }),
            tx,
        }
    }

    /// Adds or replaces `upserts` and removes `removes`, in one published change; entries that
    /// are already there unchanged are left out of it. Returns the event (`None` if nothing
    /// changed: nothing is published then).
    pub fn apply(
        &self,
        upserts: impl IntoIterator<Item = Entry>,
        removes: impl IntoIterator<Item = EntryId>,
    ) -> Option<Arc<EntryEvent>> {
        let mut index = self.live.write();
        let mut changes = Vec::new();
        for id in removes {
            if let Some(old) = index.remove(&id) {
                changes.push(EntryChange {
                    old: Some(old),
                    new: None,
                });
            }
        }
        for mut e in upserts {
            if index.get(&e.id).is_some_and(|old| **old == e) {
                continue;
            }
            index.intern(&mut e);
            let new = Arc::new(e);
            let old = index.upsert(new.clone());
            changes.push(EntryChange {
                old,
                new: Some(new),
            });
        }
        if changes.is_empty() {
            return None;
        }
        index.revision += 1;
        let event = Arc::new(EntryEvent {
            revision: index.revision,
            changes,
        });
        // Sent while the write lock is held, so events go out in revision order and a reader
        // that sees an event finds the index at least that new.
        self.tx.send_replace(event.clone());
        Some(event)
    }

    /// Makes the entries whose ids satisfy `owned` exactly `entries` (a source replacing all of
    /// its own, as a config reload does), publishing only the difference.
    pub fn replace_where(
        &self,
        owned: impl Fn(&EntryId) -> bool,
        entries: Vec<Entry>,
    ) -> Option<Arc<EntryEvent>> {
        let keep: HashSet<&EntryId> = entries.iter().map(|e| &e.id).collect();
        let removes: Vec<EntryId> = self
            .live
            .read()
            .iter()
            .filter(|e| owned(&e.id) && !keep.contains(&e.id))
            .map(|e| e.id.clone())
            .collect();
        self.apply(entries, removes)
    }

    /// A reader of the index and its changes.
    pub fn feed(&self) -> EntryFeed {
        EntryFeed {
            live: self.live.clone(),
            rx: self.tx.subscribe(),
        }
    }
}

/// The reading end: the index under a short read lock, and the published changes.
#[derive(Debug, Clone)]
pub struct EntryFeed {
    live: Arc<Live>,
    rx: watch::Receiver<Arc<EntryEvent>>,
}

impl EntryFeed {
    /// The index, read-locked: hold the guard briefly (never across an `.await`).
    pub fn read(&self) -> RwLockReadGuard<'_, EntryIndex> {
        self.live.read()
    }

    /// Every entry matching `selectors` now (see [`EntryIndex::matching`]).
    pub fn matching(&self, selectors: &Selectors) -> Vec<Arc<Entry>> {
        self.read().matching(selectors)
    }

    /// What attestation must gather now.
    pub fn needs(&self) -> Needs {
        self.read().needs()
    }

    /// The latest event, marking it seen.
    pub fn latest(&mut self) -> Arc<EntryEvent> {
        self.rx.borrow_and_update().clone()
    }

    /// Waits for the next published change; `None` once the publisher is gone (the agent stops).
    pub async fn changed(&mut self) -> Option<Arc<EntryEvent>> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, spiffe: &str, sels: &[&str], hint: Option<&str>) -> Entry {
        let mut selectors: Vec<Selector> = sels.iter().map(|s| s.parse().unwrap()).collect();
        selectors.sort();
        selectors.dedup();
        Entry {
            id: EntryId::new(id),
            spiffe_id: spiffe.parse().unwrap(),
            selectors,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: hint.map(str::to_owned),
            dns_names: vec![],
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
        }
    }

    fn sels(s: &[&str]) -> Selectors {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ids(v: &[Arc<Entry>]) -> Vec<String> {
        v.iter().map(|e| e.id.to_string()).collect()
    }

    #[test]
    fn matches_subsets_in_id_order() {
        let p = EntryPublisher::new([
            entry("b", "spiffe://td/b", &["unix:uid:1", "unix:gid:1"], None),
            entry("a", "spiffe://td/a", &["unix:uid:1"], None),
            entry("c", "spiffe://td/c", &["unix:uid:2"], None),
        ]);
        let f = p.feed();
        assert_eq!(
            ids(&f.matching(&sels(&["unix:uid:1", "unix:gid:1"]))),
            ["a", "b"]
        );
        assert_eq!(
            ids(&f.matching(&sels(&["unix:uid:1", "unix:gid:2"]))),
            ["a"]
        );
        assert!(f.matching(&sels(&["unix:uid:3"])).is_empty());
        assert!(f.read().uses_kind_key("unix:gid"));
        assert!(!f.read().uses_kind_key("unix:sha256"));
    }

    #[test]
    fn duplicate_hints_keep_first_by_id() {
        let p = EntryPublisher::new([
            entry("2", "spiffe://td/two", &["unix:uid:1"], Some("internal")),
            entry("1", "spiffe://td/one", &["unix:uid:1"], Some("internal")),
            entry("3", "spiffe://td/three", &["unix:uid:1"], Some("")),
            entry("4", "spiffe://td/four", &["unix:uid:1"], Some("")),
        ]);
        let got: Vec<_> = p
            .feed()
            .matching(&sels(&["unix:uid:1"]))
            .iter()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        assert_eq!(
            got,
            ["spiffe://td/one", "spiffe://td/three", "spiffe://td/four"]
        );
    }

    #[test]
    fn updates_change_the_index_in_place_and_keep_needs_counted() {
        let p = EntryPublisher::new([entry("a", "spiffe://td/a", &["unix:uid:1"], None)]);
        let f = p.feed();
        let ev = p
            .apply(
                [entry(
                    "b",
                    "spiffe://td/b",
                    &["unix:uid:1", "unix:path:/x"],
                    None,
                )],
                [],
            )
            .unwrap();
        assert_eq!(ev.revision, 2);
        assert!(f.needs().wants("unix:path"));
        // The credentials' types are always gathered, so callers attested for these needs
        // cover them whatever the entries use.
        assert!(f.needs().wants("unix:uid") && f.needs().wants("unix:gid"));
        assert_eq!(
            ids(&f.matching(&sels(&["unix:uid:1", "unix:path:/x"]))),
            ["a", "b"]
        );
        // An identical upsert changes nothing and publishes nothing.
        assert!(
            p.apply([entry("a", "spiffe://td/a", &["unix:uid:1"], None)], [])
                .is_none()
        );
        // Changing b's selectors moves it in the index; the old posting is gone.
        p.apply([entry("b", "spiffe://td/b", &["unix:uid:2"], None)], []);
        assert!(!f.needs().wants("unix:path"));
        assert_eq!(
            ids(&f.matching(&sels(&["unix:uid:1", "unix:path:/x"]))),
            ["a"]
        );
        assert_eq!(ids(&f.matching(&sels(&["unix:uid:2"]))), ["b"]);
        // Removal frees the slot, and a new entry reuses it.
        let ev = p.apply([], [EntryId::new("a")]).unwrap();
        assert!(ev.changes[0].new.is_none());
        assert!(f.matching(&sels(&["unix:uid:1"])).is_empty());
        p.apply([entry("c", "spiffe://td/c", &["unix:uid:1"], None)], []);
        assert_eq!(f.read().len(), 2);
        assert_eq!(ids(&f.matching(&sels(&["unix:uid:1"]))), ["c"]);
    }

    #[test]
    fn equal_selectors_share_one_text() {
        let p = EntryPublisher::new([
            entry("a", "spiffe://td/a", &["unix:uid:1", "unix:path:/a"], None),
            entry("b", "spiffe://td/b", &["unix:uid:1", "unix:path:/b"], None),
        ]);
        p.apply([entry("c", "spiffe://td/c", &["unix:uid:1"], None)], []);
        let f = p.feed();
        let index = f.read();
        let uid = |id: &str| {
            let e = index.get(&EntryId::new(id)).unwrap();
            let s = e.selectors.iter().find(|s| s.key() == "uid").unwrap();
            s.as_str().as_ptr()
        };
        assert_eq!(uid("a"), uid("b"));
        assert_eq!(uid("a"), uid("c"));
    }

    #[test]
    fn a_change_concerns_only_callers_that_matched_before_or_after() {
        let p = EntryPublisher::new([entry("a", "spiffe://td/a", &["unix:uid:1"], None)]);
        let ev = p
            .apply([entry("a", "spiffe://td/a", &["unix:uid:2"], None)], [])
            .unwrap();
        let c = &ev.changes[0];
        assert!(c.concerns(&sels(&["unix:uid:1"])));
        assert!(c.concerns(&sels(&["unix:uid:2", "unix:gid:9"])));
        assert!(!c.concerns(&sels(&["unix:uid:3"])));
    }

    #[test]
    fn replace_where_publishes_only_the_difference() {
        let p = EntryPublisher::new([
            entry("config-1", "spiffe://td/a", &["unix:uid:1"], None),
            entry("config-2", "spiffe://td/b", &["unix:uid:2"], None),
            entry("stored-1", "spiffe://td/c", &["unix:uid:3"], None),
        ]);
        let ev = p
            .replace_where(
                |id| id.as_str().starts_with("config-"),
                vec![
                    entry("config-1", "spiffe://td/a", &["unix:uid:1"], None),
                    entry("config-3", "spiffe://td/d", &["unix:uid:4"], None),
                ],
            )
            .unwrap();
        let mut changed: Vec<_> = ev.changes.iter().filter_map(|c| c.id()).cloned().collect();
        changed.sort();
        assert_eq!(
            changed,
            [EntryId::new("config-2"), EntryId::new("config-3")]
        );
        assert_eq!(p.feed().read().len(), 3);
    }

    #[tokio::test]
    async fn feeds_learn_each_change_and_end_with_the_publisher() {
        let p = EntryPublisher::new([]);
        let mut f = p.feed();
        assert_eq!(f.latest().revision, 1);
        p.apply([entry("a", "spiffe://td/a", &["unix:uid:1"], None)], []);
        let ev = f.changed().await.unwrap();
        assert!(ev.follows(1));
        p.apply([entry("b", "spiffe://td/b", &["unix:uid:1"], None)], []);
        p.apply([entry("c", "spiffe://td/c", &["unix:uid:1"], None)], []);
        // Two events while it slept: the latest does not follow, so the reader re-matches.
        let ev = f.changed().await.unwrap();
        assert!(!ev.follows(2) && ev.revision == 4);
        drop(p);
        assert!(f.changed().await.is_none());
    }
}
