//! `--write DIR`: SVIDs, keys and bundles as PEM files, for programs that cannot speak the API.
//!
//! [`write_x509_context`] writes all of an update's files with the helper's all-at-once
//! writer ([`crate::helper::writer`]): a new version directory `DIR/..<timestamp>` holds them
//! (keys 0600, the rest 0644, each created at its mode and fsynced), one rename switches
//! `DIR/..data` to it, and the names (`svid.0.pem`, ...) are links into `..data`. A reader
//! never sees a new key beside an old certificate; when the disk is full the previous set
//! stays in place. Files of SVIDs that are gone are removed.

use std::fs::{File, Permissions};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use spiffe::X509Context;
use zeroize::Zeroizing;

/// Mode of a private key file.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of a certificate or bundle file.
pub(crate) const PUBLIC_MODE: u32 = 0o644;
/// Mode of a directory `--write` creates.
pub(crate) const DIR_MODE: u32 = 0o755;

/// Writing `--write` files failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// A file system operation on `path` failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "write".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The path given with `--write` exists and is not a directory.
    #[error("--write {}: not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },

    /// The task writing the files ended without finishing (it panicked or was cancelled).
    #[error("the file writer stopped: {0}")]
    WriterStopped(String),

    /// The all-at-once writer failed (the previous files stay).
    #[error(transparent)]
    Version(#[from] crate::helper::writer::WriteError),

    /// The context has an SVID whose trust domain has no bundle (a malformed answer).
    #[error("the agent sent no bundle for trust domain {trust_domain} of SVID {index}")]
    MissingBundle {
        /// The SVID's index.
        index: usize,
        /// Its trust domain.
        trust_domain: String,
    },
}

/// Builds a closure that wraps an `io::Error` about `path`.
fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WriteError {
    let path = path.to_path_buf();
    move |source| WriteError::Io {
        action,
        path,
        source,
    }
}

/// Creates `dir` (and its parents) if missing; a directory it creates gets mode 0755.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), WriteError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(WriteError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(io_err("create directory", dir))?;
            // The umask may have narrowed the mode; set it exactly.
            std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
                .map_err(io_err("set the mode of", dir))
        }
        Err(e) => Err(io_err("inspect", dir)(e)),
    }
}

/// Fsyncs a directory, so renames in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// PEM-encodes DER blocks under one label (`CERTIFICATE`, `PRIVATE KEY`). The result is
/// zeroized on drop, since it may hold a key.
pub(crate) fn pem_encode<'a>(
    label: &str,
    ders: impl IntoIterator<Item = &'a [u8]>,
) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    for der in ders {
        let mut b64 = Zeroizing::new(String::with_capacity(der.len().div_ceil(3) * 4));
        base64::engine::general_purpose::STANDARD.encode_string(der, &mut b64);
        out.reserve(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
        out.push_str("-----BEGIN ");
        out.push_str(label);
        out.push_str("-----\n");
        // Base64 is ASCII, so every 64-byte chunk is valid UTF-8.
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END ");
        out.push_str(label);
        out.push_str("-----\n");
    }
    out
}

/// Writes `svid.N.pem` (chain, leaf first), `svid.N.key` (PKCS#8, 0600) and `bundle.N.pem` (the
/// SVID's trust domain bundle) for every SVID N, switched in at once, then removes those files
/// of indexes the context no longer has. Returns the paths written.
///
/// Every file is written and fsynced before the switch, so a failure to write (a full disk)
/// leaves the previous files untouched.
pub(crate) fn write_x509_context(
    dir: &Path,
    context: &X509Context,
) -> Result<Vec<PathBuf>, WriteError> {
    use crate::helper::FilePerm;
    use crate::helper::writer::{FileSpec, Writer};
    ensure_dir(dir)?;
    let perm = |mode| FilePerm {
        mode,
        uid: None,
        gid: None,
    };
    let mut files = Vec::new();
    for (index, svid) in context.svids().iter().enumerate() {
        let trust_domain = svid.spiffe_id().trust_domain();
        let bundle =
            context
                .bundle_set()
                .get(trust_domain)
                .ok_or_else(|| WriteError::MissingBundle {
                    index,
                    trust_domain: trust_domain.to_string(),
                })?;
        let bundle_pem = pem_encode(
            "CERTIFICATE",
            bundle.authorities().iter().map(|c| c.as_bytes()),
        );
        let key_pem = pem_encode("PRIVATE KEY", [svid.private_key().as_bytes()]);
        let chain_pem = pem_encode(
            "CERTIFICATE",
            svid.cert_chain().iter().map(|c| c.as_bytes()),
        );
        for (name, pem, mode) in [
            (format!("bundle.{index}.pem"), bundle_pem, PUBLIC_MODE),
            (format!("svid.{index}.key"), key_pem, KEY_MODE),
            (format!("svid.{index}.pem"), chain_pem, PUBLIC_MODE),
        ] {
            files.push(FileSpec {
                name,
                contents: Zeroizing::new(pem.as_bytes().to_vec()),
                perm: perm(mode),
            });
        }
    }
    Writer::open(dir)?.write(&files)?;
    remove_stale(dir, context.svids().len())?;
    Ok(files.iter().map(|f| dir.join(&f.name)).collect())
}

/// The SVID index of one of our file names (`svid.N.pem`, `svid.N.key`, `bundle.N.pem`).
fn our_index(name: &str) -> Option<usize> {
    let rest = name
        .strip_prefix("svid.")
        .and_then(|r| r.strip_suffix(".pem").or_else(|| r.strip_suffix(".key")))
        .or_else(|| {
            name.strip_prefix("bundle.")
                .and_then(|r| r.strip_suffix(".pem"))
        })?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// Removes our files for SVID indexes `>= count`: an identity that is gone takes its key along.
fn remove_stale(dir: &Path, count: usize) -> Result<(), WriteError> {
    let entries = std::fs::read_dir(dir).map_err(io_err("list", dir))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(index) = name.to_str().and_then(our_index) else {
            continue;
        };
        if index >= count {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// The names in `dir`, without the writer's own `..` entries.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(".."))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn ensure_dir_creates_with_0755_and_refuses_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a").join("out");
        ensure_dir(&out).unwrap();
        assert_eq!(mode(&out), 0o755);
        ensure_dir(&out).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            ensure_dir(&file),
            Err(WriteError::NotADirectory { .. })
        ));
    }

    #[test]
    fn pem_wraps_at_64_columns() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = pem_encode("CERTIFICATE", [der.as_slice(), &[1, 2, 3]]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN CERTIFICATE-----"));
        assert!(lines.iter().all(|l| l.len() <= 64));
        assert_eq!(pem.matches("-----END CERTIFICATE-----\n").count(), 2);
        let body: String = lines
            .iter()
            .skip(1)
            .take_while(|l| !l.starts_with("-----"))
            .copied()
            .collect();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap(),
            der
        );
    }

    #[test]
    fn our_index_matches_only_our_names() {
        assert_eq!(our_index("svid.0.pem"), Some(0));
        assert_eq!(our_index("svid.12.key"), Some(12));
        assert_eq!(our_index("bundle.3.pem"), Some(3));
        assert_eq!(our_index("bundle.3.key"), None);
        assert_eq!(our_index("svid..pem"), None);
        assert_eq!(our_index("svid.+1.pem"), None);
        assert_eq!(our_index("federated_bundle.0.1.pem"), None);
        assert_eq!(our_index("notes.txt"), None);
    }

    /// A CA and an SVID for `spiffe://example.org/web`, as the agent would send them.
    fn context() -> (X509Context, Vec<u8>, Vec<u8>, Vec<u8>) {
        context_for("spiffe://example.org/web")
    }

    /// A CA and an SVID for `id`, with the bundle of its trust domain.
    fn context_for(id: &str) -> (X509Context, Vec<u8>, Vec<u8>, Vec<u8>) {
        use rcgen::{
            BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf_params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        let key_der = leaf_key.serialize_der();
        let svid = spiffe::X509Svid::parse_from_der_with_hint(
            leaf.der(),
            &key_der,
            Some(Arc::from("internal")),
        )
        .unwrap();
        let td = spiffe::SpiffeId::new(id).unwrap().trust_domain().clone();
        let bundle = spiffe::X509Bundle::parse_from_der(td, ca.der()).unwrap();
        let set: spiffe::X509BundleSet = [bundle].into_iter().collect();
        let context = X509Context::new([Arc::new(svid)], set);
        (context, leaf.der().to_vec(), key_der, ca.der().to_vec())
    }

    fn pem_body(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    #[test]
    fn writes_an_x509_context_and_removes_files_of_gone_svids() {
        let (context, leaf, key, ca) = context();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        // Left over from a time with two SVIDs, plus a file that is not ours.
        ensure_dir(&out).unwrap();
        for name in ["svid.1.pem", "svid.1.key", "bundle.1.pem", "notes.txt"] {
            std::fs::write(out.join(name), b"old").unwrap();
        }
        let written = write_x509_context(&out, &context).unwrap();
        assert_eq!(written.len(), 3);
        assert_eq!(
            names(&out),
            ["bundle.0.pem", "notes.txt", "svid.0.key", "svid.0.pem"]
        );
        let key_pem = std::fs::read_to_string(out.join("svid.0.key")).unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert_eq!(pem_body(&key_pem), key);
        assert_eq!(mode(&out.join("svid.0.key")), 0o600);
        let chain = std::fs::read_to_string(out.join("svid.0.pem")).unwrap();
        assert_eq!(pem_body(&chain), leaf);
        assert_eq!(mode(&out.join("svid.0.pem")), 0o644);
        let bundle = std::fs::read_to_string(out.join("bundle.0.pem")).unwrap();
        assert_eq!(pem_body(&bundle), ca);
        assert_eq!(mode(&out.join("bundle.0.pem")), 0o644);
        // Switched in at once: the names are links into the current version.
        assert_eq!(
            std::fs::read_link(out.join("svid.0.key")).unwrap(),
            Path::new("..data/svid.0.key")
        );
    }

    #[test]
    fn a_failed_update_keeps_every_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        write_x509_context(&out, &context().0).unwrap();
        let read_all = || {
            names(&out)
                .into_iter()
                .map(|n| {
                    let content = std::fs::read(out.join(&n)).unwrap();
                    (n, content)
                })
                .collect::<Vec<_>>()
        };
        let before = read_all();
        // A new SVID (new key) for the first identity, and a second SVID whose files cannot
        // be written (here: its trust domain has no bundle; a full disk fails the same way).
        let (renewed, _, _, _) = context();
        let (other, _, _, _) = context_for("spiffe://other.org/x");
        let update = X509Context::new(
            [renewed.svids()[0].clone(), other.svids()[0].clone()],
            renewed.bundle_set().clone(),
        );
        assert!(write_x509_context(&out, &update).is_err());
        assert_eq!(
            read_all(),
            before,
            "the previous key, certificate and bundle stay, and no temp file is left"
        );
    }

    #[test]
    fn reports_an_x509_context_without_the_key() {
        let (context, _, _, _) = context();
        let report = super::super::X509Report::from_context(&context, None).unwrap();
        assert_eq!(report.svids.len(), 1);
        let svid = report.svids.first().unwrap();
        assert_eq!(svid.spiffe_id, "spiffe://example.org/web");
        assert_eq!(svid.hint.as_deref(), Some("internal"));
        assert_eq!(svid.chain_len, 1);
        assert!(svid.not_before.ends_with('Z'), "{}", svid.not_before);
        let text = report.render_text();
        assert!(text.contains("example.org (1 authority)"), "{text}");
        assert!(!text.contains("PRIVATE"));
        let json = report.to_json().to_string();
        assert!(!json.contains("key"), "{json}");
    }
}
