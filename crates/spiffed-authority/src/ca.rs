//! The CA key set: prepared, active and retired authorities, their rotation schedule, and their
//! persistence in `data_dir/ca.json` (0600, written to a temp file, fsynced, renamed, and the
//! directory fsynced, so `kill -9` at any point leaves either the old or the new file).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::rand::SystemRandom;
use serde::{Deserialize, Serialize};
use spiffed_core::TrustDomain;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::{Zeroize, Zeroizing};

use crate::Error;
use crate::upstream::{Upstream, UpstreamConfig};
use crate::x509::{MintedCa, NOT_BEFORE_CUSHION, from_cert_time, mint_ca};

/// The role of one signing key in the rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CaState {
    /// Published (in the bundle), not yet signing.
    Prepared,
    /// Signs new SVIDs.
    Active,
    /// No longer signs; stays published until it expires.
    Retired,
}

/// What a signing key is, besides its private half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Material {
    /// An X.509 CA certificate (DER).
    X509 {
        /// The certificate.
        cert_der: Vec<u8>,
    },
    /// A JWT signing key: its `kid` and uncompressed P-256 public point (0x04 || X || Y).
    Jwt {
        /// The key id published in the JWKS and set in every token's header.
        kid: String,
        /// The public point.
        public: Vec<u8>,
    },
}

/// What an upstream CA signed an X.509 CA under, as it was when it signed: kept with the CA
/// (and in `ca.json`) so that the chain served and the roots published stay those of the
/// signature, whatever the upstream files say later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UpstreamChain {
    /// What follows the CA's certificate in an SVID chain: the upstream signing certificate
    /// and its intermediates, up to but excluding the root (DER).
    pub(crate) chain: Vec<Vec<u8>>,
    /// The upstream roots, published in the bundle instead of the CA's own certificate (DER).
    pub(crate) roots: Vec<Vec<u8>>,
}

/// One signing key: material, private key and role.
#[derive(Clone)]
pub(crate) struct Ca {
    pub(crate) material: Material,
    pub(crate) key_pkcs8: Zeroizing<Vec<u8>>,
    pub(crate) not_after: SystemTime,
    pub(crate) state: CaState,
    /// When it was made.
    pub(crate) created: SystemTime,
    /// For an X.509 CA signed by an upstream: its chain and roots (`None`: self-signed).
    pub(crate) upstream: Option<UpstreamChain>,
}

impl Ca {
    fn from_minted(m: MintedCa, state: CaState) -> Self {
        let upstream = (!m.roots.is_empty()).then_some(UpstreamChain {
            chain: m.chain,
            roots: m.roots,
        });
        Self {
            upstream,
            created: m.not_before + NOT_BEFORE_CUSHION,
            material: Material::X509 {
                cert_der: m.cert_der,
            },
            key_pkcs8: m.key_pkcs8,
            not_after: m.not_after,
            state,
        }
    }

    /// The X.509 certificate, for X.509 keys.
    pub(crate) fn cert_der(&self) -> Option<&[u8]> {
        match &self.material {
            Material::X509 { cert_der } => Some(cert_der),
            Material::Jwt { .. } => None,
        }
    }

    /// When it starts to be valid (the certificate's notBefore for an X.509 CA).
    pub(crate) fn not_before(&self) -> SystemTime {
        self.created
            .checked_sub(NOT_BEFORE_CUSHION)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// The SHA-256 fingerprint of the certificate (X.509), or the `kid` (JWT), for logs.
    pub(crate) fn fingerprint(&self) -> String {
        match &self.material {
            Material::X509 { cert_der } => fingerprint(cert_der),
            Material::Jwt { kid, .. } => format!("kid {kid}"),
        }
    }

    fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.created)
            .unwrap_or(Duration::ZERO)
    }

    /// When the next key is prepared: half way through this one's life.
    pub(crate) fn prepare_at(&self) -> SystemTime {
        self.created + self.lifetime() / 2
    }

    /// When the next key takes over: five sixths through this one's life.
    fn activate_at(&self) -> SystemTime {
        self.created + self.lifetime() * 5 / 6
    }
}

/// A rotating set of signing keys of one kind (the X.509 CAs, or the JWT keys).
#[derive(Clone, Default)]
pub(crate) struct CaSet {
    pub(crate) cas: Vec<Ca>,
    pub(crate) sequence: u64,
}

/// The SHA-256 fingerprint of a DER certificate, written as `openssl x509 -noout -fingerprint
/// -sha256` does (upper-case hex pairs joined by colons), so an operator can compare the two.
pub(crate) fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Makes a new key valid from `now`.
pub(crate) type Mint<'a> = dyn FnMut(SystemTime) -> Result<Ca, Error> + 'a;

#[derive(Serialize, Deserialize, Zeroize)]
#[zeroize(drop)]
struct FileCa {
    cert: String,
    key: String,
    #[zeroize(skip)]
    state: CaState,
    /// Signed by an upstream: the certificates after `cert` in a chain (base64 DER).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream_chain: Vec<String>,
    /// Signed by an upstream: the upstream roots it chains to (base64 DER). Empty: `cert` is
    /// self-signed and is its own root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream_roots: Vec<String>,
}

#[derive(Serialize, Deserialize, Zeroize)]
#[zeroize(drop)]
struct FileJwtKey {
    kid: String,
    public: String,
    key: String,
    created: u64,
    not_after: u64,
    #[zeroize(skip)]
    state: CaState,
}

#[derive(Serialize, Deserialize, Zeroize)]
#[zeroize(drop)]
struct FileV1 {
    version: u32,
    trust_domain: String,
    sequence: u64,
    authorities: Vec<FileCa>,
    #[serde(default)]
    jwt_sequence: u64,
    #[serde(default)]
    jwt_keys: Vec<FileJwtKey>,
}

/// Where the CA file lives in `data_dir`.
pub(crate) fn ca_file(data_dir: &Path) -> PathBuf {
    data_dir.join("ca.json")
}

/// `t` as RFC 3339 in UTC, whole seconds, for messages.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl CaSet {
    /// The active key, if any.
    pub(crate) fn active(&self) -> Option<&Ca> {
        self.cas.iter().find(|c| c.state == CaState::Active)
    }

    /// DER of the trust roots of every X.509 CA held, oldest first, each once: a self-signed
    /// CA's own certificate, or the upstream roots an upstream-signed CA chains to. A prepared
    /// CA's roots join the bundle when it is prepared, before it signs anything, so a switch
    /// to (or from, or between) upstreams keeps the overlap of a scheduled rotation.
    pub(crate) fn bundle(&self) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        for c in &self.cas {
            let roots = match (&c.upstream, c.cert_der()) {
                (Some(up), _) => up.roots.clone(),
                (None, Some(cert)) => vec![cert.to_vec()],
                (None, None) => vec![],
            };
            for r in roots {
                if !out.contains(&r) {
                    out.push(r);
                }
            }
        }
        out
    }

    /// Why advancing to `now` would need a key that signs at once with no predecessor in the
    /// bundle (a new trust root), or `None` when the rotation can go on from what is there.
    /// `kind` names the keys in the answer ("CA", "JWT signing key").
    pub(crate) fn needs_new_root(&self, now: SystemTime, kind: &str) -> Option<String> {
        let live: Vec<&Ca> = self.cas.iter().filter(|c| c.not_after > now).collect();
        if live
            .iter()
            .any(|c| matches!(c.state, CaState::Active | CaState::Prepared))
        {
            return None;
        }
        if self.cas.is_empty() {
            return Some(format!("holds no {kind}"));
        }
        if live.is_empty() {
            let last = self.cas.iter().map(|c| c.not_after).max();
            return Some(format!(
                "holds only {kind}s that expired (the last at {}, it is now {}): the agent was \
                 stopped for longer than ca_ttl, or the clock jumped forward",
                rfc3339(last.unwrap_or(SystemTime::UNIX_EPOCH)),
                rfc3339(now)
            ));
        }
        Some(format!(
            "holds no {kind} that may sign: every one still valid is retired"
        ))
    }

    /// Advances the rotation to `now`, minting with `mint`. Returns whether anything changed.
    ///
    /// A new key is always prepared (and so published) before it becomes active, and a retired
    /// key stays until its notAfter, by which time everything it signed has expired too.
    /// A key that has to sign at once because none can take over (a new trust root) is minted
    /// only if `refuse_new_root` is `None`; otherwise this fails with [`Error::NewTrustRoot`]
    /// naming that CA file.
    pub(crate) fn advance(
        &mut self,
        now: SystemTime,
        mint: &mut Mint<'_>,
        refuse_new_root: Option<&Path>,
    ) -> Result<bool, Error> {
        let kind = match self.cas.first().map(|c| &c.material) {
            Some(Material::Jwt { .. }) => "JWT signing key",
            _ => "CA",
        };
        if let (Some(why), Some(path)) = (self.needs_new_root(now, kind), refuse_new_root) {
            return Err(Error::NewTrustRoot {
                path: path.to_owned(),
                why,
            });
        }
        let before = self.cas.len();
        self.cas.retain(|c| c.not_after > now);
        let mut changed = self.cas.len() != before;

        if self.active().is_none() {
            // Nothing signs (first start, or everything expired while the agent was down).
            // A prepared key still valid takes over; otherwise mint one, if allowed.
            if let Some(p) = self.cas.iter_mut().find(|c| c.state == CaState::Prepared) {
                p.state = CaState::Active;
            } else {
                let mut fresh = mint(now)?;
                fresh.state = CaState::Active;
                self.cas.push(fresh);
            }
            changed = true;
        }
        let (prepare_at, activate_at) = match self.active() {
            Some(a) => (a.prepare_at(), a.activate_at()),
            None => return Err(Error::Crypto("no active key after rotation".into())),
        };
        let prepared = self.cas.iter().position(|c| c.state == CaState::Prepared);
        match prepared {
            None if now >= prepare_at => {
                let mut fresh = mint(now)?;
                fresh.state = CaState::Prepared;
                self.cas.push(fresh);
                changed = true;
            }
            Some(i) if now >= self.activation_time(activate_at, i) => {
                for c in &mut self.cas {
                    if c.state == CaState::Active {
                        c.state = CaState::Retired;
                    }
                }
                if let Some(p) = self.cas.get_mut(i) {
                    p.state = CaState::Active;
                }
                changed = true;
            }
            _ => {}
        }
        if changed {
            self.sequence += 1;
        }
        Ok(changed)
    }

    /// A prepared key activates at the scheduled time, but never less than a short lead after it
    /// was published (it may have been prepared late, after downtime).
    fn activation_time(&self, scheduled: SystemTime, prepared: usize) -> SystemTime {
        match self.cas.get(prepared) {
            Some(p) => {
                let lead = (p.lifetime() / 6).min(Duration::from_secs(60));
                scheduled.max(p.created + lead)
            }
            None => scheduled,
        }
    }

    /// The next time `advance` has something to do.
    pub(crate) fn next_deadline(&self) -> Option<SystemTime> {
        let active = self.active()?;
        let mut t = active.not_after;
        for (i, c) in self.cas.iter().enumerate() {
            t = t.min(c.not_after);
            if c.state == CaState::Prepared {
                t = t.min(self.activation_time(active.activate_at(), i));
            }
        }
        if !self.cas.iter().any(|c| c.state == CaState::Prepared) {
            t = t.min(active.prepare_at());
        }
        Some(t)
    }
}

/// Mints an X.509 CA for [`CaSet::advance`]: self-signed, or signed by the upstream whose
/// files are read (and checked) again at each mint, so a renewed upstream signs the next CA.
pub(crate) fn x509_minter<'a>(
    td: &'a TrustDomain,
    ttl: Duration,
    rng: &'a SystemRandom,
    upstream: Option<&'a UpstreamConfig>,
) -> impl FnMut(SystemTime) -> Result<Ca, Error> + 'a {
    move |now| {
        let up = upstream.map(|u| Upstream::load(u, now)).transpose()?;
        let ca = Ca::from_minted(mint_ca(td, ttl, now, rng, up.as_ref())?, CaState::Prepared);
        if let Some(up) = &up {
            tracing::info!(
                fingerprint = %ca.fingerprint(),
                upstream = %fingerprint(&up.cert_der),
                upstream_roots = up.roots.len(),
                not_after = %rfc3339(ca.not_after),
                "the new CA is signed by the upstream authority"
            );
        }
        Ok(ca)
    }
}

/// Everything kept in `ca.json`: the X.509 CAs and the JWT signing keys.
#[derive(Clone, Default)]
pub(crate) struct KeyFile {
    pub(crate) x509: CaSet,
    pub(crate) jwt: CaSet,
}

impl KeyFile {
    /// Loads `path`, or `None` if the file does not exist.
    pub(crate) fn load(path: &Path, td: &TrustDomain) -> Result<Option<Self>, Error> {
        let bytes = match fs::read(path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, "read", e)),
        };
        let corrupt = |why: String| Error::Corrupt {
            path: path.to_owned(),
            why,
        };
        let file: FileV1 = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if file.version != 1 {
            return Err(corrupt(format!("unknown version {}", file.version)));
        }
        if file.trust_domain != td.as_str() {
            return Err(Error::OtherTrustDomain {
                path: path.to_owned(),
                found: file.trust_domain.clone(),
                wanted: td.to_string(),
            });
        }
        let mut x509 = CaSet {
            cas: vec![],
            sequence: file.sequence,
        };
        for (i, f) in file.authorities.iter().enumerate() {
            let cert_der = B64.decode(&f.cert).map_err(|e| corrupt(e.to_string()))?;
            let key_pkcs8 = Zeroizing::new(B64.decode(&f.key).map_err(|e| corrupt(e.to_string()))?);
            let (_, cert) =
                X509Certificate::from_der(&cert_der).map_err(|e| corrupt(e.to_string()))?;
            let what = format!("authorities[{i}] (certificate {})", fingerprint(&cert_der));
            key_matches(
                &key_pkcs8,
                cert.public_key().subject_public_key.data.as_ref(),
                &what,
                "its certificate",
            )
            .map_err(corrupt)?;
            let not_before = from_cert_time(cert.validity().not_before.to_datetime());
            let not_after = from_cert_time(cert.validity().not_after.to_datetime());
            let ders = |list: &[String], name: &str| -> Result<Vec<Vec<u8>>, Error> {
                list.iter()
                    .enumerate()
                    .map(|(j, b)| {
                        let der = B64.decode(b).map_err(|e| corrupt(e.to_string()))?;
                        X509Certificate::from_der(&der)
                            .map_err(|e| corrupt(format!("authorities[{i}].{name}[{j}]: {e}")))?;
                        Ok(der)
                    })
                    .collect()
            };
            let chain = ders(&f.upstream_chain, "upstream_chain")?;
            let roots = ders(&f.upstream_roots, "upstream_roots")?;
            if roots.is_empty() && !chain.is_empty() {
                return Err(corrupt(format!(
                    "authorities[{i}] has an upstream_chain but no upstream_roots"
                )));
            }
            let upstream = (!roots.is_empty()).then_some(UpstreamChain { chain, roots });
            x509.cas.push(Ca {
                upstream,
                created: not_before + NOT_BEFORE_CUSHION,
                material: Material::X509 { cert_der },
                key_pkcs8,
                not_after,
                state: f.state,
            });
        }
        let mut jwt = CaSet {
            cas: vec![],
            sequence: file.jwt_sequence,
        };
        for (i, k) in file.jwt_keys.iter().enumerate() {
            let public = B64.decode(&k.public).map_err(|e| corrupt(e.to_string()))?;
            let key_pkcs8 = Zeroizing::new(B64.decode(&k.key).map_err(|e| corrupt(e.to_string()))?);
            let what = format!("jwt_keys[{i}] (kid {:?})", k.kid);
            key_matches(&key_pkcs8, &public, &what, "its public key").map_err(corrupt)?;
            jwt.cas.push(Ca {
                upstream: None,
                material: Material::Jwt {
                    kid: k.kid.clone(),
                    public,
                },
                key_pkcs8,
                created: SystemTime::UNIX_EPOCH + Duration::from_secs(k.created),
                not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(k.not_after),
                state: k.state,
            });
        }
        Ok(Some(Self { x509, jwt }))
    }

    /// Writes the file atomically with mode 0600.
    pub(crate) fn save(&self, path: &Path, td: &TrustDomain) -> Result<(), Error> {
        let file = FileV1 {
            version: 1,
            trust_domain: td.to_string(),
            sequence: self.x509.sequence,
            authorities: self
                .x509
                .cas
                .iter()
                .filter_map(|c| {
                    let b64 = |list: Option<&Vec<Vec<u8>>>| -> Vec<String> {
                        list.map(|l| l.iter().map(|d| B64.encode(d)).collect())
                            .unwrap_or_default()
                    };
                    c.cert_der().map(|cert| FileCa {
                        cert: B64.encode(cert),
                        key: B64.encode(&c.key_pkcs8[..]),
                        state: c.state,
                        upstream_chain: b64(c.upstream.as_ref().map(|u| &u.chain)),
                        upstream_roots: b64(c.upstream.as_ref().map(|u| &u.roots)),
                    })
                })
                .collect(),
            jwt_sequence: self.jwt.sequence,
            jwt_keys: self
                .jwt
                .cas
                .iter()
                .filter_map(|c| match &c.material {
                    Material::Jwt { kid, public } => Some(FileJwtKey {
                        kid: kid.clone(),
                        public: B64.encode(public),
                        key: B64.encode(&c.key_pkcs8[..]),
                        created: unix_secs(c.created),
                        not_after: unix_secs(c.not_after),
                        state: c.state,
                    }),
                    Material::X509 { .. } => None,
                })
                .collect(),
        };
        let bytes = Zeroizing::new(
            serde_json::to_vec_pretty(&file).map_err(|e| Error::Crypto(e.to_string()))?,
        );
        write_private_atomic(path, &bytes)
    }
}

/// Checks that the PKCS#8 private key `key_pkcs8` parses and is the private half of `public`
/// (an uncompressed point for P-256, as both certificates and our JWKS carry it). A mismatch
/// would sign SVIDs or tokens that no peer can verify.
fn key_matches(key_pkcs8: &[u8], public: &[u8], what: &str, of: &str) -> Result<(), String> {
    let pair = rcgen::KeyPair::try_from(key_pkcs8)
        .map_err(|e| format!("the private key of {what} cannot be read: {e}"))?;
    if pair.public_key_raw() != public {
        return Err(format!(
            "the private key of {what} does not belong to {of}: everything it signs would fail \
             verification"
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one: a temp
/// file (0600 from creation) in the same directory, fsync, rename, fsync of the directory.
pub(crate) fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, "create", e))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(&tmp, "chmod", e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io(&tmp, "write", e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, "fsync", e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| Error::io(path, "rename into place", e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "fsync directory", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn rotation_prepares_then_activates_then_retires() {
        let rng = SystemRandom::new();
        let ttl = Duration::from_secs(600);
        let t0 = SystemTime::now();
        let td = td();
        let mut mint = x509_minter(&td, ttl, &rng, None);
        let mut set = CaSet::default();
        assert!(set.advance(t0, &mut mint, None).unwrap());
        assert_eq!(set.cas.len(), 1);
        let first = set.active().unwrap().material.clone();
        // Nothing to do before half-life.
        assert!(
            !set.advance(t0 + Duration::from_secs(100), &mut mint, None)
                .unwrap()
        );
        let d = set.next_deadline().unwrap();
        assert!(d > t0 + Duration::from_secs(290) && d <= t0 + Duration::from_secs(300));
        // Half-life: a prepared CA joins the bundle, the first still signs.
        let t1 = t0 + Duration::from_secs(301);
        assert!(set.advance(t1, &mut mint, None).unwrap());
        assert_eq!(set.cas.len(), 2);
        assert_eq!(set.active().unwrap().material, first);
        // Five sixths: the prepared CA signs; the old one stays in the bundle.
        let t2 = t0 + Duration::from_secs(501);
        assert!(set.advance(t2, &mut mint, None).unwrap());
        assert_eq!(set.cas.len(), 2);
        assert_ne!(set.active().unwrap().material, first);
        assert!(
            set.cas
                .iter()
                .any(|c| c.state == CaState::Retired && c.material == first)
        );
        // Old one's expiry: gone from the bundle; it is also the new one's half-life, so
        // the next CA is prepared in the same step.
        let t3 = t0 + Duration::from_secs(601);
        assert!(set.advance(t3, &mut mint, None).unwrap());
        assert_eq!(set.cas.len(), 2);
        assert!(set.cas.iter().all(|c| c.material != first));
        assert_eq!(
            set.cas
                .iter()
                .filter(|c| c.state == CaState::Prepared)
                .count(),
            1
        );
        assert_eq!(set.sequence, 4);
    }

    #[test]
    fn save_and_load_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = ca_file(dir.path());
        let rng = SystemRandom::new();
        let td = td();
        let mut file = KeyFile::default();
        file.x509
            .advance(
                SystemTime::now(),
                &mut x509_minter(&td, Duration::from_secs(600), &rng, None),
                None,
            )
            .unwrap();
        file.save(&path, &td).unwrap();
        let set = &file.x509;
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = KeyFile::load(&path, &td).unwrap().unwrap().x509;
        assert_eq!(back.bundle(), set.bundle());
        assert_eq!(back.sequence, 1);
        assert_eq!(&back.cas[0].key_pkcs8[..], &set.cas[0].key_pkcs8[..]);
        // No temp file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Another trust domain refuses the file.
        let other = TrustDomain::new("other.org").unwrap();
        assert!(matches!(
            KeyFile::load(&path, &other),
            Err(Error::OtherTrustDomain { .. })
        ));
        // A corrupt file is an error naming it, never a silent fresh CA.
        fs::write(&path, b"{not json").unwrap();
        let err = KeyFile::load(&path, &td).err().unwrap();
        assert!(err.to_string().contains("ca.json"), "{err}");
    }

    /// A key file with two X.509 CAs and two JWT keys (the first of each active, the second
    /// prepared), saved to `path`.
    fn two_of_each(path: &Path, td: &TrustDomain) -> KeyFile {
        let rng = SystemRandom::new();
        let ttl = Duration::from_secs(600);
        let t0 = SystemTime::now();
        let mut file = KeyFile::default();
        for t in [t0, t0 + Duration::from_secs(301)] {
            file.x509
                .advance(t, &mut x509_minter(td, ttl, &rng, None), None)
                .unwrap();
            file.jwt
                .advance(t, &mut crate::jwt::minter(ttl, &rng), None)
                .unwrap();
        }
        assert_eq!((file.x509.cas.len(), file.jwt.cas.len()), (2, 2));
        file.save(path, td).unwrap();
        file
    }

    /// Swaps the `key` fields of `list[0]` and `list[1]` in the JSON file at `path`.
    fn swap_keys(path: &Path, list: &str) {
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        let a = v[list][0]["key"].take();
        let b = v[list][1]["key"].take();
        v[list][0]["key"] = b;
        v[list][1]["key"] = a;
        fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused_at_load() {
        let td = td();
        for list in ["authorities", "jwt_keys"] {
            let dir = tempfile::tempdir().unwrap();
            let path = ca_file(dir.path());
            two_of_each(&path, &td);
            assert!(KeyFile::load(&path, &td).is_ok());
            swap_keys(&path, list);
            let err = KeyFile::load(&path, &td)
                .err()
                .expect("a swapped key must be refused");
            let msg = err.to_string();
            assert!(matches!(err, Error::Corrupt { .. }), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{list}[0]")), "{msg}");
            assert!(msg.contains("does not belong"), "{msg}");
        }
        // A key that is not a key at all.
        let dir = tempfile::tempdir().unwrap();
        let path = ca_file(dir.path());
        two_of_each(&path, &td);
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        v["authorities"][1]["key"] = serde_json::Value::String(B64.encode(b"not a key"));
        fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let msg = KeyFile::load(&path, &td).err().unwrap().to_string();
        assert!(
            msg.contains("authorities[1]") && msg.contains("cannot be read"),
            "{msg}"
        );
    }

    #[test]
    fn a_key_set_that_cannot_sign_needs_a_new_root() {
        let td = td();
        let rng = SystemRandom::new();
        let ttl = Duration::from_secs(600);
        let t0 = SystemTime::now();
        let file = Path::new("/data/ca.json");
        let mut mint = x509_minter(&td, ttl, &rng, None);
        let refuse = |set: &mut CaSet, now, mint: &mut Mint<'_>| {
            let before = set.bundle();
            let err = set.advance(now, mint, Some(file)).expect_err("must refuse");
            assert_eq!(set.bundle(), before, "nothing minted");
            let msg = err.to_string();
            assert!(matches!(err, Error::NewTrustRoot { .. }), "{msg}");
            assert!(
                msg.contains("/data/ca.json") && msg.contains("--new-trust-root"),
                "{msg}"
            );
            msg
        };
        // Empty.
        let msg = refuse(&mut CaSet::default(), t0, &mut mint);
        assert!(msg.contains("holds no CA"), "{msg}");
        // Expired.
        let mut set = CaSet::default();
        set.advance(t0, &mut mint, None).unwrap();
        let msg = refuse(&mut set.clone(), t0 + ttl * 2, &mut mint);
        assert!(msg.contains("expired"), "{msg}");
        // Only retired.
        let mut retired = set.clone();
        retired.cas[0].state = CaState::Retired;
        let msg = refuse(&mut retired, t0, &mut mint);
        assert!(msg.contains("retired"), "{msg}");
        // A prepared CA still valid takes over: a rotation, not a new root.
        let mut rotated = set.clone();
        rotated
            .advance(t0 + Duration::from_secs(301), &mut mint, None)
            .unwrap();
        assert!(
            rotated
                .advance(t0 + ttl + Duration::from_secs(1), &mut mint, Some(file))
                .unwrap()
        );
        assert!(rotated.active().is_some());
        // Allowed: a fresh active CA valid now.
        let mut expired = set.clone();
        assert!(expired.advance(t0 + ttl * 2, &mut mint, None).unwrap());
        let fresh = expired.active().unwrap();
        assert!(fresh.not_before() <= t0 + ttl * 2 && t0 + ttl * 2 < fresh.not_after);
    }

    #[test]
    fn fingerprint_is_openssl_style_sha256() {
        let fp = fingerprint(b"abc");
        assert_eq!(
            fp,
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
        );
    }
}
