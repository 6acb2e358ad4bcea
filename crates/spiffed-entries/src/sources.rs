//! The merge of every entry source into one live index, changed by what changed.
//!
//! [`EntrySources`] owns the [`EntryPublisher`] (the index every Workload API stream reads), the
//! SQLite [`Store`] (entries written through the admin API) and the in-memory sources: the
//! config file's entries, and later others such as a SPIRE Server sync. Each source owns the
//! entry ids that start with its [`Owner`] prefix (`config-`, `entry-`, ...), so the merge never
//! has to ask who an entry belongs to.
//!
//! Every write is incremental: an admin create publishes the new entries, an update the one
//! entry, a delete the removed ids, a config reload the difference between the old and new
//! config entries. Nothing re-lists the store or rebuilds the index. Writes are serialized (one
//! lock over the store commit and the publish), so events go out in commit order.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use spiffed_core::{
    Entry, EntryError, EntryEvent, EntryFeed, EntryId, EntryLimits, EntryPublisher, EntryRules,
    SelectorCheck, TrustDomain,
};

use crate::store::{EntrySpec, Filter, Store, StoreError, StoredEntry};

/// Entries applied to the index per publish while the store loads at start-up.
const LOAD_BATCH: usize = 1000;

/// A source's claim on entry ids: every id starting with `prefix` is its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    name: &'static str,
    prefix: &'static str,
}

impl Owner {
    /// The config file's entries: `config-` and 16 hex digits (see [`config_entry_id`]).
    pub const CONFIG: Self = Self::new("config", "config-");
    /// The SQLite store's entries: `entry-` and 32 hex digits.
    pub const STORE: Self = Self::new("store", "entry-");

    /// A source named `name` (shown as an entry's `source` by the admin API) owning the ids
    /// that start with `prefix`.
    pub const fn new(name: &'static str, prefix: &'static str) -> Self {
        Self { name, prefix }
    }

    /// The source's name, e.g. `config`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The id prefix, e.g. `config-`.
    pub fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// Whether `id` belongs to this source.
    pub fn owns(&self, id: &EntryId) -> bool {
        id.as_str().starts_with(self.prefix)
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.name == other.name
            || self.prefix.starts_with(other.prefix)
            || other.prefix.starts_with(self.prefix)
    }
}

/// The id of a config-file entry: `config-` and 16 hex digits of SHA-256 over its SPIFFE ID and
/// its sorted selectors, so that it does not change when other entries are added or moved.
/// (Two entries with the same SPIFFE ID and selectors are refused as duplicates.)
pub fn config_entry_id(
    spiffe_id: &spiffed_core::SpiffeId,
    selectors: &[spiffed_core::Selector],
) -> EntryId {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(spiffe_id.to_string().as_bytes());
    for s in selectors {
        ctx.update(b"\n");
        ctx.update(s.as_str().as_bytes());
    }
    let digest = ctx.finish();
    let mut id = String::with_capacity(7 + 16);
    id.push_str(Owner::CONFIG.prefix);
    for b in digest.as_ref().iter().take(8) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    EntryId::new(id)
}

/// What every entry a source accepts is checked against (owned form of [`EntryRules`]).
#[derive(Clone)]
pub struct Rules {
    /// The agent's trust domain.
    pub trust_domain: TrustDomain,
    /// `max_selectors_per_entry`, `max_dns_names_per_entry`, `min_svid_ttl`, `ca_ttl`.
    pub limits: EntryLimits,
    /// The attestor plugins, which own the selector types.
    pub selectors: Arc<dyn SelectorCheck>,
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("trust_domain", &self.trust_domain)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Rules {
    /// The borrowed form that [`Entry::checked`] takes.
    pub fn entry_rules(&self) -> EntryRules<'_> {
        EntryRules {
            trust_domain: &self.trust_domain,
            limits: self.limits,
            selectors: self.selectors.as_ref(),
        }
    }

    /// Runs `entry` through the one validating constructor.
    pub fn check(&self, entry: Entry) -> Result<Entry, EntryError> {
        entry.checked(&self.entry_rules())
    }

    /// Checks an operator's spec as the entry it would become: selectors sorted, duplicates
    /// removed, every rule of [`Entry::checked`] met.
    pub fn check_spec(&self, spec: EntrySpec) -> Result<EntrySpec, EntryError> {
        let admin = spec.admin;
        if let Some(own) = spec
            .federates_with
            .iter()
            .find(|t| **t == self.trust_domain)
        {
            return Err(EntryError::FederatesWithOwn(own.to_string()));
        }
        let entry = self.check(Entry {
            id: EntryId::new(Owner::STORE.prefix),
            spiffe_id: spec.spiffe_id,
            selectors: spec.selectors,
            x509_svid_ttl: spec.x509_svid_ttl,
            jwt_svid_ttl: spec.jwt_svid_ttl,
            hint: spec.hint,
            dns_names: spec.dns_names,
            federates_with: spec.federates_with,
            admin: false,
            downstream: false,
        })?;
        Ok(EntrySpec {
            spiffe_id: entry.spiffe_id,
            selectors: entry.selectors,
            x509_svid_ttl: entry.x509_svid_ttl,
            jwt_svid_ttl: entry.jwt_svid_ttl,
            hint: entry.hint,
            dns_names: entry.dns_names,
            admin,
            federates_with: entry.federates_with,
        })
    }
}

/// Why a source refused a change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The store failed or refused (not found, revision conflict, duplicate, I/O).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The entry breaks a rule; [`EntryError::field`] names the field.
    #[error(transparent)]
    Invalid(#[from] EntryError),
    /// An entry of an in-memory source (a config reload, a sync) breaks a rule.
    #[error("entry {id}: {error}")]
    InvalidEntry {
        /// The entry.
        id: EntryId,
        /// The rule it breaks.
        error: EntryError,
    },
    /// The entry belongs to a source that the admin API cannot change.
    #[error("entry {id} comes from {origin}; {how_to_change}")]
    NotWritable {
        /// The entry.
        id: EntryId,
        /// Where it comes from, e.g. "the config file /etc/spiffed/config.toml".
        origin: String,
        /// What to do instead, e.g. "edit the file and send SIGHUP to the agent".
        how_to_change: String,
    },
    /// An entry of another source already has this SPIFFE ID and these selectors.
    #[error(
        "an entry with this SPIFFE ID and these selectors already exists ({existing}, from \
         {origin})"
    )]
    DuplicateOf {
        /// The entry that is already there.
        existing: EntryId,
        /// Where it comes from.
        origin: String,
    },
    /// A source offered an entry whose id it does not own.
    #[error("entry id {id} does not start with {prefix:?}, the prefix of the {source_name} source")]
    ForeignId {
        /// The id.
        id: EntryId,
        /// The source's name.
        source_name: &'static str,
        /// The source's prefix.
        prefix: &'static str,
    },
    /// Two sources would own the same ids.
    #[error("entry source {name:?} (ids {prefix}...) overlaps an existing source")]
    Overlap {
        /// The new source's name.
        name: &'static str,
        /// Its prefix.
        prefix: &'static str,
    },
    /// The store answered a batch with fewer results than it was given (a bug).
    #[error(
        "the entry store returned fewer results than entries submitted; list the entries to \
         see which were created, and report this"
    )]
    MissingResult,
    /// The agent is shutting down; nothing is published any more.
    #[error("the agent is shutting down; entries are no longer changed")]
    Closed,
    /// Entries are managed elsewhere (agent mode: on the SPIRE Server); the admin API only
    /// reads them.
    #[error("entries come from {origin}; {how_to_change}")]
    ReadOnly {
        /// Where they come from, e.g. "the SPIRE Server 127.0.0.1:8081".
        origin: String,
        /// What to do instead, e.g. "use `spire-server entry create`".
        how_to_change: String,
    },
}

/// One entry as the admin API lists it, with where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listed {
    /// From an in-memory source (the config file, a sync).
    Memory {
        /// The source.
        owner: Owner,
        /// The entry, shared with the index.
        entry: Arc<Entry>,
    },
    /// From the store, with its revision and times (boxed: it is much larger than the other
    /// variant).
    Stored(Box<StoredEntry>),
}

impl Listed {
    /// The entry.
    pub fn entry(&self) -> &Entry {
        match self {
            Self::Memory { entry, .. } => entry,
            Self::Stored(s) => &s.entry,
        }
    }

    /// The entry's id.
    pub fn id(&self) -> &EntryId {
        &self.entry().id
    }

    /// The source's name: `config`, `store`, ...
    pub fn source(&self) -> &'static str {
        match self {
            Self::Memory { owner, .. } => owner.name,
            Self::Stored(_) => Owner::STORE.name,
        }
    }

    /// The store's bookkeeping (revision, times, admin flag), for stored entries.
    pub fn stored(&self) -> Option<&StoredEntry> {
        match self {
            Self::Stored(s) => Some(s),
            Self::Memory { .. } => None,
        }
    }
}

/// One page of [`EntrySources::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// The entries, in id order.
    pub entries: Vec<Listed>,
    /// The id to pass as `after` for the next page; `None` on the last page.
    pub next: Option<EntryId>,
}

/// What start-up loaded from the store.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Stored entries now in the index.
    pub entries: usize,
    /// Stored entries left out of the index because they break a rule of this configuration
    /// (e.g. `max_selectors_per_entry` was lowered, or a selector type is no longer served):
    /// they stay in the store, listed, until an operator updates or deletes them. The agent
    /// should log each with that fix.
    pub refused: Vec<(EntryId, EntryError)>,
}

/// An in-memory source's entries (the config file's, a sync's).
#[derive(Debug)]
struct MemorySource {
    owner: Owner,
    origin: String,
    how_to_change: String,
    /// Shared with the index: the `Arc`s are the ones the index holds.
    entries: BTreeMap<EntryId, Arc<Entry>>,
}

impl MemorySource {
    fn refuse(&self, id: &EntryId) -> SourceError {
        SourceError::NotWritable {
            id: id.clone(),
            origin: self.origin.clone(),
            how_to_change: self.how_to_change.clone(),
        }
    }
}

struct Inner {
    /// `None` in agent mode ([`EntrySources::synced`]): every entry comes from the sync.
    store: Option<Store>,
    rules: Rules,
    feed: EntryFeed,
    /// Held across every store commit and its publish, so events go out in commit order.
    /// `None` once closed.
    writer: Mutex<Option<EntryPublisher>>,
    /// Taken after `writer` when both are needed.
    memory: RwLock<Vec<MemorySource>>,
}

/// Every entry source merged into one live index; cheap to clone (all clones share it).
///
/// Call [`close`](Self::close) at shutdown: it drops the publisher, which ends every
/// [`EntryFeed`] (open Workload API streams end).
#[derive(Clone)]
pub struct EntrySources {
    inner: Arc<Inner>,
}

impl fmt::Debug for EntrySources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntrySources")
            .field("store", &self.inner.store.as_ref().map(Store::path))
            .field("rules", &self.inner.rules)
            .finish_non_exhaustive()
    }
}

/// The config file's entries and where they come from.
#[derive(Clone, Debug, Default)]
pub struct ConfigEntries {
    /// The entries (ids from [`config_entry_id`]).
    pub entries: Vec<Entry>,
    /// The config file, named when the admin API refuses to change its entries.
    pub file: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EntrySources {
    /// Loads the store once (row by row into the index) and the config file's entries, each
    /// checked against `rules`. A config entry that breaks a rule fails the start; a stored one
    /// is left out and reported in [`Loaded::refused`].
    pub fn open(
        store: Store,
        config: ConfigEntries,
        rules: Rules,
    ) -> Result<(Self, Loaded), SourceError> {
        let config_entries = check_all(&rules, Owner::CONFIG, config.entries)?;
        let publisher = EntryPublisher::new([]);
        let mut loaded = Loaded::default();
        let mut batch = Vec::with_capacity(LOAD_BATCH);
        store.scan(|stored| {
            let id = stored.entry.id.clone();
            match rules.check(stored.entry) {
                Ok(entry) => {
                    batch.push(entry);
                    loaded.entries += 1;
                }
                Err(error) => loaded.refused.push((id, error)),
            }
            if batch.len() >= LOAD_BATCH {
                publisher.apply(batch.drain(..), []);
            }
        })?;
        publisher.apply(batch, []);
        let memory = MemorySource {
            owner: Owner::CONFIG,
            origin: format!(
                "the config file{}",
                config.file.map(|f| format!(" {f}")).unwrap_or_default()
            ),
            how_to_change: "edit the file and send SIGHUP to the agent".to_owned(),
            entries: BTreeMap::new(),
        };
        let sources = Self {
            inner: Arc::new(Inner {
                store: Some(store),
                rules,
                feed: publisher.feed(),
                writer: Mutex::new(Some(publisher)),
                memory: RwLock::new(vec![memory]),
            }),
        };
        sources.replace_checked(Owner::CONFIG, config_entries)?;
        Ok((sources, loaded))
    }

    /// A reader of the index and its changes (for the Workload API, explain, attestation).
    pub fn feed(&self) -> EntryFeed {
        self.inner.feed.clone()
    }

    /// The rules every entry is checked against.
    pub fn rules(&self) -> &Rules {
        &self.inner.rules
    }

    /// The store; `None` in agent mode ([`EntrySources::synced`]).
    pub fn store(&self) -> Option<&Store> {
        self.inner.store.as_ref()
    }

    /// Entry sources with no store and no config file: one in-memory source (a SPIRE Server
    /// sync, agent mode) owns every entry id, and the admin API's create, update and delete
    /// are refused with `origin` and `how_to_change`. Returns the sources and the sync's
    /// writing end. The sync should check each entry with [`Rules::check`] first and leave
    /// out (and log) the ones that fail, since [`SourceHandle::apply`] refuses a whole batch
    /// for one bad entry.
    pub fn synced(
        rules: Rules,
        name: &'static str,
        origin: impl Into<String>,
        how_to_change: impl Into<String>,
    ) -> (Self, SourceHandle) {
        let publisher = EntryPublisher::new([]);
        let owner = Owner::new(name, "");
        let sources = Self {
            inner: Arc::new(Inner {
                store: None,
                rules,
                feed: publisher.feed(),
                writer: Mutex::new(Some(publisher)),
                memory: RwLock::new(vec![MemorySource {
                    owner,
                    origin: origin.into(),
                    how_to_change: how_to_change.into(),
                    entries: BTreeMap::new(),
                }]),
            }),
        };
        let handle = SourceHandle {
            sources: sources.clone(),
            owner,
        };
        (sources, handle)
    }

    /// The store, or the refusal of the in-memory source that owns every id (agent mode).
    fn writable_store(&self) -> Result<&Store, SourceError> {
        match &self.inner.store {
            Some(store) => Ok(store),
            None => Err(self
                .memory()
                .first()
                .map(|m| SourceError::ReadOnly {
                    origin: m.origin.clone(),
                    how_to_change: m.how_to_change.clone(),
                })
                .unwrap_or(SourceError::Closed)),
        }
    }

    /// The name of the source that owns `id` (`config`, `store`, ...), if any does.
    pub fn source_of(&self, id: &EntryId) -> Option<&'static str> {
        if self.inner.store.is_some() && Owner::STORE.owns(id) {
            return Some(Owner::STORE.name);
        }
        self.memory()
            .iter()
            .find(|m| m.owner.owns(id))
            .map(|m| m.owner.name)
    }

    /// Ends every feed (open streams end); later writes fail with [`SourceError::Closed`].
    pub fn close(&self) {
        drop(lock(&self.inner.writer).take());
    }

    /// Creates one stored entry per spec, checking each with [`Rules::check_spec`] and
    /// refusing a duplicate of an in-memory entry; one result per spec, in order. The created
    /// entries are published in one event. The outer error means nothing was written.
    pub fn create(
        &self,
        specs: Vec<EntrySpec>,
    ) -> Result<Vec<Result<StoredEntry, SourceError>>, SourceError> {
        let writer = self.writer()?;
        let publisher = writer.as_ref().ok_or(SourceError::Closed)?;
        let store = self.writable_store()?;
        let mut results: Vec<Option<SourceError>> = Vec::with_capacity(specs.len());
        let mut valid = Vec::with_capacity(specs.len());
        for spec in specs {
            match self.check_spec(spec) {
                Ok(spec) => {
                    valid.push(spec);
                    results.push(None);
                }
                Err(e) => results.push(Some(e)),
            }
        }
        let mut stored = store.create(valid)?.into_iter();
        let out: Vec<Result<StoredEntry, SourceError>> = results
            .into_iter()
            .map(|refused| match refused {
                Some(e) => Err(e),
                None => stored
                    .next()
                    .ok_or(SourceError::MissingResult)?
                    .map_err(SourceError::from),
            })
            .collect();
        publisher.apply(
            out.iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|s| s.entry.clone()),
            [],
        );
        Ok(out)
    }

    /// Replaces the stored entry `id` (at `expected_revision`) with `spec` and publishes it.
    pub fn update(
        &self,
        id: &EntryId,
        expected_revision: u64,
        spec: EntrySpec,
    ) -> Result<StoredEntry, SourceError> {
        let writer = self.writer()?;
        let publisher = writer.as_ref().ok_or(SourceError::Closed)?;
        if let Some(m) = self.memory().iter().find(|m| m.owner.owns(id)) {
            return Err(m.refuse(id));
        }
        let spec = self.check_spec(spec)?;
        let stored = self.writable_store()?.update(id, expected_revision, spec)?;
        publisher.apply([stored.entry.clone()], []);
        Ok(stored)
    }

    /// Deletes stored entries; one result per id, in order. The removals are published in one
    /// event. The outer error means nothing was deleted.
    pub fn delete(&self, ids: &[EntryId]) -> Result<Vec<Result<(), SourceError>>, SourceError> {
        let writer = self.writer()?;
        let publisher = writer.as_ref().ok_or(SourceError::Closed)?;
        let mut out: Vec<Option<Result<(), SourceError>>> = Vec::with_capacity(ids.len());
        let mut to_delete = Vec::new();
        {
            let memory = self.memory();
            for id in ids {
                match memory.iter().find(|m| m.owner.owns(id)) {
                    Some(m) => out.push(Some(Err(m.refuse(id)))),
                    None => {
                        to_delete.push(id.clone());
                        out.push(None);
                    }
                }
            }
        }
        let mut results = if to_delete.is_empty() {
            Vec::new().into_iter()
        } else {
            self.writable_store()?.delete(&to_delete)?.into_iter()
        };
        let mut deleted = Vec::new();
        let out = out
            .into_iter()
            .zip(ids)
            .map(|(slot, id)| match slot {
                Some(r) => r,
                None => {
                    let r = results
                        .next()
                        .unwrap_or(Err(StoreError::NotFound(id.clone())));
                    if r.is_ok() {
                        deleted.push(id.clone());
                    }
                    r.map_err(SourceError::from)
                }
            })
            .collect();
        publisher.apply([], deleted);
        Ok(out)
    }

    /// The entry with this id, from whichever source owns it.
    pub fn get(&self, id: &EntryId) -> Result<Option<Listed>, SourceError> {
        if let Some(m) = self.memory().iter().find(|m| m.owner.owns(id)) {
            return Ok(m.entries.get(id).map(|e| Listed::Memory {
                owner: m.owner,
                entry: e.clone(),
            }));
        }
        match &self.inner.store {
            Some(store) => Ok(store.get(id)?.map(|s| Listed::Stored(Box::new(s)))),
            None => Ok(None),
        }
    }

    /// Up to `limit` entries (at least 1) after `after` in id order, from every source, that
    /// pass `filter`. Costs O(`limit`) per source: the store pages through an index, and each
    /// in-memory source walks its sorted entries from `after`.
    pub fn list(
        &self,
        after: Option<&EntryId>,
        limit: usize,
        filter: &Filter,
    ) -> Result<Page, SourceError> {
        let limit = limit.max(1);
        let want = limit.saturating_add(1);
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut entries: Vec<Listed> = Vec::new();
        for m in self.memory().iter() {
            entries.extend(
                m.entries
                    .range::<EntryId, _>((from, Bound::Unbounded))
                    .filter(|(_, e)| filter.accepts(e))
                    .take(want)
                    .map(|(_, e)| Listed::Memory {
                        owner: m.owner,
                        entry: e.clone(),
                    }),
            );
        }
        if let Some(store) = &self.inner.store {
            entries.extend(
                store
                    .page(after, want, filter)?
                    .into_iter()
                    .map(|s| Listed::Stored(Box::new(s))),
            );
        }
        entries.sort_by(|a, b| a.id().cmp(b.id()));
        entries.truncate(want);
        let next = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map(|e| e.id().clone())
        } else {
            None
        };
        Ok(Page { entries, next })
    }

    /// Replaces the config file's entries (SIGHUP), publishing only the difference. Every
    /// entry is checked first; if one breaks a rule nothing changes and the error names it.
    pub fn reload_config(
        &self,
        entries: Vec<Entry>,
    ) -> Result<Option<Arc<EntryEvent>>, SourceError> {
        self.replace(Owner::CONFIG, entries)
    }

    /// Adds an in-memory source (e.g. a SPIRE Server sync) owning the ids under `owner`'s
    /// prefix; it starts empty. `origin` and `how_to_change` word the admin API's refusal to
    /// change its entries ("entry ID comes from ORIGIN; HOW_TO_CHANGE").
    pub fn add_source(
        &self,
        owner: Owner,
        origin: impl Into<String>,
        how_to_change: impl Into<String>,
    ) -> Result<SourceHandle, SourceError> {
        let _writer = self.writer()?;
        let mut memory = self.memory_mut();
        if owner.overlaps(&Owner::STORE) || memory.iter().any(|m| owner.overlaps(&m.owner)) {
            return Err(SourceError::Overlap {
                name: owner.name,
                prefix: owner.prefix,
            });
        }
        memory.push(MemorySource {
            owner,
            origin: origin.into(),
            how_to_change: how_to_change.into(),
            entries: BTreeMap::new(),
        });
        Ok(SourceHandle {
            sources: self.clone(),
            owner,
        })
    }

    /// Makes `owner`'s entries exactly `entries`, publishing only the difference.
    fn replace(
        &self,
        owner: Owner,
        entries: Vec<Entry>,
    ) -> Result<Option<Arc<EntryEvent>>, SourceError> {
        let entries = check_all(&self.inner.rules, owner, entries)?;
        self.replace_checked(owner, entries)
    }

    fn replace_checked(
        &self,
        owner: Owner,
        entries: Vec<Entry>,
    ) -> Result<Option<Arc<EntryEvent>>, SourceError> {
        self.apply_owned(owner, |source| {
            let keep: HashSet<&EntryId> = entries.iter().map(|e| &e.id).collect();
            let removes: Vec<EntryId> = source
                .entries
                .keys()
                .filter(|id| !keep.contains(id))
                .cloned()
                .collect();
            (entries, removes)
        })
    }

    /// Adds or replaces `upserts` and removes `removes` among `owner`'s entries.
    fn patch(
        &self,
        owner: Owner,
        upserts: Vec<Entry>,
        removes: Vec<EntryId>,
    ) -> Result<Option<Arc<EntryEvent>>, SourceError> {
        let upserts = check_all(&self.inner.rules, owner, upserts)?;
        if let Some(id) = removes.iter().find(|id| !owner.owns(id)) {
            return Err(foreign(owner, id));
        }
        self.apply_owned(owner, |_| (upserts, removes))
    }

    /// Publishes the change `change` computes from `owner`'s in-memory source (upserts,
    /// removes), under the writer lock, and records it there.
    fn apply_owned(
        &self,
        owner: Owner,
        change: impl FnOnce(&MemorySource) -> (Vec<Entry>, Vec<EntryId>),
    ) -> Result<Option<Arc<EntryEvent>>, SourceError> {
        let writer = self.writer()?;
        let publisher = writer.as_ref().ok_or(SourceError::Closed)?;
        let mut memory = self.memory_mut();
        let source = memory
            .iter_mut()
            .find(|m| m.owner == owner)
            .ok_or(SourceError::Closed)?;
        let (upserts, removes) = change(source);
        let event = publisher.apply(upserts, removes);
        if let Some(ev) = &event {
            record(source, ev);
        }
        Ok(event)
    }

    /// Checks a spec and refuses a duplicate of an in-memory entry.
    fn check_spec(&self, spec: EntrySpec) -> Result<EntrySpec, SourceError> {
        let spec = self.inner.rules.check_spec(spec)?;
        for m in self.memory().iter() {
            if let Some(e) = m
                .entries
                .values()
                .find(|e| e.spiffe_id == spec.spiffe_id && e.selectors == spec.selectors)
            {
                return Err(SourceError::DuplicateOf {
                    existing: e.id.clone(),
                    origin: m.origin.clone(),
                });
            }
        }
        Ok(spec)
    }

    fn writer(&self) -> Result<MutexGuard<'_, Option<EntryPublisher>>, SourceError> {
        let w = lock(&self.inner.writer);
        if w.is_none() {
            return Err(SourceError::Closed);
        }
        Ok(w)
    }

    fn memory(&self) -> RwLockReadGuard<'_, Vec<MemorySource>> {
        self.inner
            .memory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn memory_mut(&self) -> RwLockWriteGuard<'_, Vec<MemorySource>> {
        self.inner
            .memory
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Mirrors a published event in the source's own map (sharing the index's `Arc`s).
fn record(source: &mut MemorySource, event: &EntryEvent) {
    for change in &event.changes {
        match (&change.old, &change.new) {
            (_, Some(new)) => {
                source.entries.insert(new.id.clone(), new.clone());
            }
            (Some(old), None) => {
                source.entries.remove(&old.id);
            }
            (None, None) => {}
        }
    }
}

fn foreign(owner: Owner, id: &EntryId) -> SourceError {
    SourceError::ForeignId {
        id: id.clone(),
        source_name: owner.name,
        prefix: owner.prefix,
    }
}

/// Checks every entry of an in-memory source: each id must be the source's, each entry must
/// pass [`Entry::checked`]; the first failure is the error.
fn check_all(rules: &Rules, owner: Owner, entries: Vec<Entry>) -> Result<Vec<Entry>, SourceError> {
    entries
        .into_iter()
        .map(|e| {
            if !owner.owns(&e.id) {
                return Err(foreign(owner, &e.id));
            }
            let id = e.id.clone();
            rules
                .check(e)
                .map_err(|error| SourceError::InvalidEntry { id, error })
        })
        .collect()
}

/// The writing end of one in-memory source (e.g. the SPIRE Server sync task): it changes only
/// the entries under its owner's prefix, each checked against the agent's rules.
#[derive(Clone, Debug)]
pub struct SourceHandle {
    sources: EntrySources,
    owner: Owner,
}

impl SourceHandle {
    /// The source.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Makes the source's entries exactly `entries` (a full sync), publishing the difference.
    pub fn replace(&self, entries: Vec<Entry>) -> Result<Option<Arc<EntryEvent>>, SourceError> {
        self.sources.replace(self.owner, entries)
    }

    /// Adds or replaces `upserts` and removes `removes` (an incremental sync).
    pub fn apply(
        &self,
        upserts: Vec<Entry>,
        removes: Vec<EntryId>,
    ) -> Result<Option<Arc<EntryEvent>>, SourceError> {
        self.sources.patch(self.owner, upserts, removes)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spiffed_core::{EntryChange, Selector, SelectorError, Selectors};

    use super::*;

    /// Accepts the `unix` and `systemd` types, as the default attestors do.
    struct UnixAndSystemd;
    impl SelectorCheck for UnixAndSystemd {
        fn check(&self, s: &Selector) -> Result<(), SelectorError> {
            match s.kind() {
                "unix" | "systemd" => Ok(()),
                _ => Err(SelectorError::UnknownType {
                    selector: s.to_string(),
                    known: spiffed_core::known_list(["unix", "systemd"]),
                }),
            }
        }
    }

    fn rules(limits: EntryLimits) -> Rules {
        Rules {
            trust_domain: TrustDomain::new("td").unwrap(),
            limits,
            selectors: Arc::new(UnixAndSystemd),
        }
    }

    fn spec(id: &str, sels: &[&str]) -> EntrySpec {
        EntrySpec {
            spiffe_id: id.parse().unwrap(),
            selectors: sels.iter().map(|s| s.parse().unwrap()).collect(),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
            admin: false,
            federates_with: vec![],
        }
    }

    fn config_entry(spiffe: &str, sels: &[&str]) -> Entry {
        let spiffe_id: spiffed_core::SpiffeId = spiffe.parse().unwrap();
        let mut selectors: Vec<Selector> = sels.iter().map(|s| s.parse().unwrap()).collect();
        selectors.sort();
        Entry {
            id: config_entry_id(&spiffe_id, &selectors),
            spiffe_id,
            selectors,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
        }
    }

    fn open(
        dir: &tempfile::TempDir,
        config: Vec<Entry>,
        limits: EntryLimits,
    ) -> (EntrySources, Loaded) {
        let store = Store::open(&dir.path().join("entries.db")).unwrap();
        EntrySources::open(
            store,
            ConfigEntries {
                entries: config,
                file: Some("/etc/spiffed.toml".into()),
            },
            rules(limits),
        )
        .unwrap()
    }

    fn changed_ids(changes: &[EntryChange]) -> Vec<(String, bool, bool)> {
        let mut v: Vec<_> = changes
            .iter()
            .map(|c| {
                (
                    c.id().unwrap().to_string(),
                    c.old.is_some(),
                    c.new.is_some(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn sels(s: &[&str]) -> Selectors {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn every_write_publishes_only_what_changed_in_commit_order() {
        let dir = tempfile::tempdir().unwrap();
        let web = config_entry("spiffe://td/web", &["unix:uid:1"]);
        let db = config_entry("spiffe://td/db", &["unix:uid:2"]);
        let (sources, _) = open(&dir, vec![web.clone(), db.clone()], EntryLimits::default());
        let mut feed = sources.feed();
        let start = feed.latest().revision;
        assert_eq!(feed.read().len(), 2);

        // Create: one event holding exactly the new entries.
        let created = sources
            .create(vec![
                spec("spiffe://td/a", &["unix:uid:10"]),
                spec("spiffe://td/b", &["unix:uid:11"]),
            ])
            .unwrap();
        let a = created[0].as_ref().unwrap().clone();
        let b = created[1].as_ref().unwrap().clone();
        let ev = feed.latest();
        assert_eq!(ev.revision, start + 1);
        let mut want = vec![
            (a.entry.id.to_string(), false, true),
            (b.entry.id.to_string(), false, true),
        ];
        want.sort();
        assert_eq!(changed_ids(&ev.changes), want);

        // Update: the one entry, old and new.
        let a2 = sources
            .update(&a.entry.id, 1, spec("spiffe://td/a", &["unix:uid:12"]))
            .unwrap();
        assert_eq!(a2.revision, 2);
        let ev = feed.latest();
        assert_eq!(ev.revision, start + 2);
        assert_eq!(
            changed_ids(&ev.changes),
            [(a.entry.id.to_string(), true, true)]
        );
        assert!(ev.changes[0].concerns(&sels(&["unix:uid:10"])));
        assert_eq!(feed.matching(&sels(&["unix:uid:12"])).len(), 1);
        assert!(feed.matching(&sels(&["unix:uid:10"])).is_empty());

        // Delete: the removal only.
        let r = sources.delete(std::slice::from_ref(&b.entry.id)).unwrap();
        assert!(r[0].is_ok());
        let ev = feed.latest();
        assert_eq!(ev.revision, start + 3);
        assert_eq!(
            changed_ids(&ev.changes),
            [(b.entry.id.to_string(), true, false)]
        );

        // Reload: web stays, db goes, cache comes; stored entries are untouched.
        let cache = config_entry("spiffe://td/cache", &["unix:uid:3"]);
        sources
            .reload_config(vec![web.clone(), cache.clone()])
            .unwrap()
            .unwrap();
        let ev = feed.latest();
        assert_eq!(ev.revision, start + 4);
        let mut want = vec![
            (db.id.to_string(), true, false),
            (cache.id.to_string(), false, true),
        ];
        want.sort();
        assert_eq!(changed_ids(&ev.changes), want);
        assert_eq!(feed.read().len(), 3);
        // The same config again changes nothing and publishes nothing.
        assert!(sources.reload_config(vec![web, cache]).unwrap().is_none());
        assert_eq!(feed.latest().revision, start + 4);
    }

    #[test]
    fn listing_merges_config_before_stored_and_pages_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let config: Vec<Entry> = (0..5)
            .map(|i| {
                config_entry(
                    &format!("spiffe://td/c{i}"),
                    &["unix:uid:1", &format!("unix:gid:{}", i % 2)],
                )
            })
            .collect();
        let (sources, _) = open(&dir, config, EntryLimits::default());
        let specs = (0..43)
            .map(|i| {
                spec(
                    &format!("spiffe://td/s{i}"),
                    &["unix:uid:1", &format!("unix:gid:{}", i % 2)],
                )
            })
            .collect();
        assert!(sources.create(specs).unwrap().iter().all(Result::is_ok));
        // A stored entry sharing a SPIFFE ID with a config one.
        sources
            .create(vec![spec("spiffe://td/c0", &["unix:uid:9"])])
            .unwrap()
            .remove(0)
            .unwrap();
        let walk = |filter: &Filter, size: usize| {
            let mut seen: Vec<Listed> = Vec::new();
            let mut after: Option<EntryId> = None;
            loop {
                let page = sources.list(after.as_ref(), size, filter).unwrap();
                assert!(page.entries.len() <= size);
                seen.extend(page.entries);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            seen
        };
        for size in [1, 4, 7, 100] {
            let all = walk(&Filter::default(), size);
            assert_eq!(all.len(), 5 + 44, "page size {size}");
            let ids: Vec<&EntryId> = all.iter().map(Listed::id).collect();
            let mut sorted = ids.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(ids, sorted, "each once, in id order (page size {size})");
            assert!(all[..5].iter().all(|l| l.source() == "config"));
            assert!(
                all[5..]
                    .iter()
                    .all(|l| l.source() == "store" && l.stored().is_some())
            );
        }
        let gid1 = Filter {
            selector: Some("unix:gid:1".parse().unwrap()),
            ..Filter::default()
        };
        let odd = walk(&gid1, 3);
        assert_eq!(odd.len(), 2 + 21);
        assert!(odd.iter().all(|l| gid1.accepts(l.entry())));
        let c0 = Filter {
            spiffe_id: Some("spiffe://td/c0".parse().unwrap()),
            ..Filter::default()
        };
        let both = walk(&c0, 1);
        assert_eq!(
            both.iter().map(Listed::source).collect::<Vec<_>>(),
            ["config", "store"]
        );
        // get finds either kind.
        let first = &both[0];
        assert_eq!(sources.get(first.id()).unwrap().as_ref(), Some(first));
        assert_eq!(sources.get(both[1].id()).unwrap().as_ref(), Some(&both[1]));
        assert!(sources.get(&EntryId::new("entry-none")).unwrap().is_none());
        assert!(sources.get(&EntryId::new("config-none")).unwrap().is_none());
    }

    #[test]
    fn start_up_loads_the_store_and_reports_entries_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let (sources, _) = open(&dir, vec![], EntryLimits::default());
        let created = sources
            .create(vec![
                spec("spiffe://td/one", &["unix:uid:1"]),
                spec(
                    "spiffe://td/three",
                    &["unix:uid:1", "unix:gid:1", "unix:user:a"],
                ),
            ])
            .unwrap();
        let three = created[1].as_ref().unwrap().entry.id.clone();
        sources.close();
        drop(sources);

        // Same rules: everything is back, config entries too.
        let web = config_entry("spiffe://td/web", &["unix:uid:5"]);
        let (sources, loaded) = open(&dir, vec![web.clone()], EntryLimits::default());
        assert_eq!(loaded.entries, 2);
        assert!(loaded.refused.is_empty());
        let feed = sources.feed();
        assert_eq!(feed.read().len(), 3);
        assert_eq!(feed.matching(&sels(&["unix:uid:1"])).len(), 1);
        assert!(feed.read().get(&web.id).is_some());
        sources.close();
        drop(sources);

        // A lower limit: the 3-selector entry stays stored and listed, but is not served.
        let limits = EntryLimits {
            max_selectors: 2,
            ..EntryLimits::default()
        };
        let (sources, loaded) = open(&dir, vec![], limits);
        assert_eq!(loaded.entries, 1);
        assert_eq!(loaded.refused.len(), 1);
        assert_eq!(loaded.refused[0].0, three);
        assert_eq!(loaded.refused[0].1.field(), "selectors");
        assert_eq!(sources.feed().read().len(), 1);
        assert_eq!(
            sources
                .list(None, 10, &Filter::default())
                .unwrap()
                .entries
                .len(),
            2
        );
        // Fixing it through the admin API serves it again.
        sources
            .update(
                &three,
                1,
                spec("spiffe://td/three", &["unix:uid:1", "unix:gid:1"]),
            )
            .unwrap();
        assert_eq!(sources.feed().read().len(), 2);
    }

    #[test]
    fn every_source_validates_through_the_one_constructor() {
        let dir = tempfile::tempdir().unwrap();
        let limits = EntryLimits {
            max_selectors: 2,
            max_dns_names: 1,
            min_svid_ttl: Duration::from_secs(10),
            ca_ttl: Duration::from_secs(3600),
        };
        let web = config_entry("spiffe://td/web", &["unix:uid:1"]);
        let (sources, _) = open(&dir, vec![web.clone()], limits);
        let refused = |s: EntrySpec| match sources.create(vec![s]).unwrap().remove(0) {
            Err(SourceError::Invalid(e)) => (e.field(), e.message()),
            other => panic!("want Invalid, got {other:?}"),
        };
        let mut s = spec(
            "spiffe://td/a",
            &["unix:uid:1", "unix:gid:1", "unix:user:a"],
        );
        assert_eq!(
            refused(s.clone()),
            (
                "selectors",
                "has 3 items; the agent's limit is 2 (max_selectors_per_entry)".to_owned()
            )
        );
        s.selectors.truncate(1);
        s.x509_svid_ttl = Some(Duration::from_secs(7200));
        let (field, message) = refused(s.clone());
        assert_eq!(field, "x509_svid_ttl");
        assert!(
            message.starts_with("is longer than the CA lifetime (3600s)"),
            "{message}"
        );
        s.x509_svid_ttl = Some(Duration::from_secs(1));
        assert!(refused(s.clone()).1.contains("min_svid_ttl (10s)"));
        s.x509_svid_ttl = None;
        s.dns_names = vec!["a.internal".into(), "b.internal".into()];
        assert_eq!(refused(s.clone()).0, "dns_names");
        s.dns_names = vec!["bad name".into()];
        let e = match sources.create(vec![s.clone()]).unwrap().remove(0) {
            Err(SourceError::Invalid(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!((e.field(), e.item()), ("dns_names", Some("bad name")));
        s.dns_names = vec![];
        s.selectors = vec!["unix:uid:1".parse().unwrap(), "k8s:ns:x".parse().unwrap()];
        let e = match sources.create(vec![s.clone()]).unwrap().remove(0) {
            Err(SourceError::Invalid(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!((e.field(), e.item()), ("selectors", Some("k8s:ns:x")));
        let outside = spec("spiffe://other/a", &["unix:uid:1"]);
        assert_eq!(refused(outside).0, "spiffe_id");
        // Nothing refused reached the store or the index.
        assert!(sources.store().unwrap().list().unwrap().is_empty());
        assert_eq!(sources.feed().read().len(), 1);

        // The same rules bind a config reload: all or nothing, naming the entry.
        let mut bad = config_entry("spiffe://td/bad", &["unix:uid:7"]);
        bad.jwt_svid_ttl = Some(Duration::from_secs(7200));
        let err = sources.reload_config(vec![bad.clone()]).unwrap_err();
        assert!(
            matches!(&err, SourceError::InvalidEntry { id, error } if *id == bad.id && error.field() == "jwt_svid_ttl"),
            "{err:?}"
        );
        assert!(
            sources.feed().read().get(&web.id).is_some(),
            "the running config stays"
        );

        // Config entries are not the admin API's to change, nor to duplicate.
        let err = sources
            .update(&web.id, 0, spec("spiffe://td/web", &["unix:uid:2"]))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the config file /etc/spiffed.toml; edit the file and send SIGHUP"),
            "{err}"
        );
        let r = sources.delete(std::slice::from_ref(&web.id)).unwrap();
        assert!(matches!(&r[0], Err(SourceError::NotWritable { .. })));
        let dup = sources
            .create(vec![spec("spiffe://td/web", &["unix:uid:1"])])
            .unwrap()
            .remove(0)
            .unwrap_err();
        assert!(
            matches!(&dup, SourceError::DuplicateOf { existing, .. } if *existing == web.id),
            "{dup:?}"
        );
    }

    #[tokio::test]
    async fn a_third_source_plugs_in_under_its_own_prefix_and_close_ends_feeds() {
        let dir = tempfile::tempdir().unwrap();
        let (sources, _) = open(&dir, vec![], EntryLimits::default());
        assert!(matches!(
            sources.add_source(Owner::new("bad", "entry-x"), "x", "y"),
            Err(SourceError::Overlap { .. })
        ));
        let sync = sources
            .add_source(
                Owner::new("server", "spire-"),
                "the SPIRE Server",
                "change it on the server",
            )
            .unwrap();
        let entry = |id: &str, uid: u32| Entry {
            id: EntryId::new(id),
            spiffe_id: "spiffe://td/synced".parse().unwrap(),
            selectors: vec![format!("unix:uid:{uid}").parse().unwrap()],
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
        };
        let mut feed = sources.feed();
        feed.latest();
        sync.replace(vec![entry("spire-1", 1), entry("spire-2", 2)])
            .unwrap();
        let ev = sync
            .apply(vec![entry("spire-3", 3)], vec![EntryId::new("spire-1")])
            .unwrap()
            .unwrap();
        assert_eq!(
            changed_ids(&ev.changes),
            [
                ("spire-1".into(), true, false),
                ("spire-3".into(), false, true)
            ]
        );
        assert!(matches!(
            sync.apply(vec![entry("entry-1", 1)], vec![]),
            Err(SourceError::ForeignId { .. })
        ));
        let listed = sources.list(None, 10, &Filter::default()).unwrap();
        assert_eq!(
            listed
                .entries
                .iter()
                .map(|l| (l.id().to_string(), l.source()))
                .collect::<Vec<_>>(),
            [
                ("spire-2".to_owned(), "server"),
                ("spire-3".to_owned(), "server")
            ]
        );
        assert_eq!(sources.source_of(&EntryId::new("spire-9")), Some("server"));
        let err = sources.delete(&[EntryId::new("spire-2")]).unwrap();
        assert!(
            err[0]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("change it on the server")
        );

        feed.latest();
        sources.close();
        assert!(feed.changed().await.is_none(), "closing ends every feed");
        assert!(matches!(
            sources.create(vec![spec("spiffe://td/x", &["unix:uid:1"])]),
            Err(SourceError::Closed)
        ));
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    /// Config entry ids are what spiffed 0.1 gave them (moved here from the agent's config
    /// validation unchanged): running agents' SVID caches and operators' notes name them.
    #[test]
    fn config_entry_ids_are_stable() {
        let spiffe_id = "spiffe://example.org/web".parse().unwrap();
        let selectors: Vec<spiffed_core::Selector> = vec![
            "unix:path:/usr/bin/web".parse().unwrap(),
            "unix:uid:1000".parse().unwrap(),
        ];
        let id = config_entry_id(&spiffe_id, &selectors);
        assert_eq!(id.as_str(), PINNED);
        assert!(Owner::CONFIG.owns(&id) && !Owner::STORE.owns(&id));
    }

    /// SHA-256 of "spiffe://example.org/web\nunix:path:/usr/bin/web\nunix:uid:1000", 8 bytes.
    const PINNED: &str = "config-9e76d69b3993669e";
}
