//! [`SpireIssuer`]: workload SVIDs and bundles from the SPIRE Server, behind the agent's
//! [`Issuer`] seam.
//!
//! - X.509-SVIDs: one fresh P-256 key and CSR per entry, signed by the server in batches
//!   (`BatchNewX509SVID`, at most 500 per call, halving after a failed call). Two minting lanes
//!   run in [`SpireIssuer::run`]: requests (a first fetch waits for it; concurrent first
//!   fetches of one entry share one mint, those of different entries share one call) and the
//!   background (pre-mints of up to [`IssuerConfig::prefetch_max`] synced entries, rotation at
//!   half-life ±10 %, entries whose version changed, chains to a tainted authority). Each
//!   replacement goes out on its entry's watch, so only the streams holding it wake. What the
//!   server answers is checked before use (chain, SPIFFE ID, key, validity).
//! - JWT-SVIDs: `NewJWTSVID` on demand, cached per (SPIFFE ID, audience set), refreshed past
//!   half their lifetime; when the server fails, a cached token still valid is served.
//! - Bundles: the trust domain's and the federated ones, set by the sync ([`crate::sync`]),
//!   published as a [`BundleSet`].
//! - The workload cache ([`crate::cache`]) is loaded by [`SpireIssuer::open`] and rewritten
//!   (at most once a second) after every change.
//!
//! Key generation, the server calls and file writes never run under the state lock.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use spiffed_authority::{Clock, SystemClock};
use spiffed_core::{
    AuthorityError, BundleSet, Entry, EntryId, Issuer, JwtError, JwtSvid, LogGate, SpiffeId,
    SvidWatch, TrustBundle, TrustDomain, ValidatedJwt,
};
use spiffed_entries::{Rules, SourceError, SourceHandle};
use spiffed_proto::spire::{svid, types};
use tokio::sync::{Notify, watch};
use zeroize::Zeroizing;

use crate::bundle::{self, Converted};
use crate::cache::{self, CACHE_FILE, CacheError, LoadedSvid, Snapshot};
use crate::jwt::{JwtCache, JwtKey, token_info};
use crate::server::{EntryVersion, ServerApi};
use crate::svids::{Finished, Lane, Lookup, MintJob, SvidStats, SvidTable, rotate_at};
use crate::x509::{self, Authority, Checked};

/// Default for [`IssuerConfig::prefetch_max`], as spire-agent's `x509_svid_cache_max_size`.
pub const DEFAULT_PREFETCH_MAX: usize = 1000;
/// Default for [`IssuerConfig::jwt_cache_max`], as spire-agent's `jwt_svid_cache_max_size`.
pub const DEFAULT_JWT_CACHE_MAX: usize = 1000;

/// How long the request lane waits after a first request, for concurrent ones to join its call.
const BATCH_WINDOW: Duration = Duration::from_millis(1);
/// The longest a call may take (the real `ServerApi` has its own 30 s deadline).
const CALL_TIMEOUT: Duration = Duration::from_secs(40);
/// The longest a JWT-SVID refresh may take when a cached token could be served instead
/// (spire-agent's `jwt_svid_cache_hit_timeout`).
const JWT_CACHED_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest the upkeep task sleeps.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Least time between two writes of the workload cache.
const WRITE_SPACING: Duration = Duration::from_secs(1);
/// Cached SVIDs checked per turn of the background check (a few hundred microseconds under
/// the state lock, then the task yields).
const CHECK_CHUNK: usize = 8;
/// First pause of the background lane after a failed call; doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// The longest a request waits for its mint.
const REQUEST_WAIT: Duration = Duration::from_secs(45);
/// Rounds of a request before it gives up on an entry that keeps changing.
const MAX_ROUNDS: usize = 4;

/// How the issuer runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerConfig {
    /// The agent's trust domain (must be the server's).
    pub trust_domain: TrustDomain,
    /// Where the workload cache ([`CACHE_FILE`]) is kept.
    pub data_dir: PathBuf,
    /// How many synced entries get an X.509-SVID minted ahead of any request (and so are
    /// served at once after a restart while the server is down). Others are minted on first
    /// fetch. Held SVIDs are always kept.
    pub prefetch_max: usize,
    /// Most JWT-SVIDs cached.
    pub jwt_cache_max: usize,
}

impl IssuerConfig {
    /// The defaults for `trust_domain` and `data_dir`.
    pub fn new(trust_domain: TrustDomain, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            trust_domain,
            data_dir: data_dir.into(),
            prefetch_max: DEFAULT_PREFETCH_MAX,
            jwt_cache_max: DEFAULT_JWT_CACHE_MAX,
        }
    }
}

/// Why a bundle from the server was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the SPIRE Server's bundle was not used: {0}")]
pub struct BundleError(pub String);

/// A synced entry and its version.
struct Synced {
    entry: Arc<Entry>,
    version: EntryVersion,
}

/// The trust domain's bundle as last taken.
struct Own {
    proto: types::Bundle,
    converted: Converted,
    authorities: Arc<Vec<Authority>>,
}

struct State {
    /// Why identities are not served (the agent was banned), until `resume`.
    cleared: Option<String>,
    /// The issuer's tasks ended: nothing is minted any more.
    stopping: bool,
    entries: BTreeMap<EntryId, Synced>,
    svids: SvidTable,
    jwts: JwtCache,
    own: Option<Own>,
    federated: BTreeMap<TrustDomain, (types::Bundle, TrustBundle)>,
    /// JWT key ids already warned about (unsupported key types).
    warned: HashSet<String>,
    /// The workload cache is behind.
    dirty: bool,
    /// X.509-SVIDs read from the workload cache and not checked yet (chain, SPIFFE ID, key,
    /// validity against the bundle): each is checked when first asked for, the rest by
    /// [`SpireIssuer::check_loaded`] once serving, so a restart with a large cache serves at
    /// once. Order: the file's.
    unchecked: HashMap<EntryId, LoadedSvid>,
    /// Cached SVIDs kept and dropped by those checks so far.
    unchecked_kept: usize,
    unchecked_dropped: usize,
}

impl State {
    /// Checks the cached SVID of entry `id`, if it is one of the unchecked, and installs it.
    fn check_cached(&mut self, id: &EntryId, now: SystemTime) {
        if let Some(s) = self.unchecked.remove(id) {
            self.install_cached(s, now);
        }
    }

    /// Checks up to `n` unchecked cached SVIDs; returns how many are left.
    fn check_cached_batch(&mut self, n: usize, now: SystemTime) -> usize {
        let ids: Vec<EntryId> = self.unchecked.keys().take(n).cloned().collect();
        for id in ids {
            self.check_cached(&id, now);
        }
        self.unchecked.len()
    }

    /// Checks one cached SVID against the bundle held now and installs it when it passes
    /// (dropped otherwise, and the cache file marked behind).
    fn install_cached(&mut self, s: LoadedSvid, now: SystemTime) {
        let wanted = self
            .entries
            .get(&s.entry_id)
            .is_some_and(|e| e.entry.spiffe_id == s.spiffe_id)
            && self.cleared.is_none();
        let authorities = self
            .own
            .as_ref()
            .map(|o| o.authorities.clone())
            .unwrap_or_default();
        let checked = if wanted {
            let chain: Vec<&[u8]> = s.chain.iter().map(Vec::as_slice).collect();
            x509::public_of(&s.key).and_then(|public| {
                x509::check_chain(&chain, &s.spiffe_id, &public, s.key, &authorities, now)
            })
        } else {
            Err("its entry is gone or names another SPIFFE ID now".to_owned())
        };
        match checked {
            Ok(c) => {
                self.unchecked_kept += 1;
                let due = rotate_at(&c.svid, None, jitter());
                self.svids
                    .install_loaded(&s.entry_id, c, s.version, due, now);
                let tainted: Vec<&[u8]> = authorities
                    .iter()
                    .filter(|a| a.tainted)
                    .map(|a| a.der.as_slice())
                    .collect();
                if !tainted.is_empty() {
                    self.svids.taint(&tainted);
                }
            }
            Err(why) => {
                tracing::debug!(entry = %s.entry_id, %why, "dropping a cached X.509-SVID");
                self.unchecked_dropped += 1;
                self.dirty = true;
            }
        }
    }
}

struct Inner {
    td: TrustDomain,
    api: Arc<dyn ServerApi>,
    clock: Arc<dyn Clock>,
    file: PathBuf,
    state: Mutex<State>,
    bundles: watch::Sender<Arc<BundleSet>>,
    urgent: Notify,
    background: Notify,
    upkeep: Notify,
    persist: Notify,
    /// True once no cached SVID waits for its check.
    checked: watch::Sender<bool>,
    /// One refresh at a time per JWT-SVID cache key.
    jwt_gates: Mutex<HashMap<JwtKey, Arc<tokio::sync::Mutex<()>>>>,
    calls: AtomicU64,
    mints: AtomicU64,
    /// X.509-SVIDs that replaced one held before (rotations, re-mints after a change).
    rotations: AtomicU64,
    /// When the last one did, in milliseconds since the epoch (0: never).
    last_rotation_ms: AtomicU64,
    mint_failures: LogGate,
    write_failures: LogGate,
}

/// Workload SVIDs and bundles from the SPIRE Server (see the module docs). Cheap to clone; use
/// it as an `Arc<dyn Issuer>` through `Arc::new(issuer)`, and run [`SpireIssuer::run`]:
/// without it nothing is minted.
#[derive(Clone)]
pub struct SpireIssuer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SpireIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpireIssuer")
            .field("trust_domain", &self.inner.td)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent before anything can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A random number in -1..=1.
fn jitter() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX) * 2.0 - 1.0
}

/// `d` moved by up to ±10 %.
pub(crate) fn jittered(d: Duration) -> Duration {
    let j = jitter();
    let shift = d.mul_f64(0.1 * j.abs());
    if j < 0.0 {
        d.saturating_sub(shift)
    } else {
        d + shift
    }
}

fn build_set(
    own: TrustBundle,
    federated: impl Iterator<Item = TrustBundle>,
    seq: u64,
) -> BundleSet {
    federated.fold(BundleSet::new(own, seq), |set, b| set.with(b, seq))
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn is_stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

impl SpireIssuer {
    /// Opens the issuer over `api`, loading the workload cache from `cfg.data_dir` (the
    /// directory is created if missing). A cache file not owned by the agent's uid, or
    /// readable by group or others, is refused with the fix; a corrupt one is ignored with a
    /// warning. Its X.509-SVIDs are checked (chain to the bundle, SPIFFE ID, key, validity)
    /// when first asked for, and the others by [`SpireIssuer::run`] in the background; one that
    /// fails (expired, say) is dropped then.
    pub fn open(api: Arc<dyn ServerApi>, cfg: IssuerConfig) -> Result<Self, CacheError> {
        Self::open_with_clock(api, cfg, Arc::new(SystemClock))
    }

    /// [`SpireIssuer::open`] with the time read from `clock`.
    pub fn open_with_clock(
        api: Arc<dyn ServerApi>,
        cfg: IssuerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, CacheError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| CacheError::Io {
            path: cfg.data_dir.clone(),
            op: "create the directory",
            source,
        })?;
        let file = cfg.data_dir.join(CACHE_FILE);
        let td = cfg.trust_domain.clone();
        let loaded = cache::load(&file, &td)?;
        let now = clock.now();
        let mut st = State {
            cleared: None,
            stopping: false,
            entries: BTreeMap::new(),
            svids: SvidTable::new(cfg.prefetch_max),
            jwts: JwtCache::new(cfg.jwt_cache_max),
            own: None,
            federated: BTreeMap::new(),
            warned: HashSet::new(),
            dirty: false,
            unchecked: HashMap::new(),
            unchecked_kept: 0,
            unchecked_dropped: 0,
        };
        if let Some(l) = loaded {
            if let Some(b) = l.bundle {
                match bundle::convert(&b, &td, &mut st.warned) {
                    Ok(converted) => {
                        st.own = Some(Own {
                            authorities: Arc::new(converted.authorities.clone()),
                            proto: b,
                            converted,
                        });
                    }
                    Err(why) => tracing::warn!(%why, "leaving the cached bundle out"),
                }
            }
            for b in l.federated {
                let Ok(ftd) = bundle::trust_domain_of(&b) else {
                    continue;
                };
                if ftd == td {
                    continue;
                }
                if let Ok(c) = bundle::convert(&b, &ftd, &mut st.warned) {
                    st.federated.insert(ftd, (b, c.bundle));
                }
            }
            for (e, version) in l.entries {
                st.svids.upsert(&e.id, &e.spiffe_id, now);
                st.entries.insert(
                    e.id.clone(),
                    Synced {
                        entry: Arc::new(e),
                        version,
                    },
                );
            }
            let mut dropped = 0usize;
            for s in l.svids {
                if st.entries.contains_key(&s.entry_id) {
                    st.unchecked.insert(s.entry_id.clone(), s);
                } else {
                    dropped += 1;
                }
            }
            tracing::info!(
                file = %file.display(),
                entries = st.entries.len(),
                svids = st.unchecked.len(),
                dropped_svids = dropped,
                federated = st.federated.len(),
                "loaded the workload cache (each X.509-SVID is checked when first asked for, \
                 the rest in the background)"
            );
            st.dirty = dropped > 0;
        }
        let own = st
            .own
            .as_ref()
            .map_or_else(|| bundle::empty(&td), |o| o.converted.bundle.clone());
        let set = build_set(own, st.federated.values().map(|(_, b)| b.clone()), 1);
        let (bundles, _) = watch::channel(Arc::new(set));
        Ok(Self {
            inner: Arc::new(Inner {
                td,
                api,
                clock,
                file,
                state: Mutex::new(st),
                bundles,
                urgent: Notify::new(),
                background: Notify::new(),
                upkeep: Notify::new(),
                persist: Notify::new(),
                checked: watch::Sender::new(false),
                jwt_gates: Mutex::new(HashMap::new()),
                calls: AtomicU64::new(0),
                mints: AtomicU64::new(0),
                rotations: AtomicU64::new(0),
                last_rotation_ms: AtomicU64::new(0),
                mint_failures: LogGate::default(),
                write_failures: LogGate::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// Marks the workload cache behind (under the lock) and wakes its writer.
    fn touched(&self, st: &mut State) {
        st.dirty = true;
        self.inner.persist.notify_one();
    }

    /// The workload cache file.
    pub fn cache_file(&self) -> &Path {
        &self.inner.file
    }

    /// Publishes the entries loaded from the workload cache through `entries`, each checked
    /// with `rules` (one that fails now, e.g. because a selector type is no longer served, is
    /// left out with a warning). Call it before the Workload API socket opens, so a restart
    /// while the server is down serves the cached SVIDs at once. Returns how many entries were
    /// published.
    pub fn publish_cached(
        &self,
        entries: &SourceHandle,
        rules: &Rules,
    ) -> Result<usize, SourceError> {
        let cached: Vec<Entry> = self
            .lock()
            .entries
            .values()
            .map(|s| (*s.entry).clone())
            .collect();
        let mut ok = Vec::with_capacity(cached.len());
        let mut refused = Vec::new();
        for e in cached {
            let id = e.id.clone();
            match rules.check(e) {
                Ok(e) => ok.push(e),
                Err(error) => {
                    tracing::warn!(entry = %id, %error, "leaving a cached entry out: it breaks a rule of this configuration");
                    refused.push(id);
                }
            }
        }
        let n = ok.len();
        let event = entries.apply(ok, refused.clone())?;
        let mut st = self.lock();
        for id in &refused {
            st.entries.remove(id);
            st.svids.remove(id);
        }
        if let Some(ev) = event {
            for new in ev.changes.iter().filter_map(|c| c.new.as_ref()) {
                if let Some(s) = st.entries.get_mut(&new.id) {
                    s.entry = new.clone();
                }
            }
        }
        if !refused.is_empty() {
            self.touched(&mut st);
        }
        Ok(n)
    }

    /// Applies a sync's entry changes: publishes them through `handle` and follows them
    /// (pre-mints new entries within the budget, re-mints changed ones, forgets removed ones
    /// once no stream holds them). Every upsert must already pass the agent's rules.
    pub(crate) fn apply_entries(
        &self,
        handle: &SourceHandle,
        upserts: Vec<(Entry, EntryVersion)>,
        removes: Vec<EntryId>,
    ) -> Result<(), SourceError> {
        if upserts.is_empty() && removes.is_empty() {
            return Ok(());
        }
        let event = handle.apply(
            upserts.iter().map(|(e, _)| e.clone()).collect(),
            removes.clone(),
        )?;
        let mut arcs: HashMap<EntryId, Arc<Entry>> = event
            .iter()
            .flat_map(|ev| ev.changes.iter())
            .filter_map(|c| c.new.clone())
            .map(|e| (e.id.clone(), e))
            .collect();
        let now = self.now();
        let mut g = self.lock();
        let st = &mut *g;
        let mut freed = false;
        for id in &removes {
            st.entries.remove(id);
            freed |= st.svids.remove(id);
        }
        for (e, version) in upserts {
            let entry = match arcs.remove(&e.id) {
                Some(a) => a,
                None => match st.entries.get(&e.id) {
                    Some(s) if *s.entry == e => s.entry.clone(),
                    _ => Arc::new(e),
                },
            };
            st.svids.upsert(&entry.id, &entry.spiffe_id, now);
            st.entries
                .insert(entry.id.clone(), Synced { entry, version });
        }
        if freed {
            for (id, s) in &st.entries {
                if !st.svids.budget_left() {
                    break;
                }
                st.svids.upsert(id, &s.entry.spiffe_id, now);
            }
        }
        self.touched(st);
        drop(g);
        self.inner.upkeep.notify_one();
        Ok(())
    }

    /// The ids of the synced entries.
    pub(crate) fn entry_ids(&self) -> Vec<EntryId> {
        self.lock().entries.keys().cloned().collect()
    }

    /// Every trust domain a synced entry federates with (the own one left out).
    pub(crate) fn federated_domains(&self) -> BTreeSet<TrustDomain> {
        let st = self.lock();
        st.entries
            .values()
            .flat_map(|s| s.entry.federates_with.iter())
            .filter(|td| **td != self.inner.td)
            .cloned()
            .collect()
    }

    /// Publishes the bundle set if it differs from the one out (its sequence grows).
    fn publish(&self, st: &State) {
        let own = st.own.as_ref().map_or_else(
            || bundle::empty(&self.inner.td),
            |o| o.converted.bundle.clone(),
        );
        self.inner.bundles.send_if_modified(|cur| {
            let fed = st.federated.values().map(|(_, b)| b);
            let same = cur.own() == &own
                && cur.federated().count() == st.federated.len()
                && cur.federated().zip(fed).all(|(a, b)| a == b);
            if same {
                return false;
            }
            let seq = cur.sequence() + 1;
            *cur = Arc::new(build_set(
                own.clone(),
                st.federated.values().map(|(_, b)| b.clone()),
                seq,
            ));
            true
        });
    }

    /// Takes the trust domain's bundle from the server (`GetBundle`). SVIDs that chain to an
    /// authority newly marked tainted are re-minted at once; cached JWT-SVIDs signed by a
    /// tainted key are dropped. Returns whether the bundle changed.
    pub fn set_own_bundle(&self, b: &types::Bundle) -> Result<bool, BundleError> {
        let mut g = self.lock();
        let st = &mut *g;
        let converted = bundle::convert(b, &self.inner.td, &mut st.warned).map_err(BundleError)?;
        if converted.authorities.is_empty() {
            return Err(BundleError(format!(
                "the bundle of {} has no X.509 authority",
                self.inner.td
            )));
        }
        if st.own.as_ref().is_some_and(|o| &o.proto == b) {
            return Ok(false);
        }
        let was_tainted: HashSet<&[u8]> = st
            .own
            .as_ref()
            .map(|o| {
                o.converted
                    .authorities
                    .iter()
                    .filter(|a| a.tainted)
                    .map(|a| a.der.as_slice())
                    .collect()
            })
            .unwrap_or_default();
        let newly: Vec<Vec<u8>> = converted
            .authorities
            .iter()
            .filter(|a| a.tainted && !was_tainted.contains(a.der.as_slice()))
            .map(|a| a.der.clone())
            .collect();
        let mut rotate = 0;
        if !newly.is_empty() {
            let refs: Vec<&[u8]> = newly.iter().map(Vec::as_slice).collect();
            rotate = st.svids.taint(&refs);
            tracing::warn!(
                authorities = newly.len(),
                svids = rotate,
                "the SPIRE Server marked X.509 authorities tainted: re-minting every X.509-SVID \
                 that chains to them"
            );
        }
        if !converted.tainted_kids.is_empty() {
            let kids: HashSet<&str> = converted.tainted_kids.iter().map(String::as_str).collect();
            st.jwts.retain(|c| !kids.contains(c.kid.as_str()));
        }
        st.own = Some(Own {
            authorities: Arc::new(converted.authorities.clone()),
            proto: b.clone(),
            converted,
        });
        self.publish(st);
        self.touched(st);
        drop(g);
        if rotate > 0 {
            self.inner.upkeep.notify_one();
        }
        Ok(true)
    }

    /// Adds or replaces the bundle of federated trust domain `td` (`GetFederatedBundle`).
    pub(crate) fn set_federated(
        &self,
        td: &TrustDomain,
        b: &types::Bundle,
    ) -> Result<(), BundleError> {
        if *td == self.inner.td {
            return Err(BundleError(format!(
                "{td} is the agent's own trust domain, not a federated one"
            )));
        }
        let mut g = self.lock();
        let st = &mut *g;
        if st.federated.get(td).is_some_and(|(p, _)| p == b) {
            return Ok(());
        }
        let converted = bundle::convert(b, td, &mut st.warned).map_err(BundleError)?;
        st.federated
            .insert(td.clone(), (b.clone(), converted.bundle));
        self.publish(st);
        self.touched(st);
        Ok(())
    }

    /// Drops the federated bundles whose trust domain is not in `keep`; returns them.
    pub(crate) fn retain_federated(&self, keep: &BTreeSet<TrustDomain>) -> Vec<TrustDomain> {
        let mut g = self.lock();
        let st = &mut *g;
        let gone: Vec<TrustDomain> = st
            .federated
            .keys()
            .filter(|td| !keep.contains(*td))
            .cloned()
            .collect();
        if gone.is_empty() {
            return gone;
        }
        for td in &gone {
            st.federated.remove(td);
        }
        self.publish(st);
        self.touched(st);
        gone
    }

    /// The trust domains with a federated bundle now.
    pub(crate) fn federated_now(&self) -> BTreeSet<TrustDomain> {
        self.lock().federated.keys().cloned().collect()
    }

    /// Stops serving identities (the agent was banned): every SVID is dropped (streams holding
    /// one see it end), the JWT-SVID cache is emptied, the workload cache keeps no key, and
    /// every fetch fails with [`AuthorityError::Unavailable`] and `reason` until
    /// [`SpireIssuer::resume`].
    pub fn clear(&self, reason: impl Into<String>) {
        let reason = reason.into();
        let mut st = self.lock();
        tracing::warn!(%reason, "agent mode: dropping every workload SVID; no identity is served");
        st.cleared = Some(reason);
        st.svids.clear();
        st.unchecked.clear();
        st.jwts.clear();
        self.touched(&mut st);
    }

    /// Serves identities again after [`SpireIssuer::clear`] (synced entries are pre-minted
    /// again).
    pub fn resume(&self) {
        let now = self.now();
        let mut g = self.lock();
        let st = &mut *g;
        if st.cleared.take().is_none() {
            return;
        }
        tracing::info!("agent mode: serving identities again");
        for (id, s) in &st.entries {
            if !st.svids.budget_left() {
                break;
            }
            st.svids.upsert(id, &s.entry.spiffe_id, now);
        }
        drop(g);
        self.inner.upkeep.notify_one();
    }

    /// Why identities are not served, if [`SpireIssuer::clear`] was called.
    pub fn cleared(&self) -> Option<String> {
        self.lock().cleared.clone()
    }

    /// Whether any X.509-SVID valid now is held (the agent can serve from its cache).
    pub fn has_valid_svids(&self) -> bool {
        let now = self.now();
        let mut st = self.lock();
        if st.cleared.is_some() {
            return false;
        }
        if st.svids.any_valid(now) {
            return true;
        }
        // One valid SVID settles it: check cached ones only until one passes (a kept one is
        // valid now).
        while !st.unchecked.is_empty() {
            let kept = st.unchecked_kept;
            st.check_cached_batch(1, now);
            if st.unchecked_kept > kept {
                return true;
            }
        }
        false
    }

    /// Counts of X.509-SVIDs in memory.
    pub fn stats(&self) -> SvidStats {
        let st = self.lock();
        let mut stats = st.svids.stats();
        stats.cached += st.unchecked.len();
        stats
    }

    /// How many JWT-SVIDs are cached.
    pub fn cached_jwt_svids(&self) -> usize {
        self.lock().jwts.len()
    }

    /// The CSRs per call now.
    #[cfg(test)]
    pub(crate) fn limit_for_tests(&self) -> usize {
        self.lock().svids.limit()
    }

    /// How many `BatchNewX509SVID` calls were made since start.
    pub fn x509_calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    /// How many X.509-SVIDs the server signed (and passed the checks) since start.
    pub fn x509_mints(&self) -> u64 {
        self.inner.mints.load(Ordering::Relaxed)
    }

    /// How many X.509-SVIDs replaced one held before since start (rotations, and re-mints
    /// after an entry or authority change), and when the last one did.
    pub fn x509_rotations(&self) -> (u64, Option<SystemTime>) {
        let n = self.inner.rotations.load(Ordering::Relaxed);
        let ms = self.inner.last_rotation_ms.load(Ordering::Relaxed);
        let at = (ms > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        (n, at)
    }

    /// Runs the minting lanes, rotation and the workload cache writer until `stop` becomes
    /// true (or its sender is dropped); then writes the cache a last time. Nothing is minted
    /// without it.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        tokio::join!(
            self.lane(Lane::Urgent, stop.clone()),
            self.lane(Lane::Background, stop.clone()),
            self.upkeep(stop.clone()),
            self.writer(stop),
        );
        let mut st = self.lock();
        st.stopping = true;
        st.svids.clear();
    }

    fn lane_wake(&self, lane: Lane) -> &Notify {
        match lane {
            Lane::Urgent => &self.inner.urgent,
            Lane::Background => &self.inner.background,
        }
    }

    /// One minting lane: takes a batch of its queue, mints it, repeats.
    async fn lane(&self, lane: Lane, mut stop: watch::Receiver<bool>) {
        let mut pause = Duration::ZERO;
        loop {
            if is_stopped(&stop) {
                return;
            }
            if !self.lock().svids.queued(lane) {
                tokio::select! {
                    () = self.lane_wake(lane).notified() => {}
                    () = stopped(&mut stop) => return,
                }
                continue;
            }
            if lane == Lane::Urgent {
                // Concurrent first fetches of other entries join this call.
                tokio::time::sleep(BATCH_WINDOW).await;
            }
            let jobs = {
                let mut g = self.lock();
                let st = &mut *g;
                let entries = &st.entries;
                st.svids.take(lane, |id| entries.get(id).map(|s| s.version))
            };
            if jobs.is_empty() {
                continue;
            }
            // Stopping does not wait for a slow server: the jobs cut short are dropped when
            // `run` ends, and their waiters fail.
            let ok = tokio::select! {
                ok = self.mint(jobs) => ok,
                () = stopped(&mut stop) => return,
            };
            if lane == Lane::Background {
                if ok {
                    pause = Duration::ZERO;
                } else {
                    pause = (pause * 2).clamp(FIRST_PAUSE, MAX_PAUSE);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = stopped(&mut stop) => return,
                    }
                }
            }
        }
    }

    /// Mints `jobs` in one call; false when the call failed.
    async fn mint(&self, jobs: Vec<MintJob>) -> bool {
        let mut pending = Vec::with_capacity(jobs.len());
        let mut params = Vec::with_capacity(jobs.len());
        let mut failed = Vec::new();
        for (i, job) in jobs.into_iter().enumerate() {
            match x509::new_key(&job.spiffe_id) {
                Ok(key) => {
                    params.push(svid::NewX509svidParams {
                        entry_id: job.id.to_string(),
                        csr: key.csr.clone(),
                    });
                    pending.push((job, key));
                }
                Err(reason) => {
                    let e = AuthorityError::Mint {
                        spiffe_id: job.spiffe_id.to_string(),
                        reason,
                    };
                    failed.push((job, e));
                }
            }
            if i % 32 == 31 {
                tokio::task::yield_now().await;
            }
        }
        let n = pending.len();
        let answer = if n == 0 {
            Ok(Vec::new())
        } else {
            self.inner.calls.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(CALL_TIMEOUT, self.inner.api.batch_new_x509_svid(params))
                .await
            {
                Ok(Ok(results)) if results.len() == n => Ok(results),
                Ok(Ok(results)) => Err(format!(
                    "the SPIRE Server sent {} results for {n} CSRs",
                    results.len()
                )),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "the SPIRE Server did not answer within {}s",
                    CALL_TIMEOUT.as_secs()
                )),
            }
        };
        let now = self.now();
        let ok = answer.is_ok();
        let mut done: Vec<(MintJob, Result<Checked, AuthorityError>)> = Vec::with_capacity(n);
        match answer {
            Err(reason) => {
                if self
                    .inner
                    .mint_failures
                    .admit(tokio::time::Instant::now().into_std())
                    .is_some()
                {
                    tracing::warn!(%reason, csrs = n, "BatchNewX509SVID failed");
                }
                for (job, _) in pending {
                    let e = AuthorityError::Unavailable(format!(
                        "the SPIRE Server did not sign the X.509-SVID of {}: {reason}",
                        job.spiffe_id
                    ));
                    done.push((job, Err(e)));
                }
            }
            Ok(results) => {
                let authorities = self
                    .lock()
                    .own
                    .as_ref()
                    .map(|o| o.authorities.clone())
                    .unwrap_or_default();
                for (i, ((job, key), r)) in pending.into_iter().zip(results).enumerate() {
                    let checked = check_result(&job, key, r, &authorities, now);
                    done.push((job, checked));
                    if i % 32 == 31 {
                        // Two signature checks each: let request handlers run.
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
        done.extend(failed.into_iter().map(|(j, e)| (j, Err(e))));
        // Jitter (a random draw each) is computed before the lock is taken.
        let done: Vec<_> = done
            .into_iter()
            .map(|(job, outcome)| {
                let outcome = outcome.map(|c| {
                    let due = rotate_at(&c.svid, Some(now), jitter());
                    (c, due)
                });
                (job, outcome)
            })
            .collect();
        let mut g = self.lock();
        let st = &mut *g;
        if n > 0 {
            if ok {
                st.svids.call_succeeded();
            } else {
                st.svids.call_failed(n);
            }
        }
        let mut installed = 0u64;
        let mut replaced = 0u64;
        for (job, outcome) in done {
            match outcome {
                Ok((checked, due)) => {
                    tracing::debug!(entry = %job.id, spiffe_id = %job.spiffe_id, "X.509-SVID signed by the SPIRE Server");
                    match st.svids.finish_ok(&job, checked, due, now) {
                        Finished::Added => installed += 1,
                        Finished::Replaced => {
                            installed += 1;
                            replaced += 1;
                        }
                        Finished::Gone => {}
                    }
                }
                Err(e) => {
                    if ok
                        && job.lane == Lane::Background
                        && self
                            .inner
                            .mint_failures
                            .admit(tokio::time::Instant::now().into_std())
                            .is_some()
                    {
                        tracing::warn!(entry = %job.id, error = %e, "minting an X.509-SVID in the background failed; retrying later");
                    }
                    st.svids.finish_err(&job, e, now);
                }
            }
        }
        self.inner.mints.fetch_add(installed, Ordering::Relaxed);
        if installed > 0 {
            self.touched(st);
        }
        drop(g);
        if replaced > 0 {
            self.inner.rotations.fetch_add(replaced, Ordering::Relaxed);
            let ms = now.duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
            });
            self.inner.last_rotation_ms.store(ms, Ordering::Relaxed);
            // One line per batch (one BatchNewX509SVID call), never one per SVID or stream.
            tracing::info!(
                rotated = replaced,
                added = installed - replaced,
                "rotated X.509-SVIDs (signed by the SPIRE Server)"
            );
        }
        self.inner.upkeep.notify_one();
        ok
    }

    /// Sweeps, queues the background mints due, and sleeps until the next is due.
    /// Checks the cached SVIDs no request has asked for yet, a few at a time, yielding in
    /// between so that requests are served meanwhile.
    async fn check_loaded(&self, stop: &watch::Receiver<bool>) {
        loop {
            if is_stopped(stop) {
                return;
            }
            let left = {
                let now = self.now();
                self.lock().check_cached_batch(CHECK_CHUNK, now)
            };
            if left == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let mut st = self.lock();
        if st.unchecked_kept + st.unchecked_dropped > 0 {
            tracing::info!(
                kept = st.unchecked_kept,
                dropped = st.unchecked_dropped,
                "checked the cached X.509-SVIDs"
            );
        }
        if st.dirty {
            self.touched(&mut st);
        }
        drop(st);
        self.inner.checked.send_replace(true);
    }

    async fn upkeep(&self, mut stop: watch::Receiver<bool>) {
        // Nothing is planned (pre-minted, rotated) before the cached SVIDs are in.
        self.check_loaded(&stop).await;
        loop {
            if is_stopped(&stop) {
                return;
            }
            let now = self.now();
            let plan = {
                let mut g = self.lock();
                let st = &mut *g;
                st.jwts.retain(|c| c.svid.expiry > now);
                if st.cleared.is_some() {
                    None
                } else {
                    let entries = &st.entries;
                    let plan = st.svids.plan(now, |id| entries.get(id).map(|s| s.version));
                    if plan.dropped > 0 {
                        self.touched(st);
                    }
                    Some(plan)
                }
            };
            let next = plan.as_ref().and_then(|p| p.next);
            if plan.is_some_and(|p| p.queued > 0) {
                self.inner.background.notify_one();
            }
            let wait = next
                .map_or(MAX_SLEEP, |n| {
                    n.duration_since(now).unwrap_or(Duration::ZERO)
                })
                .clamp(Duration::from_millis(10), MAX_SLEEP);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.inner.upkeep.notified() => {}
                () = stopped(&mut stop) => return,
            }
        }
    }

    /// Writes the workload cache when it is behind, at most once per [`WRITE_SPACING`].
    async fn writer(&self, mut stop: watch::Receiver<bool>) {
        // The cache is not rewritten while cached SVIDs wait for their check (the snapshot
        // would check them all at once, under the lock).
        let mut checked = self.inner.checked.subscribe();
        tokio::select! {
            _ = checked.wait_for(|c| *c) => {}
            () = stopped(&mut stop) => {}
        }
        loop {
            tokio::select! {
                () = self.inner.persist.notified() => {}
                () = stopped(&mut stop) => break,
            }
            let _ = self.persist_now().await;
            tokio::select! {
                () = tokio::time::sleep(WRITE_SPACING) => {}
                () = stopped(&mut stop) => break,
            }
        }
        let _ = self.persist_now().await;
    }

    /// A consistent copy of what the workload cache holds (`None`: it is up to date).
    fn snapshot(&self) -> Option<Snapshot> {
        let mut st = self.lock();
        if !st.unchecked.is_empty() {
            // Unchecked SVIDs are written only once they pass (the writer waits for the
            // background check; this is the stop's last write).
            let now = self.now();
            st.check_cached_batch(usize::MAX, now);
        }
        if !st.dirty {
            return None;
        }
        st.dirty = false;
        Some(Snapshot {
            trust_domain: self.inner.td.clone(),
            entries: st
                .entries
                .values()
                .map(|s| (s.entry.clone(), s.version))
                .collect(),
            svids: if st.cleared.is_some() {
                Vec::new()
            } else {
                st.svids.snapshot()
            },
            bundle: st.own.as_ref().map(|o| o.proto.clone()),
            federated: st.federated.values().map(|(p, _)| p.clone()).collect(),
        })
    }

    /// Writes the workload cache now if it is behind (the writer task does this after each
    /// change; call it at shutdown if the task is not running).
    pub async fn persist_now(&self) -> Result<(), CacheError> {
        let Some(snap) = self.snapshot() else {
            return Ok(());
        };
        let file = self.inner.file.clone();
        let written = tokio::task::spawn_blocking(move || cache::write(&file, &snap))
            .await
            .unwrap_or_else(|e| {
                Err(CacheError::Io {
                    path: self.inner.file.clone(),
                    op: "write",
                    source: std::io::Error::other(e.to_string()),
                })
            });
        if let Err(e) = &written {
            self.lock().dirty = true;
            if self
                .inner
                .write_failures
                .admit(tokio::time::Instant::now().into_std())
                .is_some()
            {
                tracing::warn!(error = %e, "writing the workload cache failed; retrying at the next change");
            }
        }
        written
    }

    /// The refresh gate of a JWT-SVID cache key; dropping it forgets the gate when nobody
    /// else holds it (also when the request is cancelled).
    fn jwt_gate(&self, key: &JwtKey) -> JwtGate<'_> {
        let gate = lock(&self.inner.jwt_gates)
            .entry(key.clone())
            .or_default()
            .clone();
        JwtGate {
            issuer: self,
            key: key.clone(),
            gate,
        }
    }

    /// The cached JWT-SVID for `key`: (token, still fresh at `now`, still unexpired).
    fn cached_jwt(
        &self,
        key: &JwtKey,
        now: SystemTime,
    ) -> Result<Option<(Arc<JwtSvid>, bool)>, AuthorityError> {
        let mut st = self.lock();
        if let Some(reason) = &st.cleared {
            return Err(AuthorityError::Unavailable(reason.clone()));
        }
        Ok(st
            .jwts
            .get(key)
            .filter(|c| now < c.svid.expiry)
            .map(|c| (c.svid.clone(), now < c.refresh_at)))
    }
}

/// A request's hold on a JWT-SVID refresh gate (see [`SpireIssuer::jwt_gate`]).
struct JwtGate<'a> {
    issuer: &'a SpireIssuer,
    key: JwtKey,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for JwtGate<'_> {
    fn drop(&mut self) {
        let mut gates = lock(&self.issuer.inner.jwt_gates);
        // Ours and the map's: nobody else waits on it (clones are made under the same lock).
        if Arc::strong_count(&self.gate) <= 2 {
            gates.remove(&self.key);
        }
    }
}

/// Checks one result of `BatchNewX509SVID` for `job`, minted with `key`.
fn check_result(
    job: &MintJob,
    key: x509::NewKey,
    r: svid::batch_new_x509svid_response::Result,
    authorities: &[Authority],
    now: SystemTime,
) -> Result<Checked, AuthorityError> {
    if let Some(s) = &r.status
        && s.code != 0
    {
        return Err(AuthorityError::Unavailable(format!(
            "the SPIRE Server refused the X.509-SVID of {} (entry {}): {:?}: {}",
            job.spiffe_id,
            job.id,
            tonic::Code::from_i32(s.code),
            spiffed_core::untrusted::clip(&s.message)
        )));
    }
    let bad = |reason: String| AuthorityError::Mint {
        spiffe_id: job.spiffe_id.to_string(),
        reason: format!("the SPIRE Server's answer is not a valid X.509-SVID: {reason}"),
    };
    let svid = r.svid.ok_or_else(|| bad("it has no SVID".into()))?;
    let chain: Vec<&[u8]> = svid.cert_chain.iter().map(Vec::as_slice).collect();
    x509::check_chain(
        &chain,
        &job.spiffe_id,
        &key.public,
        key.pkcs8,
        authorities,
        now,
    )
    .map_err(bad)
}

/// Checks a JWT-SVID from the server for `spiffe_id`: returns it, when to refresh it, and its
/// `kid`.
fn check_jwt(
    spiffe_id: &SpiffeId,
    jwt: types::Jwtsvid,
    now: SystemTime,
) -> Result<(JwtSvid, SystemTime, String), AuthorityError> {
    let bad = |reason: String| AuthorityError::Mint {
        spiffe_id: spiffe_id.to_string(),
        reason: format!("the SPIRE Server's answer is not a valid JWT-SVID: {reason}"),
    };
    let token = Zeroizing::new(jwt.token);
    if token.is_empty() {
        return Err(bad("the token is empty".into()));
    }
    let info = token_info(&token).map_err(bad)?;
    let want = spiffe_id.to_string();
    match info.sub.as_deref() {
        Some(sub) if sub == want => {}
        Some(sub) => {
            return Err(bad(format!(
                "the token is for {}, not for {want}",
                spiffed_core::untrusted::clip(sub)
            )));
        }
        None => return Err(bad("the token has no sub claim".into())),
    }
    let exp = Some(jwt.expires_at)
        .filter(|e| *e > 0)
        .or(info.exp)
        .ok_or_else(|| bad("neither the answer nor the token says when it expires".into()))?;
    let iat = Some(jwt.issued_at).filter(|i| *i > 0).or(info.iat);
    let expiry = x509::to_system_time(exp);
    let issued_at = iat.map_or(now, x509::to_system_time);
    if expiry <= now {
        return Err(bad("the token has already expired".into()));
    }
    let life = expiry.duration_since(issued_at).unwrap_or(Duration::ZERO);
    let refresh_at = issued_at + life / 2;
    Ok((
        JwtSvid {
            spiffe_id: spiffe_id.clone(),
            token,
            expiry,
            issued_at,
        },
        refresh_at,
        info.kid,
    ))
}

#[async_trait::async_trait]
impl Issuer for SpireIssuer {
    fn trust_domain(&self) -> &TrustDomain {
        &self.inner.td
    }

    fn bundles(&self) -> watch::Receiver<Arc<BundleSet>> {
        self.inner.bundles.subscribe()
    }

    async fn x509_svid(&self, entry: &Arc<Entry>) -> Result<SvidWatch, AuthorityError> {
        let mut failed: Option<AuthorityError> = None;
        for _ in 0..MAX_ROUNDS {
            let now = self.now();
            let (mut done, new) = {
                let mut g = self.lock();
                let st = &mut *g;
                if let Some(reason) = &st.cleared {
                    return Err(AuthorityError::Unavailable(reason.clone()));
                }
                if st.stopping {
                    return Err(AuthorityError::Unavailable(
                        "the agent is stopping".to_owned(),
                    ));
                }
                if let Some(err) = failed.take() {
                    return match st.svids.fallback(&entry.id, &entry.spiffe_id, now) {
                        Some(rx) => {
                            tracing::warn!(entry = %entry.id, error = %err, "serving the X.509-SVID minted for an earlier version of the entry: the new one could not be minted");
                            Ok(SvidWatch::new(rx))
                        }
                        None => Err(err),
                    };
                }
                if !st.unchecked.is_empty() {
                    st.check_cached(&entry.id, now);
                }
                let version = st.entries.get(&entry.id).map(|s| s.version);
                match st.svids.lookup(&entry.id, &entry.spiffe_id, version, now) {
                    Lookup::Fresh(rx) => return Ok(SvidWatch::new(rx)),
                    Lookup::Wait { done, new } => (done, new),
                    Lookup::Failed(err) => {
                        return match st.svids.fallback(&entry.id, &entry.spiffe_id, now) {
                            Some(rx) => Ok(SvidWatch::new(rx)),
                            None => Err(err),
                        };
                    }
                }
            };
            if new {
                self.inner.urgent.notify_one();
            }
            // Bounded: a hung server, or lanes that are not running (`run` not spawned), give
            // the caller an error rather than a wait without end.
            let outcome = tokio::time::timeout(REQUEST_WAIT, done.wait_for(Option::is_some))
                .await
                .map_err(|_| {
                    AuthorityError::Unavailable(format!(
                        "no X.509-SVID for {} from the SPIRE Server within {}s",
                        entry.spiffe_id,
                        REQUEST_WAIT.as_secs()
                    ))
                })?
                .map(|o| o.clone());
            // Installed, or the job was dropped (cleared, stopping): look again.
            if let Ok(Some(Err(e))) = outcome {
                failed = Some(e);
            }
        }
        Err(AuthorityError::Unavailable(format!(
            "the X.509-SVID of entry {} kept changing while it was fetched; retry",
            entry.id
        )))
    }

    async fn jwt_svid(
        &self,
        entry: &Arc<Entry>,
        audience: &[String],
    ) -> Result<Arc<JwtSvid>, AuthorityError> {
        let mut aud: Vec<String> = audience.to_vec();
        aud.sort();
        aud.dedup();
        if aud.is_empty() {
            return Err(AuthorityError::Mint {
                spiffe_id: entry.spiffe_id.to_string(),
                reason: "a JWT-SVID needs at least one audience".into(),
            });
        }
        let key: JwtKey = (entry.spiffe_id.to_string(), aud);
        if let Some((svid, true)) = self.cached_jwt(&key, self.now())? {
            return Ok(svid);
        }
        // One refresh per key at a time; the others wait for it and take its token.
        let gate = self.jwt_gate(&key);
        let _one = gate.gate.lock().await;
        let now = self.now();
        let cached = self.cached_jwt(&key, now)?;
        if let Some((svid, true)) = cached {
            return Ok(svid);
        }
        let limit = if cached.is_some() {
            JWT_CACHED_TIMEOUT
        } else {
            CALL_TIMEOUT
        };
        let answer = tokio::time::timeout(
            limit,
            self.inner.api.new_jwt_svid(entry.id.as_str(), &key.1),
        )
        .await;
        let now = self.now();
        let minted = match answer {
            Ok(Ok(jwt)) => check_jwt(&entry.spiffe_id, jwt, now),
            Ok(Err(e)) => Err(AuthorityError::Unavailable(format!(
                "the SPIRE Server did not sign a JWT-SVID for {}: {e}",
                entry.spiffe_id
            ))),
            Err(_) => Err(AuthorityError::Unavailable(format!(
                "the SPIRE Server did not answer within {}s",
                limit.as_secs()
            ))),
        };
        match minted {
            Ok((svid, refresh_at, kid)) => {
                let svid = Arc::new(svid);
                let mut st = self.lock();
                if st.cleared.is_none() {
                    st.jwts.insert(key, svid.clone(), refresh_at, kid);
                }
                Ok(svid)
            }
            Err(e) => match cached {
                Some((svid, _)) if now < svid.expiry => {
                    tracing::warn!(spiffe_id = %entry.spiffe_id, error = %e, "serving a cached JWT-SVID past half its lifetime: the SPIRE Server could not refresh it");
                    Ok(svid)
                }
                _ => Err(e),
            },
        }
    }

    fn validate_jwt(&self, token: &str, audience: &str) -> Result<ValidatedJwt, JwtError> {
        let set = self.inner.bundles.borrow().clone();
        spiffed_authority::validate_jwt(token, audience, self.now(), |td| {
            set.get(td).map(|b| b.jwt.keys.clone())
        })
    }
}
