//! [`CaAuthority`]: opening the CA, and the request path ([`Issuer`]).
//!
//! The request path takes the state lock only to look up and to install: signing happens
//! outside it. A first fetch of an entry marks it as being minted, mints unlocked, and installs
//! the result; concurrent first fetches of the same entry wait for that one mint.
//!
//! The mint runs inline on the calling task rather than on `spawn_blocking`: it costs one P-256
//! key generation and one signature (tens of microseconds, see `benches/mint.rs`), about what
//! handing it to the blocking pool and back costs, and with no `.await` between marking and
//! installing, a cancelled request can never leave an entry marked as being minted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use spiffed_core::{
    AuthorityError, BundleSet, Entry, Issuer, JwtError, JwtSvid, SvidWatch, TrustBundle,
    TrustDomain, ValidatedJwt, X509Svid,
};
use tokio::sync::{Notify, watch};

use crate::ca::{self, CaState, KeyFile};
use crate::clock::{self, Clock};
use crate::config::{AuthorityConfig, Error, NewRootPolicy, STORE_FILE};
use crate::jwt;
use crate::jwt_cache::{JwtCache, JwtCacheLimits, JwtSlot};
use crate::keys::{Built, Keys, Report, advance_keys, log_created};
use crate::svid_cache::{Lookup, SvidCache, SvidStats, refresh_at};
use crate::upstream::Upstream;
use crate::x509::{self, Signer};

/// How often a request looks again after waiting for another request's mint of the same
/// entry, before giving up (only a stream of conflicting changes to the entry gets there).
const MAX_ROUNDS: usize = 16;

/// Everything behind the state lock: short critical sections only, never a signature.
pub(crate) struct State {
    pub(crate) keys: Keys,
    pub(crate) svids: SvidCache,
    /// JWT-SVIDs by (entry, audience set), bounded ([`JwtCacheLimits`]).
    pub(crate) jwts: JwtCache,
    /// When the rotation task plans to wake (`None`: it is busy). A request that mints an
    /// SVID due earlier wakes it; others leave it asleep (a burst of first fetches must not
    /// make it sweep the cache once per fetch).
    pub(crate) planned: Option<SystemTime>,
    /// The earliest refresh deadline of SVIDs requests minted while the task was busy, for it
    /// to take into account before it sleeps.
    pub(crate) missed: Option<SystemTime>,
}

pub(crate) struct Inner {
    pub(crate) cfg: AuthorityConfig,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) file: PathBuf,
    pub(crate) rng: SystemRandom,
    pub(crate) state: Mutex<State>,
    /// Held by a CA rotation step (key generation, `ca.json` write) from copy to swap, so two
    /// steps never interleave. The request path never takes it.
    pub(crate) rotating: Mutex<()>,
    pub(crate) bundles: watch::Sender<Arc<BundleSet>>,
    /// Wakes the rotation task (a request minted, or noticed that no CA is valid).
    pub(crate) wake: Notify,
    pub(crate) mints: AtomicU64,
    /// X.509-SVIDs the rotation task replaced (rotations and changed entries).
    pub(crate) rotations: AtomicU64,
    /// When the last one was replaced, in milliseconds since the epoch (0: never).
    pub(crate) last_rotation_ms: AtomicU64,
}

/// The embedded CA and SVID cache. Cheap to clone; use it as an `Arc<dyn Issuer>` through
/// `Arc::new(authority)`.
#[derive(Clone)]
pub struct CaAuthority {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for CaAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaAuthority")
            .field("trust_domain", &self.inner.cfg.trust_domain)
            .finish_non_exhaustive()
    }
}

/// Takes a lock whatever a panicking holder left: no critical section here leaves the state
/// half-updated in a way that matters more than stopping service.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Logs, at start, when the active CA was not signed the way the config now asks (a data dir
/// switched from self-signed to an upstream, back, or to another upstream root): the switch
/// happens through the scheduled rotation, so the new roots are in every workload's bundle
/// before anything is signed under them.
fn log_switch(keys: &KeyFile, upstream: Option<&Upstream>) {
    let Some(active) = keys.x509.active() else {
        return;
    };
    let prepared = keys.x509.cas.iter().any(|c| c.state == CaState::Prepared);
    let next = if prepared {
        "after the CA already prepared has served its term".to_owned()
    } else {
        format!("prepared at {}", ca::rfc3339(active.prepare_at()))
    };
    let msg = match (&active.upstream, upstream) {
        (None, Some(_)) => Some(
            "switching to the upstream authority: the active CA is self-signed and keeps              signing until the next rotation; the next CA is signed by the upstream, whose              roots join the bundle when it is prepared, before it signs",
        ),
        (Some(_), None) => Some(
            "switching from the upstream authority back to self-signed CAs: the active CA              (signed by the upstream) keeps signing until the next rotation; the next CA is              self-signed and joins the bundle when it is prepared, before it signs",
        ),
        (Some(was), Some(now)) if was.roots != now.roots => Some(
            "the upstream roots changed: the active CA keeps its chain until the next              rotation; the next CA is signed by the upstream as configured now, and its roots              join the bundle when it is prepared, before it signs",
        ),
        _ => None,
    };
    if let Some(msg) = msg {
        tracing::warn!(
            active = %active.fingerprint(),
            active_not_after = %ca::rfc3339(active.not_after),
            next_ca = %next,
            "{msg}"
        );
    }
}

/// The starting sequence of the bundle set: grows with both persisted key-set sequences.
fn first_sequence(keys: &KeyFile) -> u64 {
    keys.x509.sequence.saturating_add(keys.jwt.sequence)
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
        // The upstream files are checked at every start, even when no CA is due: a broken
        // upstream is reported now, not at the next rotation hours later.
        let upstream = cfg
            .upstream
            .as_ref()
            .map(|u| Upstream::load(u, now).map(|up| (u, up)))
            .transpose()?;
        if let Some((u, up)) = &upstream {
            tracing::info!(
                cert_file = %u.cert_file_path.display(),
                upstream = %ca::fingerprint(&up.cert_der),
                upstream_not_after = %ca::rfc3339(up.not_after),
                intermediates = up.chain.len(),
                roots = up.roots.len(),
                "upstream authority: each CA is an intermediate signed by the upstream CA, and \
                 the X.509 bundle holds the upstream roots"
            );
            if up.not_after < now + cfg.ca_ttl {
                tracing::warn!(
                    cert_file = %u.cert_file_path.display(),
                    upstream_not_after = %ca::rfc3339(up.not_after),
                    ca_ttl = %humantime::format_duration(cfg.ca_ttl),
                    "the upstream CA expires before ca_ttl is over: new CAs are capped to its \
                     notAfter, and signing stops when it expires; renew the upstream certificate"
                );
            }
        }
        let mut keys = loaded.clone().unwrap_or_default();
        if advance_keys(&mut keys, &cfg, now, &rng, None)? || !file.exists() {
            keys.save(&file, td)?;
        }
        log_created(loaded.as_ref(), &keys, replaces.as_deref(), &file);
        log_switch(&keys, upstream.as_ref().map(|(_, up)| up));
        let sequence = first_sequence(&keys);
        let built = Built::new(keys, td, &rng)?;
        let (bundles, _) = watch::channel(Arc::new(BundleSet::new(built.bundle.clone(), sequence)));
        let state = State {
            keys: Keys::new(built),
            svids: SvidCache::new(cfg.premint_entries),
            jwts: JwtCache::default(),
            planned: None,
            missed: None,
        };
        let authority = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                rotating: Mutex::new(()),
                cfg,
                clock,
                file,
                rng,
                bundles,
                wake: Notify::new(),
                mints: AtomicU64::new(0),
                rotations: AtomicU64::new(0),
                last_rotation_ms: AtomicU64::new(0),
            }),
        };
        // A clock behind the CA's notBefore is reported at once, not at the first request.
        {
            let mut st = authority.lock();
            let _ = authority.signer_for(&mut st.keys, now);
        }
        Ok(authority)
    }

    /// The current time, from the injected clock.
    pub(crate) fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// The CA to sign with at `now`, or why nothing may be signed. Both the lack of a valid CA
    /// and signing with an older CA because the active one is not valid yet are logged once
    /// per burst (and when they end).
    pub(crate) fn signer_for(
        &self,
        keys: &mut Keys,
        now: SystemTime,
    ) -> Result<Arc<Signer>, AuthorityError> {
        let Some((state, signer)) = keys.signer_at(now) else {
            let reason = keys.no_ca_reason(now, self.inner.cfg.new_root);
            match keys.no_ca.raise(now) {
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
                    %reason, refused = keys.no_ca.count,
                    since = %ca::rfc3339(keys.no_ca.since.unwrap_or(now)),
                    "still no CA valid: refusing to sign SVIDs"
                ),
                Report::Quiet => {}
            }
            return Err(AuthorityError::Unavailable(reason));
        };
        if let Some((since, refused)) = keys.no_ca.clear() {
            tracing::warn!(
                since = %ca::rfc3339(since), refused,
                fingerprint = %ca::fingerprint(&signer.cert_der),
                "a CA is valid again: signing resumes"
            );
        }
        if state == CaState::Active {
            if let Some((since, _)) = keys.fallback.clear() {
                tracing::info!(since = %ca::rfc3339(since), "the active CA is valid again and signs");
            }
        } else if keys.fallback.raise(now) != Report::Quiet {
            tracing::warn!(
                fingerprint = %ca::fingerprint(&signer.cert_der), ?state,
                "the active CA is not valid at this moment (the clock is behind its notBefore?); \
                 signing with an older CA that still is"
            );
        }
        Ok(signer)
    }

    /// Mints an X.509-SVID for `entry` (key generation and signing). Never under the state
    /// lock.
    pub(crate) fn mint(
        &self,
        signer: &Signer,
        entry: &Entry,
        now: SystemTime,
    ) -> Result<Arc<X509Svid>, AuthorityError> {
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
        self.inner.mints.fetch_add(1, Ordering::Relaxed);
        let svid = Arc::new(X509Svid {
            spiffe_id: entry.spiffe_id.clone(),
            cert_chain_der: m.chain_der,
            key: m.key,
            serial: m.serial,
            not_before: m.not_before,
            not_after: m.not_after,
        });
        tracing::debug!(spiffe_id = %entry.spiffe_id, entry = %entry.id, serial = %x509::hex(&svid.serial), "minted X.509-SVID");
        Ok(svid)
    }

    /// Replaces the own trust domain's bundle in the published set (under the state lock, so
    /// sets go out in the order of the key swaps).
    pub(crate) fn publish_own(&self, bundle: TrustBundle) {
        self.inner.bundles.send_if_modified(|set| {
            if set.own() == &bundle {
                return false;
            }
            let next = (**set).clone().with(bundle, set.sequence() + 1);
            *set = Arc::new(next);
            true
        });
    }

    /// Adds or replaces a federated trust domain's bundle; published to every stream at once
    /// (the set's sequence grows). The own trust domain's bundle comes from the CA only.
    pub fn set_federated(&self, bundle: TrustBundle) -> Result<(), Error> {
        if bundle.trust_domain() == &self.inner.cfg.trust_domain {
            return Err(Error::FederatedOwnTrustDomain(
                bundle.trust_domain().to_string(),
            ));
        }
        let _st = self.lock();
        self.inner.bundles.send_if_modified(|set| {
            if set.get(bundle.trust_domain()) == Some(&bundle) {
                return false;
            }
            let next = (**set).clone().with(bundle, set.sequence() + 1);
            *set = Arc::new(next);
            true
        });
        Ok(())
    }

    /// Removes a federated trust domain's bundle (the own one cannot be removed).
    pub fn remove_federated(&self, td: &TrustDomain) {
        let _st = self.lock();
        self.inner.bundles.send_if_modified(|set| {
            if td == set.own_trust_domain() || set.get(td).is_none() {
                return false;
            }
            let next = (**set).clone().without(td, set.sequence() + 1);
            *set = Arc::new(next);
            true
        });
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

    /// How many X.509-SVIDs are in memory, held by streams, and pre-minted (one pass over the
    /// cached SVIDs: for logs, tests and benchmarks).
    pub fn svid_stats(&self) -> SvidStats {
        self.lock().svids.stats()
    }

    /// How many X.509-SVIDs were minted since start (requests, pre-mints and rotations).
    pub fn x509_mints(&self) -> u64 {
        self.inner.mints.load(Ordering::Relaxed)
    }

    /// The path of the CA file.
    pub fn ca_file(&self) -> &Path {
        &self.inner.file
    }

    /// How many X.509-SVIDs the rotation task replaced since start (rotations at half-life,
    /// and re-mints after an entry or CA change), and when it last did.
    pub fn x509_rotations(&self) -> (u64, Option<SystemTime>) {
        let n = self.inner.rotations.load(Ordering::Relaxed);
        let ms = self.inner.last_rotation_ms.load(Ordering::Relaxed);
        let at = (ms > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        (n, at)
    }

    /// The validity (notBefore, notAfter) of the active X.509 CA, if there is one.
    pub fn ca_validity(&self) -> Option<(SystemTime, SystemTime)> {
        let st = self.lock();
        st.keys
            .keys
            .x509
            .active()
            .map(|ca| (ca.not_before(), ca.not_after))
    }

    /// Counts one batch of rotations installed at `now` (see [`CaAuthority::x509_rotations`]).
    pub(crate) fn rotated(&self, replaced: u64, now: SystemTime) {
        if replaced == 0 {
            return;
        }
        self.inner.rotations.fetch_add(replaced, Ordering::Relaxed);
        let ms = now.duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.inner.last_rotation_ms.store(ms, Ordering::Relaxed);
    }
}

/// A signing failure as callers see it: no key valid at the moment is Unavailable (the reason
/// says why; it passes when the clock or the operator acts), anything else a minting error.
pub(crate) fn mint_error(spiffe_id: &spiffed_core::SpiffeId, e: Error) -> AuthorityError {
    match e {
        Error::NoValidCa(reason) => AuthorityError::Unavailable(reason),
        e => AuthorityError::Mint {
            spiffe_id: spiffe_id.to_string(),
            reason: e.to_string(),
        },
    }
}

/// What one look at the cache told a request.
enum Step {
    Done(SvidWatch),
    Wait(watch::Receiver<()>),
    Mint(crate::svid_cache::MintTicket, Arc<Signer>),
}

#[async_trait::async_trait]
impl Issuer for CaAuthority {
    fn trust_domain(&self) -> &TrustDomain {
        &self.inner.cfg.trust_domain
    }

    fn bundles(&self) -> watch::Receiver<Arc<BundleSet>> {
        self.inner.bundles.subscribe()
    }

    async fn x509_svid(&self, entry: &Arc<Entry>) -> Result<SvidWatch, AuthorityError> {
        for _ in 0..MAX_ROUNDS {
            // An SVID not valid at this moment (the clock jumped) is never handed out: it is
            // re-minted, or the call fails.
            let now = self.now();
            let step = {
                let mut guard = self.lock();
                let st = &mut *guard;
                match st.svids.lookup(entry, now) {
                    Lookup::Hit(rx) => Step::Done(SvidWatch::new(rx)),
                    Lookup::Wait(done) => Step::Wait(done),
                    Lookup::Mint(ticket) => match self.signer_for(&mut st.keys, now) {
                        Ok(signer) => Step::Mint(ticket, signer),
                        Err(e) => {
                            st.svids.abort(ticket);
                            return Err(e);
                        }
                    },
                }
            };
            let (ticket, signer) = match step {
                Step::Done(w) => return Ok(w),
                Step::Wait(mut done) => {
                    // Closes when the minter installs or gives up; then look again.
                    let _ = done.changed().await;
                    continue;
                }
                Step::Mint(ticket, signer) => (ticket, signer),
            };
            let minted = self.mint(&signer, entry, now);
            let mut st = self.lock();
            return match minted {
                Ok(svid) => {
                    let due = refresh_at(&svid, now);
                    let rx = st.svids.install_minted(entry, ticket, svid, now);
                    // The rotation task must learn a refresh deadline earlier than its own, and
                    // act now if its planned wake-up has passed by the clock (the clock jumped
                    // forward: a CA rotation step may be due).
                    let wake = match st.planned {
                        Some(p) => due < p || now >= p,
                        None => {
                            st.missed = Some(st.missed.map_or(due, |m| m.min(due)));
                            false
                        }
                    };
                    drop(st);
                    if wake {
                        self.inner.wake.notify_one();
                    }
                    Ok(SvidWatch::new(rx))
                }
                Err(e) => {
                    st.svids.abort(ticket);
                    Err(e)
                }
            };
        }
        Err(AuthorityError::Unavailable(format!(
            "the X.509-SVID of entry {} was replaced {MAX_ROUNDS} times while fetching it (the \
             entry keeps changing); retry",
            entry.id
        )))
    }

    async fn jwt_svid(
        &self,
        entry: &Arc<Entry>,
        audience: &[String],
    ) -> Result<Arc<JwtSvid>, AuthorityError> {
        let now = self.now();
        let mut aud: Vec<String> = audience.to_vec();
        aud.sort();
        aud.dedup();
        let key = (entry.id.clone(), aud);
        let signer = {
            let mut st = self.lock();
            if let Some(j) = st.jwts.get(&key)
                && j.refresh_at > now
                && j.svid.issued_at <= now
                && j.entry.spiffe_id == entry.spiffe_id
                && j.entry.jwt_svid_ttl == entry.jwt_svid_ttl
            {
                return Ok(j.svid.clone());
            }
            st.keys.jwt_signer.clone()
        };
        let ttl = entry.jwt_svid_ttl.unwrap_or(self.inner.cfg.jwt_svid_ttl);
        let (token, issued_at, expiry) = signer
            .sign(&entry.spiffe_id, &key.1, ttl, now, &self.inner.rng)
            .map_err(|err| mint_error(&entry.spiffe_id, err))?;
        let life = expiry.duration_since(issued_at).unwrap_or(Duration::ZERO);
        let svid = Arc::new(JwtSvid {
            spiffe_id: entry.spiffe_id.clone(),
            token,
            expiry,
            issued_at,
        });
        tracing::debug!(spiffe_id = %entry.spiffe_id, entry = %entry.id, kid = %signer.kid, "minted JWT-SVID");
        self.lock().jwts.insert(
            key,
            JwtSlot::new(entry.clone(), svid.clone(), issued_at + life / 2),
        );
        Ok(svid)
    }

    fn validate_jwt(&self, token: &str, audience: &str) -> Result<ValidatedJwt, JwtError> {
        let set = self.inner.bundles.borrow().clone();
        jwt::validate(token, audience, self.now(), |td| {
            set.get(td).map(|b| b.jwt.keys.clone())
        })
    }
}
