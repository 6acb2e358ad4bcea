//! The X.509-SVID table: which entry holds which SVID, who waits for which mint, what the
//! minting lanes take next, what to rotate and what to forget.
//!
//! A state machine over `now`, run under the issuer's lock: it never calls the server, reads a
//! clock or sleeps. Each entry has a slot; a slot's SVID goes out on a `watch` whose receivers
//! are its holders (the lease: a held SVID is kept and rotated). A mint is a job on one of two
//! lanes: `Urgent` (a request waits for it) and `Background` (pre-mints and rotations); a
//! request for an entry whose job is still queued in the background moves it to the urgent lane.
//!
//! What is kept, and so rotated at half-life (±10 %):
//! - the SVIDs of up to `budget` synced entries (pre-minted, "pinned"), used or not;
//! - every SVID a stream holds;
//! - every other SVID until [`IDLE_KEEP`] after its last fetch.
//!
//! An entry removed by the sync keeps its SVID only while it is held, and is not rotated (the
//! server would refuse).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffed_core::{AuthorityError, EntryId, SpiffeId, X509Svid};
use tokio::sync::watch;

use crate::server::EntryVersion;
use crate::x509::{Checked, chains_to_any};

/// An SVID nobody holds and nobody fetched for this long is dropped (unless pre-minted).
pub(crate) const IDLE_KEEP: Duration = Duration::from_secs(60);
/// SVIDs falling due within this much of each other are rotated in one batch (an SVID is
/// rotated at most this early, and at most a tenth of the life it has left then).
pub(crate) const ROTATE_EARLY: Duration = Duration::from_secs(1);
/// Shortest time between a mint and the rotation of what it minted, batching included: at
/// most one background mint a second per entry, however short the TTL the server gives.
pub(crate) const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Most CSRs per `BatchNewX509SVID` call (the server's per-IP signing burst).
pub(crate) const MAX_BATCH: usize = 500;
/// First wait before retrying an entry whose background mint failed; doubles up to
/// [`MAX_RETRY`].
pub(crate) const RETRY: Duration = Duration::from_secs(5);
/// Longest wait before retrying a failed background mint.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(300);
/// For this long after a mint of an entry failed, requests for it get that failure without
/// another call (a burst of requests during an outage makes one call, not one each).
pub(crate) const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// What a mint ended with, as its waiters see it (`None`: not yet).
pub(crate) type Outcome = Option<Result<(), AuthorityError>>;

/// Who waits for a mint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// A request.
    Urgent,
    /// Nobody: a pre-mint or a rotation.
    Background,
}

/// What installing a signed X.509-SVID did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finished {
    /// The entry had no SVID.
    Added,
    /// It replaced the entry's SVID (a rotation, or a re-mint after a change).
    Replaced,
    /// The entry was dropped meanwhile.
    Gone,
}

/// When an SVID is due for rotation: at half the life it had when it was `received` (its
/// notBefore when that is later, or when the time it arrived is unknown), moved by `jitter`
/// (in -1..=1) times a tenth of that half.
///
/// Measured from arrival, not from notBefore: the SPIRE Server backdates notBefore by 10 s,
/// so an SVID of a short TTL is past the middle of its notBefore..notAfter span on arrival.
pub(crate) fn rotate_at(svid: &X509Svid, received: Option<SystemTime>, jitter: f64) -> SystemTime {
    let start = received.map_or(svid.not_before, |r| r.max(svid.not_before));
    let life = svid
        .not_after
        .duration_since(start)
        .unwrap_or(Duration::ZERO);
    let half = life / 2;
    let shift = half.mul_f64(0.1 * jitter.abs().min(1.0));
    let mid = start + half;
    if jitter < 0.0 {
        mid - shift
    } else {
        mid + shift
    }
}

/// The SVID an entry has now.
pub(crate) struct Held {
    pub(crate) svid: Arc<X509Svid>,
    tx: watch::Sender<Arc<X509Svid>>,
    /// The entry version it was minted for (`None`: unknown at the time).
    pub(crate) version: Option<EntryVersion>,
    rotate_at: SystemTime,
    /// Not rotated before this (its mint plus [`MIN_REFRESH`]), even when due.
    earliest: SystemTime,
    /// The bundle authority its chain verifies to (DER).
    anchor: Vec<u8>,
    /// Chains to an authority the server marked tainted: rotate now.
    tainted: bool,
}

struct Job {
    lane: Lane,
    in_flight: bool,
    done: watch::Sender<Outcome>,
}

struct Slot {
    /// The SPIFFE ID the entry has now (what a mint must return).
    spiffe_id: SpiffeId,
    current: Option<Held>,
    job: Option<Job>,
    pinned: bool,
    removed: bool,
    last_used: SystemTime,
    retry_at: Option<SystemTime>,
    failures: u32,
    /// The last failed mint and when.
    failed: Option<(SystemTime, AuthorityError)>,
}

impl Slot {
    fn new(spiffe_id: SpiffeId, now: SystemTime) -> Self {
        Self {
            spiffe_id,
            current: None,
            job: None,
            pinned: false,
            removed: false,
            last_used: now,
            retry_at: None,
            failures: 0,
            failed: None,
        }
    }

    fn held(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| c.tx.receiver_count() > 0)
    }

    fn recently_used(&self, now: SystemTime) -> bool {
        now.duration_since(self.last_used)
            .map_or(true, |d| d < IDLE_KEEP)
    }

    fn failed_lately(&self, now: SystemTime) -> bool {
        self.failed
            .as_ref()
            .is_some_and(|(at, _)| now.duration_since(*at).is_ok_and(|d| d < FAILURE_HOLD))
    }

    fn keep(&self, now: SystemTime) -> bool {
        if self.job.is_some() || self.held() || self.failed_lately(now) {
            return true;
        }
        if self.removed {
            return false;
        }
        self.pinned || (self.current.is_some() && self.recently_used(now))
    }

    fn start_job(&mut self, lane: Lane) -> watch::Receiver<Outcome> {
        let (done, rx) = watch::channel(None);
        self.job = Some(Job {
            lane,
            in_flight: false,
            done,
        });
        rx
    }
}

/// What a request found.
pub(crate) enum Lookup {
    /// An SVID minted for this entry version, valid now.
    Fresh(watch::Receiver<Arc<X509Svid>>),
    /// A mint to wait for; `new`: the urgent lane has work to be told about.
    Wait {
        done: watch::Receiver<Outcome>,
        new: bool,
    },
    /// A mint of this entry failed a moment ago, with this.
    Failed(AuthorityError),
}

/// One mint a lane took.
#[derive(Clone, Debug)]
pub(crate) struct MintJob {
    pub(crate) id: EntryId,
    pub(crate) spiffe_id: SpiffeId,
    /// The entry version when the job was taken.
    pub(crate) version: Option<EntryVersion>,
    pub(crate) lane: Lane,
}

/// What [`SvidTable::plan`] did.
pub(crate) struct Plan {
    /// Background jobs queued.
    pub(crate) queued: usize,
    /// SVIDs dropped.
    pub(crate) dropped: usize,
    /// When to look again, if anything is due later.
    pub(crate) next: Option<SystemTime>,
}

/// Counts, for logs, health and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvidStats {
    /// Entries with an X.509-SVID in memory.
    pub cached: usize,
    /// Of those, how many a stream holds.
    pub held: usize,
    /// Synced entries pre-minted (or about to be).
    pub pinned: usize,
    /// The earliest notAfter of the X.509-SVIDs in memory (`None`: none is).
    pub earliest_expiry: Option<SystemTime>,
}

/// The table (see the module docs).
pub(crate) struct SvidTable {
    slots: HashMap<EntryId, Slot>,
    budget: usize,
    pinned: usize,
    urgent: VecDeque<EntryId>,
    background: VecDeque<EntryId>,
    /// CSRs per call now: halved after a failed call, doubled after a good one.
    limit: usize,
}

impl SvidTable {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            slots: HashMap::new(),
            budget,
            pinned: 0,
            urgent: VecDeque::new(),
            background: VecDeque::new(),
            limit: MAX_BATCH,
        }
    }

    /// A request for the SVID of entry `id` (now `spiffe_id`, at `version`).
    pub(crate) fn lookup(
        &mut self,
        id: &EntryId,
        spiffe_id: &SpiffeId,
        version: Option<EntryVersion>,
        now: SystemTime,
    ) -> Lookup {
        let slot = self
            .slots
            .entry(id.clone())
            .or_insert_with(|| Slot::new(spiffe_id.clone(), now));
        slot.last_used = now;
        if slot.spiffe_id != *spiffe_id {
            slot.spiffe_id = spiffe_id.clone();
        }
        if let Some(c) = &slot.current
            && c.svid.spiffe_id == *spiffe_id
            && now < c.svid.not_after
            && (version.is_none() || c.version == version)
        {
            return Lookup::Fresh(c.tx.subscribe());
        }
        if slot.job.is_none()
            && slot.failed_lately(now)
            && let Some((_, err)) = &slot.failed
        {
            return Lookup::Failed(err.clone());
        }
        match &mut slot.job {
            Some(job) => {
                let promote = job.lane == Lane::Background && !job.in_flight;
                if promote {
                    job.lane = Lane::Urgent;
                    self.urgent.push_back(id.clone());
                }
                Lookup::Wait {
                    done: job.done.subscribe(),
                    new: promote,
                }
            }
            None => {
                let done = slot.start_job(Lane::Urgent);
                self.urgent.push_back(id.clone());
                Lookup::Wait { done, new: true }
            }
        }
    }

    /// After a failed mint: the entry's SVID if it is still valid and names `spiffe_id` (minted
    /// for an older version of the entry, or due for rotation).
    pub(crate) fn fallback(
        &mut self,
        id: &EntryId,
        spiffe_id: &SpiffeId,
        now: SystemTime,
    ) -> Option<watch::Receiver<Arc<X509Svid>>> {
        let c = self.slots.get(id)?.current.as_ref()?;
        (c.svid.spiffe_id == *spiffe_id && now < c.svid.not_after).then(|| c.tx.subscribe())
    }

    /// Whether `lane` has queued work.
    pub(crate) fn queued(&self, lane: Lane) -> bool {
        !self.queue(lane).is_empty()
    }

    fn queue(&self, lane: Lane) -> &VecDeque<EntryId> {
        match lane {
            Lane::Urgent => &self.urgent,
            Lane::Background => &self.background,
        }
    }

    /// Takes up to the current batch limit of `lane`'s queued jobs, marking them in flight.
    pub(crate) fn take(
        &mut self,
        lane: Lane,
        version_of: impl Fn(&EntryId) -> Option<EntryVersion>,
    ) -> Vec<MintJob> {
        let mut out = Vec::new();
        while out.len() < self.limit {
            let next = match lane {
                Lane::Urgent => self.urgent.pop_front(),
                Lane::Background => self.background.pop_front(),
            };
            let Some(id) = next else { break };
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            let Some(job) = &mut slot.job else { continue };
            if job.lane != lane || job.in_flight {
                continue;
            }
            if slot.removed && lane == Lane::Background {
                // The entry left while its pre-mint or rotation waited: nobody needs it.
                slot.job = None;
                continue;
            }
            job.in_flight = true;
            out.push(MintJob {
                version: version_of(&id),
                spiffe_id: slot.spiffe_id.clone(),
                id,
                lane,
            });
        }
        out
    }

    /// The batch limit now.
    #[cfg(test)]
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// A call with `n` CSRs failed: the next ones carry at most half as many.
    pub(crate) fn call_failed(&mut self, n: usize) {
        self.limit = (n / 2).clamp(1, MAX_BATCH);
    }

    /// A call succeeded: the limit grows back.
    pub(crate) fn call_succeeded(&mut self) {
        self.limit = self.limit.saturating_mul(2).min(MAX_BATCH);
    }

    /// Installs what `job` minted and tells its waiters and the holders of the old SVID.
    /// `rotate_at` is when it falls due; `now` is when it arrived. False when the slot is gone
    /// (the entry was dropped meanwhile); [`Finished::Replaced`] when it replaced an SVID
    /// (a rotation, or a re-mint after a change).
    pub(crate) fn finish_ok(
        &mut self,
        job: &MintJob,
        checked: Checked,
        rotate_at: SystemTime,
        now: SystemTime,
    ) -> Finished {
        let earliest = now + MIN_REFRESH;
        let Some(slot) = self.slots.get_mut(&job.id) else {
            return Finished::Gone;
        };
        let svid = Arc::new(checked.svid);
        let replaced = slot.current.is_some();
        match &mut slot.current {
            Some(c) => {
                c.svid = svid.clone();
                c.version = job.version;
                c.rotate_at = rotate_at;
                c.earliest = earliest;
                c.anchor = checked.anchor;
                c.tainted = false;
                c.tx.send_replace(svid);
            }
            None => {
                let (tx, _) = watch::channel(svid.clone());
                slot.current = Some(Held {
                    svid,
                    tx,
                    version: job.version,
                    rotate_at,
                    earliest,
                    anchor: checked.anchor,
                    tainted: false,
                });
            }
        }
        slot.retry_at = None;
        slot.failures = 0;
        slot.failed = None;
        if let Some(j) = slot.job.take() {
            j.done.send_replace(Some(Ok(())));
        }
        if replaced {
            Finished::Replaced
        } else {
            Finished::Added
        }
    }

    /// `job` failed with `err`: its waiters learn why; the entry is retried in the background
    /// after a growing delay.
    pub(crate) fn finish_err(&mut self, job: &MintJob, err: AuthorityError, now: SystemTime) {
        let Some(slot) = self.slots.get_mut(&job.id) else {
            return;
        };
        let wait = RETRY
            .saturating_mul(1u32 << slot.failures.min(8))
            .min(MAX_RETRY);
        slot.failures = slot.failures.saturating_add(1);
        slot.retry_at = Some(now + wait);
        slot.failed = Some((now, err.clone()));
        if let Some(j) = slot.job.take() {
            j.done.send_replace(Some(Err(err)));
        }
    }

    /// Drops what is not worth keeping at `now`, queues the background mints due (pre-mints,
    /// rotations, changed entries, tainted chains), and says when to look again.
    pub(crate) fn plan(
        &mut self,
        now: SystemTime,
        version_of: impl Fn(&EntryId) -> Option<EntryVersion>,
    ) -> Plan {
        let mut next: Option<SystemTime> = None;
        let mut later = |t: SystemTime| next = Some(next.map_or(t, |n| n.min(t)));
        let mut pinned_gone = 0;
        let mut dropped = 0;
        self.slots.retain(|id, s| {
            let keep = s.keep(now);
            if !keep {
                tracing::debug!(entry = %id, removed = s.removed, "dropping an X.509-SVID nobody uses");
                pinned_gone += usize::from(s.pinned);
                dropped += usize::from(s.current.is_some());
            }
            keep
        });
        self.pinned -= pinned_gone;
        let mut queued = 0;
        for (id, s) in &mut self.slots {
            if let Some((at, _)) = &s.failed
                && s.failed_lately(now)
            {
                later(*at + FAILURE_HOLD);
            }
            if s.job.is_some() || s.removed {
                continue;
            }
            if let Some(r) = s.retry_at
                && r > now
            {
                later(r);
                continue;
            }
            let due = match &s.current {
                None => s.pinned,
                Some(c) => {
                    let worth = s.pinned
                        || c.tx.receiver_count() > 0
                        || now
                            .duration_since(s.last_used)
                            .map_or(true, |d| d < IDLE_KEEP);
                    let changed = version_of(id).is_some_and(|v| c.version != Some(v))
                        || c.svid.spiffe_id != s.spiffe_id;
                    let early = c
                        .svid
                        .not_after
                        .duration_since(c.rotate_at)
                        .map_or(Duration::ZERO, |left| (left / 10).min(ROTATE_EARLY));
                    let due_from = c
                        .rotate_at
                        .checked_sub(early)
                        .unwrap_or(c.rotate_at)
                        .max(c.earliest);
                    let due = worth
                        && (changed
                            || c.tainted
                            || due_from <= now
                            || (c.svid.not_after <= now && c.earliest <= now));
                    if !due {
                        later(due_from);
                        if !s.pinned && c.tx.receiver_count() == 0 {
                            later(s.last_used + IDLE_KEEP);
                        }
                    }
                    due
                }
            };
            if due {
                let _ = s.start_job(Lane::Background);
                self.background.push_back(id.clone());
                queued += 1;
            }
        }
        Plan {
            queued,
            dropped,
            next,
        }
    }

    /// The sync added or changed entry `id` (SPIFFE ID `spiffe_id`): pre-minted while the budget
    /// lasts.
    pub(crate) fn upsert(&mut self, id: &EntryId, spiffe_id: &SpiffeId, now: SystemTime) {
        match self.slots.get_mut(id) {
            Some(slot) => {
                slot.removed = false;
                if slot.spiffe_id != *spiffe_id {
                    slot.spiffe_id = spiffe_id.clone();
                }
                if !slot.pinned && self.pinned < self.budget {
                    slot.pinned = true;
                    self.pinned += 1;
                }
            }
            None if self.pinned < self.budget => {
                let mut slot = Slot::new(spiffe_id.clone(), now);
                slot.pinned = true;
                self.pinned += 1;
                self.slots.insert(id.clone(), slot);
            }
            None => {}
        }
    }

    /// The sync removed entry `id`; returns whether pre-mint budget was freed.
    pub(crate) fn remove(&mut self, id: &EntryId) -> bool {
        let Some(slot) = self.slots.get_mut(id) else {
            return false;
        };
        let freed = std::mem::take(&mut slot.pinned);
        if freed {
            self.pinned -= 1;
        }
        if slot.held() || slot.job.is_some() {
            slot.removed = true;
        } else {
            self.slots.remove(id);
        }
        freed
    }

    /// Whether pre-mint budget is left.
    pub(crate) fn budget_left(&self) -> bool {
        self.pinned < self.budget
    }

    /// Marks the SVIDs that chain to any of `tainted` (authority DERs) for rotation; returns
    /// how many.
    pub(crate) fn taint(&mut self, tainted: &[&[u8]]) -> usize {
        let mut n = 0;
        for s in self.slots.values_mut() {
            if let Some(c) = &mut s.current
                && !c.tainted
                && chains_to_any(&c.svid.cert_chain_der, &c.anchor, tainted)
            {
                c.tainted = true;
                n += 1;
            }
        }
        n
    }

    /// Drops every SVID and every job (their holders and waiters see the channels close).
    pub(crate) fn clear(&mut self) {
        self.slots.clear();
        self.urgent.clear();
        self.background.clear();
        self.pinned = 0;
    }

    /// Installs an SVID loaded from the persisted cache.
    pub(crate) fn install_loaded(
        &mut self,
        id: &EntryId,
        checked: Checked,
        version: Option<EntryVersion>,
        rotate_at: SystemTime,
        now: SystemTime,
    ) {
        let svid = Arc::new(checked.svid);
        let slot = self
            .slots
            .entry(id.clone())
            .or_insert_with(|| Slot::new(svid.spiffe_id.clone(), now));
        let (tx, _) = watch::channel(svid.clone());
        slot.current = Some(Held {
            svid,
            tx,
            version,
            rotate_at,
            earliest: now,
            anchor: checked.anchor,
            tainted: false,
        });
    }

    /// Counts.
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

    /// Whether any SVID is valid at `now`.
    pub(crate) fn any_valid(&self, now: SystemTime) -> bool {
        self.slots.values().any(|s| {
            s.current.as_ref().is_some_and(|c| {
                c.svid.not_before <= now + crate::x509::MAX_SKEW && now < c.svid.not_after
            })
        })
    }

    /// Every SVID held, with its entry and version (for the persisted cache).
    pub(crate) fn snapshot(&self) -> Vec<(EntryId, Arc<X509Svid>, Option<EntryVersion>)> {
        let mut out: Vec<_> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.removed)
            .filter_map(|(id, s)| {
                s.current
                    .as_ref()
                    .map(|c| (id.clone(), c.svid.clone(), c.version))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
