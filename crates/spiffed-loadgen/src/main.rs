//! The `spiffed-loadgen` command line: see the crate docs of `spiffed_loadgen`.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use spiffed_loadgen::floor;
use spiffed_loadgen::scale::{self, HoldCommand, StreamGroup, UidRange};
use spiffed_loadgen::scenarios::{self, FanoutApi, FanoutReport, RunReport, WarmRpc};
use spiffed_loadgen::stats::ErrorCounts;

/// Load generator for SPIFFE Workload API sockets.
#[derive(Debug, Parser)]
#[command(name = "spiffed-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// The flags `fanout` and `sds-fanout` share.
#[derive(Debug, Args)]
struct FanoutArgs {
    /// The agent's Workload API socket (spiffed and spire-agent serve SDS on it too).
    #[arg(long)]
    socket: PathBuf,
    /// Streams to open.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Connections to spread them over.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// The agent's pid, to sample its RSS and descriptors.
    #[arg(long)]
    agent_pid: Option<u32>,
    /// How long each phase (all ready, all updated) may take.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: Duration,
    /// Exit 0 even on a timeout or failed streams (by default either exits 1).
    #[arg(long)]
    allow_errors: bool,
    /// Client threads, each with its own runtime and its share of the connections (as
    /// separate client processes would be); 0 means one per CPU, and never more than
    /// `--connections`.
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// New connection per iteration: connect, FetchX509SVID first message, close.
    Cold {
        /// The Workload API socket.
        #[arg(long)]
        socket: PathBuf,
        /// Concurrent workers.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Run time in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Also run the same load against a floor server (a child process) and report the ratio.
        #[arg(long)]
        compare_floor: bool,
        /// Exit 0 even when some iterations failed (by default any error, or no success, exits 1).
        #[arg(long)]
        allow_errors: bool,
    },
    /// One connection per worker, repeating one RPC.
    Warm {
        /// The Workload API socket.
        #[arg(long)]
        socket: PathBuf,
        /// Concurrent workers (one connection each).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Run time in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// The RPC to repeat.
        #[arg(long, value_enum, default_value_t = WarmRpc::Jwt)]
        rpc: WarmRpc,
        /// Also run the same load against a floor server (a child process) and report the ratio.
        #[arg(long)]
        compare_floor: bool,
        /// Exit 0 even when some iterations failed (by default any error, or no success, exits 1).
        #[arg(long)]
        allow_errors: bool,
    },
    /// N FetchX509SVID streams over K connections; time until all see the next rotation.
    Fanout {
        #[command(flatten)]
        run: FanoutArgs,
    },
    /// N SDS StreamSecrets streams over K connections (each acknowledged as Envoy does); time
    /// until all see the next rotation. The same figures as `fanout`, scenario `sds_fanout`.
    SdsFanout {
        #[command(flatten)]
        run: FanoutArgs,
        /// The resource names every stream asks for, comma-separated (as Istio: default,ROOTCA).
        #[arg(long, value_delimiter = ',', default_value = "default,ROOTCA")]
        names: Vec<String>,
    },
    /// Cold iterations at a fixed rate, sampling the agent's RSS and descriptors.
    Churn {
        /// The Workload API socket.
        #[arg(long)]
        socket: PathBuf,
        /// Iterations started per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Run time in seconds.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// The agent's pid.
        #[arg(long)]
        agent_pid: u32,
        /// How often to sample the agent.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        sample_every: Duration,
        /// Exit 0 even when some iterations failed (by default any error, or no success, exits 1).
        #[arg(long)]
        allow_errors: bool,
    },
    /// Serve the floor baseline on a socket until interrupted.
    Floor {
        /// The socket to serve on (a stale file is replaced).
        #[arg(long)]
        socket: PathBuf,
        /// Resend the X.509 response on every open stream this often, as if it rotated (for
        /// trying out fanout and partial-rotation).
        #[arg(long, value_parser = humantime::parse_duration)]
        rotate_every: Option<Duration>,
    },
    /// First SVID of never-fetched entries: one child process per uid (run as that uid, so as
    /// root) connects and reads its first FetchX509SVID message; connect-to-message latency.
    FirstFetch {
        /// The Workload API socket.
        #[arg(long)]
        socket: PathBuf,
        /// The uids registered, FIRST-LAST (each with an entry `unix:uid:N`).
        #[arg(long)]
        uids: UidRange,
        /// How many distinct uids to sample, spread evenly over the range.
        #[arg(long, default_value_t = 1000)]
        samples: usize,
        /// Children running at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// The children's gid (default: the same number as each uid).
        #[arg(long)]
        gid: Option<u32>,
        /// How far the agent backdates notBefore (spiffed and SPIRE: 10s), to tell an SVID
        /// minted for the call from a pre-minted one.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        backdate: Duration,
        /// Exit 0 even when some children got no SVID (by default any failure exits 1).
        #[arg(long)]
        allow_errors: bool,
    },
    /// (child of first-fetch) One FetchX509SVID first message; one JSON line.
    #[command(hide = true)]
    FetchOnce {
        /// The Workload API socket.
        #[arg(long)]
        socket: PathBuf,
    },
    /// (child of partial-rotation) Hold streams open; on stdin `mark` prints the message
    /// counts, `stop` (or end of input) exits.
    #[command(hide = true)]
    Hold {
        /// The Workload API socket.
        #[arg(long)]
        socket: PathBuf,
        /// Streams to open.
        #[arg(long)]
        streams: usize,
        /// Connections to spread them over.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// How long the streams may take to get their first message.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        timeout: Duration,
    },
    /// Agent CPU per rotation of a few streams (a short-TTL entry of one uid) while many idle
    /// streams of another uid are open (or none, for the baseline).
    PartialRotation {
        /// The Workload API socket.
        #[arg(long)]
        socket: PathBuf,
        /// The agent's pid (CPU time and RSS are read from /proc).
        #[arg(long)]
        agent_pid: u32,
        /// The uid holding the rotating streams (default: the loadgen's own).
        #[arg(long)]
        rotating_uid: Option<u32>,
        /// Streams of the rotating entry.
        #[arg(long, default_value_t = 100)]
        rotating_streams: usize,
        /// Connections for them.
        #[arg(long, default_value_t = 1)]
        rotating_connections: usize,
        /// The uid holding the idle streams (default: the loadgen's own).
        #[arg(long)]
        idle_uid: Option<u32>,
        /// Idle streams (0: the baseline run without them).
        #[arg(long, default_value_t = 9900)]
        idle_streams: usize,
        /// Connections for them.
        #[arg(long, default_value_t = 99)]
        idle_connections: usize,
        /// The measured window.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
        window: Duration,
        /// Wait after every stream is ready, before measuring.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        settle: Duration,
        /// How long each group's streams may take to be ready.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
        ready_timeout: Duration,
        /// Exit 0 even when streams failed or no rotation was seen.
        #[arg(long)]
        allow_errors: bool,
    },
    /// Time single-entry CreateEntries calls on spiffed's admin socket (a new connection each).
    AdminCreate {
        /// spiffed's admin socket.
        #[arg(long)]
        admin_socket: PathBuf,
        /// Calls (entries) to make.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// The first entry's uid (`unix:uid:N`); the others follow.
        #[arg(long)]
        first_uid: u32,
        /// The trust domain of the SPIFFE IDs (spiffe://TD/scale/admin-create/UID).
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        /// Exit 0 even when some creates failed.
        #[arg(long)]
        allow_errors: bool,
    },
}

/// Writes `value` as one JSON line on stdout.
fn json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Writes a readable line on stderr.
fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).context("--seconds must be a non-negative number")
}

/// A floor server run as a child process of this binary on a private socket; killed on drop.
struct FloorChild {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl FloorChild {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("floor.sock");
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .arg("floor")
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the floor server")?;
        let mut me = Self {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&me.socket).is_err() {
            if let Some(status) = me.child.try_wait()? {
                anyhow::bail!("the floor server exited with {status}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the floor server did not start in 10s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for FloorChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prints a fan-out's JSON line and summary; fails it on a timeout or failed streams unless
/// `allow_errors`.
fn report_fanout(report: &FanoutReport, allow_errors: bool) -> anyhow::Result<()> {
    json_line(report)?;
    say(&report.summary());
    anyhow::ensure!(
        allow_errors || (!report.timed_out && report.errors.is_empty()),
        "not every stream saw a rotation (timed out: {}, errors: {:?})",
        report.timed_out,
        report.errors
    );
    Ok(())
}

fn report_run(
    mut report: RunReport,
    floor: Option<RunReport>,
    allow_errors: bool,
) -> anyhow::Result<()> {
    if let Some(floor) = floor {
        json_line(&FloorLine(&floor))?;
        report.compare_with(&floor);
    }
    json_line(&report)?;
    say(&report.summary());
    verdict(report.ok, &report.errors, allow_errors)
}

/// Fails the run when nothing succeeded or, unless `allow_errors`, anything failed.
fn verdict(ok: u64, errors: &ErrorCounts, allow_errors: bool) -> anyhow::Result<()> {
    let failed: u64 = errors.values().sum();
    anyhow::ensure!(
        ok > 0,
        "no iteration succeeded ({failed} failed: {errors:?})"
    );
    anyhow::ensure!(
        allow_errors || failed == 0,
        "{failed} iterations failed: {errors:?} (pass --allow-errors to accept)"
    );
    Ok(())
}

/// The floor's own result line (`"target":"floor"`).
#[derive(Serialize)]
struct FloorLine<'a>(#[serde(serialize_with = "floor_target")] &'a RunReport);

fn floor_target<S: serde::Serializer>(r: &&RunReport, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Tagged<'a> {
        target: &'static str,
        #[serde(flatten)]
        report: &'a RunReport,
    }
    Tagged {
        target: "floor",
        report: r,
    }
    .serialize(s)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Cold {
            socket,
            concurrency,
            seconds,
            compare_floor,
            allow_errors,
        } => {
            let d = secs(seconds)?;
            let report = scenarios::cold(&socket, concurrency, d).await?;
            let floor = if compare_floor {
                let f = FloorChild::start()?;
                Some(scenarios::cold(f.socket(), concurrency, d).await?)
            } else {
                None
            };
            report_run(report, floor, allow_errors)
        }
        Cmd::Warm {
            socket,
            concurrency,
            seconds,
            rpc,
            compare_floor,
            allow_errors,
        } => {
            let d = secs(seconds)?;
            let report = scenarios::warm(&socket, concurrency, d, rpc).await?;
            let floor = if compare_floor {
                let f = FloorChild::start()?;
                Some(scenarios::warm(f.socket(), concurrency, d, rpc).await?)
            } else {
                None
            };
            report_run(report, floor, allow_errors)
        }
        Cmd::Fanout { run } => fanout(FanoutApi::X509, run).await,
        Cmd::SdsFanout { run, names } => {
            let names = names.into_iter().filter(|n| !n.is_empty()).collect();
            fanout(FanoutApi::Sds { names }, run).await
        }
        Cmd::Churn {
            socket,
            rate,
            seconds,
            agent_pid,
            sample_every,
            allow_errors,
        } => {
            let mut emit_err = None;
            let report = scenarios::churn(
                &socket,
                rate,
                secs(seconds)?,
                agent_pid,
                sample_every,
                |s| {
                    if let Err(e) = json_line(s) {
                        emit_err.get_or_insert(e);
                    }
                },
            )
            .await?;
            if let Some(e) = emit_err {
                return Err(e);
            }
            json_line(&report)?;
            say(&report.summary());
            verdict(report.ok, &report.errors, allow_errors)
        }
        Cmd::Floor {
            socket,
            rotate_every,
        } => {
            let listener =
                floor::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
            let mut f = floor::Floor::new()?;
            if let Some(every) = rotate_every {
                anyhow::ensure!(!every.is_zero(), "--rotate-every must be more than 0s");
                f = f.rotating(every);
            }
            say(&format!("floor serving on {}", socket.display()));
            tokio::select! {
                r = floor::serve_floor(listener, f) => r,
                r = tokio::signal::ctrl_c() => {
                    let _ = std::fs::remove_file(&socket);
                    Ok(r?)
                }
            }
        }
        Cmd::FirstFetch {
            socket,
            uids,
            samples,
            concurrency,
            gid,
            backdate,
            allow_errors,
        } => {
            let report = scale::first_fetch(&scale::FirstFetchOptions {
                socket,
                exe: std::env::current_exe().context("finding this binary")?,
                uids,
                samples,
                concurrency,
                gid,
                switch_uid: true,
                backdate,
            })
            .await?;
            json_line(&report)?;
            say(&report.summary());
            verdict(report.ok, &report.errors, allow_errors)
        }
        Cmd::FetchOnce { socket } => {
            let r = scale::fetch_once(&socket).await;
            json_line(&r)?;
            anyhow::ensure!(r.ok, "no SVID: {}", r.error.as_deref().unwrap_or("?"));
            Ok(())
        }
        Cmd::Hold {
            socket,
            streams,
            connections,
            timeout,
        } => hold_child(&socket, streams, connections, timeout).await,
        Cmd::PartialRotation {
            socket,
            agent_pid,
            rotating_uid,
            rotating_streams,
            rotating_connections,
            idle_uid,
            idle_streams,
            idle_connections,
            window,
            settle,
            ready_timeout,
            allow_errors,
        } => {
            anyhow::ensure!(
                rotating_streams > 0,
                "--rotating-streams must be at least 1"
            );
            let report = scale::partial_rotation(&scale::PartialRotationOptions {
                socket,
                exe: std::env::current_exe().context("finding this binary")?,
                agent_pid,
                rotating: StreamGroup {
                    uid: rotating_uid,
                    streams: rotating_streams,
                    connections: rotating_connections,
                },
                idle: Some(StreamGroup {
                    uid: idle_uid,
                    streams: idle_streams,
                    connections: idle_connections,
                }),
                window,
                settle,
                ready_timeout,
            })
            .await?;
            json_line(&report)?;
            say(&report.summary());
            anyhow::ensure!(
                allow_errors
                    || (report.failed == 0 && report.errors.is_empty() && report.rotations > 0.0),
                "streams failed or no rotation was seen (failed: {}, errors: {:?}, rotations: {})",
                report.failed,
                report.errors,
                report.rotations
            );
            Ok(())
        }
        Cmd::AdminCreate {
            admin_socket,
            count,
            first_uid,
            trust_domain,
            allow_errors,
        } => {
            let report =
                scale::admin_create(&admin_socket, count, first_uid, &trust_domain, 0).await?;
            json_line(&report)?;
            say(&report.summary());
            verdict(report.ok, &report.errors, allow_errors)
        }
    }
}

/// The `hold` child: commands from stdin lines, events as JSON lines on stdout.
async fn hold_child(
    socket: &Path,
    streams: usize,
    connections: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(4);
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel(4);
    // A plain thread reads stdin (blocking reads; tokio's stdin would need another feature).
    // At the end of input it drops the sender, which ends `hold`'s command loop.
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            match line.parse::<HoldCommand>() {
                Ok(cmd) => {
                    if cmd_tx.blocking_send(cmd).is_err() {
                        return;
                    }
                }
                Err(e) => say(&format!("hold: {e}")),
            }
        }
    });
    let printer = tokio::spawn(async move {
        while let Some(ev) = ev_rx.recv().await {
            if json_line(&ev).is_err() {
                return;
            }
        }
    });
    let r = scale::hold(socket, streams, connections, timeout, cmd_rx, ev_tx).await;
    let _ = printer.await;
    r
}

/// `fanout` or `sds-fanout`.
async fn fanout(api: FanoutApi, a: FanoutArgs) -> anyhow::Result<()> {
    let report = scenarios::fanout_api(
        &a.socket,
        api,
        a.streams,
        a.connections,
        a.agent_pid,
        a.timeout,
        a.client_threads,
    )
    .await?;
    report_fanout(&report, a.allow_errors)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("spiffed-loadgen: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
