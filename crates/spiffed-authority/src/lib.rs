//! The embedded CA: entries -> identities.
//!
//! Owns the trust domain's X.509 CA (ECDSA P-256, persisted in `data_dir/ca.json`, rotated with
//! overlap), mints X.509-SVIDs per entry (shared by every caller matching that entry), re-mints
//! each at half its lifetime, and publishes a change counter that Workload API streams wait on.
//!
//! Given the entry set ([`CaAuthority::run_with_entries`]), the rotation task mints an SVID for
//! every registered entry in the background, before anyone asks, and keeps them rotated whether
//! or not they are used; [`Authority::identities`] then only looks them up. Entries it has not
//! seen (dev mode's synthetic identities, or an entry added a moment ago) are minted on the
//! first request, as a fallback, and kept while a stream holds them or they were used recently.
//!
//! ```no_run
//! # async fn demo() -> Result<(), spiffed_authority::Error> {
//! use std::time::Duration;
//! use spiffed_authority::{AuthorityConfig, CaAuthority};
//! let cfg = AuthorityConfig {
//!     trust_domain: "example.org".parse().map_err(|_| spiffed_authority::Error::Crypto("td".into()))?,
//!     data_dir: "/var/lib/spiffed".into(),
//!     ca_ttl: Duration::from_secs(24 * 3600),
//!     x509_svid_ttl: Duration::from_secs(3600),
//!     jwt_svid_ttl: Duration::from_secs(300),
//! };
//! let authority = CaAuthority::open(cfg)?;
//! let (_stop, stopped) = tokio::sync::watch::channel(false);
//! // The entry set; in the agent it comes from `spiffed_entries::EntrySource::subscribe`.
//! let (_set, entries) = tokio::sync::watch::channel(std::sync::Arc::new(
//!     spiffed_core::EntrySet::new(vec![], 0),
//! ));
//! tokio::spawn(authority.clone().run_with_entries(stopped, entries));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod ca;
mod jwt;
mod jwt_cache;
mod x509;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use spiffed_core::{
    Authority, AuthorityError, Entry, EntryId, EntrySet, Identity, JwtAuthority, JwtBundle,
    JwtError, JwtSvid, Lease, TrustDomain, ValidatedJwt, X509Bundle, X509Svid,
};
use tokio::sync::{Notify, watch};

use crate::ca::{KeyFile, Material};
use crate::jwt::JwtSigner;
pub use crate::jwt_cache::{
    DEFAULT_JWT_CACHE_BYTES, DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY, JwtCacheLimits,
};
use crate::jwt_cache::{JwtCache, JwtSlot};
use crate::x509::Signer;

/// Errors of the authority.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The CA file exists but cannot be understood. It is never replaced silently: a new CA
    /// would break trust with every workload holding the old bundle.
    #[error(
        "the CA file {} is corrupt ({why}); restore it from backup, or move it away to start \
         a new CA (workloads must then fetch the new bundle)",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The CA file belongs to another trust domain.
    #[error(
        "the CA file {} belongs to trust domain {found:?}, not {wanted:?}; use another data_dir",
        path.display()
    )]
    OtherTrustDomain {
        /// The file.
        path: PathBuf,
        /// Its trust domain.
        found: String,
        /// The configured one.
        wanted: String,
    },
    /// Key generation, signing or certificate encoding failed.
    #[error("crypto failure: {0}")]
    Crypto(String),
}

impl Error {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }
}

/// What the authority needs to know.
#[derive(Clone, Debug)]
pub struct AuthorityConfig {
    /// The trust domain signed for.
    pub trust_domain: TrustDomain,
    /// Where `ca.json` lives (created 0700 if missing).
    pub data_dir: PathBuf,
    /// Lifetime of each CA certificate.
    pub ca_ttl: Duration,
    /// Default X.509-SVID lifetime (entries may override).
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime (entries may override).
    pub jwt_svid_ttl: Duration,
}

/// Shortest wait before re-minting an SVID, so a tiny lifetime cannot make the task spin.
const MIN_REFRESH: Duration = Duration::from_millis(250);
/// An on-demand SVID nobody holds a lease on is kept (and rotated) this long after its last use.
const IDLE_KEEP: Duration = Duration::from_secs(60);
/// How long to wait before retrying a failed CA rotation (e.g. the disk is full) or SVID mint.
const RETRY: Duration = Duration::from_secs(5);
/// Background mints per published change: each publish wakes every open stream, so a new entry
/// set of thousands of entries must not publish once per SVID.
const BATCH: usize = 64;

/// Why an SVID is cached, which decides how long it is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tenure {
    /// Minted on request for an entry outside the entry set (dev mode's synthetic identities, or
    /// an entry the rotation task has not seen yet): kept while a stream holds a lease on it or
    /// it was used within [`IDLE_KEEP`].
    OnDemand,
    /// Its entry is in the current entry set: kept and rotated whether or not anyone uses it.
    Registered,
    /// Its entry left the entry set: kept (and rotated) only while a stream holds a lease on it.
    Removed,
}

struct Slot {
    entry: Arc<Entry>,
    svid: Arc<X509Svid>,
    refresh_at: SystemTime,
    last_used: SystemTime,
    lease: Arc<()>,
    tenure: Tenure,
}

impl Slot {
    /// Whether a stream holds a lease on this SVID (the slot keeps one reference itself).
    fn held(&self) -> bool {
        Arc::strong_count(&self.lease) > 1
    }
}

/// Why the rotation task mints an SVID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// A registered entry has no usable SVID (new, changed, or expired).
    Fill,
    /// The SVID reached half its lifetime.
    Rotate,
}

/// One SVID for the rotation task to mint without holding the state lock.
struct Job {
    entry: Arc<Entry>,
    /// The serial of the SVID this one replaces, `None` if the entry had none. The new SVID is
    /// installed only if the cache still holds exactly that, so a mint that raced with another
    /// (an on-demand one by a request) is discarded instead of replacing it.
    replaces: Option<Vec<u8>>,
    why: Why,
}

/// What installing a minted SVID did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Installed {
    /// The entry had no SVID.
    Added,
    /// It replaced one that someone may hold: streams must be told.
    Replaced,
    /// The cache changed while minting; the new SVID was discarded.
    Skipped,
    /// Minting failed (logged).
    Failed,
}

/// What [`CaAuthority::upkeep`] leaves for the rotation task to do without the lock.
struct Upkeep {
    /// When to run again (CA deadlines, the earliest SVID refresh not yet due).
    next: SystemTime,
    /// SVIDs due for re-minting.
    jobs: Vec<Job>,
    /// The signer to mint them with.
    signer: Arc<Signer>,
}

/// How a run of background mints ended.
#[derive(Clone, Copy, Debug, Default)]
struct Worked {
    /// At least one mint failed.
    failed: bool,
    /// It stopped early (the agent stops, or the entry set changed again).
    interrupted: bool,
}

struct State {
    keys: KeyFile,
    signer: Arc<Signer>,
    jwt_signer: JwtSigner,
    bundle: Arc<X509Bundle>,
    jwt_bundle: Arc<JwtBundle>,
    svids: HashMap<EntryId, Slot>,
    /// The entries of the last entry set the rotation task saw, by id.
    registered: HashMap<EntryId, Arc<Entry>>,
    /// JWT-SVIDs by (entry, audience set), bounded ([`JwtCacheLimits`]).
    jwts: JwtCache,
    generation: u64,
}

impl State {
    /// Rebuilds signers and bundles from `keys`.
    fn install(keys: KeyFile, td: &TrustDomain, rng: &SystemRandom) -> Result<Self, Error> {
        let signer = Arc::new(make_signer(&keys)?);
        let jwt_active = keys
            .jwt
            .active()
            .ok_or_else(|| Error::Crypto("no active JWT key".into()))?;
        let jwt_signer = JwtSigner::new(jwt_active, rng)?;
        let (bundle, jwt_bundle) = bundles(&keys, td);
        Ok(Self {
            keys,
            signer,
            jwt_signer,
            bundle,
            jwt_bundle,
            svids: HashMap::new(),
            registered: HashMap::new(),
            jwts: JwtCache::default(),
            generation: 0,
        })
    }
}

fn bundles(keys: &KeyFile, td: &TrustDomain) -> (Arc<X509Bundle>, Arc<JwtBundle>) {
    let x509 = Arc::new(X509Bundle {
        trust_domain: td.clone(),
        authorities: keys.x509.bundle(),
        sequence: keys.x509.sequence,
    });
    let jwt = Arc::new(JwtBundle {
        trust_domain: td.clone(),
        keys: keys
            .jwt
            .cas
            .iter()
            .filter_map(|c| match &c.material {
                Material::Jwt { kid, public } => Some(JwtAuthority {
                    kid: kid.clone(),
                    public_point: public.clone(),
                    not_after: c.not_after,
                }),
                Material::X509 { .. } => None,
            })
            .collect(),
        sequence: keys.jwt.sequence,
    });
    (x509, jwt)
}

/// Advances both key sets to `now`; returns whether anything changed.
fn advance_keys(
    keys: &mut KeyFile,
    cfg: &AuthorityConfig,
    now: SystemTime,
    rng: &SystemRandom,
) -> Result<bool, Error> {
    let td = &cfg.trust_domain;
    let a = keys
        .x509
        .advance(now, &mut ca::x509_minter(td, cfg.ca_ttl, rng))?;
    let b = keys.jwt.advance(now, &mut jwt::minter(cfg.ca_ttl, rng))?;
    Ok(a || b)
}

struct Inner {
    cfg: AuthorityConfig,
    file: PathBuf,
    rng: SystemRandom,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    wake: Notify,
}

/// The embedded CA and SVID cache. Cheap to clone.
#[derive(Clone)]
pub struct CaAuthority {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CaAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaAuthority")
            .field("trust_domain", &self.inner.cfg.trust_domain)
            .finish_non_exhaustive()
    }
}

fn same_params(a: &Entry, b: &Entry) -> bool {
    a.spiffe_id == b.spiffe_id && a.dns_names == b.dns_names && a.x509_svid_ttl == b.x509_svid_ttl
}

impl CaAuthority {
    /// Loads the CA from `data_dir` (creating and persisting one on first start) and brings its
    /// rotation up to date.
    pub fn open(cfg: AuthorityConfig) -> Result<Self, Error> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| Error::io(&cfg.data_dir, "create directory", e))?;
        let file = ca::ca_file(&cfg.data_dir);
        let rng = SystemRandom::new();
        let td = &cfg.trust_domain;
        let mut keys = KeyFile::load(&file, td)?.unwrap_or_default();
        if advance_keys(&mut keys, &cfg, SystemTime::now(), &rng)? || !file.exists() {
            keys.save(&file, td)?;
        }
        let state = State::install(keys, td, &rng)?;
        let (changes, _) = watch::channel(0);
        Ok(Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                cfg,
                file,
                rng,
                changes,
                wake: Notify::new(),
            }),
        })
    }

    /// Bounds the JWT-SVID cache (default [`JwtCacheLimits::default`]); what no longer fits
    /// is evicted at once, and minted again when asked for.
    pub fn set_jwt_cache_limits(&self, limits: JwtCacheLimits) {
        self.lock().jwts.set_limits(limits);
    }

    /// How many JWT-SVIDs are cached.
    pub fn cached_jwt_svids(&self) -> usize {
        self.lock().jwts.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than stopping service, so take the data either way.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Mints an SVID for `entry` (key generation and signing, about 50 µs). Callers on the
    /// request path hold the state lock; the rotation task does not.
    fn mint(
        &self,
        signer: &Signer,
        entry: &Arc<Entry>,
        now: SystemTime,
    ) -> Result<Slot, AuthorityError> {
        let ttl = entry.x509_svid_ttl.unwrap_or(self.inner.cfg.x509_svid_ttl);
        let m = x509::mint_svid(
            signer,
            &entry.spiffe_id,
            &entry.dns_names,
            ttl,
            now,
            &self.inner.rng,
        )
        .map_err(|e| AuthorityError::Mint {
            spiffe_id: entry.spiffe_id.to_string(),
            reason: e.to_string(),
        })?;
        let life = m.not_after.duration_since(now).unwrap_or(Duration::ZERO);
        let svid = Arc::new(X509Svid {
            spiffe_id: entry.spiffe_id.clone(),
            cert_chain_der: m.chain_der,
            key: m.key,
            serial: m.serial,
            not_before: m.not_before,
            not_after: m.not_after,
        });
        tracing::debug!(spiffe_id = %entry.spiffe_id, entry = %entry.id, serial = %x509::hex(&svid.serial), "minted X.509-SVID");
        Ok(Slot {
            entry: entry.clone(),
            svid,
            refresh_at: now + (life / 2).max(MIN_REFRESH),
            last_used: now,
            lease: Arc::new(()),
            tenure: Tenure::OnDemand,
        })
    }

    fn publish(&self, generation: u64) {
        self.inner.changes.send_replace(generation);
    }

    /// Counts one change and wakes every open stream.
    fn bump(&self) {
        let g = {
            let mut st = self.lock();
            st.generation += 1;
            st.generation
        };
        self.publish(g);
    }

    /// Brings CA rotation and SVID refreshes up to `now`; returns when to run again.
    ///
    /// Due SVIDs are minted here, all of them, outside the state lock; the rotation task
    /// ([`CaAuthority::run`]) does the same work in batches that yield to the runtime.
    pub fn tick(&self, now: SystemTime) -> SystemTime {
        let Upkeep {
            mut next,
            jobs,
            signer,
        } = self.upkeep(now);
        let mut replaced = false;
        for job in jobs {
            let (done, refresh_at) = self.mint_and_install(&signer, job, now);
            replaced |= done == Installed::Replaced;
            if let Some(at) = refresh_at {
                next = next.min(at);
            }
        }
        if replaced {
            self.bump();
        }
        next
    }

    /// The part of [`CaAuthority::tick`] done under the state lock: CA and JWT key rotation,
    /// sweeping expired JWT-SVIDs and SVIDs nobody needs any more, and collecting the SVIDs
    /// due for re-minting (which the caller mints without the lock). Publishes a change if the
    /// CA key set changed.
    fn upkeep(&self, now: SystemTime) -> Upkeep {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut changed = false;
        let td = self.inner.cfg.trust_domain.clone();
        let mut next = now + Duration::from_secs(30);

        // CA and JWT key rotation: persist before use, so a crash never loses a key that
        // signed something. This signs under the lock, but only when a CA rotation step is
        // due (hours apart), and requests must not mint with a signer being replaced.
        // Copy the key set (private keys included) only when a rotation step is due.
        let due = [st.keys.x509.next_deadline(), st.keys.jwt.next_deadline()]
            .into_iter()
            .any(|d| d.is_none_or(|d| d <= now));
        let mut candidate = KeyFile::default();
        let advanced = if due {
            candidate = st.keys.clone();
            advance_keys(&mut candidate, &self.inner.cfg, now, &self.inner.rng)
        } else {
            Ok(false)
        };
        match advanced {
            Ok(false) => {}
            Ok(true) => match candidate.save(&self.inner.file, &td).and_then(|()| {
                let signer = make_signer(&candidate)?;
                let jwt_active = candidate
                    .jwt
                    .active()
                    .ok_or_else(|| Error::Crypto("no active JWT key".into()))?;
                Ok((signer, JwtSigner::new(jwt_active, &self.inner.rng)?))
            }) {
                Ok((signer, jwt_signer)) => {
                    let activated = signer.cert_der != st.signer.cert_der;
                    st.signer = Arc::new(signer);
                    st.jwt_signer = jwt_signer;
                    let (bundle, jwt_bundle) = bundles(&candidate, &td);
                    st.bundle = bundle;
                    st.jwt_bundle = jwt_bundle;
                    st.keys = candidate;
                    changed = true;
                    tracing::info!(
                        x509_sequence = st.keys.x509.sequence,
                        x509_authorities = st.keys.x509.cas.len(),
                        jwt_sequence = st.keys.jwt.sequence,
                        jwt_authorities = st.keys.jwt.cas.len(),
                        activated,
                        "CA key set changed"
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "CA rotation failed; retrying");
                    next = next.min(now + RETRY);
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "CA rotation failed; retrying");
                next = next.min(now + RETRY);
            }
        }
        for d in [st.keys.x509.next_deadline(), st.keys.jwt.next_deadline()]
            .into_iter()
            .flatten()
        {
            next = next.min(d);
        }
        // Expired JWT-SVIDs leave the cache.
        st.jwts.retain(|_, j| j.svid.expiry > now);

        // SVIDs of registered entries stay; those of removed entries stay while leased; those
        // minted on demand stay while leased or recently used (checked when they fall due).
        // What stays is re-minted at half-life.
        let mut jobs = Vec::new();
        st.svids.retain(|id, s| {
            let keep = match s.tenure {
                Tenure::Registered => true,
                Tenure::Removed => s.held(),
                Tenure::OnDemand => {
                    s.refresh_at > now
                        || s.held()
                        || now
                            .duration_since(s.last_used)
                            .map_or(true, |d| d < IDLE_KEEP)
                }
            };
            if !keep {
                tracing::debug!(entry = %id, tenure = ?s.tenure, "dropping unused SVID");
                return false;
            }
            if s.refresh_at <= now {
                jobs.push(Job {
                    entry: s.entry.clone(),
                    replaces: Some(s.svid.serial.clone()),
                    why: Why::Rotate,
                });
            } else {
                next = next.min(s.refresh_at);
            }
            true
        });
        let signer = st.signer.clone();
        drop(guard);
        if changed {
            self.bump();
        }
        Upkeep { next, jobs, signer }
    }

    /// Mints `job` without the state lock, then installs the result under it (see
    /// [`Job::replaces`]). Returns what happened and the entry's next refresh time.
    fn mint_and_install(
        &self,
        signer: &Signer,
        job: Job,
        now: SystemTime,
    ) -> (Installed, Option<SystemTime>) {
        let minted = self.mint(signer, &job.entry, now);
        let mut guard = self.lock();
        let State {
            svids, registered, ..
        } = &mut *guard;
        let current = svids.get_mut(&job.entry.id);
        let current_serial = current.as_ref().map(|s| s.svid.serial.as_slice());
        let still_wanted = match job.why {
            Why::Rotate => true,
            Why::Fill => registered
                .get(&job.entry.id)
                .is_some_and(|r| same_params(r, &job.entry)),
        };
        if current_serial != job.replaces.as_deref() || !still_wanted {
            return (Installed::Skipped, current.map(|s| s.refresh_at));
        }
        let mut fresh = match minted {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::error!(error = %e, entry = %job.entry.id, "minting an SVID in the background failed; retrying");
                // A registered entry's fill is retried by the rotation task's next sync.
                let current = current.filter(|_| job.why == Why::Rotate);
                return (
                    Installed::Failed,
                    current.map(|s| {
                        s.refresh_at = now + RETRY;
                        s.refresh_at
                    }),
                );
            }
        };
        fresh.tenure = if registered.contains_key(&job.entry.id) {
            Tenure::Registered
        } else {
            current.as_ref().map_or(Tenure::OnDemand, |s| s.tenure)
        };
        let refresh_at = fresh.refresh_at;
        let done = match svids.insert(job.entry.id.clone(), fresh) {
            Some(old) => {
                if let Some(new) = svids.get_mut(&job.entry.id) {
                    new.lease = old.lease;
                    new.last_used = old.last_used;
                }
                Installed::Replaced
            }
            None => Installed::Added,
        };
        (done, Some(refresh_at))
    }

    /// Learns a new entry set: marks which cached SVIDs are registered, drops those of removed
    /// entries that no stream holds, and returns the registered entries that need an SVID.
    fn plan_sync(&self, set: &EntrySet, now: SystemTime) -> (Vec<Job>, Arc<Signer>) {
        let fresh: HashMap<EntryId, Arc<Entry>> = set
            .entries()
            .iter()
            .map(|e| (e.id.clone(), e.clone()))
            .collect();
        let mut guard = self.lock();
        let st = &mut *guard;
        // The old map is freed after the lock is released.
        let old = std::mem::replace(&mut st.registered, fresh);
        let registered = &st.registered;
        st.svids.retain(|id, s| {
            if registered.contains_key(id) {
                s.tenure = Tenure::Registered;
                return true;
            }
            match s.tenure {
                Tenure::OnDemand => true,
                Tenure::Registered | Tenure::Removed => {
                    s.tenure = Tenure::Removed;
                    let keep = s.held();
                    if !keep {
                        tracing::debug!(entry = %id, "dropping the SVID of a removed entry");
                    }
                    keep
                }
            }
        });
        let mut jobs = Vec::new();
        for e in set.entries() {
            match st.svids.get(&e.id) {
                Some(s) if same_params(&s.entry, e) && s.svid.not_after > now => {}
                other => jobs.push(Job {
                    entry: e.clone(),
                    replaces: other.map(|s| s.svid.serial.clone()),
                    why: Why::Fill,
                }),
            }
        }
        let signer = st.signer.clone();
        drop(guard);
        drop(old);
        (jobs, signer)
    }

    /// Mints `jobs` without the state lock, yielding to the runtime after each so request
    /// handlers are not starved, and publishes one change per [`BATCH`] mints that replaced an
    /// SVID (new SVIDs need none: no stream can hold an SVID of an entry that had none). Stops
    /// early when `interrupted` returns true.
    async fn work(
        &self,
        signer: Arc<Signer>,
        jobs: Vec<Job>,
        interrupted: impl Fn() -> bool,
    ) -> Worked {
        let mut worked = Worked::default();
        let mut replaced = false;
        for (i, job) in jobs.into_iter().enumerate() {
            let (done, _) = self.mint_and_install(&signer, job, SystemTime::now());
            match done {
                Installed::Replaced => replaced = true,
                Installed::Failed => worked.failed = true,
                Installed::Added | Installed::Skipped => {}
            }
            if replaced && (i + 1) % BATCH == 0 {
                self.bump();
                replaced = false;
            }
            tokio::task::yield_now().await;
            if interrupted() {
                worked.interrupted = true;
                break;
            }
        }
        if replaced {
            self.bump();
        }
        worked
    }

    /// Learns `set` and mints, in the background, an SVID for each of its entries that has none.
    async fn sync(&self, set: &EntrySet, interrupted: impl Fn() -> bool) -> Worked {
        let (jobs, signer) = self.plan_sync(set, SystemTime::now());
        if !jobs.is_empty() {
            tracing::debug!(
                entries = set.entries().len(),
                to_mint = jobs.len(),
                "minting X.509-SVIDs for the entry set"
            );
        }
        self.work(signer, jobs, interrupted).await
    }

    /// Runs rotation until `stop` becomes true. SVIDs are minted on first request and kept
    /// while used; [`CaAuthority::run_with_entries`] also mints them ahead for every entry.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        self.serve(stop, None).await;
    }

    /// Runs rotation until `stop` becomes true, and keeps an X.509-SVID minted and rotated for
    /// every entry of the set in `entries`, minted here (off the request path) when the set
    /// first arrives and whenever it changes. SVIDs of entries that leave the set are dropped
    /// once no stream holds them. If the sender of `entries` goes away, the last set stays.
    pub async fn run_with_entries(
        self,
        stop: watch::Receiver<bool>,
        entries: watch::Receiver<Arc<EntrySet>>,
    ) {
        self.serve(stop, Some(entries)).await;
    }

    async fn serve(
        self,
        mut stop: watch::Receiver<bool>,
        mut entries: Option<watch::Receiver<Arc<EntrySet>>>,
    ) {
        let stopped = |stop: &watch::Receiver<bool>| *stop.borrow() || stop.has_changed().is_err();
        // Whether the entry set must be (re)read: at start, on change, after a failed mint.
        let mut dirty = entries.is_some();
        let mut resync_at: Option<SystemTime> = None;
        loop {
            if stopped(&stop) {
                return;
            }
            let now = SystemTime::now();
            let Upkeep { next, jobs, signer } = self.upkeep(now);
            if !jobs.is_empty() {
                self.work(signer, jobs, || stopped(&stop)).await;
                // Again: the new SVIDs' refresh times are part of the next deadline.
                continue;
            }
            if resync_at.is_some_and(|t| t <= now) {
                resync_at = None;
                dirty = true;
            }
            if dirty && let Some(rx) = &mut entries {
                let set = rx.borrow_and_update().clone();
                let worked = self
                    .sync(&set, || stopped(&stop) || rx.has_changed().unwrap_or(false))
                    .await;
                if worked.failed {
                    resync_at = Some(SystemTime::now() + RETRY);
                }
                // A set that changed while minting is read at the next turn.
                dirty = rx.has_changed().unwrap_or(false);
                continue;
            }
            let deadline = resync_at.map_or(next, |t| next.min(t));
            let wait = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(10));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.inner.wake.notified() => {}
                r = entries_changed(&mut entries) => {
                    if r.is_ok() {
                        dirty = true;
                    } else {
                        // The entry source is gone (the agent stops): keep the last set.
                        entries = None;
                    }
                }
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }

    /// The path of the CA file.
    pub fn ca_file(&self) -> &Path {
        &self.inner.file
    }
}

/// Resolves when the entry set changes; never without one.
async fn entries_changed(
    entries: &mut Option<watch::Receiver<Arc<EntrySet>>>,
) -> Result<(), watch::error::RecvError> {
    match entries {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

fn make_signer(keys: &KeyFile) -> Result<Signer, Error> {
    let a = keys
        .x509
        .active()
        .ok_or_else(|| Error::Crypto("no active CA".into()))?;
    let cert = a
        .cert_der()
        .ok_or_else(|| Error::Crypto("the active CA has no certificate".into()))?;
    Signer::new(cert, &a.key_pkcs8, a.not_after)
}

impl Authority for CaAuthority {
    fn trust_domain(&self) -> &TrustDomain {
        &self.inner.cfg.trust_domain
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn x509_bundle(&self) -> Arc<X509Bundle> {
        self.lock().bundle.clone()
    }

    fn identities(&self, entries: &[Arc<Entry>]) -> Result<(Vec<Identity>, Lease), AuthorityError> {
        let now = SystemTime::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut minted = false;
        let mut out = Vec::with_capacity(entries.len());
        let mut lease = Lease::default();
        for e in entries {
            // The fallback: the rotation task mints registered entries ahead, but may not have
            // caught up with a set that changed a moment ago.
            let fresh = match st.svids.get(&e.id) {
                Some(s) if same_params(&s.entry, e) && s.svid.not_after > now => None,
                current => {
                    let mut slot = self.mint(&st.signer, e, now)?;
                    slot.tenure = if st.registered.contains_key(&e.id) {
                        Tenure::Registered
                    } else {
                        current.map_or(Tenure::OnDemand, |s| s.tenure)
                    };
                    Some(slot)
                }
            };
            if let Some(slot) = fresh {
                let old = st.svids.insert(e.id.clone(), slot);
                minted = true;
                if let (Some(old), Some(new)) = (old, st.svids.get_mut(&e.id)) {
                    new.lease = old.lease;
                }
            }
            if let Some(s) = st.svids.get_mut(&e.id) {
                s.last_used = now;
                lease.0.push(s.lease.clone());
                out.push(Identity {
                    entry: e.clone(),
                    x509: s.svid.clone(),
                });
            }
        }
        if minted {
            st.generation += 1;
            let g = st.generation;
            drop(guard);
            self.publish(g);
            // The rotation task must learn the new refresh deadline.
            self.inner.wake.notify_one();
        }
        Ok((out, lease))
    }

    fn jwt_bundle(&self) -> Arc<JwtBundle> {
        self.lock().jwt_bundle.clone()
    }

    fn jwt_svids(
        &self,
        entries: &[Arc<Entry>],
        audience: &[String],
    ) -> Result<Vec<Arc<JwtSvid>>, AuthorityError> {
        let now = SystemTime::now();
        let mut aud: Vec<String> = audience.to_vec();
        aud.sort();
        aud.dedup();
        let mut st = self.lock();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let key = (e.id.clone(), aud.clone());
            if let Some(j) = st.jwts.get(&key)
                && j.refresh_at > now
                && j.entry.spiffe_id == e.spiffe_id
                && j.entry.jwt_svid_ttl == e.jwt_svid_ttl
            {
                out.push(j.svid.clone());
                continue;
            }
            let ttl = e.jwt_svid_ttl.unwrap_or(self.inner.cfg.jwt_svid_ttl);
            let (token, issued_at, expiry) = st
                .jwt_signer
                .sign(&e.spiffe_id, &aud, ttl, now, &self.inner.rng)
                .map_err(|err| AuthorityError::Mint {
                    spiffe_id: e.spiffe_id.to_string(),
                    reason: err.to_string(),
                })?;
            let life = expiry.duration_since(issued_at).unwrap_or(Duration::ZERO);
            let svid = Arc::new(JwtSvid {
                spiffe_id: e.spiffe_id.clone(),
                token,
                expiry,
                issued_at,
            });
            tracing::debug!(spiffe_id = %e.spiffe_id, entry = %e.id, kid = %st.jwt_signer.kid, "minted JWT-SVID");
            st.jwts.insert(
                key,
                JwtSlot::new(e.clone(), svid.clone(), issued_at + life / 2),
            );
            out.push(svid);
        }
        Ok(out)
    }

    fn validate_jwt(&self, token: &str, audience: &str) -> Result<ValidatedJwt, JwtError> {
        let bundle = self.jwt_bundle();
        jwt::validate(token, audience, SystemTime::now(), |td| {
            (td == &bundle.trust_domain).then(|| bundle.keys.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiffed_core::Selector;

    fn entry(id: &str, path: &str, ttl: Option<Duration>) -> Arc<Entry> {
        Arc::new(Entry {
            id: EntryId::new(id),
            spiffe_id: format!("spiffe://example.org/{path}").parse().unwrap(),
            selectors: vec!["unix:uid:1".parse::<Selector>().unwrap()],
            x509_svid_ttl: ttl,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
        })
    }

    fn cfg(dir: &Path) -> AuthorityConfig {
        AuthorityConfig {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            data_dir: dir.to_owned(),
            ca_ttl: Duration::from_secs(3600),
            x509_svid_ttl: Duration::from_secs(600),
            jwt_svid_ttl: Duration::from_secs(300),
        }
    }

    #[test]
    fn svids_are_shared_per_entry_and_bundle_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = CaAuthority::open(cfg(dir.path())).unwrap();
        let web = entry("1", "web", None);
        let (one, _l1) = a.identities(std::slice::from_ref(&web)).unwrap();
        let (two, _l2) = a.identities(std::slice::from_ref(&web)).unwrap();
        assert!(
            Arc::ptr_eq(&one[0].x509, &two[0].x509),
            "one SVID per entry"
        );
        let db = entry("2", "db", None);
        let (both, _) = a.identities(&[web, db]).unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(
            both[1].x509.spiffe_id.to_string(),
            "spiffe://example.org/db"
        );
        let bundle = a.x509_bundle();
        drop(a);
        let again = CaAuthority::open(cfg(dir.path())).unwrap();
        assert_eq!(again.x509_bundle().authorities, bundle.authorities);
    }

    #[test]
    fn one_caller_cannot_flood_the_jwt_cache() {
        let dir = tempfile::tempdir().unwrap();
        let a = CaAuthority::open(cfg(dir.path())).unwrap();
        let (web, db) = (entry("1", "web", None), entry("2", "db", None));
        let db_aud = vec!["db-client".to_owned()];
        let db_token = a.jwt_svids(std::slice::from_ref(&db), &db_aud).unwrap();
        // One identity asks for 300 distinct audience sets of 4 KiB each.
        for i in 0..300 {
            let aud = vec![format!("{i:04}{}", "x".repeat(4096))];
            a.jwt_svids(std::slice::from_ref(&web), &aud).unwrap();
        }
        let held = a.lock().jwts.len();
        assert!(
            held <= DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY + 1,
            "{held} JWT-SVIDs cached"
        );
        // The other identity's token was not pushed out: the same token comes back.
        let again = a.jwt_svids(std::slice::from_ref(&db), &db_aud).unwrap();
        assert!(Arc::ptr_eq(&db_token[0], &again[0]));
        // A byte budget smaller than what is held evicts at once; later tokens still mint.
        a.set_jwt_cache_limits(JwtCacheLimits {
            bytes: 32 * 1024,
            entries_per_identity: 8,
        });
        assert!(a.cached_jwt_svids() <= 6, "{}", a.cached_jwt_svids());
        let aud = vec!["z".repeat(4096)];
        let fresh = a.jwt_svids(std::slice::from_ref(&web), &aud).unwrap();
        assert_eq!(fresh.len(), 1);
        assert!(a.cached_jwt_svids() <= 6);
    }

    #[test]
    fn changed_entry_parameters_re_mint() {
        let dir = tempfile::tempdir().unwrap();
        let a = CaAuthority::open(cfg(dir.path())).unwrap();
        let (one, _) = a.identities(&[entry("1", "web", None)]).unwrap();
        let (two, _) = a.identities(&[entry("1", "api", None)]).unwrap();
        assert_ne!(one[0].x509.serial, two[0].x509.serial);
        assert_eq!(
            two[0].x509.spiffe_id.to_string(),
            "spiffe://example.org/api"
        );
    }

    #[test]
    fn tick_rotates_at_half_life_and_keeps_leased_svids() {
        let dir = tempfile::tempdir().unwrap();
        let a = CaAuthority::open(cfg(dir.path())).unwrap();
        let rx = a.changes();
        let (ids, lease) = a.identities(&[entry("1", "web", None)]).unwrap();
        let first = ids[0].x509.clone();
        let life = first.not_after.duration_since(SystemTime::now()).unwrap();
        // Before half-life nothing changes.
        a.tick(SystemTime::now());
        let (same, _) = a.identities(&[entry("1", "web", None)]).unwrap();
        assert!(Arc::ptr_eq(&same[0].x509, &first));
        // After half-life (and long past the idle window) a leased SVID is re-minted.
        let later = SystemTime::now() + life / 2 + IDLE_KEEP + Duration::from_secs(1);
        a.tick(later);
        let st = a.lock();
        let slot = st.svids.get(&EntryId::new("1")).unwrap();
        assert_ne!(slot.svid.serial, first.serial);
        drop(st);
        assert!(rx.has_changed().unwrap());
        drop(lease);
        drop(same);
        // Unleased and idle: dropped at its next refresh.
        let much_later = later + Duration::from_secs(600);
        a.tick(much_later);
        assert!(a.lock().svids.is_empty());
    }

    fn set(entries: &[Arc<Entry>], revision: u64) -> Arc<EntrySet> {
        Arc::new(EntrySet::new(entries.to_vec(), revision))
    }

    fn entries(n: usize) -> Vec<Arc<Entry>> {
        (0..n)
            .map(|i| entry(&format!("e{i:03}"), &format!("w{i}"), None))
            .collect()
    }

    fn serial(a: &CaAuthority, id: &str) -> Option<Vec<u8>> {
        a.lock()
            .svids
            .get(&EntryId::new(id))
            .map(|s| s.svid.serial.clone())
    }

    fn tenure(a: &CaAuthority, id: &str) -> Option<Tenure> {
        a.lock().svids.get(&EntryId::new(id)).map(|s| s.tenure)
    }

    /// Waits (in real time: minting is real work) until `cond` holds.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..3000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn registered_entries_are_minted_ahead_and_served_without_minting() {
        let dir = tempfile::tempdir().unwrap();
        let a = CaAuthority::open(cfg(dir.path())).unwrap();
        let all = entries(5);
        let (set_tx, set_rx) = watch::channel(set(&all, 1));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(a.clone().run_with_entries(stop_rx, set_rx));
        until("pre-minting", || a.lock().svids.len() == all.len()).await;

        let changes = a.changes();
        let before = *changes.borrow();
        let pre: Vec<_> = all.iter().map(|e| serial(&a, e.id.as_str())).collect();
        let (ids, _lease) = a.identities(&all).unwrap();
        let got: Vec<_> = ids.iter().map(|i| Some(i.x509.serial.clone())).collect();
        assert_eq!(got, pre, "served the pre-minted SVIDs");
        assert_eq!(*changes.borrow(), before, "nothing was minted");
        assert!(!changes.has_changed().unwrap());
        assert_eq!(tenure(&a, "e000"), Some(Tenure::Registered));

        // A new entry in the set is minted ahead too.
        let mut more = all.clone();
        more.push(entry("new", "new", None));
        set_tx.send(set(&more, 2)).unwrap();
        until("the new entry", || serial(&a, "new").is_some()).await;
        let minted = serial(&a, "new");
        let (ids, _) = a.identities(&more[5..]).unwrap();
        assert_eq!(Some(ids[0].x509.serial.clone()), minted);

        // The entry source going away does not stop rotation; `stop` does.
        drop(set_tx);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn removed_entries_lose_their_svid_unless_leased() {
        let dir = tempfile::tempdir().unwrap();
        let a = CaAuthority::open(cfg(dir.path())).unwrap();
        let all = entries(3);
        let (set_tx, set_rx) = watch::channel(set(&all, 1));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(a.clone().run_with_entries(stop_rx, set_rx));
        until("pre-minting", || a.lock().svids.len() == 3).await;
        // A synthetic identity (dev mode) is never in the set: minted on request, unleased.
        let synthetic = entry("synthetic/uid-1/x", "uid-1/x", None);
        drop(a.identities(std::slice::from_ref(&synthetic)).unwrap());
        // A stream holds entry 1's SVID.
        let (held, lease) = a.identities(&all[1..2]).unwrap();
        let gone = serial(&a, "e002").unwrap();

        set_tx.send(set(&all[..1], 2)).unwrap();
        until("the removal", || serial(&a, "e002").is_none()).await;
        assert_eq!(tenure(&a, "e000"), Some(Tenure::Registered));
        assert_eq!(tenure(&a, "e001"), Some(Tenure::Removed), "leased: kept");
        assert_eq!(serial(&a, "e001"), Some(held[0].x509.serial.clone()));
        assert_eq!(
            tenure(&a, "synthetic/uid-1/x"),
            Some(Tenure::OnDemand),
            "synthetic SVIDs keep the on-demand rules"
        );

        // Asking for the removed entry again (a caller on a stale set) mints a new SVID.
        let changes = a.changes();
        let before = *changes.borrow();
        let (again, _) = a.identities(&all[2..]).unwrap();
        assert_ne!(again[0].x509.serial, gone);
        assert!(*changes.borrow() > before);

        // Once the stream lets go, the removed entry's SVID goes at the next tick.
        drop((held, lease));
        a.tick(SystemTime::now());
        assert!(serial(&a, "e001").is_none());
        assert!(serial(&a, "e000").is_some());
        assert!(serial(&a, "synthetic/uid-1/x").is_some(), "recently used");

        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn background_minting_publishes_once_per_batch() {
        let dir = tempfile::tempdir().unwrap();
        let a = CaAuthority::open(cfg(dir.path())).unwrap();
        let changes = a.changes();
        let n = 50;
        let all = entries(n);
        let worked = a.sync(&set(&all, 1), || false).await;
        assert!(!worked.failed && !worked.interrupted);
        assert_eq!(a.lock().svids.len(), n);
        // New SVIDs need no publish: no stream can hold an SVID of an entry that had none.
        assert_eq!(*changes.borrow(), 0);

        // Streams hold them all; then every entry changes: each SVID is replaced.
        let (_ids, _lease) = a.identities(&all).unwrap();
        let changed: Vec<_> = all
            .iter()
            .map(|e| {
                let mut e = (**e).clone();
                e.dns_names = vec!["web.internal".into()];
                Arc::new(e)
            })
            .collect();
        let before = *changes.borrow();
        let worked = a.sync(&set(&changed, 2), || false).await;
        assert!(!worked.failed);
        let moved = *changes.borrow() - before;
        assert!(
            (1..=n.div_ceil(BATCH) as u64).contains(&moved),
            "{moved} publishes for {n} SVIDs"
        );
        let st = a.lock();
        assert!(
            changed
                .iter()
                .all(|e| same_params(&st.svids[&e.id].entry, e))
        );
    }

    #[tokio::test]
    async fn a_background_mint_never_replaces_one_made_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let a = CaAuthority::open(cfg(dir.path())).unwrap();
        let all = entries(2);
        let (jobs, signer) = a.plan_sync(&set(&all, 1), SystemTime::now());
        assert_eq!(jobs.len(), 2);
        // A request mints entry 0 on demand while the background mint is under way.
        let (ids, _lease) = a.identities(&all[..1]).unwrap();
        let worked = a.work(signer, jobs, || false).await;
        assert!(!worked.failed);
        assert_eq!(serial(&a, "e000"), Some(ids[0].x509.serial.clone()));
        assert_eq!(tenure(&a, "e000"), Some(Tenure::Registered));
        assert!(serial(&a, "e001").is_some());
    }

    #[tokio::test]
    async fn registered_svids_rotate_at_half_life_even_unused() {
        let dir = tempfile::tempdir().unwrap();
        let a = CaAuthority::open(cfg(dir.path())).unwrap();
        let ttl = Some(Duration::from_secs(20));
        let web = entry("web", "web", ttl);
        a.sync(&set(std::slice::from_ref(&web), 1), || false).await;
        // For contrast, an on-demand SVID with the same lifetime, not leased.
        let synthetic = entry("synthetic/uid-1/x", "uid-1/x", ttl);
        drop(a.identities(std::slice::from_ref(&synthetic)).unwrap());
        let rx = a.changes();
        let first = serial(&a, "web").unwrap();

        // Before half-life nothing changes.
        a.tick(SystemTime::now());
        assert_eq!(serial(&a, "web"), Some(first.clone()));
        // Past half-life and the idle window: the registered SVID is re-minted though nobody
        // used it; the idle on-demand one is dropped.
        let later = SystemTime::now() + IDLE_KEEP + Duration::from_secs(11);
        a.tick(later);
        let second = serial(&a, "web").unwrap();
        assert_ne!(second, first);
        assert!(serial(&a, "synthetic/uid-1/x").is_none());
        assert!(rx.has_changed().unwrap());
        // And again at the next half-life.
        let next = a.tick(later);
        assert!(next <= later + Duration::from_secs(10));
        a.tick(later + Duration::from_secs(11));
        let third = serial(&a, "web").unwrap();
        assert_ne!(third, second);
        assert_eq!(tenure(&a, "web"), Some(Tenure::Registered));
    }
}
