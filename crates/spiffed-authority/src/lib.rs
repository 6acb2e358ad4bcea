//! The embedded CA: entries -> identities.
//!
//! Owns the trust domain's X.509 CA (ECDSA P-256, persisted in `data_dir/ca.json`, rotated with
//! overlap), mints X.509-SVIDs per entry (shared by every caller matching that entry), re-mints
//! each at half its lifetime, and publishes a change counter that Workload API streams wait on.
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
//! tokio::spawn(authority.clone().run(stopped));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod ca;
mod jwt;
mod x509;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use spiffed_core::{
    Authority, AuthorityError, Entry, EntryId, Identity, JwtAuthority, JwtBundle, JwtError,
    JwtSvid, Lease, TrustDomain, ValidatedJwt, X509Bundle, X509Svid,
};
use tokio::sync::{Notify, watch};

use crate::ca::{KeyFile, Material};
use crate::jwt::JwtSigner;
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

/// Most cached JWT-SVIDs (entry x audience set) kept before expired ones are swept.
const MAX_CACHED_JWTS: usize = 10_000;

struct JwtSlot {
    entry: Arc<Entry>,
    svid: Arc<JwtSvid>,
    refresh_at: SystemTime,
}

/// Shortest wait before re-minting an SVID, so a tiny lifetime cannot make the task spin.
const MIN_REFRESH: Duration = Duration::from_millis(250);
/// An SVID nobody holds a lease on is kept (and rotated) this long after its last use.
const IDLE_KEEP: Duration = Duration::from_secs(60);
/// How long to wait before retrying a failed CA rotation (e.g. the disk is full).
const RETRY: Duration = Duration::from_secs(5);

struct Slot {
    entry: Arc<Entry>,
    svid: Arc<X509Svid>,
    refresh_at: SystemTime,
    last_used: SystemTime,
    lease: Arc<()>,
}

struct State {
    keys: KeyFile,
    signer: Signer,
    jwt_signer: JwtSigner,
    bundle: Arc<X509Bundle>,
    jwt_bundle: Arc<JwtBundle>,
    svids: HashMap<EntryId, Slot>,
    jwts: HashMap<(EntryId, Vec<String>), JwtSlot>,
    generation: u64,
}

impl State {
    /// Rebuilds signers and bundles from `keys`.
    fn install(keys: KeyFile, td: &TrustDomain, rng: &SystemRandom) -> Result<Self, Error> {
        let signer = make_signer(&keys)?;
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
            jwts: HashMap::new(),
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

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than stopping service, so take the data either way.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn mint(
        &self,
        st: &State,
        entry: &Arc<Entry>,
        now: SystemTime,
    ) -> Result<Slot, AuthorityError> {
        let ttl = entry.x509_svid_ttl.unwrap_or(self.inner.cfg.x509_svid_ttl);
        let m = x509::mint_svid(
            &st.signer,
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
        })
    }

    fn publish(&self, generation: u64) {
        self.inner.changes.send_replace(generation);
    }

    /// Brings CA rotation and SVID refreshes up to `now`; returns when to run again.
    pub fn tick(&self, now: SystemTime) -> SystemTime {
        let mut st = self.lock();
        let mut changed = false;
        let td = self.inner.cfg.trust_domain.clone();
        let mut next = now + Duration::from_secs(30);

        // CA and JWT key rotation: persist before use, so a crash never loses a key that
        // signed something.
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
                    st.signer = signer;
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

        // SVID refresh at half-life; drop what nobody uses any more.
        let due: Vec<EntryId> = st
            .svids
            .iter()
            .filter(|(_, s)| s.refresh_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(slot) = st.svids.remove(&id) else {
                continue;
            };
            let held = Arc::strong_count(&slot.lease) > 1;
            let recent = now
                .duration_since(slot.last_used)
                .map_or(true, |d| d < IDLE_KEEP);
            if !held && !recent {
                tracing::debug!(entry = %id, "dropping idle SVID");
                continue;
            }
            match self.mint(&st, &slot.entry, now) {
                Ok(mut fresh) => {
                    fresh.lease = slot.lease;
                    fresh.last_used = slot.last_used;
                    st.svids.insert(id, fresh);
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "SVID rotation failed; retrying");
                    let mut slot = slot;
                    slot.refresh_at = now + RETRY;
                    st.svids.insert(id, slot);
                }
            }
        }
        for s in st.svids.values() {
            next = next.min(s.refresh_at);
        }
        if changed {
            st.generation += 1;
            let g = st.generation;
            drop(st);
            self.publish(g);
        }
        next
    }

    /// Runs rotation until `stop` becomes true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            let next = self.tick(SystemTime::now());
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(10));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.inner.wake.notified() => {}
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
        let mut st = self.lock();
        let mut minted = false;
        let mut out = Vec::with_capacity(entries.len());
        let mut lease = Lease::default();
        for e in entries {
            let fresh = match st.svids.get(&e.id) {
                Some(s) if same_params(&s.entry, e) && s.svid.not_after > now => None,
                _ => Some(self.mint(&st, e, now)?),
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
            drop(st);
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
        if st.jwts.len() >= MAX_CACHED_JWTS {
            st.jwts.retain(|_, j| j.refresh_at > now);
            if st.jwts.len() >= MAX_CACHED_JWTS {
                st.jwts.clear();
            }
        }
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
                JwtSlot {
                    entry: e.clone(),
                    svid: svid.clone(),
                    refresh_at: issued_at + life / 2,
                },
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
}
