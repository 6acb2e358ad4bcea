//! The CA key state: the persisted key file, the signers made from it, the bundles it
//! publishes, and the alarms and backoff of its rotation. No locks and no tasks here; the
//! rotation task ([`crate::rotation`]) advances a copy of the key file outside the state lock
//! and swaps the result in.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use spiffed_core::{JwtAuthority, JwtBundle, TrustBundle, TrustDomain, X509Bundle};

use crate::ca::{self, CaState, KeyFile, Material};
use crate::config::{
    ALARM_REPEAT, AuthorityConfig, Error, NewRootPolicy, ROTATION_BACKOFF_MAX, ROTATION_BACKOFF_MIN,
};
use crate::jwt::{self, JwtSigner};
use crate::x509::Signer;

/// A failure that may recur on every request or retry, logged once per burst: the first
/// occurrence, then a summary every [`ALARM_REPEAT`] while it lasts, then its end.
#[derive(Debug, Default)]
pub(crate) struct Alarm {
    /// When the current burst began; `None` while all is well.
    pub(crate) since: Option<SystemTime>,
    /// Occurrences in the current burst.
    pub(crate) count: u64,
    /// When a line about the current burst was last logged.
    logged: Option<SystemTime>,
}

/// What [`Alarm::raise`] asks the caller to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Report {
    /// The first occurrence of a burst: log it loudly.
    First,
    /// Still failing, [`ALARM_REPEAT`] after the last line: log a summary.
    Repeat,
    /// Logged recently: stay quiet.
    Quiet,
}

impl Alarm {
    /// Counts one occurrence at `now`.
    pub(crate) fn raise(&mut self, now: SystemTime) -> Report {
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
    pub(crate) fn clear(&mut self) -> Option<(SystemTime, u64)> {
        let since = self.since.take()?;
        self.logged = None;
        Some((since, std::mem::take(&mut self.count)))
    }
}

/// The retry state of CA rotation: after a failed step (the new `ca.json` cannot be written,
/// say), the next attempt waits [`ROTATION_BACKOFF_MIN`], doubling up to
/// [`ROTATION_BACKOFF_MAX`], so a full disk costs a line and an attempt a minute, not a spin.
#[derive(Debug, Default)]
pub(crate) struct Rotation {
    /// The burst of failures in a row; its count drives the backoff.
    pub(crate) alarm: Alarm,
    /// No attempt before this.
    retry_at: Option<SystemTime>,
}

impl Rotation {
    /// When the next attempt is due, if it is later than `now`. A retry time further away than
    /// the longest backoff means the clock went back: retry now.
    pub(crate) fn waiting(&self, now: SystemTime) -> Option<SystemTime> {
        self.retry_at
            .filter(|&r| r > now && r <= now + ROTATION_BACKOFF_MAX)
    }

    /// Counts a failure at `now`; returns the wait before the next attempt and what to log.
    pub(crate) fn failed(&mut self, now: SystemTime) -> (Duration, Report) {
        let report = self.alarm.raise(now);
        let doublings = u32::try_from(self.alarm.count.saturating_sub(1).min(16)).unwrap_or(16);
        let wait = ROTATION_BACKOFF_MIN
            .saturating_mul(1 << doublings)
            .min(ROTATION_BACKOFF_MAX);
        self.retry_at = Some(now + wait);
        (wait, report)
    }

    /// A step succeeded (or had nothing to do): the burst, if any, ends.
    pub(crate) fn succeeded(&mut self) -> Option<(SystemTime, u64)> {
        self.retry_at = None;
        self.alarm.clear()
    }
}

/// What the signers and bundles are made of, ready to swap in (built outside the lock).
pub(crate) struct Built {
    pub(crate) keys: KeyFile,
    pub(crate) signers: Vec<(CaState, Arc<Signer>)>,
    pub(crate) jwt_signer: Arc<JwtSigner>,
    pub(crate) bundle: TrustBundle,
}

impl Built {
    /// Signers and bundles for `keys`.
    pub(crate) fn new(keys: KeyFile, td: &TrustDomain, rng: &SystemRandom) -> Result<Self, Error> {
        let signers = make_signers(&keys)?;
        let jwt_active = keys
            .jwt
            .active()
            .ok_or_else(|| Error::Crypto("no active JWT key".into()))?;
        let jwt_signer = Arc::new(JwtSigner::new(jwt_active, rng)?);
        let bundle = bundles(&keys, td);
        Ok(Self {
            keys,
            signers,
            jwt_signer,
            bundle,
        })
    }
}

/// The CA keys in use and what watches over them.
pub(crate) struct Keys {
    pub(crate) keys: KeyFile,
    /// A signer per X.509 CA in `keys`, with its role.
    pub(crate) signers: Vec<(CaState, Arc<Signer>)>,
    pub(crate) jwt_signer: Arc<JwtSigner>,
    /// The own trust domain's bundle, as last published.
    pub(crate) bundle: TrustBundle,
    /// Failing CA rotation steps: backoff and their log lines.
    pub(crate) rotation: Rotation,
    /// No CA valid at the moment (clock jumped, or every CA expired): requests are refused.
    pub(crate) no_ca: Alarm,
    /// The active CA is not valid at the moment, but an older one is and signs instead.
    pub(crate) fallback: Alarm,
}

impl Keys {
    pub(crate) fn new(built: Built) -> Self {
        Self {
            keys: built.keys,
            signers: built.signers,
            jwt_signer: built.jwt_signer,
            bundle: built.bundle,
            rotation: Rotation::default(),
            no_ca: Alarm::default(),
            fallback: Alarm::default(),
        }
    }

    /// Swaps in a rotation step; returns whether the active CA changed.
    pub(crate) fn swap(&mut self, built: Built) -> bool {
        let active = |s: &[(CaState, Arc<Signer>)]| {
            s.iter()
                .find(|(state, _)| *state == CaState::Active)
                .map(|(_, s)| s.cert_der.clone())
        };
        let activated = active(&built.signers) != active(&self.signers);
        self.keys = built.keys;
        self.signers = built.signers;
        self.jwt_signer = built.jwt_signer;
        self.bundle = built.bundle;
        activated
    }

    /// Whether a rotation step of either key set is due at `now`.
    pub(crate) fn due(&self, now: SystemTime) -> bool {
        [
            self.keys.x509.next_deadline(),
            self.keys.jwt.next_deadline(),
        ]
        .into_iter()
        .any(|d| d.is_none_or(|d| d <= now))
    }

    /// The next rotation deadline after `now` (deadlines already due belong to a failed step,
    /// which waits for its backoff).
    pub(crate) fn next_deadline(&self, now: SystemTime) -> Option<SystemTime> {
        [
            self.keys.x509.next_deadline(),
            self.keys.jwt.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .filter(|&d| d > now)
        .min()
    }

    /// The CA that signs at `now`: the active one if it is valid then, else the valid one that
    /// lasts longest (a prepared or retired CA, published in the bundle). `None` if none is
    /// valid at `now`.
    pub(crate) fn signer_at(&self, now: SystemTime) -> Option<(CaState, Arc<Signer>)> {
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
    pub(crate) fn no_ca_reason(&self, now: SystemTime, policy: NewRootPolicy) -> String {
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

/// The own trust domain's bundle for `keys`.
pub(crate) fn bundles(keys: &KeyFile, td: &TrustDomain) -> TrustBundle {
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
    TrustBundle { x509, jwt }
}

/// Advances both key sets to `now`; returns whether anything changed. A new trust root is
/// refused (naming this CA file) when `refuse_new_root` is set; a JWT key set that never had a
/// key (a `ca.json` from before JWT support) may always get its first one.
pub(crate) fn advance_keys(
    keys: &mut KeyFile,
    cfg: &AuthorityConfig,
    now: SystemTime,
    rng: &SystemRandom,
    refuse_new_root: Option<&Path>,
) -> Result<bool, Error> {
    let td = &cfg.trust_domain;
    let a = keys.x509.advance(
        now,
        &mut ca::x509_minter(td, cfg.ca_ttl, rng, cfg.upstream.as_ref()),
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
pub(crate) fn log_created(
    old: Option<&KeyFile>,
    new: &KeyFile,
    replaced: Option<&str>,
    file: &Path,
) {
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

/// A signer for every X.509 CA of `keys`, with its role.
pub(crate) fn make_signers(keys: &KeyFile) -> Result<Vec<(CaState, Arc<Signer>)>, Error> {
    keys.x509
        .cas
        .iter()
        .map(|c| {
            let cert = c
                .cert_der()
                .ok_or_else(|| Error::Crypto("an X.509 CA has no certificate".into()))?;
            let signer = Signer::new(
                cert,
                &c.key_pkcs8,
                c.not_before(),
                c.not_after,
                c.upstream.as_ref().map(|u| u.chain.as_slice()),
            )?;
            Ok((c.state, Arc::new(signer)))
        })
        .collect()
}
