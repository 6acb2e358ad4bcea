//! `spiffed helper`: spiffe-helper's job, for programs that only read certificate files
//! (nginx, PostgreSQL, Java keystores).
//!
//! Data flow: sources stream from the Workload API and send [`Update`]s to one writer loop:
//! the X.509 context (FetchX509SVID, reconnecting with backoff), the JWT bundles
//! (FetchJWTBundles, likewise), and one task per JWT-SVID file (FetchJWTSVID, again at half
//! the token's lifetime). The writer picks the configured identity (by SPIFFE ID or hint,
//! never by position; the first SVID only when neither is set), builds the files, and
//! [`writer::Writer`] switches them all at once. Then [`hook::Hooks`] signals a pid or runs a
//! command, beside the writer and never blocking it. [`pkcs12`] encodes the Java keystore and
//! truststore. [`metrics`] tracks the files' expiry for a warning log and `--metrics-listen`.
//!
//! `--once` (daemon_mode = false) waits, up to `--timeout`, for the socket to appear and for
//! every configured file, writes them once and exits 0; 1 when they did not come in time.

mod config;
mod hook;
mod metrics;
mod pkcs12;
pub(crate) mod writer;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::StreamExt as _;
use spiffe::{JwtSvid, X509Context};
use spiffed_proto::workload::JwtBundlesRequest;
use spiffed_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

pub(crate) use config::FilePerm;
pub(crate) use config::HelperArgs;
use config::{ConfigError, HelperConfig, JwtFile};
use hook::{HookSpec, Hooks};
use metrics::{Metrics, Validity};
use writer::{FileSpec, Writer};

use crate::cli_common::{Failure, fail};
use crate::client::{
    Backoff, ClientError, SocketAddress, api_request, connect, connect_channel, pem_encode,
};

/// Log lines on standard error, `spiffed: helper: ...`. Never key material.
pub(crate) mod log {
    use crate::cli_common::output::err;

    /// Something that happened.
    pub(crate) fn info(args: std::fmt::Arguments<'_>) {
        err(format_args!("spiffed: helper: {args}"));
    }

    /// Something to look at.
    pub(crate) fn warn(args: std::fmt::Arguments<'_>) {
        err(format_args!("spiffed: helper: warning: {args}"));
    }

    /// Something that failed.
    pub(crate) fn error(args: std::fmt::Arguments<'_>) {
        err(format_args!("spiffed: helper: error: {args}"));
    }
}

impl Failure for ConfigError {
    fn is_usage(&self) -> bool {
        true
    }
}

/// The first reconnect delay.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// The longest reconnect delay in daemon mode.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest reconnect delay with `--once`: its whole budget is `--timeout`.
const MAX_BACKOFF_ONCE: Duration = Duration::from_secs(1);
/// The shortest wait before a JWT-SVID is fetched again.
const MIN_JWT_REFRESH: Duration = Duration::from_millis(500);

/// What a source found.
enum Update {
    /// A new X.509 context.
    X509(X509Context),
    /// The JWT bundles: trust domain to JWKS bytes.
    JwtBundles(BTreeMap<String, Vec<u8>>),
    /// A JWT-SVID for `jwt_svids[index]`, and when it was received.
    JwtSvid(usize, JwtSvid, SystemTime),
}

/// What an update changed.
#[derive(Debug, Clone, Copy)]
struct Changed {
    /// The X.509 files.
    x509: bool,
    /// Any other file.
    other: bool,
}

impl Changed {
    /// Nothing changed.
    const NONE: Self = Self {
        x509: false,
        other: false,
    };

    fn or(self, other: Self) -> Self {
        Self {
            x509: self.x509 || other.x509,
            other: self.other || other.other,
        }
    }

    fn any(self) -> bool {
        self.x509 || self.other
    }
}

/// The last error of each source, for `--once`'s message when time runs out.
type LastErrors = Arc<Mutex<BTreeMap<String, String>>>;

fn note_error(errors: &LastErrors, source: &str, message: Option<String>) {
    let mut guard = match errors.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    match message {
        Some(m) => {
            guard.insert(source.to_owned(), m);
        }
        None => {
            guard.remove(source);
        }
    }
}

/// `spiffed helper`.
pub(crate) async fn run(args: HelperArgs) -> anyhow::Result<ExitCode> {
    let env = match crate::client::read_socket_env() {
        Ok(env) => env,
        Err(e) => return Ok(fail(&ClientError::from(e))),
    };
    let config = match args.resolve(env.as_deref()) {
        Ok(c) => c,
        Err(e) => return Ok(fail(&e)),
    };
    for w in &config.warnings {
        log::warn(format_args!("{w}"));
    }
    log::info(format_args!(
        "{} {} into {} from {}; identity: {}",
        if config.once {
            "writing once"
        } else {
            "keeping files up to date"
        },
        describe_files(&config),
        config.cert_dir.display(),
        config.socket.path.display(),
        config.selector.describe(),
    ));
    let writer = match Writer::open(&config.cert_dir) {
        Ok(w) => w,
        Err(e) => {
            log::error(format_args!("{e}"));
            return Ok(ExitCode::FAILURE);
        }
    };
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = config.metrics_listen
        && let Err(e) = metrics::serve(addr, metrics.clone()).await
    {
        log::error(format_args!("{e}"));
        return Ok(ExitCode::FAILURE);
    }

    let errors = LastErrors::default();
    let (tx, rx) = mpsc::channel(16);
    let mut sources = tokio::task::JoinSet::new();
    let max_backoff = if config.once {
        MAX_BACKOFF_ONCE
    } else {
        MAX_BACKOFF
    };
    if config.x509_enabled() {
        sources.spawn(x509_source(
            config.socket.clone(),
            tx.clone(),
            errors.clone(),
            max_backoff,
        ));
    }
    if config.jwt_bundle.is_some() {
        sources.spawn(jwt_bundle_source(
            config.socket.clone(),
            tx.clone(),
            errors.clone(),
            max_backoff,
        ));
    }
    for (index, file) in config.jwt_svids.iter().enumerate() {
        sources.spawn(jwt_svid_source(
            config.socket.clone(),
            index,
            file.clone(),
            config.selector.clone(),
            tx.clone(),
            errors.clone(),
            max_backoff,
        ));
    }
    drop(tx);

    let hooks = Hooks::start(
        HookSpec {
            signal: config.signal.clone(),
            cmd: config.cmd.clone(),
            timeout: config.cmd_timeout,
        },
        metrics.clone(),
    );
    let mut state = WriterLoop {
        config: &config,
        writer: Some(writer),
        metrics,
        hooks,
        x509_files: None,
        x509_material: None,
        jwt_bundle_file: None,
        jwt_svid_files: vec![None; config.jwt_svids.len()],
        identity_note: None,
        updates: 0,
        warned: false,
    };
    let code = if config.once {
        let done = tokio::time::timeout(config.timeout, state.run(rx)).await;
        match done {
            Ok(code) => code,
            Err(_elapsed) => {
                log::error(format_args!(
                    "not every file could be written within {} (--timeout): {}",
                    humantime::format_duration(config.timeout),
                    state.missing(&errors)
                ));
                ExitCode::FAILURE
            }
        }
    } else {
        tokio::select! {
            code = state.run(rx) => code,
            () = crate::client::shutdown_signal() => {
                log::info(format_args!("stopped"));
                ExitCode::SUCCESS
            }
        }
    };
    sources.abort_all();
    Ok(code)
}

fn describe_files(config: &HelperConfig) -> String {
    let mut names: Vec<&str> = [
        &config.x509.svid,
        &config.x509.key,
        &config.x509.bundle,
        &config.x509.combined,
        &config.x509.pkcs12,
        &config.x509.bundle_pkcs12,
        &config.jwt_bundle,
    ]
    .into_iter()
    .flatten()
    .map(String::as_str)
    .collect();
    names.extend(config.jwt_svids.iter().map(|j| j.file_name.as_str()));
    names.join(", ")
}

/// The writer's state: the files of each part as last built.
struct WriterLoop<'a> {
    config: &'a HelperConfig,
    /// The writer; lent to a blocking thread while it writes (fsyncs stay off the runtime).
    writer: Option<Writer>,
    metrics: Arc<Metrics>,
    hooks: Option<Hooks>,
    /// The X.509 files and their validity, once the chosen identity arrived.
    x509_files: Option<(Vec<FileSpec>, Validity)>,
    /// What `x509_files` were built from: an update with the same material writes nothing
    /// (the PKCS#12 files, with fresh salts each time, are no use for that comparison).
    x509_material: Option<X509Material>,
    jwt_bundle_file: Option<FileSpec>,
    jwt_svid_files: Vec<Option<(FileSpec, Validity)>>,
    /// Why the chosen identity is missing, as last logged (to log it once per change).
    identity_note: Option<String>,
    /// Versions written.
    updates: u64,
    /// Whether the near-expiry warning was logged for the current version.
    warned: bool,
}

impl WriterLoop<'_> {
    async fn run(&mut self, mut rx: mpsc::Receiver<Update>) -> ExitCode {
        loop {
            let warn_at = self.warn_at();
            let sleep = async {
                match warn_at.and_then(|t| t.duration_since(SystemTime::now()).ok()) {
                    Some(d) => tokio::time::sleep(d).await,
                    None if warn_at.is_some() => {}
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                update = rx.recv() => {
                    let Some(update) = update else {
                        log::error(format_args!("every source stopped"));
                        return ExitCode::FAILURE;
                    };
                    let mut changed = self.apply(update);
                    // Whatever else is queued goes into the same version.
                    while let Ok(more) = rx.try_recv() {
                        changed = changed.or(self.apply(more));
                    }
                    if self.config.once && !self.complete() {
                        continue;
                    }
                    if changed.any() {
                        let written = self.write(changed.x509).await;
                        if self.config.once {
                            // A write that failed (no privilege to chown, a full disk) is
                            // not going to succeed by waiting: say so now.
                            return if written { ExitCode::SUCCESS } else { ExitCode::FAILURE };
                        }
                    }
                }
                () = sleep, if !self.warned => {
                    self.warn_near_expiry();
                }
            }
        }
    }

    /// Takes an update in; returns what changed.
    fn apply(&mut self, update: Update) -> Changed {
        let x509 = matches!(update, Update::X509(_));
        let changed = match update {
            Update::X509(context) => match x509_material(self.config, &context) {
                Ok((material, validity)) => {
                    let id = material.id.clone();
                    if self.identity_note.take().is_some() || self.x509_files.is_none() {
                        log::info(format_args!("writing the X.509 files of {id}"));
                    }
                    if self.x509_material.as_ref() == Some(&material) {
                        // Another identity (or a bundle this one does not use) changed.
                        log::info(format_args!(
                            "an update left the X.509 files of {id} unchanged; not rewriting \
                             them"
                        ));
                        false
                    } else {
                        match build_x509_files(self.config, &material) {
                            Ok(files) => {
                                self.x509_files = Some((files, validity));
                                self.x509_material = Some(material);
                                true
                            }
                            Err(e) => {
                                log::error(format_args!(
                                    "cannot build the PKCS#12 files of {id}: {e}; the files on \
                                     disk stay as they were"
                                ));
                                false
                            }
                        }
                    }
                }
                Err(note) => {
                    if self.identity_note.as_deref() != Some(note.as_str()) {
                        log::error(format_args!(
                            "{note}; the files on disk stay as they were, waiting for an \
                             update that has it"
                        ));
                        self.identity_note = Some(note);
                    }
                    false
                }
            },
            Update::JwtBundles(bundles) => {
                let file = self.config.jwt_bundle.as_ref().map(|name| FileSpec {
                    name: name.clone(),
                    contents: Zeroizing::new(jwt_bundle_json(&bundles)),
                    perm: self.config.jwt_bundle_perm,
                });
                let same = match (&self.jwt_bundle_file, &file) {
                    (Some(a), Some(b)) => a.contents == b.contents,
                    _ => false,
                };
                self.jwt_bundle_file = file;
                !same
            }
            Update::JwtSvid(index, svid, received) => {
                if let (Some(slot), Some(file)) = (
                    self.jwt_svid_files.get_mut(index),
                    self.config.jwt_svids.get(index),
                ) {
                    let same = slot
                        .as_ref()
                        .is_some_and(|(f, _)| f.contents.as_slice() == svid.token().as_bytes());
                    if same {
                        // The agent's cached token: nothing new to write.
                        return Changed::NONE;
                    }
                    let not_after = UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(svid.claims().exp()).unwrap_or(0));
                    *slot = Some((
                        FileSpec {
                            name: file.file_name.clone(),
                            contents: Zeroizing::new(svid.token().as_bytes().to_vec()),
                            perm: self.config.jwt_svid_perm,
                        },
                        Validity {
                            not_before: received.min(not_after),
                            not_after,
                        },
                    ));
                }
                true
            }
        };
        Changed {
            x509: x509 && changed,
            other: !x509 && changed,
        }
    }

    /// Whether every configured file has content.
    fn complete(&self) -> bool {
        (!self.config.x509_enabled() || self.x509_files.is_some())
            && (self.config.jwt_bundle.is_none() || self.jwt_bundle_file.is_some())
            && self.jwt_svid_files.iter().all(Option::is_some)
    }

    /// What `--once` still waits for, and why.
    fn missing(&self, errors: &LastErrors) -> String {
        let errors = match errors.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut out = Vec::new();
        if self.config.x509_enabled() && self.x509_files.is_none() {
            let why = self
                .identity_note
                .clone()
                .or_else(|| errors.get("X.509").cloned())
                .unwrap_or_else(|| "no answer from the agent".into());
            out.push(format!("no X.509-SVID ({why})"));
        }
        if self.config.jwt_bundle.is_some() && self.jwt_bundle_file.is_none() {
            let why = errors
                .get("JWT bundles")
                .cloned()
                .unwrap_or_else(|| "no answer from the agent".into());
            out.push(format!("no JWT bundles ({why})"));
        }
        for (file, slot) in self.config.jwt_svids.iter().zip(&self.jwt_svid_files) {
            if slot.is_none() {
                let why = errors
                    .get(&format!("JWT-SVID {}", file.file_name))
                    .cloned()
                    .unwrap_or_else(|| "no answer from the agent".into());
                out.push(format!("no JWT-SVID for {} ({why})", file.file_name));
            }
        }
        out.join("; ")
    }

    /// Every file with content, in one version.
    fn files(&self) -> (Vec<FileSpec>, BTreeMap<String, Validity>) {
        let mut files = Vec::new();
        let mut validity = BTreeMap::new();
        if let Some((x509, v)) = &self.x509_files {
            for f in x509 {
                // The bundle files hold CAs: their expiry is not the SVID's.
                let x509 = &self.config.x509;
                if Some(&f.name) != x509.bundle.as_ref()
                    && Some(&f.name) != x509.bundle_pkcs12.as_ref()
                {
                    validity.insert(f.name.clone(), *v);
                }
            }
            files.extend(x509.iter().cloned());
        }
        files.extend(self.jwt_bundle_file.iter().cloned());
        for (f, v) in self.jwt_svid_files.iter().flatten() {
            validity.insert(f.name.clone(), *v);
            files.push(f.clone());
        }
        (files, validity)
    }

    /// Writes a version; returns whether it was written.
    async fn write(&mut self, x509_changed: bool) -> bool {
        let (files, validity) = self.files();
        if files.is_empty() {
            return false;
        }
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        let writer = match self.writer.take() {
            Some(w) => Ok(w),
            None => Writer::open(&self.config.cert_dir),
        };
        let result = match writer {
            Ok(mut w) => {
                match tokio::task::spawn_blocking(move || {
                    let r = w.write(&files);
                    (w, r)
                })
                .await
                {
                    Ok((w, r)) => {
                        self.writer = Some(w);
                        r.map_err(|e| e.to_string())
                    }
                    // The writer is lost with its thread; the next update opens a new one.
                    Err(join) => Err(format!("the file writer stopped: {join}")),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            self.metrics.write_failed();
            log::error(format_args!(
                "cannot write the files: {e}; the previous files stay, and the next update \
                 writes again"
            ));
            return false;
        }
        self.updates += 1;
        self.warned = false;
        let number = self.updates;
        let until = self
            .x509_files
            .as_ref()
            .map(|(_, v)| format!(" (X.509-SVID valid until {})", rfc3339(v.not_after)))
            .unwrap_or_default();
        log::info(format_args!(
            "update #{number}: wrote {}{until}",
            names.join(", ")
        ));
        self.metrics.written(validity);
        // Programs reload on certificate changes; with no X.509 files, on any change.
        if let Some(hooks) = &self.hooks
            && (x509_changed || !self.config.x509_enabled())
        {
            hooks.trigger(number);
        }
        true
    }

    /// When the first file of the current version enters its last 10%.
    fn warn_at(&self) -> Option<SystemTime> {
        if self.updates == 0 {
            return None;
        }
        let mut at: Option<SystemTime> = self.x509_files.as_ref().map(|(_, v)| v.warn_at());
        for (_, v) in self.jwt_svid_files.iter().flatten() {
            let t = v.warn_at();
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        at
    }

    fn warn_near_expiry(&mut self) {
        self.warned = true;
        let now = SystemTime::now();
        let mut near = Vec::new();
        if let Some((_, v)) = &self.x509_files
            && v.near_expiry(now)
        {
            let x509 = &self.config.x509;
            let name = x509
                .svid
                .as_ref()
                .or(x509.combined.as_ref())
                .or(x509.pkcs12.as_ref());
            near.push(format!(
                "{} (until {})",
                name.map(String::as_str).unwrap_or("the X.509-SVID"),
                rfc3339(v.not_after)
            ));
        }
        for (f, v) in self.jwt_svid_files.iter().flatten() {
            if v.near_expiry(now) {
                near.push(format!("{} (until {})", f.name, rfc3339(v.not_after)));
            }
        }
        if !near.is_empty() {
            log::warn(format_args!(
                "files on disk within 10% of their lifetime of expiry, and no newer SVID \
                 arrived: {}; is the agent running and does it still issue this identity?",
                near.join(", ")
            ));
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    crate::client::rfc3339_system(t)
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

/// The validity of a DER certificate.
fn cert_validity(der: &[u8]) -> Option<Validity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(Validity {
        not_before: to_system_time(cert.validity().not_before),
        not_after: to_system_time(cert.validity().not_after),
    })
}

/// What the X.509 files of one identity are made of. Zeroized on drop (the key).
#[derive(PartialEq, Eq)]
struct X509Material {
    /// The SPIFFE ID.
    id: String,
    /// The leaf, then the intermediates (all of them, whatever goes to the chain file).
    chain: Vec<Vec<u8>>,
    /// Whether the intermediates go to the bundle file rather than the chain file.
    intermediates_in_bundle: bool,
    /// The PKCS#8 private key.
    key: Zeroizing<Vec<u8>>,
    /// The bundle file's certificates, each with its truststore alias.
    bundle: Vec<(String, Vec<u8>)>,
}

/// The configured identity's material and validity; or why it is missing from `context`.
fn x509_material(
    config: &HelperConfig,
    context: &X509Context,
) -> Result<(X509Material, Validity), String> {
    let svids = context.svids();
    let chosen = if config.selector.is_default() {
        svids.first()
    } else {
        svids
            .iter()
            .find(|s| config.selector.matches(s.spiffe_id(), s.hint()))
    };
    let Some(svid) = chosen else {
        let got: Vec<String> = svids
            .iter()
            .map(|s| match s.hint() {
                Some(h) => format!("{} (hint {h:?})", s.spiffe_id()),
                None => s.spiffe_id().to_string(),
            })
            .collect();
        return Err(format!(
            "{} is not among the identities the agent sends this process ({})",
            config.selector.describe(),
            if got.is_empty() {
                "none".to_owned()
            } else {
                got.join(", ")
            }
        ));
    };
    let id = svid.spiffe_id().to_string();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let leaf = chain
        .first()
        .ok_or_else(|| format!("the X.509-SVID of {id} has no certificate"))?;
    let validity =
        cert_validity(leaf).ok_or_else(|| format!("cannot read the certificate of {id}"))?;
    let td = svid.spiffe_id().trust_domain();
    let own = context
        .bundle_set()
        .get(td)
        .ok_or_else(|| format!("the agent sent no bundle for trust domain {td}"))?;
    // (label, certificate); the label numbered becomes the truststore alias.
    let mut bundle: Vec<(String, &[u8])> = own
        .authorities()
        .iter()
        .map(|c| (td.to_string(), c.as_bytes()))
        .collect();
    if config.add_intermediates_to_bundle {
        bundle.extend(
            chain
                .iter()
                .skip(1)
                .map(|c| ("intermediate".to_owned(), c.as_slice())),
        );
    }
    if config.include_federated_domains {
        for (other, b) in context.bundle_set().iter() {
            if other != td {
                bundle.extend(
                    b.authorities()
                        .iter()
                        .map(|c| (other.to_string(), c.as_bytes())),
                );
            }
        }
    }
    if config.omit_expired {
        let now = SystemTime::now();
        bundle.retain(|(_, der)| cert_validity(der).is_none_or(|v| v.not_after > now));
    }
    let mut numbered: BTreeMap<String, usize> = BTreeMap::new();
    let bundle = bundle
        .into_iter()
        .map(|(label, der)| {
            let n = numbered.entry(label.clone()).or_default();
            *n += 1;
            (format!("{label}-{n}"), der.to_vec())
        })
        .collect();
    let material = X509Material {
        id,
        chain,
        intermediates_in_bundle: config.add_intermediates_to_bundle,
        key: Zeroizing::new(svid.private_key().as_bytes().to_vec()),
        bundle,
    };
    Ok((material, validity))
}

/// The configured X.509 files, built from `material`.
fn build_x509_files(
    config: &HelperConfig,
    material: &X509Material,
) -> Result<Vec<FileSpec>, pkcs12::Pkcs12Error> {
    let chain_out = if material.intermediates_in_bundle {
        &material.chain[..material.chain.len().min(1)]
    } else {
        &material.chain[..]
    };
    let chain_pem = pem_encode("CERTIFICATE", chain_out.iter().map(Vec::as_slice));
    let key_pem = pem_encode("PRIVATE KEY", [material.key.as_slice()]);
    let mut files = Vec::new();
    let spec = |name: &String, contents: &[u8], perm: FilePerm| FileSpec {
        name: name.clone(),
        contents: Zeroizing::new(contents.to_vec()),
        perm,
    };
    if let Some(name) = &config.x509.key {
        files.push(spec(name, key_pem.as_bytes(), config.key_perm));
    }
    if let Some(name) = &config.x509.svid {
        files.push(spec(name, chain_pem.as_bytes(), config.cert_perm));
    }
    if let Some(name) = &config.x509.bundle {
        let bundle_pem = pem_encode(
            "CERTIFICATE",
            material.bundle.iter().map(|(_, c)| c.as_slice()),
        );
        files.push(spec(name, bundle_pem.as_bytes(), config.cert_perm));
    }
    if let Some(name) = &config.x509.combined {
        let mut both = Zeroizing::new(String::with_capacity(chain_pem.len() + key_pem.len()));
        both.push_str(&chain_pem);
        both.push_str(&key_pem);
        files.push(spec(name, both.as_bytes(), config.key_perm));
    }
    if let Some(password) = &config.pkcs12_password {
        // PBKDF2 and the MAC's KDF take about 0.1 s of CPU: off the async workers.
        let build = || -> Result<Vec<FileSpec>, pkcs12::Pkcs12Error> {
            let mut out = Vec::new();
            if let Some(name) = &config.x509.pkcs12 {
                // The whole chain: a Java server sends what its keystore holds.
                let chain: Vec<&[u8]> = material.chain.iter().map(Vec::as_slice).collect();
                let der = pkcs12::keystore(password, &material.id, &material.key, &chain)?;
                out.push(FileSpec {
                    name: name.clone(),
                    contents: der,
                    perm: config.key_perm,
                });
            }
            if let Some(name) = &config.x509.bundle_pkcs12 {
                let cas: Vec<(String, &[u8])> = material
                    .bundle
                    .iter()
                    .map(|(alias, der)| (alias.clone(), der.as_slice()))
                    .collect();
                out.push(FileSpec {
                    name: name.clone(),
                    contents: Zeroizing::new(pkcs12::truststore(password, &cas)?),
                    perm: config.cert_perm,
                });
            }
            Ok(out)
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let built = if multi_thread {
            tokio::task::block_in_place(build)?
        } else {
            build()?
        };
        files.extend(built);
    }
    Ok(files)
}

/// spiffe-helper's JWT bundle file: `{"TRUST_DOMAIN": "base64 of the JWKS"}`.
fn jwt_bundle_json(bundles: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let map: BTreeMap<&str, String> = bundles
        .iter()
        .map(|(td, jwks)| {
            let td = td.strip_prefix("spiffe://").unwrap_or(td);
            (td, base64::engine::general_purpose::STANDARD.encode(jwks))
        })
        .collect();
    serde_json::to_vec(&map).unwrap_or_default()
}

/// Logs a source's failure and waits before the next attempt.
async fn retry(errors: &LastErrors, source: &str, e: &ClientError, backoff: &mut Backoff) {
    let delay = backoff.next_delay();
    log::error(format_args!(
        "{source}: {e}; trying again in {}",
        humantime::format_duration(Duration::from_millis(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
        ))
    ));
    note_error(errors, source, Some(e.to_string()));
    tokio::time::sleep(delay).await;
}

/// Streams X.509 contexts for ever, reconnecting with backoff (the socket may not exist yet).
async fn x509_source(
    addr: SocketAddress,
    tx: mpsc::Sender<Update>,
    errors: LastErrors,
    max_backoff: Duration,
) {
    let source = "X.509";
    let mut backoff = Backoff::new(MIN_BACKOFF, max_backoff);
    loop {
        let e = async {
            let client = connect(&addr).await?;
            let mut stream = client
                .stream_x509_contexts()
                .await
                .map_err(|e| ClientError::from_api(&addr.path, e))?;
            while let Some(message) = stream.next().await {
                let context = message.map_err(|e| ClientError::from_api(&addr.path, e))?;
                backoff.reset();
                note_error(&errors, source, None);
                if tx.send(Update::X509(context)).await.is_err() {
                    return Ok(());
                }
            }
            Err(ClientError::StreamEnded {
                path: addr.path.clone(),
            })
        }
        .await;
        match e {
            Ok(()) => return,
            Err(e) => retry(&errors, source, &e, &mut backoff).await,
        }
    }
}

/// Streams the JWT bundles for ever (FetchJWTBundles), reconnecting with backoff.
async fn jwt_bundle_source(
    addr: SocketAddress,
    tx: mpsc::Sender<Update>,
    errors: LastErrors,
    max_backoff: Duration,
) {
    let source = "JWT bundles";
    let mut backoff = Backoff::new(MIN_BACKOFF, max_backoff);
    loop {
        let e = async {
            let channel = connect_channel(&addr).await?;
            let status = |s: tonic::Status| ClientError::Status {
                path: addr.path.clone(),
                code: s.code(),
                message: s.message().to_owned(),
            };
            let mut stream = SpiffeWorkloadApiClient::new(channel)
                .fetch_jwt_bundles(api_request(JwtBundlesRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            while let Some(message) = stream.next().await {
                let message = message.map_err(status)?;
                backoff.reset();
                note_error(&errors, source, None);
                let bundles = message.bundles.into_iter().collect();
                if tx.send(Update::JwtBundles(bundles)).await.is_err() {
                    return Ok(());
                }
            }
            Err(ClientError::StreamEnded {
                path: addr.path.clone(),
            })
        }
        .await;
        match e {
            Ok(()) => return,
            Err(e) => retry(&errors, source, &e, &mut backoff).await,
        }
    }
}

/// Fetches a JWT-SVID for one file, again at half its remaining lifetime.
async fn jwt_svid_source(
    addr: SocketAddress,
    index: usize,
    file: JwtFile,
    selector: config::Selector,
    tx: mpsc::Sender<Update>,
    errors: LastErrors,
    max_backoff: Duration,
) {
    let source = format!("JWT-SVID {}", file.file_name);
    let mut backoff = Backoff::new(MIN_BACKOFF, max_backoff);
    loop {
        let fetched = async {
            let client = connect(&addr).await?;
            let svids = client
                .fetch_all_jwt_svids(&file.audiences, selector.spiffe_id.as_ref())
                .await
                .map_err(|e| ClientError::from_api(&addr.path, e))?;
            let chosen = if selector.is_default() {
                svids.into_iter().next()
            } else {
                svids
                    .into_iter()
                    .find(|s| selector.matches(s.spiffe_id(), s.hint()))
            };
            chosen.ok_or_else(|| ClientError::Malformed {
                path: addr.path.clone(),
                what: "no JWT-SVID for the configured identity (spiffe_id/hint) in the answer",
            })
        }
        .await;
        match fetched {
            Ok(svid) => {
                backoff.reset();
                note_error(&errors, &source, None);
                let now = SystemTime::now();
                let exp = UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(svid.claims().exp()).unwrap_or(0));
                let half = exp.duration_since(now).unwrap_or_default() / 2;
                if tx.send(Update::JwtSvid(index, svid, now)).await.is_err() {
                    return;
                }
                tokio::time::sleep(half.max(MIN_JWT_REFRESH)).await;
            }
            Err(e) => retry(&errors, &source, &e, &mut backoff).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jwt_bundle_file_is_spiffe_helpers_map_of_base64_jwks() {
        let jwks = br#"{"keys":[]}"#.to_vec();
        let json = jwt_bundle_json(&[("spiffe://example.org".to_owned(), jwks.clone())].into());
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let b64 = value["example.org"].as_str().unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
            jwks
        );
    }
}
