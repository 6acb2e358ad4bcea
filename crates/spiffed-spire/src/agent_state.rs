//! The agent's persisted state, `data_dir/agent-state.json`: the agent SVID chain, its private
//! key, the trust domain's X.509 authorities, and the reattestable flag.
//!
//! Why: a join token is single-use, so an agent that restarts must not need a new one; and
//! after the first attestation the stored bundle, not the bootstrap file, authenticates the
//! server. The file is written atomically (a temporary file in the same directory, mode 0600
//! from creation, fsync, rename, fsync of the directory), and refused when it is not the
//! agent's own or can be read by others, since it holds a private key.
//!
//! Format (JSON, version 1; DER as standard base64):
//! `{"version":1, "trust_domain", "server_address", "agent_id", "attestor", "reattestable",
//! "svid":[leaf, ...], "private_key": PKCS#8, "bundle":[authority, ...]}`.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// The state file's name in `data_dir`.
pub(crate) const STATE_FILE: &str = "agent-state.json";
/// The format version written.
const VERSION: u32 = 1;
/// The largest state file read (a chain, a key and a bundle are a few KiB).
const MAX_SIZE: u64 = 4 << 20;

/// What is persisted. The key is zeroized on drop and never printed.
pub(crate) struct AgentState {
    /// The trust domain's name.
    pub(crate) trust_domain: String,
    /// The server address it was attested to (informational).
    pub(crate) server_address: String,
    /// The agent's SPIFFE ID.
    pub(crate) agent_id: String,
    /// The attestor that gave the SVID (`join_token`, `x509pop`).
    pub(crate) attestor: String,
    /// Whether the agent re-attests instead of renewing.
    pub(crate) reattestable: bool,
    /// The agent SVID chain, leaf first (DER).
    pub(crate) svid: Vec<Vec<u8>>,
    /// Its private key (PKCS#8 DER).
    pub(crate) key: Zeroizing<Vec<u8>>,
    /// The trust domain's X.509 authorities (DER).
    pub(crate) bundle: Vec<Vec<u8>>,
}

impl fmt::Debug for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentState")
            .field("trust_domain", &self.trust_domain)
            .field("server_address", &self.server_address)
            .field("agent_id", &self.agent_id)
            .field("attestor", &self.attestor)
            .field("reattestable", &self.reattestable)
            .field("svid_certificates", &self.svid.len())
            .field("key", &"redacted")
            .field("bundle_authorities", &self.bundle.len())
            .finish()
    }
}

/// Why the state cannot be read or written; each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file operation failed.
    #[error("cannot {op} the agent state {}: {reason}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was done.
        op: &'static str,
        /// The OS error.
        reason: String,
    },
    /// Others may read the file, which holds a private key.
    #[error(
        "the agent state {} has mode {mode:04o}, so others may read the agent's private key in \
         it: run `chmod 600 {}` (and consider the key exposed: `spire-server agent evict` the \
         agent and remove the file to attest afresh)",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The file is someone else's.
    #[error(
        "the agent state {} is owned by uid {owner}, not by the agent's uid {ours}: run \
         `chown {ours} {}`, or remove it so the agent attests afresh",
        path.display(),
        path.display()
    )]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The agent's effective uid.
        ours: u32,
    },
    /// The file is not usable state.
    #[error(
        "the agent state {} cannot be used: {reason}; remove it so the agent attests afresh (a \
         join-token agent then needs a new token)",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

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
struct StateFile {
    version: u32,
    trust_domain: String,
    server_address: String,
    agent_id: String,
    attestor: String,
    reattestable: bool,
    svid: Vec<String>,
    private_key: Secret,
    bundle: Vec<String>,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |e| StateError::Io {
        path: path.to_owned(),
        op,
        reason: e.to_string(),
    }
}

fn decode_all(items: &[String], what: &str) -> Result<Vec<Vec<u8>>, String> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            B64.decode(s)
                .map_err(|e| format!("{what} #{} is not base64: {e}", i + 1))
        })
        .collect()
}

/// The file must be the agent's (`ours`: its effective uid) and closed to everyone else.
fn check_owner_and_mode(path: &Path, owner: u32, mode: u32, ours: u32) -> Result<(), StateError> {
    if owner != ours {
        return Err(StateError::Owner {
            path: path.to_owned(),
            owner,
            ours,
        });
    }
    let mode = mode & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StateError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads the state; `Ok(None)` when there is none.
pub(crate) fn load(path: &Path) -> Result<Option<AgentState>, StateError> {
    let mut file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "open")(e)),
    };
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    if !meta.is_file() {
        return Err(StateError::Corrupt {
            path: path.to_owned(),
            reason: "it is not a regular file".to_owned(),
        });
    }
    check_owner_and_mode(
        path,
        meta.uid(),
        meta.mode(),
        rustix::process::geteuid().as_raw(),
    )?;
    if meta.len() > MAX_SIZE {
        return Err(StateError::Corrupt {
            path: path.to_owned(),
            reason: format!("it has {} bytes, more than state ever holds", meta.len()),
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    (&mut file)
        .take(MAX_SIZE)
        .read_to_end(&mut bytes)
        .map_err(io_err(path, "read"))?;
    let corrupt = |reason: String| StateError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let raw: StateFile = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(format!("it is not JSON state: {e}")))?;
    if raw.version != VERSION {
        return Err(corrupt(format!(
            "it has format version {}, this spiffed reads version {VERSION}",
            raw.version
        )));
    }
    let key = Zeroizing::new(
        B64.decode(raw.private_key.0.as_bytes())
            .map_err(|e| corrupt(format!("the private key is not base64: {e}")))?,
    );
    Ok(Some(AgentState {
        trust_domain: raw.trust_domain,
        server_address: raw.server_address,
        agent_id: raw.agent_id,
        attestor: raw.attestor,
        reattestable: raw.reattestable,
        svid: decode_all(&raw.svid, "SVID certificate").map_err(corrupt)?,
        key,
        bundle: decode_all(&raw.bundle, "bundle authority").map_err(corrupt)?,
    }))
}

/// Writes the state atomically, 0600.
pub(crate) fn store(path: &Path, state: &AgentState) -> Result<(), StateError> {
    let file = StateFile {
        version: VERSION,
        trust_domain: state.trust_domain.clone(),
        server_address: state.server_address.clone(),
        agent_id: state.agent_id.clone(),
        attestor: state.attestor.clone(),
        reattestable: state.reattestable,
        svid: state.svid.iter().map(|c| B64.encode(c)).collect(),
        private_key: Secret(Zeroizing::new(B64.encode(&*state.key))),
        bundle: state.bundle.iter().map(|c| B64.encode(c)).collect(),
    };
    // Sized up front so the buffer holding the key is not reallocated (and copied) on growth.
    let size: usize = 512
        + file.private_key.0.len()
        + file
            .svid
            .iter()
            .chain(&file.bundle)
            .map(String::len)
            .sum::<usize>();
    let mut bytes = Zeroizing::new(Vec::with_capacity(size * 2));
    serde_json::to_writer_pretty(&mut *bytes, &file).map_err(|e| StateError::Io {
        path: path.to_owned(),
        op: "encode",
        reason: e.to_string(),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let write = || -> Result<(), StateError> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        // The umask may have taken bits away, never added: make it exactly 0600.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(&tmp, "chmod"))?;
        f.write_all(&bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path, "rename into place")(e));
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync the directory of"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AgentState {
        AgentState {
            trust_domain: "example.org".into(),
            server_address: "127.0.0.1:8081".into(),
            agent_id: "spiffe://example.org/spire/agent/join_token/t".into(),
            attestor: "join_token".into(),
            reattestable: false,
            svid: vec![vec![1, 2, 3], vec![4, 5]],
            key: Zeroizing::new(vec![9; 40]),
            bundle: vec![vec![7; 10]],
        }
    }

    #[test]
    fn state_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        assert!(load(&path).unwrap().is_none());
        store(&path, &sample()).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.agent_id, sample().agent_id);
        assert_eq!(back.svid, sample().svid);
        assert_eq!(*back.key, *sample().key);
        assert_eq!(back.bundle, sample().bundle);
        assert!(!back.reattestable);
        // Overwriting works and leaves no temporary file.
        let mut next = sample();
        next.reattestable = true;
        store(&path, &next).unwrap();
        assert!(load(&path).unwrap().unwrap().reattestable);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        // The key is never printed.
        assert!(!format!("{back:?}").contains("9, 9"));
    }

    #[test]
    fn a_state_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        store(&path, &sample()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, StateError::Permissions { mode: 0o644, .. }));
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_state_of_another_owner_is_refused() {
        let path = Path::new("/var/lib/spiffed/agent-state.json");
        let e = check_owner_and_mode(path, 65534, 0o100600, 1000).unwrap_err();
        assert_eq!(
            e,
            StateError::Owner {
                path: path.to_owned(),
                owner: 65534,
                ours: 1000
            }
        );
        assert!(
            e.to_string()
                .contains("chown 1000 /var/lib/spiffed/agent-state.json"),
            "{e}"
        );
        check_owner_and_mode(path, 1000, 0o100600, 1000).unwrap();
        check_owner_and_mode(path, 1000, 0o100400, 1000).unwrap();
        for mode in [0o100640, 0o100604, 0o100660, 0o100610] {
            assert!(matches!(
                check_owner_and_mode(path, 1000, mode, 1000),
                Err(StateError::Permissions { .. })
            ));
        }
    }

    #[test]
    fn corrupt_state_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        for bad in [
            &b"{"[..],
            br#"{"version":2}"#,
            br#"{"version":1,"trust_domain":"a","server_address":"b","agent_id":"c","attestor":"d","reattestable":false,"svid":["%%%"],"private_key":"AA==","bundle":[]}"#,
        ] {
            fs::write(&path, bad).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let e = load(&path).unwrap_err();
            assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains("remove it"), "{e}");
        }
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.json");
        store(&real, &sample()).unwrap();
        let link = dir.path().join(STATE_FILE);
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(load(&link).is_err());
    }
}
