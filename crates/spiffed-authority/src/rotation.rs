//! The rotation task: CA key rotation, SVID pre-minting and rotation, following the entry feed.
//!
//! Every turn: (1) a CA rotation step if one is due, built on a copy of the key file outside
//! the state lock (key generation, `ca.json` written with fsync) and swapped in under it;
//! (2) under the lock, a sweep of the SVIDs nobody needs and the list of SVIDs due; (3) those
//! minted outside the lock, a batch at a time, each installed under it (waking only the
//! streams holding that entry); (4) the entry feed's changes applied to the cache.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffed_core::{EntryEvent, EntryFeed};
use tokio::sync::watch;

use crate::ca;
use crate::config::NewRootPolicy;
use crate::issuer::{CaAuthority, lock};
use crate::keys::{Built, Report, advance_keys, log_created};
use crate::svid_cache::{Installed, Job};
use crate::x509::Signer;

/// The longest the task sleeps (it also wakes on entry changes, requests and `stop`).
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// What [`CaAuthority::upkeep`] leaves for the rotation task to do without the lock.
pub(crate) struct Upkeep {
    /// When to run again (CA deadlines, the earliest SVID refresh not yet due).
    pub(crate) next: SystemTime,
    /// SVIDs due for minting (empty when no CA is valid now).
    pub(crate) jobs: Vec<Job>,
    /// The signer to mint them with (`None`: no CA is valid now).
    pub(crate) signer: Option<Arc<Signer>>,
}

impl CaAuthority {
    /// One CA rotation step if due at `now`. Key generation and the `ca.json` write run on a
    /// copy of the key file, outside the state lock; the result is swapped in under it. Returns
    /// when a failed step may be retried, if one failed or waits out its backoff.
    fn rotate_keys(&self, now: SystemTime) -> Option<SystemTime> {
        let _one_at_a_time = lock(&self.inner.rotating);
        let (mut candidate, replaces) = {
            let st = self.lock();
            if !st.keys.due(now) {
                return None;
            }
            if let Some(retry_at) = st.keys.rotation.waiting(now) {
                return Some(retry_at);
            }
            // Copy the key set (private keys included) only when a step is due.
            (
                st.keys.keys.clone(),
                st.keys.keys.x509.needs_new_root(now, "CA"),
            )
        };
        let cfg = &self.inner.cfg;
        let td = &cfg.trust_domain;
        let refuse = (cfg.new_root != NewRootPolicy::Always).then_some(self.inner.file.as_path());
        // Persist before use, so a crash never loses a key that signed something.
        let stepped =
            advance_keys(&mut candidate, cfg, now, &self.inner.rng, refuse).and_then(|changed| {
                if !changed {
                    return Ok(None);
                }
                candidate.save(&self.inner.file, td)?;
                Built::new(candidate, td, &self.inner.rng).map(Some)
            });
        let mut st = self.lock();
        let keys = &mut st.keys;
        match stepped {
            Ok(step) => {
                if let Some((since, failures)) = keys.rotation.succeeded() {
                    tracing::warn!(
                        since = %ca::rfc3339(since), failures,
                        file = %self.inner.file.display(),
                        "CA rotation works again"
                    );
                }
                if let Some(built) = step {
                    log_created(
                        Some(&keys.keys),
                        &built.keys,
                        replaces.as_deref(),
                        &self.inner.file,
                    );
                    let activated = keys.swap(built);
                    tracing::info!(
                        x509_sequence = keys.keys.x509.sequence,
                        x509_authorities = keys.keys.x509.cas.len(),
                        jwt_sequence = keys.keys.jwt.sequence,
                        jwt_authorities = keys.keys.jwt.cas.len(),
                        activated,
                        "CA key set changed"
                    );
                    let bundle = keys.bundle.clone();
                    self.publish_own(bundle);
                }
                None
            }
            Err(e) => {
                let (wait, report) = keys.rotation.failed(now);
                let retry_in = humantime::format_duration(wait).to_string();
                match report {
                    Report::First => tracing::error!(
                        error = %e, %retry_in,
                        "CA rotation failed; retrying with backoff (logged again every 5 \
                         minutes while it fails)"
                    ),
                    Report::Repeat => tracing::error!(
                        error = %e, %retry_in, failures = keys.rotation.alarm.count,
                        since = %ca::rfc3339(keys.rotation.alarm.since.unwrap_or(now)),
                        "CA rotation still failing"
                    ),
                    Report::Quiet => {
                        tracing::debug!(error = %e, %retry_in, "CA rotation failed again");
                    }
                }
                Some(now + wait)
            }
        }
    }

    /// CA rotation, then, under the state lock: sweeping expired JWT-SVIDs and X.509-SVIDs
    /// nobody needs any more, and collecting the SVIDs due for minting (which the caller mints
    /// without the lock).
    pub(crate) fn upkeep(&self, now: SystemTime) -> Upkeep {
        let mut next = now + MAX_SLEEP;
        if let Some(retry_at) = self.rotate_keys(now) {
            next = next.min(retry_at);
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        if let Some(d) = st.keys.next_deadline(now) {
            next = next.min(d);
        }
        st.jwts.retain(|_, j| j.svid.expiry > now);
        st.svids.sweep(now);
        let due = st.svids.due(now);
        if let Some(d) = due.next {
            next = next.min(d);
        }
        if due.jobs.is_empty() {
            return Upkeep {
                next,
                jobs: due.jobs,
                signer: None,
            };
        }
        let signer = self.signer_for(&mut st.keys, now).ok();
        let jobs = if signer.is_some() { due.jobs } else { vec![] };
        Upkeep { next, jobs, signer }
    }

    /// Mints `job` without the state lock, then installs it under it.
    pub(crate) fn mint_and_install(
        &self,
        signer: &Signer,
        job: &Job,
        now: SystemTime,
    ) -> Option<Installed> {
        let minted = self.mint(signer, &job.entry, now);
        let mut st = self.lock();
        match minted {
            Ok(svid) => Some(st.svids.install_job(job, svid, now)),
            Err(e) => {
                tracing::error!(error = %e, entry = %job.entry.id, "minting an X.509-SVID in the background failed; retrying");
                st.svids.job_failed(job, now);
                None
            }
        }
    }

    /// Brings CA rotation and SVID refreshes up to `now`, minting everything due at once;
    /// returns when to run again. The rotation task does the same work in batches that yield
    /// to the runtime; this is for driving the authority on a manual clock.
    pub fn tick(&self, now: SystemTime) -> SystemTime {
        let Upkeep { next, jobs, signer } = self.upkeep(now);
        if let Some(signer) = signer {
            let mut batch = Batch::default();
            for job in &jobs {
                batch.count(self.mint_and_install(&signer, job, now));
            }
            self.finish_batch(&batch, now);
        }
        let after = self.lock().svids.due(now).next;
        after.map_or(next, |a| next.min(a))
    }

    /// Mints `jobs` without the state lock, yielding to the runtime after each so request
    /// handlers are not starved; stops early when `interrupted` says so. All of them: each
    /// turn that plans jobs sweeps the whole cache, so stopping after a few and planning again
    /// would make pre-minting a large budget quadratic. A job planned before an entry changed
    /// is refused at install (it replaces an SVID no longer there).
    async fn work(&self, signer: &Signer, jobs: &[Job], interrupted: impl Fn() -> bool) {
        let mut batch = Batch::default();
        for job in jobs {
            batch.count(self.mint_and_install(signer, job, self.now()));
            tokio::task::yield_now().await;
            if interrupted() {
                break;
            }
        }
        self.finish_batch(&batch, self.now());
    }

    /// Counts a batch's rotations and logs it: one info line per batch that replaced SVIDs
    /// (never one per SVID or per stream).
    fn finish_batch(&self, batch: &Batch, now: SystemTime) {
        self.rotated(batch.replaced, now);
        if batch.replaced > 0 {
            tracing::info!(
                rotated = batch.replaced,
                added = batch.added,
                failed = batch.failed,
                "rotated X.509-SVIDs"
            );
        } else if batch.added > 0 {
            tracing::debug!(
                added = batch.added,
                failed = batch.failed,
                "pre-minted X.509-SVIDs"
            );
        }
    }

    /// Re-reads the whole registry: every cached entry is updated or dropped, and the pre-mint
    /// budget filled. O(cached entries + budget); done at start and after missed events.
    pub(crate) fn resync(&self, feed: &EntryFeed) -> u64 {
        let now = self.now();
        let index = feed.read();
        let mut st = self.lock();
        st.svids
            .resync(|id| index.get(id).cloned(), index.iter(), now);
        index.revision()
    }

    /// Applies one event that directly follows what the cache knows.
    fn apply(&self, feed: &EntryFeed, event: &EntryEvent) {
        let now = self.now();
        let refill = {
            let mut st = self.lock();
            let mut freed = false;
            for change in &event.changes {
                match (&change.old, &change.new) {
                    (_, Some(new)) => st.svids.upsert(new, now),
                    (Some(old), None) => freed |= st.svids.remove(&old.id),
                    (None, None) => {}
                }
            }
            freed && st.svids.budget_left()
        };
        if refill {
            // Lock order: the index, then the state.
            let index = feed.read();
            self.lock().svids.fill(index.iter(), now);
        }
    }

    /// Brings the cache up to the feed's latest event; `seen` is the revision it reflects.
    pub(crate) fn follow(&self, feed: &mut EntryFeed, seen: &mut Option<u64>) {
        let event = feed.latest();
        match *seen {
            Some(s) if event.revision <= s => {}
            Some(s) if event.follows(s) => {
                self.apply(feed, &event);
                *seen = Some(event.revision);
            }
            _ => {
                let revision = self.resync(feed);
                if seen.is_some() {
                    tracing::debug!(revision, "missed entry events: re-read every entry");
                }
                *seen = Some(revision);
            }
        }
    }

    /// Runs rotation until `stop` becomes true (or its sender is gone). SVIDs are minted on
    /// first request and kept while used; [`CaAuthority::run_with_entries`] also pre-mints.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        self.serve(stop, None).await;
    }

    /// Runs rotation until `stop` becomes true (or its sender is gone), following the
    /// registered entries in `feed`: up to [`AuthorityConfig::premint_entries`] of them get an
    /// X.509-SVID minted here, ahead of any request; changed entries' SVIDs are re-minted
    /// (and sent to the streams holding them) or forgotten; removed entries' SVIDs are dropped
    /// once no stream holds them. When the feed ends (its publisher is dropped), rotation goes
    /// on with the entries last seen.
    ///
    /// [`AuthorityConfig::premint_entries`]: crate::AuthorityConfig::premint_entries
    pub async fn run_with_entries(self, stop: watch::Receiver<bool>, feed: EntryFeed) {
        self.serve(stop, Some(feed)).await;
    }

    async fn serve(self, mut stop: watch::Receiver<bool>, mut feed: Option<EntryFeed>) {
        let stopped = |stop: &watch::Receiver<bool>| *stop.borrow() || stop.has_changed().is_err();
        let mut seen = None;
        loop {
            if stopped(&stop) {
                return;
            }
            if let Some(f) = &mut feed {
                self.follow(f, &mut seen);
            }
            let now = self.now();
            let Upkeep { next, jobs, signer } = self.upkeep(now);
            if let Some(signer) = signer
                && !jobs.is_empty()
            {
                self.work(&signer, &jobs, || stopped(&stop)).await;
                // Again: the feed may have moved, and the new SVIDs' refresh times are part of
                // the next deadline.
                continue;
            }
            let next = {
                let mut st = self.lock();
                let next = st.missed.take().map_or(next, |m| next.min(m));
                st.planned = Some(next);
                next
            };
            let wait = next
                .duration_since(self.now())
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(10));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.inner.wake.notified() => {}
                ended = feed_changed(&mut feed) => {
                    if ended {
                        // The entry source is gone (the agent stops): keep what was seen.
                        feed = None;
                    }
                }
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
            self.lock().planned = None;
        }
    }
}

/// What one batch of background mints did.
#[derive(Debug, Default)]
struct Batch {
    /// SVIDs that replaced one held before (rotations, re-mints after a change).
    replaced: u64,
    /// SVIDs for entries that had none (pre-mints).
    added: u64,
    /// Mints that failed (logged one by one, retried).
    failed: u64,
}

impl Batch {
    fn count(&mut self, installed: Option<Installed>) {
        match installed {
            Some(Installed::Replaced) => self.replaced += 1,
            Some(Installed::Added) => self.added += 1,
            Some(Installed::Skipped) => {}
            None => self.failed += 1,
        }
    }
}

/// Resolves when the feed has a new event (false) or has ended (true); never without a feed.
async fn feed_changed(feed: &mut Option<EntryFeed>) -> bool {
    match feed {
        // `follow` reads the event at the next turn.
        Some(f) => f.changed().await.is_none(),
        None => std::future::pending().await,
    }
}
