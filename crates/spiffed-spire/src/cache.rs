//! The persisted workload cache, `data_dir/workload-cache.json`: what the agent needs to serve
//! its workloads after a restart while the SPIRE Server is down (spire-agent keeps none of it
//! and serves nothing until the server answers).
//!
//! It holds the synced entries with their versions, every X.509-SVID held with its private key
//! (PKCS#8), the trust domain's bundle and the federated bundles. JWT-SVIDs are not kept (they
//! are short-lived and minted on demand).
//!
//! The file is written atomically (a temp file in the same directory with mode 0600, fsync,
//! rename, fsync of the directory), never logged, and every buffer that holds key material is
//! zeroized. On load, a file not owned by the agent's uid or readable by group or others is
//! refused (the agent does not start, and the message names the fix); a corrupt one is ignored
//! with a warning (the next write replaces it).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use spiffed_core::{Entry, EntryId, Selector, SpiffeId, TrustDomain, X509Svid};
use spiffed_proto::spire::types;
use zeroize::Zeroizing;

use crate::server::EntryVersion;

/// The file's name in the data directory.
pub const CACHE_FILE: &str = "workload-cache.json";
/// The format written; files of another version are ignored.
const FORMAT: u32 = 1;

/// Why the persisted cache cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The file exists but is not safe to use: the agent refuses to start with it.
    #[error("the workload cache {path} {why}; {fix}")]
    Refused {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
        /// What to do.
        fix: String,
    },
    /// Reading or writing failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// A private key in the file: base64 of PKCS#8, zeroized on drop, never printed.
struct Secret(Zeroizing<String>);

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self(Zeroizing::new(s)))
    }
}

#[derive(Serialize, Deserialize)]
struct FileV1 {
    version: u32,
    trust_domain: String,
    entries: Vec<FileEntry>,
    svids: Vec<FileSvid>,
    bundle: Option<FileBundle>,
    federated: Vec<FileBundle>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    id: String,
    spiffe_id: String,
    selectors: Vec<String>,
    #[serde(default)]
    hint: Option<String>,
    #[serde(default)]
    federates_with: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    downstream: bool,
    revision: i64,
    created_at: i64,
}

#[derive(Serialize, Deserialize)]
struct FileSvid {
    entry_id: String,
    spiffe_id: String,
    /// The entry version it was minted for, if known.
    #[serde(default)]
    version: Option<(i64, i64)>,
    /// The chain, leaf first: base64 of each DER certificate.
    chain: Vec<String>,
    key: Secret,
}

#[derive(Serialize, Deserialize)]
struct FileAuthority {
    asn1: String,
    #[serde(default)]
    tainted: bool,
}

#[derive(Serialize, Deserialize)]
struct FileJwtKey {
    public_key: String,
    key_id: String,
    #[serde(default)]
    expires_at: i64,
    #[serde(default)]
    tainted: bool,
}

#[derive(Serialize, Deserialize)]
struct FileBundle {
    trust_domain: String,
    x509_authorities: Vec<FileAuthority>,
    jwt_authorities: Vec<FileJwtKey>,
    #[serde(default)]
    refresh_hint: i64,
    #[serde(default)]
    sequence_number: u64,
}

impl From<&types::Bundle> for FileBundle {
    fn from(b: &types::Bundle) -> Self {
        Self {
            trust_domain: b.trust_domain.clone(),
            x509_authorities: b
                .x509_authorities
                .iter()
                .map(|a| FileAuthority {
                    asn1: B64.encode(&a.asn1),
                    tainted: a.tainted,
                })
                .collect(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| FileJwtKey {
                    public_key: B64.encode(&k.public_key),
                    key_id: k.key_id.clone(),
                    expires_at: k.expires_at,
                    tainted: k.tainted,
                })
                .collect(),
            refresh_hint: b.refresh_hint,
            sequence_number: b.sequence_number,
        }
    }
}

impl FileBundle {
    fn into_proto(self) -> Result<types::Bundle, String> {
        let decode = |s: &str| B64.decode(s).map_err(|_| "a bundle key is not base64");
        Ok(types::Bundle {
            trust_domain: self.trust_domain,
            x509_authorities: self
                .x509_authorities
                .iter()
                .map(|a| {
                    Ok(types::X509Certificate {
                        asn1: decode(&a.asn1)?,
                        tainted: a.tainted,
                    })
                })
                .collect::<Result<_, &str>>()?,
            jwt_authorities: self
                .jwt_authorities
                .into_iter()
                .map(|k| {
                    Ok(types::JwtKey {
                        public_key: decode(&k.public_key)?,
                        key_id: k.key_id,
                        expires_at: k.expires_at,
                        tainted: k.tainted,
                    })
                })
                .collect::<Result<_, &str>>()?,
            refresh_hint: self.refresh_hint,
            sequence_number: self.sequence_number,
        })
    }
}

/// What is written: a consistent copy of the issuer's state.
pub(crate) struct Snapshot {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) entries: Vec<(Arc<Entry>, EntryVersion)>,
    pub(crate) svids: Vec<(EntryId, Arc<X509Svid>, Option<EntryVersion>)>,
    pub(crate) bundle: Option<types::Bundle>,
    pub(crate) federated: Vec<types::Bundle>,
}

/// An SVID read back, not yet checked.
pub(crate) struct LoadedSvid {
    pub(crate) entry_id: EntryId,
    pub(crate) spiffe_id: SpiffeId,
    pub(crate) version: Option<EntryVersion>,
    pub(crate) chain: Vec<Vec<u8>>,
    pub(crate) key: Zeroizing<Vec<u8>>,
}

/// What the file held.
#[derive(Default)]
pub(crate) struct Loaded {
    pub(crate) entries: Vec<(Entry, EntryVersion)>,
    pub(crate) svids: Vec<LoadedSvid>,
    pub(crate) bundle: Option<types::Bundle>,
    pub(crate) federated: Vec<types::Bundle>,
}

/// A growing buffer that wipes every copy it leaves behind (serialized keys pass through it).
struct Wiped(Zeroizing<Vec<u8>>);

impl Write for Wiped {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let need = self.0.len() + b.len();
        if need > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(self.0.capacity() * 2)));
            bigger.extend_from_slice(&self.0);
            // The old buffer is wiped when dropped here.
            self.0 = bigger;
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn encode_key(pkcs8: &[u8]) -> Secret {
    let mut s = String::with_capacity(base64::encoded_len(pkcs8.len(), true).unwrap_or(0));
    B64.encode_string(pkcs8, &mut s);
    Secret(Zeroizing::new(s))
}

fn decode_key(s: &Secret) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(s.0.len() / 4 * 3 + 3));
    B64.decode_vec(s.0.as_bytes(), &mut out).ok()?;
    Some(out)
}

/// Serializes `snap` (the bytes hold private keys: zeroized on drop).
fn serialize(snap: &Snapshot) -> Result<Zeroizing<Vec<u8>>, String> {
    let file = FileV1 {
        version: FORMAT,
        trust_domain: snap.trust_domain.to_string(),
        entries: snap
            .entries
            .iter()
            .map(|(e, v)| FileEntry {
                id: e.id.to_string(),
                spiffe_id: e.spiffe_id.to_string(),
                selectors: e.selectors.iter().map(|s| s.as_str().to_owned()).collect(),
                hint: e.hint.clone(),
                federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
                admin: e.admin,
                downstream: e.downstream,
                revision: v.revision,
                created_at: v.created_at,
            })
            .collect(),
        svids: snap
            .svids
            .iter()
            .map(|(id, svid, v)| {
                Ok(FileSvid {
                    entry_id: id.to_string(),
                    spiffe_id: svid.spiffe_id.to_string(),
                    version: v.map(|v| (v.revision, v.created_at)),
                    chain: crate::x509::split_chain(&svid.cert_chain_der)?
                        .into_iter()
                        .map(|c| B64.encode(c))
                        .collect(),
                    key: encode_key(svid.key.pkcs8_der()),
                })
            })
            .collect::<Result<_, String>>()?,
        bundle: snap.bundle.as_ref().map(FileBundle::from),
        federated: snap.federated.iter().map(FileBundle::from).collect(),
    };
    let mut out = Wiped(Zeroizing::new(Vec::with_capacity(64 * 1024)));
    serde_json::to_writer(&mut out, &file).map_err(|e| e.to_string())?;
    Ok(out.0)
}

/// Writes `snap` to `path` atomically with mode 0600.
pub(crate) fn write(path: &Path, snap: &Snapshot) -> Result<(), CacheError> {
    let bytes = serialize(snap).map_err(|why| CacheError::Io {
        path: path.to_owned(),
        op: "serialize",
        source: io::Error::other(why),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| CACHE_FILE.to_owned());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp, "remove the leftover")(e)),
    }
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(&bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        fs::rename(&tmp, path).map_err(io_err(path, "rename the new file to"))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir, "fsync the directory"))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Checks that `path` is a regular file of the agent's uid that only it can read.
fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), CacheError> {
    let refuse = |why: String, fix: String| CacheError::Refused {
        path: path.to_owned(),
        why,
        fix,
    };
    let shown = path.display();
    if !meta.file_type().is_file() {
        return Err(refuse(
            "is not a regular file".into(),
            format!("remove it (rm {shown}); the agent writes a new one"),
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(refuse(
            format!(
                "is owned by uid {}, not by the agent's uid {me}",
                meta.uid()
            ),
            format!(
                "chown {me} {shown} if it is this agent's, or remove it (the agent rebuilds it \
                 from the SPIRE Server)"
            ),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(refuse(
            format!("has mode {mode:04o}: group or others may read it, and it holds private keys"),
            format!(
                "chmod 600 {shown}, or remove it (the agent rebuilds it from the SPIRE Server)"
            ),
        ));
    }
    Ok(())
}

/// Reads the cache at `path` for trust domain `td`. `Ok(None)`: no file, or one that cannot be
/// used as is (corrupt, another format or trust domain), logged as a warning.
pub(crate) fn load(path: &Path, td: &TrustDomain) -> Result<Option<Loaded>, CacheError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "read the metadata of")(e)),
    };
    check_owner(path, &meta)?;
    let mut f = File::open(path).map_err(io_err(path, "open"))?;
    let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    let mut bytes = Zeroizing::new(Vec::with_capacity(len.saturating_add(1)));
    f.read_to_end(&mut bytes).map_err(io_err(path, "read"))?;
    let ignore = |why: String| {
        tracing::warn!(
            file = %path.display(), %why,
            "ignoring the workload cache: it cannot be used; the agent serves what the SPIRE \
             Server sends and writes a new one"
        );
        Ok(None)
    };
    let file: FileV1 = match serde_json::from_slice(&bytes) {
        Ok(f) => f,
        Err(e) => return ignore(format!("it does not parse: {e}")),
    };
    if file.version != FORMAT {
        return ignore(format!(
            "format version {} (this agent reads {FORMAT})",
            file.version
        ));
    }
    if TrustDomain::new(&file.trust_domain).ok().as_ref() != Some(td) {
        return ignore(format!(
            "it is for trust domain {:?}, the agent's is {td}",
            spiffed_core::untrusted::clip(&file.trust_domain)
        ));
    }
    let mut loaded = Loaded::default();
    let mut bad = 0usize;
    for e in file.entries {
        match entry_of(&e) {
            Ok(ok) => loaded.entries.push(ok),
            Err(why) => {
                bad += 1;
                tracing::warn!(entry = %spiffed_core::untrusted::clip(&e.id), %why, "leaving a cached entry out");
            }
        }
    }
    for s in file.svids {
        let parsed = (|| {
            Some(LoadedSvid {
                entry_id: EntryId::new(&s.entry_id),
                spiffe_id: SpiffeId::new(&s.spiffe_id).ok()?,
                version: s.version.map(|(revision, created_at)| EntryVersion {
                    revision,
                    created_at,
                }),
                chain: s
                    .chain
                    .iter()
                    .map(|c| B64.decode(c).ok())
                    .collect::<Option<_>>()?,
                key: decode_key(&s.key)?,
            })
        })();
        match parsed {
            Some(svid) => loaded.svids.push(svid),
            None => bad += 1,
        }
    }
    if bad > 0 {
        tracing::warn!(file = %path.display(), bad, "the workload cache has unreadable items; they are left out");
    }
    loaded.bundle = match file.bundle.map(FileBundle::into_proto).transpose() {
        Ok(b) => b,
        Err(why) => return ignore(why),
    };
    for b in file.federated {
        match b.into_proto() {
            Ok(b) => loaded.federated.push(b),
            Err(why) => tracing::warn!(%why, "leaving a cached federated bundle out"),
        }
    }
    Ok(Some(loaded))
}

fn entry_of(e: &FileEntry) -> Result<(Entry, EntryVersion), String> {
    if e.id.is_empty() {
        return Err("the entry has no id".into());
    }
    let mut selectors = e
        .selectors
        .iter()
        .map(|s| s.parse::<Selector>().map_err(|err| err.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    selectors.sort();
    selectors.dedup();
    Ok((
        Entry {
            id: EntryId::new(&e.id),
            spiffe_id: SpiffeId::new(&e.spiffe_id).map_err(|err| err.to_string())?,
            selectors,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: e.hint.clone(),
            dns_names: Vec::new(),
            federates_with: e
                .federates_with
                .iter()
                .map(|t| TrustDomain::new(t).map_err(|err| err.to_string()))
                .collect::<Result<_, _>>()?,
            admin: e.admin,
            downstream: e.downstream,
        },
        EntryVersion {
            revision: e.revision,
            created_at: e.created_at,
        },
    ))
}
