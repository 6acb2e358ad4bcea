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
//!     new_root: spiffed_authority::NewRootPolicy::Refuse,
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
mod clock;
mod jwt;
mod jwt_cache;
mod x509;

pub use clock::{Clock, SystemClock};

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

use crate::ca::{CaState, KeyFile, Material};
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
        "the CA file {} is corrupt ({why}); restore it from backup, or move it away and start \
         with --new-trust-root to create a new CA (workloads must then fetch the new bundle)",
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
    /// A CA would have to be created that no earlier CA announced in the bundle: a new trust
    /// root for every workload and peer, which needs the operator's consent
    /// ([`NewRootPolicy`]).
    #[error(
        "the CA file {} {why}; creating a new CA would silently replace the trust root of every \
         workload and peer. Restore the file from a backup, or, to accept a new trust root, start \
         once with `spiffed run --new-trust-root` (workloads and peers must then fetch the new \
         bundle)",
        path.display()
    )]
    NewTrustRoot {
        /// The CA file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// No CA (or JWT key) is valid at this moment, so nothing may be signed.
    #[error("no CA is valid now: {0}")]
    NoValidCa(String),
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

/// When the authority may create a CA that no earlier CA announced in the bundle (a new trust
/// root): on a data dir that held a CA or an entry store before, that CA was deleted, emptied,
/// retired or let expire, and a new one silently breaks trust with every workload and peer.
/// A CA created on a fresh data dir, and the scheduled rotation (prepared, published, then
/// activated), are always allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NewRootPolicy {
    /// Never: start-up fails with [`Error::NewTrustRoot`]; while running (every CA expired, as
    /// after a forward clock jump) nothing is signed until the operator acts. `spiffed run`.
    #[default]
    Refuse,
    /// At start-up, with a warning naming the new CA's fingerprint; while running, as
    /// [`NewRootPolicy::Refuse`]. `spiffed run --new-trust-root`.
    AtStart,
    /// Whenever no CA can sign, at start-up or while running, with a warning naming the new CA's
    /// fingerprint. `spiffed dev`, which is zero-config.
    Always,
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
    /// When a new trust root may be created.
    pub new_root: NewRootPolicy,
}

/// The entry store's file in `data_dir`: its presence shows the data dir was used before.
const STORE_FILE: &str = "entries.sqlite";

/// Shortest wait before re-minting an SVID, so a tiny lifetime cannot make the task spin.
const MIN_REFRESH: Duration = Duration::from_millis(250);
/// An on-demand SVID nobody holds a lease on is kept (and rotated) this long after its last use.
const IDLE_KEEP: Duration = Duration::from_secs(60);
/// How long to wait before retrying a failed SVID mint or entry-set sync.
const RETRY: Duration = Duration::from_secs(5);
/// The first wait after a failed CA rotation step (e.g. `ca.json` cannot be written: the disk is
/// full, or no file descriptor is left); it doubles with each failure in a row, up to
/// [`ROTATION_BACKOFF_MAX`].
const ROTATION_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two attempts of a failing CA rotation step.
const ROTATION_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// While a failure repeats (rotation, or no CA valid), a summary line is logged this often; the
/// first occurrence and the recovery are logged at once.
const ALARM_REPEAT: Duration = Duration::from_secs(300);
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
    /// The signer to mint them with (`None`: no CA is valid now, and `jobs` is empty).
    signer: Option<Arc<Signer>>,
}

/// A failure that may recur on every request or retry, logged once per burst: the first
/// occurrence, then a summary every [`ALARM_REPEAT`] while it lasts, then its end.
#[derive(Debug, Default)]
struct Alarm {
    /// When the current burst began; `None` while all is well.
    since: Option<SystemTime>,
    /// Occurrences in the current burst.
    count: u64,
    /// When a line about the current burst was last logged.
    logged: Option<SystemTime>,
}

/// What [`Alarm::raise`] asks the caller to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Report {
    /// The first occurrence of a burst: log it loudly.
    First,
    /// Still failing, [`ALARM_REPEAT`] after the last line: log a summary.
    Repeat,
    /// Logged recently: stay quiet.
    Quiet,
}

impl Alarm {
    /// Counts one occurrence at `now`.
    fn raise(&mut self, now: SystemTime) -> Report {
        self.count += 1;
        if self.since.is_none() {
            self.since = Some(now);
            self.logged = Some(now);
            return Report::First;
        }
        // A clock that went back (`logged` in the future) also gets a fresh line.
        let recent = self
            .logged
            .is_some_and(|l| now.duration_since(l).is_ok_and(|d| d < ALARM_REPEAT));
        if recent {
            Report::Quiet
        } else {
            self.logged = Some(now);
            Report::Repeat
        }
    }

    /// Ends the burst: when it began and how often it occurred, if there was one.
    fn clear(&mut self) -> Option<(SystemTime, u64)> {
        let since = self.since.take()?;
        self.logged = None;
        Some((since, std::mem::take(&mut self.count)))
    }
}

/// The retry state of CA rotation: after a failed step (the new `ca.json` cannot be written,
/// say), the next attempt waits [`ROTATION_BACKOFF_MIN`], doubling up to
/// [`ROTATION_BACKOFF_MAX`], so a full disk costs a line and an attempt a minute, not a spin.
#[derive(Debug, Default)]
struct Rotation {
    /// The burst of failures in a row; its count drives the backoff.
    alarm: Alarm,
    /// No attempt before this.
    retry_at: Option<SystemTime>,
}

impl Rotation {
    /// When the next attempt is due, if it is later than `now`. A retry time further away than
    /// the longest backoff means the clock went back: retry now.
    fn waiting(&self, now: SystemTime) -> Option<SystemTime> {
        self.retry_at
            .filter(|&r| r > now && r <= now + ROTATION_BACKOFF_MAX)
    }

    /// Counts a failure at `now`; returns the wait before the next attempt and what to log.
    fn failed(&mut self, now: SystemTime) -> (Duration, Report) {
        let report = self.alarm.raise(now);
        let doublings = u32::try_from(self.alarm.count.saturating_sub(1).min(16)).unwrap_or(16);
        let wait = ROTATION_BACKOFF_MIN
            .saturating_mul(1 << doublings)
            .min(ROTATION_BACKOFF_MAX);
        self.retry_at = Some(now + wait);
        (wait, report)
    }

    /// A step succeeded (or had nothing to do): the burst, if any, ends.
    fn succeeded(&mut self) -> Option<(SystemTime, u64)> {
        self.retry_at = None;
        self.alarm.clear()
    }
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
    /// A signer per X.509 CA in `keys`, with its role.
    signers: Vec<(CaState, Arc<Signer>)>,
    jwt_signer: JwtSigner,
    bundle: Arc<X509Bundle>,
    jwt_bundle: Arc<JwtBundle>,
    svids: HashMap<EntryId, Slot>,
    /// The entries of the last entry set the rotation task saw, by id.
    registered: HashMap<EntryId, Arc<Entry>>,
    /// JWT-SVIDs by (entry, audience set), bounded ([`JwtCacheLimits`]).
    jwts: JwtCache,
    generation: u64,
    /// Failing CA rotation steps: backoff and their log lines.
    rotation: Rotation,
    /// No CA valid at the moment (clock jumped, or every CA expired): requests are refused.
    no_ca: Alarm,
    /// The active CA is not valid at the moment, but an older one is and signs instead.
    fallback: Alarm,
}

impl State {
    /// Rebuilds signers and bundles from `keys`.
    fn install(keys: KeyFile, td: &TrustDomain, rng: &SystemRandom) -> Result<Self, Error> {
        let signers = make_signers(&keys)?;
        let jwt_active = keys
            .jwt
            .active()
            .ok_or_else(|| Error::Crypto("no active JWT key".into()))?;
        let jwt_signer = JwtSigner::new(jwt_active, rng)?;
        let (bundle, jwt_bundle) = bundles(&keys, td);
        Ok(Self {
            keys,
            signers,
            jwt_signer,
            bundle,
            jwt_bundle,
            svids: HashMap::new(),
            registered: HashMap::new(),
            jwts: JwtCache::default(),
            generation: 0,
            rotation: Rotation::default(),
            no_ca: Alarm::default(),
            fallback: Alarm::default(),
        })
    }

    /// The CA that signs at `now`: the active one if it is valid then, else the valid one that
    /// lasts longest (a prepared or retired CA, published in the bundle). `None` if none is
    /// valid at `now`.
    fn signer_at(&self, now: SystemTime) -> Option<(CaState, Arc<Signer>)> {
        self.signers
            .iter()
            .find(|(state, s)| *state == CaState::Active && s.valid_at(now))
            .or_else(|| {
                self.signers
                    .iter()
                    .filter(|(_, s)| s.valid_at(now))
                    .max_by_key(|(_, s)| s.not_after)
            })
            .cloned()
    }

    /// Why no CA is valid at `now`, for the log and the callers refused.
    fn no_ca_reason(&self, now: SystemTime, policy: NewRootPolicy) -> String {
        let cas = &self.keys.x509.cas;
        let now_s = ca::rfc3339(now);
        if let Some(nb) = cas
            .iter()
            .map(ca::Ca::not_before)
            .filter(|&nb| nb > now)
            .min()
        {
            return format!(
                "the CA certificate is valid from {} but the clock says {now_s}: the clock is \
                 behind (set back, or not yet synchronised); signing resumes when it reaches \
                 that time",
                ca::rfc3339(nb)
            );
        }
        let Some(last) = cas.iter().map(|c| c.not_after).max() else {
            return "there is no CA".into();
        };
        let fix = match policy {
            NewRootPolicy::Always => "a new CA is being created",
            NewRootPolicy::Refuse | NewRootPolicy::AtStart => {
                "the clock jumped forward, or rotation failed for too long; fix the clock, or \
                 restart with `spiffed run --new-trust-root` to create a new trust root"
            }
        };
        format!(
            "every CA expired (the last at {}, and the clock says {now_s}): {fix}",
            ca::rfc3339(last)
        )
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

/// Advances both key sets to `now`; returns whether anything changed. A new trust root is
/// refused (naming this CA file) when `refuse_new_root` is set; a JWT key set that never had a
/// key (a `ca.json` from before JWT support) may always get its first one.
fn advance_keys(
    keys: &mut KeyFile,
    cfg: &AuthorityConfig,
    now: SystemTime,
    rng: &SystemRandom,
    refuse_new_root: Option<&Path>,
) -> Result<bool, Error> {
    let td = &cfg.trust_domain;
    let a = keys.x509.advance(
        now,
        &mut ca::x509_minter(td, cfg.ca_ttl, rng),
        refuse_new_root,
    )?;
    let jwt_gate = refuse_new_root.filter(|_| !keys.jwt.cas.is_empty());
    let b = keys
        .jwt
        .advance(now, &mut jwt::minter(cfg.ca_ttl, rng), jwt_gate)?;
    Ok(a || b)
}

/// Logs every key in `new` that `old` did not hold, with its fingerprint: one that signs at
/// once is a new trust root (info on a fresh data dir, where `replaced` is `None`; a warning
/// otherwise, saying what it replaces); one prepared by the scheduled rotation is logged at info.
fn log_created(old: Option<&KeyFile>, new: &KeyFile, replaced: Option<&str>, file: &Path) {
    let held = |m: &Material| {
        old.is_some_and(|o| {
            o.x509
                .cas
                .iter()
                .chain(o.jwt.cas.iter())
                .any(|c| &c.material == m)
        })
    };
    for c in new.x509.cas.iter().chain(new.jwt.cas.iter()) {
        if held(&c.material) {
            continue;
        }
        let kind = match c.material {
            Material::X509 { .. } => "CA",
            Material::Jwt { .. } => "JWT signing key",
        };
        let fingerprint = c.fingerprint();
        let not_after = ca::rfc3339(c.not_after);
        match (c.state, replaced) {
            (CaState::Prepared, _) => tracing::info!(
                %fingerprint, %not_after, file = %file.display(),
                "prepared the next {kind}: published in the bundle now, signs later"
            ),
            (_, None) => tracing::info!(
                %fingerprint, %not_after, file = %file.display(),
                "created the {kind} (there was none before)"
            ),
            (_, Some(why)) => tracing::warn!(
                %fingerprint, %not_after, file = %file.display(), replaces = why,
                "created a NEW {kind}: a new trust root; workloads and peers that hold the old \
                 bundle no longer trust what it signs until they fetch the new one"
            ),
        }
    }
}

struct Inner {
    cfg: AuthorityConfig,
    clock: Arc<dyn Clock>,
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
    ///
    /// Every key in `ca.json` must parse and match its certificate or public key. If no CA in
    /// it can sign (the file is gone while the entry store is there, or it holds no CA, only
    /// retired ones, or only expired ones), a new CA would be a new trust root: that fails
    /// with [`Error::NewTrustRoot`] unless [`AuthorityConfig::new_root`] allows it, and is then
    /// logged as a warning with the new CA's fingerprint.
    pub fn open(cfg: AuthorityConfig) -> Result<Self, Error> {
        Self::open_with_clock(cfg, clock::system())
    }

    /// [`CaAuthority::open`] with the time read from `clock` (tests make it jump).
    pub fn open_with_clock(cfg: AuthorityConfig, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| Error::io(&cfg.data_dir, "create directory", e))?;
        let file = ca::ca_file(&cfg.data_dir);
        let rng = SystemRandom::new();
        let td = &cfg.trust_domain;
        let now = clock.now();
        let loaded = KeyFile::load(&file, td)?;
        // Why a CA made now would replace an earlier trust root, if it would.
        let store = cfg.data_dir.join(STORE_FILE);
        let replaces = match &loaded {
            Some(k) => k.x509.needs_new_root(now, "CA").or_else(|| {
                if k.jwt.cas.is_empty() {
                    None
                } else {
                    k.jwt.needs_new_root(now, "JWT signing key")
                }
            }),
            None if store.exists() => Some(format!(
                "is missing, but the entry store {} shows that this data_dir held a CA before",
                store.display()
            )),
            None => None,
        };
        if let Some(why) = &replaces
            && cfg.new_root == NewRootPolicy::Refuse
        {
            return Err(Error::NewTrustRoot {
                path: file,
                why: why.clone(),
            });
        }
        if replaces.is_none() && loaded.is_some() && cfg.new_root == NewRootPolicy::AtStart {
            tracing::info!(
                file = %file.display(),
                "--new-trust-root is not needed: the CA file holds a CA that can sign; keeping it"
            );
        }
        let mut keys = loaded.clone().unwrap_or_default();
        if advance_keys(&mut keys, &cfg, now, &rng, None)? || !file.exists() {
            keys.save(&file, td)?;
        }
        log_created(loaded.as_ref(), &keys, replaces.as_deref(), &file);
        let state = State::install(keys, td, &rng)?;
        let (changes, _) = watch::channel(0);
        let authority = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                cfg,
                clock,
                file,
                rng,
                changes,
                wake: Notify::new(),
            }),
        };
        // A clock behind the CA's notBefore is reported at once, not at the first request.
        {
            let mut st = authority.lock();
            let _ = authority.signer_for(&mut st, now);
        }
        Ok(authority)
    }

    /// The current time, from the injected clock.
    fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// The CA to sign with at `now`, or why nothing may be signed. Both the lack of a valid CA
    /// and signing with an older CA because the active one is not valid yet are logged once
    /// per burst (and when they end).
    fn signer_for(&self, st: &mut State, now: SystemTime) -> Result<Arc<Signer>, AuthorityError> {
        let Some((state, signer)) = st.signer_at(now) else {
            let reason = st.no_ca_reason(now, self.inner.cfg.new_root);
            match st.no_ca.raise(now) {
                Report::First => {
                    tracing::error!(
                        %reason, file = %self.inner.file.display(),
                        "no CA is valid at this moment: refusing to sign SVIDs"
                    );
                    // A request may notice a clock jump first: let the rotation task act on it
                    // now (dev mode replaces the CA) rather than at its next deadline.
                    self.inner.wake.notify_one();
                }
                Report::Repeat => tracing::error!(
                    %reason, refused = st.no_ca.count,
                    since = %ca::rfc3339(st.no_ca.since.unwrap_or(now)),
                    "still no CA valid: refusing to sign SVIDs"
                ),
                Report::Quiet => {}
            }
            return Err(AuthorityError::Unavailable(reason));
        };
        if let Some((since, refused)) = st.no_ca.clear() {
            tracing::warn!(
                since = %ca::rfc3339(since), refused,
                fingerprint = %ca::fingerprint(&signer.cert_der),
                "a CA is valid again: signing resumes"
            );
        }
        if state == CaState::Active {
            if let Some((since, _)) = st.fallback.clear() {
                tracing::info!(since = %ca::rfc3339(since), "the active CA is valid again and signs");
            }
        } else if st.fallback.raise(now) != Report::Quiet {
            tracing::warn!(
                fingerprint = %ca::fingerprint(&signer.cert_der), ?state,
                "the active CA is not valid at this moment (the clock is behind its notBefore?); \
                 signing with an older CA that still is"
            );
        }
        Ok(signer)
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
        .map_err(|e| mint_error(&entry.spiffe_id, e))?;
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
        // Without a signer `jobs` is empty.
        if let Some(signer) = signer {
            for job in jobs {
                let (done, refresh_at) = self.mint_and_install(&signer, job, now);
                replaced |= done == Installed::Replaced;
                if let Some(at) = refresh_at {
                    next = next.min(at);
                }
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
        // Copy the key set (private keys included) only when a rotation step is due, and not
        // while a failed step waits out its backoff.
        let due = [st.keys.x509.next_deadline(), st.keys.jwt.next_deadline()]
            .into_iter()
            .any(|d| d.is_none_or(|d| d <= now));
        let waiting = st.rotation.waiting(now);
        if let Some(retry_at) = waiting.filter(|_| due) {
            next = next.min(retry_at);
        } else if due {
            let policy = self.inner.cfg.new_root;
            let refuse = (policy != NewRootPolicy::Always).then_some(self.inner.file.as_path());
            let replaces = st.keys.x509.needs_new_root(now, "CA");
            let mut candidate = st.keys.clone();
            let stepped = advance_keys(
                &mut candidate,
                &self.inner.cfg,
                now,
                &self.inner.rng,
                refuse,
            )
            .and_then(|changed| {
                if !changed {
                    return Ok(None);
                }
                candidate.save(&self.inner.file, &td)?;
                let signers = make_signers(&candidate)?;
                let jwt_active = candidate
                    .jwt
                    .active()
                    .ok_or_else(|| Error::Crypto("no active JWT key".into()))?;
                Ok(Some((
                    signers,
                    JwtSigner::new(jwt_active, &self.inner.rng)?,
                )))
            });
            match stepped {
                Ok(step) => {
                    if let Some((since, failures)) = st.rotation.succeeded() {
                        tracing::warn!(
                            since = %ca::rfc3339(since), failures,
                            file = %self.inner.file.display(),
                            "CA rotation works again"
                        );
                    }
                    if let Some((signers, jwt_signer)) = step {
                        let active = |s: &[(CaState, Arc<Signer>)]| {
                            s.iter()
                                .find(|(state, _)| *state == CaState::Active)
                                .map(|(_, s)| s.cert_der.clone())
                        };
                        let activated = active(&signers) != active(&st.signers);
                        log_created(
                            Some(&st.keys),
                            &candidate,
                            replaces.as_deref(),
                            &self.inner.file,
                        );
                        st.signers = signers;
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
                }
                Err(e) => {
                    let (wait, report) = st.rotation.failed(now);
                    next = next.min(now + wait);
                    let retry_in = humantime::format_duration(wait).to_string();
                    match report {
                        Report::First => tracing::error!(
                            error = %e, %retry_in,
                            "CA rotation failed; retrying with backoff (logged again every 5 \
                             minutes while it fails)"
                        ),
                        Report::Repeat => tracing::error!(
                            error = %e, %retry_in, failures = st.rotation.alarm.count,
                            since = %ca::rfc3339(st.rotation.alarm.since.unwrap_or(now)),
                            "CA rotation still failing"
                        ),
                        Report::Quiet => {
                            tracing::debug!(error = %e, %retry_in, "CA rotation failed again")
                        }
                    }
                }
            }
        }
        // Deadlines already due belong to a failed step, which waits for its backoff.
        for d in [st.keys.x509.next_deadline(), st.keys.jwt.next_deadline()]
            .into_iter()
            .flatten()
            .filter(|&d| d > now)
        {
            next = next.min(d);
        }
        // Expired JWT-SVIDs leave the cache.
        st.jwts.retain(|_, j| j.svid.expiry > now);

        // SVIDs of registered entries stay; those of removed entries stay while leased; those
        // minted on demand stay while leased or recently used (checked when they fall due).
        // What stays is re-minted at half-life, when a CA is valid to sign it.
        let signer = self.signer_for(st, now).ok();
        let can_sign = signer.is_some();
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
            if s.refresh_at > now {
                next = next.min(s.refresh_at);
            } else if can_sign {
                jobs.push(Job {
                    entry: s.entry.clone(),
                    replaces: Some(s.svid.serial.clone()),
                    why: Why::Rotate,
                });
            }
            true
        });
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
    /// The signer is `None` when no CA is valid at `now` (logged by [`CaAuthority::signer_for`]).
    fn plan_sync(&self, set: &EntrySet, now: SystemTime) -> (Vec<Job>, Option<Arc<Signer>>) {
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
                Some(s) if same_params(&s.entry, e) && usable(&s.svid, now) => {}
                other => jobs.push(Job {
                    entry: e.clone(),
                    replaces: other.map(|s| s.svid.serial.clone()),
                    why: Why::Fill,
                }),
            }
        }
        let signer = self.signer_for(st, now).ok();
        drop(guard);
        drop(old);
        (jobs, signer)
    }

    /// Mints `jobs` without the state lock, yielding to the runtime after each so request
    /// handlers are not starved, and publishes one change per [`BATCH`] mints that replaced an
    /// SVID (new SVIDs need none: no stream can hold an SVID of an entry that had none). Stops
    /// early when `interrupted` returns true.
    /// Without a signer nothing is minted and, if there was work, it counts as failed (to be
    /// retried).
    async fn work(
        &self,
        signer: Option<Arc<Signer>>,
        jobs: Vec<Job>,
        interrupted: impl Fn() -> bool,
    ) -> Worked {
        let mut worked = Worked::default();
        let Some(signer) = signer else {
            worked.failed = !jobs.is_empty();
            return worked;
        };
        let mut replaced = false;
        for (i, job) in jobs.into_iter().enumerate() {
            let (done, _) = self.mint_and_install(&signer, job, self.now());
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
        let (jobs, signer) = self.plan_sync(set, self.now());
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
            let now = self.now();
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
                    resync_at = Some(self.now() + RETRY);
                }
                // A set that changed while minting is read at the next turn.
                dirty = rx.has_changed().unwrap_or(false);
                continue;
            }
            let deadline = resync_at.map_or(next, |t| next.min(t));
            let wait = deadline
                .duration_since(self.now())
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

/// A signing failure as callers see it: no key valid at the moment is Unavailable (the reason
/// says why; it passes when the clock or the operator acts), anything else a minting error.
fn mint_error(spiffe_id: &spiffed_core::SpiffeId, e: Error) -> AuthorityError {
    match e {
        Error::NoValidCa(reason) => AuthorityError::Unavailable(reason),
        e => AuthorityError::Mint {
            spiffe_id: spiffe_id.to_string(),
            reason: e.to_string(),
        },
    }
}

/// A signer for every X.509 CA of `keys`, with its role.
fn make_signers(keys: &KeyFile) -> Result<Vec<(CaState, Arc<Signer>)>, Error> {
    keys.x509
        .cas
        .iter()
        .map(|c| {
            let cert = c
                .cert_der()
                .ok_or_else(|| Error::Crypto("an X.509 CA has no certificate".into()))?;
            let signer = Signer::new(cert, &c.key_pkcs8, c.not_before(), c.not_after)?;
            Ok((c.state, Arc::new(signer)))
        })
        .collect()
}

/// Whether an SVID may be handed out at `now`: notBefore <= now < notAfter.
fn usable(svid: &X509Svid, now: SystemTime) -> bool {
    svid.not_before <= now && now < svid.not_after
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
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut minted = false;
        let mut out = Vec::with_capacity(entries.len());
        let mut lease = Lease::default();
        for e in entries {
            // The fallback: the rotation task mints registered entries ahead, but may not have
            // caught up with a set that changed a moment ago. An SVID not valid at this moment
            // (the clock jumped) is never handed out: it is re-minted, or the call fails.
            let current = st.svids.get(&e.id);
            let reusable =
                current.is_some_and(|s| same_params(&s.entry, e) && usable(&s.svid, now));
            let tenure = if st.registered.contains_key(&e.id) {
                Tenure::Registered
            } else {
                current.map_or(Tenure::OnDemand, |s| s.tenure)
            };
            let fresh = if reusable {
                None
            } else {
                let signer = self.signer_for(st, now)?;
                let mut slot = self.mint(&signer, e, now)?;
                slot.tenure = tenure;
                Some(slot)
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
        let now = self.now();
        let mut aud: Vec<String> = audience.to_vec();
        aud.sort();
        aud.dedup();
        let mut st = self.lock();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let key = (e.id.clone(), aud.clone());
            if let Some(j) = st.jwts.get(&key)
                && j.refresh_at > now
                && j.svid.issued_at <= now
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
                .map_err(|err| mint_error(&e.spiffe_id, err))?;
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
        jwt::validate(token, audience, self.now(), |td| {
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
            new_root: NewRootPolicy::Refuse,
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
        // Exactly the per-identity bound for web, plus db's one token (well under the bytes).
        let held = a.lock().jwts.len();
        assert_eq!(
            held,
            DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY + 1,
            "JWT-SVIDs cached"
        );
        // The other identity's token was not pushed out: the same token comes back.
        let again = a.jwt_svids(std::slice::from_ref(&db), &db_aud).unwrap();
        assert!(Arc::ptr_eq(&db_token[0], &again[0]));
        // A byte budget smaller than what is held evicts at once; later tokens still mint.
        a.set_jwt_cache_limits(JwtCacheLimits {
            bytes: 32 * 1024,
            entries_per_identity: 8,
        });
        // About 5 KiB a token: some still fit (the cache works), no more than 32 KiB does.
        let fits = 1..=6;
        assert!(
            fits.contains(&a.cached_jwt_svids()),
            "{}",
            a.cached_jwt_svids()
        );
        let aud = vec!["z".repeat(4096)];
        let fresh = a.jwt_svids(std::slice::from_ref(&web), &aud).unwrap();
        assert_eq!(fresh.len(), 1);
        assert!(
            fits.contains(&a.cached_jwt_svids()),
            "{}",
            a.cached_jwt_svids()
        );
        let again = a.jwt_svids(std::slice::from_ref(&web), &aud).unwrap();
        assert!(
            Arc::ptr_eq(&fresh[0], &again[0]),
            "the fresh token is cached"
        );
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

    // ---- CA validity, clock jumps, failing rotation and new trust roots ----

    use crate::clock::testing::ManualClock;

    /// Collects what the authority logs (text, no colours) while a test runs.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
        type Writer = Logs;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
        /// Lines at WARN or ERROR.
        fn loud(&self) -> Vec<String> {
            self.text()
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .map(str::to_owned)
                .collect()
        }
    }

    /// Runs `f` with the authority's logs captured.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, Logs) {
        let logs = Logs::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let out = tracing::subscriber::with_default(sub, f);
        (out, logs)
    }

    fn clocked(
        dir: &Path,
        ttl: Duration,
        policy: NewRootPolicy,
        t0: SystemTime,
    ) -> (CaAuthority, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(t0));
        let mut c = cfg(dir);
        c.ca_ttl = ttl;
        c.x509_svid_ttl = ttl / 10;
        c.new_root = policy;
        let a = CaAuthority::open_with_clock(c, clock.clone()).unwrap();
        (a, clock)
    }

    /// Whether every SVID handed out is valid at `now`, signed by a CA of the bundle.
    fn all_valid_at(ids: &[Identity], now: SystemTime) {
        for i in ids {
            let x = &i.x509;
            assert!(
                x.not_before <= now && now < x.not_after,
                "an SVID invalid at {now:?} was handed out: notBefore {:?}, notAfter {:?}",
                x.not_before,
                x.not_after
            );
        }
    }

    fn unavailable(r: Result<(Vec<Identity>, Lease), AuthorityError>) -> String {
        match r {
            Err(AuthorityError::Unavailable(why)) => why,
            Err(e) => panic!("expected Unavailable, got {e}"),
            Ok((ids, _)) => panic!(
                "expected Unavailable, got SVIDs valid {:?}..{:?}",
                ids[0].x509.not_before, ids[0].x509.not_after
            ),
        }
    }

    #[test]
    fn a_failing_rotation_write_backs_off_and_never_mints_invalid_svids() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(600);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
        let web = entry("1", "web", None);
        a.identities(std::slice::from_ref(&web)).unwrap();
        // ca.json can no longer be replaced (as on a full disk: every rotation write fails).
        let file = a.ca_file().to_owned();
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        std::fs::write(file.join("keep"), b"x").unwrap();

        // Drive the rotation task's loop on simulated time, with a request (as from an open
        // stream) at every turn, from before half-life to long past the CA's expiry.
        let end = t0 + ttl * 3;
        let ((), logs) = logged(|| {
            let mut turns = 0;
            while clock.now() < end && turns < 3000 {
                let now = clock.now();
                let next = a.tick(now);
                match a.identities(std::slice::from_ref(&web)) {
                    Ok((ids, _)) => all_valid_at(&ids, now),
                    Err(AuthorityError::Unavailable(_)) => assert!(now >= t0 + ttl),
                    Err(e) => panic!("{e}"),
                }
                // As `serve` does: never sooner than 10 ms.
                clock.set(next.max(now + Duration::from_millis(10)));
                turns += 1;
            }
            assert!(
                clock.now() >= end,
                "{turns} turns reached only {:?} of {:?}: the failed rotation retries without \
                 backoff",
                clock.now().duration_since(t0).unwrap(),
                end.duration_since(t0).unwrap()
            );
        });
        // Simulated time makes these exact: from the first failure at half-life (300 s) to
        // 1800 s, waits of 1, 2, 4 ... 32 s, then 60 s each: 30 attempts. A backoff that
        // changes (or stops backing off) changes the count.
        let attempts = a.lock().rotation.alarm.count;
        assert_eq!(attempts, 30, "rotation attempts in {:?}", ttl * 3);
        // The first failure, a repeat every 5 minutes, and the refusals once no CA is valid.
        let loud = logs.loud();
        assert_eq!(loud.len(), 9, "loud lines:\n{}", loud.join("\n"));
        assert!(loud[0].contains("CA rotation failed"), "{}", loud[0]);
        // After the expiry: refused with a reason, never an SVID born expired.
        let why = unavailable(a.identities(std::slice::from_ref(&web)));
        assert!(why.contains("every CA expired"), "{why}");
    }

    #[test]
    fn a_forward_clock_jump_refuses_in_run_mode_and_replaces_the_ca_in_dev_mode() {
        let ttl = Duration::from_secs(3600);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let web = entry("1", "web", None);
        for policy in [
            NewRootPolicy::Refuse,
            NewRootPolicy::AtStart,
            NewRootPolicy::Always,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (a, clock) = clocked(dir.path(), ttl, policy, t0);
            let (ids, _lease) = a.identities(std::slice::from_ref(&web)).unwrap();
            all_valid_at(&ids, t0);
            let before = a.x509_bundle().authorities.clone();
            // A VM restored from a snapshot, a laptop resumed days later.
            let later = t0 + ttl * 48;
            clock.set(later);
            // Before the rotation task even runs, nothing invalid is handed out.
            let ((why, next), logs) = logged(|| {
                let why = unavailable(a.identities(std::slice::from_ref(&web)));
                (why, a.tick(later))
            });
            assert!(why.contains("every CA expired"), "{why}");
            assert!(next > later, "no spin after a jump");
            let text = logs.text();
            assert!(
                text.contains("ERROR") && text.contains("no CA is valid"),
                "{text}"
            );
            if policy == NewRootPolicy::Always {
                let (ids, _) = a.identities(std::slice::from_ref(&web)).unwrap();
                all_valid_at(&ids, later);
                let after = a.x509_bundle().authorities.clone();
                assert_ne!(after, before, "a new CA");
                let fp = ca::fingerprint(&after[0]);
                assert!(
                    logs.loud()
                        .iter()
                        .any(|l| l.contains("NEW CA") && l.contains(&fp)),
                    "{text}"
                );
            } else {
                let why = unavailable(a.identities(std::slice::from_ref(&web)));
                assert!(why.contains("--new-trust-root"), "{why}");
                assert_eq!(a.x509_bundle().authorities, before, "no silent new root");
            }
        }
    }

    #[test]
    fn a_clock_behind_the_ca_refuses_until_it_catches_up() {
        let ttl = Duration::from_secs(3600);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let dir = tempfile::tempdir().unwrap();
        let web = entry("1", "web", None);
        let ((a, clock), logs) = logged(|| {
            // Started with the clock behind a CA made earlier (an NTP step back, a bad RTC).
            drop(clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0));
            clocked(
                dir.path(),
                ttl,
                NewRootPolicy::Refuse,
                t0 - Duration::from_secs(3 * 86400),
            )
        });
        assert!(logs.text().contains("clock is behind"), "{}", logs.text());
        drop(clock);
        let why = unavailable(a.identities(std::slice::from_ref(&web)));
        assert!(why.contains("clock is behind"), "{why}");

        // Same while running: an SVID minted now is not handed out once the clock steps back
        // before its notBefore.
        let dir = tempfile::tempdir().unwrap();
        let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
        a.identities(std::slice::from_ref(&web)).unwrap();
        clock.set(t0 - Duration::from_secs(3600));
        let why = unavailable(a.identities(std::slice::from_ref(&web)));
        assert!(why.contains("clock is behind"), "{why}");
        clock.set(t0 + Duration::from_secs(1));
        let (ids, _) = a.identities(std::slice::from_ref(&web)).unwrap();
        all_valid_at(&ids, t0 + Duration::from_secs(1));
    }

    /// JWT-SVIDs follow the injected clock too: a clock behind the JWT key's notBefore gets
    /// Unavailable (not a Mint error), and a token cached before the clock stepped back is not
    /// handed out while its `iat` is in the future.
    #[test]
    fn jwt_svids_follow_the_injected_clock() {
        let ttl = Duration::from_secs(3600);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let dir = tempfile::tempdir().unwrap();
        let web = entry("1", "web", None);
        let aud = vec!["a".to_owned()];
        let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
        let first = a.jwt_svids(std::slice::from_ref(&web), &aud).unwrap();
        assert_eq!(first[0].issued_at, t0);
        clock.set(t0 - Duration::from_secs(3600));
        match a.jwt_svids(std::slice::from_ref(&web), &aud) {
            Err(AuthorityError::Unavailable(_)) => {}
            other => panic!("expected Unavailable, got {other:?}"),
        }
        clock.set(t0 + Duration::from_secs(60));
        let again = a.jwt_svids(std::slice::from_ref(&web), &aud).unwrap();
        assert_eq!(again[0].token, first[0].token, "still cached");
        let claims = a.validate_jwt(&again[0].token, "a").unwrap();
        assert_eq!(claims.spiffe_id, web.spiffe_id);
        // Validation uses the same clock: far past the token's expiry it is refused.
        clock.set(t0 + Duration::from_secs(86_000));
        assert!(a.validate_jwt(&again[0].token, "a").is_err());
    }

    #[test]
    fn a_clock_behind_the_active_ca_signs_with_an_older_one_still_valid() {
        let ttl = Duration::from_secs(600);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let dir = tempfile::tempdir().unwrap();
        let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
        let first = a.x509_bundle().authorities[0].clone();
        // Prepare at half-life, activate at five sixths: the first CA is retired, still valid.
        for t in [301, 502] {
            clock.set(t0 + Duration::from_secs(t));
            a.tick(clock.now());
        }
        let bundle = a.x509_bundle().authorities.clone();
        assert_eq!(bundle.len(), 2);
        // The clock steps back before the new CA's notBefore.
        let back = t0 + Duration::from_secs(200);
        clock.set(back);
        let web = entry("1", "web", None);
        let (ids, _) = a.identities(std::slice::from_ref(&web)).unwrap();
        all_valid_at(&ids, back);
        let (_, leaf) = x509_parser::parse_x509_certificate(&ids[0].x509.cert_chain_der).unwrap();
        let (_, old) = x509_parser::parse_x509_certificate(&first).unwrap();
        assert_eq!(leaf.issuer(), old.subject(), "signed by the older CA");
    }

    /// The deletions, emptyings and expiries that would silently make a new trust root.
    fn damage(dir: &Path, how: &str) {
        let file = ca::ca_file(dir);
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
        };
        match how {
            "deleted" => std::fs::remove_file(&file).unwrap(),
            "empty" => edit(&|v| v["authorities"] = serde_json::json!([])),
            "retired" => edit(&|v| {
                for a in v["authorities"].as_array_mut().unwrap() {
                    a["state"] = "retired".into();
                }
            }),
            "expired" => {}
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_new_trust_root_needs_consent_and_is_logged_with_its_fingerprint() {
        let ttl = Duration::from_secs(3600);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for how in ["deleted", "empty", "retired", "expired"] {
            for policy in [NewRootPolicy::AtStart, NewRootPolicy::Always] {
                let dir = tempfile::tempdir().unwrap();
                let (a, _) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
                let before = a.x509_bundle().authorities.clone();
                drop(a);
                // The entry store shows the data dir was used (it matters once ca.json is gone).
                std::fs::write(dir.path().join(STORE_FILE), b"").unwrap();
                damage(dir.path(), how);
                let start = if how == "expired" { t0 + ttl * 2 } else { t0 };
                let file = ca::ca_file(dir.path());
                let saved = std::fs::read(&file).ok();
                let clock = Arc::new(ManualClock::new(start));
                let mut c = cfg(dir.path());
                c.ca_ttl = ttl;
                c.x509_svid_ttl = ttl / 10;
                let err = CaAuthority::open_with_clock(c.clone(), clock.clone())
                    .err()
                    .unwrap_or_else(|| panic!("{how}: a new trust root was made without consent"));
                let msg = err.to_string();
                assert!(matches!(err, Error::NewTrustRoot { .. }), "{how}: {msg}");
                assert!(msg.contains(&file.display().to_string()), "{how}: {msg}");
                assert!(msg.contains("--new-trust-root"), "{how}: {msg}");
                assert_eq!(
                    std::fs::read(&file).ok(),
                    saved,
                    "{how}: the file is left alone"
                );

                c.new_root = policy;
                let (a, logs) =
                    logged(|| CaAuthority::open_with_clock(c.clone(), clock.clone()).unwrap());
                let after = a.x509_bundle().authorities.clone();
                assert_ne!(after, before, "{how}");
                let fp = ca::fingerprint(after.last().unwrap());
                assert!(
                    logs.loud()
                        .iter()
                        .any(|l| l.contains("NEW CA") && l.contains(&fp)),
                    "{how}: {}",
                    logs.text()
                );
            }
        }
    }

    #[test]
    fn a_fresh_data_dir_creates_its_ca_quietly_with_its_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let (a, logs) = logged(|| CaAuthority::open(cfg(dir.path())).unwrap());
        let fp = ca::fingerprint(&a.x509_bundle().authorities[0]);
        assert!(logs.loud().is_empty(), "{}", logs.text());
        assert!(
            logs.text()
                .lines()
                .any(|l| l.contains("INFO") && l.contains(&fp)),
            "{}",
            logs.text()
        );
        // A restart makes nothing new.
        drop(a);
        let (_, logs) = logged(|| CaAuthority::open(cfg(dir.path())).unwrap());
        assert!(!logs.text().contains("created"), "{}", logs.text());
    }

    #[test]
    fn a_mismatched_key_is_refused_even_in_dev_mode() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ttl = Duration::from_secs(600);
        let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Always, t0);
        clock.set(t0 + Duration::from_secs(301));
        a.tick(clock.now());
        assert_eq!(a.x509_bundle().authorities.len(), 2);
        drop(a);
        let file = ca::ca_file(dir.path());
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let k0 = v["authorities"][0]["key"].take();
        v["authorities"][0]["key"] = v["authorities"][1]["key"].clone();
        v["authorities"][1]["key"] = k0;
        std::fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
        let mut c = cfg(dir.path());
        c.new_root = NewRootPolicy::Always;
        let msg = CaAuthority::open_with_clock(c, clock)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains(&file.display().to_string()) && msg.contains("does not belong"),
            "{msg}"
        );
    }
}
