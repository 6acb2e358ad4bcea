//! `spiffed run` and `spiffed dev`: logging, signals, reload, and dev mode's self-check.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the banner and fatal errors are the CLI's output"
)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use spiffed_agent::config::{Config, LogFormat, LogLevel, NewRootPolicy};
use spiffed_core::TrustDomain;
use spiffed_spire::config::{JoinToken, NodeAttestation};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli_common::{EX_USAGE, output};

/// Prints a fatal error for a person, or as a JSON line under `--output json`.
pub(crate) fn fatal(msg: &str) {
    if output::json_errors() {
        output::err_json(&output::error_json(msg, "failure", 1));
    } else {
        output::err(format_args!("spiffed: error: {msg}"));
    }
}

/// Prints dev mode's banner or self-check report; false if stdout could not take it. A closed
/// or full stdout (`spiffed dev | head -1`) must not stop an agent that serves: it is logged
/// once and the agent goes on (`--once` then exits non-zero: its report went nowhere).
fn say(text: &str) -> bool {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match crate::cli_common::output::out(text) {
        Ok(()) => true,
        Err(e) => {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot print to stdout (dev goes on serving; with --once it exits 1)");
            }
            false
        }
    }
}

/// Options of `spiffed dev`.
#[derive(clap::Args, Debug)]
pub(crate) struct DevArgs {
    /// Socket path. Default: $XDG_RUNTIME_DIR/spiffed/dev.sock, else /tmp/spiffed-UID/dev.sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Trust domain of the embedded CA.
    #[arg(long, value_name = "TD", default_value = "dev.local")]
    trust_domain: String,
    /// Where the CA is kept. Default: $XDG_STATE_HOME/spiffed/dev, else ~/.local/state/spiffed/dev.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Lifetime of X.509-SVIDs (they are re-sent at half of it).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_svid_ttl)]
    x509_svid_ttl: Duration,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: DevLogFormat,
    /// Stop after the self-check fetch has succeeded (for scripts and first tries).
    #[arg(long)]
    once: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum DevLogFormat {
    Text,
    Json,
}

/// A positive duration flag (`--x509-svid-ttl`, `api watch --exec-timeout`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime_parse(s)?;
    if d.is_zero() {
        return Err("must be greater than zero, e.g. 10m".into());
    }
    Ok(d)
}

/// An SVID lifetime for dev mode: at least the default `min_svid_ttl` (10s).
fn parse_svid_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    let min = spiffed_agent::config::DEFAULT_MIN_SVID_TTL;
    if d < min {
        return Err(format!(
            "must be at least {} (SVIDs are re-minted at half their lifetime), e.g. 1m",
            humantime::format_duration(min)
        ));
    }
    Ok(d)
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    s.parse::<humantime::Duration>()
        .map(Into::into)
        .map_err(|e| format!("{e}; write e.g. 90s, 10m or 1h"))
}

fn log_filter(level: LogLevel) -> tracing_subscriber::EnvFilter {
    let level = level.as_str();
    tracing_subscriber::EnvFilter::new(format!(
        "warn,spiffed={level},spiffed_agent={level},spiffed_attest={level},\
         spiffed_authority={level},spiffed_entries={level},spiffed_workload_api={level}"
    ))
}

/// Changes the log level of the running agent (SIGHUP).
type LogLevelHandle = Box<dyn Fn(LogLevel) -> Result<(), String> + Send + Sync>;

fn init_logging(level: LogLevel, format: LogFormat) -> Option<LogLevelHandle> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(level))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // The reload handle's type depends on the whole builder, hence one branch per format.
    let (ok, set): (bool, LogLevelHandle) = match format {
        LogFormat::Json => {
            let b = builder.json().with_filter_reloading();
            let handle = b.reload_handle();
            let set = move |l| handle.reload(log_filter(l)).map_err(|e| e.to_string());
            (b.try_init().is_ok(), Box::new(set))
        }
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let handle = b.reload_handle();
            let set = move |l| handle.reload(log_filter(l)).map_err(|e| e.to_string());
            (b.try_init().is_ok(), Box::new(set))
        }
    };
    ok.then_some(set)
}

/// The configuration `spiffed run` reads when `--config` is absent (the Debian package's
/// conffile).
pub(crate) const DEFAULT_CONFIG_PATH: &str = "/etc/spiffed/spiffed.toml";

/// The configuration file of `run`: `--config`, else [`DEFAULT_CONFIG_PATH`] if it exists;
/// else a message naming the fix and exit status 64.
fn config_path(path: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    match path {
        Some(p) => Ok(p),
        None => {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            if let Err(e) = std::fs::symlink_metadata(&default) {
                let why = if e.kind() == std::io::ErrorKind::NotFound {
                    "does not exist".to_owned()
                } else {
                    format!("cannot be read: {e}")
                };
                eprintln!(
                    "spiffed: no --config given, and the default configuration {DEFAULT_CONFIG_PATH} \
                     {why}; fix: pass --config FILE, or write {DEFAULT_CONFIG_PATH} (the Debian \
                     package installs one; the README's \"Configuration\" lists every key)"
                );
                return Err(ExitCode::from(EX_USAGE));
            }
            Ok(default)
        }
    }
}

/// `spiffed run --check --config FILE`: every problem in the file on standard error and exit
/// status 64, or a summary on standard output and 0.
pub(crate) fn check(path: Option<PathBuf>) -> ExitCode {
    let path = match config_path(path) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let path = path.as_path();
    match Config::load_all(path) {
        Ok(cfg) => {
            let mode = if cfg.spire_server.is_some() {
                "agent mode (node agent of a SPIRE Server)"
            } else {
                "standalone mode"
            };
            let summary = format!(
                "{}: the configuration is valid: {mode}, trust domain {}, {} entr{}, socket {}, \
                 admin socket {}, data_dir {}",
                path.display(),
                cfg.trust_domain,
                cfg.entries.len(),
                if cfg.entries.len() == 1 { "y" } else { "ies" },
                cfg.socket_path.display(),
                cfg.admin_socket_path.display(),
                cfg.data_dir.display(),
            );
            match output::out(summary) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => e.exit_code(),
            }
        }
        Err(errors) => {
            let n = errors.len();
            let mut text = format!(
                "spiffed: invalid configuration: {n} problem{}{}",
                if n == 1 { "" } else { "s" },
                if n >= spiffed_agent::config::MAX_REPORTED_PROBLEMS {
                    " (the check stops there)"
                } else {
                    ""
                }
            );
            for e in &errors {
                text.push('\n');
                text.push_str(&e.to_string());
            }
            output::err(text);
            ExitCode::from(EX_USAGE)
        }
    }
}

/// `spiffed run`'s configuration, read and checked before the async runtime starts (its
/// `worker_threads` sizes the runtime).
pub(crate) struct RunConfig {
    cfg: Config,
    path: PathBuf,
}

impl RunConfig {
    /// Threads the runtime that serves this configuration starts with.
    pub(crate) fn worker_threads(&self) -> usize {
        self.cfg.worker_threads
    }
}

/// `spiffed run [--config FILE] [--new-trust-root] [--new-entry-store] [--join-token TOKEN]`,
/// the part before the runtime: the file read and checked and the flags applied; a problem
/// is printed here and comes back as the exit status.
pub(crate) fn prepare_run(
    path: Option<PathBuf>,
    new_trust_root: bool,
    new_entry_store: bool,
    join_token: Option<String>,
) -> Result<RunConfig, ExitCode> {
    let path = config_path(path)?;
    let mut cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spiffed: invalid configuration\n{e}");
            return Err(ExitCode::from(EX_USAGE));
        }
    };
    if new_trust_root {
        cfg.new_trust_root = NewRootPolicy::AtStart;
    }
    cfg.new_entry_store = new_entry_store;
    if let Some(token) = join_token.map(|t| t.trim().to_owned()) {
        let problem = match cfg.spire_server.as_mut() {
            None => Some(
                "--join-token (or SPIFFED_JOIN_TOKEN) is for agent mode, but the configuration \
                 has no [spire_server] table; add one, or drop the token",
            ),
            Some(_) if token.is_empty() => Some(
                "--join-token (or SPIFFED_JOIN_TOKEN) is empty; pass the token printed by \
                 `spire-server token generate`",
            ),
            Some(spire) => match &spire.attestation {
                NodeAttestation::X509Pop { .. } => Some(
                    "--join-token (or SPIFFED_JOIN_TOKEN) is set, but [spire_server.x509pop] \
                     configures x509pop attestation; use one node attestor",
                ),
                NodeAttestation::JoinToken(_) => {
                    spire.attestation = NodeAttestation::JoinToken(Some(JoinToken::new(token)));
                    None
                }
            },
        };
        if let Some(problem) = problem {
            eprintln!("spiffed: {problem}");
            return Err(ExitCode::from(EX_USAGE));
        }
    }
    Ok(RunConfig { cfg, path })
}

/// `spiffed run`, on the runtime [`prepare_run`] sized.
pub(crate) async fn run(prepared: RunConfig) -> anyhow::Result<ExitCode> {
    let RunConfig { cfg, path } = prepared;
    let log_level = init_logging(cfg.log_level, cfg.log_format);
    serve(cfg, Some((path, log_level)), None, false).await
}

/// Dev mode's self-check: what to do once the socket serves.
type OnReady = Box<dyn FnOnce(PathBuf) -> tokio::task::JoinHandle<bool> + Send>;

async fn serve(
    cfg: Config,
    reload_from: Option<(PathBuf, Option<LogLevelHandle>)>,
    on_ready: Option<OnReady>,
    once: bool,
) -> anyhow::Result<ExitCode> {
    tracing::info!(config = %cfg.summary(), "starting");
    let bound = match spiffed_agent::build(cfg) {
        Ok(b) => b,
        Err(e) => {
            fatal(&e.to_string());
            return Ok(ExitCode::FAILURE);
        }
    };
    let socket = bound.socket_path().to_owned();
    let reloader = bound.reloader();
    let mut old = bound.config().clone();

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    // SIGUSR1: one log line with the agent's counters (stream wake-ups, SVIDs in memory).
    let stats = bound.stats();
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            stats.log();
        }
    });
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);

    // SIGHUP: reload the file's entries; a bad file keeps the running config.
    if let Some((path, log_level)) = reload_from {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match Config::load(&path) {
                    Ok(new) => {
                        // Every changed setting is applied or named; none is ignored silently.
                        for key in old.changes_needing_restart(&new) {
                            tracing::warn!(
                                key,
                                file = %path.display(),
                                "changed {key} requires a restart; the running agent keeps the old value"
                            );
                        }
                        if new.log_level != old.log_level {
                            match log_level.as_ref().map(|set| set(new.log_level)) {
                                Some(Ok(())) => {
                                    tracing::info!(log_level = %new.log_level, "log level changed");
                                    old.log_level = new.log_level;
                                }
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, "cannot change the log level")
                                }
                                None => tracing::warn!(
                                    "changed log_level requires a restart; the running agent keeps the old value"
                                ),
                            }
                        }
                        if old.upstream_authority == new.upstream_authority {
                            reloader.check_upstream(&new);
                        }
                        let n = new.entries.len();
                        match reloader.reload_config_entries(new.entries) {
                            Ok(()) => {
                                tracing::info!(entries = n, file = %path.display(), "configuration reloaded")
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "reload failed; keeping the running entries")
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload failed; keeping the running configuration");
                    }
                }
            }
        });
    }

    let check = on_ready.map(|f| f(socket));
    let stopper = stop_tx.clone();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = stop_rx.wait_for(|s| *s) => {}
        }
    };
    let mut failed = false;
    let run = bound.run(shutdown);
    tokio::pin!(run);
    let result = if let Some(check) = check {
        tokio::select! {
            r = &mut run => r,
            ok = check => {
                let ok = ok.unwrap_or(false);
                failed = !ok;
                if !ok || once {
                    let _ = stopper.send(true);
                }
                run.await
            }
        }
    } else {
        run.await
    };
    drop(stop_tx);
    match result {
        Ok(()) if failed => Ok(ExitCode::FAILURE),
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            fatal(&e.to_string());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn env_dir(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// `spiffed dev`.
pub(crate) async fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    let uid = rustix::process::getuid().as_raw();
    let td = match TrustDomain::new(&args.trust_domain) {
        Ok(td) if !args.trust_domain.contains(':') => td,
        _ => {
            eprintln!(
                "spiffed: --trust-domain {:?} is not a trust domain name (lowercase letters, \
                 digits, '.', '-', '_'; e.g. dev.local)",
                args.trust_domain
            );
            return Ok(ExitCode::from(EX_USAGE));
        }
    };
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| match env_dir("XDG_RUNTIME_DIR") {
            Some(d) if d.is_dir() => d.join("spiffed").join("dev.sock"),
            _ => PathBuf::from(format!("/tmp/spiffed-{uid}/dev.sock")),
        });
    if !socket.is_absolute() {
        eprintln!("spiffed: --socket must be an absolute path, e.g. /tmp/spiffed/dev.sock");
        return Ok(ExitCode::from(EX_USAGE));
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        env_dir("XDG_STATE_HOME")
            .or_else(|| env_dir("HOME").map(|h| h.join(".local").join("state")))
            .map(|d| d.join("spiffed").join("dev"))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/spiffed-{uid}/state")))
    });
    // The socket's directory must be ours: anyone who owns it could swap the socket.
    if let Some(dir) = socket.parent()
        && let Ok(meta) = std::fs::metadata(dir)
        && meta.uid() != uid
        && args.socket.is_none()
    {
        anyhow::bail!(
            "{} belongs to uid {}, not to you (uid {uid}); pass --socket with a path in a \
             directory you own",
            dir.display(),
            meta.uid()
        );
    }

    let mut cfg = Config::with_defaults(td.clone());
    cfg.socket_path = socket.clone();
    cfg.admin_socket_path = socket
        .parent()
        .unwrap_or(Path::new("/tmp"))
        .join("admin")
        .join("admin.sock");
    cfg.socket_mode = 0o600;
    cfg.data_dir = data_dir.clone();
    cfg.synthetic_ids = true;
    // Zero-config: a dev CA that is gone or expired is replaced (with a warning naming it).
    cfg.new_trust_root = NewRootPolicy::Always;
    cfg.x509_svid_ttl = args.x509_svid_ttl;
    if cfg.x509_svid_ttl > cfg.ca_ttl {
        cfg.ca_ttl = cfg.x509_svid_ttl * 2;
    }
    let _ = init_logging(
        LogLevel::Info,
        match args.log_format {
            DevLogFormat::Json => LogFormat::Json,
            DevLogFormat::Text => LogFormat::Text,
        },
    );

    let once = args.once;
    let admin_socket = cfg.admin_socket_path.clone();
    let on_ready: OnReady = Box::new(move |socket: PathBuf| {
        tokio::spawn(async move {
            let banner = say(&format!(
                "spiffed dev: serving the SPIFFE Workload API (trust domain {td})\n  socket:   {}\n  \
                 data dir: {}\n  admin:    {} (spiffed entry ... --admin-socket PATH)\n\n\
                 export SPIFFE_ENDPOINT_SOCKET=unix://{}\n",
                socket.display(),
                data_dir.display(),
                admin_socket.display(),
                socket.display()
            ));
            let endpoint = format!("unix://{}", socket.display());
            match tokio::time::timeout(
                Duration::from_secs(10),
                crate::client::fetch_x509_report(&endpoint),
            )
            .await
            {
                Ok(Ok(report)) => {
                    let serving = if once { "" } else { "\nServing. Ctrl-C stops." };
                    let report = say(&format!(
                        "Self-check: fetched an X.509-SVID through the socket. A workload of uid \
                         {uid} receives:\n{}{serving}",
                        report.render_text()
                    ));
                    (banner && report) || !once
                }
                Ok(Err(e)) => {
                    fatal(&format!(
                        "self-check failed: fetching an SVID through {} did not work: {e:#}",
                        socket.display()
                    ));
                    false
                }
                Err(_) => {
                    fatal(&format!(
                        "self-check failed: no SVID from {} within 10s",
                        socket.display()
                    ));
                    false
                }
            }
        })
    });
    serve(cfg, None, Some(on_ready), once).await
}
