//! An upstream CA from files (as SPIRE's `disk` UpstreamAuthority): the agent's CAs become
//! intermediates signed by it, SVID chains carry them, and the X.509 bundle holds the upstream
//! roots instead of the agent's own CA certificates, so several standalone hosts configured
//! with the same upstream verify each other's X.509-SVIDs.
//!
//! The files are read, and checked, at start and every time a CA is minted (each rotation),
//! so a renewed upstream certificate or key is picked up by the next CA without a restart.
//! A CA keeps the chain and roots it was signed under in `ca.json`: a restart serves exactly
//! what it served before, whatever the files say now.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::KeyPair;
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::ca::{fingerprint, rfc3339};
use crate::x509::{CaKey, from_cert_time};

/// Where the upstream CA's files are: `[upstream_authority.disk]` in the config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// PEM: the upstream CA certificate that signs the agent's CAs, optionally followed by the
    /// intermediates between it and the root.
    pub cert_file_path: PathBuf,
    /// PEM (PKCS#8, "PRIVATE KEY"): the private key of the first certificate of
    /// `cert_file_path`.
    pub key_file_path: PathBuf,
    /// PEM: the upstream root certificate(s), which become the trust domain's X.509 bundle.
    /// Required when `cert_file_path` does not end with a self-signed root; when it does and
    /// this is unset, that root is the bundle.
    pub bundle_file_path: Option<PathBuf>,
}

/// Why the upstream files cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error("upstream_authority.disk.{key} ({}): {problem}; {fix}", path.display())]
pub struct UpstreamError {
    /// The config key naming the file.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

/// The upstream CA, read from its files and checked: ready to sign the agent's next CA.
pub(crate) struct Upstream {
    /// The certificate that signs (DER).
    pub(crate) cert_der: Vec<u8>,
    /// Its key; the PKCS#8 copy rcgen keeps is wiped on drop.
    pub(crate) key: CaKey,
    /// What follows the agent's CA in an SVID chain: the signing certificate and the
    /// intermediates above it, up to but excluding the root (DER, in order).
    pub(crate) chain: Vec<Vec<u8>>,
    /// The upstream roots: the trust domain's X.509 bundle (DER).
    pub(crate) roots: Vec<Vec<u8>>,
    /// The earliest notAfter in the chain: no CA it signs may outlive it.
    pub(crate) not_after: SystemTime,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("cert", &fingerprint(&self.cert_der))
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// Which config key names each file, for messages.
const CERT: &str = "cert_file_path";
const KEY: &str = "key_file_path";
const BUNDLE: &str = "bundle_file_path";

fn err(
    key: &'static str,
    path: &Path,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> UpstreamError {
    UpstreamError {
        key,
        path: path.to_owned(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// The uid this process runs as: the owner of `/proc/self` (no `unsafe` call to `geteuid`).
fn my_uid() -> Option<u32> {
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Refuses a file that others may replace (group or world writable): whoever can write it
/// chooses the agent's trust roots or signing key. Warns about a key file readable by others,
/// and about a file owned by neither this user nor root.
fn check_file(key: &'static str, path: &Path, private: bool) -> Result<(), UpstreamError> {
    let md = fs::metadata(path).map_err(|e| {
        err(
            key,
            path,
            format!("cannot be read: {e}"),
            "check the path in [upstream_authority.disk]",
        )
    })?;
    if !md.is_file() {
        return Err(err(
            key,
            path,
            "is not a regular file",
            "point it at a PEM file",
        ));
    }
    let mode = md.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(err(
            key,
            path,
            format!(
                "is writable by group or others (mode {mode:04o}): whoever can write it chooses \
                 what this agent signs with and trusts"
            ),
            format!("chmod go-w {}", path.display()),
        ));
    }
    if private && mode & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = %format!("{mode:04o}"),
            "the upstream CA key file is readable by group or others: anyone who reads it can \
             sign certificates the whole trust domain trusts; chmod 600 it"
        );
    }
    if let Some(me) = my_uid()
        && md.uid() != me
        && md.uid() != 0
    {
        tracing::warn!(
            file = %path.display(),
            owner = md.uid(),
            agent_uid = me,
            "upstream_authority.disk.{key} is owned by another user, who can replace it; \
             chown it to the agent's user (or root)"
        );
    }
    Ok(())
}

/// The certificates of a PEM file, in order (DER).
fn read_certs(key: &'static str, path: &Path) -> Result<Vec<Vec<u8>>, UpstreamError> {
    check_file(key, path, false)?;
    let bytes = fs::read(path).map_err(|e| {
        err(
            key,
            path,
            format!("cannot be read: {e}"),
            "check the path in [upstream_authority.disk]",
        )
    })?;
    let mut certs = Vec::new();
    for (i, pem) in Pem::iter_from_buffer(&bytes).enumerate() {
        let pem = pem.map_err(|e| {
            err(
                key,
                path,
                format!("PEM block {} cannot be read: {e}", i + 1),
                "the file must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
            )
        })?;
        if pem.label != "CERTIFICATE" {
            return Err(err(
                key,
                path,
                format!(
                    "PEM block {} is a {:?}, not a CERTIFICATE",
                    i + 1,
                    pem.label
                ),
                "the file must hold only PEM certificates (keys go in key_file_path)",
            ));
        }
        X509Certificate::from_der(&pem.contents).map_err(|e| {
            err(
                key,
                path,
                format!("certificate {} cannot be parsed: {e}", i + 1),
                "replace it with a valid X.509 certificate",
            )
        })?;
        certs.push(pem.contents);
    }
    if certs.is_empty() {
        return Err(err(
            key,
            path,
            "holds no PEM certificate",
            "the file must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file, wiped from memory when dropped.
fn read_key(path: &Path) -> Result<CaKey, UpstreamError> {
    check_file(KEY, path, true)?;
    let bytes = Zeroizing::new(fs::read(path).map_err(|e| {
        err(
            KEY,
            path,
            format!("cannot be read: {e}"),
            "check the path in [upstream_authority.disk]",
        )
    })?);
    let mut blocks = Pem::iter_from_buffer(&bytes);
    let pem = match blocks.next() {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            return Err(err(
                KEY,
                path,
                format!("is not a PEM private key: {e}"),
                "the file must hold one PEM PKCS#8 key (-----BEGIN PRIVATE KEY-----)",
            ));
        }
        None => {
            return Err(err(
                KEY,
                path,
                "holds no PEM block",
                "the file must hold one PEM PKCS#8 key (-----BEGIN PRIVATE KEY-----)",
            ));
        }
    };
    let label = pem.label.clone();
    let der = Zeroizing::new(pem.contents);
    let convert = format!(
        "convert it with `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.pk8` and point \
         key_file_path at the result",
        path.display()
    );
    match label.as_str() {
        "PRIVATE KEY" => {}
        "EC PRIVATE KEY" | "RSA PRIVATE KEY" => {
            return Err(err(
                KEY,
                path,
                format!("holds a {label:?} (SEC1/PKCS#1); only PKCS#8 keys are read"),
                convert,
            ));
        }
        "ENCRYPTED PRIVATE KEY" => {
            return Err(err(
                KEY,
                path,
                "holds an encrypted key; the agent cannot ask for a passphrase",
                "decrypt it with `openssl pkcs8 -in KEY -out KEY.pk8` (and keep the result 0600)",
            ));
        }
        other => {
            return Err(err(
                KEY,
                path,
                format!("holds a {other:?}, not a private key"),
                "the file must hold one PEM PKCS#8 key (-----BEGIN PRIVATE KEY-----)",
            ));
        }
    }
    KeyPair::try_from(&der[..]).map(CaKey::new).map_err(|e| {
        err(
            KEY,
            path,
            format!("the key cannot be used ({e})"),
            "use an ECDSA P-256 or P-384, Ed25519, or RSA (2048 bits or more) key in PKCS#8",
        )
    })
}

/// Whether `c` is self-issued and verifies under its own key.
fn self_signed(c: &X509Certificate<'_>) -> bool {
    c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
}

/// Reads and checks the upstream files at `now`, as the next CA rotation will, and describes
/// them in one line: what an operator asks for after renewing them (`SIGHUP`). The running
/// CAs are not touched.
pub fn check_upstream(cfg: &UpstreamConfig, now: SystemTime) -> Result<String, UpstreamError> {
    let up = Upstream::load(cfg, now)?;
    Ok(format!(
        "upstream certificate {} valid until {}, {} certificate(s) between the agent's CAs and the root, {} root(s)",
        fingerprint(&up.cert_der),
        rfc3339(up.not_after),
        up.chain.len(),
        up.roots.len()
    ))
}

impl Upstream {
    /// Reads and checks the upstream files at `now`.
    pub(crate) fn load(cfg: &UpstreamConfig, now: SystemTime) -> Result<Self, UpstreamError> {
        let cert_path = &cfg.cert_file_path;
        let file_certs = read_certs(CERT, cert_path)?;
        let pair = read_key(&cfg.key_file_path)?;
        let bundle = match &cfg.bundle_file_path {
            Some(p) => Some(read_certs(BUNDLE, p)?),
            None => None,
        };
        let parsed: Vec<X509Certificate<'_>> = file_certs
            .iter()
            .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
            .collect();
        let Some(first) = parsed.first() else {
            return Err(err(CERT, cert_path, "holds no certificate", "add one"));
        };
        // The signing certificate must be a CA allowed to sign certificates.
        if !first.is_ca() {
            return Err(err(
                CERT,
                cert_path,
                format!(
                    "its certificate {} is not a CA (basicConstraints CA:TRUE is missing)",
                    fingerprint(&file_certs[0])
                ),
                "use a CA certificate (openssl: -addext basicConstraints=critical,CA:TRUE)",
            ));
        }
        let ku = first.key_usage().ok().flatten();
        if !ku.is_some_and(|k| k.value.key_cert_sign()) {
            return Err(err(
                CERT,
                cert_path,
                format!(
                    "its certificate {} may not sign certificates (keyUsage keyCertSign is \
                     missing)",
                    fingerprint(&file_certs[0])
                ),
                "use a CA certificate with -addext keyUsage=critical,keyCertSign,cRLSign",
            ));
        }
        if pair.public_key_raw() != first.public_key().subject_public_key.data.as_ref() {
            return Err(err(
                KEY,
                &cfg.key_file_path,
                format!(
                    "the key does not belong to the certificate {} of {}",
                    fingerprint(&file_certs[0]),
                    cert_path.display()
                ),
                "point key_file_path at the key of the first certificate in cert_file_path",
            ));
        }
        // Every certificate of the file is valid now; the earliest notAfter caps our CAs.
        let mut not_after = None::<SystemTime>;
        for (i, (c, der)) in parsed.iter().zip(&file_certs).enumerate() {
            let nb = from_cert_time(c.validity().not_before.to_datetime());
            let na = from_cert_time(c.validity().not_after.to_datetime());
            let which = format!("certificate {} ({})", i + 1, fingerprint(der));
            if na <= now {
                return Err(err(
                    CERT,
                    cert_path,
                    format!("{which} expired at {}", rfc3339(na)),
                    "renew the upstream CA certificate",
                ));
            }
            if nb > now {
                return Err(err(
                    CERT,
                    cert_path,
                    format!(
                        "{which} is not valid before {} (it is now {})",
                        rfc3339(nb),
                        rfc3339(now)
                    ),
                    "check this host's clock, or wait until the certificate is valid",
                ));
            }
            not_after = Some(not_after.map_or(na, |n| n.min(na)));
        }
        // Each certificate is signed by the next one in the file.
        for (i, pair) in parsed.windows(2).enumerate() {
            if let [child, parent] = pair
                && child.verify_signature(Some(parent.public_key())).is_err()
            {
                return Err(err(
                    CERT,
                    cert_path,
                    format!(
                        "certificate {} is not signed by certificate {} that follows it",
                        i + 1,
                        i + 2
                    ),
                    "list the signing certificate first, then each issuer in order up to the root",
                ));
            }
        }
        let (Some(last), Some(last_der)) = (parsed.last(), file_certs.last()) else {
            return Err(err(CERT, cert_path, "holds no certificate", "add one"));
        };
        let ends_in_root = self_signed(last);
        let roots = match bundle {
            Some(roots) => {
                // The file's chain must lead to one of the bundle's roots.
                let anchored = roots.iter().any(|r| {
                    r == last_der
                        || X509Certificate::from_der(r).is_ok_and(|(_, root)| {
                            root.subject().as_raw() == last.issuer().as_raw()
                                && last.verify_signature(Some(root.public_key())).is_ok()
                        })
                });
                if !anchored {
                    let path = cfg.bundle_file_path.as_deref().unwrap_or(cert_path);
                    return Err(err(
                        BUNDLE,
                        path,
                        format!(
                            "no root in it signed the last certificate of {} ({})",
                            cert_path.display(),
                            fingerprint(last_der)
                        ),
                        "put the upstream root certificate(s) in bundle_file_path, and the \
                         intermediates between it and the signing certificate in cert_file_path",
                    ));
                }
                roots
            }
            None if ends_in_root => vec![last_der.clone()],
            None => {
                return Err(err(
                    CERT,
                    cert_path,
                    "does not end with a self-signed root certificate, and bundle_file_path is \
                     not set, so there is no trust root to publish",
                    "set bundle_file_path to the upstream root certificate(s)",
                ));
            }
        };
        // A root that expired anchors nothing (openssl and Go refuse it): refused, and the
        // roots' notAfter caps the CAs as the chain's does.
        if let Some(bundle_path) = &cfg.bundle_file_path {
            for (i, der) in roots.iter().enumerate() {
                let Ok((_, root)) = X509Certificate::from_der(der) else {
                    continue;
                };
                let na = from_cert_time(root.validity().not_after.to_datetime());
                if na <= now {
                    return Err(err(
                        BUNDLE,
                        bundle_path,
                        format!(
                            "root certificate {} ({}) expired at {}",
                            i + 1,
                            fingerprint(der),
                            rfc3339(na)
                        ),
                        "replace it with the renewed root (and remove roots no longer used)",
                    ));
                }
                not_after = Some(not_after.map_or(na, |n| n.min(na)));
            }
        }
        // What follows the agent's CA in a chain: the file's certificates, roots excluded.
        let chain: Vec<Vec<u8>> = parsed
            .iter()
            .zip(&file_certs)
            .filter(|(c, der)| !self_signed(c) && !roots.contains(der))
            .map(|(_, der)| der.clone())
            .collect();
        let Some(not_after) = not_after else {
            return Err(err(CERT, cert_path, "holds no certificate", "add one"));
        };
        Ok(Self {
            cert_der: file_certs[0].clone(),
            key: pair,
            chain,
            roots,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests;
