//! Test helpers for spiffed: start the real binary on a temporary socket, talk to it with a raw
//! Workload API client, and run peer processes for attestation tests; [`doubles`] holds test
//! doubles of the core seams (issuer, attestor) and a server harness for them; [`spire`] runs a
//! real SPIRE Server (and SPIRE's agent) for the agent-mode tests.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support"
)]

pub mod doubles;
pub mod fleet;
pub mod spire;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use spiffed_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// A running `spiffed run` process on a private temp directory; stopped with SIGTERM on drop.
pub struct Agent {
    /// The temp directory holding config, socket and data.
    pub dir: tempfile::TempDir,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The stderr log file.
    pub log: PathBuf,
    /// The admin socket.
    pub admin_socket: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
    /// Runs the agent as this uid and gid (through `setpriv`) instead of the test's own.
    run_as: Option<u32>,
    /// Runs the agent in a mount namespace of its own with this file over `/etc/hosts`.
    hosts_file: Option<PathBuf>,
}

/// The config text for a test agent in `dir`, with `extra` appended (entries, TTLs).
pub fn config_text(dir: &Path, extra: &str) -> String {
    format!(
        "trust_domain = \"example.org\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\ndata_dir = \"{}\"\nlog_level = \"debug\"\n{extra}\n",
        dir.join("api.sock").display(),
        dir.join("admin").join("admin.sock").display(),
        dir.join("data").display(),
    )
}

impl Agent {
    /// Writes a config (see [`config_text`]) and starts `bin run --config` on it, waiting until
    /// the socket accepts connections.
    pub fn start(bin: &Path, extra: &str) -> Self {
        Self::start_with(bin, extra, None)
    }

    /// Like [`Agent::start`], but runs the agent as uid and gid `uid` (`setpriv`, so the test
    /// must run as root); its directory is handed to that uid.
    pub fn start_as(bin: &Path, extra: &str, uid: u32) -> Self {
        Self::start_with(bin, extra, Some(uid))
    }

    /// Starts `bin run` on a config made by `text(dir)` for its own temp dir `dir` (for a
    /// config [`config_text`] cannot make, e.g. another trust domain).
    pub fn start_raw(bin: &Path, text: impl FnOnce(&Path) -> String) -> Self {
        Self::start_text(bin, text, None, None)
    }

    /// Like [`Agent::start`], but runs the agent in a mount namespace of its own (`unshare
    /// -m`, so the test must run as root) where `hosts` is bind-mounted over `/etc/hosts`:
    /// the agent resolves names through getaddrinfo as in production, but with the test's
    /// hosts file, and no other process sees it. `/proc` and the file system stay shared, so
    /// workloads of the test are attested as usual. The file is read at every lookup: the
    /// test may rewrite it (in place) while the agent runs.
    pub fn start_with_hosts(bin: &Path, extra: &str, hosts: &Path) -> Self {
        Self::start_text(
            bin,
            |dir| config_text(dir, extra),
            None,
            Some(hosts.to_owned()),
        )
    }

    fn start_with(bin: &Path, extra: &str, run_as: Option<u32>) -> Self {
        Self::start_text(bin, |dir| config_text(dir, extra), run_as, None)
    }

    fn start_text(
        bin: &Path,
        text: impl FnOnce(&Path) -> String,
        run_as: Option<u32>,
        hosts_file: Option<PathBuf>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Let other uids (setpriv tests) reach the socket.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("spiffed.toml");
        fs::write(&config, text(dir.path())).unwrap();
        if let Some(uid) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
        }
        let mut agent = Self {
            socket: dir.path().join("api.sock"),
            data_dir: dir.path().join("data"),
            log: dir.path().join("spiffed.log"),
            admin_socket: dir.path().join("admin").join("admin.sock"),
            config,
            dir,
            child: None,
            bin: bin.to_owned(),
            run_as,
            hosts_file,
        };
        agent.spawn();
        agent
    }

    /// Starts the process again (after [`Agent::stop`] or a kill) on the same directory.
    pub fn spawn(&mut self) {
        self.spawn_with_args(&[]);
    }

    /// [`Agent::spawn`] with extra arguments after `run --config FILE`.
    pub fn spawn_with_args(&mut self, args: &[&str]) {
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = match (self.run_as, &self.hosts_file) {
            (Some(_), Some(_)) => panic!("an agent runs as another uid or with a hosts file"),
            (None, Some(hosts)) => {
                // unshare and sh exec: the pid is the agent's. A private namespace, so the
                // bind mount is seen by this agent only.
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
                    .arg(hosts)
                    .arg(&self.bin);
                c
            }
            (Some(uid), None) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg(&self.bin);
                c
            }
            (None, None) => Command::new(&self.bin),
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "spiffed exited with {status} before serving:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "spiffed did not serve within 15s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of the running agent.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM, then waits (SIGKILL after 10s). Returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent not running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "spiffed did not stop within 10s of SIGTERM:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the agent logged so far.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// A raw generated Workload API client on a fresh connection.
    pub async fn client(&self) -> SpiffeWorkloadApiClient<Channel> {
        raw_client(&self.socket).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A channel over the Unix socket at `path` (one connection).
pub async fn channel(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

/// An admin API client over the Unix socket at `path`.
pub async fn admin_client(
    path: &Path,
) -> spiffed_proto::admin::entry_admin_client::EntryAdminClient<Channel> {
    spiffed_proto::admin::entry_admin_client::EntryAdminClient::new(channel(path).await)
}

/// A raw generated client over the Unix socket at `path`.
pub async fn raw_client(path: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(channel(path).await)
}

/// Opens a `FetchX509SVID` stream (with the security header) on `client`; panics if the call
/// itself fails (a refusal that arrives as the stream's first item is left to the caller).
pub async fn x509_stream(
    client: &mut SpiffeWorkloadApiClient<Channel>,
) -> tonic::Streaming<spiffed_proto::workload::X509svidResponse> {
    client
        .fetch_x509svid(with_header(spiffed_proto::workload::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner()
}

/// Wraps a message in a request that carries the security header.
pub fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// The uid the tests run as.
pub fn my_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Runs `cmd` to the end; panics with its status, stdout and stderr unless it succeeds.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
