//! A real SPIRE Server v1.13.3, and SPIRE's own agent beside it, for the agent-mode tests.
//!
//! [`SpireServer::start`] runs `spire-server run` on 127.0.0.1 with the sqlite3 datastore, the
//! `disk` key manager (keys survive [`SpireServer::restart`]) and the `join_token` and `x509pop`
//! node attestors; the x509pop CA is made here, and [`SpireServer::x509pop_node_cert`] signs node
//! certificates with it. The server's CLI is wrapped in typed methods (tokens, entries, agents,
//! bundles, local authorities), each run against the server's own Unix socket with a bounded
//! wait. [`SpireAgent::start`] runs `spire-agent run` attached to such a server, for
//! side-by-side checks; [`fetch_x509_ids`] asks any Workload API socket (spire-agent's or
//! spiffed's) through `spire-agent api fetch x509`.
//!
//! Every process runs in its own temp directory (config, data, sockets, log) and is killed on
//! drop; a panic while one is alive keeps its directory and prints where it is. Every failure
//! panics with what was run, what it printed and the tail of the process's log.
//!
//! The binaries come from `tests/spire/build.sh` (see [`spire_bins`]), which builds them once
//! into a cache outside the checkout.
//!
//! All calls block (they run processes and poll); from async code call them through
//! `tokio::task::spawn_blocking` or on a multi-threaded runtime.
//!
//! ```no_run
//! use spiffed_test_support::spire::{AgentAttestation, EntrySpec, ServerOptions, SpireAgent, SpireServer};
//! let server = SpireServer::start(ServerOptions::default());
//! let token = server.generate_token(None, None);
//! let agent = SpireAgent::start(&server, AgentAttestation::JoinToken(token));
//! server.entry_create(&EntrySpec::workload(agent.agent_id(), "spiffe://example.org/web", &["unix:uid:0"]));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;
use zeroize::Zeroizing;

/// The SPIRE version the harness builds and runs.
pub const SPIRE_VERSION: &str = "v1.13.3";

/// How long a process may take to become healthy before the harness gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Lines of a process log shown in a panic message.
const LOG_TAIL_LINES: usize = 80;
/// The longest Unix socket path the kernel accepts is 107 bytes (plus the NUL).
const MAX_SOCKET_PATH: usize = 107;

// ------------------------------------------------------------------------------------ binaries

/// Paths of the SPIRE binaries the harness runs.
#[derive(Clone, Debug)]
pub struct SpireBins {
    /// `spire-server`.
    pub server: PathBuf,
    /// `spire-agent`.
    pub agent: PathBuf,
}

/// The repository root (two levels above this crate's manifest).
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// The spire-server and spire-agent v1.13.3 binaries: runs `tests/spire/build.sh` once per test
/// process (it reuses the cached binaries, or builds what is missing, which takes minutes on a
/// cold cache; its progress goes to stderr). Panics with the script's message if it fails, in
/// every test that asks, without running it again.
pub fn spire_bins() -> SpireBins {
    static BINS: OnceLock<Result<SpireBins, String>> = OnceLock::new();
    match BINS.get_or_init(build_bins) {
        Ok(bins) => bins.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn build_bins() -> Result<SpireBins, String> {
    let script = repo_root().join("tests/spire/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run bash {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}); it needs `go` (>= 1.25) and the Go module proxy on a cold cache, \
             see tests/spire/README.md. stdout: {stdout}",
            script.display(),
            out.status
        ));
    }
    let dir = PathBuf::from(stdout.trim());
    let bins = SpireBins {
        server: dir.join("spire-server"),
        agent: dir.join("spire-agent"),
    };
    for b in [&bins.server, &bins.agent] {
        if !b.is_file() {
            return Err(format!(
                "{} printed {}, but {} is missing",
                script.display(),
                dir.display(),
                b.display()
            ));
        }
    }
    Ok(bins)
}

// ------------------------------------------------------------------------------------- helpers

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; it is released before
/// this returns, so another process may take it: callers retry on "address already in use").
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// Calls `f` every 100 ms until it returns `Some`, and returns that; panics naming `what` if
/// `timeout` passes first.
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of the file at `path` (empty if it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One X.509-SVID of a [`X509Fetch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedSvid {
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// The entry's hint (empty if none).
    pub hint: String,
    /// The certificate chain, DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The trust bundle sent with it, DER certificates.
    pub bundle: Vec<Vec<u8>>,
}

/// What a Workload API handed out, as `spire-agent api fetch x509 -output json` reports it (the
/// private keys are left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X509Fetch {
    /// The SVIDs, in the order the server sent them (the first is the default identity).
    pub svids: Vec<FetchedSvid>,
    /// Federated bundles by trust domain name (`other.org`), DER certificates.
    pub federated_bundles: BTreeMap<String, Vec<Vec<u8>>>,
}

impl X509Fetch {
    /// The SPIFFE IDs, in order.
    pub fn ids(&self) -> Vec<String> {
        self.svids.iter().map(|s| s.spiffe_id.clone()).collect()
    }
}

/// Splits concatenated DER certificates (a bundle or a chain); panics on anything else.
pub fn split_der_certs(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![];
    while !der.is_empty() {
        assert!(
            der.len() >= 2 && der[0] == 0x30,
            "not a DER certificate sequence: {der:02x?}"
        );
        let (len, header) = match der[1] {
            l if l < 0x80 => (usize::from(l), 2),
            l @ 0x81..=0x83 => {
                let n = usize::from(l - 0x80);
                assert!(der.len() >= 2 + n, "truncated DER length");
                let len = der[2..2 + n]
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
                (len, 2 + n)
            }
            l => panic!("unsupported DER length byte {l:#x}"),
        };
        assert!(der.len() >= header + len, "truncated DER certificate");
        out.push(der[..header + len].to_vec());
        der = &der[header + len..];
    }
    out
}

/// Fetches X.509-SVIDs from the Workload API at `socket` as this process, with
/// `spire-agent api fetch x509 -output json` (a client we did not write; works against
/// spire-agent and spiffed alike). `Err` carries the command's output when it fails (`no
/// identity issued`, no socket, ...).
pub fn fetch_x509(socket: &Path) -> Result<X509Fetch, String> {
    let out = run_bounded(
        Command::new(spire_bins().agent)
            .args(["api", "fetch", "x509", "-timeout", "3s", "-output", "json"])
            .arg("-socketPath")
            .arg(socket),
        CLI_TIMEOUT,
        &scratch_dir(),
    );
    if !out.status.success() {
        return Err(out.describe());
    }
    let v: Value = serde_json::from_str(&out.stdout)
        .map_err(|e| format!("no JSON ({e}): {}", out.describe()))?;
    let b64 = |v: &Value| -> Result<Vec<Vec<u8>>, String> {
        let der = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| format!("bad base64 ({e}) in {}", out.stdout))?;
        Ok(split_der_certs(&der))
    };
    let mut svids = vec![];
    for s in v["svids"].as_array().into_iter().flatten() {
        svids.push(FetchedSvid {
            spiffe_id: s["spiffe_id"].as_str().unwrap_or_default().to_owned(),
            hint: s["hint"].as_str().unwrap_or_default().to_owned(),
            chain: b64(&s["x509_svid"])?,
            bundle: b64(&s["bundle"])?,
        });
    }
    if svids.is_empty() {
        return Err(format!("no SVID in the answer: {}", out.describe()));
    }
    let mut federated_bundles = BTreeMap::new();
    for (td, b) in v["federated_bundles"].as_object().into_iter().flatten() {
        federated_bundles.insert(td.clone(), b64(b)?);
    }
    Ok(X509Fetch {
        svids,
        federated_bundles,
    })
}

/// The SPIFFE IDs [`fetch_x509`] gets from `socket`, in order.
pub fn fetch_x509_ids(socket: &Path) -> Result<Vec<String>, String> {
    fetch_x509(socket).map(|f| f.ids())
}

/// Polls [`fetch_x509_ids`] on `socket` until `spiffe_id` is among the answers (a new entry
/// reaches spire-agent on its next sync, up to 5 s later); panics with the last answer after
/// `timeout`.
pub fn wait_for_x509_id(socket: &Path, spiffe_id: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = fetch_x509_ids(socket);
        if matches!(&last, Ok(ids) if ids.iter().any(|i| i == spiffe_id)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not hand out {spiffe_id} within {timeout:?}; last answer: {last:?}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where CLI output files of calls that belong to no server go (each is removed after use).
fn scratch_dir() -> PathBuf {
    std::env::temp_dir()
}

/// What a bounded CLI run printed.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl CliOutput {
    /// The command, its status and both outputs, for a panic message.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with stdout and stderr in files under `dir` (no pipe to fill up), killing it if
/// it takes longer than `timeout`.
fn run_bounded(cmd: &mut Command, timeout: Duration, dir: &Path) -> CliOutput {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let out_path = dir.join(format!(".spire-cli-{}-{n}.out", std::process::id()));
    let err_path = dir.join(format!(".spire-cli-{}-{n}.err", std::process::id()));
    let command = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("create a CLI output file"))
        .stderr(fs::File::create(&err_path).expect("create a CLI output file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for a CLI process") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = fs::read_to_string(&out_path).unwrap_or_default();
            let stderr = fs::read_to_string(&err_path).unwrap_or_default();
            let _ = fs::remove_file(&out_path);
            let _ = fs::remove_file(&err_path);
            panic!(
                "{command} did not finish within {timeout:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    CliOutput {
        command,
        status,
        stdout,
        stderr,
    }
}

fn check_socket_path(path: &Path) {
    let len = path.as_os_str().len();
    assert!(
        len <= MAX_SOCKET_PATH,
        "socket path {} is {len} bytes, over the kernel's limit of {MAX_SOCKET_PATH}; \
         set TMPDIR to a shorter directory",
        path.display()
    );
}

/// `spiffe://TD` from `TD` or `spiffe://TD`.
fn td_id(trust_domain: &str) -> String {
    if trust_domain.starts_with("spiffe://") {
        trust_domain.to_owned()
    } else {
        format!("spiffe://{trust_domain}")
    }
}

/// `spiffe://TD/PATH` from the `{"trust_domain": .., "path": ..}` objects of SPIRE's JSON.
fn json_spiffe_id(v: &Value) -> String {
    format!(
        "spiffe://{}{}",
        v["trust_domain"].as_str().unwrap_or_default(),
        v["path"].as_str().unwrap_or_default()
    )
}

/// A JSON number SPIRE prints as a string (`"1796148436"`) or a number.
fn json_i64(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or_default(),
        v => v.as_i64().unwrap_or_default(),
    }
}

fn sha1_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn pem_encode(label: &str, der: &[u8]) -> Zeroizing<String> {
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    let mut out = Zeroizing::new(format!("-----BEGIN {label}-----\n"));
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The SEC1 `ECPrivateKey` (RFC 5915, with the named curve) of a P-256 key, from its PKCS#8
/// form (which embeds the same structure without the curve) and its uncompressed public point.
fn p256_sec1_der(pkcs8: &[u8], public: &[u8]) -> Zeroizing<Vec<u8>> {
    // ECPrivateKey starts with version 1 then a 32-byte OCTET STRING: the private scalar.
    const MARK: [u8; 5] = [0x02, 0x01, 0x01, 0x04, 0x20];
    let at = pkcs8
        .windows(MARK.len())
        .position(|w| w == MARK)
        .expect("a P-256 PKCS#8 key holds an ECPrivateKey");
    let scalar = &pkcs8[at + MARK.len()..at + MARK.len() + 32];
    assert_eq!(public.len(), 65, "an uncompressed P-256 point");
    let mut der = Zeroizing::new(Vec::with_capacity(121));
    der.extend_from_slice(&[0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20]);
    der.extend_from_slice(scalar);
    // [0] namedCurve prime256v1
    der.extend_from_slice(&[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ]);
    // [1] publicKey BIT STRING
    der.extend_from_slice(&[0xa1, 0x44, 0x03, 0x42, 0x00]);
    der.extend_from_slice(public);
    der
}

// ----------------------------------------------------------------------------------- processes

/// A child process with its log file; killed on drop.
struct Proc {
    name: &'static str,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &'static str, log: PathBuf) -> Self {
        Self {
            name,
            log,
            child: None,
        }
    }

    /// Starts `cmd` with stdout and stderr appended to the log.
    fn spawn(&mut self, cmd: &mut Command) {
        assert!(!self.is_running(), "{} is already running", self.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the process log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({cmd:?}): {e}", self.name));
        self.child = Some(child);
    }

    fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The exit status, if it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .id()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        if let Some(s) = child.try_wait().expect("wait for a child") {
            return s;
        }
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(s) = child.try_wait().expect("wait for a child") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                    self.name,
                    log_tail(&self.log, LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Keeps `dir` if the thread is panicking (so the logs and config can be read), else removes it.
fn keep_dir_if_panicking(dir: &mut tempfile::TempDir, what: &str) {
    if std::thread::panicking() {
        dir.disable_cleanup(true);
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("{what} kept for inspection: {}\n", dir.path().display()).as_bytes(),
        );
    }
}

// -------------------------------------------------------------------------------------- server

/// How to run a [`SpireServer`]; `ServerOptions::default()` is a server for `example.org` on
/// 127.0.0.1 and a free port with SPIRE's default lifetimes.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// `trust_domain` (default `example.org`).
    pub trust_domain: String,
    /// `bind_address` (default `127.0.0.1`).
    pub bind_address: String,
    /// `bind_port`; `None` picks a free port (and retries with another one if it was taken).
    pub port: Option<u16>,
    /// `default_x509_svid_ttl` as SPIRE spells durations (`"1h"`, `"90s"`); SPIRE's default: 1h.
    pub default_x509_svid_ttl: Option<String>,
    /// `default_jwt_svid_ttl` (SPIRE's default: 5m).
    pub default_jwt_svid_ttl: Option<String>,
    /// `agent_ttl`, the lifetime of agent SVIDs (SPIRE's default: the X.509-SVID TTL).
    pub agent_ttl: Option<String>,
    /// `ca_ttl` (SPIRE's default: 24h; the server prepares the next CA at half of it).
    pub ca_ttl: Option<String>,
    /// Lines added inside `server { }`.
    pub extra_server_config: Vec<String>,
    /// Lines added inside `plugins { }` (more plugins).
    pub extra_plugins: Vec<String>,
    /// The `DataStore "sql"` the server uses (default: its own sqlite3 file).
    pub datastore: DataStore,
}

/// Where a [`SpireServer`] keeps its data (`DataStore "sql"`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DataStore {
    /// `database_type = "sqlite3"`, a file in the server's data directory.
    #[default]
    Sqlite,
    /// `database_type = "postgres"` with this connection string (several servers sharing
    /// one database make an HA fleet; see [`crate::fleet`]).
    Postgres {
        /// A libpq-style connection string (`dbname=spire user=spire host=127.0.0.1 ...`).
        connection_string: String,
    },
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            trust_domain: "example.org".to_owned(),
            bind_address: "127.0.0.1".to_owned(),
            port: None,
            default_x509_svid_ttl: None,
            default_jwt_svid_ttl: None,
            agent_ttl: None,
            ca_ttl: None,
            extra_server_config: vec![],
            extra_plugins: vec![],
            datastore: DataStore::Sqlite,
        }
    }
}

/// The bundle formats of `spire-server bundle show/set -format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BundleFormat {
    /// Concatenated PEM certificates (X.509 authorities only).
    Pem,
    /// A SPIFFE bundle (JWKS with `x509-svid` and `jwt-svid` keys).
    Spiffe,
}

impl BundleFormat {
    fn flag(self) -> &'static str {
        match self {
            Self::Pem => "pem",
            Self::Spiffe => "spiffe",
        }
    }
}

/// A registration entry for [`SpireServer::entry_create`]; the fields are the CLI's flags.
#[derive(Clone, Debug, Default)]
pub struct EntrySpec {
    /// `-entryID`: a chosen entry ID (SPIRE makes a UUID when `None`).
    pub entry_id: Option<String>,
    /// `-parentID`: the agent (or node alias) the entry is for; `None` only with `node`.
    pub parent_id: Option<String>,
    /// `-spiffeID`.
    pub spiffe_id: String,
    /// `-selector`, each `type:value` (`unix:uid:1000`, `x509pop:subject:cn:node1`).
    pub selectors: Vec<String>,
    /// `-node`: a node alias entry (matches agents by their node selectors).
    pub node: bool,
    /// `-hint`.
    pub hint: Option<String>,
    /// `-federatesWith`, each `spiffe://other.org` (the server must already hold that trust
    /// domain's bundle, see [`SpireServer::bundle_set`], or the create fails).
    pub federates_with: Vec<String>,
    /// `-x509SVIDTTL` in seconds.
    pub x509_svid_ttl: Option<u64>,
    /// `-jwtSVIDTTL` in seconds.
    pub jwt_svid_ttl: Option<u64>,
    /// `-dns`.
    pub dns_names: Vec<String>,
    /// `-admin`.
    pub admin: bool,
    /// `-downstream`.
    pub downstream: bool,
    /// `-entryExpiry`, seconds since the epoch.
    pub expires_at: Option<i64>,
}

impl EntrySpec {
    /// A workload entry under `parent_id` (an agent ID) with these selectors.
    pub fn workload(parent_id: &str, spiffe_id: &str, selectors: &[&str]) -> Self {
        Self {
            parent_id: Some(parent_id.to_owned()),
            spiffe_id: spiffe_id.to_owned(),
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            ..Self::default()
        }
    }

    /// A node alias entry (`-node`): agents whose node selectors include these get `spiffe_id`
    /// as an alias that workload entries can name as their parent.
    pub fn node_alias(spiffe_id: &str, selectors: &[&str]) -> Self {
        Self {
            node: true,
            spiffe_id: spiffe_id.to_owned(),
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            ..Self::default()
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![];
        let mut flag = |f: &str, v: String| {
            a.push(f.to_owned());
            a.push(v);
        };
        if let Some(id) = &self.entry_id {
            flag("-entryID", id.clone());
        }
        if let Some(p) = &self.parent_id {
            flag("-parentID", p.clone());
        }
        flag("-spiffeID", self.spiffe_id.clone());
        for s in &self.selectors {
            flag("-selector", s.clone());
        }
        if let Some(h) = &self.hint {
            flag("-hint", h.clone());
        }
        for f in &self.federates_with {
            flag("-federatesWith", td_id(f));
        }
        if let Some(t) = self.x509_svid_ttl {
            flag("-x509SVIDTTL", t.to_string());
        }
        if let Some(t) = self.jwt_svid_ttl {
            flag("-jwtSVIDTTL", t.to_string());
        }
        for d in &self.dns_names {
            flag("-dns", d.clone());
        }
        if let Some(e) = self.expires_at {
            flag("-entryExpiry", e.to_string());
        }
        if self.node {
            a.push("-node".to_owned());
        }
        if self.admin {
            a.push("-admin".to_owned());
        }
        if self.downstream {
            a.push("-downstream".to_owned());
        }
        a
    }
}

/// An attested agent as `spire-server agent list -output json` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestedAgent {
    /// Its SPIFFE ID (`spiffe://TD/spire/agent/...`).
    pub id: String,
    /// `join_token`, `x509pop`, ...
    pub attestation_type: String,
    /// Whether it is banned.
    pub banned: bool,
    /// Whether it may re-attest (x509pop: yes; join_token: no).
    pub can_reattest: bool,
    /// The serial number of its current SVID (decimal; empty once banned).
    pub serial_number: String,
    /// When its SVID expires, seconds since the epoch.
    pub expires_at: i64,
    /// Its node selectors, `type:value`.
    pub selectors: Vec<String>,
}

/// Which local authority `spire-server localauthority` acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorityKind {
    /// The X.509 CA (`localauthority x509`); IDs are the CA certificate's subject key ID in hex.
    X509,
    /// The JWT signing key (`localauthority jwt`); IDs are the key ID (`kid`).
    Jwt,
}

impl AuthorityKind {
    fn word(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }
}

/// One local authority as `spire-server localauthority ... -output json` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorityInfo {
    /// The authority ID: subject key ID (hex) for X.509, `kid` for JWT.
    pub authority_id: String,
    /// When it expires, seconds since the epoch (0 in `revoke`'s answer).
    pub expires_at: i64,
    /// The upstream authority's subject key ID (empty: the server self-signs).
    pub upstream_authority_subject_key_id: String,
}

impl AuthorityInfo {
    fn from_json(v: &Value) -> Option<Self> {
        let id = v["authority_id"].as_str()?;
        Some(Self {
            authority_id: id.to_owned(),
            expires_at: json_i64(&v["expires_at"]),
            upstream_authority_subject_key_id: v["upstream_authority_subject_key_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
    }
}

/// The three slots `localauthority ... show` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAuthorities {
    /// The authority signing now.
    pub active: Option<AuthorityInfo>,
    /// The next one, prepared (already in the bundle) but not yet signing.
    pub prepared: Option<AuthorityInfo>,
    /// The previous active one (still in the bundle unless revoked).
    pub old: Option<AuthorityInfo>,
}

/// A node certificate for x509pop attestation, signed by the server's x509pop CA.
#[derive(Clone, Debug)]
pub struct NodeCert {
    /// The leaf certificate, PEM (the leaf only; intermediates are in `intermediates_path`).
    pub cert_path: PathBuf,
    /// The private key, PEM: PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`), file mode 0600.
    pub key_path: PathBuf,
    /// The intermediate CA certificate, PEM, when the leaf was issued through one.
    pub intermediates_path: Option<PathBuf>,
    /// The subject common name (`x509pop:subject:cn:<cn>` is among the agent's selectors).
    pub cn: String,
    /// The leaf, DER.
    pub cert_der: Vec<u8>,
    /// SHA-1 of the leaf's DER, lowercase hex.
    pub fingerprint: String,
    /// The agent ID SPIRE gives a node that attests with it:
    /// `spiffe://TD/spire/agent/x509pop/<fingerprint>`.
    pub agent_id: String,
}

/// How [`SpireServer::x509pop_node_cert_with`] makes a node certificate.
#[derive(Clone, Debug, Default)]
pub struct NodeCertOptions {
    /// Write the key as SEC1 `EC PRIVATE KEY` (as `openssl ecparam -genkey` does) instead of
    /// PKCS#8.
    pub sec1_key: bool,
    /// Issue the leaf through a fresh intermediate CA (written to `intermediates_path`), so
    /// attestation must send the chain.
    pub via_intermediate: bool,
    /// Validity start (default: an hour ago).
    pub not_before: Option<SystemTime>,
    /// Validity end (default: in 30 days); a time in the past makes an expired certificate.
    pub not_after: Option<SystemTime>,
}

/// The x509pop CA of one server: its key signs node certificates.
struct X509PopCa {
    issuer: Issuer<'static, KeyPair>,
    path: PathBuf,
    pem: String,
}

impl X509PopCa {
    fn create(dir: &Path) -> Self {
        let mut params = CertificateParams::new(vec![]).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "spiffed test x509pop CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, None, None);
        let key = KeyPair::generate().expect("generate a P-256 key");
        let cert = params.self_signed(&key).expect("self-sign the x509pop CA");
        let pem = cert.pem();
        let path = dir.join("x509pop-ca.pem");
        fs::write(&path, &pem).expect("write the x509pop CA");
        Self {
            issuer: Issuer::new(params, key),
            path,
            pem,
        }
    }
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: Option<SystemTime>,
    not_after: Option<SystemTime>,
) {
    let now = SystemTime::now();
    params.not_before = not_before.unwrap_or(now - Duration::from_secs(3600)).into();
    params.not_after = not_after
        .unwrap_or(now + Duration::from_secs(30 * 24 * 3600))
        .into();
}

/// A running `spire-server` in its own temp directory; killed on drop.
///
/// Layout of [`SpireServer::dir`]: `server.conf`, `server.log`, `data/` (sqlite datastore,
/// `keys.json`), `api.sock` (the admin API socket the CLI uses), `x509pop-ca.pem`, `nodes/`
/// (node certificates), `files/` (bundles written for `bundle set`).
pub struct SpireServer {
    bins: SpireBins,
    opts: ServerOptions,
    port: u16,
    socket: PathBuf,
    config: PathBuf,
    data_dir: PathBuf,
    ca: X509PopCa,
    proc: Proc,
    seq: AtomicU64,
    // Last: removed after the process is killed.
    dir: tempfile::TempDir,
}

impl fmt::Debug for SpireServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpireServer")
            .field("address", &self.address())
            .field("trust_domain", &self.opts.trust_domain)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl SpireServer {
    /// Writes the config, starts `spire-server run` and waits until `spire-server healthcheck`
    /// passes (at most a minute); panics with the log tail if it exits or never gets healthy.
    pub fn start(opts: ServerOptions) -> Self {
        let bins = spire_bins();
        let dir = tempfile::Builder::new()
            .prefix("spire-")
            .tempdir()
            .expect("create the server's temp dir");
        let socket = dir.path().join("api.sock");
        check_socket_path(&socket);
        let data_dir = dir.path().join("data");
        for d in [
            &data_dir,
            &dir.path().join("nodes"),
            &dir.path().join("files"),
        ] {
            fs::create_dir_all(d).expect("create the server's directories");
        }
        let ca = X509PopCa::create(dir.path());
        let port = opts.port.unwrap_or_else(free_port);
        let mut server = Self {
            proc: Proc::new("spire-server", dir.path().join("server.log")),
            config: dir.path().join("server.conf"),
            bins,
            opts,
            port,
            socket,
            data_dir,
            ca,
            seq: AtomicU64::new(0),
            dir,
        };
        // A free port may be taken between the probe and the bind: try others.
        let mut attempts = 0;
        loop {
            attempts += 1;
            server.write_config();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e)
                    if server.opts.port.is_none()
                        && attempts < 4
                        && e.contains("address already in use") =>
                {
                    server.port = free_port();
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn write_config(&self) {
        let o = &self.opts;
        let mut server = vec![
            format!("bind_address = \"{}\"", o.bind_address),
            format!("bind_port = \"{}\"", self.port),
            format!("socket_path = \"{}\"", self.socket.display()),
            format!("trust_domain = \"{}\"", o.trust_domain),
            format!("data_dir = \"{}\"", self.data_dir.display()),
            "log_level = \"DEBUG\"".to_owned(),
        ];
        for (key, value) in [
            ("default_x509_svid_ttl", &o.default_x509_svid_ttl),
            ("default_jwt_svid_ttl", &o.default_jwt_svid_ttl),
            ("agent_ttl", &o.agent_ttl),
            ("ca_ttl", &o.ca_ttl),
        ] {
            if let Some(v) = value {
                server.push(format!("{key} = \"{v}\""));
            }
        }
        server.extend(o.extra_server_config.iter().cloned());
        let (database_type, connection_string) = match &o.datastore {
            DataStore::Sqlite => (
                "sqlite3",
                self.data_dir
                    .join("datastore.sqlite3")
                    .display()
                    .to_string(),
            ),
            DataStore::Postgres { connection_string } => ("postgres", connection_string.clone()),
        };
        let mut plugins = vec![
            format!(
                "DataStore \"sql\" {{\n    plugin_data {{\n      database_type = \"{database_type}\"\n      connection_string = \"{connection_string}\"\n    }}\n  }}"
            ),
            format!(
                "KeyManager \"disk\" {{\n    plugin_data {{\n      keys_path = \"{}\"\n    }}\n  }}",
                self.data_dir.join("keys.json").display()
            ),
            "NodeAttestor \"join_token\" {\n    plugin_data {}\n  }".to_owned(),
            format!(
                "NodeAttestor \"x509pop\" {{\n    plugin_data {{\n      ca_bundle_path = \"{}\"\n    }}\n  }}",
                self.ca.path.display()
            ),
        ];
        plugins.extend(o.extra_plugins.iter().cloned());
        let text = format!(
            "server {{\n  {}\n}}\n\nplugins {{\n  {}\n}}\n",
            server.join("\n  "),
            plugins.join("\n  ")
        );
        fs::write(&self.config, text).expect("write server.conf");
    }

    /// Starts the process on the current config and waits until it is healthy.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bins.server);
        cmd.arg("run").arg("-config").arg(&self.config);
        self.proc.spawn(&mut cmd);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.proc.exited() {
                self.proc.child = None;
                return Err(format!(
                    "spire-server exited with {status} before it was healthy (config {}); log tail:\n{}",
                    self.config.display(),
                    self.log_tail()
                ));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.proc.kill();
                return Err(format!(
                    "spire-server was not healthy within {START_TIMEOUT:?} (config {}); log tail:\n{}",
                    self.config.display(),
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `spire-server healthcheck` passes now.
    pub fn healthy(&self) -> bool {
        self.socket.exists()
            && run_bounded(
                Command::new(&self.bins.server)
                    .args(["healthcheck", "-socketPath"])
                    .arg(&self.socket),
                CLI_TIMEOUT,
                self.dir.path(),
            )
            .status
            .success()
    }

    /// `127.0.0.1:PORT`: what agents dial (`[addr]:PORT` for an IPv6 bind address).
    pub fn address(&self) -> String {
        if self.opts.bind_address.contains(':') {
            format!("[{}]:{}", self.opts.bind_address, self.port)
        } else {
            format!("{}:{}", self.opts.bind_address, self.port)
        }
    }

    /// The bind address (`127.0.0.1` by default).
    pub fn host(&self) -> &str {
        &self.opts.bind_address
    }

    /// The TCP port agents dial.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The trust domain (`example.org` by default), without `spiffe://`.
    pub fn trust_domain(&self) -> &str {
        &self.opts.trust_domain
    }

    /// The server's own SPIFFE ID, `spiffe://TD/spire/server` (what an agent must find in the
    /// server's certificate).
    pub fn server_id(&self) -> String {
        format!("spiffe://{}/spire/server", self.opts.trust_domain)
    }

    /// The options it runs with (the port as chosen, in [`SpireServer::port`]).
    pub fn options(&self) -> &ServerOptions {
        &self.opts
    }

    /// The admin API socket the CLI talks to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The temp directory holding everything of this server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's `data_dir` (datastore and keys).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `server.conf`.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The server's log (stdout and stderr, DEBUG level, across restarts).
    pub fn log_path(&self) -> &Path {
        &self.proc.log
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.proc.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        log_tail(&self.proc.log, LOG_TAIL_LINES)
    }

    /// The process ID; panics if it is not running.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// SIGKILL, and reap (no-op if not running).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM, and waits for the exit (SIGKILL and a panic after 15 s); returns the status.
    pub fn stop(&mut self) -> ExitStatus {
        self.proc.stop()
    }

    /// Starts it again with the same config, data directory and port (stopping it first if it
    /// runs), and waits until it is healthy: the CA, entries and agents survive (sqlite3 and the
    /// disk key manager).
    pub fn restart(&mut self) {
        if self.proc.is_running() {
            self.proc.stop();
        }
        self.proc.child = None;
        if let Err(e) = self.spawn_and_wait() {
            panic!("restart: {e}");
        }
    }

    // ---------------------------------------------------------------------------------- CLI

    /// Runs `spire-server ARGS -socketPath SOCKET` (ARGS start with the subcommand, e.g.
    /// `["entry", "show"]`), bounded to a minute, and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        run_bounded(
            Command::new(&self.bins.server)
                .args(args)
                .arg("-socketPath")
                .arg(&self.socket),
            CLI_TIMEOUT,
            self.dir.path(),
        )
    }

    /// [`SpireServer::cli`] that must succeed; returns stdout, or panics with both outputs
    /// and the server's log tail.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        if !out.status.success() {
            panic!(
                "{}\n--- spire-server log tail\n{}",
                out.describe(),
                self.log_tail()
            );
        }
        out.stdout
    }

    /// [`SpireServer::cli_ok`] with `-output json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-output", "json"]);
        let out = self.cli_ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("spire-server {a:?} printed no JSON ({e}): {out}"))
    }

    /// Checks the per-item `status` of a batch answer (`entry create/delete`, `bundle set`
    /// with `-output json` exit 0 even when the item failed) and returns the item.
    fn batch_result(&self, what: &str, v: &Value) -> Value {
        let r = &v["results"][0];
        let code = r["status"]["code"].as_i64().unwrap_or(-1);
        if code != 0 {
            panic!(
                "{what} failed: code {code}, {}\n--- spire-server log tail\n{}",
                r["status"]["message"],
                self.log_tail()
            );
        }
        r.clone()
    }

    /// A join token (`token generate`): `spiffe_id` also registers that node alias for the
    /// agent; `ttl_secs` defaults to SPIRE's 600. The agent that uses it gets
    /// [`SpireServer::join_token_agent_id`].
    pub fn generate_token(&self, spiffe_id: Option<&str>, ttl_secs: Option<u64>) -> String {
        let ttl = ttl_secs.map(|t| t.to_string());
        let mut args = vec!["token", "generate"];
        if let Some(id) = spiffe_id {
            args.extend(["-spiffeID", id]);
        }
        if let Some(t) = &ttl {
            args.extend(["-ttl", t]);
        }
        let v = self.cli_json(&args);
        v["value"]
            .as_str()
            .unwrap_or_else(|| panic!("token generate printed no token: {v}"))
            .to_owned()
    }

    /// `spiffe://TD/spire/agent/join_token/<token>`: the ID of an agent attested with `token`.
    pub fn join_token_agent_id(&self, token: &str) -> String {
        format!(
            "spiffe://{}/spire/agent/join_token/{token}",
            self.opts.trust_domain
        )
    }

    /// Creates a registration entry and returns its ID; panics with SPIRE's reason if refused
    /// (e.g. `similar entry already exists`, `unable to find federated bundle`).
    pub fn entry_create(&self, spec: &EntrySpec) -> String {
        let args = spec.args();
        let mut a = vec!["entry", "create"];
        a.extend(args.iter().map(String::as_str));
        let v = self.cli_json(&a);
        let r = self.batch_result(&format!("entry create {args:?}"), &v);
        r["entry"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("entry create printed no entry ID: {v}"))
            .to_owned()
    }

    /// Replaces entry `id` with `spec` (`entry update`: every field is set, as in create).
    pub fn entry_update(&self, id: &str, spec: &EntrySpec) {
        let spec = EntrySpec {
            entry_id: Some(id.to_owned()),
            ..spec.clone()
        };
        let args = spec.args();
        let mut a = vec!["entry", "update"];
        a.extend(args.iter().map(String::as_str));
        let v = self.cli_json(&a);
        self.batch_result(&format!("entry update {args:?}"), &v);
    }

    /// Deletes entry `id`; panics if SPIRE refuses (e.g. `entry not found`).
    pub fn entry_delete(&self, id: &str) {
        let v = self.cli_json(&["entry", "delete", "-entryID", id]);
        self.batch_result(&format!("entry delete {id}"), &v);
    }

    /// Every registration entry as SPIRE's JSON (`entry show -output json`'s `entries`): each
    /// has `id`, `spiffe_id` and `parent_id` (`{trust_domain, path}`), `selectors`
    /// (`[{type, value}]`), `hint`, `federates_with`, `revision_number`, ...
    pub fn entry_show_all(&self) -> Vec<Value> {
        let v = self.cli_json(&["entry", "show"]);
        v["entries"].as_array().cloned().unwrap_or_default()
    }

    /// The attested agents (`agent list`), banned ones included.
    pub fn agent_list(&self) -> Vec<AttestedAgent> {
        let v = self.cli_json(&["agent", "list"]);
        v["agents"]
            .as_array()
            .map(|agents| {
                agents
                    .iter()
                    .map(|a| AttestedAgent {
                        id: json_spiffe_id(&a["id"]),
                        attestation_type: a["attestation_type"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        banned: a["banned"].as_bool().unwrap_or_default(),
                        can_reattest: a["can_reattest"].as_bool().unwrap_or_default(),
                        serial_number: a["x509svid_serial_number"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        expires_at: json_i64(&a["x509svid_expires_at"]),
                        selectors: a["selectors"]
                            .as_array()
                            .map(|s| {
                                s.iter()
                                    .map(|s| {
                                        format!(
                                            "{}:{}",
                                            s["type"].as_str().unwrap_or_default(),
                                            s["value"].as_str().unwrap_or_default()
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The attested agent with this ID, if the server knows it.
    pub fn agent(&self, agent_id: &str) -> Option<AttestedAgent> {
        self.agent_list().into_iter().find(|a| a.id == agent_id)
    }

    /// Bans an agent (`agent ban`): its next call is refused; spire-agent then exits.
    pub fn agent_ban(&self, agent_id: &str) {
        self.cli_ok(&["agent", "ban", "-spiffeID", agent_id]);
    }

    /// Evicts an agent (`agent evict`): it disappears from the list and must attest again
    /// (a join-token agent cannot).
    pub fn agent_evict(&self, agent_id: &str) {
        self.cli_ok(&["agent", "evict", "-spiffeID", agent_id]);
    }

    /// The trust domain's X.509 authorities, PEM (`bundle show`).
    pub fn bundle_pem(&self) -> String {
        self.cli_ok(&["bundle", "show", "-format", "pem"])
    }

    /// The trust domain's bundle in `format` (`bundle show -format`).
    pub fn bundle(&self, format: BundleFormat) -> String {
        self.cli_ok(&["bundle", "show", "-format", format.flag()])
    }

    /// Writes the bundle in `format` to `path` (e.g. an agent's `trust_bundle_path`).
    pub fn write_bundle(&self, path: &Path, format: BundleFormat) {
        fs::write(path, self.bundle(format))
            .unwrap_or_else(|e| panic!("write the bundle to {}: {e}", path.display()));
    }

    /// The bundle as SPIRE's JSON (`bundle show -output json`): `x509_authorities`
    /// (`[{asn1 (base64 DER), tainted}]`), `jwt_authorities` (`[{key_id, public_key,
    /// expires_at, tainted}]`), `sequence_number`, `refresh_hint`.
    pub fn bundle_json(&self) -> Value {
        self.cli_json(&["bundle", "show"])
    }

    /// Sets the bundle of a federated trust domain (`bundle set -id spiffe://TD -format F`), so
    /// entries may name it in `federates_with`. `trust_domain` may carry `spiffe://` or not;
    /// `data` is PEM certificates or a SPIFFE bundle (e.g. another server's
    /// [`SpireServer::bundle`]).
    pub fn bundle_set(&self, trust_domain: &str, data: &str, format: BundleFormat) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join("files").join(format!("bundle-{n}"));
        fs::write(&path, data).expect("write the bundle file");
        let id = td_id(trust_domain);
        let path_s = path.display().to_string();
        let v = self.cli_json(&[
            "bundle",
            "set",
            "-id",
            &id,
            "-format",
            format.flag(),
            "-path",
            &path_s,
        ]);
        self.batch_result(&format!("bundle set {id}"), &v);
    }

    /// Deletes a federated bundle (`bundle delete -mode dissociate`: entries that federate with
    /// it lose the relationship instead of blocking the delete).
    pub fn bundle_delete(&self, trust_domain: &str) {
        let id = td_id(trust_domain);
        self.cli_ok(&["bundle", "delete", "-id", &id, "-mode", "dissociate"]);
    }

    /// The federated bundles the server holds (`bundle list -output json`'s `bundles`).
    pub fn bundle_list(&self) -> Vec<Value> {
        let v = self.cli_json(&["bundle", "list"]);
        v["bundles"].as_array().cloned().unwrap_or_default()
    }

    fn authority_answer(&self, kind: AuthorityKind, args: &[&str]) -> AuthorityInfo {
        let mut a = vec!["localauthority", kind.word()];
        a.extend(args);
        let v = self.cli_json(&a);
        // The answer is one object keyed by what happened: `prepared_authority`,
        // `activated_authority`, `tainted_authority`, `revoked_authority`.
        v.as_object()
            .and_then(|o| o.values().find_map(AuthorityInfo::from_json))
            .unwrap_or_else(|| panic!("localauthority {a:?} printed no authority: {v}"))
    }

    /// The local authorities (`localauthority x509|jwt show`).
    pub fn authority_show(&self, kind: AuthorityKind) -> LocalAuthorities {
        let v = self.cli_json(&["localauthority", kind.word(), "show"]);
        LocalAuthorities {
            active: AuthorityInfo::from_json(&v["active"]),
            prepared: AuthorityInfo::from_json(&v["prepared"]),
            old: AuthorityInfo::from_json(&v["old"]),
        }
    }

    /// Prepares the next authority (`prepare`): its key joins the bundle at once; returns it.
    /// Preparing again replaces the prepared one in `show`, but both keys stay in the bundle.
    pub fn authority_prepare(&self, kind: AuthorityKind) -> AuthorityInfo {
        self.authority_answer(kind, &["prepare"])
    }

    /// Makes the prepared authority `id` the active one (`activate`); the active one becomes
    /// `old`. Give agents a sync (spire-agent: 5 s) between `prepare` and `activate`: an agent
    /// that has not yet fetched the prepared CA cannot verify a server whose SVID the new CA
    /// signed (after a server restart, say), and spire-agent v1.13.3 then exits ("x509: certificate
    /// signed by unknown authority", a "non-recoverable" sync error).
    pub fn authority_activate(&self, kind: AuthorityKind, id: &str) -> AuthorityInfo {
        self.authority_answer(kind, &["activate", "-authorityID", id])
    }

    /// Marks the old authority `id` tainted (`taint`): the bundle keeps it with `tainted: true`,
    /// and agents must replace everything it signed. Only the `old` authority can be tainted.
    pub fn authority_taint(&self, kind: AuthorityKind, id: &str) -> AuthorityInfo {
        self.authority_answer(kind, &["taint", "-authorityID", id])
    }

    /// Removes the tainted old authority `id` from the bundle (`revoke`).
    pub fn authority_revoke(&self, kind: AuthorityKind, id: &str) -> AuthorityInfo {
        self.authority_answer(kind, &["revoke", "-authorityID", id])
    }

    // ------------------------------------------------------------------------------ x509pop

    /// The x509pop CA certificate, PEM (the server's `ca_bundle_path`).
    pub fn x509pop_ca_pem(&self) -> &str {
        &self.ca.pem
    }

    /// The file holding [`SpireServer::x509pop_ca_pem`].
    pub fn x509pop_ca_path(&self) -> &Path {
        &self.ca.path
    }

    /// A node certificate for x509pop attestation, signed by this server's x509pop CA: P-256,
    /// CN `cn`, KeyUsage digitalSignature (critical), EKU clientAuth, CA:FALSE, PKCS#8 key.
    pub fn x509pop_node_cert(&self, cn: &str) -> NodeCert {
        self.x509pop_node_cert_with(cn, &NodeCertOptions::default())
    }

    /// [`SpireServer::x509pop_node_cert`] with options: SEC1 key, an intermediate CA, validity.
    pub fn x509pop_node_cert_with(&self, cn: &str, opts: &NodeCertOptions) -> NodeCert {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let nodes = self.dir.path().join("nodes");
        let base = format!(
            "{n}-{}",
            cn.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );

        let intermediate = opts.via_intermediate.then(|| {
            let mut params = CertificateParams::new(vec![]).expect("intermediate params");
            params
                .distinguished_name
                .push(DnType::CommonName, format!("x509pop intermediate {n}"));
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.use_authority_key_identifier_extension = true;
            set_validity(&mut params, None, None);
            let key = KeyPair::generate().expect("generate a P-256 key");
            let cert = params
                .signed_by(&key, &self.ca.issuer)
                .expect("sign the intermediate");
            let path = nodes.join(format!("{base}-intermediate.pem"));
            fs::write(&path, cert.pem()).expect("write the intermediate");
            (Issuer::new(params, key), path)
        });

        let mut params = CertificateParams::new(vec![]).expect("node params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, opts.not_before, opts.not_after);
        let key = KeyPair::generate().expect("generate a P-256 key");
        let issuer = intermediate.as_ref().map_or(&self.ca.issuer, |(i, _)| i);
        let cert = params.signed_by(&key, issuer).expect("sign the node cert");

        let cert_path = nodes.join(format!("{base}.pem"));
        fs::write(&cert_path, cert.pem()).expect("write the node cert");
        let key_path = nodes.join(format!("{base}.key"));
        let key_pem = if opts.sec1_key {
            let pkcs8 = Zeroizing::new(key.serialize_der());
            pem_encode(
                "EC PRIVATE KEY",
                &p256_sec1_der(&pkcs8, key.public_key_raw()),
            )
        } else {
            Zeroizing::new(key.serialize_pem())
        };
        fs::write(&key_path, key_pem.as_bytes()).expect("write the node key");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))
            .expect("chmod the node key");

        let cert_der = cert.der().to_vec();
        let fingerprint = sha1_hex(&cert_der);
        NodeCert {
            agent_id: format!(
                "spiffe://{}/spire/agent/x509pop/{fingerprint}",
                self.opts.trust_domain
            ),
            cert_path,
            key_path,
            intermediates_path: intermediate.map(|(_, p)| p),
            cn: cn.to_owned(),
            cert_der,
            fingerprint,
        }
    }
}

impl Drop for SpireServer {
    fn drop(&mut self) {
        self.proc.kill();
        keep_dir_if_panicking(&mut self.dir, "spire-server dir");
    }
}

// --------------------------------------------------------------------------------------- agent

/// How a [`SpireAgent`] attests to the server.
#[derive(Clone, Debug)]
pub enum AgentAttestation {
    /// `join_token`, with this token (from [`SpireServer::generate_token`]).
    JoinToken(String),
    /// `x509pop`, with this node certificate (from [`SpireServer::x509pop_node_cert`]).
    X509Pop(NodeCert),
}

/// How to run a [`SpireAgent`] beyond the defaults.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Wait until `spire-agent healthcheck` passes (default); `false` returns once the process
    /// is started, for agents expected to fail (a used token, a banned node).
    pub wait_healthy: bool,
    /// `insecure_bootstrap = true` instead of `trust_bundle_path`.
    pub insecure_bootstrap: bool,
    /// Also serve the admin API on `admin.sock` in the agent's directory.
    pub admin_socket: bool,
    /// Lines added inside `agent { }`.
    pub extra_agent_config: Vec<String>,
    /// Lines added inside `plugins { }`.
    pub extra_plugins: Vec<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            wait_healthy: true,
            insecure_bootstrap: false,
            admin_socket: false,
            extra_agent_config: vec![],
            extra_plugins: vec![],
        }
    }
}

/// A running `spire-agent` attached to a [`SpireServer`], in its own temp directory; killed on
/// drop. Its directory holds `agent.conf`, `agent.log`, `bootstrap.pem`, `data/` and `api.sock`
/// (the Workload API).
pub struct SpireAgent {
    bin: PathBuf,
    socket: PathBuf,
    admin_socket: Option<PathBuf>,
    config: PathBuf,
    data_dir: PathBuf,
    agent_id: String,
    join_token: Option<String>,
    proc: Proc,
    // Last: removed after the process is killed.
    dir: tempfile::TempDir,
}

impl fmt::Debug for SpireAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpireAgent")
            .field("agent_id", &self.agent_id)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl SpireAgent {
    /// Starts `spire-agent run` against `server` with the server's current bundle as
    /// `trust_bundle_path`, the `disk` key manager and the `unix` workload attestor
    /// (`discover_workload_path = true`), and waits until `spire-agent healthcheck` passes (it
    /// has attested and synced); panics with both logs' tails otherwise.
    pub fn start(server: &SpireServer, attestation: AgentAttestation) -> Self {
        Self::start_with(server, attestation, AgentOptions::default())
    }

    /// [`SpireAgent::start`] with options.
    pub fn start_with(
        server: &SpireServer,
        attestation: AgentAttestation,
        opts: AgentOptions,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("spire-agent-")
            .tempdir()
            .expect("create the agent's temp dir");
        let socket = dir.path().join("api.sock");
        check_socket_path(&socket);
        let admin_socket = opts.admin_socket.then(|| dir.path().join("admin.sock"));
        let data_dir = dir.path().join("data");
        fs::create_dir_all(&data_dir).expect("create the agent's data dir");
        let bundle = dir.path().join("bootstrap.pem");
        server.write_bundle(&bundle, BundleFormat::Pem);

        let mut agent = vec![
            format!("data_dir = \"{}\"", data_dir.display()),
            "log_level = \"DEBUG\"".to_owned(),
            format!("server_address = \"{}\"", server.host()),
            format!("server_port = \"{}\"", server.port()),
            format!("socket_path = \"{}\"", socket.display()),
            format!("trust_domain = \"{}\"", server.trust_domain()),
        ];
        if opts.insecure_bootstrap {
            agent.push("insecure_bootstrap = true".to_owned());
        } else {
            agent.push(format!("trust_bundle_path = \"{}\"", bundle.display()));
        }
        if let Some(a) = &admin_socket {
            check_socket_path(a);
            agent.push(format!("admin_socket_path = \"{}\"", a.display()));
        }
        agent.extend(opts.extra_agent_config.iter().cloned());

        let (attestor, agent_id, join_token) = match &attestation {
            AgentAttestation::JoinToken(t) => (
                "NodeAttestor \"join_token\" {\n    plugin_data {}\n  }".to_owned(),
                server.join_token_agent_id(t),
                Some(t.clone()),
            ),
            AgentAttestation::X509Pop(node) => {
                let mut data = vec![
                    format!("certificate_path = \"{}\"", node.cert_path.display()),
                    format!("private_key_path = \"{}\"", node.key_path.display()),
                ];
                if let Some(i) = &node.intermediates_path {
                    data.push(format!("intermediates_path = \"{}\"", i.display()));
                }
                (
                    format!(
                        "NodeAttestor \"x509pop\" {{\n    plugin_data {{\n      {}\n    }}\n  }}",
                        data.join("\n      ")
                    ),
                    node.agent_id.clone(),
                    None,
                )
            }
        };
        let mut plugins = vec![
            attestor,
            format!(
                "KeyManager \"disk\" {{\n    plugin_data {{\n      directory = \"{}\"\n    }}\n  }}",
                data_dir.display()
            ),
            "WorkloadAttestor \"unix\" {\n    plugin_data {\n      discover_workload_path = true\n    }\n  }"
                .to_owned(),
        ];
        plugins.extend(opts.extra_plugins.iter().cloned());
        let config = dir.path().join("agent.conf");
        fs::write(
            &config,
            format!(
                "agent {{\n  {}\n}}\n\nplugins {{\n  {}\n}}\n",
                agent.join("\n  "),
                plugins.join("\n  ")
            ),
        )
        .expect("write agent.conf");

        let mut a = Self {
            bin: server.bins.agent.clone(),
            proc: Proc::new("spire-agent", dir.path().join("agent.log")),
            socket,
            admin_socket,
            config,
            data_dir,
            agent_id,
            join_token,
            dir,
        };
        a.spawn(server, opts.wait_healthy);
        a
    }

    fn spawn(&mut self, server: &SpireServer, wait_healthy: bool) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run").arg("-config").arg(&self.config);
        if let Some(t) = &self.join_token {
            cmd.arg("-joinToken").arg(t);
        }
        self.proc.spawn(&mut cmd);
        if !wait_healthy {
            return;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.proc.exited() {
                self.proc.child = None;
                panic!(
                    "spire-agent exited with {status} before it was healthy (config {}); agent log tail:\n{}\n--- spire-server log tail\n{}",
                    self.config.display(),
                    log_tail(&self.proc.log, LOG_TAIL_LINES),
                    server.log_tail()
                );
            }
            if self.healthy() {
                return;
            }
            if Instant::now() > deadline {
                self.proc.kill();
                panic!(
                    "spire-agent was not healthy within {START_TIMEOUT:?} (config {}); agent log tail:\n{}\n--- spire-server log tail\n{}",
                    self.config.display(),
                    log_tail(&self.proc.log, LOG_TAIL_LINES),
                    server.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `spire-agent healthcheck` passes now.
    pub fn healthy(&self) -> bool {
        self.socket.exists()
            && run_bounded(
                Command::new(&self.bin)
                    .args(["healthcheck", "-socketPath"])
                    .arg(&self.socket),
                CLI_TIMEOUT,
                self.dir.path(),
            )
            .status
            .success()
    }

    /// The agent's SPIFFE ID as the server will record it (known before it attests).
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The Workload API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The admin API socket, if [`AgentOptions::admin_socket`] was set.
    pub fn admin_socket_path(&self) -> Option<&Path> {
        self.admin_socket.as_deref()
    }

    /// The temp directory holding everything of this agent.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's `data_dir` (its SVID, bundle and keys).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `agent.conf`.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The agent's log (DEBUG level, across restarts).
    pub fn log_path(&self) -> &Path {
        &self.proc.log
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.proc.log).unwrap_or_default()
    }

    /// The process ID; panics if it is not running.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Whether the process is alive (spire-agent exits when it is banned, or when it cannot
    /// reach the server at start).
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// SIGKILL, and reap (no-op if not running).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM, and waits for the exit; returns the status.
    pub fn stop(&mut self) -> ExitStatus {
        self.proc.stop()
    }

    /// Starts it again on the same config and data directory (it reuses its stored SVID), and
    /// waits until it is healthy if `wait_healthy`.
    pub fn restart(&mut self, server: &SpireServer, wait_healthy: bool) {
        if self.proc.is_running() {
            self.proc.stop();
        }
        self.proc.child = None;
        self.spawn(server, wait_healthy);
    }

    /// [`fetch_x509`] on this agent's socket.
    pub fn fetch_x509(&self) -> Result<X509Fetch, String> {
        fetch_x509(&self.socket)
    }

    /// [`fetch_x509_ids`] on this agent's socket.
    pub fn fetch_x509_ids(&self) -> Result<Vec<String>, String> {
        fetch_x509_ids(&self.socket)
    }
}

impl Drop for SpireAgent {
    fn drop(&mut self) {
        self.proc.kill();
        keep_dir_if_panicking(&mut self.dir, "spire-agent dir");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sec1_key_wraps_the_pkcs8_scalar_with_the_curve() {
        let key = KeyPair::generate().unwrap();
        let pkcs8 = key.serialize_der();
        let sec1 = p256_sec1_der(&pkcs8, key.public_key_raw());
        assert_eq!(sec1.len(), 121);
        assert_eq!(sec1[1] as usize, sec1.len() - 2, "outer length");
        // The same scalar as in the PKCS#8 document.
        let scalar = &sec1[7..39];
        assert!(pkcs8.windows(32).any(|w| w == scalar));
        assert_eq!(&sec1[sec1.len() - 65..], key.public_key_raw());
        let pem = pem_encode("EC PRIVATE KEY", &sec1);
        assert!(pem.starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
    }

    #[test]
    fn entry_spec_flags() {
        let mut spec = EntrySpec::workload(
            "spiffe://example.org/spire/agent/join_token/t",
            "spiffe://example.org/w",
            &["unix:uid:0", "unix:gid:0"],
        );
        spec.federates_with = vec!["other.org".into()];
        spec.hint = Some("h".into());
        spec.admin = true;
        let a = spec.args();
        let joined = a.join(" ");
        assert!(joined.contains("-parentID spiffe://example.org/spire/agent/join_token/t"));
        assert!(joined.contains("-selector unix:uid:0 -selector unix:gid:0"));
        assert!(joined.contains("-federatesWith spiffe://other.org"));
        assert!(joined.contains("-hint h"));
        assert!(a.iter().any(|x| x == "-admin"));
        assert!(!a.iter().any(|x| x == "-node" || x == "-downstream"));
        let alias = EntrySpec::node_alias("spiffe://example.org/n", &["x509pop:subject:cn:n"]);
        assert!(alias.args().iter().any(|x| x == "-node"));
        assert!(!alias.args().iter().any(|x| x == "-parentID"));
    }

    #[test]
    fn sha1_matches_a_known_vector() {
        assert_eq!(sha1_hex(b"abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
    }
}
