//! A fleet on a highly available SPIRE Server, on this one machine: a PostgreSQL cluster of its
//! own, several spire-server v1.13.3 instances sharing its database on different loopback
//! addresses (127.0.0.2, 127.0.0.3, ...) and one port, a DNS name that resolves to all of them
//! for the spiffed agents only, and spiffed agents in agent mode, each attested with its own
//! join token.
//!
//! - [`Postgres::start`] runs Debian's PostgreSQL (`/usr/lib/postgresql/*/bin`) as the
//!   `postgres` system user (or `nobody`; PostgreSQL refuses root) in a temp directory:
//!   `initdb`, then `postgres` listening on 127.0.0.1 only, on a free port, with its Unix socket
//!   in that directory, and a database `spire`. Stopped and removed on drop, also when a test
//!   panics.
//! - [`Fleet::start`] starts the cluster and the servers ([`SpireServer`] with
//!   [`DataStore::Postgres`]). What HA servers share, as SPIRE v1.13.3 does it: the datastore
//!   only. Each server keeps its own CA (its own `disk` key manager) and appends its X.509 CA
//!   and JWT key to the trust domain's bundle in the shared database
//!   (`pkg/server/ca/manager/manager.go` `appendBundle`; `doc/scaling_spire.md`: "each server
//!   maintains its own Certificate Authority"), so the bundle holds one authority per server
//!   and an SVID from either verifies with it. The fleet waits until it does, then writes the
//!   agents' bootstrap bundle.
//! - The name ([`FleetOptions::dns_name`], `spire.fleet.test`) resolves to every server in
//!   [`Fleet::hosts_file`], which [`Fleet::start_agent`] bind-mounts over `/etc/hosts` in the
//!   agent's own mount namespace (see [`Agent::start_with_hosts`]): spiffed resolves it with
//!   getaddrinfo, unchanged, and nothing else on the machine sees the name.
//! - [`tcp_peers`] says which servers a process is connected to (from `/proc`), so a test can
//!   see which server each agent talks to.
//!
//! Everything must run as root (the mount namespaces, the switch to the `postgres` user).
//! All calls block.
//!
//! ```no_run
//! use spiffed_test_support::fleet::{Fleet, FleetOptions};
//! use spiffed_test_support::spire::EntrySpec;
//! let fleet = Fleet::start(FleetOptions::default());
//! let node = fleet.start_agent(std::path::Path::new("target/debug/spiffed"), "");
//! fleet
//!     .any_server()
//!     .entry_create(&EntrySpec::workload(&node.agent_id, "spiffe://example.org/w", &["unix:uid:0"]));
//! println!("node 0 talks to {:?}", fleet.servers_of(node.agent.pid()));
//! ```

use std::fmt;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Agent;
use crate::spire::{BundleFormat, DataStore, ServerOptions, SpireServer, log_tail, poll_until};

/// How long PostgreSQL may take to accept connections.
const PG_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long PostgreSQL may take to stop after SIGINT (fast shutdown) before it is killed.
const PG_STOP_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------- postgres

/// The directory of Debian's PostgreSQL server binaries (`/usr/lib/postgresql/N/bin`, the
/// highest N with `initdb`, `postgres` and `createdb`); panics naming the fix when there is
/// none.
pub fn postgres_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            ["initdb", "postgres", "createdb", "pg_isready"]
                .iter()
                .all(|b| bin.join(b).is_file())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "the fleet tests need PostgreSQL's server binaries in /usr/lib/postgresql/*/bin \
             (initdb, postgres, createdb, pg_isready), and there are none: install Debian's \
             package with `apt-get install -y postgresql` (.ci/run does this; the tests start \
             a private cluster, never the system one)"
        ),
    }
}

/// A non-root system user for PostgreSQL: (name, uid, gid); `postgres` if it exists, else
/// `nobody`.
fn pg_user() -> (String, u32, u32) {
    for name in ["postgres", "nobody"] {
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").arg(flag).arg(name).output().ok()?;
            if !out.status.success() {
                return None;
            }
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        if let (Some(uid), Some(gid)) = (id("-u"), id("-g")) {
            return (name.to_owned(), uid, gid);
        }
    }
    panic!("neither the `postgres` nor the `nobody` user exists to run PostgreSQL as")
}

/// A private PostgreSQL cluster on 127.0.0.1, with the database `spire` (user `spire`, trust
/// authentication, so no password); stopped and removed on drop.
pub struct Postgres {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
    user: (String, u32, u32),
    // Last: removed after the server stopped.
    dir: tempfile::TempDir,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Postgres {
    /// The database the fleet's servers share.
    pub const DATABASE: &'static str = "spire";
    /// The cluster's superuser (trust authentication on 127.0.0.1).
    pub const USER: &'static str = "spire";

    /// `initdb` into a temp directory, start `postgres` on 127.0.0.1 and a free port (its
    /// socket in the directory, durability off: a test cluster), wait until it accepts
    /// connections and create the database `spire`. Panics with the log when a step fails.
    pub fn start() -> Self {
        let bin = postgres_bin_dir();
        let user = pg_user();
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir()
            .expect("create the PostgreSQL temp dir");
        std::os::unix::fs::chown(dir.path(), Some(user.1), Some(user.2))
            .expect("hand the PostgreSQL dir to its user");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .expect("chmod the PostgreSQL dir");
        let mut pg = Self {
            bin,
            port: 0,
            child: None,
            log: dir.path().join("postgres.log"),
            user,
            dir,
        };
        let data = pg.data_dir();
        let out = pg
            .as_user(&pg.bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                Self::USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb -D {} failed ({}):\n{}{}",
            data.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A free port may be taken between the probe and the bind: try others.
        for attempt in 1.. {
            pg.port = crate::spire::free_port();
            match pg.spawn_and_wait() {
                Ok(()) => break,
                Err(e) if attempt < 4 && e.contains("already in use") => {}
                Err(e) => panic!("{e}"),
            }
        }
        let out = Command::new(pg.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                Self::USER,
            ])
            .arg(Self::DATABASE)
            .output()
            .expect("run createdb");
        assert!(
            out.status.success(),
            "createdb {} failed ({}): {}; PostgreSQL log:\n{}",
            Self::DATABASE,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            log_tail(&pg.log, 40)
        );
        pg
    }

    /// A command running `program` as the cluster's user, in its directory.
    fn as_user(&self, program: &Path) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.user.1))
            .arg(format!("--regid={}", self.user.2))
            .arg("--clear-groups")
            .arg(program)
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        c
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the PostgreSQL log");
        let child = self
            .as_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=32MB",
            ])
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}/postgres: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + PG_START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "postgres exited with {status} before accepting connections; log:\n{}",
                    log_tail(&self.log, 40)
                ));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "postgres did not accept connections within {PG_START_TIMEOUT:?}; log:\n{}",
                    log_tail(&self.log, 40)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The connection string of the `spire` database, as SPIRE's `sql` datastore takes it.
    pub fn connection_string(&self) -> String {
        format!(
            "dbname={} user={} host=127.0.0.1 port={} sslmode=disable",
            Self::DATABASE,
            Self::USER,
            self.port
        )
    }

    /// Stops the server (SIGINT, a fast shutdown; SIGKILL after 15 s). No-op if stopped.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
            let deadline = Instant::now() + PG_STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!(
                    "PostgreSQL log tail ({}):\n{}\n",
                    self.log.display(),
                    log_tail(&self.log, 20)
                )
                .as_bytes(),
            );
        }
    }
}

// ------------------------------------------------------------------------------------- fleet

/// How to run a [`Fleet`].
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// How many spire-server instances (default 2); server `i` binds `127.0.0.{i + 2}`.
    pub servers: usize,
    /// The name that resolves to every server, for the agents (default `spire.fleet.test`).
    pub dns_name: String,
    /// The servers' options: trust domain, lifetimes, extra config. The bind address, port
    /// and datastore are the fleet's.
    pub server: ServerOptions,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            servers: 2,
            dns_name: "spire.fleet.test".to_owned(),
            server: ServerOptions::default(),
        }
    }
}

/// A spiffed agent of a [`Fleet`].
pub struct FleetAgent {
    /// The spiffed process (its own temp dir: config, data dir, socket, admin socket, log).
    pub agent: Agent,
    /// Its SPIFFE ID on the servers (`spiffe://TD/spire/agent/join_token/<token>`), the parent
    /// of its entries.
    pub agent_id: String,
}

impl fmt::Debug for FleetAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetAgent")
            .field("agent_id", &self.agent_id)
            .field("dir", &self.agent.dir.path())
            .finish_non_exhaustive()
    }
}

/// PostgreSQL, the servers sharing it, and the name resolving to them; everything stopped on
/// drop (servers first). The agents are the caller's ([`Fleet::start_agent`]).
pub struct Fleet {
    servers: Vec<SpireServer>,
    running: Vec<bool>,
    postgres: Postgres,
    opts: FleetOptions,
    port: u16,
    hosts: PathBuf,
    bootstrap: PathBuf,
    // Last.
    dir: tempfile::TempDir,
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("address", &self.address())
            .field("servers", &self.servers)
            .field("postgres", &self.postgres)
            .finish_non_exhaustive()
    }
}

/// A port free on every one of `ips` a moment ago.
fn port_free_on(ips: &[IpAddr]) -> u16 {
    poll_until(
        Duration::from_secs(10),
        "a port free on every server address",
        || {
            let port = crate::spire::free_port();
            ips.iter()
                .all(|ip| TcpListener::bind((*ip, port)).is_ok())
                .then_some(port)
        },
    )
}

impl Fleet {
    /// Starts PostgreSQL, then the servers one after the other on the same port, and waits
    /// until the shared bundle holds every server's CA; writes the hosts file and the agents'
    /// bootstrap bundle. Panics with the logs if anything fails.
    pub fn start(opts: FleetOptions) -> Self {
        assert!(
            (1..=250).contains(&opts.servers),
            "a fleet has 1 to 250 servers"
        );
        let dir = tempfile::Builder::new()
            .prefix("fleet-")
            .tempdir()
            .expect("create the fleet's temp dir");
        let postgres = Postgres::start();
        let ips: Vec<IpAddr> = (0..opts.servers)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, (i + 2) as u8)))
            .collect();
        let port = port_free_on(&ips);
        let servers: Vec<SpireServer> = ips
            .iter()
            .map(|ip| {
                SpireServer::start(ServerOptions {
                    bind_address: ip.to_string(),
                    port: Some(port),
                    datastore: DataStore::Postgres {
                        connection_string: postgres.connection_string(),
                    },
                    ..opts.server.clone()
                })
            })
            .collect();
        // Every server has appended its CA to the shared bundle.
        let pem = poll_until(
            Duration::from_secs(30),
            "the shared bundle to hold one X.509 authority per server",
            || {
                let pem = servers[0].bundle_pem();
                (pem.matches("BEGIN CERTIFICATE").count() >= servers.len()).then_some(pem)
            },
        );
        let bootstrap = dir.path().join("bootstrap.pem");
        fs::write(&bootstrap, pem).expect("write the bootstrap bundle");
        let hosts = dir.path().join("hosts");
        let mut text = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n".to_owned();
        for ip in &ips {
            text.push_str(&format!("{ip} {}\n", opts.dns_name));
        }
        fs::write(&hosts, text).expect("write the fleet's hosts file");
        fs::set_permissions(&hosts, fs::Permissions::from_mode(0o644))
            .expect("chmod the hosts file");
        Self {
            running: vec![true; servers.len()],
            servers,
            postgres,
            opts,
            port,
            hosts,
            bootstrap,
            dir,
        }
    }

    /// `NAME:PORT`, what the agents dial (`[spire_server] address`).
    pub fn address(&self) -> String {
        format!("{}:{}", self.opts.dns_name, self.port)
    }

    /// The servers, in address order (server `i` on `127.0.0.{i + 2}`).
    pub fn servers(&self) -> &[SpireServer] {
        &self.servers
    }

    /// Server `i`.
    pub fn server(&self, i: usize) -> &SpireServer {
        &self.servers[i]
    }

    /// The address server `i` listens on.
    pub fn server_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(
            self.servers[i]
                .host()
                .parse()
                .expect("a server binds an IP address"),
            self.port,
        )
    }

    /// Which server listens on `addr`, if one does.
    pub fn server_index(&self, addr: SocketAddr) -> Option<usize> {
        (0..self.servers.len()).find(|i| self.server_addr(*i) == addr)
    }

    /// The indices of the servers process `pid` has established TCP connections to (sorted,
    /// without repeats).
    pub fn servers_of(&self, pid: u32) -> Vec<usize> {
        let mut v: Vec<usize> = tcp_peers(pid)
            .into_iter()
            .filter_map(|a| self.server_index(a))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// A running server (the first), for CLI calls (the database is shared: any server sees
    /// what another wrote; an entry reaches the other servers' caches within about 5 s).
    pub fn any_server(&self) -> &SpireServer {
        let i = self
            .running
            .iter()
            .position(|r| *r)
            .expect("no server of the fleet is running");
        &self.servers[i]
    }

    /// Whether server `i` runs (as far as the fleet started and killed it).
    pub fn is_running(&self, i: usize) -> bool {
        self.running[i]
    }

    /// SIGKILL to server `i`.
    pub fn kill_server(&mut self, i: usize) {
        self.servers[i].kill();
        self.running[i] = false;
    }

    /// Starts server `i` again (same config, port and keys) and waits until it is healthy.
    pub fn restart_server(&mut self, i: usize) {
        self.servers[i].restart();
        self.running[i] = true;
    }

    /// The hosts file that maps the fleet's name to every server.
    pub fn hosts_file(&self) -> &Path {
        &self.hosts
    }

    /// The bootstrap bundle (PEM; every server's CA).
    pub fn bootstrap_bundle(&self) -> &Path {
        &self.bootstrap
    }

    /// The PostgreSQL cluster.
    pub fn postgres(&self) -> &Postgres {
        &self.postgres
    }

    /// The fleet's temp directory (hosts file, bootstrap bundle).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `bin` (spiffed) in agent mode against the fleet: a fresh join token, the
    /// fleet's name as the server address, the bootstrap bundle, `sync_interval = "1s"`, and
    /// `extra` top-level config lines; in its own mount namespace with the fleet's hosts file
    /// ([`Agent::start_with_hosts`]). Returns once its Workload API socket accepts
    /// connections (it may still be attesting).
    pub fn start_agent(&self, bin: &Path, extra: &str) -> FleetAgent {
        let server = self.any_server();
        let token = server.generate_token(None, None);
        let agent_id = server.join_token_agent_id(&token);
        let agent = Agent::start_with_hosts(
            bin,
            &format!(
                "{extra}\n[spire_server]\naddress = \"{}\"\ntrust_bundle_path = \"{}\"\nsync_interval = \"1s\"\njoin_token = \"{token}\"\n",
                self.address(),
                self.bootstrap.display()
            ),
            &self.hosts,
        );
        FleetAgent { agent, agent_id }
    }

    /// Writes the current shared bundle (every server's CA) to `path`.
    pub fn write_bundle(&self, path: &Path) {
        self.any_server().write_bundle(path, BundleFormat::Pem);
    }
}

// ----------------------------------------------------------------------------------- /proc

/// The remote addresses of the established TCP connections of process `pid` (IPv4 and IPv6,
/// from `/proc/PID/fd` and `/proc/PID/net/tcp{,6}`); empty if the process is gone.
pub fn tcp_peers(pid: u32) -> Vec<SocketAddr> {
    let mut inodes = std::collections::HashSet::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(target) = fs::read_link(fd.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut peers = vec![];
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "01" || !inodes.contains(f[9]) {
                continue;
            }
            if let Some(a) = parse_proc_addr(f[2]) {
                peers.push(a);
            }
        }
    }
    peers
}

/// `0100007F:1F90` (IPv4, the address as a little-endian u32) or the 32-hex-digit IPv6 form
/// (four little-endian u32 words), then the port in hex.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words[..] {
        [w] => IpAddr::V4(Ipv4Addr::from(w.swap_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_parse() {
        assert_eq!(
            parse_proc_addr("0300007F:1F91"),
            Some("127.0.0.3:8081".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("0000000000000000FFFF00000200007F:0050"),
            Some("127.0.0.2:80".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
        assert_eq!(parse_proc_addr("zz"), None);
    }

    #[test]
    fn this_process_sees_its_own_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let _s = l.accept().unwrap();
        assert!(tcp_peers(std::process::id()).contains(&addr));
    }
}
