//! The X.509-SVID cache: a pure state machine over `now`.
//!
//! It decides which entry has which SVID, who mints next, what to rotate and what to forget;
//! it never signs, reads a clock, locks, sleeps or touches a file. The issuer calls it under
//! its state lock and does the minting outside ([`crate::issuer`], [`crate::rotation`]).
//! (It keeps each entry's `tokio::sync::watch` sender, but only as a data structure: sending
//! and counting receivers need no runtime.)
//!
//! What is kept, and so rotated at half-life:
//! - the SVIDs of up to `budget` registered entries, pre-minted ("pinned"), used or not;
//! - every SVID a stream holds (its watch has a receiver: the lease);
//! - every other SVID until [`IDLE_KEEP`] after its last fetch (or its last sweep while held).
//!
//! An entry removed from the registry keeps its SVID only while it is held. An entry whose
//! SPIFFE ID, DNS names or X.509 TTL changed is re-minted if it is held or pinned, else forgotten.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffed_core::{Entry, EntryId, X509Svid};
use tokio::sync::watch;

/// An SVID nobody holds and nobody fetched for this long is dropped (unless pinned).
pub(crate) const IDLE_KEEP: Duration = Duration::from_secs(60);
/// Shortest wait before re-minting an SVID, so a tiny lifetime cannot make the task spin.
pub(crate) const MIN_REFRESH: Duration = Duration::from_millis(250);
/// SVIDs falling due within this much of each other are rotated in one turn of the task
/// (rotating up to this much early), so many SVIDs cost a turn a second, not a turn each.
/// An SVID rotates at most an eighth of its refresh period early.
pub(crate) const ROTATE_EARLY: Duration = Duration::from_secs(1);
/// How long to wait before retrying a failed background mint.
pub(crate) const RETRY: Duration = Duration::from_secs(5);

/// Whether two versions of an entry need the same SVID.
pub(crate) fn same_params(a: &Entry, b: &Entry) -> bool {
    a.spiffe_id == b.spiffe_id && a.dns_names == b.dns_names && a.x509_svid_ttl == b.x509_svid_ttl
}

/// Whether an SVID may be handed out at `now`: notBefore <= now < notAfter.
pub(crate) fn usable(svid: &X509Svid, now: SystemTime) -> bool {
    svid.not_before <= now && now < svid.not_after
}

/// When an SVID minted at `now` falls due: at half its remaining life.
pub(crate) fn refresh_at(svid: &X509Svid, now: SystemTime) -> SystemTime {
    let life = svid.not_after.duration_since(now).unwrap_or(Duration::ZERO);
    now + (life / 2).max(MIN_REFRESH)
}

/// The SVID an entry has now, and the watch its holders wait on.
struct Current {
    svid: Arc<X509Svid>,
    /// The entry version it was minted for.
    minted_for: Arc<Entry>,
    tx: watch::Sender<Arc<X509Svid>>,
    refresh_at: SystemTime,
    /// Due from `refresh_at - early` (see [`ROTATE_EARLY`]).
    early: Duration,
}

/// A request minting this entry's SVID outside the lock; others wait on `done`, which closes
/// when the minter installs, gives up, or is dropped.
struct Minting {
    ticket: u64,
    done: watch::Receiver<()>,
}

impl Minting {
    /// The minter went away without installing or aborting (it panicked).
    fn abandoned(&self) -> bool {
        self.done.has_changed().is_err()
    }
}

struct Slot {
    /// The entry version the SVID should be minted for (the newest known).
    entry: Arc<Entry>,
    current: Option<Current>,
    minting: Option<Minting>,
    last_used: SystemTime,
    /// No background mint before this (the last one failed).
    retry_at: Option<SystemTime>,
    /// Within the pre-mint budget: kept and rotated whether used or not.
    pinned: bool,
    /// The entry left the registry: kept only while held.
    removed: bool,
}

impl Slot {
    fn new(entry: Arc<Entry>, now: SystemTime) -> Self {
        Self {
            entry,
            current: None,
            minting: None,
            last_used: now,
            retry_at: None,
            pinned: false,
            removed: false,
        }
    }

    /// Whether a stream holds the SVID (its watch has a receiver).
    fn held(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| c.tx.receiver_count() > 0)
    }

    fn minting(&self) -> bool {
        self.minting.as_ref().is_some_and(|m| !m.abandoned())
    }

    /// Installs `svid` minted for `entry`, telling the holders of the old one.
    fn set(&mut self, entry: &Arc<Entry>, svid: Arc<X509Svid>, now: SystemTime) {
        let at = refresh_at(&svid, now);
        let early = ROTATE_EARLY.min(at.duration_since(now).unwrap_or(Duration::ZERO) / 8);
        self.retry_at = None;
        match &mut self.current {
            Some(c) => {
                c.tx.send_replace(svid.clone());
                c.svid = svid;
                c.minted_for = entry.clone();
                c.refresh_at = at;
                c.early = early;
            }
            None => {
                let (tx, _) = watch::channel(svid.clone());
                self.current = Some(Current {
                    svid,
                    minted_for: entry.clone(),
                    tx,
                    refresh_at: at,
                    early,
                });
            }
        }
    }

    /// Whether the slot is worth keeping at `now` (see the module docs).
    fn keep(&self, now: SystemTime) -> bool {
        if self.minting() {
            return true;
        }
        if self.current.is_none() {
            return self.pinned;
        }
        if self.removed {
            return self.held();
        }
        // A clock that went back (last use in the future) keeps it.
        self.pinned
            || self.held()
            || now
                .duration_since(self.last_used)
                .map_or(true, |d| d < IDLE_KEEP)
    }
}

/// What [`SvidCache::lookup`] tells a request to do.
pub(crate) enum Lookup {
    /// The current SVID fits: here is a subscription to it.
    Hit(watch::Receiver<Arc<X509Svid>>),
    /// Another request is minting it: wait until this closes, then look up again.
    Wait(watch::Receiver<()>),
    /// Mint it (outside the lock), then [`SvidCache::install_minted`] or [`SvidCache::abort`].
    Mint(MintTicket),
}

/// The right to mint an entry's SVID on a request. Dropping it wakes the requests waiting for
/// it, so it is consumed by [`SvidCache::install_minted`] or [`SvidCache::abort`], after the
/// cache is updated.
#[derive(Debug)]
pub(crate) struct MintTicket {
    id: EntryId,
    ticket: u64,
    _done: watch::Sender<()>,
}

/// One SVID for the rotation task to mint outside the lock.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) entry: Arc<Entry>,
    /// The serial of the SVID this one replaces (`None`: the entry has none). The new SVID is
    /// installed only if the cache still holds exactly that, so a mint that raced with another
    /// (a request's) is discarded rather than replacing a newer one.
    pub(crate) replaces: Option<Vec<u8>>,
}

/// What installing a background mint did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Installed {
    /// The entry had no SVID.
    Added,
    /// It replaced one: the holders were told.
    Replaced,
    /// The cache changed while minting; the new SVID was discarded.
    Skipped,
}

/// What [`SvidCache::due`] found.
#[derive(Debug, Default)]
pub(crate) struct Due {
    /// SVIDs to mint now: pre-mints, changed entries, rotations.
    pub(crate) jobs: Vec<Job>,
    /// When the next one falls due (or a kept-while-used SVID may be dropped), if ever.
    pub(crate) next: Option<SystemTime>,
}

/// Counts, for logs, tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvidStats {
    /// Entries with an X.509-SVID in memory.
    pub cached: usize,
    /// Of those, how many a stream holds.
    pub held: usize,
    /// Entries in the pre-mint budget (minted or about to be).
    pub pinned: usize,
    /// The earliest notAfter of the X.509-SVIDs in memory (`None`: none is).
    pub earliest_expiry: Option<SystemTime>,
}

/// The cache (see the module docs).
pub(crate) struct SvidCache {
    slots: HashMap<EntryId, Slot>,
    budget: usize,
    pinned: usize,
    tickets: u64,
}

impl SvidCache {
    /// An empty cache pre-minting up to `budget` registered entries.
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            slots: HashMap::new(),
            budget,
            pinned: 0,
            tickets: 0,
        }
    }

    /// Counts of what is held in memory.
    pub(crate) fn stats(&self) -> SvidStats {
        let mut s = SvidStats {
            pinned: self.pinned,
            ..SvidStats::default()
        };
        for slot in self.slots.values() {
            if let Some(c) = &slot.current {
                s.cached += 1;
                s.held += usize::from(slot.held());
                let t = c.svid.not_after;
                s.earliest_expiry = Some(s.earliest_expiry.map_or(t, |e| e.min(t)));
            }
        }
        s
    }

    /// The current SVID of `id`, if any (whatever its entry version or validity).
    #[cfg(test)]
    pub(crate) fn current(&self, id: &EntryId) -> Option<&Arc<X509Svid>> {
        self.slots.get(id)?.current.as_ref().map(|c| &c.svid)
    }

    /// How many entries have a slot (an SVID, or one being minted or due).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether `id` is in the pre-mint budget.
    #[cfg(test)]
    pub(crate) fn is_pinned(&self, id: &EntryId) -> bool {
        self.slots.get(id).is_some_and(|s| s.pinned)
    }

    /// A request for `entry`'s SVID at `now`: a subscription to the current one if it was
    /// minted for these parameters and is valid now, else a wait for another request's mint,
    /// else the ticket to mint it.
    pub(crate) fn lookup(&mut self, entry: &Arc<Entry>, now: SystemTime) -> Lookup {
        let slot = self
            .slots
            .entry(entry.id.clone())
            .or_insert_with(|| Slot::new(entry.clone(), now));
        if let Some(c) = &slot.current
            && same_params(&c.minted_for, entry)
            && usable(&c.svid, now)
        {
            slot.last_used = now;
            return Lookup::Hit(c.tx.subscribe());
        }
        if let Some(m) = &slot.minting
            && !m.abandoned()
        {
            return Lookup::Wait(m.done.clone());
        }
        self.tickets += 1;
        let (done_tx, done_rx) = watch::channel(());
        slot.minting = Some(Minting {
            ticket: self.tickets,
            done: done_rx,
        });
        Lookup::Mint(MintTicket {
            id: entry.id.clone(),
            ticket: self.tickets,
            _done: done_tx,
        })
    }

    /// Installs what a request minted with `ticket` and subscribes to it. If the ticket was
    /// taken over meanwhile and the SVID there now fits, that one is kept and `svid` dropped.
    pub(crate) fn install_minted(
        &mut self,
        entry: &Arc<Entry>,
        ticket: MintTicket,
        svid: Arc<X509Svid>,
        now: SystemTime,
    ) -> watch::Receiver<Arc<X509Svid>> {
        let slot = self
            .slots
            .entry(entry.id.clone())
            .or_insert_with(|| Slot::new(entry.clone(), now));
        let mine = slot
            .minting
            .as_ref()
            .is_some_and(|m| m.ticket == ticket.ticket);
        if mine {
            slot.minting = None;
        }
        slot.last_used = now;
        if !mine
            && let Some(c) = &slot.current
            && same_params(&c.minted_for, entry)
            && usable(&c.svid, now)
        {
            return c.tx.subscribe();
        }
        if mine || same_params(&slot.entry, entry) {
            slot.entry = entry.clone();
        }
        slot.set(entry, svid, now);
        let rx = slot.current.as_ref().map(|c| c.tx.subscribe());
        drop(ticket);
        // `set` always leaves a current SVID.
        rx.unwrap_or_else(|| unreachable!("an SVID was just installed"))
    }

    /// Gives up the mint of `ticket` (it failed): the waiting requests try themselves.
    pub(crate) fn abort(&mut self, ticket: MintTicket) {
        if let Some(slot) = self.slots.get_mut(&ticket.id)
            && slot
                .minting
                .as_ref()
                .is_some_and(|m| m.ticket == ticket.ticket)
        {
            slot.minting = None;
            if slot.current.is_none() && !slot.pinned {
                self.slots.remove(&ticket.id);
            }
        }
    }

    /// Drops what is not worth keeping at `now`; returns how many SVIDs were dropped.
    pub(crate) fn sweep(&mut self, now: SystemTime) -> usize {
        let before = self.slots.len();
        self.slots.retain(|id, s| {
            if s.minting.as_ref().is_some_and(Minting::abandoned) {
                s.minting = None;
            }
            // Held counts as used: once let go, it is kept for IDLE_KEEP more (a workload
            // that reconnects finds it).
            if s.held() {
                s.last_used = s.last_used.max(now);
            }
            let keep = s.keep(now);
            if !keep {
                tracing::debug!(entry = %id, removed = s.removed, "dropping an unused X.509-SVID");
            }
            keep
        });
        before - self.slots.len()
    }

    /// The SVIDs to mint at `now` (pre-mints, changed entries, rotations), and when to look
    /// again. Call [`SvidCache::sweep`] first, so that only what is kept is rotated.
    pub(crate) fn due(&self, now: SystemTime) -> Due {
        let mut due = Due::default();
        let mut later = |t: SystemTime| {
            due.next = Some(due.next.map_or(t, |n| n.min(t)));
        };
        let mut jobs = Vec::new();
        for s in self.slots.values() {
            if s.minting() {
                continue;
            }
            if let Some(r) = s.retry_at
                && r > now
            {
                later(r);
                continue;
            }
            match &s.current {
                None if s.pinned => jobs.push(Job {
                    entry: s.entry.clone(),
                    replaces: None,
                }),
                None => {}
                Some(c) => {
                    let due_from = c.refresh_at.checked_sub(c.early).unwrap_or(c.refresh_at);
                    if !same_params(&c.minted_for, &s.entry) || due_from <= now {
                        jobs.push(Job {
                            entry: s.entry.clone(),
                            replaces: Some(c.svid.serial.clone()),
                        });
                        continue;
                    }
                    later(due_from);
                    if !s.pinned && !s.removed && !s.held() {
                        later(s.last_used + IDLE_KEEP);
                    }
                }
            }
        }
        due.jobs = jobs;
        due
    }

    /// Installs a background mint of `job` unless the cache moved on meanwhile (see
    /// [`Job::replaces`]).
    pub(crate) fn install_job(
        &mut self,
        job: &Job,
        svid: Arc<X509Svid>,
        now: SystemTime,
    ) -> Installed {
        let Some(slot) = self.slots.get_mut(&job.entry.id) else {
            return Installed::Skipped;
        };
        let serial = slot.current.as_ref().map(|c| c.svid.serial.as_slice());
        if slot.minting()
            || serial != job.replaces.as_deref()
            || !same_params(&slot.entry, &job.entry)
        {
            return Installed::Skipped;
        }
        let added = slot.current.is_none();
        slot.set(&job.entry, svid, now);
        if added {
            Installed::Added
        } else {
            Installed::Replaced
        }
    }

    /// A background mint of `job` failed: retried after [`RETRY`].
    pub(crate) fn job_failed(&mut self, job: &Job, now: SystemTime) {
        if let Some(slot) = self.slots.get_mut(&job.entry.id) {
            slot.retry_at = Some(now + RETRY);
        }
    }

    /// The entry was added or changed in the registry.
    pub(crate) fn upsert(&mut self, entry: &Arc<Entry>, now: SystemTime) {
        match self.slots.get_mut(&entry.id) {
            Some(slot) => {
                slot.removed = false;
                let changed = !same_params(&slot.entry, entry);
                slot.entry = entry.clone();
                if changed && !slot.pinned && !slot.held() && !slot.minting() {
                    // Nobody needs it now: the next fetch mints the new one.
                    self.slots.remove(&entry.id);
                    return;
                }
                if !slot.pinned && self.pinned < self.budget {
                    slot.pinned = true;
                    self.pinned += 1;
                }
            }
            None if self.pinned < self.budget => {
                let mut slot = Slot::new(entry.clone(), now);
                slot.pinned = true;
                self.pinned += 1;
                self.slots.insert(entry.id.clone(), slot);
            }
            None => {}
        }
    }

    /// The entry left the registry; returns whether it freed pre-mint budget.
    pub(crate) fn remove(&mut self, id: &EntryId) -> bool {
        let Some(slot) = self.slots.get_mut(id) else {
            return false;
        };
        let freed = std::mem::take(&mut slot.pinned);
        if freed {
            self.pinned -= 1;
        }
        if slot.held() || slot.minting() {
            slot.removed = true;
        } else {
            tracing::debug!(entry = %id, "dropping the X.509-SVID of a removed entry");
            self.slots.remove(id);
        }
        freed
    }

    /// Whether pre-mint budget is free.
    pub(crate) fn budget_left(&self) -> bool {
        self.pinned < self.budget
    }

    /// Pins registered entries (`entries`, in the registry's order) until the budget is
    /// spent: those already cached first need no mint, others get a pre-mint job.
    pub(crate) fn fill<'a>(
        &mut self,
        entries: impl IntoIterator<Item = &'a Arc<Entry>>,
        now: SystemTime,
    ) {
        for e in entries {
            if !self.budget_left() {
                return;
            }
            if self.slots.get(&e.id).is_some_and(|s| s.pinned) {
                continue;
            }
            self.upsert(e, now);
        }
    }

    /// Re-reads the whole registry (after missed events): `registered` answers whether an id is
    /// registered and as what. Every cached registered entry is updated, every pre-minted one
    /// no longer registered removed, then the budget filled.
    pub(crate) fn resync<'a>(
        &mut self,
        registered: impl Fn(&EntryId) -> Option<Arc<Entry>>,
        entries: impl IntoIterator<Item = &'a Arc<Entry>>,
        now: SystemTime,
    ) {
        let ids: Vec<EntryId> = self.slots.keys().cloned().collect();
        for id in ids {
            match registered(&id) {
                Some(e) => self.upsert(&e, now),
                // Not registered: a pre-minted entry was removed. Others may be synthetic
                // identities (dev mode), never registered: the usual rules keep them.
                None if self.slots.get(&id).is_some_and(|s| s.pinned) => {
                    self.remove(&id);
                }
                None => {}
            }
        }
        self.fill(entries, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiffed_core::{PrivateKey, Selector};
    use zeroize::Zeroizing;

    const T0: Duration = Duration::from_secs(1_800_000_000);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn entry(id: &str, path: &str) -> Arc<Entry> {
        Arc::new(Entry {
            id: EntryId::new(id),
            spiffe_id: format!("spiffe://example.org/{path}").parse().unwrap(),
            selectors: vec!["unix:uid:1".parse::<Selector>().unwrap()],
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
        })
    }

    /// A stand-in SVID (the cache never looks inside the certificate), valid 600 s from `at`.
    fn svid(e: &Entry, serial: u8, at: SystemTime) -> Arc<X509Svid> {
        Arc::new(X509Svid {
            spiffe_id: e.spiffe_id.clone(),
            cert_chain_der: vec![],
            key: PrivateKey::new(Zeroizing::new(vec![])),
            serial: vec![serial],
            not_before: at,
            not_after: at + Duration::from_secs(600),
        })
    }

    fn mint(
        c: &mut SvidCache,
        e: &Arc<Entry>,
        serial: u8,
        now: SystemTime,
    ) -> watch::Receiver<Arc<X509Svid>> {
        match c.lookup(e, now) {
            Lookup::Mint(ticket) => c.install_minted(e, ticket, svid(e, serial, now), now),
            Lookup::Hit(rx) => rx,
            Lookup::Wait(_) => panic!("nobody else mints"),
        }
    }

    fn run_jobs(c: &mut SvidCache, now: SystemTime, serial: u8) -> Vec<Installed> {
        let due = c.due(now);
        due.jobs
            .iter()
            .map(|j| c.install_job(j, svid(&j.entry, serial, now), now))
            .collect()
    }

    #[test]
    fn a_second_lookup_waits_for_the_first_mint_then_hits() {
        let mut c = SvidCache::new(0);
        let web = entry("1", "web");
        let Lookup::Mint(ticket) = c.lookup(&web, t(0)) else {
            panic!("first lookup mints")
        };
        let Lookup::Wait(done) = c.lookup(&web, t(0)) else {
            panic!("second lookup waits")
        };
        assert!(done.has_changed().is_ok(), "still minting");
        let rx = c.install_minted(&web, ticket, svid(&web, 1, t(0)), t(0));
        assert!(done.has_changed().is_err(), "the waiter is woken");
        let Lookup::Hit(again) = c.lookup(&web, t(0)) else {
            panic!("then it hits")
        };
        assert!(Arc::ptr_eq(&rx.borrow(), &again.borrow()));
    }

    #[test]
    fn an_aborted_or_abandoned_mint_lets_the_next_request_mint() {
        let mut c = SvidCache::new(0);
        let web = entry("1", "web");
        let Lookup::Mint(ticket) = c.lookup(&web, t(0)) else {
            panic!()
        };
        c.abort(ticket);
        assert_eq!(c.slots.len(), 0, "nothing left behind");
        // A minter that vanished (dropped its ticket without a word) does not block others.
        let Lookup::Mint(ticket) = c.lookup(&web, t(0)) else {
            panic!()
        };
        drop(ticket);
        assert!(matches!(c.lookup(&web, t(0)), Lookup::Mint(_)));
    }

    #[test]
    fn rotation_sends_on_the_rotated_entry_only() {
        let mut c = SvidCache::new(0);
        let (a, b) = (entry("a", "a"), entry("b", "b"));
        let mut ra = mint(&mut c, &a, 1, t(0));
        let mut rb = mint(&mut c, &b, 2, t(100));
        // At 300 s, a (minted at 0, 600 s) is due; b (minted at 100) is not.
        assert_eq!(run_jobs(&mut c, t(300), 9), vec![Installed::Replaced]);
        assert!(ra.has_changed().unwrap());
        assert_eq!(ra.borrow_and_update().serial, vec![9]);
        assert!(!rb.has_changed().unwrap(), "b's holders are not woken");
        assert_eq!(rb.borrow_and_update().serial, vec![2]);
    }

    #[test]
    fn unheld_svids_go_after_idle_keep_and_come_back_on_use() {
        let mut c = SvidCache::new(0);
        let web = entry("1", "web");
        drop(mint(&mut c, &web, 1, t(0)));
        assert_eq!(c.sweep(t(59)), 0, "used a moment ago");
        assert_eq!(c.due(t(59)).next, Some(t(60)), "the task wakes to drop it");
        assert_eq!(c.sweep(t(60)), 1);
        assert_eq!(c.stats().cached, 0);
        // Used again: minted again.
        let rx = mint(&mut c, &web, 2, t(61));
        assert_eq!(rx.borrow().serial, vec![2]);
        // Held, it stays past the idle window and is rotated.
        assert_eq!(c.sweep(t(1000)), 0);
        assert_eq!(c.stats().held, 1);
        assert_eq!(run_jobs(&mut c, t(1000), 3), vec![Installed::Replaced]);
        drop(rx);
        assert_eq!(c.sweep(t(1000)), 0, "held until a moment ago");
        assert_eq!(c.sweep(t(1000) + IDLE_KEEP), 1);
    }

    #[test]
    fn the_pre_mint_budget_bounds_pinned_entries() {
        let mut c = SvidCache::new(3);
        let all: Vec<_> = (0..10)
            .map(|i| entry(&format!("e{i}"), &format!("w{i}")))
            .collect();
        c.fill(&all, t(0));
        assert_eq!(c.stats().pinned, 3);
        let jobs = c.due(t(0)).jobs;
        assert_eq!(jobs.len(), 3, "only the budget is pre-minted");
        for j in &jobs {
            assert_eq!(
                c.install_job(j, svid(&j.entry, 1, t(0)), t(0)),
                Installed::Added
            );
        }
        // Pinned SVIDs stay unused past the idle window, and rotate.
        assert_eq!(c.sweep(t(400)), 0);
        assert_eq!(run_jobs(&mut c, t(400), 2).len(), 3);
        // An unpinned entry is minted on use, and dropped when idle.
        drop(mint(&mut c, &all[9], 5, t(400)));
        assert_eq!(c.stats().cached, 4);
        assert_eq!(c.sweep(t(500)), 1);
        // Removing a pinned entry frees budget; filling pins the next, already cached first.
        let pinned: Vec<_> = all.iter().filter(|e| c.is_pinned(&e.id)).cloned().collect();
        drop(mint(&mut c, &all[8], 6, t(500)));
        assert!(c.remove(&pinned[0].id));
        assert!(c.budget_left());
        c.fill(std::iter::once(&all[8]).chain(&all), t(500));
        assert!(
            c.is_pinned(&all[8].id),
            "the cached one was pinned, no mint needed"
        );
        assert_eq!(c.stats().pinned, 3);
        assert!(c.due(t(500)).jobs.is_empty());
    }

    #[test]
    fn a_removed_entry_keeps_its_svid_while_held_and_rotates_it() {
        let mut c = SvidCache::new(10);
        let web = entry("1", "web");
        c.upsert(&web, t(0));
        run_jobs(&mut c, t(0), 1);
        let mut rx = c
            .current(&web.id)
            .map(|_| ())
            .and_then(|()| match c.lookup(&web, t(0)) {
                Lookup::Hit(rx) => Some(rx),
                _ => None,
            })
            .unwrap();
        assert!(!c.remove(&entry("other", "x").id));
        assert!(c.remove(&web.id), "it was pinned");
        assert_eq!(c.sweep(t(0)), 0, "held: kept");
        assert_eq!(run_jobs(&mut c, t(300), 2), vec![Installed::Replaced]);
        assert_eq!(rx.borrow_and_update().serial, vec![2], "and rotated");
        drop(rx);
        assert_eq!(c.sweep(t(301)), 1, "let go: dropped at once");
    }

    #[test]
    fn a_changed_entry_is_re_minted_if_held_or_pinned_else_forgotten() {
        let mut c = SvidCache::new(1);
        let (a, b) = (entry("a", "a"), entry("b", "b"));
        c.upsert(&a, t(0));
        run_jobs(&mut c, t(0), 1);
        let mut rb = mint(&mut c, &b, 2, t(0));
        let a2 = entry("a", "a2");
        let b2 = entry("b", "b2");
        c.upsert(&a2, t(1));
        c.upsert(&b2, t(1));
        let installed = run_jobs(&mut c, t(1), 3);
        assert_eq!(installed, vec![Installed::Replaced; 2]);
        assert_eq!(c.current(&a.id).unwrap().spiffe_id, a2.spiffe_id);
        assert_eq!(rb.borrow_and_update().spiffe_id, b2.spiffe_id);
        // Not held and not pinned: forgotten, minted again on use.
        drop(rb);
        c.upsert(&entry("b", "b3"), t(2));
        assert!(c.current(&b.id).is_none());
        // A job for an entry that changed again meanwhile is discarded.
        c.upsert(&entry("a", "a3"), t(3));
        let jobs = c.due(t(3)).jobs;
        c.upsert(&entry("a", "a4"), t(3));
        assert_eq!(
            c.install_job(&jobs[0], svid(&jobs[0].entry, 4, t(3)), t(3)),
            Installed::Skipped
        );
    }

    #[test]
    fn resync_updates_removes_and_fills() {
        let mut c = SvidCache::new(2);
        let all: Vec<_> = (0..4)
            .map(|i| entry(&format!("e{i}"), &format!("w{i}")))
            .collect();
        c.fill(&all, t(0));
        run_jobs(&mut c, t(0), 1);
        let pinned: Vec<_> = all.iter().filter(|e| c.is_pinned(&e.id)).cloned().collect();
        // The registry now holds only the two that were not pinned.
        let rest: Vec<_> = all
            .iter()
            .filter(|e| !c.is_pinned(&e.id))
            .cloned()
            .collect();
        let lookup = |id: &EntryId| rest.iter().find(|e| &e.id == id).cloned();
        c.resync(lookup, &rest, t(1));
        assert!(pinned.iter().all(|e| c.current(&e.id).is_none()));
        assert!(rest.iter().all(|e| c.is_pinned(&e.id)));
        assert_eq!(c.due(t(1)).jobs.len(), 2);
    }
}
