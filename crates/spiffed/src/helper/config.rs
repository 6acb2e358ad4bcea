//! `spiffed helper`'s settings: flags, a TOML file (`--config`), or both (flags win), turned by
//! [`HelperArgs::resolve`] into one validated [`HelperConfig`].
//!
//! The keys carry spiffe-helper's names wherever the concept is the same (`cert_dir`,
//! `svid_file_name`, `jwt_svids`, `renew_signal`, `pid_file_name`, `daemon_mode`, ...), so a
//! spiffe-helper configuration needs few changes (HCL to TOML). Unknown keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spiffe::SpiffeId;

use zeroize::Zeroizing;

use super::pkcs12::Password;
use crate::client::{AddressError, SocketAddress};

/// How long `--once` waits for its files by default (the socket may appear later).
pub(crate) const DEFAULT_ONCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `cmd` may run by default before it is killed.
pub(crate) const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// `spiffed helper`: keeps certificate, key, bundle and JWT files up to date for programs that
/// cannot speak the Workload API, and tells them (a signal to a pid file, a command) after each
/// update. Every flag may instead be set in the `--config` TOML file under the same name with
/// underscores (`--cert-dir` is `cert_dir`); a flag overrides the file.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct HelperArgs {
    /// A TOML file with the settings below under spiffe-helper's names: the flag's name with
    /// underscores (--cert-dir is cert_dir; --socket is agent_address), plus jwt_svids and
    /// per-file owners (see the README). A flag overrides the file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Workload API socket: a path or a unix:// URI (file: agent_address). Default:
    /// $SPIFFE_ENDPOINT_SOCKET, else /run/spiffed/public/api.sock.
    #[arg(long, value_name = "SOCKET")]
    pub(crate) socket: Option<String>,
    /// Write the files of this identity, e.g. spiffe://example.org/web. If this process does
    /// not get it, no file is written (the previous ones stay) and the helper waits for it.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub(crate) spiffe_id: Option<String>,
    /// Write the files of the identity with this hint (with --spiffe-id: both must match).
    /// Without either, the default identity: the first the agent sends, as spiffe-helper does.
    #[arg(long, value_name = "HINT")]
    pub(crate) hint: Option<String>,
    /// The directory the files go to; created (0755) if missing.
    #[arg(long, value_name = "DIR")]
    pub(crate) cert_dir: Option<PathBuf>,
    /// The certificate chain file: the leaf, then the intermediates (unless
    /// --add-intermediates-to-bundle).
    #[arg(long, value_name = "NAME")]
    pub(crate) svid_file_name: Option<String>,
    /// The private key file (PKCS#8 PEM; mode --key-file-mode, 0600 by default).
    #[arg(long, value_name = "NAME")]
    pub(crate) svid_key_file_name: Option<String>,
    /// The trust bundle file: the CA certificates of the identity's trust domain (PEM).
    #[arg(long, value_name = "NAME")]
    pub(crate) svid_bundle_file_name: Option<String>,
    /// A file with the chain and then the private key, in one PEM file (mode --key-file-mode).
    #[arg(long, value_name = "NAME")]
    pub(crate) svid_combined_file_name: Option<String>,
    /// A PKCS#12 keystore for Java: the key (encrypted) and the chain, as one PrivateKeyEntry
    /// (mode --key-file-mode). Needs --pkcs12-password-file.
    #[arg(long, value_name = "NAME")]
    pub(crate) svid_pkcs12_file_name: Option<String>,
    /// A PKCS#12 truststore for Java: the bundle file's CAs as trustedCertEntry (mode
    /// --cert-file-mode). Needs --pkcs12-password-file.
    #[arg(long, value_name = "NAME")]
    pub(crate) svid_bundle_pkcs12_file_name: Option<String>,
    /// The PKCS#12 files' password: the first line of this file (not readable by every user;
    /// read once, at start).
    #[arg(long, value_name = "FILE")]
    pub(crate) pkcs12_password_file: Option<PathBuf>,
    /// Put the intermediates in the bundle file instead of the chain file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) add_intermediates_to_bundle: Option<bool>,
    /// Add the CA certificates of federated trust domains to the bundle file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) include_federated_domains: Option<bool>,
    /// Leave expired CA certificates out of the bundle file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) omit_expired: Option<bool>,
    /// A JWT-SVID file: AUDIENCE=FILE_NAME (split at the last `=`), refreshed at half its
    /// lifetime. Repeat for several; replaces the file's jwt_svids.
    #[arg(long, value_name = "AUDIENCE=NAME")]
    pub(crate) jwt_svid: Vec<String>,
    /// The JWT bundle file: JSON, {"TRUST_DOMAIN": "base64 of its JWKS"} as spiffe-helper
    /// writes it.
    #[arg(long, value_name = "NAME")]
    pub(crate) jwt_bundle_file_name: Option<String>,
    /// Mode of the certificate and bundle files, octal (default 0644).
    #[arg(long, value_name = "MODE")]
    pub(crate) cert_file_mode: Option<String>,
    /// Mode of the key and combined files, octal (default 0600).
    #[arg(long, value_name = "MODE")]
    pub(crate) key_file_mode: Option<String>,
    /// Mode of the JWT bundle file, octal (default 0600).
    #[arg(long, value_name = "MODE")]
    pub(crate) jwt_bundle_file_mode: Option<String>,
    /// Mode of the JWT-SVID files, octal (default 0600).
    #[arg(long, value_name = "MODE")]
    pub(crate) jwt_svid_file_mode: Option<String>,
    /// Owner (user name or uid) of every file; needs the privilege to chown.
    #[arg(long, value_name = "USER")]
    pub(crate) file_owner: Option<String>,
    /// Group (name or gid) of every file.
    #[arg(long, value_name = "GROUP")]
    pub(crate) file_group: Option<String>,
    /// Owner of the key and combined files (default: --file-owner).
    #[arg(long, value_name = "USER")]
    pub(crate) key_file_owner: Option<String>,
    /// Group of the key and combined files (default: --file-group), e.g. the group a server
    /// reads its key as, with --key-file-mode 0640.
    #[arg(long, value_name = "GROUP")]
    pub(crate) key_file_group: Option<String>,
    /// After each update, send this signal (SIGHUP, SIGUSR1, ...) to the pid in
    /// --pid-file-name, read again every time.
    #[arg(long, value_name = "SIGNAL")]
    pub(crate) renew_signal: Option<String>,
    /// The file holding the pid to signal (with --renew-signal).
    #[arg(long, value_name = "FILE")]
    pub(crate) pid_file_name: Option<PathBuf>,
    /// After each update, run this program (no shell), with --cmd-args. At most one runs at a
    /// time; updates that arrive while it runs are coalesced into one more run after it.
    #[arg(long, value_name = "PROGRAM")]
    pub(crate) cmd: Option<String>,
    /// The arguments of --cmd, split at spaces; "double quotes" keep spaces, "" is a quote
    /// (spiffe-helper's rules).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub(crate) cmd_args: Option<String>,
    /// Kill --cmd (with its process group) when it runs longer than this (default 30s).
    #[arg(long, value_name = "DURATION", value_parser = crate::serve::parse_duration)]
    pub(crate) cmd_timeout: Option<Duration>,
    /// Write the files once and exit 0 (for init containers and ExecStartPre); exit 1 if
    /// they could not be written within --timeout. The same as --daemon-mode=false.
    #[arg(long)]
    pub(crate) once: bool,
    /// false: the same as --once (spiffe-helper's flag).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) daemon_mode: Option<bool>,
    /// With --once: how long to wait for the files, including for the agent's socket to
    /// appear (default 30s). In daemon mode the helper waits for the agent for ever.
    #[arg(long, value_name = "DURATION", value_parser = crate::serve::parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// Serve Prometheus metrics (GET /metrics) and readiness (GET /ready) on IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) metrics_listen: Option<String>,
}

/// The TOML file: every flag's key, plus `jwt_svids` and per-file owners.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    agent_address: Option<String>,
    spiffe_id: Option<String>,
    hint: Option<String>,
    cert_dir: Option<PathBuf>,
    svid_file_name: Option<String>,
    svid_key_file_name: Option<String>,
    svid_bundle_file_name: Option<String>,
    svid_combined_file_name: Option<String>,
    svid_pkcs12_file_name: Option<String>,
    svid_bundle_pkcs12_file_name: Option<String>,
    pkcs12_password_file: Option<PathBuf>,
    add_intermediates_to_bundle: Option<bool>,
    include_federated_domains: Option<bool>,
    omit_expired: Option<bool>,
    #[serde(default)]
    jwt_svids: Vec<FileJwt>,
    jwt_bundle_file_name: Option<String>,
    cert_file_mode: Option<ModeValue>,
    key_file_mode: Option<ModeValue>,
    jwt_bundle_file_mode: Option<ModeValue>,
    jwt_svid_file_mode: Option<ModeValue>,
    file_owner: Option<IdValue>,
    file_group: Option<IdValue>,
    cert_file_owner: Option<IdValue>,
    cert_file_group: Option<IdValue>,
    key_file_owner: Option<IdValue>,
    key_file_group: Option<IdValue>,
    jwt_svid_file_owner: Option<IdValue>,
    jwt_svid_file_group: Option<IdValue>,
    jwt_bundle_file_owner: Option<IdValue>,
    jwt_bundle_file_group: Option<IdValue>,
    renew_signal: Option<String>,
    pid_file_name: Option<PathBuf>,
    cmd: Option<String>,
    cmd_args: Option<String>,
    cmd_timeout: Option<String>,
    daemon_mode: Option<bool>,
    timeout: Option<String>,
    metrics_listen: Option<String>,
}

/// One `[[jwt_svids]]` table, as spiffe-helper's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJwt {
    jwt_audience: String,
    #[serde(default)]
    jwt_extra_audiences: Vec<String>,
    jwt_svid_file_name: String,
}

/// A file mode: a string of octal digits. A TOML integer is refused with the fix (`640` would
/// be decimal), rather than read as a mode nobody meant.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ModeValue {
    Int(u32),
    Str(String),
}

/// A user or group: a name or a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum IdValue {
    Int(u32),
    Str(String),
}

/// The settings are wrong: exit status 64, with the key and the fix.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a wrong key (the message has the line).
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// A setting has a wrong value.
    #[error("{key}: {message}")]
    Invalid {
        /// The key (or flag) at fault.
        key: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The socket address is wrong.
    #[error(transparent)]
    Address(#[from] AddressError),
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Mode, owner and group of one kind of file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FilePerm {
    /// The permission bits.
    pub(crate) mode: u32,
    /// The owner to chown to, if any.
    pub(crate) uid: Option<u32>,
    /// The group to chown to, if any.
    pub(crate) gid: Option<u32>,
}

/// One JWT-SVID file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JwtFile {
    /// The audience, then the extra audiences.
    pub(crate) audiences: Vec<String>,
    /// The file name in `cert_dir`.
    pub(crate) file_name: String,
}

/// The X.509 file names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct X509Files {
    /// Chain (leaf first), key and bundle, all or none.
    pub(crate) svid: Option<String>,
    /// The key file.
    pub(crate) key: Option<String>,
    /// The bundle file.
    pub(crate) bundle: Option<String>,
    /// Chain and key in one file.
    pub(crate) combined: Option<String>,
    /// The PKCS#12 keystore.
    pub(crate) pkcs12: Option<String>,
    /// The PKCS#12 truststore.
    pub(crate) bundle_pkcs12: Option<String>,
}

/// Which identity to write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Selector {
    /// Only this SPIFFE ID.
    pub(crate) spiffe_id: Option<SpiffeId>,
    /// Only this hint.
    pub(crate) hint: Option<String>,
}

impl Selector {
    /// Whether nothing pins the identity (the default identity is used).
    pub(crate) fn is_default(&self) -> bool {
        self.spiffe_id.is_none() && self.hint.is_none()
    }

    /// The identity asked for, for messages.
    pub(crate) fn describe(&self) -> String {
        match (&self.spiffe_id, &self.hint) {
            (Some(id), Some(h)) => format!("{id} with hint {h:?}"),
            (Some(id), None) => id.to_string(),
            (None, Some(h)) => format!("the identity with hint {h:?}"),
            (None, None) => "the default identity".into(),
        }
    }

    /// Whether an SVID with `id` and `hint` is the one asked for.
    pub(crate) fn matches(&self, id: &SpiffeId, hint: Option<&str>) -> bool {
        self.spiffe_id.as_ref().is_none_or(|want| want == id)
            && self.hint.as_deref().is_none_or(|want| Some(want) == hint)
    }
}

/// A signal for the process in a pid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PidSignal {
    /// The signal.
    pub(crate) signal: rustix::process::Signal,
    /// Its name, for messages.
    pub(crate) name: String,
    /// The pid file.
    pub(crate) pid_file: PathBuf,
}

/// The validated settings.
#[derive(Debug, Clone)]
pub(crate) struct HelperConfig {
    /// The Workload API socket.
    pub(crate) socket: SocketAddress,
    /// Which identity.
    pub(crate) selector: Selector,
    /// Where the files go.
    pub(crate) cert_dir: PathBuf,
    /// The X.509 files.
    pub(crate) x509: X509Files,
    /// The PKCS#12 files' password (set when one of them is configured).
    pub(crate) pkcs12_password: Option<Password>,
    /// Intermediates in the bundle file.
    pub(crate) add_intermediates_to_bundle: bool,
    /// Federated CAs in the bundle file.
    pub(crate) include_federated_domains: bool,
    /// No expired CA in the bundle file.
    pub(crate) omit_expired: bool,
    /// The JWT-SVID files.
    pub(crate) jwt_svids: Vec<JwtFile>,
    /// The JWT bundle file.
    pub(crate) jwt_bundle: Option<String>,
    /// Certificate and bundle files.
    pub(crate) cert_perm: FilePerm,
    /// Key and combined files.
    pub(crate) key_perm: FilePerm,
    /// JWT-SVID files.
    pub(crate) jwt_svid_perm: FilePerm,
    /// The JWT bundle file.
    pub(crate) jwt_bundle_perm: FilePerm,
    /// The signal to send after an update.
    pub(crate) signal: Option<PidSignal>,
    /// The command to run after an update (argv).
    pub(crate) cmd: Option<Vec<String>>,
    /// How long the command may run.
    pub(crate) cmd_timeout: Duration,
    /// Write once and exit.
    pub(crate) once: bool,
    /// `--once`: how long to wait.
    pub(crate) timeout: Duration,
    /// Where to serve metrics.
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Warnings about settings that are ignored, to log at start.
    pub(crate) warnings: Vec<String>,
}

impl HelperConfig {
    /// Whether any X.509 file is configured.
    pub(crate) fn x509_enabled(&self) -> bool {
        self.x509.svid.is_some()
            || self.x509.combined.is_some()
            || self.x509.pkcs12.is_some()
            || self.x509.bundle_pkcs12.is_some()
    }
}

impl HelperArgs {
    /// Reads `--config` (if given), lays the flags over it, and validates the result.
    /// `env_socket` is `SPIFFE_ENDPOINT_SOCKET`.
    pub(crate) fn resolve(&self, env_socket: Option<&str>) -> Result<HelperConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        self.merge(file, env_socket)
    }

    fn merge(
        &self,
        file: FileConfig,
        env_socket: Option<&str>,
    ) -> Result<HelperConfig, ConfigError> {
        let mut warnings = Vec::new();
        let socket_value = self.socket.clone().or(file.agent_address);
        let socket = crate::client::resolve_address(socket_value.as_deref(), env_socket)?;

        let spiffe_id = self
            .spiffe_id
            .clone()
            .or(file.spiffe_id)
            .map(|s| {
                SpiffeId::new(&s).map_err(|e| {
                    invalid(
                        "spiffe_id",
                        format!("{s:?} is not a SPIFFE ID ({e}), e.g. spiffe://example.org/web"),
                    )
                })
            })
            .transpose()?;
        let hint = self.hint.clone().or(file.hint).filter(|h| !h.is_empty());
        let selector = Selector { spiffe_id, hint };

        let cert_dir = self.cert_dir.clone().or(file.cert_dir).ok_or_else(|| {
            invalid(
                "cert_dir",
                "missing: the directory to write the files to (--cert-dir DIR)",
            )
        })?;

        let x509 = X509Files {
            svid: self.svid_file_name.clone().or(file.svid_file_name),
            key: self.svid_key_file_name.clone().or(file.svid_key_file_name),
            bundle: self
                .svid_bundle_file_name
                .clone()
                .or(file.svid_bundle_file_name),
            combined: self
                .svid_combined_file_name
                .clone()
                .or(file.svid_combined_file_name),
            pkcs12: self
                .svid_pkcs12_file_name
                .clone()
                .or(file.svid_pkcs12_file_name),
            bundle_pkcs12: self
                .svid_bundle_pkcs12_file_name
                .clone()
                .or(file.svid_bundle_pkcs12_file_name),
        };
        let given = [&x509.svid, &x509.key, &x509.bundle]
            .iter()
            .filter(|n| n.is_some())
            .count();
        if given != 0 && given != 3 {
            return Err(invalid(
                "svid_file_name",
                "set all or none of svid_file_name, svid_key_file_name and svid_bundle_file_name",
            ));
        }

        let jwt_svids = if self.jwt_svid.is_empty() {
            file.jwt_svids
                .into_iter()
                .map(|j| {
                    let mut audiences = vec![j.jwt_audience];
                    audiences.extend(j.jwt_extra_audiences);
                    JwtFile {
                        audiences,
                        file_name: j.jwt_svid_file_name,
                    }
                })
                .collect()
        } else {
            self.jwt_svid
                .iter()
                .map(|s| parse_jwt_flag(s))
                .collect::<Result<Vec<_>, _>>()?
        };
        for j in &jwt_svids {
            if j.audiences.iter().any(String::is_empty) {
                return Err(invalid(
                    "jwt_svids",
                    format!("the audience of {} is empty", j.file_name),
                ));
            }
        }
        let jwt_bundle = self
            .jwt_bundle_file_name
            .clone()
            .or(file.jwt_bundle_file_name);

        let mut names: Vec<(&'static str, &str)> = Vec::new();
        for (key, name) in [
            ("svid_file_name", &x509.svid),
            ("svid_key_file_name", &x509.key),
            ("svid_bundle_file_name", &x509.bundle),
            ("svid_combined_file_name", &x509.combined),
            ("svid_pkcs12_file_name", &x509.pkcs12),
            ("svid_bundle_pkcs12_file_name", &x509.bundle_pkcs12),
            ("jwt_bundle_file_name", &jwt_bundle),
        ] {
            if let Some(n) = name {
                names.push((key, n));
            }
        }
        for j in &jwt_svids {
            names.push(("jwt_svid_file_name", &j.file_name));
        }
        if names.is_empty() {
            return Err(invalid(
                "svid_file_name",
                "no file to write: set svid_file_name, svid_key_file_name and \
                 svid_bundle_file_name, svid_combined_file_name, svid_pkcs12_file_name, \
                 svid_bundle_pkcs12_file_name, jwt_svids or jwt_bundle_file_name",
            ));
        }
        for (i, (key, name)) in names.iter().enumerate() {
            check_file_name(key, name)?;
            if names.iter().take(i).any(|(_, other)| other == name) {
                return Err(invalid(key, format!("{name:?} is used for two files")));
            }
        }

        let password_file = self
            .pkcs12_password_file
            .clone()
            .or(file.pkcs12_password_file);
        let pkcs12_key = if x509.pkcs12.is_some() {
            Some("svid_pkcs12_file_name")
        } else if x509.bundle_pkcs12.is_some() {
            Some("svid_bundle_pkcs12_file_name")
        } else {
            None
        };
        let pkcs12_password = match (pkcs12_key, password_file) {
            (Some(_), Some(path)) => Some(read_password(&path, &mut warnings)?),
            (Some(key), None) => {
                return Err(invalid(
                    key,
                    "needs pkcs12_password_file: a file whose first line is the password \
                     of the PKCS#12 file (the program that opens it needs the password too)",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "pkcs12_password_file",
                    "is for the PKCS#12 files: set svid_pkcs12_file_name or \
                     svid_bundle_pkcs12_file_name",
                ));
            }
            (None, None) => None,
        };

        let mode = |key: &'static str,
                    flag: &Option<String>,
                    value: Option<ModeValue>,
                    default: u32|
         -> Result<u32, ConfigError> {
            match (flag, value) {
                (Some(s), _) => parse_mode(key, s),
                (None, Some(ModeValue::Str(s))) => parse_mode(key, &s),
                (None, Some(ModeValue::Int(m))) => Err(invalid(
                    key,
                    format!(
                        "write the mode as a string of octal digits, e.g. {key} = \"0640\" (the \
                         number {m} is ambiguous: TOML reads 640 as decimal)"
                    ),
                )),
                (None, None) => Ok(default),
            }
        };
        let cert_mode = mode(
            "cert_file_mode",
            &self.cert_file_mode,
            file.cert_file_mode,
            0o644,
        )?;
        let key_mode = mode(
            "key_file_mode",
            &self.key_file_mode,
            file.key_file_mode,
            0o600,
        )?;
        let jwt_bundle_mode = mode(
            "jwt_bundle_file_mode",
            &self.jwt_bundle_file_mode,
            file.jwt_bundle_file_mode,
            0o600,
        )?;
        let jwt_svid_mode = mode(
            "jwt_svid_file_mode",
            &self.jwt_svid_file_mode,
            file.jwt_svid_file_mode,
            0o600,
        )?;
        if key_mode & 0o007 != 0 {
            warnings.push(format!(
                "key_file_mode {key_mode:04o} lets every user read the private key"
            ));
        }

        let users = IdTable::read("/etc/passwd");
        let groups = IdTable::read("/etc/group");
        let flag_id = |s: &Option<String>| s.clone().map(IdValue::Str);
        let owner = |key: &'static str, v: Option<IdValue>| -> Result<Option<u32>, ConfigError> {
            v.map(|v| users.lookup(key, "user", &v)).transpose()
        };
        let group = |key: &'static str, v: Option<IdValue>| -> Result<Option<u32>, ConfigError> {
            v.map(|v| groups.lookup(key, "group", &v)).transpose()
        };
        let all_uid = owner("file_owner", flag_id(&self.file_owner).or(file.file_owner))?;
        let all_gid = group("file_group", flag_id(&self.file_group).or(file.file_group))?;
        let perm = |mode: u32, uid: Option<u32>, gid: Option<u32>| FilePerm {
            mode,
            uid: uid.or(all_uid),
            gid: gid.or(all_gid),
        };
        let cert_perm = perm(
            cert_mode,
            owner("cert_file_owner", file.cert_file_owner)?,
            group("cert_file_group", file.cert_file_group)?,
        );
        let key_perm = perm(
            key_mode,
            owner(
                "key_file_owner",
                flag_id(&self.key_file_owner).or(file.key_file_owner),
            )?,
            group(
                "key_file_group",
                flag_id(&self.key_file_group).or(file.key_file_group),
            )?,
        );
        let jwt_svid_perm = perm(
            jwt_svid_mode,
            owner("jwt_svid_file_owner", file.jwt_svid_file_owner)?,
            group("jwt_svid_file_group", file.jwt_svid_file_group)?,
        );
        let jwt_bundle_perm = perm(
            jwt_bundle_mode,
            owner("jwt_bundle_file_owner", file.jwt_bundle_file_owner)?,
            group("jwt_bundle_file_group", file.jwt_bundle_file_group)?,
        );

        let once = self.once
            || self.daemon_mode == Some(false)
            || (self.daemon_mode.is_none() && file.daemon_mode == Some(false));

        let renew_signal = self.renew_signal.clone().or(file.renew_signal);
        let pid_file = self.pid_file_name.clone().or(file.pid_file_name);
        let signal = match (renew_signal, pid_file) {
            (Some(name), Some(pid_file)) => Some(PidSignal {
                signal: parse_signal(&name)?,
                name: canonical_signal_name(&name),
                pid_file,
            }),
            (None, Some(_)) => {
                return Err(invalid(
                    "pid_file_name",
                    "needs renew_signal: the signal to send, e.g. SIGHUP",
                ));
            }
            (Some(_), None) => {
                return Err(invalid(
                    "renew_signal",
                    "needs pid_file_name: the file with the pid to signal (to run a \
                     command instead, use cmd)",
                ));
            }
            (None, None) => None,
        };
        if once && signal.is_some() {
            return Err(invalid(
                "pid_file_name",
                "is for the daemon: with --once (daemon_mode = false) no signal is sent",
            ));
        }

        let cmd_program = self.cmd.clone().or(file.cmd).filter(|c| !c.is_empty());
        let cmd_args = self.cmd_args.clone().or(file.cmd_args);
        let cmd = match cmd_program {
            Some(program) => {
                let mut argv = vec![program];
                argv.extend(split_cmd_args(cmd_args.as_deref().unwrap_or(""))?);
                Some(argv)
            }
            None if cmd_args.is_some() => {
                return Err(invalid("cmd_args", "needs cmd: the program to run"));
            }
            None => None,
        };
        let cmd = if once && cmd.is_some() {
            warnings.push("cmd is ignored with --once (daemon_mode = false)".into());
            None
        } else {
            cmd
        };
        let cmd_timeout = match (self.cmd_timeout, file.cmd_timeout) {
            (Some(d), _) => d,
            (None, Some(s)) => crate::serve::parse_duration(&s)
                .map_err(|e| invalid("cmd_timeout", format!("{s:?}: {e}")))?,
            (None, None) => DEFAULT_CMD_TIMEOUT,
        };
        let timeout = match (self.timeout, file.timeout) {
            (Some(d), _) => d,
            (None, Some(s)) => crate::serve::parse_duration(&s)
                .map_err(|e| invalid("timeout", format!("{s:?}: {e}")))?,
            (None, None) => DEFAULT_ONCE_TIMEOUT,
        };
        let metrics_listen = self
            .metrics_listen
            .clone()
            .or(file.metrics_listen)
            .map(|s| {
                s.parse::<SocketAddr>().map_err(|_| {
                    invalid(
                        "metrics_listen",
                        format!("{s:?} is not an IP address and port, e.g. 127.0.0.1:9989"),
                    )
                })
            })
            .transpose()?;

        Ok(HelperConfig {
            socket,
            selector,
            cert_dir,
            x509,
            pkcs12_password,
            add_intermediates_to_bundle: self
                .add_intermediates_to_bundle
                .or(file.add_intermediates_to_bundle)
                .unwrap_or(false),
            include_federated_domains: self
                .include_federated_domains
                .or(file.include_federated_domains)
                .unwrap_or(false),
            omit_expired: self.omit_expired.or(file.omit_expired).unwrap_or(false),
            jwt_svids,
            jwt_bundle,
            cert_perm,
            key_perm,
            jwt_svid_perm,
            jwt_bundle_perm,
            signal,
            cmd,
            cmd_timeout,
            once,
            timeout,
            metrics_listen,
            warnings,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// The first line of `pkcs12_password_file`, without its line end. Refused: a file that cannot
/// be read, is not UTF-8, or whose first line is empty or ends in `\r` (keytool would strip it,
/// OpenSSL would not: the two would disagree on the password). A file every user may read
/// gets a warning; a group-readable one does not (the Java program's group may need it).
fn read_password(path: &Path, warnings: &mut Vec<String>) -> Result<Password, ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;

    let key = "pkcs12_password_file";
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?);
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| invalid(key, format!("{} is not UTF-8 text", path.display())))?;
    let line = text.split('\n').next().unwrap_or_default();
    if line.ends_with('\r') {
        return Err(invalid(
            key,
            format!(
                "{}: the first line ends in \\r (a Windows line end): OpenSSL would take it \
                 as part of the password, Java would not; write the file with a plain \\n",
                path.display()
            ),
        ));
    }
    let password = Password::new(Zeroizing::new(line.to_owned())).ok_or_else(|| {
        invalid(
            key,
            format!(
                "{}: the first line is empty; write the password on it",
                path.display()
            ),
        )
    })?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        warnings.push(format!(
            "pkcs12_password_file {} is readable by every user: so is the key in the PKCS#12 \
             file (chmod o-r)",
            path.display()
        ));
    }
    Ok(password)
}

/// `AUDIENCE=NAME`, split at the last `=`.
fn parse_jwt_flag(s: &str) -> Result<JwtFile, ConfigError> {
    match s.rsplit_once('=') {
        Some((audience, name)) if !audience.is_empty() && !name.is_empty() => Ok(JwtFile {
            audiences: vec![audience.to_owned()],
            file_name: name.to_owned(),
        }),
        _ => Err(invalid(
            "--jwt-svid",
            format!("{s:?}: give AUDIENCE=FILE_NAME, e.g. --jwt-svid db=db.token"),
        )),
    }
}

/// A file name in `cert_dir`: one plain component, not one of the helper's own (`..`).
fn check_file_name(key: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.contains('/')
        || name.contains('\0')
        || name.starts_with("..")
        || name == "."
    {
        return Err(invalid(
            key,
            format!(
                "{name:?} is not a plain file name: give a name without '/' that does not \
                 start with '..' (the helper keeps its versions in ..* entries of cert_dir)"
            ),
        ));
    }
    Ok(())
}

fn parse_mode(key: &'static str, s: &str) -> Result<u32, ConfigError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = u32::from_str_radix(digits, 8).map_err(|_| {
        invalid(
            key,
            format!("{s:?} is not an octal mode, e.g. \"0644\" or \"0600\""),
        )
    })?;
    check_mode(key, mode)
}

fn check_mode(key: &'static str, mode: u32) -> Result<u32, ConfigError> {
    if mode > 0o777 {
        return Err(invalid(
            key,
            format!("{mode:o} is beyond 0777: give the permission bits only, e.g. \"0644\""),
        ));
    }
    if mode & 0o400 == 0 {
        return Err(invalid(
            key,
            format!("{mode:04o} does not let even the owner read the file"),
        ));
    }
    Ok(mode)
}

/// The signals a reload may be asked with.
const SIGNALS: &[(&str, rustix::process::Signal)] = &[
    ("HUP", rustix::process::Signal::HUP),
    ("USR1", rustix::process::Signal::USR1),
    ("USR2", rustix::process::Signal::USR2),
    ("INT", rustix::process::Signal::INT),
    ("QUIT", rustix::process::Signal::QUIT),
    ("TERM", rustix::process::Signal::TERM),
    ("WINCH", rustix::process::Signal::WINCH),
    ("ALRM", rustix::process::Signal::ALARM),
    ("CONT", rustix::process::Signal::CONT),
];

fn canonical_signal_name(s: &str) -> String {
    let upper = s.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    format!("SIG{bare}")
}

fn parse_signal(s: &str) -> Result<rustix::process::Signal, ConfigError> {
    let upper = s.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(name, _)| *name == bare)
        .map(|(_, sig)| *sig)
        .ok_or_else(|| {
            let names: Vec<String> = SIGNALS.iter().map(|(n, _)| format!("SIG{n}")).collect();
            invalid(
                "renew_signal",
                format!("{s:?} is not one of {}", names.join(", ")),
            )
        })
}

/// spiffe-helper's `cmd_args` rules: split at spaces; a double-quoted part keeps its spaces and
/// `""` inside it is one quote. (Go's `encoding/csv` with a space separator.)
pub(crate) fn split_cmd_args(s: &str) -> Result<Vec<String>, ConfigError> {
    let mut args = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(args);
        }
        let mut arg = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        arg.push('"');
                    }
                    Some('"') => break,
                    Some(c) => arg.push(c),
                    None => {
                        return Err(invalid(
                            "cmd_args",
                            format!("{s:?}: a double quote is not closed"),
                        ));
                    }
                }
            }
            if chars.peek().is_some_and(|c| *c != ' ') {
                return Err(invalid(
                    "cmd_args",
                    format!("{s:?}: text right after a closing quote (put a space between)"),
                ));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                arg.push(c);
                chars.next();
            }
        }
        args.push(arg);
    }
}

/// `/etc/passwd` or `/etc/group`: name to id. (Local files only, no NSS: give numbers for
/// users from a directory service.)
struct IdTable {
    path: &'static str,
    entries: Vec<(String, u32)>,
}

impl IdTable {
    fn read(path: &'static str) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Self::parse(path, &text)
    }

    fn parse(path: &'static str, text: &str) -> Self {
        let entries = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id = fields.nth(1)?.parse().ok()?;
                Some((name.to_owned(), id))
            })
            .collect();
        Self { path, entries }
    }

    fn lookup(&self, key: &'static str, what: &str, value: &IdValue) -> Result<u32, ConfigError> {
        match value {
            IdValue::Int(id) => Ok(*id),
            IdValue::Str(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
                .parse()
                .map_err(|_| invalid(key, format!("{s:?} is too large"))),
            IdValue::Str(s) => self
                .entries
                .iter()
                .find(|(name, _)| name == s)
                .map(|(_, id)| *id)
                .ok_or_else(|| {
                    invalid(
                        key,
                        format!("no {what} {s:?} in {} (give a number instead)", self.path),
                    )
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> HelperArgs {
        HelperArgs {
            cert_dir: Some("/tmp/certs".into()),
            socket: Some("/tmp/api.sock".into()),
            ..HelperArgs::default()
        }
    }

    fn parse(text: &str) -> FileConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn spiffe_helper_names_parse_and_flags_override_the_file() {
        let file = parse(
            r#"
agent_address = "/run/other.sock"
cert_dir = "/etc/certs"
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
cert_file_mode = "0640"
key_file_mode = "0640"
jwt_bundle_file_name = "bundle.json"
jwt_svids = [{jwt_audience="db", jwt_extra_audiences=["x"], jwt_svid_file_name="db.token"}]
renew_signal = "SIGHUP"
pid_file_name = "/run/nginx.pid"
hint = "internal"
add_intermediates_to_bundle = true
"#,
        );
        let mut a = args();
        a.cert_dir = None;
        a.hint = Some("external".into());
        let c = a.merge(file, None).unwrap();
        assert_eq!(c.socket.path, PathBuf::from("/tmp/api.sock"));
        assert_eq!(c.cert_dir, PathBuf::from("/etc/certs"));
        assert_eq!(c.selector.hint.as_deref(), Some("external"));
        assert_eq!(c.cert_perm.mode, 0o640);
        assert_eq!(c.key_perm.mode, 0o640);
        assert_eq!(c.jwt_svid_perm.mode, 0o600);
        assert_eq!(c.jwt_svids[0].audiences, ["db", "x"]);
        assert_eq!(c.signal.as_ref().unwrap().name, "SIGHUP");
        assert!(c.add_intermediates_to_bundle);
        assert!(!c.once);
    }

    #[test]
    fn refusals_name_the_key() {
        let bad = |text: &str| args().merge(parse(text), None).unwrap_err().to_string();
        assert!(bad("svid_file_name = \"a\"").contains("all or none"));
        assert!(bad("").contains("no file to write"));
        assert!(bad("svid_combined_file_name = \"../x\"").contains("plain file name"));
        assert!(
            bad("svid_combined_file_name = \"a\"\njwt_bundle_file_name = \"a\"")
                .contains("two files")
        );
        assert!(bad("svid_combined_file_name = \"a\"\nkey_file_mode = \"9\"").contains("octal"));
        assert!(
            bad("svid_combined_file_name = \"a\"\npid_file_name = \"/p\"").contains("renew_signal")
        );
        assert!(
            bad(
                "svid_combined_file_name = \"a\"\nrenew_signal = \"SIGFOO\"\npid_file_name = \"/p\""
            )
            .contains("SIGHUP")
        );
        assert!(bad("svid_combined_file_name = \"a\"\nspiffe_id = \"web\"").contains("SPIFFE ID"));
        assert!(
            bad("svid_combined_file_name = \"a\"\ndaemon_mode = false\nrenew_signal = \"HUP\"\npid_file_name = \"/p\"")
                .contains("daemon")
        );
        assert!(bad("svid_combined_file_name = \"a\"\nkey_file_mode = 600").contains("\"0640\""));
        assert!(toml::from_str::<FileConfig>("svid_file = \"a\"").is_err());
    }

    #[test]
    fn the_pkcs12_files_need_a_password_file_with_a_password() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let pw = |name: &str, text: &str, mode: u32| {
            let p = d.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p.display().to_string()
        };
        let with = |file: String| {
            args().merge(
                parse(&format!(
                    "svid_pkcs12_file_name = \"ks.p12\"\npkcs12_password_file = {file:?}"
                )),
                None,
            )
        };
        let good = with(pw("good", "pa ss\nignored\n", 0o640)).unwrap();
        assert_eq!(good.x509.pkcs12.as_deref(), Some("ks.p12"));
        assert!(good.x509_enabled());
        assert!(good.warnings.is_empty(), "{:?}", good.warnings);
        // Only the length shows, even in the config's Debug.
        let shown = format!("{good:?}");
        assert!(shown.contains("Password(5 bytes)") && !shown.contains("pa ss"));
        let bad = |file: String| with(file).unwrap_err().to_string();
        assert!(bad(pw("empty", "\nsecond", 0o600)).contains("first line is empty"));
        assert!(bad(pw("crlf", "pw\r\n", 0o600)).contains("\\r"));
        assert!(bad(d.path().join("none").display().to_string()).contains("cannot read"));
        let open = with(pw("open", "pw\n", 0o644)).unwrap();
        assert!(open.warnings[0].contains("readable by every user"));
        let refused = |text: &str| args().merge(parse(text), None).unwrap_err().to_string();
        assert!(
            refused("svid_bundle_pkcs12_file_name = \"ts.p12\"")
                .contains("needs pkcs12_password_file")
        );
        assert!(
            refused("svid_combined_file_name = \"a\"\npkcs12_password_file = \"/p\"")
                .contains("svid_pkcs12_file_name")
        );
        assert!(
            refused("svid_pkcs12_file_name = \"a\"\nsvid_combined_file_name = \"a\"")
                .contains("two files")
        );
    }

    #[test]
    fn cmd_args_split_as_spiffe_helper_does() {
        assert_eq!(
            split_cmd_args(r#"-s reload "two words" "a ""q"" b""#).unwrap(),
            ["-s", "reload", "two words", "a \"q\" b"]
        );
        assert!(split_cmd_args("  ").unwrap().is_empty());
        assert!(split_cmd_args("\"open").is_err());
    }

    #[test]
    fn ids_resolve_from_names_or_numbers() {
        let t = IdTable::parse(
            "/etc/passwd",
            "root:x:0:0::/root:/bin/sh\nweb:x:1001:1001::/:\n",
        );
        assert_eq!(
            t.lookup("k", "user", &IdValue::Str("web".into())).unwrap(),
            1001
        );
        assert_eq!(t.lookup("k", "user", &IdValue::Str("7".into())).unwrap(), 7);
        assert_eq!(t.lookup("k", "user", &IdValue::Int(9)).unwrap(), 9);
        assert!(
            t.lookup("k", "user", &IdValue::Str("nobody-here".into()))
                .is_err()
        );
    }

    #[test]
    fn jwt_flag_splits_at_the_last_equals_sign() {
        let j = parse_jwt_flag("https://x/?a=b=db.token").unwrap();
        assert_eq!(j.audiences, ["https://x/?a=b"]);
        assert_eq!(j.file_name, "db.token");
        assert!(parse_jwt_flag("db").is_err());
    }
}
